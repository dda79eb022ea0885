//! The MQTT 5 session. The only module that names rumqttc: it turns [`ConnectOptions`] into a
//! client, and rumqttc's events and errors into this crate's.
//!
//! MQTT 5 rather than 3.1.1 because only 5 says why the broker acts: a DISCONNECT carries its
//! reason (another connection took the session over, an administrative action, the server
//! shutting down), a CONNACK says more than "refused" (server busy, quota exceeded), and a
//! PUBACK may refuse a publish (not authorized, bad payload, not stored) where 3.1.1 can only
//! close the connection. rumqttc's v5 client reads negative PUBACKs and CONNACKs, and a
//! DISCONNECT whose reason carries a property length; rumqttc 0.25 cannot read the shorter form
//! `E0 01 <reason>` (no property length, allowed by MQTT 5 section 3.14.2.2.1, what Mosquitto
//! and the fleet broker send), and the connection then ends as "bytes remaining on stream",
//! mapped here to [`DisconnectCause::Unknown`]; the agent infers a takeover from the pattern
//! (see `backoff::Takeovers`).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fleet_wire::{DeviceId, Topic};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Filter, Packet, PubAckReason, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions, StateError,
};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use crate::error::{ConfigError, ConnackRefusal, ConnectError, DisconnectCause};
use crate::options::{ConnectOptions, Credentials};
use crate::url::BrokerUrl;

/// Largest packet sent or received.
const MAX_PACKET_SIZE: usize = 256 * 1024;

/// What the session reports, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MqttEvent {
    Connected {
        session_present: bool,
    },
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// A QoS 1 publish was written with this packet id.
    Sent(u16),
    /// A QoS 0 publish was written.
    SentAtMostOnce,
    /// A QoS 1 publish waits because its packet id is still in use.
    Deferred(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
    /// The broker answered this packet id with a negative PUBACK: the publish was not taken.
    Refused {
        pkid: u16,
        why: PublishRefusal,
    },
    /// A SUBACK; how many of the filters were refused.
    SubAck {
        refused: usize,
    },
    DisconnectSent,
    Other,
}

/// Why the broker refused a publish (an MQTT 5 PUBACK reason code of 0x80 or above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PublishRefusal {
    /// The reason code on the wire.
    pub code: u8,
    /// The broker could not take it now (its event store was away, a quota): sending the same
    /// message again later may succeed. Otherwise it never will (not authorized, bad payload).
    pub transient: bool,
}

impl PublishRefusal {
    fn from_reason(reason: PubAckReason) -> Option<Self> {
        let (code, transient) = match reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
            PubAckReason::UnspecifiedError => (0x80, true),
            PubAckReason::ImplementationSpecificError => (0x83, false),
            PubAckReason::NotAuthorized => (0x87, false),
            PubAckReason::TopicNameInvalid => (0x90, false),
            PubAckReason::PacketIdentifierInUse => (0x91, true),
            PubAckReason::QuotaExceeded => (0x97, true),
            PubAckReason::PayloadFormatInvalid => (0x99, false),
        };
        Some(Self { code, transient })
    }
}

impl std::fmt::Display for PublishRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self.code {
            0x80 => "the broker could not take it now",
            0x83 => "the broker's event store rejected it",
            0x87 => "not authorized for this topic",
            0x90 => "topic name invalid",
            0x91 => "packet identifier in use",
            0x97 => "quota exceeded",
            0x99 => "payload format invalid",
            _ => "refused",
        };
        write!(f, "{text} (PUBACK reason 0x{:02X})", self.code)
    }
}

/// The client could not take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubmitError {
    /// The request queue is full; try again after the next event.
    Full,
    /// The session is gone.
    Closed,
}

fn submit_err(e: ClientError) -> SubmitError {
    match e {
        ClientError::TryRequest(rumqttc::v5::Request::Disconnect) | ClientError::Request(_) => {
            SubmitError::Closed
        }
        ClientError::TryRequest(_) => SubmitError::Full,
    }
}

/// Submits requests; cheap to clone.
#[derive(Clone)]
pub(crate) struct MqttClient(AsyncClient);

impl MqttClient {
    /// Queues a QoS 1 publish without waiting.
    pub(crate) fn publish(
        &self,
        topic: &Topic,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), SubmitError> {
        self.0
            .try_publish(topic.to_string(), QoS::AtLeastOnce, retain, payload)
            .map_err(submit_err)
    }

    /// Queues one SUBSCRIBE (QoS 1) for all `topics`.
    pub(crate) fn subscribe(&self, topics: &[Topic]) -> Result<(), SubmitError> {
        let filters: Vec<Filter> = topics
            .iter()
            .map(|t| Filter::new(t.to_string(), QoS::AtLeastOnce))
            .collect();
        self.0.try_subscribe_many(filters).map_err(submit_err)
    }

