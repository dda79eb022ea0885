//! The result of a run: one serializable document (`--json`) and a human table.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::hist::Percentiles;
use super::{Qos, Scenario, Shard, SimConfig, Soak};

/// The table's words for an observer's non-zero `foreign` count.
const FOREIGN_OBSERVED: &str = "(foreign: messages on the filter that are not this run's \
telemetry, e.g. from other devices or another simulator on the same topics; neither delivered \
nor lost)";
/// The same for the fanout receivers.
const FOREIGN_FANOUT: &str = "(foreign: messages the devices received that this fanout did not \
send, e.g. a retained message of an earlier run; neither delivered nor lost)";

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// The broker URLs, comma-separated.
    pub url: String,
    /// The part of the fleet this run simulated (`1/1`: all of it).
    pub shard: Shard,
    /// The fleet indices of its devices: `[first, end)`.
    pub devices_range: [usize; 2],
    pub parameters: Value,
    pub identities: IdentityReport,
    /// One row per round of connects (`telemetry` has one: its connect phase).
    pub rounds: Vec<ConnectRound>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetryReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout: Option<FanoutReport>,
    /// `soak`: the drops and reconnects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<ChurnReport>,
    pub process: ProcessReport,
    /// A merged report: each shard's process figures (`process` is their sum).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardProcess>,
    pub elapsed_s: f64,
    /// The max duration ended the run before the scenario's own end.
    pub truncated: bool,
}

/// One shard of a merged report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardProcess {
    pub shard: Shard,
    pub devices_range: [usize; 2],
    pub process: ProcessReport,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityReport {
    pub devices: usize,
    /// Each device presents its own client certificate.
    pub certificates: bool,
    pub generated: usize,
    pub from_cache: usize,
    /// Wall time of loading and minting certificates and building the TLS configurations.
    pub generation_s: f64,
}

impl IdentityReport {
    pub(crate) fn ids_only(devices: usize) -> Self {
        Self {
            devices,
            certificates: false,
            generated: 0,
            from_cache: 0,
            generation_s: 0.0,
        }
    }
}

/// One round of connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectRound {
    pub round: u32,
    /// `first`, `repeat` or `connect`.
    pub label: String,
    pub devices: u64,
    /// Attempts started (fewer than `devices` only when the max duration ended the round).
    pub attempted: u64,
    /// CONNACK with return code 0.
    pub connected: u64,
    pub failed: u64,
    /// Attempts still without an answer when the max duration ended the round.
    pub unanswered: u64,
    /// Failures by reason: `tls alert: ...`, `connack N (...)`, `timeout: ...`, `i/o: ...`.
    pub failures: BTreeMap<String, u64>,
    /// Sessions lost after their CONNACK and before the simulator ended them.
    pub dropped: u64,
    pub drops: BTreeMap<String, u64>,
    /// From the first attempt to the last answer.
    pub duration_s: f64,
    pub connects_per_s: f64,
    /// From the start of the TCP connect to the CONNACK.
    pub connack_latency: Percentiles,
    /// CPU time of the whole process during the round.
    pub cpu_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TelemetryReport {
    pub qos: Qos,
    pub payload_bytes: usize,
    pub rate_per_device: f64,
    pub devices_publishing: u64,
    /// Messages due by the schedule.
    pub offered: u64,
    /// Handed to the MQTT clients.
    pub submitted: u64,
    /// Written to the network.
    pub sent: u64,
    /// PUBACKs (QoS 1).
    pub acked: Option<u64>,
    /// Due but not submitted because the device's request queue was full (backpressure).
    pub not_sent_queue_full: u64,
    /// Due after the device's session had ended.
    pub not_sent_disconnected: u64,
    /// Submitted and never acknowledged (QoS 1).
    pub unacknowledged: Option<u64>,
    pub publish_window_s: f64,
    pub offered_per_s: f64,
    pub sent_per_s: f64,
    pub acked_per_s: Option<f64>,
    /// From handing the publish to the client to its PUBACK (QoS 1).
    pub puback_latency: Option<Percentiles>,
    /// The same for each device's first publish only (QoS 1): its topic is new to the broker.
    pub first_puback_latency: Option<Percentiles>,
    /// The same for every publish after a device's first (QoS 1).
    pub later_puback_latency: Option<Percentiles>,
    /// With `--subscribe-commands` or `--subscribe`: the devices' subscriptions before
    /// publishing.
    pub commands_subscription: Option<CommandsSubscriptionReport>,
    pub observer: Option<ObserverReport>,
    /// With an interval: what happened in each.
    pub intervals: Vec<IntervalRow>,
    /// Unix time (s) when publishing began and when every publish was acknowledged (or the
    /// wait for them gave up), before any probe: the window to read a server's CPU time over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_unix_s: Option<[f64; 2]>,
    /// With probes: what the devices received of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<ProbeReport>,
}

