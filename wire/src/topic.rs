use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("identifier is empty")]
    Empty,
    #[error("identifier is longer than {max} characters")]
    TooLong { max: usize },
    #[error("identifier must start with an ASCII letter or digit")]
    BadFirstChar,
    #[error("identifier contains {0:?}; only ASCII letters, digits and . _ : - are allowed")]
    BadChar(char),
}

/// Maximum length of a device id (1 leading + 127 following characters).
pub const MAX_ID_LEN: usize = 128;

fn validate_id(s: &str) -> Result<(), IdError> {
    let mut chars = s.chars();
    let first = chars.next().ok_or(IdError::Empty)?;
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { max: MAX_ID_LEN });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadFirstChar);
    }
    for c in chars {
        if !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')) {
            return Err(IdError::BadChar(c));
        }
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` against `^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate_id(s)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A device identity: the subject CN of the device certificate, the MQTT client id, and a
    /// topic segment. Anything that could change the shape of a topic (`/`, `+`, `#`, NUL) is
    /// refused by construction.
    DeviceId
);
id_type!(
    /// A cohort identity as it appears in `cohorts/{cohort_id}/...` topics.
    CohortId
);

/// Most levels an application topic has under `devices/{id}/app/`.
pub const MAX_APP_LEVELS: usize = 8;
/// Longest level of an application topic, bytes.
pub const MAX_APP_LEVEL_LEN: usize = 64;

/// Why a path under `devices/{id}/app/` is not a valid application topic (or filter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppPathError {
    #[error("no level under app/")]
    Empty,
    #[error("more than {max} levels under app/")]
    TooDeep { max: usize },
    #[error("an empty level under app/")]
    EmptyLevel,
    #[error("a level under app/ is longer than {max} bytes")]
    LevelTooLong { max: usize },
    #[error("a wildcard (+ or #) in a topic name, or not a whole level of a filter")]
    Wildcard,
    #[error("a control character (U+0000 to U+001F or U+007F) in a level under app/")]
    Control,
}

/// The levels of an application topic under `devices/{id}/app/`: 1 to [`MAX_APP_LEVELS`]
/// levels of 1 to [`MAX_APP_LEVEL_LEN`] bytes, none containing `+`, `#` or a control
/// character. So what a client names under `app/` is bounded, and the platform never has to
/// hold a topic longer than about 660 bytes for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppPath(String);

impl AppPath {
    pub fn parse(s: &str) -> Result<Self, AppPathError> {
        check_app_levels(s, false)?;
        Ok(Self(s.to_owned()))
    }

