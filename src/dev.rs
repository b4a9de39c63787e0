//! `otako-gateway dev`: the gateway, the reference backend and the file
//! log sink in one process on the embedded defaults, with demo users and a
//! channel seeded and copy-paste commands printed, so a first run shows a
//! message travel end to end.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};

use tokio_util::sync::CancellationToken;

use crate::api;
use crate::config::{Config, Secret};
use crate::db::{Db, now_ms, rfc3339};
use crate::gateway::{self, Bound};
use crate::ids::UserId;
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
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<Bound>();
    let gateway_task = {
        let config = config.clone();
        let stop = stop_all.clone();
        tokio::spawn(async move {
            gateway::serve(config, stop.cancelled_owned(), move |bound| {
                let _ = bound_tx.send(bound);
            })
            .await
        })
    };
    let Ok(bound) = bound_rx.await else {
        // The gateway failed before binding: report its error.
        return match gateway_task.await {
            Ok(Err(err)) => Err(err.into()),
            _ => Ok(()),
        };
    };
    let dispatch_url = format!("ws://{}/dispatch", bound.dispatch);
    let (token_secret, _) = config.require_secrets()?;
    let tokens = TokenKey::new(token_secret.expose().as_bytes(), None);
    let api_task = {
        let config = config.clone();
        let db = db.clone();
        let stop = stop_all.clone();
        tokio::spawn(async move {
            api::run(
                &config,
                db,
                Some(dispatch_url),
                stop.cancelled_owned(),
                move |api| {
                    print_welcome(bound, api, &tokens);
                },
            )
            .await
        })
    };

    let rebuilder = tokio::spawn(rebuild_on_save(config.clone(), stop_all.clone()));

    stop.await;
    stop_all.cancel();
    let _ = rebuilder.await;
    if let Ok(Err(err)) = api_task.await {
        tracing::error!(error = %err, "api stopped with an error");
    }
    if let Ok(Err(err)) = gateway_task.await {
        return Err(err.into());
    }
    db.close().await;
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
    println!("otako-gateway dev is running (Ctrl-C stops it):");
    println!("  clients   ws://{}/gateway", bound.client);
    println!("  dispatch  ws://{}/dispatch", bound.dispatch);
    println!("  admin     http://{}/metrics", bound.admin);
    println!("otako-gateway api listening http://{api}");
    println!("  demo users: alice (id 1) and bob (id 2), both in channel {DEMO_CHANNEL}");
    println!("  alice's token: {alice}");
    println!("  bob's token:   {bob}");
    println!();
    println!("Watch bob's session (any WebSocket client; curl shows the raw frames):");
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

/// Builds the plugins workspace for wasm32-wasip2 and copies each missing
/// routed component into place.
fn build_missing_plugins(config: &Config) -> Result<(), DevError> {
    let missing: Vec<&Path> = config
        .routes
        .iter()
        .map(|r| r.plugin.as_path())
        .filter(|p| !p.exists())
        .collect();
    for plugin in missing {
        let Some(workspace) = workspace_of(plugin) else {
            tracing::warn!(plugin = %plugin.display(), "routed plugin is missing and no plugins workspace is next to it");
            continue;
        };
        build_plugin(&workspace, plugin)?;
    }
    Ok(())
}

/// The save-to-live loop: when a plugin crate's source changes, rebuild
/// the plugins workspace (incremental cargo) and copy each routed
/// component whose bytes changed into place; the gateway's hot reload then
/// swaps it in.
async fn rebuild_on_save(config: Config, stop: CancellationToken) {
    let workspaces: BTreeSet<PathBuf> = config
        .routes
        .iter()
        .filter_map(|r| workspace_of(&r.plugin))
        .collect();
    if workspaces.is_empty() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let debouncer = new_debouncer(
        Duration::from_millis(150),
        None,
        move |result: DebounceEventResult| {
            let Ok(events) = result else { return };
            // Writes only: cargo reads every source while it builds.
            let source_changed = events.iter().any(|e| {
                crate::reload::is_change(&e.kind)
                    && e.paths.iter().any(|p| {
                        let in_target = p.components().any(|c| c.as_os_str() == "target");
                        let source = matches!(
                            p.extension().and_then(|x| x.to_str()),
                            Some("rs" | "toml" | "wit")
                        );
                        source && !in_target
                    })
            });
            if source_changed {
                let _ = tx.try_send(());
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
    for dir in &workspaces {
        if let Err(err) = debouncer.watch(dir, RecursiveMode::Recursive) {
            tracing::warn!(dir = %dir.display(), error = %err, "dev: cannot watch plugin sources");
        }
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            signal = rx.recv() => if signal.is_none() { return },
        }
        for workspace in &workspaces {
            let routed: Vec<PathBuf> = config
                .routes
                .iter()
                .filter(|r| workspace_of(&r.plugin).as_deref() == Some(workspace.as_path()))
                .map(|r| r.plugin.clone())
                .collect();
            let workspace = workspace.clone();
            let started = Instant::now();
            let built = tokio::task::spawn_blocking(move || -> Result<usize, DevError> {
                cargo_build(&workspace)?;
                let mut copied = 0;
                for plugin in &routed {
                    if copy_if_changed(&workspace, plugin)? {
                        copied += 1;
                    }
                }
                Ok(copied)
            })
            .await;
            match built {
                Ok(Ok(copied)) => {
                    tracing::info!(took = ?started.elapsed(), updated = copied, "dev: plugins rebuilt")
                }
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "dev: plugin build failed; the running version keeps serving")
                }
                Err(err) => tracing::error!(error = %err, "dev: plugin build task failed"),
            }
        }
    }
}

fn build_command(workspace: &Path) -> String {
    format!(
        "cargo build --manifest-path {} --target wasm32-wasip2 --target-dir {} --release",
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
            "--release",
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
            "exited with {status} (is `rustup target add wasm32-wasip2` done?)"
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
    let built = workspace.join("target/wasm32-wasip2/release").join(name);
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

/// `cargo build --release --target wasm32-wasip2` in `workspace`, then
/// copies the component named like `plugin` to `plugin`.
pub fn build_plugin(workspace: &Path, plugin: &Path) -> Result<(), DevError> {
    cargo_build(workspace)?;
    copy_if_changed(workspace, plugin).map(|_| ())
}
