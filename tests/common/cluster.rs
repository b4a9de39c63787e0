//! Cluster-mode harness (DESIGN §9): `serve` nodes on one PostgreSQL
//! schema and the real NATS JetStream (127.0.0.1:4222, or a private
//! server: [`TestCluster::use_nats`]), each test under its own
//! `cluster.subject_prefix` (its KV buckets and fan-out stream are
//! deleted after).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use futures_util::StreamExt;

use super::proxy::Proxy;
use super::{
    Gateway, Setup, WsClient, WsMessage, connect_client, plugin_cache, test_plugin, token,
};

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
/// Short, so tests of a dead or cut-off node's expiry stay quick, but not
/// so short that a loaded debug build fences a healthy node: a node fences
/// itself after 3/4 of it without a renewal (renewals every 1/3, each
/// given 1/6), so two slow NATS round trips of 1/6 would do it.
pub const LEASE_MS: u64 = 3000;

/// A PostgreSQL setup in cluster mode under a prefix of its own.
pub struct TestCluster {
    pub setup: Setup,
    pub prefix: String,
    /// The NATS the nodes use, whose buckets are deleted after.
    nats_url: String,
}

impl TestCluster {
    pub async fn new(max_per_user: u32, on_limit: &str) -> TestCluster {
        let mut setup = Setup::postgres().await;
        let prefix = format!("t{}_{}", std::process::id(), rand::random::<u32>());
        setup
            .set("cluster", "nats_url", &format!("\"{NATS_URL}\""))
            .set("cluster", "subject_prefix", &format!("\"{prefix}\""))
            .set("cluster", "lease_ms", &LEASE_MS.to_string())
            .set("sessions", "max_per_user", &max_per_user.to_string())
            .set("sessions", "on_limit", &format!("\"{on_limit}\""))
            // The nodes share one config file, rewritten per node.
            .set("plugins", "hot_reload", "false");
        TestCluster {
            setup,
            prefix,
            nats_url: NATS_URL.to_owned(),
        }
    }

    /// Points the nodes started from now on at another NATS server.
    pub fn use_nats(&mut self, url: &str) -> &mut Self {
        self.nats_url = url.to_owned();
        self.setup.set("cluster", "nats_url", &format!("\"{url}\""));
        self
    }

    /// Starts a `serve` node with this `node_id`.
    pub fn start(&mut self, node: u16) -> Gateway {
        self.setup.set("cluster", "node_id", &node.to_string());
        self.setup.start()
    }

    /// Starts a node that reaches NATS through `proxy`.
    pub fn start_via(&mut self, node: u16, proxy: &Proxy) -> Gateway {
        let url = format!("\"nats://{}\"", proxy.addr);
        self.setup.set("cluster", "nats_url", &url);
        let gw = self.start(node);
        let url = format!("\"{}\"", self.nats_url);
        self.setup.set("cluster", "nats_url", &url);
        gw
    }

    /// A cluster for event tests: the message handlers, and `EVENT_NOOP`
    /// delivering `d` to user `d.user_id`. `lease_ms` long enough that a
    /// node cut off from NATS for a few seconds keeps its lease.
    pub async fn for_events(lease_ms: u64) -> TestCluster {
        let mut cluster = TestCluster::new(5, "reject").await;
        cluster
            .setup
            .set("cluster", "lease_ms", &lease_ms.to_string())
            .set("plugins", "cache_dir", &format!("\"{}\"", plugin_cache()))
            .message_routes()
            .route(
                "EVENT_NOOP",
                &test_plugin("noop_plugin"),
                "timeout_ms = 5000",
            );
        cluster
    }

    /// The fan-out stream's name.
    pub fn stream(&self) -> String {
        format!("{}_fanout", self.prefix)
    }

    /// `GET /cluster` on `gw`.
    pub async fn status(gw: &Gateway) -> serde_json::Value {
        let (status, body) = gw.admin_get("/cluster").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for TestCluster {
    /// Deletes the test's KV buckets (outside the test's runtime, which
    /// may be gone by now).
    fn drop(&mut self) {
        let (prefix, url) = (self.prefix.clone(), self.nats_url.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let Ok(client) = async_nats::connect(url).await else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                for bucket in ["nodes", "slots"] {
                    let _ = js.delete_key_value(format!("{prefix}_{bucket}")).await;
                }
                let _ = js.delete_stream(format!("{prefix}_fanout")).await;
            });
        })
        .join();
    }
}

/// Connects `user` and reads the first frame: `Ok(ws)` on HELLO, `Err(code)`
/// when closed at once.
pub async fn try_session(gw: &Gateway, user: u64) -> Result<WsClient, u16> {
    let mut ws = connect_client(gw.client, &token(user)).await;
    match ws.next().await.unwrap().unwrap() {
        WsMessage::Text(text) => {
            assert!(text.contains("HELLO"), "{text}");
            Ok(ws)
        }
        WsMessage::Close(Some(frame)) => Err(u16::from(frame.code)),
        other => panic!("unexpected first frame {other:?}"),
    }
}
