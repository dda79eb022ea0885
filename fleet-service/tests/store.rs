//! Store scenarios, each run on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use broker::auth::{ServiceAuth, ServiceRole};
use broker::registry::{RegistryStore, StoreError as RegistryError};
use common::{catalog, exec_sql, id, new_device, presence, presence_batch};
use fleet_service::keys::{ensure_bootstrap_admin, ApiKeys, KeyError};
use fleet_service::store::{
    ActorKind, AuditFilter, DeviceFilter, DeviceState, EventBatch, LatestTelemetry, NewAuditEntry,
    ReportedChange, Store, StoreError, TelemetryRetention, TelemetryRow,
};
use fleet_wire::payload::{DisconnectReason, PresenceEvent};

on_both_databases!(
    migrations_run_twice,
    catalog_constraints,
    provisioning_is_idempotent,
    provisioning_refuses_another_cas_device,
    concurrent_provisioning_leaves_one_row,
    group_provisioning_isolates_a_bad_device,
    loaders_feed_the_registry,
    presence_follows_the_epoch_rule,
    presence_leaves_deliberate_states_alone,
    telemetry_redelivery_is_idempotent,
    events_of_unknown_devices_are_skipped,
    reported_state_newest_wins,
    mark_node_offline_after_restart,
    telemetry_retention,
    device_filters_and_order,
    api_keys_cache,
    audit_entries_filter_page_and_age_out,
    one_live_deployment_per_cohort,
    reachability_decides_who_a_wave_counts,
);

