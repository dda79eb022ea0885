//! MQTT conformance through the broker's own session code, on the conformance listener
//! (anonymous, plain TCP, loopback only). Each test checks normative statements of MQTT 3.1.1
//! (OASIS Standard, 2014) or MQTT 5.0 (OASIS Standard, 2019), cited by their ids; the table in
//! tests/CONFORMANCE.md lists which test covers which statement. Raw packets where a client
//! library would not send what the statement is about, rumqttc elsewhere.

use e2e::raw::{frame, props, publish, string, subscribe, Connect, Got, Raw};
use e2e::{Client, Client5, Platform};
use rumqttc::{Packet, QoS};

/// A 3.1.1 client of the conformance listener, connected.
async fn v311(p: &Platform, id: &str) -> Client {
    Client::connect(p.conformance_options(id)).await.unwrap()
}

/// A 5 client of the conformance listener, connected.
async fn v5(p: &Platform, id: &str) -> Client5 {
    Client5::connect(p.conformance_options_v5(id))
        .await
        .unwrap()
}

/// A raw connection to the conformance listener that sent `connect` and got CONNACK 0.
async fn raw(p: &Platform, connect: &Connect<'_>) -> Raw {
    let mut r = Raw::tcp(p.conformance_addr()).await;
    r.connect(&connect.bytes()).await;
    r
}

/// Waits for the SUBACK of a 3.1.1 client; returns its return codes.
async fn suback(c: &mut Client) -> Vec<rumqttc::SubscribeReasonCode> {
    c.wait_for(|pkt| match pkt {
        Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await
}

/// Everything a 3.1.1 client receives up to and including the publish on `marker`, which
/// `publisher` sends last: what arrived before it is all that arrived, since one publisher's
/// messages reach a subscriber in order [MQTT-4.6.0-5].
async fn received_until_marker(
    c: &mut Client,
    publisher: &Client,
    marker: &str,
) -> Vec<rumqttc::Publish> {
    publisher
        .client
        .publish(marker, QoS::AtLeastOnce, false, "marker")
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let p = c
            .wait_for(|pkt| match pkt {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        if p.topic == marker {
            return got;
        }
        got.push(p);
    }
}

/// The next PUBLISH a 3.1.1 client receives.
async fn next_publish(c: &mut Client) -> rumqttc::Publish {
    c.wait_for(|pkt| match pkt {
        Packet::Publish(p) => Some(p.clone()),
        _ => None,
    })
    .await
}

/// The property section of an MQTT 5 CONNACK body (after its flags and reason code), as
/// (identifier, value bytes) pairs for the properties the tests read.
fn connack_properties(body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let (len, n) = read_varint(&body[2..]);
    let mut rest = &body[2 + n..2 + n + len];
    let mut out = Vec::new();
    while let Some((&id, tail)) = rest.split_first() {
        let size = match id {
            // Byte
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            // Two-byte integer
            0x13 | 0x21 | 0x22 => 2,
            // Four-byte integer
            0x11 | 0x27 => 4,
            // UTF-8 string (assigned client id, reason string, ...)
            _ => 2 + u16::from_be_bytes([tail[0], tail[1]]) as usize,
        };
        out.push((id, tail[..size].to_vec()));
        rest = &tail[size..];
    }
    out
}

fn read_varint(b: &[u8]) -> (usize, usize) {
    let mut value = 0;
    for (i, byte) in b.iter().enumerate().take(4) {
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("malformed variable byte integer")
}

mod listener {
    use super::*;

    /// The listener takes anonymous clients without TLS, so it may only listen on loopback.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_non_loopback_address_is_refused_at_startup() {
        for addr in ["0.0.0.0:0", "[::]:0"] {
            let dir = tempfile::tempdir().unwrap();
            let mut config = fleet_service::config::Config::for_tests(dir.path());
            config.conformance_listen = Some(addr.parse().unwrap());
            let err = match fleet_service::app::App::start(config).await {
                Ok(app) => {
                    app.shutdown().await.unwrap();
                    panic!("{addr}: the platform started");
                }
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains("--conformance-listen") && err.contains("loopback"),
                "{addr}: {err}"
            );
        }
    }

    /// The binary refuses it, from the flag or the environment, before binding or writing
    /// anything, and exits with a failure that says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_binary_refuses_a_non_loopback_address() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let listeners = [
            "--mqtts-listen=127.0.0.1:0",
            "--service-listen=127.0.0.1:0",
            "--http-listen=127.0.0.1:0",
        ];
        let by_flag = std::process::Command::new(e2e::cluster::fleet_service_binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(listeners)
            .args(["--conformance-listen", "192.0.2.1:1883"])
            .env_remove("FLEET_CONFORMANCE_LISTEN")
            .output()
            .unwrap();
        let by_env = std::process::Command::new(e2e::cluster::fleet_service_binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(listeners)
            .env("FLEET_CONFORMANCE_LISTEN", "0.0.0.0:18830")
            .output()
            .unwrap();
        for (out, addr) in [(by_flag, "192.0.2.1:1883"), (by_env, "0.0.0.0:18830")] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{addr}: started");
            assert!(
                stderr.contains(&format!("--conformance-listen {addr} refused"))
                    && stderr.contains("loopback"),
                "{addr}: {stderr}"
            );
        }
        assert!(!data.exists(), "the refused start wrote its data directory");
    }

    /// Filters inside `devices/` and `cohorts/` are refused; `#` is granted but delivers
    /// nothing from them, live or retained; publishing into them is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_platform_trees_are_out_of_reach() {
        use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode as R5};
        use rumqttc::v5::mqttbytes::QoS as Q5;
        let p = Platform::with_conformance_listener().await;
        let fleet = p.jitp_fleet(serde_json::json!({})).await;
        // A device online: its retained presence is on `devices/conf-dev/presence`.
        let cert = fleet.ca.issue("conf-dev");
        let device = Client::connect(p.device_options(&cert, "conf-dev"))
            .await
            .unwrap();
        e2e::eventually("the device is online", || async {
            (p.device("conf-dev").await["online"] == serde_json::json!(true)).then_some(())
        })
        .await;

        let mut c = v5(&p, "outsider").await;
        for (filter, granted) in [
            ("devices/+/telemetry", false),
            ("devices/conf-dev/#", false),
            ("cohorts/#", false),
            ("$share/g/devices/#", false),
            ("#", true),
        ] {
            c.client.subscribe(filter, Q5::AtLeastOnce).await.unwrap();
            let code = c
                .wait_for(|pkt| match pkt {
                    P5::SubAck(s) => Some(s.return_codes[0]),
                    _ => None,
                })
                .await;
            let want = if granted {
                R5::Success(Q5::AtLeastOnce)
            } else {
                R5::NotAuthorized
            };
            assert_eq!(code, want, "{filter}");
        }
        c.client
            .publish("devices/conf-dev/commands", Q5::AtLeastOnce, false, "{}")
            .await
            .unwrap();
        let reason = c
            .wait_for(|pkt| match pkt {
                P5::PubAck(a) => Some(a.reason),
                _ => None,
            })
            .await;
        assert_eq!(reason, PubAckReason::NotAuthorized);
        // The device sends telemetry (delivered live to `#` if anything were) and the client
        // a marker; only the marker may arrive.
        device
            .client
            .publish("devices/conf-dev/telemetry", QoS::AtLeastOnce, false, "{}")
            .await
            .unwrap();
        c.client
            .publish("conf/marker", Q5::AtLeastOnce, false, "m")
            .await
            .unwrap();
        let first = c
            .wait_for(|pkt| match pkt {
                P5::Publish(p) => Some(String::from_utf8_lossy(&p.topic).into_owned()),
                _ => None,
            })
            .await;
        assert_eq!(
            first, "conf/marker",
            "a platform topic reached the listener"
        );
        p.stop().await;
    }

    /// The configured filters (by default the Paho suite's `test/nosubscribe`) are refused
    /// with the failure code 0x80 in both versions; the other filters of the SUBSCRIBE are
    /// granted [MQTT-3.9.3-1].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listed_filters_are_refused_with_the_failure_code() {
        let p = Platform::with_conformance_listener().await;
        for v5 in [false, true] {
            let connect = if v5 {
                Connect::v5("refused")
            } else {
                Connect::v311("refused")
            };
            let mut r = raw(&p, &connect).await;
            let mut body = vec![0, 7];
            if v5 {
                body.push(0);
            }
            for f in ["test/nosubscribe", "test/ok"] {
                string(f.as_bytes(), &mut body);
                body.push(1);
            }
            r.send(&frame(0x82, &body)).await;
            let (_, ack) = r.expect(9).await;
            let codes = if v5 { &ack[3..] } else { &ack[2..] };
            assert_eq!(codes, [0x80, 0x01], "v5: {v5}");
        }
        p.stop().await;
    }
}

