-- Pre-provisioned devices, certificate pins and revoked certificates (postgres). Keep in step with
-- ../sqlite/0006_device_lifecycle.sql.

-- When set, only the certificate with this SHA-256 fingerprint (hex of its DER) is admitted
-- for the device.
ALTER TABLE devices ADD COLUMN pinned_fingerprint TEXT NULL;

-- Certificates that are never admitted again: revoked, or of a deleted device (so a CA with
-- just-in-time provisioning cannot bring the device back with the same certificate).
CREATE TABLE revoked_certificates (
    fingerprint_sha256  TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    org_id              TEXT COLLATE "C"  NOT NULL,
    device_id           TEXT COLLATE "C"  NOT NULL,
    reason              TEXT    NOT NULL,
    revoked_at          BIGINT  NOT NULL
);
CREATE INDEX revoked_certificates_device ON revoked_certificates (device_id);
