//! The fan-out bus (DESIGN §9): the node that takes a dispatch event runs
//! the plugin once and publishes each delivery (the frame, serialized
//! once, and its audience) to the JetStream stream `<prefix>_fanout`;
//! every node, this one included, consumes the stream and hands each
//! delivery to its own sessions.
//!
//! - Publishing happens inside the channel's turn (the publish is queued
//!   on the one NATS connection, so stream order is dispatch order) and
//!   the stream's ack is awaited after the turn is released, so events
//!   pipeline instead of paying a round trip each. The event is acked
//!   `success:true` only once the stream acked every delivery.
//! - Each delivery carries `Nats-Msg-Id` (event id hash and index): a retry
//!   of an event whose publish landed but whose ack was lost publishes
//!   nothing twice within the stream's duplicate window.
//! - The publishing node delivers to its own sessions through the stream
//!   too, not directly: one path means one order for every node and no
//!   way to deliver twice. The cost is one stream round trip of latency on
//!   the local node as on the others.
//! - A channel audience travels as the channel id and the membership
//!   version it was resolved at; each node answers it from its member
//!   cache (a database read only when its cache is older).
//! - The consumer tracks the next stream sequence it needs. After a
//!   reconnect, a consumer error or a sequence gap it starts a consumer
//!   again from that sequence (catching up from the stream); if those
//!   frames are gone from the stream, it closes every local session with
//!   4000, since nobody can tell whose frames were lost, so clients refetch
//!   instead of silently missing events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::datetime::DateTime;
use async_nats::jetstream::consumer::{DeliverPolicy, push};
use async_nats::jetstream::{self, stream};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::ClusterError;
use crate::dispatch::members::Members;
use crate::dispatch::pipeline::{Confirm, Deliveries, Fanout, Recipients};
use crate::failure::{ErrorCode, Failure, Trace};
use crate::ids::{ChannelId, UserId};
use crate::session::{ClientFrame, Sessions};
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// Limits of the stream when this node creates it. A stream that exists
/// is used as found, so an operator can size it (`nats stream edit`): its
/// limits bound how long a cut-off node can catch up.
const MAX_AGE: Duration = Duration::from_secs(3600);
const MAX_BYTES: i64 = 1 << 30;
/// Retries of an event within this window are not stored twice.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a publish waits for the stream's ack: under the backend's
/// attempt timeout (2 s by default), so the event fails with
/// `BUS_UNAVAILABLE` rather than the attempt timing out.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(1500);
/// Publishes awaiting their ack, across dispatch connections.
const MAX_ACK_INFLIGHT: usize = 16_384;
/// How often the consumer checks that the stream is still the one it
/// reads: the ordered consumer alone would notice a deleted stream only
/// after missing its idle heartbeats for 10 s.
const STREAM_CHECK: Duration = Duration::from_secs(1);
/// How often the consumer checks whether the connection was re-made.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);
/// Waits between attempts to start a consumer while NATS is away.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Attempts to read a channel's members for a delivery from the bus.
const MEMBER_ATTEMPTS: u32 = 4;
/// The close code for sessions whose frames are gone: "unknown error",
/// their clients refetch (DESIGN §9).
const FRAMES_GONE: u16 = 4000;

/// Publishes deliveries to the stream and feeds local sessions from it.
/// Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The stream as this node makes it when it is missing (also after a
    /// NATS server lost its JetStream store, so the node recovers by itself).
    config: stream::Config,
    subject: async_nats::Subject,
    /// The stream's last sequence when this node joined: it consumes after it.
    start: u64,
    /// When the stream was made, as of joining: a stream made again since
    /// (deleted, or NATS lost its store) lost what this node had not read.
    created: DateTime,
    /// Set while publishing fails, so the outage is logged once.
    down: AtomicBool,
    metrics: Arc<Metrics>,
}

/// A consumer just started: its messages, the connection count it was
/// started under, and the creation time of the stream it reads.
struct Opened {
    messages: push::Ordered,
    connects: u64,
    created: DateTime,
}