mod connect {
    use super::*;

    /// [MQTT-3.1.2-2]: an unsupported protocol level gets CONNACK 0x01 and the connection
    /// is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsupported_protocol_level() {
        let p = Platform::with_conformance_listener().await;
        let mut r = Raw::tcp(p.conformance_addr()).await;
        let connect = Connect {
            level: 6,
            ..Connect::v311("level6")
        };
        r.send(&connect.bytes()).await;
        let (_, body) = r.expect(2).await;
        assert_eq!(body[1], 0x01, "return code");
        assert_eq!(r.next().await, Got::Closed);
        p.stop().await;
    }

    /// [MQTT-3.1.0-2]: a second CONNECT is a protocol violation; the 3.1.1 server closes the
    /// connection, the 5 server sends DISCONNECT 0x82 first [MQTT-4.13.1-1].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_connect_ends_the_connection() {
        let p = Platform::with_conformance_listener().await;
        let mut r = raw(&p, &Connect::v311("twice")).await;
        r.send(&Connect::v311("twice").bytes()).await;
        r.expect_closed("second CONNECT (3.1.1)").await;
        let mut r = raw(&p, &Connect::v5("twice5")).await;
        r.send(&Connect::v5("twice5").bytes()).await;
        r.expect_disconnect(0x82, "second CONNECT (5)").await;
        p.stop().await;
    }

    /// [MQTT-3.1.3-8]: a zero-byte client id with CleanSession 0 is refused with 0x02 and the
    /// connection closed; [MQTT-3.1.3-6]: with CleanSession 1 it is accepted (and assigned
    /// an id).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_length_client_id_in_3_1_1() {
        let p = Platform::with_conformance_listener().await;
        let mut r = Raw::tcp(p.conformance_addr()).await;
        let persistent = Connect {
            flags: 0,
            ..Connect::v311("")
        };
        r.send(&persistent.bytes()).await;
        let (_, body) = r.expect(2).await;
        assert_eq!(body, [0x00, 0x02]);
        assert_eq!(r.next().await, Got::Closed);
        let mut r = raw(&p, &Connect::v311("")).await;
        r.ping().await;
        p.stop().await;
    }

    /// [MQTT-3.2.2-16]: a 5 client that connects with a zero-length client id is told the id
    /// the server assigned, in the CONNACK's Assigned Client Identifier.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_length_client_id_in_5_is_assigned_one() {
        let p = Platform::with_conformance_listener().await;
        let mut r = Raw::tcp(p.conformance_addr()).await;
        r.send(&Connect::v5("").bytes()).await;
        let (_, body) = r.expect(2).await;
        assert_eq!(body[1], 0, "reason code");
        let props = connack_properties(&body);
        let assigned = props
            .iter()
            .find(|(id, _)| *id == 0x12)
            .map(|(_, v)| String::from_utf8(v[2..].to_vec()).unwrap())
            .expect("an Assigned Client Identifier");
        assert!(!assigned.is_empty());
        p.stop().await;
    }

    /// [MQTT-3.2.2-1]: CleanSession 1 gets Session Present 0; [MQTT-3.2.2-2]: a resumed
    /// session gets Session Present 1, [MQTT-3.2.2-3]: none kept gets 0; [MQTT-3.1.2-6]:
    /// CleanSession 1 discards the kept one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_present_says_whether_a_session_was_resumed() {
        let p = Platform::with_conformance_listener().await;
        let session_present = |clean: bool| {
            let p = &p;
            async move {
                let connect = Connect {
                    flags: if clean { 0x02 } else { 0 },
                    ..Connect::v311("present")
                };
                let mut r = Raw::tcp(p.conformance_addr()).await;
                r.send(&connect.bytes()).await;
                let (_, body) = r.expect(2).await;
                assert_eq!(body[1], 0);
                r.send(&subscribe(0x82, "present/x", 1, false)).await;
                r.expect(9).await;
                r.send(&[0xe0, 0]).await;
                assert_eq!(r.next().await, Got::Closed);
                body[0]
            }
        };
        assert_eq!(session_present(true).await, 0, "clean session");
        assert_eq!(session_present(false).await, 0, "no session kept yet");
        assert_eq!(session_present(false).await, 1, "the kept session");
        assert_eq!(
            session_present(true).await,
            0,
            "a clean session discards it"
        );
        assert_eq!(
            session_present(false).await,
            0,
            "nothing kept after a clean one"
        );
        p.stop().await;
    }
}

