//! `update`: a cohort of simulated devices that install what their cohort's deployments tell
//! them, with failures injected at given rates, to exercise staged rollouts, thresholds and
//! rollback at fleet scale.
//!
//! Every simulated device is a real [`Agent`] with a real [`Updater`]: the same code a device
//! runs, downloading the artifact over HTTP and checking signature, size and hash. Failures are
//! injected at exact counts (a rate of 0.1 on 1,000 devices fails 100 of them), spread evenly
//! over the device indices: download failures (`failed`), corrupted downloads (`rejected` by
//! the hash check), install failures (`failed`), and silent devices (no updater at all, so the
//! platform times them out).
//!
//! The run follows every deployment the cohort topic carries and ends once it has seen
//! `min_deployments`, every device that reports has finished the newest one, and nothing new
//! arrived for `settle`; or at [`SimConfig::max_duration`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_wire::update::{ReleaseManifest, UpdateCommand, UpdateStatusKind};
use fleet_wire::{CohortId, DeviceId};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::hist::{Histogram, Percentiles};
use super::identities;
use super::stats::Usage;
use super::{SimConfig, SimError};
use crate::agent::{Agent, AgentConfig, AgentEvent, AgentHandle};
use crate::options::ConnectOptions;
use crate::tls::TlsConfig;
use crate::update::{FetchError, Fetcher, HttpFetcher, Installer, UpdateSettings, Updater};

/// Failure rates, each the share of devices (0 to 1) that fail that way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FailureRates {
    pub download: f64,
    pub verify: f64,
    pub install: f64,
    pub silent: f64,
}

/// What one simulated device will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    Installs,
    DownloadFails,
    VerifyFails,
    InstallFails,
    Silent,
}

/// The `update` scenario.
#[derive(Debug, Clone)]
pub struct UpdateLoad {
    pub devices: usize,
    /// Agents connecting at a time while the fleet comes up.
    pub concurrency: usize,
    /// The cohort the devices' CA provisions them into.
    pub cohort: CohortId,
    /// What the devices run at start.
    pub firmware_version: String,
    /// Release signing keys the devices trust.
    pub trusted_keys: Vec<[u8; 32]>,
    pub failures: FailureRates,
    /// How long nothing new must happen after the newest deployment finished.
    pub settle: Duration,
    /// The run does not end before the devices have seen this many deployments (for a script
    /// that deploys a baseline first, or expects a rollback).
    pub min_deployments: usize,
    /// Downloads each device's artifact with this timeout.
    pub download_timeout: Duration,
}

impl UpdateLoad {
    fn validate(&self) -> Result<(), SimError> {
        if self.devices == 0 || self.concurrency == 0 {
            return Err(SimError::Invalid(
                "devices and concurrency must be at least 1".into(),
            ));
        }
        let f = self.failures;
        for (name, r) in [
            ("download", f.download),
            ("verify", f.verify),
            ("install", f.install),
            ("silent", f.silent),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(SimError::Invalid(format!(
                    "the {name} failure rate must be between 0 and 1"
                )));
            }
        }
        if f.download + f.verify + f.install + f.silent > 1.0 + 1e-9 {
            return Err(SimError::Invalid(
                "the failure rates add up to more than 1".into(),
            ));
        }
        Ok(())
    }
}

/// Assigns fates at exact counts, spread over the indices: device `i` takes the fate whose
/// cumulative share first exceeds `(i * golden) mod 1`, a low-discrepancy sequence, so every
/// prefix of the fleet has about the same mix.
pub fn fates(n: usize, rates: FailureRates) -> Vec<Fate> {
    let counts = [
        (
            Fate::DownloadFails,
            (rates.download * n as f64).round() as usize,
        ),
        (
            Fate::VerifyFails,
            (rates.verify * n as f64).round() as usize,
        ),
        (
            Fate::InstallFails,
            (rates.install * n as f64).round() as usize,
        ),
        (Fate::Silent, (rates.silent * n as f64).round() as usize),
    ];
    // Order the devices by a low-discrepancy key and deal the failing fates out in that order.
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| {
        let ka = (*a as f64 * GOLDEN).fract();
        let kb = (*b as f64 * GOLDEN).fract();
        ka.total_cmp(&kb)
    });
    let mut out = vec![Fate::Installs; n];
    let mut next = order.into_iter();
    for (fate, count) in counts {
        for i in next.by_ref().take(count) {
            out[i] = fate;
        }
    }
    out
}

/// A deployment as the devices saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeploymentSeen {
    pub deployment_id: String,
    pub version: String,
    /// The state in the newest cohort message of this deployment.
    pub last_state: String,
    /// Devices that delivered a final report, by status.
    pub finished: BTreeMap<String, u64>,
    /// From the first cohort message of this deployment any device received to the last final
    /// report delivered (PUBACKed, so stored by the platform).
    pub all_finished_s: Option<f64>,
    /// Per device: from its first message of this deployment to its final report.
    pub time_to_finish: Percentiles,
}