impl Bus {
    /// Opens (creating if absent) the stream `<prefix>_fanout`.
    pub(super) async fn open(
        client: async_nats::Client,
        prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Bus, ClusterError> {
        let js = jetstream::context::ContextBuilder::new()
            .timeout(PUBLISH_TIMEOUT)
            .max_ack_inflight(MAX_ACK_INFLIGHT)
            .build(client.clone());
        let name = format!("{prefix}_fanout");
        let subject = format!("{prefix}.fanout");
        let failed = |reason: String| ClusterError::Stream {
            stream: name.clone(),
            reason,
        };
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            max_age: MAX_AGE,
            max_bytes: MAX_BYTES,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: 1,
            ..Default::default()
        };
        let stream = js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let info = stream.cached_info();
        if !info.config.subjects.contains(&subject) {
            return Err(failed(format!(
                "the stream exists but does not take subject '{subject}'"
            )));
        }
        let (start, created) = (info.state.last_sequence, info.created);
        Ok(Bus {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                subject: subject.into(),
                start,
                created,
                down: AtomicBool::new(false),
                metrics,
            }),
        })
    }

    /// Hands every delivery in the stream to this node's sessions, in
    /// stream order, until shutdown.
    pub async fn consume(self, sessions: Sessions, members: Arc<Members>, shutdown: Shutdown) {
        let mut next = self.inner.start + 1;
        let mut created = self.inner.created;
        let mut wait = RETRY_MIN;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                opened = self.open_consumer(&mut next, &mut created, &sessions) => opened,
            };
            match opened {
                Ok(opened) => {
                    wait = RETRY_MIN;
                    let why = self
                        .drain(opened, &mut next, &sessions, &members, &shutdown)
                        .await;
                    let Some(why) = why else { return };
                    // Local deliveries pause until the new consumer has
                    // caught up: worth an operator's attention.
                    self.inner.metrics.cluster_bus_consumer_restarts.inc();
                    tracing::warn!(next, why = %why, "cluster bus: starting the consumer again");
                }
                Err(err) => {
                    tracing::debug!(error = %err, next, "cluster bus: cannot start the consumer; retrying");
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Starts a consumer at `next`; first, if frames from `next` on are
    /// gone from the stream (or the stream was made again since `created`),
    /// closes the local sessions (4000) and moves `next` to the first frame
    /// there is.
    async fn open_consumer(
        &self,
        next: &mut u64,
        created: &mut DateTime,
        sessions: &Sessions,
    ) -> Result<Opened, String> {
        let connects = self
            .inner
            .client
            .statistics()
            .connects
            .load(Ordering::Relaxed);
        let stream = self
            .inner
            .js
            .get_or_create_stream(self.inner.config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.cached_info();
        let state = &info.state;
        // A stream made again (deleted, or NATS lost its store): what the
        // old one held after `next` is unknown.
        let reset = info.created != *created || state.last_sequence + 1 < *next;
        *created = info.created;
        if reset || state.first_sequence > *next {
            let first = state.first_sequence.max(1);
            let closed = sessions.close_all(FRAMES_GONE);
            self.inner.metrics.cluster_bus_gaps.inc();
            tracing::warn!(
                missed_from = *next,
                resumed_at = first,
                sessions = closed,
                "cluster bus: frames this node missed are gone from the stream; \
                 closed its sessions with 4000 so their clients refetch"
            );
            *next = first;
        }
        // An ordered push consumer, not a pull one: the server pushes each
        // message as it is stored (flow-controlled), with no pull requests
        // to account for. With async-nats's pull stream, one node's
        // deliveries stopped for 2 s in 3 of 21 benchmark runs ("missed idle
        // heartbeat"): most likely its count of what expired requests still
        // owed went wrong, so it sent no new request and starved.
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.inner.client.new_inbox(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: *next,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok(Opened {
            messages,
            connects,
            created: *created,
        })
    }

    /// Delivers messages in sequence until shutdown (`None`) or until the
    /// consumer must start again (why).
    async fn drain(
        &self,
        opened: Opened,
        next: &mut u64,
        sessions: &Sessions,
        members: &Members,
        shutdown: &Shutdown,
    ) -> Option<String> {
        let Opened {
            mut messages,
            connects,
            created,
        } = opened;
        let mut check = tokio::time::interval(RECONNECT_CHECK);
        let replaced = stream_replaced(
            self.inner.js.clone(),
            self.inner.config.name.clone(),
            created,
        );
        tokio::pin!(replaced);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return None,
                () = &mut replaced => return Some("the stream was deleted or made again".to_owned()),
                _ = check.tick() => {
                    // Frames pushed while the connection was down are lost
                    // in transit; only a fresh consumer gets them again.
                    let now = self.inner.client.statistics().connects.load(Ordering::Relaxed);
                    if now != connects {
                        return Some("reconnected to NATS".to_owned());
                    }
                    continue;
                }
                message = messages.next() => message,
            };
            let message = match message {
                None => return Some("the consumer ended".to_owned()),
                Some(Err(err)) => return Some(format!("consumer error: {err}")),
                Some(Ok(message)) => message,
            };
            let Ok(info) = message.info() else {
                return Some("a message without stream info".to_owned());
            };
            let seq = info.stream_sequence;
            if seq < *next {
                continue;
            }
            if seq > *next {
                return Some(format!(
                    "a gap in stream sequences: {seq} after {}",
                    *next - 1
                ));
            }
            *next = seq + 1;
            self.observe_read(&info);
            let delivered = tokio::select! {
                _ = shutdown.cancelled() => return None,
                delivered = deliver(&message.payload, sessions, members) => delivered,
            };
            if let Err(why) = delivered {
                let closed = sessions.close_all(FRAMES_GONE);
                self.inner.metrics.cluster_bus_gaps.inc();
                tracing::error!(seq, error = %why, sessions = closed, "cluster bus: a delivery could not be handed to local sessions; closed them with 4000 so their clients refetch");
            }
        }
    }

    /// Records a failed publish (logging the outage once) as the event's failure.
    fn unavailable(&self, err: &dyn std::fmt::Display) -> Failure {
        self.inner.metrics.cluster_bus_publish_failures.inc();
        if !self.inner.down.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %err, "cluster bus: cannot publish to NATS JetStream; events fail with BUS_UNAVAILABLE until it is back");
        }
        let what = "cannot publish the deliveries to the cluster bus (NATS); retry";
        Failure::new(ErrorCode::BusUnavailable, what).with_trace(Trace {
            chain: vec![what.to_owned(), err.to_string()],
            ..Trace::default()
        })
    }

    /// A publish refused before it was sent: a delivery over the NATS
    /// server's `max_payload` is the plugin's output, not an outage.
    fn publish_failed(&self, err: jetstream::context::PublishError) -> Failure {
        if err.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
            return Failure::new(
                ErrorCode::PluginOutput,
                "a delivery is larger than the NATS server's max_payload",
            )
            .with_trace(Trace {
                chain: vec![err.to_string()],
                ..Trace::default()
            });
        }
        self.unavailable(&err)
    }

    /// Consumer lag and delivery delay, from what the stream says of a message.
    fn observe_read(&self, info: &jetstream::message::Info<'_>) {
        let metrics = &self.inner.metrics;
        metrics
            .cluster_bus_consumer_lag
            .set(i64::try_from(info.pending).unwrap_or(i64::MAX));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let delay = now - info.published.unix_timestamp_nanos();
        metrics
            .cluster_bus_delivery_delay
            .observe(delay.max(0) as f64 / 1e9);
    }

    fn published(&self) {
        if self.inner.down.swap(false, Ordering::Relaxed) {
            tracing::info!("cluster bus: publishing to NATS JetStream again");
        }
    }
}

