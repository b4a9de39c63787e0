//! `EVENT_MESSAGE_CREATE` → `MESSAGE_CREATE` to the channel's members, with
//! the full message object read back from the database (the dispatch only
//! carries ids, so clients never see a backend's unvalidated copy).

use otako_messages::{MessageRef, check_content_len, load};
use otako_plugin_sdk::prelude::*;

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let found = load(event.data_as::<MessageRef>()?)?;
    let message = found.message()?;
    check_content_len(&message)?;
    Ok(vec![deliver_to_channel(
        "MESSAGE_CREATE",
        message.channel_id,
        &message,
    )?])
}

otako_plugin_sdk::export_handler!(handle);