    /// Checks the part of a topic filter under `devices/{id}/app/` against the same bounds:
    /// `+` may stand for a level and `#` for the last one, each counted as a level.
    pub fn check_filter(s: &str) -> Result<(), AppPathError> {
        check_app_levels(s, true)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_app_levels(s: &str, filter: bool) -> Result<(), AppPathError> {
    if s.is_empty() {
        return Err(AppPathError::Empty);
    }
    let mut levels = 0;
    for level in s.split('/') {
        levels += 1;
        if levels > MAX_APP_LEVELS {
            return Err(AppPathError::TooDeep {
                max: MAX_APP_LEVELS,
            });
        }
        if filter && (level == "+" || level == "#") {
            continue;
        }
        if level.is_empty() {
            return Err(AppPathError::EmptyLevel);
        }
        if level.len() > MAX_APP_LEVEL_LEN {
            return Err(AppPathError::LevelTooLong {
                max: MAX_APP_LEVEL_LEN,
            });
        }
        if level.contains(['+', '#']) {
            return Err(AppPathError::Wildcard);
        }
        if level.chars().any(|c| c.is_ascii_control()) {
            return Err(AppPathError::Control);
        }
    }
    Ok(())
}

/// Why a topic string is not one the platform knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not part of the platform's namespace")]
    Unknown,
    #[error("topic names an invalid identifier: {0}")]
    BadId(#[from] IdError),
    #[error("invalid application topic: {0}")]
    BadAppPath(#[from] AppPathError),
}

/// Every topic of the wire contract. See `topics.md`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `devices/{id}/telemetry`: device -> platform, QoS 0/1, not retained. JSON object.
    Telemetry(DeviceId),
    /// `devices/{id}/state`: device -> platform, QoS 1, retained. [`crate::payload::ReportedState`].
    State(DeviceId),
    /// `devices/{id}/presence`: broker only, QoS 1, retained. [`crate::payload::Presence`].
    Presence(DeviceId),
    /// `devices/{id}/commands`: platform -> device, QoS 1. [`crate::payload::Command`].
    Commands(DeviceId),
    /// `devices/{id}/commands/ack`: device -> platform, QoS 1. [`crate::payload::CommandAck`].
    CommandAck(DeviceId),
    /// `devices/{id}/updates`: device -> platform, QoS 1. [`crate::update::UpdateStatus`].
    UpdateStatus(DeviceId),
    /// `devices/{id}/assignment`: platform -> device, QoS 1, retained.
    /// [`crate::payload::DeviceAssignment`]: the device's product and cohort. Only the platform
    /// publishes here, when an operator moves the device.
    Assignment(DeviceId),
    /// `cohorts/{cohort_id}/updates`: platform -> cohort, QoS 1, retained.
    /// [`crate::update::UpdateCommand`]. Only the platform's rollout engine publishes here.
    CohortUpdates(CohortId),
    /// `cohorts/{cohort_id}/commands`: services -> every device of a cohort, QoS 1.
    /// [`crate::payload::Command`].
    CohortCommands(CohortId),
    /// `devices/{id}/app/{path}`: the device's application subtree, both directions, QoS 0-2,
    /// never retained, any payload bytes. The platform routes these messages; it neither
    /// parses nor stores them.
    App(DeviceId, AppPath),
}

pub const DEVICES: &str = "devices";
pub const COHORTS: &str = "cohorts";
pub const APP: &str = "app";

impl Topic {
    /// Parses a concrete topic name (no wildcards).
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        if let Some((id, path)) = split_app(s) {
            return Ok(Topic::App(DeviceId::parse(id)?, AppPath::parse(path)?));
        }
        let parts: Vec<&str> = s.split('/').collect();
        Ok(match parts.as_slice() {
            [DEVICES, id, "telemetry"] => Topic::Telemetry(DeviceId::parse(id)?),
            [DEVICES, id, "state"] => Topic::State(DeviceId::parse(id)?),
            [DEVICES, id, "presence"] => Topic::Presence(DeviceId::parse(id)?),
            [DEVICES, id, "commands"] => Topic::Commands(DeviceId::parse(id)?),
            [DEVICES, id, "commands", "ack"] => Topic::CommandAck(DeviceId::parse(id)?),
            [DEVICES, id, "updates"] => Topic::UpdateStatus(DeviceId::parse(id)?),
            [DEVICES, id, "assignment"] => Topic::Assignment(DeviceId::parse(id)?),
            [COHORTS, id, "updates"] => Topic::CohortUpdates(CohortId::parse(id)?),
            [COHORTS, id, "commands"] => Topic::CohortCommands(CohortId::parse(id)?),
            _ => return Err(TopicError::Unknown),
        })
    }

    /// The device this topic belongs to, if it is under `devices/{id}/`.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Topic::Telemetry(d)
            | Topic::State(d)
            | Topic::Presence(d)
            | Topic::Commands(d)
            | Topic::CommandAck(d)
            | Topic::UpdateStatus(d)
            | Topic::Assignment(d)
            | Topic::App(d, _) => Some(d),
            Topic::CohortUpdates(_) | Topic::CohortCommands(_) => None,
        }
    }

    /// Whether the router must keep the last message on this topic for new subscribers.
    pub fn retained(&self) -> bool {
        matches!(
            self,
            Topic::State(_) | Topic::Presence(_) | Topic::Assignment(_) | Topic::CohortUpdates(_)
        )
    }

    /// Whether messages on this topic are events the fleet service must not lose: the broker
    /// acknowledges them only after the event bus has durably accepted them.
    pub fn is_durable_event(&self) -> bool {
        matches!(
            self,
            Topic::Telemetry(_)
                | Topic::State(_)
                | Topic::Presence(_)
                | Topic::CommandAck(_)
                | Topic::UpdateStatus(_)
        )
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Telemetry(d) => write!(f, "{DEVICES}/{d}/telemetry"),
            Topic::State(d) => write!(f, "{DEVICES}/{d}/state"),
            Topic::Presence(d) => write!(f, "{DEVICES}/{d}/presence"),
            Topic::Commands(d) => write!(f, "{DEVICES}/{d}/commands"),
            Topic::CommandAck(d) => write!(f, "{DEVICES}/{d}/commands/ack"),
            Topic::UpdateStatus(d) => write!(f, "{DEVICES}/{d}/updates"),
            Topic::Assignment(d) => write!(f, "{DEVICES}/{d}/assignment"),
            Topic::CohortUpdates(c) => write!(f, "{COHORTS}/{c}/updates"),
            Topic::CohortCommands(c) => write!(f, "{COHORTS}/{c}/commands"),
            Topic::App(d, p) => write!(f, "{DEVICES}/{d}/{APP}/{p}"),
        }
    }
}

/// `devices/{id}/app` or `devices/{id}/app/{rest}` as `(id, rest)`; `rest` is empty for the
/// former (which is no topic: it fails as an empty path).
fn split_app(s: &str) -> Option<(&str, &str)> {
    let (id, rest) = s
        .strip_prefix(DEVICES)?
        .strip_prefix('/')?
        .split_once('/')?;
    match rest.strip_prefix(APP)? {
        "" => Some((id, "")),
        path => Some((id, path.strip_prefix('/')?)),
    }
}

