//! Software updates on the wire: the signed release manifest, the cohort's desired release
//! (`cohorts/{cohort_id}/updates`, retained) and a device's progress reports
//! (`devices/{id}/updates`). See `topics.md`, "Updates".
//!
//! Who is in the current wave of a staged rollout is decided without a per-device message:
//! every device ranks itself with [`rollout_rank`] (a hash of the deployment and its own id)
//! and is admitted when its rank is below the command's `admit_below`. The fleet service
//! computes the same ranks, so both sides agree on the wave, and widening a rollout is one
//! retained message with a larger `admit_below`.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::DeviceId;

/// `admit_below` that admits every device: ranks are `u32`, so all of them are below 2³².
pub const ADMIT_ALL: u64 = 1 << 32;

/// A device's place in the rollout order of one deployment: the first four bytes of
/// SHA-256(`"{deployment_id}/{device_id}"`), big-endian. Uniform, stable for the deployment,
/// and different for every deployment, so the same devices are not always first.
pub fn rollout_rank(deployment_id: &str, device_id: &DeviceId) -> u32 {
    let mut h = Sha256::new();
    h.update(deployment_id.as_bytes());
    h.update(b"/");
    h.update(device_id.as_str().as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// What a release's Ed25519 signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    pub product_id: String,
    /// Semantic version, e.g. `1.4.2`.
    pub version: String,
    /// Where devices download the artifact.
    pub url: String,
    /// Artifact size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the artifact.
    pub sha256: String,
}

/// Why a manifest cannot be put in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} must not contain whitespace or control characters")]
    BadChars(&'static str),
    #[error("sha256 must be 64 lowercase hex characters")]
    BadHash,
}

impl ReleaseManifest {
    /// The bytes that are signed: one `key:value` line per field, in this order, each ending
    /// in `\n`, after a version line. No field may hold whitespace, so the form is unambiguous
    /// and any device can rebuild it without a JSON library.
    ///
    /// ```text
    /// fleet-release-manifest-v1
    /// product_id:<product_id>
    /// version:<version>
    /// url:<url>
    /// size:<decimal size>
    /// sha256:<64 lowercase hex>
    /// ```
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, ManifestError> {
        for (name, value) in [
            ("product_id", &self.product_id),
            ("version", &self.version),
            ("url", &self.url),
        ] {
            if value.is_empty() {
                return Err(ManifestError::Empty(name));
            }
            if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ManifestError::BadChars(name));
            }
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ManifestError::BadHash);
        }
        Ok(format!(
            "fleet-release-manifest-v1\nproduct_id:{}\nversion:{}\nurl:{}\nsize:{}\nsha256:{}\n",
            self.product_id, self.version, self.url, self.size, self.sha256
        )
        .into_bytes())
    }
}

/// Why a signing key or signature is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("public key must be 32 bytes of Ed25519 key, as base64 or a PEM PUBLIC KEY")]
    BadPublicKey,
    #[error("signature must be base64 of 64 bytes")]
    BadSignatureEncoding,
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("the signature does not verify against key {0}")]
    Invalid(String),
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Reads an Ed25519 public key: base64 of the 32 raw bytes, or a PEM `PUBLIC KEY` (what
/// `openssl pkey -pubout` writes).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], SignatureError> {
    let text = text.trim();
    let b64 = match text.strip_prefix("-----BEGIN PUBLIC KEY-----") {
        Some(rest) => rest
            .trim_end()
            .strip_suffix("-----END PUBLIC KEY-----")
            .ok_or(SignatureError::BadPublicKey)?
            .split_whitespace()
            .collect::<String>(),
        None => text.to_owned(),
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| SignatureError::BadPublicKey)?;
    let raw = match der.len() {
        32 => &der[..],
        44 if der[..12] == ED25519_SPKI_PREFIX => &der[12..],
        _ => return Err(SignatureError::BadPublicKey),
    };
    raw.try_into().map_err(|_| SignatureError::BadPublicKey)
}

/// The id of a signing key: the first 16 lowercase hex characters of SHA-256 of its 32 bytes.
pub fn key_id(public_key: &[u8; 32]) -> String {
    Sha256::digest(public_key)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks `signature` (base64) over the manifest's canonical bytes with `public_key`.
pub fn verify_manifest(
    manifest: &ReleaseManifest,
    signature: &str,
    public_key: &[u8; 32],
) -> Result<(), SignatureError> {
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| SignatureError::BadSignatureEncoding)?;
    if sig.len() != 64 {
        return Err(SignatureError::BadSignatureEncoding);
    }
    let bytes = manifest.canonical_bytes()?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&bytes, &sig)
        .map_err(|_| SignatureError::Invalid(key_id(public_key)))
}

