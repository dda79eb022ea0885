//! The signed release manifest (`wire/src/update.rs`) and the device's checks of it
//! (`device-client/src/update.rs`): an arbitrary body read as the cohort's update command, a
//! signed release, a manifest and a device's update report, and as a signing key's text.
//!
//! Checks, besides never panicking:
//! - what the platform reads from JSON bytes, a device reads the same from the JSON value (the
//!   agent parses the retained payload into a value first);
//! - each payload type that reads writes back to JSON that reads as the same value;
//! - the canonical form of a manifest reads back to exactly that manifest, so two different
//!   manifests never sign the same bytes; a manifest with no canonical form cannot verify;
//! - signed with a test key, a manifest verifies (in `fleet-wire` and through the device's
//!   `verify_release` with that key trusted), and stops verifying when any field changes;
//! - a public key that parses reads the same from base64 and from a PEM SubjectPublicKeyInfo;
//! - a device plans an install only for a startable deployment that admits it.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use base64::Engine;
use device_client::update::{plan, verify_release, Plan};
use fleet_wire::update::{
    key_id, parse_public_key, verify_manifest, ReleaseManifest, SignedRelease, UpdateCommand,
    UpdateStatus,
};
use fleet_wire::DeviceId;
use libfuzzer_sys::fuzz_target;

fleet_fuzz::bounded_allocations!();
use ring::signature::{Ed25519KeyPair, KeyPair};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn test_key() -> &'static Ed25519KeyPair {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(|| Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a 32-byte seed"))
}

fn public(key: &Ed25519KeyPair) -> [u8; 32] {
    key.public_key().as_ref().try_into().expect("32 bytes")
}

/// Reads the canonical form back, by the layout `canonical_bytes` documents.
fn read_canonical(bytes: &[u8]) -> ReleaseManifest {
    let text = std::str::from_utf8(bytes).expect("the canonical form is UTF-8");
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(
        lines.len(),
        7,
        "six lines, each ending in a newline: {text:?}"
    );
    assert_eq!(lines[0], "fleet-release-manifest-v1");
    assert_eq!(lines[6], "");
    let field = |i: usize, key: &str| {
        lines[i]
            .strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .unwrap_or_else(|| panic!("line {i} is not {key}: {text:?}"))
            .to_owned()
    };
    ReleaseManifest {
        product_id: field(1, "product_id"),
        version: field(2, "version"),
        url: field(3, "url"),
        size: field(4, "size").parse().expect("a decimal size"),
        sha256: field(5, "sha256"),
    }
}

/// A manifest that differs from `m` in each field in turn.
fn tampered(m: &ReleaseManifest) -> [ReleaseManifest; 5] {
    let edit = |s: &str| format!("{s}x");
    [
        ReleaseManifest {
            product_id: edit(&m.product_id),
            ..m.clone()
        },
        ReleaseManifest {
            version: edit(&m.version),
            ..m.clone()
        },
        ReleaseManifest {
            url: edit(&m.url),
            ..m.clone()
        },
        ReleaseManifest {
            size: m.size ^ 1,
            ..m.clone()
        },
        ReleaseManifest {
            sha256: format!(
                "{}{}",
                if m.sha256.starts_with('0') { '1' } else { '0' },
                &m.sha256[1..]
            ),
            ..m.clone()
        },
    ]
}

fn check_manifest(m: &ReleaseManifest) {
    let key = test_key();
    let public = public(key);
    let Ok(bytes) = m.canonical_bytes() else {
        let sig = B64.encode(key.sign(b"anything").as_ref());
        assert!(verify_manifest(m, &sig, &public).is_err());
        return;
    };
    assert_eq!(
        &read_canonical(&bytes),
        m,
        "the canonical form names exactly this manifest"
    );
    let sig = B64.encode(key.sign(&bytes).as_ref());
    assert_eq!(verify_manifest(m, &sig, &public), Ok(()));
    let release = SignedRelease {
        manifest: m.clone(),
        signature: sig.clone(),
        key_id: key_id(&public),
    };
    assert_eq!(verify_release(&release, &[[1; 32], public]), Ok(()));
    assert!(
        verify_release(&release, &[[1; 32]]).is_err(),
        "an untrusted key"
    );
    for t in tampered(m) {
        assert!(
            verify_manifest(&t, &sig, &public).is_err(),
            "{t:?} verifies with {m:?}'s signature"
        );
    }
}

fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_slice(data).ok()?;
    let text = serde_json::to_vec(&value).expect("payloads serialize");
    let again: T = serde_json::from_slice(&text).expect("a payload reads what it wrote");
    assert_eq!(again, value, "JSON round trip");
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    let command = round_trip::<UpdateCommand>(data);
    round_trip::<UpdateStatus>(data);
    let release = round_trip::<SignedRelease>(data);
    let manifest = round_trip::<ReleaseManifest>(data);

    if let Some(cmd) = &command {
        // The agent reads the retained payload as a value, then as a command. (serde_json
        // skips an unknown field without checking its UTF-8, so bytes that are not JSON at
        // all may still read as a command; the platform only ever publishes JSON it wrote.)
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
            let on_device: UpdateCommand =
                serde_json::from_value(value).expect("a device reads what the platform reads");
            assert_eq!(&on_device, cmd);
        }

        let device = DeviceId::parse("dev-1").unwrap();
        let decided = plan(cmd, &device, Some("1.0.0"), None, &BTreeMap::new());
        if decided != Plan::Nothing("not admitted to the rollout yet")
            && decided != Plan::Nothing("deployment does not let devices start")
        {
            assert!(cmd.admits(&device) && cmd.state.may_start(), "{decided:?}");
        }
        // Its own signature is checked against the test key; that is all it may do.
        let _ = verify_release(&cmd.release, &[public(test_key())]);
        check_manifest(&cmd.release.manifest);
    }
    for m in release.iter().map(|r| &r.manifest).chain(&manifest) {
        check_manifest(m);
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key) = parse_public_key(text) {
            assert_eq!(parse_public_key(&B64.encode(key)), Ok(key));
            let mut spki = vec![
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ];
            spki.extend_from_slice(&key);
            let pem = format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                B64.encode(&spki)
            );
            assert_eq!(parse_public_key(&pem), Ok(key));
            let id = key_id(&key);
            assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
});
