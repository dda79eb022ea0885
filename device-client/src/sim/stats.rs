//! Counting what happened: failure reasons, per-device sequence tracking (loss and
//! duplicates), rates, and the client process's memory and CPU from `/proc/self`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{ConnectError, DisconnectCause};

/// Distinct failure reasons kept before the rest are counted as `other`.
const MAX_REASONS: usize = 24;

/// A short, stable label for why a connection failed: `tls alert: UnknownCA`,
/// `connack 0x87 (not authorized)`, `disconnect 0x8E (session taken over)`, `timeout: ...`,
/// `i/o: ...`, `protocol: ...`.
pub(crate) fn failure_reason(e: &ConnectError) -> String {
    match e {
        ConnectError::Refused(r) => format!("connack 0x{:02X} ({})", r.code(), r.text()),
        ConnectError::Disconnected(DisconnectCause::Unknown) => {
            "i/o: connection closed by the broker".to_owned()
        }
        ConnectError::Disconnected(cause) => {
            let text = match cause {
                DisconnectCause::SessionTakenOver => "session taken over",
                DisconnectCause::AdministrativeAction => "administrative action",
                DisconnectCause::ServerShuttingDown => "server shutting down",
                DisconnectCause::KeepAliveTimeout => "keepalive timeout",
                DisconnectCause::NotAuthorized => "not authorized",
                DisconnectCause::Other(_) | DisconnectCause::Unknown => "other",
            };
            format!("disconnect 0x{:02X} ({text})", cause.code())
        }
        ConnectError::Tls(msg) => match msg.strip_prefix("received fatal alert: ") {
            Some(alert) => format!("tls alert: {alert}"),
            None => format!("tls: {}", truncate(msg)),
        },
        ConnectError::Timeout(what) => format!("timeout: {what}"),
        ConnectError::Network(msg) => format!("i/o: {}", truncate(msg)),
        ConnectError::Protocol(msg) => format!("protocol: {}", truncate(msg)),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Counts by reason, with at most [`MAX_REASONS`] distinct keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Reasons(BTreeMap<String, u64>);

impl Reasons {
    pub(crate) fn add(&mut self, reason: String) {
        let key = if self.0.len() >= MAX_REASONS && !self.0.contains_key(&reason) {
            "other".to_owned()
        } else {
            reason
        };
        *self.0.entry(key).or_default() += 1;
    }

    pub(crate) fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub(crate) fn into_map(self) -> BTreeMap<String, u64> {
        self.0
    }
}

/// Which sequence numbers of one device arrived: a growable bit set.
#[derive(Debug, Default, Clone)]
pub(crate) struct SeqSet {
    bits: Vec<u64>,
    distinct: u64,
    duplicates: u64,
}

impl SeqSet {
    /// Largest sequence number accepted; beyond it a message counts as foreign.
    pub(crate) const MAX_SEQ: u64 = 1 << 24;

    /// Marks `seq` as received; returns whether it was new.
    pub(crate) fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let mask = 1u64 << bit;
        if self.bits[word] & mask != 0 {
            self.duplicates += 1;
            false
        } else {
            self.bits[word] |= mask;
            self.distinct += 1;
            true
        }
    }

    pub(crate) fn distinct(&self) -> u64 {
        self.distinct
    }

    pub(crate) fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// How many sequence numbers are in `self` and not in `other`.
    pub(crate) fn count_not_in(&self, other: &SeqSet) -> u64 {
        self.bits
            .iter()
            .enumerate()
            .map(|(i, w)| u64::from((w & !other.bits.get(i).copied().unwrap_or(0)).count_ones()))
            .sum()
    }

    /// Of the sequence numbers `0..sent`, how many never arrived.
    pub(crate) fn missing_below(&self, sent: u64) -> u64 {
        let mut have = 0u64;
        let full_words = (sent / 64) as usize;
        for w in self.bits.iter().take(full_words) {
            have += u64::from(w.count_ones());
        }
        let rest = sent % 64;
        if rest > 0 {
            if let Some(w) = self.bits.get(full_words) {
                have += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        sent - have
    }
}

/// `n` events over `elapsed`, per second; 0 for an empty interval.
pub(crate) fn per_second(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// A reading of the client process's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Resident set size now (VmRSS), bytes.
    pub rss: u64,
    /// Peak resident set size so far (VmHWM), bytes.
    pub rss_peak: u64,
    /// User + system CPU time of the whole process.
    pub cpu: Duration,
}

/// Clock ticks per second of `/proc/self/stat` (USER_HZ, 100 on every Linux ABI).
const USER_HZ: u64 = 100;

impl Usage {
    /// Reads `/proc/self/status` and `/proc/self/stat`; zeros where they are unavailable
    /// (not Linux).
    pub(crate) fn now() -> Usage {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        Usage {
            rss: status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
            rss_peak: status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
            cpu: stat_cpu(&stat).unwrap_or_default(),
        }
    }
}

/// A `Name:   1234 kB` line of `/proc/self/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// utime + stime of `/proc/self/stat` (fields 14 and 15; the command name in field 2 may
/// contain spaces and parentheses, so fields are counted after its last `)`).
fn stat_cpu(stat: &str) -> Option<Duration> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// The soft limit on open files (`Max open files` of `/proc/self/limits`).
/// Open files kept for everything but the devices' sockets: standard streams, the runtime,
/// certificate files, observer and publisher sessions, DNS.
const RESERVED_FILES: u64 = 64;

/// How many simulated devices (one socket each) an open-file limit of `limit` allows.
pub fn devices_allowed(limit: u64) -> u64 {
    limit.saturating_sub(RESERVED_FILES)
}

/// Raises this process's open-file soft limit to its hard limit and returns the limit now in
/// force (it may stay lower where the system refuses to raise it).
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Refuses, before anything connects, to run more devices than the open-file limit allows
/// (they would fail midway with `too many open files`).
pub(crate) fn check_open_files(devices: usize) -> Result<(), super::SimError> {
    let Some(limit) = open_files_limit() else {
        return Ok(());
    };
    let allowed = devices_allowed(limit);
    if devices as u64 > allowed {
        return Err(super::SimError::Invalid(format!(
            "{devices} devices in this process, but its open-file limit of {limit} allows at \
             most {allowed}: split the fleet with --shard K/N over more processes, or raise \
             the hard limit"
        )));
    }
    Ok(())
}

pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ConnackRefusal;

    #[test]
    fn failure_reasons_table() {
        let cases = [
            (
                ConnectError::Refused(ConnackRefusal::IdentifierRejected),
                "connack 0x85 (client identifier rejected)",
            ),
            (
                ConnectError::Refused(ConnackRefusal::NotAuthorized),
                "connack 0x87 (not authorized)",
            ),
            (
                ConnectError::Disconnected(DisconnectCause::SessionTakenOver),
                "disconnect 0x8E (session taken over)",
            ),
            (
                ConnectError::Tls("received fatal alert: UnknownCA".into()),
                "tls alert: UnknownCA",
            ),
            (
                ConnectError::Tls("invalid peer certificate: UnknownIssuer".into()),
                "tls: invalid peer certificate: UnknownIssuer",
            ),
            (
                ConnectError::Timeout("connecting to the broker"),
                "timeout: connecting to the broker",
            ),
            (
                ConnectError::Network("Connection refused (os error 111)".into()),
                "i/o: Connection refused (os error 111)",
            ),
            (
                ConnectError::Protocol("x".repeat(200)),
                &format!("protocol: {}", "x".repeat(80)),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(failure_reason(&e), want);
        }
    }

    #[test]
    fn reasons_are_bounded() {
        let mut r = Reasons::default();
        for i in 0..MAX_REASONS + 10 {
            r.add(format!("r{i}"));
        }
        r.add("r0".into());
        assert_eq!(r.total(), MAX_REASONS as u64 + 11);
        let map = r.into_map();
        assert_eq!(map.len(), MAX_REASONS + 1);
        assert_eq!(map["other"], 10);
        assert_eq!(map["r0"], 2);
    }

    #[test]
    fn seq_set_counts_distinct_duplicates_and_missing() {
        let mut s = SeqSet::default();
        for seq in [0, 1, 2, 5, 64, 65, 130, 2, 64] {
            s.insert(seq);
        }
        assert_eq!(s.distinct(), 7);
        assert_eq!(s.duplicates(), 2);
        let cases = [
            (0, 0),
            (1, 0),
            (3, 0),
            (6, 2),   // 3, 4
            (64, 60), // 3, 4, 6..=63
            (66, 60),
            (131, 60 + 64),
            (200, 60 + 64 + 69),
        ];
        for (sent, missing) in cases {
            assert_eq!(s.missing_below(sent), missing, "sent {sent}");
        }
        assert_eq!(SeqSet::default().missing_below(10), 10);

        let mut other = SeqSet::default();
        for seq in [1, 5, 200] {
            other.insert(seq);
        }
        // s = {0, 1, 2, 5, 64, 65, 130}
        assert_eq!(s.count_not_in(&other), 5);
        assert_eq!(other.count_not_in(&s), 1);
        assert_eq!(s.count_not_in(&s), 0);
        assert_eq!(SeqSet::default().count_not_in(&s), 0);
    }

    #[test]
    fn devices_beyond_the_open_file_limit_are_refused_up_front() {
        assert_eq!(devices_allowed(20_000), 19_936);
        assert_eq!(devices_allowed(10), 0);
        if let Some(limit) = open_files_limit() {
            assert!(check_open_files(devices_allowed(limit) as usize).is_ok());
            let e = check_open_files(devices_allowed(limit) as usize + 1).unwrap_err();
            assert!(e.to_string().contains("--shard K/N"), "{e}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(10, Duration::from_secs(2)), 5.0);
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        assert_eq!(per_second(3, Duration::from_millis(1500)), 2.0);
    }

    #[test]
    fn proc_parsing() {
        let status = "Name:\tdevice-client\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        // A command name with spaces and a parenthesis; utime 250, stime 50 ticks.
        let stat = "4242 (dev (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0";
        assert_eq!(stat_cpu(stat), Some(Duration::from_secs(3)));
        assert_eq!(stat_cpu("garbage"), None);
        let live = Usage::now();
        if cfg!(target_os = "linux") {
            assert!(live.rss > 0 && live.rss_peak >= live.rss, "{live:?}");
            assert!(open_files_limit().is_some());
        }
    }
}
