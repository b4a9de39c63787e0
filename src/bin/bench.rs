//! The load tool: drives a real `otako-gateway serve` (and, side by side,
//! the bare tokio-tungstenite baseline in `benches/baseline`) over loopback
//! and reports each run as one JSON line on stdout, with progress and a
//! readable summary on stderr.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/bench fanout --clients 100,1000,5000 [--members 10000] [--database postgres]
//! target/release/bench latency --clients 1000 --rate 200 [--database postgres]
//! target/release/bench --target gateway chat [--database postgres]
//! target/release/bench storm --clients 10000
//! target/release/bench idle --sessions 10000
//! target/release/bench ack-rate --connections 1,8 [--database postgres]
//! target/release/bench resume --clients 1000 --rate 200
//! target/release/bench --target gateway [--tls] handshakes --concurrency 32
//! target/release/bench --target gateway slowloris --sockets 5000 --connects 1000
//! target/release/bench --target gateway --tls fanout --clients 1000
//! target/release/bench connects --clients 2000 [--cluster nats://127.0.0.1:4222]
//! target/release/bench --target gateway --cluster nats://127.0.0.1:4222 --nodes 3 fanout --clients 1000
//! target/release/bench --target gateway --cluster nats://127.0.0.1:4222 --nodes 3 latency --clients 1000 --rate 200
//! target/release/bench --target gateway --cluster nats://127.0.0.1:4222 --nodes 3 connects --clients 2000
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;

use otako_gateway::ids::UserId;
use otako_gateway::token::TokenKey;

const TOKEN_SECRET: &str = "bench-token-secret";
const DISPATCH_SECRET: &str = "bench-dispatch-secret";
/// Connections per source address before moving to the next 127.n.x.1,
/// below the ~28k ephemeral ports one address has.
const PER_SOURCE: usize = 20_000;

/// Each server gets its own 127.n.0.0/16 to connect from, so the previous
/// run's TIME_WAIT ports never collide with this run's binds (a bind among
/// thousands of them searches the port range: seconds of the tool's CPU).
/// Chosen by the clock, a quarter second per net, so a net comes round
/// again only after 62 s, past TIME_WAIT's 60; process ids repeated sooner.
/// A server started in a quarter this process already used takes the next
/// net: never more than that ahead of the clock, where the next process
/// (which starts from the clock) would take it again.
fn next_source_net() -> u8 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let quarter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis() / 250).unwrap_or(0));
    let last = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(quarter.max(last + 1))
        })
        .unwrap_or_else(|last| last);
    1 + u8::try_from(quarter.max(last + 1) % 250).unwrap_or(0)
}

#[derive(Parser)]
#[command(name = "bench", about = "Otako Gateway load tool (loopback only)")]
struct Cli {
    /// Which server to measure; `both` runs them side by side.
    #[arg(long, value_enum, default_value = "both", global = true)]
    target: Which,
    /// The gateway's `sessions.resume_buffer` (1: resume buffers all but off).
    #[arg(long, default_value_t = 1024, global = true)]
    resume_buffer: usize,
    /// Clients connect over TLS (`wss://`) to a gateway with a self-signed
    /// certificate made with `openssl` (gateway only).
    #[arg(long, global = true)]
    tls: bool,
    /// Runs the gateway in cluster mode on this NATS server (node_id 1,
    /// a subject prefix of its own; PostgreSQL).
    #[arg(long, global = true)]
    cluster: Option<String>,
    /// `--cluster` with this many gateway nodes on one database and prefix
    /// (node_id 1..=N): subscribers spread round-robin over their client
    /// listeners, events dispatched to node 1 (fanout, latency, connects).
    #[arg(long, default_value_t = 1, global = true)]
    nodes: usize,
    /// The gateway's `database.max_connections` (each of its two pools).
    #[arg(long, default_value_t = 8, global = true)]
    db_connections: u32,
    /// Extra parameters for the gateway's PostgreSQL URL, e.g.
    /// `sslmode=disable` (sqlx and tokio-postgres negotiate TLS by default,
    /// even on loopback).
    #[arg(long, global = true)]
    pg_params: Option<String>,
    /// Where the gateway reaches PostgreSQL: `127.0.0.1:5432` over TCP, or
    /// a Unix socket directory such as `/var/run/postgresql` (no TCP
    /// loopback and no TLS; the usual transport when both share a host).
    #[arg(long, global = true, default_value = "127.0.0.1:5432")]
    pg_host: String,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Gateway,
    Baseline,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Database {
    Sqlite,
    Postgres,
}

impl Database {
    /// What the gateway runs on; `--cluster` always means PostgreSQL.
    fn label(self) -> &'static str {
        match self {
            _ if CLUSTER.get().is_some() => "postgres+nats",
            Database::Sqlite => "sqlite",
            Database::Postgres => "postgres",
        }
    }
}

#[derive(Subcommand)]
enum Workload {
    /// C online members of one channel; the publisher keeps at most
    /// `window` events ahead of what the subscribers have received.
    Fanout {
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        clients: Vec<usize>,
        /// Members of the channel (default: the C online ones); the rest
        /// are offline, so they cost the gateway only the member lookup.
        #[arg(long)]
        members: Option<usize>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Events sent but not yet received by every subscriber.
        #[arg(long, default_value_t = 32)]
        window: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        database: Database,
    },
    /// Dispatch-send to client-receive latency at a fixed event rate.
    Latency {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        database: Database,
    },
    /// The chat mix: 10,000 sessions of 5,000 users in 2,020 channels;
    /// saturation events/s, then latency at half of it (gateway only).
    Chat {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        database: Database,
        /// No session connects: every event runs its whole path but
        /// reaches nobody, so the server's CPU per event is the per-event
        /// cost with the fan-out excluded (saturation phase only).
        #[arg(long)]
        offline: bool,
    },
    /// Simultaneous connects (a reconnect storm): time until all are in.
    Storm {
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        clients: Vec<usize>,
    },
    /// Resident memory per idle session.
    Idle {
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        sessions: Vec<usize>,
    },
    /// C members of one channel at a fixed event rate; every connection
    /// drops at once (no close frame), stays away, and resumes: how many
    /// resumed, gaps and duplicates in `s`, and reconnect-to-caught-up time.
    Resume {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// When (after the first event) the connections drop.
        #[arg(long, default_value_t = 3000)]
        drop_after_ms: u64,
        /// How long they stay away before resuming.
        #[arg(long, default_value_t = 2000)]
        away_ms: u64,
    },
    /// Client handshakes per second: `concurrency` loops of connect,
    /// HELLO, close (gateway only).
    Handshakes {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Real clients' connect time (connect to HELLO) while `sockets`
    /// slowloris connections hold half-sent handshakes open, against the
    /// same with none (gateway only).
    Slowloris {
        #[arg(long, default_value_t = 5000)]
        sockets: usize,
        /// Real connects measured quiet; under attack, batches of as many
        /// for at least two handshake timeouts.
        #[arg(long, default_value_t = 1000)]
        connects: usize,
        /// The gateway's `server.handshake_timeout_ms`.
        #[arg(long, default_value_t = 10_000)]
        handshake_timeout_ms: u64,
    },
    /// Session connects (gateway only, PostgreSQL; `--cluster` for the
    /// cluster-wide limit, `--nodes` spreads them): each connect's time to
    /// HELLO one at a time, then connects per second with `concurrency` in
    /// flight.
    Connects {
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        #[arg(long, default_value_t = 1000)]
        sequential: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Acked events per second with one recipient.
    AckRate {
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        connections: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "sqlite")]
        database: Database,
    },
}

/// The gateway's allocator: the load tool's own cost per frame stays small.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    RESUME_BUFFER.store(cli.resume_buffer.max(1) as u64, Ordering::Relaxed);
    DB_CONNECTIONS.store(cli.db_connections.max(1), Ordering::Relaxed);
    PG_PARAMS.get_or_init(|| cli.pg_params.clone().unwrap_or_default());
    PG_HOST.get_or_init(|| cli.pg_host.replace('/', "%2F"));
    if cli.tls {
        if cli.target != Which::Gateway {
            bail!("--tls needs --target gateway: the baseline speaks plain WebSocket only");
        }
        let tls = Tls::make().context("making a self-signed certificate with openssl")?;
        let _ = TLS.set(tls);
    }
    if cli.nodes != 1 {
        if cli.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if cli.cluster.is_none() || cli.target != Which::Gateway {
            bail!(
                "--nodes needs --cluster and --target gateway: only gateway nodes form a cluster"
            );
        }
        if !matches!(
            cli.workload,
            Workload::Fanout { .. } | Workload::Latency { .. } | Workload::Connects { .. }
        ) {
            bail!("--nodes applies to the fanout, latency and connects workloads only");
        }
    }
    NODES.store(cli.nodes, Ordering::Relaxed);
    if let Some(url) = cli.cluster {
        let _ = CLUSTER.set(url);
    }
    match otako_gateway::sys::raise_fd_limit() {
        Ok(limit) => FD_LIMIT.store(limit, Ordering::Relaxed),
        Err(err) => eprintln!("cannot raise the open-file limit: {err}"),
    }
    let targets: Vec<Kind> = match cli.target {
        Which::Gateway => vec![Kind::Gateway],
        Which::Baseline => vec![Kind::Baseline],
        Which::Both => vec![Kind::Gateway, Kind::Baseline],
    };
    match cli.workload {
        Workload::Fanout {
            clients,
            members,
            seconds,
            window,
            database,
        } => {
            for c in clients {
                for kind in &targets {
                    let run = Fanout {
                        clients: c,
                        members: members.unwrap_or(c).max(c),
                        seconds,
                        window,
                        database,
                    };
                    fanout(*kind, run).await?;
                }
            }
        }
        Workload::Latency {
            clients,
            rate,
            seconds,
            database,
        } => {
            for kind in &targets {
                latency(*kind, clients, rate, seconds, database).await?;
            }
        }
        Workload::Chat {
            seconds,
            database,
            offline,
        } => chat(seconds, database, offline).await?,
        Workload::Storm { clients } => {
            // A process's first storm runs slower than the next ones (the
            // tool's first use of its memory and sockets), which would
            // favour whichever target goes second: one unmeasured storm
            // against the baseline first, so every measured one finds the
            // tool warm.
            if let Some(&c) = clients.first() {
                storm(Kind::Baseline, c, false).await?;
            }
            for c in clients {
                for kind in &targets {
                    storm(*kind, c, true).await?;
                }
            }
        }
        Workload::Idle { sessions } => {
            for n in sessions {
                for kind in &targets {
                    // A size the machine can't hold is reported, not fatal.
                    if let Err(err) = idle(*kind, n).await {
                        report(
                            json!({"workload": "idle", "target": kind.name(), "sessions": n, "error": format!("{err:#}")}),
                            format!("idle {:8} N={n}: not run: {err:#}", kind.name()),
                        );
                    }
                }
            }
        }
        Workload::Resume {
            clients,
            rate,
            seconds,
            drop_after_ms,
            away_ms,
        } => {
            // The baseline has no sessions to resume: gateway only.
            let times = (
                Duration::from_secs(seconds),
                Duration::from_millis(drop_after_ms),
                Duration::from_millis(away_ms),
            );
            resume(clients, rate, times).await?;
        }
        Workload::Handshakes {
            concurrency,
            seconds,
        } => handshakes(concurrency, Duration::from_secs(seconds)).await?,
        Workload::Slowloris {
            sockets,
            connects,
            handshake_timeout_ms,
        } => {
            HANDSHAKE_TIMEOUT_MS.store(handshake_timeout_ms, Ordering::Relaxed);
            slowloris(sockets, connects).await?;
        }
        Workload::Connects {
            clients,
            sequential,
            concurrency,
        } => connects(clients, sequential, concurrency).await?,
        Workload::AckRate {
            connections,
            seconds,
            database,
        } => {
            for k in connections {
                ack_rate(k, seconds, database).await?;
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gateway,
    Baseline,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Baseline => "baseline",
        }
    }
}

