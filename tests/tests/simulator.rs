//! The fleet simulator (`device-client simulate`) in-process through its library API, against
//! the real platform (mutual TLS, JITP, durable PUBACKs, the service listener as observer and
//! publisher, topic rights) and the local Mosquitto: the counts it reports are the counts that
//! happened.

use std::sync::Arc;
use std::time::Duration;

use device_client::fleet_wire::{DeviceId, Topic};
use device_client::pki::{Ca, CaOptions, DeviceCertOptions, KeyAlgorithm};
use device_client::sim::{
    self, Churn, ConnectStorm, DropMode, Fanout, Observe, Probes, Publisher, Qos, Report, Scenario,
    Shard, SimConfig, Soak, TelemetryLoad,
};
use device_client::{publish_once, ClientIdentity, ConnectOptions, Credentials, TlsConfig};
use e2e::{Fleet, Platform, TestCa};
use serde_json::json;

const MOSQUITTO: &str = "127.0.0.1:1883";

/// Devices of `fleet` on the platform's device listener; the CA goes through files like the
/// CLI's `--ca-cert` / `--ca-key`.
fn platform_config(p: &Platform, ca: &TestCa, dir: &std::path::Path, prefix: &str) -> SimConfig {
    let (cert, key) = (dir.join("mfg-ca.pem"), dir.join("mfg-ca.key"));
    std::fs::write(&cert, &ca.pem).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    let url = format!("mqtts://127.0.0.1:{}", p.app().mqtts_addr().port());
    let mut c = SimConfig::new(url.parse().unwrap());
    c.server_ca_pem = Some(p.server_ca_pem().into_bytes());
    c.device_ca = Some(Arc::new(Ca::from_files(&cert, &key).unwrap()));
    c.id_prefix = prefix.to_owned();
    c.max_duration = Duration::from_secs(60);
    c
}

