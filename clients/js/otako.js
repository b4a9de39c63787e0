// Otako Gateway browser/Node client: token auth, HELLO, typed events,
// gap detection by `s`, reconnect with backoff and jitter, resume.
// No dependencies; see README.md and otako.d.ts.

/** Close codes after which reconnecting cannot help (docs/PROTOCOL.md §2). */
const STOP = {
  4003: "client_sent_data",
  4004: "auth_failed",
  4010: "session_limit",
  4011: "session_replaced",
};

/** Whether `token` may travel as a subprotocol (an HTTP token, RFC 7230). */
const asProtocol = (token) => /^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$/.test(token);

export class OtakoClient {
  /**
   * @param {string} url   the gateway's `ws(s)://host/gateway`
   * @param {object} opts  see otako.d.ts
   */
  constructor(url, opts = {}) {
    this.url = url;
    this.token = opts.token;
    this.minDelay = opts.minDelay ?? 500;
    this.maxDelay = opts.maxDelay ?? 30000;
    this.beforeReconnect = opts.beforeReconnect;
    this._WS = opts.WebSocket ?? globalThis.WebSocket;
    this._subprotocol = opts.subprotocol ?? asProtocol(this.token);
    this._handlers = {};
    this.state = "idle";
    this.sessionId = null;
    this.userId = null;
    this.seq = 0;
    this.attempt = 0;
    this._ws = null;
    this._timer = null;
  }

  /** Adds a handler; returns a function that removes it. */
  on(type, fn) {
    (this._handlers[type] ??= new Set()).add(fn);
    return () => this._handlers[type].delete(fn);
  }

  _emit(type, arg, extra) {
    for (const fn of this._handlers[type] ?? []) {
      try {
        fn(arg, extra);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  _setState(state, info = {}) {
    this.state = state;
    this._emit("state", { state, ...info });
  }

  /** Opens the connection (resuming the last session if there is one). */
  connect() {
    clearTimeout(this._timer);
    if (this.state === "stopped") this.attempt = 0;
    this._setState("connecting", { attempt: this.attempt, resuming: !!this.sessionId });
    const params = new URLSearchParams();
    if (!this._subprotocol) params.set("token", this.token);
    if (this.sessionId) {
      params.set("resume", this.sessionId);
      params.set("seq", String(this.seq));
    }
    const query = params.toString();
    const url = query ? this.url + (this.url.includes("?") ? "&" : "?") + query : this.url;
    const ws = this._subprotocol
      ? new this._WS(url, ["otako.v1", "otako.token." + this.token])
      : new this._WS(url);
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (e) => this._frame(e.data);
    const ended = (code, reason) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._closed(code, reason, opened);
    };
    ws.onclose = (e) => ended(e.code, e.reason);
    // A handshake that fails fires error; some WebSockets (Node 20's)
    // then never fire close.
    ws.onerror = () => opened || ended(1006, "");
  }

  /** Closes for good (code 1000 ends the session on the gateway). */
  close() {
    clearTimeout(this._timer);
    const ws = this._ws;
    this._ws = null;
    this.sessionId = null;
    if (ws) ws.close(1000);
    this._setState("stopped", { reason: "closed" });
  }

  _frame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    if (f.op === 10) {
      const d = f.d;
      const prev = this.sessionId;
      this.sessionId = d.session_id;
      this.userId = d.user_id;
      this.attempt = 0;
      if (d.resumed) {
        this._setState("connected", { resumed: true, replayed: d.replayed });
        this._emit("resumed", { replayed: d.replayed });
      } else {
        this.seq = 0;
        this._setState("connected", { resumed: false });
        if (prev) this._emit("refetch", { reason: d.reason ?? "new_session" });
      }
      this._emit("HELLO", d, f);
      return;
    }
    if (f.op !== 0) return;
    if (typeof f.s === "number") {
      if (f.s <= this.seq) return; // replayed twice: already seen
      if (f.s !== this.seq + 1) {
        this._emit("gap", { expected: this.seq + 1, got: f.s });
        this._emit("refetch", { reason: "gap" });
      }
      this.seq = f.s;
    }
    this._emit(f.t, f.d, f);
    this._emit("*", f.d, f);
  }

  async _closed(code, reason, opened) {
    const stop = STOP[code];
    if (stop) {
      this.sessionId = null;
      this._setState("stopped", { code, reason: stop, detail: reason });
      return;
    }
    if (this.state === "stopped") return;
    this.attempt += 1;
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** (this.attempt - 1));
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    const info = { code, attempt: this.attempt, delay, opened };
    if (this.beforeReconnect && (await this.beforeReconnect(info)) === false) {
      this.sessionId = null;
      this._setState("stopped", { code, reason: "stopped_by_app" });
      return;
    }
    if (this.state === "stopped") return;
    this._setState("reconnecting", info);
    this._timer = setTimeout(() => this.connect(), delay);
  }
}
