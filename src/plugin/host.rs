//! The store's data and the WIT `host` interface: thin adapters from the
//! generated traits to the database, presence, tracing and the route's
//! config.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Presence;
use super::bindings::otako::gateway::{host, types};
use super::bindings::{DbError, Level, Rows, Value};
use super::groups::LookupGroups;
use super::query::{self, CheckedStatements, QueryLimits};
use super::sandbox::{Capture, Limits};
use crate::db::Db;
use crate::ids::UserId;

/// Log lines one call may write; more are dropped (with one warning) so a
/// looping logger can't flood the host's log.
const MAX_LOGS_PER_CALL: u32 = 100;
/// Longest log message kept, in bytes.
const MAX_LOG_BYTES: usize = 2048;

/// What the host offers every route: absent when `check` only loads
/// plugins without a database.
#[derive(Clone)]
pub(crate) struct Services {
    pub db: Db,
    pub presence: Arc<dyn Presence>,
    pub groups: Arc<LookupGroups>,
    pub query: QueryLimits,
}

/// Everything an instance of one route version shares: fixed for the
/// instance's life, so nothing here is reset between calls.
pub(crate) struct RouteCtx {
    /// The plugin file's name, for logs and traces.
    pub plugin: String,
    /// Hex SHA-256 of the version: the file, or for a handler `dev` serves
    /// from its sources, the dev loader and those sources.
    pub version: String,
    /// [`version`](Self::version)'s prefix, for logs and traces.
    pub hash: String,
    pub config: BTreeMap<String, String>,
    pub services: Option<Services>,
    /// A handler's sources, for the dev loader's `files` import.
    pub dev_files: Option<DevFiles>,
}

/// A handler's source files as `dev` read them: path relative to the
/// handler's folder, and text.
pub type DevFiles = Arc<Vec<(String, String)>>;

/// Per-call state, reset by [`HostState::begin_call`].
pub(crate) struct CallState {
    pub event_id: String,
    /// When the event arrived: the call's queries read the database as of
    /// then or later.
    pub arrived: Instant,
    /// When guest execution must stop; moved later by database time.
    pub deadline: Instant,
    /// Database time this call may still add to its deadline.
    pub db_allowance: Duration,
    /// Set by the epoch callback when the deadline passed.
    pub timed_out: bool,
    logs: u32,
}

/// The `T` of every plugin `Store<T>`.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: Limits,
    pub call: CallState,
    pub route: Arc<RouteCtx>,
    checked: CheckedStatements,
    pub stdout: Capture,
    pub stderr: Capture,
}

impl HostState {
    pub(crate) fn new(route: Arc<RouteCtx>, memory_bytes: usize) -> Self {
        let stdout = Capture::default();
        let stderr = Capture::default();
        // No preopens, env, args or network: std's WASI imports link, but
        // reach nothing. Clocks and randomness are the host's.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limits: Limits::new(memory_bytes),
            call: CallState {
                event_id: String::new(),
                arrived: Instant::now(),
                deadline: Instant::now(),
                db_allowance: Duration::ZERO,
                timed_out: false,
                logs: 0,
            },
            route,
            checked: CheckedStatements::default(),
            stdout,
            stderr,
        }
    }

    /// Resets the per-call state before an event runs on this instance.
    pub(crate) fn begin_call(&mut self, event_id: &str, arrived: Instant, timeout: Duration) {
        self.call.event_id.clear();
        self.call.event_id.push_str(event_id);
        self.call.arrived = arrived;
        self.call.deadline = Instant::now() + timeout;
        self.call.db_allowance = self
            .route
            .services
            .as_ref()
            .map_or(Duration::ZERO, |s| s.query.timeout);
        self.call.timed_out = false;
        self.call.logs = 0;
        self.limits.exceeded = false;
        // Output left over from a previous call (there is none after a
        // successful call, which drains it) must not be blamed on this one.
        self.stdout.take();
        self.stderr.take();
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    /// Database time doesn't count against the plugin's `timeout_ms` (that
    /// limit is for guest code); each query has its own `query_timeout_ms`,
    /// and one call may add at most one `query_timeout_ms` of database time
    /// to its deadline in total, so a plugin looping over queries still
    /// times out.
    async fn query(&mut self, sql: String, params: Vec<Value>) -> Result<Rows, DbError> {
        let Some(services) = self.route.services.clone() else {
            return Err(DbError::Query(
                "no database is open (plugin check)".to_owned(),
            ));
        };
        self.checked.check(&sql).map_err(DbError::ReadOnly)?;
        let started = Instant::now();
        // Grouped only with the same code: its version is its content hash
        // (two plugins may share a file name, not a hash).
        let group = Some((&*services.groups, self.route.version.as_str()));
        let result = query::run(
            &services.db,
            group,
            sql,
            params,
            services.query,
            self.call.arrived,
        )
        .await;
        let spent = started.elapsed();
        let credit = spent.min(self.call.db_allowance);
        self.call.db_allowance -= credit;
        self.call.deadline += credit;
        match &result {
            Ok(rows) => tracing::trace!(
                plugin = %self.route.plugin,
                event_id = %self.call.event_id,
                rows = rows.rows.len(),
                micros = spent.as_micros() as u64,
                "plugin query"
            ),
            Err(err) => tracing::debug!(
                plugin = %self.route.plugin,
                event_id = %self.call.event_id,
                error = ?err,
                "plugin query failed"
            ),
        }
        result
    }

    fn online(&mut self, user_ids: Vec<String>) -> Vec<String> {
        let Some(services) = &self.route.services else {
            return Vec::new();
        };
        // Text that isn't an id can't be online: no error, just absent.
        let ids: Vec<UserId> = user_ids.iter().filter_map(|s| s.parse().ok()).collect();
        services
            .presence
            .online(&ids)
            .into_iter()
            .map(|id| id.to_string())
            .collect()
    }

    fn log(&mut self, level: Level, message: String) {
        self.call.logs += 1;
        if self.call.logs > MAX_LOGS_PER_CALL {
            if self.call.logs == MAX_LOGS_PER_CALL + 1 {
                tracing::warn!(
                    plugin = %self.route.plugin,
                    event_id = %self.call.event_id,
                    "plugin logged more than {MAX_LOGS_PER_CALL} lines for one event; dropping the rest"
                );
            }
            return;
        }
        let message = escape_controls(truncate(&message, MAX_LOG_BYTES));
        let plugin = &self.route.plugin;
        let event_id = &self.call.event_id;
        match level {
            Level::Trace => tracing::trace!(%plugin, %event_id, "{message}"),
            Level::Debug => tracing::debug!(%plugin, %event_id, "{message}"),
            Level::Info => tracing::info!(%plugin, %event_id, "{message}"),
            Level::Warn => tracing::warn!(%plugin, %event_id, "{message}"),
            Level::Error => tracing::error!(%plugin, %event_id, "{message}"),
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.route.config.get(&key).cloned()
    }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`), so a plugin's
/// message can't start a forged gateway log line.
fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
