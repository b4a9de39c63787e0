//! Wake-ups owed by fan-outs, paid by one task on the sessions' runtime.
//!
//! A fan-out logs its frame in every recipient's queue but doesn't wake
//! them: it adds each queue not already owed a wake-up to one shared list
//! and, if the list was empty, wakes the paying task. That task runs
//! among the sessions, so by the time it pays, the events fanned out
//! meanwhile have added their frames too: each session is woken once for
//! all of them and writes them with one syscall. Waking a task from the
//! dispatch runtime costs a lock on the other runtime's queue; this way
//! an event pays that once, not once per recipient.
//!
//! Nothing can be left unwoken: a queue's flag is set by the push that
//! lists it and cleared by the payment that wakes it, so a frame logged
//! after the payment lists its queue again.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::registry::Slot;
use crate::shutdown::Shutdown;

#[derive(Debug, Default)]
pub(crate) struct Wakes {
    owed: Mutex<Vec<Arc<Slot>>>,
    /// Wakes the paying task when the list stops being empty.
    listed: Notify,
}

impl Wakes {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Slot>>> {
        // Appending and taking `Arc`s can't leave the list inconsistent.
        self.owed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists the wake-ups one fan-out owes (`slots` is left empty).
    pub(crate) fn owe(&self, slots: &mut Vec<Arc<Slot>>) {
        if slots.is_empty() {
            return;
        }
        let was_empty = {
            let mut list = self.lock();
            let was_empty = list.is_empty();
            list.append(slots);
            was_empty
        };
        if was_empty {
            self.listed.notify_one();
        }
    }

    /// Pays every wake-up owed, as they are listed, until shutdown.
    pub(crate) async fn pay(&self, shutdown: Shutdown) {
        let mut paying = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.listed.notified() => {}
            }
            std::mem::swap(&mut paying, &mut *self.lock());
            for slot in paying.drain(..) {
                slot.queue.pay();
            }
        }
        // Sessions are closing; their frames still reach any resume.
        for slot in std::mem::take(&mut *self.lock()) {
            slot.queue.pay();
        }
    }
}
