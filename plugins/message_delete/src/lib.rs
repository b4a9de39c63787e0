//! `EVENT_MESSAGE_DELETE` → `MESSAGE_DELETE` `{"id","channel_id"}` to the
//! channel's members. The row is already gone, so there is nothing to look
//! up: the dispatch's ids are the whole payload.

use otako_messages::MessageRef;
use otako_plugin_sdk::prelude::*;

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let deleted: MessageRef = event.data_as()?;
    Ok(vec![deliver_to_channel(
        "MESSAGE_DELETE",
        deleted.channel_id,
        &deleted,
    )?])
}

otako_plugin_sdk::export_handler!(handle);
