//! The event bus: the one seam between the broker's sessions and the fleet service's intake.
//!
//! The broker publishes every event the fleet service must not lose (telemetry, reported state,
//! command acks, presence) with [`EventBus::publish`], and answers the device (PUBACK, CONNACK)
//! only once the returned future resolves `Ok`: the bus has durably accepted the event. The
//! fleet service pulls batches with [`EventSource::recv_batch`], commits them, and then acks each
//! [`Delivery`].
//!
//! [`embedded`] is the single-node implementation: a bounded channel whose "durable" point is the
//! consumer's database commit. A full channel makes `publish` wait (PUBACKs are held back); it
//! never drops. A multi-node backbone (NATS JetStream) implements the same two traits: publish
//! resolves on the stream's ack, and deliveries ack back to the stream.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// One event on the bus. `topic` is the MQTT topic name from the wire contract; a JetStream
/// implementation maps it to a subject one-to-one.
#[derive(Debug, Clone)]
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
#[derive(Debug)]
pub struct Delivery {
    pub msg: BusMessage,
    ack: oneshot::Sender<Result<(), BusError>>,
}

impl Delivery {
    pub fn ack(self) {
        let _ = self.ack.send(Ok(()));
    }

    /// The event is refused for good (for example, it names a device that no longer exists);
    /// the publisher learns why.
    pub fn reject(self, why: impl Into<String>) {
        let _ = self.ack.send(Err(BusError::Rejected(why.into())));
    }
}

/// The consumer side.
#[async_trait::async_trait]
pub trait EventSource: Send + 'static {
    /// Waits for at least one delivery and returns up to `max` of them; `None` once every
    /// producer is gone.
    async fn recv_batch(&mut self, max: usize) -> Option<Vec<Delivery>>;
}

/// The embedded bus: a bounded channel of `capacity` events into one consumer.
pub fn embedded(capacity: usize) -> (EmbeddedBus, EmbeddedSource) {
    let (tx, rx) = mpsc::channel(capacity);
    (EmbeddedBus { tx }, EmbeddedSource { rx })
}

#[derive(Clone)]
pub struct EmbeddedBus {
    tx: mpsc::Sender<Delivery>,
}

impl EventBus for EmbeddedBus {
    fn publish(&self, msg: BusMessage) -> PublishFuture {
        let tx = self.tx.clone();
        Box::pin(async move {
            let (ack, done) = oneshot::channel();
            tx.send(Delivery { msg, ack })
                .await
                .map_err(|_| BusError::Closed)?;
            done.await.map_err(|_| BusError::Closed)?
        })
    }
}

pub struct EmbeddedSource {
    rx: mpsc::Receiver<Delivery>,
}

#[async_trait::async_trait]
impl EventSource for EmbeddedSource {
    async fn recv_batch(&mut self, max: usize) -> Option<Vec<Delivery>> {
        let mut batch = Vec::with_capacity(max.min(1024));
        if self.rx.recv_many(&mut batch, max).await == 0 {
            return None;
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> BusMessage {
        BusMessage {
            topic: "devices/d/telemetry".into(),
            payload: Bytes::from_static(b"{}"),
            epoch: 1,
            seq,
            received_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn publish_resolves_only_after_ack() {
        let (bus, mut source) = embedded(4);
        let mut pending = tokio::spawn(bus.publish(msg(1)));
        let batch = source.recv_batch(10).await.unwrap();
        assert_eq!(batch.len(), 1);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut pending)
                .await
                .is_err(),
            "publish resolved before the consumer acked"
        );
        batch.into_iter().for_each(Delivery::ack);
        pending.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn full_channel_waits_instead_of_dropping() {
        let (bus, mut source) = embedded(2);
        let handles: Vec<_> = (0..5).map(|i| tokio::spawn(bus.publish(msg(i)))).collect();
        let mut seen = 0;
        while seen < 5 {
            let batch = source.recv_batch(10).await.unwrap();
            seen += batch.len();
            batch.into_iter().for_each(Delivery::ack);
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn rejection_reaches_the_publisher() {
        let (bus, mut source) = embedded(2);
        let pending = tokio::spawn(bus.publish(msg(1)));
        let d = source.recv_batch(1).await.unwrap().pop().unwrap();
        d.reject("no such device");
        assert!(matches!(
            pending.await.unwrap(),
            Err(BusError::Rejected(why)) if why == "no such device"
        ));
    }
}
