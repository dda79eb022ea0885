//! Certificates from the `pki` module verify the way the broker and devices verify them.

mod common;

use std::sync::Arc;

use common::TempDir;
use device_client::fleet_wire::DeviceId;
use device_client::pki::{Ca, CaOptions, DeviceCertOptions, PkiError};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use x509_parser::extensions::ParsedExtension;

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn roots(ca_pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(der(ca_pem)).unwrap();
    Arc::new(roots)
}

fn client_verifier(ca_pem: &str) -> Arc<dyn ClientCertVerifier> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider)
        .build()
        .unwrap()
}

#[test]
fn device_certificate_verifies_against_its_ca_only() {
    let ca = Ca::generate(&CaOptions::default()).unwrap();
    let other = Ca::generate(&CaOptions {
        common_name: "Other CA".into(),
        ..CaOptions::default()
    })
    .unwrap();
    let id = DeviceId::parse("sensor-42").unwrap();
    let dev = ca
        .issue_device(&DeviceCertOptions {
            device_id: id.clone(),
            validity_days: 30,
        })
        .unwrap();
    let leaf = der(&dev.cert_pem);

    client_verifier(ca.cert_pem())
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .expect("device certificate verifies against its CA");
    let err = client_verifier(other.cert_pem())
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // A device certificate is not a server certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(roots(ca.cert_pem()), provider)
            .build()
            .unwrap();
    assert!(server_verifier
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from("sensor-42").unwrap(),
            &[],
            UnixTime::now()
        )
        .is_err());

    // The fields the platform relies on.
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "sensor-42");
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(cert.raw_serial().len(), 16);
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(
        lifetime,
        30 * 86_400 + 300,
        "30 days plus the 5 minute backdate"
    );
    assert!(cert.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
}

#[test]
fn serials_differ() {
    let ca = Ca::generate(&CaOptions::default()).unwrap();
    let opts = DeviceCertOptions::new(DeviceId::parse("d").unwrap());
    let a = der(&ca.issue_device(&opts).unwrap().cert_pem);
    let b = der(&ca.issue_device(&opts).unwrap().cert_pem);
    let serial = |d: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(d)
            .unwrap()
            .1
            .raw_serial()
            .to_vec()
    };
    assert_ne!(serial(&a), serial(&b));
}

#[test]
fn ca_round_trips_through_pem_files() {
    let dir = TempDir::new("pki-files");
    let (cert, key) = (dir.path("ca.pem"), dir.path("ca.key"));
    let ca = Ca::generate(&CaOptions {
        common_name: "Files CA".into(),
        organization: Some("Acme".into()),
        validity_days: 10,
        ..CaOptions::default()
    })
    .unwrap();
    ca.to_pem().write(&cert, &key, false).unwrap();

    let loaded = Ca::from_files(&cert, &key).unwrap();
    let dev = loaded
        .issue_device(&DeviceCertOptions::new(
            DeviceId::parse("dev-files").unwrap(),
        ))
        .unwrap();
    client_verifier(ca.cert_pem())
        .verify_client_cert(&der(&dev.cert_pem), &[], UnixTime::now())
        .expect("issued by the reloaded CA, verified against the original");

    // A device certificate never outlives its CA.
    let long = loaded
        .issue_device(&DeviceCertOptions {
            device_id: DeviceId::parse("dev-long").unwrap(),
            validity_days: 365,
        })
        .unwrap();
    let not_after = |pem: &str| {
        x509_parser::parse_x509_certificate(&der(pem))
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp()
    };
    assert!(not_after(&long.cert_pem) <= not_after(ca.cert_pem()));

    let err = Ca::from_files(&dir.path("missing.pem"), &key)
        .err()
        .unwrap();
    assert!(matches!(err, PkiError::Read { .. }));
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[test]
fn server_certificate_verifies_for_its_names() {
    let ca = Ca::generate(&CaOptions::default()).unwrap();
    let server = ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()], 5)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca.cert_pem()), provider)
        .build()
        .unwrap();
    let leaf = der(&server.cert_pem);
    for (name, ok) in [
        ("localhost", true),
        ("127.0.0.1", true),
        ("example.com", false),
    ] {
        let name = ServerName::try_from(name).unwrap();
        assert_eq!(
            verifier
                .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
                .is_ok(),
            ok,
            "{name:?}"
        );
    }
}

/// RSA keys cannot be generated with ring, but an RSA CA made elsewhere can sign devices.
#[test]
fn rsa_ca_from_openssl_signs_devices() {
    let dir = TempDir::new("pki-rsa");
    let (cert, key) = (dir.path("rsa-ca.pem"), dir.path("rsa-ca.key"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=RSA Test CA",
        ])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        _ => {
            println!("skipped: openssl cannot create an RSA CA here");
            return;
        }
    }
    let ca = Ca::from_files(&cert, &key).unwrap();
    let dev = ca
        .issue_device(&DeviceCertOptions::new(DeviceId::parse("dev-rsa").unwrap()))
        .unwrap();
    client_verifier(ca.cert_pem())
        .verify_client_cert(&der(&dev.cert_pem), &[], UnixTime::now())
        .expect("device certificate signed by the RSA CA verifies");
}
