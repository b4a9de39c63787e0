// The client library against a real gateway (`otako-gateway dev`).
// Run: node --experimental-websocket --test clients/js/test/
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { OtakoClient } from "../otako.js";
import { DISPATCH_SECRET, api, freePort, proxy, startDev, until } from "./gateway.js";

let dev;
before(async () => {
  dev = await startDev({ maxPerUser: 2 });
});
after(async () => {
  await dev?.stop();
});

/** A client that records its state changes and events. */
function recorded(url, token, opts = {}) {
  const client = new OtakoClient(url, { token, minDelay: 50, maxDelay: 400, ...opts });
  const log = { states: [], created: [], refetch: [], resumed: [], hello: [] };
  client.on("state", (s) => log.states.push(s));
  client.on("HELLO", (h) => log.hello.push(h));
  client.on("MESSAGE_CREATE", (m, f) => log.created.push({ content: m.content, s: f.s }));
  client.on("refetch", (r) => log.refetch.push(r.reason));
  client.on("resumed", (r) => log.resumed.push(r.replayed));
  return { client, log };
}

const post = (token, content) =>
  api(dev, "POST", "/channels/1/messages", token, { content, nonce: content }).then((r) => {
    assert.equal(r.status, 201, JSON.stringify(r.body));
    return r.body;
  });

for (const subprotocol of [true, false]) {
  test(`connects with the token as ${subprotocol ? "a subprotocol" : "?token="} and gets typed events`, async () => {
    const { client, log } = recorded(dev.gatewayUrl, dev.bob, { subprotocol });
    client.connect();
    await until(() => client.state === "connected", "connected");
    assert.equal(client.userId, "2");
    assert.equal(log.hello[0].resumed, false);
    const sent = await post(dev.alice, `hello ${subprotocol} ${Date.now()}`);
    await until(() => log.created.length === 1, "MESSAGE_CREATE");
    assert.equal(log.created[0].content, sent.content);
    assert.equal(log.created[0].s, 1);
    client.close();
    assert.equal(client.state, "stopped");
  });
}

test("a dropped connection resumes: missed messages arrive once, in order", async () => {
  const tcp = await proxy(dev.client);
  const { client, log } = recorded(`ws://${tcp.addr}/gateway`, dev.bob);
  client.connect();
  await until(() => client.state === "connected", "connected");
  const tag = `r${Date.now()}`;
  await post(dev.alice, `${tag}-1`);
  await until(() => log.created.length === 1, "first message");
  tcp.cut();
  await until(() => client.state !== "connected", "the drop noticed");
  for (const n of [2, 3, 4]) await post(dev.alice, `${tag}-${n}`);
  await until(() => log.created.length === 4, "the missed messages");
  assert.deepEqual(
    log.created.map((m) => m.content),
    [1, 2, 3, 4].map((n) => `${tag}-${n}`),
  );
  assert.deepEqual(log.created.map((m) => m.s), [1, 2, 3, 4]);
  assert.ok(log.resumed.length >= 1, "resumed was signalled");
  assert.deepEqual(log.refetch, []);
  assert.ok(log.states.some((s) => s.state === "reconnecting" && s.delay > 0));
  client.close();
  tcp.close();
});

test("a resume the gateway cannot honour tells the app to refetch", async () => {
  const tcp = await proxy(dev.client);
  const { client, log } = recorded(`ws://${tcp.addr}/gateway`, dev.bob);
  client.connect();
  await until(() => client.state === "connected", "connected");
  client.sessionId = "0".repeat(32); // a session this gateway never saw
  tcp.cut();
  await until(() => log.refetch.length === 1, "refetch");
  assert.deepEqual(log.refetch, ["unknown_session"]);
  assert.equal(log.hello.at(-1).resumed, false);
  assert.equal(client.state, "connected");
  client.close();
  tcp.close();
});