mod publish_subscribe {
    use super::*;

    /// [MQTT-3.8.4-1]/[MQTT-3.8.4-2]/[MQTT-3.8.4-5]/[MQTT-3.9.3-1]: one SUBACK per SUBSCRIBE
    /// with its packet id and a return code per filter, in their order, granting the QoS asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn suback_answers_every_filter_in_order() {
        let p = Platform::with_conformance_listener().await;
        let mut r = raw(&p, &Connect::v311("suback")).await;
        let mut body = vec![0x12, 0x34];
        for (f, qos) in [("a/b", 2u8), ("a/+", 0), ("devices/#", 1), ("#", 1)] {
            string(f.as_bytes(), &mut body);
            body.push(qos);
        }
        r.send(&frame(0x82, &body)).await;
        let (first, ack) = r.expect(9).await;
        assert_eq!(first, 0x90);
        assert_eq!(ack, [0x12, 0x34, 0x02, 0x00, 0x80, 0x01]);
        p.stop().await;
    }

    /// Messages of each QoS reach a matching subscriber once, with their topic and payload, at
    /// the lower of their QoS and the subscription's [MQTT-3.8.4-6] (rumqttd alone delivers
    /// at the subscription's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_qos_is_delivered() {
        let p = Platform::with_conformance_listener().await;
        let mut c = v311(&p, "qos").await;
        c.client.subscribe("qos/t", QoS::ExactlyOnce).await.unwrap();
        suback(&mut c).await;
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            c.client
                .publish("qos/t", qos, false, format!("{qos:?}"))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = next_publish(&mut c).await;
            got.push((String::from_utf8(p.payload.to_vec()).unwrap(), p.qos));
        }
        assert_eq!(
            got,
            [
                ("AtMostOnce".to_owned(), QoS::AtMostOnce),
                ("AtLeastOnce".to_owned(), QoS::AtLeastOnce),
                ("ExactlyOnce".to_owned(), QoS::ExactlyOnce),
            ]
        );
        let mut low = v311(&p, "qos-low").await;
        low.client
            .subscribe("qos/t", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut low).await;
        c.client
            .publish("qos/t", QoS::ExactlyOnce, false, "two")
            .await
            .unwrap();
        assert_eq!(next_publish(&mut low).await.qos, QoS::AtLeastOnce);
        assert_eq!(next_publish(&mut c).await.qos, QoS::ExactlyOnce);
        let publisher = v311(&p, "qos-pub").await;
        let got = received_until_marker(&mut c, &publisher, "qos/t").await;
        assert!(got.is_empty(), "delivered more than once: {got:?}");
        p.stop().await;
    }

    /// [MQTT-4.7.2-1]: filters starting with a wildcard do not match topics starting with `$`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wildcards_do_not_match_dollar_topics() {
        let p = Platform::with_conformance_listener().await;
        let mut c = v311(&p, "dollar").await;
        c.client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
        suback(&mut c).await;
        c.client.subscribe("+/x", QoS::AtLeastOnce).await.unwrap();
        suback(&mut c).await;
        let publisher = v311(&p, "dollar-pub").await;
        for topic in ["$dollar/x", "$dollar"] {
            publisher
                .client
                .publish(topic, QoS::AtLeastOnce, false, "d")
                .await
                .unwrap();
        }
        let got = received_until_marker(&mut c, &publisher, "dollar/marker").await;
        assert!(got.is_empty(), "{got:?}");
        p.stop().await;
    }

    /// [MQTT-3.10.4-1]/[MQTT-3.10.4-2]: after UNSUBSCRIBE the filter delivers nothing new; [MQTT-3.10.4-4]/
    /// [MQTT-3.10.4-5]: UNSUBACK with the packet id, also for a filter never subscribed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsubscribe_stops_delivery_and_is_always_answered() {
        let p = Platform::with_conformance_listener().await;
        let mut r = raw(&p, &Connect::v311("unsub")).await;
        r.send(&subscribe(0x82, "unsub/a", 1, false)).await;
        r.expect(9).await;
        r.send(&subscribe(0x82, "unsub/marker", 1, false)).await;
        r.expect(9).await;
        let mut body = vec![0x0a, 0x0b];
        string(b"unsub/a", &mut body);
        r.send(&frame(0xa2, &body)).await;
        assert_eq!(r.expect(11).await, (0xb0, vec![0x0a, 0x0b]));
        let mut body = vec![0x0c, 0x0d];
        string(b"never/subscribed", &mut body);
        r.send(&frame(0xa2, &body)).await;
        assert_eq!(r.expect(11).await, (0xb0, vec![0x0c, 0x0d]));
        let publisher = v311(&p, "unsub-pub").await;
        for topic in ["unsub/a", "unsub/marker"] {
            publisher
                .client
                .publish(topic, QoS::AtMostOnce, false, "x")
                .await
                .unwrap();
        }
        let (_, body) = r.expect(3).await;
        assert_eq!(&body[2..2 + "unsub/marker".len()], b"unsub/marker");
        p.stop().await;
    }

    /// [MQTT-4.6.0-5]/[MQTT-4.6.0-6]: one publisher's messages on one topic reach a subscriber in
    /// the order they were published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_keep_their_order() {
        let p = Platform::with_conformance_listener().await;
        let mut c = v311(&p, "order").await;
        c.client
            .subscribe("order/t", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut c).await;
        let publisher = v311(&p, "order-pub").await;
        for i in 0..50 {
            publisher
                .client
                .publish("order/t", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
        for i in 0..50 {
            let p = next_publish(&mut c).await;
            assert_eq!(p.payload, i.to_string().as_bytes());
        }
        p.stop().await;
    }
}

