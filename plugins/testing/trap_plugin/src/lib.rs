//! Test plugin: executes a wasm `unreachable` instruction on every event, so
//! the host's trap handling (fresh instance, failed ack, backtrace in the
//! error log) can be tested.

use otako_plugin_sdk::{Delivery, Event, HandlerError};

fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    // Only so the crate also builds for the host target (e.g. `cargo test`).
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

otako_plugin_sdk::export_handler!(handle);
