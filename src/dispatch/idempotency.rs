//! Idempotency: an event id that already succeeded is acked again as a
//! duplicate without a second broadcast, one still in flight is answered
//! when the first attempt ends, and successes survive a restart.
//!
//! Successes are written to `event_outcomes` by one writer task that groups
//! every pending insert into one transaction, and looked up by one reader
//! task that groups every pending lookup into one query: under load a round
//! trip carries hundreds of events, so the database is not the ack rate's
//! ceiling. The two are separate so a slow commit (an SQLite checkpoint,
//! say) never holds up the lookup a new event waits on. A bounded
//! in-memory set of recent successes answers the common retry without
//! touching the database at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::db::{Db, DbError, now_ms};
use crate::shutdown::Shutdown;
use crate::with_pool;

use super::frame::Outcome;

/// Recent successes remembered in memory.
const RECENT_CAPACITY: usize = 65_536;
/// Most requests one database round trip carries.
const GROUP_MAX: usize = 512;
/// Ids per `IN (…)` list, well under SQLite's parameter limit.
const CHUNK: usize = 256;

/// What to do with an event id that just arrived.
pub enum Begin {
    /// It already succeeded: ack `success:true, duplicate:true`.
    Duplicate,
    /// An attempt is in flight on some connection: wait for its outcome.
    Wait(watch::Receiver<Option<Outcome>>),
    /// Run it. The ticket publishes the outcome to waiters when finished.
    Run(Ticket),
}

/// The right to run an event id; publishing (or dropping) it releases
/// anyone waiting on the same id.
pub struct Ticket {
    key: String,
    tx: watch::Sender<Option<Outcome>>,
    store: Arc<Inner>,
}

