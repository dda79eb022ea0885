//! How a staged rollout proceeds, as pure functions of what the store counted: no I/O, no
//! clock of its own, so every rule is table-tested.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A wave's size: a percentage of the cohort or a number of devices, cumulative (a wave of
/// 50 % after one of 10 % admits 40 % more).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Wave {
    Percent(f64),
    Count(u64),
}

impl Wave {
    /// How many of `total` devices this wave covers, at least one when there are any.
    pub fn target(self, total: u64) -> u64 {
        let n = match self {
            Wave::Percent(p) => ((p / 100.0) * total as f64).ceil() as u64,
            Wave::Count(n) => n,
        };
        n.min(total).max(u64::from(total > 0))
    }

    fn covers_all(self) -> bool {
        matches!(self, Wave::Percent(p) if p >= 100.0)
    }
}

/// What a tripped failure threshold does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    Pause,
    Rollback,
}

/// The rules of one deployment. Every field has a default, so `{}` is a valid policy: one wave
/// of the whole cohort, no rate limit, pause when more than 10 % of at least 5 finished
/// devices failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
#[schema(default)]
pub struct RolloutPolicy {
    /// Cumulative waves. A final wave of the whole cohort is implied when the last one covers
    /// less.
    pub waves: Vec<Wave>,
    /// Devices admitted per minute at most; none means a wave is admitted at once.
    pub max_per_minute: Option<u32>,
    /// An admitted device waits a random time up to this before it downloads.
    pub jitter_s: u32,
    /// A wave is done when this share of the finished devices succeeded.
    pub success_threshold_percent: f64,
    /// The deployment stops (see `on_failure`) when failed + rejected + timed out exceed this
    /// share of the finished devices...
    pub failure_threshold_percent: f64,
    /// ...once at least this many devices have finished.
    pub min_devices: u64,
    pub on_failure: OnFailure,
    /// A counted device (admitted and reachable, see [`Counts`]) that reports nothing for
    /// this long, or a device that started and then fell silent, is `timed_out`.
    pub timeout_s: u64,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            waves: vec![Wave::Percent(100.0)],
            max_per_minute: None,
            jitter_s: 0,
            success_threshold_percent: 90.0,
            failure_threshold_percent: 10.0,
            min_devices: 5,
            on_failure: OnFailure::Pause,
            timeout_s: 3600,
        }
    }
}

/// Why a policy is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("waves must not be empty")]
    NoWaves,
    #[error("wave {0}: a percentage must be above 0 and at most 100")]
    BadPercent(usize),
    #[error("wave {0}: a count must be at least 1")]
    BadCount(usize),
    #[error("wave {0} is not larger than the wave before it")]
    NotGrowing(usize),
    #[error("{0} must be between 0 and 100")]
    BadThreshold(&'static str),
    #[error("max_per_minute must be at least 1")]
    BadRate,
    #[error("timeout_s must be between 1 and 2592000 (30 days)")]
    BadTimeout,
    #[error("jitter_s must be at most 86400 (one day)")]
    BadJitter,
}

