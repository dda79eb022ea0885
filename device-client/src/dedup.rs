//! Recently seen command ids. A QoS 1 command can arrive twice; the device runs it once and
//! answers a repeat with the acknowledgement it already gave. Pure.

use std::collections::{HashMap, VecDeque};

use fleet_wire::payload::CommandAck;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen<'a> {
    New,
    /// Still running; its acknowledgement will follow.
    InProgress,
    Done(&'a CommandAck),
}

#[derive(Debug)]
pub(crate) struct RecentCommands {
    order: VecDeque<String>,
    acks: HashMap<String, Option<CommandAck>>,
    capacity: usize,
}

impl RecentCommands {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            acks: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn seen(&self, id: &str) -> Seen<'_> {
        match self.acks.get(id) {
            None => Seen::New,
            Some(None) => Seen::InProgress,
            Some(Some(ack)) => Seen::Done(ack),
        }
    }

    /// Remembers `id` as running, forgetting the oldest id beyond capacity.
    pub(crate) fn begin(&mut self, id: &str) {
        if self.acks.insert(id.to_owned(), None).is_none() {
            self.order.push_back(id.to_owned());
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.acks.remove(&old);
                }
            }
        }
    }

    /// Records the acknowledgement of a command (remembering it if it was not yet).
    pub(crate) fn finish(&mut self, ack: &CommandAck) {
        self.begin(&ack.id);
        self.acks.insert(ack.id.clone(), Some(ack.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_wire::payload::CommandStatus;

    fn ack(id: &str) -> CommandAck {
        CommandAck {
            id: id.into(),
            status: CommandStatus::Succeeded,
            message: None,
        }
    }

    enum Op {
        Begin(&'static str),
        Finish(&'static str),
        Expect(&'static str, &'static str),
    }
    use Op::*;

    #[test]
    fn table() {
        let cases: &[(&str, usize, &[Op])] = &[
            ("new", 4, &[Expect("a", "new")]),
            (
                "running",
                4,
                &[Begin("a"), Expect("a", "running"), Expect("b", "new")],
            ),
            ("done", 4, &[Begin("a"), Finish("a"), Expect("a", "done")]),
            (
                "finish without begin",
                4,
                &[Finish("a"), Expect("a", "done")],
            ),
            (
                "oldest forgotten",
                2,
                &[
                    Begin("a"),
                    Begin("b"),
                    Begin("c"),
                    Expect("a", "new"),
                    Expect("b", "running"),
                    Expect("c", "running"),
                ],
            ),
            (
                "repeat begin does not evict",
                2,
                &[
                    Begin("a"),
                    Begin("b"),
                    Begin("b"),
                    Finish("b"),
                    Expect("a", "running"),
                    Expect("b", "done"),
                ],
            ),
        ];
        for (name, cap, ops) in cases {
            let mut r = RecentCommands::new(*cap);
            for op in *ops {
                match op {
                    Begin(id) => r.begin(id),
                    Finish(id) => r.finish(&ack(id)),
                    Expect(id, want) => {
                        let got = match r.seen(id) {
                            Seen::New => "new",
                            Seen::InProgress => "running",
                            Seen::Done(a) => {
                                assert_eq!(a.id, *id);
                                "done"
                            }
                        };
                        assert_eq!(got, *want, "{name}: {id}");
                    }
                }
            }
        }
    }
}
