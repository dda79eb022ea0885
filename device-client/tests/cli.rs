//! The `device-client` binary: PKI files, error messages and exit codes, the agent and
//! one-shot publish against the local Mosquitto, and one-shot publish over mutual TLS against
//! the real platform (`e2e::Platform`).

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{mosquitto, unique_id, Observer, TempDir, WAIT};
use device_client::fleet_wire::payload::{Command, CommandAck, CommandStatus};
use device_client::fleet_wire::Topic;
use device_client::pki::Ca;
use device_client::ClientIdentity;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_device-client");

async fn cli(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("device-client finished")
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn pki_commands_write_a_usable_ca_and_device_certificate() {
    let dir = TempDir::new("cli-pki");
    let (ca, ca_key, dev, dev_key) = (
        dir.path("ca.pem"),
        dir.path("ca.key"),
        dir.path("dev-1.pem"),
        dir.path("dev-1.key"),
    );
    let out = cli(&[
        "pki",
        "ca",
        "--out-cert",
        p(&ca),
        "--out-key",
        p(&ca_key),
        "--cn",
        "CLI CA",
        "--days",
        "30",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&[
        "pki",
        "device",
        "--ca-cert",
        p(&ca),
        "--ca-key",
        p(&ca_key),
        "--id",
        "dev-1",
        "--out-cert",
        p(&dev),
        "--out-key",
        p(&dev_key),
        "--days",
        "7",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    let identity = ClientIdentity::from_files(&dev, &dev_key).unwrap();
    assert_eq!(identity.device_id().unwrap().as_str(), "dev-1");
    Ca::from_files(&ca, &ca_key).unwrap();

    // Existing files are kept unless --force.
    let out = cli(&["pki", "ca", "--out-cert", p(&ca), "--out-key", p(&ca_key)]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );
    let out = cli(&[
        "pki",
        "ca",
        "--out-cert",
        p(&ca),
        "--out-key",
        p(&ca_key),
        "--force",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // RSA-2048: a CA, and an RSA-keyed device it signs.
    let (rsa_ca, rsa_ca_key) = (dir.path("r.pem"), dir.path("r.key"));
    let (rsa_dev, rsa_dev_key) = (dir.path("r-dev.pem"), dir.path("r-dev.key"));
    let out = cli(&[
        "pki",
        "ca",
        "--out-cert",
        p(&rsa_ca),
        "--out-key",
        p(&rsa_ca_key),
        "--algorithm",
        "rsa2048",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&[
        "pki",
        "device",
        "--ca-cert",
        p(&rsa_ca),
        "--ca-key",
        p(&rsa_ca_key),
        "--id",
        "dev-rsa",
        "--algorithm",
        "rsa2048",
        "--out-cert",
        p(&rsa_dev),
        "--out-key",
        p(&rsa_dev_key),
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    Ca::from_files(&rsa_ca, &rsa_ca_key).unwrap();
    let identity = ClientIdentity::from_files(&rsa_dev, &rsa_dev_key).unwrap();
    assert_eq!(identity.device_id().unwrap().as_str(), "dev-rsa");

    let out = cli(&[
        "pki",
        "device",
        "--ca-cert",
        p(&dev),
        "--ca-key",
        p(&dev_key),
        "--id",
        "x",
        "--out-cert",
        p(&dir.path("x.pem")),
        "--out-key",
        p(&dir.path("x.key")),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a CA certificate"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn missing_or_bad_pem_files_fail_clearly() {
    let dir = TempDir::new("cli-pem");
    let garbage = dir.path("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--ca", "/nonexistent/ca.pem"],
            "cannot read CA certificate /nonexistent/ca.pem",
        ),
        (&["--ca", p(&garbage)], "no PEM CERTIFICATE block found"),
        (&[], "--ca is required for an mqtts:// URL"),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "publish",
            "--url",
            "mqtts://127.0.0.1:1",
            "--client-id",
            "d",
            "--topic-kind",
            "telemetry",
            "--payload",
            "{}",
        ];
        args.extend_from_slice(extra);
        let out = cli(&args).await;
        assert!(!out.status.success());
        assert!(stderr(&out).contains(want), "{:?}: {}", extra, stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_mutual_tls_and_its_errors() {
    let platform = e2e::Platform::sqlite().await;
    let fleet = platform.jitp_fleet(json!({})).await;
    let dir = TempDir::new("cli-tls");
    let id = "cli-tls-dev";
    let dev = fleet.ca.issue(id);
    let (server_ca, other_ca) = (dir.path("server-ca.pem"), dir.path("other-ca.pem"));
    let (cert, key) = (dir.path("dev.pem"), dir.path("dev.key"));
    std::fs::write(&server_ca, platform.server_ca_pem()).unwrap();
    std::fs::write(&other_ca, &fleet.ca.pem).unwrap();
    std::fs::write(&cert, &dev.cert_pem).unwrap();
    std::fs::write(&key, &dev.key_pem).unwrap();
    let url = format!("mqtts://127.0.0.1:{}", platform.app().mqtts_addr().port());
    let cases: [(&Path, &[&str], Option<&str>); 3] = [
        (&server_ca, &[], None),
        (
            &server_ca,
            &["--client-id", "someone-else"],
            Some("broker refused the connection: client identifier rejected (CONNACK reason 0x85)"),
        ),
        (
            &other_ca,
            &[],
            Some("TLS: invalid peer certificate: UnknownIssuer"),
        ),
    ];
    for (ca, extra, want) in cases {
        let mut args = vec![
            "publish",
            "--url",
            &url,
            "--ca",
            p(ca),
            "--cert",
            p(&cert),
            "--key",
            p(&key),
            "--topic-kind",
            "state",
            "--payload",
            r#"{"firmware_version":"1.0.0"}"#,
        ];
        args.extend_from_slice(extra);
        let out = cli(&args).await;
        match want {
            None => {
                assert!(out.status.success(), "{}", stderr(&out));
                // Exit after the PUBACK, which the platform sends once the state is stored.
                let d = platform.device(id).await;
                assert_eq!(d["firmware_version"], "1.0.0", "{d}");
            }
            Some(want) => {
                assert!(!out.status.success());
                assert!(
                    stderr(&out).contains(want),
                    "want {want:?} in {}",
                    stderr(&out)
                );
            }
        }
    }
    platform.stop().await;
}

#[tokio::test]
async fn run_prints_commands_and_stops_after_count() {
    let Some(url) = mosquitto().await else {
        return;
    };
    let id = unique_id("cli-run");
    let mut observer = Observer::connect(&[
        Topic::State(id.clone()),
        Topic::CommandAck(id.clone()),
        Topic::Telemetry(id.clone()),
    ])
    .await;
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--url", &url.to_string(), "--client-id", id.as_str()])
        .args([
            "--telemetry-interval",
            "100ms",
            "--count",
            "15",
            "--firmware-version",
            "3.1.4",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The state is published after the subscription was requested, so commands sent from now
    // on reach the agent.
    observer
        .expect("state", |t, _| matches!(t, Topic::State(_)).then_some(()))
        .await;
    let command = Command {
        id: "cli-cmd".into(),
        name: "blink".into(),
        params: json!({"times": 3}),
    };
    observer
        .publish(
            &Topic::Commands(id.clone()),
            serde_json::to_vec(&command).unwrap(),
            false,
        )
        .await;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), command);
    let ack = observer
        .expect("ack", |t, p| match t {
            Topic::CommandAck(_) => serde_json::from_slice::<CommandAck>(p).ok(),
            _ => None,
        })
        .await;
    assert_eq!(
        (ack.id.as_str(), ack.status),
        ("cli-cmd", CommandStatus::Succeeded)
    );

    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    observer.publish(&Topic::State(id), Vec::new(), true).await;
}

#[tokio::test]
async fn publish_to_mosquitto() {
    let Some(url) = mosquitto().await else {
        return;
    };
    let id = unique_id("cli-pub");
    let mut observer = Observer::connect(&[Topic::Telemetry(id.clone())]).await;
    let out = cli(&[
        "publish",
        "--url",
        &url.to_string(),
        "--client-id",
        id.as_str(),
        "--topic-kind",
        "telemetry",
        "--payload",
        r#"{"t":1}"#,
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let payload = observer
        .expect("telemetry", |t, p| {
            matches!(t, Topic::Telemetry(_)).then(|| p.to_vec())
        })
        .await;
    assert_eq!(payload, br#"{"t":1}"#);

    let out = cli(&[
        "publish",
        "--url",
        &url.to_string(),
        "--client-id",
        id.as_str(),
        "--topic-kind",
        "telemetry",
        "--payload",
        "[1]",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("payload must be a JSON object"),
        "{}",
        stderr(&out)
    );
}
