//! A small manufacturing PKI: a CA that signs device certificates (CN = device id, clientAuth)
//! and, for test brokers, server certificates. The only module that names rcgen.
//!
//! Keys are P-256 by default, or RSA-2048 ([`KeyAlgorithm`]) for CAs and devices alike. rcgen's
//! `ring` backend cannot generate RSA keys, so they are generated with the RustCrypto `rsa`
//! crate, encoded as PKCS#8 and handed to rcgen, whose ring backend signs with them
//! (PKCS#1 v1.5, SHA-256). RSA generation is much slower than P-256: tens to hundreds of
//! milliseconds per key in a release build, against microseconds. A CA made with another tool
//! (PKCS#8 PEM, any of the key types ring signs with) loads with [`Ca::from_pem`].

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fleet_wire::DeviceId;
use rand::RngCore;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Backdating of `notBefore`, for devices whose clocks run a little behind.
const CLOCK_SKEW: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("RSA key generation failed: {0}")]
    RsaKeyGeneration(String),
    #[error("validity must be between 1 and 36500 days, got {0}")]
    InvalidValidity(u32),
    #[error("cannot read {what} {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("the CA certificate is not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotACa,
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate expired on {0}")]
    CaExpired(OffsetDateTime),
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

fn gen_err(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// Key algorithm of a generated key (CA or device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// ECDSA P-256, signing with SHA-256.
    #[default]
    EcdsaP256,
    /// RSA-2048, signing with PKCS#1 v1.5 and SHA-256. Slow to generate; see the module docs.
    Rsa2048,
}

impl KeyAlgorithm {
    /// `p256` or `rsa2048`, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "p256",
            KeyAlgorithm::Rsa2048 => "rsa2048",
        }
    }

    /// A fresh private key of this algorithm.
    fn generate(self) -> Result<KeyPair, PkiError> {
        match self {
            KeyAlgorithm::EcdsaP256 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)
            }
            KeyAlgorithm::Rsa2048 => {
                use rsa::pkcs8::EncodePrivateKey;
                let rsa_err = |e: &dyn std::fmt::Display| PkiError::RsaKeyGeneration(e.to_string());
                let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)
                    .map_err(|e| rsa_err(&e))?;
                let der = key.to_pkcs8_der().map_err(|e| rsa_err(&e))?;
                let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_bytes());
                KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
                    .map_err(gen_err)
            }
        }
    }
}

/// Reads an unencrypted private key in any of the common PEM forms: PKCS#8 (`BEGIN PRIVATE
/// KEY`), SEC1 (`BEGIN EC PRIVATE KEY`, P-256 or P-384, as `openssl ecparam -genkey` writes
/// it) or PKCS#1 (`BEGIN RSA PRIVATE KEY`). The last two are converted to PKCS#8, the form ring
/// signs with.
fn key_from_pem(pem: &str) -> Result<KeyPair, String> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    const FORMS: &str = "expected an unencrypted PEM private key: PKCS#8 (BEGIN PRIVATE KEY), \
                         SEC1 (BEGIN EC PRIVATE KEY) or PKCS#1 (BEGIN RSA PRIVATE KEY)";
    let key = rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("{e}; {FORMS}"))?
        .ok_or_else(|| format!("no private key found; {FORMS}"))?;
    let pkcs8 = |der: Vec<u8>, alg: &'static rcgen::SignatureAlgorithm| {
        KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), alg)
            .map_err(|e| e.to_string())
    };
    match key {
        PrivateKeyDer::Pkcs8(der) => KeyPair::try_from(der.secret_pkcs8_der())
            .or_else(|_| pkcs8(der.secret_pkcs8_der().to_vec(), &rcgen::PKCS_RSA_SHA256))
            .map_err(|e| format!("{e}; {FORMS}")),
        PrivateKeyDer::Sec1(der) => {
            use p256::pkcs8::EncodePrivateKey;
            let sec1 = der.secret_sec1_der();
            if let Ok(k) = p256::SecretKey::from_sec1_der(sec1) {
                let der = k.to_pkcs8_der().map_err(|e| e.to_string())?;
                return pkcs8(der.as_bytes().to_vec(), &rcgen::PKCS_ECDSA_P256_SHA256);
            }
            if let Ok(k) = p384::SecretKey::from_sec1_der(sec1) {
                let der = k.to_pkcs8_der().map_err(|e| e.to_string())?;
                return pkcs8(der.as_bytes().to_vec(), &rcgen::PKCS_ECDSA_P384_SHA384);
            }
            Err("an EC key on a curve other than P-256 or P-384".into())
        }
        PrivateKeyDer::Pkcs1(der) => {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::from_pkcs1_der(der.secret_pkcs1_der())
                .map_err(|e| format!("not a valid PKCS#1 RSA key: {e}"))?;
            let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
            pkcs8(der.as_bytes().to_vec(), &rcgen::PKCS_RSA_SHA256)
        }
        _ => Err(FORMS.into()),
    }
}

