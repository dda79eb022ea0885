//! TLS settings: trusted CA certificates, the device's certificate and key, and the rustls
//! client configuration built from them. The only module that names rustls or x509-parser.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use fleet_wire::DeviceId;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use time::OffsetDateTime;

use crate::error::ConfigError;

/// A device's certificate chain (leaf first) and private key.
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    common_name: Option<String>,
    not_after: OffsetDateTime,
}

impl ClientIdentity {
    /// Parses a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, ConfigError> {
        Self::parse(cert_pem, "client certificate", key_pem, "client key")
    }

    /// Reads and parses the certificate chain and key files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, ConfigError> {
        let cert_pem = read(cert, "client certificate")?;
        let key_pem = read(key, "client key")?;
        Self::parse(
            &cert_pem,
            &format!("client certificate {}", cert.display()),
            &key_pem,
            &format!("client key {}", key.display()),
        )
    }

    fn parse(
        cert_pem: &[u8],
        cert_what: &str,
        key_pem: &[u8],
        key_what: &str,
    ) -> Result<Self, ConfigError> {
        let chain = parse_certs(cert_pem, cert_what)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| ConfigError::Pem {
            what: key_what.to_owned(),
            reason: pem_reason(e, "PRIVATE KEY"),
        })?;
        let (common_name, not_after) = leaf_info(&chain[0], cert_what)?;
        Ok(Self {
            chain,
            key,
            common_name,
            not_after,
        })
    }

    /// When the leaf certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The subject CN of the leaf certificate, if it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The device id the certificate names: its subject CN, validated.
    pub fn device_id(&self) -> Result<DeviceId, ConfigError> {
        let cn = self
            .common_name
            .as_deref()
            .ok_or(ConfigError::NoCommonName)?;
        DeviceId::parse(cn).map_err(|error| ConfigError::BadCommonName {
            cn: cn.to_owned(),
            error,
        })
    }
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            common_name: self.common_name.clone(),
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("common_name", &self.common_name)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// What an `mqtts://` connection trusts and presents.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    roots: Vec<CertificateDer<'static>>,
    identity: Option<ClientIdentity>,
}

impl TlsConfig {
    /// Trusts the CA certificates in `ca_pem` (one or more PEM blocks) to sign the broker's
    /// certificate. No client certificate until [`TlsConfig::with_identity`].
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<Self, ConfigError> {
        Self::from_roots(ca_pem, "CA certificate")
    }

    pub fn from_ca_file(path: &Path) -> Result<Self, ConfigError> {
        let pem = read(path, "CA certificate")?;
        Self::from_roots(&pem, &format!("CA certificate {}", path.display()))
    }

    fn from_roots(pem: &[u8], what: &str) -> Result<Self, ConfigError> {
        let roots = parse_certs(pem, what)?;
        // Fail here, not at the first handshake, if a root is unusable.
        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(|e| ConfigError::Pem {
                what: what.to_owned(),
                reason: format!("not a usable trust anchor: {e}"),
            })?;
        }
        Ok(Self {
            roots,
            identity: None,
        })
    }

    /// Trusts the operating system's CA certificates (for an HTTPS artifact server, say).
    /// Certificates the system store holds but rustls cannot use are skipped.
    pub fn system_roots() -> Result<Self, ConfigError> {
        let found = rustls_native_certs::load_native_certs();
        let mut store = RootCertStore::empty();
        let mut roots = Vec::new();
        for cert in found.certs {
            if store.add(cert.clone()).is_ok() {
                roots.push(cert);
            }
        }
        if roots.is_empty() {
            let why = found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "the system has no CA certificates".into());
            return Err(ConfigError::Tls(format!(
                "no system CA certificates: {why}"
            )));
        }
        Ok(Self {
            roots,
            identity: None,
        })
    }

    /// Presents `identity` for mutual TLS.
    pub fn with_identity(mut self, identity: ClientIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    pub fn identity(&self) -> Option<&ClientIdentity> {
        self.identity.as_ref()
    }

    /// The rustls configuration, with the `ring` provider.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, ConfigError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| ConfigError::Tls(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Tls(e.to_string()))?
            .with_root_certificates(store);
        let config = match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| {
                    ConfigError::Tls(format!("client certificate and key do not fit: {e}"))
                })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// Trust anchors and crypto provider built once and shared by the client configurations of
