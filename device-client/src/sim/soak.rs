//! `soak`'s churn: while the fleet publishes, sessions are dropped at random and the devices
//! reconnect.
//!
//! Each device's task ([`device_life`]) runs one session after another. A session has two
//! tasks: the device task polls the event loop (and is the only one to), a driver task
//! ([`drive`]) publishes on the device's schedule and ends the session cleanly when asked. The
//! churn ([`churn`]) picks a session that is up and asks it to end:
//! - abrupt: the device task stops polling and drops the event loop, which closes the socket
//!   without a DISCONNECT (the only time a poll is abandoned: the event loop goes with it);
//! - clean: the driver stops publishing, waits up to [`CLEAN_DRAIN`] for the session's PUBACKs,
//!   then queues a DISCONNECT.
//!
//! After a drop, or a session lost by itself, the device reconnects after the configured delay
//! and jitter, retrying failed attempts with [`Backoff`]; with several broker URLs each failed
//! attempt moves to the next one, so a killed node's devices fail over. Sequence numbers go on across
//! sessions, so the observer's loss is counted per publish over the whole soak.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::hist::SharedHistogram;
use super::report::ChurnReport;
use super::session::{Publishing, RoundSpec, SessionEnd, SessionRole};
use super::stats::{failure_reason, Reasons};
use super::telemetry::{skip_ticks, submit, Due, Offered, Submitted};
use super::{Churn, Ctx, DropMode, Live};
use crate::backoff::{Backoff, BackoffConfig};
use crate::mqtt::{MqttClient, MqttEvent, MqttLoop};

/// Shards of the latency histograms.
const SHARDS: usize = 16;
/// How long a clean drop (and the end of the run) waits for the session's PUBACKs before the
/// DISCONNECT.
pub(crate) const CLEAN_DRAIN: Duration = Duration::from_secs(2);
/// Longest wait between reconnect attempts after failures (plus the fixed delay).
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The publishing window, known once the first round of connects is over.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
    period: Duration,
    size: usize,
}

/// How the churn reaches a device's current session.
#[derive(Debug, Default)]
struct SessionCtl {
    abrupt: Notify,
    clean: Notify,
}

/// A device's place in its publishing schedule, carried from one session to the next.
#[derive(Debug, Clone, Copy, Default)]
struct Ticks {
    /// The next publish is due then; `None` before the window is known.
    next: Option<Instant>,
    /// Its sequence number.
    seq: u64,
}

/// Why a session's driver returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DriverEnd {
    /// It queued a DISCONNECT because the churn asked for a clean drop.
    Churn,
    /// It queued a DISCONNECT because the run ends.
    Stop,
    /// The session ended otherwise.
    Over,
}

/// Shared by the devices of a soak.
pub(crate) struct Churning {
    churn: Churn,
    publishing: Arc<Publishing>,
    offered: Arc<Offered>,
    inflight: u16,
    capacity: usize,
    max_packet: usize,
    /// Per device: its current session while it is up and nobody asked it to drop.
    slots: Vec<Mutex<Option<Arc<SessionCtl>>>>,
    window: watch::Sender<Option<Window>>,
    stop: watch::Sender<bool>,
    drops_abrupt: AtomicU64,
    drops_clean: AtomicU64,
    drops_skipped: AtomicU64,
    reconnect_attempts: AtomicU64,
    offline_at_end: AtomicU64,
    inflight_at_drop: AtomicU64,
    unsent_at_drop: AtomicU64,
    lost: Mutex<Reasons>,
    failures: Mutex<Reasons>,
    reconnect_latency: SharedHistogram,
    offline_time: SharedHistogram,
}

