//! Reconnect delays: exponential growth, capped, with full jitter
//! (`sleep = random(0, min(cap, base * 2^attempt))`), and the longer waits after the session
//! was taken over by another connection with the same identity ([`Takeovers`]). Pure: the
//! caller supplies the randomness.

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
    /// The wait after the broker said another connection with this device's identity took
    /// the session over (a second agent running with the same certificate). It doubles with
    /// each takeover in a row up to [`BackoffConfig::takeover_cap`], so two agents sharing an
    /// identity do not take the device from each other in a loop. Default 10 s.
    pub takeover_base: Duration,
    /// Longest wait after a takeover; a session that lasted this long before being taken over
    /// starts the doubling again. Default 10 min.
    pub takeover_cap: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            reset_after: Duration::from_secs(30),
            takeover_base: Duration::from_secs(10),
            takeover_cap: Duration::from_secs(600),
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

    /// Starts the sequence over.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
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

/// How an established session ended, as far as takeovers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The broker's DISCONNECT said another connection took the session over (MQTT 5, 0x8E).
    TakenOver,
    /// The broker closed the connection without a reason this client could read: MQTT 3.1.1
    /// has none, and rumqttc 0.25 cannot read an MQTT 5 DISCONNECT that carries a reason code
    /// but no property length (what Mosquitto and the fleet broker send).
    ClosedByBroker,
    /// Anything else: the network, a keepalive timeout, our own DISCONNECT.
    Other,
}

/// Another connection with this device's identity took the session over; the agent waits
/// `wait` before connecting again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takeover {
    /// Takeovers in a row, this one included.
    pub in_a_row: u32,
    pub wait: Duration,
    /// The broker said so; otherwise it is inferred from the broker closing short sessions
    /// again and again although connecting works.
    pub certain: bool,
}

impl std::fmt::Display for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.certain {
            write!(
                f,
                "another connection using this device's identity took the session over"
            )?;
        } else {
            write!(
                f,
                "the broker closed the session again and again soon after it began, most \
                 likely because another connection using this device's identity took the \
                 session over"
            )?;
        }
        write!(
            f,
            "; is a second agent running? Backing off: reconnecting in {:.1} s ({} in a row)",
            self.wait.as_secs_f64(),
            self.in_a_row
        )
    }
}

/// Takeovers in a row and the wait after each: `min(takeover_cap, takeover_base * 2^(n-1))`
/// plus up to a quarter of it at random, so two agents with the same identity drift apart
/// instead of meeting again at the same moment.
///
/// When the broker cannot say why it ended a session, a takeover is inferred from the third
/// short session in a row that the broker closed although reconnecting worked in between: a
/// broker going down refuses the reconnect, a revoked device is refused, a device moved to
/// another cohort is closed once (or twice, moved twice). The first two such closes get the
/// usual quick reconnect.
#[derive(Debug, Clone)]
pub(crate) struct Takeovers {
    base: Duration,
    cap: Duration,
    /// Sessions shorter than this count as "soon after it began".
    short: Duration,
    in_a_row: u32,
    closed_in_a_row: u32,
}

impl Takeovers {
    pub(crate) fn new(config: &BackoffConfig) -> Self {
        Self {
            base: config.takeover_base,
            cap: config.takeover_cap.max(config.takeover_base),
            short: config.reset_after,
            in_a_row: 0,
            closed_in_a_row: 0,
        }
    }

