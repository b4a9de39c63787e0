-- A version per channel, bumped by every change to its membership, so the
-- gateway can cache member lists and still see every join and leave: each
-- event reads one version row instead of every member.
CREATE TABLE channel_member_versions (
    channel_id BIGINT PRIMARY KEY,
    version    BIGINT NOT NULL
);

CREATE FUNCTION bump_channel_member_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO channel_member_versions (channel_id, version) VALUES (OLD.channel_id, 1)
            ON CONFLICT (channel_id) DO UPDATE SET version = channel_member_versions.version + 1;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO channel_member_versions (channel_id, version) VALUES (NEW.channel_id, 1)
            ON CONFLICT (channel_id) DO UPDATE SET version = channel_member_versions.version + 1;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER channel_members_version AFTER INSERT OR UPDATE OR DELETE ON channel_members
    FOR EACH ROW EXECUTE FUNCTION bump_channel_member_version();

-- TRUNCATE fires no row triggers: invalidate every cached list instead.
CREATE FUNCTION bump_all_channel_member_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE channel_member_versions SET version = version + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER channel_members_truncate AFTER TRUNCATE ON channel_members
    FOR EACH STATEMENT EXECUTE FUNCTION bump_all_channel_member_versions();
