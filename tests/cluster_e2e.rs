//! Cluster mode (DESIGN §9) end to end, with real processes: `serve`
//! nodes on one PostgreSQL schema and NATS JetStream, the reference API
//! posting through one of them, and clients spread over all of them.
//! Messages posted through the API reach every member on every node once,
//! in post order but for posts the backend had to re-send; a node killed
//! with SIGKILL mid-stream costs the other nodes' clients no event and
//! frees its users' slots within `lease_ms`;
//! NATS killed and restarted mid-stream fails events with
//! `BUS_UNAVAILABLE` (never a false success), the nodes recover by
//! themselves, and once the backend has re-sent the failures every client
//! has every event exactly once, on the sessions it had all along.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::call;
use common::client::Client;
use common::cluster::{LEASE_MS, TestCluster, try_session};
use common::dispatch::{DispatchClient, Seed, echo_event};
use common::nats::NatsServer;
use common::{WsClient, WsMessage, eventually, test_plugin};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_posted_through_the_api_reach_every_member_on_three_nodes_once_in_post_order() {
    const POSTS: usize = 30;
    let mut cluster = TestCluster::for_events(LEASE_MS).await;
    let nodes = [cluster.start(1), cluster.start(2), cluster.start(3)];
    // The reference API keeps one dispatch connection, to one node (as a
    // backend behind a load balancer would); its message ids are minted
    // under a node id of its own.
    let dispatch_url = format!("\"ws://{}/dispatch\"", nodes[0].dispatch);
    cluster
        .setup
        .set("api", "dispatch_url", &dispatch_url)
        .set("cluster", "node_id", "9");
    let backend = cluster.setup.start_verb("api");
    let api = backend.api.unwrap();

    // Eight members and an outsider, made through the API.
    let mut users = Vec::new();
    for i in 0..9 {
        let body = json!({"name": format!("user{i}")}).to_string();
        let (status, user) = call(api, "POST", "/users", None, Some(&body)).await;
        assert_eq!(status, 201, "{user}");
        users.push(user);
    }
    let outsider = users.pop().unwrap();
    let members: Vec<&Value> = users[1..].iter().map(|u| &u["id"]).collect();
    let body = json!({"name": "general", "members": members}).to_string();
    let (status, channel) = call(
        api,
        "POST",
        "/channels",
        users[0]["token"].as_str(),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{channel}");
    let channel = channel["id"].as_str().unwrap().to_owned();

    // Two or three members a node; member 0 on two nodes; the outsider too.
    let uid = |user: &Value| user["id"].as_str().unwrap().parse::<u64>().unwrap();
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        clients.push((i % 3, Client::connect(nodes[i % 3].client, uid(user)).await));
    }
    clients.push((1, Client::connect(nodes[1].client, uid(&users[0])).await));
    let mut outsider = Client::connect(nodes[2].client, uid(&outsider)).await;

    let started = Instant::now();
    let mut posted = Vec::new();
    for i in 0..POSTS {
        let author = &users[i % users.len()];
        let body = json!({"content": format!("message {i}"), "nonce": format!("n{i}")});
        let (status, message) = call(
            api,
            "POST",
            &format!("/channels/{channel}/messages"),
            author["token"].as_str(),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 201, "{message}");
        posted.push(message);
    }
    // The outbox says which posts took more than one dispatch attempt (a
    // timeout or a failure under load): the backend re-sent those later,
    // so they may arrive after posts made after them. Every other post
    // reached the gateway in post order and must arrive in that order.
    let attempts = outbox_attempts(&cluster.setup.db.url(), POSTS).await;
    let retried: HashSet<&str> = posted
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .filter(|id| attempts[*id] > 1)
        .collect();
    if !retried.is_empty() {
        eprintln!("posts dispatched more than once (re-sent by the backend): {retried:?}");
    }
    let first_time: Vec<&Value> = posted
        .iter()
        .filter(|m| !retried.contains(m["id"].as_str().unwrap()))
        .collect();
    for (node, client) in &mut clients {
        let user = client.hello["d"]["user_id"].clone();
        let at = format!("node {} user {user}", *node + 1);
        let mut seen = Vec::new();
        for i in 0..POSTS {
            let frame = client.next().await;
            assert_eq!(frame["t"], "MESSAGE_CREATE", "{at} frame {i}: {frame}");
            assert_eq!(frame["s"], i + 1, "{at} frame {i}: {frame}");
            seen.push(frame["d"].clone());
        }
        let in_order: Vec<&Value> = seen
            .iter()
            .filter(|m| !retried.contains(m["id"].as_str().unwrap_or_default()))
            .collect();
        assert_eq!(
            in_order, first_time,
            "{at}: first-attempt posts in post order"
        );
        let mut ids: Vec<&str> = seen.iter().map(|m| m["id"].as_str().unwrap()).collect();
        let mut expected: Vec<&str> = posted.iter().map(|m| m["id"].as_str().unwrap()).collect();
        ids.sort_unstable();
        expected.sort_unstable();
        assert_eq!(ids, expected, "{at}: every post once");
    }
    eprintln!(
        "{POSTS} posts on all {} member sessions over 3 nodes in {:?}",
        clients.len(),
        started.elapsed()
    );
    // Nothing came twice, and nothing reached the outsider.
    let quiet = Duration::from_millis(300);
    let mut silences: Vec<_> = clients
        .iter_mut()
        .map(|(_, c)| c.expect_silence(quiet))
        .collect();
    silences.push(outsider.expect_silence(quiet));
    futures_util::future::join_all(silences).await;
    backend.stop();
    for gw in nodes {
        gw.stop();
    }
}