mod retained {
    use super::*;

    /// [MQTT-3.3.1-5]/[MQTT-3.3.1-6]/[MQTT-3.3.1-8]: a retained message reaches a later
    /// subscriber with RETAIN 1; [MQTT-3.3.1-9]: a subscriber of the moment gets it with RETAIN
    /// 0; [MQTT-3.3.1-10]/[MQTT-3.3.1-11]: a zero-byte retained message removes it and is not
    /// kept itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retained_messages() {
        let p = Platform::with_conformance_listener().await;
        let mut live = v311(&p, "ret-live").await;
        live.client
            .subscribe("ret/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut live).await;
        let publisher = v311(&p, "ret-pub").await;
        publisher
            .client
            .publish("ret/a", QoS::AtLeastOnce, true, "kept")
            .await
            .unwrap();
        let now = next_publish(&mut live).await;
        assert_eq!((now.topic.as_str(), now.retain), ("ret/a", false));

        let mut later = v311(&p, "ret-later").await;
        later
            .client
            .subscribe("ret/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut later).await;
        let got = next_publish(&mut later).await;
        assert_eq!(
            (got.topic.as_str(), got.retain, &got.payload[..]),
            ("ret/a", true, &b"kept"[..])
        );

        publisher
            .client
            .publish("ret/a", QoS::AtLeastOnce, true, "")
            .await
            .unwrap();
        let cleared = next_publish(&mut live).await;
        assert!(cleared.payload.is_empty());
        let mut after = v311(&p, "ret-after").await;
        after
            .client
            .subscribe("ret/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut after).await;
        let got = received_until_marker(&mut after, &publisher, "ret/marker").await;
        assert!(
            got.is_empty(),
            "a removed retained message was replayed: {got:?}"
        );
        p.stop().await;
    }
}

mod sessions {
    use super::*;

    /// [MQTT-3.1.2-4]/[MQTT-3.1.2-5]: a session with CleanSession 0 keeps its subscriptions
    /// and the QoS 1 and 2 messages published while its client is away, and delivers them when
    /// it reconnects.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offline_messages_are_kept_for_a_persistent_session() {
        let p = Platform::with_conformance_listener().await;
        let options = || {
            let mut o = p.conformance_options("offline");
            o.set_clean_session(false);
            o
        };
        let mut c = Client::connect(options()).await.unwrap();
        c.client
            .subscribe("offline/+", QoS::ExactlyOnce)
            .await
            .unwrap();
        suback(&mut c).await;
        c.client.disconnect().await.unwrap();
        c.closed().await;
        let publisher = v311(&p, "offline-pub").await;
        publisher
            .client
            .publish("offline/1", QoS::AtLeastOnce, false, "one")
            .await
            .unwrap();
        publisher
            .client
            .publish("offline/2", QoS::ExactlyOnce, false, "two")
            .await
            .unwrap();
        // Both acknowledged to the publisher before the subscriber comes back.
        let mut publisher = publisher;
        publisher
            .wait_for(|pkt| matches!(pkt, Packet::PubAck(_)).then_some(()))
            .await;
        publisher
            .wait_for(|pkt| matches!(pkt, Packet::PubComp(_)).then_some(()))
            .await;
        let mut c = Client::connect(options()).await.unwrap();
        let mut topics = vec![
            next_publish(&mut c).await.topic,
            next_publish(&mut c).await.topic,
        ];
        topics.sort();
        assert_eq!(topics, ["offline/1", "offline/2"]);
        p.stop().await;
    }

    /// [MQTT-4.4.0-1]: a QoS 1 message the client had not acknowledged when it disconnected is
    /// sent again when it reconnects to its session.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unacknowledged_messages_are_sent_again_after_reconnecting() {
        let p = Platform::with_conformance_listener().await;
        let persistent = Connect {
            flags: 0,
            ..Connect::v311("redeliver")
        };
        let mut r = raw(&p, &persistent).await;
        r.send(&subscribe(0x82, "redeliver/t", 1, false)).await;
        r.expect(9).await;
        let publisher = v311(&p, "redeliver-pub").await;
        publisher
            .client
            .publish("redeliver/t", QoS::AtLeastOnce, false, "again")
            .await
            .unwrap();
        let (first, body) = r.expect(3).await;
        assert_eq!(first & 0x06, 0x02, "QoS 1");
        // Not acknowledged: the connection ends.
        r.send(&[0xe0, 0]).await;
        assert_eq!(r.next().await, Got::Closed);
        let mut r = Raw::tcp(p.conformance_addr()).await;
        r.send(&persistent.bytes()).await;
        let (_, ack) = r.expect(2).await;
        assert_eq!(ack, [0x01, 0x00], "session present");
        let (_, again) = r.expect(3).await;
        let payload = |b: &[u8]| b[2 + "redeliver/t".len() + 2..].to_vec();
        assert_eq!(payload(&again), payload(&body));
        p.stop().await;
    }
}

