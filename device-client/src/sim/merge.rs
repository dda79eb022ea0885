//! The reports of the shards of one run (`--shard K/N`, `--json`) merged into the report of
//! the whole fleet: counts and rates summed, latencies recomputed from the merged histograms,
//! per-interval rows summed by interval index, process figures summed and kept per shard.
//! Durations are the longest shard's. Each shard's observer counts its own devices' messages
//! and the others' as foreign, so delivered and lost add up to the fleet's. Each shard sends
//! its own probes to its own devices: the fan-out probe's time until all received is the
//! slowest shard's.
//!
//! **Invariant**: only the shards `1/N ..= N/N` of one run merge: the same scenario and
//! parameters, each shard exactly once.

use std::collections::BTreeMap;

use super::hist::Percentiles;
use super::report::{
    ChurnReport, CommandProbeReport, CommandsSubscriptionReport, ConnectRound, FanoutProbeReport,
    FanoutReport, IdentityReport, IntervalRow, ObserverReport, ProbeReport, ProcessReport, Report,
    ShardProcess, TelemetryReport,
};
use super::Shard;

/// Why reports do not merge.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no reports to merge")]
    Empty,
    #[error("shard {shard} is already a merged report")]
    AlreadyMerged { shard: Shard },
    #[error("shard {shard} is a {found} run, shard {first} a {expected} run")]
    Scenario {
        shard: Shard,
        found: String,
        first: Shard,
        expected: String,
    },
    #[error("shard {shard} ran with other parameters than shard {first}: {keys}")]
    Parameters {
        shard: Shard,
        first: Shard,
        keys: String,
    },
    #[error("shard {shard} is one of {found}, shard {first} one of {expected}")]
    ShardCount {
        shard: Shard,
        found: usize,
        first: Shard,
        expected: usize,
    },
    #[error("shard {0} is given more than once")]
    Duplicate(Shard),
    #[error("shards missing: {0}")]
    Missing(String),
    #[error("shard {shard}: {reason}")]
    Inconsistent { shard: Shard, reason: String },
}

/// Merges the reports of all the shards of one run, in any order.
pub fn merge(reports: &[Report]) -> Result<Report, MergeError> {
    let mut sorted: Vec<&Report> = reports.iter().collect();
    sorted.sort_by_key(|r| r.shard);
    check(&sorted)?;
    let first = sorted[0];
    let mut merged = first.clone();
    merged.shards = vec![shard_process(first)];
    for r in &sorted[1..] {
        let bad = |reason: String| MergeError::Inconsistent {
            shard: r.shard,
            reason,
        };
        add_identities(&mut merged.identities, &r.identities);
        if merged.rounds.len() != r.rounds.len() {
            return Err(bad("a different number of connect rounds".into()));
        }
        for (a, b) in merged.rounds.iter_mut().zip(&r.rounds) {
            add_round(a, b).map_err(bad)?;
        }
        merged.telemetry = match (merged.telemetry.take(), &r.telemetry) {
            (Some(mut a), Some(b)) => {
                add_telemetry(&mut a, b).map_err(bad)?;
                Some(a)
            }
            (None, None) => None,
            _ => return Err(bad("telemetry results in some shards only".into())),
        };
        merged.fanout = match (merged.fanout.take(), &r.fanout) {
            (Some(mut a), Some(b)) => {
                add_fanout(&mut a, b).map_err(bad)?;
                Some(a)
            }
            (None, None) => None,
            _ => return Err(bad("fanout results in some shards only".into())),
        };
        merged.churn = match (merged.churn.take(), &r.churn) {
            (Some(mut a), Some(b)) => {
                add_churn(&mut a, b).map_err(bad)?;
                Some(a)
            }
            (None, None) => None,
            _ => return Err(bad("churn results in some shards only".into())),
        };
        merged.shards.push(shard_process(r));
        merged.elapsed_s = merged.elapsed_s.max(r.elapsed_s);
        merged.truncated |= r.truncated;
    }
    merged.shard = Shard::WHOLE;
    merged.devices_range = [0, merged.identities.devices];
    merged.process = sum_process(&merged);
    Ok(merged)
}

