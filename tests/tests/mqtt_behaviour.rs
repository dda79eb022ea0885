//! MQTT behaviour the router provides must survive our session layer: QoS 2, retained
//! messages, wills, persistent sessions, shared subscriptions, keepalive 0.

use std::time::Duration;

use e2e::{eventually, Client, Platform};
use rumqttc::{LastWill, Packet, QoS};
use serde_json::json;

fn publishes(pkt: &Packet) -> Option<(String, bytes::Bytes)> {
    match pkt {
        Packet::Publish(p) => Some((p.topic.clone(), p.payload.clone())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_telemetry_completes_and_is_stored_once() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut c = Client::connect(p.device_options(&fleet.ca.issue("q2"), "q2"))
        .await
        .unwrap();
    c.client
        .publish(
            "devices/q2/telemetry",
            QoS::ExactlyOnce,
            false,
            r#"{"q":2}"#,
        )
        .await
        .unwrap();
    c.wait_for(|pkt| matches!(pkt, Packet::PubComp(_)).then_some(()))
        .await;
    let id = fleet_wire::DeviceId::parse("q2").unwrap();
    assert_eq!(p.app().store().telemetry_count(&id).await.unwrap(), 1);
    assert_eq!(p.device("q2").await["last_telemetry"], json!({ "q": 2 }));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_and_presence_reach_late_subscribers() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut d = Client::connect(p.device_options(&fleet.ca.issue("ret-1"), "ret-1"))
        .await
        .unwrap();
    d.client
        .publish(
            "devices/ret-1/state",
            QoS::AtLeastOnce,
            true,
            r#"{"firmware_version":"2.0.0"}"#,
        )
        .await
        .unwrap();
    d.wait_for(|pkt| matches!(pkt, Packet::PubAck(_)).then_some(()))
        .await;

    let mut svc = Client::connect(p.service_options("late", p.app().admin_token()))
        .await
        .unwrap();
    svc.client
        .subscribe("devices/ret-1/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    svc.client
        .subscribe("devices/ret-1/presence", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(svc.wait_for(publishes).await);
    }
    let state = seen
        .iter()
        .find(|(t, _)| t.ends_with("/state"))
        .expect("retained state");
    assert_eq!(&state.1[..], br#"{"firmware_version":"2.0.0"}"#);
    let presence = seen
        .iter()
        .find(|(t, _)| t.ends_with("/presence"))
        .expect("retained presence");
    let presence: serde_json::Value = serde_json::from_slice(&presence.1).unwrap();
    assert_eq!(presence["event"], "connected");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_a_device_vanishes_but_not_on_clean_disconnect() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut svc = Client::connect(p.service_options("will-watch", p.app().admin_token()))
        .await
        .unwrap();
    svc.client
        .subscribe("devices/+/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    svc.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
        .await;

    let will = |id: &str| {
        LastWill::new(
            format!("devices/{id}/state"),
            r#"{"status":"lost"}"#,
            QoS::AtLeastOnce,
            false,
        )
    };
    let mut o = p.device_options(&fleet.ca.issue("will-1"), "will-1");
    o.set_last_will(will("will-1"));
    let c = Client::connect(o).await.unwrap();
    c.kill().await;
    let (topic, payload) = svc.wait_for(publishes).await;
    assert_eq!(topic, "devices/will-1/state");
    assert_eq!(&payload[..], br#"{"status":"lost"}"#);
    // The will went through the durable path too.
    eventually("will stored as reported state", || async {
        (p.device("will-1").await["reported"]["status"] == "lost").then_some(())
    })
    .await;

    // A clean DISCONNECT discards the will: the next state message is this marker.
    let mut o = p.device_options(&fleet.ca.issue("will-2"), "will-2");
    o.set_last_will(will("will-2"));
    let c = Client::connect(o).await.unwrap();
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = Client::connect(p.device_options(&fleet.ca.issue("will-3"), "will-3"))
        .await
        .unwrap();
    m.client
        .publish(
            "devices/will-3/state",
            QoS::AtLeastOnce,
            false,
            r#"{"marker":1}"#,
        )
        .await
        .unwrap();
    let (topic, _) = svc.wait_for(publishes).await;
    assert_eq!(
        topic, "devices/will-3/state",
        "a will was published after a clean disconnect"
    );

    // A will on a topic the device may not publish is refused at CONNECT.
    let mut o = p.device_options(&fleet.ca.issue("will-4"), "will-4");
    o.set_last_will(LastWill::new(
        "devices/other/state",
        "{}",
        QoS::AtLeastOnce,
        false,
    ));
    assert!(Client::connect(o).await.is_err());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_commands_sent_while_offline() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("persist");
    let options = || {
        let mut o = p.device_options(&cert, "persist");
        o.set_clean_session(false);
        o
    };
    let mut c = Client::connect(options()).await.unwrap();
    c.client
        .subscribe("devices/persist/commands", QoS::AtLeastOnce)
        .await
        .unwrap();
    c.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
        .await;
    c.client.disconnect().await.unwrap();
    eventually("offline", || async {
        (p.device("persist").await["online"] == false).then_some(())
    })
    .await;

    let mut svc = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    svc.client
        .publish(
            "devices/persist/commands",
            QoS::AtLeastOnce,
            false,
            r#"{"id":"c9","name":"x"}"#,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Reconnecting without subscribing again: the session, and the command, were kept.
    let mut c = Client::connect(options()).await.unwrap();
    let (topic, payload) = c.wait_for(publishes).await;
    assert_eq!(topic, "devices/persist/commands");
    assert_eq!(&payload[..], br#"{"id":"c9","name":"x"}"#);

    // Unsubscribing in the resumed session reaches the router: nothing more arrives.
    c.client
        .unsubscribe("devices/persist/commands")
        .await
        .unwrap();
    c.wait_for(|pkt| matches!(pkt, Packet::UnsubAck(_)).then_some(()))
        .await;
    svc.client
        .publish(
            "devices/persist/commands",
            QoS::AtLeastOnce,
            false,
            r#"{"id":"c10","name":"x"}"#,
        )
        .await
        .unwrap();
    // Routed before the device's marker below is even sent.
    svc.wait_for(|pkt| matches!(pkt, Packet::PubAck(_)).then_some(()))
        .await;
    c.client
        .publish("devices/persist/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let next = c
        .wait_for(|pkt| match pkt {
            Packet::PubAck(_) => Some(None),
            Packet::Publish(p) => Some(Some(p.topic.clone())),
            _ => None,
        })
        .await;
    assert_eq!(next, None, "a command arrived after UNSUBSCRIBE");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_the_stream_between_services() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let mut w = Client::connect(p.service_options(name, p.app().admin_token()))
            .await
            .unwrap();
        w.client
            .subscribe("$share/ingest/devices/+/telemetry", QoS::AtLeastOnce)
            .await
            .unwrap();
        w.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
            .await;
        workers.push(w);
    }
    let mut d = Client::connect(p.device_options(&fleet.ca.issue("sh-1"), "sh-1"))
        .await
        .unwrap();
    const N: usize = 10;
    for n in 0..N {
        d.client
            .publish(
                "devices/sh-1/telemetry",
                QoS::AtLeastOnce,
                false,
                json!({ "n": n }).to_string(),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    d.wait_for(|pkt| {
        acked += matches!(pkt, Packet::PubAck(_)) as usize;
        (acked == N).then_some(())
    })
    .await;
    let mut counts = [0usize; 2];
    for (i, w) in workers.iter_mut().enumerate() {
        while let Ok(got) =
            tokio::time::timeout(Duration::from_millis(500), w.wait_for(publishes)).await
        {
            let _ = got;
            counts[i] += 1;
        }
    }
    assert_eq!(counts[0] + counts[1], N, "{counts:?}");
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "one worker got everything: {counts:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_is_accepted() {
    // rumqttd alone refuses keepalive 0; MQTT allows it (no keepalive timeout).
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut o = p.device_options(&fleet.ca.issue("ka0"), "ka0");
    o.set_keep_alive(Duration::ZERO);
    let mut c = Client::connect(o).await.expect("keepalive 0 accepted");
    c.client
        .publish(
            "devices/ka0/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"ka":0}"#,
        )
        .await
        .unwrap();
    c.wait_for(|pkt| matches!(pkt, Packet::PubAck(_)).then_some(()))
        .await;
    assert_eq!(p.device("ka0").await["last_telemetry"], json!({ "ka": 0 }));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_expiry_is_honoured() {
    use e2e::Client5;
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;

    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut svc = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    for (id, expiry_secs, kept) in [
        ("exp-long", 60u32, true),
        ("exp-zero", 0, false),
        ("exp-1s", 1, false),
    ] {
        let cert = fleet.ca.issue(id);
        let options = || {
            let mut o = p.device_options_v5(&cert, id);
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(expiry_secs));
            o
        };
        let mut c = Client5::connect(options()).await.unwrap();
        c.client
            .subscribe(format!("devices/{id}/commands"), Q5::AtLeastOnce)
            .await
            .unwrap();
        c.wait_for(|pkt| matches!(pkt, P5::SubAck(_)).then_some(()))
            .await;
        c.client.disconnect().await.unwrap();
        c.closed().await;
        // Past the 1 s expiry (and the immediate one), well within the 60 s one.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        svc.client
            .publish(
                format!("devices/{id}/commands"),
                QoS::AtLeastOnce,
                false,
                r#"{"id":"c","name":"n"}"#,
            )
            .await
            .unwrap();
        svc.wait_for(|pkt| matches!(pkt, Packet::PubAck(_)).then_some(()))
            .await;

        let mut c = Client5::connect(options()).await.unwrap();
        c.client
            .publish(
                format!("devices/{id}/telemetry"),
                Q5::AtLeastOnce,
                false,
                "{}",
            )
            .await
            .unwrap();
        let got_command = c
            .wait_for(|pkt| match pkt {
                P5::Publish(_) => Some(true),
                P5::PubAck(_) => Some(false),
                _ => None,
            })
            .await;
        assert_eq!(got_command, kept, "{id}: session expiry {expiry_secs}s");
    }
    p.stop().await;
}
