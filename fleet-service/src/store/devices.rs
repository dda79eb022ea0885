//! Devices: provisioning, the start-up loader, lookups and listing, and the clean-up of
//! presence after a node restarted or was lost.

use std::collections::BTreeMap;

use broker::registry::{
    DeviceRecord, NewDevice, Provisioned, RegistryStore, StoreError as RegistryError,
};
use fleet_wire::{CohortId, DeviceId};

use super::{json_from_text, now_ms, tags_from_json, tags_to_json, Store, StoreError};

/// Why a broker node's sessions ended without the node reporting each disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeGone {
    /// The node started again: what it held online belongs to its previous run
    /// (`server_restart`).
    Restarted,
    /// The node's lease expired: it died, stalled or lost the database (`node_lost`).
    Lost,
}

impl NodeGone {
    /// The disconnect reason stored on the devices and their sessions.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeGone::Restarted => fleet_wire::payload::DisconnectReason::ServerRestart.as_str(),
            // `fleet_wire::payload::DisconnectReason` has no `NodeLost` yet: adding it needs an
            // arm in the broker's exhaustive match on reasons (`session.rs::finish`).
            NodeGone::Lost => fleet_wire::payload::DisconnectReason::NodeLost.as_str(),
        }
    }
}

/// Where a device is in its life. Only `registered`, `online` and `offline` follow presence;
/// the others are set deliberately and presence leaves them alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceState {
    Registered,
    Online,
    Offline,
    Updating,
    Quarantined,
    Failed,
}

impl DeviceState {
    pub const ALL: [DeviceState; 6] = [
        DeviceState::Registered,
        DeviceState::Online,
        DeviceState::Offline,
        DeviceState::Updating,
        DeviceState::Quarantined,
        DeviceState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Registered => "registered",
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
            DeviceState::Updating => "updating",
            DeviceState::Quarantined => "quarantined",
            DeviceState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The SQL condition "the current state is one presence may change". Kept next to
/// [`DeviceState`] so the two cannot drift.
pub(super) const PRESENCE_DRIVEN: &str = "state IN ('registered', 'offline', 'online')";

/// The facts of the certificate a device first connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    pub fingerprint_sha256: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_after_ms: i64,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: DeviceId,
    pub org_id: String,
    pub product_id: String,
    pub cohort_id: Option<CohortId>,
    pub ca_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub state: DeviceState,
    pub state_reason: String,
    pub state_changed_at_ms: i64,
    pub online: bool,
    pub session_epoch: u64,
    /// The node holding the device's live session, while it is online.
    pub node_id: Option<String>,
    pub connected_at_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub disconnect_reason: Option<String>,
    pub remote_addr: Option<String>,
    pub firmware_version: Option<String>,
    pub reported: Option<serde_json::Value>,
    pub reported_at_ms: Option<i64>,
    pub last_telemetry: Option<serde_json::Value>,
    pub last_telemetry_at_ms: Option<i64>,
    pub certificate: Option<DeviceCertificate>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Filters for [`Store::devices`]; all given ones must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// The organization whose devices are listed; `None` lists every organization's.
    pub org_id: Option<String>,
    pub state: Option<DeviceState>,
    pub product_id: Option<String>,
    pub cohort_id: Option<String>,
    pub online: Option<bool>,
    /// `(key, value)` pairs the device must all carry.
    pub tags: Vec<(String, String)>,
    /// The version its reported state names.
    pub firmware_version: Option<String>,
    /// Last seen strictly before / at or after (Unix ms); a device never seen matches neither.
    pub last_seen_before_ms: Option<i64>,
    pub last_seen_after_ms: Option<i64>,
    /// Ids starting with this (device-id characters only).
    pub id_prefix: Option<String>,
    /// Certificate `not_after` strictly before (Unix ms).
    pub cert_expires_before_ms: Option<i64>,
    /// The CA the device belongs to (it provisioned it, or signed its first certificate).
    pub ca_id: Option<String>,
}

/// The order of a device listing. Every order ends with the id, so it is total and a cursor
/// (the last row's sort key and id) resumes it exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSort {
    #[default]
    Id,
    /// Least recently seen first; never seen before everything.
    LastSeen,
    /// Most recently seen first; never seen after everything.
    LastSeenDesc,
    CreatedAt,
    CreatedAtDesc,
}

