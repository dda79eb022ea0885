//! End-to-end harness: the real platform ([`fleet_service::app::App`]) on 127.0.0.1 port 0 with
//! a fresh SQLite file or a fresh PostgreSQL database, manufacturing CAs and device
//! certificates minted per test with rcgen, and real MQTT 3.1.1 and 5 clients (rumqttc) over
//! mutual TLS. Set `TEST_LOG=debug` to see the platform's logs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_service::app::App;
use fleet_service::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::sync::mpsc;

pub mod cluster;
pub mod conformance;
pub mod nats;
pub mod raw;
pub mod rest;
pub mod walkthrough;

pub use rest::Rest;

pub const WAIT: Duration = Duration::from_secs(10);

/// Declares `sqlite::NAME` and `postgres::NAME` tests for each `async fn NAME(Platform)` given,
/// so one scenario runs on both databases (the PostgreSQL one says it was skipped when
/// `FLEET_TEST_POSTGRES_URL` is unset).
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let p = $crate::Platform::start($crate::Db::Sqlite).await.unwrap();
                super::$name(p).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(p) = $crate::Platform::start($crate::Db::Postgres).await else { return };
                super::$name(p).await;
            })*
        }
    };
}

/// Installs, once per test binary, the router-loss counter and (with `TEST_LOG`) log output.
pub fn init_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let output = std::env::var_os("TEST_LOG").map(|_| {
        tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
    });
    let _ = tracing_subscriber::registry()
        .with(broker::RouterLossLayer)
        .with(output)
        .try_init();
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server URL for tests, from `FLEET_TEST_POSTGRES_URL`.
pub fn postgres_url() -> Option<String> {
    std::env::var("FLEET_TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Creates a fresh, uniquely named database on the test server and returns its URL.
pub(crate) async fn fresh_postgres_database(server: &str) -> String {
    use sqlx::Connection;
    let name = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to FLEET_TEST_POSTGRES_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = match server.rfind('/') {
        Some(i) if i > "postgres://".len() => &server[..i],
        _ => server,
    };
    format!("{base}/{name}")
}

pub struct Platform {
    app: Option<App>,
    dir: tempfile::TempDir,
    database_url: String,
    tuning: fleet_service::config::Tuning,
    server_tls: fleet_service::config::ServerTls,
    rest: Option<Rest>,
    pub db: Db,
    /// Runs the conformance listener (on 127.0.0.1 port 0); see [`conformance`].
    conformance: bool,
}

/// The platform's REST calls (`p.api(...)`, `p.jitp_fleet(...)`) are [`Rest`]'s.
impl std::ops::Deref for Platform {
    type Target = Rest;
    fn deref(&self) -> &Rest {
        self.rest.as_ref().expect("platform running")
    }
}

impl Platform {
    /// Starts the platform on a fresh SQLite file.
    pub async fn sqlite() -> Platform {
        Self::start(Db::Sqlite)
            .await
            .expect("sqlite always available")
    }

    /// Starts the platform on `db`; `None` (after saying so) when PostgreSQL is not configured.
    pub async fn start(db: Db) -> Option<Platform> {
        Self::start_tuned(db, fleet_service::config::Tuning::default()).await
    }

    /// Starts the platform with non-default tuning (router limits, timeouts, ...).
    pub async fn start_tuned(db: Db, tuning: fleet_service::config::Tuning) -> Option<Platform> {
        let dev = fleet_service::config::ServerTls::Dev { names: Vec::new() };
        Self::start_configured(db, tuning, dev, false).await
    }

    /// Starts the platform with its device listener presenting `server_tls`.
    pub async fn start_with_tls(
        db: Db,
        server_tls: fleet_service::config::ServerTls,
    ) -> Option<Platform> {
        Self::start_configured(db, Default::default(), server_tls, false).await
    }

    async fn start_configured(
        db: Db,
        tuning: fleet_service::config::Tuning,
        server_tls: fleet_service::config::ServerTls,
        conformance: bool,
    ) -> Option<Platform> {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = match db {
            Db::Sqlite => format!("sqlite://{}", dir.path().join("fleet.db").display()),
            Db::Postgres => {
                let Some(server) = postgres_url() else {
                    eprintln!("skipped: FLEET_TEST_POSTGRES_URL not set, PostgreSQL half not run");
                    return None;
                };
                fresh_postgres_database(&server).await
            }
        };
        let mut platform = Platform {
            app: None,
            dir,
            database_url,
            tuning,
            server_tls,
            rest: None,
            db,
            conformance,
        };
        platform.boot().await;
        Some(platform)
    }

    async fn boot(&mut self) {
        let mut config = Config::for_tests(self.dir.path());
        config.database_url = self.database_url.clone();
        config.tuning = self.tuning.clone();
        config.server_tls = self.server_tls.clone();
        config.conformance_listen = self
            .conformance
            .then(|| "127.0.0.1:0".parse().expect("valid address"));
        let app = App::start(config).await.expect("platform starts");
        self.rest = Some(Rest::new(app.http_addr(), app.admin_token()));
        self.app = Some(app);
    }

    /// What the device listener presents from the next [`Platform::restart`] on.
    pub fn set_server_tls(&mut self, server_tls: fleet_service::config::ServerTls) {
        self.server_tls = server_tls;
    }

    /// Stops the platform gracefully and starts it again on the same data.
    pub async fn restart(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await.expect("clean shutdown");
        }
        self.boot().await;
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await.expect("clean shutdown");
        }
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("platform running")
    }

    /// The database the platform runs on (a fresh file or PostgreSQL database per test).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn server_ca_pem(&self) -> String {
        let path = self
            .app()
            .server_ca_path()
            .expect("the dev PKI serves the devices");
        std::fs::read_to_string(path).expect("server CA")
    }

    pub fn device_options(&self, cert: &DeviceCert, client_id: &str) -> rumqttc::MqttOptions {
        let addr = self.app().mqtts_addr();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls_config(&self.server_ca_pem(), Some(cert))),
        ));
        o
    }

    pub fn device_options_v5(
        &self,
        cert: &DeviceCert,
        client_id: &str,
    ) -> rumqttc::v5::MqttOptions {
        let addr = self.app().mqtts_addr();
        let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls_config(&self.server_ca_pem(), Some(cert))),
        ));
        o
    }

    /// A backend service on the service listener, authenticated with `api_key`.
    pub fn service_options(&self, client_id: &str, api_key: &str) -> rumqttc::MqttOptions {
        let addr = self.app().service_addr();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_credentials("service", api_key);
        o
    }

    /// [`Platform::service_options`] for an MQTT 5 client.
    pub fn service_options_v5(&self, client_id: &str, api_key: &str) -> rumqttc::v5::MqttOptions {
        let addr = self.app().service_addr();
        let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_credentials("service", api_key);
        o
    }
}

