//! `otako-gateway dev`: the gateway, the reference backend and the file
//! log sink in one process on the embedded defaults, with demo users and a
//! channel seeded and copy-paste commands printed, so a first run shows a
//! message travel end to end.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};

use tokio_util::sync::CancellationToken;

use crate::api;
use crate::config::{Config, Secret};
use crate::db::{Db, now_ms, rfc3339};
use crate::gateway::{self, Bound};
use crate::ids::UserId;
use crate::plugin::{DevSource, Plugins};
use crate::token::{TokenKey, now_s};
use crate::with_pool;

/// Why `dev` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Gateway(#[from] gateway::StartError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot build the plugins ({command}): {reason}")]
    Build { command: String, reason: String },
}

/// The demo users and channel `dev` seeds (fixed ids, so re-runs reuse them).
const DEMO_USERS: [(i64, &str); 2] = [(1, "alice"), (2, "bob")];
const DEMO_CHANNEL: i64 = 1;

/// Runs everything until `stop`.
pub async fn run(
    mut config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DevError> {
    if config.auth.token_secret.is_none() {
        config.auth.token_secret = Some(Secret::new("dev-token-secret"));
    }
    if config.auth.dispatch_secret.is_none() {
        config.auth.dispatch_secret = Some(Secret::new("dev-dispatch-secret"));
    }
    if config.server.allowed_origins.is_none() {
        config.server.allowed_origins = Some(demo_origins(config.api.listen));
    }
    build_missing_plugins(&config)?;
    let db = gateway::open_database(&config).await?;
    seed(&db).await?;

    let stop_all = CancellationToken::new();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<(Bound, Plugins)>();
    let gateway_task = {
        let config = config.clone();
        let stop = stop_all.clone();
        tokio::spawn(async move {
            gateway::serve(config, stop.cancelled_owned(), move |bound, plugins| {
                let _ = bound_tx.send((bound, plugins.clone()));
            })
            .await
        })
    };
    let Ok((bound, plugins)) = bound_rx.await else {
        // The gateway failed before binding: report its error.
        return match gateway_task.await {
            Ok(Err(err)) => Err(err.into()),
            _ => Ok(()),
        };
    };
    let scheme = if config.server.dispatch_tls {
        "wss"
    } else {
        "ws"
    };
    let urls = api::GatewayUrls {
        dispatch: Some(format!("{scheme}://{}/dispatch", bound.dispatch)),
        client: Some(format!(
            "{}://{}/gateway",
            if bound.client_tls { "wss" } else { "ws" },
            bound.client
        )),
    };
    let (token_secret, _) = config.require_secrets()?;
    let tokens = TokenKey::new(token_secret.expose().as_bytes(), None);
    let api_task = {
        let config = config.clone();
        let db = db.clone();
        let stop = stop_all.clone();
        tokio::spawn(async move {
            api::run(&config, db, urls, stop.cancelled_owned(), move |api| {
                print_welcome(bound, api, &tokens);
            })
            .await
        })
    };

    let rebuilder = tokio::spawn(rebuild_on_save(config.clone(), plugins, stop_all.clone()));

    // Either half ending on its own (the API's listener can't bind, say)
    // stops dev with its error: running on without it would leave the
    // user waiting for a welcome that never comes.
    let (mut api_task, mut gateway_task) = (api_task, gateway_task);
    let (mut api_done, mut gateway_done) = (None, None);
    tokio::select! {
        () = stop => {}
        done = &mut api_task => api_done = Some(done),
        done = &mut gateway_task => gateway_done = Some(done),
    }
    stop_all.cancel();
    let _ = rebuilder.await;
    let api_result = match api_done {
        Some(done) => done,
        None => api_task.await,
    };
    let gateway_result = match gateway_done {
        Some(done) => done,
        None => gateway_task.await,
    };
    db.close().await;
    if let Ok(Err(err)) = gateway_result {
        return Err(err.into());
    }
    if let Ok(Err(err)) = api_result {
        return Err(err.into());
    }
    Ok(())
}

/// The reference backend's own origin, where a demo page is served from:
/// allowed on the client listener unless the config lists origins itself.
fn demo_origins(api: std::net::SocketAddr) -> Vec<String> {
    let mut origins = vec![format!("http://{api}")];
    if api.ip().is_loopback() {
        origins.push(format!("http://localhost:{}", api.port()));
    }
    origins
}

fn print_welcome(bound: Bound, api: std::net::SocketAddr, tokens: &TokenKey) {
    let token = |id: i64| {
        UserId::from_i64(id)
            .map(|u| tokens.issue(u, now_s()))
            .unwrap_or_default()
    };
    let (alice, bob) = (token(DEMO_USERS[0].0), token(DEMO_USERS[1].0));
    println!("otako-gateway listening {bound}");
    println!("otako-gateway api listening http://{api}");
    println!("otako-gateway dev is running (Ctrl-C stops it).");
    let ws = |tls| if tls { "wss" } else { "ws" };
    println!(
        "  clients {}://{}/gateway  dispatch {}://{}/dispatch  metrics http://{}/metrics",
        ws(bound.client_tls),
        bound.client,
        ws(bound.dispatch_tls),
        bound.dispatch,
        bound.admin
    );
    println!();
    println!("Open the demo chat, one tab per demo user (both are in channel {DEMO_CHANNEL}):");
    println!("  alice  http://{api}/?token={alice}");
    println!("  bob    http://{api}/?token={bob}");
    println!("Watch the gateway on the operator page:");
    println!("  http://{}/", bound.admin);
    println!();
    println!(
        "Or from a terminal: watch bob's session (any WebSocket client; curl shows the raw frames):"
    );
    println!(
        "  curl -sN --http1.1 -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
         -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' 'http://{}/gateway?token={bob}'",
        bound.client
    );
    println!("Then post as alice:");
    println!(
        "  curl -s -X POST http://{api}/channels/{DEMO_CHANNEL}/messages -H 'Content-Type: application/json' \
         -H 'Authorization: {alice}' -d '{{\"content\":\"Hello from Otako!\",\"nonce\":\"demo-1\"}}'"
    );
}

/// Demo users and a channel, created once.
async fn seed(db: &Db) -> Result<(), crate::db::DbError> {
    let now = rfc3339(now_ms());
    for (id, name) in DEMO_USERS {
        with_pool!(db, p => sqlx::query("INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(id).bind(name).bind(&now).execute(p).await.map(|_| ()))?;
    }
    with_pool!(db, p => sqlx::query("INSERT INTO channels (id, name, created_at) VALUES ($1, 'general', $2) ON CONFLICT DO NOTHING")
        .bind(DEMO_CHANNEL).bind(&now).execute(p).await.map(|_| ()))?;
    for (id, _) in DEMO_USERS {
        with_pool!(db, p => sqlx::query("INSERT INTO channel_members (channel_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(DEMO_CHANNEL).bind(id).execute(p).await.map(|_| ()))?;
    }
    Ok(())
}

/// The plugins workspace that builds a routed file, if the file sits in
/// one (`plugins/<name>.wasm` next to `plugins/Cargo.toml`).
fn workspace_of(plugin: &Path) -> Option<PathBuf> {
    let dir = plugin.parent()?;
    dir.join("Cargo.toml").is_file().then(|| dir.to_path_buf())
}

/// Builds each missing routed component (its cargo workspace for
/// wasm32-wasip2, or its JS/Python folder) into place.
fn build_missing_plugins(config: &Config) -> Result<(), DevError> {
    let missing: Vec<&Path> = config
        .routes
        .iter()
        .map(|r| r.plugin.as_path())
        .filter(|p| !p.exists())
        .collect();
    for plugin in missing {
        let Some(builder) = Builder::of(plugin) else {
            tracing::warn!(plugin = %plugin.display(), "routed plugin is missing and neither a plugins workspace nor a JS/Python source folder is next to it");
            continue;
        };
        builder.build(&[plugin.to_path_buf()])?;
    }
    Ok(())
}

/// Folders of build outputs and toolchains: never sources.
const GENERATED: [&str; 4] = ["target", "node_modules", ".toolchain", "__pycache__"];

/// How `dev` rebuilds a routed plugin when its sources are saved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Builder {
    /// A Rust crate in the plugins cargo workspace at this folder.
    Cargo(PathBuf),
    /// A JavaScript or Python plugin: `plugins/<name>/handler.js|app.py`
    /// built to `plugins/<name>.wasm` by `scripts/build-lang-plugins.sh`.
    Lang { root: PathBuf, name: String },
}

impl Builder {
    /// The builder of a routed plugin file, if `dev` knows how to build it.
    /// Its folders are absolute, as the watcher reports saved paths (a
    /// config's relative plugin path is against the working directory).
    fn of(plugin: &Path) -> Option<Builder> {
        let plugin = std::path::absolute(plugin).ok()?;
        if let Some(lang) = lang_plugin(&plugin) {
            return Some(lang);
        }
        workspace_of(&plugin).map(Builder::Cargo)
    }

    /// The folder to watch.
    fn sources(&self) -> PathBuf {
        match self {
            Builder::Cargo(workspace) => workspace.clone(),
            Builder::Lang { root, name } => root.join("plugins").join(name),
        }
    }

    /// Whether saving `path` calls for this rebuild. Build outputs and
    /// toolchains never do: a build writes them. Only the part of the
    /// path inside the sources folder is checked, so a project that sits
    /// under a folder named like one (`…/target/…`) still rebuilds.
    fn rebuilds_on(&self, path: &Path) -> bool {
        let Ok(inside) = path.strip_prefix(self.sources()) else {
            return false;
        };
        let generated = inside
            .components()
            .any(|c| GENERATED.iter().any(|skip| c.as_os_str() == *skip));
        let extensions: &[&str] = match self {
            Builder::Cargo(_) => &["rs", "toml", "wit"],
            Builder::Lang { .. } => &["js", "py"],
        };
        let source = path
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| extensions.contains(&x));
        source && !generated
    }

    /// Builds, then puts each changed routed component in place (the build
    /// script does so itself, atomically); returns how many changed.
    fn build(&self, routed: &[PathBuf]) -> Result<usize, DevError> {
        match self {
            Builder::Cargo(workspace) => {
                cargo_build(workspace)?;
                let mut copied = 0;
                for plugin in routed {
                    if Builder::of(plugin).as_ref() == Some(self)
                        && copy_if_changed(workspace, plugin)?
                    {
                        copied += 1;
                    }
                }
                Ok(copied)
            }
            Builder::Lang { root, name } => {
                let wasm = root.join("plugins").join(format!("{name}.wasm"));
                let before = std::fs::read(&wasm).ok();
                build_lang_plugin(root, name)?;
                Ok(usize::from(std::fs::read(&wasm).ok() != before))
            }
        }
    }
}

/// `plugins/<name>.wasm` whose `plugins/<name>/` holds a `handler.js` or
/// an `app.py`, in a project with `scripts/build-lang-plugins.sh`.
fn lang_plugin(plugin: &Path) -> Option<Builder> {
    let plugins = plugin.parent()?;
    let name = plugin.file_stem()?.to_str()?.to_owned();
    let dir = plugins.join(&name);
    let root = plugins.parent()?.to_path_buf();
    let has_source = dir.join("handler.js").is_file() || dir.join("app.py").is_file();
    (has_source && lang_script(&root).is_file()).then_some(Builder::Lang { root, name })
}

fn lang_script(root: &Path) -> PathBuf {
    root.join("scripts/build-lang-plugins.sh")
}

/// `scripts/build-lang-plugins.sh NAME` in the project at `root`: builds
/// `plugins/NAME/` (installing the JS/Python toolchain on first use) to
/// `plugins/NAME.wasm`, through a temporary file and a rename.
pub fn build_lang_plugin(root: &Path, name: &str) -> Result<(), DevError> {
    let script = lang_script(root);
    let fail = |reason: String| DevError::Build {
        command: format!("{} {name}", script.display()),
        reason,
    };
    let status = Command::new(&script)
        .arg(name)
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        return Err(fail(format!("exited with {status}")));
    }
    let wasm = root.join("plugins").join(format!("{name}.wasm"));
    if !wasm.is_file() {
        return Err(fail(format!("{} was not produced", wasm.display())));
    }
    Ok(())
}

/// The save-to-live loop: when a plugin's source is saved (a Rust crate's
/// `.rs`/`.toml`/`.wit`, a JS `handler.js` or Python `app.py` and their
/// modules), rebuild it (incremental cargo, or componentize) and put each
/// routed component whose bytes changed into place; the gateway's hot
/// reload then swaps it in. A JS/Python save is served from its sources
/// first ([`LangReload`]).
async fn rebuild_on_save(config: Config, plugins: Plugins, stop: CancellationToken) {
    let builders: BTreeSet<Builder> = config
        .routes
        .iter()
        .filter_map(|r| Builder::of(&r.plugin))
        .collect();
    if builders.is_empty() {
        return;
    }
    let routed: Vec<PathBuf> = config.routes.iter().map(|r| r.plugin.clone()).collect();
    let langs = LangReload::start(&builders, &plugins, &stop);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let debouncer = new_debouncer(
        Duration::from_millis(150),
        None,
        move |result: DebounceEventResult| {
            let Ok(events) = result else { return };
            // Writes only: a build reads every source.
            let saved: Vec<PathBuf> = events
                .iter()
                .filter(|e| crate::reload::is_change(&e.kind))
                .flat_map(|e| e.paths.iter().cloned())
                .collect();
            if !saved.is_empty() {
                let _ = tx.send(saved);
            }
        },
    );
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(err) => {
            tracing::warn!(error = %err, "dev: cannot watch plugin sources; rebuild by hand");
            return;
        }
    };
    for builder in &builders {
        let dir = builder.sources();
        if let Err(err) = debouncer.watch(&dir, RecursiveMode::Recursive) {
            tracing::warn!(dir = %dir.display(), error = %err, "dev: cannot watch plugin sources");
        }
    }
    loop {
        let mut saved = tokio::select! {
            _ = stop.cancelled() => return,
            saved = rx.recv() => match saved { Some(saved) => saved, None => return },
        };
        // Saves that arrived during the last build: one rebuild covers them.
        while let Ok(more) = rx.try_recv() {
            saved.extend(more);
        }
        for builder in builders
            .iter()
            .filter(|b| saved.iter().any(|p| b.rebuilds_on(p)))
        {
            if let Some(lang) = langs.iter().find(|l| &l.builder == builder) {
                lang.saved(&plugins).await;
                continue;
            }
            let (builder, routed) = (builder.clone(), routed.clone());
            let started = Instant::now();
            let label = format!("{}", builder.sources().display());
            let built = tokio::task::spawn_blocking(move || builder.build(&routed)).await;
            match built {
                Ok(Ok(updated)) => {
                    tracing::info!(plugin = %label, took = ?started.elapsed(), updated, "dev: plugins rebuilt")
                }
                Ok(Err(err)) => {
                    tracing::error!(plugin = %label, error = %err, "dev: plugin build failed; the running version keeps serving")
                }
                Err(err) => tracing::error!(error = %err, "dev: plugin build task failed"),
            }
        }
    }
}

/// A JS/Python handler's save-to-live. componentize-js/-py rebuild a whole
/// runtime image around a saved handler (6-20 s), so a save is served at
/// once from its sources through the dev loader of its language
/// (wit/dev.wit, built once), while componentize rebuilds
/// `plugins/<name>.wasm` in the background; once that build holds what is
/// served, the route moves to the built component, which `serve` runs.
struct LangReload {
    builder: Builder,
    /// `plugins/<name>.wasm`, absolute.
    plugin: PathBuf,
    /// `plugins/.toolchain/dev/loader-{js,py}.wasm`.
    loader: PathBuf,
    /// The loader is built and compiled: until then saves wait for the build.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped per save; the background builder builds the latest.
    builds: tokio::sync::watch::Sender<u64>,
}

impl LangReload {
    /// One per JS/Python builder, with its background builder, and one
    /// task that readies the dev loaders.
    fn start(
        builders: &BTreeSet<Builder>,
        plugins: &Plugins,
        stop: &CancellationToken,
    ) -> Vec<LangReload> {
        let mut langs = Vec::new();
        let mut project = None;
        for builder in builders {
            let Builder::Lang { root, name } = builder else {
                continue;
            };
            project = Some(root.clone());
            let sources = builder.sources();
            let lang = if sources.join("handler.js").is_file() {
                "js"
            } else {
                "py"
            };
            let (builds, requests) = tokio::sync::watch::channel(0u64);
            let reload = LangReload {
                builder: builder.clone(),
                plugin: root.join("plugins").join(format!("{name}.wasm")),
                loader: root.join(format!("plugins/.toolchain/dev/loader-{lang}.wasm")),
                ready: Arc::default(),
                builds,
            };
            tokio::spawn(reload.build_in_background(requests, plugins.clone(), stop.clone()));
            langs.push(reload);
        }
        if let Some(root) = project {
            let loaders = langs
                .iter()
                .map(|l| (l.loader.clone(), l.ready.clone()))
                .collect();
            tokio::spawn(ready_dev_loaders(root, loaders, plugins.clone()));
        }
        langs
    }

    /// A save: serve the sources now if the loader is ready, and ask for a build.
    async fn saved(&self, plugins: &Plugins) {
        if self.ready.load(std::sync::atomic::Ordering::Acquire) {
            let started = Instant::now();
            let source = DevSource {
                loader: self.loader.clone(),
                files: Arc::new(read_sources(&self.builder)),
            };
            match plugins.serve_dev_source(&self.plugin, source).await {
                Ok(()) => {
                    tracing::info!(plugin = %self.plugin.display(), took = ?started.elapsed(), "dev: saved source serving through the dev loader; building the component")
                }
                Err(err) => {
                    tracing::error!(plugin = %self.plugin.display(), error = %err, "dev: the saved source does not load; the running version keeps serving")
                }
            }
        }
        self.builds.send_modify(|n| *n += 1);
    }

    /// Builds after each save (the latest one when saves come faster), and
    /// moves the route to the built component once it holds what is served.
    fn build_in_background(
        &self,
        mut requests: tokio::sync::watch::Receiver<u64>,
        plugins: Plugins,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + use<> {
        let (builder, plugin) = (self.builder.clone(), self.plugin.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = requests.changed() => if changed.is_err() { return },
                }
                requests.borrow_and_update();
                let files = read_sources(&builder);
                let started = Instant::now();
                let build = builder.clone();
                let built = tokio::task::spawn_blocking(move || build.build(&[])).await;
                match built {
                    Ok(Ok(_)) => {
                        tracing::info!(plugin = %plugin.display(), took = ?started.elapsed(), "dev: plugins rebuilt");
                        // Compiled first, so the swap below is quick and
                        // a save meanwhile is not held up behind it.
                        if let Err(err) = plugins.precompile(&plugin).await {
                            tracing::error!(error = %err, "dev: the built component does not compile; the saved source keeps serving");
                            continue;
                        }
                        match plugins.end_dev_source(&plugin, &files).await {
                            Ok(true) => {
                                tracing::info!(plugin = %plugin.display(), "dev: the built component serves the saved source now")
                            }
                            Ok(false) => {}
                            Err(err) => {
                                tracing::error!(plugin = %plugin.display(), error = %err, "dev: the built component does not load; the saved source keeps serving")
                            }
                        }
                    }
                    Ok(Err(err)) => {
                        tracing::error!(plugin = %plugin.display(), error = %err, "dev: plugin build failed; the running version keeps serving")
                    }
                    Err(err) => tracing::error!(error = %err, "dev: plugin build task failed"),
                }
            }
        }
    }
}

