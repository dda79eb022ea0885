//! `telemetry`: the devices connect, publish `{"seq", "ts_us", "pad"}` objects of about the
//! requested size at a fixed rate each, and an optional observer subscribes to their topics to
//! measure what the broker delivers: rate, end-to-end latency (from the embedded send time)
//! and loss (from the per-device sequence numbers).
//!
//! QoS 1 PUBACK latency is also reported apart for each device's first publish, whose topic is
//! new to the broker. With `subscribe_commands` every device first subscribes to its command
//! topic (and with `subscribe` to further filters), as the device agent does, and publishes
//! only once that is granted. With probes, the observer's session then sends messages to the
//! devices and times them (`probe`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use fleet_wire::Topic;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::hist::Histogram;
use super::identities::device_index;
use super::probe::{self, Inbox};
use super::report::{CommandsSubscriptionReport, IntervalRow, ObserverReport, TelemetryReport};
use super::session::{
    connect_round, end_sessions, join_sessions, AfterConnect, Publishing, RoundSpec,
};
use super::soak::{self, Churning};
use super::stats::{per_second, SeqSet, Usage};
use super::{Churn, Ctx, Live, Observe, Outcome, Qos, SimError, TelemetryLoad};
use crate::mqtt::{self, MqttClient, MqttEvent, MqttLoop, SessionSpec, SubmitError};
use crate::tls::{SharedTls, TlsConfig};

/// After publishing, how long to wait for outstanding acknowledgements.
const DRAIN: Duration = Duration::from_secs(10);
/// After the devices are done, how long the observer may take to receive the rest.
const OBSERVE_GRACE: Duration = Duration::from_secs(5);
/// Time past the deadline allowed for ending sessions cleanly.
const GRACE: Duration = Duration::from_secs(5);
/// After the devices connected, how long their command subscriptions may take to be answered.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);

/// Counters of the publishing tasks.
#[derive(Debug, Default)]
pub(crate) struct Offered {
    /// Due by the schedule.
    pub offered: AtomicU64,
    /// Due while the device's request queue was full.
    pub full: AtomicU64,
    /// Due while the device had no session.
    pub closed: AtomicU64,
}

