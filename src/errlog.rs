//! Failed events for the logging server, once per event id, ever.
//!
//! A failure is first written to the `event_errors` table, whose primary key
//! is the event id: a retried event that fails again inserts nothing.
//! [`ErrorLog::record`] returns only once that row is committed (on SQLite
//! with the WAL synced, so a power loss keeps it too), retrying a
//! failed write a few times on a fresh connection; if it still fails the
//! caller gets the error (and the backend's retry records the event later).
//!
//! Background deliverers (one in every `serve`, `api` and `dev` process, on
//! any number of nodes) send undelivered rows to the sink: a JSON-lines
//! file, or an HTTP endpoint with an `Idempotency-Key: <event id>` header.
//! A deliverer first claims a batch in one atomic statement (PostgreSQL:
//! `FOR UPDATE SKIP LOCKED`; SQLite: a write-locking `UPDATE … RETURNING`),
//! holding it for a lease (timed by each node's clock, so clocks must agree
//! to well within it) so a dead deliverer's rows are taken over; it
//! marks delivered only the rows it still holds, and only after the sink
//! has them (the file: whole lines written and fsynced). A sink that fails
//! (down, a short write, a full disk, a failed fsync) is retried with
//! backoff, counted in `errlog_sink_failures` and logged at warn.
//!
//! The file sink is exactly-once across crashes: appends hold an exclusive
//! lock on the file, a torn last line (a crash or a full disk mid-write) is
//! truncated away before the next append, and a row claimed before (so
//! perhaps written by a deliverer that died before marking it) is looked
//! for in the file, from the file's length when the row was first claimed,
//! before being written. The HTTP sink may repeat a POST after a crash;
//! the logging server deduplicates by `Idempotency-Key`.
//!
//! Test hooks (environment): `OTAKO_FAILPOINT=errlog-after-sink-write`
//! aborts the process right after a sink write, before the rows are marked
//! delivered; `OTAKO_ERRLOG_LEASE_MS` shortens the claim lease (default
//! 60 s) so a test sees a crashed deliverer's rows taken over quickly.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::config::SinkConfig;
use crate::db::{Db, DbError, now_ms};
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::with_conn;

/// Rows claimed and delivered per round trip. A record can be as large as
/// a dispatch frame, so this also bounds the deliverer's memory.
const BATCH: i64 = 64;
/// Shortest and longest wait between attempts while the sink is failing.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one HTTP delivery may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claim holds. An HTTP batch stops starting POSTs after half of
/// it, so a claim never runs out under a live deliverer.
const LEASE: Duration = Duration::from_secs(60);
/// How often an idle deliverer looks for rows it was not woken for:
/// written by another process, or freed by an expired lease.
const POLL: Duration = Duration::from_secs(5);
/// How often the gauges are refreshed while delivering or while the sink
/// is failing.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);
/// Writes of a record: the first and the retries on a fresh connection.
const RECORD_ATTEMPTS: u32 = 4;
const FAILPOINT_AFTER_SINK_WRITE: &str = "errlog-after-sink-write";
/// SQLite runs WAL with `synchronous = NORMAL`, which syncs only at
/// checkpoints: a power loss can undo the last commits. A failed event's
/// row and a delivery claim must survive it, so those writes switch their
/// connection to FULL (the WAL synced at commit) and back.
const SYNC_FULL: &str = "PRAGMA synchronous = FULL";
const SYNC_NORMAL: &str = "PRAGMA synchronous = NORMAL";

/// Why a record could not reach the sink (it stays queued and is retried).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("POST {url} failed: {reason}")]
    Http { url: String, reason: String },
}

