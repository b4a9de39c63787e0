//! Test plugin: panics on every event. With `panic = "abort"` the panic
//! message goes to the guest's stderr and the call then traps.

use otako_plugin_sdk::{Delivery, Event, HandlerError};

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    panic!("panic_plugin: deliberate panic handling event {}", event.id);
}

otako_plugin_sdk::export_handler!(handle);
