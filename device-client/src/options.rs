//! How to reach and log in to the broker.

use std::fmt;
use std::time::Duration;

use fleet_wire::DeviceId;

use crate::error::ConfigError;
use crate::tls::TlsConfig;
use crate::url::BrokerUrl;

/// MQTT user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Everything needed to open an MQTT 5 session.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub url: BrokerUrl,
    /// Overrides the device id taken from the client certificate's CN. Required without one.
    pub client_id: Option<DeviceId>,
    /// Required for `mqtts://`, refused for `mqtt://`.
    pub tls: Option<TlsConfig>,
    pub credentials: Option<Credentials>,
    /// Default 30 s. Zero disables keepalive; otherwise at least 1 s and at most 65535 s.
    pub keep_alive: Duration,
    /// TCP connect, TLS handshake and CONNACK together. Default 10 s, whole seconds.
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(url: BrokerUrl) -> Self {
        Self {
            url,
            client_id: None,
            tls: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }

    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn with_client_id(mut self, id: DeviceId) -> Self {
        self.client_id = Some(id);
        self
    }

    pub fn with_credentials(mut self, username: &str, password: &str) -> Self {
        self.credentials = Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        });
        self
    }

    /// The MQTT client id, which is the device id: the explicit client id, else the CN of the
    /// client certificate. An explicit id that differs from the CN is allowed (a broker that
    /// ties identity to the certificate will refuse it) and logged.
    pub fn device_id(&self) -> Result<DeviceId, ConfigError> {
        let identity = self.tls.as_ref().and_then(TlsConfig::identity);
        match (&self.client_id, identity) {
            (Some(id), Some(identity)) => {
                if identity.common_name() != Some(id.as_str()) {
                    tracing::warn!(
                        client_id = %id,
                        certificate_cn = identity.common_name().unwrap_or(""),
                        "client id differs from the certificate CN"
                    );
                }
                Ok(id.clone())
            }
            (Some(id), None) => Ok(id.clone()),
            (None, Some(identity)) => identity.device_id(),
            (None, None) => Err(ConfigError::NoClientId),
        }
    }

    /// Checks the combination of settings; called before any connection attempt.
    pub fn validate(&self) -> Result<DeviceId, ConfigError> {
        match (self.url.is_tls(), self.tls.is_some()) {
            (true, false) => return Err(ConfigError::TlsRequired),
            (false, true) => return Err(ConfigError::TlsWithPlainUrl),
            _ => {}
        }
        let ka = self.keep_alive;
        if !ka.is_zero() && (ka < Duration::from_secs(1) || ka.as_secs() > u64::from(u16::MAX)) {
            return Err(ConfigError::Invalid(format!(
                "keep alive must be 0 or between 1 s and 65535 s, got {ka:?}"
            )));
        }
        if self.connect_timeout < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(format!(
                "connect timeout must be at least 1 s, got {:?}",
                self.connect_timeout
            )));
        }
        self.device_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CaOptions, DeviceCertOptions};
    use crate::tls::ClientIdentity;

    fn tls_for(cn: &str) -> TlsConfig {
        let ca = Ca::generate(&CaOptions::default()).unwrap();
        let dev = ca
            .issue_device(&DeviceCertOptions::new(DeviceId::parse(cn).unwrap()))
            .unwrap();
        TlsConfig::from_ca_pem(ca.cert_pem().as_bytes())
            .unwrap()
            .with_identity(
                ClientIdentity::from_pem(dev.cert_pem.as_bytes(), dev.key_pem.as_bytes()).unwrap(),
            )
    }

    #[test]
    fn client_id_resolution() {
        let tls_url: BrokerUrl = "mqtts://localhost".parse().unwrap();
        let plain_url: BrokerUrl = "mqtt://localhost".parse().unwrap();
        let id = |s| DeviceId::parse(s).unwrap();
        let cases: Vec<(ConnectOptions, Result<&str, &str>)> = vec![
            (
                ConnectOptions::new(tls_url.clone()).with_tls(tls_for("cert-cn")),
                Ok("cert-cn"),
            ),
            (
                ConnectOptions::new(tls_url.clone())
                    .with_tls(tls_for("cert-cn"))
                    .with_client_id(id("explicit")),
                Ok("explicit"),
            ),
            (
                ConnectOptions::new(plain_url.clone()).with_client_id(id("plain")),
                Ok("plain"),
            ),
            (ConnectOptions::new(plain_url.clone()), Err("no client id")),
            (
                ConnectOptions::new(tls_url.clone()).with_client_id(id("x")),
                Err("mqtts:// needs TLS"),
            ),
            (
                ConnectOptions::new(plain_url.clone())
                    .with_tls(tls_for("cert-cn"))
                    .with_client_id(id("x")),
                Err("plain mqtt://"),
            ),
            (
                ConnectOptions {
                    keep_alive: Duration::from_millis(500),
                    ..ConnectOptions::new(plain_url.clone()).with_client_id(id("x"))
                },
                Err("keep alive"),
            ),
            (
                ConnectOptions {
                    keep_alive: Duration::ZERO,
                    ..ConnectOptions::new(plain_url).with_client_id(id("x"))
                },
                Ok("x"),
            ),
        ];
        for (opts, want) in cases {
            match (opts.validate(), want) {
                (Ok(got), Ok(want)) => assert_eq!(got.as_str(), want),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e} vs {want}"),
                (got, want) => panic!("{got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn password_is_not_debug_printed() {
        let o = ConnectOptions::new("mqtt://h".parse().unwrap()).with_credentials("u", "s3cret");
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}