/// Dispatch attempts per message id, once all `posts` outbox rows are done.
async fn outbox_attempts(db_url: &str, posts: usize) -> HashMap<String, i64> {
    let pool = sqlx::PgPool::connect(db_url).await.unwrap();
    let mut rows: Vec<(String, String, i64)> = Vec::new();
    eventually(
        Duration::from_secs(30),
        "every outbox row done",
        async || {
            rows = sqlx::query_as(
                "SELECT state, data, attempts FROM dispatch_outbox \
             WHERE event_type = 'EVENT_MESSAGE_CREATE'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.len() == posts && rows.iter().all(|(state, ..)| state == "done")
        },
    )
    .await;
    pool.close().await;
    rows.into_iter()
        .map(|(_, data, attempts)| {
            let data: Value = serde_json::from_str(&data).unwrap();
            (data["id"].as_str().unwrap().to_owned(), attempts)
        })
        .collect()
}

/// Every ack a backend got, by event id, in arrival order.
#[derive(Clone, Default)]
struct Acks(Arc<Mutex<HashMap<String, Vec<Value>>>>);

impl Acks {
    /// Acks so far.
    fn count(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }

    /// Every event's acks so far.
    fn snapshot(&self) -> HashMap<String, Vec<Value>> {
        self.0.lock().unwrap().clone()
    }
}

/// The test as a backend streaming events: the dispatch connection's
/// sending half, its acks collected by a task as they come.
fn pipeline(dispatch: DispatchClient) -> (SplitSink<WsClient, WsMessage>, Acks) {
    let (sink, mut stream) = dispatch.ws.split();
    let acks = Acks::default();
    let collected = acks.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let WsMessage::Text(text) = message else {
                continue;
            };
            let ack: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(ack["t"], "EVENT_ROUNDTRIP", "{ack}");
            let id = ack["event_id"].as_str().unwrap().to_owned();
            collected.0.lock().unwrap().entry(id).or_default().push(ack);
        }
    });
    (sink, acks)
}

/// Sends `EVENT_ECHO` `n` (all on channel 1: one dispatch order).
async fn send_echo(sink: &mut SplitSink<WsClient, WsMessage>, n: u64) {
    sink.send(WsMessage::text(echo_event(n))).await.unwrap();
}

/// Reads `client`'s frames on a task of its own (so it keeps up while the
/// test works) until the `CONFIG_ECHO` of event `last`; returns the client
/// and each frame's (s, event id).
fn record(mut client: Client, last: u64) -> JoinHandle<(Client, Vec<(u64, u64)>)> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let frame = client.next().await;
            assert_eq!(frame["t"], "CONFIG_ECHO", "{frame}");
            let s = frame["s"].as_u64().unwrap();
            let id: u64 = frame["d"]["event_id"].as_str().unwrap().parse().unwrap();
            seen.push((s, id));
            if id == last {
                return (client, seen);
            }
        }
    })
}

/// One session's event ids, checked to come with `s` counting up by 1
/// from 1: no gap, and all on the session the client opened.
fn ids_of(who: &str, seen: &[(u64, u64)]) -> Vec<u64> {
    for (i, (s, _)) in seen.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1, "{who}: frame {i} has s {s}");
    }
    seen.iter().map(|(_, id)| *id).collect()
}

