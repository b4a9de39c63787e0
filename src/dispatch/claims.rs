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
//! In cluster mode the row may be held by an attempt still running on
//! another node ([`Peers`] says whether its process is live): the claim
//! then waits for that attempt's outcome by reading the row with backoff
//! (the row is the truth; its `done` mark lands within ~100 ms of the
//! success, so the wait acks ~100-200 ms after the first attempt's ack):
//! `done` is a duplicate; a row gone means the attempt failed and
//! released it, so this node claims it again and runs the event as the
//! backend's retry would. The wait is bounded (a live peer's attempt
//! ends within its route's timeout plus a lease); past it, or once the
//! holder's node stops being live, the row counts as abandoned as above.
//!
//! [`ClaimStore`] is the durable part, behind a small interface so cluster
//! mode can put its own beside [`SqlClaims`], today's. Writes are grouped:
//! one commit per round carries every claim queued meanwhile, so the claim
//! costs throughput little and latency one commit, which the pipeline
//! overlaps with the plugin call; `done` marks are written off the event's
//! path. On SQLite a thread of its own writes them ([`ClaimThread`]) and,
//! in the same transactions, answers reads that must be fresh
//! ([`FreshReads`]); on PostgreSQL a [`Batcher`] does, through the pool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, oneshot};

use crate::db::{Batcher, Db, DbError, GROUP_MAX, Reply, answer, now_ms};
use crate::shutdown::Shutdown;
use crate::{with_conn, with_pool};

use super::frame::Outcome;

/// Recent finished ids remembered in memory, so the common retry costs no
/// database round trip.
const RECENT_CAPACITY: usize = 65_536;
/// Ids per statement, well under SQLite's parameter limit.
const CHUNK: usize = 256;
/// First and longest pause between reads of a row a live peer holds.
const FIRST_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(100);
/// Shortest time between the claim thread's commits under load: the most
/// a claim (or a [`FreshReads`] read) waits for its group; the plugin call
/// runs meanwhile. Longer saves commits (`chat --offline`: 23.0-23.6 us
/// per event at 1 ms, 23.8-25.0 at 300 us); shorter is less time a window
/// of events on one channel waits (fan-out C = 100: 1.13-1.17M
/// deliveries/s at 1 ms, 1.22-1.27M at 300 us). So the pause follows the
/// load: [`COMMIT_EVERY`] after a group of [`BUSY_GROUP`] claims or more,
/// where commits are worth sharing, [`COMMIT_EVERY_LIGHT`] after a smaller
/// one.
const COMMIT_EVERY: Duration = Duration::from_millis(1);
const COMMIT_EVERY_LIGHT: Duration = Duration::from_micros(300);
const BUSY_GROUP: usize = 16;
/// Claim rounds for one id: another round only follows a release.
const MAX_ROUNDS: usize = 16;

/// An event id's key ([`Echo::key`](super::frame::Echo::key)), shared by
/// everything that tracks the event (the in-flight map, the claim, the
/// claim thread's group, the `done` marks, the recent set) instead of
/// copied into each.
pub type Key = Arc<str>;

/// What the store found when claiming an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The claim is ours: go on and deliver.
    New,
    /// Delivered before, here or by a peer.
    Done,
    /// Claimed by a process that never finished it (it died between claim
    /// and outcome, or a live peer's attempt outlasted the wait): its
    /// frames may or may not have gone out.
    Abandoned,
}

/// Other processes claiming in the same table (cluster mode: the other
/// nodes), so a claim held by one that still runs waits for its outcome.
pub trait Peers: Send + Sync {
    /// The name this process writes in the rows it claims; peers read
    /// from it which process that is.
    fn owner(&self) -> String;
    /// Whether the process that wrote `owner` is still running.
    fn is_live<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, bool>;
}

/// The durable side of claims.
pub trait ClaimStore: Send + Sync {
    /// Claims `key` durably, or says who has it.
    fn claim(&self, key: Key) -> BoxFuture<'_, Result<Claimed, DbError>>;
    /// Gives a claim up after a failure before fan-out, durably.
    fn release(&self, key: Key) -> BoxFuture<'_, Result<(), DbError>>;
    /// Marks a claim finished; best effort (the claim alone already
    /// prevents a second broadcast).
    fn finish(&self, key: Key);
}

/// What to do with an event id that just arrived.
pub enum Begin {
    /// It already succeeded: ack `success:true, duplicate:true`.
    Duplicate,
    /// An attempt is in flight here: wait for its outcome.
    Wait(Arc<Attempt>),
    /// Run it, claiming it durably before fan-out.
    Run(Claim),
}

/// The right to run an event id in this process. Ending it publishes the
/// outcome to waiters; dropping it unfinished releases them too.
pub struct Claim {
    key: Key,
    attempt: Arc<Attempt>,
    claims: Arc<Shared>,
}

/// An attempt's outcome, for the retries of its id that arrive while it
/// runs. Every event makes one and almost none is waited on, so it is a
/// cell and one `Notify` (a `watch` channel allocates nine, wakes eight).
#[derive(Default)]
pub struct Attempt {
    /// Set once: the outcome, or `None` if the attempt ended without one.
    outcome: OnceLock<Option<Outcome>>,
    ended: Notify,
}

