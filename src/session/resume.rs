//! Resume (DESIGN §2 "Resume"): the resumable session id, the handshake's
//! `resume=`/`seq=` query, and what HELLO says about the outcome.

use std::fmt;

use super::ledger::SlotTag;

/// A session id: 128 random bits, written as 32 lowercase hex digits.
/// It is a credential (naming it at a handshake resumes the session), so
/// its `Debug` is redacted and it is never logged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId(u128);

impl SessionId {
    /// A fresh id from the thread's CSPRNG.
    pub(crate) fn random() -> SessionId {
        SessionId(rand::random())
    }

    /// The session's name in cluster-wide slot lists: a one-way hash, as
    /// the id itself is a credential.
    pub(crate) fn tag(&self) -> SlotTag {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0.to_le_bytes());
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest[..8]);
        SlotTag(u64::from_le_bytes(word))
    }

    /// Exactly 32 lowercase hex digits, the form [`Display`](fmt::Display)
    /// writes; anything else is not an id.
    fn parse(text: &str) -> Option<SessionId> {
        let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        if text.len() != 32 || !text.as_bytes().iter().all(hex) {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(SessionId)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

/// What a handshake's query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// No `resume=`: a plain connect.
    Fresh,
    /// `resume=` with an id and `seq=` that can't name a session's state
    /// (wrong shape or length, `seq` missing, not a decimal `u64`, or a
    /// parameter given twice): a new session, `unknown_session`.
    Malformed,
    Resume {
        id: SessionId,
        seq: u64,
    },
}

impl Request {
    /// Reads `resume=` and `seq=` from a query string; other parameters
    /// (the token) are someone else's.
    pub(crate) fn from_query(query: Option<&str>) -> Request {
        let (mut resume, mut seq) = (Vec::new(), Vec::new());
        for pair in query.unwrap_or("").split('&') {
            if let Some(v) = pair.strip_prefix("resume=") {
                resume.push(v);
            } else if let Some(v) = pair.strip_prefix("seq=") {
                seq.push(v);
            }
        }
        match (resume.as_slice(), seq.as_slice()) {
            ([], _) => Request::Fresh,
            ([id], [seq]) => match (SessionId::parse(id), parse_seq(seq)) {
                (Some(id), Some(seq)) => Request::Resume { id, seq },
                _ => Request::Malformed,
            },
            _ => Request::Malformed,
        }
    }
}

/// A decimal `u64` of plain digits: no sign, no spaces, at most 20 digits.
fn parse_seq(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Why a resume got a new session instead (HELLO's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No such session for this user on this node, expired, ended for
    /// good, a malformed request, a `seq` beyond the last frame sent, or
    /// another resume of it won moments ago.
    UnknownSession,
    /// Frames after `seq` were dropped from the resume buffer.
    TooFarBehind,
}

impl Refused {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::UnknownSession => "unknown_session",
            Refused::TooFarBehind => "too_far_behind",
        }
    }
}

/// What HELLO says about how the session began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// A plain connect: `"resumed":false`, no reason.
    Fresh,
    /// `"resumed":true,"replayed":N`.
    Resumed { replayed: u64 },
    /// A resume that got a new session: `"resumed":false,"reason":…`.
    Refused(Refused),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SessionId {
        SessionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677)
    }

    #[test]
    fn ids_round_trip_and_are_redacted_in_debug() {
        let text = id().to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(SessionId::parse(&text), Some(id()));
        assert_eq!(format!("{:?}", id()), "SessionId(<redacted>)");
        assert_ne!(SessionId::random(), SessionId::random());
    }

    #[test]
    fn queries() {
        let good = format!("token=x&resume={}&seq=7", id());
        assert_eq!(
            Request::from_query(Some(&good)),
            Request::Resume { id: id(), seq: 7 }
        );
        assert_eq!(Request::from_query(None), Request::Fresh);
        assert_eq!(Request::from_query(Some("token=x&seq=3")), Request::Fresh);
        let id = id().to_string();
        for bad in [
            format!("resume={id}"),
            format!("resume={id}&seq="),
            format!("resume={id}&seq=-1"),
            format!("resume={id}&seq=+1"),
            format!("resume={id}&seq=1.0"),
            format!("resume={id}&seq=abc"),
            format!("resume={id}&seq=18446744073709551616"),
            format!("resume={id}&seq={}", "9".repeat(5000)),
            format!("resume={id}&seq=1&seq=2"),
            format!("resume={id}&resume={id}&seq=1"),
            format!("resume={}&seq=1", id.to_uppercase()),
            format!("resume={}&seq=1", &id[1..]),
            format!("resume={id}0&seq=1"),
            "resume=&seq=1".to_owned(),
            "resume=zz&seq=1".to_owned(),
        ] {
            assert_eq!(Request::from_query(Some(&bad)), Request::Malformed, "{bad}");
        }
        assert_eq!(
            Request::from_query(Some(&format!("resume={id}&seq=18446744073709551615"))),
            Request::Resume {
                id: SessionId::parse(&id).unwrap(),
                seq: u64::MAX
            }
        );
    }
}
