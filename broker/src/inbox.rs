//! What devices receive, delivered without the router.
//!
//! rumqttd matches every publish against every filter it holds, keeps a commit log per filter
//! and tens of KiB of buffers per link, so a router link and a filter per device
//! (`devices/{id}/commands`) made every publish and every device cost more as the fleet grew.
//! Instead a device's subscriptions are kept here, in its inbox, and devices have no router
//! link at all. A publish on a topic addressed to one device is offered to that one inbox (one
//! map lookup, whatever the fleet's size); one on a cohort's topic to the inboxes of the
//! devices that subscribed under that cohort (an index by cohort), which is the fan-out the
//! message asks for and nothing more. The device's session takes from its queue as its
//! in-flight window allows. The router serves backend services only.
//!
//! An inbox outlives its connection only for a persistent session: then QoS 1 messages queue
//! while the device is away, and those it had not acknowledged go back to the front of the
//! queue (sent again with DUP), until the session expires. In a cluster, a message for a
//! device connected to another node reaches that node's [`Inboxes::deliver`] the same way.
//!
//! **Invariants**: an inbox belongs to one session epoch at a time: a session acts on it only
//! while it owns it, so a late end of a replaced session never touches its successor's inbox;
//! a queue holds at most `max_queued` messages and `max_queued_bytes` of topics and payloads
//! (beyond, new ones are dropped and counted, as Mosquitto does), so what a publisher sends to
//! an absent device stays bounded; no lock is held across an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use fleet_wire::{CohortId, DeviceId};
use tokio::sync::mpsc;

use crate::retained::Message;

/// A message on its way to one device, at the QoS its subscription grants.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub message: Arc<Message>,
    pub qos: u8,
    /// Sent before and not acknowledged: the resend carries DUP.
    pub dup: bool,
    /// Retained: delivered because of a SUBSCRIBE, with the retain flag set.
    pub retained: bool,
    /// The packet identifier it was sent with, kept for a resend after the device reconnects
    /// (the same identifier, [MQTT-4.4.0-1]: the device tells a QoS 2 resend by it).
    pub pkid: Option<u16>,
    /// A QoS 2 delivery the device received (PUBREC): what is resent is the PUBREL, not the
    /// message [MQTT-4.3.3-5].
    pub released: bool,
}

impl Delivery {
    /// A message sent for the first time.
    pub fn new(message: Arc<Message>, qos: u8, retained: bool) -> Self {
        Self {
            message,
            qos,
            dup: false,
            retained,
            pkid: None,
            released: false,
        }
    }
}

/// A device's subscription kept here instead of in the router.
#[derive(Debug, Clone)]
struct DirectFilter {
    filter: String,
    qos: u8,
    /// MQTT 5 No Local: not the device's own publishes.
    no_local: bool,
}

struct Inbox {
    /// The session epoch that owns this inbox.
    owner: u64,
    filters: Vec<DirectFilter>,
    queue: VecDeque<Delivery>,
    /// Topic and payload bytes in `queue`.
    queued_bytes: usize,
    /// Wakes the owning session while it is connected.
    wake: Option<mpsc::Sender<()>>,
}

/// Every device inbox of this node.
pub(crate) struct Inboxes {
    boxes: DashMap<DeviceId, Inbox>,
    /// Per cohort: the devices with a filter under `cohorts/{id}/`. Locked only after a
    /// device's inbox guard is released, never the other way round.
    by_cohort: DashMap<CohortId, std::collections::HashSet<DeviceId>>,
    max_queued: usize,
    max_queued_bytes: usize,
    queued: AtomicU64,
    dropped: AtomicU64,
}

/// What [`Inboxes::attach`] gives the session.
pub(crate) struct Attached {
    pub wake: mpsc::Receiver<()>,
    /// A persistent session was resumed (MQTT `session_present`).
    pub resumed: bool,
}

