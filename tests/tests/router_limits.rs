//! The router's own limits, as the platform exposes them.

use std::time::Duration;

use e2e::{Client, Db, Platform};
use rumqttc::{Event, Packet, QoS};
use serde_json::json;

/// A backend subscriber that stalls while a filter's commit log rolls over loses messages: the
/// router skips it ahead. The loss is counted in the broker's metrics, and the fleet service's
/// own intake, which never reads from the router, still stores every acknowledged message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_loses_messages_visibly_and_the_intake_loses_none() {
    let mut tuning = fleet_service::config::Tuning::default();
    tuning.broker.router.max_segment_size = 16 * 1024;
    tuning.broker.router.max_segment_count = 2;
    let p = Platform::start_tuned(Db::Sqlite, tuning).await.unwrap();
    let fleet = p.jitp_fleet(json!({})).await;
    const N: usize = 1500;

    let (slow, mut slow_loop) =
        rumqttc::AsyncClient::new(p.service_options("stalled", p.app().admin_token()), 10);
    slow.subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = slow_loop.poll().await.unwrap() {
            break;
        }
    }
    let skips_before = p.app().control().metrics().router_subscriber_skips;

    let mut d = Client::connect(p.device_options(&fleet.ca.issue("chatty"), "chatty"))
        .await
        .unwrap();
    let pad = "x".repeat(1000);
    for n in 0..N {
        d.client
            .publish(
                "devices/chatty/telemetry",
                QoS::AtLeastOnce,
                false,
                json!({ "n": n, "pad": pad }).to_string(),
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
    let id = fleet_wire::DeviceId::parse("chatty").unwrap();
    assert_eq!(
        p.app().store().telemetry_count(&id).await.unwrap(),
        N as u64
    );

    // The subscriber wakes up and reads what the router still has for it.
    let mut received = 0usize;
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(1), slow_loop.poll()).await {
        if let Event::Incoming(Packet::Publish(_)) = event {
            received += 1;
        }
    }
    let skips = p.app().control().metrics().router_subscriber_skips - skips_before;
    assert!(
        received < N,
        "expected the stalled subscriber to lose messages"
    );
    assert!(
        skips > 0,
        "the loss ({} of {N}) was not counted",
        N - received
    );
    drop(slow);
    p.stop().await;
}