    pub(crate) fn disconnect(&self) -> Result<(), SubmitError> {
        self.0.try_disconnect().map_err(submit_err)
    }

    /// Queues a publish on a topic given as text (the simulator's topics may carry a prefix).
    pub(crate) fn publish_to(
        &self,
        topic: String,
        qos: Qos,
        payload: Vec<u8>,
    ) -> Result<(), SubmitError> {
        self.0
            .try_publish(topic, qos.into(), false, payload)
            .map_err(submit_err)
    }

    /// Queues one SUBSCRIBE for a filter given as text.
    pub(crate) fn subscribe_to(&self, filter: String, qos: Qos) -> Result<(), SubmitError> {
        self.0.try_subscribe(filter, qos.into()).map_err(submit_err)
    }

    /// Queues one SUBSCRIBE for several filters given as text, all at `qos`.
    pub(crate) fn subscribe_many_to(
        &self,
        filters: Vec<String>,
        qos: Qos,
    ) -> Result<(), SubmitError> {
        let filters = filters.into_iter().map(|f| Filter::new(f, qos.into()));
        self.0.try_subscribe_many(filters).map_err(submit_err)
    }
}

/// Delivery guarantee of a publish or subscription; serialized as 0 or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

impl TryFrom<u8> for Qos {
    type Error = String;

    fn try_from(q: u8) -> Result<Qos, String> {
        match q {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::AtLeastOnce),
            _ => Err(format!("QoS {q}: 0 or 1 expected")),
        }
    }
}

impl From<Qos> for u8 {
    fn from(q: Qos) -> u8 {
        match q {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        }
    }
}

impl From<Qos> for QoS {
    fn from(q: Qos) -> QoS {
        match q {
            Qos::AtMostOnce => QoS::AtMostOnce,
            Qos::AtLeastOnce => QoS::AtLeastOnce,
        }
    }
}

/// A session as the simulator opens it: an explicit client id, a ready TLS configuration and
/// small buffers, so that thousands fit in one process.
pub(crate) struct SessionSpec<'a> {
    pub url: &'a BrokerUrl,
    pub client_id: &'a str,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<&'a Credentials>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    /// Unacknowledged QoS 1 publishes before the client holds more back.
    pub inflight: u16,
    /// Requests queued in the client before `try_*` reports [`SubmitError::Full`].
    pub capacity: usize,
    /// Largest packet read or written.
    pub max_packet: usize,
}

/// Builds a client from `spec`; the first [`MqttLoop::poll`] opens the TCP connection.
pub(crate) fn open_session(spec: SessionSpec<'_>) -> (MqttClient, MqttLoop) {
    let mut mqtt = options(
        spec.client_id,
        spec.url,
        spec.keep_alive,
        spec.connect_timeout,
        spec.max_packet,
        spec.inflight,
    );
    if let Some(c) = spec.credentials {
        mqtt.set_credentials(c.username.clone(), c.password.clone());
    }
    if let Some(tls) = spec.tls {
        mqtt.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    }
    let (client, eventloop) = AsyncClient::new(mqtt, spec.capacity.max(1));
    (MqttClient(client), MqttLoop(eventloop))
}

/// The options every session shares: a clean start (no session kept after the connection),
/// the largest packet both ways, and the most publishes in flight (the broker's Receive
/// Maximum lowers it).
fn options(
    client_id: &str,
    url: &BrokerUrl,
    keep_alive: Duration,
    connect_timeout: Duration,
    max_packet: usize,
    inflight: u16,
) -> MqttOptions {
    let mut mqtt = MqttOptions::new(client_id, url.host(), url.port());
    let max_packet = u32::try_from(max_packet).unwrap_or(u32::MAX);
    mqtt.set_keep_alive(keep_alive)
        .set_clean_start(true)
        .set_max_packet_size(Some(max_packet))
        .set_outgoing_inflight_upper_limit(inflight.max(1))
        .set_connection_timeout(connect_timeout.as_secs().max(1));
    mqtt
}

/// Drives the connection. `poll` reconnects when called after an error.
pub(crate) struct MqttLoop(EventLoop);

impl MqttLoop {
    pub(crate) async fn poll(&mut self) -> Result<MqttEvent, ConnectError> {
        let event = self.0.poll().await.map_err(map_error)?;
        Ok(match event {
            Event::Incoming(Packet::ConnAck(ack)) => MqttEvent::Connected {
                session_present: ack.session_present,
            },
            Event::Incoming(Packet::Publish(p)) => MqttEvent::Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
            },
            Event::Incoming(Packet::PubAck(ack)) => match PublishRefusal::from_reason(ack.reason) {
                None => MqttEvent::Acked(ack.pkid),
                Some(why) => MqttEvent::Refused {
                    pkid: ack.pkid,
                    why,
                },
            },
            Event::Incoming(Packet::SubAck(ack)) => MqttEvent::SubAck {
                refused: ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .count(),
            },
            Event::Outgoing(Outgoing::Publish(0)) => MqttEvent::SentAtMostOnce,
            Event::Outgoing(Outgoing::Publish(pkid)) => MqttEvent::Sent(pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => MqttEvent::Deferred(pkid),
            Event::Outgoing(Outgoing::Disconnect) => MqttEvent::DisconnectSent,
            _ => MqttEvent::Other,
        })
    }

