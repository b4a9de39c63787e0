//! The session registry: user id → that user's sessions, oldest first,
//! attached or detached (waiting for a resume). The one place that counts
//! attached sessions per user, so the limit check and the insert (or the
//! resume) happen under one shard lock and stay exact under concurrent
//! connects.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::BoxFuture;

use super::frame::ClientFrame;
use super::ledger::SlotTag;
use super::queue::{Epoch, Pushed, Queue, REPLACED, REVOKED};
use super::resume::{Refused, SessionId};
use crate::config::OnLimit;
use crate::ids::{IdHash, UserId};

/// How long a session attached by a resume can't be taken over by another
/// resume: of many resumes of one id at once, the first wins and the
/// others get new sessions (`unknown_session`). A session attached by a
/// plain connect can always be taken over (its socket may be a zombie).
pub(crate) const RESUME_CONTENTION: Duration = Duration::from_secs(5);

/// A session as the delivering side sees it; outlives its connections.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) id: SessionId,
    pub(crate) queue: Queue,
    /// The token's issued-at (unix seconds): a revocation closes only
    /// sessions whose token it covers. A resume brings a new token.
    pub(crate) issued_at: AtomicU64,
}

impl Slot {
    pub(crate) fn new(queue: Queue, issued_at: u64) -> Slot {
        Slot {
            id: SessionId::random(),
            queue,
            issued_at: AtomicU64::new(issued_at),
        }
    }
}

/// A user's session in the registry.
#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    attached: bool,
    /// When a resume last attached it (`None`: a plain connect did).
    resumed_at: Option<Instant>,
}

/// `register` or `resume` refused: the user is at `max_per_user` and the
/// policy is reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session limit reached")]
pub(crate) struct LimitReached;

/// Why a connect got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// The user is at `max_per_user` and the policy is reject (4010).
    Limit,
    /// Cluster mode can't count the user's sessions now (NATS cut off,
    /// or this node's lease lost): refused rather than over-admitted.
    Unavailable,
}

impl From<LimitReached> for NoSlot {
    fn from(_: LimitReached) -> NoSlot {
        NoSlot::Limit
    }
}

/// Why a resume didn't attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResumeFailed {
    /// A new session instead, for this reason.
    Refused(Refused),
    /// The session exists but got no slot (4010, like a new connect, or
    /// the cluster can't count now); it stays detached.
    NoSlot(NoSlot),
}

/// A resume that attached: the session, the connection's epoch, the
/// frames its replay holds, and a session evicted for room (4011).
#[derive(Debug)]
pub(crate) struct Resumed {
    pub(crate) slot: Arc<Slot>,
    pub(crate) epoch: Epoch,
    pub(crate) replayed: u64,
}

/// What a connection's end did to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// Ended for good.
    Ended,
    /// Kept for a resume within the window.
    Detached,
    /// A resume had already taken it over: nothing to do.
    TakenOver,
}

/// What one `deliver` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) reached: usize,
    pub(crate) overflowed: usize,
}

impl Delivered {
    /// Logs `frame` for `slot` and counts it.
    fn add(&mut self, slot: &Arc<Slot>, frame: &Arc<ClientFrame>, owed: &mut Vec<Arc<Slot>>) {
        let (pushed, owe) = slot.queue.push_owing(frame);
        if owe {
            owed.push(slot.clone());
        }
        match pushed {
            Pushed::Queued => self.reached += 1,
            Pushed::Overflowed => self.overflowed += 1,
            Pushed::Closing => {}
        }
    }
}

