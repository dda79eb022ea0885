//! The intake fed through the real embedded event bus, on SQLite and on PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use broker::bus::{BusError, BusMessage, EventBus};
use bytes::Bytes;
use common::{catalog, id, new_device, WriteLock};
use fleet_service::intake::{Intake, IntakeOptions, IntakeStats};
use fleet_service::store::{DeviceState, Store};
use futures::stream::{FuturesUnordered, StreamExt};

on_both_databases!(
    acks_after_commit_and_rejects_the_hopeless,
    a_held_lock_holds_the_ack_back
);

fn msg(topic: &str, payload: &str, epoch: u64, seq: u64) -> BusMessage {
    BusMessage {
        topic: topic.to_owned(),
        payload: Bytes::from(payload.to_owned()),
        epoch,
        seq,
        received_at_ms: 1_700_000_000_000 + seq as i64,
        ..Default::default()
    }
}

fn presence_json(device: &str, event: &str, epoch: u64, ts: i64) -> String {
    serde_json::json!({
        "device_id": device, "event": event, "epoch": epoch, "ts_ms": ts,
        "connected_at_ms": ts, "remote_addr": "10.0.0.7:4242"
    })
    .to_string()
}

fn options() -> IntakeOptions {
    IntakeOptions {
        node_id: "node-1".to_owned(),
        max_batch: 256,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
    }
}

async fn publish_all(
    bus: &broker::bus::EmbeddedBus,
    msgs: Vec<BusMessage>,
) -> Vec<Result<(), BusError>> {
    futures::future::join_all(msgs.into_iter().map(|m| bus.publish(m))).await
}

