//! The rollout engine: drives every live deployment and keeps each cohort's retained
//! `cohorts/{cohort_id}/updates` message equal to its newest deployment.
//!
//! Once per tick (and at once when [`Rollouts::wake`] is called) it looks at every active,
//! paused or newest-of-its-cohort deployment: gives executions to devices that joined the
//! cohort, defers admitted devices that are not reachable and counts again (starting their
//! timeout clock) those that became reachable, times out silent ones, fails executions whose
//! device runs another version than it claimed, and for an active rollout asks
//! [`policy::decide`] what comes next (admit more devices, next wave, complete, pause or roll
//! back). Then it publishes the cohort message if the deployment's revision changed since it
//! last did.
//!
//! # Reachable devices
//! A device is reachable when it is online, not quarantined, and has reported a firmware
//! version (an update agent does on every connect; a plain MQTT client never does). Waves
//! count and rank reachable devices only. A device that a wave's cutoff passes while it is not
//! reachable is admitted all the same (devices compute their admission from the cutoff), but
//! `deferred`: it holds up no wave and trips no threshold, and when it becomes reachable the
//! retained cohort message makes it install, and it counts again. Presence and reported state
//! are read from the database, so this adds nothing to the broker's per-message path.
//!
//! # Invariants
//! - The engine is the only publisher of `cohorts/{id}/updates` (the broker refuses every
//!   client there). The message is derived from the deployment row alone, so republishing after
//!   a restart (the router's retained messages live in memory) restores exactly what devices
//!   saw.
//! - Every change the engine makes is conditional on the deployment's revision and state, so a
//!   concurrent pause or rollback from the REST bridge wins and the engine's step is dropped.
//! - Nothing here runs on a device's connect or publish path.

pub mod policy;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_wire::update::{DeploymentState, UpdateCommand};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::ops::Ops;
use crate::store::{
    Deployment, DeploymentKind, NewDeployment, Release, StateChange, Store, StoreError,
};
use policy::{decide, Decision, Position, RolloutPolicy};

/// A handle the REST bridge uses to make the engine look now.
#[derive(Clone, Default)]
pub struct Rollouts {
    wake: Arc<Notify>,
}

