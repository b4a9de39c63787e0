//! Hot reload against the real binary: plugins replaced under a steady
//! stream of events, garbage plugins and broken configs kept out, routes
//! removed and added back, and many rapid saves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::client::Client;
use common::dispatch::{DispatchClient, Seed};
use common::{Gateway, Setup, test_plugin};
use serde_json::json;

/// Routes `EVENT_X` to a plugin file of the test's own, starting as
/// `noop_plugin` (delivers `NOOP` to `d.user_id`).
async fn setup_with_plugin() -> (Setup, PathBuf, Gateway, Client, DispatchClient) {
    let mut setup = Setup::sqlite();
    let dir = setup.dir.path().join("live");
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("x.wasm");
    std::fs::copy(test_plugin("noop_plugin"), &plugin).unwrap();
    setup.route("EVENT_X", &plugin, "");
    setup.set("plugins", "hot_reload", "true");
    let gateway = setup.start();
    let seed = Seed::open(&setup).await;
    seed.user(10, "alice").await;
    let client = Client::connect(gateway.client, 10).await;
    let backend = DispatchClient::connect(gateway.dispatch).await;
    (setup, plugin, gateway, client, backend)
}

fn replace_by_rename(path: &Path, source: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(source, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn replace_in_place(path: &Path, source: &Path) {
    std::fs::write(path, std::fs::read(source).unwrap()).unwrap();
}

/// Sends events until the client sees `want` as the event name, checking
/// that every event is acked successfully and delivered exactly once.
async fn stream_until(
    backend: &mut DispatchClient,
    client: &mut Client,
    start: u64,
    want: &str,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut id = start;
    loop {
        id += 1;
        let ack = backend
            .roundtrip(
                "EVENT_X",
                json!({"user_id": "10", "n": id}),
                json!(format!("x-{id}")),
            )
            .await;
        assert_eq!(
            ack["success"], true,
            "event {id} failed during reload: {ack}"
        );
        let frame = client.next().await;
        let t = frame["t"].as_str().unwrap().to_owned();
        assert!(t == "NOOP" || t == "CONFIG_ECHO", "{frame}");
        if t == want {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "the new version never started serving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_plugin_replaced_under_load_drops_nothing() {
    let (_setup, plugin, gateway, mut client, mut backend) = setup_with_plugin().await;
    let mut id = stream_until(&mut backend, &mut client, 0, "NOOP").await;

    // Rename over: v2 (config_echo_plugin delivers CONFIG_ECHO to everyone).
    replace_by_rename(&plugin, &test_plugin("config_echo_plugin"));
    id = stream_until(&mut backend, &mut client, id, "CONFIG_ECHO").await;
    // In place, back to v1.
    replace_in_place(&plugin, &test_plugin("noop_plugin"));
    id = stream_until(&mut backend, &mut client, id, "NOOP").await;
    assert!(id > 3);
    client.expect_silence(Duration::from_millis(200)).await;
    assert!(gateway.metric("otako_plugin_reloads_total", "").await >= 2.0);
    let (status, _) = gateway.admin_get("/readyz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_garbage_plugin_keeps_the_old_one_serving() {
    let (_setup, plugin, gateway, mut client, mut backend) = setup_with_plugin().await;
    let before = gateway.metric("otako_plugin_reloads_total", "").await;
    std::fs::write(&plugin, b"this is not wasm").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ack = backend
        .roundtrip("EVENT_X", json!({"user_id": "10"}), json!("after-garbage"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(client.next().await["t"], "NOOP");
    assert!(gateway.metric("otako_plugin_reloads_total", "").await > before);
    assert!(
        gateway.log().contains("x.wasm"),
        "the log says which file failed"
    );

    // The next good save is picked up.
    replace_by_rename(&plugin, &test_plugin("config_echo_plugin"));
    stream_until(&mut backend, &mut client, 100, "CONFIG_ECHO").await;
}

#[tokio::test]
async fn routes_come_and_go_without_a_restart_and_a_broken_config_is_kept_out() {
    let (setup, _plugin, gateway, mut client, mut backend) = setup_with_plugin().await;
    let config = setup.config_path();
    let original = std::fs::read_to_string(&config).unwrap();

    // A broken file mid-edit: the running config keeps serving.
    std::fs::write(
        &config,
        format!("{original}\n[sessions]\nmax_per_usr = 3\n"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway
        .metric("otako_config_reload_failures_total", "")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the broken config was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ack = backend
        .roundtrip("EVENT_X", json!({"user_id": "10"}), json!("k-1"))
        .await;
    assert_eq!(ack["success"], true);
    client.next().await;

    // Remove the route: NO_ROUTE.
    let without: String = original.split("[[routes]]").next().unwrap().to_owned();
    std::fs::write(&config, &without).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let ack = backend
            .roundtrip("EVENT_X", json!({"user_id": "10"}), json!(format!("r-{n}")))
            .await;
        if ack["success"] == false {
            assert_eq!(ack["error"]["code"], "NO_ROUTE");
            break;
        }
        client.next().await;
        assert!(Instant::now() < deadline, "the route was never removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And back.
    std::fs::write(&config, &original).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        n += 1;
        let ack = backend
            .roundtrip("EVENT_X", json!({"user_id": "10"}), json!(format!("r-{n}")))
            .await;
        if ack["success"] == true {
            assert_eq!(client.next().await["t"], "NOOP");
            break;
        }
        assert!(Instant::now() < deadline, "the route never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn many_rapid_saves_end_on_the_last_version_without_leaking() {
    let (_setup, plugin, gateway, mut client, mut backend) = setup_with_plugin().await;
    stream_until(&mut backend, &mut client, 0, "NOOP").await;
    let rss_before = gateway.rss_bytes();
    let versions = [
        test_plugin("noop_plugin"),
        test_plugin("config_echo_plugin"),
    ];
    for i in 0..100 {
        replace_by_rename(&plugin, &versions[i % 2]);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // The last save was config_echo_plugin.
    replace_by_rename(&plugin, &versions[1]);
    let id = stream_until(&mut backend, &mut client, 1000, "CONFIG_ECHO").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = backend
        .roundtrip(
            "EVENT_X",
            json!({"user_id": "10"}),
            json!(format!("x-{}", id + 1)),
        )
        .await;
    assert_eq!(after["success"], true);
    assert_eq!(client.next().await["t"], "CONFIG_ECHO");
    let growth = gateway.rss_bytes().saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024 * 1024,
        "RSS grew by {growth} bytes over 100 reloads"
    );
}
