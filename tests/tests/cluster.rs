//! The platform as a cluster of processes: three broker nodes, two fleet-service replicas, a
//! nats-server and PostgreSQL. Devices spread over the nodes publish QoS 1 telemetry numbered
//! per device while a backend service on another node watches; a replica, a broker node and
//! the nats-server are killed with SIGKILL during the run. Afterwards every acknowledged
//! message is stored exactly once and was seen by the watcher, the killed node's devices were
//! declared lost once each and came back on other nodes, a quarantine made through one replica
//! cut a session on another node within a second, a device connecting to another node took
//! its session over from the first (whose late disconnect changed nothing), and a node started
//! late holds the cohort's current update.
//!
//! Needs `FLEET_TEST_POSTGRES_URL` and a nats-server binary; says it was skipped otherwise.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_client::release::SigningKey;
use e2e::cluster::Cluster;
use e2e::{eventually, DeviceCert};
use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio::sync::watch;

const TUNING: &str = r#"
[cluster]
node_lease_renew_ms = 1000
node_fence_after_ms = 3000
leader_lease_ttl_ms = 3000
ack_wait_secs = 4

[rollout]
tick_ms = 300
"#;

const DEVICES: usize = 120;
const NODES: usize = 3;

/// What the test knows about one simulated device.
#[derive(Default)]
struct DeviceState {
    /// Highest sequence number acknowledged; one publish is in flight at a time, so every
    /// number up to it was acknowledged.
    acked: u64,
    /// The node it is connected to now (None while it reconnects).
    node: Option<usize>,
    /// The publish waiting for its PUBACK.
    in_flight: Option<u64>,
    /// When its connection last ended, and what the broker said.
    closed_at: Option<Instant>,
}

type Devices = Arc<Mutex<BTreeMap<String, DeviceState>>>;