/// Builds the dev loaders if needed (`build-lang-plugins.sh --dev-loaders`,
/// a no-op when up to date) and compiles them, then lets saves use them.
async fn ready_dev_loaders(
    root: PathBuf,
    loaders: Vec<(PathBuf, Arc<std::sync::atomic::AtomicBool>)>,
    plugins: Plugins,
) {
    let started = Instant::now();
    let script = lang_script(&root);
    let status =
        tokio::task::spawn_blocking(move || Command::new(&script).arg("--dev-loaders").status())
            .await;
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        tracing::warn!(
            "dev: the JS/Python dev loaders did not build; a saved handler goes live after its componentize build"
        );
        return;
    }
    for (loader, ready) in loaders {
        match plugins.prepare_dev_loader(&loader).await {
            Ok(()) => {
                ready.store(true, std::sync::atomic::Ordering::Release);
                tracing::info!(loader = %loader.display(), took = ?started.elapsed(), "dev: dev loader ready; a saved JS/Python handler goes live without waiting for its build");
            }
            Err(err) => {
                tracing::warn!(error = %err, "dev: dev loader unusable; a saved handler goes live after its componentize build")
            }
        }
    }
}

/// A JS/Python handler's sources as its build reads them (tests and
/// generated folders left out), sorted by path.
fn read_sources(builder: &Builder) -> Vec<(String, String)> {
    let dir = builder.sources();
    let mut files = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !GENERATED.iter().any(|g| path.ends_with(g)) {
                    pending.push(path);
                }
                continue;
            }
            let test = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("test_") || n.contains(".test."));
            if test || !builder.rebuilds_on(&path) {
                continue;
            }
            let (Ok(relative), Ok(text)) =
                (path.strip_prefix(&dir), std::fs::read_to_string(&path))
            else {
                continue;
            };
            let relative = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            files.push((relative, text));
        }
    }
    files.sort();
    files
}