impl Fanout for Bus {
    fn fan_out<'a>(
        &'a self,
        key: &'a str,
        deliveries: &'a Deliveries,
    ) -> BoxFuture<'a, Result<Confirm, Failure>> {
        Box::pin(async move {
            // Queued while disconnected, a publish would go out whenever the
            // connection is back, long after this event failed.
            if self.inner.client.connection_state() != State::Connected {
                return Err(self.unavailable(&"not connected to NATS"));
            }
            let id = message_id(key);
            let started = Instant::now();
            let mut acks = Vec::with_capacity(deliveries.len());
            for (i, (frame, to)) in deliveries.iter().enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{id}.{i}"));
                let ack = self
                    .inner
                    .js
                    .publish_with_headers(self.inner.subject.clone(), headers, encode(frame, to))
                    .await
                    .map_err(|e| self.publish_failed(e))?;
                acks.push(ack);
            }
            let bus = self.clone();
            let confirm: Confirm = Box::pin(async move {
                let published = acks.len();
                for ack in acks {
                    ack.await.map_err(|e| bus.unavailable(&e))?;
                }
                bus.inner
                    .metrics
                    .cluster_bus_publish_latency
                    .observe(started.elapsed().as_secs_f64());
                bus.published();
                Ok(published)
            });
            Ok(confirm)
        })
    }
}

