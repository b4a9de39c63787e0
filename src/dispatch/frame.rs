//! Dispatch frames (DESIGN §3), parsed into types once at the edge.
//!
//! `s` and `event_id` may be JSON strings or integers and are echoed back
//! in the form they came in, so they are kept as [`Echo`] values rather
//! than normalised.

use std::borrow::Cow;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::failure::Failure;

/// A string or integer from the backend, echoed back exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Echo {
    Int(i64),
    Str(String),
}

impl Echo {
    /// The value as text, as plugins see the event id.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Echo::Int(n) => Cow::Owned(n.to_string()),
            Echo::Str(s) => Cow::Borrowed(s),
        }
    }

    /// The canonical key the event id is stored under: `"1"` and `1` are
    /// the same event id. A NUL byte (which PostgreSQL text can't hold)
    /// and the escape character itself are escaped, so every id has a key
    /// and no two ids share one.
    pub fn key(&self) -> String {
        match self {
            Echo::Int(n) => n.to_string(),
            Echo::Str(s) if !s.contains(['\0', '\\']) => s.clone(),
            Echo::Str(s) => s.replace('\\', "\\\\").replace('\0', "\\0"),
        }
    }
}

/// One dispatch event with a readable `event_id`. Whether the rest of the
/// frame is well-formed is in `body`: a malformed event takes the same path
/// as any other and ends in a failed `EVENT_ROUNDTRIP` (`BAD_EVENT`).
#[derive(Debug, Clone)]
pub struct DispatchEvent {
    pub event_id: Echo,
    /// [`Echo::key`] of `event_id`, computed once.
    pub key: String,
    pub s: Option<Echo>,
    /// The event type, e.g. `EVENT_MESSAGE_CREATE`; empty when the frame
    /// had none or it was not a string.
    pub t: String,
    pub body: Result<Body, String>,
    /// When the frame was parsed, after it was read: whatever the backend
    /// committed before sending it is in any snapshot taken since, so the
    /// plugin's lookups may share one (`SqliteReader::read_since`).
    pub arrived: Instant,
}

/// The well-formed part of an event.
#[derive(Debug, Clone)]
pub struct Body {
    /// The `d` object as JSON text, handed to the plugin untouched.
    pub d: Box<RawValue>,
    /// `d.channel_id` as text, when it is a string or an integer: events
    /// with the same channel fan out in dispatch order.
    pub channel: Option<String>,
}

/// A parsed inbound frame.
#[derive(Debug)]
pub enum Inbound {
    /// op 1: the backend's keepalive; `ts` is echoed in the PONG as it
    /// came, byte for byte (`null` when absent).
    Ping { ts: Box<RawValue> },
    /// op 0: an event to run.
    Event(DispatchEvent),
}

#[derive(Deserialize)]
struct Raw<'a> {
    op: Option<serde_json::Value>,
    #[serde(borrow)]
    t: Option<&'a RawValue>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    s: Option<serde_json::Value>,
    event_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PingOf<'a> {
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChannelOf {
    channel_id: Option<serde_json::Value>,
}

/// A string or integer, else why not.
fn echo(field: &str, v: serde_json::Value) -> Result<Echo, String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= 128 => Ok(Echo::Str(s)),
        serde_json::Value::String(s) if s.is_empty() => Err(format!("{field} is empty")),
        serde_json::Value::String(_) => Err(format!("{field} is longer than 128 bytes")),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Echo::Int)
            .ok_or_else(|| format!("{field} must be an integer or a string, not {n}")),
        other => Err(format!(
            "{field} must be a string or an integer, not {}",
            kind(&other)
        )),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Parses one text frame. `Err` is the reason for an `INVALID_FRAME`: the
