//! A removed tenant's series on `/metrics`, over real HTTP through the gateway binary: there
//! while the tenant is served, still there with their final counts just after it is removed
//! (through this gateway's admin API, or another replica's sharing PostgreSQL), gone once
//! `metrics_removed_tenant_grace_seconds` has passed, and counted from zero when the tenant is
//! added again; a tenant left alone keeps its series and counts throughout.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::postgres::Postgres;
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
/// The tenant removed (and added back).
const GONE: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
/// The tenant left alone.
const KEPT: &str = "7b3e9a10-2c4d-4e5f-8a6b-0c1d2e3f4a5b";
const SECRET: &str = "metrics-tenants-secret-0123456789";
const ADMIN: &str = "metrics-tenants-admin-token-0123456789";
const KEK: &str = "cmVwbGljYXMtc2hhcmUtdGhpcy0zMi1ieXRlLWtleSE=";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
/// `metrics_removed_tenant_grace_seconds` in these tests.
const GRACE: Duration = Duration::from_secs(2);

struct Gateway {
    proc: Proc,
    client: TestClient,
    metrics: SocketAddr,
}

/// A tenant's entry as the configuration and the admin API take it: its upstream at
/// `/{name}` on `upstream`.
fn tenant(upstream: &RecordingUpstream, name: &str) -> Value {
    json!({"upstreams": [{"base_url": upstream.base(&format!("/{name}")), "fhir_version": "4.0"}]})
}

