//! Cluster mode (DESIGN §9): several gateway nodes share PostgreSQL and a
//! NATS server with JetStream. This module owns everything that talks to
//! NATS for sessions:
//!
//! - `lease`: each node's lease, one key per node in the `<prefix>_nodes`
//!   KV bucket, renewed by compare-and-set every `lease_ms`/3. A node whose
//!   lease is older than `lease_ms` is dead: its sessions stop counting. A
//!   node that can't renew in time closes its own sessions (1001) and
//!   refuses connects until it can, so the cluster never over-admits.
//! - `slots`: the [`Ledger`](crate::session::ledger::Ledger): one key per
//!   user in the `<prefix>_slots` bucket listing the user's sessions on
//!   every node, changed only by compare-and-set (`Store::update` with the
//!   revision read), so `max_per_user` is exact across nodes.
//!
//! - `peers`: the other nodes as holders of event claims, so an event
//!   retried on another node waits for the attempt still in flight.
//! - `bus`: the fan-out of events to every node's sessions through the
//!   JetStream stream `<prefix>_fanout`.
//!
//! Evictions (`evict_oldest`) travel as core NATS requests on
//! `<prefix>.evict.<node_id>` to the node that holds the oldest session.
//!
//! Liveness is judged by wall clock (`renewed_ms` in the lease against
//! each node's clock): nodes need clocks in sync well within `lease_ms`.

mod bus;
mod lease;
mod peers;
mod presence;
mod slots;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;

use crate::config::ClusterConfig;
use crate::db::now_ms;
use crate::ids::{NodeId, UserId};
use crate::session::Sessions;
use crate::session::ledger::SlotTag;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

pub use bus::Bus;
pub use lease::Lease;
pub use presence::Online;

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url} (cluster.nats_url): {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot open the JetStream key-value bucket '{bucket}' (is JetStream on?): {reason}")]
    Bucket { bucket: String, reason: String },
    #[error(
        "cluster.node_id {node} is already live: node {node} at {client} (pid {pid}) renewed its lease {age_ms} ms ago; \
         give this node another node_id, or wait cluster.lease_ms if that node is gone"
    )]
    NodeIdTaken {
        node: NodeId,
        client: String,
        pid: u32,
        age_ms: i64,
    },
    #[error("cannot take the lease of node {node} in JetStream KV: {reason}")]
    Lease { node: NodeId, reason: String },
    #[error("cannot open the JetStream stream '{stream}' (is JetStream on?): {reason}")]
    Stream { stream: String, reason: String },
}

/// This node's membership of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeId,
    prefix: String,
    lease_ms: i64,
    client: async_nats::Client,
    nodes: kv::Store,
    slots: kv::Store,
    bus: Bus,
    /// Names this run of the node (a fresh one after every fence): slots
    /// written under an older one never count again.
    incarnation: AtomicU64,
    /// Set while this node's lease may have expired: it has closed its
    /// sessions and admits none.
    fenced: AtomicBool,
    /// The revision of this node's lease key as last written.
    lease_revision: AtomicU64,
    /// Slots whose release failed (NATS unreachable), retried after each
    /// lease renewal: else they would count as long as this node lives.
    unreleased: Mutex<Vec<(UserId, SlotTag)>>,
    /// Every user's slots as last seen (the watcher keeps it current), so
    /// plugins' `online` answers cluster-wide from memory.
    users: Mutex<HashMap<UserId, Vec<slots::Held>>>,
    /// Every node's lease as last seen (the watcher keeps it current).
    view: Mutex<HashMap<NodeId, Lease>>,
    metrics: Arc<Metrics>,
}

/// A live node as `GET /cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub client: String,
    pub sessions: u64,
    pub lease_age_ms: i64,
}

