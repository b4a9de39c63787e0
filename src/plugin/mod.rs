//! WebAssembly plugins (DESIGN §4): an event goes in, deliveries come out.
//! This module never sees a socket.
//!
//! # Layout
//! - [`bindings`]: the one `bindgen!` over `wit/gateway.wit`.
//! - `engine`: wasmtime configuration, the epoch ticker, the linker, and the
//!   on-disk cache of compiled code.
//! - `routes`: the route table swapped whole on reload; per route version a
//!   pool of ready instances, the call, and how failures are classified.
//! - `host`: the store's data and the WIT `host` imports (query, online,
//!   log, config) as thin adapters.
//! - `query`: the read-only database behind `query`.
//! - `sandbox`: captured stdout/stderr and the memory limiter.
//!
//! # Sources served by `dev`
//! `dev` may serve a JS/Python handler from its saved sources through a
//! dev loader ([`DevSource`], wit/dev.wit) while componentize rebuilds
//! it: a route version is then the loader's compiled code plus those
//! sources, and its version hash covers both.
//!
//! # Instances
//! Compiling happens once per plugin version (or never, when the cache has
//! it). Each route version holds up to [`INSTANCES_PER_ROUTE`] live
//! instances (fewer when many routes share the pool) and keeps as many of
//! them ready as fit 64 MiB of starting memory (all 48 for a small Rust
//! component, 5–7 for a JS or Python runtime): a call takes one, and puts
//! it back only if the call ended normally (a trap, timeout or dropped
//! call discards it). Reuse is what
//! makes the host's share of an event a few microseconds instead of ~45 µs
//! for a fresh instance. Plugins must therefore not rely on state kept
//! between events: instances come and go at the host's choice.

pub mod bindings;
mod engine;
mod groups;
mod host;
mod query;
pub(crate) mod routes;
mod sandbox;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::Instrument;

use crate::config::{Config, RouteConfig};
use crate::db::Db;
use crate::failure::{ErrorCode, Failure};
use crate::ids::{ChannelId, UserId};
use crate::telemetry::{Metrics, PluginLabels};
pub use engine::INSTANCES_PER_ROUTE;
pub(crate) use engine::content_hash;
use engine::{MAX_MEMORY_MB, MAX_ROUTES, PluginEngine, live_per_route, lock};
pub use host::DevFiles;
use host::{RouteCtx, Services};
use query::QueryLimits;
use routes::{Route, RouteTable};

/// One dispatch event, as the dispatch module hands it over.
pub struct Event<'a> {
    /// The dispatch `t`, e.g. `EVENT_MESSAGE_CREATE`.
    pub name: &'a str,
    /// The dispatch `event_id`, as text.
    pub id: &'a str,
    /// The dispatch `d`, as JSON text.
    pub data: &'a str,
    /// When the event reached the gateway: the plugin's lookups see the
    /// database as of then or later.
    pub arrived: Instant,
}

/// Who receives a delivery. Ids are parsed; whether those users or that
/// channel exist is for the caller to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    Users(Vec<UserId>),
    Channel(ChannelId),
    Everyone,
}

/// One client-facing event a plugin asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// An `UPPER_SNAKE_CASE` event name, e.g. `MESSAGE_CREATE`.
    pub event: String,
    /// The client `d`: checked to be JSON text.
    pub payload: String,
    pub audience: Audience,
}

/// Who is online, for the `online` host import. Called on a tokio worker
/// in the middle of a plugin call: it must answer from memory.
pub trait Presence: Send + Sync + 'static {
    fn online(&self, users: &[UserId]) -> Vec<UserId>;
}

/// Why plugins could not be loaded. Each message names the route's plugin
/// file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot start the plugin engine: {0}")]
    Engine(String),
    #[error("route {event}: plugin {plugin}: {reason}")]
    Load {
        event: String,
        plugin: String,
        reason: String,
    },
    #[error("{0}")]
    Routes(String),
}

/// One routed plugin's load result, as `otako-gateway check` prints it.
#[derive(Debug, Clone)]
pub struct PluginStatus {
    pub event: String,
    pub plugin: PathBuf,
    /// Hex SHA-256 of the file, when it could be read.
    pub hash: Option<String>,
    /// Time to compile, or to load from the cache.
    pub compile_time: Duration,
    /// Whether the compiled code came from the cache.
    pub cached: bool,
    pub error: Option<String>,
}