/// frame is not JSON, not an object, or an event without a readable
/// `event_id`.
pub fn parse(text: &str) -> Result<Inbound, String> {
    let raw: Raw<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            "frame is not a JSON object".to_owned()
        } else {
            format!("frame is not JSON: {e}")
        }
    })?;
    let op = match raw.op {
        None => 0,
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("op must be an integer, not {n}"))?,
        Some(other) => return Err(format!("op must be an integer, not {}", kind(&other))),
    };
    match op {
        1 => {
            let ts = raw
                .d
                .and_then(|d| serde_json::from_str::<PingOf<'_>>(d.get()).ok())
                .and_then(|d| d.ts)
                .map_or_else(null, ToOwned::to_owned);
            Ok(Inbound::Ping { ts })
        }
        0 => {
            let event_id = match raw.event_id {
                Some(v) => echo("event_id", v)?,
                None => return Err("event has no event_id".to_owned()),
            };
            let t = raw
                .t
                .and_then(|t| serde_json::from_str::<String>(t.get()).ok());
            let s = raw.s.filter(|s| !s.is_null()).map(|v| echo("s", v));
            let (s, s_error) = match s {
                None => (None, None),
                Some(Ok(s)) => (Some(s), None),
                Some(Err(why)) => (None, Some(why)),
            };
            let body = match (s_error, &t, raw.t, raw.d) {
                (Some(why), ..) => Err(why),
                (None, None, None, _) => Err("event has no t (event type)".to_owned()),
                (None, None, Some(t), _) => Err(format!(
                    "t must be a string, not {}",
                    serde_json::from_str::<serde_json::Value>(t.get()).map_or("JSON", |v| kind(&v))
                )),
                (None, Some(t), ..) if t.is_empty() || t.len() > 128 => {
                    Err("t must be 1 to 128 bytes".to_owned())
                }
                (None, Some(_), _, None) => Err("event has no d".to_owned()),
                (None, Some(_), _, Some(d)) => body(d),
            };
            Ok(Inbound::Event(DispatchEvent {
                key: event_id.key(),
                event_id,
                s,
                t: t.unwrap_or_default(),
                body,
                arrived: Instant::now(),
            }))
        }
        other => Err(format!(
            "unknown op {other} (the gateway accepts 0 = event and 1 = PING)"
        )),
    }
}

fn null() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

fn body(d: &RawValue) -> Result<Body, String> {
    if !d.get().trim_start().starts_with('{') {
        return Err("d must be a JSON object".to_owned());
    }
    let channel = match serde_json::from_str::<ChannelOf>(d.get()) {
        Ok(ChannelOf {
            channel_id: Some(serde_json::Value::String(s)),
        }) => Some(s),
        Ok(ChannelOf {
            channel_id: Some(serde_json::Value::Number(n)),
        }) => Some(n.to_string()),
        _ => None,
    };
    Ok(Body {
        d: d.to_owned(),
        channel,
    })
}

/// `EVENT_ROUNDTRIP`: the ack for one event.
#[derive(Serialize)]
struct Roundtrip<'a> {
    t: &'static str,
    event_id: &'a Echo,
    success: bool,
    op: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'a Echo>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<AckError<'a>>,
}

#[derive(Serialize)]
struct AckError<'a> {
    code: &'a str,
    message: &'a str,
}

/// How an event ended, as far as the backend is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success { duplicate: bool },
    Failed(Failure),
}

/// The ack frame for an event.
pub fn roundtrip(event_id: &Echo, s: Option<&Echo>, outcome: &Outcome) -> String {
    let (success, duplicate, error) = match outcome {
        Outcome::Success { duplicate } => (true, *duplicate, None),
        Outcome::Failed(f) => (
            false,
            false,
            Some(AckError {
                code: f.code.as_str(),
                message: &f.message,
            }),
        ),
    };
    serde_json::to_string(&Roundtrip {
        t: "EVENT_ROUNDTRIP",
        event_id,
        success,
        op: 0,
        s,
        duplicate,
        error,
    })
    .unwrap_or_default()
}

/// The reply to a PING, with a few gateway stats for the backend's
/// dashboards.
pub fn pong(ts: &RawValue, inflight: usize, sessions: usize) -> String {
    #[derive(Serialize)]
    struct Pong<'a> {
        op: u8,
        t: &'static str,
        d: PongData<'a>,
    }
    #[derive(Serialize)]
    struct PongData<'a> {
        ts: &'a RawValue,
        inflight: usize,
        sessions: usize,
    }
    serde_json::to_string(&Pong {
        op: 11,
        t: "PONG",
        d: PongData {
            ts,
            inflight,
            sessions,
        },
    })
    .unwrap_or_default()
}

