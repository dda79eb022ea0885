//! Security events the platform notices on its own: bursts of refused connections become
//! audit entries of the organization they concern.
//!
//! Every window, the refused attempts since the last look are grouped by the organization of
//! the device they named (attempts that named no registered device belong to the `default`
//! organization, the platform's own). A group of at least the threshold becomes one
//! `connection.rejected_burst` entry with the count, the count by reason, and a sample of the
//! device ids and addresses. The connect path itself never writes to the database.

use std::collections::BTreeMap;
use std::time::Duration;

use broker::rejections::RejectedAttempt;
use broker::BrokerControl;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::{ActorKind, NewAuditEntry, Store};

/// How many ids and addresses a burst's entry names.
const SAMPLE: usize = 10;

/// The entries for one window's attempts: one per organization with at least `threshold`.
/// `missed` attempts fell out of the broker's memory before they were read; they are counted
/// in the `default` organization's entry.
pub fn bursts(
    attempts: &[RejectedAttempt],
    missed: u64,
    threshold: usize,
    window: Duration,
) -> Vec<NewAuditEntry> {
    let mut by_org: BTreeMap<&str, Vec<&RejectedAttempt>> = BTreeMap::new();
    for a in attempts {
        let org = a.org_id.as_deref().unwrap_or(broker::auth::DEFAULT_ORG);
        by_org.entry(org).or_default().push(a);
    }
    if missed > 0 {
        by_org.entry(broker::auth::DEFAULT_ORG).or_default();
    }
    by_org
        .into_iter()
        .filter_map(|(org, group)| {
            let extra = if org == broker::auth::DEFAULT_ORG {
                missed
            } else {
                0
            };
            let count = group.len() as u64 + extra;
            if count < threshold as u64 {
                return None;
            }
            let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
            for a in &group {
                *reasons.entry(a.reason.as_str()).or_default() += 1;
            }
            let mut devices: Vec<&str> = group
                .iter()
                .filter_map(|a| a.device_id.as_ref().map(|d| d.as_str()))
                .collect();
            devices.sort_unstable();
            devices.dedup();
            devices.truncate(SAMPLE);
            let mut addrs: Vec<&str> = group
                .iter()
                .map(|a| {
                    a.remote_addr
                        .rsplit_once(':')
                        .map_or(&*a.remote_addr, |(ip, _)| ip)
                })
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            addrs.truncate(SAMPLE);
            Some(NewAuditEntry {
                org_id: org.to_owned(),
                actor_kind: ActorKind::Platform,
                actor: "broker".into(),
                action: "connection.rejected_burst".into(),
                target_kind: None,
                target_id: None,
                request_id: None,
                success: false,
                status: None,
                error_code: None,
                remote_addr: None,
                detail: Some(json!({
                    "window_secs": window.as_secs(),
                    "rejections": count,
                    "unread": extra,
                    "by_reason": reasons,
                    "device_ids": devices,
                    "remote_ips": addrs,
                })),
            })
        })
        .collect()
}

/// Reads the broker's refused attempts every `window` and records the bursts.
pub async fn watch_rejections(
    store: Store,
    control: BrokerControl,
    threshold: usize,
    window: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut last = control.rejected().last_seq();
    let mut tick = tokio::time::interval(window);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let (attempts, newest) = control.rejected().since(last);
        let missed = (newest - last).saturating_sub(attempts.len() as u64);
        last = newest;
        for entry in bursts(&attempts, missed, threshold, window) {
            info!(org_id = %entry.org_id, detail = ?entry.detail, "burst of refused connections");
            if let Err(e) = store.record_audit(&entry).await {
                warn!(error = %e, "burst of refused connections not recorded");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::metrics::Rejection;
    use fleet_wire::DeviceId;

    fn attempt(org: Option<&str>, id: &str, reason: Rejection) -> RejectedAttempt {
        RejectedAttempt {
            seq: 0,
            at_ms: 0,
            device_id: Some(DeviceId::parse(id).unwrap()),
            org_id: org.map(str::to_owned),
            reason,
            remote_addr: "10.0.0.1:4000".into(),
        }
    }

    #[test]
    fn bursts_per_organization_over_the_threshold() {
        let mut attempts: Vec<_> = (0..5)
            .map(|n| attempt(Some("org-a"), &format!("d-{n}"), Rejection::PinMismatch))
            .collect();
        attempts.push(attempt(Some("org-b"), "x", Rejection::CertificateRevoked));
        attempts.push(attempt(None, "y", Rejection::NotProvisioned));
        let entries = bursts(&attempts, 0, 3, Duration::from_secs(10));
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].org_id, "org-a");
        let d = entries[0].detail.as_ref().unwrap();
        assert_eq!(d["rejections"], 5);
        assert_eq!(d["by_reason"]["pin_mismatch"], 5);
        assert_eq!(d["remote_ips"], json!(["10.0.0.1"]));
        // Unread attempts count for the platform's organization.
        let entries = bursts(&attempts, 2, 3, Duration::from_secs(10));
        let default = entries.iter().find(|e| e.org_id == "default").unwrap();
        assert_eq!(default.detail.as_ref().unwrap()["rejections"], 3);
    }
}