/// Counting and limiting a user's sessions (DESIGN §2: `max_per_user`,
/// `on_limit`, resume). The local registry is the single-node
/// implementation; cluster mode puts a cluster-wide count in front of it
/// (`ledger::Ledgered`), hence the futures.
pub(crate) trait Admission: Send + Sync {
    /// Registers `slot` for `user` within `max` attached sessions; with
    /// `EvictOldest`, returns the evicted session (already told to close).
    fn admit(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<Arc<Slot>>, NoSlot>>;
    /// Attaches a new connection to `user`'s session `id` from `seq`,
    /// taking a slot like a new connect (none if it takes over a zombie).
    fn resume(
        &self,
        user: UserId,
        id: SessionId,
        seq: u64,
        issued_at: u64,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Resumed, ResumeFailed>>;
    /// Frees the connection's place; with `resumable`, the session stays
    /// for a resume until `expires`, else it ends.
    fn release(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        epoch: Epoch,
        resumable: Option<Instant>,
    ) -> BoxFuture<'_, Released>;
}

impl Admission for Registry {
    fn admit(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> BoxFuture<'_, Result<Option<Arc<Slot>>, NoSlot>> {
        Box::pin(std::future::ready(
            self.register(user, slot, max, on_limit)
                .map_err(NoSlot::from),
        ))
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
        Box::pin(std::future::ready(
            self.attach(user, id, seq, issued_at, max, on_limit),
        ))
    }

    fn release(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        epoch: Epoch,
        resumable: Option<Instant>,
    ) -> BoxFuture<'_, Released> {
        Box::pin(std::future::ready(
            self.leave(user, &slot, epoch, resumable),
        ))
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    /// Sharded locks: fan-out to different users doesn't contend, and a
    /// user's check-then-insert is atomic under its shard's write lock.
    users: DashMap<UserId, Vec<Entry>, IdHash>,
    /// Attached sessions.
    count: AtomicUsize,
    detached: AtomicUsize,
    /// Detached sessions by expiry, oldest first (one window for all, so
    /// appending keeps the order); entries a resume or an end made stale
    /// are skipped by [`sweep`](Self::sweep). Only detach and the sweeper
    /// touch it.
    expiries: Mutex<VecDeque<(Instant, UserId, SessionId, Epoch)>>,
    /// Most detached sessions kept per user (`max_per_user`): dropping
    /// connections can't pile up buffers; beyond it the oldest ends.
    max_detached: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(usize::MAX)
    }
}

impl Registry {
    pub(crate) fn new(max_detached: usize) -> Registry {
        Registry {
            users: DashMap::default(),
            count: AtomicUsize::new(0),
            detached: AtomicUsize::new(0),
            expiries: Mutex::new(VecDeque::new()),
            max_detached,
        }
    }

    /// Makes room for one more attached session of a user with `slots`;
    /// with `EvictOldest`, the oldest attached one is removed and told to
    /// close with 4011.
    fn make_room(
        &self,
        slots: &mut Vec<Entry>,
        max: usize,
        on_limit: OnLimit,
    ) -> Result<Option<Arc<Slot>>, LimitReached> {
        if slots.iter().filter(|e| e.attached).count() < max {
            return Ok(None);
        }
        match on_limit {
            OnLimit::Reject => Err(LimitReached),
            OnLimit::EvictOldest => {
                let Some(at) = slots.iter().position(|e| e.attached) else {
                    return Err(LimitReached);
                };
                let oldest = slots.remove(at).slot;
                oldest.queue.close(REPLACED);
                oldest.queue.end();
                self.count.fetch_sub(1, Ordering::Relaxed);
                Ok(Some(oldest))
            }
        }
    }

    /// Adds a session for `user` within `max` attached sessions.
    pub(crate) fn register(
        &self,
        user: UserId,
        slot: Arc<Slot>,
        max: usize,
        on_limit: OnLimit,
    ) -> Result<Option<Arc<Slot>>, LimitReached> {
        let mut slots = self.users.entry(user).or_default();
        let evicted = self.make_room(&mut slots, max, on_limit)?;
        slots.push(Entry {
            slot,
            attached: true,
            resumed_at: None,
        });
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(evicted)
    }

    /// A resume of `user`'s session `id` after `seq`. Checked in an order
    /// that never disturbs the session on a refusal: it exists and is this
    /// user's, no other resume of it just won, `seq` can be served, there
    /// is a slot; only then is it attached (any zombie told 4011).
    pub(crate) fn attach(
        &self,
        user: UserId,
        id: SessionId,
        seq: u64,
        issued_at: u64,
        max: usize,
        on_limit: OnLimit,
    ) -> Result<Resumed, ResumeFailed> {
        let unknown = ResumeFailed::Refused(Refused::UnknownSession);
        let mut slots = self.users.get_mut(&user).ok_or(unknown)?;
        let at = slots.iter().position(|e| e.slot.id == id).ok_or(unknown)?;
        let entry = &slots[at];
        if entry.attached
            && entry
                .resumed_at
                .is_some_and(|t| t.elapsed() < RESUME_CONTENTION)
        {
            return Err(unknown);
        }
        entry
            .slot
            .queue
            .can_resume(seq)
            .map_err(ResumeFailed::Refused)?;
        let was_attached = entry.attached;
        let slot = entry.slot.clone();
        if !was_attached {
            self.make_room(&mut slots, max, on_limit)
                .map_err(|LimitReached| ResumeFailed::NoSlot(NoSlot::Limit))?;
        }
        // `make_room` may have removed an earlier entry: find it again.
        let entry = slots.iter_mut().find(|e| e.slot.id == id).ok_or(unknown)?;
        entry.attached = true;
        entry.resumed_at = Some(Instant::now());
        if !was_attached {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.detached.fetch_sub(1, Ordering::Relaxed);
        }
        slot.issued_at.store(issued_at, Ordering::Relaxed);
        let (epoch, replayed) = slot.queue.attach(seq);
        Ok(Resumed {
            slot,
            epoch,
            replayed,
        })
    }