mod will_and_keepalive {
    use super::*;

    /// [MQTT-3.1.2-8]: the will is published when the network connection closes without
    /// DISCONNECT; [MQTT-3.1.2-10]/[MQTT-3.14.4-3]: DISCONNECT discards it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn will_only_without_disconnect() {
        let p = Platform::with_conformance_listener().await;
        let mut watcher = v311(&p, "will-watcher").await;
        watcher
            .client
            .subscribe("will/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut watcher).await;
        for (id, clean_exit) in [("will-clean", true), ("will-lost", false)] {
            let mut o = p.conformance_options(id);
            o.set_last_will(rumqttc::LastWill::new(
                format!("will/{id}"),
                "gone",
                QoS::AtLeastOnce,
                false,
            ));
            let c = Client::connect(o).await.unwrap();
            if clean_exit {
                let mut c = c;
                c.client.disconnect().await.unwrap();
                c.closed().await;
            } else {
                c.kill().await;
            }
        }
        let publisher = v311(&p, "will-pub").await;
        // The lost client's will arrives; the cleanly disconnected one's never does.
        let will = next_publish(&mut watcher).await;
        assert_eq!(will.topic, "will/will-lost");
        let got = received_until_marker(&mut watcher, &publisher, "will/marker").await;
        assert!(got.is_empty(), "{got:?}");
        p.stop().await;
    }

