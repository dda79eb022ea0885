//! A latency histogram with bounded memory and bounded relative error, in the spirit of
//! HdrHistogram: values below 128 are counted exactly; above, each power of two is split into
//! 128 linear buckets, so a reported percentile is within 1/128 (< 0.8 %) of the true value.
//! The count, minimum, maximum and sum are exact.
//!
//! A report carries each histogram in a compact, mergeable form ([`HistogramData`]: the
//! non-empty buckets as `[index, count]` pairs), so the reports of a sharded run merge into
//! exactly the histogram one process would have recorded.

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Linear buckets per power of two: 2^SUB_BITS.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

/// A histogram of `u64` values (the simulator records microseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Grown on demand up to the bucket of the largest value seen.
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
    sum: u128,
}

/// One past the largest bucket index (that of `u64::MAX`).
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// The bucket a value falls in.
fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    ((u64::from(shift) + 1) * SUB + sub) as usize
}

/// The largest value that falls in bucket `i`.
fn bucket_high(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let sub = i % SUB;
    let low = (SUB + sub) << shift;
    low + ((1u64 << shift) - 1)
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, v: u64) {
        let i = bucket(v);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        if self.count == 0 || v < self.min {
            self.min = v;
        }
        self.max = self.max.max(v);
        self.count += 1;
        self.sum += u128::from(v);
    }

    /// Records a duration in microseconds.
    pub fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        if self.count == 0 || other.min < self.min {
            self.min = other.min;
        }
        self.max = self.max.max(other.max);
        self.count += other.count;
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The value at quantile `q` (0.0..=1.0): the smallest recorded value such that at least
    /// `q` of all values are at most it, rounded up to its bucket's upper edge and clamped to
    /// the exact minimum and maximum. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_high(i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// p50, p90, p99, max and mean, in milliseconds of the microsecond values recorded, and
    /// the histogram itself in its mergeable form.
    pub fn summary_ms(&self) -> Percentiles {
        let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
        Percentiles {
            count: self.count,
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            max_ms: ms(self.max()),
            mean_ms: self.mean().map(|us| us / 1000.0),
            histogram: (self.count > 0).then(|| self.to_data()),
        }
    }

    /// The compact form: the non-empty buckets, minimum, maximum and sum.
    pub fn to_data(&self) -> HistogramData {
        HistogramData {
            min: self.min,
            max: self.max,
            sum: self.sum,
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| [i as u64, *c])
                .collect(),
        }
    }

    /// Back from the compact form; refuses data no histogram could have produced.
    pub fn from_data(data: &HistogramData) -> Result<Histogram, String> {
        let mut h = Histogram::new();
        for &[i, c] in &data.buckets {
            let i = usize::try_from(i).ok().filter(|i| *i < BUCKETS);
            let Some(i) = i else {
                return Err("a histogram bucket index out of range".into());
            };
            if i >= h.counts.len() {
                h.counts.resize(i + 1, 0);
            }
            h.counts[i] += c;
            h.count += c;
        }
        if h.count == 0 {
            return Ok(Histogram::new());
        }
        if data.min > data.max
            || h.counts[bucket(data.min)] == 0
            || bucket(data.max) + 1 != h.counts.len()
        {
            return Err("a histogram whose minimum or maximum is not in its buckets".into());
        }
        h.min = data.min;
        h.max = data.max;
        h.sum = data.sum;
        Ok(h)
    }
}

/// A [`Histogram`] as a report carries it (microseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramData {
    pub min: u64,
    pub max: u64,
    pub sum: u128,
    /// `[bucket index, count]` for every non-empty bucket, in index order.
    pub buckets: Vec<[u64; 2]>,
}

/// Latency percentiles as reported; `None` when nothing was measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// The values (µs) the percentiles come from, so reports can be merged exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<HistogramData>,
}

impl Percentiles {
    /// The percentiles of the values of both, recomputed from their merged histograms.
    pub fn merge(&self, other: &Percentiles) -> Result<Percentiles, String> {
        let mut h = self.to_histogram()?;
        h.merge(&other.to_histogram()?);
        Ok(h.summary_ms())
    }

    fn to_histogram(&self) -> Result<Histogram, String> {
        match &self.histogram {
            None if self.count == 0 => Ok(Histogram::new()),
            None => {
                Err("latencies without their histogram (a report from an older version)".into())
            }
            Some(data) => {
                let h = Histogram::from_data(data)?;
                if h.count() != self.count {
                    return Err("a histogram whose buckets do not add up to its count".into());
                }
                Ok(h)
            }
        }
    }
}

/// A histogram many tasks record into: a few shards behind short locks, merged on read.
#[derive(Debug)]
pub(crate) struct SharedHistogram {
    shards: Vec<Mutex<Histogram>>,
}

