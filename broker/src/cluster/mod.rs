//! A broker node's link to the other nodes of a cluster, over NATS.
//!
//! - **Device events** (telemetry, state, acks, update reports, presence): every node follows
//!   the events stream the bus appends them to (`bus::jetstream`) and delivers the other
//!   nodes' events to its subscribers. So a backend service anywhere sees an event once it is
//!   durable, exactly what was acknowledged to the device, and none is lost while NATS
//!   restarts (the follower resumes after the last one it delivered).
//! - **Other live messages** (core NATS, at most once, like any MQTT bridge): every other
//!   publish this node accepts (a service's command, a cohort message, an application message
//!   of a device or a service, the platform's own) goes out on the subject its topic maps to
//!   ([`subject`]); the node subscribes to what its own subscribers can match: what devices
//!   receive (commands, assignments, application messages, cohort messages) and each backend
//!   service's filter as it first appears. What arrives is delivered here as if
//!   it had been published here, to device inboxes and to the router, but never sent on again.
//!   A message reaches a node once even when several of its subscriptions match it: each
//!   carries its origin (a node instance) and a sequence number, and a window of recent ones
//!   per origin drops the copies.
//! - **Retained messages** (JetStream stream `{STREAM}` keeping the last message per subject):
//!   every retained publish is also appended there, and every node (this one included) applies
//!   the stream in its order to its retained store, so all nodes converge on the stream's last
//!   word per topic; a node that starts later loads the last message of every topic first.
//!   Presence is special: an older session's presence never replaces a newer one's.
//! - **Takeover across nodes**: a `connected` presence from another node raises the device's
//!   epoch here (so a later session here gets a larger one), ends the older session this node
//!   holds (reason `takeover`) and drops the persistent session the device left here.

mod arrival;
pub mod follow;
pub mod subject;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use fleet_wire::payload::{DisconnectReason, Presence, PresenceEvent};
use fleet_wire::Topic;
use futures::stream::{FuturesUnordered, SelectAll};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use self::arrival::{Arrival, Arrivals};
use crate::control::BrokerControl;
use crate::local::Local;
use crate::retained::Message;
use crate::router::SystemPublisher;

/// The name of the stream of retained messages.
pub const STREAM: &str = "FLEET_RETAINED";

/// How a node joins the cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    pub client: async_nats::Client,
    /// This node's name (also the `node_id` of its devices' sessions).
    pub node_id: String,
    /// Namespace of subjects, so several installations may share one NATS: live messages go
    /// on `{prefix}.mqtt.…`, retained ones on `{prefix}.retained.…`.
    pub prefix: String,
    /// Publishes waiting to go out; beyond it live copies are dropped (and counted).
    pub out_queue: usize,
    /// The stream of device events (`bus::jetstream`) and its subjects: the node delivers the
    /// events other nodes made durable from there.
    pub events_stream: String,
    pub events_subjects: String,
}

impl ClusterConfig {
    pub fn new(client: async_nats::Client, node_id: impl Into<String>) -> Self {
        Self {
            client,
            node_id: node_id.into(),
            prefix: "fleet".into(),
            out_queue: 65_536,
            events_stream: "FLEET_EVENTS".into(),
            events_subjects: "fleet.events.>".into(),
        }
    }
}

/// Counters of the node's cluster link.
#[derive(Default, Debug)]
pub struct ClusterMetrics {
    /// Publishes sent to the other nodes.
    pub sent: AtomicU64,
    /// Publishes received from other nodes and delivered here.
    pub received: AtomicU64,
    /// Copies dropped: the same message matched several subscriptions.
    pub duplicates: AtomicU64,
    /// Live publishes not sent because the queue to NATS was full (NATS down or slow).
    pub dropped: AtomicU64,
    /// Retained messages appended to the stream, and failed appends (retried).
    pub retained_stored: AtomicU64,
    pub retained_retries: AtomicU64,
    /// Whether the node has loaded the retained stream once (a late node converged).
    pub retained_loaded: AtomicBool,
    /// Sessions here ended because the device connected to another node.
    pub remote_takeovers: AtomicU64,
}

/// One publish leaving this node.
pub(crate) struct Outgoing {
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    /// Sent to the other nodes now (false: they get it from the events stream).
    live: bool,
}

/// The sending half, held by [`Local`]: never waits.
pub(crate) struct Egress {
    tx: mpsc::Sender<Outgoing>,
    metrics: Arc<ClusterMetrics>,
}

