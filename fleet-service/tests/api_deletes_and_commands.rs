//! Deleting what an operator created (products, cohorts, CAs, organizations, devices in bulk)
//! and sending commands over REST, against the running platform (`App`: a real broker to
//! publish on and a real registry), over HTTP, on SQLite and PostgreSQL. Acks are written as
//! the intake writes them (`Store::apply_events`); tests/tests/rest_commands.rs has real
//! devices answer over MQTT.

mod common;

use std::time::Duration;

use broker::registry::NewDevice;
use common::TestCa;
use fleet_service::app::App;
use fleet_service::config::Config;
use fleet_service::store::{CommandAckRow, EventBatch, Store};
use fleet_wire::payload::CommandStatus;
use fleet_wire::{CohortId, DeviceId};
use reqwest::StatusCode;
use serde_json::{json, Value};

on_both_databases!(
    products_and_cohorts_are_deleted_once_empty,
    cas_are_deleted_and_no_longer_trusted,
    organizations_are_deleted_by_the_platform_admin,
    devices_are_deleted_in_bulk,
    device_commands_and_their_acks,
    cohort_commands_and_their_acks,
);

const ADMIN: &str = "deletes-and-commands-admin-0123456789";

struct Api {
    app: App,
    _dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
}

async fn start(url: &str) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.database_url = url.to_owned();
    config.admin_token = Some(ADMIN.into());
    // Proof of possession is tested end to end (tests/tests/fleet_management.rs).
    config.tuning.ca.require_proof_of_possession = false;
    let app = App::start(config).await.unwrap();
    Api {
        base: format!("http://{}/api/v1", app.http_addr()),
        app,
        _dir: dir,
        http: reqwest::Client::new(),
    }
}

impl Api {
    fn store(&self) -> &Store {
        self.app.store()
    }

