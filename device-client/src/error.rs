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

/// A CONNACK reason code other than success (MQTT 5, section 3.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnackRefusal {
    UnsupportedProtocolVersion,
    /// The client id is not acceptable: for the fleet broker, it differs from the
    /// certificate's CN.
    IdentifierRejected,
    BadUsernameOrPassword,
    NotAuthorized,
    ServerUnavailable,
    ServerBusy,
    Banned,
    QuotaExceeded,
    ConnectionRateExceeded,
    /// Any other reason code.
    Other(u8),
}

impl ConnackRefusal {
    /// The reason code on the wire.
    pub fn code(self) -> u8 {
        match self {
            ConnackRefusal::UnsupportedProtocolVersion => 0x84,
            ConnackRefusal::IdentifierRejected => 0x85,
            ConnackRefusal::BadUsernameOrPassword => 0x86,
            ConnackRefusal::NotAuthorized => 0x87,
            ConnackRefusal::ServerUnavailable => 0x88,
            ConnackRefusal::ServerBusy => 0x89,
            ConnackRefusal::Banned => 0x8A,
            ConnackRefusal::QuotaExceeded => 0x97,
            ConnackRefusal::ConnectionRateExceeded => 0x9F,
            ConnackRefusal::Other(code) => code,
        }
    }

    /// Short words for the reason, without the code.
    pub fn text(self) -> &'static str {
        match self {
            ConnackRefusal::UnsupportedProtocolVersion => "unsupported protocol version",
            ConnackRefusal::IdentifierRejected => "client identifier rejected",
            ConnackRefusal::BadUsernameOrPassword => "bad user name or password",
            ConnackRefusal::NotAuthorized => "not authorized",
            ConnackRefusal::ServerUnavailable => "server unavailable",
            ConnackRefusal::ServerBusy => "server busy",
            ConnackRefusal::Banned => "banned",
            ConnackRefusal::QuotaExceeded => "quota exceeded",
            ConnackRefusal::ConnectionRateExceeded => "connection rate exceeded",
            ConnackRefusal::Other(_) => "refused",
        }
    }
}

impl fmt::Display for ConnackRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (CONNACK reason 0x{:02X})", self.text(), self.code())
    }
}

/// Why the broker ended an established session, as its MQTT 5 DISCONNECT said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectCause {
    /// Reason 0x8E: another connection with this device's client id (in the fleet, its
    /// certificate) connected, and the broker ended this one in its favour.
    SessionTakenOver,
    /// Reason 0x98: an operator's action, e.g. the device's certificate was revoked or the
    /// device moved to another cohort.
    AdministrativeAction,
    /// Reason 0x8B: the broker is stopping or restarting.
    ServerShuttingDown,
    /// Reason 0x8D: the broker heard nothing for 1.5 keepalive periods.
    KeepAliveTimeout,
    /// Reason 0x87.
    NotAuthorized,
    /// Any other reason code.
    Other(u8),
    /// The broker closed the connection and no reason could be read: it sent none, or one
    /// this client could not parse (rumqttc 0.25 cannot read a DISCONNECT with a reason code
    /// and no property length, which is what Mosquitto and the fleet broker send).
    Unknown,
}

impl DisconnectCause {
    /// The reason code on the wire (0x80, unspecified, for [`DisconnectCause::Unknown`]).
    pub fn code(self) -> u8 {
        match self {
            DisconnectCause::SessionTakenOver => 0x8E,
            DisconnectCause::AdministrativeAction => 0x98,
            DisconnectCause::ServerShuttingDown => 0x8B,
            DisconnectCause::KeepAliveTimeout => 0x8D,
            DisconnectCause::NotAuthorized => 0x87,
            DisconnectCause::Other(code) => code,
            DisconnectCause::Unknown => 0x80,
        }
    }
}

impl fmt::Display for DisconnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            DisconnectCause::Unknown => return f.write_str("connection closed by the broker"),
            DisconnectCause::SessionTakenOver => {
                "another connection using this device's identity took the session over; \
                 is a second agent running?"
            }
            DisconnectCause::AdministrativeAction => {
                "the broker ended the session by an administrative action (certificate \
                 revoked, device moved or quarantined)"
            }
            DisconnectCause::ServerShuttingDown => "the broker is shutting down",
            DisconnectCause::KeepAliveTimeout => "the broker heard nothing within the keepalive",
            DisconnectCause::NotAuthorized => "the broker ended the session: not authorized",
            DisconnectCause::Other(_) => "the broker ended the session",
        };
        write!(f, "{text} (DISCONNECT reason 0x{:02X})", self.code())
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
    /// The broker ended the session and said why.
    #[error("{0}")]
    Disconnected(DisconnectCause),
}

impl ConnectError {
    /// Another connection with this device's identity took the session over.
    pub fn is_takeover(&self) -> bool {
        *self == ConnectError::Disconnected(DisconnectCause::SessionTakenOver)
    }
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
    /// The broker answered the publish with a negative acknowledgement.
    #[error("the broker refused the publish: {0}")]
    PublishRefused(String),
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