async fn migrations_run_twice(url: &str) {
    let store = Store::connect(url).await.unwrap();
    store.create_product("default", "p").await.unwrap();
    store.close().await;
    let again = Store::connect(url).await.unwrap();
    assert_eq!(
        again
            .products("default", None, &fleet_service::store::PageRequest::ALL)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn catalog_constraints(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let p = store.create_product("default", "thermostat").await.unwrap();
    assert!(matches!(
        store.create_product("default", "thermostat").await,
        Err(StoreError::Conflict(_))
    ));
    let c = store.create_cohort(&p, "beta").await.unwrap();
    assert_eq!(c.product_id, p.id);
    assert!(matches!(
        store.create_cohort(&p, "beta").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .create_cohort(
                &fleet_service::store::Product {
                    id: "no-such-product".into(),
                    ..p.clone()
                },
                "beta"
            )
            .await,
        Err(StoreError::MissingReference(_))
    ));
    let other = store.create_product("default", "lamp").await.unwrap();
    store.create_cohort(&other, "beta").await.unwrap();
    assert_eq!(store.cohorts_of(&p.id).await.unwrap(), vec![c.clone()]);
    assert_eq!(store.cohort(&c.id).await.unwrap(), Some(c));
    assert_eq!(store.product(&p.id).await.unwrap(), Some(p));
    assert_eq!(
        store
            .products("default", None, &fleet_service::store::PageRequest::ALL)
            .await
            .unwrap()
            .len(),
        2
    );
}

async fn provisioning_is_idempotent(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    let new = new_device(&cat, "dev-1", &[("site", "eu-1"), ("line", "a")]);

    let first = store.provision(&new).await.unwrap();
    assert!(first.created);
    assert_eq!(first.device.id, new.id);
    assert_eq!(first.device.ca_id, Some(cat.ca.id.clone()));
    assert_eq!(first.device.product_id, cat.product.id);
    assert_eq!(
        first.device.cohort_id.as_ref().unwrap().as_str(),
        cat.cohort.id
    );
    assert_eq!(first.device.session_epoch, 0);

    let second = store.provision(&new).await.unwrap();
    assert!(!second.created);
    assert_eq!(second.device, first.device);

    let d = store.device(&new.id).await.unwrap().unwrap();
    assert_eq!(d.state, DeviceState::Registered);
    assert_eq!(d.state_reason, "provisioned: jitp");
    assert!(!d.online);
    assert_eq!(d.tags, new.tags);
    let cert = d.certificate.unwrap();
    assert_eq!(cert.fingerprint_sha256, new.cert.fingerprint_sha256);
    assert_eq!(cert.subject, "CN=dev-1");
    assert_eq!(cert.not_after_ms, new.cert.not_after_ms);

    // The tags are rows too: the list filter finds the device by them.
    let by_tags = DeviceFilter {
        tags: vec![("site".into(), "eu-1".into()), ("line".into(), "a".into())],
        ..DeviceFilter::default()
    };
    assert_eq!(store.devices(&by_tags, None, 10).await.unwrap().len(), 1);
}

async fn provisioning_refuses_another_cas_device(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let a = catalog(&store, "a").await;
    let b = catalog(&store, "b").await;
    store
        .provision(&new_device(&a, "dev-1", &[]))
        .await
        .unwrap();

    let stolen = new_device(&b, "dev-1", &[]);
    assert!(matches!(
        store.provision(&stolen).await,
        Err(StoreError::Collision(d)) if d.as_str() == "dev-1"
    ));
    // The registry sees the same answer through its trait.
    assert!(matches!(
        store.provision_device(&stolen).await,
        Err(RegistryError::Collision(_))
    ));
    let d = store.device(&id("dev-1")).await.unwrap().unwrap();
    assert_eq!(d.ca_id.as_deref(), Some(a.ca.id.as_str()));
}

async fn concurrent_provisioning_leaves_one_row(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    let new = new_device(&cat, "dev-race", &[("site", "eu-1")]);
    let calls = (0..20).map(|_| {
        let store = store.clone();
        let new = new.clone();
        tokio::spawn(async move { store.provision_device(&new).await })
    });
    let results = futures::future::join_all(calls).await;
    let mut created = 0;
    for r in results {
        let p = r.unwrap().unwrap();
        assert_eq!(p.device.id, new.id);
        created += usize::from(p.created);
    }
    assert_eq!(created, 1, "exactly one call creates the device");
    let all = store
        .devices(&DeviceFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    let tagged = DeviceFilter {
        tags: vec![("site".into(), "eu-1".into())],
        ..DeviceFilter::default()
    };
    assert_eq!(store.devices(&tagged, None, 100).await.unwrap().len(), 1);
}

/// A storm of first connections through the group-commit writer: every device gets its
/// answer, one whose cohort does not exist (it fails the batch's transaction) costs only
/// itself, a device of another CA is a collision, and repeats are not created twice.
async fn group_provisioning_isolates_a_bad_device(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    let other = catalog(&store, "other").await;
    store
        .provision(&new_device(&other, "taken", &[]))
        .await
        .unwrap();
    let writer = std::sync::Arc::new(fleet_service::provisioning::ProvisionWriter::start(
        store.clone(),
        16,
    ));
    let mut broken = new_device(&cat, "broken", &[]);
    broken.cohort_id = fleet_wire::CohortId::parse("no-such-cohort").unwrap();
    let mut batch: Vec<_> = (0..60)
        .map(|n| new_device(&cat, &format!("storm-{}", n % 50), &[("wave", "1")]))
        .collect();
    batch.insert(17, broken);
    batch.insert(33, new_device(&cat, "taken", &[]));
    let calls = batch.into_iter().map(|new| {
        let writer = writer.clone();
        tokio::spawn(async move { (new.id.clone(), writer.provision_device(&new).await) })
    });
    let mut created = 0;
    for r in futures::future::join_all(calls).await {
        let (id, answer) = r.unwrap();
        match id.as_str() {
            "broken" => assert!(
                matches!(answer, Err(RegistryError::Backend(_))),
                "{answer:?}"
            ),
            "taken" => assert!(
                matches!(answer, Err(RegistryError::Collision(_))),
                "{answer:?}"
            ),
            _ => {
                let p = answer.unwrap();
                assert_eq!(p.device.id, id);
                created += usize::from(p.created);
            }
        }
    }
    assert_eq!(created, 50, "each of the 50 ids is created once");
    let waves = DeviceFilter {
        tags: vec![("wave".into(), "1".into())],
        ..DeviceFilter::default()
    };
    assert_eq!(store.devices(&waves, None, 100).await.unwrap().len(), 50);
    assert!(store.device(&id("broken")).await.unwrap().is_none());
}

async fn loaders_feed_the_registry(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store
        .provision(&new_device(&cat, "dev-2", &[]))
        .await
        .unwrap();
    store
        .provision(&new_device(&cat, "dev-1", &[]))
        .await
        .unwrap();

    let cas = store.load_ca_records().await.unwrap();
    assert_eq!(cas.len(), 1);
    let ca = &cas[0];
    assert_eq!(ca.id, cat.ca.id);
    assert_eq!(ca.cert_der, cat.test_ca.der());
    let (_, parsed) = x509_parser::parse_x509_certificate(&ca.cert_der).unwrap();
    assert_eq!(ca.subject_der, parsed.subject().as_raw());
    assert!(
        ca.key_id.is_some(),
        "rcgen CAs carry a subject key identifier"
    );
    assert!(ca.enabled);
    let jitp = ca.jitp.as_ref().unwrap();
    assert_eq!(jitp.product_id, cat.product.id);
    assert_eq!(jitp.tags.get("site").map(String::as_str), Some("eu-1"));

    let devices = store.load_device_records().await.unwrap();
    let ids: Vec<_> = devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["dev-1", "dev-2"]);
    assert!(devices
        .iter()
        .all(|d| d.ca_id.as_deref() == Some(cat.ca.id.as_str())));
}

async fn presence_follows_the_epoch_rule(url: &str) {
    use PresenceEvent::{Connected, Disconnected};
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store.provision(&new_device(&cat, "d", &[])).await.unwrap();
    let dev = id("d");

    let out = store
        .apply_events(&presence_batch(
            "node-a",
            vec![presence("d", Connected, 2, 1_000, None)],
        ))
        .await
        .unwrap();
    assert_eq!((out.presence_applied, out.presence_stale), (1, 0));
    let d = store.device(&dev).await.unwrap().unwrap();
    assert!(d.online);
    assert_eq!(d.state, DeviceState::Online);
    assert_eq!(d.state_reason, "connected");
    assert_eq!(d.session_epoch, 2);
    assert_eq!(d.node_id.as_deref(), Some("node-a"));
    assert_eq!(d.connected_at_ms, Some(1_000));
    assert_eq!(d.last_seen_ms, Some(1_000));
    assert_eq!(d.remote_addr.as_deref(), Some("127.0.0.1:50000"));

    // The disconnect of the replaced session 1 arrives late: ignored.
    let out = store
        .apply_events(&presence_batch(
            "node-a",
            vec![presence(
                "d",
                Disconnected,
                1,
                2_000,
                Some(DisconnectReason::Takeover),
            )],
        ))
        .await
        .unwrap();
    assert_eq!((out.presence_applied, out.presence_stale), (0, 1));
    let d = store.device(&dev).await.unwrap().unwrap();
    assert!(d.online);
    assert_eq!(d.session_epoch, 2);
    assert_eq!(d.last_seen_ms, Some(1_000));

    // A repeated connect of epoch 2 is stale too.
    let out = store
        .apply_events(&presence_batch(
            "node-a",
            vec![presence("d", Connected, 2, 1_500, None)],
        ))
        .await
        .unwrap();
    assert_eq!(out.presence_stale, 1);

    // The disconnect of session 2 applies.
    store
        .apply_events(&presence_batch(
            "node-a",
            vec![presence(
                "d",
                Disconnected,
                2,
                3_000,
                Some(DisconnectReason::KeepaliveTimeout),
            )],
        ))
        .await
        .unwrap();
    let d = store.device(&dev).await.unwrap().unwrap();
    assert!(!d.online);
    assert_eq!(d.state, DeviceState::Offline);
    assert_eq!(d.state_reason, "disconnected: keepalive_timeout");
    assert_eq!(d.disconnect_reason.as_deref(), Some("keepalive_timeout"));
    assert_eq!(d.node_id, None);
    assert_eq!(d.last_seen_ms, Some(3_000));
    assert_eq!(d.state_changed_at_ms, 3_000);

    // Session 3 connects after the disconnect of 2: applies.
    store
        .apply_events(&presence_batch(
            "node-b",
            vec![presence("d", Connected, 3, 4_000, None)],
        ))
        .await
        .unwrap();
    let d = store.device(&dev).await.unwrap().unwrap();
    assert!(d.online);
    assert_eq!(d.state, DeviceState::Online);
    assert_eq!(d.session_epoch, 3);
    assert_eq!(d.node_id.as_deref(), Some("node-b"));
    assert_eq!(d.disconnect_reason, None);

    // Within one batch only the newest event per device counts, whatever the order.
    let out = store
        .apply_events(&presence_batch(
            "node-b",
            vec![
                presence("d", Disconnected, 4, 6_000, Some(DisconnectReason::Client)),
                presence("d", Connected, 4, 5_000, None),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(out.presence_applied + out.presence_stale, 2);
    let d = store.device(&dev).await.unwrap().unwrap();
    assert!(!d.online);
    assert_eq!(d.session_epoch, 4);
    assert_eq!(d.state_reason, "disconnected: client");
}

async fn presence_leaves_deliberate_states_alone(url: &str) {
    use PresenceEvent::{Connected, Disconnected};
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store.provision(&new_device(&cat, "q", &[])).await.unwrap();
    exec_sql(
        url,
        "UPDATE devices SET state = 'quarantined', state_reason = 'operator' WHERE id = 'q'",
    )
    .await;
    store
        .apply_events(&presence_batch(
            "n",
            vec![presence("q", Connected, 1, 1_000, None)],
        ))
        .await
        .unwrap();
    let d = store.device(&id("q")).await.unwrap().unwrap();
    assert!(d.online, "online follows presence");
    assert_eq!(d.state, DeviceState::Quarantined, "state does not");
    assert_eq!(d.state_reason, "operator");
    store
        .apply_events(&presence_batch(
            "n",
            vec![presence(
                "q",
                Disconnected,
                1,
                2_000,
                Some(DisconnectReason::Revoked),
            )],
        ))
        .await
        .unwrap();
    let d = store.device(&id("q")).await.unwrap().unwrap();
    assert!(!d.online);
    assert_eq!(d.state, DeviceState::Quarantined);
    assert_eq!(d.disconnect_reason.as_deref(), Some("revoked"));
}

fn telemetry_rows(device: &str, epoch: u64, seqs: std::ops::Range<u64>) -> Vec<TelemetryRow> {
    seqs.map(|seq| TelemetryRow {
        device_id: id(device),
        epoch,
        seq,
        received_at_ms: 10_000 + seq as i64,
        payload: format!(r#"{{"seq":{seq}}}"#),
    })
    .collect()
}

async fn telemetry_redelivery_is_idempotent(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store.provision(&new_device(&cat, "t", &[])).await.unwrap();
    let batch = EventBatch {
        node_id: "n".into(),
        telemetry: telemetry_rows("t", 1, 0..5),
        latest_telemetry: vec![LatestTelemetry {
            device_id: id("t"),
            payload: r#"{"seq":4}"#.into(),
            at_ms: 10_004,
        }],
        seen: vec![(id("t"), 10_004)],
        ..EventBatch::default()
    };
    let first = store.apply_events(&batch).await.unwrap();
    assert_eq!(
        (first.telemetry_inserted, first.telemetry_duplicates),
        (5, 0)
    );
    let again = store.apply_events(&batch).await.unwrap();
    assert_eq!(
        (again.telemetry_inserted, again.telemetry_duplicates),
        (0, 5)
    );
    assert_eq!(store.telemetry_count(&id("t")).await.unwrap(), 5);

    // An older latest-telemetry (a late redelivery) does not replace the newer one.
    let late = EventBatch {
        node_id: "n".into(),
        telemetry: telemetry_rows("t", 1, 0..1),
        latest_telemetry: vec![LatestTelemetry {
            device_id: id("t"),
            payload: r#"{"seq":0}"#.into(),
            at_ms: 10_000,
        }],
        seen: vec![(id("t"), 10_000)],
        ..EventBatch::default()
    };
    store.apply_events(&late).await.unwrap();
    let d = store.device(&id("t")).await.unwrap().unwrap();
    assert_eq!(d.last_telemetry, Some(serde_json::json!({"seq": 4})));
    assert_eq!(d.last_telemetry_at_ms, Some(10_004));
    assert_eq!(d.last_seen_ms, Some(10_004));

    let recent = store.telemetry(&id("t"), 3).await.unwrap();
    let seqs: Vec<u64> = recent.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, [4, 3, 2]);
    assert_eq!(recent[0].payload, serde_json::json!({"seq": 4}));
    assert_eq!(recent[0].received_at_ms, 10_004);
}

async fn events_of_unknown_devices_are_skipped(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store
        .provision(&new_device(&cat, "known", &[]))
        .await
        .unwrap();
    let mut rows = telemetry_rows("known", 1, 0..2);
    rows.extend(telemetry_rows("ghost", 1, 0..2));
    let batch = EventBatch {
        node_id: "n".into(),
        presence: vec![presence("ghost", PresenceEvent::Connected, 1, 1, None)],
        telemetry: rows,
        seen: vec![(id("known"), 10_001), (id("ghost"), 10_001)],
        ..EventBatch::default()
    };
    let out = store.apply_events(&batch).await.unwrap();
    assert_eq!(out.unknown_devices.len(), 1);
    assert!(out.unknown_devices.contains(&id("ghost")));
    assert_eq!(out.telemetry_inserted, 2);
    assert_eq!(out.presence_applied + out.presence_stale, 0);
    assert!(store.device(&id("ghost")).await.unwrap().is_none());
    assert_eq!(store.telemetry_count(&id("known")).await.unwrap(), 2);
}

async fn reported_state_newest_wins(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store.provision(&new_device(&cat, "s", &[])).await.unwrap();
    let change = |fw: &str, at: i64| EventBatch {
        node_id: "n".into(),
        reported: vec![ReportedChange {
            device_id: id("s"),
            reported: format!(r#"{{"firmware_version":"{fw}","uptime":{at}}}"#),
            firmware_version: Some(fw.to_owned()),
            at_ms: at,
        }],
        seen: vec![(id("s"), at)],
        ..EventBatch::default()
    };
    store.apply_events(&change("2.0.0", 2_000)).await.unwrap();
    store.apply_events(&change("1.0.0", 1_000)).await.unwrap();
    let d = store.device(&id("s")).await.unwrap().unwrap();
    assert_eq!(d.firmware_version.as_deref(), Some("2.0.0"));
    assert_eq!(
        d.reported,
        Some(serde_json::json!({"firmware_version": "2.0.0", "uptime": 2000}))
    );
    assert_eq!(d.reported_at_ms, Some(2_000));
    assert_eq!(d.last_seen_ms, Some(2_000));
}

async fn mark_node_offline_after_restart(url: &str) {
    use PresenceEvent::{Connected, Disconnected};
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    for d in ["a1", "a2", "b1", "off"] {
        store.provision(&new_device(&cat, d, &[])).await.unwrap();
    }
    store
        .apply_events(&presence_batch(
            "node-a",
            vec![
                presence("a1", Connected, 5, 1_000, None),
                presence("a2", Connected, 1, 1_000, None),
            ],
        ))
        .await
        .unwrap();
    store
        .apply_events(&presence_batch(
            "node-b",
            vec![presence("b1", Connected, 1, 1_000, None)],
        ))
        .await
        .unwrap();

    let marked = store.mark_node_offline("node-a").await.unwrap();
    let marked: Vec<_> = marked.iter().map(|d| d.as_str()).collect();
    assert_eq!(marked, ["a1", "a2"]);
    let a1 = store.device(&id("a1")).await.unwrap().unwrap();
    assert!(!a1.online);
    assert_eq!(a1.state, DeviceState::Offline);
    assert_eq!(a1.state_reason, "disconnected: server_restart");
    assert_eq!(a1.disconnect_reason.as_deref(), Some("server_restart"));
    assert_eq!(a1.session_epoch, 5, "the epoch survives");
    assert!(a1.last_seen_ms.unwrap() > 1_000);
    assert!(store.device(&id("b1")).await.unwrap().unwrap().online);
    assert!(store.mark_node_offline("node-a").await.unwrap().is_empty());
    // The connection history ends the crashed run's sessions, and only that node's.
    let sessions = store.device_sessions(&id("a1"), 10).await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].end_reason.as_deref(), Some("server_restart"));
    assert!(sessions[0].ended_at_ms.is_some_and(|t| t > 1_000));
    let other = store.device_sessions(&id("b1"), 10).await.unwrap();
    assert_eq!(other[0].end_reason, None);

    // The session's own disconnect arriving late changes nothing; the next session applies.
    let out = store
        .apply_events(&presence_batch(
            "node-a",
            vec![presence(
                "a1",
                Disconnected,
                5,
                2_000,
                Some(DisconnectReason::ServerShutdown),
            )],
        ))
        .await
        .unwrap();
    assert_eq!(out.presence_stale, 1);
    assert_eq!(
        store
            .device(&id("a1"))
            .await
            .unwrap()
            .unwrap()
            .disconnect_reason
            .as_deref(),
        Some("server_restart")
    );
    store
        .apply_events(&presence_batch(
            "node-a",
            vec![presence("a1", Connected, 6, 3_000, None)],
        ))
        .await
        .unwrap();
    assert!(store.device(&id("a1")).await.unwrap().unwrap().online);
}

async fn telemetry_retention(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "sensor").await;
    store.provision(&new_device(&cat, "r1", &[])).await.unwrap();
    store.provision(&new_device(&cat, "r2", &[])).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut rows = telemetry_rows("r1", 1, 0..10);
    rows.extend(telemetry_rows("r1", 2, 0..2));
    rows.extend(telemetry_rows("r2", 1, 0..2));
    // r1's rows are ancient except epoch 2; r2's are fresh.
    for r in &mut rows {
        if r.device_id.as_str() == "r2" || r.epoch == 2 {
            r.received_at_ms = now;
        }
    }
    store
        .apply_events(&EventBatch {
            node_id: "n".into(),
            telemetry: rows,
            ..EventBatch::default()
        })
        .await
        .unwrap();

    let by_count = TelemetryRetention {
        max_age: None,
        max_rows_per_device: Some(5),
    };
    assert_eq!(store.prune_telemetry(&by_count).await.unwrap(), 7);
    let kept: Vec<(u64, u64)> = store
        .telemetry(&id("r1"), 100)
        .await
        .unwrap()
        .iter()
        .map(|t| (t.epoch, t.seq))
        .collect();
    assert_eq!(kept, [(2, 1), (2, 0), (1, 9), (1, 8), (1, 7)]);
    assert_eq!(store.telemetry_count(&id("r2")).await.unwrap(), 2);

    let by_age = TelemetryRetention {
        max_age: Some(Duration::from_secs(3600)),
        max_rows_per_device: None,
    };
    assert_eq!(store.prune_telemetry(&by_age).await.unwrap(), 3);
    assert_eq!(store.telemetry_count(&id("r1")).await.unwrap(), 2);
    assert_eq!(store.telemetry_count(&id("r2")).await.unwrap(), 2);
    assert_eq!(
        store
            .prune_telemetry(&TelemetryRetention::default())
            .await
            .unwrap(),
        0
    );
}

async fn device_filters_and_order(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let a = catalog(&store, "a").await;
    let b = catalog(&store, "b").await;
    // Mixed case and punctuation: the order must be bytewise on both databases.
    for (cat, dev, site) in [
        (&a, "a-2", "eu"),
        (&a, "B-1", "us"),
        (&a, "a.1", "eu"),
        (&b, "a_3", "eu"),
        (&b, "Z", "us"),
    ] {
        store
            .provision(&new_device(cat, dev, &[("site", site), ("kind", "x")]))
            .await
            .unwrap();
    }
    store
        .apply_events(&presence_batch(
            "n",
            vec![presence("a.1", PresenceEvent::Connected, 1, 1, None)],
        ))
        .await
        .unwrap();
    let ids = |v: Vec<fleet_service::store::Device>| -> Vec<String> {
        v.into_iter().map(|d| d.id.to_string()).collect()
    };
    let all = ids(store
        .devices(&DeviceFilter::default(), None, 100)
        .await
        .unwrap());
    assert_eq!(all, ["B-1", "Z", "a-2", "a.1", "a_3"]);

    let page = ids(store
        .devices(&DeviceFilter::default(), Some(&id("Z")), 2)
        .await
        .unwrap());
    assert_eq!(page, ["a-2", "a.1"]);

    let f = |f: DeviceFilter| {
        let store = store.clone();
        async move { ids(store.devices(&f, None, 100).await.unwrap()) }
    };
    assert_eq!(
        f(DeviceFilter {
            product_id: Some(b.product.id.clone()),
            ..Default::default()
        })
        .await,
        ["Z", "a_3"]
    );
    assert_eq!(
        f(DeviceFilter {
            cohort_id: Some(a.cohort.id.clone()),
            tags: vec![("site".into(), "eu".into())],
            ..Default::default()
        })
        .await,
        ["a-2", "a.1"]
    );
    assert_eq!(
        f(DeviceFilter {
            online: Some(true),
            ..Default::default()
        })
        .await,
        ["a.1"]
    );
    assert_eq!(
        f(DeviceFilter {
            state: Some(DeviceState::Registered),
            tags: vec![("site".into(), "us".into()), ("kind".into(), "x".into())],
            ..Default::default()
        })
        .await,
        ["B-1", "Z"]
    );
    assert!(f(DeviceFilter {
        tags: vec![("site".into(), "us".into()), ("kind".into(), "y".into())],
        ..Default::default()
    })
    .await
    .is_empty());
}

async fn api_keys_cache(url: &str) {
    let store = Store::connect(url).await.unwrap();
    assert!(matches!(
        ensure_bootstrap_admin(&store, "short").await,
        Err(KeyError::WeakToken)
    ));
    ensure_bootstrap_admin(&store, "first-admin-token-0123456789")
        .await
        .unwrap();
    let keys = ApiKeys::load(&store).await.unwrap();
    let ops = ops_on(&store, &keys);
    let admin = keys.authenticate("first-admin-token-0123456789").unwrap();
    assert_eq!(admin.key_id, "bootstrap-admin");
    assert_eq!(admin.role, ServiceRole::Admin);
    assert!(keys.authenticate("fk_nope").is_none());

    let viewer = ops
        .create_api_key(
            "default",
            "dashboards",
            ServiceRole::Viewer,
            broker::auth::Scope::Org,
        )
        .await
        .unwrap();
    assert!(viewer.secret.starts_with("fk_"));
    assert_eq!(
        keys.authenticate(&viewer.secret).unwrap().role,
        ServiceRole::Viewer
    );
    // Only the hash is stored.
    let stored = store
        .api_keys(None, &fleet_service::store::PageRequest::ALL)
        .await
        .unwrap();
    assert!(stored.iter().all(|k| k.secret_hash != viewer.secret));

    // A fresh cache (another start) sees the same keys.
    let reloaded = ApiKeys::load(&store).await.unwrap();
    assert!(reloaded.authenticate(&viewer.secret).is_some());

    let (revoked, _) = ops
        .revoke_api_key("default", &viewer.record.id)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at_ms.is_some());
    assert!(keys.authenticate(&viewer.secret).is_none());
    assert!(ops
        .revoke_api_key("default", "no-such-key")
        .await
        .unwrap()
        .is_none());
    reloaded.reload().await.unwrap();
    assert!(reloaded.authenticate(&viewer.secret).is_none());

    // A new bootstrap token replaces the old one.
    ensure_bootstrap_admin(&store, "second-admin-token-0123456789")
        .await
        .unwrap();
    keys.reload().await.unwrap();
    assert!(keys.authenticate("first-admin-token-0123456789").is_none());
    assert!(keys.authenticate("second-admin-token-0123456789").is_some());
}

/// Operations on `store` that apply their changes to `keys` at once (no broker runs).
fn ops_on(store: &Store, keys: &ApiKeys) -> fleet_service::ops::Ops {
    let metrics = std::sync::Arc::new(broker::metrics::Metrics::default());
    let registry = std::sync::Arc::new(broker::registry::Registry::new(
        std::sync::Arc::new(store.clone()),
        metrics.clone(),
    ));
    fleet_service::ops::Ops::local(
        store.clone(),
        keys.clone(),
        broker::BrokerControl::new(registry, metrics),
        fleet_service::rollout::Rollouts::new(),
    )
}

#[tokio::test]
async fn in_memory_sqlite_keeps_one_database() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    store.create_product("default", "p").await.unwrap();
    // Several calls in a row see the same (single-connection) database.
    for _ in 0..3 {
        assert_eq!(
            store
                .products("default", None, &fleet_service::store::PageRequest::ALL)
                .await
                .unwrap()
                .len(),
            1
        );
    }
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in ["mysql://localhost/db", "fleet.db", ""] {
        assert!(
            matches!(Store::connect(url).await, Err(StoreError::UnsupportedUrl)),
            "{url}"
        );
    }
}

#[tokio::test]
async fn a_missing_sqlite_file_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    assert!(!path.exists());
    Store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(path.exists());
}

