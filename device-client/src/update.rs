//! Software updates on the device: follows the cohort's desired release and installs it
//! through a handler the embedding program supplies.
//!
//! The [`Updater`] watches the agent's newest cohort message
//! ([`AgentHandle::watch_cohort_update`], so one that arrived before the updater started is
//! not missed). For the newest command
//! of the cohort it decides (see [`plan`]) whether this device should act: the deployment
//! must let devices start, admit this device (its rollout rank below `admit_below`), and not
//! have been attempted here before. It then reports every step on `devices/{id}/updates`:
//! `queued` → (random jitter) → `downloading` → `verifying` (size, SHA-256, and the Ed25519
//! signature over the manifest against the keys this device trusts) → `installing` (the
//! [`Installer`]) → `rebooting` → `succeeded` with the new `firmware_version`, or `failed` /
//! `rejected` with the reason. A device already running the version reports `succeeded` at
//! once.
//!
//! With [`UpdateSettings::update_dir`] the updater records the release it installed in
//! `installed.json` there ([`InstalledRelease`]; written to a temporary file, synced, then
//! renamed over the old one). A restarted device runs that release, and a command naming it
//! again (same product, version and SHA-256) is answered `succeeded` without downloading it.
//!
//! # Invariants
//! - Nothing is installed unless its signature verifies against a trusted key and its bytes
//!   match the signed size and hash; a device with no trusted key refuses every update.
//! - A deployment is attempted at most once per device: after a failure or refusal it is
//!   offered again only by a new deployment. With [`UpdateSettings::state_file`] this
//!   survives restarts.
//! - The reported `firmware_version` changes only after the installer said it worked.
//! - A release is downloaded again only if it differs from the one installed: another
//!   version, or the same version with other bytes. A rollback target is another release, so
//!   it is installed.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_wire::update::{
    key_id, verify_manifest, ReleaseManifest, SignedRelease, UpdateCommand, UpdateStatus,
    UpdateStatusKind,
};
use fleet_wire::DeviceId;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::agent::{AgentHandle, AgentSender};
use crate::error::ConfigError;
use crate::tls::TlsConfig;

/// Why fetching an artifact failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("download failed: {0}")]
    Transport(String),
    #[error("download failed: HTTP {0}")]
    Status(u16),
    #[error("artifact is larger than the {0} bytes the release names")]
    TooLarge(u64),
    #[error("download timed out after {0:?}")]
    Timeout(Duration),
}

/// Where artifacts come from. [`HttpFetcher`] downloads the release URL.
pub trait Fetcher: Send + Sync + 'static {
    /// The artifact's bytes; at most `release.size + 1` are read, so an oversized artifact is
    /// noticed without downloading all of it.
    fn fetch(
        &self,
        release: &ReleaseManifest,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send;
}

/// What installs a verified artifact: writes it to the inactive partition, and so on.
pub trait Installer: Send + Sync + 'static {
    /// Installs `artifact`, already verified. `Err` reports the update `failed` with the text.
    fn install(
        &self,
        release: &ReleaseManifest,
        artifact: Bytes,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

impl<F, Fut> Installer for F
where
    F: Fn(ReleaseManifest, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    fn install(
        &self,
        release: &ReleaseManifest,
        artifact: Bytes,
    ) -> impl Future<Output = Result<(), String>> + Send {
        self(release.clone(), artifact)
    }
}

/// Downloads over HTTP or HTTPS. Transport security is not what makes an update safe: every
/// artifact is checked against the signed size and SHA-256 before it is installed. Cheap to
/// clone (one connection pool), so many devices of a simulation share one.
///
/// A download that fails for a reason that may pass (the server not answering yet, a timeout,
/// HTTP 408, 429 or 5xx) is tried again after each of [`DOWNLOAD_RETRY_DELAYS`] before the
/// update is reported failed: a failed update is final for its deployment, and an artifact
/// server restarting for a few seconds must not fail a fleet's rollout.
#[derive(Clone)]
pub struct HttpFetcher {
    client: reqwest::Client,
    timeout: Duration,
    retry_delays: Vec<Duration>,
}

/// The waits before each new try of a download that failed for a passing reason.
pub const DOWNLOAD_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

impl FetchError {
    /// Whether trying again later may succeed: the transport failed, the server took too
    /// long, or it said it is busy or broken (408, 429, 5xx). A 404 or an oversized artifact
    /// stays what it is.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Transport(_) | FetchError::Timeout(_) => true,
            FetchError::Status(code) => matches!(code, 408 | 429 | 500..=599),
            FetchError::TooLarge(_) => false,
        }
    }
}

