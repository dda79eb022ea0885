-- Initial schema (PostgreSQL). Keep in step with ../sqlite/0001_initial.sql: same tables, columns,
-- constraints and indexes. Timestamps are Unix milliseconds; JSON is stored as TEXT.
-- Identifier columns use the "C" collation so that ORDER BY id (and cursor pagination) is
-- byte order, exactly as on SQLite.

CREATE TABLE products (
    id          TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    name        TEXT              NOT NULL UNIQUE,
    created_at  BIGINT            NOT NULL
);

CREATE TABLE cohorts (
    id          TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    product_id  TEXT COLLATE "C"  NOT NULL REFERENCES products (id),
    name        TEXT              NOT NULL,
    created_at  BIGINT            NOT NULL,
    UNIQUE (product_id, name),
    -- Target of the composite foreign keys that keep a cohort inside its product.
    UNIQUE (product_id, id)
);

CREATE TABLE ca_certificates (
    id                  TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    fingerprint_sha256  TEXT              NOT NULL UNIQUE,
    certificate_pem     TEXT              NOT NULL,
    subject             TEXT              NOT NULL,
    not_before          BIGINT            NOT NULL,
    not_after           BIGINT            NOT NULL,
    description         TEXT              NULL,
    enabled             BOOLEAN           NOT NULL,
    jitp_product_id     TEXT COLLATE "C"  NULL REFERENCES products (id),
    jitp_cohort_id      TEXT COLLATE "C"  NULL,
    jitp_tags           TEXT              NULL,
    created_at          BIGINT            NOT NULL,
    updated_at          BIGINT            NOT NULL,
    FOREIGN KEY (jitp_product_id, jitp_cohort_id) REFERENCES cohorts (product_id, id),
    CHECK ((jitp_product_id IS NULL) = (jitp_cohort_id IS NULL))
);

CREATE TABLE devices (
    id                 TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    product_id         TEXT COLLATE "C"  NOT NULL REFERENCES products (id),
    cohort_id          TEXT COLLATE "C"  NULL,
    ca_id              TEXT COLLATE "C"  NULL REFERENCES ca_certificates (id),
    tags               TEXT              NOT NULL DEFAULT '{}',
    state              TEXT              NOT NULL,
    state_reason       TEXT              NOT NULL,
    state_changed_at   BIGINT            NOT NULL,
    online             BOOLEAN           NOT NULL DEFAULT FALSE,
    session_epoch      BIGINT            NOT NULL DEFAULT 0,
    -- 0 = connected, 1 = disconnected: within one epoch a disconnect orders after the connect.
    presence_rank      SMALLINT          NOT NULL DEFAULT 1,
    node_id            TEXT              NULL,
    connected_at       BIGINT            NULL,
    last_seen          BIGINT            NULL,
    disconnect_reason  TEXT              NULL,
    remote_addr        TEXT              NULL,
    firmware_version   TEXT              NULL,
    reported           TEXT              NULL,
    reported_at        BIGINT            NULL,
    last_telemetry     TEXT              NULL,
    last_telemetry_at  BIGINT            NULL,
    cert_fingerprint   TEXT              NULL,
    cert_subject       TEXT              NULL,
    cert_issuer        TEXT              NULL,
    cert_serial        TEXT              NULL,
    cert_not_after     BIGINT            NULL,
    created_at         BIGINT            NOT NULL,
    updated_at         BIGINT            NOT NULL,
    FOREIGN KEY (product_id, cohort_id) REFERENCES cohorts (product_id, id)
);

CREATE INDEX devices_product_id ON devices (product_id, id);
CREATE INDEX devices_cohort_id ON devices (cohort_id, id);
CREATE INDEX devices_state ON devices (state, id);
CREATE INDEX devices_online ON devices (online, id);
CREATE INDEX devices_ca_id ON devices (ca_id);
CREATE INDEX devices_node_id ON devices (node_id, online);

CREATE TABLE device_tags (
    device_id  TEXT COLLATE "C"  NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key        TEXT              NOT NULL,
    value      TEXT              NOT NULL,
    PRIMARY KEY (device_id, key)
);

CREATE INDEX device_tags_key_value ON device_tags (key, value, device_id);

CREATE TABLE telemetry (
    device_id    TEXT COLLATE "C"  NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    epoch        BIGINT            NOT NULL,
    seq          BIGINT            NOT NULL,
    received_at  BIGINT            NOT NULL,
    payload      TEXT              NOT NULL,
    PRIMARY KEY (device_id, epoch, seq)
);

CREATE INDEX telemetry_received_at ON telemetry (received_at);

CREATE TABLE api_keys (
    id           TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    name         TEXT              NOT NULL,
    role         TEXT              NOT NULL,
    secret_hash  TEXT              NOT NULL UNIQUE,
    created_at   BIGINT            NOT NULL,
    revoked_at   BIGINT            NULL
);