impl RolloutPolicy {
    /// Checks the policy and appends the implied final wave.
    pub fn validated(mut self) -> Result<Self, PolicyError> {
        if self.waves.is_empty() {
            return Err(PolicyError::NoWaves);
        }
        let mut last_percent = 0.0;
        let mut last_count = 0;
        for (i, w) in self.waves.iter().enumerate() {
            match *w {
                Wave::Percent(p) => {
                    if !(p > 0.0 && p <= 100.0) {
                        return Err(PolicyError::BadPercent(i));
                    }
                    if p <= last_percent {
                        return Err(PolicyError::NotGrowing(i));
                    }
                    last_percent = p;
                }
                Wave::Count(n) => {
                    if n == 0 {
                        return Err(PolicyError::BadCount(i));
                    }
                    if n <= last_count {
                        return Err(PolicyError::NotGrowing(i));
                    }
                    last_count = n;
                }
            }
        }
        for (name, v) in [
            ("success_threshold_percent", self.success_threshold_percent),
            ("failure_threshold_percent", self.failure_threshold_percent),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(PolicyError::BadThreshold(name));
            }
        }
        if self.max_per_minute == Some(0) {
            return Err(PolicyError::BadRate);
        }
        if !(1..=2_592_000).contains(&self.timeout_s) {
            return Err(PolicyError::BadTimeout);
        }
        if self.jitter_s > 86_400 {
            return Err(PolicyError::BadJitter);
        }
        if !self.waves.last().is_some_and(|w| w.covers_all()) {
            self.waves.push(Wave::Percent(100.0));
        }
        Ok(self)
    }

    /// The policy of a rollback: everyone at once (or at the given rate), and no threshold
    /// that would roll the rollback back.
    pub fn rollback(max_per_minute: Option<u32>, timeout_s: u64) -> Self {
        Self {
            waves: vec![Wave::Percent(100.0)],
            max_per_minute,
            jitter_s: 0,
            success_threshold_percent: 0.0,
            failure_threshold_percent: 100.0,
            min_devices: u64::MAX,
            on_failure: OnFailure::Pause,
            timeout_s,
        }
    }
}

/// Execution counts of one deployment, as the store counted them.
///
/// A device is *reachable* when it is online, not quarantined, and runs an update agent (it
/// has reported a firmware version). Waves count reachable devices only: an admitted device
/// that is not reachable is `deferred`, neither in `admitted` nor in any threshold, until it
/// becomes reachable or reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Devices with an execution (the cohort's devices since the deployment began).
    pub total: u64,
    /// Admitted and not deferred: the devices the waves so far count.
    pub admitted: u64,
    /// Not admitted yet, and reachable now: what the next admission chooses from.
    pub ready: u64,
    /// Admitted, but not reachable: not counted until they are.
    pub deferred: u64,
    /// Admitted and reachable since admission, so they have heard of the update.
    pub notified: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub rejected: u64,
    pub timed_out: u64,
}

impl Counts {
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failures()
    }

    pub fn failures(&self) -> u64 {
        self.failed + self.rejected + self.timed_out
    }

    /// Failures as a percentage of finished devices; 0 when none finished.
    pub fn failure_percent(&self) -> f64 {
        percent(self.failures(), self.finished())
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Where an active rollout is: its wave and its rate clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub wave: u32,
    /// Whether every device is admitted already (`admit_below` is `ADMIT_ALL`).
    pub admits_all: bool,
    /// When admission at the current rate began (wave start or resume), and how many devices
    /// were admitted then.
    pub rate_started_at_ms: i64,
    pub rate_base: u64,
}

/// What the engine should do next with an active rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do until more devices report or time passes.
    Wait,
    /// Admit this many more devices (lowest ranks first); `then_all` once this admits every
    /// device of the final wave, so devices joining later are admitted too.
    Admit { n: u64, then_all: bool },
    /// Every device of the final wave is admitted: admit everyone from now on.
    AdmitAll,
    /// The wave is done and good: start the next one.
    NextWave(u32),
    /// The final wave is done.
    Complete(String),
    /// Failure threshold tripped, or a wave finished below its success threshold.
    Stop { rollback: bool, reason: String },
}

