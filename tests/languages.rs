//! The JavaScript and Python plugins end to end: the MESSAGE_CREATE
//! handlers and the misbehaving test plugins, built from source by
//! `scripts/build-lang-plugins.sh` (componentize-js, componentize-py),
//! routed in a real `serve` process and driven through the dispatch socket
//! exactly like the Rust handler; and `dev`'s save-to-live loop for all
//! three languages, one message at a time and under pipelined load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::dispatch::{DispatchClient, Seed};
use common::load::{Swap, load_through_swap};
use common::{Gateway, Setup, plugin, plugin_cache, test_plugin};
use serde_json::{Value, json};

/// A guest language other than Rust, with the route settings the shipped
/// `gateway.toml` recommends for it.
#[derive(Clone, Copy)]
enum Lang {
    Js,
    Python,
}

impl Lang {
    fn handler(self) -> &'static str {
        match self {
            Lang::Js => "message_create_js",
            Lang::Python => "message_create_py",
        }
    }

    fn misbehave(self) -> &'static str {
        match self {
            Lang::Js => "misbehave_js",
            Lang::Python => "misbehave_py",
        }
    }

    /// `timeout_ms`/`memory_mb` as gateway.toml's comments advise.
    fn limits(self) -> &'static str {
        match self {
            Lang::Js => "timeout_ms = 200\nmemory_mb = 64",
            Lang::Python => "timeout_ms = 200\nmemory_mb = 96",
        }
    }
}

/// A setup sharing the compiled-code cache, so only the first test to load
/// a multi-megabyte component pays its compile.
fn setup() -> Setup {
    let mut setup = Setup::sqlite();
    setup.set("plugins", "cache_dir", &format!("\"{}\"", plugin_cache()));
    setup
}

/// `EVENT_MESSAGE_CREATE` on `lang`'s handler and `EVENT_MESSAGE_CREATE_RUST`
/// on the Rust one, over the seed's example data.
async fn both_handlers(lang: Lang) -> (Setup, Gateway) {
    let mut setup = setup();
    setup
        .route(
            "EVENT_MESSAGE_CREATE",
            &plugin(lang.handler()),
            lang.limits(),
        )
        .route("EVENT_MESSAGE_CREATE_RUST", &plugin("message_create"), "");
    let gateway = setup.start();
    Seed::open(&setup).await.example().await;
    (setup, gateway)
}

