//! The message object shared by the `MESSAGE_CREATE`/`MESSAGE_UPDATE`
//! handlers: the `d` they receive, the lookup, and the client-facing shape
//! of DESIGN §7, so both events always send the same object.

use otako_plugin_sdk::{HandlerError, Id, Row, Rows, config_parse, query};
use serde::{Deserialize, Serialize};

/// The dispatch `d` of every `EVENT_MESSAGE_*`: which message, in which
/// channel. Serialized back, it is also the `MESSAGE_DELETE` payload.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct MessageRef {
    /// The message id.
    pub id: Id,
    /// The channel the message is in.
    pub channel_id: Id,
}

/// A message's author as clients see it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Author<'a> {
    /// The user id.
    pub id: Id,
    /// The user's display name.
    pub name: &'a str,
}

/// A message as clients see it in `MESSAGE_CREATE` (DESIGN §7):
/// `{"id","channel_id","author":{"id","name"},"content","nonce","timestamp"}`.
///
/// It borrows its text from the looked-up row ([`Found::message`]): the
/// values are serialized once, straight from what the host handed over.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Message<'a> {
    /// The message id.
    pub id: Id,
    /// The channel the message is in.
    pub channel_id: Id,
    /// Who wrote it.
    pub author: Author<'a>,
    /// The text.
    pub content: &'a str,
    /// The author's idempotency nonce; `null` when the message had none.
    pub nonce: Option<&'a str>,
    /// When it was created (RFC 3339, as stored).
    pub timestamp: &'a str,
    /// When it was last edited; only `MESSAGE_UPDATE` shows it (see
    /// [`Message::with_edited_timestamp`]).
    #[serde(skip)]
    pub edited_timestamp: Option<&'a str>,
}

/// A message as clients see it in `MESSAGE_UPDATE`: the §7 object plus
/// `"edited_timestamp"` (`null` if the stored row has no edit time).
#[derive(Debug, Serialize)]
pub struct EditedMessage<'a> {
    #[serde(flatten)]
    message: Message<'a>,
    edited_timestamp: Option<&'a str>,
}

impl<'a> Message<'a> {
    /// The update view of this message.
    pub fn with_edited_timestamp(self) -> EditedMessage<'a> {
        EditedMessage {
            message: self,
            edited_timestamp: self.edited_timestamp,
        }
    }
}

/// One statement for both databases: `$n` placeholders, explicit column
/// aliases so the names don't depend on the driver.
const LOAD_MESSAGE: &str = "\
    SELECT m.id AS id, m.channel_id AS channel_id, m.author_id AS author_id, \
           u.name AS author_name, m.content AS content, m.nonce AS nonce, \
           m.created_at AS created_at, m.edited_at AS edited_at \
    FROM messages m JOIN users u ON u.id = m.author_id \
    WHERE m.id = $1 AND m.channel_id = $2";

/// The columns [`load`]'s statement returns, in order: what a test host
/// answers it with.
pub const COLUMNS: [&str; 8] = [
    "id",
    "channel_id",
    "author_id",
    "author_name",
    "content",
    "nonce",
    "created_at",
    "edited_at",
];

/// The result of [`load`]: owns the row the [`Message`] borrows from.
#[derive(Debug)]
pub struct Found {
    r: MessageRef,
    rows: Rows,
}

/// Looks up the message `r` names, with its author.
///
/// Checking the channel too means a backend bug that pairs a message with
/// the wrong channel is a `NOT_FOUND`, not a leak into another channel.
pub fn load(r: MessageRef) -> Result<Found, HandlerError> {
    let rows = query(LOAD_MESSAGE, &[&r.id, &r.channel_id])?;
    Ok(Found { r, rows })
}

impl Found {
    /// The message, or `NOT_FOUND` if no row matched.
    pub fn message(&self) -> Result<Message<'_>, HandlerError> {
        let Some(row) = self.rows.first() else {
            return Err(HandlerError::not_found(format!(
                "message {} not found in channel {}",
                self.r.id, self.r.channel_id
            )));
        };
        from_row(row)
    }
}

fn from_row(row: Row<'_>) -> Result<Message<'_>, HandlerError> {
    Ok(Message {
        id: row.get_id("id")?,
        channel_id: row.get_id("channel_id")?,
        author: Author {
            id: row.get_id("author_id")?,
            name: row.get_str("author_name")?,
        },
        content: row.get_str("content")?,
        nonce: row.get_opt_str("nonce")?,
        timestamp: row.get_str("created_at")?,
        edited_timestamp: row.get_opt_str("edited_at")?,
    })
}

/// Enforces the route's optional `max_content_len` (in characters).
///
/// The reference backend validates length too; this is the gateway
/// operator's own cap, so an over-long message fails its event with
/// `BAD_EVENT` instead of reaching clients.
pub fn check_content_len(message: &Message<'_>) -> Result<(), HandlerError> {
    let Some(max) = config_parse::<usize>("max_content_len")? else {
        return Ok(());
    };
    let len = message.content.chars().count();
    if len > max {
        return Err(HandlerError::bad_event(format!(
            "content longer than max_content_len ({len} > {max} characters)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use otako_plugin_sdk::Value;

    use super::*;

    fn message(edited: Option<&str>) -> Message<'_> {
        Message {
            id: Id(3),
            channel_id: Id(1),
            author: Author {
                id: Id(2),
                name: "alice",
            },
            content: "hi",
            nonce: None,
            timestamp: "2025-01-01T00:00:00Z",
            edited_timestamp: edited,
        }
    }

    #[test]
    fn create_shape_is_the_design_message_object() {
        let json = serde_json::to_string(&message(Some("x"))).expect("json");
        assert_eq!(
            json,
            r#"{"id":"3","channel_id":"1","author":{"id":"2","name":"alice"},"content":"hi","nonce":null,"timestamp":"2025-01-01T00:00:00Z"}"#
        );
    }

    #[test]
    fn a_found_row_reads_as_the_message() {
        let columns: Vec<String> = COLUMNS.map(String::from).to_vec();
        let row = vec![
            Value::Integer(3),
            Value::Integer(1),
            Value::Integer(2),
            Value::Text("alice".into()),
            Value::Text("hi".into()),
            Value::Null,
            Value::Text("2025-01-01T00:00:00Z".into()),
            Value::Text("x".into()),
        ];
        let r = MessageRef {
            id: Id(3),
            channel_id: Id(1),
        };
        let found = Found {
            r,
            rows: Rows::new(columns.clone(), vec![row]),
        };
        let message = found.message().expect("message");
        assert_eq!(message.edited_timestamp, Some("x"));
        assert_eq!(
            serde_json::to_string(&message).expect("json"),
            serde_json::to_string(&self::message(Some("x"))).expect("json")
        );
        let missing = Found {
            r,
            rows: Rows::new(columns, Vec::new()),
        };
        let err = missing.message().expect_err("no row");
        assert_eq!(err.code, "NOT_FOUND");
        assert_eq!(err.message, "message 3 not found in channel 1");
    }

    #[test]
    fn update_shape_adds_edited_timestamp() {
        let m = message(None);
        let json = serde_json::to_string(&m.with_edited_timestamp()).expect("json");
        assert!(
            json.ends_with(r#","timestamp":"2025-01-01T00:00:00Z","edited_timestamp":null}"#),
            "{json}"
        );
        let m = message(Some("2025-01-02T00:00:00Z"));
        let json = serde_json::to_string(&m.with_edited_timestamp()).expect("json");
        assert!(
            json.ends_with(r#""edited_timestamp":"2025-01-02T00:00:00Z"}"#),
            "{json}"
        );
    }
}
