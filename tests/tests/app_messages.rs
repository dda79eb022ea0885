//! Application messages (`devices/{id}/app/...`): binary payloads at QoS 0, 1 and 2 between a
//! device and backend services over mutual TLS, on MQTT 3.1.1 and 5; each device only in its
//! own subtree; services as their key's role and scope allow. The platform routes them and
//! keeps nothing: no event on the bus, no row in the store.

use e2e::{Client, Client5, Platform};
use rumqttc::v5::mqttbytes::v5::{
    Packet as P5, PubAckReason, PubRecReason, PublishProperties, SubscribeReasonCode as Sub5,
};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use serde_json::json;

e2e::on_both_databases!(
    mqtt311_device_and_service_exchange_binary_messages_at_every_qos,
    mqtt5_device_and_service_exchange_binary_messages_at_every_qos,
    viewers_only_read_and_scoped_keys_see_only_their_product,
);

/// CBOR-like bytes that are not UTF-8: a map header, NUL and 0xFF bytes, and a tag.
fn binary(tag: u8) -> Vec<u8> {
    let bytes = vec![0xa2, 0x61, 0x74, tag, 0x00, 0xff, 0xfe, 0x80, 0x00, 0xff];
    assert!(std::str::from_utf8(&bytes).is_err());
    bytes
}

/// The QoS a device receives a message at: what was published (its subscriptions here are
/// granted QoS 2).
fn delivered(qos: u8) -> u8 {
    qos
}

/// What a service receives at: its filter's granted QoS 1, even for a QoS 0 publish (rumqttd
/// forwards at the subscription's QoS; see ARCHITECTURE.md, "Router limits").
const TO_SERVICES: u8 = 1;

fn qos311(n: u8) -> QoS {
    [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][n as usize]
}

fn qos5(n: u8) -> QoS5 {
    [QoS5::AtMostOnce, QoS5::AtLeastOnce, QoS5::ExactlyOnce][n as usize]
}

async fn subscribe311(c: &mut Client, filter: &str, qos: QoS) -> SubscribeReasonCode {
    c.client.subscribe(filter, qos).await.unwrap();
    c.wait_for(|p| match p {
        Packet::SubAck(ack) => Some(ack.return_codes[0]),
        _ => None,
    })
    .await
}

async fn subscribe5(c: &mut Client5, filter: &str, qos: QoS5) -> Sub5 {
    c.client.subscribe(filter, qos).await.unwrap();
    c.wait_for(|p| match p {
        P5::SubAck(ack) => Some(ack.return_codes[0]),
        _ => None,
    })
    .await
}

/// Publishes and waits for the end of the exchange its QoS asks for (PUBACK, PUBCOMP).
async fn publish311(c: &mut Client, topic: &str, qos: u8, payload: Vec<u8>) {
    c.client
        .publish(topic, qos311(qos), false, payload)
        .await
        .unwrap();
    match qos {
        1 => {
            c.wait_for(|p| matches!(p, Packet::PubAck(_)).then_some(()))
                .await
        }
        2 => {
            c.wait_for(|p| matches!(p, Packet::PubComp(_)).then_some(()))
                .await
        }
        _ => {}
    }
}

/// The next publish on `topic`: (payload, QoS).
async fn next311(c: &mut Client, topic: &str) -> (Vec<u8>, u8) {
    c.wait_for(|p| match p {
        Packet::Publish(m) if m.topic == topic => Some((m.payload.to_vec(), m.qos as u8)),
        _ => None,
    })
    .await
}

/// Publishes with a content type and returns the reason of its acknowledgement (PUBACK for
/// QoS 1, PUBREC for QoS 2 as a PUBACK reason of the same code, none for QoS 0).
async fn publish5(c: &mut Client5, topic: &str, qos: u8, payload: Vec<u8>) -> Option<u8> {
    let props = PublishProperties {
        content_type: Some("application/cbor".into()),
        ..Default::default()
    };
    c.client
        .publish_with_properties(topic, qos5(qos), false, payload, props)
        .await
        .unwrap();
    match qos {
        1 => Some(
            c.wait_for(|p| match p {
                P5::PubAck(ack) => Some(ack.reason as u8),
                _ => None,
            })
            .await,
        ),
        2 => {
            let rec = c
                .wait_for(|p| match p {
                    P5::PubRec(rec) => Some(rec.reason),
                    _ => None,
                })
                .await;
            if rec == PubRecReason::Success {
                c.wait_for(|p| matches!(p, P5::PubComp(_)).then_some(()))
                    .await;
            }
            Some(rec as u8)
        }
        _ => None,
    }
}

