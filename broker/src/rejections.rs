//! The most recent refused connections, kept in memory for operators: a device's detail shows
//! its own, and the fleet service turns bursts of them into audit events.
//!
//! # Invariants
//! - Bounded: the oldest attempt is forgotten first. Every attempt gets a sequence number, so a
//!   reader that fell behind knows how many it missed.
//! - Recording takes one short lock and allocates one entry; nothing is written to disk on the
//!   connect path.

use std::collections::VecDeque;

use fleet_wire::DeviceId;

use crate::metrics::Rejection;

/// One refused connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedAttempt {
    /// 1 for the first attempt since the broker started, then one more per attempt.
    pub seq: u64,
    pub at_ms: i64,
    /// The device the certificate named, when it got that far.
    pub device_id: Option<DeviceId>,
    /// The organization of that device, when it is registered.
    pub org_id: Option<String>,
    pub reason: Rejection,
    pub remote_addr: String,
}

pub struct RecentRejections {
    capacity: usize,
    inner: parking_lot::Mutex<(u64, VecDeque<RejectedAttempt>)>,
}

impl RecentRejections {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: parking_lot::Mutex::new((0, VecDeque::with_capacity(capacity.max(1)))),
        }
    }

    pub(crate) fn record(
        &self,
        device_id: Option<DeviceId>,
        org_id: Option<String>,
        reason: Rejection,
        remote_addr: String,
    ) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let mut inner = self.inner.lock();
        inner.0 += 1;
        let seq = inner.0;
        if inner.1.len() == self.capacity {
            inner.1.pop_front();
        }
        inner.1.push_back(RejectedAttempt {
            seq,
            at_ms,
            device_id,
            org_id,
            reason,
            remote_addr,
        });
    }

    /// The sequence number of the newest attempt (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().0
    }

    /// The attempts after `seq` still kept, oldest first, and the sequence number of the newest.
    pub fn since(&self, seq: u64) -> (Vec<RejectedAttempt>, u64) {
        let inner = self.inner.lock();
        let newer = inner.1.iter().filter(|a| a.seq > seq).cloned().collect();
        (newer, inner.0)
    }

    /// Up to `limit` of the device's most recent refused attempts, newest first.
    pub fn of_device(&self, id: &DeviceId, limit: usize) -> Vec<RejectedAttempt> {
        let inner = self.inner.lock();
        inner
            .1
            .iter()
            .rev()
            .filter(|a| a.device_id.as_ref() == Some(id))
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered() {
        let r = RecentRejections::new(3);
        let d = DeviceId::parse("d-1").unwrap();
        for n in 0..5 {
            let id = (n % 2 == 0).then(|| d.clone());
            r.record(id, None, Rejection::PinMismatch, format!("127.0.0.1:{n}"));
        }
        let (kept, last) = r.since(0);
        assert_eq!(last, 5);
        assert_eq!(kept.iter().map(|a| a.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(r.since(4).0.len(), 1);
        let mine = r.of_device(&d, 10);
        assert_eq!(mine.iter().map(|a| a.seq).collect::<Vec<_>>(), [5, 3]);
    }
}
