//! The event bus on NATS JetStream: broker nodes publish, fleet-service replicas consume.
//!
//! - One stream ([`JetStreamConfig::stream`], `FLEET_EVENTS`) takes every event on
//!   `{subject_prefix}.{partition}` (`fleet.events.0` … `fleet.events.7`), the partition a
//!   stable hash of the device id, so a later per-partition consumer keeps a device's events in
//!   order. File storage, interest retention (an event is gone once the intake's durable
//!   consumer acked it and every broker node's follower, which delivers it to the node's
//!   subscribers, has it: `broker::cluster`), a duplicate window
//!   keyed by [`BusMessage::id`], and `max_bytes` with discard-new: a full stream refuses new
//!   events instead of dropping old ones.
//! - [`JetStreamBus::publish`] resolves `Ok` only on the stream's ack (a duplicate's ack too).
//!   While the server is unreachable or the stream full it retries the same message, same id,
//!   with capped backoff, for as long as the future lives: it never drops an event and never
//!   answers early. At most [`JetStreamConfig::max_pending_publishes`] are on their way at
//!   once; beyond that new publishes wait (and their PUBACKs with them).
//! - [`JetStreamSource`] pulls from one durable consumer every replica shares: each message
//!   goes to one replica; one not acked within `ack_wait` (its replica died) goes to another.
//!
//! Every header the intake needs travels with the raw MQTT payload: `Nats-Msg-Id` (the id),
//! `Fleet-Topic`, `Fleet-Epoch`, `Fleet-Seq`, `Fleet-Received-At-Ms`, `Fleet-Node`.
//!
//! Durability: the stream's ack means the server wrote the event to its file store, which
//! survives the server process dying (kill -9); it is not fsynced at once (the server's
//! `sync_interval`, 2 minutes by default, and 2.9 cannot change it), so a power loss of a
//! single server can lose acknowledged events. In production the stream is replicated
//! ([`JetStreamConfig::replicas`] = 3 across failure domains): then the ack means a majority
//! holds it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{Publish, PublishErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, Subject};
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use super::{Acker, BusError, BusMessage, Delivery, EventBus, EventSource, PublishFuture};
use crate::metrics::Metrics;

/// `Nats-Msg-Id`, as the standard header it is: looked up by its string, a header parsed off
/// the wire would not be found.
const MSG_ID: async_nats::HeaderName = async_nats::header::NATS_MESSAGE_ID;
/// The event's MQTT topic.
pub const TOPIC: &str = "Fleet-Topic";
const EPOCH: &str = "Fleet-Epoch";
const SEQ: &str = "Fleet-Seq";
const RECEIVED_AT: &str = "Fleet-Received-At-Ms";
/// The broker node that accepted the event.
pub const NODE: &str = "Fleet-Node";

/// How the JetStream bus is laid out and how hard it pushes. Publishers and consumers of one
/// platform must agree on `stream`, `subject_prefix` and the stream's limits (whoever starts
/// first creates the stream; a later one with other limits updates it).
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// Stream name. Default `FLEET_EVENTS`.
    pub stream: String,
    /// Subjects are `{subject_prefix}.{partition}`. Default `fleet.events`.
    pub subject_prefix: String,
    /// Partitions (subjects) the device ids are hashed over. Default 8.
    pub partitions: u32,
    /// Replicas of the stream (1 for one server; 3 in a production cluster). Default 1.
    pub replicas: usize,
    /// The same event id within this window is stored once. Default 2 minutes; it bounds how
    /// long after a node crash a device's resend is still recognised.
    pub duplicate_window: Duration,
    /// Bytes the stream holds at most; when full it refuses new events (publishes wait and
    /// retry) rather than dropping old ones. Default 1 GiB.
    pub max_bytes: i64,
    /// Publishes on their way to the stream at most (waiting for an ack or retrying); beyond
    /// it new ones wait for room. Default 10,000.
    pub max_pending_publishes: usize,
    /// How long one publish attempt waits for the stream's ack before it is retried.
    /// Default 5 s.
    pub publish_timeout: Duration,
    /// Backoff between attempts of one publish: doubles from `retry_initial` up to
    /// `retry_max`. Defaults 50 ms and 2 s.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// The broker node publishing; stamped on events whose [`BusMessage::node`] is empty.
    /// Default empty.
    pub node: String,
    /// The durable consumer every fleet-service replica pulls from. Default `intake`.
    pub consumer: String,
    /// A delivery not acked within this goes to another replica. Default 30 s.
    pub ack_wait: Duration,
    /// Deliveries out and not acked, over all replicas, at most. Default 10,000.
    pub max_ack_pending: i64,
    /// Messages one replica asks for per pull request (and so holds in its buffer at most).
    /// Default 512.
    pub pull_batch: usize,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            stream: "FLEET_EVENTS".to_owned(),
            subject_prefix: "fleet.events".to_owned(),
            partitions: 8,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_bytes: 1 << 30,
            max_pending_publishes: 10_000,
            publish_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            node: String::new(),
            consumer: "intake".to_owned(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            pull_batch: 512,
        }
    }
}

