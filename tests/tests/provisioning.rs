//! JITP and who may connect: real mTLS handshakes against the real platform.

use e2e::{eventually, Client, Db, Platform, TestCa};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use serde_json::json;

e2e::on_both_databases!(
    jitp_on_first_connection_then_reuse,
    concurrent_first_connects_create_one_device
);

async fn jitp_on_first_connection_then_reuse(p: Platform) {
    let fleet = p.jitp_fleet(json!({ "site": "berlin", "line": "3" })).await;
    let cert = fleet.ca.issue("sensor-001");

    // One connection, no retry: CONNACK success means the device exists and is online.
    let mut c = Client::connect(p.device_options(&cert, "sensor-001"))
        .await
        .expect("first connection is accepted");
    let d = p.device("sensor-001").await;
    assert_eq!(d["product_id"], fleet.product_id.as_str());
    assert_eq!(d["cohort_id"], fleet.cohort_id.as_str());
    assert_eq!(d["tags"], json!({ "site": "berlin", "line": "3" }));
    assert_eq!(d["ca_id"], fleet.ca_id.as_str());
    assert_eq!(d["online"], true);
    assert_eq!(d["state"], "online");
    let first_epoch = d["session_epoch"].as_u64().unwrap();
    assert!(first_epoch >= 1);

    // A PUBACK means the event is in the database: no waiting needed afterwards.
    c.client
        .publish(
            "devices/sensor-001/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"temp":21.5}"#,
        )
        .await
        .unwrap();
    c.client
        .publish(
            "devices/sensor-001/state",
            QoS::AtLeastOnce,
            true,
            r#"{"firmware_version":"1.4.2","uptime_s":12}"#,
        )
        .await
        .unwrap();
    let mut acks = 0;
    c.wait_for(|pkt| {
        if matches!(pkt, rumqttc::Packet::PubAck(_)) {
            acks += 1;
        }
        (acks == 2).then_some(())
    })
    .await;
    let d = p.device("sensor-001").await;
    assert_eq!(d["last_telemetry"], json!({ "temp": 21.5 }));
    assert_eq!(d["firmware_version"], "1.4.2");
    assert_eq!(d["reported"]["uptime_s"], 12);

    c.client.disconnect().await.unwrap();
    let d = eventually("device offline after disconnect", || async {
        let d = p.device("sensor-001").await;
        (d["online"] == false).then_some(d)
    })
    .await;
    assert_eq!(d["state"], "offline");
    assert_eq!(d["disconnect_reason"], "client");
    assert!(d["last_seen"].is_string(), "{d}");

    // The second connection reuses the device and starts a newer session.
    let _c = Client::connect(p.device_options(&cert, "sensor-001"))
        .await
        .expect("second connection accepted");
    let d = p.device("sensor-001").await;
    assert_eq!(d["online"], true);
    assert!(d["session_epoch"].as_u64().unwrap() > first_epoch);
    let (s, list) = p
        .api(
            "GET",
            &format!("/api/v1/devices?cohort_id={}", fleet.cohort_id),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    p.stop().await;
}

async fn concurrent_first_connects_create_one_device(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("twin");
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let o = p.device_options(&cert, "twin");
            tokio::spawn(async move { Client::connect(o).await.is_ok() })
        })
        .collect();
    let mut accepted = 0;
    for a in attempts {
        accepted += a.await.unwrap() as usize;
    }
    assert!(accepted >= 1, "no connection was accepted");
    let (s, list) = p
        .api(
            "GET",
            &format!("/api/v1/devices?product_id={}", fleet.product_id),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(p.app().control().metrics().jitp_provisioned, 1);
    p.stop().await;
}

/// TLS 1.3 clients learn of a refused certificate on their first read after the handshake, so
/// the alert may surface as a TLS, I/O or decoding error: what matters is which alert it was.
fn assert_tls_alert(e: &ConnectionError, alert: &str) {
    let text = format!("{e:?}");
    assert!(
        text.contains(&format!("AlertReceived({alert})")),
        "expected TLS alert {alert}, got {text}"
    );
}

