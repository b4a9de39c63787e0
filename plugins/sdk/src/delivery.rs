//! Builders for what a handler returns: an event name, a JSON payload and an
//! audience.
//!
//! The payload is any `Serialize` value; it is serialized here, once, and the
//! host sends those bytes to every recipient. A handler that already holds
//! JSON text (e.g. passing `d` through) can build a [`Delivery`] literal
//! instead; the host checks that the payload is valid JSON either way.

use serde::Serialize;

use crate::{Audience, Delivery, HandlerError};

/// Delivers `payload` as `event` to every session of each of `user_ids`.
///
/// Ids are anything that prints as a decimal id: [`crate::Id`], `i64`,
/// `&str`, `String`.
pub fn deliver_to_users<I, P>(
    event: &str,
    user_ids: I,
    payload: &P,
) -> Result<Delivery, HandlerError>
where
    I: IntoIterator,
    I::Item: ToString,
    P: Serialize + ?Sized,
{
    let users = user_ids.into_iter().map(|id| id.to_string()).collect();
    build(event, Audience::Users(users), payload)
}

/// Delivers `payload` as `event` to every session of every member of
/// `channel_id`; the host resolves the members.
pub fn deliver_to_channel<P>(
    event: &str,
    channel_id: impl ToString,
    payload: &P,
) -> Result<Delivery, HandlerError>
where
    P: Serialize + ?Sized,
{
    build(event, Audience::Channel(channel_id.to_string()), payload)
}

/// Delivers `payload` as `event` to every connected session.
pub fn deliver_to_everyone<P>(event: &str, payload: &P) -> Result<Delivery, HandlerError>
where
    P: Serialize + ?Sized,
{
    build(event, Audience::Everyone, payload)
}

fn build<P>(event: &str, audience: Audience, payload: &P) -> Result<Delivery, HandlerError>
where
    P: Serialize + ?Sized,
{
    let payload = serde_json::to_string(payload).map_err(|err| {
        HandlerError::bad_payload(format!("cannot serialize the {event} payload: {err}"))
    })?;
    Ok(Delivery {
        event: event.to_owned(),
        payload,
        audience,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Id;

    #[test]
    fn builds_each_audience() {
        let payload = serde_json::json!({ "id": Id(5) });
        let d = deliver_to_users("E", [Id(1), Id(2)], &payload).expect("delivery");
        assert_eq!(d.event, "E");
        assert_eq!(d.payload, r#"{"id":"5"}"#);
        assert_eq!(d.audience, Audience::Users(vec!["1".into(), "2".into()]));
        let d = deliver_to_channel("E", Id(3), &payload).expect("delivery");
        assert_eq!(d.audience, Audience::Channel("3".into()));
        let d = deliver_to_everyone("E", &payload).expect("delivery");
        assert_eq!(d.audience, Audience::Everyone);
    }

    #[test]
    fn unserializable_payload_is_bad_payload() {
        // JSON object keys must be strings.
        let payload: BTreeMap<(i32, i32), i32> = BTreeMap::from([((1, 2), 3)]);
        let err = deliver_to_everyone("E", &payload).expect_err("tuple keys");
        assert_eq!(err.code, "BAD_PAYLOAD");
    }
}
