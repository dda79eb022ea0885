//! Test harness shared by the integration tests: a fresh database per test (SQLite in a temp
//! dir, or a new PostgreSQL database when `FLEET_TEST_POSTGRES_URL` is set), certificates made
//! with rcgen, and builders for the rows the scenarios need.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::BTreeMap;

use broker::registry::{CertFacts, JitpSettings, NewDevice};
use fleet_service::store::cas::parse_ca_pem;
use fleet_service::store::{CaCertificate, Cohort, EventBatch, NewCa, Product, Store};
use fleet_wire::payload::{DisconnectReason, Presence, PresenceEvent};
use fleet_wire::{CohortId, DeviceId};
use sqlx::Connection;

pub const PG_ENV: &str = "FLEET_TEST_POSTGRES_URL";

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// `(server URL, database name)` to drop afterwards.
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
        TestDb {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A new, uniquely named database on the server in `FLEET_TEST_POSTGRES_URL`; `None` (and
    /// a line saying the test is skipped) when the variable is not set.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let Ok(server) = std::env::var(PG_ENV) else {
            eprintln!("{test}: skipped: {PG_ENV} not set");
            return None;
        };
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .expect("connecting to the PostgreSQL test server");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        conn.close().await.ok();
        Some(TestDb {
            url: with_database(&server, &name),
            _dir: None,
            pg: Some((server, name)),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.pg.take() else {
            return;
        };
        // Drop runs inside the test's runtime; a fresh one on its own thread does the cleanup.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&server).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// `server` with its database (path) replaced by `db`, keeping any query string.
fn with_database(server: &str, db: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    let mut url = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// Runs a scenario `async fn name(url: &str)` once on SQLite and once on PostgreSQL, as the
/// tests `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = $crate::common::TestDb::sqlite();
                    super::$name(&db.url).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let Some(db) =
                        $crate::common::TestDb::postgres(concat!(stringify!($name), "::postgres"))
                            .await
                    else {
                        return;
                    };
                    super::$name(&db.url).await;
                }
            }
        )*
    };
}

/// Runs one SQL statement directly, for setting up states no API reaches yet.
pub async fn exec_sql(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}

/// A CA made by rcgen.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// A device certificate with `cn` as its subject CN, signed by this CA.
    pub fn issue(&self, cn: &str) -> rcgen::Certificate {
        self.issue_with_key(cn).0
    }

    /// [`TestCa::issue`], with the device's key.
    pub fn issue_with_key(&self, cn: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }
}

/// A self-signed certificate that is not a CA.
pub fn leaf_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["leaf.example".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "leaf");
    params.self_signed(&key).unwrap().pem()
}

/// A product, one of its cohorts, and a CA provisioning into it.
pub struct Catalog {
    pub product: Product,
    pub cohort: Cohort,
    pub ca: CaCertificate,
    pub test_ca: TestCa,
}

pub async fn catalog(store: &Store, name: &str) -> Catalog {
    let product = store.create_product("default", name).await.unwrap();
    let cohort = store.create_cohort(&product, "default").await.unwrap();
    let test_ca = TestCa::new(&format!("{name} CA"));
    let ca = store
        .create_ca(NewCa {
            org_id: "default".into(),
            keep_devices_when_disabled: false,
            cert: parse_ca_pem(&test_ca.pem()).unwrap(),
            description: Some(format!("{name} manufacturing")),
            enabled: true,
            jitp: Some(JitpSettings {
                product_id: product.id.clone(),
                cohort_id: CohortId::parse(&cohort.id).unwrap(),
                tags: BTreeMap::from([("site".to_owned(), "eu-1".to_owned())]),
            }),
        })
        .await
        .unwrap();
    Catalog {
        product,
        cohort,
        ca,
        test_ca,
    }
}

pub fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

/// A device as JITP would create it from `catalog`, with `tags`.
pub fn new_device(catalog: &Catalog, device: &str, tags: &[(&str, &str)]) -> NewDevice {
    NewDevice {
        id: id(device),
        org_id: "default".into(),
        ca_id: catalog.ca.id.clone(),
        product_id: catalog.product.id.clone(),
        cohort_id: CohortId::parse(&catalog.cohort.id).unwrap(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cert: CertFacts {
            fingerprint_sha256: broker::registry::fingerprint(device.as_bytes()),
            subject: format!("CN={device}"),
            issuer: format!("CN={}", catalog.ca.subject),
            serial: "01:02".to_owned(),
            not_before_ms: 0,
            not_after_ms: 4_102_444_800_000,
        },
    }
}

pub fn presence(
    device: &str,
    event: PresenceEvent,
    epoch: u64,
    ts_ms: i64,
    reason: Option<DisconnectReason>,
) -> Presence {
    Presence {
        device_id: id(device),
        event,
        epoch,
        ts_ms,
        connected_at_ms: ts_ms,
        reason,
        remote_addr: Some("127.0.0.1:50000".to_owned()),
        protocol: Some("mqtt5".to_owned()),
    }
}

/// A batch with only presence events, from `node`.
pub fn presence_batch(node: &str, events: Vec<Presence>) -> EventBatch {
    EventBatch {
        node_id: node.to_owned(),
        presence: events,
        ..EventBatch::default()
    }
}

/// A connection holding the database's write lock from outside the store (SQLite: the whole
/// database; PostgreSQL: `table`), so the store's writes wait as they would on a busy or
/// unreachable database. Released by rolling back.
pub enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    pub async fn take(url: &str, table: &str) -> WriteLock {
        if url.starts_with("sqlite:") {
            let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut c)
                .await
                .unwrap();
            WriteLock::Sqlite(c)
        } else {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut c).await.unwrap();
            sqlx::query(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
                .execute(&mut c)
                .await
                .unwrap();
            WriteLock::Postgres(c)
        }
    }

    pub async fn release(self) {
        match self {
            WriteLock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
            }
            WriteLock::Postgres(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
            }
        }
    }
}
