//! What the node delivers itself, beside the router: retained messages ([`Retained`]) and
//! messages addressed to one device ([`Inboxes`]). Every publish that enters the broker (a
//! client's, a will, or the platform's own on the system link) passes through
//! [`Local::publish`] once, before the router sees it without its retain flag.

use std::sync::Arc;

use bytes::Bytes;
use fleet_wire::{DeviceId, Topic};

use crate::inbox::Inboxes;
use crate::retained::{Message, Retained};
use crate::router::proto::PublishProperties;

pub(crate) struct Local {
    pub retained: Retained,
    pub inboxes: Inboxes,
}

impl Local {
    pub fn new(max_queued: usize) -> Self {
        Self {
            retained: Retained::default(),
            inboxes: Inboxes::new(max_queued),
        }
    }

    /// Records a publish the broker accepted: as its topic's retained message if `retain`, and
    /// in the inbox of the device the topic is addressed to. `from` is the publishing device.
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
        let addressed = parsed.and_then(addressed_device);
        if !retain && addressed.is_none() {
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
        if let Some(id) = addressed {
            // An empty retained payload clears the retained message and still reaches the
            // subscribers of the moment, as any publish does.
            self.inboxes.deliver(id, &message, from);
        }
    }
}

/// The device whose own subscriptions a topic can match: what lies under `devices/{id}/` and
/// a device may subscribe to (see `acl::may_subscribe`).
fn addressed_device(topic: &Topic) -> Option<&DeviceId> {
    match topic {
        Topic::Commands(id) | Topic::CommandAck(id) | Topic::Assignment(id) => Some(id),
        _ => None,
    }
}
