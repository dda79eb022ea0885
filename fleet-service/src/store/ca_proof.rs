//! Verification codes for CA proof of possession. A code belongs to one organization, expires,
//! and is used at most once.

use super::{now_ms, Store, StoreError};

/// A code handed to an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationCode {
    pub code: String,
    pub org_id: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

impl Store {
    pub async fn create_verification_code(
        &self,
        org_id: &str,
        code: &str,
        ttl_ms: i64,
    ) -> Result<VerificationCode, StoreError> {
        let now = now_ms();
        let c = VerificationCode {
            code: code.to_owned(),
            org_id: org_id.to_owned(),
            created_at_ms: now,
            expires_at_ms: now + ttl_ms,
        };
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO ca_verification_codes (code, org_id, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&c.code)
            .bind(&c.org_id)
            .bind(c.created_at_ms)
            .bind(c.expires_at_ms)
            .execute(pool)
            .await
            .map(|d| d.rows_affected())
        })
        .map_err(|e| super::constraint(e, "this verification code", "organization"))?;
        Ok(c)
    }

    /// Marks an unexpired, unused code of the organization as used. False when there is no
    /// such code (unknown, another organization's, expired or used).
    pub async fn take_verification_code(
        &self,
        org_id: &str,
        code: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let done = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE ca_verification_codes SET used_at = $3 \
                 WHERE code = $1 AND org_id = $2 AND used_at IS NULL AND expires_at > $3",
            )
            .bind(code)
            .bind(org_id)
            .bind(now)
            .execute(pool)
            .await
            .map(|d| d.rows_affected())
        })?;
        Ok(done > 0)
    }

    /// Gives a taken code back (the registration it was taken for failed), or records which CA
    /// it registered.
    pub async fn settle_verification_code(
        &self,
        code: &str,
        ca_id: Option<&str>,
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            match ca_id {
                Some(ca) => {
                    sqlx::query("UPDATE ca_verification_codes SET used_by_ca = $2 WHERE code = $1")
                        .bind(code)
                        .bind(ca)
                }
                None => sqlx::query(
                    "UPDATE ca_verification_codes SET used_at = NULL WHERE code = $1 \
                     AND used_by_ca IS NULL",
                )
                .bind(code),
            }
            .execute(pool)
            .await
            .map(|d| d.rows_affected())
        })?;
        Ok(())
    }
}