test("a session limit (4010) stops the client with a reason, no retry", async () => {
  const a = recorded(dev.gatewayUrl, dev.alice);
  const b = recorded(dev.gatewayUrl, dev.alice);
  a.client.connect();
  b.client.connect();
  await until(() => a.client.state === "connected" && b.client.state === "connected", "two sessions");
  const c = recorded(dev.gatewayUrl, dev.alice);
  c.client.connect();
  await until(() => c.client.state === "stopped", "stopped");
  const stop = c.log.states.at(-1);
  assert.equal(stop.code, 4010);
  assert.equal(stop.reason, "session_limit");
  assert.equal(c.log.states.filter((s) => s.state === "connecting").length, 1);
  assert.equal(c.client._timer, null, "no reconnect scheduled");
  a.client.close();
  b.client.close();
});

test("a bad token never opens; beforeReconnect lets the app stop the retries", async () => {
  const checks = [];
  const { client, log } = recorded(dev.gatewayUrl, "not-a-token", {
    async beforeReconnect(info) {
      checks.push(info);
      const me = await api(dev, "GET", "/users/@me", "not-a-token");
      return me.status !== 401;
    },
  });
  client.connect();
  await until(() => client.state === "stopped", "stopped");
  assert.equal(checks.length, 1);
  assert.equal(checks[0].opened, false);
  assert.equal(log.states.at(-1).reason, "stopped_by_app");
});

test("the gateway down at first: backoff grows, then it connects when the gateway is up", async () => {
  const port = await freePort();
  const { client, log } = recorded(`ws://127.0.0.1:${port}/gateway`, dev.bob, { maxDelay: 1000 });
  client.connect();
  await until(() => log.states.filter((s) => s.state === "reconnecting").length >= 3, "three retries");
  const waits = log.states.filter((s) => s.state === "reconnecting");
  assert.deepEqual(waits.slice(0, 3).map((s) => s.attempt), [1, 2, 3]);
  // Full jitter within [ceiling/2, ceiling]; the ceiling doubles per attempt.
  waits.slice(0, 3).forEach((s, i) => {
    const ceiling = 50 * 2 ** i;
    assert.ok(s.delay >= ceiling / 2 && s.delay <= ceiling, `${s.delay} for ceiling ${ceiling}`);
  });
  const second = await startDev({ clientPort: port });
  try {
    await until(() => client.state === "connected", "connected once up", 30000);
    client.close();
  } finally {
    await second.stop();
  }
});

test("a revoked token (4004) stops the client, saying why", async () => {
  const user = await api(dev, "POST", "/users", null, { name: "carol" });
  const { client, log } = recorded(dev.gatewayUrl, user.body.token);
  client.connect();
  await until(() => client.state === "connected", "connected");
  const res = await fetch(`http://${dev.admin}/admin/revoke`, {
    method: "POST",
    headers: { Authorization: `Bearer ${DISPATCH_SECRET}` },
    body: JSON.stringify({ user_id: user.body.id }),
  });
  assert.equal(res.status, 200);
  await until(() => client.state === "stopped", "stopped");
  assert.equal(log.states.at(-1).code, 4004);
  assert.equal(log.states.at(-1).reason, "auth_failed");
  assert.equal(client._timer, null);
});

test("a gap in `s` is reported and asks for a refetch", () => {
  const client = new OtakoClient("ws://unused/gateway", { token: "t", WebSocket: class {} });
  const gaps = [];
  const refetch = [];
  const seen = [];
  client.on("gap", (g) => gaps.push(g));
  client.on("refetch", (r) => refetch.push(r.reason));
  client.on("*", (_, f) => seen.push(f.s));
  const frame = (s) => JSON.stringify({ op: 0, t: "X", s, d: {} });
  client._frame(JSON.stringify({ op: 10, t: "HELLO", d: { session_id: "a", user_id: "1", resumed: false } }));
  for (const s of [1, 2, 5, 5, 4, 6]) client._frame(frame(s));
  assert.deepEqual(gaps, [{ expected: 3, got: 5 }]);
  assert.deepEqual(refetch, ["gap"]);
  assert.deepEqual(seen, [1, 2, 5, 6], "repeats dropped");
});
