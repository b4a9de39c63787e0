// {{name}}'s handler against a scripted host (plugins/testhost), under Node:
// node --test plugins/{{name}}/   (plugins/README.md, "Testing a handler without a gateway")
import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { TestHost } from "../testhost/testhost.mjs";

// After testhost.mjs, which maps the handler's host import to the TestHost.
const { handle } = await import("./handler.js");

let host;
afterEach(() => host.uninstall());

test("delivers d to the channel", () => {
  // Script what the handler asks the host: `.onQuery((sql, params) =>
  // rows(["name"], ["alice"]))`, `.config(k, v)`, `.online(ids)`; then
  // assert on `host.queries` and `host.logs`.
  host = new TestHost().install();
  const data = '{"channel_id":"1","user_id":"10"}';
  const deliveries = handle({ name: "{{event}}", id: "1", data });
  assert.deepEqual(deliveries, [
    { event: "{{delivers}}", payload: data, audience: { tag: "channel", val: "1" } },
  ]);
  assert.deepEqual(host.queries, []);
});

test("a bad d is BAD_EVENT", () => {
  host = new TestHost().install();
  assert.throws(
    () => handle({ name: "{{event}}", id: "1", data: "{}" }),
    (err) => err.payload?.code === "BAD_EVENT",
  );
});
