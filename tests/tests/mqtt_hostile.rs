//! Hostile MQTT input, spoken as raw bytes over real sockets (the service listener on plain
//! TCP, devices over mutual TLS): malformed packets are refused the way the specification
//! says, per-client resources stay bounded, and the broker keeps serving everyone else.

use std::time::Duration;

use e2e::raw::{frame, publish, string, subscribe, Connect, Got, Raw};
use e2e::{eventually, Platform};
use serde_json::json;

fn admin(p: &Platform) -> String {
    p.app().admin_token().to_owned()
}

/// Another client can still connect and be served.
async fn still_healthy(p: &Platform) {
    let key = admin(p);
    let mut raw = Raw::service(p).await;
    raw.connect(&Connect::v311("healthy").service(&key).bytes())
        .await;
    raw.ping().await;
}

async fn service_v311(p: &Platform, id: &str) -> Raw {
    let key = admin(p);
    let mut raw = Raw::service(p).await;
    raw.connect(&Connect::v311(id).service(&key).bytes()).await;
    raw
}

async fn service_v5(p: &Platform, id: &str) -> Raw {
    let key = admin(p);
    let mut raw = Raw::service(p).await;
    raw.connect(&Connect::v5(id).service(&key).bytes()).await;
    raw
}

/// The CONNACK code a CONNECT gets, or `None` when the connection is closed without one.
async fn connack_code(p: &Platform, connect: &[u8]) -> Option<u8> {
    let mut raw = Raw::service(p).await;
    raw.send(connect).await;
    match raw.next().await {
        Got::Closed => None,
        Got::Packet(0x20, body) => {
            assert_eq!(raw.next().await, Got::Closed, "refused but left open");
            Some(body[1])
        }
        other => panic!("unexpected answer to CONNECT: {other:?}"),
    }
}

