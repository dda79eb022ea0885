//! Independent clients: Debian's mosquitto_pub speaks to our broker over mutual TLS, on
//! MQTT 3.1.1 and 5, and what it publishes is stored like any device's telemetry.

use std::process::Command;

use e2e::Platform;
use serde_json::json;

fn have(bin: &str) -> bool {
    Command::new(bin).arg("--help").output().is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_publishes_as_a_device() {
    if !have("mosquitto_pub") {
        eprintln!("skipped: mosquitto_pub not installed (apt-get install mosquitto-clients)");
        return;
    }
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({ "maker": "mosquitto" })).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = fleet.ca.issue("mosq-dev");
    let (cert_path, key_path) = (dir.path().join("dev.pem"), dir.path().join("dev.key"));
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    std::fs::write(&key_path, &cert.key_pem).unwrap();
    let port = p.app().mqtts_addr().port().to_string();

    // The last run is QoS 2 with the MQTT 5 properties mosquitto sends when asked, which the
    // broker's frame checks must accept.
    let v5_props: &[&str] = &[
        "-D",
        "connect",
        "receive-maximum",
        "10",
        "-D",
        "connect",
        "session-expiry-interval",
        "60",
        "-D",
        "connect",
        "request-problem-information",
        "1",
        "-D",
        "connect",
        "user-property",
        "k",
        "v",
        "-D",
        "publish",
        "payload-format-indicator",
        "1",
        "-D",
        "publish",
        "message-expiry-interval",
        "30",
        "-D",
        "publish",
        "content-type",
        "application/json",
        "-D",
        "publish",
        "user-property",
        "a",
        "b",
        "-D",
        "publish",
        "user-property",
        "c",
        "d",
    ];
    let runs: [(&str, u64, &str, &[&str]); 3] = [
        ("mqttv311", 1, "1", &[]),
        ("mqttv5", 2, "1", &[]),
        ("mqttv5", 3, "2", v5_props),
    ];
    for (version, n, qos, extra) in runs {
        let payload = json!({ "via": "mosquitto", "n": n }).to_string();
        let out = tokio::task::spawn_blocking({
            let (cert_path, key_path) = (cert_path.clone(), key_path.clone());
            let ca = p.app().server_ca_path().expect("the dev PKI").to_path_buf();
            let port = port.clone();
            move || {
                Command::new("mosquitto_pub")
                    .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", qos])
                    .args(extra)
                    .args([
                        "-i",
                        "mosq-dev",
                        "-t",
                        "devices/mosq-dev/telemetry",
                        "-m",
                        &payload,
                    ])
                    .arg("--cafile")
                    .arg(&ca)
                    .arg("--cert")
                    .arg(&cert_path)
                    .arg("--key")
                    .arg(&key_path)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub ({version}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // mosquitto_pub exits after its PUBACK, which the broker sends after the commit.
        let d = p.device("mosq-dev").await;
        assert_eq!(
            d["last_telemetry"],
            json!({ "via": "mosquitto", "n": n }),
            "{version}"
        );
        assert_eq!(d["tags"], json!({ "maker": "mosquitto" }));
    }

    // A client without a certificate gets nowhere.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-i", "mosq-dev"])
        .args(["-t", "devices/mosq-dev/telemetry", "-m", "{}"])
        .arg("--cafile")
        .arg(p.app().server_ca_path().expect("the dev PKI"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a client without a certificate was admitted"
    );
    p.stop().await;
}
