//! What the node delivers itself, beside the router: retained messages ([`Retained`]) and
//! everything devices receive ([`Inboxes`]). Every publish that enters the broker (a client's,
//! a will, or the platform's own) passes through [`Local::publish`] once, before the router
//! (which serves backend services) sees it without its retain flag.

use std::sync::Arc;

use bytes::Bytes;
use fleet_wire::{CohortId, DeviceId, Topic};

use crate::inbox::Inboxes;
use crate::retained::{Message, Retained};
use crate::router::proto::PublishProperties;

pub(crate) struct Local {
    pub retained: Retained,
    pub inboxes: Inboxes,
    /// On a cluster node: where what this node accepted leaves for the other nodes.
    pub cluster: std::sync::OnceLock<crate::cluster::Egress>,
}

impl Local {
    pub fn new(max_queued: usize, max_queued_bytes: usize) -> Self {
        Self {
            retained: Retained::default(),
            inboxes: Inboxes::new(max_queued, max_queued_bytes),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// Records a publish the broker accepted: as its topic's retained message if `retain`, and
    /// in the inboxes of the devices that subscribed to it (the one device its topic is
    /// addressed to, or a cohort's). `from` is the publishing device.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &self,
        topic: &str,
        parsed: Option<&Topic>,
        payload: &Bytes,
        qos: u8,
        retain: bool,
        props: Option<&PublishProperties>,
        from: Option<&DeviceId>,
    ) {
        if let Some(cluster) = self.cluster.get() {
            // A device event reaches the other nodes from the events stream, once it is
            // durable: never a live copy the bus then refuses, none lost if NATS restarts.
            let live = !parsed.is_some_and(Topic::is_durable_event);
            cluster.send(topic, payload, qos, retain, live);
        }
        let to = parsed.and_then(recipients);
        if !retain && to.is_none() {
            return;
        }
        let message = Self::message(topic, payload, qos, props);
        if retain {
            self.retained.set(message.clone());
        }
        // An empty retained payload clears the retained message and still reaches the
        // subscribers of the moment, as any publish does.
        Self::offer(&self.inboxes, to, &message, from);
    }

    /// Delivers a publish another node accepted to the devices here that subscribed to it.
    /// Its retained copy, if any, arrives through the cluster's retained stream instead.
    pub fn deliver(
        &self,
        topic: &str,
        parsed: Option<&Topic>,
        payload: &Bytes,
        qos: u8,
        props: Option<&PublishProperties>,
        from: Option<&DeviceId>,
    ) {
        let Some(to) = parsed.and_then(recipients) else {
            return;
        };
        let message = Self::message(topic, payload, qos, props);
        Self::offer(&self.inboxes, Some(to), &message, from);
    }

    fn message(
        topic: &str,
        payload: &Bytes,
        qos: u8,
        props: Option<&PublishProperties>,
    ) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.to_owned(),
            payload: payload.clone(),
            qos,
            props: props.cloned(),
        })
    }

    fn offer(
        inboxes: &Inboxes,
        to: Option<Recipients<'_>>,
        message: &Arc<Message>,
        from: Option<&DeviceId>,
    ) {
        match to {
            Some(Recipients::Device(id)) => inboxes.deliver(id, message, from),
            Some(Recipients::Cohort(id)) => inboxes.deliver_cohort(id, message),
            None => {}
        }
    }

    /// The epoch of the presence retained at `topic`, if any.
    pub fn retained_presence_epoch(&self, topic: &str) -> Option<u64> {
        let current = self.retained.matching(topic).pop()?;
        serde_json::from_slice::<fleet_wire::payload::Presence>(&current.payload)
            .ok()
            .map(|p| p.epoch)
    }
}

enum Recipients<'a> {
    Device(&'a DeviceId),
    Cohort(&'a CohortId),
}

/// Whose subscriptions a topic can match among devices (see `acl::may_subscribe`): what lies
/// under one device's own `devices/{id}/` (its commands, assignment and application subtree),
/// or under a cohort's `cohorts/{id}/`.
fn recipients(topic: &Topic) -> Option<Recipients<'_>> {
    match topic {
        Topic::Commands(id) | Topic::CommandAck(id) | Topic::Assignment(id) | Topic::App(id, _) => {
            Some(Recipients::Device(id))
        }
        Topic::CohortUpdates(id) | Topic::CohortCommands(id) => Some(Recipients::Cohort(id)),
        _ => None,
    }
}
