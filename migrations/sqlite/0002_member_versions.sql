-- A version per channel, bumped by every change to its membership, so the
-- gateway can cache member lists and still see every join and leave: each
-- event reads one version row instead of every member.
CREATE TABLE channel_member_versions (
    channel_id INTEGER PRIMARY KEY,
    version    INTEGER NOT NULL
);

CREATE TRIGGER channel_members_insert AFTER INSERT ON channel_members BEGIN
    INSERT INTO channel_member_versions (channel_id, version) VALUES (NEW.channel_id, 1)
        ON CONFLICT (channel_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER channel_members_delete AFTER DELETE ON channel_members BEGIN
    INSERT INTO channel_member_versions (channel_id, version) VALUES (OLD.channel_id, 1)
        ON CONFLICT (channel_id) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER channel_members_update AFTER UPDATE ON channel_members BEGIN
    INSERT INTO channel_member_versions (channel_id, version) VALUES (OLD.channel_id, 1)
        ON CONFLICT (channel_id) DO UPDATE SET version = version + 1;
    INSERT INTO channel_member_versions (channel_id, version) VALUES (NEW.channel_id, 1)
        ON CONFLICT (channel_id) DO UPDATE SET version = version + 1;
END;