/// A release as devices receive it: the manifest, its signature and which key made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRelease {
    #[serde(flatten)]
    pub manifest: ReleaseManifest,
    /// Base64 (standard, padded) of the 64-byte Ed25519 signature over
    /// [`ReleaseManifest::canonical_bytes`].
    pub signature: String,
    /// The signing key's id: lowercase hex SHA-256 of its 32-byte public key, first 16 chars.
    pub key_id: String,
}

/// The state of a deployment as the cohort topic carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Admitted devices install; the wave may widen.
    Active,
    /// Admitted devices that have not started wait; those installing finish.
    Paused,
    /// Every wave is admitted and finished. Devices joining the cohort later still converge.
    Completed,
    /// Stopped for good: devices that have not started never start.
    Canceled,
    /// Replaced by a rollback; the cohort topic then carries the rollback deployment.
    RolledBack,
}

impl DeploymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Active => "active",
            DeploymentState::Paused => "paused",
            DeploymentState::Completed => "completed",
            DeploymentState::Canceled => "canceled",
            DeploymentState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            DeploymentState::Active,
            DeploymentState::Paused,
            DeploymentState::Completed,
            DeploymentState::Canceled,
            DeploymentState::RolledBack,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether devices may start installing under this state.
    pub fn may_start(self) -> bool {
        matches!(self, DeploymentState::Active | DeploymentState::Completed)
    }
}

/// `cohorts/{cohort_id}/updates` (retained, QoS 1): the cohort's desired release. The newest
/// retained message is the whole truth; a device that was offline converges on connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateCommand {
    pub deployment_id: String,
    pub state: DeploymentState,
    pub release: SignedRelease,
    /// A device is in the rollout when `rollout_rank(deployment_id, device) < admit_below`.
    /// [`ADMIT_ALL`] admits everyone. The platform sets it from the devices it can reach (see
    /// `topics.md`, "Which devices a wave counts"); an admitted device that was away installs
    /// when it connects all the same.
    pub admit_below: u64,
    /// An admitted device waits a uniformly random time up to this before it downloads.
    #[serde(default)]
    pub jitter_s: u32,
    /// Grows with every message of the deployment; a device ignores an older one.
    pub revision: u64,
    /// When the fleet service issued this message, Unix milliseconds.
    pub issued_at_ms: i64,
}

impl UpdateCommand {
    /// Whether `device` is admitted to this deployment's rollout.
    pub fn admits(&self, device: &DeviceId) -> bool {
        u64::from(rollout_rank(&self.deployment_id, device)) < self.admit_below
    }
}

/// Where a device is with one deployment. `timed_out` is never reported by a device: the fleet
/// service sets it when a device stays silent too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateStatusKind {
    Queued,
    Downloading,
    Verifying,
    Installing,
    Rebooting,
    Succeeded,
    /// The update was attempted and did not work (download, install, boot).
    Failed,
    /// The device refused the update (bad signature, hash or size mismatch, wrong product,
    /// untrusted key).
    Rejected,
}

impl UpdateStatusKind {
    pub const ALL: [UpdateStatusKind; 8] = [
        UpdateStatusKind::Queued,
        UpdateStatusKind::Downloading,
        UpdateStatusKind::Verifying,
        UpdateStatusKind::Installing,
        UpdateStatusKind::Rebooting,
        UpdateStatusKind::Succeeded,
        UpdateStatusKind::Failed,
        UpdateStatusKind::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStatusKind::Queued => "queued",
            UpdateStatusKind::Downloading => "downloading",
            UpdateStatusKind::Verifying => "verifying",
            UpdateStatusKind::Installing => "installing",
            UpdateStatusKind::Rebooting => "rebooting",
            UpdateStatusKind::Succeeded => "succeeded",
            UpdateStatusKind::Failed => "failed",
            UpdateStatusKind::Rejected => "rejected",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            UpdateStatusKind::Succeeded | UpdateStatusKind::Failed | UpdateStatusKind::Rejected
        )
    }
}

