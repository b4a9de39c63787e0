//! The shared integration-test harness: a temp folder with a generated
//! `gateway.toml`, a real database (an SQLite file, or a fresh schema in the
//! machine's PostgreSQL), and the real `otako-gateway` binary started on
//! free ports and stopped with SIGTERM.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod api;
pub mod client;
pub mod cluster;
pub mod dispatch;
pub mod load;
pub mod nats;
pub mod proxy;
pub mod tls;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use otako_gateway::ids::UserId;
use otako_gateway::token::TokenKey;

pub const TOKEN_SECRET: &str = "test-token-secret";
pub const DISPATCH_SECRET: &str = "test-dispatch-secret";
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The repository root (plugins and migrations live under it).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A built plugin from `plugins/`, e.g. `plugin("message_create")`.
pub fn plugin(name: &str) -> PathBuf {
    repo().join("plugins").join(format!("{name}.wasm"))
}

/// A compiled-plugin cache shared by the tests, so each test doesn't
/// recompile every plugin (multi-megabyte JS/Python components take
/// seconds); a test of the cache itself uses a folder of its own.
pub fn plugin_cache() -> String {
    repo()
        .join("target/plugin-test-cache")
        .display()
        .to_string()
}

/// A built test plugin from `plugins/testing/wasm/`.
pub fn test_plugin(name: &str) -> PathBuf {
    repo()
        .join("plugins/testing/wasm")
        .join(format!("{name}.wasm"))
}

/// A client token for `user`, signed with the harness secret.
pub fn token(user: u64) -> String {
    token_at(user, 1_800_000_000)
}

/// A client token for `user` issued at `issued_at` (unix seconds).
pub fn token_at(user: u64, issued_at: u64) -> String {
    TokenKey::new(TOKEN_SECRET.as_bytes(), None).issue(UserId::new(user).unwrap(), issued_at)
}

/// Which database a test runs against.
pub enum TestDb {
    Sqlite(PathBuf),
    /// A schema of its own in the shared `test` database, dropped afterwards.
    Postgres {
        schema: String,
    },
}

impl TestDb {
    pub fn sqlite(dir: &Path) -> Self {
        TestDb::Sqlite(dir.join("data/otako.db"))
    }

    /// A fresh, empty schema so tests can run in parallel.
    pub async fn postgres() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let schema = format!(
            "t_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let pool = sqlx::PgPool::connect(PG_ADMIN_URL).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        TestDb::Postgres { schema }
    }

    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite(path) => format!("sqlite://{}", path.display()),
            TestDb::Postgres { schema } => {
                format!("{PG_ADMIN_URL}?options=-c%20search_path%3D{schema}")
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { schema } = self {
            let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
            // Drop runs outside any runtime; psql is simplest and best-effort.
            let _ = Command::new("psql")
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "test",
                    "-c",
                    &sql,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Builds a `gateway.toml` in a temp folder: listeners on port 0, the
/// harness secrets, the test database and a file log sink, plus whatever a
/// test sets.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub db: TestDb,
    sections: BTreeMap<String, BTreeMap<String, String>>,
    routes: Vec<String>,
}

impl Setup {
    /// A setup on a fresh SQLite file.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::sqlite(dir.path());
        Self::with_db(dir, db)
    }

    /// A setup on a fresh PostgreSQL schema.
    pub async fn postgres() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::postgres().await;
        Self::with_db(dir, db)
    }

    fn with_db(dir: tempfile::TempDir, db: TestDb) -> Self {
        let mut setup = Setup {
            dir,
            db,
            sections: BTreeMap::new(),
            routes: Vec::new(),
        };
        for (key, value) in [
            ("client_listen", "\"127.0.0.1:0\""),
            ("dispatch_listen", "\"127.0.0.1:0\""),
            ("admin_listen", "\"127.0.0.1:0\""),
        ] {
            setup.set("server", key, value);
        }
        setup.set("auth", "token_secret", &format!("\"{TOKEN_SECRET}\""));
        setup.set("auth", "dispatch_secret", &format!("\"{DISPATCH_SECRET}\""));
        let url = setup.db.url();
        setup.set("database", "url", &format!("\"{url}\""));
        setup.set("api", "listen", "\"127.0.0.1:0\"");
        setup.set("logging", "sink", "\"file\"");
        setup.set("logging", "path", "\"data/event-errors.jsonl\"");
        setup
    }

