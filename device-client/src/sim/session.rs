//! One device's session and one round of connects.
//!
//! A device task owns its event loop and is the only one polling it, never cancelling a poll;
//! the round's coordinator ends sessions by queueing a DISCONNECT through the device's client.
//! The CONNACK latency runs from the first poll, which opens the TCP connection, to the
//! CONNACK.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fanout::Receiving;
use super::hist::SharedHistogram;
use super::probe::Inbox;
use super::report::ConnectRound;
use super::soak::Churning;
use super::stats::{failure_reason, per_second, Reasons, SeqSet, Usage};
use super::{Ctx, Live, Qos};
use crate::mqtt::{MqttClient, MqttEvent, MqttLoop};

/// Shards of the shared latency histograms.
const SHARDS: usize = 16;
/// How long a device may take to write its DISCONNECT.
const DISCONNECT_WAIT: Duration = Duration::from_secs(5);

/// What a device does once connected.
#[derive(Clone)]
pub(crate) enum AfterConnect {
    /// DISCONNECT right away.
    Disconnect,
    /// Stay connected until the coordinator queues a DISCONNECT.
    Hold,
    /// Stay connected and account for the publishes submitted through `Publishing`.
    Publish(Arc<Publishing>),
    /// Subscribe, stay connected and account for the messages received.
    Receive(Arc<Receiving>),
    /// Publish, and be dropped and reconnect at random until the soak ends (`soak`).
    Soak(Arc<Churning>),
}

/// How a device's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    NeverConnected,
    /// DISCONNECT written.
    Clean,
    /// Lost after CONNACK, before we ended it.
    Lost(String),
    /// A soak's device was offline, waiting to reconnect, when the run ended.
    Offline,
}

/// The publishing side of a device and what became of its publishes.
#[derive(Debug, Default)]
pub(crate) struct DevicePublishes {
    /// Submission times and sequence numbers of publishes handed to the client and not yet
    /// written, in order.
    pub submitted: Mutex<VecDeque<(StdInstant, u64)>>,
    pub submitted_count: AtomicU64,
    /// The session ended; set under the `submitted` lock (and cleared when a soak's device
    /// reconnects).
    pub ended: AtomicBool,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Submitted publishes given up with their session (never written, or written and never
    /// acknowledged), over all of the device's sessions.
    pub given_up: AtomicU64,
    /// The sequence numbers acknowledged (QoS 1) or written (QoS 0): what the broker owes the
    /// observer.
    pub done_seqs: Mutex<SeqSet>,
    /// When the SUBSCRIBE to the command topic was queued, µs after [`Publishing::started`].
    pub subscribed_at_us: AtomicU64,
    /// The broker granted the command topic.
    pub commands_granted: AtomicBool,
}

/// The devices' subscriptions before publishing: their command topics (`--subscribe-commands`)
/// and further filters (`--subscribe`), in one SUBSCRIBE per device.
#[derive(Debug)]
pub(crate) struct CommandSubscriptions {
    /// Each device's own `devices/{id}/commands`.
    pub commands: bool,
    /// With the topic prefix; `{id}` stands for the device id.
    pub filters: Vec<String>,
    pub granted: AtomicU64,
    /// Refused by the broker, or not queued because the session was gone.
    pub refused: AtomicU64,
    /// From queueing the SUBSCRIBE to its SUBACK.
    pub suback_latency: SharedHistogram,
}

/// Shared by the publishing devices of a telemetry run.
pub(crate) struct Publishing {
    pub qos: Qos,
    pub devices: Vec<DevicePublishes>,
    pub puback_latency: SharedHistogram,
    /// The PUBACK latency of each device's first publish: on a broker that creates state per
    /// new topic (rumqttd matches it against every filter) it differs from the rest.
    pub first_puback_latency: SharedHistogram,
    /// The PUBACK latency of every publish after a device's first.
    pub later_puback_latency: SharedHistogram,
    /// The same as `puback_latency`, since the last interval row.
    pub interval_latency: SharedHistogram,
    /// When the last acknowledgement arrived, µs after `started`.
    pub last_ack_us: AtomicU64,
    pub started: StdInstant,
    /// Set when each device subscribes before publishing.
    pub commands: Option<CommandSubscriptions>,
    /// Set when the run sends probes to the devices.
    pub inbox: Option<Inbox>,
}

impl Publishing {
    /// `filters` (with the topic prefix, `{id}` for the device id) are subscribed together
    /// with the command topic.
    pub(crate) fn new(
        devices: usize,
        qos: Qos,
        subscribe_commands: bool,
        filters: Vec<String>,
    ) -> Self {
        let subscribes = subscribe_commands || !filters.is_empty();
        Self {
            qos,
            devices: (0..devices).map(|_| DevicePublishes::default()).collect(),
            puback_latency: SharedHistogram::new(SHARDS),
            first_puback_latency: SharedHistogram::new(SHARDS),
            later_puback_latency: SharedHistogram::new(SHARDS),
            interval_latency: SharedHistogram::new(SHARDS),
            last_ack_us: AtomicU64::new(0),
            started: StdInstant::now(),
            commands: subscribes.then(|| CommandSubscriptions {
                commands: subscribe_commands,
                filters,
                granted: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                suback_latency: SharedHistogram::new(SHARDS),
            }),
            inbox: None,
        }
    }

