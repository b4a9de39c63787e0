//! Token revocation (DESIGN §2): `token revoke --user ID` and
//! `POST /admin/revoke` refuse the user's tokens issued up to the revoke's
//! second (401 at the handshake), close its open sessions with 4004, and
//! leave later tokens and other users alone; the revocation lives in the
//! database, so it survives a restart. With `auth.token_ttl_s`, a session
//! ends with 4004 when its token expires.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    DISPATCH_SECRET, Gateway, Setup, WsClient, connect_client, http_request, read_close_within,
    read_json, token_at, wait_metric, ws_refusal,
};
use otako_gateway::token::now_s;

/// Generous bound for the 4004 close DESIGN promises within a second.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

async fn open_session(gw: &Gateway, token: &str) -> WsClient {
    let mut ws = connect_client(gw.client, token).await;
    let hello = read_json(&mut ws).await;
    assert_eq!(hello["t"], "HELLO", "{hello}");
    ws
}

async fn refused(gw: &Gateway, token: &str) -> u16 {
    ws_refusal(gw.client, "/gateway", &[("Authorization", token)]).await
}

/// Waits until the clock is past `second`, so a token minted now is
/// issued after a revoke made in that second.
async fn after_second(second: u64) -> u64 {
    while now_s() <= second {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    now_s()
}

/// `token revoke --user ID` via the CLI; returns the revoke's second.
fn cli_revoke(setup: &Setup, user: &str) -> u64 {
    let out = setup.run(&["token", "revoke", "--user", user]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let want = format!("revoked every token of user {user} issued at or before ");
    let rest = stdout
        .strip_prefix(&want)
        .unwrap_or_else(|| panic!("{stdout}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

/// The open session of the revoked user closes with 4004, the other
/// user's stays; old tokens (including one minted in the revoke's own
/// second) get 401; a token issued in a later second connects.
async fn revoke_end_to_end(setup: &Setup, gw: &Gateway, revoke: impl AsyncFnOnce() -> u64) {
    let before = now_s();
    let mut victim = open_session(gw, &token_at(42, before)).await;
    let mut bystander = open_session(gw, &token_at(43, before)).await;
    let started = Instant::now();

    let revoked_at = revoke().await;
    assert!(revoked_at >= before);
    // Exact at the handshake: refused at once, no waiting for the watcher.
    assert_eq!(refused(gw, &token_at(42, before)).await, 401);
    assert_eq!(refused(gw, &token_at(42, revoked_at)).await, 401);

    assert_eq!(
        read_close_within(&mut victim, CLOSE_WITHIN).await,
        Some(4004)
    );
    eprintln!("4004 after {:?}", started.elapsed());
    wait_metric(gw, "otako_sessions_closed_total", "code=\"4004\"", 1.0).await;
    wait_metric(gw, "otako_sessions_revoked_total", "", 1.0).await;
    wait_metric(gw, "otako_revocations_applied_total", "", 1.0).await;
    // The other user's session is still registered and still answers.
    wait_metric(gw, "otako_sessions_open", "", 1.0).await;
    let quiet = tokio::time::timeout(
        Duration::from_millis(300),
        read_close_within(&mut bystander, CLOSE_WITHIN),
    )
    .await;
    assert!(quiet.is_err(), "user 43's session closed: {quiet:?}");

    let later = after_second(revoked_at).await;
    let _fresh = open_session(gw, &token_at(42, later)).await;
    // The CLI's own `token issue` mints a token that works too.
    let out = setup.run(&["token", "issue", "--user", "42"]);
    assert!(out.status.success());
    let issued = String::from_utf8(out.stdout).unwrap();
    let _cli = open_session(gw, issued.trim()).await;
}

#[tokio::test]
async fn cli_revoke_on_sqlite() {
    let setup = Setup::sqlite();
    let gw = setup.start();
    revoke_end_to_end(&setup, &gw, async || cli_revoke(&setup, "42")).await;
    assert!(gw.log().contains("token revocation applied"));
}

#[tokio::test]
async fn cli_revoke_on_postgres() {
    let setup = Setup::postgres().await;
    let gw = setup.start();
    revoke_end_to_end(&setup, &gw, async || cli_revoke(&setup, "42")).await;
}

async fn admin_revoke(gw: &Gateway, body: &str, auth: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    http_request(gw.admin, "POST", "/admin/revoke", &headers, Some(body)).await
}

#[tokio::test]
async fn admin_revoke_on_sqlite() {
    let setup = Setup::sqlite();
    let gw = setup.start();
    let bearer = format!("Bearer {DISPATCH_SECRET}");
    revoke_end_to_end(&setup, &gw, async || {
        let (status, body) = admin_revoke(&gw, r#"{"user_id":"42"}"#, Some(&bearer)).await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["user_id"], "42", "{body}");
        json["revoked_at"].as_u64().unwrap()
    })
    .await;
}

#[tokio::test]
async fn admin_revoke_needs_the_dispatch_secret_and_a_user_id() {
    let setup = Setup::postgres().await;
    let gw = setup.start();
    let at = now_s();
    let mut ws = open_session(&gw, &token_at(7, at)).await;
    let body = r#"{"user_id":"7"}"#;
    for auth in [None, Some("Bearer wrong"), Some(DISPATCH_SECRET)] {
        let (status, text) = admin_revoke(&gw, body, auth).await;
        assert_eq!(status, 401, "{auth:?}: {text}");
        assert!(text.contains("dispatch secret"), "{text}");
    }
    let bearer = format!("Bearer {DISPATCH_SECRET}");
    for bad in [
        "",
        "not json",
        "{}",
        r#"{"user_id":"abc"}"#,
        r#"{"user_id":0}"#,
        r#"{"user_id":"7","extra":1}"#,
    ] {
        let (status, text) = admin_revoke(&gw, bad, Some(&bearer)).await;
        assert_eq!(status, 400, "{bad:?}: {text}");
        assert!(text.contains("user_id"), "{bad:?}: {text}");
    }
    let (status, _) = http_request(
        gw.admin,
        "GET",
        "/admin/revoke",
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, 405);
    // Nothing was revoked by the refused requests.
    assert_eq!(gw.metric("otako_revocations_applied_total", "").await, 0.0);
    let _second = open_session(&gw, &token_at(7, at)).await;

    // A number is accepted as well as a string.
    let (status, text) = admin_revoke(&gw, r#"{"user_id":7}"#, Some(&bearer)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(read_close_within(&mut ws, CLOSE_WITHIN).await, Some(4004));
    assert_eq!(refused(&gw, &token_at(7, at)).await, 401);
}

#[tokio::test]
async fn a_revocation_survives_a_restart() {
    let setup = Setup::sqlite();
    let gw = setup.start();
    let old = token_at(9, now_s());
    let _ws = open_session(&gw, &old).await;
    let revoked_at = cli_revoke(&setup, "9");
    assert_eq!(refused(&gw, &old).await, 401);
    assert!(gw.stop().success());

    let gw = setup.start();
    assert_eq!(refused(&gw, &old).await, 401);
    let later = after_second(revoked_at).await;
    let _fresh = open_session(&gw, &token_at(9, later)).await;
}

#[tokio::test]
async fn cli_revoke_refuses_a_bad_user_id() {
    let setup = Setup::sqlite();
    for bad in ["abc", "0", "-3", "99999999999999999999"] {
        let out = setup.run(&["token", "revoke", "--user", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--user"), "{bad}: {stderr}");
    }
    // An id the users table doesn't hold is revoked all the same (tokens
    // can be minted for it), with a note.
    setup.write_config();
    let out = setup.run(&["token", "revoke", "--user", "5"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the users table"));
}

#[tokio::test]
async fn with_a_ttl_sessions_end_at_expiry_and_future_tokens_are_refused() {
    let mut setup = Setup::sqlite();
    setup.set("auth", "token_ttl_s", "2");
    let gw = setup.start();
    // Refused beyond the 60 s clock skew; fine within it.
    assert_eq!(refused(&gw, &token_at(3, now_s() + 120)).await, 401);
    let _skewed = open_session(&gw, &token_at(3, now_s() + 30)).await;

    let issued = now_s();
    let mut ws = open_session(&gw, &token_at(4, issued)).await;
    // Valid through second issued+2, refused from issued+3 on.
    assert_eq!(
        read_close_within(&mut ws, Duration::from_secs(8)).await,
        Some(4004)
    );
    assert!(now_s() >= issued + 3, "closed before the token expired");
    assert_eq!(refused(&gw, &token_at(4, issued)).await, 401);
    wait_metric(&gw, "otako_sessions_revoked_total", "", 1.0).await;
}

/// Two gateways on one PostgreSQL database: one revoke refuses the token
/// on both and closes the user's session on each.
#[tokio::test]
async fn a_revocation_reaches_every_node_on_the_database() {
    let mut setup = Setup::postgres().await;
    let first = setup.start();
    setup.set("cluster", "node_id", "2");
    let second = setup.start();
    let old = token_at(11, now_s());
    let mut on_first = open_session(&first, &old).await;
    let mut on_second = open_session(&second, &old).await;

    cli_revoke(&setup, "11");
    assert_eq!(refused(&first, &old).await, 401);
    assert_eq!(refused(&second, &old).await, 401);
    assert_eq!(
        read_close_within(&mut on_first, CLOSE_WITHIN).await,
        Some(4004)
    );
    assert_eq!(
        read_close_within(&mut on_second, CLOSE_WITHIN).await,
        Some(4004)
    );
    for gw in [&first, &second] {
        wait_metric(gw, "otako_revocations_applied_total", "", 1.0).await;
    }
}