impl PluginStatus {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

impl fmt::Display for PluginStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.event, self.plugin.display())?;
        if let Some(hash) = &self.hash {
            write!(f, " sha256:{}", short_hash(hash))?;
        }
        match &self.error {
            None => write!(
                f,
                " {} in {:.1?}: ok",
                if self.cached {
                    "loaded from cache"
                } else {
                    "compiled"
                },
                self.compile_time
            ),
            Some(err) => write!(f, ": error: {err}"),
        }
    }
}

/// The loaded plugins: the route table and what every call needs. Cheap
/// to clone; clones share everything.
#[derive(Clone)]
pub struct Plugins {
    inner: Arc<Inner>,
}

struct Inner {
    engine: PluginEngine,
    db: Db,
    presence: Arc<dyn Presence>,
    /// Lookups forming groups on PostgreSQL, by plugin version.
    groups: Arc<groups::LookupGroups>,
    metrics: Arc<Metrics>,
    /// The routes in force. Swapped whole by `reload`; an event holds the
    /// `Arc<Route>` it started with until it ends.
    table: ArcSwap<RouteTable>,
    /// Serializes reloads so two can't build from the same old table and
    /// the later finish first.
    reloading: tokio::sync::Mutex<()>,
    /// The last [`HISTORY`] loads and reloads, newest last, for the
    /// operator page. A std mutex: held only to push or copy.
    history: std::sync::Mutex<std::collections::VecDeque<ReloadRecord>>,
    /// The config the table in force was built from, for rebuilding it
    /// when `dev` changes a [`DevSource`].
    config: std::sync::Mutex<Option<Config>>,
    /// Handlers served from their sources, by absolute plugin path.
    dev_sources: std::sync::Mutex<HashMap<PathBuf, DevSource>>,
    /// Compiled dev loaders, by content hash: compiled once per `dev` run.
    dev_loaders: std::sync::Mutex<HashMap<String, engine::Compiled>>,
}

/// A handler `dev` serves from its saved sources through the dev loader of
/// its language instead of its built component, until the build (6-20 s
/// of componentize) catches up: a save is live in well under a second.
#[derive(Clone)]
pub struct DevSource {
    /// The dev loader component (`plugins/.toolchain/dev/loader-*.wasm`).
    pub loader: PathBuf,
    pub files: DevFiles,
}

/// How many loads and reloads the operator page lists.
const HISTORY: usize = 20;

/// One route's plugin version serving now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedPlugin {
    pub event: String,
    /// The plugin file's name.
    pub plugin: String,
    /// Hex SHA-256 of the file.
    pub hash: String,
    /// When this version was loaded (RFC 3339).
    pub loaded_at: String,
    pub compile_ms: u64,
    /// Compiled code came from the on-disk cache.
    pub from_cache: bool,
    pub timeout_ms: u64,
}

/// One load or reload of the route table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    /// RFC 3339.
    pub at: String,
    /// `load` at start, then `reload`.
    pub kind: &'static str,
    pub ok: bool,
    /// Why it failed (the old table kept serving).
    pub error: Option<String>,
    /// Events whose plugin version changed.
    pub changed: Vec<String>,
}

impl Plugins {
    /// Compiles and checks every routed plugin (off the async workers:
    /// spawn_blocking). Any failure is an error naming the route's plugin
    /// file and why.
    pub async fn load(
        config: &Config,
        db: Db,
        presence: Arc<dyn Presence>,
        metrics: Arc<Metrics>,
    ) -> Result<Plugins, PluginError> {
        let engine = new_engine().await?;
        let plugins = Plugins {
            inner: Arc::new(Inner {
                engine,
                db,
                presence,
                groups: Arc::default(),
                metrics,
                table: ArcSwap::from_pointee(RouteTable::empty()),
                reloading: tokio::sync::Mutex::new(()),
                history: std::sync::Mutex::new(std::collections::VecDeque::new()),
                config: std::sync::Mutex::new(None),
                dev_sources: std::sync::Mutex::new(HashMap::new()),
                dev_loaders: std::sync::Mutex::new(HashMap::new()),
            }),
        };
        let table = plugins.build(config, &RouteTable::empty()).await?;
        tracing::info!(routes = table.routes.len(), "plugins loaded");
        plugins.record("load", &RouteTable::empty(), Ok(&table));
        plugins.inner.table.store(Arc::new(table));
        *lock(&plugins.inner.config) = Some(config.clone());
        Ok(plugins)
    }

