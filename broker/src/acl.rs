//! Topic rights. Pure functions over the wire contract's [`Topic`] and a [`Places`] lookup
//! (where a device or cohort sits: organization, product, cohort): no I/O, table-tested.
//!
//! A device may publish only its own telemetry, reported state, command acks, update progress
//! and application messages (`devices/{id}/app/...`), and subscribe only to its own commands,
//! assignment and application subtree and its cohort's topics; a quarantined device only to
//! its own commands, and it may publish only command acks. A filter is allowed only when every
//! topic it could ever match is allowed, so a wildcard can never reach another device. Backend
//! services read under `devices/` and `cohorts/` what their key sees (its organization,
//! narrowed by its product or cohort scope); operators and admins may also send commands, and
//! application messages, to a device or cohort their key sees. Nobody retains an application
//! message (the platform routes them, it keeps none), and a filter reaching under `app/` is
//! held to the same bounds as the topics there. Every service filter under `devices/` and
//! `cohorts/` is granted, and what it delivers is narrowed message by message
//! ([`may_receive`]): ids are not grouped by organization in the topic tree, and refusing a
//! filter that names another organization's device would reveal that it exists. The cohort's
//! desired release (`cohorts/{id}/updates`) is published only by the platform itself. Anything
//! not allowed is denied.
//!
//! The conformance listener's anonymous clients ([`Principal::Conformance`]) may use any topic
//! outside the platform's `devices/` and `cohorts/` trees: a filter inside them is refused, and
//! one that overlaps them (`#`, `+/x`) is granted but delivers nothing from them
//! ([`may_receive`]), so the listener can never read or write the fleet.

use std::sync::Arc;

use fleet_wire::{AppPath, CohortId, DeviceId, Topic};

use crate::auth::{Place, ServicePrincipal};

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Principal {
    Device {
        id: DeviceId,
        cohort: Option<CohortId>,
        /// Quarantined with `commands_only`: may only receive its commands and ack them.
        quarantined: bool,
    },
    Service(ServicePrincipal),
    /// An anonymous client of the conformance listener (loopback only, for conformance suites).
    Conformance(ConformanceRights),
}

/// What the conformance listener refuses besides the platform's trees.
#[derive(Debug, Clone, Default)]
pub struct ConformanceRights {
    /// Filters refused with the plain failure code (0x80), so that conformance suites can
    /// exercise a refused subscription.
    pub refused_filters: Arc<[String]>,
}

impl ConformanceRights {
    /// Whether `filter` is one the configuration lists as refused.
    pub fn lists(&self, filter: &str) -> bool {
        self.refused_filters.iter().any(|f| f == filter)
    }
}

/// Whether a topic name or filter lies in the platform's own trees (`devices/`, `cohorts/`).
fn in_platform_tree(topic: &str) -> bool {
    filter_within(topic, "devices/#") || filter_within(topic, "cohorts/#")
}

