//! `gateway.toml`: parsed once into typed, validated values (DESIGN §5).
//!
//! The file is deserialized with `deny_unknown_fields` so a typo is an error
//! naming the key and its line, never a silently ignored setting. Relative
//! paths are resolved against the config file's folder, and the
//! `OTAKO_*` environment variables override the file. A `Config` is an
//! immutable value: a reload builds a new one and swaps it in whole.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::ids::NodeId;

/// Environment variable that overrides `auth.token_secret`.
pub const ENV_TOKEN_SECRET: &str = "OTAKO_TOKEN_SECRET";
/// Environment variable that overrides `auth.dispatch_secret`.
pub const ENV_DISPATCH_SECRET: &str = "OTAKO_DISPATCH_SECRET";
/// Environment variable that overrides `database.url`.
pub const ENV_DATABASE_URL: &str = "OTAKO_DATABASE_URL";

/// Why a config could not be loaded. The message is one line naming the
/// file, line and key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Semantic { path: String, message: String },
}

/// A secret string: compared in constant time by its users and never
/// printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A digest, never the value: comparing two configs (hot reload) sees a
/// changed secret while the secret itself stays in this type.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&digest(&self.0))
    }
}

/// A one-way digest of a value that may hold a credential.
fn digest(value: &str) -> String {
    let hash = Sha256::digest(value.as_bytes());
    format!(
        "sha256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash)
    )
}

/// Which database backs the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An SQLite file, created on first run.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string, passed to sqlx as given.
    Postgres(String),
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            // The password, if any, stays out of logs.
            DatabaseUrl::Postgres(url) => match url.split_once('@') {
                Some((_, host)) => write!(f, "postgres://…@{host}"),
                None => f.write_str(url),
            },
        }
    }
}

/// A PostgreSQL url may carry a password: serialized as a digest.
impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DatabaseUrl::Sqlite(_) => s.collect_str(self),
            DatabaseUrl::Postgres(url) => s.serialize_str(&digest(url)),
        }
    }
}

impl DatabaseUrl {
    /// Parses `sqlite://path`, `sqlite:path` or `postgres://…`, resolving a
    /// relative SQLite path against `base`.
    pub fn parse(url: &str, base: &Path) -> Result<Self, String> {
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = rest.split('?').next().unwrap_or(rest);
            if path.is_empty() {
                return Err(format!("database url '{url}' has no file path"));
            }
            return Ok(DatabaseUrl::Sqlite(resolve(base, Path::new(path))));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_owned()));
        }
        Err(format!(
            "database url '{url}' must start with sqlite:// or postgres://"
        ))
    }
}

/// What to do with a connection over `sessions.max_per_user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Close the new session with 4010.
    Reject,
    /// Close the user's oldest session with 4011 and keep the new one.
    EvictOldest,
}

/// Where failed events go, once per event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    /// Append JSON lines to a file.
    File(PathBuf),
    /// POST each record as JSON with an `Idempotency-Key` header.
    Http(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    pub client_listen: SocketAddr,
    pub dispatch_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Browser origins allowed on the client listener, lowercased
    /// (`scheme://host[:port]`, or `*` alone for any); `None` allows only
    /// same-origin pages.
    pub allowed_origins: Option<Vec<String>>,
    /// A client connection that hasn't finished its upgrade by then is closed.
    pub handshake_timeout_ms: NonZeroU64,
    /// Upgraded client connections per node; handshakes beyond get 503.
    pub max_connections: NonZeroUsize,
    /// The kernel's accept queue per listener: a reconnect storm of
    /// thousands must not overflow it into 1 s SYN retries (the usual 128
    /// does at about 200 simultaneous connects).
    pub listen_backlog: NonZeroU32,
    /// `tls_cert`/`tls_key`: the client listener speaks wss://.
    #[serde(flatten)]
    pub tls: Option<TlsFiles>,
    /// The dispatch listener speaks wss:// too, with the same identity.
    pub dispatch_tls: bool,
}