impl JetStreamConfig {
    /// The subject an event of `topic` is published on.
    pub fn subject(&self, topic: &str) -> String {
        format!(
            "{}.{}",
            self.subject_prefix,
            partition(topic, self.partitions)
        )
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: StorageType::File,
            retention: RetentionPolicy::Interest,
            discard: DiscardPolicy::New,
            max_bytes: self.max_bytes,
            duplicate_window: self.duplicate_window,
            num_replicas: self.replicas.max(1),
            ..Default::default()
        }
    }

    fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.consumer.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }
}

/// The partition of an event: FNV-1a of the device id (the topic's second level, or the whole
/// topic when it has none) modulo `partitions`. Stable across processes and releases.
pub fn partition(topic: &str, partitions: u32) -> u32 {
    let key = topic.split('/').nth(1).unwrap_or(topic);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot set up stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("cannot set up consumer {consumer} on stream {stream}: {reason}")]
    Consumer {
        stream: String,
        consumer: String,
        reason: String,
    },
}

/// Connects to NATS at `url` (the client reconnects by itself afterwards, for ever).
pub async fn client(url: &str) -> Result<async_nats::Client, JetStreamError> {
    async_nats::ConnectOptions::new()
        .name("fleet-event-bus")
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(|source| JetStreamError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// Connects to `url` and sets up both sides on one connection.
pub async fn connect(
    url: &str,
    config: &JetStreamConfig,
    metrics: Arc<Metrics>,
) -> Result<(JetStreamBus, JetStreamSource), JetStreamError> {
    let client = client(url).await?;
    let bus = JetStreamBus::new(client.clone(), config, metrics).await?;
    let source = JetStreamSource::new(client, config).await?;
    Ok((bus, source))
}

/// Connects to `url` and sets up the publishing side (a broker node).
pub async fn connect_bus(
    url: &str,
    config: &JetStreamConfig,
    metrics: Arc<Metrics>,
) -> Result<JetStreamBus, JetStreamError> {
    JetStreamBus::new(client(url).await?, config, metrics).await
}

/// Connects to `url` and sets up the consuming side (a fleet-service replica).
pub async fn connect_source(
    url: &str,
    config: &JetStreamConfig,
) -> Result<JetStreamSource, JetStreamError> {
    JetStreamSource::new(client(url).await?, config).await
}

/// Creates the stream, or brings an existing one's limits to `config`.
async fn ensure_stream(
    js: &jetstream::Context,
    config: &JetStreamConfig,
) -> Result<stream::Stream, JetStreamError> {
    let want = config.stream_config();
    let err = |e: &dyn std::fmt::Display| JetStreamError::Stream {
        stream: want.name.clone(),
        reason: e.to_string(),
    };
    let mut stream = match js.get_stream(&want.name).await {
        Ok(s) => s,
        Err(_) => match js.create_stream(want.clone()).await {
            Ok(s) => return Ok(s),
            // Another node may have created it meanwhile.
            Err(e) => js.get_stream(&want.name).await.map_err(|_| err(&e))?,
        },
    };
    let have = stream.info().await.map_err(|e| err(&e))?.config.clone();
    if have.retention != want.retention || have.storage != want.storage {
        return Err(err(&format_args!(
            "exists with retention {:?} and storage {:?}; it must be file-backed with interest retention",
            have.retention, have.storage
        )));
    }
    if have.subjects != want.subjects
        || have.max_bytes != want.max_bytes
        || have.duplicate_window != want.duplicate_window
        || have.discard != want.discard
        || have.num_replicas != want.num_replicas
    {
        info!(stream = %want.name, max_bytes = want.max_bytes,
            duplicate_window_ms = want.duplicate_window.as_millis() as u64,
            "updating the event stream's limits");
        let update = stream::Config {
            subjects: want.subjects.clone(),
            max_bytes: want.max_bytes,
            duplicate_window: want.duplicate_window,
            discard: want.discard,
            num_replicas: want.num_replicas,
            ..have
        };
        js.update_stream(update).await.map_err(|e| err(&e))?;
    }
    Ok(stream)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The publishing side. Cheap to clone.
#[derive(Clone)]
pub struct JetStreamBus {
    inner: Arc<BusInner>,
}

struct BusInner {
    js: jetstream::Context,
    config: JetStreamConfig,
    node: Arc<str>,
    permits: Semaphore,
    metrics: Arc<Metrics>,
    health: Health,
    /// For ids of events published without one: this bus's start and a counter.
    nonce: u128,
    counter: AtomicU64,
    /// When a failing publish last set the stream up again.
    last_ensure: Mutex<Option<Instant>>,
}

impl JetStreamBus {
    /// Sets up the stream on an already connected client.
    pub async fn new(
        client: async_nats::Client,
        config: &JetStreamConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, JetStreamError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.publish_timeout);
        let stream = ensure_stream(&js, config).await?;
        // With interest retention an event no consumer wants is not kept: the intake's durable
        // consumer must exist before the first event, even if no replica ever ran yet.
        ensure_consumer(&stream, config).await?;
        let inner = Arc::new(BusInner {
            js,
            config: config.clone(),
            node: Arc::from(config.node.as_str()),
            permits: Semaphore::new(config.max_pending_publishes.max(1)),
            metrics,
            health: Health::default(),
            nonce: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
            counter: AtomicU64::new(0),
            last_ensure: Mutex::new(None),
        });
        tokio::spawn(watch_connection(client, Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

impl EventBus for JetStreamBus {
    fn publish(&self, msg: BusMessage) -> PublishFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.publish(msg).await })
    }
}

/// Counts a publish as pending for as long as it lives (a dropped future included).
struct PendingGuard<'a>(&'a Metrics);

impl<'a> PendingGuard<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.bus_pending_add(1);
        Self(m)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.bus_pending_add(-1);
    }
}

