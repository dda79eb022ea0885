//! The single-node bus: a bounded channel into one consumer. "Durable" means the consumer
//! committed the event: `publish` resolves when its delivery is acked (or rejected).

use tokio::sync::{mpsc, oneshot};

use super::{Acker, BusError, BusMessage, Delivery, EventBus, EventSource, PublishFuture};

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
            tx.send(Delivery {
                msg,
                ack: Acker::Embedded(ack),
            })
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
    use bytes::Bytes;

    use super::*;

    fn msg(seq: u64) -> BusMessage {
        BusMessage {
            topic: "devices/d/telemetry".into(),
            payload: Bytes::from_static(b"{}"),
            epoch: 1,
            seq,
            ..Default::default()
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