impl HttpFetcher {
    /// HTTPS servers are verified against the operating system's CA certificates.
    pub fn new(timeout: Duration) -> Result<Self, ConfigError> {
        Self::with_tls(timeout, &TlsConfig::system_roots()?)
    }

    /// HTTPS servers are verified against `tls`'s roots (and `tls`'s client certificate, if
    /// any, is presented).
    pub fn with_tls(timeout: Duration, tls: &TlsConfig) -> Result<Self, ConfigError> {
        let config = tls.client_config()?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*config).clone())
            .build()
            .map_err(|e| ConfigError::Tls(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            timeout,
            retry_delays: DOWNLOAD_RETRY_DELAYS.to_vec(),
        })
    }

    /// Waits before each new try of a transiently failed download (none: one try only).
    pub fn with_retry_delays(mut self, delays: Vec<Duration>) -> Self {
        self.retry_delays = delays;
        self
    }
}

impl HttpFetcher {
    /// One try: at most `limit + 1` bytes within the timeout.
    async fn fetch_once(&self, url: &str, limit: u64) -> Result<Bytes, FetchError> {
        let download = async {
            let mut resp = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| FetchError::Transport(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            let mut body = Vec::with_capacity(limit.min(64 << 20) as usize);
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| FetchError::Transport(e.to_string()))?
            {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > limit {
                    return Err(FetchError::TooLarge(limit));
                }
            }
            Ok(Bytes::from(body))
        };
        tokio::time::timeout(self.timeout, download)
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }
}

impl Fetcher for HttpFetcher {
    fn fetch(
        &self,
        release: &ReleaseManifest,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send {
        let this = self.clone();
        let url = release.url.clone();
        let limit = release.size;
        async move {
            let mut waits = this.retry_delays.iter();
            loop {
                match this.fetch_once(&url, limit).await {
                    Err(e) if e.is_transient() => match waits.next() {
                        Some(wait) => {
                            info!(%url, error = %e, wait = ?wait, "download failed; trying again");
                            tokio::time::sleep(*wait).await;
                        }
                        None => return Err(e),
                    },
                    done => return done,
                }
            }
        }
    }
}

/// How the updater behaves.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    /// Ed25519 public keys whose releases this device installs. Empty: every update is
    /// rejected.
    pub trusted_keys: Vec<[u8; 32]>,
    /// What the device runs at start.
    pub firmware_version: Option<String>,
    /// Where attempted deployments are remembered across restarts (JSON); none keeps them in
    /// memory only.
    pub state_file: Option<PathBuf>,
    /// Where the release this device installed is recorded (`installed.json`), so that a
    /// restarted device knows what it runs and does not download it again. None: the record
    /// is kept in memory only.
    pub update_dir: Option<PathBuf>,
}

/// The release this device installed last, as [`Updater`] records it in
/// `<update_dir>/installed.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRelease {
    pub product_id: String,
    pub version: String,
    /// SHA-256 of the artifact, lowercase hex, as the signed manifest names it.
    pub sha256: String,
    /// The deployment that installed it.
    pub deployment_id: String,
    /// When the installer finished, by the device's clock (Unix ms).
    pub installed_at_ms: i64,
}

impl InstalledRelease {
    /// The record's file name inside the update directory.
    pub const FILE: &'static str = "installed.json";

