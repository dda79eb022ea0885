//! The device side of the fleet platform: an MQTT 5 agent that other programs embed, the
//! `device-client` CLI built on it, and a small manufacturing PKI.
//!
//! Works against the fleet broker with mutual TLS (`mqtts://`, device id = certificate CN) and
//! against any MQTT broker over plain TCP with an optional user name and password (`mqtt://`).
//! Topic names come only from [`fleet_wire::Topic`].
//!
//! # Layout
//! - [`agent`]: [`Agent`] / [`AgentHandle`], the long-running device: subscriptions, telemetry,
//!   reported state, commands and their acks, reconnects, clean shutdown. The module docs
//!   describe its tasks and invariants.
//! - [`publish_once`]: connect, publish one QoS 1 message, wait for the PUBACK, disconnect.
//! - [`ConnectOptions`], [`BrokerUrl`], [`TlsConfig`], [`ClientIdentity`]: where the broker is
//!   and who the device is. `tls` is the only module naming rustls and x509-parser.
//! - `mqtt`: the only module naming rumqttc; maps its events and errors to this crate's.
//! - `backoff`, `buffer`, `outbox`, `dedup`: the pure pieces of the agent (reconnect delays
//!   with full jitter, the drop-oldest offline buffer, unacknowledged publishes, redelivered
//!   commands), each with table tests.
//! - [`update`]: the [`update::Updater`]: follows the cohort's desired release, verifies the
//!   signature, size and hash, installs through an [`update::Installer`], reports each step.
//! - [`release`]: Ed25519 release signing for operators (`device-client release keygen|sign`).
//! - [`pki`]: manufacturing CA, device and server certificates (rcgen, P-256).
//! - [`sim`]: the fleet simulator behind `device-client simulate` (connect storms, telemetry
//!   load with delivery measurement); its sessions come from `mqtt` like the agent's.
//! - [`error`]: errors by stage ([`ConfigError`], [`ConnectError`], [`Error`]).
//!
//! Only the binary installs a tracing subscriber; the library emits events with `device_id`.

pub mod agent;
mod backoff;
mod buffer;
mod dedup;
pub mod error;
mod mqtt;
mod options;
mod outbox;
pub mod pki;
mod publish;
pub mod release;
pub mod sim;
mod tls;
pub mod update;
mod url;

pub use agent::{
    Agent, AgentConfig, AgentEvent, AgentHandle, AgentSender, AgentStatus, CommandHandler,
    CommandOutcome,
};
pub use backoff::{BackoffConfig, Takeover};
pub use error::{ConfigError, ConnackRefusal, ConnectError, DisconnectCause, Error};
pub use options::{ConnectOptions, Credentials};
pub use publish::publish_once;
pub use tls::{ClientIdentity, TlsConfig};
pub use url::{BrokerUrl, Scheme};

/// The wire contract this client speaks, re-exported for embedding programs.
pub use fleet_wire;