impl Churning {
    pub(crate) fn new(
        churn: Churn,
        publishing: Arc<Publishing>,
        offered: Arc<Offered>,
        spec: &RoundSpec,
        devices: usize,
    ) -> Self {
        Self {
            churn,
            publishing,
            offered,
            inflight: spec.inflight,
            capacity: spec.capacity,
            max_packet: spec.max_packet,
            slots: (0..devices).map(|_| Mutex::new(None)).collect(),
            window: watch::channel(None).0,
            stop: watch::channel(false).0,
            drops_abrupt: AtomicU64::new(0),
            drops_clean: AtomicU64::new(0),
            drops_skipped: AtomicU64::new(0),
            reconnect_attempts: AtomicU64::new(0),
            offline_at_end: AtomicU64::new(0),
            inflight_at_drop: AtomicU64::new(0),
            unsent_at_drop: AtomicU64::new(0),
            lost: Mutex::new(Reasons::default()),
            failures: Mutex::new(Reasons::default()),
            reconnect_latency: SharedHistogram::new(SHARDS),
            offline_time: SharedHistogram::new(SHARDS),
        }
    }

    /// Publishing runs from `start` to `end`, one message every `period` per device.
    pub(crate) fn begin(&self, start: Instant, end: Instant, period: Duration, size: usize) {
        self.window.send_replace(Some(Window {
            start,
            end,
            period,
            size,
        }));
    }

    /// Every device disconnects cleanly (or, offline, stops reconnecting).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub(crate) fn report(&self, live: &Live) -> ChurnReport {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (abrupt, clean) = (get(&self.drops_abrupt), get(&self.drops_clean));
        let lost = self.lost.lock().clone();
        let failures = self.failures.lock().clone();
        ChurnReport {
            drops_per_min: self.churn.per_min,
            mode: self.churn.mode.name().into(),
            reconnect_delay_s: self.churn.reconnect_delay.as_secs_f64(),
            reconnect_jitter_s: self.churn.reconnect_jitter.as_secs_f64(),
            drops: abrupt + clean,
            drops_abrupt: abrupt,
            drops_clean: clean,
            drops_skipped: get(&self.drops_skipped),
            lost_sessions: lost.total(),
            lost_reasons: lost.into_map(),
            reconnect_attempts: get(&self.reconnect_attempts),
            reconnects: get(&live.reconnects),
            reconnect_failures: failures.total(),
            failures: failures.into_map(),
            offline_at_end: get(&self.offline_at_end),
            inflight_at_drop: get(&self.inflight_at_drop),
            unsent_at_drop: get(&self.unsent_at_drop),
            reconnect_latency: self.reconnect_latency.snapshot().summary_ms(),
            offline_time: self.offline_time.snapshot().summary_ms(),
        }
    }

    /// The wait before a reconnect: the delay plus a uniform part of the jitter.
    fn reconnect_wait(&self) -> Duration {
        let jitter = self.churn.reconnect_jitter.as_nanos() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=jitter)
        };
        self.churn.reconnect_delay + Duration::from_nanos(extra)
    }
}

