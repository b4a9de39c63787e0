//! The client listener facing the internet (DESIGN §2): origin checks,
//! the subprotocol token, handshake timeouts, connection and header caps,
//! against the real binary over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::dispatch::DispatchClient;
use common::tls::TestCert;
use common::{
    Setup, assert_no_secrets, read_json, send_megabyte_head, test_plugin, token, try_ws,
    wait_closed_by_server, wait_metric, ws_refusal,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const REFUSED: &str = "otako_handshakes_refused_total";

/// A handshake from a browser page at `origin`, token in the header.
async fn from_origin(addr: SocketAddr, origin: &str) -> Result<(), u16> {
    let t = token(1);
    match try_ws(
        addr,
        "/gateway",
        &[("Authorization", &t), ("Origin", origin)],
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(err) => panic!("handshake failed without a status: {err}"),
    }
}

#[tokio::test]
async fn unset_allowed_origins_means_same_origin_only() {
    let setup = Setup::sqlite();
    let gw = setup.start();
    let own = format!("http://{}", gw.client);
    // Not a browser: no Origin header at all.
    try_ws(gw.client, "/gateway", &[("Authorization", &token(1))])
        .await
        .unwrap();
    assert_eq!(from_origin(gw.client, &own).await, Ok(()));
    assert_eq!(
        from_origin(gw.client, "http://evil.example").await,
        Err(403)
    );
    assert_eq!(from_origin(gw.client, "null").await, Err(403));
    wait_metric(&gw, REFUSED, "reason=\"origin\"", 2.0).await;
    assert_eq!(gw.metric("otako_auth_failures_total", "").await, 0.0);
}

#[tokio::test]
async fn listed_origins_and_the_wildcard() {
    let mut setup = Setup::sqlite();
    setup.set(
        "server",
        "allowed_origins",
        "[\"https://App.example\", \"http://127.0.0.1:7060\"]",
    );
    let gw = setup.start();
    assert_eq!(from_origin(gw.client, "https://app.example").await, Ok(()));
    assert_eq!(
        from_origin(gw.client, "http://127.0.0.1:7060").await,
        Ok(())
    );
    // Listing replaces same-origin: the page's own host is not implied.
    let own = format!("http://{}", gw.client);
    assert_eq!(from_origin(gw.client, &own).await, Err(403));
    assert_eq!(from_origin(gw.client, "http://app.example").await, Err(403));
    wait_metric(&gw, REFUSED, "reason=\"origin\"", 2.0).await;
    drop(gw);

    setup.set("server", "allowed_origins", "[\"*\"]");
    let gw = setup.start();
    assert_eq!(from_origin(gw.client, "http://evil.example").await, Ok(()));
}

/// Connects with `Sec-WebSocket-Protocol: protocols`; returns the
/// protocol the gateway answered and the HELLO's user id.
async fn with_subprotocol(addr: SocketAddr, protocols: &str) -> Result<(String, String), u16> {
    let mut request = format!("ws://{addr}/gateway")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(protocols).unwrap(),
    );
    let stream = TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((mut ws, response)) => {
            let answered = response.headers()["Sec-WebSocket-Protocol"]
                .to_str()
                .unwrap()
                .to_owned();
            let hello = read_json(&mut ws).await;
            Ok((answered, hello["d"]["user_id"].as_str().unwrap().to_owned()))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(err) => panic!("handshake failed without a status: {err}"),
    }
}

#[tokio::test]
async fn the_token_may_come_as_a_subprotocol() {
    let setup = Setup::sqlite();
    let gw = setup.start();
    let seven = token(7);
    assert_eq!(
        with_subprotocol(gw.client, &format!("otako.v1, otako.token.{seven}")).await,
        Ok(("otako.v1".to_owned(), "7".to_owned()))
    );
    assert_eq!(
        with_subprotocol(gw.client, "otako.v1, otako.token.x.y.z").await,
        Err(401)
    );
    assert_eq!(with_subprotocol(gw.client, "otako.v1").await, Err(401));
    // The three ways are equivalent; two different tokens are ambiguous.
    let path = format!("/gateway?token={seven}");
    try_ws(gw.client, &path, &[("Authorization", &seven)])
        .await
        .unwrap();
    assert_eq!(
        ws_refusal(gw.client, &path, &[("Authorization", &token(8))]).await,
        401
    );
    wait_metric(&gw, "otako_auth_failures_total", "", 3.0).await;
}