/// Settings of a new manufacturing CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub common_name: String,
    pub organization: Option<String>,
    /// Default 3650.
    pub validity_days: u32,
    pub algorithm: KeyAlgorithm,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            common_name: "Acme Manufacturing CA".into(),
            organization: None,
            validity_days: 3650,
            algorithm: KeyAlgorithm::EcdsaP256,
        }
    }
}

/// Settings of a device certificate.
#[derive(Debug, Clone)]
pub struct DeviceCertOptions {
    pub device_id: DeviceId,
    /// Default 365. Capped at the CA's own expiry.
    pub validity_days: u32,
    /// The device's key. Default P-256.
    pub algorithm: KeyAlgorithm,
}

impl DeviceCertOptions {
    pub fn new(device_id: DeviceId) -> Self {
        Self {
            device_id,
            validity_days: 365,
            algorithm: KeyAlgorithm::EcdsaP256,
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKeyPem")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertifiedKeyPem {
    /// Writes the certificate and the key (mode 0600 on Unix). Refuses to replace existing
    /// files unless `overwrite`.
    pub fn write(
        &self,
        cert_path: &Path,
        key_path: &Path,
        overwrite: bool,
    ) -> Result<(), PkiError> {
        write_file(key_path, self.key_pem.as_bytes(), overwrite, true)?;
        write_file(cert_path, self.cert_pem.as_bytes(), overwrite, false)
    }
}

fn write_file(path: &Path, data: &[u8], overwrite: bool, secret: bool) -> Result<(), PkiError> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let err = |error| PkiError::Write {
        path: path.to_owned(),
        error,
    };
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            err(io::Error::new(
                e.kind(),
                "file exists; refusing to overwrite it",
            ))
        } else {
            err(e)
        }
    })?;
    file.write_all(data).map_err(err)?;
    file.sync_all().map_err(err)
}

/// A CA able to sign certificates: its certificate and its private key.
pub struct Ca {
    issuer: Certificate,
    key: KeyPair,
    cert_pem: String,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Creates a self-signed CA (path length 0: it signs end-entity certificates only).
    pub fn generate(opts: &CaOptions) -> Result<Ca, PkiError> {
        let (not_before, not_after) = validity(opts.validity_days)?;
        let key = opts.algorithm.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, opts.common_name.as_str());
        if let Some(org) = &opts.organization {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = params.self_signed(&key).map_err(gen_err)?;
        let cert_pem = issuer.pem();
        Ok(Ca {
            issuer,
            key,
            cert_pem,
            not_after,
        })
    }

