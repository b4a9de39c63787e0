//! Test plugin: returns two `GHOST` deliveries, one to user `999999999`
//! (well-formed, but no such user) and one to `not-a-number` (not an id at
//! all), each with payload `{"to": <that id>}`.

use otako_plugin_sdk::prelude::*;
use serde_json::json;

const GHOSTS: [&str; 2] = ["999999999", "not-a-number"];

fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
    GHOSTS
        .iter()
        .map(|ghost| deliver_to_users("GHOST", [ghost], &json!({ "to": ghost })))
        .collect()
}

otako_plugin_sdk::export_handler!(handle);
