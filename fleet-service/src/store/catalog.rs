//! Products and their cohorts.

use super::{constraint, new_id, now_ms, Store, StoreError};

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