/// The plugins workspace's cargo profile `dev` builds: release code
/// without LTO, built incrementally (plugins/Cargo.toml says why).
const DEV_PROFILE: &str = "dev-plugin";

fn build_command(workspace: &Path) -> String {
    format!(
        "cargo build --manifest-path {} --target wasm32-wasip2 --target-dir {} --profile {DEV_PROFILE}",
        workspace.join("Cargo.toml").display(),
        workspace.join("target").display()
    )
}

/// Incremental `cargo build` of a plugins workspace for wasm32-wasip2,
/// into the workspace's own `target/` even if `CARGO_TARGET_DIR` is set,
/// since the built component is copied from there.
fn cargo_build(workspace: &Path) -> Result<(), DevError> {
    let fail = |reason: String| DevError::Build {
        command: build_command(workspace),
        reason,
    };
    tracing::info!(command = %build_command(workspace), "building plugins");
    let status = Command::new("cargo")
        .args([
            "build",
            "--quiet",
            "--target",
            "wasm32-wasip2",
            "--profile",
            DEV_PROFILE,
            "--manifest-path",
        ])
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(workspace.join("target"))
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "exited with {status} (is `rustup target add wasm32-wasip2` done, and does the workspace define [profile.{DEV_PROFILE}]?)"
        )))
    }
}

