//! The REST bridge against hostile and careless clients, on SQLite and PostgreSQL: NUL bytes
//! and control characters in ids, filters and bodies; bodies of the wrong shape, size, type
//! or depth; racing creates, imports and deletes; and the promises every list and every error
//! keeps (one pagination, one error shape, never a 500).

use device_client::release::SigningKey;
use e2e::{on_both_databases, Db, Platform};
use serde_json::{json, Value};

on_both_databases!(
    nul_bytes_in_ids_filters_and_bodies_are_refused,
    concurrent_deployments_leave_one_live,
    concurrent_identical_imports_skip,
    over_limit_bodies_are_json_413,
    import_row_limit_is_refused_early,
    rollback_hides_other_organizations_releases,
    every_list_pages_with_limit_and_cursor,
    json_bodies_are_strict,
    statistics_are_fresh_after_an_import,
    hostile_bodies_get_clear_errors,
    racing_creates_and_deletes,
    racing_rollbacks_and_state_changes,
);

/// An error answer in the API's shape, with a code.
#[track_caller]
fn assert_error_shape(what: &str, status: u16, body: &Value) {
    assert!(
        status >= 400,
        "{what}: expected an error, got {status}: {body}"
    );
    assert!(
        body["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
            && body["error"]["message"].is_string(),
        "{what}: {status} is not in the error shape: {body}"
    );
}

/// No 500, and an error in the shape when it is one.
#[track_caller]
fn assert_clean(what: &str, status: u16, body: &Value) {
    assert!(status < 500, "{what}: {status}: {body}");
    if status >= 400 {
        assert_error_shape(what, status, body);
    }
}

/// Registers a signing key with `token` and signs releases of `product_id` with it.
struct Releases {
    key: SigningKey,
    product_id: String,
    token: String,
}

impl Releases {
    async fn new(p: &Platform, token: &str, product_id: &str) -> Releases {
        let key = SigningKey::generate().unwrap();
        let (s, body) = p
            .api_as(
                token,
                "POST",
                "/api/v1/signing-keys",
                Some(json!({ "name": "k", "public_key": key.public_key_base64() })),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        Releases {
            key,
            product_id: product_id.to_owned(),
            token: token.to_owned(),
        }
    }

    async fn release(&self, p: &Platform, version: &str) -> String {
        let signed = self
            .key
            .sign(
                &self.product_id,
                version,
                "http://127.0.0.1:1/fw.bin",
                version.as_bytes(),
            )
            .unwrap();
        let (s, body) = p
            .api_as(
                &self.token,
                "POST",
                "/api/v1/releases",
                Some(serde_json::to_value(&signed).unwrap()),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }
}

async fn deploy(p: &Platform, release_id: &str, cohort_id: &str) -> (u16, Value) {
    p.api(
        "POST",
        "/api/v1/deployments",
        Some(json!({ "release_id": release_id, "cohort_id": cohort_id })),
    )
    .await
}

/// Finding 13: PostgreSQL refuses NUL in text, so a NUL that reached a query was a 500.
async fn nul_bytes_in_ids_filters_and_bodies_are_refused(p: Platform) {
    let pid = p.product_as(p.app().admin_token()).await;
    let gets = [
        "/api/v1/organizations/%00",
        "/api/v1/products/%00",
        "/api/v1/products/%00/cohorts",
        "/api/v1/cohorts/%00",
        "/api/v1/ca-certificates/%00",
        "/api/v1/devices/%00",
        "/api/v1/devices/%00/telemetry",
        "/api/v1/devices/%00/executions",
        "/api/v1/releases/%00",
        "/api/v1/deployments/%00",
        "/api/v1/deployments/%00/executions",
        "/api/v1/devices/%00/commands/c-1",
        "/api/v1/devices/d-1/commands/%00",
        "/api/v1/cohorts/%00/commands/c-1",
        "/api/v1/devices?product_id=%00",
        "/api/v1/devices?ca_id=%00",
        "/api/v1/devices?cohort_id=%00",
        "/api/v1/devices?firmware_version=%00",
        "/api/v1/devices?tag=k:%00",
        "/api/v1/devices?id_prefix=%00",
        "/api/v1/releases?product_id=%00",
        "/api/v1/deployments?cohort_id=%00",
        "/api/v1/audit?action=%00",
        "/api/v1/audit?target_id=%00",
        "/api/v1/audit?actor=%00",
        "/api/v1/audit?request_id=%00",
        "/api/v1/fleet/summary?product_id=%00",
        "/api/v1/fleet/summary?cohort_id=%00",
        "/api/v1/ca-certificates?expires_before=%00",
        "/api/v1/products?cursor=%00",
        "/api/v1/devices?cursor=AA",
    ];
    for path in gets {
        let (s, body) = p.api("GET", path, None).await;
        assert_clean(path, s, &body);
        assert!(s >= 400, "{path}: {s}: {body}");
    }
    let nul = "\u{0}";
    let writes: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/api/v1/organizations".into(),
            Some(json!({ "name": nul })),
        ),
        (
            "POST",
            "/api/v1/products".into(),
            Some(json!({ "name": format!("a{nul}") })),
        ),
        (
            "POST",
            format!("/api/v1/products/{pid}/cohorts"),
            Some(json!({ "name": nul })),
        ),
        (
            "POST",
            "/api/v1/api-keys".into(),
            Some(json!({ "name": "k", "role": "viewer", "product_id": nul })),
        ),
        (
            "POST",
            "/api/v1/api-keys".into(),
            Some(json!({ "name": "k", "role": "viewer", "product_id": pid, "cohort_id": nul })),
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(json!({ "id": "d-1", "product_id": nul })),
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(json!({ "id": "d-1", "product_id": pid, "cohort_id": nul })),
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(json!({ "id": "d-1", "product_id": pid, "tags": { nul: "v" } })),
        ),
        (
            "POST",
            "/api/v1/deployments".into(),
            Some(json!({ "release_id": nul, "cohort_id": nul })),
        ),
        (
            "POST",
            "/api/v1/releases".into(),
            Some(
                json!({ "product_id": nul, "version": "1.0.0", "url": "http://x/y",
                "size": 1, "sha256": "00", "signature": "AA" }),
            ),
        ),
        (
            "POST",
            "/api/v1/ca-certificates".into(),
            Some(json!({ "certificate_pem": nul })),
        ),
        (
            "POST",
            "/api/v1/signing-keys".into(),
            Some(json!({ "name": "k", "public_key": nul })),
        ),
        (
            "PATCH",
            "/api/v1/devices/%00".into(),
            Some(json!({ "tags": {} })),
        ),
        ("DELETE", "/api/v1/devices/%00".into(), None),
        (
            "POST",
            "/api/v1/devices/%00/quarantine".into(),
            Some(json!({})),
        ),
        ("DELETE", "/api/v1/devices/%00/quarantine".into(), None),
        (
            "POST",
            "/api/v1/devices/%00/revoke-certificate".into(),
            None,
        ),
        (
            "PATCH",
            "/api/v1/ca-certificates/%00".into(),
            Some(json!({})),
        ),
        ("DELETE", "/api/v1/api-keys/%00".into(), None),
        ("DELETE", "/api/v1/signing-keys/%00".into(), None),
        ("DELETE", "/api/v1/organizations/%00".into(), None),
        ("DELETE", "/api/v1/products/%00".into(), None),
        ("DELETE", "/api/v1/cohorts/%00".into(), None),
        ("DELETE", "/api/v1/ca-certificates/%00".into(), None),
        ("DELETE", "/api/v1/devices?cohort_id=%00".into(), None),
        (
            "DELETE",
            "/api/v1/devices?tag=k:%00&dry_run=true".into(),
            None,
        ),
        (
            "POST",
            "/api/v1/devices/%00/commands".into(),
            Some(json!({ "name": "x" })),
        ),
        (
            "POST",
            "/api/v1/cohorts/%00/commands".into(),
            Some(json!({ "name": "x" })),
        ),
        (
            "POST",
            "/api/v1/devices/d-1/commands".into(),
            Some(json!({ "name": nul })),
        ),
        (
            "POST",
            "/api/v1/devices/d-1/commands".into(),
            Some(json!({ "name": "x", "id": nul, "params": { "k": nul } })),
        ),
        ("POST", "/api/v1/deployments/%00/pause".into(), None),
        ("POST", "/api/v1/deployments/%00/resume".into(), None),
        ("POST", "/api/v1/deployments/%00/cancel".into(), None),
        ("POST", "/api/v1/deployments/%00/rollback".into(), None),
        (
            "POST",
            "/api/v1/deployments/%00/promote".into(),
            Some(json!({ "cohort_id": nul })),
        ),
    ];
    for (method, path, body) in writes {
        let what = format!("{method} {path} {body:?}");
        let (s, answer) = p.api(method, &path, body).await;
        assert_clean(&what, s, &answer);
        assert!(s >= 400, "{what}: {s}: {answer}");
    }
    // Import: the path, and rows naming a NUL cohort or tag.
    let (s, body) = p
        .api_raw(
            "POST",
            "/api/v1/products/%00/devices/import",
            "text/csv",
            "id\nd-1\n",
        )
        .await;
    assert_clean("import path", s, &body);
    let csv = "id,cohort,tags\nn-1,\u{0},\nn-2,,k=\u{0}\n\u{0},,\n";
    let (s, body) = p
        .api_raw(
            "POST",
            &format!("/api/v1/products/{pid}/devices/import"),
            "text/csv",
            csv,
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["failed"], 3, "{body}");
    let json_rows =
        json!([{ "id": "j-1", "cohort_id": nul }, { "id": "j-2", "tags": { "k": nul } }]);
    let (s, body) = p
        .api_raw(
            "POST",
            &format!("/api/v1/products/{pid}/devices/import"),
            "application/json",
            json_rows.to_string(),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["failed"], 2, "{body}");
    p.stop().await;
}

/// Finding 14: concurrent creates for one cohort each saw no live deployment.
async fn concurrent_deployments_leave_one_live(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let cid = p.cohort_as(&admin, &pid, "c").await;
    let releases = Releases::new(&p, &admin, &pid).await;
    let release = releases.release(&p, "1.0.0").await;
    let answers = futures_join_all(
        (0..20)
            .map(|_| deploy(&p, &release, &cid))
            .collect::<Vec<_>>(),
    )
    .await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    for (s, body) in &answers {
        assert_clean("concurrent deployment", *s, body);
        if *s != 201 {
            assert_eq!(
                (*s, body["error"]["code"].as_str()),
                (409, Some("conflict"))
            );
        }
    }
    assert_eq!(created, 1, "{answers:?}");
    let (s, live) = p
        .api(
            "GET",
            &format!("/api/v1/deployments?cohort_id={cid}&state=active"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{live}");
    assert_eq!(live["items"].as_array().unwrap().len(), 1, "{live}");
    p.stop().await;
}

/// Joins futures without another dependency: each on its own task would need 'static, so
/// they are polled together by one `join_all`-like loop.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    use std::pin::Pin;
    use std::task::Poll;
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// Finding 14: concurrent uploads of one file answered `failed: conflict` for rows another
/// upload created meanwhile.
async fn concurrent_identical_imports_skip(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let mut csv = String::from("id,tags\n");
    for i in 0..300 {
        csv.push_str(&format!("race-{i:04},site=eu;n={i}\n"));
    }
    let path = format!("/api/v1/products/{pid}/devices/import");
    let answers = futures_join_all(
        (0..20)
            .map(|_| p.api_raw("POST", &path, "text/csv", csv.clone()))
            .collect::<Vec<_>>(),
    )
    .await;
    let mut created = 0;
    for (s, body) in &answers {
        assert_eq!(*s, 200, "{body}");
        assert_eq!(body["failed"], 0, "{}", body["results"]);
        assert_eq!(
            body["created"].as_u64().unwrap() + body["skipped"].as_u64().unwrap(),
            300
        );
        created += body["created"].as_u64().unwrap();
    }
    assert_eq!(created, 300);
    p.stop().await;
}

/// Finding 6: an over-limit body was text/plain (import) or a 400 (JSON routes).
async fn over_limit_bodies_are_json_413(p: Platform) {
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    for path in [
        "/api/v1/products",
        "/api/v1/organizations",
        "/api/v1/deployments",
        "/api/v1/deployments/x/pause",
    ] {
        let (s, body) = post_unread(&p, path, "application/json", big.clone().into_bytes()).await;
        assert_eq!(s, 413, "{path}: {body}");
        assert_eq!(body["error"]["code"], "payload_too_large", "{path}: {body}");
    }
    // The import route's own, larger limit (64 MiB).
    let pid = p.product_as(p.app().admin_token()).await;
    let (s, body) = post_unread(
        &p,
        &format!("/api/v1/products/{pid}/devices/import"),
        "text/csv",
        vec![b' '; 64 * 1024 * 1024 + 1],
    )
    .await;
    assert_eq!(s, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    p.stop().await;
}

/// POSTs `body` over a bare connection, reading the answer while still writing: a server
/// that refuses a body answers before reading it all and closes, which an HTTP client sees
/// as a failed write and reports as an error instead of the answer.
async fn post_unread(p: &Platform, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(p.app().http_addr())
        .await
        .unwrap();
    let (mut rx, mut tx) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: fleet\r\nAuthorization: Bearer {}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        p.app().admin_token(),
        body.len()
    );
    let writer = tokio::spawn(async move {
        // The server may stop reading (and reset the connection) part way.
        let _ = tx.write_all(head.as_bytes()).await;
        let _ = tx.write_all(&body).await;
        // Kept open: hyper ends a connection whose client half-closes before the answer.
        tx
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => break,
            Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| answer.len() >= end + 4 + n) {
                break;
            }
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

/// Finding 6: the import read every row of the document before counting them. A document
/// whose row 100,001 is followed by broken JSON is refused for its size, which shows the
/// parser stopped at the limit instead of reading on.
async fn import_row_limit_is_refused_early(p: Platform) {
    let pid = p.product_as(p.app().admin_token()).await;
    let path = format!("/api/v1/products/{pid}/devices/import");
    let mut doc = String::from("[");
    for i in 0..100_001 {
        doc.push_str(&format!("{{\"id\":\"r{i}\"}},"));
    }
    doc.push_str("this is not JSON");
    let (s, body) = p.api_raw("POST", &path, "application/json", doc).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("too_many_rows")),
        "{body}"
    );
    let mut csv = String::from("id\n");
    for i in 0..100_001 {
        csv.push_str(&format!("r{i}\n"));
    }
    let (s, body) = p.api_raw("POST", &path, "text/csv", csv).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("too_many_rows")),
        "{body}"
    );
    let (_, list) = p
        .api("GET", &format!("/api/v1/devices?product_id={pid}"), None)
        .await;
    assert_eq!(list["items"], json!([]), "nothing was written");
    p.stop().await;
}

/// Finding 15: a rollback to another organization's release said "belongs to another
/// product", to a missing one "does not exist".
async fn rollback_hides_other_organizations_releases(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let cid = p.cohort_as(&admin, &pid, "c").await;
    let ours = Releases::new(&p, &admin, &pid).await;
    let release = ours.release(&p, "1.0.0").await;
    let (s, d) = deploy(&p, &release, &cid).await;
    assert_eq!(s, 201, "{d}");
    let deployment = d["id"].as_str().unwrap().to_owned();

    let (_, other_admin) = p.organization("other").await;
    let other_pid = p.product_as(&other_admin).await;
    let theirs = Releases::new(&p, &other_admin, &other_pid).await;
    let foreign = theirs.release(&p, "9.9.9").await;
    let missing = "0190a4c0-0000-7000-8000-000000000000";

    let mut answers = Vec::new();
    for target in [foreign.as_str(), missing] {
        let (s, body) = p
            .api(
                "POST",
                &format!("/api/v1/deployments/{deployment}/rollback"),
                Some(json!({ "release_id": target })),
            )
            .await;
        assert_error_shape("rollback", s, &body);
        let message = body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(target, "ID");
        answers.push((s, body["error"]["code"].clone(), message));
    }
    assert_eq!(
        answers[0], answers[1],
        "a foreign release reads like a missing one"
    );
    p.stop().await;
}

/// Pages through `path` (which has no query yet) `limit` at a time; returns every item's id.
async fn walk(p: &Platform, token: &str, path: &str, limit: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let (s, body) = p.api_as(token, "GET", &url, None).await;
        assert_eq!(s, 200, "{url}: {body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize, "{url}: {body}");
        ids.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
    panic!("{path}: more than 100 pages");
}

/// Finding 18: `GET /deployments` refused `limit` and answered every deployment at once.
async fn every_list_pages_with_limit_and_cursor(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let releases = Releases::new(&p, &admin, &pid).await;
    let release = releases.release(&p, "1.0.0").await;
    releases.release(&p, "1.0.1").await;
    releases.release(&p, "1.0.2").await;
    let mut deployments = Vec::new();
    for name in ["a", "b", "c"] {
        let cid = p.cohort_as(&admin, &pid, name).await;
        let (s, d) = deploy(&p, &release, &cid).await;
        assert_eq!(s, 201, "{d}");
        deployments.push(d["id"].as_str().unwrap().to_owned());
    }
    p.product_as(&admin).await;
    p.key_as(&admin, "viewer", json!({})).await;
    Releases::new(&p, &admin, &pid).await;

    let lists = [
        "/api/v1/deployments".to_owned(),
        "/api/v1/releases".to_owned(),
        format!("/api/v1/releases?product_id={pid}"),
        "/api/v1/products".to_owned(),
        format!("/api/v1/products/{pid}/cohorts"),
        "/api/v1/api-keys".to_owned(),
        "/api/v1/signing-keys".to_owned(),
        "/api/v1/organizations".to_owned(),
        "/api/v1/ca-certificates".to_owned(),
    ];
    for list in &lists {
        let (s, whole) = p.api("GET", list, None).await;
        assert_eq!(s, 200, "{list}: {whole}");
        let all: Vec<String> = whole["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(walk(&p, &admin, list, 1).await, all, "{list}");
        assert_eq!(walk(&p, &admin, list, 2).await, all, "{list}");
        for bad in ["limit=0", "limit=1001", "limit=x", "cursor=%21%21"] {
            let sep = if list.contains('?') { '&' } else { '?' };
            let (s, body) = p.api("GET", &format!("{list}{sep}{bad}"), None).await;
            assert_eq!(s, 400, "{list} {bad}: {body}");
            assert_eq!(
                body["error"]["code"], "invalid_query",
                "{list} {bad}: {body}"
            );
        }
    }
    let newest_first: Vec<String> = deployments.iter().rev().cloned().collect();
    assert_eq!(
        walk(&p, &admin, "/api/v1/deployments", 2).await,
        newest_first
    );
    p.stop().await;
}

/// Finding 16: `[]` was a valid optional body and `null` was not; trailing bytes were
/// ignored; `5276.0` was not a whole number; tags had no cap; messages named Rust types.
async fn json_bodies_are_strict(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let cid = p.cohort_as(&admin, &pid, "c").await;
    let releases = Releases::new(&p, &admin, &pid).await;
    let release = releases.release(&p, "1.0.0").await;
    let (s, d) = p
        .api(
            "POST",
            "/api/v1/deployments",
            Some(json!({ "release_id": release, "cohort_id": cid,
                "policy": { "timeout_s": 5276.0 } })),
        )
        .await;
    assert_eq!(s, 201, "a whole number written 5276.0: {d}");
    assert_eq!(d["policy"]["timeout_s"], 5276);
    let id = d["id"].as_str().unwrap().to_owned();
    let pause = format!("/api/v1/deployments/{id}/pause");
    let resume = format!("/api/v1/deployments/{id}/resume");

    for bad in ["[]", "3", "\"x\"", "{} {}", "{}x"] {
        let (s, body) = p.api_raw("POST", &pause, "application/json", bad).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert_error_shape(bad, s, &body);
    }
    let (s, body) = p.api_raw("POST", &pause, "application/json", "null").await;
    assert_eq!(s, 200, "null is no body: {body}");
    let (s, body) = p.api_raw("POST", &resume, "application/json", "").await;
    assert_eq!(s, 200, "an empty body: {body}");
    let (s, body) = p
        .api_raw("POST", &pause, "text/plain", "{\"reason\": \"x\"}")
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    let (s, body) = p
        .api_raw(
            "POST",
            "/api/v1/products",
            "application/json",
            "{\"name\": \"trailing\"} {\"name\": \"more\"}",
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );

    for (path, body) in [
        ("/api/v1/products", json!({ "name": 5 })),
        ("/api/v1/products", json!([])),
        (
            "/api/v1/deployments",
            json!({ "release_id": release, "cohort_id": cid, "policy": { "timeout_s": "x" } }),
        ),
        (
            "/api/v1/deployments",
            json!({ "release_id": release, "cohort_id": cid, "policy": { "timeout_s": -1 } }),
        ),
        (
            "/api/v1/deployments",
            json!({ "release_id": release, "cohort_id": cid, "policy": { "on_failure": 3 } }),
        ),
        (
            "/api/v1/devices",
            json!({ "id": "x", "product_id": pid, "tags": [] }),
        ),
    ] {
        let (s, answer) = p.api("POST", path, Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        for rust in [
            "u64", "u32", "i64", "struct ", "enum ", "String", "Map<", "Vec<", "Option<",
        ] {
            assert!(
                !message.contains(rust),
                "{body}: names a Rust type: {message}"
            );
        }
    }

    let tags: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (s, body) = p
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": "many-tags", "product_id": pid, "tags": tags })),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("invalid_tags")),
        "{body}"
    );

    // The fleet summary and a deployment's summary are different schemas.
    let (s, doc) = p.api("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, 200);
    let fleet = &doc["paths"]["/api/v1/fleet/summary"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"]["$ref"];
    let deployment =
        &doc["components"]["schemas"]["DeploymentBody"]["properties"]["summary"]["$ref"];
    assert!(
        fleet.is_string() && deployment.is_string(),
        "{fleet} {deployment}"
    );
    assert_ne!(fleet, deployment);
    p.stop().await;
}

/// Finding 17: after a bulk import PostgreSQL kept estimating the device table as empty.
async fn statistics_are_fresh_after_an_import(p: Platform) {
    let pid = p.product_as(p.app().admin_token()).await;
    let mut csv = String::from("id,tags\n");
    for i in 0..3000 {
        csv.push_str(&format!("stat-{i:05},site=s{}\n", i % 7));
    }
    let (s, body) = p
        .api_raw(
            "POST",
            &format!("/api/v1/products/{pid}/devices/import"),
            "text/csv",
            csv,
        )
        .await;
    assert_eq!((s, body["created"].as_u64()), (200, Some(3000)), "{body}");
    match p.db {
        Db::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(p.database_url()).await.unwrap();
            for table in ["devices", "device_tags"] {
                let (tuples,): (f32,) =
                    sqlx::query_as("SELECT reltuples FROM pg_class WHERE relname = $1")
                        .bind(table)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap();
                assert!(tuples >= 3000.0, "{table}: reltuples {tuples}");
            }
        }
        Db::Sqlite => {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(p.database_url())
                .await
                .unwrap();
            let (rows,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            assert_eq!(rows, 1, "ANALYZE has run");
            let (stats,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM sqlite_stat1 WHERE tbl = 'devices'")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            assert!(stats > 0, "devices has statistics");
        }
    }
    p.stop().await;
}

/// Our own hostile bodies: wrong types, huge strings, deep nesting, unicode and control
/// characters, unknown fields, wrong content types. Every answer is clean and in the shape.
async fn hostile_bodies_get_clear_errors(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        "{{\"name\": {}{}}}",
        "{\"a\":".repeat(5000),
        "1}".repeat(5000)
    );
    let huge_string = json!({ "name": "y".repeat(1_500_000) }).to_string();
    let raw: Vec<(&str, &str, String, u16)> = vec![
        ("/api/v1/products", "application/json", deep.clone(), 400),
        ("/api/v1/products", "application/json", deep_object, 400),
        ("/api/v1/products", "application/json", huge_string, 422),
        ("/api/v1/products", "application/json", "{\"name\": \"\\ud800\"}".into(), 400),
        ("/api/v1/products", "application/json", "{\"name\": \"a\u{1}b\"}".into(), 400),
        ("/api/v1/products", "application/json", "{\"name\": \"a\\u0007b\"}".into(), 422),
        ("/api/v1/products", "application/json", "\u{feff}{\"name\": \"bom\"}".into(), 400),
        ("/api/v1/products", "application/json", "".into(), 400),
        ("/api/v1/products", "application/json", "{\"name\": \"x\", \"name\": \"y\"}".into(), 400),
        ("/api/v1/products", "application/json", "{\"name\": \"x\", \"colour\": 1}".into(), 400),
        ("/api/v1/products", "text/plain", "{\"name\": \"x\"}".into(), 415),
        ("/api/v1/products", "application/x-www-form-urlencoded", "name=x".into(), 415),
        ("/api/v1/products", "application/json; charset=latin1", "{\"name\": 1e400}".into(), 400),
        (
            "/api/v1/devices",
            "application/json",
            json!({ "id": "d".repeat(10_000), "product_id": pid }).to_string(),
            422,
        ),
        (
            "/api/v1/devices",
            "application/json",
            json!({ "id": "d-ok", "product_id": pid, "tags": { "k": { "nested": 1 } } }).to_string(),
            422,
        ),
        (
            "/api/v1/devices",
            "application/json",
            json!({ "id": "d-ok", "product_id": pid, "tags": { "k": "v".repeat(100_000) } }).to_string(),
            422,
        ),
        (
            "/api/v1/api-keys",
            "application/json",
            json!({ "name": "k", "role": "emperor" }).to_string(),
            422,
        ),
        (
            "/api/v1/deployments",
            "application/json",
            json!({ "release_id": "x", "cohort_id": "y", "policy": { "waves": (0..100_000).map(|_| json!({"percent": 1})).collect::<Vec<_>>() } }).to_string(),
            422,
        ),
    ];
    for (path, content_type, body, expected) in raw {
        let what = format!("{path} {content_type} {}", &body[..body.len().min(60)]);
        let (s, answer) = p.api_raw("POST", path, content_type, body).await;
        assert_clean(&what, s, &answer);
        assert_eq!(s, expected, "{what}: {answer}");
    }
    // Unicode that is not a control character is a fine name, and comes back unchanged.
    for name in ["Thermostat 🌡️", "שלום עולם", "e\u{301}", "名前"] {
        let (s, body) = p
            .api("POST", "/api/v1/products", Some(json!({ "name": name })))
            .await;
        assert_eq!(s, 201, "{name}: {body}");
        assert_eq!(body["name"], name);
    }
    // Ids that cannot be valid are a 404 or a 400, never a 500.
    for id in [
        "..",
        "a%2Fb",
        "%E2%80%AE",
        "%F0%9F%92%A9",
        &"z".repeat(5000),
        "%C0%AF",
        "%FF",
    ] {
        for path in [
            format!("/api/v1/devices/{id}"),
            format!("/api/v1/products/{id}"),
        ] {
            let (s, body) = p.api("GET", &path, None).await;
            assert_clean(&path, s, &body);
            assert!(s == 404 || s == 400, "{path}: {s}: {body}");
        }
    }
    p.stop().await;
}

/// Our own races: one device id created by twenty requests at once, then deleted by twenty.
async fn racing_creates_and_deletes(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let body = json!({ "id": "raced", "product_id": pid, "tags": { "a": "1" } });
    let answers = futures_join_all(
        (0..20)
            .map(|_| p.api("POST", "/api/v1/devices", Some(body.clone())))
            .collect::<Vec<_>>(),
    )
    .await;
    for (s, b) in &answers {
        assert_clean("racing create", *s, b);
    }
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|(s, _)| *s == 201 || *s == 409),
        "{answers:?}"
    );
    let answers = futures_join_all(
        (0..20)
            .map(|_| p.api("DELETE", "/api/v1/devices/raced", None))
            .collect::<Vec<_>>(),
    )
    .await;
    for (s, b) in &answers {
        assert_clean("racing delete", *s, b);
    }
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 204).count(),
        1,
        "{answers:?}"
    );
    let (s, _) = p.api("GET", "/api/v1/devices/raced", None).await;
    assert_eq!(s, 404);
    p.stop().await;
}

/// Our own races on one deployment: twenty rollbacks at once make one rollback deployment;
/// twenty pauses, resumes and cancels at once leave it in one state; never a 500.
async fn racing_rollbacks_and_state_changes(p: Platform) {
    let admin = p.app().admin_token().to_owned();
    let pid = p.product_as(&admin).await;
    let cid = p.cohort_as(&admin, &pid, "c").await;
    let releases = Releases::new(&p, &admin, &pid).await;
    let old = releases.release(&p, "1.0.0").await;
    let new = releases.release(&p, "2.0.0").await;
    let (s, d) = deploy(&p, &new, &cid).await;
    assert_eq!(s, 201, "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let rollback = format!("/api/v1/deployments/{id}/rollback");
    let answers = futures_join_all(
        (0..20)
            .map(|_| p.api("POST", &rollback, Some(json!({ "release_id": old }))))
            .collect::<Vec<_>>(),
    )
    .await;
    for (s, b) in &answers {
        assert_clean("racing rollback", *s, b);
    }
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{answers:?}"
    );
    let (_, live) = p
        .api(
            "GET",
            &format!("/api/v1/deployments?cohort_id={cid}&state=active"),
            None,
        )
        .await;
    assert_eq!(live["items"].as_array().unwrap().len(), 1, "{live}");
    let rollback_id = live["items"][0]["id"].as_str().unwrap().to_owned();
    let (_, original) = p
        .api("GET", &format!("/api/v1/deployments/{id}"), None)
        .await;
    assert_eq!(original["state"], "rolled_back");
    assert_eq!(
        original["rolled_back_by"],
        rollback_id.as_str(),
        "{original}"
    );

    let paths: Vec<String> = ["pause", "resume", "cancel"]
        .iter()
        .cycle()
        .take(21)
        .map(|action| format!("/api/v1/deployments/{rollback_id}/{action}"))
        .collect();
    let answers = futures_join_all(
        paths
            .iter()
            .map(|path| p.api("POST", path, None))
            .collect::<Vec<_>>(),
    )
    .await;
    for (s, b) in &answers {
        assert_clean("racing state change", *s, b);
        assert!(*s == 200 || *s == 409, "{s}: {b}");
    }
    p.stop().await;
}
