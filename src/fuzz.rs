//! Fuzz targets: every parser that reads bytes from outside the process,
//! run the way the gateway runs it, with the invariants it must keep
//! checked by assertions (a panic is a finding).
//!
//! Two drivers share these bodies. `fuzz/` runs them under libFuzzer
//! (coverage-guided, `scripts/fuzz.sh`, minutes per target); the test
//! suite's `tests/fuzz.rs` replays the committed corpora in `fuzz/corpus/`
//! and a few seconds of mutations on stable Rust, so every target keeps
//! building and running in CI.

use std::io::{Read, Write};
use std::path::Path;

use arbitrary::Unstructured;
use serde_json::Value;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

use crate::config::Config;
use crate::dispatch::frame::{self, Inbound, Outcome};
use crate::failure::{ErrorCode, Failure};
use crate::ids::UserId;
use crate::listen::ReadCheck;
use crate::plugin::{Audience, bindings, routes};
use crate::session::conn::{claims_in_head, credentials, origin_allowed};
use crate::session::control_only::ControlOnly;
use crate::session::resume;
use crate::token::TokenKey;

/// One fuzz target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A dispatch socket's text frame (DESIGN §3) and the reply built from it.
    DispatchFrame,
    /// A client token: verification never accepts a token it didn't issue.
    Token,
    /// A client's upgrade request: tungstenite's parse, then origin,
    /// credentials, the resume query and the revocation read-ahead.
    Handshake,
    /// Frames a client sends after its upgrade: the data-frame refusal.
    InboundFrames,
    /// `gateway.toml` text.
    Config,
    /// What a plugin returns, as the host validates it.
    PluginOutput,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::DispatchFrame,
        Target::Token,
        Target::Handshake,
        Target::InboundFrames,
        Target::Config,
        Target::PluginOutput,
    ];

    /// The target's name: its `fuzz/` binary and its corpus directory.
    pub fn name(self) -> &'static str {
        match self {
            Target::DispatchFrame => "dispatch_frame",
            Target::Token => "token",
            Target::Handshake => "handshake",
            Target::InboundFrames => "inbound_frames",
            Target::Config => "config",
            Target::PluginOutput => "plugin_output",
        }
    }

    /// Runs one input; panics when an invariant breaks.
    pub fn run(self, data: &[u8]) {
        match self {
            Target::DispatchFrame => dispatch_frame(data),
            Target::Token => token(data),
            Target::Handshake => handshake(data),
            Target::InboundFrames => inbound_frames(data),
            Target::Config => config(data),
            Target::PluginOutput => plugin_output(data),
        }
    }
}

/// The secret the token and handshake targets sign with; the corpora's
/// tokens are signed with it.
pub const SECRET: &[u8] = b"otako-fuzz-secret";
/// "Now" for token checks, so corpora stay valid: 2026-01-01.
const NOW: u64 = 1_767_225_600;

fn json(text: &str) -> Value {
    match serde_json::from_str(text) {
        Ok(v) => v,
        Err(err) => panic!("the gateway wrote invalid JSON ({err}): {text}"),
    }
}

