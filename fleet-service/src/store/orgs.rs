//! Organizations: the outermost boundary. Everything else belongs to exactly one.

use super::{constraint, new_id, now_ms, Deletion, Dependent, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Organization {
    pub id: String,
    pub name: String,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
}

impl Store {
    /// Fails with [`StoreError::Conflict`] when the name is taken.
    pub async fn create_org(&self, name: &str) -> Result<Organization, StoreError> {
        let org = Organization {
            id: new_id(),
            name: name.to_owned(),
            created_at_ms: now_ms(),
        };
        with_pool!(self, |pool| {
            sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(&org.id)
                .bind(&org.name)
                .bind(org.created_at_ms)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "an organization with this name", "organization"))?;
        Ok(org)
    }

    pub async fn org(&self, id: &str) -> Result<Option<Organization>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as("SELECT id, name, created_at FROM organizations WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// One page of organizations, by id; only `only` when it is given.
    pub async fn orgs(
        &self,
        only: Option<&str>,
        page: &super::PageRequest,
    ) -> Result<Vec<Organization>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, name, created_at FROM organizations \
                 WHERE ($1 IS NULL OR id = $1) AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3",
            )
            .bind(only)
            .bind(page.after.as_deref())
            .bind(page.fetch())
            .fetch_all(pool)
            .await
        })?)
    }
}

impl Store {
    /// Deletes an organization that holds no products and no CA certificates, with its API
    /// keys, signing keys and unused verification codes; returns the ids of the keys deleted
    /// (their live sessions must end). Its audit log stays, to age out with the retention.
    pub async fn delete_org(&self, id: &str) -> Result<Deletion<Vec<String>>, StoreError> {
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut in_use = Vec::new();
            super::note_dependents!(
                tx,
                in_use,
                Dependent::Products,
                "SELECT COUNT(*) FROM products WHERE org_id = $1",
                id
            );
            super::note_dependents!(
                tx,
                in_use,
                Dependent::CaCertificates,
                "SELECT COUNT(*) FROM ca_certificates WHERE org_id = $1",
                id
            );
            if !in_use.is_empty() {
                tx.rollback().await?;
                return Ok(Deletion::InUse(in_use));
            }
            let keys: Vec<(String,)> =
                sqlx::query_as("SELECT id FROM api_keys WHERE org_id = $1 ORDER BY id")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            let deleted = async {
                for sql in [
                    "DELETE FROM api_keys WHERE org_id = $1",
                    "DELETE FROM signing_keys WHERE org_id = $1",
                    "DELETE FROM ca_verification_codes WHERE org_id = $1",
                ] {
                    sqlx::query(sql).bind(id).execute(&mut *tx).await?;
                }
                sqlx::query("DELETE FROM organizations WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map(|d| d.rows_affected())
            }
            .await;
            Ok(match super::catalog::finish_delete(tx, deleted).await? {
                Deletion::Deleted(()) => {
                    Deletion::Deleted(keys.into_iter().map(|(k,)| k).collect())
                }
                Deletion::NotFound => Deletion::NotFound,
                Deletion::InUse(d) => Deletion::InUse(d),
            })
        })
    }
}
