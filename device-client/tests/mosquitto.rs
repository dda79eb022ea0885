//! The agent against the local Mosquitto (plain MQTT, anonymous). Skipped when nothing listens
//! on 127.0.0.1:1883.

mod common;

use std::time::Duration;

use common::{mosquitto, unique_id, Observer, Proxy, WAIT};
use device_client::fleet_wire::payload::{
    Command, CommandAck, CommandStatus, ReportedState, Telemetry,
};
use device_client::fleet_wire::Topic;
use device_client::{
    Agent, AgentConfig, AgentEvent, BackoffConfig, BrokerUrl, CommandOutcome, ConnectOptions,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

fn config(url: BrokerUrl, id: &device_client::fleet_wire::DeviceId) -> AgentConfig {
    let mut config = AgentConfig::new(ConnectOptions::new(url).with_client_id(id.clone()));
    config.backoff = BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(300),
        reset_after: Duration::from_secs(10),
        ..BackoffConfig::default()
    };
    config.connect.keep_alive = Duration::from_secs(5);
    config.drain_timeout = Duration::from_secs(3);
    config
}

fn recording_handler() -> (
    impl Fn(Command) -> std::future::Ready<CommandOutcome> + Send + Sync + 'static,
    mpsc::UnboundedReceiver<Command>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |command: Command| {
        if command.name == "panic" {
            panic!("handler asked to panic");
        }
        let outcome = if command.name == "fail" {
            CommandOutcome::failed("asked to fail")
        } else {
            CommandOutcome::succeeded()
        };
        let _ = tx.send(command);
        std::future::ready(outcome)
    };
    (handler, rx)
}

fn command(id: &str, name: &str) -> Vec<u8> {
    serde_json::to_vec(&Command {
        id: id.into(),
        name: name.into(),
        params: json!({"delay_s": 1}),
    })
    .unwrap()
}

fn ack_for(id: &str, topic: &Topic, payload: &[u8]) -> Option<CommandAck> {
    match topic {
        Topic::CommandAck(_) => serde_json::from_slice::<CommandAck>(payload)
            .ok()
            .filter(|a| a.id == id),
        _ => None,
    }
}

fn telemetry(topic: &Topic, payload: &[u8]) -> Option<Telemetry> {
    match topic {
        Topic::Telemetry(_) => {
            Some(serde_json::from_slice(payload).expect("telemetry is a JSON object"))
        }
        _ => None,
    }
}