/// `Nats-Msg-Id` stem of an event: its key hashed (keys are arbitrary
/// text; header values are not).
fn message_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A delivery on the bus, binary: format, audience, then the frame.
///
/// `[FORMAT] [tag]` then by tag: everyone: nothing; users: count (u32)
/// and ids (u64 each); channel: id (u64) and membership version (i64);
/// then the frame's split point (u32) and its text. Little-endian.
const FORMAT: u8 = 1;
const EVERYONE: u8 = 0;
const USERS: u8 = 1;
const CHANNEL: u8 = 2;

fn encode(frame: &ClientFrame, to: &Recipients) -> Bytes {
    let (text, split) = frame.parts();
    let users = match to {
        Recipients::Users(users) => users.len(),
        _ => 0,
    };
    let mut out = BytesMut::with_capacity(2 + 4 + users * 8 + 16 + 4 + text.len());
    out.put_u8(FORMAT);
    match to {
        Recipients::Everyone => out.put_u8(EVERYONE),
        Recipients::Users(users) => {
            out.put_u8(USERS);
            out.put_u32_le(u32::try_from(users.len()).unwrap_or(u32::MAX));
            for user in users {
                out.put_u64_le(user.get());
            }
        }
        Recipients::Members {
            channel, version, ..
        } => {
            out.put_u8(CHANNEL);
            out.put_u64_le(channel.get());
            out.put_i64_le(*version);
        }
    }
    out.put_u32_le(u32::try_from(split).unwrap_or(u32::MAX));
    out.put_slice(text.as_bytes());
    out.freeze()
}

/// A delivery's audience as read off the bus.
#[derive(Debug, PartialEq)]
enum Audience {
    Everyone,
    Users(Vec<UserId>),
    Channel { channel: ChannelId, version: i64 },
}

/// Reads a delivery; `Err` says what is wrong with it.
fn decode(payload: &[u8]) -> Result<(ClientFrame, Audience), &'static str> {
    let mut r = Reader(payload);
    if r.u8()? != FORMAT {
        return Err("unknown format (a node of another version?)");
    }
    let audience = match r.u8()? {
        EVERYONE => Audience::Everyone,
        USERS => {
            let n = usize::try_from(r.u32()?).map_err(|_| "too many users")?;
            if n > r.0.len() / 8 {
                return Err("truncated user list");
            }
            let users = (0..n)
                .map(|_| r.u64().and_then(|u| UserId::new(u).ok_or("a user id of 0")))
                .collect::<Result<_, _>>()?;
            Audience::Users(users)
        }
        CHANNEL => Audience::Channel {
            channel: ChannelId::new(r.u64()?).ok_or("a channel id of 0")?,
            version: i64::from_le_bytes(r.take()?),
        },
        _ => return Err("unknown audience"),
    };
    let split = usize::try_from(r.u32()?).map_err(|_| "bad split")?;
    let text = std::str::from_utf8(r.0).map_err(|_| "frame text is not UTF-8")?;
    let frame = ClientFrame::from_parts(text.to_owned(), split).ok_or("bad split")?;
    Ok((frame, audience))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or("truncated")?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// Hands one delivery from the bus to this node's sessions.
