//! The TLS edge: rustls server configs for the device and service listeners, and a
//! client-certificate verifier over a CA set that operators change at run time.
//!
//! The verifier delegates to rustls' own `WebPkiClientVerifier` (chain, signature, validity,
//! client-auth usage), rebuilt whenever the registry's CA version moves, so a CA registered over
//! REST is trusted from the next handshake and a disabled one from the next handshake is not.
//! TLS session resumption is off: every handshake verifies the certificate against the CA set
//! as it is now, so a resumed session can never outlive a disabled CA.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::metrics::Rejection;
use crate::registry::Registry;

/// The server's own certificate chain and key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The one crypto provider of the platform.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server config for the device listener: a client certificate is mandatory.
pub fn device_server_config(
    identity: ServerIdentity,
    registry: Arc<Registry>,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(DynamicClientVerifier::new(registry, provider.clone()));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain, identity.key)?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Server config for the service listener when it runs TLS: no client certificate; services
/// authenticate with an API key in CONNECT.
pub fn service_server_config(identity: ServerIdentity) -> Result<Arc<ServerConfig>, Error> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain, identity.key)?;
    Ok(Arc::new(config))
}

/// Maps a failed handshake to the rejection it counts as.
pub fn classify_handshake_error(err: &std::io::Error) -> Rejection {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return Rejection::TlsHandshake;
    };
    match tls {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => Rejection::UnknownCa,
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            Rejection::CertificateExpired
        }
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            Rejection::CertificateNotYetValid
        }
        Error::InvalidCertificate(_) | Error::NoCertificatesPresented => Rejection::BadCertificate,
        _ => Rejection::TlsHandshake,
    }
}

struct Snapshot {
    version: u64,
    inner: Option<Arc<dyn ClientCertVerifier>>,
}

#[derive(Debug)]
struct DynamicClientVerifier {
    registry: Arc<Registry>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Snapshot>,
    rebuild: parking_lot::Mutex<()>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("has_anchors", &self.inner.is_some())
            .finish()
    }
}

impl DynamicClientVerifier {
    fn new(registry: Arc<Registry>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            registry,
            provider,
            current: ArcSwap::from_pointee(Snapshot {
                version: u64::MAX,
                inner: None,
            }),
            rebuild: parking_lot::Mutex::new(()),
        }
    }

    fn verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        let version = self.registry.ca_version();
        let snap = self.current.load();
        if snap.version == version {
            return snap.inner.clone();
        }
        let _guard = self.rebuild.lock();
        let snap = self.current.load();
        if snap.version == version {
            return snap.inner.clone();
        }
        let mut roots = RootCertStore::empty();
        for der in self.registry.enabled_ca_certs() {
            if let Err(e) = roots.add(CertificateDer::from(der)) {
                tracing::warn!(error = %e, "a registered CA cannot be used as a trust anchor");
            }
        }
        let inner: Option<Arc<dyn ClientCertVerifier>> = if roots.is_empty() {
            None
        } else {
            match WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the client certificate verifier");
                    None
                }
            }
        };
        self.current.store(Arc::new(Snapshot {
            version,
            inner: inner.clone(),
        }));
        inner
    }
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a fleet may trust many CAs, and devices present the one certificate they have.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        match self.verifier() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