impl Cluster {
    /// Connects to NATS, opens the buckets and takes this node's lease;
    /// fails naming the other node if `node_id` is live elsewhere.
    pub async fn join(
        config: &ClusterConfig,
        nats_url: &str,
        client_addr: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("cluster: disconnected from NATS; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("cluster: connected to NATS"),
                    other => tracing::debug!(event = %other, "cluster: NATS event"),
                }
            })
            // Back within a second of NATS: the default waits up to 4 s.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * attempts.min(10) as u64)
            })
            .connect(nats_url)
            .await
            .map_err(|source| ClusterError::Connect {
                url: nats_url.to_owned(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let prefix = config.subject_prefix.clone();
        let nodes = bucket(&js, format!("{prefix}_nodes")).await?;
        let slots = bucket(&js, format!("{prefix}_slots")).await?;
        let bus = Bus::open(client.clone(), &prefix, metrics.clone()).await?;
        let lease_ms = i64::try_from(config.lease_ms.get()).unwrap_or(i64::MAX);
        let cluster = Cluster {
            inner: Arc::new(Inner {
                node: config.node_id,
                prefix,
                lease_ms,
                client,
                nodes,
                slots,
                bus,
                incarnation: AtomicU64::new(rand::random()),
                fenced: AtomicBool::new(false),
                lease_revision: AtomicU64::new(0),
                unreleased: Mutex::new(Vec::new()),
                users: Mutex::new(HashMap::new()),
                view: Mutex::new(HashMap::new()),
                metrics,
            }),
        };
        let revision = cluster.take_lease(client_addr.to_string()).await?;
        cluster
            .inner
            .lease_revision
            .store(revision, Ordering::Relaxed);
        Ok(cluster)
    }

    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The fan-out bus: the event path's [`Fanout`](crate::dispatch::pipeline::Fanout)
    /// in cluster mode; [`Bus::consume`] feeds this node's sessions.
    pub fn bus(&self) -> Bus {
        self.inner.bus.clone()
    }

    /// Runs the node's cluster duties until shutdown: renewing the lease
    /// (fencing `sessions` when it can't), watching the other nodes'
    /// leases, and serving evictions sent to this node. Releases the lease
    /// on the way out so a restart need not wait `lease_ms`.
    pub async fn run(self, sessions: Sessions, client_addr: SocketAddr, shutdown: Shutdown) {
        let inner = self.inner.clone();
        shutdown.spawn(Cluster::watch(
            self.inner.nodes.clone(),
            "node leases",
            move |entry| {
                if let Ok(lease) = serde_json::from_slice::<Lease>(&entry.value) {
                    inner.see(lease);
                }
            },
            shutdown.clone(),
        ));
        let inner = self.inner.clone();
        shutdown.spawn(Cluster::watch(
            self.inner.slots.clone(),
            "session slots",
            move |entry| inner.see_slots(&entry),
            shutdown.clone(),
        ));
        shutdown.spawn(
            self.clone()
                .serve_evictions(sessions.clone(), shutdown.clone()),
        );
        self.keep_lease(sessions, client_addr.to_string(), shutdown)
            .await;
    }

    /// The live nodes, this one included, by node id.
    pub fn status(&self) -> Vec<NodeStatus> {
        let now = now_ms();
        let view = self.inner.view.lock().unwrap_or_else(|p| p.into_inner());
        let mut nodes: Vec<NodeStatus> = view
            .values()
            .filter(|l| l.is_live(now, self.inner.lease_ms))
            .map(|l| NodeStatus {
                node_id: l.node,
                client: l.client.clone(),
                sessions: l.sessions,
                lease_age_ms: now - l.renewed_ms,
            })
            .collect();
        nodes.sort_by_key(|n| n.node_id);
        nodes
    }

    /// Keeps a copy of `store` current (its values first, then every
    /// change) by handing each entry to `see`, re-watching after an error.
    async fn watch(
        store: kv::Store,
        what: &'static str,
        see: impl Fn(kv::Entry) + Send,
        shutdown: Shutdown,
    ) {
        loop {
            let watched = async {
                let mut watch = store.watch_all().await.map_err(|e| e.to_string())?;
                while let Some(entry) = watch.next().await {
                    see(entry.map_err(|e| e.to_string())?);
                }
                Ok::<(), String>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = watched => {
                    if let Err(err) = result {
                        tracing::warn!(error = %err, "cluster: watching {what} failed; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Answers `<prefix>.evict.<node_id>`: closes the named session with
    /// 4011 if it is still here under this incarnation.
    async fn serve_evictions(self, sessions: Sessions, shutdown: Shutdown) {
        let subject = evict_subject(&self.inner.prefix, self.inner.node);
        loop {
            let mut sub = match self.inner.client.subscribe(subject.clone()).await {
                Ok(sub) => sub,
                Err(err) => {
                    tracing::warn!(error = %err, "cluster: cannot subscribe to evictions; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = sub.next() => msg,
                };
                let Some(msg) = msg else { break };
                let Ok(evict) = serde_json::from_slice::<slots::Evict>(&msg.payload) else {
                    continue;
                };
                let here = evict.incarnation == self.inner.incarnation()
                    && sessions.evict(evict.user, evict.tag);
                tracing::debug!(here, "cluster: eviction request");
                if let Some(reply) = msg.reply {
                    let answer = if here { "1" } else { "0" };
                    if let Err(err) = self.inner.client.publish(reply, answer.into()).await {
                        tracing::debug!(error = %err, "cluster: eviction reply failed");
                    }
                }
            }
        }
    }
}

impl Inner {
    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Records a lease read from the bucket, unless an older read.
    fn see(&self, lease: Lease) {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let newer = view.get(&lease.node).is_none_or(|old| {
            old.incarnation != lease.incarnation || old.renewed_ms <= lease.renewed_ms
        });
        if newer {
            view.insert(lease.node, lease);
        }
    }

    /// Whether slots written by `node` under `incarnation` still count.
    async fn is_live(&self, node: NodeId, incarnation: u64) -> Result<bool, String> {
        if node == self.node {
            return Ok(incarnation == self.incarnation() && !self.is_fenced());
        }
        self.lease_holds(node, |lease| lease.incarnation == incarnation)
            .await
    }

    /// Whether `node` holds a live lease that `matches`: the view first,
    /// then (as a dead verdict frees slots or lets another node take an
    /// event in flight) a fresh read of the lease, since the view may lag.
    async fn lease_holds(
        &self,
        node: NodeId,
        matches: impl Fn(&Lease) -> bool,
    ) -> Result<bool, String> {
        let live = |lease: &Lease| matches(lease) && lease.is_live(now_ms(), self.lease_ms);
        let cached = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .map(live);
        if cached == Some(true) {
            return Ok(true);
        }
        let entry = self
            .nodes
            .entry(lease::key(node))
            .await
            .map_err(|e| e.to_string())?;
        let Some(lease) = entry.and_then(|e| serde_json::from_slice::<Lease>(&e.value).ok()) else {
            return Ok(false);
        };
        let verdict = live(&lease);
        self.see(lease);
        Ok(verdict)
    }
}

/// Opens a KV bucket, creating it on first use (one value per key).
/// The stream is made by hand with the settings `create_key_value` would
/// use: that call first reads the account info, whose NATS 2.9 form
/// async-nats 0.51 can't parse.
async fn bucket(js: &jetstream::Context, name: String) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = js.get_key_value(name.clone()).await {
        return Ok(store);
    }
    let created = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_message_size: -1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: 1,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    let failed = |reason: String| ClusterError::Bucket {
        bucket: name.clone(),
        reason,
    };
    created.map_err(|e| failed(e.to_string()))?;
    js.get_key_value(name.clone())
        .await
        .map_err(|e| failed(e.to_string()))
}

fn evict_subject(prefix: &str, node: NodeId) -> String {
    format!("{prefix}.evict.{node}")
}

/// A user's key in the slots bucket.
fn user_key(user: UserId) -> String {
    format!("u.{user}")
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}
