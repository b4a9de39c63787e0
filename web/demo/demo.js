// The demo chat page: the reference API over fetch, live events through
// the Otako client library (clients/js/otako.js, served as /otako.js).
import { OtakoClient } from "/otako.js";

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const STORE = "otako.token";

const view = {
  me: null,
  token: null,
  client: null,
  channels: [],
  current: null,
  unread: {},
  /** The current channel's messages by id. */
  messages: new Map(),
};

// A token in the URL signs in at once; it is then kept in this tab only
// and taken out of the address bar, so it doesn't end up in history.
if (params.has("token")) {
  sessionStorage.setItem(STORE, params.get("token"));
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
}
start(sessionStorage.getItem(STORE));

async function call(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { Authorization: view.token ?? "", "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw Object.assign(new Error(data?.message ?? res.statusText), { status: res.status });
  return data;
}

async function start(token) {
  if (!token) return showSignin();
  view.token = token;
  try {
    view.me = await call("GET", "/users/@me");
  } catch (err) {
    return showSignin(
      err.status === 401
        ? "This token was rejected: it is invalid, expired or revoked. Sign in again."
        : `Cannot reach the API: ${err.message}`,
    );
  }
  $("#signin").hidden = true;
  $("#chat").hidden = false;
  $("#me").textContent = `${view.me.name} (id ${view.me.id})`;
  await loadChannels();
  connect(await gatewayUrl());
}

function showSignin(error) {
  view.client?.close();
  sessionStorage.removeItem(STORE);
  view.token = null;
  $("#chat").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").hidden = !error;
  $("#signin-error").textContent = error ?? "";
  if (error) setState("stopped", "signed out");
}

$("#create-user").onsubmit = async (e) => {
  e.preventDefault();
  const user = await call("POST", "/users", { name: e.target.name.value });
  sessionStorage.setItem(STORE, user.token);
  start(user.token);
};
$("#paste-token").onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem(STORE, e.target.token.value.trim());
  start(e.target.token.value.trim());
};
$("#signout").onclick = () => showSignin();

/** `?gateway=` for a proxy or another host, else what the API says. */
async function gatewayUrl() {
  if (params.has("gateway")) return params.get("gateway");
  const url = new URL((await call("GET", "/config.json")).gateway_url);
  if (["0.0.0.0", "[::]"].includes(url.hostname)) url.hostname = location.hostname;
  return url.toString();
}

function connect(url) {
  const client = new OtakoClient(url, {
    token: view.token,
    // A handshake that never opened may be a rejected token (browsers
    // don't show the 401): ask the API before trying again.
    async beforeReconnect(info) {
      if (info.opened) return true;
      try {
        await call("GET", "/users/@me");
      } catch (err) {
        if (err.status === 401) return false;
      }
      return true;
    },
  });
  view.client = client;
  client.on("state", (s) => {
    if (s.state === "connecting") {
      setState("connecting", s.resuming ? "resuming…" : "connecting…");
    } else if (s.state === "reconnecting") {
      setState("reconnecting", `reconnecting in ${(s.delay / 1000).toFixed(1)} s (attempt ${s.attempt})`);
      note(`connection lost (code ${s.code}); retry ${s.attempt} in ${s.delay} ms`);
    } else if (s.state === "connected") {
      const text = s.resumed ? `resumed (${s.replayed} replayed)` : "connected";
      setState("connected", text);
      note(text);
    } else if (s.state === "stopped") {
      const why = {
        auth_failed: "the token was rejected or revoked. Sign in again.",
        stopped_by_app: "the token was rejected or revoked. Sign in again.",
        session_limit: "too many open sessions for this user (the gateway's max_per_user); close another tab and reload.",
        session_replaced: "a newer session of this user took this one's place.",
        client_sent_data: "the page broke the protocol.",
        closed: "closed.",
      }[s.reason];
      setState("stopped", `disconnected: ${why}`);
      note(`stopped (${s.code ?? "-"}): ${why}`);
      if (s.reason === "auth_failed" || s.reason === "stopped_by_app") showSignin(`Disconnected: ${why}`);
    }
  });
  client.on("refetch", async (r) => {
    note(r.reason === "gap" ? "gap in the event sequence: refetching" : `not resumed (${r.reason}): refetching`);
    await loadChannels();
    note(r.reason === "gap" ? "gap → refetched" : "refetched");
    if (r.reason === "gap") setState("connected", "gap → refetched");
  });
  client.on("MESSAGE_CREATE", (m) => {
    if (m.channel_id === view.current) return upsert(m);
    view.unread[m.channel_id] = (view.unread[m.channel_id] ?? 0) + 1;
    renderChannels();
  });
  client.on("MESSAGE_UPDATE", (m) => {
    if (m.channel_id === view.current) upsert(m);
  });
  client.on("MESSAGE_DELETE", (d) => {
    if (d.channel_id !== view.current) return;
    view.messages.delete(d.id);
    document.querySelector(`.msg[data-id="${d.id}"]`)?.remove();
  });
  client.connect();
}

