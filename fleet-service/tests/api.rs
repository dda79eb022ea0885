//! The REST bridge over real HTTP (axum on 127.0.0.1:0, reqwest), on SQLite and PostgreSQL,
//! with a real broker registry behind it.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use broker::auth::ServiceRole;
use broker::metrics::Metrics;
use broker::registry::Registry;
use broker::BrokerControl;
use common::{id, presence, presence_batch, TestCa};
use fleet_service::api::{router, ApiState};
use fleet_service::keys::{ensure_bootstrap_admin, ApiKeys};
use fleet_service::ops::Ops;
use fleet_service::store::{EventBatch, LatestTelemetry, Store, TelemetryRow};
use fleet_wire::payload::PresenceEvent;
use reqwest::StatusCode;
use serde_json::{json, Value};

on_both_databases!(
    auth_and_error_shapes,
    products_and_cohorts,
    ca_certificates,
    jitp_through_the_registry,
    devices_filters_and_pages,
    telemetry_metrics_and_keys,
);

const ADMIN: &str = "test-admin-token-0123456789";

struct Api {
    base: String,
    http: reqwest::Client,
    viewer: String,
    operator: String,
    store: Store,
    control: BrokerControl,
}

async fn start(url: &str) -> Api {
    let store = Store::connect(url).await.unwrap();
    ensure_bootstrap_admin(&store, ADMIN).await.unwrap();
    let keys = ApiKeys::load(&store).await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(Arc::new(store.clone()), metrics.clone()));
    let control = BrokerControl::new(registry, metrics);
    let ops = Ops::local(
        store.clone(),
        keys,
        control.clone(),
        fleet_service::rollout::Rollouts::new(),
    );
    let viewer = ops
        .create_api_key(
            "default",
            "viewer",
            ServiceRole::Viewer,
            broker::auth::Scope::Org,
        )
        .await
        .unwrap();
    let operator = ops
        .create_api_key(
            "default",
            "operator",
            ServiceRole::Operator,
            broker::auth::Scope::Org,
        )
        .await
        .unwrap();
    let mut state = ApiState::with_ops(store.clone(), ops);
    // These tests check the CA body's validation; proof of possession is tested end to end
    // (tests/tests/fleet_management.rs).
    state.settings.require_ca_proof = false;
    let app = router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Api {
        base: format!("http://{addr}/api/v1"),
        http: reqwest::Client::new(),
        viewer: viewer.secret,
        operator: operator.secret,
        store,
        control,
    }
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> (StatusCode, Value) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text:?}"));
        (status, body)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)), token)
            .await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.send(
            self.http.post(format!("{}{path}", self.base)).json(&body),
            token,
        )
        .await
    }

    async fn post_raw(&self, path: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body.to_owned()),
            token,
        )
        .await
    }

    async fn patch(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.send(
            self.http.patch(format!("{}{path}", self.base)).json(&body),
            token,
        )
        .await
    }

    async fn product(&self, name: &str) -> Value {
        let (s, p) = self
            .post("/products", Some(ADMIN), json!({ "name": name }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        p
    }

    async fn cohort(&self, product_id: &str, name: &str) -> Value {
        let (s, c) = self
            .post(
                &format!("/products/{product_id}/cohorts"),
                Some(ADMIN),
                json!({ "name": name }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
        c
    }
}

/// Asserts the error shape `{"error":{"code","message"}}` with the expected status and code.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(got.1["error"]["message"].is_string(), "{}", got.1);
    assert_eq!(got.1.as_object().unwrap().len(), 1, "{}", got.1);
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .is_ok_and(|t| t.offset().is_utc())
    })
}

/// The committed document, at the repository root.
const OPENAPI_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.json");

