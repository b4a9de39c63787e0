//! The incoming dispatch event and the id type its `d` object carries.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::{Event, HandlerError, ToValue, Value};

impl Event {
    /// An event as the host would pass it, e.g. to call a handler in a unit
    /// test: `Event::new("EVENT_MESSAGE_CREATE", "1", r#"{"id":"3"}"#)`.
    pub fn new(name: impl Into<String>, id: impl Into<String>, data: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            id: id.into(),
            data: data.into(),
        }
    }

    /// Parses the event's `d` object into `T`.
    ///
    /// Invalid JSON, a missing field or a field of the wrong type is the
    /// sender's fault, so it becomes [`HandlerError::BAD_EVENT`] naming the
    /// event and serde's reason (which says which field and where).
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(&self.data)
            .map_err(|err| HandlerError::bad_event(format!("invalid `d` for {}: {err}", self.name)))
    }

    /// Parses the event's `d` object as untyped JSON, for handlers that only
    /// look at a field or two or pass `d` through.
    pub fn data_value(&self) -> Result<serde_json::Value, HandlerError> {
        self.data_as()
    }
}

/// A snowflake-style id: an `i64` in the database, a decimal string in JSON.
///
/// It deserializes from either a decimal string (`"42"`, the contract) or a
/// JSON integer (`42`, which some backends send), and always serializes as a
/// string so clients never lose precision on ids above 2^53. It binds as an
/// integer query parameter and prints as decimal, so it can be passed
/// straight to [`crate::query`] and the delivery builders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(pub i64);

impl Id {
    /// The id as the database stores it.
    pub fn get(self) -> i64 {
        self.0
    }

    /// The id in decimal, written into `buf`. Every delivery prints a few
    /// ids; this skips `fmt`'s machinery, which is slow in wasm.
    fn decimal(self, buf: &mut [u8; 20]) -> &str {
        let mut n = self.0.unsigned_abs();
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if self.0 < 0 {
            start -= 1;
            buf[start] = b'-';
        }
        // Only ASCII digits and '-' were written.
        std::str::from_utf8(&buf[start..]).unwrap_or_default()
    }
}

impl From<i64> for Id {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.decimal(&mut [0; 20]))
    }
}

/// The error of parsing an [`Id`] from text that is not a decimal `i64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseIdError(String);

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a decimal integer id", self.0)
    }
}

impl std::error::Error for ParseIdError {}

impl FromStr for Id {
    type Err = ParseIdError;

    /// Accepts only ASCII digits with an optional leading `-`: `i64`'s own
    /// parser also takes a leading `+`, which no id is ever written with.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('-').unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseIdError(s.to_owned()));
        }
        s.parse().map(Id).map_err(|_| ParseIdError(s.to_owned()))
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.decimal(&mut [0; 20]))
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = Id;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id as a decimal string or an integer")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                i64::try_from(v)
                    .map(Id)
                    .map_err(|_| E::custom(format!("id {v} is out of range")))
            }
        }

        deserializer.deserialize_any(IdVisitor)
    }
}

impl ToValue for Id {
    fn to_value(&self) -> Value {
        Value::Integer(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        Event {
            name: "EVENT_TEST".into(),
            id: "1".into(),
            data: data.into(),
        }
    }

    #[derive(Deserialize)]
    struct Ref {
        id: Id,
        channel_id: Id,
    }

    #[test]
    fn ids_parse_from_strings_and_integers() {
        let r: Ref = event(r#"{"id":"3","channel_id":7,"extra":true}"#)
            .data_as()
            .expect("valid d");
        assert_eq!((r.id, r.channel_id), (Id(3), Id(7)));
    }

    #[test]
    fn ids_serialize_as_strings() {
        let json = serde_json::to_string(&Id(9_007_199_254_740_993)).expect("serializes");
        assert_eq!(json, r#""9007199254740993""#);
        for id in [0, 7, -7, 10, i64::MAX, i64::MIN] {
            assert_eq!(
                serde_json::to_string(&Id(id)).expect("serializes"),
                format!("\"{id}\"")
            );
            assert_eq!(Id(id).to_string(), id.to_string());
        }
        assert_eq!(format!("{:>4}", Id(7)), "   7");
    }

    #[test]
    fn bad_data_is_bad_event() {
        for data in [
            "not json",
            r#"{"id":"3"}"#,
            r#"{"id":"x","channel_id":"1"}"#,
            r#"{"id":"+3","channel_id":"1"}"#,
            r#"{"id":1.5,"channel_id":"1"}"#,
            r#"{"id":"99999999999999999999","channel_id":"1"}"#,
        ] {
            let err = event(data).data_as::<Ref>().err().expect(data);
            assert_eq!(err.code, "BAD_EVENT", "{data}");
            assert!(
                err.message.starts_with("invalid `d` for EVENT_TEST: "),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn data_value_reads_any_json() {
        let v = event(r#"{"a":[1,2]}"#).data_value().expect("json");
        assert_eq!(v["a"][1], 2);
    }
}