/// Copies the built component named like `plugin` over it if the bytes
/// differ; write-then-rename, so the watcher never sees half a file.
fn copy_if_changed(workspace: &Path, plugin: &Path) -> Result<bool, DevError> {
    let fail = |reason: String| DevError::Build {
        command: build_command(workspace),
        reason,
    };
    let name = plugin
        .file_name()
        .ok_or_else(|| fail("the plugin path has no file name".into()))?;
    let built = workspace
        .join("target/wasm32-wasip2")
        .join(DEV_PROFILE)
        .join(name);
    let fresh =
        std::fs::read(&built).map_err(|e| fail(format!("cannot read {}: {e}", built.display())))?;
    if std::fs::read(plugin).ok().as_deref() == Some(fresh.as_slice()) {
        return Ok(false);
    }
    let tmp = plugin.with_extension("wasm.tmp");
    std::fs::write(&tmp, &fresh)
        .map_err(|e| fail(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, plugin)
        .map_err(|e| fail(format!("cannot replace {}: {e}", plugin.display())))?;
    Ok(true)
}

/// `cargo build --profile dev-plugin --target wasm32-wasip2` in `workspace`, then
/// copies the component named like `plugin` to `plugin`.
pub fn build_plugin(workspace: &Path, plugin: &Path) -> Result<(), DevError> {
    cargo_build(workspace)?;
    copy_if_changed(workspace, plugin).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_rebuild_and_outputs_do_not_wherever_the_project_sits() {
        let cargo = Builder::Cargo(PathBuf::from("/work/target/project/plugins"));
        assert!(cargo.rebuilds_on(Path::new("/work/target/project/plugins/handler/src/lib.rs")));
        assert!(!cargo.rebuilds_on(Path::new(
            "/work/target/project/plugins/target/release/build/x/out.rs"
        )));
        assert!(!cargo.rebuilds_on(Path::new("/work/target/project/plugins/handler/notes.md")));
        assert!(!cargo.rebuilds_on(Path::new("/elsewhere/src/lib.rs")));
        let lang = Builder::Lang {
            root: PathBuf::from("/work/target/p"),
            name: "h".to_owned(),
        };
        assert!(lang.rebuilds_on(Path::new("/work/target/p/plugins/h/handler.js")));
        assert!(!lang.rebuilds_on(Path::new("/work/target/p/plugins/h/node_modules/x.js")));
        assert!(!lang.rebuilds_on(Path::new("/work/target/p/plugins/other/app.py")));
    }
}