impl SharedHistogram {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Histogram::new()))
                .collect(),
        }
    }

    /// Records into the shard of `key` (e.g. a device index).
    pub(crate) fn record(&self, key: usize, d: Duration) {
        self.shards[key % self.shards.len()]
            .lock()
            .record_duration(d);
    }

    /// Everything recorded since the last `take`, leaving the histogram empty.
    pub(crate) fn take(&self) -> Histogram {
        let mut all = Histogram::new();
        for s in &self.shards {
            all.merge(&std::mem::take(&mut *s.lock()));
        }
        all
    }

    pub(crate) fn snapshot(&self) -> Histogram {
        let mut all = Histogram::new();
        for s in &self.shards {
            all.merge(&s.lock());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_below_256_and_contiguous_above() {
        for v in 0..256u64 {
            assert_eq!(bucket_high(bucket(v)), v, "{v}");
        }
        // Every value lies at or below its bucket's upper edge, and above the previous one.
        for v in (256u64..1 << 20)
            .step_by(37)
            .chain([u64::MAX, u64::MAX - 1, 1 << 40])
        {
            let i = bucket(v);
            assert!(v <= bucket_high(i), "{v}");
            assert!(v > bucket_high(i - 1), "{v}");
        }
        assert_eq!(bucket_high(bucket(u64::MAX)), u64::MAX);
    }

    #[test]
    fn relative_error_is_below_one_percent() {
        for v in [300u64, 1_000, 12_345, 999_999, 10_000_000, 1 << 50] {
            let high = bucket_high(bucket(v));
            let err = (high - v) as f64 / v as f64;
            assert!(err < 1.0 / 128.0, "{v}: {high} ({err})");
        }
    }

    #[test]
    fn quantiles_table() {
        let mut h = Histogram::new();
        for v in 1..=100u64 {
            h.record(v);
        }
        let cases = [
            (0.0, 1),
            (0.01, 1),
            (0.5, 50),
            (0.9, 90),
            (0.99, 99),
            (1.0, 100),
        ];
        for (q, want) in cases {
            assert_eq!(h.quantile(q), Some(want), "q={q}");
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.min(), Some(1));
        assert_eq!(h.max(), Some(100));
        assert_eq!(h.mean(), Some(50.5));
    }

    #[test]
    fn large_values_are_close_and_clamped_to_max() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000); // 1 ms .. 10 s in µs
        }
        for (q, exact) in [(0.5, 5_000_000f64), (0.9, 9_000_000.0), (0.99, 9_900_000.0)] {
            let got = h.quantile(q).unwrap() as f64;
            assert!(
                got >= exact && (got - exact) / exact < 0.008,
                "q={q}: {got}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(10_000_000));
        let one = {
            let mut h = Histogram::new();
            h.record(123_456);
            h
        };
        assert_eq!(
            one.quantile(0.5),
            Some(123_456),
            "clamped to the exact value"
        );
    }

    #[test]
    fn empty_and_merge() {
        let empty = Histogram::new();
        assert_eq!(empty.quantile(0.5), None);
        assert_eq!(empty.summary_ms(), Percentiles::default());

        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 0..50 {
            a.record(v);
        }
        for v in 50..100 {
            b.record(v + 1_000_000);
        }
        let mut m = Histogram::new();
        m.merge(&a);
        m.merge(&b);
        m.merge(&empty);
        assert_eq!(m.count(), 100);
        assert_eq!(m.min(), Some(0));
        assert_eq!(m.max(), Some(1_000_099));
        assert_eq!(m.quantile(0.5), Some(49));
        let mut direct = a.clone();
        for v in 50..100 {
            direct.record(v + 1_000_000);
        }
        assert_eq!(m, direct);
    }

    #[test]
    fn reported_histograms_merge_into_the_histogram_of_all_samples() {
        // Three shards' samples, spread over exact and bucketed ranges.
        let samples: Vec<u64> = (0..3000u64).map(|i| (i * 7919) % 5_000_000).collect();
        let mut all = Histogram::new();
        let mut merged = Percentiles::default();
        for part in samples.chunks(1000) {
            let mut h = Histogram::new();
            for v in part {
                h.record(*v);
                all.record(*v);
            }
            // Through JSON, as a shard's report carries it.
            let json = serde_json::to_string(&h.summary_ms()).unwrap();
            let back: Percentiles = serde_json::from_str(&json).unwrap();
            merged = merged.merge(&back).unwrap();
        }
        assert_eq!(merged, all.summary_ms());
        let data = merged.histogram.as_ref().unwrap();
        assert_eq!(Histogram::from_data(data).unwrap(), all);
        let json = serde_json::to_string(data).unwrap();
        assert!(json.contains(r#""buckets":[[0,1],"#), "{json}");

        // Empty ones merge to empty; bad data is refused.
        let empty = Percentiles::default();
        assert_eq!(empty.merge(&empty).unwrap(), empty);
        let mut no_hist = all.summary_ms();
        no_hist.histogram = None;
        assert!(no_hist.merge(&empty).is_err());
        let mut bad = all.summary_ms();
        bad.count += 1;
        assert!(bad.merge(&empty).is_err());
        let mut bad = all.to_data();
        bad.buckets.push([BUCKETS as u64, 1]);
        assert!(Histogram::from_data(&bad).is_err());
        let mut bad = all.to_data();
        bad.max += 1_000_000;
        assert!(Histogram::from_data(&bad).is_err());
    }

    #[test]
    fn summary_is_in_milliseconds() {
        let mut h = Histogram::new();
        h.record_duration(Duration::from_millis(2));
        h.record_duration(Duration::from_millis(4));
        let s = h.summary_ms();
        assert_eq!(s.count, 2);
        assert!((s.p50_ms.unwrap() - 2.0).abs() < 0.02, "{s:?}");
        assert_eq!(s.max_ms, Some(4.0));
        assert_eq!(s.mean_ms, Some(3.0));
    }

    #[test]
    fn shared_histogram_merges_its_shards() {
        let shared = SharedHistogram::new(4);
        for i in 0..40 {
            shared.record(i, Duration::from_micros(i as u64));
        }
        let h = shared.snapshot();
        assert_eq!(h.count(), 40);
        assert_eq!(h.max(), Some(39));
        assert_eq!(shared.take(), h);
        assert_eq!(shared.snapshot().count(), 0, "take empties it");
    }
}