/// Messages sent to the devices after publishing, from the observer's session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeReport {
    pub fanout: Option<FanoutProbeReport>,
    pub commands: Option<CommandProbeReport>,
    /// A probe a device received more than once.
    pub duplicates: u64,
    /// Messages the devices received that were not this run's probes (another shard's
    /// fan-out probe on a shared topic, retained messages).
    pub foreign: u64,
    pub error: Option<String>,
}

/// One message on a topic every device subscribed to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutProbeReport {
    /// With the topic prefix.
    pub topic: String,
    /// Devices whose subscriptions were granted and whose session was up.
    pub expected: u64,
    pub received: u64,
    /// From the publish to the last device's receipt, when every expected device had it.
    pub all_received_ms: Option<f64>,
    /// From the publish to the latest receipt, whether or not all had it.
    pub last_received_ms: Option<f64>,
    /// From the publish to each device's receipt.
    pub delivery_latency: Percentiles,
}

/// Commands to single devices (`devices/{id}/commands`), one at a time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CommandProbeReport {
    /// Devices picked at random among those subscribed.
    pub sampled: u64,
    pub sent: u64,
    pub delivered: u64,
    /// Sent and not received within the probe timeout.
    pub timed_out: u64,
    /// Not sent: the max duration was reached, the publisher failed, or three in a row timed
    /// out.
    pub skipped: u64,
    /// Received by a device they were not for.
    pub misdelivered: u64,
    /// From the publish to the device's receipt.
    pub latency: Percentiles,
}

/// Each device subscribed (QoS 1) after its CONNACK, in one SUBSCRIBE, to `devices/{id}/commands`
/// and/or further filters; only the devices whose subscription was granted publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandsSubscriptionReport {
    /// The filters, with the topic prefix; `{id}` stands for each device's id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    pub granted: u64,
    pub refused: u64,
    /// Without a SUBACK when publishing began.
    pub unanswered: u64,
    /// From queueing the SUBSCRIBE to its SUBACK.
    pub suback_latency: Percentiles,
}

