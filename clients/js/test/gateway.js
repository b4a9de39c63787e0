// Test harness shared by the client's Node tests and the browser tests:
// starts the real `otako-gateway dev` (gateway + reference API) on free
// ports with a config of its own in a temp folder, plus a TCP proxy a test
// can cut to drop connections the way a network does.
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { Socket, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.OTAKO_BIN ?? join(REPO, "target/debug/otako-gateway");
export const DISPATCH_SECRET = "js-test-dispatch-secret";

/** A port free right now. */
export function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

/**
 * Starts `otako-gateway dev`. Options: `clientPort` (default: any free
 * one), `maxPerUser`, `maxContentLen` (the MESSAGE_CREATE plugin's limit:
 * longer messages fail in the plugin), `dir` (reuse a folder).
 */
export async function startDev(opts = {}) {
  // The api port is picked free, then bound by dev a moment later; another
  // socket (a client's own reconnects, say) can take it in between, and
  // dev then exits naming api.listen. Such a start is tried again.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startDevOnce(opts);
    } catch (err) {
      if (attempt >= 3 || !/\(api\.listen\).*in use/.test(err.message)) throw err;
    }
  }
}

async function startDevOnce(opts) {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "otako-js-"));
  const plugin = (name) => JSON.stringify(join(REPO, "plugins", `${name}.wasm`));
  // A fixed api port, so dev's default allowed origin (the demo page's
  // own) is the page's real origin.
  const config = `
[server]
client_listen = "127.0.0.1:${opts.clientPort ?? 0}"
dispatch_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[auth]
token_secret = "js-test-token-secret"
dispatch_secret = "${DISPATCH_SECRET}"
[database]
url = "sqlite://${join(dir, "data/otako.db")}"
[sessions]
max_per_user = ${opts.maxPerUser ?? 5}
[logging]
sink = "file"
path = "data/event-errors.jsonl"
[plugins]
hot_reload = false
[api]
listen = "127.0.0.1:${await freePort()}"
${["create", "update", "delete"]
  .map((e) => `[[routes]]\nevent = "EVENT_MESSAGE_${e.toUpperCase()}"\nplugin = ${plugin("message_" + e)}\n`)
  .map((route, i) =>
    i === 0 && opts.maxContentLen ? `${route}[routes.config]\nmax_content_len = "${opts.maxContentLen}"\n` : route,
  )
  .join("")}`;
  const path = join(dir, "gateway.toml");
  writeFileSync(path, config);
  const child = spawn(BIN, ["--config", path, "dev"], {
    stdio: ["ignore", "pipe", "pipe"],
    env: cleanEnv(),
  });
  let log = "";
  child.stderr.on("data", (d) => (log += d));
  const lines = [];
  const found = {};
  await new Promise((ok, fail) => {
    // Killed on a timeout, so a dev that hangs can't keep the test process alive.
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      fail(new Error("dev did not start:\n" + log));
    }, 120000);
    // "close", not "exit": by then stderr has been read to its end.
    child.once("close", (code) => fail(new Error(`dev exited with ${code}:\n${log}`)));
    createInterface({ input: child.stdout }).on("line", (line) => {
      lines.push(line);
      const grab = (key) => line.match(new RegExp(`${key}=https?://([^/\\s]+)`))?.[1];
      if (line.startsWith("otako-gateway listening ")) {
        found.client = grab("client");
        found.admin = grab("admin");
      }
      if (line.startsWith("otako-gateway api listening ")) found.api = line.split("http://")[1];
      const link = line.match(/\/\?token=([\w.-]+)/);
      if (link) (found.tokens ??= []).push(link[1]);
      if (found.client && found.api && found.tokens?.length >= 2) {
        clearTimeout(timer);
        ok();
      }
    });
  });
  child.removeAllListeners("close");
  const exited = new Promise((ok) => child.once("exit", ok));
  return {
    dir,
    lines,
    log: () => log,
    client: found.client,
    admin: found.admin,
    api: found.api,
    gatewayUrl: `ws://${found.client}/gateway`,
    /** alice (user 1) and bob (user 2), both in channel 1. */
    alice: found.tokens[0],
    bob: found.tokens[1],
    async stop({ keep = false } = {}) {
      child.kill("SIGTERM");
      await exited;
      if (!keep && !opts.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** This process's environment without the `OTAKO_*` overrides. */
function cleanEnv() {
  const env = { ...process.env, RUST_LOG: "warn" };
  for (const key of Object.keys(env)) if (key.startsWith("OTAKO_")) delete env[key];
  return env;
}

/** A call to the reference API; resolves to {status, body}. */
export async function api(dev, method, path, token, body) {
  const res = await fetch(`http://${dev.api}${path}`, {
    method,
    headers: { ...(token ? { Authorization: token } : {}), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

/** A TCP proxy to `target` ("host:port"); `cut()` drops every open connection. */
export async function proxy(target) {
  const [host, port] = target.split(":");
  const open = new Set();
  let down = false;
  const server = createServer((inbound) => {
    if (down) return inbound.resetAndDestroy();
    const outbound = new Socket();
    outbound.connect(Number(port), host);
    for (const s of [inbound, outbound]) {
      open.add(s);
      s.on("close", () => open.delete(s));
      s.on("error", () => {});
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    connections: () => open.size / 2,
    cut() {
      for (const s of open) s.resetAndDestroy();
    },
    /** While down, drops open connections and refuses new ones. */
    setDown(value) {
      down = value;
      if (down) this.cut();
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/** Resolves when `check()` is truthy, polling; rejects after `ms`. */
export async function until(check, what, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
