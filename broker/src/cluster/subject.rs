//! MQTT topics and filters as NATS subjects, so the backbone routes by interest: a node
//! receives only what one of its subscriptions can match.
//!
//! A topic `a/b/c` becomes `{prefix}.a.b.c`. A level made only of ASCII letters, digits, `_`,
//! `:` and `-` is written as it is; any other level (a device id with a `.`, an empty level,
//! bytes NATS reserves: `.`, `*`, `>`, whitespace) is written `~` followed by its bytes in
//! unpadded base64url, which never starts a plain level, so the mapping is one to one. A filter's
//! `+` becomes `*`, and its `#` becomes `>` (plus the parent subject itself, since MQTT's `#`
//! also matches its parent level).
//!
//! The mapping is a coarse pre-filter: the node that receives a message still matches it
//! against its subscriptions with MQTT's own rules (`$` topics, shared subscriptions).

use base64::Engine as _;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn plain(level: &str) -> bool {
    !level.is_empty()
        && level
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'))
}

fn push_level(out: &mut String, level: &str) {
    out.push('.');
    if plain(level) {
        out.push_str(level);
    } else {
        out.push('~');
        B64.encode_string(level.as_bytes(), out);
    }
}

/// The subject a topic name is published on.
pub fn topic_subject(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        push_level(&mut out, level);
    }
    out
}

/// The topic name a subject of [`topic_subject`] carries, or None for one it cannot have made.
pub fn subject_topic(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut topic = String::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        match token.strip_prefix('~') {
            Some(encoded) => {
                let bytes = B64.decode(encoded).ok()?;
                topic.push_str(std::str::from_utf8(&bytes).ok()?);
            }
            None if plain(token) => topic.push_str(token),
            None => return None,
        }
    }
    Some(topic)
}

/// The subjects that together receive every topic an MQTT filter can match (a shared
/// subscription's inner filter is used; `$share/{group}/` is the node's concern).
pub fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let inner = filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, inner)| inner);
    let mut out = String::with_capacity(prefix.len() + inner.len() + 8);
    out.push_str(prefix);
    let mut subjects = Vec::with_capacity(2);
    for level in inner.split('/') {
        match level {
            "#" => {
                // `a/#` matches `a` as well as everything below it.
                subjects.push(out.clone());
                out.push_str(".>");
                subjects.push(out);
                return subjects;
            }
            "+" => out.push_str(".*"),
            _ => push_level(&mut out, level),
        }
    }
    subjects.push(out);
    subjects
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        for topic in [
            "devices/dev-1/telemetry",
            "devices/dev.1/commands/ack",
            "cohorts/c:1/updates",
            "a//b",
            "/leading",
            "trailing/",
            "sp ace/st*r/gt>/~tilde/ünï",
            "$SYS/x",
        ] {
            let subject = topic_subject("fleet.mqtt", topic);
            assert!(
                !subject.contains(' ') && !subject.contains(['*', '>']),
                "{subject}"
            );
            assert!(subject.split('.').all(|t| !t.is_empty()), "{subject}");
            assert_eq!(
                subject_topic("fleet.mqtt", &subject).as_deref(),
                Some(topic)
            );
        }
        assert_eq!(
            topic_subject("fleet.mqtt", "devices/dev-1/telemetry"),
            "fleet.mqtt.devices.dev-1.telemetry"
        );
    }

    #[test]
    fn subjects_it_did_not_make_are_refused() {
        assert_eq!(subject_topic("fleet.mqtt", "other.devices.x"), None);
        assert_eq!(subject_topic("fleet.mqtt", "fleet.mqtt.a.b*c"), None);
        assert_eq!(subject_topic("fleet.mqtt", "fleet.mqtt.~!!"), None);
    }

    #[test]
    fn filters_cover_what_they_match() {
        assert_eq!(
            filter_subjects("p", "devices/+/telemetry"),
            ["p.devices.*.telemetry"]
        );
        assert_eq!(
            filter_subjects("p", "devices/#"),
            ["p.devices", "p.devices.>"]
        );
        assert_eq!(
            filter_subjects("p", "$share/g/devices/dev.1/#"),
            ["p.devices.~ZGV2LjE", "p.devices.~ZGV2LjE.>"]
        );
        assert_eq!(filter_subjects("p", "#"), ["p", "p.>"]);
    }
}
