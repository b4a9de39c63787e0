//! Snowflake-style ids (DESIGN §8): positive integers that fit an SQL
//! `BIGINT`, carried as decimal strings in JSON.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why text is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an id (a positive decimal integer below 2^63)")]
pub struct BadId(pub String);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            /// `None` unless `1 <= v <= i64::MAX` (ids live in `BIGINT`s).
            pub fn new(v: u64) -> Option<Self> {
                (v > 0 && v <= i64::MAX as u64).then_some($name(v))
            }

            pub fn get(self) -> u64 {
                self.0
            }

            /// The id as the database stores it.
            pub fn as_i64(self) -> i64 {
                // `new` guarantees the value fits.
                self.0 as i64
            }

            /// An id read back from the database.
            pub fn from_i64(v: i64) -> Option<Self> {
                u64::try_from(v).ok().and_then(Self::new)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = BadId;
            fn from_str(s: &str) -> Result<Self, BadId> {
                if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(BadId(s.to_owned()));
                }
                s.parse::<u64>()
                    .ok()
                    .and_then(Self::new)
                    .ok_or_else(|| BadId(s.to_owned()))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            /// Accepts a decimal string or a JSON integer.
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(serde::Deserialize)]
                #[serde(untagged)]
                enum Repr<'a> {
                    Int(u64),
                    #[serde(borrow)]
                    Str(std::borrow::Cow<'a, str>),
                }
                match Repr::deserialize(d)? {
                    Repr::Int(v) => {
                        Self::new(v).ok_or_else(|| serde::de::Error::custom(BadId(v.to_string())))
                    }
                    Repr::Str(s) => s.parse().map_err(serde::de::Error::custom),
                }
            }
        }
    };
}

id_type!(
    /// A user's id.
    UserId
);
id_type!(
    /// A channel's id.
    ChannelId
);
id_type!(
    /// A message's id.
    MessageId
);
id_type!(
    /// Any other snowflake (sessions, outbox rows).
    Snowflake
);

/// Hashes id keys with splitmix64's finalizer: a few cycles where the
/// default SipHash costs tens of nanoseconds, on lookups fan-out does per
/// recipient. Ids are minted by the backend, never chosen by a client, so
/// flooding one bucket isn't an attack a client can mount; the mixing
/// still spreads snowflakes, whose low bits repeat from one millisecond
/// to the next, over every bucket.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let mut z = (self.0 ^ n).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }
}

/// `HashMap`/`HashSet`/`DashMap` hasher for id keys; see [`IdHasher`].
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// 2026-01-01T00:00:00Z in unix milliseconds: ids stay small for decades.
const EPOCH_MS: u64 = 1_767_225_600_000;

/// The 10 node bits of every id a process mints (`cluster.node_id`):
/// processes minting ids into one database need different ones, or two of
/// them can mint the same id in the same millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct NodeId(u16);

impl NodeId {
    /// Largest node id: ten bits.
    pub const MAX: u16 = 0x3ff;

    /// `None` above [`NodeId::MAX`].
    pub fn new(v: u16) -> Option<Self> {
        (v <= Self::MAX).then_some(NodeId(v))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    /// Refuses values above [`NodeId::MAX`] (cluster leases carry node ids).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u16::deserialize(d)?;
        NodeId::new(v).ok_or_else(|| serde::de::Error::custom(format!("node id {v} is above 1023")))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Mints unique, time-ordered ids: 41 bits of milliseconds, 10 bits of
/// node, 12 bits of sequence. Lock-free; monotonic within one process even
/// if the clock steps back.
#[derive(Debug)]
pub struct IdGen {
    node: u64,
    last: AtomicU64,
}

impl IdGen {
    /// `node` is masked to its low ten bits; pass `NodeId::get()`.
    pub fn new(node: u16) -> Self {
        IdGen {
            node: u64::from(node & NodeId::MAX),
            last: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> Snowflake {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(EPOCH_MS)
            .saturating_sub(EPOCH_MS);
        let fresh = (now << 22) | (self.node << 12);
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            // Same millisecond (or a clock step back): count up from the last id.
            let candidate = if fresh > prev { fresh } else { prev + 1 };
            match self.last.compare_exchange_weak(
                prev,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Snowflake(candidate.max(1)),
                Err(actual) => prev = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strings_and_integers() {
        assert_eq!("42".parse::<UserId>().unwrap().get(), 42);
        assert!("0".parse::<UserId>().is_err());
        assert!("-1".parse::<UserId>().is_err());
        assert!("+1".parse::<UserId>().is_err());
        assert!("9223372036854775808".parse::<UserId>().is_err());
        assert!("abc".parse::<UserId>().is_err());
        let id: ChannelId = serde_json::from_str("7").unwrap();
        assert_eq!(id.get(), 7);
        let id: ChannelId = serde_json::from_str("\"7\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"7\"");
        assert!(serde_json::from_str::<ChannelId>("true").is_err());
    }

    #[test]
    fn ids_are_unique_and_increasing() {
        let generator = IdGen::new(1);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = generator.next().get();
            assert!(id > last);
            last = id;
        }
    }

    #[test]
    fn node_bits_sit_between_time_and_sequence() {
        assert!(NodeId::new(1024).is_none());
        let node = NodeId::new(NodeId::MAX).unwrap();
        let id = IdGen::new(node.get()).next().get();
        assert_eq!((id >> 12) & 0x3ff, u64::from(NodeId::MAX));
    }
}
