//! The database: an SQLite file (embedded default, WAL) or PostgreSQL, with
//! the same schema and the same `$n`-parameter SQL on both (DESIGN §8).
//!
//! Callers write one query and run it on whichever pool is configured with
//! [`with_pool!`](crate::with_pool); each arm is type-checked against its
//! own driver, so there is no `Any`-driver conversion on the hot path.
//! Plugin queries and the per-event host lookups on SQLite go through
//! [`SqliteReader`] instead, which runs them on the calling thread.

mod batch;
mod pg_reader;
mod reader;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::config::DatabaseUrl;
pub use batch::{Batcher, GROUP_MAX, Reply, answer};
pub use pg_reader::PgReader;
pub use reader::{ReadError, SqliteReader};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// A database failure, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot create database folder {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Query(#[from] sqlx::Error),
    #[error(transparent)]
    Reader(#[from] ReadError),
    /// A grouped operation ([`Batcher`]) failed for its whole group.
    #[error("{0}")]
    Grouped(String),
}

/// A lookup by a set of keys, written once for both backends with
/// [`keyed_sql!`](crate::keyed_sql): the keys travel as one JSON array
/// parameter, so one cached statement serves any number of them.
#[derive(Debug, Clone, Copy)]
pub struct KeyedSql {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// `keyed_sql!("SELECT id FROM users WHERE id IN", "bigint")`: the keys
/// become the list after `IN`, cast to the column's PostgreSQL type.
#[macro_export]
macro_rules! keyed_sql {
    ($head:literal, $pg_type:literal) => {
        $crate::db::KeyedSql {
            sqlite: concat!($head, " (SELECT value FROM json_each(?1))"),
            postgres: concat!(
                $head,
                " (SELECT value::",
                $pg_type,
                " FROM json_array_elements_text($1::json))"
            ),
        }
    };
}

/// Keys per PostgreSQL keyed read.
const PG_KEYED_CHUNK: usize = 1000;

/// A connection pool for the configured backend.
#[derive(Debug, Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$p` bound to the concrete pool.
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db.pool() {
            $crate::db::Pool::Sqlite($p) => $body,
            $crate::db::Pool::Postgres($p) => $body,
        }
    };
}

/// Runs the async block `$body` with `$c` bound to one connection of the
/// concrete pool (`&mut SqliteConnection` or `&mut PgConnection`); `$body`
/// must evaluate to `Result<_, sqlx::Error>`. Use it for writes.
///
/// A connection whose work failed is closed instead of going back to the
/// pool: after a failed write (a full disk, an I/O error) SQLite can keep
/// the connection's transaction and its write lock, and every later write
/// would then fail with "database is locked" long after the fault cleared.
/// A fresh connection starts clean, so writes recover by themselves.
#[macro_export]
macro_rules! with_conn {
    ($db:expr, $c:ident => $body:expr) => {
        match $db.pool() {
            $crate::db::Pool::Sqlite(p) => $crate::with_conn!(@on p, $c => $body),
            $crate::db::Pool::Postgres(p) => $crate::with_conn!(@on p, $c => $body),
        }
    };
    (@on $p:ident, $c:ident => $body:expr) => {
        match $p.acquire().await {
            Err(e) => Err(e),
            Ok(mut conn) => {
                let result: Result<_, sqlx::Error> = async {
                    let $c = &mut *conn;
                    $body
                }
                .await;
                if result.is_err() {
                    conn.close_on_drop();
                }
                result
            }
        }
    };
}

/// A handle to the database: cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
    /// Inline reads, for a read-only handle on SQLite.
    reader: Option<SqliteReader>,
    /// Pipelined plugin reads, for a read-only handle on PostgreSQL.
    pg_reader: Option<Arc<PgReader>>,
}

/// Whether a pool may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Enforced by the database itself (SQLite `query_only`, PostgreSQL
    /// read-only transactions), not by inspecting SQL: this is the pool
    /// plugins query through.
    ReadOnly,
}

