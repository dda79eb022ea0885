//! Devices created by an operator before manufacturing, their deletion, and revoked
//! certificates.

use std::collections::BTreeMap;

use fleet_wire::{CohortId, DeviceId};

use super::devices::DeviceState;
use super::{now_ms, tags_to_json, Store, StoreError};

/// A device to register before it first connects.
#[derive(Debug, Clone)]
pub struct NewRegisteredDevice {
    pub id: DeviceId,
    pub org_id: String,
    pub product_id: String,
    pub cohort_id: Option<CohortId>,
    pub tags: BTreeMap<String, String>,
    pub pinned_fingerprint: Option<String>,
}

impl Store {
    /// Creates a device in state `registered`. [`StoreError::Conflict`] when the id is taken
    /// (by any organization: device ids are MQTT client ids).
    pub async fn register_device(&self, new: &NewRegisteredDevice) -> Result<(), StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let inserted = sqlx::query(
                "INSERT INTO devices (id, org_id, product_id, cohort_id, tags, state, \
                 state_reason, state_changed_at, online, session_epoch, presence_rank, \
                 pinned_fingerprint, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, FALSE, 0, 1, $9, $8, $8) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(new.id.as_str())
            .bind(&new.org_id)
            .bind(&new.product_id)
            .bind(new.cohort_id.as_ref().map(|c| c.as_str()))
            .bind(tags_to_json(&new.tags))
            .bind(DeviceState::Registered.as_str())
            .bind("registered: awaiting its first connection")
            .bind(now)
            .bind(&new.pinned_fingerprint)
            .execute(&mut *tx)
            .await
            .map_err(|e| super::constraint(e, "device", "the device's product or cohort"))?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::Conflict("a device with this id"));
            }
            if !new.tags.is_empty() {
                let mut q =
                    sqlx::QueryBuilder::new("INSERT INTO device_tags (device_id, key, value) ");
                q.push_values(&new.tags, |mut b, (k, v)| {
                    b.push_bind(new.id.as_str()).push_bind(k).push_bind(v);
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Records certificates that are never admitted again.
    pub async fn revoke_certificates(
        &self,
        org_id: &str,
        device: &DeviceId,
        fingerprints: &[String],
        reason: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            for f in fingerprints {
                sqlx::query(
                    "INSERT INTO revoked_certificates \
                     (fingerprint_sha256, org_id, device_id, reason, revoked_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (fingerprint_sha256) DO NOTHING",
                )
                .bind(f)
                .bind(org_id)
                .bind(device.as_str())
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// A device's revoked certificates, newest first: fingerprint, reason, when (Unix ms).
    pub async fn revoked_certificates_of(
        &self,
        id: &DeviceId,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT fingerprint_sha256, reason, revoked_at FROM revoked_certificates \
                 WHERE device_id = $1 ORDER BY revoked_at DESC, fingerprint_sha256",
            )
            .bind(id.as_str())
            .fetch_all(pool)
            .await
        })?)
    }

    /// The fingerprints revoked for a device (kept after the device is deleted).
    pub async fn revoked_fingerprints_of(&self, id: &DeviceId) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT fingerprint_sha256 FROM revoked_certificates WHERE device_id = $1 \
                 ORDER BY fingerprint_sha256",
            )
            .bind(id.as_str())
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|(f,)| f).collect())
    }

    /// Every revoked certificate's fingerprint, for loading the broker's registry at start.
    pub async fn revoked_fingerprints(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = with_pool!(self, |pool| {
            sqlx::query_as("SELECT fingerprint_sha256 FROM revoked_certificates")
                .fetch_all(pool)
                .await
        })?;
        Ok(rows.into_iter().map(|(f,)| f).collect())
    }

    /// The certificates a device is known by: the one it was provisioned with, and its pin.
    pub async fn device_fingerprints(&self, id: &DeviceId) -> Result<Vec<String>, StoreError> {
        let row: Option<(Option<String>, Option<String>)> = with_pool!(self, |pool| {
            sqlx::query_as("SELECT cert_fingerprint, pinned_fingerprint FROM devices WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await
        })?;
        let (a, b) = row.unwrap_or_default();
        let mut out: Vec<String> = a.into_iter().chain(b).collect();
        out.dedup();
        Ok(out)
    }

    /// Deletes a device and everything of it (tags, telemetry, executions). Returns whether it
    /// existed.
    pub async fn delete_device(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let done = with_pool!(self, |pool| {
            sqlx::query("DELETE FROM devices WHERE id = $1")
                .bind(id.as_str())
                .execute(pool)
                .await
                .map(|d| d.rows_affected())
        })?;
        Ok(done > 0)
    }
}

