//! Logging and metrics: `tracing` to stderr, and one Prometheus registry
//! whose handles every module updates directly (cheap atomics, no locks).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Installs the global tracing subscriber. `RUST_LOG` overrides the level;
/// `OTAKO_LOG_FORMAT=json` switches to JSON lines for log shippers.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Caps that hold whatever RUST_LOG says (and never raise a target above
    // the filter's own most verbose level). tungstenite traces every
    // frame's payload (HELLO's session id, event bodies) and the client's
    // request head (the dispatch secret), and secrets are never logged.
    // notify traces every raw file event: with the log written into a
    // watched folder, each line would be an event and log another line.
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let filter = [
        ("tungstenite", LevelFilter::DEBUG),
        ("notify", LevelFilter::WARN),
        ("notify_debouncer_full", LevelFilter::WARN),
    ]
    .into_iter()
    .filter_map(|(target, cap)| format!("{target}={}", most.min(cap)).parse().ok())
    .fold(filter, EnvFilter::add_directive);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if std::env::var("OTAKO_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests, `dev` reusing `serve`) keeps the first subscriber.
    drop(result);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `client`, `dispatch` or `admin`.
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResumeLabels {
    /// `resumed`, `new_session` or `refused` (4010: no free slot).
    pub result: &'static str,
    /// Why not resumed: `unknown_session`, `too_far_behind`,
    /// `session_limit`; `none` when resumed.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
    pub result: String,
}

/// Every metric the gateway exports. Labels are low-cardinality: event
/// types and plugin names come from `gateway.toml`, never from clients.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions_open: Gauge,
    pub sessions_opened: Counter,
    pub sessions_closed: Family<CodeLabel, Counter>,
    pub frames_delivered: Counter,
    pub queue_overflows: Counter,
    pub client_data_rejected: Counter,
    pub auth_failures: Counter,
    pub client_connections: Gauge,
    pub handshakes_refused: Family<HandshakeLabels, Counter>,
    pub dispatch_connections: Gauge,
    pub events: Family<EventLabels, Counter>,
    pub ack_latency: Histogram,
    pub events_inflight: Gauge,
    pub duplicates: Counter,
    pub invalid_frames: Counter,
    pub errlog_backlog: Gauge,
    pub errlog_oldest_undelivered_seconds: Gauge,
    pub errlog_delivered: Counter,
    pub errlog_sink_failures: Counter,
    pub plugin_reloads: Family<PluginLabels, Counter>,
    pub config_reload_failures: Counter,
    pub revocations_applied: Counter,
    pub sessions_revoked: Counter,
    pub resumes: Family<ResumeLabels, Counter>,
    pub sessions_detached: Gauge,
    pub frames_replayed: Counter,
    pub resume_buffer_bytes: Gauge,
    pub cluster_kv_retries: Counter,
    pub cluster_lease_renewals: Counter,
    pub cluster_lease_failures: Counter,
    pub cluster_bus_publish_failures: Counter,
    pub cluster_bus_gaps: Counter,
    pub cluster_bus_consumer_restarts: Counter,
    pub cluster_bus_publish_latency: Histogram,
    pub cluster_bus_consumer_lag: Gauge,
    pub cluster_bus_delivery_delay: Histogram,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("otako");
        let m = Metrics {
            sessions_open: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_closed: Family::default(),
            frames_delivered: Counter::default(),
            queue_overflows: Counter::default(),
            client_data_rejected: Counter::default(),
            auth_failures: Counter::default(),
            client_connections: Gauge::default(),
            handshakes_refused: Family::default(),
            dispatch_connections: Gauge::default(),
            events: Family::default(),
            // 50 µs .. ~1.6 s
            ack_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            events_inflight: Gauge::default(),
            duplicates: Counter::default(),
            invalid_frames: Counter::default(),
            errlog_backlog: Gauge::default(),
            errlog_oldest_undelivered_seconds: Gauge::default(),
            errlog_delivered: Counter::default(),
            errlog_sink_failures: Counter::default(),
            plugin_reloads: Family::default(),
            config_reload_failures: Counter::default(),
            revocations_applied: Counter::default(),
            sessions_revoked: Counter::default(),
            resumes: Family::default(),
            sessions_detached: Gauge::default(),
            frames_replayed: Counter::default(),
            resume_buffer_bytes: Gauge::default(),
            cluster_kv_retries: Counter::default(),
            cluster_lease_renewals: Counter::default(),
            cluster_lease_failures: Counter::default(),
            cluster_bus_publish_failures: Counter::default(),
            cluster_bus_gaps: Counter::default(),
            cluster_bus_consumer_restarts: Counter::default(),
            // 50 µs .. ~1.6 s
            cluster_bus_publish_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            cluster_bus_consumer_lag: Gauge::default(),
            cluster_bus_delivery_delay: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "cluster_kv_retries",
            "Cluster mode: compare-and-set retries on users' session-slot keys (another node wrote first)",
            m.cluster_kv_retries.clone(),
        );
        registry.register(
            "cluster_lease_renewals",
            "Cluster mode: renewals of this node's lease",
            m.cluster_lease_renewals.clone(),
        );
        registry.register(
            "cluster_lease_failures",
            "Cluster mode: lease renewals that failed or timed out",
            m.cluster_lease_failures.clone(),
        );
        registry.register(
            "cluster_bus_publish_failures",
            "Cluster mode: events that failed with BUS_UNAVAILABLE (a publish to the fan-out stream failed or got no ack in time)",
            m.cluster_bus_publish_failures.clone(),
        );
        registry.register(
            "cluster_bus_gaps",
            "Cluster mode: times this node's sessions were closed with 4000 because frames it missed were gone from the fan-out stream (or could not be delivered)",
            m.cluster_bus_gaps.clone(),
        );
        registry.register(
            "cluster_bus_consumer_restarts",
            "Cluster mode: times this node started its fan-out consumer again (reconnect, consumer error, sequence gap); local deliveries pause until it has caught up",
            m.cluster_bus_consumer_restarts.clone(),
        );
        registry.register(
            "cluster_bus_publish_latency_seconds",
            "Cluster mode: from an event's first publish to the fan-out stream to the stream's ack of its last delivery",
            m.cluster_bus_publish_latency.clone(),
        );
        registry.register(
            "cluster_bus_consumer_lag",
            "Cluster mode: deliveries in the fan-out stream this node has yet to read (as of its last read)",
            m.cluster_bus_consumer_lag.clone(),
        );
        registry.register(
            "cluster_bus_delivery_delay_seconds",
            "Cluster mode: from the stream storing a delivery to this node handing it to its sessions (includes clock skew between this node and the NATS server)",
            m.cluster_bus_delivery_delay.clone(),
        );
        registry.register(
            "sessions_open",
            "Client sessions open now",
            m.sessions_open.clone(),
        );
        registry.register(
            "sessions_opened",
            "Client sessions opened",
            m.sessions_opened.clone(),
        );
        registry.register(
            "sessions_closed",
            "Client sessions closed, by close code",
            m.sessions_closed.clone(),
        );
        registry.register(
            "frames_delivered",
            "Event frames written to client sessions",
            m.frames_delivered.clone(),
        );
        registry.register(
            "queue_overflows",
            "Sessions closed with 4009 because their outbound queue overflowed",
            m.queue_overflows.clone(),
        );
        registry.register(
            "client_data_rejected",
            "Sessions closed with 4003 because the client sent a data frame",
            m.client_data_rejected.clone(),
        );
        registry.register(
            "auth_failures",
            "Handshakes refused with 401 (client or dispatch)",
            m.auth_failures.clone(),
        );
        registry.register(
            "client_connections",
            "Upgraded client connections now (the server.max_connections count)",
            m.client_connections.clone(),
        );
        registry.register(
            "handshakes_refused",
            "Handshakes refused per listener: origin (403), limit (503), too_large (431), timeout and tls (closed)",
            m.handshakes_refused.clone(),
        );
        registry.register(
            "dispatch_connections",
            "Dispatch connections open now",
            m.dispatch_connections.clone(),
        );
        registry.register(
            "events",
            "Dispatch events by type and outcome",
            m.events.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "Time from reading a dispatch event to writing its EVENT_ROUNDTRIP",
            m.ack_latency.clone(),
        );
        registry.register(
            "events_inflight",
            "Dispatch events in flight",
            m.events_inflight.clone(),
        );
        registry.register(
            "duplicates",
            "Dispatch events acked as duplicates of an earlier success",
            m.duplicates.clone(),
        );
        registry.register(
            "invalid_frames",
            "Dispatch frames refused as not JSON or not an event",
            m.invalid_frames.clone(),
        );
        registry.register(
            "errlog_backlog",
            "Failed-event records not yet delivered to the logging sink (counted in the database)",
            m.errlog_backlog.clone(),
        );
        registry.register(
            "errlog_oldest_undelivered_seconds",
            "Age of the oldest failed-event record not yet delivered (0 when none)",
            m.errlog_oldest_undelivered_seconds.clone(),
        );
        registry.register(
            "errlog_delivered",
            "Failed-event records delivered to the logging sink",
            m.errlog_delivered.clone(),
        );
        registry.register(
            "errlog_sink_failures",
            "Attempts to deliver to the logging sink that failed",
            m.errlog_sink_failures.clone(),
        );
        registry.register(
            "plugin_reloads",
            "Plugin loads and reloads by plugin and result",
            m.plugin_reloads.clone(),
        );
        registry.register(
            "config_reload_failures",
            "gateway.toml reloads refused because the new file was invalid",
            m.config_reload_failures.clone(),
        );
        registry.register(
            "revocations_applied",
            "Token revocations this node has applied to its open sessions",
            m.revocations_applied.clone(),
        );
        registry.register(
            "sessions_revoked",
            "Client sessions closed with 4004 because their token was revoked or expired",
            m.sessions_revoked.clone(),
        );
        registry.register(
            "resumes",
            "Client handshakes naming a session to resume, by result and reason",
            m.resumes.clone(),
        );
        registry.register(
            "sessions_detached",
            "Sessions whose connection dropped, kept for a resume now",
            m.sessions_detached.clone(),
        );
        registry.register(
            "frames_replayed",
            "Event frames replayed to resumed sessions",
            m.frames_replayed.clone(),
        );
        registry.register(
            "resume_buffer_bytes",
            "Bytes the sessions' frame logs take for their slots (the frames themselves are shared across sessions)",
            m.resume_buffer_bytes.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts one closed session under its close code.
    pub fn session_closed(&self, code: u16) {
        self.sessions_closed
            .get_or_create(&CodeLabel { code })
            .inc();
    }

    /// Counts one handshake on `listener` refused for `reason`.
    pub fn handshake_refused(&self, listener: &'static str, reason: &'static str) {
        self.handshakes_refused
            .get_or_create(&HandshakeLabels { listener, reason })
            .inc();
    }

    /// Counts one resume attempt.
    pub fn resume(&self, result: &'static str, reason: &'static str) {
        self.resumes
            .get_or_create(&ResumeLabels { result, reason })
            .inc();
    }

    /// Counts one finished dispatch event.
    pub fn event_outcome(&self, event: &str, outcome: &str) {
        self.events
            .get_or_create(&EventLabels {
                event: event.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}
