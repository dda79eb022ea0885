//! The node's connection budgets: over its connection limit or its rate of new connections, a
//! client is told to come back later in its CONNACK, with the code its MQTT version has for it,
//! and the refusal is counted.

use e2e::{eventually, Client, Client5, Db, Platform};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
use rumqttc::{ConnectReturnCode, ConnectionError};
use serde_json::json;

fn refused311(r: Result<Client, ConnectionError>) -> ConnectReturnCode {
    match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("refused without a CONNACK: {e:?}"),
        Ok(_) => panic!("connection was accepted"),
    }
}

fn refused5(r: Result<Client5, rumqttc::v5::ConnectionError>) -> Code5 {
    match r {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("refused without a CONNACK: {e:?}"),
        Ok(_) => panic!("connection was accepted"),
    }
}

async fn platform(tune: impl FnOnce(&mut fleet_service::config::Tuning)) -> Platform {
    let mut tuning = fleet_service::config::Tuning::default();
    tune(&mut tuning);
    Platform::start_tuned(Db::Sqlite, tuning).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_told_the_quota_is_exceeded() {
    let p = platform(|t| t.broker.max_connections = 2).await;
    let fleet = p.jitp_fleet(json!({})).await;
    let admin = p.app().admin_token().to_owned();
    let service = Client::connect(p.service_options("watcher", &admin))
        .await
        .unwrap();
    let first = Client::connect(p.device_options(&fleet.ca.issue("cap-1"), "cap-1"))
        .await
        .unwrap();

    let cert = fleet.ca.issue("cap-2");
    assert_eq!(
        refused311(Client::connect(p.device_options(&cert, "cap-2")).await),
        ConnectReturnCode::ServiceUnavailable
    );
    assert_eq!(
        refused5(Client5::connect(p.device_options_v5(&cert, "cap-2")).await),
        Code5::QuotaExceeded
    );
    assert_eq!(
        refused311(Client::connect(p.service_options("second", &admin)).await),
        ConnectReturnCode::ServiceUnavailable,
        "services count too"
    );
    assert_eq!(
        p.app().control().metrics().rejections["connection_limit"],
        3
    );
    let (s, _) = p.api("GET", "/api/v1/devices/cap-2", None).await;
    assert_eq!(s, 404, "a refused connection provisions nothing");

    // A connection that ends frees its place.
    first.kill().await;
    eventually("a place frees up", || async {
        Client::connect(p.device_options(&cert, "cap-2")).await.ok()
    })
    .await;
    service.kill().await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_rate_are_told_the_server_is_busy() {
    let p = platform(|t| {
        // Two connections, then (practically) no refill during the test.
        t.broker.connect_rate_per_s = 0.001;
        t.broker.connect_burst = 2.0;
    })
    .await;
    let fleet = p.jitp_fleet(json!({})).await;
    let mut held = Vec::new();
    for id in ["rate-1", "rate-2"] {
        held.push(
            Client::connect(p.device_options(&fleet.ca.issue(id), id))
                .await
                .unwrap(),
        );
    }
    let cert = fleet.ca.issue("rate-3");
    assert_eq!(
        refused311(Client::connect(p.device_options(&cert, "rate-3")).await),
        ConnectReturnCode::ServiceUnavailable
    );
    assert_eq!(
        refused5(Client5::connect(p.device_options_v5(&cert, "rate-3")).await),
        Code5::ServerBusy
    );
    assert_eq!(
        p.app().control().metrics().rejections["connect_rate_exceeded"],
        2
    );
    // The connections already made are untouched.
    assert_eq!(p.device("rate-1").await["online"], true);
    for c in held {
        c.kill().await;
    }
    p.stop().await;
}
