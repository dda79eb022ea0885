//! Topic rights, presence, and the durable path from device to database.

use std::time::Duration;

use e2e::{eventually, Client, Client5, Platform};
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode as Sub5};
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use serde_json::{json, Value};

e2e::on_both_databases!(
    telemetry_burst_is_all_stored_with_a_slow_subscriber_and_survives_restart,
    stale_disconnect_after_takeover_never_marks_a_live_device_offline,
    racing_reconnects_leave_presence_matching_the_live_session,
);

/// Many connections of one device at once (a flapping modem, a retry storm): whichever wins,
/// the database must say online with exactly the epoch of the one session that is live.
async fn racing_reconnects_leave_presence_matching_the_live_session(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("racer");
    Client::connect(p.device_options(&cert, "racer"))
        .await
        .unwrap();
    for _round in 0..3 {
        let attempts: Vec<_> = (0..6)
            .map(|_| {
                let o = p.device_options(&cert, "racer");
                tokio::spawn(async move { Client::connect(o).await.ok() })
            })
            .collect();
        let mut clients = Vec::new();
        for a in attempts {
            clients.extend(a.await.unwrap());
        }
        let id = fleet_wire::DeviceId::parse("racer").unwrap();
        let live = eventually("exactly one live session", || async {
            (p.app().control().live_sessions() == 1)
                .then(|| p.app().control().session_epoch(&id))
                .flatten()
        })
        .await;
        let d = eventually("presence settled on the live session", || async {
            let d = p.device("racer").await;
            (d["session_epoch"].as_u64() == Some(live)).then_some(d)
        })
        .await;
        assert_eq!(d["online"], true, "live epoch {live}: {d}");
        assert_eq!(d["state"], "online");
        drop(clients);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_device_cannot_reach_other_devices() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut a = Client::connect(p.device_options(&fleet.ca.issue("dev-a"), "dev-a"))
        .await
        .unwrap();

    let filters = [
        ("devices/dev-a/commands", true),
        (&*format!("cohorts/{}/updates", fleet.cohort_id), true),
        ("devices/dev-b/commands", false),
        ("devices/+/commands", false),
        ("devices/#", false),
        ("#", false),
        ("devices/dev-a/telemetry", false),
        ("cohorts/+/updates", false),
    ];
    for (filter, allowed) in filters {
        a.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let codes = a
            .wait_for(|pkt| match pkt {
                Packet::SubAck(ack) => Some(ack.return_codes.clone()),
                _ => None,
            })
            .await;
        let ok = matches!(codes[0], SubscribeReasonCode::Success(_));
        assert_eq!(ok, allowed, "{filter}: {codes:?}");
    }

    // MQTT 3.1.1 has no negative PUBACK: a forbidden publish closes the connection.
    a.client
        .publish("devices/dev-b/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    a.closed().await;
    let mut a = Client::connect(p.device_options(&fleet.ca.issue("dev-a"), "dev-a"))
        .await
        .unwrap();
    a.client
        .publish("devices/dev-a/presence", QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    a.closed().await;
    assert!(p.app().control().metrics().rejections["forbidden_topic"] >= 7);
    p.stop().await;
}

/// Publishes at QoS 1 and returns the reason code of the PUBACK.
async fn puback_reason(c: &mut Client5, topic: &str, payload: &str) -> PubAckReason {
    c.client
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload.to_owned(),
        )
        .await
        .unwrap();
    c.wait_for(|p| match p {
        P5::PubAck(ack) => Some(ack.reason),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_device_gets_reason_codes_and_stays_connected() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut c = Client5::connect(p.device_options_v5(&fleet.ca.issue("dev-5"), "dev-5"))
        .await
        .unwrap();

    let reason = puback_reason(&mut c, "devices/dev-6/telemetry", "{}").await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    let reason = puback_reason(&mut c, "devices/dev-5/telemetry", "not json").await;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);

    c.client
        .subscribe(
            "devices/+/commands",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let codes = c
        .wait_for(|p| match p {
            P5::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(codes, vec![Sub5::NotAuthorized]);

    // Still connected, and a good publish is accepted and stored.
    let reason = puback_reason(&mut c, "devices/dev-5/telemetry", r#"{"ok":1}"#).await;
    assert_eq!(reason, PubAckReason::Success);
    assert_eq!(
        p.device("dev-5").await["last_telemetry"],
        json!({ "ok": 1 })
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_service_commands_reach_only_their_device() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut a = Client::connect(p.device_options(&fleet.ca.issue("dev-a"), "dev-a"))
        .await
        .unwrap();
    let mut b = Client::connect(p.device_options(&fleet.ca.issue("dev-b"), "dev-b"))
        .await
        .unwrap();
    for (c, id) in [(&mut a, "dev-a"), (&mut b, "dev-b")] {
        c.client
            .subscribe(format!("devices/{id}/commands"), QoS::AtLeastOnce)
            .await
            .unwrap();
        c.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
            .await;
    }

    // No anonymous access, and a wrong key is refused.
    let mut anon = rumqttc::MqttOptions::new("anon", "127.0.0.1", p.app().service_addr().port());
    anon.set_keep_alive(Duration::from_secs(30));
    assert!(Client::connect(anon).await.is_err());
    assert!(Client::connect(p.service_options("svc", "fk_wrong"))
        .await
        .is_err());

    let svc = Client::connect(p.service_options("ops-tool", p.app().admin_token()))
        .await
        .expect("service with the admin key");
    let command = json!({ "id": "c-1", "name": "reboot" }).to_string();
    svc.client
        .publish(
            "devices/dev-b/commands",
            QoS::AtLeastOnce,
            false,
            command.clone(),
        )
        .await
        .unwrap();
    let got = b
        .wait_for(|pkt| match pkt {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(got.topic, "devices/dev-b/commands");
    assert_eq!(got.payload, command.as_bytes());
    // dev-a got nothing: a marker on its own topic arrives first.
    svc.client
        .publish("devices/dev-a/commands", QoS::AtLeastOnce, false, "marker")
        .await
        .unwrap();
    let first = a
        .wait_for(|pkt| match pkt {
            Packet::Publish(p) => Some(p.payload.clone()),
            _ => None,
        })
        .await;
    assert_eq!(first, "marker");
    p.stop().await;
}

async fn stale_disconnect_after_takeover_never_marks_a_live_device_offline(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("flappy");

    let watcher = Client::connect(p.service_options("presence-watch", p.app().admin_token()))
        .await
        .unwrap();
    let mut watcher = watcher;
    watcher
        .client
        .subscribe("devices/flappy/presence", QoS::AtLeastOnce)
        .await
        .unwrap();
    watcher
        .wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
        .await;

    let mut old = Client::connect(p.device_options(&cert, "flappy"))
        .await
        .unwrap();
    let epoch_old = p.device("flappy").await["session_epoch"].as_u64().unwrap();
    // A second connection with the same identity takes the session over.
    let _new = Client::connect(p.device_options(&cert, "flappy"))
        .await
        .unwrap();
    old.closed().await;

    let d = p.device("flappy").await;
    assert_eq!(d["online"], true, "{d}");
    assert_eq!(d["state"], "online");
    let epoch_new = d["session_epoch"].as_u64().unwrap();
    assert!(epoch_new > epoch_old);

    // Presence as a backend sees it: connect(old), disconnect(old, takeover), connect(new),
    // each carrying its session's epoch.
    let mut events: Vec<Value> = Vec::new();
    while events.len() < 3 {
        let payload = watcher
            .wait_for(|pkt| match pkt {
                Packet::Publish(p) => Some(p.payload.clone()),
                _ => None,
            })
            .await;
        events.push(serde_json::from_slice(&payload).unwrap());
    }
    let takeover = events
        .iter()
        .find(|e| e["event"] == "disconnected")
        .expect("a disconnect event");
    assert_eq!(takeover["reason"], "takeover");
    assert_eq!(takeover["epoch"].as_u64().unwrap(), epoch_old);
    assert!(events
        .iter()
        .any(|e| e["event"] == "connected" && e["epoch"].as_u64() == Some(epoch_new)));

    // The store applies presence by epoch: replaying the old session's disconnect changes
    // nothing, whatever order events arrive in.
    let stale = json!({
        "device_id": "flappy", "event": "disconnected", "epoch": epoch_old,
        "ts_ms": 1, "connected_at_ms": 1, "reason": "connection_lost"
    });
    replay_presence(&p, stale).await;
    let d = p.device("flappy").await;
    assert_eq!(d["online"], true, "stale disconnect applied: {d}");
    assert_eq!(d["session_epoch"].as_u64().unwrap(), epoch_new);
    p.stop().await;
}

/// Pushes a presence event through a bus into the real intake and store of a second instance
/// of the intake (the platform's own bus is private to the broker).
async fn replay_presence(p: &Platform, presence: Value) {
    let (bus, source) = broker::bus::embedded(4);
    let intake = tokio::spawn(fleet_service::intake::run(
        source,
        p.app().store().clone(),
        Default::default(),
    ));
    use broker::bus::EventBus;
    bus.publish(broker::bus::BusMessage {
        topic: "devices/flappy/presence".into(),
        payload: bytes::Bytes::from(presence.to_string()),
        epoch: presence["epoch"].as_u64().unwrap(),
        seq: 0,
        received_at_ms: 1,
        ..Default::default()
    })
    .await
    .expect("intake accepted the event");
    drop(bus);
    let _ = intake.await;
}

async fn telemetry_burst_is_all_stored_with_a_slow_subscriber_and_survives_restart(
    mut p: Platform,
) {
    const DEVICES: usize = 10;
    const PER_DEVICE: usize = 60;
    let fleet = p.jitp_fleet(json!({})).await;

    // A backend subscriber that never reads: its socket fills and the router holds its data.
    let (slow, _slow_loop) =
        rumqttc::AsyncClient::new(p.service_options("slow-backend", p.app().admin_token()), 10);
    let mut slow_loop = _slow_loop;
    slow.subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    for _ in 0..3 {
        let _ = tokio::time::timeout(Duration::from_secs(2), slow_loop.poll()).await;
    }

    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let id = format!("burst-{i}");
        let options = p.device_options(&fleet.ca.issue(&id), &id);
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(options).await.unwrap();
            for n in 0..PER_DEVICE {
                c.client
                    .publish(
                        format!("devices/{id}/telemetry"),
                        QoS::AtLeastOnce,
                        false,
                        json!({ "n": n, "pad": "x".repeat(200) }).to_string(),
                    )
                    .await
                    .unwrap();
            }
            let mut acked = 0;
            c.wait_for(|pkt| {
                if matches!(pkt, Packet::PubAck(_)) {
                    acked += 1;
                }
                (acked == PER_DEVICE).then_some(())
            })
            .await;
            c.client.disconnect().await.unwrap();
            acked
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    assert_eq!(acked, DEVICES * PER_DEVICE);

    let stored = count_stored(&p, DEVICES).await;
    assert_eq!(
        stored,
        DEVICES * PER_DEVICE,
        "acknowledged telemetry missing"
    );

    p.restart().await;
    let stored = count_stored(&p, DEVICES).await;
    assert_eq!(
        stored,
        DEVICES * PER_DEVICE,
        "acknowledged telemetry lost over a restart"
    );
    let d = p.device("burst-0").await;
    assert_eq!(d["online"], false);
    assert_eq!(d["last_telemetry"]["n"], PER_DEVICE as u64 - 1);
    drop(slow);
    p.stop().await;
}

async fn count_stored(p: &Platform, devices: usize) -> usize {
    let mut total = 0;
    for i in 0..devices {
        let id = fleet_wire::DeviceId::parse(&format!("burst-{i}")).unwrap();
        total += p.app().store().telemetry_count(&id).await.unwrap() as usize;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_marks_devices_offline_and_restart_keeps_epochs_growing() {
    let mut p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("keeper");
    let c = Client::connect(p.device_options(&cert, "keeper"))
        .await
        .unwrap();
    let epoch1 = p.device("keeper").await["session_epoch"].as_u64().unwrap();
    p.restart().await;
    drop(c);
    let d = p.device("keeper").await;
    assert_eq!(d["online"], false);
    assert_eq!(d["disconnect_reason"], "server_shutdown");
    let _c = Client::connect(p.device_options(&cert, "keeper"))
        .await
        .unwrap();
    let d = eventually("online again", || async {
        let d = p.device("keeper").await;
        (d["online"] == true).then_some(d)
    })
    .await;
    assert!(d["session_epoch"].as_u64().unwrap() > epoch1, "{d}");
    p.stop().await;
}
