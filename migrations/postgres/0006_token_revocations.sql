-- Token revocations (DESIGN §2): every token of `user_id` issued at or
-- before `revoked_at` (unix seconds, the tokens' own resolution) is
-- refused. One row per user; a later revoke moves it forward. Gateways
-- poll `changed_ms` to close the user's open sessions with 4004.
CREATE TABLE token_revocations (
    user_id    BIGINT PRIMARY KEY,
    revoked_at BIGINT NOT NULL,
    changed_ms BIGINT NOT NULL
);
CREATE INDEX token_revocations_changed ON token_revocations (changed_ms);