/// JSON text by RFC 8259's grammar, as `RawValue` checks it: what the
/// gateway passes through untouched may hold escapes of lone surrogates
/// or numbers no `f64` holds, which the grammar allows.
fn grammatical(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

fn dispatch_frame(data: &[u8]) {
    // Tungstenite hands the parser only valid UTF-8 text frames.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match frame::parse(text) {
        Err(reason) => {
            assert!(!reason.is_empty());
            let reply = json(&frame::invalid_frame(&reason));
            assert_eq!(reply["d"]["error"], Value::String(reason));
        }
        Ok(Inbound::Ping { ts }) => {
            let reply = frame::pong(&ts, 1, 2);
            assert!(grammatical(&reply), "a PONG that is not JSON: {reply}");
            assert!(
                reply.contains(&format!(r#""ts":{}"#, ts.get())),
                "ts not echoed: {reply}"
            );
        }
        Ok(Inbound::Event(event)) => {
            assert!(!event.key.is_empty(), "an event id with no key");
            assert_eq!(event.key, event.event_id.key());
            let echoed = serde_json::to_value(&event.event_id).unwrap_or(Value::Null);
            let failed = Outcome::Failed(Failure::new(ErrorCode::BadEvent, "fuzz"));
            for outcome in [Outcome::Success { duplicate: false }, failed] {
                let ack = json(&frame::roundtrip(
                    &event.event_id,
                    event.s.as_ref(),
                    &outcome,
                ));
                assert_eq!(ack["event_id"], echoed, "the ack must echo the event id");
            }
            if let Ok(body) = &event.body {
                let d = body.d.get();
                assert!(
                    grammatical(d) && d.starts_with('{'),
                    "d is not an object: {d}"
                );
            }
        }
    }
}

fn token(data: &[u8]) {
    let key = TokenKey::new(SECRET, None);
    let expiring = TokenKey::new(SECRET, Some(3600));
    // Whatever the text, a token that verifies is exactly one we issue:
    // no second spelling of a signed token (padding, trailing bits, a
    // user id with leading zeros) gets through.
    if let Ok(text) = std::str::from_utf8(data) {
        for key in [&key, &expiring] {
            if let Ok(claims) = key.verify_claims(text, NOW) {
                assert_eq!(text, key.issue(claims.user, claims.issued_at));
            }
        }
    }
    // Issued tokens verify to what they say, and one changed byte breaks them.
    let mut u = Unstructured::new(data);
    let (Ok(user), Ok(issued_at), Ok(at), Ok(byte)) = (
        u.arbitrary::<u64>(),
        u.arbitrary::<u64>(),
        u.arbitrary::<usize>(),
        u.arbitrary::<u8>(),
    ) else {
        return;
    };
    let Some(user) = UserId::new(user) else {
        return;
    };
    let issued = key.issue(user, issued_at);
    let claims = key.verify_claims(&issued, NOW);
    assert_eq!(claims.map(|c| (c.user, c.issued_at)), Ok((user, issued_at)));
    let mut forged = issued.clone().into_bytes();
    let at = at % forged.len();
    forged[at] = byte;
    if let Ok(forged) = String::from_utf8(forged)
        && forged != issued
    {
        assert!(
            key.verify_claims(&forged, NOW).is_err(),
            "a changed token verified: {forged}"
        );
    }
}

/// An in-memory socket: reads `input` (passing every read through the
/// client socket's [`ControlOnly`] check, as the listener does), then EOF;
/// writes are kept.
struct Replay<'a> {
    input: &'a [u8],
    check: ControlOnly,
    written: Vec<u8>,
}

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.input.len());
        let (now, rest) = self.input.split_at(n);
        self.check.check(now)?;
        buf[..n].copy_from_slice(now);
        self.input = rest;
        Ok(n)
    }
}

impl Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn handshake(data: &[u8]) {
    let key = TokenKey::new(SECRET, None);
    let listed = ["https://chat.example".to_owned(), "*".to_owned()];
    let read_ahead = claims_in_head(&key, data);
    let mut admitted = None;
    // tungstenite fixes the callback's error type (an HTTP response).
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        // "*" lets in any single readable Origin, or none.
        let origins: Vec<_> = req.headers().get_all("origin").iter().collect();
        let any = matches!(origins[..], [] | [_]) && origins.iter().all(|o| o.to_str().is_ok());
        assert_eq!(origin_allowed(Some(&listed), req), any);
        let _ = origin_allowed(Some(&listed[..1]), req);
        let _ = origin_allowed(None, req);
        if let Ok((token, _)) = credentials(req) {
            assert!(!token.is_empty());
            admitted = key.verify_claims(token, NOW).ok();
        }
        let _ = resume::Request::from_query(req.uri().query());
        Ok(resp)
    };
    let socket = Replay {
        input: data,
        check: ControlOnly::new(),
        written: Vec::new(),
    };
    let upgraded = tungstenite::accept_hdr(socket, callback).is_ok();
    // Both reads of one head agree: a client tungstenite admits is never
    // refused because the revocation read-ahead saw another token.
    if upgraded && let Some(claims) = admitted {
        assert_eq!(read_ahead.map(|c| c.user), Some(claims.user));
    }
}

