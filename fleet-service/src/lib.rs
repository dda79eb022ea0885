//! The fleet platform in one process.
//!
//! # Layout
//! - [`app`]: builds and runs the whole platform (broker, intake, REST) from a [`config::Config`]
//!   on listeners it binds, and reports the addresses it really got; or, in a cluster, the
//!   part its role runs.
//! - [`cluster`]: the backbone (NATS JetStream) and the leases of a cluster of broker nodes and
//!   replicas.
//! - [`config`]: settings from flags and environment, with documented defaults.
//! - [`pki`]: the development PKI generated on first run.
//! - [`store`]: the only module that writes SQL (sqlx; SQLite or PostgreSQL).
//! - [`intake`]: consumes the broker's event bus in batches and commits device state.
//! - [`api`]: the REST bridge for operators (axum).
//! - [`ops`]: fleet operations, one method per change (store write, then a [`ops::Change`]
//!   every process applies by re-reading the database); the only writer of fleet state
//!   outside the connect path and the intake.
//! - [`keys`]: API keys: hashing, the in-memory cache the REST and MQTT service paths read.
//! - [`leader`]: singleton tasks across replicas, each run while its lease is held.
//! - [`nodes`]: broker node liveness: the node lease a broker renews (and the self-fencing
//!   signal when it cannot), and the reaper that declares dead nodes' devices offline.
//! - [`rollout`]: the rollout engine (staged waves, thresholds, rollback) and the pure policy
//!   it follows; the only publisher of the cohorts' desired releases.
//! - [`provisioning`]: the registry's writes on the connect path (JITP in group commits).
//! - [`security`]: turns bursts of refused connections into audit entries.

pub mod api;
pub mod app;
pub mod cluster;
pub mod config;
pub mod intake;
pub mod keys;
pub mod leader;
pub mod nodes;
pub mod ops;
pub mod pki;
pub mod provisioning;
pub mod rollout;
pub mod security;
pub mod store;
