//! The device client library (`device-client`: `Agent`, `publish_once`) against the real
//! platform over mutual TLS: provisioning on first connect, telemetry and reported state in
//! the database, commands from a backend service and their acks, the errors a device sees when
//! its certificate, the broker's certificate or its client id is wrong, and a clean shutdown.

use std::time::Duration;

use device_client::fleet_wire::payload::{Command, CommandAck, CommandStatus};
use device_client::fleet_wire::{DeviceId, Topic};
use device_client::{
    publish_once, Agent, AgentConfig, AgentEvent, ClientIdentity, CommandHandler, CommandOutcome,
    ConnackRefusal, ConnectError, ConnectOptions, Error, TlsConfig,
};
use e2e::{eventually, Client, DeviceCert, Platform, TestCa, WAIT};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Connect options for a device presenting `cert`, trusting `server_ca_pem`.
fn options(p: &Platform, server_ca_pem: &str, cert: &DeviceCert) -> ConnectOptions {
    let tls = TlsConfig::from_ca_pem(server_ca_pem.as_bytes())
        .unwrap()
        .with_identity(
            ClientIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap(),
        );
    let url = format!("mqtts://127.0.0.1:{}", p.app().mqtts_addr().port());
    ConnectOptions::new(url.parse().unwrap()).with_tls(tls)
}

fn device_options(p: &Platform, cert: &DeviceCert) -> ConnectOptions {
    options(p, &p.server_ca_pem(), cert)
}

/// A backend service subscribed to the command acks of `id`.
async fn service_watching_acks(p: &Platform, id: &str) -> Client {
    let mut ops = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    ops.client
        .subscribe(
            Topic::CommandAck(DeviceId::parse(id).unwrap()).to_string(),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    ops.wait_for(|pkt| matches!(pkt, Packet::SubAck(_)).then_some(()))
        .await;
    ops
}

async fn send_command(ops: &Client, id: &str, command: Value) {
    ops.client
        .publish(
            Topic::Commands(DeviceId::parse(id).unwrap()).to_string(),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&command).unwrap(),
        )
        .await
        .unwrap();
}

async fn next_ack(ops: &mut Client, id: &str) -> CommandAck {
    let topic = Topic::CommandAck(DeviceId::parse(id).unwrap()).to_string();
    ops.wait_for(|pkt| match pkt {
        Packet::Publish(p) if p.topic == topic => {
            Some(serde_json::from_slice::<CommandAck>(&p.payload).unwrap())
        }
        _ => None,
    })
    .await
}

