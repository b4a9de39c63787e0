//! Node leases: one key per node (`n.<node_id>`) in the nodes bucket,
//! holding who the node is and when it last renewed. Built on
//! compare-and-set alone (NATS 2.9 has no per-key TTL): the holder renews
//! with `update(key, value, revision)` every `lease_ms`/3; anyone reading
//! a lease older than `lease_ms` treats the node as dead.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv::UpdateErrorKind;
use tokio::time::Instant;

use super::{Cluster, ClusterError, Inner};
use crate::db::now_ms;
use crate::ids::NodeId;
use crate::session::Sessions;
use crate::shutdown::Shutdown;

/// The close code for sessions of a node that lost its lease: "going
/// away, reconnect" (DESIGN §2), to a node that can count them.
const FENCED: u16 = 1001;

/// A node's lease as stored (JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub node: NodeId,
    pub incarnation: u64,
    /// Holder's wall clock at the start of the renewal that wrote it; 0
    /// once released.
    pub renewed_ms: i64,
    /// Sessions attached on the node at that renewal.
    pub sessions: u64,
    /// The node's client listener, to name it in errors and `/cluster`.
    pub client: String,
    pub pid: u32,
}

impl Lease {
    pub fn is_live(&self, now_ms: i64, lease_ms: i64) -> bool {
        self.renewed_ms > 0 && now_ms - self.renewed_ms < lease_ms
    }
}

/// A node's key in the nodes bucket.
pub(super) fn key(node: NodeId) -> String {
    format!("n.{node}")
}

impl Cluster {
    fn lease_value(&self, incarnation: u64, renewed_ms: i64, sessions: u64, client: &str) -> Lease {
        Lease {
            node: self.inner.node,
            incarnation,
            renewed_ms,
            sessions,
            client: client.to_owned(),
            pid: std::process::id(),
        }
    }

