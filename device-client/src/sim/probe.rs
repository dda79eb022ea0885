//! `telemetry`'s delivery probes ([`Probes`]): once publishing is over and acknowledged, the
//! observer's session (a backend service) sends commands to the devices that subscribed,
//! first one on a topic they all subscribed to (e.g. `cohorts/<cohort id>/commands`), timed
//! until the last device had it, then one at a time to single devices picked at random, each
//! timed until that device had it.
//!
//! The messages are `fanout`'s commands (`run`, `seq`, `ts_us` in `params`): `seq` 0 is the
//! fan-out, `1..=commands` the single commands. Times are taken on one monotonic clock in this
//! process, from just before the publish is handed to the client to the device's receipt.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant as StdInstant};

use rand::seq::SliceRandom;
use tokio::time::Instant;

use super::fanout::{now_us, payload, probe_params};
use super::hist::{Histogram, SharedHistogram};
use super::report::{CommandProbeReport, FanoutProbeReport, ProbeReport};
use super::{Ctx, Probes, Qos};
use crate::mqtt::{MqttClient, SubmitError};

/// Payload bytes of a probe.
const SIZE: usize = 128;
/// After this many single commands in a row went unanswered, the rest are not sent.
const GIVE_UP_AFTER: u32 = 3;
/// How long a probe may wait for room in the publisher's request queue.
const SUBMIT_WAIT: Duration = Duration::from_secs(2);
const UNSET: usize = usize::MAX;

/// What the devices received of the probes; written by the device tasks.
pub(crate) struct Inbox {
    run: u64,
    epoch: StdInstant,
    /// When the fan-out probe was handed to the publisher, µs after `epoch`.
    fanout_sent_us: AtomicU64,
    /// Per device: the fan-out probe arrived.
    fanout_got: Vec<AtomicBool>,
    fanout_received: AtomicU64,
    /// When the last device had the fan-out probe, µs after `epoch`.
    fanout_last_us: AtomicU64,
    fanout_latency: SharedHistogram,
    /// Per single command (by `seq`): the device it is for.
    targets: Vec<AtomicUsize>,
    /// Per device: the newest single command it received (`seq`, 0 for none) and when.
    command_seq: Vec<AtomicU64>,
    command_at_us: Vec<AtomicU64>,
    /// A single command received by another device than its own.
    misdelivered: AtomicU64,
    duplicates: AtomicU64,
    /// Probe-shaped or other messages not of this run (e.g. another shard's fan-out probe).
    foreign: AtomicU64,
}

impl Inbox {
    /// For `devices` devices and `commands` single commands.
    pub(crate) fn new(devices: usize, commands: usize) -> Self {
        Self {
            run: rand::random::<u64>() >> 11,
            epoch: StdInstant::now(),
            fanout_sent_us: AtomicU64::new(0),
            fanout_got: (0..devices).map(|_| AtomicBool::new(false)).collect(),
            fanout_received: AtomicU64::new(0),
            fanout_last_us: AtomicU64::new(0),
            fanout_latency: SharedHistogram::new(16),
            targets: (0..=commands).map(|_| AtomicUsize::new(UNSET)).collect(),
            command_seq: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            command_at_us: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            misdelivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }
    }

