-- Organizations (SQLite). Keep in step with ../postgres/0003_organizations.sql.
--
-- Every product, CA, API key, signing key and device now belongs to an organization; what
-- existed before lands in the organization `default`, whose unscoped admin keys also manage the
-- other organizations. Product names become unique per organization, which SQLite can only do by
-- rebuilding the table: that needs foreign keys off, so the store runs migrations on a connection
-- with foreign keys off and checks them all afterwards (`migrate_sqlite`). Columns added by ALTER
-- TABLE cannot carry a foreign key with a non-NULL default on SQLite; the store always writes an
-- existing organization there, and the PostgreSQL schema enforces it.

CREATE TABLE organizations (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL
);
INSERT INTO organizations (id, name, created_at) VALUES ('default', 'default', 0);

CREATE TABLE products_new (
    id          TEXT    NOT NULL PRIMARY KEY,
    org_id      TEXT    NOT NULL REFERENCES organizations (id),
    name        TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    UNIQUE (org_id, name)
);
INSERT INTO products_new (id, org_id, name, created_at)
    SELECT id, 'default', name, created_at FROM products;
DROP TABLE products;
ALTER TABLE products_new RENAME TO products;
CREATE INDEX products_org_id ON products (org_id, id);

ALTER TABLE ca_certificates ADD COLUMN org_id TEXT NOT NULL DEFAULT 'default';
CREATE INDEX ca_certificates_org_id ON ca_certificates (org_id, id);

ALTER TABLE signing_keys ADD COLUMN org_id TEXT NOT NULL DEFAULT 'default';
CREATE INDEX signing_keys_org_id ON signing_keys (org_id, id);

-- A key's scope narrows its role to one product, or one cohort of it.
ALTER TABLE api_keys ADD COLUMN org_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE api_keys ADD COLUMN scope_product_id TEXT NULL;
ALTER TABLE api_keys ADD COLUMN scope_cohort_id TEXT NULL;
CREATE INDEX api_keys_org_id ON api_keys (org_id, id);

-- The device's organization is its product's, kept on the row so every fleet query filters on
-- one indexed column first.
ALTER TABLE devices ADD COLUMN org_id TEXT NOT NULL DEFAULT 'default';
CREATE INDEX devices_org_id ON devices (org_id, id);
