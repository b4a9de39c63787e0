-- An event id is claimed (a row written) before its frames reach any
-- session, so a retry can never broadcast it twice. `owner` names the
-- gateway process that claimed it; `done` is set once its fan-out finished.
-- Rows from before this migration are finished successes.
ALTER TABLE event_outcomes ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE event_outcomes ADD COLUMN done INTEGER NOT NULL DEFAULT 1;