impl Attempt {
    fn end(&self, outcome: Option<Outcome>) {
        if self.outcome.set(outcome).is_ok() {
            self.ended.notify_waiters();
        }
    }

    /// The attempt's outcome once it ends; `None` if it ended without one.
    pub async fn outcome(&self) -> Option<Outcome> {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end in between wakes it.
            ended.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            ended.await;
        }
    }
}

impl Claim {
    /// Makes the claim durable; fan-out may start only after `New`.
    pub async fn commit(&self) -> Result<Claimed, DbError> {
        let claimed = self.claims.store.claim(self.key.clone()).await?;
        // A row whose release failed is ours to run again.
        let released = self.claims.lock().released.remove(&*self.key);
        Ok(if released { Claimed::New } else { claimed })
    }

    /// The event was delivered (or was a duplicate): remember it.
    pub fn delivered(self, fresh: bool) {
        if fresh {
            self.claims.store.finish(self.key.clone());
        }
        self.claims.lock().recent.insert(self.key.clone());
        self.attempt
            .end(Some(Outcome::Success { duplicate: !fresh }));
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
        self.attempt.end(Some(outcome.clone()));
        released
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.lock().inflight.remove(&*self.key);
        self.attempt.end(None);
    }
}

#[derive(Default)]
struct State {
    /// Ids being run now, across every dispatch connection.
    inflight: HashMap<Key, Arc<Attempt>>,
    recent: Recent,
    /// Ids whose release failed: their row is ours to take over.
    released: HashSet<Key>,
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
    set: HashSet<Key>,
    order: VecDeque<Key>,
}