    /// Forgets every request of the lost session, including those queued after it was lost,
    /// so none of them is sent on the next connection. The caller re-sends what it needs.
    pub(crate) fn discard_pending(&mut self) {
        self.0.clean();
        self.0.pending.clear();
    }
}

/// Builds a client for `device_id`; `capacity` bounds the request queue.
pub(crate) fn open(
    opts: &ConnectOptions,
    device_id: &DeviceId,
    capacity: usize,
) -> Result<(MqttClient, MqttLoop), ConfigError> {
    let mut mqtt = options(
        device_id.as_str(),
        &opts.url,
        opts.keep_alive,
        opts.connect_timeout,
        MAX_PACKET_SIZE,
        CLIENT_INFLIGHT,
    );
    if let Some(c) = &opts.credentials {
        mqtt.set_credentials(c.username.clone(), c.password.clone());
    }
    match (&opts.tls, opts.url.is_tls()) {
        (Some(tls), true) => {
            mqtt.set_transport(Transport::Tls(TlsConfiguration::Rustls(
                tls.client_config()?,
            )));
        }
        (None, false) => {}
        (None, true) => return Err(ConfigError::TlsRequired),
        (Some(_), false) => return Err(ConfigError::TlsWithPlainUrl),
    }
    let (client, eventloop) = AsyncClient::new(mqtt, capacity);
    Ok((MqttClient(client), MqttLoop(eventloop)))
}

/// The largest number of publishes [`MqttLoop`] keeps unacknowledged before holding more back.
pub(crate) const CLIENT_INFLIGHT: u16 = 100;

fn map_error(e: ConnectionError) -> ConnectError {
    match e {
        ConnectionError::ConnectionRefused(code) => ConnectError::Refused(refusal(code)),
        ConnectionError::Tls(e) => match e {
            rumqttc::TlsError::Io(io) => ConnectError::Tls(io_text(&io)),
            other => ConnectError::Tls(other.to_string()),
        },
        ConnectionError::Io(io) => classify_io(&io),
        ConnectionError::MqttState(state) => match state {
            StateError::ServerDisconnect { reason_code, .. } => {
                ConnectError::Disconnected(disconnect_cause(reason_code))
            }
            StateError::ConnFail { reason } => ConnectError::Refused(refusal(reason)),
            StateError::Io(io) => classify_io(&io),
            StateError::Deserialization(rumqttc::v5::mqttbytes::Error::Io(io)) => classify_io(&io),
            StateError::ConnectionAborted => ConnectError::Disconnected(DisconnectCause::Unknown),
            StateError::AwaitPingResp => ConnectError::Timeout("waiting for PINGRESP (keepalive)"),
            other => ConnectError::Protocol(other.to_string()),
        },
        ConnectionError::Timeout(_) => ConnectError::Timeout("connecting to the broker"),
        ConnectionError::NotConnAck(p) => {
            ConnectError::Protocol(format!("expected CONNACK, received {p:?}"))
        }
        ConnectionError::RequestsDone => ConnectError::Network("client closed".into()),
    }
}

fn refusal(code: ConnectReturnCode) -> ConnackRefusal {
    use ConnackRefusal as R;
    use ConnectReturnCode as C;
    match code {
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => R::UnsupportedProtocolVersion,
        C::BadClientId | C::ClientIdentifierNotValid => R::IdentifierRejected,
        C::BadUserNamePassword => R::BadUsernameOrPassword,
        C::NotAuthorized | C::Success => R::NotAuthorized,
        C::ServiceUnavailable | C::ServerUnavailable => R::ServerUnavailable,
        C::ServerBusy => R::ServerBusy,
        C::Banned => R::Banned,
        C::QuotaExceeded => R::QuotaExceeded,
        C::ConnectionRateExceeded => R::ConnectionRateExceeded,
        C::UnspecifiedError => R::Other(0x80),
        C::MalformedPacket => R::Other(0x81),
        C::ProtocolError => R::Other(0x82),
        C::ImplementationSpecificError => R::Other(0x83),
        C::BadAuthenticationMethod => R::Other(0x8C),
        C::TopicNameInvalid => R::Other(0x90),
        C::PacketTooLarge => R::Other(0x95),
        C::PayloadFormatInvalid => R::Other(0x99),
        C::RetainNotSupported => R::Other(0x9A),
        C::QoSNotSupported => R::Other(0x9B),
        C::UseAnotherServer => R::Other(0x9C),
        C::ServerMoved => R::Other(0x9D),
    }
}

