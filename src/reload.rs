//! Hot reload: watch `gateway.toml` and every routed plugin, and on a
//! change build the new route table aside and swap it in whole.
//!
//! The watcher only debounces file events and sends a signal; the reload
//! itself reads the config, refuses changes that need a restart (listeners,
//! database, secrets, session and dispatch limits) by logging them and
//! keeping the running values, and hands routes and plugins to
//! [`Plugins::reload`], which compiles off the hot path and swaps
//! atomically. A file that fails to parse or compile leaves the current
//! version serving. Folders are watched, not files, so every editor save
//! pattern (write in place, write-then-rename, delete-then-create) is seen.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::plugin::Plugins;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// Quiet time before a burst of file events counts as one change.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    path: String,
    source: notify::Error,
}

/// The folders to watch: the config's, and every routed plugin's.
fn folders(config: &Config) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    dirs.insert(config.base_dir());
    for route in &config.routes {
        if let Some(dir) = route.plugin.parent() {
            dirs.insert(dir.to_path_buf());
        }
    }
    dirs
}

/// The files whose change triggers a reload.
fn watched_files(config: &Config) -> BTreeSet<PathBuf> {
    let mut files: BTreeSet<PathBuf> = config.routes.iter().map(|r| r.plugin.clone()).collect();
    files.insert(config.path.clone());
    files
}

/// Keys whose change needs a restart, named for the log line.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check(
        "server.client_listen",
        old.server.client_listen != new.server.client_listen,
    );
    check(
        "server.dispatch_listen",
        old.server.dispatch_listen != new.server.dispatch_listen,
    );
    check(
        "server.admin_listen",
        old.server.admin_listen != new.server.admin_listen,
    );
    check("database", old.database.url != new.database.url);
    check(
        "auth",
        old.auth.token_secret != new.auth.token_secret
            || old.auth.dispatch_secret != new.auth.dispatch_secret,
    );
    check(
        "sessions",
        old.sessions.max_per_user != new.sessions.max_per_user
            || old.sessions.on_limit != new.sessions.on_limit
            || old.sessions.heartbeat_interval_ms != new.sessions.heartbeat_interval_ms
            || old.sessions.outbound_queue != new.sessions.outbound_queue,
    );
    check(
        "dispatch",
        old.dispatch.max_inflight != new.dispatch.max_inflight
            || old.dispatch.ping_timeout_ms != new.dispatch.ping_timeout_ms
            || old.dispatch.max_frame_bytes != new.dispatch.max_frame_bytes,
    );
    check("logging", old.logging.sink != new.logging.sink);
    changed
}

/// Watches and reloads until shutdown. `current` is the config the
/// gateway started with (with environment overrides applied).
pub async fn watch(
    current: Config,
    plugins: Plugins,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<(), WatchError> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let interesting = Arc::new(std::sync::Mutex::new(watched_files(&current)));
    let filter = interesting.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let files = filter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if events
            .iter()
            .any(|e| e.paths.iter().any(|p| files.contains(p)))
        {
            // A full channel already holds a pending reload: nothing is lost.
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| WatchError {
        path: current.path.display().to_string(),
        source,
    })?;
    let mut watching = BTreeSet::new();
    for dir in folders(&current) {
        watch_dir(&mut debouncer, &dir, &mut watching);
    }
    tracing::info!(
        folders = watching.len(),
        "hot reload: watching the config and plugins"
    );

    let mut current = current;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            signal = rx.recv() => if signal.is_none() { return Ok(()) },
        }
        let started = Instant::now();
        let next = match Config::load(&current.path) {
            Ok(next) => next,
            Err(err) => {
                metrics.config_reload_failures.inc();
                tracing::error!(error = %err, "hot reload: the new config is invalid; the running one keeps serving");
                continue;
            }
        };
        let restart = restart_only_changes(&current, &next);
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "hot reload: these settings change only on restart; running values kept");
        }
        match plugins.reload(&next).await {
            Ok(()) => {
                tracing::info!(routes = next.routes.len(), took = ?started.elapsed(), "hot reload: routes and plugins swapped in");
                for dir in folders(&next) {
                    watch_dir(&mut debouncer, &dir, &mut watching);
                }
                *interesting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = watched_files(&next);
                // Keep the values that need a restart; take the rest.
                current.routes = next.routes;
                current.plugins = next.plugins;
            }
            Err(err) => {
                tracing::error!(error = %err, "hot reload: a plugin failed to load; the current version keeps serving");
            }
        }
    }
}

fn watch_dir(
    debouncer: &mut notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    dir: &Path,
    watching: &mut BTreeSet<PathBuf>,
) {
    if watching.contains(dir) {
        return;
    }
    match debouncer.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => {
            watching.insert(dir.to_path_buf());
        }
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "hot reload: cannot watch folder")
        }
    }
}