    /// A request with `token`; the answer's status and JSON body (`Null` when empty).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text:?}"))
        };
        (status, body)
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PATCH, path, token, Some(body))
            .await
    }

    async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, token, None).await
    }

    /// A body that is not JSON, with its content type.
    async fn post_raw(&self, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(ADMIN)
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// An API key of the organization of `admin`: its id and secret.
    async fn key_of(&self, admin: &str, role: &str, scope: Value) -> (String, String) {
        let mut body = json!({ "name": format!("{role} key"), "role": role });
        body.as_object_mut()
            .unwrap()
            .extend(scope.as_object().unwrap().clone());
        let (s, k) = self.post("/api-keys", admin, body).await;
        assert_eq!(s, StatusCode::CREATED, "{k}");
        (
            k["id"].as_str().unwrap().to_owned(),
            k["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn key(&self, role: &str, scope: Value) -> String {
        self.key_of(ADMIN, role, scope).await.1
    }

    /// An organization and its admin key: `(id, secret)`.
    async fn org(&self, name: &str) -> (String, String) {
        let (s, o) = self
            .post("/organizations", ADMIN, json!({ "name": name }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{o}");
        (
            o["organization"]["id"].as_str().unwrap().to_owned(),
            o["admin_key"]["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn product_as(&self, token: &str, name: &str) -> String {
        let (s, p) = self.post("/products", token, json!({ "name": name })).await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        p["id"].as_str().unwrap().to_owned()
    }

    async fn product(&self, name: &str) -> String {
        self.product_as(ADMIN, name).await
    }

    async fn cohort(&self, product: &str, name: &str) -> String {
        let (s, c) = self
            .post(
                &format!("/products/{product}/cohorts"),
                ADMIN,
                json!({ "name": name }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
        c["id"].as_str().unwrap().to_owned()
    }

    /// Registers a device before manufacturing, with `extra` fields (tags, a pin).
    async fn device(&self, id: &str, product: &str, cohort: Option<&str>, extra: Value) {
        let mut body = json!({ "id": id, "product_id": product, "cohort_id": cohort });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, d) = self.post("/devices", ADMIN, body).await;
        assert_eq!(s, StatusCode::CREATED, "{d}");
    }

    /// Registers `ca` with the key `token`, provisioning into `jitp` (product, cohort).
    async fn ca_as(&self, token: &str, ca: &TestCa, jitp: Option<(&str, &str)>) -> String {
        let jitp = jitp.map(|(p, c)| json!({ "product_id": p, "cohort_id": c }));
        let (s, c) = self
            .post(
                "/ca-certificates",
                token,
                json!({ "certificate_pem": ca.pem(), "jitp": jitp }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
        c["id"].as_str().unwrap().to_owned()
    }

    /// Stores acks as the intake does after a device published them.
    async fn acks(&self, acks: &[(&str, &str, CommandStatus, Option<&str>)]) {
        let batch = EventBatch {
            command_acks: acks
                .iter()
                .map(|(device, command, status, message)| CommandAckRow {
                    device_id: DeviceId::parse(device).unwrap(),
                    command_id: (*command).to_owned(),
                    status: *status,
                    message: message.map(str::to_owned),
                    at_ms: now_ms(),
                })
                .collect(),
            ..EventBatch::default()
        };
        self.store().apply_events(&batch).await.unwrap();
    }

    /// Rows of `table` matching `condition`, counted in the database.
    async fn rows(&self, url: &str, table: &str, condition: &str) -> i64 {
        count(
            url,
            &format!("SELECT COUNT(*) FROM {table} WHERE {condition}"),
        )
        .await
    }
}

async fn count(url: &str, sql: &str) -> i64 {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Asserts the error shape with the expected status and code; returns the message.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) -> String {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    got.1["error"]["message"].as_str().unwrap().to_owned()
}

#[track_caller]
fn assert_deleted(got: &(StatusCode, Value)) {
    assert_eq!(got.0, StatusCode::NO_CONTENT, "{}", got.1);
}

/// A device as just-in-time provisioning creates it from a CA.
fn provisioned(id: &str, org: &str, ca_id: &str, product: &str, cohort: &str) -> NewDevice {
    NewDevice {
        id: DeviceId::parse(id).unwrap(),
        org_id: org.into(),
        ca_id: ca_id.into(),
        product_id: product.into(),
        cohort_id: CohortId::parse(cohort).unwrap(),
        tags: Default::default(),
        cert: broker::registry::CertFacts {
            fingerprint_sha256: broker::registry::fingerprint(id.as_bytes()),
            subject: format!("CN={id}"),
            issuer: "CN=test".into(),
            serial: "01".into(),
            not_before_ms: 0,
            not_after_ms: 4_102_444_800_000,
        },
    }
}

/// Polls `check` every 50 ms for up to 5 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn products_and_cohorts_are_deleted_once_empty(url: &str) {
    use fleet_service::store::{DeploymentKind, NewDeployment, StateChange};
    use fleet_wire::update::{DeploymentState, ReleaseManifest};

    let api = start(url).await;
    let viewer = api.key("viewer", json!({})).await;
    let pid = api.product("deletable").await;
    let cid = api.cohort(&pid, "canary").await;
    let beta = api.cohort(&pid, "beta").await;
    let (product_key, product_op) = api
        .key_of(ADMIN, "operator", json!({ "product_id": pid }))
        .await;
    let (cohort_key, cohort_op) = api
        .key_of(
            ADMIN,
            "operator",
            json!({ "product_id": pid, "cohort_id": cid }),
        )
        .await;
    let (_, other_admin) = api.org("elsewhere").await;
    let product_path = format!("/products/{pid}");
    let cohort_path = format!("/cohorts/{cid}");

    // Roles and scopes: a viewer deletes nothing; a product needs an organization-wide key,
    // a cohort a key that covers its product; another organization's is a 404.
    for (path, token) in [
        (&product_path, &viewer),
        (&product_path, &product_op),
        (&cohort_path, &viewer),
        (&cohort_path, &cohort_op),
    ] {
        assert_error(
            &api.delete(path, token).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
    }
    for path in [&product_path, &cohort_path] {
        assert_error(
            &api.delete(path, &other_admin).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    for path in ["/products/nope", "/cohorts/nope"] {
        assert_error(
            &api.delete(path, ADMIN).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }

    // A cohort with a device, a CA provisioning into it, a key scoped to it and a live
    // deployment: 409, naming each and what to do.
    api.device("del-1", &pid, Some(&cid), json!({})).await;
    let ca = api
        .ca_as(ADMIN, &TestCa::new("deletes CA"), Some((&pid, &cid)))
        .await;
    let store = api.store();
    store
        .create_signing_key("default", "k1", "key", "AAAA")
        .await
        .unwrap();
    let release = store
        .create_release(
            &ReleaseManifest {
                product_id: pid.clone(),
                version: "1.0.0".into(),
                url: "http://127.0.0.1/fw".into(),
                size: 1,
                sha256: "00".repeat(32),
            },
            "sig",
            "k1",
            None,
        )
        .await
        .unwrap();
    let deployment = store
        .create_deployment(&NewDeployment {
            release: release.clone(),
            cohort_id: CohortId::parse(&cid).unwrap(),
            kind: DeploymentKind::Rollout,
            policy: fleet_service::rollout::policy::RolloutPolicy::default()
                .validated()
                .unwrap(),
            reason: "test".into(),
            rollback_of: None,
        })
        .await
        .unwrap();
    let message = assert_error(
        &api.delete(&cohort_path, ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    for part in [
        "1 device (",
        &format!("DELETE /api/v1/devices?cohort_id={cid}"),
        "1 CA certificate provisioning into it",
        "active or paused deployment",
        "1 unrevoked API key scoped to it",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    let message = assert_error(
        &api.delete(&product_path, ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert!(
        message.contains("2 cohorts") && message.contains("1 device ("),
        "{message}"
    );

    // Once each is dealt with, the cohort goes, its finished deployment with it.
    assert_deleted(&api.delete("/devices/del-1", ADMIN).await);
    let (s, _) = api
        .patch(
            &format!("/ca-certificates/{ca}"),
            ADMIN,
            json!({ "jitp": null }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.delete(&format!("/api-keys/{cohort_key}"), ADMIN).await;
    assert_eq!(s, StatusCode::OK);
    let message = assert_error(
        &api.delete(&cohort_path, ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert_eq!(
        message,
        "the cohort still has an active or paused deployment (cancel it first)"
    );
    store
        .set_deployment_state(
            &deployment.id,
            StateChange {
                from: &[DeploymentState::Active, DeploymentState::Paused],
                to: DeploymentState::Canceled,
            },
            "test",
        )
        .await
        .unwrap()
        .unwrap();
    // A key scoped to the product covers its cohorts.
    assert_deleted(&api.delete(&cohort_path, &product_op).await);
    assert_error(
        &api.get(&cohort_path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert!(store.deployment(&deployment.id).await.unwrap().is_none());
    assert_error(
        &api.delete(&cohort_path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // The product: its other cohort, a device outside every cohort, the key scoped to it.
    api.device("del-2", &pid, None, json!({})).await;
    let message = assert_error(
        &api.delete(&product_path, ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    for part in [
        "1 cohort (",
        "1 device (",
        &format!("DELETE /api/v1/devices?product_id={pid}"),
        "1 unrevoked API key",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    assert_deleted(&api.delete(&format!("/cohorts/{beta}"), ADMIN).await);
    assert_deleted(&api.delete("/devices/del-2", ADMIN).await);
    let (s, _) = api.delete(&format!("/api-keys/{product_key}"), ADMIN).await;
    assert_eq!(s, StatusCode::OK);
    // Its releases do not hold it: they go with it.
    let operator = api.key("operator", json!({})).await;
    assert_deleted(&api.delete(&product_path, &operator).await);
    assert_error(
        &api.get(&product_path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert!(store.release(&release.id).await.unwrap().is_none());

    // The audit log has every attempt, refused ones too.
    let (s, audit) = api
        .get(
            &format!("/audit?action=cohort.delete&target_id={cid}"),
            ADMIN,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let outcomes: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.first(), Some(&"failure"), "{audit}");
    assert!(outcomes.contains(&"success"), "{audit}");
}

async fn cas_are_deleted_and_no_longer_trusted(url: &str) {
    let api = start(url).await;
    let viewer = api.key("viewer", json!({})).await;
    let pid = api.product("cas").await;
    let cid = api.cohort(&pid, "canary").await;
    let scoped = api.key("operator", json!({ "product_id": pid })).await;
    let (_, other_admin) = api.org("elsewhere").await;
    let test_ca = TestCa::new("deletable CA");
    let ca = api.ca_as(ADMIN, &test_ca, Some((&pid, &cid))).await;
    let path = format!("/ca-certificates/{ca}");

    assert_error(
        &api.delete(&path, &viewer).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.delete(&path, &scoped).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.delete(&path, &other_admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.delete("/ca-certificates/nope", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // A device it provisioned names it: deleting it first is the operator's call.
    api.store()
        .provision(&provisioned("ca-dev-1", "default", &ca, &pid, &cid))
        .await
        .unwrap();
    let message = assert_error(
        &api.delete(&path, ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert!(
        message.contains("1 device (")
            && message.contains(&format!("DELETE /api/v1/devices?ca_id={ca}")),
        "{message}"
    );
    let (s, listed) = api.get(&format!("/devices?ca_id={ca}"), ADMIN).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(listed["items"][0]["id"], "ca-dev-1", "{listed}");
    let (s, bulk) = api.delete(&format!("/devices?ca_id={ca}"), ADMIN).await;
    assert_eq!((s, &bulk["deleted"]), (StatusCode::OK, &json!(1)), "{bulk}");

    // Even a CA that keeps its devices while disabled stops being trusted when deleted.
    let (s, _) = api
        .patch(&path, ADMIN, json!({ "keep_devices_when_disabled": true }))
        .await;
    assert_eq!(s, StatusCode::OK);
    let registry = api.app.control().registry();
    assert!(registry.ca(&ca).unwrap().trusted());
    assert!(registry.enabled_ca_certs().contains(&test_ca.der()));
    assert_deleted(&api.delete(&path, ADMIN).await);
    let gone = registry.ca(&ca).unwrap();
    assert!(!gone.trusted() && gone.jitp.is_none(), "{gone:?}");
    assert!(!registry.enabled_ca_certs().contains(&test_ca.der()));
    assert_error(
        &api.get(&path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.delete(&path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // Nothing holds the cohort any more.
    assert_deleted(&api.delete(&format!("/cohorts/{cid}"), ADMIN).await);
}

async fn organizations_are_deleted_by_the_platform_admin(url: &str) {
    let api = start(url).await;
    let (org, org_admin) = api.org("acme").await;
    let path = format!("/organizations/{org}");
    let operator = api.key("operator", json!({})).await;
    let pid = api.product("default's").await;
    let scoped_admin = api.key("admin", json!({ "product_id": pid })).await;

    // Only the platform admin: not the organization's own admin, not a scoped admin of
    // `default`, not an operator.
    for token in [&org_admin, &scoped_admin] {
        let message = assert_error(
            &api.delete(&path, token).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        assert!(message.contains("platform admin"), "{message}");
    }
    assert_error(
        &api.delete(&path, &operator).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.delete("/organizations/default", ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert_error(
        &api.delete("/organizations/nope", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // What it holds must go first; its keys, signing keys and codes go with it.
    let product = api.product_as(&org_admin, "gadget").await;
    let ca = api.ca_as(&org_admin, &TestCa::new("acme CA"), None).await;
    api.store()
        .create_signing_key(&org, "k-acme", "acme key", "AAAA")
        .await
        .unwrap();
    let (s, _) = api
        .post("/ca-certificates/verification-code", &org_admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let message = assert_error(
        &api.delete(&path, ADMIN).await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert_eq!(
        message,
        "the organization still has 1 product (delete them first); 1 CA certificate \
         (delete them first)"
    );
    assert_deleted(
        &api.delete(&format!("/products/{product}"), &org_admin)
            .await,
    );
    assert_deleted(
        &api.delete(&format!("/ca-certificates/{ca}"), &org_admin)
            .await,
    );
    assert!(api.app.ops().keys().principal(&org_admin).is_some());
    assert_deleted(&api.delete(&path, ADMIN).await);

    // Its admin key no longer opens anything.
    assert!(api.app.ops().keys().principal(&org_admin).is_none());
    assert_error(
        &api.get("/products", &org_admin).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &api.get(&path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(
        api.rows(url, "api_keys", &format!("org_id = '{org}'"))
            .await,
        0
    );
    assert_eq!(
        api.rows(url, "signing_keys", &format!("org_id = '{org}'"))
            .await,
        0
    );
    assert_error(
        &api.delete(&path, ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let (_, audit) = api
        .get("/audit?action=organization.delete&outcome=success", ADMIN)
        .await;
    assert_eq!(audit["items"][0]["target_id"], org.as_str(), "{audit}");
}

async fn devices_are_deleted_in_bulk(url: &str) {
    let api = start(url).await;
    let viewer = api.key("viewer", json!({})).await;
    let pid = api.product("sim").await;
    let cid = api.cohort(&pid, "simulated").await;
    let other = api.cohort(&pid, "bench").await;
    let rows: Vec<Value> = (0..1200)
        .map(|i| json!({ "id": format!("sim-{i:05}"), "cohort_id": cid, "tags": {"fleet": "sim"} }))
        .collect();
    let (s, imported) = api
        .post(
            &format!("/products/{pid}/devices/import"),
            ADMIN,
            json!(rows),
        )
        .await;
    assert_eq!((s, &imported["created"]), (StatusCode::OK, &json!(1200)));
    for i in 0..3 {
        api.device(
            &format!("bench-{i}"),
            &pid,
            Some(&other),
            json!({ "tags": {"site": "lab"} }),
        )
        .await;
    }
    let pin = "ab".repeat(32);
    api.device(
        "bench-pinned",
        &pid,
        Some(&other),
        json!({ "certificate_fingerprint": pin }),
    )
    .await;
    let bulk = |q: String| format!("/devices?{q}");

    // Bad queries, and viewers, delete nothing.
    for q in [
        "",
        "dry_run=true",
        "limit=5",
        "colour=red",
        "sort=id&cohort_id=x",
        "cursor=abc&cohort_id=x",
        "dry_run=maybe&cohort_id=x",
        "limit=0&cohort_id=x",
        "limit=10001&cohort_id=x",
        "limit=x&cohort_id=x",
        "state=sleeping",
        "cohort_id=a&cohort_id=b",
    ] {
        assert_error(
            &api.delete(&bulk(q.into()), ADMIN).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        );
    }
    assert_error(
        &api.delete(&bulk(format!("cohort_id={cid}")), &viewer).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(cohort_devices(url, &cid).await, 1200);

    // A dry run counts and names, and changes nothing.
    let (s, dry) = api
        .delete(&bulk(format!("cohort_id={cid}&dry_run=true")), ADMIN)
        .await;
    assert_eq!(s, StatusCode::OK, "{dry}");
    let first: Vec<String> = (0..20).map(|i| format!("sim-{i:05}")).collect();
    assert_eq!(
        dry,
        json!({ "dry_run": true, "matched": 1200, "deleted": 0, "remaining": 1200,
                "sample": first, "sessions_ended": 0 })
    );
    assert_eq!(cohort_devices(url, &cid).await, 1200);

    // A real run deletes at most `limit`, and says what remains.
    let (s, run) = api
        .delete(
            &bulk(format!("cohort_id={cid}&tag=fleet:sim&limit=500")),
            ADMIN,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{run}");
    assert_eq!(
        (&run["matched"], &run["deleted"], &run["remaining"]),
        (&json!(1200), &json!(500), &json!(700)),
        "{run}"
    );
    assert_eq!(run["sample"], json!(first));
    assert_eq!(cohort_devices(url, &cid).await, 700);
    assert_error(
        &api.get("/devices/sim-00000", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let (s, run) = api.delete(&bulk(format!("cohort_id={cid}")), ADMIN).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (&run["deleted"], &run["remaining"]),
        (&json!(700), &json!(0))
    );
    assert_eq!(cohort_devices(url, &cid).await, 0);

    // A scoped key deletes within its scope only: a filter outside it matches nothing.
    let scoped = api
        .key("operator", json!({ "product_id": pid, "cohort_id": other }))
        .await;
    let (_, none) = api
        .delete(&bulk(format!("cohort_id={cid}&dry_run=true")), &scoped)
        .await;
    assert_eq!(none["matched"], 0, "{none}");
    let (_, mine) = api
        .delete(&bulk(format!("product_id={pid}&dry_run=true")), &scoped)
        .await;
    assert_eq!(mine["matched"], 4, "{mine}");
    let (s, run) = api.delete(&bulk("tag=site:lab".into()), &scoped).await;
    assert_eq!((s, &run["deleted"]), (StatusCode::OK, &json!(3)), "{run}");

    // A deleted device's certificate is refused from then on, in the registry too.
    let (s, run) = api
        .delete(&bulk("id_prefix=bench-pin".into()), &scoped)
        .await;
    assert_eq!((s, &run["deleted"]), (StatusCode::OK, &json!(1)), "{run}");
    assert!(api.app.ops().is_revoked(&pin));
    assert_eq!(
        api.rows(url, "revoked_certificates", "device_id = 'bench-pinned'")
            .await,
        1
    );

    // The audit log keeps the query and the counts.
    let (_, audit) = api
        .get("/audit?action=device.bulk_delete&outcome=success", ADMIN)
        .await;
    let newest = &audit["items"][0]["detail"];
    assert_eq!(newest["query"], "id_prefix=bench-pin", "{audit}");
    assert_eq!(newest["deleted"], 1, "{audit}");
}

/// A cohort's devices, counted in the database.
async fn cohort_devices(url: &str, cohort: &str) -> i64 {
    count(
        url,
        &format!("SELECT COUNT(*) FROM devices WHERE cohort_id = '{cohort}'"),
    )
    .await
}

async fn device_commands_and_their_acks(url: &str) {
    let api = start(url).await;
    let viewer = api.key("viewer", json!({})).await;
    let operator = api.key("operator", json!({})).await;
    let (_, other_admin) = api.org("elsewhere").await;
    let pid = api.product("commanded").await;
    let cid = api.cohort(&pid, "canary").await;
    api.device("cmd-1", &pid, Some(&cid), json!({})).await;
    let send = "/devices/cmd-1/commands";

    // Sent: stored and published; the device is offline, so it waits in a persistent
    // session, if the device has one.
    let (s, sent) = api
        .post(
            send,
            &operator,
            json!({ "name": "reboot", "params": { "delay_s": 5 } }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sent}");
    let id = sent["id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{sent}");
    assert_eq!(
        (
            &sent["status"],
            &sent["device_online"],
            &sent["timeout_s"],
            &sent["params"],
            &sent["ack"]
        ),
        (
            &json!("sent"),
            &json!(false),
            &json!(300),
            &json!({ "delay_s": 5 }),
            &Value::Null
        ),
        "{sent}"
    );
    let read = format!("/devices/cmd-1/commands/{id}");
    let (s, got) = api.get(&read, &viewer).await;
    assert_eq!(s, StatusCode::OK);
    let mut expected = sent.clone();
    expected.as_object_mut().unwrap().remove("device_online");
    assert_eq!(got, expected);

    // The same id twice sends nothing the second time.
    let (s, _) = api
        .post(
            send,
            ADMIN,
            json!({ "id": "c-1", "name": "ping", "timeout_s": 1 }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_error(
        &api.post(send, ADMIN, json!({ "id": "c-1", "name": "ping" }))
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );

    // Roles, unknown and foreign devices and commands.
    assert_error(
        &api.post(send, &viewer, json!({ "name": "x" })).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    for (path, token) in [
        ("/devices/nope/commands", ADMIN),
        (send, other_admin.as_str()),
    ] {
        assert_error(
            &api.post(path, token, json!({ "name": "x" })).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    for (path, token) in [
        (read.as_str(), other_admin.as_str()),
        ("/devices/nope/commands/c-1", ADMIN),
        ("/devices/cmd-1/commands/unknown", ADMIN),
        ("/devices/cmd-1/commands/bad!id", ADMIN),
    ] {
        assert_error(
            &api.get(path, token).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }

    // Bodies.
    for (body, status, code) in [
        (json!({}), StatusCode::BAD_REQUEST, "invalid_body"),
        (
            json!({ "name": "x", "colour": 1 }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({ "name": 5 }),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({ "name": "x", "params": [1] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_params",
        ),
        (
            json!({ "name": "x", "timeout_s": 0 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_timeout",
        ),
        (
            json!({ "name": "x", "id": "two words" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_command_id",
        ),
        (
            json!({ "name": "" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_command_name",
        ),
    ] {
        assert_error(&api.post(send, ADMIN, body).await, status, code);
    }
    assert_error(
        &api.post_raw(send, "text/plain", "reboot").await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert_error(
        &api.post_raw(send, "application/json", "{\"name\":").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );

    // No ack within its timeout: timed out, worked out when read.
    eventually("c-1 times out", async || {
        api.get("/devices/cmd-1/commands/c-1", ADMIN).await.1["status"] == "timed_out"
    })
    .await;

    // Acks as the intake records them: `accepted`, then the final status, which stays.
    api.acks(&[("cmd-1", &id, CommandStatus::Accepted, None)])
        .await;
    let (_, got) = api.get(&read, ADMIN).await;
    assert_eq!(
        (&got["status"], &got["ack"]["status"]),
        (&json!("acknowledged"), &json!("accepted")),
        "{got}"
    );
    api.acks(&[("cmd-1", &id, CommandStatus::Succeeded, Some("rebooted"))])
        .await;
    api.acks(&[("cmd-1", &id, CommandStatus::Failed, Some("late"))])
        .await;
    let (_, got) = api.get(&read, ADMIN).await;
    assert_eq!(got["ack"]["status"], "succeeded", "{got}");
    assert_eq!(got["ack"]["message"], "rebooted", "{got}");
    assert!(got["ack"]["at"].is_string(), "{got}");
    // A late ack still counts; an ack of a command never sent here is not kept.
    api.acks(&[
        ("cmd-1", "c-1", CommandStatus::Rejected, None),
        ("cmd-1", "never-sent", CommandStatus::Succeeded, None),
    ])
    .await;
    let (_, late) = api.get("/devices/cmd-1/commands/c-1", ADMIN).await;
    assert_eq!(
        (&late["status"], &late["ack"]["status"]),
        (&json!("acknowledged"), &json!("rejected"))
    );
    assert_eq!(
        api.rows(url, "command_acks", "device_id = 'cmd-1'").await,
        2
    );

    // Quarantined: `commands_only` is for receiving commands; `refuse` cannot connect.
    let quarantine = |mode: &str| json!({ "reason": "test", "mode": mode });
    let (s, _) = api
        .post(
            "/devices/cmd-1/quarantine",
            ADMIN,
            quarantine("commands_only"),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.post(send, ADMIN, json!({ "name": "diagnose" })).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = api
        .post("/devices/cmd-1/quarantine", ADMIN, quarantine("refuse"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_error(
        &api.post(send, ADMIN, json!({ "name": "diagnose" })).await,
        StatusCode::CONFLICT,
        "device_quarantined",
    );
    // A device whose certificate is revoked cannot connect either.
    api.device(
        "cmd-2",
        &pid,
        Some(&cid),
        json!({ "certificate_fingerprint": "cd".repeat(32) }),
    )
    .await;
    let (s, _) = api
        .post("/devices/cmd-2/commands", ADMIN, json!({ "name": "x" }))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = api
        .post("/devices/cmd-2/revoke-certificate", ADMIN, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_error(
        &api.post("/devices/cmd-2/commands", ADMIN, json!({ "name": "x" }))
            .await,
        StatusCode::CONFLICT,
        "certificate_revoked",
    );

    // The audit log names the command the platform chose.
    let (_, audit) = api
        .get(
            "/audit?action=device.command&target_id=cmd-1&outcome=success",
            ADMIN,
        )
        .await;
    let ids: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["detail"]["command_id"])
        .collect();
    assert!(ids.contains(&&json!(id)), "{audit}");

    // A deleted device's commands and acks go with it.
    assert_deleted(&api.delete("/devices/cmd-1", ADMIN).await);
    assert_eq!(
        api.rows(url, "device_commands", "device_id = 'cmd-1'")
            .await,
        0
    );
    assert_eq!(
        api.rows(url, "command_acks", "device_id = 'cmd-1'").await,
        0
    );
}

async fn cohort_commands_and_their_acks(url: &str) {
    let api = start(url).await;
    let viewer = api.key("viewer", json!({})).await;
    let pid = api.product("fleet").await;
    let cid = api.cohort(&pid, "canary").await;
    let other = api.cohort(&pid, "beta").await;
    for id in ["co-a", "co-b", "co-q"] {
        api.device(id, &pid, Some(&cid), json!({})).await;
    }
    api.device("co-other", &pid, Some(&other), json!({})).await;
    let (s, _) = api
        .post(
            "/devices/co-q/quarantine",
            ADMIN,
            json!({ "reason": "test", "mode": "commands_only" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let send = format!("/cohorts/{cid}/commands");

    // Sent once to the cohort; the quarantined device hears only its own commands, so two
    // devices may answer.
    let (s, sent) = api
        .post(&send, ADMIN, json!({ "id": "all-1", "name": "ping" }))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sent}");
    assert_eq!(
        (
            &sent["status"],
            &sent["devices"],
            &sent["pending"],
            &sent["acks"]
        ),
        (&json!("sent"), &json!(2), &json!(2), &json!({})),
        "{sent}"
    );
    assert_error(
        &api.post(&send, ADMIN, json!({ "id": "all-1", "name": "ping" }))
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_error(
        &api.post(&send, &viewer, json!({ "name": "ping" })).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.post("/cohorts/nope/commands", ADMIN, json!({ "name": "ping" }))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post(&send, ADMIN, json!({ "name": "ping", "params": 3 }))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_params",
    );
    let scoped_elsewhere = api
        .key("operator", json!({ "product_id": pid, "cohort_id": other }))
        .await;
    assert_error(
        &api.post(&send, &scoped_elsewhere, json!({ "name": "ping" }))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Each device answers for itself; a device of another cohort has no such command.
    api.acks(&[
        ("co-a", "all-1", CommandStatus::Succeeded, None),
        ("co-b", "all-1", CommandStatus::Failed, Some("busy")),
        ("co-other", "all-1", CommandStatus::Succeeded, None),
    ])
    .await;
    let read = format!("/cohorts/{cid}/commands/all-1");
    let (s, got) = api.get(&read, &viewer).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (&got["status"], &got["pending"], &got["acks"]),
        (
            &json!("acknowledged"),
            &json!(0),
            &json!({ "failed": 1, "succeeded": 1 })
        ),
        "{got}"
    );
    let (_, one) = api.get("/devices/co-b/commands/all-1", ADMIN).await;
    assert_eq!(
        (
            &one["cohort_id"],
            &one["ack"]["status"],
            &one["ack"]["message"]
        ),
        (&json!(cid), &json!("failed"), &json!("busy")),
        "{one}"
    );
    for path in [
        "/devices/co-other/commands/all-1".to_owned(),
        format!("/cohorts/{other}/commands/all-1"),
        format!("/cohorts/{cid}/commands/nope"),
    ] {
        assert_error(
            &api.get(&path, ADMIN).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }

    // Devices that do not answer in time are counted as such.
    let (s, _) = api
        .post(
            &send,
            ADMIN,
            json!({ "id": "all-2", "name": "ping", "timeout_s": 1 }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    api.acks(&[("co-a", "all-2", CommandStatus::Succeeded, None)])
        .await;
    let read = format!("/cohorts/{cid}/commands/all-2");
    eventually("all-2 times out", async || {
        api.get(&read, ADMIN).await.1["status"] == "timed_out"
    })
    .await;
    let (_, got) = api.get(&read, ADMIN).await;
    assert_eq!(got["pending"], 1, "{got}");
}

/// A process with no broker to publish on stores nothing and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_a_broker_is_not_kept() {
    use std::sync::Arc;

    use broker::metrics::Metrics;
    use broker::registry::Registry;
    use broker::BrokerControl;
    use fleet_service::api::{router, ApiState};
    use fleet_service::keys::{ensure_bootstrap_admin, ApiKeys};
    use fleet_service::ops::Ops;

    let db = common::TestDb::sqlite();
    let store = Store::connect(&db.url).await.unwrap();
    ensure_bootstrap_admin(&store, ADMIN).await.unwrap();
    let keys = ApiKeys::load(&store).await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(Arc::new(store.clone()), metrics.clone()));
    let control = BrokerControl::new(registry, metrics);
    let ops = Ops::local(
        store.clone(),
        keys,
        control,
        fleet_service::rollout::Rollouts::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(ApiState::with_ops(store.clone(), ops));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut req = http
            .request(method, format!("http://{addr}/api/v1{path}"))
            .bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    let (_, product) = call(
        reqwest::Method::POST,
        "/products".into(),
        Some(json!({ "name": "p" })),
    )
    .await;
    let pid = product["id"].as_str().unwrap();
    let (_, cohort) = call(
        reqwest::Method::POST,
        format!("/products/{pid}/cohorts"),
        Some(json!({ "name": "c" })),
    )
    .await;
    let cid = cohort["id"].as_str().unwrap();
    let (s, _) = call(
        reqwest::Method::POST,
        "/devices".into(),
        Some(json!({ "id": "nb-1", "product_id": pid })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    for (send, read) in [
        (
            "/devices/nb-1/commands".to_owned(),
            "/devices/nb-1/commands/c-1".to_owned(),
        ),
        (
            format!("/cohorts/{cid}/commands"),
            format!("/cohorts/{cid}/commands/c-1"),
        ),
    ] {
        let got = call(
            reqwest::Method::POST,
            send,
            Some(json!({ "id": "c-1", "name": "x" })),
        )
        .await;
        assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable");
        assert_error(
            &call(reqwest::Method::GET, read, None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
}

/// How long a bulk deletion of 10,000 devices takes, and how long another write waits meanwhile
/// (each batch of 500 is its own transaction, so writes interleave). Run with
/// `cargo test --release -p fleet-service --test api_deletes_and_commands -- --ignored --nocapture`
/// (PostgreSQL too when `FLEET_TEST_POSTGRES_URL` is set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn bulk_deletion_figures() {
    let sqlite = common::TestDb::sqlite();
    let postgres = common::TestDb::postgres("bulk_deletion_figures").await;
    for db in std::iter::once(&sqlite).chain(postgres.as_ref()) {
        let api = start(&db.url).await;
        let pid = api.product("measured").await;
        let cid = api.cohort(&pid, "big").await;
        let other = api.cohort(&pid, "small").await;
        api.device("bystander", &pid, Some(&other), json!({})).await;
        let rows: Vec<Value> = (0..10_000)
            .map(|i| {
                let mut row = json!({ "id": format!("big-{i:05}"), "cohort_id": cid,
                    "tags": { "fleet": "sim", "n": i.to_string() } });
                if i % 2 == 0 {
                    row["certificate_fingerprint"] = json!(format!("{i:064x}"));
                }
                row
            })
            .collect();
        let (s, _) = api
            .post(
                &format!("/products/{pid}/devices/import"),
                ADMIN,
                json!(rows),
            )
            .await;
        assert_eq!(s, StatusCode::OK);

        // Another writer, meanwhile: tags of a device outside the deletion.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (http, base, stop) = (api.http.clone(), api.base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut waits = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let started = std::time::Instant::now();
                    let resp = http
                        .patch(format!("{base}/devices/bystander"))
                        .bearer_auth(ADMIN)
                        .json(&json!({ "tags": { "n": n.to_string() } }))
                        .send()
                        .await
                        .unwrap();
                    assert!(resp.status().is_success());
                    waits.push(started.elapsed());
                }
                waits
            })
        };
        let started = std::time::Instant::now();
        let (s, done) = api
            .delete(&format!("/devices?cohort_id={cid}&limit=10000"), ADMIN)
            .await;
        let took = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut waits = writer.await.unwrap();
        assert_eq!((s, &done["deleted"]), (StatusCode::OK, &json!(10_000)));
        waits.sort();
        let p = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize];
        println!(
            "{}: deleted 10,000 devices (5,000 certificates revoked) in {took:.2?} ({:.0}/s); \
             meanwhile {} other writes, p50 {:.1?}, p99 {:.1?}, max {:.1?}",
            api.store().backend_name(),
            10_000.0 / took.as_secs_f64(),
            waits.len(),
            p(0.5),
            p(0.99),
            waits.last().unwrap(),
        );
    }
}