/// many simulated devices, each with its own certificate.
pub(crate) struct SharedTls {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

/// TLS sessions a simulated device remembers for resumption. rustls' default (256) would
/// preallocate a cache per configuration, too much memory times ten thousand devices.
const SIM_SESSION_CACHE: usize = 2;

impl SharedTls {
    pub(crate) fn new(tls: &TlsConfig) -> Result<Self, ConfigError> {
        let mut store = RootCertStore::empty();
        for root in &tls.roots {
            store
                .add(root.clone())
                .map_err(|e| ConfigError::Tls(e.to_string()))?;
        }
        Ok(Self {
            roots: Arc::new(store),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// A client configuration presenting `identity` (none: no client certificate).
    pub(crate) fn client_config(
        &self,
        identity: Option<ClientIdentity>,
    ) -> Result<Arc<ClientConfig>, ConfigError> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Tls(e.to_string()))?
            .with_root_certificates(self.roots.clone());
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain, id.key)
                .map_err(|e| {
                    ConfigError::Tls(format!("client certificate and key do not fit: {e}"))
                })?,
            None => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::in_memory_sessions(SIM_SESSION_CACHE);
        Ok(Arc::new(config))
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|error| ConfigError::ReadFile {
        what,
        path: path.to_owned(),
        error,
    })
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::Pem {
            what: what.to_owned(),
            reason: pem_reason(e, "CERTIFICATE"),
        })?;
    if certs.is_empty() {
        return Err(ConfigError::Pem {
            what: what.to_owned(),
            reason: "no PEM CERTIFICATE block found".into(),
        });
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| ConfigError::Pem {
            what: what.to_owned(),
            reason: format!("not a valid X.509 certificate: {e}"),
        })?;
    }
    Ok(certs)
}

fn pem_reason(e: rustls::pki_types::pem::Error, label: &str) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!("no PEM {label} block found"),
        other => format!("malformed PEM: {other}"),
    }
}

fn leaf_info(
    leaf: &CertificateDer<'_>,
    what: &str,
) -> Result<(Option<String>, OffsetDateTime), ConfigError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| ConfigError::Pem {
        what: what.to_owned(),
        reason: format!("not a valid X.509 certificate: {e}"),
    })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok((cn, cert.validity().not_after.to_datetime()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CaOptions, CertifiedKeyPem, DeviceCertOptions};

    fn device(id: &str) -> (CertifiedKeyPem, CertifiedKeyPem) {
        let ca = Ca::generate(&CaOptions::default()).unwrap();
        let dev = ca
            .issue_device(&DeviceCertOptions::new(DeviceId::parse(id).unwrap()))
            .unwrap();
        (ca.to_pem(), dev)
    }

    #[test]
    fn identity_from_pem_gives_device_id_and_config() {
        let (ca, dev) = device("dev-7");
        let id = ClientIdentity::from_pem(dev.cert_pem.as_bytes(), dev.key_pem.as_bytes()).unwrap();
        assert_eq!(id.device_id().unwrap().as_str(), "dev-7");
        let tls = TlsConfig::from_ca_pem(ca.cert_pem.as_bytes())
            .unwrap()
            .with_identity(id);
        let config = tls.client_config().unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn mismatched_key_is_refused() {
        let (ca, dev) = device("dev-a");
        let (_, other) = device("dev-b");
        let id =
            ClientIdentity::from_pem(dev.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap();
        let err = TlsConfig::from_ca_pem(ca.cert_pem.as_bytes())
            .unwrap()
            .with_identity(id)
            .client_config()
            .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn bad_pem_inputs() {
        let (_, dev) = device("dev-c");
        let cases: &[(&[u8], &[u8], &str)] = &[
            (b"", dev.key_pem.as_bytes(), "no PEM CERTIFICATE block"),
            (
                b"garbage",
                dev.key_pem.as_bytes(),
                "no PEM CERTIFICATE block",
            ),
            (dev.cert_pem.as_bytes(), b"", "no PEM PRIVATE KEY block"),
            (
                dev.key_pem.as_bytes(),
                dev.key_pem.as_bytes(),
                "no PEM CERTIFICATE block",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                dev.key_pem.as_bytes(),
                "not a valid X.509 certificate",
            ),
        ];
        for (cert, key, want) in cases {
            let err = ClientIdentity::from_pem(cert, key).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = TlsConfig::from_ca_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("CA certificate /nonexistent/ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn cn_must_be_a_device_id() {
        let cases = [("dev-1", true), ("bad/id", false)];
        for (cn, ok) in cases {
            let id = ClientIdentity {
                chain: Vec::new(),
                key: PrivateKeyDer::from_pem_slice(device("x").1.key_pem.as_bytes()).unwrap(),
                common_name: Some(cn.to_owned()),
                not_after: OffsetDateTime::now_utc(),
            };
            assert_eq!(id.device_id().is_ok(), ok, "{cn}");
        }
    }
}
