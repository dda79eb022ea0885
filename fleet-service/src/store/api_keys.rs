//! API key rows. Only the SHA-256 of a secret is ever stored.

use broker::auth::{Scope, ServiceRole};

use super::{constraint, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub role: ServiceRole,
    pub scope: Scope,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_hash: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: String,
    org_id: String,
    name: String,
    role: String,
    scope_product_id: Option<String>,
    scope_cohort_id: Option<String>,
    secret_hash: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = StoreError;

    fn try_from(r: ApiKeyRow) -> Result<Self, StoreError> {
        let scope = match (r.scope_product_id, r.scope_cohort_id) {
            (None, None) => Scope::Org,
            (Some(product_id), None) => Scope::Product { product_id },
            (Some(product_id), Some(cohort_id)) => Scope::Cohort {
                product_id,
                cohort_id,
            },
            (None, Some(_)) => {
                return Err(StoreError::Corrupt(format!(
                    "API key {} has a cohort scope without a product",
                    r.id
                )))
            }
        };
        Ok(ApiKeyRecord {
            org_id: r.org_id,
            scope,
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

const KEY_COLUMNS: &str = "id, org_id, name, role, scope_product_id, scope_cohort_id, \
    secret_hash, created_at, revoked_at";

/// The `(scope_product_id, scope_cohort_id)` columns of a scope.
impl Store {
    /// Fails with [`StoreError::Conflict`] when the id or the secret is taken.
    pub async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, secret_hash, created_at, revoked_at, \
                 org_id, scope_product_id, scope_cohort_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(key.role.as_str())
            .bind(&key.secret_hash)
            .bind(key.created_at_ms)
            .bind(key.revoked_at_ms)
            .bind(&key.org_id)
            .bind(key.scope.narrows_to().0)
            .bind(key.scope.narrows_to().1)
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
                "INSERT INTO api_keys (id, name, role, secret_hash, created_at, revoked_at, \
                 org_id, scope_product_id, scope_cohort_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, role = excluded.role, \
                 org_id = excluded.org_id, scope_product_id = excluded.scope_product_id, \
                 scope_cohort_id = excluded.scope_cohort_id, \
                 secret_hash = excluded.secret_hash, revoked_at = excluded.revoked_at",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(key.role.as_str())
            .bind(&key.secret_hash)
            .bind(key.created_at_ms)
            .bind(key.revoked_at_ms)
            .bind(&key.org_id)
            .bind(key.scope.narrows_to().0)
            .bind(key.scope.narrows_to().1)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "an API key with this secret", "API key"))?;
        Ok(())
    }

    /// One page of the keys of one organization, or of all (`None`), revoked ones included,
    /// by id.
    pub async fn api_keys(
        &self,
        org_id: Option<&str>,
        page: &super::PageRequest,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows: Vec<ApiKeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1 IS NULL OR org_id = $1) \
                 AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3"
            ))
            .bind(org_id)
            .bind(page.after.as_deref())
            .bind(page.fetch())
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(ApiKeyRecord::try_from).collect()
    }

    /// One key, revoked or not, of any organization; `None` when it does not exist.
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<ApiKeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await
        })?;
        row.map(ApiKeyRecord::try_from).transpose()
    }

    /// Revokes a key of an organization (idempotent) and returns it as stored; `None` when the
    /// organization has no such key.
    pub async fn revoke_api_key(
        &self,
        org_id: &str,
        id: &str,
        at_ms: i64,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<ApiKeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) \
                 WHERE id = $1 AND org_id = $3 RETURNING {KEY_COLUMNS}"
            ))
            .bind(id)
            .bind(at_ms)
            .bind(org_id)
            .fetch_optional(pool)
            .await
        })?;
        row.map(ApiKeyRecord::try_from).transpose()
    }
}
