-- The audit log (postgres). Keep in step with ../sqlite/0008_audit_log.sql.
--
-- One row per mutating REST request (whatever its outcome) and per security event the platform
-- notices on its own (bursts of refused connections). Rows are only ever inserted.
CREATE TABLE audit_log (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id       TEXT COLLATE "C" NOT NULL,
    at           BIGINT  NOT NULL,
    -- 'api_key' (actor is the key id) or 'platform' (actor names the part that noticed).
    actor_kind   TEXT COLLATE "C" NOT NULL,
    actor        TEXT COLLATE "C" NOT NULL,
    -- Dotted and stable: 'device.quarantine', 'api_key.revoke', 'connection.rejected_burst', ...
    action       TEXT COLLATE "C" NOT NULL,
    target_kind  TEXT    NULL,
    target_id    TEXT    NULL,
    request_id   TEXT    NULL,
    -- 'success' or 'failure'.
    outcome      TEXT COLLATE "C" NOT NULL,
    -- The HTTP status, for requests.
    status       INTEGER NULL,
    -- The API error code of a failure.
    error_code   TEXT    NULL,
    remote_addr  TEXT    NULL,
    -- A JSON object with what else the action carries.
    detail       TEXT    NULL
);
CREATE INDEX audit_log_org ON audit_log (org_id, id);
CREATE INDEX audit_log_action ON audit_log (org_id, action, id);
CREATE INDEX audit_log_target ON audit_log (org_id, target_id, id);
CREATE INDEX audit_log_actor ON audit_log (org_id, actor, id);
