//! Event claims: the rule that an event id is broadcast at most once.
//!
//! Before an event's frames reach any session, its id is claimed: a row in
//! `event_outcomes`, committed. A retry that finds the row is a duplicate
//! (acked `success:true, duplicate:true`, nothing sent); a retry of an id
//! still in flight here waits for that attempt's outcome; an attempt that
//! fails before fan-out releases its claim, so the retry runs it again. If
//! the claim cannot be written the event is not delivered at all. A row
//! left by a process that died between claim and outcome is a duplicate
//! too: its frames may have gone out, and a second broadcast is the one
//! thing this rule exists to prevent.
//!
//! [`ClaimStore`] is the durable part, behind a small interface so cluster
//! mode can put its own beside [`SqlClaims`], today's. Writes are grouped
//! ([`Batcher`]): one autocommit statement per round carries every claim
//! queued meanwhile, so the claim costs throughput little and latency one
//! commit, which the pipeline overlaps with the plugin call; `done` marks
//! are written off the event's path.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::db::{Batcher, Db, DbError, now_ms};
use crate::shutdown::Shutdown;
use crate::{with_conn, with_pool};

use super::frame::Outcome;

/// Recent finished ids remembered in memory, so the common retry costs no
/// database round trip.
const RECENT_CAPACITY: usize = 65_536;
/// Ids per statement, well under SQLite's parameter limit.
const CHUNK: usize = 256;

/// What the store found when claiming an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The claim is ours: go on and deliver.
    New,
    /// Delivered before (or being delivered by another process).
    Done,
    /// Claimed by a process that never finished it (it died between claim
    /// and outcome): its frames may or may not have gone out.
    Abandoned,
}

/// The durable side of claims.
pub trait ClaimStore: Send + Sync {
    /// Claims `key` durably, or says who has it.
    fn claim(&self, key: String) -> BoxFuture<'_, Result<Claimed, DbError>>;
    /// Gives a claim up after a failure before fan-out, durably.
    fn release(&self, key: String) -> BoxFuture<'_, Result<(), DbError>>;
    /// Marks a claim finished; best effort (the claim alone already
    /// prevents a second broadcast).
    fn finish(&self, key: String);
}

/// What to do with an event id that just arrived.
pub enum Begin {
    /// It already succeeded: ack `success:true, duplicate:true`.
    Duplicate,
    /// An attempt is in flight here: wait for its outcome.
    Wait(watch::Receiver<Option<Outcome>>),
    /// Run it, claiming it durably before fan-out.
    Run(Claim),
}

/// The right to run an event id in this process. Ending it publishes the
/// outcome to waiters; dropping it unfinished releases them too.
pub struct Claim {
    key: String,
    tx: watch::Sender<Option<Outcome>>,
    claims: Arc<Shared>,
}

impl Claim {
    /// Makes the claim durable; fan-out may start only after `New`.
    pub async fn commit(&self) -> Result<Claimed, DbError> {
        let claimed = self.claims.store.claim(self.key.clone()).await?;
        // A row whose release failed is ours to run again.
        let released = self.claims.lock().released.remove(&self.key);
        Ok(if released { Claimed::New } else { claimed })
    }

    /// The event was delivered (or was a duplicate): remember it.
    pub fn delivered(self, fresh: bool) {
        if fresh {
            self.claims.store.finish(self.key.clone());
        }
        self.claims.lock().recent.insert(self.key.clone());
        let _ = self.tx.send(Some(Outcome::Success { duplicate: !fresh }));
    }

    /// The event failed before fan-out: give the id back so a retry runs
    /// it. `held` says whether [`commit`](Self::commit) returned `New`.
    pub async fn failed(self, outcome: &Outcome, held: bool) -> Result<(), DbError> {
        let released = if held {
            let result = self.claims.store.release(self.key.clone()).await;
            if result.is_err() {
                // The row stays, but it is ours to run again.
                self.claims.lock().released.insert(self.key.clone());
            }
            result
        } else {
            Ok(())
        };
        let _ = self.tx.send(Some(outcome.clone()));
        released
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.lock().inflight.remove(&self.key);
    }
}

#[derive(Default)]
struct State {
    /// Ids being run now, across every dispatch connection.
    inflight: HashMap<String, watch::Receiver<Option<Outcome>>>,
    recent: Recent,
    /// Ids whose release failed: their row is ours to take over.
    released: HashSet<String>,
}

