//! The backend's lease on its id generator's node id (`cluster.node_id`):
//! two processes minting message ids into one database with the same node
//! bits could mint the same id in the same millisecond, so the second one
//! refuses to start, naming the first. The lease is renewed in the
//! background, released on a clean shutdown, and taken over once it has
//! expired (a crashed holder frees it after `cluster.lease_ms`), or at once
//! when its holder is a process of this host that is gone.

use std::path::Path;
use std::time::Duration;

use crate::db::{Db, now_ms, rfc3339};
use crate::ids::NodeId;
use crate::shutdown::Shutdown;
use crate::{with_conn, with_pool};

/// Why the lease could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "cluster.node_id {node} is in use on this database by {holder}; give this process another node_id or stop the other one"
    )]
    Held { node: NodeId, holder: String },
    #[error("cannot take the lease on cluster.node_id {node}: {source}")]
    Db { node: NodeId, source: sqlx::Error },
}

/// A held lease: which process holds it, and since when (which tells this
/// holder from a later one that took over after it expired).
pub struct NodeLease {
    db: Db,
    node: NodeId,
    holder: Holder,
    ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    host: String,
    pid: i64,
    since_ms: i64,
}

impl Holder {
    /// Whether this holder is a process that no longer runs on this host
    /// (it crashed): its lease may be taken before it expires.
    fn is_gone(&self, host: &str) -> bool {
        self.host == host
            && self.pid != i64::from(std::process::id())
            && Path::new("/proc/self").exists()
            && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} since {}",
            self.pid,
            self.host,
            rfc3339(self.since_ms)
        )
    }
}

impl NodeLease {
    /// Takes the lease on `node` for `ttl`, unless a live holder has it.
    pub async fn take(db: &Db, node: NodeId, ttl: Duration) -> Result<NodeLease, LeaseError> {
        let lease = NodeLease {
            db: db.clone(),
            node,
            holder: Holder {
                host: host(),
                pid: i64::from(std::process::id()),
                since_ms: now_ms(),
            },
            ttl,
        };
        let db_error = |source| LeaseError::Db { node, source };
        let me = &lease.holder;
        let expires = me.since_ms.saturating_add(lease.ttl_ms());
        let taken = with_conn!(db, c => sqlx::query(
            "INSERT INTO id_nodes (node_id, host, pid, since_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (node_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, \
             since_ms = excluded.since_ms, expires_at_ms = excluded.expires_at_ms \
             WHERE id_nodes.expires_at_ms < $4")
            .bind(i64::from(node.get()))
            .bind(&me.host)
            .bind(me.pid)
            .bind(me.since_ms)
            .bind(expires)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))
        .map_err(db_error)?;
        if taken == 1 {
            return Ok(lease);
        }
        let row: Option<(String, i64, i64)> = with_pool!(db, p => sqlx::query_as(
            "SELECT host, pid, since_ms FROM id_nodes WHERE node_id = $1")
            .bind(i64::from(node.get()))
            .fetch_optional(p)
            .await)
        .map_err(db_error)?;
        let Some((host, pid, since_ms)) = row else {
            return Err(LeaseError::Held {
                node,
                holder: "another process (released just now)".to_owned(),
            });
        };
        let other = Holder {
            host,
            pid,
            since_ms,
        };
        if other.is_gone(&me.host) {
            // Only if that same holder still has it: two starting at once
            // can't both take over.
            let replaced = with_conn!(db, c => sqlx::query(
                "UPDATE id_nodes SET pid = $1, since_ms = $2, expires_at_ms = $3 \
                 WHERE node_id = $4 AND host = $5 AND pid = $6 AND since_ms = $7")
                .bind(me.pid)
                .bind(me.since_ms)
                .bind(expires)
                .bind(i64::from(node.get()))
                .bind(&other.host)
                .bind(other.pid)
                .bind(other.since_ms)
                .execute(&mut *c)
                .await
                .map(|r| r.rows_affected()))
            .map_err(db_error)?;
            if replaced == 1 {
                tracing::info!(node_id = %node, previous = %other, "took over the lease on cluster.node_id from a process that is gone");
                return Ok(lease);
            }
        }
        Err(LeaseError::Held {
            node,
            holder: other.to_string(),
        })
    }

    /// Renews the lease until `stop`, then releases it.
    pub async fn keep(self, stop: Shutdown) {
        let every = (self.ttl / 3).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            match self.renew().await {
                Ok(true) => {}
                Ok(false) => tracing::error!(
                    node_id = %self.node,
                    "the lease on cluster.node_id was taken over by another process (this one missed its renewals): ids minted from now on may collide"
                ),
                Err(err) => {
                    tracing::warn!(node_id = %self.node, error = %err, "cannot renew the lease on cluster.node_id; retrying")
                }
            }
        }
        if let Err(err) = self.release().await {
            tracing::warn!(node_id = %self.node, error = %err, "cannot release the lease on cluster.node_id; it expires by itself");
        }
    }

    /// Extends the lease; `false` if this process no longer holds it.
    async fn renew(&self) -> Result<bool, sqlx::Error> {
        self.expire_at(now_ms().saturating_add(self.ttl_ms())).await
    }

    /// Gives the lease up: an expired lease is free to take.
    async fn release(&self) -> Result<(), sqlx::Error> {
        self.expire_at(0).await.map(|_| ())
    }

    /// Sets our lease's expiry; `false` if this process no longer holds it.
    async fn expire_at(&self, expires: i64) -> Result<bool, sqlx::Error> {
        let me = &self.holder;
        let updated = with_conn!(self.db, c => sqlx::query(
            "UPDATE id_nodes SET expires_at_ms = $1 WHERE node_id = $2 AND host = $3 AND pid = $4 AND since_ms = $5")
            .bind(expires)
            .bind(i64::from(self.node.get()))
            .bind(&me.host)
            .bind(me.pid)
            .bind(me.since_ms)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(updated == 1)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

/// This machine's name, for the holder text.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".to_owned())
}
