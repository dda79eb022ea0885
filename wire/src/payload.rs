//! JSON payloads of the wire contract. Field names here are the contract; see `topics.md`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::DeviceId;

/// `devices/{id}/presence`: published by the broker, never by a device.
///
/// `epoch` grows with every session of a device and survives broker restarts. A consumer keeps
/// the highest `(epoch, event)` it has applied and ignores anything older, so a disconnect that
/// arrives late from a replaced session never marks a live device offline. Within one epoch
/// `disconnected` orders after `connected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub device_id: DeviceId,
    pub event: PresenceEvent,
    pub epoch: u64,
    /// When the broker observed the event, Unix milliseconds.
    pub ts_ms: i64,
    /// When this session started, Unix milliseconds.
    pub connected_at_ms: i64,
    /// Why the session ended; only on `disconnected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DisconnectReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    /// `mqtt3.1.1` or `mqtt5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    Connected,
    Disconnected,
}

impl PresenceEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceEvent::Connected => "connected",
            PresenceEvent::Disconnected => "disconnected",
        }
    }
}

/// Why a device session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The device sent DISCONNECT.
    Client,
    /// Nothing arrived within 1.5 x the keepalive the device asked for.
    KeepaliveTimeout,
    /// A new connection with the same device id replaced this one.
    Takeover,
    /// The device, its certificate or its CA was revoked, deleted or quarantined.
    Revoked,
    /// The broker is shutting down.
    ServerShutdown,
    /// The fleet service found the device still online from a previous run of the node.
    ServerRestart,
    /// The broker node holding the session died (its lease expired); another process of the
    /// cluster declared the session over.
    NodeLost,
    /// The socket closed or failed without a DISCONNECT.
    ConnectionLost,
    /// The device broke the protocol (a malformed or unexpected packet).
    ProtocolError,
    /// The device published where it may not, or sent a payload that breaks the topic's
    /// schema; MQTT 3.1.1 has no other answer than closing the connection.
    NotAuthorized,
    /// An operator moved the device to another cohort; it reconnects with the rights of its
    /// new one.
    Reassigned,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Client => "client",
            DisconnectReason::KeepaliveTimeout => "keepalive_timeout",
            DisconnectReason::Takeover => "takeover",
            DisconnectReason::Revoked => "revoked",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::ServerRestart => "server_restart",
            DisconnectReason::NodeLost => "node_lost",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::NotAuthorized => "not_authorized",
            DisconnectReason::Reassigned => "reassigned",
        }
    }
}

/// `devices/{id}/state`: the device's reported state, retained. `firmware_version` is the truth
/// about what is installed; every other field is kept as reported.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReportedState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `devices/{id}/assignment`: where the device belongs, retained, published by the platform
/// when an operator moves the device. A device follows `cohorts/{cohort_id}/...` of the cohort
/// named here over the one it was configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAssignment {
    pub product_id: String,
    /// `None`: the device is in no cohort.
    pub cohort_id: Option<crate::CohortId>,
    /// Unix milliseconds of the move.
    pub assigned_at_ms: i64,
}

/// `devices/{id}/telemetry`: any JSON object the device chooses.
pub type Telemetry = Map<String, Value>;

/// `devices/{id}/commands`: a command for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command; the device echoes it in its [`CommandAck`].
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
}

/// `devices/{id}/commands/ack`: the device's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandAck {
    pub id: String,
    pub status: CommandStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Accepted,
    Succeeded,
    Failed,
    Rejected,
}

/// Why a payload on a device topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object")]
    NotObject,
    #[error("payload does not match the schema: {0}")]
    Schema(String),
}

/// Checks a payload a device publishes on one of its own topics before the broker accepts it.
pub fn validate_device_payload(topic: &crate::Topic, payload: &[u8]) -> Result<(), PayloadError> {
    use crate::Topic;
    match topic {
        Topic::Telemetry(_) => {
            // Checked without building a tree: this runs for every telemetry message.
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map_err(|e| PayloadError::NotJson(e.to_string()))?;
            if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
                return Err(PayloadError::NotObject);
            }
        }
        Topic::State(_) => {
            let v: Value = serde_json::from_slice(payload)
                .map_err(|e| PayloadError::NotJson(e.to_string()))?;
            if !v.is_object() {
                return Err(PayloadError::NotObject);
            }
            serde_json::from_value::<ReportedState>(v)
                .map_err(|e| PayloadError::Schema(e.to_string()))?;
        }
        Topic::CommandAck(_) => {
            serde_json::from_slice::<CommandAck>(payload)
                .map_err(|e| PayloadError::Schema(e.to_string()))?;
        }
        Topic::UpdateStatus(_) => {
            serde_json::from_slice::<crate::update::UpdateStatus>(payload)
                .map_err(|e| PayloadError::Schema(e.to_string()))?;
        }
        _ => {}
    }
    Ok(())
}

impl Presence {
    /// The ordering key consumers compare: later sessions win, and within a session the
    /// disconnect wins over the connect.
    pub fn order_key(&self) -> (u64, u8) {
        (self.epoch, self.event as u8)
    }

    pub fn device(&self) -> &DeviceId {
        &self.device_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;

    #[test]
    fn presence_order() {
        let d = DeviceId::parse("d").unwrap();
        let p = |epoch, event| Presence {
            device_id: d.clone(),
            event,
            epoch,
            ts_ms: 0,
            connected_at_ms: 0,
            reason: None,
            remote_addr: None,
            protocol: None,
        };
        assert!(
            p(2, PresenceEvent::Connected).order_key()
                > p(1, PresenceEvent::Disconnected).order_key()
        );
        assert!(
            p(2, PresenceEvent::Disconnected).order_key()
                > p(2, PresenceEvent::Connected).order_key()
        );
    }

    #[test]
    fn payload_validation() {
        let d = DeviceId::parse("d").unwrap();
        let tel = Topic::Telemetry(d.clone());
        let st = Topic::State(d.clone());
        assert!(validate_device_payload(&tel, br#"{"t":1}"#).is_ok());
        assert_eq!(
            validate_device_payload(&tel, b"[1]"),
            Err(PayloadError::NotObject)
        );
        assert!(matches!(
            validate_device_payload(&tel, b"nope"),
            Err(PayloadError::NotJson(_))
        ));
        assert!(validate_device_payload(&st, br#"{"firmware_version":"1.0.0","x":2}"#).is_ok());
        assert!(matches!(
            validate_device_payload(&st, br#"{"firmware_version":3}"#),
            Err(PayloadError::Schema(_))
        ));
        let ack = Topic::CommandAck(d);
        assert!(validate_device_payload(&ack, br#"{"id":"c1","status":"succeeded"}"#).is_ok());
        assert!(validate_device_payload(&ack, br#"{"id":"c1","status":"bogus"}"#).is_err());
    }

    #[test]
    fn reported_state_keeps_unknown_fields() {
        let s: ReportedState =
            serde_json::from_str(r#"{"firmware_version":"2.0.1","uptime":5}"#).unwrap();
        assert_eq!(s.firmware_version.as_deref(), Some("2.0.1"));
        assert_eq!(s.other["uptime"], 5);
    }
}
