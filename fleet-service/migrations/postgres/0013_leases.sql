-- Leases (postgres). Keep in step with ../sqlite/0013_leases.sql.
--
-- One row per named lease: a singleton task (`rollout`, `reaper`, ...) or a broker node's
-- liveness (`node/{node_id}`). `expires_at` and `renewed_at` are Unix milliseconds on the
-- database's clock. `token` is the fencing token: it grows whenever a new term begins (another
-- holder, or the same holder after the lease had expired), and stays while the holder renews.
CREATE TABLE leases (
    name        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    holder      TEXT    NOT NULL,
    token       BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    renewed_at  BIGINT  NOT NULL
);