/// Runs `telemetry`, or with `churn` a `soak`: the same publishing, while devices are dropped
/// and reconnect at random.
pub(crate) async fn run(
    ctx: &Arc<Ctx>,
    t: &TelemetryLoad,
    churn: Option<&Churn>,
) -> Result<Outcome, SimError> {
    let n = ctx.devices.len();
    let size = payload(0, now_us(), t.payload_size).len();
    let max_packet = (size + 1024).max(16 * 1024);

    let observer = match &t.observe {
        Some(o) => Some(Observer::start(ctx, o, t.qos, max_packet).await?),
        None => None,
    };

    let filters = t
        .subscribe
        .iter()
        .map(|f| format!("{}{f}", ctx.config.topic_prefix))
        .collect();
    let mut publishing = Publishing::new(n, t.qos, t.subscribe_commands, filters);
    publishing.inbox = t.probes.as_ref().map(|p| Inbox::new(n, p.commands));
    let publishing = Arc::new(publishing);
    let offered = Arc::new(Offered::default());
    let spec = RoundSpec {
        round: 1,
        label: "connect",
        concurrency: t.concurrency,
        rate: None,
        inflight: t.inflight,
        capacity: usize::from(t.inflight) + 2,
        max_packet,
    };
    let churning = churn.map(|c| {
        Arc::new(Churning::new(
            c.clone(),
            publishing.clone(),
            offered.clone(),
            &spec,
            n,
        ))
    });
    let mut round = connect_round(ctx, &spec, |_| match &churning {
        Some(c) => AfterConnect::Soak(c.clone()),
        None => AfterConnect::Publish(publishing.clone()),
    })
    .await;
    if let Some(commands) = &publishing.commands {
        let connected = round.row.connected;
        let until = (Instant::now() + SUBSCRIBE_WAIT).min(ctx.deadline);
        let answered = || {
            commands.granted.load(Ordering::Relaxed) + commands.refused.load(Ordering::Relaxed)
                >= connected
        };
        while !answered() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let rss_connected = ctx.live.sample_rss();
    let mut truncated = round.truncated;

    // Publish.
    let period = Duration::from_secs_f64(1.0 / t.rate);
    let start = Instant::now();
    let start_std = StdInstant::now();
    let start_unix = unix_s();
    let end = (start + t.duration).min(ctx.deadline);
    truncated |= start + t.duration > ctx.deadline;
    // Taken before any device can publish, so the rows add up to the totals.
    let (stop_sampler, stopped) = oneshot::channel();
    let sampler = t.report_every.map(|every| {
        let baseline = (counters(&ctx.live), Usage::now().cpu);
        tokio::spawn(intervals(
            ctx.clone(),
            publishing.clone(),
            (start, every, baseline),
            stopped,
        ))
    });
    let mut publishers = Vec::new();
    let mut churner = None;
    if let Some(c) = &churning {
        // The devices publish on their own sessions; the soak drops them at random meanwhile.
        c.begin(start, end, period, t.payload_size);
        churner = Some(tokio::spawn(soak::churn(c.clone(), start, end)));
    }
    for (index, (client, _)) in round.sessions.iter().enumerate() {
        if churning.is_some() {
            break;
        }
        let granted = || {
            publishing.devices[index]
                .commands_granted
                .load(Ordering::Relaxed)
        };
        if !round.connected[index] || (publishing.commands.is_some() && !granted()) {
            continue;
        }
        let offset = period.mul_f64(index as f64 / n as f64);
        let schedule = Schedule {
            first: start + offset,
            end,
            period,
            qos: t.qos,
            size: t.payload_size,
        };
        publishers.push(tokio::spawn(publish(
            ctx.clone(),
            index,
            client.clone(),
            (publishing.clone(), offered.clone()),
            schedule,
        )));
    }
    let devices_publishing = match &churning {
        Some(_) => round.row.connected,
        None => publishers.len() as u64,
    };
    for p in publishers {
        let _ = p.await;
    }
    if let Some(churner) = churner {
        // The devices' own drivers publish until `end`; the churn ends with its last drop.
        let _ = churner.await;
        tokio::time::sleep_until(end).await;
    }
    let end_std = StdInstant::now();

    // Wait for the acknowledgements, then end the sessions.
    let live = &ctx.live;
    let drain_until = (Instant::now() + DRAIN).min(ctx.deadline.max(Instant::now()) + GRACE);
    while !drained(live, t.qos) && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window_unix_s = Some([start_unix, unix_s()]);
    let probes = match (&t.probes, &observer, &publishing.inbox) {
        (Some(_), _, _) if Instant::now() >= ctx.deadline => {
            truncated = true;
            None
        }
        (Some(p), Some(o), Some(inbox)) if churning.is_none() => {
            let subscribed: Vec<usize> = (0..n)
                .filter(|i| {
                    let d = &publishing.devices[*i];
                    round.connected[*i]
                        && d.commands_granted.load(Ordering::Relaxed)
                        && !d.ended.load(Ordering::Relaxed)
                })
                .collect();
            Some(probe::run(ctx, &o.client, inbox, p, &subscribed).await)
        }
        _ => None,
    };
    let grace = ctx.deadline.max(Instant::now()) + GRACE;
    if let Some(c) = &churning {
        // Ended before the last row, so the rows count every drop and reconnect: a clean drop
        // or a reconnect still under way completes before its device task returns.
        c.stop();
        join_sessions(&mut round, grace).await;
    }
    let _ = stop_sampler.send(());
    let intervals = match sampler {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    if churning.is_none() {
        end_sessions(&mut round, grace).await;
    }

    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (submitted, sent, acked) = (get(&live.submitted), get(&live.sent), get(&live.acked));
    let observer = match observer {
        Some(o) => {
            let expected = match t.qos {
                Qos::AtLeastOnce => acked,
                Qos::AtMostOnce => sent,
            };
            let until =
                (Instant::now() + OBSERVE_GRACE).min(ctx.deadline.max(Instant::now()) + GRACE);
            while get(&live.delivered) < expected && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(o.finish(&publishing, start_std, end_std).await)
        }
        None => None,
    };

    let last_ack = publishing.started + Duration::from_micros(get(&publishing.last_ack_us));
    let window = last_ack.max(end_std) - start_std;
    let offered_window = end_std - start_std;
    let qos1 = t.qos == Qos::AtLeastOnce;
    let commands_subscription = publishing.commands.as_ref().map(|c| {
        let (granted, refused) = (get(&c.granted), get(&c.refused));
        CommandsSubscriptionReport {
            filters: c
                .commands
                .then(|| format!("{}devices/{{id}}/commands", ctx.config.topic_prefix))
                .into_iter()
                .chain(c.filters.iter().cloned())
                .collect(),
            granted,
            refused,
            unanswered: round.row.connected.saturating_sub(granted + refused),
            suback_latency: c.suback_latency.snapshot().summary_ms(),
        }
    });
    let telemetry = TelemetryReport {
        qos: t.qos,
        payload_bytes: size,
        rate_per_device: t.rate,
        devices_publishing,
        offered: get(&offered.offered),
        submitted,
        sent,
        acked: qos1.then_some(acked),
        not_sent_queue_full: get(&offered.full),
        not_sent_disconnected: get(&offered.closed),
        unacknowledged: qos1.then(|| submitted - acked),
        publish_window_s: offered_window.as_secs_f64(),
        offered_per_s: per_second(get(&offered.offered), offered_window),
        sent_per_s: per_second(sent, window),
        acked_per_s: qos1.then(|| per_second(acked, window)),
        puback_latency: qos1.then(|| publishing.puback_latency.snapshot().summary_ms()),
        first_puback_latency: qos1.then(|| publishing.first_puback_latency.snapshot().summary_ms()),
        later_puback_latency: qos1.then(|| publishing.later_puback_latency.snapshot().summary_ms()),
        commands_subscription,
        observer,
        intervals,
        window_unix_s,
        probes,
    };
    Ok(Outcome {
        rounds: vec![round.row],
        telemetry: Some(telemetry),
        fanout: None,
        churn: churning.map(|c| c.report(&ctx.live)),
        rss_connected,
        truncated,
    })
}

/// What the interval rows count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    lost_sessions: u64,
    sent: u64,
    acked: u64,
    delivered: u64,
    drops: u64,
    reconnects: u64,
    reconnect_failures: u64,
}

fn counters(live: &Live) -> Counters {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Counters {
        lost_sessions: get(&live.lost_sessions),
        sent: get(&live.sent),
        acked: get(&live.acked),
        delivered: get(&live.delivered),
        drops: get(&live.drops),
        reconnects: get(&live.reconnects),
        reconnect_failures: get(&live.reconnect_failures),
    }
}

/// A row every `every` from `start` until `stop`, counted from `baseline` (counters and process
/// CPU time). What happened between the last row and the stop gets a row of its own when that
/// span is at least half an interval; a shorter rest (the devices ending, the last deliveries)
/// is added to the last row, which then ends at the stop, so the table does not end with a
/// stray row of a few milliseconds.
async fn intervals(
    ctx: Arc<Ctx>,
    publishing: Arc<Publishing>,
    (start, every, baseline): (Instant, Duration, (Counters, Duration)),
    mut stop: oneshot::Receiver<()>,
) -> Vec<IntervalRow> {
    let live = &ctx.live;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut rows = Vec::new();
    let (mut before, mut cpu_before) = baseline;
    let mut tick = tokio::time::interval_at(start + every, every);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut stop => true,
        };
        let now = counters(live);
        let usage = Usage::now();
        live.rss_max.fetch_max(usage.rss, Ordering::Relaxed);
        let row = IntervalRow {
            end_s: start.elapsed().as_secs_f64(),
            connected: get(&live.connected),
            sessions_lost: now.lost_sessions - before.lost_sessions,
            sent: now.sent - before.sent,
            acked: now.acked - before.acked,
            delivered: now.delivered - before.delivered,
            drops: now.drops - before.drops,
            reconnects: now.reconnects - before.reconnects,
            reconnect_failures: now.reconnect_failures - before.reconnect_failures,
            puback_latency: publishing.interval_latency.take().summary_ms(),
            rss_bytes: usage.rss,
            cpu_s: usage.cpu.saturating_sub(cpu_before).as_secs_f64(),
        };
        if last {
            end_rows(&mut rows, row, every, now != before);
            return rows;
        }
        rows.push(row);
        before = now;
        cpu_before = usage.cpu;
    }
}

