//! Errors, split by stage: settings and files ([`ConfigError`], nothing was sent), the
//! connection ([`ConnectError`]), and the operations built on both ([`Error`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

use fleet_wire::payload::PayloadError;
use fleet_wire::IdError;

/// Invalid settings, an unreadable file or malformed PEM. Nothing was sent on the network.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid broker URL: {0}")]
    InvalidUrl(String),
    #[error("cannot read {what} {}: {error}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// `what` names the input, with its path when it came from a file.
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("the client certificate has no subject CN to use as the device id")]
    NoCommonName,
    #[error("client certificate CN {cn:?} is not a valid device id: {error}")]
    BadCommonName { cn: String, error: IdError },
    #[error("no client id: give a client certificate (its CN is the device id) or a client id")]
    NoClientId,
    #[error("mqtts:// needs TLS settings: at least the CA certificate that signed the broker's certificate")]
    TlsRequired,
    #[error("TLS settings were given for a plain mqtt:// URL; use mqtts://")]
    TlsWithPlainUrl,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{0}")]
    Invalid(String),
}

/// A CONNACK return code other than 0 (MQTT 3.1.1, section 3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnackRefusal {
    UnacceptableProtocolVersion,
    IdentifierRejected,
    ServerUnavailable,
    BadUsernameOrPassword,
    NotAuthorized,
}

impl ConnackRefusal {
    /// The return code on the wire.
    pub fn code(self) -> u8 {
        match self {
            ConnackRefusal::UnacceptableProtocolVersion => 1,
            ConnackRefusal::IdentifierRejected => 2,
            ConnackRefusal::ServerUnavailable => 3,
            ConnackRefusal::BadUsernameOrPassword => 4,
            ConnackRefusal::NotAuthorized => 5,
        }
    }
}

impl fmt::Display for ConnackRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ConnackRefusal::UnacceptableProtocolVersion => "unacceptable protocol version",
            ConnackRefusal::IdentifierRejected => "client identifier rejected",
            ConnackRefusal::ServerUnavailable => "server unavailable",
            ConnackRefusal::BadUsernameOrPassword => "bad user name or password",
            ConnackRefusal::NotAuthorized => "not authorized",
        };
        write!(f, "{text} (CONNACK return code {})", self.code())
    }
}

/// Why a connection could not be established or was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("broker refused the connection: {0}")]
    Refused(ConnackRefusal),
    /// Handshake failures (untrusted server, client certificate refused) and TLS alerts.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("network: {0}")]
    Network(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("MQTT protocol: {0}")]
    Protocol(String),
}

/// Errors of the operations: one-shot publish, agent start and shutdown.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("invalid payload: {0}")]
    InvalidPayload(#[from] PayloadError),
    /// The session was up but ended before the broker acknowledged the publish.
    #[error("the publish was not acknowledged: {0}")]
    NotAcknowledged(ConnectError),
    #[error(
        "the agent was not connected and subscribed within {timeout:?}{}",
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    NotReady {
        timeout: std::time::Duration,
        last_error: Option<ConnectError>,
    },
    #[error("the agent has stopped")]
    Stopped,
    #[error("the agent task failed: {0}")]
    AgentFailed(String),
}