/// A server process under test (with `--nodes`, node 1 of the cluster).
struct Server {
    kind: Kind,
    child: Child,
    /// Clients connect here (the gateway's client listener, or the baseline).
    client: SocketAddr,
    /// `--nodes`: nodes 2..=N; subscriber `i` connects to node `i % N + 1`.
    peers: Vec<Peer>,
    /// Events go here (the gateway's dispatch listener, or the baseline).
    dispatch: SocketAddr,
    _dir: tempfile::TempDir,
    db_url: String,
    /// Second octet of the 127.n.x.1 addresses subscribers connect from.
    source_net: u8,
    /// Subscriber `i` signs in as user `i % users + 1`.
    users: usize,
    /// `--cluster`: the subject prefix its NATS state is named under.
    cluster_prefix: Option<String>,
}

/// A gateway node of a `--nodes` cluster other than node 1.
struct Peer {
    child: Child,
    client: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    /// Stops every node, then deletes what they made in NATS (once all are
    /// gone, so none makes the fan-out stream again).
    fn drop(&mut self) {
        let stop = |child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        stop(&mut self.child);
        for peer in &mut self.peers {
            stop(&mut peer.child);
        }
        if let (Some(prefix), Some(url)) = (&self.cluster_prefix, CLUSTER.get()) {
            delete_cluster_state(url, prefix);
        }
        if let Some((_, rest)) = self.db_url.split_once(SCHEMA_PARAM) {
            drop_schema(rest.split('&').next().unwrap_or(rest));
        }
    }
}

/// Deletes `prefix`'s KV buckets and fan-out stream (src/cluster), on a
/// runtime of its own: this runs in `Drop`, on any path out of a run.
fn delete_cluster_state(url: &str, prefix: &str) {
    let buckets = [format!("{prefix}_nodes"), format!("{prefix}_slots")];
    let stream = format!("{prefix}_fanout");
    let deleted = run_apart(|| async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        let mut failed = Vec::new();
        for bucket in &buckets {
            if let Err(err) = js.delete_key_value(bucket).await {
                failed.push(format!("bucket {bucket}: {err}"));
            }
        }
        if let Err(err) = js.delete_stream(&stream).await {
            failed.push(format!("stream {stream}: {err}"));
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    });
    match deleted {
        Ok(()) => eprintln!(
            "  cluster cleanup: deleted KV buckets {}, {} and stream {stream}",
            buckets[0], buckets[1]
        ),
        Err(err) => eprintln!("  cluster cleanup of {prefix}: {err:#}"),
    }
}

/// Drops the PostgreSQL schema a run made, so runs leave nothing behind.
fn drop_schema(schema: &str) {
    let dropped = run_apart(|| async {
        let pool = sqlx::PgPool::connect(PG_ADMIN).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&pool)
        .await?;
        pool.close().await;
        Ok(())
    });
    if let Err(err) = dropped {
        eprintln!("  cleanup: cannot drop schema {schema}: {err:#}");
    }
}

/// Runs `work` on a runtime of its own, on a thread of its own: cleanups
/// run in `Drop`, on any path out of a run, maybe inside the tool's runtime.
fn run_apart<F, Fut>(work: F) -> Result<()>
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = Result<()>>,
{
    let run = || -> Result<()> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work())
    };
    std::thread::scope(|scope| scope.spawn(run).join())
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the cleanup panicked")))
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Reads the child's stdout until a line starting with `prefix`.
fn wait_line(child: &mut Child, prefix: &str) -> Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&prefix) {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .context("server did not start")
}

/// The address after `key` and a scheme, e.g. `client=https://127.0.0.1:80/`.
fn addr_after(line: &str, key: &str) -> Result<SocketAddr> {
    let rest = line
        .split_once(key)
        .and_then(|(_, r)| r.split_once("://"))
        .map(|(_, r)| r)
        .context("address missing")?;
    Ok(rest.split(['/', ' ']).next().unwrap_or("").parse()?)
}

/// What the gateway's database holds for a run.
enum Seed {
    /// Users 1..=members in channel 1, user `members + 1` alone in
    /// channel 2, one message in each channel, and `probes` latency-probe
    /// messages in channel 1.
    OneChannel { members: usize, probes: usize },
    /// The chat mix, with `probes` latency-probe messages spread over its
    /// channels like its events.
    Chat { probes: usize },
}

const SEED_TEXT: &str = "'Hello! This is a message from the Otako client!'";
const SEED_TIME: &str = "'2026-11-28T00:00:00.000Z'";

/// Multi-row INSERTs of `rows` (each already a parenthesized tuple).
fn inserts(table_columns: &str, rows: impl Iterator<Item = String>) -> Vec<String> {
    let rows: Vec<String> = rows.collect();
    rows.chunks(500)
        .map(|chunk| format!("INSERT INTO {table_columns} VALUES {}", chunk.join(",")))
        .collect()
}

/// Latency-probe messages 1..=`probes` (no nonce: a nonce is unique per
/// author and channel), probe `n` in channel `channel(n)`.
fn probe_inserts(probes: usize, channel: impl Fn(u64) -> u64) -> Vec<String> {
    inserts(
        "messages (id, channel_id, author_id, content, nonce, created_at)",
        (1..=probes as u64).map(|n| {
            format!(
                "({}, {}, 1, {SEED_TEXT}, NULL, {SEED_TIME})",
                probe_message(n),
                channel(n)
            )
        }),
    )
}

impl Seed {
    fn users(&self) -> usize {
        match self {
            Seed::OneChannel { members, .. } => members + 1,
            Seed::Chat { .. } => CHAT_USERS,
        }
    }

    /// The chat mix's latency-probe messages alone (added to a running
    /// server once its saturation rate is known).
    fn probe_sql(&self) -> Vec<String> {
        let Seed::Chat { probes } = *self else {
            return Vec::new();
        };
        probe_inserts(probes, chat_channel)
    }

    fn sql(&self) -> Vec<String> {
        let users = self.users() as u64;
        let mut sql = inserts(
            "users (id, name, created_at)",
            (1..=users).map(|id| format!("({id}, 'user', {SEED_TIME})")),
        );
        let message = |id: u64, channel: u64| {
            format!("({id}, {channel}, 1, {SEED_TEXT}, '87654GFGDS7544567FD', {SEED_TIME})")
        };
        let messages = "messages (id, channel_id, author_id, content, nonce, created_at)";
        match *self {
            Seed::OneChannel { members, probes } => {
                let members = members as u64;
                sql.push(format!(
                    "INSERT INTO channels (id, name, created_at) VALUES (1, 'big', {SEED_TIME}), (2, 'solo', {SEED_TIME})"
                ));
                sql.extend(inserts(
                    "channel_members (channel_id, user_id)",
                    (1..=members + 1)
                        .map(|id| format!("({}, {id})", if id > members { 2 } else { 1 })),
                ));
                sql.extend(inserts(
                    messages,
                    [message(1, 1), message(2, 2)].into_iter(),
                ));
                sql.extend(probe_inserts(probes, |_| 1));
            }
            Seed::Chat { probes } => {
                sql.extend(inserts(
                    "channels (id, name, created_at)",
                    (1..=CHAT_CHANNELS).map(|c| format!("({c}, 'chat', {SEED_TIME})")),
                ));
                sql.extend(inserts(
                    "channel_members (channel_id, user_id)",
                    (1..=CHAT_CHANNELS)
                        .flat_map(|c| chat_members(c).map(move |u| format!("({c}, {u})"))),
                ));
                sql.extend(inserts(
                    messages,
                    (1..=CHAT_CHANNELS).map(|c| message(chat_message(c), c)),
                ));
                sql.extend(Seed::Chat { probes }.probe_sql());
            }
        }
        sql
    }
}

/// The chat mix: 10,000 sessions of 5,000 users (two each) in 2,000
/// channels of 5 members and 20 of 200; event `n` goes to channel
/// [`chat_channel`]`(n)`, so about 1 % of events reach a big channel.
const CHAT_USERS: usize = 5_000;
const CHAT_SESSIONS: usize = 10_000;
const CHAT_SMALL: u64 = 2_000;
const CHAT_CHANNELS: u64 = CHAT_SMALL + 20;

fn chat_channel(n: u64) -> u64 {
    n % CHAT_CHANNELS + 1
}