struct Shared {
    state: Mutex<State>,
    store: Arc<dyn ClaimStore>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A FIFO-evicted set of recent finished ids.
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

/// Claims shared by every dispatch connection.
#[derive(Clone)]
pub struct Claims {
    shared: Arc<Shared>,
}

impl Claims {
    pub fn new(store: Arc<dyn ClaimStore>) -> Claims {
        Claims {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                store,
            }),
        }
    }

    /// Decides how to treat an arriving event id.
    pub fn begin(&self, key: &str) -> Begin {
        let mut state = self.shared.lock();
        if state.recent.set.contains(key) {
            return Begin::Duplicate;
        }
        if let Some(first) = state.inflight.get(key) {
            return Begin::Wait(first.clone());
        }
        let (tx, rx) = watch::channel(None);
        state.inflight.insert(key.to_owned(), rx);
        Begin::Run(Claim {
            key: key.to_owned(),
            tx,
            claims: self.shared.clone(),
        })
    }
}

/// Most `done` marks waiting to be written; beyond it new ones are
/// dropped (a missing mark only makes a later retry log "never finished").
const MAX_PENDING_DONE: usize = 65_536;

/// Finished ids whose `done` mark is not written yet: the flusher writes
/// them in one transaction every 100 ms, and at shutdown, off every
/// event's path.
#[derive(Default)]
struct Finished(Mutex<Vec<String>>);

impl Finished {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, key: String) {
        let mut pending = self.lock();
        if pending.len() < MAX_PENDING_DONE {
            pending.push(key);
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back marks whose write failed.
    fn restore(&self, keys: Vec<String>) {
        let mut pending = self.lock();
        let room = MAX_PENDING_DONE.saturating_sub(pending.len());
        pending.extend(keys.into_iter().take(room));
    }
}

/// Claims in `event_outcomes`, on SQLite or PostgreSQL.
pub struct SqlClaims {
    claims: Batcher<String, Claimed>,
    releases: Batcher<String, ()>,
    finished: Arc<Finished>,
    /// False while claims cannot be written: `/readyz` says 503.
    healthy: Arc<AtomicBool>,
}

impl SqlClaims {
    /// Starts the grouped writers and the retention sweeper. `owner` names
    /// this process in the rows it claims.
    pub fn start(db: Db, retention: Duration, shutdown: &Shutdown) -> Arc<SqlClaims> {
        let owner = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        let healthy = Arc::new(AtomicBool::new(true));
        let finished = Arc::new(Finished::default());
        let claims = {
            let (db, owner, healthy) = (db.clone(), owner.clone(), healthy.clone());
            Batcher::start(move |keys: Vec<String>| {
                let (db, owner, healthy) = (db.clone(), owner.clone(), healthy.clone());
                async move {
                    let result = insert_claims(&db, &owner, &keys).await;
                    healthy.store(result.is_ok(), Ordering::Release);
                    result.map_err(|e| e.to_string())
                }
            })
        };
        let releases = {
            let (db, owner) = (db.clone(), owner.clone());
            Batcher::start(move |keys: Vec<String>| {
                let (db, owner) = (db.clone(), owner.clone());
                async move {
                    let n = keys.len();
                    delete_claims(&db, &owner, &keys)
                        .await
                        .map(|()| vec![(); n])
                        .map_err(|e| e.to_string())
                }
            })
        };
        shutdown.spawn(flusher(db.clone(), finished.clone(), shutdown.clone()));
        shutdown.spawn(sweeper(db, retention, shutdown.clone()));
        Arc::new(SqlClaims {
            claims,
            releases,
            finished,
            healthy,
        })
    }

    /// Whether the last claim write succeeded.
    pub fn healthy(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }
}

impl ClaimStore for SqlClaims {
    fn claim(&self, key: String) -> BoxFuture<'_, Result<Claimed, DbError>> {
        Box::pin(async move { self.claims.submit(key).await.map_err(DbError::Grouped) })
    }

    fn release(&self, key: String) -> BoxFuture<'_, Result<(), DbError>> {
        Box::pin(async move { self.releases.submit(key).await.map_err(DbError::Grouped) })
    }

    fn finish(&self, key: String) {
        self.finished.push(key);
    }
}

/// Pushes `(k1, k2, …)` with every key bound, closing an `IN (` the query
/// ends with.
macro_rules! push_keys {
    ($q:expr, $keys:expr) => {{
        let mut list = $q.separated(", ");
        for key in $keys {
            list.push_bind(key.as_str());
        }
        $q.push(")");
    }};
}

/// Marks finished claims `done` inside the transaction `$tx`.
macro_rules! mark_done {
    ($tx:expr, $keys:expr) => {
        for chunk in $keys.chunks(CHUNK) {
            let mut q =
                sqlx::QueryBuilder::new("UPDATE event_outcomes SET done = 1 WHERE event_id IN (");
            push_keys!(q, chunk);
            q.build().execute(&mut *$tx).await?;
        }
    };
}