    /// Queues device `index`'s SUBSCRIBE to its command topic and further filters, if the run
    /// wants one.
    pub(crate) fn subscribe_commands(&self, ctx: &Ctx, index: usize, client: &MqttClient) {
        let Some(commands) = &self.commands else {
            return;
        };
        let at = self.started.elapsed().as_micros() as u64;
        self.devices[index]
            .subscribed_at_us
            .store(at, Ordering::Relaxed);
        let id = ctx.devices[index].id.as_str();
        let filters = commands
            .commands
            .then(|| ctx.commands_topic(index))
            .into_iter()
            .chain(commands.filters.iter().map(|f| f.replace("{id}", id)))
            .collect();
        if client.subscribe_many_to(filters, Qos::AtLeastOnce).is_err() {
            commands.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Told to the round's coordinator once per device.
struct Resolved {
    index: usize,
    result: Result<(), String>,
}

/// What the device tasks of a round report to.
#[derive(Clone)]
struct RoundSink {
    latency: Arc<SharedHistogram>,
    resolved: mpsc::UnboundedSender<Resolved>,
}

/// Connects device `index` and runs its session to the end.
async fn device_session(
    ctx: Arc<Ctx>,
    index: usize,
    (client, mut event_loop): (MqttClient, MqttLoop),
    permit: OwnedSemaphorePermit,
    after: AfterConnect,
    sink: RoundSink,
) -> SessionEnd {
    let RoundSink { latency, resolved } = sink;
    let live = &ctx.live;
    let t0 = Instant::now();
    let first = event_loop.poll().await;
    let took = t0.elapsed();
    drop(permit);
    match first {
        Ok(MqttEvent::Connected { .. }) => {}
        other => {
            let reason = match other {
                Err(e) => failure_reason(&e),
                Ok(event) => format!("protocol: expected CONNACK, got {event:?}"),
            };
            live.failures.fetch_add(1, Ordering::Relaxed);
            let _ = resolved.send(Resolved {
                index,
                result: Err(reason),
            });
            return SessionEnd::NeverConnected;
        }
    }
    latency.record(index, took);
    live.connects.fetch_add(1, Ordering::Relaxed);
    live.connected.fetch_add(1, Ordering::Relaxed);
    let _ = resolved.send(Resolved {
        index,
        result: Ok(()),
    });
    let end = match after {
        AfterConnect::Disconnect => {
            let _ = client.disconnect();
            match tokio::time::timeout(
                DISCONNECT_WAIT,
                until_disconnected(&mut event_loop, &Idle, index, live),
            )
            .await
            {
                Ok(end) => end,
                Err(_) => SessionEnd::Lost("timeout: writing DISCONNECT".into()),
            }
        }
        AfterConnect::Hold => until_disconnected(&mut event_loop, &Idle, index, live).await,
        AfterConnect::Receive(r) => {
            r.subscribe(&ctx, index, &client);
            until_disconnected(&mut event_loop, &*r, index, live).await
        }
        AfterConnect::Publish(p) => {
            p.subscribe_commands(&ctx, index, &client);
            let end = until_disconnected(&mut event_loop, &*p, index, live).await;
            // From here on every submit fails, so the count is final.
            drop(event_loop);
            let open = p.session_ended(index);
            if end != SessionEnd::Clean {
                live.abandoned.fetch_add(open, Ordering::Relaxed);
            }
            end
        }
        // Its sessions come and go; it keeps the counts itself.
        AfterConnect::Soak(c) => {
            return super::soak::device_life(ctx, index, (client, event_loop), c).await
        }
    };
    live.connected.fetch_sub(1, Ordering::Relaxed);
    if matches!(end, SessionEnd::Lost(_)) {
        live.lost_sessions.fetch_add(1, Ordering::Relaxed);
    }
    end
}

impl Publishing {
    /// Marks device `index`'s session as ended (its event loop must be gone, so every later
    /// submit fails) and returns how many of its submitted publishes are given up with it:
    /// handed to the client and never written, or (QoS 1) written and never acknowledged.
    pub(crate) fn session_ended(&self, index: usize) -> u64 {
        let d = &self.devices[index];
        let mut queued = d.submitted.lock();
        d.ended.store(true, Ordering::Relaxed);
        queued.clear();
        let open = self.outstanding(index);
        d.given_up.fetch_add(open, Ordering::Relaxed);
        open
    }

    /// Device `index`'s publishes of its current session not yet acknowledged (QoS 1) or
    /// written (QoS 0).
    pub(crate) fn outstanding(&self, index: usize) -> u64 {
        let d = &self.devices[index];
        let done = match self.qos {
            Qos::AtLeastOnce => &d.acked,
            Qos::AtMostOnce => &d.sent,
        };
        d.submitted_count
            .load(Ordering::Relaxed)
            .saturating_sub(done.load(Ordering::Relaxed))
            .saturating_sub(d.given_up.load(Ordering::Relaxed))
    }

    /// Device `index` has a new session: submits reach it again.
    pub(crate) fn session_started(&self, index: usize) {
        let d = &self.devices[index];
        let _queued = d.submitted.lock();
        d.ended.store(false, Ordering::Relaxed);
    }
}

/// What a connected device does with the events of its session.
pub(crate) trait SessionRole {
    /// Per-session state, e.g. the publishes awaiting their acknowledgement.
    type State: Default;
    fn on_event(&self, state: &mut Self::State, index: usize, event: MqttEvent, live: &Live);
}

/// Polls until the DISCONNECT is written or the session is lost, handing the other events to
/// `role`.
async fn until_disconnected<R: SessionRole>(
    event_loop: &mut MqttLoop,
    role: &R,
    index: usize,
    live: &Live,
) -> SessionEnd {
    let mut state = R::State::default();
    loop {
        match event_loop.poll().await {
            Ok(MqttEvent::DisconnectSent) => return SessionEnd::Clean,
            Ok(event) => role.on_event(&mut state, index, event, live),
            Err(e) => return SessionEnd::Lost(failure_reason(&e)),
        }
    }
}

/// Holds the session and ignores its events.
struct Idle;

impl SessionRole for Idle {
    type State = ();

    fn on_event(&self, _: &mut (), _: usize, _: MqttEvent, _: &Live) {}
}

/// A QoS 1 publish written and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct InFlight {
    pkid: u16,
    seq: u64,
    submitted: StdInstant,
    /// The device's first publish of the run.
    first: bool,
}

impl SessionRole for Publishing {
    type State = Vec<InFlight>;

    fn on_event(&self, inflight: &mut Self::State, index: usize, event: MqttEvent, live: &Live) {
        let device = &self.devices[index];
        match event {
            MqttEvent::Sent(pkid) => {
                let (at, seq) = device
                    .submitted
                    .lock()
                    .pop_front()
                    .unwrap_or_else(|| (StdInstant::now(), u64::MAX));
                let before = device.sent.fetch_add(1, Ordering::Relaxed);
                inflight.push(InFlight {
                    pkid,
                    seq,
                    submitted: at,
                    first: before == 0,
                });
                live.sent.fetch_add(1, Ordering::Relaxed);
            }
            MqttEvent::SentAtMostOnce => {
                if let Some((_, seq)) = device.submitted.lock().pop_front() {
                    device.done_seqs.lock().insert(seq);
                }
                device.sent.fetch_add(1, Ordering::Relaxed);
                live.sent.fetch_add(1, Ordering::Relaxed);
            }
            MqttEvent::Acked(pkid) => {
                if let Some(pos) = inflight.iter().position(|f| f.pkid == pkid) {
                    let done = inflight.remove(pos);
                    let took = done.submitted.elapsed();
                    self.puback_latency.record(index, took);
                    self.interval_latency.record(index, took);
                    if done.first {
                        self.first_puback_latency.record(index, took);
                    } else {
                        self.later_puback_latency.record(index, took);
                    }
                    if done.seq != u64::MAX {
                        device.done_seqs.lock().insert(done.seq);
                    }
                    device.acked.fetch_add(1, Ordering::Relaxed);
                    live.acked.fetch_add(1, Ordering::Relaxed);
                    let us = self.started.elapsed().as_micros() as u64;
                    self.last_ack_us.fetch_max(us, Ordering::Relaxed);
                }
            }
            // Refused (MQTT 5 negative PUBACK): no longer in flight, and not delivered.
            MqttEvent::Refused { pkid, .. } => inflight.retain(|f| f.pkid != pkid),
            MqttEvent::Message { payload, .. } => {
                if let Some(inbox) = &self.inbox {
                    inbox.on_message(index, &payload);
                }
            }
            MqttEvent::SubAck { refused } => {
                let Some(commands) = &self.commands else {
                    return;
                };
                if refused == 0 {
                    let queued = device.subscribed_at_us.load(Ordering::Relaxed);
                    let now = self.started.elapsed().as_micros() as u64;
                    let took = Duration::from_micros(now.saturating_sub(queued));
                    commands.suback_latency.record(index, took);
                    device.commands_granted.store(true, Ordering::Relaxed);
                    commands.granted.fetch_add(1, Ordering::Relaxed);
                } else {
                    commands.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }
}

/// How a round connects.
pub(crate) struct RoundSpec {
    pub round: u32,
    pub label: &'static str,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub inflight: u16,
    pub capacity: usize,
    pub max_packet: usize,
}

/// A round whose sessions may still be running.
pub(crate) struct Round {
    pub row: ConnectRound,
    /// Per device: its client, and its task while it runs.
    pub sessions: Vec<(MqttClient, JoinHandle<SessionEnd>)>,
    /// Which devices got a CONNACK.
    pub connected: Vec<bool>,
    /// The deadline stopped the round early.
    pub truncated: bool,
}

/// Connects every device of `ctx`, at most `concurrency` attempts at a time and `rate` starts
/// per second, and returns once each attempt was answered (or the deadline passed).
pub(crate) async fn connect_round(
    ctx: &Arc<Ctx>,
    spec: &RoundSpec,
    after: impl Fn(usize) -> AfterConnect,
) -> Round {
    let n = ctx.devices.len();
    let permits = Arc::new(Semaphore::new(spec.concurrency));
    let latency = Arc::new(SharedHistogram::new(SHARDS));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = RoundSink {
        latency: latency.clone(),
        resolved: tx,
    };
    let cpu_before = Usage::now().cpu;
    let started = Instant::now();
    let mut sessions = Vec::with_capacity(n);
    let mut truncated = false;
    for index in 0..n {
        if let Some(rate) = spec.rate {
            let at = started + Duration::from_secs_f64(index as f64 / rate);
            if at >= ctx.deadline {
                truncated = true;
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = tokio::time::sleep_until(ctx.deadline) => {
                truncated = true;
                break;
            }
        };
        let (client, event_loop) = ctx.open(index, spec.inflight, spec.capacity, spec.max_packet);
        let task = tokio::spawn(device_session(
            ctx.clone(),
            index,
            (client.clone(), event_loop),
            permit,
            after(index),
            sink.clone(),
        ));
        sessions.push((client, task));
    }
    drop(sink);
    let attempted = sessions.len();

    let mut connected = vec![false; n];
    let mut failures = Reasons::default();
    let mut answered = 0;
    let mut last = started;
    while answered < attempted {
        match tokio::time::timeout_at(ctx.deadline, rx.recv()).await {
            Ok(Some(r)) => {
                answered += 1;
                last = Instant::now();
                match r.result {
                    Ok(()) => connected[r.index] = true,
                    Err(reason) => failures.add(reason),
                }
            }
            Ok(None) => break,
            Err(_) => {
                truncated = true;
                break;
            }
        }
    }
    let duration = last - started;
    let ok = connected.iter().filter(|c| **c).count() as u64;
    let row = ConnectRound {
        round: spec.round,
        label: spec.label.into(),
        devices: n as u64,
        attempted: attempted as u64,
        connected: ok,
        failed: failures.total(),
        unanswered: (attempted - answered) as u64,
        dropped: 0,
        failures: failures.into_map(),
        drops: Default::default(),
        duration_s: duration.as_secs_f64(),
        connects_per_s: per_second(ok, duration),
        connack_latency: latency.snapshot().summary_ms(),
        cpu_s: Usage::now().cpu.saturating_sub(cpu_before).as_secs_f64(),
    };
    Round {
        row,
        sessions,
        connected,
        truncated,
    }
}

/// Ends every session still running with a DISCONNECT and waits for them (at most until
/// `deadline`, then they are aborted), adding the sessions lost on the way to the row.
pub(crate) async fn end_sessions(round: &mut Round, deadline: Instant) {
    for (client, task) in &round.sessions {
        if !task.is_finished() {
            // A full request queue drains as the device's task writes; retry briefly.
            for _ in 0..50 {
                if client.disconnect().is_ok() || task.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    join_sessions(round, deadline).await;
}

/// Waits for the round's device tasks (at most until `deadline`, then they are aborted),
/// adding the sessions lost on the way to the row.
pub(crate) async fn join_sessions(round: &mut Round, deadline: Instant) {
    let mut drops = Reasons::default();
    for (_, task) in &mut round.sessions {
        match tokio::time::timeout_at(deadline, &mut *task).await {
            Ok(Ok(SessionEnd::Lost(reason))) => drops.add(reason),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => drops.add(format!("task: {e}")),
            Err(_) => {
                task.abort();
                drops.add("timeout: ending the session".into());
            }
        }
    }
    round.row.dropped = drops.total();
    round.row.drops = drops.into_map();
}