    /// [MQTT-3.1.2-24]: a client silent for one and a half keepalives is disconnected (and its
    /// will published); [MQTT-3.12.4-1]: PINGREQ is answered PINGRESP.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keepalive_is_enforced_and_pings_answered() {
        let p = Platform::with_conformance_listener().await;
        let mut watcher = v311(&p, "ka-watcher").await;
        watcher
            .client
            .subscribe("ka/will", QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut watcher).await;
        let mut connect = Connect::v311("ka-silent");
        connect.will = Some((b"ka/will", b"silent"));
        let mut bytes = connect.bytes();
        // Keepalive of 1 s (the builder's is 30 s): after the two-byte fixed header, the
        // protocol name (6), level (1) and flags (1).
        bytes[10..12].copy_from_slice(&1u16.to_be_bytes());
        let mut r = Raw::tcp(p.conformance_addr()).await;
        r.connect(&bytes).await;
        r.ping().await;
        // Silent from now on: the server closes the connection.
        assert_eq!(r.next().await, Got::Closed);
        let will = next_publish(&mut watcher).await;
        assert_eq!(will.payload, &b"silent"[..]);
        p.stop().await;
    }
}

mod mqtt5 {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{
        LastWill, Packet as P5, PublishProperties, SubscribeProperties,
    };
    use rumqttc::v5::mqttbytes::QoS as Q5;

    async fn subscribed(c: &mut Client5) {
        c.wait_for(|pkt| matches!(pkt, P5::SubAck(_)).then_some(()))
            .await;
    }

    async fn next(c: &mut Client5) -> rumqttc::v5::mqttbytes::v5::Publish {
        c.wait_for(|pkt| match pkt {
            P5::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// [MQTT-3.3.2-4]: the Payload Format Indicator, [MQTT-3.3.2-17]/[MQTT-3.3.2-18]: user
    /// properties in order, [MQTT-3.3.2-20]: the Content Type, and the Response Topic and
    /// Correlation Data (4.10) reach the subscriber unaltered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_properties_are_forwarded() {
        let p = Platform::with_conformance_listener().await;
        let mut c = v5(&p, "props").await;
        c.client
            .subscribe("props/t", Q5::AtLeastOnce)
            .await
            .unwrap();
        subscribed(&mut c).await;
        let sent = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("text/plain".into()),
            response_topic: Some("props/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"334")),
            user_properties: vec![("a".into(), "2".into()), ("c".into(), "3".into())],
            ..Default::default()
        };
        c.client
            .publish_with_properties("props/t", Q5::AtLeastOnce, false, "hello", sent.clone())
            .await
            .unwrap();
        let got = next(&mut c).await.properties.expect("properties");
        assert_eq!(got.payload_format_indicator, Some(1));
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(got.response_topic.as_deref(), Some("props/reply"));
        assert_eq!(got.correlation_data.as_deref(), Some(&b"334"[..]));
        assert_eq!(got.user_properties, sent.user_properties);
        p.stop().await;
    }

    /// [MQTT-3.1.2-23]: a session outlives its connection for its Session Expiry Interval,
    /// whatever Clean Start said; [MQTT-3.1.2-4]: Clean Start discards an earlier one; an
    /// interval of 0 ends the session with the connection, also when the DISCONNECT sets it
    /// (3.14.2.2.2).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_expiry_decides_what_outlives_the_connection() {
        let p = Platform::with_conformance_listener().await;
        // (Clean Start, Session Expiry Interval on CONNECT, on DISCONNECT, Session Present on
        // the next connection, which does not start clean).
        let steps: [(bool, u32, Option<u32>, bool); 4] = [
            (true, 0, None, false),
            (true, 300, None, true),
            (false, 300, Some(0), false),
            (false, 0, None, false),
        ];
        for (clean, expiry, on_disconnect, kept) in steps {
            let mut r = Raw::tcp(p.conformance_addr()).await;
            let mut connect = Connect::v5("expiry");
            connect.flags = if clean { 0x02 } else { 0 };
            connect.props = [&[0x11][..], &expiry.to_be_bytes()].concat();
            r.connect(&connect.bytes()).await;
            r.send(&subscribe(0x82, "expiry/t", 1, true)).await;
            r.expect(9).await;
            let disconnect = match on_disconnect {
                Some(e) => frame(
                    0xe0,
                    &[
                        &[0x00][..],
                        &props(&[&[0x11][..], &e.to_be_bytes()].concat()),
                    ]
                    .concat(),
                ),
                None => vec![0xe0, 0],
            };
            r.send(&disconnect).await;
            assert_eq!(r.next().await, Got::Closed);
            let mut again = Raw::tcp(p.conformance_addr()).await;
            again
                .send(
                    &Connect {
                        flags: 0,
                        ..Connect::v5("expiry")
                    }
                    .bytes(),
                )
                .await;
            let (_, ack) = again.expect(2).await;
            assert_eq!(
                ack[0] == 1,
                kept,
                "clean {clean}, expiry {expiry}, {on_disconnect:?}"
            );
            again.send(&[0xe0, 0]).await;
            assert_eq!(again.next().await, Got::Closed);
        }
        p.stop().await;
    }

    /// [MQTT-3.14.2-2]: a DISCONNECT may not give a session that was to end with the connection
    /// an expiry interval: a protocol error, answered DISCONNECT 0x82.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disconnect_cannot_extend_a_session_that_had_no_expiry() {
        let p = Platform::with_conformance_listener().await;
        let mut r = raw(&p, &Connect::v5("extend")).await;
        let body = [&[0x00][..], &props(&[0x11, 0, 0, 0, 60])].concat();
        r.send(&frame(0xe0, &body)).await;
        r.expect_disconnect(0x82, "DISCONNECT with an expiry").await;
        p.stop().await;
    }

