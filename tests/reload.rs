//! Hot reload against the real binary: one change is one reload (reads and
//! identical saves are none), restart-only keys are named and kept, a
//! failed reload changes nothing, events in flight during a swap finish on
//! their version, routes come and go, and many rapid saves settle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::client::Client;
use common::dispatch::{DispatchClient, Seed};
use common::load::{Swap, load_through_swap};
use common::{Gateway, Setup, test_plugin};
use serde_json::{Value, json};

/// The gateway's debounce is 100 ms: "settled" means no change for this long.
const SETTLE: Duration = Duration::from_millis(700);

/// `[routes.config]` for config_echo_plugin at version `v`.
fn echo_config(v: u32) -> String {
    format!(
        "[routes.config]\ngreeting = \"v{v}\"\nmax_content_len = \"{}\"",
        v * 100
    )
}

/// Route lines for the load tests: [`echo_config`] with a time limit no
/// busy machine reaches (the tests are about reloads, not time limits).
fn load_route(v: u32) -> String {
    format!("timeout_ms = 5000\n{}", echo_config(v))
}

/// Routes `EVENT_X` to a plugin file of the test's own (a copy of
/// `plugin`), with `extra` route lines; user 10 is connected.
async fn start_with(
    setup: &mut Setup,
    plugin: &str,
    extra: &str,
) -> (PathBuf, Gateway, Client, DispatchClient) {
    let dir = setup.dir.path().join("live");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("x.wasm");
    std::fs::copy(test_plugin(plugin), &file).unwrap();
    setup.route("EVENT_X", &file, extra);
    setup.set("plugins", "hot_reload", "true");
    let gateway = setup.start();
    let seed = Seed::open(setup).await;
    seed.user(10, "alice").await;
    let client = Client::connect(gateway.client, 10).await;
    let backend = DispatchClient::connect(gateway.dispatch).await;
    // The watcher starts after the listeners: a save before it is in place
    // would never be seen (a CI run lost one that way).
    gateway
        .wait_log("hot reload: watching", Duration::from_secs(15))
        .await;
    (file, gateway, client, backend)
}