/// A client's upgrade request, in front of the frames under test.
const UPGRADE_HEAD: &[u8] = b"GET /gateway HTTP/1.1\r\nHost: x\r\n\r\n";

fn inbound_frames(data: &[u8]) {
    let Some((&split, frames)) = data.split_first() else {
        return;
    };
    let stream = [UPGRADE_HEAD, frames].concat();
    let whole = ControlOnly::new().check(&stream).is_ok();
    // The same bytes cut into reads of any size give the same answer.
    let size = usize::from(split % 16) + 1;
    let mut check = ControlOnly::new();
    let chunked = stream.chunks(size).all(|chunk| check.check(chunk).is_ok());
    assert_eq!(whole, chunked, "the answer depends on how reads are cut");
    assert_eq!(
        whole,
        !has_data_frame(frames),
        "the data-frame check disagrees with RFC 6455 framing"
    );
}

/// Whether `frames` holds the first two bytes of a data frame's header
/// (opcodes 0x0-0x7), walking whole frames by RFC 6455 §5.2: the oracle
/// the inbound check is compared with.
fn has_data_frame(frames: &[u8]) -> bool {
    let mut rest = frames;
    while let [first, second, tail @ ..] = rest {
        if first & 0x08 == 0 {
            return true;
        }
        let (extended, tail) = match second & 0x7f {
            126 if tail.len() >= 2 => tail.split_at(2),
            127 if tail.len() >= 8 => tail.split_at(8),
            126 | 127 => return false,
            _ => (&[][..], tail),
        };
        let len = match extended {
            [] => u64::from(second & 0x7f),
            bytes => bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b)),
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        let Some(after) = tail.get(mask..) else {
            return false;
        };
        match usize::try_from(len).ok().and_then(|len| after.get(len..)) {
            Some(next) => rest = next,
            None => return false,
        }
    }
    false
}

fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that doesn't exist: relative paths in the text resolve
    // under it and read nothing.
    let path = Path::new("/nonexistent-otako-fuzz/gateway.toml");
    if let Err(err) = Config::parse(text, path) {
        assert!(!err.to_string().is_empty(), "a config error with no text");
    }
}

fn plugin_output(data: &[u8]) {
    const NAMES: [&str; 3] = ["MESSAGE_CREATE", "TYPING_START", "X"];
    let mut u = Unstructured::new(data);
    let mut deliveries = Vec::new();
    while !u.is_empty() && deliveries.len() < 8 {
        let Ok(delivery) = (|| -> arbitrary::Result<bindings::Delivery> {
            let event = match u.int_in_range(0u8..=3)? {
                3 => u.arbitrary::<String>()?,
                i => NAMES[usize::from(i)].to_owned(),
            };
            let audience = match u.int_in_range(0u8..=2)? {
                0 => bindings::Audience::Everyone,
                1 => bindings::Audience::Channel(u.arbitrary()?),
                _ => bindings::Audience::Users(u.arbitrary()?),
            };
            Ok(bindings::Delivery {
                event,
                payload: u.arbitrary()?,
                audience,
            })
        })() else {
            break;
        };
        deliveries.push(delivery);
    }
    let count = deliveries.len();
    match routes::convert(deliveries) {
        Ok(out) => {
            assert_eq!(out.len(), count);
            for d in out {
                assert!(!d.event.is_empty() && d.event.len() <= 64);
                assert!(grammatical(&d.payload), "not JSON: {}", d.payload);
                if let Audience::Users(users) = &d.audience {
                    let distinct: std::collections::HashSet<_> = users.iter().collect();
                    assert_eq!(distinct.len(), users.len(), "a user named twice");
                }
            }
        }
        // The reason goes into the backend's ack: short.
        Err(reason) => assert!(!reason.is_empty() && reason.len() < 512, "{reason}"),
    }
}
