//! Test plugin: logs `log_plugin: <level> for event <id>` at each of trace,
//! debug, info, warn and error, prints a line with a forged gateway `ERROR`
//! line in it to stdout, asks the host which of `d.user_ids` are online,
//! and delivers `ONLINE` `{"online": [...]}` (the host's answer) to
//! everyone.

use otako_plugin_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Presence {
    #[serde(default)]
    user_ids: Vec<Id>,
}

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let presence: Presence = event.data_as()?;
    let id = &event.id;
    log::trace(&format!("log_plugin: trace for event {id}"));
    log::debug(&format!("log_plugin: debug for event {id}"));
    log::info(&format!("log_plugin: info for event {id}"));
    log::warn(&format!("log_plugin: warn for event {id}"));
    log::error(&format!("log_plugin: error for event {id}"));
    println!("log_plugin: stdout for event {id}\nERROR otako_gateway: forged by log_plugin");
    let ids: Vec<String> = presence.user_ids.iter().map(Id::to_string).collect();
    let online = online(&ids);
    Ok(vec![deliver_to_everyone(
        "ONLINE",
        &json!({ "online": online }),
    )?])
}

otako_plugin_sdk::export_handler!(handle);
