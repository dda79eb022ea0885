//! Following a JetStream stream in order, for ever, through NATS restarts.
//!
//! An ephemeral pull consumer (acknowledged a batch at a time) is asked for batches with a short expiry and idle
//! heartbeats, so a dead connection or a consumer lost in a server restart shows up as an
//! error within a second instead of a stream that silently never yields again; on any error the consumer is made again from the sequence after the last
//! message handled. Nothing is skipped and nothing handled twice.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::{info, warn};

/// How long one pull waits for messages.
const EXPIRES: Duration = Duration::from_secs(1);

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
            loop {
                // A pull that waits (up to its expiry) and hands each message over as it
                // arrives; `fetch` would answer at once, empty, and spin.
                let mut batch = c
                    .batch()
                    .max_messages(512)
                    .expires(EXPIRES)
                    .heartbeat(EXPIRES / 4)
                    .messages()
                    .await?;
                let mut got = 0usize;
                let mut last = None;
                // Past the pull's expiry a new pull is sent (a request the server no longer
                // knows, after a restart, is never answered; an idle one may end without a
                // word): if the consumer is gone with the server, that pull fails and the
                // consumer is made again.
                let mut timed_out = false;
                while let Some(m) =
                    match tokio::time::timeout(EXPIRES + EXPIRES / 2, batch.next()).await {
                        Ok(m) => m,
                        Err(_) => {
                            timed_out = true;
                            None
                        }
                    }
                {
                    got += 1;
                    let m = m?;
                    let info = m.info()?;
                    let (stream_sequence, pending) = (info.stream_sequence, info.pending);
                    next = From::Sequence(stream_sequence + 1);
                    handle(Followed {
                        message: m.message.clone(),
                        stream_sequence,
                        pending,
                    })
                    .await;
                    last = Some(m);
                }
                if let Some(m) = last {
                    m.ack().await?;
                }
                if timed_out && got == 0 {
                    // Silent: is the consumer still there (a restarted server forgets it)?
                    let mut c = c.clone();
                    c.info().await?;
                }
                if got < 512 {
                    caught_up();
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
