//! Fleet management over the real platform: organizations isolating every resource, roles and
//! scopes on every endpoint (REST and the MQTT service listener), quarantine and key revocation
//! reaching live sessions, CA proof of possession, and what a disabled CA's devices may do.

use std::time::Duration;

use device_client::release::SigningKey;
use e2e::{eventually, on_both_databases, Client, Client5, Db, Fleet, Platform, TestCa};
use rumqttc::QoS;
use serde_json::{json, Value};

on_both_databases!(
    organizations_isolate_every_resource,
    roles_and_scopes_on_every_endpoint,
    quarantine_reaches_the_live_session,
    service_keys_follow_role_and_scope_over_mqtt,
    ca_registration_needs_proof_of_possession,
    a_disabled_ca_may_keep_its_devices,
    pre_provisioned_devices_and_certificate_pins,
    revocation_and_deletion_reach_the_live_session,
    device_queries_filter_and_page,
    bulk_import_reports_every_row,
    moving_a_device_between_cohorts,
    the_audit_log_records_who_did_what,
    the_fleet_summary_counts_what_the_key_sees,
);

/// Connects a device of `fleet` (provisioning it) and publishes one telemetry message.
async fn online_device(p: &Platform, fleet: &Fleet, id: &str) -> Client {
    let cert = fleet.ca.issue(id);
    let c = Client::connect(p.device_options(&cert, id)).await.unwrap();
    c.client
        .publish(
            format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            r#"{"t":1}"#,
        )
        .await
        .unwrap();
    eventually("telemetry stored", || async {
        let (s, body) = p
            .api("GET", &format!("/api/v1/devices/{id}/telemetry"), None)
            .await;
        (s == 200 && body["items"].as_array().is_some_and(|i| !i.is_empty())).then_some(())
    })
    .await;
    c
}

