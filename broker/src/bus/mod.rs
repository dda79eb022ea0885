//! The event bus: the one seam between the broker's sessions and the fleet service's intake.
//!
//! The broker publishes every event the fleet service must not lose (telemetry, reported state,
//! command acks, presence) with [`EventBus::publish`], and answers the device (PUBACK, CONNACK)
//! only once the returned future resolves `Ok`: the bus has durably accepted the event. The
//! fleet service pulls batches with [`EventSource::recv_batch`], commits them, and then acks each
//! [`Delivery`].
//!
//! Two implementations:
//! - [`embedded`]: the single-node bus, a bounded channel whose "durable" point is the
//!   consumer's database commit. A full channel makes `publish` wait (PUBACKs are held back);
//!   it never drops.
//! - [`jetstream`]: NATS JetStream, for a cluster of broker nodes and fleet-service replicas.
//!   `publish` resolves on the stream's ack (the event is stored; the intake commits it later),
//!   and deliveries ack back to a durable consumer the replicas share.
//!
//! # Invariants
//! - `publish` never resolves `Ok` before the event is durable by the implementation's measure,
//!   and never drops an event: while the bus cannot take it, the future waits.
//! - Every event carries an [`BusMessage::id`] that is the same when the same event is
//!   published again (a device resending after its node crashed); a bus with deduplication
//!   stores it once. Consumers must still be idempotent: a delivery may come twice.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

mod embedded;
pub mod jetstream;

pub use embedded::{embedded, EmbeddedBus, EmbeddedSource};

/// One event on the bus. `topic` is the MQTT topic name from the wire contract.
#[derive(Debug, Clone, Default)]
pub struct BusMessage {
    pub topic: String,
    pub payload: Bytes,
    /// Session epoch of the device that produced it (0 when not from a device session).
    pub epoch: u64,
    /// Per-session sequence number; with `epoch` and the device id it makes the event's
    /// idempotency key, so a redelivery changes nothing.
    pub seq: u64,
    /// When the broker received it, Unix milliseconds.
    pub received_at_ms: i64,
    /// The broker node that received it (holds the device's session). Empty when the producer
    /// does not know; a bus that knows its node (see [`jetstream::JetStreamConfig::node`])
    /// fills it in, and a consumer falls back to its own notion of the node.
    pub node: Arc<str>,
    /// The event's deduplication id, made by the functions of [`event_id`]: the same event
    /// published twice has the same id. Empty means "no id"; a bus then makes one per publish,
    /// so at least its own retries are deduplicated.
    pub id: String,
}

/// Deduplication ids of events, one function per kind of event.
///
/// A device's QoS 1/2 publish is named by what the device itself repeats when it publishes it
/// again: a self-identifying payload (with a `seq` or `ts_ms`) by its topic and content, any
/// other by its packet id and content. So a publish repeated after the device's broker node
/// crashed, possibly to another node and under a new session epoch, has the same id, and a
/// bus with a duplicate window stores it once. The consequence: **two publishes of one device
/// identical in topic and payload (with a `seq` or `ts_ms`), or in packet id and payload,
/// within the duplicate window count as one event**. Everything else is named by the session
/// that produced it (epoch and sequence), which only this broker node knows.
pub mod event_id {
    use sha2::{Digest, Sha256};

    /// A device's QoS 1 or 2 publish on `topic`. A payload that identifies itself (a JSON
    /// object with a `seq` or `ts_ms` key, as the device agent's and the simulator's do) is named by its content: `d/{topic}/{first 16 hex of sha256(payload)}`, so a device
    /// that publishes it again on a new connection (its node died before the PUBACK; a new
    /// session drops the client's unacknowledged packets, so the resend is a new packet) is
    /// stored once. Any other payload is named by what an MQTT resend repeats:
    /// `p/{device}/{pkid}/{first 16 hex of sha256(payload)}`.
    pub fn publish(device: &str, topic: &str, pkid: u16, payload: &[u8]) -> String {
        let digest = Sha256::digest(payload);
        if identifies_itself(payload) {
            format!("d/{topic}/{}", hex::encode(&digest[..8]))
        } else {
            format!("p/{device}/{pkid}/{}", hex::encode(&digest[..8]))
        }
    }

    /// Whether a payload is a JSON object that names a `seq` or `ts_ms` key. A byte search,
    /// not a parse: this runs for every QoS 1/2 device publish.
    fn identifies_itself(payload: &[u8]) -> bool {
        let has = |key: &[u8]| payload.windows(key.len()).any(|w| w == key);
        payload.first() == Some(&b'{') && (has(b"\"seq\"") || has(b"\"ts_ms\""))
    }

    /// A device's QoS 0 publish: `s/{device}/{epoch}/{seq}`.
    pub fn unacknowledged(device: &str, epoch: u64, seq: u64) -> String {
        format!("s/{device}/{epoch}/{seq}")
    }

    /// A presence event: `c/{device}/{epoch}/{connected|disconnected}`.
    pub fn presence(device: &str, epoch: u64, connected: bool) -> String {
        let what = if connected {
            "connected"
        } else {
            "disconnected"
        };
        format!("c/{device}/{epoch}/{what}")
    }