#[tokio::test]
async fn commands_acks_telemetry_and_state() {
    let Some(url) = mosquitto().await else {
        return;
    };
    let id = unique_id("dc-it");
    let mut observer = Observer::connect(&[
        Topic::Telemetry(id.clone()),
        Topic::CommandAck(id.clone()),
        Topic::State(id.clone()),
    ])
    .await;

    let mut config = config(url, &id);
    config.telemetry_interval = Some(Duration::from_millis(200));
    config.firmware_version = Some("1.2.3".into());
    let (handler, mut commands) = recording_handler();
    let agent = Agent::new(config).on_command(handler).start().unwrap();
    let mut events = agent.subscribe();
    agent.wait_ready(WAIT).await.unwrap();

    // The retained state with the firmware version.
    let state = observer
        .expect("reported state", |t, p| match t {
            Topic::State(_) => Some(serde_json::from_slice::<ReportedState>(p).unwrap()),
            _ => None,
        })
        .await;
    assert_eq!(state.firmware_version.as_deref(), Some("1.2.3"));

    // Periodic telemetry: JSON objects with increasing sequence numbers.
    let first = observer.expect("telemetry", telemetry).await;
    let second = observer.expect("more telemetry", telemetry).await;
    assert!(
        second["seq"].as_u64() > first["seq"].as_u64(),
        "{first:?} then {second:?}"
    );

    // A command reaches the handler and is acknowledged with its outcome.
    observer
        .publish(
            &Topic::Commands(id.clone()),
            command("cmd-1", "reboot"),
            false,
        )
        .await;
    let got = tokio::time::timeout(WAIT, commands.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.id.as_str(), got.name.as_str()), ("cmd-1", "reboot"));
    assert_eq!(got.params, json!({"delay_s": 1}));
    let ack = observer
        .expect("ack of cmd-1", |t, p| ack_for("cmd-1", t, p))
        .await;
    assert_eq!(ack.status, CommandStatus::Succeeded);

    observer
        .publish(
            &Topic::Commands(id.clone()),
            command("cmd-2", "fail"),
            false,
        )
        .await;
    let ack = observer
        .expect("ack of cmd-2", |t, p| ack_for("cmd-2", t, p))
        .await;
    assert_eq!(
        (ack.status, ack.message.as_deref()),
        (CommandStatus::Failed, Some("asked to fail"))
    );
    assert_eq!(commands.recv().await.unwrap().id, "cmd-2");

    // A redelivered command runs once; its ack is repeated.
    observer
        .publish(
            &Topic::Commands(id.clone()),
            command("cmd-1", "reboot"),
            false,
        )
        .await;
    let ack = observer
        .expect("repeated ack of cmd-1", |t, p| ack_for("cmd-1", t, p))
        .await;
    assert_eq!(ack.status, CommandStatus::Succeeded);
    assert!(
        commands.try_recv().is_err(),
        "the handler ran cmd-1 only once"
    );

    // A panicking handler becomes a failed ack and the next command still runs.
    observer
        .publish(
            &Topic::Commands(id.clone()),
            command("cmd-p", "panic"),
            false,
        )
        .await;
    let ack = observer
        .expect("ack of cmd-p", |t, p| ack_for("cmd-p", t, p))
        .await;
    assert_eq!(
        (ack.status, ack.message.as_deref()),
        (CommandStatus::Failed, Some("command handler panicked"))
    );

    // A malformed command with an id is rejected, not passed to the handler.
    observer
        .publish(
            &Topic::Commands(id.clone()),
            br#"{"id":"cmd-3","nme":"typo"}"#.to_vec(),
            false,
        )
        .await;
    let ack = observer
        .expect("ack of cmd-3", |t, p| ack_for("cmd-3", t, p))
        .await;
    assert_eq!(ack.status, CommandStatus::Rejected);

    // A state change is published.
    let mut changed = ReportedState {
        firmware_version: Some("1.2.4".into()),
        ..ReportedState::default()
    };
    changed.other.insert("mode".into(), Value::from("eco"));
    agent.report_state(changed.clone()).await.unwrap();
    let state = observer
        .expect("changed state", |t, p| match t {
            Topic::State(_) => serde_json::from_slice::<ReportedState>(p)
                .ok()
                .filter(|s| *s == changed),
            _ => None,
        })
        .await;
    assert_eq!(state.other["mode"], "eco");

    let status = agent.shutdown().await.unwrap();
    assert!(status.stopped && !status.connected);
    assert!(status.telemetry_delivered >= 2, "{status:?}");
    assert_eq!(status.commands_received, 3);
    assert_eq!(status.acks_delivered, 5);
    assert_eq!(status.telemetry_dropped, 0);

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(seen.contains(&AgentEvent::Connected));
    assert!(seen.contains(&AgentEvent::Subscribed));
    assert!(seen
        .iter()
        .any(|e| matches!(e, AgentEvent::CommandReceived(c) if c.id == "cmd-1")));
    assert_eq!(seen.last(), Some(&AgentEvent::Stopped));

    // Leave no retained state behind.
    observer.publish(&Topic::State(id), Vec::new(), true).await;
}

