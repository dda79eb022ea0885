//! The change feed's applier on a running platform: a write committed to the database (as
//! another replica would commit it) reaches this process's registry, key cache and live
//! sessions only when its `Change` is applied, and applying re-reads the database. Each
//! scenario runs on SQLite and on PostgreSQL.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use broker::auth::{Scope, ServiceAuth, ServiceRole};
use broker::registry::QuarantineMode;
use common::{catalog, id, TestCa};
use fleet_service::app::App;
use fleet_service::config::Config;
use fleet_service::keys::CreatedKey;
use fleet_service::ops::{Applied, Change};
use fleet_service::store::{CaUpdate, DeviceUpdate, NewRegisteredDevice};
use fleet_wire::payload::DisconnectReason;
use fleet_wire::CohortId;

on_both_databases!(
    ca_change_rereads_the_ca_and_ends_its_devices_sessions,
    cohort_change_rereads_the_cohort,
    device_change_rereads_record_quarantine_and_revocations,
    devices_change_rereads_a_batch,
    api_key_change_rereads_the_key_and_ends_its_sessions,
);

async fn start(url: &str) -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.database_url = url.to_owned();
    config.admin_token = Some("ops-test-admin-token-0123456789".into());
    (App::start(config).await.unwrap(), dir)
}

fn no_session(n: usize) -> Applied {
    Applied {
        sessions_ended: Some(n),
    }
}

/// A device certificate and its key, signed by `ca`.
fn device_identity(ca: &TestCa, cn: &str) -> (String, String) {
    let (cert, key) = ca.issue_with_key(cn);
    (cert.pem(), key.serialize_pem())
}