    /// A device's will: `w/{device}/{epoch}`.
    pub fn will(device: &str, epoch: u64) -> String {
        format!("w/{device}/{epoch}")
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("the event bus is closed")]
    Closed,
    #[error("the consumer rejected the event: {0}")]
    Rejected(String),
}

pub type PublishFuture = Pin<Box<dyn Future<Output = Result<(), BusError>> + Send + 'static>>;

/// The producer side. `publish` returns a future that owns what it needs, so a session can keep
/// many in flight without borrowing the bus.
pub trait EventBus: Send + Sync + 'static {
    fn publish(&self, msg: BusMessage) -> PublishFuture;
}

/// One message handed to the consumer; ack it after it is durable on the consumer's side.
pub struct Delivery {
    pub msg: BusMessage,
    ack: Acker,
}

/// Where a delivery's answer goes.
enum Acker {
    /// To the publisher, waiting on the embedded bus.
    Embedded(oneshot::Sender<Result<(), BusError>>),
    /// To the JetStream consumer (the publisher was answered when the stream stored it).
    JetStream(jetstream::AckHandle),
}

impl Delivery {
    /// The event is durable on the consumer's side; the bus may forget it.
    pub fn ack(self) {
        match self.ack {
            Acker::Embedded(tx) => {
                let _ = tx.send(Ok(()));
            }
            Acker::JetStream(h) => h.ack(),
        }
    }

    /// The event is refused for good (for example, it names a device that no longer exists).
    /// On the embedded bus the publisher learns why; on JetStream the publisher was answered
    /// long ago, so the event is terminated (never redelivered) and the reason logged.
    pub fn reject(self, why: impl Into<String>) {
        match self.ack {
            Acker::Embedded(tx) => {
                let _ = tx.send(Err(BusError::Rejected(why.into())));
            }
            Acker::JetStream(h) => {
                let why = why.into();
                tracing::warn!(id = %self.msg.id, topic = %self.msg.topic, node = %self.msg.node,
                    reason = %why, "event rejected by the consumer; terminated on the stream");
                h.terminate();
            }
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = match self.ack {
            Acker::Embedded(_) => "embedded",
            Acker::JetStream(_) => "jetstream",
        };
        f.debug_struct("Delivery")
            .field("msg", &self.msg)
            .field("via", &via)
            .finish()
    }
}

/// The consumer side.
#[async_trait::async_trait]
pub trait EventSource: Send + 'static {
    /// Waits for at least one delivery and returns up to `max` of them; `None` once every
    /// producer is gone.
    async fn recv_batch(&mut self, max: usize) -> Option<Vec<Delivery>>;
}

#[cfg(test)]
mod tests {
    use super::event_id;

    #[test]
    fn event_ids() {
        let t = "devices/d1/telemetry";
        let cases: &[(String, &str)] = &[
            (
                event_id::publish("d1", t, 7, b"{}"),
                "p/d1/7/44136fa355b3678a",
            ),
            (event_id::unacknowledged("d1", 3, 9), "s/d1/3/9"),
            (event_id::presence("d1", 3, true), "c/d1/3/connected"),
            (event_id::presence("d1", 3, false), "c/d1/3/disconnected"),
            (event_id::will("d1", 3), "w/d1/3"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
        // The same publish resent (another node, another epoch) has the same id; another
        // payload or packet id does not.
        assert_eq!(
            event_id::publish("d1", t, 7, b"x"),
            event_id::publish("d1", t, 7, b"x")
        );
        assert_ne!(
            event_id::publish("d1", t, 7, b"x"),
            event_id::publish("d1", t, 7, b"y")
        );
        assert_ne!(
            event_id::publish("d1", t, 7, b"x"),
            event_id::publish("d1", t, 8, b"x")
        );
        // A self-identifying payload published again as a new packet (new connection, new
        // packet id) is the same event; on another topic, or with another seq, it is not.
        let p = br#"{"seq":5,"t":20.5}"#;
        assert_eq!(
            event_id::publish("d1", t, 7, p),
            event_id::publish("d1", t, 1, p)
        );
        assert!(event_id::publish("d1", t, 7, p).starts_with("d/devices/d1/telemetry/"));
        assert_ne!(
            event_id::publish("d1", t, 7, p),
            event_id::publish("d1", "devices/d1/state", 7, p)
        );
        assert_ne!(
            event_id::publish("d1", t, 7, p),
            event_id::publish("d1", t, 7, br#"{"seq":6,"t":20.5}"#)
        );
        let ts = br#"{"ts_ms":1700000000000}"#;
        assert_eq!(
            event_id::publish("d1", t, 2, ts),
            event_id::publish("d1", t, 3, ts)
        );
        // Without seq or ts_ms (or not an object), only an MQTT resend is recognised.
        let plain = br#"{"t":20.5}"#;
        assert_ne!(
            event_id::publish("d1", t, 2, plain),
            event_id::publish("d1", t, 3, plain)
        );
        assert_ne!(
            event_id::publish("d1", t, 2, b"[1]"),
            event_id::publish("d1", t, 3, b"[1]")
        );
    }
}
