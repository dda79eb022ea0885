//! Release signing for operators: an Ed25519 key pair, and a signed manifest ready for
//! `POST /api/v1/releases`. The private key never leaves the operator; the platform stores
//! only the public key.

use std::path::Path;

use base64::Engine;
use fleet_wire::update::{key_id, ReleaseManifest, SignatureError};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not an Ed25519 private key in PEM (PKCS#8 \"PRIVATE KEY\")")]
    BadKey(String),
    #[error("could not generate a key")]
    Generate,
    #[error("manifest: {0}")]
    Manifest(#[from] SignatureError),
}

/// An Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

/// What `POST /api/v1/releases` takes.
#[derive(Debug, Clone, Serialize)]
pub struct SignedManifest {
    #[serde(flatten)]
    pub manifest: ReleaseManifest,
    pub signature: String,
    pub key_id: String,
}

impl SigningKey {
    pub fn generate() -> Result<Self, ReleaseError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| ReleaseError::Generate)?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec()).ok_or(ReleaseError::Generate)
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Option<Self> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).ok()?;
        Some(Self { pair, pkcs8 })
    }

    /// Reads a PEM `PRIVATE KEY` (this module's, or `openssl genpkey -algorithm ed25519`).
    pub fn from_pem_file(path: &Path) -> Result<Self, ReleaseError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReleaseError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bad = || ReleaseError::BadKey(path.display().to_string());
        let body = text
            .trim()
            .strip_prefix("-----BEGIN PRIVATE KEY-----")
            .and_then(|r| r.trim_end().strip_suffix("-----END PRIVATE KEY-----"))
            .ok_or_else(bad)?;
        let der = B64
            .decode(body.split_whitespace().collect::<String>())
            .map_err(|_| bad())?;
        Self::from_pkcs8(der).ok_or_else(bad)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes")
    }

    /// The public key as the platform and devices take it: base64 of the 32 bytes.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.public_key())
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public_key())
    }

    pub fn private_key_pem(&self) -> String {
        let b64 = B64.encode(&self.pkcs8);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// Signs the manifest of `artifact` for the given product, version and download URL.
    pub fn sign(
        &self,
        product_id: &str,
        version: &str,
        url: &str,
        artifact: &[u8],
    ) -> Result<SignedManifest, ReleaseError> {
        let manifest = ReleaseManifest {
            product_id: product_id.to_owned(),
            version: version.to_owned(),
            url: url.to_owned(),
            size: artifact.len() as u64,
            sha256: hex::encode(Sha256::digest(artifact)),
        };
        let bytes = manifest
            .canonical_bytes()
            .map_err(|e| ReleaseError::Manifest(e.into()))?;
        Ok(SignedManifest {
            signature: B64.encode(self.pair.sign(&bytes).as_ref()),
            key_id: self.key_id(),
            manifest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_wire::update::{parse_public_key, verify_manifest};

    #[test]
    fn keys_round_trip_and_signatures_verify() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, key.private_key_pem()).unwrap();
        let again = SigningKey::from_pem_file(&path).unwrap();
        assert_eq!(again.public_key(), key.public_key());

        let signed = again
            .sign("p1", "1.0.0", "http://127.0.0.1:1/fw", b"bits")
            .unwrap();
        assert_eq!(signed.manifest.size, 4);
        let public = parse_public_key(&key.public_key_base64()).unwrap();
        assert_eq!(
            verify_manifest(&signed.manifest, &signed.signature, &public),
            Ok(())
        );
        assert!(SigningKey::sign(&key, "p1", "1.0.0", "http://x/a b", b"").is_err());

        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(matches!(
            SigningKey::from_pem_file(&path),
            Err(ReleaseError::BadKey(_))
        ));
    }
}