/// `/api/v1/openapi.json` over HTTP is the committed `openapi.json`, byte for byte; and on every
/// documented path the live router answers exactly the documented methods (the rest get 405).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_over_http() {
    let db = common::TestDb::sqlite();
    let api = start(&db.url).await;
    let resp = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served = resp.text().await.unwrap();
    let committed = std::fs::read_to_string(OPENAPI_JSON).unwrap_or_default();
    assert!(
        served == committed,
        "the served OpenAPI document differs from openapi.json; regenerate it with \
         `UPDATE_OPENAPI=1 cargo test -p fleet-service openapi` and commit it"
    );

    let doc: Value = serde_json::from_str(&served).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 20, "{paths:?}");
    for (path, item) in paths {
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        // Probes live at the root, everything else under /api/v1 (where `base` ends).
        let url = match concrete.strip_prefix("/api/v1") {
            Some(rest) => format!("{}{rest}", api.base),
            None => format!("{}{concrete}", api.base.trim_end_matches("/api/v1")),
        };
        for method in [
            reqwest::Method::GET,
            reqwest::Method::POST,
            reqwest::Method::PUT,
            reqwest::Method::PATCH,
            reqwest::Method::DELETE,
        ] {
            let documented = item.get(method.as_str().to_ascii_lowercase()).is_some();
            let got = api.send(api.http.request(method.clone(), &url), None).await;
            if documented {
                let no_route =
                    got.0 == StatusCode::NOT_FOUND && got.1["error"]["message"] == "no such route";
                assert!(
                    got.0 != StatusCode::METHOD_NOT_ALLOWED && !no_route,
                    "{method} {path} is documented but not served: {got:?}"
                );
            } else {
                assert_error(&got, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
            }
        }
    }
}

