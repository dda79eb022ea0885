//! What the router forwards to a client with a router link (a service or a conformance client)
//! on its way out: the rules rumqttd does not apply, applied by the session.
//!
//! rumqttd delivers every message at the subscription's QoS (MQTT says the lower of the
//! subscription's and the publish's [MQTT-3.8.4-8]), clears RETAIN before it stores a message
//! (Retain As Published needs it), ignores No Local, and assigns server topic aliases per
//! subscription filter (wrong for a wildcard filter, whose topics differ). So a conformance
//! client's publish carries a [`Mark`] through the router (a user property whose name holds a
//! NUL, which no client may send, [`crate::mqtt`]): its QoS, RETAIN and the publishing session.
//! The session takes the mark off every forwarded publish, decides with [`Forwarding::decide`]
//! what the client gets, and answers the router in the client's stead where the client's
//! exchange is shorter than the router's ([`StandIn`]). Topic aliases are the session's
//! ([`TopicAliases`]); the router's are off.
//!
//! No Local and Retain As Published are kept per filter, but rumqttd does not say which filter
//! a forwarded message matched, so a message is treated as matched by all of the client's
//! filters that match its topic.

use std::collections::{HashMap, HashSet};

use crate::acl::filter_within;
use crate::router::proto::{Packet, PublishProperties};
use crate::router::proto::{
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason,
};

/// The user property that carries a [`Mark`]: its NUL keeps any client from sending one.
const MARK: &str = "\0fleet-origin";

/// What a conformance client's publish says about itself on its way through the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mark {
    pub qos: u8,
    pub retain: bool,
    /// The router client id of the session that published it.
    pub origin: String,
}

impl Mark {
    /// Adds the mark to a publish's properties (as their last user property).
    pub fn put(&self, props: &mut Option<PublishProperties>) {
        let value = format!("{}{}{}", self.qos, self.retain as u8, self.origin);
        props
            .get_or_insert_with(PublishProperties::default)
            .user_properties
            .push((MARK.to_owned(), value));
    }

    /// Takes the mark off a forwarded publish's properties, if it has one; properties left
    /// empty are dropped, as the publisher sent none.
    pub fn take(props: &mut Option<PublishProperties>) -> Option<Mark> {
        let p = props.as_mut()?;
        let (name, _) = p.user_properties.last()?;
        if name != MARK {
            return None;
        }
        let (_, value) = p.user_properties.pop()?;
        if *p == PublishProperties::default() {
            *props = None;
        }
        let mut chars = value.chars();
        let qos = chars.next()?.to_digit(10)? as u8;
        let retain = chars.next()? == '1';
        Some(Mark {
            qos,
            retain,
            origin: chars.as_str().to_owned(),
        })
    }
}

/// What the client gets of a forwarded publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Drop,
    Deliver { qos: u8, retain: bool },
}

/// What the session answers the router for a delivery whose QoS the client's exchange does not
/// match (or that the client never sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StandIn {
    /// The client's own acknowledgement is the router's.
    Client,
    /// PUBACK now (a QoS 1 delivery the client gets at QoS 0, or not at all).
    PubAck,
    /// PUBREC now, and PUBCOMP to the router's PUBREL (QoS 2, client at QoS 0 or nothing).
    PubRec,
    /// The client's PUBACK stands for PUBREC, then PUBCOMP to the router's PUBREL (QoS 2,
    /// client at QoS 1).
    PubAckIsPubRec,
}

impl StandIn {
    pub fn of(router_qos: u8, client_qos: Option<u8>) -> StandIn {
        match (router_qos, client_qos) {
            (r, Some(c)) if r == c => StandIn::Client,
            (0, _) => StandIn::Client,
            (1, _) => StandIn::PubAck,
            (_, Some(1)) => StandIn::PubAckIsPubRec,
            _ => StandIn::PubRec,
        }
    }

