//! The load tool: drives a real `otako-gateway serve` (and, side by side,
//! the bare tokio-tungstenite baseline in `benches/baseline`) over loopback
//! and reports each run as one JSON line on stdout, with progress and a
//! readable summary on stderr.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/bench fanout --clients 100,1000,5000
//! target/release/bench latency --clients 1000 --rate 200
//! target/release/bench idle --sessions 10000
//! target/release/bench ack-rate --connections 1,8 [--database postgres]
//! target/release/bench resume --clients 1000 --rate 200
//! ```

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use otako_gateway::ids::UserId;
use otako_gateway::token::TokenKey;

const TOKEN_SECRET: &str = "bench-token-secret";
const DISPATCH_SECRET: &str = "bench-dispatch-secret";
/// Connections per source address before moving to the next 127.n.x.1,
/// below the ~28k ephemeral ports one address has.
const PER_SOURCE: usize = 20_000;

/// Each server gets its own 127.n.0.0/16 to connect from, so the previous
/// run's TIME_WAIT ports never collide with this run's binds.
fn next_source_net() -> u8 {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let offset = u8::try_from(std::process::id() % 100).unwrap_or(0);
    1 + (offset + NEXT.fetch_add(1, Ordering::Relaxed) % 100) % 200
}

#[derive(Parser)]
#[command(name = "bench", about = "Otako Gateway load tool (loopback only)")]
struct Cli {
    /// Which server to measure; `both` runs them side by side.
    #[arg(long, value_enum, default_value = "both", global = true)]
    target: Which,
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

#[derive(Subcommand)]
enum Workload {
    /// C members of one channel; events as fast as they are acked.
    Fanout {
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        clients: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Events in flight on the dispatch connection.
        #[arg(long, default_value_t = 256)]
        window: usize,
    },
    /// Dispatch-send to client-receive latency at a fixed event rate.
    Latency {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
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
            seconds,
            window,
        } => {
            for c in clients {
                for kind in &targets {
                    fanout(*kind, c, seconds, window).await?;
                }
            }
        }
        Workload::Latency {
            clients,
            rate,
            seconds,
        } => {
            for kind in &targets {
                latency(*kind, clients, rate, seconds).await?;
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

/// A server process under test.
struct Server {
    kind: Kind,
    child: Child,
    /// Clients connect here (the gateway's client listener, or the baseline).
    client: SocketAddr,
    /// Events go here (the gateway's dispatch listener, or the baseline).
    dispatch: SocketAddr,
    _dir: tempfile::TempDir,
    db_url: String,
    /// Second octet of the 127.n.x.1 addresses subscribers connect from.
    source_net: u8,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

fn addr_after(line: &str, key: &str) -> Result<SocketAddr> {
    let rest = line
        .split_once(key)
        .map(|(_, r)| r)
        .context("address missing")?;
    Ok(rest.split(['/', ' ']).next().unwrap_or("").parse()?)
}

impl Server {
    async fn start(kind: Kind, database: Database, members: usize) -> Result<Server> {
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
                })
            }
            Kind::Gateway => {
                let db_url = match database {
                    Database::Sqlite => format!("sqlite://{}/bench.db", dir.path().display()),
                    Database::Postgres => postgres_schema().await?,
                };
                let config = format!(
                    r#"[server]
client_listen = "127.0.0.1:0"
dispatch_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[auth]
token_secret = "{TOKEN_SECRET}"
dispatch_secret = "{DISPATCH_SECRET}"
[database]
url = "{db_url}"
[sessions]
max_per_user = 5
outbound_queue = 8192
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
"#,
                    cache = repo().join("target/bench-plugin-cache").display(),
                    plugin = repo().join("plugins/message_create.wasm").display(),
                );
                let config_path = dir.path().join("gateway.toml");
                std::fs::write(&config_path, config)?;
                let mut child = Command::new(sibling("otako-gateway")?)
                    .arg("--config")
                    .arg(&config_path)
                    .arg("serve")
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::piped())
                    .spawn()?;
                let line = wait_line(&mut child, "otako-gateway listening ")?;
                let server = Server {
                    kind,
                    client: addr_after(&line, "client=http://")?,
                    dispatch: addr_after(&line, "dispatch=http://")?,
                    child,
                    _dir: dir,
                    db_url,
                    source_net: next_source_net(),
                };
                server.seed(members).await?;
                Ok(server)
            }
        }
    }

