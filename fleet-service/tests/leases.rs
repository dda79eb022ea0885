//! Leases, singletons and broker node liveness, each run on SQLite and on PostgreSQL.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{catalog, id, new_device, presence, presence_batch, WriteLock};
use fleet_service::leader::Singleton;
use fleet_service::nodes::{
    self, heartbeat, reap_lost_nodes, run_reaper, LostNode, NodeLeaseError,
};
use fleet_service::store::{DeviceState, Store};
use fleet_wire::payload::PresenceEvent::Connected;
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

on_both_databases!(
    holders_racing_for_one_lease_one_wins,
    expiry_hands_over_and_the_token_grows,
    singleton_steps_down_when_its_lease_is_taken,
    singletons_hand_over_without_overlap,
    heartbeat_fences_while_it_cannot_renew,
    heartbeat_fences_when_the_store_is_closed,
    a_second_instance_of_a_node_is_refused,
    reapers_mark_a_dead_nodes_devices_once,
    a_node_renewed_in_time_is_not_reaped,
    run_reaper_reports_each_lost_node_once,
);

/// Polls `check` every 20 ms until it holds; fails after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_value<T: PartialEq + std::fmt::Debug>(
    what: &str,
    rx: &mut watch::Receiver<T>,
    want: impl Fn(&T) -> bool,
) {
    timeout(Duration::from_secs(5), rx.wait_for(|v| want(v)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("sender alive");
}

async fn holders_racing_for_one_lease_one_wins(url: &str) {
    let stores = [
        Store::connect(url).await.unwrap(),
        Store::connect(url).await.unwrap(),
    ];
    for round in 0..10 {
        let name = format!("race-{round}");
        let attempts = (0..6).map(|h| {
            let store = stores[h % 2].clone();
            let name = name.clone();
            tokio::spawn(async move {
                let holder = format!("holder-{h}");
                let lease = store
                    .try_acquire_lease(&name, &holder, Duration::from_secs(30))
                    .await
                    .unwrap();
                lease.map(|l| (holder, l.token))
            })
        });
        let winners: Vec<_> = futures::future::join_all(attempts)
            .await
            .into_iter()
            .filter_map(|r| r.unwrap())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let row = stores[0].lease(&name).await.unwrap().unwrap();
        assert_eq!((row.holder, row.token), winners[0].clone());
    }
}

async fn expiry_hands_over_and_the_token_grows(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let ttl = Duration::from_millis(300);
    let first = store
        .try_acquire_lease("job", "a", ttl)
        .await
        .unwrap()
        .unwrap();
    let renewed = store
        .try_acquire_lease("job", "a", ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.token, first.token, "a renewal keeps the term");
    assert!(renewed.expires_at_ms >= first.expires_at_ms);
    assert_eq!(
        store.try_acquire_lease("job", "b", ttl).await.unwrap(),
        None
    );

    // Once a's lease expires, b takes it in a new term.
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        if let Some(lease) = store.try_acquire_lease("job", "b", ttl).await.unwrap() {
            break lease;
        }
        assert!(Instant::now() < deadline, "b never took the expired lease");
        sleep(Duration::from_millis(20)).await;
    };
    assert!(second.token > first.token);

    // a's renewal, release and delete of its old term all fail now.
    assert_eq!(
        store.try_acquire_lease("job", "a", ttl).await.unwrap(),
        None
    );
    assert!(!store.release_lease("job", "a").await.unwrap());
    assert!(!store
        .delete_lease_if("job", "a", first.token)
        .await
        .unwrap());
    assert!(!store
        .delete_lease_if("job", "b", first.token)
        .await
        .unwrap());
    assert_eq!(store.lease("job").await.unwrap().unwrap().holder, "b");

    // The token keeps growing across a release (the row is gone) ...
    assert!(store.release_lease("job", "b").await.unwrap());
    assert_eq!(store.lease("job").await.unwrap(), None);
    let third = store
        .try_acquire_lease("job", "a", Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    assert!(third.token > second.token);
    // ... and when the same holder comes back after its lease expired.
    eventually("the lease to expire", Duration::from_secs(5), || {
        let store = store.clone();
        async move {
            let expired = store.expired_leases("jo", Duration::ZERO).await.unwrap();
            expired
                .iter()
                .any(|l| l.name == "job" && l.token == third.token)
        }
    })
    .await;
    assert!(store
        .expired_leases("job", Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .expired_leases("JOB", Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    let fourth = store
        .try_acquire_lease("job", "a", ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(fourth.token > third.token);
    assert!(store
        .delete_lease_if("job", "a", fourth.token)
        .await
        .unwrap());
}

/// A task for a singleton: counts the tasks running at once (and the most ever), and runs until
/// told to stop.
#[derive(Clone, Default)]
struct Probe {
    active: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
}

struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Probe {
    fn task(&self, mut stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        let probe = self.clone();
        async move {
            let now = probe.active.fetch_add(1, Ordering::SeqCst) + 1;
            let _active = Active(probe.active.clone());
            probe.most.fetch_max(now, Ordering::SeqCst);
            probe.started.fetch_add(1, Ordering::SeqCst);
            let _ = stop.wait_for(|s| *s).await;
        }
    }
}

async fn singleton_steps_down_when_its_lease_is_taken(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let probe = Probe::default();
    let singleton = Singleton::new(
        store.clone(),
        "engine",
        "replica-1",
        Duration::from_millis(600),
    );
    let mut leading = singleton.leading();
    let (stop_tx, stop) = watch::channel(false);
    let p = probe.clone();
    let runner = tokio::spawn(singleton.run(stop, move |s| p.task(s)));

    wait_value("leadership", &mut leading, |t| t.is_some()).await;
    let token = leading.borrow().unwrap();
    assert_eq!(store.lease("engine").await.unwrap().unwrap().token, token);
    // Leadership is announced just before the task starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while probe.active.load(Ordering::SeqCst) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Another holder takes the row (as if this replica had stalled past its term).
    common::exec_sql(
        url,
        "UPDATE leases SET holder = 'replica-2', token = token + 1, \
         expires_at = expires_at + 60000 WHERE name = 'engine'",
    )
    .await;
    wait_value("stepping down", &mut leading, |t| t.is_none()).await;
    assert_eq!(probe.active.load(Ordering::SeqCst), 0, "the task stopped");
    assert_eq!(
        store.lease("engine").await.unwrap().unwrap().holder,
        "replica-2",
        "a lost lease is not released"
    );

    stop_tx.send_replace(true);
    timeout(Duration::from_secs(5), runner)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(probe.started.load(Ordering::SeqCst), 1);
}

async fn singletons_hand_over_without_overlap(url: &str) {
    let probe = Probe::default();
    let ttl = Duration::from_millis(600);
    let mut runners = Vec::new();
    for replica in ["replica-1", "replica-2"] {
        let store = Store::connect(url).await.unwrap();
        let singleton = Singleton::new(store, "engine", replica, ttl);
        let leading = singleton.leading();
        let (stop_tx, stop) = watch::channel(false);
        let p = probe.clone();
        let task = tokio::spawn(singleton.run(stop, move |s| p.task(s)));
        runners.push((replica, leading, stop_tx, task));
    }
    let store = Store::connect(url).await.unwrap();
    let leader = || async {
        store
            .lease("engine")
            .await
            .unwrap()
            .map(|l| l.holder)
            .unwrap_or_default()
    };
    eventually("a leader", Duration::from_secs(5), || async {
        runners.iter().any(|r| r.1.borrow().is_some())
    })
    .await;
    let first = runners.iter().position(|r| r.1.borrow().is_some()).unwrap();
    assert_eq!(leader().await, runners[first].0);
    let first_token = runners[first].1.borrow().unwrap();

    // A clean shutdown releases the lease: the other replica takes over within ttl / 3 or so.
    let (name, _, stop_tx, task) = runners.remove(first);
    let shut_down = Instant::now();
    stop_tx.send_replace(true);
    timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(leader().await, name, "released on shutdown");
    let (second, mut leading, stop_tx, task) = runners.remove(0);
    wait_value("the other replica to lead", &mut leading, |t| t.is_some()).await;
    assert!(
        shut_down.elapsed() < ttl * 2,
        "handover took {:?}",
        shut_down.elapsed()
    );
    assert_eq!(leader().await, second);
    assert!(leading.borrow().unwrap() > first_token);

    // A replica that dies (its runner dropped) stops its task, and the lease expires.
    let p = probe.clone();
    let third = Singleton::new(store.clone(), "engine", "replica-3", ttl);
    let mut third_leading = third.leading();
    let (third_stop, stopped) = watch::channel(false);
    let third_task = tokio::spawn(third.run(stopped, move |s| p.task(s)));
    task.abort();
    let _ = task.await;
    wait_value(
        "a takeover after the lease expired",
        &mut third_leading,
        |t| t.is_some(),
    )
    .await;
    assert_eq!(leader().await, "replica-3");
    // Leading is announced before the task it guards has started.
    timeout(Duration::from_secs(5), async {
        while probe.started.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the third replica's task starts");
    assert_eq!(probe.active.load(Ordering::SeqCst), 1);
    assert_eq!(
        probe.most.load(Ordering::SeqCst),
        1,
        "two tasks ran at once"
    );
    assert_eq!(probe.started.load(Ordering::SeqCst), 3);
    drop(stop_tx);
    third_stop.send_replace(true);
    timeout(Duration::from_secs(5), third_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(probe.active.load(Ordering::SeqCst), 0);
}

async fn heartbeat_fences_while_it_cannot_renew(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let fence_after = Duration::from_millis(500);
    let lease = heartbeat(
        store.clone(),
        "node-a",
        "i-1",
        Duration::from_millis(100),
        fence_after,
    )
    .await
    .unwrap();
    let mut fenced = lease.fenced();
    assert!(!*fenced.borrow());
    // Renewing keeps it unfenced past fence_after.
    sleep(fence_after * 2).await;
    assert!(!*fenced.borrow());

    let lock = WriteLock::take(url, "leases").await;
    let locked = Instant::now();
    wait_value("the fence", &mut fenced, |f| *f).await;
    let took = locked.elapsed();
    assert!(
        took <= fence_after + Duration::from_millis(400),
        "fenced after {took:?}"
    );
    lock.release().await;
    wait_value("the fence to drop", &mut fenced, |f| !*f).await;
    assert_eq!(
        store.lease("node/node-a").await.unwrap().unwrap().holder,
        "i-1"
    );
    lease.shutdown().await;
    assert_eq!(store.lease("node/node-a").await.unwrap(), None, "released");
}

async fn heartbeat_fences_when_the_store_is_closed(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let lease = heartbeat(
        store.clone(),
        "node-a",
        "i-1",
        Duration::from_millis(50),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let mut fenced = lease.fenced();
    store.close().await;
    wait_value("the fence", &mut fenced, |f| *f).await;
}

async fn a_second_instance_of_a_node_is_refused(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let period = Duration::from_millis(100);
    let fence_after = Duration::from_secs(2);
    let first = heartbeat(store.clone(), "node-a", "i-1", period, fence_after)
        .await
        .unwrap();
    let refused = heartbeat(store.clone(), "node-a", "i-2", period, fence_after).await;
    match refused {
        Err(e @ NodeLeaseError::InUse { .. }) => {
            let text = e.to_string();
            assert!(text.contains("node-a") && text.contains("i-1"), "{text}");
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    // Another node id is fine; and once the first shuts down, its id is free.
    let other = heartbeat(store.clone(), "node-b", "i-2", period, fence_after)
        .await
        .unwrap();
    first.shutdown().await;
    let again = heartbeat(store.clone(), "node-a", "i-3", period, fence_after)
        .await
        .unwrap();
    assert!(!*again.fenced().borrow());
    again.shutdown().await;
    other.shutdown().await;
}

/// Devices `a1` (epoch 5) and `a2` (epoch 1) online on node-a, `b1` on node-b.
async fn devices_on_two_nodes(store: &Store) {
    let cat = catalog(store, "sensor").await;
    for d in ["a1", "a2", "b1"] {
        store.provision(&new_device(&cat, d, &[])).await.unwrap();
    }
    store
        .apply_events(&presence_batch(
            "node-a",
            vec![
                presence("a1", Connected, 5, 1_000, None),
                presence("a2", Connected, 1, 1_000, None),
            ],
        ))
        .await
        .unwrap();
    store
        .apply_events(&presence_batch(
            "node-b",
            vec![presence("b1", Connected, 1, 1_000, None)],
        ))
        .await
        .unwrap();
}

/// Waits until node `node`'s lease has expired.
async fn until_expired(store: &Store, node: &str) {
    let name = nodes::node_lease_name(node);
    eventually(
        "the node lease to expire",
        Duration::from_secs(5),
        || async {
            let expired = store
                .expired_leases(nodes::NODE_LEASE_PREFIX, Duration::ZERO)
                .await
                .unwrap();
            expired.iter().any(|l| l.name == name)
        },
    )
    .await;
}

async fn reapers_mark_a_dead_nodes_devices_once(url: &str) {
    let store = Store::connect(url).await.unwrap();
    devices_on_two_nodes(&store).await;
    let period = Duration::from_millis(50);
    let live = heartbeat(store.clone(), "node-b", "b", period, Duration::from_secs(2))
        .await
        .unwrap();
    // node-a's process dies: its heartbeat stops without releasing.
    let dead = heartbeat(
        store.clone(),
        "node-a",
        "a",
        period,
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    drop(dead);
    until_expired(&store, "node-a").await;

    let other = Store::connect(url).await.unwrap();
    let (one, two) = tokio::join!(
        reap_lost_nodes(&store, Duration::ZERO),
        reap_lost_nodes(&other, Duration::ZERO)
    );
    let mut reaped: Vec<_> = one.unwrap().into_iter().chain(two.unwrap()).collect();
    assert_eq!(reaped.len(), 1, "one reaper wins: {reaped:?}");
    let (node, devices) = reaped.remove(0);
    assert_eq!(node, "node-a");
    assert_eq!(devices, vec![(id("a1"), 5), (id("a2"), 1)]);
    assert!(reap_lost_nodes(&store, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.lease("node/node-a").await.unwrap(), None);
    assert!(store.lease("node/node-b").await.unwrap().is_some());

    for d in ["a1", "a2"] {
        let device = store.device(&id(d)).await.unwrap().unwrap();
        assert!(!device.online);
        assert_eq!(device.state, DeviceState::Offline);
        assert_eq!(device.disconnect_reason.as_deref(), Some("node_lost"));
        assert_eq!(device.state_reason, "disconnected: node_lost");
        let sessions = store.device_sessions(&id(d), 10).await.unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].end_reason.as_deref(), Some("node_lost"));
        assert!(sessions[0].ended_at_ms.is_some());
    }
    assert_eq!(
        store
            .device(&id("a1"))
            .await
            .unwrap()
            .unwrap()
            .session_epoch,
        5
    );
    let b1 = store.device(&id("b1")).await.unwrap().unwrap();
    assert!(b1.online, "a live node's devices stay online");
    let b1_sessions = store.device_sessions(&id("b1"), 10).await.unwrap();
    assert_eq!(b1_sessions[0].ended_at_ms, None);
    live.shutdown().await;
}

async fn a_node_renewed_in_time_is_not_reaped(url: &str) {
    let store = Store::connect(url).await.unwrap();
    devices_on_two_nodes(&store).await;
    store
        .try_acquire_lease("node/node-a", "a", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    until_expired(&store, "node-a").await;
    let stale = store
        .expired_leases(nodes::NODE_LEASE_PREFIX, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(stale.len(), 1);
    // The node wakes up and renews (a new term) before the reaper acts on what it read.
    store
        .try_acquire_lease("node/node-a", "a", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.end_lost_node(&stale[0], "node-a").await.unwrap(),
        None
    );
    assert!(store.device(&id("a1")).await.unwrap().unwrap().online);
    assert!(reap_lost_nodes(&store, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    // Within the grace, an expired lease is not reaped either.
    store
        .try_acquire_lease("node/node-b", "b", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    until_expired(&store, "node-b").await;
    assert!(reap_lost_nodes(&store, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    assert!(store.device(&id("b1")).await.unwrap().unwrap().online);
}

async fn run_reaper_reports_each_lost_node_once(url: &str) {
    let store = Store::connect(url).await.unwrap();
    devices_on_two_nodes(&store).await;
    let reported: Arc<Mutex<Vec<LostNode>>> = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let mut reapers = Vec::new();
    for replica in ["replica-1", "replica-2"] {
        let store = Store::connect(url).await.unwrap();
        let reported = reported.clone();
        let stop = stop.clone();
        reapers.push(tokio::spawn(async move {
            run_reaper(
                store,
                replica,
                Duration::from_millis(50),
                Duration::from_millis(100),
                stop,
                move |node, devices| reported.lock().unwrap().push((node.to_owned(), devices)),
            )
            .await
        }));
    }
    let live = heartbeat(
        store.clone(),
        "node-b",
        "b",
        Duration::from_millis(50),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let dead = heartbeat(
        store.clone(),
        "node-a",
        "a",
        Duration::from_millis(50),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    drop(dead);
    eventually("node-a reaped", Duration::from_secs(5), || async {
        !reported.lock().unwrap().is_empty()
    })
    .await;
    // A few more reaper passes change nothing.
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *reported.lock().unwrap(),
        vec![("node-a".to_owned(), vec![(id("a1"), 5), (id("a2"), 1)])]
    );
    assert!(store.device(&id("b1")).await.unwrap().unwrap().online);
    stop_tx.send_replace(true);
    for r in reapers {
        timeout(Duration::from_secs(5), r).await.unwrap().unwrap();
    }
    assert_eq!(store.lease(nodes::REAPER_LEASE).await.unwrap(), None);
    live.shutdown().await;
}
