//! Leases: named claims that one holder at a time owns until they expire, for singleton tasks
//! across replicas and for broker nodes' liveness.
//!
//! # Clock
//! Expiry is judged on the **database's clock** only: `expires_at` is written as the
//! database's now plus the TTL, and "expired" means the database's now has passed it. Replicas'
//! clocks may disagree by seconds; had each written its own time, a replica running ahead would
//! see a live lease as expired and take it while its holder still acts. A holder never reads the
//! database's clock: it counts its lease from its own monotonic clock, started before it sent the
//! request that granted it, which ends no later than the database's `expires_at` (clock *rates*
//! agree closely even where clock *values* do not).
//!
//! # Tokens
//! `token` fences writes made under a lease: it stays the same while the holder renews, and
//! grows whenever a new term begins (another holder, or the same holder once its lease had
//! expired). A new term takes the larger of the previous token + 1 and the database's now in
//! milliseconds, so the token keeps growing even across a release or a deleted row.

use std::time::Duration;

use fleet_wire::DeviceId;

use super::{NodeGone, Store, StoreError};

/// A lease this caller holds: its term's fencing token, and when it expires (Unix ms, on the
/// database's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub token: i64,
    pub expires_at_ms: i64,
}

/// A lease row as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LeaseRecord {
    pub name: String,
    pub holder: String,
    pub token: i64,
    #[sqlx(rename = "expires_at")]
    pub expires_at_ms: i64,
    #[sqlx(rename = "renewed_at")]
    pub renewed_at_ms: i64,
}

/// A lease whose holder let it expire: the term to act on (see [`Store::delete_lease_if`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ExpiredLease {
    pub name: String,
    pub holder: String,
    pub token: i64,
    /// When it expired (Unix ms, database clock).
    #[sqlx(rename = "expires_at")]
    pub expired_since_ms: i64,
}

/// The database's now in Unix milliseconds, as SQL; the same value throughout one statement.
fn now_sql(store: &Store) -> &'static str {
    match store.backend {
        super::Backend::Sqlite(_) => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        super::Backend::Postgres(_) => {
            "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000 AS BIGINT)"
        }
    }
}

/// The larger of two values, as SQL.
fn greatest(store: &Store) -> &'static str {
    match store.backend {
        super::Backend::Sqlite(_) => "MAX",
        super::Backend::Postgres(_) => "GREATEST",
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl Store {
    /// Takes lease `name` for `holder` for `ttl` if it is free, expired or already `holder`'s
    /// (then it is renewed, keeping its token if it had not expired); `None` if another holder
    /// has it. One statement, so concurrent callers cannot both win: PostgreSQL serialises the
    /// upsert on the row, SQLite on its write lock.
    pub async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let sql = format!(
            "INSERT INTO leases (name, holder, token, expires_at, renewed_at) \
             VALUES ($1, $2, {now}, {now} + $3, {now}) \
             ON CONFLICT (name) DO UPDATE SET \
                 token = CASE WHEN leases.holder = excluded.holder \
                              AND leases.expires_at > excluded.renewed_at \
                         THEN leases.token \
                         ELSE {max}(leases.token + 1, excluded.renewed_at) END, \
                 holder = excluded.holder, \
                 expires_at = excluded.expires_at, \
                 renewed_at = excluded.renewed_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= excluded.renewed_at \
             RETURNING token, expires_at",
            now = now_sql(self),
            max = greatest(self),
        );
        let row: Option<(i64, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(name)
                .bind(holder)
                .bind(millis(ttl).max(1))
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(token, expires_at_ms)| Lease {
            token,
            expires_at_ms,
        }))
    }

    /// Gives lease `name` up if `holder` has it (expired or not); whether it did. The row is
    /// deleted, so nobody mistakes a released lease for a lost holder.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let n = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                .bind(name)
                .bind(holder)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Deletes lease `name` only if it is still the term `(holder, token)`: a renewal after
    /// expiry starts a new term, and a concurrent deleter finds nothing; whether it did.
    pub async fn delete_lease_if(
        &self,
        name: &str,
        holder: &str,
        token: i64,
    ) -> Result<bool, StoreError> {
        let n = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2 AND token = $3")
                .bind(name)
                .bind(holder)
                .bind(token)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Lease `name` as stored, expired or not.
    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT name, holder, token, expires_at, renewed_at FROM leases WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// The leases whose names start with `prefix` that expired more than `grace` ago (database
    /// clock), by name.
    pub async fn expired_leases(
        &self,
        prefix: &str,
        grace: Duration,
    ) -> Result<Vec<ExpiredLease>, StoreError> {
        // `substr` rather than LIKE: SQLite's LIKE ignores ASCII case, and `_` or `%` in a prefix
        // would need escaping.
        let sql = format!(
            "SELECT name, holder, token, expires_at FROM leases \
             WHERE substr(name, 1, $2) = $1 AND expires_at + $3 <= {now} \
             ORDER BY name",
            now = now_sql(self),
        );
        let len = i32::try_from(prefix.chars().count()).unwrap_or(i32::MAX);
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(prefix)
                .bind(len)
                .bind(millis(grace))
                .fetch_all(pool)
                .await?
        }))
    }

    /// Declares broker node `node_id` lost under its expired lease `lease`: in one transaction,
    /// deletes that lease term and marks the node's online devices offline (`node_lost`),
    /// ending their open sessions. Returns the devices with their session epochs, or `None`
    /// (nothing changed) when the term is gone: another reaper took it, or the node renewed.
    pub async fn end_lost_node(
        &self,
        lease: &ExpiredLease,
        node_id: &str,
    ) -> Result<Option<Vec<(DeviceId, u64)>>, StoreError> {
        self.end_node_sessions(
            node_id,
            NodeGone::Lost,
            Some((&lease.name, &lease.holder, lease.token)),
        )
        .await
    }
}