impl Db {
    /// Opens a pool, creating an SQLite file (and its folder) on first run.
    pub async fn open(
        url: &DatabaseUrl,
        max_connections: u32,
        access: Access,
    ) -> Result<Db, DbError> {
        let mut reader = None;
        let mut pg_reader = None;
        let pool = match url {
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| DbError::Folder {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                let options = sqlite_options(path, access);
                let pool_options = SqlitePoolOptions::new()
                    // sqlx pings every connection it hands out by default:
                    // for SQLite a round trip to the connection's thread,
                    // as costly as the query itself. A file can't go away
                    // under an open connection; an error fails the event,
                    // which the backend retries.
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(10));
                let pool = if access == Access::ReadOnly {
                    // Reads go through the reader; the sqlx pool is
                    // only for `with_pool!` callers, so it opens nothing
                    // (no connection thread) until one uses it.
                    let keep = usize::try_from(max_connections).unwrap_or(usize::MAX);
                    reader = Some(SqliteReader::open(path, keep)?);
                    pool_options.max_connections(1).connect_lazy_with(options)
                } else {
                    pool_options
                        .max_connections(max_connections)
                        .connect_with(options)
                        .await
                        .map_err(|source| DbError::Open {
                            url: url.to_string(),
                            source,
                        })?
                };
                Pool::Sqlite(pool)
            }
            DatabaseUrl::Postgres(raw) => {
                let open_err = |source| DbError::Open {
                    url: url.to_string(),
                    source,
                };
                let mut options = PgConnectOptions::from_str(raw).map_err(open_err)?;
                if access == Access::ReadOnly {
                    options = options.options([("default_transaction_read_only", "on")]);
                    let connections = usize::try_from(max_connections).unwrap_or(usize::MAX);
                    match PgReader::new(raw, connections) {
                        Ok(r) => pg_reader = Some(Arc::new(r)),
                        Err(why) => tracing::info!(
                            reason = %why,
                            "plugin queries on PostgreSQL go through sqlx, one round trip per statement: the pipelined reader can't use this database.url"
                        ),
                    }
                }
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections)
                    // No ping round trip before every query (sqlx's default):
                    // a dead connection fails one query, is closed by sqlx,
                    // and the event is retried by the backend.
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await
                    .map_err(open_err)?;
                Pool::Postgres(pool)
            }
        };
        Ok(Db {
            pool,
            reader,
            pg_reader,
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The inline read path: `Some` for a read-only SQLite handle.
    pub fn sqlite_reader(&self) -> Option<&SqliteReader> {
        self.reader.as_ref()
    }

    /// The pipelined plugin read path: `Some` for a read-only PostgreSQL
    /// handle whose URL tokio-postgres reads.
    pub fn pg_reader(&self) -> Option<&PgReader> {
        self.pg_reader.as_deref()
    }

    /// `"sqlite"` or `"postgres"`, for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Applies pending migrations; returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, DbError> {
        // A new database has no migrations table yet: count that as none.
        let before: i64 = with_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM _sqlx_migrations WHERE success"
        )
        .fetch_one(p)
        .await
        .unwrap_or(0));
        let migrator = match &self.pool {
            Pool::Sqlite(p) => {
                SQLITE_MIGRATIONS.run(p).await?;
                &SQLITE_MIGRATIONS
            }
            Pool::Postgres(p) => {
                POSTGRES_MIGRATIONS.run(p).await?;
                &POSTGRES_MIGRATIONS
            }
        };
        Ok(migrator
            .iter()
            .count()
            .saturating_sub(usize::try_from(before).unwrap_or(0)))
    }

    /// The rows `sql` finds for `keys`. On a read-only SQLite handle the
    /// read runs inline (see [`SqliteReader`]), mapping rows with
    /// `sqlite_row`; elsewhere it goes through sqlx.
    pub async fn read_keyed<K, T>(
        &self,
        sql: KeyedSql,
        keys: &[K],
        sqlite_row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, DbError>
    where
        K: serde::Serialize,
        T: Send + Unpin + 'static,
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        if let Some(reader) = &self.reader {
            return Ok(reader.read_keyed(sql.sqlite, keys, sqlite_row).await?);
        }
        let mut found = Vec::new();
        for chunk in keys.chunks(PG_KEYED_CHUNK) {
            let json = serde_json::to_string(chunk).map_err(ReadError::from)?;
            let rows: Vec<T> = match &self.pool {
                Pool::Sqlite(p) => sqlx::query_as(sql.sqlite).bind(json).fetch_all(p).await?,
                Pool::Postgres(p) => sqlx::query_as(sql.postgres).bind(json).fetch_all(p).await?,
            };
            found.extend(rows);
        }
        Ok(found)
    }

    /// A trivial round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<(), DbError> {
        with_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }
}

/// What a WAL file is cut back to when a writer restarts it
/// (`journal_size_limit` on every writing connection): a burst's WAL
/// doesn't keep its disk, and the plugin readers can tell a WAL that
/// restarts from one that can't (`db::reader`).
pub const WAL_KEEP_BYTES: u64 = 4 << 20;

fn sqlite_options(path: &Path, access: Access) -> SqliteConnectOptions {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    match access {
        Access::ReadWrite => options.pragma("journal_size_limit", WAL_KEEP_BYTES.to_string()),
        Access::ReadOnly => options.pragma("query_only", "ON"),
    }
}

/// Turns off SQLite's memory statistics, which take one process-wide mutex
/// on every allocation SQLite makes: the plugin readers on the tokio
/// workers and the writer thread contended on it (futex wake-ups in the
/// per-event profile). Must run before the first connection opens; later
/// SQLite refuses it and nothing changes.
pub fn tune_sqlite() {
    // SAFETY: sqlite3_config with SQLITE_CONFIG_MEMSTATUS takes one int and
    // is called before SQLite is initialized, on one thread.
    let off: std::ffi::c_int = 0;
    #[allow(unsafe_code)]
    let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, off) };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(
            rc,
            "SQLite was initialized already; its memory statistics stay on"
        );
    }
}

/// Milliseconds since the unix epoch, as stored in `*_at` integer columns.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An RFC 3339 UTC timestamp with milliseconds, as clients see message times.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_826_096_007), "2026-11-28T00:34:56.007Z");
    }
}