/// Closes the table with `rest`, what happened from the last row to the stop (`changed`: any
/// counter moved): its own row when it spans half an interval or more, else added to the last.
fn end_rows(rows: &mut Vec<IntervalRow>, rest: IntervalRow, every: Duration, changed: bool) {
    match rows.last_mut() {
        Some(row) if rest.end_s - row.end_s < every.as_secs_f64() / 2.0 => fold_into(row, rest),
        _ if changed => rows.push(rest),
        _ => {}
    }
}

/// Adds `rest`, what followed `row` until the stop, to `row`.
fn fold_into(row: &mut IntervalRow, rest: IntervalRow) {
    row.end_s = rest.end_s;
    row.connected = rest.connected;
    row.sessions_lost += rest.sessions_lost;
    row.sent += rest.sent;
    row.acked += rest.acked;
    row.delivered += rest.delivered;
    row.drops += rest.drops;
    row.reconnects += rest.reconnects;
    row.reconnect_failures += rest.reconnect_failures;
    if let Ok(latency) = row.puback_latency.merge(&rest.puback_latency) {
        row.puback_latency = latency;
    }
    row.rss_bytes = rest.rss_bytes;
    row.cpu_s += rest.cpu_s;
}

/// Whether every submitted publish is accounted for: acknowledged (QoS 1) or written
/// (QoS 0), or given up with its session.
fn drained(live: &Live, qos: Qos) -> bool {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let done = match qos {
        Qos::AtLeastOnce => get(&live.acked),
        Qos::AtMostOnce => get(&live.sent),
    };
    done + get(&live.abandoned) >= get(&live.submitted)
}

