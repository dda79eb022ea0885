//! Mutual TLS against an in-process broker that verifies client certificates with rustls'
//! `WebPkiClientVerifier`: identity from the certificate CN, the agent's whole session, and
//! the errors of `publish_once`.

mod common;

use std::time::Duration;

use common::{unique_id, FakeBrokerConfig, FakeTlsBroker, Seen, WAIT};
use device_client::fleet_wire::payload::ReportedState;
use device_client::fleet_wire::Topic;
use device_client::pki::{Ca, CaOptions, DeviceCertOptions};
use device_client::{
    publish_once, Agent, AgentConfig, ClientIdentity, ConnackRefusal, ConnectError, ConnectOptions,
    Error, TlsConfig,
};

const ACCEPT: FakeBrokerConfig = FakeBrokerConfig { connack_code: 0 };

fn options(broker: &FakeTlsBroker, cert_pem: &str, key_pem: &str) -> ConnectOptions {
    let tls = TlsConfig::from_ca_pem(broker.server_ca.cert_pem().as_bytes())
        .unwrap()
        .with_identity(ClientIdentity::from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap());
    ConnectOptions::new(broker.url()).with_tls(tls)
}

#[tokio::test]
async fn agent_session_over_mutual_tls() {
    let mut broker = FakeTlsBroker::start(ACCEPT).await;
    let id = unique_id("tls-dev");
    let dev = broker.device(&id);
    let mut config = AgentConfig::new(options(&broker, &dev.cert_pem, &dev.key_pem));
    config.telemetry_interval = Some(Duration::from_millis(100));
    config.firmware_version = Some("9.9.9".into());
    let agent = Agent::new(config).start().unwrap();
    assert_eq!(
        agent.device_id(),
        &id,
        "device id comes from the certificate CN"
    );
    agent.wait_ready(WAIT).await.unwrap();

    let cn = broker
        .expect("handshake", |s| match s {
            Seen::Handshake { peer_cn } => Some(peer_cn.clone()),
            _ => None,
        })
        .await;
    assert_eq!(cn.as_deref(), Some(id.as_str()));
    let client_id = broker
        .expect("CONNECT", |s| match s {
            Seen::Connect { client_id } => Some(client_id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(client_id, id.as_str());
    let filters = broker
        .expect("SUBSCRIBE", |s| match s {
            Seen::Subscribe { filters } => Some(filters.clone()),
            _ => None,
        })
        .await;
    assert_eq!(filters, [Topic::Commands(id.clone()).to_string()]);

    let state_topic = Topic::State(id.clone()).to_string();
    let (state, retain) = broker
        .expect("state", |s| match s {
            Seen::Publish {
                topic,
                payload,
                retain,
            } if *topic == state_topic => Some((
                serde_json::from_slice::<ReportedState>(payload).unwrap(),
                *retain,
            )),
            _ => None,
        })
        .await;
    assert!(retain, "reported state is retained");
    assert_eq!(state.firmware_version.as_deref(), Some("9.9.9"));
    let telemetry_topic = Topic::Telemetry(id.clone()).to_string();
    broker
        .expect("telemetry", |s| match s {
            Seen::Publish {
                topic,
                retain: false,
                ..
            } if *topic == telemetry_topic => Some(()),
            _ => None,
        })
        .await;

    let status = agent.shutdown().await.unwrap();
    assert!(status.telemetry_delivered >= 1);
    broker
        .expect("DISCONNECT on shutdown", |s| {
            (*s == Seen::Disconnect).then_some(())
        })
        .await;
}

/// Embedding programs can implement the handler trait on their own types.
struct Rejecting;

impl device_client::CommandHandler for Rejecting {
    async fn handle(
        &self,
        command: device_client::fleet_wire::payload::Command,
    ) -> device_client::CommandOutcome {
        device_client::CommandOutcome::rejected(format!("{} is not supported", command.name))
    }
}

#[tokio::test]
async fn handler_trait_on_a_struct() {
    let broker = FakeTlsBroker::start(ACCEPT).await;
    let id = unique_id("tls-handler");
    let dev = broker.device(&id);
    let mut config = AgentConfig::new(options(&broker, &dev.cert_pem, &dev.key_pem));
    config.telemetry_interval = None;
    let agent = Agent::new(config).on_command(Rejecting).start().unwrap();
    agent.wait_ready(WAIT).await.unwrap();
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn publish_once_over_mutual_tls() {
    let mut broker = FakeTlsBroker::start(ACCEPT).await;
    let id = unique_id("tls-pub");
    let dev = broker.device(&id);
    let opts = options(&broker, &dev.cert_pem, &dev.key_pem);
    let topic = Topic::Telemetry(id.clone());
    publish_once(&opts, &topic, br#"{"t":1}"#, false, WAIT)
        .await
        .unwrap();
    let payload = broker
        .expect("PUBLISH", |s| match s {
            Seen::Publish {
                topic: t, payload, ..
            } if *t == topic.to_string() => Some(payload.clone()),
            _ => None,
        })
        .await;
    assert_eq!(payload, br#"{"t":1}"#);
    broker
        .expect("DISCONNECT", |s| (*s == Seen::Disconnect).then_some(()))
        .await;
}

#[tokio::test]
async fn connack_refusal_is_reported() {
    let broker = FakeTlsBroker::start(FakeBrokerConfig { connack_code: 5 }).await;
    let id = unique_id("tls-refused");
    let dev = broker.device(&id);
    let opts = options(&broker, &dev.cert_pem, &dev.key_pem);
    let err = publish_once(&opts, &Topic::Telemetry(id), b"{}", false, WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect(ConnectError::Refused(ConnackRefusal::NotAuthorized))
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "broker refused the connection: not authorized (CONNACK return code 5)"
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_a_tls_error() {
    let mut broker = FakeTlsBroker::start(ACCEPT).await;
    let id = unique_id("tls-stranger");
    let stranger = Ca::generate(&CaOptions {
        common_name: "Stranger CA".into(),
        ..CaOptions::default()
    })
    .unwrap()
    .issue_device(&DeviceCertOptions::new(id.clone()))
    .unwrap();
    let opts = options(&broker, &stranger.cert_pem, &stranger.key_pem);
    let err = publish_once(&opts, &Topic::Telemetry(id), b"{}", false, WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect(ConnectError::Tls(_))),
        "{err:?}"
    );
    let why = broker
        .expect("failed handshake", |s| match s {
            Seen::HandshakeFailed(why) => Some(why.clone()),
            _ => None,
        })
        .await;
    assert!(why.contains("UnknownIssuer"), "{why}");
}

#[tokio::test]
async fn untrusted_broker_is_a_tls_error() {
    let broker = FakeTlsBroker::start(ACCEPT).await;
    let id = unique_id("tls-untrusted");
    let dev = broker.device(&id);
    let other_ca = Ca::generate(&CaOptions::default()).unwrap();
    let tls = TlsConfig::from_ca_pem(other_ca.cert_pem().as_bytes())
        .unwrap()
        .with_identity(
            ClientIdentity::from_pem(dev.cert_pem.as_bytes(), dev.key_pem.as_bytes()).unwrap(),
        );
    let opts = ConnectOptions::new(broker.url()).with_tls(tls);
    let err = publish_once(&opts, &Topic::Telemetry(id), b"{}", false, WAIT)
        .await
        .unwrap_err();
    match err {
        Error::Connect(ConnectError::Tls(why)) => assert!(why.contains("UnknownIssuer"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn invalid_payload_is_refused_before_connecting() {
    let broker = FakeTlsBroker::start(ACCEPT).await;
    let id = unique_id("tls-payload");
    let dev = broker.device(&id);
    let opts = options(&broker, &dev.cert_pem, &dev.key_pem);
    let err = publish_once(&opts, &Topic::Telemetry(id), b"[1,2]", false, WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPayload(_)), "{err:?}");
}