    /// Sets `[section] key = value`; `value` is TOML (quote strings).
    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut Self {
        self.sections
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sends failed events to an HTTP logging server at `url`.
    pub fn http_sink(&mut self, url: &str) -> &mut Self {
        self.set("logging", "sink", "\"http\"")
            .set("logging", "url", &format!("\"{url}\""))
    }

    /// Adds a `[[routes]]` entry; `extra` is more TOML lines for it
    /// (e.g. `timeout_ms = 20` or a `[routes.config]` table). Without a
    /// `timeout_ms` of its own the route gets 5 s: the default (50 ms) is
    /// wall-clock time, which a debug build on a loaded CI machine can
    /// reach in a test that is not about time limits.
    pub fn route(&mut self, event: &str, plugin: &Path, extra: &str) -> &mut Self {
        let limit = if extra.contains("timeout_ms") {
            ""
        } else {
            "timeout_ms = 5000\n"
        };
        self.routes.push(format!(
            "[[routes]]\nevent = \"{event}\"\nplugin = \"{}\"\n{limit}{extra}\n",
            plugin.display()
        ));
        self
    }

    /// The three real message handlers, as the shipped config routes them.
    pub fn message_routes(&mut self) -> &mut Self {
        self.route("EVENT_MESSAGE_CREATE", &plugin("message_create"), "")
            .route("EVENT_MESSAGE_UPDATE", &plugin("message_update"), "")
            .route("EVENT_MESSAGE_DELETE", &plugin("message_delete"), "")
    }

    pub fn config_text(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                out.push_str(&format!("{key} = {value}\n"));
            }
            out.push('\n');
        }
        for route in &self.routes {
            out.push_str(route);
            out.push('\n');
        }
        out
    }

    /// Writes `gateway.toml` and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("gateway.toml");
        std::fs::write(&path, self.config_text()).unwrap();
        path
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// The JSON lines the file log sink has written so far.
    pub fn error_log(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.path().join("data/event-errors.jsonl"))
    }

    /// The binary with `--config` and `args`, without the `OTAKO_*`
    /// environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env_remove("OTAKO_TOKEN_SECRET")
            .env_remove("OTAKO_DISPATCH_SECRET")
            .env_remove("OTAKO_DATABASE_URL");
        command
    }

    /// Runs the binary with `args` (after `--config`) to completion.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }

    /// Runs a verb that must exit by itself (e.g. refuse to start) and
    /// returns its output; fails the test if it still runs after `within`.
    pub fn run_expecting_exit(&self, args: &[&str], within: Duration) -> std::process::Output {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + within;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{args:?} still ran after {within:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// Writes the config and starts `otako-gateway serve`.
    pub fn start(&self) -> Gateway {
        self.start_verb("serve")
    }

    /// Writes the config and starts `otako-gateway <verb>`.
    pub fn start_verb(&self, verb: &str) -> Gateway {
        self.start_verb_env(verb, &[])
    }

    /// [`start_verb`](Self::start_verb) with extra environment variables
    /// (test hooks such as `OTAKO_FAILPOINT`).
    pub fn start_verb_env(&self, verb: &str, env: &[(&str, &str)]) -> Gateway {
        self.write_config();
        Gateway::spawn(&self.config_path(), self.dir.path(), verb, env)
    }
}

/// Every complete line of a JSON-lines file (none if it doesn't exist;
/// a last line still being written is left out); panics on a line that is
/// not JSON.
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Starts `otako-gateway log-sink` on `port`, appending to `out`.
pub fn start_log_sink(port: u16, out: &Path) -> Child {
    Command::new(bin())
        .args([
            "log-sink",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--out",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// A logging server that counts every POST by its Idempotency-Key and is
/// slow enough (10 ms a record) that two deliverers overlap.
pub async fn counting_sink() -> (
    std::net::SocketAddr,
    Arc<Mutex<std::collections::HashMap<String, usize>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    counting_sink_on(listener)
}

/// [`counting_sink`] on a listener the test bound (e.g. a port gateways
/// were told about before the sink came up).
pub fn counting_sink_on(
    listener: tokio::net::TcpListener,
) -> (
    std::net::SocketAddr,
    Arc<Mutex<std::collections::HashMap<String, usize>>>,
) {
    let addr = listener.local_addr().unwrap();
    let posts = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let seen = posts.clone();
    tokio::spawn(otako_gateway::http::serve(
        listener,
        otako_gateway::shutdown::Shutdown::new(),
        otako_gateway::listen::Guard {
            listener: "test-sink",
            timeout: Duration::from_secs(10),
            tls: None,
            metrics: None,
        },
        move |req| {
            let seen = seen.clone();
            async move {
                let key = req.headers()["idempotency-key"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                tokio::time::sleep(Duration::from_millis(10)).await;
                *seen.lock().unwrap().entry(key).or_insert(0) += 1;
                otako_gateway::http::text(hyper::StatusCode::OK, "ok\n")
            }
        },
    ));
    (addr, posts)
}

/// A port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_otako-gateway")
}

/// A running `otako-gateway` process (any verb) and the addresses it
/// announced on stdout.
pub struct Gateway {
    child: Child,
    pub client: SocketAddr,
    pub dispatch: SocketAddr,
    pub admin: SocketAddr,
    /// Set when the process runs the reference API (`api` or `dev`).
    pub api: Option<SocketAddr>,
    stderr_path: PathBuf,
    printed: Arc<Mutex<Vec<String>>>,
}

/// The address after `key=http://` or `key=https://` in an announce line.
fn announced(line: &str, key: &str) -> Option<SocketAddr> {
    let rest = ["http", "https"]
        .iter()
        .find_map(|scheme| line.split_once(&format!("{key}={scheme}://")))
        .map(|(_, r)| r)?;
    rest.split(['/', ' ']).next()?.parse().ok()
}

impl Gateway {
    /// Starts `verb` and waits until it has announced its listeners:
    /// `serve` prints one line, `api` another, `dev` both.
    pub fn spawn(config: &Path, dir: &Path, verb: &str, env: &[(&str, &str)]) -> Gateway {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let stderr_path = dir.join(format!(
            "{verb}-{}.log",
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(config)
            .arg(verb)
            .env_remove("OTAKO_TOKEN_SECRET")
            .env_remove("OTAKO_DISPATCH_SECRET")
            .env_remove("OTAKO_DATABASE_URL")
            .env("RUST_LOG", "info,otako_gateway=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let printed = Arc::new(Mutex::new(Vec::new()));
        let keep = printed.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                keep.lock().unwrap().push(line.clone());
                if line.starts_with("otako-gateway ") {
                    let _ = tx.send(line);
                }
            }
        });
        let wants_gateway = verb != "api";
        let wants_api = verb == "api" || verb == "dev";
        let (mut gateway_line, mut api_line) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(120);
        while (wants_gateway && gateway_line.is_none()) || (wants_api && api_line.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("otako-gateway listening ") => {
                    gateway_line = Some(line)
                }
                Ok(line) if line.starts_with("otako-gateway api listening ") => {
                    api_line = Some(line.replace("listening http", "listening api=http"))
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{verb} did not start; its log:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        }
        let unset: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let gateway_line = gateway_line.unwrap_or_default();
        Gateway {
            client: announced(&gateway_line, "client").unwrap_or(unset),
            dispatch: announced(&gateway_line, "dispatch").unwrap_or(unset),
            admin: announced(&gateway_line, "admin").unwrap_or(unset),
            api: api_line.and_then(|l| announced(&l, "api")),
            child,
            stderr_path,
            printed,
        }
    }

    /// Every line the process has printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.printed.lock().unwrap().clone()
    }

    /// Kills the process without letting it drain (a crash).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to `within`) for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Polls the process log until a line holds `needle`, and returns it.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in the log within {within:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends SIGTERM and returns at once (the process starts draining).
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY-free: kill(2) through libc has no memory effects.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// SIGTERM, then wait (up to 30 s) for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gateway did not stop within 30 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the process, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    /// GETs an admin path, returning (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// One metric's value from `/metrics` (sum over label sets that contain
    /// `labels`, e.g. `code="4003"`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let metric = l.split(['{', ' ']).next().unwrap_or("");
                metric == name && l.contains(labels)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], None).await
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    http_request_over(stream, addr, method, path, headers, body).await
}

/// [`http_request`] over an open connection (e.g. TLS).
pub async fn http_request_over(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    // The caller's own Connection header (an upgrade) replaces ours.
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        request.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    if let Some(body) = body {
        request.push_str(body);
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sends a request for `path` with 1 MiB of headers and returns what the
/// server answered before closing (panics if it keeps the connection open).
pub async fn send_megabyte_head(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = socket.into_split();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: ").into_bytes();
    let writer = tokio::spawn(async move {
        head.extend(std::iter::repeat_n(b'a', 1 << 20));
        head.extend(b"\r\n\r\n");
        // The server may stop reading and close: a failed write is fine.
        let _ = write.write_all(&head).await;
    });
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut response))
        .await
        .expect("the server kept the connection open");
    writer.await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Reads (and discards, e.g. a TLS alert) from a socket that sends nothing
/// more until the server closes it (EOF or reset); panics if it is still
/// open after `within`.
pub async fn wait_closed_by_server(socket: &mut tokio::net::TcpStream, within: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    tokio::time::timeout(within, async {
        while let Ok(n) = socket.read(&mut buf).await
            && n > 0
        {}
    })
    .await
    .expect("a silent handshake was left open");
}

/// A WebSocket client connection (tokio-tungstenite over plain TCP).
pub type WsClient = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;
pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Client buffers kept small so tests can hold thousands of connections.
fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a WebSocket to `ws://addr{path}` with extra request headers.
/// `Err` carries the handshake failure (e.g. `Error::Http` with a 401).
pub async fn try_ws(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
        request
            .headers_mut()
            .insert(name, HeaderValue::from_str(value).unwrap());
    }
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(client_config())).await?;
    Ok(ws)
}

/// The HTTP status of a refused handshake (panics if it was accepted).
pub async fn ws_refusal(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    match try_ws(addr, path, headers).await {
        Ok(_) => panic!("handshake to {path} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("handshake to {path} failed without an HTTP status: {err}"),
    }
}

/// A client session on `/gateway` authenticated with `token` in the
/// `Authorization` header.
pub async fn connect_client(addr: SocketAddr, token: &str) -> WsClient {
    try_ws(addr, "/gateway", &[("Authorization", token)])
        .await
        .unwrap()
}

/// The next text frame as JSON, skipping control frames. Panics on a close
/// or after 10 s.
pub async fn read_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("stream ended")
            .expect("read failed");
        match msg {
            WsMessage::Text(text) => return serde_json::from_str(&text).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads (discarding data frames) until the server's close frame and
/// returns its code; `None` if the connection ended without one. Panics
/// after `within`.
pub async fn read_close_within(ws: &mut WsClient, within: Duration) -> Option<u16> {
    use futures_util::StreamExt;
    tokio::time::timeout(within, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(WsMessage::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("no close frame in time")
}

/// [`read_close_within`] with 10 s.
pub async fn read_close(ws: &mut WsClient) -> Option<u16> {
    read_close_within(ws, Duration::from_secs(10)).await
}

/// Fails naming any secret found in `output`, as written or hex-encoded
/// (tungstenite traces frame payloads in hex).
pub fn assert_no_secrets(output: &str, secrets: &[String]) {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for secret in secrets {
        assert!(
            !output.contains(secret.as_str()),
            "{secret} was written out"
        );
        assert!(
            !output.contains(&hex(secret)),
            "{secret} was written out in hex"
        );
    }
}

/// A small tmpfs mounted over a folder for the life of the value, to give
/// a test a disk that can fill up. Needs root (tests run as root here).
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a tmpfs at {}",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes a filler file until the disk is full.
    pub fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        let _ = file.write_all(&[0u8; 1]);
    }

    /// Frees what [`fill`](Self::fill) took.
    pub fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Polls a metric until it equals `want` (metrics trail socket events a bit).
pub async fn wait_metric(gw: &Gateway, name: &str, labels: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = gw.metric(name, labels).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{labels}}} = {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it holds; fails the test after `within`, naming
/// `what`. Poll the real signal instead of sleeping.
pub async fn eventually(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
