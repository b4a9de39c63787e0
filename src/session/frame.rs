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

    /// The frame's text as one session sees it, with sequence number `seq`
    /// (what [`encode_ws`](Self::encode_ws) puts after the header).
    #[cfg(test)]
    pub fn encode(&self, seq: u64) -> String {
        let mut out = Vec::with_capacity(self.text.len() + 20);
        self.push_text(seq, &mut out);
        // Both halves come from a `String` and the digits are ASCII.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the frame as one session sees it, with sequence number
    /// `seq`, to `out` as a whole WebSocket text frame (unmasked: server
    /// to client). Sessions write these straight to their socket: one
    /// copy of the text per delivery, where a tungstenite message cost an
    /// allocation, a copy into its write buffer and a frame header built
    /// through its codec.
    pub fn encode_ws(&self, seq: u64, out: &mut Vec<u8>) {
        let len = self.text.len() + decimal_len(seq);
        out.push(0x81); // FIN, text
        if len < 126 {
            out.push(len as u8);
        } else if let Ok(short) = u16::try_from(len) {
            out.push(126);
            out.extend_from_slice(&short.to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.push_text(seq, out);
    }

    fn push_text(&self, seq: u64, out: &mut Vec<u8>) {
        let (head, tail) = self.text.split_at(self.split);
        out.extend_from_slice(head.as_bytes());
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut left = seq;
        loop {
            at -= 1;
            digits[at] = b'0' + (left % 10) as u8;
            left /= 10;
            if left == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[at..]);
        out.extend_from_slice(tail.as_bytes());
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

/// Digits in `n` written in decimal.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
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
            assert_eq!(text.len(), frame.len() + decimal_len(seq), "s = {seq}");
            assert!(text.contains(&format!(r#""s":{seq},"#)), "s = {seq}");
        }
    }

    /// Parses `bytes` as one unmasked server frame: (FIN and opcode byte, payload).
    fn parse_ws(bytes: &[u8]) -> (u8, &[u8]) {
        let (len, at) = match bytes[1] {
            126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 => (
                usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            n => (usize::from(n), 2),
        };
        assert_eq!(bytes.len(), at + len, "one whole frame, nothing after it");
        (bytes[0], &bytes[at..])
    }

    #[test]
    fn websocket_frames_carry_the_text_with_each_length_form() {
        // Payloads around the 125 / 65,535 byte limits of the short forms.
        for size in [0, 90, 100, 200, 65_400, 65_600, 200_000] {
            let frame = ClientFrame::new("E", &format!(r#"{{"x":"{}"}}"#, "a".repeat(size)));
            for seq in [1, 12_345] {
                let mut out = vec![7];
                frame.encode_ws(seq, &mut out);
                assert_eq!(out[0], 7, "appends");
                let (first, payload) = parse_ws(&out[1..]);
                assert_eq!(first, 0x81);
                assert_eq!(
                    payload,
                    frame.encode(seq).as_bytes(),
                    "size {size}, s = {seq}"
                );
            }
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
