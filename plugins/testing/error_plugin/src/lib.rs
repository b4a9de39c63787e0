//! Test plugin: always fails with its own code, `TEAPOT` / `I refuse`, which
//! the host must pass to the backend's failed ack unchanged.

use otako_plugin_sdk::{Delivery, Event, HandlerError};

fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
    Err(HandlerError::new("TEAPOT", "I refuse"))
}

otako_plugin_sdk::export_handler!(handle);
