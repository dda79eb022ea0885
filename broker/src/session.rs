//! One MQTT session: from CONNECT to the end of the connection, driving a rumqttd local link.
//!
//! Invariants:
//! - Identity comes only from the verified certificate (devices) or an API key (services).
//! - Every PUBLISH and SUBSCRIBE is checked against [`crate::acl`] before the router sees it.
//! - A QoS 1/2 publish on a durable topic is acknowledged only after the event bus accepted it.
//! - An inbound QoS 2 publish goes to the router (and the bus) once: a resend before its PUBREL
//!   is only answered PUBREC again; what the session keeps until PUBREL is its packet id.
//! - An MQTT 5 client never has more inbound QoS 1/2 publishes in flight than the Receive
//!   Maximum the CONNACK advertised.
//! - Acknowledgements reach the client in the order of the packets they answer, whether the
//!   router or this session produced them ([`AckQueue`]).
//! - Every session that sent CONNACK publishes exactly one `connected` and one `disconnected`
//!   presence event with the same epoch; the epoch grows across sessions and restarts.
//! - A linked session (service, conformance client) that ends finishes before the next
//!   connection with its router client id links, so that connection finds the session kept or
//!   expired as the first one's Session Expiry said, never half of it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_wire::payload::{DisconnectReason, Presence, PresenceEvent};
use fleet_wire::{DeviceId, Topic, TopicError};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::acl::{self, Principal};
use crate::auth::ServiceAuth;
use crate::bus::{event_id, BusError, BusMessage, EventBus};
use crate::control::{BrokerControl, SessionHandle};
use crate::forward::{self, Forwarding, Mark, StandIn, TopicAliases, Verdict};
use crate::inbox::Delivery;
use crate::local::Local;
use crate::metrics::Rejection;
use crate::mqtt::{Conn, FrameInfo, Limits, ReadError, Version, Violation};
use crate::router::proto::*;
use crate::router::{
    publish_with_qos, FromRouter, Link, LinkOptions, RouterError, RouterHandle, SystemPublisher,
};

/// Limits of one session.
#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    /// Receive Maximum: inbound QoS 1 publishes not yet acknowledged plus QoS 2 ones not yet
    /// released that an MQTT 5 client may have; also the unanswered packets before a session
    /// stops reading.
    pub receive_maximum: usize,
    /// Bounds on what one packet may carry besides topic and payload.
    pub limits: Limits,
    /// Topic filters one connection may hold.
    pub max_subscriptions: usize,
    /// How long a new connection waits for the session it replaces to finish.
    pub takeover_wait: Duration,
    /// Longest a disconnected persistent session is kept (MQTT 3.1.1 has no expiry of its own;
    /// an MQTT 5 Session Expiry Interval is capped by it).
    pub max_session_expiry: Duration,
    /// Longest keep alive a client may ask for, seconds (0: no bound).
    pub max_keep_alive: u16,
    /// How long a presence event may wait for the bus.
    pub bus_timeout: Duration,
}

pub(crate) struct Ctx {
    pub admission: crate::admission::Admission,
    pub router: RouterHandle,
    pub system: SystemPublisher,
    /// Retained messages and device inboxes: what the node delivers without the router.
    pub local: Arc<Local>,
    pub control: BrokerControl,
    pub bus: Arc<dyn EventBus>,
    pub auth: Arc<dyn ServiceAuth>,
    pub settings: SessionSettings,
    pub shutdown: watch::Receiver<bool>,
    pub service_ids: AtomicU64,
    /// Per device: held while one of its connections is being set up.
    pub connect_gates: dashmap::DashMap<DeviceId, Arc<tokio::sync::Mutex<()>>>,
    /// Per router client id of a disconnected persistent session: the packet ids of its QoS 2
    /// publishes still awaiting PUBREL, so a resend after reconnecting is not delivered twice.
    /// Dropped when the session expires.
    pub unreleased_qos2: dashmap::DashMap<String, Vec<u16>>,
    /// Per router client id, the session of a service or conformance client holding it.
    pub linked: dashmap::DashMap<String, LinkedHandle>,
}

/// What a new connection needs of the session it takes over.
#[derive(Clone)]
pub(crate) struct LinkedHandle {
    id: u64,
    kick: mpsc::UnboundedSender<DisconnectReason>,
    done: watch::Receiver<bool>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Refuses a connection with the CONNACK code each MQTT version has for `why`, and closes it.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    mut conn: Conn<S>,
    why: Rejection,
    device: Option<&DeviceId>,
    peer: SocketAddr,
) {
    queue_refusal(ctx, &mut conn, why, device, peer);
    conn.close(Duration::from_secs(1)).await;
}

/// Counts and logs a refusal, and queues its CONNACK.
fn queue_refusal<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    why: Rejection,
    device: Option<&DeviceId>,
    peer: SocketAddr,
) {
    ctx.control.refused(why, device, peer);
    info!(%peer, reason = why.as_str(), "connection refused: {why}");
    let code = match (conn.version(), why) {
        (Version::V311, Rejection::ClientIdMismatch) => ConnectReturnCode::ClientIdentifierNotValid,
        (Version::V311, Rejection::BadCredentials) => ConnectReturnCode::BadUserNamePassword,
        (
            Version::V311,
            Rejection::ProvisioningFailed
            | Rejection::ConnectionLimit
            | Rejection::ConnectRateExceeded
            | Rejection::NodeFenced,
        ) => ConnectReturnCode::ServiceUnavailable,
        (Version::V311, _) => ConnectReturnCode::NotAuthorized,
        (Version::V5, Rejection::ClientIdMismatch) => ConnectReturnCode::ClientIdentifierNotValid,
        (Version::V5, Rejection::BadCredentials) => ConnectReturnCode::BadUserNamePassword,
        (Version::V5, Rejection::ProvisioningFailed | Rejection::NodeFenced) => {
            ConnectReturnCode::ServerUnavailable
        }
        (Version::V5, Rejection::ConnectionLimit) => ConnectReturnCode::QuotaExceeded,
        (Version::V5, Rejection::ConnectRateExceeded) => ConnectReturnCode::ServerBusy,
        (Version::V5, Rejection::BadConnect) => ConnectReturnCode::ProtocolError,
        (Version::V5, _) => ConnectReturnCode::NotAuthorized,
    };
    queue_connack(conn, code, &why);
}

/// Queues a refusing CONNACK with `code`, and on MQTT 5 `reason` as its reason string.
fn queue_connack<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    code: ConnectReturnCode,
    reason: &dyn std::fmt::Display,
) {
    let props = (conn.version() == Version::V5).then(|| ConnAckProperties {
        reason_string: Some(reason.to_string()),
        ..Default::default()
    });
    conn.queue(Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        props,
    ));
}

struct ConnectInfo {
    connect: Connect,
    props: Option<ConnectProperties>,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    login: Option<Login>,
}

/// Reads a valid CONNECT, and answers it with a refusal (returning `None`) when the node is
/// over its connection budgets ([`crate::admission`]).
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    peer: SocketAddr,
) -> Option<ConnectInfo> {
    conn.set_limits(ctx.settings.limits);
    match conn.read_connect(ctx.settings.connect_timeout).await {
        Ok(Packet::Connect(connect, props, will, will_props, login)) => {
            let admitted = if ctx.control.accepting() {
                ctx.admission.admit()
            } else {
                Err(Rejection::NodeFenced)
            };
            if let Err(why) = admitted {
                queue_refusal(ctx, conn, why, None, peer);
                let _ = conn.flush().await;
                return None;
            }
            Some(ConnectInfo {
                connect,
                props,
                will: will.map(|w| (w, will_props)),
                login,
            })
        }
        Ok(_) => None,
        Err(ReadError::UnsupportedVersion(level)) => {
            ctx.control.refused(Rejection::BadConnect, None, peer);
            info!(%peer, level, "connection refused: unsupported MQTT protocol level");
            conn.queue(Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::RefusedProtocolVersion,
                },
                None,
            ));
            let _ = conn.flush().await;
            None
        }
        Err(ReadError::Invalid(v)) => {
            ctx.control.refused(Rejection::BadConnect, None, peer);
            info!(%peer, error = %v, "connection refused: invalid CONNECT");
            // MQTT 3.1.1 closes on a malformed CONNECT without answering; it has a code only
            // for the client id.
            let code = match (conn.version(), v) {
                (Version::V311, Violation::ClientId) => {
                    Some(ConnectReturnCode::ClientIdentifierNotValid)
                }
                (Version::V311, _) => None,
                (Version::V5, v) => Some(connack_code(v)),
            };
            if let Some(code) = code {
                queue_connack(conn, code, &v);
                let _ = conn.flush().await;
            }
            None
        }
        Err(e) => {
            ctx.control.refused(Rejection::BadConnect, None, peer);
            debug!(%peer, error = %e, "no valid CONNECT");
            None
        }
    }
}

/// The MQTT 5 CONNACK code for a CONNECT that broke a rule.
fn connack_code(v: Violation) -> ConnectReturnCode {
    match v {
        Violation::Malformed(_) => ConnectReturnCode::MalformedPacket,
        Violation::Protocol(_) | Violation::TopicAlias => ConnectReturnCode::ProtocolError,
        Violation::OverLimit(_) => ConnectReturnCode::ImplementationSpecificError,
        Violation::ClientId => ConnectReturnCode::ClientIdentifierNotValid,
        Violation::AuthMethod => ConnectReturnCode::BadAuthenticationMethod,
        Violation::TopicName(_) => ConnectReturnCode::TopicNameInvalid,
    }
}

/// The MQTT 5 DISCONNECT code for a packet that broke a rule.
fn disconnect_code(v: Violation) -> DisconnectReasonCode {
    match v {
        Violation::Malformed(_) => DisconnectReasonCode::MalformedPacket,
        Violation::Protocol(_) | Violation::ClientId | Violation::AuthMethod => {
            DisconnectReasonCode::ProtocolError
        }
        Violation::OverLimit(_) => DisconnectReasonCode::ImplementationSpecificError,
        Violation::TopicName(_) => DisconnectReasonCode::TopicNameInvalid,
        Violation::TopicAlias => DisconnectReasonCode::TopicAliasInvalid,
    }
}

/// Whether the will of a CONNECT, if it has one, is a publish its client may make: a topic
/// it may publish, retained only where retaining is allowed.
fn will_allowed(info: &ConnectInfo, principal: &Principal, places: &dyn acl::Places) -> bool {
    let Some((will, _)) = &info.will else {
        return true;
    };
    std::str::from_utf8(&will.topic).is_ok_and(|topic| match Topic::parse(topic) {
        Ok(t) => {
            acl::may_publish_topic(principal, &t, places) && (!will.retain || acl::may_retain(&t))
        }
        // Only the conformance listener has topics outside the platform's contract.
        Err(_) => acl::may_publish(principal, topic, places),
    })
}