    /// Users 1..=members in channel 1, user `members + 1` alone in channel
    /// 2, and one message in each channel.
    async fn seed(&self, members: usize) -> Result<()> {
        let members = i64::try_from(members)?;
        let statements = [
            "INSERT INTO users (id, name, created_at) VALUES ($1, 'user', '2026-01-01T00:00:00.000Z')",
            "INSERT INTO channel_members (channel_id, user_id) VALUES ($1, $2)",
        ];
        macro_rules! seed {
            ($pool:expr) => {{
                let pool = $pool;
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO channels (id, name, created_at) VALUES (1, 'big', 'x'), (2, 'solo', 'x')")
                    .execute(&mut *tx)
                    .await?;
                for id in 1..=members + 1 {
                    sqlx::query(statements[0]).bind(id).execute(&mut *tx).await?;
                    let channel: i64 = if id == members + 1 { 2 } else { 1 };
                    sqlx::query(statements[1]).bind(channel).bind(id).execute(&mut *tx).await?;
                }
                sqlx::query(
                    "INSERT INTO messages (id, channel_id, author_id, content, nonce, created_at) VALUES \
                     (1, 1, 1, 'Hello! This is a message from the Otako client!', '87654GFGDS7544567FD', '2026-11-28T00:00:00.000Z'), \
                     (2, 2, $1, 'Hello! This is a message from the Otako client!', NULL, '2026-11-28T00:00:00.000Z')",
                )
                .bind(members + 1)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                pool.close().await;
            }};
        }
        if self.db_url.starts_with("sqlite") {
            seed!(sqlx::SqlitePool::connect(&self.db_url).await?);
        } else {
            seed!(sqlx::PgPool::connect(&self.db_url).await?);
        }
        Ok(())
    }

    fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024
    }
}

async fn postgres_schema() -> Result<String> {
    let admin = "postgres://postgres@127.0.0.1:5432/test";
    let schema = format!("bench_{}", std::process::id());
    let pool = sqlx::PgPool::connect(admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(format!("{admin}?options=-c%20search_path%3D{schema}"))
}

fn client_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    config
}

/// A subscriber's socket and its HELLO (empty for the baseline).
type Subscriber = (WebSocketStream<TcpStream>, String);