impl Store {
    /// Deletes the devices among `ids` that belong to `org_id`, and everything of them, in one
    /// transaction; their certificates are refused from then on (`reason`), as for one deleted
    /// device. Returns the ids deleted, sorted. Meant for batches of a few hundred.
    pub async fn delete_devices(
        &self,
        org_id: &str,
        ids: &[DeviceId],
        reason: &str,
    ) -> Result<Vec<DeviceId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let deleted: Vec<(String,)> = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut q = sqlx::QueryBuilder::new(
                "SELECT id, cert_fingerprint, pinned_fingerprint FROM devices WHERE org_id = ",
            );
            q.push_bind(org_id).push(" AND id IN (");
            let mut list = q.separated(", ");
            for id in ids {
                list.push_bind(id.as_str());
            }
            q.push(")");
            let known: Vec<(String, Option<String>, Option<String>)> =
                q.build_query_as().fetch_all(&mut *tx).await?;
            let revoked: Vec<(&str, &str)> = known
                .iter()
                .flat_map(|(id, cert, pin)| {
                    let pin = pin.as_deref().filter(|p| Some(*p) != cert.as_deref());
                    cert.as_deref()
                        .into_iter()
                        .chain(pin)
                        .map(|f| (id.as_str(), f))
                })
                .collect();
            // Five binds a row, well under either backend's limit per statement.
            for chunk in revoked.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO revoked_certificates \
                     (fingerprint_sha256, org_id, device_id, reason, revoked_at) ",
                );
                q.push_values(chunk, |mut b, (id, f)| {
                    b.push_bind(*f)
                        .push_bind(org_id)
                        .push_bind(*id)
                        .push_bind(reason)
                        .push_bind(now);
                });
                q.push(" ON CONFLICT (fingerprint_sha256) DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            let mut q = sqlx::QueryBuilder::new("DELETE FROM devices WHERE org_id = ");
            q.push_bind(org_id).push(" AND id IN (");
            let mut list = q.separated(", ");
            for (id, ..) in &known {
                list.push_bind(id.as_str());
            }
            q.push(") RETURNING id");
            let deleted: Vec<(String,)> = if known.is_empty() {
                Vec::new()
            } else {
                q.build_query_as().fetch_all(&mut *tx).await?
            };
            tx.commit().await?;
            deleted
        });
        let mut out = deleted
            .into_iter()
            .map(|(id,)| {
                DeviceId::parse(&id)
                    .map_err(|e| StoreError::Corrupt(format!("device id {id:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        Ok(out)
    }

    /// The fingerprints revoked for any of `ids` (kept after the devices are deleted).
    pub async fn revoked_fingerprints_of_many(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(1000) {
            let rows: Vec<(String,)> = with_pool!(self, |pool| {
                let mut q = sqlx::QueryBuilder::new(
                    "SELECT fingerprint_sha256 FROM revoked_certificates WHERE device_id IN (",
                );
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                q.push(")");
                q.build_query_as().fetch_all(pool).await
            })?;
            out.extend(rows.into_iter().map(|(f,)| f));
        }
        Ok(out)
    }
}

/// What became of one device of an import batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    Created,
    /// It exists already, exactly as the row describes it.
    Unchanged,
    /// It exists in this organization but differs; names what differs.
    Differs(String),
    /// The id belongs to a device of another organization.
    Taken,
}

/// What an existing device is compared on.
#[derive(sqlx::FromRow)]
struct Existing {
    id: String,
    org_id: String,
    product_id: String,
    cohort_id: Option<String>,
    pinned_fingerprint: Option<String>,
    cert_fingerprint: Option<String>,
}

/// Reads the devices among `$ids` that exist, and their tags, into `$existing` (by id) and
/// `$tags_of`, within transaction `$tx`.
macro_rules! read_existing {
    ($tx:ident, $ids:expr, $existing:ident, $tags_of:ident) => {{
        let mut q = sqlx::QueryBuilder::new(
            "SELECT id, org_id, product_id, cohort_id, pinned_fingerprint, cert_fingerprint \
             FROM devices WHERE id IN (",
        );
        let mut list = q.separated(", ");
        for id in $ids {
            list.push_bind(*id);
        }
        q.push(")");
        let found: Vec<Existing> = q.build_query_as().fetch_all(&mut *$tx).await?;
        if !found.is_empty() {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT device_id, key, value FROM device_tags WHERE device_id IN (",
            );
            let mut list = q.separated(", ");
            for e in &found {
                list.push_bind(e.id.clone());
            }
            q.push(")");
            let rows: Vec<(String, String, String)> =
                q.build_query_as().fetch_all(&mut *$tx).await?;
            for (device, k, v) in rows {
                $tags_of
                    .entry(device)
                    .or_insert_with(BTreeMap::<String, String>::new)
                    .insert(k, v);
            }
        }
        for e in found {
            $existing.insert(e.id.clone(), e);
        }
    }};
}

impl Store {
    /// Imports one batch of devices in one transaction: creates those that do not exist (in
    /// state `registered`) and compares the rest with what the row asks for. Returns one
    /// outcome per device, in order. A device is written whole (row and tags) or not at all.
    /// The ids of a batch must be distinct.
    pub async fn import_devices(
        &self,
        batch: &[NewRegisteredDevice],
    ) -> Result<Vec<ImportOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut existing = std::collections::HashMap::new();
            let mut tags_of = std::collections::HashMap::new();
            let ids: Vec<&str> = batch.iter().map(|d| d.id.as_str()).collect();
            read_existing!(tx, &ids, existing, tags_of);
            let fresh: Vec<&NewRegisteredDevice> = batch
                .iter()
                .filter(|d| !existing.contains_key(d.id.as_str()))
                .collect();
            let mut created = std::collections::HashSet::new();
            if !fresh.is_empty() {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO devices (id, org_id, product_id, cohort_id, tags, state, \
                     state_reason, state_changed_at, online, session_epoch, presence_rank, \
                     pinned_fingerprint, created_at, updated_at) ",
                );
                q.push_values(&fresh, |mut b, d| {
                    b.push_bind(d.id.as_str())
                        .push_bind(&d.org_id)
                        .push_bind(&d.product_id)
                        .push_bind(d.cohort_id.as_ref().map(|c| c.as_str()))
                        .push_bind(tags_to_json(&d.tags))
                        .push_bind(DeviceState::Registered.as_str())
                        .push_bind("registered: awaiting its first connection")
                        .push_bind(now)
                        .push("FALSE, 0, 1")
                        .push_bind(&d.pinned_fingerprint)
                        .push_bind(now)
                        .push_bind(now);
                });
                // A device created meanwhile by another request is left alone, and reported
                // as taken below.
                q.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
                let rows: Vec<(String,)> =
                    q.build_query_as().fetch_all(&mut *tx).await.map_err(|e| {
                        super::constraint(e, "device", "the device's product or cohort")
                    })?;
                created = rows.into_iter().map(|(id,)| id).collect();
                let tags: Vec<(&str, &String, &String)> = fresh
                    .iter()
                    .filter(|d| created.contains(d.id.as_str()))
                    .flat_map(|d| d.tags.iter().map(|(k, v)| (d.id.as_str(), k, v)))
                    .collect();
                // Three binds a tag, well under either backend's limit per statement.
                for chunk in tags.chunks(5000) {
                    let mut q =
                        sqlx::QueryBuilder::new("INSERT INTO device_tags (device_id, key, value) ");
                    q.push_values(chunk, |mut b, (id, k, v)| {
                        b.push_bind(*id).push_bind(*k).push_bind(*v);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                // An id another import created meanwhile (its transaction committed before
                // our insert gave up on it) is compared like any existing device, so
                // concurrent uploads of one file answer `skipped`, not `conflict`.
                let lost: Vec<&str> = fresh
                    .iter()
                    .map(|d| d.id.as_str())
                    .filter(|id| !created.contains(*id))
                    .collect();
                if !lost.is_empty() {
                    read_existing!(tx, &lost, existing, tags_of);
                }
            }
            tx.commit().await?;
            let no_tags = BTreeMap::new();
            Ok(batch
                .iter()
                .map(|d| {
                    if created.contains(d.id.as_str()) {
                        return ImportOutcome::Created;
                    }
                    let Some(e) = existing.get(d.id.as_str()) else {
                        return ImportOutcome::Taken;
                    };
                    if e.org_id != d.org_id {
                        return ImportOutcome::Taken;
                    }
                    let mut differs = Vec::new();
                    if e.product_id != d.product_id {
                        differs.push("product");
                    }
                    if e.cohort_id.as_deref() != d.cohort_id.as_ref().map(|c| c.as_str()) {
                        differs.push("cohort");
                    }
                    if tags_of.get(&e.id).unwrap_or(&no_tags) != &d.tags {
                        differs.push("tags");
                    }
                    if let Some(pin) = &d.pinned_fingerprint {
                        let known = [&e.pinned_fingerprint, &e.cert_fingerprint];
                        if !known.iter().any(|f| f.as_ref() == Some(pin)) {
                            differs.push("certificate");
                        }
                    }
                    if differs.is_empty() {
                        ImportOutcome::Unchanged
                    } else {
                        ImportOutcome::Differs(differs.join(", "))
                    }
                })
                .collect())
        })
    }
}

impl Store {
    /// Refreshes the planner's statistics of the device tables, after a write large enough to
    /// make them stale (a bulk import): without it PostgreSQL plans the device list for the
    /// table as it was (an empty table's plan on a full one is ten times slower) until
    /// autovacuum gets to it. On SQLite the analysis is bounded (`analysis_limit`).
    pub async fn refresh_device_statistics(&self) -> Result<(), StoreError> {
        match &self.backend {
            super::Backend::Postgres(pool) => {
                sqlx::query("ANALYZE devices, device_tags")
                    .execute(pool)
                    .await?;
            }
            super::Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                for statement in [
                    "PRAGMA analysis_limit = 1000",
                    "ANALYZE devices",
                    "ANALYZE device_tags",
                ] {
                    sqlx::query(statement).execute(&mut *conn).await?;
                }
            }
        }
        Ok(())
    }
}

