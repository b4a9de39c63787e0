// The handler against a scripted host (plugins/testhost): the same cases as
// the Rust handler's tests (plugins/message_create/src/lib.rs).
// Run: node --test plugins/message_create_js/
import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { TestHost, dbError, rows } from "../testhost/testhost.mjs";

// After testhost.mjs, which maps the handler's host import to the TestHost.
const { handle } = await import("./handler.js");

// The seed message (`{"id":"3","channel_id":"1"}`) as the lookup returns it.
const seedRow = (content) =>
  rows(
    ["id", "channel_id", "author_id", "author_name", "content", "nonce", "created_at", "edited_at"],
    [3n, 1n, 2n, "bob", content, null, "2026-11-28T00:00:00.000Z", null],
  );

const create = (data) => handle({ name: "EVENT_MESSAGE_CREATE", id: "1", data });

// What a handler throws to fail its event: `{ payload: { code, message } }`.
const failure = (code, message) => (err) => {
  assert.deepEqual(err.payload, { code, message });
  return true;
};

let host;
afterEach(() => host.uninstall());

test("a found message goes to its channel in full", () => {
  host = new TestHost().onQuery(() => seedRow("hello")).install();
  const deliveries = create('{"id":"3","channel_id":"1"}');
  assert.equal(deliveries.length, 1);
  const [delivery] = deliveries;
  assert.equal(delivery.event, "MESSAGE_CREATE");
  assert.deepEqual(delivery.audience, { tag: "channel", val: "1" });
  assert.deepEqual(JSON.parse(delivery.payload), {
    id: "3",
    channel_id: "1",
    author: { id: "2", name: "bob" },
    content: "hello",
    nonce: null,
    timestamp: "2026-11-28T00:00:00.000Z",
  });
  assert.equal(host.queries.length, 1);
  assert.match(host.queries[0].sql, /FROM messages m/);
  assert.deepEqual(host.queries[0].params, [
    { tag: "integer", val: 3n },
    { tag: "integer", val: 1n },
  ]);
});

test("a missing message is NOT_FOUND", () => {
  host = new TestHost().onQuery(() => rows(["id"])).install();
  assert.throws(
    () => create('{"id":"3","channel_id":"1"}'),
    failure("NOT_FOUND", "message 3 not found in channel 1"),
  );
});

test("a database failure is DB_ERROR", () => {
  host = new TestHost()
    .onQuery(() => {
      throw dbError("query", "no such table: messages");
    })
    .install();
  assert.throws(
    () => create('{"id":"3","channel_id":"1"}'),
    failure("DB_ERROR", "query failed: no such table: messages"),
  );
});

test("a bad `d` is BAD_EVENT without a query", () => {
  host = new TestHost().install();
  for (const data of ["not json", '{"id":"3"}', '{"id":"x","channel_id":"1"}']) {
    assert.throws(
      () => create(data),
      (err) => {
        assert.equal(err.payload?.code, "BAD_EVENT", data);
        assert.match(err.payload.message, /^invalid `d` for EVENT_MESSAGE_CREATE: /);
        return true;
      },
    );
  }
  assert.deepEqual(host.queries, []);
});

test("max_content_len counts characters", () => {
  host = new TestHost()
    .config("max_content_len", "5")
    // Message 3 is five characters (but six bytes), message 4 six.
    .onQuery((_, [id]) => seedRow(id.val === 3n ? "héllo" : "hello!"))
    .install();
  assert.equal(create('{"id":"3","channel_id":"1"}').length, 1);
  assert.throws(
    () => create('{"id":"4","channel_id":"1"}'),
    failure("BAD_EVENT", "content longer than max_content_len (6 > 5 characters)"),
  );
});