fn refused_with(r: Result<Client, ConnectionError>) -> ConnectionError {
    match r {
        Ok(_) => panic!("connection was accepted"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_refused_until_registered_at_run_time() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let stranger = TestCa::new("Not Yet Registered CA");
    let cert = stranger.issue("late-1");

    let e = refused_with(Client::connect(p.device_options(&cert, "late-1")).await);
    assert_tls_alert(&e, "UnknownCA");
    assert!(p.app().control().metrics().rejections["unknown_ca"] >= 1);

    // Registered over REST while running: trusted from the next handshake, no restart.
    p.register_ca(
        &stranger,
        Some(json!({ "product_id": fleet.product_id, "cohort_id": fleet.cohort_id, "tags": {} })),
    )
    .await;
    Client::connect(p.device_options(&cert, "late-1"))
        .await
        .expect("accepted once its CA is registered");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_ca_refuses_new_connections_and_ends_live_ones() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("cam-7");
    let mut live = Client::connect(p.device_options(&cert, "cam-7"))
        .await
        .unwrap();

    let (s, body) = p
        .api(
            "PATCH",
            &format!("/api/v1/ca-certificates/{}", fleet.ca_id),
            Some(json!({ "enabled": false })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["enabled"], false);

    live.closed().await;
    let d = eventually("revoked session marked offline", || async {
        let d = p.device("cam-7").await;
        (d["online"] == false).then_some(d)
    })
    .await;
    assert_eq!(d["disconnect_reason"], "revoked");
    refused_with(Client::connect(p.device_options(&cert, "cam-7")).await);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_identities_are_refused() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let now = time::OffsetDateTime::now_utc();

    let expired = fleet.ca.issue_valid(
        "old-1",
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let e = refused_with(Client::connect(p.device_options(&expired, "old-1")).await);
    assert_tls_alert(&e, "CertificateExpired");
    assert!(p.app().control().metrics().rejections["certificate_expired"] >= 1);

    for bad_cn in ["a/b", "dev+1", "x#", "-lead", "has space"] {
        let cert = fleet.ca.issue(bad_cn);
        let e = refused_with(Client::connect(p.device_options(&cert, "whatever")).await);
        assert!(
            matches!(
                e,
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
            ),
            "CN {bad_cn:?}: {e:?}"
        );
    }
    assert!(p.app().control().metrics().rejections["bad_common_name"] >= 5);

    let cert = fleet.ca.issue("dev-9");
    let e = refused_with(Client::connect(p.device_options(&cert, "dev-10")).await);
    assert!(
        matches!(
            e,
            ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)
        ),
        "{e:?}"
    );
    assert_eq!(
        p.app().control().metrics().rejections["client_id_mismatch"],
        1
    );

    // None of the refused identities became a device.
    let (_, list) = p
        .api(
            "GET",
            &format!("/api/v1/devices?product_id={}", fleet.product_id),
            None,
        )
        .await;
    assert_eq!(list["items"], json!([]), "{list}");

    // The same id from another CA is a collision once the first device exists.
    Client::connect(p.device_options(&cert, "dev-9"))
        .await
        .unwrap();
    let other = p.jitp_fleet(json!({})).await;
    let imposter = other.ca.issue("dev-9");
    let e = refused_with(Client::connect(p.device_options(&imposter, "dev-9")).await);
    assert!(
        matches!(
            e,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{e:?}"
    );
    assert_eq!(
        p.app().control().metrics().rejections["identity_collision"],
        1
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_without_jitp_admits_only_registered_devices() {
    let p = Platform::start(Db::Sqlite).await.unwrap();
    let ca = TestCa::new("Plain CA");
    p.register_ca(&ca, None).await;
    let cert = ca.issue("unknown-1");
    let e = refused_with(Client::connect(p.device_options(&cert, "unknown-1")).await);
    assert!(
        matches!(
            e,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{e:?}"
    );
    assert_eq!(p.app().control().metrics().rejections["not_provisioned"], 1);
    p.stop().await;
}