/// Serves a device on the mTLS listener. `leaf` is its verified certificate (DER).
pub(crate) async fn serve_device<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<Ctx>,
    io: S,
    peer: SocketAddr,
    leaf: Vec<u8>,
) {
    let mut conn = Conn::new(io, ctx.settings.max_packet_size);
    let Some(info) = read_connect(&ctx, &mut conn, peer).await else {
        return;
    };
    let registry = ctx.control.registry.clone();
    let id = match registry.device_id_of(&leaf) {
        Ok(id) => id,
        Err(why) => return refuse(&ctx, conn, why, None, peer).await,
    };
    let client_id = info.connect.client_id.as_str();
    let assigned = client_id.is_empty();
    if assigned && conn.version() == Version::V311 && !info.connect.clean_session {
        // MQTT 3.1.1 forbids a server-assigned id for a persistent session.
        return refuse(&ctx, conn, Rejection::ClientIdMismatch, Some(&id), peer).await;
    }
    if !assigned && client_id != id.as_str() {
        return refuse(&ctx, conn, Rejection::ClientIdMismatch, Some(&id), peer).await;
    }
    let identity = match registry.identify(&leaf).await {
        Ok(identity) => identity,
        Err(why) => return refuse(&ctx, conn, why, Some(&id), peer).await,
    };
    let principal = Principal::Device {
        id: id.clone(),
        cohort: identity.device.cohort_id.clone(),
        quarantined: registry.quarantine(&id).is_some(),
    };
    if !will_allowed(&info, &principal, &*registry) {
        return refuse(&ctx, conn, Rejection::ForbiddenTopic, Some(&id), peer).await;
    }

    // One connection of a device is set up at a time (takeover, epoch, router link, presence,
    // CONNACK): otherwise two racing connects could link into the router in the opposite order
    // of their epochs, and the router would keep the older one alive while presence said the
    // newer one had ended.
    let gate = ctx.connect_gates.entry(id.clone()).or_default().clone();
    let setup = gate.lock().await;

    // Takeover: end the session this connection replaces, and wait for its presence to be out.
    if let Some(old) = ctx.control.sessions.get(&id).map(|s| s.clone()) {
        ctx.control.metrics.takeover();
        let _ = old.kick.send(DisconnectReason::Takeover);
        let mut done = old.done.clone();
        let _ = tokio::time::timeout(ctx.settings.takeover_wait, wait_true(&mut done)).await;
    }
    let Some(epoch) = registry.next_epoch(&id) else {
        drop(setup);
        return refuse(&ctx, conn, Rejection::NotProvisioned, Some(&id), peer).await;
    };
    let (kick_tx, kick_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = watch::channel(false);
    ctx.control.sessions.insert(
        id.clone(),
        SessionHandle {
            epoch,
            ca_id: identity.ca_id.clone(),
            kick: kick_tx,
            done: done_rx,
        },
    );

    let span = tracing::info_span!("device", device_id = %id, epoch);
    // Boxed: connecting (router link, presence, CONNACK) needs far more future state than
    // serving does, and that state is freed once connected instead of kept by the task.
    let session = Box::pin(
        Session::start(
            ctx.clone(),
            conn,
            info,
            principal,
            id.as_str().to_owned(),
            Some(DeviceSession {
                id: id.clone(),
                epoch,
                connected_at_ms: now_ms(),
                remote_addr: peer.to_string(),
                seq: 0,
            }),
            assigned.then(|| id.as_str().to_owned()),
            kick_rx,
            identity.provisioned_now,
        )
        .instrument_in(span.clone()),
    )
    .await;
    drop(setup);
    ctx.connect_gates
        .remove_if(&id, |_, g| Arc::strong_count(g) == 1);
    drop(gate);
    if let Some(session) = session {
        session.run().instrument_in(span).await;
    }
    // Only remove our own handle: a newer session may already have replaced it.
    ctx.control.sessions.remove_if(&id, |_, h| h.epoch == epoch);
    let _ = done_tx.send(true);
}

/// Serves a backend service on the service listener (API key as MQTT password).
pub(crate) async fn serve_service<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<Ctx>,
    io: S,
    peer: SocketAddr,
) {
    let mut conn = Conn::new(io, ctx.settings.max_packet_size);
    let Some(info) = read_connect(&ctx, &mut conn, peer).await else {
        return;
    };
    let principal = match info
        .login
        .as_ref()
        .and_then(|l| ctx.auth.authenticate(&l.password))
    {
        Some(p) => p,
        None => return refuse(&ctx, conn, Rejection::BadCredentials, None, peer).await,
    };
    let key_id = principal.key_id.clone();
    // Registered so that revoking the key ends this session.
    let (kick_tx, kick_rx) = mpsc::unbounded_channel();
    let handle = ctx.service_ids.fetch_add(1, Ordering::Relaxed);
    let control = ctx.control.clone();
    control
        .service_sessions
        .insert(handle, (key_id.clone(), kick_tx.clone()));
    // A character no device id may contain keeps services out of the devices' client-id space,
    // and the key's id makes the client id the key's own: a connection with another key (of
    // another role, scope or organization) that names the same client id gets a session of its
    // own instead of taking this one over. Key ids never contain `~`.
    let namespace = format!("~svc~{key_id}~");
    let principal = Principal::Service(principal);
    let kick = (kick_tx, kick_rx);
    serve_linked(ctx, conn, info, principal, &namespace, peer, kick).await;
    control.service_sessions.remove(&handle);
}

/// Serves an anonymous client of the conformance listener (see [`Principal::Conformance`]):
/// a session like a service's, linked into the router, under a client-id space of its own.
pub(crate) async fn serve_conformance<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<Ctx>,
    io: S,
    peer: SocketAddr,
    rights: acl::ConformanceRights,
) {
    let mut conn = Conn::new(io, ctx.settings.max_packet_size);
    let Some(info) = read_connect(&ctx, &mut conn, peer).await else {
        return;
    };
    let principal = Principal::Conformance(rights);
    let kick = mpsc::unbounded_channel();
    serve_linked(ctx, conn, info, principal, "~conf~", peer, kick).await;
}

/// Serves a client that links into the router (a service or a conformance client) once its
/// principal is known: checks its will and client id, then runs its session under the router
/// client id `{namespace}{client id}`.
async fn serve_linked<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<Ctx>,
    conn: Conn<S>,
    info: ConnectInfo,
    principal: Principal,
    namespace: &str,
    peer: SocketAddr,
    (kick_tx, kick_rx): (
        mpsc::UnboundedSender<DisconnectReason>,
        mpsc::UnboundedReceiver<DisconnectReason>,
    ),
) {
    if !will_allowed(&info, &principal, &*ctx.control.registry) {
        return refuse(&ctx, conn, Rejection::ForbiddenTopic, None, peer).await;
    }
    let client_id = info.connect.client_id.clone();
    if client_id.contains(['+', '#', '/', '$', '\0']) {
        return refuse(&ctx, conn, Rejection::ClientIdMismatch, None, peer).await;
    }
    if client_id.is_empty() && conn.version() == Version::V311 && !info.connect.clean_session {
        // [MQTT-3.1.3-8]: a zero-byte client id needs a clean session in MQTT 3.1.1.
        return refuse(&ctx, conn, Rejection::ClientIdMismatch, None, peer).await;
    }
    let (client_id, assigned) = if client_id.is_empty() {
        let n = ctx.service_ids.fetch_add(1, Ordering::Relaxed);
        (format!("service-{n}"), true)
    } else {
        (client_id, false)
    };
    let router_id = format!("{namespace}{client_id}");
    // Takeover: the session this connection replaces ends first, and a session that is ending
    // (its client disconnected and reconnected at once) finishes first, so what it leaves in
    // the router (kept, or expired) is what this connection finds.
    if let Some(old) = ctx.linked.get(&router_id).map(|h| h.clone()) {
        let _ = old.kick.send(DisconnectReason::Takeover);
        let mut done = old.done.clone();
        let _ = tokio::time::timeout(ctx.settings.takeover_wait, wait_true(&mut done)).await;
    }
    let id = ctx.service_ids.fetch_add(1, Ordering::Relaxed);
    let (done_tx, done_rx) = watch::channel(false);
    ctx.linked.insert(
        router_id.clone(),
        LinkedHandle {
            id,
            kick: kick_tx,
            done: done_rx,
        },
    );
    let span = tracing::info_span!("service", client_id = %client_id, %peer);
    let session = Box::pin(
        Session::start(
            ctx.clone(),
            conn,
            info,
            principal,
            router_id.clone(),
            None,
            assigned.then_some(client_id),
            kick_rx,
            false,
        )
        .instrument_in(span.clone()),
    )
    .await;
    if let Some(session) = session {
        session.run().instrument_in(span).await;
    }
    // Only our own handle: a newer session may already have replaced it.
    ctx.linked.remove_if(&router_id, |_, h| h.id == id);
    let _ = done_tx.send(true);
}

trait InstrumentIn: std::future::Future + Sized {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self> {
        tracing::Instrument::instrument(self, span)
    }
}
impl<F: std::future::Future> InstrumentIn for F {}

struct DeviceSession {
    id: DeviceId,
    epoch: u64,
    connected_at_ms: i64,
    remote_addr: String,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    PubAck,
    PubRec,
    PubComp,
    SubAck,
}

struct Slot {
    id: u64,
    kind: AckKind,
    pkid: u16,
    packet: Option<Packet>,
    bus_pending: bool,
    bus_error: Option<BusError>,
    /// For a SUBACK: the answer for every filter of the SUBSCRIBE, `None` where the router's
    /// code goes.
    sub_codes: Vec<Option<SubscribeReasonCode>>,
    /// An acknowledgement of something the session sent on its own; never reaches the client.
    swallow: bool,
    /// For a SUBACK: the retained messages its filters match, sent right after it.
    then: Vec<Delivery>,
}

/// Acknowledgements in the order of the packets they answer.
#[derive(Default)]
struct AckQueue {
    slots: VecDeque<Slot>,
    next_id: u64,
    /// QoS 1 publishes of the client not acknowledged yet.
    pubacks: usize,
}

impl AckQueue {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn unacknowledged_qos1(&self) -> usize {
        self.pubacks
    }

    fn push(&mut self, kind: AckKind, pkid: u16, packet: Option<Packet>, bus_pending: bool) -> u64 {
        self.push_sub(kind, pkid, packet, bus_pending, Vec::new())
    }