    /// Runs the routed plugin for this event. `NO_ROUTE` if none.
    pub async fn handle(&self, event: &Event<'_>) -> Result<Vec<Delivery>, Failure> {
        self.run(event, true).await
    }

    /// [`handle`](Self::handle) on a fresh instance that is dropped after
    /// the call: only for the benchmark comparing it with reuse.
    #[doc(hidden)]
    pub async fn handle_on_fresh_instance(
        &self,
        event: &Event<'_>,
    ) -> Result<Vec<Delivery>, Failure> {
        self.run(event, false).await
    }

    async fn run(&self, event: &Event<'_>, reuse: bool) -> Result<Vec<Delivery>, Failure> {
        let route = self.inner.table.load().routes.get(event.name).cloned();
        let Some(route) = route else {
            return Err(Failure::new(
                ErrorCode::NoRoute,
                format!(
                    "no plugin is routed for event type '{}'",
                    host::truncate(event.name, 80)
                ),
            ));
        };
        let span = tracing::debug_span!(
            "plugin",
            event = event.name,
            event_id = event.id,
            plugin = %route.ctx.plugin
        );
        route.call(event, reuse).instrument(span).await
    }

    /// Replaces the route table atomically from a new config (hot reload):
    /// routes, plugin versions and the plugin settings (query limits) are
    /// one value, switched together; on error nothing changes and the old
    /// table keeps serving. Unchanged plugin files are not recompiled.
    pub async fn reload(&self, config: &Config) -> Result<(), PluginError> {
        let _one_at_a_time = self.inner.reloading.lock().await;
        self.reload_locked(config).await
    }

    async fn reload_locked(&self, config: &Config) -> Result<(), PluginError> {
        let current = self.inner.table.load_full();
        let table = match self.build(config, &current).await {
            Ok(table) => table,
            Err(err) => {
                self.record("reload", &current, Err(&err));
                return Err(err);
            }
        };
        tracing::info!(routes = table.routes.len(), "plugins reloaded");
        self.record("reload", &current, Ok(&table));
        self.inner.table.store(Arc::new(table));
        *lock(&self.inner.config) = Some(config.clone());
        Ok(())
    }

    /// Compiles a dev loader ahead of the first save that needs it (a JS
    /// or Python runtime takes seconds to compile; the cache keeps it).
    pub async fn prepare_dev_loader(&self, loader: &Path) -> Result<(), PluginError> {
        self.dev_loader(loader).await.map(|_| ())
    }

    /// Serves the route(s) of `plugin` from `source` (hot reload, nothing
    /// dropped). If the sources do not load, nothing changes and the
    /// error says why.
    pub async fn serve_dev_source(
        &self,
        plugin: &Path,
        source: DevSource,
    ) -> Result<(), PluginError> {
        self.swap_dev_source(plugin, Some(source), |_| true)
            .await
            .map(|_| ())
    }

    /// Goes back to `plugin`'s built component once it was built from the
    /// sources being served (`built_from`); returns whether it did. Sources
    /// saved since then keep being served.
    pub async fn end_dev_source(
        &self,
        plugin: &Path,
        built_from: &[(String, String)],
    ) -> Result<bool, PluginError> {
        self.swap_dev_source(plugin, None, |serving| {
            serving.is_some_and(|s| s.files.as_slice() == built_from)
        })
        .await
    }

    async fn swap_dev_source(
        &self,
        plugin: &Path,
        next: Option<DevSource>,
        when: impl FnOnce(Option<&DevSource>) -> bool,
    ) -> Result<bool, PluginError> {
        let _one_at_a_time = self.inner.reloading.lock().await;
        let key = absolute(plugin);
        let previous = {
            let mut sources = lock(&self.inner.dev_sources);
            if !when(sources.get(&key)) {
                return Ok(false);
            }
            match &next {
                Some(source) => sources.insert(key.clone(), source.clone()),
                None => sources.remove(&key),
            }
        };
        let Some(config) = lock(&self.inner.config).clone() else {
            return Ok(false);
        };
        let result = self.reload_locked(&config).await;
        if result.is_err() {
            let mut sources = lock(&self.inner.dev_sources);
            match previous {
                Some(source) => sources.insert(key, source),
                None => sources.remove(&key),
            };
        }
        result.map(|()| true)
    }