    fn since_epoch_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A message device `index` received on any of its subscriptions.
    pub(crate) fn on_message(&self, index: usize, body: &[u8]) {
        let at = self.since_epoch_us();
        let probe = probe_params(body)
            .filter(|p| p.run == self.run && (p.seq as usize) < self.targets.len());
        let Some(p) = probe else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if p.seq == 0 {
            if self.fanout_got[index].swap(true, Ordering::Relaxed) {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let sent = self.fanout_sent_us.load(Ordering::Relaxed);
            self.fanout_latency
                .record(index, Duration::from_micros(at.saturating_sub(sent)));
            self.fanout_last_us.fetch_max(at, Ordering::Relaxed);
            // Release: whoever sees the count sees the time.
            self.fanout_received.fetch_add(1, Ordering::Release);
            return;
        }
        if self.targets[p.seq as usize].load(Ordering::Relaxed) != index {
            self.misdelivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.command_seq[index].load(Ordering::Acquire) == p.seq {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.command_at_us[index].store(at, Ordering::Relaxed);
        self.command_seq[index].store(p.seq, Ordering::Release);
    }

    /// When device `index` received single command `seq`, µs after the epoch, if it did.
    fn command_received(&self, index: usize, seq: u64) -> Option<u64> {
        (self.command_seq[index].load(Ordering::Acquire) == seq)
            .then(|| self.command_at_us[index].load(Ordering::Relaxed))
    }
}

/// Sends the probes through `publisher` to the devices in `subscribed` (this shard's indices
/// of the devices whose subscriptions were granted and whose session is up) and waits for
/// each.
pub(crate) async fn run(
    ctx: &Ctx,
    publisher: &MqttClient,
    inbox: &Inbox,
    probes: &Probes,
    subscribed: &[usize],
) -> ProbeReport {
    let mut error = None;
    let fanout = match &probes.fanout_topic {
        Some(topic) => {
            let topic = format!("{}{topic}", ctx.config.topic_prefix);
            inbox
                .fanout_sent_us
                .store(inbox.since_epoch_us(), Ordering::Relaxed);
            let body = payload(inbox.run, 0, now_us(), SIZE);
            let sent = submit(publisher, &topic, body).await;
            let expected = subscribed.len() as u64;
            let until = Instant::now() + probes.timeout;
            let received = || inbox.fanout_received.load(Ordering::Acquire);
            while sent.is_ok() && received() < expected && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if let Err(e) = sent {
                error = Some(format!("fan-out probe not sent: {e}"));
            }
            let received = received();
            let since_sent = |at: u64| {
                let sent = inbox.fanout_sent_us.load(Ordering::Relaxed);
                at.saturating_sub(sent) as f64 / 1000.0
            };
            let last = since_sent(inbox.fanout_last_us.load(Ordering::Relaxed));
            Some(FanoutProbeReport {
                topic,
                expected,
                received,
                all_received_ms: (expected > 0 && received >= expected).then_some(last),
                last_received_ms: (received > 0).then_some(last),
                delivery_latency: inbox.fanout_latency.snapshot().summary_ms(),
            })
        }
        None => None,
    };

    let commands = (probes.commands > 0).then(|| {
        let mut picked: Vec<usize> = subscribed
            .choose_multiple(&mut rand::thread_rng(), probes.commands)
            .copied()
            .collect();
        picked.shuffle(&mut rand::thread_rng());
        picked
    });
    let commands = match commands {
        Some(picked) => {
            let mut latency = Histogram::new();
            let mut report = CommandProbeReport {
                sampled: picked.len() as u64,
                ..CommandProbeReport::default()
            };
            let mut unanswered_in_a_row = 0;
            for (k, &index) in picked.iter().enumerate() {
                if unanswered_in_a_row >= GIVE_UP_AFTER || Instant::now() >= ctx.deadline {
                    report.skipped += 1;
                    continue;
                }
                let seq = k as u64 + 1;
                inbox.targets[k + 1].store(index, Ordering::Relaxed);
                let sent_us = inbox.since_epoch_us();
                let body = payload(inbox.run, seq, now_us(), SIZE);
                if let Err(e) = submit(publisher, &ctx.commands_topic(index), body).await {
                    error.get_or_insert_with(|| format!("command probe not sent: {e}"));
                    report.skipped += 1;
                    unanswered_in_a_row += 1;
                    continue;
                }
                report.sent += 1;
                let until = Instant::now() + probes.timeout;
                loop {
                    if let Some(at) = inbox.command_received(index, seq) {
                        latency.record(at.saturating_sub(sent_us));
                        report.delivered += 1;
                        unanswered_in_a_row = 0;
                        break;
                    }
                    if Instant::now() >= until {
                        report.timed_out += 1;
                        unanswered_in_a_row += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            report.misdelivered = inbox.misdelivered.load(Ordering::Relaxed);
            report.latency = latency.summary_ms();
            Some(report)
        }
        None => None,
    };
    ProbeReport {
        fanout,
        commands,
        duplicates: inbox.duplicates.load(Ordering::Relaxed),
        foreign: inbox.foreign.load(Ordering::Relaxed),
        error,
    }
}

/// Hands a QoS 1 probe to the publisher, waiting briefly for room in its request queue.
async fn submit(publisher: &MqttClient, topic: &str, body: Vec<u8>) -> Result<(), String> {
    let until = Instant::now() + SUBMIT_WAIT;
    loop {
        match publisher.publish_to(topic.to_owned(), Qos::AtLeastOnce, body.clone()) {
            Ok(()) => return Ok(()),
            Err(SubmitError::Full) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(SubmitError::Full) => return Err("the publisher's queue stayed full".into()),
            Err(_) => return Err("the publisher's session ended".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(run: u64, seq: u64) -> Vec<u8> {
        payload(run, seq, now_us(), SIZE)
    }

    #[test]
    fn the_inbox_tells_probes_apart() {
        let inbox = Inbox::new(3, 2);
        let run = inbox.run;
        // The fan-out probe reaches devices 0 and 2, device 2 twice.
        for index in [0, 2, 2] {
            inbox.on_message(index, &probe(run, 0));
        }
        assert_eq!(inbox.fanout_received.load(Ordering::Relaxed), 2);
        assert!(inbox.fanout_got[0].load(Ordering::Relaxed));
        assert!(!inbox.fanout_got[1].load(Ordering::Relaxed));
        assert_eq!(inbox.fanout_latency.snapshot().count(), 2);
        // Command 1 is for device 1; device 0 gets it too (misdelivered), device 1 twice.
        inbox.targets[1].store(1, Ordering::Relaxed);
        assert_eq!(inbox.command_received(1, 1), None);
        for index in [1, 0, 1] {
            inbox.on_message(index, &probe(run, 1));
        }
        assert!(inbox.command_received(1, 1).is_some());
        assert_eq!(inbox.command_received(0, 1), None);
        assert_eq!(inbox.misdelivered.load(Ordering::Relaxed), 1);
        assert_eq!(inbox.duplicates.load(Ordering::Relaxed), 2);
        // Another run's probe, a number past the last command, and telemetry are foreign.
        inbox.on_message(0, &probe(run + 1, 0));
        inbox.on_message(0, &probe(run, 3));
        inbox.on_message(0, br#"{"seq":1,"ts_us":2,"pad":""}"#);
        assert_eq!(inbox.foreign.load(Ordering::Relaxed), 3);
        assert_eq!(inbox.fanout_received.load(Ordering::Relaxed), 2);
    }
}
