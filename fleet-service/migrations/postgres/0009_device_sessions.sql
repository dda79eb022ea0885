-- Connection history (postgres). Keep in step with ../sqlite/0009_device_sessions.sql.
--
-- One row per device session, written by the intake from presence events. Rows are keyed by
-- the session's epoch, so either event may arrive first (or twice) and the row ends up whole.
-- Pruned with the telemetry history's retention.
CREATE TABLE device_sessions (
    device_id    TEXT COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    epoch        BIGINT  NOT NULL,
    started_at   BIGINT  NOT NULL,
    ended_at     BIGINT  NULL,
    end_reason   TEXT    NULL,
    remote_addr  TEXT    NULL,
    protocol     TEXT    NULL,
    node_id      TEXT    NULL,
    PRIMARY KEY (device_id, epoch)
);
CREATE INDEX device_sessions_started ON device_sessions (started_at);
