//! Topic names, device and cohort ids (`wire/src/topic.rs`) and topic rights
//! (`broker/src/acl.rs`) over arbitrary strings.
//!
//! The input is text, one item a line: a device id, a cohort id, a flags line (`q` makes the
//! device quarantined; the first of `a`, `o`, `v` is the service key's role, the first of `O`,
//! `P`, `C` its scope), a topic filter, then up to 64 topics and topic levels (more lines are ignored).
//!
//! Checks, besides never panicking:
//! - an id that parses is exactly the string given, at most 128 characters, and holds nothing
//!   that could change a topic's shape (`/`, `+`, `#`, NUL); JSON reads ids by the same rule;
//! - a topic that parses prints back as the same string;
//! - `filter_within` is sound: whatever a filter matches, a pattern said to contain it matches
//!   too (against a matcher written from the MQTT specification);
//! - a device is never granted a filter that matches another device's or another cohort's
//!   topics, nor any topic outside its own commands and assignment and its cohort's topics
//!   (only its commands when quarantined), by the specification's matching or by the inbox's;
//! - a device may publish only its own telemetry, state, command acks and update reports (only
//!   command acks when quarantined);
//! - a service filter matches nothing outside the `devices` and `cohorts` trees; a service publishes
//!   only commands, and receives only what its key sees (organization, product, cohort).
#![no_main]

use broker::acl::{self, Places, Principal};
use broker::auth::{Place, Scope, ServicePrincipal, ServiceRole};
use fleet_wire::{CohortId, DeviceId, Topic};
use libfuzzer_sys::fuzz_target;

fleet_fuzz::bounded_allocations!();

/// MQTT topic matching as the specification states it (section 4.7), including `a/#`
/// matching `a`. No special case for `$` topics: it matches more, so it is the stricter judge.
fn spec_matches(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    for (i, level) in f.iter().enumerate() {
        if *level == "#" {
            return true;
        }
        match t.get(i) {
            Some(tl) if *level == "+" || level == tl => {}
            _ => return false,
        }
    }
    f.len() == t.len()
}

/// The world the rights are judged in: the device under test and its cohort belong to
/// organization `o1`, product `p1`; `other` (another device) and `k9` (another cohort) to
/// `o2`, product `p2`.
struct World<'a> {
    device: &'a DeviceId,
    cohort: Option<&'a CohortId>,
    other: &'a DeviceId,
}

const OTHER_COHORT: &str = "k9";

impl World<'_> {
    fn device_place(&self, id: &DeviceId) -> Option<Place<'static>> {
        if id == self.device {
            Some(Place {
                org_id: "o1",
                product_id: "p1",
                cohort_id: Some(self.cohort.map_or("", |_| "c-under-test")),
            })
        } else if id == self.other {
            Some(Place {
                org_id: "o2",
                product_id: "p2",
                cohort_id: Some(""),
            })
        } else {
            None
        }
    }

    fn cohort_place(&self, id: &CohortId) -> Option<Place<'static>> {
        if Some(id) == self.cohort {
            Some(Place {
                org_id: "o1",
                product_id: "p1",
                cohort_id: Some("c-under-test"),
            })
        } else if id.as_str() == OTHER_COHORT {
            Some(Place {
                org_id: "o2",
                product_id: "p2",
                cohort_id: Some(OTHER_COHORT),
            })
        } else {
            None
        }
    }
}