/// A listener's TLS identity: PEM files, checked loadable at load time.
/// Serialized with the file's keys, for hot reload's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsFiles {
    #[serde(rename = "tls_cert")]
    pub cert: PathBuf,
    #[serde(rename = "tls_key")]
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, crate::tls::TlsError> {
        crate::tls::acceptor(&self.cert, &self.key)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    pub token_secret: Option<Secret>,
    pub dispatch_secret: Option<Secret>,
    /// Tokens older than this are refused; `None` means tokens don't expire.
    pub token_ttl_s: Option<NonZeroU64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseConfig {
    pub url: DatabaseUrl,
    pub max_connections: NonZeroU32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionsConfig {
    pub max_per_user: NonZeroU32,
    pub on_limit: OnLimit,
    pub heartbeat_interval_ms: NonZeroU64,
    pub outbound_queue: NonZeroUsize,
    /// How long a session whose socket dropped stays resumable.
    pub resume_window_ms: NonZeroU64,
    /// Frames a session keeps for a resume (written ones included).
    pub resume_buffer: NonZeroUsize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DispatchConfig {
    pub ping_timeout_ms: NonZeroU64,
    pub max_inflight: NonZeroUsize,
    /// Largest dispatch frame accepted, in bytes.
    pub max_frame_bytes: NonZeroUsize,
    /// How long a successful event id is remembered for idempotency.
    pub outcome_retention_s: NonZeroU64,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub sink: SinkConfig,
}

/// Serialized with the file's keys (`sink`, then `path` or `url`), so a
/// changed setting is named as the user wrote it. An http url may carry
/// credentials: a digest.
impl Serialize for LoggingConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_struct("LoggingConfig", 2)?;
        match &self.sink {
            SinkConfig::File(path) => {
                out.serialize_field("sink", "file")?;
                out.serialize_field("path", path)?;
            }
            SinkConfig::Http(url) => {
                out.serialize_field("sink", "http")?;
                out.serialize_field("url", &digest(url))?;
            }
        }
        out.end()
    }
}

/// `[cluster]` (DESIGN §9). `nats_url` turns cluster mode on; `node_id`
/// is also the id generator's node bits, single node or not.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterConfig {
    /// `nats://…` of the NATS server with JetStream; `None`: one node.
    pub nats_url: Option<String>,
    /// The id generator's node bits, unique per process minting ids into
    /// one database; in cluster mode also the node's name in its lease.
    pub node_id: NodeId,
    pub subject_prefix: String,
    /// How long a node's lease (also its id lease) outlives its last renewal.
    pub lease_ms: NonZeroU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PluginsConfig {
    pub hot_reload: bool,
    /// Where compiled plugin code is cached between runs.
    pub cache_dir: PathBuf,
    /// Per-lookup time limit for a plugin's database query.
    pub query_timeout_ms: NonZeroU64,
    /// Per-lookup row limit for a plugin's database query.
    pub query_max_rows: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteConfig {
    pub event: String,
    pub plugin: PathBuf,
    pub timeout_ms: NonZeroU64,
    pub memory_mb: NonZeroU32,
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub dispatch_url: String,
    pub dispatch_attempts: NonZeroU32,
    pub attempt_timeout_ms: NonZeroU64,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: NonZeroUsize,
    /// Longest message content accepted, in characters (422 beyond).
    pub max_content_len: NonZeroUsize,
    /// `tls_cert`/`tls_key`: the API listener speaks https://.
    #[serde(flatten)]
    pub tls: Option<TlsFiles>,
    /// PEM certificates a wss:// `dispatch_url` is trusted by (a private
    /// CA or a self-signed gateway); unset: the webpki (Mozilla) roots.
    pub dispatch_ca: Option<PathBuf>,
}

/// A validated `gateway.toml`. `Serialize` gives the tree hot reload
/// compares key by key (see `reload`): a field added here is compared too.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file it was read from (for messages and the watcher).
    #[serde(skip)]
    pub path: PathBuf,
    /// SHA-256 of the text it was parsed from: hot reload skips a save that
    /// changed nothing.
    #[serde(skip)]
    pub text_sha256: [u8; 32],
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    pub sessions: SessionsConfig,
    pub dispatch: DispatchConfig,
    pub logging: LoggingConfig,
    pub plugins: PluginsConfig,
    pub routes: Vec<RouteConfig>,
    pub cluster: ClusterConfig,
    pub api: ApiConfig,
}

impl Config {
    /// Reads, parses and validates a config file, then applies the
    /// environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        // Absolute, so the hot-reload watcher's event paths match it.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Self::from_text(&text, &path)
    }

    /// Parses and validates text already read from `path`, then applies
    /// the environment overrides (what [`load`](Self::load) does after
    /// reading).
    pub fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config = Self::parse(text, path)?;
        config.apply_env(|key| std::env::var(key).ok())?;
        Ok(config)
    }

    /// Parses config text as if read from `path` (no environment applied).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let raw: raw::File = toml::from_str(text).map_err(|e| invalid(&shown, text, &e))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        let mut config = raw.compile(path, &base, text)?;
        config.text_sha256 = Sha256::digest(text.as_bytes()).into();
        Ok(config)
    }

    /// Applies `OTAKO_*` overrides; `lookup` is the environment (a parameter
    /// so tests need not mutate the process's).
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(secret) = lookup(ENV_TOKEN_SECRET).filter(|s| !s.is_empty()) {
            self.auth.token_secret = Some(Secret(secret));
        }
        if let Some(secret) = lookup(ENV_DISPATCH_SECRET).filter(|s| !s.is_empty()) {
            self.auth.dispatch_secret = Some(Secret(secret));
        }
        if let Some(url) = lookup(ENV_DATABASE_URL).filter(|s| !s.is_empty()) {
            let base = self.base_dir();
            self.database.url =
                DatabaseUrl::parse(&url, &base).map_err(|message| ConfigError::Semantic {
                    path: ENV_DATABASE_URL.to_owned(),
                    message,
                })?;
            if self.cluster.nats_url.is_some()
                && matches!(self.database.url, DatabaseUrl::Sqlite(_))
            {
                return Err(ConfigError::Semantic {
                    path: ENV_DATABASE_URL.to_owned(),
                    message: sqlite_in_cluster(&self.database.url),
                });
            }
        }
        Ok(())
    }

    /// Whether `[cluster]` names a NATS server (several nodes, DESIGN §9).
    pub fn clustered(&self) -> bool {
        self.cluster.nats_url.is_some()
    }

    /// The folder relative paths are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// The secrets every serving verb needs; outside `dev` a missing one is
    /// an error rather than a guessable default.
    pub fn require_secrets(&self) -> Result<(Secret, Secret), ConfigError> {
        let missing = |key: &str, env: &str| ConfigError::Semantic {
            path: self.path.display().to_string(),
            message: format!("auth.{key} is not set (set it in [auth] or in {env})"),
        };
        let token = self
            .auth
            .token_secret
            .clone()
            .ok_or_else(|| missing("token_secret", ENV_TOKEN_SECRET))?;
        let dispatch = self
            .auth
            .dispatch_secret
            .clone()
            .ok_or_else(|| missing("dispatch_secret", ENV_DISPATCH_SECRET))?;
        Ok((token, dispatch))
    }

    /// The route for a dispatch event type, if any.
    pub fn route(&self, event: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.event == event)
    }
}

