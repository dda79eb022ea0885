//! API key rows. Only the SHA-256 of a secret is ever stored.

use broker::auth::ServiceRole;

use super::{constraint, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub role: ServiceRole,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_hash: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: String,
    name: String,
    role: String,
    secret_hash: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = StoreError;

    fn try_from(r: ApiKeyRow) -> Result<Self, StoreError> {
        Ok(ApiKeyRecord {
            role: ServiceRole::parse(&r.role).ok_or_else(|| {
                StoreError::Corrupt(format!("API key {} has role {:?}", r.id, r.role))
            })?,
            id: r.id,
            name: r.name,
            secret_hash: r.secret_hash,
            created_at_ms: r.created_at,
            revoked_at_ms: r.revoked_at,
        })
    }
}

const KEY_COLUMNS: &str = "id, name, role, secret_hash, created_at, revoked_at";

impl Store {
    /// Fails with [`StoreError::Conflict`] when the id or the secret is taken.
    pub async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, secret_hash, created_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(key.role.as_str())
            .bind(&key.secret_hash)
            .bind(key.created_at_ms)
            .bind(key.revoked_at_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "an API key with this id or secret", "API key"))?;
        Ok(())
    }

    /// Creates the key, or replaces the name, role and secret of the key with its id and
    /// un-revokes it.
    pub async fn upsert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, secret_hash, created_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, role = excluded.role, \
                 secret_hash = excluded.secret_hash, revoked_at = excluded.revoked_at",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(key.role.as_str())
            .bind(&key.secret_hash)
            .bind(key.created_at_ms)
            .bind(key.revoked_at_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "an API key with this secret", "API key"))?;
        Ok(())
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows: Vec<ApiKeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"))
                .fetch_all(pool)
                .await
        })?;
        rows.into_iter().map(ApiKeyRecord::try_from).collect()
    }

    /// Revokes a key (idempotent) and returns it as stored; `None` when there is no such key.
    pub async fn revoke_api_key(
        &self,
        id: &str,
        at_ms: i64,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<ApiKeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 \
                 RETURNING {KEY_COLUMNS}"
            ))
            .bind(id)
            .bind(at_ms)
            .fetch_optional(pool)
            .await
        })?;
        row.map(ApiKeyRecord::try_from).transpose()
    }
}
