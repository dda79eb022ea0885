//! The event bus on NATS JetStream, against a real nats-server of each test's own (free port,
//! own storage directory): publish resolves only once stored, duplicates are stored once,
//! unacked deliveries go to another replica, replicas share the work, a server killed with
//! kill -9 loses nothing, a full stream holds publishes back, and the metrics say so.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::bus::jetstream::{self, JetStreamBus, JetStreamConfig, JetStreamSource};
use broker::bus::{BusMessage, Delivery, EventBus, EventSource};
use broker::metrics::Metrics;
use bytes::Bytes;
use e2e::nats::NatsServer;

const DEADLINE: Duration = Duration::from_secs(10);

fn config() -> JetStreamConfig {
    JetStreamConfig {
        node: "node-a".to_owned(),
        publish_timeout: Duration::from_millis(500),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ..Default::default()
    }
}

fn event(device: usize, seq: u64) -> BusMessage {
    BusMessage {
        topic: format!("devices/dev-{device}/telemetry"),
        payload: Bytes::from(format!(r#"{{"n":{seq}}}"#)),
        epoch: 1,
        seq,
        received_at_ms: 1_700_000_000_000 + seq as i64,
        id: format!("s/dev-{device}/1/{seq}"),
        ..Default::default()
    }
}

async fn bus(server: &NatsServer, config: &JetStreamConfig) -> (JetStreamBus, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let bus = jetstream::connect_bus(&server.url(), config, metrics.clone())
        .await
        .expect("bus");
    (bus, metrics)
}

async fn source(server: &NatsServer, config: &JetStreamConfig) -> JetStreamSource {
    jetstream::connect_source(&server.url(), config)
        .await
        .expect("source")
}

/// Messages stored in the stream right now, asked on a connection of its own.
async fn stored(server: &NatsServer, config: &JetStreamConfig) -> u64 {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&config.stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Receives until `n` deliveries arrived (acking each when `ack`), or the deadline.
async fn take(source: &mut JetStreamSource, n: usize, ack: bool) -> Vec<BusMessage> {
    let mut got = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(batch) = tokio::time::timeout(left, source.recv_batch(n - got.len())).await else {
            panic!("only {} of {n} deliveries within {DEADLINE:?}", got.len());
        };
        for d in batch.expect("the JetStream source never ends") {
            got.push(d.msg.clone());
            if ack {
                d.ack();
            } else {
                // Neither acked nor refused: as if the replica died holding it.
                drop(d);
            }
        }
    }
    got
}

/// Nothing more arrives within `wait`.
async fn quiet(source: &mut JetStreamSource, wait: Duration) {
    if let Ok(batch) = tokio::time::timeout(wait, source.recv_batch(100)).await {
        let ids: Vec<String> = batch.unwrap().iter().map(|d| d.msg.id.clone()).collect();
        panic!("unexpected deliveries: {ids:?}");
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_resolves_once_stored_and_the_source_sees_it_once() {
    let server = NatsServer::start().unwrap();
    let cfg = config();
    let (bus, metrics) = bus(&server, &cfg).await;

    for seq in 1..=10 {
        bus.publish(event(seq as usize % 3, seq)).await.unwrap();
        // Resolved means stored: the stream has it before anyone consumed it.
        assert_eq!(stored(&server, &cfg).await, seq);
    }
    let m = metrics.snapshot();
    assert_eq!((m.bus_pending, m.bus_unavailable), (0, false));

    let mut source = source(&server, &cfg).await;
    let got = take(&mut source, 10, true).await;
    let mut seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let first = got.iter().find(|m| m.seq == 4).unwrap();
    assert_eq!(first.topic, "devices/dev-1/telemetry");
    assert_eq!(&first.payload[..], br#"{"n":4}"#);
    assert_eq!((first.epoch, first.received_at_ms), (1, 1_700_000_000_004));
    assert_eq!((&*first.node, first.id.as_str()), ("node-a", "s/dev-1/1/4"));
    quiet(&mut source, Duration::from_millis(300)).await;
    // Work-queue retention: acked events leave the stream.
    eventually("acked events removed", async || {
        stored(&server, &cfg).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_twice_is_stored_once() {
    let server = NatsServer::start().unwrap();
    let cfg = config();
    let (bus, _) = bus(&server, &cfg).await;
    let resent = BusMessage {
        // Another node, another session: the device resent its publish after a crash.
        epoch: 2,
        seq: 1,
        node: "node-b".into(),
        ..event(1, 7)
    };
    bus.publish(event(1, 7)).await.unwrap();
    bus.publish(resent).await.unwrap();
    bus.publish(event(1, 8)).await.unwrap();
    assert_eq!(stored(&server, &cfg).await, 2);
    let mut source = source(&server, &cfg).await;
    let got = take(&mut source, 2, true).await;
    assert_eq!(
        got.iter()
            .map(|m| (m.seq, &*m.node))
            .collect::<HashSet<_>>(),
        HashSet::from([(7, "node-a"), (8, "node-a")])
    );
    quiet(&mut source, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_a_replica_that_died_go_to_another() {
    let server = NatsServer::start().unwrap();
    let cfg = JetStreamConfig {
        ack_wait: Duration::from_secs(1),
        ..config()
    };
    let (bus, _) = bus(&server, &cfg).await;
    for seq in 1..=20 {
        bus.publish(event(seq as usize, seq)).await.unwrap();
    }
    // Replica A takes them all and dies (its connection goes) without acking any.
    let mut a = source(&server, &cfg).await;
    let taken = take(&mut a, 20, false).await;
    assert_eq!(taken.len(), 20);
    drop(a);

    let started = Instant::now();
    let mut b = source(&server, &cfg).await;
    let got = take(&mut b, 20, true).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "redelivered before ack_wait: {:?}",
        started.elapsed()
    );
    let seqs: HashSet<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=20).collect());
    quiet(&mut b, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_and_no_event_goes_to_both() {
    const N: u64 = 2000;
    let server = NatsServer::start().unwrap();
    let cfg = JetStreamConfig {
        pull_batch: 32,
        ..config()
    };
    let (bus, _) = bus(&server, &cfg).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let replica = |mut s: JetStreamSource, seen: Arc<AtomicUsize>| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            while seen.load(Ordering::SeqCst) < N as usize {
                let Ok(Some(batch)) =
                    tokio::time::timeout(Duration::from_millis(200), s.recv_batch(64)).await
                else {
                    continue;
                };
                seen.fetch_add(batch.len(), Ordering::SeqCst);
                for d in batch {
                    mine.push(d.msg.seq);
                    d.ack();
                    // A little work per event, so neither replica runs away with the stream.
                    tokio::task::yield_now().await;
                }
            }
            mine
        })
    };
    let a = replica(source(&server, &cfg).await, seen.clone());
    let b = replica(source(&server, &cfg).await, seen.clone());
    let publishes: Vec<_> = (1..=N)
        .map(|seq| tokio::spawn(bus.publish(event(seq as usize % 50, seq))))
        .collect();
    for p in publishes {
        p.await.unwrap().unwrap();
    }
    let (a, b) = tokio::time::timeout(DEADLINE, async { (a.await.unwrap(), b.await.unwrap()) })
        .await
        .expect("both replicas done");
    let (sa, sb): (HashSet<u64>, HashSet<u64>) =
        (a.iter().copied().collect(), b.iter().copied().collect());
    assert_eq!(sa.len() + sb.len(), N as usize, "no event twice");
    assert!(sa.is_disjoint(&sb), "an event went to both replicas");
    assert_eq!(sa.union(&sb).count(), N as usize);
    assert!(
        !sa.is_empty() && !sb.is_empty(),
        "{} / {}",
        sa.len(),
        sb.len()
    );
    println!("replica A took {}, replica B {}", sa.len(), sb.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_flight_loses_nothing_and_acks_nothing_early() {
    const N: u64 = 3000;
    let mut server = NatsServer::start().unwrap();
    let cfg = config();
    let (bus, metrics) = bus(&server, &cfg).await;

    // Publishers at a steady pace, then a burst the kill cuts through, then more at a steady
    // pace while the server is down.
    let resolved: Arc<parking_lot::Mutex<Vec<(u64, Instant)>>> = Default::default();
    let mut tasks = Vec::new();
    for seq in 1..=N {
        let fut = bus.publish(event(seq as usize % 40, seq));
        let resolved = resolved.clone();
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            resolved.lock().push((seq, Instant::now()));
            r
        }));
        let burst = 200..2200;
        if seq % 20 == 0 && !burst.contains(&seq) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if seq == burst.end {
            // A burst of 2,000 on the wire: the kill catches some stored and unanswered.
            tokio::task::yield_now().await;
            server.kill();
        }
    }
    let killed_at = Instant::now();
    // Unavailable, by the metrics, while the server is down.
    eventually("metrics say unavailable", async || {
        metrics.snapshot().bus_unavailable
    })
    .await;
    let m = metrics.snapshot();
    assert!(
        m.bus_unavailable_since_ms.is_some() && m.bus_pending > 0,
        "{m:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Acks that were on the wire at the kill may land just after it; nothing resolves later.
    let down: Vec<u64> = resolved
        .lock()
        .iter()
        .filter(|(_, at)| *at > killed_at + Duration::from_millis(100))
        .map(|(seq, _)| *seq)
        .collect();
    assert!(
        down.is_empty(),
        "resolved while the server was down: {down:?}"
    );
    let before = resolved.lock().len();

    server.restart().unwrap();
    let restarted = Instant::now();
    for t in tasks {
        tokio::time::timeout(DEADLINE, t)
            .await
            .expect("every publish resolves after the restart")
            .unwrap()
            .expect("publish Ok");
    }
    let recovery = restarted.elapsed();
    eventually("metrics say available", async || {
        !metrics.snapshot().bus_unavailable
    })
    .await;
    let m = metrics.snapshot();
    assert_eq!(m.bus_pending, 0);
    assert!(m.bus_publish_retries > 0);

    // Every event exactly once in the stream (the retries carried the same ids), and the
    // consumer gets each at least once.
    assert_eq!(stored(&server, &cfg).await, N);
    let mut source = source(&server, &cfg).await;
    let got = take(&mut source, N as usize, true).await;
    let seqs: HashSet<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs.len(), N as usize);
    println!(
        "{before} of {N} resolved before the kill; the rest within {recovery:?} of the restart; \
         {} retries",
        m.bus_publish_retries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_pulling_across_a_server_restart() {
    let mut server = NatsServer::start().unwrap();
    let cfg = config();
    let (bus, _) = bus(&server, &cfg).await;
    let mut source = source(&server, &cfg).await;
    for seq in 1..=10 {
        bus.publish(event(1, seq)).await.unwrap();
    }
    take(&mut source, 10, true).await;
    server.kill();
    let later: Vec<_> = (11..=20)
        .map(|seq| tokio::spawn(bus.publish(event(1, seq))))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().unwrap();
    // Every later event arrives. An ack the killed server had not yet written may bring one of
    // the first ten again (at least once: the intake's writes are idempotent), nothing else.
    let want: HashSet<u64> = (11..=20).collect();
    let mut seqs = HashSet::new();
    while !want.is_subset(&seqs) {
        assert!(seqs.len() <= 20, "unexpected deliveries: {seqs:?}");
        seqs.extend(take(&mut source, 1, true).await.iter().map(|m| m.seq));
    }
    assert!(seqs.iter().all(|s| (1..=20).contains(s)), "{seqs:?}");
    for p in later {
        p.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_holds_publishes_back_until_the_consumer_drains_it() {
    const N: u64 = 40;
    let server = NatsServer::start().unwrap();
    let cfg = JetStreamConfig {
        max_bytes: 4096,
        ..config()
    };
    let (bus, metrics) = bus(&server, &cfg).await;
    let big = |seq: u64| BusMessage {
        payload: Bytes::from(format!(r#"{{"n":{seq},"pad":"{}"}}"#, "x".repeat(300))),
        ..event(1, seq)
    };
    let mut tasks: HashMap<u64, _> = (1..=N)
        .map(|seq| (seq, tokio::spawn(bus.publish(big(seq)))))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let done: Vec<u64> = tasks
        .iter()
        .filter(|(_, t)| t.is_finished())
        .map(|(seq, _)| *seq)
        .collect();
    assert!(
        !done.is_empty() && done.len() < N as usize / 2,
        "{} of {N} resolved on a 4 KiB stream",
        done.len()
    );
    let m = metrics.snapshot();
    assert_eq!(m.bus_pending, (N as usize - done.len()) as i64, "{m:?}");
    assert!(m.bus_unavailable && m.bus_publish_retries > 0, "{m:?}");
    assert!(stored(&server, &cfg).await <= done.len() as u64 + 1);

    let mut source = source(&server, &cfg).await;
    let got = take(&mut source, N as usize, true).await;
    let seqs: HashSet<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=N).collect());
    for (_, t) in tasks.drain() {
        t.await.unwrap().unwrap();
    }
    eventually("metrics say available", async || {
        !metrics.snapshot().bus_unavailable
    })
    .await;
}

/// Throughput and latency of 100 concurrent publishers, each awaiting its ack before the next.
/// Prints figures; asserts nothing on time. `cargo test -p e2e --release --test bus_jetstream
/// -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn publish_throughput_with_100_publishers() {
    const PUBLISHERS: usize = 100;
    const EACH: u64 = 500;
    let server = NatsServer::start().unwrap();
    let cfg = config();
    let (bus, _) = bus(&server, &cfg).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(EACH as usize);
                for seq in 1..=EACH {
                    let msg = BusMessage {
                        payload: Bytes::from(vec![b'x'; 200]),
                        ..event(p, seq)
                    };
                    let t = Instant::now();
                    bus.publish(msg).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let took = started.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "publish: {} events from {PUBLISHERS} publishers in {took:?}: {:.0} msg/s; \
         latency p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        lat.len() as f64 / took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1]
    );

    let mut source = source(&server, &cfg).await;
    let started = Instant::now();
    let mut n = 0;
    while n < lat.len() {
        let batch = source.recv_batch(512).await.unwrap();
        n += batch.len();
        batch.into_iter().for_each(Delivery::ack);
    }
    let took = started.elapsed();
    println!(
        "consume: {n} events in {took:?}: {:.0} msg/s",
        n as f64 / took.as_secs_f64()
    );
}