/// Opens subscriber `i` (user `i + 1`), from a source address chosen so
/// no address runs out of ephemeral ports; `resume` names a gateway
/// session and the last `s` read.
async fn subscribe(server: &Server, i: usize, resume: Option<(&str, u64)>) -> Result<Subscriber> {
    let block = u8::try_from(i / PER_SOURCE).unwrap_or(200);
    let source = Ipv4Addr::new(127, server.source_net, block, 1);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(server.client).await?;
    let url = match server.kind {
        Kind::Gateway => {
            let user = UserId::new(i as u64 + 1).context("bad user id")?;
            let token = TokenKey::new(TOKEN_SECRET.as_bytes(), None).issue(user, 1_800_000_000);
            let resume = resume
                .map(|(id, seq)| format!("&resume={id}&seq={seq}"))
                .unwrap_or_default();
            format!("ws://{}/gateway?token={token}{resume}", server.client)
        }
        Kind::Baseline => format!("ws://{}/sub", server.client),
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

/// Counts frames as subscribers read them.
#[derive(Default)]
struct Tally {
    frames: AtomicU64,
    closed: AtomicU64,
}

fn spawn_readers(sessions: Vec<Subscriber>, tally: Arc<Tally>, latency: Option<Arc<LatencyBook>>) {
    for (mut ws, _) in sessions {
        let tally = tally.clone();
        let latency = latency.clone();
        tokio::spawn(async move {
            while let Some(message) = ws.next().await {
                match message {
                    Ok(Message::Text(text)) => {
                        if let Some(book) = &latency {
                            book.record(&text);
                        }
                        tally.frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            tally.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// Send times by event sequence number, and the latencies clients saw.
struct LatencyBook {
    start: Instant,
    sent_us: Vec<AtomicU64>,
    samples: std::sync::Mutex<Vec<u64>>,
}

impl LatencyBook {
    /// A frame's `s` and when its event was sent (µs after `start`; 0 if
    /// not yet known): the frame is about message `d.id`, which is the
    /// event's sequence number plus [`MESSAGE_OFFSET`].
    fn read(&self, text: &str) -> Option<(u64, u64)> {
        let frame = serde_json::from_str::<serde_json::Value>(text).ok()?;
        let id = frame["d"]["id"].as_str()?.parse::<usize>().ok()?;
        let sent = self.sent_us.get(id.checked_sub(MESSAGE_OFFSET)?)?;
        Some((frame["s"].as_u64()?, sent.load(Ordering::Acquire)))
    }

    /// Records the latency of a frame.
    fn record(&self, text: &str) {
        let Some((_, sent)) = self.read(text) else {
            return;
        };
        if sent == 0 {
            return;
        }
        let now = self.start.elapsed().as_micros() as u64;
        if let Ok(mut samples) = self.samples.lock() {
            samples.push(now.saturating_sub(sent));
        }
    }
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

/// Sends events as fast as acks return (at most `window` outstanding)
/// until `deadline`; returns (acked, failed, time of the last ack).
async fn pump(
    publisher: Publisher,
    window: usize,
    deadline: Instant,
    channel: u64,
    message: u64,
    label: u64,
) -> Result<(u64, u64, Instant)> {
    let kind = publisher.kind;
    let (mut sink, mut source) = publisher.ws.split();
    let permits = Arc::new(Semaphore::new(window));
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let permits = permits.clone();
        let sending = sending.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                permit.forget();
                n += 1;
                let text = event_text(kind, n, message, channel, label);
                if sink.feed(Message::text(text)).await.is_err() {
                    break;
                }
                if permits.available_permits() == 0 || n.is_multiple_of(32) {
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
        let next = tokio::time::timeout(Duration::from_secs(30), source.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            if matches!(next, Ok(Some(Ok(_)))) {
                continue;
            }
            break;
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

async fn fanout(kind: Kind, clients: usize, seconds: u64, window: usize) -> Result<()> {
    eprintln!("fanout {} C={clients}: starting", kind.name());
    let server = Server::start(kind, Database::Sqlite, clients).await?;
    let sessions = subscribe_all(&server, clients).await?;
    let tally = Arc::new(Tally::default());
    spawn_readers(sessions, tally.clone(), None);
    let publisher = Publisher::connect(&server).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let progress = progress_task(
        tally.clone(),
        started,
        format!("fanout {} C={clients}", kind.name()),
    );
    let (acked, failed, last_ack) = pump(publisher, window, deadline, 1, 1, 1).await?;
    let expected = acked * clients as u64;
    // Wait for the tail of the fan-out to arrive.
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    let mut last_seen = tally.frames.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while last_seen < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = tally.frames.load(Ordering::Relaxed);
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
    progress.abort();
    let elapsed = finished.duration_since(started).as_secs_f64();
    let delivered = last_seen;
    let lost = expected.saturating_sub(delivered);
    let deliveries_per_s = delivered as f64 / elapsed;
    let events_per_s = acked as f64 / last_ack.duration_since(started).as_secs_f64();
    report(
        json!({"workload": "fanout", "target": kind.name(), "clients": clients, "seconds": elapsed,
               "events_acked": acked, "events_failed": failed, "frames_received": delivered,
               "lost_frames": lost, "sessions_closed": tally.closed.load(Ordering::Relaxed),
               "deliveries_per_s": deliveries_per_s.round(), "events_per_s": events_per_s.round(),
               "rss_bytes": server.rss()}),
        format!(
            "fanout {:8} C={clients:5}: {:>10.0} deliveries/s, {:>8.0} events/s, lost {lost}, failed {failed}",
            kind.name(),
            deliveries_per_s,
            events_per_s
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
                tally.frames.load(Ordering::Relaxed)
            );
        }
    })
}

async fn latency(kind: Kind, clients: usize, rate: u64, seconds: u64) -> Result<()> {
    eprintln!("latency {} C={clients} at {rate}/s: starting", kind.name());
    let events = usize::try_from(rate * seconds)?;
    let server = Server::start(kind, Database::Sqlite, clients).await?;
    if kind == Kind::Gateway {
        seed_messages(&server, events).await?;
    }
    let sessions = subscribe_all(&server, clients).await?;
    let tally = Arc::new(Tally::default());
    let book = Arc::new(LatencyBook {
        start: Instant::now(),
        sent_us: (0..=events).map(|_| AtomicU64::new(0)).collect(),
        samples: std::sync::Mutex::new(Vec::with_capacity(events * clients)),
    });
    spawn_readers(sessions, tally.clone(), Some(book.clone()));
    let publisher = Publisher::connect(&server).await?;
    let acked = publish_paced(publisher, &book, events, rate).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sorted(&book.samples);
    let (p50, p99, max) = (
        percentile_ms(&samples, 0.50),
        percentile_ms(&samples, 0.99),
        percentile_ms(&samples, 1.0),
    );
    let lost = (acked * clients).saturating_sub(samples.len());
    report(
        json!({"workload": "latency", "target": kind.name(), "clients": clients, "rate": rate, "events": events,
               "acked": acked, "samples": samples.len(), "lost_frames": lost, "p50_ms": p50, "p99_ms": p99, "max_ms": max}),
        format!(
            "latency {:8} C={clients} {rate}/s: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms, lost {lost}",
            kind.name()
        ),
    );
    Ok(())
}

/// A copy of the samples (µs), sorted.
fn sorted(samples: &std::sync::Mutex<Vec<u64>>) -> Vec<u64> {
    let mut samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    samples.sort_unstable();
    samples
}

/// The `p` quantile (0..=1) of sorted µs samples, in ms (0 with none).
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0) as f64
        / 1000.0
}

/// Sends events 1..=`events` (about probe messages) at `rate` per
/// second, noting each one's send time in `book`; returns how many were acked.
async fn publish_paced(
    publisher: Publisher,
    book: &LatencyBook,
    events: usize,
    rate: u64,
) -> Result<usize> {
    let kind = publisher.kind;
    let (mut sink, mut source) = publisher.ws.split();
    let acks = tokio::spawn(async move {
        let mut n = 0usize;
        while n < events {
            match tokio::time::timeout(Duration::from_secs(30), source.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => n += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        n
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    for n in 1..=events {
        tick.tick().await;
        let sent = book.start.elapsed().as_micros() as u64;
        book.sent_us[n].store(sent.max(1), Ordering::Release);
        sink.send(Message::text(event_text(
            kind,
            n as u64,
            (n + MESSAGE_OFFSET) as u64,
            1,
            2,
        )))
        .await?;
    }
    Ok(acks.await.unwrap_or(0))
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
    ws: &mut WebSocketStream<TcpStream>,
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
    let server = Server::start(Kind::Gateway, Database::Sqlite, clients).await?;
    seed_messages(&server, events).await?;
    let sessions = subscribe_all(&server, clients).await?;
    let server = Arc::new(server);
    let book = Arc::new(LatencyBook {
        start: Instant::now(),
        sent_us: (0..=events).map(|_| AtomicU64::new(0)).collect(),
        samples: std::sync::Mutex::new(Vec::new()),
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
    let acked = publish_paced(publisher, &book, events, rate).await?;
    for reader in readers {
        let _ = reader.await;
    }
    let samples = sorted(&tally.catch_up_us);
    let (p50, p99) = (percentile_ms(&samples, 0.50), percentile_ms(&samples, 0.99));
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

/// One probe message per event in channel 1 (ids offset by
/// [`MESSAGE_OFFSET`]), so each frame says which event it came from.
async fn seed_messages(server: &Server, events: usize) -> Result<()> {
    let pool = sqlx::SqlitePool::connect(&server.db_url).await?;
    let mut tx = pool.begin().await?;
    for n in 1..=events {
        sqlx::query("INSERT INTO messages (id, channel_id, author_id, content, created_at) VALUES ($1, 1, 1, 'latency probe', '2026-11-28T00:00:00.000Z')")
            .bind(i64::try_from(n + MESSAGE_OFFSET)?)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    pool.close().await;
    Ok(())
}

async fn idle(kind: Kind, sessions: usize) -> Result<()> {
    eprintln!("idle {} N={sessions}: starting", kind.name());
    let server = Server::start(kind, Database::Sqlite, sessions).await?;
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
    let db = match database {
        Database::Sqlite => "sqlite",
        Database::Postgres => "postgres",
    };
    eprintln!("ack-rate gateway K={connections} on {db}: starting");
    // One member in channel 1; the recipient is its only member.
    let server = Server::start(Kind::Gateway, database, 1).await?;
    let recipient = subscribe_all(&server, 1).await?;
    let tally = Arc::new(Tally::default());
    spawn_readers(recipient, tally.clone(), None);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut pumps = Vec::new();
    for k in 0..connections {
        let publisher = Publisher::connect(&server).await?;
        pumps.push(tokio::spawn(pump(
            publisher,
            1024,
            deadline,
            1,
            1,
            100 + k as u64,
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
    report(
        json!({"workload": "ack_rate", "target": "gateway", "database": db, "connections": connections,
               "events_acked": acked, "events_failed": failed, "events_per_s": rate.round()}),
        format!(
            "ack-rate gateway K={connections} {db}: {rate:.0} events/s acked ({failed} failed)"
        ),
    );
    Ok(())
}