async fn deliver(payload: &[u8], sessions: &Sessions, members: &Members) -> Result<(), String> {
    let (frame, audience) = decode(payload).map_err(str::to_owned)?;
    let to = match audience {
        Audience::Everyone => Recipients::Everyone,
        Audience::Users(users) => Recipients::Users(users),
        Audience::Channel { channel, version } => Recipients::Members {
            channel,
            version,
            members: members_at_least(members, channel, version).await?,
        },
    };
    to.deliver(sessions, &Arc::new(frame));
    Ok(())
}

/// Returns once the stream `name` is gone or was made again since
/// `created`; NATS being away is the reconnect check's business.
async fn stream_replaced(js: jetstream::Context, name: String, created: DateTime) {
    loop {
        tokio::time::sleep(STREAM_CHECK).await;
        match js.get_stream(&name).await {
            Ok(stream) if stream.cached_info().created != created => return,
            Err(err)
                if matches!(
                    err.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                return;
            }
            Ok(_) | Err(_) => {}
        }
    }
}

/// The channel's members from the cache or the database, retried a few
/// times (the stream waits meanwhile: order matters more than latency).
async fn members_at_least(
    members: &Members,
    channel: ChannelId,
    version: i64,
) -> Result<Arc<crate::dispatch::members::MemberSet>, String> {
    let mut wait = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match members.at_least(channel, version).await {
            Ok(set) => return Ok(set),
            Err(err) if attempt >= MEMBER_ATTEMPTS => {
                return Err(format!("cannot read channel {channel}'s members: {err}"));
            }
            Err(err) => {
                tracing::warn!(error = %err, %channel, "cluster bus: cannot read the channel's members; retrying");
            }
        }
        tokio::time::sleep(wait).await;
        wait *= 4;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::members::MemberSet;

    fn user(n: u64) -> UserId {
        UserId::new(n).unwrap()
    }

    #[test]
    fn deliveries_round_trip() {
        let frame = ClientFrame::new("MESSAGE_CREATE", r#"{"content":"héllo"}"#);
        let members = Arc::new(MemberSet::new(vec![user(1), user(2)].into()));
        let channel = ChannelId::new(77).unwrap();
        let cases = [
            (Recipients::Everyone, Audience::Everyone),
            (
                Recipients::Users(vec![user(5), user(u64::MAX >> 1)]),
                Audience::Users(vec![user(5), user(u64::MAX >> 1)]),
            ),
            (
                Recipients::Members {
                    channel,
                    version: 9,
                    members,
                },
                Audience::Channel {
                    channel,
                    version: 9,
                },
            ),
        ];
        for (to, want) in cases {
            let (back, audience) = decode(&encode(&frame, &to)).unwrap();
            assert_eq!(audience, want);
            assert_eq!(back.encode(3), frame.encode(3));
        }
    }

    #[test]
    fn a_channel_travels_as_its_id_whatever_its_size() {
        let frame = ClientFrame::new("X", "{}");
        let big = Arc::new(MemberSet::new((1..=10_000).map(user).collect()));
        let to = Recipients::Members {
            channel: ChannelId::new(1).unwrap(),
            version: 1,
            members: big,
        };
        assert!(encode(&frame, &to).len() < 64);
    }

    #[test]
    fn damaged_deliveries_are_refused_not_panicked_on() {
        let frame = ClientFrame::new("X", r#"{"a":1}"#);
        let good = encode(&frame, &Recipients::Users(vec![user(1), user(2)]));
        for cut in 0..good.len() - 1 {
            // Shorter text still parses when the split fits; never panics.
            let _ = decode(&good[..cut]);
        }
        assert!(decode(&good[..3]).is_err());
        let mut bad = good.to_vec();
        bad[0] = 99;
        assert!(decode(&bad).is_err());
        let mut huge = good.to_vec();
        huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge).unwrap_err(), "truncated user list");
        let mut split = good.to_vec();
        let at = 2 + 4 + 16;
        split[at..at + 4].copy_from_slice(&10_000u32.to_le_bytes());
        assert_eq!(decode(&split).unwrap_err(), "bad split");
    }

    #[test]
    fn message_ids_are_header_safe_and_stable() {
        let id = message_id("weird\r\nid \u{1F600}");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, message_id("weird\r\nid \u{1F600}"));
        assert_ne!(id, message_id("other"));
    }
}