    fn push_sub(
        &mut self,
        kind: AckKind,
        pkid: u16,
        packet: Option<Packet>,
        bus_pending: bool,
        sub_codes: Vec<Option<SubscribeReasonCode>>,
    ) -> u64 {
        self.next_id += 1;
        if kind == AckKind::PubAck {
            self.pubacks += 1;
        }
        self.slots.push_back(Slot {
            id: self.next_id,
            kind,
            pkid,
            packet,
            bus_pending,
            bus_error: None,
            sub_codes,
            swallow: false,
            then: Vec::new(),
        });
        self.next_id
    }

    /// Expects a router acknowledgement the client must not see.
    fn push_swallowed(&mut self, kind: AckKind, pkid: u16) {
        self.push(kind, pkid, None, false);
        if let Some(slot) = self.slots.back_mut() {
            slot.swallow = true;
        }
        if kind == AckKind::PubAck {
            self.pubacks -= 1;
        }
    }

    /// Files the router's ack with the oldest slot waiting for it; gives it back if none is.
    fn router_ack(&mut self, kind: AckKind, pkid: u16, packet: Packet) -> Option<Packet> {
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.kind == kind && s.pkid == pkid && s.packet.is_none())
        else {
            return Some(packet);
        };
        slot.packet = Some(match (packet, slot.sub_codes.is_empty()) {
            (Packet::SubAck(ack, props), false) => {
                let mut routed = ack.return_codes.into_iter();
                let codes = slot
                    .sub_codes
                    .iter()
                    .map(|c| match c {
                        Some(code) => *code,
                        None => routed.next().unwrap_or(SubscribeReasonCode::Unspecified),
                    })
                    .collect();
                Packet::SubAck(
                    SubAck {
                        pkid: ack.pkid,
                        return_codes: codes,
                    },
                    props,
                )
            }
            (p, _) => p,
        });
        None
    }

    /// Retained messages to send once the SUBACK of slot `id` has gone out.
    fn then_send(&mut self, id: u64, deliveries: Vec<Delivery>) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            slot.then = deliveries;
        }
    }

    fn bus_done(&mut self, id: u64, result: Result<(), BusError>) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            slot.bus_pending = false;
            slot.bus_error = result.err();
        }
    }

    fn pop_ready(&mut self) -> Option<Slot> {
        let front = self.slots.front()?;
        if front.packet.is_none() || front.bus_pending {
            return None;
        }
        let slot = self.slots.pop_front()?;
        if slot.kind == AckKind::PubAck && !slot.swallow {
            self.pubacks -= 1;
        }
        Some(slot)
    }
}

/// Packet ids of the client's QoS 2 publishes that are delivered and answered PUBREC but not
/// released (PUBREL) yet: one bit each, so what a client can make the session hold is bounded
/// by the packet-id space (8 KiB), whatever it sends.
#[derive(Default)]
struct PacketIds {
    bits: Option<Box<[u64; 1024]>>,
    len: usize,
}

impl PacketIds {
    fn contains(&self, id: u16) -> bool {
        self.bits
            .as_ref()
            .is_some_and(|b| b[id as usize / 64] & (1 << (id % 64)) != 0)
    }

    fn insert(&mut self, id: u16) {
        let bits = self.bits.get_or_insert_with(|| Box::new([0; 1024]));
        let word = &mut bits[id as usize / 64];
        if *word & (1 << (id % 64)) == 0 {
            *word |= 1 << (id % 64);
            self.len += 1;
        }
    }

    fn remove(&mut self, id: u16) -> bool {
        let Some(bits) = self.bits.as_mut() else {
            return false;
        };
        let word = &mut bits[id as usize / 64];
        let present = *word & (1 << (id % 64)) != 0;
        if present {
            *word &= !(1 << (id % 64));
            self.len -= 1;
        }
        present
    }

    fn len(&self) -> usize {
        self.len
    }

    fn ids(&self) -> Vec<u16> {
        (0..=u16::MAX).filter(|id| self.contains(*id)).collect()
    }

    fn from_ids(ids: &[u16]) -> Self {
        let mut set = Self::default();
        for id in ids {
            set.insert(*id);
        }
        set
    }
}

/// The keep alive a session holds the client to, seconds: what it asked for, unless that is
/// none (0) or more than `max` (0: no bound).
fn held_keep_alive(requested: u16, max: u16) -> u16 {
    match (requested, max) {
        (_, 0) => requested,
        (0, max) => max,
        (r, max) => r.min(max),
    }
}

/// Packet ids of the deliveries a session makes itself start here: the router numbers its own
/// from 1 to 100 (rumqttd's in-flight window), so the two never collide on one connection.
const OWN_PKID_FIRST: u16 = 1024;

/// Most retained messages waiting to be sent to one client (a few per device of a full node).
const MAX_WAITING_RETAINED: usize = 100_000;

/// Most QoS 1 deliveries of the session's own in flight (further bounded by the client's
/// Receive Maximum).
const OWN_WINDOW: usize = 32;

/// Deliveries the session makes itself rather than the router: messages from the device's
/// inbox ([`crate::inbox`]) and retained messages matched by a SUBSCRIBE ([`crate::retained`]).
struct OwnDeliveries {
    /// Retained messages waiting for room in the window, in order.
    waiting: VecDeque<Delivery>,
    /// QoS 1 and 2 deliveries sent and not completed yet (PUBACK, PUBCOMP), in the order sent.
    inflight: Vec<(u16, Delivery)>,
    last_pkid: u16,
    window: usize,
}

impl OwnDeliveries {
    fn new(window: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            inflight: Vec::new(),
            last_pkid: 0,
            window: window.clamp(1, OWN_WINDOW),
        }
    }

    fn room(&self) -> usize {
        self.window.saturating_sub(self.inflight.len())
    }

    /// Files a QoS 1 or 2 delivery as in flight; returns its packet id: the one it was sent
    /// with before, if it is a resend, else the next free one.
    fn track(&mut self, mut delivery: Delivery) -> u16 {
        let before = delivery
            .pkid
            .filter(|p| *p >= OWN_PKID_FIRST && !self.inflight.iter().any(|(q, _)| q == p));
        let pkid = match before {
            Some(p) => p,
            None => loop {
                self.last_pkid = match self.last_pkid {
                    p if p < OWN_PKID_FIRST || p == u16::MAX => OWN_PKID_FIRST,
                    p => p + 1,
                };
                if !self.inflight.iter().any(|(p, _)| *p == self.last_pkid) {
                    break self.last_pkid;
                }
            },
        };
        delivery.pkid = Some(pkid);
        self.inflight.push((pkid, delivery));
        pkid
    }

    /// The client received QoS 2 delivery `pkid` (PUBREC): from now on only its PUBREL is
    /// resent. Returns whether it was one of ours.
    fn received(&mut self, pkid: u16) -> bool {
        match self.inflight.iter_mut().find(|(p, _)| *p == pkid) {
            Some((_, d)) => {
                d.released = true;
                true
            }
            None => false,
        }
    }

    /// The client acknowledged `pkid`; returns whether it was one of ours.
    fn acked(&mut self, pkid: u16) -> bool {
        match self.inflight.iter().position(|(p, _)| *p == pkid) {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// The deliveries sent and not completed, in the order sent, with their packet ids:
    /// retained ones only if released (a retained message is sent again by the next
    /// SUBSCRIBE, but a PUBREL the device waits for must come).
    fn unacknowledged(self) -> Vec<Delivery> {
        self.inflight
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| !d.retained || d.released)
            .collect()
    }
}

type BusFuture = futures::future::BoxFuture<'static, (u64, Result<(), BusError>)>;

struct Session<S> {
    ctx: Arc<Ctx>,
    conn: Conn<S>,
    /// Services' link into the router; devices have none.
    link: Option<Link>,
    /// What CONNACK said: a persistent session was resumed.
    session_present: bool,
    principal: Principal,
    device: Option<DeviceSession>,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    session_expiry: u32,
    /// For a persistent session: how long it is kept once disconnected.
    persistent: Option<Duration>,
    /// The router keeps what it has of the session when the link ends (it was not linked
    /// clean), so a session that ends with its connection must be expired then.
    link_kept: bool,
    /// The router's client id of this session.
    router_id: String,
    keepalive: Option<Duration>,
    kick: mpsc::UnboundedReceiver<DisconnectReason>,
    acks: AckQueue,
    bus: FuturesUnordered<BusFuture>,
    wake_router: bool,
    /// Services only: the QoS 1/2 deliveries the router is waiting on an acknowledgement for,
    /// in the order it sent them (it refuses acknowledgements out of that order), each with
    /// its acknowledgement once there is one. Deliveries the key may not see are acknowledged
    /// here at once and never reach the client.
    outgoing: VecDeque<(u16, Option<Packet>)>,
    /// The client's QoS 2 publishes awaiting its PUBREL (see [`PacketIds`]).
    unreleased: PacketIds,
    /// A DISCONNECT saying why is already queued; [`Session::finish`] adds none.
    disconnect_sent: bool,
    /// The filters this connection subscribed (a hash each, so a long filter costs no more),
    /// bounded by `max_subscriptions`.
    subscriptions: std::collections::HashSet<u64>,
    filter_hasher: std::hash::RandomState,
    own: OwnDeliveries,
    /// A device's publishes for the router's subscribers, sent on the broker's link after the
    /// packets that carried them are handled.
    forward: Vec<(Bytes, Bytes, u8, Option<PublishProperties>)>,
    /// A device's inbox wakes its session through this (see [`crate::inbox`]).
    inbox_wake: Option<mpsc::Receiver<()>>,
    /// Linked sessions: how what the router forwards reaches the client ([`crate::forward`]).
    forwarding: Forwarding,
    /// The router's PUBRELs of QoS 2 deliveries, in the order it sent them (it refuses PUBCOMPs
    /// out of that order), each with its PUBCOMP once there is one.
    rels: VecDeque<(u16, Option<Packet>)>,
    /// Server topic aliases, up to the client's Topic Alias Maximum (MQTT 5).
    aliases: TopicAliases,
    /// The client's Maximum Packet Size (MQTT 5): larger messages are not sent to it.
    client_max_packet: Option<usize>,
    /// The client's Receive Maximum for what the router delivers, and the QoS 1 and 2
    /// deliveries in flight to it; further ones wait in `held`, in order.
    client_receive_max: usize,
    client_inflight: usize,
    held: VecDeque<(Publish, Option<PublishProperties>, u8)>,
}

