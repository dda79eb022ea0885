//! The broker's in-memory view of who may connect: manufacturing CAs and devices.
//!
//! The connect path reads only from here (DashMap), never from the database. The fleet service
//! loads it on start and keeps it current as operators change things over REST. The one write on
//! the connect path is just-in-time provisioning, which goes through [`RegistryStore`] to the
//! database before the CONNACK, single-flighted per device id so concurrent first connects of one
//! device create one row.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use fleet_wire::{CohortId, DeviceId};

use crate::metrics::{Metrics, Rejection};

/// A manufacturing CA an operator registered.
#[derive(Debug, Clone)]
pub struct CaRecord {
    pub id: String,
    /// The organization that registered the CA; the devices it provisions belong to it.
    pub org_id: String,
    /// DER of the CA certificate; it becomes a TLS trust anchor while `enabled`.
    pub cert_der: Vec<u8>,
    /// DER of the CA's subject name, matched against a device certificate's issuer.
    pub subject_der: Vec<u8>,
    /// Subject key identifier, matched against a device certificate's authority key identifier.
    pub key_id: Option<Vec<u8>>,
    pub enabled: bool,
    /// While disabled: whether devices it already provisioned keep connecting. A disabled CA
    /// never provisions new ones.
    pub keep_devices_when_disabled: bool,
    pub jitp: Option<JitpSettings>,
    /// When the CA certificate expires (Unix ms). Past it, the CA provisions no new device;
    /// those it provisioned before keep connecting while their own certificates are valid.
    pub not_after_ms: i64,
}

impl CaRecord {
    /// Whether the TLS edge accepts chains to this CA at all.
    pub fn trusted(&self) -> bool {
        self.enabled || self.keep_devices_when_disabled
    }
}

/// Where a device provisioned by a CA lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitpSettings {
    pub product_id: String,
    pub cohort_id: CohortId,
    pub tags: BTreeMap<String, String>,
}

/// What the broker needs to know about a device on every connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub org_id: String,
    /// The CA that issued its certificate; a certificate from any other CA is refused. None
    /// for a device registered before manufacturing: any CA of its organization will do.
    pub ca_id: Option<String>,
    /// When set, only the certificate with this fingerprint is admitted.
    pub pinned_fingerprint: Option<String>,
    pub product_id: String,
    pub cohort_id: Option<CohortId>,
    /// The highest session epoch ever handed out; the next session gets a larger one.
    pub session_epoch: u64,
}

/// A device created by just-in-time provisioning, with the certificate facts it came with.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub org_id: String,
    pub ca_id: String,
    pub product_id: String,
    pub cohort_id: CohortId,
    pub tags: BTreeMap<String, String>,
    pub cert: CertFacts,
}

/// Facts read from a verified device certificate.
#[derive(Debug, Clone, Default)]
pub struct CertFacts {
    pub fingerprint_sha256: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("device id {0} is owned by another CA")]
    Collision(DeviceId),
    #[error("registry store failed: {0}")]
    Backend(String),
}

/// The registry's durable side, implemented by the fleet service over its database.
#[async_trait::async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Inserts the device unless a row with its id exists, and returns the row as stored.
    /// Concurrent calls for one id must leave exactly one row.
    async fn provision_device(&self, new: &NewDevice) -> Result<Provisioned, StoreError>;
    /// Records the CA and certificate of a device registered before manufacturing, on its
    /// first connection. A device that already has a CA stays as it is.
    async fn claim_device(
        &self,
        id: &DeviceId,
        ca_id: &str,
        cert: &CertFacts,
    ) -> Result<(), StoreError>;
    /// A device as stored, for a node that hears of a device another node just provisioned
    /// before the change announcing it arrived.
    async fn device_record(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
}

/// The outcome of [`RegistryStore::provision_device`].
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub device: DeviceRecord,
    /// False when the row already existed (another node or an earlier attempt created it).
    pub created: bool,
}

/// Who a connection turned out to be after its certificate was verified.
#[derive(Debug, Clone)]
pub struct DeviceIdentity {
    pub device: DeviceRecord,
    /// The CA that issued the certificate of this connection.
    pub ca_id: String,
    pub provisioned_now: bool,
    pub cert: CertFacts,
}

/// Where a cohort sits, for the topic rights of scoped service keys on `cohorts/{id}/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortRecord {
    pub id: CohortId,
    pub org_id: String,
    pub product_id: String,
}

/// What a quarantined device may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuarantineMode {
    /// It may connect, but only to receive (and acknowledge) its own commands.
    CommandsOnly,
    /// Its connections are refused.
    Refuse,
}