impl Egress {
    pub(crate) fn send(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool, live: bool) {
        if !live && !retain {
            return;
        }
        let m = Outgoing {
            topic: topic.to_owned(),
            payload: payload.clone(),
            qos,
            retain,
            live,
        };
        if self.tx.try_send(m).is_err() {
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A node's running cluster link.
pub struct ClusterLink {
    pub metrics: Arc<ClusterMetrics>,
    loaded: watch::Receiver<bool>,
}

impl ClusterLink {
    /// Waits until the node has loaded the retained stream once.
    pub async fn retained_loaded(&self) {
        let mut loaded = self.loaded.clone();
        let _ = loaded.wait_for(|l| *l).await;
    }
}

/// Joins the cluster: creates the retained stream if needed, and starts the egress, the
/// ingress and the retained follower. Errors only if NATS cannot create or find the stream.
pub(crate) async fn join(
    config: ClusterConfig,
    control: BrokerControl,
    local: Arc<Local>,
    system: SystemPublisher,
    filters: mpsc::UnboundedReceiver<String>,
) -> Result<ClusterLink, async_nats::Error> {
    let js = ensure_stream(&config).await?;
    control.registry.use_clock_epochs();

    let metrics = Arc::new(ClusterMetrics::default());
    let instance = format!(
        "{}~{:016x}",
        config.node_id,
        rand_u64() // a restarted node's sequence numbers start again under a new name
    );
    let (tx, rx) = mpsc::channel(config.out_queue.max(1));
    let _ = local.cluster.set(Egress {
        tx,
        metrics: metrics.clone(),
    });
    let (loaded_tx, loaded) = watch::channel(false);
    let arrivals = Arrivals::new(
        control.clone(),
        local.clone(),
        system.clone(),
        metrics.clone(),
    );

    tokio::spawn(egress(
        config.clone(),
        js.clone(),
        instance.clone(),
        control.clone(),
        rx,
        metrics.clone(),
    ));
    tokio::spawn(ingress(
        config.clone(),
        instance,
        arrivals.clone(),
        filters,
        metrics.clone(),
    ));
    tokio::spawn(follow_events(
        config.clone(),
        js.clone(),
        control.clone(),
        local.clone(),
        arrivals,
        metrics.clone(),
    ));
    tokio::spawn(follow_retained(
        config,
        js,
        control,
        local,
        metrics.clone(),
        loaded_tx,
    ));
    Ok(ClusterLink { metrics, loaded })
}

/// For a process with no broker of its own (a fleet-service replica): the platform's own
/// publishes through `control` (cohort updates, assignments, the offline presence of a lost
/// node's devices) go straight to every node, retained ones into the stream.
pub async fn attach_publisher(
    config: ClusterConfig,
    control: &BrokerControl,
) -> Result<Arc<ClusterMetrics>, async_nats::Error> {
    let js = ensure_stream(&config).await?;
    let metrics = Arc::new(ClusterMetrics::default());
    let (tx, rx) = mpsc::channel(config.out_queue.max(1));
    let _ = control.remote.set(Egress {
        tx,
        metrics: metrics.clone(),
    });
    let instance = format!("{}~{:016x}", config.node_id, rand_u64());
    tokio::spawn(egress(
        config,
        js,
        instance,
        control.clone(),
        rx,
        metrics.clone(),
    ));
    Ok(metrics)
}

async fn ensure_stream(config: &ClusterConfig) -> Result<jetstream::Context, async_nats::Error> {
    let js = jetstream::new(config.client.clone());
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{}.retained.>", config.prefix)],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok(js)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

const ORIGIN: &str = "Fleet-Origin";
const SEQ: &str = "Fleet-Seq";
const QOS: &str = "Fleet-Qos";

/// Sends what this node accepted to the others, and appends retained messages to the stream
/// (retried, newest per topic, until the stream has them).
async fn egress(
    config: ClusterConfig,
    js: jetstream::Context,
    instance: String,
    control: BrokerControl,
    mut rx: mpsc::Receiver<Outgoing>,
    metrics: Arc<ClusterMetrics>,
) {
    let live_prefix = format!("{}.mqtt", config.prefix);
    let retained_prefix = format!("{}.retained", config.prefix);
    let mut seq = 0u64;
    // Retained appends in flight or waiting for a retry: the newest sequence per topic, so an
    // older one that failed never overwrites a newer one.
    let mut newest: HashMap<String, u64> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut retry: Vec<(u64, Outgoing)> = Vec::new();
    let mut retry_tick = tokio::time::interval(Duration::from_millis(500));
    let mut down = false;
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return };
                seq += 1;
                if !m.live {
                    if !stale_presence(&control, &m) {
                        newest.insert(m.topic.clone(), seq);
                        in_flight.push(append_retained(&js, &retained_prefix, &instance, seq, m));
                    }
                    continue;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(ORIGIN, instance.as_str());
                headers.insert(SEQ, seq.to_string().as_str());
                headers.insert(QOS, m.qos.to_string().as_str());
                let subject = subject::topic_subject(&live_prefix, &m.topic);
                match config.client.publish_with_headers(subject, headers, m.payload.clone()).await {
                    Ok(()) => {
                        metrics.sent.fetch_add(1, Ordering::Relaxed);
                        if down {
                            down = false;
                            info!("cluster link: publishing to NATS again");
                        }
                    }
                    Err(e) => {
                        metrics.dropped.fetch_add(1, Ordering::Relaxed);
                        if !down {
                            down = true;
                            warn!(error = %e, "cluster link: cannot publish to NATS; live messages to other nodes are dropped until it is back");
                        }
                    }
                }
                if m.retain && !stale_presence(&control, &m) {
                    newest.insert(m.topic.clone(), seq);
                    in_flight.push(append_retained(&js, &retained_prefix, &instance, seq, m));
                }
            }
            Some((seq, m, result)) = in_flight.next(), if !in_flight.is_empty() => {
                match result {
                    Ok(()) => {
                        metrics.retained_stored.fetch_add(1, Ordering::Relaxed);
                        if newest.get(&m.topic) == Some(&seq) {
                            newest.remove(&m.topic);
                        }
                    }
                    Err(e) => {
                        metrics.retained_retries.fetch_add(1, Ordering::Relaxed);
                        debug!(topic = %m.topic, error = %e, "retained message not stored; retrying");
                        if newest.get(&m.topic) == Some(&seq) {
                            retry.push((seq, m));
                        }
                    }
                }
            }
            _ = retry_tick.tick(), if !retry.is_empty() => {
                for (seq, m) in retry.drain(..) {
                    if newest.get(&m.topic) == Some(&seq) {
                        in_flight.push(append_retained(&js, &retained_prefix, &instance, seq, m));
                    }
                }
            }
        }
    }
}

type Appended = (u64, Outgoing, Result<(), String>);

fn append_retained(
    js: &jetstream::Context,
    prefix: &str,
    instance: &str,
    seq: u64,
    m: Outgoing,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Appended> + Send>> {
    let js = js.clone();
    let subject = subject::topic_subject(prefix, &m.topic);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ORIGIN, instance);
    headers.insert(QOS, m.qos.to_string().as_str());
    Box::pin(async move {
        let result = async {
            let ack = js
                .publish_with_headers(subject, headers, m.payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .map_err(|_| "no ack within 5 s".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        (seq, m, result)
    })
}

/// A presence message of a session older than one this node knows of (the old session of a
/// device that meanwhile connected to another node): it must not become the retained one.
fn stale_presence(control: &BrokerControl, m: &Outgoing) -> bool {
    let Ok(Topic::Presence(id)) = Topic::parse(&m.topic) else {
        return false;
    };
    let Ok(p) = serde_json::from_slice::<Presence>(&m.payload) else {
        return false;
    };
    control
        .registry
        .device(&id)
        .is_some_and(|d| d.session_epoch > p.epoch)
}

/// The subjects every node follows for its devices: what devices may subscribe to (their
/// commands, their assignment, their application subtree, their cohort's topics; their acks
/// come from the events stream). A handful of wildcard subjects, whatever the fleet's size.
fn device_subjects(prefix: &str) -> Vec<String> {
    let p = format!("{prefix}.mqtt");
    [
        "devices/+/commands",
        "devices/+/assignment",
        "devices/+/app/#",
        "cohorts/#",
    ]
    .iter()
    .flat_map(|f| subject::filter_subjects(&p, f))
    .collect()
}

async fn ingress(
    config: ClusterConfig,
    instance: String,
    arrivals: Arrivals,
    mut filters: mpsc::UnboundedReceiver<String>,
    metrics: Arc<ClusterMetrics>,
) {
    let live_prefix = format!("{}.mqtt", config.prefix);
    let mut subscribed = HashSet::new();
    let mut subs = SelectAll::new();
    for s in device_subjects(&config.prefix) {
        subscribe(&config.client, &mut subscribed, &mut subs, s).await;
    }
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            f = filters.recv() => {
                let Some(filter) = f else { return };
                for s in subject::filter_subjects(&live_prefix, &filter) {
                    subscribe(&config.client, &mut subscribed, &mut subs, s).await;
                }
            }
            Some(msg) = subs.next(), if !subs.is_empty() => {
                let Some(headers) = msg.headers.as_ref() else { continue };
                let (Some(origin), Some(seq)) = (
                    headers.get(ORIGIN).map(|v| v.as_str().to_owned()),
                    headers.get(SEQ).and_then(|v| v.as_str().parse::<u64>().ok()),
                ) else {
                    continue;
                };
                if origin == instance {
                    continue;
                }
                if !seen.first_time(&origin, seq) {
                    metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(topic) = subject::subject_topic(&live_prefix, msg.subject.as_str()) else {
                    continue;
                };
                let qos = headers
                    .get(QOS)
                    .and_then(|v| v.as_str().parse::<u8>().ok())
                    .unwrap_or(0)
                    .min(2);
                // Presence never comes this way (device events come from the events stream).
                arrivals
                    .deliver(Arrival {
                        parsed: Topic::parse(&topic).ok(),
                        topic,
                        payload: msg.payload,
                        qos,
                    })
                    .await;
            }
        }
    }
}

async fn subscribe(
    client: &async_nats::Client,
    subscribed: &mut HashSet<String>,
    subs: &mut SelectAll<async_nats::Subscriber>,
    subject: String,
) {
    if subscribed.contains(&subject) {
        return;
    }
    match client.subscribe(subject.clone()).await {
        Ok(s) => {
            subs.push(s);
            subscribed.insert(subject);
        }
        Err(e) => warn!(%subject, error = %e, "cluster link: cannot subscribe"),
    }
}

/// A device connected to another node: later sessions here must get a larger epoch, an older
/// session here ends, and a persistent session it left here is dropped (it lives there now).
fn remote_presence(
    control: &BrokerControl,
    local: &Local,
    payload: &[u8],
    metrics: &ClusterMetrics,
) {
    let Ok(p) = serde_json::from_slice::<Presence>(payload) else {
        return;
    };
    if p.event != PresenceEvent::Connected {
        return;
    }
    control.registry.observe_epoch(&p.device_id, p.epoch);
    match control.session_epoch(&p.device_id) {
        Some(here) if here < p.epoch => {
            if control.disconnect_device(&p.device_id, DisconnectReason::Takeover) {
                metrics.remote_takeovers.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(_) => {}
        None => {
            local.inboxes.forget(&p.device_id);
        }
    }
}

/// Delivers the device events other nodes made durable (telemetry, state, acks, update
/// reports, presence) to this node's subscribers, from the events stream: a subscriber sees an
/// event once it is durable, and none is lost while NATS restarts (the follower goes on after
/// the last one it delivered). Starts with the events appended after the node joined.
async fn follow_events(
    config: ClusterConfig,
    js: jetstream::Context,
    control: BrokerControl,
    local: Arc<Local>,
    arrivals: Arrivals,
    metrics: Arc<ClusterMetrics>,
) {
    let node_id = config.node_id.clone();
    follow::follow(
        js,
        config.events_stream.clone(),
        config.events_subjects.clone(),
        follow::From::New,
        |f| {
            let (control, local, arrivals, metrics, node_id) =
                (&control, &local, &arrivals, &metrics, &node_id);
            async move {
                let m = f.message;
                debug!(subject = %m.subject, seq = f.stream_sequence, "cluster link: event");
                let Some(headers) = m.headers.as_ref() else {
                    return;
                };
                if headers.get(crate::bus::jetstream::NODE).map(|v| v.as_str())
                    == Some(node_id.as_str())
                {
                    return;
                }
                let Some(topic) = headers.get(crate::bus::jetstream::TOPIC) else {
                    return;
                };
                let topic = topic.as_str().to_owned();
                let parsed = Topic::parse(&topic).ok();
                if let Some(Topic::Presence(_)) = &parsed {
                    remote_presence(control, local, &m.payload, metrics);
                }
                arrivals
                    .deliver(Arrival {
                        topic,
                        parsed,
                        payload: m.payload,
                        qos: 1,
                    })
                    .await;
            }
        },
        || {},
    )
    .await;
}

/// Applies the retained stream to this node's retained store, in the stream's order; loads
/// every topic's last message first, then follows.
async fn follow_retained(
    config: ClusterConfig,
    js: jetstream::Context,
    control: BrokerControl,
    local: Arc<Local>,
    metrics: Arc<ClusterMetrics>,
    loaded: watch::Sender<bool>,
) {
    let prefix = format!("{}.retained", config.prefix);
    let count = AtomicU64::new(0);
    follow::follow(
        js,
        STREAM.to_owned(),
        format!("{prefix}.>"),
        follow::From::LastPerSubject,
        |f| {
            let (control, local, prefix, count) = (&control, &local, &prefix, &count);
            async move {
                let m = f.message;
                if let Some(topic) = subject::subject_topic(prefix, m.subject.as_str()) {
                    let qos = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(QOS))
                        .and_then(|v| v.as_str().parse::<u8>().ok())
                        .unwrap_or(1)
                        .min(1);
                    apply_retained(control, local, topic, m.payload, qos);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        },
        || {
            if !*loaded.borrow() {
                finish_loading(&loaded, &metrics, count.load(Ordering::Relaxed));
            }
        },
    )
    .await;
}

fn finish_loading(loaded: &watch::Sender<bool>, metrics: &ClusterMetrics, n: u64) {
    metrics.retained_loaded.store(true, Ordering::Relaxed);
    let _ = loaded.send(true);
    info!(messages = n, "cluster link: retained messages loaded");
}

fn apply_retained(control: &BrokerControl, local: &Local, topic: String, payload: Bytes, qos: u8) {
    if let Ok(Topic::Presence(id)) = Topic::parse(&topic) {
        // An older session's presence never replaces a newer one's.
        if let Ok(p) = serde_json::from_slice::<Presence>(&payload) {
            control.registry.observe_epoch(&id, p.epoch);
            if local.retained_presence_epoch(&topic) > Some(p.epoch) {
                return;
            }
        }
    }
    local.retained.set(Arc::new(Message {
        topic,
        payload,
        qos,
        props: None,
    }));
}

/// Which sequence numbers of each origin were already delivered, within a window of the most
/// recent 65,536 per origin (one message can arrive once per matching subscription).
#[derive(Default)]
struct Seen {
    origins: HashMap<String, Window>,
}

const WINDOW_WORDS: usize = 1024;
const WINDOW: u64 = (WINDOW_WORDS * 64) as u64;

struct Window {
    high: u64,
    bits: Box<[u64; WINDOW_WORDS]>,
}

impl Seen {
    fn first_time(&mut self, origin: &str, seq: u64) -> bool {
        let w = match self.origins.get_mut(origin) {
            Some(w) => w,
            None => self.origins.entry(origin.to_owned()).or_insert(Window {
                high: 0,
                bits: Box::new([0; WINDOW_WORDS]),
            }),
        };
        w.first_time(seq)
    }
}

impl Window {
    fn first_time(&mut self, seq: u64) -> bool {
        if seq > self.high {
            if seq - self.high >= WINDOW {
                self.bits.fill(0);
            } else {
                for s in self.high + 1..seq {
                    self.clear(s);
                }
            }
            self.high = seq;
            self.set(seq);
            return true;
        }
        if self.high - seq >= WINDOW {
            // Older than the window: it was delivered (or given up) long ago.
            return false;
        }
        let (word, bit) = Self::at(seq);
        let first = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        first
    }

    fn at(seq: u64) -> (usize, u64) {
        let i = (seq % WINDOW) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    fn set(&mut self, seq: u64) {
        let (w, b) = Self::at(seq);
        self.bits[w] |= b;
    }

    fn clear(&mut self, seq: u64) {
        let (w, b) = Self::at(seq);
        self.bits[w] &= !b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_is_delivered_once_whatever_the_order() {
        let mut seen = Seen::default();
        assert!(seen.first_time("a", 1));
        assert!(seen.first_time("a", 3));
        assert!(!seen.first_time("a", 1), "copy of 1");
        assert!(
            seen.first_time("a", 2),
            "2 arrived after 3 on another subscription"
        );
        assert!(!seen.first_time("a", 2));
        assert!(!seen.first_time("a", 3));
        assert!(seen.first_time("b", 1), "origins are separate");
        assert!(seen.first_time("a", 3 + WINDOW));
        assert!(!seen.first_time("a", 3), "older than the window");
        assert!(seen.first_time("a", 4 + WINDOW));
    }
}
