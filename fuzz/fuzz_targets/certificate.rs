//! The certificate facts the platform reads with x509-parser: the broker's reading of a device
//! certificate at connect and JITP (`broker/src/registry.rs`), the fleet service's reading of a
//! CA certificate at registration and of a proof-of-possession certificate
//! (`fleet-service/src/store/cas.rs`), and the pin an operator gives for a device
//! (`certificate_pem` in an import or registration). The input is a certificate's DER; it is
//! also given as PEM, and read as PEM text when it is text.
//!
//! Checks, besides never panicking:
//! - the fingerprint the broker records at connect is the pin the REST API computes for the
//!   same certificate, so a pinned device is admitted with the certificate it was pinned to;
//! - a device certificate the broker reads names exactly one device id, by the id rule;
//! - a CA certificate that registers keeps exactly the bytes given, re-encodes to a PEM that
//!   registers as the same CA, and its facts (subject, validity) are those the broker reads.
#![no_main]

use base64::Engine;
use broker::fuzzing::read_leaf;
use broker::registry::fingerprint;
use fleet_service::api::fuzzing::read_import;
use fleet_service::store::cas::{parse_ca_pem, verify_possession};
use fleet_wire::DeviceId;
use libfuzzer_sys::fuzz_target;

fleet_fuzz::bounded_allocations!();
use sha2::Digest;

fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The pin a device registration or an import computes for `pem`, or its error code.
fn pin_of(pem: &str) -> Result<Option<String>, &'static str> {
    let body = serde_json::json!([{ "id": "dev-1", "certificate_pem": pem }]);
    let rows = read_import(&serde_json::to_vec(&body).unwrap(), false).expect("one row");
    rows[0].row.as_ref().expect("a well-formed row").pin.clone()
}

fuzz_target!(|data: &[u8]| {
    let fp = fingerprint(data);
    assert_eq!(fp, hex::encode(sha2::Sha256::digest(data)));
    let pem = pem_of(data);
    let pin = pin_of(&pem);
    if let Ok(Some(pin)) = &pin {
        assert_eq!(pin, &fp, "the pin is the fingerprint the broker records");
    }

    let leaf = read_leaf(data, data);
    if let Ok(facts) = &leaf {
        assert_eq!(facts.cert.fingerprint_sha256, fp);
        assert_eq!(DeviceId::parse(facts.id.as_str()).as_ref(), Ok(&facts.id));
        assert_eq!(
            pin,
            Ok(Some(fp.clone())),
            "a certificate the broker reads can be pinned"
        );
    }

    if let Ok(ca) = parse_ca_pem(&pem) {
        assert_eq!(ca.der, data, "a CA keeps the bytes given");
        assert_eq!(ca.fingerprint_sha256, fp);
        let again = parse_ca_pem(&ca.pem).expect("a registered CA's PEM registers");
        assert_eq!(
            (
                &again.der,
                &again.subject,
                &again.subject_der,
                &again.key_id
            ),
            (&ca.der, &ca.subject, &ca.subject_der, &ca.key_id)
        );
        assert_eq!(
            (again.not_before_ms, again.not_after_ms),
            (ca.not_before_ms, ca.not_after_ms)
        );
        if let Ok(facts) = &leaf {
            assert_eq!(facts.cert.subject, ca.subject);
            assert_eq!(
                (facts.cert.not_before_ms, facts.cert.not_after_ms),
                (ca.not_before_ms, ca.not_after_ms)
            );
        }
        let _ = verify_possession(&ca, &pem);
    }

    // Text given where a PEM is expected.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ca) = parse_ca_pem(text) {
            assert_eq!(ca.fingerprint_sha256, fingerprint(&ca.der));
            assert_eq!(pin_of(text), Ok(Some(ca.fingerprint_sha256.clone())));
        }
    }
});