/// The part of a topic filter under `devices/{id or +}/app/`, if it reaches under `app/`.
pub fn app_filter_path(filter: &str) -> Option<&str> {
    split_app(filter)
        .map(|(_, path)| path)
        .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        let cases: &[(&str, bool)] = &[
            ("dev-1", true),
            ("A", true),
            ("sensor.eu:01_x-y", true),
            ("", false),
            ("-lead", false),
            (".lead", false),
            ("a/b", false),
            ("a+", false),
            ("a#", false),
            ("nul\0", false),
            ("space here", false),
            ("ünicode", false),
        ];
        for (s, ok) in cases {
            assert_eq!(DeviceId::parse(s).is_ok(), *ok, "{s:?}");
        }
        assert!(DeviceId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(
            DeviceId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { max: 128 })
        );
    }

    #[test]
    fn topics_round_trip() {
        let d = DeviceId::parse("dev-1").unwrap();
        let c = CohortId::parse("0190-abc").unwrap();
        for t in [
            Topic::Telemetry(d.clone()),
            Topic::State(d.clone()),
            Topic::Presence(d.clone()),
            Topic::Commands(d.clone()),
            Topic::CommandAck(d.clone()),
            Topic::Assignment(d.clone()),
            Topic::UpdateStatus(d.clone()),
            Topic::CohortUpdates(c.clone()),
            Topic::CohortCommands(c),
            Topic::App(d.clone(), AppPath::parse("cbor").unwrap()),
            Topic::App(d.clone(), AppPath::parse("a/b c/ü/$x/ack").unwrap()),
        ] {
            assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
        }
        assert_eq!(
            Topic::App(d, AppPath::parse("up/cbor").unwrap()).to_string(),
            "devices/dev-1/app/up/cbor"
        );
    }

    #[test]
    fn app_topics_are_bounded() {
        let deepest = ["l"; MAX_APP_LEVELS].join("/");
        let too_deep = ["l"; MAX_APP_LEVELS + 1].join("/");
        let longest = "x".repeat(MAX_APP_LEVEL_LEN);
        let too_long = "x".repeat(MAX_APP_LEVEL_LEN + 1);
        let cases: &[(&str, Result<(), AppPathError>)] = &[
            ("data", Ok(())),
            ("data/cbor/v2", Ok(())),
            (&deepest, Ok(())),
            (&longest, Ok(())),
            ("", Err(AppPathError::Empty)),
            (
                &too_deep,
                Err(AppPathError::TooDeep {
                    max: MAX_APP_LEVELS,
                }),
            ),
            (
                &too_long,
                Err(AppPathError::LevelTooLong {
                    max: MAX_APP_LEVEL_LEN,
                }),
            ),
            ("a//b", Err(AppPathError::EmptyLevel)),
            ("a/", Err(AppPathError::EmptyLevel)),
            ("/a", Err(AppPathError::EmptyLevel)),
            ("a/+", Err(AppPathError::Wildcard)),
            ("a/#", Err(AppPathError::Wildcard)),
            ("a+b", Err(AppPathError::Wildcard)),
            ("a\0b", Err(AppPathError::Control)),
            ("tab\there", Err(AppPathError::Control)),
            ("del\u{7f}", Err(AppPathError::Control)),
        ];
        for (path, want) in cases {
            assert_eq!(AppPath::parse(path).map(|_| ()), *want, "{path:?}");
            let topic = format!("devices/dev-1/app/{path}");
            assert_eq!(
                Topic::parse(&topic).map(|_| ()),
                want.clone().map_err(TopicError::from),
                "{topic:?}"
            );
        }
        assert_eq!(
            Topic::parse("devices/dev-1/app"),
            Err(TopicError::BadAppPath(AppPathError::Empty))
        );
        assert_eq!(
            Topic::parse("devices/bad id/app/x"),
            Err(TopicError::BadId(IdError::BadChar(' ')))
        );
    }

    #[test]
    fn app_filters_are_bounded_alike() {
        let deepest = format!("{}/#", ["+"; MAX_APP_LEVELS - 1].join("/"));
        let too_deep = format!("{}/#", ["+"; MAX_APP_LEVELS].join("/"));
        let cases: &[(&str, bool)] = &[
            ("#", true),
            ("+", true),
            ("+/cbor", true),
            ("up/#", true),
            (&deepest, true),
            (&too_deep, false),
            ("a//b", false),
            ("a+/b", false),
            (&"x".repeat(MAX_APP_LEVEL_LEN + 1), false),
        ];
        for (path, ok) in cases {
            assert_eq!(AppPath::check_filter(path).is_ok(), *ok, "{path:?}");
        }
        assert_eq!(app_filter_path("devices/+/app/#"), Some("#"));
        assert_eq!(app_filter_path("devices/d/app/a/b"), Some("a/b"));
        assert_eq!(app_filter_path("devices/d/app"), None);
        assert_eq!(app_filter_path("devices/d/apps/x"), None);
        assert_eq!(app_filter_path("devices/d/commands"), None);
        assert_eq!(app_filter_path("devices/#"), None);
    }

    #[test]
    fn unknown_topics() {
        for s in [
            "devices/dev-1",
            "devices/dev-1/other",
            "devices/+/telemetry",
            "devices/dev-1/telemetry/extra",
            "cohorts/x/other",
            "devices/dev-1/apps/x",
            "devices/dev-1/ap",
            "",
            "/devices/dev-1/telemetry",
        ] {
            assert!(Topic::parse(s).is_err(), "{s:?}");
        }
    }
}
