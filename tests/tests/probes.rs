//! The probes load balancers and orchestrators use: `/healthz` (the process answers) and
//! `/readyz` (it can do its work: the database answers), at the root, without an API key.

use e2e::Platform;

async fn get(p: &Platform, path: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(format!("http://{}{path}", p.app().http_addr()))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let p = Platform::sqlite().await;
    assert_eq!(
        get(&p, "/healthz").await,
        (200, serde_json::json!({ "status": "ok" }))
    );
    assert_eq!(
        get(&p, "/readyz").await,
        (200, serde_json::json!({ "status": "ready" }))
    );

    // The database goes away: not ready, though the process still answers.
    p.app().store().close().await;
    let (status, body) = get(&p, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "database unavailable");
    assert_eq!(get(&p, "/healthz").await.0, 200);
    p.stop().await;
}
