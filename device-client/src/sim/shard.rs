//! Splitting one fleet over several simulator processes and several broker nodes.
//!
//! A fleet of `devices` has the ids `{prefix}{index:05}` for `index` in `0..devices`, whatever
//! the sharding. Shard `K/N` takes the contiguous block of indices
//! `(K-1)·devices/N .. K·devices/N` (rounded down), so the shards' blocks are disjoint, cover
//! the fleet, and differ in size by at most one; a block is also a contiguous run of ids in
//! the certificate cache. Device `index` (its fleet index, not its place in the shard)
//! connects to `urls[index % urls.len()]`, so a fleet spreads evenly over the broker nodes and
//! a device goes to the same node however the fleet is sharded.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::SimError;
use crate::url::BrokerUrl;

/// Shard `index` of `count` (1-based): `1/1` is the whole fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Shard {
    /// The whole fleet in one process.
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    /// Shard `index` of `count`, `1 <= index <= count`.
    pub fn new(index: usize, count: usize) -> Result<Self, SimError> {
        if count == 0 || index == 0 || index > count {
            return Err(SimError::Invalid(format!(
                "shard {index}/{count}: needs 1 <= K <= N in K/N"
            )));
        }
        Ok(Self { index, count })
    }

    /// 1-based.
    pub fn index(self) -> usize {
        self.index
    }

    pub fn count(self) -> usize {
        self.count
    }

    pub fn is_whole(self) -> bool {
        self.count == 1
    }

    /// This shard's fleet indices; every shard gets at least one device when
    /// `count <= devices`, which [`Shard::check`] requires.
    pub fn range(self, devices: usize) -> Range<usize> {
        let at = |k: usize| (k as u128 * devices as u128 / self.count as u128) as usize;
        at(self.index - 1)..at(self.index)
    }

    /// Refuses a fleet smaller than the number of shards (a shard would be empty).
    pub fn check(self, devices: usize) -> Result<(), SimError> {
        if self.count > devices {
            return Err(SimError::Invalid(format!(
                "{} shards for {devices} devices: N must be at most --devices (the fleet's total)",
                self.count
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = SimError;

    /// `K/N`, e.g. `2/4`.
    fn from_str(s: &str) -> Result<Self, SimError> {
        let bad = || SimError::Invalid(format!("{s:?} is not a shard like 2/4 (K/N)"));
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let k = k.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Shard::new(k, n)
    }
}

/// The broker URL device `index` (its fleet index) connects to.
pub(crate) fn url_for(urls: &[BrokerUrl], index: usize) -> &BrokerUrl {
    &urls[index % urls.len()]
}

/// Refuses an empty list, and a list mixing `mqtts://` and `mqtt://` (one server CA and one
/// way of identifying devices serve the whole fleet).
pub(crate) fn check_urls(urls: &[BrokerUrl]) -> Result<(), SimError> {
    let Some(first) = urls.first() else {
        return Err(SimError::Invalid(
            "at least one broker URL is needed".into(),
        ));
    };
    if urls.iter().any(|u| u.is_tls() != first.is_tls()) {
        return Err(SimError::Invalid(
            "the broker URLs must be all mqtts:// or all mqtt://".into(),
        ));
    }
    Ok(())
}

/// The URLs as given on the command line and in the report: comma-separated.
pub(crate) fn join_urls(urls: &[BrokerUrl]) -> String {
    urls.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_fleet_once_in_blocks() {
        for devices in [1usize, 2, 3, 7, 20, 100, 20_001] {
            for count in 1..=devices.min(9) {
                let mut next = 0;
                for index in 1..=count {
                    let r = Shard::new(index, count).unwrap().range(devices);
                    assert_eq!(r.start, next, "{index}/{count} of {devices}");
                    assert!(!r.is_empty(), "{index}/{count} of {devices}");
                    let (small, large) = (devices / count, devices.div_ceil(count));
                    assert!((small..=large).contains(&r.len()), "{r:?}");
                    next = r.end;
                }
                assert_eq!(next, devices, "{count} shards of {devices}");
            }
        }
        let table = [
            ("1/1", 20, 0..20),
            ("1/2", 20, 0..10),
            ("2/2", 20, 10..20),
            ("1/3", 10, 0..3),
            ("2/3", 10, 3..6),
            ("3/3", 10, 6..10),
        ];
        for (shard, devices, want) in table {
            let s: Shard = shard.parse().unwrap();
            assert_eq!(s.range(devices), want, "{shard}");
            assert_eq!(s.to_string(), shard);
        }
    }

    #[test]
    fn bad_shards_are_refused() {
        for bad in ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3", "-1/2", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let s: Shard = " 2 / 3 ".parse().unwrap();
        assert_eq!((s.index(), s.count()), (2, 3));
        assert!(s.check(3).is_ok());
        let e = s.check(2).unwrap_err().to_string();
        assert!(e.contains("at most --devices"), "{e}");
        assert!(Shard::WHOLE.check(1).is_ok() && Shard::WHOLE.is_whole());
    }

    #[test]
    fn devices_spread_over_urls_by_fleet_index() {
        let urls: Vec<BrokerUrl> = ["mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883"]
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        let hosts: Vec<String> = (0..7).map(|i| url_for(&urls, i).to_string()).collect();
        assert_eq!(
            hosts,
            [
                "mqtt://a:1883",
                "mqtt://b:1883",
                "mqtt://c:1883",
                "mqtt://a:1883",
                "mqtt://b:1883",
                "mqtt://c:1883",
                "mqtt://a:1883"
            ]
        );
        // One URL: every device to it, as before.
        assert_eq!(url_for(&urls[..1], 12_345).to_string(), "mqtt://a:1883");
        assert!(check_urls(&urls).is_ok());
        assert!(check_urls(&[]).is_err());
        let mixed = [urls[0].clone(), "mqtts://d:8883".parse().unwrap()];
        assert!(check_urls(&mixed).is_err());
        assert_eq!(
            join_urls(&urls[..2]),
            "mqtt://a:1883,mqtt://b:1883".to_owned()
        );
    }
}
