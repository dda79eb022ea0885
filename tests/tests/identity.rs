//! Hostile identities: certificates and client ids crafted to be taken for someone else's.
//! Whoever a connection is comes from the key that signed its certificate (devices) or the API
//! key it presents (services), never from a name another tenant can copy.

use e2e::{CertShape, Client, DeviceCert, Platform, TestCa};
use rumqttc::{ConnectReturnCode, ConnectionError, Packet, QoS};
use serde_json::{json, Value};

e2e::on_both_databases!(same_subject_ca_of_another_organization_is_not_the_devices_ca);

fn refused(r: Result<Client, ConnectionError>) -> ConnectionError {
    match r {
        Ok(_) => panic!("connection was accepted"),
        Err(e) => e,
    }
}

fn not_authorized(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
    )
}

fn no_key_id() -> CertShape {
    CertShape {
        no_authority_key_id: true,
        ..CertShape::default()
    }
}

/// Publishes one QoS 1 telemetry message and waits for its PUBACK: the connection is alive
/// and the event is stored.
async fn telemetry(c: &mut Client, id: &str, body: Value) {
    c.client
        .publish(
            format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
    c.wait_for(|p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await;
}

/// Organization B registers a CA whose subject copies organization A's, and signs a
/// certificate for A's device without an Authority Key Identifier: only the signature can tell
/// the two CAs apart. Every attempt is refused, A's device stays connected and keeps working,
/// and each CA provisions new devices into its own organization only.
async fn same_subject_ca_of_another_organization_is_not_the_devices_ca(p: Platform) {
    let name = format!("Shared Name CA {}", uuid::Uuid::new_v4().simple());
    let a = p
        .jitp_fleet_with(p.app().admin_token(), TestCa::new(&name), json!({}))
        .await;
    let genuine = a.ca.issue_as("victim-1", &no_key_id());
    let mut victim = Client::connect(p.device_options(&genuine, "victim-1"))
        .await
        .expect("the genuine device connects");
    telemetry(&mut victim, "victim-1", json!({ "genuine": 1 })).await;
    let epoch = p.device("victim-1").await["session_epoch"].as_u64();

    let (_, b_admin) = p.organization("tenant-b").await;
    let b = p
        .jitp_fleet_with(&b_admin, TestCa::new(&name), json!({}))
        .await;
    let forged = b.ca.issue_as("victim-1", &no_key_id());
    for attempt in 0..4 {
        let e = refused(Client::connect(p.device_options(&forged, "victim-1")).await);
        assert!(not_authorized(&e), "attempt {attempt}: {e:?}");
    }
    let rejections = p.app().control().metrics().rejections;
    assert_eq!(rejections["identity_collision"], 4, "{rejections:?}");

    // The genuine session was never taken over, and the device's data is its own.
    telemetry(&mut victim, "victim-1", json!({ "genuine": 2 })).await;
    let d = p.device("victim-1").await;
    assert_eq!(d["session_epoch"].as_u64(), epoch, "{d}");
    assert_eq!(d["online"], true);
    assert_eq!(d["ca_id"], a.ca_id.as_str());
    assert_eq!(d["last_telemetry"], json!({ "genuine": 2 }));

    // The genuine device reconnects every time, with both CAs registered.
    victim.kill().await;
    for attempt in 0..4 {
        let c = Client::connect(p.device_options(&genuine, "victim-1"))
            .await
            .unwrap_or_else(|e| panic!("genuine reconnect {attempt}: {e:?}"));
        c.kill().await;
    }

    // New devices land with the CA that really signed them.
    for (ca, id) in [(&a.ca, "new-in-a"), (&b.ca, "new-in-b")] {
        let c = Client::connect(p.device_options(&ca.issue_as(id, &no_key_id()), id))
            .await
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        c.kill().await;
    }
    let d = p.device("new-in-a").await;
    assert_eq!(d["product_id"], a.product_id.as_str());
    assert_eq!(d["ca_id"], a.ca_id.as_str());
    let (s, d) = p
        .api_as(&b_admin, "GET", "/api/v1/devices/new-in-b", None)
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["product_id"], b.product_id.as_str());
    assert_eq!(d["ca_id"], b.ca_id.as_str());
    let (s, _) = p.api("GET", "/api/v1/devices/new-in-b", None).await;
    assert_eq!(s, 404, "organization A does not see B's device");
    p.stop().await;
}

/// An intermediate under organization B's root that copies A's CA name: the chain verifies (to
/// B's root), but the certificate is not A's CA's, so it is not A's device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_named_like_another_organizations_ca_is_refused() {
    let p = Platform::sqlite().await;
    let name = format!("Factory CA {}", uuid::Uuid::new_v4().simple());
    let a = p
        .jitp_fleet_with(p.app().admin_token(), TestCa::new(&name), json!({}))
        .await;
    Client::connect(p.device_options(&a.ca.issue("victim-2"), "victim-2"))
        .await
        .expect("the genuine device connects")
        .kill()
        .await;

    let (_, b_admin) = p.organization("tenant-b").await;
    let b = p.jitp_fleet_as(&b_admin, json!({})).await;
    let lookalike = b.ca.intermediate(&name);
    for (id, shape) in [
        ("victim-2", no_key_id()),
        ("victim-2", CertShape::default()),
        ("fresh-2", no_key_id()),
    ] {
        let cert: DeviceCert = lookalike.issue_as(id, &shape);
        let e = refused(Client::connect(p.device_options(&cert, id)).await);
        assert!(not_authorized(&e), "{id} {shape:?}: {e:?}");
    }
    let rejections = p.app().control().metrics().rejections;
    assert_eq!(rejections["unknown_ca"], 3, "{rejections:?}");
    let (s, _) = p.api("GET", "/api/v1/devices/fresh-2", None).await;
    assert_eq!(s, 404, "a refused certificate provisions nothing");
    assert_eq!(p.device("victim-2").await["online"], false);
    p.stop().await;
}

