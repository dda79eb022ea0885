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
}

impl Local {
    pub fn new(max_queued: usize, max_queued_bytes: usize) -> Self {
        Self {
            retained: Retained::default(),
            inboxes: Inboxes::new(max_queued, max_queued_bytes),
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
        let to = parsed.and_then(recipients);
        if !retain && to.is_none() {
            return;
        }
        let message = Arc::new(Message {
            topic: topic.to_owned(),
            payload: payload.clone(),
            qos,
            props: props.cloned(),
        });
        if retain {
            self.retained.set(message.clone());
        }
        // An empty retained payload clears the retained message and still reaches the
        // subscribers of the moment, as any publish does.
        match to {
            Some(Recipients::Device(id)) => self.inboxes.deliver(id, &message, from),
            Some(Recipients::Cohort(id)) => self.inboxes.deliver_cohort(id, &message),
            None => {}
        }
    }
}

enum Recipients<'a> {
    Device(&'a DeviceId),
    Cohort(&'a CohortId),
}

/// Whose subscriptions a topic can match among devices (see `acl::may_subscribe`): what lies
/// under one device's own `devices/{id}/`, or under a cohort's `cohorts/{id}/`.
fn recipients(topic: &Topic) -> Option<Recipients<'_>> {
    match topic {
        Topic::Commands(id) | Topic::CommandAck(id) | Topic::Assignment(id) => {
            Some(Recipients::Device(id))
        }
        Topic::CohortUpdates(id) | Topic::CohortCommands(id) => Some(Recipients::Cohort(id)),
        _ => None,
    }
}