/// One interval of a telemetry run or soak; counts are for the interval unless noted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntervalRow {
    /// Seconds after publishing began.
    pub end_s: f64,
    /// Sessions up at the end of the interval.
    pub connected: u64,
    /// Sessions lost in the interval.
    pub sessions_lost: u64,
    pub sent: u64,
    pub acked: u64,
    /// Observer deliveries.
    pub delivered: u64,
    /// Sessions a soak dropped on purpose.
    pub drops: u64,
    /// A soak's reconnects that got their CONNACK, and those that failed.
    pub reconnects: u64,
    pub reconnect_failures: u64,
    pub puback_latency: Percentiles,
    pub rss_bytes: u64,
    /// CPU time of the process in the interval.
    pub cpu_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObserverReport {
    pub url: String,
    pub filter: String,
    /// Every message received on the filter.
    pub received: u64,
    /// Distinct (device, sequence number) pairs of this run.
    pub delivered: u64,
    pub duplicates: u64,
    /// Acknowledged (QoS 1) or written (QoS 0) and never delivered: what the broker owed and
    /// did not deliver. Publishes a session took with it unacknowledged are not counted here.
    pub lost: u64,
    /// Delivered without the device having had its PUBACK: written before a drop, and the
    /// broker took it although the device never learnt.
    pub delivered_unconfirmed: u64,
    /// Messages on the filter that are not this run's telemetry, so neither delivered nor
    /// lost: other devices' or clients' messages on the same topics (another simulator, real
    /// devices), or a payload without this run's sequence number. Not an error of the broker.
    pub foreign: u64,
    pub delivered_per_s: f64,
    /// From the send time in the payload to the delivery.
    pub latency: Percentiles,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    /// As subscribed, with the topic prefix; `{id}` stands for each device's id.
    pub topic: String,
    /// One publish per device and message (`{id}` in the topic) rather than one per message.
    pub per_device_topic: bool,
    pub qos: Qos,
    pub payload_bytes: usize,
    pub messages: u32,
    pub interval_s: f64,
    /// Publishes the publisher submitted.
    pub publishes: u64,
    /// PUBACKs the publisher received (QoS 1).
    pub publishes_acked: Option<u64>,
    /// Devices whose subscription was granted.
    pub subscribed: u64,
    pub subscribe_refused: u64,
    /// messages × subscribed devices.
    pub expected: u64,
    /// Distinct (device, message) deliveries.
    pub delivered: u64,
    pub duplicates: u64,
    /// Messages a subscribed device never received.
    pub lost: u64,
    /// Messages that were not this run's (e.g. retained ones of an earlier run).
    pub foreign: u64,
    pub delivered_per_s: f64,
    /// From the send time in the payload to each delivery.
    pub delivery_latency: Percentiles,
    /// Per message, from its first publish to its delivery to the last device.
    pub completion_latency: Percentiles,
    pub publisher_error: Option<String>,
}

/// A soak's churn: sessions ended on purpose, lost by themselves, and the reconnects.
/// Every drop and every lost session is followed by a reconnect, or the device was still
/// offline at the end: `drops + lost_sessions == reconnects + offline_at_end`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Configured drops per minute over the fleet.
    pub drops_per_min: f64,
    /// `abrupt`, `clean` or `mixed`.
    pub mode: String,
    pub reconnect_delay_s: f64,
    pub reconnect_jitter_s: f64,
    /// Sessions ended on purpose: `drops_abrupt` (socket closed without DISCONNECT) plus
    /// `drops_clean` (PUBACKs awaited, then DISCONNECT).
    pub drops: u64,
    pub drops_abrupt: u64,
    pub drops_clean: u64,
    /// Drops due when no device was connected to drop.
    pub drops_skipped: u64,
    /// Sessions that ended without the simulator asking (broker, network, keepalive).
    pub lost_sessions: u64,
    pub lost_reasons: BTreeMap<String, u64>,
    pub reconnect_attempts: u64,
    /// Reconnects that got their CONNACK.
    pub reconnects: u64,
    pub reconnect_failures: u64,
    /// Failed reconnects by reason.
    pub failures: BTreeMap<String, u64>,
    /// Devices still offline (waiting to reconnect) when the run ended.
    pub offline_at_end: u64,
    /// QoS 1 publishes written and not acknowledged when their session ended: in flight, and
    /// not counted as lost (the device cannot know whether the broker has them).
    pub inflight_at_drop: u64,
    /// Publishes handed to the client and not yet written when their session ended.
    pub unsent_at_drop: u64,
    /// From the start of a reconnect's TCP connect to its CONNACK.
    pub reconnect_latency: Percentiles,
    /// From the end of a session to the CONNACK of the reconnect that followed.
    pub offline_time: Percentiles,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessReport {
    pub rss_start_bytes: u64,
    /// With the most devices connected (sampled).
    pub rss_connected_bytes: u64,
    pub rss_peak_bytes: u64,
    /// (connected − start) / devices: identities, TLS configurations, sessions.
    pub rss_per_device_bytes: u64,
    /// CPU of the whole run, minting included.
    pub cpu_total_s: f64,
    /// CPU of the scenario after minting.
    pub cpu_scenario_s: f64,
    pub cpu_per_connect_ms: Option<f64>,
    pub cpu_per_message_us: Option<f64>,
    pub open_files_limit: Option<u64>,
}

