//! The wire contract shared by the broker, the fleet service and the device client.
//!
//! `topics.md` at the repository root is the prose version of this crate; change both together.
//!
//! # Layout
//! - [`DeviceId`]: the validated device identity (certificate CN == MQTT client id == topic segment).
//! - [`Topic`]: every topic the platform names, parsed from and formatted to strings in one place;
//!   [`AppPath`]: the bounded levels of a device's application subtree `devices/{id}/app/...`.
//! - [`payload`]: the JSON payloads carried on those topics.
//! - [`update`]: software updates: the signed release manifest, the cohort's desired release,
//!   device progress reports, and the rollout rank that decides who is in a wave.
//!
//! Nothing here does I/O, so every part of the platform can depend on it without pulling a runtime.

pub mod payload;
mod topic;
pub mod update;

pub use topic::{
    app_filter_path, AppPath, AppPathError, CohortId, DeviceId, IdError, Topic, TopicError,
    MAX_APP_LEVELS, MAX_APP_LEVEL_LEN,
};
