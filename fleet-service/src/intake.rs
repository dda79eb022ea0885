//! Event intake: the consumer of the broker's event bus.
//!
//! [`run`] pulls batches from an [`EventSource`], decodes each delivery by its topic, groups the
//! batch per device, and writes it to the store in one transaction. Only after that commit is
//! every delivery acked, so the broker's PUBACK means "in the database".
//!
//! # Invariants
//! - Nothing is acked before its batch commits. A transient database failure retries the whole
//!   batch with backoff, for as long as it takes; nothing is dropped.
//! - A delivery that can never succeed (unknown topic, invalid payload, unknown device) is
//!   rejected with a reason and does not hold up the rest of its batch.
//! - Every write is idempotent (conditional presence, `ON CONFLICT DO NOTHING` telemetry,
//!   newest-wins state, a command ack's final status kept), so a redelivered or retried event
//!   changes nothing twice.
//! - A presence event older than the stored `(session_epoch, presence_rank)` changes nothing,
//!   and is acked: it was seen and deliberately ignored.
//! - A session is recorded as held by the broker node that received the event
//!   ([`BusMessage::node`]), or by [`IntakeOptions::node_id`] when the event names none. A
//!   batch mixing presence events of several nodes is written as one transaction per node.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use broker::bus::{BusMessage, Delivery, EventSource};
use fleet_wire::payload::{CommandAck, CommandStatus, Presence, ReportedState};
use fleet_wire::update::UpdateStatus;
use fleet_wire::{DeviceId, Topic};

use crate::store::{
    CommandAckRow, EventBatch, EventOutcome, LatestTelemetry, ReportedChange, Store, StoreError,
    TelemetryRow, UpdateReport,
};