/// Claims every key it can; for the keys it can't claim, reads who holds
/// them. Each chunk is one statement, atomic by itself: no explicit
/// transaction, so a round of claims is one round trip to the database
/// (this commit is on every event's way to its fan-out).
async fn insert_claims(db: &Db, owner: &str, keys: &[String]) -> Result<Vec<Claimed>, sqlx::Error> {
    let now = now_ms();
    let mut inserted: HashSet<String> = HashSet::with_capacity(keys.len());
    let mut held: HashMap<String, (String, i64)> = HashMap::new();
    with_conn!(db, c => {
        for chunk in keys.chunks(CHUNK) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO event_outcomes (event_id, completed_at, owner, done) ",
            );
            q.push_values(chunk, |mut row, key| {
                row.push_bind(key.as_str()).push_bind(now).push_bind(owner).push_bind(0_i64);
            });
            q.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
            let rows: Vec<(String,)> = q.build_query_as().fetch_all(&mut *c).await?;
            inserted.extend(rows.into_iter().map(|(k,)| k));
        }
        let others: Vec<&String> = keys.iter().filter(|k| !inserted.contains(*k)).collect();
        for chunk in others.chunks(CHUNK) {
            let mut q = sqlx::QueryBuilder::new(
                // `done` is INTEGER (int4 on PostgreSQL): read as BIGINT on both.
                "SELECT event_id, owner, CAST(done AS BIGINT) FROM event_outcomes WHERE event_id IN (",
            );
            push_keys!(q, chunk);
            let rows: Vec<(String, String, i64)> = q.build_query_as().fetch_all(&mut *c).await?;
            held.extend(rows.into_iter().map(|(k, o, d)| (k, (o, d))));
        }
        Ok(())
    })?;
    Ok(keys
        .iter()
        .map(|key| {
            if inserted.contains(key) {
                return Claimed::New;
            }
            match held.get(key) {
                Some((_, done)) if *done != 0 => Claimed::Done,
                // Our own success whose `done` mark is still queued.
                Some((holder, _)) if holder == owner => Claimed::Done,
                Some(_) => Claimed::Abandoned,
                // Released between our insert and read: a rare race; the
                // backend's retry claims it.
                None => Claimed::Abandoned,
            }
        })
        .collect())
}

async fn delete_claims(db: &Db, owner: &str, keys: &[String]) -> Result<(), sqlx::Error> {
    with_conn!(db, c => {
        let mut tx = sqlx::Connection::begin(&mut *c).await?;
        for chunk in keys.chunks(CHUNK) {
            let mut q = sqlx::QueryBuilder::new("DELETE FROM event_outcomes WHERE done = 0 AND owner = ");
            q.push_bind(owner).push(" AND event_id IN (");
            push_keys!(q, chunk);
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    })
}

/// Writes the pending `done` marks every 100 ms, and once more at
/// shutdown (after the dispatch side has drained).
async fn flusher(db: Db, finished: Arc<Finished>, shutdown: Shutdown) {
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_millis(100)) => false,
        };
        let keys = finished.take();
        if !keys.is_empty() {
            let written = with_conn!(db, c => {
                let mut tx = sqlx::Connection::begin(&mut *c).await?;
                mark_done!(tx, keys);
                tx.commit().await
            });
            if let Err(err) = written {
                tracing::warn!(error = %err, "cannot mark events finished; their claims still prevent a second broadcast");
                finished.restore(keys);
            }
        }
        if stopping {
            return;
        }
    }
}

/// A real claim write, for `/readyz` while claims are failing: only a
/// write can tell whether a full or read-only disk has recovered. The key
/// is longer than any event id may be (128 bytes), so it can't collide.
pub async fn probe(db: &Db) -> Result<(), sqlx::Error> {
    const PROBE: &str = concat!(
        "readyz-probe-readyz-probe-readyz-probe-readyz-probe-readyz-probe-readyz-probe-",
        "readyz-probe-readyz-probe-readyz-probe-readyz-probe-readyz-probe"
    );
    with_conn!(db, c => {
        let mut tx = sqlx::Connection::begin(&mut *c).await?;
        sqlx::query(
            "INSERT INTO event_outcomes (event_id, completed_at, owner, done) VALUES ($1, 0, '', 1) \
             ON CONFLICT (event_id) DO UPDATE SET completed_at = 0",
        )
        .bind(PROBE)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })
}

/// Forgets finished events older than the retention window, hourly.
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