    /// A compiled dev loader: compiled once, then kept.
    async fn dev_loader(&self, loader: &Path) -> Result<engine::Compiled, PluginError> {
        let (bytes, fail) = read_for_dev(loader).await?;
        let hash = engine::content_hash(&bytes);
        if let Some(compiled) = lock(&self.inner.dev_loaders).get(&hash) {
            return Ok(compiled.clone());
        }
        let compiled = self.compile_cached(bytes).await.map_err(fail)?;
        lock(&self.inner.dev_loaders).insert(hash, compiled.clone());
        Ok(compiled)
    }

    /// Compiles `plugin`'s file into the compiled-code cache (`cache_dir`)
    /// without holding up reloads, so that swapping to it next takes
    /// milliseconds, not the seconds a JS/Python component compiles for.
    pub async fn precompile(&self, plugin: &Path) -> Result<(), PluginError> {
        let (bytes, fail) = read_for_dev(plugin).await?;
        self.compile_cached(bytes).await.map(|_| ()).map_err(fail)
    }

    /// Compiles through the running config's compiled-code cache.
    async fn compile_cached(&self, bytes: Vec<u8>) -> Result<engine::Compiled, String> {
        let cache_dir = lock(&self.inner.config)
            .as_ref()
            .map(|c| c.plugins.cache_dir.clone());
        compile_off_thread(&self.inner.engine, bytes, cache_dir).await
    }

    fn record(&self, kind: &'static str, old: &RouteTable, new: Result<&RouteTable, &PluginError>) {
        let changed = match new {
            Ok(new) => {
                let mut changed: Vec<String> = new
                    .routes
                    .iter()
                    .filter(|(event, route)| {
                        old.routes.get(*event).map(|r| &r.ctx.version) != Some(&route.ctx.version)
                    })
                    .map(|(event, _)| event.clone())
                    .chain(
                        old.routes
                            .keys()
                            .filter(|e| !new.routes.contains_key(*e))
                            .cloned(),
                    )
                    .collect();
                changed.sort();
                changed
            }
            Err(_) => Vec::new(),
        };
        let record = ReloadRecord {
            at: crate::db::rfc3339(crate::db::now_ms()),
            kind,
            ok: new.is_ok(),
            error: new.err().map(|e| e.to_string()),
            changed,
        };
        let mut history = lock(&self.inner.history);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(record);
    }

    /// The loads and reloads so far (the last [`HISTORY`]), oldest first.
    pub fn history(&self) -> Vec<ReloadRecord> {
        lock(&self.inner.history).iter().cloned().collect()
    }

    /// Each route's plugin version serving now, by event.
    pub fn loaded(&self) -> Vec<LoadedPlugin> {
        let table = self.inner.table.load();
        let mut loaded: Vec<LoadedPlugin> = table
            .routes
            .iter()
            .map(|(event, route)| LoadedPlugin {
                event: event.clone(),
                plugin: route.ctx.plugin.clone(),
                hash: route.ctx.version.clone(),
                loaded_at: crate::db::rfc3339(route.compiled.loaded_at_ms),
                compile_ms: route.compiled.compile_time.as_millis() as u64,
                from_cache: route.compiled.from_cache,
                timeout_ms: route.timeout().as_millis() as u64,
            })
            .collect();
        loaded.sort_by(|a, b| a.event.cmp(&b.event));
        loaded
    }

