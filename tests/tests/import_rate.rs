//! Bulk import rate: 10,000 devices in one request over the REST bridge, on SQLite and
//! PostgreSQL. Measurement only:
//! `cargo test -p e2e --release --test import_rate -- --ignored --nocapture`
//! (the PostgreSQL half needs `FLEET_TEST_POSTGRES_URL`). It prints rows per second for a first
//! upload and for the same file again (every row compared and skipped), with certificates given
//! as fingerprints and as PEMs, and asserts only that every row was answered as expected.

use std::time::Instant;

use e2e::{Db, Platform};
use serde_json::json;

const ROWS: usize = 10_000;

async fn rate(db: Db) {
    let Some(p) = Platform::start(db).await else {
        return;
    };
    let fleet = p.jitp_fleet(json!({})).await;
    let ca = &fleet.ca;
    let t = Instant::now();
    let certs: Vec<String> = (0..ROWS)
        .map(|n| ca.issue(&format!("bulk-{n:05}")).cert_pem)
        .collect();
    println!(
        "{:?}: {ROWS} certificates minted in {:.1} s",
        db,
        t.elapsed().as_secs_f64()
    );
    let path = format!("/api/v1/products/{}/devices/import", fleet.product_id);
    for (kind, prefix) in [("fingerprint", "fp"), ("PEM", "pem")] {
        let mut csv = String::from("id,cohort,tags,certificate\n");
        for (n, pem) in certs.iter().enumerate() {
            let certificate = if kind == "PEM" {
                format!("\"{}\"", pem.trim())
            } else {
                let der = rustls_pemfile::certs(&mut pem.as_bytes())
                    .next()
                    .unwrap()
                    .unwrap();
                broker::registry::fingerprint(&der)
            };
            csv.push_str(&format!(
                "{prefix}-{n:05},{},site=site-{};batch=b{},{certificate}\n",
                fleet.cohort_id,
                n % 50,
                n / 1000
            ));
        }
        for (pass, want) in [("first upload", "created"), ("re-upload", "skipped")] {
            let t = Instant::now();
            let (s, report) = p.api_raw("POST", &path, "text/csv", csv.clone()).await;
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(s, 200, "{report}");
            assert_eq!(report[want], ROWS, "{}", report["results"][0]);
            println!(
                "{db:?} {kind:<11} {pass:<12}: {ROWS} rows ({:.1} MiB) in {secs:.2} s = {:.0} rows/s",
                csv.len() as f64 / (1024.0 * 1024.0),
                ROWS as f64 / secs
            );
        }
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn import_rate_sqlite() {
    rate(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn import_rate_postgres() {
    rate(Db::Postgres).await;
}