impl Places for World<'_> {
    fn device_in(&self, id: &DeviceId, sees: &dyn Fn(Place<'_>) -> bool) -> bool {
        self.device_place(id).is_some_and(sees)
    }
    fn cohort_in(&self, id: &CohortId, sees: &dyn Fn(Place<'_>) -> bool) -> bool {
        self.cohort_place(id).is_some_and(sees)
    }
}

fn check_id(s: &str) {
    let device = DeviceId::parse(s);
    let cohort = CohortId::parse(s);
    assert_eq!(
        device.is_ok(),
        cohort.is_ok(),
        "device and cohort ids share a rule"
    );
    let json = serde_json::from_value::<DeviceId>(serde_json::Value::String(s.to_owned()));
    assert_eq!(
        json.ok(),
        device.clone().ok(),
        "JSON reads ids by the same rule"
    );
    if let Ok(id) = device {
        assert_eq!(id.as_str(), s);
        // 128: the wire contract's longest id (`topics.md`).
        assert!(!s.is_empty() && s.len() <= 128);
        assert!(!s.contains(['/', '+', '#', '\0']), "{s:?}");
        let topic = Topic::Telemetry(id.clone());
        assert_eq!(Topic::parse(&topic.to_string()), Ok(topic));
    }
}

fn check_topic(s: &str) {
    if let Ok(topic) = Topic::parse(s) {
        assert_eq!(topic.to_string(), s, "a topic prints as it was parsed");
        assert!(!s.contains(['+', '#', '\0']));
        if let Some(d) = topic.device() {
            assert!(s.starts_with(&format!("devices/{d}/")));
        }
    }
}

/// Topics a filter matches: each wildcard level replaced by one of `levels` (`#` also by
/// nothing, as it matches the parent level).
fn instances(filter: &str, levels: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for l in levels {
        out.push(filter.replace('+', l).replace('#', l));
    }
    if let Some(parent) = filter.strip_suffix("/#") {
        out.push(parent.replace('+', "x"));
    }
    out
}

/// What a device may receive: its own commands (any depth below) and assignment, and unless
/// quarantined its cohort's tree (`cohorts/{id}/#`, which in MQTT matches `cohorts/{id}`
/// itself too: no platform topic, so nothing is ever published there).
fn device_may_hear(
    topic: &str,
    id: &DeviceId,
    cohort: Option<&CohortId>,
    quarantined: bool,
) -> bool {
    let in_tree = |root: &str| topic == root || topic.starts_with(&format!("{root}/"));
    in_tree(&format!("devices/{id}/commands"))
        || topic == format!("devices/{id}/assignment")
        || (!quarantined && in_tree(&format!("devices/{id}/app")))
        || (!quarantined && cohort.is_some_and(|c| in_tree(&format!("cohorts/{c}"))))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let device_line = lines.next().unwrap_or_default();
    let cohort_line = lines.next().unwrap_or_default();
    let flags = lines.next().unwrap_or_default();
    let filter = lines.next().unwrap_or_default();
    // At most 64 more lines: enough for any shape of topic rights, and the checks below grow
    // with the product of lines and candidate topics, which would slow every execution.
    let rest: Vec<&str> = lines.take(64).collect();

    for s in [device_line, cohort_line, filter].iter().chain(&rest) {
        check_id(s);
        check_topic(s);
    }

    let device = DeviceId::parse(device_line).unwrap_or_else(|_| DeviceId::parse("dev-1").unwrap());
    let cohort = CohortId::parse(cohort_line).ok();
    let other = DeviceId::parse(if device.as_str() == "dev-2" {
        "dev-3"
    } else {
        "dev-2"
    })
    .unwrap();
    let quarantined = flags.contains('q');
    let world = World {
        device: &device,
        cohort: cohort.as_ref(),
        other: &other,
    };

    // Candidate topics: the input's, every platform topic of the device, of another device,
    // of its cohort and of another one, and the filter's own instances.
    let mut levels: Vec<&str> = vec![
        "x",
        device.as_str(),
        other.as_str(),
        OTHER_COHORT,
        "commands",
        "ack",
        "app",
        "",
    ];
    levels.extend(cohort.as_ref().map(CohortId::as_str));
    levels.extend(rest.iter().filter(|l| !l.contains('/')).take(8));
    let mut topics: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    let other_cohort = CohortId::parse(OTHER_COHORT).unwrap();
    for d in [&device, &other] {
        for t in [
            Topic::Telemetry(d.clone()),
            Topic::State(d.clone()),
            Topic::Presence(d.clone()),
            Topic::Commands(d.clone()),
            Topic::CommandAck(d.clone()),
            Topic::UpdateStatus(d.clone()),
            Topic::Assignment(d.clone()),
        ] {
            topics.push(t.to_string());
        }
        topics.push(format!("devices/{d}/app/x"));
        topics.push(format!("devices/{d}/app/x/y"));
    }
    for c in cohort.iter().chain([&other_cohort]) {
        topics.push(Topic::CohortUpdates(c.clone()).to_string());
        topics.push(Topic::CohortCommands(c.clone()).to_string());
    }
    let inner = filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'))
        .map_or(filter, |(_, inner)| inner);
    topics.extend(instances(inner, &levels));
    topics.retain(|t| !t.contains(['+', '#']));

    let principal = Principal::Device {
        id: device.clone(),
        cohort: cohort.clone(),
        quarantined,
    };

    // Containment is sound for the device's grant patterns and the input's filters.
    let mut patterns = vec![
        format!("devices/{device}/commands/#"),
        format!("devices/{device}/commands"),
        format!("devices/{device}/assignment"),
        "devices/#".to_owned(),
        "cohorts/#".to_owned(),
    ];
    patterns.extend(cohort.iter().map(|c| format!("cohorts/{c}/#")));
    patterns.extend(
        rest.iter()
            .filter(|p| acl::valid_filter(p))
            .take(8)
            .map(|p| p.to_string()),
    );
    if acl::valid_filter(inner) {
        for p in &patterns {
            if acl::filter_within(inner, p) {
                for t in &topics {
                    if spec_matches(inner, t) {
                        assert!(
                            spec_matches(p, t),
                            "{inner:?} within {p:?}, yet {t:?} escapes"
                        );
                    }
                }
            }
        }
    }

    if !acl::valid_filter(filter) {
        assert!(!acl::may_subscribe(&principal, filter, &world));
    }
    if acl::may_subscribe(&principal, filter, &world) {
        assert!(!filter.starts_with('$'));
        for t in &topics {
            // The specification's matching, and the inbox's (`filter_within` of the topic).
            if spec_matches(filter, t) || acl::filter_within(t, filter) {
                assert!(
                    device_may_hear(t, &device, cohort.as_ref(), quarantined),
                    "device {device} (cohort {cohort:?}, quarantined {quarantined}) granted {filter:?}, which matches {t:?}"
                );
                if let Ok(parsed) = Topic::parse(t) {
                    if let Some(d) = parsed.device() {
                        assert_eq!(d, &device, "{filter:?} reaches another device's {t:?}");
                    }
                }
            }
        }
    }
    for t in &topics {
        if acl::may_publish(&principal, t, &world) {
            let parsed = Topic::parse(t).expect("published topics are platform topics");
            assert_eq!(parsed.device(), Some(&device), "{t:?} is another device's");
            let allowed = match parsed {
                Topic::CommandAck(_) => true,
                Topic::Telemetry(_) | Topic::State(_) | Topic::UpdateStatus(_) | Topic::App(..) => {
                    !quarantined
                }
                _ => false,
            };
            assert!(
                allowed,
                "device (quarantined {quarantined}) may publish {t:?}"
            );
        }
    }

    // A service key of organization o1.
    let role = match flags.chars().find(|c| matches!(c, 'a' | 'o' | 'v')) {
        Some('a') => ServiceRole::Admin,
        Some('o') => ServiceRole::Operator,
        _ => ServiceRole::Viewer,
    };
    let scope = match flags.chars().find(|c| matches!(c, 'O' | 'P' | 'C')) {
        Some('P') => Scope::Product {
            product_id: "p1".into(),
        },
        Some('C') => Scope::Cohort {
            product_id: "p1".into(),
            cohort_id: "c-under-test".into(),
        },
        _ => Scope::Org,
    };
    let key = ServicePrincipal {
        key_id: "k".into(),
        org_id: "o1".into(),
        role,
        scope,
    };
    let service = Principal::Service(key.clone());
    if acl::may_subscribe(&service, filter, &world) {
        for t in &topics {
            if spec_matches(inner, t) {
                // `devices/#` matches `devices` itself too (the level, not a platform topic;
                // what is delivered is narrowed per message by `may_receive`).
                let first = t.split('/').next().unwrap_or_default();
                assert!(
                    first == "devices" || first == "cohorts",
                    "service filter {filter:?} matches {t:?}"
                );
            }
        }
    }
    for t in &topics {
        let sees = Topic::parse(t).ok().and_then(|parsed| match &parsed {
            Topic::CohortUpdates(c) | Topic::CohortCommands(c) => world.cohort_place(c),
            _ => parsed.device().and_then(|d| world.device_place(d)),
        });
        let sees = sees.is_some_and(|place| key.sees(place));
        if acl::may_receive(&service, t, &world) {
            assert!(sees, "service key receives {t:?}, which it does not see");
        }
        if acl::may_publish(&service, t, &world) {
            assert!(sees && role.may_command(), "service key publishes to {t:?}");
            assert!(matches!(
                Topic::parse(t),
                Ok(Topic::Commands(_) | Topic::CohortCommands(_) | Topic::App(..))
            ));
        }
    }
});
