"""EVENT_MESSAGE_CREATE -> MESSAGE_CREATE to the channel's members, with the
full message object read back from the database: the Python twin of
plugins/message_create (same lookup, same object, same error codes and
messages), built with componentize-py by scripts/build-plugins.sh."""

import json
import re

import wit_world
from componentize_py_types import Err
from wit_world.imports import host, types

# The statement the Rust handler runs (plugins/messages): `$n` placeholders
# work on SQLite and PostgreSQL; explicit aliases keep the names stable.
LOAD_MESSAGE = (
    "SELECT m.id AS id, m.channel_id AS channel_id, m.author_id AS author_id, "
    "u.name AS author_name, m.content AS content, m.nonce AS nonce, "
    "m.created_at AS created_at, m.edited_at AS edited_at "
    "FROM messages m JOIN users u ON u.id = m.author_id "
    "WHERE m.id = $1 AND m.channel_id = $2"
)

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def fail(code, message):
    """The WIT `err(handler-error)` the host turns into a failed ack."""
    return Err(types.HandlerError(code=code, message=message))


def read_id(d, field, event_name):
    """An id from `d`: a decimal string (the contract) or a JSON integer."""
    raw = d.get(field)
    prefix = f"invalid `d` for {event_name}: field `{field}`"
    if raw is None and field not in d:
        raise fail("BAD_EVENT", f"{prefix} is missing")
    if isinstance(raw, str) and re.fullmatch(r"-?[0-9]+", raw):
        value = int(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        raise fail("BAD_EVENT", f"{prefix} is not an id: {json.dumps(raw)}")
    if not I64_MIN <= value <= I64_MAX:
        raise fail("BAD_EVENT", f"{prefix} is out of range: {raw}")
    return value


def parse_data(event):
    try:
        d = json.loads(event.data)
    except ValueError as err:
        raise fail("BAD_EVENT", f"invalid `d` for {event.name}: {err}")
    if not isinstance(d, dict):
        raise fail("BAD_EVENT", f"invalid `d` for {event.name}: not a JSON object")
    return read_id(d, "id", event.name), read_id(d, "channel_id", event.name)


def describe_db_error(err):
    """The host's db-error variant, worded like the Rust SDK's `describe`."""
    if isinstance(err, types.DbError_ReadOnly):
        return f"rejected as not read-only: {err.value}"
    if isinstance(err, types.DbError_Timeout):
        return "query timed out"
    if isinstance(err, types.DbError_TooManyRows):
        return f"query returned more than {err.value} rows"
    return f"query failed: {err.value}"


def lookup(message_id, channel_id):
    try:
        return host.query(
            LOAD_MESSAGE,
            [types.Value_Integer(message_id), types.Value_Integer(channel_id)],
        )
    except Err as err:
        raise fail("DB_ERROR", describe_db_error(err.value))


def column(rows, row, name, kind, optional=False):
    """One column of the row, checked like the Rust SDK's typed getters."""
    if name not in rows.columns:
        raise fail("DB_ERROR", f"no column `{name}` in the result")
    value = row[rows.columns.index(name)]
    if optional and isinstance(value, types.Value_Null):
        return None
    if not isinstance(value, kind):
        raise fail("DB_ERROR", f"column `{name}` is {type(value).__name__}, expected {kind.__name__}")
    return str(value.value) if kind is types.Value_Integer else value.value


def check_content_len(content):
    """The route's optional `max_content_len` (characters): over it, BAD_EVENT."""
    raw = host.config("max_content_len")
    if raw is None:
        return
    if not (raw.isascii() and raw.isdigit()):
        raise fail("BAD_CONFIG", f"config `max_content_len` = {json.dumps(raw)} is invalid: not a number")
    if len(content) > int(raw):
        raise fail("BAD_EVENT", f"content longer than max_content_len ({len(content)} > {raw} characters)")


class WitWorld(wit_world.WitWorld):
    def handle(self, event):
        message_id, channel_id = parse_data(event)
        rows = lookup(message_id, channel_id)
        if not rows.rows:
            raise fail("NOT_FOUND", f"message {message_id} not found in channel {channel_id}")
        row = rows.rows[0]
        message = {
            "id": column(rows, row, "id", types.Value_Integer),
            "channel_id": column(rows, row, "channel_id", types.Value_Integer),
            "author": {
                "id": column(rows, row, "author_id", types.Value_Integer),
                "name": column(rows, row, "author_name", types.Value_Text),
            },
            "content": column(rows, row, "content", types.Value_Text),
            "nonce": column(rows, row, "nonce", types.Value_Text, optional=True),
            "timestamp": column(rows, row, "created_at", types.Value_Text),
        }
        check_content_len(message["content"])
        payload = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        return [types.Delivery(event="MESSAGE_CREATE", payload=payload, audience=types.Audience_Channel(message["channel_id"]))]
