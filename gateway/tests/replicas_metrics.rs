//! What a replica's `/metrics` says about its database, over HTTP against a real PostgreSQL
//! server: the pool's connections, whether each change listener listens, and a reconnection
//! counted when the server ends the listeners' sessions. A gateway without a database shows
//! none of it.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::postgres::Postgres;
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const KEK: &str = "cmVwbGljYXMtc2hhcmUtdGhpcy0zMi1ieXRlLWtleSE=";
/// The change listeners a replica has, by their `listener` label.
const LISTENERS: [&str; 3] = ["tenants", "revocations", "keys"];

/// A gateway started with `keys` (besides a tenant and `metrics_listen`), the key-encryption
/// key in its environment: its process, its client and its metrics address.
fn start(dir: &Path, name: &str, keys: serde_json::Value) -> (Proc, TestClient, SocketAddr) {
    let mut config = json!({
        "metrics_listen": "127.0.0.1:0",
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": "http://127.0.0.1:9/fhir", "fhir_version": "4.0"}]}],
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    });
    for (key, value) in keys.as_object().unwrap() {
        config[key] = value.clone();
    }
    start_gateway_with_metrics(GATEWAY, dir, name, &config, KEK)
}

async fn metrics(addr: SocketAddr) -> String {
    let reply = TestClient::new(addr).get("/metrics", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text()
}

/// The value of the sample `name{labels}` (the whole label set as rendered, or none).
fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
}

/// Each listener's sample of `name`, in the order of [`LISTENERS`].
fn by_listener(metrics: &str, name: &str) -> Vec<Option<f64>> {
    LISTENERS
        .iter()
        .map(|listener| sample(metrics, name, &format!("listener=\"{listener}\"")))
        .collect()
}

/// Polls `check` every 50 ms; fails the test, with the last metrics page, when it does not
/// hold within `limit`.
async fn within(limit: Duration, what: &str, addr: SocketAddr, check: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let page = metrics(addr).await;
        if check(&page) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "not within {limit:?}: {what}; /metrics said:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_metrics_show_its_pool_and_listeners_and_count_their_reconnections() {
    let dir = scratch("replicas-metrics");
    let Some(server) = Postgres::start_or_skip(
        "replicas-metrics",
        "a_replicas_metrics_show_its_pool_and_listeners_and_count_their_reconnections",
    ) else {
        return;
    };
    server.create_database("gateway");
    let (replica, client, addr) = start(
        &dir,
        "replica",
        json!({"database_url": server.url("gateway"), "public_base_url": "https://gateway.example"}),
    );

    // Ready: every listener listens (tenants' and revocations' are what `/readyz` waits for;
    // the keys' connects beside them), none has had to connect again.
    let begun = Instant::now();
    while client.get("/readyz", &[]).await.status != StatusCode::OK {
        assert!(
            begun.elapsed() < Duration::from_secs(20),
            "/readyz never said ready; stderr:\n{}",
            replica.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    within(
        Duration::from_secs(5),
        "every listener listening",
        addr,
        |page| {
            by_listener(page, "tower_fhir_db_listener_listening") == [Some(1.0); 3]
                && by_listener(page, "tower_fhir_db_listener_reconnections_total") == [Some(0.0); 3]
        },
    )
    .await;

    // The pool's gauges (set once a second): its bound, connections open and idle after the
    // start's and the pings' work, none waited for.
    within(Duration::from_secs(5), "the pool's gauges", addr, |page| {
        let (Some(in_use), Some(idle), Some(max), Some(waiting)) = (
            sample(page, "tower_fhir_db_pool_connections", "state=\"in_use\""),
            sample(page, "tower_fhir_db_pool_connections", "state=\"idle\""),
            sample(page, "tower_fhir_db_pool_max_connections", ""),
            sample(page, "tower_fhir_db_pool_waiting", ""),
        ) else {
            return false;
        };
        max == 16.0 && idle >= 1.0 && in_use >= 0.0 && in_use + idle <= max && waiting == 0.0
    })
    .await;
    // The server counts the same connections: the pool's, the listeners' three, and psql's.
    let page = metrics(addr).await;
    let pooled = sample(&page, "tower_fhir_db_pool_connections", "state=\"in_use\"").unwrap()
        + sample(&page, "tower_fhir_db_pool_connections", "state=\"idle\"").unwrap();
    let backends: f64 = server
        .query(
            "gateway",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'gateway' AND pid <> pg_backend_pid()",
        )
        .trim()
        .parse()
        .unwrap();
    // (At least those: the pool may have opened one since its gauges were set.)
    assert!(
        backends >= 3.0 + pooled.min(1.0) && backends <= 16.0 + 3.0 + 1.0,
        "{backends} backends for {pooled} pooled connections and 3 listeners"
    );

    // The server ends the listeners' sessions (each idle on its `LISTEN`, or on the empty query
    // that checks it after 10 s of quiet): each connects again, catches up, and counts it.
    let ended: u32 = server
        .query(
            "gateway",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'gateway' AND pid <> pg_backend_pid() \
               AND (query LIKE 'LISTEN%' OR query = '')",
        )
        .trim()
        .parse()
        .unwrap();
    assert!(ended >= 3, "only {ended} listening sessions ended");
    within(
        Duration::from_secs(15),
        "every listener reconnected, counted, and listening again",
        addr,
        |page| {
            by_listener(page, "tower_fhir_db_listener_listening") == [Some(1.0); 3]
                && by_listener(page, "tower_fhir_db_listener_reconnections_total")
                    .iter()
                    .all(|count| count.is_some_and(|count| count >= 1.0))
        },
    )
    .await;
    assert_eq!(client.get("/readyz", &[]).await.status, StatusCode::OK);
    let logged = replica.stderr();
    assert!(
        logged.contains("database change listener reconnected; caches resynchronised"),
        "{logged}"
    );

    // A gateway keeping its state in files has no database, and no such metric.
    // (A request first, so that the page holds the metrics it makes.)
    let (_alone, alone, alone_metrics) = start(
        &dir,
        "alone",
        json!({"state_dir": dir.join("state").to_str().unwrap()}),
    );
    assert_eq!(alone.get("/healthz", &[]).await.status, StatusCode::OK);
    let page = metrics(alone_metrics).await;
    assert!(page.contains("tower_fhir_connections_open"), "{page}");
    assert!(!page.contains("tower_fhir_db_"), "{page}");
}