async fn audit_entries_filter_page_and_age_out(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let entry = |org: &str, action: &str, ok: bool| NewAuditEntry {
        org_id: org.into(),
        actor_kind: ActorKind::ApiKey,
        actor: "key-1".into(),
        action: action.into(),
        target_kind: Some("device".into()),
        target_id: Some("d-1".into()),
        request_id: Some(format!("req-{action}")),
        success: ok,
        status: Some(if ok { 200 } else { 403 }),
        error_code: (!ok).then(|| "forbidden".into()),
        remote_addr: None,
        detail: Some(serde_json::json!({ "request": { "reason": "x" } })),
    };
    for (org, action, ok) in [
        ("default", "device.quarantine", true),
        ("default", "device.delete", false),
        ("default", "api_key.create", true),
        ("other", "device.quarantine", true),
    ] {
        store.record_audit(&entry(org, action, ok)).await.unwrap();
    }
    let of = |f: AuditFilter| {
        let store = store.clone();
        async move {
            store
                .audit_entries(&f, None, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.action)
                .collect::<Vec<_>>()
        }
    };
    let org = |o: &str| AuditFilter {
        org_id: o.into(),
        ..AuditFilter::default()
    };
    assert_eq!(
        of(org("default")).await,
        ["api_key.create", "device.delete", "device.quarantine"],
        "newest first, one organization"
    );
    assert_eq!(
        of(AuditFilter {
            action: Some("device.".into()),
            ..org("default")
        })
        .await,
        ["device.delete", "device.quarantine"]
    );
    assert_eq!(
        of(AuditFilter {
            outcome: Some("failure".into()),
            ..org("default")
        })
        .await,
        ["device.delete"]
    );
    let page = store.audit_entries(&org("default"), None, 1).await.unwrap();
    let rest = store
        .audit_entries(&org("default"), Some(page[0].id), 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|e| e.id < page[0].id));

    // Age out: one entry made old by hand goes, the rest stay.
    exec_sql(
        url,
        "UPDATE audit_log SET at = 0 WHERE action = 'device.delete'",
    )
    .await;
    assert_eq!(
        store
            .prune_audit(Duration::from_secs(86_400))
            .await
            .unwrap(),
        1
    );
    assert_eq!(of(org("default")).await.len(), 2);
    assert_eq!(of(org("other")).await.len(), 1);
}

