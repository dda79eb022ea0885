//! Delivering here what arrives from the other nodes (live messages and device events).
//!
//! Who may receive a message about a device is decided from the registry, so a node must know
//! the device first. One another node provisioned a moment ago may not be announced here yet:
//! its messages wait, in order, behind one read of it from the store, made off the loops that
//! receive from NATS, while messages about every other device go on. At most [`MAX_PARKED`]
//! messages wait; beyond, the receiving loop waits for room (it slows down rather than hold
//! more).
//!
//! **Invariants**: the messages about one device are delivered in the order they arrived; no
//! lock is held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fleet_wire::{DeviceId, Topic};

use super::ClusterMetrics;
use crate::control::BrokerControl;
use crate::local::Local;
use crate::router::SystemPublisher;

/// Most messages waiting for their devices to be read, over all devices.
pub(super) const MAX_PARKED: usize = 10_000;

/// How long a receiving loop waits before offering again when [`MAX_PARKED`] wait.
const FULL_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// A message from another node, to deliver here.
pub(super) struct Arrival {
    pub topic: String,
    pub parsed: Option<Topic>,
    pub payload: Bytes,
    pub qos: u8,
}

/// Where arrivals go: this node's inboxes and router.
#[derive(Clone)]
pub(super) struct Arrivals {
    control: BrokerControl,
    local: Arc<Local>,
    system: SystemPublisher,
    metrics: Arc<ClusterMetrics>,
    parked: Arc<Mutex<Parking<DeviceId, Arrival>>>,
}

impl Arrivals {
    pub fn new(
        control: BrokerControl,
        local: Arc<Local>,
        system: SystemPublisher,
        metrics: Arc<ClusterMetrics>,
    ) -> Self {
        Self {
            control,
            local,
            system,
            metrics,
            parked: Arc::new(Mutex::new(Parking::new(MAX_PARKED))),
        }
    }

    /// Delivers `m` now, or once its device has been read (in order with the others about
    /// it).
    pub async fn deliver(&self, mut m: Arrival) {
        let Some(id) = m.parsed.as_ref().and_then(Topic::device).cloned() else {
            return self.deliver_now(m).await;
        };
        loop {
            let known = self.control.registry.knows(&id);
            let offer = self
                .parked
                .lock()
                .expect("parking lock")
                .offer(&id, m, known);
            match offer {
                Offer::Deliver(m) => return self.deliver_now(m).await,
                Offer::Parked { first: true } => {
                    let this = self.clone();
                    tokio::spawn(async move { this.learn(id).await });
                    return;
                }
                Offer::Parked { first: false } => return,
                Offer::Full(back) => {
                    // Lookups are under way (each a read of one row): wait for room.
                    m = back;
                    tokio::time::sleep(FULL_PAUSE).await;
                }
            }
        }
    }

    /// Reads device `id` into the registry, then delivers what waited for it, including what
    /// arrived meanwhile.
    async fn learn(&self, id: DeviceId) {
        self.control.registry.learn_device(&id).await;
        loop {
            let batch = self.parked.lock().expect("parking lock").take(&id);
            if batch.is_empty() {
                return;
            }
            for m in batch {
                self.deliver_now(m).await;
            }
        }
    }

    async fn deliver_now(&self, m: Arrival) {
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        self.local
            .deliver(&m.topic, m.parsed.as_ref(), &m.payload, m.qos, None, None);
        self.system
            .forward(Bytes::from(m.topic), m.payload, m.qos, None)
            .await;
    }
}

/// What [`Parking::offer`] decided.
#[derive(Debug, PartialEq)]
pub(super) enum Offer<M> {
    /// Nothing waits for this key and it is known: deliver now.
    Deliver(M),
    /// Waits behind the key's lookup; `first`: the caller starts that lookup.
    Parked { first: bool },
    /// Too many wait: the caller offers again later.
    Full(M),
}

/// Messages waiting per key, in order, bounded in all.
pub(super) struct Parking<K, M> {
    waiting: HashMap<K, VecDeque<M>>,
    count: usize,
    max: usize,
}

impl<K: std::hash::Hash + Eq + Clone, M> Parking<K, M> {
    pub fn new(max: usize) -> Self {
        Self {
            waiting: HashMap::new(),
            count: 0,
            max,
        }
    }

    /// A message about `key` arrived; `known`: the registry knows `key`.
    pub fn offer(&mut self, key: &K, m: M, known: bool) -> Offer<M> {
        let waiting = self.waiting.contains_key(key);
        if (waiting || !known) && self.count >= self.max {
            return Offer::Full(m);
        }
        if let Some(queue) = self.waiting.get_mut(key) {
            // Behind the ones already waiting, whatever the registry says by now.
            queue.push_back(m);
            self.count += 1;
            return Offer::Parked { first: false };
        }
        if known {
            return Offer::Deliver(m);
        }
        self.waiting.insert(key.clone(), VecDeque::from([m]));
        self.count += 1;
        Offer::Parked { first: true }
    }

    /// What waits for `key`, in order; empty (and `key` no longer waits) when nothing does.
    pub fn take(&mut self, key: &K) -> Vec<M> {
        let Some(queue) = self.waiting.get_mut(key) else {
            return Vec::new();
        };
        if queue.is_empty() {
            self.waiting.remove(key);
            return Vec::new();
        }
        let batch: Vec<M> = queue.drain(..).collect();
        self.count -= batch.len();
        batch
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_key_with_nothing_waiting_is_delivered_at_once() {
        let mut p = Parking::new(10);
        assert_eq!(p.offer(&"a", 1, true), Offer::Deliver(1));
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn an_unknown_key_waits_in_order_until_taken_empty() {
        let mut p = Parking::new(10);
        assert_eq!(p.offer(&"a", 1, false), Offer::Parked { first: true });
        assert_eq!(p.offer(&"a", 2, false), Offer::Parked { first: false });
        // Known by now, but earlier ones still wait: this one goes behind them.
        assert_eq!(p.offer(&"a", 3, true), Offer::Parked { first: false });
        assert_eq!(p.offer(&"b", 9, true), Offer::Deliver(9), "others go on");
        assert_eq!(p.take(&"a"), [1, 2, 3]);
        // Arrived while the batch was being delivered: still behind it.
        assert_eq!(p.offer(&"a", 4, true), Offer::Parked { first: false });
        assert_eq!(p.take(&"a"), [4]);
        assert!(p.take(&"a").is_empty());
        assert_eq!(p.offer(&"a", 5, true), Offer::Deliver(5), "no longer waits");
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn beyond_the_bound_only_known_keys_with_nothing_waiting_go_on() {
        let mut p = Parking::new(2);
        assert_eq!(p.offer(&"a", 1, false), Offer::Parked { first: true });
        assert_eq!(p.offer(&"b", 2, false), Offer::Parked { first: true });
        assert_eq!(p.offer(&"c", 3, false), Offer::Full(3));
        assert_eq!(p.offer(&"a", 4, true), Offer::Full(4), "never ahead of 1");
        assert_eq!(p.offer(&"d", 5, true), Offer::Deliver(5));
        assert_eq!(p.take(&"a"), [1]);
        assert_eq!(p.offer(&"a", 4, true), Offer::Parked { first: false });
        assert_eq!(p.offer(&"c", 3, false), Offer::Full(3));
        assert_eq!(p.take(&"b"), [2]);
        assert_eq!(p.offer(&"c", 3, false), Offer::Parked { first: true });
    }
}
