//! Application messages across broker nodes: a device on node 1 and a backend service on
//! node 2 exchange binary messages both ways (live, over core NATS, as commands travel), the
//! device provisioned on node 1 a moment before it publishes. A few seconds (three processes
//! and a nats-server), so it runs apart from the long kill test in `cluster.rs`.
//!
//! Needs `FLEET_TEST_POSTGRES_URL` and a nats-server binary; says it was skipped otherwise.

use e2e::cluster::Cluster;
use e2e::{eventually, Client};
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use serde_json::json;

/// Bytes that are not UTF-8, NUL and 0xFF among them.
const UP: &[u8] = &[0xa1, 0x00, 0xff, 0x01, 0xfe, 0x00];
const DOWN: &[u8] = &[0xa1, 0xff, 0x00, 0x02, 0x80, 0xff];

async fn subscribe(c: &mut Client, filter: &str) {
    c.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let code = c
        .wait_for(|p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes[0]),
            _ => None,
        })
        .await;
    assert_eq!(
        code,
        SubscribeReasonCode::Success(QoS::AtLeastOnce),
        "{filter}"
    );
}

async fn next_on(c: &mut Client, topic: &str) -> Vec<u8> {
    c.wait_for(|p| match p {
        Packet::Publish(m) if m.topic == topic => Some(m.payload.to_vec()),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_messages_cross_broker_nodes_both_ways() {
    e2e::init_logs();
    let Some(cluster) = Cluster::start(2, 1, "").await else {
        return;
    };
    let rest = cluster.rest(0);
    let fleet = rest.jitp_fleet(json!({})).await;
    let key = rest.key_as(&rest.admin, "operator", json!({})).await;

    // The key reaches node 2 through the change stream: until then the node refuses it.
    let mut svc = eventually("the service connects to node 2", || {
        let o = cluster.service_options(1, "app-backend", &key);
        async move { Client::connect(o).await.ok() }
    })
    .await;
    subscribe(&mut svc, "devices/+/app/#").await;
    let mut dev = Client::connect(cluster.device_options(0, &fleet.ca.issue("cl-app"), "cl-app"))
        .await
        .expect("the device connects to node 1");
    subscribe(&mut dev, "devices/cl-app/app/down").await;

    dev.client
        .publish("devices/cl-app/app/up", QoS::AtLeastOnce, false, UP)
        .await
        .unwrap();
    assert_eq!(next_on(&mut svc, "devices/cl-app/app/up").await, UP);

    svc.client
        .publish("devices/cl-app/app/down", QoS::AtLeastOnce, false, DOWN)
        .await
        .unwrap();
    assert_eq!(next_on(&mut dev, "devices/cl-app/app/down").await, DOWN);
}