/// Looks up where devices and cohorts sit; the broker's registry answers from memory,
/// without allocating (the check runs on every delivery to a service).
pub trait Places {
    /// `sees` applied to the device's place; false for an unknown device. A device outside
    /// every cohort has cohort `""`, so only keys covering its whole product see it.
    fn device_in(&self, id: &DeviceId, sees: &dyn Fn(Place<'_>) -> bool) -> bool;
    /// `sees` applied to the cohort's place; false for an unknown cohort.
    fn cohort_in(&self, id: &CohortId, sees: &dyn Fn(Place<'_>) -> bool) -> bool;
}

/// Whether a service key sees the device or cohort a topic is about. Unknown ones are not seen.
fn service_sees(p: &ServicePrincipal, topic: &Topic, places: &dyn Places) -> bool {
    let sees = |place: Place<'_>| p.sees(place);
    match topic {
        Topic::Telemetry(d)
        | Topic::State(d)
        | Topic::CommandAck(d)
        | Topic::UpdateStatus(d)
        | Topic::Presence(d)
        | Topic::Assignment(d)
        | Topic::Commands(d)
        | Topic::App(d, _) => places.device_in(d, &sees),
        Topic::CohortUpdates(c) | Topic::CohortCommands(c) => places.cohort_in(c, &sees),
    }
}

/// Whether `principal` may publish to the concrete topic name `topic`.
pub fn may_publish(principal: &Principal, topic: &str, places: &dyn Places) -> bool {
    match principal {
        Principal::Conformance(_) => !topic.is_empty() && !in_platform_tree(topic),
        _ => Topic::parse(topic).is_ok_and(|t| may_publish_topic(principal, &t, places)),
    }
}

/// [`may_publish`] for a topic already parsed (the publish path parses once).
pub fn may_publish_topic(principal: &Principal, parsed: &Topic, places: &dyn Places) -> bool {
    match principal {
        Principal::Device {
            id,
            quarantined: true,
            ..
        } => matches!(parsed, Topic::CommandAck(d) if d == id),
        Principal::Device { id, .. } => match parsed {
            Topic::Telemetry(d)
            | Topic::State(d)
            | Topic::CommandAck(d)
            | Topic::UpdateStatus(d)
            | Topic::App(d, _) => d == id,
            Topic::Presence(_)
            | Topic::Assignment(_)
            | Topic::Commands(_)
            | Topic::CohortUpdates(_)
            | Topic::CohortCommands(_) => false,
        },
        // The cohort's desired release is the rollout engine's alone (the platform publishes it
        // on the broker's own link), so no service can overwrite what a cohort installs.
        Principal::Service(p) => {
            p.role.may_command()
                && matches!(
                    parsed,
                    Topic::Commands(_) | Topic::CohortCommands(_) | Topic::App(..)
                )
                && service_sees(p, parsed, places)
        }
        // A platform topic is never the conformance listener's.
        Principal::Conformance(_) => false,
    }
}

/// Whether a publish on `topic` may carry the retain flag. Application messages are routed,
/// never kept: a retained one per topic, on topics a client names freely, would let one
/// client make the platform hold ever more.
pub fn may_retain(topic: &Topic) -> bool {
    !matches!(topic, Topic::App(..))
}

/// Whether `principal` may subscribe to `filter` (wildcards and `$share/{group}/` allowed).
pub fn may_subscribe(principal: &Principal, filter: &str, _places: &dyn Places) -> bool {
    if !valid_filter(filter) {
        return false;
    }
    match principal {
        Principal::Device {
            id,
            cohort,
            quarantined,
        } => {
            // Devices get no shared subscriptions and nothing outside their own grants.
            if filter.starts_with('$') || !app_filter_bounded(filter) {
                return false;
            }
            let own = [
                format!("devices/{id}/commands"),
                format!("devices/{id}/commands/#"),
                format!("devices/{id}/assignment"),
            ];
            if own.iter().any(|p| filter_within(filter, p)) {
                return true;
            }
            !quarantined
                && (filter_within(filter, &format!("devices/{id}/app/#"))
                    || cohort
                        .as_ref()
                        .is_some_and(|c| filter_within(filter, &format!("cohorts/{c}/#"))))
        }
        Principal::Service(_) => {
            let Some(inner) = unshared(filter) else {
                return false;
            };
            if !valid_filter(inner) || !app_filter_bounded(inner) || !in_platform_tree(inner) {
                return false;
            }
            // What the filter delivers is narrowed per message by `may_receive`, named device or
            // not: refusing a filter that names a device of another organization would tell
            // the key that it exists.
            true
        }
        // `$` filters other than shared ones are the router's to refuse, which it does by
        // dropping the link; refused here instead.
        Principal::Conformance(rights) => {
            unshared(filter).is_some_and(|inner| {
                valid_filter(inner) && !in_platform_tree(inner) && !inner.starts_with('$')
            }) && !rights.lists(filter)
        }
    }
}

/// The filter a `$share/{group}/` subscription applies (the filter itself when not shared);
/// `None` for a malformed share name.
fn unshared(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => Some(inner),
            _ => None,
        },
        None => Some(filter),
    }
}

/// Whether a message on `topic`, matched by one of the principal's allowed filters, may be
/// delivered to it. Devices receive everything their (exact) filters match; services only what
/// their key sees.
pub fn may_receive(principal: &Principal, topic: &str, places: &dyn Places) -> bool {
    match principal {
        Principal::Device { .. } => true,
        Principal::Service(p) => Topic::parse(topic).is_ok_and(|t| service_sees(p, &t, places)),
        Principal::Conformance(_) => !in_platform_tree(topic),
    }
}

/// MQTT filter syntax: `#` only as the whole last level, `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return false;
        }
        if level.contains('+') && *level != "+" {
            return false;
        }
    }
    true
}