fn check(sorted: &[&Report]) -> Result<(), MergeError> {
    let Some(first) = sorted.first() else {
        return Err(MergeError::Empty);
    };
    let n = first.shard.count();
    for r in sorted {
        if !r.shards.is_empty() {
            return Err(MergeError::AlreadyMerged { shard: r.shard });
        }
        if r.scenario != first.scenario {
            return Err(MergeError::Scenario {
                shard: r.shard,
                found: r.scenario.clone(),
                first: first.shard,
                expected: first.scenario.clone(),
            });
        }
        if r.parameters != first.parameters {
            return Err(MergeError::Parameters {
                shard: r.shard,
                first: first.shard,
                keys: differing_keys(&first.parameters, &r.parameters),
            });
        }
        if r.shard.count() != n {
            return Err(MergeError::ShardCount {
                shard: r.shard,
                found: r.shard.count(),
                first: first.shard,
                expected: n,
            });
        }
    }
    for pair in sorted.windows(2) {
        if pair[0].shard == pair[1].shard {
            return Err(MergeError::Duplicate(pair[0].shard));
        }
    }
    let missing: Vec<String> = (1..=n)
        .filter(|k| !sorted.iter().any(|r| r.shard.index() == *k))
        .map(|k| format!("{k}/{n}"))
        .collect();
    if !missing.is_empty() {
        return Err(MergeError::Missing(missing.join(", ")));
    }
    Ok(())
}

/// The top-level parameter names whose values differ.
fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> String {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let mut keys: Vec<&str> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys.join(", ")
        }
        _ => "all".into(),
    }
}

fn shard_process(r: &Report) -> ShardProcess {
    ShardProcess {
        shard: r.shard,
        devices_range: r.devices_range,
        process: r.process.clone(),
        elapsed_s: r.elapsed_s,
    }
}

fn add_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

fn add_opt<T: std::ops::Add<Output = T> + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    a.zip(b).map(|(a, b)| a + b)
}

fn merge_opt(
    a: &Option<Percentiles>,
    b: &Option<Percentiles>,
) -> Result<Option<Percentiles>, String> {
    match (a, b) {
        (Some(a), Some(b)) => a.merge(b).map(Some),
        (None, None) => Ok(None),
        _ => Err("latencies in some shards only".into()),
    }
}

fn add_identities(a: &mut IdentityReport, b: &IdentityReport) {
    a.devices += b.devices;
    a.certificates &= b.certificates;
    a.generated += b.generated;
    a.from_cache += b.from_cache;
    a.generation_s = a.generation_s.max(b.generation_s);
}

fn add_round(a: &mut ConnectRound, b: &ConnectRound) -> Result<(), String> {
    if (a.round, &a.label) != (b.round, &b.label) {
        return Err(format!(
            "round {} {} where the others have round {} {}",
            b.round, b.label, a.round, a.label
        ));
    }
    a.devices += b.devices;
    a.attempted += b.attempted;
    a.connected += b.connected;
    a.failed += b.failed;
    a.unanswered += b.unanswered;
    add_map(&mut a.failures, &b.failures);
    a.dropped += b.dropped;
    add_map(&mut a.drops, &b.drops);
    a.duration_s = a.duration_s.max(b.duration_s);
    a.connects_per_s += b.connects_per_s;
    a.connack_latency = a.connack_latency.merge(&b.connack_latency)?;
    a.cpu_s += b.cpu_s;
    Ok(())
}

