-- Quarantine, CA proof of possession and what a disabled CA's devices may do (postgres). Keep in
-- step with ../sqlite/0007_quarantine_and_ca_proof.sql.

-- 'commands_only' or 'refuse' while the device is quarantined; NULL otherwise.
ALTER TABLE devices ADD COLUMN quarantine_mode TEXT NULL;
ALTER TABLE devices ADD COLUMN quarantined_at BIGINT NULL;
CREATE INDEX devices_quarantine ON devices (quarantine_mode) WHERE quarantine_mode IS NOT NULL;

-- Whether the devices a CA already provisioned keep connecting while it is disabled (a disabled
-- CA never provisions new ones).
ALTER TABLE ca_certificates ADD COLUMN keep_devices_when_disabled BOOLEAN NOT NULL DEFAULT FALSE;

-- Proof of possession: an operator asks for a code, and registers a CA only together with a
-- certificate whose CN is that code, signed by the CA's key. A code is used once.
CREATE TABLE ca_verification_codes (
    code        TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    org_id      TEXT COLLATE "C"  NOT NULL REFERENCES organizations (id),
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    used_at     BIGINT  NULL,
    used_by_ca  TEXT COLLATE "C"  NULL
);
CREATE INDEX ca_verification_codes_org ON ca_verification_codes (org_id, created_at);
