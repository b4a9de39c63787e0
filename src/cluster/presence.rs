//! Cluster-wide `online` for plugins (DESIGN §9). The `Presence` host
//! import must answer from memory, so every node keeps a copy of the
//! slots bucket (watched, see `Cluster::run`): a user is online if a
//! session of theirs is attached on a live node, this one included.

use std::collections::HashSet;

use async_nats::jetstream::kv;

use super::slots::Held;
use super::{Cluster, Inner};
use crate::db::now_ms;
use crate::ids::UserId;
use crate::plugin::Presence;
use crate::session::Sessions;

impl Inner {
    /// Records a user's slot list from the slots bucket.
    pub(super) fn see_slots(&self, entry: &kv::Entry) {
        let Some(user) = entry
            .key
            .strip_prefix("u.")
            .and_then(|id| id.parse::<UserId>().ok())
        else {
            return;
        };
        let held: Vec<Held> = serde_json::from_slice(&entry.value).unwrap_or_default();
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_empty() {
            users.remove(&user);
        } else {
            users.insert(user, held);
        }
    }

    /// Whether a slot counts, from memory only (the view may lag by a
    /// renewal: good enough for presence, never used for limits).
    fn counts(&self, held: &Held, now: i64) -> bool {
        if held.node == self.node {
            return held.incarnation == self.incarnation() && !self.is_fenced();
        }
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&held.node)
            .is_some_and(|l| l.incarnation == held.incarnation && l.is_live(now, self.lease_ms))
    }
}

/// `online` across the cluster: this node's sessions (current at once)
/// and every live node's, as last seen in the slots bucket.
pub struct Online {
    pub cluster: Cluster,
    pub local: Sessions,
}

impl Presence for Online {
    fn online(&self, users: &[UserId]) -> Vec<UserId> {
        let local: HashSet<UserId> = self.local.online(users).into_iter().collect();
        let inner = &self.cluster.inner;
        let now = now_ms();
        let remote: HashSet<UserId> = {
            let known = inner.users.lock().unwrap_or_else(|p| p.into_inner());
            users
                .iter()
                .filter(|u| {
                    known
                        .get(u)
                        .is_some_and(|held| held.iter().any(|h| inner.counts(h, now)))
                })
                .copied()
                .collect()
        };
        let mut seen = HashSet::with_capacity(users.len());
        users
            .iter()
            .copied()
            .filter(|u| local.contains(u) || remote.contains(u))
            .filter(|u| seen.insert(*u))
            .collect()
    }
}