fn disconnect_cause(code: DisconnectReasonCode) -> DisconnectCause {
    match code {
        DisconnectReasonCode::SessionTakenOver => DisconnectCause::SessionTakenOver,
        DisconnectReasonCode::AdministrativeAction => DisconnectCause::AdministrativeAction,
        DisconnectReasonCode::ServerShuttingDown => DisconnectCause::ServerShuttingDown,
        DisconnectReasonCode::KeepAliveTimeout => DisconnectCause::KeepAliveTimeout,
        DisconnectReasonCode::NotAuthorized => DisconnectCause::NotAuthorized,
        // The enum is `repr(u8)`-like: its discriminants are the wire codes.
        other => DisconnectCause::Other(other as u8),
    }
}

/// TLS failures reach us as I/O errors wrapping a rustls error; name them as TLS.
fn classify_io(e: &io::Error) -> ConnectError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => ConnectError::Tls(tls.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            ConnectError::Disconnected(DisconnectCause::Unknown)
        }
        // The connection ended inside a packet the codec could not finish (tokio-util's words
        // at end of stream). From a broker that is the DISCONNECT with a reason code and no
        // property length, which rumqttc 0.25 cannot read.
        None if e.to_string() == "bytes remaining on stream" => {
            ConnectError::Disconnected(DisconnectCause::Unknown)
        }
        None => ConnectError::Network(e.to_string()),
    }
}

fn io_text(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

/// How long [`open`]'s connect attempt may take at most, for callers that wait on it.
pub(crate) fn connect_budget(opts: &ConnectOptions) -> Duration {
    opts.connect_timeout.max(Duration::from_secs(1)) + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let tls_io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let cases: Vec<(ConnectionError, ConnectError)> = vec![
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                ConnectError::Refused(ConnackRefusal::NotAuthorized),
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                ConnectError::Refused(ConnackRefusal::BadUsernameOrPassword),
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::ClientIdentifierNotValid),
                ConnectError::Refused(ConnackRefusal::IdentifierRejected),
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::ServerMoved),
                ConnectError::Refused(ConnackRefusal::Other(0x9D)),
            ),
            (
                ConnectionError::Tls(rumqttc::TlsError::Io(tls_io)),
                ConnectError::Tls("invalid peer certificate: UnknownIssuer".into()),
            ),
            (
                ConnectionError::Io(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")),
                ConnectError::Network("refused".into()),
            ),
            (
                ConnectionError::MqttState(StateError::ConnectionAborted),
                ConnectError::Disconnected(DisconnectCause::Unknown),
            ),
            (
                ConnectionError::MqttState(StateError::Deserialization(
                    rumqttc::v5::mqttbytes::Error::Io(io::Error::other(
                        "bytes remaining on stream",
                    )),
                )),
                ConnectError::Disconnected(DisconnectCause::Unknown),
            ),
            (
                ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code: DisconnectReasonCode::SessionTakenOver,
                    reason_string: None,
                }),
                ConnectError::Disconnected(DisconnectCause::SessionTakenOver),
            ),
            (
                ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code: DisconnectReasonCode::AdministrativeAction,
                    reason_string: None,
                }),
                ConnectError::Disconnected(DisconnectCause::AdministrativeAction),
            ),
            (
                ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code: DisconnectReasonCode::ReceiveMaximumExceeded,
                    reason_string: None,
                }),
                ConnectError::Disconnected(DisconnectCause::Other(0x93)),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(map_error(input), want);
        }
    }

    #[test]
    fn takeover_is_named_in_plain_words() {
        let e = map_error(ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            reason_string: None,
        }));
        assert!(e.is_takeover());
        assert_eq!(
            e.to_string(),
            "another connection using this device's identity took the session over; \
             is a second agent running? (DISCONNECT reason 0x8E)"
        );
    }

    #[test]
    fn negative_pubacks_are_refusals() {
        let cases = [
            (PubAckReason::Success, None),
            (PubAckReason::NoMatchingSubscribers, None),
            (PubAckReason::UnspecifiedError, Some((0x80, true))),
            (PubAckReason::QuotaExceeded, Some((0x97, true))),
            (PubAckReason::NotAuthorized, Some((0x87, false))),
            (PubAckReason::PayloadFormatInvalid, Some((0x99, false))),
            (
                PubAckReason::ImplementationSpecificError,
                Some((0x83, false)),
            ),
        ];
        for (reason, want) in cases {
            let got = PublishRefusal::from_reason(reason).map(|r| (r.code, r.transient));
            assert_eq!(got, want, "{reason:?}");
        }
    }
}