    /// The will carries its properties (3.1.3.2): user properties, content type and the like
    /// reach whoever receives it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn will_properties_are_the_messages() {
        use rumqttc::v5::mqttbytes::v5::LastWillProperties;
        let p = Platform::with_conformance_listener().await;
        let mut watcher = v5(&p, "will5-watcher").await;
        watcher
            .client
            .subscribe("will5/t", Q5::AtLeastOnce)
            .await
            .unwrap();
        subscribed(&mut watcher).await;
        let mut o = p.conformance_options_v5("will5");
        o.set_last_will(LastWill::new(
            "will5/t",
            "gone",
            Q5::AtLeastOnce,
            false,
            Some(LastWillProperties {
                delay_interval: None,
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                content_type: Some("text/plain".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: vec![("a".into(), "2".into())],
            }),
        ));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 10);
        loop {
            if let rumqttc::v5::Event::Incoming(P5::ConnAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
        // Gone without DISCONNECT.
        drop((client, eventloop));
        let will = next(&mut watcher).await;
        let props = will.properties.expect("the will's properties");
        assert_eq!(props.user_properties, [("a".to_owned(), "2".to_owned())]);
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.payload_format_indicator, Some(1));
        p.stop().await;
    }

    /// [MQTT-4.8.2-2]: a message matching a shared subscription goes to one of its
    /// subscribers, not to each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_subscription_delivers_each_message_once() {
        let p = Platform::with_conformance_listener().await;
        let mut a = v5(&p, "share-a").await;
        let mut b = v5(&p, "share-b").await;
        for c in [&mut a, &mut b] {
            c.client
                .subscribe("$share/grp/share/t", Q5::AtLeastOnce)
                .await
                .unwrap();
            subscribed(c).await;
        }
        let publisher = v5(&p, "share-pub").await;
        for i in 0..10 {
            publisher
                .client
                .publish("share/t", Q5::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
        // Every message arrives, at one of the two: each at most once.
        let mut seen = std::collections::HashSet::new();
        let mut received = 0;
        while seen.len() < 10 {
            let m = tokio::select! {
                m = next(&mut a) => m,
                m = next(&mut b) => m,
            };
            assert_eq!(m.topic, "share/t");
            received += 1;
            seen.insert(m.payload);
        }
        assert_eq!(received, 10, "a shared message was delivered twice");
        p.stop().await;
    }

    /// [MQTT-3.3.4-3]: a message matched by a subscription with a Subscription Identifier
    /// carries it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscription_identifiers_are_returned() {
        let p = Platform::with_conformance_listener().await;
        let mut c = v5(&p, "subid").await;
        c.client
            .subscribe_with_properties(
                "subid/t",
                Q5::AtLeastOnce,
                SubscribeProperties {
                    id: Some(456789),
                    user_properties: Vec::new(),
                },
            )
            .await
            .unwrap();
        subscribed(&mut c).await;
        c.client
            .publish("subid/t", Q5::AtLeastOnce, false, "x")
            .await
            .unwrap();
        let props = next(&mut c).await.properties.expect("properties");
        assert_eq!(props.subscription_identifiers, [456789]);
        p.stop().await;
    }