    /// A connection's end: nothing if a resume took the session over,
    /// else the session detaches (`resumable`: until that instant) or ends.
    pub(crate) fn leave(
        &self,
        user: UserId,
        slot: &Arc<Slot>,
        epoch: Epoch,
        resumable: Option<Instant>,
    ) -> Released {
        let Some(mut slots) = self.users.get_mut(&user) else {
            slot.queue.end();
            return Released::Ended;
        };
        // Compared under the user's lock, which every resume holds too.
        if slot.queue.epoch() != epoch {
            return Released::TakenOver;
        }
        let Some(at) = slots.iter().position(|e| e.slot.id == slot.id) else {
            // Evicted (4011) or revoked while detached: already gone.
            slot.queue.end();
            return Released::Ended;
        };
        self.count.fetch_sub(1, Ordering::Relaxed);
        let released = match resumable {
            Some(expires) => {
                slots[at].attached = false;
                slot.queue.detach();
                self.detached.fetch_add(1, Ordering::Relaxed);
                self.expiries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((expires, user, slot.id, epoch));
                let detached: Vec<usize> =
                    (0..slots.len()).filter(|&i| !slots[i].attached).collect();
                if detached.len() > self.max_detached {
                    self.drop_detached(&mut slots, detached[0]);
                }
                Released::Detached
            }
            None => {
                slots.remove(at);
                slot.queue.end();
                Released::Ended
            }
        };
        drop(slots);
        // Checked again under the lock: a concurrent register may have refilled it.
        self.users.remove_if(&user, |_, slots| slots.is_empty());
        released
    }

    /// Ends the detached session at `at`.
    fn drop_detached(&self, slots: &mut Vec<Entry>, at: usize) {
        let entry = slots.remove(at);
        entry.slot.queue.end();
        self.detached.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ends the detached sessions whose window closed by `now`; returns how many.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let due: Vec<_> = {
            let mut expiries = self.expiries.lock().unwrap_or_else(|p| p.into_inner());
            let n = expiries.partition_point(|(at, ..)| *at <= now);
            expiries.drain(..n).collect()
        };
        let mut ended = 0;
        for (_, user, id, epoch) in due {
            if let Some(mut slots) = self.users.get_mut(&user) {
                let at = slots
                    .iter()
                    .position(|e| e.slot.id == id && !e.attached && e.slot.queue.epoch() == epoch);
                if let Some(at) = at {
                    self.drop_detached(&mut slots, at);
                    ended += 1;
                }
            }
            self.users.remove_if(&user, |_, slots| slots.is_empty());
        }
        ended
    }