/// The recording side: cheap to clone, used by every dispatch connection.
#[derive(Clone, Debug)]
pub struct ErrorLog {
    db: Db,
    /// Wakes this process's deliverer as soon as a record is written.
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl ErrorLog {
    pub fn new(db: Db, metrics: Arc<Metrics>) -> Self {
        ErrorLog {
            db,
            wake: Arc::new(Notify::new()),
            metrics,
        }
    }

    /// Durably records a failed event unless this event id was recorded
    /// before: `Ok(true)` inserted, `Ok(false)` already there (which is also
    /// the answer when an earlier attempt of this call committed but its
    /// reply was lost). `Ok` only once the row is committed; a failed write
    /// is retried on a fresh connection, and `Err` means it is not recorded.
    pub async fn record(
        &self,
        event_id: &str,
        record: &serde_json::Value,
    ) -> Result<bool, DbError> {
        let text = record.to_string();
        let now = now_ms();
        let mut attempt = 1;
        let inserted = loop {
            let sqlite = self.db.backend() == "sqlite";
            let result = with_conn!(self.db, c => {
                if sqlite {
                    sqlx::query(SYNC_FULL).execute(&mut *c).await?;
                }
                let inserted = sqlx::query(
                    "INSERT INTO event_errors (event_id, record, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (event_id) DO NOTHING",
                )
                .bind(event_id)
                .bind(&text)
                .bind(now)
                .execute(&mut *c)
                .await?
                .rows_affected()
                    > 0;
                if sqlite {
                    sqlx::query(SYNC_NORMAL).execute(&mut *c).await?;
                }
                Ok(inserted)
            });
            match result {
                Ok(inserted) => break inserted,
                Err(err) if attempt < RECORD_ATTEMPTS => {
                    // with_conn! closed the failed connection: the next
                    // attempt gets another one (or a new one).
                    let wait = Duration::from_millis(25 << attempt);
                    tracing::warn!(error = %err, attempt, retry_in = ?wait, "error log: cannot write a failed event; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        };
        if inserted {
            self.wake.notify_one();
        }
        Ok(inserted)
    }

    /// Delivers undelivered records to `sink` until shutdown, sharing the
    /// rows with every other deliverer through claims.
    pub async fn deliver(self, sink: SinkConfig, shutdown: Shutdown) {
        let lease = std::env::var("OTAKO_ERRLOG_LEASE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(LEASE, Duration::from_millis);
        let deliverer = Deliverer {
            me: format!("{}:{:016x}", std::process::id(), rand::random::<u64>()),
            sink: Sink::new(sink),
            lease,
            abort_after_write: std::env::var("OTAKO_FAILPOINT").as_deref()
                == Ok(FAILPOINT_AFTER_SINK_WRITE),
            log: self,
        };
        deliverer.run(shutdown).await;
    }
}

/// One deliverer: its claim identity and its sink.
struct Deliverer {
    log: ErrorLog,
    /// Written to `claimed_by`: unique per deliverer, so two in one
    /// process (`dev`) don't mistake each other's claims for their own.
    me: String,
    sink: Sink,
    lease: Duration,
    abort_after_write: bool,
}

/// A row this deliverer holds.
struct Claimed {
    event_id: String,
    record: String,
    created_at: i64,
    /// Claims so far, this one included: above 1, an earlier claimant may
    /// have written it to the sink and died before marking it.
    attempts: i64,
    /// The file sink's length when the row was first claimed.
    sink_offset: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
enum DeliverError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl Deliverer {
    async fn run(self, shutdown: Shutdown) {
        let mut backoff = MIN_BACKOFF;
        self.refresh_gauges().await;
        let mut refreshed = Instant::now();
        while !shutdown.is_cancelled() {
            let result = self.deliver_batch().await;
            // A COUNT after every batch of a large backlog would cost more
            // than the delivery: at most one a second while busy.
            if !matches!(result, Ok(n) if n > 0) || refreshed.elapsed() >= GAUGE_REFRESH {
                self.refresh_gauges().await;
                refreshed = Instant::now();
            }
            match result {
                Ok(0) => {
                    backoff = MIN_BACKOFF;
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = self.log.wake.notified() => {}
                        _ = tokio::time::sleep(POLL.min(self.lease)) => {}
                    }
                }
                Ok(_) => backoff = MIN_BACKOFF,
                Err(err) => {
                    if matches!(err, DeliverError::Sink(_)) {
                        self.log.metrics.errlog_sink_failures.inc();
                    }
                    tracing::warn!(error = %err, retry_in = ?backoff, "error log: delivery failed; will retry");
                    let until = tokio::time::Instant::now() + backoff;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep_until(until) => break,
                            // Records keep arriving during an outage.
                            _ = tokio::time::sleep(GAUGE_REFRESH) => self.refresh_gauges().await,
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.release().await;
    }

    /// Sets the backlog gauges from the table (the truth on every node).
    async fn refresh_gauges(&self) {
        let result: Result<(i64, Option<i64>), sqlx::Error> = crate::with_pool!(self.log.db, p => sqlx::query_as(
            "SELECT COUNT(*), MIN(created_at) FROM event_errors WHERE delivered_at IS NULL"
        )
        .fetch_one(p)
        .await);
        match result {
            Ok((backlog, oldest)) => {
                let metrics = &self.log.metrics;
                metrics.errlog_backlog.set(backlog);
                let age_ms = oldest.map_or(0, |at| now_ms().saturating_sub(at).max(0));
                metrics.errlog_oldest_undelivered_seconds.set(age_ms / 1000);
            }
            Err(err) => tracing::debug!(error = %err, "error log: cannot count the backlog"),
        }
    }

    /// Claims, sends and marks one batch; returns how many were delivered.
    async fn deliver_batch(&self) -> Result<usize, DeliverError> {
        let offset = match &self.sink {
            Sink::File(path) => {
                let owned = path.clone();
                let len = blocking(move || file_length_repaired(&owned)).await;
                Some(len.map_err(|e| file_error(path, e))?)
            }
            Sink::Http { .. } => None,
        };
        let rows = self.claim(offset).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let claimed_at = Instant::now();
        let (sent, result) = match &self.sink {
            Sink::File(path) => {
                let owned = path.clone();
                let written = blocking(move || {
                    let result = append_batch(&owned, &rows);
                    result.map(|()| rows)
                })
                .await;
                match written {
                    Ok(rows) => (rows, Ok(())),
                    Err(err) => (Vec::new(), Err(file_error(path, err))),
                }
            }
            Sink::Http { url, client } => {
                let mut sent = Vec::new();
                let mut result = Ok(());
                for row in rows {
                    // Leave the rest to the next claim rather than send
                    // near the end of the lease.
                    if claimed_at.elapsed() > self.lease / 2 {
                        break;
                    }
                    if let Err(err) = post(client, url, &row.event_id, &row.record).await {
                        result = Err(err);
                        break;
                    }
                    sent.push(row);
                }
                (sent, result)
            }
        };
        if self.abort_after_write && !sent.is_empty() {
            tracing::error!(
                "failpoint {FAILPOINT_AFTER_SINK_WRITE}: aborting after the sink write"
            );
            std::process::abort();
        }
        let delivered = self.mark(&sent).await?;
        result?;
        Ok(delivered)
    }

    /// Claims up to a batch of undelivered rows nobody else holds.
    async fn claim(&self, sink_offset: Option<u64>) -> Result<Vec<Claimed>, DbError> {
        let now = now_ms();
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let offset = sink_offset.map(|o| i64::try_from(o).unwrap_or(i64::MAX));
        let sql = match self.log.db.backend() {
            "postgres" => {
                "UPDATE event_errors SET claimed_by = $1, claim_until = $2, attempts = attempts + 1, \
                 sink_offset = COALESCE(sink_offset, $3) \
                 WHERE event_id IN (SELECT event_id FROM event_errors WHERE delivered_at IS NULL \
                 AND (claim_until IS NULL OR claim_until < $4 OR claimed_by = $1) \
                 ORDER BY created_at, event_id LIMIT $5 FOR UPDATE SKIP LOCKED) \
                 RETURNING event_id, record, created_at, attempts, sink_offset"
            }
            // One statement takes SQLite's write lock before it reads, so
            // the select and the claim are one step.
            _ => {
                "UPDATE event_errors SET claimed_by = $1, claim_until = $2, attempts = attempts + 1, \
                 sink_offset = COALESCE(sink_offset, $3) \
                 WHERE event_id IN (SELECT event_id FROM event_errors WHERE delivered_at IS NULL \
                 AND (claim_until IS NULL OR claim_until < $4 OR claimed_by = $1) \
                 ORDER BY created_at, event_id LIMIT $5) \
                 RETURNING event_id, record, created_at, attempts, sink_offset"
            }
        };
        // Durable before anything is written to the sink: a later claimant
        // relies on `attempts` and `sink_offset` to find a crashed write.
        let sqlite = self.log.db.backend() == "sqlite";
        let rows: Vec<(String, String, i64, i64, Option<i64>)> = with_conn!(self.log.db, c => {
            if sqlite {
                sqlx::query(SYNC_FULL).execute(&mut *c).await?;
            }
            let rows = sqlx::query_as(sql)
                .bind(&self.me)
                .bind(now.saturating_add(lease_ms))
                .bind(offset)
                .bind(now)
                .bind(BATCH)
                .fetch_all(&mut *c)
                .await?;
            if sqlite {
                sqlx::query(SYNC_NORMAL).execute(&mut *c).await?;
            }
            Ok(rows)
        })?;
        let mut rows: Vec<Claimed> = rows
            .into_iter()
            .map(
                |(event_id, record, created_at, attempts, sink_offset)| Claimed {
                    event_id,
                    record,
                    created_at,
                    attempts,
                    sink_offset,
                },
            )
            .collect();
        rows.sort_by(|a, b| (a.created_at, &a.event_id).cmp(&(b.created_at, &b.event_id)));
        Ok(rows)
    }

    /// Marks delivered the sent rows this deliverer still holds; returns
    /// how many. `claimed_by` stays, naming the deliverer that sent it.
    async fn mark(&self, sent: &[Claimed]) -> Result<usize, DbError> {
        if sent.is_empty() {
            return Ok(0);
        }
        let placeholders: Vec<String> = (3..sent.len() + 3).map(|n| format!("${n}")).collect();
        let sql = format!(
            "UPDATE event_errors SET delivered_at = $1, claim_until = NULL \
             WHERE claimed_by = $2 AND delivered_at IS NULL AND event_id IN ({})",
            placeholders.join(", ")
        );
        let marked = with_conn!(self.log.db, c => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(now_ms())
                .bind(&self.me);
            for row in sent {
                query = query.bind(&row.event_id);
            }
            query.execute(c).await.map(|r| r.rows_affected())
        })?;
        let marked = usize::try_from(marked).unwrap_or(usize::MAX);
        if marked < sent.len() {
            tracing::warn!(
                sent = sent.len(),
                marked,
                "error log: lost the claim on records already sent (lease ran out); the sink may see them again"
            );
        }
        self.log
            .metrics
            .errlog_delivered
            .inc_by(u64::try_from(marked).unwrap_or(u64::MAX));
        Ok(marked)
    }

    /// Gives back this deliverer's unsent claims at shutdown, so another
    /// deliverer need not wait for the lease.
    async fn release(&self) {
        let result = with_conn!(self.log.db, c => sqlx::query(
            "UPDATE event_errors SET claimed_by = NULL, claim_until = NULL \
             WHERE claimed_by = $1 AND delivered_at IS NULL",
        )
        .bind(&self.me)
        .execute(c)
        .await
        .map(|_| ()));
        if let Err(err) = result {
            tracing::debug!(error = %err, "error log: cannot release claims; they expire with the lease");
        }
    }
}

fn file_error(path: &Path, source: std::io::Error) -> SinkError {
    SinkError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(join)))
}

/// Opens (creating it and its folder) a JSON-lines file for appending and
/// takes an exclusive lock on it, released when the file is dropped: every
/// process appending to it takes the lock, so appends never interleave and
/// a torn tail is never someone else's write in progress.
pub(crate) fn open_locked(path: &Path) -> std::io::Result<File> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let created = !path.try_exists()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    if created {
        // The new name must be durable too, or fsynced lines can vanish
        // with the file in a power loss.
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
    }
    file.lock()?;
    Ok(file)
}

/// Truncates a torn last line (a crash or a full disk mid-append) so the
/// next record starts on a line of its own; returns the file's length.
pub(crate) fn repair_tail(file: &File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..usize::try_from(end - start).unwrap_or(0)];
        file.read_exact_at(part, start)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(
            torn_bytes = len - end,
            "JSON-lines file ended in a torn line; truncating it"
        );
        file.set_len(end)?;
        file.sync_data()?;
    }
    Ok(end)
}

/// Appends `bytes` (whole lines) at `len` and fsyncs; on a short or failed
/// write or fsync, truncates back to `len` so no part of it stays.
pub(crate) fn append_durably(mut file: &File, len: u64, bytes: &[u8]) -> std::io::Result<()> {
    let result = file.write_all(bytes).and_then(|()| file.sync_data());
    if result.is_err() {
        // Best effort: a tail left torn is repaired before the next append.
        let _ = file.set_len(len).and_then(|()| file.sync_data());
    }
    result
}

/// The file sink's length with any torn tail repaired, taken before a
/// claim: a record claimed now can only be written after it.
fn file_length_repaired(path: &Path) -> std::io::Result<u64> {
    repair_tail(&open_locked(path)?)
}

/// Appends the batch's records that are not in the file yet, durably.
fn append_batch(path: &Path, rows: &[Claimed]) -> std::io::Result<()> {
    let file = open_locked(path)?;
    let len = repair_tail(&file)?;
    let present = already_written(&file, rows)?;
    let mut buf = Vec::new();
    for row in rows.iter().filter(|r| !present.contains(r.record.as_str())) {
        buf.extend_from_slice(row.record.as_bytes());
        buf.push(b'\n');
    }
    if buf.is_empty() {
        return Ok(());
    }
    append_durably(&file, len, &buf)
}

/// The records of rows claimed before that are already whole lines in the
/// file, looked for from where the file ended when they were first claimed.
fn already_written<'a>(mut file: &File, rows: &'a [Claimed]) -> std::io::Result<HashSet<&'a str>> {
    let suspects: HashSet<&str> = rows
        .iter()
        .filter(|r| r.attempts > 1)
        .map(|r| r.record.as_str())
        .collect();
    let from = rows
        .iter()
        .filter(|r| r.attempts > 1)
        .map(|r| u64::try_from(r.sink_offset.unwrap_or(0)).unwrap_or(0))
        .min();
    let mut present = HashSet::new();
    let Some(from) = from else {
        return Ok(present);
    };
    file.seek(SeekFrom::Start(from))?;
    let mut lines = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if let Ok(text) = std::str::from_utf8(&line)
            && let Some(found) = suspects.get(text)
        {
            present.insert(*found);
        }
    }
    Ok(present)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Where records go.
enum Sink {
    File(PathBuf),
    Http { url: String, client: HttpClient },
}

impl Sink {
    fn new(config: SinkConfig) -> Sink {
        match config {
            SinkConfig::File(path) => Sink::File(path),
            SinkConfig::Http(url) => Sink::Http {
                url,
                client: Client::builder(TokioExecutor::new()).build_http(),
            },
        }
    }
}

async fn post(
    client: &HttpClient,
    url: &str,
    event_id: &str,
    record: &str,
) -> Result<(), SinkError> {
    let fail = |reason: String| SinkError::Http {
        url: url.to_owned(),
        reason,
    };
    let request = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", event_id)
        .body(Full::new(Bytes::from(record.to_owned())))
        .map_err(|e| fail(e.to_string()))?;
    let response = tokio::time::timeout(HTTP_TIMEOUT, client.request(request))
        .await
        .map_err(|_| fail(format!("no answer within {HTTP_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    // Drain the body so the connection can be reused.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("status {status}")))
    }
}