/// The parameters of the run, for the JSON document.
pub(crate) fn parameters(config: &SimConfig, scenario: &Scenario) -> Value {
    let mut p = json!({
        "url": super::shard::join_urls(&config.urls),
        "id_prefix": config.id_prefix,
        "topic_prefix": config.topic_prefix,
        "client_certificates": config.device_ca.is_some(),
        "key_algorithm": config.device_ca.is_some().then(|| config.key_algorithm.name()),
        "cert_cache": config.cert_cache.as_ref().map(|p| p.display().to_string()),
        "username": config.credentials.as_ref().map(|c| c.username.clone()),
        "keep_alive_s": config.keep_alive.as_secs(),
        "connect_timeout_s": config.connect_timeout.as_secs(),
        "max_duration_s": config.max_duration.as_secs_f64(),
    });
    let extra = match scenario {
        Scenario::ConnectStorm(s) => json!({
            "devices": s.devices,
            "concurrency": s.concurrency,
            "rate_per_s": s.rate,
            "hold": s.hold,
            "repeat": s.repeat,
        }),
        Scenario::Telemetry(t) | Scenario::Soak(Soak { load: t, .. }) => json!({
            "devices": t.devices,
            "concurrency": t.concurrency,
            "rate_per_device_per_s": t.rate,
            "qos": t.qos,
            "payload_size": t.payload_size,
            "duration_s": t.duration.as_secs_f64(),
            "inflight": t.inflight,
            "report_every_s": t.report_every.map(|d| d.as_secs_f64()),
            "subscribe_commands": t.subscribe_commands,
            "subscribe": t.subscribe,
            "probes": t.probes.as_ref().map(|p| json!({
                "fanout_topic": p.fanout_topic,
                "commands": p.commands,
                "timeout_s": p.timeout.as_secs_f64(),
            })),
            "observe": t.observe.as_ref().map(|o| json!({
                "url": o.url.to_string(),
                "username": o.credentials.as_ref().map(|c| c.username.clone()),
                "filter": o.filter,
            })),
        }),
        Scenario::Fanout(f) => json!({
            "devices": f.devices,
            "concurrency": f.concurrency,
            "topic": f.topic,
            "messages": f.messages,
            "interval_s": f.interval.as_secs_f64(),
            "qos": f.qos,
            "payload_size": f.payload_size,
            "publisher": {
                "url": f.publisher.url.to_string(),
                "username": f.publisher.credentials.as_ref().map(|c| c.username.clone()),
            },
        }),
    };
    if let (Value::Object(p), Value::Object(extra)) = (&mut p, extra) {
        p.extend(extra);
    }
    if let (Value::Object(p), Scenario::Soak(Soak { churn: c, .. })) = (&mut p, scenario) {
        p.insert(
            "churn".into(),
            json!({
                "drops_per_min": c.per_min,
                "mode": c.mode,
                "reconnect_delay_s": c.reconnect_delay.as_secs_f64(),
                "reconnect_jitter_s": c.reconnect_jitter.as_secs_f64(),
            }),
        );
    }
    p
}