    /// Reads the record of `dir`. `Ok(None)` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes the record into `dir`, replacing the old one atomically and durably.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomically(&dir.join(Self::FILE), &bytes)
    }

    /// The same release: same product, version and bytes.
    pub fn is(&self, release: &ReleaseManifest) -> bool {
        self.product_id == release.product_id
            && self.version == release.version
            && self.sha256.eq_ignore_ascii_case(&release.sha256)
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old content or the new one:
/// a temporary file in the same directory, synced, renamed over `path`, then the directory
/// synced so the rename itself survives a power cut.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    // Directories cannot be opened for syncing everywhere (Windows); where they can, the
    // rename is durable once this returns.
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all()?;
    }
    Ok(())
}

/// Why a release is refused before anything is downloaded or installed, or after download.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no trusted signing key on this device")]
    NoTrustedKey,
    #[error("release is signed by key {0}, which this device does not trust")]
    UntrustedKey(String),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("artifact is {got} bytes, the release says {want}")]
    SizeMismatch { got: u64, want: u64 },
    #[error("artifact SHA-256 is {got}, the release says {want}")]
    HashMismatch { got: String, want: String },
}

/// Checks the release's signature against the trusted keys.
pub fn verify_release(release: &SignedRelease, trusted: &[[u8; 32]]) -> Result<(), Refusal> {
    if trusted.is_empty() {
        return Err(Refusal::NoTrustedKey);
    }
    let key = trusted
        .iter()
        .find(|k| key_id(k) == release.key_id)
        .ok_or_else(|| Refusal::UntrustedKey(release.key_id.clone()))?;
    verify_manifest(&release.manifest, &release.signature, key)
        .map_err(|e| Refusal::BadSignature(e.to_string()))
}

/// Checks downloaded bytes against the signed size and hash.
pub fn verify_artifact(manifest: &ReleaseManifest, artifact: &[u8]) -> Result<(), Refusal> {
    if artifact.len() as u64 != manifest.size {
        return Err(Refusal::SizeMismatch {
            got: artifact.len() as u64,
            want: manifest.size,
        });
    }
    let got = hex::encode(Sha256::digest(artifact));
    if got != manifest.sha256 {
        return Err(Refusal::HashMismatch {
            got,
            want: manifest.sha256.clone(),
        });
    }
    Ok(())
}

/// How an attempted deployment ended on this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attempt {
    Succeeded,
    Failed,
    Rejected,
}

/// What to do about the newest cohort command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: not admitted, not startable, or attempted already.
    Nothing(&'static str),
    /// The device runs this release already: report `succeeded` without downloading it.
    AlreadyInstalled,
    /// Download, verify and install.
    Install,
}

/// Decides what the device does about `cmd`. `installed` is the release the updater installed
/// last; when there is one it says what the device runs (version and bytes), otherwise
/// `running`, the version the device was started with, does.
pub fn plan(
    cmd: &UpdateCommand,
    device: &DeviceId,
    running: Option<&str>,
    installed: Option<&InstalledRelease>,
    attempted: &BTreeMap<String, Attempt>,
) -> Plan {
    if attempted.contains_key(&cmd.deployment_id) {
        return Plan::Nothing("attempted already");
    }
    if !cmd.state.may_start() {
        return Plan::Nothing("deployment does not let devices start");
    }
    if !cmd.admits(device) {
        return Plan::Nothing("not admitted to the rollout yet");
    }
    let already = match installed {
        Some(installed) => installed.is(&cmd.release.manifest),
        None => running == Some(cmd.release.manifest.version.as_str()),
    };
    if already {
        return Plan::AlreadyInstalled;
    }
    Plan::Install
}

/// Follows the cohort topic of one agent and installs what it is told to.
pub struct Updater;

impl Updater {
    /// Starts the updater for `agent` on the current runtime. It stops when the agent stops.
    pub fn spawn<F: Fetcher, I: Installer>(
        agent: &AgentHandle,
        settings: UpdateSettings,
        fetcher: F,
        installer: I,
    ) -> JoinHandle<()> {
        let attempted = settings
            .state_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let installed = settings.update_dir.as_deref().and_then(|dir| {
            InstalledRelease::load(dir)
                .inspect_err(
                    |e| warn!(error = %e, "the installed-release record is unreadable; ignored"),
                )
                .ok()
                .flatten()
        });
        let running = installed
            .as_ref()
            .map(|i| i.version.clone())
            .or_else(|| settings.firmware_version.clone());
        let run = Run {
            device: agent.device_id().clone(),
            updates: agent.watch_cohort_update(),
            agent: agent.sender(),
            running,
            installed,
            settings,
            attempted,
            fetcher: Arc::new(fetcher),
            installer: Arc::new(installer),
        };
        tokio::spawn(run.run())
    }
}