async fn auth_and_error_shapes(url: &str) {
    let api = start(url).await;
    let (s, body) = api.get("/health", None).await;
    assert_eq!((s, body), (StatusCode::OK, json!({"status": "ok"})));

    assert_error(
        &api.get("/products", None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &api.get("/products", Some("fk_not-a-key")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let basic = api
        .send(
            api.http
                .get(format!("{}/products", api.base))
                .basic_auth("admin", Some(ADMIN)),
            None,
        )
        .await;
    assert_error(&basic, StatusCode::UNAUTHORIZED, "unauthorized");
    // Unauthenticated comes before malformed.
    assert_error(
        &api.post_raw("/products", None, "{nope").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    assert_error(
        &api.post("/products", Some(&api.viewer), json!({"name": "x"}))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Forbidden comes before malformed, too.
    assert_error(
        &api.post_raw("/products", Some(&api.viewer), "{nope").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, _) = api.get("/products", Some(&api.viewer)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api
        .post(
            "/products",
            Some(&api.operator),
            json!({"name": "by operator"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    assert_error(
        &api.post_raw("/products", Some(ADMIN), "{\"name\": ").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(
        &api.post("/products", Some(ADMIN), json!({})).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_error(
        &api.post(
            "/products",
            Some(ADMIN),
            json!({"name": "a", "colour": "red"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_error(
        &api.post("/products", Some(ADMIN), json!({"name": 7})).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    let no_type = api
        .send(
            api.http
                .post(format!("{}/products", api.base))
                .body("{\"name\":\"x\"}"),
            Some(ADMIN),
        )
        .await;
    assert_error(
        &no_type,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert_error(
        &api.post("/products", Some(ADMIN), json!({"name": "  "}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_name",
    );
    assert_error(
        &api.get("/nowhere", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let put = api
        .send(
            api.http
                .put(format!("{}/products", api.base))
                .json(&json!({})),
            Some(ADMIN),
        )
        .await;
    assert_error(&put, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

async fn products_and_cohorts(url: &str) {
    let api = start(url).await;
    let p = api.product("thermostat").await;
    let pid = p["id"].as_str().unwrap().to_owned();
    assert_eq!(p["name"], "thermostat");
    assert!(is_rfc3339(&p["created_at"]), "{p}");
    assert!(uuid::Uuid::parse_str(&pid).is_ok());

    assert_error(
        &api.post("/products", Some(ADMIN), json!({"name": "thermostat"}))
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    let (s, got) = api
        .get(&format!("/products/{pid}"), Some(&api.viewer))
        .await;
    assert_eq!((s, &got), (StatusCode::OK, &p));
    assert_error(
        &api.get("/products/nope", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let other = api.product("lamp").await;
    let (_, list) = api.get("/products", Some(ADMIN)).await;
    assert_eq!(list, json!({"items": [p, other], "next_cursor": null}));

    let c = api.cohort(&pid, "beta").await;
    let cid = c["id"].as_str().unwrap().to_owned();
    assert_eq!(c["product_id"], pid.as_str());
    assert_eq!(c["name"], "beta");
    assert!(is_rfc3339(&c["created_at"]));
    // Cohort ids are used as topic segments.
    assert!(fleet_wire::CohortId::parse(&cid).is_ok());
    assert_error(
        &api.post(
            &format!("/products/{pid}/cohorts"),
            Some(ADMIN),
            json!({"name": "beta"}),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    // The same name in another product is fine.
    api.cohort(other["id"].as_str().unwrap(), "beta").await;
    assert_error(
        &api.post("/products/nope/cohorts", Some(ADMIN), json!({"name": "x"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post(
            &format!("/products/{pid}/cohorts"),
            Some(&api.viewer),
            json!({"name": "x"}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, got) = api.get(&format!("/cohorts/{cid}"), Some(ADMIN)).await;
    assert_eq!((s, &got), (StatusCode::OK, &c));
    let (_, list) = api
        .get(&format!("/products/{pid}/cohorts"), Some(ADMIN))
        .await;
    assert_eq!(list, json!({"items": [c], "next_cursor": null}));
    assert_error(
        &api.get("/cohorts/nope", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

async fn ca_certificates(url: &str) {
    let api = start(url).await;
    let p = api.product("sensor").await;
    let pid = p["id"].as_str().unwrap();
    let c = api.cohort(pid, "default").await;
    let cid = c["id"].as_str().unwrap();
    let p2 = api.product("other").await;
    let c2 = api.cohort(p2["id"].as_str().unwrap(), "default").await;
    let ca = TestCa::new("Acme Manufacturing CA");

    let create = |pem: String, jitp: Value| json!({"certificate_pem": pem, "jitp": jitp});
    let jitp = json!({"product_id": pid, "cohort_id": cid, "tags": {"site": "eu-1"}});

    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(common::leaf_pem(), Value::Null),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_certificate",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(format!("{}{}", ca.pem(), ca.pem()), Value::Null),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_certificate",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create("garbage".into(), Value::Null),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_certificate",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(
                ca.pem(),
                json!({"product_id": "nope", "cohort_id": cid, "tags": {}}),
            ),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_product",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(
                ca.pem(),
                json!({"product_id": pid, "cohort_id": c2["id"], "tags": {}}),
            ),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "cohort_not_in_product",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(
                ca.pem(),
                json!({"product_id": pid, "cohort_id": "no-such-cohort", "tags": {}}),
            ),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_cohort",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(
                ca.pem(),
                json!({"product_id": pid, "cohort_id": cid, "tags": {"site": ""}}),
            ),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_tags",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(
                ca.pem(),
                json!({"product_id": pid, "cohort_id": cid, "tags": {"n": 1}}),
            ),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_tags",
    );
    assert_error(
        &api.post(
            "/ca-certificates",
            Some(&api.viewer),
            create(ca.pem(), jitp.clone()),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert!(api.control.registry().enabled_ca_certs().is_empty());

    let mut body = create(ca.pem(), jitp.clone());
    body["description"] = json!("line 3");
    let (s, created) = api.post("/ca-certificates", Some(ADMIN), body).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let ca_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["fingerprint_sha256"],
        broker::registry::fingerprint(&ca.der())
    );
    assert!(created["subject"]
        .as_str()
        .unwrap()
        .contains("Acme Manufacturing CA"));
    assert!(is_rfc3339(&created["not_before"]) && is_rfc3339(&created["not_after"]));
    assert!(is_rfc3339(&created["created_at"]) && is_rfc3339(&created["updated_at"]));
    assert_eq!(created["description"], "line 3");
    assert_eq!(created["enabled"], true);
    assert_eq!(created["jitp"], jitp);
    // The running broker trusts it at once.
    assert_eq!(api.control.registry().enabled_ca_certs(), vec![ca.der()]);

    assert_error(
        &api.post(
            "/ca-certificates",
            Some(ADMIN),
            create(ca.pem(), Value::Null),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    );

    let (s, got) = api
        .get(&format!("/ca-certificates/{ca_id}"), Some(&api.viewer))
        .await;
    assert_eq!((s, &got), (StatusCode::OK, &created));
    let (_, list) = api.get("/ca-certificates", Some(ADMIN)).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_error(
        &api.get("/ca-certificates/nope", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Disable: stored, and the broker stops trusting it.
    let (s, patched) = api
        .patch(
            &format!("/ca-certificates/{ca_id}"),
            Some(&api.operator),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{patched}");
    assert_eq!(patched["enabled"], false);
    assert_eq!(patched["jitp"], jitp, "untouched fields stay");
    assert_eq!(patched["description"], "line 3");
    assert!(api.control.registry().enabled_ca_certs().is_empty());

    let (s, patched) = api
        .patch(
            &format!("/ca-certificates/{ca_id}"),
            Some(ADMIN),
            json!({"enabled": true, "jitp": null, "description": null}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{patched}");
    assert_eq!(patched["jitp"], Value::Null);
    assert_eq!(patched["description"], Value::Null);
    assert_eq!(api.control.registry().enabled_ca_certs(), vec![ca.der()]);

    assert_error(
        &api.patch(
            &format!("/ca-certificates/{ca_id}"),
            Some(ADMIN),
            json!({"jitp": {"product_id": pid, "cohort_id": c2["id"], "tags": {}}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "cohort_not_in_product",
    );
    assert_error(
        &api.patch(
            &format!("/ca-certificates/{ca_id}"),
            Some(&api.viewer),
            json!({"enabled": false}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.patch(
            "/ca-certificates/nope",
            Some(ADMIN),
            json!({"enabled": false}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.patch(
            &format!("/ca-certificates/{ca_id}"),
            Some(ADMIN),
            json!({"enabled": "no"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
}

/// A CA registered over REST provisions a device on its first connect through the broker's
/// registry, and the device then shows over REST.
async fn jitp_through_the_registry(url: &str) {
    let api = start(url).await;
    let p = api.product("sensor").await;
    let c = api.cohort(p["id"].as_str().unwrap(), "default").await;
    let ca = TestCa::new("JITP CA");
    let (s, created) = api
        .post(
            "/ca-certificates",
            Some(ADMIN),
            json!({
                "certificate_pem": ca.pem(),
                "jitp": {"product_id": p["id"], "cohort_id": c["id"], "tags": {"site": "eu-1"}},
            }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");

    let leaf = ca.issue("sensor-0042");
    let identity = api
        .control
        .registry()
        .identify(leaf.der())
        .await
        .expect("the registry admits the device");
    assert!(identity.provisioned_now);
    assert_eq!(identity.device.ca_id.as_deref(), created["id"].as_str());

    let (s, d) = api.get("/devices/sensor-0042", Some(&api.viewer)).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["ca_id"], created["id"]);
    assert_eq!(d["product_id"], p["id"]);
    assert_eq!(d["cohort_id"], c["id"]);
    assert_eq!(d["tags"], json!({"site": "eu-1"}));
    assert_eq!(d["state"], "registered");
    assert_eq!(d["state_reason"], "provisioned: jitp");
    assert_eq!(
        d["certificate"]["fingerprint_sha256"],
        broker::registry::fingerprint(leaf.der())
    );
    assert!(d["certificate"]["subject"]
        .as_str()
        .unwrap()
        .contains("sensor-0042"));

    // Disabling the CA over REST makes the registry refuse its devices.
    api.patch(
        &format!("/ca-certificates/{}", created["id"].as_str().unwrap()),
        Some(ADMIN),
        json!({"enabled": false}),
    )
    .await;
    assert_eq!(
        api.control
            .registry()
            .identify(leaf.der())
            .await
            .unwrap_err(),
        broker::metrics::Rejection::DisabledCa
    );
}

const DEVICE_FIELDS: &[&str] = &[
    "id",
    "product_id",
    "cohort_id",
    "ca_id",
    "tags",
    "state",
    "state_reason",
    "state_changed_at",
    "online",
    "last_seen",
    "connected_at",
    "session_epoch",
    "disconnect_reason",
    "remote_addr",
    "firmware_version",
    "reported",
    "reported_at",
    "last_telemetry",
    "last_telemetry_at",
    "certificate",
    "created_at",
];

async fn devices_filters_and_pages(url: &str) {
    let api = start(url).await;
    let a = common::catalog(&api.store, "a").await;
    let b = common::catalog(&api.store, "b").await;
    let mut expected = Vec::new();
    for i in 0..7 {
        let (cat, site) = if i % 2 == 0 { (&a, "eu") } else { (&b, "us") };
        let name = format!("dev-{i}");
        api.store
            .provision(&common::new_device(
                cat,
                &name,
                &[("site", site), ("rack", &format!("r{}", i % 3))],
            ))
            .await
            .unwrap();
        expected.push(name);
    }
    api.store
        .apply_events(&presence_batch(
            "node-1",
            vec![
                presence(
                    "dev-0",
                    PresenceEvent::Connected,
                    1,
                    1_700_000_000_000,
                    None,
                ),
                presence(
                    "dev-3",
                    PresenceEvent::Connected,
                    1,
                    1_700_000_000_000,
                    None,
                ),
            ],
        ))
        .await
        .unwrap();

    let (s, d) = api.get("/devices/dev-0", Some(&api.viewer)).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let keys: BTreeSet<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
    let detail: BTreeSet<&str> = DEVICE_FIELDS
        .iter()
        .copied()
        .chain([
            "sessions",
            "rejected_attempts",
            "certificate_revoked",
            "revoked_certificates",
        ])
        .collect();
    assert_eq!(
        keys, detail,
        "a device's detail is its list entry and its diagnostics"
    );
    // The presence event opened its session in the connection history.
    assert_eq!(d["sessions"][0]["epoch"], 1, "{d}");
    assert_eq!(d["sessions"][0]["ended_at"], Value::Null, "{d}");
    assert_eq!(d["rejected_attempts"], serde_json::json!([]));
    assert_eq!(d["id"], "dev-0");
    assert_eq!(d["online"], true);
    assert_eq!(d["state"], "online");
    assert_eq!(d["session_epoch"], 1);
    assert_eq!(d["last_seen"], "2023-11-14T22:13:20Z");
    assert_eq!(d["connected_at"], "2023-11-14T22:13:20Z");
    assert_eq!(d["reported"], Value::Null);
    assert_eq!(d["last_telemetry"], Value::Null);
    assert_eq!(d["tags"], json!({"site": "eu", "rack": "r0"}));
    assert!(is_rfc3339(&d["state_changed_at"]) && is_rfc3339(&d["created_at"]));
    let cert = d["certificate"].as_object().unwrap();
    let cert_keys: BTreeSet<&str> = cert.keys().map(String::as_str).collect();
    assert_eq!(
        cert_keys,
        BTreeSet::from([
            "fingerprint_sha256",
            "subject",
            "issuer",
            "serial",
            "not_after"
        ])
    );
    assert_eq!(cert["not_after"], "2100-01-01T00:00:00Z");

    assert_error(
        &api.get("/devices/nope", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.get("/devices/a+b", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, all) = api.get("/devices", Some(&api.viewer)).await;
    assert_eq!(s, StatusCode::OK, "{all}");
    assert_eq!(ids(&all), expected);
    assert_eq!(all["next_cursor"], Value::Null);

    // Pages of 3 walk the whole list once, in order.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/devices?limit=3&cursor={c}"),
            None => "/devices?limit=3".to_owned(),
        };
        let (s, page) = api.get(&path, Some(ADMIN)).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        walked.extend(ids(&page));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, expected);
    assert_eq!(pages, 3);

    let query = |q: &str| {
        let api = &api;
        let q = q.to_owned();
        async move {
            let (s, v) = api.get(&format!("/devices?{q}"), Some(ADMIN)).await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            ids(&v)
        }
    };
    assert_eq!(query("online=true").await, ["dev-0", "dev-3"]);
    assert_eq!(query("online=false&state=registered").await.len(), 5);
    assert_eq!(query("state=online").await, ["dev-0", "dev-3"]);
    assert_eq!(
        query(&format!("product_id={}", b.product.id)).await,
        ["dev-1", "dev-3", "dev-5"]
    );
    assert_eq!(
        query(&format!("cohort_id={}&tag=rack:r0", a.cohort.id)).await,
        ["dev-0", "dev-6"]
    );
    assert_eq!(query("tag=site:us&tag=rack:r1").await, ["dev-1"]);
    assert!(query("tag=site:us&tag=rack:r9").await.is_empty());
    assert_eq!(
        query("tag=site:eu&limit=1").await,
        ["dev-0"],
        "filters and limits combine"
    );

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "cursor=%%%",
        "cursor=bm90IGEgaWQh",
        "tag=site",
        "tag=:eu",
        "online=maybe",
        "state=asleep",
        "colour=red",
        "limit=1&limit=2",
    ] {
        assert_error(
            &api.get(&format!("/devices?{bad}"), Some(ADMIN)).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        );
    }
    assert_error(
        &api.get("/devices", None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

async fn telemetry_metrics_and_keys(url: &str) {
    let api = start(url).await;
    let cat = common::catalog(&api.store, "t").await;
    api.store
        .provision(&common::new_device(&cat, "tele", &[]))
        .await
        .unwrap();
    let rows: Vec<TelemetryRow> = (0..5)
        .map(|seq| TelemetryRow {
            device_id: id("tele"),
            epoch: 1,
            seq,
            received_at_ms: 1_700_000_000_000 + seq as i64,
            payload: format!(r#"{{"seq":{seq}}}"#),
        })
        .collect();
    api.store
        .apply_events(&EventBatch {
            node_id: "n".into(),
            telemetry: rows,
            latest_telemetry: vec![LatestTelemetry {
                device_id: id("tele"),
                payload: r#"{"seq":4}"#.into(),
                at_ms: 1_700_000_000_004,
            }],
            ..EventBatch::default()
        })
        .await
        .unwrap();

    let (s, t) = api
        .get("/devices/tele/telemetry?limit=2", Some(&api.viewer))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(
        t,
        json!({"items": [
            {"epoch": 1, "seq": 4, "received_at": "2023-11-14T22:13:20.004Z", "payload": {"seq": 4}},
            {"epoch": 1, "seq": 3, "received_at": "2023-11-14T22:13:20.003Z", "payload": {"seq": 3}},
        ], "next_cursor": t["next_cursor"]})
    );
    // The next page goes on from the cursor, and the last page has none.
    let cursor = t["next_cursor"].as_str().unwrap().to_owned();
    let (s, older) = api
        .get(
            &format!("/devices/tele/telemetry?limit=2&cursor={cursor}"),
            Some(&api.viewer),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{older}");
    let seqs: Vec<u64> = older["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 1]);
    let (_, last) = api
        .get(
            &format!(
                "/devices/tele/telemetry?limit=2&cursor={}",
                older["next_cursor"].as_str().unwrap()
            ),
            Some(&api.viewer),
        )
        .await;
    assert_eq!(last["items"].as_array().unwrap().len(), 1, "{last}");
    assert_eq!(last["next_cursor"], Value::Null);
    let (_, t) = api.get("/devices/tele/telemetry", Some(ADMIN)).await;
    assert_eq!(t["items"].as_array().unwrap().len(), 5);
    let (_, d) = api.get("/devices/tele", Some(ADMIN)).await;
    assert_eq!(d["last_telemetry"], json!({"seq": 4}));
    assert_eq!(d["last_telemetry_at"], "2023-11-14T22:13:20.004Z");
    assert_error(
        &api.get("/devices/ghost/telemetry", Some(ADMIN)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.get("/devices/tele/telemetry?limit=-1", Some(ADMIN))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );

    let (s, m) = api.get("/broker/metrics", Some(&api.viewer)).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["sessions_open"], 0);
    assert_eq!(m["rejections"]["unknown_ca"], 0);

    // API keys: admins only; the secret is shown once and works at once.
    assert_error(
        &api.get("/api-keys", Some(&api.operator)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, k) = api
        .post(
            "/api-keys",
            Some(ADMIN),
            json!({"name": "ci", "role": "viewer"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let secret = k["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("fk_"));
    assert_eq!(k["role"], "viewer");
    let (s, _) = api.get("/products", Some(&secret)).await;
    assert_eq!(s, StatusCode::OK);
    let (_, list) = api.get("/api-keys", Some(ADMIN)).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "bootstrap, viewer, operator, ci");
    assert!(items.iter().all(|k| k.get("secret").is_none()));
    assert_error(
        &api.post(
            "/api-keys",
            Some(ADMIN),
            json!({"name": "x", "role": "root"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_role",
    );

    let key_id = k["id"].as_str().unwrap();
    let (s, revoked) = api
        .send(
            api.http.delete(format!("{}/api-keys/{key_id}", api.base)),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{revoked}");
    assert!(is_rfc3339(&revoked["revoked_at"]));
    assert_error(
        &api.get("/products", Some(&secret)).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let gone = api
        .send(
            api.http.delete(format!("{}/api-keys/nope", api.base)),
            Some(ADMIN),
        )
        .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "not_found");
}
