//! `serve`: opens the database, binds the listeners, runs until the stop
//! signal, then drains: stop accepting, finish in-flight events, close
//! sessions with 1001.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, Readiness};
use crate::cluster::{Cluster, ClusterError};
use crate::config::{Config, TlsFiles};
use crate::db::{Access, Db, DbError};
use crate::dispatch::claims::{Claims, SqlClaims};
use crate::dispatch::members::Members;
use crate::dispatch::pipeline::Fanout;
use crate::dispatch::{self, Listener, Pipeline};
use crate::errlog::ErrorLog;
use crate::http::BearerSecret;
use crate::ids::UserId;
use crate::listen::Guard;
use crate::plugin::{PluginError, Plugins, Presence};
use crate::reload;
use crate::session::{Edge, Sessions};
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
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot start the dispatch runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr} ({what})")]
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
    /// Whether the client and dispatch listeners speak TLS.
    pub client_tls: bool,
    pub dispatch_tls: bool,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = |tls| if tls { "https" } else { "http" };
        write!(
            f,
            "client={}://{}/gateway dispatch={}://{}/dispatch admin=http://{}/metrics",
            scheme(self.client_tls),
            self.client,
            scheme(self.dispatch_tls),
            self.dispatch,
            self.admin
        )
    }
}

