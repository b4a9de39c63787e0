//! Client frames (DESIGN §2): the event text is built once per delivery
//! and only the per-session `s` is spliced in for each recipient.

use std::fmt::Write as _;

use super::resume::{Greeting, SessionId};
use crate::ids::UserId;

/// A client event serialized once and shared by all recipients.
///
/// Holds the whole frame `{"op":0,"t":"X","s":` + `,"d":…}` with a split
/// point where each session's sequence number goes, so a recipient costs
/// one copy of the text and never a JSON serialization.
#[derive(Debug)]
pub struct ClientFrame {
    text: String,
    split: usize,
}

impl ClientFrame {
    /// `payload` is already-validated JSON text (the `d` object).
    pub fn new(event: &str, payload: &str) -> ClientFrame {
        // Serializing a &str cannot fail; the fallback only keeps the frame JSON.
        let event = serde_json::to_string(event).unwrap_or_else(|_| String::from("\"\""));
        let mut text = String::with_capacity(payload.len() + event.len() + 24);
        text.push_str("{\"op\":0,\"t\":");
        text.push_str(&event);
        text.push_str(",\"s\":");
        let split = text.len();
        text.push_str(",\"d\":");
        text.push_str(payload);
        text.push('}');
        ClientFrame { text, split }
    }

    /// The frame as one session sees it, with sequence number `seq`.
    /// Allocated to the exact length: the WebSocket message takes the
    /// buffer over as is, where a spare byte would cost a second
    /// allocation per delivery (`bytes` wraps a `Vec` with spare capacity
    /// in a shared header).
    pub fn encode(&self, seq: u64) -> String {
        let (head, tail) = self.text.split_at(self.split);
        let digits = seq.checked_ilog10().map_or(1, |d| d as usize + 1);
        let mut out = String::with_capacity(self.text.len() + digits);
        out.push_str(head);
        // Writing to a String cannot fail.
        let _ = write!(out, "{seq}");
        out.push_str(tail);
        out
    }

    /// The shared text and where `s` goes in it: what the cluster bus
    /// carries, so other nodes need not serialize the frame again.
    pub fn parts(&self) -> (&str, usize) {
        (&self.text, self.split)
    }

    /// A frame from [`parts`](Self::parts) read off the bus; `None` if
    /// `split` is not a character boundary of `text`.
    pub fn from_parts(text: String, split: usize) -> Option<ClientFrame> {
        text.is_char_boundary(split)
            .then_some(ClientFrame { text, split })
    }

    /// Bytes in the shared text (without the sequence number).
    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

/// The first frame of every session. HELLO carries no `s`.
pub(crate) fn hello(
    session: SessionId,
    user: UserId,
    heartbeat_interval_ms: u64,
    greeting: Greeting,
) -> String {
    let mut out = format!(
        "{{\"op\":10,\"t\":\"HELLO\",\"d\":{{\"session_id\":\"{session}\",\"user_id\":\"{user}\",\"heartbeat_interval_ms\":{heartbeat_interval_ms},"
    );
    // Writing to a String cannot fail.
    let _ = match greeting {
        Greeting::Fresh => write!(out, "\"resumed\":false"),
        Greeting::Resumed { replayed } => {
            write!(out, "\"resumed\":true,\"replayed\":{replayed}")
        }
        Greeting::Refused(why) => write!(out, "\"resumed\":false,\"reason\":\"{}\"", why.reason()),
    };
    out.push_str("}}");
    out
}

#[cfg(test)]
mod tests {
    use super::super::resume::Refused;
    use super::*;

    #[test]
    fn splices_the_sequence_number() {
        let frame = ClientFrame::new("MESSAGE_CREATE", r#"{"id":"3","content":"hi \"x\""}"#);
        let one: serde_json::Value = serde_json::from_str(&frame.encode(1)).unwrap();
        assert_eq!(
            one,
            serde_json::json!({"op":0,"t":"MESSAGE_CREATE","s":1,"d":{"id":"3","content":"hi \"x\""}})
        );
        let big: serde_json::Value = serde_json::from_str(&frame.encode(u64::MAX)).unwrap();
        assert_eq!(big["s"], serde_json::json!(u64::MAX));
        for seq in [0, 9, 10, 99, 100, 12_345, u64::MAX] {
            let text = frame.encode(seq);
            assert_eq!(text.capacity(), text.len(), "s = {seq}");
        }
    }

    #[test]
    fn event_names_are_escaped() {
        let frame = ClientFrame::new("A\"B", "{}");
        let v: serde_json::Value = serde_json::from_str(&frame.encode(2)).unwrap();
        assert_eq!(v["t"], "A\"B");
    }

    #[test]
    fn hello_shapes() {
        let id = SessionId::random();
        let user = UserId::new(42).unwrap();
        let parse =
            |g| -> serde_json::Value { serde_json::from_str(&hello(id, user, 30000, g)).unwrap() };
        let d = |extra: serde_json::Value| {
            let mut d = serde_json::json!({"session_id":id.to_string(),"user_id":"42","heartbeat_interval_ms":30000});
            d.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::json!({"op":10,"t":"HELLO","d":d})
        };
        assert_eq!(
            parse(Greeting::Fresh),
            d(serde_json::json!({"resumed":false}))
        );
        assert_eq!(
            parse(Greeting::Resumed { replayed: 3 }),
            d(serde_json::json!({"resumed":true,"replayed":3}))
        );
        assert_eq!(
            parse(Greeting::Refused(Refused::TooFarBehind)),
            d(serde_json::json!({"resumed":false,"reason":"too_far_behind"}))
        );
    }
}
