//! `fanout`: the devices subscribe, each to its own topic (`devices/{id}/commands`, one publish
//! per device and message) or all to one (e.g. `cohorts/{cohort}/updates`, one publish reaches
//! every device), and a publisher (a backend service) sends numbered messages. Reports the
//! delivery latency, the time until the last device had each message, and loss.
//!
//! Payloads are commands, `{"id", "name": "sim-fanout", "params": {"run", "seq", "ts_us",
//! "pad"}}`, so a broker that checks the command schema accepts them; `run` is random per run,
//! so retained messages of earlier runs count as foreign.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use super::hist::{Histogram, SharedHistogram};
use super::report::FanoutReport;
use super::session::{connect_round, end_sessions, AfterConnect, RoundSpec, SessionRole};
use super::stats::{per_second, SeqSet};
use super::{Ctx, Fanout, Live, Outcome, Qos, SimError};
use crate::mqtt::{self, MqttClient, MqttEvent, SessionSpec, SubmitError};
use crate::tls::{SharedTls, TlsConfig};

/// After the last publish, how long the devices may take to receive everything.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);
/// How long the devices may take to have their subscriptions granted.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);
/// Time past the deadline allowed for ending sessions cleanly.
const GRACE: Duration = Duration::from_secs(5);
const UNSET: u64 = u64::MAX;

/// The receiving side of the devices.
pub(crate) struct Receiving {
    /// With the topic prefix; `{id}` stands for the device id.
    template: String,
    qos: Qos,
    run: u64,
    messages: u32,
    seqs: Vec<Mutex<SeqSet>>,
    granted: Vec<AtomicBool>,
    subscribed: AtomicU64,
    refused: AtomicU64,
    foreign: AtomicU64,
    latency: SharedHistogram,
    epoch: StdInstant,
    /// Per message: when its first publish was submitted, µs after `epoch`.
    first_sent_us: Vec<AtomicU64>,
    /// Per message: when the last device received it, µs after `epoch`.
    last_delivery_us: Vec<AtomicU64>,
}

impl Receiving {
    fn new(devices: usize, f: &Fanout, template: String) -> Self {
        Self {
            template,
            qos: f.qos,
            run: rand::random::<u64>() >> 11,
            messages: f.messages,
            seqs: (0..devices).map(|_| Mutex::default()).collect(),
            granted: (0..devices).map(|_| AtomicBool::new(false)).collect(),
            subscribed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            latency: SharedHistogram::new(16),
            epoch: StdInstant::now(),
            first_sent_us: (0..f.messages).map(|_| AtomicU64::new(UNSET)).collect(),
            last_delivery_us: (0..f.messages).map(|_| AtomicU64::new(UNSET)).collect(),
        }
    }

    fn per_device(&self) -> bool {
        self.template.contains("{id}")
    }

    fn topic_for(&self, ctx: &Ctx, index: usize) -> String {
        self.template
            .replace("{id}", ctx.devices[index].id.as_str())
    }

