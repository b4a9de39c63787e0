//! The binary's verbs, config errors, migrations on both databases, the
//! admin endpoints and graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::dispatch::Seed;
use common::{Setup, TOKEN_SECRET, bin, repo};
use otako_gateway::token::TokenKey;
use std::process::Command;
use std::time::Duration;

/// The one-line reason a verb that must fail gave: its last line on
/// stderr (log lines may come before it).
fn failure(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it succeeded: {stderr}");
    let reason = stderr.trim().lines().last().unwrap_or_default().to_owned();
    assert!(reason.starts_with("otako-gateway: "), "{stderr}");
    reason
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = Command::new(bin())
        .arg("--config")
        .arg(repo().join("gateway.toml"))
        .arg("check")
        .env_remove("OTAKO_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn check_rejects_an_unknown_key_naming_it_and_its_line() {
    let mut setup = Setup::sqlite();
    setup.set("sessions", "max_per_usr", "3");
    let path = setup.write_config();
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("max_per_usr"))
        .unwrap()
        + 1;
    let out = setup.run(&["check"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:{line}: unknown key 'max_per_usr' in [sessions]",
        path.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one-line reason: {stderr}"
    );
}

#[test]
fn bad_values_and_missing_secrets_are_errors() {
    let mut setup = Setup::sqlite();
    setup.set("sessions", "on_limit", "\"drop_newest\"");
    setup.write_config();
    let out = setup.run(&["check"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gateway.toml:"), "{stderr}");
    assert!(stderr.contains("drop_newest"), "{stderr}");

    let mut setup = Setup::sqlite();
    setup.set("auth", "token_secret", "\"\"");
    setup.write_config();
    let out = setup.run(&["serve"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.token_secret is not set"), "{stderr}");
}

#[test]
fn token_issue_prints_a_verifiable_token() {
    let setup = Setup::sqlite();
    setup.write_config();
    let out = setup.run(&["token", "issue", "--user", "318109820710420480"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let key = TokenKey::new(TOKEN_SECRET.as_bytes(), None);
    let user = key
        .verify(token.trim(), otako_gateway::token::now_s())
        .unwrap();
    assert_eq!(user.get(), 318109820710420480);

    let out = setup.run(&["token", "issue", "--user", "0"]);
    assert!(!out.status.success());
}

async fn tables(setup: &Setup) -> Vec<String> {
    match &setup.db {
        common::TestDb::Sqlite(path) => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            rows.into_iter().map(|r| r.0).collect()
        }
        common::TestDb::Postgres { schema } => {
            let pool = sqlx::PgPool::connect(common::PG_ADMIN_URL).await.unwrap();
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
            )
            .bind(schema)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.into_iter().map(|r| r.0).collect()
        }
    }
}

async fn assert_migrates(setup: Setup) {
    setup.write_config();
    let out = setup.run(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = tables(&setup).await;
    for table in [
        "channel_members",
        "channels",
        "dispatch_outbox",
        "event_errors",
        "event_outcomes",
        "messages",
        "users",
    ] {
        assert!(
            names.iter().any(|n| n == table),
            "{table} missing from {names:?}"
        );
    }
    // Applying again is a no-op, not an error.
    let out = setup.run(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn migrations_apply_on_sqlite() {
    assert_migrates(Setup::sqlite()).await;
}

#[tokio::test]
async fn migrations_apply_on_postgres() {
    assert_migrates(Setup::postgres().await).await;
}

#[tokio::test]
async fn admin_endpoints_and_graceful_shutdown() {
    let setup = Setup::sqlite();
    let gateway = setup.start();
    assert_eq!(
        gateway.admin_get("/healthz").await,
        (200, "ok\n".to_owned())
    );
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = gateway.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("otako_sessions_open"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert_eq!(gateway.admin_get("/nope").await.0, 404);
    let status = gateway.stop();
    assert!(status.success(), "exit status {status:?}");
}

/// An `api.listen` another socket holds stops `dev` with that listener
/// named; it used to run on without its API, printing nothing, until
/// stopped.
#[test]
fn a_taken_api_port_stops_dev_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut setup = Setup::sqlite();
    setup.set("api", "listen", &format!("\"{addr}\""));
    setup.write_config();
    let err = failure(&setup.run_expecting_exit(&["dev"], Duration::from_secs(60)));
    assert!(
        err.contains(&format!("cannot listen on {addr} (api.listen): ")) && err.contains("in use"),
        "{err}"
    );
}

#[test]
fn a_missing_or_bad_tls_file_is_named_by_check_and_every_verb() {
    let mut setup = Setup::sqlite();
    let cert = common::tls::TestCert::new(setup.dir.path());
    let missing = setup.dir.path().join("missing.pem");
    setup.set("server", "tls_cert", &format!("\"{}\"", missing.display()));
    setup.set("server", "tls_key", &format!("\"{}\"", cert.key.display()));
    setup.write_config();
    let expected = format!(
        "in [server]: tls_cert/tls_key: {}: cannot read",
        missing.display()
    );
    for verb in ["check", "api", "serve"] {
        let err = failure(&setup.run_expecting_exit(&[verb], Duration::from_secs(30)));
        assert!(err.contains(&expected), "{verb}: {err}");
    }

    // A file that is there but holds no key; then a CA file that is no PEM.
    let garbage = setup.dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").unwrap();
    setup.set(
        "server",
        "tls_cert",
        &format!("\"{}\"", cert.cert.display()),
    );
    setup.set("api", "tls_cert", &format!("\"{}\"", cert.cert.display()));
    setup.set("api", "tls_key", &format!("\"{}\"", garbage.display()));
    setup.set("api", "dispatch_ca", &format!("\"{}\"", garbage.display()));
    setup.write_config();
    let err = failure(&setup.run(&["check"]));
    assert!(
        err.contains(&format!(
            "in [api]: tls_cert/tls_key: {}: no PEM private key",
            garbage.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "in [api]: dispatch_ca: {}: no PEM certificate",
            garbage.display()
        )),
        "{err}"
    );

    // Right files: wss:// and https:// configs check out.
    setup.set("api", "tls_key", &format!("\"{}\"", cert.key.display()));
    setup.set(
        "api",
        "dispatch_ca",
        &format!("\"{}\"", cert.cert.display()),
    );
    setup.set("api", "dispatch_url", "\"wss://127.0.0.1:7071/dispatch\"");
    setup.set("server", "dispatch_tls", "true");
    setup.write_config();
    let out = setup.run(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cluster_keys_are_checked_and_cluster_mode_needs_postgres() {
    let mut setup = Setup::sqlite();
    setup.set("cluster", "node_id", "1023");
    setup.set("cluster", "subject_prefix", "\"otako-test\"");
    setup.set("cluster", "lease_ms", "5000");
    setup.write_config();
    let out = setup.run(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    setup.set("cluster", "node_id", "1024");
    setup.write_config();
    let err = failure(&setup.run(&["check"]));
    assert!(
        err.contains("in [cluster]: node_id 1024 is out of range (0-1023)"),
        "{err}"
    );

    setup.set("cluster", "node_id", "1");
    setup.set("cluster", "nats_url", "\"nats://127.0.0.1:4222\"");
    setup.write_config();
    let err = failure(&setup.run(&["check"]));
    assert!(err.contains("needs PostgreSQL"), "{err}");
    assert!(
        err.contains("cluster.nats_url") && err.contains("database.url"),
        "{err}"
    );
}

/// Two `api` processes with one node id on one database: the second
/// refuses to start, naming the first; another node id runs alongside;
/// the id is free at once after a clean stop or a crash of its holder on
/// this host, and a holder elsewhere keeps it until its lease expires.
async fn assert_node_ids_are_leased(mut setup: Setup) {
    // Renewed every third of it: 3 s leaves a loaded machine room for a
    // late renewal without the id changing hands.
    const LEASE_MS: u64 = 3000;
    setup.set("cluster", "node_id", "7");
    setup.set("cluster", "lease_ms", &LEASE_MS.to_string());
    let first = setup.start_verb("api");
    let err = failure(&setup.run_expecting_exit(&["api"], Duration::from_secs(30)));
    let holder = format!("by pid {} on ", first.pid());
    assert!(err.contains("cluster.node_id 7 is in use"), "{err}");
    assert!(err.contains(&holder), "{err}");
    assert!(err.contains(" since 20"), "{err}");

    // Renewed, not just taken: still refused after the lease time.
    std::thread::sleep(Duration::from_millis(LEASE_MS * 3 / 2));
    let err = failure(&setup.run_expecting_exit(&["api"], Duration::from_secs(30)));
    assert!(err.contains(&holder), "{err}");

    setup.set("cluster", "node_id", "8");
    let other = setup.start_verb("api");
    assert!(other.stop().success());

    setup.set("cluster", "node_id", "7");
    assert!(first.stop().success());
    let second = setup.start_verb("api");
    second.kill();
    let third = setup.start_verb("api");
    assert!(third.stop().success());

    // A holder on another host: refused until its lease has expired.
    let seed = Seed::open(&setup).await;
    seed.execute("INSERT INTO id_nodes (node_id, host, pid, since_ms, expires_at_ms) VALUES (9, 'elsewhere', 1, 0, 9999999999999)").await;
    setup.set("cluster", "node_id", "9");
    setup.write_config();
    let err = failure(&setup.run_expecting_exit(&["api"], Duration::from_secs(30)));
    assert!(
        err.contains("by pid 1 on elsewhere since 1970-01-01"),
        "{err}"
    );
    seed.execute("UPDATE id_nodes SET expires_at_ms = 0 WHERE node_id = 9")
        .await;
    let fourth = setup.start_verb("api");
    assert!(fourth.stop().success());
}

#[tokio::test]
async fn a_second_api_with_the_same_node_id_refuses_to_start_on_sqlite() {
    assert_node_ids_are_leased(Setup::sqlite()).await;
}

#[tokio::test]
async fn a_second_api_with_the_same_node_id_refuses_to_start_on_postgres() {
    assert_node_ids_are_leased(Setup::postgres().await).await;
}
