//! Grouped database work. Callers submit one item and await its answer;
//! one task runs every item queued meanwhile in a single round trip, so
//! under load one query or transaction carries hundreds of events and the
//! database is not the event rate's ceiling.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

/// Most items one round trip carries.
pub const GROUP_MAX: usize = 512;

/// Where one item's answer goes.
pub type Reply<V> = oneshot::Sender<Result<V, String>>;

/// A queue in front of one grouped operation; cheap to clone. Its task
/// ends once the last clone is dropped.
pub struct Batcher<K, V> {
    tx: mpsc::Sender<(K, Reply<V>)>,
}

impl<K, V> Clone for Batcher<K, V> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<K: Send + 'static, V: Send + 'static> Batcher<K, V> {
    /// Starts the task. `run` gets the queued items in arrival order and
    /// returns one answer per item, in the same order; its error answers
    /// every item of the group.
    pub fn start<F, Fut>(run: F) -> Batcher<K, V>
    where
        F: Fn(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<V>, String>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(K, Reply<V>)>(4 * GROUP_MAX);
        tokio::spawn(async move {
            let mut queued = Vec::with_capacity(GROUP_MAX);
            while rx.recv_many(&mut queued, GROUP_MAX).await > 0 {
                linger(&mut rx, &mut queued).await;
                let (items, replies): (Vec<K>, Vec<Reply<V>>) = queued.drain(..).unzip();
                answer(replies.into_iter(), run(items).await);
            }
        });
        Batcher { tx }
    }

    /// Queues `item` and waits for its answer.
    pub async fn submit(&self, item: K) -> Result<V, String> {
        let (reply, answer) = oneshot::channel();
        let gone = || "the database task has stopped".to_owned();
        self.tx.send((item, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// How often the task yields before a group leaves, taking what arrived
/// meanwhile: the events that submit next are often already runnable, and
/// on PostgreSQL a statement with a few more rows costs much less than
/// another round trip (BENCHMARKS.md, "Grouped writes linger"). When
/// nothing else is runnable, a yield returns at once.
const LINGER_YIELDS: usize = 2;

async fn linger<T>(rx: &mut mpsc::Receiver<T>, queued: &mut Vec<T>) {
    for _ in 0..LINGER_YIELDS {
        if queued.len() >= GROUP_MAX {
            return;
        }
        tokio::task::yield_now().await;
        while queued.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(item) => queued.push(item),
                Err(_) => break,
            }
        }
    }
}

/// Answers a group's callers: one answer each, in order, or, for an
/// error or a short answer, the error to every one of them.
pub fn answer<V>(
    replies: impl ExactSizeIterator<Item = Reply<V>>,
    answers: Result<Vec<V>, String>,
) {
    let n = replies.len();
    let err = match answers {
        Ok(answers) if answers.len() == n => {
            for (reply, answer) in replies.zip(answers) {
                let _ = reply.send(Ok(answer));
            }
            return;
        }
        Ok(answers) => format!("grouped query answered {} of {n} items", answers.len()),
        Err(err) => err,
    };
    for reply in replies {
        let _ = reply.send(Err(err.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn items_queued_together_share_one_round_trip() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let counted = rounds.clone();
        let double = Batcher::start(move |items: Vec<u32>| {
            counted.fetch_add(1, Ordering::Relaxed);
            async move { Ok(items.into_iter().map(|i| i * 2).collect()) }
        });
        let answers = futures_util::future::join_all((0..100u32).map(|i| double.submit(i))).await;
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, (0..100u32).map(|i| i * 2).collect::<Vec<_>>());
        assert!(rounds.load(Ordering::Relaxed) < 100);
    }

    /// An item submitted by a task that runs only after the group's first
    /// item woke the batcher still joins that group.
    #[tokio::test]
    async fn a_group_waits_for_items_just_behind_it() {
        let groups = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = groups.clone();
        let echo = Batcher::start(move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move { Ok(items) }
        });
        let first = tokio::spawn({
            let echo = echo.clone();
            async move { echo.submit(1).await }
        });
        let second = tokio::spawn({
            let echo = echo.clone();
            async move {
                // Runs after the batcher was woken by the first item.
                tokio::task::yield_now().await;
                echo.submit(2).await
            }
        });
        assert_eq!(first.await.unwrap(), Ok(1));
        assert_eq!(second.await.unwrap(), Ok(2));
        assert_eq!(*groups.lock().unwrap(), [2], "one group of both items");
    }

    #[tokio::test]
    async fn an_error_or_a_short_answer_fails_every_item_of_the_group() {
        let failing =
            Batcher::start(|_: Vec<u32>| async { Err::<Vec<u32>, _>("disk full".into()) });
        assert_eq!(failing.submit(1).await, Err("disk full".to_owned()));
        let short = Batcher::start(|_: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        assert!(
            short
                .submit(1)
                .await
                .unwrap_err()
                .contains("answered 0 of 1")
        );
    }
}
