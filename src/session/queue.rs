//! One session's frames: a bounded log shared by the delivering side
//! (which never waits) and the connection attached to the session (which
//! drains it). The log is also the resume buffer: each frame gets its `s`
//! when it enters, under the one lock, so a resume's replay and the live
//! frames after it are one sequence with no seam to get wrong.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use super::frame::ClientFrame;
use super::resume::Refused;

/// Why a session was told to close from outside its task.
pub(crate) const SLOW_CONSUMER: u16 = 4009;
pub(crate) const REPLACED: u16 = 4011;
/// The session's token was revoked (or expired) while it was open.
pub(crate) const REVOKED: u16 = 4004;

/// What [`Queue::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Logged: the attached connection will write it, or a resume replay it.
    Queued,
    /// This push overflowed the outbound queue: the connection is now
    /// closing with 4009 (the frame stays in the resume buffer).
    Overflowed,
    /// The session ended for good; the frame was dropped.
    Closing,
}

/// One connection's turn at the session: a resume starts a new one, and a
/// task whose attachment is no longer current has been taken over.
pub(crate) type Epoch = u32;

#[derive(Debug)]
struct State {
    /// Frames `first ..= last` in order: those already written (kept for a
    /// resume: the client may not have read them) then those waiting.
    /// Grows on demand; an idle session holds no buffer.
    log: VecDeque<Arc<ClientFrame>>,
    /// `s` of `log[0]` (`last + 1` when the log is empty).
    first: u64,
    /// `s` of the last frame the attached connection took.
    written: u64,
    /// Frames up to this `s` are a resume's replay: they don't count
    /// against the outbound queue bound.
    replay_end: u64,
    epoch: Epoch,
    /// A connection is attached (it may be closing).
    attached: bool,
    /// Set once per attachment; that connection closes with this code.
    close: Option<u16>,
    /// The session ended for good: frames are dropped.
    ended: bool,
}

impl State {
    fn last(&self) -> u64 {
        self.first + self.log.len() as u64 - 1
    }

    /// A connection is taking frames (attached and not closing).
    fn writing(&self) -> bool {
        self.attached && self.close.is_none()
    }

    /// Drops the oldest frames beyond `keep`: only written ones while a
    /// connection is taking frames (the outbound bound holds the rest),
    /// any otherwise (a detached session keeps the newest `keep`).
    fn trim(&mut self, keep: usize) {
        let writing = self.writing();
        while self.log.len() > keep && (!writing || self.first <= self.written) {
            self.log.pop_front();
            self.first += 1;
        }
    }
}

/// The session's log plus its close request, behind a std mutex held only
/// for a push, a pop or a state change (never across an await). Lighter
/// than a tokio channel, which matters at tens of thousands of sessions.
#[derive(Debug)]
pub(crate) struct Queue {
    state: Mutex<State>,
    /// Wakes the attached task for new frames or a close request. A
    /// `notify_one` with no waiter leaves a permit, so no wake-up is lost;
    /// a takeover also wakes every waiter (the old task and the new).
    wake: Notify,
    /// A fan-out logged a frame and owes this queue a wake-up, which
    /// [`super::wakes::Wakes`] will pay: set once per payment, so a
    /// session gets one wake-up however many events reached it meanwhile.
    owed: AtomicBool,
    /// Frames waiting for the writer before 4009 (`outbound_queue`).
    capacity: usize,
    /// Frames kept for a resume (`resume_buffer`).
    keep: usize,
    /// `otako_resume_buffer_bytes`: what the logs' slots take.
    bytes: Gauge,
}

/// Bytes one log slot takes (a reference; the frame itself is shared).
const SLOT: usize = std::mem::size_of::<Arc<ClientFrame>>();