/// `CN=a, CN=b` names two devices; whichever a reader picks, another reader may pick the
/// other. Refused, counted under its own reason, and nothing is provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_with_two_common_names_is_refused() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue_as(
        "twin-a",
        &CertShape {
            second_cn: Some("twin-b".into()),
            ..CertShape::default()
        },
    );
    for client_id in ["twin-a", "twin-b"] {
        let e = refused(Client::connect(p.device_options(&cert, client_id)).await);
        assert!(not_authorized(&e), "{client_id}: {e:?}");
    }
    let rejections = p.app().control().metrics().rejections;
    assert_eq!(rejections["ambiguous_common_name"], 2, "{rejections:?}");
    for id in ["twin-a", "twin-b"] {
        let (s, _) = p.api("GET", &format!("/api/v1/devices/{id}"), None).await;
        assert_eq!(s, 404, "{id} was provisioned");
    }
    p.stop().await;
}

/// A service's MQTT client id is its key's own: another key naming the same client id (a
/// viewer of another organization, or of another product) gets a session of its own and
/// leaves the first one alone; only the same key takes its session over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_client_ids_belong_to_their_key() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let admin = p.app().admin_token().to_owned();
    let mut owner = Client::connect(p.service_options("backend-1", &admin))
        .await
        .unwrap();
    owner
        .client
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    owner
        .wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
        .await;

    let (_, other_org_admin) = p.organization("tenant-b").await;
    let other_org_viewer = p.key_as(&other_org_admin, "viewer", json!({})).await;
    let other_product = p.jitp_fleet(json!({})).await;
    let scoped_viewer = p
        .key_as(
            &admin,
            "viewer",
            json!({ "product_id": other_product.product_id }),
        )
        .await;
    let mut intruders = Vec::new();
    for key in [&other_org_viewer, &scoped_viewer, &other_org_admin] {
        intruders.push(
            Client::connect(p.service_options("backend-1", key))
                .await
                .expect("another key may use the name for a session of its own"),
        );
    }

    // The owner's session is untouched: it still receives what it subscribed to.
    let cert = fleet.ca.issue("svc-probe");
    let mut device = Client::connect(p.device_options(&cert, "svc-probe"))
        .await
        .unwrap();
    telemetry(&mut device, "svc-probe", json!({ "n": 1 })).await;
    let topic = owner
        .wait_for(|pkt| match pkt {
            Packet::Publish(m) => Some(m.topic.clone()),
            _ => None,
        })
        .await;
    assert_eq!(topic, "devices/svc-probe/telemetry");

    // The same key takes its own session over, as MQTT says.
    let _again = Client::connect(p.service_options("backend-1", &admin))
        .await
        .unwrap();
    let closed = owner.closed().await;
    assert!(!closed.is_empty());
    for mut c in intruders {
        c.client
            .subscribe("devices/+/state", QoS::AtMostOnce)
            .await
            .unwrap();
        c.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
            .await;
    }
    p.stop().await;
}

/// A CA past its expiry date provisions no new device (TLS trust anchors carry no validity of
/// their own, so the handshake alone would let it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ca_provisions_no_new_devices() {
    let p = Platform::sqlite().await;
    let now = time::OffsetDateTime::now_utc();
    let expired = TestCa::new_valid(
        "Expired Factory CA",
        now - time::Duration::days(400),
        now - time::Duration::days(1),
    );
    let fleet = p
        .jitp_fleet_with(p.app().admin_token(), expired, json!({}))
        .await;
    let e = refused(Client::connect(p.device_options(&fleet.ca.issue("late-1"), "late-1")).await);
    assert!(not_authorized(&e), "{e:?}");
    assert_eq!(p.app().control().metrics().rejections["ca_expired"], 1);
    let (s, _) = p.api("GET", "/api/v1/devices/late-1", None).await;
    assert_eq!(s, 404);
    p.stop().await;
}

/// A CA certificate is no device identity, even one a registered CA signed whose CN is a valid
/// device id: refused in the handshake, and nothing is provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_is_not_a_device() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let sub_ca = fleet.ca.intermediate("ca-shaped-1");
    let e =
        refused(Client::connect(p.device_options(&sub_ca.as_device_cert(), "ca-shaped-1")).await);
    assert!(
        format!("{e:?}").contains("AlertReceived(CertificateUnknown)"),
        "refused in the handshake: {e:?}"
    );
    let (s, _) = p.api("GET", "/api/v1/devices/ca-shaped-1", None).await;
    assert_eq!(s, 404);
    p.stop().await;
}

/// The proof of possession names its code in exactly one CN: a second one is refused, and the
/// code stays usable for a proper proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_of_possession_with_two_common_names_is_refused() {
    let p = Platform::sqlite().await;
    let ca = TestCa::new("Two Names Factory CA");
    let (s, code) = p
        .api("POST", "/api/v1/ca-certificates/verification-code", None)
        .await;
    assert_eq!(s, 201, "{code}");
    let code = code["code"].as_str().unwrap();
    let proof = ca.issue_as(
        code,
        &CertShape {
            second_cn: Some("something-else".into()),
            ..CertShape::default()
        },
    );
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/ca-certificates",
            Some(json!({ "certificate_pem": ca.pem, "verification_certificate_pem": proof.cert_pem })),
        )
        .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_proof", "{body}");
    let (s, list) = p.api("GET", "/api/v1/ca-certificates", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
    p.stop().await;
}
