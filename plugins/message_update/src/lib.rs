//! `EVENT_MESSAGE_UPDATE` → `MESSAGE_UPDATE` to the channel's members: the
//! message as it is now stored, plus its `edited_timestamp`.

use otako_messages::{MessageRef, check_content_len, load};
use otako_plugin_sdk::prelude::*;

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let found = load(event.data_as::<MessageRef>()?)?;
    let message = found.message()?;
    check_content_len(&message)?;
    Ok(vec![deliver_to_channel(
        "MESSAGE_UPDATE",
        message.channel_id,
        &message.with_edited_timestamp(),
    )?])
}

otako_plugin_sdk::export_handler!(handle);
