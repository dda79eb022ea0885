//! The certificate the device listener presents: the dev PKI's, with further names for the
//! addresses devices really connect to (`--server-name`), or the operator's own
//! (`--tls-cert`, `--tls-key`).

use e2e::{tls_config, Client, Db, Platform};
use fleet_service::config::ServerTls;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rumqttc::{Packet, QoS};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpStream;

/// A TLS handshake with the device listener, verifying its certificate for `name` against
/// `ca_pem`; the verification error when it fails.
async fn handshake(p: &Platform, ca_pem: &str, name: &str) -> Result<(), String> {
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem, None));
    let tcp = TcpStream::connect(p.app().mqtts_addr()).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    connector
        .connect(name, tcp)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A CA of the operator's own and a server certificate it issued for `names`.
fn own_pki(dir: &std::path::Path, names: &[&str]) -> (String, ServerTls) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "Acme Ops CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "fleet.acme.test");
    let server = server.signed_by(&key, &ca, &ca_key).unwrap();
    let cert = dir.join("server.pem");
    let key_path = dir.join("server.key");
    // The chain as operators get it: leaf, then the issuer.
    std::fs::write(&cert, format!("{}{}", server.pem(), ca.pem())).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        ca.pem(),
        ServerTls::Own {
            cert,
            key: key_path,
        },
    )
}

/// With `--tls-cert/--tls-key` devices verify the server against the operator's CA (no dev
/// PKI is made or shown), connect, are provisioned and publish; a name the certificate does not
/// hold is refused by the device's TLS.
#[tokio::test]
async fn an_own_certificate_serves_the_devices() {
    let files = tempfile::tempdir().unwrap();
    let (ca_pem, tls) = own_pki(files.path(), &["fleet.acme.test", "127.0.0.1"]);
    let p = Platform::start_with_tls(Db::Sqlite, tls).await.unwrap();
    assert!(p.app().server_ca_path().is_none());
    let banner = p.app().banner();
    assert!(
        banner.contains("server certificate (your own; devices trust its issuer)")
            && banner.contains("server.pem"),
        "{banner}"
    );
    assert!(
        !p.data_dir().join("pki").join("server.pem").exists(),
        "a dev server certificate was made although the operator gave one"
    );

    handshake(&p, &ca_pem, "fleet.acme.test").await.unwrap();
    let err = handshake(&p, &ca_pem, "elsewhere.acme.test")
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");

    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("own-tls-1");
    let mut o = rumqttc::MqttOptions::new("own-tls-1", "127.0.0.1", p.app().mqtts_addr().port());
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls_config(&ca_pem, Some(&cert))),
    ));
    let mut device = Client::connect(o).await.expect("the device connects");
    device
        .client
        .publish(
            "devices/own-tls-1/telemetry",
            QoS::AtLeastOnce,
            false,
            json!({"temp": 20}).to_string(),
        )
        .await
        .unwrap();
    device
        .wait_for(|p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await;
    let (status, body) = p.api("GET", "/api/v1/devices/own-tls-1", None).await;
    assert_eq!(status, 200, "{body}");
    p.stop().await;
}

/// `--server-name` adds the names devices really use to the dev certificate; changing them
/// re-issues it from the same dev CA, so devices that trust `server-ca.pem` keep connecting.
#[tokio::test]
async fn server_names_join_the_dev_certificate() {
    let mut p = Platform::start(Db::Sqlite).await.unwrap();
    let ca = p.server_ca_pem();
    handshake(&p, &ca, "localhost").await.unwrap();
    let err = handshake(&p, &ca, "fleet.lan").await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");

    p.set_server_tls(ServerTls::Dev {
        names: vec!["fleet.lan".into(), "10.1.2.3".into()],
    });
    p.restart().await;
    assert_eq!(p.server_ca_pem(), ca, "the dev CA changed");
    handshake(&p, &ca, "fleet.lan").await.unwrap();
    handshake(&p, &ca, "10.1.2.3").await.unwrap();
    handshake(&p, &ca, "127.0.0.1").await.unwrap();
    let err = handshake(&p, &ca, "other.lan").await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    p.stop().await;
}
