//! Following a JetStream stream in order, for ever, through NATS restarts.
//!
//! An ephemeral pull consumer, acknowledged every 256 messages and whenever it has caught up
//! (so a stream with interest retention keeps an event until this follower has it). A
//! follower that hears nothing for a second checks that its consumer still exists (a restarted
//! server forgets it, and the message stream may not say so); a gap in the consumer's delivery
//! count means messages went where this follower never saw them. On any of these the consumer
//! is made again from the sequence after the last message handled: nothing is skipped and
//! nothing handled twice.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::{info, warn};

/// Silence after which the follower checks that its consumer still exists.
const IDLE: Duration = Duration::from_secs(1);

/// Where to start.
#[derive(Debug, Clone, Copy)]
pub enum From {
    /// Only what is appended from now on.
    New,
    /// The last message of every subject, then what follows.
    LastPerSubject,
    /// From this stream sequence on.
    Sequence(u64),
}

/// One message handed to the follower's handler.
pub struct Followed {
    pub message: async_nats::Message,
    pub stream_sequence: u64,
    /// Messages after this one the consumer knew of when it was delivered.
    pub pending: u64,
}

/// Hands every message of `stream` on `filter` to `handle`, in order, for ever (errors are
/// retried every 250 ms); calls `caught_up` whenever it has handled all there was.
pub async fn follow<F, Fut>(
    js: jetstream::Context,
    stream: String,
    filter: String,
    from: From,
    mut handle: F,
    mut caught_up: impl FnMut(),
) where
    F: FnMut(Followed) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut next = from;
    let mut failing = false;
    loop {
        let result: Result<(), async_nats::Error> = async {
            let s = js.get_stream(&stream).await?;
            let deliver_policy = match next {
                From::New => consumer::DeliverPolicy::New,
                From::LastPerSubject => consumer::DeliverPolicy::LastPerSubject,
                From::Sequence(start_sequence) => {
                    consumer::DeliverPolicy::ByStartSequence { start_sequence }
                }
            };
            let c = s
                .create_consumer(consumer::pull::Config {
                    deliver_policy,
                    // Acknowledged a batch at a time: on a stream with interest retention
                    // (the events) an event stays until this follower has it.
                    ack_policy: consumer::AckPolicy::All,
                    filter_subject: filter.clone(),
                    // Gone soon after this process is, so it holds no events back.
                    inactive_threshold: Duration::from_secs(10),
                    ..Default::default()
                })
                .await?;
            if failing {
                failing = false;
                info!(%stream, "following the stream again");
            }
            tracing::debug!(%stream, ?next, "following");
            let mut messages = c
                .stream()
                .max_messages_per_batch(512)
                .heartbeat(IDLE / 4)
                .expires(IDLE * 5)
                .messages()
                .await?;
            // The consumer's delivery count: a gap means messages were delivered that this
            // follower never saw; they must not be acknowledged unseen (an acknowledgement
            // covers everything before it), so the consumer is made again after the last one.
            let mut delivered = 0u64;
            let mut unacked: Option<jetstream::Message> = None;
            let mut since_ack = 0u32;
            loop {
                match tokio::time::timeout(IDLE, messages.next()).await {
                    Ok(Some(m)) => {
                        let m = m?;
                        let info = m.info()?;
                        let (stream_sequence, pending) = (info.stream_sequence, info.pending);
                        if info.consumer_sequence != delivered + 1 {
                            if let Some(m) = unacked.take() {
                                let _ = m.ack().await;
                            }
                            return Err(format!(
                                "delivery {} after {delivered}: messages were lost on the way",
                                info.consumer_sequence
                            )
                            .into());
                        }
                        delivered = info.consumer_sequence;
                        next = From::Sequence(stream_sequence + 1);
                        handle(Followed {
                            message: m.message.clone(),
                            stream_sequence,
                            pending,
                        })
                        .await;
                        unacked = Some(m);
                        since_ack += 1;
                        if pending == 0 || since_ack >= 256 {
                            if let Some(m) = unacked.take() {
                                m.ack().await?;
                            }
                            since_ack = 0;
                        }
                        if pending == 0 {
                            caught_up();
                        }
                    }
                    Ok(None) => return Err("the consumer's messages ended".into()),
                    Err(_) => {
                        // Idle: nothing more for now. Is the consumer still there (a restarted
                        // server forgets it, and its message stream may not say so)?
                        caught_up();
                        let mut c = c.clone();
                        c.info().await?;
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            if !failing {
                failing = true;
                warn!(%stream, error = %e, "following the stream failed; trying again");
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
