//! Hot reload: watch `gateway.toml` and every routed plugin, and on a
//! change build the new route table aside and swap it in whole.
//!
//! The watcher only debounces file events and sends a signal. It reacts to
//! writes, creates, renames and removes, never to reads (the gateway reads
//! these files itself on every reload), and a signal whose files hash the
//! same as the last reload's inputs does nothing: one change, one reload.
//!
//! A reload compares the running config with the new one key by key (the
//! trees their `Serialize` impls produce, so a new config field is
//! compared without touching this file). Keys under [`RELOADABLE`] are
//! applied; every other changed key is named in a warning and keeps its
//! running value until a restart. Routes, plugins and the reloadable
//! plugin settings are one value: [`Plugins::reload`] builds the new route
//! table aside and swaps it whole, or changes nothing when any plugin fails
//! to load. Folders are watched, not files, so every editor save pattern
//! (write in place, write-then-rename, delete-then-create) is seen.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::plugin::{Plugins, content_hash};
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// Quiet time before a burst of file events counts as one change.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The config keys a reload applies (a key path, or the prefix of every
/// path under it). Everything else needs a restart. [`apply_reloadable`]
/// takes exactly these; a unit test holds the two together.
const RELOADABLE: &[&str] = &[
    "routes",
    "plugins.cache_dir",
    "plugins.query_timeout_ms",
    "plugins.query_max_rows",
];

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    path: String,
    source: notify::Error,
}

/// What changed between the running config and a new one, as key paths
/// (`database.max_connections`, `routes[0].config.greeting`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys a reload applies.
    pub applied: Vec<String>,
    /// Keys that keep their running value until a restart.
    pub restart: Vec<String>,
}

/// Compares two configs key by key and sorts each changed key into
/// applied or restart-only.
pub fn classify(running: &Config, next: &Config) -> Result<Changes, serde_json::Error> {
    let mut changes = Changes::default();
    for key in changed_keys(running, next)? {
        if is_reloadable(&key) {
            changes.applied.push(key);
        } else {
            changes.restart.push(key);
        }
    }
    Ok(changes)
}

/// The leaf key paths whose values differ between two serialized values.
pub fn changed_keys<T: Serialize>(old: &T, new: &T) -> Result<Vec<String>, serde_json::Error> {
    let mut out = Vec::new();
    walk(
        "",
        &serde_json::to_value(old)?,
        &serde_json::to_value(new)?,
        &mut out,
    );
    Ok(out)
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let missing = Value::Null;
                walk(
                    &child,
                    a.get(key).unwrap_or(&missing),
                    b.get(key).unwrap_or(&missing),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let missing = Value::Null;
                walk(
                    &format!("{path}[{i}]"),
                    a.get(i).unwrap_or(&missing),
                    b.get(i).unwrap_or(&missing),
                    out,
                );
            }
        }
        _ if old != new => out.push(path.to_owned()),
        _ => {}
    }
}

fn is_reloadable(key: &str) -> bool {
    RELOADABLE.iter().any(|r| {
        key.strip_prefix(r)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    })
}

/// Takes the [`RELOADABLE`] settings of `next` into `running`.
fn apply_reloadable(running: &mut Config, next: &Config) {
    running.routes = next.routes.clone();
    running.plugins.cache_dir = next.plugins.cache_dir.clone();
    running.plugins.query_timeout_ms = next.plugins.query_timeout_ms;
    running.plugins.query_max_rows = next.plugins.query_max_rows;
}

/// Whether a file event can mean new content: reads, opens and closes
/// after reading can't, nor can a metadata change (content hashes decide
/// anyway; this keeps the gateway's own reads from waking it).
pub fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

/// What a reload is built from: the config text and each route's plugin
/// bytes (by event; `None` when unreadable), as hashes.
#[derive(Debug, PartialEq, Eq)]
struct Inputs {
    config: [u8; 32],
    plugins: BTreeMap<String, Option<String>>,
}

/// Hashes every routed plugin file as it is on disk now.
async fn plugin_hashes(config: &Config) -> BTreeMap<String, Option<String>> {
    let mut hashes = BTreeMap::new();
    for route in &config.routes {
        let hash = tokio::fs::read(&route.plugin)
            .await
            .ok()
            .map(|b| content_hash(&b));
        hashes.insert(route.event.clone(), hash);
    }
    hashes
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

type Debouncer = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// The watch itself: folders registered with the debouncer, and the files
/// in them whose events count (shared with the debouncer's callback).
struct Watch {
    debouncer: Debouncer,
    folders: BTreeSet<PathBuf>,
    files: Arc<std::sync::Mutex<BTreeSet<PathBuf>>>,
}

impl Watch {
    /// Watches what any of `configs` names (the running config, and after
    /// a failed reload the new one too, so fixing its plugin is seen).
    fn cover(&mut self, configs: &[&Config]) {
        let mut files = BTreeSet::new();
        for config in configs {
            for dir in folders(config) {
                self.watch_dir(&dir);
            }
            files.extend(watched_files(config));
        }
        *self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = files;
    }

    fn watch_dir(&mut self, dir: &Path) {
        if self.folders.contains(dir) {
            return;
        }
        match self.debouncer.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.folders.insert(dir.to_path_buf());
            }
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "hot reload: cannot watch folder")
            }
        }
    }
}