/// Resolves `p` against `base` unless it is already absolute.
/// The error for cluster mode on SQLite: nodes share the database, and a
/// SQLite file can't be shared between machines.
fn sqlite_in_cluster(url: &DatabaseUrl) -> String {
    format!(
        "in [cluster]: cluster.nats_url (cluster mode) needs PostgreSQL, but database.url is {url}; \
         set database.url = \"postgres://…\" or remove cluster.nats_url"
    )
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|head| head.matches('\n').count() + 1)
        .unwrap_or(1)
}

/// The `[table]` header in force at a byte offset, for messages.
fn table_at(text: &str, offset: usize) -> Option<String> {
    let head = text.get(..offset)?;
    head.lines().rev().find_map(|line| {
        let line = line.trim();
        line.starts_with('[').then(|| {
            line.split('#')
                .next()
                .unwrap_or(line)
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        })
    })
}

/// Turns a toml/serde error into `path:line: message`, rewriting serde's
/// "unknown field" wording into the key-and-table form users look for.
fn invalid(path: &str, text: &str, err: &toml::de::Error) -> ConfigError {
    let offset = err.span().map(|s| s.start).unwrap_or(0);
    let line = line_of(text, offset);
    let raw = err.message().trim();
    let message = match raw.strip_prefix("unknown field `") {
        Some(rest) => {
            let key = rest.split('`').next().unwrap_or(rest);
            let expected = rest
                .split_once(", expected ")
                .map(|(_, e)| format!(" (expected {})", e.replace('`', "'")))
                .unwrap_or_default();
            match table_at(text, offset) {
                Some(table) => format!("unknown key '{key}' in [{table}]{expected}"),
                None => format!("unknown key '{key}'{expected}"),
            }
        }
        None => match table_at(text, offset) {
            Some(table) => format!("in [{table}]: {raw}"),
            None => raw.to_owned(),
        },
    };
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        message,
    }
}

