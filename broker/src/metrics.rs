//! Counters the broker keeps about itself: rejections by reason, sessions, provisioning, the
//! event bus (accepted, pending, retried, backbone unavailable), and what the router may have
//! lost. Plain atomics: cheap enough for every connect and publish.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// Why a connection, subscription or publish was refused. Each is counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("TLS handshake failed or timed out")]
    TlsHandshake,
    #[error("certificate could not be parsed")]
    BadCertificate,
    #[error("certificate is not signed by a registered CA")]
    UnknownCa,
    #[error("certificate's CA is disabled")]
    DisabledCa,
    #[error("certificate's CA has expired and provisions no new devices")]
    CaExpired,
    #[error("certificate has expired")]
    CertificateExpired,
    #[error("certificate is not valid yet")]
    CertificateNotYetValid,
    #[error("certificate CN is not a valid device id")]
    BadCommonName,
    #[error("certificate subject names more than one CN, so it names no one device")]
    AmbiguousCommonName,
    #[error("certificate is signed by a key that CAs of several organizations hold")]
    AmbiguousIssuer,
    #[error("MQTT client id does not match the certificate's device id")]
    ClientIdMismatch,
    #[error("device id is owned by a device of another CA")]
    IdentityCollision,
    #[error("device is not registered and its CA does not provision devices")]
    NotProvisioned,
    #[error("just-in-time provisioning failed")]
    ProvisioningFailed,
    #[error("bad username or password")]
    BadCredentials,
    #[error("no CONNECT packet in time, or a malformed one")]
    BadConnect,
    #[error("topic is forbidden for this client")]
    ForbiddenTopic,
    #[error("payload does not match the topic's schema")]
    BadPayload,
    #[error("device is quarantined and its connections are refused")]
    Quarantined,
    #[error("device is pinned to another certificate")]
    PinMismatch,
    #[error("certificate is revoked")]
    CertificateRevoked,
    #[error("the node holds as many connections as it is configured to; try again later")]
    ConnectionLimit,
    #[error("the node takes no more new connections this second; try again later")]
    ConnectRateExceeded,
    #[error(
        "the node lost its place in the cluster and takes no devices; connect to another node"
    )]
    NodeFenced,
    #[error("malformed packet or protocol violation")]
    MalformedPacket,
    #[error("over a per-client limit (packet size, properties, Receive Maximum)")]
    OverLimit,
}

impl Rejection {
    pub const ALL: [Rejection; 26] = [
        Rejection::TlsHandshake,
        Rejection::BadCertificate,
        Rejection::UnknownCa,
        Rejection::DisabledCa,
        Rejection::CaExpired,
        Rejection::CertificateExpired,
        Rejection::CertificateNotYetValid,
        Rejection::BadCommonName,
        Rejection::AmbiguousCommonName,
        Rejection::AmbiguousIssuer,
        Rejection::ClientIdMismatch,
        Rejection::IdentityCollision,
        Rejection::NotProvisioned,
        Rejection::ProvisioningFailed,
        Rejection::BadCredentials,
        Rejection::BadConnect,
        Rejection::ForbiddenTopic,
        Rejection::BadPayload,
        Rejection::Quarantined,
        Rejection::PinMismatch,
        Rejection::CertificateRevoked,
        Rejection::MalformedPacket,
        Rejection::OverLimit,
        Rejection::ConnectionLimit,
        Rejection::ConnectRateExceeded,
        Rejection::NodeFenced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::TlsHandshake => "tls_handshake",
            Rejection::BadCertificate => "bad_certificate",
            Rejection::UnknownCa => "unknown_ca",
            Rejection::DisabledCa => "disabled_ca",
            Rejection::CaExpired => "ca_expired",
            Rejection::CertificateExpired => "certificate_expired",
            Rejection::CertificateNotYetValid => "certificate_not_yet_valid",
            Rejection::BadCommonName => "bad_common_name",
            Rejection::AmbiguousCommonName => "ambiguous_common_name",
            Rejection::AmbiguousIssuer => "ambiguous_issuer",
            Rejection::ClientIdMismatch => "client_id_mismatch",
            Rejection::IdentityCollision => "identity_collision",
            Rejection::NotProvisioned => "not_provisioned",
            Rejection::ProvisioningFailed => "provisioning_failed",
            Rejection::BadCredentials => "bad_credentials",
            Rejection::BadConnect => "bad_connect",
            Rejection::ForbiddenTopic => "forbidden_topic",
            Rejection::BadPayload => "bad_payload",
            Rejection::Quarantined => "quarantined",
            Rejection::PinMismatch => "pin_mismatch",
            Rejection::CertificateRevoked => "certificate_revoked",
            Rejection::ConnectionLimit => "connection_limit",
            Rejection::ConnectRateExceeded => "connect_rate_exceeded",
            Rejection::NodeFenced => "node_fenced",
            Rejection::MalformedPacket => "malformed_packet",
            Rejection::OverLimit => "over_limit",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    rejections: [AtomicU64; Rejection::ALL.len()],
    sessions_open: AtomicI64,
    connects: AtomicU64,
    jitp_provisioned: AtomicU64,
    publishes_in: AtomicU64,
    bus_events: AtomicU64,
    bus_failures: AtomicU64,
    bus_pending: AtomicI64,
    bus_publish_retries: AtomicU64,
    /// Unix milliseconds since when the bus backbone is unavailable; 0 while it is available.
    bus_unavailable_since_ms: AtomicI64,
    takeovers: AtomicU64,
}

/// A point-in-time copy of [`Metrics`], serialisable for the REST bridge.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsSnapshot {
    pub sessions_open: i64,
    pub connects: u64,
    pub jitp_provisioned: u64,
    pub publishes_in: u64,
    pub bus_events: u64,
    pub bus_failures: u64,
    /// Events handed to the bus and not yet accepted by it (waiting for room, or retrying):
    /// their PUBACKs are held back. Always 0 on the embedded bus.
    pub bus_pending: i64,
    /// Publish attempts to the bus backbone that failed and were retried (unreachable, timed
    /// out, stream full).
    pub bus_publish_retries: u64,
    /// The bus backbone is unreachable or refuses events; publishes wait and retry meanwhile.
    pub bus_unavailable: bool,
    /// Since when (Unix milliseconds) it is unavailable, when it is.
    pub bus_unavailable_since_ms: Option<i64>,
    pub takeovers: u64,
    /// Times the router skipped a slow MQTT subscriber past messages it had not read (needs
    /// [`crate::RouterLossLayer`] installed). The fleet service's own intake never reads from
    /// the router, so this concerns backend MQTT subscribers only.
    pub router_subscriber_skips: u64,
    /// Distinct topic filters the router holds: every publish is matched against these. Only
    /// backend services' filters (devices' subscriptions are served by the node, not the
    /// router), so it does not grow as devices connect.
    pub router_filters: u64,
    /// Retained messages the node holds (presence, state, assignments, cohort updates).
    pub retained_messages: u64,
    /// Devices with an inbox (what they subscribed, and messages queued for them): connected,
    /// or away with a persistent session.
    pub device_inboxes: u64,
    /// Messages queued to device inboxes since start (each device a message reached counts).
    pub inbox_messages: u64,
    /// Messages dropped because a device's inbox was full (`max_queued_messages`,
    /// `max_queued_bytes`).
    pub inbox_dropped: u64,
    pub rejections: std::collections::BTreeMap<&'static str, u64>,
}

