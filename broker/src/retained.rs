//! The node's retained messages, kept by the broker instead of the router.
//!
//! rumqttd walks every retained message on every SUBSCRIBE (and sends at most as many as the
//! link has free inflight slots). With a retained presence per device that made each SUBSCRIBE
//! cost a scan of the fleet. Here retained messages live in a trie of topic levels, so a
//! SUBSCRIBE visits only the branches its filter can match: an exact filter costs its depth,
//! `devices/+/presence` the devices, never the other topics. The router never sees a retain
//! flag (the session clears it), so it keeps no retained copy.
//!
//! **Invariants**: an empty payload deletes (and keeps nothing, not even the empty branch);
//! the lock is never held across an `.await` (callers get `Arc`s to the messages); a filter
//! that begins with a wildcard never matches a topic that begins with `$`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::router::proto::PublishProperties;

/// A message to deliver: shared by everyone it goes to.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// MQTT 5 properties, as published.
    pub props: Option<PublishProperties>,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.message.is_none() && self.children.is_empty()
    }
}

#[derive(Default)]
pub(crate) struct Retained {
    root: RwLock<Node>,
    count: std::sync::atomic::AtomicUsize,
}

impl Retained {
    /// Stores `message` as its topic's retained message; an empty payload removes it.
    pub fn set(&self, message: Arc<Message>) {
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let levels: Vec<&str> = message.topic.split('/').collect();
        let delta = if message.payload.is_empty() {
            -(remove(&mut root, &levels) as isize)
        } else {
            let mut node = &mut *root;
            for level in &levels {
                node = node.children.entry((*level).into()).or_default();
            }
            node.message.replace(message).is_none() as isize
        };
        drop(root);
        use std::sync::atomic::Ordering::Relaxed;
        match delta {
            1 => {
                self.count.fetch_add(1, Relaxed);
            }
            -1 => {
                self.count.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
    }

    /// The retained messages a filter matches (without `$share/{group}/`).
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        collect(&root, &levels, true, &mut out);
        out
    }

    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Removes the message at `levels` and prunes the branches left empty; returns whether there
/// was one.
fn remove(node: &mut Node, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove(child, rest);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn collect(node: &Node, levels: &[&str], top: bool, out: &mut Vec<Arc<Message>>) {
    let Some((first, rest)) = levels.split_first() else {
        out.extend(node.message.clone());
        return;
    };
    match *first {
        "#" => {
            // `a/#` matches `a` itself too.
            out.extend(node.message.clone());
            all(node, top, out);
        }
        "+" => {
            for (name, child) in &node.children {
                if !(top && name.starts_with('$')) {
                    collect(child, rest, false, out);
                }
            }
        }
        level => {
            if let Some(child) = node.children.get(level) {
                collect(child, rest, false, out);
            }
        }
    }
}

fn all(node: &Node, top: bool, out: &mut Vec<Arc<Message>>) {
    for (name, child) in &node.children {
        if top && name.starts_with('$') {
            continue;
        }
        out.extend(child.message.clone());
        all(child, false, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_owned()),
            qos: 1,
            props: None,
        })
    }

    fn topics(r: &Retained, filter: &str) -> Vec<String> {
        let mut t: Vec<String> = r.matching(filter).iter().map(|m| m.topic.clone()).collect();
        t.sort();
        t
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        let r = Retained::default();
        for t in [
            "devices/a/presence",
            "devices/a/state",
            "devices/b/presence",
            "devices/a/commands/x",
            "cohorts/c/updates",
            "$SYS/x",
            "devices",
        ] {
            r.set(msg(t, "p"));
        }
        assert_eq!(r.len(), 7);
        assert_eq!(topics(&r, "devices/a/presence"), ["devices/a/presence"]);
        assert_eq!(
            topics(&r, "devices/+/presence"),
            ["devices/a/presence", "devices/b/presence"]
        );
        assert_eq!(
            topics(&r, "devices/a/#"),
            [
                "devices/a/commands/x",
                "devices/a/presence",
                "devices/a/state"
            ]
        );
        assert_eq!(
            topics(&r, "devices/#").len(),
            5,
            "`devices/#` includes `devices`"
        );
        assert_eq!(topics(&r, "#").len(), 6, "`#` never matches `$` topics");
        assert_eq!(topics(&r, "+/x"), Vec::<String>::new());
        assert_eq!(topics(&r, "$SYS/#"), ["$SYS/x"]);
        assert_eq!(topics(&r, "devices/a/commands"), Vec::<String>::new());
        assert_eq!(topics(&r, "devices/+"), Vec::<String>::new());
    }

    #[test]
    fn empty_payload_deletes_and_prunes() {
        let r = Retained::default();
        r.set(msg("devices/a/state", "1"));
        r.set(msg("devices/a/state", "2"));
        assert_eq!(r.len(), 1);
        assert_eq!(&r.matching("devices/a/state")[0].payload[..], b"2");
        r.set(msg("devices/a/state", ""));
        r.set(msg("devices/zz/state", ""));
        assert_eq!(r.len(), 0);
        assert!(r.root.read().unwrap().is_empty(), "empty branches stay");
    }
}