/// A rollout of a new release (signed by a key `key_id` registered here) to `cat`'s cohort,
/// with the default policy.
async fn new_deployment(
    store: &Store,
    cat: &common::Catalog,
    key_id: &str,
) -> fleet_service::store::NewDeployment {
    use fleet_service::store::{DeploymentKind, NewDeployment};
    use fleet_wire::update::ReleaseManifest;
    use fleet_wire::CohortId;

    store
        .create_signing_key("default", key_id, "key", key_id)
        .await
        .unwrap();
    let manifest = ReleaseManifest {
        product_id: cat.product.id.clone(),
        version: "1.0.0".into(),
        url: "http://127.0.0.1/fw".into(),
        size: 1,
        sha256: "00".repeat(32),
    };
    let release = store
        .create_release(&manifest, "sig", key_id, None)
        .await
        .unwrap();
    NewDeployment {
        release,
        cohort_id: CohortId::parse(&cat.cohort.id).unwrap(),
        kind: DeploymentKind::Rollout,
        policy: fleet_service::rollout::policy::RolloutPolicy::default()
            .validated()
            .unwrap(),
        reason: "test".into(),
        rollback_of: None,
    }
}

/// Finding 14 of issue 11: the partial unique index holds at most one active or paused
/// deployment per cohort, and migration 0012 ends the duplicates an earlier race left (the
/// newest stays) before creating it.
async fn one_live_deployment_per_cohort(url: &str) {
    use fleet_service::store::PageRequest;
    use fleet_wire::update::DeploymentState;

    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "live").await;
    let new = new_deployment(&store, &cat, "k1").await;
    let first = store.create_deployment(&new).await.unwrap();
    assert!(matches!(
        store.create_deployment(&new).await,
        Err(StoreError::Conflict(_))
    ));

    // What a race before the index could leave: two live deployments of one cohort.
    exec_sql(url, "DROP INDEX deployments_one_live").await;
    exec_sql(
        url,
        "INSERT INTO deployments (id, product_id, cohort_id, release_id, kind, state, \
         state_reason, policy, current_wave, admit_below, revision, rate_base, created_at, \
         updated_at) SELECT 'zz-duplicate', product_id, cohort_id, release_id, kind, state, \
         state_reason, policy, current_wave, admit_below, revision, rate_base, created_at, \
         updated_at FROM deployments",
    )
    .await;
    exec_sql(url, "DELETE FROM _sqlx_migrations WHERE version = 12").await;
    store.close().await;

    let store = Store::connect(url).await.unwrap();
    let live = store
        .deployments(
            "default",
            None,
            Some(&cat.cohort.id),
            Some(DeploymentState::Active),
            &PageRequest::ALL,
        )
        .await
        .unwrap();
    let ids: Vec<&str> = live.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["zz-duplicate"], "the newest stays live");
    let ended = store.deployment(&first.id).await.unwrap().unwrap();
    assert_eq!(ended.state, DeploymentState::Canceled);
    assert!(matches!(
        store.create_deployment(&new).await,
        Err(StoreError::Conflict(_))
    ));
}

