//! The reference backend end to end: real `api` and `serve` processes on
//! one SQLite file, real client sessions, the outbox and its retries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::api::call;
use common::client::Client;
use common::{Gateway, Setup, http_request};
use serde_json::{Value, json};

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Gateway on a fixed dispatch port and the API pointed at it.
struct Stack {
    setup: Setup,
    dispatch: SocketAddr,
}

impl Stack {
    fn new(attempts: u32) -> Stack {
        let dispatch = free_addr();
        let mut setup = Setup::sqlite();
        setup.message_routes();
        setup.set("server", "dispatch_listen", &format!("\"{dispatch}\""));
        setup.set(
            "api",
            "dispatch_url",
            &format!("\"ws://{dispatch}/dispatch\""),
        );
        setup.set("api", "dispatch_attempts", &attempts.to_string());
        // Covers the first dispatch connect and the ack wait: 10 s, so a
        // slow (loaded, debug-build) first attempt is not retried. No test
        // here needs a timeout to fire (a down gateway refuses at once).
        setup.set("api", "attempt_timeout_ms", "10000");
        Stack { setup, dispatch }
    }

    fn gateway(&self) -> Gateway {
        self.setup.start_verb("serve")
    }

    fn api(&self) -> (Gateway, SocketAddr) {
        let api = self.setup.start_verb("api");
        let addr = api.api.unwrap();
        (api, addr)
    }

