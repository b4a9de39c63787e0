//! Client sessions (DESIGN §2): receive-only WebSockets on `GET /gateway`,
//! authenticated at the handshake, limited per user, kept alive by server
//! pings, and fed through bounded per-session queues.
//!
//! - [`frame`]: the client frames; an event is serialized once per delivery.
//! - `queue`: one session's bounded log (outbound queue and resume buffer
//!   in one, `s` assigned on entry) and close request.
//! - `registry`: user id → sessions, attached or detached; the per-user
//!   limit and resume's takeover live here.
//! - [`ledger`]: cluster mode's cluster-wide count in front of the registry.
//! - `resume`: session ids, the `resume=`/`seq=` query, HELLO's outcome.
//! - `conn`: one connection's task: handshake, HELLO, the select loop, close.
//! - `control_only`: the read side, refusing data frames at their header.
//!
//! The delivering side ([`Sessions::deliver`]) never waits on a socket: it
//! pushes into queues, and a session that can't keep up is closed (4009)
//! instead of slowing anyone else down. A session whose socket drops
//! without a clean close stays detached (still a recipient) for
//! `resume_window_ms`; one sweeper task ends those that expire.

pub(crate) mod conn;
pub(crate) mod control_only;
pub mod frame;
mod held;
pub mod ledger;
mod queue;
mod registry;
pub(crate) mod resume;
mod wakes;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use frame::ClientFrame;

use crate::config::{ServerConfig, SessionsConfig};
use crate::db::Db;
use crate::ids::UserId;
use crate::listen::Guard;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::token::TokenKey;
use ledger::{Ledger, Ledgered, SlotTag};
use registry::{Admission, Delivered, Registry};
use wakes::Wakes;

/// Largest client frame or message accepted. Clients only send control
/// frames (at most 125 bytes by RFC 6455); anything bigger is data and is
/// refused without being buffered.
pub const MAX_INBOUND_BYTES: usize = 256;

/// Shrunk tungstenite buffers: tungstenite's defaults (128 KiB each way)
/// would cost far more per idle session than everything else together.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        // Allocated eagerly per session; inbound is only tiny control frames.
        .read_buffer_size(128)
        // Frames accumulate up to this before a write; `flush` ends a batch.
        .write_buffer_size(8 * 1024)
        // Backstop only: a batch is flushed before the next one is fed.
        .max_write_buffer_size(16 << 20)
        .max_message_size(Some(MAX_INBOUND_BYTES))
        .max_frame_size(Some(MAX_INBOUND_BYTES))
}

/// What the client handshake checks and limits (`[server]`, DESIGN §2).
#[derive(Clone)]
pub struct Edge {
    /// Lowercased `scheme://host[:port]` or `*`; `None`: same-origin only.
    pub allowed_origins: Option<Vec<String>>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// `server.tls_cert`/`tls_key`, loaded: clients connect with wss://.
    pub tls: Option<TlsAcceptor>,
}

impl Edge {
    pub fn new(server: &ServerConfig, tls: Option<TlsAcceptor>) -> Edge {
        Edge {
            allowed_origins: server.allowed_origins.clone(),
            handshake_timeout: Duration::from_millis(server.handshake_timeout_ms.get()),
            max_connections: server.max_connections.get(),
            tls,
        }
    }
}

/// Shared state behind [`Sessions`].
struct Inner {
    config: SessionsConfig,
    edge: Edge,
    /// TLS and the request head under the handshake timeout.
    guard: Guard,
    /// Upgraded client connections, held against `edge.max_connections`.
    connections: AtomicUsize,
    heartbeat: Duration,
    tokens: TokenKey,
    /// Where the handshake reads a user's revocation (`token_revocations`);
    /// `None` (in-process tests without a database) checks none.
    revocations: Option<Db>,
    metrics: Arc<Metrics>,
    /// Delivery's view of the open sessions.
    registry: Arc<Registry>,
    /// Connect's view: the registry itself, or in cluster mode the
    /// registry behind the cluster-wide ledger (see [`Admission`]).
    admission: Arc<dyn Admission>,
    resume_window: Duration,
    ws_config: WebSocketConfig,
    wakes: Wakes,
}

