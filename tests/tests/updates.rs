//! Software updates end to end: signed releases over REST, deployments to a cohort, the
//! rollout engine publishing the cohort's retained desired release, and real device agents
//! (`device_client::update::Updater`) over mutual TLS that download the artifact from an HTTP
//! server on 127.0.0.1, verify signature and hash, install through a handler and report each
//! step. Covers a canary reaching every device, an offline device deferred and converging on
//! reconnect, devices that never connect or run no agent deferred while the agents complete
//! (and the README's walk-through to the letter), waves advancing on success, the failure threshold pausing or rolling back, a tampered
//! artifact or untrusted key refused, an install failure reported with its error (in the
//! rollback scenario), a silent device timed out, and promotion and republishing after a
//! restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use bytes::Bytes;
use device_client::fleet_wire::update::ReleaseManifest;
use device_client::release::SigningKey;
use device_client::update::{HttpFetcher, Installer, UpdateSettings, Updater};
use device_client::{Agent, AgentConfig, AgentHandle, ClientIdentity, ConnectOptions, TlsConfig};
use e2e::{Db, Fleet, Platform};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// Waits up to this long for a rollout to get somewhere.
const ROLLOUT_WAIT: Duration = Duration::from_secs(30);

/// The platform with a fast rollout engine.
async fn platform(db: Db) -> Option<Platform> {
    let mut tuning = fleet_service::config::Tuning::default();
    tuning.rollout.tick_ms = 100;
    Platform::start_tuned(db, tuning).await
}

/// Artifacts served over HTTP on 127.0.0.1:0, counting downloads.
#[derive(Clone, Default)]
struct Artifacts {
    files: Arc<Mutex<HashMap<String, Bytes>>>,
    downloads: Arc<AtomicU64>,
}

