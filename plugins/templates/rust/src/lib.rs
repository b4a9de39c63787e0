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

/// The handler against a scripted host, natively: `cargo test
/// --manifest-path plugins/Cargo.toml --target-dir plugins/target -p {{name}}`
/// (plugins/README.md, "Testing a handler without a gateway").
#[cfg(test)]
mod tests {
    use otako_plugin_sdk::testing::TestHost;

    use super::*;

    #[test]
    fn delivers_d_to_the_channel() {
        // Script what the handler asks the host: `.on_query(|sql, params|
        // Ok(Rows::with_columns(["name"]).row(&[&"alice"])))`, `.config(k, v)`,
        // `.online(ids)`; then assert on `host.queries()` and `host.logs()`.
        let host = TestHost::new().install();
        let d = r#"{"channel_id":"1","user_id":"10"}"#;
        let deliveries = handle(Event::new("{{event}}", "1", d)).expect("delivered");
        assert_eq!(deliveries.len(), 1);
        assert_eq!(deliveries[0].event, "{{delivers}}");
        assert_eq!(deliveries[0].audience, Audience::Channel("1".into()));
        assert_eq!(deliveries[0].payload, d);
        assert!(host.queries().is_empty());
    }

    #[test]
    fn bad_d_is_bad_event() {
        let _host = TestHost::new().install();
        let err = handle(Event::new("{{event}}", "1", "{}")).expect_err("no channel_id");
        assert_eq!(err.code, HandlerError::BAD_EVENT);
    }
}