fn add_telemetry(a: &mut TelemetryReport, b: &TelemetryReport) -> Result<(), String> {
    a.devices_publishing += b.devices_publishing;
    a.offered += b.offered;
    a.submitted += b.submitted;
    a.sent += b.sent;
    a.acked = add_opt(a.acked, b.acked);
    a.not_sent_queue_full += b.not_sent_queue_full;
    a.not_sent_disconnected += b.not_sent_disconnected;
    a.unacknowledged = add_opt(a.unacknowledged, b.unacknowledged);
    a.publish_window_s = a.publish_window_s.max(b.publish_window_s);
    a.offered_per_s += b.offered_per_s;
    a.sent_per_s += b.sent_per_s;
    a.acked_per_s = add_opt(a.acked_per_s, b.acked_per_s);
    a.puback_latency = merge_opt(&a.puback_latency, &b.puback_latency)?;
    a.first_puback_latency = merge_opt(&a.first_puback_latency, &b.first_puback_latency)?;
    a.later_puback_latency = merge_opt(&a.later_puback_latency, &b.later_puback_latency)?;
    a.commands_subscription = match (a.commands_subscription.take(), &b.commands_subscription) {
        (Some(mut x), Some(y)) => {
            add_commands(&mut x, y)?;
            Some(x)
        }
        (None, None) => None,
        _ => return Err("command subscriptions in some shards only".into()),
    };
    a.observer = match (a.observer.take(), &b.observer) {
        (Some(mut x), Some(y)) => {
            add_observer(&mut x, y)?;
            Some(x)
        }
        (None, None) => None,
        _ => return Err("an observer in some shards only".into()),
    };
    for (i, row) in b.intervals.iter().enumerate() {
        match a.intervals.get_mut(i) {
            Some(mine) => add_row(mine, row)?,
            None => a.intervals.push(row.clone()),
        }
    }
    a.window_unix_s = match (a.window_unix_s, b.window_unix_s) {
        (Some(x), Some(y)) => Some([x[0].min(y[0]), x[1].max(y[1])]),
        (x, y) => x.or(y),
    };
    a.probes = match (a.probes.take(), &b.probes) {
        (Some(mut x), Some(y)) => {
            add_probes(&mut x, y)?;
            Some(x)
        }
        (None, None) => None,
        _ => return Err("probes in some shards only".into()),
    };
    Ok(())
}

fn add_probes(a: &mut ProbeReport, b: &ProbeReport) -> Result<(), String> {
    a.fanout = match (a.fanout.take(), &b.fanout) {
        (Some(mut x), Some(y)) => {
            add_fanout_probe(&mut x, y)?;
            Some(x)
        }
        (None, None) => None,
        _ => return Err("a fan-out probe in some shards only".into()),
    };
    a.commands = match (a.commands.take(), &b.commands) {
        (Some(mut x), Some(y)) => {
            add_command_probe(&mut x, y)?;
            Some(x)
        }
        (None, None) => None,
        _ => return Err("command probes in some shards only".into()),
    };
    a.duplicates += b.duplicates;
    a.foreign += b.foreign;
    a.error = join_errors(a.error.take(), &b.error);
    Ok(())
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn add_fanout_probe(a: &mut FanoutProbeReport, b: &FanoutProbeReport) -> Result<(), String> {
    if a.topic != b.topic {
        return Err(format!(
            "a fan-out probe on {} where the others used {}",
            b.topic, a.topic
        ));
    }
    a.expected += b.expected;
    a.received += b.received;
    // All received only when every shard's devices all received theirs.
    a.all_received_ms = a
        .all_received_ms
        .zip(b.all_received_ms)
        .map(|(x, y)| x.max(y));
    a.last_received_ms = max_opt(a.last_received_ms, b.last_received_ms);
    a.delivery_latency = a.delivery_latency.merge(&b.delivery_latency)?;
    Ok(())
}

fn add_command_probe(a: &mut CommandProbeReport, b: &CommandProbeReport) -> Result<(), String> {
    a.sampled += b.sampled;
    a.sent += b.sent;
    a.delivered += b.delivered;
    a.timed_out += b.timed_out;
    a.skipped += b.skipped;
    a.misdelivered += b.misdelivered;
    a.latency = a.latency.merge(&b.latency)?;
    Ok(())
}

fn add_commands(
    a: &mut CommandsSubscriptionReport,
    b: &CommandsSubscriptionReport,
) -> Result<(), String> {
    a.granted += b.granted;
    a.refused += b.refused;
    a.unanswered += b.unanswered;
    a.suback_latency = a.suback_latency.merge(&b.suback_latency)?;
    Ok(())
}

fn add_observer(a: &mut ObserverReport, b: &ObserverReport) -> Result<(), String> {
    a.delivered += b.delivered;
    a.duplicates += b.duplicates;
    a.lost += b.lost;
    a.delivered_unconfirmed += b.delivered_unconfirmed;
    a.foreign += b.foreign;
    a.delivered_per_s += b.delivered_per_s;
    a.latency = a.latency.merge(&b.latency)?;
    a.error = join_errors(a.error.take(), &b.error);
    Ok(())
}

fn join_errors(a: Option<String>, b: &Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or_else(|| b.clone()),
    }
}

