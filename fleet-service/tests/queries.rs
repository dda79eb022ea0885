//! Device query latency on 100,000 devices, on SQLite and PostgreSQL. Measurement only:
//! `cargo test -p fleet-service --release --test queries -- --ignored --nocapture`
//! (the PostgreSQL half needs `FLEET_TEST_POSTGRES_URL`). It prints figures and asserts only
//! that each query returns what the generated fleet holds.

mod common;

use std::time::Instant;

use common::{catalog, exec_sql};
use fleet_service::store::{
    DeviceCursor, DeviceFilter, DeviceSort, DeviceState, Store, SummaryScope,
};

const DEVICES: i64 = 100_000;

/// Fills the catalog's product with `DEVICES` devices over ten cohorts, six states, ten firmware
/// versions, fifty `site` tags, spread last-seen and certificate expiry times.
async fn fill(url: &str, store: &Store, product: &str, postgres: bool) {
    let cohorts = store.cohorts_of(product).await.unwrap();
    let cohort_case = cohorts
        .iter()
        .enumerate()
        .map(|(n, c)| format!("WHEN {n} THEN '{}'", c.id))
        .collect::<Vec<_>>()
        .join(" ");
    let (rows, id, online) = if postgres {
        (
            format!("generate_series(0, {}) AS n(i)", DEVICES - 1),
            "'dev-' || lpad(i::text, 6, '0')",
            "(i % 3 = 0)",
        )
    } else {
        ("n".to_owned(), "printf('dev-%06d', i)", "(i % 3 = 0)")
    };
    let cte = if postgres {
        String::new()
    } else {
        format!(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {}) ",
            DEVICES - 1
        )
    };
    exec_sql(
        url,
        &format!(
            "{cte}INSERT INTO devices (id, org_id, product_id, cohort_id, tags, state, \
             state_reason, state_changed_at, online, session_epoch, presence_rank, last_seen, \
             firmware_version, cert_not_after, created_at, updated_at) \
             SELECT {id}, 'default', '{product}', CASE i % {k} {cohort_case} END, '{{}}', \
             CASE i % 6 WHEN 0 THEN 'online' WHEN 1 THEN 'offline' WHEN 2 THEN 'offline' \
             WHEN 3 THEN 'registered' WHEN 4 THEN 'updating' ELSE 'failed' END, 'bench', 0, \
             {online}, 1, 1, 1700000000000 + CAST(i AS BIGINT) * 1000, '1.' || (i % 10) || '.0', \
             1700000000000 + CAST(i AS BIGINT) * 86400, 0, 0 FROM {rows}",
            k = cohorts.len(),
        ),
    )
    .await;
    exec_sql(
        url,
        "INSERT INTO device_tags (device_id, key, value) \
         SELECT id, 'site', 'site-' || (CAST(substr(id, 5) AS INTEGER) % 50) FROM devices",
    )
    .await;
    exec_sql(url, "ANALYZE").await;
}