/// Saves the way most editors do: a temporary file renamed over the old.
fn save(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Rewrites the config with `from` replaced by `to` (which must occur).
fn edit_config(setup: &Setup, from: &str, to: &str) {
    let path = setup.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    save(&path, text.replace(from, to).as_bytes());
}

/// Route builds of x.wasm so far (1 after the start), by result.
async fn reloads(gateway: &Gateway, result: &str) -> f64 {
    gateway
        .metric(
            "otako_plugin_reloads_total",
            &format!("plugin=\"x.wasm\",result=\"{result}\""),
        )
        .await
}

/// Polls until `reloads(result)` reaches `want`, then checks it stays
/// exactly there for [`SETTLE`].
async fn expect_reloads(gateway: &Gateway, result: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while reloads(gateway, result).await < want {
        assert!(
            Instant::now() < deadline,
            "{result} reloads stuck at {} (want {want})",
            reloads(gateway, result).await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let settled = Instant::now() + SETTLE;
    while Instant::now() < settled {
        assert_eq!(reloads(gateway, result).await, want, "{result} reloads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One event to user 10 (or everyone), and the frame it produced.
async fn one_event(backend: &mut DispatchClient, client: &mut Client, id: &str) -> Value {
    let ack = backend
        .roundtrip("EVENT_X", json!({"user_id": "10"}), json!(id))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    client.next().await
}

#[tokio::test]
async fn one_change_is_one_reload_and_reads_or_identical_saves_are_none() {
    let mut setup = Setup::sqlite();
    let (plugin, gateway, mut client, mut backend) =
        start_with(&mut setup, "config_echo_plugin", &echo_config(1)).await;
    expect_reloads(&gateway, "ok", 1.0).await;

    // One save: exactly one reload, and it stays one (the gateway's own
    // reads of the files it reloads don't set it off again).
    edit_config(&setup, "\"v1\"", "\"v2\"");
    expect_reloads(&gateway, "ok", 2.0).await;
    let frame = one_event(&mut backend, &mut client, "a").await;
    assert_eq!(frame["d"]["greeting"], "v2", "{frame}");

    // Reading the files, as `cat` or a backup tool would: nothing.
    let config = setup.config_path();
    let text = std::fs::read(&config).unwrap();
    let bytes = std::fs::read(&plugin).unwrap();
    expect_reloads(&gateway, "ok", 2.0).await;

    // Saving identical bytes, in place and by rename: nothing.
    std::fs::write(&config, &text).unwrap();
    std::fs::write(&plugin, &bytes).unwrap();
    save(&config, &text);
    save(&plugin, &bytes);
    expect_reloads(&gateway, "ok", 2.0).await;

    // The plugin file changing is one reload too.
    save(&plugin, &std::fs::read(test_plugin("noop_plugin")).unwrap());
    expect_reloads(&gateway, "ok", 3.0).await;
    let frame = one_event(&mut backend, &mut client, "b").await;
    assert_eq!(frame["t"], "NOOP", "{frame}");
    assert_eq!(reloads(&gateway, "error").await, 0.0);
}

#[tokio::test]
async fn a_restart_only_key_is_named_in_a_warning_and_keeps_its_running_value() {
    let mut setup = Setup::sqlite();
    setup.set("sessions", "max_per_user", "2");
    let (_plugin, gateway, mut first, mut backend) =
        start_with(&mut setup, "config_echo_plugin", &echo_config(1)).await;

    // One save: a reloadable change and restart-only ones together.
    let text = std::fs::read_to_string(setup.config_path()).unwrap();
    let edited = text
        .replace("max_per_user = 2", "max_per_user = 1")
        .replace(
            "hot_reload = true",
            "hot_reload = false\nquery_max_rows = 5",
        )
        .replace(
            "[sessions]",
            "[dispatch]\noutcome_retention_s = 60\n\n[sessions]",
        )
        .replace("\"v1\"", "\"v2\"");
    assert_ne!(edited, text);
    save(&setup.config_path(), edited.as_bytes());
    let warning = &gateway
        .wait_log("change only on restart", Duration::from_secs(15))
        .await;
    for key in [
        "sessions.max_per_user",
        "plugins.hot_reload",
        "dispatch.outcome_retention_s",
    ] {
        assert!(warning.contains(key), "{key} not named: {warning}");
    }
    assert!(!warning.contains("query_max_rows"), "{warning}");
    assert!(!warning.contains("greeting"), "{warning}");
    expect_reloads(&gateway, "ok", 2.0).await;
    // The reloadable part is applied...
    let frame = one_event(&mut backend, &mut first, "a").await;
    assert_eq!(frame["d"]["greeting"], "v2", "{frame}");

    // ...and the running values are kept: a second session of user 10 is
    // still admitted (max_per_user 2) and both get the next event...
    let mut second = Client::connect(gateway.client, 10).await;
    let frame = one_event(&mut backend, &mut first, "b").await;
    assert_eq!(frame["d"]["event_id"], "b");
    assert_eq!(second.next().await["d"]["event_id"], "b");
    // ...and hot reload is still on.
    edit_config(&setup, "\"v2\"", "\"v3\"");
    expect_reloads(&gateway, "ok", 3.0).await;
    let frame = one_event(&mut backend, &mut first, "c").await;
    assert_eq!(frame["d"]["greeting"], "v3", "{frame}");
}

#[tokio::test]
async fn a_reload_whose_plugin_fails_changes_nothing() {
    let mut setup = Setup::sqlite();
    let (plugin, gateway, mut client, mut backend) =
        start_with(&mut setup, "config_echo_plugin", &echo_config(1)).await;
    let garbage = plugin.with_file_name("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm").unwrap();

    // One save changes the route's config and points it at a plugin that
    // can't load: neither part is applied.
    let text = std::fs::read_to_string(setup.config_path()).unwrap();
    let broken = text
        .replace("\"v1\"", "\"v2\"")
        .replace("x.wasm", "garbage.wasm");
    save(&setup.config_path(), broken.as_bytes());
    let error = &gateway
        .wait_log("a plugin failed to load", Duration::from_secs(15))
        .await;
    assert!(error.contains("garbage.wasm"), "{error}");
    assert!(
        error.contains("is not a usable plugin component"),
        "{error}"
    );
    let frame = one_event(&mut backend, &mut client, "a").await;
    assert_eq!(frame["d"]["greeting"], "v1", "{frame}");
    assert_eq!(
        gateway
            .metric("otako_config_reload_failures_total", "")
            .await,
        1.0
    );

    // Garbage written over the serving plugin: it keeps serving, one error.
    save(&setup.config_path(), text.as_bytes());
    std::fs::write(&plugin, b"this is not wasm either").unwrap();
    expect_reloads(&gateway, "error", 1.0).await;
    let frame = one_event(&mut backend, &mut client, "b").await;
    assert_eq!(frame["d"]["greeting"], "v1", "{frame}");
    // The same garbage saved again is not retried.
    std::fs::write(&plugin, b"this is not wasm either").unwrap();
    expect_reloads(&gateway, "error", 1.0).await;

    // The next good save is picked up, with the config change.
    save(&plugin, &std::fs::read(test_plugin("noop_plugin")).unwrap());
    edit_config(&setup, "\"v1\"", "\"v2\"");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while one_event(&mut backend, &mut client, &format!("c{n}")).await["t"] != "NOOP" {
        assert!(Instant::now() < deadline, "the fixed plugin never served");
        n += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// Multi-threaded so the client keeps up with the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_flight_during_a_config_swap_finish_on_their_version() {
    let mut setup = Setup::sqlite();
    setup.set("sessions", "outbound_queue", "100000");
    let (_plugin, gateway, client, backend) =
        start_with(&mut setup, "config_echo_plugin", &load_route(1)).await;
    let config = setup.config_path();
    let swap = Swap {
        t: "EVENT_X",
        d: json!({"user_id": "10"}),
        landed: async || reloads(&gateway, "ok").await == 2.0,
        within: Duration::from_secs(15),
        swap: move || {
            let text = std::fs::read_to_string(&config).unwrap();
            save(
                &config,
                text.replace(&echo_config(1), &echo_config(2)).as_bytes(),
            );
        },
        version: |frame| match (
            frame["d"]["greeting"].as_str(),
            frame["d"]["max_content_len"].as_str(),
        ) {
            (Some("v1"), Some("100")) => Some(0),
            (Some("v2"), Some("200")) => Some(1),
            _ => None,
        },
    };
    load_through_swap(client, backend, swap).await;
    expect_reloads(&gateway, "ok", 2.0).await;
}

// Multi-threaded so the client keeps up with the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_flight_during_a_plugin_swap_finish_on_their_version() {
    let mut setup = Setup::sqlite();
    setup.set("sessions", "outbound_queue", "100000");
    let (plugin, gateway, client, backend) =
        start_with(&mut setup, "noop_plugin", &load_route(1)).await;
    let swap = Swap {
        t: "EVENT_X",
        d: json!({"user_id": "10"}),
        landed: async || reloads(&gateway, "ok").await == 2.0,
        within: Duration::from_secs(15),
        swap: move || {
            save(
                &plugin,
                &std::fs::read(test_plugin("config_echo_plugin")).unwrap(),
            )
        },
        version: |frame| match (frame["t"].as_str(), frame["d"]["greeting"].as_str()) {
            (Some("NOOP"), None) => Some(0),
            (Some("CONFIG_ECHO"), Some("v1")) => Some(1),
            _ => None,
        },
    };
    load_through_swap(client, backend, swap).await;
    expect_reloads(&gateway, "ok", 2.0).await;
}

#[tokio::test]
async fn routes_come_and_go_without_a_restart_and_a_broken_config_is_kept_out() {
    let mut setup = Setup::sqlite();
    let (_plugin, gateway, mut client, mut backend) =
        start_with(&mut setup, "noop_plugin", "").await;
    let config = setup.config_path();
    let original = std::fs::read_to_string(&config).unwrap();

    // A broken file mid-edit: the running config keeps serving.
    save(
        &config,
        format!("{original}\n[sessions]\nmax_per_usr = 3\n").as_bytes(),
    );
    let error = &gateway
        .wait_log("the new config is invalid", Duration::from_secs(15))
        .await;
    assert!(error.contains("unknown key 'max_per_usr'"), "{error}");
    assert_eq!(
        one_event(&mut backend, &mut client, "k-1").await["t"],
        "NOOP"
    );

    // Remove the route: NO_ROUTE.
    let without: String = original.split("[[routes]]").next().unwrap().to_owned();
    save(&config, without.as_bytes());
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // And back.
    save(&config, original.as_bytes());
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn many_rapid_saves_settle_on_the_last_version_without_leaking() {
    let mut setup = Setup::sqlite();
    let (plugin, gateway, mut client, mut backend) =
        start_with(&mut setup, "noop_plugin", "").await;
    assert_eq!(one_event(&mut backend, &mut client, "a").await["t"], "NOOP");
    let rss_before = gateway.rss_bytes();
    let versions = [
        std::fs::read(test_plugin("noop_plugin")).unwrap(),
        std::fs::read(test_plugin("config_echo_plugin")).unwrap(),
    ];
    for i in 0..100 {
        save(&plugin, &versions[i % 2]);
        // Paces the saves like a fast build loop (not synchronisation).
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // The last save was config_echo_plugin.
    save(&plugin, &versions[1]);
    // Settles on the last version (within 30 s), and the count then stops
    // moving. Polled: a slow build of an older version may still be under
    // way after the last save, and swap in after a quiet spell.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let count = loop {
        n += 1;
        let before = reloads(&gateway, "ok").await;
        let frame = one_event(&mut backend, &mut client, &format!("c-{n}")).await;
        if frame["t"] == "CONFIG_ECHO" {
            tokio::time::sleep(SETTLE).await;
            let after = reloads(&gateway, "ok").await;
            if after == before {
                break after;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not settled on the last version: {} after {before} reloads",
            frame["t"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(count <= 102.0, "{count} reloads for 101 saves");
    let growth = gateway.rss_bytes().saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024 * 1024,
        "RSS grew by {growth} bytes over {count} reloads"
    );
}
