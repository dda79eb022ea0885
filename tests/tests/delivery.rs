//! Messages addressed to one device reach it without a router filter per device, and retained
//! messages come from the node's own store: what a device or service sees is what topics.md
//! promises, while the router's filter count stays flat as devices connect.

use std::time::Duration;

use e2e::raw::{frame, subscribe, Got, Raw};
use e2e::{eventually, Client, Client5, Platform};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};

async fn metrics(p: &Platform) -> Value {
    let (s, m) = p.api("GET", "/api/v1/broker/metrics", None).await;
    assert_eq!(s, 200, "{m}");
    m
}

async fn subscribed(c: &mut Client, filters: &[String]) {
    for f in filters {
        c.client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
        let codes = c
            .wait_for(|pkt| match pkt {
                Packet::SubAck(a) => Some(a.return_codes.clone()),
                _ => None,
            })
            .await;
        assert!(
            matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)]),
            "{f}: {codes:?}"
        );
    }
}

fn publishes(pkt: &Packet) -> Option<(String, bytes::Bytes)> {
    match pkt {
        Packet::Publish(p) => Some((p.topic.clone(), p.payload.clone())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_only_their_device_and_devices_add_no_router_filters() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let ops = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    let mut observer = Client::connect(p.service_options("observer", p.app().admin_token()))
        .await
        .unwrap();
    subscribed(&mut observer, &["devices/+/telemetry".to_owned()]).await;

    let mut devices = Vec::new();
    let mut filters_after_first = None;
    for i in 0..12 {
        let id = format!("dlv-{i}");
        let mut c = Client::connect(p.device_options(&fleet.ca.issue(&id), &id))
            .await
            .unwrap();
        subscribed(
            &mut c,
            &[
                format!("devices/{id}/commands"),
                format!("devices/{id}/assignment"),
                format!("cohorts/{}/updates", fleet.cohort_id),
                format!("cohorts/{}/commands", fleet.cohort_id),
            ],
        )
        .await;
        let m = metrics(&p).await;
        let filters = m["router_filters"].as_u64().unwrap();
        match filters_after_first {
            None => filters_after_first = Some(filters),
            Some(first) => assert_eq!(filters, first, "device {i} added router filters: {m}"),
        }
        devices.push((id, c));
    }
    // The observer's filter alone, whatever the number of devices: devices have no router
    // link, their subscriptions (own topics and cohort topics) are the node's.
    assert_eq!(filters_after_first, Some(1));
    assert!(metrics(&p).await["device_inboxes"].as_u64().unwrap() >= 12);

    // Each device gets its own command and nobody else's.
    for (id, _) in &devices {
        ops.client
            .publish(
                format!("devices/{id}/commands"),
                QoS::AtLeastOnce,
                false,
                json!({ "id": id, "name": "ping" }).to_string(),
            )
            .await
            .unwrap();
    }
    for (id, c) in &mut devices {
        let (topic, payload) = c.wait_for(publishes).await;
        assert_eq!(topic, format!("devices/{id}/commands"));
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["id"], json!(id), "{id} got another device's command");
    }
    // A cohort command reaches every device of the cohort, and nothing else came before it.
    ops.client
        .publish(
            format!("cohorts/{}/commands", fleet.cohort_id),
            QoS::AtLeastOnce,
            false,
            json!({ "id": "all", "name": "ping" }).to_string(),
        )
        .await
        .unwrap();
    for (_, c) in &mut devices {
        let (topic, _) = c.wait_for(publishes).await;
        assert_eq!(topic, format!("cohorts/{}/commands", fleet.cohort_id));
    }
    // A device hears its own command acks under `commands/#`, and telemetry still reaches
    // the observer.
    let (id, c) = &mut devices[0];
    subscribed(c, &[format!("devices/{id}/commands/#")]).await;
    c.client
        .publish(
            format!("devices/{id}/commands/ack"),
            QoS::AtLeastOnce,
            false,
            json!({ "id": "x", "status": "succeeded" }).to_string(),
        )
        .await
        .unwrap();
    let (topic, _) = c.wait_for(publishes).await;
    assert_eq!(topic, format!("devices/{id}/commands/ack"));
    c.client
        .publish(
            format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    let (topic, _) = observer.wait_for(publishes).await;
    assert_eq!(topic, format!("devices/{id}/telemetry"));
    assert_eq!(metrics(&p).await["router_filters"], json!(1));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_command_is_sent_again_to_a_resumed_session() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("resend");
    let options = |manual: bool| {
        let mut o = p.device_options(&cert, "resend");
        o.set_clean_session(false);
        o.set_manual_acks(manual);
        o
    };
    let mut c = Client::connect(options(true)).await.unwrap();
    subscribed(&mut c, &["devices/resend/commands".to_owned()]).await;
    let ops = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    for n in 1..=3 {
        ops.client
            .publish(
                "devices/resend/commands",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"id":"c{n}","name":"x"}}"#),
            )
            .await
            .unwrap();
    }
    // Received, never acknowledged, and the device loses power.
    for _ in 1..=3 {
        c.wait_for(publishes).await;
    }
    c.kill().await;
    eventually("offline", || async {
        (p.device("resend").await["online"] == false).then_some(())
    })
    .await;

    let mut c = Client::connect(options(false)).await.unwrap();
    let mut got = Vec::new();
    for _ in 1..=3 {
        let (dup, payload) = c
            .wait_for(|pkt| match pkt {
                Packet::Publish(p) => Some((p.dup, p.payload.clone())),
                _ => None,
            })
            .await;
        assert!(dup, "a resend carries DUP");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        got.push(v["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["c1", "c2", "c3"], "resent in the order first sent");
    // Acknowledged this time: a third session gets nothing again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.client.disconnect().await.unwrap();
    eventually("offline", || async {
        (p.device("resend").await["online"] == false).then_some(())
    })
    .await;
    let mut c = Client::connect(options(false)).await.unwrap();
    c.client
        .publish("devices/resend/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let next = c
        .wait_for(|pkt| match pkt {
            Packet::PubAck(_) => Some(None),
            Packet::Publish(p) => Some(Some(p.payload.clone())),
            _ => None,
        })
        .await;
    assert_eq!(next, None, "an acknowledged command came again");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_come_from_the_node_and_follow_the_filter() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut devices = Vec::new();
    for i in 0..6 {
        let id = format!("ret-{i}");
        let c = Client::connect(p.device_options(&fleet.ca.issue(&id), &id))
            .await
            .unwrap();
        c.client
            .publish(
                format!("devices/{id}/state"),
                QoS::AtLeastOnce,
                true,
                json!({ "firmware_version": format!("1.0.{i}") }).to_string(),
            )
            .await
            .unwrap();
        devices.push(c);
    }
    eventually("every state retained", || async {
        let m = metrics(&p).await;
        // A presence and a state per device.
        (m["retained_messages"].as_u64() == Some(12)).then_some(())
    })
    .await;

    // An exact filter gets its one message, with the retain flag.
    let mut svc = Client::connect(p.service_options("late", p.app().admin_token()))
        .await
        .unwrap();
    svc.client
        .subscribe("devices/ret-3/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (retain, topic) = svc
        .wait_for(|pkt| match pkt {
            Packet::Publish(p) => Some((p.retain, p.topic.clone())),
            _ => None,
        })
        .await;
    assert!(retain);
    assert_eq!(topic, "devices/ret-3/state");
    // A wildcard gets each device's, after its SUBACK.
    svc.client
        .subscribe("devices/+/presence", QoS::AtLeastOnce)
        .await
        .unwrap();
    svc.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
        .await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 6 {
        let (topic, _) = svc.wait_for(publishes).await;
        assert!(topic.ends_with("/presence"), "{topic}");
        seen.insert(topic);
    }
    // MQTT 5 retain handling: 2 sends none, 1 only for a new subscription.
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet as P5, RetainForwardRule};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let mut o = rumqttc::v5::MqttOptions::new(
        "retain-handling",
        "127.0.0.1",
        p.app().service_addr().port(),
    );
    o.set_credentials("svc", p.app().admin_token());
    let mut v5 = Client5::connect(o).await.unwrap();
    let filter = |rule| {
        let mut f = Filter::new("devices/ret-1/state", Q5::AtLeastOnce);
        f.retain_forward_rule = rule;
        f
    };
    // A marker on the device's telemetry shows whether a retained message came first.
    v5.client
        .subscribe("devices/ret-1/telemetry", Q5::AtMostOnce)
        .await
        .unwrap();
    v5.wait_for(|pkt| matches!(pkt, P5::SubAck(_)).then_some(()))
        .await;
    for (rule, expect) in [
        (RetainForwardRule::Never, false),
        (RetainForwardRule::OnNewSubscribe, false), // not new any more
        (RetainForwardRule::OnEverySubscribe, true),
    ] {
        v5.client
            .subscribe_many([filter(rule.clone())])
            .await
            .unwrap();
        v5.wait_for(|pkt| matches!(pkt, P5::SubAck(_)).then_some(()))
            .await;
        devices[1]
            .client
            .publish("devices/ret-1/telemetry", QoS::AtLeastOnce, false, "{}")
            .await
            .unwrap();
        let first = v5
            .wait_for(|pkt| match pkt {
                P5::Publish(p) => Some(p.retain),
                _ => None,
            })
            .await;
        assert_eq!(first, expect, "{rule:?}");
        if expect {
            v5.wait_for(|pkt| matches!(pkt, P5::Publish(_)).then_some(()))
                .await;
        }
    }
    p.stop().await;
}

/// A PUBLISH the broker sent: (QoS, DUP, packet id, topic, payload).
fn read_publish(first: u8, body: &[u8]) -> (u8, bool, u16, String, Vec<u8>) {
    let qos = (first >> 1) & 3;
    let len = u16::from_be_bytes([body[0], body[1]]) as usize;
    let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
    let pkid = u16::from_be_bytes([body[2 + len], body[3 + len]]);
    (
        qos,
        first & 0x08 != 0,
        pkid,
        topic,
        body[4 + len..].to_vec(),
    )
}

/// QoS 2 to a device, with the exchange cut at each of its steps: before the device's
/// PUBREC the message is sent again, with DUP and the same packet id; after it, only the
/// PUBREL is [MQTT-4.3.3-5, MQTT-4.4.0-1]. Nothing is delivered twice, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_to_a_device_completes_once_across_reconnects() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("q2dev");
    let mut dev = Raw::resume_device(&p, &cert, "q2dev").await;
    dev.send(&subscribe(0x82, "devices/q2dev/app/down/#", 2, false))
        .await;
    assert_eq!(dev.expect(9).await.1, [0, 1, 2], "granted QoS 2");
    let mut ops = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    let topic = "devices/q2dev/app/down/blob";
    for payload in [&b"\x00one\xff"[..], b"\x00two\xff"] {
        ops.client
            .publish(topic, QoS::ExactlyOnce, false, payload)
            .await
            .unwrap();
        ops.wait_for(|pkt| matches!(pkt, Packet::PubComp(_)).then_some(()))
            .await;
    }

    // The first: received, and the connection drops before the device answered.
    let (first, body) = dev.expect(3).await;
    let (qos, dup, one, t, payload) = read_publish(first, &body);
    assert_eq!(
        (qos, dup, t.as_str(), &payload[..]),
        (2, false, topic, &b"\x00one\xff"[..])
    );
    drop(dev);
    let mut dev = Raw::resume_device(&p, &cert, "q2dev").await;
    let (first, body) = dev.expect(3).await;
    let (qos, dup, again, _, payload) = read_publish(first, &body);
    assert_eq!(
        (qos, dup, again),
        (2, true, one),
        "sent again with DUP and its packet id"
    );
    assert_eq!(payload, b"\x00one\xff");
    // Received now (PUBREC), released (PUBREL), and the connection drops before PUBCOMP.
    dev.send(&frame(0x50, &one.to_be_bytes())).await;
    let rel = loop {
        match dev.next().await {
            Got::Packet(0x62, body) => break body,
            Got::Packet(first, _) if first >> 4 == 3 => continue, // the second message
            other => panic!("expected PUBREL, got {other:?}"),
        }
    };
    assert_eq!(rel, one.to_be_bytes());
    drop(dev);

    // Only the release comes again for the first; the second follows, and completes.
    let mut dev = Raw::resume_device(&p, &cert, "q2dev").await;
    let mut released = false;
    let mut second = Vec::new();
    while !(released && second.len() == 1) {
        match dev.next().await {
            Got::Packet(0x62, body) => {
                assert_eq!(body, one.to_be_bytes(), "PUBREL with the first one's id");
                dev.send(&frame(0x70, &one.to_be_bytes())).await;
                released = true;
            }
            Got::Packet(first, body) if first >> 4 == 3 => {
                let (qos, _, pkid, _, payload) = read_publish(first, &body);
                assert_eq!(qos, 2);
                assert_ne!(payload, b"\x00one\xff", "the first one was delivered again");
                second.push(payload);
                dev.send(&frame(0x50, &pkid.to_be_bytes())).await;
                assert_eq!(dev.expect(6).await.1, pkid.to_be_bytes());
                dev.send(&frame(0x70, &pkid.to_be_bytes())).await;
            }
            other => panic!("expected PUBREL or PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(second, [b"\x00two\xff".to_vec()]);
    // Completed: a fourth session gets nothing more (a resend would come before PINGRESP).
    dev.ping().await;
    drop(dev);
    let mut dev = Raw::resume_device(&p, &cert, "q2dev").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.ping().await;
    p.stop().await;
}