enum Step {
    Continue,
    End(DisconnectReason),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Links the session into the router, announces presence, and sends CONNACK.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        ctx: Arc<Ctx>,
        mut conn: Conn<S>,
        info: ConnectInfo,
        principal: Principal,
        router_client_id: String,
        device: Option<DeviceSession>,
        assigned_client_id: Option<String>,
        kick: mpsc::UnboundedReceiver<DisconnectReason>,
        provisioned_now: bool,
    ) -> Option<Self> {
        let version = conn.version();
        let session_expiry = info
            .props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);
        let clean_session = info.connect.clean_session;
        let persistent = match version {
            // MQTT 5: the session outlives the connection for as long as the client asked,
            // whatever Clean Start said (which only discards an earlier one) [MQTT-3.1.2-23].
            Version::V5 => (session_expiry > 0).then(|| Duration::from_secs(session_expiry as u64)),
            Version::V311 => (!clean_session).then_some(ctx.settings.max_session_expiry),
        }
        .map(|expiry| expiry.min(ctx.settings.max_session_expiry));
        let topic_alias_max = info
            .props
            .as_ref()
            .and_then(|p| p.topic_alias_max)
            .unwrap_or(0);
        let opts = LinkOptions {
            clean_session: clean_session && persistent.is_none(),
            purge_first: clean_session && persistent.is_some(),
            // The session assigns topic aliases itself (`crate::forward`).
            topic_alias_max: 0,
        };
        let link_kept = !opts.clean_session;
        let client_receive_max = info
            .props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .map_or(OWN_WINDOW, usize::from);
        let client_max_packet = info
            .props
            .as_ref()
            .and_then(|p| p.max_packet_size)
            .map(|m| m as usize);
        let client_receive_max_all = info
            .props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .map_or(usize::from(u16::MAX), usize::from);
        let stored_qos2 = ctx
            .unreleased_qos2
            .remove(&router_client_id)
            .map(|(_, ids)| ids);
        // Services link into the router; devices have no link (their subscriptions are the
        // node's, `crate::inbox`, and what they publish goes through the broker's own link).
        let link = match device {
            Some(_) => None,
            None => match ctx.router.connect(router_client_id.clone(), opts).await {
                Ok(link) => Some(link),
                Err(e) => {
                    warn!(error = %e, "router refused the link");
                    conn.queue(unavailable(version));
                    conn.close(Duration::from_secs(1)).await;
                    return None;
                }
            },
        };
        let requested_keep_alive = info.connect.keep_alive;
        let keep_alive = held_keep_alive(requested_keep_alive, ctx.settings.max_keep_alive);
        let mut session = Session {
            keepalive: (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500)),
            ctx,
            conn,
            link,
            principal,
            device,
            will: info.will,
            session_expiry,
            persistent,
            link_kept,
            kick,
            acks: AckQueue::default(),
            bus: FuturesUnordered::new(),
            wake_router: false,
            outgoing: VecDeque::new(),
            unreleased: PacketIds::default(),
            session_present: false,
            disconnect_sent: false,
            subscriptions: Default::default(),
            filter_hasher: Default::default(),
            own: OwnDeliveries::new(client_receive_max),
            forward: Vec::new(),
            router_id: router_client_id,
            inbox_wake: None,
            forwarding: Forwarding::default(),
            rels: VecDeque::new(),
            aliases: TopicAliases::new(match version {
                Version::V5 => topic_alias_max,
                Version::V311 => 0,
            }),
            client_max_packet,
            client_receive_max: client_receive_max_all,
            client_inflight: 0,
            held: VecDeque::new(),
        };

        if session.device.is_some() {
            // The device is online, durably, before it hears so.
            if let Err(e) = session.presence(PresenceEvent::Connected, None).await {
                warn!(error = %e, "presence not accepted by the event bus; refusing");
                session.conn.queue(unavailable(version));
                session.conn.close(Duration::from_secs(1)).await;
                return None;
            }
        }
        session.session_present = match (&session.link, &session.device) {
            (Some(link), _) => link.session_present,
            (None, Some(d)) => {
                // The device's inbox: resumed if its persistent session was kept, or fresh.
                let attached = session
                    .ctx
                    .local
                    .inboxes
                    .attach(&d.id, d.epoch, clean_session);
                session.inbox_wake = Some(attached.wake);
                attached.resumed
            }
            (None, None) => false,
        };
        // A resumed session resumes its QoS 2 exchanges too.
        if let (true, Some(ids)) = (session.session_present, stored_qos2) {
            session.unreleased = PacketIds::from_ids(&ids);
        }
        let props = (version == Version::V5).then(|| ConnAckProperties {
            assigned_client_identifier: assigned_client_id,
            receive_max: Some(session.ctx.settings.receive_maximum as u16),
            max_packet_size: Some(session.ctx.settings.max_packet_size as u32),
            retain_available: Some(1),
            // Shared subscriptions are the router's, which devices have no link into.
            shared_subscription_available: Some(session.link.is_some() as u8),
            // [MQTT-3.2.2-21]: the client uses the server's value from now on.
            server_keep_alive: (keep_alive != requested_keep_alive).then_some(keep_alive),
            ..Default::default()
        });
        session.conn.queue(Packet::ConnAck(
            ConnAck {
                session_present: session.session_present,
                code: ConnectReturnCode::Success,
            },
            props,
        ));
        if session.conn.flush().await.is_err() {
            session
                .finish(DisconnectReason::ConnectionLost, false)
                .await;
            return None;
        }
        session.ctx.control.metrics.session_opened();
        info!(
            protocol = version.as_str(),
            provisioned_now, "session started"
        );
        Some(session)
    }

    async fn run(mut self) {
        let mut shutdown = self.ctx.shutdown.clone();
        let mut last_read = tokio::time::Instant::now();
        let max_pending = self.ctx.settings.receive_maximum;
        let (reason, router_dropped) = loop {
            let can_read = self.acks.len() < max_pending && self.bus.len() < max_pending;
            if !can_read {
                // Not reading is the broker's doing (answers wait for the bus): the client's
                // keepalive counts from when the session reads again.
                last_read = tokio::time::Instant::now();
            }
            let keepalive_deadline = self.keepalive.map(|k| last_read + k);
            tokio::select! {
                reason = self.kick.recv() => {
                    break (reason.unwrap_or(DisconnectReason::ServerShutdown), false);
                }
                _ = wait_true(&mut shutdown) => break (DisconnectReason::ServerShutdown, false),
                read = self.conn.fill(), if can_read => {
                    last_read = tokio::time::Instant::now();
                    let step = match read {
                        Ok(()) => self.on_readable().await,
                        Err(ReadError::Closed) => Step::End(DisconnectReason::ConnectionLost),
                        Err(e) => {
                            debug!(error = %e, "read failed");
                            Step::End(DisconnectReason::ConnectionLost)
                        }
                    };
                    if let Step::End(reason) = step {
                        break (reason, false);
                    }
                }
                out = next_from(&mut self.link) => match out {
                    Ok(first) => {
                        if let Step::End(reason) = self.on_router(first).await {
                            break (reason, true);
                        }
                    }
                    Err(_) => break (DisconnectReason::Takeover, true),
                },
                Some(()) = recv_opt(&mut self.inbox_wake), if self.own.room() > 0 => {
                    self.pull_own();
                    if self.conn.has_queued() && self.conn.flush().await.is_err() {
                        break (DisconnectReason::ConnectionLost, false);
                    }
                }
                Some((slot, result)) = self.bus.next(), if !self.bus.is_empty() => {
                    self.ctx.control.metrics.bus_event(result.is_ok());
                    if let Err(e) = &result {
                        warn!(error = %e, "event not accepted by the bus; not acknowledging it");
                    }
                    self.acks.bus_done(slot, result);
                    if let Step::End(reason) = self.flush_acks().await {
                        break (reason, false);
                    }
                }
                _ = sleep_until_opt(keepalive_deadline) => {
                    break (DisconnectReason::KeepaliveTimeout, false);
                }
            }
        };
        // Boxed: ending a session is rare and its state would otherwise be part of every
        // connected session's task.
        Box::pin(self.finish(reason, router_dropped)).await;
    }

    /// Decodes and handles every complete packet in the read buffer.
    async fn on_readable(&mut self) -> Step {
        let mut to_router = Vec::new();
        let mut step = Step::Continue;
        loop {
            match self.conn.next_packet() {
                Ok(Some((info, packet))) => {
                    if let Step::End(reason) = self.on_packet(info, packet, &mut to_router) {
                        step = Step::End(reason);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    info!(error = %e, "malformed input; closing");
                    let (code, why) = match e {
                        ReadError::TooLarge(_) => {
                            (DisconnectReasonCode::PacketTooLarge, Rejection::OverLimit)
                        }
                        ReadError::Invalid(v @ Violation::OverLimit(_)) => {
                            (disconnect_code(v), Rejection::OverLimit)
                        }
                        ReadError::Invalid(v) => (disconnect_code(v), Rejection::MalformedPacket),
                        _ => (
                            DisconnectReasonCode::MalformedPacket,
                            Rejection::MalformedPacket,
                        ),
                    };
                    step = self.violation(code, why);
                    break;
                }
            }
        }
        if self.send_to_router(to_router).await.is_err() {
            return Step::End(DisconnectReason::ServerShutdown);
        }
        if let Step::End(reason) = self.flush_acks().await {
            return Step::End(reason);
        }
        step
    }

    /// Hands packets to the router: on a service's own link, or for a device's publishes
    /// (queued by [`Session::on_publish`]) on the broker's link.
    async fn send_to_router(&mut self, packets: Vec<Packet>) -> Result<(), RouterError> {
        for (topic, payload, qos, props) in std::mem::take(&mut self.forward) {
            self.ctx.system.forward(topic, payload, qos, props).await;
        }
        match &mut self.link {
            Some(link) if !packets.is_empty() => link.send(packets).await,
            _ => Ok(()),
        }
    }

    /// Ends the session for a protocol violation, telling an MQTT 5 client why.
    fn violation(&mut self, code: DisconnectReasonCode, why: Rejection) -> Step {
        self.ctx.control.metrics.reject(why);
        if self.conn.version() == Version::V5 {
            self.conn.queue(server_disconnect(code));
            self.disconnect_sent = true;
        }
        Step::End(DisconnectReason::ProtocolError)
    }

    /// What [`Session::subscriptions`] keeps of a filter.
    fn filter_key(&self, filter: &str) -> u64 {
        use std::hash::BuildHasher;
        self.filter_hasher.hash_one(filter)
    }

    /// Inbound QoS 1 publishes not acknowledged and QoS 2 ones not released: what Receive
    /// Maximum bounds.
    fn in_flight(&self) -> usize {
        self.acks.unacknowledged_qos1() + self.unreleased.len()
    }

    fn on_packet(&mut self, info: FrameInfo, packet: Packet, to_router: &mut Vec<Packet>) -> Step {
        match packet {
            Packet::Publish(publish, props) => self.on_publish(info, publish, props, to_router),
            Packet::Subscribe(subscribe, props) => {
                self.on_subscribe(subscribe, props, to_router);
                Step::Continue
            }
            Packet::Unsubscribe(mut unsubscribe, props) => {
                let pkid = unsubscribe.pkid;
                for f in &unsubscribe.filters {
                    let key = self.filter_key(f);
                    self.subscriptions.remove(&key);
                    self.forwarding.unsubscribed(f);
                }
                let reasons = vec![UnsubAckReason::Success; unsubscribe.filters.len()];
                // A device's filters live in its inbox, a service's in the router.
                if let Some(d) = &self.device {
                    for f in unsubscribe.filters.drain(..) {
                        self.ctx.local.inboxes.unsubscribe(&d.id, d.epoch, &f);
                    }
                }
                if self.link.as_ref().is_some_and(|l| l.session_present) {
                    // rumqttd restores a resumed session's subscriptions without indexing them
                    // under the new connection, so its UNSUBSCRIBE would remove nothing.
                    // Subscribing again re-indexes them (no new data request, no retained
                    // replay); that SUBACK stays between the session and the router.
                    let filters = unsubscribe
                        .filters
                        .iter()
                        .filter(|f| {
                            acl::may_subscribe(&self.principal, f, &*self.ctx.control.registry)
                        })
                        .map(|f| Filter {
                            path: f.clone(),
                            qos: QoS::AtMostOnce,
                            nolocal: false,
                            preserve_retain: false,
                            retain_forward_rule: RetainForwardRule::Never,
                        })
                        .collect::<Vec<_>>();
                    if !filters.is_empty() {
                        to_router.push(Packet::Subscribe(Subscribe { pkid, filters }, None));
                        self.acks.push_swallowed(AckKind::SubAck, pkid);
                    }
                }
                // The router answers one UNSUBACK per removed filter and none for unknown
                // ones; the client gets exactly one, from here.
                if !unsubscribe.filters.is_empty() {
                    to_router.push(Packet::Unsubscribe(unsubscribe, props));
                }
                let ack = Packet::UnsubAck(UnsubAck { pkid, reasons }, None);
                self.acks.push(AckKind::SubAck, pkid, Some(ack), false);
                Step::Continue
            }
            Packet::PingReq(_) => {
                self.conn.queue(Packet::PingResp(PingResp));
                Step::Continue
            }
            Packet::PubAck(ack, _) if ack.pkid >= OWN_PKID_FIRST => {
                if !self.own.acked(ack.pkid) {
                    debug!(pkid = ack.pkid, "PUBACK for nothing in flight; ignored");
                }
                self.pull_own();
                Step::Continue
            }
            // The session's own QoS 2 deliveries: PUBREL, then done at PUBCOMP.
            Packet::PubRec(rec, _) if rec.pkid >= OWN_PKID_FIRST => {
                if !self.own.received(rec.pkid) {
                    debug!(
                        pkid = rec.pkid,
                        "PUBREC for nothing in flight; released anyway"
                    );
                }
                self.conn.queue(forward::pubrel(rec.pkid));
                Step::Continue
            }
            Packet::PubComp(comp, _) if comp.pkid >= OWN_PKID_FIRST => {
                if !self.own.acked(comp.pkid) {
                    debug!(pkid = comp.pkid, "PUBCOMP for nothing in flight; ignored");
                }
                self.pull_own();
                Step::Continue
            }
            Packet::PubComp(comp, _) if self.link.is_some() => {
                self.client_done();
                match self
                    .rels
                    .iter_mut()
                    .find(|(id, c)| *id == comp.pkid && c.is_none())
                {
                    Some(slot) => slot.1 = Some(Packet::PubComp(comp, None)),
                    None => to_router.push(Packet::PubComp(comp, None)),
                }
                self.release_outgoing(to_router);
                Step::Continue
            }
            p @ (Packet::PubAck(..) | Packet::PubRec(..)) if self.link.is_some() => {
                let pkid = match &p {
                    Packet::PubAck(a, _) => a.pkid,
                    Packet::PubRec(a, _) => a.pkid,
                    _ => unreachable!("matched above"),
                };
                let p = match p {
                    Packet::PubAck(..) => {
                        self.client_done();
                        if self.forwarding.puback_is_pubrec.remove(&pkid) {
                            // Delivered at QoS 1 of the router's QoS 2: the router's exchange
                            // goes on with the session (`crate::forward`).
                            self.forwarding.completes.insert(pkid);
                            forward::pubrec(pkid)
                        } else {
                            p
                        }
                    }
                    p => p,
                };
                match self
                    .outgoing
                    .iter_mut()
                    .find(|(id, ack)| *id == pkid && ack.is_none())
                {
                    Some(slot) => slot.1 = Some(p),
                    None => to_router.push(p),
                }
                self.release_outgoing(to_router);
                Step::Continue
            }
            Packet::PubRel(rel, _) => {
                // The publish went to the router when it arrived; what remains is its id.
                let reason = match self.unreleased.remove(rel.pkid) {
                    true => PubCompReason::Success,
                    false => PubCompReason::PacketIdentifierNotFound,
                };
                let comp = Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                );
                self.acks
                    .push(AckKind::PubComp, rel.pkid, Some(comp), false);
                Step::Continue
            }
            p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                to_router.push(p);
                Step::Continue
            }
            Packet::Disconnect(d, props) => {
                if let Some(expiry) = props.and_then(|p| p.session_expiry_interval) {
                    if self.session_expiry == 0 && expiry > 0 {
                        // [MQTT-3.14.2-2]: a session that was to end with the connection
                        // cannot be made to outlive it on the way out.
                        return self.violation(
                            DisconnectReasonCode::ProtocolError,
                            Rejection::MalformedPacket,
                        );
                    }
                    self.session_expiry = expiry;
                    self.persistent = (expiry > 0).then(|| {
                        Duration::from_secs(expiry as u64).min(self.ctx.settings.max_session_expiry)
                    });
                }
                if d.reason_code != DisconnectReasonCode::DisconnectWithWillMessage {
                    self.will = None;
                }
                Step::End(DisconnectReason::Client)
            }
            other => {
                info!(packet = ?packet_name(&other), "unexpected packet; closing");
                Step::End(DisconnectReason::ProtocolError)
            }
        }
    }

    fn on_publish(
        &mut self,
        info: FrameInfo,
        mut publish: Publish,
        props: Option<PublishProperties>,
        to_router: &mut Vec<Packet>,
    ) -> Step {
        let v5 = self.conn.version() == Version::V5;
        if info.qos == 2 && self.unreleased.contains(info.pkid) {
            // A resend of a QoS 2 publish not released yet: it was delivered (and made
            // durable) when it first came; only its PUBREC is repeated.
            let rec = Packet::PubRec(
                PubRec {
                    pkid: info.pkid,
                    reason: PubRecReason::Success,
                },
                None,
            );
            self.acks.push(AckKind::PubRec, info.pkid, Some(rec), false);
            return Step::Continue;
        }
        if info.qos > 0 && v5 && self.in_flight() >= self.ctx.settings.receive_maximum {
            info!("publish refused: Receive Maximum exceeded");
            return self.violation(
                DisconnectReasonCode::ReceiveMaximumExceeded,
                Rejection::OverLimit,
            );
        }
        let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
        let parsed = match Topic::parse(topic) {
            Ok(t) => Some(t),
            Err(e @ TopicError::BadAppPath(_)) => {
                // Under some device's `app/`, but beyond its bounds (depth, level length).
                self.ctx.control.metrics.reject(Rejection::ForbiddenTopic);
                info!(topic, error = %e, "publish refused: invalid application topic");
                return self.refuse_publish(
                    info,
                    PubAckReason::TopicNameInvalid,
                    PubRecReason::TopicNameInvalid,
                );
            }
            Err(_) => None,
        };
        let places = &*self.ctx.control.registry;
        let allowed = match &parsed {
            Some(t) => {
                acl::may_publish_topic(&self.principal, t, places)
                    && (!publish.retain || acl::may_retain(t))
            }
            // Only the conformance listener has topics outside the platform's contract.
            None => acl::may_publish(&self.principal, topic, places),
        };
        if !allowed {
            self.ctx.control.metrics.reject(Rejection::ForbiddenTopic);
            info!(
                topic,
                retain = publish.retain,
                "publish refused: topic is forbidden for this client"
            );
            return self.refuse_publish(
                info,
                PubAckReason::NotAuthorized,
                PubRecReason::NotAuthorized,
            );
        }
        self.ctx.control.metrics.publish_in();
        let durable = self.device.is_some() && parsed.as_ref().is_some_and(Topic::is_durable_event);
        if durable {
            if let Some(t) = &parsed {
                if let Err(e) = fleet_wire::payload::validate_device_payload(t, &publish.payload) {
                    self.ctx.control.metrics.reject(Rejection::BadPayload);
                    info!(topic, error = %e, "publish refused: bad payload");
                    return self.refuse_publish(
                        info,
                        PubAckReason::PayloadFormatInvalid,
                        PubRecReason::PayloadFormatInvalid,
                    );
                }
            }
        }
        // Retained copies and messages for one device's own subscriptions are the node's
        // (`crate::local`); the router gets the publish without its retain flag.
        self.ctx.local.publish(
            topic,
            parsed.as_ref(),
            &publish.payload,
            info.qos,
            publish.retain,
            props.as_ref(),
            self.device.as_ref().map(|d| &d.id),
        );
        let bus_slot = durable.then(|| {
            let device = self.device.as_mut().expect("durable implies device");
            device.seq += 1;
            // A QoS 1/2 publish is named by what the device repeats when it resends it (to
            // this node or, after a crash, another), a QoS 0 one by this session.
            let id = match info.qos {
                0 => event_id::unacknowledged(device.id.as_str(), device.epoch, device.seq),
                _ => event_id::publish(device.id.as_str(), topic, info.pkid, &publish.payload),
            };
            BusMessage {
                topic: topic.to_owned(),
                payload: publish.payload.clone(),
                epoch: device.epoch,
                seq: device.seq,
                received_at_ms: now_ms(),
                // The bus stamps the node it runs on.
                node: Default::default(),
                id,
            }
        });
        let kind = match info.qos {
            1 => Some(AckKind::PubAck),
            2 => Some(AckKind::PubRec),
            _ => None,
        };
        // A service's publish is acknowledged by the router on its link. A device's goes on
        // the broker's link, whose acknowledgement would say no more than "queued in memory":
        // the session answers it, once the bus has the event.
        let own_ack = self.link.is_none().then(|| match info.qos {
            2 => Packet::PubRec(
                PubRec {
                    pkid: info.pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ),
            _ => Packet::PubAck(
                PubAck {
                    pkid: info.pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
        });
        let slot = kind.map(|k| self.acks.push(k, info.pkid, own_ack, bus_slot.is_some()));
        if let Some(msg) = bus_slot {
            let fut = self.ctx.bus.publish(msg);
            let id = slot.unwrap_or(0);
            self.bus.push(fut.map(move |r| (id, r)).boxed());
        }
        if info.qos == 2 {
            // Delivered now, not on PUBREL (the specification's second method): nothing keeps
            // a copy while the client takes its time, and the session only the id.
            self.unreleased.insert(info.pkid);
        }
        if self.link.is_none() {
            self.forward
                .push((publish.topic, publish.payload, info.qos, props));
            return Step::Continue;
        }
        let retain = std::mem::take(&mut publish.retain);
        let mut props = props;
        if matches!(self.principal, Principal::Conformance(_)) {
            Mark {
                qos: info.qos,
                retain,
                origin: self.router_id.clone(),
            }
            .put(&mut props);
        }
        to_router.push(Packet::Publish(publish, props));
        if info.qos == 2 {
            to_router.push(forward::pubrel(info.pkid));
            self.acks.push_swallowed(AckKind::PubComp, info.pkid);
        }
        Step::Continue
    }

    fn refuse_publish(
        &mut self,
        info: FrameInfo,
        puback: PubAckReason,
        pubrec: PubRecReason,
    ) -> Step {
        if self.conn.version() == Version::V311 {
            // MQTT 3.1.1 has no negative acknowledgement: closing is the only answer.
            return Step::End(DisconnectReason::NotAuthorized);
        }
        let pkid = info.pkid;
        match info.qos {
            1 => {
                let ack = Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: puback,
                    },
                    None,
                );
                self.acks.push(AckKind::PubAck, pkid, Some(ack), false);
            }
            2 => {
                let ack = Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: pubrec,
                    },
                    None,
                );
                self.acks.push(AckKind::PubRec, pkid, Some(ack), false);
            }
            _ => {}
        }
        Step::Continue
    }

    fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        props: Option<SubscribeProperties>,
        to_router: &mut Vec<Packet>,
    ) {
        let denied = match self.conn.version() {
            Version::V311 => SubscribeReasonCode::Failure,
            Version::V5 => SubscribeReasonCode::NotAuthorized,
        };
        let pkid = subscribe.pkid;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::new();
        let mut retained = Vec::new();
        let service = matches!(self.principal, Principal::Service(_));
        // What the router delivers to these is narrowed per message (`acl::may_receive`).
        let narrowed = self.link.is_some();
        let full = match self.conn.version() {
            Version::V311 => SubscribeReasonCode::Failure,
            Version::V5 => SubscribeReasonCode::QuotaExceeded,
        };
        for mut filter in subscribe.filters {
            if !acl::may_subscribe(&self.principal, &filter.path, &*self.ctx.control.registry) {
                self.ctx.control.metrics.reject(Rejection::ForbiddenTopic);
                info!(filter = %filter.path, "subscription refused: filter is forbidden for this client");
                let code = match &self.principal {
                    // The filters a conformance suite expects refused get the plain failure.
                    Principal::Conformance(r) if r.lists(&filter.path) => {
                        SubscribeReasonCode::Failure
                    }
                    _ => denied,
                };
                codes.push(Some(code));
                continue;
            }
            let key = self.filter_key(&filter.path);
            let new = !self.subscriptions.contains(&key);
            if new && self.subscriptions.len() >= self.ctx.settings.max_subscriptions {
                self.ctx.control.metrics.reject(Rejection::OverLimit);
                info!(filter = %filter.path, "subscription refused: too many subscriptions");
                codes.push(Some(full));
                continue;
            }
            self.subscriptions.insert(key);
            if narrowed {
                self.forwarding
                    .subscribed(&filter.path, filter.nolocal, filter.preserve_retain);
            }
            if service && filter.qos == QoS::ExactlyOnce {
                // What a service filter delivers is narrowed per message, and a QoS 2
                // delivery cannot be dropped halfway; QoS 1 ones are acknowledged to the
                // router in the client's stead.
                filter.qos = QoS::AtLeastOnce;
            }
            let granted = match &self.device {
                // What a device subscribes is served from its inbox; it has no router link.
                Some(d) => {
                    let qos = self.ctx.local.inboxes.subscribe(
                        &d.id,
                        d.epoch,
                        &filter.path,
                        filter.qos as u8,
                        filter.nolocal,
                    );
                    codes.push(Some(SubscribeReasonCode::Success(qos_of(qos))));
                    qos
                }
                _ => {
                    codes.push(None);
                    filter.qos as u8
                }
            };
            let replay = match filter.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => true,
                RetainForwardRule::OnNewSubscribe => new,
                RetainForwardRule::Never => false,
            };
            // Shared subscriptions get no retained messages.
            if replay && !filter.path.starts_with("$share/") {
                for message in self.ctx.local.retained.matching(&filter.path) {
                    if narrowed
                        && !acl::may_receive(
                            &self.principal,
                            &message.topic,
                            &*self.ctx.control.registry,
                        )
                    {
                        continue;
                    }
                    let qos = message.qos.min(granted);
                    retained.push(Delivery::new(message, qos, true));
                }
            }
            if codes.last().is_some_and(Option::is_none) {
                allowed.push(filter);
            }
        }
        let slot = if allowed.is_empty() {
            let codes = codes.into_iter().map(|c| c.unwrap_or(denied)).collect();
            let ack = Packet::SubAck(
                SubAck {
                    pkid,
                    return_codes: codes,
                },
                None,
            );
            self.acks.push(AckKind::SubAck, pkid, Some(ack), false)
        } else {
            to_router.push(Packet::Subscribe(
                Subscribe {
                    pkid,
                    filters: allowed,
                },
                props,
            ));
            self.acks
                .push_sub(AckKind::SubAck, pkid, None, false, codes)
        };
        if !retained.is_empty() {
            self.acks.then_send(slot, retained);
        }
    }

    /// Sends what the session delivers itself, as far as its window allows: retained messages
    /// a SUBSCRIBE matched first, then the device's inbox. Queues; the caller writes.
    fn pull_own(&mut self) {
        let mut room = self.own.room();
        while room > 0 {
            let Some(d) = self.own.waiting.pop_front() else {
                break;
            };
            self.send_own(d);
            room -= 1;
        }
        if room == 0 {
            return;
        }
        if let Some(dev) = &self.device {
            for d in self.ctx.local.inboxes.take(&dev.id, dev.epoch, room) {
                self.send_own(d);
            }
        }
    }

    fn send_own(&mut self, d: Delivery) {
        let pkid = match d.qos {
            0 => 0,
            _ => self.own.track(d.clone()),
        };
        if d.released {
            // Received by the device before it reconnected: only the release is repeated.
            self.conn.queue(forward::pubrel(pkid));
            return;
        }
        let m = &d.message;
        let publish = publish_with_qos(&m.topic, &m.payload, d.qos, pkid, d.retained, d.dup);
        let props = match self.conn.version() {
            Version::V5 => m.props.clone(),
            Version::V311 => None,
        };
        if self.queue_delivery(publish, props).is_err() && pkid != 0 {
            // Too large for the client: never sent, so never waited for.
            self.own.acked(pkid);
        }
    }

    /// Queues a delivery to the client: with a server topic alias if it allows them, and not
    /// at all (`Err`) if it is larger than the client's Maximum Packet Size [MQTT-3.1.2-25].
    /// Returns the QoS and packet id it was (or would have been) written with.
    fn queue_delivery(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
    ) -> Result<Option<FrameInfo>, FrameInfo> {
        if self.conn.version() == Version::V5 {
            let topic = std::str::from_utf8(&publish.topic).unwrap_or_default();
            if let Some((alias, known)) = self.aliases.alias(topic) {
                props.get_or_insert_with(Default::default).topic_alias = Some(alias);
                if known {
                    publish.topic = Bytes::new();
                }
            }
        }
        self.conn
            .queue_publish_within(Packet::Publish(publish, props), self.client_max_packet)
    }

    /// A QoS 1 or 2 delivery of the router's is complete on the client's side: the next one
    /// held back by its Receive Maximum goes out.
    fn client_done(&mut self) {
        self.client_inflight = self.client_inflight.saturating_sub(1);
        while self.client_inflight < self.client_receive_max {
            let Some((publish, props, qos)) = self.held.pop_front() else {
                break;
            };
            if qos > 0 {
                self.client_inflight += 1;
            }
            if let Err(dropped) = self.queue_delivery(publish, props) {
                self.dropped_at_send(dropped);
            }
        }
    }

    /// A router delivery filed as the client's to acknowledge turned out too large to send:
    /// the session acknowledges it to the router instead, as if delivered [MQTT-3.1.2-25].
    fn dropped_at_send(&mut self, dropped: FrameInfo) {
        if dropped.qos == 0 {
            return;
        }
        self.client_inflight = self.client_inflight.saturating_sub(1);
        let pkid = dropped.pkid;
        let rec = dropped.qos == 2 || self.forwarding.puback_is_pubrec.remove(&pkid);
        let ack = match rec {
            true => {
                self.forwarding.completes.insert(pkid);
                forward::pubrec(pkid)
            }
            false => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
        };
        if let Some(slot) = self
            .outgoing
            .iter_mut()
            .find(|(id, a)| *id == pkid && a.is_none())
        {
            slot.1 = Some(ack);
        }
    }

    /// Sends a router delivery the client is to get now (or holds it back while the client's
    /// Receive Maximum is reached).
    fn send_forward(&mut self, publish: Publish, props: Option<PublishProperties>, qos: u8) {
        if !self.held.is_empty() || (qos > 0 && self.client_inflight >= self.client_receive_max) {
            self.held.push_back((publish, props, qos));
            return;
        }
        if qos > 0 {
            self.client_inflight += 1;
        }
        if let Err(dropped) = self.queue_delivery(publish, props) {
            self.dropped_at_send(dropped);
        }
    }

    /// What the router forwards to a linked client: narrowed to what it may see, at the QoS,
    /// RETAIN and No Local its subscription says ([`crate::forward`]), answered to the router
    /// in its stead where the client's exchange is shorter.
    fn on_forward(&mut self, publish: Publish, mut props: Option<PublishProperties>) {
        let mark = Mark::take(&mut props);
        let visible = self.may_receive(&publish);
        if mark.is_none()
            && visible
            && self.held.is_empty()
            && self.client_inflight < self.client_receive_max
        {
            // What services get: as the router sent it, encoded once.
            match self.queue_delivery(publish, props) {
                Ok(Some(h)) if h.qos > 0 => {
                    self.outgoing.push_back((h.pkid, None));
                    self.client_inflight += 1;
                }
                Ok(_) => {}
                Err(too_large) => self.stand_in(too_large.qos, too_large.pkid, None),
            }
            return;
        }
        let header = Conn::<S>::publish_header(Packet::Publish(publish.clone(), None));
        let Some(header) = header else {
            return;
        };
        let topic = std::str::from_utf8(&publish.topic).unwrap_or_default();
        let verdict =
            self.forwarding
                .decide(&self.router_id, topic, header.qos, mark.as_ref(), visible);
        // (A message too large for the client is found so when sent: `dropped_at_send`.)
        let (client_qos, publish) = match verdict {
            Verdict::Drop => (None, None),
            Verdict::Deliver { qos, retain } => {
                let rebuilt = (qos != header.qos || retain).then(|| {
                    let pkid = if qos > 0 { header.pkid } else { 0 };
                    publish_with_qos(topic, &publish.payload, qos, pkid, retain, false)
                });
                (Some(qos), Some(rebuilt.unwrap_or(publish)))
            }
        };
        self.stand_in(header.qos, header.pkid, client_qos);
        if let (Some(publish), Some(qos)) = (publish, client_qos) {
            self.send_forward(publish, props, qos);
        }
    }

    /// Files what the router is owed for its delivery `pkid` at `router_qos`, which the client
    /// gets at `client_qos` (or not at all), in the order the router sent its deliveries.
    fn stand_in(&mut self, router_qos: u8, pkid: u16, client_qos: Option<u8>) {
        if router_qos == 0 {
            return;
        }
        let stand_in = StandIn::of(router_qos, client_qos);
        match stand_in {
            StandIn::PubRec => {
                self.forwarding.completes.insert(pkid);
            }
            StandIn::PubAckIsPubRec => {
                self.forwarding.puback_is_pubrec.insert(pkid);
            }
            StandIn::Client | StandIn::PubAck => {}
        }
        self.outgoing.push_back((pkid, stand_in.now(pkid)));
    }

    /// Handles what the router sent, and whatever else it has ready, then writes.
    async fn on_router(&mut self, first: FromRouter) -> Step {
        let mut next = Some(Ok(first));
        let mut acks_for_router = Vec::new();
        while let Some(item) = next.take() {
            match item {
                Ok(FromRouter::Forward(Packet::Publish(publish, props))) if self.link.is_some() => {
                    self.on_forward(publish, props);
                }
                Ok(FromRouter::Forward(p)) => self.conn.queue(p),
                Ok(FromRouter::Ack(p)) => {
                    let filed = match &p {
                        Packet::PubAck(a, _) => {
                            self.acks.router_ack(AckKind::PubAck, a.pkid, p.clone())
                        }
                        Packet::PubRec(a, _) => {
                            self.acks.router_ack(AckKind::PubRec, a.pkid, p.clone())
                        }
                        Packet::SubAck(a, _) => {
                            self.acks.router_ack(AckKind::SubAck, a.pkid, p.clone())
                        }
                        Packet::PubComp(a, _) => {
                            self.acks.router_ack(AckKind::PubComp, a.pkid, p.clone())
                        }
                        // Answered by the session itself.
                        Packet::UnsubAck(..) | Packet::PingResp(..) => None,
                        Packet::PubRel(r, _) => {
                            let comp = self
                                .forwarding
                                .completes
                                .remove(&r.pkid)
                                .then(|| forward::pubcomp(r.pkid));
                            let to_client = comp.is_none().then(|| p.clone());
                            self.rels.push_back((r.pkid, comp));
                            to_client
                        }
                        _ => Some(p.clone()),
                    };
                    if let Some(p) = filed {
                        self.conn.queue(p);
                    }
                }
                Ok(FromRouter::Unschedule) => self.wake_router = true,
                Ok(FromRouter::Disconnect(p)) => {
                    if self.conn.version() == Version::V5 {
                        self.conn.queue(p);
                    }
                    return Step::End(DisconnectReason::ProtocolError);
                }
                Err(_) => return Step::End(DisconnectReason::Takeover),
            }
            next = self.link.as_mut().and_then(Link::try_next);
        }
        self.release_outgoing(&mut acks_for_router);
        if self.send_to_router(acks_for_router).await.is_err() {
            return Step::End(DisconnectReason::ServerShutdown);
        }
        if let Step::End(reason) = self.flush_acks().await {
            return Step::End(reason);
        }
        if std::mem::take(&mut self.wake_router) {
            if let Some(link) = &self.link {
                if link.wake().await.is_err() {
                    return Step::End(DisconnectReason::Takeover);
                }
            }
        }
        Step::Continue
    }

    /// Moves the acknowledgements at the front of `outgoing` that are ready to `to_router`, in
    /// the order the router sent the deliveries.
    fn release_outgoing(&mut self, to_router: &mut Vec<Packet>) {
        for queue in [&mut self.outgoing, &mut self.rels] {
            while queue.front().is_some_and(|(_, ack)| ack.is_some()) {
                if let Some((_, Some(ack))) = queue.pop_front() {
                    to_router.push(ack);
                }
            }
        }
    }

    /// Whether a publish the router forwards may reach this client (services see only their
    /// key's organization and scope; see [`acl::may_receive`]).
    fn may_receive(&self, publish: &Publish) -> bool {
        match &self.principal {
            Principal::Device { .. } => true,
            Principal::Service(_) | Principal::Conformance(_) => {
                std::str::from_utf8(&publish.topic).is_ok_and(|t| {
                    acl::may_receive(&self.principal, t, &*self.ctx.control.registry)
                })
            }
        }
    }

    /// Moves every acknowledgement that is ready, in order, to the socket, and writes.
    async fn flush_acks(&mut self) -> Step {
        while let Some(mut slot) = self.acks.pop_ready() {
            if slot.swallow {
                continue;
            }
            if !slot.then.is_empty() {
                // A client that subscribes again and again without acknowledging cannot make
                // the session hold more replays than this.
                let room = MAX_WAITING_RETAINED.saturating_sub(self.own.waiting.len());
                if slot.then.len() > room {
                    warn!(
                        dropped = slot.then.len() - room,
                        "retained messages not sent: too many already waiting for this client"
                    );
                }
                let then = std::mem::take(&mut slot.then);
                self.own.waiting.extend(then.into_iter().take(room));
            }
            let mut packet = slot.packet.expect("ready slot has a packet");
            if let Some(err) = slot.bus_error {
                if slot.kind == AckKind::PubRec {
                    // Refused: the exchange ends here and the id is free again.
                    self.unreleased.remove(slot.pkid);
                }
                if self.conn.version() == Version::V311 {
                    // Never acknowledge what was not accepted; the client will resend it.
                    return Step::End(match err {
                        BusError::Closed => DisconnectReason::ServerShutdown,
                        BusError::Rejected(_) => DisconnectReason::NotAuthorized,
                    });
                }
                let (pk, pr) = match err {
                    BusError::Closed => (
                        PubAckReason::UnspecifiedError,
                        PubRecReason::UnspecifiedError,
                    ),
                    BusError::Rejected(_) => (
                        PubAckReason::ImplementationSpecificError,
                        PubRecReason::ImplementationSpecificError,
                    ),
                };
                packet = match packet {
                    Packet::PubAck(a, _) => Packet::PubAck(
                        PubAck {
                            pkid: a.pkid,
                            reason: pk,
                        },
                        None,
                    ),
                    Packet::PubRec(a, _) => Packet::PubRec(
                        PubRec {
                            pkid: a.pkid,
                            reason: pr,
                        },
                        None,
                    ),
                    p => p,
                };
            }
            let then = !self.own.waiting.is_empty();
            self.conn.queue(packet);
            if then {
                self.pull_own();
            }
        }
        if self.conn.has_queued() && self.conn.flush().await.is_err() {
            return Step::End(DisconnectReason::ConnectionLost);
        }
        Step::Continue
    }

    async fn presence(
        &mut self,
        event: PresenceEvent,
        reason: Option<DisconnectReason>,
    ) -> Result<(), BusError> {
        let Some(d) = &self.device else {
            return Ok(());
        };
        let presence = Presence {
            device_id: d.id.clone(),
            event,
            epoch: d.epoch,
            ts_ms: now_ms(),
            connected_at_ms: d.connected_at_ms,
            reason,
            remote_addr: Some(d.remote_addr.clone()),
            protocol: Some(self.conn.version().as_str().to_owned()),
        };
        let payload = Bytes::from(serde_json::to_vec(&presence).expect("presence serialises"));
        let topic = Topic::Presence(d.id.clone()).to_string();
        let msg = BusMessage {
            topic: topic.clone(),
            payload: payload.clone(),
            epoch: d.epoch,
            seq: 0,
            received_at_ms: presence.ts_ms,
            node: Default::default(),
            id: event_id::presence(d.id.as_str(), d.epoch, event == PresenceEvent::Connected),
        };
        let again = (event == PresenceEvent::Disconnected).then(|| msg.clone());
        let accepted =
            tokio::time::timeout(self.ctx.settings.bus_timeout, self.ctx.bus.publish(msg))
                .await
                .unwrap_or(Err(BusError::Closed));
        if let (Err(BusError::Closed), Some(msg)) = (&accepted, again) {
            // Nobody waits for a disconnect, but it must not be lost while the bus is away (the
            // device would stay online): it goes on trying in the background, under the same
            // event id, so it is stored once.
            let publish = self.ctx.bus.publish(msg);
            tokio::spawn(async move {
                if let Err(e) = publish.await {
                    warn!(error = %e, "a disconnect the bus refused");
                }
            });
        }
        self.ctx.control.metrics.bus_event(accepted.is_ok());
        self.ctx.system.publish(topic, payload, 1, true).await;
        accepted
    }

    async fn finish(mut self, reason: DisconnectReason, router_dropped: bool) {
        if let (Some(link), false) = (&mut self.link, router_dropped) {
            let _ = link.send(vec![disconnect_packet()]).await;
        }
        if self.conn.version() == Version::V5 && !self.disconnect_sent {
            let code = match reason {
                DisconnectReason::Takeover => Some(DisconnectReasonCode::SessionTakenOver),
                DisconnectReason::Revoked | DisconnectReason::Reassigned => {
                    Some(DisconnectReasonCode::AdministrativeAction)
                }
                DisconnectReason::ServerShutdown
                | DisconnectReason::ServerRestart
                | DisconnectReason::NodeLost => Some(DisconnectReasonCode::ServerShuttingDown),
                DisconnectReason::KeepaliveTimeout => Some(DisconnectReasonCode::KeepAliveTimeout),
                DisconnectReason::NotAuthorized => Some(DisconnectReasonCode::NotAuthorized),
                DisconnectReason::ProtocolError => Some(DisconnectReasonCode::ProtocolError),
                DisconnectReason::Client | DisconnectReason::ConnectionLost => None,
            };
            if let Some(reason_code) = code {
                self.conn.queue(server_disconnect(reason_code));
            }
        }
        let will = self.will.take();
        if self.device.is_some() {
            if let Err(e) = self
                .presence(PresenceEvent::Disconnected, Some(reason))
                .await
            {
                warn!(error = %e, "disconnect presence not accepted by the event bus");
            }
        }
        let Session {
            ctx,
            conn,
            device,
            session_expiry,
            persistent,
            link,
            unreleased,
            own,
            router_id,
            link_kept,
            disconnect_sent,
            ..
        } = self;
        let rights_changed = matches!(
            reason,
            DisconnectReason::Revoked | DisconnectReason::Reassigned
        );
        if let Some(d) = &device {
            let keep = persistent.is_some() && !rights_changed;
            ctx.local
                .inboxes
                .detach(&d.id, d.epoch, own.unacknowledged(), keep);
        }
        match (persistent, link) {
            // A session ended because its rights changed (revoked, quarantined, moved) takes
            // its stored subscriptions with it, before this session counts as done (a new
            // connection of the device waits for that): the device subscribes again, under
            // the rights it has now.
            (Some(_), Some(link)) if rights_changed && !router_dropped => {
                ctx.router.expire_session(router_id, link.generation).await;
            }
            (Some(_), _) if rights_changed => {}
            (Some(_), Some(_)) if router_dropped => {}
            (Some(expiry), link) => {
                let client_id = router_id;
                if unreleased.len() > 0 {
                    ctx.unreleased_qos2
                        .insert(client_id.clone(), unreleased.ids());
                }
                let generation = link.map(|l| l.generation);
                let inbox = device.as_ref().map(|d| (d.id.clone(), d.epoch));
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(expiry).await;
                    let expired = match (generation, inbox) {
                        (Some(generation), _) => {
                            ctx.router
                                .expire_session(client_id.clone(), generation)
                                .await
                        }
                        (None, Some((id, epoch))) => ctx.local.inboxes.expire(&id, epoch),
                        (None, None) => false,
                    };
                    if expired {
                        ctx.unreleased_qos2.remove(&client_id);
                    }
                });
            }
            // Resumed or made to outlive the connection, but ending with it now: expired before
            // this session counts as done, so a reconnect that waits for it finds nothing.
            (None, Some(link)) if !router_dropped && link_kept => {
                ctx.router.expire_session(router_id, link.generation).await;
            }
            (None, Some(_)) if !router_dropped => ctx.router.forget(&router_id),
            (None, _) => {}
        }
        if disconnect_sent {
            conn.close_draining(Duration::from_secs(1)).await;
        } else {
            conn.close(Duration::from_secs(1)).await;
        }
        ctx.control.metrics.session_closed();
        info!(reason = reason.as_str(), "session ended");
        if let (Some(will), false) = (will, reason == DisconnectReason::Takeover) {
            publish_will(ctx, will, device.map(|d| (d.id, d.epoch)), session_expiry);
        }
    }
}