fn bind(what: &'static str, addr: SocketAddr, backlog: u32) -> Result<TcpListener, StartError> {
    crate::sys::listen(addr, backlog).map_err(|source| StartError::Bind { what, addr, source })
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

/// Plugins ask who is online through the session registry; the plugin
/// host never sees the session module itself.
impl Presence for Sessions {
    fn online(&self, users: &[UserId]) -> Vec<UserId> {
        Sessions::online(self, users)
    }
}

/// Runs the gateway until `stop` resolves. `on_bound` hears the bound
/// addresses once every listener is up, with the loaded plugins (`dev`
/// serves saved handler sources through them).
///
/// Shutdown runs in three phases so nothing in flight is lost: dispatch
/// connections stop reading and finish their events (acks sent), then
/// client sessions are closed with 1001, then background work (the error
/// log's deliverer, the admin listener) stops.
pub async fn serve(
    config: Config,
    stop: impl Future<Output = ()>,
    on_bound: impl FnOnce(Bound, &Plugins),
) -> Result<(), StartError> {
    let (token_secret, dispatch_secret) = config.require_secrets()?;
    let metrics = Metrics::new();
    let db = open_database(&config).await?;
    // Read-only: plugin queries, and the host's per-event lookups
    // (membership versions, user existence; on SQLite inline, see `db::reader`).
    let read_db = Db::open(
        &config.database.url,
        config.database.max_connections.get(),
        Access::ReadOnly,
    )
    .await?;

    // Loaded (and so checked) before anything binds.
    let client_tls = config
        .server
        .tls
        .as_ref()
        .map(TlsFiles::acceptor)
        .transpose()?;
    let guard = |listener, tls: Option<&TlsAcceptor>| Guard {
        listener,
        timeout: Duration::from_millis(config.server.handshake_timeout_ms.get()),
        tls: tls.cloned(),
        metrics: Some(metrics.clone()),
    };
    let backlog = config.server.listen_backlog.get();
    let client = bind("server.client_listen", config.server.client_listen, backlog)?;
    let dispatch_listener = bind(
        "server.dispatch_listen",
        config.server.dispatch_listen,
        backlog,
    )?;
    let admin_listener = bind("server.admin_listen", config.server.admin_listen, backlog)?;
    let bound = Bound {
        client: local(&client, config.server.client_listen),
        dispatch: local(&dispatch_listener, config.server.dispatch_listen),
        admin: local(&admin_listener, config.server.admin_listen),
        client_tls: client_tls.is_some(),
        dispatch_tls: config.server.dispatch_tls,
    };

    // After binding, so the lease names the node by its client address.
    let cluster = match &config.cluster.nats_url {
        Some(url) => {
            Some(Cluster::join(&config.cluster, url, bound.client, metrics.clone()).await?)
        }
        None => None,
    };

    let front = Shutdown::new();
    let clients = Shutdown::new();
    let background = Shutdown::new();
    let readiness = Arc::new(Readiness::default());
    background.spawn(admin::serve(
        admin_listener,
        background.clone(),
        guard("admin", None),
        admin::State {
            db: db.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            dispatch_secret: BearerSecret::new(dispatch_secret.expose()),
            cluster: cluster.clone(),
        },
    ));

    let tokens = TokenKey::new(
        token_secret.expose().as_bytes(),
        config.auth.token_ttl_s.map(|t| t.get()),
    );
    let sessions = Sessions::new(
        config.sessions.clone(),
        Edge::new(&config.server, client_tls.clone()),
        tokens,
        Some(read_db.clone()),
        cluster
            .clone()
            .map(|c| Arc::new(c) as Arc<dyn crate::session::ledger::Ledger>),
        metrics.clone(),
    );
    if let Some(cluster) = &cluster {
        background.spawn(
            cluster
                .clone()
                .run(sessions.clone(), bound.client, background.clone()),
        );
    }
    background.spawn(crate::revoke::watch(
        read_db.clone(),
        sessions.clone(),
        metrics.clone(),
        background.clone(),
    ));
    // A live peer's attempt ends within its route's timeout, plus a lease
    // for the claim, the bus and the `done` mark.
    let peers = cluster.clone().map(|c| {
        let longest_route = config.routes.iter().map(|r| r.timeout_ms.get()).max();
        let wait = longest_route.unwrap_or(0) + config.cluster.lease_ms.get();
        (
            Arc::new(c) as Arc<dyn crate::dispatch::claims::Peers>,
            Duration::from_millis(wait),
        )
    });
    let dispatch_rt = DispatchRuntime::start()?;
    let retention = Duration::from_secs(config.dispatch.outcome_retention_s.get());
    let (claims, members) = {
        let _entered = dispatch_rt.enter();
        let claims = SqlClaims::start(db.clone(), retention, peers, &background);
        // Every event reads its channel's membership version: in the
        // claim thread's transactions on SQLite, else through a grouped
        // reader's task on the event path's runtime (no hop between
        // runtimes).
        let members = Members::start(db.clone(), read_db.clone(), claims.fresh_reads());
        (claims, Arc::new(members))
    };
    readiness.watch_claims(claims.healthy());
    // Cluster mode: events go to every node's sessions through the bus,
    // this node's included (see `cluster::bus`).
    let fanout: Arc<dyn Fanout> = match &cluster {
        Some(cluster) => {
            let bus = cluster.bus();
            background.spawn(bus.clone().consume(
                sessions.clone(),
                members.clone(),
                background.clone(),
            ));
            Arc::new(bus)
        }
        None => Arc::new(sessions.clone()),
    };
    let presence: Arc<dyn Presence> = match cluster {
        Some(cluster) => Arc::new(crate::cluster::Online {
            cluster,
            local: sessions.clone(),
        }),
        None => Arc::new(sessions.clone()),
    };
    let plugins = Plugins::load(&config, read_db.clone(), presence, metrics.clone()).await?;
    readiness.set_plugins_loaded(plugins.clone());
    if config.plugins.hot_reload {
        let watcher = reload::watch(
            config.clone(),
            plugins.clone(),
            metrics.clone(),
            background.clone(),
        );
        background.spawn(async move {
            if let Err(err) = watcher.await {
                tracing::error!(error = %err, "hot reload is off");
            }
        });
    }

    let errlog = ErrorLog::new(db.clone(), metrics.clone());
    background.spawn(
        errlog
            .clone()
            .deliver(config.logging.sink.clone(), background.clone()),
    );
    let entered = dispatch_rt.enter();
    let pipeline = Pipeline {
        plugins: plugins.clone(),
        sessions: sessions.clone(),
        fanout,
        reads: read_db.clone(),
        members,
        claims: Claims::new(claims),
        errlog,
        metrics: metrics.clone(),
    };
    let dispatch_tls = client_tls.as_ref().filter(|_| config.server.dispatch_tls);
    let listener = Listener::new(
        pipeline,
        &dispatch_secret,
        config.dispatch.clone(),
        guard("dispatch", dispatch_tls),
    );
    let dispatch_listener = dispatch_listener
        .into_std()
        .and_then(TcpListener::from_std)
        .map_err(|source| StartError::Bind {
            what: "server.dispatch_listen",
            addr: bound.dispatch,
            source,
        })?;
    front.spawn(dispatch::serve(
        listener.clone(),
        dispatch_listener,
        front.clone(),
    ));
    drop(entered);
    // The client accept loop is polled here, by whatever waits for the
    // stop signal (for `otako-gateway serve`, `main`'s `block_on`: a
    // thread of its own), not spawned on a worker: in a connect storm the
    // workers' run queues fill with new sessions, and an accept loop
    // queued behind them lets the listen queue overflow, each dropped SYN
    // costing its client a 1 s retry. It accepts until the sessions are
    // closed in the drain.
    let mut accepting = pin!(sessions.serve(client, clients.clone()));
    drop(listener);

    tracing::info!(%bound, "gateway listening");
    on_bound(bound, &plugins);

    let mut stop = pin!(stop);
    tokio::select! {
        _ = &mut stop => {}
        // Ends only when the sessions are closed, which `stop` starts.
        _ = &mut accepting => stop.await,
    }
    tracing::info!("shutting down: finishing in-flight events");
    readiness.set_draining();
    let mut drain = pin!(tokio::time::timeout(DRAIN_TIMEOUT, async {
        front.drain().await;
        tracing::info!("dispatch drained; closing client sessions");
        clients.drain().await;
        background.drain().await;
    }));
    let drained = tokio::select! {
        drained = &mut drain => drained,
        _ = &mut accepting => drain.await,
    };
    if drained.is_err() {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "drain timed out; exiting with work unfinished");
    }
    read_db.close().await;
    db.close().await;
    // Last: connections it opened are closed through its reactor.
    drop(dispatch_rt);
    tracing::info!("gateway stopped");
    Ok(())
}

/// The event path's own runtime (dispatch connections, their events,
/// the claims, the membership-version reads): on the clients' runtime
/// each step of an event would queue behind every session woken to write
/// (thousands of socket writes per pass), so events would reach their
/// fan-out late and sessions would write fewer frames per syscall. Shut down without waiting: it is
/// dropped inside the clients' runtime, once dispatch has drained.
struct DispatchRuntime {
    /// Taken only by `drop`.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl DispatchRuntime {
    fn start() -> Result<DispatchRuntime, StartError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // One worker per core, as the clients' runtime has.
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("otako-dispatch")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        Ok(DispatchRuntime {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Tasks spawned while the guard lives run on this runtime.
    fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }
}

impl Drop for DispatchRuntime {
    fn drop(&mut self) {
        // A plain drop would block on its threads, which panics inside
        // another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn local(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}
