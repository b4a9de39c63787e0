// EVENT_MESSAGE_CREATE → MESSAGE_CREATE to the channel's members, with the
// full message object read back from the database: the JavaScript twin of
// plugins/message_create (same lookup, same object, same error codes and
// messages), built with componentize-js by scripts/build-plugins.sh.
import { query, config } from "otako:gateway/host@0.1.0";

// The statement the Rust handler runs (plugins/messages): `$n` placeholders
// work on SQLite and PostgreSQL; explicit aliases keep the names stable.
const LOAD_MESSAGE =
  "SELECT m.id AS id, m.channel_id AS channel_id, m.author_id AS author_id, " +
  "u.name AS author_name, m.content AS content, m.nonce AS nonce, " +
  "m.created_at AS created_at, m.edited_at AS edited_at " +
  "FROM messages m JOIN users u ON u.id = m.author_id " +
  "WHERE m.id = $1 AND m.channel_id = $2";

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

// Throwing an object with a `payload` returns the WIT `err(handler-error)`.
class HandlerError extends Error {
  constructor(code, message) {
    super(message);
    this.payload = { code, message };
  }
}

// An id from `d`: a decimal string (the contract) or a JSON integer. A JSON
// number past 2^53 has already lost digits in JSON.parse, so it is refused
// rather than looked up wrong.
function readId(d, field, eventName) {
  const raw = d[field];
  const bad = (why) =>
    new HandlerError("BAD_EVENT", `invalid \`d\` for ${eventName}: field \`${field}\` ${why}`);
  if (raw === undefined) throw bad("is missing");
  let id;
  if (typeof raw === "string" && /^-?[0-9]+$/.test(raw)) id = BigInt(raw);
  else if (typeof raw === "number" && Number.isSafeInteger(raw)) id = BigInt(raw);
  else throw bad(`is not an id: ${JSON.stringify(raw)}`);
  if (id < I64_MIN || id > I64_MAX) throw bad(`is out of range: ${raw}`);
  return id;
}

function parseData(event) {
  let d;
  try {
    d = JSON.parse(event.data);
  } catch (err) {
    throw new HandlerError("BAD_EVENT", `invalid \`d\` for ${event.name}: ${err.message}`);
  }
  if (d === null || typeof d !== "object" || Array.isArray(d)) {
    throw new HandlerError("BAD_EVENT", `invalid \`d\` for ${event.name}: not a JSON object`);
  }
  return { id: readId(d, "id", event.name), channelId: readId(d, "channel_id", event.name) };
}

// The host's db-error variant, worded like the Rust SDK's `describe`.
function describeDbError(err) {
  switch (err.tag) {
    case "read-only":
      return `rejected as not read-only: ${err.val}`;
    case "timeout":
      return "query timed out";
    case "too-many-rows":
      return `query returned more than ${err.val} rows`;
    default:
      return `query failed: ${err.val}`;
  }
}

function lookup(id, channelId) {
  try {
    return query(LOAD_MESSAGE, [
      { tag: "integer", val: id },
      { tag: "integer", val: channelId },
    ]);
  } catch (err) {
    throw new HandlerError("DB_ERROR", describeDbError(err.payload ?? err));
  }
}

// One column of the row, checked like the Rust SDK's typed getters.
function column(rows, row, name, kind, optional) {
  const index = rows.columns.indexOf(name);
  if (index < 0) throw new HandlerError("DB_ERROR", `no column \`${name}\` in the result`);
  const value = row[index];
  if (value.tag === "null" && optional) return null;
  if (value.tag !== kind) {
    throw new HandlerError("DB_ERROR", `column \`${name}\` is ${value.tag}, expected ${kind}`);
  }
  return kind === "integer" ? value.val.toString() : value.val;
}

// The route's optional `max_content_len` (characters): over it, BAD_EVENT.
function checkContentLen(content) {
  const raw = config("max_content_len");
  if (raw === undefined || raw === null) return;
  if (!/^[0-9]+$/.test(raw)) {
    throw new HandlerError(
      "BAD_CONFIG",
      `config \`max_content_len\` = ${JSON.stringify(raw)} is invalid: not a number`,
    );
  }
  const max = Number(raw);
  const len = [...content].length;
  if (len > max) {
    throw new HandlerError(
      "BAD_EVENT",
      `content longer than max_content_len (${len} > ${max} characters)`,
    );
  }
}

export function handle(event) {
  try {
    return handleCreate(event);
  } catch (err) {
    // componentize-js lowers anything thrown as the WIT error record: a
    // HandlerError's payload is one. Anything else (a bug) traps; print its
    // stack first, since the host puts the plugin's stderr in the error log.
    if (!(err instanceof HandlerError)) console.error(err?.stack ? `${err}\n${err.stack}` : String(err));
    throw err;
  }
}

function handleCreate(event) {
  const { id, channelId } = parseData(event);
  const rows = lookup(id, channelId);
  const row = rows.rows[0];
  if (row === undefined) {
    throw new HandlerError("NOT_FOUND", `message ${id} not found in channel ${channelId}`);
  }
  const message = {
    id: column(rows, row, "id", "integer"),
    channel_id: column(rows, row, "channel_id", "integer"),
    author: {
      id: column(rows, row, "author_id", "integer"),
      name: column(rows, row, "author_name", "text"),
    },
    content: column(rows, row, "content", "text"),
    nonce: column(rows, row, "nonce", "text", true),
    timestamp: column(rows, row, "created_at", "text"),
  };
  checkContentLen(message.content);
  return [
    {
      event: "MESSAGE_CREATE",
      payload: JSON.stringify(message),
      audience: { tag: "channel", val: message.channel_id },
    },
  ];
}