/// Members of chat channel `c`: small channels take consecutive users
/// (channels c and c + 1,000 overlap by three), big ones every 7th user
/// modulo 5,000 (7 is coprime to 5,000, so no repeats).
fn chat_members(c: u64) -> Box<dyn Iterator<Item = u64>> {
    let users = CHAT_USERS as u64;
    if c <= CHAT_SMALL {
        let shift = if c > CHAT_SMALL / 2 { 2 } else { 0 };
        Box::new((0..5).map(move |j| ((c - 1) * 5 + j + shift) % users + 1))
    } else {
        let k = c - CHAT_SMALL - 1;
        Box::new((0..200).map(move |j| ((k * 200 + j) * 7) % users + 1))
    }
}

/// The message the throughput events of chat channel `c` name.
fn chat_message(c: u64) -> u64 {
    1_000_000 + c
}

/// The message latency probe `n` names (see [`LatencyBook`]).
fn probe_message(n: u64) -> u64 {
    n + MESSAGE_OFFSET as u64
}

impl Server {
    async fn start(kind: Kind, database: Database, seed: Seed) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        match kind {
            Kind::Baseline => {
                let mut child = Command::new(sibling("bench-baseline")?)
                    .args(["--listen", "127.0.0.1:0"])
                    .stdout(Stdio::piped())
                    .spawn()?;
                let line = wait_line(&mut child, "listening ")?;
                let addr: SocketAddr = line.trim_start_matches("listening ").parse()?;
                Ok(Server {
                    kind,
                    child,
                    client: addr,
                    dispatch: addr,
                    _dir: dir,
                    db_url: String::new(),
                    source_net: next_source_net(),
                    users: usize::MAX,
                    peers: Vec::new(),
                    cluster_prefix: None,
                })
            }
            Kind::Gateway => {
                let cluster_prefix = cluster_prefix();
                let db_url = match database {
                    Database::Sqlite if cluster_prefix.is_none() => {
                        format!("sqlite://{}/bench.db", dir.path().display())
                    }
                    _ => postgres_schema().await?,
                };
                let cluster = |node_id| cluster_section(cluster_prefix.as_deref(), node_id);
                let (child, line) = spawn_gateway(dir.path(), &db_url, &cluster(1))?;
                let mut admins = vec![addr_after(&line, "admin=")?];
                let mut server = Server {
                    kind,
                    client: addr_after(&line, "client=")?,
                    dispatch: addr_after(&line, "dispatch=")?,
                    child,
                    peers: Vec::new(),
                    _dir: dir,
                    db_url,
                    source_net: next_source_net(),
                    users: seed.users(),
                    cluster_prefix: cluster_prefix.clone(),
                };
                // One at a time after node 1, which ran the migrations.
                for node_id in 2..=NODES.load(Ordering::Relaxed) {
                    let dir = tempfile::tempdir()?;
                    let (child, line) =
                        spawn_gateway(dir.path(), &server.db_url, &cluster(node_id))?;
                    server.peers.push(Peer {
                        client: addr_after(&line, "client=")?,
                        child,
                        _dir: dir,
                    });
                    admins.push(addr_after(&line, "admin=")?);
                }
                if cluster_prefix.is_some() {
                    await_cluster(&admins).await?;
                }
                server.execute(seed.sql()).await?;
                Ok(server)
            }
        }
    }

    /// Runs `statements` in one transaction.
    async fn execute(&self, statements: Vec<String>) -> Result<()> {
        macro_rules! run {
            ($pool:expr) => {{
                let pool = $pool;
                let mut tx = pool.begin().await?;
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                pool.close().await;
            }};
        }
        if self.db_url.starts_with("sqlite") {
            run!(sqlx::SqlitePool::connect(&self.db_url).await?);
        } else {
            run!(sqlx::PgPool::connect(&self.db_url).await?);
        }
        Ok(())
    }

    /// Resident memory of every node together.
    fn rss(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .sum::<u64>()
            * 1024
    }

    /// Every node's process id, node 1 first.
    fn pids(&self) -> Vec<u32> {
        std::iter::once(self.child.id())
            .chain(self.peers.iter().map(|p| p.child.id()))
            .collect()
    }

    /// Which node (0 for node 1) subscriber `i` connects to: round-robin.
    fn node_of(&self, i: usize) -> usize {
        i % (self.peers.len() + 1)
    }

    /// The client listener subscriber `i` connects to.
    fn client_of(&self, i: usize) -> SocketAddr {
        match self.node_of(i) {
            0 => self.client,
            n => self.peers[n - 1].client,
        }
    }
}

/// Writes a gateway config (database `db_url`, then `cluster`) into `dir`
/// and starts `serve` on it; returns the process and its `listening` line.
fn spawn_gateway(dir: &Path, db_url: &str, cluster: &str) -> Result<(Child, String)> {
    let tls = TLS
        .get()
        .map(|tls| {
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                tls.cert.display(),
                tls.key.display()
            )
        })
        .unwrap_or_default();
    let config = format!(
        r#"[server]
client_listen = "127.0.0.1:0"
dispatch_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
handshake_timeout_ms = {handshake_timeout_ms}
{tls}[auth]
token_secret = "{TOKEN_SECRET}"
dispatch_secret = "{DISPATCH_SECRET}"
[database]
url = "{db_url}"
max_connections = {db_connections}
[sessions]
max_per_user = 5
outbound_queue = 1024
resume_buffer = {resume_buffer}
heartbeat_interval_ms = 60000
[dispatch]
max_inflight = 1024
ping_timeout_ms = 600000
[logging]
path = "errors.jsonl"
[plugins]
hot_reload = false
cache_dir = "{cache}"
[[routes]]
event = "EVENT_MESSAGE_CREATE"
plugin = "{plugin}"
timeout_ms = 1000
memory_mb = 32
{cluster}"#,
        resume_buffer = RESUME_BUFFER.load(Ordering::Relaxed),
        db_connections = DB_CONNECTIONS.load(Ordering::Relaxed),
        handshake_timeout_ms = HANDSHAKE_TIMEOUT_MS.load(Ordering::Relaxed),
        cache = repo().join("target/bench-plugin-cache").display(),
        plugin = repo().join("plugins/message_create.wasm").display(),
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config)?;
    let mut child = Command::new(sibling("otako-gateway")?)
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    match wait_line(&mut child, "otako-gateway listening ") {
        Ok(line) => Ok((child, line)),
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(err)
        }
    }
}

/// Waits until `GET /cluster` on every node (by admin address) lists all
/// of them, so the load starts on a cluster whose nodes see each other.
async fn await_cluster(admins: &[SocketAddr]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = Vec::with_capacity(admins.len());
        for admin in admins {
            seen.push(cluster_nodes(*admin).await.unwrap_or(0));
        }
        if seen.iter().all(|&n| n == admins.len()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the {} nodes did not see each other within 30 s (GET /cluster lists {seen:?})",
                admins.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many live nodes `GET /cluster` on the admin listener `admin` lists.
async fn cluster_nodes(admin: SocketAddr) -> Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!("GET /cluster HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (_, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    let status: serde_json::Value = serde_json::from_str(body)?;
    Ok(status["nodes"].as_array().map_or(0, Vec::len))
}

/// The local PostgreSQL's `test` database, as its superuser.
const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/test";
/// How a run's schema is named in its database URL.
const SCHEMA_PARAM: &str = "?options=-c%20search_path%3D";

async fn postgres_schema() -> Result<String> {
    let schema = format!("bench_{}", std::process::id());
    let pool = sqlx::PgPool::connect(PG_ADMIN).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    let extra = PG_PARAMS.get().filter(|p| !p.is_empty());
    let extra = extra.map(|p| format!("&{p}")).unwrap_or_default();
    let host = PG_HOST.get().map_or("127.0.0.1:5432", String::as_str);
    Ok(format!(
        "postgres://postgres@{host}/test{SCHEMA_PARAM}{schema}{extra}"
    ))
}

fn client_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    config
}

/// A client's connection: plain, or TLS under `--tls`.
type Conn = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// A subscriber's socket and its HELLO (empty for the baseline).
type Subscriber = (WebSocketStream<Conn>, String);

/// `--tls`: the gateway's certificate files and a client that trusts them.
struct Tls {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    connector: tokio_rustls::TlsConnector,
}

static TLS: std::sync::OnceLock<Tls> = std::sync::OnceLock::new();

impl Tls {
    /// An ECDSA P-256 certificate for 127.0.0.1, as a deployment would use.
    fn make() -> Result<Tls> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            // `req -x509` marks the certificate a CA by default, which
            // webpki refuses as a server's own certificate.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("openssl req failed: {status}");
        }
        let connector = otako_gateway::tls::connector(Some(&cert))?;
        Ok(Tls {
            _dir: dir,
            cert,
            key,
            connector,
        })
    }
}

/// The gateway's `server.handshake_timeout_ms` (`slowloris` sets it).
static HANDSHAKE_TIMEOUT_MS: AtomicU64 = AtomicU64::new(10_000);

/// A TCP connection to the client listener `server` from `source`, with
/// TLS under `--tls`.
async fn connect_client(server: SocketAddr, source: Ipv4Addr) -> Result<Conn> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(server).await?;
    match TLS.get() {
        None => Ok(Either::Left(stream)),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
            let stream = tls.connector.connect(name, stream).await?;
            Ok(Either::Right(Box::new(stream)))
        }
    }
}

/// Opens subscriber `i` (user `i % users + 1`, on node `i % N + 1`), from a source address
/// chosen so no address runs out of ephemeral ports; `resume` names a
/// gateway session and the last `s` read.
async fn subscribe(server: &Server, i: usize, resume: Option<(&str, u64)>) -> Result<Subscriber> {
    let block = u8::try_from(i / PER_SOURCE).unwrap_or(200);
    let source = Ipv4Addr::new(127, server.source_net, block, 1);
    let client = server.client_of(i);
    let stream = connect_client(client, source).await?;
    let url = match server.kind {
        Kind::Gateway => {
            let user = UserId::new((i % server.users) as u64 + 1).context("bad user id")?;
            let token = TokenKey::new(TOKEN_SECRET.as_bytes(), None).issue(user, 1_800_000_000);
            let resume = resume
                .map(|(id, seq)| format!("&resume={id}&seq={seq}"))
                .unwrap_or_default();
            format!("ws://{client}/gateway?token={token}{resume}")
        }
        Kind::Baseline => format!("ws://{client}/sub"),
    };
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url.into_client_request()?,
        stream,
        Some(client_config()),
    )
    .await?;
    let mut hello = String::new();
    if server.kind == Kind::Gateway {
        // HELLO first.
        match ws.next().await {
            Some(Ok(Message::Text(text))) => hello = text.to_string(),
            other => bail!("no HELLO: {other:?}"),
        }
    }
    Ok((ws, hello))
}

