//! The session registry: user id → that user's open sessions, oldest
//! first. The one place that counts sessions per user, so the limit check
//! and the insert happen under one shard lock and stay exact under
//! concurrent connects.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use futures_util::future::BoxFuture;

use super::frame::ClientFrame;
use super::queue::{Pushed, Queue, REPLACED, REVOKED};
use crate::config::OnLimit;
use crate::ids::{IdHash, Snowflake, UserId};

/// A registered session as the delivering side sees it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) id: Snowflake,
    pub(crate) queue: Queue,
    /// The token's issued-at (unix seconds): a revocation closes only
    /// sessions whose token it covers.
    pub(crate) issued_at: u64,
}

/// `register` refused: the user is at `max_per_user` and the policy is reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session limit reached")]
pub(crate) struct LimitReached;

/// What one `deliver` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) reached: usize,
    pub(crate) overflowed: usize,
}

impl Delivered {
    fn add(&mut self, pushed: Pushed) {
        match pushed {
            Pushed::Queued => self.reached += 1,
            Pushed::Overflowed => self.overflowed += 1,
            Pushed::Closing => {}
        }
    }
}

/// Counting and limiting a user's sessions (DESIGN §2: `max_per_user`,
/// `on_limit`). The local registry is today's implementation; cluster mode
/// puts a cluster-wide count in front of it, hence the future.
pub(crate) trait Admission: Send + Sync {
    /// Registers `slot` for `user` within `max` sessions; with
    /// `EvictOldest`, returns the evicted session (already told to close).
    fn admit(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<Arc<Slot>>, LimitReached>>;
    /// Frees the session's place; a no-op if it was evicted.
    fn release(&self, user: UserId, id: Snowflake);
}

impl Admission for Registry {
    fn admit(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<Arc<Slot>>, LimitReached>> {
        Box::pin(std::future::ready(self.register(user, slot, max, on_limit)))
    }

    fn release(&self, user: UserId, id: Snowflake) {
        self.unregister(user, id);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Sharded locks: fan-out to different users doesn't contend, and a
    /// user's check-then-insert is atomic under its shard's write lock.
    users: DashMap<UserId, Vec<Arc<Slot>>, IdHash>,
    count: AtomicUsize,
}

impl Registry {
    /// Adds a session for `user` within `max` sessions. With
    /// `EvictOldest`, a full user's oldest session is removed, told to close
    /// with 4011 and returned.
    pub(crate) fn register(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> Result<Option<Arc<Slot>>, LimitReached> {
        let mut slots = self.users.entry(user).or_default();
        let mut evicted = None;
        if slots.len() >= max {
            match on_limit {
                OnLimit::Reject => return Err(LimitReached),
                OnLimit::EvictOldest => {
                    let oldest = slots.remove(0);
                    oldest.queue.close(REPLACED);
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    evicted = Some(oldest);
                }
            }
        }
        slots.push(slot);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(evicted)
    }

    /// Removes a session; a no-op if it was already evicted.
    pub(crate) fn unregister(&self, user: UserId, id: Snowflake) {
        if let Some(mut slots) = self.users.get_mut(&user)
            && let Some(at) = slots.iter().position(|s| s.id == id)
        {
            slots.remove(at);
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        // Checked again under the lock: a concurrent register may have refilled it.
        self.users.remove_if(&user, |_, slots| slots.is_empty());
    }

    /// `users` must be distinct (a user named twice gets the frame twice):
    /// plugin audiences are deduplicated when parsed, member lists are
    /// distinct by the table's key.
    pub(crate) fn deliver(&self, users: &[UserId], frame: &Arc<ClientFrame>) -> Delivered {
        let mut done = Delivered::default();
        for user in users {
            if let Some(slots) = self.users.get(user) {
                for slot in slots.iter() {
                    done.add(slot.queue.push(frame));
                }
            }
        }
        done
    }

    /// [`deliver`](Self::deliver) to the members of a channel, walking
    /// whichever side is smaller: the member list, or the open sessions
    /// filtered by `is_member` (a big channel is mostly offline members,
    /// and they should cost nothing).
    pub(crate) fn deliver_members(
        &self,
        members: &[UserId],
        is_member: impl Fn(&UserId) -> bool,
        frame: &Arc<ClientFrame>,
    ) -> Delivered {
        if self.count() >= members.len() {
            return self.deliver(members, frame);
        }
        let mut done = Delivered::default();
        for entry in self.users.iter() {
            if is_member(entry.key()) {
                for slot in entry.value() {
                    done.add(slot.queue.push(frame));
                }
            }
        }
        done
    }

    pub(crate) fn deliver_all(&self, frame: &Arc<ClientFrame>) -> Delivered {
        let mut done = Delivered::default();
        for entry in self.users.iter() {
            for slot in entry.value() {
                done.add(slot.queue.push(frame));
            }
        }
        done
    }

    pub(crate) fn online(&self, users: &[UserId]) -> Vec<UserId> {
        let mut seen = HashSet::with_capacity(users.len());
        users
            .iter()
            .copied()
            .filter(|u| self.users.get(u).is_some_and(|s| !s.is_empty()))
            .filter(|u| seen.insert(*u))
            .collect()
    }

    /// Tells `user`'s sessions whose token was issued at or before
    /// `revoked_at` to close with 4004; returns how many.
    pub(crate) fn revoke(&self, user: UserId, revoked_at: u64) -> usize {
        let Some(slots) = self.users.get(&user) else {
            return 0;
        };
        let mut closed = 0;
        for slot in slots
            .iter()
            .filter(|s| crate::revoke::is_revoked(s.issued_at, Some(revoked_at)))
        {
            slot.queue.close(REVOKED);
            closed += 1;
        }
        closed
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn user_count(&self, user: UserId) -> usize {
        self.users.get(&user).map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::IdGen;

    fn slot(ids: &IdGen) -> Arc<Slot> {
        issued(ids, 0)
    }

    fn issued(ids: &IdGen, issued_at: u64) -> Arc<Slot> {
        Arc::new(Slot {
            id: ids.next(),
            queue: Queue::new(8),
            issued_at,
        })
    }

    fn user(n: u64) -> UserId {
        UserId::new(n).unwrap()
    }

    #[test]
    fn limit_is_exact_under_concurrent_registers() {
        let registry = Arc::new(Registry::default());
        let ids = Arc::new(IdGen::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (registry, ids, accepted) = (registry.clone(), ids.clone(), accepted.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if registry
                            .register(user(1), slot(&ids), 5, OnLimit::Reject)
                            .is_ok()
                        {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 5);
        assert_eq!(registry.user_count(user(1)), 5);
        assert_eq!(registry.count(), 5);
    }

    #[test]
    fn concurrent_register_and_unregister_balance_out() {
        let registry = Arc::new(Registry::default());
        let ids = Arc::new(IdGen::new(0));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (registry, ids) = (registry.clone(), ids.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let u = user(1 + (t + i) % 3);
                        let s = slot(&ids);
                        let id = s.id;
                        if registry.register(u, s, 4, OnLimit::EvictOldest).is_ok() {
                            registry.unregister(u, id);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(registry.count(), 0);
        assert!(registry.users.is_empty(), "empty users are removed");
    }

    #[test]
    fn evict_oldest_replaces_the_first_session() {
        let registry = Registry::default();
        let ids = IdGen::new(0);
        let first = slot(&ids);
        registry
            .register(user(1), first.clone(), 2, OnLimit::EvictOldest)
            .unwrap();
        registry
            .register(user(1), slot(&ids), 2, OnLimit::EvictOldest)
            .unwrap();
        let evicted = registry
            .register(user(1), slot(&ids), 2, OnLimit::EvictOldest)
            .unwrap()
            .unwrap();
        assert_eq!(evicted.id, first.id);
        assert_eq!(first.queue.close_code(), Some(REPLACED));
        assert_eq!(registry.user_count(user(1)), 2);
        assert_eq!(registry.count(), 2);
        // Its task unregistering later is a no-op.
        registry.unregister(user(1), first.id);
        assert_eq!(registry.count(), 2);
    }

    #[test]
    fn deliver_counts_sessions() {
        let registry = Registry::default();
        let ids = IdGen::new(0);
        for u in [1, 1, 2] {
            registry
                .register(user(u), slot(&ids), 5, OnLimit::Reject)
                .unwrap();
        }
        let frame = Arc::new(ClientFrame::new("E", "{}"));
        let done = registry.deliver(&[user(1), user(3), user(2)], &frame);
        assert_eq!(done.reached, 3);
        assert_eq!(registry.deliver(&[user(2)], &frame).reached, 1);
        assert_eq!(registry.deliver_all(&frame).reached, 3);
        assert_eq!(
            registry.online(&[user(3), user(2), user(1), user(2)]),
            vec![user(2), user(1)]
        );
    }

    #[test]
    fn deliver_members_reaches_the_same_sessions_from_either_side() {
        let registry = Registry::default();
        let ids = IdGen::new(0);
        // Users 1..=6 online (user 2 twice); members are even users up to 400.
        let slots: Vec<(u64, Arc<Slot>)> = [1, 2, 2, 3, 4, 5, 6]
            .into_iter()
            .map(|u| (u, slot(&ids)))
            .collect();
        for (u, s) in &slots {
            registry
                .register(user(*u), s.clone(), 5, OnLimit::Reject)
                .unwrap();
        }
        let frame = Arc::new(ClientFrame::new("E", "{}"));
        let is_member = |u: &UserId| u.get() % 2 == 0;
        // More members than sessions: walks the sessions.
        let many: Vec<UserId> = (1..=200).map(|n| user(2 * n)).collect();
        assert_eq!(
            registry.deliver_members(&many, is_member, &frame).reached,
            4
        );
        // Fewer members than sessions: walks the members.
        let few = [user(2), user(4)];
        assert_eq!(registry.deliver_members(&few, is_member, &frame).reached, 3);
        for (u, s) in &slots {
            let expected = match u {
                2 | 4 => 2,
                6 => 1,
                _ => 0,
            };
            assert_eq!(s.queue.len(), expected, "user {u}");
        }
    }

    #[test]
    fn revoke_closes_only_tokens_issued_up_to_the_cut_off() {
        let registry = Registry::default();
        let ids = IdGen::new(0);
        let (old, same, newer, other) = (
            issued(&ids, 99),
            issued(&ids, 100),
            issued(&ids, 101),
            issued(&ids, 50),
        );
        for s in [&old, &same, &newer] {
            registry
                .register(user(1), s.clone(), 5, OnLimit::Reject)
                .unwrap();
        }
        registry
            .register(user(2), other.clone(), 5, OnLimit::Reject)
            .unwrap();
        assert_eq!(registry.revoke(user(1), 100), 2);
        assert_eq!(old.queue.close_code(), Some(REVOKED));
        assert_eq!(same.queue.close_code(), Some(REVOKED));
        assert_eq!(newer.queue.close_code(), None);
        assert_eq!(other.queue.close_code(), None);
        assert_eq!(registry.revoke(user(3), 100), 0);
    }
}
