//! The reference HTTP backend (DESIGN §7): users, channels and messages,
//! each message write committed together with its dispatch row (an
//! outbox), which [`outbox`] sends to the gateway in the background.
//!
//! - [`routes`]: the HTTP handlers and their JSON errors.
//! - [`store`]: the SQL behind them.
//! - [`outbox`]: the outbox relay: pipelined sends, retries, log-and-drop.
//! - [`web`]: the demo page and the browser client, embedded.
//! - [`lease`]: the lease on `cluster.node_id`, the node bits of the ids
//!   it mints.

pub mod lease;
pub mod outbox;
pub mod routes;
pub mod store;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::{Config, TlsFiles};
use crate::db::{Db, DbError};
use crate::errlog::ErrorLog;
use crate::ids::IdGen;
use crate::listen::Guard;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::token::TokenKey;

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr} (api.listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What every handler shares.
pub struct AppState {
    pub db: Db,
    pub tokens: TokenKey,
    pub ids: IdGen,
    pub max_body_bytes: usize,
    pub max_content_len: usize,
    /// The gateway's client endpoint, for the demo page.
    pub gateway_url: String,
    /// Wakes the outbox relay as soon as a row is committed.
    pub outbox_ready: Arc<Notify>,
}

/// Where the backend finds the gateway when not from the config: `dev`
/// points both at the gateway it just started.
#[derive(Debug, Default)]
pub struct GatewayUrls {
    /// Overrides `api.dispatch_url`.
    pub dispatch: Option<String>,
    /// The client endpoint the demo page connects to; by default
    /// `server.client_listen`'s `/gateway`.
    pub client: Option<String>,
}

/// Runs the backend on an already-migrated database until `stop`.
/// `on_bound` hears the HTTP address.
pub async fn run(
    config: &Config,
    db: Db,
    urls: GatewayUrls,
    stop: impl Future<Output = ()>,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ApiError> {
    let (token_secret, dispatch_secret) = config.require_secrets()?;
    let acceptor = config
        .api
        .tls
        .as_ref()
        .map(TlsFiles::acceptor)
        .transpose()?;
    let url = urls
        .dispatch
        .unwrap_or_else(|| config.api.dispatch_url.clone());
    let gateway_url = urls.client.unwrap_or_else(|| {
        let scheme = if config.server.tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        format!("{scheme}://{}/gateway", config.server.client_listen)
    });
    let connector = if url.starts_with("wss://") {
        Some(crate::tls::connector(config.api.dispatch_ca.as_deref())?)
    } else {
        None
    };
    let listener = crate::sys::listen(config.api.listen, config.server.listen_backlog.get())
        .map_err(|source| ApiError::Bind {
            addr: config.api.listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(config.api.listen);
    // After binding, so a start that fails there leaves no lease behind.
    let node = config.cluster.node_id;
    let lease = lease::NodeLease::take(
        &db,
        node,
        Duration::from_millis(config.cluster.lease_ms.get()),
    )
    .await?;
    let shutdown = Shutdown::new();
    let background = Shutdown::new();
    let metrics = Metrics::new();
    let outbox_ready = Arc::new(Notify::new());
    let state = Arc::new(AppState {
        db: db.clone(),
        tokens: TokenKey::new(
            token_secret.expose().as_bytes(),
            config.auth.token_ttl_s.map(|t| t.get()),
        ),
        ids: IdGen::new(node.get()),
        max_body_bytes: config.api.max_body_bytes.get(),
        max_content_len: config.api.max_content_len.get(),
        gateway_url,
        outbox_ready: outbox_ready.clone(),
    });

    // Released only after the handlers and the dispatcher have stopped.
    background.spawn(lease.keep(background.clone()));
    let errlog = ErrorLog::new(db.clone(), metrics);
    background.spawn(
        errlog
            .clone()
            .deliver(config.logging.sink.clone(), background.clone()),
    );
    let relay = outbox::Relay {
        db: db.clone(),
        url,
        tls: connector,
        secret: dispatch_secret,
        policy: crate::dispatch_client::RetryPolicy {
            attempts: config.api.dispatch_attempts.get(),
            attempt_timeout: Duration::from_millis(config.api.attempt_timeout_ms.get()),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        },
        errlog,
        ready: outbox_ready,
    };
    shutdown.spawn(relay.run(shutdown.clone()));
    let guard = Guard {
        listener: "api",
        timeout: Duration::from_millis(config.server.handshake_timeout_ms.get()),
        tls: acceptor,
        metrics: None,
    };
    shutdown.spawn(routes::serve(listener, state, shutdown.clone(), guard));
    tracing::info!(%bound, "api listening");
    on_bound(bound);

    stop.await;
    tracing::info!("api shutting down");
    shutdown.drain().await;
    background.drain().await;
    Ok(())
}
