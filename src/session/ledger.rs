//! Cluster-wide session slots (DESIGN §9): in cluster mode the local
//! registry still holds this node's sessions, and a [`Ledger`] (the
//! cluster module's, over JetStream KV) counts every node's sessions of a
//! user against `max_per_user` before one is admitted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::queue::Epoch;
use super::registry::{Admission, NoSlot, Registry, Released, ResumeFailed, Resumed, Slot};
use super::resume::SessionId;
use crate::config::OnLimit;
use crate::ids::UserId;

/// A session's name in the cluster: a hash of its id (see
/// `SessionId::tag`), unique enough among one user's few sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SlotTag(pub u64);

/// Why the ledger gave no slot.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("session limit reached")]
    Limit,
    #[error("cluster session slots unavailable: {0}")]
    Unavailable(String),
}

/// The cluster-wide count of each user's attached sessions.
pub trait Ledger: Send + Sync {
    /// Takes a slot for `user`'s session `tag` on this node within `max`
    /// (a no-op if it holds one already). With `EvictOldest` at the limit
    /// the oldest slot is taken over: a session on another node is told
    /// to close there; one on this node comes back to close here.
    fn acquire(
        &self,
        user: UserId,
        tag: SlotTag,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<SlotTag>, LedgerError>>;
    /// Gives the slot back (the session ended or detached).
    fn release(&self, user: UserId, tag: SlotTag) -> BoxFuture<'_, ()>;
}

/// [`Admission`] in cluster mode: the local registry holds the session
/// (with no local limit) and the ledger decides whether it may stay.
pub(crate) struct Ledgered {
    pub(crate) registry: Arc<Registry>,
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) resume_window: Duration,
}

impl From<LedgerError> for NoSlot {
    fn from(err: LedgerError) -> NoSlot {
        match err {
            LedgerError::Limit => NoSlot::Limit,
            LedgerError::Unavailable(why) => {
                tracing::warn!(error = %why, "connect refused: cluster slots unavailable");
                NoSlot::Unavailable
            }
        }
    }
}

impl Ledgered {
    /// Acquires `id`'s slot; a local session the ledger evicted is closed
    /// here with 4011.
    async fn acquire(
        &self,
        user: UserId,
        id: SessionId,
        max: usize,
        on_limit: OnLimit,
    ) -> Result<(), NoSlot> {
        let evict = self.ledger.acquire(user, id.tag(), max, on_limit).await?;
        if let Some(tag) = evict {
            self.registry.evict(user, tag);
        }
        Ok(())
    }
}

impl Admission for Ledgered {
    fn admit(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<Arc<Slot>>, NoSlot>> {
        Box::pin(async move {
            // Registered first, so an eviction sent by another node the
            // moment the slot is written finds the session.
            let id = slot.id;
            if let Err(limit) = self
                .registry
                .register(user, slot.clone(), usize::MAX, on_limit)
            {
                return Err(limit.into());
            }
            match self.acquire(user, id, max, on_limit).await {
                Ok(()) => Ok(None),
                Err(no) => {
                    self.registry.leave(user, &slot, 0, None);
                    Err(no)
                }
            }
        })
    }

    fn resume(
        &self,
        user: UserId,
        id: SessionId,
        seq: u64,
        issued_at: u64,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Resumed, ResumeFailed>> {
        Box::pin(async move {
            let resumed = self
                .registry
                .attach(user, id, seq, issued_at, usize::MAX, on_limit)?;
            // A takeover of a zombie already holds the slot: a no-op then.
            if let Err(no) = self.acquire(user, id, max, on_limit).await {
                let expires = Instant::now() + self.resume_window;
                self.registry
                    .leave(user, &resumed.slot, resumed.epoch, Some(expires));
                return Err(ResumeFailed::NoSlot(no));
            }
            Ok(resumed)
        })
    }

    fn release(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        epoch: Epoch,
        resumable: Option<Instant>,
    ) -> BoxFuture<'_, Released> {
        Box::pin(async move {
            let released = self.registry.leave(user, &slot, epoch, resumable);
            // A detached session doesn't count either (DESIGN §2).
            if released != Released::TakenOver {
                self.ledger.release(user, slot.id.tag()).await;
            }
            released
        })
    }
}