/// The file as written: every field optional with a default, unknown keys
/// rejected. `compile` turns it into a [`Config`].
mod raw {
    use super::*;
    use toml::Spanned;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct File {
        server: Server,
        auth: Auth,
        database: Database,
        sessions: Sessions,
        dispatch: Dispatch,
        logging: Logging,
        plugins: Plugins,
        routes: Vec<Route>,
        cluster: Cluster,
        api: Api,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Server {
        client_listen: SocketAddr,
        dispatch_listen: SocketAddr,
        admin_listen: SocketAddr,
        allowed_origins: Option<Spanned<Vec<String>>>,
        handshake_timeout_ms: NonZeroU64,
        max_connections: NonZeroUsize,
        listen_backlog: NonZeroU32,
        tls_cert: Option<Spanned<PathBuf>>,
        tls_key: Option<Spanned<PathBuf>>,
        dispatch_tls: Spanned<bool>,
    }

    impl Default for Server {
        fn default() -> Self {
            Server {
                client_listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
                dispatch_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
                admin_listen: SocketAddr::from(([127, 0, 0, 1], 7072)),
                allowed_origins: None,
                handshake_timeout_ms: nz64(10_000),
                max_connections: nzu(100_000),
                listen_backlog: NonZeroU32::new(4096).unwrap_or(NonZeroU32::MIN),
                tls_cert: None,
                tls_key: None,
                dispatch_tls: Spanned::new(0..0, false),
            }
        }
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Auth {
        token_secret: Option<String>,
        dispatch_secret: Option<String>,
        token_ttl_s: Option<NonZeroU64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Database {
        url: Spanned<String>,
        max_connections: NonZeroU32,
    }

    impl Default for Database {
        fn default() -> Self {
            Database {
                url: Spanned::new(0..0, "sqlite://data/otako.db".to_owned()),
                max_connections: NonZeroU32::new(8).unwrap_or(NonZeroU32::MIN),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sessions {
        max_per_user: NonZeroU32,
        on_limit: OnLimit,
        heartbeat_interval_ms: NonZeroU64,
        outbound_queue: NonZeroUsize,
        resume_window_ms: NonZeroU64,
        resume_buffer: NonZeroUsize,
    }

    impl Default for Sessions {
        fn default() -> Self {
            Sessions {
                max_per_user: nz32(5),
                on_limit: OnLimit::Reject,
                heartbeat_interval_ms: nz64(30_000),
                outbound_queue: nzu(1024),
                resume_window_ms: nz64(120_000),
                resume_buffer: nzu(1024),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Dispatch {
        ping_timeout_ms: NonZeroU64,
        max_inflight: NonZeroUsize,
        max_frame_bytes: NonZeroUsize,
        outcome_retention_s: NonZeroU64,
    }

    impl Default for Dispatch {
        fn default() -> Self {
            Dispatch {
                ping_timeout_ms: nz64(15_000),
                max_inflight: nzu(1024),
                max_frame_bytes: nzu(64 * 1024),
                outcome_retention_s: nz64(7 * 24 * 3600),
            }
        }
    }

    #[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    enum SinkKind {
        File,
        Http,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Logging {
        sink: Spanned<SinkKind>,
        path: Option<PathBuf>,
        url: Option<Spanned<String>>,
    }

    impl Default for Logging {
        fn default() -> Self {
            Logging {
                sink: Spanned::new(0..0, SinkKind::File),
                path: None,
                url: None,
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Plugins {
        hot_reload: bool,
        cache_dir: PathBuf,
        query_timeout_ms: NonZeroU64,
        query_max_rows: NonZeroU32,
    }

    impl Default for Plugins {
        fn default() -> Self {
            Plugins {
                hot_reload: true,
                cache_dir: PathBuf::from("data/plugin-cache"),
                query_timeout_ms: nz64(1_000),
                query_max_rows: nz32(10_000),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Route {
        event: Spanned<String>,
        plugin: PathBuf,
        #[serde(default = "default_route_timeout")]
        timeout_ms: NonZeroU64,
        #[serde(default = "default_route_memory")]
        memory_mb: Spanned<NonZeroU32>,
        #[serde(default)]
        config: BTreeMap<String, String>,
    }

    fn default_route_timeout() -> NonZeroU64 {
        nz64(50)
    }

    fn default_route_memory() -> Spanned<NonZeroU32> {
        Spanned::new(0..0, nz32(16))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cluster {
        nats_url: Option<Spanned<String>>,
        node_id: Spanned<u16>,
        subject_prefix: Spanned<String>,
        lease_ms: NonZeroU64,
    }

    impl Default for Cluster {
        fn default() -> Self {
            Cluster {
                nats_url: None,
                node_id: Spanned::new(0..0, 0),
                subject_prefix: Spanned::new(0..0, "otako".to_owned()),
                lease_ms: nz64(10_000),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Api {
        listen: SocketAddr,
        dispatch_url: Spanned<String>,
        dispatch_attempts: NonZeroU32,
        attempt_timeout_ms: NonZeroU64,
        max_body_bytes: NonZeroUsize,
        max_content_len: NonZeroUsize,
        tls_cert: Option<Spanned<PathBuf>>,
        tls_key: Option<Spanned<PathBuf>>,
        dispatch_ca: Option<Spanned<PathBuf>>,
    }

    impl Default for Api {
        fn default() -> Self {
            Api {
                listen: SocketAddr::from(([127, 0, 0, 1], 7060)),
                dispatch_url: Spanned::new(0..0, "ws://127.0.0.1:7071/dispatch".to_owned()),
                dispatch_attempts: nz32(5),
                attempt_timeout_ms: nz64(2_000),
                max_body_bytes: nzu(64 * 1024),
                max_content_len: nzu(4_000),
                tls_cert: None,
                tls_key: None,
                dispatch_ca: None,
            }
        }
    }

    fn nz32(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
    }
    fn nz64(v: u64) -> NonZeroU64 {
        NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN)
    }
    fn nzu(v: usize) -> NonZeroUsize {
        NonZeroUsize::new(v).unwrap_or(NonZeroUsize::MIN)
    }

    /// `["*"]`, or origins as browsers send them: `http(s)://host[:port]`,
    /// no path, no `*` mixed with others.
    fn check_origins(list: &[String]) -> Result<(), String> {
        if list.iter().any(|o| o == "*") {
            return if list.len() == 1 {
                Ok(())
            } else {
                Err("\"*\" must be the only entry".to_owned())
            };
        }
        for origin in list {
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            match host {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']) => {}
                _ => {
                    return Err(format!(
                        "'{origin}' is not an origin (http://host[:port] or https://host[:port])"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `tls_cert` and `tls_key` of `[table]`: both or neither, and loadable
    /// (a missing or bad file is an error naming it).
    fn tls_files(
        table: &str,
        cert: Option<Spanned<PathBuf>>,
        key: Option<Spanned<PathBuf>>,
        base: &Path,
        text: &str,
        errors: &mut Vec<(usize, String)>,
    ) -> Option<TlsFiles> {
        match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let files = TlsFiles {
                    cert: resolve(base, cert.get_ref()),
                    key: resolve(base, key.get_ref()),
                };
                if let Err(err) = files.acceptor() {
                    errors.push((
                        line_of(text, cert.span().start),
                        format!("in [{table}]: tls_cert/tls_key: {err}"),
                    ));
                }
                Some(files)
            }
            (Some(one), None) | (None, Some(one)) => {
                errors.push((
                    line_of(text, one.span().start),
                    format!("in [{table}]: tls_cert and tls_key go together: set both or neither"),
                ));
                None
            }
        }
    }

    /// Largest memory limit a route may ask for: a wasm32 guest can't
    /// address more than 4 GiB anyway.
    const MAX_MEMORY_MB: u32 = 4096;

    impl File {
        /// Validates cross-field rules, collecting every error (one per
        /// line) before failing, and resolves relative paths.
        pub fn compile(self, path: &Path, base: &Path, text: &str) -> Result<Config, ConfigError> {
            let shown = path.display().to_string();
            let mut errors: Vec<(usize, String)> = Vec::new();
            let at = |span: std::ops::Range<usize>| line_of(text, span.start);

            let url = match DatabaseUrl::parse(self.database.url.get_ref(), base) {
                Ok(url) => Some(url),
                Err(message) => {
                    errors.push((
                        at(self.database.url.span()),
                        format!("in [database]: {message}"),
                    ));
                    None
                }
            };

            let sink = match *self.logging.sink.get_ref() {
                SinkKind::File => Some(SinkConfig::File(resolve(
                    base,
                    self.logging
                        .path
                        .as_deref()
                        .unwrap_or(Path::new("data/event-errors.jsonl")),
                ))),
                SinkKind::Http => match &self.logging.url {
                    Some(url)
                        if url.get_ref().starts_with("http://")
                            || url.get_ref().starts_with("https://") =>
                    {
                        Some(SinkConfig::Http(url.get_ref().clone()))
                    }
                    Some(url) => {
                        errors.push((
                            at(url.span()),
                            format!(
                                "in [logging]: url '{}' must start with http:// or https://",
                                url.get_ref()
                            ),
                        ));
                        None
                    }
                    None => {
                        errors.push((
                            at(self.logging.sink.span()),
                            "in [logging]: sink = \"http\" needs a url".to_owned(),
                        ));
                        None
                    }
                },
            };

            let allowed_origins = self.server.allowed_origins.map(|list| {
                let line = at(list.span());
                // Browsers send origins lowercased, without a trailing slash.
                let list: Vec<String> = list
                    .into_inner()
                    .iter()
                    .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                    .collect();
                if let Err(message) = check_origins(&list) {
                    errors.push((line, format!("in [server]: allowed_origins: {message}")));
                }
                list
            });

            let mut routes: Vec<RouteConfig> = Vec::with_capacity(self.routes.len());
            for route in self.routes {
                let line = at(route.event.span());
                let event = route.event.into_inner();
                if event.is_empty() {
                    errors.push((line, "in [[routes]]: event must not be empty".to_owned()));
                } else if routes.iter().any(|r| r.event == event) {
                    errors.push((
                        line,
                        format!("in [[routes]]: event '{event}' is routed twice"),
                    ));
                }
                if route.memory_mb.get_ref().get() > MAX_MEMORY_MB {
                    errors.push((
                        at(route.memory_mb.span()),
                        format!("in [[routes]]: memory_mb must be at most {MAX_MEMORY_MB}"),
                    ));
                }
                routes.push(RouteConfig {
                    event,
                    plugin: resolve(base, &route.plugin),
                    timeout_ms: route.timeout_ms,
                    memory_mb: route.memory_mb.into_inner(),
                    config: route.config,
                });
            }

            let dispatch_url = self.api.dispatch_url.get_ref();
            if !dispatch_url.starts_with("ws://") && !dispatch_url.starts_with("wss://") {
                errors.push((
                    at(self.api.dispatch_url.span()),
                    format!(
                        "in [api]: dispatch_url '{dispatch_url}' must start with ws:// or wss://"
                    ),
                ));
            }
            let dispatch_ca = self.api.dispatch_ca.map(|ca| {
                let path = resolve(base, ca.get_ref());
                if let Err(err) = crate::tls::connector(Some(&path)) {
                    errors.push((at(ca.span()), format!("in [api]: dispatch_ca: {err}")));
                }
                path
            });
            let server_tls = tls_files(
                "server",
                self.server.tls_cert,
                self.server.tls_key,
                base,
                text,
                &mut errors,
            );
            let dispatch_tls = *self.server.dispatch_tls.get_ref();
            if dispatch_tls && server_tls.is_none() {
                errors.push((
                    at(self.server.dispatch_tls.span()),
                    "in [server]: dispatch_tls needs tls_cert and tls_key".to_owned(),
                ));
            }
            let api_tls = tls_files(
                "api",
                self.api.tls_cert,
                self.api.tls_key,
                base,
                text,
                &mut errors,
            );

            let node_id = NodeId::new(*self.cluster.node_id.get_ref());
            if node_id.is_none() {
                errors.push((
                    at(self.cluster.node_id.span()),
                    format!(
                        "in [cluster]: node_id {} is out of range (0-{})",
                        self.cluster.node_id.get_ref(),
                        NodeId::MAX
                    ),
                ));
            }
            if let Some(nats) = &self.cluster.nats_url {
                if !nats.get_ref().starts_with("nats://") {
                    errors.push((
                        at(nats.span()),
                        format!(
                            "in [cluster]: nats_url '{}' must start with nats://",
                            nats.get_ref()
                        ),
                    ));
                } else if let Some(sqlite @ DatabaseUrl::Sqlite(_)) = &url {
                    errors.push((at(nats.span()), sqlite_in_cluster(sqlite)));
                }
            }
            let prefix = self.cluster.subject_prefix.get_ref();
            if prefix.is_empty()
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                errors.push((
                    at(self.cluster.subject_prefix.span()),
                    format!("in [cluster]: subject_prefix '{prefix}' must be letters, digits, '_' or '-'"),
                ));
            }

            if let Some((line, message)) = errors.first() {
                let rest: Vec<String> = errors
                    .iter()
                    .skip(1)
                    .map(|(l, m)| format!("; {shown}:{l}: {m}"))
                    .collect();
                return Err(ConfigError::Invalid {
                    path: shown,
                    line: *line,
                    message: format!("{message}{}", rest.concat()),
                });
            }
            let (Some(url), Some(sink), Some(node_id)) = (url, sink, node_id) else {
                return Err(ConfigError::Semantic {
                    path: shown,
                    message: "invalid configuration".to_owned(),
                });
            };

            Ok(Config {
                path: path.to_path_buf(),
                text_sha256: [0; 32],
                server: ServerConfig {
                    client_listen: self.server.client_listen,
                    dispatch_listen: self.server.dispatch_listen,
                    admin_listen: self.server.admin_listen,
                    allowed_origins,
                    handshake_timeout_ms: self.server.handshake_timeout_ms,
                    max_connections: self.server.max_connections,
                    listen_backlog: self.server.listen_backlog,
                    tls: server_tls,
                    dispatch_tls,
                },
                auth: AuthConfig {
                    token_secret: self.auth.token_secret.filter(|s| !s.is_empty()).map(Secret),
                    dispatch_secret: self
                        .auth
                        .dispatch_secret
                        .filter(|s| !s.is_empty())
                        .map(Secret),
                    token_ttl_s: self.auth.token_ttl_s,
                },
                database: DatabaseConfig {
                    url,
                    max_connections: self.database.max_connections,
                },
                sessions: SessionsConfig {
                    max_per_user: self.sessions.max_per_user,
                    on_limit: self.sessions.on_limit,
                    heartbeat_interval_ms: self.sessions.heartbeat_interval_ms,
                    outbound_queue: self.sessions.outbound_queue,
                    resume_window_ms: self.sessions.resume_window_ms,
                    resume_buffer: self.sessions.resume_buffer,
                },
                dispatch: DispatchConfig {
                    ping_timeout_ms: self.dispatch.ping_timeout_ms,
                    max_inflight: self.dispatch.max_inflight,
                    max_frame_bytes: self.dispatch.max_frame_bytes,
                    outcome_retention_s: self.dispatch.outcome_retention_s,
                },
                logging: LoggingConfig { sink },
                plugins: PluginsConfig {
                    hot_reload: self.plugins.hot_reload,
                    cache_dir: resolve(base, &self.plugins.cache_dir),
                    query_timeout_ms: self.plugins.query_timeout_ms,
                    query_max_rows: self.plugins.query_max_rows,
                },
                routes,
                cluster: ClusterConfig {
                    nats_url: self.cluster.nats_url.map(Spanned::into_inner),
                    node_id,
                    subject_prefix: self.cluster.subject_prefix.into_inner(),
                    lease_ms: self.cluster.lease_ms,
                },
                api: ApiConfig {
                    listen: self.api.listen,
                    dispatch_url: self.api.dispatch_url.into_inner(),
                    dispatch_attempts: self.api.dispatch_attempts,
                    attempt_timeout_ms: self.api.attempt_timeout_ms,
                    max_body_bytes: self.api.max_body_bytes,
                    max_content_len: self.api.max_content_len,
                    tls: api_tls,
                    dispatch_ca,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/otako/gateway.toml"))
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let config = parse("").unwrap();
        assert_eq!(config.sessions.max_per_user.get(), 5);
        assert_eq!(config.sessions.on_limit, OnLimit::Reject);
        assert_eq!(config.dispatch.max_inflight.get(), 1024);
        assert_eq!(
            config.database.url,
            DatabaseUrl::Sqlite(PathBuf::from("/etc/otako/data/otako.db"))
        );
        assert!(config.auth.token_secret.is_none());
        assert!(config.require_secrets().is_err());
    }

    #[test]
    fn unknown_key_names_key_table_and_line() {
        let text = "[server]\nclient_listen = \"127.0.0.1:1\"\n\n[sessions]\nmax_per_usr = 3\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/otako/gateway.toml:5: unknown key 'max_per_usr' in [sessions]"),
            "{err}"
        );
    }

    #[test]
    fn bad_value_names_line() {
        let err = parse("[sessions]\non_limit = \"drop\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/otako/gateway.toml:2: "), "{err}");
        assert!(err.contains("drop"), "{err}");
        let err = parse("[dispatch]\n\nmax_inflight = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/otako/gateway.toml:3: "), "{err}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = "[database]\nurl = \"mysql://x\"\n[logging]\nsink = \"http\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(":2: in [database]"), "{err}");
        assert!(
            err.contains(":4: in [logging]: sink = \"http\" needs a url"),
            "{err}"
        );
    }

    #[test]
    fn routes_resolve_relative_to_the_config_folder() {
        let text = "[[routes]]\nevent = \"EVENT_MESSAGE_CREATE\"\nplugin = \"plugins/m.wasm\"\n[routes.config]\nk = \"v\"\n";
        let config = parse(text).unwrap();
        let route = config.route("EVENT_MESSAGE_CREATE").unwrap();
        assert_eq!(route.plugin, PathBuf::from("/etc/otako/plugins/m.wasm"));
        assert_eq!(route.timeout_ms.get(), 50);
        assert_eq!(route.config.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn duplicate_route_is_an_error() {
        let text = "[[routes]]\nevent = \"A\"\nplugin = \"a.wasm\"\n[[routes]]\nevent = \"A\"\nplugin = \"b.wasm\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains(":5: in [[routes]]: event 'A' is routed twice"),
            "{err}"
        );
    }

    #[test]
    fn cluster_node_id_defaults_to_zero_and_is_checked() {
        assert_eq!(parse("").unwrap().cluster.node_id.get(), 0);
        let config = parse("[cluster]\nnode_id = 1023\nlease_ms = 500\n").unwrap();
        assert_eq!(config.cluster.node_id.get(), 1023);
        assert_eq!(config.cluster.lease_ms.get(), 500);
        let err = parse("[cluster]\n\nnode_id = 1024\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":3: in [cluster]: node_id 1024 is out of range (0-1023)"),
            "{err}"
        );
        let err = parse("[cluster]\nsubject_prefix = \"a.b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2: in [cluster]: subject_prefix 'a.b'"),
            "{err}"
        );
    }

    #[test]
    fn server_edge_keys_default_and_are_checked() {
        let config = parse("").unwrap();
        assert_eq!(config.server.allowed_origins, None);
        assert_eq!(config.server.handshake_timeout_ms.get(), 10_000);
        assert_eq!(config.server.max_connections.get(), 100_000);
        let config = parse("[server]\nallowed_origins = [\"HTTP://Example.com:8080/\"]\n").unwrap();
        assert_eq!(
            config.server.allowed_origins,
            Some(vec!["http://example.com:8080".to_owned()])
        );
        assert!(parse("[server]\nallowed_origins = [\"*\"]\n").is_ok());
        for bad in [
            "[\"*\", \"http://a\"]",
            "[\"example.com\"]",
            "[\"http://a/b\"]",
        ] {
            let err = parse(&format!("[server]\n\nallowed_origins = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(":3: in [server]: allowed_origins"),
                "{bad}: {err}"
            );
        }
        let err = parse("[server]\nmax_connections = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2: in [server]"), "{err}");
    }

    #[test]
    fn cluster_mode_needs_postgres_naming_both_keys() {
        let err = parse("[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2: in [cluster]: cluster.nats_url"), "{err}");
        assert!(err.contains("database.url is sqlite://"), "{err}");
        let text = "[database]\nurl = \"postgres://u@db/x\"\n[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\nnode_id = 3\n";
        let mut config = parse(text).unwrap();
        assert!(config.clustered());
        assert_eq!(
            config.cluster.nats_url.as_deref(),
            Some("nats://127.0.0.1:4222")
        );
        let err = config
            .apply_env(|k| (k == ENV_DATABASE_URL).then(|| "sqlite://x.db".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster.nats_url") && err.contains("database.url"),
            "{err}"
        );
        let err = parse("[cluster]\nnats_url = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must start with nats://"), "{err}");
    }

    #[test]
    fn tls_keys_go_in_pairs_and_name_missing_files() {
        parse("[api]\ndispatch_url = \"wss://gw:7071/dispatch\"\n").unwrap();
        let err = parse("[server]\ntls_cert = \"/nonexistent/gw.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2: in [server]: tls_cert and tls_key go together"),
            "{err}"
        );
        let err = parse(
            "[server]\ntls_cert = \"/nonexistent/gw.pem\"\ntls_key = \"/nonexistent/gw.key\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(":2: in [server]: tls_cert/tls_key: /nonexistent/gw.pem: cannot read"),
            "{err}"
        );
        let err = parse("[api]\ndispatch_ca = \"/nonexistent/ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2: in [api]: dispatch_ca: /nonexistent/ca.pem: cannot read"),
            "{err}"
        );
        let err = parse("[server]\ndispatch_tls = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dispatch_tls needs tls_cert and tls_key"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_file() {
        let mut config = parse("[auth]\ntoken_secret = \"file\"\n").unwrap();
        config
            .apply_env(|key| match key {
                ENV_TOKEN_SECRET => Some("env-token".into()),
                ENV_DISPATCH_SECRET => Some("env-dispatch".into()),
                ENV_DATABASE_URL => Some("postgres://u:pw@db/x".into()),
                _ => None,
            })
            .unwrap();
        let (token, dispatch) = config.require_secrets().unwrap();
        assert_eq!(token.expose(), "env-token");
        assert_eq!(dispatch.expose(), "env-dispatch");
        assert_eq!(config.database.url.to_string(), "postgres://…@db/x");
    }
}
