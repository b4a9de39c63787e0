//! Test plugin: delivers `CONFIG_ECHO` to everyone with what it was given:
//! `{"greeting", "max_content_len", "event_id", "event_name"}`, the config
//! values as strings or `null` when unset. Tests config and hot reload.

use otako_plugin_sdk::prelude::*;
use serde_json::json;

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let payload = json!({
        "greeting": config("greeting"),
        "max_content_len": config("max_content_len"),
        "event_id": event.id,
        "event_name": event.name,
    });
    Ok(vec![deliver_to_everyone("CONFIG_ECHO", &payload)?])
}

otako_plugin_sdk::export_handler!(handle);