/// Watches and reloads until shutdown. `current` is the config the
/// gateway started with (with environment overrides applied), `plugins`
/// the routes loaded from it.
pub async fn watch(
    current: Config,
    plugins: Plugins,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<(), WatchError> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let files = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let filter = files.clone();
    let debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let files = filter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if events
            .iter()
            .any(|e| is_change(&e.kind) && e.paths.iter().any(|p| files.contains(p)))
        {
            // A full channel already holds a pending reload: nothing is lost.
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| WatchError {
        path: current.path.display().to_string(),
        source,
    })?;
    let mut watch = Watch {
        debouncer,
        folders: BTreeSet::new(),
        files,
    };
    watch.cover(&[&current]);
    tracing::info!(
        folders = watch.folders.len(),
        "hot reload: watching the config and plugins"
    );

    let mut current = current;
    let mut last = Inputs {
        config: current.text_sha256,
        plugins: loaded(&plugins),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            signal = rx.recv() => if signal.is_none() { return Ok(()) },
        }
        let started = Instant::now();
        let text = match tokio::fs::read_to_string(&current.path).await {
            Ok(text) => text,
            Err(err) => {
                metrics.config_reload_failures.inc();
                tracing::error!(path = %current.path.display(), error = %err, "hot reload: cannot read the config; the running one keeps serving");
                continue;
            }
        };
        let parsed = Config::from_text(&text, &current.path);
        let inputs = Inputs {
            config: Sha256::digest(text.as_bytes()).into(),
            plugins: plugin_hashes(parsed.as_ref().unwrap_or(&current)).await,
        };
        if inputs == last {
            tracing::debug!("hot reload: the config and plugins are unchanged");
            continue;
        }
        last = inputs;
        let mut next = match parsed {
            Ok(next) => next,
            Err(err) => {
                metrics.config_reload_failures.inc();
                tracing::error!(error = %err, "hot reload: the new config is invalid; the running one keeps serving");
                continue;
            }
        };
        // Secrets the file leaves unset came from elsewhere at start (the
        // environment, or `dev`'s defaults): the file didn't change them.
        if next.auth.token_secret.is_none() {
            next.auth.token_secret = current.auth.token_secret.clone();
        }
        if next.auth.dispatch_secret.is_none() {
            next.auth.dispatch_secret = current.auth.dispatch_secret.clone();
        }
        let changes = match classify(&current, &next) {
            Ok(changes) => changes,
            Err(err) => {
                metrics.config_reload_failures.inc();
                tracing::error!(error = %err, "hot reload: cannot compare the new config with the running one; the running one keeps serving");
                continue;
            }
        };
        if !changes.restart.is_empty() {
            tracing::warn!(keys = %changes.restart.join(", "), "hot reload: these settings change only on restart; running values kept");
        }
        if changes.applied.is_empty() && last.plugins == loaded(&plugins) {
            tracing::info!(
                "hot reload: config re-read; no route, plugin or plugin setting changed"
            );
            continue;
        }
        match plugins.reload(&next).await {
            Ok(()) => {
                apply_reloadable(&mut current, &next);
                watch.cover(&[&current]);
                last.plugins = loaded(&plugins);
                tracing::info!(routes = current.routes.len(), applied = %changes.applied.join(", "), took = ?started.elapsed(), "hot reload: routes and plugins swapped in");
            }
            Err(err) => {
                metrics.config_reload_failures.inc();
                watch.cover(&[&current, &next]);
                tracing::error!(error = %err, "hot reload: a plugin failed to load; nothing changed, the current version keeps serving");
            }
        }
    }
}

