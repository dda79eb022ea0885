//! The only module that names rumqttd. It spawns the router thread, builds in-process links for
//! sessions, and re-exports the MQTT codec and packet types the session code uses.
//!
//! Traps handled here: `LinkBuilder::build()` blocks on the router's reply, so it runs on the
//! blocking pool; `LinkTx::send` blocks when the router's event channel (capacity 1000) is full,
//! so a send that might block leaves the async worker with `block_in_place`.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{Notification, RouterConfig};
use serde::{Deserialize, Serialize};

pub(crate) mod proto {
    pub use rumqttd::protocol::v4::V4;
    pub use rumqttd::protocol::v5::V5;
    pub use rumqttd::protocol::{
        ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, Disconnect,
        DisconnectProperties, DisconnectReasonCode, Error as CodecError, Filter, LastWill,
        LastWillProperties, Login, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp,
        PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS,
        RetainForwardRule, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck,
        UnsubAckReason,
    };
}

use proto::{Packet, Publish};

use crate::local::Local;

/// The router's own limits. They bound memory; see ARCHITECTURE.md for what each one costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSettings {
    /// Most connections the router holds at once (devices + services + the broker's own link).
    pub max_connections: usize,
    /// Messages the router forwards to one connection before waiting for its acks.
    pub max_outgoing_packet_count: u64,
    /// Size of one commit-log segment per subscription filter, bytes.
    pub max_segment_size: usize,
    /// Segments kept per filter. A subscriber that falls more than
    /// `max_segment_size * max_segment_count` bytes behind loses the oldest messages.
    pub max_segment_count: usize,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 8 * 1024 * 1024,
            max_segment_count: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the router refused or dropped the link: {0}")]
    Link(String),
    #[error("the router is gone")]
    Gone,
}

type BuildFn =
    dyn Fn(&str, &LinkOptions) -> Result<(LinkTx, LinkRx, Notification), RouterError> + Send + Sync;

/// Packets a link's empty send buffer keeps room for (see [`Link::send`]).
const LINK_BUFFER_IDLE: usize = 8;

/// A handle on the running router. Cheap to clone.
#[derive(Clone)]
pub(crate) struct RouterHandle {
    build: Arc<BuildFn>,
    is_full: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Per router client id with a link or a kept session: the generation of its latest link
    /// (unique over the router's life, so an entry can be dropped and made again without a
    /// stale expiry ever matching). Linking and expiring take the lock, so an expiry never
    /// purges a session that linked again meanwhile.
    generations: Arc<dashmap::DashMap<String, Arc<tokio::sync::Mutex<u64>>>>,
    next_generation: Arc<std::sync::atomic::AtomicU64>,
    filters: Arc<RouterFilters>,
}