// ---- Finding 8: fixed-header flags, reserved bits and a second CONNECT ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_connects_are_refused() {
    let p = Platform::sqlite().await;
    let key = admin(&p);
    let wrong_flags = Connect {
        first: 0x12,
        ..Connect::v311("c1").service(&key)
    };
    assert_eq!(
        connack_code(&p, &wrong_flags.bytes()).await,
        None,
        "CONNECT flags"
    );
    let reserved = Connect {
        flags: 0x03,
        ..Connect::v311("c2").service(&key)
    };
    assert_eq!(
        connack_code(&p, &reserved.bytes()).await,
        None,
        "reserved bit"
    );
    let password_only = Connect {
        password: Some(key.as_bytes()),
        ..Connect::v311("c3")
    };
    assert_eq!(
        connack_code(&p, &password_only.bytes()).await,
        None,
        "password without user name"
    );
    let will_qos_without_will = Connect {
        flags: 0x02 | 0x08,
        ..Connect::v311("c4").service(&key)
    };
    assert_eq!(
        connack_code(&p, &will_qos_without_will.bytes()).await,
        None,
        "will QoS without will"
    );
    // MQTT 5 says why.
    let reserved5 = Connect {
        flags: 0x03,
        ..Connect::v5("c5").service(&key)
    };
    assert_eq!(
        connack_code(&p, &reserved5.bytes()).await,
        Some(0x81),
        "v5 reserved bit"
    );
    let wrong_flags5 = Connect {
        first: 0x11,
        ..Connect::v5("c6").service(&key)
    };
    assert_eq!(
        connack_code(&p, &wrong_flags5.bytes()).await,
        Some(0x81),
        "v5 CONNECT flags"
    );
    still_healthy(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_fixed_headers_close_a_v311_connection() {
    let p = Platform::sqlite().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "QoS 0 PUBLISH with DUP",
            publish(0x38, b"a/b", None, None, b"x"),
        ),
        (
            "PUBLISH with QoS 3",
            publish(0x36, b"a/b", Some(1), None, b"x"),
        ),
        (
            "SUBSCRIBE with flags 0",
            subscribe(0x80, "devices/+/telemetry", 1, false),
        ),
        (
            "SUBSCRIBE with reserved option bits",
            subscribe(0x82, "devices/+/telemetry", 0x41, false),
        ),
        (
            "SUBSCRIBE with QoS 3",
            subscribe(0x82, "devices/+/telemetry", 3, false),
        ),
        ("UNSUBSCRIBE with flags 0", frame(0xa0, &[0, 1, 0, 1, b'a'])),
        ("PUBREL with flags 0", frame(0x60, &[0, 1])),
        ("PINGREQ with flags", vec![0xc1, 0]),
        ("PUBACK with flags", frame(0x41, &[0, 1])),
        ("DISCONNECT with flags", vec![0xe2, 0]),
        ("packet type 0", vec![0x00, 0]),
        ("packet type 15", vec![0xf0, 0]),
        ("second CONNECT", Connect::v311("again").bytes()),
    ];
    for (what, bytes) in cases {
        let mut raw = service_v311(&p, "flags").await;
        raw.send(&bytes).await;
        // Were the bad packet accepted, this PINGREQ would be answered.
        raw.send(&[0xc0, 0]).await;
        raw.expect_closed(what).await;
    }
    still_healthy(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_fixed_headers_get_a_v5_disconnect() {
    let p = Platform::sqlite().await;
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "QoS 0 PUBLISH with DUP",
            publish(0x38, b"a/b", None, Some(&[]), b"x"),
            0x81,
        ),
        (
            "PUBLISH with QoS 3",
            publish(0x36, b"a/b", Some(1), Some(&[]), b"x"),
            0x81,
        ),
        (
            "SUBSCRIBE with flags 0",
            subscribe(0x80, "devices/+/telemetry", 1, true),
            0x81,
        ),
        (
            "SUBSCRIBE with reserved option bits",
            subscribe(0x82, "devices/+/telemetry", 0xc1, true),
            0x81,
        ),
        (
            "SUBSCRIBE with retain handling 3",
            subscribe(0x82, "devices/+/telemetry", 0x31, true),
            0x82,
        ),
        (
            "UNSUBSCRIBE with flags 0",
            frame(0xa0, &[0, 1, 0, 0, 1, b'a']),
            0x81,
        ),
        ("PUBREL with flags 0", frame(0x60, &[0, 1]), 0x81),
        ("PINGREQ with flags", vec![0xc4, 0], 0x81),
        ("second CONNECT", Connect::v5("again").bytes(), 0x82),
        ("packet type 0", vec![0x00, 0], 0x81),
    ];
    for (what, bytes, reason) in cases {
        let mut raw = service_v5(&p, "flags5").await;
        raw.send(&bytes).await;
        raw.send(&[0xc0, 0]).await;
        raw.expect_disconnect(reason, what).await;
    }
    still_healthy(&p).await;
    p.stop().await;
}