/// The next step of an active rollout.
///
/// Thresholds come first: failed + rejected + timed out above `failure_threshold_percent` of
/// the finished devices, once `min_devices` finished, stops the rollout (pause or rollback).
/// Then admission: a wave covers its share of the reachable devices (those admitted and not
/// deferred, plus those ready), lowest ranks first, at `max_per_minute` (one at once, then one
/// per `60 / rate` seconds). A wave with no reachable device admits nobody and waits, except
/// the final one, which opens to every device (those not reachable are deferred). A wave is
/// done when every counted device has finished (a deferred device converges when it becomes
/// reachable, and does not hold up the fleet); then the next wave starts if enough of the
/// finished devices succeeded, or the rollout pauses. The final wave completes the rollout
/// once it has a finished device and every counted one finished, deferred ones still shown.
pub fn decide(policy: &RolloutPolicy, pos: &Position, counts: &Counts, now_ms: i64) -> Decision {
    if counts.finished() >= policy.min_devices
        && counts.failure_percent() > policy.failure_threshold_percent
    {
        return Decision::Stop {
            rollback: policy.on_failure == OnFailure::Rollback,
            reason: format!(
                "failure threshold: {} of {} finished devices failed ({:.1} % > {} %)",
                counts.failures(),
                counts.finished(),
                counts.failure_percent(),
                policy.failure_threshold_percent
            ),
        };
    }
    let last = policy.waves.len().saturating_sub(1) as u32;
    let wave = pos.wave.min(last);
    let target = policy.waves[wave as usize].target(counts.admitted + counts.ready);
    let final_wave = wave == last;
    if counts.admitted < target {
        let mut n = target - counts.admitted;
        if let Some(rate) = policy.max_per_minute {
            let elapsed = (now_ms - pos.rate_started_at_ms).max(0) as u64;
            let allowed = pos.rate_base + 1 + elapsed * u64::from(rate) / 60_000;
            n = n.min(allowed.saturating_sub(counts.admitted));
        }
        if n == 0 {
            return Decision::Wait;
        }
        return Decision::Admit {
            n,
            then_all: final_wave && counts.admitted + n >= target,
        };
    }
    if final_wave && !pos.admits_all {
        return Decision::AdmitAll;
    }
    // Every admitted device that heard of the update has finished?
    let unfinished_notified = counts.notified.saturating_sub(counts.finished());
    if unfinished_notified > 0 || counts.finished() == 0 {
        return Decision::Wait;
    }
    let success = percent(counts.succeeded, counts.finished());
    let mut summary = format!(
        "{} of {} finished devices succeeded ({success:.1} %)",
        counts.succeeded,
        counts.finished()
    );
    if counts.deferred > 0 {
        summary += &format!(
            "; {} deferred (offline, never connected or without an update agent)",
            counts.deferred
        );
    }
    if final_wave {
        if counts.finished() < counts.admitted {
            // Counted devices not finished yet (admitted but not yet heard of it).
            return Decision::Wait;
        }
        return Decision::Complete(summary);
    }
    if success >= policy.success_threshold_percent {
        Decision::NextWave(wave + 1)
    } else {
        Decision::Stop {
            rollback: false,
            reason: format!(
                "wave {} finished below its success threshold: {summary}, {} % wanted",
                wave + 1,
                policy.success_threshold_percent
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(waves: Vec<Wave>) -> RolloutPolicy {
        RolloutPolicy {
            waves,
            ..Default::default()
        }
        .validated()
        .unwrap()
    }

    fn pos(wave: u32) -> Position {
        Position {
            wave,
            admits_all: false,
            rate_started_at_ms: 0,
            rate_base: 0,
        }
    }

    #[test]
    fn wave_targets() {
        assert_eq!(Wave::Percent(10.0).target(1000), 100);
        assert_eq!(Wave::Percent(10.0).target(5), 1, "rounds up");
        assert_eq!(Wave::Percent(0.1).target(3), 1, "at least one device");
        assert_eq!(Wave::Count(50).target(20), 20, "never more than the cohort");
        assert_eq!(Wave::Count(5).target(0), 0);
    }

    #[test]
    fn validation() {
        let cases: Vec<(Vec<Wave>, Result<usize, PolicyError>)> = vec![
            (vec![Wave::Percent(10.0), Wave::Percent(50.0)], Ok(3)),
            (vec![Wave::Count(5), Wave::Count(50)], Ok(3)),
            (vec![Wave::Percent(100.0)], Ok(1)),
            (vec![], Err(PolicyError::NoWaves)),
            (vec![Wave::Percent(0.0)], Err(PolicyError::BadPercent(0))),
            (vec![Wave::Percent(101.0)], Err(PolicyError::BadPercent(0))),
            (
                vec![Wave::Percent(50.0), Wave::Percent(50.0)],
                Err(PolicyError::NotGrowing(1)),
            ),
            (vec![Wave::Count(0)], Err(PolicyError::BadCount(0))),
        ];
        for (waves, want) in cases {
            let got = RolloutPolicy {
                waves: waves.clone(),
                ..Default::default()
            }
            .validated()
            .map(|p| p.waves.len());
            assert_eq!(got, want, "{waves:?}");
        }
        let bad = RolloutPolicy {
            max_per_minute: Some(0),
            ..Default::default()
        };
        assert_eq!(bad.validated(), Err(PolicyError::BadRate));
        let bad = RolloutPolicy {
            failure_threshold_percent: 120.0,
            ..Default::default()
        };
        assert_eq!(
            bad.validated(),
            Err(PolicyError::BadThreshold("failure_threshold_percent"))
        );
        let parsed: RolloutPolicy = serde_json::from_str(
            r#"{"waves":[{"percent":10},{"count":500}],"on_failure":"rollback"}"#,
        )
        .unwrap();
        assert_eq!(parsed.on_failure, OnFailure::Rollback);
        assert!(serde_json::from_str::<RolloutPolicy>(r#"{"wavez":[]}"#).is_err());
    }

    /// Counts of a cohort whose every device is reachable.
    fn counts(total: u64, admitted: u64, notified: u64, ok: u64, failed: u64) -> Counts {
        Counts {
            total,
            admitted,
            ready: total - admitted,
            notified,
            succeeded: ok,
            failed,
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let staged = policy(vec![Wave::Percent(10.0), Wave::Percent(50.0)]);
        let cases: Vec<(&str, Position, Counts, Decision)> = vec![
            (
                "first wave admitted at once without a rate",
                pos(0),
                counts(100, 0, 0, 0, 0),
                Decision::Admit {
                    n: 10,
                    then_all: false,
                },
            ),
            (
                "wave admitted, devices still working",
                pos(0),
                counts(100, 10, 10, 6, 0),
                Decision::Wait,
            ),
            (
                "wave done and good",
                pos(0),
                counts(100, 10, 10, 10, 0),
                Decision::NextWave(1),
            ),
            (
                "a deferred device does not hold up the wave: a reachable one takes its place",
                pos(0),
                Counts {
                    deferred: 1,
                    ..counts(100, 9, 9, 9, 0)
                },
                Decision::Admit {
                    n: 1,
                    then_all: false,
                },
            ),
            (
                "the wave counts reachable devices only",
                pos(0),
                Counts {
                    ready: 35,
                    deferred: 2,
                    ..counts(100, 5, 5, 5, 0)
                },
                Decision::NextWave(1),
            ),
            (
                "no reachable device: a staged wave admits nobody and waits",
                pos(0),
                Counts {
                    ready: 0,
                    ..counts(4, 0, 0, 0, 0)
                },
                Decision::Wait,
            ),
            (
                "the walk-through: one agent of four, waves of 10 % and 50 %",
                pos(0),
                Counts {
                    ready: 1,
                    ..counts(4, 0, 0, 0, 0)
                },
                Decision::Admit {
                    n: 1,
                    then_all: false,
                },
            ),
            (
                "the walk-through's second wave has nobody more to admit",
                pos(1),
                Counts {
                    ready: 0,
                    deferred: 1,
                    ..counts(4, 1, 1, 1, 0)
                },
                Decision::NextWave(2),
            ),
            (
                "nobody online yet: wait",
                pos(0),
                counts(100, 10, 0, 0, 0),
                Decision::Wait,
            ),
            (
                "second wave admits the rest of its share",
                pos(1),
                counts(100, 10, 10, 10, 0),
                Decision::Admit {
                    n: 40,
                    then_all: false,
                },
            ),
            (
                "final wave admits the rest and then everyone",
                pos(2),
                counts(100, 50, 50, 50, 0),
                Decision::Admit {
                    n: 50,
                    then_all: true,
                },
            ),
            (
                "final wave admitted but not yet marked all",
                pos(2),
                counts(100, 100, 100, 10, 0),
                Decision::AdmitAll,
            ),
            (
                "failure threshold (10 %) passed after 5 finished",
                pos(0),
                counts(100, 10, 10, 4, 2),
                Decision::Stop {
                    rollback: false,
                    reason: "failure threshold: 2 of 6 finished devices failed (33.3 % > 10 %)"
                        .into(),
                },
            ),
            (
                "too few finished to judge",
                pos(0),
                counts(100, 10, 10, 2, 2),
                Decision::Wait,
            ),
        ];
        for (name, p, c, want) in cases {
            assert_eq!(decide(&staged, &p, &c, 0), want, "{name}");
        }

        let mut done = pos(2);
        done.admits_all = true;
        assert!(matches!(
            decide(&staged, &done, &counts(100, 100, 100, 98, 2), 0),
            Decision::Complete(_)
        ));
        assert_eq!(
            decide(&staged, &done, &counts(100, 100, 90, 90, 0), 0),
            Decision::Wait,
            "counted devices that have not finished keep the rollout open"
        );
        let deferred = Counts {
            deferred: 10,
            ready: 0,
            ..counts(100, 90, 90, 90, 0)
        };
        assert_eq!(
            decide(&staged, &done, &deferred, 0),
            Decision::Complete(
                "90 of 90 finished devices succeeded (100.0 %); 10 deferred (offline, never \
                 connected or without an update agent)"
                    .into()
            ),
            "deferred devices do not keep the rollout open"
        );
        let nobody = Counts {
            deferred: 4,
            ready: 0,
            ..counts(4, 0, 0, 0, 0)
        };
        assert_eq!(
            decide(&staged, &done, &nobody, 0),
            Decision::Wait,
            "a rollout no device finished is not complete"
        );
        let mut last = pos(2);
        last.admits_all = false;
        assert_eq!(
            decide(
                &staged,
                &last,
                &Counts {
                    ready: 0,
                    ..counts(4, 0, 0, 0, 0)
                },
                0
            ),
            Decision::AdmitAll,
            "the final wave opens to everyone even when nobody is reachable yet"
        );

        // Below the success threshold but under the failure threshold: pause, no rollback.
        let lenient = RolloutPolicy {
            failure_threshold_percent: 50.0,
            ..staged.clone()
        };
        assert!(matches!(
            decide(&lenient, &pos(0), &counts(100, 10, 10, 8, 2), 0),
            Decision::Stop {
                rollback: false,
                ..
            }
        ));
        let rollback = RolloutPolicy {
            on_failure: OnFailure::Rollback,
            ..staged
        };
        assert!(matches!(
            decide(&rollback, &pos(0), &counts(100, 10, 10, 0, 5), 0),
            Decision::Stop { rollback: true, .. }
        ));
    }

    #[test]
    fn rate_limit_admits_one_then_rate_per_minute() {
        let p = RolloutPolicy {
            max_per_minute: Some(60),
            ..Default::default()
        }
        .validated()
        .unwrap();
        let start = Position {
            wave: 0,
            admits_all: false,
            rate_started_at_ms: 1_000,
            rate_base: 0,
        };
        let c = counts(100, 0, 0, 0, 0);
        let admitted = |d: Decision| match d {
            Decision::Admit { n, .. } => n,
            Decision::Wait => 0,
            other => panic!("{other:?}"),
        };
        assert_eq!(admitted(decide(&p, &start, &c, 1_000)), 1);
        assert_eq!(
            admitted(decide(&p, &start, &counts(100, 1, 0, 0, 0), 1_500)),
            0
        );
        assert_eq!(
            admitted(decide(&p, &start, &counts(100, 1, 0, 0, 0), 11_000)),
            10
        );
        // A minute later 61 are allowed in all, whatever was admitted meanwhile.
        assert_eq!(
            admitted(decide(&p, &start, &counts(100, 30, 0, 0, 0), 61_000)),
            31
        );
        // The rollback policy never trips its own thresholds.
        let rb = RolloutPolicy::rollback(None, 60);
        assert!(matches!(
            decide(&rb, &start, &counts(10, 10, 10, 0, 10), 0),
            Decision::AdmitAll
        ));
    }
}