/// What an `update` run reports.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateRunReport {
    pub devices: usize,
    pub connected: usize,
    /// Agents that never got a session up.
    pub not_connected: usize,
    pub connect_s: f64,
    pub fates: BTreeMap<String, u64>,
    pub deployments: Vec<DeploymentSeen>,
    pub downloads: u64,
    /// Every device finished the newest deployment (otherwise the run hit its time limit).
    pub settled: bool,
    pub elapsed_s: f64,
    pub rss_bytes: u64,
    pub rss_per_device_bytes: u64,
    pub cpu_s: f64,
}

impl UpdateRunReport {
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "update: {} devices, {} connected in {:.1} s ({} not connected)",
            self.devices, self.connected, self.connect_s, self.not_connected
        );
        let fates: Vec<String> = self.fates.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "fates: {}", fates.join(", "));
        let _ = writeln!(
            s,
            "{:<38} {:>8} {:>12} {:>10} {:>9} {:>9} {:>9}  finished",
            "deployment", "version", "state", "all done s", "p50 s", "p99 s", "max s"
        );
        let secs = |v: Option<f64>| v.map_or("-".to_owned(), |ms| format!("{:.2}", ms / 1000.0));
        for d in &self.deployments {
            let finished: Vec<String> =
                d.finished.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                s,
                "{:<38} {:>8} {:>12} {:>10} {:>9} {:>9} {:>9}  {}",
                d.deployment_id,
                d.version,
                d.last_state,
                d.all_finished_s
                    .map_or("-".to_owned(), |v| format!("{v:.2}")),
                secs(d.time_to_finish.p50_ms),
                secs(d.time_to_finish.p99_ms),
                secs(d.time_to_finish.max_ms),
                finished.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "downloads {}, settled {}, elapsed {:.1} s, client RSS {:.1} MiB ({:.1} KiB/device), CPU {:.1} s",
            self.downloads,
            self.settled,
            self.elapsed_s,
            self.rss_bytes as f64 / (1 << 20) as f64,
            self.rss_per_device_bytes as f64 / 1024.0,
            self.cpu_s
        );
        s
    }
}

/// Downloads, then breaks the download as the device's fate says.
struct FaultyFetcher {
    inner: HttpFetcher,
    fate: Fate,
    downloads: Arc<std::sync::atomic::AtomicU64>,
}

impl Fetcher for FaultyFetcher {
    async fn fetch(&self, release: &ReleaseManifest) -> Result<Bytes, FetchError> {
        if self.fate == Fate::DownloadFails {
            return Err(FetchError::Transport("injected download failure".into()));
        }
        let bytes = self.inner.fetch(release).await?;
        self.downloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.fate == Fate::VerifyFails {
            let mut b = bytes.to_vec();
            if let Some(first) = b.first_mut() {
                *first ^= 0xff;
            }
            return Ok(Bytes::from(b));
        }
        Ok(bytes)
    }
}

fn installer(fate: Fate) -> impl Installer {
    move |_: ReleaseManifest, _: Bytes| async move {
        if fate == Fate::InstallFails {
            Err("injected install failure".to_owned())
        } else {
            Ok(())
        }
    }
}

/// Per deployment, what the devices saw and reported.
#[derive(Default)]
struct Tracker {
    order: Vec<String>,
    deployments: BTreeMap<String, Tracked>,
    last_change: Option<Instant>,
}

struct Tracked {
    version: String,
    last_state: String,
    revision: u64,
    first_seen: Instant,
    /// Per device index: when it first saw the deployment.
    seen: BTreeMap<usize, Instant>,
    finished: BTreeMap<usize, (UpdateStatusKind, Instant)>,
}

impl Tracker {
    fn saw(&mut self, device: usize, cmd: &UpdateCommand, now: Instant) {
        let t = self
            .deployments
            .entry(cmd.deployment_id.clone())
            .or_insert_with(|| Tracked {
                version: cmd.release.manifest.version.clone(),
                last_state: String::new(),
                revision: 0,
                first_seen: now,
                seen: BTreeMap::new(),
                finished: BTreeMap::new(),
            });
        if t.seen.is_empty() {
            self.order.push(cmd.deployment_id.clone());
        }
        if cmd.revision >= t.revision {
            t.revision = cmd.revision;
            t.last_state = cmd.state.as_str().to_owned();
        }
        t.seen.entry(device).or_insert(now);
        self.last_change = Some(now);
    }

    fn finished(
        &mut self,
        device: usize,
        deployment: &str,
        status: UpdateStatusKind,
        now: Instant,
    ) {
        if let Some(t) = self.deployments.get_mut(deployment) {
            t.finished.entry(device).or_insert((status, now));
            self.last_change = Some(now);
        }
    }