impl QuarantineMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineMode::CommandsOnly => "commands_only",
            QuarantineMode::Refuse => "refuse",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "commands_only" => Some(QuarantineMode::CommandsOnly),
            "refuse" => Some(QuarantineMode::Refuse),
            _ => None,
        }
    }
}

pub struct Registry {
    cas: DashMap<String, CaRecord>,
    /// Fingerprints of certificates never admitted again (revoked, or of deleted devices).
    revoked: dashmap::DashSet<String>,
    cohorts: DashMap<CohortId, CohortRecord>,
    quarantined: DashMap<DeviceId, QuarantineMode>,
    ca_version: AtomicU64,
    devices: DashMap<DeviceId, DeviceRecord>,
    provisioning: DashMap<DeviceId, Arc<tokio::sync::Mutex<()>>>,
    store: Arc<dyn RegistryStore>,
    metrics: Arc<Metrics>,
    /// Epochs follow the clock (cluster nodes); see [`Registry::next_epoch`].
    epoch_clock: std::sync::atomic::AtomicBool,
}

impl Registry {
    pub fn new(store: Arc<dyn RegistryStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            cas: DashMap::new(),
            revoked: dashmap::DashSet::new(),
            cohorts: DashMap::new(),
            quarantined: DashMap::new(),
            ca_version: AtomicU64::new(0),
            devices: DashMap::new(),
            provisioning: DashMap::new(),
            store,
            metrics,
            epoch_clock: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Adds or replaces a CA; the TLS edge trusts it from the next handshake on.
    pub fn upsert_ca(&self, ca: CaRecord) {
        self.cas.insert(ca.id.clone(), ca);
        self.ca_version.fetch_add(1, Ordering::Release);
    }

    /// Returns false when no such CA is known.
    pub fn set_ca_enabled(&self, id: &str, enabled: bool) -> bool {
        let found = match self.cas.get_mut(id) {
            Some(mut ca) => {
                ca.enabled = enabled;
                true
            }
            None => false,
        };
        self.ca_version.fetch_add(1, Ordering::Release);
        found
    }

    pub fn ca(&self, id: &str) -> Option<CaRecord> {
        self.cas.get(id).map(|c| c.clone())
    }

    /// Bumped on every CA change, so the TLS verifier knows when to rebuild its trust anchors.
    pub fn ca_version(&self) -> u64 {
        self.ca_version.load(Ordering::Acquire)
    }

    /// DER certificates of every CA the TLS edge trusts: enabled ones, and disabled ones whose
    /// existing devices keep connecting.
    pub fn enabled_ca_certs(&self) -> Vec<Vec<u8>> {
        self.cas
            .iter()
            .filter(|c| c.trusted())
            .map(|c| c.cert_der.clone())
            .collect()
    }

    /// Never admits the certificate with this fingerprint again.
    pub fn revoke_certificate(&self, fingerprint: &str) {
        self.revoked.insert(fingerprint.to_owned());
    }

    /// Whether the certificate with this fingerprint was revoked.
    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        self.revoked.contains(fingerprint)
    }

    /// Quarantines a device (`Some`) or lifts it (`None`). Takes effect on its next connection;
    /// [`crate::BrokerControl::quarantine`] also ends the live one.
    pub fn set_quarantine(&self, id: &DeviceId, mode: Option<QuarantineMode>) {
        match mode {
            Some(m) => {
                self.quarantined.insert(id.clone(), m);
            }
            None => {
                self.quarantined.remove(id);
            }
        }
    }

    pub fn quarantine(&self, id: &DeviceId) -> Option<QuarantineMode> {
        self.quarantined.get(id).map(|m| *m)
    }

    pub fn upsert_cohort(&self, cohort: CohortRecord) {
        self.cohorts.insert(cohort.id.clone(), cohort);
    }

    pub fn cohort(&self, id: &CohortId) -> Option<CohortRecord> {
        self.cohorts.get(id).map(|c| c.clone())
    }

    pub fn upsert_device(&self, device: DeviceRecord) {
        match self.devices.get_mut(&device.id) {
            // Never move an epoch backwards: the cache may already be ahead of the database.
            Some(mut d) => {
                let epoch = d.session_epoch.max(device.session_epoch);
                *d = DeviceRecord {
                    session_epoch: epoch,
                    ..device
                };
            }
            None => {
                self.devices.insert(device.id.clone(), device);
            }
        }
    }

    /// Moves a known device to another cohort (`None`: none). Returns whether it is known.
    pub fn move_device(&self, id: &DeviceId, cohort: Option<CohortId>) -> bool {
        self.devices
            .get_mut(id)
            .map(|mut d| d.cohort_id = cohort)
            .is_some()
    }