/// The client-session service. Cheap to clone (Arc inside).
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("open", &self.session_count())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// `revocations` is the read-only database handle the handshake checks
    /// revoked tokens against; `ledger` (cluster mode) counts sessions
    /// across nodes.
    pub fn new(
        config: SessionsConfig,
        edge: Edge,
        tokens: TokenKey,
        revocations: Option<Db>,
        ledger: Option<Arc<dyn Ledger>>,
        metrics: Arc<Metrics>,
    ) -> Sessions {
        let heartbeat = Duration::from_millis(config.heartbeat_interval_ms.get());
        let max_detached = usize::try_from(config.max_per_user.get()).unwrap_or(usize::MAX);
        let registry = Arc::new(Registry::new(max_detached));
        let resume_window = Duration::from_millis(config.resume_window_ms.get());
        let admission: Arc<dyn Admission> = match ledger {
            Some(ledger) => Arc::new(Ledgered {
                registry: registry.clone(),
                ledger,
                resume_window,
            }),
            None => registry.clone(),
        };
        let guard = Guard {
            listener: "client",
            timeout: edge.handshake_timeout,
            tls: edge.tls.clone(),
            metrics: Some(metrics.clone()),
        };
        Sessions {
            inner: Arc::new(Inner {
                config,
                edge,
                guard,
                connections: AtomicUsize::new(0),
                heartbeat,
                tokens,
                revocations,
                metrics,
                admission,
                registry,
                resume_window,
                ws_config: ws_config(),
                wakes: Wakes::default(),
            }),
        }
    }

    /// Accept loop for `GET /gateway` until shutdown; on shutdown every
    /// session is closed with 1001 (and ends: resume buffers live in this
    /// process only). Connection tasks are spawned on the shutdown tracker
    /// so drain waits for them; so is the sweeper of detached sessions.
    pub async fn serve(&self, listener: TcpListener, shutdown: Shutdown) {
        shutdown.spawn(sweep(self.inner.clone(), shutdown.clone()));
        let inner = self.inner.clone();
        let paying = shutdown.clone();
        shutdown.spawn(async move { inner.wakes.pay(paying).await });
        while let Some((stream, _)) = shutdown.accept(&listener, "client").await {
            shutdown.spawn(conn::handle(self.inner.clone(), stream, shutdown.clone()));
        }
    }

    /// Hands one frame to every session of these (distinct) users; returns
    /// sessions reached. Never blocks or awaits: it enqueues into bounded
    /// per-session queues, and a full queue closes that session with 4009.
    pub fn deliver(&self, users: &[UserId], frame: &Arc<ClientFrame>) -> usize {
        self.fan_out(|registry, owed| registry.deliver(users, frame, owed))
    }

    /// [`deliver`](Self::deliver) to a channel's members (distinct), at a
    /// cost bounded by the smaller of the member list and the open sessions.
    pub fn deliver_members(
        &self,
        members: &[UserId],
        is_member: impl Fn(&UserId) -> bool,
        frame: &Arc<ClientFrame>,
    ) -> usize {
        self.fan_out(|registry, owed| registry.deliver_members(members, is_member, frame, owed))
    }

    /// [`deliver`](Self::deliver) to every open session.
    pub fn deliver_all(&self, frame: &Arc<ClientFrame>) -> usize {
        self.fan_out(|registry, owed| registry.deliver_all(frame, owed))
    }

    /// Runs one delivery; the sessions it reached are woken by the
    /// paying task (see [`wakes`]).
    fn fan_out(
        &self,
        deliver: impl FnOnce(&Registry, &mut Vec<Arc<registry::Slot>>) -> Delivered,
    ) -> usize {
        let mut owed = Vec::new();
        let done = deliver(&self.inner.registry, &mut owed);
        self.inner.wakes.owe(&mut owed);
        self.count(done)
    }

    fn count(&self, done: Delivered) -> usize {
        if done.overflowed > 0 {
            self.inner
                .metrics
                .queue_overflows
                .inc_by(done.overflowed as u64);
            tracing::debug!(
                sessions = done.overflowed,
                "outbound queue overflow; closing with 4009"
            );
        }
        done.reached
    }

    /// Which of these users have at least one session with a connection
    /// attached (order kept, no duplicates).
    pub fn online(&self, users: &[UserId]) -> Vec<UserId> {
        self.inner.registry.online(users)
    }

    /// Closes `user`'s sessions whose token was issued at or before
    /// `revoked_at` (unix seconds) with 4004, ending detached ones too;
    /// returns how many.
    pub fn revoke(&self, user: UserId, revoked_at: u64) -> usize {
        let closed = self.inner.registry.revoke(user, revoked_at);
        self.inner.detached_changed();
        closed
    }

    /// Closes `user`'s session `tag` with 4011 if it is on this node (the
    /// cluster evicted it for a newer one); whether it was.
    pub fn evict(&self, user: UserId, tag: SlotTag) -> bool {
        self.inner.registry.evict(user, tag)
    }

    /// Tells every session to close with `code` and ends them all, detached
    /// ones too (cluster mode: this node lost its lease, or frames it
    /// missed are gone); returns how many were open.
    pub fn close_all(&self, code: u16) -> usize {
        let closed = self.inner.registry.close_all(code);
        self.inner.detached_changed();
        closed
    }

    /// Sessions with a connection attached now (detached ones excluded).
    pub fn session_count(&self) -> usize {
        self.inner.registry.count()
    }
}

impl Inner {
    /// Brings `otako_sessions_detached` up to date.
    fn detached_changed(&self) {
        let detached = i64::try_from(self.registry.detached()).unwrap_or(i64::MAX);
        self.metrics.sessions_detached.set(detached);
    }
}

/// Ends detached sessions once their `resume_window_ms` has passed,
/// checking a few times per window (at most once a second).
async fn sweep(inner: Arc<Inner>, shutdown: Shutdown) {
    let tick = (inner.resume_window / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let ended = inner.registry.sweep(Instant::now());
        if ended > 0 {
            inner.detached_changed();
            tracing::debug!(sessions = ended, "detached sessions expired");
        }
    }
}

#[cfg(test)]
mod tests;