pub struct Fleet {
    pub product_id: String,
    pub cohort_id: String,
    pub ca: TestCa,
    pub ca_id: String,
}

/// A manufacturing CA minted for one test.
pub struct TestCa {
    key: KeyPair,
    cert: rcgen::Certificate,
    pub pem: String,
    /// What a device certificate it issues is sent with: nothing for a root, the intermediate
    /// itself for an intermediate.
    chain_pem: String,
}

/// How a device certificate is shaped beyond its CN, for tests of what the broker refuses.
#[derive(Debug, Clone, Default)]
pub struct CertShape {
    /// Leave out the Authority Key Identifier, so only the issuer's name and signature say
    /// which CA signed it.
    pub no_authority_key_id: bool,
    /// A second CN attribute in the subject.
    pub second_cn: Option<String>,
}

/// A device certificate and its key, PEM.
#[derive(Clone)]
pub struct DeviceCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let now = time::OffsetDateTime::now_utc();
        Self::new_valid(
            cn,
            now - time::Duration::days(1),
            now + time::Duration::days(365),
        )
    }

    /// A root CA whose own certificate is valid from `not_before` to `not_after`.
    pub fn new_valid(
        cn: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        TestCa {
            key,
            cert,
            pem,
            chain_pem: String::new(),
        }
    }

    /// An intermediate CA named `cn`, signed by this one; the certificates it issues carry it
    /// in their chain.
    pub fn intermediate(&self, cn: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let pem = cert.pem();
        TestCa {
            key,
            cert,
            chain_pem: pem.clone(),
            pem,
        }
    }

    /// A device certificate with subject CN `cn`, valid now.
    pub fn issue(&self, cn: &str) -> DeviceCert {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            cn,
            now - time::Duration::hours(1),
            now + time::Duration::days(30),
        )
    }

    pub fn issue_valid(
        &self,
        cn: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> DeviceCert {
        self.issue_shaped(cn, not_before, not_after, &CertShape::default())
    }

    /// A device certificate with subject CN `cn`, valid now, shaped as `shape` says.
    pub fn issue_as(&self, cn: &str, shape: &CertShape) -> DeviceCert {
        let now = time::OffsetDateTime::now_utc();
        self.issue_shaped(
            cn,
            now - time::Duration::hours(1),
            now + time::Duration::days(30),
            shape,
        )
    }

    fn issue_shaped(
        &self,
        cn: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
        shape: &CertShape,
    ) -> DeviceCert {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(second) = &shape.second_cn {
            // rcgen keeps one value per attribute type; the CN's OID spelled as a custom type
            // is a second CN attribute.
            params
                .distinguished_name
                .push(DnType::CustomDnType(vec![2, 5, 4, 3]), second.as_str());
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = !shape.no_authority_key_id;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        DeviceCert {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
        }
    }

    /// This CA's own certificate and key, presented as if it were a device's.
    pub fn as_device_cert(&self) -> DeviceCert {
        DeviceCert {
            cert_pem: self.pem.clone(),
            key_pem: self.key.serialize_pem(),
        }
    }

    /// The CA's private key (PKCS#8 PEM), e.g. to hand the CA to another tool as files.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// A rustls client config trusting `server_ca_pem`, presenting `client` if given.
pub fn tls_config(server_ca_pem: &str, client: Option<&DeviceCert>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut server_ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let chain = rustls_pemfile::certs(&mut c.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pemfile::private_key(&mut c.key_pem.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// An MQTT 3.1.1 client whose event loop runs on its own task.
pub struct Client {
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    eventloop: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects and waits for CONNACK; `Err` carries how the connection was refused.
    pub async fn connect(
        options: rumqttc::MqttOptions,
    ) -> Result<Client, rumqttc::ConnectionError> {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Err(_) => return Err(rumqttc::ConnectionError::NetworkTimeout),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        let eventloop = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(Client {
            client,
            events,
            eventloop,
        })
    }

    /// Drops the connection without DISCONNECT, as a device losing power would.
    pub async fn kill(self) {
        self.eventloop.abort();
        let _ = self.eventloop.await;
    }

    /// Waits until `f` picks something out of an incoming packet. Panics on timeout or when
    /// the connection ends first.
    pub async fn wait_for<T>(&mut self, mut f: impl FnMut(&rumqttc::Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("timed out waiting for a packet"),
                Ok(None) => panic!("event loop ended"),
                Ok(Some(Err(e))) => panic!("connection ended: {e}"),
                Ok(Some(Ok(p))) => {
                    if let Some(t) = f(&p) {
                        return t;
                    }
                }
            }
        }
    }

    /// Waits until the connection ends; returns the error text.
    pub async fn closed(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("connection still open"),
                Ok(None) => return "event loop ended".into(),
                Ok(Some(Err(e))) => return e,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// An MQTT 5 client whose event loop runs on its own task.
pub struct Client5 {
    pub client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::mqttbytes::v5::Packet, String>>,
}

impl Client5 {
    pub async fn connect(
        options: rumqttc::v5::MqttOptions,
    ) -> Result<Client5, rumqttc::v5::ConnectionError> {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 1000);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Err(elapsed) => return Err(rumqttc::v5::ConnectionError::Timeout(elapsed)),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(rumqttc::v5::Event::Incoming(
                    rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_),
                ))) => break,
                Ok(Ok(_)) => {}
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(Client5 { client, events })
    }

    pub async fn wait_for<T>(
        &mut self,
        mut f: impl FnMut(&rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("timed out waiting for a packet"),
                Ok(None) => panic!("event loop ended"),
                Ok(Some(Err(e))) => panic!("connection ended: {e}"),
                Ok(Some(Ok(p))) => {
                    if let Some(t) = f(&p) {
                        return t;
                    }
                }
            }
        }
    }

    pub async fn closed(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("connection still open"),
                Ok(None) => return "event loop ended".into(),
                Ok(Some(Err(e))) => return e,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after [`WAIT`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
