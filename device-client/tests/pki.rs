//! Certificates from the `pki` module verify the way the broker and devices verify them.

mod common;

use std::sync::Arc;

use common::TempDir;
use device_client::fleet_wire::DeviceId;
use device_client::pki::{Ca, CaOptions, DeviceCertOptions, KeyAlgorithm, PkiError};
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
            algorithm: KeyAlgorithm::EcdsaP256,
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
            algorithm: KeyAlgorithm::EcdsaP256,
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

/// An RSA CA made elsewhere (openssl) loads and signs devices too.
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

/// The OIDs of a certificate's subject key algorithm and of the signature on it.
fn algorithms(pem: &str) -> (String, String) {
    let d = der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&d).unwrap();
    (
        cert.public_key().algorithm.algorithm.to_id_string(),
        cert.signature_algorithm.algorithm.to_id_string(),
    )
}

const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const SHA256_WITH_RSA: &str = "1.2.840.113549.1.1.11";
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const ECDSA_WITH_SHA256: &str = "1.2.840.10045.4.3.2";

/// A generated RSA-2048 CA signs P-256 and RSA-2048 device certificates, and both chains
/// verify the way the broker verifies them; an RSA CA loaded back from its files does the same.
#[test]
fn generated_rsa_ca_signs_p256_and_rsa_devices() {
    let ca = Ca::generate(&CaOptions {
        common_name: "RSA Manufacturing CA".into(),
        algorithm: KeyAlgorithm::Rsa2048,
        ..CaOptions::default()
    })
    .unwrap();
    assert_eq!(
        algorithms(ca.cert_pem()),
        (RSA_ENCRYPTION.into(), SHA256_WITH_RSA.into()),
        "self-signed with its RSA key"
    );
    let p256_ca = Ca::generate(&CaOptions::default()).unwrap();
    let cases = [
        ("dev-p256", KeyAlgorithm::EcdsaP256, EC_PUBLIC_KEY),
        ("dev-rsa", KeyAlgorithm::Rsa2048, RSA_ENCRYPTION),
    ];
    for (id, algorithm, key_oid) in cases {
        let dev = ca
            .issue_device(&DeviceCertOptions {
                algorithm,
                ..DeviceCertOptions::new(DeviceId::parse(id).unwrap())
            })
            .unwrap();
        assert_eq!(
            algorithms(&dev.cert_pem),
            (key_oid.into(), SHA256_WITH_RSA.into()),
            "{id}: its own key, signed by the RSA CA"
        );
        let leaf = der(&dev.cert_pem);
        client_verifier(ca.cert_pem())
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("{id} verifies against the RSA CA: {e}"));
        let err = client_verifier(p256_ca.cert_pem())
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{id}: {err}");
        // The key file is what rustls loads for the device's side of the handshake.
        device_client::ClientIdentity::from_pem(dev.cert_pem.as_bytes(), dev.key_pem.as_bytes())
            .unwrap_or_else(|e| panic!("{id}: identity loads: {e}"));
    }

    // Through PEM files and back, as `pki ca` and `--ca-cert/--ca-key` use them.
    let dir = TempDir::new("pki-rsa-generated");
    let (cert, key) = (dir.path("ca.pem"), dir.path("ca.key"));
    ca.to_pem().write(&cert, &key, false).unwrap();
    let loaded = Ca::from_files(&cert, &key).unwrap();
    assert_eq!(loaded.fingerprint(), ca.fingerprint());
    let dev = loaded
        .issue_device(&DeviceCertOptions {
            algorithm: KeyAlgorithm::Rsa2048,
            ..DeviceCertOptions::new(DeviceId::parse("dev-rsa-2").unwrap())
        })
        .unwrap();
    client_verifier(ca.cert_pem())
        .verify_client_cert(&der(&dev.cert_pem), &[], UnixTime::now())
        .expect("signed by the loaded RSA CA, verifies against the original");

    // An RSA device under a P-256 CA: signed with ECDSA.
    let dev = p256_ca
        .issue_device(&DeviceCertOptions {
            algorithm: KeyAlgorithm::Rsa2048,
            ..DeviceCertOptions::new(DeviceId::parse("dev-rsa-3").unwrap())
        })
        .unwrap();
    assert_eq!(
        algorithms(&dev.cert_pem),
        (RSA_ENCRYPTION.into(), ECDSA_WITH_SHA256.into())
    );
    client_verifier(p256_ca.cert_pem())
        .verify_client_cert(&der(&dev.cert_pem), &[], UnixTime::now())
        .expect("RSA device under a P-256 CA verifies");
}

/// A CA whose key openssl wrote in the traditional forms (SEC1 `EC PRIVATE KEY` from
/// `openssl ecparam -genkey`, PKCS#1 `RSA PRIVATE KEY` from `openssl genrsa -traditional`)
/// loads and signs devices like a PKCS#8 one.
#[test]
fn ca_keys_in_sec1_and_pkcs1_forms_load() {
    let forms: &[(&str, &[&str], &str)] = &[
        (
            "p256-sec1",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "{key}",
            ],
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "p384-sec1",
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                "{key}",
            ],
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "rsa-pkcs1",
            &["genrsa", "-traditional", "-out", "{key}", "2048"],
            "BEGIN RSA PRIVATE KEY",
        ),
    ];
    let dir = TempDir::new("pki-forms");
    for (name, genkey, label) in forms {
        let (cert, key) = (
            dir.path(&format!("{name}.pem")),
            dir.path(&format!("{name}.key")),
        );
        let key_path = key.to_str().unwrap();
        let made = std::process::Command::new("openssl")
            .args(
                genkey
                    .iter()
                    .map(|a| if *a == "{key}" { key_path } else { a }),
            )
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("openssl")
                .args(["req", "-x509", "-new", "-days", "30", "-subj"])
                .arg(format!("/CN={name} CA"))
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-key")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !made {
            println!("skipped {name}: openssl cannot make it here");
            continue;
        }
        let text = std::fs::read_to_string(&key).unwrap();
        assert!(text.contains(label), "{name}: openssl wrote {text:.40}");
        let ca = Ca::from_files(&cert, &key).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dev = ca
            .issue_device(&DeviceCertOptions::new(
                DeviceId::parse("dev-form").unwrap(),
            ))
            .unwrap();
        client_verifier(ca.cert_pem())
            .verify_client_cert(&der(&dev.cert_pem), &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