    /// [MQTT-3.3.4-7] forbids a client more QoS 1 and 2 publishes unacknowledged than the
    /// server's Receive Maximum; one that has them is disconnected with 0x93 (4.9).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receive_maximum_exceeded_is_a_disconnect() {
        let p = Platform::with_conformance_listener().await;
        let mut r = raw(&p, &Connect::v5("flood")).await;
        // QoS 2 publishes never released hold their packet ids; the default maximum is 64.
        for id in 1..=65u16 {
            r.send(&publish(0x34, b"flood/t", Some(id), Some(&[]), b"x"))
                .await;
        }
        loop {
            match r.next().await {
                Got::Packet(0x50, _) => continue,
                Got::Packet(0xe0, body) => {
                    assert_eq!(body[0], 0x93);
                    break;
                }
                other => panic!("expected PUBRECs then DISCONNECT 0x93, got {other:?}"),
            }
        }
        p.stop().await;
    }

    /// A raw MQTT 5 subscriber of `filter` (options byte `options`) whose CONNECT carried
    /// the properties `connect_props`.
    async fn raw_subscriber(
        p: &Platform,
        id: &str,
        connect_props: Vec<u8>,
        filter: &str,
        options: u8,
    ) -> Raw {
        let mut connect = Connect::v5(id);
        connect.props = connect_props;
        let mut r = raw(p, &connect).await;
        r.send(&subscribe(0x82, filter, options, true)).await;
        r.expect(9).await;
        r
    }

    /// A PUBLISH frame's topic, and its properties (raw bytes) and payload, MQTT 5.
    fn parts(first: u8, body: &[u8]) -> (String, Vec<u8>, Vec<u8>) {
        let len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
        let at = 2 + len + if first & 0x06 != 0 { 2 } else { 0 };
        let (plen, n) = read_varint(&body[at..]);
        let props = body[at + n..at + n + plen].to_vec();
        (topic, props, body[at + n + plen..].to_vec())
    }

    /// [MQTT-3.8.3-3]: with No Local, a client's own publishes are not sent back to it (others
    /// still get them); [MQTT-3.3.1-12]/[MQTT-3.3.1-13]: Retain As Published keeps the RETAIN
    /// flag the publisher set, without it RETAIN is 0.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_local_and_retain_as_published() {
        let p = Platform::with_conformance_listener().await;
        // No Local (0x04) and Retain As Published (0x08), QoS 1.
        let mut me = raw_subscriber(&p, "opts-me", Vec::new(), "opts/#", 0x04 | 0x08 | 1).await;
        let mut other = raw_subscriber(&p, "opts-other", Vec::new(), "opts/#", 1).await;
        // Its own retained publish: the other subscriber gets it with RETAIN 0 (it did not ask
        // for Retain As Published), this one not at all.
        me.send(&publish(0x31, b"opts/mine", None, Some(&[]), b"m"))
            .await;
        let (first, body) = other.expect(3).await;
        assert_eq!((parts(first, &body).0, first & 1), ("opts/mine".into(), 0));
        // Another client's, published after it: this one's first message.
        let publisher = v5(&p, "opts-pub").await;
        publisher
            .client
            .publish("opts/theirs", Q5::AtMostOnce, true, "t")
            .await
            .unwrap();
        let (first, body) = other.expect(3).await;
        assert_eq!(
            (parts(first, &body).0, first & 1),
            ("opts/theirs".into(), 0)
        );
        let (first, body) = me.expect(3).await;
        assert_eq!(
            (parts(first, &body).0, first & 1),
            ("opts/theirs".into(), 1)
        );
        p.stop().await;
    }

    /// [MQTT-3.1.2-24]/[MQTT-3.1.2-25]: the server sends no packet larger than the client's
    /// Maximum Packet Size; a message too large for it is dropped as if delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn maximum_packet_size_of_the_client() {
        let p = Platform::with_conformance_listener().await;
        let max = [&[0x27][..], &64u32.to_be_bytes()].concat();
        let mut r = raw_subscriber(&p, "small", max, "small/t", 1).await;
        let publisher = v5(&p, "small-pub").await;
        for payload in ["a".repeat(80), "fits".to_owned()] {
            publisher
                .client
                .publish("small/t", Q5::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        let (first, body) = r.expect(3).await;
        assert!(body.len() + 2 <= 64);
        assert_eq!(parts(first, &body).2, b"fits");
        p.stop().await;
    }

    /// Server topic aliases (MQTT 5, 3.3.2.3.4), within the client's Topic Alias Maximum: a
    /// topic's name and alias first, then the alias alone with an empty topic name.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_topic_aliases() {
        let p = Platform::with_conformance_listener().await;
        let aliases = [&[0x22][..], &5u16.to_be_bytes()].concat();
        let mut r = raw_subscriber(&p, "alias", aliases, "alias/+", 0).await;
        let publisher = v5(&p, "alias-pub").await;
        for topic in ["alias/a", "alias/a", "alias/b"] {
            publisher
                .client
                .publish(topic, Q5::AtMostOnce, false, topic)
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let (first, body) = r.expect(3).await;
            let (topic, props, payload) = parts(first, &body);
            let alias = props
                .windows(3)
                .find(|w| w[0] == 0x23)
                .map(|w| u16::from_be_bytes([w[1], w[2]]));
            got.push((topic, alias, String::from_utf8(payload).unwrap()));
        }
        assert_eq!(got[0], ("alias/a".into(), got[0].1, "alias/a".into()));
        let a = got[0].1.expect("an alias for alias/a");
        assert_eq!(got[1], (String::new(), Some(a), "alias/a".into()));
        assert_eq!(got[2].0, "alias/b");
        assert_ne!(got[2].1, Some(a));
        p.stop().await;
    }

    /// [MQTT-3.3.4-9]: the server has no more QoS 1 and 2 publishes unacknowledged at a
    /// client than the client's Receive Maximum; the next goes out when one is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receive_maximum_of_the_client() {
        let p = Platform::with_conformance_listener().await;
        let max = [&[0x21][..], &2u16.to_be_bytes()].concat();
        let mut r = raw_subscriber(&p, "slow", max, "slow/t", 1).await;
        let mut publisher = v5(&p, "slow-pub").await;
        for i in 0..3 {
            publisher
                .client
                .publish("slow/t", Q5::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
        for _ in 0..3 {
            publisher
                .wait_for(|pkt| matches!(pkt, P5::PubAck(_)).then_some(()))
                .await;
        }
        let (_, one) = r.expect(3).await;
        let (_, two) = r.expect(3).await;
        // The third waits: what arrives before the answer to a ping is the window's.
        r.ping().await;
        let pkid = |b: &[u8]| b[2 + "slow/t".len()..4 + "slow/t".len()].to_vec();
        r.send(&frame(0x40, &pkid(&one))).await;
        let (first, three) = r.expect(3).await;
        assert_eq!(parts(first, &three).2, b"2");
        r.send(&frame(0x40, &pkid(&two))).await;
        r.send(&frame(0x40, &pkid(&three))).await;
        r.ping().await;
        p.stop().await;
    }
}