    /// Whether `min` deployments were seen and every reporting device finished the newest.
    fn newest_done(&self, reporting: usize, min: usize) -> bool {
        self.order.len() >= min
            && self
                .order
                .last()
                .and_then(|id| self.deployments.get(id))
                .is_some_and(|t| t.finished.len() >= reporting)
    }

    fn report(&self) -> Vec<DeploymentSeen> {
        self.order
            .iter()
            .filter_map(|id| {
                let t = self.deployments.get(id)?;
                let mut finished = BTreeMap::new();
                let mut hist = Histogram::new();
                let mut last = None::<Instant>;
                for (device, (status, at)) in &t.finished {
                    *finished.entry(status.as_str().to_owned()).or_insert(0) += 1;
                    if let Some(seen) = t.seen.get(device) {
                        hist.record_duration(at.saturating_duration_since(*seen));
                    }
                    last = Some(last.map_or(*at, |l: Instant| l.max(*at)));
                }
                Some(DeploymentSeen {
                    deployment_id: id.clone(),
                    version: t.version.clone(),
                    last_state: t.last_state.clone(),
                    finished,
                    all_finished_s: last.map(|l| (l - t.first_seen).as_secs_f64()),
                    time_to_finish: hist.summary_ms(),
                })
            })
            .collect()
    }
}

/// Runs the `update` scenario.
pub async fn run(config: &SimConfig, load: &UpdateLoad) -> Result<UpdateRunReport, SimError> {
    config.validate()?;
    load.validate()?;
    if !config.shard.is_whole() {
        return Err(SimError::Invalid(
            "the update scenario runs as one process (no --shard); give it several --url to \
             spread it over broker nodes"
                .into(),
        ));
    }
    let started = Instant::now();
    let deadline = started + config.max_duration;
    let usage_start = Usage::now();
    let (Some(server_ca), Some(ca)) = (&config.server_ca_pem, &config.device_ca) else {
        return Err(SimError::Invalid(
            "update needs an mqtts:// URL, --server-ca and a device CA (--ca-cert, --ca-key)"
                .into(),
        ));
    };
    let n = load.devices;
    super::stats::check_open_files(n)?;
    let ids = (0..n)
        .map(|i| identities::device_id(&config.id_prefix, i, n))
        .collect::<Result<Vec<DeviceId>, _>>()?;
    let minted = tokio::time::timeout_at(
        deadline,
        identities::mint_identities(
            ca.clone(),
            config.key_algorithm,
            &ids,
            config.cert_cache.as_deref(),
        ),
    )
    .await
    .map_err(|_| SimError::Invalid("max duration reached while minting certificates".into()))??;
    let fates = fates(n, load.failures);
    // One HTTP client (and connection pool) for the whole fleet.
    let fetcher = HttpFetcher::new(load.download_timeout)?;
    let downloads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tracker = Arc::new(Mutex::new(Tracker::default()));

    // Bring the fleet up, `concurrency` agents at a time.
    let connect_started = Instant::now();
    let mut agents: Vec<AgentHandle> = Vec::with_capacity(n);
    let mut not_connected = 0;
    let indexed: Vec<(usize, crate::ClientIdentity)> = minted.into_iter().enumerate().collect();
    for batch in indexed.chunks(load.concurrency) {
        let mut started_batch = Vec::with_capacity(batch.len());
        for (i, identity) in batch {
            let tls = TlsConfig::from_ca_pem(server_ca)?.with_identity(identity.clone());
            let mut connect =
                ConnectOptions::new(super::shard::url_for(&config.urls, *i).clone()).with_tls(tls);
            connect.keep_alive = config.keep_alive;
            let mut agent_config = AgentConfig::new(connect);
            agent_config.cohort = Some(load.cohort.clone());
            agent_config.firmware_version = Some(load.firmware_version.clone());
            agent_config.telemetry_interval = None;
            let agent = Agent::new(agent_config);
            let events = agent.subscribe();
            let agent = agent.start()?;
            if fates[*i] != Fate::Silent {
                Updater::spawn(
                    &agent,
                    UpdateSettings {
                        trusted_keys: load.trusted_keys.clone(),
                        firmware_version: Some(load.firmware_version.clone()),
                        state_file: None,
                        update_dir: None,
                    },
                    FaultyFetcher {
                        inner: fetcher.clone(),
                        fate: fates[*i],
                        downloads: downloads.clone(),
                    },
                    installer(fates[*i]),
                );
            }
            tokio::spawn(follow(
                *i,
                agent.watch_cohort_update(),
                events,
                tracker.clone(),
            ));
            started_batch.push(agent);
        }
        for agent in &started_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            if agent
                .wait_ready(left.min(config.connect_timeout * 3))
                .await
                .is_err()
            {
                not_connected += 1;
            }
        }
        agents.extend(started_batch);
        if let Some(p) = &config.progress {
            p(&format!("update: {} of {n} devices started", agents.len()));
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let connected = agents.len() - not_connected;

    // Follow deployments until the newest is finished everywhere and stays so.
    let reporting = fates
        .iter()
        .filter(|f| **f != Fate::Silent)
        .count()
        .min(connected);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_progress = Instant::now();
    let settled = loop {
        tick.tick().await;
        let now = Instant::now();
        {
            let t = tracker.lock();
            let quiet = t
                .last_change
                .is_some_and(|c| now.saturating_duration_since(c) >= load.settle);
            if t.newest_done(reporting, load.min_deployments) && quiet {
                break true;
            }
        }
        if now >= deadline {
            break false;
        }
        if let Some(p) = &config.progress {
            if now.duration_since(last_progress) >= Duration::from_secs(1) {
                last_progress = now;
                let t = tracker.lock();
                let line = t
                    .order
                    .last()
                    .and_then(|id| t.deployments.get(id).map(|d| (id, d)))
                    .map_or("update: waiting for a deployment".to_owned(), |(id, d)| {
                        format!(
                            "update: deployment {id} ({}) seen by {}, finished {} of {reporting}",
                            d.last_state,
                            d.seen.len(),
                            d.finished.len()
                        )
                    });
                p(&line);
            }
        }
    };
    let usage = Usage::now();
    let deployments = tracker.lock().report();
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent.shutdown()).await;
    }
    let mut fate_counts = BTreeMap::new();
    for f in &fates {
        let name = serde_json::to_value(f)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *fate_counts.entry(name).or_insert(0) += 1;
    }
    Ok(UpdateRunReport {
        devices: n,
        connected,
        not_connected,
        connect_s,
        fates: fate_counts,
        deployments,
        downloads: downloads.load(std::sync::atomic::Ordering::Relaxed),
        settled,
        elapsed_s: started.elapsed().as_secs_f64(),
        rss_bytes: usage.rss,
        rss_per_device_bytes: usage.rss.saturating_sub(usage_start.rss) / n as u64,
        cpu_s: usage.cpu.saturating_sub(usage_start.cpu).as_secs_f64(),
    })
}