impl DeviceSort {
    pub const ALL: [DeviceSort; 5] = [
        DeviceSort::Id,
        DeviceSort::LastSeen,
        DeviceSort::LastSeenDesc,
        DeviceSort::CreatedAt,
        DeviceSort::CreatedAtDesc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceSort::Id => "id",
            DeviceSort::LastSeen => "last_seen",
            DeviceSort::LastSeenDesc => "-last_seen",
            DeviceSort::CreatedAt => "created_at",
            DeviceSort::CreatedAtDesc => "-created_at",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The SQL expression sorted on before the id (an index of migration 0010 has it), or
    /// none for the id order.
    fn key(self) -> Option<&'static str> {
        match self {
            DeviceSort::Id => None,
            DeviceSort::LastSeen | DeviceSort::LastSeenDesc => Some("COALESCE(last_seen, -1)"),
            DeviceSort::CreatedAt | DeviceSort::CreatedAtDesc => Some("created_at"),
        }
    }

    fn descending(self) -> bool {
        matches!(self, DeviceSort::LastSeenDesc | DeviceSort::CreatedAtDesc)
    }

    /// The sort key of a device, as the cursor after it carries it.
    pub fn key_of(self, d: &Device) -> i64 {
        match self {
            DeviceSort::Id => 0,
            DeviceSort::LastSeen | DeviceSort::LastSeenDesc => d.last_seen_ms.unwrap_or(-1),
            DeviceSort::CreatedAt | DeviceSort::CreatedAtDesc => d.created_at_ms,
        }
    }
}

/// Where a listing resumes: after the device with this sort key and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCursor {
    pub key: i64,
    pub id: DeviceId,
}

