// The operator page: polls GET /admin/status and GET /admin/failures on
// the admin listener (read-only JSON, no tokens or session ids in it).
const $ = (sel) => document.querySelector(sel);
const POLL_MS = 1000;
let last = null;

/** Sums the samples named `otako_<name>` (optionally grouped by one label). */
function sum(samples, name, by) {
  const out = {};
  for (const s of samples) {
    if (s.name !== "otako_" + name) continue;
    const key = by ? s.labels[by] ?? "" : "";
    out[key] = (out[key] ?? 0) + s.value;
  }
  return by ? out : out[""] ?? 0;
}

function cell(text, cls) {
  const td = document.createElement("td");
  if (text instanceof Node) td.append(text);
  else td.textContent = text ?? "";
  if (cls) td.className = cls;
  return td;
}

function table(el, head, rows, empty) {
  const tr = document.createElement("tr");
  for (const h of head) {
    const th = document.createElement("th");
    th.textContent = h;
    tr.append(th);
  }
  const body = rows.map((cells) => {
    const row = document.createElement("tr");
    row.append(...cells.map((c) => (c instanceof HTMLTableCellElement ? c : cell(c))));
    return row;
  });
  if (!rows.length) {
    const row = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = head.length;
    row.append(td);
    body.push(row);
  }
  el.replaceChildren(tr, ...body);
}

function render(status, failures) {
  const m = status.metrics;
  const now = performance.now();
  const events = sum(m, "events_total");
  const rate = last ? ((events - last.events) * 1000) / (now - last.at) : 0;
  last = { events, at: now };
  $("#node").textContent = `v${status.version} · up ${status.uptime_s} s · ${status.ready ? "ready" : "not ready"}`;
  const tiles = [
    ["sessions open", sum(m, "sessions_open")],
    ["sessions detached (resumable)", sum(m, "sessions_detached")],
    ["dispatch connections", sum(m, "dispatch_connections")],
    ["events / s", rate.toFixed(1)],
    ["events in flight", sum(m, "events_inflight")],
    ["error-log backlog", sum(m, "errlog_backlog")],
    ["oldest undelivered (s)", sum(m, "errlog_oldest_undelivered_seconds")],
    ["frames delivered", sum(m, "frames_delivered_total")],
  ];
  $("#tiles").replaceChildren(
    ...tiles.map(([label, value]) => {
      const div = document.createElement("div");
      div.className = "tile";
      div.dataset.name = label;
      div.innerHTML = "<b></b><span></span>";
      div.querySelector("b").textContent = value;
      div.querySelector("span").textContent = label;
      return div;
    }),
  );
  const outcomes = sum(m, "events_total", "outcome");
  table($("#outcomes"), ["outcome", "events"], Object.entries(outcomes), "no events yet");
  const closed = sum(m, "sessions_closed_total", "code");
  table($("#closed"), ["code", "sessions"], Object.entries(closed), "none closed yet");
  table(
    $("#failures"),
    ["recorded", "event", "code", "message", "trace", "sink"],
    failures.map((f) => {
      const r = f.record ?? {};
      const trace = document.createElement("details");
      trace.innerHTML = "<summary>trace</summary><pre></pre>";
      trace.querySelector("pre").textContent = JSON.stringify(r.trace ?? null, null, 2);
      return [
        f.recorded_at,
        `${r.t ?? "?"} #${r.event_id ?? "?"}`,
        cell(r.error?.code, "bad"),
        r.error?.message,
        cell(trace),
        f.delivered_at ? "delivered" : "pending",
      ];
    }),
    "no failed events",
  );
  table(
    $("#plugins"),
    ["event (route)", "plugin", "version (sha-256)", "loaded", "compile", "timeout"],
    status.plugins.map((p) => [
      p.event,
      p.plugin,
      cell(document.createTextNode(p.hash.slice(0, 16))),
      p.loaded_at,
      `${p.compile_ms} ms${p.from_cache ? " (cache)" : ""}`,
      `${p.timeout_ms} ms`,
    ]),
    "no routes",
  );
  table(
    $("#reloads"),
    ["at", "kind", "result", "changed"],
    status.reloads
      .slice()
      .reverse()
      .map((r) => [r.at, r.kind, cell(r.ok ? "ok" : `failed: ${r.error}`, r.ok ? "ok" : "bad"), r.changed.join(", ")]),
    "none",
  );
}

/** Live nodes from `GET /cluster` (404 when not clustered: the page keeps
 * its "single node" note). */
async function pollCluster() {
  const r = await fetch("/cluster");
  if (!r.ok) return;
  const { node_id, nodes } = await r.json();
  const el = document.createElement("table");
  table(
    el,
    ["node", "client listener", "sessions", "lease age"],
    nodes.map((n) => [n.node_id === node_id ? `${n.node_id} (this page)` : n.node_id, n.client, n.sessions, `${n.lease_age_ms} ms`]),
    "no live nodes",
  );
  el.id = "cluster";
  $("#cluster").replaceWith(el);
}

async function poll() {
  pollCluster().catch(() => {});
  try {
    const [status, failures] = await Promise.all(
      ["/admin/status", "/admin/failures"].map((p) => fetch(p).then((r) => (r.ok ? r.json() : Promise.reject(r.status)))),
    );
    render(status, failures);
    $("#live").textContent = "live";
    $("#live").classList.remove("down");
  } catch {
    $("#live").textContent = "unreachable";
    $("#live").classList.add("down");
  }
  setTimeout(poll, POLL_MS);
}
poll();
