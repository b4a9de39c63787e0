//! `{{event}}` → `{{delivers}}` to the members of `d.channel_id`, with `d`
//! passed through. Edit `handle`; `plugins/README.md` has the SDK's story.

use otako_plugin_sdk::prelude::*;
use serde::Deserialize;

/// The fields of the dispatch `d` this handler reads.
#[derive(Deserialize)]
struct Target {
    channel_id: Id,
}

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let target: Target = event.data_as()?;
    let d = event.data_value()?;
    Ok(vec![deliver_to_channel("{{delivers}}", target.channel_id, &d)?])
}

otako_plugin_sdk::export_handler!(handle);