/// Drops sessions at random from `start` until `end`: a Poisson process of
/// [`Churn::per_min`] drops per minute, each on a device picked at random among those up.
pub(crate) async fn churn(c: Arc<Churning>, start: Instant, end: Instant) {
    let per_s = c.churn.per_min / 60.0;
    if per_s <= 0.0 || c.slots.is_empty() {
        return;
    }
    let mut rng = StdRng::from_entropy();
    let n = c.slots.len();
    let mut at = start;
    loop {
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        at += Duration::from_secs_f64(-u.ln() / per_s);
        if at >= end {
            return;
        }
        tokio::time::sleep_until(at).await;
        let abrupt = match c.churn.mode {
            DropMode::Abrupt => true,
            DropMode::Clean => false,
            DropMode::Mixed => rng.gen_bool(0.5),
        };
        // Random picks find a connected device at once unless most are offline; then a scan.
        let mut picked = (0..16).find_map(|_| c.slots[rng.gen_range(0..n)].lock().take());
        if picked.is_none() {
            let from = rng.gen_range(0..n);
            picked = (0..n).find_map(|k| c.slots[(from + k) % n].lock().take());
        }
        match picked {
            Some(ctl) if abrupt => ctl.abrupt.notify_one(),
            Some(ctl) => ctl.clean.notify_one(),
            None => {
                c.drops_skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Device `index`'s soak after its first CONNACK: sessions, drops and reconnects until the run
/// stops. Keeps [`Live::connected`] and the loss counters itself.
pub(crate) async fn device_life(
    ctx: Arc<Ctx>,
    index: usize,
    first: (MqttClient, MqttLoop),
    c: Arc<Churning>,
) -> SessionEnd {
    let live = &ctx.live;
    let mut stop = c.stop.subscribe();
    let mut session = first;
    let mut ticks = Ticks::default();
    loop {
        let (client, mut event_loop) = session;
        let ctl = Arc::new(SessionCtl::default());
        let over = Arc::new(Notify::new());
        c.publishing.session_started(index);
        c.publishing.subscribe_commands(&ctx, index, &client);
        let driver = tokio::spawn(drive(
            ctx.clone(),
            index,
            client,
            c.clone(),
            ticks,
            (ctl.clone(), over.clone()),
        ));
        *c.slots[index].lock() = Some(ctl.clone());
        let mut inflight = Vec::new();
        let lost = loop {
            tokio::select! {
                biased;
                _ = ctl.abrupt.notified() => break None,
                event = event_loop.poll() => match event {
                    Ok(MqttEvent::DisconnectSent) => break None,
                    Ok(event) => c.publishing.on_event(&mut inflight, index, event, live),
                    Err(e) => break Some(failure_reason(&e)),
                },
            }
        };
        // An abrupt drop closes the socket here, without a DISCONNECT.
        drop(event_loop);
        c.slots[index].lock().take();
        let open = c.publishing.session_ended(index);
        live.abandoned.fetch_add(open, Ordering::Relaxed);
        let in_flight = (inflight.len() as u64).min(open);
        c.inflight_at_drop.fetch_add(in_flight, Ordering::Relaxed);
        c.unsent_at_drop
            .fetch_add(open - in_flight, Ordering::Relaxed);
        over.notify_one();
        let why = match driver.await {
            Ok((t, why)) => {
                ticks = t;
                why
            }
            Err(e) => {
                live.connected.fetch_sub(1, Ordering::Relaxed);
                return SessionEnd::Lost(format!("task: {e}"));
            }
        };
        live.connected.fetch_sub(1, Ordering::Relaxed);
        let down = Instant::now();
        match (lost, why) {
            (Some(reason), _) => {
                live.lost_sessions.fetch_add(1, Ordering::Relaxed);
                c.lost.lock().add(reason);
            }
            (None, DriverEnd::Stop) => return SessionEnd::Clean,
            (None, DriverEnd::Churn) => {
                c.drops_clean.fetch_add(1, Ordering::Relaxed);
                live.drops.fetch_add(1, Ordering::Relaxed);
            }
            (None, DriverEnd::Over) => {
                c.drops_abrupt.fetch_add(1, Ordering::Relaxed);
                live.drops.fetch_add(1, Ordering::Relaxed);
            }
        }

        // Offline until a reconnect gets its CONNACK, or the run ends.
        let mut wait = c.reconnect_wait();
        let mut backoff = Backoff::new(BackoffConfig {
            base: c.churn.reconnect_jitter.max(Duration::from_millis(100)),
            cap: BACKOFF_CAP,
            reset_after: Duration::ZERO,
            ..BackoffConfig::default()
        });
        // A failed attempt moves the device to the next broker URL (failover).
        let mut failures = 0;
        session = loop {
            let wake = (Instant::now() + wait).min(ctx.deadline);
            let stopped = tokio::select! {
                _ = tokio::time::sleep_until(wake) => Instant::now() >= ctx.deadline,
                _ = stopped(&mut stop) => true,
            };
            if stopped {
                c.offline_at_end.fetch_add(1, Ordering::Relaxed);
                if let (Some(next), Some(w)) = (ticks.next.as_mut(), *c.window.borrow()) {
                    skip_ticks(&c.offered, next, w.end, w.period, w.end);
                }
                return SessionEnd::Offline;
            }
            c.reconnect_attempts.fetch_add(1, Ordering::Relaxed);
            let (client, mut event_loop) =
                ctx.open_after_failures(index, failures, c.inflight, c.capacity, c.max_packet);
            let t0 = Instant::now();
            match event_loop.poll().await {
                Ok(MqttEvent::Connected { .. }) => {
                    c.reconnect_latency.record(index, t0.elapsed());
                    c.offline_time.record(index, down.elapsed());
                    live.reconnects.fetch_add(1, Ordering::Relaxed);
                    live.connects.fetch_add(1, Ordering::Relaxed);
                    live.connected.fetch_add(1, Ordering::Relaxed);
                    break (client, event_loop);
                }
                other => {
                    let reason = match other {
                        Err(e) => failure_reason(&e),
                        Ok(event) => format!("protocol: expected CONNACK, got {event:?}"),
                    };
                    live.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    live.failures.fetch_add(1, Ordering::Relaxed);
                    c.failures.lock().add(reason);
                    failures += 1;
                    wait = c.churn.reconnect_delay + backoff.next_delay(&mut rand::thread_rng());
                }
            }
        };
    }
}

/// Resolves once the run stops.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A closed channel means the run is gone as well.
    let _ = stop.wait_for(|s| *s).await;
}

/// One session's publishing: on the device's schedule once the window is known, until the
/// session is over, the churn asks for a clean drop or the run stops (then it waits for the
/// session's PUBACKs and queues a DISCONNECT). Returns only once the device task said the
/// session is over, so a driver never outlives its session.
async fn drive(
    ctx: Arc<Ctx>,
    index: usize,
    client: MqttClient,
    c: Arc<Churning>,
    ticks: Ticks,
    (ctl, over): (Arc<SessionCtl>, Arc<Notify>),
) -> (Ticks, DriverEnd) {
    let mut window_rx = c.window.subscribe();
    let mut stop = c.stop.subscribe();
    let Ticks { next, mut seq } = ticks;
    let window = tokio::select! {
        w = async { window_rx.wait_for(Option::is_some).await.ok().and_then(|w| *w) } => w,
        _ = over.notified() => return (ticks, DriverEnd::Over),
    };
    let Some(w) = window else {
        over.notified().await;
        return (ticks, DriverEnd::Over);
    };
    let n = c.slots.len();
    let mut next = match next {
        // After a reconnect: publishes due while the device was offline were not sent.
        Some(mut next) => {
            skip_ticks(&c.offered, &mut next, Instant::now(), w.period, w.end);
            next
        }
        // The first session: the schedule starts with the window, as in `telemetry`.
        None => w.start + w.period.mul_f64(index as f64 / n as f64),
    };
    let topic = ctx.telemetry_topic(index);
    let qos = c.publishing.qos;
    let why = loop {
        tokio::select! {
            biased;
            _ = over.notified() => {
                return (Ticks { next: Some(next), seq }, DriverEnd::Over);
            }
            _ = ctl.clean.notified() => break DriverEnd::Churn,
            _ = stopped(&mut stop) => break DriverEnd::Stop,
            _ = tokio::time::sleep_until(next), if next < w.end => {
                let due = Due { topic: &topic, qos, size: w.size, seq };
                match submit(&ctx, index, &client, (&c.publishing, &c.offered), due) {
                    Submitted::Queued => seq += 1,
                    Submitted::Full => {}
                    Submitted::Gone => {
                        let this = next + w.period;
                        skip_ticks(&c.offered, &mut next, this, w.period, w.end);
                        over.notified().await;
                        return (Ticks { next: Some(next), seq }, DriverEnd::Over);
                    }
                }
                next += w.period;
            }
        }
    };
    let ticks = Ticks {
        next: Some(next),
        seq,
    };
    // A clean end: the session's PUBACKs first (bounded), then the DISCONNECT.
    let until = Instant::now() + CLEAN_DRAIN;
    while c.publishing.outstanding(index) > 0 && Instant::now() < until {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = over.notified() => return (ticks, DriverEnd::Over),
        }
    }
    let _ = client.disconnect();
    // The device task reports the DISCONNECT written (or the session lost) through `over`.
    over.notified().await;
    (ticks, why)
}
