-- Software updates (SQLite). Keep in step with ../postgres/0002_updates.sql.

-- Ed25519 public keys that may sign releases. The id is the first 16 hex characters of the
-- SHA-256 of the 32-byte key, so devices and operators can name a key without a lookup.
CREATE TABLE signing_keys (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    public_key  TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT  NULL
);

CREATE TABLE releases (
    id          TEXT    NOT NULL PRIMARY KEY,
    product_id  TEXT    NOT NULL REFERENCES products (id),
    version     TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    size        BIGINT  NOT NULL,
    sha256      TEXT    NOT NULL,
    signature   TEXT    NOT NULL,
    key_id      TEXT    NOT NULL REFERENCES signing_keys (id),
    notes       TEXT    NULL,
    created_at  BIGINT  NOT NULL,
    UNIQUE (product_id, version),
    UNIQUE (product_id, id)
);

-- A release targeted at a cohort. At most one deployment per cohort is active or paused; the
-- newest deployment of a cohort is what its retained `cohorts/{id}/updates` message carries.
CREATE TABLE deployments (
    id                   TEXT     NOT NULL PRIMARY KEY,
    product_id           TEXT     NOT NULL,
    cohort_id            TEXT     NOT NULL,
    release_id           TEXT     NOT NULL,
    -- 'rollout' or 'rollback'.
    kind                 TEXT     NOT NULL,
    -- active, paused, completed, canceled, rolled_back.
    state                TEXT     NOT NULL,
    state_reason         TEXT     NOT NULL,
    -- JSON: waves, rate limit, jitter, thresholds, timeout.
    policy               TEXT     NOT NULL,
    current_wave         INTEGER  NOT NULL DEFAULT 0,
    -- Devices whose rollout rank is below this are admitted (2^32 admits all).
    admit_below          BIGINT   NOT NULL DEFAULT 0,
    -- Grows with every change devices must see.
    revision             BIGINT   NOT NULL DEFAULT 1,
    -- The rate clock: when admission at max_per_minute (re)started, and how many were
    -- admitted then.
    rate_started_at      BIGINT   NULL,
    rate_base            BIGINT  NOT NULL DEFAULT 0,
    -- What the cohort was targeted at before: the default rollback target.
    previous_release_id  TEXT     NULL REFERENCES releases (id),
    rollback_of          TEXT     NULL REFERENCES deployments (id),
    rolled_back_by       TEXT     NULL,
    created_at           BIGINT   NOT NULL,
    updated_at           BIGINT   NOT NULL,
    finished_at          BIGINT   NULL,
    FOREIGN KEY (product_id, cohort_id) REFERENCES cohorts (product_id, id),
    FOREIGN KEY (product_id, release_id) REFERENCES releases (product_id, id)
);

CREATE INDEX deployments_cohort ON deployments (cohort_id, id);
CREATE INDEX deployments_state ON deployments (state, id);
CREATE INDEX deployments_release ON deployments (release_id);

-- One device's part in one deployment. status: pending (not yet reported), the statuses
-- devices report, and timed_out (set by the rollout engine).
CREATE TABLE deployment_executions (
    deployment_id     TEXT     NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    device_id         TEXT     NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    rank              BIGINT   NOT NULL,
    status            TEXT     NOT NULL,
    error             TEXT     NULL,
    from_version      TEXT     NULL,
    firmware_version  TEXT     NULL,
    admitted_at       BIGINT   NULL,
    -- Admitted and seen online: the timeout runs from here, or from the last report.
    notified_at       BIGINT   NULL,
    last_report_at    BIGINT   NULL,
    finished_at       BIGINT   NULL,
    created_at        BIGINT   NOT NULL,
    updated_at        BIGINT   NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
) WITHOUT ROWID;

CREATE INDEX deployment_executions_rank ON deployment_executions (deployment_id, rank);
CREATE INDEX deployment_executions_status ON deployment_executions (deployment_id, status);
CREATE INDEX deployment_executions_device ON deployment_executions (device_id, deployment_id);