/// An MQTT 3.1.1 CONNECT with a clean session and a 60 s keepalive.
fn connect_packet(client_id: &str, password: Option<&str>) -> Vec<u8> {
    let field = |s: &str| {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let mut body = field("MQTT");
    body.push(4);
    body.push(if password.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend(field(client_id));
    if let Some(p) = password {
        body.extend(field("service"));
        body.extend(field(p));
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// A live MQTT session on a blocking socket (plain or TLS).
struct Session(Box<dyn ReadWrite>);

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

impl Session {
    /// Sends CONNECT and expects a CONNACK that accepts.
    fn open(mut io: Box<dyn ReadWrite>, connect: &[u8]) -> Session {
        io.write_all(connect).unwrap();
        io.flush().unwrap();
        let mut connack = [0u8; 4];
        io.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
        Session(io)
    }

    /// Whether the broker closes the connection within a few seconds.
    fn closed_by_broker(mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A device session over mutual TLS, as the device `cn` with its certificate.
async fn device_session(app: &App, cn: &str, (cert, key): (String, String)) -> Session {
    let server_ca = std::fs::read(app.server_ca_path().expect("the dev PKI")).unwrap();
    let addr = app.mqtts_addr();
    let cn = cn.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut server_ca.as_slice()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> = rustls_pemfile::certs(&mut cert.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
        let tls = rustls::StreamOwned::new(conn, tcp(addr));
        Session::open(Box::new(tls), &connect_packet(&cn, None))
    })
    .await
    .unwrap()
}

async fn closed(session: Session) -> bool {
    tokio::task::spawn_blocking(move || session.closed_by_broker())
        .await
        .unwrap()
}

async fn ca_change_rereads_the_ca_and_ends_its_devices_sessions(url: &str) {
    let (app, _dir) = start(url).await;
    let registry = app.control().registry().clone();
    // Committed by another replica: this process does not know it yet.
    let c = catalog(app.store(), "ca-change").await;
    assert!(registry.ca(&c.ca.id).is_none());
    let applier = app.applier();
    let change = Change::Ca {
        id: c.ca.id.clone(),
    };
    applier.apply(&change).await.unwrap();
    assert!(registry.ca(&c.ca.id).is_some_and(|ca| ca.enabled));

    // A device it provisions connects; disabling the CA in the database changes nothing
    // here until the change is applied, which ends the session.
    let session = device_session(&app, "ca-dev-1", device_identity(&c.test_ca, "ca-dev-1")).await;
    let update = CaUpdate {
        enabled: Some(false),
        ..Default::default()
    };
    app.store().update_ca(&c.ca.id, &update).await.unwrap();
    assert!(registry.ca(&c.ca.id).unwrap().enabled);
    applier.apply(&change).await.unwrap();
    assert!(!registry.ca(&c.ca.id).unwrap().enabled);
    assert!(
        closed(session).await,
        "the disabled CA's device was cut off"
    );
    app.shutdown().await.unwrap();
}

async fn cohort_change_rereads_the_cohort(url: &str) {
    let (app, _dir) = start(url).await;
    let registry = app.control().registry().clone();
    let product = app.store().create_product("default", "p").await.unwrap();
    let cohort = app.store().create_cohort(&product, "beta").await.unwrap();
    let cohort_id = CohortId::parse(&cohort.id).unwrap();
    assert!(registry.cohort(&cohort_id).is_none());
    let applied = app
        .applier()
        .apply(&Change::Cohort {
            id: cohort.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(applied, no_session(0));
    let record = registry.cohort(&cohort_id).unwrap();
    assert_eq!(
        (record.org_id.as_str(), record.product_id.as_str()),
        ("default", product.id.as_str())
    );
    app.shutdown().await.unwrap();
}

async fn device_change_rereads_record_quarantine_and_revocations(url: &str) {
    let (app, _dir) = start(url).await;
    let registry = app.control().registry().clone();
    let applier = app.applier();
    let c = catalog(app.store(), "device-change").await;
    applier
        .apply(&Change::Ca {
            id: c.ca.id.clone(),
        })
        .await
        .unwrap();
    let other = app
        .store()
        .create_cohort(&c.product, "other")
        .await
        .unwrap();
    let dev = id("dev-1");
    let session = device_session(&app, "dev-1", device_identity(&c.test_ca, "dev-1")).await;
    let change = |end_session| Change::Device {
        id: dev.to_string(),
        end_session,
    };

    // Quarantined in the database; applied, the registry holds it and the session ends.
    app.store()
        .quarantine_device(&dev, QuarantineMode::Refuse, "quarantined: test")
        .await
        .unwrap();
    assert_eq!(registry.quarantine(&dev), None);
    let applied = applier
        .apply(&change(Some(DisconnectReason::Revoked)))
        .await
        .unwrap();
    assert_eq!(applied, no_session(1));
    assert_eq!(registry.quarantine(&dev), Some(QuarantineMode::Refuse));
    assert!(closed(session).await, "the quarantined device was cut off");

    // Moved in the database; applied, the registry has the new cohort (no live session now).
    let to = CohortId::parse(&other.id).unwrap();
    let update = DeviceUpdate {
        tags: None,
        cohort_id: Some(Some(to.clone())),
    };
    assert!(app.store().update_device(&dev, &update).await.unwrap());
    assert_ne!(registry.device(&dev).unwrap().cohort_id, Some(to.clone()));
    let applied = applier
        .apply(&change(Some(DisconnectReason::Reassigned)))
        .await
        .unwrap();
    assert_eq!(applied, no_session(0));
    assert_eq!(registry.device(&dev).unwrap().cohort_id, Some(to));

    // Quarantine lifted, certificate revoked and device deleted: one re-read applies it all.
    app.store().lift_quarantine(&dev, "lifted").await.unwrap();
    let fingerprints = app.store().device_fingerprints(&dev).await.unwrap();
    assert_eq!(fingerprints.len(), 1);
    app.store()
        .revoke_certificates("default", &dev, &fingerprints, "device deleted")
        .await
        .unwrap();
    assert!(app.store().delete_device(&dev).await.unwrap());
    assert!(!registry.is_revoked(&fingerprints[0]));
    let applied = applier.apply(&change(None)).await.unwrap();
    assert_eq!(applied, no_session(0));
    assert!(registry.device(&dev).is_none());
    assert_eq!(registry.quarantine(&dev), None);
    assert!(registry.is_revoked(&fingerprints[0]));
    app.shutdown().await.unwrap();
}

async fn devices_change_rereads_a_batch(url: &str) {
    let (app, _dir) = start(url).await;
    let registry = app.control().registry().clone();
    let c = catalog(app.store(), "devices-change").await;
    let cohort = CohortId::parse(&c.cohort.id).unwrap();
    let batch: Vec<NewRegisteredDevice> = ["imp-1", "imp-2"]
        .iter()
        .map(|d| NewRegisteredDevice {
            id: id(d),
            org_id: "default".into(),
            product_id: c.product.id.clone(),
            cohort_id: Some(cohort.clone()),
            tags: Default::default(),
            pinned_fingerprint: None,
        })
        .collect();
    app.store().import_devices(&batch).await.unwrap();
    assert!(registry.device(&id("imp-1")).is_none());
    let applied = app
        .applier()
        .apply(&Change::Devices {
            ids: vec!["imp-1".into(), "imp-2".into(), "never-created".into()],
        })
        .await
        .unwrap();
    assert_eq!(applied, no_session(0));
    for d in ["imp-1", "imp-2"] {
        let record = registry.device(&id(d)).unwrap();
        assert_eq!(record.cohort_id, Some(cohort.clone()));
        assert_eq!(record.ca_id, None);
    }
    assert!(registry.device(&id("never-created")).is_none());
    app.shutdown().await.unwrap();
}

async fn api_key_change_rereads_the_key_and_ends_its_sessions(url: &str) {
    let (app, _dir) = start(url).await;
    let keys = app.ops().keys().clone();
    let applier = app.applier();
    let created = CreatedKey::new("default", "svc", ServiceRole::Viewer, Scope::Org).unwrap();
    app.store().create_api_key(&created.record).await.unwrap();
    assert!(keys.authenticate(&created.secret).is_none());
    let change = Change::ApiKey {
        id: created.record.id.clone(),
    };
    assert_eq!(applier.apply(&change).await.unwrap(), no_session(0));
    assert!(keys.authenticate(&created.secret).is_some());

    // A service connects with it; revoked in the database, the key still works here until
    // the change is applied, which drops it and ends the session.
    let addr = app.service_addr();
    let secret = created.secret.clone();
    let session = tokio::task::spawn_blocking(move || {
        Session::open(
            Box::new(tcp(addr)),
            &connect_packet("dashboard", Some(&secret)),
        )
    })
    .await
    .unwrap();
    app.store()
        .revoke_api_key("default", &created.record.id, 1)
        .await
        .unwrap()
        .unwrap();
    assert!(keys.authenticate(&created.secret).is_some());
    assert_eq!(applier.apply(&change).await.unwrap(), no_session(1));
    assert!(keys.authenticate(&created.secret).is_none());
    assert!(
        closed(session).await,
        "the revoked key's session was cut off"
    );
    app.shutdown().await.unwrap();
}
