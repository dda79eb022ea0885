//! The platform with its conformance listener: anonymous MQTT over plain TCP on 127.0.0.1
//! port 0, any topic outside `devices/` and `cohorts/`, served by the broker's own session code
//! (tests/CONFORMANCE.md). Clients of both MQTT versions, with the settings every conformance
//! test starts from.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{Db, Platform};

impl Platform {
    /// Starts the platform on a fresh SQLite file with the conformance listener on.
    pub async fn with_conformance_listener() -> Platform {
        let tls = fleet_service::config::ServerTls::Dev { names: Vec::new() };
        Self::start_configured(Db::Sqlite, Default::default(), tls, true)
            .await
            .expect("sqlite always available")
    }

    /// The conformance listener's address; panics when it is off.
    pub fn conformance_addr(&self) -> SocketAddr {
        self.app()
            .conformance_addr()
            .expect("started with the conformance listener")
    }

    /// An MQTT 3.1.1 client of the conformance listener (clean session, 30 s keepalive).
    pub fn conformance_options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let addr = self.conformance_addr();
        let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// An MQTT 5 client of the conformance listener (clean start, 30 s keepalive).
    pub fn conformance_options_v5(&self, client_id: &str) -> rumqttc::v5::MqttOptions {
        let addr = self.conformance_addr();
        let mut o = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }
}
