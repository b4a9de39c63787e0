// The demo page and the operator page in real Chromium (Debian's
// /usr/bin/chromium driven by playwright-core) against `otako-gateway dev`.
// Run through scripts/browser-test.sh; screenshots go to tests/browser/output/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, rmSync, copyFileSync } from "node:fs";
import { DISPATCH_SECRET, REPO, api, proxy, startDev, until } from "../../clients/js/test/gateway.js";
import { launch } from "./browser.js";

const OUT = new URL("./output/", import.meta.url).pathname;
const MAX_CONTENT = 200;
let dev, browser, tcp;

before(async () => {
  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  dev = await startDev({ maxPerUser: 3, maxContentLen: MAX_CONTENT });
  tcp = await proxy(dev.client);
  browser = await launch();
});
after(async () => {
  await browser?.close();
  tcp?.close();
  await dev?.stop();
});

/** A page of its own (fresh context: no shared storage) signed in with `token`. */
async function open(token, extra = "") {
  const context = await browser.newContext({ viewport: { width: 1100, height: 650 } });
  const page = await context.newPage();
  page.on("pageerror", (err) => console.error("page error:", err));
  page.sockets = 0;
  page.on("websocket", () => page.sockets++);
  await page.goto(`http://${dev.api}/?token=${encodeURIComponent(token)}${extra}`);
  return page;
}

const connected = (page) => page.waitForSelector('#state[data-state="connected"]');
const contents = (page) => page.$$eval("#messages .msg .content", (els) => els.map((e) => e.textContent));
const shot = (page, name) => page.screenshot({ path: `${OUT}${name}.png` });

let alice, bob;