fn add_row(a: &mut IntervalRow, b: &IntervalRow) -> Result<(), String> {
    a.end_s = a.end_s.max(b.end_s);
    a.connected += b.connected;
    a.sessions_lost += b.sessions_lost;
    a.sent += b.sent;
    a.acked += b.acked;
    a.delivered += b.delivered;
    a.drops += b.drops;
    a.reconnects += b.reconnects;
    a.reconnect_failures += b.reconnect_failures;
    a.puback_latency = a.puback_latency.merge(&b.puback_latency)?;
    a.rss_bytes += b.rss_bytes;
    a.cpu_s += b.cpu_s;
    Ok(())
}

fn add_fanout(a: &mut FanoutReport, b: &FanoutReport) -> Result<(), String> {
    a.publishes += b.publishes;
    a.publishes_acked = add_opt(a.publishes_acked, b.publishes_acked);
    a.subscribed += b.subscribed;
    a.subscribe_refused += b.subscribe_refused;
    a.expected += b.expected;
    a.delivered += b.delivered;
    a.duplicates += b.duplicates;
    a.lost += b.lost;
    a.foreign += b.foreign;
    a.delivered_per_s += b.delivered_per_s;
    a.delivery_latency = a.delivery_latency.merge(&b.delivery_latency)?;
    a.completion_latency = a.completion_latency.merge(&b.completion_latency)?;
    a.publisher_error = join_errors(a.publisher_error.take(), &b.publisher_error);
    Ok(())
}

fn add_churn(a: &mut ChurnReport, b: &ChurnReport) -> Result<(), String> {
    a.drops_per_min += b.drops_per_min;
    a.drops += b.drops;
    a.drops_abrupt += b.drops_abrupt;
    a.drops_clean += b.drops_clean;
    a.drops_skipped += b.drops_skipped;
    a.lost_sessions += b.lost_sessions;
    add_map(&mut a.lost_reasons, &b.lost_reasons);
    a.reconnect_attempts += b.reconnect_attempts;
    a.reconnects += b.reconnects;
    a.reconnect_failures += b.reconnect_failures;
    add_map(&mut a.failures, &b.failures);
    a.offline_at_end += b.offline_at_end;
    a.inflight_at_drop += b.inflight_at_drop;
    a.unsent_at_drop += b.unsent_at_drop;
    a.reconnect_latency = a.reconnect_latency.merge(&b.reconnect_latency)?;
    a.offline_time = a.offline_time.merge(&b.offline_time)?;
    Ok(())
}

