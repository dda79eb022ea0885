-- Commands sent over REST and the devices' acknowledgements (sqlite). Keep in step with
-- ../postgres/0015_commands.sql.
--
-- A command is stored before it is published, so any replica answers for it and an ack that
-- comes back at once finds its row. Its status is derived at read time: acknowledged when an
-- ack is stored, timed out once sent_at + timeout_ms has passed, sent before that (no timer).
-- Pruned with the telemetry history's retention.
CREATE TABLE device_commands (
    device_id   TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    -- The command's id, as the device echoes it in its ack; unique per device.
    id          TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    -- JSON object, or NULL when the command has none.
    params      TEXT    NULL,
    sent_at     BIGINT  NOT NULL,
    timeout_ms  BIGINT  NOT NULL,
    -- The API key that sent it.
    sent_by     TEXT    NULL,
    PRIMARY KEY (device_id, id)
);
CREATE INDEX device_commands_sent_at ON device_commands (sent_at);

-- One row per command published on cohorts/{id}/commands; the devices answer one by one.
CREATE TABLE cohort_commands (
    cohort_id   TEXT    NOT NULL REFERENCES cohorts (id) ON DELETE CASCADE,
    id          TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    params      TEXT    NULL,
    sent_at     BIGINT  NOT NULL,
    timeout_ms  BIGINT  NOT NULL,
    sent_by     TEXT    NULL,
    -- How many devices the cohort had (and could receive it) when it was sent.
    devices     BIGINT  NOT NULL,
    PRIMARY KEY (cohort_id, id)
);
CREATE INDEX cohort_commands_sent_at ON cohort_commands (sent_at);

-- A device's answer to a command with this id sent to it or to its cohort (an ack names only
-- the id, so one row answers both). Written by the intake only when such a command exists;
-- `accepted` may be replaced by a final status, a final status never changes.
CREATE TABLE command_acks (
    device_id   TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    command_id  TEXT    NOT NULL,
    -- The cohort whose command this answered, when the device's cohort had one with this id.
    cohort_id   TEXT    NULL,
    -- accepted, succeeded, failed or rejected.
    status      TEXT    NOT NULL,
    message     TEXT    NULL,
    acked_at    BIGINT  NOT NULL,
    PRIMARY KEY (device_id, command_id)
);
CREATE INDEX command_acks_cohort ON command_acks (cohort_id, command_id, status);
CREATE INDEX command_acks_acked_at ON command_acks (acked_at);