fn assert_all_connected(report: &Report, devices: u64) {
    for r in &report.rounds {
        assert_eq!(
            (r.devices, r.attempted, r.connected, r.failed, r.dropped),
            (devices, devices, devices, 0, 0),
            "round {}: {r:?}",
            r.round
        );
        assert!(r.failures.is_empty() && r.drops.is_empty(), "{r:?}");
        assert_eq!(r.connack_latency.count, devices);
        assert!(r.connack_latency.p50_ms.unwrap() <= r.connack_latency.max_ms.unwrap());
        assert!(r.connects_per_s > 0.0);
    }
    assert!(!report.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_provisions_every_device_then_reconnects_from_the_cache() {
    let p = Platform::sqlite().await;
    let fleet: Fleet = p.jitp_fleet(json!({ "load": "storm" })).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = platform_config(&p, &fleet.ca, dir.path(), "storm-");
    config.cert_cache = Some(dir.path().join("certs"));
    let storm = Scenario::ConnectStorm(ConnectStorm {
        devices: 50,
        concurrency: 10,
        rate: None,
        hold: true,
        repeat: 1,
    });

    let report = sim::run(&config, &storm).await.unwrap();
    assert_all_connected(&report, 50);
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(
        (
            report.rounds[0].label.as_str(),
            report.rounds[1].label.as_str()
        ),
        ("first", "repeat")
    );
    assert_eq!(
        (report.identities.generated, report.identities.from_cache),
        (50, 0)
    );
    let metrics = p.app().control().metrics();
    assert_eq!(metrics.jitp_provisioned, 50, "the first round provisioned");
    assert_eq!(metrics.connects, 100);
    for id in ["storm-00000", "storm-00049"] {
        let d = p.device(id).await;
        assert_eq!(d["tags"], json!({ "load": "storm" }), "{d}");
        assert_eq!(d["cohort_id"], json!(fleet.cohort_id), "{d}");
    }
    // Held sessions end with a DISCONNECT.
    let last = e2e::eventually("storm-00049 offline", || async {
        let d = p.device("storm-00049").await;
        (d["online"] == json!(false)).then_some(d)
    })
    .await;
    assert_eq!(last["disconnect_reason"], "client", "{last}");

    // A second run takes every certificate from the cache; nothing is provisioned again.
    let report = sim::run(&config, &storm).await.unwrap();
    assert_all_connected(&report, 50);
    assert_eq!(
        (report.identities.generated, report.identities.from_cache),
        (0, 50)
    );
    assert_eq!(p.app().control().metrics().jitp_provisioned, 50);
    // The JSON document carries scenario, parameters and results.
    let doc = serde_json::to_value(&report).unwrap();
    assert_eq!(doc["scenario"], "connect-storm");
    assert_eq!(doc["parameters"]["devices"], 50);
    assert_eq!(doc["rounds"][1]["connected"], 50);
    p.stop().await;
}

/// Two shards of one 20-device fleet, run side by side over two URLs of the same device
/// listener (by address and by name), connect every device of the fleet exactly once, with the
/// ids and certificates of the unsharded run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_connect_the_whole_fleet_once() {
    let p = Platform::sqlite().await;
    let fleet: Fleet = p.jitp_fleet(json!({ "load": "shards" })).await;
    let dir = tempfile::tempdir().unwrap();
    let base = platform_config(&p, &fleet.ca, dir.path(), "shard-");
    let port = p.app().mqtts_addr().port();
    let storm = Scenario::ConnectStorm(ConnectStorm {
        devices: 20,
        concurrency: 5,
        rate: None,
        hold: true,
        repeat: 0,
    });
    let shard = |k| {
        let mut c = base.clone();
        c.urls = vec![
            format!("mqtts://127.0.0.1:{port}").parse().unwrap(),
            format!("mqtts://localhost:{port}").parse().unwrap(),
        ];
        c.shard = Shard::new(k, 2).unwrap();
        c
    };
    let (one, two) = (shard(1), shard(2));
    let (one, two) = tokio::join!(sim::run(&one, &storm), sim::run(&two, &storm));
    let reports = [one.unwrap(), two.unwrap()];
    for (k, (report, range)) in reports.iter().zip([[0, 10], [10, 20]]).enumerate() {
        assert_eq!(report.shard, Shard::new(k + 1, 2).unwrap());
        assert_eq!(report.devices_range, range);
        assert_eq!(report.identities.devices, 10);
        assert_all_connected(report, 10);
        assert_eq!(report.parameters["devices"], 20, "the fleet's total");
    }
    // Their JSON reports merge into the fleet's.
    let json: Vec<Report> = reports
        .iter()
        .map(|r| serde_json::from_value(serde_json::to_value(r).unwrap()).unwrap())
        .collect();
    let merged = sim::merge::merge(&json).unwrap();
    assert_all_connected(&merged, 20);
    assert_eq!(merged.identities.devices, 20);
    assert_eq!(merged.shards.len(), 2);
    assert_eq!(merged.devices_range, [0, 20]);
    let e = sim::merge::merge(&json[1..]).unwrap_err().to_string();
    assert!(e.contains("missing: 1/2"), "{e}");
    let metrics = p.app().control().metrics();
    assert_eq!(
        metrics.jitp_provisioned, 20,
        "every device provisioned once"
    );
    assert_eq!(metrics.connects, 20, "every device connected once");
    for i in 0..20 {
        let d = p.device(&format!("shard-{i:05}")).await;
        assert_eq!(d["tags"], json!({ "load": "shards" }), "{d}");
    }

    // A shard refuses more shards than devices, and a shard number beyond its count.
    let mut bad = base.clone();
    bad.shard = Shard::new(3, 30).unwrap();
    let e = sim::run(&bad, &storm).await.unwrap_err().to_string();
    assert!(e.contains("at most --devices"), "{e}");
    assert!(Shard::new(3, 2).is_err());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_counts_refusals_by_reason() {
    let p = Platform::sqlite().await;
    let stranger = TestCa::new("Unregistered CA");
    let dir = tempfile::tempdir().unwrap();
    let config = platform_config(&p, &stranger, dir.path(), "stranger-");
    let storm = Scenario::ConnectStorm(ConnectStorm {
        devices: 5,
        concurrency: 5,
        ..ConnectStorm::default()
    });
    let report = sim::run(&config, &storm).await.unwrap();
    let r = &report.rounds[0];
    assert_eq!((r.connected, r.failed), (0, 5), "{r:?}");
    assert_eq!(r.failures.len(), 1, "{r:?}");
    let (reason, n) = r.failures.iter().next().unwrap();
    assert_eq!(*n, 5);
    assert!(reason.starts_with("tls"), "{reason}");
    assert_eq!(r.connack_latency.count, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_is_acknowledged_stored_and_delivered_without_loss() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let config = platform_config(&p, &fleet.ca, dir.path(), "tele-");
    let service = format!("mqtt://127.0.0.1:{}", p.app().service_addr().port());
    let load = Scenario::Telemetry(TelemetryLoad {
        devices: 20,
        concurrency: 20,
        rate: 5.0,
        qos: Qos::AtLeastOnce,
        payload_size: 200,
        duration: Duration::from_secs(2),
        inflight: 10,
        observe: Some(Observe {
            url: service.parse().unwrap(),
            credentials: Some(Credentials {
                username: "svc".into(),
                password: p.app().admin_token().to_owned(),
            }),
            server_ca_pem: None,
            filter: None,
        }),
        report_every: None,
        subscribe_commands: true,
        // The scaling table's row in small: a cohort topic beside the commands, one message
        // to the whole cohort and one command each to five devices after publishing.
        subscribe: vec![format!("cohorts/{}/commands", fleet.cohort_id)],
        probes: Some(Probes {
            fanout_topic: Some(format!("cohorts/{}/commands", fleet.cohort_id)),
            commands: 5,
            timeout: Duration::from_secs(5),
        }),
    });
    let report = sim::run(&config, &load).await.unwrap();
    assert_all_connected(&report, 20);
    let t = report.telemetry.as_ref().expect("telemetry results");
    // 5 msg/s for 2 s: ten ticks per device.
    assert_eq!(t.offered, 200, "{t:?}");
    assert_eq!(t.devices_publishing, 20);
    assert_eq!((t.submitted, t.sent), (200, 200), "{t:?}");
    assert_eq!(t.acked, Some(200), "{t:?}");
    assert_eq!(t.unacknowledged, Some(0));
    assert_eq!((t.not_sent_queue_full, t.not_sent_disconnected), (0, 0));
    assert_eq!(t.payload_bytes, 200);
    assert_eq!(t.puback_latency.as_ref().unwrap().count, 200);
    let first = t.first_puback_latency.as_ref().unwrap();
    let later = t.later_puback_latency.as_ref().unwrap();
    assert_eq!((first.count, later.count), (20, 180));
    let c = t
        .commands_subscription
        .as_ref()
        .expect("command subscriptions");
    assert_eq!((c.granted, c.refused, c.unanswered), (20, 0, 0), "{c:?}");
    assert_eq!(c.suback_latency.count, 20);
    let o = t.observer.as_ref().expect("observer results");
    assert_eq!(
        (o.delivered, o.lost, o.duplicates, o.foreign),
        (200, 0, 0, 0),
        "{o:?}"
    );
    assert_eq!(o.latency.count, 200);
    assert!(o.error.is_none(), "{o:?}");
    let probes = t.probes.as_ref().expect("probe results");
    let fanout = probes.fanout.as_ref().expect("fan-out probe");
    assert_eq!((fanout.expected, fanout.received), (20, 20), "{probes:?}");
    assert!(fanout.all_received_ms.is_some(), "{probes:?}");
    let commands = probes.commands.as_ref().expect("command probes");
    assert_eq!(
        (
            commands.sampled,
            commands.sent,
            commands.delivered,
            commands.timed_out
        ),
        (5, 5, 5, 0),
        "{probes:?}"
    );
    assert_eq!(probes.duplicates, 0, "{probes:?}");

    // PUBACK means committed: the platform stored every message.
    for id in ["tele-00000", "tele-00019"] {
        let d = p.device(id).await;
        assert_eq!(d["last_telemetry"]["seq"], 9, "{d}");
        let (s, history) = p
            .api(
                "GET",
                &format!("/api/v1/devices/{id}/telemetry?limit=100"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{history}");
        let rows = history["items"].as_array().expect("telemetry rows");
        assert_eq!(rows.len(), 10, "{history}");
    }
    p.stop().await;
}

async fn mosquitto() -> bool {
    let up = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(MOSQUITTO),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !up {
        println!("skipped: no Mosquitto on {MOSQUITTO}");
    }
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_against_mosquitto() {
    if !mosquitto().await {
        return;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut config = SimConfig::new(format!("mqtt://{MOSQUITTO}").parse().unwrap());
    config.id_prefix = format!("sim{}-", &run[..8]);
    config.topic_prefix = format!("simtest/{run}/");
    config.max_duration = Duration::from_secs(60);

    let storm = Scenario::ConnectStorm(ConnectStorm {
        devices: 50,
        concurrency: 25,
        rate: Some(500.0),
        hold: true,
        repeat: 0,
    });
    let report = sim::run(&config, &storm).await.unwrap();
    assert_all_connected(&report, 50);
    assert!(!report.identities.certificates);

    let load = Scenario::Telemetry(TelemetryLoad {
        devices: 10,
        concurrency: 10,
        rate: 10.0,
        qos: Qos::AtLeastOnce,
        payload_size: 64,
        duration: Duration::from_secs(1),
        inflight: 10,
        observe: Some(Observe {
            url: format!("mqtt://{MOSQUITTO}").parse().unwrap(),
            credentials: None,
            server_ca_pem: None,
            filter: None,
        }),
        report_every: None,
        subscribe_commands: false,
        subscribe: Vec::new(),
        probes: None,
    });
    let report = sim::run(&config, &load).await.unwrap();
    let t = report.telemetry.as_ref().unwrap();
    assert_eq!(t.offered, 100, "{t:?}");
    assert_eq!((t.sent, t.acked), (100, Some(100)), "{t:?}");
    let o = t.observer.as_ref().unwrap();
    assert_eq!(o.filter, format!("simtest/{run}/devices/+/telemetry"));
    assert_eq!((o.delivered, o.lost, o.foreign), (100, 0, 0), "{o:?}");

    let fanout = Scenario::Fanout(Fanout {
        devices: 20,
        concurrency: 20,
        topic: "broadcast".into(),
        messages: 3,
        interval: Duration::from_millis(100),
        qos: Qos::AtLeastOnce,
        payload_size: 64,
        publisher: Publisher {
            url: format!("mqtt://{MOSQUITTO}").parse().unwrap(),
            credentials: None,
            server_ca_pem: None,
        },
    });
    let report = sim::run(&config, &fanout).await.unwrap();
    let f = report.fanout.as_ref().unwrap();
    assert_eq!(f.topic, format!("simtest/{run}/broadcast"));
    assert_eq!((f.publishes, f.subscribed), (3, 20), "{f:?}");
    assert_eq!((f.delivered, f.lost, f.duplicates), (60, 0, 0), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_of_commands_and_cohort_updates_reaches_every_device() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let config = platform_config(&p, &fleet.ca, dir.path(), "fan-");
    let service = format!("mqtt://127.0.0.1:{}", p.app().service_addr().port());
    let publisher = Publisher {
        url: service.parse().unwrap(),
        credentials: Some(Credentials {
            username: "ops".into(),
            password: p.app().admin_token().to_owned(),
        }),
        server_ca_pem: None,
    };
    let cases = [
        ("devices/{id}/commands".to_owned(), true),
        (format!("cohorts/{}/commands", fleet.cohort_id), false),
    ];
    for (topic, per_device) in cases {
        let fanout = Scenario::Fanout(Fanout {
            devices: 20,
            concurrency: 20,
            topic: topic.clone(),
            messages: 3,
            interval: Duration::from_millis(100),
            qos: Qos::AtLeastOnce,
            payload_size: 100,
            publisher: publisher.clone(),
        });
        let report = sim::run(&config, &fanout).await.unwrap();
        assert_all_connected(&report, 20);
        let f = report.fanout.as_ref().expect("fanout results");
        let publishes = if per_device { 60 } else { 3 };
        assert_eq!(f.per_device_topic, per_device);
        assert_eq!(
            (f.publishes, f.publishes_acked),
            (publishes, Some(publishes)),
            "{topic}: {f:?}"
        );
        assert_eq!((f.subscribed, f.subscribe_refused), (20, 0), "{f:?}");
        assert_eq!(
            (f.expected, f.delivered, f.lost, f.duplicates),
            (60, 60, 0, 0),
            "{topic}: {f:?}"
        );
        assert_eq!(f.delivery_latency.count, 60);
        assert_eq!(f.completion_latency.count, 3);
        assert!(f.publisher_error.is_none(), "{f:?}");
    }

    // Devices may not subscribe to another cohort's updates: every subscription is refused.
    let fanout = Scenario::Fanout(Fanout {
        devices: 3,
        concurrency: 3,
        topic: "cohorts/some-other-cohort/updates".into(),
        messages: 1,
        interval: Duration::from_millis(100),
        qos: Qos::AtLeastOnce,
        payload_size: 0,
        publisher,
    });
    let report = sim::run(&config, &fanout).await.unwrap();
    let f = report.fanout.as_ref().unwrap();
    assert_eq!(
        (f.subscribed, f.subscribe_refused, f.expected, f.delivered),
        (0, 3, 0, 0),
        "{f:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_reports_every_interval() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let config = platform_config(&p, &fleet.ca, dir.path(), "soak-");
    // Without churn: nobody is dropped.
    let soak = Scenario::Soak(Soak {
        load: TelemetryLoad {
            devices: 10,
            concurrency: 10,
            rate: 4.0,
            duration: Duration::from_secs(3),
            report_every: Some(Duration::from_secs(1)),
            ..TelemetryLoad::default()
        },
        churn: Churn::default(),
    });
    let report = sim::run(&config, &soak).await.unwrap();
    let c = report.churn.as_ref().expect("churn results");
    assert_eq!((c.drops, c.lost_sessions, c.reconnects), (0, 0, 0), "{c:?}");
    assert_eq!(report.scenario, "soak");
    assert_all_connected(&report, 10);
    let t = report.telemetry.as_ref().unwrap();
    assert_eq!((t.sent, t.acked), (120, Some(120)), "{t:?}");
    assert!(t.intervals.len() >= 3, "{:?}", t.intervals);
    // The last row is taken while the devices end; every row before it has them all up.
    let (last, before) = t.intervals.split_last().unwrap();
    for row in before {
        assert_eq!((row.connected, row.sessions_lost), (10, 0), "{row:?}");
        assert!(row.rss_bytes > 0);
    }
    assert!(last.connected <= 10 && last.sessions_lost == 0, "{last:?}");
    let sent: u64 = t.intervals.iter().map(|r| r.sent).sum();
    let acked: u64 = t.intervals.iter().map(|r| r.acked).sum();
    assert_eq!((sent, acked), (120, 120), "{:?}", t.intervals);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_churn_drops_and_reconnects_without_losing_acknowledged_telemetry() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let config = platform_config(&p, &fleet.ca, dir.path(), "churn-");
    let service = format!("mqtt://127.0.0.1:{}", p.app().service_addr().port());
    let devices = 20;
    // 5 msg/s for 6 s: 30 ticks per device. About 12 drops (a Poisson process of 2 per
    // second), half abrupt, half clean; none at all has a chance of e^-12.
    let soak = Scenario::Soak(Soak {
        load: TelemetryLoad {
            devices,
            concurrency: 20,
            rate: 5.0,
            qos: Qos::AtLeastOnce,
            payload_size: 100,
            duration: Duration::from_secs(6),
            inflight: 10,
            observe: Some(Observe {
                url: service.parse().unwrap(),
                credentials: Some(Credentials {
                    username: "svc".into(),
                    password: p.app().admin_token().to_owned(),
                }),
                server_ca_pem: None,
                filter: None,
            }),
            report_every: Some(Duration::from_secs(2)),
            subscribe_commands: false,
            subscribe: Vec::new(),
            probes: None,
        },
        churn: Churn {
            per_min: 120.0,
            mode: DropMode::Mixed,
            reconnect_delay: Duration::from_millis(200),
            reconnect_jitter: Duration::from_millis(300),
        },
    });
    let report = sim::run(&config, &soak).await.unwrap();
    assert_eq!(
        report.rounds[0].connected, devices as u64,
        "{:?}",
        report.rounds
    );
    assert!(!report.truncated);
    let c = report.churn.as_ref().expect("churn results");
    let t = report.telemetry.as_ref().unwrap();
    let o = t.observer.as_ref().unwrap();
    let context = format!("{c:#?}\n{t:#?}");

    // Sessions: every drop and every loss is followed by a reconnect or still offline at the end.
    assert!(c.drops > 0, "{context}");
    assert_eq!(c.drops, c.drops_abrupt + c.drops_clean, "{context}");
    assert_eq!(c.lost_sessions, 0, "the platform dropped nobody: {context}");
    assert_eq!(c.reconnect_failures, 0, "{context}");
    assert!(c.reconnects > 0, "{context}");
    assert_eq!(
        c.reconnects + c.offline_at_end,
        c.drops + c.lost_sessions,
        "{context}"
    );
    assert_eq!(c.reconnect_attempts, c.reconnects + c.reconnect_failures);
    assert_eq!(c.reconnect_latency.count, c.reconnects);
    assert_eq!(c.offline_time.count, c.reconnects);
    // The platform saw the same: one connection per device, one per reconnect, and the
    // observer's.
    let metrics = p.app().control().metrics();
    assert_eq!(
        metrics.connects,
        devices as u64 + c.reconnects + 1,
        "{context}"
    );

    // Publishes: every tick is sent, refused by a full queue, or due while offline; every
    // submitted publish is written or given up unwritten at a drop; every written one is
    // acknowledged or was in flight at a drop.
    assert_eq!(t.offered, devices as u64 * 30, "{context}");
    assert_eq!(
        t.offered,
        t.submitted + t.not_sent_queue_full + t.not_sent_disconnected,
        "{context}"
    );
    assert_eq!(t.submitted, t.sent + c.unsent_at_drop, "{context}");
    let acked = t.acked.unwrap();
    assert_eq!(t.sent, acked + c.inflight_at_drop, "{context}");
    assert!(acked > 0);

    // Delivery: nothing the platform acknowledged is missing, and the observer saw exactly the
    // acknowledged publishes plus some of those in flight at an abrupt drop.
    assert_eq!((o.lost, o.duplicates, o.foreign), (0, 0, 0), "{o:?}");
    assert_eq!(
        o.delivered,
        acked + o.delivered_unconfirmed,
        "{context}\n{o:?}"
    );
    assert!(
        o.delivered_unconfirmed <= c.inflight_at_drop,
        "{context}\n{o:?}"
    );
    assert!(o.error.is_none(), "{o:?}");

    // The rows add up to the totals.
    let sum = |f: fn(&sim::IntervalRow) -> u64| t.intervals.iter().map(f).sum::<u64>();
    assert_eq!(sum(|r| r.drops), c.drops, "{:?}", t.intervals);
    assert_eq!(sum(|r| r.reconnects), c.reconnects, "{:?}", t.intervals);
    assert_eq!(sum(|r| r.acked), acked, "{:?}", t.intervals);
    assert!(t.intervals.iter().all(|r| r.rss_bytes > 0));
    assert!(report.process.rss_peak_bytes > 0);

    // The JSON document and the table carry the churn.
    let doc = serde_json::to_value(&report).unwrap();
    assert_eq!(doc["churn"]["drops"], c.drops);
    assert_eq!(doc["parameters"]["churn"]["mode"], "mixed");
    let table = report.to_table();
    assert!(table.contains("churn: 120 drops/min (mixed)"), "{table}");
    p.stop().await;
}

/// RSA-2048 keys end to end: a manufacturing CA with an RSA key (generated by `pki`),
/// registered with JITP, provisions RSA-keyed devices on their first mutual-TLS connection,
/// both from the simulator's minted identities and from a single `pki device` certificate
/// used by the device library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keyed_devices_connect_over_mutual_tls() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({ "keys": "rsa" })).await;
    let ca = Ca::generate(&CaOptions {
        common_name: "RSA Manufacturing CA".into(),
        algorithm: KeyAlgorithm::Rsa2048,
        ..CaOptions::default()
    })
    .unwrap();
    let jitp = json!({ "product_id": fleet.product_id, "cohort_id": fleet.cohort_id, "tags": { "keys": "rsa" } });
    // Proof of possession: the RSA CA signs a certificate whose CN is a fresh code.
    let (_, code) = p
        .api("POST", "/api/v1/ca-certificates/verification-code", None)
        .await;
    let code = DeviceId::parse(code["code"].as_str().unwrap()).unwrap();
    let proof = ca
        .issue_device(&DeviceCertOptions::new(code))
        .unwrap()
        .cert_pem;
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/ca-certificates",
            Some(
                json!({ "certificate_pem": ca.cert_pem(), "description": "RSA CA",
                "jitp": jitp, "verification_certificate_pem": proof }),
            ),
        )
        .await;
    assert_eq!(s, 201, "register the RSA CA: {body}");

    // The simulator mints RSA-keyed identities (and caches them apart from P-256 ones).
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mqtts://127.0.0.1:{}", p.app().mqtts_addr().port());
    let mut config = SimConfig::new(url.parse().unwrap());
    config.server_ca_pem = Some(p.server_ca_pem().into_bytes());
    let ca = Arc::new(ca);
    config.device_ca = Some(ca.clone());
    config.key_algorithm = KeyAlgorithm::Rsa2048;
    config.id_prefix = "rsa-".into();
    config.cert_cache = Some(dir.path().join("certs"));
    config.max_duration = Duration::from_secs(60);
    let storm = Scenario::ConnectStorm(ConnectStorm {
        devices: 3,
        concurrency: 3,
        rate: None,
        hold: true,
        repeat: 0,
    });
    let report = sim::run(&config, &storm).await.unwrap();
    assert_all_connected(&report, 3);
    assert_eq!(
        (report.identities.generated, report.identities.from_cache),
        (3, 0)
    );
    assert_eq!(report.parameters["key_algorithm"], "rsa2048");
    assert_eq!(p.app().control().metrics().jitp_provisioned, 3);
    let d = p.device("rsa-00002").await;
    assert_eq!(d["tags"], json!({ "keys": "rsa" }), "{d}");
    let cached = std::fs::read_to_string(
        dir.path()
            .join("certs")
            .join(format!("{}-rsa2048", ca.fingerprint()))
            .join("rsa-00000.pem"),
    )
    .unwrap();
    let (_, leaf) = x509_parser::pem::parse_x509_pem(cached.as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    assert_eq!(
        leaf.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.113549.1.1.1",
        "an RSA device key"
    );

    // One device certificate as `pki device --algorithm rsa2048` makes it, through the
    // device library: provisioned, and its telemetry committed before the PUBACK.
    let id = DeviceId::parse("rsa-single").unwrap();
    let dev = ca
        .issue_device(&DeviceCertOptions {
            algorithm: KeyAlgorithm::Rsa2048,
            ..DeviceCertOptions::new(id.clone())
        })
        .unwrap();
    let tls = TlsConfig::from_ca_pem(p.server_ca_pem().as_bytes())
        .unwrap()
        .with_identity(
            ClientIdentity::from_pem(dev.cert_pem.as_bytes(), dev.key_pem.as_bytes()).unwrap(),
        );
    let opts = ConnectOptions::new(url.parse().unwrap()).with_tls(tls);
    publish_once(
        &opts,
        &Topic::Telemetry(id.clone()),
        br#"{"t":1}"#,
        false,
        Duration::from_secs(15),
    )
    .await
    .unwrap();
    let d = p.device(id.as_str()).await;
    assert_eq!(d["last_telemetry"], json!({ "t": 1 }), "{d}");
    assert_eq!(p.app().control().metrics().jitp_provisioned, 4);
    p.stop().await;
}