struct Run<F, I> {
    device: DeviceId,
    updates: watch::Receiver<serde_json::Value>,
    agent: AgentSender,
    settings: UpdateSettings,
    running: Option<String>,
    installed: Option<InstalledRelease>,
    attempted: BTreeMap<String, Attempt>,
    fetcher: Arc<F>,
    installer: Arc<I>,
}

/// The device's clock, for reports.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl<F: Fetcher, I: Installer> Run<F, I> {
    async fn run(mut self) {
        if let Some(installed) = &self.installed {
            if self.settings.firmware_version.as_ref() != Some(&installed.version) {
                // The device runs what it installed, whatever it was started with.
                info!(version = %installed.version, "running the release installed earlier");
                let _ = self
                    .agent
                    .set_firmware_version(installed.version.clone())
                    .await;
            }
        }
        let mut latest: Option<UpdateCommand> = None;
        loop {
            match self.next_command(&mut latest, None).await {
                Some(true) => {}
                Some(false) => continue,
                None => return,
            }
            let Some(cmd) = latest.clone() else { continue };
            let installed = self.installed.as_ref();
            match plan(
                &cmd,
                &self.device,
                self.running.as_deref(),
                installed,
                &self.attempted,
            ) {
                Plan::Nothing(why) => {
                    tracing::debug!(deployment_id = %cmd.deployment_id, why, "no update action");
                }
                Plan::AlreadyInstalled => {
                    info!(deployment_id = %cmd.deployment_id, version = %cmd.release.manifest.version,
                        "release already installed");
                    self.finish(&cmd, UpdateStatusKind::Succeeded, None).await;
                }
                Plan::Install => {
                    if !self.report(&cmd, UpdateStatusKind::Queued, None).await {
                        return;
                    }
                    // Jitter: spread the downloads of a wave. A newer command meanwhile (pause,
                    // cancel) is honoured before anything is downloaded.
                    let wait = if cmd.jitter_s == 0 {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(
                            rand::thread_rng().gen_range(0..=u64::from(cmd.jitter_s) * 1000),
                        )
                    };
                    let deadline = tokio::time::Instant::now() + wait;
                    loop {
                        match self.next_command(&mut latest, Some(deadline)).await {
                            None => return,
                            Some(_) if tokio::time::Instant::now() >= deadline => break,
                            Some(_) => {}
                        }
                    }
                    let current = latest.clone().unwrap_or(cmd.clone());
                    if current.deployment_id != cmd.deployment_id || !current.state.may_start() {
                        info!(deployment_id = %cmd.deployment_id, "update held back before download");
                        continue;
                    }
                    self.install(&current).await;
                }
            }
        }
    }

    /// Waits for the next cohort command (or the deadline) and keeps the newest in `latest`.
    /// `Some(true)` when `latest` changed, `Some(false)` on anything else or the deadline,
    /// `None` when the agent stopped.
    async fn next_command(
        &mut self,
        latest: &mut Option<UpdateCommand>,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<bool> {
        // The first look also takes a message that arrived before the updater started.
        if !self.updates.has_changed().ok()? {
            let changed = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.updates.changed()).await {
                    Ok(r) => r,
                    Err(_) => return Some(false),
                },
                None => self.updates.changed().await,
            };
            changed.ok()?;
        }
        let payload = self.updates.borrow_and_update().clone();
        if payload.is_null() {
            return Some(false);
        }
        match serde_json::from_value::<UpdateCommand>(payload) {
            Ok(cmd) => {
                let newer = latest.as_ref().is_none_or(|l| {
                    l.deployment_id != cmd.deployment_id || cmd.revision > l.revision
                });
                if newer {
                    *latest = Some(cmd);
                }
                Some(newer)
            }
            Err(e) => {
                warn!(error = %e, "cohort update command is not understood; ignored");
                Some(false)
            }
        }
    }

    async fn install(&mut self, cmd: &UpdateCommand) {
        let manifest = &cmd.release.manifest;
        if let Err(why) = verify_release(&cmd.release, &self.settings.trusted_keys) {
            warn!(deployment_id = %cmd.deployment_id, reason = %why, "update refused");
            self.finish(cmd, UpdateStatusKind::Rejected, Some(why.to_string()))
                .await;
            return;
        }
        self.report(cmd, UpdateStatusKind::Downloading, None).await;
        let artifact = match self.fetcher.fetch(manifest).await {
            Ok(a) => a,
            Err(FetchError::TooLarge(want)) => {
                let why = Refusal::SizeMismatch {
                    got: want + 1,
                    want,
                };
                self.finish(cmd, UpdateStatusKind::Rejected, Some(why.to_string()))
                    .await;
                return;
            }
            Err(e) => {
                warn!(deployment_id = %cmd.deployment_id, error = %e, "download failed");
                self.finish(cmd, UpdateStatusKind::Failed, Some(e.to_string()))
                    .await;
                return;
            }
        };
        self.report(cmd, UpdateStatusKind::Verifying, None).await;
        if let Err(why) = verify_artifact(manifest, &artifact) {
            warn!(deployment_id = %cmd.deployment_id, reason = %why, "artifact refused");
            self.finish(cmd, UpdateStatusKind::Rejected, Some(why.to_string()))
                .await;
            return;
        }
        self.report(cmd, UpdateStatusKind::Installing, None).await;
        if let Err(e) = self.installer.install(manifest, artifact).await {
            warn!(deployment_id = %cmd.deployment_id, error = %e, "install failed");
            self.finish(cmd, UpdateStatusKind::Failed, Some(e)).await;
            return;
        }
        let installed = InstalledRelease {
            product_id: manifest.product_id.clone(),
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
            deployment_id: cmd.deployment_id.clone(),
            installed_at_ms: now_ms(),
        };
        if let Some(dir) = &self.settings.update_dir {
            if let Err(e) = installed.save(dir) {
                // Installed all the same; a restart would download it once more.
                warn!(dir = %dir.display(), error = %e, "could not record the installed release");
            }
        }
        self.installed = Some(installed);
        self.report(cmd, UpdateStatusKind::Rebooting, None).await;
        self.running = Some(manifest.version.clone());
        let _ = self
            .agent
            .set_firmware_version(manifest.version.clone())
            .await;
        info!(deployment_id = %cmd.deployment_id, version = %manifest.version, "update installed");
        self.finish(cmd, UpdateStatusKind::Succeeded, None).await;
    }

    async fn report(
        &self,
        cmd: &UpdateCommand,
        status: UpdateStatusKind,
        error: Option<String>,
    ) -> bool {
        self.agent
            .report_update(UpdateStatus {
                deployment_id: cmd.deployment_id.clone(),
                status,
                firmware_version: self.running.clone(),
                error,
                ts_ms: now_ms(),
            })
            .await
            .is_ok()
    }

    /// Reports a final status and remembers the attempt.
    async fn finish(
        &mut self,
        cmd: &UpdateCommand,
        status: UpdateStatusKind,
        error: Option<String>,
    ) {
        self.report(cmd, status, error).await;
        let attempt = match status {
            UpdateStatusKind::Succeeded => Attempt::Succeeded,
            UpdateStatusKind::Rejected => Attempt::Rejected,
            _ => Attempt::Failed,
        };
        self.attempted.insert(cmd.deployment_id.clone(), attempt);
        if let Some(path) = &self.settings.state_file {
            let written = serde_json::to_vec_pretty(&self.attempted)
                .map_err(|e| e.to_string())
                .and_then(|b| write_atomically(path, &b).map_err(|e| e.to_string()));
            if let Err(e) = written {
                warn!(path = %path.display(), error = %e, "could not save the update state");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use fleet_wire::update::{DeploymentState, ADMIT_ALL};
    use ring::signature::KeyPair;

    fn signed(version: &str, artifact: &[u8]) -> (SignedRelease, [u8; 32]) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let manifest = ReleaseManifest {
            product_id: "p".into(),
            version: version.into(),
            url: "http://127.0.0.1:9/a".into(),
            size: artifact.len() as u64,
            sha256: hex::encode(Sha256::digest(artifact)),
        };
        let sig = pair.sign(&manifest.canonical_bytes().unwrap());
        (
            SignedRelease {
                manifest,
                signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
                key_id: key_id(&public),
            },
            public,
        )
    }

    #[test]
    fn release_verification() {
        let (release, key) = signed("2.0.0", b"firmware");
        assert_eq!(verify_release(&release, &[key]), Ok(()));
        assert_eq!(verify_release(&release, &[]), Err(Refusal::NoTrustedKey));
        assert!(matches!(
            verify_release(&release, &[[1u8; 32]]),
            Err(Refusal::UntrustedKey(_))
        ));
        let mut forged = release.clone();
        forged.manifest.url = "http://evil/a".into();
        assert!(matches!(
            verify_release(&forged, &[key]),
            Err(Refusal::BadSignature(_))
        ));
        assert_eq!(verify_artifact(&release.manifest, b"firmware"), Ok(()));
        assert!(matches!(
            verify_artifact(&release.manifest, b"firmwarE"),
            Err(Refusal::HashMismatch { .. })
        ));
        assert_eq!(
            verify_artifact(&release.manifest, b"firm"),
            Err(Refusal::SizeMismatch { got: 4, want: 8 })
        );
    }

    #[test]
    fn plans() {
        let (release, _) = signed("2.0.0", b"x");
        let device = DeviceId::parse("dev-1").unwrap();
        let cmd = |state, admit_below| UpdateCommand {
            deployment_id: "dep-1".into(),
            state,
            release: release.clone(),
            admit_below,
            jitter_s: 0,
            revision: 1,
            issued_at_ms: 0,
        };
        let none = BTreeMap::new();
        let mut tried = BTreeMap::new();
        tried.insert("dep-1".to_owned(), Attempt::Failed);
        let cases = [
            (
                cmd(DeploymentState::Active, ADMIT_ALL),
                Some("1.0.0"),
                &none,
                Plan::Install,
            ),
            (
                cmd(DeploymentState::Active, ADMIT_ALL),
                Some("2.0.0"),
                &none,
                Plan::AlreadyInstalled,
            ),
            (
                cmd(DeploymentState::Active, 0),
                Some("1.0.0"),
                &none,
                Plan::Nothing("not admitted to the rollout yet"),
            ),
            (
                cmd(DeploymentState::Paused, ADMIT_ALL),
                Some("1.0.0"),
                &none,
                Plan::Nothing("deployment does not let devices start"),
            ),
            (
                cmd(DeploymentState::Canceled, ADMIT_ALL),
                None,
                &none,
                Plan::Nothing("deployment does not let devices start"),
            ),
            (
                cmd(DeploymentState::Completed, ADMIT_ALL),
                None,
                &none,
                Plan::Install,
            ),
            (
                cmd(DeploymentState::Active, ADMIT_ALL),
                Some("1.0.0"),
                &tried,
                Plan::Nothing("attempted already"),
            ),
        ];
        for (c, running, attempted, want) in cases {
            assert_eq!(
                plan(&c, &device, running, None, attempted),
                want,
                "{:?}",
                c.state
            );
        }
    }

    /// With a record of what the updater installed, the record says what the device runs:
    /// the same release (product, version and bytes) is not downloaded again; another
    /// version, rebuilt bytes under the same version, and a rollback target are installed.
    #[test]
    fn plans_with_an_installed_release() {
        let (release, _) = signed("2.0.0", b"x");
        let (rebuilt, _) = signed("2.0.0", b"y");
        let (older, _) = signed("1.0.0", b"z");
        let device = DeviceId::parse("dev-1").unwrap();
        let cmd = |release: &SignedRelease| UpdateCommand {
            deployment_id: "dep-2".into(),
            state: DeploymentState::Active,
            release: release.clone(),
            admit_below: ADMIT_ALL,
            jitter_s: 0,
            revision: 1,
            issued_at_ms: 0,
        };
        let installed = InstalledRelease {
            product_id: "p".into(),
            version: "2.0.0".into(),
            sha256: release.manifest.sha256.to_uppercase(),
            deployment_id: "dep-1".into(),
            installed_at_ms: 1,
        };
        let none = BTreeMap::new();
        let cases = [
            (&release, Some("1.0.0"), Plan::AlreadyInstalled),
            (&release, None, Plan::AlreadyInstalled),
            (&rebuilt, Some("2.0.0"), Plan::Install),
            (&older, Some("2.0.0"), Plan::Install),
            (&older, Some("1.0.0"), Plan::Install),
        ];
        for (r, running, want) in cases {
            let got = plan(&cmd(r), &device, running, Some(&installed), &none);
            assert_eq!(got, want, "{} over {running:?}", r.manifest.version);
        }
        let mut other_product = installed.clone();
        other_product.product_id = "q".into();
        assert_eq!(
            plan(&cmd(&release), &device, None, Some(&other_product), &none),
            Plan::Install
        );
    }

    #[test]
    fn installed_release_record_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(InstalledRelease::load(dir.path()), Ok(None));
        let mut record = InstalledRelease {
            product_id: "p".into(),
            version: "2.0.0".into(),
            sha256: "ab".repeat(32),
            deployment_id: "dep-1".into(),
            installed_at_ms: 1,
        };
        record.save(dir.path()).unwrap();
        assert_eq!(InstalledRelease::load(dir.path()), Ok(Some(record.clone())));
        record.version = "3.0.0".into();
        record.save(dir.path()).unwrap();
        assert_eq!(InstalledRelease::load(dir.path()), Ok(Some(record)));
        // Only the record is left: the temporary files were renamed over it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [InstalledRelease::FILE]);
        std::fs::write(dir.path().join(InstalledRelease::FILE), b"{not json").unwrap();
        assert!(InstalledRelease::load(dir.path()).is_err());
    }

    /// An HTTP server on 127.0.0.1 that answers each request with the next of `statuses`
    /// (the artifact `body` with a 200), counting the requests.
    async fn artifact_server(
        statuses: Vec<u16>,
        body: &'static [u8],
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/fw.bin", listener.local_addr().unwrap());
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            for status in statuses {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let payload: &[u8] = if status == 200 { body } else { b"" };
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    payload.len()
                );
                sock.write_all(head.as_bytes()).await.unwrap();
                sock.write_all(payload).await.unwrap();
            }
        });
        (url, served)
    }

    fn manifest_at(url: &str, body: &[u8]) -> ReleaseManifest {
        let (mut release, _) = signed("2.0.0", body);
        release.manifest.url = url.to_owned();
        release.manifest
    }

    fn fetcher() -> HttpFetcher {
        HttpFetcher::with_tls(Duration::from_secs(5), &TlsConfig::system_roots().unwrap())
            .unwrap()
            .with_retry_delays(vec![Duration::from_millis(10); 3])
    }

    #[tokio::test]
    async fn a_download_is_tried_again_while_the_server_is_unavailable() {
        let (url, served) = artifact_server(vec![503, 502, 200], b"firmware").await;
        let got = fetcher().fetch(&manifest_at(&url, b"firmware")).await;
        assert_eq!(got.unwrap().as_ref(), b"firmware");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_missing_artifact_is_not_tried_again() {
        let (url, served) = artifact_server(vec![404, 200], b"firmware").await;
        let got = fetcher().fetch(&manifest_at(&url, b"firmware")).await;
        assert_eq!(got.unwrap_err(), FetchError::Status(404));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_after_the_last_retry() {
        // A port nobody listens on: every try is refused.
        let url = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/fw.bin", l.local_addr().unwrap())
        };
        let got = fetcher().fetch(&manifest_at(&url, b"firmware")).await;
        assert!(matches!(got, Err(FetchError::Transport(_))), "{got:?}");
    }
}