    /// Each route's plugin version serving now (hex SHA-256 of the file
    /// as loaded), by event: what hot reload compares a save against.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.inner
            .table
            .load()
            .routes
            .iter()
            .map(|(event, route)| (event.clone(), route.ctx.version.clone()))
            .collect()
    }

    /// What `otako-gateway check` prints: each route's event, plugin file,
    /// content hash, compile time, ok/error. Uses (and fills) the compiled
    /// code cache; opens no database.
    pub async fn check(config: &Config) -> Vec<PluginStatus> {
        let engine = match new_engine().await {
            Ok(engine) => engine,
            Err(err) => {
                return config
                    .routes
                    .iter()
                    .map(|r| PluginStatus {
                        event: r.event.clone(),
                        plugin: r.plugin.clone(),
                        hash: None,
                        compile_time: Duration::ZERO,
                        cached: false,
                        error: Some(err.to_string()),
                    })
                    .collect();
            }
        };
        let mut statuses = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let mut status = PluginStatus {
                event: route.event.clone(),
                plugin: route.plugin.clone(),
                hash: None,
                compile_time: Duration::ZERO,
                cached: false,
                error: None,
            };
            let built = async {
                check_limits(route)?;
                let compiled = compile(&engine, route, &config.plugins.cache_dir).await?;
                status.hash = Some(compiled.hash.clone());
                status.compile_time = compiled.compile_time;
                status.cached = compiled.from_cache;
                let ctx = route_ctx(route, compiled.hash.clone(), None, None);
                let built = Route::new(
                    engine.clone(),
                    compiled,
                    ctx,
                    Duration::from_millis(route.timeout_ms.get()),
                    memory_bytes(route),
                    live_per_route(config.routes.len()),
                );
                built
                    .prewarm()
                    .await
                    .map(|_| ())
                    .map_err(|f| start_error(route, &f))
            };
            if let Err(err) = built.await {
                status.error = Some(match err {
                    PluginError::Load { reason, .. } => reason,
                    other => other.to_string(),
                });
            }
            statuses.push(status);
        }
        statuses
    }

    /// Builds a complete table aside; nothing changes unless every route
    /// loads.
    async fn build(
        &self,
        config: &Config,
        previous: &RouteTable,
    ) -> Result<RouteTable, PluginError> {
        if config.routes.len() > MAX_ROUTES {
            return Err(PluginError::Routes(format!(
                "{} routes configured; the plugin engine serves at most {MAX_ROUTES} (its instance pool holds {} instances, and each route's old and new version need one each during a reload)",
                config.routes.len(),
                engine::POOL_INSTANCES
            )));
        }
        let services = Services {
            db: self.inner.db.clone(),
            presence: self.inner.presence.clone(),
            groups: self.inner.groups.clone(),
            query: QueryLimits {
                timeout: Duration::from_millis(config.plugins.query_timeout_ms.get()),
                max_rows: config.plugins.query_max_rows.get(),
            },
        };
        let max_live = live_per_route(config.routes.len());
        let mut table = RouteTable::empty();
        for route in &config.routes {
            let result = self
                .build_route(route, config, previous, &services, max_live)
                .await;
            let label = PluginLabels {
                plugin: file_name(&route.plugin),
                result: if result.is_ok() { "ok" } else { "error" }.to_owned(),
            };
            self.inner
                .metrics
                .plugin_reloads
                .get_or_create(&label)
                .inc();
            table.routes.insert(route.event.clone(), Arc::new(result?));
        }
        Ok(table)
    }

    async fn build_route(
        &self,
        route: &RouteConfig,
        config: &Config,
        previous: &RouteTable,
        services: &Services,
        max_live: usize,
    ) -> Result<Route, PluginError> {
        check_limits(route)?;
        let dev = lock(&self.inner.dev_sources)
            .get(&absolute(&route.plugin))
            .cloned();
        let (compiled, version, dev_files) = match dev {
            Some(dev) => {
                let compiled = self
                    .dev_loader(&dev.loader)
                    .await
                    .map_err(|e| load_error(route, e.to_string()))?;
                let version = dev_version(&compiled.hash, &dev.files);
                (compiled, version, Some(dev.files))
            }
            None => {
                let bytes = read(route).await?;
                let hash = engine::content_hash(&bytes);
                // An unchanged file keeps its compiled code (and skips the cache).
                let reused = previous
                    .routes
                    .values()
                    .find(|r| r.compiled.hash == hash)
                    .map(|r| r.compiled.clone());
                let compiled = match reused {
                    Some(compiled) => compiled,
                    None => {
                        compile_bytes(&self.inner.engine, route, bytes, &config.plugins.cache_dir)
                            .await?
                    }
                };
                (compiled, hash, None)
            }
        };
        let ctx = route_ctx(route, version, Some(services.clone()), dev_files);
        let built = Route::new(
            self.inner.engine.clone(),
            compiled,
            ctx,
            Duration::from_millis(route.timeout_ms.get()),
            memory_bytes(route),
            max_live,
        );
        let pool = built.prewarm().await.map_err(|f| start_error(route, &f))?;
        tracing::info!(
            event = %route.event,
            plugin = %route.plugin.display(),
            hash = short_hash(&built.ctx.version),
            dev_source = built.ctx.dev_files.is_some(),
            compile_ms = built.compiled.compile_time.as_millis() as u64,
            cached = built.compiled.from_cache,
            instance_kib = pool.instance_bytes / 1024,
            max_live = pool.max_live,
            max_idle = pool.max_idle,
            "plugin loaded"
        );
        Ok(built)
    }
}

