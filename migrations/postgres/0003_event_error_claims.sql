-- Delivery claims for the failed-event log, so any number of deliverers
-- (processes or nodes) share the rows without sending one twice: a row is
-- claimed by one deliverer until `claim_until` (a lease, so a dead
-- deliverer's rows are taken over), and `sink_offset` is the file sink's
-- length when the row was first claimed: a crashed write of the row can
-- only be after it, so a retry checks the file from there.
ALTER TABLE event_errors ADD COLUMN claimed_by TEXT;
ALTER TABLE event_errors ADD COLUMN claim_until BIGINT;
ALTER TABLE event_errors ADD COLUMN sink_offset BIGINT;