/// Issue 14: who a wave counts. An admitted device is counted (`pending`, its timeout running)
/// only while it is reachable: online, not quarantined, and it reported a firmware version.
/// Otherwise it is `deferred`, with why. The cutoff of a wave is set by reachable devices
/// alone, however the others rank; reachability is followed both ways; a report from a
/// deferred device counts at once; canceling ends deferred executions.
async fn reachability_decides_who_a_wave_counts(url: &str) {
    use broker::registry::QuarantineMode;
    use fleet_service::store::{
        DeferReason, Execution, ExecutionStatus, StateChange, UpdateReport,
    };
    use fleet_wire::update::{
        rollout_rank, DeploymentState, UpdateStatus, UpdateStatusKind, ADMIT_ALL,
    };
    use std::collections::BTreeMap;

    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "reach").await;
    let devices = ["agent", "never", "plain", "gone", "held"];
    for d in devices {
        store.provision(&new_device(&cat, d, &[])).await.unwrap();
    }
    let reported = |devs: &[&str], at: i64| EventBatch {
        node_id: "n".into(),
        reported: devs
            .iter()
            .map(|d| ReportedChange {
                device_id: id(d),
                reported: r#"{"firmware_version":"0.9.0"}"#.into(),
                firmware_version: Some("0.9.0".into()),
                at_ms: at,
            })
            .collect(),
        ..EventBatch::default()
    };
    // `agent`, `plain` and `held` are online; `gone` was and left; `never` never came. Those
    // with an agent reported their firmware; `held` is quarantined.
    let connect = |d| presence(d, PresenceEvent::Connected, 1, 1_000, None);
    store
        .apply_events(&presence_batch(
            "n",
            vec![
                connect("agent"),
                connect("plain"),
                connect("held"),
                connect("gone"),
            ],
        ))
        .await
        .unwrap();
    store
        .apply_events(&presence_batch(
            "n",
            vec![presence(
                "gone",
                PresenceEvent::Disconnected,
                1,
                2_000,
                Some(DisconnectReason::Client),
            )],
        ))
        .await
        .unwrap();
    store
        .apply_events(&reported(&["agent", "held", "gone"], 1_500))
        .await
        .unwrap();
    store
        .quarantine_device(&id("held"), QuarantineMode::CommandsOnly, "test")
        .await
        .unwrap();

    let d = store
        .create_deployment(&new_deployment(&store, &cat, "k1").await)
        .await
        .unwrap();
    let rank = |dev: &str| u64::from(rollout_rank(&d.id, &id(dev)));
    let executions = || async {
        store
            .executions(&d.id, None, None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.device_id.to_string(), e))
            .collect::<BTreeMap<String, Execution>>()
    };
    let why = |dev: &str| match dev {
        "never" => DeferReason::NeverConnected,
        "plain" => DeferReason::NoUpdateAgent,
        "gone" => DeferReason::Offline,
        "held" => DeferReason::Quarantined,
        other => panic!("{other} is reachable"),
    };

    // Admitting one admits the only reachable device, whatever its rank; whoever ranks below
    // it is admitted too, but deferred.
    let d = store.admit(&d, 1, false).await.unwrap().unwrap();
    assert_eq!(d.admit_below, rank("agent") + 1);
    let ex = executions().await;
    assert_eq!(ex["agent"].status, ExecutionStatus::Pending);
    assert!(ex["agent"].notified_at_ms.is_some(), "its timeout runs");
    for dev in ["never", "plain", "gone", "held"] {
        let e = &ex[dev];
        if rank(dev) < rank("agent") {
            assert_eq!(e.status, ExecutionStatus::Deferred, "{dev}");
            assert_eq!(e.deferred_reason, Some(why(dev)), "{dev}");
            assert!(
                e.admitted_at_ms.is_some() && e.notified_at_ms.is_none(),
                "{dev}"
            );
        } else {
            assert_eq!(e.status, ExecutionStatus::Pending, "{dev}");
            assert!(e.admitted_at_ms.is_none(), "{dev} is in no wave yet");
        }
    }

    // The final wave: everyone is admitted, the unreachable deferred.
    let d = store.admit(&d, 0, true).await.unwrap().unwrap();
    assert_eq!(d.admit_below, ADMIT_ALL);
    let ex = executions().await;
    for dev in ["never", "plain", "gone", "held"] {
        assert_eq!(ex[dev].status, ExecutionStatus::Deferred, "{dev}");
        assert_eq!(ex[dev].deferred_reason, Some(why(dev)), "{dev}");
    }
    let s = store.execution_summary(&d.id).await.unwrap();
    assert_eq!(
        (
            s.counts.total,
            s.counts.admitted,
            s.counts.deferred,
            s.counts.ready
        ),
        (5, 1, 4, 0)
    );
    assert_eq!(
        s.deferred_by_reason,
        BTreeMap::from([
            ("never_connected", 1),
            ("no_update_agent", 1),
            ("offline", 1),
            ("quarantined", 1),
        ])
    );
    assert_eq!(s.by_status["deferred"], 4);

    // `plain` turns out to run an agent (it reports its firmware): counted again, its timeout
    // starting now. `agent` leaves before it reported: deferred, its timeout stopped.
    store
        .apply_events(&reported(&["plain"], 3_000))
        .await
        .unwrap();
    store
        .apply_events(&presence_batch(
            "n",
            vec![presence(
                "agent",
                PresenceEvent::Disconnected,
                1,
                3_000,
                Some(DisconnectReason::ConnectionLost),
            )],
        ))
        .await
        .unwrap();
    store.refresh_reachability(&d.id).await.unwrap();
    let ex = executions().await;
    assert_eq!(ex["plain"].status, ExecutionStatus::Pending);
    assert_eq!(ex["plain"].deferred_reason, None);
    assert!(ex["plain"].notified_at_ms.is_some());
    assert_eq!(ex["agent"].status, ExecutionStatus::Deferred);
    assert_eq!(ex["agent"].deferred_reason, Some(DeferReason::Offline));
    assert_eq!(ex["agent"].notified_at_ms, None);
    // The timeout (here: any silence at all) reaches counted devices only, never a deferred
    // one.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let timed_out = store.time_out_executions(&d.id, 0).await.unwrap();
    assert_eq!(timed_out, [id("plain")]);

    // A deferred device that reports is counted at once, whatever the engine saw.
    let report = EventBatch {
        node_id: "n".into(),
        update_reports: vec![UpdateReport {
            device_id: id("never"),
            status: UpdateStatus {
                deployment_id: d.id.clone(),
                status: UpdateStatusKind::Queued,
                firmware_version: None,
                error: None,
                ts_ms: 4_000,
            },
            at_ms: 4_000,
        }],
        ..EventBatch::default()
    };
    store.apply_events(&report).await.unwrap();
    let e = &executions().await["never"];
    assert_eq!(e.status, ExecutionStatus::Queued);
    assert_eq!(e.deferred_reason, None);

    // Canceling ends what had not started, deferred executions included.
    let change = StateChange {
        from: &[DeploymentState::Active],
        to: DeploymentState::Canceled,
    };
    store
        .set_deployment_state(&d.id, change, "test")
        .await
        .unwrap()
        .unwrap();
    let s = store.execution_summary(&d.id).await.unwrap();
    assert_eq!(s.counts.deferred, 0);
    assert!(s.deferred_by_reason.is_empty());
    assert_eq!((s.by_status["canceled"], s.by_status["timed_out"]), (4, 1));
}