/// The reply to a frame that is not an event.
pub fn invalid_frame(error: &str) -> String {
    serde_json::json!({ "op": 9, "t": "INVALID_FRAME", "d": { "error": error } }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::ErrorCode;

    #[test]
    fn parses_the_seed_frame_and_echoes_it() {
        let text = r#"{"t":"EVENT_MESSAGE_CREATE","d":{"id":"3","channel_id":"1"},"op":0,"s":"14","event_id":"1"}"#;
        let Inbound::Event(ev) = parse(text).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(ev.t, "EVENT_MESSAGE_CREATE");
        let body = ev.body.as_ref().unwrap();
        assert_eq!(body.d.get(), r#"{"id":"3","channel_id":"1"}"#);
        assert_eq!(body.channel.as_deref(), Some("1"));
        assert_eq!(ev.key, "1");
        let ack = roundtrip(
            &ev.event_id,
            ev.s.as_ref(),
            &Outcome::Success { duplicate: false },
        );
        assert_eq!(
            ack,
            r#"{"t":"EVENT_ROUNDTRIP","event_id":"1","success":true,"op":0,"s":"14"}"#
        );
    }

    #[test]
    fn integers_are_echoed_as_integers() {
        let text = r#"{"t":"X","d":{},"op":0,"s":14,"event_id":1}"#;
        let Inbound::Event(ev) = parse(text).unwrap() else {
            panic!("not an event")
        };
        let failure = Failure::new(ErrorCode::NoRoute, "no route for X");
        let ack = roundtrip(&ev.event_id, ev.s.as_ref(), &Outcome::Failed(failure));
        assert_eq!(
            ack,
            r#"{"t":"EVENT_ROUNDTRIP","event_id":1,"success":false,"op":0,"s":14,"error":{"code":"NO_ROUTE","message":"no route for X"}}"#
        );
    }

    fn bad(text: &str) -> (Echo, Option<Echo>, String) {
        match parse(text) {
            Ok(Inbound::Event(DispatchEvent {
                event_id,
                s,
                body: Err(why),
                ..
            })) => (event_id, s, why),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn garbage_is_invalid_and_bad_events_keep_their_id() {
        for text in [
            "nope",
            "[1,2]",
            r#"{"op":7}"#,
            r#"{"op":0,"t":"X","d":{}}"#,
            r#"{"op":0,"t":"X","d":{},"event_id":1.5}"#,
            r#"{"op":0,"t":"X","d":{},"event_id":[1]}"#,
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
        let (id, s, why) = bad(r#"{"op":0,"t":"X","d":[1],"event_id":"9","s":3}"#);
        assert_eq!((id, s), (Echo::Str("9".into()), Some(Echo::Int(3))));
        assert_eq!(why, "d must be a JSON object");
        assert!(matches!(
            parse(r#"{"op":1,"t":"PING","d":{"ts":123}}"#),
            Ok(Inbound::Ping { ts }) if ts.get() == "123"
        ));
        // Echoed byte for byte, however large (no trip through f64).
        let huge = "118446744063709551616712345678.50";
        let Ok(Inbound::Ping { ts }) = parse(&format!(r#"{{"op":1,"d":{{"ts":{huge}}}}}"#)) else {
            panic!("not a ping");
        };
        assert!(pong(&ts, 0, 0).contains(&format!(r#""ts":{huge}"#)));
    }

    #[test]
    fn a_t_of_any_json_type_is_a_bad_event_not_an_invalid_frame() {
        for (t, kind) in [
            ("5", "a number"),
            ("[1]", "an array"),
            (r#"{"a":1}"#, "an object"),
            ("true", "a boolean"),
        ] {
            let text = format!(r#"{{"op":0,"t":{t},"d":{{}},"event_id":"e","s":"2"}}"#);
            let (id, s, why) = bad(&text);
            assert_eq!(id, Echo::Str("e".into()));
            assert_eq!(s, Some(Echo::Str("2".into())));
            assert_eq!(why, format!("t must be a string, not {kind}"), "{t}");
        }
        for text in [
            r#"{"op":0,"d":{},"event_id":1}"#,
            r#"{"op":0,"t":null,"d":{},"event_id":1}"#,
        ] {
            assert_eq!(bad(text).2, "event has no t (event type)");
        }
        let (_, s, why) = bad(r#"{"op":0,"t":"X","d":{},"event_id":1,"s":[2]}"#);
        assert_eq!(
            (s, why.as_str()),
            (None, "s must be a string or an integer, not an array")
        );
    }

    #[test]
    fn keys_are_distinct_and_hold_no_nul() {
        let ids = ["a\0b", "a\\0b", "a\\\0b", "1", "a\\b"];
        let keys: Vec<String> = ids.iter().map(|i| Echo::Str((*i).into()).key()).collect();
        assert_eq!(keys[3], Echo::Int(1).key());
        for (i, key) in keys.iter().enumerate() {
            assert!(!key.contains('\0'), "{key:?}");
            for other in &keys[i + 1..] {
                assert_ne!(key, other);
            }
        }
    }

    #[test]
    fn channel_ids_may_be_strings_or_integers() {
        for (d, channel) in [
            (r#"{"channel_id":"7"}"#, Some("7")),
            (r#"{"channel_id":7}"#, Some("7")),
            (r#"{"channel_id":null}"#, None),
            (r#"{"id":"1"}"#, None),
        ] {
            let text = format!(r#"{{"op":0,"t":"X","d":{d},"event_id":1}}"#);
            let Ok(Inbound::Event(ev)) = parse(&text) else {
                panic!("{text}")
            };
            assert_eq!(ev.body.unwrap().channel.as_deref(), channel, "{d}");
        }
    }
}
