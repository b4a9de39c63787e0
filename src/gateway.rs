//! `serve`: opens the database, binds the listeners, runs until the stop
//! signal, then drains: stop accepting, finish in-flight events, close
//! sessions with 1001.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::{self, Readiness};
use crate::config::Config;
use crate::db::{Access, Db, DbError};
use crate::session::Sessions;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::token::TokenKey;

/// How long shutdown waits for in-flight work before giving up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The addresses actually bound (port 0 in the config picks a free port).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub client: SocketAddr,
    pub dispatch: SocketAddr,
    pub admin: SocketAddr,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client=http://{}/gateway dispatch=http://{}/dispatch admin=http://{}/metrics",
            self.client, self.dispatch, self.admin
        )
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Opens the read-write pool and applies pending migrations.
pub async fn open_database(config: &Config) -> Result<Db, DbError> {
    let db = Db::open(
        &config.database.url,
        config.database.max_connections.get(),
        Access::ReadWrite,
    )
    .await?;
    let applied = db.migrate().await?;
    tracing::info!(backend = db.backend(), url = %config.database.url, applied, "database ready");
    Ok(db)
}

/// Runs the gateway until `stop` resolves. `on_bound` hears the bound
/// addresses once every listener is up.
pub async fn serve(
    config: Config,
    stop: impl Future<Output = ()>,
    on_bound: impl FnOnce(Bound),
) -> Result<(), StartError> {
    let (token_secret, _) = config.require_secrets()?;
    let metrics = Metrics::new();
    // Built before the listeners so the dispatch side can be handed a clone.
    let sessions = Sessions::new(
        config.sessions.clone(),
        TokenKey::new(
            token_secret.expose().as_bytes(),
            config.auth.token_ttl_s.map(|t| t.get()),
        ),
        metrics.clone(),
    );
    let db = open_database(&config).await?;

    let client = bind("server.client_listen", config.server.client_listen).await?;
    let dispatch = bind("server.dispatch_listen", config.server.dispatch_listen).await?;
    let admin_listener = bind("server.admin_listen", config.server.admin_listen).await?;
    let bound = Bound {
        client: local(&client, config.server.client_listen),
        dispatch: local(&dispatch, config.server.dispatch_listen),
        admin: local(&admin_listener, config.server.admin_listen),
    };

    let shutdown = Shutdown::new();
    let readiness = Arc::new(Readiness::default());
    shutdown.spawn(admin::serve(
        admin_listener,
        shutdown.clone(),
        db.clone(),
        metrics.clone(),
        readiness.clone(),
    ));
    shutdown.spawn({
        let (sessions, shutdown) = (sessions.clone(), shutdown.clone());
        async move { sessions.serve(client, shutdown).await }
    });
    readiness.set_plugins_loaded();
    tracing::info!(%bound, "gateway listening");
    on_bound(bound);

    stop.await;
    tracing::info!("shutting down: draining in-flight work");
    readiness.set_draining();
    if tokio::time::timeout(DRAIN_TIMEOUT, shutdown.drain())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "drain timed out; exiting with work unfinished");
    }
    drop(dispatch);
    db.close().await;
    tracing::info!("gateway stopped");
    Ok(())
}

fn local(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}