async fn wait_offline(p: &Platform, id: &str) -> Value {
    eventually(&format!("{id} offline"), || async {
        let d = p.device(id).await;
        (d["online"] == json!(false)).then_some(d)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_session_over_mutual_tls() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({ "site": "berlin" })).await;
    let id = "agent-001";
    let mut config = AgentConfig::new(device_options(&p, &fleet.ca.issue(id)));
    config.telemetry_interval = Some(Duration::from_millis(200));
    config.firmware_version = Some("9.9.9".into());
    let (tx, mut commands) = mpsc::unbounded_channel();
    let agent = Agent::new(config)
        .on_command(move |command: Command| {
            let _ = tx.send(command);
            async { CommandOutcome::succeeded() }
        })
        .start()
        .unwrap();
    assert_eq!(
        agent.device_id().as_str(),
        id,
        "device id comes from the certificate CN"
    );
    agent.wait_ready(WAIT).await.unwrap();

    // The first connection provisioned the device from its CA's JITP settings.
    let d = p.device(id).await;
    assert_eq!(d["cohort_id"], json!(fleet.cohort_id), "{d}");
    assert_eq!(d["tags"], json!({ "site": "berlin" }));
    assert_eq!(d["online"], json!(true));

    // Telemetry and the reported state reach the database.
    let d = eventually("telemetry and reported state stored", || async {
        let d = p.device(id).await;
        (d["last_telemetry"]["seq"].is_u64() && d["firmware_version"] == "9.9.9").then_some(d)
    })
    .await;
    assert!(d["last_telemetry"]["ts_ms"].is_u64(), "{d}");
    let mut status = agent.watch_status();
    status
        .wait_for(|s| s.telemetry_delivered >= 2)
        .await
        .unwrap();

    // A command from a backend service reaches the handler; its ack comes back.
    let mut ops = service_watching_acks(&p, id).await;
    send_command(&ops, id, json!({ "id": "c1", "name": "reboot" })).await;
    let command = tokio::time::timeout(WAIT, commands.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (command.id.as_str(), command.name.as_str()),
        ("c1", "reboot")
    );
    let ack = next_ack(&mut ops, id).await;
    assert_eq!(ack.id, "c1");
    assert_eq!(ack.status, CommandStatus::Succeeded);

    // Shutdown ends the session with a DISCONNECT.
    let status = agent.shutdown().await.unwrap();
    assert!(status.telemetry_delivered >= 2, "{status:?}");
    assert_eq!(status.commands_received, 1);
    assert!(status.acks_delivered >= 1);
    let d = wait_offline(&p, id).await;
    assert_eq!(d["disconnect_reason"], "client", "{d}");
    p.stop().await;
}

/// Embedding programs can implement the handler trait on their own types.
struct Rejecting;

impl CommandHandler for Rejecting {
    async fn handle(&self, command: Command) -> CommandOutcome {
        CommandOutcome::rejected(format!("{} is not supported", command.name))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_trait_on_a_struct() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let id = "agent-handler";
    let mut config = AgentConfig::new(device_options(&p, &fleet.ca.issue(id)));
    config.telemetry_interval = None;
    let agent = Agent::new(config).on_command(Rejecting).start().unwrap();
    agent.wait_ready(WAIT).await.unwrap();
    let mut ops = service_watching_acks(&p, id).await;
    send_command(&ops, id, json!({ "id": "c2", "name": "format-disk" })).await;
    let ack = next_ack(&mut ops, id).await;
    assert_eq!(ack.id, "c2");
    assert_eq!(ack.status, CommandStatus::Rejected);
    assert_eq!(ack.message.as_deref(), Some("format-disk is not supported"));
    agent.shutdown().await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_once_over_mutual_tls() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let id = DeviceId::parse("pub-once").unwrap();
    let opts = device_options(&p, &fleet.ca.issue(id.as_str()));
    publish_once(
        &opts,
        &Topic::Telemetry(id.clone()),
        br#"{"t":1}"#,
        false,
        WAIT,
    )
    .await
    .unwrap();
    // PUBACK means committed.
    let d = p.device(id.as_str()).await;
    assert_eq!(d["last_telemetry"], json!({ "t": 1 }), "{d}");
    publish_once(
        &opts,
        &Topic::State(id.clone()),
        br#"{"firmware_version":"1.0.0"}"#,
        true,
        WAIT,
    )
    .await
    .unwrap();
    let d = p.device(id.as_str()).await;
    assert_eq!(d["firmware_version"], "1.0.0", "{d}");
    let d = wait_offline(&p, id.as_str()).await;
    assert_eq!(d["disconnect_reason"], "client", "{d}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_other_than_the_certificate_is_refused_with_connack() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let opts = device_options(&p, &fleet.ca.issue("real-id"))
        .with_client_id(DeviceId::parse("someone-else").unwrap());
    let err = publish_once(
        &opts,
        &Topic::Telemetry(DeviceId::parse("someone-else").unwrap()),
        b"{}",
        false,
        WAIT,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect(ConnectError::Refused(ConnackRefusal::IdentifierRejected))
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "broker refused the connection: client identifier rejected (CONNACK reason 0x85)"
    );

    // The agent reports the refusal and keeps retrying; it never becomes ready.
    let mut config = AgentConfig::new(opts);
    config.telemetry_interval = None;
    let agent = Agent::new(config);
    let mut events = agent.subscribe();
    let agent = agent.start().unwrap();
    let failed = tokio::time::timeout(WAIT, async {
        loop {
            if let AgentEvent::ConnectFailed(e) = events.recv().await.unwrap() {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        failed,
        ConnectError::Refused(ConnackRefusal::IdentifierRejected)
    );
    match agent.wait_ready(Duration::from_millis(300)).await {
        Err(Error::NotReady { last_error, .. }) => assert_eq!(
            last_error,
            Some(ConnectError::Refused(ConnackRefusal::IdentifierRejected))
        ),
        other => panic!("{other:?}"),
    }
    agent.shutdown().await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_an_unknown_ca_is_a_tls_error() {
    let p = Platform::sqlite().await;
    let stranger = TestCa::new("Stranger CA").issue("stranger-1");
    let opts = device_options(&p, &stranger);
    let err = publish_once(
        &opts,
        &Topic::Telemetry(DeviceId::parse("stranger-1").unwrap()),
        b"{}",
        false,
        WAIT,
    )
    .await
    .unwrap_err();
    match &err {
        Error::Connect(ConnectError::Tls(why)) => {
            assert!(why.contains("alert"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let (s, _) = p.api("GET", "/api/v1/devices/stranger-1", None).await;
    assert_eq!(s, 404, "nothing was provisioned");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_broker_is_a_tls_error() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let other = TestCa::new("Not the server CA");
    let opts = options(&p, &other.pem, &fleet.ca.issue("wary-1"));
    let err = publish_once(
        &opts,
        &Topic::Telemetry(DeviceId::parse("wary-1").unwrap()),
        b"{}",
        false,
        WAIT,
    )
    .await
    .unwrap_err();
    match err {
        Error::Connect(ConnectError::Tls(why)) => {
            assert_eq!(why, "invalid peer certificate: UnknownIssuer")
        }
        other => panic!("{other:?}"),
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payload_is_refused_before_connecting() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let id = DeviceId::parse("picky-1").unwrap();
    let opts = device_options(&p, &fleet.ca.issue(id.as_str()));
    let err = publish_once(&opts, &Topic::Telemetry(id), b"[1,2]", false, WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPayload(_)), "{err:?}");
    assert_eq!(p.app().control().metrics().connects, 0, "nothing connected");
    p.stop().await;
}

/// Two agents with one identity (the walk-through's second `device-client run` while the first
/// still runs): each connect takes the session from the other. The broker's MQTT 5 DISCONNECT
/// says 0x8E (session taken over, with its property list written out so that rumqttc reads
/// it); the agents say in plain words that another connection with this identity took the
/// session over, and back off longer after every takeover in a row, so they take the device
/// from each other a few times instead of in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_identity_name_the_takeover_and_back_off() {
    let p = Platform::sqlite().await;
    let fleet = p.jitp_fleet(json!({})).await;
    let id = "twin-001";
    let cert = fleet.ca.issue(id);
    let agent = || {
        let mut config = AgentConfig::new(device_options(&p, &cert));
        config.telemetry_interval = None;
        // The usual reconnect delay is short: without the takeover back-off the two agents
        // would take the session from each other several times a second.
        config.backoff.base = Duration::from_millis(50);
        config.backoff.cap = Duration::from_millis(200);
        config.backoff.takeover_base = Duration::from_millis(500);
        Agent::new(config)
    };
    let first = agent();
    let first_events = first.subscribe();
    let first = first.start().unwrap();
    first.wait_ready(WAIT).await.unwrap();

    let started = tokio::time::Instant::now();
    let second = agent();
    let second_events = second.subscribe();
    let second = second.start().unwrap();
    let takeover = |mut events: tokio::sync::broadcast::Receiver<AgentEvent>| async move {
        loop {
            match events.recv().await {
                Ok(AgentEvent::TakenOver(t)) => return t,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    };
    let (a, b) = tokio::time::timeout(WAIT, async {
        tokio::join!(takeover(first_events), takeover(second_events))
    })
    .await
    .expect("both agents tell that the session was taken over");
    for t in [a, b] {
        assert!(
            t.to_string().contains(
                "another connection using this device's identity took the session over; \
                 is a second agent running? Backing off: reconnecting in"
            ),
            "{t}"
        );
        assert!(t.wait >= Duration::from_millis(500), "{t:?}");
    }

    // Four seconds of the two running side by side. The first two closes of each get the
    // usual quick reconnect, then waits of 0.5, 1 and 2 s (plus up to a quarter): five or six
    // sessions each. Reconnecting after the usual 50-200 ms would make dozens.
    tokio::time::sleep_until(started + Duration::from_secs(4)).await;
    let (a, b) = (first.status(), second.status());
    assert!(
        a.takeovers + b.takeovers <= 8,
        "takeovers: {} and {}",
        a.takeovers,
        b.takeovers
    );
    // The broker agrees: few sessions, each ended by a takeover.
    let d = p.device(id).await;
    let sessions = d["sessions"].as_array().unwrap();
    assert!(sessions.len() <= 14, "{} sessions: {d}", sessions.len());
    let ended: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["ended_at"].is_string())
        .collect();
    assert!(ended.len() >= 2, "{d}");
    assert!(ended.iter().all(|s| s["end_reason"] == "takeover"), "{d}");
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    p.stop().await;
}
