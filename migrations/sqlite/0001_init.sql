-- Users, channels and messages: what the reference backend writes and the
-- plugins read. Ids are snowflake-style integers; timestamps are RFC 3339 text
-- so a plugin can hand them to clients as they are.
CREATE TABLE users (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);

CREATE TABLE channels (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);

CREATE TABLE channel_members (
    channel_id INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX channel_members_user ON channel_members(user_id);

CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,
    channel_id INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    author_id  INTEGER NOT NULL REFERENCES users(id),
    content    TEXT    NOT NULL,
    nonce      TEXT,
    created_at TEXT    NOT NULL,
    edited_at  TEXT
);
CREATE INDEX messages_channel ON messages(channel_id, id);
-- A repeated nonce from the same author in the same channel is the same message.
CREATE UNIQUE INDEX messages_nonce ON messages(channel_id, author_id, nonce) WHERE nonce IS NOT NULL;

-- Idempotency: every event id the gateway has handled successfully, kept for
-- a retention window so a retry after a restart is still a duplicate.
CREATE TABLE event_outcomes (
    event_id     TEXT    PRIMARY KEY,
    completed_at INTEGER NOT NULL
);
CREATE INDEX event_outcomes_completed ON event_outcomes(completed_at);

-- Failed events for the logging server: one row per event id, ever; a
-- background task delivers undelivered rows to the sink.
CREATE TABLE event_errors (
    event_id     TEXT    PRIMARY KEY,
    record       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX event_errors_pending ON event_errors(delivered_at, created_at);

-- The reference backend's dispatch outbox: written in the same transaction as
-- the message, sent by a background dispatcher, retried up to X attempts.
CREATE TABLE dispatch_outbox (
    id         INTEGER PRIMARY KEY,
    event_id   TEXT    NOT NULL UNIQUE,
    event_type TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    state      TEXT    NOT NULL DEFAULT 'pending',
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX dispatch_outbox_pending ON dispatch_outbox(state, next_attempt_at, id);