/// When and what one device publishes.
struct Schedule {
    first: Instant,
    end: Instant,
    period: Duration,
    qos: Qos,
    size: usize,
}

/// One device's publishing: a message every `period` from `first` until `end`.
async fn publish(
    ctx: Arc<Ctx>,
    index: usize,
    client: MqttClient,
    (publishing, offered): (Arc<Publishing>, Arc<Offered>),
    schedule: Schedule,
) {
    let Schedule {
        first,
        end,
        period,
        qos,
        size,
    } = schedule;
    let topic = ctx.telemetry_topic(index);
    let mut next = first;
    let mut seq = 0u64;
    while next < end {
        tokio::time::sleep_until(next).await;
        let due = Due {
            topic: &topic,
            qos,
            size,
            seq,
        };
        match submit(&ctx, index, &client, (&publishing, &offered), due) {
            Submitted::Queued => seq += 1,
            Submitted::Full => {}
            Submitted::Gone => {
                // The session is gone: this and every remaining tick go unsent.
                skip_ticks(&offered, &mut next, end, period, end);
                return;
            }
        }
        next += period;
    }
}

/// One publish due now.
pub(crate) struct Due<'a> {
    pub topic: &'a str,
    pub qos: Qos,
    pub size: usize,
    pub seq: u64,
}

/// What became of a due publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// Handed to the client: the sequence number is used.
    Queued,
    /// The request queue was full (counted); the sequence number is free.
    Full,
    /// The session is gone; not counted, the caller accounts for the tick.
    Gone,
}