impl Ticket {
    /// Makes the outcome durable (for successes) and wakes waiters.
    pub async fn finish(self, outcome: &Outcome) -> Result<(), DbError> {
        let stored = match outcome {
            Outcome::Success { .. } => self.store.record(&self.key).await,
            Outcome::Failed(_) => Ok(()),
        };
        let _ = self.tx.send(Some(outcome.clone()));
        stored
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.store
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

struct Inner {
    /// Event ids being run now, across every dispatch connection.
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    recent: Mutex<Recent>,
    lookups: mpsc::Sender<(String, oneshot::Sender<Result<bool, String>>)>,
    records: mpsc::Sender<(String, oneshot::Sender<Result<(), String>>)>,
}

/// A FIFO-evicted set of recent successes.
#[derive(Default)]
struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Recent {
    fn insert(&mut self, key: String) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > RECENT_CAPACITY
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

/// The idempotency store shared by every dispatch connection.
#[derive(Clone)]
pub struct Outcomes {
    inner: Arc<Inner>,
}

impl Outcomes {
    /// Starts the reader, the writer and the retention sweeper. Lookups go
    /// through `reads`, the read-only handle: inline on SQLite, so an
    /// event's duplicate check never waits for a connection thread.
    pub fn start(db: Db, reads: Db, retention: Duration, shutdown: &Shutdown) -> Outcomes {
        let (lookups, lookup_rx) = mpsc::channel(4096);
        let (records, record_rx) = mpsc::channel(4096);
        // Not tracked: in-flight events need them while shutdown drains,
        // and they end by themselves once the last `Outcomes` is dropped.
        tokio::spawn(reader(reads, lookup_rx));
        tokio::spawn(writer(db.clone(), record_rx));
        shutdown.spawn(sweeper(db, retention, shutdown.clone()));
        Outcomes {
            inner: Arc::new(Inner {
                inflight: Mutex::new(HashMap::new()),
                recent: Mutex::new(Recent::default()),
                lookups,
                records,
            }),
        }
    }

    /// Decides how to treat an arriving event id.
    pub async fn begin(&self, key: &str) -> Result<Begin, DbError> {
        if self.recently_succeeded(key) {
            return Ok(Begin::Duplicate);
        }
        let ticket = match self.claim(key) {
            Ok(ticket) => ticket,
            Err(first) => return Ok(Begin::Wait(first)),
        };
        // Claimed: nobody else runs this id now. Did it succeed before?
        if self.inner.lookup(key).await? {
            self.remember(key);
            return Ok(Begin::Duplicate);
        }
        Ok(Begin::Run(ticket))
    }

    fn recently_succeeded(&self, key: &str) -> bool {
        self.inner
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set
            .contains(key)
    }

    fn remember(&self, key: &str) {
        self.inner
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned());
    }

    /// Registers `key` as in flight, or returns the attempt already in
    /// flight to wait on.
    fn claim(&self, key: &str) -> Result<Ticket, watch::Receiver<Option<Outcome>>> {
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = inflight.get(key) {
            return Err(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.to_owned(), rx);
        Ok(Ticket {
            key: key.to_owned(),
            tx,
            store: self.inner.clone(),
        })
    }
}

impl Inner {
    async fn lookup(&self, key: &str) -> Result<bool, DbError> {
        let (tx, rx) = oneshot::channel();
        self.lookups
            .send((key.to_owned(), tx))
            .await
            .map_err(|_| closed())?;
        rx.await
            .map_err(|_| closed())?
            .map_err(|e| DbError::Query(sqlx::Error::Protocol(e)))
    }

    async fn record(&self, key: &str) -> Result<(), DbError> {
        let (tx, rx) = oneshot::channel();
        self.records
            .send((key.to_owned(), tx))
            .await
            .map_err(|_| closed())?;
        rx.await
            .map_err(|_| closed())?
            .map_err(|e| DbError::Query(sqlx::Error::Protocol(e)))?;
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned());
        Ok(())
    }
}

fn closed() -> DbError {
    DbError::Query(sqlx::Error::PoolClosed)
}

/// Answers every pending lookup with one query per round.
async fn reader(db: Db, mut rx: mpsc::Receiver<(String, oneshot::Sender<Result<bool, String>>)>) {
    let mut lookups = Vec::with_capacity(GROUP_MAX);
    while rx.recv_many(&mut lookups, GROUP_MAX).await > 0 {
        let keys: Vec<&str> = lookups.iter().map(|(k, _)| k.as_str()).collect();
        match select(&db, &keys).await {
            Ok(found) => {
                for (key, tx) in lookups.drain(..) {
                    let _ = tx.send(Ok(found.contains(&key)));
                }
            }
            Err(err) => {
                let err = err.to_string();
                for (_, tx) in lookups.drain(..) {
                    let _ = tx.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Records every pending success in one transaction per round.
async fn writer(db: Db, mut rx: mpsc::Receiver<(String, oneshot::Sender<Result<(), String>>)>) {
    let mut records = Vec::with_capacity(GROUP_MAX);
    while rx.recv_many(&mut records, GROUP_MAX).await > 0 {
        let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
        let result = insert(&db, &keys).await.map_err(|e| e.to_string());
        if let Err(err) = &result {
            tracing::error!(error = %err, events = keys.len(), "cannot record event outcomes");
        }
        for (_, tx) in records.drain(..) {
            let _ = tx.send(result.clone());
        }
    }
}

async fn insert(db: &Db, keys: &[&str]) -> Result<(), sqlx::Error> {
    let now = now_ms();
    with_pool!(db, p => {
        let mut tx = p.begin().await?;
        for chunk in keys.chunks(CHUNK) {
            let mut q = sqlx::QueryBuilder::new("INSERT INTO event_outcomes (event_id, completed_at) ");
            q.push_values(chunk, |mut row, key| {
                row.push_bind(*key).push_bind(now);
            });
            q.push(" ON CONFLICT (event_id) DO NOTHING");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    })
}

async fn select(db: &Db, keys: &[&str]) -> Result<HashSet<String>, DbError> {
    if let Some(reader) = db.sqlite_reader() {
        let found = reader
            .read_keyed(
                "SELECT event_id FROM event_outcomes \
                 WHERE event_id IN (SELECT value FROM json_each(?1))",
                keys,
                |row| row.get(0),
            )
            .await?;
        return Ok(found.into_iter().collect());
    }
    let mut found = HashSet::new();
    for chunk in keys.chunks(CHUNK) {
        let rows: Vec<(String,)> = with_pool!(db, p => {
            let mut q = sqlx::QueryBuilder::new("SELECT event_id FROM event_outcomes WHERE event_id IN (");
            let mut list = q.separated(", ");
            for key in chunk {
                list.push_bind(*key);
            }
            q.push(")");
            q.build_query_as().fetch_all(p).await
        })?;
        found.extend(rows.into_iter().map(|(k,)| k));
    }
    Ok(found)
}

/// Forgets successes older than the retention window, hourly.
async fn sweeper(db: Db, retention: Duration, shutdown: Shutdown) {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let cutoff = now_ms().saturating_sub(retention_ms);
        let result = with_pool!(db, p => sqlx::query("DELETE FROM event_outcomes WHERE completed_at < $1")
            .bind(cutoff)
            .execute(p)
            .await
            .map(|r| r.rows_affected()));
        match result {
            Ok(removed) if removed > 0 => {
                tracing::info!(removed, "expired old event outcomes");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot expire old event outcomes"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