/// Records what device `i` saw on its cohort topic and the final reports it delivered.
async fn follow(
    i: usize,
    mut updates: tokio::sync::watch::Receiver<serde_json::Value>,
    mut events: tokio::sync::broadcast::Receiver<AgentEvent>,
    tracker: Arc<Mutex<Tracker>>,
) {
    loop {
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                let payload = updates.borrow_and_update().clone();
                if let Ok(cmd) = serde_json::from_value::<UpdateCommand>(payload) {
                    tracker.lock().saw(i, &cmd, Instant::now());
                }
            }
            event = events.recv() => match event {
                Ok(AgentEvent::UpdateReportDelivered(s)) if s.status.is_terminal() => {
                    tracker.lock().finished(i, &s.deployment_id, s.status, Instant::now());
                }
                Ok(AgentEvent::Stopped) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_have_exact_counts_spread_over_the_fleet() {
        let rates = FailureRates {
            download: 0.1,
            verify: 0.05,
            install: 0.2,
            silent: 0.05,
        };
        let f = fates(1000, rates);
        let count = |x: Fate| f.iter().filter(|y| **y == x).count();
        assert_eq!(count(Fate::DownloadFails), 100);
        assert_eq!(count(Fate::VerifyFails), 50);
        assert_eq!(count(Fate::InstallFails), 200);
        assert_eq!(count(Fate::Silent), 50);
        assert_eq!(count(Fate::Installs), 600);
        // The first tenth of the fleet has about a tenth of the install failures.
        let early = f[..100]
            .iter()
            .filter(|x| **x == Fate::InstallFails)
            .count();
        assert!((12..=28).contains(&early), "{early}");
        assert_eq!(fates(10, FailureRates::default()), vec![Fate::Installs; 10]);
    }

    #[test]
    fn rates_are_checked() {
        let load = |failures| UpdateLoad {
            devices: 10,
            concurrency: 10,
            cohort: CohortId::parse("c").unwrap(),
            firmware_version: "1.0.0".into(),
            trusted_keys: vec![],
            failures,
            settle: Duration::from_secs(1),
            min_deployments: 1,
            download_timeout: Duration::from_secs(1),
        };
        assert!(load(FailureRates::default()).validate().is_ok());
        let too_much = FailureRates {
            install: 0.7,
            silent: 0.5,
            ..Default::default()
        };
        assert!(load(too_much).validate().is_err());
        let negative = FailureRates {
            verify: -0.1,
            ..Default::default()
        };
        assert!(load(negative).validate().is_err());
    }
}
