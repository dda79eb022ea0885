//! Capacity made explicit: how many connections one node holds, and how fast it takes new
//! ones. A node restart makes every device reconnect at once; beyond these budgets a client is
//! answered "come back later" in its CONNACK (and retries after its backoff) instead of the
//! node running out of files or flooding the database with first connections.
//!
//! Both checks are a few atomic operations or one short lock, taken once per connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Rejection;

/// Files the process keeps for itself (database, logs, listeners, the runtime) when the
/// connection limit is derived from the open-file limit.
pub const RESERVED_FILES: usize = 512;

/// Accepted sockets a node holds beyond `max_connections`, so that a client over the limit is
/// told so in its CONNACK (and backs off) rather than cut off. Beyond them a socket is closed
/// as soon as it is accepted, before its TLS handshake: in a reconnect storm, sockets waiting
/// for their handshake would otherwise take the files the process keeps for itself.
pub const ACCEPT_SLACK: usize = 256;

/// The node's connection and connection-rate budgets.
#[derive(Debug)]
pub(crate) struct Admission {
    max_connections: usize,
    /// Sockets held at most, handshakes included: above it, accepted sockets are closed at once.
    accept_cap: usize,
    open: Arc<AtomicUsize>,
    rate: Option<parking_lot::Mutex<TokenBucket>>,
}

/// Held by an accepted connection for as long as it lives; counts it.
#[derive(Debug)]
pub(crate) struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `max_connections` connections at most (0: what the open-file limit allows, less
    /// [`RESERVED_FILES`]); new connections at `rate_per_s` on average with bursts of `burst`
    /// (rate 0: no rate limit).
    pub fn new(max_connections: usize, rate_per_s: f64, burst: f64) -> Self {
        let files = open_file_limit();
        let max_connections = match max_connections {
            0 => files.saturating_sub(RESERVED_FILES).max(1),
            n => n,
        };
        Self {
            max_connections,
            accept_cap: accept_cap(max_connections, files),
            open: Arc::new(AtomicUsize::new(0)),
            rate: (rate_per_s > 0.0)
                .then(|| parking_lot::Mutex::new(TokenBucket::new(rate_per_s, burst.max(1.0)))),
        }
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Counts an accepted connection until the returned guard drops; `None` (and not counted)
    /// when the node already holds as many sockets as it may, handshakes included: the caller
    /// closes the socket at once.
    pub fn try_hold(&self) -> Option<Held> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.accept_cap {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Held(self.open.clone()))
    }

    /// Whether a connection that sent its CONNECT may go on: within the connection limit (it
    /// is already counted) and within the rate of new connections.
    pub fn admit(&self) -> Result<(), Rejection> {
        if self.open.load(Ordering::Relaxed) > self.max_connections {
            return Err(Rejection::ConnectionLimit);
        }
        match &self.rate {
            Some(bucket) if !bucket.lock().take(Instant::now()) => {
                Err(Rejection::ConnectRateExceeded)
            }
            _ => Ok(()),
        }
    }
}

/// Sockets held at most: `max_connections` and [`ACCEPT_SLACK`] more, but never into the half
/// of [`RESERVED_FILES`] nearest the open-file limit.
fn accept_cap(max_connections: usize, files: usize) -> usize {
    (max_connections + ACCEPT_SLACK)
        .min(files.saturating_sub(RESERVED_FILES / 2))
        .max(1)
}

/// The soft open-file limit of the process (after the binary raised it, if it did).
fn open_file_limit() -> usize {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
        .unwrap_or(1024)
}

/// `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_spends_its_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0);
        b.at = start;
        assert!((0..3).all(|_| b.take(start)));
        assert!(!b.take(start), "burst spent");
        assert!(!b.take(start + Duration::from_millis(50)), "half a token");
        assert!(
            b.take(start + Duration::from_millis(100)),
            "one token after 100 ms"
        );
        assert!(!b.take(start + Duration::from_millis(100)));
        // A long pause saves up no more than the burst.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
    }

    #[test]
    fn connections_over_the_limit_are_refused_until_one_ends() {
        let a = Admission::new(2, 0.0, 0.0);
        let first = a.try_hold().unwrap();
        let _second = a.try_hold().unwrap();
        assert_eq!(a.admit(), Ok(()));
        let third = a.try_hold().unwrap();
        assert_eq!(a.admit(), Err(Rejection::ConnectionLimit));
        drop(third);
        drop(first);
        assert_eq!(a.admit(), Ok(()));
    }

    #[test]
    fn sockets_beyond_the_slack_are_not_held() {
        let a = Admission::new(2, 0.0, 0.0);
        let held: Vec<_> = (0..2 + ACCEPT_SLACK)
            .map(|_| a.try_hold().expect("within the limit and its slack"))
            .collect();
        assert!(a.try_hold().is_none(), "beyond the slack");
        assert!(a.try_hold().is_none(), "a refusal holds nothing");
        drop(held);
        assert!(a.try_hold().is_some());
    }

    #[test]
    fn the_accept_cap_keeps_half_the_reserved_files() {
        assert_eq!(accept_cap(100, 20_000), 100 + ACCEPT_SLACK);
        let derived = 20_000 - RESERVED_FILES;
        assert_eq!(accept_cap(derived, 20_000), 20_000 - RESERVED_FILES / 2);
        // A limit configured above what the files allow is capped by the files.
        assert_eq!(accept_cap(50_000, 20_000), 20_000 - RESERVED_FILES / 2);
    }

    #[test]
    fn rate_limit_refuses_beyond_the_burst() {
        let a = Admission::new(100, 1.0, 2.0);
        assert_eq!(a.admit(), Ok(()));
        assert_eq!(a.admit(), Ok(()));
        assert_eq!(a.admit(), Err(Rejection::ConnectRateExceeded));
    }

    #[test]
    fn limit_zero_comes_from_the_open_file_limit() {
        let a = Admission::new(0, 0.0, 0.0);
        assert_eq!(
            a.max_connections(),
            open_file_limit().saturating_sub(RESERVED_FILES).max(1)
        );
    }
}