    /// `users` must be distinct (a user named twice gets the frame twice):
    /// plugin audiences are deduplicated when parsed, member lists are
    /// distinct by the table's key. Detached sessions are recipients too.
    /// Sessions reached are added to `owed` unless already there: their
    /// wake-up is the caller's to pay (see [`super::wakes`]).
    pub(crate) fn deliver(
        &self,
        users: &[UserId],
        frame: &Arc<ClientFrame>,
        owed: &mut Vec<Arc<Slot>>,
    ) -> Delivered {
        let mut done = Delivered::default();
        for user in users {
            if let Some(slots) = self.users.get(user) {
                for entry in slots.iter() {
                    done.add(&entry.slot, frame, owed);
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
        owed: &mut Vec<Arc<Slot>>,
    ) -> Delivered {
        // Detached sessions are recipients too.
        if self.count() + self.detached() >= members.len() {
            return self.deliver(members, frame, owed);
        }
        self.deliver_where(is_member, frame, owed)
    }

    pub(crate) fn deliver_all(
        &self,
        frame: &Arc<ClientFrame>,
        owed: &mut Vec<Arc<Slot>>,
    ) -> Delivered {
        self.deliver_where(|_| true, frame, owed)
    }

    /// Every registered user's sessions that `wanted` picks, by walking
    /// the whole map.
    fn deliver_where(
        &self,
        wanted: impl Fn(&UserId) -> bool,
        frame: &Arc<ClientFrame>,
        owed: &mut Vec<Arc<Slot>>,
    ) -> Delivered {
        let mut done = Delivered::default();
        // The walk allocates a guard per shard; an empty map (the session
        // counts may lag its entries, so they can't say) costs none.
        if self.users.is_empty() {
            return done;
        }
        for user in self.users.iter() {
            if wanted(user.key()) {
                for e in user.value() {
                    done.add(&e.slot, frame, owed);
                }
            }
        }
        done
    }

    /// Users with a connection attached (a detached session still
    /// receives, but nobody is there to see it).
    pub(crate) fn online(&self, users: &[UserId]) -> Vec<UserId> {
        let mut seen = HashSet::with_capacity(users.len());
        users
            .iter()
            .copied()
            .filter(|u| {
                self.users
                    .get(u)
                    .is_some_and(|s| s.iter().any(|e| e.attached))
            })
            .filter(|u| seen.insert(*u))
            .collect()
    }

    /// Tells `user`'s attached sessions whose token was issued at or
    /// before `revoked_at` to close with 4004 and ends such detached ones;
    /// returns how many.
    pub(crate) fn revoke(&self, user: UserId, revoked_at: u64) -> usize {
        let Some(mut slots) = self.users.get_mut(&user) else {
            return 0;
        };
        let mut closed = 0;
        let mut at = 0;
        while at < slots.len() {
            let entry = &slots[at];
            let issued_at = entry.slot.issued_at.load(Ordering::Relaxed);
            if !crate::revoke::is_revoked(issued_at, Some(revoked_at)) {
                at += 1;
                continue;
            }
            closed += 1;
            if entry.attached {
                entry.slot.queue.close(REVOKED);
                at += 1;
            } else {
                self.drop_detached(&mut slots, at);
            }
        }
        drop(slots);
        self.users.remove_if(&user, |_, slots| slots.is_empty());
        closed
    }

    /// Closes `user`'s attached session named `tag` with 4011 (another
    /// node admitted a newer one under `evict_oldest`); whether it was here.
    pub(crate) fn evict(&self, user: UserId, tag: SlotTag) -> bool {
        let Some(mut slots) = self.users.get_mut(&user) else {
            return false;
        };
        let Some(at) = slots
            .iter()
            .position(|e| e.attached && e.slot.id.tag() == tag)
        else {
            return false;
        };
        let evicted = slots.remove(at).slot;
        evicted.queue.close(REPLACED);
        evicted.queue.end();
        self.count.fetch_sub(1, Ordering::Relaxed);
        drop(slots);
        self.users.remove_if(&user, |_, slots| slots.is_empty());
        true
    }

    /// Tells every attached session to close with `code` and ends every
    /// session, detached ones too; returns how many were attached.
    pub(crate) fn close_all(&self, code: u16) -> usize {
        let mut closed = 0;
        for mut slots in self.users.iter_mut() {
            let mut at = 0;
            while at < slots.len() {
                if slots[at].attached {
                    slots[at].slot.queue.close(code);
                    // Ended at once, not when its task gets to it, so no
                    // resume can take the session over in between.
                    slots[at].slot.queue.end();
                    closed += 1;
                    at += 1;
                } else {
                    self.drop_detached(&mut slots, at);
                }
            }
        }
        closed
    }

    /// Attached sessions.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Detached sessions waiting for a resume.
    pub(crate) fn detached(&self) -> usize {
        self.detached.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn user_count(&self, user: UserId) -> usize {
        self.users
            .get(&user)
            .map_or(0, |s| s.iter().filter(|e| e.attached).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;

    fn slot() -> Arc<Slot> {
        issued(0)
    }

    fn issued(issued_at: u64) -> Arc<Slot> {
        Arc::new(Slot::new(Queue::new(8, 8, Gauge::default()), issued_at))
    }

    fn unregister(registry: &Registry, user: UserId, slot: &Arc<Slot>) {
        registry.leave(user, slot, 0, None);
    }

    fn user(n: u64) -> UserId {
        UserId::new(n).unwrap()
    }

    #[test]
    fn limit_is_exact_under_concurrent_registers() {
        let registry = Arc::new(Registry::default());
        let accepted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (registry, accepted) = (registry.clone(), accepted.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if registry
                            .register(user(1), slot(), 5, OnLimit::Reject)
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
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let registry = registry.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let u = user(1 + (t + i) % 3);
                        let s = slot();
                        if registry
                            .register(u, s.clone(), 4, OnLimit::EvictOldest)
                            .is_ok()
                        {
                            unregister(&registry, u, &s);
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
    fn close_all_ends_sessions_before_their_tasks_notice() {
        let registry = Registry::default();
        let attached = slot();
        let detached = slot();
        for s in [&attached, &detached] {
            registry
                .register(user(1), s.clone(), 5, OnLimit::Reject)
                .unwrap();
        }
        registry.deliver(
            &[user(1)],
            &Arc::new(ClientFrame::new("E", "{}")),
            &mut Vec::new(),
        );
        attached.queue.pop(0, |s, _| s).unwrap();
        registry.leave(
            user(1),
            &detached,
            0,
            Some(Instant::now() + Duration::from_secs(60)),
        );
        assert_eq!(registry.close_all(4000), 1);
        assert_eq!(attached.queue.close_code(0), Some(4000));
        // Its task has not ended it yet, but no resume can take it over.
        let refused = registry
            .attach(user(1), attached.id, 1, 0, 5, OnLimit::Reject)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused, ResumeFailed::Refused(Refused::UnknownSession));
        assert_eq!(registry.detached(), 0);
        assert_eq!(
            registry
                .deliver(
                    &[user(1)],
                    &Arc::new(ClientFrame::new("E", "{}")),
                    &mut Vec::new()
                )
                .reached,
            0
        );
    }

    #[test]
    fn evict_oldest_replaces_the_first_session() {
        let registry = Registry::default();
        let first = slot();
        registry
            .register(user(1), first.clone(), 2, OnLimit::EvictOldest)
            .unwrap();
        registry
            .register(user(1), slot(), 2, OnLimit::EvictOldest)
            .unwrap();
        let evicted = registry
            .register(user(1), slot(), 2, OnLimit::EvictOldest)
            .unwrap()
            .unwrap();
        assert_eq!(evicted.id, first.id);
        assert_eq!(first.queue.close_code(0), Some(REPLACED));
        assert_eq!(registry.user_count(user(1)), 2);
        assert_eq!(registry.count(), 2);
        // Its task unregistering later is a no-op.
        unregister(&registry, user(1), &first);
        assert_eq!(registry.count(), 2);
    }

    #[test]
    fn deliver_counts_sessions() {
        let registry = Registry::default();
        for u in [1, 1, 2] {
            registry
                .register(user(u), slot(), 5, OnLimit::Reject)
                .unwrap();
        }
        let frame = Arc::new(ClientFrame::new("E", "{}"));
        let mut owed = Vec::new();
        let done = registry.deliver(&[user(1), user(3), user(2)], &frame, &mut owed);
        assert_eq!(done.reached, 3);
        assert_eq!(owed.len(), 3);
        // Already owed a wake-up: not owed a second.
        assert_eq!(registry.deliver(&[user(2)], &frame, &mut owed).reached, 1);
        assert_eq!(owed.len(), 3);
        // Once paid, the next frame owes one again.
        for slot in owed.drain(..) {
            slot.queue.pay();
        }
        assert_eq!(registry.deliver_all(&frame, &mut owed).reached, 3);
        assert_eq!(owed.len(), 3);
        assert_eq!(
            registry.online(&[user(3), user(2), user(1), user(2)]),
            vec![user(2), user(1)]
        );
    }

    #[test]
    fn deliver_members_reaches_the_same_sessions_from_either_side() {
        let registry = Registry::default();
        // Users 1..=6 online (user 2 twice); members are even users up to 400.
        let slots: Vec<(u64, Arc<Slot>)> = [1, 2, 2, 3, 4, 5, 6]
            .into_iter()
            .map(|u| (u, slot()))
            .collect();
        for (u, s) in &slots {
            registry
                .register(user(*u), s.clone(), 5, OnLimit::Reject)
                .unwrap();
        }
        let frame = Arc::new(ClientFrame::new("E", "{}"));
        let is_member = |u: &UserId| u.get().is_multiple_of(2);
        // More members than sessions: walks the sessions.
        let many: Vec<UserId> = (1..=200).map(|n| user(2 * n)).collect();
        assert_eq!(
            registry
                .deliver_members(&many, is_member, &frame, &mut Vec::new())
                .reached,
            4
        );
        // Fewer members than sessions: walks the members.
        let few = [user(2), user(4)];
        assert_eq!(
            registry
                .deliver_members(&few, is_member, &frame, &mut Vec::new())
                .reached,
            3
        );
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
        let (old, same, newer, other) = (issued(99), issued(100), issued(101), issued(50));
        for s in [&old, &same, &newer] {
            registry
                .register(user(1), s.clone(), 5, OnLimit::Reject)
                .unwrap();
        }
        registry
            .register(user(2), other.clone(), 5, OnLimit::Reject)
            .unwrap();
        assert_eq!(registry.revoke(user(1), 100), 2);
        assert_eq!(old.queue.close_code(0), Some(REVOKED));
        assert_eq!(same.queue.close_code(0), Some(REVOKED));
        assert_eq!(newer.queue.close_code(0), None);
        assert_eq!(other.queue.close_code(0), None);
        assert_eq!(registry.revoke(user(3), 100), 0);
    }

    #[test]
    fn detach_resume_and_expiry() {
        let registry = Registry::new(1);
        let a = slot();
        registry
            .register(user(1), a.clone(), 1, OnLimit::Reject)
            .unwrap();
        a.queue.push(&Arc::new(ClientFrame::new("E", "{}")));
        let now = Instant::now();
        let window = now + Duration::from_secs(60);
        assert_eq!(
            registry.leave(user(1), &a, 0, Some(window)),
            Released::Detached
        );
        assert_eq!((registry.count(), registry.detached()), (0, 1));
        assert!(registry.online(&[user(1)]).is_empty());
        // Detached: still a recipient, and not counted against the limit.
        assert_eq!(
            registry
                .deliver(
                    &[user(1)],
                    &Arc::new(ClientFrame::new("E", "{}")),
                    &mut Vec::new()
                )
                .reached,
            1
        );
        let b = slot();
        registry
            .register(user(1), b.clone(), 1, OnLimit::Reject)
            .unwrap();
        // Another user's id, a seq never written, no free slot: all leave it be.
        let refused = |r: Result<Resumed, ResumeFailed>| r.map(|_| ()).unwrap_err();
        assert_eq!(
            refused(registry.attach(user(2), a.id, 0, 0, 1, OnLimit::Reject)),
            ResumeFailed::Refused(Refused::UnknownSession)
        );
        assert_eq!(
            refused(registry.attach(user(1), a.id, 3, 0, 1, OnLimit::Reject)),
            ResumeFailed::Refused(Refused::UnknownSession)
        );
        assert_eq!(
            refused(registry.attach(user(1), a.id, 0, 0, 1, OnLimit::Reject)),
            ResumeFailed::NoSlot(NoSlot::Limit)
        );
        registry.leave(user(1), &b, 0, None);
        let resumed = registry
            .attach(user(1), a.id, 0, 7, 1, OnLimit::Reject)
            .unwrap();
        assert_eq!((resumed.epoch, resumed.replayed), (1, 2));
        assert_eq!(a.issued_at.load(Ordering::Relaxed), 7);
        assert_eq!((registry.count(), registry.detached()), (1, 0));
        // A second resume moments later loses; the winner is undisturbed.
        assert_eq!(
            refused(registry.attach(user(1), a.id, 0, 0, 1, OnLimit::Reject)),
            ResumeFailed::Refused(Refused::UnknownSession)
        );
        // The old connection's end is a no-op.
        assert_eq!(registry.leave(user(1), &a, 0, None), Released::TakenOver);
        // Its stale expiry doesn't end the resumed session; a new one does.
        assert_eq!(registry.sweep(window), 0);
        assert_eq!(
            registry.leave(user(1), &a, 1, Some(window)),
            Released::Detached
        );
        assert_eq!(registry.sweep(now), 0);
        assert_eq!(registry.sweep(window), 1);
        assert_eq!(registry.detached(), 0);
        assert!(registry.users.is_empty());
    }
}
