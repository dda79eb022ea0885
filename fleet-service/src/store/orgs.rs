//! Organizations: the outermost boundary. Everything else belongs to exactly one.

use super::{constraint, new_id, now_ms, Store, StoreError};

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