#[tokio::test]
async fn silent_handshakes_are_closed_and_do_not_starve_clients() {
    let mut setup = Setup::sqlite();
    setup.set("server", "handshake_timeout_ms", "1500");
    let gw = setup.start();
    let mut silent = Vec::new();
    for i in 0..300 {
        let mut socket = TcpStream::connect(gw.client).await.unwrap();
        if i % 2 == 1 {
            // Half-sent: a request line and nothing more.
            socket
                .write_all(b"GET /gateway HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        silent.push(socket);
    }
    // A real client still gets in while they hang.
    let mut ws = try_ws(gw.client, "/gateway", &[("Authorization", &token(1))])
        .await
        .unwrap();
    assert_eq!(read_json(&mut ws).await["t"], "HELLO");
    // Every silent socket is closed by the gateway (EOF or reset).
    for mut socket in silent {
        wait_closed_by_server(&mut socket, Duration::from_secs(20)).await;
    }
    wait_metric(&gw, REFUSED, "reason=\"timeout\"", 300.0).await;
    assert_eq!(gw.metric("otako_sessions_open", "").await, 1.0);
}

#[tokio::test]
async fn beyond_max_connections_handshakes_get_503() {
    let mut setup = Setup::sqlite();
    setup.set("server", "max_connections", "2");
    let gw = setup.start();
    let first = try_ws(gw.client, "/gateway", &[("Authorization", &token(1))])
        .await
        .unwrap();
    let _second = try_ws(gw.client, "/gateway", &[("Authorization", &token(2))])
        .await
        .unwrap();
    let third = token(3);
    assert_eq!(
        ws_refusal(gw.client, "/gateway", &[("Authorization", &third)]).await,
        503
    );
    wait_metric(&gw, REFUSED, "reason=\"limit\"", 1.0).await;
    wait_metric(&gw, "otako_client_connections", "", 2.0).await;
    drop(first);
    wait_metric(&gw, "otako_client_connections", "", 1.0).await;
    try_ws(gw.client, "/gateway", &[("Authorization", &third)])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_megabyte_of_headers_gets_431() {
    let setup = Setup::sqlite();
    let gw = setup.start();
    let text = send_megabyte_head(gw.client, "/gateway").await;
    assert!(
        text.starts_with("HTTP/1.1 431 "),
        "{:?}",
        &text[..text.len().min(200)]
    );
    wait_metric(&gw, REFUSED, "reason=\"too_large\"", 1.0).await;
}

/// Connects user `n`'s token the three ways (header, query, subprotocol)
/// and returns the tokens used and the session ids their HELLOs carried.
async fn connect_three_ways(addr: SocketAddr) -> (Vec<String>, Vec<String>) {
    let (a, b, c) = (token(11), token(12), token(13));
    let mut clients = vec![
        try_ws(addr, "/gateway", &[("Authorization", &a)])
            .await
            .unwrap(),
        try_ws(addr, &format!("/gateway?token={b}"), &[])
            .await
            .unwrap(),
        try_ws(
            addr,
            "/gateway",
            &[(
                "Sec-WebSocket-Protocol",
                &format!("otako.v1, otako.token.{c}"),
            )],
        )
        .await
        .unwrap(),
    ];
    let mut sessions = Vec::new();
    for ws in &mut clients {
        let hello = read_json(ws).await;
        sessions.push(hello["d"]["session_id"].as_str().unwrap().to_owned());
    }
    // A refused token goes through the logging paths too.
    let forged = format!("{}x", &a[..a.len() - 1]);
    assert_eq!(
        ws_refusal(addr, "/gateway", &[("Authorization", &forged)]).await,
        401
    );
    (vec![a, b, c, forged], sessions)
}

/// The tokens, their signature parts, the session ids, and both configured
/// secrets.
fn secrets_of(tokens: Vec<String>, sessions: Vec<String>) -> Vec<String> {
    let signatures: Vec<String> = tokens
        .iter()
        .map(|t| t.rsplit('.').next().unwrap().to_owned())
        .collect();
    let mut all = tokens;
    all.extend(signatures);
    all.extend(sessions);
    all.push(common::DISPATCH_SECRET.to_owned());
    all.push(common::TOKEN_SECRET.to_owned());
    all
}

#[tokio::test]
async fn serve_writes_no_secret_even_at_trace() {
    let setup = Setup::sqlite();
    let gw = setup.start_verb_env("serve", &[("RUST_LOG", "trace")]);
    let (tokens, sessions) = connect_three_ways(gw.client).await;
    let mut dispatch = common::dispatch::DispatchClient::connect(gw.dispatch).await;
    dispatch
        .send_text(r#"{"op":1,"t":"PING","d":{"ts":1}}"#)
        .await;
    assert_eq!(dispatch.recv().await["t"], "PONG");
    let wrong = ws_refusal(
        gw.dispatch,
        "/dispatch",
        &[("Authorization", "Bearer not-the-secret")],
    )
    .await;
    assert_eq!(wrong, 401);
    drop(dispatch);
    let stdout = gw.stdout().join("\n");
    let mut gw = gw;
    gw.terminate();
    gw.wait_exit(Duration::from_secs(20));
    let log = gw.log();
    // The log really is at trace (so the check below means something).
    assert!(log.contains("TRACE"), "{}", &log[..log.len().min(500)]);
    assert_no_secrets(&format!("{log}\n{stdout}"), &secrets_of(tokens, sessions));
}

#[tokio::test]
async fn dev_writes_no_secret_even_at_trace() {
    let mut setup = Setup::sqlite();
    setup.message_routes();
    // Everything at trace but the wasm compilers (which see plugin code,
    // never a request, and trace so much that compiling takes minutes).
    let filter = "trace,cranelift_codegen=info,regalloc2=info,wasmtime=info";
    let gw = setup.start_verb_env("dev", &[("RUST_LOG", filter)]);
    let (tokens, sessions) = connect_three_ways(gw.client).await;
    // A message through the reference backend: the api checks alice's
    // token and dispatches with the dispatch secret.
    let alice = token(1);
    let (status, text) = common::http_request(
        gw.api.unwrap(),
        "POST",
        "/channels/1/messages",
        &[("Authorization", alice.as_str())],
        Some(r#"{"content":"hi","nonce":"n-1"}"#),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let stdout = gw.stdout().join("\n");
    let mut gw = gw;
    gw.terminate();
    gw.wait_exit(Duration::from_secs(20));
    let mut secrets = secrets_of(tokens, sessions);
    secrets.push(alice);
    // dev prints its own demo tokens on purpose (issued now, not these).
    assert_no_secrets(&format!("{}\n{stdout}", gw.log()), &secrets);
}

#[tokio::test]
async fn with_a_certificate_clients_connect_over_wss_and_silent_tls_handshakes_time_out() {
    let mut setup = Setup::sqlite();
    let cert = TestCert::new(setup.dir.path());
    setup.set(
        "server",
        "tls_cert",
        &format!("\"{}\"", cert.cert.display()),
    );
    setup.set("server", "tls_key", &format!("\"{}\"", cert.key.display()));
    setup.set("server", "handshake_timeout_ms", "1500");
    setup.route("ECHO", &test_plugin("config_echo_plugin"), "");
    let gw = setup.start();

    // Silent sockets and a plaintext request on the TLS listener.
    let mut silent = TcpStream::connect(gw.client).await.unwrap();
    let mut plain = TcpStream::connect(gw.client).await.unwrap();
    plain
        .write_all(b"GET /gateway HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    let mut ws = cert
        .wss(gw.client, "/gateway", &[("Authorization", &token(1))])
        .await;
    assert_eq!(read_json(&mut ws).await["t"], "HELLO");
    let mut backend = DispatchClient::connect(gw.dispatch).await;
    let ack = backend.roundtrip("ECHO", json!({}), json!("tls-1")).await;
    assert_eq!(ack["success"], true, "{ack}");
    let event = read_json(&mut ws).await;
    assert_eq!(event["t"], "CONFIG_ECHO", "{event}");
    assert_eq!(event["d"]["event_id"], "tls-1", "{event}");

    wait_closed_by_server(&mut silent, Duration::from_secs(20)).await;
    wait_closed_by_server(&mut plain, Duration::from_secs(20)).await;
    wait_metric(&gw, REFUSED, "listener=\"client\",reason=\"timeout\"", 1.0).await;
    wait_metric(&gw, REFUSED, "listener=\"client\",reason=\"tls\"", 1.0).await;
}
