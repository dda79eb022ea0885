//! Singleton tasks across replicas: a task that must run on exactly one replica at a time (the
//! rollout engine, the pruner, the refused-connection watch, the node reaper) runs while this
//! replica holds the task's lease in the database.
//!
//! # Invariants
//! - The task runs only inside a term: it starts after the lease was granted and is told to
//!   stop once no renewal has succeeded for `ttl / 2` (counted on this process's monotonic
//!   clock from before the last granted request; failed renewals are retried every
//!   `ttl / 12`), or at once when another holder has the lease or the term changed under it. It gets the rest of the term to return and is aborted at the
//!   term's local end, so it is over before the database lets anyone else take the lease.
//! - That bounds overlap only for a process that keeps running. A process paused past its term
//!   (SIGSTOP, swap) may act once more when it wakes; writes that must never be doubled check
//!   the fencing token ([`Singleton::leading`]) in their own transaction.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{info, warn};

use crate::store::{Lease, Store};

/// A task that runs on one replica at a time, under lease `name`.
#[derive(Debug)]
pub struct Singleton {
    store: Store,
    name: String,
    holder: String,
    ttl: Duration,
    leading: watch::Sender<Option<i64>>,
}

/// Why a term ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepDown {
    Shutdown,
    TaskEnded,
    Taken,
    RenewalFailed,
}

impl StepDown {
    fn as_str(self) -> &'static str {
        match self {
            StepDown::Shutdown => "shutdown",
            StepDown::TaskEnded => "task ended",
            StepDown::Taken => "lease taken",
            StepDown::RenewalFailed => "renewal failed",
        }
    }
}

impl Singleton {
    /// A singleton under lease `name`, held as `holder` (unique per process, e.g. a node id
    /// plus a random instance id) for `ttl` per renewal; renewed and retried every `ttl / 3`.
    pub fn new(store: Store, name: &str, holder: &str, ttl: Duration) -> Singleton {
        Singleton {
            store,
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl: ttl.max(Duration::from_millis(30)),
            leading: watch::channel(None).0,
        }
    }

    /// `Some(fencing token)` while this process leads, `None` otherwise: for metrics and
    /// health, and for fencing writes.
    pub fn leading(&self) -> watch::Receiver<Option<i64>> {
        self.leading.subscribe()
    }

    /// Tries to take the lease every `ttl / 3` until `stop` turns true; while it holds it, runs
    /// `make(task_stop)`, whose `task_stop` turns true when the term ends (lease lost, or
    /// shutdown). A task that returns by itself gives the lease up, and is made again the
    /// next time this process wins it. On shutdown the lease is released, so another replica
    /// takes over within `ttl / 3`.
    pub async fn run<F, Fut>(self, mut stop: watch::Receiver<bool>, make: F)
    where
        F: Fn(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let every = self.ttl / 3;
        loop {
            if *stop.borrow() {
                break;
            }
            let started = Instant::now();
            match timeout(
                every,
                self.store
                    .try_acquire_lease(&self.name, &self.holder, self.ttl),
            )
            .await
            {
                Ok(Ok(Some(lease))) => {
                    let why = self.lead(lease, started, &mut stop, &make).await;
                    if why == StepDown::Shutdown {
                        break;
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) if e.is_closed() => break,
                Ok(Err(e)) => warn!(lease = %self.name, error = %e, "taking the lease failed"),
                Err(_) => warn!(lease = %self.name, "taking the lease timed out"),
            }
            tokio::select! {
                _ = wait_true(&mut stop) => break,
                _ = sleep_until(started + every) => {}
            }
        }
    }

    /// One term: runs the task and renews until the term ends, then stops the task.
    async fn lead<F, Fut>(
        &self,
        lease: Lease,
        started: Instant,
        stop: &mut watch::Receiver<bool>,
        make: &F,
    ) -> StepDown
    where
        F: Fn(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let every = self.ttl / 3;
        info!(lease = %self.name, holder = %self.holder, token = lease.token, "became leader");
        self.leading.send_replace(Some(lease.token));
        let (task_stop, task_stopped) = watch::channel(false);
        let mut task = tokio::spawn(make(task_stopped));
        // If this future is dropped mid-term, the task must not outlive the lease.
        let _abort = AbortOnDrop(task.abort_handle());
        let mut last_ok = started;
        let mut next = started + every;
        let why = loop {
            tokio::select! {
                biased;
                _ = wait_true(stop) => break StepDown::Shutdown,
                result = &mut task => {
                    if let Err(e) = result {
                        warn!(lease = %self.name, error = %e, "singleton task failed");
                    }
                    break StepDown::TaskEnded;
                }
                _ = sleep_until(next) => {}
            }
            let attempt = Instant::now();
            let give_up = last_ok + self.ttl / 2;
            if attempt >= give_up {
                break StepDown::RenewalFailed;
            }
            let renewed = tokio::time::timeout_at(
                give_up.min(attempt + every),
                self.store
                    .try_acquire_lease(&self.name, &self.holder, self.ttl),
            )
            .await;
            match renewed {
                Ok(Ok(Some(l))) if l.token == lease.token => {
                    last_ok = attempt;
                    next = attempt + every;
                }
                // A new term: ours had expired in the database, so another may have led.
                Ok(Ok(Some(_))) | Ok(Ok(None)) => break StepDown::Taken,
                Ok(Err(e)) => {
                    warn!(lease = %self.name, error = %e, "renewing the lease failed");
                    next = attempt + every / 4;
                }
                Err(_) => {
                    warn!(lease = %self.name, "renewing the lease timed out");
                    next = Instant::now();
                }
            }
        };
        task_stop.send_replace(true);
        if why != StepDown::TaskEnded
            && tokio::time::timeout_at(last_ok + self.ttl, &mut task)
                .await
                .is_err()
        {
            warn!(lease = %self.name, "singleton task still running when its term ended; aborted");
            task.abort();
            let _ = task.await;
        }
        self.leading.send_replace(None);
        if matches!(why, StepDown::Shutdown | StepDown::TaskEnded) {
            if let Err(e) = self.store.release_lease(&self.name, &self.holder).await {
                warn!(lease = %self.name, error = %e, "releasing the lease failed; it expires");
            }
        }
        info!(lease = %self.name, holder = %self.holder, token = lease.token, reason = why.as_str(), "stepped down");
        why
    }
}

/// [`Singleton::run`] for a singleton nobody needs to observe.
pub async fn run_singleton<F, Fut>(
    store: Store,
    name: &str,
    holder: &str,
    ttl: Duration,
    stop: watch::Receiver<bool>,
    make: F,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    Singleton::new(store, name, holder, ttl)
        .run(stop, make)
        .await
}

/// Aborts a spawned task when dropped (a no-op once it finished).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Returns when `flag` turns true or its sender is gone.
pub(crate) async fn wait_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}