async fn acks_after_commit_and_rejects_the_hopeless(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store
        .provision(&new_device(&cat, "dev-1", &[]))
        .await
        .unwrap();
    let (bus, source) = broker::bus::embedded(64);
    let intake = tokio::spawn(Intake::new(store.clone(), options()).run(source));

    let good = vec![
        msg("devices/dev-1/telemetry", r#"{"t":1}"#, 1, 1),
        msg("devices/dev-1/telemetry", r#"{"t":2}"#, 1, 2),
        msg(
            "devices/dev-1/state",
            r#"{"firmware_version":"1.4.0","battery":80}"#,
            1,
            3,
        ),
        msg(
            "devices/dev-1/commands/ack",
            r#"{"id":"c-1","status":"succeeded"}"#,
            1,
            4,
        ),
        msg(
            "devices/dev-1/presence",
            &presence_json("dev-1", "connected", 1, 1_700_000_000_000),
            0,
            0,
        ),
    ];
    let hopeless = vec![
        msg("devices/ghost/telemetry", r#"{"t":1}"#, 1, 1),
        msg("devices/dev-1/bogus", r#"{"t":1}"#, 1, 5),
        msg("devices/dev-1/telemetry", "[1,2]", 1, 6),
        msg("devices/dev-1/telemetry", "not json", 1, 7),
        msg(
            "devices/dev-1/presence",
            &presence_json("dev-2", "connected", 1, 1),
            0,
            0,
        ),
        msg(
            "devices/dev-1/commands",
            r#"{"id":"c","name":"reboot"}"#,
            0,
            0,
        ),
    ];
    let n_good = good.len();
    let mut all = good;
    all.extend(hopeless);
    let results = publish_all(&bus, all).await;
    for (i, r) in results.iter().enumerate() {
        if i < n_good {
            assert!(r.is_ok(), "event {i} should be accepted: {r:?}");
        } else {
            assert!(
                matches!(r, Err(BusError::Rejected(_))),
                "event {i} should be rejected: {r:?}"
            );
        }
    }
    if let Err(BusError::Rejected(why)) = &results[n_good] {
        assert!(why.contains("unknown device"), "{why}");
    }

    // Acked means committed: the device shows it all, right now.
    let d = store.device(&id("dev-1")).await.unwrap().unwrap();
    assert!(d.online);
    assert_eq!(d.state, DeviceState::Online);
    assert_eq!(d.node_id.as_deref(), Some("node-1"));
    assert_eq!(d.remote_addr.as_deref(), Some("10.0.0.7:4242"));
    assert_eq!(d.last_telemetry, Some(serde_json::json!({"t": 2})));
    assert_eq!(d.firmware_version.as_deref(), Some("1.4.0"));
    assert_eq!(
        d.reported,
        Some(serde_json::json!({"firmware_version": "1.4.0", "battery": 80}))
    );
    assert_eq!(d.last_seen_ms, Some(1_700_000_000_004));
    assert_eq!(store.telemetry_count(&id("dev-1")).await.unwrap(), 2);

    // A redelivery and a stale presence event are acked and change nothing.
    let again = publish_all(
        &bus,
        vec![
            msg("devices/dev-1/telemetry", r#"{"t":1}"#, 1, 1),
            msg(
                "devices/dev-1/presence",
                &presence_json("dev-1", "connected", 1, 1_700_000_000_000),
                0,
                0,
            ),
        ],
    )
    .await;
    assert!(again.iter().all(Result::is_ok), "{again:?}");
    assert_eq!(store.telemetry_count(&id("dev-1")).await.unwrap(), 2);

    drop(bus);
    let stats: IntakeStats = intake.await.unwrap().unwrap();
    assert_eq!(stats.acked, n_good as u64 + 2);
    assert_eq!(stats.rejected, 6);
    assert_eq!(stats.presence_stale, 1);
    assert_eq!(stats.telemetry_duplicates, 1);
}

async fn a_held_lock_holds_the_ack_back(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store
        .provision(&new_device(&cat, "dev-1", &[]))
        .await
        .unwrap();
    let (bus, source) = broker::bus::embedded(16);
    let intake = tokio::spawn(Intake::new(store.clone(), options()).run(source));

    let lock = WriteLock::take(url, "devices").await;
    let mut pending = tokio::spawn(bus.publish(msg("devices/dev-1/telemetry", r#"{"t":9}"#, 1, 1)));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut pending)
            .await
            .is_err(),
        "acked while the database could not commit"
    );
    lock.release().await;
    pending.await.unwrap().unwrap();
    assert_eq!(store.telemetry_count(&id("dev-1")).await.unwrap(), 1);

    drop(bus);
    let stats = intake.await.unwrap().unwrap();
    assert_eq!((stats.acked, stats.rejected), (1, 0));
}

/// A real transient failure: the intake's PostgreSQL connection is killed while its batch
/// waits on a lock. The batch must be retried and acked, not dropped or rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_is_retried_postgres() {
    let Some(db) = common::TestDb::postgres("a_killed_connection_is_retried_postgres").await else {
        return;
    };
    let url = db.url.as_str();
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store
        .provision(&new_device(&cat, "dev-1", &[]))
        .await
        .unwrap();
    let (bus, source) = broker::bus::embedded(16);
    let intake = tokio::spawn(Intake::new(store.clone(), options()).run(source));

    let lock = WriteLock::take(url, "devices").await;
    let WriteLock::Postgres(mut locker) = lock else {
        unreachable!()
    };
    let mut pending = tokio::spawn(bus.publish(msg("devices/dev-1/telemetry", r#"{"t":9}"#, 1, 1)));

    // Wait until the intake's statement is blocked on the lock, then kill that backend.
    let deadline = Instant::now() + Duration::from_secs(10);
    let killed = loop {
        let killed: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_all(&mut locker)
        .await
        .unwrap();
        if !killed.is_empty() {
            break killed.len();
        }
        assert!(Instant::now() < deadline, "the intake never blocked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(killed >= 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut pending)
            .await
            .is_err(),
        "acked or rejected before the retry could commit"
    );
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    pending.await.unwrap().unwrap();
    assert_eq!(store.telemetry_count(&id("dev-1")).await.unwrap(), 1);

    drop(bus);
    let stats = intake.await.unwrap().unwrap();
    assert!(stats.retries >= 1, "{stats:?}");
    assert_eq!((stats.acked, stats.rejected), (1, 0));
}

/// Pushes `devices * per_device` telemetry events through the embedded bus into the intake,
/// all in flight at once, and returns events per second.
async fn throughput(url: &str, devices: usize, per_device: usize) -> f64 {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "bench").await;
    for d in 0..devices {
        store
            .provision(&new_device(&cat, &format!("bench-{d:04}"), &[]))
            .await
            .unwrap();
    }
    let (bus, source) = broker::bus::embedded(4096);
    let intake = tokio::spawn(
        Intake::new(
            store.clone(),
            IntakeOptions {
                max_batch: 1024,
                ..options()
            },
        )
        .run(source),
    );
    let total = devices * per_device;
    let started = Instant::now();
    let mut in_flight: FuturesUnordered<_> = (0..per_device)
        .flat_map(|seq| {
            (0..devices).map(move |d| {
                msg(
                    &format!("devices/bench-{d:04}/telemetry"),
                    &format!(r#"{{"temp":21.5,"seq":{seq}}}"#),
                    1,
                    seq as u64,
                )
            })
        })
        .map(|m| bus.publish(m))
        .collect();
    let mut acked = 0;
    while let Some(r) = in_flight.next().await {
        r.unwrap();
        acked += 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(acked, total);
    drop(bus);
    let stats = intake.await.unwrap().unwrap();
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "intake ({}): {total} telemetry events from {devices} devices in {:.2?} = {rate:.0} events/s \
         ({} batches)",
        store.backend_name(),
        elapsed,
        stats.batches
    );
    let mut stored = 0;
    for d in 0..devices {
        stored += store
            .telemetry_count(&id(&format!("bench-{d:04}")))
            .await
            .unwrap();
    }
    assert_eq!(stored, total as u64);
    rate
}

/// A small, always-run version of the measurement: checks nothing is lost under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_all_land_sqlite() {
    let db = common::TestDb::sqlite();
    throughput(&db.url, 20, 50).await;
}

/// `cargo test -p fleet-service --release --test intake -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn throughput_10k_sqlite() {
    let db = common::TestDb::sqlite();
    throughput(&db.url, 100, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn throughput_10k_postgres() {
    let Some(db) = common::TestDb::postgres("throughput_10k_postgres").await else {
        return;
    };
    throughput(&db.url, 100, 100).await;
}