/// The plugin versions serving now, in [`Inputs`] form.
fn loaded(plugins: &Plugins) -> BTreeMap<String, Option<String>> {
    plugins
        .versions()
        .into_iter()
        .map(|(event, hash)| (event, Some(hash)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, RenameMode};

    const SHIPPED: &str = include_str!("../gateway.toml");

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/otako/gateway.toml")).unwrap()
    }

    /// A value of the same JSON type that differs from `v`.
    fn other(v: &Value) -> Value {
        match v {
            Value::Bool(b) => Value::Bool(!b),
            Value::Number(n) => Value::from(n.as_u64().unwrap_or(0) + 1),
            Value::String(s) => Value::String(format!("{s}x")),
            Value::Null => Value::from(1),
            Value::Array(_) | Value::Object(_) => Value::Null,
        }
    }

    fn leaves(path: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    leaves(&p, child, out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    leaves(&format!("{path}[{i}]"), child, out);
                }
            }
            _ => out.push(path.to_owned()),
        }
    }

    fn pointer(path: &str) -> String {
        format!("/{}", path.replace(['.', '['], "/").replace(']', ""))
    }

    #[test]
    fn every_key_of_the_shipped_config_is_applied_or_warned() {
        let tree = serde_json::to_value(parse(SHIPPED)).unwrap();
        let mut keys = Vec::new();
        leaves("", &tree, &mut keys);
        // The keys the file doesn't set are in the tree too, with defaults.
        for key in [
            "database.max_connections",
            "dispatch.outcome_retention_s",
            "auth.token_ttl_s",
            "plugins.hot_reload",
            "cluster.node_id",
            "routes[0].config.max_content_len",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
        }
        for key in &keys {
            let mut changed = tree.clone();
            let slot = changed.pointer_mut(&pointer(key)).unwrap();
            *slot = other(slot);
            // Seen, so either applied or named in the restart warning.
            assert_eq!(
                changed_keys(&tree, &changed).unwrap(),
                std::slice::from_ref(key),
                "changing {key}"
            );
        }
    }

    #[test]
    fn restart_only_keys_are_named_exactly() {
        let running = parse(SHIPPED);
        let next = parse(
            &SHIPPED
                .replace("[database]\n", "[database]\nmax_connections = 3\n")
                .replace("[dispatch]\n", "[dispatch]\noutcome_retention_s = 60\n")
                .replace(
                    "hot_reload = true",
                    "hot_reload = false\nquery_max_rows = 5",
                )
                .replace("# token_ttl_s   = 86400", "token_ttl_s = 60")
                .replace(
                    "dispatch_secret = \"change-me-too\"",
                    "dispatch_secret = \"other\"",
                )
                .replace("max_content_len = \"4000\"", "max_content_len = \"10\""),
        );
        let changes = classify(&running, &next).unwrap();
        assert_eq!(
            changes.restart,
            [
                "auth.dispatch_secret",
                "auth.token_ttl_s",
                "database.max_connections",
                "dispatch.outcome_retention_s",
                "plugins.hot_reload",
            ]
        );
        assert_eq!(
            changes.applied,
            ["plugins.query_max_rows", "routes[0].config.max_content_len"]
        );
        // Secrets are compared by digest, never serialized as themselves.
        let tree = serde_json::to_string(&next).unwrap();
        assert!(!tree.contains("change-me"), "{tree}");
        assert!(!tree.contains("\"other\""), "{tree}");
    }

    #[test]
    fn a_new_field_is_compared_without_editing_the_diff() {
        #[derive(Serialize)]
        struct Grown {
            old: u32,
            added_later: Option<String>,
        }
        let a = Grown {
            old: 1,
            added_later: None,
        };
        let b = Grown {
            old: 1,
            added_later: Some("x".into()),
        };
        assert_eq!(changed_keys(&a, &b).unwrap(), ["added_later"]);
        assert!(!is_reloadable("added_later"));
    }

    #[test]
    fn applying_takes_exactly_the_reloadable_keys() {
        let running = parse(SHIPPED);
        let next = parse(
            &SHIPPED
                .replace("[plugins]\n", "[plugins]\nquery_timeout_ms = 7\nquery_max_rows = 7\ncache_dir = \"elsewhere\"\n")
                .replace("timeout_ms = 50", "timeout_ms = 9")
                .replace("max_per_user          = 5", "max_per_user = 1"),
        );
        let mut applied = running.clone();
        apply_reloadable(&mut applied, &next);
        let taken = changed_keys(&running, &applied).unwrap();
        assert!(!taken.is_empty());
        assert!(taken.iter().all(|k| is_reloadable(k)), "{taken:?}");
        let left = changed_keys(&applied, &next).unwrap();
        assert_eq!(left, ["sessions.max_per_user"]);
        for key in RELOADABLE {
            assert!(
                taken.iter().any(|k| is_reloadable(k) && k.starts_with(key)),
                "{key} not applied: {taken:?}"
            );
        }
    }

    #[test]
    fn reads_do_not_count_as_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::Both
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Remove(
            notify::event::RemoveKind::File
        )));
    }
}