/// Publishes a will after its delay, unless the device has started a new session by then.
fn publish_will(
    ctx: Arc<Ctx>,
    (will, props): (LastWill, Option<LastWillProperties>),
    device: Option<(DeviceId, u64)>,
    session_expiry: u32,
) {
    let delay = props
        .as_ref()
        .and_then(|p| p.delay_interval)
        .unwrap_or(0)
        .min(session_expiry);
    // The will's properties are its message's (MQTT 5, 3.1.3.2).
    let publish_props = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    tokio::spawn(async move {
        if delay > 0 {
            tokio::time::sleep(Duration::from_secs(delay as u64)).await;
        }
        if let Some((id, epoch)) = &device {
            let current = ctx.control.registry.device(id).map(|d| d.session_epoch);
            if current != Some(*epoch) {
                return;
            }
        }
        let topic = String::from_utf8_lossy(&will.topic).into_owned();
        let durable = device.is_some() && Topic::parse(&topic).is_ok_and(|t| t.is_durable_event());
        if let (true, Some((id, epoch))) = (durable, &device) {
            let msg = BusMessage {
                topic: topic.clone(),
                payload: will.message.clone(),
                epoch: *epoch,
                seq: u64::MAX,
                received_at_ms: now_ms(),
                node: Default::default(),
                id: event_id::will(id.as_str(), *epoch),
            };
            if let Err(e) = ctx.bus.publish(msg).await {
                warn!(error = %e, "will not accepted by the event bus");
            }
        }
        ctx.system
            .publish_with(
                topic,
                will.message,
                will.qos as u8,
                will.retain,
                publish_props,
            )
            .await;
    });
}

