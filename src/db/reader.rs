//! Reads on SQLite run on the calling thread: plugin queries, and the
//! host's own lookups on an event's way to its fan-out (membership
//! versions, user existence).
//!
//! sqlx gives every SQLite connection a thread of its own, so each query
//! is two thread hand-offs, which cost more than the point lookups plugins
//! make (a quarter of the gateway's CPU under load, by profile) and, with
//! the cores busy writing frames, wait for that thread to be scheduled
//! (milliseconds of delivery latency). Here a
//! read runs inline on the tokio worker within a short budget; a read that
//! outgrows it is interrupted and run again on a blocking thread under the
//! query's real deadline, so a slow plugin query holds a worker for at most
//! the budget. The connections are `query_only`, so running a read twice
//! is safe.
//!
//! A connection keeps its read transaction open after a read, and a later
//! read that only needs the database as of an earlier moment (a plugin's
//! lookup needs it as of when its event arrived) runs in it: under load
//! that is most of them. Beginning and ending a read transaction was ~12 %
//! of the gateway's CPU under the chat mix (the WAL read lock's mutex and
//! `fcntl`s). But the writer can only restart the WAL from its start at a
//! moment when no reader holds a snapshot: with one always held somewhere,
//! the WAL grew by 30 MB/s. So a closer thread watches the WAL file: past
//! [`WAL_HOLD_LIMIT`] no snapshot is held (reads end theirs as before,
//! and the closer ends those idle connections hold) until a restart has
//! cut the file back to [`crate::db::WAL_KEEP_BYTES`]. It also ends
//! snapshots left unused for [`IDLE_END`], so an idle gateway pins
//! nothing another process's writes need.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::affinity::LocalPool;

/// How long a read may hold a tokio worker before it moves off it.
const INLINE_BUDGET: Duration = Duration::from_millis(1);
/// SQLite VM steps between deadline checks (a few microseconds' work).
const PROGRESS_STEPS: i32 = 1000;
/// Prepared statements kept per connection: plugins send a few fixed SQL
/// texts, so preparing is paid once per text and connection.
const STATEMENT_CACHE: usize = 128;
/// How long one of the host's own lookups ([`SqliteReader::read_keyed`])
/// may take: as long as sqlx waits for a pooled connection.
const HOST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys per read in [`SqliteReader::read_keyed`]: an index probe each,
/// tens of microseconds in all.
const KEYED_CHUNK: usize = 64;
/// WAL file size past which no snapshot is held (see the module's doc):
/// twice what a restart leaves.
const WAL_HOLD_LIMIT: u64 = 2 * crate::db::WAL_KEEP_BYTES;
/// How often the closer looks at the WAL while snapshots are open.
const CHECK_EVERY: Duration = Duration::from_millis(2);
/// A snapshot unused this long is ended.
const IDLE_END: Duration = Duration::from_millis(10);
/// Largest string or blob a plugin query may produce (SQLite's default is
/// 1 GB): `randomblob(1e9)` would otherwise allocate that much in the
/// host before the plugin's own memory limit could refuse it.
const MAX_VALUE_BYTES: i32 = 64 * 1024 * 1024;

/// Why a read did not produce the work's own result.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open {path} for inline reads: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("the read thread failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot encode the lookup's keys: {0}")]
    Keys(#[from] serde_json::Error),
    #[error("cannot start the thread that ends idle read transactions: {0}")]
    Closer(std::io::Error),
}