/// `--cluster`: the NATS server a gateway joins (cluster mode).
static CLUSTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--nodes`: gateway nodes per server (1 without `--cluster`).
static NODES: AtomicUsize = AtomicUsize::new(1);

/// ` nodes=N` for a run's label under `--nodes` above 1.
fn nodes_label() -> String {
    match NODES.load(Ordering::Relaxed) {
        1 => String::new(),
        n => format!(" nodes={n}"),
    }
}

/// Under `--cluster`, a fresh subject prefix for one server's nodes.
fn cluster_prefix() -> Option<String> {
    static N: AtomicU64 = AtomicU64::new(0);
    CLUSTER.get()?;
    Some(format!(
        "bench{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The `[cluster]` section of node `node_id` under `prefix`, or nothing.
fn cluster_section(prefix: Option<&str>, node_id: usize) -> String {
    match (CLUSTER.get(), prefix) {
        (Some(url), Some(prefix)) => format!(
            "[cluster]\nnats_url = \"{url}\"\nnode_id = {node_id}\nsubject_prefix = \"{prefix}\"\n"
        ),
        _ => String::new(),
    }
}

/// `--resume-buffer`, for the gateway's config.
static RESUME_BUFFER: AtomicU64 = AtomicU64::new(1024);
/// `--db-connections`.
static DB_CONNECTIONS: AtomicU32 = AtomicU32::new(8);
/// `--pg-params`.
static PG_PARAMS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// `--pg-host`, as a URL's host (a socket directory percent-encoded).
static PG_HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// This process's open-file limit once raised (every subscriber is a socket).
static FD_LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Opens `n` subscribers, a few hundred handshakes at a time.
async fn subscribe_all(server: &Server, n: usize) -> Result<Vec<Subscriber>> {
    let limit = FD_LIMIT.load(Ordering::Relaxed);
    if n as u64 + 64 > limit {
        bail!(
            "{n} sessions need {n} sockets here and as many in the server, but the open-file \
             limit is {limit} and cannot be raised (raising the hard limit needs CAP_SYS_RESOURCE)"
        );
    }
    let mut sessions = Vec::with_capacity(n);
    let started = Instant::now();
    for chunk_start in (0..n).step_by(500) {
        let chunk_end = (chunk_start + 500).min(n);
        let opened = futures_util::future::join_all(
            (chunk_start..chunk_end).map(|i| subscribe(server, i, None)),
        )
        .await;
        for ws in opened {
            sessions.push(ws?);
        }
        if started.elapsed() > Duration::from_secs(1) {
            eprint!("\r  {} sessions open", sessions.len());
        }
    }
    eprintln!(
        "\r  {n} sessions open in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(sessions)
}

/// Frames counted in stripes on separate cache lines, so a thousand reader
/// tasks on several threads don't contend on one counter.
const STRIPES: usize = 64;

#[derive(Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// Counts frames as subscribers read them.
struct Tally {
    stripes: Vec<Stripe>,
    closed: AtomicU64,
    /// Woken by one subscriber per frame it reads, for the pacing publisher.
    progressed: Notify,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            closed: AtomicU64::new(0),
            progressed: Notify::new(),
        })
    }

    fn add(&self, reader: usize) {
        self.stripes[reader % STRIPES]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    fn frames(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// One task per subscriber, counting frames; with a latency book each
/// task keeps its own samples and returns them when its socket closes.
fn spawn_readers(
    sessions: Vec<Subscriber>,
    tally: &Arc<Tally>,
    latency: Option<&Arc<LatencyBook>>,
) -> Vec<tokio::task::JoinHandle<Vec<u64>>> {
    let last = sessions.len().saturating_sub(1);
    sessions
        .into_iter()
        .enumerate()
        .map(|(i, (mut ws, _))| {
            let tally = tally.clone();
            let latency = latency.cloned();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while let Some(message) = ws.next().await {
                    match message {
                        Ok(Message::Text(text)) => {
                            if let Some(us) = latency.as_ref().and_then(|b| b.latency_of(&text)) {
                                samples.push(us);
                            }
                            tally.add(i);
                            if i == last {
                                tally.progressed.notify_one();
                            }
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                tally.closed.fetch_add(1, Ordering::Relaxed);
                samples
            })
        })
        .collect()
}

/// Send times by event number, read by every subscriber task.
struct LatencyBook {
    start: Instant,
    sent_us: Vec<AtomicU64>,
}

impl LatencyBook {
    /// The latency of a frame about message `d.id` (the event's number plus
    /// [`MESSAGE_OFFSET`]), found by a scan rather than a JSON parse: both
    /// servers write the message's `id` first.
    fn latency_of(&self, text: &str) -> Option<u64> {
        let sent = self.sent_us_of(text)?;
        if sent == 0 {
            return None;
        }
        Some((self.start.elapsed().as_micros() as u64).saturating_sub(sent))
    }

    /// When the event a frame is about was sent (µs after `start`; 0 if
    /// not yet known).
    fn sent_us_of(&self, text: &str) -> Option<u64> {
        let id: usize = field_after(text, r#""d":{"id":""#)?;
        Some(
            self.sent_us
                .get(id.checked_sub(MESSAGE_OFFSET)?)?
                .load(Ordering::Acquire),
        )
    }
}

/// The number right after the first `key` in `text`.
fn field_after<T: std::str::FromStr>(text: &str, key: &str) -> Option<T> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl LatencyBook {
    /// A gateway frame's `s`, and when its event was sent.
    fn read(&self, text: &str) -> Option<(u64, u64)> {
        Some((field_after(text, r#""s":"#)?, self.sent_us_of(text)?))
    }
}

/// CPU seconds (user + system, every thread) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = otako_gateway::sys::clock_ticks_per_second() as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name may hold spaces; the fields after it don't.
            // `rest` starts at field 3; utime and stime are fields 14 and 15.
            let (_, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace().skip(11);
            let utime: u64 = fields.next()?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            Some((utime + stime) as f64 / ticks)
        })
        .unwrap_or(0.0)
}

/// The server's and the load tool's CPU over a measured window, so every
/// result shows what a delivery costs the server and which side was the
/// limit (a server near 200 % on two cores, or a tool that is). The server
/// is every gateway node together; under `--cluster` the NATS server's CPU
/// is shown apart (all of it: other clients of that server count too).
struct CpuMeter {
    servers: Vec<u32>,
    server_start: f64,
    tool_start: f64,
    /// `--cluster`: the NATS server's pid (if found) and CPU at the start.
    nats: Option<(u32, f64)>,
    /// On PostgreSQL: the CPU of its processes (server and backends, the
    /// machine's other clients included) at the start.
    postgres: Option<HashMap<u32, f64>>,
    wall: Instant,
}

/// CPU seconds of all of `pids` together.
fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

impl CpuMeter {
    fn start(server: &Server) -> CpuMeter {
        let servers = server.pids();
        CpuMeter {
            server_start: cpu_seconds_of(&servers),
            servers,
            tool_start: cpu_seconds(std::process::id()),
            nats: CLUSTER
                .get()
                .and_then(|url| nats_pid(url))
                .map(|pid| (pid, cpu_seconds(pid))),
            postgres: server.db_url.starts_with("postgres").then(|| {
                postgres_pids()
                    .into_iter()
                    .map(|pid| (pid, cpu_seconds(pid)))
                    .collect()
            }),
            wall: Instant::now(),
        }
    }

    /// JSON fields, and a summary fragment, for `deliveries` frames
    /// received from `events` events.
    fn finish(&self, deliveries: u64, events: u64) -> (serde_json::Value, String) {
        let wall = self.wall.elapsed().as_secs_f64();
        let server = cpu_seconds_of(&self.servers) - self.server_start;
        let tool = cpu_seconds(std::process::id()) - self.tool_start;
        let per = |cpu: f64, n: u64| {
            if n == 0 {
                0.0
            } else {
                (cpu * 1e6 / n as f64 * 1000.0).round() / 1000.0
            }
        };
        let (server_pct, tool_pct) = (100.0 * server / wall, 100.0 * tool / wall);
        let mut fields = json!({"server_cpu_s": server, "server_cpu_pct": server_pct.round(),
               "tool_cpu_pct": tool_pct.round(),
               "server_cpu_us_per_delivery": per(server, deliveries),
               "server_cpu_us_per_event": per(server, events)});
        let mut summary = format!(
            "server CPU {server_pct:.0} % ({:.3} us/delivery, {:.1} us/event), tool CPU {tool_pct:.0} %",
            per(server, deliveries),
            per(server, events)
        );
        if let Some(start) = &self.postgres {
            // Backends opened during the window count in full; those that
            // ended during it are missed (the gateway's pools keep theirs).
            let cpu: f64 = postgres_pids()
                .into_iter()
                .map(|pid| cpu_seconds(pid) - start.get(&pid).copied().unwrap_or(0.0))
                .sum();
            fields = merged(
                fields,
                json!({"postgres_cpu_s": cpu, "postgres_cpu_pct": (100.0 * cpu / wall).round(),
                       "postgres_cpu_us_per_event": per(cpu, events)}),
            );
            summary.push_str(&format!(
                ", postgres CPU {:.0} % ({:.1} us/event)",
                100.0 * cpu / wall,
                per(cpu, events)
            ));
        }
        if CLUSTER.get().is_some() {
            let nats = self.nats.map(|(pid, start)| cpu_seconds(pid) - start);
            let nats_pct = nats.map(|cpu| (100.0 * cpu / wall).round());
            fields = merged(
                fields,
                json!({"nodes": self.servers.len(), "nats_cpu_s": nats, "nats_cpu_pct": nats_pct,
                       "nats_cpu_us_per_delivery": nats.map(|cpu| per(cpu, deliveries)),
                       "nats_cpu_us_per_event": nats.map(|cpu| per(cpu, events))}),
            );
            summary.push_str(&match nats {
                Some(cpu) => format!(
                    ", nats CPU {:.0} % ({:.3} us/delivery, {:.1} us/event)",
                    100.0 * cpu / wall,
                    per(cpu, deliveries),
                    per(cpu, events)
                ),
                None => ", nats cpu: n/a".to_owned(),
            });
        }
        (fields, summary)
    }
}

/// Every `postgres` process (the server and its backends), from /proc.
fn postgres_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .collect()
}

/// The pid of the `nats-server` process listening on `url`'s port (found
/// through /proc: the listening socket's inode among its open files), or
/// the only `nats-server` there is; best effort.
fn nats_pid(url: &str) -> Option<u32> {
    let port = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse::<u16>().ok())
        .unwrap_or(4222);
    // /proc/net/tcp*: `sl local_address rem_address st ... inode`, the
    // port in hex after the colon, state 0A = LISTEN.
    let sockets: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit_once(':')?.1;
                    if u16::from_str_radix(local_port, 16).ok()? != port || *fields.get(3)? != "0A"
                    {
                        return None;
                    }
                    Some(format!("socket:[{}]", fields.get(9)?))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let servers: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "nats-server")
        })
        .collect();
    let listening = servers.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .any(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
        })
    });
    match (listening, servers.as_slice()) {
        (Some(pid), _) => Some(pid),
        (None, [only]) => Some(*only),
        (None, _) => None,
    }
}

/// `base` with `extra`'s fields added.
fn merged(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(base), serde_json::Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

/// Latency probes are messages `MESSAGE_OFFSET + n` (the seed uses 1 and 2).
const MESSAGE_OFFSET: usize = 10;

/// A publisher: the gateway's dispatch connection or the baseline's /pub.
struct Publisher {
    ws: WebSocketStream<TcpStream>,
    kind: Kind,
}

impl Publisher {
    async fn connect(server: &Server) -> Result<Publisher> {
        let stream = TcpStream::connect(server.dispatch).await?;
        stream.set_nodelay(true)?;
        let (url, auth) = match server.kind {
            Kind::Gateway => (
                format!("ws://{}/dispatch", server.dispatch),
                Some(format!("Bearer {DISPATCH_SECRET}")),
            ),
            Kind::Baseline => (format!("ws://{}/pub", server.dispatch), None),
        };
        let mut request = url.into_client_request()?;
        if let Some(auth) = auth {
            request.headers_mut().insert("authorization", auth.parse()?);
        }
        let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
        Ok(Publisher {
            ws,
            kind: server.kind,
        })
    }
}

/// Events in flight on one dispatch connection: the gateway's
/// `max_inflight` in the bench config.
const MAX_INFLIGHT: usize = 1024;

/// How far ahead of the servers the publisher may run.
#[derive(Clone)]
enum Pace {
    /// At most this many events without an ack.
    Acks(usize),
    /// At most `window` events ahead of what the `clients` subscribers
    /// have received between them (and at most [`MAX_INFLIGHT`] unacked).
    Deliveries {
        tally: Arc<Tally>,
        clients: u64,
        window: u64,
    },
}

impl Pace {
    fn ack_window(&self) -> usize {
        match self {
            Pace::Acks(window) => *window,
            Pace::Deliveries { .. } => MAX_INFLIGHT,
        }
    }

    /// Whether sending event `sent + 1` must wait for deliveries.
    fn ahead(&self, sent: u64) -> bool {
        match self {
            Pace::Acks(_) => false,
            Pace::Deliveries {
                tally,
                clients,
                window,
            } => sent >= tally.frames() / clients + window,
        }
    }

    async fn wait_for_deliveries(&self) {
        if let Pace::Deliveries { tally, .. } = self {
            // The timeout covers the watched subscriber being ahead of
            // the others when nothing more is in flight to wake it.
            let _ =
                tokio::time::timeout(Duration::from_millis(1), tally.progressed.notified()).await;
        }
    }
}

/// Sends events paced by `pace` until `deadline`; returns (acked, failed,
/// time of the last ack).
async fn pump(
    publisher: Publisher,
    pace: Pace,
    deadline: Instant,
    event: impl Fn(u64) -> String + Send + 'static,
) -> Result<(u64, u64, Instant)> {
    let kind = publisher.kind;
    let (mut sink, mut source) = publisher.ws.split();
    let permits = Arc::new(Semaphore::new(pace.ack_window()));
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let permits = permits.clone();
        let sending = sending.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            'send: while Instant::now() < deadline {
                while pace.ahead(n) {
                    if Instant::now() >= deadline {
                        break 'send;
                    }
                    pace.wait_for_deliveries().await;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                permit.forget();
                n += 1;
                if sink.feed(Message::text(event(n))).await.is_err() {
                    break;
                }
                // Flush before this task would wait, and every 32 events.
                if permits.available_permits() == 0 || pace.ahead(n) || n.is_multiple_of(32) {
                    let _ = sink.flush().await;
                }
            }
            let _ = sink.flush().await;
            sent.store(n, Ordering::Release);
            sending.store(false, Ordering::Release);
            sink
        })
    };
    let (mut acked, mut failed) = (0u64, 0u64);
    let mut last = Instant::now();
    loop {
        if !sending.load(Ordering::Acquire) && acked + failed >= sent.load(Ordering::Acquire) {
            break;
        }
        // Short waits, so the end of sending is seen even with every ack in.
        let text = match tokio::time::timeout(Duration::from_millis(100), source.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            Err(_) if last.elapsed() < Duration::from_secs(30) => continue,
            Ok(_) | Err(_) => break,
        };
        let ok = match kind {
            Kind::Gateway => {
                if !text.contains("EVENT_ROUNDTRIP") {
                    continue;
                }
                text.contains(r#""success":true"#)
            }
            Kind::Baseline => true,
        };
        if ok {
            acked += 1;
        } else {
            failed += 1;
        }
        last = Instant::now();
        permits.add_permits(1);
    }
    let _ = writer.await;
    Ok((acked, failed, last))
}

fn event_text(kind: Kind, n: u64, message: u64, channel: u64, label: u64) -> String {
    match kind {
        Kind::Gateway => format!(
            r#"{{"t":"EVENT_MESSAGE_CREATE","d":{{"id":"{message}","channel_id":"{channel}"}},"op":0,"s":{n},"event_id":"{label}-{n}"}}"#
        ),
        Kind::Baseline => format!(
            r#"{{"id":"{message}","channel_id":"{channel}","author":{{"id":"1","name":"user"}},"content":"Hello! This is a message from the Otako client!","nonce":"87654GFGDS7544567FD","timestamp":"2026-11-28T00:00:00.000Z"}}"#
        ),
    }
}

fn report(line: serde_json::Value, summary: String) {
    println!("{line}");
    eprintln!("{summary}");
}

/// One fan-out run.
struct Fanout {
    clients: usize,
    members: usize,
    seconds: u64,
    window: u64,
    database: Database,
}

async fn fanout(kind: Kind, run: Fanout) -> Result<()> {
    let Fanout {
        clients,
        members,
        seconds,
        window,
        database,
    } = run;
    let db = match kind {
        Kind::Baseline => "none",
        Kind::Gateway => database.label(),
    };
    let label = format!(
        "fanout {} C={clients} members={members} db={db}{}",
        kind.name(),
        nodes_label()
    );
    eprintln!("{label}: starting");
    let server = Server::start(kind, database, Seed::OneChannel { members, probes: 0 }).await?;
    let sessions = subscribe_all(&server, clients).await?;
    let tally = Tally::new();
    let _readers = spawn_readers(sessions, &tally, None);
    let publisher = Publisher::connect(&server).await?;
    let cpu = CpuMeter::start(&server);
    let started = cpu.wall;
    let deadline = started + Duration::from_secs(seconds);
    let progress = progress_task(tally.clone(), started, label.clone());
    let pace = Pace::Deliveries {
        tally: tally.clone(),
        clients: clients as u64,
        window,
    };
    let (acked, failed, last_ack) = pump(publisher, pace, deadline, move |n| {
        event_text(kind, n, 1, 1, 1)
    })
    .await?;
    let expected = acked * clients as u64;
    // Wait for the tail of the fan-out to arrive.
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    let mut last_seen = tally.frames();
    let mut last_change = Instant::now();
    while last_seen < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = tally.frames();
        if now != last_seen {
            last_seen = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let finished = if last_seen >= expected {
        last_change.max(last_ack)
    } else {
        Instant::now()
    };
    let (cpu_fields, cpu_summary) = cpu.finish(last_seen, acked);
    progress.abort();
    let elapsed = finished.duration_since(started).as_secs_f64();
    let delivered = last_seen;
    let lost = expected.saturating_sub(delivered);
    let deliveries_per_s = delivered as f64 / elapsed;
    let events_per_s = acked as f64 / last_ack.duration_since(started).as_secs_f64();
    report(
        merged(
            json!({"workload": "fanout", "target": kind.name(), "clients": clients, "members": members,
                   "database": db, "window": window, "seconds": elapsed,
                   "events_acked": acked, "events_failed": failed, "frames_received": delivered,
                   "lost_frames": lost, "sessions_closed": tally.closed.load(Ordering::Relaxed),
                   "deliveries_per_s": deliveries_per_s.round(), "events_per_s": events_per_s.round(),
                   "rss_bytes": server.rss()}),
            cpu_fields,
        ),
        format!(
            "{label}: {deliveries_per_s:>10.0} deliveries/s, {events_per_s:>8.0} events/s, lost {lost}, failed {failed}; {cpu_summary}"
        ),
    );
    Ok(())
}

fn progress_task(
    tally: Arc<Tally>,
    started: Instant,
    label: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            eprintln!(
                "  {label}: {:.0} s, {} frames received",
                started.elapsed().as_secs_f64(),
                tally.frames()
            );
        }
    })
}

async fn latency(
    kind: Kind,
    clients: usize,
    rate: u64,
    seconds: u64,
    database: Database,
) -> Result<()> {
    let db = match kind {
        Kind::Baseline => "none",
        Kind::Gateway => database.label(),
    };
    let label = format!(
        "latency {} C={clients} at {rate}/s db={db}{}",
        kind.name(),
        nodes_label()
    );
    eprintln!("{label}: starting");
    let events = usize::try_from(rate * seconds)?;
    let seed = Seed::OneChannel {
        members: clients,
        probes: events,
    };
    let server = Server::start(kind, database, seed).await?;
    let sessions = subscribe_all(&server, clients).await?;
    let tally = Tally::new();
    let book = Arc::new(LatencyBook {
        start: Instant::now(),
        sent_us: (0..=events).map(|_| AtomicU64::new(0)).collect(),
    });
    let readers = spawn_readers(sessions, &tally, Some(&book));
    let publisher = Publisher::connect(&server).await?;
    let cpu = CpuMeter::start(&server);
    let mut ack_us = send_at_rate(publisher, &book, events, rate, move |n| {
        event_text(kind, n, probe_message(n), 1, 2)
    })
    .await?;
    let acked = ack_us.len();
    // Wait for the last frames (or 5 s), then close every subscriber by
    // stopping the server, and collect the samples each reader kept.
    let expected = (acked * clients) as u64;
    let wait_until = Instant::now() + Duration::from_secs(5);
    while tally.frames() < expected && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu_fields, cpu_summary) = cpu.finish(tally.frames(), acked as u64);
    // Subscribers on node 1, which takes the dispatch, and on the others.
    let (same, other): (Vec<_>, Vec<_>) = readers
        .into_iter()
        .enumerate()
        .partition(|(i, _)| server.node_of(*i) == 0);
    let split = !other.is_empty();
    drop(server);
    let same = collect_samples(same.into_iter().map(|(_, r)| r).collect()).await;
    let other = collect_samples(other.into_iter().map(|(_, r)| r).collect()).await;
    let mut samples = [same.as_slice(), other.as_slice()].concat();
    samples.sort_unstable();
    ack_us.sort_unstable();
    let (p50, p99, max) = percentiles(&samples);
    let (ack_p50, ack_p99, ack_max) = percentiles(&ack_us);
    let lost = (acked * clients).saturating_sub(samples.len());
    let mut line = json!({"workload": "latency", "target": kind.name(), "clients": clients, "rate": rate, "events": events,
           "acked": acked, "samples": samples.len(), "lost_frames": lost, "p50_ms": p50, "p99_ms": p99, "max_ms": max,
           "ack_p50_ms": ack_p50, "ack_p99_ms": ack_p99, "ack_max_ms": ack_max});
    let mut nodes_summary = String::new();
    if split {
        let (same_p50, same_p99, same_max) = percentiles(&same);
        let (other_p50, other_p99, other_max) = percentiles(&other);
        line = merged(
            line,
            json!({"same_node_samples": same.len(), "same_node_p50_ms": same_p50,
                   "same_node_p99_ms": same_p99, "same_node_max_ms": same_max,
                   "other_nodes_samples": other.len(), "other_nodes_p50_ms": other_p50,
                   "other_nodes_p99_ms": other_p99, "other_nodes_max_ms": other_max}),
        );
        nodes_summary = format!(
            " [same node as the dispatch: p50 {same_p50:.2}, p99 {same_p99:.2}, max {same_max:.2} ms; \
             other nodes: p50 {other_p50:.2}, p99 {other_p99:.2}, max {other_max:.2} ms]"
        );
    }
    report(
        merged(line, cpu_fields),
        format!(
            "{label}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms{nodes_summary} (acks p50 {ack_p50:.2}, p99 {ack_p99:.2} ms), lost {lost}; {cpu_summary}"
        ),
    );
    Ok(())
}

/// Sends events 1..=`events` at `rate` per second, noting each send time in
/// `book`; returns the dispatch-send-to-ack time of every acked event (the
/// gateway's acks name the event; the baseline's come back in order).
async fn send_at_rate(
    publisher: Publisher,
    book: &Arc<LatencyBook>,
    events: usize,
    rate: u64,
    event: impl Fn(u64) -> String,
) -> Result<Vec<u64>> {
    let (mut sink, mut source) = publisher.ws.split();
    let ack_book = book.clone();
    let acks = tokio::spawn(async move {
        let mut ack_us = Vec::with_capacity(events);
        while ack_us.len() < events {
            match tokio::time::timeout(Duration::from_secs(30), source.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let n = ack_number(&text).unwrap_or(ack_us.len() + 1);
                    let sent = ack_book
                        .sent_us
                        .get(n)
                        .map_or(0, |s| s.load(Ordering::Acquire));
                    let now = ack_book.start.elapsed().as_micros() as u64;
                    ack_us.push(now.saturating_sub(sent));
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        ack_us
    });
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    for n in 1..=events {
        tick.tick().await;
        let sent = book.start.elapsed().as_micros() as u64;
        if let Some(slot) = book.sent_us.get(n) {
            slot.store(sent.max(1), Ordering::Release);
        }
        sink.send(Message::text(event(n as u64))).await?;
    }
    Ok(acks.await.unwrap_or_default())
}

/// What the subscribers of a resume run saw.
#[derive(Default)]
struct ResumeTally {
    resumed: AtomicU64,
    refused: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
    /// Reconnect to the first frame of an event sent after it (µs).
    catch_up_us: std::sync::Mutex<Vec<u64>>,
}

impl ResumeTally {
    /// Checks `s` against the last one read; returns the new last.
    fn check(&self, last: u64, s: u64) -> u64 {
        if s <= last {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return last;
        }
        if s > last + 1 {
            self.gaps.fetch_add(s - last - 1, Ordering::Relaxed);
        }
        s
    }
}

/// Reads a resume subscriber's frames until `until`, checking `s`;
/// `Some(reconnect)` times the first frame of an event sent after it.
async fn read_frames(
    ws: &mut WebSocketStream<Conn>,
    last: &mut u64,
    until: Instant,
    mut reconnect: Option<Instant>,
    book: &LatencyBook,
    tally: &ResumeTally,
) {
    let stop = tokio::time::sleep_until(until.into());
    tokio::pin!(stop);
    loop {
        let text = tokio::select! {
            _ = &mut stop => return,
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
                _ => return,
            },
        };
        let Some((s, sent_us)) = book.read(&text) else {
            continue;
        };
        *last = tally.check(*last, s);
        if let Some(at) = reconnect {
            let at_us = at.duration_since(book.start).as_micros() as u64;
            if sent_us >= at_us {
                if let Ok(mut samples) = tally.catch_up_us.lock() {
                    samples.push(at.elapsed().as_micros() as u64);
                }
                reconnect = None;
            }
        }
    }
}

/// One subscriber of a resume run: reads until `drop_at`, drops its
/// connection without a close frame, comes back at `back_at` naming its
/// session and last `s`, and reads until `end`.
async fn resume_subscriber(
    server: Arc<Server>,
    i: usize,
    (mut ws, hello): Subscriber,
    book: Arc<LatencyBook>,
    tally: Arc<ResumeTally>,
    (drop_at, back_at, end): (Instant, Instant, Instant),
) {
    let hello: serde_json::Value = serde_json::from_str(&hello).unwrap_or_default();
    let id = hello["d"]["session_id"].as_str().unwrap_or("").to_owned();
    let mut last = 0;
    read_frames(&mut ws, &mut last, drop_at, None, &book, &tally).await;
    drop(ws);
    tokio::time::sleep_until(back_at.into()).await;
    let reconnect = Instant::now();
    let Ok((mut ws, hello)) = subscribe(&server, i, Some((&id, last))).await else {
        tally.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if hello.contains(r#""resumed":true"#) {
        tally.resumed.fetch_add(1, Ordering::Relaxed);
    } else {
        // A new session counts `s` from 1 again.
        tally.refused.fetch_add(1, Ordering::Relaxed);
        last = 0;
    }
    read_frames(&mut ws, &mut last, end, Some(reconnect), &book, &tally).await;
}

/// `bench resume`: see [`Workload::Resume`].
async fn resume(
    clients: usize,
    rate: u64,
    (run, drop_after, away): (Duration, Duration, Duration),
) -> Result<()> {
    eprintln!("resume gateway C={clients} at {rate}/s: starting");
    let events = usize::try_from(rate * run.as_secs())?;
    let seed = Seed::OneChannel {
        members: clients,
        probes: events,
    };
    let server = Server::start(Kind::Gateway, Database::Sqlite, seed).await?;
    let sessions = subscribe_all(&server, clients).await?;
    let server = Arc::new(server);
    let book = Arc::new(LatencyBook {
        start: Instant::now(),
        sent_us: (0..=events).map(|_| AtomicU64::new(0)).collect(),
    });
    let tally = Arc::new(ResumeTally::default());
    let drop_at = book.start + drop_after;
    let times = (
        drop_at,
        drop_at + away,
        book.start + run + Duration::from_secs(3),
    );
    let readers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, sub)| {
            tokio::spawn(resume_subscriber(
                server.clone(),
                i,
                sub,
                book.clone(),
                tally.clone(),
                times,
            ))
        })
        .collect();
    let publisher = Publisher::connect(&server).await?;
    let acked = send_at_rate(publisher, &book, events, rate, |n| {
        event_text(Kind::Gateway, n, probe_message(n), 1, 2)
    })
    .await?
    .len();
    for reader in readers {
        let _ = reader.await;
    }
    let mut samples = tally
        .catch_up_us
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    samples.sort_unstable();
    let (p50, p99, _) = percentiles(&samples);
    let resumed = tally.resumed.load(Ordering::Relaxed);
    let refused = tally.refused.load(Ordering::Relaxed);
    let gaps = tally.gaps.load(Ordering::Relaxed);
    let duplicates = tally.duplicates.load(Ordering::Relaxed);
    let pct_resumed = 100.0 * resumed as f64 / clients.max(1) as f64;
    report(
        json!({"workload": "resume", "target": "gateway", "clients": clients, "rate": rate, "events": events,
               "acked": acked, "away_ms": away.as_millis() as u64, "resumed": resumed, "refused": refused,
               "resumed_pct": pct_resumed, "gaps": gaps, "duplicates": duplicates,
               "caught_up": samples.len(), "catch_up_p50_ms": p50, "catch_up_p99_ms": p99}),
        format!(
            "resume gateway C={clients} {rate}/s, away {} ms: {pct_resumed:.1}% resumed ({refused} not), gaps {gaps}, duplicates {duplicates}, reconnect→caught up p50 {p50:.1} ms, p99 {p99:.1} ms",
            away.as_millis()
        ),
    );
    Ok(())
}

/// Every reader's latency samples, sorted; the readers end when the
/// server has been stopped.
async fn collect_samples(readers: Vec<tokio::task::JoinHandle<Vec<u64>>>) -> Vec<u64> {
    let mut samples = Vec::new();
    for reader in readers {
        if let Ok(Ok(mut kept)) = tokio::time::timeout(Duration::from_secs(10), reader).await {
            samples.append(&mut kept);
        }
    }
    samples.sort_unstable();
    samples
}

/// The chat mix (gateway only: the baseline has one channel): events
/// spread over the chat channels, first as fast as 1,024 unacked events
/// allow (saturation), then at half that rate for latency.
async fn chat(seconds: u64, database: Database, offline: bool) -> Result<()> {
    let db = database.label();
    let online = if offline { 0 } else { CHAT_SESSIONS };
    let label = format!("chat gateway {online} sessions db={db}");
    eprintln!("{label}: starting");
    let server = Server::start(Kind::Gateway, database, Seed::Chat { probes: 0 }).await?;
    let sessions = subscribe_all(&server, online).await?;
    let tally = Tally::new();
    // Probe numbers are bounded by the latency phase's rate × seconds.
    let book = Arc::new(LatencyBook {
        start: Instant::now(),
        sent_us: (0..=500_000).map(|_| AtomicU64::new(0)).collect(),
    });
    let readers = spawn_readers(sessions, &tally, Some(&book));
    let sessions_per_user = (online / CHAT_USERS) as u64;
    let deliveries_of = |n: u64| chat_members(chat_channel(n)).count() as u64 * sessions_per_user;

    // Saturation.
    let publisher = Publisher::connect(&server).await?;
    let cpu = CpuMeter::start(&server);
    let started = cpu.wall;
    let progress = progress_task(tally.clone(), started, label.clone());
    let (acked, failed, last_ack) = pump(
        publisher,
        Pace::Acks(MAX_INFLIGHT),
        started + Duration::from_secs(seconds),
        |n| {
            let c = chat_channel(n);
            event_text(Kind::Gateway, n, chat_message(c), c, 1)
        },
    )
    .await?;
    let expected: u64 = (1..=acked).map(deliveries_of).sum();
    let drain_until = Instant::now() + Duration::from_secs(10);
    while tally.frames() < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = tally.frames();
    let (cpu_fields, cpu_summary) = cpu.finish(delivered, acked);
    progress.abort();
    let events_per_s = acked as f64 / last_ack.duration_since(started).as_secs_f64();
    report(
        merged(
            json!({"workload": "chat", "phase": "saturation", "target": "gateway", "database": db,
                   "sessions": online, "events_acked": acked, "events_failed": failed,
                   "events_per_s": events_per_s.round(), "frames_received": delivered,
                   "lost_frames": expected.saturating_sub(delivered),
                   "deliveries_per_event": expected as f64 / acked.max(1) as f64}),
            cpu_fields,
        ),
        format!("{label} saturation: {events_per_s:.0} events/s, failed {failed}; {cpu_summary}"),
    );
    if offline {
        return Ok(());
    }

    // Latency at half the saturation rate.
    let rate = ((events_per_s / 2.0) as u64).max(1);
    let events = usize::try_from(rate * seconds)?.min(book.sent_us.len() - 1);
    server
        .execute(Seed::Chat { probes: events }.probe_sql())
        .await?;
    let before = tally.frames();
    let publisher = Publisher::connect(&server).await?;
    let cpu = CpuMeter::start(&server);
    let mut ack_us = send_at_rate(publisher, &book, events, rate, |n| {
        let c = chat_channel(n);
        event_text(Kind::Gateway, n, probe_message(n), c, 2)
    })
    .await?;
    let acked = ack_us.len();
    let expected = before + (1..=acked as u64).map(deliveries_of).sum::<u64>();
    let wait_until = Instant::now() + Duration::from_secs(5);
    while tally.frames() < expected && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu_fields, cpu_summary) = cpu.finish(tally.frames() - before, acked as u64);
    drop(server);
    let samples = collect_samples(readers).await;
    ack_us.sort_unstable();
    let (p50, p99, max) = percentiles(&samples);
    let (ack_p50, ack_p99, ack_max) = percentiles(&ack_us);
    report(
        merged(
            json!({"workload": "chat", "phase": "latency", "target": "gateway", "database": db,
                   "rate": rate, "events": events, "acked": acked, "samples": samples.len(),
                   "lost_frames": (expected - before).saturating_sub(samples.len() as u64),
                   "p50_ms": p50, "p99_ms": p99, "max_ms": max,
                   "ack_p50_ms": ack_p50, "ack_p99_ms": ack_p99, "ack_max_ms": ack_max}),
            cpu_fields,
        ),
        format!(
            "{label} at {rate}/s: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (acks p99 {ack_p99:.2} ms); {cpu_summary}"
        ),
    );
    Ok(())
}

/// The machine's count of connections dropped from a full listen queue
/// (`TcpExt: ListenOverflows`): each costs its client a 1 s SYN retry, so
/// a storm that had any is slower for that reason alone.
fn listen_overflows() -> Option<i64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// A reconnect storm: `clients` subscribers connect at once, each until
/// its HELLO (the baseline sends none: until its upgrade completes).
/// Unless `measured`, a warm-up: nothing reported.
async fn storm(kind: Kind, clients: usize, measured: bool) -> Result<()> {
    let label = format!("storm {} C={clients}", kind.name());
    eprintln!("{label}: {}", if measured { "starting" } else { "warm-up" });
    let seed = Seed::OneChannel {
        members: clients,
        probes: 0,
    };
    let server = Arc::new(Server::start(kind, Database::Sqlite, seed).await?);
    let overflows_before = listen_overflows();
    let cpu = CpuMeter::start(&server);
    let started = cpu.wall;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                let begun = Instant::now();
                let ws = subscribe(&server, i, None).await;
                (ws, begun.elapsed())
            })
        })
        .collect();
    let mut open = Vec::with_capacity(clients);
    let mut times = Vec::with_capacity(clients);
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok((Ok(ws), took)) => {
                open.push(ws);
                times.push(took.as_micros() as u64);
            }
            _ => errors += 1,
        }
    }
    let total = started.elapsed().as_secs_f64();
    let (cpu_fields, cpu_summary) = cpu.finish(0, 0);
    if !measured {
        return Ok(());
    }
    let overflows = listen_overflows().zip(overflows_before).map(|(a, b)| a - b);
    times.sort_unstable();
    let (p50, p99, max) = percentiles(&times);
    report(
        merged(
            json!({"workload": "storm", "target": kind.name(), "clients": clients, "connected": open.len(),
                   "errors": errors, "total_s": total, "p50_ms": p50, "p99_ms": p99, "max_ms": max,
                   "listen_overflows": overflows}),
            cpu_fields,
        ),
        format!(
            "{label}: all connected in {total:.2} s ({errors} errors), each p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; \
             {} listen-queue overflows; {cpu_summary}",
            overflows.map_or("?".to_owned(), |n| n.to_string())
        ),
    );
    Ok(())
}

/// Session connects: `sequential` connects one at a time (each one's
/// time to HELLO, closed after), then `clients` more with `concurrency`
/// in flight (connects per second). One session per user, so the limit
/// is checked but never reached.
async fn connects(clients: usize, sequential: usize, concurrency: usize) -> Result<()> {
    let mode = if CLUSTER.get().is_some() {
        "cluster"
    } else {
        "single"
    };
    let label = format!("connects {mode} C={clients}{}", nodes_label());
    eprintln!("{label}: starting");
    let seed = Seed::OneChannel {
        members: clients.max(sequential),
        probes: 0,
    };
    let server = Arc::new(Server::start(Kind::Gateway, Database::Postgres, seed).await?);
    // Warm-up: the first connects pay for pools and lazy setup.
    for i in 0..20 {
        drop(subscribe(&server, i, None).await?);
    }
    let mut times = Vec::with_capacity(sequential);
    for i in 0..sequential {
        let begun = Instant::now();
        let (mut ws, _) = subscribe(&server, i, None).await?;
        times.push(begun.elapsed().as_micros() as u64);
        // A clean close, so the slot is free before the next round.
        ws.close(None).await?;
        while ws.next().await.is_some() {}
    }
    times.sort_unstable();
    let (p50, p99, max) = percentiles(&times);

    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (server, gate) = (server.clone(), gate.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                subscribe(&server, i, None).await
            })
        })
        .collect();
    let mut open = Vec::with_capacity(clients);
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(ws)) => open.push(ws),
            _ => errors += 1,
        }
    }
    let rate = open.len() as f64 / started.elapsed().as_secs_f64();
    drop(open);
    report(
        json!({"workload": "connects", "mode": mode, "nodes": NODES.load(Ordering::Relaxed), "sequential": sequential, "p50_ms": p50, "p99_ms": p99,
               "max_ms": max, "clients": clients, "concurrency": concurrency, "connects_per_s": rate, "errors": errors}),
        format!(
            "{label}: one at a time p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; {concurrency} in flight: {rate:.0} connects/s ({errors} errors)"
        ),
    );
    Ok(())
}

/// p50, p99 and max of sorted microsecond samples, in milliseconds.
fn percentiles(sorted: &[u64]) -> (f64, f64, f64) {
    let pct = |p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    (
        pct(0.50),
        pct(0.99),
        sorted.last().copied().unwrap_or(0) as f64 / 1000.0,
    )
}

/// The event number an ack is for: the gateway's `"event_id":"2-N"`, the
/// baseline's `{"ack":N}`.
fn ack_number(text: &str) -> Option<usize> {
    field_after(text, r#""event_id":"2-"#).or_else(|| field_after(text, r#""ack":"#))
}

async fn idle(kind: Kind, sessions: usize) -> Result<()> {
    eprintln!("idle {} N={sessions}: starting", kind.name());
    let seed = Seed::OneChannel {
        members: sessions,
        probes: 0,
    };
    let server = Server::start(kind, Database::Sqlite, seed).await?;
    // Warm the server's allocator and code paths with a few sessions first.
    let warm = subscribe_all(&server, 10.min(sessions)).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    let open = subscribe_all(&server, sessions).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss();
    let per_session = after.saturating_sub(before) as f64 / sessions as f64;
    report(
        json!({"workload": "idle", "target": kind.name(), "sessions": sessions, "rss_before": before,
               "rss_after": after, "bytes_per_session": per_session.round()}),
        format!(
            "idle {:8} N={sessions}: {:.0} bytes/session (RSS {} → {} KiB)",
            kind.name(),
            per_session,
            before / 1024,
            after / 1024
        ),
    );
    drop(open);
    Ok(())
}

async fn ack_rate(connections: usize, seconds: u64, database: Database) -> Result<()> {
    let db = database.label();
    eprintln!("ack-rate gateway K={connections} on {db}: starting");
    // One member in channel 1; the recipient is its only member.
    let seed = Seed::OneChannel {
        members: 1,
        probes: 0,
    };
    let server = Server::start(Kind::Gateway, database, seed).await?;
    let recipient = subscribe_all(&server, 1).await?;
    let tally = Tally::new();
    let _readers = spawn_readers(recipient, &tally, None);
    let cpu = CpuMeter::start(&server);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut pumps = Vec::new();
    for k in 0..connections {
        let publisher = Publisher::connect(&server).await?;
        let label = 100 + k as u64;
        pumps.push(tokio::spawn(pump(
            publisher,
            Pace::Acks(MAX_INFLIGHT),
            deadline,
            move |n| event_text(Kind::Gateway, n, 1, 1, label),
        )));
    }
    let (mut acked, mut failed) = (0, 0);
    let mut last = started;
    for p in pumps {
        let (a, f, l) = p.await??;
        acked += a;
        failed += f;
        last = last.max(l);
    }
    let rate = acked as f64 / last.duration_since(started).as_secs_f64();
    // One recipient: a delivery per acked event.
    let (cpu_fields, cpu_summary) = cpu.finish(acked, acked);
    report(
        merged(
            json!({"workload": "ack_rate", "target": "gateway", "database": db, "connections": connections,
                   "events_acked": acked, "events_failed": failed, "events_per_s": rate.round()}),
            cpu_fields,
        ),
        format!(
            "ack-rate gateway K={connections} {db}: {rate:.0} events/s acked ({failed} failed); {cpu_summary}"
        ),
    );
    Ok(())
}

/// Connects, reads HELLO and closes (1000) client `i`: the connect-to-HELLO
/// time in microseconds.
async fn handshake_once(server: &Server, i: usize) -> Result<u64> {
    let begun = Instant::now();
    let (mut ws, _) = subscribe(server, i, None).await?;
    let took = begun.elapsed().as_micros() as u64;
    ws.close(None).await?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(took)
}

fn transport() -> &'static str {
    if TLS.get().is_some() { "tls" } else { "plain" }
}

/// `concurrency` loops of connect, HELLO, close for `run`.
async fn handshakes(concurrency: usize, run: Duration) -> Result<()> {
    let label = format!("handshakes {} concurrency={concurrency}", transport());
    eprintln!("{label}: starting");
    let seed = Seed::OneChannel {
        members: 1000.max(concurrency),
        probes: 0,
    };
    let server = Arc::new(Server::start(Kind::Gateway, Database::Sqlite, seed).await?);
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::OnceLock::new());
    let cpu = CpuMeter::start(&server);
    let until = Instant::now() + run;
    let loops: Vec<_> = (0..concurrency)
        .map(|k| {
            let (server, failed, first_error) =
                (server.clone(), failed.clone(), first_error.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                let mut i = k;
                while Instant::now() < until {
                    match handshake_once(&server, i).await {
                        Ok(took) => times.push(took),
                        Err(err) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let _ = first_error.set(format!("{err:#}"));
                        }
                    }
                    i += concurrency;
                }
                times
            })
        })
        .collect();
    let times = collect_samples(loops).await;
    let wall = cpu.wall.elapsed().as_secs_f64();
    let done = times.len() as u64;
    let (cpu_fields, cpu_summary) = cpu.finish(0, done);
    let rate = done as f64 / wall;
    let (p50, p99, max) = percentiles(&times);
    let failed = failed.load(Ordering::Relaxed);
    if let Some(err) = first_error.get() {
        eprintln!("{label}: {failed} handshakes failed; the first: {err}");
    }
    report(
        merged(
            json!({"workload": "handshakes", "target": "gateway", "transport": transport(),
                   "concurrency": concurrency, "handshakes": done, "failed": failed,
                   "per_s": rate.round(), "p50_ms": p50, "p99_ms": p99, "max_ms": max}),
            cpu_fields,
        ),
        format!(
            "{label}: {rate:.0} handshakes/s ({failed} failed), connect-to-HELLO p50 {p50:.2} ms, p99 {p99:.2} ms; {} (us/event = per handshake)",
            cpu_summary
        ),
    );
    Ok(())
}

/// `connects` real clients, four at a time, numbered from `first`: their
/// connect-to-HELLO times, sorted.
async fn connect_times(server: &Arc<Server>, connects: usize, first: usize) -> Result<Vec<u64>> {
    let next = Arc::new(AtomicU64::new(0));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (server, next) = (server.clone(), next.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if n >= connects {
                        break;
                    }
                    if let Ok(took) = handshake_once(&server, first + n).await {
                        times.push(took);
                    }
                }
                times
            })
        })
        .collect();
    let times = collect_samples(loops).await;
    if times.len() < connects {
        bail!("only {} of {connects} connects succeeded", times.len());
    }
    Ok(times)
}

/// Holds one slowloris connection open: a request head sent a byte a
/// second (over TLS, a connection that never starts its handshake),
/// reconnecting whenever the gateway hangs up. Counts the hang-ups.
async fn slowloris_socket(
    server: Arc<Server>,
    source: Ipv4Addr,
    open: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok(socket) = TcpSocket::new_v4() else {
            return;
        };
        if socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).is_err() {
            return;
        }
        let Ok(mut stream) = socket.connect(server.client).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        open.fetch_add(1, Ordering::Relaxed);
        let head =
            b"GET /gateway?token=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut sent = 0;
        let mut buf = [0u8; 512];
        loop {
            if TLS.get().is_none() && sent < head.len() {
                if stream.write_all(&head[sent..sent + 1]).await.is_err() {
                    break;
                }
                sent += 1;
            }
            let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf));
            if let Ok(Ok(0) | Err(_)) = read.await {
                break;
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
        cut.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connect p50/p99 of real clients, quiet and then with `sockets`
/// slowloris connections open.
async fn slowloris(sockets: usize, connects: usize) -> Result<()> {
    let label = format!("slowloris {} sockets={sockets}", transport());
    eprintln!("{label}: starting");
    let seed = Seed::OneChannel {
        members: 1000,
        probes: 0,
    };
    let server = Arc::new(Server::start(Kind::Gateway, Database::Sqlite, seed).await?);
    // Warm up, then the quiet figure.
    connect_times(&server, 100, 0).await?;
    let quiet = connect_times(&server, connects, 100).await?;
    let (open, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let attackers: Vec<_> = (0..sockets)
        .map(|k| {
            let source = Ipv4Addr::new(127, server.source_net, 100 + (k / PER_SOURCE) as u8, 1);
            tokio::spawn(slowloris_socket(
                server.clone(),
                source,
                open.clone(),
                cut.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    while (open.load(Ordering::Relaxed) as usize) < sockets {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "only {} of {sockets} slowloris sockets opened",
                open.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Measured over at least two handshake timeouts, so the gateway is
    // cutting and the attackers reconnecting while real clients connect.
    let churn = Duration::from_millis(2 * HANDSHAKE_TIMEOUT_MS.load(Ordering::Relaxed));
    let cpu = CpuMeter::start(&server);
    let mut loaded = Vec::new();
    let mut first = 100 + connects;
    while loaded.is_empty() || cpu.wall.elapsed() < churn {
        loaded.extend(connect_times(&server, connects, first).await?);
        first += connects;
    }
    loaded.sort_unstable();
    let (cpu_fields, cpu_summary) = cpu.finish(0, loaded.len() as u64);
    let held = open.load(Ordering::Relaxed);
    let cut = cut.load(Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    let (q50, q99, qmax) = percentiles(&quiet);
    let (l50, l99, lmax) = percentiles(&loaded);
    let ratio = if q99 > 0.0 { l99 / q99 } else { 0.0 };
    report(
        merged(
            json!({"workload": "slowloris", "target": "gateway", "transport": transport(),
                   "sockets": sockets, "held_at_end": held, "cut_by_timeout": cut, "connects": connects,
                   "loaded_connects": loaded.len(),
                   "handshake_timeout_ms": HANDSHAKE_TIMEOUT_MS.load(Ordering::Relaxed),
                   "quiet_p50_ms": q50, "quiet_p99_ms": q99, "quiet_max_ms": qmax,
                   "loaded_p50_ms": l50, "loaded_p99_ms": l99, "loaded_max_ms": lmax,
                   "p99_ratio": (ratio * 100.0).round() / 100.0}),
            cpu_fields,
        ),
        format!(
            "{label}: connect p50/p99 quiet {q50:.2}/{q99:.2} ms, with {held} slowloris sockets {l50:.2}/{l99:.2} ms over {} connects (p99 {ratio:.2}x); {cut} cut by the handshake timeout; {cpu_summary}",
            loaded.len()
        ),
    );
    Ok(())
}