impl ProbeReport {
    fn write_table(&self, out: &mut String) {
        if let Some(f) = &self.fanout {
            let l = &f.delivery_latency;
            let _ = writeln!(
                out,
                "  probe to all on {}: received {} of {}  until all received ms {}  (latest {})  per device ms: p50 {}  p99 {}",
                f.topic,
                f.received,
                f.expected,
                ms(f.all_received_ms),
                ms(f.last_received_ms),
                ms(l.p50_ms),
                ms(l.p99_ms),
            );
        }
        if let Some(c) = &self.commands {
            let l = &c.latency;
            let _ = writeln!(
                out,
                "  probe commands to single devices: {} sampled, {} sent, {} delivered, {} timed out, {} skipped, {} misdelivered  ms: p50 {}  p90 {}  p99 {}  max {}",
                c.sampled,
                c.sent,
                c.delivered,
                c.timed_out,
                c.skipped,
                c.misdelivered,
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                ms(l.max_ms),
            );
        }
        if self.duplicates > 0 || self.foreign > 0 {
            let _ = writeln!(
                out,
                "  probes: {} duplicates, {} foreign messages at the devices (not the probes' own)",
                self.duplicates, self.foreign
            );
        }
        if let Some(e) = &self.error {
            let _ = writeln!(out, "  probe error: {e}");
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let p = &self.parameters;
        let _ = writeln!(
            out,
            "{} against {}: {} devices{}",
            self.scenario,
            self.url,
            self.identities.devices,
            if self.truncated {
                " (TRUNCATED: max duration reached)"
            } else {
                ""
            }
        );
        if !self.shard.is_whole() {
            let _ = writeln!(
                out,
                "shard {}: devices {}..{} of the fleet",
                self.shard, self.devices_range[0], self.devices_range[1]
            );
        }
        if !self.shards.is_empty() {
            let _ = writeln!(out, "merged from {} shards", self.shards.len());
        }
        let _ = writeln!(out, "parameters: {p}");
        let id = &self.identities;
        if id.certificates {
            let _ = writeln!(
                out,
                "identities: {} client certificates ({} from cache, {} generated) in {:.2} s",
                id.devices, id.from_cache, id.generated, id.generation_s
            );
        } else {
            let _ = writeln!(
                out,
                "identities: {} client ids, no client certificates",
                id.devices
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<10} {:>8} {:>9} {:>7} {:>8} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8}",
            "round",
            "devices",
            "connected",
            "failed",
            "dropped",
            "time s",
            "connects/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms"
        );
        for r in &self.rounds {
            let l = &r.connack_latency;
            let _ = writeln!(
                out,
                "{:<10} {:>8} {:>9} {:>7} {:>8} {:>8.2} {:>10.1} {:>8} {:>8} {:>8} {:>8}",
                format!("{} {}", r.round, r.label),
                r.devices,
                r.connected,
                r.failed,
                r.dropped,
                r.duration_s,
                r.connects_per_s,
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                ms(l.max_ms),
            );
        }
        for r in &self.rounds {
            for (what, map) in [("failures", &r.failures), ("dropped", &r.drops)] {
                if !map.is_empty() {
                    let list: Vec<String> = map.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    let _ = writeln!(out, "round {} {what}: {}", r.round, list.join("; "));
                }
            }
            if r.unanswered > 0 || r.attempted < r.devices {
                let _ = writeln!(
                    out,
                    "round {}: {} of {} attempted, {} unanswered at the max duration",
                    r.round, r.attempted, r.devices, r.unanswered
                );
            }
        }
        if let Some(t) = &self.telemetry {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "telemetry: QoS {}, {} B payloads, {} msg/s per device, {} devices publishing for {:.1} s",
                u8::from(t.qos),
                t.payload_bytes,
                t.rate_per_device,
                t.devices_publishing,
                t.publish_window_s
            );
            let _ = writeln!(
                out,
                "  offered {} ({:.1}/s)  sent {} ({:.1}/s)  acked {} ({}/s)  not sent: queue full {}, disconnected {}  unacked {}",
                t.offered,
                t.offered_per_s,
                t.sent,
                t.sent_per_s,
                t.acked.map_or("-".into(), |a| a.to_string()),
                t.acked_per_s.map_or("-".into(), |a| format!("{a:.1}")),
                t.not_sent_queue_full,
                t.not_sent_disconnected,
                t.unacknowledged.map_or("-".into(), |a| a.to_string()),
            );
            if let Some(c) = &t.commands_subscription {
                let l = &c.suback_latency;
                if !c.filters.is_empty() {
                    let _ = writeln!(out, "  subscribed first to: {}", c.filters.join(", "));
                }
                let _ = writeln!(
                    out,
                    "  commands subscribed first: granted {}  refused {}  unanswered {}  SUBACK ms: p50 {}  p90 {}  p99 {}  max {}",
                    c.granted,
                    c.refused,
                    c.unanswered,
                    ms(l.p50_ms),
                    ms(l.p90_ms),
                    ms(l.p99_ms),
                    ms(l.max_ms)
                );
            }
            for (what, l) in [
                ("all publishes", &t.puback_latency),
                ("first publish", &t.first_puback_latency),
                ("later publishes", &t.later_puback_latency),
            ] {
                let Some(l) = l else { continue };
                let _ = writeln!(
                    out,
                    "  PUBACK ms, {what:<15} {:>8}: p50 {}  p90 {}  p99 {}  max {}",
                    format!("({})", l.count),
                    ms(l.p50_ms),
                    ms(l.p90_ms),
                    ms(l.p99_ms),
                    ms(l.max_ms)
                );
            }
            if !t.intervals.is_empty() {
                let _ = writeln!(
                    out,
                    "  {:>8} {:>9} {:>5} {:>7} {:>7} {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6}",
                    "end s",
                    "connected",
                    "lost",
                    "dropped",
                    "reconn",
                    "rfail",
                    "sent",
                    "acked",
                    "delivered",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "RSS MiB",
                    "CPU s"
                );
                for i in &t.intervals {
                    let l = &i.puback_latency;
                    let _ = writeln!(
                        out,
                        "  {:>8.1} {:>9} {:>5} {:>7} {:>7} {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9.1} {:>6.2}",
                        i.end_s,
                        i.connected,
                        i.sessions_lost,
                        i.drops,
                        i.reconnects,
                        i.reconnect_failures,
                        i.sent,
                        i.acked,
                        i.delivered,
                        ms(l.p50_ms),
                        ms(l.p99_ms),
                        ms(l.max_ms),
                        i.rss_bytes as f64 / (1024.0 * 1024.0),
                        i.cpu_s
                    );
                }
            }
            if let Some(o) = &t.observer {
                let _ = writeln!(
                    out,
                    "  observer {} on {}: delivered {} ({:.1}/s)  lost {}  duplicates {}  foreign {}",
                    o.url, o.filter, o.delivered, o.delivered_per_s, o.lost, o.duplicates, o.foreign
                );
                if o.foreign > 0 {
                    let _ = writeln!(out, "  {FOREIGN_OBSERVED}");
                }
                if o.delivered_unconfirmed > 0 {
                    let _ = writeln!(
                        out,
                        "  of those delivered, {} were never acknowledged to the device (in flight at a drop)",
                        o.delivered_unconfirmed
                    );
                }
                let l = &o.latency;
                let _ = writeln!(
                    out,
                    "  end-to-end latency ms: p50 {}  p90 {}  p99 {}  max {}",
                    ms(l.p50_ms),
                    ms(l.p90_ms),
                    ms(l.p99_ms),
                    ms(l.max_ms)
                );
                if let Some(e) = &o.error {
                    let _ = writeln!(out, "  observer error: {e}");
                }
            }
            if let Some(p) = &t.probes {
                p.write_table(&mut out);
            }
        }
        if let Some(f) = &self.fanout {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "fanout on {}: QoS {}, {} B payloads, {} messages every {:.3} s, {} publishes{}",
                f.topic,
                u8::from(f.qos),
                f.payload_bytes,
                f.messages,
                f.interval_s,
                f.publishes,
                f.publishes_acked
                    .map(|a| format!(" ({a} acked)"))
                    .unwrap_or_default(),
            );
            let _ = writeln!(
                out,
                "  subscribed {} (refused {})  expected {}  delivered {} ({:.1}/s)  lost {}  duplicates {}  foreign {}",
                f.subscribed,
                f.subscribe_refused,
                f.expected,
                f.delivered,
                f.delivered_per_s,
                f.lost,
                f.duplicates,
                f.foreign
            );
            if f.foreign > 0 {
                let _ = writeln!(out, "  {FOREIGN_FANOUT}");
            }
            for (what, l) in [
                ("delivery latency", &f.delivery_latency),
                ("completion (last device) latency", &f.completion_latency),
            ] {
                let _ = writeln!(
                    out,
                    "  {what} ms: p50 {}  p90 {}  p99 {}  max {}",
                    ms(l.p50_ms),
                    ms(l.p90_ms),
                    ms(l.p99_ms),
                    ms(l.max_ms)
                );
            }
            if let Some(e) = &f.publisher_error {
                let _ = writeln!(out, "  publisher error: {e}");
            }
        }
        if let Some(c) = &self.churn {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "churn: {} drops/min ({}), reconnect after {:.1} s + up to {:.1} s jitter",
                c.drops_per_min, c.mode, c.reconnect_delay_s, c.reconnect_jitter_s
            );
            let _ = writeln!(
                out,
                "  dropped {} (abrupt {}, clean {}; {} due with no device connected)  lost by themselves {}",
                c.drops, c.drops_abrupt, c.drops_clean, c.drops_skipped, c.lost_sessions
            );
            let _ = writeln!(
                out,
                "  reconnects: {} attempted, {} succeeded, {} failed  offline at the end {}",
                c.reconnect_attempts, c.reconnects, c.reconnect_failures, c.offline_at_end
            );
            let _ = writeln!(
                out,
                "  at the drops: {} in flight (written, no PUBACK; not counted as lost), {} not yet written",
                c.inflight_at_drop, c.unsent_at_drop
            );
            for (what, l) in [
                ("reconnect CONNACK", &c.reconnect_latency),
                ("offline time", &c.offline_time),
            ] {
                let _ = writeln!(
                    out,
                    "  {what} ms {:>8}: p50 {}  p90 {}  p99 {}  max {}",
                    format!("({})", l.count),
                    ms(l.p50_ms),
                    ms(l.p90_ms),
                    ms(l.p99_ms),
                    ms(l.max_ms)
                );
            }
            for (what, map) in [("lost", &c.lost_reasons), ("failed", &c.failures)] {
                if !map.is_empty() {
                    let list: Vec<String> = map.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    let _ = writeln!(out, "  {what}: {}", list.join("; "));
                }
            }
        }
        let pr = &self.process;
        let _ = writeln!(out);
        let _ = write!(
            out,
            "client process: RSS {} at start, {} connected ({:.1} KiB/device), peak {}; CPU {:.2} s scenario, {:.2} s total",
            mib(pr.rss_start_bytes),
            mib(pr.rss_connected_bytes),
            pr.rss_per_device_bytes as f64 / 1024.0,
            mib(pr.rss_peak_bytes),
            pr.cpu_scenario_s,
            pr.cpu_total_s,
        );
        if let Some(c) = pr.cpu_per_connect_ms {
            let _ = write!(out, " ({c:.2} ms/connect)");
        }
        if let Some(c) = pr.cpu_per_message_us {
            let _ = write!(out, " ({c:.1} µs/message)");
        }
        let _ = writeln!(out);
        for s in &self.shards {
            let pr = &s.process;
            let _ = writeln!(
                out,
                "  shard {} (devices {}..{}): RSS {} connected, peak {}; CPU {:.2} s scenario, {:.2} s total; elapsed {:.2} s",
                s.shard,
                s.devices_range[0],
                s.devices_range[1],
                mib(pr.rss_connected_bytes),
                mib(pr.rss_peak_bytes),
                pr.cpu_scenario_s,
                pr.cpu_total_s,
                s.elapsed_s
            );
        }
        let _ = writeln!(out, "elapsed {:.2} s", self.elapsed_s);
        out
    }
}
