//! `connect-storm`: every device connects, `1 + repeat` rounds, one report row per round.
//! On the fleet platform the first round of a new fleet provisions every device (JITP); later
//! rounds are plain reconnects.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::session::{connect_round, end_sessions, AfterConnect, RoundSpec};
use super::{ConnectStorm, Ctx, Outcome, SimError};

/// Time past the deadline allowed for ending held sessions cleanly.
const GRACE: Duration = Duration::from_secs(5);

pub(crate) async fn run(ctx: &Arc<Ctx>, s: &ConnectStorm) -> Result<Outcome, SimError> {
    let mut rounds = Vec::new();
    let mut truncated = false;
    let mut rss_connected = 0;
    for round in 0..=s.repeat {
        if Instant::now() >= ctx.deadline {
            truncated = true;
            break;
        }
        let spec = RoundSpec {
            round: round + 1,
            label: if round == 0 { "first" } else { "repeat" },
            concurrency: s.concurrency,
            rate: s.rate,
            inflight: 1,
            capacity: 2,
            max_packet: 16 * 1024,
        };
        let after = if s.hold {
            AfterConnect::Hold
        } else {
            AfterConnect::Disconnect
        };
        let mut r = connect_round(ctx, &spec, |_| after.clone()).await;
        if s.hold {
            rss_connected = rss_connected.max(ctx.live.sample_rss());
        }
        end_sessions(&mut r, ctx.deadline.max(Instant::now()) + GRACE).await;
        if !s.hold {
            rss_connected = rss_connected.max(ctx.live.rss_max.load(Ordering::Relaxed));
        }
        truncated |= r.truncated;
        rounds.push(r.row);
        if truncated {
            break;
        }
    }
    Ok(Outcome {
        rounds,
        telemetry: None,
        fanout: None,
        churn: None,
        rss_connected,
        truncated,
    })
}