function setState(state, text) {
  $("#state").dataset.state = state;
  $("#state").textContent = text;
}

function note(text) {
  const li = document.createElement("li");
  li.innerHTML = `<time>${new Date().toLocaleTimeString()}</time>`;
  li.append(text);
  $("#events").prepend(li);
  while ($("#events").children.length > 50) $("#events").lastChild.remove();
}

async function loadChannels() {
  view.channels = await call("GET", "/channels");
  if (!view.channels.some((c) => c.id === view.current)) view.current = view.channels[0]?.id ?? null;
  renderChannels();
  await openChannel(view.current);
}

function renderChannels() {
  const ul = $("#channels");
  ul.replaceChildren(
    ...view.channels.map((c) => {
      const li = document.createElement("li");
      li.textContent = "# " + c.name;
      li.dataset.id = c.id;
      li.classList.toggle("current", c.id === view.current);
      if (view.unread[c.id]) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = view.unread[c.id];
        li.append(badge);
      }
      li.onclick = () => openChannel(c.id);
      return li;
    }),
  );
}

async function openChannel(id) {
  view.current = id;
  view.unread[id] = 0;
  renderChannels();
  const channel = view.channels.find((c) => c.id === id);
  $("#channel-name").textContent = channel ? "# " + channel.name : "No channels yet";
  $("#members").textContent = channel ? "members: " + channel.members.map((m) => m.name).join(", ") : "";
  $("#post").hidden = !channel;
  view.messages.clear();
  $("#messages").replaceChildren();
  if (!channel) return;
  for (const m of await call("GET", `/channels/${id}/messages?limit=100`)) upsert(m);
}

/** Ids are decimal snowflakes: longer is later, then compare as text. */
const older = (a, b) => a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);

/** Adds or replaces a message, kept in id order, once. */
function upsert(m) {
  view.messages.set(m.id, m);
  const li = render(m);
  const old = document.querySelector(`.msg[data-id="${m.id}"]`);
  if (old) return old.replaceWith(li);
  const list = $("#messages");
  const after = [...list.children].find((el) => older(el.dataset.id, m.id) > 0);
  list.insertBefore(li, after ?? null);
  list.scrollTop = list.scrollHeight;
}

function render(m) {
  const li = document.createElement("li");
  li.className = "msg";
  li.dataset.id = m.id;
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = m.author.name;
  const time = document.createElement("time");
  time.textContent = new Date(m.timestamp).toLocaleTimeString();
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = m.content;
  li.append(author, time);
  if (m.edited_timestamp) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = "(edited)";
    li.append(edited);
  }
  li.append(content);
  if (m.author.id === view.me.id) {
    const edit = button("edit", () => startEdit(li, m));
    const del = button("delete", () => call("DELETE", `/channels/${m.channel_id}/messages/${m.id}`).catch(fail));
    li.append(edit, del);
  }
  return li;
}

function button(label, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "link " + label;
  b.textContent = label;
  b.onclick = onclick;
  return b;
}

function startEdit(li, m) {
  const form = document.createElement("form");
  form.className = "edit-form";
  const input = document.createElement("input");
  input.name = "content";
  input.value = m.content;
  form.append(input, button("cancel", () => upsert(m)));
  form.onsubmit = async (e) => {
    e.preventDefault();
    try {
      upsert(await call("PATCH", `/channels/${m.channel_id}/messages/${m.id}`, { content: input.value }));
    } catch (err) {
      fail(err);
    }
  };
  li.querySelector(".content").replaceWith(form);
  input.focus();
}

$("#post").onsubmit = async (e) => {
  e.preventDefault();
  const input = e.target.content;
  const content = input.value;
  const nonce = crypto.randomUUID?.() ?? String(Math.random()).slice(2);
  input.value = "";
  try {
    const m = await call("POST", `/channels/${view.current}/messages`, { content, nonce });
    if (m.channel_id === view.current) upsert(m);
  } catch (err) {
    input.value = content;
    fail(err);
  }
};

function fail(err) {
  note(`request failed: ${err.message}`);
}