/// `devices/{id}/updates` (QoS 1, not retained): a device's progress on one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub deployment_id: String,
    pub status: UpdateStatusKind,
    /// What the device runs now (after `succeeded`: the new version; after a failure or its
    /// own rollback: what it went back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
    /// Why it failed or refused; free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the device reported, Unix milliseconds.
    #[serde(default)]
    pub ts_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ReleaseManifest {
        ReleaseManifest {
            product_id: "p1".into(),
            version: "1.2.3".into(),
            url: "http://127.0.0.1:9/fw.bin".into(),
            size: 42,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn canonical_manifest_is_fixed_text() {
        let text = String::from_utf8(manifest().canonical_bytes().unwrap()).unwrap();
        assert_eq!(
            text,
            format!(
                "fleet-release-manifest-v1\nproduct_id:p1\nversion:1.2.3\n\
                 url:http://127.0.0.1:9/fw.bin\nsize:42\nsha256:{}\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn canonical_manifest_refuses_ambiguous_fields() {
        let cases: Vec<(ReleaseManifest, ManifestError)> = vec![
            (
                ReleaseManifest {
                    url: "http://x/a\nsize:1".into(),
                    ..manifest()
                },
                ManifestError::BadChars("url"),
            ),
            (
                ReleaseManifest {
                    version: String::new(),
                    ..manifest()
                },
                ManifestError::Empty("version"),
            ),
            (
                ReleaseManifest {
                    sha256: "AB".repeat(32),
                    ..manifest()
                },
                ManifestError::BadHash,
            ),
            (
                ReleaseManifest {
                    sha256: "ab".into(),
                    ..manifest()
                },
                ManifestError::BadHash,
            ),
        ];
        for (m, want) in cases {
            assert_eq!(m.canonical_bytes(), Err(want));
        }
    }

    #[test]
    fn ranks_are_stable_spread_and_per_deployment() {
        let ids: Vec<DeviceId> = (0..2000)
            .map(|i| DeviceId::parse(&format!("dev-{i}")).unwrap())
            .collect();
        let a: Vec<u32> = ids.iter().map(|d| rollout_rank("dep-a", d)).collect();
        let again: Vec<u32> = ids.iter().map(|d| rollout_rank("dep-a", d)).collect();
        assert_eq!(a, again);
        // Roughly uniform: each quarter of the rank space holds about a quarter of the devices.
        for q in 0..4u64 {
            let n = a.iter().filter(|r| (u64::from(**r) >> 30) == q).count();
            assert!((400..600).contains(&n), "quarter {q}: {n}");
        }
        let b: Vec<u32> = ids.iter().map(|d| rollout_rank("dep-b", d)).collect();
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 5, "another deployment orders devices differently");
    }

    #[test]
    fn admission_follows_the_cutoff() {
        let d = DeviceId::parse("dev-1").unwrap();
        let rank = u64::from(rollout_rank("dep", &d));
        let cmd = |admit_below| UpdateCommand {
            deployment_id: "dep".into(),
            state: DeploymentState::Active,
            release: SignedRelease {
                manifest: manifest(),
                signature: String::new(),
                key_id: String::new(),
            },
            admit_below,
            jitter_s: 0,
            revision: 1,
            issued_at_ms: 0,
        };
        assert!(!cmd(0).admits(&d));
        assert!(!cmd(rank).admits(&d));
        assert!(cmd(rank + 1).admits(&d));
        assert!(cmd(ADMIT_ALL).admits(&d));
    }

    #[test]
    fn signatures_verify_only_for_the_signed_manifest_and_key() {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let m = manifest();
        let sig = b64(pair.sign(&m.canonical_bytes().unwrap()).as_ref());
        assert_eq!(verify_manifest(&m, &sig, &public), Ok(()));

        let tampered = ReleaseManifest {
            size: m.size + 1,
            ..m.clone()
        };
        assert_eq!(
            verify_manifest(&tampered, &sig, &public),
            Err(SignatureError::Invalid(key_id(&public)))
        );
        let other = [7u8; 32];
        assert!(verify_manifest(&m, &sig, &other).is_err());
        assert_eq!(
            verify_manifest(&m, "not base64!", &public),
            Err(SignatureError::BadSignatureEncoding)
        );

        // Both key encodings name the same key.
        assert_eq!(parse_public_key(&b64(&public)), Ok(public));
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&public);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            b64(&spki)
        );
        assert_eq!(parse_public_key(&pem), Ok(public));
        assert_eq!(parse_public_key("AAAA"), Err(SignatureError::BadPublicKey));
        assert_eq!(key_id(&public).len(), 16);
    }

    #[test]
    fn payloads_round_trip() {
        let s: UpdateStatus = serde_json::from_str(
            r#"{"deployment_id":"d","status":"rejected","error":"bad signature","ts_ms":5}"#,
        )
        .unwrap();
        assert_eq!(s.status, UpdateStatusKind::Rejected);
        assert!(s.status.is_terminal());
        assert!(serde_json::from_str::<UpdateStatus>(
            r#"{"deployment_id":"d","status":"timed_out"}"#
        )
        .is_err());
        let release: SignedRelease = serde_json::from_value(serde_json::json!({
            "product_id": "p1", "version": "1.2.3", "url": "http://h/f", "size": 3,
            "sha256": "ab".repeat(32), "signature": "c2ln", "key_id": "k"
        }))
        .unwrap();
        assert_eq!(release.manifest.size, 3);
        assert_eq!(
            DeploymentState::parse("rolled_back"),
            Some(DeploymentState::RolledBack)
        );
        assert!(!DeploymentState::Paused.may_start());
    }
}
