//! The gateway binary's rate limits and upstream concurrency limits, from its configuration
//! file and its admin API: `rate_limit` of tenants and clients, `max_concurrency` of upstreams.
//! The upstreams are loopback test servers (no npm needed).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");

const LIMITED: &str = "11110000-0000-4000-8000-000000000001";
const PLAIN: &str = "22220000-0000-4000-8000-000000000002";
const OTHER: &str = "33330000-0000-4000-8000-000000000003";
const PATIENT: &str = "44440000-0000-4000-8000-000000000004";
const HASTY: &str = "55550000-0000-4000-8000-000000000005";
const TENANTS: [&str; 5] = [LIMITED, PLAIN, OTHER, PATIENT, HASTY];
const SECRET: &str = "limits-client-secret-0123456789";
const ADMIN_TOKEN: &str = "limits-admin-token-0123456789";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

struct Gateway {
    _proc: Proc,
    client: TestClient,
}

fn start_gateway(dir: &Path, config: &Value) -> Gateway {
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info,tower_fhir=debug");
    let (proc, base) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    Gateway {
        _proc: proc,
        client: TestClient::new(addr),
    }
}

/// The gateway's configuration, in front of `upstream`.
///
/// It listens on port 0, its address read from the start line ([`start_gateway`]): a port
/// picked by `free_port` could be picked for another test's gateway at the same moment, and
/// with `SO_REUSEPORT` both would take it and share its connections.
fn config(dir: &Path, upstream: &str) -> Value {
    let plain = json!([{"base_url": upstream, "fhir_version": "4.0"}]);
    let one_at_a_time = |timeout_ms: u64| json!([{"base_url": upstream, "fhir_version": "4.0", "max_concurrency": 1, "timeout_ms": timeout_ms}]);
    json!({
        "listen": "127.0.0.1:0",
        "state_dir": dir.join("state"),
        "clients": [
            {"client_id": "app", "client_secret": SECRET, "tenants": TENANTS},
            {"client_id": "metered", "client_secret": SECRET, "tenants": TENANTS,
             "rate_limit": {"requests_per_second": 1, "burst": 2}}
        ],
        "tenants": [
            {"id": LIMITED, "upstreams": plain, "rate_limit": {"requests_per_second": 2, "burst": 2}},
            {"id": PLAIN, "upstreams": plain},
            {"id": OTHER, "upstreams": plain},
            {"id": PATIENT, "upstreams": one_at_a_time(10_000)},
            {"id": HASTY, "upstreams": one_at_a_time(1_000)}
        ],
        "admin_token": ADMIN_TOKEN
    })
}

async fn token(gateway: &Gateway, client_id: &str, tenant: &str) -> String {
    let reply = gateway
        .client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id={client_id}&client_secret={SECRET}&scope={tenant}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

async fn fhir(gateway: &Gateway, token: &str, path: &str) -> Reply {
    gateway.client.get_bearer(path, token).await
}

fn assert_throttled(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let retry: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(
        reply.json()["issue"][0]["code"],
        "throttled",
        "{}",
        reply.text()
    );
}

async fn admin(gateway: &Gateway, method: &str, path: &str, body: &Value) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    gateway
        .client
        .send(
            method,
            path,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            &body.to_string(),
        )
        .await
}

/// What `GET /admin/tenants/{PLAIN}` shows.
async fn plain_tenant(gateway: &Gateway) -> Value {
    admin(
        gateway,
        "GET",
        &format!("/admin/tenants/{PLAIN}"),
        &Value::Null,
    )
    .await
    .json()
}

