-- Every claim row is inserted, then marked `done` moments later. With full
-- pages the update can't stay on its page, so ~95 % of them wrote new
-- entries into both indexes (the text key and `completed_at`) and left
-- dead ones for btree cleanup to find. Room left on each page lets the
-- update be a HOT one: no index writes. Applies to pages filled from now.
ALTER TABLE event_outcomes SET (fillfactor = 70);