impl BusInner {
    async fn publish(&self, msg: BusMessage) -> Result<(), BusError> {
        let _pending = PendingGuard::new(&self.metrics);
        let subject = self.config.subject(&msg.topic);
        let headers = self.headers(&msg);
        let _permit = self.permits.acquire().await.map_err(|_| BusError::Closed)?;
        let mut delay = self.config.retry_initial;
        loop {
            let attempt = self
                .js
                .send_publish(
                    subject.clone(),
                    Publish::build()
                        .payload(msg.payload.clone())
                        .headers(headers.clone()),
                )
                .then(|sent| async move { sent?.await });
            // The context's timeout bounds each step; this bounds the two together.
            let outcome = tokio::time::timeout(self.config.publish_timeout * 2, attempt).await;
            let error = match outcome {
                Ok(Ok(ack)) => {
                    if ack.duplicate {
                        debug!(
                            id = headers.get(MSG_ID).map(|v| v.as_str()),
                            "duplicate event"
                        );
                    }
                    self.health.available(&self.metrics);
                    return Ok(());
                }
                Ok(Err(e)) => {
                    if e.kind() == PublishErrorKind::StreamNotFound && self.may_ensure_stream() {
                        // No responders: the server is still starting JetStream, or someone
                        // deleted the stream. Setting it up again is harmless in either case.
                        if let Err(e) = ensure_stream(&self.js, &self.config).await {
                            debug!(error = %e, "event stream not set up yet");
                        }
                    }
                    e.to_string()
                }
                Err(_) => "timed out waiting for the stream's ack".to_owned(),
            };
            self.metrics.bus_publish_retry();
            self.health.unavailable(&self.metrics, &error);
            debug!(
                error,
                retry_in_ms = delay.as_millis() as u64,
                "event publish retried"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.retry_max);
        }
    }

