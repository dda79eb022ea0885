//! The REST bridge as tests call it: the admin token, JSON in and out, and the set-ups many
//! tests share (a JITP fleet, organizations, keys, CA proofs of possession).

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::{Fleet, TestCa};

/// One REST endpoint (a platform, or one replica of a cluster) and the admin token.
#[derive(Clone)]
pub struct Rest {
    pub addr: SocketAddr,
    pub admin: String,
    http: reqwest::Client,
}

impl Rest {
    pub fn new(addr: SocketAddr, admin: impl Into<String>) -> Self {
        Self {
            addr,
            admin: admin.into(),
            http: reqwest::Client::new(),
        }
    }

    /// A REST call with the admin token; returns status and JSON body (Null when empty).
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(&self.admin, method, path, body).await
    }

    pub async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("http://{}{}", self.addr, path);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// A request with a raw body of `content_type`, as the admin.
    pub async fn api_raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let url = format!("http://{}{}", self.addr, path);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = self
            .http
            .request(method, url)
            .bearer_auth(&self.admin)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn device(&self, id: &str) -> Value {
        let (status, body) = self
            .api("GET", &format!("/api/v1/devices/{id}"), None)
            .await;
        assert_eq!(status, 200, "GET device {id}: {body}");
        body
    }

    /// Creates a product, a cohort and a manufacturing CA that provisions into them.
    pub async fn jitp_fleet(&self, tags: Value) -> Fleet {
        self.jitp_fleet_as(&self.admin, tags).await
    }

    /// [`Rest::jitp_fleet`] in the organization of the admin key `token`.
    pub async fn jitp_fleet_as(&self, token: &str, tags: Value) -> Fleet {
        let n = uuid::Uuid::new_v4().simple();
        self.jitp_fleet_with(token, TestCa::new(&format!("Manufacturing CA {n}")), tags)
            .await
    }

    /// A product (with a unique name) in the organization of the admin key `token`; its id.
    pub async fn product_as(&self, token: &str) -> String {
        let n = uuid::Uuid::new_v4().simple().to_string();
        let (s, product) = self
            .api_as(
                token,
                "POST",
                "/api/v1/products",
                Some(json!({ "name": format!("p-{n}") })),
            )
            .await;
        assert_eq!(s, 201, "{product}");
        product["id"].as_str().unwrap().to_owned()
    }

    /// A cohort named `name` of `product_id`, with the key `token`; its id.
    pub async fn cohort_as(&self, token: &str, product_id: &str, name: &str) -> String {
        let (s, cohort) = self
            .api_as(
                token,
                "POST",
                &format!("/api/v1/products/{product_id}/cohorts"),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(s, 201, "{cohort}");
        cohort["id"].as_str().unwrap().to_owned()
    }

    /// A product and a cohort in the organization of the admin key `token`, and `ca`
    /// registered there to provision into them.
    pub async fn jitp_fleet_with(&self, token: &str, ca: TestCa, tags: Value) -> Fleet {
        let product_id = self.product_as(token).await;
        let cohort_id = self.cohort_as(token, &product_id, "canary").await;
        let ca_id = self
            .register_ca_as(
                token,
                &ca,
                Some(json!({ "product_id": product_id, "cohort_id": cohort_id, "tags": tags })),
            )
            .await;
        Fleet {
            product_id,
            cohort_id,
            ca,
            ca_id,
        }
    }

    /// Registers a CA with the bootstrap admin, optionally with JITP settings, proving
    /// possession of its key; returns its id.
    pub async fn register_ca(&self, ca: &TestCa, jitp: Option<Value>) -> String {
        self.register_ca_as(&self.admin, ca, jitp).await
    }

    /// [`Rest::register_ca`] with another organization's key.
    pub async fn register_ca_as(&self, token: &str, ca: &TestCa, jitp: Option<Value>) -> String {
        let proof = self.ca_proof(token, ca).await;
        let (s, body) = self
            .api_as(
                token,
                "POST",
                "/api/v1/ca-certificates",
                Some(
                    json!({ "certificate_pem": ca.pem, "description": "test CA", "jitp": jitp,
                    "verification_certificate_pem": proof }),
                ),
            )
            .await;
        assert_eq!(s, 201, "register CA: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Creates an organization with the bootstrap admin; returns its id and admin key.
    pub async fn organization(&self, name: &str) -> (String, String) {
        let (s, body) = self
            .api(
                "POST",
                "/api/v1/organizations",
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(s, 201, "create organization: {body}");
        (
            body["organization"]["id"].as_str().unwrap().to_owned(),
            body["admin_key"]["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Issues an API key with the admin key `admin`; returns its secret.
    pub async fn key_as(&self, admin: &str, role: &str, scope: Value) -> String {
        let mut body = json!({ "name": format!("{role} key"), "role": role });
        if let (Some(b), Some(s)) = (body.as_object_mut(), scope.as_object()) {
            b.extend(s.clone());
        }
        let (s, key) = self
            .api_as(admin, "POST", "/api/v1/api-keys", Some(body))
            .await;
        assert_eq!(s, 201, "create key: {key}");
        key["secret"].as_str().unwrap().to_owned()
    }

    /// Proof of possession of `ca`'s key: a fresh verification code of the key's organization,
    /// as the CN of a certificate the CA signed.
    pub async fn ca_proof(&self, token: &str, ca: &TestCa) -> String {
        let (s, code) = self
            .api_as(
                token,
                "POST",
                "/api/v1/ca-certificates/verification-code",
                None,
            )
            .await;
        assert_eq!(s, 201, "verification code: {code}");
        ca.issue(code["code"].as_str().unwrap()).cert_pem
    }
}
