//! The fleet summary: counts by state, presence, firmware, product and cohort, and
//! certificates near expiry, in three grouped scans of the organization's devices.

use super::{Store, StoreError};

/// Which devices a summary counts.
#[derive(Debug, Clone, Default)]
pub struct SummaryScope {
    pub org_id: String,
    pub product_id: Option<String>,
    pub cohort_id: Option<String>,
}

/// Devices of one (state, online, product, cohort) group.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SummaryGroup {
    pub state: String,
    pub online: bool,
    pub product_id: String,
    pub cohort_id: Option<String>,
    pub devices: i64,
}

#[derive(Debug, Clone, Default)]
pub struct FleetSummary {
    pub groups: Vec<SummaryGroup>,
    /// `(version, devices)`, most common first; `None` is "never reported".
    pub firmware: Vec<(Option<String>, i64)>,
    pub quarantined: i64,
    pub certificates_expired: i64,
    pub certificates_expiring: i64,
}

/// The devices of the scope: `$1` organization, `$2` product or NULL, `$3` cohort or NULL.
const SCOPE: &str =
    "org_id = $1 AND ($2 IS NULL OR product_id = $2) AND ($3 IS NULL OR cohort_id = $3)";

/// Firmware versions listed by name; the rest are summed into one "other" line by the API.
pub const FIRMWARE_VERSIONS: i64 = 50;

impl Store {
    /// Counts the scope's devices; certificates expiring between `now_ms` and `until_ms`.
    pub async fn fleet_summary(
        &self,
        scope: &SummaryScope,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<FleetSummary, StoreError> {
        let (groups, firmware, counts) = with_pool!(self, |pool| {
            let groups: Vec<SummaryGroup> = sqlx::query_as(&format!(
                "SELECT state, online, product_id, cohort_id, COUNT(*) AS devices FROM devices \
                 WHERE {SCOPE} GROUP BY state, online, product_id, cohort_id"
            ))
            .bind(&scope.org_id)
            .bind(scope.product_id.as_deref())
            .bind(scope.cohort_id.as_deref())
            .fetch_all(pool)
            .await?;
            let firmware: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
                "SELECT firmware_version, COUNT(*) AS n FROM devices WHERE {SCOPE} \
                 GROUP BY firmware_version ORDER BY n DESC, firmware_version LIMIT $4"
            ))
            .bind(&scope.org_id)
            .bind(scope.product_id.as_deref())
            .bind(scope.cohort_id.as_deref())
            .bind(FIRMWARE_VERSIONS + 1)
            .fetch_all(pool)
            .await?;
            let counts: (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(&format!(
                "SELECT \
                 SUM(CASE WHEN quarantine_mode IS NOT NULL THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN cert_not_after < $4 THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN cert_not_after >= $4 AND cert_not_after < $5 THEN 1 ELSE 0 END) \
                 FROM devices WHERE {SCOPE}"
            ))
            .bind(&scope.org_id)
            .bind(scope.product_id.as_deref())
            .bind(scope.cohort_id.as_deref())
            .bind(now_ms)
            .bind(until_ms)
            .fetch_one(pool)
            .await?;
            Ok::<_, sqlx::Error>((groups, firmware, counts))
        })?;
        Ok(FleetSummary {
            groups,
            firmware,
            quarantined: counts.0.unwrap_or(0),
            certificates_expired: counts.1.unwrap_or(0),
            certificates_expiring: counts.2.unwrap_or(0),
        })
    }
}
