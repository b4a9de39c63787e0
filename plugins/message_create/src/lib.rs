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

/// The handler against a scripted host: what each answer of the database
/// makes it deliver or fail with (the JS and Python twins' tests check the
/// same cases, `handler.test.mjs` and `test_app.py`).
#[cfg(test)]
mod tests {
    use otako_plugin_sdk::testing::TestHost;
    use otako_plugin_sdk::{DbError, Value};

    use super::*;

    /// The seed message (`{"id":"3","channel_id":"1"}`) as the lookup returns it.
    fn seed_row(content: &str) -> Rows {
        Rows::with_columns(otako_messages::COLUMNS).row(&[
            &3_i64,
            &1_i64,
            &2_i64,
            &"bob",
            &content,
            &None::<&str>,
            &"2026-11-28T00:00:00.000Z",
            &None::<&str>,
        ])
    }

    fn create(d: &str) -> Result<Vec<Delivery>, HandlerError> {
        handle(Event::new("EVENT_MESSAGE_CREATE", "1", d))
    }

    #[test]
    fn found_message_goes_to_its_channel_in_full() {
        let host = TestHost::new()
            .on_query(|_, _| Ok(seed_row("hello")))
            .install();
        let deliveries = create(r#"{"id":"3","channel_id":"1"}"#).expect("delivered");
        assert_eq!(deliveries.len(), 1);
        let delivery = &deliveries[0];
        assert_eq!(delivery.event, "MESSAGE_CREATE");
        assert_eq!(delivery.audience, Audience::Channel("1".into()));
        let payload: serde_json::Value =
            serde_json::from_str(&delivery.payload).expect("JSON payload");
        assert_eq!(
            payload,
            serde_json::json!({
                "id": "3",
                "channel_id": "1",
                "author": { "id": "2", "name": "bob" },
                "content": "hello",
                "nonce": null,
                "timestamp": "2026-11-28T00:00:00.000Z",
            })
        );
        let queries = host.queries();
        assert_eq!(queries.len(), 1);
        assert!(
            queries[0].sql.contains("FROM messages m"),
            "{}",
            queries[0].sql
        );
        assert_eq!(queries[0].params, [Value::Integer(3), Value::Integer(1)]);
    }

    #[test]
    fn missing_message_is_not_found() {
        let _host = TestHost::new()
            .on_query(|_, _| Ok(Rows::with_columns(["id"])))
            .install();
        let err = create(r#"{"id":"3","channel_id":"1"}"#).expect_err("no row");
        assert_eq!(err.code, "NOT_FOUND");
        assert_eq!(err.message, "message 3 not found in channel 1");
    }

    #[test]
    fn database_failure_is_db_error() {
        let _host = TestHost::new()
            .on_query(|_, _| Err(DbError::Query("no such table: messages".into())))
            .install();
        let err = create(r#"{"id":"3","channel_id":"1"}"#).expect_err("db down");
        assert_eq!(err.code, "DB_ERROR");
        assert_eq!(err.message, "query failed: no such table: messages");
    }

    #[test]
    fn bad_d_is_bad_event_without_a_query() {
        let host = TestHost::new().install();
        for d in [
            "not json",
            r#"{"id":"3"}"#,
            r#"{"id":"x","channel_id":"1"}"#,
        ] {
            let err = create(d).expect_err(d);
            assert_eq!(err.code, "BAD_EVENT", "{d}");
            assert!(
                err.message
                    .starts_with("invalid `d` for EVENT_MESSAGE_CREATE: "),
                "{}",
                err.message
            );
        }
        assert!(host.queries().is_empty());
    }

    #[test]
    fn max_content_len_counts_characters() {
        let _host = TestHost::new()
            .config("max_content_len", "5")
            .on_query(|_, params| {
                // Message 3 is five characters (but six bytes), message 4 six.
                let content = if params[0] == Value::Integer(3) {
                    "héllo"
                } else {
                    "hello!"
                };
                Ok(seed_row(content))
            })
            .install();
        assert!(create(r#"{"id":"3","channel_id":"1"}"#).is_ok());
        let err = create(r#"{"id":"4","channel_id":"1"}"#).expect_err("too long");
        assert_eq!(err.code, "BAD_EVENT");
        assert_eq!(
            err.message,
            "content longer than max_content_len (6 > 5 characters)"
        );
    }
}
