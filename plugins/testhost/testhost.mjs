// A scripted host for unit-testing a JavaScript handler under Node, without
// a gateway or a component build. Importing this module maps the handler's
// `import … from "otako:gateway/host@0.1.0"` to the functions below, which
// answer from the TestHost installed by the test:
//
//   import { TestHost, rows } from "../testhost/testhost.mjs";
//   const { handle } = await import("./handler.js"); // after the import above
//   const host = new TestHost()
//     .onQuery((sql, params) => rows(["name"], ["alice"]))
//     .config("greeting", "hi")
//     .online(["1"])
//     .install();
//   handle({ name: "EVENT_X", id: "1", data: "{}" });
//   host.queries; host.logs; host.uninstall();
//
// Values are the component's: variants are `{ tag, val }`, s64 is a BigInt,
// a failed call throws an object whose `payload` is the error variant.
import { register } from "node:module";

register("./hooks.mjs", import.meta.url);

let current = null;

function installed(call) {
  if (current === null) {
    throw new Error(
      `\`${call}\` called with no TestHost installed: start the test with \`new TestHost()…install()\``,
    );
  }
  return current;
}

export class TestHost {
  #onQuery = null;
  #config = new Map();
  #online = new Set();
  /** Every query the handler ran: `{ sql, params }`, in order. */
  queries = [];
  /** Every line the handler logged: `[level, message]`, in order. */
  logs = [];

  /** Answers every `query` with `answer(sql, params)`: rows (see `rows`), or throw `dbError(…)`. */
  onQuery(answer) {
    this.#onQuery = answer;
    return this;
  }

  /** Sets `key` in the route's `[routes.config]`; unset keys read as `undefined`. */
  config(key, value) {
    this.#config.set(key, String(value));
    return this;
  }

  /** Marks these user ids as online. */
  online(userIds) {
    for (const id of userIds) this.#online.add(String(id));
    return this;
  }

  /** Makes this the host until `uninstall()`; one at a time. */
  install() {
    if (current !== null) throw new Error("a TestHost is already installed; uninstall it first");
    current = this;
    return this;
  }

  uninstall() {
    if (current === this) current = null;
  }

  /** The host's side of each import. */
  static query(sql, params) {
    const host = installed("query");
    host.queries.push({ sql, params });
    if (host.#onQuery === null) {
      throw new Error(`the handler ran a query but the TestHost has no onQuery: ${sql}`);
    }
    return host.#onQuery(sql, params);
  }

  static online(userIds) {
    const host = installed("online");
    return userIds.filter((id) => host.#online.has(id));
  }

  static config(key) {
    return installed("config").#config.get(key);
  }

  static log(level, message) {
    installed("log").logs.push([level, message]);
  }
}

// The "otako:gateway/host@0.1.0" imports.
export const query = (sql, params) => TestHost.query(sql, params);
export const online = (userIds) => TestHost.online(userIds);
export const config = (key) => TestHost.config(key);
export const log = (level, message) => TestHost.log(level, message);

/**
 * A `value` variant from a plain JS value: null → null, a BigInt or an
 * integral number → integer, another number → real, a string → text, a
 * Uint8Array → blob; a `{ tag, val }` passes through.
 */
export function value(v) {
  if (v === null || v === undefined) return { tag: "null" };
  if (typeof v === "bigint") return { tag: "integer", val: v };
  if (typeof v === "number") {
    return Number.isInteger(v) ? { tag: "integer", val: BigInt(v) } : { tag: "real", val: v };
  }
  if (typeof v === "string") return { tag: "text", val: v };
  if (v instanceof Uint8Array) return { tag: "blob", val: v };
  if (typeof v === "object" && "tag" in v) return v;
  throw new TypeError(`no WIT value for ${String(v)}`);
}

/** A query result: `rows(["id", "name"], [1n, "alice"], [2n, "bob"])`. */
export function rows(columns, ...values) {
  return { columns, rows: values.map((row) => row.map(value)) };
}

/** What a failed host call throws: `throw dbError("timeout")`, `dbError("query", "no such table")`. */
export function dbError(tag, val) {
  const err = new Error(`db-error ${tag}${val === undefined ? "" : `: ${val}`}`);
  err.payload = val === undefined ? { tag } : { tag, val };
  return err;
}