    /// The acknowledgement to give the router now, if any.
    pub fn now(self, pkid: u16) -> Option<Packet> {
        match self {
            StandIn::PubAck => Some(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            StandIn::PubRec => Some(pubrec(pkid)),
            StandIn::Client | StandIn::PubAckIsPubRec => None,
        }
    }
}

pub(crate) fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(
        PubRec {
            pkid,
            reason: PubRecReason::Success,
        },
        None,
    )
}

pub(crate) fn pubrel(pkid: u16) -> Packet {
    Packet::PubRel(
        PubRel {
            pkid,
            reason: PubRelReason::Success,
        },
        None,
    )
}

pub(crate) fn pubcomp(pkid: u16) -> Packet {
    Packet::PubComp(
        PubComp {
            pkid,
            reason: PubCompReason::Success,
        },
        None,
    )
}

/// One linked session's forwarding state.
#[derive(Default)]
pub(crate) struct Forwarding {
    /// Filters subscribed with No Local (MQTT 5).
    no_local: Vec<String>,
    /// Filters subscribed with Retain As Published (MQTT 5).
    retain_as_published: Vec<String>,
    /// Router deliveries whose QoS 2 exchange the session finishes: PUBCOMP to its PUBREL.
    pub completes: HashSet<u16>,
    /// Router deliveries of QoS 2 the client has at QoS 1: its PUBACK stands for PUBREC.
    pub puback_is_pubrec: HashSet<u16>,
}

impl Forwarding {
    /// Notes a filter's options as subscribed (replacing what the filter had).
    pub fn subscribed(&mut self, filter: &str, no_local: bool, retain_as_published: bool) {
        self.unsubscribed(filter);
        if no_local {
            self.no_local.push(filter.to_owned());
        }
        if retain_as_published {
            self.retain_as_published.push(filter.to_owned());
        }
    }

    pub fn unsubscribed(&mut self, filter: &str) {
        self.no_local.retain(|f| f != filter);
        self.retain_as_published.retain(|f| f != filter);
    }

    /// What the client `me` gets of a message on `topic` the router forwards at `router_qos`,
    /// published with `mark`; `visible`: whether its rights let it see the topic at all.
    pub fn decide(
        &self,
        me: &str,
        topic: &str,
        router_qos: u8,
        mark: Option<&Mark>,
        visible: bool,
    ) -> Verdict {
        if !visible {
            return Verdict::Drop;
        }
        let matches = |filters: &[String]| filters.iter().any(|f| filter_within(topic, f));
        let Some(mark) = mark else {
            return Verdict::Deliver {
                qos: router_qos,
                retain: false,
            };
        };
        if mark.origin == me && matches(&self.no_local) {
            return Verdict::Drop;
        }
        Verdict::Deliver {
            qos: router_qos.min(mark.qos),
            retain: mark.retain && matches(&self.retain_as_published),
        }
    }
}

/// Server topic aliases (MQTT 5): the first message on a topic names it and its alias, later
/// ones send the alias alone; at most the client's Topic Alias Maximum, first come first kept.
#[derive(Default)]
pub(crate) struct TopicAliases {
    max: u16,
    assigned: HashMap<String, u16>,
}

impl TopicAliases {
    pub fn new(max: u16) -> Self {
        TopicAliases {
            max,
            assigned: HashMap::new(),
        }
    }

