//! `otako-gateway dev`: gateway, backend and file log sink in one process
//! with demo data, running a message end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::client::Client;
use common::{Setup, http_request, token};
use serde_json::Value;
use std::time::{Duration, Instant};

#[tokio::test]
async fn dev_runs_the_whole_stack_in_one_process() {
    let mut setup = Setup::sqlite();
    setup.message_routes();
    let dev = setup.start_verb("dev");
    let api = dev.api.expect("dev announces the api");

    // The seeded demo: alice (1) and bob (2) in channel 1.
    let mut bob = Client::connect(dev.client, 2).await;
    let alice = token(1);
    let (status, text) = http_request(
        api,
        "POST",
        "/channels/1/messages",
        &[("Authorization", alice.as_str())],
        Some(r#"{"content":"Hello from Otako!","nonce":"demo-1"}"#),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let message: Value = serde_json::from_str(&text).unwrap();
    let frame = bob.next().await;
    assert_eq!(frame["t"], "MESSAGE_CREATE");
    assert_eq!(frame["d"], message);
    assert_eq!(frame["d"]["author"]["name"], "alice");
    watch_command_works_as_printed(&dev).await;
    what_to_open_comes_first(&dev, api).await;
    assert!(dev.stop().success());
}

/// `dev` ends with what to open: a demo link per demo user, then the
/// operator page, then the terminal recipes; the links serve the page.
async fn what_to_open_comes_first(dev: &common::Gateway, api: std::net::SocketAddr) {
    let lines = dev.stdout();
    let position = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle} in {lines:#?}"))
    };
    let (alice, bob) = (position("alice  http://"), position("bob    http://"));
    let operator_url = format!("http://{}/", dev.admin);
    let operator = lines
        .iter()
        .position(|l| l.trim() == operator_url)
        .unwrap_or_else(|| panic!("no line with just {operator_url} in {lines:#?}"));
    let curl = position("curl -sN");
    assert!(
        alice < bob && bob < operator && operator < curl,
        "{lines:#?}"
    );
    for line in [&lines[alice], &lines[bob]] {
        let url = line.split_whitespace().last().unwrap();
        let path = url.strip_prefix(&format!("http://{api}")).unwrap();
        assert!(path.starts_with("/?token="), "{url}");
        let (status, page) = common::http_request(api, "GET", path, &[], None).await;
        assert_eq!(status, 200);
        assert!(page.contains("Otako chat demo"));
    }
    let (status, page) = dev.admin_get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("Otako operator"));
}

/// The curl command `dev` prints to watch bob's session, sent exactly as
/// printed: the upgrade is accepted and HELLO arrives.
async fn watch_command_works_as_printed(dev: &common::Gateway) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(10);
    let watch = loop {
        if let Some(line) = dev.stdout().into_iter().find(|l| l.contains("curl -sN")) {
            break line;
        }
        assert!(Instant::now() < deadline, "dev printed no watch command");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let quoted: Vec<&str> = watch.split('\'').skip(1).step_by(2).collect();
    let (url, headers) = quoted.split_last().unwrap();
    let path = url
        .strip_prefix(&format!("http://{}", dev.client))
        .unwrap_or_else(|| panic!("{url} is not on {}", dev.client));
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", dev.client);
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(dev.client).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("HELLO") {
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no HELLO; got {}", String::from_utf8_lossy(&seen)))
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
}
