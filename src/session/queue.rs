//! One session's bounded outbound queue, shared by the delivering side
//! (which never waits) and the session's task (which drains it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::frame::ClientFrame;

/// Why a session was told to close from outside its task.
pub(crate) const SLOW_CONSUMER: u16 = 4009;
pub(crate) const REPLACED: u16 = 4011;
/// The session's token was revoked (or expired) while it was open.
pub(crate) const REVOKED: u16 = 4004;

/// Capacity kept after a burst drains; beyond it the queue gives memory back.
const KEEP_CAPACITY: usize = 16;

/// What [`Queue::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// This push overflowed the queue: the session is now closing with 4009.
    Overflowed,
    /// The session was already closing; the frame was dropped.
    Closing,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Arc<ClientFrame>>,
    /// Set once; the session's task closes with this code.
    close: Option<u16>,
}

/// A bounded FIFO plus a close request, behind a std mutex held only for a
/// push or a pop (never across an await). Lighter than a tokio channel,
/// which matters at tens of thousands of idle sessions.
#[derive(Debug)]
pub(crate) struct Queue {
    state: Mutex<State>,
    /// Wakes the session's task for new frames or a close request. A
    /// `notify_one` with no waiter leaves a permit, so no wake-up is lost.
    wake: Notify,
    capacity: usize,
}

impl Queue {
    pub(crate) fn new(capacity: usize) -> Self {
        Queue {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can't leave the queue inconsistent
        // (every critical section is a single push/pop), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues without waiting; a full queue turns into a 4009 close
    /// request and its frames are dropped at once.
    pub(crate) fn push(&self, frame: &Arc<ClientFrame>) -> Pushed {
        let mut state = self.lock();
        if state.close.is_some() {
            return Pushed::Closing;
        }
        if state.frames.len() >= self.capacity {
            state.close = Some(SLOW_CONSUMER);
            state.frames = VecDeque::new();
            drop(state);
            self.wake.notify_one();
            return Pushed::Overflowed;
        }
        state.frames.push_back(frame.clone());
        drop(state);
        self.wake.notify_one();
        Pushed::Queued
    }

    /// Asks the session to close with `code` unless it already is closing.
    pub(crate) fn close(&self, code: u16) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(code);
            state.frames = VecDeque::new();
        }
        drop(state);
        self.wake.notify_one();
    }

    pub(crate) fn close_code(&self) -> Option<u16> {
        self.lock().close
    }

    pub(crate) fn pop(&self) -> Option<Arc<ClientFrame>> {
        let mut state = self.lock();
        let frame = state.frames.pop_front();
        if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
            state.frames.shrink_to(KEEP_CAPACITY);
        }
        frame
    }

    fn has_work(&self) -> bool {
        let state = self.lock();
        state.close.is_some() || !state.frames.is_empty()
    }

    /// Resolves once there is a frame to write or a close request.
    pub(crate) async fn ready(&self) {
        while !self.has_work() {
            self.wake.notified().await;
        }
    }

    /// Resolves with the close code once a close is requested.
    pub(crate) async fn closed(&self) -> u16 {
        loop {
            if let Some(code) = self.close_code() {
                return code;
            }
            self.wake.notified().await;
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_requests_4009_and_drops_frames() {
        let queue = Queue::new(2);
        let frame = Arc::new(ClientFrame::new("E", "{}"));
        assert_eq!(queue.push(&frame), Pushed::Queued);
        assert_eq!(queue.push(&frame), Pushed::Queued);
        assert_eq!(queue.push(&frame), Pushed::Overflowed);
        assert_eq!(queue.close_code(), Some(SLOW_CONSUMER));
        assert_eq!(queue.len(), 0);
        assert_eq!(queue.push(&frame), Pushed::Closing);
        // The first close request wins.
        queue.close(REPLACED);
        assert_eq!(queue.close_code(), Some(SLOW_CONSUMER));
    }

    #[tokio::test]
    async fn ready_sees_a_push_made_before_waiting() {
        let queue = Arc::new(Queue::new(4));
        queue.push(&Arc::new(ClientFrame::new("E", "{}")));
        tokio::time::timeout(std::time::Duration::from_secs(1), queue.ready())
            .await
            .unwrap();
        assert!(queue.pop().is_some());
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.closed().await }
        });
        tokio::task::yield_now().await;
        queue.close(REPLACED);
        assert_eq!(waiter.await.unwrap(), REPLACED);
    }
}