/// p50 and p95 of `runs` timings of `f`, in milliseconds.
async fn time<F, Fut>(runs: usize, mut f: F) -> (f64, f64, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut ms = Vec::with_capacity(runs);
    let mut n = 0;
    for _ in 0..runs {
        let t = Instant::now();
        n = f().await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    (ms[runs / 2], ms[runs * 95 / 100], n)
}

async fn latency(url: &str, postgres: bool) {
    let store = Store::connect(url).await.unwrap();
    let cat = catalog(&store, "bench").await;
    for n in 0..9 {
        store
            .create_cohort(&cat.product, &format!("c{n}"))
            .await
            .unwrap();
    }
    let t = Instant::now();
    fill(url, &store, &cat.product.id, postgres).await;
    println!(
        "{}: {DEVICES} devices generated in {:.1} s",
        if postgres { "postgres" } else { "sqlite" },
        t.elapsed().as_secs_f64()
    );
    let base = DeviceFilter {
        org_id: Some("default".into()),
        ..DeviceFilter::default()
    };
    let cohort = store.cohorts_of(&cat.product.id).await.unwrap()[3]
        .id
        .clone();
    let cases: Vec<(&str, DeviceFilter)> = vec![
        ("organization, first page", base.clone()),
        (
            "state=offline",
            DeviceFilter {
                state: Some(DeviceState::Offline),
                ..base.clone()
            },
        ),
        (
            "online=true",
            DeviceFilter {
                online: Some(true),
                ..base.clone()
            },
        ),
        (
            "cohort",
            DeviceFilter {
                cohort_id: Some(cohort),
                ..base.clone()
            },
        ),
        (
            "firmware_version",
            DeviceFilter {
                firmware_version: Some("1.3.0".into()),
                ..base.clone()
            },
        ),
        (
            "tag site",
            DeviceFilter {
                tags: vec![("site".into(), "site-7".into())],
                ..base.clone()
            },
        ),
        (
            "tag + firmware (AND)",
            DeviceFilter {
                tags: vec![("site".into(), "site-7".into())],
                firmware_version: Some("1.7.0".into()),
                ..base.clone()
            },
        ),
        (
            "id_prefix dev-012",
            DeviceFilter {
                id_prefix: Some("dev-012".into()),
                ..base.clone()
            },
        ),
        (
            "last_seen_after (newest 1%)",
            DeviceFilter {
                last_seen_after_ms: Some(1_700_000_000_000 + (DEVICES - 1000) * 1000),
                ..base.clone()
            },
        ),
        (
            "cert_expires_before (first 1%)",
            DeviceFilter {
                cert_expires_before_ms: Some(1_700_000_000_000 + 1000 * 86400),
                ..base.clone()
            },
        ),
    ];
    println!(
        "{:<34} {:>8} {:>8} {:>6}",
        "query (100 per page)", "p50 ms", "p95 ms", "rows"
    );
    for (name, filter) in &cases {
        let (p50, p95, n) = time(30, || async {
            store.devices(filter, None, 100).await.unwrap().len()
        })
        .await;
        assert!(n > 0, "{name} found nothing");
        println!("{name:<34} {p50:>8.2} {p95:>8.2} {n:>6}");
    }
    // The fifth page of a filtered listing, through cursors.
    let filter = DeviceFilter {
        state: Some(DeviceState::Offline),
        ..base.clone()
    };
    let mut after = None;
    for _ in 0..4 {
        let page = store.devices(&filter, after.as_ref(), 100).await.unwrap();
        after = page.last().map(|d| d.id.clone());
    }
    let (p50, p95, n) = time(30, || async {
        store
            .devices(&filter, after.as_ref(), 100)
            .await
            .unwrap()
            .len()
    })
    .await;
    assert_eq!(n, 100);
    println!(
        "{:<34} {p50:>8.2} {p95:>8.2} {n:>6}",
        "state=offline, page 5 by cursor"
    );

    // Sorted listings, on the indexes of migration 0010.
    let recent = DeviceFilter {
        last_seen_after_ms: Some(1_700_000_000_000 + (DEVICES - 1000) * 1000),
        ..base.clone()
    };
    let sorted: Vec<(&str, &DeviceFilter, DeviceSort)> = vec![
        ("sort=-last_seen", &base, DeviceSort::LastSeenDesc),
        (
            "sort=-last_seen + last_seen_after",
            &recent,
            DeviceSort::LastSeenDesc,
        ),
        (
            "sort=last_seen (stalest first)",
            &base,
            DeviceSort::LastSeen,
        ),
        ("sort=-created_at", &base, DeviceSort::CreatedAtDesc),
    ];
    for (name, filter, sort) in sorted {
        let (p50, p95, n) = time(30, || async {
            store
                .devices_sorted(filter, sort, None, 100)
                .await
                .unwrap()
                .len()
        })
        .await;
        assert_eq!(n, 100, "{name}");
        println!("{name:<34} {p50:>8.2} {p95:>8.2} {n:>6}");
    }
    let page = store
        .devices_sorted(&base, DeviceSort::LastSeenDesc, None, 100)
        .await
        .unwrap();
    let after = DeviceCursor {
        key: DeviceSort::LastSeenDesc.key_of(page.last().unwrap()),
        id: page.last().unwrap().id.clone(),
    };
    let (p50, p95, n) = time(30, || async {
        store
            .devices_sorted(&base, DeviceSort::LastSeenDesc, Some(&after), 100)
            .await
            .unwrap()
            .len()
    })
    .await;
    assert_eq!(n, 100);
    println!(
        "{:<34} {p50:>8.2} {p95:>8.2} {n:>6}",
        "sort=-last_seen, page 2 by cursor"
    );

    // The fleet summary: three grouped scans of all 100,000.
    let scope = SummaryScope {
        org_id: "default".into(),
        ..SummaryScope::default()
    };
    let (p50, p95, n) = time(10, || async {
        let s = store
            .fleet_summary(
                &scope,
                1_700_000_000_000,
                1_700_000_000_000 + 30 * 86_400_000,
            )
            .await
            .unwrap();
        s.groups.iter().map(|g| g.devices as usize).sum()
    })
    .await;
    assert_eq!(n, DEVICES as usize);
    println!(
        "{:<34} {p50:>8.2} {p95:>8.2} {n:>6}",
        "fleet summary (whole org)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn query_latency_100k_sqlite() {
    let db = common::TestDb::sqlite();
    latency(&db.url, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn query_latency_100k_postgres() {
    let Some(db) = common::TestDb::postgres("query_latency_100k_postgres").await else {
        return;
    };
    latency(&db.url, true).await;
}