/// Appends ` AND ...` for every condition of `$filter` ([`DeviceFilter`]) to `$q`, a query
/// over `devices` whose WHERE clause is open. A macro, so it expands inside each backend's arm
/// of `with_pool!`; the listing, the count and the bulk deletion share it, so they select the
/// same devices.
macro_rules! push_device_filter {
    ($q:ident, $filter:expr) => {{
        let filter: &DeviceFilter = $filter;
        if let Some(org_id) = &filter.org_id {
            $q.push(" AND org_id = ").push_bind(org_id.as_str());
        }
        if let Some(state) = filter.state {
            $q.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(product_id) = &filter.product_id {
            $q.push(" AND product_id = ").push_bind(product_id.as_str());
        }
        if let Some(cohort_id) = &filter.cohort_id {
            $q.push(" AND cohort_id = ").push_bind(cohort_id.as_str());
        }
        if let Some(online) = filter.online {
            $q.push(" AND online = ").push_bind(online);
        }
        if let Some(ca_id) = &filter.ca_id {
            $q.push(" AND ca_id = ").push_bind(ca_id.as_str());
        }
        for (key, value) in &filter.tags {
            $q.push(
                " AND EXISTS (SELECT 1 FROM device_tags t \
                 WHERE t.device_id = devices.id AND t.key = ",
            )
            .push_bind(key.as_str())
            .push(" AND t.value = ")
            .push_bind(value.as_str())
            .push(")");
        }
        if let Some(v) = &filter.firmware_version {
            $q.push(" AND firmware_version = ").push_bind(v.as_str());
        }
        if let Some(t) = filter.last_seen_before_ms {
            $q.push(" AND last_seen < ").push_bind(t);
        }
        if let Some(t) = filter.last_seen_after_ms {
            $q.push(" AND last_seen >= ").push_bind(t);
        }
        if let Some(t) = filter.cert_expires_before_ms {
            $q.push(" AND cert_not_after < ").push_bind(t);
        }
        if let Some(prefix) = &filter.id_prefix {
            // A range, so the id index serves it; `~` sorts after every character a
            // device id may contain.
            $q.push(" AND id >= ").push_bind(prefix.as_str());
            $q.push(" AND id < ").push_bind(format!("{prefix}~"));
        }
    }};
}

#[derive(sqlx::FromRow)]
struct DeviceRow {
    id: String,
    org_id: String,
    product_id: String,
    cohort_id: Option<String>,
    ca_id: Option<String>,
    tags: String,
    state: String,
    state_reason: String,
    state_changed_at: i64,
    online: bool,
    session_epoch: i64,
    node_id: Option<String>,
    connected_at: Option<i64>,
    last_seen: Option<i64>,
    disconnect_reason: Option<String>,
    remote_addr: Option<String>,
    firmware_version: Option<String>,
    reported: Option<String>,
    reported_at: Option<i64>,
    last_telemetry: Option<String>,
    last_telemetry_at: Option<i64>,
    cert_fingerprint: Option<String>,
    cert_subject: Option<String>,
    cert_issuer: Option<String>,
    cert_serial: Option<String>,
    cert_not_after: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

const DEVICE_COLUMNS: &str =
    "id, org_id, product_id, cohort_id, ca_id, tags, state, state_reason, \
    state_changed_at, online, session_epoch, node_id, connected_at, last_seen, \
    disconnect_reason, remote_addr, firmware_version, reported, reported_at, last_telemetry, \
    last_telemetry_at, cert_fingerprint, cert_subject, cert_issuer, cert_serial, cert_not_after, \
    created_at, updated_at";

fn device_id(s: &str) -> Result<DeviceId, StoreError> {
    DeviceId::parse(s).map_err(|e| StoreError::Corrupt(format!("device id {s:?}: {e}")))
}

fn cohort_id(s: Option<String>) -> Result<Option<CohortId>, StoreError> {
    s.map(|c| CohortId::parse(&c).map_err(|e| StoreError::Corrupt(format!("cohort id {c:?}: {e}"))))
        .transpose()
}

impl TryFrom<DeviceRow> for Device {
    type Error = StoreError;

    fn try_from(r: DeviceRow) -> Result<Self, StoreError> {
        let certificate = match r.cert_fingerprint {
            Some(fingerprint_sha256) => Some(DeviceCertificate {
                fingerprint_sha256,
                subject: r.cert_subject.unwrap_or_default(),
                issuer: r.cert_issuer.unwrap_or_default(),
                serial: r.cert_serial.unwrap_or_default(),
                not_after_ms: r.cert_not_after.unwrap_or_default(),
            }),
            None => None,
        };
        Ok(Device {
            id: device_id(&r.id)?,
            org_id: r.org_id,
            product_id: r.product_id,
            cohort_id: cohort_id(r.cohort_id)?,
            ca_id: r.ca_id,
            tags: tags_from_json(&r.tags)?,
            state: DeviceState::parse(&r.state)
                .ok_or_else(|| StoreError::Corrupt(format!("device state {:?}", r.state)))?,
            state_reason: r.state_reason,
            state_changed_at_ms: r.state_changed_at,
            online: r.online,
            session_epoch: r.session_epoch.max(0) as u64,
            node_id: r.node_id,
            connected_at_ms: r.connected_at,
            last_seen_ms: r.last_seen,
            disconnect_reason: r.disconnect_reason,
            remote_addr: r.remote_addr,
            firmware_version: r.firmware_version,
            reported: json_from_text(r.reported, "reported state")?,
            reported_at_ms: r.reported_at,
            last_telemetry: json_from_text(r.last_telemetry, "last telemetry")?,
            last_telemetry_at_ms: r.last_telemetry_at,
            certificate,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct DeviceRecordRow {
    id: String,
    org_id: String,
    ca_id: Option<String>,
    pinned_fingerprint: Option<String>,
    product_id: String,
    cohort_id: Option<String>,
    session_epoch: i64,
}

impl TryFrom<DeviceRecordRow> for DeviceRecord {
    type Error = StoreError;

    fn try_from(r: DeviceRecordRow) -> Result<Self, StoreError> {
        Ok(DeviceRecord {
            ca_id: r.ca_id,
            pinned_fingerprint: r.pinned_fingerprint,
            id: device_id(&r.id)?,
            org_id: r.org_id,
            product_id: r.product_id,
            cohort_id: cohort_id(r.cohort_id)?,
            session_epoch: r.session_epoch.max(0) as u64,
        })
    }
}

impl Store {
    /// Gives a device registered before manufacturing its CA and certificate facts, unless it
    /// has a CA already.
    pub async fn claim(
        &self,
        id: &DeviceId,
        ca_id: &str,
        cert: &broker::registry::CertFacts,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let org: Option<(String,)> = sqlx::query_as(
                "UPDATE devices SET ca_id = $2, cert_fingerprint = $3, cert_subject = $4, \
                 cert_issuer = $5, cert_serial = $6, cert_not_after = $7, updated_at = $8 \
                 WHERE id = $1 AND ca_id IS NULL RETURNING org_id",
            )
            .bind(id.as_str())
            .bind(ca_id)
            .bind(&cert.fingerprint_sha256)
            .bind(&cert.subject)
            .bind(&cert.issuer)
            .bind(&cert.serial)
            .bind(cert.not_after_ms)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((org_id,)) = org {
                sqlx::query(super::audit::DEVICE_EVENT)
                    .bind(org_id)
                    .bind(now)
                    .bind("device.first_connection")
                    .bind(id.as_str())
                    .bind(
                        serde_json::json!({
                            "ca_id": ca_id,
                            "certificate_fingerprint": cert.fingerprint_sha256,
                        })
                        .to_string(),
                    )
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }
}

/// Reason recorded on a device created by just-in-time provisioning.
const PROVISIONED_REASON: &str = "provisioned: jitp";

impl Store {
    /// Inserts the device unless one with its id exists, and returns the row as stored with
    /// whether this call created it: [`Store::provision_many`] of one. Safe under concurrency:
    /// one row per id, whoever wins. A row owned by another CA is [`StoreError::Collision`].
    pub async fn provision(&self, new: &NewDevice) -> Result<Provisioned, StoreError> {
        self.provision_many(std::slice::from_ref(new))
            .await?
            .pop()
            .expect("one answer per device")
    }

    /// Creates each device unless a row with its id exists, all in one transaction (a group
    /// commit: a storm of first connections costs one commit per batch, not per device), and
    /// answers each with its row as stored, or a collision when the id belongs to another CA
    /// or organization. Err when the transaction failed: nothing was written, and the caller
    /// may retry the devices one by one so that one bad device costs only itself.
    pub async fn provision_many(
        &self,
        batch: &[NewDevice],
    ) -> Result<Vec<Result<Provisioned, StoreError>>, StoreError> {
        let now = now_ms();
        let rows: Vec<(bool, DeviceRecordRow)> = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut rows = Vec::with_capacity(batch.len());
            for new in batch {
                let tags_json = tags_to_json(&new.tags);
                let inserted: Option<(String,)> = sqlx::query_as(
                    "INSERT INTO devices (id, product_id, cohort_id, ca_id, tags, state, state_reason, \
                     state_changed_at, online, session_epoch, presence_rank, cert_fingerprint, \
                     cert_subject, cert_issuer, cert_serial, cert_not_after, created_at, updated_at, \
                     org_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, FALSE, 0, 1, $9, $10, $11, $12, $13, \
                     $8, $8, $14) \
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                )
                .bind(new.id.as_str())
                .bind(&new.product_id)
                .bind(new.cohort_id.as_str())
                .bind(&new.ca_id)
                .bind(&tags_json)
                .bind(DeviceState::Registered.as_str())
                .bind(PROVISIONED_REASON)
                .bind(now)
                .bind(&new.cert.fingerprint_sha256)
                .bind(&new.cert.subject)
                .bind(&new.cert.issuer)
                .bind(&new.cert.serial)
                .bind(new.cert.not_after_ms)
                .bind(&new.org_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| {
                    super::constraint(e, "device", "the device's product, cohort or CA")
                })?;
                let created = inserted.is_some();
                if created && !new.tags.is_empty() {
                    let mut q =
                        sqlx::QueryBuilder::new("INSERT INTO device_tags (device_id, key, value) ");
                    q.push_values(&new.tags, |mut b, (k, v)| {
                        b.push_bind(new.id.as_str()).push_bind(k).push_bind(v);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                if created {
                    sqlx::query(super::audit::DEVICE_EVENT)
                        .bind(&new.org_id)
                        .bind(now)
                        .bind("device.provision")
                        .bind(new.id.as_str())
                        .bind(
                            serde_json::json!({
                                "ca_id": new.ca_id,
                                "product_id": new.product_id,
                                "cohort_id": new.cohort_id.as_str(),
                                "certificate_fingerprint": new.cert.fingerprint_sha256,
                            })
                            .to_string(),
                        )
                        .execute(&mut *tx)
                        .await?;
                }
                let row: DeviceRecordRow = sqlx::query_as(
                    "SELECT id, org_id, ca_id, pinned_fingerprint, product_id, cohort_id, session_epoch FROM devices \
                     WHERE id = $1",
                )
                .bind(new.id.as_str())
                .fetch_one(&mut *tx)
                .await?;
                rows.push((created, row));
            }
            tx.commit().await?;
            rows
        });
        Ok(batch
            .iter()
            .zip(rows)
            .map(|(new, (created, row))| {
                if row.ca_id.as_deref().is_some_and(|c| c != new.ca_id) || row.org_id != new.org_id
                {
                    return Err(StoreError::Collision(new.id.clone()));
                }
                Ok(Provisioned {
                    device: row.try_into()?,
                    created,
                })
            })
            .collect())
    }

    /// Every device, as the broker's registry wants it, for loading at start.
    pub async fn load_device_records(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows: Vec<DeviceRecordRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, org_id, ca_id, pinned_fingerprint, product_id, cohort_id, session_epoch FROM devices \
                 ORDER BY id",
            )
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(DeviceRecord::try_from).collect()
    }

    /// One device as the broker's registry wants it; `None` when it does not exist.
    pub async fn device_record(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let row: Option<DeviceRecordRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, org_id, ca_id, pinned_fingerprint, product_id, cohort_id, session_epoch \
                 FROM devices WHERE id = $1",
            )
            .bind(id.as_str())
            .fetch_optional(pool)
            .await
        })?;
        row.map(DeviceRecord::try_from).transpose()
    }

    /// The devices among `ids` that exist, as the broker's registry wants them, by id.
    pub async fn device_records(&self, ids: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        // One bind an id, well under either backend's limit per statement.
        for chunk in ids.chunks(1000) {
            let rows: Vec<DeviceRecordRow> = with_pool!(self, |pool| {
                let mut q = sqlx::QueryBuilder::new(
                    "SELECT id, org_id, ca_id, pinned_fingerprint, product_id, cohort_id, \
                     session_epoch FROM devices WHERE id IN (",
                );
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                q.push(") ORDER BY id");
                q.build_query_as().fetch_all(pool).await
            })?;
            for row in rows {
                out.push(DeviceRecord::try_from(row)?);
            }
        }
        Ok(out)
    }

    pub async fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        let row: Option<DeviceRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"
            ))
            .bind(id.as_str())
            .fetch_optional(pool)
            .await
        })?;
        row.map(Device::try_from).transpose()
    }

    /// Up to `limit` devices matching `filter`, ordered by id, starting after `after`.
    pub async fn devices(
        &self,
        filter: &DeviceFilter,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<Device>, StoreError> {
        let after = after.map(|id| DeviceCursor {
            key: 0,
            id: id.clone(),
        });
        self.devices_sorted(filter, DeviceSort::Id, after.as_ref(), limit)
            .await
    }

    /// Up to `limit` devices matching `filter`, in `sort` order, starting after `after`.
    pub async fn devices_sorted(
        &self,
        filter: &DeviceFilter,
        sort: DeviceSort,
        after: Option<&DeviceCursor>,
        limit: u32,
    ) -> Result<Vec<Device>, StoreError> {
        let rows: Vec<DeviceRow> = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new(format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE 1 = 1"
            ));
            push_device_filter!(q, filter);
            let (cmp, dir) = if sort.descending() {
                ("<", "DESC")
            } else {
                (">", "ASC")
            };
            match (sort.key(), after) {
                (None, Some(after)) => {
                    q.push(format!(" AND id {cmp} "))
                        .push_bind(after.id.as_str());
                }
                (Some(key), Some(after)) => {
                    // A row comparison, which both backends serve from the (org_id, key, id)
                    // index.
                    q.push(format!(" AND ({key}, id) {cmp} ("))
                        .push_bind(after.key)
                        .push(", ")
                        .push_bind(after.id.as_str())
                        .push(")");
                }
                (_, None) => {}
            }
            match sort.key() {
                Some(key) => q.push(format!(" ORDER BY {key} {dir}, id {dir} LIMIT ")),
                None => q.push(format!(" ORDER BY id {dir} LIMIT ")),
            };
            q.push_bind(i64::from(limit));
            q.build_query_as().fetch_all(pool).await
        })?;
        rows.into_iter().map(Device::try_from).collect()
    }

    /// How many devices match `filter`.
    pub async fn count_devices(&self, filter: &DeviceFilter) -> Result<u64, StoreError> {
        let (n,): (i64,) = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new("SELECT COUNT(*) FROM devices WHERE 1 = 1");
            push_device_filter!(q, filter);
            q.build_query_as().fetch_one(pool).await
        })?;
        Ok(n.max(0) as u64)
    }

    /// The ids of up to `limit` devices matching `filter`, in id order.
    pub async fn device_ids(
        &self,
        filter: &DeviceFilter,
        limit: u32,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let rows: Vec<(String,)> = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new("SELECT id FROM devices WHERE 1 = 1");
            push_device_filter!(q, filter);
            q.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
            q.build_query_as().fetch_all(pool).await
        })?;
        rows.into_iter().map(|(id,)| device_id(&id)).collect()
    }

    /// Marks every device this node held online as offline, and ends the sessions of its
    /// connection history that this node left open, because the node restarted and those
    /// sessions are gone (`server_restart`); returns the devices' ids, sorted. Session epochs
    /// stay, so a late presence event from one of those sessions is still recognised as stale.
    pub async fn mark_node_offline(&self, node_id: &str) -> Result<Vec<DeviceId>, StoreError> {
        let marked = self
            .mark_node_offline_as(node_id, NodeGone::Restarted)
            .await?;
        Ok(marked.into_iter().map(|(id, _)| id).collect())
    }

    /// Marks every device `node_id` held online as offline with `reason`, and ends the open
    /// sessions of its connection history; returns each device with its session epoch (the
    /// epoch an offline presence for it must carry), sorted by id. Conditional on `online AND
    /// node_id`, so each device is marked once however many callers race.
    pub async fn mark_node_offline_as(
        &self,
        node_id: &str,
        reason: NodeGone,
    ) -> Result<Vec<(DeviceId, u64)>, StoreError> {
        Ok(self
            .end_node_sessions(node_id, reason, None)
            .await?
            .unwrap_or_default())
    }

    /// [`Store::mark_node_offline_as`], in one transaction with deleting the lease term
    /// `(name, holder, token)` when `lease` is given: `None` (and nothing changed) if that term
    /// is gone, because another caller reaped it or the node renewed it.
    pub(super) async fn end_node_sessions(
        &self,
        node_id: &str,
        reason: NodeGone,
        lease: Option<(&str, &str, i64)>,
    ) -> Result<Option<Vec<(DeviceId, u64)>>, StoreError> {
        let now = now_ms();
        let reason = reason.as_str();
        let rows: Option<Vec<(String, i64)>> = with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let held = match lease {
                Some((name, holder, token)) => {
                    sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2 AND token = $3")
                        .bind(name)
                        .bind(holder)
                        .bind(token)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1
                }
                None => true,
            };
            if held {
                let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
                    "UPDATE devices SET online = FALSE, \
                     state = CASE WHEN {PRESENCE_DRIVEN} THEN $2 ELSE state END, \
                     state_reason = CASE WHEN {PRESENCE_DRIVEN} THEN $3 ELSE state_reason END, \
                     state_changed_at = CASE WHEN {PRESENCE_DRIVEN} AND state <> $2 \
                         THEN $4 ELSE state_changed_at END, \
                     disconnect_reason = $5, last_seen = $4, presence_rank = 1, node_id = NULL, \
                     updated_at = $4 \
                     WHERE online = TRUE AND node_id = $1 \
                     RETURNING id, session_epoch"
                ))
                .bind(node_id)
                .bind(DeviceState::Offline.as_str())
                .bind(format!("disconnected: {reason}"))
                .bind(now)
                .bind(reason)
                .fetch_all(&mut *tx)
                .await?;
                // The connection history ends the sessions the lost run held, too.
                sqlx::query(
                    "UPDATE device_sessions SET ended_at = $2, end_reason = $3 \
                     WHERE node_id = $1 AND ended_at IS NULL",
                )
                .bind(node_id)
                .bind(now)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Some(rows)
            } else {
                tx.rollback().await?;
                None
            }
        });
        let Some(rows) = rows else {
            return Ok(None);
        };
        let mut marked = rows
            .into_iter()
            .map(|(id, epoch)| Ok((device_id(&id)?, epoch.max(0) as u64)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        marked.sort();
        Ok(Some(marked))
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Collision(id) => RegistryError::Collision(id),
            other => RegistryError::Backend(other.to_string()),
        }
    }
}

#[async_trait::async_trait]
impl RegistryStore for Store {
    async fn provision_device(&self, new: &NewDevice) -> Result<Provisioned, RegistryError> {
        Ok(self.provision(new).await?)
    }

    async fn claim_device(
        &self,
        id: &DeviceId,
        ca_id: &str,
        cert: &broker::registry::CertFacts,
    ) -> Result<(), RegistryError> {
        self.claim(id, ca_id, cert)
            .await
            .map_err(|e| RegistryError::Backend(e.to_string()))
    }

    async fn device_record(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        Store::device_record(self, id)
            .await
            .map_err(|e| RegistryError::Backend(e.to_string()))
    }
}