/// What a device update changes; `None` fields stay.
#[derive(Debug, Clone, Default)]
pub struct DeviceUpdate {
    /// Replaces every tag.
    pub tags: Option<BTreeMap<String, String>>,
    /// Moves the device (`Some(None)`: out of every cohort).
    pub cohort_id: Option<Option<CohortId>>,
}

impl Store {
    /// Changes a device's tags and cohort in one transaction. Returns whether it exists.
    pub async fn update_device(
        &self,
        id: &DeviceId,
        update: &DeviceUpdate,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let found = sqlx::query("UPDATE devices SET updated_at = $2 WHERE id = $1")
                .bind(id.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if found == 0 {
                return Ok(false);
            }
            if let Some(cohort) = &update.cohort_id {
                sqlx::query("UPDATE devices SET cohort_id = $2, assigned_at = $3 WHERE id = $1")
                    .bind(id.as_str())
                    .bind(cohort.as_ref().map(|c| c.as_str()))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| super::constraint(e, "device", "the cohort"))?;
            }
            if let Some(tags) = &update.tags {
                sqlx::query("UPDATE devices SET tags = $2 WHERE id = $1")
                    .bind(id.as_str())
                    .bind(tags_to_json(tags))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                if !tags.is_empty() {
                    let mut q =
                        sqlx::QueryBuilder::new("INSERT INTO device_tags (device_id, key, value) ");
                    q.push_values(tags, |mut b, (k, v)| {
                        b.push_bind(id.as_str()).push_bind(k).push_bind(v);
                    });
                    q.build().execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
        });
        Ok(true)
    }
}

impl Store {
    /// Every device an operator moved: `(id, product, cohort, when)`, for publishing their
    /// assignments again on start.
    pub async fn device_assignments(
        &self,
    ) -> Result<Vec<(DeviceId, String, Option<CohortId>, i64)>, StoreError> {
        let rows: Vec<(String, String, Option<String>, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, product_id, cohort_id, assigned_at FROM devices \
                 WHERE assigned_at IS NOT NULL",
            )
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter()
            .map(|(id, product, cohort, at)| {
                let id = DeviceId::parse(&id)
                    .map_err(|e| StoreError::Corrupt(format!("device id {id:?}: {e}")))?;
                let cohort = cohort
                    .map(|c| {
                        CohortId::parse(&c)
                            .map_err(|e| StoreError::Corrupt(format!("cohort id {c:?}: {e}")))
                    })
                    .transpose()?;
                Ok((id, product, cohort, at))
            })
            .collect()
    }
}