impl Recent {
    fn insert(&mut self, key: Key) {
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
        let attempt = Arc::new(Attempt::default());
        let key = Key::from(key);
        state.inflight.insert(key.clone(), attempt.clone());
        Begin::Run(Claim {
            key,
            attempt,
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
struct Finished(Mutex<Vec<Key>>);

impl Finished {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Key>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, key: Key) {
        let mut pending = self.lock();
        if pending.len() < MAX_PENDING_DONE {
            pending.push(key);
        }
    }

    fn take(&self) -> Vec<Key> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back marks whose write failed.
    fn restore(&self, keys: Vec<Key>) {
        let mut pending = self.lock();
        let room = MAX_PENDING_DONE.saturating_sub(pending.len());
        pending.extend(keys.into_iter().take(room));
    }
}

/// What one claim write found for an id.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    New,
    Done,
    /// Claimed, not finished, by another process (named).
    Held(String),
    /// Released between the insert and the read: claim it again.
    Gone,
}

/// Claims in `event_outcomes`, on SQLite or PostgreSQL.
pub struct SqlClaims {
    db: Db,
    claims: ClaimWriter,
    releases: Batcher<Key, ()>,
    finished: Arc<Finished>,
    /// False while claims cannot be written: `/readyz` says 503.
    healthy: Arc<AtomicBool>,
    peers: Option<Arc<dyn Peers>>,
    /// Longest wait for a live peer's attempt.
    wait: Duration,
}

impl SqlClaims {
    /// Starts the grouped writers and the retention sweeper. With `peers`
    /// (cluster mode), a claim held by a live peer waits up to `wait` for
    /// that attempt's outcome.
    pub fn start(
        db: Db,
        retention: Duration,
        peers: Option<(Arc<dyn Peers>, Duration)>,
        shutdown: &Shutdown,
    ) -> Arc<SqlClaims> {
        let owner = match &peers {
            Some((peers, _)) => peers.owner(),
            None => format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
        };
        let (peers, wait) = match peers {
            Some((peers, wait)) => (Some(peers), wait),
            None => (None, Duration::ZERO),
        };
        let healthy = Arc::new(AtomicBool::new(true));
        let finished = Arc::new(Finished::default());
        let claims = match ClaimThread::start(&db, owner.clone(), healthy.clone()) {
            Some(thread) => ClaimWriter::Thread(thread),
            None => {
                let (db, owner, healthy) = (db.clone(), owner.clone(), healthy.clone());
                ClaimWriter::Pool(Batcher::start(move |keys: Vec<Key>| {
                    let (db, owner, healthy) = (db.clone(), owner.clone(), healthy.clone());
                    async move {
                        let result = insert_claims(&db, &owner, &keys).await;
                        healthy.store(result.is_ok(), Ordering::Release);
                        result.map_err(|e| e.to_string())
                    }
                }))
            }
        };
        let releases = {
            let (db, owner) = (db.clone(), owner.clone());
            Batcher::start(move |keys: Vec<Key>| {
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
        shutdown.spawn(flusher(
            db.clone(),
            claims.thread(),
            finished.clone(),
            shutdown.clone(),
        ));
        shutdown.spawn(sweeper(db.clone(), retention, shutdown.clone()));
        Arc::new(SqlClaims {
            db,
            claims,
            releases,
            finished,
            healthy,
            peers,
            wait,
        })
    }

    /// Reads run in the claim thread's transactions; `None` where claims
    /// have no thread (PostgreSQL).
    pub fn fresh_reads(&self) -> Option<FreshReads> {
        self.claims.thread().map(FreshReads)
    }

    /// Whether the process that holds a claim may still finish it.
    async fn holder_live(&self, owner: &str) -> bool {
        match &self.peers {
            Some(peers) => peers.is_live(owner).await,
            None => false,
        }
    }

    /// Claims `key`; a claim held by a live peer is waited on until that
    /// attempt finishes (`Done`), releases it (claimed again), stops being
    /// live or outlasts the wait (`Abandoned`).
    async fn claim_or_wait(&self, key: Key) -> Result<Claimed, DbError> {
        let deadline = Instant::now() + self.wait;
        for _ in 0..MAX_ROUNDS {
            let found = self
                .claims
                .claim(key.clone())
                .await
                .map_err(DbError::Grouped)?;
            let mut holder = match found {
                Found::New => return Ok(Claimed::New),
                Found::Done => return Ok(Claimed::Done),
                Found::Held(owner) => owner,
                Found::Gone => continue,
            };
            let mut pause = FIRST_POLL;
            loop {
                if !self.holder_live(&holder).await {
                    return Ok(Claimed::Abandoned);
                }
                if Instant::now() >= deadline {
                    tracing::warn!(holder = %holder, wait = ?self.wait, "event id still in flight on a live node after the longest wait; treated as abandoned");
                    return Ok(Claimed::Abandoned);
                }
                tokio::time::sleep(pause.min(deadline - Instant::now())).await;
                pause = (pause * 2).min(MAX_POLL);
                match read_claim(&self.db, &key).await? {
                    Some((_, true)) => return Ok(Claimed::Done),
                    Some((owner, false)) => holder = owner,
                    // Released: the first attempt failed before fan-out.
                    None => break,
                }
            }
        }
        Ok(Claimed::Abandoned)
    }

    /// Whether the last claim write succeeded.
    pub fn healthy(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }
}

impl ClaimStore for SqlClaims {
    fn claim(&self, key: Key) -> BoxFuture<'_, Result<Claimed, DbError>> {
        Box::pin(self.claim_or_wait(key))
    }

    fn release(&self, key: Key) -> BoxFuture<'_, Result<(), DbError>> {
        Box::pin(async move { self.releases.submit(key).await.map_err(DbError::Grouped) })
    }

    fn finish(&self, key: Key) {
        self.finished.push(key);
    }
}

/// Pushes `(k1, k2, …)` with every key bound, closing an `IN (` the query
/// ends with.
macro_rules! push_keys {
    ($q:expr, $keys:expr) => {{
        let mut list = $q.separated(", ");
        for key in $keys {
            list.push_bind(&**key);
        }
        $q.push(")");
    }};
}

/// Marks finished claims `done` inside the transaction `$tx`.
macro_rules! mark_done {
    ($tx:expr, $keys:expr) => {
        for chunk in in_lock_order(&$keys).chunks(CHUNK) {
            let mut q =
                sqlx::QueryBuilder::new("UPDATE event_outcomes SET done = 1 WHERE event_id IN (");
            push_keys!(q, chunk);
            q.build().execute(&mut *$tx).await?;
        }
    };
}

/// `keys` in the one order every node writes them in. A statement locks
/// rows in the order it writes them, so two nodes writing overlapping ids
/// in arrival order can each wait for the other, and PostgreSQL fails one
/// of them ("deadlock detected"): a backend retrying an event on a second
/// node did that.
fn in_lock_order(keys: &[Key]) -> Vec<&Key> {
    let mut ordered: Vec<&Key> = keys.iter().collect();
    ordered.sort_unstable();
    ordered
}

/// Claims every key it can; for the keys it can't claim, reads who holds
/// them. Each chunk is one statement, atomic by itself: no explicit
/// transaction, so a round of claims is one round trip to the database
/// (this commit is on every event's way to its fan-out). The insert
/// returns no rows: when it added every key (the common case) all are
/// ours, and only a chunk with a key already present pays a read (a
/// `RETURNING` row per key cost more than the insert on SQLite).
async fn insert_claims(db: &Db, owner: &str, keys: &[Key]) -> Result<Vec<Found>, sqlx::Error> {
    let now = now_ms();
    let mut found = Vec::with_capacity(keys.len());
    with_conn!(db, c => {
        for chunk in keys.chunks(CHUNK) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO event_outcomes (event_id, completed_at, owner, done) ",
            );
            q.push_values(in_lock_order(chunk), |mut row, key| {
                row.push_bind(&**key).push_bind(now).push_bind(owner).push_bind(0_i64);
            });
            q.push(" ON CONFLICT (event_id) DO NOTHING");
            let added = q.build().execute(&mut *c).await?.rows_affected();
            if added == chunk.len() as u64 {
                found.extend(chunk.iter().map(|_| Found::New));
                continue;
            }
            let mut q = sqlx::QueryBuilder::new(
                // `done` is INTEGER (int4 on PostgreSQL): read as BIGINT on both.
                "SELECT event_id, owner, CAST(done AS BIGINT), completed_at FROM event_outcomes WHERE event_id IN (",
            );
            push_keys!(q, chunk);
            let rows: Vec<(String, String, i64, i64)> = q.build_query_as().fetch_all(&mut *c).await?;
            let held: HashMap<String, (String, i64, i64)> =
                rows.into_iter().map(|(k, o, d, at)| (k, (o, d, at))).collect();
            found.extend(chunk.iter().map(|key| claim_found(held.get(&**key), owner, now)));
        }
        Ok(())
    })?;
    Ok(found)
}

/// Who writes the claims: a thread of its own on SQLite, the pool (grouped
/// by a [`Batcher`]) on PostgreSQL or where that thread can't start.
enum ClaimWriter {
    Thread(ClaimThread),
    Pool(Batcher<Key, Found>),
}

impl ClaimWriter {
    async fn claim(&self, key: Key) -> Result<Found, String> {
        match self {
            ClaimWriter::Thread(thread) => thread.call(|reply| Job::Claim(key, reply)).await,
            ClaimWriter::Pool(batcher) => batcher.submit(key).await,
        }
    }