    /// One publish of all those failing together sets the stream up again, once a second.
    fn may_ensure_stream(&self) -> bool {
        let mut last = self.last_ensure.lock();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    fn headers(&self, msg: &BusMessage) -> HeaderMap {
        let mut h = HeaderMap::new();
        let id = if msg.id.is_empty() {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            format!("x/{}/{}/{n}", self.node, self.nonce)
        } else {
            msg.id.clone()
        };
        let node = if msg.node.is_empty() {
            &self.node
        } else {
            &msg.node
        };
        h.insert(MSG_ID, id);
        h.insert(TOPIC, msg.topic.as_str());
        h.insert(EPOCH, msg.epoch.to_string());
        h.insert(SEQ, msg.seq.to_string());
        h.insert(RECEIVED_AT, msg.received_at_ms.to_string());
        h.insert(NODE, &**node);
        h
    }
}

/// Says, once per outage rather than once per message, when the backbone stops taking events
/// and when it takes them again; the metrics follow every change.
#[derive(Default)]
struct Health {
    /// When the last warning was logged, and whether its "available again" is still due.
    warned: Mutex<(Option<Instant>, bool)>,
}

/// A backbone that flaps (a full stream being drained) warns at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Health {
    fn unavailable(&self, metrics: &Metrics, error: &str) {
        if !metrics.bus_unavailable(now_ms()) {
            return;
        }
        let mut w = self.warned.lock();
        if w.0.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *w = (Some(Instant::now()), true);
            drop(w);
            warn!(
                error,
                pending = metrics.bus_pending(),
                "event backbone unavailable; publishes wait and retry, PUBACKs are held back"
            );
        }
    }

    fn available(&self, metrics: &Metrics) {
        let Some(since) = metrics.bus_available() else {
            return;
        };
        let mut w = self.warned.lock();
        if w.1 {
            w.1 = false;
            drop(w);
            info!(
                unavailable_ms = now_ms() - since,
                "event backbone available again"
            );
        }
    }
}

/// Marks the backbone unavailable as soon as the connection drops, even with nothing to
/// publish, and available again once connected with nothing pending (with publishes pending,
/// their outcome decides). Ends with the bus.
async fn watch_connection(client: async_nats::Client, bus: Weak<BusInner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(bus) = bus.upgrade() else { return };
        match client.connection_state() {
            async_nats::connection::State::Connected => {
                if bus.metrics.bus_pending() == 0 {
                    bus.health.available(&bus.metrics);
                }
            }
            _ => bus
                .health
                .unavailable(&bus.metrics, "not connected to the NATS server"),
        }
    }
}

/// An ack or a termination on its way to the server.
type AckRequest = (Subject, AckKind);

/// Answers one JetStream delivery; sent by [`Delivery::ack`] without waiting.
pub(crate) struct AckHandle {
    reply: Subject,
    acks: mpsc::UnboundedSender<AckRequest>,
}

impl AckHandle {
    pub(crate) fn ack(self) {
        let _ = self.acks.send((self.reply, AckKind::Ack));
    }

    pub(crate) fn terminate(self) {
        let _ = self.acks.send((self.reply, AckKind::Term));
    }
}

