//! Products and their cohorts, and deleting them once nothing depends on them.

use super::{constraint, new_id, now_ms, Deletion, Dependent, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Product {
    pub id: String,
    pub org_id: String,
    pub name: String,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Cohort {
    pub id: String,
    /// The product's organization (not a column of `cohorts`: read through the product).
    pub org_id: String,
    pub product_id: String,
    pub name: String,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
}

const COHORT_SELECT: &str = "SELECT c.id, p.org_id, c.product_id, c.name, c.created_at \
    FROM cohorts c JOIN products p ON p.id = c.product_id";

impl Store {
    /// Fails with [`StoreError::Conflict`] when the organization has a product of that name.
    pub async fn create_product(&self, org_id: &str, name: &str) -> Result<Product, StoreError> {
        let product = Product {
            id: new_id(),
            org_id: org_id.to_owned(),
            name: name.to_owned(),
            created_at_ms: now_ms(),
        };
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO products (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&product.id)
            .bind(&product.org_id)
            .bind(&product.name)
            .bind(product.created_at_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "a product with this name", "organization"))?;
        Ok(product)
    }

    pub async fn product(&self, id: &str) -> Result<Option<Product>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as("SELECT id, org_id, name, created_at FROM products WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// One page of an organization's products, by id; only `only` when it is given.
    pub async fn products(
        &self,
        org_id: &str,
        only: Option<&str>,
        page: &super::PageRequest,
    ) -> Result<Vec<Product>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, org_id, name, created_at FROM products WHERE org_id = $1 \
                 AND ($2 IS NULL OR id = $2) AND ($3 IS NULL OR id > $3) ORDER BY id LIMIT $4",
            )
            .bind(org_id)
            .bind(only)
            .bind(page.after.as_deref())
            .bind(page.fetch())
            .fetch_all(pool)
            .await
        })?)
    }

    /// Every cohort of every organization, for loading the broker's registry at start.
    pub async fn all_cohorts(&self) -> Result<Vec<Cohort>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&format!("{COHORT_SELECT} ORDER BY c.id"))
                .fetch_all(pool)
                .await
        })?)
    }

    /// Fails with [`StoreError::Conflict`] when the product already has a cohort of that name,
    /// and with [`StoreError::MissingReference`] when the product does not exist.
    pub async fn create_cohort(&self, product: &Product, name: &str) -> Result<Cohort, StoreError> {
        let cohort = Cohort {
            id: new_id(),
            org_id: product.org_id.clone(),
            product_id: product.id.clone(),
            name: name.to_owned(),
            created_at_ms: now_ms(),
        };
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO cohorts (id, product_id, name, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&cohort.id)
            .bind(&cohort.product_id)
            .bind(&cohort.name)
            .bind(cohort.created_at_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "a cohort with this name in the product", "product"))?;
        Ok(cohort)
    }

    pub async fn cohort(&self, id: &str) -> Result<Option<Cohort>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&format!("{COHORT_SELECT} WHERE c.id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// One page of a product's cohorts, oldest first; only `only` when it is given.
    pub async fn cohorts_page(
        &self,
        product_id: &str,
        only: Option<&str>,
        page: &super::PageRequest,
    ) -> Result<Vec<Cohort>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "{COHORT_SELECT} WHERE c.product_id = $1 AND ($2 IS NULL OR c.id = $2) \
                 AND ($3 IS NULL OR c.id > $3) ORDER BY c.id LIMIT $4"
            ))
            .bind(product_id)
            .bind(only)
            .bind(page.after.as_deref())
            .bind(page.fetch())
            .fetch_all(pool)
            .await
        })?)
    }

    /// The cohorts of one product, oldest first.
    pub async fn cohorts_of(&self, product_id: &str) -> Result<Vec<Cohort>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "{COHORT_SELECT} WHERE c.product_id = $1 ORDER BY c.id"
            ))
            .bind(product_id)
            .fetch_all(pool)
            .await
        })?)
    }
}

