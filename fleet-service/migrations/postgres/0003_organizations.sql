-- Organizations (PostgreSQL). Keep in step with ../sqlite/0003_organizations.sql.
--
-- Every product, CA, API key, signing key and device now belongs to an organization; what
-- existed before lands in the organization `default`, whose unscoped admin keys also manage the
-- other organizations. Product names become unique per organization.

CREATE TABLE organizations (
    id          TEXT COLLATE "C"  NOT NULL PRIMARY KEY,
    name        TEXT              NOT NULL UNIQUE,
    created_at  BIGINT            NOT NULL
);
INSERT INTO organizations (id, name, created_at) VALUES ('default', 'default', 0);

ALTER TABLE products ADD COLUMN org_id TEXT COLLATE "C" NOT NULL DEFAULT 'default'
    REFERENCES organizations (id);
ALTER TABLE products DROP CONSTRAINT products_name_key;
ALTER TABLE products ADD CONSTRAINT products_org_id_name_key UNIQUE (org_id, name);
CREATE INDEX products_org_id ON products (org_id, id);

ALTER TABLE ca_certificates ADD COLUMN org_id TEXT COLLATE "C" NOT NULL DEFAULT 'default'
    REFERENCES organizations (id);
CREATE INDEX ca_certificates_org_id ON ca_certificates (org_id, id);

ALTER TABLE signing_keys ADD COLUMN org_id TEXT COLLATE "C" NOT NULL DEFAULT 'default'
    REFERENCES organizations (id);
CREATE INDEX signing_keys_org_id ON signing_keys (org_id, id);

-- A key's scope narrows its role to one product, or one cohort of it.
ALTER TABLE api_keys ADD COLUMN org_id TEXT COLLATE "C" NOT NULL DEFAULT 'default'
    REFERENCES organizations (id);
ALTER TABLE api_keys ADD COLUMN scope_product_id TEXT COLLATE "C" NULL;
ALTER TABLE api_keys ADD COLUMN scope_cohort_id TEXT COLLATE "C" NULL;
CREATE INDEX api_keys_org_id ON api_keys (org_id, id);

-- The device's organization is its product's, kept on the row so every fleet query filters on
-- one indexed column first.
ALTER TABLE devices ADD COLUMN org_id TEXT COLLATE "C" NOT NULL DEFAULT 'default'
    REFERENCES organizations (id);
CREATE INDEX devices_org_id ON devices (org_id, id);
