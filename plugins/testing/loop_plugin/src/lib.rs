//! Test plugin: spins forever, so only the host's per-call deadline (epoch
//! interruption) can end the call.

use std::hint::black_box;

use otako_plugin_sdk::{Delivery, Event, HandlerError};

fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let mut spins: u64 = 0;
    loop {
        // `black_box` keeps the optimizer from proving the loop side-effect
        // free and deleting it (an empty infinite loop is UB-adjacent).
        spins = black_box(spins.wrapping_add(1));
    }
}

otako_plugin_sdk::export_handler!(handle);