// ---- Finding 9: a resent QoS 2 PUBLISH is stored once ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_qos2_publish_is_stored_once() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("dup-q2");
    let mut raw = Raw::device(&p, &cert).await;
    raw.connect(&Connect::v311("dup-q2").bytes()).await;
    let topic = b"devices/dup-q2/telemetry";
    raw.send(&publish(0x34, topic, Some(7), None, br#"{"n":1}"#))
        .await;
    let (_, rec) = raw.expect(5).await;
    assert_eq!(rec, [0, 7]);
    // The PUBREC was lost, as far as the client knows: it resends with DUP.
    raw.send(&publish(0x3c, topic, Some(7), None, br#"{"n":1}"#))
        .await;
    let (_, rec) = raw.expect(5).await;
    assert_eq!(
        rec,
        [0, 7],
        "a resent QoS 2 publish is answered PUBREC again"
    );
    raw.send(&frame(0x62, &[0, 7])).await;
    let (_, comp) = raw.expect(7).await;
    assert_eq!(comp, [0, 7]);
    // Released: the same id now starts a new message.
    raw.send(&publish(0x34, topic, Some(7), None, br#"{"n":2}"#))
        .await;
    raw.expect(5).await;
    raw.send(&frame(0x62, &[0, 7])).await;
    raw.expect(7).await;
    raw.ping().await;
    let id = fleet_wire::DeviceId::parse("dup-q2").unwrap();
    assert_eq!(p.app().store().telemetry_count(&id).await.unwrap(), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_qos2_publish_after_reconnecting_is_stored_once() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("dup-q2p");
    let persistent = Connect {
        flags: 0,
        ..Connect::v311("dup-q2p")
    };
    let topic = b"devices/dup-q2p/telemetry";
    let mut raw = Raw::device(&p, &cert).await;
    raw.connect(&persistent.bytes()).await;
    raw.send(&publish(0x34, topic, Some(5), None, br#"{"n":1}"#))
        .await;
    raw.expect(5).await;
    // The connection drops before the client saw the PUBREC: it resends on its next one.
    drop(raw);
    let mut raw = Raw::resume_device(&p, &cert, "dup-q2p").await;
    raw.send(&publish(0x3c, topic, Some(5), None, br#"{"n":1}"#))
        .await;
    assert_eq!(raw.expect(5).await.1, [0, 5]);
    raw.send(&frame(0x62, &[0, 5])).await;
    assert_eq!(raw.expect(7).await.1, [0, 5]);
    raw.ping().await;
    let id = fleet_wire::DeviceId::parse("dup-q2p").unwrap();
    assert_eq!(p.app().store().telemetry_count(&id).await.unwrap(), 1);
    p.stop().await;
}

// ---- Finding 10: the maximum packet size counts the whole packet ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_counts_the_fixed_header() {
    let p = Platform::sqlite().await;
    let max = 262_144;
    // topic "a/b" (5) + pkid (2) + property length (1) + payload; fixed header 1 + 3 bytes.
    let fits = publish(0x32, b"a/b", Some(1), Some(&[]), &vec![b'x'; max - 4 - 8]);
    assert_eq!(fits.len(), max);
    let mut raw = service_v5(&p, "size").await;
    raw.send(&fits).await;
    raw.expect(4).await;
    let over = publish(
        0x32,
        b"a/b",
        Some(2),
        Some(&[]),
        &vec![b'x'; max - 4 - 8 + 1],
    );
    assert_eq!(over.len(), max + 1);
    raw.send(&over).await;
    raw.expect_disconnect(0x95, "one byte over the maximum")
        .await;
    still_healthy(&p).await;
    p.stop().await;
}

// ---- Finding 11: MQTT 5 property rules ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_connect_properties_are_refused() {
    let p = Platform::sqlite().await;
    let key = admin(&p);
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "Session Expiry twice",
            vec![0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2],
            0x82,
        ),
        ("Receive Maximum 0", vec![0x21, 0, 0], 0x82),
        ("Receive Maximum twice", vec![0x21, 0, 5, 0x21, 0, 5], 0x82),
        ("Maximum Packet Size 0", vec![0x27, 0, 0, 0, 0], 0x82),
        ("Request Problem Information 2", vec![0x17, 2], 0x82),
        ("Request Response Information 2", vec![0x19, 2], 0x82),
        (
            "Topic Alias Maximum twice",
            vec![0x22, 0, 1, 0x22, 0, 1],
            0x82,
        ),
        ("a PUBLISH-only property", vec![0x01, 1], 0x82),
        ("unknown property", vec![0x7f, 0], 0x81),
        ("truncated property", vec![0x11, 0, 0], 0x81),
        (
            "Authentication Method",
            vec![0x15, 0, 5, b'S', b'C', b'R', b'A', b'M'],
            0x8c,
        ),
    ];
    for (what, properties, code) in cases {
        let connect = Connect {
            props: properties,
            ..Connect::v5("props").service(&key)
        };
        assert_eq!(
            connack_code(&p, &connect.bytes()).await,
            Some(code),
            "{what}"
        );
    }
    still_healthy(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_packet_properties_end_a_v5_session() {
    let p = Platform::sqlite().await;
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "two Payload Format Indicators",
            publish(0x32, b"a/b", Some(1), Some(&[0x01, 0, 0x01, 0]), b"x"),
            0x82,
        ),
        (
            "Payload Format Indicator 2",
            publish(0x32, b"a/b", Some(1), Some(&[0x01, 2]), b"x"),
            0x82,
        ),
        (
            "two Topic Aliases",
            publish(0x32, b"a/b", Some(1), Some(&[0x23, 0, 1, 0x23, 0, 1]), b"x"),
            0x82,
        ),
        (
            "Subscription Identifier from a client",
            publish(0x32, b"a/b", Some(1), Some(&[0x0b, 1]), b"x"),
            0x82,
        ),
        (
            "two Subscription Identifiers",
            frame(0x82, &[0, 1, 4, 0x0b, 1, 0x0b, 2, 0, 1, b'#', 0]),
            0x82,
        ),
        (
            "Subscription Identifier 0",
            frame(0x82, &[0, 1, 2, 0x0b, 0, 0, 1, b'#', 0]),
            0x82,
        ),
    ];
    for (what, bytes, reason) in cases {
        let mut raw = service_v5(&p, "pprops").await;
        raw.send(&bytes).await;
        raw.send(&[0xc0, 0]).await;
        raw.expect_disconnect(reason, what).await;
    }
    still_healthy(&p).await;
    p.stop().await;
}

// ---- Finding 12: PUBREL for an unknown id, and short DISCONNECTs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_for_an_unknown_id_is_answered_and_the_session_goes_on() {
    let p = Platform::sqlite().await;
    let mut raw = service_v5(&p, "pubrel5").await;
    raw.send(&frame(0x62, &[0, 42])).await;
    let (_, comp) = raw.expect(7).await;
    assert_eq!(
        comp[..3],
        [0, 42, 0x92],
        "PUBCOMP Packet Identifier not found"
    );
    raw.ping().await;

    let mut raw = service_v311(&p, "pubrel3").await;
    raw.send(&frame(0x62, &[0, 42])).await;
    let (_, comp) = raw.expect(7).await;
    assert_eq!(comp, [0, 42]);
    raw.ping().await;

    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("pubrel-dev");
    let mut dev = Raw::device(&p, &cert).await;
    dev.connect(&Connect::v311("pubrel-dev").bytes()).await;
    dev.send(&frame(0x62, &[0, 9])).await;
    dev.expect(7).await;
    dev.ping().await;
    assert_eq!(p.device("pubrel-dev").await["online"], json!(true));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_v5_disconnects_are_normal() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut watcher = service_v311(&p, "will-watch").await;
    watcher
        .send(&subscribe(0x82, "devices/+/state", 0, false))
        .await;
    watcher.expect(9).await;
    for (id, disconnect) in [("short-1", vec![0xe0, 1, 0]), ("short-0", vec![0xe0, 0])] {
        let cert = fleet.ca.issue(id);
        let mut dev = Raw::device(&p, &cert).await;
        let will_topic = format!("devices/{id}/state");
        let connect = Connect {
            will: Some((will_topic.as_bytes(), br#"{"firmware_version":"will"}"#)),
            ..Connect::v5(id)
        };
        dev.connect(&connect.bytes()).await;
        dev.send(&disconnect).await;
        assert_eq!(dev.next().await, Got::Closed);
        let d = e2e::eventually("disconnect recorded", || async {
            let d = p.device(id).await;
            (d["online"] == json!(false)).then_some(d)
        })
        .await;
        assert_eq!(d["disconnect_reason"], "client", "{id}: {d}");
        // No will: the next state message the watcher sees is the device's own marker.
        let mut dev = Raw::device(&p, &cert).await;
        dev.connect(&Connect::v5(id).bytes()).await;
        let marker = br#"{"firmware_version":"marker"}"#;
        dev.send(&publish(
            0x32,
            will_topic.as_bytes(),
            Some(1),
            Some(&[]),
            marker,
        ))
        .await;
        dev.expect(4).await;
        let (_, state) = watcher.expect(3).await;
        assert!(state.ends_with(marker), "{id}: the will was published");
    }
    p.stop().await;
}

// ---- Keep alive: bounded, so a vanished peer is found ----

/// A client asking for no keep alive (0), or a longer one than `max_keep_alive_secs`, is held
/// to the bound: told so in CONNACK on MQTT 5 (Server Keep Alive), disconnected after 1.5
/// times it of silence on either version, and its presence ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_bounded_for_clients_that_ask_for_none_or_more() {
    let mut tuning = fleet_service::config::Tuning::default();
    tuning.broker.max_keep_alive_secs = 2;
    let p = Platform::start_tuned(e2e::Db::Sqlite, tuning)
        .await
        .unwrap();
    let fleet = p.jitp_fleet(json!({})).await;
    let keep_alive = |mut connect: Vec<u8>, secs: u16| {
        // CONNECT: fixed header (2 bytes here), protocol name (6), level, flags, keep alive.
        connect[10..12].copy_from_slice(&secs.to_be_bytes());
        connect
    };

    for (requested, told) in [(0, Some(2)), (60, Some(2)), (1, None)] {
        let id = format!("ka5-{requested}");
        let mut raw = Raw::device(&p, &fleet.ca.issue(&id)).await;
        raw.send(&keep_alive(Connect::v5(&id).bytes(), requested))
            .await;
        let (_, connack) = raw.expect(2).await;
        assert_eq!(connack[1], 0);
        assert_eq!(
            connack_u16(&connack, 0x13),
            told,
            "Server Keep Alive for a requested {requested}"
        );
    }

    // MQTT 3.1.1 has no way to tell the client; it is held to the bound all the same.
    let mut raw = Raw::device(&p, &fleet.ca.issue("ka311")).await;
    raw.connect(&keep_alive(Connect::v311("ka311").bytes(), 0))
        .await;
    eventually("online", || async {
        (p.device("ka311").await["online"] == true).then_some(())
    })
    .await;
    // Silent: closed after 1.5 x 2 s, and the device is offline for a keepalive timeout.
    assert_eq!(raw.next().await, Got::Closed);
    eventually("offline", || async {
        (p.device("ka311").await["online"] == false).then_some(())
    })
    .await;
    p.stop().await;
}

// ---- Finding 5: Receive Maximum ----

/// A two-byte property of a CONNACK body (0x21 Receive Maximum, 0x13 Server Keep Alive, ...).
fn connack_u16(connack: &[u8], want: u8) -> Option<u16> {
    let mut i = 2;
    let (len, n) = read_varint(&connack[i..]);
    i += n;
    let end = i + len;
    while i < end {
        let id = connack[i];
        i += 1;
        if id == want {
            return Some(u16::from_be_bytes([connack[i], connack[i + 1]]));
        }
        match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a | 0x01 | 0x17 | 0x19 => i += 1,
            0x13 | 0x21 | 0x22 | 0x23 => i += 2,
            0x11 | 0x27 | 0x02 | 0x18 => i += 4,
            0x12 | 0x15 | 0x1a | 0x1c | 0x1f | 0x03 | 0x08 | 0x09 | 0x16 => {
                i += 2 + u16::from_be_bytes([connack[i], connack[i + 1]]) as usize
            }
            0x26 => {
                for _ in 0..2 {
                    i += 2 + u16::from_be_bytes([connack[i], connack[i + 1]]) as usize;
                }
            }
            other => panic!("unexpected CONNACK property {other:#x}"),
        }
    }
    None
}

fn receive_maximum(connack: &[u8]) -> Option<u16> {
    connack_u16(connack, 0x21)
}

fn read_varint(b: &[u8]) -> (usize, usize) {
    let mut v = 0;
    for (i, byte) in b.iter().enumerate().take(4) {
        v |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    panic!("bad varint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_is_advertised_and_enforced() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("recvmax");
    let topic = b"devices/recvmax/telemetry";
    let mut raw = Raw::device(&p, &cert).await;
    raw.send(&Connect::v5("recvmax").bytes()).await;
    let (_, connack) = raw.expect(2).await;
    assert_eq!(connack[1], 0);
    let max = receive_maximum(&connack).expect("CONNACK advertises Receive Maximum");
    assert_eq!(max, 64, "the default");
    // QoS 2 publishes never released count against it, and one more is a protocol error.
    let mut burst = Vec::new();
    for id in 1..=max + 1 {
        burst.extend(publish(0x34, topic, Some(id), Some(&[]), br#"{"n":1}"#));
    }
    raw.send(&burst).await;
    loop {
        match raw.next().await {
            Got::Packet(0x50, body) => {
                assert_eq!(body.get(2).copied().unwrap_or(0), 0, "PUBREC {body:02x?}");
                continue;
            }
            Got::Packet(0xe0, body) => {
                assert_eq!(body[0], 0x93, "Receive Maximum exceeded");
                break;
            }
            other => panic!("expected PUBRECs then DISCONNECT 0x93, got {other:?}"),
        }
    }
    assert_eq!(raw.next().await, Got::Closed);

    // A client that releases what it sent may go on for ever.
    let mut raw = Raw::device(&p, &cert).await;
    raw.connect(&Connect::v5("recvmax").bytes()).await;
    for id in 1..=3 * max {
        raw.send(&publish(0x34, topic, Some(id), Some(&[]), br#"{"n":1}"#))
            .await;
        raw.expect(5).await;
        raw.send(&frame(0x62, &id.to_be_bytes())).await;
        raw.expect(7).await;
    }
    still_healthy(&p).await;
    p.stop().await;
}

// ---- Finding 4: property floods ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_property_floods_are_refused() {
    let p = Platform::sqlite().await;
    let before = p
        .app()
        .control()
        .metrics()
        .rejections
        .get("over_limit")
        .copied()
        .unwrap_or(0);
    let mut flood = Vec::new();
    for _ in 0..20_000 {
        flood.extend_from_slice(&[0x26, 0, 1, b'k', 0, 1, b'v']);
    }
    let mut raw = service_v5(&p, "flood").await;
    raw.send(&publish(0x32, b"a/b", Some(1), Some(&flood), b"x"))
        .await;
    raw.expect_disconnect(0x83, "20,000 user properties").await;
    // Within the bounds is fine.
    let mut raw = service_v5(&p, "few-props").await;
    raw.send(&publish(
        0x32,
        b"a/b",
        Some(1),
        Some(&flood[..7 * 32]),
        b"x",
    ))
    .await;
    raw.expect(4).await;
    let after = p
        .app()
        .control()
        .metrics()
        .rejections
        .get("over_limit")
        .copied()
        .unwrap_or(0);
    assert_eq!(after, before + 1);
    still_healthy(&p).await;
    p.stop().await;
}

// ---- Our own: malformed packets by category ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_refused() {
    let p = Platform::sqlite().await;
    let v5_cases: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "remaining length of five bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            0x81,
        ),
        (
            "topic not UTF-8",
            publish(0x32, b"a/\xff", Some(1), Some(&[]), b"x"),
            0x81,
        ),
        (
            "topic with NUL",
            publish(0x32, b"a/\0", Some(1), Some(&[]), b"x"),
            0x81,
        ),
        (
            "wildcard in a PUBLISH topic",
            publish(0x32, b"a/+", Some(1), Some(&[]), b"x"),
            0x90,
        ),
        (
            "empty topic, no alias",
            publish(0x32, b"", Some(1), Some(&[]), b"x"),
            0x82,
        ),
        (
            "packet id 0 on QoS 1",
            publish(0x32, b"a/b", Some(0), Some(&[]), b"x"),
            0x82,
        ),
        ("SUBSCRIBE without filters", frame(0x82, &[0, 1, 0]), 0x82),
        ("UNSUBSCRIBE without filters", frame(0xa2, &[0, 1, 0]), 0x82),
        (
            "SUBSCRIBE filter not UTF-8",
            frame(0x82, &[0, 1, 0, 0, 1, 0xff, 0]),
            0x81,
        ),
        ("PUBLISH body cut short", frame(0x32, &[0, 9, b'a']), 0x81),
        ("AUTH", frame(0xf0, &[0x18, 0]), 0x82),
        ("CONNACK from a client", frame(0x20, &[0, 0, 0]), 0x82),
        (
            "DISCONNECT with a trailing byte past its properties",
            frame(0xe0, &[0, 0, 0]),
            0x81,
        ),
    ];
    for (what, bytes, reason) in v5_cases {
        let mut raw = service_v5(&p, "body5").await;
        raw.send(&bytes).await;
        raw.send(&[0xc0, 0]).await;
        raw.expect_disconnect(reason, what).await;
    }
    let v311_cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "topic not UTF-8",
            publish(0x32, b"a/\xff", Some(1), None, b"x"),
        ),
        ("topic with NUL", publish(0x30, b"a/\0", None, None, b"x")),
        (
            "wildcard in a PUBLISH topic",
            publish(0x30, b"a/#", None, None, b"x"),
        ),
        ("empty topic", publish(0x30, b"", None, None, b"x")),
        (
            "packet id 0 on QoS 2",
            publish(0x34, b"a/b", Some(0), None, b"x"),
        ),
        ("SUBSCRIBE without filters", frame(0x82, &[0, 1])),
        ("PUBACK of 3 bytes", frame(0x40, &[0, 1, 0])),
        ("PINGREQ with a body", frame(0xc0, &[0])),
        ("DISCONNECT with a body", frame(0xe0, &[0])),
    ];
    for (what, bytes) in v311_cases {
        let mut raw = service_v311(&p, "body3").await;
        raw.send(&bytes).await;
        raw.send(&[0xc0, 0]).await;
        raw.expect_closed(what).await;
    }
    still_healthy(&p).await;
    p.stop().await;
}

// ---- Our own: what one client can make the broker hold ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_truncated_connects_are_dropped() {
    let mut tuning = fleet_service::config::Tuning::default();
    tuning.broker.connect_timeout_ms = 300;
    let p = Platform::start_tuned(e2e::Db::Sqlite, tuning)
        .await
        .unwrap();
    let key = admin(&p);
    // Slowloris: a CONNECT that never completes, one byte at a time.
    let connect = Connect::v311("slow").service(&key).bytes();
    let mut slow = Raw::service(&p).await;
    let started = tokio::time::Instant::now();
    for b in &connect[..connect.len() - 1] {
        slow.send(std::slice::from_ref(b)).await;
        if started.elapsed() > Duration::from_millis(100) {
            break;
        }
    }
    assert_eq!(slow.next().await, Got::Closed);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A frame cut short after CONNECT, then the client goes quiet: keepalive would take 45 s,
    // so half-close instead; the session ends and others are served.
    let mut cut = service_v311(&p, "cut").await;
    cut.send(&[0x32, 50, 0, 3, b'a']).await;
    cut.shutdown().await;
    assert_eq!(cut.next().await, Got::Closed);
    still_healthy(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_client_ids_are_refused() {
    let p = Platform::sqlite().await;
    let key = admin(&p);
    let long = "x".repeat(60_000);
    assert_eq!(
        connack_code(&p, &Connect::v311(&long).service(&key).bytes()).await,
        Some(0x02),
        "3.1.1: identifier rejected"
    );
    assert_eq!(
        connack_code(&p, &Connect::v5(&long).service(&key).bytes()).await,
        Some(0x85),
        "5: client identifier not valid"
    );
    still_healthy(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_are_bounded() {
    let mut tuning = fleet_service::config::Tuning::default();
    tuning.broker.max_subscriptions = 20;
    let p = Platform::start_tuned(e2e::Db::Sqlite, tuning)
        .await
        .unwrap();
    let mut raw = service_v5(&p, "many-subs").await;
    // One SUBSCRIBE of 25 filters: 20 granted, the rest refused, the session goes on.
    let mut body = vec![0, 1, 0];
    for i in 0..25 {
        string(format!("devices/d{i}/telemetry").as_bytes(), &mut body);
        body.push(1);
    }
    raw.send(&frame(0x82, &body)).await;
    let (_, ack) = raw.expect(9).await;
    let codes = &ack[3..];
    assert_eq!(codes.len(), 25);
    assert!(codes[..20].iter().all(|c| *c == 1), "{codes:02x?}");
    assert!(codes[20..].iter().all(|c| *c == 0x97), "{codes:02x?}");
    // Subscribing again to a held filter is no new one; unsubscribing frees a place.
    raw.send(&subscribe(0x82, "devices/d0/telemetry", 1, true))
        .await;
    assert_eq!(raw.expect(9).await.1[3..], [1]);
    let mut unsub = vec![0, 2, 0];
    string(b"devices/d0/telemetry", &mut unsub);
    raw.send(&frame(0xa2, &unsub)).await;
    raw.expect(11).await;
    raw.send(&subscribe(0x82, "devices/d99/telemetry", 1, true))
        .await;
    assert_eq!(raw.expect(9).await.1[3..], [1]);
    raw.ping().await;
    still_healthy(&p).await;
    p.stop().await;
}