impl Queue {
    pub(crate) fn new(capacity: usize, keep: usize, bytes: Gauge) -> Self {
        Queue {
            state: Mutex::new(State {
                log: VecDeque::new(),
                first: 1,
                written: 0,
                replay_end: 0,
                epoch: 0,
                attached: true,
                close: None,
                ended: false,
            }),
            wake: Notify::new(),
            owed: AtomicBool::new(false),
            capacity,
            keep,
            bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can't leave the state inconsistent
        // (every critical section is a single step), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change` and accounts for any change in the log's capacity.
    fn with<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let before = state.log.capacity();
        let out = change(&mut state);
        let after = state.log.capacity();
        if after != before {
            self.bytes
                .inc_by((after as i64 - before as i64) * SLOT as i64);
        }
        out
    }

    /// Logs a frame (its `s` is the next one) without waiting and wakes
    /// the attached connection. Too many frames waiting for it turn into a
    /// 4009 close request; the log itself keeps the newest `resume_buffer`.
    #[cfg(test)]
    pub(crate) fn push(&self, frame: &Arc<ClientFrame>) -> Pushed {
        let pushed = self.log(frame);
        if pushed != Pushed::Closing {
            self.wake.notify_one();
        }
        pushed
    }

    /// Logs a frame for a fan-out, which wakes its recipients later and
    /// once (see [`super::wakes`]) instead of now: also says whether this
    /// queue must be listed as owed a wake-up (it is not listed already).
    pub(crate) fn push_owing(&self, frame: &Arc<ClientFrame>) -> (Pushed, bool) {
        let pushed = self.log(frame);
        // AcqRel pairs with `pay`'s swap: whoever pays sees this frame.
        let owe = pushed != Pushed::Closing && !self.owed.swap(true, Ordering::AcqRel);
        (pushed, owe)
    }

    /// Pays the wake-up a fan-out owes: later pushes owe a new one.
    pub(crate) fn pay(&self) {
        self.owed.swap(false, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn log(&self, frame: &Arc<ClientFrame>) -> Pushed {
        self.with(|state| {
            if state.ended {
                return Pushed::Closing;
            }
            // Room first, so the log's capacity stops at `keep`.
            state.trim(self.keep.saturating_sub(1));
            state.log.push_back(frame.clone());
            let mut pushed = Pushed::Queued;
            let waiting = state.last() - state.written.max(state.replay_end);
            if state.writing() && waiting > self.capacity as u64 {
                state.close = Some(SLOW_CONSUMER);
                pushed = Pushed::Overflowed;
            }
            state.trim(self.keep);
            pushed
        })
    }

    /// Asks the attached connection to close with `code` unless it
    /// already is closing.
    pub(crate) fn close(&self, code: u16) {
        self.with(|state| {
            if state.close.is_none() {
                state.close = Some(code);
            }
            state.trim(self.keep);
        });
        self.wake.notify_one();
    }

    /// The close code for the connection holding `epoch`: 4011 once a
    /// resume took the session over.
    pub(crate) fn close_code(&self, epoch: Epoch) -> Option<u16> {
        let state = self.lock();
        if state.epoch != epoch {
            return Some(REPLACED);
        }
        state.close
    }

    pub(crate) fn epoch(&self) -> Epoch {
        self.lock().epoch
    }

    /// Frames waiting to be written.
    pub(crate) fn pending(&self) -> u64 {
        self.with(|state| state.last().saturating_sub(state.written))
    }

    /// The next frame for the connection holding `epoch`, handed to
    /// `take` with its `s` under the lock: taking no reference of its own
    /// spares the frame's shared count, which every recipient's push
    /// touches too, a round trip between cores per delivery.
    pub(crate) fn pop<R>(
        &self,
        epoch: Epoch,
        take: impl FnOnce(u64, &ClientFrame) -> R,
    ) -> Option<R> {
        self.with(|state| {
            // A close request may have trimmed frames not yet written.
            if state.epoch != epoch || state.close.is_some() || state.written >= state.last() {
                return None;
            }
            let seq = state.written + 1;
            let at = usize::try_from(seq.checked_sub(state.first)?).ok()?;
            let taken = take(seq, state.log.get(at)?);
            state.written = seq;
            state.trim(self.keep);
            Some(taken)
        })
    }

    /// The connection left without a clean close: the session keeps
    /// logging, bounded by `resume_buffer`, until a resume or expiry.
    pub(crate) fn detach(&self) {
        self.with(|state| {
            state.attached = false;
            state.close = None;
            state.trim(self.keep);
        });
    }

    /// Ends the session for good: its frames are freed, later pushes dropped.
    pub(crate) fn end(&self) {
        self.with(|state| {
            state.ended = true;
            state.log = VecDeque::new();
        });
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Whether a resume from `seq` can be served: every frame after it is
    /// still logged, and `seq` is not beyond the last frame written (the
    /// client can't have read a frame never sent).
    pub(crate) fn can_resume(&self, seq: u64) -> Result<(), Refused> {
        let state = self.lock();
        if state.ended || seq > state.written {
            Err(Refused::UnknownSession)
        } else if seq + 1 < state.first {
            Err(Refused::TooFarBehind)
        } else {
            Ok(())
        }
    }

    /// Attaches a resuming connection after [`can_resume`](Self::can_resume)
    /// said yes (the caller holds the registry's lock, so nothing was pushed
    /// in between): its writer starts after `seq`, any connection still
    /// attached is told it was taken over. Returns the new epoch and how
    /// many frames the replay holds.
    pub(crate) fn attach(&self, seq: u64) -> (Epoch, u64) {
        let taken = self.with(|state| {
            state.epoch = state.epoch.wrapping_add(1);
            state.attached = true;
            state.close = None;
            state.written = seq.max(state.first - 1);
            state.replay_end = state.last();
            (state.epoch, state.last() - state.written)
        });
        // The old task (if any) and the new one may both be waiting.
        self.wake.notify_waiters();
        self.wake.notify_one();
        taken
    }

    fn has_work(&self, epoch: Epoch) -> bool {
        let state = self.lock();
        state.epoch != epoch || state.ended || state.close.is_some() || state.written < state.last()
    }

    /// Resolves once there is a frame to write or a close request for the
    /// connection holding `epoch`.
    pub(crate) async fn ready(&self, epoch: Epoch) {
        loop {
            let mut notified = pin!(self.wake.notified());
            // Enabled before the check, so a takeover's `notify_waiters`
            // between the check and the await still reaches it.
            notified.as_mut().enable();
            if self.has_work(epoch) {
                self.pass_on(epoch);
                return;
            }
            notified.await;
        }
    }

    /// Resolves with the close code once a close is requested for the
    /// connection holding `epoch`.
    pub(crate) async fn closed(&self, epoch: Epoch) -> u16 {
        loop {
            let mut notified = pin!(self.wake.notified());
            notified.as_mut().enable();
            if let Some(code) = self.close_code(epoch) {
                self.pass_on(epoch);
                return code;
            }
            notified.await;
        }
    }

    /// A taken-over task may have consumed a wake-up meant for the new
    /// one: hand it on.
    fn pass_on(&self, epoch: Epoch) {
        if self.lock().epoch != epoch {
            self.wake.notify_one();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().log.len()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let capacity = self.lock().log.capacity();
        self.bytes.dec_by((capacity * SLOT) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Arc<ClientFrame> {
        Arc::new(ClientFrame::new("E", "{}"))
    }

    fn queue(capacity: usize, keep: usize) -> Queue {
        Queue::new(capacity, keep, Gauge::default())
    }

    #[test]
    fn overflow_requests_4009_and_keeps_frames_for_a_resume() {
        let queue = queue(2, 4);
        queue.push(&frame());
        assert_eq!(queue.pop(0, |s, _| s), Some(1));
        assert_eq!(queue.push(&frame()), Pushed::Queued);
        assert_eq!(queue.push(&frame()), Pushed::Queued);
        assert_eq!(queue.push(&frame()), Pushed::Overflowed);
        assert_eq!(queue.close_code(0), Some(SLOW_CONSUMER));
        // Closing: nothing more is written, but frames are still logged.
        assert!(queue.pop(0, |s, _| s).is_none());
        assert_eq!(queue.push(&frame()), Pushed::Queued);
        assert_eq!(queue.len(), 4);
        // The first close request wins.
        queue.close(REPLACED);
        assert_eq!(queue.close_code(0), Some(SLOW_CONSUMER));
        queue.detach();
        // Frame 1 was written and dropped; 2..=5 are kept.
        assert_eq!(queue.can_resume(0), Err(Refused::TooFarBehind));
        assert_eq!(queue.can_resume(2), Err(Refused::UnknownSession));
        assert_eq!(queue.can_resume(1), Ok(()));
        assert_eq!(queue.attach(1), (1, 4));
        assert_eq!(queue.close_code(0), Some(REPLACED));
        assert_eq!(queue.close_code(1), None);
        let replayed: Vec<u64> = std::iter::from_fn(|| queue.pop(1, |s, _| s)).collect();
        assert_eq!(replayed, vec![2, 3, 4, 5]);
        queue.push(&frame());
        assert_eq!(queue.pop(1, |s, _| s), Some(6));
        queue.end();
        assert_eq!(queue.push(&frame()), Pushed::Closing);
        assert_eq!(queue.can_resume(6), Err(Refused::UnknownSession));
    }

    #[test]
    fn written_frames_are_kept_up_to_the_resume_buffer() {
        let queue = queue(100, 4);
        for _ in 0..10 {
            queue.push(&frame());
            queue.pop(0, |s, _| s);
        }
        assert_eq!(queue.len(), 4);
        assert_eq!(queue.can_resume(6), Ok(()));
        assert_eq!(queue.can_resume(5), Err(Refused::TooFarBehind));
        // Written frames go first; those not yet written are never
        // trimmed while a connection takes them.
        for _ in 0..10 {
            queue.push(&frame());
        }
        assert_eq!(queue.len(), 10);
        assert_eq!(queue.can_resume(10), Ok(()));
    }

    #[test]
    fn buffer_bytes_are_accounted_and_given_back() {
        let bytes = Gauge::default();
        let queue = Queue::new(100, 100, bytes.clone());
        for _ in 0..10 {
            queue.push(&frame());
        }
        assert!(bytes.get() >= (10 * SLOT) as i64);
        queue.end();
        assert_eq!(bytes.get(), 0);
        queue.push(&frame());
        drop(queue);
        assert_eq!(bytes.get(), 0);
    }

    #[tokio::test]
    async fn ready_sees_a_push_made_before_waiting() {
        let queue = Arc::new(queue(4, 4));
        queue.push(&frame());
        tokio::time::timeout(std::time::Duration::from_secs(1), queue.ready(0))
            .await
            .unwrap();
        assert!(queue.pop(0, |s, _| s).is_some());
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.closed(0).await }
        });
        tokio::task::yield_now().await;
        queue.close(REPLACED);
        assert_eq!(waiter.await.unwrap(), REPLACED);
    }

    #[tokio::test]
    async fn a_takeover_wakes_the_old_task_and_the_new_one() {
        let queue = Arc::new(queue(4, 4));
        let old = tokio::spawn({
            let queue = queue.clone();
            async move { queue.closed(0).await }
        });
        tokio::task::yield_now().await;
        let (epoch, replayed) = queue.attach(0);
        assert_eq!(replayed, 0);
        assert_eq!(old.await.unwrap(), REPLACED);
        let new = tokio::spawn({
            let queue = queue.clone();
            async move { queue.ready(epoch).await }
        });
        tokio::task::yield_now().await;
        queue.push(&frame());
        tokio::time::timeout(std::time::Duration::from_secs(1), new)
            .await
            .unwrap()
            .unwrap();
    }
}
