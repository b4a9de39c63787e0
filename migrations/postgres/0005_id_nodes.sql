-- Leases on the id generator's node bits (cluster.node_id): a process that
-- mints ids takes the lease on its node id at start and renews it while it
-- runs, so a second process with the same node id on this database refuses
-- to start instead of minting the same ids. An expired lease may be taken,
-- and so may one whose holder is gone from this host.
CREATE TABLE id_nodes (
    node_id       BIGINT PRIMARY KEY,
    host          TEXT   NOT NULL,
    pid           BIGINT NOT NULL,
    since_ms      BIGINT NOT NULL,    -- when the holder took it
    expires_at_ms BIGINT NOT NULL
);