impl Rollouts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the engine for a pass at once (after a deployment was created or changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Why a rollback cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("the deployment has no previous release to roll back to; name one")]
    NoPreviousRelease,
    #[error("release {0} does not exist")]
    UnknownRelease(String),
    #[error("release {0} belongs to another product")]
    OtherProduct(String),
    #[error("deployment {0} is {1} and cannot be rolled back")]
    NotLive(String, &'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Re-targets the deployment's cohort to `target` (by default the release the cohort ran
/// before) with a new `rollback` deployment that admits every device at once. The deployment
/// becomes `rolled_back` with `reason`, in the same transaction.
pub async fn rollback(
    store: &Store,
    d: &Deployment,
    target: Option<&str>,
    reason: &str,
) -> Result<Deployment, RollbackError> {
    if !matches!(
        d.state,
        DeploymentState::Active | DeploymentState::Paused | DeploymentState::Completed
    ) {
        return Err(RollbackError::NotLive(d.id.clone(), d.state.as_str()));
    }
    let target = target
        .map(str::to_owned)
        .or_else(|| d.previous_release_id.clone())
        .ok_or(RollbackError::NoPreviousRelease)?;
    let release = store
        .release(&target)
        .await?
        .ok_or_else(|| RollbackError::UnknownRelease(target.clone()))?;
    if release.manifest.product_id != d.product_id {
        return Err(RollbackError::OtherProduct(target));
    }
    let new = NewDeployment {
        release,
        cohort_id: d.cohort_id.clone(),
        kind: DeploymentKind::Rollback,
        policy: RolloutPolicy::rollback(None, d.policy.timeout_s),
        reason: format!("rollback of {}: {reason}", d.id),
        rollback_of: Some(d.id.clone()),
    };
    Ok(store.create_deployment(&new).await?)
}

/// Runs the engine until `stopped` turns true.
pub async fn run(
    store: Store,
    ops: Ops,
    rollouts: Rollouts,
    tick: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut engine = Engine {
        store,
        ops,
        published: HashMap::new(),
        releases: HashMap::new(),
    };
    let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = rollouts.wake.notified() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if let Err(e) = engine.pass().await {
            if e.is_closed() {
                return;
            }
            warn!(error = %e, "rollout engine pass failed; retrying on the next tick");
        }
    }
}

struct Engine {
    store: Store,
    ops: Ops,
    /// Per cohort: the deployment and revision its retained message carries.
    published: HashMap<String, (String, u64)>,
    /// Releases are immutable: fetched once.
    releases: HashMap<String, Release>,
}

/// Decisions one deployment may take in one pass (admit, then advance, then admit again...).
const STEPS_PER_PASS: usize = 4;

impl Engine {
    async fn pass(&mut self) -> Result<(), StoreError> {
        let live = self.store.live_deployments().await?;
        let mut newest: HashMap<String, String> = HashMap::new();
        for d in &live {
            let e = newest
                .entry(d.cohort_id.to_string())
                .or_insert_with(|| d.id.clone());
            if d.id > *e {
                *e = d.id.clone();
            }
        }
        for d in live {
            let cohort = d.cohort_id.to_string();
            let d = self.drive(d).await?;
            if newest.get(&cohort) == Some(&d.id) {
                self.publish(&d).await?;
            }
        }
        Ok(())
    }

    async fn release(&mut self, id: &str) -> Result<Release, StoreError> {
        if let Some(r) = self.releases.get(id) {
            return Ok(r.clone());
        }
        let r =
            self.store.release(id).await?.ok_or_else(|| {
                StoreError::Corrupt(format!("release {id} of a deployment is gone"))
            })?;
        self.releases.insert(id.to_owned(), r.clone());
        Ok(r)
    }

    /// Bookkeeping and the rollout's next steps; returns the deployment as it is after them.
    async fn drive(&mut self, mut d: Deployment) -> Result<Deployment, StoreError> {
        if !matches!(
            d.state,
            DeploymentState::Active | DeploymentState::Paused | DeploymentState::Completed
        ) {
            return Ok(d);
        }
        self.store.enroll_new_devices(&d).await?;
        self.store.refresh_reachability(&d.id).await?;
        if d.state == DeploymentState::Paused {
            return Ok(d);
        }
        let timeout_ms = i64::try_from(d.policy.timeout_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let timed_out = self.store.time_out_executions(&d.id, timeout_ms).await?;
        if !timed_out.is_empty() {
            info!(deployment_id = %d.id, devices = timed_out.len(), "update executions timed out");
        }
        let release = self.release(&d.release_id).await?;
        self.store
            .fail_mismatched_versions(&d.id, &release.manifest.version)
            .await?;
        for _ in 0..STEPS_PER_PASS {
            if d.state != DeploymentState::Active {
                break;
            }
            let summary = self.store.execution_summary(&d.id).await?;
            let pos = Position {
                wave: d.current_wave,
                admits_all: d.admit_below == fleet_wire::update::ADMIT_ALL,
                rate_started_at_ms: d.rate_started_at_ms.unwrap_or(d.created_at_ms),
                rate_base: d.rate_base,
            };
            let decision = decide(&d.policy, &pos, &summary.counts, crate::store::now_ms());
            let next = match decision {
                Decision::Wait => break,
                Decision::Admit { n, then_all } => self.store.admit(&d, n, then_all).await?,
                Decision::AdmitAll => self.store.admit(&d, 0, true).await?,
                Decision::NextWave(w) => {
                    info!(deployment_id = %d.id, wave = w + 1, "rollout wave starts");
                    self.store
                        .advance_deployment(&d, w, summary.counts.admitted, None)
                        .await?
                }
                Decision::Complete(reason) => {
                    info!(deployment_id = %d.id, %reason, "deployment completed");
                    self.store
                        .advance_deployment(
                            &d,
                            d.current_wave,
                            summary.counts.admitted,
                            Some(&reason),
                        )
                        .await?
                }
                Decision::Stop {
                    rollback: back,
                    reason,
                } => {
                    return self.stop(&d, back, &reason).await;
                }
            };
            match next {
                Some(n) if n.revision != d.revision => d = n,
                Some(_) => break,
                // Changed under us (a pause or rollback from the REST bridge): next pass.
                None => break,
            }
        }
        Ok(d)
    }

    /// Pauses the deployment, or rolls it back; a rollback without a previous release pauses.
    async fn stop(
        &mut self,
        d: &Deployment,
        back: bool,
        reason: &str,
    ) -> Result<Deployment, StoreError> {
        if back && d.kind == DeploymentKind::Rollout {
            match rollback(&self.store, d, None, reason).await {
                Ok(r) => {
                    warn!(deployment_id = %d.id, rollback = %r.id, %reason, "deployment rolled back");
                    // The cohort now carries the rollback; the caller publishes the newest.
                    return Ok(self
                        .store
                        .deployment(&d.id)
                        .await?
                        .unwrap_or_else(|| d.clone()));
                }
                Err(RollbackError::Store(e)) => return Err(e),
                Err(e) => {
                    let reason = format!("{reason}; not rolled back: {e}");
                    return self.pause(d, &reason).await;
                }
            }
        }
        self.pause(d, reason).await
    }

    async fn pause(&mut self, d: &Deployment, reason: &str) -> Result<Deployment, StoreError> {
        warn!(deployment_id = %d.id, %reason, "deployment paused");
        let change = StateChange {
            from: &[DeploymentState::Active],
            to: DeploymentState::Paused,
        };
        Ok(self
            .store
            .set_deployment_state(&d.id, change, reason)
            .await?
            .unwrap_or_else(|| d.clone()))
    }

    async fn publish(&mut self, d: &Deployment) -> Result<(), StoreError> {
        let key = d.cohort_id.to_string();
        if self.published.get(&key) == Some(&(d.id.clone(), d.revision)) {
            return Ok(());
        }
        let release = self.release(&d.release_id).await?;
        let command = UpdateCommand {
            deployment_id: d.id.clone(),
            state: d.state,
            release: release.signed(),
            admit_below: d.admit_below,
            jitter_s: d.policy.jitter_s,
            revision: d.revision,
            issued_at_ms: crate::store::now_ms(),
        };
        if !self
            .ops
            .publish_cohort_update(&d.cohort_id, &command)
            .await?
        {
            warn!("no broker to publish cohort updates on");
            return Ok(());
        }
        info!(cohort_id = %d.cohort_id, deployment_id = %d.id, revision = d.revision,
            state = d.state.as_str(), admit_below = d.admit_below, "cohort update published");
        self.published.insert(key, (d.id.clone(), d.revision));
        Ok(())
    }
}
