//! `otako-gateway dev`: gateway, backend and file log sink in one process
//! with demo data, running a message end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::client::Client;
use common::{Setup, http_request, token};
use serde_json::Value;

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
    assert!(dev.stop().success());
}
