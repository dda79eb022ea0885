//! One message, start to finish: connect, publish QoS 1, wait for the PUBACK, disconnect.

use std::time::Duration;

use fleet_wire::payload::validate_device_payload;
use fleet_wire::Topic;

use crate::error::{ConnectError, Error};
use crate::mqtt::{self, MqttEvent};
use crate::options::ConnectOptions;

/// Publishes `payload` on `topic` once. The connection is not retried: a refused CONNACK, a
/// TLS failure or a network error is returned as [`Error::Connect`]; a session that ends before
/// the PUBACK as [`Error::NotAcknowledged`], a negative PUBACK as [`Error::PublishRefused`].
/// Payloads for the device's own topics are checked
/// against the wire contract first. `timeout` bounds the whole exchange.
pub async fn publish_once(
    opts: &ConnectOptions,
    topic: &Topic,
    payload: &[u8],
    retain: bool,
    timeout: Duration,
) -> Result<(), Error> {
    let device_id = opts.validate()?;
    validate_device_payload(topic, payload)?;
    let (client, mut event_loop) = mqtt::open(opts, &device_id, 4)?;
    let deadline = tokio::time::Instant::now() + timeout;

    let connected = tokio::time::timeout_at(deadline, event_loop.poll())
        .await
        .map_err(|_| ConnectError::Timeout("waiting for CONNACK"))??;
    if !matches!(connected, MqttEvent::Connected { .. }) {
        return Err(ConnectError::Protocol(format!("expected CONNACK, got {connected:?}")).into());
    }
    tracing::debug!(topic = %topic, "connected; publishing");

    let acknowledged = async {
        client
            .publish(topic, payload.to_vec(), retain)
            .map_err(|e| ConnectError::Network(format!("the client refused the publish: {e:?}")))?;
        let mut pkid = None;
        loop {
            match event_loop.poll().await? {
                MqttEvent::Sent(p) => pkid = Some(p),
                MqttEvent::Acked(p) if Some(p) == pkid => return Ok(Ok(())),
                MqttEvent::Refused { pkid: p, why } if Some(p) == pkid => {
                    return Ok(Err(Error::PublishRefused(why.to_string())))
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout_at(deadline, acknowledged)
        .await
        .map_err(|_| ConnectError::Timeout("waiting for PUBACK"))
        .and_then(|r| r)
        .map_err(Error::NotAcknowledged)??;
    tracing::debug!("PUBACK received; disconnecting");

    // The message is delivered; failing to say goodbye does not change that.
    if client.disconnect().is_ok() {
        let goodbye = async {
            while let Ok(event) = event_loop.poll().await {
                if event == MqttEvent::DisconnectSent {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), goodbye).await;
    }
    Ok(())
}