    /// The thread, which also writes the `done` marks (one writer on the
    /// file, so a claim never sits out SQLite's busy back-off behind them)
    /// and runs [`FreshReads`].
    fn thread(&self) -> Option<ClaimThread> {
        match self {
            ClaimWriter::Thread(thread) => Some(thread.clone()),
            ClaimWriter::Pool(_) => None,
        }
    }
}

/// SQLite: claim inserts and `done` marks on a thread of their own, over a
/// connection of its own. Through sqlx a group crossed to the pool
/// connection's thread and back for each statement, and once more to
/// return the connection: ~40 % of the process's futex calls at C = 100.
/// Here a claim is one message in and one wake back. It is a thread, not
/// the grouped writer's task, because a group's commit blocks for
/// milliseconds in a debug build: run inline on the event path's runtime
/// it pushed plugin calls past their time limit.
#[derive(Clone)]
struct ClaimThread(std::sync::mpsc::Sender<Job>);

enum Job {
    Claim(Key, Reply<Found>),
    MarkDone(Vec<Key>, Reply<()>),
    Read(Read),
}

/// A [`FreshReads`] read: runs in the thread's next transaction and
/// answers its own asker.
type Read = Box<dyn FnOnce(&rusqlite::Connection) + Send>;

/// Reads that must see the database as of after they were asked, run in
/// the transaction the claim thread opens anyway (SQLite only). A read
/// transaction of its own costs far more than the read: the file's WAL
/// read lock taken and dropped (`fcntl`), and a page cache dropped
/// whenever a commit moved the WAL since, which under load is every
/// time. Under load a read waits for the thread's next group (at most
/// [`COMMIT_EVERY`]), which the event's own claim waits for anyway.
#[derive(Clone)]
pub struct FreshReads(ClaimThread);

impl FreshReads {
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, String> {
        self.0
            .call(|reply| {
                Job::Read(Box::new(move |conn| {
                    let _ = reply.send(read(conn).map_err(|e| e.to_string()));
                }))
            })
            .await
    }
}

impl ClaimThread {
    /// `None` on PostgreSQL, or if the file can't be opened this way or
    /// the thread can't start (claims then go through the pool).
    fn start(db: &Db, owner: String, healthy: Arc<AtomicBool>) -> Option<ClaimThread> {
        let crate::db::Pool::Sqlite(pool) = db.pool() else {
            return None;
        };
        let path = pool.connect_options().get_filename().to_owned();
        let conn = match open_writer(&path) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "claims go through the sqlx pool: cannot open their own connection");
                return None;
            }
        };
        let (tx, jobs) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("otako-claims".into())
            .spawn(move || write_claims(conn, &owner, &jobs, &healthy));
        match spawned {
            Ok(_) => Some(ClaimThread(tx)),
            Err(err) => {
                tracing::warn!(error = %err, "claims go through the sqlx pool: cannot start their thread");
                None
            }
        }
    }

    async fn call<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, String> {
        let stopped = || "the claim writer thread has stopped".to_owned();
        let (reply, answered) = oneshot::channel();
        self.0.send(job(reply)).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// As the sqlx pool's connections: WAL (already the file's mode), no sync
/// per commit, the same WAL size kept, the same wait for the write lock.
fn open_writer(path: &std::path::Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "journal_size_limit", crate::db::WAL_KEEP_BYTES as i64)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The claim thread: every claim queued meanwhile goes into the next group,
/// up to [`GROUP_MAX`]. Under load it pauses between commits (see
/// [`COMMIT_EVERY`]): a commit costs about the same whatever it carries (its
/// pages written to the WAL, and a checkpoint every thousand of them), and
/// without the pause groups of ~4 claims cost more than sqlx's hand-offs
/// saved. An idle thread commits a claim at once. Ends when the last sender
/// goes.
fn write_claims(
    mut conn: rusqlite::Connection,
    owner: &str,
    jobs: &std::sync::mpsc::Receiver<Job>,
    healthy: &AtomicBool,
) {
    let mut keys = Vec::with_capacity(GROUP_MAX);
    let mut replies = Vec::with_capacity(GROUP_MAX);
    let mut reads = Vec::new();
    let mut last_commit: Option<std::time::Instant> = None;
    let mut pause = COMMIT_EVERY;
    while let Ok(first) = jobs.recv() {
        if let Some(next) = last_commit.map(|at| at + pause) {
            let now = std::time::Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        let mut job = Some(first);
        while let Some(next) = job.take() {
            match next {
                Job::Claim(key, reply) => {
                    keys.push(key);
                    replies.push(reply);
                }
                Job::MarkDone(done, reply) => {
                    let _ =
                        reply.send(mark_done_sqlite(&mut conn, &done).map_err(|e| e.to_string()));
                }
                Job::Read(read) => reads.push(read),
            }
            if keys.len() < GROUP_MAX {
                job = jobs.try_recv().ok();
            }
        }
        if keys.is_empty() {
            // Reads alone: one read transaction for all of them.
            if let Ok(tx) = conn.transaction() {
                reads.drain(..).for_each(|read| read(&tx));
                let _ = tx.commit();
            }
        } else {
            last_commit = Some(std::time::Instant::now());
            pause = if keys.len() >= BUSY_GROUP {
                COMMIT_EVERY
            } else {
                COMMIT_EVERY_LIGHT
            };
            let result = insert_claims_sqlite(&mut conn, owner, &keys, &mut reads);
            healthy.store(result.is_ok(), Ordering::Release);
            answer(replies.drain(..), result.map_err(|e| e.to_string()));
            keys.clear();
        }
        // Reads a failed transaction never reached still get an answer.
        reads.drain(..).for_each(|read| read(&conn));
    }
}

/// [`insert_claims`] on the thread's connection, the group in one
/// transaction (one commit), each chunk's keys as one JSON array (one
/// cached statement for any chunk size); `reads` run in it first.
fn insert_claims_sqlite(
    conn: &mut rusqlite::Connection,
    owner: &str,
    keys: &[Key],
    reads: &mut Vec<Read>,
) -> Result<Vec<Found>, rusqlite::Error> {
    let now = now_ms();
    let mut found = Vec::with_capacity(keys.len());
    // Immediate: take the write lock (waiting out another writer) before
    // reading, so the commit can't fail on a stale snapshot, and so the
    // reads see everything committed before the group began.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    reads.drain(..).for_each(|read| read(&tx));
    for chunk in keys.chunks(CHUNK) {
        let json = json_keys(chunk)?;
        // `WHERE true` keeps `ON CONFLICT` from parsing as a join.
        let added = tx
            .prepare_cached(
                "INSERT INTO event_outcomes (event_id, completed_at, owner, done) \
                 SELECT value, ?2, ?3, 0 FROM json_each(?1) WHERE true \
                 ON CONFLICT (event_id) DO NOTHING",
            )?
            .execute(rusqlite::params![json, now, owner])?;
        if added == chunk.len() {
            found.extend(chunk.iter().map(|_| Found::New));
            continue;
        }
        let mut read = tx.prepare_cached(
            "SELECT event_id, owner, CAST(done AS BIGINT), completed_at FROM event_outcomes \
             WHERE event_id IN (SELECT value FROM json_each(?1))",
        )?;
        let held = read
            .query_map([&json], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    (row.get(1)?, row.get(2)?, row.get(3)?),
                ))
            })?
            .collect::<Result<HashMap<String, (String, i64, i64)>, _>>()?;
        found.extend(
            chunk
                .iter()
                .map(|key| claim_found(held.get(&**key), owner, now)),
        );
    }
    tx.commit()?;
    Ok(found)
}

