//! Commands sent over REST reach real devices (rumqttc over mutual TLS), and what the devices
//! answer on `devices/{id}/commands/ack` is what `GET .../commands/{command_id}` shows; a
//! device that never answers shows as timed out. Bulk deletion and CA deletion cut live
//! devices off. Each scenario runs on SQLite and on PostgreSQL; the last one runs on a
//! cluster (two broker nodes, two replicas), where the command, the ack and the deletions each
//! cross processes.

use e2e::cluster::Cluster;
use e2e::{eventually, on_both_databases, Client, Platform};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};

on_both_databases!(
    a_device_receives_a_rest_command_and_its_ack_shows,
    a_silent_device_times_out,
    an_offline_device_with_a_persistent_session_gets_its_command,
    a_cohort_command_reaches_every_device_and_counts_their_acks,
    bulk_and_ca_deletion_cut_live_devices_off,
);

async fn subscribed(c: &mut Client, filter: &str) {
    c.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let codes = c
        .wait_for(|pkt| match pkt {
            Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await;
    assert!(
        matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)]),
        "{filter}: {codes:?}"
    );
}

/// The next command the device receives: its topic and payload.
async fn command(c: &mut Client) -> (String, Value) {
    c.wait_for(|pkt| match pkt {
        Packet::Publish(p) => Some((
            p.topic.clone(),
            serde_json::from_slice(&p.payload).expect("a command is JSON"),
        )),
        _ => None,
    })
    .await
}