/// How the intake runs.
#[derive(Debug, Clone)]
pub struct IntakeOptions {
    /// The node whose broker produces these events, for events that do not name their node
    /// ([`BusMessage::node`] empty, as on the embedded bus); recorded as the holder of the
    /// sessions that `connected` presence events announce, and later used by
    /// [`Store::mark_node_offline`].
    pub node_id: String,
    /// Most deliveries taken into one transaction.
    pub max_batch: usize,
    /// First wait after a transient database failure; doubles per attempt up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for IntakeOptions {
    fn default() -> Self {
        Self {
            node_id: "local".to_owned(),
            max_batch: 1024,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Counters of one [`run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeStats {
    pub batches: u64,
    pub acked: u64,
    pub rejected: u64,
    /// Presence events ignored because a newer one was already stored.
    pub presence_stale: u64,
    /// Telemetry already in the history (redeliveries).
    pub telemetry_duplicates: u64,
    /// Batch attempts that failed transiently and were retried.
    pub retries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The store was closed under the intake; the deliveries in hand were neither acked nor
    /// rejected, so their publishers see the bus as closed.
    #[error("the store was closed while the intake was running")]
    StoreClosed,
}

/// Consumes `source` until it ends (every producer is gone), committing events to `store`,
/// and logs how it went. See [`Intake::run`] for the counters.
pub async fn run(source: impl EventSource, store: Store, opts: IntakeOptions) {
    match Intake::new(store, opts).run(source).await {
        Ok(stats) => tracing::info!(?stats, "event intake finished"),
        Err(e) => tracing::error!(error = %e, "event intake stopped"),
    }
}

/// The intake loop and its counters.
pub struct Intake {
    store: Store,
    opts: IntakeOptions,
    stats: IntakeStats,
}

impl Intake {
    pub fn new(store: Store, opts: IntakeOptions) -> Self {
        Self {
            store,
            opts,
            stats: IntakeStats::default(),
        }
    }

    /// Consumes `source` until it ends, and returns what happened.
    pub async fn run(mut self, mut source: impl EventSource) -> Result<IntakeStats, IntakeError> {
        let max_batch = self.opts.max_batch.max(1);
        while let Some(batch) = source.recv_batch(max_batch).await {
            self.process(batch).await?;
        }
        Ok(self.stats)
    }
}

/// A decoded event, addressed to the device its topic names.
#[derive(Debug)]
enum Event {
    Presence(Presence),
    Telemetry {
        payload: String,
    },
    State {
        reported: String,
        firmware: Option<String>,
    },
    CommandAck(CommandAck),
    UpdateStatus(UpdateStatus),
}

/// A delivery that decoded; it waits for its batch to commit.
struct Pending {
    delivery: Delivery,
    device: DeviceId,
    event: Event,
}

impl Intake {
    async fn process(&mut self, deliveries: Vec<Delivery>) -> Result<(), IntakeError> {
        self.stats.batches += 1;
        let mut pending = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match decode(&delivery.msg) {
                Ok((device, event)) => pending.push(Pending {
                    delivery,
                    device,
                    event,
                }),
                Err(why) => {
                    tracing::warn!(topic = %delivery.msg.topic, reason = %why, "event rejected");
                    self.stats.rejected += 1;
                    delivery.reject(why);
                }
            }
        }
        for (node, part) in split_by_node(pending, &self.opts.node_id) {
            self.write(part, &node).await?;
        }
        Ok(())
    }

    /// Writes decoded events whose presence events all come from broker node `node`, in one
    /// transaction, and acks them.
    async fn write(&mut self, pending: Vec<Pending>, node: &str) -> Result<(), IntakeError> {
        let batch = group(&pending, node);
        match self.commit(&batch).await {
            Ok(outcome) => {
                self.settle(pending, &outcome);
                Ok(())
            }
            Err(e) if e.is_closed() => Err(IntakeError::StoreClosed),
            Err(e) => {
                // Something in the batch can never be written. Find it by writing each event
                // on its own, so the rest still goes through.
                tracing::error!(error = %e, events = pending.len(),
                    "event batch failed permanently; writing its events one by one");
                for p in pending {
                    let single = group(std::slice::from_ref(&p), node);
                    match self.commit(&single).await {
                        Ok(outcome) => self.settle(vec![p], &outcome),
                        Err(e) if e.is_closed() => return Err(IntakeError::StoreClosed),
                        Err(e) => {
                            tracing::error!(device_id = %p.device, topic = %p.delivery.msg.topic,
                                error = %e, "event cannot be stored; rejected");
                            self.stats.rejected += 1;
                            p.delivery
                                .reject("the fleet service cannot store this event");
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes `batch`, retrying transient failures with exponential backoff until it commits.
    async fn commit(&mut self, batch: &EventBatch) -> Result<EventOutcome, StoreError> {
        let mut delay = self.opts.retry_initial;
        let mut attempt = 1u32;
        loop {
            match self.store.apply_events(batch).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64,
                        "event batch failed transiently; retrying");
                    self.stats.retries += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.opts.retry_max);
                    attempt = attempt.saturating_add(1);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn settle(&mut self, pending: Vec<Pending>, outcome: &EventOutcome) {
        self.stats.presence_stale += outcome.presence_stale;
        self.stats.telemetry_duplicates += outcome.telemetry_duplicates;
        for p in pending {
            if outcome.unknown_devices.contains(&p.device) {
                tracing::warn!(device_id = %p.device, topic = %p.delivery.msg.topic,
                    "event for an unknown device rejected");
                self.stats.rejected += 1;
                p.delivery.reject(format!("unknown device {}", p.device));
                continue;
            }
            if let Event::CommandAck(ack) = &p.event {
                tracing::info!(device_id = %p.device, command_id = %ack.id, status = ?ack.status,
                    message = ack.message.as_deref().unwrap_or(""), "command acknowledged");
            }
            self.stats.acked += 1;
            p.delivery.ack();
        }
    }
}

/// Decodes one bus message into the device it concerns and the event, or says why it can
/// never be accepted.
fn decode(msg: &BusMessage) -> Result<(DeviceId, Event), String> {
    let topic = Topic::parse(&msg.topic).map_err(|e| format!("bad topic: {e}"))?;
    let event = match &topic {
        Topic::Presence(device) => {
            let p: Presence = serde_json::from_slice(&msg.payload)
                .map_err(|e| format!("invalid presence payload: {e}"))?;
            if &p.device_id != device {
                return Err(format!(
                    "presence payload names device {} on the topic of {device}",
                    p.device_id
                ));
            }
            Event::Presence(p)
        }
        Topic::Telemetry(_) => {
            fleet_wire::payload::validate_device_payload(&topic, &msg.payload)
                .map_err(|e| format!("invalid telemetry payload: {e}"))?;
            Event::Telemetry {
                payload: utf8(msg)?,
            }
        }
        Topic::State(_) => {
            fleet_wire::payload::validate_device_payload(&topic, &msg.payload)
                .map_err(|e| format!("invalid state payload: {e}"))?;
            let state: ReportedState = serde_json::from_slice(&msg.payload)
                .map_err(|e| format!("invalid state payload: {e}"))?;
            Event::State {
                reported: utf8(msg)?,
                firmware: state.firmware_version,
            }
        }
        Topic::CommandAck(_) => Event::CommandAck(
            serde_json::from_slice(&msg.payload)
                .map_err(|e| format!("invalid command ack payload: {e}"))?,
        ),
        Topic::UpdateStatus(_) => Event::UpdateStatus(
            serde_json::from_slice(&msg.payload)
                .map_err(|e| format!("invalid update status payload: {e}"))?,
        ),
        Topic::Commands(_)
        | Topic::Assignment(_)
        | Topic::CohortUpdates(_)
        | Topic::CohortCommands(_)
        | Topic::App(..) => {
            return Err(format!("{} is not an event topic", msg.topic));
        }
    };
    let device = topic
        .device()
        .cloned()
        .ok_or_else(|| format!("{} names no device", msg.topic))?;
    Ok((device, event))
}

fn utf8(msg: &BusMessage) -> Result<String, String> {
    String::from_utf8(msg.payload.to_vec()).map_err(|_| "payload is not UTF-8".to_owned())
}

/// Splits a batch so that each part's presence events come from one broker node (the node
/// a `connected` event names as the session's holder): the message's own node, or
/// `default_node` when the bus did not say. Other events go with the first part, so a batch
/// from one node stays one transaction.
fn split_by_node(pending: Vec<Pending>, default_node: &str) -> Vec<(String, Vec<Pending>)> {
    let mut parts: Vec<(String, Vec<Pending>)> = Vec::new();
    for p in pending {
        let node = match &*p.delivery.msg.node {
            "" => default_node,
            node => node,
        };
        let at = if matches!(p.event, Event::Presence(_)) {
            parts.iter().position(|(n, _)| n == node)
        } else {
            (!parts.is_empty()).then_some(0)
        };
        match at {
            Some(i) => parts[i].1.push(p),
            None => parts.push((node.to_owned(), vec![p])),
        }
    }
    parts
}

/// When the broker received a message; a producer that did not say gets "now".
fn received_at(msg: &BusMessage) -> i64 {
    if msg.received_at_ms > 0 {
        msg.received_at_ms
    } else {
        crate::store::now_ms()
    }
}

/// How events of one device order: `(received_at_ms, epoch, seq)`.
type Order = (i64, u64, u64);

/// Groups decoded events into what the store writes: the newest presence, telemetry and state
/// per device, every telemetry row once, and when each device was last heard from.
fn group(pending: &[Pending], node_id: &str) -> EventBatch {
    let mut presence: HashMap<&DeviceId, &Presence> = HashMap::new();
    let mut telemetry = Vec::new();
    let mut telemetry_keys = HashSet::new();
    // Newest wins, by (received_at, epoch, seq).
    let mut latest: HashMap<&DeviceId, (Order, &str)> = HashMap::new();
    let mut reported: HashMap<&DeviceId, (Order, &str, Option<&str>)> = HashMap::new();
    let mut seen: HashMap<&DeviceId, i64> = HashMap::new();
    let mut update_reports = Vec::new();
    // One ack per device and command: a final status over `accepted`, else the first.
    let mut acks: HashMap<(&DeviceId, &str), CommandAckRow> = HashMap::new();

    for p in pending {
        let msg = &p.delivery.msg;
        let at = received_at(msg);
        let order = (at, msg.epoch, msg.seq);
        match &p.event {
            Event::Presence(ev) => match presence.entry(&p.device) {
                Entry::Occupied(mut o) => {
                    if ev.order_key() >= o.get().order_key() {
                        o.insert(ev);
                    }
                }
                Entry::Vacant(v) => {
                    v.insert(ev);
                }
            },
            Event::Telemetry { payload } => {
                if telemetry_keys.insert((&p.device, msg.epoch, msg.seq)) {
                    telemetry.push(TelemetryRow {
                        device_id: p.device.clone(),
                        epoch: msg.epoch,
                        seq: msg.seq,
                        received_at_ms: at,
                        payload: payload.clone(),
                    });
                }
                let e = latest.entry(&p.device).or_insert((order, payload));
                if order >= e.0 {
                    *e = (order, payload);
                }
            }
            Event::State {
                reported: json,
                firmware,
            } => {
                let e = reported
                    .entry(&p.device)
                    .or_insert((order, json, firmware.as_deref()));
                if order >= e.0 {
                    *e = (order, json, firmware.as_deref());
                }
            }
            Event::CommandAck(ack) => {
                let row = CommandAckRow {
                    device_id: p.device.clone(),
                    command_id: ack.id.clone(),
                    status: ack.status,
                    message: ack.message.clone(),
                    at_ms: at,
                };
                match acks.entry((&p.device, ack.id.as_str())) {
                    Entry::Occupied(mut o) => {
                        if o.get().status == CommandStatus::Accepted
                            && ack.status != CommandStatus::Accepted
                        {
                            o.insert(row);
                        }
                    }
                    Entry::Vacant(v) => {
                        v.insert(row);
                    }
                }
            }
            Event::UpdateStatus(status) => update_reports.push(UpdateReport {
                device_id: p.device.clone(),
                status: status.clone(),
                at_ms: at,
            }),
        }
        if !matches!(p.event, Event::Presence(_)) {
            let s = seen.entry(&p.device).or_insert(at);
            *s = (*s).max(at);
        }
    }

    EventBatch {
        node_id: node_id.to_owned(),
        presence: presence.into_values().cloned().collect(),
        telemetry,
        latest_telemetry: latest
            .into_iter()
            .map(|(device, ((at, _, _), payload))| LatestTelemetry {
                device_id: device.clone(),
                payload: payload.to_owned(),
                at_ms: at,
            })
            .collect(),
        reported: reported
            .into_iter()
            .map(|(device, ((at, _, _), json, firmware))| ReportedChange {
                device_id: device.clone(),
                reported: json.to_owned(),
                firmware_version: firmware.map(str::to_owned),
                at_ms: at,
            })
            .collect(),
        seen: seen
            .into_iter()
            .map(|(device, at)| (device.clone(), at))
            .collect(),
        update_reports,
        command_acks: acks.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, payload: &str, epoch: u64, seq: u64, at: i64) -> BusMessage {
        BusMessage {
            topic: topic.to_owned(),
            payload: Bytes::from(payload.to_owned()),
            epoch,
            seq,
            received_at_ms: at,
            ..Default::default()
        }
    }

    #[test]
    fn decode_table() {
        let presence =
            r#"{"device_id":"d1","event":"connected","epoch":1,"ts_ms":5,"connected_at_ms":5}"#;
        let cases: &[(&str, &str, bool)] = &[
            ("devices/d1/telemetry", r#"{"t":1}"#, true),
            ("devices/d1/telemetry", "[1]", false),
            ("devices/d1/telemetry", "nope", false),
            (
                "devices/d1/state",
                r#"{"firmware_version":"1.2.3","x":1}"#,
                true,
            ),
            ("devices/d1/state", r#"{"firmware_version":7}"#, false),
            (
                "devices/d1/commands/ack",
                r#"{"id":"c1","status":"succeeded"}"#,
                true,
            ),
            ("devices/d1/commands/ack", r#"{"id":"c1"}"#, false),
            ("devices/d1/presence", presence, true),
            ("devices/d2/presence", presence, false),
            ("devices/d1/presence", r#"{"event":"connected"}"#, false),
            ("devices/d1/commands", r#"{"id":"c","name":"n"}"#, false),
            ("cohorts/c1/updates", "{}", false),
            ("cohorts/c1/commands", r#"{"id":"c","name":"n"}"#, false),
            (
                "devices/d1/updates",
                r#"{"deployment_id":"x","status":"downloading"}"#,
                true,
            ),
            (
                "devices/d1/updates",
                r#"{"deployment_id":"x","status":"timed_out"}"#,
                false,
            ),
            ("devices/d1/unknown", "{}", false),
            ("devices/a+b/telemetry", "{}", false),
        ];
        for (topic, payload, ok) in cases {
            let got = decode(&msg(topic, payload, 1, 1, 1));
            assert_eq!(got.is_ok(), *ok, "{topic} {payload}: {got:?}");
        }
    }

    #[tokio::test]
    async fn a_batch_splits_by_the_node_of_its_presence_events() {
        let presence = |node: &str| BusMessage {
            node: node.into(),
            ..msg(
                "devices/d1/presence",
                r#"{"device_id":"d1","event":"connected","epoch":1,"ts_ms":5,"connected_at_ms":5}"#,
                1,
                0,
                1,
            )
        };
        let sent = vec![
            BusMessage {
                node: "node-b".into(),
                ..msg("devices/d1/telemetry", r#"{"t":1}"#, 1, 1, 1)
            },
            presence("node-b"),
            presence("node-c"),
            presence(""),
            msg("devices/d1/telemetry", r#"{"t":2}"#, 1, 2, 1),
            presence("local"),
        ];
        let n = sent.len();
        let (bus, mut source) = broker::bus::embedded(n);
        for m in sent {
            // One poll queues the delivery, in order; nobody waits for its ack.
            let queued = futures::FutureExt::now_or_never(broker::bus::EventBus::publish(&bus, m));
            assert!(queued.is_none());
        }
        let mut deliveries = Vec::new();
        while deliveries.len() < n {
            deliveries.extend(source.recv_batch(n).await.unwrap());
        }
        let pending = deliveries
            .into_iter()
            .map(|delivery| {
                let (device, event) = decode(&delivery.msg).unwrap();
                Pending {
                    delivery,
                    device,
                    event,
                }
            })
            .collect();
        let parts: Vec<(String, usize)> = split_by_node(pending, "local")
            .into_iter()
            .map(|(node, part)| (node, part.len()))
            .collect();
        let want = [("node-b", 3), ("node-c", 1), ("local", 2)];
        let want: Vec<(String, usize)> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        assert_eq!(parts, want);
    }

    #[tokio::test]
    async fn a_batch_keeps_one_ack_per_command_a_final_status_first() {
        let acks = [
            ("d1", r#"{"id":"c1","status":"accepted"}"#),
            ("d1", r#"{"id":"c1","status":"succeeded","message":"done"}"#),
            ("d1", r#"{"id":"c1","status":"accepted"}"#),
            ("d1", r#"{"id":"c1","status":"failed"}"#),
            ("d1", r#"{"id":"c2","status":"accepted"}"#),
            ("d2", r#"{"id":"c1","status":"rejected"}"#),
        ];
        let n = acks.len();
        let (bus, mut source) = broker::bus::embedded(n);
        for (i, (device, payload)) in acks.iter().enumerate() {
            let m = msg(
                &format!("devices/{device}/commands/ack"),
                payload,
                1,
                i as u64,
                1,
            );
            assert!(
                futures::FutureExt::now_or_never(broker::bus::EventBus::publish(&bus, m)).is_none()
            );
        }
        let mut deliveries = Vec::new();
        while deliveries.len() < n {
            deliveries.extend(source.recv_batch(n).await.unwrap());
        }
        let pending: Vec<Pending> = deliveries
            .into_iter()
            .map(|delivery| {
                let (device, event) = decode(&delivery.msg).unwrap();
                Pending {
                    delivery,
                    device,
                    event,
                }
            })
            .collect();
        let batch = group(&pending, "local");
        let mut got: Vec<(String, String, CommandStatus, Option<String>)> = batch
            .command_acks
            .into_iter()
            .map(|a| (a.device_id.to_string(), a.command_id, a.status, a.message))
            .collect();
        got.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        assert_eq!(
            got,
            vec![
                (
                    "d1".into(),
                    "c1".into(),
                    CommandStatus::Succeeded,
                    Some("done".into())
                ),
                ("d1".into(), "c2".into(), CommandStatus::Accepted, None),
                ("d2".into(), "c1".into(), CommandStatus::Rejected, None),
            ]
        );
        let seen: HashSet<String> = batch.seen.iter().map(|(d, _)| d.to_string()).collect();
        assert_eq!(seen, HashSet::from(["d1".to_owned(), "d2".to_owned()]));
    }

    #[test]
    fn decode_keeps_firmware_and_whole_state() {
        let (device, event) = decode(&msg(
            "devices/d1/state",
            r#"{"firmware_version":"2.0.0","uptime":3}"#,
            1,
            1,
            1,
        ))
        .unwrap();
        assert_eq!(device.as_str(), "d1");
        match event {
            Event::State { reported, firmware } => {
                assert_eq!(firmware.as_deref(), Some("2.0.0"));
                assert!(reported.contains("uptime"));
            }
            other => panic!("{other:?}"),
        }
    }
}