/// Marks finished claims `done` on the thread's connection, in one
/// transaction.
fn mark_done_sqlite(conn: &mut rusqlite::Connection, keys: &[Key]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for chunk in keys.chunks(CHUNK) {
        tx.prepare_cached(
            "UPDATE event_outcomes SET done = 1 WHERE event_id IN (SELECT value FROM json_each(?1))",
        )?
        .execute([json_keys(chunk)?])?;
    }
    tx.commit()
}

fn json_keys(keys: &[Key]) -> Result<String, rusqlite::Error> {
    serde_json::to_string(&keys.iter().map(|k| &**k).collect::<Vec<&str>>())
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// What a key's row, read right after this process's insert at `now`,
/// says about the claim.
fn claim_found(row: Option<&(String, i64, i64)>, owner: &str, now: i64) -> Found {
    match row {
        None => Found::Gone,
        Some((_, done, _)) if *done != 0 => Found::Done,
        // This insert's own row: this process never claims an id twice at
        // once, and an id it finished earlier is answered from memory
        // before any claim, so its unfinished row from this very
        // millisecond is the one just written.
        Some((holder, _, at)) if holder == owner && *at == now => Found::New,
        // Our own earlier success whose `done` mark is still queued.
        Some((holder, _, _)) if holder == owner => Found::Done,
        Some((holder, _, _)) => Found::Held(holder.clone()),
    }
}

/// One claim's holder and whether it is finished; `None` once released.
async fn read_claim(db: &Db, key: &str) -> Result<Option<(String, bool)>, sqlx::Error> {
    let row: Option<(String, i64)> = with_pool!(db, p => sqlx::query_as(
        "SELECT owner, CAST(done AS BIGINT) FROM event_outcomes WHERE event_id = $1",
    )
    .bind(key)
    .fetch_optional(p)
    .await)?;
    Ok(row.map(|(owner, done)| (owner, done != 0)))
}

async fn delete_claims(db: &Db, owner: &str, keys: &[Key]) -> Result<(), sqlx::Error> {
    with_conn!(db, c => {
        let mut tx = sqlx::Connection::begin(&mut *c).await?;
        for chunk in in_lock_order(keys).chunks(CHUNK) {
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
async fn flusher(db: Db, thread: Option<ClaimThread>, finished: Arc<Finished>, shutdown: Shutdown) {
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_millis(100)) => false,
        };
        let keys = finished.take();
        if !keys.is_empty() {
            let written = match &thread {
                Some(thread) => {
                    let keys = keys.clone();
                    thread.call(|reply| Job::MarkDone(keys, reply)).await
                }
                None => with_conn!(db, c => {
                    let mut tx = sqlx::Connection::begin(&mut *c).await?;
                    mark_done!(tx, keys);
                    tx.commit().await
                })
                .map_err(|e| e.to_string()),
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseUrl;
    use crate::db::Access;
    use crate::failure::{ErrorCode, Failure};

    /// One peer, `peer`, whose liveness the test sets.
    struct FakePeers(AtomicBool);

    impl Peers for FakePeers {
        fn owner(&self) -> String {
            "me".to_owned()
        }

        fn is_live<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, bool> {
            Box::pin(async move { owner == "peer" && self.0.load(Ordering::Acquire) })
        }
    }

    async fn setup(wait: Duration) -> (tempfile::TempDir, Db, Arc<FakePeers>, Arc<SqlClaims>) {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(dir.path().join("claims.db"));
        let db = Db::open(&url, 2, Access::ReadWrite).await.unwrap();
        db.migrate().await.unwrap();
        let peers = Arc::new(FakePeers(AtomicBool::new(true)));
        let store = SqlClaims::start(
            db.clone(),
            Duration::from_secs(3600),
            Some((peers.clone() as Arc<dyn Peers>, wait)),
            &Shutdown::new(),
        );
        (dir, db, peers, store)
    }

    /// A claim the peer holds, unfinished.
    async fn held_by_peer(db: &Db, key: &str) {
        with_pool!(db, p => sqlx::query(
            "INSERT INTO event_outcomes (event_id, completed_at, owner, done) VALUES ($1, $2, 'peer', 0)",
        )
        .bind(key)
        .bind(now_ms())
        .execute(p)
        .await
        .map(|_| ()))
        .unwrap();
    }

    async fn run(db: &Db, sql: &'static str, key: &str) {
        with_pool!(db, p => sqlx::query(sql).bind(key).execute(p).await.map(|_| ())).unwrap();
    }

    /// Claims `key` in a task, and checks it is still waiting a moment later.
    async fn waiting(store: &Arc<SqlClaims>, key: &str) -> tokio::task::JoinHandle<Claimed> {
        let (store, key) = (store.clone(), Key::from(key));
        let claim = tokio::spawn(async move { store.claim(key).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !claim.is_finished(),
            "returned while the peer's attempt ran"
        );
        claim
    }

    /// A second arrival of an id in flight here waits for the first
    /// attempt's outcome, whichever way it ends: delivered, failed, or
    /// dropped unfinished; once delivered, the id is a duplicate.
    #[tokio::test]
    async fn arrivals_of_an_id_in_flight_get_the_first_attempts_outcome() {
        let (_dir, _db, _peers, store) = setup(Duration::from_secs(30)).await;
        let claims = Claims::new(store);
        let waiter = |key: &str| match claims.begin(key) {
            Begin::Wait(first) => tokio::spawn(async move { first.outcome().await }),
            _ => panic!("{key} is in flight: its second arrival must wait"),
        };
        let run = |key: &str| match claims.begin(key) {
            Begin::Run(claim) => claim,
            _ => panic!("{key} is new"),
        };

        let first = run("a");
        let (early, late) = (waiter("a"), waiter("a"));
        tokio::task::yield_now().await;
        assert!(!early.is_finished(), "answered before the attempt ended");
        assert_eq!(first.commit().await.unwrap(), Claimed::New);
        first.delivered(true);
        for waited in [early, late] {
            assert!(matches!(
                waited.await.unwrap(),
                Some(Outcome::Success { duplicate: false })
            ));
        }
        assert!(matches!(claims.begin("a"), Begin::Duplicate));

        let first = run("b");
        let waited = waiter("b");
        let failed = Outcome::Failed(Failure::new(ErrorCode::UnknownUser, "no user 9"));
        first.failed(&failed, false).await.unwrap();
        assert!(matches!(
            waited.await.unwrap(),
            Some(Outcome::Failed(f)) if f.code == ErrorCode::UnknownUser
        ));
        // Released: the retry runs it again.
        drop(run("b"));

        let first = run("c");
        let waited = waiter("c");
        drop(first);
        let ended = tokio::time::timeout(Duration::from_secs(5), waited).await;
        assert!(
            ended
                .expect("the waiter was left waiting")
                .unwrap()
                .is_none(),
            "an unfinished attempt ends its waiters without an outcome"
        );
        drop(run("c"));
    }

    /// A fresh read sees every commit made before it was asked, whether it
    /// runs alone or in a group of claims, and a failing read answers
    /// with its error without costing the group its claims.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fresh_reads_see_commits_made_before_they_were_asked() {
        let (_dir, db, _peers, store) = setup(Duration::from_secs(30)).await;
        let fresh = store.fresh_reads().expect("SQLite claims have a thread");
        let version = |channel: i64| {
            let fresh = fresh.clone();
            async move {
                fresh
                    .run(move |conn| {
                        conn.query_row(
                            "SELECT version FROM channel_member_versions WHERE channel_id = ?1",
                            [channel],
                            |row| row.get::<_, i64>(0),
                        )
                    })
                    .await
            }
        };
        for round in 1..=50_i64 {
            // What a membership change's trigger does.
            with_pool!(db, p => sqlx::query(
                "INSERT INTO channel_member_versions (channel_id, version) VALUES (7, $1) \
                 ON CONFLICT (channel_id) DO UPDATE SET version = excluded.version",
            )
            .bind(round)
            .execute(p)
            .await
            .map(|_| ()))
            .unwrap();
            // Claims in flight, so the read joins a group's transaction.
            let claims: Vec<_> = (0..8)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move { store.claim(format!("r{round}-{i}").into()).await })
                })
                .collect();
            let read = version(7).await.unwrap();
            let broken = fresh
                .run(|conn| {
                    conn.query_row("SELECT nope FROM nowhere", [], |row| row.get::<_, i64>(0))
                })
                .await;
            for claim in claims {
                assert_eq!(claim.await.unwrap().unwrap(), Claimed::New);
            }
            let committed: i64 = with_pool!(db, p => sqlx::query_scalar(
                "SELECT version FROM channel_member_versions WHERE channel_id = 7",
            )
            .fetch_one(p)
            .await)
            .unwrap();
            assert_eq!(committed, round);
            assert_eq!(read, round, "round {round}: a read older than its request");
            assert!(
                broken.is_err_and(|e| e.contains("no such table")),
                "round {round}: a failing read must answer with its error"
            );
        }
    }

    #[tokio::test]
    async fn a_claim_held_by_a_live_peer_waits_for_its_success_or_its_release() {
        let (_dir, db, _peers, store) = setup(Duration::from_secs(30)).await;
        held_by_peer(&db, "ok").await;
        let claim = waiting(&store, "ok").await;
        run(
            &db,
            "UPDATE event_outcomes SET done = 1 WHERE event_id = $1",
            "ok",
        )
        .await;
        assert_eq!(claim.await.unwrap(), Claimed::Done);

        // Released (the peer's attempt failed): this process runs it.
        held_by_peer(&db, "failed").await;
        let claim = waiting(&store, "failed").await;
        run(
            &db,
            "DELETE FROM event_outcomes WHERE event_id = $1",
            "failed",
        )
        .await;
        assert_eq!(claim.await.unwrap(), Claimed::New);
        assert_eq!(
            read_claim(&db, "failed").await.unwrap(),
            Some(("me".to_owned(), false))
        );
    }

    #[tokio::test]
    async fn a_claim_of_a_dead_peer_or_past_the_wait_is_abandoned() {
        let (_dir, db, _peers, store) = setup(Duration::from_millis(400)).await;
        held_by_peer(&db, "slow").await;
        let started = Instant::now();
        assert_eq!(
            store.claim("slow".into()).await.unwrap(),
            Claimed::Abandoned
        );
        assert!(started.elapsed() >= Duration::from_millis(400));

        let (_dir, db, peers, store) = setup(Duration::from_secs(30)).await;
        held_by_peer(&db, "dead").await;
        let claim = waiting(&store, "dead").await;
        peers.0.store(false, Ordering::Release);
        let claimed = tokio::time::timeout(Duration::from_secs(5), claim).await;
        assert_eq!(claimed.unwrap().unwrap(), Claimed::Abandoned);
    }

    /// Two nodes claiming the same ids at once, in opposite orders, on
    /// PostgreSQL: each id is claimed by exactly one of them, and neither
    /// statement fails (written in arrival order, they deadlock).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_claims_from_two_nodes_do_not_deadlock_on_postgres() {
        const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
        let schema = format!("t_claims_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = sqlx::PgPool::connect(PG).await.unwrap();
        let ddl = |sql: String| sqlx::query(sqlx::AssertSqlSafe(sql));
        ddl(format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        let url = DatabaseUrl::Postgres(format!("{PG}?options=-c%20search_path%3D{schema}"));
        let db = Db::open(&url, 4, Access::ReadWrite).await.unwrap();
        db.migrate().await.unwrap();
        for round in 0..50 {
            let keys: Vec<Key> = (0..64).map(|i| format!("r{round}-{i:02}").into()).collect();
            let reversed: Vec<Key> = keys.iter().rev().cloned().collect();
            let (a, b) = tokio::join!(
                insert_claims(&db, "node-a", &keys),
                insert_claims(&db, "node-b", &reversed)
            );
            let a = a.unwrap_or_else(|e| panic!("round {round}, node a: {e}"));
            let b = b.unwrap_or_else(|e| panic!("round {round}, node b: {e}"));
            for (i, key) in keys.iter().enumerate() {
                let (by_a, by_b) = (&a[i], &b[keys.len() - 1 - i]);
                assert!(
                    (*by_a == Found::New) != (*by_b == Found::New),
                    "{key}: node a {by_a:?}, node b {by_b:?}"
                );
            }
        }
        ddl(format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await
            .unwrap();
    }

    /// One group through either SQLite writer: the pool's statements
    /// (PostgreSQL's too) or the claim thread's.
    async fn insert_with(db: &Db, thread: bool, keys: &[Key]) -> Vec<Found> {
        if !thread {
            return insert_claims(db, "me", keys).await.unwrap();
        }
        let crate::db::Pool::Sqlite(pool) = db.pool() else {
            unreachable!("an SQLite test database")
        };
        let mut conn = open_writer(pool.connect_options().get_filename()).unwrap();
        insert_claims_sqlite(&mut conn, "me", keys, &mut Vec::new()).unwrap()
    }

    /// One insert whose chunk mixes new ids with ids already present:
    /// each gets its own answer, including this process's own unfinished
    /// row from an earlier millisecond (its success's mark still queued).
    #[tokio::test]
    async fn a_chunk_mixing_new_and_present_ids_sorts_each() {
        for thread in [false, true] {
            let (_dir, db, _peers, _store) = setup(Duration::from_secs(30)).await;
            held_by_peer(&db, "peer-held").await;
            // An earlier millisecond, but inside the retention window: the
            // store's sweeper, running from the start, deletes older rows.
            let earlier = now_ms() - 1;
            with_pool!(db, p => sqlx::query(
                "INSERT INTO event_outcomes (event_id, completed_at, owner, done) \
                 VALUES ('peer-done', $1, 'peer', 1), ('mine-queued', $1, 'me', 0)",
            )
            .bind(earlier)
            .execute(p)
            .await
            .map(|_| ()))
            .unwrap();
            let keys: Vec<Key> = ["a", "peer-held", "b", "peer-done", "mine-queued", "c"]
                .into_iter()
                .map(Key::from)
                .collect();
            assert_eq!(
                insert_with(&db, thread, &keys).await,
                vec![
                    Found::New,
                    Found::Held("peer".to_owned()),
                    Found::New,
                    Found::Done,
                    Found::Done,
                    Found::New,
                ],
                "claim thread: {thread}"
            );
            // Every new id is claimed in the table, by this process.
            for key in ["a", "b", "c"] {
                assert_eq!(
                    read_claim(&db, key).await.unwrap(),
                    Some(("me".to_owned(), false))
                );
            }
            // All new, over two chunks: no read needed, all ours.
            let fresh: Vec<Key> = (0..300).map(|i| format!("k{i}").into()).collect();
            let found = insert_with(&db, thread, &fresh).await;
            assert!(found.iter().all(|f| *f == Found::New), "{found:?}");
            assert_eq!(
                read_claim(&db, "k299").await.unwrap(),
                Some(("me".to_owned(), false))
            );
        }
    }

    /// The store's own path on SQLite: claims and `done` marks through its
    /// thread, and a second claim of a finished id is a duplicate.
    #[tokio::test]
    async fn claims_and_done_marks_go_through_the_claim_thread() {
        let (_dir, db, _peers, store) = setup(Duration::from_secs(30)).await;
        let thread = store
            .claims
            .thread()
            .expect("SQLite claims run on their thread");
        let claimed =
            futures_util::future::join_all((0..50).map(|i| store.claim(format!("e{i}").into())))
                .await;
        assert!(
            claimed.iter().all(|c| matches!(c, Ok(Claimed::New))),
            "{claimed:?}"
        );
        assert_eq!(
            read_claim(&db, "e7").await.unwrap(),
            Some(("me".to_owned(), false))
        );
        let keys = vec![Key::from("e7")];
        thread
            .call(|reply| Job::MarkDone(keys, reply))
            .await
            .unwrap();
        assert_eq!(
            read_claim(&db, "e7").await.unwrap(),
            Some(("me".to_owned(), true))
        );
        assert_eq!(store.claim("e7".into()).await.unwrap(), Claimed::Done);
    }
}