impl Inboxes {
    pub fn new(max_queued: usize, max_queued_bytes: usize) -> Self {
        Self {
            boxes: DashMap::new(),
            by_cohort: DashMap::new(),
            max_queued: max_queued.max(1),
            max_queued_bytes: max_queued_bytes.max(1),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Gives the device's inbox to session `epoch`. A clean session starts empty; a persistent
    /// one resumes the filters and queue its predecessor left (if it has not expired).
    pub fn attach(&self, id: &DeviceId, epoch: u64, clean: bool) -> Attached {
        let (tx, rx) = mpsc::channel(1);
        let mut resumed = true;
        let mut inbox = self.boxes.entry(id.clone()).or_insert_with(|| {
            resumed = false;
            Inbox {
                owner: epoch,
                filters: Vec::new(),
                queue: VecDeque::new(),
                queued_bytes: 0,
                wake: None,
            }
        });
        let dropped = if clean {
            inbox.queue.clear();
            inbox.queued_bytes = 0;
            std::mem::take(&mut inbox.filters)
        } else {
            Vec::new()
        };
        inbox.owner = epoch;
        if !inbox.queue.is_empty() {
            let _ = tx.try_send(());
        }
        inbox.wake = Some(tx);
        drop(inbox);
        self.unindex(id, &dropped);
        Attached {
            wake: rx,
            resumed: resumed && !clean,
        }
    }

    /// Adds or replaces one of session `epoch`'s filters; returns the QoS granted (all three:
    /// the session delivers QoS 2 itself, PUBREL resends included).
    pub fn subscribe(
        &self,
        id: &DeviceId,
        epoch: u64,
        filter: &str,
        qos: u8,
        no_local: bool,
    ) -> u8 {
        let qos = qos.min(2);
        let Some(mut inbox) = self.boxes.get_mut(id).filter(|b| b.owner == epoch) else {
            return qos;
        };
        let f = DirectFilter {
            filter: filter.to_owned(),
            qos,
            no_local,
        };
        match inbox.filters.iter_mut().find(|x| x.filter == filter) {
            Some(existing) => *existing = f,
            None => inbox.filters.push(f),
        }
        drop(inbox);
        if let Some(cohort) = cohort_of(filter) {
            self.by_cohort.entry(cohort).or_default().insert(id.clone());
        }
        qos
    }

    pub fn unsubscribe(&self, id: &DeviceId, epoch: u64, filter: &str) {
        let Some(mut inbox) = self.boxes.get_mut(id).filter(|b| b.owner == epoch) else {
            return;
        };
        let before = inbox.filters.len();
        inbox.filters.retain(|f| f.filter != filter);
        let removed = inbox.filters.len() < before;
        let cohort = cohort_of(filter);
        let still = cohort.as_ref().is_some_and(|c| {
            inbox
                .filters
                .iter()
                .any(|f| cohort_of(&f.filter).as_ref() == Some(c))
        });
        drop(inbox);
        if let (true, Some(c), false) = (removed, cohort, still) {
            self.remove_from_cohort(&c, id);
        }
    }

    /// Offers a message published on a cohort's topic to the devices subscribed under it.
    pub fn deliver_cohort(&self, cohort: &CohortId, message: &Arc<Message>) {
        let Some(devices) = self.by_cohort.get(cohort) else {
            return;
        };
        for id in devices.iter() {
            self.deliver(id, message, None);
        }
    }

    /// Offers a message published on one of `id`'s own topics (by `from`, if a device
    /// published it) to its inbox. Queued at the highest QoS of the filters that match it; a
    /// QoS 0 message is not kept for a device that is away.
    pub fn deliver(&self, id: &DeviceId, message: &Arc<Message>, from: Option<&DeviceId>) {
        let Some(mut inbox) = self.boxes.get_mut(id) else {
            return;
        };
        let own = from == Some(id);
        let granted = inbox
            .filters
            .iter()
            .filter(|f| !(own && f.no_local))
            .filter(|f| crate::acl::filter_within(&message.topic, &f.filter))
            .map(|f| f.qos)
            .max();
        let Some(granted) = granted else {
            return;
        };
        let qos = message.qos.min(granted);
        if qos == 0 && inbox.wake.is_none() {
            return;
        }
        let size = size_of(message);
        if inbox.queue.len() >= self.max_queued || inbox.queued_bytes + size > self.max_queued_bytes
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(device_id = %id, "inbox full; message dropped");
            return;
        }
        inbox.queued_bytes += size;
        inbox
            .queue
            .push_back(Delivery::new(message.clone(), qos, false));
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Some(wake) = &inbox.wake {
            let _ = wake.try_send(());
        }
    }

    /// Takes up to `n` queued messages for session `epoch`.
    pub fn take(&self, id: &DeviceId, epoch: u64, n: usize) -> Vec<Delivery> {
        match self.boxes.get_mut(id).filter(|b| b.owner == epoch) {
            Some(mut inbox) => {
                let n = n.min(inbox.queue.len());
                let taken: Vec<Delivery> = inbox.queue.drain(..n).collect();
                let bytes: usize = taken.iter().map(|d| size_of(&d.message)).sum();
                inbox.queued_bytes = inbox.queued_bytes.saturating_sub(bytes);
                taken
            }
            None => Vec::new(),
        }
    }

    /// Session `epoch` ended. A persistent session keeps its inbox, with the QoS 1 and 2
    /// messages it had sent but not seen completed back at the front (with their packet
    /// identifiers); any other loses it.
    pub fn detach(&self, id: &DeviceId, epoch: u64, unacknowledged: Vec<Delivery>, keep: bool) {
        if !keep {
            self.remove_where(id, |b| b.owner == epoch);
            return;
        }
        if let Some(mut inbox) = self.boxes.get_mut(id).filter(|b| b.owner == epoch) {
            inbox.wake = None;
            for mut d in unacknowledged.into_iter().rev() {
                d.dup = true;
                inbox.queued_bytes += size_of(&d.message);
                inbox.queue.push_front(d);
            }
        }
    }

    /// The persistent session `epoch` expired: its inbox goes, unless a session took it
    /// since. Returns whether it went.
    pub fn expire(&self, id: &DeviceId, epoch: u64) -> bool {
        self.remove_where(id, |b| b.owner == epoch && b.wake.is_none())
    }

    /// The device's rights changed (moved, quarantined): a session it left behind goes, so
    /// the next one subscribes again under its new rights. A live session ends on its own.
    pub fn forget(&self, id: &DeviceId) -> bool {
        self.remove_where(id, |b| b.wake.is_none())
    }

    fn remove_where(&self, id: &DeviceId, pred: impl FnOnce(&Inbox) -> bool) -> bool {
        match self.boxes.remove_if(id, |_, b| pred(b)) {
            Some((_, inbox)) => {
                self.unindex(id, &inbox.filters);
                true
            }
            None => false,
        }
    }

    /// Takes `id` off the cohorts of `filters`.
    fn unindex(&self, id: &DeviceId, filters: &[DirectFilter]) {
        for c in filters.iter().filter_map(|f| cohort_of(&f.filter)) {
            self.remove_from_cohort(&c, id);
        }
    }

    fn remove_from_cohort(&self, cohort: &CohortId, id: &DeviceId) {
        if let Some(mut set) = self.by_cohort.get_mut(cohort) {
            set.remove(id);
        }
        self.by_cohort.remove_if(cohort, |_, set| set.is_empty());
    }

    pub fn snapshot(&self) -> InboxCounts {
        InboxCounts {
            inboxes: self.boxes.len() as u64,
            queued: self.queued.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// What a queued message counts against `max_queued_bytes`.
fn size_of(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

/// The cohort a filter lies under (`cohorts/{id}/...`), if any.
fn cohort_of(filter: &str) -> Option<CohortId> {
    let rest = filter.strip_prefix("cohorts/")?;
    let (id, _) = rest.split_once('/')?;
    CohortId::parse(id).ok()
}

/// Counters of [`Inboxes`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InboxCounts {
    pub inboxes: u64,
    pub queued: u64,
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn msg(topic: &str, qos: u8) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"{}"),
            qos,
            props: None,
        })
    }