    async fn outbox_states(&self) -> Vec<(String, String, i64)> {
        let pool = sqlx::SqlitePool::connect(&self.setup.db.url())
            .await
            .unwrap();
        sqlx::query_as("SELECT event_type, state, attempts FROM dispatch_outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap()
    }

    async fn wait_outbox(
        &self,
        done: impl Fn(&[(String, String, i64)]) -> bool,
    ) -> Vec<(String, String, i64)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = self.outbox_states().await;
            if done(&rows) || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Alice (author) and Bob in a channel made through the API; Mallory outside.
async fn people(api: SocketAddr) -> (Value, Value, Value, String) {
    let mut users = Vec::new();
    for name in ["alice", "bob", "mallory"] {
        let (status, user) = call(
            api,
            "POST",
            "/users",
            None,
            Some(&json!({"name": name}).to_string()),
        )
        .await;
        assert_eq!(status, 201, "{user}");
        assert_eq!(user["name"], name);
        users.push(user);
    }
    let (alice, bob, mallory) = (users[0].clone(), users[1].clone(), users[2].clone());
    let body = json!({"name": "general", "members": [bob["id"]]}).to_string();
    let (status, channel) = call(
        api,
        "POST",
        "/channels",
        alice["token"].as_str(),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{channel}");
    let mut members: Vec<&str> = channel["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    members.sort_unstable();
    let mut expected = vec![alice["id"].as_str().unwrap(), bob["id"].as_str().unwrap()];
    expected.sort_unstable();
    assert_eq!(members, expected);
    (
        alice,
        bob,
        mallory,
        channel["id"].as_str().unwrap().to_owned(),
    )
}

fn uid(user: &Value) -> u64 {
    user["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_seed_example_situation_runs_end_to_end() {
    let stack = Stack::new(5);
    let gateway = stack.gateway();
    let (_api, api) = stack.api();
    let (alice, bob, mallory, channel) = people(api).await;
    let mut alice_ws = Client::connect(gateway.client, uid(&alice)).await;
    let mut bob_ws = Client::connect(gateway.client, uid(&bob)).await;
    let mut mallory_ws = Client::connect(gateway.client, uid(&mallory)).await;

    // The seed's request: its body and headers.
    let body = r#"{"content":"Hello! This is a message from the Otako client!", "nonce":"87654GFGDS7544567FD"}"#;
    let headers = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("Authorization", alice["token"].as_str().unwrap()),
    ];
    let (status, text) = http_request(
        api,
        "POST",
        &format!("/channels/{channel}/messages"),
        &headers,
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let message: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        message["content"],
        "Hello! This is a message from the Otako client!"
    );
    assert_eq!(message["nonce"], "87654GFGDS7544567FD");
    assert_eq!(message["channel_id"], channel.as_str());
    assert_eq!(
        message["author"],
        json!({"id": alice["id"], "name": "alice"})
    );
    assert!(message["timestamp"].as_str().unwrap().ends_with('Z'));

    for ws in [&mut alice_ws, &mut bob_ws] {
        let frame = ws.next().await;
        assert_eq!(frame["t"], "MESSAGE_CREATE");
        assert_eq!(frame["d"], message, "clients get the full stored message");
    }
    mallory_ws.expect_silence(Duration::from_millis(300)).await;
    let rows = stack
        .wait_outbox(|rows| rows.iter().all(|r| r.1 == "done"))
        .await;
    assert_eq!(
        rows,
        [("EVENT_MESSAGE_CREATE".to_owned(), "done".to_owned(), 1)]
    );

    // Edit, then delete.
    let mid = message["id"].as_str().unwrap();
    let path = format!("/channels/{channel}/messages/{mid}");
    let (status, edited) = call(
        api,
        "PATCH",
        &path,
        alice["token"].as_str(),
        Some(r#"{"content":"edited"}"#),
    )
    .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(edited["content"], "edited");
    assert!(edited["edited_timestamp"].is_string());
    let frame = bob_ws.next().await;
    assert_eq!(frame["t"], "MESSAGE_UPDATE");
    assert_eq!(frame["d"], edited);

    let (status, _) = call(
        api,
        "PATCH",
        &path,
        bob["token"].as_str(),
        Some(r#"{"content":"mine now"}"#),
    )
    .await;
    assert_eq!(status, 403, "only the author edits");
    let (status, _) = call(api, "DELETE", &path, alice["token"].as_str(), None).await;
    assert_eq!(status, 204);
    let frame = bob_ws.next().await;
    assert_eq!(frame["t"], "MESSAGE_DELETE");
    assert_eq!(frame["d"], json!({"id": mid, "channel_id": channel}));
    let rows = stack
        .wait_outbox(|rows| rows.len() == 3 && rows.iter().all(|r| r.1 == "done"))
        .await;
    assert!(rows.iter().all(|r| r.1 == "done"), "{rows:?}");
    let (status, _) = call(api, "DELETE", &path, alice["token"].as_str(), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_repeated_nonce_neither_posts_nor_broadcasts_twice() {
    let stack = Stack::new(5);
    let gateway = stack.gateway();
    let (_api, api) = stack.api();
    let (alice, bob, _, channel) = people(api).await;
    let mut bob_ws = Client::connect(gateway.client, uid(&bob)).await;
    let path = format!("/channels/{channel}/messages");
    let body = r#"{"content":"once","nonce":"n-1"}"#;
    let (s1, first) = call(api, "POST", &path, alice["token"].as_str(), Some(body)).await;
    let (s2, second) = call(api, "POST", &path, alice["token"].as_str(), Some(body)).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first, second);
    assert_eq!(bob_ws.next().await["d"]["id"], first["id"]);
    bob_ws.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(stack.outbox_states().await.len(), 1);
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_a_json_error() {
    let mut stack = Stack::new(5);
    stack.setup.set("api", "max_body_bytes", "512");
    stack.setup.set("api", "max_content_len", "10");
    let (_api, api) = stack.api();
    let (alice, _bob, mallory, channel) = people(api).await;
    let path = format!("/channels/{channel}/messages");
    let alice_token = alice["token"].as_str();

    let cases: Vec<(u16, &str, Option<&str>, Option<String>)> = vec![
        (401, "UNAUTHORIZED", None, Some(r#"{"content":"x"}"#.into())),
        (
            401,
            "UNAUTHORIZED",
            Some("garbage"),
            Some(r#"{"content":"x"}"#.into()),
        ),
        (
            403,
            "FORBIDDEN",
            mallory["token"].as_str(),
            Some(r#"{"content":"x"}"#.into()),
        ),
        (400, "BAD_REQUEST", alice_token, Some("{not json".into())),
        (
            400,
            "BAD_REQUEST",
            alice_token,
            Some(r#"{"nonce":"x"}"#.into()),
        ),
        (
            413,
            "TOO_LARGE",
            alice_token,
            Some(format!(r#"{{"content":"{}"}}"#, "x".repeat(600))),
        ),
        (
            422,
            "INVALID",
            alice_token,
            Some(r#"{"content":"   "}"#.into()),
        ),
        (
            422,
            "INVALID",
            alice_token,
            Some(r#"{"content":"12345678901"}"#.into()),
        ),
    ];
    for (status, code, auth, body) in cases {
        let (got, error) = call(api, "POST", &path, auth, body.as_deref()).await;
        assert_eq!(got, status, "{body:?}: {error}");
        assert_eq!(error["code"], code, "{error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
    }
    let (status, error) = call(
        api,
        "POST",
        "/channels/999/messages",
        alice_token,
        Some(r#"{"content":"x"}"#),
    )
    .await;
    assert_eq!((status, error["code"].as_str()), (404, Some("NOT_FOUND")));
    let member_path = format!(
        "/channels/{channel}/members/{}",
        mallory["id"].as_str().unwrap()
    );
    let (status, _) = call(api, "PUT", &member_path, mallory["token"].as_str(), None).await;
    assert_eq!(status, 403);
    let (status, _) = call(api, "PUT", &member_path, alice_token, None).await;
    assert_eq!(status, 204);
    let (status, _) = call(
        api,
        "POST",
        &path,
        mallory["token"].as_str(),
        Some(r#"{"content":"hi"}"#),
    )
    .await;
    assert_eq!(status, 201, "a new member may post");
}

#[tokio::test]
async fn gateway_down_means_x_attempts_then_logged_and_dropped_and_later_messages_flow() {
    let stack = Stack::new(3);
    let (_api, api) = stack.api();
    let (alice, bob, _, channel) = people(api).await;
    let path = format!("/channels/{channel}/messages");
    let (status, lost) = call(
        api,
        "POST",
        &path,
        alice["token"].as_str(),
        Some(r#"{"content":"into the void"}"#),
    )
    .await;
    assert_eq!(status, 201, "the reply does not wait for the gateway");

    let rows = stack
        .wait_outbox(|rows| rows.iter().all(|r| r.1 == "dropped"))
        .await;
    assert_eq!(
        rows,
        [("EVENT_MESSAGE_CREATE".to_owned(), "dropped".to_owned(), 3)]
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.setup.error_log().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = stack.setup.error_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["error"]["code"], "DISPATCH_DROPPED");
    assert_eq!(log[0]["d"]["id"], lost["id"]);
    // Still stored and readable.
    let pool = sqlx::SqlitePool::connect(&stack.setup.db.url())
        .await
        .unwrap();
    let (content,): (String,) = sqlx::query_as("SELECT content FROM messages WHERE id = $1")
        .bind(lost["id"].as_str().unwrap().parse::<i64>().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(content, "into the void");

    // The gateway comes up: later messages flow.
    let gateway = stack.gateway();
    assert_eq!(gateway.dispatch, stack.dispatch);
    let mut bob_ws = Client::connect(gateway.client, uid(&bob)).await;
    let (_, later) = call(
        api,
        "POST",
        &path,
        alice["token"].as_str(),
        Some(r#"{"content":"hello again"}"#),
    )
    .await;
    let frame = bob_ws.next().await;
    assert_eq!(frame["d"]["id"], later["id"]);
    bob_ws.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_backend_killed_with_pending_rows_resumes_them_on_restart() {
    let stack = Stack::new(1000);
    let (api_process, api) = stack.api();
    let (alice, bob, _, channel) = people(api).await;
    let path = format!("/channels/{channel}/messages");
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"content": format!("pending {i}")}).to_string();
        let (status, message) =
            call(api, "POST", &path, alice["token"].as_str(), Some(&body)).await;
        assert_eq!(status, 201);
        ids.push(message["id"].clone());
    }
    api_process.kill();
    let rows = stack.outbox_states().await;
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.1 == "pending"), "{rows:?}");

    let gateway = stack.gateway();
    let mut bob_ws = Client::connect(gateway.client, uid(&bob)).await;
    let (_api, _) = stack.api();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(bob_ws.next().await["d"]["id"].clone());
    }
    assert_eq!(seen, ids, "every stored message is dispatched, in order");
    let rows = stack
        .wait_outbox(|rows| rows.iter().all(|r| r.1 == "done"))
        .await;
    assert!(rows.iter().all(|r| r.1 == "done"), "{rows:?}");
}

/// TLS on every hop: the API over https, its dispatch client over wss to
/// a dispatch listener with `dispatch_tls` (trusting the test certificate
/// through `api.dispatch_ca`), and the client session over wss.
#[tokio::test]
async fn with_tls_everywhere_a_message_posted_over_https_reaches_a_wss_client() {
    let mut stack = Stack::new(5);
    let cert = common::tls::TestCert::new(stack.setup.dir.path());
    let (pem, key) = (cert.cert.display(), cert.key.display());
    for section in ["server", "api"] {
        stack.setup.set(section, "tls_cert", &format!("\"{pem}\""));
        stack.setup.set(section, "tls_key", &format!("\"{key}\""));
    }
    stack.setup.set("server", "dispatch_tls", "true");
    stack.setup.set("api", "dispatch_ca", &format!("\"{pem}\""));
    let url = format!("\"wss://{}/dispatch\"", stack.dispatch);
    stack.setup.set("api", "dispatch_url", &url);
    let gateway = stack.gateway();
    let (_api, api) = stack.api();

    let https = async |method: &str, path: &str, auth: Option<&str>, body: &str| {
        let mut headers = vec![("Accept", "application/json")];
        headers.extend(auth.map(|a| ("Authorization", a)));
        let (status, text) = cert
            .https_request(api, method, path, &headers, Some(body))
            .await;
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let (status, alice) = https("POST", "/users", None, r#"{"name":"alice"}"#).await;
    assert_eq!(status, 201, "{alice}");
    let token = alice["token"].as_str().unwrap();
    let (status, channel) = https(
        "POST",
        "/channels",
        Some(token),
        r#"{"name":"tls","members":[]}"#,
    )
    .await;
    assert_eq!(status, 201, "{channel}");
    let mut ws = cert
        .wss(gateway.client, "/gateway", &[("Authorization", token)])
        .await;
    assert_eq!(common::read_json(&mut ws).await["t"], "HELLO");

    let path = format!("/channels/{}/messages", channel["id"].as_str().unwrap());
    let body = r#"{"content":"over TLS","nonce":"tls-1"}"#;
    let (status, message) = https("POST", &path, Some(token), body).await;
    assert_eq!(status, 201, "{message}");
    let frame = common::read_json(&mut ws).await;
    assert_eq!(frame["t"], "MESSAGE_CREATE", "{frame}");
    assert_eq!(frame["d"], message);
}

#[tokio::test]
async fn the_read_calls_list_my_channels_and_a_channels_latest_messages() {
    let stack = Stack::new(5);
    let _gateway = stack.gateway();
    let (_api, api) = stack.api();
    let (alice, bob, mallory, channel) = people(api).await;
    let token = |u: &Value| u["token"].as_str().unwrap().to_owned();

    let (status, me) = call(api, "GET", "/users/@me", Some(&token(&bob)), None).await;
    assert_eq!(status, 200);
    assert_eq!(me, json!({"id": bob["id"], "name": "bob"}));
    let (status, _) = call(api, "GET", "/users/@me", Some("not-a-token"), None).await;
    assert_eq!(status, 401);

    let (status, channels) = call(api, "GET", "/channels", Some(&token(&bob)), None).await;
    assert_eq!(status, 200);
    assert_eq!(channels.as_array().unwrap().len(), 1);
    assert_eq!(channels[0]["id"], channel.as_str());
    assert_eq!(channels[0]["members"].as_array().unwrap().len(), 2);
    let (_, none) = call(api, "GET", "/channels", Some(&token(&mallory)), None).await;
    assert_eq!(none, json!([]));

    let path = format!("/channels/{channel}/messages");
    for n in 1..=3 {
        let body = json!({"content": format!("m{n}")}).to_string();
        let (status, _) = call(api, "POST", &path, Some(&token(&alice)), Some(&body)).await;
        assert_eq!(status, 201);
    }
    let (status, all) = call(api, "GET", &path, Some(&token(&bob)), None).await;
    assert_eq!(status, 200);
    let contents: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["m1", "m2", "m3"], "oldest first");
    let (_, last) = call(
        api,
        "GET",
        &format!("{path}?limit=2"),
        Some(&token(&bob)),
        None,
    )
    .await;
    assert_eq!(last[0]["content"], "m2");
    assert_eq!(last[1]["content"], "m3");
    assert_eq!(last[1]["author"]["name"], "alice");
    let (status, _) = call(api, "GET", &path, Some(&token(&mallory)), None).await;
    assert_eq!(status, 403);
    let (status, _) = call(
        api,
        "GET",
        &format!("{path}?limit=0"),
        Some(&token(&bob)),
        None,
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_demo_page_and_the_client_library_are_served_from_the_binary() {
    let stack = Stack::new(5);
    let (_api, api) = stack.api();
    let (status, page) = http_request(api, "GET", "/", &[], None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<script type=\"module\" src=\"/demo.js\">"));
    let (status, script) = http_request(api, "GET", "/demo.js", &[], None).await;
    assert_eq!(status, 200);
    assert!(script.contains("from \"/otako.js\""));
    let (status, client) = http_request(api, "GET", "/otako.js", &[], None).await;
    assert_eq!(status, 200);
    assert!(client.contains("export class OtakoClient"));
    let (status, config) = call(api, "GET", "/config.json", None, None).await;
    assert_eq!(status, 200);
    let url = config["gateway_url"].as_str().unwrap();
    assert!(
        url.starts_with("ws://127.0.0.1:") && url.ends_with("/gateway"),
        "{url}"
    );
}
