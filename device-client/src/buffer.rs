//! The bounded telemetry buffer that holds messages while the device is offline (or while the
//! in-flight window is full). When full, the oldest message is dropped and counted. Pure.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub(crate) struct OfflineBuffer<T> {
    items: VecDeque<T>,
    capacity: usize,
    dropped: u64,
}

impl<T> OfflineBuffer<T> {
    /// A capacity of 0 keeps nothing: every message offered while offline is dropped.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::with_capacity(capacity.min(1024)),
            capacity,
            dropped: 0,
        }
    }

    /// Appends `item` as the newest message, dropping the oldest ones beyond capacity.
    pub(crate) fn push(&mut self, item: T) {
        self.items.push_back(item);
        self.trim();
    }

    /// Puts messages that were sent but never acknowledged back in front of the newer ones,
    /// in their original order. They are the oldest, so they are the first to go when full.
    pub(crate) fn requeue(&mut self, items: Vec<T>) {
        for item in items.into_iter().rev() {
            self.items.push_front(item);
        }
        self.trim();
    }

    pub(crate) fn pop(&mut self) -> Option<T> {
        self.items.pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Messages dropped so far because the buffer was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    fn trim(&mut self) {
        while self.items.len() > self.capacity {
            self.items.pop_front();
            self.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Op {
        Push(u32),
        Requeue(&'static [u32]),
        Pop(Option<u32>),
    }
    use Op::*;

    /// Name, capacity, operations, contents afterwards, drops.
    type Case = (&'static str, usize, &'static [Op], &'static [u32], u64);

    #[test]
    fn table() {
        let cases: &[Case] = &[
            (
                "fifo",
                3,
                &[Push(1), Push(2), Pop(Some(1)), Push(3)],
                &[2, 3],
                0,
            ),
            (
                "drop oldest",
                3,
                &[Push(1), Push(2), Push(3), Push(4), Push(5)],
                &[3, 4, 5],
                2,
            ),
            (
                "requeue in front",
                5,
                &[Push(3), Push(4), Requeue(&[1, 2])],
                &[1, 2, 3, 4],
                0,
            ),
            (
                "requeued are oldest when full",
                3,
                &[Push(3), Push(4), Requeue(&[1, 2])],
                &[2, 3, 4],
                1,
            ),
            (
                "requeue larger than capacity",
                2,
                &[Requeue(&[1, 2, 3, 4])],
                &[3, 4],
                2,
            ),
            ("zero capacity", 0, &[Push(1), Push(2), Pop(None)], &[], 2),
            (
                "pop empty",
                2,
                &[Pop(None), Push(7), Pop(Some(7)), Pop(None)],
                &[],
                0,
            ),
        ];
        for (name, cap, ops, want, dropped) in cases {
            let mut b = OfflineBuffer::new(*cap);
            for op in *ops {
                match op {
                    Push(v) => b.push(*v),
                    Requeue(vs) => b.requeue(vs.to_vec()),
                    Pop(want) => assert_eq!(b.pop(), *want, "{name}"),
                }
            }
            assert_eq!(b.len(), want.len(), "{name}");
            assert_eq!(b.is_empty(), want.is_empty(), "{name}");
            let got: Vec<u32> = std::iter::from_fn(|| b.pop()).collect();
            assert_eq!(&got, want, "{name}");
            assert_eq!(b.dropped(), *dropped, "{name}");
        }
    }
}