impl Artifacts {
    async fn serve() -> (Artifacts, SocketAddr) {
        let artifacts = Artifacts::default();
        let app = axum::Router::new()
            .route("/fw/:name", axum::routing::get(artifact))
            .with_state(artifacts.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (artifacts, addr)
    }

    fn put(&self, name: &str, bytes: &[u8]) {
        self.files
            .lock()
            .insert(name.to_owned(), Bytes::copy_from_slice(bytes));
    }
}

async fn artifact(
    State(a): State<Artifacts>,
    Path(name): Path<String>,
) -> Result<Bytes, axum::http::StatusCode> {
    a.downloads.fetch_add(1, Ordering::Relaxed);
    a.files
        .lock()
        .get(&name)
        .cloned()
        .ok_or(axum::http::StatusCode::NOT_FOUND)
}

/// A fleet with a registered signing key and an artifact server.
struct Setup {
    p: Platform,
    fleet: Fleet,
    key: SigningKey,
    artifacts: Artifacts,
    artifacts_addr: SocketAddr,
    /// What the devices download with.
    fetcher: HttpFetcher,
}

impl Setup {
    async fn new(p: Platform) -> Setup {
        let fleet = p.jitp_fleet(json!({})).await;
        let key = SigningKey::generate().unwrap();
        let (s, body) = p
            .api(
                "POST",
                "/api/v1/signing-keys",
                Some(json!({ "name": "release key", "public_key": key.public_key_base64() })),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        assert_eq!(body["id"], key.key_id());
        let (artifacts, artifacts_addr) = Artifacts::serve().await;
        let fetcher = HttpFetcher::with_tls(
            Duration::from_secs(10),
            &TlsConfig::from_ca_pem(fleet.ca.pem.as_bytes()).unwrap(),
        )
        .unwrap();
        Setup {
            p,
            fleet,
            key,
            artifacts,
            artifacts_addr,
            fetcher,
        }
    }

    /// Signs and registers release `version` whose artifact is `bytes`; returns its id.
    async fn release(&self, version: &str, bytes: &[u8]) -> String {
        let name = format!("fw-{version}.bin");
        self.artifacts.put(&name, bytes);
        let url = format!("http://{}/fw/{name}", self.artifacts_addr);
        let signed = self
            .key
            .sign(&self.fleet.product_id, version, &url, bytes)
            .unwrap();
        let (s, body) = self
            .p
            .api(
                "POST",
                "/api/v1/releases",
                Some(serde_json::to_value(&signed).unwrap()),
            )
            .await;
        assert_eq!(s, 201, "create release {version}: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    async fn deploy(&self, release_id: &str, policy: Value) -> String {
        let (s, body) = self
            .p
            .api(
                "POST",
                "/api/v1/deployments",
                Some(json!({
                    "release_id": release_id,
                    "cohort_id": self.fleet.cohort_id,
                    "policy": policy,
                })),
            )
            .await;
        assert_eq!(s, 201, "create deployment: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    async fn deployment(&self, id: &str) -> Value {
        let (s, body) = self
            .p
            .api("GET", &format!("/api/v1/deployments/{id}"), None)
            .await;
        assert_eq!(s, 200, "{body}");
        body
    }

    /// Polls the deployment until `check` holds.
    async fn wait_deployment(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + ROLLOUT_WAIT;
        loop {
            let d = self.deployment(id).await;
            if check(&d) {
                return d;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; deployment: {d:#}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The execution of `device` in deployment `id`.
    async fn execution(&self, id: &str, device: &str) -> Value {
        self.executions(id)
            .await
            .into_iter()
            .find(|e| e["device_id"] == device)
            .unwrap_or_else(|| panic!("no execution for {device}"))
    }

    /// Registers `id` in the cohort before it was ever connected (`POST /devices`).
    async fn register(&self, id: &str) {
        let (st, body) = self
            .p
            .api(
                "POST",
                "/api/v1/devices",
                Some(json!({ "id": id, "product_id": self.fleet.product_id,
                    "cohort_id": self.fleet.cohort_id })),
            )
            .await;
        assert_eq!(st, 201, "{body}");
    }

    /// A device that runs no agent, like `mosquitto_pub` in the walk-through: a plain MQTT
    /// client that connects (which provisions it) and publishes one telemetry message.
    async fn plain_client(&self, id: &str) -> e2e::Client {
        let cert = self.fleet.ca.issue(id);
        let mut c = e2e::Client::connect(self.p.device_options(&cert, id))
            .await
            .unwrap();
        c.client
            .publish(
                format!("devices/{id}/telemetry"),
                rumqttc::QoS::AtLeastOnce,
                false,
                r#"{"temp":21.5}"#,
            )
            .await
            .unwrap();
        c.wait_for(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
            .await;
        c
    }

    /// Waits until the platform shows `id` online (or offline).
    async fn wait_online(&self, id: &str, online: bool) {
        e2e::eventually(&format!("{id} online: {online}"), || async {
            (self.p.device(id).await["online"] == online).then_some(())
        })
        .await;
    }

    async fn executions(&self, id: &str) -> Vec<Value> {
        let (s, body) = self
            .p
            .api(
                "GET",
                &format!("/api/v1/deployments/{id}/executions?limit=1000"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{body}");
        body["items"].as_array().unwrap().clone()
    }

    /// Starts a device agent with an updater that trusts the release key.
    async fn device(&self, id: &str, firmware: &str, installer: impl Installer) -> Device {
        self.device_trusting(id, firmware, vec![self.key.public_key()], installer)
            .await
    }

    async fn device_trusting(
        &self,
        id: &str,
        firmware: &str,
        trusted_keys: Vec<[u8; 32]>,
        installer: impl Installer,
    ) -> Device {
        let agent = self.agent(id, firmware).await;
        let updater = Updater::spawn(
            &agent,
            UpdateSettings {
                trusted_keys,
                firmware_version: Some(firmware.to_owned()),
                state_file: None,
                update_dir: None,
            },
            self.fetcher.clone(),
            installer,
        );
        Device {
            agent,
            _updater: updater,
        }
    }

    /// An agent that follows the cohort but never acts on updates (a silent device).
    async fn agent(&self, id: &str, firmware: &str) -> AgentHandle {
        let cert = self.fleet.ca.issue(id);
        let tls = TlsConfig::from_ca_pem(self.p.server_ca_pem().as_bytes())
            .unwrap()
            .with_identity(
                ClientIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
                    .unwrap(),
            );
        let url = format!("mqtts://127.0.0.1:{}", self.p.app().mqtts_addr().port());
        let mut config = AgentConfig::new(ConnectOptions::new(url.parse().unwrap()).with_tls(tls));
        config.cohort = Some(self.fleet.cohort_id.parse().unwrap());
        config.firmware_version = Some(firmware.to_owned());
        config.telemetry_interval = None;
        let agent = Agent::new(config).start().unwrap();
        agent.wait_ready(Duration::from_secs(10)).await.unwrap();
        // Provisioned and its reported state stored, so the deployment counts it.
        e2e::eventually(&format!("{id} reported {firmware}"), || async {
            let d = self.p.device(id).await;
            (d["firmware_version"] == firmware).then_some(())
        })
        .await;
        agent
    }
}

struct Device {
    agent: AgentHandle,
    _updater: tokio::task::JoinHandle<()>,
}

fn installs_ok() -> impl Installer + Clone {
    |_: ReleaseManifest, _: Bytes| async { Ok(()) }
}

fn statuses(executions: &[Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in executions {
        *m.entry(e["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    m
}

/// Declares `sqlite::NAME` and `postgres::NAME` for each `async fn NAME(Platform)`, on a
/// platform with a fast rollout engine.
macro_rules! on_both_databases_fast {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::platform(e2e::Db::Sqlite).await.unwrap()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(p) = super::platform(e2e::Db::Postgres).await else { return };
                super::$name(p).await;
            })*
        }
    };
}

on_both_databases_fast!(
    canceling_ends_what_had_not_started,
    unreachable_devices_are_deferred_and_the_agents_complete,
    the_walk_through_updates_the_agent_it_names,
    canary_deployment_reaches_every_device,
    offline_device_converges_on_reconnect,
    waves_advance_only_when_the_wave_succeeded,
    failures_above_the_threshold_roll_the_cohort_back,
    failures_above_the_threshold_pause_without_a_previous_release,
    devices_refuse_tampered_or_untrusted_updates,
    a_silent_device_times_out,
    releases_and_deployments_refuse_bad_requests,
    a_proven_release_is_promoted_and_the_cohort_message_survives_a_restart,
    a_device_that_rolls_back_on_its_own_is_shown_as_failed,
    admission_follows_the_rate_limit,
    artifacts_download_over_https_from_a_server_the_device_trusts,
);

async fn canary_deployment_reaches_every_device(p: Platform) {
    let s = Setup::new(p).await;
    let artifact = vec![0xA5u8; 64 * 1024];
    let release = s.release("2.0.0", &artifact).await;
    let mut devices = Vec::new();
    for i in 0..6 {
        devices.push(
            s.device(&format!("canary-{i}"), "1.0.0", installs_ok())
                .await,
        );
    }
    let dep = s.deploy(&release, json!({})).await;
    let d = s
        .wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(d["summary"]["total"], 6, "{d:#}");
    assert_eq!(d["summary"]["succeeded"], 6, "{d:#}");
    assert_eq!(d["summary"]["failures"], 0);
    assert_eq!(d["summary"]["percent_done"], 100.0);
    assert_eq!(d["version"], "2.0.0");
    for e in s.executions(&dep).await {
        assert_eq!(e["status"], "succeeded", "{e}");
        assert_eq!(e["from_version"], "1.0.0");
        assert_eq!(e["firmware_version"], "2.0.0");
    }
    for i in 0..6 {
        let id = format!("canary-{i}");
        let dev = e2e::eventually("firmware 2.0.0 reported", || async {
            let d = s.p.device(&id).await;
            (d["firmware_version"] == "2.0.0").then_some(d)
        })
        .await;
        assert_eq!(dev["state"], "online", "{dev}");
        let (st, hist) =
            s.p.api("GET", &format!("/api/v1/devices/{id}/executions"), None)
                .await;
        assert_eq!(st, 200);
        assert_eq!(hist["items"][0]["deployment_id"], dep.as_str());
    }
    assert_eq!(s.artifacts.downloads.load(Ordering::Relaxed), 6);
    for d in devices {
        d.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

async fn offline_device_converges_on_reconnect(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"new firmware").await;
    let online = s.device("conv-a", "1.0.0", installs_ok()).await;
    // Provisioned, then offline for the whole deployment.
    let late = s.agent("conv-late", "1.0.0").await;
    late.shutdown().await.unwrap();
    e2e::eventually("conv-late offline", || async {
        (s.p.device("conv-late").await["online"] == false).then_some(())
    })
    .await;

    let dep = s.deploy(&release, json!({})).await;
    // The rollout completes for the device that is there; the offline one is deferred: shown,
    // admitted, but not waited for.
    let d = s
        .wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(d["summary"]["total"], 2, "{d:#}");
    assert_eq!(d["summary"]["succeeded"], 1, "{d:#}");
    assert_eq!(d["summary"]["deferred"], 1, "{d:#}");
    assert_eq!(d["summary"]["deferred_by_reason"], json!({ "offline": 1 }));
    let e = s.execution(&dep, "conv-late").await;
    assert_eq!(e["status"], "deferred", "{e}");
    assert_eq!(e["deferred_reason"], "offline", "{e}");
    assert_eq!(e["admitted"], true, "{e}");

    // It connects later, gets the retained cohort message and converges; its reports are
    // recorded on the completed deployment.
    let late = s.device("conv-late", "1.0.0", installs_ok()).await;
    let d = s
        .wait_deployment(&dep, "the late device succeeded", |d| {
            d["summary"]["succeeded"] == 2
        })
        .await;
    assert_eq!(d["state"], "completed", "{d:#}");
    assert_eq!(d["summary"]["deferred"], 0, "{d:#}");
    let e = s.execution(&dep, "conv-late").await;
    assert_eq!(e["firmware_version"], "2.0.0", "{e}");
    assert_eq!(e["deferred_reason"], Value::Null, "{e}");
    assert_eq!(s.p.device("conv-late").await["firmware_version"], "2.0.0");
    online.agent.shutdown().await.unwrap();
    late.agent.shutdown().await.unwrap();
    s.p.stop().await;
}

/// An installer that holds every install until the test opens it.
#[derive(Clone)]
struct Gate {
    open: Arc<Notify>,
    is_open: Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            open: Arc::new(Notify::new()),
            is_open: Arc::new(false.into()),
        }
    }

    fn open(&self) {
        self.is_open.store(true, Ordering::SeqCst);
        self.open.notify_waiters();
    }

    fn installer(&self) -> impl Installer {
        let gate = self.clone();
        move |_: ReleaseManifest, _: Bytes| {
            let gate = gate.clone();
            async move {
                while !gate.is_open.load(Ordering::SeqCst) {
                    let notified = gate.open.notified();
                    if gate.is_open.load(Ordering::SeqCst) {
                        break;
                    }
                    notified.await;
                }
                Ok(())
            }
        }
    }
}

async fn waves_advance_only_when_the_wave_succeeded(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"wave firmware").await;
    let gate = Gate::new();
    let mut devices = Vec::new();
    for i in 0..10 {
        devices.push(
            s.device(&format!("wave-{i}"), "1.0.0", gate.installer())
                .await,
        );
    }
    let dep = s
        .deploy(
            &release,
            json!({ "waves": [{ "count": 2 }, { "percent": 50 }], "success_threshold_percent": 100 }),
        )
        .await;
    // Wave 1: two devices admitted; they hang in `installing` behind the gate.
    let d = s
        .wait_deployment(&dep, "wave 1 installing", |d| {
            d["summary"]["by_status"]["installing"] == 2
        })
        .await;
    assert_eq!(d["current_wave"], 1, "{d:#}");
    assert_eq!(d["waves"], 3, "the final 100 % wave is implied");
    assert_eq!(d["summary"]["admitted"], 2);
    let execs = s.executions(&dep).await;
    assert_eq!(
        execs.iter().filter(|e| e["admitted"] == true).count(),
        2,
        "nobody outside the wave was admitted"
    );
    assert_eq!(statuses(&execs)["pending"], 8, "{execs:#?}");

    // Let the installs finish: waves 2 and 3 follow, and every device updates.
    gate.open();
    let d = s
        .wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(d["summary"]["succeeded"], 10, "{d:#}");
    assert_eq!(d["current_wave"], 3);
    for d in devices {
        d.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

/// Fails the install on the devices whose id is in `failing`.
fn failing_on(failing: &'static [&'static str], id: &str) -> impl Installer {
    let fails = failing.contains(&id);
    move |_: ReleaseManifest, _: Bytes| async move {
        if fails {
            Err("flash write failed: bad block".to_owned())
        } else {
            Ok(())
        }
    }
}

async fn failures_above_the_threshold_roll_the_cohort_back(p: Platform) {
    let s = Setup::new(p).await;
    let v1 = s.release("1.0.0", b"firmware one").await;
    let v2 = s.release("2.0.0", b"firmware two").await;
    const FAILING: &[&str] = &["rb-0", "rb-1", "rb-2"];
    let mut devices = Vec::new();
    for i in 0..6 {
        let id = format!("rb-{i}");
        devices.push(s.device(&id, "1.0.0", failing_on(FAILING, &id)).await);
    }
    // The cohort is on 1.0.0 already: a deployment of it completes at once.
    let first = s.deploy(&v1, json!({})).await;
    let d = s
        .wait_deployment(&first, "1.0.0 completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(d["summary"]["succeeded"], 6, "{d:#}");

    let dep = s
        .deploy(
            &v2,
            json!({ "failure_threshold_percent": 30, "min_devices": 4, "on_failure": "rollback" }),
        )
        .await;
    let d = s
        .wait_deployment(&dep, "rolled back", |d| d["state"] == "rolled_back")
        .await;
    assert_eq!(d["previous_release_id"], v1.as_str());
    let reason = d["state_reason"].as_str().unwrap();
    assert!(reason.contains("failure threshold"), "{reason}");
    let rollback = d["rolled_back_by"].as_str().unwrap().to_owned();

    let r = s
        .wait_deployment(&rollback, "rollback completed", |d| {
            d["state"] == "completed"
        })
        .await;
    assert_eq!(r["kind"], "rollback");
    assert_eq!(r["release_id"], v1.as_str());
    assert_eq!(r["rollback_of"], dep.as_str());
    assert_eq!(r["summary"]["succeeded"], 6, "{r:#}");
    // Whoever installed 2.0.0 went back to 1.0.0; the failed ones never left it.
    for i in 0..6 {
        let id = format!("rb-{i}");
        let dev = e2e::eventually("back on 1.0.0", || async {
            let d = s.p.device(&id).await;
            (d["firmware_version"] == "1.0.0").then_some(d)
        })
        .await;
        assert_eq!(dev["state"], "online", "{dev}");
    }
    let failed: Vec<Value> = s
        .executions(&dep)
        .await
        .into_iter()
        .filter(|e| e["status"] == "failed")
        .collect();
    assert!(failed.len() >= 2, "{failed:#?}");
    for e in &failed {
        assert!(FAILING.contains(&e["device_id"].as_str().unwrap()));
        assert_eq!(e["error"], "flash write failed: bad block");
    }
    for d in devices {
        d.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

async fn failures_above_the_threshold_pause_without_a_previous_release(p: Platform) {
    let s = Setup::new(p).await;
    let v2 = s.release("2.0.0", b"firmware two").await;
    const FAILING: &[&str] = &["pz-0", "pz-1", "pz-2", "pz-3"];
    let mut devices = Vec::new();
    for i in 0..5 {
        let id = format!("pz-{i}");
        devices.push(s.device(&id, "1.0.0", failing_on(FAILING, &id)).await);
    }
    let dep = s
        .deploy(
            &v2,
            json!({ "failure_threshold_percent": 50, "min_devices": 3, "on_failure": "rollback" }),
        )
        .await;
    let d = s
        .wait_deployment(&dep, "paused", |d| d["state"] == "paused")
        .await;
    let reason = d["state_reason"].as_str().unwrap();
    assert!(reason.contains("failure threshold"), "{reason}");
    assert!(reason.contains("no previous release"), "{reason}");
    let failed = s.p.device("pz-0").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["state_reason"]
        .as_str()
        .unwrap()
        .contains("bad block"));

    // An operator can still resume or cancel; cancel ends it for good.
    let (st, body) =
        s.p.api(
            "POST",
            &format!("/api/v1/deployments/{dep}/cancel"),
            Some(json!({"reason": "bad build"})),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["state"], "canceled");
    assert_eq!(body["state_reason"], "bad build");
    let (st, _) =
        s.p.api("POST", &format!("/api/v1/deployments/{dep}/resume"), None)
            .await;
    assert_eq!(st, 409, "a canceled deployment cannot resume");
    for d in devices {
        d.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

async fn devices_refuse_tampered_or_untrusted_updates(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"the real firmware").await;
    // The artifact server now serves other bytes under the signed URL.
    s.artifacts.put("fw-2.0.0.bin", b"the evil firmware");
    let tampered = s.device("tamper-0", "1.0.0", installs_ok()).await;
    let stranger = s
        .device_trusting("tamper-1", "1.0.0", vec![[9u8; 32]], installs_ok())
        .await;
    let dep = s
        .deploy(&release, json!({ "failure_threshold_percent": 100 }))
        .await;
    let d = s
        .wait_deployment(&dep, "both finished", |d| d["summary"]["finished"] == 2)
        .await;
    assert_eq!(d["summary"]["by_status"]["rejected"], 2, "{d:#}");
    let by_id: HashMap<String, Value> = s
        .executions(&dep)
        .await
        .into_iter()
        .map(|e| (e["device_id"].as_str().unwrap().to_owned(), e))
        .collect();
    let hash = by_id["tamper-0"]["error"].as_str().unwrap();
    assert!(
        hash.contains("artifact is 17 bytes") || hash.contains("SHA-256"),
        "{hash}"
    );
    assert_eq!(by_id["tamper-0"]["status"], "rejected");
    let key = by_id["tamper-1"]["error"].as_str().unwrap();
    assert!(key.contains("does not trust"), "{key}");
    for id in ["tamper-0", "tamper-1"] {
        let dev = s.p.device(id).await;
        assert_eq!(
            dev["firmware_version"], "1.0.0",
            "nothing was installed: {dev}"
        );
        assert_eq!(dev["state"], "failed", "{dev}");
    }
    // The device that does not trust the key never downloaded anything.
    assert_eq!(s.artifacts.downloads.load(Ordering::Relaxed), 1);
    for d in [tampered, stranger] {
        d.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

async fn a_silent_device_times_out(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"fw").await;
    let silent = s.agent("silent-0", "1.0.0").await;
    let dep = s.deploy(&release, json!({ "timeout_s": 1 })).await;
    let d = s
        .wait_deployment(&dep, "timed out", |d| {
            d["summary"]["by_status"]["timed_out"] == 1
        })
        .await;
    assert_eq!(d["summary"]["failures"], 1, "{d:#}");
    let e = &s.executions(&dep).await[0];
    assert_eq!(e["error"], "no report for 1 s");
    let dev = s.p.device("silent-0").await;
    assert_eq!(dev["state"], "failed", "{dev}");
    silent.shutdown().await.unwrap();
    s.p.stop().await;
}

async fn releases_and_deployments_refuse_bad_requests(p: Platform) {
    let s = Setup::new(p).await;
    let url = format!("http://{}/fw/x.bin", s.artifacts_addr);
    let good = serde_json::to_value(
        s.key
            .sign(&s.fleet.product_id, "3.0.0", &url, b"bytes")
            .unwrap(),
    )
    .unwrap();
    let with = |field: &str, v: Value| {
        let mut b = good.clone();
        b[field] = v;
        b
    };
    let other_key = SigningKey::generate().unwrap();
    let forged = serde_json::to_value(
        other_key
            .sign(&s.fleet.product_id, "3.0.0", &url, b"bytes")
            .unwrap(),
    )
    .unwrap();
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "size changed after signing",
            with("size", json!(6)),
            422,
            "invalid_signature",
        ),
        (
            "signed by an unregistered key",
            forged.clone(),
            422,
            "unknown_signing_key",
        ),
        (
            "unregistered key, key_id left out",
            {
                let mut f = forged;
                f.as_object_mut().unwrap().remove("key_id");
                f
            },
            422,
            "invalid_signature",
        ),
        (
            "not semver",
            with("version", json!("three")),
            422,
            "invalid_version",
        ),
        (
            "ftp url",
            with("url", json!("ftp://x/y")),
            422,
            "invalid_url",
        ),
        (
            "bad hash",
            with("sha256", json!("abc")),
            422,
            "invalid_manifest",
        ),
        (
            "unknown field",
            with("colour", json!("red")),
            400,
            "invalid_body",
        ),
    ];
    for (what, body, status, code) in cases {
        let (st, got) = s.p.api("POST", "/api/v1/releases", Some(body)).await;
        assert_eq!(st, status, "{what}: {got}");
        assert_eq!(got["error"]["code"], code, "{what}: {got}");
    }
    let (st, body) =
        s.p.api("POST", "/api/v1/releases", Some(good.clone()))
            .await;
    assert_eq!(st, 201, "{body}");
    let release = body["id"].as_str().unwrap().to_owned();
    let (st, _) = s.p.api("POST", "/api/v1/releases", Some(good)).await;
    assert_eq!(st, 409, "same version twice");

    // A viewer reads but does not release or deploy.
    let (st, viewer) =
        s.p.api(
            "POST",
            "/api/v1/api-keys",
            Some(json!({"name": "v", "role": "viewer"})),
        )
        .await;
    assert_eq!(st, 201);
    let viewer = viewer["secret"].as_str().unwrap();
    let (st, _) = s.p.api_as(viewer, "GET", "/api/v1/releases", None).await;
    assert_eq!(st, 200);
    let (st, _) =
        s.p.api_as(
            viewer,
            "POST",
            "/api/v1/deployments",
            Some(json!({"release_id": release, "cohort_id": s.fleet.cohort_id})),
        )
        .await;
    assert_eq!(st, 403);

    // Policies are checked; a cohort of another product is refused; one live deployment per
    // cohort.
    let bad_policies = [
        json!({"waves": []}),
        json!({"waves": [{"percent": 50}, {"percent": 20}]}),
        json!({"max_per_minute": 0}),
        json!({"failure_threshold_percent": 150}),
        json!({"wavez": []}),
        // A policy is an object: serde alone would read an array into its fields by position.
        json!([]),
        json!([[{"percent": 10}]]),
        json!("waves"),
    ];
    for policy in bad_policies {
        let (st, got) = s
            .p
            .api(
                "POST",
                "/api/v1/deployments",
                Some(json!({"release_id": release, "cohort_id": s.fleet.cohort_id, "policy": policy})),
            )
            .await;
        assert!(st == 422 || st == 400, "{policy}: {st} {got}");
    }
    let other = s.p.jitp_fleet(json!({})).await;
    let (st, got) =
        s.p.api(
            "POST",
            "/api/v1/deployments",
            Some(json!({"release_id": release, "cohort_id": other.cohort_id})),
        )
        .await;
    assert_eq!(st, 422, "{got}");
    let dep = s.deploy(&release, json!({})).await;
    let (st, got) =
        s.p.api(
            "POST",
            "/api/v1/deployments",
            Some(json!({"release_id": release, "cohort_id": s.fleet.cohort_id})),
        )
        .await;
    assert_eq!(st, 409, "{got}");
    let (st, got) =
        s.p.api("POST", &format!("/api/v1/deployments/{dep}/resume"), None)
            .await;
    assert_eq!(st, 409, "an active deployment is not paused: {got}");
    let (st, got) =
        s.p.api("POST", &format!("/api/v1/deployments/{dep}/pause"), None)
            .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["state"], "paused");
    let (st, got) =
        s.p.api("POST", &format!("/api/v1/deployments/{dep}/rollback"), None)
            .await;
    assert_eq!(st, 422, "no previous release: {got}");
    let (st, got) =
        s.p.api(
            "POST",
            &format!("/api/v1/deployments/{dep}/promote"),
            Some(json!({"cohort_id": other.cohort_id})),
        )
        .await;
    assert_eq!(st, 409, "a paused deployment proved nothing: {got}");
    let (st, _) =
        s.p.api(
            "GET",
            &format!("/api/v1/deployments/{dep}/executions?status=bogus"),
            None,
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = s.p.api("GET", "/api/v1/deployments/nope", None).await;
    assert_eq!(st, 404);
    s.p.stop().await;
}

async fn a_proven_release_is_promoted_and_the_cohort_message_survives_a_restart(p: Platform) {
    let mut s = Setup::new(p).await;
    let release = s.release("2.0.0", b"promoted firmware").await;
    let (st, beta) =
        s.p.api(
            "POST",
            &format!("/api/v1/products/{}/cohorts", s.fleet.product_id),
            Some(json!({"name": "beta"})),
        )
        .await;
    assert_eq!(st, 201);
    let beta = beta["id"].as_str().unwrap().to_owned();
    let canary = s.device("promo-0", "1.0.0", installs_ok()).await;
    let dep = s.deploy(&release, json!({})).await;
    s.wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    let (st, promoted) =
        s.p.api(
            "POST",
            &format!("/api/v1/deployments/{dep}/promote"),
            Some(json!({"cohort_id": beta})),
        )
        .await;
    assert_eq!(st, 201, "{promoted}");
    assert_eq!(promoted["cohort_id"], beta.as_str());
    assert_eq!(promoted["release_id"], release.as_str());
    canary.agent.shutdown().await.unwrap();

    // After a restart the router has no retained messages; the engine publishes them again,
    // so a device joining the canary cohort now still converges.
    s.p.restart().await;
    let joiner = s.device("promo-1", "1.0.0", installs_ok()).await;
    e2e::eventually("the joiner installed the cohort's release", || async {
        (s.p.device("promo-1").await["firmware_version"] == "2.0.0").then_some(())
    })
    .await;
    let d = s.deployment(&dep).await;
    assert_eq!(d["summary"]["total"], 2, "the joiner was enrolled: {d:#}");
    assert_eq!(d["summary"]["succeeded"], 2);
    joiner.agent.shutdown().await.unwrap();
    s.p.stop().await;
}

async fn a_device_that_rolls_back_on_its_own_is_shown_as_failed(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"firmware two").await;
    let downloads = || s.artifacts.downloads.load(Ordering::Relaxed);
    let dev = s.device("revert-0", "1.0.0", installs_ok()).await;
    let dep = s.deploy(&release, json!({})).await;
    s.wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(downloads(), 1);

    // The device boots back into its old image and says so in its reported state.
    dev.agent.set_firmware_version("1.0.0").await.unwrap();
    let e = e2e::eventually("the execution turns failed", || async {
        let e = s.executions(&dep).await.remove(0);
        (e["status"] == "failed").then_some(e)
    })
    .await;
    assert_eq!(e["error"], "device runs 1.0.0, not 2.0.0", "{e}");
    assert_eq!(e["firmware_version"], "1.0.0");
    let device = s.p.device("revert-0").await;
    assert_eq!(
        device["firmware_version"], "1.0.0",
        "the device is the truth"
    );
    assert_eq!(device["state"], "failed", "{device}");
    // The cohort still carries 2.0.0, but this device attempted it already: it is offered the
    // release again only by a new deployment, even when it hears the cohort message again.
    let mut cohort_message = dev.agent.watch_cohort_update();
    cohort_message.borrow_and_update();
    // A new session: the retained cohort message arrives again.
    let id = device_client::fleet_wire::DeviceId::parse("revert-0").unwrap();
    assert!(s.p.app().control().disconnect_device(
        &id,
        device_client::fleet_wire::payload::DisconnectReason::ConnectionLost
    ));
    tokio::time::timeout(Duration::from_secs(20), cohort_message.changed())
        .await
        .expect("the agent reconnected and got the cohort message again")
        .unwrap();
    // Give the updater the time a (wrong) second attempt would take to start downloading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(downloads(), 1, "no second attempt of the same deployment");
    let e = s.executions(&dep).await.remove(0);
    assert_eq!(e["status"], "failed", "{e}");
    dev.agent.shutdown().await.unwrap();
    s.p.stop().await;
}

/// Serves `body` at any path over TLS with `cert`, a minimal HTTP/1.1 responder (one request
/// per connection), so the device's real HTTPS client is tested against a real TLS server.
async fn https_artifact_server(
    cert: &device_client::pki::CertifiedKeyPem,
    body: Vec<u8>,
) -> SocketAddr {
    let certs = rustls_pemfile::certs(&mut cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(body);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&body).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

async fn artifacts_download_over_https_from_a_server_the_device_trusts(p: Platform) {
    use device_client::pki::{Ca, CaOptions};
    let s = Setup::new(p).await;
    let cdn_ca = Ca::generate(&CaOptions {
        common_name: "Artifact CDN CA".into(),
        ..Default::default()
    })
    .unwrap();
    let artifact = b"firmware over https".to_vec();
    let cert = cdn_ca.issue_server(&["127.0.0.1".into()], 30).unwrap();
    let addr = https_artifact_server(&cert, artifact.clone()).await;
    let url = format!("https://127.0.0.1:{}/fw-2.0.0.bin", addr.port());
    let signed = s
        .key
        .sign(&s.fleet.product_id, "2.0.0", &url, &artifact)
        .unwrap();
    let (st, body) =
        s.p.api(
            "POST",
            "/api/v1/releases",
            Some(serde_json::to_value(&signed).unwrap()),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let release = body["id"].as_str().unwrap().to_owned();

    // One device trusts the CDN's CA; the other only the fleet CA, so its TLS handshake with
    // the artifact server fails and the update is reported failed, with nothing installed.
    let trusting = {
        let agent = s.agent("https-0", "1.0.0").await;
        let fetcher = HttpFetcher::with_tls(
            Duration::from_secs(10),
            &TlsConfig::from_ca_pem(cdn_ca.cert_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        let updater = Updater::spawn(
            &agent,
            UpdateSettings {
                trusted_keys: vec![s.key.public_key()],
                firmware_version: Some("1.0.0".into()),
                state_file: None,
                update_dir: None,
            },
            fetcher,
            installs_ok(),
        );
        Device {
            agent,
            _updater: updater,
        }
    };
    let distrusting = s.device("https-1", "1.0.0", installs_ok()).await;
    let dep = s
        .deploy(&release, json!({ "failure_threshold_percent": 100 }))
        .await;
    s.wait_deployment(&dep, "both finished", |d| d["summary"]["finished"] == 2)
        .await;
    let by_id: HashMap<String, Value> = s
        .executions(&dep)
        .await
        .into_iter()
        .map(|e| (e["device_id"].as_str().unwrap().to_owned(), e))
        .collect();
    assert_eq!(
        by_id["https-0"]["status"], "succeeded",
        "{:?}",
        by_id["https-0"]
    );
    assert_eq!(by_id["https-0"]["firmware_version"], "2.0.0");
    assert_eq!(
        by_id["https-1"]["status"], "failed",
        "{:?}",
        by_id["https-1"]
    );
    let error = by_id["https-1"]["error"].as_str().unwrap();
    assert!(error.starts_with("download failed"), "{error}");
    assert_eq!(s.p.device("https-1").await["firmware_version"], "1.0.0");
    trusting.agent.shutdown().await.unwrap();
    distrusting.agent.shutdown().await.unwrap();
    s.p.stop().await;
}

async fn admission_follows_the_rate_limit(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"rated").await;
    let mut devices = Vec::new();
    for i in 0..5 {
        devices.push(s.device(&format!("rate-{i}"), "1.0.0", installs_ok()).await);
    }
    // 120 a minute: one at once, then one every 500 ms.
    let dep = s
        .deploy(&release, json!({ "max_per_minute": 120, "jitter_s": 1 }))
        .await;
    let d = s
        .wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(d["summary"]["succeeded"], 5, "{d:#}");
    let mut admitted: Vec<i64> = s
        .executions(&dep)
        .await
        .iter()
        .map(|e| {
            time::OffsetDateTime::parse(
                e["admitted_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .unix_timestamp_nanos() as i64
                / 1_000_000
        })
        .collect();
    admitted.sort();
    for (k, at) in admitted.iter().enumerate() {
        // The engine may be late, never early: device k is admitted no sooner than
        // (k - 1) * 500 ms after the first one (the rate's first token comes at once).
        let earliest = (k as i64 - 1).max(0) * 500;
        assert!(
            at - admitted[0] >= earliest,
            "device {k} admitted {} ms after the first: {admitted:?}",
            at - admitted[0]
        );
    }
    for d in devices {
        d.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

/// The simulator's `update` scenario: twenty real agents, 30 % failing their install and
/// 10 % getting a corrupted download. The deployment trips its failure threshold and rolls the
/// cohort back; the simulator follows all three deployments until every device finished the
/// rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_with_injected_failures_is_rolled_back() {
    use device_client::pki::Ca;
    use device_client::sim::update::{FailureRates, UpdateLoad};
    use device_client::sim::SimConfig;

    let s = Setup::new(platform(Db::Sqlite).await.unwrap()).await;
    let v1 = s.release("1.0.0", b"firmware one").await;
    let v2 = s.release("2.0.0", b"firmware two").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, &s.fleet.ca.pem).unwrap();
    std::fs::write(&key, s.fleet.ca.key_pem()).unwrap();
    let url = format!("mqtts://127.0.0.1:{}", s.p.app().mqtts_addr().port());
    let mut config = SimConfig::new(url.parse().unwrap());
    config.server_ca_pem = Some(s.p.server_ca_pem().into_bytes());
    config.device_ca = Some(Arc::new(Ca::from_files(&cert, &key).unwrap()));
    config.id_prefix = "upsim-".into();
    config.max_duration = Duration::from_secs(60);
    let load = UpdateLoad {
        devices: 20,
        concurrency: 10,
        cohort: s.fleet.cohort_id.parse().unwrap(),
        firmware_version: "1.0.0".into(),
        trusted_keys: vec![s.key.public_key()],
        failures: FailureRates {
            install: 0.3,
            verify: 0.1,
            ..Default::default()
        },
        settle: Duration::from_millis(1500),
        min_deployments: 3,
        download_timeout: Duration::from_secs(10),
    };
    let sim = tokio::spawn(async move { device_client::sim::update::run(&config, &load).await });

    let online = format!(
        "/api/v1/devices?cohort_id={}&online=true&limit=100",
        s.fleet.cohort_id
    );
    e2e::eventually("20 simulated devices online", || async {
        let (_, body) = s.p.api("GET", &online, None).await;
        (body["items"].as_array().map(Vec::len) == Some(20)).then_some(())
    })
    .await;
    let first = s.deploy(&v1, json!({})).await;
    s.wait_deployment(&first, "1.0.0 completed", |d| d["state"] == "completed")
        .await;
    let dep = s
        .deploy(
            &v2,
            json!({ "failure_threshold_percent": 20, "min_devices": 5, "on_failure": "rollback" }),
        )
        .await;
    let d = s
        .wait_deployment(&dep, "rolled back", |d| d["state"] == "rolled_back")
        .await;
    let rollback = d["rolled_back_by"].as_str().unwrap().to_owned();
    s.wait_deployment(&rollback, "rollback completed", |d| {
        d["state"] == "completed"
    })
    .await;

    let report = sim.await.unwrap().unwrap();
    assert!(report.settled, "{}", report.to_table());
    assert_eq!(report.connected, 20);
    assert_eq!(report.fates["install_fails"], 6);
    assert_eq!(report.fates["verify_fails"], 2);
    let seen: Vec<&str> = report
        .deployments
        .iter()
        .map(|d| d.deployment_id.as_str())
        .collect();
    assert_eq!(
        seen,
        [first.as_str(), dep.as_str(), rollback.as_str()],
        "{}",
        report.to_table()
    );
    let v2_seen = &report.deployments[1];
    assert_eq!(
        v2_seen.finished.get("failed"),
        Some(&6),
        "{}",
        report.to_table()
    );
    assert_eq!(
        v2_seen.finished.get("rejected"),
        Some(&2),
        "{}",
        report.to_table()
    );
    assert_eq!(v2_seen.last_state, "rolled_back");
    let back = &report.deployments[2];
    assert_eq!(
        back.finished.get("succeeded"),
        Some(&20),
        "{}",
        report.to_table()
    );
    assert_eq!(back.time_to_finish.count, 20);
    // What the platform stored agrees with what the devices reported.
    let stored = s.deployment(&dep).await;
    assert_eq!(stored["summary"]["by_status"]["failed"], 6, "{stored:#}");
    assert_eq!(stored["summary"]["by_status"]["rejected"], 2, "{stored:#}");
    s.p.stop().await;
}

/// Devices registered in the cohort that never connect are `deferred` while the deployment
/// lives (its one wave reached them); canceling it ends them `canceled`, so nothing waits for
/// ever.
async fn canceling_ends_what_had_not_started(p: Platform) {
    let s = Setup::new(p).await;
    let v2 = s.release("2.0.0", b"firmware two").await;
    for i in 0..3 {
        s.register(&format!("never-{i}")).await;
    }
    let dep = s.deploy(&v2, json!({})).await;
    let deferred = |d: &Value| d["summary"]["by_status"]["deferred"] == 3;
    let d = s
        .wait_deployment(&dep, "3 deferred executions", deferred)
        .await;
    assert_eq!(d["state"], "active", "nobody finished: not complete {d:#}");
    assert_eq!(
        d["summary"]["deferred_by_reason"],
        json!({ "never_connected": 3 })
    );
    let (st, body) =
        s.p.api("POST", &format!("/api/v1/deployments/{dep}/cancel"), None)
            .await;
    assert_eq!(st, 200, "{body}");
    let executions = s.executions(&dep).await;
    assert_eq!(executions.len(), 3, "{executions:#?}");
    for e in &executions {
        assert_eq!(e["status"], "canceled", "{e}");
        assert!(e["finished_at"].is_string(), "{e}");
    }
    let d = s.deployment(&dep).await;
    assert_eq!(d["summary"]["by_status"]["deferred"], 0, "{d}");
    assert_eq!(d["summary"]["by_status"]["canceled"], 3, "{d}");
    s.p.stop().await;
}

/// The walk-through's agent command run again: the updater recorded what it installed in its
/// update directory, so the restarted agent runs that release and answers the cohort's
/// (retained) update with `succeeded` without downloading it again. A different release is
/// still downloaded and installed, and so is the rollback target after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_does_not_download_what_it_installed() {
    use device_client::fleet_wire::update::UpdateStatusKind;
    use device_client::update::InstalledRelease;
    use device_client::AgentEvent;

    let s = Setup::new(platform(Db::Sqlite).await.unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = "rerun-1";
    // Every start is the same command: firmware 1.0.0 on the command line, same directory.
    let start = || async {
        let agent = s.agent(id, "1.0.0").await;
        let events = agent.subscribe();
        let updater = Updater::spawn(
            &agent,
            UpdateSettings {
                trusted_keys: vec![s.key.public_key()],
                firmware_version: Some("1.0.0".to_owned()),
                state_file: None,
                update_dir: Some(dir.path().to_owned()),
            },
            s.fetcher.clone(),
            installs_ok(),
        );
        (agent, events, updater)
    };
    let downloads = || s.artifacts.downloads.load(Ordering::Relaxed);
    let completed = |dep: String, what: &'static str| {
        let s = &s;
        async move {
            let d = s
                .wait_deployment(&dep, what, |d| d["state"] == "completed")
                .await;
            assert_eq!(d["summary"]["succeeded"], 1, "{d:#}");
        }
    };

    let v2 = s.release("2.0.0", b"firmware two").await;
    let (agent, _, updater) = start().await;
    let dep = s.deploy(&v2, json!({})).await;
    completed(dep.clone(), "2.0.0 installed").await;
    assert_eq!(downloads(), 1);
    let record = InstalledRelease::load(dir.path()).unwrap().unwrap();
    assert_eq!(
        (record.version.as_str(), record.deployment_id.as_str()),
        ("2.0.0", dep.as_str())
    );
    agent.shutdown().await.unwrap();
    updater.abort();

    // Run again: the retained update names 2.0.0, which is installed.
    let (agent, mut events, updater) = start().await;
    let report = tokio::time::timeout(ROLLOUT_WAIT, async {
        loop {
            if let Ok(AgentEvent::UpdateReportDelivered(u)) = events.recv().await {
                return u;
            }
        }
    })
    .await
    .expect("the restarted agent answers the cohort's update");
    assert_eq!(report.deployment_id, dep);
    assert_eq!(report.status, UpdateStatusKind::Succeeded);
    assert_eq!(report.firmware_version.as_deref(), Some("2.0.0"));
    e2e::eventually("the restarted device reports 2.0.0", || async {
        (s.p.device(id).await["firmware_version"] == "2.0.0").then_some(())
    })
    .await;
    assert_eq!(
        downloads(),
        1,
        "the installed release was not downloaded again"
    );

    // Another release is downloaded and installed; so is the rollback to 2.0.0 after it.
    let v3 = s.release("3.0.0", b"firmware three").await;
    let dep3 = s.deploy(&v3, json!({})).await;
    completed(dep3.clone(), "3.0.0 installed").await;
    assert_eq!(downloads(), 2);
    let (st, body) =
        s.p.api(
            "POST",
            &format!("/api/v1/deployments/{dep3}/rollback"),
            None,
        )
        .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["release_id"], v2.as_str(), "{body}");
    completed(
        body["id"].as_str().unwrap().to_owned(),
        "rolled back to 2.0.0",
    )
    .await;
    assert_eq!(downloads(), 3);
    let record = InstalledRelease::load(dir.path()).unwrap().unwrap();
    assert_eq!(record.version, "2.0.0");
    agent.shutdown().await.unwrap();
    updater.abort();
    s.p.stop().await;
}

/// A cohort of three device agents, two registered devices that never connect, and one online
/// device that runs no agent (a plain MQTT client publishing telemetry). A staged deployment
/// completes for the agents; the three others are `deferred` with their reasons, admitted but
/// neither waited for nor failed. A device that never connected converges when it comes with
/// an agent, on the completed deployment.
async fn unreachable_devices_are_deferred_and_the_agents_complete(p: Platform) {
    let s = Setup::new(p).await;
    let release = s.release("2.0.0", b"firmware for who is there").await;
    for i in 0..2 {
        s.register(&format!("far-never-{i}")).await;
    }
    let plain = s.plain_client("far-plain").await;
    s.wait_online("far-plain", true).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(
            s.device(&format!("far-agent-{i}"), "1.0.0", installs_ok())
                .await,
        );
    }
    let dep = s
        .deploy(
            &release,
            json!({ "waves": [{ "count": 1 }, { "percent": 50 }] }),
        )
        .await;
    let d = s
        .wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    let summary = &d["summary"];
    assert_eq!(summary["total"], 6, "{d:#}");
    assert_eq!(summary["admitted"], 3, "{d:#}");
    assert_eq!(summary["succeeded"], 3, "{d:#}");
    assert_eq!(summary["failures"], 0, "{d:#}");
    assert_eq!(summary["deferred"], 3, "{d:#}");
    assert_eq!(
        summary["deferred_by_reason"],
        json!({ "never_connected": 2, "no_update_agent": 1 })
    );
    let reason = d["state_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("3 of 3 finished devices succeeded") && reason.contains("3 deferred"),
        "{reason}"
    );
    for e in s.executions(&dep).await {
        let id = e["device_id"].as_str().unwrap();
        let (status, why) = match id {
            "far-plain" => ("deferred", json!("no_update_agent")),
            _ if id.starts_with("far-never-") => ("deferred", json!("never_connected")),
            _ => ("succeeded", Value::Null),
        };
        assert_eq!(e["status"], status, "{e}");
        assert_eq!(e["deferred_reason"], why, "{e}");
        assert_eq!(
            e["admitted"], true,
            "every device is in the final wave: {e}"
        );
    }
    let (st, page) =
        s.p.api(
            "GET",
            &format!("/api/v1/deployments/{dep}/executions?status=deferred"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "{page}");
    let dev = s.p.device("far-plain").await;
    assert_eq!(
        dev["state"], "online",
        "a device without an agent is not failed: {dev}"
    );

    // The plain client leaves: still deferred, now because it is offline.
    plain.client.disconnect().await.unwrap();
    s.wait_online("far-plain", false).await;
    e2e::eventually("far-plain deferred as offline", || async {
        let e = s.execution(&dep, "far-plain").await;
        (e["deferred_reason"] == "offline").then_some(())
    })
    .await;

    // A device that never connected comes with an agent: it hears the retained cohort message
    // (everyone is admitted), installs, and its reports are recorded.
    let late = s.device("far-never-0", "1.0.0", installs_ok()).await;
    let d = s
        .wait_deployment(&dep, "the late device succeeded", |d| {
            d["summary"]["succeeded"] == 4
        })
        .await;
    assert_eq!(d["state"], "completed", "{d:#}");
    assert_eq!(
        d["summary"]["deferred_by_reason"],
        json!({ "never_connected": 1, "offline": 1 })
    );
    assert_eq!(s.p.device("far-never-0").await["firmware_version"], "2.0.0");
    late.agent.shutdown().await.unwrap();
    for a in agents {
        a.agent.shutdown().await.unwrap();
    }
    s.p.stop().await;
}

/// The README's walk-through to the letter: `thermo-0001` ran the device agent once (1.0.0),
/// `thermo-0002` published one message with `mosquitto_pub` and left, `thermo-1001` and
/// `thermo-1002` were imported and never connected; the deployment has waves of 10 % and 50 %,
/// 100 devices a minute, rollback on failure. The deployment is made (again, if need be) until
/// the hash ranks `thermo-0002` first, as when the issue was found, with the agent down; then
/// the agent runs as "Updating a cohort" says. It gets the update and the deployment completes;
/// the three others are deferred.
async fn the_walk_through_updates_the_agent_it_names(p: Platform) {
    use device_client::fleet_wire::update::rollout_rank;
    use device_client::fleet_wire::DeviceId;

    let s = Setup::new(p).await;
    let first_run = s.agent("thermo-0001", "1.0.0").await;
    first_run.shutdown().await.unwrap();
    let mosquitto_pub = s.plain_client("thermo-0002").await;
    mosquitto_pub.client.disconnect().await.unwrap();
    let (st, body) =
        s.p.api_raw(
            "POST",
            &format!("/api/v1/products/{}/devices/import", s.fleet.product_id),
            "text/csv",
            "id,cohort,tags\nthermo-1001,canary,site=berlin;line=2\nthermo-1002,canary,site=berlin\n",
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["created"], 2, "{body}");
    s.wait_online("thermo-0001", false).await;
    s.wait_online("thermo-0002", false).await;

    let release = s.release("2.0.0", &[0x5Au8; 4096]).await;
    let policy = json!({ "waves": [{ "percent": 10 }, { "percent": 50 }],
        "max_per_minute": 100, "on_failure": "rollback" });
    let ids = ["thermo-0001", "thermo-0002", "thermo-1001", "thermo-1002"];
    let first_ranked = |dep: &str| {
        ids.into_iter()
            .min_by_key(|id| rollout_rank(dep, &DeviceId::parse(id).unwrap()))
            .unwrap()
    };
    let mut attempts = 0;
    let dep = loop {
        let dep = s.deploy(&release, policy.clone()).await;
        if first_ranked(&dep) == "thermo-0002" {
            break dep;
        }
        attempts += 1;
        assert!(attempts < 200, "the hash never ranked thermo-0002 first");
        let (st, body) =
            s.p.api("POST", &format!("/api/v1/deployments/{dep}/cancel"), None)
                .await;
        assert_eq!(st, 200, "{body}");
    };
    // Nobody is reachable: the first wave admits nobody (the device without an agent least of
    // all) and waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = s.deployment(&dep).await;
    assert_eq!(d["state"], "active", "{d:#}");
    assert_eq!(d["current_wave"], 1, "{d:#}");
    assert_eq!(d["admit_below"], 0, "{d:#}");
    assert_eq!(d["summary"]["ready"], 0, "{d:#}");
    assert_eq!(d["summary"]["by_status"]["pending"], 4, "{d:#}");

    // The agent, run as "Updating a cohort" runs it: it follows the cohort and trusts the key.
    let agent = s.device("thermo-0001", "1.0.0", installs_ok()).await;
    let d = s
        .wait_deployment(&dep, "completed", |d| d["state"] == "completed")
        .await;
    assert_eq!(d["current_wave"], 3, "{d:#}");
    assert_eq!(d["summary"]["succeeded"], 1, "{d:#}");
    assert_eq!(d["summary"]["failures"], 0, "{d:#}");
    assert_eq!(d["summary"]["deferred"], 3, "{d:#}");
    assert_eq!(
        d["summary"]["deferred_by_reason"],
        json!({ "offline": 1, "never_connected": 2 })
    );
    let e = s.execution(&dep, "thermo-0001").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["firmware_version"], "2.0.0", "{e}");
    let e = s.execution(&dep, "thermo-0002").await;
    assert_eq!(e["status"], "deferred", "{e}");
    assert_eq!(e["deferred_reason"], "offline", "{e}");
    let dev = e2e::eventually("thermo-0001 runs 2.0.0", || async {
        let d = s.p.device("thermo-0001").await;
        (d["firmware_version"] == "2.0.0").then_some(d)
    })
    .await;
    assert_eq!(dev["state"], "online", "{dev}");
    agent.agent.shutdown().await.unwrap();
    s.p.stop().await;
}