/// A signing key, a release and a deployment of `fleet` in the organization of `admin`.
async fn release_and_deployment(p: &Platform, admin: &str, fleet: &Fleet) -> (String, String) {
    let key = SigningKey::generate().unwrap();
    let (s, body) = p
        .api_as(
            admin,
            "POST",
            "/api/v1/signing-keys",
            Some(json!({ "name": "k", "public_key": key.public_key_base64() })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let signed = key
        .sign(
            &fleet.product_id,
            "1.0.0",
            "http://127.0.0.1:9/fw.bin",
            b"firmware",
        )
        .unwrap();
    let (s, release) = p
        .api_as(
            admin,
            "POST",
            "/api/v1/releases",
            Some(serde_json::to_value(&signed).unwrap()),
        )
        .await;
    assert_eq!(s, 201, "{release}");
    let release_id = release["id"].as_str().unwrap().to_owned();
    let (s, dep) = p
        .api_as(
            admin,
            "POST",
            "/api/v1/deployments",
            Some(json!({ "release_id": release_id, "cohort_id": fleet.cohort_id })),
        )
        .await;
    assert_eq!(s, 201, "{dep}");
    (release_id, dep["id"].as_str().unwrap().to_owned())
}

fn ids(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect()
}

async fn organizations_isolate_every_resource(p: Platform) {
    let admin_a = p.app().admin_token().to_owned();
    let fleet_a = p.jitp_fleet(json!({})).await;
    let _device = online_device(&p, &fleet_a, "iso-a-1").await;
    let (release_a, deployment_a) = release_and_deployment(&p, &admin_a, &fleet_a).await;
    let (s, key_a) = p
        .api(
            "POST",
            "/api/v1/api-keys",
            Some(json!({ "name": "a viewer", "role": "viewer" })),
        )
        .await;
    assert_eq!(s, 201, "{key_a}");
    let key_a = key_a["id"].as_str().unwrap().to_owned();

    let (org_b, admin_b) = p.organization("tenant-b").await;
    let fleet_b = p.jitp_fleet_as(&admin_b, json!({})).await;
    // The same product name in another organization is no conflict.
    let (s, body) = p
        .api_as(
            &admin_b,
            "POST",
            "/api/v1/products",
            Some(json!({ "name": "shared-name" })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/products",
            Some(json!({ "name": "shared-name" })),
        )
        .await;
    assert_eq!(s, 201, "{body}");

    // Every single resource of A is a 404 to B, exactly like a missing one.
    let a = &fleet_a;
    let reads = [
        format!("/api/v1/products/{}", a.product_id),
        format!("/api/v1/products/{}/cohorts", a.product_id),
        format!("/api/v1/cohorts/{}", a.cohort_id),
        format!("/api/v1/ca-certificates/{}", a.ca_id),
        "/api/v1/devices/iso-a-1".to_owned(),
        "/api/v1/devices/iso-a-1/telemetry".to_owned(),
        "/api/v1/devices/iso-a-1/executions".to_owned(),
        format!("/api/v1/releases/{release_a}"),
        format!("/api/v1/deployments/{deployment_a}"),
        format!("/api/v1/deployments/{deployment_a}/executions"),
        "/api/v1/organizations/default".to_owned(),
    ];
    for path in &reads {
        let (s, body) = p.api_as(&admin_b, "GET", path, None).await;
        assert_eq!(s, 404, "GET {path} from another organization: {body}");
    }
    let writes: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            format!("/api/v1/products/{}/cohorts", a.product_id),
            Some(json!({ "name": "intruder" })),
        ),
        (
            "PATCH",
            format!("/api/v1/ca-certificates/{}", a.ca_id),
            Some(json!({ "enabled": false })),
        ),
        (
            "POST",
            "/api/v1/devices/iso-a-1/quarantine".into(),
            Some(json!({ "reason": "x" })),
        ),
        ("DELETE", "/api/v1/devices/iso-a-1/quarantine".into(), None),
        (
            "POST",
            format!("/api/v1/deployments/{deployment_a}/pause"),
            None,
        ),
        (
            "POST",
            format!("/api/v1/deployments/{deployment_a}/cancel"),
            None,
        ),
        ("DELETE", format!("/api/v1/api-keys/{key_a}"), None),
        ("DELETE", "/api/v1/api-keys/bootstrap-admin".into(), None),
    ];
    for (method, path, body) in writes {
        let (s, answer) = p.api_as(&admin_b, method, &path, body).await;
        assert_eq!(
            s, 404,
            "{method} {path} from another organization: {answer}"
        );
    }
    // Signing keys are per organization: revoking A's is a 404 for B.
    let (_, keys_a) = p.api("GET", "/api/v1/signing-keys", None).await;
    let signing_a = ids(&keys_a);
    assert_eq!(signing_a.len(), 1);
    let (s, _) = p
        .api_as(
            &admin_b,
            "DELETE",
            &format!("/api/v1/signing-keys/{}", signing_a[0]),
            None,
        )
        .await;
    assert_eq!(s, 404);

    // References into A are refused as if they did not exist.
    let (s, body) = p
        .api_as(
            &admin_b,
            "POST",
            "/api/v1/deployments",
            Some(json!({ "release_id": release_a, "cohort_id": fleet_b.cohort_id })),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("invalid_reference"))
    );
    let (s, body) = p
        .api_as(
            &admin_b,
            "POST",
            "/api/v1/api-keys",
            Some(json!({ "name": "x", "role": "viewer", "product_id": a.product_id })),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("invalid_scope"))
    );
    let (s, body) = p
        .api_as(
            &admin_b,
            "PATCH",
            &format!("/api/v1/ca-certificates/{}", fleet_b.ca_id),
            Some(json!({ "jitp": { "product_id": a.product_id, "cohort_id": a.cohort_id } })),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("unknown_product"))
    );

    // Lists hold only the caller's own.
    for (path, own_a, own_b) in [
        ("/api/v1/products", &a.product_id, &fleet_b.product_id),
        ("/api/v1/ca-certificates", &a.ca_id, &fleet_b.ca_id),
    ] {
        let (_, list_b) = p.api_as(&admin_b, "GET", path, None).await;
        let (_, list_a) = p.api("GET", path, None).await;
        assert!(
            ids(&list_b).contains(own_b) && !ids(&list_b).contains(own_a),
            "{path}"
        );
        assert!(
            ids(&list_a).contains(own_a) && !ids(&list_a).contains(own_b),
            "{path}"
        );
    }
    for path in [
        "/api/v1/devices",
        "/api/v1/releases",
        "/api/v1/deployments",
        "/api/v1/signing-keys",
    ] {
        let (s, list) = p.api_as(&admin_b, "GET", path, None).await;
        assert_eq!(s, 200, "{path}: {list}");
        assert_eq!(
            list["items"].as_array().map(Vec::len),
            Some(0),
            "{path}: {list}"
        );
    }
    let (_, keys_b) = p.api_as(&admin_b, "GET", "/api/v1/api-keys", None).await;
    assert!(keys_b["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["org_id"] == org_b.as_str()));
    let (_, orgs_b) = p
        .api_as(&admin_b, "GET", "/api/v1/organizations", None)
        .await;
    assert_eq!(ids(&orgs_b), vec![org_b.clone()]);
    let (_, orgs) = p.api("GET", "/api/v1/organizations", None).await;
    assert!(ids(&orgs).contains(&org_b) && ids(&orgs).contains(&"default".to_owned()));

    // Only the platform admin creates organizations or reads the shared broker's counters.
    let (s, _) = p
        .api_as(
            &admin_b,
            "POST",
            "/api/v1/organizations",
            Some(json!({ "name": "nested" })),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = p
        .api_as(&admin_b, "GET", "/api/v1/broker/metrics", None)
        .await;
    assert_eq!(s, 403);
    // Device ids are global (they are MQTT client ids): B cannot take A's even by JITP.
    let stolen = fleet_b.ca.issue("iso-a-1");
    assert!(Client::connect(p.device_options(&stolen, "iso-a-1"))
        .await
        .is_err());
    p.stop().await;
}

/// Every endpoint against every kind of key. `{P}`, `{C}`, `{CA}`, `{D}`, `{R}`, `{DEP}`,
/// `{N}` are filled in per request.
async fn roles_and_scopes_on_every_endpoint(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let fleet = p.jitp_fleet(json!({})).await;
    let other = p.jitp_fleet(json!({})).await;
    let _device = online_device(&p, &fleet, "rs-1").await;
    let (release, deployment) = release_and_deployment(&p, &admin, &fleet).await;
    // A command of the device and one of its cohort, for the rows that read them.
    for path in [
        "/api/v1/devices/rs-1/commands".to_owned(),
        format!("/api/v1/cohorts/{}/commands", fleet.cohort_id),
    ] {
        let (s, body) = p
            .api(
                "POST",
                &path,
                Some(json!({"id": "table-cmd", "name": "ping"})),
            )
            .await;
        assert_eq!(s, 201, "{path}: {body}");
    }
    let viewer = p.key_as(&admin, "viewer", json!({})).await;
    let operator = p.key_as(&admin, "operator", json!({})).await;
    let second_admin = p.key_as(&admin, "admin", json!({})).await;
    // An operator of another product, and a viewer of this fleet's cohort.
    let other_operator = p
        .key_as(
            &admin,
            "operator",
            json!({ "product_id": other.product_id }),
        )
        .await;
    let cohort_viewer = p
        .key_as(
            &admin,
            "viewer",
            json!({ "product_id": fleet.product_id, "cohort_id": fleet.cohort_id }),
        )
        .await;
    let keys = [
        ("viewer", viewer),
        ("operator", operator),
        ("admin", second_admin),
        ("other-product operator", other_operator),
        ("cohort viewer", cohort_viewer),
    ];

    // (method, path, body, expected status per key in the order above)
    type Row = (&'static str, &'static str, Option<Value>, [u16; 5]);
    let rows: Vec<Row> = vec![
        ("GET", "/api/v1/products", None, [200; 5]),
        (
            "GET",
            "/api/v1/products/{P}",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "POST",
            "/api/v1/products",
            Some(json!({"name": "{N}"})),
            [403, 201, 201, 403, 403],
        ),
        (
            "GET",
            "/api/v1/products/{P}/cohorts",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "POST",
            "/api/v1/products/{P}/cohorts",
            Some(json!({"name": "{N}"})),
            [403, 201, 201, 404, 403],
        ),
        (
            "GET",
            "/api/v1/cohorts/{C}",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "GET",
            "/api/v1/ca-certificates",
            None,
            [200, 200, 200, 403, 403],
        ),
        (
            "GET",
            "/api/v1/ca-certificates/{CA}",
            None,
            [200, 200, 200, 403, 403],
        ),
        (
            "PATCH",
            "/api/v1/ca-certificates/{CA}",
            Some(json!({"description": "d"})),
            [403, 200, 200, 403, 403],
        ),
        (
            "POST",
            "/api/v1/ca-certificates/verification-code",
            None,
            [403, 201, 201, 403, 403],
        ),
        (
            "POST",
            "/api/v1/ca-certificates",
            Some(json!({"certificate_pem": "x"})),
            [403, 422, 422, 403, 403],
        ),
        ("GET", "/api/v1/devices", None, [200; 5]),
        (
            "GET",
            "/api/v1/devices/{D}",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "GET",
            "/api/v1/devices/{D}/telemetry",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "GET",
            "/api/v1/devices/{D}/executions",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "POST",
            "/api/v1/devices/{D}/quarantine",
            Some(json!({"reason": "table", "mode": "commands_only"})),
            [403, 200, 200, 404, 403],
        ),
        (
            "DELETE",
            "/api/v1/devices/{D}/quarantine",
            None,
            [403, 200, 409, 404, 403],
        ),
        (
            "GET",
            "/api/v1/signing-keys",
            None,
            [200, 200, 200, 403, 403],
        ),
        (
            "POST",
            "/api/v1/signing-keys",
            Some(json!({"name": "k", "public_key": "bad"})),
            [403, 403, 422, 403, 403],
        ),
        (
            "DELETE",
            "/api/v1/signing-keys/nope",
            None,
            [403, 403, 404, 403, 403],
        ),
        ("GET", "/api/v1/releases", None, [200; 5]),
        (
            "GET",
            "/api/v1/releases/{R}",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "POST",
            "/api/v1/releases",
            Some(
                json!({"product_id": "{P}", "version": "bad", "url": "http://x", "size": 1, "sha256": "00", "signature": "x"}),
            ),
            [403, 422, 422, 422, 403],
        ),
        ("GET", "/api/v1/deployments", None, [200; 5]),
        (
            "GET",
            "/api/v1/deployments/{DEP}",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "GET",
            "/api/v1/deployments/{DEP}/executions",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "POST",
            "/api/v1/deployments/{DEP}/pause",
            None,
            [403, 200, 409, 404, 403],
        ),
        (
            "POST",
            "/api/v1/deployments/{DEP}/resume",
            None,
            [403, 200, 409, 404, 403],
        ),
        (
            "POST",
            "/api/v1/deployments",
            Some(json!({"release_id": "{R}", "cohort_id": "{C}"})),
            [403, 409, 409, 422, 403],
        ),
        (
            "POST",
            "/api/v1/deployments/{DEP}/promote",
            Some(json!({"cohort_id": "{C}"})),
            [403, 409, 409, 404, 403],
        ),
        ("GET", "/api/v1/api-keys", None, [403, 403, 200, 403, 403]),
        (
            "POST",
            "/api/v1/api-keys",
            Some(json!({"name": "k", "role": "viewer"})),
            [403, 403, 201, 403, 403],
        ),
        (
            "DELETE",
            "/api/v1/api-keys/nope",
            None,
            [403, 403, 404, 403, 403],
        ),
        ("GET", "/api/v1/organizations", None, [200; 5]),
        ("GET", "/api/v1/organizations/default", None, [200; 5]),
        (
            "POST",
            "/api/v1/organizations",
            Some(json!({"name": "{N}"})),
            [403, 403, 201, 403, 403],
        ),
        (
            "GET",
            "/api/v1/broker/metrics",
            None,
            [200, 200, 200, 403, 403],
        ),
        (
            "POST",
            "/api/v1/devices",
            Some(json!({"id": "{N}", "product_id": "{P}", "cohort_id": "{C}"})),
            [403, 201, 201, 422, 403],
        ),
        (
            "PATCH",
            "/api/v1/devices/{D}",
            Some(json!({"tags": {"k": "v"}})),
            [403, 200, 200, 404, 403],
        ),
        ("GET", "/api/v1/audit", None, [403, 403, 200, 403, 403]),
        ("GET", "/api/v1/fleet/summary", None, [200; 5]),
        (
            "POST",
            "/api/v1/products/{P}/devices/import",
            Some(json!([{"id": "{N}", "cohort_id": "{C}"}])),
            [403, 200, 200, 404, 403],
        ),
        (
            "POST",
            "/api/v1/devices/{D}/commands",
            Some(json!({"id": "{N}", "name": "ping"})),
            [403, 201, 201, 404, 403],
        ),
        (
            "GET",
            "/api/v1/devices/{D}/commands/table-cmd",
            None,
            [200, 200, 200, 404, 200],
        ),
        (
            "POST",
            "/api/v1/cohorts/{C}/commands",
            Some(json!({"id": "{N}", "name": "ping"})),
            [403, 201, 201, 404, 403],
        ),
        (
            "GET",
            "/api/v1/cohorts/{C}/commands/table-cmd",
            None,
            [200, 200, 200, 404, 200],
        ),
        // Deletions that something still depends on, and a dry run: nothing goes.
        (
            "DELETE",
            "/api/v1/devices?id_prefix=rs-&dry_run=true",
            None,
            [403, 200, 200, 200, 403],
        ),
        (
            "DELETE",
            "/api/v1/products/{P}",
            None,
            [403, 409, 409, 403, 403],
        ),
        (
            "DELETE",
            "/api/v1/cohorts/{C}",
            None,
            [403, 409, 409, 404, 403],
        ),
        (
            "DELETE",
            "/api/v1/ca-certificates/{CA}",
            None,
            [403, 409, 409, 403, 403],
        ),
        (
            "DELETE",
            "/api/v1/organizations/nope",
            None,
            [403, 403, 404, 403, 403],
        ),
        // Destructive ones last.
        (
            "POST",
            "/api/v1/deployments/{DEP}/rollback",
            Some(json!({"reason": "table"})),
            [403, 422, 422, 404, 403],
        ),
        (
            "POST",
            "/api/v1/deployments/{DEP}/cancel",
            Some(json!({"reason": "table"})),
            [403, 200, 409, 404, 403],
        ),
        (
            "POST",
            "/api/v1/devices/{D}/revoke-certificate",
            None,
            [403, 200, 200, 404, 403],
        ),
        (
            "DELETE",
            "/api/v1/devices/{D}",
            None,
            [403, 204, 404, 404, 403],
        ),
    ];
    // The table covers every operation of the OpenAPI document (but the two without a key).
    let (_, doc) = p.api("GET", "/api/v1/openapi.json", None).await;
    let mut missing = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            // The open ones: probes and the document itself.
            if [
                "/api/v1/health",
                "/api/v1/openapi.json",
                "/healthz",
                "/readyz",
            ]
            .contains(&path.as_str())
            {
                continue;
            }
            let covered = rows.iter().any(|(m, row_path, _, _)| {
                let row_path = row_path.split('?').next().unwrap_or_default();
                let (a, b): (Vec<&str>, Vec<&str>) =
                    (path.split('/').collect(), row_path.split('/').collect());
                *m == method
                    && a.len() == b.len()
                    && a.iter().zip(&b).all(|(x, y)| x.starts_with('{') || x == y)
            });
            if !covered {
                missing.push(format!("{method} {path}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the role and scope table: {missing:?}"
    );
    let fill = |s: &str, n: usize| {
        s.replace("{P}", &fleet.product_id)
            .replace("{C}", &fleet.cohort_id)
            .replace("{CA}", &fleet.ca_id)
            .replace("{D}", "rs-1")
            .replace("{R}", &release)
            .replace("{DEP}", &deployment)
            .replace("{N}", &format!("name-{n}"))
    };
    let mut n = 0;
    for (method, path, body, expected) in &rows {
        for ((who, key), want) in keys.iter().zip(expected) {
            n += 1;
            let path = fill(path, n);
            let body = body
                .as_ref()
                .map(|b| serde_json::from_str::<Value>(&fill(&b.to_string(), n)).unwrap());
            let (got, answer) = p.api_as(key, method, &path, body).await;
            assert_eq!(got, *want, "{who}: {method} {path}: {answer}");
        }
    }
    // Without a key, everything but health and the document is a 401.
    let http = reqwest::Client::new();
    for (method, path, _, _) in &rows {
        let url = format!("http://{}{}", p.app().http_addr(), fill(path, 0));
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let s = http.request(m, url).send().await.unwrap().status();
        assert_eq!(s.as_u16(), 401, "{method} {path}");
    }
    p.stop().await;
}

async fn quarantine_reaches_the_live_session(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("q-1");
    let mut live = Client::connect(p.device_options(&cert, "q-1"))
        .await
        .unwrap();
    live.client
        .subscribe(
            format!("cohorts/{}/updates", fleet.cohort_id),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    live.wait_for(|pk| matches!(pk, rumqttc::Packet::SubAck(_)).then_some(()))
        .await;

    let started = std::time::Instant::now();
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices/q-1/quarantine",
            Some(json!({ "reason": "tampering suspected" })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["mode"], "commands_only");
    assert_eq!(body["session_ended"], true);
    live.closed().await;
    println!(
        "quarantine ended the live session {:?} after the request",
        started.elapsed()
    );
    let d = eventually("quarantined and offline", || async {
        let d = p.device("q-1").await;
        (d["online"] == false).then_some(d)
    })
    .await;
    assert_eq!(d["state"], "quarantined");
    assert_eq!(d["state_reason"], "quarantined: tampering suspected");

    // Commands only: it may connect, hear and ack its commands, and nothing else.
    let mut q = Client5::connect(p.device_options_v5(&cert, "q-1"))
        .await
        .unwrap();
    q.client
        .subscribe(
            "devices/q-1/commands",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    q.client
        .subscribe(
            format!("cohorts/{}/updates", fleet.cohort_id),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, SubscribeReasonCode};
    let mut codes = Vec::new();
    while codes.len() < 2 {
        let c = q
            .wait_for(|pk| match pk {
                P5::SubAck(a) => Some(a.return_codes.clone()),
                _ => None,
            })
            .await;
        codes.extend(c);
    }
    assert!(
        matches!(codes[0], SubscribeReasonCode::Success(_)),
        "{codes:?}"
    );
    assert!(
        !matches!(codes[1], SubscribeReasonCode::Success(_)),
        "{codes:?}"
    );
    q.client
        .publish(
            "devices/q-1/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"t":1}"#,
        )
        .await
        .unwrap();
    let reason = q
        .wait_for(|pk| match pk {
            P5::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
    );
    // A backend command still reaches it.
    let svc = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    svc.client
        .publish(
            "devices/q-1/commands",
            QoS::AtLeastOnce,
            false,
            r#"{"id":"c-1","name":"diagnose"}"#,
        )
        .await
        .unwrap();
    q.wait_for(|pk| match pk {
        P5::Publish(m) if m.topic.as_ref() == b"devices/q-1/commands" => Some(()),
        _ => None,
    })
    .await;

    // Refuse: the commands-only session ends, and connecting is refused.
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices/q-1/quarantine",
            Some(json!({ "reason": "confirmed", "mode": "refuse" })),
        )
        .await;
    assert_eq!(
        (s, body["session_ended"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    q.closed().await;
    assert!(Client::connect(p.device_options(&cert, "q-1"))
        .await
        .is_err());
    let (_, metrics) = p.api("GET", "/api/v1/broker/metrics", None).await;
    assert!(metrics.to_string().contains("quarantined"), "{metrics}");

    // A restart keeps the quarantine; lifting it restores normal rights.
    let mut p = p;
    p.restart().await;
    assert!(Client::connect(p.device_options(&cert, "q-1"))
        .await
        .is_err());
    let (s, body) = p
        .api("DELETE", "/api/v1/devices/q-1/quarantine", None)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["state"], "offline");
    let (s, _) = p
        .api("DELETE", "/api/v1/devices/q-1/quarantine", None)
        .await;
    assert_eq!(s, 409);
    let mut back = Client::connect(p.device_options(&cert, "q-1"))
        .await
        .unwrap();
    back.client
        .subscribe(
            format!("cohorts/{}/updates", fleet.cohort_id),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let codes = back
        .wait_for(|pk| match pk {
            rumqttc::Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await;
    assert!(
        matches!(codes[0], rumqttc::SubscribeReasonCode::Success(_)),
        "{codes:?}"
    );
    eventually("online again", || async {
        let d = p.device("q-1").await;
        (d["state"] == "online").then_some(())
    })
    .await;
    p.stop().await;
}

async fn service_keys_follow_role_and_scope_over_mqtt(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let mine = p.jitp_fleet(json!({})).await;
    let theirs = p.jitp_fleet(json!({})).await;
    let (_, admin_b) = p.organization("mqtt-tenant").await;
    let foreign = p.jitp_fleet_as(&admin_b, json!({})).await;
    let d_mine = online_device(&p, &mine, "svc-mine").await;
    let d_theirs = online_device(&p, &theirs, "svc-theirs").await;
    let d_foreign = {
        let cert = foreign.ca.issue("svc-foreign");
        Client::connect(p.device_options(&cert, "svc-foreign"))
            .await
            .unwrap()
    };

    let viewer = p
        .key_as(&admin, "viewer", json!({ "product_id": mine.product_id }))
        .await;
    let mut watcher = Client::connect(p.service_options("watcher", &viewer))
        .await
        .unwrap();
    watcher
        .client
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    watcher
        .client
        .subscribe("devices/svc-theirs/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        acks.extend(
            watcher
                .wait_for(|pk| match pk {
                    rumqttc::Packet::SubAck(a) => Some(a.return_codes.clone()),
                    _ => None,
                })
                .await,
        );
    }
    assert!(matches!(acks[0], rumqttc::SubscribeReasonCode::Success(_)));
    // Granted (a refusal would tell that the device exists), and it delivers nothing.
    assert!(matches!(acks[1], rumqttc::SubscribeReasonCode::Success(_)));

    for (c, id) in [
        (&d_theirs, "svc-theirs"),
        (&d_foreign, "svc-foreign"),
        (&d_mine, "svc-mine"),
    ] {
        c.client
            .publish(
                format!("devices/{id}/telemetry"),
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"from":"{id}"}}"#),
            )
            .await
            .unwrap();
    }
    // Published last, yet the first (and only) telemetry the scoped viewer hears.
    let topic = watcher
        .wait_for(|pk| match pk {
            rumqttc::Packet::Publish(m) => Some(m.topic.clone()),
            _ => None,
        })
        .await;
    assert_eq!(topic, "devices/svc-mine/telemetry");
    // A viewer may not command; its session ends (MQTT 3.1.1 has no negative PUBACK).
    watcher
        .client
        .publish("devices/svc-mine/commands", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    watcher.closed().await;

    // A scoped operator commands its own product's devices only.
    let operator = p
        .key_as(&admin, "operator", json!({ "product_id": mine.product_id }))
        .await;
    let mut ops = Client5::connect({
        let addr = p.app().service_addr();
        let mut o = rumqttc::v5::MqttOptions::new("ops5", "127.0.0.1", addr.port());
        o.set_credentials("service", &operator);
        o
    })
    .await
    .unwrap();
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    let mut reasons = Vec::new();
    for target in ["svc-mine", "svc-theirs", "svc-foreign"] {
        ops.client
            .publish(
                format!("devices/{target}/commands"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                r#"{"id":"c","name":"ping"}"#,
            )
            .await
            .unwrap();
        reasons.push(
            ops.wait_for(|pk| match pk {
                P5::PubAck(a) => Some(a.reason),
                _ => None,
            })
            .await,
        );
    }
    assert_eq!(
        reasons,
        vec![
            PubAckReason::Success,
            PubAckReason::NotAuthorized,
            PubAckReason::NotAuthorized
        ]
    );

    // Revoking the key ends its live session at once.
    let (_, keys) = p.api("GET", "/api/v1/api-keys", None).await;
    let key_id = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "operator" && k["product_id"] == mine.product_id.as_str())
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .next()
        .unwrap();
    let (s, _) = p
        .api("DELETE", &format!("/api/v1/api-keys/{key_id}"), None)
        .await;
    assert_eq!(s, 200);
    ops.closed().await;
    assert!(Client::connect(p.service_options("again", &operator))
        .await
        .is_err());
    p.stop().await;
}

async fn ca_registration_needs_proof_of_possession(p: Platform) {
    let ca = TestCa::new("Proven CA");
    let impostor = TestCa::new("Proven CA");
    let admin = p.app().admin_token().to_owned();
    let (_, admin_b) = p.organization("pop-tenant").await;
    let register = |proof: Option<String>| {
        let body = json!({ "certificate_pem": ca.pem, "verification_certificate_pem": proof });
        let p = &p;
        async move { p.api("POST", "/api/v1/ca-certificates", Some(body)).await }
    };
    let code = |token: String| {
        let p = &p;
        async move {
            let (s, c) = p
                .api_as(
                    &token,
                    "POST",
                    "/api/v1/ca-certificates/verification-code",
                    None,
                )
                .await;
            assert_eq!(s, 201, "{c}");
            c["code"].as_str().unwrap().to_owned()
        }
    };
    let refused = |(s, body): (u16, Value), want: &str| {
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (422, Some(want)),
            "{body}"
        );
    };

    refused(register(None).await, "proof_required");
    refused(register(Some("not pem".into())).await, "invalid_proof");
    // Signed by another key (same subject name): no proof of this CA's key.
    let c = code(admin.clone()).await;
    refused(
        register(Some(impostor.issue(&c).cert_pem)).await,
        "invalid_proof",
    );
    // Signed by the CA, but the CN is no code, or another organization's code.
    refused(
        register(Some(ca.issue("made-up-code").cert_pem)).await,
        "invalid_proof",
    );
    let theirs = code(admin_b.clone()).await;
    refused(
        register(Some(ca.issue(&theirs).cert_pem)).await,
        "invalid_proof",
    );
    // Expired verification certificate.
    let now = time::OffsetDateTime::now_utc();
    let stale = ca.issue_valid(
        &c,
        now - time::Duration::days(3),
        now - time::Duration::days(1),
    );
    refused(register(Some(stale.cert_pem)).await, "invalid_proof");

    // The refused attempts did not use the code up.
    let (s, body) = register(Some(ca.issue(&c).cert_pem)).await;
    assert_eq!(s, 201, "{body}");
    // A code is used once.
    let other = TestCa::new("Second CA");
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/ca-certificates",
            Some(json!({ "certificate_pem": other.pem,
                "verification_certificate_pem": other.issue(&c).cert_pem })),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("invalid_proof")),
        "{body}"
    );
    // The same CA again (by any organization) is a conflict, and gives its code back.
    let c2 = code(admin.clone()).await;
    let (s, _) = register(Some(ca.issue(&c2).cert_pem)).await;
    assert_eq!(s, 409);
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/ca-certificates",
            Some(json!({ "certificate_pem": other.pem,
                "verification_certificate_pem": other.issue(&c2).cert_pem })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    p.stop().await;
}

async fn a_disabled_ca_may_keep_its_devices(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let old = fleet.ca.issue("keep-1");
    let mut live = Client::connect(p.device_options(&old, "keep-1"))
        .await
        .unwrap();
    live.client
        .subscribe("devices/keep-1/commands", QoS::AtLeastOnce)
        .await
        .unwrap();
    live.wait_for(|pk| matches!(pk, rumqttc::Packet::SubAck(_)).then_some(()))
        .await;

    let (s, body) = p
        .api(
            "PATCH",
            &format!("/api/v1/ca-certificates/{}", fleet.ca_id),
            Some(json!({ "enabled": false, "keep_devices_when_disabled": true })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["keep_devices_when_disabled"], true);
    // The live session stays, and the device may reconnect; a new device is not provisioned.
    tokio::time::sleep(Duration::from_millis(300)).await;
    live.client
        .publish("devices/keep-1/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    live.wait_for(|pk| matches!(pk, rumqttc::Packet::PubAck(_)).then_some(()))
        .await;
    live.kill().await;
    let again = Client::connect(p.device_options(&old, "keep-1")).await;
    assert!(
        again.is_ok(),
        "an existing device of a disabled, keeping CA"
    );
    let newcomer = fleet.ca.issue("keep-new");
    assert!(Client::connect(p.device_options(&newcomer, "keep-new"))
        .await
        .is_err());
    let (s, _) = p.api("GET", "/api/v1/devices/keep-new", None).await;
    assert_eq!(s, 404, "not provisioned");

    // Without keeping, its devices are cut off.
    let mut again = again.unwrap();
    let (s, _) = p
        .api(
            "PATCH",
            &format!("/api/v1/ca-certificates/{}", fleet.ca_id),
            Some(json!({ "keep_devices_when_disabled": false })),
        )
        .await;
    assert_eq!(s, 200);
    again.closed().await;
    assert!(Client::connect(p.device_options(&old, "keep-1"))
        .await
        .is_err());
    p.stop().await;
}

/// Hex SHA-256 of a PEM certificate's DER, as the platform pins and revokes them.
fn x509_fingerprint(pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    broker::registry::fingerprint(&der)
}

async fn pre_provisioned_devices_and_certificate_pins(p: Platform) {
    // A CA that provisions nobody: only registered devices may connect with its certificates.
    let fleet = p.jitp_fleet(json!({})).await;
    let (s, _) = p
        .api(
            "PATCH",
            &format!("/api/v1/ca-certificates/{}", fleet.ca_id),
            Some(json!({ "jitp": null })),
        )
        .await;
    assert_eq!(s, 200);
    let genuine = fleet.ca.issue("pin-1");
    let clone = fleet.ca.issue("pin-1");
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "pin-1", "product_id": fleet.product_id,
                "cohort_id": fleet.cohort_id, "tags": { "line": "a" },
                "certificate_pem": genuine.cert_pem })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["state"], "registered");
    // Taken ids, bad pins and bad references are refused with what was wrong.
    let pid = fleet.product_id.clone();
    for (body, status, code) in [
        (json!({ "id": "pin-1", "product_id": pid }), 409, "conflict"),
        (
            json!({ "id": "bad id", "product_id": pid }),
            422,
            "invalid_device_id",
        ),
        (
            json!({ "id": "pin-2", "product_id": "nope" }),
            422,
            "unknown_product",
        ),
        (
            json!({ "id": "pin-2", "product_id": pid, "cohort_id": "nope" }),
            422,
            "unknown_cohort",
        ),
        (
            json!({ "id": "pin-2", "product_id": pid, "certificate_pem": "junk" }),
            422,
            "invalid_certificate",
        ),
        (
            json!({ "id": "pin-2", "product_id": pid, "certificate_fingerprint": "abc" }),
            422,
            "invalid_certificate",
        ),
        (
            json!({ "id": "pin-2", "product_id": pid, "tags": { "k": 1 } }),
            422,
            "invalid_tags",
        ),
    ] {
        let (s, answer) = p.api("POST", "/api/v1/devices", Some(body.clone())).await;
        assert_eq!(
            (s, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let (s, _) = p.api("GET", "/api/v1/devices/pin-2", None).await;
    assert_eq!(s, 404, "no refused request wrote anything");

    // Another certificate for the pinned id, from the same CA, is refused.
    assert!(Client::connect(p.device_options(&clone, "pin-1"))
        .await
        .is_err());
    let (_, m) = p.api("GET", "/api/v1/broker/metrics", None).await;
    assert!(m.to_string().contains("pin_mismatch"), "{m}");
    let c = Client::connect(p.device_options(&genuine, "pin-1"))
        .await
        .unwrap();
    let d = eventually("pinned device online", || async {
        let d = p.device("pin-1").await;
        (d["state"] == "online").then_some(d)
    })
    .await;
    // Its first connection recorded its CA and certificate.
    assert_eq!(d["ca_id"], json!(fleet.ca_id), "{d}");
    assert_eq!(
        d["certificate"]["fingerprint_sha256"],
        json!(x509_fingerprint(&genuine.cert_pem)),
        "{d}"
    );
    c.kill().await;

    // Unpinned: any certificate of its organization's CAs, none of another organization's.
    let (_, admin_b) = p.organization("pin-tenant").await;
    let foreign = p.jitp_fleet_as(&admin_b, json!({})).await;
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "free-1", "product_id": fleet.product_id })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert!(
        Client::connect(p.device_options(&foreign.ca.issue("free-1"), "free-1"))
            .await
            .is_err()
    );
    let (s, _) = p
        .api_as(&admin_b, "GET", "/api/v1/devices/free-1", None)
        .await;
    assert_eq!(s, 404, "the other organization's JITP did not take the id");
    Client::connect(p.device_options(&fleet.ca.issue("free-1"), "free-1"))
        .await
        .unwrap();
    // From its first connection on, it belongs to that CA: another CA of its own
    // organization no longer speaks for it.
    assert_eq!(p.device("free-1").await["ca_id"], json!(fleet.ca_id));
    let sibling = p.jitp_fleet(json!({})).await;
    assert!(
        Client::connect(p.device_options(&sibling.ca.issue("free-1"), "free-1"))
            .await
            .is_err()
    );

    // A fingerprint pin works like a PEM one, and survives a restart.
    let other = fleet.ca.issue("pin-3");
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "pin-3", "product_id": fleet.product_id,
                "certificate_fingerprint": x509_fingerprint(&other.cert_pem).to_uppercase() })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let mut p = p;
    p.restart().await;
    assert!(
        Client::connect(p.device_options(&fleet.ca.issue("pin-3"), "pin-3"))
            .await
            .is_err()
    );
    Client::connect(p.device_options(&other, "pin-3"))
        .await
        .unwrap();
    p.stop().await;
}

async fn revocation_and_deletion_reach_the_live_session(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let cert = fleet.ca.issue("rev-1");
    let mut live = Client::connect(p.device_options(&cert, "rev-1"))
        .await
        .unwrap();
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices/rev-1/revoke-certificate",
            Some(json!({ "reason": "key leaked" })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["session_ended"], true);
    assert_eq!(body["revoked"], json!([x509_fingerprint(&cert.cert_pem)]));
    live.closed().await;
    assert!(Client::connect(p.device_options(&cert, "rev-1"))
        .await
        .is_err());
    let (_, m) = p.api("GET", "/api/v1/broker/metrics", None).await;
    assert!(m.to_string().contains("certificate_revoked"), "{m}");
    // The device's detail says its certificate is revoked, when and why.
    let d = p.device("rev-1").await;
    assert_eq!(d["certificate_revoked"], true, "{d}");
    assert_eq!(
        d["revoked_certificates"][0]["fingerprint_sha256"],
        x509_fingerprint(&cert.cert_pem)
    );
    assert_eq!(d["revoked_certificates"][0]["reason"], "key leaked");
    assert!(
        d["revoked_certificates"][0]["revoked_at"].is_string(),
        "{d}"
    );

    // Revoked while offline: the detail says so before the device ever tries again.
    let offline = fleet.ca.issue("rev-2");
    Client::connect(p.device_options(&offline, "rev-2"))
        .await
        .unwrap()
        .kill()
        .await;
    assert_eq!(p.device("rev-2").await["certificate_revoked"], false);
    let (s, body) = p
        .api("POST", "/api/v1/devices/rev-2/revoke-certificate", None)
        .await;
    assert_eq!(s, 200, "{body}");
    let d = p.device("rev-2").await;
    assert_eq!(d["certificate_revoked"], true, "{d}");
    assert_eq!(
        d["revoked_certificates"][0]["reason"],
        "revoked by an operator"
    );

    // Deleting a device ends its session and refuses its certificate, though its CA still
    // provisions on first connection.
    let cert2 = fleet.ca.issue("del-1");
    let mut live = Client::connect(p.device_options(&cert2, "del-1"))
        .await
        .unwrap();
    let (s, _) = p.api("DELETE", "/api/v1/devices/del-1", None).await;
    assert_eq!(s, 204);
    live.closed().await;
    let (s, _) = p.api("GET", "/api/v1/devices/del-1", None).await;
    assert_eq!(s, 404);
    let (s, _) = p.api("DELETE", "/api/v1/devices/del-1", None).await;
    assert_eq!(s, 404);
    let mut p = p;
    p.restart().await;
    assert!(Client::connect(p.device_options(&cert2, "del-1"))
        .await
        .is_err());
    let (s, _) = p.api("GET", "/api/v1/devices/del-1", None).await;
    assert_eq!(s, 404, "not provisioned again");
    // A new certificate for the id is a new identity: JITP takes it.
    Client::connect(p.device_options(&fleet.ca.issue("del-1"), "del-1"))
        .await
        .unwrap();
    p.stop().await;
}

async fn device_queries_filter_and_page(p: Platform) {
    let fleet = p.jitp_fleet(json!({ "site": "berlin" })).await;
    let before = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let now = time::OffsetDateTime::now_utc();
    // (id, firmware, certificate lifetime in days)
    let fleet_spec = [
        ("qa-1", "1.0.0", 400),
        ("qa-2", "1.0.0", 10),
        ("qa-3", "2.0.0", 400),
        ("qb-1", "2.0.0", 5),
    ];
    for (id, fw, days) in fleet_spec {
        let cert = fleet.ca.issue_valid(
            id,
            now - time::Duration::hours(1),
            now + time::Duration::days(days),
        );
        let mut c = Client::connect(p.device_options(&cert, id)).await.unwrap();
        c.client
            .publish(
                format!("devices/{id}/state"),
                QoS::AtLeastOnce,
                true,
                format!(r#"{{"firmware_version":"{fw}"}}"#),
            )
            .await
            .unwrap();
        c.wait_for(|pk| matches!(pk, rumqttc::Packet::PubAck(_)).then_some(()))
            .await;
        c.kill().await;
    }
    // One registered device that never connected.
    let (s, _) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "qa-9", "product_id": fleet.product_id })),
        )
        .await;
    assert_eq!(s, 201);
    let list = |query: String| {
        let p = &p;
        async move {
            let (s, body) = p
                .api("GET", &format!("/api/v1/devices?{query}"), None)
                .await;
            assert_eq!(s, 200, "{query}: {body}");
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let pid = &fleet.product_id;
    eventually("every device offline with its firmware", || async {
        let v = list(format!(
            "product_id={pid}&firmware_version=1.0.0&online=false"
        ))
        .await;
        (v == ["qa-1", "qa-2"]).then_some(())
    })
    .await;
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("product_id={pid}&firmware_version=2.0.0"),
            vec!["qa-3", "qb-1"],
        ),
        (
            format!("product_id={pid}&id_prefix=qa-"),
            vec!["qa-1", "qa-2", "qa-3", "qa-9"],
        ),
        (
            format!("product_id={pid}&id_prefix=qa-&state=registered"),
            vec!["qa-9"],
        ),
        (
            format!("product_id={pid}&last_seen_after={}", fmt(before)),
            vec!["qa-1", "qa-2", "qa-3", "qb-1"],
        ),
        (
            format!("product_id={pid}&last_seen_before={}", fmt(before)),
            vec![],
        ),
        (
            format!(
                "product_id={pid}&cert_expires_before={}",
                fmt(now + time::Duration::days(30))
            ),
            vec!["qa-2", "qb-1"],
        ),
        (
            format!("product_id={pid}&tag=site:berlin&firmware_version=2.0.0&id_prefix=qb"),
            vec!["qb-1"],
        ),
    ];
    for (query, want) in cases {
        assert_eq!(list(query.clone()).await, want, "{query}");
    }
    // Sorted by when each was last seen (they connected in id order; qa-9 never did).
    assert_eq!(
        list(format!("product_id={pid}&sort=-last_seen")).await,
        ["qb-1", "qa-3", "qa-2", "qa-1", "qa-9"]
    );
    assert_eq!(
        list(format!("product_id={pid}&sort=last_seen")).await,
        ["qa-9", "qa-1", "qa-2", "qa-3", "qb-1"]
    );
    // Sorted pages of two resume their sort exactly; a cursor of another sort is refused.
    for sort in ["-last_seen", "created_at", "-created_at"] {
        let whole = list(format!("product_id={pid}&sort={sort}")).await;
        let mut paged = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = format!("/api/v1/devices?product_id={pid}&sort={sort}&limit=2");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let (s, body) = p.api("GET", &q, None).await;
            assert_eq!(s, 200, "{body}");
            paged.extend(ids(&body));
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(paged, whole, "{sort}");
        assert_eq!(whole.len(), 5, "{sort}");
    }
    let (_, first) = p
        .api(
            "GET",
            &format!("/api/v1/devices?product_id={pid}&sort=-last_seen&limit=1"),
            None,
        )
        .await;
    let c = first["next_cursor"].as_str().unwrap();
    let (s, answer) = p
        .api(
            "GET",
            &format!("/api/v1/devices?product_id={pid}&sort=created_at&cursor={c}"),
            None,
        )
        .await;
    assert_eq!(
        (s, answer["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    // Pages of two, by cursor, cover the prefix exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("/api/v1/devices?product_id={pid}&id_prefix=qa-&limit=2");
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let (_, body) = p.api("GET", &q, None).await;
        seen.extend(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["qa-1", "qa-2", "qa-3", "qa-9"]);
    for bad in [
        "id_prefix=a/b",
        "id_prefix=",
        "last_seen_after=yesterday",
        "cert_expires_before=2026-13-01T00:00:00Z",
        "firmware_version=1&firmware_version=2",
    ] {
        let (s, body) = p.api("GET", &format!("/api/v1/devices?{bad}"), None).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}"
        );
    }
    p.stop().await;
}

/// The outcome and error code of each row of an import report, in order.
fn outcomes(report: &Value) -> Vec<(String, Option<String>)> {
    report["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {report}"))
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_owned(),
                r["error"]["code"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

async fn bulk_import_reports_every_row(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let (s, line_b) = p
        .api(
            "POST",
            &format!("/api/v1/products/{}/cohorts", fleet.product_id),
            Some(json!({ "name": "line-b" })),
        )
        .await;
    assert_eq!(s, 201, "{line_b}");
    let path = format!("/api/v1/products/{}/devices/import", fleet.product_id);
    let pinned = fleet.ca.issue("imp-2");
    let by_fingerprint = fleet.ca.issue("imp-3");
    let junk_pem = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----";
    // Line numbers: the PEM of imp-2 spans several lines, so the rows after it start later.
    let csv = format!(
        "id,cohort,tags,certificate\n\
         imp-1,{cohort},site=a;line=1,\n\
         imp-2,line-b,,\"{pem}\"\n\
         imp-3,,k=v,{fp}\n\
         imp-4,nope,,\n\
         imp-5,,,\"{junk_pem}\"\n\
         imp-1,,,\n\
         imp-6,a,b,c,d\n\
         bad id,,,\n\
         imp-7,,notatag,\n",
        cohort = fleet.cohort_id,
        pem = pinned.cert_pem.trim(),
        fp = x509_fingerprint(&by_fingerprint.cert_pem),
    );
    let expected_failures = [
        ("imp-4", "unknown_cohort", Some("cohort")),
        ("imp-5", "invalid_certificate", Some("certificate_pem")),
        ("imp-1", "duplicate_id", Some("id")),
        ("imp-6", "malformed_row", None),
        ("bad id", "invalid_device_id", Some("id")),
        ("imp-7", "invalid_tags", Some("tags")),
    ];
    let (s, report) = p.api_raw("POST", &path, "text/csv", csv.clone()).await;
    assert_eq!(s, 200, "{report}");
    assert_eq!(
        (&report["created"], &report["skipped"], &report["failed"]),
        (&json!(3), &json!(0), &json!(6)),
        "{report}"
    );
    let results = report["results"].as_array().unwrap();
    let pem_lines = pinned.cert_pem.trim().lines().count() as u64;
    assert_eq!(results[0]["line"], 2);
    assert_eq!(results[2]["line"], 3 + pem_lines);
    for (r, (id, code, column)) in results[3..].iter().zip(expected_failures) {
        assert_eq!(r["outcome"], "failed", "{r}");
        assert_eq!(r["device_id"], id, "{r}");
        assert_eq!(r["error"]["code"], code, "{r}");
        assert_eq!(r["error"]["column"].as_str(), column, "{r}");
        assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    }
    // The good rows were written whole; the bad ones not at all.
    let d = p.device("imp-1").await;
    assert_eq!(
        (&d["state"], &d["cohort_id"], &d["tags"]),
        (
            &json!("registered"),
            &json!(fleet.cohort_id),
            &json!({"site": "a", "line": "1"})
        )
    );
    assert_eq!(p.device("imp-2").await["cohort_id"], line_b["id"]);
    for id in ["imp-4", "imp-5", "imp-6", "imp-7"] {
        let (s, _) = p.api("GET", &format!("/api/v1/devices/{id}"), None).await;
        assert_eq!(s, 404, "{id}");
    }

    // The same file again: nothing new, every created row skipped, the same failures.
    let (s, again) = p.api_raw("POST", &path, "text/csv", csv.clone()).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(
        (&again["created"], &again["skipped"], &again["failed"]),
        (&json!(0), &json!(3), &json!(6)),
        "{again}"
    );
    assert_eq!(
        outcomes(&again)[..3],
        vec![("skipped".into(), Some("exists".into())); 3]
    );

    // The imported pins hold: imp-2 is admitted with its certificate only.
    assert!(
        Client::connect(p.device_options(&fleet.ca.issue("imp-2"), "imp-2"))
            .await
            .is_err()
    );
    let c = Client::connect(p.device_options(&pinned, "imp-2"))
        .await
        .unwrap();
    c.kill().await;

    // JSON: a device that differs from its stored self fails; elements that are not devices
    // fail alone.
    let (s, report) = p
        .api(
            "POST",
            &path,
            Some(json!([
                { "id": "imp-8", "cohort_id": "line-b", "tags": { "k": "v" } },
                { "id": "imp-1", "tags": { "site": "b" } },
                { "id": "imp-9", "colour": "red" },
                7,
                { "id": "imp-10", "certificate_fingerprint": "abc" },
            ])),
        )
        .await;
    assert_eq!(s, 200, "{report}");
    assert_eq!(
        outcomes(&report),
        vec![
            ("created".into(), None),
            ("failed".into(), Some("exists_differently".into())),
            ("failed".into(), Some("malformed_row".into())),
            ("failed".into(), Some("malformed_row".into())),
            ("failed".into(), Some("invalid_certificate".into())),
        ]
    );
    assert_eq!(report["results"][2]["error"]["column"], "colour");
    assert_eq!(report["results"][1]["row"], 2);
    assert_eq!(
        p.device("imp-1").await["tags"]["site"],
        "a",
        "not overwritten"
    );

    // Files that cannot be read at all are refused whole, saying why.
    for (content_type, body, status, code) in [
        ("text/csv", "id,colour\nx,red\n", 422, "invalid_file"),
        ("text/csv", "cohort,tags\nc,\n", 422, "invalid_file"),
        ("application/json", "[{\"id\": ", 400, "malformed_json"),
        ("application/json", "{\"id\": \"x\"}", 400, "invalid_body"),
        ("text/plain", "id\nx\n", 415, "unsupported_media_type"),
    ] {
        let (s, answer) = p.api_raw("POST", &path, content_type, body).await;
        assert_eq!(
            (s, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    // Another organization's key does not see the product.
    let (_, admin_b) = p.organization("import-tenant").await;
    let (s, _) = p
        .api_as(&admin_b, "POST", &path, Some(json!([{ "id": "imp-11" }])))
        .await;
    assert_eq!(s, 404);
    let (s, _) = p.api("GET", "/api/v1/devices/imp-11", None).await;
    assert_eq!(s, 404);
    p.stop().await;
}

/// A device agent of `fleet` following `cohort`, whose commands arrive on the channel.
fn cohort_agent(
    p: &Platform,
    fleet: &Fleet,
    id: &str,
    cohort: &str,
) -> (
    device_client::AgentHandle,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use device_client::{fleet_wire::payload::Command, TlsConfig};
    use device_client::{Agent, AgentConfig, ClientIdentity, CommandOutcome, ConnectOptions};
    let cert = fleet.ca.issue(id);
    let tls = TlsConfig::from_ca_pem(p.server_ca_pem().as_bytes())
        .unwrap()
        .with_identity(
            ClientIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap(),
        );
    let url = format!("mqtts://127.0.0.1:{}", p.app().mqtts_addr().port());
    let mut config = AgentConfig::new(ConnectOptions::new(url.parse().unwrap()).with_tls(tls));
    config.cohort = Some(device_client::fleet_wire::CohortId::parse(cohort).unwrap());
    config.telemetry_interval = None;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = Agent::new(config)
        .on_command(move |c: Command| {
            let _ = tx.send(c.id);
            async { CommandOutcome::succeeded() }
        })
        .start()
        .unwrap();
    (agent, rx)
}

async fn cohort_command(ops: &Client, cohort: &str, id: &str) {
    ops.client
        .publish(
            format!("cohorts/{cohort}/commands"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&json!({ "id": id, "name": "ping" })).unwrap(),
        )
        .await
        .unwrap();
}

async fn moving_a_device_between_cohorts(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let (s, b) = p
        .api(
            "POST",
            &format!("/api/v1/products/{}/cohorts", fleet.product_id),
            Some(json!({ "name": "line-b" })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let cohort_b = b["id"].as_str().unwrap().to_owned();
    let other = p.jitp_fleet(json!({})).await;
    let (agent, mut commands) = cohort_agent(&p, &fleet, "mv-1", &fleet.cohort_id);
    agent.wait_ready(Duration::from_secs(10)).await.unwrap();
    let ops = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    cohort_command(&ops, &fleet.cohort_id, "a1").await;
    let got = tokio::time::timeout(Duration::from_secs(10), commands.recv()).await;
    assert_eq!(got.unwrap().as_deref(), Some("a1"));

    // Bad moves are refused, saying why, and change nothing.
    let path = "/api/v1/devices/mv-1";
    for (body, status, code) in [
        (json!({ "cohort_id": "nope" }), 422, "unknown_cohort"),
        (
            json!({ "cohort_id": other.cohort_id }),
            422,
            "unknown_cohort",
        ),
        (json!({ "tags": { "k": 1 } }), 422, "invalid_tags"),
        (json!({ "colour": "red" }), 400, "invalid_body"),
    ] {
        let (s, answer) = p.api("PATCH", path, Some(body.clone())).await;
        assert_eq!(
            (s, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let cohort_viewer = p
        .key_as(
            p.app().admin_token(),
            "operator",
            json!({ "product_id": fleet.product_id, "cohort_id": fleet.cohort_id }),
        )
        .await;
    let (s, _) = p
        .api_as(
            &cohort_viewer,
            "PATCH",
            path,
            Some(json!({ "cohort_id": cohort_b })),
        )
        .await;
    assert_eq!(
        s, 422,
        "a cohort-scoped key sees no other cohort to move a device to"
    );
    assert_eq!(p.device("mv-1").await["cohort_id"], json!(fleet.cohort_id));

    // The move: the store, the device's topic rights and the agent all follow.
    let mut events = agent.subscribe();
    let (s, d) = p
        .api(
            "PATCH",
            path,
            Some(json!({ "cohort_id": cohort_b, "tags": { "line": "b" } })),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (&d["cohort_id"], &d["tags"]),
        (&json!(cohort_b), &json!({ "line": "b" }))
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(device_client::AgentEvent::Reassigned { cohort }) = events.recv().await {
                assert_eq!(cohort.map(|c| c.to_string()), Some(cohort_b.clone()));
                break;
            }
        }
    })
    .await
    .expect("the agent learned its new cohort");
    let mut status = agent.watch_status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.connections >= 2 && s.connected && s.subscribed),
    )
    .await
    .expect("the agent reconnected and subscribed to its new cohort")
    .unwrap();
    // The old cohort's commands no longer reach it; the new one's do.
    cohort_command(&ops, &fleet.cohort_id, "a2").await;
    cohort_command(&ops, &cohort_b, "b1").await;
    let got = tokio::time::timeout(Duration::from_secs(10), commands.recv()).await;
    assert_eq!(got.unwrap().as_deref(), Some("b1"));
    let d = p.device("mv-1").await;
    assert_eq!(d["cohort_id"], json!(cohort_b));

    // Out of every cohort, and a tags-only change that keeps the session.
    let (s, d) = p
        .api("PATCH", path, Some(json!({ "cohort_id": null })))
        .await;
    assert_eq!((s, &d["cohort_id"]), (200, &Value::Null), "{d}");
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.connections >= 3 && s.connected),
    )
    .await
    .unwrap()
    .unwrap();
    let epoch = p.device("mv-1").await["session_epoch"].clone();
    let (s, d) = p.api("PATCH", path, Some(json!({ "tags": {} }))).await;
    assert_eq!((s, &d["tags"]), (200, &json!({})), "{d}");
    assert_eq!(p.device("mv-1").await["session_epoch"], epoch);

    // Moved while offline, across a restart of the platform: a device still configured with
    // its old cohort learns the new one when it connects.
    agent.shutdown().await.unwrap();
    let (s, _) = p
        .api("PATCH", path, Some(json!({ "cohort_id": cohort_b })))
        .await;
    assert_eq!(s, 200);
    let mut p = p;
    p.restart().await;
    let (agent, mut commands) = cohort_agent(&p, &fleet, "mv-1", &fleet.cohort_id);
    // Its first subscription names the old cohort and is partly refused; only once the
    // retained assignment moved it are all its subscriptions granted.
    let mut status = agent.watch_status();
    tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.subscribed))
        .await
        .expect("the assignment survived the restart")
        .unwrap();
    let ops = Client::connect(p.service_options("ops", p.app().admin_token()))
        .await
        .unwrap();
    cohort_command(&ops, &cohort_b, "b2").await;
    let got = tokio::time::timeout(Duration::from_secs(10), commands.recv()).await;
    assert_eq!(got.unwrap().as_deref(), Some("b2"));
    agent.shutdown().await.unwrap();
    p.stop().await;
}

/// The audit entries of `query`, as the platform's admin.
async fn audit(p: &Platform, token: &str, query: &str) -> Vec<Value> {
    let (s, page) = p
        .api_as(token, "GET", &format!("/api/v1/audit?{query}"), None)
        .await;
    assert_eq!(s, 200, "{page}");
    page["items"].as_array().unwrap().clone()
}

async fn the_audit_log_records_who_did_what(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", p.app().http_addr());
    // A request id given by the client is kept, and answered.
    let resp = http
        .post(url("/api/v1/products"))
        .bearer_auth(&admin)
        .header("x-request-id", "req-audit-1")
        .json(&json!({ "name": "audited" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-request-id"], "req-audit-1");
    let product: Value = resp.json().await.unwrap();
    // Without one, the platform makes one.
    let resp = http.get(url("/api/v1/health")).send().await.unwrap();
    assert!(!resp.headers()["x-request-id"].is_empty());

    let entries = audit(&p, &admin, "request_id=req-audit-1").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(
        (
            &e["action"],
            &e["target_kind"],
            &e["target_id"],
            &e["outcome"],
            &e["status"]
        ),
        (
            &json!("product.create"),
            &json!("product"),
            &product["id"],
            &json!("success"),
            &json!(201)
        ),
        "{e}"
    );
    assert_eq!(e["detail"]["request"], json!({ "name": "audited" }));
    assert_eq!(e["actor_kind"], "api_key");
    assert!(
        e["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{e}"
    );

    // A key made, used for a refused attempt, and revoked: three entries with their actors,
    // and the secret nowhere in the log.
    let (s, key) = p
        .api(
            "POST",
            "/api/v1/api-keys",
            Some(json!({ "name": "auditor", "role": "viewer" })),
        )
        .await;
    assert_eq!(s, 201, "{key}");
    let viewer = key["secret"].as_str().unwrap().to_owned();
    let (s, _) = p
        .api_as(
            &viewer,
            "POST",
            "/api/v1/products",
            Some(json!({ "name": "nope" })),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = p
        .api(
            "DELETE",
            &format!("/api/v1/api-keys/{}", key["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let refused = audit(&p, &admin, "outcome=failure").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (
            &refused[0]["actor"],
            &refused[0]["action"],
            &refused[0]["error_code"],
            &refused[0]["status"]
        ),
        (
            &key["id"],
            &json!("product.create"),
            &json!("forbidden"),
            &json!(403)
        )
    );
    let keys = audit(&p, &admin, "action=api_key.").await;
    let actions: Vec<&str> = keys.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["api_key.revoke", "api_key.create"],
        "newest first"
    );
    assert_eq!(keys[0]["target_id"], key["id"]);
    assert_eq!(keys[1]["target_id"], key["id"]);
    let all = audit(&p, &admin, "limit=1000").await;
    assert!(
        !serde_json::to_string(&all).unwrap().contains(&viewer),
        "secret logged"
    );
    // Requests without a valid key name no organization, and are not recorded.
    let before = all.len();
    let resp = http
        .post(url("/api/v1/products"))
        .bearer_auth("nope")
        .json(&json!({ "name": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(audit(&p, &admin, "limit=1000").await.len(), before);

    // Pages walk the log newest first, without gaps or repeats.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() {
            "limit=2".to_owned()
        } else {
            format!("limit=2&cursor={cursor}")
        };
        let (_, page) = p.api("GET", &format!("/api/v1/audit?{q}"), None).await;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let ids: Vec<Value> = all.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(seen, ids);
    for (q, code) in [
        ("outcome=maybe", "invalid_query"),
        ("colour=red", "invalid_query"),
        ("cursor=x", "invalid_query"),
    ] {
        let (s, answer) = p.api("GET", &format!("/api/v1/audit?{q}"), None).await;
        assert_eq!(
            (s, answer["error"]["code"].as_str()),
            (400, Some(code)),
            "{q}"
        );
    }

    // Another organization's log holds only its own actions.
    let (_, admin_b) = p.organization("audit-tenant").await;
    assert!(audit(&p, &admin_b, "").await.is_empty());
    let (s, _) = p
        .api_as(
            &admin_b,
            "POST",
            "/api/v1/products",
            Some(json!({ "name": "b-product" })),
        )
        .await;
    assert_eq!(s, 201);
    let theirs = audit(&p, &admin_b, "").await;
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["action"], "product.create");
    assert_eq!(
        audit(&p, &admin, "limit=1000").await.len(),
        before + 1,
        "only the org creation"
    );

    // The platform records what it does on its own: provisioning a device on its first
    // connection, and a registered device's first connection.
    let fleet = p.jitp_fleet(json!({})).await;
    let _c = online_device(&p, &fleet, "aud-1").await;
    let (s, _) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "aud-2", "product_id": fleet.product_id })),
        )
        .await;
    assert_eq!(s, 201);
    let _c2 = Client::connect(p.device_options(&fleet.ca.issue("aud-2"), "aud-2"))
        .await
        .unwrap();
    for (id, action) in [
        ("aud-1", "device.provision"),
        ("aud-2", "device.first_connection"),
    ] {
        let entries = audit(&p, &admin, &format!("target_id={id}&actor=broker")).await;
        assert_eq!(entries.len(), 1, "{id}: {entries:?}");
        let e = &entries[0];
        assert_eq!(
            (&e["action"], &e["actor_kind"]),
            (&json!(action), &json!("platform"))
        );
        assert_eq!(e["detail"]["ca_id"], json!(fleet.ca_id));
    }
    p.stop().await;
}

/// The platform with a burst threshold of three refused connections a second.
async fn burst_platform(db: Db) -> Option<Platform> {
    let mut tuning = fleet_service::config::Tuning::default();
    tuning.audit.rejected_burst_threshold = 3;
    tuning.audit.rejected_burst_window_secs = 1;
    Platform::start_tuned(db, tuning).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_detail_and_refusal_bursts_sqlite() {
    let p = burst_platform(Db::Sqlite).await.unwrap();
    device_detail_and_refusal_bursts(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_detail_and_refusal_bursts_postgres() {
    let Some(p) = burst_platform(Db::Postgres).await else {
        return;
    };
    device_detail_and_refusal_bursts(p).await;
}

async fn device_detail_and_refusal_bursts(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let genuine = fleet.ca.issue("diag-1");
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "diag-1", "product_id": fleet.product_id,
                "certificate_pem": genuine.cert_pem })),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    // Two sessions: one lost, one ended by the device.
    let c = Client::connect(p.device_options(&genuine, "diag-1"))
        .await
        .unwrap();
    c.kill().await;
    eventually("first session ended", || async {
        (p.device("diag-1").await["online"] == json!(false)).then_some(())
    })
    .await;
    let c = Client::connect(p.device_options(&genuine, "diag-1"))
        .await
        .unwrap();
    c.client.disconnect().await.unwrap();
    let d = eventually("two sessions in the history", || async {
        let d = p.device("diag-1").await;
        let sessions = d["sessions"].as_array().unwrap();
        (sessions.len() == 2 && sessions.iter().all(|s| s["ended_at"].is_string())).then_some(d)
    })
    .await;
    let sessions = d["sessions"].as_array().unwrap();
    assert!(
        sessions[0]["epoch"].as_i64() > sessions[1]["epoch"].as_i64(),
        "newest first"
    );
    assert_eq!(sessions[0]["end_reason"], "client", "{d}");
    assert_eq!(sessions[1]["end_reason"], "connection_lost", "{d}");
    assert!(sessions[0]["remote_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(d["rejected_attempts"].as_array().unwrap().is_empty());

    // A clone of the pinned device knocks eight times: each refusal is in the device's detail,
    // and together they are a burst in the organization's audit log (eight, so that however
    // the one-second windows fall, one of them holds at least three).
    let clone = fleet.ca.issue("diag-1");
    for _ in 0..8 {
        assert!(Client::connect(p.device_options(&clone, "diag-1"))
            .await
            .is_err());
    }
    let d = p.device("diag-1").await;
    let refused = d["rejected_attempts"].as_array().unwrap();
    assert_eq!(refused.len(), 8, "{d}");
    assert!(refused.iter().all(|r| r["reason"] == "pin_mismatch"), "{d}");
    assert!(
        refused[0]["at"].as_str() >= refused[7]["at"].as_str(),
        "newest first"
    );
    let burst = eventually("a burst in the audit log", || async {
        let (_, page) = p
            .api(
                "GET",
                "/api/v1/audit?action=connection.rejected_burst",
                None,
            )
            .await;
        page["items"].as_array().and_then(|i| i.first().cloned())
    })
    .await;
    assert_eq!(
        (&burst["actor_kind"], &burst["actor"], &burst["outcome"]),
        (&json!("platform"), &json!("broker"), &json!("failure"))
    );
    assert!(
        burst["detail"]["by_reason"]["pin_mismatch"].as_u64() >= Some(3),
        "{burst}"
    );
    assert_eq!(burst["detail"]["device_ids"], json!(["diag-1"]));
    // Another organization's log has no trace of it.
    let (_, admin_b) = p.organization("diag-tenant").await;
    let (_, page) = p
        .api_as(&admin_b, "GET", "/api/v1/audit?action=connection.", None)
        .await;
    assert_eq!(page["items"], json!([]));
    p.stop().await;
}

async fn the_fleet_summary_counts_what_the_key_sees(p: Platform) {
    let fleet = p.jitp_fleet(json!({})).await;
    let (_, c2) = p
        .api(
            "POST",
            &format!("/api/v1/products/{}/cohorts", fleet.product_id),
            Some(json!({ "name": "second" })),
        )
        .await;
    let c2 = c2["id"].as_str().unwrap().to_owned();
    // Five registered devices: two in the fleet's cohort, two in the second, one in none.
    let rows = json!([
        { "id": "sum-r1", "cohort_id": fleet.cohort_id },
        { "id": "sum-r2", "cohort_id": fleet.cohort_id },
        { "id": "sum-r3", "cohort_id": c2 },
        { "id": "sum-r4", "cohort_id": c2 },
        { "id": "sum-r5" },
    ]);
    let (s, report) = p
        .api(
            "POST",
            &format!("/api/v1/products/{}/devices/import", fleet.product_id),
            Some(rows),
        )
        .await;
    assert_eq!((s, &report["created"]), (200, &json!(5)), "{report}");
    // One device online that reports firmware 2.0.0, with a certificate expiring in two days.
    let now = time::OffsetDateTime::now_utc();
    let cert = fleet.ca.issue_valid(
        "sum-on",
        now - time::Duration::hours(1),
        now + time::Duration::days(2),
    );
    let online = Client::connect(p.device_options(&cert, "sum-on"))
        .await
        .unwrap();
    online
        .client
        .publish(
            "devices/sum-on/state",
            QoS::AtLeastOnce,
            true,
            r#"{"firmware_version":"2.0.0"}"#,
        )
        .await
        .unwrap();
    eventually("firmware reported", || async {
        (p.device("sum-on").await["firmware_version"] == "2.0.0").then_some(())
    })
    .await;
    let (s, _) = p
        .api(
            "POST",
            "/api/v1/devices/sum-r5/quarantine",
            Some(json!({ "reason": "summary" })),
        )
        .await;
    assert_eq!(s, 200);

    let (s, sum) = p
        .api(
            "GET",
            &format!(
                "/api/v1/fleet/summary?product_id={}&expiring_within_days=7",
                fleet.product_id
            ),
            None,
        )
        .await;
    assert_eq!(s, 200, "{sum}");
    assert_eq!(
        (
            &sum["devices"],
            &sum["online"],
            &sum["offline"],
            &sum["quarantined"]
        ),
        (&json!(6), &json!(1), &json!(5), &json!(1)),
        "{sum}"
    );
    assert_eq!(sum["by_state"]["registered"], 4, "{sum}");
    assert_eq!(sum["by_state"]["quarantined"], 1, "{sum}");
    assert_eq!(sum["by_state"]["online"], 1, "{sum}");
    assert_eq!(sum["by_state"]["failed"], 0, "every state is listed");
    assert_eq!(
        sum["firmware_versions"],
        json!([{ "version": null, "devices": 5 }, { "version": "2.0.0", "devices": 1 }])
    );
    assert_eq!(sum["products"][0]["devices"], 6);
    let cohorts: Vec<(Value, Value, Value)> = sum["cohorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["cohort_id"].clone(),
                c["devices"].clone(),
                c["online"].clone(),
            )
        })
        .collect();
    assert!(
        cohorts.contains(&(json!(fleet.cohort_id), json!(3), json!(1))),
        "{sum}"
    );
    assert!(cohorts.contains(&(json!(c2), json!(2), json!(0))), "{sum}");
    assert!(
        cohorts.contains(&(Value::Null, json!(1), json!(0))),
        "{sum}"
    );
    assert_eq!(
        (
            &sum["certificates"]["device_expiring"],
            &sum["certificates"]["device_expired"]
        ),
        (&json!(1), &json!(0))
    );
    assert!(sum["certificates"]["ca_expiring"].is_number());
    let (_, sum1) = p
        .api(
            "GET",
            &format!(
                "/api/v1/fleet/summary?product_id={}&expiring_within_days=1",
                fleet.product_id
            ),
            None,
        )
        .await;
    assert_eq!(sum1["certificates"]["device_expiring"], 0);

    // A cohort-scoped key's summary is its cohort's, without the organization's CAs.
    let viewer = p
        .key_as(
            p.app().admin_token(),
            "viewer",
            json!({ "product_id": fleet.product_id, "cohort_id": c2 }),
        )
        .await;
    let (s, mine) = p
        .api_as(&viewer, "GET", "/api/v1/fleet/summary", None)
        .await;
    assert_eq!(s, 200, "{mine}");
    assert_eq!((&mine["devices"], &mine["online"]), (&json!(2), &json!(0)));
    assert_eq!(mine["certificates"]["ca_expiring"], Value::Null);
    let (s, _) = p
        .api_as(
            &viewer,
            "GET",
            &format!("/api/v1/fleet/summary?cohort_id={}", fleet.cohort_id),
            None,
        )
        .await;
    assert_eq!(s, 404, "a cohort outside the scope is not found");
    for q in ["expiring_within_days=0", "colour=red"] {
        let (s, _) = p
            .api("GET", &format!("/api/v1/fleet/summary?{q}"), None)
            .await;
        assert_eq!(s, 400, "{q}");
    }
    // Another organization counts none of it.
    let (_, admin_b) = p.organization("summary-tenant").await;
    let (_, theirs) = p
        .api_as(&admin_b, "GET", "/api/v1/fleet/summary", None)
        .await;
    assert_eq!(theirs["devices"], 0, "{theirs}");

    // CA certificates by expiry.
    let (_, soon) = p
        .api(
            "GET",
            "/api/v1/ca-certificates?expires_before=2999-01-01T00:00:00Z",
            None,
        )
        .await;
    assert!(ids(&soon).contains(&fleet.ca_id), "{soon}");
    let (_, none) = p
        .api(
            "GET",
            "/api/v1/ca-certificates?expires_before=2000-01-01T00:00:00Z",
            None,
        )
        .await;
    assert!(!ids(&none).contains(&fleet.ca_id), "{none}");
    online.kill().await;
    p.stop().await;
}