    /// Writes this node's first lease; refuses while another process
    /// holds a live one for the same node id. Returns the key's revision.
    pub(super) async fn take_lease(&self, client: String) -> Result<u64, ClusterError> {
        let node = self.inner.node;
        let failed = |reason: String| ClusterError::Lease { node, reason };
        let key = key(node);
        // A handful of rounds: only a concurrent start of the same id races here.
        for _ in 0..8 {
            let lease = self.lease_value(self.inner.incarnation(), now_ms(), 0, &client);
            let value = serde_json::to_vec(&lease).map_err(|e| failed(e.to_string()))?;
            let current = self
                .inner
                .nodes
                .entry(key.clone())
                .await
                .map_err(|e| failed(e.to_string()))?;
            let written = match current {
                None => self
                    .inner
                    .nodes
                    .create(&key, value.into())
                    .await
                    .map_err(|e| e.to_string()),
                Some(entry) => {
                    if let Ok(other) = serde_json::from_slice::<Lease>(&entry.value) {
                        let now = now_ms();
                        if other.is_live(now, self.inner.lease_ms) {
                            return Err(ClusterError::NodeIdTaken {
                                node,
                                client: other.client,
                                pid: other.pid,
                                age_ms: now - other.renewed_ms,
                            });
                        }
                    }
                    self.inner
                        .nodes
                        .update(&key, value.into(), entry.revision)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            match written {
                Ok(revision) => {
                    self.inner.see(lease);
                    tracing::info!(node_id = %node, "cluster: lease taken");
                    return Ok(revision);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cluster: lease write raced; reading again")
                }
            }
        }
        Err(failed(
            "the lease key kept changing under this node".to_owned(),
        ))
    }

    /// Renews the lease every `lease_ms`/3 until shutdown. Fences the node
    /// (sessions closed with 1001, connects refused) once `lease_ms`·3/4
    /// has passed since the last renewal that landed, before any other
    /// node can count it dead; renewing again later lifts the fence under
    /// a new incarnation, so the slots of the closed sessions never count.
    pub(super) async fn keep_lease(&self, sessions: Sessions, client: String, shutdown: Shutdown) {
        let inner = &self.inner;
        let lease = Duration::from_millis(u64::try_from(inner.lease_ms).unwrap_or(u64::MAX));
        let period = lease / 3;
        let fence_after = lease * 3 / 4;
        let key = key(inner.node);
        let mut last_ok = Instant::now();
        let mut next = Instant::now() + period;
        // Another process took this node id while we were cut off.
        let mut lost = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(last_ok + fence_after), if !inner.is_fenced() => {
                    fence(inner, &sessions, "its lease could not be renewed in time");
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            next = Instant::now() + period;
            if lost {
                continue;
            }
            let started = Instant::now();
            let fenced = inner.is_fenced();
            let incarnation = if fenced {
                rand::random()
            } else {
                inner.incarnation()
            };
            let count = u64::try_from(sessions.session_count()).unwrap_or(u64::MAX);
            let value = self.lease_value(incarnation, now_ms(), count, &client);
            let Ok(bytes) = serde_json::to_vec(&value) else {
                continue;
            };
            let revision = inner.lease_revision.load(Ordering::Relaxed);
            let update = inner.nodes.update(&key, bytes.into(), revision);
            match tokio::time::timeout(period / 2, update).await {
                Ok(Ok(revision)) => {
                    inner.lease_revision.store(revision, Ordering::Relaxed);
                    inner.metrics.cluster_lease_renewals.inc();
                    last_ok = started;
                    if fenced {
                        inner.incarnation.store(incarnation, Ordering::Release);
                        inner.fenced.store(false, Ordering::Release);
                        tracing::info!("cluster: lease renewed again; admitting sessions");
                    }
                    inner.see(value);
                    if !inner
                        .unreleased
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty()
                    {
                        shutdown.spawn(self.clone().retry_releases());
                    }
                }
                Ok(Err(err)) if err.kind() == UpdateErrorKind::WrongLastRevision => {
                    inner.metrics.cluster_lease_failures.inc();
                    match self.reclaim(&key).await {
                        Some(revision) => inner.lease_revision.store(revision, Ordering::Relaxed),
                        None => {
                            lost = true;
                            fence(inner, &sessions, "another process took its node_id");
                            tracing::error!(node_id = %inner.node, "cluster: this node's lease was taken by another process with the same node_id; restart this node with a free node_id");
                        }
                    }
                }
                Ok(Err(err)) => {
                    inner.metrics.cluster_lease_failures.inc();
                    tracing::warn!(error = %err, "cluster: lease renewal failed");
                }
                Err(_) => {
                    inner.metrics.cluster_lease_failures.inc();
                    tracing::warn!("cluster: lease renewal timed out");
                }
            }
        }
        if !lost {
            self.release_lease(&key, &client).await;
        }
    }

    /// After a compare-and-set conflict on our own key: if the key still
    /// holds our incarnation (our last write landed but its ack was lost),
    /// its revision; `None` if someone else wrote it.
    async fn reclaim(&self, key: &str) -> Option<u64> {
        let entry = self.inner.nodes.entry(key).await.ok()??;
        let lease = serde_json::from_slice::<Lease>(&entry.value).ok()?;
        (lease.incarnation == self.inner.incarnation() && lease.pid == std::process::id())
            .then_some(entry.revision)
    }

    /// Marks the lease released (`renewed_ms` 0) so the node counts as
    /// dead at once and a restart needn't wait `lease_ms`.
    async fn release_lease(&self, key: &str, client: &str) {
        let inner = &self.inner;
        let value = self.lease_value(inner.incarnation(), 0, 0, client);
        let Ok(bytes) = serde_json::to_vec(&value) else {
            return;
        };
        let revision = inner.lease_revision.load(Ordering::Relaxed);
        match inner.nodes.update(key, bytes.into(), revision).await {
            Ok(_) => tracing::info!("cluster: lease released"),
            Err(err) => {
                tracing::warn!(error = %err, "cluster: could not release the lease; it expires after lease_ms")
            }
        }
    }
}

/// Stops this node from holding sessions it can no longer vouch for.
fn fence(inner: &Inner, sessions: &Sessions, why: &str) {
    inner.fenced.store(true, Ordering::Release);
    // Written under this incarnation, which will never count again.
    inner
        .unreleased
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    let closed = sessions.close_all(FENCED);
    tracing::error!(
        sessions = closed,
        "cluster: node fenced: {why}; sessions closed with 1001, connects refused until the lease is renewed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lives_lease_ms_after_its_renewal_and_a_released_one_not_at_all() {
        let lease = |renewed_ms| Lease {
            node: NodeId::default(),
            incarnation: 1,
            renewed_ms,
            sessions: 0,
            client: String::new(),
            pid: 0,
        };
        assert!(lease(10_000).is_live(10_000, 1_500));
        assert!(lease(10_000).is_live(11_499, 1_500));
        assert!(!lease(10_000).is_live(11_500, 1_500));
        assert!(!lease(0).is_live(1, 1_500));
    }
}