/// Hands device `index`'s due publish to its client and counts it as offered and submitted
/// (or as not sent for a full queue).
pub(crate) fn submit(
    ctx: &Ctx,
    index: usize,
    client: &MqttClient,
    (publishing, offered): (&Publishing, &Offered),
    due: Due<'_>,
) -> Submitted {
    let device = &publishing.devices[index];
    let body = payload(due.seq, now_us(), due.size);
    let mut submitted = device.submitted.lock();
    match client.publish_to(due.topic.to_owned(), due.qos, body) {
        Ok(()) => {
            submitted.push_back((StdInstant::now(), due.seq));
            // Counted under the lock: a session that ends reads the count under it too.
            device.submitted_count.fetch_add(1, Ordering::Relaxed);
            ctx.live.submitted.fetch_add(1, Ordering::Relaxed);
            drop(submitted);
            offered.offered.fetch_add(1, Ordering::Relaxed);
            Submitted::Queued
        }
        Err(SubmitError::Full) if !device.ended.load(Ordering::Relaxed) => {
            drop(submitted);
            offered.offered.fetch_add(1, Ordering::Relaxed);
            offered.full.fetch_add(1, Ordering::Relaxed);
            Submitted::Full
        }
        Err(_) => Submitted::Gone,
    }
}

/// Counts the ticks from `*next` up to (not including) `until`, at most to `end`, as offered
/// and not sent for want of a session, and moves `*next` past them.
pub(crate) fn skip_ticks(
    offered: &Offered,
    next: &mut Instant,
    until: Instant,
    period: Duration,
    end: Instant,
) {
    let until = until.min(end);
    if *next >= until {
        return;
    }
    let ticks = ((until - *next).as_secs_f64() / period.as_secs_f64()).ceil() as u64;
    let ticks = ticks.max(1);
    offered.offered.fetch_add(ticks, Ordering::Relaxed);
    offered.closed.fetch_add(ticks, Ordering::Relaxed);
    *next += period.mul_f64(ticks as f64);
}

