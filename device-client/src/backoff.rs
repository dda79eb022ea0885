//! Reconnect delays: exponential growth, capped, with full jitter
//! (`sleep = random(0, min(cap, base * 2^attempt))`). Pure: the caller supplies the randomness.

use std::time::Duration;

use rand::Rng;

/// Settings of the reconnect backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling of the first delay. Default 500 ms.
    pub base: Duration,
    /// Largest ceiling. Default 60 s.
    pub cap: Duration,
    /// A connection that stayed up at least this long starts the sequence over when it is
    /// lost; shorter ones keep growing the delay, so a broker that accepts and then drops the
    /// device is not hammered. Default 30 s.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            reset_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// `min(cap, base * 2^attempt)`, saturating instead of overflowing.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.cap)
    }

    /// The next delay, uniform in `[0, ceiling]`, and one more attempt.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling().as_nanos()).unwrap_or(u64::MAX);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_nanos(rng.gen_range(0..=ceiling))
    }

    /// The next delay, as [`Backoff::next_delay`], but with its ceiling never above how long
    /// the broker has been unreachable so far (nor below `base`): after a short outage a
    /// device is back within about as long again, while a long one still backs off to `cap`.
    /// Fast failures (a refused connection answers at once) would otherwise climb to long
    /// ceilings within a second or two of an outage.
    pub(crate) fn next_delay_after(
        &mut self,
        rng: &mut impl Rng,
        unreachable_for: Duration,
    ) -> Duration {
        let bound = unreachable_for.max(self.config.base);
        let ceiling = u64::try_from(self.ceiling().min(bound).as_nanos()).unwrap_or(u64::MAX);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_nanos(rng.gen_range(0..=ceiling))
    }

    /// Records that a connection which lasted `lasted` was lost.
    pub(crate) fn connection_lost(&mut self, lasted: Duration) {
        if lasted >= self.config.reset_after {
            self.attempt = 0;
        }
    }

    #[cfg(test)]
    fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn backoff(base: u64, cap: u64) -> Backoff {
        Backoff::new(BackoffConfig {
            base: MS(base),
            cap: MS(cap),
            reset_after: MS(1_000),
        })
    }

    #[test]
    fn ceilings_double_then_cap() {
        let cases: &[(u64, u64, &[u64])] = &[
            (100, 1_000, &[100, 200, 400, 800, 1_000, 1_000]),
            (
                500,
                60_000,
                &[500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000],
            ),
            (1_000, 500, &[500, 500]),
            (0, 1_000, &[0, 0, 0]),
        ];
        let mut rng = StdRng::seed_from_u64(1);
        for (base, cap, want) in cases {
            let mut b = backoff(*base, *cap);
            let got: Vec<u64> = want
                .iter()
                .map(|_| {
                    let c = b.ceiling().as_millis() as u64;
                    b.next_delay(&mut rng);
                    c
                })
                .collect();
            assert_eq!(&got, want, "base {base} cap {cap}");
        }
    }

    #[test]
    fn no_overflow_after_many_attempts() {
        let mut b = backoff(500, 60_000);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..200 {
            assert!(b.next_delay(&mut rng) <= MS(60_000));
        }
        assert_eq!(b.ceiling(), MS(60_000));
        let mut huge = Backoff::new(BackoffConfig {
            base: Duration::MAX,
            cap: Duration::MAX,
            reset_after: Duration::MAX,
        });
        huge.attempt = u32::MAX;
        assert_eq!(huge.ceiling(), Duration::MAX);
        huge.next_delay(&mut rng);
        assert_eq!(huge.attempt(), u32::MAX);
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let mut rng = StdRng::seed_from_u64(3);
        let (mut low, mut high) = (false, false);
        for _ in 0..1_000 {
            let mut b = backoff(1_000, 1_000);
            let d = b.next_delay(&mut rng);
            assert!(d <= MS(1_000));
            low |= d < MS(250);
            high |= d > MS(750);
        }
        assert!(
            low && high,
            "delays should cover the whole [0, ceiling] range"
        );
    }

    #[test]
    fn delays_never_exceed_how_long_the_broker_has_been_unreachable() {
        // (attempts already made, unreachable for ms, largest delay allowed ms)
        let cases: &[(u32, u64, u64)] = &[
            (0, 0, 500),
            (10, 0, 500),
            (10, 1_400, 1_400),
            (3, 1_400, 1_400),
            (1, 1_400, 1_000),
            (10, 600_000, 60_000),
        ];
        let mut rng = StdRng::seed_from_u64(5);
        for (attempts, down, max) in cases {
            for _ in 0..200 {
                let mut b = backoff(500, 60_000);
                b.attempt = *attempts;
                let d = b.next_delay_after(&mut rng, MS(*down));
                assert!(d <= MS(*max), "{attempts} attempts, {down} ms down: {d:?}");
            }
        }
    }

    #[test]
    fn reset_only_after_a_stable_connection() {
        let cases: &[(u64, u32)] = &[(0, 3), (999, 3), (1_000, 0), (5_000, 0)];
        let mut rng = StdRng::seed_from_u64(4);
        for (lasted, want_attempt) in cases {
            let mut b = backoff(100, 10_000);
            for _ in 0..3 {
                b.next_delay(&mut rng);
            }
            b.connection_lost(MS(*lasted));
            assert_eq!(b.attempt(), *want_attempt, "lasted {lasted} ms");
        }
    }
}