    #[test]
    fn only_the_addressed_device_with_a_matching_filter_gets_it() {
        let boxes = Inboxes::new(10, usize::MAX);
        let (a, b) = (id("a"), id("b"));
        let _wa = boxes.attach(&a, 1, true);
        let _wb = boxes.attach(&b, 1, true);
        boxes.subscribe(&a, 1, "devices/a/commands", 1, false);
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        boxes.deliver(&a, &msg("devices/a/assignment", 1), None);
        boxes.deliver(&b, &msg("devices/b/commands", 1), None);
        assert_eq!(boxes.take(&a, 1, 10).len(), 1);
        assert!(boxes.take(&b, 1, 10).is_empty(), "b never subscribed");
    }

    #[test]
    fn qos_is_the_lower_of_message_and_grant_and_no_local_holds() {
        let boxes = Inboxes::new(10, usize::MAX);
        let a = id("a");
        let _w = boxes.attach(&a, 1, true);
        assert_eq!(boxes.subscribe(&a, 1, "devices/a/commands/#", 2, true), 2);
        assert_eq!(boxes.subscribe(&a, 1, "devices/a/app/#", 1, false), 1);
        boxes.deliver(&a, &msg("devices/a/commands", 0), None);
        boxes.deliver(&a, &msg("devices/a/commands/ack", 1), Some(&a));
        boxes.deliver(&a, &msg("devices/a/commands/x", 2), None);
        boxes.deliver(&a, &msg("devices/a/app/x", 2), None);
        let got: Vec<u8> = boxes.take(&a, 1, 10).iter().map(|d| d.qos).collect();
        assert_eq!(got, [0, 2, 1]);
    }