/// `{"seq":N,"ts_us":T,"pad":"xxx"}`, padded to `size` bytes when that is larger than the
/// fields alone.
pub(crate) fn payload(seq: u64, ts_us: u64, size: usize) -> Vec<u8> {
    padded(
        &format!(r#"{{"seq":{seq},"ts_us":{ts_us},"pad":""#),
        b"\"}",
        size,
    )
}

/// `head`, then `x` up to `size` bytes in all, then `tail`: a JSON document whose last string
/// value (opened at the end of `head`) pads it to the requested size.
pub(crate) fn padded(head: &str, tail: &[u8], size: usize) -> Vec<u8> {
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut v = Vec::with_capacity(head.len() + pad + tail.len());
    v.extend_from_slice(head.as_bytes());
    v.resize(head.len() + pad, b'x');
    v.extend_from_slice(tail);
    v
}

#[derive(Deserialize)]
struct Probe {
    seq: u64,
    ts_us: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn unix_s() -> f64 {
    now_us() as f64 / 1e6
}

/// What the observer saw.
#[derive(Debug, Default)]
struct Seen {
    seqs: Vec<SeqSet>,
    latency: Histogram,
    received: u64,
    foreign: u64,
    last: Option<StdInstant>,
    error: Option<String>,
}

impl Seen {
    /// Takes a message apart: which simulated device, which sequence number, sent when.
    fn on_message(&mut self, ctx: &Ctx, topic: &str, body: &[u8]) -> bool {
        self.received += 1;
        self.last = Some(StdInstant::now());
        let index = topic
            .strip_prefix(ctx.config.topic_prefix.as_str())
            .and_then(|t| Topic::parse(t).ok())
            .and_then(|t| match t {
                Topic::Telemetry(id) => device_index(&ctx.config.id_prefix, id.as_str())
                    .and_then(|i| ctx.local_index(i))
                    .filter(|i| ctx.devices[*i].id == id),
                _ => None,
            });
        let probe = serde_json::from_slice::<Probe>(body)
            .ok()
            .filter(|p| p.seq < SeqSet::MAX_SEQ);
        let (Some(index), Some(probe)) = (index, probe) else {
            self.foreign += 1;
            return false;
        };
        self.latency.record(now_us().saturating_sub(probe.ts_us));
        self.seqs[index].insert(probe.seq)
    }
}

/// A subscriber on the devices' telemetry topics.
struct Observer {
    url: String,
    filter: String,
    client: MqttClient,
    task: JoinHandle<Seen>,
}

impl Observer {
    /// Connects and subscribes; returns once the subscription is granted.
    async fn start(
        ctx: &Arc<Ctx>,
        o: &Observe,
        qos: Qos,
        max_packet: usize,
    ) -> Result<Observer, SimError> {
        let tls = match (
            o.url.is_tls(),
            o.server_ca_pem
                .as_ref()
                .or(ctx.config.server_ca_pem.as_ref()),
        ) {
            (true, Some(pem)) => {
                Some(SharedTls::new(&TlsConfig::from_ca_pem(pem)?)?.client_config(None)?)
            }
            (true, None) => return Err(crate::error::ConfigError::TlsRequired.into()),
            (false, _) => None,
        };
        let filter = o
            .filter
            .clone()
            .unwrap_or_else(|| format!("{}devices/+/telemetry", ctx.config.topic_prefix));
        let client_id = ctx.helper_client_id("observer");
        let (client, mut event_loop) = mqtt::open_session(SessionSpec {
            url: &o.url,
            client_id: &client_id,
            tls,
            credentials: o.credentials.as_ref(),
            keep_alive: ctx.config.keep_alive,
            connect_timeout: ctx.config.connect_timeout,
            inflight: 10,
            capacity: 10,
            max_packet,
        });
        let wait = ctx.config.connect_timeout + Duration::from_secs(5);
        let subscribed =
            tokio::time::timeout(wait, subscribe(&client, &mut event_loop, &filter, qos))
                .await
                .map_err(|_| SimError::Observer(format!("no SUBACK within {wait:?}")))?;
        subscribed?;
        let ctx = ctx.clone();
        let task = tokio::spawn(async move {
            let mut seen = Seen {
                seqs: vec![SeqSet::default(); ctx.devices.len()],
                ..Seen::default()
            };
            loop {
                match event_loop.poll().await {
                    Ok(MqttEvent::Message { topic, payload }) => {
                        if seen.on_message(&ctx, &topic, &payload) {
                            ctx.live.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(MqttEvent::DisconnectSent) => break,
                    Ok(_) => {}
                    Err(e) => {
                        seen.error = Some(e.to_string());
                        break;
                    }
                }
            }
            seen
        });
        Ok(Observer {
            url: o.url.to_string(),
            filter,
            client,
            task,
        })
    }

    /// Disconnects and reports; loss is counted against what each device had acknowledged
    /// (QoS 1) or written (QoS 0).
    async fn finish(
        self,
        publishing: &Publishing,
        start: StdInstant,
        end: StdInstant,
    ) -> ObserverReport {
        let _ = self.client.disconnect();
        let mut task = self.task;
        let seen = match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => Seen {
                error: Some(format!("observer task: {e}")),
                ..Seen::default()
            },
            Err(_) => {
                task.abort();
                Seen {
                    error: Some("the observer did not disconnect".into()),
                    ..Seen::default()
                }
            }
        };
        let mut lost = 0;
        let mut unconfirmed = 0;
        let mut distinct = 0;
        let mut duplicates = 0;
        for (device, seqs) in publishing.devices.iter().zip(&seen.seqs) {
            // Owed: acknowledged (QoS 1) or written (QoS 0).
            let done = device.done_seqs.lock();
            lost += done.count_not_in(seqs);
            unconfirmed += seqs.count_not_in(&done);
            distinct += seqs.distinct();
            duplicates += seqs.duplicates();
        }
        let window = seen.last.unwrap_or(end).max(end) - start;
        ObserverReport {
            url: self.url,
            filter: self.filter,
            received: seen.received,
            delivered: distinct,
            duplicates,
            lost,
            delivered_unconfirmed: unconfirmed,
            foreign: seen.foreign,
            delivered_per_s: per_second(distinct, window),
            latency: seen.latency.summary_ms(),
            error: seen.error,
        }
    }
}

async fn subscribe(
    client: &MqttClient,
    event_loop: &mut MqttLoop,
    filter: &str,
    qos: Qos,
) -> Result<(), SimError> {
    match event_loop.poll().await? {
        MqttEvent::Connected { .. } => {}
        other => {
            return Err(SimError::Observer(format!(
                "expected CONNACK, got {other:?}"
            )))
        }
    }
    client
        .subscribe_to(filter.to_owned(), qos)
        .map_err(|e| SimError::Observer(format!("cannot queue the SUBSCRIBE: {e:?}")))?;
    loop {
        match event_loop.poll().await? {
            MqttEvent::SubAck { refused: 0 } => return Ok(()),
            MqttEvent::SubAck { .. } => {
                return Err(SimError::Observer(format!(
                    "the broker refused the subscription to {filter}"
                )))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::hist::Histogram;
    use super::super::report::IntervalRow;

    fn row(end_s: f64, acked: u64, connected: u64) -> IntervalRow {
        let mut latency = Histogram::new();
        for _ in 0..acked {
            latency.record(1_000);
        }
        IntervalRow {
            end_s,
            connected,
            sessions_lost: 0,
            sent: acked,
            acked,
            delivered: acked,
            drops: 0,
            reconnects: 0,
            reconnect_failures: 0,
            puback_latency: latency.summary_ms(),
            rss_bytes: 1,
            cpu_s: 0.1,
        }
    }

    /// (end of the rest in s, counters moved, rows then as (end s, acked, connected)):
    /// rows every 10 s; a rest shorter than 5 s is added to the last row, a longer one is a
    /// row, an empty one after a full row is dropped.
    #[test]
    fn the_rest_after_the_last_row_is_no_stray_row() {
        /// (end s, acked, connected) of one row.
        type Row = (f64, u64, u64);
        let every = std::time::Duration::from_secs(10);
        let cases: &[(f64, bool, &[Row])] = &[
            (60.02, true, &[(50.0, 40, 10), (60.02, 43, 4)]),
            (60.02, false, &[(50.0, 40, 10), (60.02, 40, 4)]),
            (64.9, true, &[(50.0, 40, 10), (64.9, 43, 4)]),
            (67.0, true, &[(50.0, 40, 10), (60.0, 40, 10), (67.0, 3, 4)]),
            (67.0, false, &[(50.0, 40, 10), (60.0, 40, 10)]),
        ];
        for (end, changed, want) in cases {
            let mut rows = vec![row(50.0, 40, 10), row(60.0, 40, 10)];
            let acked = if *changed { 3 } else { 0 };
            super::end_rows(&mut rows, row(*end, acked, 4), every, *changed);
            let got: Vec<(f64, u64, u64)> = rows
                .iter()
                .map(|r| (r.end_s, r.acked, r.connected))
                .collect();
            assert_eq!(got, *want, "rest until {end} s, changed {changed}");
            let last = rows.last().unwrap();
            assert_eq!(last.puback_latency.count, last.acked);
        }
    }

    use super::*;

    #[test]
    fn payloads_have_the_requested_size_and_parse_back() {
        for size in [0, 10, 64, 128, 1000, 4096] {
            let body = payload(12_345, 1_700_000_000_000_000, size);
            let min = payload(12_345, 1_700_000_000_000_000, 0).len();
            assert_eq!(body.len(), size.max(min), "size {size}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v.is_object());
            let p: Probe = serde_json::from_slice(&body).unwrap();
            assert_eq!((p.seq, p.ts_us), (12_345, 1_700_000_000_000_000));
        }
    }
}