/// A gateway serving [`GONE`] and [`KEPT`] (the client `app` may ask for either), with the
/// admin API, `/metrics` and a grace of [`GRACE`], plus `extra`.
fn start(dir: &Path, name: &str, upstream: &RecordingUpstream, extra: Value) -> Gateway {
    let mut gone = tenant(upstream, "gone");
    gone["id"] = json!(GONE);
    let mut kept = tenant(upstream, "kept");
    kept["id"] = json!(KEPT);
    let mut config = json!({
        "admin_token": ADMIN,
        "metrics_listen": "127.0.0.1:0",
        "metrics_removed_tenant_grace_seconds": GRACE.as_secs(),
        "public_base_url": "https://gateway.example",
        "clients": [{"client_id": "app", "client_secret": SECRET, "tenants": [GONE, KEPT]}],
        "tenants": [gone, kept],
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let (proc, client, metrics) = start_gateway_with_metrics(GATEWAY, dir, name, &config, KEK);
    Gateway {
        proc,
        client,
        metrics,
    }
}

async fn token(gateway: &Gateway, tenant: &str) -> String {
    let reply = gateway
        .client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id=app&client_secret={SECRET}&scope={tenant}"
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

async fn admin(gateway: &Gateway, method: &str, path: &str, body: &Value) -> Reply {
    gateway
        .client
        .send(
            method,
            path,
            &[
                ("authorization", &format!("Bearer {ADMIN}")),
                ("content-type", "application/json"),
            ],
            &body.to_string(),
        )
        .await
}

/// Removes [`GONE`] through `gateway`'s admin API.
async fn remove_gone(gateway: &Gateway) {
    let path = format!("/admin/tenants/{GONE}");
    let removed = admin(gateway, "DELETE", &path, &json!({})).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{}", removed.text());
}

/// A token for `tenant` (counted for it), then `reads` reads of `/Patient/1` and one of the
/// missing `/Patient/404`: every request counted in `tenant`'s series.
async fn traffic(gateway: &Gateway, tenant: &str, reads: usize) {
    let token = token(gateway, tenant).await;
    for _ in 0..reads {
        let read = gateway.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    }
    let missing = gateway.client.get_bearer("/Patient/404", &token).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
}

async fn metrics(gateway: &Gateway) -> String {
    let reply = TestClient::new(gateway.metrics).get("/metrics", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text()
}

/// `tenant`'s `tower_fhir_requests_total` series on `page`: each one's `status_class` and
/// value, sorted.
fn series(page: &str, tenant: &str) -> Vec<(String, f64)> {
    let mut found: Vec<(String, f64)> = page
        .lines()
        .filter(|line| line.starts_with("tower_fhir_requests_total{"))
        .filter(|line| line.contains(&format!("tenant=\"{tenant}\"")))
        .map(|line| {
            let class = line
                .split("status_class=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_else(|| panic!("no status class: {line}"))
                .to_owned();
            let value = line.rsplit(' ').next().unwrap().parse().unwrap();
            (class, value)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// What [`traffic`] with `reads` reads leaves in a tenant's series counted from zero: the
/// token request and the reads `2xx`, the missing one `4xx`.
fn counted(reads: usize) -> Vec<(String, f64)> {
    vec![
        ("2xx".to_owned(), 1.0 + reads as f64),
        ("4xx".to_owned(), 1.0),
    ]
}

/// Polls `/metrics` every 100 ms until `check` holds of it; fails the test, with the page,
/// when it does not within `limit`. How long it took.
async fn within(
    gateway: &Gateway,
    limit: Duration,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let page = metrics(gateway).await;
        if check(&page) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "not within {limit:?}: {what}; /metrics said:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn upstream_answers(upstream: &RecordingUpstream) {
    for tenant in ["gone", "kept"] {
        upstream.answer(
            &format!("/{tenant}/Patient/404"),
            Answer {
                status: StatusCode::NOT_FOUND,
                ..Answer::json(json!({"resourceType": "OperationOutcome", "issue": []}))
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_removed_through_the_admin_api_leaves_metrics_after_the_grace() {
    let dir = scratch("metrics-tenants-admin");
    let upstream = RecordingUpstream::start().await;
    upstream_answers(&upstream);
    let gateway = start(
        &dir,
        "gateway",
        &upstream,
        json!({"state_dir": dir.join("state")}),
    );
    traffic(&gateway, GONE, 3).await;
    traffic(&gateway, KEPT, 1).await;
    let page = metrics(&gateway).await;
    assert_eq!(series(&page, GONE), counted(3), "{page}");
    assert_eq!(series(&page, KEPT), counted(1), "{page}");

    remove_gone(&gateway).await;
    let removed_at = Instant::now();
    // Just after: the final counts are still scraped.
    let page = metrics(&gateway).await;
    if removed_at.elapsed() < GRACE {
        assert_eq!(series(&page, GONE), counted(3), "{page}");
    }
    within(
        &gateway,
        GRACE + Duration::from_secs(10),
        "the removed tenant's series gone",
        |page| series(page, GONE).is_empty(),
    )
    .await;
    assert!(
        removed_at.elapsed() >= GRACE,
        "gone before the grace: {:?}",
        removed_at.elapsed()
    );
    let page = metrics(&gateway).await;
    assert!(!page.contains(GONE), "{page}");
    assert_eq!(series(&page, KEPT), counted(1), "untouched: {page}");

    // Added back, it counts from zero; the other one counts on from where it was.
    let added = admin(
        &gateway,
        "PUT",
        &format!("/admin/tenants/{GONE}"),
        &tenant(&upstream, "gone"),
    )
    .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    traffic(&gateway, GONE, 1).await;
    traffic(&gateway, KEPT, 1).await;
    let page = metrics(&gateway).await;
    assert_eq!(series(&page, GONE), counted(1), "{page}");
    assert_eq!(
        series(&page, KEPT),
        vec![("2xx".to_owned(), 4.0), ("4xx".to_owned(), 2.0)],
        "{page}"
    );
    // Served again, the tenant keeps its series past the grace.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    let page = metrics(&gateway).await;
    assert_eq!(series(&page, GONE), counted(1), "{page}");
    drop(gateway.proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_removed_through_another_replica_leaves_this_ones_metrics() {
    let dir = scratch("metrics-tenants-replicas");
    let Some(server) = Postgres::start_or_skip(
        "metrics-tenants-replicas",
        "a_tenant_removed_through_another_replica_leaves_this_ones_metrics",
    ) else {
        return;
    };
    server.create_database("gateway");
    let upstream = RecordingUpstream::start().await;
    upstream_answers(&upstream);
    let database = json!({"database_url": server.url("gateway")});
    let watched = start(&dir, "watched", &upstream, database.clone());
    let other = start(&dir, "other", &upstream, database);
    for replica in [&watched, &other] {
        let begun = Instant::now();
        while replica.client.get("/readyz", &[]).await.status != StatusCode::OK {
            assert!(
                begun.elapsed() < Duration::from_secs(20),
                "/readyz never said ready; stderr:\n{}",
                replica.proc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    traffic(&watched, GONE, 2).await;
    traffic(&watched, KEPT, 1).await;
    let page = metrics(&watched).await;
    assert_eq!(series(&page, GONE), counted(2), "{page}");

    // Removed on the other replica: this one hears it through the database.
    remove_gone(&other).await;
    let removed_at = Instant::now();
    within(
        &watched,
        GRACE + Duration::from_secs(15),
        "the tenant removed elsewhere gone from this replica's metrics",
        |page| series(page, GONE).is_empty(),
    )
    .await;
    assert!(removed_at.elapsed() >= GRACE, "{:?}", removed_at.elapsed());
    assert_eq!(series(&metrics(&watched).await, KEPT), counted(1));

    // Added back on the other replica: once this one serves it again, from zero.
    let added = admin(
        &other,
        "PUT",
        &format!("/admin/tenants/{GONE}"),
        &tenant(&upstream, "gone"),
    )
    .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    let begun = Instant::now();
    let token = token(&watched, GONE).await;
    while watched.client.get_bearer("/Patient/1", &token).await.status != StatusCode::OK {
        assert!(
            begun.elapsed() < Duration::from_secs(15),
            "the tenant added back is not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The token request and the read served (reads refused while the change travelled were
    // never routed for the tenant: counted without it).
    let page = metrics(&watched).await;
    assert_eq!(series(&page, GONE), [("2xx".to_owned(), 2.0)], "{page}");
    drop((watched.proc, other.proc));
}