/// The distinct filters ever subscribed in the router. rumqttd creates a filter (and its commit
/// log) on the first SUBSCRIBE of a filter string and never removes it, so this is the number
/// of filters every publish is matched against. Kept as hashes: a long filter costs no more.
#[derive(Default)]
pub(crate) struct RouterFilters {
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// On a cluster node: told each filter the first time it appears, so the node subscribes
    /// to what it matches on the backbone.
    pub(crate) announce: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl RouterFilters {
    fn note(&self, packet: &Packet) {
        let Packet::Subscribe(subscribe, _) = packet else {
            return;
        };
        let mut set = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for f in &subscribe.filters {
            // The router files a shared subscription under its inner filter.
            let inner = f
                .path
                .strip_prefix("$share/")
                .and_then(|rest| rest.split_once('/'))
                .map_or(f.path.as_str(), |(_, inner)| inner);
            use std::hash::{BuildHasher, BuildHasherDefault};
            let hash = BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(inner);
            if set.insert(hash) {
                if let Some(announce) = self.announce.get() {
                    let _ = announce.send(inner.to_owned());
                }
            }
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How a session's link is set up.
#[derive(Debug, Clone, Default)]
pub(crate) struct LinkOptions {
    /// rumqttd's clean session: discard what the router keeps for the client id, and keep
    /// nothing after the link ends.
    pub clean_session: bool,
    /// Discard what the router keeps for the client id before linking (not clean): an MQTT 5
    /// Clean Start whose session outlives the connection, which rumqttd has no flag for.
    pub purge_first: bool,
    pub topic_alias_max: u16,
}

impl RouterHandle {
    /// Starts the router on its own thread.
    pub fn spawn(settings: &RouterSettings) -> Self {
        let config = RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: settings.max_outgoing_packet_count,
            max_segment_size: settings.max_segment_size,
            max_segment_count: settings.max_segment_count,
            ..Default::default()
        };
        let router_tx = rumqttd::Router::new(0, config).spawn();
        let probe = router_tx.clone();
        let build = move |client_id: &str, opts: &LinkOptions| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(opts.clean_session)
                .topic_alias_max(opts.topic_alias_max)
                .build()
                .map_err(|e| RouterError::Link(e.to_string()))
        };
        Self {
            build: Arc::new(build),
            is_full: Arc::new(move || probe.is_full()),
            generations: Arc::new(dashmap::DashMap::new()),
            next_generation: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            filters: Arc::default(),
        }
    }

    /// Every filter the router holds from now on (see [`RouterFilters`]); filters it already
    /// holds are not replayed, so call this before serving.
    pub fn announce_filters(&self) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = self.filters.announce.set(tx);
        rx
    }

    /// How many filters the router holds (see [`RouterFilters`]).
    pub fn filter_count(&self) -> usize {
        self.filters.count()
    }

    fn generation_lock(&self, client_id: &str) -> Arc<tokio::sync::Mutex<u64>> {
        self.generations
            .entry(client_id.to_owned())
            .or_default()
            .clone()
    }

    /// Registers a connection with the router. Blocks on the router's reply: call it from the
    /// blocking pool ([`RouterHandle::connect`] does).
    fn connect_blocking(&self, client_id: &str, opts: &LinkOptions) -> Result<Link, RouterError> {
        let (tx, rx, ack) = (self.build)(client_id, opts)?;
        tx.buffer().shrink_to(LINK_BUFFER_IDLE);
        let connack = Option::<Packet>::from(ack);
        let session_present =
            matches!(&connack, Some(Packet::ConnAck(ack, _)) if ack.session_present);
        Ok(Link {
            tx,
            rx,
            session_present,
            is_full: self.is_full.clone(),
            generation: 0,
            filters: self.filters.clone(),
        })
    }

    pub async fn connect(&self, client_id: String, opts: LinkOptions) -> Result<Link, RouterError> {
        let lock = self.generation_lock(&client_id);
        let mut generation = lock.lock().await;
        let this = self.clone();
        let mut link = tokio::task::spawn_blocking(move || {
            if opts.purge_first {
                this.purge_blocking(&client_id)?;
            }
            this.connect_blocking(&client_id, &opts)
        })
        .await
        .map_err(|_| RouterError::Gone)??;
        *generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        link.generation = *generation;
        Ok(link)
    }

    /// A clean session of `client_id` ended: the router keeps nothing of it, so neither do we
    /// (unless another link of the id is being made).
    pub fn forget(&self, client_id: &str) {
        self.generations
            .remove_if(client_id, |_, l| Arc::strong_count(l) == 1);
    }

    /// Discards what the router keeps for `client_id`: linking once with a clean session and
    /// unlinking. The router takes the two in order with any link made after, so that link
    /// finds nothing. Blocks: call it from the blocking pool.
    fn purge_blocking(&self, client_id: &str) -> Result<(), RouterError> {
        let opts = LinkOptions {
            clean_session: true,
            ..Default::default()
        };
        let (mut tx, _rx, _) = (self.build)(client_id, &opts)?;
        let disconnect = Packet::Disconnect(
            proto::Disconnect {
                reason_code: proto::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        futures::executor::block_on(tx.send(disconnect))
            .map(drop)
            .map_err(|_| RouterError::Gone)
    }

    /// Ends a persistent session the router keeps for a disconnected client (rumqttd never
    /// expires them on its own): linking once with a clean session discards the saved state.
    /// Does nothing if the client linked again since `generation`; returns whether it expired.
    pub async fn expire_session(&self, client_id: String, generation: u64) -> bool {
        let lock = self.generation_lock(&client_id);
        let current = lock.lock().await;
        if *current != generation {
            return false;
        }
        let this = self.clone();
        let id = client_id.clone();
        match tokio::task::spawn_blocking(move || this.purge_blocking(&id)).await {
            Ok(Ok(())) => tracing::debug!(client_id, "expired a persistent session"),
            _ => tracing::warn!(client_id, "could not expire a persistent session"),
        }
        drop(current);
        self.generations
            .remove_if(&client_id, |_, l| Arc::strong_count(l) == 1);
        true
    }
}

/// What the router sends a session.
pub(crate) enum FromRouter {
    /// A message for the client (a PUBLISH forwarded from a subscription).
    Forward(Packet),
    /// An acknowledgement of something the client sent (PUBACK, PUBREC, SUBACK, ...).
    Ack(Packet),
    /// The router paused this link because its buffer filled; call [`Link::wake`] after writing.
    Unschedule,
    /// The router ends the connection.
    Disconnect(Packet),
}

/// One connection's link into the router.
pub(crate) struct Link {
    tx: LinkTx,
    rx: LinkRx,
    pub session_present: bool,
    is_full: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Which link of this client id this is (see [`RouterHandle::expire_session`]).
    pub generation: u64,
    filters: Arc<RouterFilters>,
}

impl Link {
    /// Hands packets to the router in one notification.
    pub async fn send(&mut self, mut packets: Vec<Packet>) -> Result<(), RouterError> {
        for p in &packets {
            self.filters.note(p);
        }
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        {
            let mut buffer = self.tx.buffer();
            // rumqttd gives every link a buffer for 200 packets (tens of KiB) and swaps it
            // with the router's scratch buffer on every read; keeping ours small when it is
            // empty keeps both small (they grow as far as a burst needs).
            if buffer.is_empty() && buffer.capacity() > LINK_BUFFER_IDLE {
                buffer.shrink_to(LINK_BUFFER_IDLE);
            }
            buffer.extend(packets);
        }
        if !(self.is_full)() {
            return self
                .tx
                .send(last)
                .await
                .map(drop)
                .map_err(|_| RouterError::Gone);
        }
        // The router is saturated and `send` would block this worker thread: step off it.
        let tx = &mut self.tx;
        let blocking = || {
            futures::executor::block_on(tx.send(last))
                .map(drop)
                .map_err(drop)
        };
        let result = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => blocking(),
            _ => tokio::task::block_in_place(blocking),
        };
        result.map_err(|()| RouterError::Gone)
    }

    /// Waits for the router's next message. Cancel safe. `Err(Gone)` means the router dropped
    /// this link (for example a newer connection with the same client id took it over).
    pub async fn next(&mut self) -> Result<FromRouter, RouterError> {
        loop {
            match self.rx.next().await {
                Ok(Some(n)) => {
                    if let Some(out) = classify(n) {
                        return Ok(out);
                    }
                }
                Ok(None) => continue,
                Err(_) => return Err(RouterError::Gone),
            }
        }
    }

    /// The next message if one is already waiting, without blocking.
    pub fn try_next(&mut self) -> Option<Result<FromRouter, RouterError>> {
        use futures::FutureExt;
        self.next().now_or_never()
    }

    /// Asks the router to resume forwarding after an [`FromRouter::Unschedule`].
    pub async fn wake(&self) -> Result<(), RouterError> {
        self.rx.wake().await.map_err(|_| RouterError::Gone)
    }
}

fn classify(n: Notification) -> Option<FromRouter> {
    Some(match n {
        Notification::Forward(f) => FromRouter::Forward(Packet::Publish(f.publish, f.properties)),
        Notification::DeviceAck(ack) => FromRouter::Ack(Packet::from(ack)),
        Notification::Unschedule => FromRouter::Unschedule,
        Notification::Disconnect(d, p) => FromRouter::Disconnect(Packet::Disconnect(d, p)),
        other => {
            tracing::warn!(notification = ?other, "unexpected router notification");
            return None;
        }
    })
}

/// Times the router skipped a subscriber past messages it had not read yet (its commit log for
/// that filter rolled over). rumqttd reports this only as a warning from its segment store, so
/// [`RouterLossLayer`] counts those warnings.
static SUBSCRIBER_SKIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn subscriber_skips() -> u64 {
    SUBSCRIBER_SKIPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A tracing layer that counts the router's "subscriber fell behind and lost messages"
/// warnings, so the loss shows in the broker's metrics. The binary installs it next to its log
/// output; it records nothing else.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouterLossLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RouterLossLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::WARN && meta.target().starts_with("rumqttd::segments") {
            SUBSCRIBER_SKIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Builds a PUBLISH with the given QoS, packet id and flags. rumqttd keeps those fields
/// crate-private and offers only its own serialisation as a way in, so this writes that
/// (internal, not MQTT) layout: header byte, packet id, topic length, topic, payload.
pub(crate) fn publish_with_qos(
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Publish {
    let mut o = BytesMut::with_capacity(5 + topic.len() + payload.len());
    o.put_u8(0b0011_0000 | ((dup as u8) << 3) | (retain as u8) | ((qos & 0b11) << 1));
    o.put_u16(pkid);
    o.put_u16(topic.len() as u16);
    o.extend_from_slice(topic.as_bytes());
    o.extend_from_slice(payload);
    Publish::deserialize(o.freeze())
}

/// The broker's own link into the router, through which everything devices publish (and the
/// platform's own messages: presence, wills, cohort updates) reaches backend subscribers.
/// Devices have no link of their own: a link costs tens of KiB of router buffers, and their
/// subscriptions are served by [`Local`]. Runs on two small threads: one feeds the router in
/// batches (its sends may block), one drains the router's acks (the router's ack means only
/// "appended in memory"; a device's PUBACK waits for the event bus instead).
#[derive(Clone)]
pub(crate) struct SystemPublisher {
    tx: flume::Sender<SystemMessage>,
    local: Arc<Local>,
}

struct SystemMessage {
    topic: Bytes,
    payload: Bytes,
    qos: u8,
    props: Option<proto::PublishProperties>,
}

/// Publishes the feeding thread hands the router in one notification, at most.
const SYSTEM_BATCH: usize = 256;

impl SystemPublisher {
    pub fn start(router: &RouterHandle, local: Arc<Local>) -> Result<Self, RouterError> {
        let link = router.connect_blocking(
            "~broker~",
            &LinkOptions {
                clean_session: true,
                ..Default::default()
            },
        )?;
        let Link { mut tx, mut rx, .. } = link;
        let (queue, inbox) = flume::bounded::<SystemMessage>(10_000);
        std::thread::Builder::new()
            .name("broker-system-link".into())
            .spawn(move || {
                let mut pkid: u16 = 0;
                let mut batch = Vec::with_capacity(SYSTEM_BATCH);
                while let Ok(first) = inbox.recv() {
                    batch.push(first);
                    batch.extend(inbox.try_iter().take(SYSTEM_BATCH - 1));
                    let mut packets: Vec<Packet> = batch
                        .drain(..)
                        .map(|m| {
                            pkid = pkid.checked_add(1).unwrap_or(1);
                            let qos = m.qos.min(1);
                            let pkid = if qos == 0 { 0 } else { pkid };
                            let topic = std::str::from_utf8(&m.topic).unwrap_or_default();
                            // Retained copies are the node's own (`crate::retained`).
                            let publish =
                                publish_with_qos(topic, &m.payload, qos, pkid, false, false);
                            Packet::Publish(publish, m.props)
                        })
                        .collect();
                    let last = packets.pop().expect("a batch has a first message");
                    tx.buffer().extend(packets);
                    if futures::executor::block_on(tx.send(last)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RouterError::Link(e.to_string()))?;
        std::thread::Builder::new()
            .name("broker-system-acks".into())
            .spawn(move || {
                while let Ok(n) = rx.recv() {
                    // The router pauses a link whose buffer filled; this one always reads on.
                    if matches!(n, Some(Notification::Unschedule)) && rx.ready().is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RouterError::Link(e.to_string()))?;
        Ok(Self { tx: queue, local })
    }

    /// Publishes as the platform itself: recorded by [`Local`] (retained, device inboxes), then
    /// queued for the router (QoS 2 is sent as QoS 1). Waits only if 10,000 are queued.
    pub async fn publish(&self, topic: String, payload: Bytes, qos: u8, retain: bool) {
        self.publish_with(topic, payload, qos, retain, None).await;
    }

    /// [`SystemPublisher::publish`] with MQTT 5 properties (a will's).
    pub async fn publish_with(
        &self,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        props: Option<proto::PublishProperties>,
    ) {
        let parsed = fleet_wire::Topic::parse(&topic).ok();
        self.local.publish(
            &topic,
            parsed.as_ref(),
            &payload,
            qos.min(1),
            retain,
            props.as_ref(),
            None,
        );
        self.forward(Bytes::from(topic), payload, qos, props).await;
    }

    /// Queues a publish [`Local`] has already seen for the router's subscribers (backend
    /// services). Waits only if 10,000 are queued.
    pub async fn forward(
        &self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        props: Option<proto::PublishProperties>,
    ) {
        let m = SystemMessage {
            topic,
            payload,
            qos,
            props,
        };
        if self.tx.send_async(m).await.is_err() {
            tracing::error!("the broker's system link is gone; a publish did not reach the router");
        }
    }
}