#[tokio::test]
async fn configured_limits_apply_and_admin_changes_apply_at_once() {
    let dir = scratch("limits");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir/slow",
        Answer {
            delay: Duration::from_secs(5),
            ..Answer::json(json!({"resourceType": "Patient", "id": "slow"}))
        },
    );
    let base = upstream.base("/fhir");
    let gateway = start_gateway(&dir, &config(&dir, &base));

    // The tenant's limit: its third immediate request is refused; another tenant goes on.
    let limited = token(&gateway, "app", LIMITED).await;
    let plain = token(&gateway, "app", PLAIN).await;
    for _ in 0..2 {
        assert_eq!(
            fhir(&gateway, &limited, "/Patient").await.status,
            StatusCode::OK
        );
    }
    assert_throttled(
        &fhir(&gateway, &limited, "/Patient").await,
        StatusCode::TOO_MANY_REQUESTS,
    );
    for _ in 0..4 {
        assert_eq!(
            fhir(&gateway, &plain, "/Patient").await.status,
            StatusCode::OK
        );
    }

    // The client's limit spans its tenants.
    let metered_plain = token(&gateway, "metered", PLAIN).await;
    let metered_other = token(&gateway, "metered", OTHER).await;
    assert_eq!(
        fhir(&gateway, &metered_plain, "/Patient").await.status,
        StatusCode::OK
    );
    assert_eq!(
        fhir(&gateway, &metered_other, "/Patient").await.status,
        StatusCode::OK
    );
    assert_throttled(
        &fhir(&gateway, &metered_plain, "/Patient").await,
        StatusCode::TOO_MANY_REQUESTS,
    );

    // max_concurrency 1: while one request is in flight (the upstream holds it for 5 s), one
    // that may wait only 1 s gets 503 and never reaches the upstream.
    let patient = token(&gateway, "app", PATIENT).await;
    let hasty = token(&gateway, "app", HASTY).await;
    let in_flight = {
        let client = gateway.client.clone();
        let patient = patient.clone();
        tokio::spawn(async move { client.get_bearer("/slow", &patient).await })
    };
    // The slow request holds the only slot once the upstream has it (it is recorded before
    // its 5 s delay).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !upstream
        .received()
        .iter()
        .any(|r| r.target.starts_with("/fhir/slow"))
    {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = upstream.received().len();
    let started = Instant::now();
    assert_throttled(
        &fhir(&gateway, &hasty, "/Patient/2").await,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert!(started.elapsed() >= Duration::from_millis(1_000));
    assert_eq!(
        upstream.received().len(),
        received,
        "the refused request was sent"
    );
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        fhir(&gateway, &hasty, "/Patient/2").await.status,
        StatusCode::OK
    );

    // Admin PUT of a tenant with a rate limit: GET shows it, and it applies at once.
    let put = admin(
        &gateway,
        "PUT",
        &format!("/admin/tenants/{PLAIN}"),
        &json!({"upstreams": [{"base_url": base, "fhir_version": "4.0"}],
                "rate_limit": {"requests_per_second": 1, "burst": 1}}),
    )
    .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    let shown = plain_tenant(&gateway).await;
    assert_eq!(
        shown["rate_limit"],
        json!({"requests_per_second": 1, "burst": 1})
    );
    assert_eq!(
        fhir(&gateway, &plain, "/Patient").await.status,
        StatusCode::OK
    );
    assert_throttled(
        &fhir(&gateway, &plain, "/Patient").await,
        StatusCode::TOO_MANY_REQUESTS,
    );
    // A change that leaves `rate_limit` out would lift it without saying so: refused, the
    // limit kept (`"rate_limit": null` lifts it, below for a client).
    let put = admin(
        &gateway,
        "PUT",
        &format!("/admin/tenants/{PLAIN}"),
        &json!({"upstreams": [{"base_url": base, "fhir_version": "4.0", "timeout_ms": 9000}]}),
    )
    .await;
    assert_eq!(put.status, StatusCode::BAD_REQUEST, "{}", put.text());
    assert!(put.text().contains("null to lift it"), "{}", put.text());
    let shown = plain_tenant(&gateway).await;
    assert_eq!(
        shown["rate_limit"],
        json!({"requests_per_second": 1, "burst": 1})
    );
    assert_ne!(
        shown["upstreams"][0]["timeout_ms"],
        json!(9000),
        "the change was made"
    );
    assert_throttled(
        &fhir(&gateway, &plain, "/Patient").await,
        StatusCode::TOO_MANY_REQUESTS,
    );

    // Admin PUT of a client with a rate limit: GET shows it, and it applies at once (the
    // client was used, so its former "no limit" was cached).
    let other = token(&gateway, "app", OTHER).await;
    assert_eq!(
        fhir(&gateway, &other, "/Patient").await.status,
        StatusCode::OK
    );
    let put = admin(
        &gateway,
        "PUT",
        "/admin/clients/app",
        &json!({"tenants": TENANTS, "rate_limit": {"requests_per_second": 1, "burst": 1}}),
    )
    .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(
        put.json()["rate_limit"],
        json!({"requests_per_second": 1, "burst": 1})
    );
    assert_eq!(
        fhir(&gateway, &other, "/Patient").await.status,
        StatusCode::OK
    );
    assert_throttled(
        &fhir(&gateway, &other, "/Patient").await,
        StatusCode::TOO_MANY_REQUESTS,
    );
    // A change that leaves the limit out would lift it without saying so: refused, the limit
    // kept; `null` lifts it.
    let refused = admin(
        &gateway,
        "PUT",
        "/admin/clients/app",
        &json!({"tenants": TENANTS}),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{}",
        refused.text()
    );
    assert!(
        refused.text().contains("would lift it"),
        "{}",
        refused.text()
    );
    let kept = admin(&gateway, "GET", "/admin/clients/app", &json!(null)).await;
    assert_eq!(
        kept.json()["rate_limit"],
        json!({"requests_per_second": 1, "burst": 1})
    );
    let lifted = admin(
        &gateway,
        "PUT",
        "/admin/clients/app",
        &json!({"tenants": TENANTS, "rate_limit": null}),
    )
    .await;
    assert_eq!(lifted.status, StatusCode::OK, "{}", lifted.text());
    assert_eq!(lifted.json()["rate_limit"], json!(null));

    // Bad values are refused with the one sentence saying why.
    let refused = admin(
        &gateway,
        "PUT",
        &format!("/admin/tenants/{PLAIN}"),
        &json!({"upstreams": [{"base_url": base, "fhir_version": "4.0"}],
                "rate_limit": {"requests_per_second": 0}}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("rate_limit.requests_per_second must be a whole number from 1"),
        "{}",
        refused.text()
    );
    let refused = admin(
        &gateway,
        "PUT",
        "/admin/clients/app",
        &json!({"tenants": TENANTS, "rate_limit": {"requests_per_second": 1, "burst": -1}}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.text().contains("rate_limit.burst"),
        "{}",
        refused.text()
    );
    let refused = admin(
        &gateway,
        "PUT",
        &format!("/admin/tenants/{PLAIN}"),
        &json!({"upstreams": [{"base_url": base, "fhir_version": "4.0", "max_concurrency": 0}]}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused
            .text()
            .contains("max_concurrency must be a whole number from 1"),
        "{}",
        refused.text()
    );
    let refused = admin(
        &gateway,
        "PUT",
        &format!("/admin/tenants/{PLAIN}"),
        &json!({"upstreams": [{"base_url": base, "fhir_version": "4.0", "timeout_ms": 0}]}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.text().contains("timeout_ms must be from 1"),
        "{}",
        refused.text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_limits_in_the_configuration_are_refused_in_one_sentence() {
    let dir = scratch("limits-check");
    for (tenant, says) in [
        (
            json!({"id": PLAIN, "upstreams": [{"base_url": "http://127.0.0.1:9/fhir", "fhir_version": "4.0"}],
                   "rate_limit": {"requests_per_second": 0, "burst": 1}}),
            "rate_limit.requests_per_second must be a whole number from 1",
        ),
        (
            json!({"id": PLAIN, "upstreams": [{"base_url": "http://127.0.0.1:9/fhir", "fhir_version": "4.0",
                                              "max_concurrency": 0}]}),
            "max_concurrency must be a whole number from 1",
        ),
        (
            json!({"id": PLAIN, "upstreams": [{"base_url": "http://127.0.0.1:9/fhir", "fhir_version": "4.0",
                                              "timeout_ms": 0}]}),
            "timeout_ms must be from 1 to 86400000",
        ),
    ] {
        let file = dir.join("bad.json");
        std::fs::write(&file, json!({"tenants": [tenant]}).to_string()).unwrap();
        let output = Command::new(GATEWAY)
            .arg("--check-config")
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(says), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The admin API's bodies are bounded as the gateway's are: one declared too large gets `413`
/// before a byte of it is read, one that stops arriving is given up on after
/// `body_read_timeout_seconds`, even with the right admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_request_bodies_are_bounded_in_size_and_time() {
    let dir = scratch("admin-bodies");
    let upstream = RecordingUpstream::start().await;
    let mut config = config(&dir, &upstream.base("/fhir"));
    config["body_read_timeout_seconds"] = json!(2);
    let gateway = start_gateway(&dir, &config);
    let addr = gateway.client.addr();
    let head = |length: u64| {
        format!(
            "PUT /admin/tenants/{OTHER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
    };
    let huge = head(100 * 1024 * 1024);
    let (answer, waited) = tokio::task::spawn_blocking(move || send_until_closed(addr, &huge))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let stalled = format!("{}{{\"upstreams\"", head(100));
    let (answer, waited) = tokio::task::spawn_blocking(move || send_until_closed(addr, &stalled))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(waited < Duration::from_secs(9), "{waited:?}");
    // The tenant is as it was.
    let reply = admin(
        &gateway,
        "GET",
        &format!("/admin/tenants/{OTHER}"),
        &json!(null),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["upstreams"][0]["base_url"],
        upstream.base("/fhir")
    );
}

/// An upstream on loopback answering every request `200` on a kept-alive connection; how many
/// connections it accepted.
async fn counting_upstream() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(read) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    head.extend_from_slice(&buffer[..read]);
                    // Bodiless GETs: each head answered as it ends.
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let body = br#"{"resourceType":"Patient","id":"1"}"#;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err()
                            || stream.write_all(body).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (base, accepted)
}

/// `upstream_max_idle_connections`: by default an upstream connection is kept and used again;
/// with `0`, none is kept (a connection a request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_max_idle_connections_bounds_the_connections_kept() {
    for (kept, connections) in [(None, 1), (Some(0), 3)] {
        let dir = scratch(&format!("max-idle-{kept:?}"));
        let (base, accepted) = counting_upstream().await;
        let mut config = config(&dir, &base);
        // One worker: each keeps idle connections of its own, and the kernel spreads the
        // client's connections over them.
        config["workers"] = json!(1);
        if let Some(kept) = kept {
            config["upstream_max_idle_connections"] = json!(kept);
        }
        let gateway = start_gateway(&dir, &config);
        let token = token(&gateway, "app", PLAIN).await;
        for _ in 0..3 {
            let reply = fhir(&gateway, &token, "/Patient/1").await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            connections,
            "{kept:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