    #[test]
    fn persistent_session_queues_while_away_and_resends_unacknowledged() {
        let boxes = Inboxes::new(10, usize::MAX);
        let a = id("a");
        let _w = boxes.attach(&a, 1, false);
        boxes.subscribe(&a, 1, "devices/a/commands", 1, false);
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        let sent = boxes.take(&a, 1, 10);
        boxes.detach(&a, 1, sent, true);
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        boxes.deliver(&a, &msg("devices/a/commands", 0), None); // QoS 0 is not kept
        let mut w = boxes.attach(&a, 2, false);
        assert!(
            w.wake.try_recv().is_ok(),
            "a resumed session with a queue is woken"
        );
        let got = boxes.take(&a, 2, 10);
        assert_eq!(got.len(), 2);
        assert!(got[0].dup && !got[1].dup);
    }

    #[test]
    fn a_replaced_session_cannot_touch_its_successor() {
        let boxes = Inboxes::new(10, usize::MAX);
        let a = id("a");
        let _old = boxes.attach(&a, 1, false);
        let _new = boxes.attach(&a, 2, false);
        boxes.subscribe(&a, 2, "devices/a/commands", 1, false);
        boxes.detach(&a, 1, Vec::new(), false);
        boxes.expire(&a, 1);
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        assert_eq!(boxes.take(&a, 2, 10).len(), 1);
        assert!(boxes.take(&a, 1, 10).is_empty());
    }

    #[test]
    fn clean_session_and_expiry_forget() {
        let boxes = Inboxes::new(10, usize::MAX);
        let a = id("a");
        let _w = boxes.attach(&a, 1, false);
        boxes.subscribe(&a, 1, "devices/a/commands", 1, false);
        boxes.detach(&a, 1, Vec::new(), true);
        boxes.expire(&a, 1);
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        assert_eq!(boxes.snapshot().inboxes, 0);
        let _w = boxes.attach(&a, 2, false);
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        assert!(
            boxes.take(&a, 2, 10).is_empty(),
            "the expired filter is gone"
        );
    }

    #[test]
    fn a_queue_full_of_bytes_drops_too() {
        // 18 bytes of topic + 2 of payload each: two fit in 45 bytes, a third does not.
        let boxes = Inboxes::new(10, 45);
        let a = id("a");
        let _w = boxes.attach(&a, 1, true);
        boxes.subscribe(&a, 1, "devices/a/commands", 1, false);
        for _ in 0..3 {
            boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        }
        assert_eq!(boxes.snapshot().dropped, 1);
        assert_eq!(boxes.take(&a, 1, 10).len(), 2);
        // Taken messages free their bytes.
        boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        assert_eq!(boxes.take(&a, 1, 10).len(), 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let boxes = Inboxes::new(2, usize::MAX);
        let a = id("a");
        let _w = boxes.attach(&a, 1, true);
        boxes.subscribe(&a, 1, "devices/a/commands", 1, false);
        for _ in 0..3 {
            boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        }
        assert_eq!(boxes.take(&a, 1, 10).len(), 2);
        assert_eq!(boxes.snapshot().dropped, 1);
    }

    #[test]
    fn a_cohort_message_reaches_its_subscribers_only() {
        let boxes = Inboxes::new(10, usize::MAX);
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let cohort = "01a23b34-2036-7505-9a04-5048e8a58c21";
        let other = "01a23b34-2036-7505-9a04-5048e8a58c22";
        for d in [&a, &b, &c] {
            let _ = boxes.attach(d, 1, false);
        }
        boxes.subscribe(&a, 1, &format!("cohorts/{cohort}/#"), 1, false);
        boxes.subscribe(&b, 1, &format!("cohorts/{cohort}/updates"), 1, false);
        boxes.subscribe(&c, 1, &format!("cohorts/{other}/updates"), 1, false);
        let cohort_id = CohortId::parse(cohort).unwrap();
        boxes.deliver_cohort(&cohort_id, &msg(&format!("cohorts/{cohort}/commands"), 1));
        assert_eq!(boxes.take(&a, 1, 10).len(), 1);
        assert!(
            boxes.take(&b, 1, 10).is_empty(),
            "b's filter does not match"
        );
        assert!(boxes.take(&c, 1, 10).is_empty(), "c is in another cohort");
        // Unsubscribing, a dropped session, or a forgotten one leaves the index.
        boxes.unsubscribe(&a, 1, &format!("cohorts/{cohort}/#"));
        boxes.detach(&b, 1, Vec::new(), true);
        assert!(boxes.forget(&b));
        assert!(boxes.by_cohort.get(&cohort_id).is_none());
    }
}
