//! Test plugin: allocates and fills 1 MiB chunks until the allocator fails,
//! so the host's per-call memory limit is what stops it (as an abort trap,
//! or a grow failure with `trap_on_grow_failure`).

use std::hint::black_box;

use otako_plugin_sdk::{Delivery, Event, HandlerError};

const CHUNK: usize = 1 << 20;

fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        // A non-zero fill writes every byte, so the pages are really used
        // rather than left as fresh zeroed memory.
        chunks.push(black_box(vec![0xA5_u8; CHUNK]));
    }
}

otako_plugin_sdk::export_handler!(handle);