/// The next publish on `topic`: (payload, QoS, content type).
async fn next5(c: &mut Client5, topic: &str) -> (Vec<u8>, u8, Option<String>) {
    c.wait_for(|p| match p {
        P5::Publish(m) if m.topic == topic.as_bytes() => Some((
            m.payload.to_vec(),
            m.qos as u8,
            m.properties.as_ref().and_then(|p| p.content_type.clone()),
        )),
        _ => None,
    })
    .await
}

/// What shows that the platform kept nothing of the device's application messages: the bus
/// accepted no event since `bus_events`, and the store has no telemetry for it.
async fn nothing_kept(p: &Platform, device: &str, bus_events: u64) {
    assert_eq!(
        p.app().control().metrics().bus_events,
        bus_events,
        "an application message went to the event bus"
    );
    let id = fleet_wire::DeviceId::parse(device).unwrap();
    assert_eq!(p.app().store().telemetry_count(&id).await.unwrap(), 0);
    assert_eq!(p.device(device).await["last_telemetry"], json!(null));
}

async fn mqtt311_device_and_service_exchange_binary_messages_at_every_qos(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let operator = p.key_as(&p.admin, "operator", json!({})).await;
    let mut svc = Client::connect(p.service_options("app-backend", &operator))
        .await
        .unwrap();
    // Service filters are granted at most QoS 1 (what a service receives is narrowed per
    // message, and a QoS 2 delivery cannot be dropped halfway); device filters QoS 2.
    assert_eq!(
        subscribe311(&mut svc, "devices/+/app/up/#", QoS::ExactlyOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    // A device's subscription is served from its inbox on the node: the router holds no
    // filter more for it.
    let router_filters = p.app().control().metrics().router_filters;
    let mut dev = Client::connect(p.device_options(&fleet.ca.issue("app-311"), "app-311"))
        .await
        .unwrap();
    assert_eq!(
        subscribe311(&mut dev, "devices/app-311/app/down/#", QoS::ExactlyOnce).await,
        SubscribeReasonCode::Success(QoS::ExactlyOnce)
    );
    assert_eq!(p.app().control().metrics().router_filters, router_filters);
    let bus_events = p.app().control().metrics().bus_events;

    let (up, down) = (
        "devices/app-311/app/up/cbor",
        "devices/app-311/app/down/cbor",
    );
    for qos in 0..=2u8 {
        publish311(&mut dev, up, qos, binary(qos)).await;
        assert_eq!(
            next311(&mut svc, up).await,
            (binary(qos), TO_SERVICES),
            "device -> service at QoS {qos}"
        );
        publish311(&mut svc, down, qos, binary(0x10 + qos)).await;
        assert_eq!(
            next311(&mut dev, down).await,
            (binary(0x10 + qos), delivered(qos)),
            "service -> device at QoS {qos}"
        );
    }
    nothing_kept(&p, "app-311", bus_events).await;
    p.stop().await;
}

async fn mqtt5_device_and_service_exchange_binary_messages_at_every_qos(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let operator = p.key_as(&p.admin, "operator", json!({})).await;
    let mut svc = Client5::connect(p.service_options_v5("app-backend-5", &operator))
        .await
        .unwrap();
    assert_eq!(
        subscribe5(&mut svc, "devices/+/app/up/#", QoS5::ExactlyOnce).await,
        Sub5::Success(QoS5::AtLeastOnce)
    );
    let mut dev = Client5::connect(p.device_options_v5(&fleet.ca.issue("app-5"), "app-5"))
        .await
        .unwrap();
    assert_eq!(
        subscribe5(&mut dev, "devices/app-5/app/down/#", QoS5::ExactlyOnce).await,
        Sub5::Success(QoS5::ExactlyOnce)
    );
    let bus_events = p.app().control().metrics().bus_events;
    let cbor = Some("application/cbor".to_owned());

    let (up, down) = ("devices/app-5/app/up/cbor", "devices/app-5/app/down/cbor");
    for qos in 0..=2u8 {
        let ack = publish5(&mut dev, up, qos, binary(qos)).await;
        assert!(ack.is_none_or(|a| a == 0), "QoS {qos}: {ack:?}");
        assert_eq!(
            next5(&mut svc, up).await,
            (binary(qos), TO_SERVICES, cbor.clone()),
            "device -> service at QoS {qos}"
        );
        let ack = publish5(&mut svc, down, qos, binary(0x10 + qos)).await;
        assert!(ack.is_none_or(|a| a == 0), "QoS {qos}: {ack:?}");
        assert_eq!(
            next5(&mut dev, down).await,
            (binary(0x10 + qos), delivered(qos), cbor.clone()),
            "service -> device at QoS {qos}"
        );
    }
    nothing_kept(&p, "app-5", bus_events).await;
    p.stop().await;
}

/// A viewer key reads every device's application messages and may write none; a key scoped to
/// one product neither reads nor writes those of a device of another product.
async fn viewers_only_read_and_scoped_keys_see_only_their_product(p: Platform) {
    let mine = p.jitp_fleet(json!({})).await;
    let theirs = p.jitp_fleet(json!({})).await;
    let viewer = p.key_as(&p.admin, "viewer", json!({})).await;
    let scoped = p
        .key_as(
            &p.admin,
            "operator",
            json!({ "product_id": mine.product_id }),
        )
        .await;
    let mut viewer = Client5::connect(p.service_options_v5("app-viewer", &viewer))
        .await
        .unwrap();
    let mut scoped = Client5::connect(p.service_options_v5("app-scoped", &scoped))
        .await
        .unwrap();
    for svc in [&mut viewer, &mut scoped] {
        assert_eq!(
            subscribe5(svc, "devices/+/app/#", QoS5::AtLeastOnce).await,
            Sub5::Success(QoS5::AtLeastOnce)
        );
    }
    let mut d1 = Client::connect(p.device_options(&mine.ca.issue("app-p1"), "app-p1"))
        .await
        .unwrap();
    let mut d2 = Client::connect(p.device_options(&theirs.ca.issue("app-p2"), "app-p2"))
        .await
        .unwrap();
    for (d, id) in [(&mut d1, "app-p1"), (&mut d2, "app-p2")] {
        let filter = format!("devices/{id}/app/down/#");
        assert_eq!(
            subscribe311(d, &filter, QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
    }

    // Reading: the viewer sees both products; the scoped key only its own, so the first
    // message it gets is the second one published.
    publish311(&mut d2, "devices/app-p2/app/up", 1, binary(2)).await;
    publish311(&mut d1, "devices/app-p1/app/up", 1, binary(1)).await;
    assert_eq!(
        next5(&mut viewer, "devices/app-p2/app/up").await.0,
        binary(2)
    );
    assert_eq!(
        next5(&mut viewer, "devices/app-p1/app/up").await.0,
        binary(1)
    );
    let first = scoped
        .wait_for(|p| match p {
            P5::Publish(m) => Some((m.topic.clone(), m.payload.to_vec())),
            _ => None,
        })
        .await;
    assert_eq!(first, ("devices/app-p1/app/up".into(), binary(1)));

    // Writing: the viewer never; the scoped key only to a device of its product, and whether
    // the other device exists stays unsaid (the same refusal as for one that does not).
    let refused = PubAckReason::NotAuthorized as u8;
    let ack = publish5(&mut viewer, "devices/app-p1/app/down", 1, binary(3)).await;
    assert_eq!(ack, Some(refused), "a viewer wrote");
    let ack = publish5(&mut viewer, "devices/app-p1/app/down", 2, binary(3)).await;
    assert_eq!(
        ack,
        Some(PubRecReason::NotAuthorized as u8),
        "a viewer wrote"
    );
    for target in ["app-p2", "no-such-device"] {
        let topic = format!("devices/{target}/app/down");
        let ack = publish5(&mut scoped, &topic, 1, binary(4)).await;
        assert_eq!(ack, Some(refused), "{topic}");
    }
    let ack = publish5(&mut scoped, "devices/app-p1/app/down", 1, binary(5)).await;
    assert_eq!(ack, Some(0));
    assert_eq!(
        next311(&mut d1, "devices/app-p1/app/down").await.0,
        binary(5)
    );

    // Nothing of the refused ones arrived: the first message app-p2 gets is an admin's marker.
    let mut admin = Client::connect(p.service_options("app-admin", &p.admin))
        .await
        .unwrap();
    publish311(
        &mut admin,
        "devices/app-p2/app/down/marker",
        1,
        b"marker".to_vec(),
    )
    .await;
    assert_eq!(
        first311(&mut d2).await,
        ("devices/app-p2/app/down/marker".into(), b"marker".to_vec())
    );
    p.stop().await;
}

/// The first publish `c` receives: (topic, payload).
async fn first311(c: &mut Client) -> (String, Vec<u8>) {
    c.wait_for(|p| match p {
        Packet::Publish(m) => Some((m.topic.clone(), m.payload.to_vec())),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_device_is_refused_another_devices_app_subtree() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert_a = fleet.ca.issue("app-a");
    let mut a = Client::connect(p.device_options(&cert_a, "app-a"))
        .await
        .unwrap();
    let mut b = Client::connect(p.device_options(&fleet.ca.issue("app-b"), "app-b"))
        .await
        .unwrap();
    let filters = [
        ("devices/app-a/app/#", true),
        ("devices/app-a/app/+/cbor", true),
        ("devices/app-b/app/#", false),
        ("devices/app-b/app/down", false),
        ("devices/+/app/#", false),
        ("devices/+/app/down", false),
        ("devices/app-a/+/down", false),
        ("devices/#", false),
        ("devices/app-a/app/+/+/+/+/+/+/+/+/#", false),
    ];
    for (filter, allowed) in filters {
        let code = subscribe311(&mut a, filter, QoS::AtLeastOnce).await;
        let ok = matches!(code, SubscribeReasonCode::Success(_));
        assert_eq!(ok, allowed, "{filter}: {code:?}");
    }
    assert!(matches!(
        subscribe311(&mut b, "devices/app-b/app/#", QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(_)
    ));

    // A publish into another device's subtree ends an MQTT 3.1.1 connection (it has no
    // negative PUBACK), at any QoS; so does a retained one into its own.
    a.client
        .publish("devices/app-b/app/down", QoS::AtMostOnce, false, binary(1))
        .await
        .unwrap();
    a.closed().await;
    let mut a = Client::connect(p.device_options(&cert_a, "app-a"))
        .await
        .unwrap();
    a.client
        .publish("devices/app-a/app/up", QoS::AtLeastOnce, true, binary(2))
        .await
        .unwrap();
    a.closed().await;

    // app-b got none of it: the first message it gets is a service's marker.
    let mut svc = Client::connect(p.service_options("app-admin", &p.admin))
        .await
        .unwrap();
    publish311(&mut svc, "devices/app-b/app/marker", 1, b"marker".to_vec()).await;
    assert_eq!(
        first311(&mut b).await,
        ("devices/app-b/app/marker".into(), b"marker".to_vec())
    );
    assert!(p.app().control().metrics().rejections["forbidden_topic"] >= 6);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_device_is_refused_another_devices_app_subtree_and_stays_connected() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut a = Client5::connect(p.device_options_v5(&fleet.ca.issue("app-a5"), "app-a5"))
        .await
        .unwrap();
    let mut b = Client::connect(p.device_options(&fleet.ca.issue("app-b5"), "app-b5"))
        .await
        .unwrap();
    assert!(matches!(
        subscribe311(&mut b, "devices/app-b5/app/#", QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(_)
    ));
    for filter in [
        "devices/+/app/#",
        "devices/app-b5/app/#",
        "devices/app-a5/#",
    ] {
        assert_eq!(
            subscribe5(&mut a, filter, QoS5::AtLeastOnce).await,
            Sub5::NotAuthorized,
            "{filter}"
        );
    }
    assert_eq!(
        subscribe5(&mut a, "devices/app-a5/app/#", QoS5::AtLeastOnce).await,
        Sub5::Success(QoS5::AtLeastOnce)
    );

    let refused = PubAckReason::NotAuthorized as u8;
    for qos in 0..=2u8 {
        let ack = publish5(&mut a, "devices/app-b5/app/down", qos, binary(qos)).await;
        assert!(ack.is_none_or(|a| a == refused), "QoS {qos}: {ack:?}");
    }
    // Retained: refused, even in its own subtree (the platform keeps no application message).
    a.client
        .publish("devices/app-a5/app/up", QoS5::AtLeastOnce, true, binary(3))
        .await
        .unwrap();
    let reason = a
        .wait_for(|p| match p {
            P5::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    // Beyond the bounds of an application topic: Topic Name invalid.
    let deep = format!("devices/app-a5/app/{}", ["l"; 9].join("/"));
    let long = format!("devices/app-a5/app/{}", "x".repeat(65));
    for topic in [deep, long, "devices/app-a5/app//x".into()] {
        let ack = publish5(&mut a, &topic, 1, binary(4)).await;
        assert_eq!(ack, Some(PubAckReason::TopicNameInvalid as u8), "{topic}");
    }
    // Still connected; its own subtree works (and it hears itself, being subscribed).
    let ack = publish5(&mut a, "devices/app-a5/app/up", 1, binary(5)).await;
    assert_eq!(ack, Some(0));
    assert_eq!(next5(&mut a, "devices/app-a5/app/up").await.0, binary(5));

    let mut svc = Client::connect(p.service_options("app-admin", &p.admin))
        .await
        .unwrap();
    publish311(&mut svc, "devices/app-b5/app/marker", 1, b"marker".to_vec()).await;
    assert_eq!(
        first311(&mut b).await,
        ("devices/app-b5/app/marker".into(), b"marker".to_vec())
    );
    p.stop().await;
}
