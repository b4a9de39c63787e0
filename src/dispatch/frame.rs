//! Dispatch frames (DESIGN §3), parsed into types once at the edge.
//!
//! `s` and `event_id` may be JSON strings or integers and are echoed back
//! in the form they came in, so they are kept as [`Echo`] values rather
//! than normalised.

use std::borrow::Cow;

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
    /// The canonical text form: `"1"` and `1` are the same event id.
    pub fn key(&self) -> String {
        match self {
            Echo::Int(n) => n.to_string(),
            Echo::Str(s) => s.clone(),
        }
    }
}

/// One dispatch event, as the backend sent it.
#[derive(Debug, Clone)]
pub struct EventFrame {
    /// The event type, e.g. `EVENT_MESSAGE_CREATE`.
    pub t: String,
    /// The `d` object as JSON text, handed to the plugin untouched.
    pub d: Box<RawValue>,
    pub s: Option<Echo>,
    pub event_id: Echo,
}

/// A parsed inbound frame.
#[derive(Debug)]
pub enum Inbound {
    /// op 1: the backend's keepalive; `ts` is echoed in the PONG.
    Ping { ts: serde_json::Value },
    /// op 0: an event to run.
    Event(EventFrame),
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON, not an object, or no readable `event_id`: answered with
    /// `INVALID_FRAME`.
    Invalid(String),
    /// An event whose id can be read but whose other fields are wrong:
    /// answered with a failed `EVENT_ROUNDTRIP`.
    BadEvent {
        event_id: Echo,
        s: Option<Echo>,
        t: Option<String>,
        reason: String,
    },
}

#[derive(Deserialize)]
struct Raw<'a> {
    op: Option<serde_json::Value>,
    #[serde(borrow)]
    t: Option<Cow<'a, str>>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    s: Option<serde_json::Value>,
    event_id: Option<serde_json::Value>,
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

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Inbound, FrameError> {
    let raw: Raw<'_> = serde_json::from_str(text).map_err(|e| {
        FrameError::Invalid(if e.is_data() {
            "frame is not a JSON object".to_owned()
        } else {
            format!("frame is not JSON: {e}")
        })
    })?;
    let op = match raw.op {
        None => 0,
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| FrameError::Invalid(format!("op must be an integer, not {n}")))?,
        Some(other) => {
            return Err(FrameError::Invalid(format!(
                "op must be an integer, not {}",
                kind(&other)
            )));
        }
    };
    match op {
        1 => {
            let ts = raw
                .d
                .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok())
                .and_then(|d| d.get("ts").cloned())
                .unwrap_or(serde_json::Value::Null);
            Ok(Inbound::Ping { ts })
        }
        0 => {
            let event_id = match raw.event_id {
                Some(v) => echo("event_id", v).map_err(FrameError::Invalid)?,
                None => return Err(FrameError::Invalid("event has no event_id".to_owned())),
            };
            let t = raw.t.map(Cow::into_owned);
            let bad = |reason: String, s: Option<Echo>, t: Option<String>| FrameError::BadEvent {
                event_id: event_id.clone(),
                s,
                t,
                reason,
            };
            let s = match raw.s {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(echo("s", v).map_err(|r| bad(r, None, t.clone()))?),
            };
            let t = match t {
                Some(t) if !t.is_empty() && t.len() <= 128 => t,
                Some(_) => return Err(bad("t must be 1 to 128 bytes".into(), s, None)),
                None => return Err(bad("event has no t (event type)".into(), s, None)),
            };
            let d = match raw.d {
                Some(d) if d.get().trim_start().starts_with('{') => d.to_owned(),
                Some(_) => return Err(bad("d must be a JSON object".into(), s, Some(t))),
                None => return Err(bad("event has no d".into(), s, Some(t))),
            };
            Ok(Inbound::Event(EventFrame { t, d, s, event_id }))
        }
        other => Err(FrameError::Invalid(format!(
            "unknown op {other} (the gateway accepts 0 = event and 1 = PING)"
        ))),
    }
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
pub fn pong(ts: &serde_json::Value, inflight: usize, sessions: usize) -> String {
    serde_json::json!({
        "op": 11,
        "t": "PONG",
        "d": { "ts": ts, "inflight": inflight, "sessions": sessions },
    })
    .to_string()
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
        assert_eq!(ev.d.get(), r#"{"id":"3","channel_id":"1"}"#);
        assert_eq!(ev.event_id.key(), "1");
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

    #[test]
    fn garbage_is_invalid_and_bad_events_keep_their_id() {
        assert!(matches!(parse("nope"), Err(FrameError::Invalid(_))));
        assert!(matches!(parse("[1,2]"), Err(FrameError::Invalid(_))));
        assert!(matches!(parse(r#"{"op":7}"#), Err(FrameError::Invalid(_))));
        assert!(matches!(
            parse(r#"{"op":0,"t":"X","d":{}}"#),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            parse(r#"{"op":0,"t":"X","d":{},"event_id":1.5}"#),
            Err(FrameError::Invalid(_))
        ));
        match parse(r#"{"op":0,"t":"X","d":[1],"event_id":"9","s":3}"#) {
            Err(FrameError::BadEvent { event_id, s, .. }) => {
                assert_eq!(event_id, Echo::Str("9".into()));
                assert_eq!(s, Some(Echo::Int(3)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"op":1,"t":"PING","d":{"ts":123}}"#),
            Ok(Inbound::Ping { ts }) if ts == serde_json::json!(123)
        ));
    }
}
