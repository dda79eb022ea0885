//! Latency histograms: the `hdrhistogram` crate, with two significant figures (a reported
//! percentile is within 1 % of the true value) over 1 µs to one day, so every histogram has
//! the same layout, bounded memory (about 30 KiB), and one serialized form for equal contents.
//!
//! A report carries each histogram in HdrHistogram's V2 serialization, DEFLATE-compressed and
//! base64-encoded (the form of HdrHistogram's interval logs, which its Java, C, Go and Python
//! tools read), so the reports of a sharded run merge into exactly the histogram one process
//! would have recorded.

use std::time::Duration;

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Largest value recorded as itself (µs): one day. Larger ones count as this.
const HIGHEST: u64 = 24 * 3600 * 1_000_000;
const SIGNIFICANT_FIGURES: u8 = 2;

/// A histogram of `u64` values (the simulator records microseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram(hdrhistogram::Histogram<u64>);

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self(
            hdrhistogram::Histogram::new_with_bounds(1, HIGHEST, SIGNIFICANT_FIGURES)
                .expect("valid histogram bounds"),
        )
    }

    pub fn record(&mut self, v: u64) {
        self.0.saturating_record(v);
    }

    /// Records a duration in microseconds.
    pub fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: &Histogram) {
        self.0
            .add(&other.0)
            .expect("histograms of one layout always add");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn min(&self) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.min())
    }

    pub fn max(&self) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.max())
    }

    pub fn mean(&self) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.mean())
    }

    /// The value at quantile `q` (0.0..=1.0), as HdrHistogram reports it (the upper edge of
    /// the value's bucket). `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q.clamp(0.0, 1.0)))
    }

    /// p50, p90, p99, max and mean, in milliseconds of the microsecond values recorded, and
    /// the histogram itself in its mergeable form.
    pub fn summary_ms(&self) -> Percentiles {
        let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
        Percentiles {
            count: self.count(),
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            max_ms: ms(self.max()),
            mean_ms: self.mean().map(|us| us / 1000.0),
            histogram: (!self.0.is_empty()).then(|| self.encode()),
        }
    }

    /// HdrHistogram V2 + DEFLATE, base64.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serializing into memory");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Back from [`Histogram::encode`]'s form, into this module's layout; refuses what does
    /// not decode or does not fit it.
    pub fn decode(text: &str) -> Result<Histogram, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("a histogram that is not base64: {e}"))?;
        let h: hdrhistogram::Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("a histogram that does not decode: {e:?}"))?;
        let mut out = Histogram::new();
        out.0
            .add(&h)
            .map_err(|e| format!("a histogram beyond the range of ours: {e:?}"))?;
        Ok(out)
    }
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
    /// The values (µs) the percentiles come from, so reports can be merged exactly:
    /// HdrHistogram V2 + DEFLATE, base64 ([`Histogram::encode`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "encoded_or_older"
    )]
    pub histogram: Option<String>,
}

/// Reports of older versions carried their own bucket format; they read as having none, so
/// merging them says why it cannot.
fn encoded_or_older<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
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
            Some(text) => {
                let h = Histogram::decode(text)?;
                if h.count() != self.count {
                    return Err("a histogram whose counts do not add up to its count".into());
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
            let mut shard = s.lock();
            all.merge(&shard);
            shard.0.reset();
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
    fn quantiles_table() {
        let mut h = Histogram::new();
        for v in 1..=100u64 {
            h.record(v);
        }
        // Exact below 256 (two significant figures: 256 sub-buckets).
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
    fn large_values_are_within_one_percent() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000); // 1 ms .. 10 s in µs
        }
        for (q, exact) in [
            (0.5, 5_000_000f64),
            (0.9, 9_000_000.0),
            (0.99, 9_900_000.0),
            (1.0, 10_000_000.0),
        ] {
            let got = h.quantile(q).unwrap() as f64;
            assert!(got >= exact && (got - exact) / exact < 0.01, "q={q}: {got}");
        }
        // Beyond a day counts as a day.
        h.record(u64::MAX);
        assert!(h.max().unwrap() >= HIGHEST && h.max().unwrap() < HIGHEST / 100 * 101);
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
        assert_eq!(m.quantile(0.5), Some(49));
        let mut direct = a.clone();
        for v in 50..100 {
            direct.record(v + 1_000_000);
        }
        assert_eq!(m, direct);
        assert_eq!(m.encode(), direct.encode());
    }

    /// Shards record parts of the fleet; their reports, through JSON, merge into exactly the
    /// histogram (and the serialized form) of all samples.
    #[test]
    fn reported_histograms_merge_into_the_histogram_of_all_samples() {
        let samples: Vec<u64> = (0..3000u64).map(|i| (i * 7919) % 5_000_000).collect();
        let mut all = Histogram::new();
        let mut merged = Percentiles::default();
        for part in samples.chunks(1000) {
            let mut h = Histogram::new();
            for v in part {
                h.record(*v);
                all.record(*v);
            }
            let json = serde_json::to_string(&h.summary_ms()).unwrap();
            let back: Percentiles = serde_json::from_str(&json).unwrap();
            merged = merged.merge(&back).unwrap();
        }
        assert_eq!(merged, all.summary_ms());
        let text = merged.histogram.as_ref().unwrap();
        assert_eq!(Histogram::decode(text).unwrap(), all);

        // Empty ones merge to empty; bad data is refused with a reason.
        let empty = Percentiles::default();
        assert_eq!(empty.merge(&empty).unwrap(), empty);
        let mut no_hist = all.summary_ms();
        no_hist.histogram = None;
        assert!(no_hist.merge(&empty).is_err());
        let mut bad = all.summary_ms();
        bad.count += 1;
        assert!(bad.merge(&empty).unwrap_err().contains("do not add up"));
        bad.count -= 1;
        bad.histogram = Some("not base64!".into());
        assert!(bad.merge(&empty).unwrap_err().contains("not base64"));
        bad.histogram = Some(base64::engine::general_purpose::STANDARD.encode(b"junk"));
        assert!(bad.merge(&empty).unwrap_err().contains("does not decode"));
        // A report of an older version (its own bucket format) says why it cannot merge.
        let old: Percentiles = serde_json::from_value(serde_json::json!({
            "count": 1, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0,
            "mean_ms": 1.0, "histogram": { "min": 1000, "max": 1000, "sum": 1000,
            "buckets": [[1000, 1]] }
        }))
        .unwrap();
        assert!(old.merge(&empty).unwrap_err().contains("older version"));
    }

    /// The form is HdrHistogram's: another HdrHistogram (here with other bounds and three
    /// significant figures) serialized with V2 + DEFLATE merges in.
    #[test]
    fn histograms_from_other_hdrhistogram_writers_merge() {
        let mut other = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        other.record_n(1_500, 3).unwrap();
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&other, &mut bytes)
            .unwrap();
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        let h = Histogram::decode(&text).unwrap();
        assert_eq!(h.count(), 3);
        assert!((1_500..1_520).contains(&h.quantile(0.5).unwrap()));
    }

    #[test]
    fn summary_is_in_milliseconds() {
        let mut h = Histogram::new();
        h.record_duration(Duration::from_millis(2));
        h.record_duration(Duration::from_millis(4));
        let s = h.summary_ms();
        assert_eq!(s.count, 2);
        assert!((s.p50_ms.unwrap() - 2.0).abs() < 0.02, "{s:?}");
        assert!((s.max_ms.unwrap() - 4.0).abs() < 0.04, "{s:?}");
        assert!((s.mean_ms.unwrap() - 3.0).abs() < 0.03, "{s:?}");
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