    /// Queues the device's SUBSCRIBE right after its CONNACK.
    pub(crate) fn subscribe(&self, ctx: &Ctx, index: usize, client: &MqttClient) {
        if client
            .subscribe_to(self.topic_for(ctx, index), self.qos)
            .is_err()
        {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn since_epoch_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

impl SessionRole for Receiving {
    type State = ();

    fn on_event(&self, _: &mut (), index: usize, event: MqttEvent, live: &Live) {
        match event {
            MqttEvent::SubAck { refused: 0 } => {
                self.granted[index].store(true, Ordering::Relaxed);
                self.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            MqttEvent::SubAck { .. } => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            MqttEvent::Message { payload, .. } => {
                let probe = probe_params(&payload)
                    .filter(|p| p.run == self.run && p.seq < u64::from(self.messages));
                let Some(p) = probe else {
                    self.foreign.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if self.seqs[index].lock().insert(p.seq) {
                    live.delivered.fetch_add(1, Ordering::Relaxed);
                    self.latency.record(
                        index,
                        Duration::from_micros(now_us().saturating_sub(p.ts_us)),
                    );
                    let at = self.since_epoch_us();
                    let last = &self.last_delivery_us[p.seq as usize];
                    let _ = last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        (v == UNSET || v < at).then_some(at)
                    });
                }
            }
            _ => {}
        }
    }
}

#[derive(Deserialize)]
struct Probe {
    params: ProbeParams,
}

/// What a message of [`payload`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct ProbeParams {
    pub run: u64,
    pub seq: u64,
    pub ts_us: u64,
}

/// The run, message number and send time of a message of [`payload`]; `None` for anything
/// else.
pub(crate) fn probe_params(body: &[u8]) -> Option<ProbeParams> {
    serde_json::from_slice::<Probe>(body).ok().map(|p| p.params)
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A command carrying the run, the message number and the send time, padded to `size`.
pub(crate) fn payload(run: u64, seq: u64, ts_us: u64, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"id":"fanout-{run}-{seq}","name":"sim-fanout","params":{{"run":{run},"seq":{seq},"ts_us":{ts_us},"pad":""#
    );
    super::telemetry::padded(&head, b"\"}}", size)
}

/// Counters of the publisher's session.
#[derive(Default)]
struct PublisherStats {
    sent: AtomicU64,
    acked: AtomicU64,
}

pub(crate) async fn run(ctx: &Arc<Ctx>, f: &Fanout) -> Result<Outcome, SimError> {
    let n = ctx.devices.len();
    let template = format!("{}{}", ctx.config.topic_prefix, f.topic);
    let size = payload(
        u64::MAX >> 11,
        u64::from(f.messages),
        now_us(),
        f.payload_size,
    )
    .len();
    let max_packet = (size + 1024).max(16 * 1024);
    let receiving = Arc::new(Receiving::new(n, f, template));
    let spec = RoundSpec {
        round: 1,
        label: "connect",
        concurrency: f.concurrency,
        rate: None,
        inflight: 4,
        capacity: 4,
        max_packet,
    };
    let mut round = connect_round(ctx, &spec, |_| AfterConnect::Receive(receiving.clone())).await;
    let connected = round.row.connected;
    let subscribed_by = (Instant::now() + SUBSCRIBE_WAIT).min(ctx.deadline);
    let answered = |r: &Receiving| {
        r.subscribed.load(Ordering::Relaxed) + r.refused.load(Ordering::Relaxed) >= connected
    };
    while !answered(&receiving) && Instant::now() < subscribed_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_connected = ctx.live.sample_rss();
    let mut truncated = round.truncated;

    // The publisher.
    let p = &f.publisher;
    let tls = match (
        p.url.is_tls(),
        p.server_ca_pem
            .as_ref()
            .or(ctx.config.server_ca_pem.as_ref()),
    ) {
        (true, Some(pem)) => {
            Some(SharedTls::new(&TlsConfig::from_ca_pem(pem)?)?.client_config(None)?)
        }
        (true, None) => return Err(crate::error::ConfigError::TlsRequired.into()),
        (false, _) => None,
    };
    let client_id = ctx.helper_client_id("publisher");
    let (publisher, mut event_loop) = mqtt::open_session(SessionSpec {
        url: &p.url,
        client_id: &client_id,
        tls,
        credentials: p.credentials.as_ref(),
        keep_alive: ctx.config.keep_alive,
        connect_timeout: ctx.config.connect_timeout,
        inflight: 100,
        capacity: 256,
        max_packet,
    });
    match event_loop.poll().await {
        Ok(MqttEvent::Connected { .. }) => {}
        Ok(other) => {
            return Err(SimError::Invalid(format!(
                "publisher: expected CONNACK, got {other:?}"
            )))
        }
        Err(e) => return Err(SimError::Invalid(format!("publisher: {e}"))),
    }
    let stats = Arc::new(PublisherStats::default());
    let driver = tokio::spawn({
        let stats = stats.clone();
        async move {
            loop {
                match event_loop.poll().await {
                    Ok(MqttEvent::Sent(_) | MqttEvent::SentAtMostOnce) => {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(MqttEvent::Acked(_)) => {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(MqttEvent::DisconnectSent) => return None,
                    Ok(_) => {}
                    Err(e) => return Some(e.to_string()),
                }
            }
        }
    });

    let targets: Vec<usize> = if receiving.per_device() {
        (0..n)
            .filter(|i| receiving.granted[*i].load(Ordering::Relaxed))
            .collect()
    } else {
        vec![0]
    };
    let start = Instant::now();
    let mut submitted = 0u64;
    let mut publisher_error = None;
    'messages: for seq in 0..f.messages {
        let at = start + f.interval * seq;
        if at >= ctx.deadline {
            truncated = true;
            break;
        }
        tokio::time::sleep_until(at).await;
        receiving.first_sent_us[seq as usize].store(receiving.since_epoch_us(), Ordering::Relaxed);
        for &index in &targets {
            let topic = receiving.topic_for(ctx, index);
            loop {
                let body = payload(receiving.run, u64::from(seq), now_us(), f.payload_size);
                match publisher.publish_to(topic.clone(), f.qos, body) {
                    Ok(()) => break,
                    Err(SubmitError::Full) if !driver.is_finished() => {
                        if Instant::now() >= ctx.deadline {
                            truncated = true;
                            break 'messages;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        publisher_error = Some("the publisher's session ended".to_owned());
                        break 'messages;
                    }
                }
            }
            submitted += 1;
        }
    }

    // Wait for the deliveries, then end everything.
    let receivers = receiving.subscribed.load(Ordering::Relaxed);
    let expected = u64::from(f.messages) * receivers;
    let until = (Instant::now() + DELIVERY_GRACE).min(ctx.deadline.max(Instant::now()) + GRACE);
    while ctx.live.delivered.load(Ordering::Relaxed) < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A PUBACK may come after the deliveries it led to: wait for it too before disconnecting,
    // or the last publishes would be counted unacknowledged.
    let want_acks = if f.qos == Qos::AtLeastOnce {
        submitted
    } else {
        0
    };
    while stats.acked.load(Ordering::Relaxed) < want_acks
        && !driver.is_finished()
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = publisher.disconnect();
    let mut driver = driver;
    match tokio::time::timeout(Duration::from_secs(5), &mut driver).await {
        Ok(Ok(Some(e))) => publisher_error = publisher_error.or(Some(e)),
        Ok(_) => {}
        Err(_) => driver.abort(),
    }
    end_sessions(&mut round, ctx.deadline.max(Instant::now()) + GRACE).await;

    let mut delivered = 0;
    let mut duplicates = 0;
    let mut lost = 0;
    for (seqs, granted) in receiving.seqs.iter().zip(&receiving.granted) {
        let seqs = seqs.lock();
        delivered += seqs.distinct();
        duplicates += seqs.duplicates();
        if granted.load(Ordering::Relaxed) {
            lost += seqs.missing_below(u64::from(f.messages));
        }
    }
    let mut completion = Histogram::new();
    let mut last_delivery = 0;
    for (first, last) in receiving
        .first_sent_us
        .iter()
        .zip(&receiving.last_delivery_us)
    {
        let (first, last) = (first.load(Ordering::Relaxed), last.load(Ordering::Relaxed));
        if first != UNSET && last != UNSET {
            completion.record(last.saturating_sub(first));
            last_delivery = last_delivery.max(last);
        }
    }
    let first_sent = receiving.first_sent_us[0].load(Ordering::Relaxed);
    let window = if first_sent == UNSET {
        Duration::ZERO
    } else {
        Duration::from_micros(last_delivery.saturating_sub(first_sent))
    };
    let fanout = FanoutReport {
        topic: receiving.template.clone(),
        per_device_topic: receiving.per_device(),
        qos: f.qos,
        payload_bytes: size,
        messages: f.messages,
        interval_s: f.interval.as_secs_f64(),
        publishes: submitted,
        publishes_acked: (f.qos == Qos::AtLeastOnce).then(|| stats.acked.load(Ordering::Relaxed)),
        subscribed: receivers,
        subscribe_refused: receiving.refused.load(Ordering::Relaxed),
        expected,
        delivered,
        duplicates,
        lost,
        foreign: receiving.foreign.load(Ordering::Relaxed),
        delivered_per_s: per_second(delivered, window),
        delivery_latency: receiving.latency.snapshot().summary_ms(),
        completion_latency: completion.summary_ms(),
        publisher_error,
    };
    Ok(Outcome {
        rounds: vec![round.row],
        telemetry: None,
        fanout: Some(fanout),
        churn: None,
        rss_connected,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_commands_of_the_requested_size() {
        for size in [0, 100, 1000] {
            let body = payload(42, 7, 1_700_000_000_000_000, size);
            let min = payload(42, 7, 1_700_000_000_000_000, 0).len();
            assert_eq!(body.len(), size.max(min));
            let command: fleet_wire::payload::Command = serde_json::from_slice(&body).unwrap();
            assert_eq!(command.name, "sim-fanout");
            assert_eq!(command.id, "fanout-42-7");
            let probe: Probe = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                (probe.params.run, probe.params.seq, probe.params.ts_us),
                (42, 7, 1_700_000_000_000_000)
            );
        }
    }

    #[test]
    fn receiving_counts_deliveries_duplicates_and_foreign_messages() {
        let f = Fanout {
            messages: 3,
            ..Fanout::default()
        };
        let r = Receiving::new(2, &f, "devices/{id}/commands".into());
        let live = Live::default();
        let msg = |run, seq| MqttEvent::Message {
            topic: "t".into(),
            payload: payload(run, seq, now_us(), 0),
        };
        r.on_event(&mut (), 0, MqttEvent::SubAck { refused: 0 }, &live);
        r.on_event(&mut (), 1, MqttEvent::SubAck { refused: 1 }, &live);
        for (index, event) in [
            (0, msg(r.run, 0)),
            (0, msg(r.run, 0)),
            (0, msg(r.run, 2)),
            (0, msg(r.run + 1, 1)),
            (0, msg(r.run, 3)),
            (
                0,
                MqttEvent::Message {
                    topic: "t".into(),
                    payload: b"{}".to_vec(),
                },
            ),
        ] {
            r.on_event(&mut (), index, event, &live);
        }
        assert_eq!(live.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(r.foreign.load(Ordering::Relaxed), 3);
        let seqs = r.seqs[0].lock();
        assert_eq!((seqs.distinct(), seqs.duplicates()), (2, 1));
        assert_eq!(seqs.missing_below(3), 1);
        assert_eq!(r.subscribed.load(Ordering::Relaxed), 1);
        assert_eq!(r.refused.load(Ordering::Relaxed), 1);
        assert!(r.granted[0].load(Ordering::Relaxed) && !r.granted[1].load(Ordering::Relaxed));
        assert_eq!(r.latency.snapshot().count(), 2);
        assert!(r.last_delivery_us[0].load(Ordering::Relaxed) != UNSET);
        assert_eq!(r.last_delivery_us[1].load(Ordering::Relaxed), UNSET);
        assert!(r.per_device());
    }
}