impl Store {
    /// Deletes a product of `org_id` and its releases, unless cohorts, devices or unrevoked API
    /// keys scoped to it remain. (With no cohort left, no deployment names its releases.)
    pub async fn delete_product(&self, org_id: &str, id: &str) -> Result<Deletion, StoreError> {
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut in_use = Vec::new();
            super::note_dependents!(
                tx,
                in_use,
                Dependent::Cohorts,
                "SELECT COUNT(*) FROM cohorts WHERE product_id = $1",
                id
            );
            super::note_dependents!(
                tx,
                in_use,
                Dependent::Devices,
                "SELECT COUNT(*) FROM devices WHERE product_id = $1",
                id
            );
            super::note_dependents!(
                tx,
                in_use,
                Dependent::ApiKeys,
                "SELECT COUNT(*) FROM api_keys WHERE scope_product_id = $1 AND revoked_at IS NULL",
                id
            );
            if !in_use.is_empty() {
                tx.rollback().await?;
                return Ok(Deletion::InUse(in_use));
            }
            let deleted = async {
                sqlx::query("DELETE FROM releases WHERE product_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM products WHERE id = $1 AND org_id = $2")
                    .bind(id)
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await
                    .map(|d| d.rows_affected())
            }
            .await;
            finish_delete(tx, deleted).await
        })
    }

    /// Deletes a cohort, with its finished deployments (and their executions) and the commands
    /// sent to it, unless devices, CAs provisioning into it, a live deployment or unrevoked API
    /// keys scoped to it remain.
    pub async fn delete_cohort(&self, id: &str) -> Result<Deletion, StoreError> {
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut in_use = Vec::new();
            super::note_dependents!(
                tx,
                in_use,
                Dependent::Devices,
                "SELECT COUNT(*) FROM devices WHERE cohort_id = $1",
                id
            );
            super::note_dependents!(
                tx,
                in_use,
                Dependent::ProvisioningCas,
                "SELECT COUNT(*) FROM ca_certificates WHERE jitp_cohort_id = $1",
                id
            );
            super::note_dependents!(
                tx,
                in_use,
                Dependent::LiveDeployments,
                "SELECT COUNT(*) FROM deployments WHERE cohort_id = $1 \
                 AND state IN ('active', 'paused')",
                id
            );
            super::note_dependents!(
                tx,
                in_use,
                Dependent::ApiKeys,
                "SELECT COUNT(*) FROM api_keys WHERE scope_cohort_id = $1 AND revoked_at IS NULL",
                id
            );
            if !in_use.is_empty() {
                tx.rollback().await?;
                return Ok(Deletion::InUse(in_use));
            }
            let deleted = async {
                // Executions go with their deployment (ON DELETE CASCADE); a rollback refers
                // only to a deployment of the same cohort, deleted by the same statement.
                sqlx::query("DELETE FROM deployments WHERE cohort_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM cohorts WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map(|d| d.rows_affected())
            }
            .await;
            finish_delete(tx, deleted).await
        })
    }
}

/// Commits a delete's transaction when it removed the row; rolls back when there was none
/// ([`Deletion::NotFound`]) or a foreign key still refers to it ([`Deletion::InUse`]).
pub(super) async fn finish_delete<DB: sqlx::Database>(
    tx: sqlx::Transaction<'_, DB>,
    deleted: Result<u64, sqlx::Error>,
) -> Result<Deletion, StoreError> {
    match deleted {
        Ok(0) => {
            tx.rollback().await?;
            Ok(Deletion::NotFound)
        }
        Ok(_) => {
            tx.commit().await?;
            Ok(Deletion::Deleted(()))
        }
        Err(e) if super::is_foreign_key_violation(&e) => {
            tx.rollback().await?;
            Ok(Deletion::InUse(vec![(Dependent::Other, 1)]))
        }
        Err(e) => Err(e.into()),
    }
}
