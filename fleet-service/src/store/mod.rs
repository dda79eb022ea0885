//! The database: the only module that writes SQL.
//!
//! One [`Store`] over either SQLite or PostgreSQL, chosen by the URL scheme. Both backends run
//! the same portable SQL (`$n` placeholders, `ON CONFLICT`, `RETURNING`) against the same schema
//! (`migrations/sqlite` and `migrations/postgres`, embedded and applied by [`Store::connect`]).
//!
//! # Layout
//! - `catalog`: products and cohorts, and deleting them once nothing depends on them.
//! - `commands`: commands sent over REST to a device or a cohort, and the devices' acks.
//! - [`cas`]: manufacturing CA certificates, and the PEM checks every CA goes through.
//! - `devices`: device rows, just-in-time provisioning ([`broker::registry::RegistryStore`]),
//!   the start-up loaders, listing and presence clean-up after a node restarted or was lost.
//! - `events`: the intake's batched writes (presence, telemetry, reported state) and telemetry
//!   retention.
//! - `leases`: named, expiring leases with fencing tokens (singletons across replicas, broker
//!   node liveness), judged on the database's clock.
//! - `orgs`: organizations, the boundary every other row sits inside.
//! - `lifecycle`: devices registered before manufacturing (optionally pinned to one
//!   certificate), deletion, and revoked certificates.
//! - `quarantine`: setting devices apart, and lifting it.
//! - `summary`: the fleet summary's grouped counts.
//! - `ca_proof`: verification codes for CA proof of possession.
//! - `audit`: the audit log, insert-only.
//! - `api_keys`: API key rows (hashes only), with their organization and scope.
//! - `updates`: signing keys, releases, deployments and their per-device executions, and the
//!   intake's writes of device update reports.
//!
//! # Invariants
//! - Timestamps are Unix milliseconds (`BIGINT`); JSON documents are `TEXT`.
//! - Every write that spans statements runs in one transaction. On SQLite a write transaction
//!   starts with `BEGIN IMMEDIATE`, so it takes the write lock up front and waits on
//!   `busy_timeout` instead of failing on a lock upgrade.
//! - Identifiers order bytewise on both backends (`COLLATE "C"` on PostgreSQL), so cursors
//!   over `ORDER BY id` behave the same.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Runs `$body` with `$pool` bound to the concrete pool of the store's backend. The body is
/// compiled once per backend, so it must be valid for both: portable SQL, types both decode.
/// The second form also binds `$begin`, the statement that opens a write transaction.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite($pool) => $body,
            $crate::store::Backend::Postgres($pool) => $body,
        }
    };
    ($store:expr, |$pool:ident, $begin:ident| $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite($pool) => {
                let $begin = "BEGIN IMMEDIATE";
                $body
            }
            $crate::store::Backend::Postgres($pool) => {
                let $begin = "BEGIN";
                $body
            }
        }
    };
}

mod api_keys;
mod audit;
mod ca_proof;
pub mod cas;
mod catalog;
mod commands;
mod devices;
mod events;
mod leases;
mod lifecycle;
mod orgs;
mod quarantine;
mod summary;
mod updates;

pub use api_keys::ApiKeyRecord;
pub use audit::{ActorKind, AuditEntry, AuditFilter, NewAuditEntry};
pub use ca_proof::VerificationCode;
pub use cas::{CaCertificate, CaUpdate, NewCa};
pub use catalog::{Cohort, Product};
pub use commands::{
    command_status_name, CohortCommand, CommandAckRecord, CommandAckRow, DeviceCommand, NewCommand,
};
pub use devices::{
    Device, DeviceCertificate, DeviceCursor, DeviceFilter, DeviceSort, DeviceState, NodeGone,
};
pub use events::{
    EventBatch, EventOutcome, LatestTelemetry, ReportedChange, SessionRecord, TelemetryRecord,
    TelemetryRetention, TelemetryRow,
};
pub use leases::{ExpiredLease, Lease, LeaseRecord};
pub use lifecycle::{DeviceUpdate, ImportOutcome, NewRegisteredDevice};
pub use orgs::Organization;
pub use summary::{FleetSummary, SummaryGroup, SummaryScope, FIRMWARE_VERSIONS};
pub use updates::{
    DeferReason, Deployment, DeploymentKind, Execution, ExecutionStatus, ExecutionSummary,
    NewDeployment, Release, SigningKey, StateChange, UpdateReport,
};

/// A handle on the database. Cheap to clone: it is a connection pool.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
pub(crate) enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .finish()
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL: expected sqlite:// or postgres://")]
    UnsupportedUrl,
    /// A unique constraint refused the write; names what already exists.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// A foreign key refused the write; names what is missing.
    #[error("{0} does not exist")]
    MissingReference(&'static str),
    /// The device id is already taken by a device of another CA.
    #[error("device id {0} is owned by another CA")]
    Collision(fleet_wire::DeviceId),
    /// A stored value no longer parses (for example a hand-edited row).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed: lost connections, pool timeouts,
    /// lock contention, serialization failures. Constraint and data errors are not transient.
    pub fn is_transient(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let Some(code) = db.code() else {
                    return false;
                };
                if let Ok(n) = code.parse::<u32>() {
                    // SQLite extended result codes: the primary code is the low byte.
                    // 5 = SQLITE_BUSY, 6 = SQLITE_LOCKED.
                    matches!(n & 0xff, 5 | 6)
                } else {
                    // PostgreSQL SQLSTATE: connection exceptions, transaction rollbacks
                    // (serialization failure, deadlock), insufficient resources, lock not
                    // available, operator intervention (shutdown, cannot connect now).
                    code.starts_with("08")
                        || code.starts_with("40")
                        || code.starts_with("53")
                        || code == "55P03"
                        || code.starts_with("57P")
                }
            }
            _ => false,
        }
    }

    /// Whether the store was closed: nothing will ever succeed again.
    pub fn is_closed(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::PoolClosed))
    }
}