/// CONNACK for a connection the broker cannot serve right now.
fn unavailable(version: Version) -> Packet {
    let code = match version {
        Version::V311 => ConnectReturnCode::ServiceUnavailable,
        Version::V5 => ConnectReturnCode::ServerUnavailable,
    };
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

/// The DISCONNECT the server sends an MQTT 5 client: its reason code and a short Reason
/// String saying it in words ([MQTT-3.14.2.2.3]; allowed in a DISCONNECT whatever the
/// client's Request Problem Information, [MQTT-3.1.2-29]). Some clients (rumqttc 0.25) cannot
/// read the short form `e0 01 rc` and lose the reason, such as 0x8E "session taken over",
/// which the device agent turns into advice; and rumqttd 0.20's writer turns a reason code
/// with an empty property list into `e0 00` (its length test mistakes it for the
/// normal-disconnection short form) and no property list into the malformed `e0 01 rc 00`.
/// The Reason String keeps the property list non-empty, so the reason code is on the wire.
fn server_disconnect(reason_code: DisconnectReasonCode) -> Packet {
    Packet::Disconnect(
        Disconnect { reason_code },
        Some(DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(disconnect_text(reason_code).to_owned()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    )
}

/// The Reason String of a server DISCONNECT.
fn disconnect_text(code: DisconnectReasonCode) -> &'static str {
    use DisconnectReasonCode as C;
    match code {
        C::NormalDisconnection => "normal disconnection",
        C::MalformedPacket => "malformed packet",
        C::ProtocolError => "protocol error",
        C::ImplementationSpecificError => "refused by the server",
        C::NotAuthorized => "not authorized",
        C::ServerBusy => "server busy",
        C::ServerShuttingDown => "server shutting down",
        C::KeepAliveTimeout => "keep alive timeout",
        C::SessionTakenOver => "session taken over by another connection",
        C::TopicNameInvalid => "topic name invalid",
        C::ReceiveMaximumExceeded => "receive maximum exceeded",
        C::TopicAliasInvalid => "topic alias invalid",
        C::PacketTooLarge => "packet too large",
        C::QuotaExceeded => "quota exceeded",
        C::AdministrativeAction => "ended by an operator",
        _ => "disconnected by the server",
    }
}

fn disconnect_packet() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The router's next message for a service, or never for a device (it has no link).
async fn next_from(link: &mut Option<Link>) -> Result<FromRouter, RouterError> {
    match link {
        Some(link) => link.next().await,
        None => std::future::pending().await,
    }
}

/// The next wake-up of an inbox, or never without one.
async fn recv_opt(rx: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves once the flag is true (or its sender is gone), holding no borrow of the value.
async fn wait_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await.map(|_| ());
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn puback(pkid: u16) -> Packet {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    }

    #[test]
    fn keep_alive_is_what_was_asked_within_the_bound() {
        assert_eq!(held_keep_alive(60, 1200), 60);
        assert_eq!(held_keep_alive(0, 1200), 1200, "none asked: the bound");
        assert_eq!(held_keep_alive(u16::MAX, 1200), 1200);
        assert_eq!(held_keep_alive(0, 0), 0, "no bound: none");
        assert_eq!(held_keep_alive(u16::MAX, 0), u16::MAX);
    }

    #[test]
    fn acks_leave_in_arrival_order() {
        let mut q = AckQueue::default();
        let a = q.push(AckKind::PubAck, 1, None, true); // durable, waits for bus + router
        q.push(AckKind::PubAck, 2, Some(puback(2)), false); // refused by us, ready at once
        assert!(
            q.pop_ready().is_none(),
            "a later ack overtook an earlier one"
        );
        assert!(q.router_ack(AckKind::PubAck, 1, puback(1)).is_none());
        assert!(
            q.pop_ready().is_none(),
            "acked before the bus accepted the event"
        );
        q.bus_done(a, Ok(()));
        assert!(matches!(q.pop_ready().unwrap().packet, Some(Packet::PubAck(p, _)) if p.pkid == 1));
        assert!(matches!(q.pop_ready().unwrap().packet, Some(Packet::PubAck(p, _)) if p.pkid == 2));
        assert!(q.pop_ready().is_none());
    }

    #[test]
    fn suback_merges_refused_filters() {
        let mut q = AckQueue::default();
        q.push_sub(
            AckKind::SubAck,
            7,
            None,
            false,
            vec![None, Some(SubscribeReasonCode::Failure), None],
        );
        let routed = Packet::SubAck(
            SubAck {
                pkid: 7,
                return_codes: vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                ],
            },
            None,
        );
        assert!(q.router_ack(AckKind::SubAck, 7, routed).is_none());
        let Some(Packet::SubAck(ack, _)) = q.pop_ready().unwrap().packet else {
            panic!("not a SUBACK");
        };
        assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtMostOnce),
            ]
        );
    }

    #[test]
    fn unmatched_router_ack_is_returned() {
        let mut q = AckQueue::default();
        assert!(q.router_ack(AckKind::PubAck, 9, puback(9)).is_some());
    }

    #[test]
    fn bus_failure_is_recorded() {
        let mut q = AckQueue::default();
        let id = q.push(AckKind::PubAck, 3, None, true);
        q.router_ack(AckKind::PubAck, 3, puback(3));
        q.bus_done(id, Err(BusError::Closed));
        let slot = q.pop_ready().unwrap();
        assert!(matches!(slot.bus_error, Some(BusError::Closed)));
    }
}
