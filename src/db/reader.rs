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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode, OpenFlags};

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
}

/// Read-only SQLite connections for inline reads: cheap to clone.
#[derive(Clone)]
pub struct SqliteReader {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<ReadConn>>,
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
        Ok(SqliteReader {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                idle: Mutex::new(vec![first]),
                keep: keep.max(1),
            }),
        })
    }

    /// Runs `work` on a connection, interrupting it at `deadline`.
    ///
    /// `work` may run twice: once inline, cut off at the budget, then on a
    /// blocking thread. It must only read.
    pub async fn read<T, F>(&self, deadline: Instant, work: F) -> Result<T, ReadError>
    where
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let mut conn = self.take()?;
        let budget = deadline.min(Instant::now() + INLINE_BUDGET);
        let inline = conn.run(budget, &work);
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
            let out = conn.run(deadline, &work);
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
        let idle = self.lock().pop();
        match idle {
            Some(conn) => Ok(conn),
            None => ReadConn::open(&self.inner.path),
        }
    }

    fn give(&self, conn: ReadConn) {
        let mut idle = self.lock();
        if idle.len() < self.inner.keep {
            idle.push(conn);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReadConn>> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection and the deadline its progress handler enforces.
struct ReadConn {
    conn: Connection,
    /// Nanoseconds since [`epoch`]; the running statement is interrupted
    /// once the clock passes it.
    deadline: Arc<AtomicU64>,
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
        Ok(ReadConn { conn, deadline })
    }

    fn run<T>(
        &mut self,
        deadline: Instant,
        work: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.deadline
            .store(since_epoch(deadline), Ordering::Relaxed);
        // A busy database (a WAL reset in progress) waits no longer than
        // the read may take.
        self.conn
            .busy_timeout(deadline.saturating_duration_since(Instant::now()))?;
        work(&self.conn)
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