/// What a delete found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion<T = ()> {
    Deleted(T),
    /// Nothing with that id (in that organization).
    NotFound,
    /// Rows that still depend on it, and how many of each; nothing was deleted.
    InUse(Vec<(Dependent, u64)>),
}

/// What may keep a product, cohort, CA or organization from being deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependent {
    Products,
    Cohorts,
    Devices,
    /// CA certificates of an organization.
    CaCertificates,
    /// CAs that provision into the cohort (their `jitp`).
    ProvisioningCas,
    /// Unrevoked API keys scoped to the product or cohort.
    ApiKeys,
    /// An active or paused deployment.
    LiveDeployments,
    /// Rows a check did not foresee (a foreign key refused the delete).
    Other,
}

/// Whether a statement failed because a foreign key still refers to the row it deletes.
fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// Counts `$sql` (one `COUNT(*)` with `$bind` as `$1`) in transaction `$tx`, and notes it in
/// `$in_use` as `$dependent` when it is not zero.
macro_rules! note_dependents {
    ($tx:ident, $in_use:ident, $dependent:expr, $sql:expr, $bind:expr) => {{
        let (n,): (i64,) = sqlx::query_as($sql)
            .bind($bind)
            .fetch_one(&mut *$tx)
            .await?;
        if n > 0 {
            $in_use.push(($dependent, n as u64));
        }
    }};
}
pub(crate) use note_dependents;

/// Maps a unique violation to [`StoreError::Conflict`] and a foreign key violation to
/// [`StoreError::MissingReference`]; anything else stays a database error.
fn constraint(e: sqlx::Error, conflict: &'static str, missing: &'static str) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        if db.is_unique_violation() {
            return StoreError::Conflict(conflict);
        }
        if db.is_foreign_key_violation() {
            return StoreError::MissingReference(missing);
        }
    }
    StoreError::Database(e)
}

/// Applies the SQLite migrations on one connection with foreign keys off, as SQLite's
/// table-rebuild procedure needs (a table that others reference cannot be replaced otherwise,
/// and the pragma is a no-op inside the transaction each migration runs in); then checks that
/// every foreign key still holds, and turns them back on.
async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), StoreError> {
    use sqlx::Connection as _;
    let mut conn = pool.acquire().await?;
    sqlx::query("PRAGMA foreign_keys = OFF")
        .execute(&mut *conn)
        .await?;
    let migrated = sqlx::migrate!("./migrations/sqlite").run(&mut *conn).await;
    let violations: Vec<(String,)> =
        sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
            .fetch_all(&mut *conn)
            .await?;
    sqlx::query("PRAGMA foreign_keys = ON")
        .execute(&mut *conn)
        .await?;
    conn.ping().await?;
    migrated?;
    if let Some((table,)) = violations.first() {
        return Err(StoreError::Corrupt(format!(
            "{} foreign key violations after migrating (first in table {table})",
            violations.len()
        )));
    }
    Ok(())
}

impl Store {
    /// Connects to `sqlite://path` (the file is created if missing) or `postgres://...`, and
    /// applies the embedded migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            let memory = url.contains(":memory:") || url.contains("mode=memory");
            let mut opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10))
                .synchronous(SqliteSynchronous::Normal);
            let pool = if memory {
                // Every connection to `:memory:` is its own database: keep exactly one, forever.
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            } else {
                opts = opts.journal_mode(SqliteJournalMode::Wal);
                SqlitePoolOptions::new().max_connections(8)
            }
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
            migrate_sqlite(&pool).await?;
            Backend::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let store = Store { backend };
        tracing::info!(backend = store.backend_name(), "database ready");
        Ok(store)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Whether the database answers a trivial query within `within`.
    pub async fn ping(&self, within: Duration) -> Result<(), StoreError> {
        let ping = async {
            with_pool!(self, |pool| sqlx::query("SELECT 1")
                .execute(pool)
                .await
                .map(drop))?;
            Ok(())
        };
        match tokio::time::timeout(within, ping).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Closes every connection; later calls fail with a closed-pool error.
    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await)
    }
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A new identifier for products, cohorts, CAs and API keys: a UUID v7, time ordered and safe
/// as a topic segment.
pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn tags_to_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".to_owned())
}

fn tags_from_json(s: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("tags: {e}")))
}

fn json_from_text(s: Option<String>, what: &str) -> Result<Option<serde_json::Value>, StoreError> {
    s.map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// One page of a listing ordered by id: the rows after `after` (before it, for newest-first
/// listings), and one more than `limit`, so the caller sees whether another page follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: u32,
}

impl PageRequest {
    /// Every row at once, for callers that need the whole list (start-up loads, summaries).
    pub const ALL: PageRequest = PageRequest {
        after: None,
        limit: u32::MAX - 1,
    };

    /// The `LIMIT` to ask for: one row more than the page holds.
    pub(crate) fn fetch(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}