/// Read-only SQLite connections for inline reads: cheap to clone.
#[derive(Clone)]
pub struct SqliteReader {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The closer thread (see the module's doc); it parks while no
    /// snapshot is open.
    closer: OnceLock<std::thread::Thread>,
    closer_parked: AtomicBool,
    /// Set by the closer while the WAL file is past [`WAL_HOLD_LIMIT`].
    wal_full: AtomicBool,
    /// Each preferably taken by the worker that used it last (its page
    /// cache is in that core's cache).
    idle: LocalPool<ReadConn>,
    /// Idle connections kept; more may be open while reads overlap.
    keep: usize,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReader")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteReader {
    /// Opens one connection now, so a bad path fails at start-up.
    pub fn open(path: &Path, keep: usize) -> Result<SqliteReader, ReadError> {
        let first = ReadConn::open(path)?;
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            closer: OnceLock::new(),
            closer_parked: AtomicBool::new(false),
            wal_full: AtomicBool::new(false),
            idle: LocalPool::default(),
            keep: keep.max(1),
        });
        let _ = inner.idle.give(first, inner.keep);
        let weak = Arc::downgrade(&inner);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let closer = std::thread::Builder::new()
            .name("otako-snapshots".into())
            .spawn(move || close_snapshots(&weak, Path::new(&wal)))
            .map_err(ReadError::Closer)?;
        let _ = inner.closer.set(closer.thread().clone());
        Ok(SqliteReader { inner })
    }

    /// Runs `work` on a connection, interrupting it at `deadline`, on a
    /// snapshot of the database taken now or later.
    ///
    /// `work` may run twice: once inline, cut off at the budget, then on a
    /// blocking thread. It must only read.
    pub async fn read<T, F>(&self, deadline: Instant, work: F) -> Result<T, ReadError>
    where
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.read_since(Instant::now(), deadline, work).await
    }

    /// As [`read`](Self::read), on a snapshot taken at `since` or later:
    /// it holds every commit made before `since`, and may be one another
    /// read already opened.
    pub async fn read_since<T, F>(
        &self,
        since: Instant,
        deadline: Instant,
        work: F,
    ) -> Result<T, ReadError>
    where
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let mut conn = self.take()?;
        let hold = !self.inner.wal_full.load(Ordering::Relaxed);
        let budget = deadline.min(Instant::now() + INLINE_BUDGET);
        let inline = conn.run(since, hold, budget, &work);
        let outgrown = budget < deadline
            && matches!(
                inline.as_ref().map_err(rusqlite::Error::sqlite_error_code),
                Err(Some(
                    ErrorCode::OperationInterrupted | ErrorCode::DatabaseBusy
                ))
            );
        if !outgrown {
            self.give(conn);
            return Ok(inline?);
        }
        let (conn, out) = tokio::task::spawn_blocking(move || {
            let out = conn.run(since, hold, deadline, &work);
            (conn, out)
        })
        .await?;
        self.give(conn);
        Ok(out?)
    }

    /// The rows of `sql` for a batch of keys, mapped by `row`. `sql` takes
    /// keys as one JSON array in `?1`, as in
    /// `WHERE id IN (SELECT value FROM json_each(?1))`, so one cached
    /// statement serves any number of them. Keys go [`KEYED_CHUNK`] per
    /// read, so a big batch is several short reads, each well inside the
    /// inline budget, instead of one that outgrows it and runs twice.
    pub async fn read_keyed<K, T>(
        &self,
        sql: &'static str,
        keys: &[K],
        row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, ReadError>
    where
        K: serde::Serialize,
        T: Send + 'static,
    {
        let mut out = Vec::new();
        for chunk in keys.chunks(KEYED_CHUNK) {
            let keys = serde_json::to_string(chunk)?;
            let rows = self
                .read(Instant::now() + HOST_READ_TIMEOUT, move |conn| {
                    conn.prepare_cached(sql)?
                        .query_map([&keys], row)?
                        .collect::<rusqlite::Result<Vec<T>>>()
                })
                .await?;
            out.extend(rows);
        }
        Ok(out)
    }

    fn take(&self) -> Result<ReadConn, ReadError> {
        match self.inner.idle.take() {
            Some(conn) => Ok(conn),
            None => ReadConn::open(&self.inner.path),
        }
    }

    fn give(&self, mut conn: ReadConn) {
        if self.inner.wal_full.load(Ordering::Relaxed) {
            conn.end();
        }
        if !conn.consistent() {
            // Closed, not reused.
            return;
        }
        // Beyond `keep`, the connection closes.
        let open = conn.snapshot.is_some();
        let _ = self.inner.idle.give(conn, self.inner.keep);
        let inner = &self.inner;
        if open
            && inner.closer_parked.load(Ordering::Relaxed)
            && inner.closer_parked.swap(false, Ordering::AcqRel)
            && let Some(closer) = inner.closer.get()
        {
            closer.unpark();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The closer then finds the reader gone and ends.
        if let Some(closer) = self.closer.get() {
            closer.unpark();
        }
    }
}

/// The closer thread (see the module's doc): while snapshots are open or
/// the WAL is past its limit, looks every [`CHECK_EVERY`] (backing off
/// while the WAL stays full with nothing held); else parks. Ends with the
/// reader.
fn close_snapshots(reader: &std::sync::Weak<Inner>, wal: &Path) {
    let mut pause = CHECK_EVERY;
    loop {
        let Some(inner) = reader.upgrade() else {
            return;
        };
        // No WAL file (yet, or any more) is an empty one.
        let size = std::fs::metadata(wal).map_or(0, |m| m.len());
        let full = size > WAL_HOLD_LIMIT;
        inner.wal_full.store(full, Ordering::Relaxed);
        let now = Instant::now();
        let mut open = false;
        inner
            .idle
            .each(|conn| open |= conn.end_unless_used(full, now));
        if open || full {
            drop(inner);
            pause = if open || !full {
                CHECK_EVERY
            } else {
                (pause * 2).min(Duration::from_secs(1))
            };
            std::thread::sleep(pause);
            continue;
        }
        // Announce the park before looking again: a connection given back
        // after this look sees the flag and wakes the thread.
        inner.closer_parked.store(true, Ordering::SeqCst);
        inner.idle.each(|conn| open |= conn.snapshot.is_some());
        drop(inner);
        if !open {
            std::thread::park();
        }
    }
}

/// One connection, the deadline its progress handler enforces, and its
/// open read transaction.
struct ReadConn {
    conn: Connection,
    /// Nanoseconds since [`epoch`]; the running statement is interrupted
    /// once the clock passes it.
    deadline: Arc<AtomicU64>,
    /// The open read transaction, if any.
    snapshot: Option<Snapshot>,
}

/// An open read transaction.
#[derive(Clone, Copy)]
struct Snapshot {
    /// Just before it began: it holds every commit made before this.
    taken: Instant,
    last_read: Instant,
}

impl ReadConn {
    fn open(path: &Path) -> Result<ReadConn, ReadError> {
        let open_err = |source| ReadError::Open {
            path: path.display().to_string(),
            source,
        };
        // Read-write flags with `query_only`, as sqlx opens its pools: a WAL
        // database opened read-only can't create its `-shm`, and a missing
        // file is created empty, as the read-write pool would.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(open_err)?;
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
            .map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let deadline = Arc::new(AtomicU64::new(u64::MAX));
        let watched = deadline.clone();
        conn.progress_handler(
            PROGRESS_STEPS,
            Some(move || since_epoch(Instant::now()) >= watched.load(Ordering::Relaxed)),
        )
        .map_err(open_err)?;
        Ok(ReadConn {
            conn,
            deadline,
            snapshot: None,
        })
    }

    /// Runs `work` in a read transaction taken at `since` or later: the
    /// open one if it is, else a new one, kept open if `hold`.
    fn run<T>(
        &mut self,
        since: Instant,
        hold: bool,
        deadline: Instant,
        work: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        // A busy database (a WAL reset in progress) waits no longer than
        // the read may take.
        self.conn
            .busy_timeout(deadline.saturating_duration_since(Instant::now()))?;
        let now = Instant::now();
        match &mut self.snapshot {
            Some(open) if hold && open.taken >= since => open.last_read = now,
            _ => {
                self.end();
                if hold {
                    // Deferred: the snapshot is taken by the first read,
                    // after `now`.
                    self.conn.prepare_cached("BEGIN")?.execute([])?;
                    self.snapshot = Some(Snapshot {
                        taken: now,
                        last_read: now,
                    });
                }
            }
        }
        self.deadline
            .store(since_epoch(deadline), Ordering::Relaxed);
        let out = work(&self.conn);
        // Unarmed again: BEGIN and COMMIT are never interrupted (a COMMIT
        // cut short would leave the transaction open).
        self.deadline.store(u64::MAX, Ordering::Relaxed);
        if out.is_err() {
            // An interrupted read may have ended the transaction itself.
            self.end();
        }
        out
    }

    /// Ends the open read transaction, if any.
    fn end(&mut self) {
        self.snapshot = None;
        if !self.conn.is_autocommit() {
            let ended = self
                .conn
                .prepare_cached("COMMIT")
                .and_then(|mut c| c.execute([]));
            if ended.is_err() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
    }

    /// Whether the connection is in no transaction but its own: one it
    /// can't account for would serve reads an old snapshot.
    fn consistent(&self) -> bool {
        self.snapshot.is_some() || self.conn.is_autocommit()
    }

    /// Ends the snapshot if `always` or unused for [`IDLE_END`]; true if
    /// one stays open.
    fn end_unless_used(&mut self, always: bool, now: Instant) -> bool {
        match self.snapshot {
            Some(open) if always || now.duration_since(open.last_read) >= IDLE_END => {
                self.end();
                false
            }
            Some(_) => true,
            None => false,
        }
    }
}

fn since_epoch(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1), (2);")
            .unwrap();
        (dir, path)
    }

    fn count(conn: &Connection) -> rusqlite::Result<i64> {
        conn.prepare_cached("SELECT COUNT(*) FROM t")?
            .query_row([], |r| r.get(0))
    }

    const ENDLESS: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                           SELECT COUNT(*) FROM n";

    #[tokio::test]
    async fn reads_see_writes_committed_before_them() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 2).unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        assert_eq!(reader.read(far, count).await.unwrap(), 2);
        Connection::open(&path)
            .unwrap()
            .execute("INSERT INTO t VALUES (3)", [])
            .unwrap();
        assert_eq!(reader.read(far, count).await.unwrap(), 3);
    }

    /// A read that needs the database only as of an earlier moment runs
    /// in the snapshot an earlier read opened after that moment.
    #[tokio::test]
    async fn reads_since_an_earlier_moment_share_a_snapshot() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 1).unwrap();
        let writer = Connection::open(&path).unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        let mut shared = 0;
        // A stall past IDLE_END lets the closer end the snapshot between
        // the two reads; five tries make that all but impossible.
        for _ in 0..5 {
            let arrived = Instant::now();
            let before = reader.read_since(arrived, far, count).await.unwrap();
            writer.execute("INSERT INTO t VALUES (9)", []).unwrap();
            if reader.read_since(arrived, far, count).await.unwrap() == before {
                shared += 1;
            }
            // A read needing the database as of now sees the insert.
            assert_eq!(reader.read(far, count).await.unwrap(), before + 1);
        }
        assert!(shared > 0, "no read ran in the earlier snapshot");
    }

    /// Reads past their deadline are cut (now and then: the progress
    /// handler runs every thousand VM steps, counted across a cached
    /// statement's runs), but the transaction around them always ends, so
    /// the next read on the connection begins a fresh one.
    #[tokio::test]
    async fn a_cut_read_leaves_no_transaction_behind() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 1).unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        let mut cut = 0;
        for _ in 0..3000 {
            if reader.read(Instant::now(), count).await.is_err() {
                cut += 1;
            }
            assert_eq!(reader.read(far, count).await.unwrap(), 2);
        }
        assert!(cut > 0, "no read was cut at its deadline");
    }

    /// An idle connection's snapshot is ended soon, so a writer can
    /// checkpoint and restart the whole WAL.
    #[tokio::test]
    async fn idle_snapshots_are_ended() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 1).unwrap();
        let writer = Connection::open(&path).unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        assert_eq!(reader.read(far, count).await.unwrap(), 2);
        writer.execute("INSERT INTO t VALUES (3)", []).unwrap();
        let truncate = || {
            writer
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
        };
        // A held snapshot keeps the checkpoint from completing (busy = 1).
        let until = Instant::now() + Duration::from_secs(5);
        while truncate() != 0 {
            assert!(Instant::now() < until, "the snapshot was never ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn keyed_reads_take_any_number_of_keys() {
        let (_dir, path) = database();
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                r#"CREATE TABLE k (id TEXT PRIMARY KEY); INSERT INTO k VALUES ('a"b'), ('x''y');"#,
            )
            .unwrap();
        let reader = SqliteReader::open(&path, 1).unwrap();
        const INTS: &str =
            "SELECT v FROM t WHERE v IN (SELECT value FROM json_each(?1)) ORDER BY v";
        let int = |r: &rusqlite::Row<'_>| r.get::<_, i64>(0);
        assert_eq!(reader.read_keyed(INTS, &[2, 5], int).await.unwrap(), [2]);
        assert!(
            reader
                .read_keyed::<i64, _>(INTS, &[], int)
                .await
                .unwrap()
                .is_empty()
        );
        let many: Vec<i64> = (0..50_000).collect();
        assert_eq!(reader.read_keyed(INTS, &many, int).await.unwrap(), [1, 2]);
        // Text keys arrive intact whatever quotes they hold.
        const TEXTS: &str =
            "SELECT id FROM k WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id";
        let text = |r: &rusqlite::Row<'_>| r.get::<_, String>(0);
        assert_eq!(
            reader
                .read_keyed(TEXTS, &["x'y", "a\"b", "zz"], text)
                .await
                .unwrap(),
            ["a\"b", "x'y"]
        );
    }

    #[tokio::test]
    async fn writes_are_refused() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 1).unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        let err = reader
            .read(far, |c| c.execute("DELETE FROM t", []))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ReadError::Sqlite(e) if e.sqlite_error_code() == Some(ErrorCode::ReadOnly)),
            "{err:?}"
        );
        assert_eq!(reader.read(far, count).await.unwrap(), 2);
    }

    /// A read past the inline budget moves to a blocking thread and is
    /// still stopped at its deadline; the connection then serves reads.
    #[tokio::test]
    async fn a_slow_read_is_interrupted_at_its_deadline() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 1).unwrap();
        let started = Instant::now();
        let err = reader
            .read(started + Duration::from_millis(200), |c| {
                c.query_row(ENDLESS, [], |r| r.get::<_, i64>(0))
            })
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&err, ReadError::Sqlite(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted)),
            "{err:?}"
        );
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let far = Instant::now() + Duration::from_secs(5);
        assert_eq!(reader.read(far, count).await.unwrap(), 2);
    }

    /// The inline attempt is cut at the budget, so a slow read leaves the
    /// worker free: on a one-thread runtime a timer still fires meanwhile.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_read_does_not_hold_the_worker() {
        let (_dir, path) = database();
        let reader = SqliteReader::open(&path, 1).unwrap();
        // Far off, so a loaded machine's 50 ms sleep fires before it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let slow = tokio::spawn({
            let reader = reader.clone();
            async move {
                reader
                    .read(deadline, |c| {
                        c.query_row(ENDLESS, [], |r| r.get::<_, i64>(0))
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ticked = Instant::now();
        // A read holding the worker would have run to its deadline (and
        // finished, interrupted) before the timer could fire.
        assert!(!slow.is_finished(), "the worker was held by the read");
        assert!(ticked < deadline, "the worker was held by the read");
        assert!(slow.await.unwrap().is_err());
    }
}