#[tokio::test]
async fn cohort_updates_reach_the_embedding_program() {
    let Some(url) = mosquitto().await else {
        return;
    };
    let id = unique_id("dc-cohort");
    let cohort = device_client::fleet_wire::CohortId::parse(unique_id("cohort").as_str()).unwrap();
    let observer = Observer::connect(&[]).await;
    let mut config = config(url, &id);
    config.telemetry_interval = None;
    config.cohort = Some(cohort.clone());
    let agent = Agent::new(config).start().unwrap();
    let mut events = agent.subscribe();
    agent.wait_ready(WAIT).await.unwrap();

    observer
        .publish(
            &Topic::CohortUpdates(cohort.clone()),
            br#"{"firmware":"2.0.0"}"#.to_vec(),
            false,
        )
        .await;
    let update = tokio::time::timeout(WAIT, async {
        loop {
            if let AgentEvent::CohortUpdate { cohort, payload } = events.recv().await.unwrap() {
                return (cohort, payload);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(update, (cohort, json!({"firmware": "2.0.0"})));
    agent.shutdown().await.unwrap();
}

/// Cuts the connection under the agent: it reconnects, subscribes again, and delivers what it
/// buffered offline, dropping the oldest beyond the buffer's capacity.
#[tokio::test]
async fn reconnects_resubscribes_and_flushes_the_offline_buffer() {
    let Some(_) = mosquitto().await else {
        return;
    };
    let proxy = Proxy::start().await;
    let id = unique_id("dc-reconnect");
    let mut observer =
        Observer::connect(&[Topic::Telemetry(id.clone()), Topic::CommandAck(id.clone())]).await;

    let mut config = config(proxy.url(), &id);
    config.telemetry_interval = None;
    config.offline_buffer = 3;
    let (handler, mut commands) = recording_handler();
    let agent = Agent::new(config).on_command(handler).start().unwrap();
    agent.wait_ready(WAIT).await.unwrap();

    let n = |t: &Telemetry| t["n"].as_u64().unwrap();
    let msg = |i: u64| {
        let mut t = Telemetry::new();
        t.insert("n".into(), i.into());
        t
    };
    agent.publish_telemetry(msg(0)).await.unwrap();
    assert_eq!(n(&observer.expect("online telemetry", telemetry).await), 0);

    proxy.cut();
    let mut status = agent.watch_status();
    tokio::time::timeout(WAIT, status.wait_for(|s| !s.connected))
        .await
        .unwrap()
        .unwrap();
    for i in 1..=5 {
        agent.publish_telemetry(msg(i)).await.unwrap();
    }
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.telemetry_buffered == 3 && s.telemetry_dropped == 2),
    )
    .await
    .unwrap()
    .unwrap();

    proxy.restore();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.connections >= 2))
        .await
        .unwrap()
        .unwrap();
    agent.wait_ready(WAIT).await.unwrap();
    let mut delivered = Vec::new();
    for _ in 0..3 {
        delivered.push(n(&observer.expect("buffered telemetry", telemetry).await));
    }
    assert_eq!(delivered, [3, 4, 5], "oldest dropped, order kept");

    // Subscribed again on the new session.
    observer
        .publish(
            &Topic::Commands(id.clone()),
            command("after-reconnect", "ping"),
            false,
        )
        .await;
    let got = tokio::time::timeout(WAIT, commands.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, "after-reconnect");
    observer
        .expect("ack after reconnect", |t, p| {
            ack_for("after-reconnect", t, p)
        })
        .await;

    let status = agent.shutdown().await.unwrap();
    assert_eq!(status.telemetry_delivered, 4);
    assert_eq!(status.telemetry_dropped, 2);
    assert_eq!(status.telemetry_buffered, 0);
}

/// With `stop_after_telemetry` the agent stops by itself once that many were acknowledged.
#[tokio::test]
async fn stops_after_count() {
    let Some(url) = mosquitto().await else {
        return;
    };
    let id = unique_id("dc-count");
    let mut config = config(url, &id);
    config.telemetry_interval = Some(Duration::from_millis(50));
    config.stop_after_telemetry = Some(3);
    let agent = Agent::new(config).start().unwrap();
    tokio::time::timeout(WAIT, agent.stopped()).await.unwrap();
    let status = agent.shutdown().await.unwrap();
    assert_eq!(status.telemetry_delivered, 3);
    assert_eq!(status.telemetry_buffered, 0);
}

/// A dead broker address: the agent keeps retrying and reports why; shutdown still returns.
#[tokio::test]
async fn unreachable_broker_reports_and_shuts_down() {
    common::init_logging();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url: BrokerUrl = format!("mqtt://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    drop(listener);
    let id = unique_id("dc-dead");
    let agent = Agent::new(config(url, &id)).start().unwrap();
    let err = agent
        .wait_ready(Duration::from_millis(700))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("last error: network"), "{err}");
    let status = tokio::time::timeout(WAIT, agent.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert!(status.stopped);
    assert_eq!(status.connections, 0);
    assert_eq!(
        status.telemetry_buffered, 1,
        "the first telemetry waits in the buffer"
    );
}
