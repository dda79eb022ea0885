//! The broker: the platform's MQTT edge.
//!
//! # Layout
//! - [`admission`]: the node's connection and connection-rate budgets.
//! - [`server`]: binds nothing itself; takes listeners, accepts, runs the TLS handshake of each
//!   connection on its own task with a timeout, and hands the stream to a session.
//! - `tls`: the rustls server config and the client-certificate verifier over a CA set that
//!   changes at run time.
//! - `session`: one MQTT 3.1.1/5 session per connection, driving a rumqttd local link, enforcing
//!   topic rights, holding PUBACKs until the event bus has the event, publishing presence.
//! - `mqtt`: framing and codec choice per connection; `mqtt::validate` checks every frame
//!   (flags, reserved bits, MQTT 5 property rules and bounds) before the codec decodes it.
//! - `router`: the only module that names rumqttd.
//! - `local`: what the node delivers itself, beside the router: `retained` messages (a topic
//!   trie) and `inbox`es of messages addressed to one device.
//! - `forward`: what a linked client (service, conformance client) gets of what the router
//!   forwards: the QoS, RETAIN and No Local rules rumqttd does not apply, topic aliases.
//! - [`acl`]: topic rights for devices, backend services and conformance clients.
//! - [`registry`]: the in-memory CA and device cache the connect path reads, and JITP.
//! - [`bus`]: the seam to the fleet service (durable event intake).
//! - [`cluster`]: a node's link to the other broker nodes over NATS (live messages, retained
//!   messages, takeovers across nodes).
//! - [`auth`]: API keys on the service listener.
//! - [`metrics`]: counters, rejections by reason.
//! - [`rejections`]: the most recent refused connections, for operators.
//! - `fuzzing` (hidden): the frame reader and the certificate reader, for the fuzz targets in
//!   `fuzz/`.

pub mod acl;
pub mod admission;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod control;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod inbox;
mod local;
pub mod metrics;
mod mqtt;
pub mod registry;
pub mod rejections;
mod retained;
mod router;
mod server;
mod session;
pub mod tls;

pub use control::BrokerControl;
pub use router::{RouterLossLayer, RouterSettings};
pub use server::{Broker, BrokerConfig, BrokerError, ConformanceConfig};
pub use tls::ServerIdentity;
