//! Topic rights. Pure functions over the wire contract's [`Topic`]: no I/O, table-tested.
//!
//! A device may publish only its own telemetry, reported state, command acks and update
//! progress, and subscribe
//! only to its own commands and its cohort's topics. A filter is allowed only when every topic it
//! could ever match is allowed, so a wildcard can never reach another device. Backend services
//! read everything under `devices/` and `cohorts/`; operators and admins may also send commands
//! to a device or a cohort. The cohort's desired release (`cohorts/{id}/updates`) is published
//! only by the platform itself. Anything not allowed is denied.

use fleet_wire::{CohortId, DeviceId, Topic};

use crate::auth::ServiceRole;

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Principal {
    Device {
        id: DeviceId,
        cohort: Option<CohortId>,
    },
    Service {
        role: ServiceRole,
    },
}

/// Whether `principal` may publish to the concrete topic name `topic`.
pub fn may_publish(principal: &Principal, topic: &str) -> bool {
    Topic::parse(topic).is_ok_and(|t| may_publish_topic(principal, &t))
}

/// [`may_publish`] for a topic already parsed (the publish path parses once).
pub fn may_publish_topic(principal: &Principal, parsed: &Topic) -> bool {
    match principal {
        Principal::Device { id, .. } => match parsed {
            Topic::Telemetry(d)
            | Topic::State(d)
            | Topic::CommandAck(d)
            | Topic::UpdateStatus(d) => d == id,
            Topic::Presence(_)
            | Topic::Commands(_)
            | Topic::CohortUpdates(_)
            | Topic::CohortCommands(_) => false,
        },
        // The cohort's desired release is the rollout engine's alone (the platform publishes it
        // on the broker's own link), so no service can overwrite what a cohort installs.
        Principal::Service { role } => {
            role.may_command() && matches!(parsed, Topic::Commands(_) | Topic::CohortCommands(_))
        }
    }
}

/// Whether `principal` may subscribe to `filter` (wildcards and `$share/{group}/` allowed).
pub fn may_subscribe(principal: &Principal, filter: &str) -> bool {
    if !valid_filter(filter) {
        return false;
    }
    match principal {
        Principal::Device { id, cohort } => {
            // Devices get no shared subscriptions and nothing outside their own grants.
            if filter.starts_with('$') {
                return false;
            }
            let own = [
                format!("devices/{id}/commands"),
                format!("devices/{id}/commands/#"),
            ];
            if own.iter().any(|p| filter_within(filter, p)) {
                return true;
            }
            cohort
                .as_ref()
                .is_some_and(|c| filter_within(filter, &format!("cohorts/{c}/#")))
        }
        Principal::Service { .. } => {
            let inner = match filter.strip_prefix("$share/") {
                Some(rest) => match rest.split_once('/') {
                    Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => {
                        inner
                    }
                    _ => return false,
                },
                None => filter,
            };
            valid_filter(inner)
                && (filter_within(inner, "devices/#") || filter_within(inner, "cohorts/#"))
        }
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
    use super::*;

    fn device(id: &str, cohort: Option<&str>) -> Principal {
        Principal::Device {
            id: DeviceId::parse(id).unwrap(),
            cohort: cohort.map(|c| CohortId::parse(c).unwrap()),
        }
    }

    #[test]
    fn device_publish_rights() {
        let d = device("dev-1", Some("c1"));
        let cases = [
            ("devices/dev-1/telemetry", true),
            ("devices/dev-1/state", true),
            ("devices/dev-1/commands/ack", true),
            ("devices/dev-1/updates", true),
            ("devices/dev-2/updates", false),
            ("devices/dev-1/presence", false),
            ("devices/dev-1/commands", false),
            ("devices/dev-2/telemetry", false),
            ("devices/+/telemetry", false),
            ("devices/#", false),
            ("cohorts/c1/updates", false),
            ("cohorts/c1/commands", false),
            ("devices/dev-1/other", false),
            ("elsewhere", false),
            ("$SYS/x", false),
        ];
        for (topic, ok) in cases {
            assert_eq!(may_publish(&d, topic), ok, "{topic}");
        }
    }

    #[test]
    fn device_subscribe_rights() {
        let d = device("dev-1", Some("c1"));
        let cases = [
            ("devices/dev-1/commands", true),
            ("devices/dev-1/commands/#", true),
            ("devices/dev-1/commands/+", true),
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
        ];
        for (filter, ok) in cases {
            assert_eq!(may_subscribe(&d, filter), ok, "{filter}");
        }
        let no_cohort = device("dev-1", None);
        assert!(!may_subscribe(&no_cohort, "cohorts/c1/updates"));
    }

    #[test]
    fn service_rights() {
        let viewer = Principal::Service {
            role: ServiceRole::Viewer,
        };
        let operator = Principal::Service {
            role: ServiceRole::Operator,
        };
        assert!(may_subscribe(&viewer, "devices/+/telemetry"));
        assert!(may_subscribe(&viewer, "devices/#"));
        assert!(may_subscribe(&viewer, "$share/ingest/devices/+/telemetry"));
        assert!(may_subscribe(&viewer, "cohorts/+/updates"));
        assert!(!may_subscribe(&viewer, "#"));
        assert!(!may_subscribe(&viewer, "+/x/telemetry"));
        assert!(!may_subscribe(&viewer, "$share//devices/#"));
        assert!(!may_subscribe(&viewer, "$SYS/#"));
        assert!(!may_publish(&viewer, "devices/d1/commands"));
        assert!(may_publish(&operator, "devices/d1/commands"));
        assert!(may_publish(&operator, "cohorts/c1/commands"));
        assert!(!may_publish(&viewer, "cohorts/c1/commands"));
        assert!(
            !may_publish(&operator, "cohorts/c1/updates"),
            "the rollout engine's alone"
        );
        assert!(may_subscribe(&viewer, "devices/+/updates"));
        assert!(!may_publish(&operator, "devices/d1/telemetry"));
        assert!(!may_publish(&operator, "devices/d1/presence"));
        assert!(!may_publish(&operator, "devices/+/commands"));
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