impl Metrics {
    pub fn reject(&self, r: Rejection) {
        let i = Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejections[i].fetch_add(1, Ordering::Relaxed);
    }
    pub fn rejections(&self, r: Rejection) -> u64 {
        let i = Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejections[i].load(Ordering::Relaxed)
    }
    pub fn session_opened(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.sessions_open.fetch_add(1, Ordering::Relaxed);
    }
    pub fn session_closed(&self) {
        self.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn jitp_provisioned(&self) {
        self.jitp_provisioned.fetch_add(1, Ordering::Relaxed);
    }
    pub fn publish_in(&self) {
        self.publishes_in.fetch_add(1, Ordering::Relaxed);
    }
    pub fn bus_event(&self, ok: bool) {
        if ok {
            self.bus_events.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bus_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// An event entered (`+1`) or left (`-1`) the bus's publish path.
    pub fn bus_pending_add(&self, n: i64) {
        self.bus_pending.fetch_add(n, Ordering::Relaxed);
    }
    pub fn bus_pending(&self) -> i64 {
        self.bus_pending.load(Ordering::Relaxed)
    }
    pub fn bus_publish_retry(&self) {
        self.bus_publish_retries.fetch_add(1, Ordering::Relaxed);
    }
    /// Marks the bus backbone unavailable from `now_ms` on; true if it was available until now.
    pub fn bus_unavailable(&self, now_ms: i64) -> bool {
        self.bus_unavailable_since_ms
            .compare_exchange(0, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
    /// Marks the bus backbone available; returns since when it was not, if it was not.
    pub fn bus_available(&self) -> Option<i64> {
        if self.bus_unavailable_since_ms.load(Ordering::Relaxed) == 0 {
            return None;
        }
        match self.bus_unavailable_since_ms.swap(0, Ordering::Relaxed) {
            0 => None,
            since => Some(since),
        }
    }
    pub fn takeover(&self) {
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let unavailable_since = self.bus_unavailable_since_ms.load(Ordering::Relaxed);
        MetricsSnapshot {
            sessions_open: self.sessions_open.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            jitp_provisioned: self.jitp_provisioned.load(Ordering::Relaxed),
            publishes_in: self.publishes_in.load(Ordering::Relaxed),
            bus_events: self.bus_events.load(Ordering::Relaxed),
            bus_failures: self.bus_failures.load(Ordering::Relaxed),
            bus_pending: self.bus_pending.load(Ordering::Relaxed),
            bus_publish_retries: self.bus_publish_retries.load(Ordering::Relaxed),
            bus_unavailable: unavailable_since != 0,
            bus_unavailable_since_ms: (unavailable_since != 0).then_some(unavailable_since),
            takeovers: self.takeovers.load(Ordering::Relaxed),
            router_subscriber_skips: crate::router::subscriber_skips(),
            router_filters: 0,
            retained_messages: 0,
            device_inboxes: 0,
            inbox_messages: 0,
            inbox_dropped: 0,
            rejections: Rejection::ALL
                .iter()
                .map(|r| (r.as_str(), self.rejections(*r)))
                .collect(),
        }
    }
}