/// A filter that reaches under a device's `app/` stays within the bounds of the topics there
/// (depth, level length): a deeper or longer one could match nothing.
fn app_filter_bounded(filter: &str) -> bool {
    fleet_wire::app_filter_path(filter).is_none_or(|p| AppPath::check_filter(p).is_ok())
}

/// Whether every topic matched by `filter` is also matched by `pattern`.
pub fn filter_within(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('/');
    let mut p = pattern.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(fl)) => {
                if fl == "+" || pl != fl {
                    return false;
                }
            }
            // The filter ended first; it matches exactly this depth, as does the pattern only
            // if the pattern ends here too or continues with `#` (which matches the parent).
            (Some(pl), None) => return pl == "#" && p.next().is_none(),
            (None, Some(_)) => return false,
            (None, None) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::auth::{Scope, ServiceRole};

    /// Where a device or cohort sits, in the test world.
    #[derive(Debug, Clone)]
    struct Owner {
        org_id: String,
        product_id: String,
        cohort_id: Option<String>,
    }

    impl Owner {
        fn place(&self) -> Place<'_> {
            Place {
                org_id: &self.org_id,
                product_id: &self.product_id,
                cohort_id: Some(self.cohort_id.as_deref().unwrap_or("")),
            }
        }
    }

    /// Two organizations: `acme` with products p1 (cohorts c1, c2; devices d1 in c1, d2 in c2,
    /// d0 in none) and p2 (cohort c3, device d3); `other` with product q1 (cohort k1, device e1).
    struct World {
        devices: HashMap<String, Owner>,
        cohorts: HashMap<String, Owner>,
    }

    fn owner(org: &str, product: &str, cohort: Option<&str>) -> Owner {
        Owner {
            org_id: org.into(),
            product_id: product.into(),
            cohort_id: cohort.map(Into::into),
        }
    }

    fn world() -> World {
        World {
            devices: HashMap::from([
                ("d0".into(), owner("acme", "p1", None)),
                ("d1".into(), owner("acme", "p1", Some("c1"))),
                ("d2".into(), owner("acme", "p1", Some("c2"))),
                ("d3".into(), owner("acme", "p2", Some("c3"))),
                ("e1".into(), owner("other", "q1", Some("k1"))),
                ("dev-1".into(), owner("acme", "p1", Some("c1"))),
            ]),
            cohorts: HashMap::from([
                ("c1".into(), owner("acme", "p1", Some("c1"))),
                ("c2".into(), owner("acme", "p1", Some("c2"))),
                ("c3".into(), owner("acme", "p2", Some("c3"))),
                ("k1".into(), owner("other", "q1", Some("k1"))),
            ]),
        }
    }

    impl Places for World {
        fn device_in(&self, id: &DeviceId, sees: &dyn Fn(Place<'_>) -> bool) -> bool {
            self.devices
                .get(id.as_str())
                .is_some_and(|o| sees(o.place()))
        }
        fn cohort_in(&self, id: &CohortId, sees: &dyn Fn(Place<'_>) -> bool) -> bool {
            self.cohorts
                .get(id.as_str())
                .is_some_and(|o| sees(o.place()))
        }
    }

    fn device(id: &str, cohort: Option<&str>) -> Principal {
        Principal::Device {
            id: DeviceId::parse(id).unwrap(),
            cohort: cohort.map(|c| CohortId::parse(c).unwrap()),
            quarantined: false,
        }
    }

    fn service(role: ServiceRole, scope: Scope) -> Principal {
        Principal::Service(ServicePrincipal {
            key_id: "k".into(),
            org_id: "acme".into(),
            role,
            scope,
        })
    }

    fn org_service(role: ServiceRole) -> Principal {
        service(role, Scope::Org)
    }

    #[test]
    fn device_publish_rights() {
        let w = world();
        let d = device("dev-1", Some("c1"));
        let cases = [
            ("devices/dev-1/telemetry", true),
            ("devices/dev-1/state", true),
            ("devices/dev-1/commands/ack", true),
            ("devices/dev-1/updates", true),
            ("devices/dev-2/updates", false),
            ("devices/dev-1/presence", false),
            ("devices/dev-1/commands", false),
            ("devices/dev-1/assignment", false),
            ("devices/dev-2/telemetry", false),
            ("devices/+/telemetry", false),
            ("devices/#", false),
            ("cohorts/c1/updates", false),
            ("cohorts/c1/commands", false),
            ("devices/dev-1/other", false),
            ("elsewhere", false),
            ("$SYS/x", false),
            // Its application subtree, any depth within the bounds, and no one else's.
            ("devices/dev-1/app/up", true),
            ("devices/dev-1/app/cbor/v2/reading", true),
            ("devices/dev-1/app/a/b/c/d/e/f/g/h", true),
            ("devices/dev-1/app/a/b/c/d/e/f/g/h/i", false),
            ("devices/dev-1/app", false),
            ("devices/dev-1/app/", false),
            ("devices/dev-1/app//x", false),
            ("devices/dev-2/app/up", false),
            ("devices/e1/app/up", false),
            ("devices/+/app/up", false),
            ("devices/dev-1/apps/up", false),
        ];
        for (topic, ok) in cases {
            assert_eq!(may_publish(&d, topic, &w), ok, "{topic}");
        }
        let long = format!(
            "devices/dev-1/app/{}",
            "x".repeat(fleet_wire::MAX_APP_LEVEL_LEN)
        );
        assert!(may_publish(&d, &long, &w));
        assert!(!may_publish(&d, &format!("{long}x"), &w));
    }

    #[test]
    fn application_messages_are_never_retained() {
        for (topic, retain) in [
            ("devices/d1/app/up", false),
            ("devices/d1/app/a/b", false),
            ("devices/d1/telemetry", true),
            ("devices/d1/state", true),
            ("devices/d1/commands", true),
        ] {
            assert_eq!(may_retain(&Topic::parse(topic).unwrap()), retain, "{topic}");
        }
    }

    #[test]
    fn device_subscribe_rights() {
        let w = world();
        let d = device("dev-1", Some("c1"));
        let cases = [
            ("devices/dev-1/commands", true),
            ("devices/dev-1/commands/#", true),
            ("devices/dev-1/commands/+", true),
            ("devices/dev-1/assignment", true),
            ("devices/dev-2/assignment", false),
            ("devices/+/assignment", false),
            ("cohorts/c1/updates", true),
            ("cohorts/c1/commands", true),
            ("cohorts/c1/#", true),
            ("cohorts/c1/+", true),
            ("cohorts/c2/updates", false),
            ("cohorts/+/updates", false),
            ("cohorts/#", false),
            ("devices/dev-1/#", false),
            ("devices/dev-1/+", false),
            ("devices/+/commands", false),
            ("devices/dev-2/commands", false),
            ("devices/dev-1/telemetry", false),
            ("#", false),
            ("+/dev-1/commands", false),
            ("$share/g/devices/dev-1/commands", false),
            ("devices/dev-1/commands/#/x", false),
            ("devices/dev-1/comm+", false),
            ("", false),
            // Its own application subtree, wildcards within it, and nobody else's.
            ("devices/dev-1/app/#", true),
            ("devices/dev-1/app/down", true),
            ("devices/dev-1/app/+/cbor", true),
            ("devices/dev-1/app/+/+/+/+/+/+/+/#", true),
            ("devices/dev-1/app/+/+/+/+/+/+/+/+/#", false),
            ("devices/dev-1/app//x", false),
            ("devices/dev-1/app/a+", false),
            ("devices/dev-2/app/#", false),
            ("devices/dev-2/app/down", false),
            ("devices/+/app/#", false),
            ("devices/+/app/down", false),
            ("devices/dev-1/+/down", false),
            ("devices/dev-1/+/#", false),
            ("+/dev-1/app/#", false),
            ("$share/g/devices/dev-1/app/#", false),
        ];
        for (filter, ok) in cases {
            assert_eq!(may_subscribe(&d, filter, &w), ok, "{filter}");
        }
        let no_cohort = device("dev-1", None);
        assert!(!may_subscribe(&no_cohort, "cohorts/c1/updates", &w));
    }

    #[test]
    fn quarantined_device_only_hears_its_commands() {
        let w = world();
        let q = Principal::Device {
            id: DeviceId::parse("dev-1").unwrap(),
            cohort: Some(CohortId::parse("c1").unwrap()),
            quarantined: true,
        };
        assert!(may_subscribe(&q, "devices/dev-1/commands", &w));
        assert!(may_subscribe(&q, "devices/dev-1/commands/#", &w));
        assert!(!may_subscribe(&q, "cohorts/c1/updates", &w));
        assert!(!may_subscribe(&q, "cohorts/c1/#", &w));
        assert!(may_publish(&q, "devices/dev-1/commands/ack", &w));
        assert!(!may_subscribe(&q, "devices/dev-1/app/#", &w));
        for t in [
            "devices/dev-1/telemetry",
            "devices/dev-1/state",
            "devices/dev-1/updates",
            "devices/dev-1/app/up",
        ] {
            assert!(!may_publish(&q, t, &w), "{t}");
        }
    }

    #[test]
    fn service_rights() {
        let w = world();
        let viewer = org_service(ServiceRole::Viewer);
        let operator = org_service(ServiceRole::Operator);
        assert!(may_subscribe(&viewer, "devices/+/telemetry", &w));
        assert!(may_subscribe(&viewer, "devices/#", &w));
        assert!(may_subscribe(
            &viewer,
            "$share/ingest/devices/+/telemetry",
            &w
        ));
        assert!(may_subscribe(&viewer, "cohorts/+/updates", &w));
        assert!(!may_subscribe(&viewer, "#", &w));
        assert!(!may_subscribe(&viewer, "+/x/telemetry", &w));
        assert!(!may_subscribe(&viewer, "$share//devices/#", &w));
        assert!(!may_subscribe(&viewer, "$SYS/#", &w));
        assert!(!may_publish(&viewer, "devices/d1/commands", &w));
        assert!(may_publish(&operator, "devices/d1/commands", &w));
        assert!(may_publish(&operator, "cohorts/c1/commands", &w));
        assert!(!may_publish(&viewer, "cohorts/c1/commands", &w));
        assert!(
            !may_publish(&operator, "cohorts/c1/updates", &w),
            "the rollout engine's alone"
        );
        assert!(may_subscribe(&viewer, "devices/+/updates", &w));
        assert!(!may_publish(&operator, "devices/d1/telemetry", &w));
        assert!(!may_publish(&operator, "devices/d1/presence", &w));
        assert!(
            !may_publish(&operator, "devices/d1/assignment", &w),
            "where a device belongs changes only through the REST bridge"
        );
        assert!(may_subscribe(&viewer, "devices/+/assignment", &w));
        assert!(!may_publish(&operator, "devices/+/commands", &w));
        // Application messages: every role reads, operators and admins write.
        let admin = org_service(ServiceRole::Admin);
        for filter in [
            "devices/+/app/#",
            "devices/d1/app/up",
            "$share/g/devices/+/app/+/cbor",
        ] {
            assert!(may_subscribe(&viewer, filter, &w), "{filter}");
        }
        assert!(!may_subscribe(
            &viewer,
            "devices/+/app/+/+/+/+/+/+/+/+/#",
            &w
        ));
        assert!(!may_subscribe(&viewer, "devices/+/app//x", &w));
        assert!(!may_publish(&viewer, "devices/d1/app/down", &w));
        assert!(may_publish(&operator, "devices/d1/app/down", &w));
        assert!(may_publish(&admin, "devices/d1/app/a/b", &w));
        assert!(!may_publish(&operator, "devices/+/app/down", &w));
        assert!(!may_publish(&operator, "devices/d1/app", &w));
        assert!(may_receive(&viewer, "devices/d1/app/up", &w));
    }

    /// Every key kind against every device and cohort of both organizations.
    #[test]
    fn service_scopes() {
        use ServiceRole::{Operator, Viewer};
        let w = world();
        let p1 = || Scope::Product {
            product_id: "p1".into(),
        };
        let c1 = || Scope::Cohort {
            product_id: "p1".into(),
            cohort_id: "c1".into(),
        };
        // (key, devices it sees, cohorts it sees)
        let keys = [
            (
                service(Operator, Scope::Org),
                &["d0", "d1", "d2", "d3"][..],
                &["c1", "c2", "c3"][..],
            ),
            (
                service(Operator, p1()),
                &["d0", "d1", "d2"][..],
                &["c1", "c2"][..],
            ),
            (service(Operator, c1()), &["d1"][..], &["c1"][..]),
        ];
        for (key, devices, cohorts) in &keys {
            for d in ["d0", "d1", "d2", "d3", "e1", "unknown"] {
                let sees = devices.contains(&d);
                let what = format!("{key:?} / {d}");
                assert_eq!(
                    may_publish(key, &format!("devices/{d}/commands"), &w),
                    sees,
                    "{what}"
                );
                // Granted either way (a refusal would reveal that the device exists);
                // delivery is what the scope narrows.
                assert!(
                    may_subscribe(key, &format!("devices/{d}/telemetry"), &w),
                    "{what}"
                );
                assert!(
                    may_subscribe(key, &format!("$share/g/devices/{d}/#"), &w),
                    "{what}"
                );
                assert_eq!(
                    may_receive(key, &format!("devices/{d}/telemetry"), &w),
                    sees,
                    "{what}"
                );
                // Application messages follow the same rule both ways.
                assert_eq!(
                    may_publish(key, &format!("devices/{d}/app/down/cbor"), &w),
                    sees,
                    "{what}"
                );
                assert!(
                    may_subscribe(key, &format!("devices/{d}/app/#"), &w),
                    "{what}"
                );
                assert_eq!(
                    may_receive(key, &format!("devices/{d}/app/up"), &w),
                    sees,
                    "{what}"
                );
            }
            for c in ["c1", "c2", "c3", "k1", "unknown"] {
                let sees = cohorts.contains(&c);
                let what = format!("{key:?} / {c}");
                assert_eq!(
                    may_publish(key, &format!("cohorts/{c}/commands"), &w),
                    sees,
                    "{what}"
                );
                assert!(may_subscribe(key, &format!("cohorts/{c}/#"), &w), "{what}");
                assert_eq!(
                    may_receive(key, &format!("cohorts/{c}/updates"), &w),
                    sees,
                    "{what}"
                );
            }
            // Wildcards are allowed and narrowed per message.
            assert!(may_subscribe(key, "devices/+/telemetry", &w));
            assert!(may_subscribe(key, "cohorts/+/updates", &w));
        }
        let viewer = service(Viewer, p1());
        assert!(may_subscribe(&viewer, "devices/d1/telemetry", &w));
        assert!(!may_publish(&viewer, "devices/d1/commands", &w));
        assert!(!may_publish(&viewer, "devices/d1/app/down", &w));
        assert!(may_receive(&viewer, "devices/d1/app/up", &w));
        assert!(!may_receive(&viewer, "devices/d3/app/up", &w));
        assert!(!may_receive(&viewer, "devices/e1/telemetry", &w));
        assert!(!may_receive(&viewer, "not/a/topic", &w));
    }

    #[test]
    fn conformance_rights() {
        let w = world();
        let c = Principal::Conformance(ConformanceRights {
            refused_filters: vec!["test/nosubscribe".to_owned()].into(),
        });
        // (topic or filter, may publish, may subscribe, may receive)
        let cases = [
            ("TopicA/B", true, true, true),
            ("/TopicA", true, true, true),
            ("$TopicA/B", true, false, true),
            ("$SYS/#", false, false, true),
            ("#", false, true, true),
            ("+/+", false, true, true),
            ("$share/g/TopicA/#", false, true, false),
            ("$share//TopicA", false, false, false),
            ("test/nosubscribe", true, false, true),
            ("devices/d1/telemetry", false, false, false),
            ("devices/d1/commands", false, false, false),
            ("devices", false, false, false),
            ("devices/#", false, false, false),
            ("devices/+/commands", false, false, false),
            ("cohorts/c1/updates", false, false, false),
            ("$share/g/cohorts/#", false, false, false),
            ("devicesX/a", true, true, true),
            ("a/devices/b", true, true, true),
            ("a/#/b", false, false, true),
        ];
        for (name, publish, subscribe, receive) in cases {
            // Wildcards are never topic names (the frame check refuses them first).
            if !name.contains(['+', '#']) && !name.starts_with("$share/") {
                assert_eq!(may_publish(&c, name, &w), publish, "publish {name}");
            }
            assert_eq!(may_subscribe(&c, name, &w), subscribe, "subscribe {name}");
            if !name.contains(['+', '#']) && !name.starts_with("$share/") {
                assert_eq!(may_receive(&c, name, &w), receive, "receive {name}");
            }
        }
        let t = Topic::parse("devices/d1/commands").unwrap();
        assert!(!may_publish_topic(&c, &t, &w));
    }

    #[test]
    fn containment() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/#", true),
            ("a", "a/#", true),
            ("a/#", "a/#", true),
            ("a/+", "a/#", true),
            ("a/#", "a/+", false),
            ("a/+", "a/b", false),
            ("a/b/c", "a/+", false),
            ("a/b", "a/+", true),
            ("a", "a/+", false),
            ("#", "a/#", false),
        ];
        for (f, p, ok) in cases {
            assert_eq!(filter_within(f, p), ok, "{f} within {p}");
        }
    }
}