/// One device: publishes `{"seq": n}` at QoS 1, the next one only after the previous one was
/// acknowledged; when its node goes away it moves on to the next one and publishes its
/// unacknowledged message again there.
async fn run_device(
    id: String,
    options: Vec<MqttOptions>,
    first: usize,
    devices: Devices,
    mut stop: watch::Receiver<bool>,
) {
    let mut node = first;
    let (client, mut eventloop): (AsyncClient, EventLoop) =
        AsyncClient::new(options[node].clone(), 10);
    let mut next = 1u64;
    let mut in_flight: Option<u64> = None;
    // Whether the publish in flight must be published again on the next connection.
    let mut resend = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if in_flight.is_none() && !stopping => {
                let payload = json!({ "seq": next }).to_string();
                if client.try_publish(format!("devices/{id}/telemetry"), QoS::AtLeastOnce, false, payload).is_ok() {
                    in_flight = Some(next);
                    devices.lock().get_mut(&id).unwrap().in_flight = in_flight;
                    next += 1;
                }
            }
            _ = stop.changed(), if !stopping => {
                if in_flight.is_none() {
                    return;
                }
                stopping = true;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    devices.lock().get_mut(&id).unwrap().node = Some(node);
                    // A new session drops the client's unacknowledged publish: publish it
                    // again (the same payload, so the platform stores it once).
                    if let (Some(seq), true) = (in_flight, resend) {
                        let payload = json!({ "seq": seq }).to_string();
                        let _ = client.try_publish(format!("devices/{id}/telemetry"), QoS::AtLeastOnce, false, payload);
                    }
                    resend = false;
                }
                Ok(Event::Incoming(Incoming::PubAck(_))) => {
                    if let Some(seq) = in_flight.take() {
                        let mut d = devices.lock();
                        let d = d.get_mut(&id).unwrap();
                        d.acked = seq;
                        d.in_flight = None;
                    }
                    if stopping {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    // rumqttc forgets an unacknowledged publish (sent, or still queued) with
                    // the session, so it goes again after the next CONNACK.
                    resend = in_flight.is_some();
                    {
                        let mut d = devices.lock();
                        let d = d.get_mut(&id).unwrap();
                        if d.node.take().is_some() {
                            d.closed_at = Some(Instant::now());
                        }
                    }
                    if stopping && in_flight.is_none() {
                        return;
                    }
                    // Try the next node; a node that is back is as good as any.
                    node = (node + 1) % options.len();
                    eventloop.mqtt_options = options[node].clone();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_loses_nothing_when_any_process_is_killed() {
    e2e::init_logs();
    let Some(mut cluster) = Cluster::start(NODES, 2, TUNING).await else {
        return;
    };
    let rest = cluster.rest(0);
    let fleet = rest.jitp_fleet(json!({})).await;
    let service_key = rest.key_as(&rest.admin, "operator", json!({})).await;

    // The watcher: a backend service on the last node.
    let watcher_node = NODES - 1;
    let seen: Arc<Mutex<HashMap<String, HashSet<u64>>>> = Arc::default();
    let (watcher, mut watcher_loop) = AsyncClient::new(
        cluster.service_options(watcher_node, "watcher", &service_key),
        100,
    );
    // The key reaches the node through the change stream: until then the node refuses it.
    let (subscribed_tx, mut subscribed) = watch::channel(false);
    let watcher_task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                match watcher_loop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        watcher
                            .try_subscribe("devices/+/telemetry", QoS::AtLeastOnce)
                            .unwrap();
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let id = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        if let Some(seq) = v["seq"].as_u64() {
                            seen.lock().entry(id).or_default().insert(seq);
                        }
                    }
                    Ok(_) => {}
                    Err(e) if !*subscribed_tx.borrow() => {
                        eprintln!("the watcher is not in yet: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("the watcher lost its node: {e}"),
                }
            }
        })
    };
    tokio::time::timeout(e2e::WAIT, subscribed.wait_for(|s| *s))
        .await
        .expect("the watcher subscribed")
        .unwrap();

    // The devices, spread over the nodes.
    let devices: Devices = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = HashMap::new();
    for i in 0..DEVICES {
        let id = format!("cl-{i:03}");
        let cert: DeviceCert = fleet.ca.issue(&id);
        let options: Vec<MqttOptions> = (0..NODES)
            .map(|n| cluster.device_options(n, &cert, &id))
            .collect();
        devices.lock().insert(id.clone(), DeviceState::default());
        let task = tokio::spawn(run_device(
            id.clone(),
            options,
            i % NODES,
            devices.clone(),
            stop.clone(),
        ));
        tasks.insert(id, task);
    }
    eventually("every device connected", || async {
        (devices
            .lock()
            .values()
            .all(|d| d.node.is_some() && d.acked > 0))
        .then_some(())
    })
    .await;

    // A replica dies: the other one takes its share of the events and its singletons.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill_replica(1);

    // A broker node dies: its devices are declared lost and come back elsewhere.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lost: Vec<String> = devices
        .lock()
        .iter()
        .filter(|(_, d)| d.node == Some(0))
        .map(|(id, _)| id.clone())
        .collect();
    assert!(!lost.is_empty());
    cluster.kill_broker(0);
    let killed_at = Instant::now();

    // The backbone dies and comes back: PUBACKs wait, nothing acknowledged is lost.
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.nats.kill();
    // Without the bus, a replica and a node say they are not ready (their processes live on).
    let probes = [cluster.replica(0).http(), cluster.broker(1).http()];
    let readyz = |addr: std::net::SocketAddr| async move {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    for addr in probes {
        eventually("readiness fails while the bus is down", || async {
            (readyz(addr).await == 503).then_some(())
        })
        .await;
    }
    cluster.nats.restart().expect("nats-server restarts");
    for addr in probes {
        eventually("readiness is back with the bus", || async {
            (readyz(addr).await == 200).then_some(())
        })
        .await;
    }

    eventually(
        "the lost node's devices are back on other nodes",
        || async {
            let d = devices.lock();
            lost.iter()
                .all(|id| matches!(d[id].node, Some(n) if n != 0))
                .then_some(())
        },
    )
    .await;

    // A quarantine through replica 0 cuts a session held by another node within a second,
    // once the cluster has found the restarted backbone again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let target = devices
        .lock()
        .iter()
        .find(|(_, d)| d.node == Some(1))
        .map(|(id, _)| id.clone())
        .expect("a device on node 1");
    let asked = Instant::now();
    let (s, body) = rest
        .api(
            "POST",
            &format!("/api/v1/devices/{target}/quarantine"),
            Some(json!({ "reason": "cluster test" })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    eventually("the quarantined device's session ended", || async {
        devices.lock()[&target]
            .closed_at
            .filter(|at| *at > asked)
            .map(|at| at - asked)
    })
    .await;
    let cut = devices.lock()[&target].closed_at.unwrap() - asked;
    assert!(
        cut < Duration::from_secs(1),
        "the session on another node ended {cut:?} after the quarantine"
    );
    // A quarantined device may not publish telemetry: it stops here (what it had
    // acknowledged is still checked below).
    tasks.remove(&target).expect("its task").abort();

    // A device that connects to node 3 while node 2 holds its session takes it over across
    // nodes: node 2 ends the old session, and its late disconnect changes nothing.
    let cert = fleet.ca.issue("tk-1");
    let connect = |node: usize| {
        let (client, mut el) = AsyncClient::new(cluster.device_options(node, &cert, "tk-1"), 10);
        async move {
            loop {
                if let Event::Incoming(Incoming::ConnAck(_)) =
                    el.poll().await.expect("tk-1 connects")
                {
                    return (client, el);
                }
            }
        }
    };
    let (_old, mut old_loop) = connect(1).await;
    let (_new, mut new_loop) = connect(2).await;
    let new_task = tokio::spawn(async move { while new_loop.poll().await.is_ok() {} });
    tokio::time::timeout(Duration::from_secs(2), async {
        while old_loop.poll().await.is_ok() {}
    })
    .await
    .expect("node 2 ended the session node 3 took over within 2 s");
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    eventually("tk-1 is online on node 3, its session on node 2 ended by the takeover", || async {
        let rows: Vec<(Option<String>, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT node_id, end_reason, ended_at FROM device_sessions WHERE device_id = 'tk-1' ORDER BY epoch",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let (online, node): (bool, Option<String>) =
            sqlx::query_as("SELECT online, node_id FROM devices WHERE id = 'tk-1'")
                .fetch_one(&pool)
                .await
                .unwrap();
        (rows.len() == 2
            && rows[0].0.as_deref() == Some("node-2")
            && rows[0].1.as_deref() == Some("takeover")
            && rows[1].0.as_deref() == Some("node-3")
            && rows[1].2.is_none()
            && online
            && node.as_deref() == Some("node-3"))
        .then_some(())
    })
    .await;
    new_task.abort();

    // A cohort update through the replica; a node started late holds it.
    let key = SigningKey::generate().unwrap();
    let (s, body) = rest
        .api(
            "POST",
            "/api/v1/signing-keys",
            Some(json!({ "name": "cluster key", "public_key": key.public_key_base64() })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let signed = key
        .sign(
            &fleet.product_id,
            "9.9.9",
            "https://example.invalid/fw.bin",
            b"fw",
        )
        .unwrap();
    let (s, release) = rest
        .api(
            "POST",
            "/api/v1/releases",
            Some(serde_json::to_value(&signed).unwrap()),
        )
        .await;
    assert_eq!(s, 201, "{release}");
    let (s, deployment) = rest
        .api(
            "POST",
            "/api/v1/deployments",
            Some(
                json!({ "release_id": release["id"], "cohort_id": fleet.cohort_id, "policy": {} }),
            ),
        )
        .await;
    assert_eq!(s, 201, "{deployment}");

    // Stop publishing; every publish in flight settles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let settled = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(tasks.into_values()),
    )
    .await;
    if settled.is_err() {
        let waiting: Vec<_> = devices
            .lock()
            .iter()
            .filter(|(_, d)| d.in_flight.is_some())
            .map(|(id, d)| format!("{id} (seq {:?}, node {:?})", d.in_flight, d.node))
            .collect();
        panic!("publishes in flight did not settle within 30 s: {waiting:?}");
    }

    let late = cluster.start_broker();
    let started = Instant::now();
    let (late_client, mut late_loop) = AsyncClient::new(
        cluster.service_options(late, "late-watcher", &service_key),
        10,
    );
    late_client
        .subscribe(
            format!("cohorts/{}/updates", fleet.cohort_id),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let update = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Incoming::Publish(p))) = late_loop.poll().await {
                return serde_json::from_slice::<Value>(&p.payload).unwrap();
            }
        }
    })
    .await
    .expect("the late node holds the cohort's update within 5 s");
    assert_eq!(update["release"]["version"], "9.9.9", "{update}");
    eprintln!("late node converged in {:?}", started.elapsed());

    // Every acknowledged message stored exactly once, and seen by the watcher.
    let acked: BTreeMap<String, u64> = devices
        .lock()
        .iter()
        .map(|(id, d)| (id.clone(), d.acked))
        .collect();
    let total: u64 = acked.values().sum();
    eventually("every acknowledged message is stored", || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM telemetry")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n as u64 >= total).then_some(())
    })
    .await;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT device_id, payload FROM telemetry")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, payload) in rows {
        let v: Value = serde_json::from_str(&payload).unwrap();
        stored
            .entry(id)
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    for (id, top) in &acked {
        let mut got = stored.remove(id).unwrap_or_default();
        got.sort_unstable();
        let dupes: Vec<_> = got.windows(2).filter(|w| w[0] == w[1]).collect();
        assert!(dupes.is_empty(), "{id}: stored twice: {dupes:?}");
        for seq in 1..=*top {
            assert!(
                got.binary_search(&seq).is_ok(),
                "{id}: acknowledged {seq} not stored"
            );
        }
        // At most the publish in flight at the end (never acknowledged) beyond.
        assert!(got.len() as u64 <= top + 1, "{id}: {got:?}");
    }
    let missing = |seen: &HashMap<String, HashSet<u64>>| -> Vec<(String, u64)> {
        acked
            .iter()
            .flat_map(|(id, top)| (1..=*top).map(move |s| (id.clone(), s)))
            .filter(|(id, s)| !seen.get(id).is_some_and(|set| set.contains(s)))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone = missing(&seen.lock());
        if gone.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let mut by_device: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for (id, s) in &gone {
                by_device.entry(id).or_default().push(*s);
            }
            panic!(
                "the watcher missed {} acknowledged messages of {} devices: {:?}",
                gone.len(),
                by_device.len(),
                by_device.iter().take(12).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The killed node's devices were declared lost: the session each held there at the kill
    // ended `node_lost` (by the one reaper), and none of their sessions on live nodes did.
    for id in &lost {
        let rows: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT epoch, end_reason, node_id FROM device_sessions WHERE device_id = $1 ORDER BY epoch",
        )
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
        let last_on_killed = rows
            .iter()
            .rfind(|r| r.2.as_deref() == Some("node-1"))
            .unwrap_or_else(|| panic!("{id}: no session on node-1: {rows:?}"));
        assert_eq!(
            last_on_killed.1.as_deref(),
            Some("node_lost"),
            "{id}: {rows:?}"
        );
        assert!(
            rows.iter()
                .filter(|r| r.2.as_deref() != Some("node-1"))
                .all(|r| r.1.as_deref() != Some("node_lost")),
            "{id}: a session on a live node was declared lost: {rows:?}"
        );
    }
    let (lost_at,): (Option<i64>,) =
        sqlx::query_as("SELECT max(ended_at) FROM device_sessions WHERE end_reason = 'node_lost'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let since_kill = killed_at.elapsed();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let declared_after = since_kill.as_millis() as i64 - (now_ms - lost_at.unwrap());
    assert!(
        declared_after < 15_000,
        "devices of the killed node declared lost {declared_after} ms after the kill"
    );
    eprintln!(
        "{} devices, {total} acknowledged; {} declared lost {declared_after} ms after the kill; quarantine cut a session on another node in {cut:?}",
        acked.len(),
        lost.len()
    );
    watcher_task.abort();
}