/// Sends acks for the deliveries of one source. A lost ack (the connection dropped) only means
/// a redelivery, which the consumer's writes absorb. Ends once the source and every delivery
/// it handed out are gone.
async fn send_acks(client: async_nats::Client, mut rx: mpsc::UnboundedReceiver<AckRequest>) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        for (reply, kind) in batch.drain(..) {
            if let Err(e) = client.publish(reply, kind.into()).await {
                debug!(error = %e, "ack not sent; the event will be redelivered");
            }
        }
    }
}

/// The consuming side: one replica's share of the durable consumer.
pub struct JetStreamSource {
    js: jetstream::Context,
    config: JetStreamConfig,
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    acks: mpsc::UnboundedSender<AckRequest>,
    /// Since when pulling fails, once a warning was logged.
    failing_since: Option<Instant>,
}

impl JetStreamSource {
    /// Sets up the stream (if no broker did yet) and the durable consumer on an already
    /// connected client.
    pub async fn new(
        client: async_nats::Client,
        config: &JetStreamConfig,
    ) -> Result<Self, JetStreamError> {
        let js = jetstream::new(client.clone());
        let stream = ensure_stream(&js, config).await?;
        let consumer = ensure_consumer(&stream, config).await?;
        let (acks, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_acks(client, rx));
        Ok(Self {
            js,
            config: config.clone(),
            consumer,
            messages: None,
            acks,
            failing_since: None,
        })
    }

    async fn messages(&mut self) -> Result<&mut pull::Stream, String> {
        if self.messages.is_none() {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(self.config.pull_batch.max(1))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            self.messages = Some(stream);
        }
        Ok(self.messages.as_mut().expect("just set"))
    }

    /// Makes a delivery of a stream message, or terminates one that is not an event of ours.
    fn delivery(&self, m: jetstream::Message) -> Option<Delivery> {
        let m = m.message;
        let reply = m.reply?;
        match decode(m.headers.as_ref(), m.payload) {
            Ok(msg) => Some(Delivery {
                msg,
                ack: Acker::JetStream(AckHandle {
                    reply,
                    acks: self.acks.clone(),
                }),
            }),
            Err(why) => {
                warn!(subject = %m.subject, reason = why, "not an event; terminated on the stream");
                let _ = self.acks.send((reply, AckKind::Term));
                None
            }
        }
    }

    fn failing(&mut self, error: &str) {
        if self.failing_since.is_none() {
            warn!(error, "cannot pull events from the backbone; retrying");
            self.failing_since = Some(Instant::now());
        }
    }

    fn flowing(&mut self) {
        if let Some(since) = self.failing_since.take() {
            info!(
                failing_ms = since.elapsed().as_millis() as u64,
                "pulling events from the backbone again"
            );
        }
    }
}

async fn ensure_consumer(
    stream: &stream::Stream,
    config: &JetStreamConfig,
) -> Result<PullConsumer, JetStreamError> {
    // Creating a durable consumer that exists with the same configuration returns it; with
    // another (a changed ack_wait) the server updates what it can.
    match stream.create_consumer(config.consumer_config()).await {
        Ok(c) => Ok(c),
        Err(create) => {
            stream
                .get_consumer(&config.consumer)
                .await
                .map_err(|_| JetStreamError::Consumer {
                    stream: config.stream.clone(),
                    consumer: config.consumer.clone(),
                    reason: create.to_string(),
                })
        }
    }
}

fn decode(headers: Option<&HeaderMap>, payload: bytes::Bytes) -> Result<BusMessage, String> {
    let h = headers.ok_or("no headers")?;
    let text = |name: &str| {
        h.get(name)
            .map(|v| v.as_str())
            .ok_or_else(|| format!("no {name} header"))
    };
    let number = |name: &str| -> Result<i64, String> {
        text(name)?
            .parse()
            .map_err(|_| format!("{name} is not a number"))
    };
    let unsigned = |name: &str| -> Result<u64, String> {
        text(name)?
            .parse()
            .map_err(|_| format!("{name} is not a number"))
    };
    Ok(BusMessage {
        topic: text(TOPIC)?.to_owned(),
        payload,
        epoch: unsigned(EPOCH)?,
        seq: unsigned(SEQ)?,
        received_at_ms: number(RECEIVED_AT)?,
        node: Arc::from(h.get(NODE).map_or("", |v| v.as_str())),
        id: h.get(MSG_ID).map_or("", |v| v.as_str()).to_owned(),
    })
}