/// Publishes an ack at QoS 1 and waits for its PUBACK: the ack is then in the database.
async fn ack(c: &mut Client, device: &str, body: Value) {
    c.client
        .publish(
            format!("devices/{device}/commands/ack"),
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
    c.wait_for(|pkt| matches!(pkt, Packet::PubAck(_)).then_some(()))
        .await;
}

async fn a_device_receives_a_rest_command_and_its_ack_shows(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let mut device = Client::connect(p.device_options(&fleet.ca.issue("rc-1"), "rc-1"))
        .await
        .unwrap();
    subscribed(&mut device, "devices/rc-1/commands").await;

    let (s, sent) = p
        .api(
            "POST",
            "/api/v1/devices/rc-1/commands",
            Some(json!({ "name": "reboot", "params": { "delay_s": 5 } })),
        )
        .await;
    assert_eq!(s, 201, "{sent}");
    assert_eq!(sent["device_online"], true, "{sent}");
    let id = sent["id"].as_str().unwrap().to_owned();

    // The device gets exactly the wire form of topics.md.
    let (topic, payload) = command(&mut device).await;
    assert_eq!(topic, "devices/rc-1/commands");
    assert_eq!(
        payload,
        json!({ "id": id, "name": "reboot", "params": { "delay_s": 5 } })
    );
    let read = format!("/api/v1/devices/rc-1/commands/{id}");
    let (_, before) = p.api("GET", &read, None).await;
    assert_eq!(
        (&before["status"], &before["ack"]),
        (&json!("sent"), &Value::Null)
    );

    // Its ack is durable once acknowledged, so the next read shows it.
    ack(
        &mut device,
        "rc-1",
        json!({ "id": id, "status": "succeeded", "message": "rebooted" }),
    )
    .await;
    let (s, after) = p.api("GET", &read, None).await;
    assert_eq!(s, 200);
    assert_eq!(after["status"], "acknowledged", "{after}");
    assert_eq!(
        (&after["ack"]["status"], &after["ack"]["message"]),
        (&json!("succeeded"), &json!("rebooted")),
        "{after}"
    );
    // The ack counted as the device being seen, as any other event does.
    assert!(p.device("rc-1").await["last_seen"].is_string());
}

async fn a_silent_device_times_out(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let mut device = Client::connect(p.device_options(&fleet.ca.issue("rc-quiet"), "rc-quiet"))
        .await
        .unwrap();
    subscribed(&mut device, "devices/rc-quiet/commands").await;
    let (s, sent) = p
        .api(
            "POST",
            "/api/v1/devices/rc-quiet/commands",
            Some(json!({ "id": "q-1", "name": "ping", "timeout_s": 1 })),
        )
        .await;
    assert_eq!(s, 201, "{sent}");
    let (_, payload) = command(&mut device).await;
    assert_eq!(payload["id"], "q-1");

    // Received, never answered.
    let read = "/api/v1/devices/rc-quiet/commands/q-1";
    let (_, now) = p.api("GET", read, None).await;
    assert_eq!(now["status"], "sent", "{now}");
    let timed_out = eventually("the command times out", || async {
        let (_, c) = p.api("GET", read, None).await;
        (c["status"] == "timed_out").then_some(c)
    })
    .await;
    assert_eq!(timed_out["ack"], Value::Null);
    assert_eq!(timed_out["timeout_s"], 1);
}

async fn an_offline_device_with_a_persistent_session_gets_its_command(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("rc-away");
    let options = || {
        let mut o = p.device_options(&cert, "rc-away");
        o.set_clean_session(false);
        o
    };
    let mut device = Client::connect(options()).await.unwrap();
    subscribed(&mut device, "devices/rc-away/commands").await;
    device.client.disconnect().await.unwrap();
    device.closed().await;
    eventually("the device is offline", || async {
        (p.device("rc-away").await["online"] == false).then_some(())
    })
    .await;

    // Sent while it is away: it waits in the device's persistent session.
    let (s, sent) = p
        .api(
            "POST",
            "/api/v1/devices/rc-away/commands",
            Some(json!({ "id": "away-1", "name": "sync" })),
        )
        .await;
    assert_eq!(s, 201, "{sent}");
    assert_eq!(sent["device_online"], false);

    let mut device = Client::connect(options()).await.unwrap();
    let (topic, payload) = command(&mut device).await;
    assert_eq!(
        (topic.as_str(), &payload["id"]),
        ("devices/rc-away/commands", &json!("away-1"))
    );
    ack(
        &mut device,
        "rc-away",
        json!({ "id": "away-1", "status": "accepted" }),
    )
    .await;
    let (_, got) = p
        .api("GET", "/api/v1/devices/rc-away/commands/away-1", None)
        .await;
    assert_eq!(
        (&got["status"], &got["ack"]["status"]),
        (&json!("acknowledged"), &json!("accepted")),
        "{got}"
    );
}

async fn a_cohort_command_reaches_every_device_and_counts_their_acks(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let topic = format!("cohorts/{}/commands", fleet.cohort_id);
    let mut devices = Vec::new();
    for id in ["rc-c1", "rc-c2"] {
        let mut c = Client::connect(p.device_options(&fleet.ca.issue(id), id))
            .await
            .unwrap();
        subscribed(&mut c, &topic).await;
        devices.push((id, c));
    }
    let (s, sent) = p
        .api(
            "POST",
            &format!("/api/v1/cohorts/{}/commands", fleet.cohort_id),
            Some(json!({ "id": "wave-1", "name": "report", "params": { "what": "disk" } })),
        )
        .await;
    assert_eq!(s, 201, "{sent}");
    assert_eq!((&sent["devices"], &sent["pending"]), (&json!(2), &json!(2)));

    for ((id, c), status) in devices.iter_mut().zip(["succeeded", "failed"]) {
        let (got, payload) = command(c).await;
        assert_eq!(got, topic);
        assert_eq!(payload["id"], "wave-1");
        ack(c, id, json!({ "id": "wave-1", "status": status })).await;
    }
    let (_, counts) = p
        .api(
            "GET",
            &format!("/api/v1/cohorts/{}/commands/wave-1", fleet.cohort_id),
            None,
        )
        .await;
    assert_eq!(
        (&counts["status"], &counts["pending"], &counts["acks"]),
        (
            &json!("acknowledged"),
            &json!(0),
            &json!({ "succeeded": 1, "failed": 1 })
        ),
        "{counts}"
    );
    let (_, one) = p
        .api("GET", "/api/v1/devices/rc-c2/commands/wave-1", None)
        .await;
    assert_eq!(
        (&one["cohort_id"], &one["ack"]["status"]),
        (&json!(fleet.cohort_id), &json!("failed")),
        "{one}"
    );
}

async fn bulk_and_ca_deletion_cut_live_devices_off(p: Platform) {
    let fleet = p.jitp_fleet(json!({ "batch": "sim" })).await;
    let mut live = Vec::new();
    for i in 0..3 {
        let id = format!("rc-sim-{i}");
        let cert = fleet.ca.issue(&id);
        let c = Client::connect(p.device_options(&cert, &id)).await.unwrap();
        live.push((id, cert, c));
    }
    let bulk = format!(
        "/api/v1/devices?cohort_id={}&tag=batch:sim",
        fleet.cohort_id
    );

    let (s, dry) = p.api("DELETE", &format!("{bulk}&dry_run=true"), None).await;
    assert_eq!(s, 200, "{dry}");
    assert_eq!((&dry["matched"], &dry["deleted"]), (&json!(3), &json!(0)));
    for (id, ..) in &live {
        assert_eq!(
            p.device(id).await["online"],
            true,
            "the dry run changed nothing"
        );
    }

    let (s, done) = p.api("DELETE", &bulk, None).await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(
        (
            &done["deleted"],
            &done["remaining"],
            &done["sessions_ended"]
        ),
        (&json!(3), &json!(0), &json!(3)),
        "{done}"
    );
    // Their sessions end at once, and their certificates no longer connect (a CA with
    // just-in-time provisioning cannot bring them back).
    for (id, cert, mut c) in live {
        c.closed().await;
        assert!(
            Client::connect(p.device_options(&cert, &id)).await.is_err(),
            "{id} connected again with its certificate"
        );
    }

    // With no device left, the CA goes, and from then on its certificates fail the handshake.
    let ca = format!("/api/v1/ca-certificates/{}", fleet.ca_id);
    let (s, body) = p.api("DELETE", &ca, None).await;
    assert_eq!(s, 204, "{body}");
    assert!(
        Client::connect(p.device_options(&fleet.ca.issue("rc-new"), "rc-new"))
            .await
            .is_err(),
        "a deleted CA is not trusted"
    );
    let (s, _) = p
        .api(
            "DELETE",
            &format!("/api/v1/cohorts/{}", fleet.cohort_id),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = p
        .api(
            "DELETE",
            &format!("/api/v1/products/{}", fleet.product_id),
            None,
        )
        .await;
    assert_eq!(s, 204);
}

/// A command sent through one replica reaches a device on a broker node, its ack (through the
/// events stream and whichever replica's intake) shows through the other replica, and a bulk
/// deletion and a CA deletion made through a replica cut the device off on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_commands_acks_and_deletions_cross_processes() {
    e2e::init_logs();
    let Some(cluster) = Cluster::start(2, 2, "").await else {
        return;
    };
    let (rest0, rest1) = (cluster.rest(0), cluster.rest(1));
    let fleet = rest0.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("cl-cmd");
    // The CA reaches the node through the change stream.
    let mut device = eventually("node 1 trusts the CA", || async {
        Client::connect(cluster.device_options(1, &cert, "cl-cmd"))
            .await
            .ok()
    })
    .await;
    subscribed(&mut device, "devices/cl-cmd/commands").await;

    let (s, sent) = rest0
        .api(
            "POST",
            "/api/v1/devices/cl-cmd/commands",
            Some(json!({ "id": "cl-1", "name": "reboot" })),
        )
        .await;
    assert_eq!(s, 201, "{sent}");
    let (topic, payload) = command(&mut device).await;
    assert_eq!(
        (topic.as_str(), &payload["id"]),
        ("devices/cl-cmd/commands", &json!("cl-1"))
    );
    ack(
        &mut device,
        "cl-cmd",
        json!({ "id": "cl-1", "status": "succeeded", "message": "done" }),
    )
    .await;
    let got = eventually("the ack shows on the other replica", || async {
        let (_, c) = rest1
            .api("GET", "/api/v1/devices/cl-cmd/commands/cl-1", None)
            .await;
        (c["status"] == "acknowledged").then_some(c)
    })
    .await;
    assert_eq!(got["ack"]["message"], "done", "{got}");

    // Deleted through the other replica: the node holding the session ends it, and no node
    // admits the certificate again.
    let (s, done) = rest1
        .api("DELETE", "/api/v1/devices?id_prefix=cl-cmd", None)
        .await;
    assert_eq!((s, &done["deleted"]), (200, &json!(1)), "{done}");
    device.closed().await;
    for node in 0..2 {
        eventually("the certificate is refused on every node", || async {
            Client::connect(cluster.device_options(node, &cert, "cl-cmd"))
                .await
                .is_err()
                .then_some(())
        })
        .await;
    }

    // The CA, deleted through replica 0, is trusted by no node.
    let (s, body) = rest0
        .api(
            "DELETE",
            &format!("/api/v1/ca-certificates/{}", fleet.ca_id),
            None,
        )
        .await;
    assert_eq!(s, 204, "{body}");
    let fresh = fleet.ca.issue("cl-new");
    for node in 0..2 {
        assert!(
            Client::connect(cluster.device_options(node, &fresh, "cl-new"))
                .await
                .is_err(),
            "node {node} admitted a certificate of a deleted CA"
        );
    }
}