async fn serves_the_seed_example_like_rust(lang: Lang) {
    let (_setup, gateway) = both_handlers(lang).await;
    let mut alice = Client::connect(gateway.client, 10).await;
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut mallory = Client::connect(gateway.client, 13).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;

    backend
        .send_text(r#"{"t":"EVENT_MESSAGE_CREATE","d":{"id":"3","channel_id":"1"},"op":0,"s":"14","event_id":"1"}"#)
        .await;
    assert_eq!(
        backend.recv_text().await,
        r#"{"t":"EVENT_ROUNDTRIP","event_id":"1","success":true,"op":0,"s":"14"}"#
    );
    let expected = json!({
        "id": "3",
        "channel_id": "1",
        "author": {"id": "10", "name": "alice"},
        "content": "Hello! This is a message from the Otako client!",
        "nonce": "87654GFGDS7544567FD",
        "timestamp": "2026-11-28T00:00:00.000Z",
    });
    for client in [&mut alice, &mut bob] {
        let frame = client.next().await;
        assert_eq!(frame["t"], "MESSAGE_CREATE");
        assert_eq!(frame["d"], expected);
    }

    // The Rust handler sends the very same frame body.
    let ack = backend
        .roundtrip(
            "EVENT_MESSAGE_CREATE_RUST",
            json!({"id": 3, "channel_id": 1}),
            json!("2"),
        )
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(bob.next().await["d"], expected);
    mallory.expect_silence(Duration::from_millis(200)).await;

    // A missing message and bad `d`s fail with the Rust handler's errors.
    for (n, d) in [
        json!({"id": "999", "channel_id": "1"}),
        json!({"id": "3", "channel_id": "9"}),
        json!({"id": "x", "channel_id": "1"}),
        json!({"channel_id": "1"}),
        json!([]),
    ]
    .into_iter()
    .enumerate()
    {
        let theirs = backend
            .roundtrip("EVENT_MESSAGE_CREATE", d.clone(), json!(format!("m{n}")))
            .await;
        let rust = backend
            .roundtrip(
                "EVENT_MESSAGE_CREATE_RUST",
                d.clone(),
                json!(format!("r{n}")),
            )
            .await;
        assert_eq!(theirs["success"], false, "{d}: {theirs}");
        assert_eq!(
            theirs["error"]["code"], rust["error"]["code"],
            "{d}: {theirs} vs {rust}"
        );
        if n < 2 {
            assert_eq!(theirs["error"]["code"], "NOT_FOUND");
            assert_eq!(theirs["error"], rust["error"], "{d}");
        }
    }
    assert!(gateway.stop().success());
}

#[tokio::test]
async fn js_handler_serves_the_seed_example_like_rust() {
    serves_the_seed_example_like_rust(Lang::Js).await;
}

#[tokio::test]
async fn python_handler_serves_the_seed_example_like_rust() {
    serves_the_seed_example_like_rust(Lang::Python).await;
}

/// The error-log record of `event_id`, once the sink has written it.
async fn logged(setup: &Setup, event_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(record) = setup
            .error_log()
            .into_iter()
            .find(|r| r["event_id"] == event_id)
        {
            return record;
        }
        assert!(Instant::now() < deadline, "{event_id} never logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A looping, an endlessly allocating and a throwing guest each fail
/// their event with the right code, and the route serves the next event.
async fn sandbox_holds(lang: Lang) {
    let mut setup = setup();
    // A longer deadline than advised, so the allocating guest always meets
    // its memory limit first, even on a loaded machine (the looping one
    // still meets the deadline).
    setup.route(
        "EVENT_MISBEHAVE",
        &test_plugin(lang.misbehave()),
        &lang
            .limits()
            .replace("timeout_ms = 200", "timeout_ms = 2000"),
    );
    let gateway = setup.start();
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for (what, code) in [
        ("loop", "PLUGIN_TIMEOUT"),
        ("alloc", "PLUGIN_MEMORY"),
        ("throw", "PLUGIN_TRAP"),
        ("nothing", ""),
    ] {
        let ack = backend
            .roundtrip("EVENT_MISBEHAVE", json!({"do": what}), json!(what))
            .await;
        if code.is_empty() {
            assert_eq!(ack["success"], true, "{ack}");
        } else {
            assert_eq!(ack["error"]["code"], code, "{what}: {ack}");
        }
    }
    // The thrown error's stack reaches the log, naming the guest function.
    let record = logged(&setup, "throw").await;
    let text = record.to_string();
    assert!(text.contains(lang.misbehave()), "{text}");
    assert!(text.contains("deeper"), "{text}");
    assert!(gateway.stop().success());
}

#[tokio::test]
async fn js_sandbox_limits_hold() {
    sandbox_holds(Lang::Js).await;
}

#[tokio::test]
async fn python_sandbox_limits_hold() {
    sandbox_holds(Lang::Python).await;
}

/// A project folder for `new-plugin`: the harness's `gateway.toml` plus the
/// real build script, JS/Python toolchain (linked, so nothing reinstalls)
/// and the scripted host the scaffolded unit tests run against.
fn project() -> Setup {
    let setup = setup();
    setup.write_config();
    let root = setup.dir.path();
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    for (link, target) in [
        ("scripts", "scripts"),
        ("plugins/toolchain", "plugins/toolchain"),
        ("plugins/.toolchain", "plugins/.toolchain"),
        ("plugins/testhost", "plugins/testhost"),
        ("wit", "wit"),
    ] {
        std::os::unix::fs::symlink(common::repo().join(target), root.join(link)).unwrap();
    }
    setup
}

#[tokio::test]
async fn new_plugin_scaffolds_builds_and_routes_a_js_handler() {
    let setup = project();
    let config = setup.config_path();
    let before = std::fs::read_to_string(&config).unwrap();
    let out = setup.run(&[
        "new-plugin",
        "typing_js",
        "--event",
        "EVENT_TYPING",
        "--lang",
        "js",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("next: otako-gateway dev"), "{stdout}");
    let after = std::fs::read_to_string(&config).unwrap();
    assert!(after.starts_with(&before), "the old text stays as it was");
    assert!(after.contains("event      = \"EVENT_TYPING\"\nplugin     = \"plugins/typing_js.wasm\"\ntimeout_ms = 200\nmemory_mb  = 64\n"), "{after}");
    let root = setup.dir.path();
    assert!(root.join("plugins/typing_js/handler.js").is_file());

    // The scaffolded unit test passes against the scripted host.
    let unit = std::process::Command::new("node")
        .args(["--test", "plugins/typing_js/"])
        .current_dir(root)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&unit.stdout);
    assert!(unit.status.success(), "{report}");
    assert!(report.contains("# pass 2"), "{report}");

    // The new route loads, and the handler delivers `d` to the channel
    // (started on the edited file: `Setup::start` would rewrite it).
    let gateway = Gateway::spawn(&config, setup.dir.path(), "serve", &[]);
    Seed::open(&setup).await.example().await;
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    let d = json!({"channel_id": "1", "user_id": "10"});
    let ack = backend
        .roundtrip("EVENT_TYPING", d.clone(), json!("t1"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    let frame = bob.next().await;
    assert_eq!((frame["t"].as_str(), &frame["d"]), (Some("TYPING"), &d));
    assert!(gateway.stop().success());

    // A taken name, a routed event or a bad name changes nothing.
    let routed = std::fs::read_to_string(&config).unwrap();
    for (args, says) in [
        (
            vec!["new-plugin", "typing_js", "--lang", "js"],
            "already exists",
        ),
        (
            vec!["new-plugin", "other", "--event", "EVENT_TYPING"],
            "already routed",
        ),
        (vec!["new-plugin", "Bad-Name"], "invalid plugin name"),
        (
            vec!["new-plugin", "ok_name", "--event", "lower"],
            "invalid event name",
        ),
        (vec!["new-plugin", "sdk"], "reserved"),
    ] {
        let out = setup.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), routed);
    }
    assert!(!root.join("plugins/other").exists());
    assert!(!root.join("plugins/ok_name").exists());
}

/// Copies a folder, leaving out build outputs and toolchains. A file that
/// is already there with the same bytes is left alone, so its timestamp
/// keeps a cargo build over it fresh.
fn copy_sources(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if ["target", ".toolchain", "wasm", "node_modules"].contains(&name.as_ref())
            || name.ends_with(".wasm")
        {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_sources(&entry.path(), &to.join(&*name));
        } else {
            write_if_changed(&to.join(&*name), &std::fs::read(entry.path()).unwrap());
        }
    }
}

/// Writes `bytes` to `path` unless it holds them already.
fn write_if_changed(path: &std::path::Path, bytes: &[u8]) {
    if std::fs::read(path).ok().as_deref() != Some(bytes) {
        std::fs::write(path, bytes).unwrap();
    }
}

#[test]
fn new_plugin_adds_a_rust_crate_to_the_workspace() {
    let setup = setup();
    setup.write_config();
    let root = setup.dir.path();
    copy_sources(&common::repo().join("plugins"), &root.join("plugins"));
    std::os::unix::fs::symlink(common::repo().join("wit"), root.join("wit")).unwrap();
    // Shares the repository's guest build cache: only the new crate compiles.
    std::os::unix::fs::symlink(
        common::repo().join("plugins/target"),
        root.join("plugins/target"),
    )
    .unwrap();
    let out = setup.run(&["new-plugin", "channel_typing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let members = std::fs::read_to_string(root.join("plugins/Cargo.toml")).unwrap();
    assert!(members.contains("    \"channel_typing\",\n]"), "{members}");
    assert!(root.join("plugins/channel_typing.wasm").is_file());
    let config = std::fs::read_to_string(setup.config_path()).unwrap();
    assert!(
        config.contains("event      = \"EVENT_CHANNEL_TYPING\"\nplugin     = \"plugins/channel_typing.wasm\"\ntimeout_ms = 50\nmemory_mb  = 16\n"),
        "{config}"
    );
    let check = setup.run(&["check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// The `plugin loaded` log records (JSON log format) by route event.
fn loaded_pools(gateway: &Gateway) -> std::collections::HashMap<String, Value> {
    gateway
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["fields"]["message"] == "plugin loaded")
        .map(|r| {
            (
                r["fields"]["event"].as_str().unwrap().to_owned(),
                r["fields"].clone(),
            )
        })
        .collect()
}

/// 42 Rust routes plus the JS and Python handlers (the pool used to refuse
/// more than 31 routes) load and serve; the routes share the instance pool
/// and the big JS/Python runtimes keep fewer idle instances than Rust.
#[tokio::test]
async fn many_routes_and_big_components_share_the_instance_pool() {
    let mut setup = setup();
    for n in 0..42 {
        setup.route(
            &format!("EVENT_MESSAGE_CREATE_{n}"),
            &plugin("message_create"),
            "",
        );
    }
    for lang in [Lang::Js, Lang::Python] {
        setup.route(
            &format!("EVENT_{}", lang.handler().to_uppercase()),
            &plugin(lang.handler()),
            lang.limits(),
        );
    }
    let gateway = setup.start_verb_env("serve", &[("OTAKO_LOG_FORMAT", "json")]);
    Seed::open(&setup).await.example().await;
    let pools = loaded_pools(&gateway);
    assert_eq!(pools.len(), 44, "{pools:?}");
    // 44 routes share half the 1000-instance pool: 11 live each.
    let rust = &pools["EVENT_MESSAGE_CREATE_41"];
    assert_eq!(
        (rust["max_live"].as_u64(), rust["max_idle"].as_u64()),
        (Some(11), Some(11)),
        "{rust}"
    );
    for lang in [Lang::Js, Lang::Python] {
        let pool = &pools[&format!("EVENT_{}", lang.handler().to_uppercase())];
        let (kib, idle) = (
            pool["instance_kib"].as_u64().unwrap(),
            pool["max_idle"].as_u64().unwrap(),
        );
        // 64 MiB of starting memory at most: 9–12 MiB runtimes keep 5–7.
        assert!(kib > 8 * 1024, "{pool}");
        assert_eq!(idle, 64 * 1024 / kib, "{pool}");
        assert!(idle < 11, "{pool}");
    }

    let mut bob = Client::connect(gateway.client, 11).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for (n, t) in [
        "EVENT_MESSAGE_CREATE_41",
        "EVENT_MESSAGE_CREATE_JS",
        "EVENT_MESSAGE_CREATE_PY",
    ]
    .into_iter()
    .enumerate()
    {
        let ack = backend
            .roundtrip(
                t,
                json!({"id": "3", "channel_id": "1"}),
                json!(n.to_string()),
            )
            .await;
        assert_eq!(ack["success"], true, "{t}: {ack}");
        assert_eq!(bob.next().await["d"]["id"], "3");
    }
    assert!(gateway.stop().success());
}

/// `dev`'s swap under load: `dev` routes `EVENT_MESSAGE_CREATE` to `wasm`
/// (with `route`'s lines: a deadline no busy machine reaches), and
/// thousands of events about one seeded message are pipelined on its
/// dispatch listener while the test saves an edit to `source` that renames
/// the delivered frame (`delivered`, the text naming `MESSAGE_CREATE`).
/// Every event is acked successfully and delivered exactly once, by the old
/// or the new code, and the new code serves the tail.
///
/// A JS/Python handler (`lang`) swaps twice: to its saved source through
/// the dev loader, then to the component componentize built; the load runs
/// until the second, and the first must come before the build ends.
async fn dev_swaps_under_load(
    mut setup: Setup,
    wasm: &std::path::Path,
    route: &str,
    source: &std::path::Path,
    delivered: &str,
    lang: bool,
) {
    setup.set("sessions", "outbound_queue", "100000");
    setup.route("EVENT_MESSAGE_CREATE", wasm, route);
    let dev = setup.start_verb("dev");
    if lang {
        wait_dev_loader(&dev).await;
    }
    // `dev` seeded users 1 and 2 in channel 1.
    Seed::open(&setup)
        .await
        .message(3, 1, 1, "under load", Some("n3"))
        .await;
    let bob = Client::connect(dev.client, 2).await;
    let backend = DispatchClient::connect(dev.dispatch).await;

    // A new name on every run: the builds skip sources they have built.
    let renamed = format!("MESSAGE_SAVED_{}", rand::random::<u32>());
    let text = std::fs::read_to_string(source).unwrap();
    let edited = text.replace(delivered, &delivered.replace("MESSAGE_CREATE", &renamed));
    assert_ne!(text, edited);
    let label = format!(
        "plugin=\"{}\",result=\"ok\"",
        wasm.file_name().unwrap().to_string_lossy()
    );
    let saved_at = std::cell::Cell::new(0.0);
    let swap = Swap {
        t: "EVENT_MESSAGE_CREATE",
        d: json!({"id": "3", "channel_id": "1"}),
        swap: || {
            saved_at.set(time_of_day());
            std::fs::write(source, edited).unwrap()
        },
        landed: async || {
            if lang {
                dev.log()
                    .contains("dev: the built component serves the saved source now")
            } else {
                dev.metric("otako_plugin_reloads_total", &label).await == 2.0
            }
        },
        within: Duration::from_secs(180),
        version: |frame| {
            let t = frame["t"].as_str()?;
            (frame["d"]["id"] == "3").then_some(())?;
            if t == "MESSAGE_CREATE" {
                Some(0)
            } else {
                t.starts_with("MESSAGE_SAVED_").then_some(1)
            }
        },
    };
    let took = load_through_swap(bob, backend, swap).await;
    let log = dev.log();
    // When the new code took over: the log line written once it did.
    let swapped = if lang {
        "dev: saved source serving through the dev loader"
    } else {
        "hot reload: routes and plugins swapped in"
    };
    let swapped = log.lines().find(|l| l.contains(swapped)).expect(swapped);
    let serving = (log_time_of_day(swapped) - saved_at.get()).rem_euclid(86_400.0);
    let file = source.file_name().unwrap().to_string_lossy();
    println!(
        "save -> new code serving ({file}, under load): {serving:.2} s; save -> {} serving: {took:.1?}",
        if lang { "the built component" } else { "it" },
    );
    let steps: Vec<&str> = log
        .lines()
        .filter(|l| {
            [
                "dev: saved source serving",
                "dev: plugins rebuilt",
                "dev: the built component serves",
                "plugin compiled",
                "plugin loaded",
            ]
            .iter()
            .any(|step| l.contains(step))
        })
        .collect();
    println!("{}", steps.join("\n"));
    let rebuilt = steps
        .iter()
        .position(|l| l.contains("dev: plugins rebuilt"));
    assert!(rebuilt.is_some(), "{log}");
    if lang {
        // The saved source served before componentize was done with it.
        let served = steps
            .iter()
            .position(|l| l.contains("dev: saved source serving through the dev loader"));
        assert!(served.is_some_and(|s| Some(s) < rebuilt), "{log}");
    }
    assert!(dev.stop().success());
}

/// Seconds since midnight, UTC, now.
fn time_of_day() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (now.as_secs() % 86_400) as f64 + f64::from(now.subsec_nanos()) / 1e9
}

/// Seconds since midnight, UTC, of a log line's timestamp (it starts
/// `2026-12-03T17:28:29.421391Z`, maybe after a colour code).
fn log_time_of_day(line: &str) -> f64 {
    let clock = &line[line.find('T').unwrap() + 1..];
    let clock = &clock[..clock.find('Z').unwrap()];
    clock
        .split(':')
        .map(|part| part.parse::<f64>().unwrap())
        .fold(0.0, |seconds, part| seconds * 60.0 + part)
}

/// Saves go live through the dev loader once `dev` has it compiled (the
/// first run compiles a JS/Python runtime: tens of seconds).
async fn wait_dev_loader(dev: &Gateway) {
    dev.wait_log("dev: dev loader ready", Duration::from_secs(300))
        .await;
}

/// A `dev` project routing a copy of `lang`'s MESSAGE_CREATE handler:
/// the project, the routed `.wasm`, the handler's source file, the route's
/// lines (a deadline no busy machine reaches) and the source's text naming
/// the delivered event.
fn lang_project(
    lang: Lang,
) -> (
    Setup,
    std::path::PathBuf,
    std::path::PathBuf,
    String,
    &'static str,
) {
    let setup = project();
    let root = setup.dir.path().to_path_buf();
    let name = format!("loaded_{}", lang.handler());
    let source = root.join("plugins").join(&name);
    copy_sources(
        &common::repo().join("plugins").join(lang.handler()),
        &source,
    );
    let wasm = root.join(format!("plugins/{name}.wasm"));
    std::fs::copy(plugin(lang.handler()), &wasm).unwrap();
    let (file, delivered) = match lang {
        Lang::Js => ("handler.js", "event: \"MESSAGE_CREATE\","),
        Lang::Python => ("app.py", "event=\"MESSAGE_CREATE\","),
    };
    let route = lang
        .limits()
        .replace("timeout_ms = 200", "timeout_ms = 5000");
    (setup, wasm, source.join(file), route, delivered)
}

/// [`dev_swaps_under_load`] for a JavaScript or Python handler: a copy of
/// the MESSAGE_CREATE handler in the `dev` project, served from its saved
/// `handler.js`/`app.py` through the dev loader, then rebuilt by
/// `scripts/build-lang-plugins.sh`.
async fn dev_swaps_a_lang_handler_under_load(lang: Lang) {
    let (setup, wasm, source, route, delivered) = lang_project(lang);
    dev_swaps_under_load(setup, &wasm, &route, &source, delivered, true).await;
}

/// A save that does not load (a JavaScript syntax error, a Python module
/// that raises on import) changes nothing: `dev` says why, and the running
/// version keeps serving, as it does when the componentize build of the
/// same save fails after it.
async fn dev_keeps_serving_through_a_broken_save(lang: Lang) {
    let (mut setup, wasm, source, route, _) = lang_project(lang);
    setup.route("EVENT_MESSAGE_CREATE", &wasm, &route);
    let dev = setup.start_verb("dev");
    wait_dev_loader(&dev).await;
    Seed::open(&setup)
        .await
        .message(3, 1, 1, "still served", Some("n3"))
        .await;
    let mut bob = Client::connect(dev.client, 2).await;
    let mut backend = DispatchClient::connect(dev.dispatch).await;
    let (broken, why) = match lang {
        Lang::Js => ("\nexport function handle(event {\n", "SyntaxError"),
        Lang::Python => (
            "\nraise RuntimeError(\"broken on purpose\")\n",
            "RuntimeError: broken on purpose",
        ),
    };
    let text = std::fs::read_to_string(&source).unwrap();
    // A new suffix on every run: the build skips sources it has built.
    let comment = match lang {
        Lang::Js => "//",
        Lang::Python => "#",
    };
    let marker = format!("\n{comment} {}\n", rand::random::<u32>());
    std::fs::write(&source, format!("{text}{marker}{broken}")).unwrap();
    let refused = dev
        .wait_log(
            "dev: the saved source does not load",
            Duration::from_secs(60),
        )
        .await;
    assert!(refused.contains(why), "{refused}");
    let served = async |backend: &mut DispatchClient, bob: &mut Client, id: &str| {
        let ack = backend
            .roundtrip(
                "EVENT_MESSAGE_CREATE",
                json!({"id": "3", "channel_id": "1"}),
                json!(id),
            )
            .await;
        assert_eq!(ack["success"], true, "{ack}");
        let frame = bob.next().await;
        assert_eq!(frame["t"], "MESSAGE_CREATE", "{frame}");
        assert_eq!(frame["d"]["content"], "still served", "{frame}");
    };
    served(&mut backend, &mut bob, "after-save").await;
    dev.wait_log("dev: plugin build failed", Duration::from_secs(180))
        .await;
    // New connections: while the build ran, the first ones were silent for
    // longer than a backend may be (no PING within ping_timeout_ms closes
    // it) and unread past a client's heartbeat.
    let mut backend = DispatchClient::connect(dev.dispatch).await;
    let mut bob = Client::connect(dev.client, 2).await;
    served(&mut backend, &mut bob, "after-build").await;
    assert!(
        !dev.log().contains("dev: saved source serving"),
        "{}",
        dev.log()
    );
    assert!(dev.stop().success());
}

#[tokio::test]
async fn dev_keeps_serving_through_a_broken_js_save() {
    dev_keeps_serving_through_a_broken_save(Lang::Js).await;
}

#[tokio::test]
async fn dev_keeps_serving_through_a_broken_python_save() {
    dev_keeps_serving_through_a_broken_save(Lang::Python).await;
}

// Multi-threaded so the client keeps up with the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_swaps_a_saved_js_handler_under_load() {
    dev_swaps_a_lang_handler_under_load(Lang::Js).await;
}

// Multi-threaded so the client keeps up with the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_swaps_a_saved_python_handler_under_load() {
    dev_swaps_a_lang_handler_under_load(Lang::Python).await;
}

/// [`dev_swaps_under_load`] for the Rust handler: `dev` routes
/// `plugins/message_create.wasm` of a plugins workspace holding the SDK and
/// the handler, and rebuilds it with an incremental cargo build when its
/// `src/lib.rs` is saved. The workspace sits at a fixed place under
/// `target/` and keeps its cargo target folder between runs (the first run
/// builds the guest dependencies cold, for minutes; later ones only the
/// handler), since cargo rebuilds what it finds at a new path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_swaps_a_saved_rust_handler_under_load() {
    let setup = setup();
    let repo = common::repo();
    let project = repo.join("target/dev-rust-project");
    let plugins = project.join("plugins");
    for krate in ["sdk", "messages", "message_create"] {
        copy_sources(&repo.join("plugins").join(krate), &plugins.join(krate));
    }
    let manifest = std::fs::read_to_string(repo.join("plugins/Cargo.toml")).unwrap();
    let members = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .unwrap()
        .0;
    let manifest = manifest.replace(
        members,
        "\n    \"sdk\",\n    \"messages\",\n    \"message_create\",\n",
    );
    write_if_changed(&plugins.join("Cargo.toml"), manifest.as_bytes());
    write_if_changed(
        &plugins.join("Cargo.lock"),
        &std::fs::read(repo.join("plugins/Cargo.lock")).unwrap(),
    );
    if !project.join("wit").exists() {
        std::os::unix::fs::symlink(repo.join("wit"), project.join("wit")).unwrap();
    }
    // Warm the build before `dev` starts (cold, the first time: minutes),
    // with the very command `dev` runs on a save.
    let built = Instant::now();
    let status = std::process::Command::new("cargo")
        .args(["build", "--quiet", "--target", "wasm32-wasip2"])
        .args(["--profile", "dev-plugin"])
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(plugins.join("target"))
        .status()
        .unwrap();
    assert!(status.success());
    println!("warm-up cargo build: {:.1?}", built.elapsed());
    // Missing: `dev` puts the built component in place.
    let wasm = plugins.join("message_create.wasm");
    let _ = std::fs::remove_file(&wasm);
    dev_swaps_under_load(
        setup,
        &wasm,
        "timeout_ms = 5000",
        &plugins.join("message_create/src/lib.rs"),
        "\"MESSAGE_CREATE\",",
        false,
    )
    .await;
}

/// Resident memory per idle instance, by language (the BENCHMARKS.md
/// figure): one route, warmed one event at a time (one instance), then a
/// pipelined burst until the route has started at least `max_idle`
/// instances (seen in the log), so afterwards exactly `max_idle` are
/// parked. RSS after minus before, over the instances added. Run with
/// `cargo test --test languages idle_instance_memory -- --nocapture`.
#[tokio::test]
async fn idle_instance_memory() {
    for (name, limits) in [
        ("message_create", ""),
        ("message_create_js", Lang::Js.limits()),
        ("message_create_py", Lang::Python.limits()),
    ] {
        // PostgreSQL: a query waits on the network, so pipelined events
        // overlap in the plugin and need instances of their own.
        let mut setup = Setup::postgres().await;
        setup.set("plugins", "cache_dir", &format!("\"{}\"", plugin_cache()));
        setup.route("EVENT_MESSAGE_CREATE", &plugin(name), limits);
        let gateway = setup.start_verb_env("serve", &[("OTAKO_LOG_FORMAT", "json")]);
        Seed::open(&setup).await.example().await;
        let max_idle = loaded_pools(&gateway)["EVENT_MESSAGE_CREATE"]["max_idle"]
            .as_u64()
            .unwrap();
        let mut backend = DispatchClient::connect(gateway.dispatch).await;
        let d = json!({"id": "3", "channel_id": "1"});
        for n in 0..200 {
            let ack = backend
                .roundtrip("EVENT_MESSAGE_CREATE", d.clone(), json!(format!("w{n}")))
                .await;
            assert_eq!(ack["success"], true, "{ack}");
        }
        let before = gateway.rss_bytes();
        let mut burst = 0;
        // Every instance the bursts add is logged once; the prewarmed one
        // is not. Once the pool has had `max_idle`, they all stay parked.
        let started = || {
            gateway
                .log()
                .matches("no idle instance; starting one")
                .count() as u64
        };
        while started() + 1 < max_idle {
            for n in 0..200 {
                backend
                    .event(
                        "EVENT_MESSAGE_CREATE",
                        d.clone(),
                        json!(format!("b{burst}-{n}")),
                        json!("1"),
                    )
                    .await;
            }
            let acks = backend.acks(200).await;
            assert!(acks.values().all(|a| a["success"] == true));
            burst += 1;
            assert!(
                burst < 50,
                "the bursts started {} instances, not {max_idle}",
                started()
            );
        }
        let after = gateway.rss_bytes();
        let added = max_idle.saturating_sub(1).max(1);
        println!(
            "{name}: max_idle {max_idle}, RSS {:.1} -> {:.1} MiB, {:.2} MiB per idle instance",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            after.saturating_sub(before) as f64 / 1048576.0 / added as f64
        );
        assert!(gateway.stop().success());
    }
}
