//! Idle pools that hand a thread back what it used last.
//!
//! A wasm instance or a SQLite connection carries a working set (the
//! guest's memory and stack, the page cache) that stays in the cache of
//! the core that last ran it. From one shared LIFO list, the next event
//! on the other worker took it and pulled all of it across: under the
//! chat mix the same build ran either ~14 or ~21 us per event depending
//! on how its workers happened to interleave, and ~14 with the whole
//! process pinned to one core.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Idle items, each tagged with the thread that returned it.
pub struct LocalPool<T> {
    idle: Mutex<Vec<(u32, T)>>,
}

impl<T> Default for LocalPool<T> {
    fn default() -> Self {
        LocalPool {
            idle: Mutex::new(Vec::new()),
        }
    }
}

impl<T> LocalPool<T> {
    /// The newest item this thread returned, else the newest of any.
    pub fn take(&self) -> Option<T> {
        let me = thread_tag();
        let mut idle = self.lock();
        let at = idle
            .iter()
            .rposition(|(tag, _)| *tag == me)
            .or(idle.len().checked_sub(1))?;
        Some(idle.remove(at).1)
    }

    /// Keeps `item` unless `max` are idle already; gives it back if not.
    pub fn give(&self, item: T, max: usize) -> Result<(), T> {
        let mut idle = self.lock();
        if idle.len() >= max {
            return Err(item);
        }
        idle.push((thread_tag(), item));
        Ok(())
    }

    /// Calls `f` on every idle item.
    pub fn each(&self, mut f: impl FnMut(&mut T)) {
        self.lock().iter_mut().for_each(|(_, item)| f(item));
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(u32, T)>> {
        // A panic can't leave the Vec half-updated: push and remove are
        // whole.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A small number naming the calling thread (`thread::current()` would
/// clone an `Arc` per call).
fn thread_tag() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local! {
        static TAG: u32 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|tag| *tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_takes_back_its_own_item_first() {
        let pool = LocalPool::default();
        pool.give("main", 4).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| pool.give("other", 4).unwrap());
        });
        // "other" is newer, but this thread returned "main".
        assert_eq!(pool.take(), Some("main"));
        // With none of its own left, the newest of any.
        assert_eq!(pool.take(), Some("other"));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn a_full_pool_gives_the_item_back() {
        let pool = LocalPool::default();
        pool.give(1, 1).unwrap();
        assert_eq!(pool.give(2, 1), Err(2));
        assert_eq!(pool.take(), Some(1));
    }
}