/// The `query` host import's database path without a plugin (and without
/// the statement check, which is host overhead): only for the benchmark
/// that separates database time from host overhead.
#[doc(hidden)]
pub async fn bench_query(db: &Db, sql: &str, ids: &[i64]) -> usize {
    let params = ids.iter().map(|&i| bindings::Value::Integer(i)).collect();
    let limits = QueryLimits {
        timeout: Duration::from_secs(1),
        max_rows: 10_000,
    };
    query::run(db, None, sql.to_owned(), params, limits, Instant::now())
        .await
        .map_or(0, |rows| rows.rows.len())
}

async fn new_engine() -> Result<PluginEngine, PluginError> {
    tokio::task::spawn_blocking(PluginEngine::new)
        .await
        .map_err(|e| PluginError::Engine(e.to_string()))?
        .map_err(|e| PluginError::Engine(engine::chain(&e)))
}

fn check_limits(route: &RouteConfig) -> Result<(), PluginError> {
    if route.memory_mb.get() > MAX_MEMORY_MB {
        return Err(load_error(
            route,
            format!(
                "memory_mb = {} is over the gateway's limit of {MAX_MEMORY_MB}",
                route.memory_mb
            ),
        ));
    }
    Ok(())
}

async fn read(route: &RouteConfig) -> Result<Vec<u8>, PluginError> {
    tokio::fs::read(&route.plugin)
        .await
        .map_err(|e| load_error(route, format!("cannot read: {e}")))
}

async fn compile(
    engine: &PluginEngine,
    route: &RouteConfig,
    cache_dir: &Path,
) -> Result<engine::Compiled, PluginError> {
    let bytes = read(route).await?;
    compile_bytes(engine, route, bytes, cache_dir).await
}

async fn compile_bytes(
    engine: &PluginEngine,
    route: &RouteConfig,
    bytes: Vec<u8>,
    cache_dir: &Path,
) -> Result<engine::Compiled, PluginError> {
    compile_off_thread(engine, bytes, Some(cache_dir.to_path_buf()))
        .await
        .map_err(|reason| load_error(route, reason))
}

/// Compiles on the blocking pool: cranelift takes tens of milliseconds to
/// seconds and must not stall a tokio worker.
async fn compile_off_thread(
    engine: &PluginEngine,
    bytes: Vec<u8>,
    cache_dir: Option<PathBuf>,
) -> Result<engine::Compiled, String> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || {
        let cache = cache_dir.as_deref().and_then(engine::cache_dir);
        engine.compile(&bytes, cache.as_deref())
    })
    .await
    .map_err(|e| format!("compiler task failed: {e}"))?
    .map_err(|reason| format!("is not a usable plugin component: {reason}"))
}

fn route_ctx(
    route: &RouteConfig,
    version: String,
    services: Option<Services>,
    dev_files: Option<DevFiles>,
) -> Arc<RouteCtx> {
    Arc::new(RouteCtx {
        plugin: file_name(&route.plugin),
        hash: short_hash(&version).to_owned(),
        version,
        config: route.config.clone(),
        services,
        dev_files,
    })
}

/// A file `dev` has compiled outside a route (a dev loader, a rebuilt
/// component), and how to report what goes wrong with it.
async fn read_for_dev(
    path: &Path,
) -> Result<(Vec<u8>, impl Fn(String) -> PluginError + '_), PluginError> {
    let fail = move |reason: String| PluginError::Load {
        event: "(dev)".to_owned(),
        plugin: path.display().to_string(),
        reason,
    };
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok((bytes, fail)),
        Err(err) => Err(fail(format!("cannot read: {err}"))),
    }
}

/// The version of a handler served from its sources: the loader and every
/// file, so each save is a new version.
fn dev_version(loader_hash: &str, files: &[(String, String)]) -> String {
    let mut bytes = loader_hash.as_bytes().to_vec();
    for (path, text) in files {
        for part in [path, text] {
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part.as_bytes());
        }
    }
    engine::content_hash(&bytes)
}

/// The key a plugin path is known by, however the config spelled it.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn start_error(route: &RouteConfig, failure: &Failure) -> PluginError {
    let mut reason = failure.message.clone();
    if let Some(cause) = failure.trace.chain.get(1) {
        reason.push_str(": ");
        reason.push_str(cause);
    }
    load_error(route, reason)
}

fn load_error(route: &RouteConfig, reason: String) -> PluginError {
    PluginError::Load {
        event: route.event.clone(),
        plugin: route.plugin.display().to_string(),
        reason,
    }
}

fn memory_bytes(route: &RouteConfig) -> usize {
    route.memory_mb.get() as usize * 1024 * 1024
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The hash prefix traces and logs show: enough to tell versions apart.
fn short_hash(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}