/// The shards' process figures summed; per-device and per-connect figures recomputed as one
/// process computes them.
fn sum_process(r: &Report) -> ProcessReport {
    let all = r.shards.iter().map(|s| &s.process);
    let sum = |f: fn(&ProcessReport) -> u64| all.clone().map(f).sum::<u64>();
    let sum_f = |f: fn(&ProcessReport) -> f64| all.clone().map(f).sum::<f64>();
    let rss_start = sum(|p| p.rss_start_bytes);
    let rss_connected = sum(|p| p.rss_connected_bytes);
    let cpu = sum_f(|p| p.cpu_scenario_s);
    let connects: u64 = r.rounds.iter().map(|x| x.attempted).sum();
    let messages = match (&r.telemetry, &r.fanout) {
        (Some(t), _) => t.sent,
        (None, Some(f)) => f.delivered,
        (None, None) => 0,
    };
    ProcessReport {
        rss_start_bytes: rss_start,
        rss_connected_bytes: rss_connected,
        rss_peak_bytes: sum(|p| p.rss_peak_bytes),
        rss_per_device_bytes: rss_connected.saturating_sub(rss_start)
            / (r.identities.devices.max(1) as u64),
        cpu_total_s: sum_f(|p| p.cpu_total_s),
        cpu_scenario_s: cpu,
        cpu_per_connect_ms: (connects > 0 && messages == 0).then(|| cpu * 1000.0 / connects as f64),
        cpu_per_message_us: (messages > 0).then(|| cpu * 1e6 / messages as f64),
        open_files_limit: all.clone().filter_map(|p| p.open_files_limit).min(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::hist::Histogram;
    use super::*;

    /// A connect-storm report of shard `k/n` of a 10-device fleet whose CONNACKs took
    /// `latencies` µs.
    fn storm(k: usize, n: usize, latencies: &[u64]) -> Report {
        let shard = Shard::new(k, n).unwrap();
        let range = shard.range(10);
        let mut h = Histogram::new();
        for v in latencies {
            h.record(*v);
        }
        let devices = range.len() as u64;
        Report {
            scenario: "connect-storm".into(),
            url: "mqtt://127.0.0.1:1883".into(),
            shard,
            devices_range: [range.start, range.end],
            parameters: json!({ "devices": 10, "concurrency": 5 }),
            identities: IdentityReport::ids_only(range.len()),
            rounds: vec![ConnectRound {
                round: 1,
                label: "first".into(),
                devices,
                attempted: devices,
                connected: devices - 1,
                failed: 1,
                unanswered: 0,
                failures: BTreeMap::from([("connack 0x87 (not authorized)".to_owned(), 1)]),
                dropped: 0,
                drops: BTreeMap::new(),
                duration_s: k as f64,
                connects_per_s: 10.0,
                connack_latency: h.summary_ms(),
                cpu_s: 0.5,
            }],
            telemetry: None,
            fanout: None,
            churn: None,
            process: ProcessReport {
                rss_start_bytes: 1000,
                rss_connected_bytes: 1000 + 100 * devices,
                rss_peak_bytes: 2000,
                rss_per_device_bytes: 100,
                cpu_total_s: 1.0,
                cpu_scenario_s: 0.5,
                cpu_per_connect_ms: Some(100.0),
                cpu_per_message_us: None,
                open_files_limit: Some(20_000 - k as u64),
            },
            shards: Vec::new(),
            elapsed_s: k as f64,
            truncated: false,
        }
    }

    #[test]
    fn shards_merge_into_the_fleet() {
        let (a, b): (Vec<u64>, Vec<u64>) = ((100..105).collect(), (5_000..5_005).collect());
        // Through JSON and in any order, as `simulate merge` reads them.
        let reports: Vec<Report> = [storm(2, 2, &b), storm(1, 2, &a)]
            .iter()
            .map(|r| serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap())
            .collect();
        let m = merge(&reports).unwrap();
        assert_eq!((m.shard, m.devices_range), (Shard::WHOLE, [0, 10]));
        assert_eq!(m.identities.devices, 10);
        let r = &m.rounds[0];
        assert_eq!(
            (r.devices, r.attempted, r.connected, r.failed),
            (10, 10, 8, 2)
        );
        assert_eq!(r.failures["connack 0x87 (not authorized)"], 2);
        assert_eq!((r.duration_s, r.connects_per_s, r.cpu_s), (2.0, 20.0, 1.0));
        let mut all = Histogram::new();
        for v in a.iter().chain(&b) {
            all.record(*v);
        }
        assert_eq!(r.connack_latency, all.summary_ms());
        let shards: Vec<String> = m.shards.iter().map(|s| s.shard.to_string()).collect();
        assert_eq!(shards, ["1/2", "2/2"]);
        let p = &m.process;
        assert_eq!((p.rss_start_bytes, p.rss_connected_bytes), (2000, 3000));
        assert_eq!(p.rss_per_device_bytes, 100);
        assert_eq!((p.cpu_total_s, p.cpu_scenario_s), (2.0, 1.0));
        assert_eq!(p.cpu_per_connect_ms, Some(100.0));
        assert_eq!(p.open_files_limit, Some(19_998));
        assert_eq!(m.elapsed_s, 2.0);
        let table = m.to_table();
        assert!(table.contains("merged from 2 shards"), "{table}");
        assert!(table.contains("shard 2/2 (devices 5..10)"), "{table}");
        // A merged report does not merge again.
        let e = merge(&[m]).unwrap_err().to_string();
        assert!(e.contains("already a merged report"), "{e}");
    }

    #[test]
    fn probes_merge_with_the_slowest_shard_for_all_received() {
        let latencies = |values: &[u64]| {
            let mut h = Histogram::new();
            for v in values {
                h.record(*v);
            }
            h.summary_ms()
        };
        let shard = |expected, received, all: Option<f64>, last, commands: &[u64]| ProbeReport {
            fanout: Some(FanoutProbeReport {
                topic: "cohorts/c/commands".into(),
                expected,
                received,
                all_received_ms: all,
                last_received_ms: Some(last),
                delivery_latency: latencies(&[1_000, 2_000]),
            }),
            commands: Some(CommandProbeReport {
                sampled: 3,
                sent: 3,
                delivered: commands.len() as u64,
                timed_out: 3 - commands.len() as u64,
                latency: latencies(commands),
                ..CommandProbeReport::default()
            }),
            duplicates: 0,
            foreign: 1,
            error: None,
        };
        let mut a = shard(5, 5, Some(40.0), 40.0, &[500, 600, 700]);
        add_probes(&mut a, &shard(5, 5, Some(90.0), 90.0, &[800, 900])).unwrap();
        let f = a.fanout.as_ref().unwrap();
        assert_eq!((f.expected, f.received), (10, 10));
        assert_eq!(
            (f.all_received_ms, f.last_received_ms),
            (Some(90.0), Some(90.0))
        );
        assert_eq!(f.delivery_latency.count, 4);
        let c = a.commands.as_ref().unwrap();
        assert_eq!((c.sampled, c.delivered, c.timed_out), (6, 5, 1));
        assert_eq!(c.latency, latencies(&[500, 600, 700, 800, 900]));
        assert_eq!(a.foreign, 2);
        // One shard's devices did not all receive theirs: neither did the fleet's.
        add_probes(&mut a, &shard(5, 4, None, 120.0, &[])).unwrap();
        let f = a.fanout.as_ref().unwrap();
        assert_eq!((f.expected, f.received), (15, 14));
        assert_eq!((f.all_received_ms, f.last_received_ms), (None, Some(120.0)));
        let mut other = shard(5, 5, None, 1.0, &[]);
        other.fanout.as_mut().unwrap().topic = "cohorts/d/commands".into();
        assert!(add_probes(&mut a, &other).is_err());
        let none = ProbeReport {
            fanout: None,
            ..ProbeReport::default()
        };
        assert!(add_probes(&mut a, &none).is_err());
    }

    #[test]
    fn reports_of_other_runs_or_incomplete_sets_are_refused() {
        let a = storm(1, 2, &[1]);
        let b = storm(2, 2, &[2]);
        let mut other_scenario = b.clone();
        other_scenario.scenario = "telemetry".into();
        let mut other_params = b.clone();
        other_params.parameters["concurrency"] = json!(50);
        let three = storm(3, 3, &[3]);
        let cases: [(Vec<Report>, &str); 6] = [
            (vec![], "no reports"),
            (vec![a.clone(), other_scenario], "telemetry run"),
            (
                vec![a.clone(), other_params],
                "parameters than shard 1/2: concurrency",
            ),
            (
                vec![a.clone(), a.clone(), b.clone()],
                "1/2 is given more than once",
            ),
            (vec![b.clone()], "shards missing: 1/2"),
            (vec![a, b, three], "one of 3"),
        ];
        for (reports, want) in cases {
            let e = merge(&reports).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (want {want})");
        }
        // Latencies without their histogram (an older report) cannot be merged exactly.
        let mut old = storm(1, 2, &[5]);
        old.rounds[0].connack_latency.histogram = None;
        let e = merge(&[old, storm(2, 2, &[6])]).unwrap_err().to_string();
        assert!(e.contains("without their histogram"), "{e}");
    }
}