/// Asserts `got == want`, naming the first difference (the lists are long).
fn assert_ids(who: &str, got: &[u64], want: &[u64]) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{who}: {} events, {} wanted; first difference at {i}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// A cluster for echo streams: `EVENT_ECHO` delivers `CONFIG_ECHO`
/// carrying the event id to every session on every node.
async fn echo_cluster(lease_ms: u64, max_per_user: u32) -> TestCluster {
    let mut cluster = TestCluster::for_events(lease_ms).await;
    cluster
        .setup
        .set("sessions", "max_per_user", &max_per_user.to_string())
        .route(
            "EVENT_ECHO",
            &test_plugin("config_echo_plugin"),
            "timeout_ms = 5000",
        );
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_stream_costs_the_others_no_event_and_frees_its_slots_within_lease_ms() {
    const EVENTS: u64 = 600;
    const PACE: Duration = Duration::from_millis(4);
    const MAX: u32 = 2;
    // The slots free lease_ms after node 3's last renewal, which was before
    // the kill; on top of that the test's own poll period (20 ms) and one
    // connect (a KV read and a compare-and-set) on a loaded 2-core machine.
    const SLACK: Duration = Duration::from_millis(1000);
    let mut cluster = echo_cluster(LEASE_MS, MAX).await;
    let mut nodes = vec![cluster.start(1), cluster.start(2), cluster.start(3)];

    // Two users a node on nodes 1 and 2; on node 3 one user, and user 77
    // at max_per_user.
    let mut readers = Vec::new();
    for (node, users) in [(0, [21, 22]), (1, [23, 24])] {
        for user in users {
            let client = Client::connect(nodes[node].client, user).await;
            readers.push((
                format!("node {} user {user}", node + 1),
                record(client, EVENTS),
            ));
        }
    }
    let mut on_node_3 = vec![Client::connect(nodes[2].client, 25).await];
    for _ in 0..MAX {
        on_node_3.push(Client::connect(nodes[2].client, 77).await);
    }
    assert!(matches!(try_session(&nodes[0], 77).await, Err(4010)));

    let (mut sink, acks) = pipeline(DispatchClient::connect(nodes[0].dispatch).await);
    let victim = nodes.pop().unwrap();
    let started = Instant::now();
    let stream = async {
        for n in 1..=EVENTS {
            send_echo(&mut sink, n).await;
            tokio::time::sleep(PACE).await;
        }
    };
    let kill = async {
        eventually(
            Duration::from_secs(20),
            "a third of the events acked",
            async || acks.count() as u64 >= EVENTS / 3,
        )
        .await;
        victim.kill();
        let killed = Instant::now();
        let acked_at_kill = acks.count();
        // Polled on node 1 while the stream goes on.
        let (freed, first) = loop {
            match try_session(&nodes[0], 77).await {
                Ok(ws) => break (killed.elapsed(), ws),
                Err(code) => assert_eq!(code, 4010),
            }
            assert!(
                killed.elapsed() < Duration::from_millis(LEASE_MS * 10),
                "user 77's slots never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (acked_at_kill, freed, first)
    };
    let ((), (acked_at_kill, freed, first)) = tokio::join!(stream, kill);
    eprintln!(
        "node 3 killed after {acked_at_kill} of {EVENTS} acks; user 77 admitted on node 1 \
         {freed:?} after the kill (lease_ms {LEASE_MS})"
    );
    assert!(
        (acked_at_kill as u64) < EVENTS,
        "the kill came after the stream"
    );
    assert!(
        freed <= Duration::from_millis(LEASE_MS) + SLACK,
        "node 3's slots freed {freed:?} after the kill, lease_ms {LEASE_MS}"
    );
    // Exactly node 3's slots came free, not more.
    let second = try_session(&nodes[1], 77).await.unwrap();
    assert!(matches!(try_session(&nodes[0], 77).await, Err(4010)));

    eventually(Duration::from_secs(20), "every event acked", async || {
        acks.count() as u64 >= EVENTS
    })
    .await;
    let acks = acks.snapshot();
    for n in 1..=EVENTS {
        let got = &acks[&n.to_string()];
        assert_eq!(got.len(), 1, "event {n}: {got:?}");
        assert_eq!(got[0]["success"], true, "event {n}: {}", got[0]);
    }
    let want: Vec<u64> = (1..=EVENTS).collect();
    for (who, reader) in readers {
        let (_client, seen) = reader.await.unwrap();
        assert_ids(&who, &ids_of(&who, &seen), &want);
    }
    eprintln!(
        "{EVENTS} events on 4 sessions of the 2 surviving nodes in {:?}",
        started.elapsed()
    );
    drop((first, second, on_node_3));
    for gw in nodes {
        gw.stop();
    }
}

/// The last event of a stream, sent once every other event has succeeded.
const END: u64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_killed_and_restarted_mid_stream_fails_events_with_bus_unavailable_and_loses_none() {
    const PACE: Duration = Duration::from_millis(5);
    const DOWN: Duration = Duration::from_millis(1500);
    let mut nats = NatsServer::start();
    // lease_ms 10 s: a node fences itself (1001) after ¾ of it without a
    // renewal; NATS is away for DOWN plus its restart and the reconnect,
    // far less, so the nodes keep their sessions through the outage.
    let mut cluster = echo_cluster(10_000, 5).await;
    cluster.use_nats(&nats.url());
    let nodes = [cluster.start(1), cluster.start(2)];
    let seed = Seed::open(&cluster.setup).await;
    let mut readers = Vec::new();
    for (node, users) in [(0, [31, 32]), (1, [33, 34])] {
        for user in users {
            let client = Client::connect(nodes[node].client, user).await;
            readers.push((
                format!("node {} user {user}", node + 1),
                record(client, END),
            ));
        }
    }

    let (mut sink, acks) = pipeline(DispatchClient::connect(nodes[0].dispatch).await);
    let failures = || {
        acks.snapshot()
            .values()
            .filter(|a| a.iter().any(|a| a["success"] == false))
            .count()
    };
    // Events until a while after NATS is back; NATS killed mid-stream.
    let mut sent = 0;
    let mut killed = None;
    let mut restarted = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        sent += 1;
        send_echo(&mut sink, sent).await;
        tokio::time::sleep(PACE).await;
        assert!(Instant::now() < deadline, "the stream did not get through");
        match (killed, restarted) {
            (None, _) if acks.count() >= 100 => {
                nats.kill();
                killed = Some((Instant::now(), sent));
            }
            (Some((at, _)), None) if at.elapsed() >= DOWN && failures() > 0 => {
                tokio::task::block_in_place(|| nats.restart());
                restarted = Some(sent);
            }
            // Done once events sent after the restart succeed again.
            (_, Some(after))
                if acks.snapshot().iter().any(|(id, a)| {
                    id.parse::<u64>().unwrap() > after && a[0]["success"] == true
                }) =>
            {
                break;
            }
            _ => {}
        }
    }
    let ((_, killed_at), restarted_at) = (killed.unwrap(), restarted.unwrap());
    eventually(Duration::from_secs(20), "every event acked", async || {
        acks.snapshot().len() as u64 == sent
    })
    .await;
    let first_pass = acks.snapshot();

    // Every failure is the bus's, with its code and message.
    let failed: Vec<u64> = (1..=sent)
        .filter(|n| first_pass[&n.to_string()][0]["success"] == false)
        .collect();
    for n in &failed {
        let ack = &first_pass[&n.to_string()][0];
        assert_eq!(ack["error"]["code"], "BUS_UNAVAILABLE", "{ack}");
        let message = ack["error"]["message"].as_str().unwrap();
        assert!(message.contains("cluster bus"), "{ack}");
    }
    eprintln!(
        "{sent} events; NATS killed after event {killed_at}, back after event {restarted_at}; \
         {} failed with BUS_UNAVAILABLE (events {:?}..={:?})",
        failed.len(),
        failed.first(),
        failed.last()
    );
    assert!(!failed.is_empty(), "no event failed while NATS was away");

    // The backend's part: each failure re-sent (same event id) until acked true.
    let mut pending = failed.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "still failing: {pending:?}");
        let before = acks.snapshot();
        for n in &pending {
            send_echo(&mut sink, *n).await;
        }
        let answered = |now: &HashMap<String, Vec<Value>>| {
            pending
                .iter()
                .all(|n| now[&n.to_string()].len() > before[&n.to_string()].len())
        };
        eventually(Duration::from_secs(10), "the re-sends acked", async || {
            answered(&acks.snapshot())
        })
        .await;
        let now = acks.snapshot();
        pending.retain(|n| now[&n.to_string()].last().unwrap()["success"] == false);
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Each failed event went to the error log once, retries or not.
    for n in &failed {
        assert_eq!(seed.error_rows(&n.to_string()).await, 1, "event {n}");
    }
    send_echo(&mut sink, END).await;
    eventually(
        Duration::from_secs(10),
        "the last event acked",
        async || {
            acks.snapshot()
                .get(&END.to_string())
                .is_some_and(|a| a[0]["success"] == true)
        },
    )
    .await;

    // Every client, on the session it had from the start, got every event
    // once; those that succeeded the first time in dispatch order.
    let failed: HashSet<u64> = failed.into_iter().collect();
    let mut every: Vec<u64> = (1..=sent).collect();
    every.push(END);
    let first_time: Vec<u64> = every
        .iter()
        .copied()
        .filter(|n| !failed.contains(n))
        .collect();
    for (who, reader) in readers {
        let (_client, seen) = reader.await.unwrap();
        let mut ids = ids_of(&who, &seen);
        let in_order: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|n| !failed.contains(n))
            .collect();
        assert_ids(
            &format!("{who}, first-time successes"),
            &in_order,
            &first_time,
        );
        ids.sort_unstable();
        assert_ids(&format!("{who}, all events"), &ids, &every);
    }
    for gw in nodes {
        gw.stop();
    }
}