    pub fn remove_device(&self, id: &DeviceId) -> Option<DeviceRecord> {
        self.devices.remove(id).map(|(_, d)| d)
    }

    pub fn device(&self, id: &DeviceId) -> Option<DeviceRecord> {
        self.devices.get(id).map(|d| d.clone())
    }

    pub fn knows(&self, id: &DeviceId) -> bool {
        self.devices.contains_key(id)
    }

    /// Makes sure the registry knows device `id` (reading it from the store if not): another
    /// node may have provisioned it a moment ago. Returns whether it is known now.
    pub async fn learn_device(&self, id: &DeviceId) -> bool {
        if self.knows(id) {
            return true;
        }
        match self.store.device_record(id).await {
            Ok(Some(record)) => {
                self.upsert_device(record);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(device_id = %id, error = %e, "cannot read a device another node provisioned");
                false
            }
        }
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Hands out the next session epoch for a device: strictly larger than any before it
    /// (handed out here, loaded, or seen from another node). In a cluster it is also at least
    /// the clock in microseconds, so a node that has not yet heard of a session another node
    /// opened a moment ago still hands out a larger epoch.
    pub fn next_epoch(&self, id: &DeviceId) -> Option<u64> {
        let clock = self.epoch_clock.load(Ordering::Relaxed).then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64)
        });
        self.devices.get_mut(id).map(|mut d| {
            d.session_epoch = (d.session_epoch + 1).max(clock.unwrap_or(0));
            d.session_epoch
        })
    }

    /// Makes epochs follow the clock (see [`Registry::next_epoch`]); set on cluster nodes.
    pub fn use_clock_epochs(&self) {
        self.epoch_clock.store(true, Ordering::Relaxed);
    }

    /// Records that a session with `epoch` exists elsewhere (another node), so the next one
    /// here gets a larger epoch. Returns the device's highest epoch known here.
    pub fn observe_epoch(&self, id: &DeviceId, epoch: u64) -> Option<u64> {
        self.devices.get_mut(id).map(|mut d| {
            d.session_epoch = d.session_epoch.max(epoch);
            d.session_epoch
        })
    }

    /// Finds the CA that issued a verified certificate: a registered CA whose subject is the
    /// certificate's issuer and whose public key verifies the certificate's signature. Names
    /// and key identifiers only narrow the search; they never decide it, because anyone may
    /// register a CA whose subject (or key identifier) copies another organization's.
    ///
    /// Several CAs can pass only if they hold the same key (a CA certificate renewed with its
    /// key, say). Then the device's own CA wins (`prefer`); otherwise they must all belong to
    /// one organization (an enabled one is preferred), or the issuer is ambiguous.
    fn issuer_of(
        &self,
        cert: &x509_parser::certificate::X509Certificate<'_>,
        prefer: Option<&str>,
    ) -> Result<CaRecord, Rejection> {
        let issuer = cert.issuer().as_raw();
        let aki = authority_key_id(cert);
        let mut signers: Vec<CaRecord> = Vec::new();
        for ca in self.cas.iter() {
            if ca.subject_der != issuer {
                continue;
            }
            if let (Some(a), Some(k)) = (&aki, &ca.key_id) {
                if a != k {
                    continue;
                }
            }
            if signed_by(cert, &ca.cert_der) {
                signers.push(ca.clone());
            }
        }
        if let Some(ca) = prefer.and_then(|p| signers.iter().find(|c| c.id == p)) {
            return Ok(ca.clone());
        }
        let Some(first) = signers.first() else {
            return Err(Rejection::UnknownCa);
        };
        if signers.iter().any(|c| c.org_id != first.org_id) {
            return Err(Rejection::AmbiguousIssuer);
        }
        signers.sort_by(|a, b| b.enabled.cmp(&a.enabled).then_with(|| a.id.cmp(&b.id)));
        Ok(signers.swap_remove(0))
    }

    /// The device id a certificate claims (its subject CN), if it is a valid one.
    pub fn device_id_of(&self, leaf_der: &[u8]) -> Result<DeviceId, Rejection> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf_der).map_err(|_| Rejection::BadCertificate)?;
        common_name_id(&cert)
    }

    /// Decides who a verified leaf certificate is, provisioning the device on its first
    /// connection when its CA allows it. The chain, signature and validity period were already
    /// checked by the TLS verifier; this checks what the registry says.
    pub async fn identify(&self, leaf_der: &[u8]) -> Result<DeviceIdentity, Rejection> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf_der).map_err(|_| Rejection::BadCertificate)?;
        let id = common_name_id(&cert)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let validity = cert.validity();
        if validity.not_after.timestamp() < now {
            return Err(Rejection::CertificateExpired);
        }
        if validity.not_before.timestamp() > now {
            return Err(Rejection::CertificateNotYetValid);
        }
        let known = self.device(&id);
        let ca = self.issuer_of(&cert, known.as_ref().and_then(|d| d.ca_id.as_deref()))?;
        if !ca.trusted() {
            return Err(Rejection::DisabledCa);
        }
        let facts = cert_facts(&cert, leaf_der);
        if self.revoked.contains(&facts.fingerprint_sha256) {
            return Err(Rejection::CertificateRevoked);
        }
        if self.quarantine(&id) == Some(QuarantineMode::Refuse) {
            return Err(Rejection::Quarantined);
        }
        if let Some(device) = known {
            let identity = self.known(device, &ca, facts, false)?;
            if identity.device.ca_id.is_none() {
                return self.claim(identity).await;
            }
            return Ok(identity);
        }
        if !ca.enabled {
            // Disabled, keeping only the devices it provisioned before.
            return Err(Rejection::DisabledCa);
        }
        if ca.not_after_ms < now.saturating_mul(1000) {
            // TLS trust anchors carry no validity of their own: the date is checked here.
            return Err(Rejection::CaExpired);
        }
        let jitp = ca.jitp.clone().ok_or(Rejection::NotProvisioned)?;

        // Single flight per device id: the second of two concurrent first connects waits here,
        // then finds the device the first one created.
        let gate = self
            .provisioning
            .entry(id.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _guard = gate.lock().await;
        if let Some(device) = self.device(&id) {
            drop(_guard);
            self.provisioning.remove(&id);
            return self.known(device, &ca, facts, false);
        }
        let new = NewDevice {
            id: id.clone(),
            org_id: ca.org_id.clone(),
            ca_id: ca.id.clone(),
            product_id: jitp.product_id,
            cohort_id: jitp.cohort_id,
            tags: jitp.tags,
            cert: facts.clone(),
        };
        let stored = self.store.provision_device(&new).await;
        let result = match stored {
            Ok(Provisioned { device, created }) => {
                self.upsert_device(device.clone());
                if created {
                    self.metrics.jitp_provisioned();
                }
                self.known(device, &ca, facts, created)
            }
            Err(StoreError::Collision(_)) => Err(Rejection::IdentityCollision),
            Err(StoreError::Backend(e)) => {
                tracing::error!(device_id = %id, error = %e, "just-in-time provisioning failed");
                Err(Rejection::ProvisioningFailed)
            }
        };
        drop(_guard);
        self.provisioning.remove(&id);
        result
    }

    /// The first connection of a device registered before manufacturing: from now on it
    /// belongs to the CA that signed this certificate, and its certificate is on record
    /// (written through before CONNACK, like JITP).
    async fn claim(&self, mut identity: DeviceIdentity) -> Result<DeviceIdentity, Rejection> {
        let id = identity.device.id.clone();
        match self
            .store
            .claim_device(&id, &identity.ca_id, &identity.cert)
            .await
        {
            Ok(()) => {
                if let Some(mut d) = self.devices.get_mut(&id) {
                    d.ca_id.get_or_insert_with(|| identity.ca_id.clone());
                }
                identity.device.ca_id = Some(identity.ca_id.clone());
                Ok(identity)
            }
            Err(e) => {
                tracing::error!(device_id = %id, error = %e, "recording a registered device's first certificate failed");
                Err(Rejection::ProvisioningFailed)
            }
        }
    }

    fn known(
        &self,
        device: DeviceRecord,
        ca: &CaRecord,
        cert: CertFacts,
        provisioned_now: bool,
    ) -> Result<DeviceIdentity, Rejection> {
        match &device.ca_id {
            Some(ca_id) if *ca_id != ca.id => return Err(Rejection::IdentityCollision),
            // Registered before manufacturing: any CA of its own organization.
            None if device.org_id != ca.org_id => return Err(Rejection::IdentityCollision),
            _ => {}
        }
        if device
            .pinned_fingerprint
            .as_ref()
            .is_some_and(|pin| *pin != cert.fingerprint_sha256)
        {
            return Err(Rejection::PinMismatch);
        }
        Ok(DeviceIdentity {
            device,
            ca_id: ca.id.clone(),
            provisioned_now,
            cert,
        })
    }
}

