//! Cluster-wide session slots: one key per user (`u.<user_id>`) in the
//! slots bucket, holding that user's attached sessions on every node.
//! Every change reads the key and writes it back with compare-and-set on
//! the revision read (`create` when absent), retrying on a conflict, so
//! simultaneous connects of one user on several nodes serialize on the
//! key and `max_per_user` is never exceeded. Slots of dead nodes (lease
//! older than `lease_ms`, or an older incarnation) are dropped on the way.

use std::time::Duration;

use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
use futures_util::future::BoxFuture;

use super::{Cluster, evict_subject, user_key};
use crate::config::OnLimit;
use crate::db::now_ms;
use crate::ids::{NodeId, UserId};
use crate::session::ledger::{Ledger, LedgerError, SlotTag};

/// Compare-and-set rounds before a connect gives up (each lost round
/// means another connect of the same user got in first).
const MAX_ROUNDS: usize = 200;
/// How long an eviction waits for the holding node's answer.
const EVICT_TIMEOUT: Duration = Duration::from_secs(2);

/// One attached session in a user's slot list.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Held {
    pub node: NodeId,
    pub incarnation: u64,
    pub tag: SlotTag,
    /// When it was admitted (unix ms): `evict_oldest` picks the smallest.
    pub at: i64,
}

/// An eviction request to the node holding a session.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Evict {
    pub user: UserId,
    pub tag: SlotTag,
    pub incarnation: u64,
}

/// One attempt's outcome.
enum Written {
    Done(Option<Held>),
    Conflict,
}

impl Cluster {
    /// The user's slot list and its revision (`None`: no key yet).
    async fn read(&self, key: &str) -> Result<(Vec<Held>, Option<u64>), LedgerError> {
        let entry = self
            .inner
            .slots
            .entry(key)
            .await
            .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
        Ok(match entry {
            Some(entry) => (
                serde_json::from_slice(&entry.value).unwrap_or_default(),
                Some(entry.revision),
            ),
            None => (Vec::new(), None),
        })
    }

    /// Writes `held` if the key is still at `revision`.
    async fn write(
        &self,
        key: &str,
        held: &[Held],
        revision: Option<u64>,
    ) -> Result<bool, LedgerError> {
        let unavailable = LedgerError::Unavailable;
        let value = serde_json::to_vec(held).map_err(|e| unavailable(e.to_string()))?;
        let slots = &self.inner.slots;
        let conflict = match revision {
            None => match slots.create(key, value.into()).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => true,
                Err(e) => return Err(unavailable(e.to_string())),
            },
            Some(revision) => match slots.update(key, value.into(), revision).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => true,
                Err(e) => return Err(unavailable(e.to_string())),
            },
        };
        if conflict {
            self.inner.metrics.cluster_kv_retries.inc();
        }
        Ok(false)
    }

    /// The slots that still count: on live nodes, under their current
    /// incarnation.
    async fn live(&self, held: Vec<Held>) -> Result<Vec<Held>, LedgerError> {
        let mut live = Vec::with_capacity(held.len());
        for h in held {
            let counts = self
                .inner
                .is_live(h.node, h.incarnation)
                .await
                .map_err(LedgerError::Unavailable)?;
            if counts {
                live.push(h);
            }
        }
        Ok(live)
    }

    /// One read-modify-write round of [`Ledger::acquire`].
    async fn try_acquire(
        &self,
        key: &str,
        mine: &Held,
        max: usize,
        on_limit: OnLimit,
    ) -> Result<Written, LedgerError> {
        let (held, revision) = self.read(key).await?;
        if held
            .iter()
            .any(|h| h.node == mine.node && h.tag == mine.tag)
        {
            return Ok(Written::Done(None));
        }
        let mut live = self.live(held).await?;
        let mut evicted = None;
        if live.len() >= max {
            if on_limit == OnLimit::Reject || live.is_empty() {
                return Err(LedgerError::Limit);
            }
            let oldest = live
                .iter()
                .enumerate()
                .min_by_key(|(_, h)| h.at)
                .map_or(0, |(i, _)| i);
            evicted = Some(live.remove(oldest));
        }
        live.push(mine.clone());
        Ok(if self.write(key, &live, revision).await? {
            Written::Done(evicted)
        } else {
            Written::Conflict
        })
    }

    /// Tells the node holding `held` to close it (4011); its slot is
    /// already gone from the list.
    async fn evict_remote(&self, user: UserId, held: &Held) {
        let request = Evict {
            user,
            tag: held.tag,
            incarnation: held.incarnation,
        };
        let Ok(payload) = serde_json::to_vec(&request) else {
            return;
        };
        let subject = evict_subject(&self.inner.prefix, held.node);
        let asked = self.inner.client.request(subject, payload.into());
        match tokio::time::timeout(EVICT_TIMEOUT, asked).await {
            Ok(Ok(_)) => {}
            // The holder is unreachable: if it is cut off it fences itself.
            Ok(Err(err)) => {
                tracing::warn!(node_id = %held.node, error = %err, "cluster: eviction not delivered")
            }
            Err(_) => tracing::warn!(node_id = %held.node, "cluster: eviction not answered"),
        }
    }

    /// One read-modify-write round of [`Ledger::release`]; `true` when done.
    async fn try_release(&self, key: &str, tag: SlotTag) -> Result<bool, LedgerError> {
        let (mut held, revision) = self.read(key).await?;
        let before = held.len();
        held.retain(|h| !(h.node == self.inner.node && h.tag == tag));
        if held.len() == before {
            return Ok(true);
        }
        self.write(key, &held, revision).await
    }
}

impl Cluster {
    /// Retries the releases that failed; a fence drops them instead (the
    /// new incarnation makes those slots count for nothing).
    pub(super) async fn retry_releases(self) {
        let due = std::mem::take(
            &mut *self
                .inner
                .unreleased
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (user, tag) in due {
            self.release(user, tag).await;
        }
    }
}

impl Ledger for Cluster {
    fn acquire(
        &self,
        user: UserId,
        tag: SlotTag,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<SlotTag>, LedgerError>> {
        Box::pin(async move {
            let key = user_key(user);
            for _ in 0..MAX_ROUNDS {
                if self.inner.is_fenced() {
                    return Err(LedgerError::Unavailable(
                        "this node's lease is not current".to_owned(),
                    ));
                }
                let mine = Held {
                    node: self.inner.node,
                    incarnation: self.inner.incarnation(),
                    tag,
                    at: now_ms(),
                };
                let Written::Done(evicted) = self.try_acquire(&key, &mine, max, on_limit).await?
                else {
                    continue;
                };
                return Ok(match evicted {
                    Some(h) if h.node == self.inner.node => Some(h.tag),
                    Some(h) => {
                        self.evict_remote(user, &h).await;
                        None
                    }
                    None => None,
                });
            }
            Err(LedgerError::Unavailable(format!(
                "user {user}'s slot key changed {MAX_ROUNDS} times under this connect"
            )))
        })
    }

    fn release(&self, user: UserId, tag: SlotTag) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // A fenced node's slots were written under an incarnation that
            // never counts again, and NATS is likely out of reach: a
            // release would only hold up the session's close frame.
            if self.inner.is_fenced() {
                return;
            }
            let key = user_key(user);
            for _ in 0..MAX_ROUNDS {
                match self.try_release(&key, tag).await {
                    Ok(true) => return,
                    Ok(false) => continue,
                    Err(err) => {
                        tracing::warn!(error = %err, "cluster: could not free a session slot; retrying after the next lease renewal");
                        self.inner
                            .unreleased
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((user, tag));
                        return;
                    }
                }
            }
        })
    }
}
