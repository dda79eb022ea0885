//! A cluster of real processes: a nats-server of the test's own, a fresh PostgreSQL database,
//! broker nodes (`fleet-service broker`) and fleet-service replicas (`fleet-service api`), each
//! a child process that a test may kill with SIGKILL and start again. They share one data
//! directory (the dev PKI devices trust, one admin token), as processes on one machine would.
//!
//! The `fleet-service` binary is `FLEET_SERVICE_BIN`, else the one cargo built next to the test
//! binary (`cargo test --workspace` builds it; alone: `cargo build -p fleet-service`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::nats::NatsServer;
use crate::{DeviceCert, Rest};

/// The `fleet-service` binary the cluster runs.
pub fn fleet_service_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEET_SERVICE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> -> target/debug/fleet-service
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("fleet-service")
}

/// One running process and the addresses it reported.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Banner labels to addresses: `devices`, `services`, `http`.
    pub addrs: HashMap<&'static str, SocketAddr>,
}

impl Proc {
    pub fn mqtts(&self) -> SocketAddr {
        self.addrs["devices"]
    }
    pub fn service(&self) -> SocketAddr {
        self.addrs["services"]
    }
    pub fn http(&self) -> SocketAddr {
        self.addrs["http"]
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no goodbye to anyone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub nats: NatsServer,
    pub database_url: String,
    pub admin: String,
    dir: tempfile::TempDir,
    tuning: PathBuf,
    pub brokers: Vec<Option<Proc>>,
    pub replicas: Vec<Option<Proc>>,
}

impl Cluster {
    /// Starts a nats-server and a fresh PostgreSQL database, then `replicas` replicas (the
    /// first one creates the schema and the dev PKI) and `brokers` broker nodes. None (after
    /// saying why) without PostgreSQL or a nats-server binary.
    pub async fn start(brokers: usize, replicas: usize, tuning: &str) -> Option<Cluster> {
        let Some(server) = crate::postgres_url() else {
            eprintln!("skipped: FLEET_TEST_POSTGRES_URL not set; a cluster needs PostgreSQL");
            return None;
        };
        if crate::nats::nats_server_binary().is_none() {
            eprintln!("skipped: no nats-server binary (set FLEET_TEST_NATS_SERVER)");
            return None;
        }
        let bin = fleet_service_binary();
        assert!(
            bin.is_file(),
            "{} is missing: build it with `cargo build -p fleet-service`",
            bin.display()
        );
        let nats = NatsServer::start().expect("nats-server starts");
        let database_url = crate::fresh_postgres_database(&server).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let tuning_path = dir.path().join("cluster.toml");
        std::fs::write(&tuning_path, tuning).expect("tuning file");
        let mut cluster = Cluster {
            nats,
            database_url,
            admin: format!("admin-{}", uuid::Uuid::new_v4().simple()),
            dir,
            tuning: tuning_path,
            brokers: Vec::new(),
            replicas: Vec::new(),
        };
        for _ in 0..replicas {
            cluster.start_replica();
        }
        for _ in 0..brokers {
            cluster.start_broker();
        }
        Some(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts one more broker node (`node-{n}`); returns its index.
    pub fn start_broker(&mut self) -> usize {
        let n = self.brokers.len();
        let p = self.spawn("broker", &format!("node-{}", n + 1));
        self.brokers.push(Some(p));
        n
    }

    /// Starts broker node `i` again (after it was killed), under the same node id.
    pub fn restart_broker(&mut self, i: usize) {
        assert!(self.brokers[i].is_none(), "node {i} is running");
        self.brokers[i] = Some(self.spawn("broker", &format!("node-{}", i + 1)));
    }

    /// Starts one more replica (`api-{n}`); returns its index.
    pub fn start_replica(&mut self) -> usize {
        let n = self.replicas.len();
        let p = self.spawn("api", &format!("api-{}", n + 1));
        self.replicas.push(Some(p));
        n
    }

    pub fn broker(&self, i: usize) -> &Proc {
        self.brokers[i].as_ref().expect("broker node running")
    }

    pub fn replica(&self, i: usize) -> &Proc {
        self.replicas[i].as_ref().expect("replica running")
    }

    /// SIGKILLs broker node `i`.
    pub fn kill_broker(&mut self, i: usize) {
        self.brokers[i].take().expect("broker node running").kill();
    }

    /// SIGKILLs replica `i`.
    pub fn kill_replica(&mut self, i: usize) {
        self.replicas[i].take().expect("replica running").kill();
    }

    /// The REST bridge of replica `i`, as the admin.
    pub fn rest(&self, i: usize) -> Rest {
        Rest::new(self.replica(i).http(), self.admin.clone())
    }

    pub fn server_ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pki").join("server-ca.pem"))
            .expect("the dev PKI's CA")
    }

    /// A device's MQTT options for broker node `i`.
    pub fn device_options(
        &self,
        i: usize,
        cert: &DeviceCert,
        client_id: &str,
    ) -> rumqttc::MqttOptions {
        let addr = self.broker(i).mqtts();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(crate::tls_config(&self.server_ca_pem(), Some(cert))),
        ));
        o
    }

    /// A backend service's MQTT options for broker node `i`.
    pub fn service_options(
        &self,
        i: usize,
        client_id: &str,
        api_key: &str,
    ) -> rumqttc::MqttOptions {
        let addr = self.broker(i).service();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_credentials("service", api_key);
        o
    }

    fn spawn(&self, role: &str, name: &str) -> Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut child = Command::new(fleet_service_binary())
            .arg(role)
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(["--database-url", &self.database_url])
            .args(["--nats-url", &self.nats.url()])
            .args(["--node-id", name])
            .args(["--admin-token", &self.admin])
            .arg("--config")
            .arg(&self.tuning)
            .args(["--mqtts-listen", "127.0.0.1:0"])
            .args(["--service-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info,rumqttd=warn,sqlx=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("fleet-service starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut addrs = HashMap::new();
            let mut started = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("fleet-service is running") {
                    started = true;
                    continue;
                }
                if started && line.trim().is_empty() {
                    let _ = tx.send(std::mem::take(&mut addrs));
                    started = false;
                    continue;
                }
                if let Some((label, value)) = line.trim().split_once(": ") {
                    let key = if label.starts_with("devices") {
                        "devices"
                    } else if label.starts_with("backend services") {
                        "services"
                    } else if label.starts_with("REST") || label.starts_with("health") {
                        "http"
                    } else {
                        continue;
                    };
                    let addr = value
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                    if let Some(addr) = addr {
                        addrs.insert(key, addr);
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addrs) => Proc {
                name: name.to_owned(),
                child,
                addrs,
            },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "{role} {name} did not start within 60 s; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    /// The log of process `name` so far (for failure messages).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    /// A failed test keeps the processes' logs and says where.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.brokers.iter_mut().chain(self.replicas.iter_mut()) {
                drop(p.take());
            }
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("the cluster's logs are kept in {}", dir.keep().display());
        }
    }
}
