//! Messages addressed to one device, delivered without the router.
//!
//! rumqttd matches every publish against every filter it holds and keeps a commit log per
//! filter, so a filter per device (`devices/{id}/commands`) made every publish and every
//! device cost more as the fleet grew. Instead, what a device subscribes under its own
//! `devices/{id}/` (its commands, their acks, its assignment) is kept here, in the device's
//! inbox, and never reaches the router. A publish on a device-addressed topic is offered to
//! that one inbox (one map lookup, whatever the fleet's size) and queued there; the device's
//! session takes from the queue as its in-flight window allows. The router holds only filters
//! many devices share (a cohort's topics) and services' filters.
//!
//! An inbox outlives its connection only for a persistent session: then QoS 1 messages queue
//! while the device is away, and those it had not acknowledged go back to the front of the
//! queue (sent again with DUP), until the session expires. In a cluster, a message for a
//! device connected to another node reaches that node's [`Inboxes::deliver`] the same way.
//!
//! **Invariants**: an inbox belongs to one session epoch at a time: a session acts on it only
//! while it owns it, so a late end of a replaced session never touches its successor's inbox;
//! a queue holds at most `max_queued` messages (beyond, new ones are dropped and counted, as
//! Mosquitto does); no lock is held across an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use fleet_wire::DeviceId;
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
    /// Wakes the owning session while it is connected.
    wake: Option<mpsc::Sender<()>>,
}

/// Every device inbox of this node.
pub(crate) struct Inboxes {
    boxes: DashMap<DeviceId, Inbox>,
    max_queued: usize,
    queued: AtomicU64,
    dropped: AtomicU64,
}

/// What [`Inboxes::attach`] gives the session: its wake-up signal.
pub(crate) struct Attached {
    pub wake: mpsc::Receiver<()>,
}

impl Inboxes {
    pub fn new(max_queued: usize) -> Self {
        Self {
            boxes: DashMap::new(),
            max_queued: max_queued.max(1),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Gives the device's inbox to session `epoch`. A clean session starts empty; a persistent
    /// one resumes the filters and queue its predecessor left (if it has not expired).
    pub fn attach(&self, id: &DeviceId, epoch: u64, clean: bool) -> Attached {
        let (tx, rx) = mpsc::channel(1);
        let mut inbox = self.boxes.entry(id.clone()).or_insert_with(|| Inbox {
            owner: epoch,
            filters: Vec::new(),
            queue: VecDeque::new(),
            wake: None,
        });
        if clean {
            inbox.filters.clear();
            inbox.queue.clear();
        }
        inbox.owner = epoch;
        if !inbox.queue.is_empty() {
            let _ = tx.try_send(());
        }
        inbox.wake = Some(tx);
        Attached { wake: rx }
    }

    /// Adds or replaces one of session `epoch`'s filters; returns the QoS granted.
    pub fn subscribe(
        &self,
        id: &DeviceId,
        epoch: u64,
        filter: &str,
        qos: u8,
        no_local: bool,
    ) -> u8 {
        let qos = qos.min(1);
        if let Some(mut inbox) = self.boxes.get_mut(id).filter(|b| b.owner == epoch) {
            let f = DirectFilter {
                filter: filter.to_owned(),
                qos,
                no_local,
            };
            match inbox.filters.iter_mut().find(|x| x.filter == filter) {
                Some(existing) => *existing = f,
                None => inbox.filters.push(f),
            }
        }
        qos
    }

    pub fn unsubscribe(&self, id: &DeviceId, epoch: u64, filter: &str) {
        if let Some(mut inbox) = self.boxes.get_mut(id).filter(|b| b.owner == epoch) {
            inbox.filters.retain(|f| f.filter != filter);
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
        if inbox.queue.len() >= self.max_queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(device_id = %id, "inbox full; message dropped");
            return;
        }
        inbox.queue.push_back(Delivery {
            message: message.clone(),
            qos,
            dup: false,
            retained: false,
        });
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
                inbox.queue.drain(..n).collect()
            }
            None => Vec::new(),
        }
    }

    /// Session `epoch` ended. A persistent session keeps its inbox, with the QoS 1 messages
    /// it had sent but not seen acknowledged back at the front; any other loses it.
    pub fn detach(&self, id: &DeviceId, epoch: u64, unacknowledged: Vec<Delivery>, keep: bool) {
        if !keep {
            self.boxes.remove_if(id, |_, b| b.owner == epoch);
            return;
        }
        if let Some(mut inbox) = self.boxes.get_mut(id).filter(|b| b.owner == epoch) {
            inbox.wake = None;
            for mut d in unacknowledged.into_iter().rev() {
                d.dup = true;
                inbox.queue.push_front(d);
            }
        }
    }

    /// The persistent session `epoch` expired: its inbox goes, unless a session took it since.
    pub fn expire(&self, id: &DeviceId, epoch: u64) {
        self.boxes
            .remove_if(id, |_, b| b.owner == epoch && b.wake.is_none());
    }

    pub fn snapshot(&self) -> InboxCounts {
        InboxCounts {
            inboxes: self.boxes.len() as u64,
            queued: self.queued.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
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
        let boxes = Inboxes::new(10);
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
        let boxes = Inboxes::new(10);
        let a = id("a");
        let _w = boxes.attach(&a, 1, true);
        assert_eq!(boxes.subscribe(&a, 1, "devices/a/commands/#", 2, true), 1);
        boxes.deliver(&a, &msg("devices/a/commands", 0), None);
        boxes.deliver(&a, &msg("devices/a/commands/ack", 1), Some(&a));
        let got = boxes.take(&a, 1, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].qos, 0);
    }

    #[test]
    fn persistent_session_queues_while_away_and_resends_unacknowledged() {
        let boxes = Inboxes::new(10);
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
        let boxes = Inboxes::new(10);
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
        let boxes = Inboxes::new(10);
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
    fn a_full_queue_drops_and_counts() {
        let boxes = Inboxes::new(2);
        let a = id("a");
        let _w = boxes.attach(&a, 1, true);
        boxes.subscribe(&a, 1, "devices/a/commands", 1, false);
        for _ in 0..3 {
            boxes.deliver(&a, &msg("devices/a/commands", 1), None);
        }
        assert_eq!(boxes.take(&a, 1, 10).len(), 2);
        assert_eq!(boxes.snapshot().dropped, 1);
    }
}
