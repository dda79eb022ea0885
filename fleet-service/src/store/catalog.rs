//! Products and their cohorts.

use super::{constraint, new_id, now_ms, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Product {
    pub id: String,
    pub name: String,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Cohort {
    pub id: String,
    pub product_id: String,
    pub name: String,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
}

impl Store {
    /// Fails with [`StoreError::Conflict`] when the name is taken.
    pub async fn create_product(&self, name: &str) -> Result<Product, StoreError> {
        let product = Product {
            id: new_id(),
            name: name.to_owned(),
            created_at_ms: now_ms(),
        };
        with_pool!(self, |pool| {
            sqlx::query("INSERT INTO products (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(&product.id)
                .bind(&product.name)
                .bind(product.created_at_ms)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "a product with this name", "product"))?;
        Ok(product)
    }

    pub async fn product(&self, id: &str) -> Result<Option<Product>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as("SELECT id, name, created_at FROM products WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// Every product, oldest first.
    pub async fn products(&self) -> Result<Vec<Product>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as("SELECT id, name, created_at FROM products ORDER BY id")
                .fetch_all(pool)
                .await
        })?)
    }

    /// Fails with [`StoreError::Conflict`] when the product already has a cohort of that name,
    /// and with [`StoreError::MissingReference`] when the product does not exist.
    pub async fn create_cohort(&self, product_id: &str, name: &str) -> Result<Cohort, StoreError> {
        let cohort = Cohort {
            id: new_id(),
            product_id: product_id.to_owned(),
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
            sqlx::query_as("SELECT id, product_id, name, created_at FROM cohorts WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// The cohorts of one product, oldest first.
    pub async fn cohorts_of(&self, product_id: &str) -> Result<Vec<Cohort>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, product_id, name, created_at FROM cohorts \
                 WHERE product_id = $1 ORDER BY id",
            )
            .bind(product_id)
            .fetch_all(pool)
            .await
        })?)
    }
}