test("a message posted in one browser shows up in the other", async () => {
  alice = await open(dev.alice);
  // Bob's connection goes through a proxy the tests can cut.
  bob = await open(dev.bob, `&gateway=${encodeURIComponent(`ws://${tcp.addr}/gateway`)}`);
  await Promise.all([connected(alice), connected(bob)]);
  assert.ok(!(await alice.url()).includes("token="), "the token is taken out of the address bar");
  const text = `hello bob ${Date.now()}`;
  await alice.fill("#post input", text);
  const sent = Date.now();
  await alice.press("#post input", "Enter");
  await bob.locator("#messages .content", { hasText: text }).waitFor();
  console.log(`# rendered on the other page ${Date.now() - sent} ms after posting`);
  await shot(alice, "1-two-users-alice");
  await shot(bob, "1-two-users-bob");
});

test("edits and deletes show up on the other page", async () => {
  const text = `to be edited ${Date.now()}`;
  await alice.fill("#post input", text);
  await alice.press("#post input", "Enter");
  const mine = alice.locator(".msg", { hasText: text });
  await mine.waitFor();
  const id = await mine.getAttribute("data-id");
  await bob.locator(`.msg[data-id="${id}"]`).waitFor();
  await mine.locator("button.edit").click();
  await alice.fill(`.msg[data-id="${id}"] .edit-form input`, `${text} (now edited)`);
  await alice.press(`.msg[data-id="${id}"] .edit-form input`, "Enter");
  const theirs = bob.locator(`.msg[data-id="${id}"]`);
  await theirs.locator(".content", { hasText: "(now edited)" }).waitFor();
  await theirs.locator(".edited").waitFor();
  await shot(bob, "2-edited");
  await alice.locator(`.msg[data-id="${id}"] button.delete`).click();
  await theirs.waitFor({ state: "detached" });
  await shot(bob, "2-deleted");
});

test("a cut connection resumes: every message posted meanwhile arrives once, in order, without a reload", async () => {
  await bob.evaluate(() => (window.notReloaded = true));
  tcp.setDown(true);
  await bob.waitForSelector('#state[data-state="reconnecting"]');
  await shot(bob, "3-reconnecting");
  const tag = `missed-${Date.now()}`;
  const wanted = [1, 2, 3, 4, 5].map((n) => `${tag} #${n}`);
  for (const content of wanted) {
    const res = await api(dev, "POST", "/channels/1/messages", dev.alice, { content, nonce: content });
    assert.equal(res.status, 201);
  }
  tcp.setDown(false);
  await bob.locator("#state", { hasText: "resumed" }).waitFor({ timeout: 30000 });
  await until(async () => (await contents(bob)).filter((c) => c.startsWith(tag)).length === 5, "5 messages");
  assert.deepEqual((await contents(bob)).filter((c) => c.startsWith(tag)), wanted);
  assert.equal(await bob.evaluate(() => window.notReloaded), true);
  await shot(bob, "3-resumed");
  if (process.env.OTAKO_DOCS_SCREENSHOT) copyFileSync(`${OUT}3-resumed.png`, `${REPO}/docs/demo.png`);
});

test("the operator page shows the sessions and a failure just provoked", async () => {
  // Longer than the MESSAGE_CREATE plugin's max_content_len: the API
  // stores it, the plugin refuses it, the gateway logs the failure.
  await alice.fill("#post input", "x".repeat(MAX_CONTENT + 1));
  await alice.press("#post input", "Enter");
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  const ops = await context.newPage();
  await ops.goto(`http://${dev.admin}/`);
  await until(
    async () => Number(await ops.locator('.tile[data-name="sessions open"] b').textContent()) >= 2,
    "sessions on the operator page",
  );
  await ops.locator("#failures td.bad", { hasText: "BAD_EVENT" }).waitFor();
  await ops.locator("#plugins", { hasText: "message_create.wasm" }).waitFor();
  const html = await ops.content();
  for (const secret of [dev.alice, dev.bob, DISPATCH_SECRET]) assert.ok(!html.includes(secret), "no secrets on the page");
  await shot(ops, "4-operator");
  await context.close();
});

test("a bad token: a clear message and no reconnect loop", async () => {
  const page = await open("not-a-valid-token");
  await page.locator("#signin-error", { hasText: "rejected" }).waitFor();
  assert.equal(page.sockets, 0);
  await shot(page, "5-bad-token");
  await page.context().close();
});

test("a revoked token: the page says so and stops", async () => {
  const user = await api(dev, "POST", "/users", null, { name: "mallory" });
  const page = await open(user.body.token);
  await connected(page);
  const res = await fetch(`http://${dev.admin}/admin/revoke`, {
    method: "POST",
    headers: { Authorization: `Bearer ${DISPATCH_SECRET}` },
    body: JSON.stringify({ user_id: user.body.id }),
  });
  assert.equal(res.status, 200);
  await page.locator("#signin-error", { hasText: "revoked" }).waitFor();
  await page.waitForSelector('#state[data-state="stopped"]');
  assert.equal(page.sockets, 1);
  await shot(page, "5-revoked");
  await page.context().close();
});

test("the gateway unreachable when the page opens: backoff is shown, then it connects", async () => {
  tcp.setDown(true);
  const page = await open(dev.bob, `&gateway=${encodeURIComponent(`ws://${tcp.addr}/gateway`)}`);
  await page.locator("#state", { hasText: "attempt 2" }).waitFor();
  await shot(page, "5-gateway-down");
  tcp.setDown(false);
  await connected(page);
  await page.context().close();
});

test("over the session limit (4010) the page says why and does not retry", async () => {
  const user = await api(dev, "POST", "/users", null, { name: "dave" });
  const pages = [];
  for (let i = 0; i < 3; i++) {
    pages.push(await open(user.body.token));
    await connected(pages[i]);
  }
  const extra = await open(user.body.token);
  await extra.locator("#state", { hasText: "too many open sessions" }).waitFor();
  assert.equal(await extra.getAttribute("#state", "data-state"), "stopped");
  assert.equal(extra.sockets, 1);
  await shot(extra, "5-session-limit");
  for (const page of [...pages, extra]) await page.context().close();
});