    /// The alias to send with `topic` and whether the topic may be left out.
    pub fn alias(&mut self, topic: &str) -> Option<(u16, bool)> {
        if let Some(a) = self.assigned.get(topic) {
            return Some((*a, true));
        }
        if self.assigned.len() >= self.max as usize {
            return None;
        }
        let a = self.assigned.len() as u16 + 1;
        self.assigned.insert(topic.to_owned(), a);
        Some((a, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(qos: u8, retain: bool, origin: &str) -> Mark {
        Mark {
            qos,
            retain,
            origin: origin.into(),
        }
    }

    #[test]
    fn a_mark_goes_through_and_leaves_the_properties_as_sent() {
        let mut none = None;
        mark(1, true, "~conf~a").put(&mut none);
        assert_eq!(Mark::take(&mut none), Some(mark(1, true, "~conf~a")));
        assert_eq!(none, None, "no properties were sent");
        let mut some = Some(PublishProperties {
            user_properties: vec![("a".into(), "2".into())],
            ..Default::default()
        });
        let sent = some.clone();
        mark(0, false, "~conf~b").put(&mut some);
        assert_eq!(Mark::take(&mut some), Some(mark(0, false, "~conf~b")));
        assert_eq!(some, sent);
        assert_eq!(Mark::take(&mut some), None, "unmarked");
    }

    #[test]
    fn verdicts() {
        let mut f = Forwarding::default();
        f.subscribed("nl/#", true, false);
        f.subscribed("rap/#", false, true);
        let me = "~conf~me";
        let cases = [
            // (topic, router QoS, mark, visible, verdict)
            (
                "a",
                2,
                Some(mark(0, false, "x")),
                true,
                Verdict::Deliver {
                    qos: 0,
                    retain: false,
                },
            ),
            (
                "a",
                2,
                Some(mark(1, true, "x")),
                true,
                Verdict::Deliver {
                    qos: 1,
                    retain: false,
                },
            ),
            (
                "a",
                1,
                Some(mark(2, false, "x")),
                true,
                Verdict::Deliver {
                    qos: 1,
                    retain: false,
                },
            ),
            (
                "a",
                1,
                None,
                true,
                Verdict::Deliver {
                    qos: 1,
                    retain: false,
                },
            ),
            ("a", 1, None, false, Verdict::Drop),
            ("nl/x", 1, Some(mark(1, false, me)), true, Verdict::Drop),
            (
                "nl/x",
                1,
                Some(mark(1, false, "x")),
                true,
                Verdict::Deliver {
                    qos: 1,
                    retain: false,
                },
            ),
            (
                "rap/x",
                1,
                Some(mark(1, true, "x")),
                true,
                Verdict::Deliver {
                    qos: 1,
                    retain: true,
                },
            ),
            (
                "rap/x",
                1,
                Some(mark(1, false, "x")),
                true,
                Verdict::Deliver {
                    qos: 1,
                    retain: false,
                },
            ),
        ];
        for (topic, rq, m, visible, want) in cases {
            assert_eq!(
                f.decide(me, topic, rq, m.as_ref(), visible),
                want,
                "{topic} {rq} {m:?}"
            );
        }
        f.unsubscribed("nl/#");
        assert_eq!(
            f.decide(me, "nl/x", 1, Some(&mark(1, false, me)), true),
            Verdict::Deliver {
                qos: 1,
                retain: false
            }
        );
    }

    #[test]
    fn stand_ins() {
        assert_eq!(StandIn::of(1, Some(1)), StandIn::Client);
        assert_eq!(StandIn::of(2, Some(2)), StandIn::Client);
        assert_eq!(StandIn::of(0, None), StandIn::Client);
        assert_eq!(StandIn::of(1, Some(0)), StandIn::PubAck);
        assert_eq!(StandIn::of(1, None), StandIn::PubAck);
        assert_eq!(StandIn::of(2, Some(0)), StandIn::PubRec);
        assert_eq!(StandIn::of(2, None), StandIn::PubRec);
        assert_eq!(StandIn::of(2, Some(1)), StandIn::PubAckIsPubRec);
    }

    #[test]
    fn aliases_name_a_topic_once_and_stop_at_the_maximum() {
        let mut a = TopicAliases::new(2);
        assert_eq!(a.alias("t/1"), Some((1, false)));
        assert_eq!(a.alias("t/1"), Some((1, true)));
        assert_eq!(a.alias("t/2"), Some((2, false)));
        assert_eq!(a.alias("t/3"), None);
        assert_eq!(a.alias("t/2"), Some((2, true)));
        assert_eq!(TopicAliases::new(0).alias("t"), None);
    }
}