#[async_trait::async_trait]
impl EventSource for JetStreamSource {
    /// Waits for at least one event and returns up to `max`: the first, and whatever else has
    /// already arrived. Never `None`: the backbone outlives any one producer; while it is
    /// unreachable this waits (and retries) quietly.
    async fn recv_batch(&mut self, max: usize) -> Option<Vec<Delivery>> {
        let max = max.max(1);
        let mut delay = self.config.retry_initial;
        loop {
            let stream = match self.messages().await {
                Ok(s) => s,
                Err(e) => {
                    self.failing(&e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.retry_max);
                    continue;
                }
            };
            let first = match stream.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    use pull::MessagesErrorKind as K;
                    let kind = e.kind();
                    let error = e.to_string();
                    self.failing(&error);
                    if kind == K::ConsumerDeleted {
                        self.messages = None;
                        let stream = ensure_stream(&self.js, &self.config).await;
                        match stream {
                            Ok(s) => match ensure_consumer(&s, &self.config).await {
                                Ok(c) => self.consumer = c,
                                Err(e) => debug!(error = %e, "consumer not set up yet"),
                            },
                            Err(e) => debug!(error = %e, "stream not set up yet"),
                        }
                    }
                    if matches!(kind, K::ConsumerDeleted | K::NoResponders | K::Pull) {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(self.config.retry_max);
                    }
                    continue;
                }
                None => {
                    self.messages = None;
                    continue;
                }
            };
            let mut batch = Vec::with_capacity(max.min(1024));
            let mut next = Some(first);
            while let Some(m) = next.take() {
                batch.extend(self.delivery(m));
                if batch.len() >= max {
                    break;
                }
                let stream = self.messages.as_mut().expect("pulling");
                if let Some(Some(Ok(m))) = stream.next().now_or_never() {
                    next = Some(m);
                }
            }
            self.flowing();
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_by_device() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector): pinned, since a
        // change would move devices between partitions across a rolling upgrade.
        assert_eq!(partition("a", 1 << 31), 0x0601_ec8c);
        assert_eq!(partition("devices/a/telemetry", 1 << 31), 0x0601_ec8c);
        let cases: &[(&str, &str)] = &[
            ("devices/d1/telemetry", "devices/d1/presence"),
            ("devices/d1/state", "devices/d1/commands/ack"),
        ];
        for (a, b) in cases {
            assert_eq!(partition(a, 8), partition(b, 8), "{a} and {b}");
        }
        assert_eq!(partition("devices/dev-1/telemetry", 0), 0);
        let spread: std::collections::HashSet<u32> = (0..64)
            .map(|i| partition(&format!("devices/dev-{i}/telemetry"), 8))
            .collect();
        assert_eq!(spread.len(), 8, "64 devices land on every partition");
    }

    #[test]
    fn headers_round_trip() {
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, "p/d1/7/abc");
        h.insert(TOPIC, "devices/d1/telemetry");
        h.insert(EPOCH, "3");
        h.insert(SEQ, "9");
        h.insert(RECEIVED_AT, "1700000000000");
        h.insert(NODE, "node-a");
        let m = decode(Some(&h), bytes::Bytes::from_static(b"{}")).unwrap();
        assert_eq!(
            (m.topic.as_str(), m.epoch, m.seq, m.received_at_ms),
            ("devices/d1/telemetry", 3, 9, 1_700_000_000_000)
        );
        assert_eq!((&*m.node, m.id.as_str()), ("node-a", "p/d1/7/abc"));
        h.insert(SEQ, "nine");
        assert!(decode(Some(&h), bytes::Bytes::new()).is_err());
        assert!(decode(None, bytes::Bytes::new()).is_err());
    }
}