    /// An established session that lasted `lasted` ended; `Some` when it was (most likely)
    /// taken over, with the wait before connecting again.
    pub(crate) fn session_lost(
        &mut self,
        end: SessionEnd,
        lasted: Duration,
        rng: &mut impl Rng,
    ) -> Option<Takeover> {
        let certain = match end {
            SessionEnd::Other => {
                self.in_a_row = 0;
                self.closed_in_a_row = 0;
                return None;
            }
            SessionEnd::TakenOver => true,
            SessionEnd::ClosedByBroker => {
                if lasted >= self.short {
                    self.closed_in_a_row = 0;
                }
                self.closed_in_a_row += 1;
                if self.closed_in_a_row < 3 {
                    return None;
                }
                false
            }
        };
        if lasted >= self.cap {
            self.in_a_row = 0;
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        let factor = 1u32.checked_shl(self.in_a_row - 1).unwrap_or(u32::MAX);
        let wait = self.base.saturating_mul(factor).min(self.cap);
        let quarter = u64::try_from((wait / 4).as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rng.gen_range(0..=quarter));
        Some(Takeover {
            in_a_row: self.in_a_row,
            wait: wait.saturating_add(jitter),
            certain,
        })
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
            ..BackoffConfig::default()
        })
    }

    fn takeovers(base: u64, cap: u64) -> Takeovers {
        Takeovers::new(&BackoffConfig {
            takeover_base: MS(base),
            takeover_cap: MS(cap),
            reset_after: MS(1_000),
            ..BackoffConfig::default()
        })
    }

    #[test]
    fn takeover_waits_double_then_cap_with_a_quarter_of_jitter() {
        // (base, cap, lower bounds of the waits after 1, 2, 3, ... takeovers in a row)
        let cases: &[(u64, u64, &[u64])] = &[
            (
                10_000,
                600_000,
                &[
                    10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 600_000, 600_000,
                ],
            ),
            (1_000, 3_000, &[1_000, 2_000, 3_000, 3_000]),
            (5_000, 1_000, &[5_000, 5_000]),
        ];
        let mut rng = StdRng::seed_from_u64(6);
        for (base, cap, want) in cases {
            let mut t = takeovers(*base, *cap);
            for (i, low) in want.iter().enumerate() {
                let got = t
                    .session_lost(SessionEnd::TakenOver, MS(100), &mut rng)
                    .unwrap();
                assert_eq!((got.in_a_row as usize, got.certain), (i + 1, true));
                assert!(
                    got.wait >= MS(*low) && got.wait <= MS(low + low / 4),
                    "base {base} cap {cap}, takeover {}: {:?}",
                    got.in_a_row,
                    got.wait
                );
            }
        }
    }

    /// (how each session ended, how long it lasted in ms, takeovers in a row expected then,
    /// 0 for none): the broker's word counts at once; unexplained closes from the third
    /// short one in a row; a long session or another kind of loss starts over.
    #[test]
    fn which_losses_are_takeovers() {
        use SessionEnd::*;
        let cases: &[&[(SessionEnd, u64, u32)]] = &[
            &[(TakenOver, 10, 1), (TakenOver, 10, 2), (TakenOver, 10, 3)],
            &[
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 1),
                (ClosedByBroker, 10, 2),
            ],
            // A device moved to another cohort twice: closed twice, then a long session.
            &[
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 5_000, 0),
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 1),
            ],
            &[(TakenOver, 10, 1), (Other, 10, 0), (TakenOver, 10, 1)],
            &[
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 0),
                (Other, 10, 0),
                (ClosedByBroker, 10, 0),
            ],
            &[
                (TakenOver, 10, 1),
                (TakenOver, 10, 2),
                (TakenOver, 60_000, 1),
            ],
            &[
                (TakenOver, 10, 1),
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 0),
                (ClosedByBroker, 10, 2),
            ],
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for (n, case) in cases.iter().enumerate() {
            let mut t = takeovers(1_000, 60_000);
            for (i, (end, lasted, want)) in case.iter().enumerate() {
                let got = t.session_lost(*end, MS(*lasted), &mut rng);
                assert_eq!(got.map_or(0, |t| t.in_a_row), *want, "case {n}, loss {i}");
                if let Some(got) = got {
                    assert_eq!(got.certain, *end == TakenOver, "case {n}, loss {i}");
                }
            }
        }
    }

    #[test]
    fn takeover_lines_name_the_cause_in_plain_words() {
        let certain = Takeover {
            in_a_row: 2,
            wait: MS(20_000),
            certain: true,
        };
        assert_eq!(
            certain.to_string(),
            "another connection using this device's identity took the session over; is a \
             second agent running? Backing off: reconnecting in 20.0 s (2 in a row)"
        );
        let inferred = Takeover {
            certain: false,
            ..certain
        };
        assert!(inferred.to_string().starts_with(
            "the broker closed the session again and again soon after it began, most likely \
             because another connection using this device's identity took the session over; \
             is a second agent running?"
        ));
    }

    /// Two agents with one identity: each connect takes the session from the other, and each
    /// waits as its takeovers say. Over ten minutes they take it from each other only a handful
    /// of times, where reconnecting after the usual backoff did it every second or so.
    #[test]
    fn two_agents_sharing_an_identity_settle() {
        for end in [SessionEnd::TakenOver, SessionEnd::ClosedByBroker] {
            let mut rng = StdRng::seed_from_u64(8);
            let config = BackoffConfig::default();
            let mut agents = [Takeovers::new(&config), Takeovers::new(&config)];
            let quick = MS(500);
            // Agent 0 connected at 0; agent 1 connects at 1 s and takes the session over.
            let (mut now, mut holder, mut since) = (MS(1_000), 1usize, MS(1_000));
            let mut next_connect = [Duration::MAX, Duration::MAX];
            let mut taken = 1;
            let after = agents[0].session_lost(end, now, &mut rng);
            next_connect[0] = now + after.map_or(quick, |t| t.wait);
            while now < MS(600_000) {
                let other = 1 - holder;
                now = next_connect[other];
                if now >= MS(600_000) {
                    break;
                }
                // `other` connects and takes the session from `holder`.
                let after = agents[holder].session_lost(end, now - since, &mut rng);
                next_connect[holder] = now + after.map_or(quick, |t| t.wait);
                next_connect[other] = Duration::MAX;
                since = now;
                holder = other;
                taken += 1;
            }
            assert!(taken <= 16, "{end:?}: {taken} takeovers in ten minutes");
        }
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
            ..BackoffConfig::default()
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