impl crate::acl::Places for Registry {
    fn device_in(&self, id: &DeviceId, sees: &dyn Fn(crate::auth::Place<'_>) -> bool) -> bool {
        self.devices.get(id).is_some_and(|d| {
            sees(crate::auth::Place {
                org_id: &d.org_id,
                product_id: &d.product_id,
                cohort_id: Some(d.cohort_id.as_ref().map_or("", |c| c.as_str())),
            })
        })
    }

    fn cohort_in(&self, id: &CohortId, sees: &dyn Fn(crate::auth::Place<'_>) -> bool) -> bool {
        self.cohorts.get(id).is_some_and(|c| {
            sees(crate::auth::Place {
                org_id: &c.org_id,
                product_id: &c.product_id,
                cohort_id: Some(c.id.as_str()),
            })
        })
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cas", &self.cas.len())
            .field("ca_version", &self.ca_version())
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// The device id a certificate's subject CN names, if it is a valid one. A subject with more
/// than one CN names no one device: which one a reader takes is a matter of convention, and
/// two readers that differ would see two identities in one certificate.
fn common_name_id(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<DeviceId, Rejection> {
    let mut names = cert.subject().iter_common_name();
    let first = names.next().ok_or(Rejection::BadCommonName)?;
    if names.next().is_some() {
        return Err(Rejection::AmbiguousCommonName);
    }
    let cn = first.as_str().map_err(|_| Rejection::BadCommonName)?;
    DeviceId::parse(cn).map_err(|_| Rejection::BadCommonName)
}

/// What the store records of a device certificate (`der`, parsed as `cert`).
fn cert_facts(cert: &x509_parser::certificate::X509Certificate<'_>, der: &[u8]) -> CertFacts {
    let validity = cert.validity();
    CertFacts {
        fingerprint_sha256: fingerprint(der),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before_ms: validity.not_before.timestamp() * 1000,
        not_after_ms: validity.not_after.timestamp() * 1000,
    }
}

/// The authority key identifier of a certificate, when it names one: it narrows the CAs that
/// may have signed it.
fn authority_key_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// What the connect path reads from a device certificate before it asks the registry
/// anything ([`Registry::identify`]).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct LeafFacts {
    pub id: DeviceId,
    pub cert: CertFacts,
    pub authority_key_id: Option<Vec<u8>>,
    /// The certificate's issuer, as raw DER (what a CA's `subject_der` is compared with).
    pub issuer_der: Vec<u8>,
    /// Whether the public key of the certificate given as the CA verifies it.
    pub signed_by_ca: bool,
}

/// Reads a device certificate (DER) as [`Registry::identify`] does, and checks its signature
/// against `ca_der`'s key as the search for its CA does. For the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub fn read_leaf(leaf_der: &[u8], ca_der: &[u8]) -> Result<LeafFacts, Rejection> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|_| Rejection::BadCertificate)?;
    Ok(LeafFacts {
        id: common_name_id(&cert)?,
        cert: cert_facts(&cert, leaf_der),
        authority_key_id: authority_key_id(&cert),
        issuer_der: cert.issuer().as_raw().to_vec(),
        signed_by_ca: signed_by(&cert, ca_der),
    })
}

/// Whether the public key of the CA certificate `ca_der` verifies `cert`'s signature.
fn signed_by(cert: &x509_parser::certificate::X509Certificate<'_>, ca_der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(ca_der)
        .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
}

/// Lower-case hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(common_names: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for cn in common_names {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_leaf_names_one_device_and_the_facts_recorded() {
        let der = self_signed(&["dev-1"]);
        let leaf = read_leaf(&der, &der).unwrap();
        assert_eq!(leaf.id.as_str(), "dev-1");
        assert_eq!(leaf.cert.fingerprint_sha256, fingerprint(&der));
        assert!(leaf.cert.subject.contains("dev-1"));
        assert!(leaf.cert.not_before_ms < leaf.cert.not_after_ms);
        assert!(leaf.signed_by_ca, "self-signed");
        let other = self_signed(&["dev-2"]);
        assert!(!read_leaf(&der, &other).unwrap().signed_by_ca);

        // (rcgen keeps one value per attribute type, so two CNs are not made here.)
        let cases: &[(&[&str], Rejection)] = &[
            (&[], Rejection::BadCommonName),
            (&["dev/1"], Rejection::BadCommonName),
        ];
        for (names, want) in cases {
            let der = self_signed(names);
            assert_eq!(read_leaf(&der, &der).err(), Some(*want), "{names:?}");
        }
        assert_eq!(
            read_leaf(&der[..der.len() - 1], &der).err(),
            Some(Rejection::BadCertificate)
        );
    }
}
