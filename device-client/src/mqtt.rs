//! The MQTT 3.1.1 session. The only module that names rumqttc: it turns [`ConnectOptions`]
//! into a client, and rumqttc's events and errors into this crate's.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fleet_wire::{DeviceId, Topic};
use rumqttc::{
    AsyncClient, ClientError, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions,
    Outgoing, Packet, QoS, StateError, SubscribeFilter, SubscribeReasonCode, TlsConfiguration,
    Transport,
};

use crate::error::{ConfigError, ConnackRefusal, ConnectError};
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
    /// A SUBACK; how many of the filters were refused.
    SubAck {
        refused: usize,
    },
    DisconnectSent,
    Other,
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
        ClientError::TryRequest(rumqttc::Request::Disconnect(_)) | ClientError::Request(_) => {
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
        let filters: Vec<SubscribeFilter> = topics
            .iter()
            .map(|t| SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce))
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
        let filters = filters
            .into_iter()
            .map(|f| SubscribeFilter::new(f, qos.into()));
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
    let mut mqtt = MqttOptions::new(spec.client_id, spec.url.host(), spec.url.port());
    mqtt.set_keep_alive(spec.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(spec.max_packet, spec.max_packet)
        .set_inflight(spec.inflight.max(1));
    if let Some(c) = spec.credentials {
        mqtt.set_credentials(c.username.clone(), c.password.clone());
    }
    if let Some(tls) = spec.tls {
        mqtt.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, spec.capacity.max(1));
    let mut network = eventloop.network_options();
    network.set_connection_timeout(spec.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);
    (MqttClient(client), MqttLoop(eventloop))
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
                topic: p.topic,
                payload: p.payload.to_vec(),
            },
            Event::Incoming(Packet::PubAck(ack)) => MqttEvent::Acked(ack.pkid),
            Event::Incoming(Packet::SubAck(ack)) => MqttEvent::SubAck {
                refused: ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, SubscribeReasonCode::Failure))
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
    let mut mqtt = MqttOptions::new(device_id.as_str(), opts.url.host(), opts.url.port());
    mqtt.set_keep_alive(opts.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
        .set_inflight(CLIENT_INFLIGHT);
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
    let (client, mut eventloop) = AsyncClient::new(mqtt, capacity);
    let mut network = eventloop.network_options();
    network.set_connection_timeout(opts.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);
    Ok((MqttClient(client), MqttLoop(eventloop)))
}

/// The largest number of publishes [`MqttLoop`] keeps unacknowledged before holding more back.
pub(crate) const CLIENT_INFLIGHT: u16 = 100;

fn map_error(e: ConnectionError) -> ConnectError {
    match e {
        ConnectionError::ConnectionRefused(code) => ConnectError::Refused(match code {
            ConnectReturnCode::RefusedProtocolVersion => {
                ConnackRefusal::UnacceptableProtocolVersion
            }
            ConnectReturnCode::BadClientId => ConnackRefusal::IdentifierRejected,
            ConnectReturnCode::ServiceUnavailable => ConnackRefusal::ServerUnavailable,
            ConnectReturnCode::BadUserNamePassword => ConnackRefusal::BadUsernameOrPassword,
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::Success => {
                ConnackRefusal::NotAuthorized
            }
        }),
        ConnectionError::Tls(e) => match e {
            rumqttc::TlsError::Io(io) => ConnectError::Tls(io_text(&io)),
            other => ConnectError::Tls(other.to_string()),
        },
        ConnectionError::Io(io) => classify_io(&io),
        ConnectionError::MqttState(state) => match state {
            StateError::Io(io) => classify_io(&io),
            StateError::Deserialization(rumqttc::mqttbytes::Error::Io(io)) => classify_io(&io),
            StateError::ConnectionAborted => {
                ConnectError::Network("connection closed by the broker".into())
            }
            StateError::AwaitPingResp => ConnectError::Timeout("waiting for PINGRESP (keepalive)"),
            other => ConnectError::Protocol(other.to_string()),
        },
        ConnectionError::NetworkTimeout => ConnectError::Timeout("connecting to the broker"),
        ConnectionError::FlushTimeout => ConnectError::Timeout("writing to the broker"),
        ConnectionError::NotConnAck(p) => {
            ConnectError::Protocol(format!("expected CONNACK, received {p:?}"))
        }
        ConnectionError::RequestsDone => ConnectError::Network("client closed".into()),
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
            ConnectError::Network("connection closed by the broker".into())
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
                ConnectionError::Tls(rumqttc::TlsError::Io(tls_io)),
                ConnectError::Tls("invalid peer certificate: UnknownIssuer".into()),
            ),
            (
                ConnectionError::Io(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")),
                ConnectError::Network("refused".into()),
            ),
            (
                ConnectionError::MqttState(StateError::ConnectionAborted),
                ConnectError::Network("connection closed by the broker".into()),
            ),
            (
                ConnectionError::NetworkTimeout,
                ConnectError::Timeout("connecting to the broker"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(map_error(input), want);
        }
    }
}