    /// Loads a CA from its PEM certificate and PEM PKCS#8 private key (P-256, P-384, Ed25519
    /// or RSA), checking that the key belongs to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        Self::parse(cert_pem, "CA certificate", key_pem, "CA key")
    }

    pub fn from_files(cert: &Path, key: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read(cert, "CA certificate")?;
        let key_pem = read(key, "CA key")?;
        Self::parse(
            &cert_pem,
            &format!("CA certificate {}", cert.display()),
            &key_pem,
            &format!("CA key {}", key.display()),
        )
    }

    fn parse(
        cert_pem: &str,
        cert_what: &str,
        key_pem: &str,
        key_what: &str,
    ) -> Result<Ca, PkiError> {
        let pem_err = |what: &str, reason: String| PkiError::Pem {
            what: what.to_owned(),
            reason,
        };
        let key = key_from_pem(key_pem).map_err(|e| pem_err(key_what, e))?;
        let (_, block) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| pem_err(cert_what, format!("no PEM CERTIFICATE block found: {e}")))?;
        let cert = block
            .parse_x509()
            .map_err(|e| pem_err(cert_what, format!("not a valid X.509 certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(PkiError::NotACa);
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let not_after = cert.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(PkiError::CaExpired(not_after));
        }
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| pem_err(cert_what, e.to_string()))?;
        // rcgen signs with an issuer `Certificate`; re-signing the parsed parameters yields one
        // with the CA's subject name and key identifier. Only the original PEM is handed out.
        let issuer = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca {
            issuer,
            key,
            cert_pem: cert_pem.to_owned(),
            not_after,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: names what this CA signed, e.g. in
    /// the simulator's certificate cache.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let der = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .map(|(_, block)| block.contents)
            .unwrap_or_else(|_| self.issuer.der().to_vec());
        hex::encode(sha2::Sha256::digest(der))
    }

    /// The CA certificate and key as PEM, e.g. to [`CertifiedKeyPem::write`] them.
    pub fn to_pem(&self) -> CertifiedKeyPem {
        CertifiedKeyPem {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key.serialize_pem(),
        }
    }

    /// Issues a device certificate: subject CN = device id, EKU clientAuth, random serial,
    /// a fresh key of [`DeviceCertOptions::algorithm`].
    pub fn issue_device(&self, opts: &DeviceCertOptions) -> Result<CertifiedKeyPem, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, opts.device_id.as_str());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, opts.validity_days, opts.algorithm)
    }

    /// Issues a broker certificate for `names` (DNS names or IP addresses, which become SANs),
    /// EKU serverAuth. The first name is also the subject CN.
    pub fn issue_server(
        &self,
        names: &[String],
        validity_days: u32,
    ) -> Result<CertifiedKeyPem, PkiError> {
        let first = names.first().ok_or_else(|| {
            PkiError::Generate("a server certificate needs at least one name".into())
        })?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.as_str());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, validity_days, KeyAlgorithm::EcdsaP256)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        days: u32,
        algorithm: KeyAlgorithm,
    ) -> Result<CertifiedKeyPem, PkiError> {
        let (not_before, mut not_after) = validity(days)?;
        if not_after > self.not_after {
            tracing::warn!(ca_not_after = %self.not_after, "certificate validity capped at the CA's expiry");
            not_after = self.not_after;
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = algorithm.generate()?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(gen_err)?;
        Ok(CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn read(path: &Path, what: &'static str) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|error| PkiError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if !(1..=36_500).contains(&days) {
        return Err(PkiError::InvalidValidity(days));
    }
    let now = OffsetDateTime::now_utc();
    Ok((now - CLOCK_SKEW, now + Duration::days(i64::from(days))))
}

/// 16 random bytes, positive and without a leading zero byte (RFC 5280 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_keys_are_generated_as_pkcs8_rsa_2048() {
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = KeyAlgorithm::Rsa2048.generate().unwrap();
        assert!(key.is_compatible(&rcgen::PKCS_RSA_SHA256));
        let pem = key.serialize_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let parsed = rsa::RsaPrivateKey::from_pkcs8_der(&key.serialize_der()).unwrap();
        assert_eq!(parsed.size(), 256, "2048 bits");
        // Loads back as the simulator's cache and `Ca::from_pem` load it.
        let again = KeyPair::from_pem(&pem).unwrap();
        assert_eq!(again.public_key_raw(), key.public_key_raw());
        assert!(KeyAlgorithm::EcdsaP256
            .generate()
            .unwrap()
            .is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
    }

    #[test]
    fn validity_bounds() {
        for (days, ok) in [
            (0, false),
            (1, true),
            (365, true),
            (36_500, true),
            (36_501, false),
        ] {
            assert_eq!(validity(days).is_ok(), ok, "{days}");
        }
    }

    #[test]
    fn serials_are_random_and_positive() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
    }

    #[test]
    fn loaded_ca_checks_key_and_kind() {
        let ca = Ca::generate(&CaOptions::default()).unwrap();
        let other = Ca::generate(&CaOptions::default()).unwrap();
        let pem = ca.to_pem();
        assert!(Ca::from_pem(&pem.cert_pem, &pem.key_pem).is_ok());
        assert!(matches!(
            Ca::from_pem(&pem.cert_pem, &other.to_pem().key_pem),
            Err(PkiError::KeyMismatch)
        ));
        let dev = ca
            .issue_device(&DeviceCertOptions::new(DeviceId::parse("d1").unwrap()))
            .unwrap();
        assert!(matches!(
            Ca::from_pem(&dev.cert_pem, &dev.key_pem),
            Err(PkiError::NotACa)
        ));
        let err = Ca::from_pem("nope", &pem.key_pem).err().unwrap();
        assert!(
            err.to_string().starts_with("CA certificate: no PEM"),
            "{err}"
        );
        let err = Ca::from_pem(&pem.cert_pem, "nope").err().unwrap();
        assert!(err.to_string().starts_with("CA key: "), "{err}");
    }

    #[test]
    fn fingerprint_is_the_sha256_of_the_der() {
        let ca = Ca::generate(&CaOptions::default()).unwrap();
        let fp = ca.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(fp
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let pem = ca.to_pem();
        let loaded = Ca::from_pem(&pem.cert_pem, &pem.key_pem).unwrap();
        assert_eq!(loaded.fingerprint(), fp, "stable across loading");
        let other = Ca::generate(&CaOptions::default()).unwrap();
        assert_ne!(other.fingerprint(), fp);
    }

    #[test]
    fn write_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!("dc-pki-{}-{}", std::process::id(), line!()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("c.key"));
        let pem = Ca::generate(&CaOptions::default()).unwrap().to_pem();
        pem.write(&cert, &key, false).unwrap();
        let err = pem.write(&cert, &key, false).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        pem.write(&cert, &key, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
