//! Which QoS 1 publishes of the current session are still unacknowledged. Pure.
//!
//! The MQTT client assigns packet ids itself and reports each written publish as
//! `sent(pkid)`, in the order the publishes were submitted (one request queue per session);
//! a pkid still in use is reported as `deferred(pkid)` and later as `sent(pkid)` once its slot
//! frees. On a lost connection the client forgets everything of a clean session, so `lost()`
//! hands back every message not yet acknowledged, in submission order, to be sent again.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub(crate) struct Outbox<M> {
    next_seq: u64,
    unsent: VecDeque<(u64, M)>,
    deferred: Option<(u16, u64, M)>,
    inflight: HashMap<u16, (u64, M)>,
}

impl<M> Default for Outbox<M> {
    fn default() -> Self {
        Self {
            next_seq: 0,
            unsent: VecDeque::new(),
            deferred: None,
            inflight: HashMap::new(),
        }
    }
}

impl<M> Outbox<M> {
    /// A publish was handed to the client.
    pub(crate) fn submitted(&mut self, message: M) {
        self.unsent.push_back((self.next_seq, message));
        self.next_seq += 1;
    }

    /// The client wrote a publish with `pkid`. Returns false if there was nothing to match it
    /// with, which means the client and this outbox disagree.
    pub(crate) fn sent(&mut self, pkid: u16) -> bool {
        let entry = match self.deferred.take() {
            Some((p, seq, m)) if p == pkid => Some((seq, m)),
            other => {
                self.deferred = other;
                self.unsent.pop_front()
            }
        };
        match entry {
            Some(entry) => {
                self.inflight.insert(pkid, entry);
                true
            }
            None => false,
        }
    }

    /// The client holds the next publish back because `pkid` is still unacknowledged.
    pub(crate) fn deferred(&mut self, pkid: u16) -> bool {
        match self.unsent.pop_front() {
            Some((seq, m)) => {
                self.deferred = Some((pkid, seq, m));
                true
            }
            None => false,
        }
    }

    /// The broker acknowledged `pkid`.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<M> {
        self.inflight.remove(&pkid).map(|(_, m)| m)
    }

    /// The session ended: every unacknowledged message, oldest first.
    pub(crate) fn lost(&mut self) -> Vec<M> {
        let mut all: Vec<(u64, M)> = self.inflight.drain().map(|(_, e)| e).collect();
        if let Some((_, seq, m)) = self.deferred.take() {
            all.push((seq, m));
        }
        all.extend(self.unsent.drain(..));
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, m)| m).collect()
    }

    /// Messages handed to the client and not yet acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.unsent.len() + self.inflight.len() + usize::from(self.deferred.is_some())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Op {
        Submit(&'static str),
        Sent(u16, bool),
        Deferred(u16, bool),
        Acked(u16, Option<&'static str>),
        Lost(&'static [&'static str]),
        Len(usize),
    }
    use Op::*;

    #[test]
    fn table() {
        let cases: &[(&str, &[Op])] = &[
            (
                "in order",
                &[
                    Submit("a"),
                    Submit("b"),
                    Len(2),
                    Sent(1, true),
                    Sent(2, true),
                    Acked(1, Some("a")),
                    Acked(2, Some("b")),
                    Len(0),
                ],
            ),
            (
                "acks out of order",
                &[
                    Submit("a"),
                    Submit("b"),
                    Sent(1, true),
                    Sent(2, true),
                    Acked(2, Some("b")),
                    Acked(1, Some("a")),
                    Len(0),
                ],
            ),
            (
                "unknown ack",
                &[Submit("a"), Sent(1, true), Acked(9, None), Len(1)],
            ),
            (
                "duplicate ack",
                &[
                    Submit("a"),
                    Sent(1, true),
                    Acked(1, Some("a")),
                    Acked(1, None),
                ],
            ),
            (
                "sent with nothing submitted",
                &[Sent(1, false), Deferred(1, false), Len(0)],
            ),
            (
                "lost returns submission order",
                &[
                    Submit("a"),
                    Submit("b"),
                    Submit("c"),
                    Submit("d"),
                    Sent(7, true),
                    Sent(3, true),
                    Acked(3, Some("b")),
                    Lost(&["a", "c", "d"]),
                    Len(0),
                    Lost(&[]),
                ],
            ),
            (
                "collision: deferred then sent after the slot's ack",
                &[
                    Submit("a"),
                    Submit("b"),
                    Submit("c"),
                    Sent(1, true),
                    Deferred(1, true),
                    Len(3),
                    Acked(1, Some("a")),
                    Sent(1, true),
                    Sent(2, true),
                    Acked(1, Some("b")),
                    Acked(2, Some("c")),
                    Len(0),
                ],
            ),
            (
                "collision lost keeps order",
                &[
                    Submit("a"),
                    Submit("b"),
                    Submit("c"),
                    Sent(1, true),
                    Deferred(1, true),
                    Lost(&["a", "b", "c"]),
                ],
            ),
            (
                "sent for another pkid while deferred",
                &[
                    Submit("a"),
                    Submit("b"),
                    Submit("c"),
                    Sent(1, true),
                    Deferred(1, true),
                    Sent(2, true),
                    Acked(2, Some("c")),
                    Acked(1, Some("a")),
                    Sent(1, true),
                    Acked(1, Some("b")),
                ],
            ),
        ];
        for (name, ops) in cases {
            let mut o = Outbox::default();
            for op in *ops {
                match op {
                    Submit(m) => o.submitted(*m),
                    Sent(p, ok) => assert_eq!(o.sent(*p), *ok, "{name}: {op:?}"),
                    Deferred(p, ok) => assert_eq!(o.deferred(*p), *ok, "{name}: {op:?}"),
                    Acked(p, want) => assert_eq!(o.acked(*p), *want, "{name}: {op:?}"),
                    Lost(want) => assert_eq!(&o.lost(), want, "{name}: {op:?}"),
                    Len(n) => {
                        assert_eq!(o.len(), *n, "{name}: {op:?}");
                        assert_eq!(o.is_empty(), *n == 0, "{name}: {op:?}");
                    }
                }
            }
        }
    }
}
