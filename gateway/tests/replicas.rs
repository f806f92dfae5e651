//! Three gateway processes sharing one real PostgreSQL database, driven over HTTP: one JWKS,
//! tokens good everywhere, tenants and secrets changed through one replica seen by the others,
//! revocations and failed secret checks shared, a signing key rotated everywhere, a replica
//! killed under load, and the database stopped and started again under load; the
//! key-encryption key changed replica by replica.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::postgres::Postgres;
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const LATER: &str = "7b3e9a10-2c4d-4e5f-8a6b-0c1d2e3f4a5b";
const SEALED: &str = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d";
const NESTED: &str = "8c4f0b21-3d5e-4f60-9b7c-1d2e3f4a5b6c";
const SECRET: &str = "replicated-secret-0123456789";
const ADMIN: &str = "replicas-admin-token-0123456789";
const KEK: &str = "cmVwbGljYXMtc2hhcmUtdGhpcy0zMi1ieXRlLWtleSE=";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

struct Replica {
    proc: Proc,
    client: TestClient,
}

/// The configuration every replica is started with (the same file: they must not fight over
/// seeding the database).
fn config_file(
    dir: &Path,
    name: &str,
    upstream: &RecordingUpstream,
    url: &str,
) -> std::path::PathBuf {
    let config = json!({
        "database_url": url,
        "admin_token": ADMIN,
        "public_base_url": "https://gateway.example",
        "clients": [
            {"client_id": "app", "client_secret": SECRET, "tenants": [TENANT, LATER]},
            {"client_id": "leaving", "client_secret": SECRET, "tenants": [TENANT]},
            {"client_id": "guessed", "client_secret": SECRET, "tenants": [TENANT]}
        ],
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]}],
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    });
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    file
}

/// Starts replica `n` with `file`, the key-encryption key in its environment, and `url` in
/// `TOWER_FHIR_DATABASE_URL` when given.
fn start(dir: &Path, file: &Path, n: usize, url: Option<&str>) -> Replica {
    start_with(dir, file, n, url, &[("TOWER_FHIR_KEY_ENCRYPTION_KEY", KEK)])
}

/// [`start`] with `keys` (variables and values) as its key-encryption keys.
fn start_with(
    dir: &Path,
    file: &Path,
    n: usize,
    url: Option<&str>,
    keys: &[(&str, &str)],
) -> Replica {
    // Port 0, the address read from the start line: a port picked by `free_port` could be
    // picked for another replica or test's gateway at the same moment, and with
    // `SO_REUSEPORT` both would take it and share its connections.
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env_remove("TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY")
        .env_remove("TOWER_FHIR_NEXT_KEY_ENCRYPTION_KEY")
        .envs(keys.iter().copied());
    if let Some(url) = url {
        command.env("TOWER_FHIR_DATABASE_URL", url);
    }
    let (mut proc, base) = Proc::start(
        command,
        dir.join(format!("replica{n}.log")),
        "tower-fhir gateway listening on ",
    );
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let state = proc.wait_for("  state in ");
    assert!(
        state.starts_with("PostgreSQL at postgres://gateway@"),
        "{state}"
    );
    Replica {
        proc,
        client: TestClient::new(addr),
    }
}

async fn token_request(replica: &Replica, client: &str, secret: &str, scope: &str) -> Reply {
    replica
        .client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id={client}&client_secret={secret}&scope={scope}"
            ),
        )
        .await
}

async fn token(replica: &Replica, scope: &str) -> String {
    let reply = token_request(replica, "app", SECRET, scope).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

async fn admin(replica: &Replica, method: &str, path: &str, body: Value) -> Reply {
    let auth = format!("Bearer {ADMIN}");
    replica
        .client
        .send(
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &body.to_string(),
        )
        .await
}

/// Onboards `LATER` through `replica`, with `upstream`.
async fn onboard(replica: &Replica, upstream: &RecordingUpstream) -> Reply {
    admin(
        replica,
        "PUT",
        &format!("/admin/tenants/{LATER}"),
        json!({"upstreams": [{"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]}),
    )
    .await
}

/// Polls `check` every 20 ms; fails the test when it does not hold within `within`.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `/Patient/1` with `token` from each replica until `stop`; counts the answers that
/// are not 200 (and the first few of them, to show).
fn load(
    replicas: Vec<TestClient>,
    token: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, f) = (Arc::clone(&served), Arc::clone(&failed));
    let task = tokio::spawn(async move {
        let mut shown = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for replica in &replicas {
                let reply = replica.get_bearer("/Patient/1", &token).await;
                if reply.status == StatusCode::OK {
                    s.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                    if shown.len() < 5 {
                        shown.push(format!("{}: {}", reply.status, reply.text()));
                    }
                }
            }
        }
        shown
    });
    (served, failed, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_share_one_database() {
    let dir = scratch("replicas");
    let Some(server) =
        Postgres::start_or_skip("gateways", "three_gateway_processes_share_one_database")
    else {
        return;
    };
    server.create_database("gateway");
    let url = server.url("gateway");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let file = config_file(&dir, "gateway.json", &upstream, &url);
    // The second and third replicas' file names a database that is not there: the
    // environment's `TOWER_FHIR_DATABASE_URL` wins over it.
    let elsewhere = config_file(
        &dir,
        "elsewhere.json",
        &upstream,
        "postgres://gateway@127.0.0.1:1/nothing",
    );

    // Without the key-encryption key, a gateway with a database refuses to start.
    let refused = Command::new(GATEWAY)
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env_remove("TOWER_FHIR_KEY_ENCRYPTION_KEY")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("TOWER_FHIR_KEY_ENCRYPTION_KEY"), "{said}");

    // Three replicas, started together, seeded from the same configuration.
    let (one, two, three) = std::thread::scope(|scope| {
        let started: Vec<_> = (1..=3)
            .map(|n| {
                let (dir, file, elsewhere, url) = (&dir, &file, &elsewhere, &url);
                scope.spawn(move || match n {
                    1 => start(dir, file, n, None),
                    _ => start(dir, elsewhere, n, Some(url)),
                })
            })
            .collect();
        let mut started = started.into_iter().map(|t| t.join().unwrap());
        (
            started.next().unwrap(),
            started.next().unwrap(),
            started.next().unwrap(),
        )
    });
    let mut one = one;
    let replicas = [&one, &two, &three];
    for replica in replicas {
        within(Duration::from_secs(10), "ready", async || {
            replica.client.get("/readyz", &[]).await.status == StatusCode::OK
        })
        .await;
    }
    // The replicas that found the schema made say nothing of it (PostgreSQL's `NOTICE`s).
    for n in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("replica{n}.log"))).unwrap();
        assert!(!log.contains("NOTICE"), "replica {n}: {log}");
    }

    // A replica whose configuration adds a tenant whose base lies under one the directory
    // holds refuses to start, and writes nothing: the running replicas would serve both.
    let nesting = dir.join("nesting.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    config["tenants"].as_array_mut().unwrap().push(json!({
        "id": NESTED,
        "upstreams": [{"base_url": upstream.base("/fhir/inner"), "fhir_version": "4.0"}]
    }));
    std::fs::write(&nesting, serde_json::to_vec(&config).unwrap()).unwrap();
    let refused = Command::new(GATEWAY)
        .arg("--config")
        .arg(&nesting)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("TOWER_FHIR_KEY_ENCRYPTION_KEY", KEK)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("lies under"), "{said}");
    let held = admin(
        &one,
        "GET",
        &format!("/admin/tenants/{NESTED}"),
        json!(null),
    )
    .await;
    assert_eq!(held.status, StatusCode::NOT_FOUND, "{}", held.text());

    // A replica given another key-encryption key refuses to start before it writes anything
    // (a configured tenant's credential sealed with its key would be unreadable to the
    // others, and stop their tenant writes and starts).
    let sealing = dir.join("sealing.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    config["tenants"].as_array_mut().unwrap().push(json!({
        "id": SEALED,
        "upstreams": [{
            "base_url": upstream.base("/sealed"),
            "fhir_version": "4.0",
            "authorization": "Bearer sealed-credential"
        }]
    }));
    std::fs::write(&sealing, serde_json::to_vec(&config).unwrap()).unwrap();
    let refused = Command::new(GATEWAY)
        .arg("--config")
        .arg(&sealing)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env(
            "TOWER_FHIR_KEY_ENCRYPTION_KEY",
            "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=",
        )
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("signing key"), "{said}");
    let held = admin(
        &one,
        "GET",
        &format!("/admin/tenants/{SEALED}"),
        json!(null),
    )
    .await;
    assert_eq!(held.status, StatusCode::NOT_FOUND, "{}", held.text());

    // One JWKS; a token from replica 1 is accepted by 2 and 3.
    let jwks = one.client.get("/.well-known/jwks.json", &[]).await.json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    for replica in [&two, &three] {
        assert_eq!(
            replica
                .client
                .get("/.well-known/jwks.json", &[])
                .await
                .json(),
            jwks
        );
    }
    let first = token(&one, TENANT).await;
    for replica in replicas {
        assert_eq!(
            replica.client.get_bearer("/Patient/1", &first).await.status,
            StatusCode::OK
        );
    }

    // A tenant onboarded through replica 2 is routed by replica 3 within a second; removed,
    // refused within a second.
    let later = token(&one, LATER).await;
    assert_ne!(
        three.client.get_bearer("/Patient/1", &later).await.status,
        StatusCode::OK
    );
    let reply = onboard(&two, &upstream).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    within(
        Duration::from_secs(1),
        "the new tenant routed",
        async || three.client.get_bearer("/Patient/1", &later).await.status == StatusCode::OK,
    )
    .await;
    let reply = admin(
        &two,
        "DELETE",
        &format!("/admin/tenants/{LATER}"),
        json!({}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    within(
        Duration::from_secs(1),
        "the removed tenant refused",
        async || three.client.get_bearer("/Patient/1", &later).await.status != StatusCode::OK,
    )
    .await;

    // A secret reset through replica 1: replica 3 refuses the old one at once, and the token
    // taken with it as soon as it hears of the reset; it gives a token for the new one once
    // the second of the reset is over (before, one would be refused with the old ones).
    let reply = token_request(&three, "leaving", SECRET, TENANT).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let held = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        three.client.get_bearer("/Patient/1", &held).await.status,
        StatusCode::OK
    );
    let reply = admin(&one, "POST", "/admin/clients/leaving/secret", json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let rotated = reply.json()["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(
        token_request(&three, "leaving", SECRET, TENANT)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    within(
        Duration::from_secs(1),
        "the token taken with the old secret refused",
        async || {
            three.client.get_bearer("/Patient/1", &held).await.status == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    let reply =
        after_cut_off(async || token_request(&three, "leaving", &rotated, TENANT).await).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let fresh = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        three.client.get_bearer("/Patient/1", &fresh).await.status,
        StatusCode::OK
    );
    // Revoked through replica 2: no replica issues it a token.
    let reply = admin(&two, "DELETE", "/admin/clients/leaving", json!({})).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    for replica in replicas {
        assert_eq!(
            token_request(replica, "leaving", &rotated, TENANT)
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
    }

    // Five wrong secrets spread over the three (none sees more than two) block the id
    // everywhere, the right secret included.
    for n in 0..5 {
        let reply = token_request(replicas[n % 3], "guessed", "wrong-guess", TENANT).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    }
    for replica in replicas {
        let reply = token_request(replica, "guessed", SECRET, TENANT).await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.text()
        );
    }

    // A signing key rotated through replica 2: every replica publishes it within a second, none
    // signs with it before its second is up, then all do; tokens of the old key stay good.
    let before = admin(&one, "GET", "/admin/signing-keys", json!({}))
        .await
        .json();
    let old_kid = before["current"].as_str().unwrap().to_owned();
    // Taken before asking: the replica reads its clock for the switch later than this.
    let rotated_at = Instant::now();
    let reply = admin(
        &two,
        "POST",
        "/admin/signing-keys",
        json!({"publish_seconds": 2}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let new_kid = reply.json()["kid"].as_str().unwrap().to_owned();
    for replica in replicas {
        within(
            Duration::from_secs(1),
            "the new key published",
            async || {
                let jwks = replica
                    .client
                    .get("/.well-known/jwks.json", &[])
                    .await
                    .json();
                jwks["keys"].as_array().unwrap().len() == 2
            },
        )
        .await;
        let token = token(replica, TENANT).await;
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        if rotated_at.elapsed() < Duration::from_secs(2) {
            assert_eq!(kid, old_kid, "signed with the new key before its time");
        }
    }
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(rotated_at.elapsed())).await;
    for replica in replicas {
        within(
            Duration::from_secs(1),
            "signing with the new key",
            async || {
                let token = token(replica, TENANT).await;
                jsonwebtoken::decode_header(&token).unwrap().kid.unwrap() == new_kid
            },
        )
        .await;
        assert_eq!(
            replica.client.get_bearer("/Patient/1", &first).await.status,
            StatusCode::OK
        );
    }
    let reply = admin(
        &three,
        "DELETE",
        &format!("/admin/signing-keys/{new_kid}"),
        json!({}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    let fresh = token(&three, TENANT).await;

    // Replica 1 killed while load runs on 2 and 3: they answer every request.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, failed, task) = load(
        vec![two.client.clone(), three.client.clone()],
        fresh.clone(),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    one.proc.child.kill().unwrap();
    one.proc.child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let shown = task.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 20);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{shown:?}");

    // The database stopped under load: cached tenants are still served, token requests and
    // admin changes get 503 with Retry-After, readiness says the database is missing.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, failed, task) = load(
        vec![two.client.clone(), three.client.clone()],
        fresh.clone(),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.pause();
    let reply = token_request(&two, "app", SECRET, TENANT).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(reply.headers.contains_key("retry-after"));
    let reply = onboard(&three, &upstream).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(reply.headers.contains_key("retry-after"));
    within(
        Duration::from_secs(5),
        "not ready without the database",
        async || {
            let reply = three.client.get("/readyz", &[]).await;
            // The database's pings fail, and the connections its listeners held are gone.
            reply.status == StatusCode::SERVICE_UNAVAILABLE
                && reply.json()["waiting_for"]
                    == json!([
                        "database",
                        "database change listener",
                        "database revocation listener"
                    ])
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The log says why (the server's or the connection's own words, not only "db error").
    let log = std::fs::read_to_string(dir.join("replica3.log")).unwrap();
    let down = log
        .lines()
        .find(|line| line.contains("the database does not answer"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(down.to_lowercase().contains("connect"), "{down}");

    // Started again: everything recovers by itself.
    server.resume();
    for replica in [&two, &three] {
        within(Duration::from_secs(10), "ready again", async || {
            replica.client.get("/readyz", &[]).await.status == StatusCode::OK
        })
        .await;
        within(Duration::from_secs(10), "tokens again", async || {
            token_request(replica, "app", SECRET, TENANT).await.status == StatusCode::OK
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let shown = task.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 20);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{shown:?}");
    // And changes made through one replica reach the other again.
    let reply = onboard(&three, &upstream).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    within(
        Duration::from_secs(1),
        "a tenant onboarded after the outage",
        async || two.client.get_bearer("/Patient/1", &later).await.status == StatusCode::OK,
    )
    .await;
    drop(server);
}

/// `revocation_max_staleness_seconds`: a replica whose database connections stop answering (a
/// partition: the others still reach the database) takes tokens for at most that long after
/// it last heard the database, so a token revoked through another replica meanwhile is
/// refused (`503`, then `401` once it hears again), never taken past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_replica_refuses_tokens_past_revocation_max_staleness_seconds() {
    const STALENESS: u64 = 5;
    let dir = scratch("staleness");
    let Some(server) = Postgres::start_or_skip(
        "staleness",
        "a_cut_off_replica_refuses_tokens_past_revocation_max_staleness_seconds",
    ) else {
        return;
    };
    server.create_database("staleness");
    let proxy = support::postgres::FreezingProxy::start(server.port()).await;
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let direct = config_file(&dir, "direct.json", &upstream, &server.url("staleness"));
    let through = config_file(&dir, "through.json", &upstream, &proxy.url("staleness"));
    let mut config: Value = serde_json::from_slice(&std::fs::read(&through).unwrap()).unwrap();
    config["revocation_max_staleness_seconds"] = json!(STALENESS);
    std::fs::write(&through, config.to_string()).unwrap();
    let (cut_off, other) = (
        start(&dir, &through, 1, None),
        start(&dir, &direct, 2, None),
    );
    let token = token(&other, TENANT).await;

    // While it hears the database, the limit never refuses a token (the listener shows it
    // hears more often than that).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(STALENESS + 2) {
        let reply = cut_off.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Cut off; the token is revoked through the other replica.
    proxy.freeze(true);
    let reply = other.client.revoke(&token, "app", SECRET).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let revoked = Instant::now();
    within(
        Duration::from_secs(STALENESS + 5),
        "the cut-off replica refuses tokens",
        async || {
            // (Taken only if checked before the limit: the request was sent before it.)
            let sent = revoked.elapsed();
            let reply = cut_off.client.get_bearer("/Patient/1", &token).await;
            if reply.status == StatusCode::OK {
                assert!(
                    sent < Duration::from_secs(STALENESS),
                    "a revoked token taken in a request sent {sent:?} after its revocation"
                );
                return false;
            }
            assert_eq!(
                reply.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{}",
                reply.text()
            );
            assert_eq!(reply.headers["retry-after"], "5");
            assert_eq!(reply.json()["issue"][0]["code"], "transient");
            assert!(reply.text().contains("revoked"), "{}", reply.text());
            true
        },
    )
    .await;
    // What needs no token is served on; `/readyz` says why tokens are not.
    let reply = cut_off.client.get("/metadata", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = cut_off.client.get("/healthz", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = cut_off.client.get("/readyz", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.json()["waiting_for"]
            .as_array()
            .unwrap()
            .contains(&json!("revoked tokens current")),
        "{}",
        reply.text()
    );

    // Heard again: the revoked token is refused as revoked, a new one taken.
    proxy.freeze(false);
    within(
        Duration::from_secs(30),
        "the replica hears the database again",
        async || {
            let reply = cut_off.client.get_bearer("/Patient/1", &token).await;
            assert_ne!(reply.status, StatusCode::OK, "a revoked token taken");
            reply.status == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    let fresh = self::token(&other, TENANT).await;
    let reply = cut_off.client.get_bearer("/Patient/1", &fresh).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let log = cut_off.proc.stderr();
    assert!(!log.contains(&token), "the token reached the log");
}

/// The key-encryption key changes while replicas serve, as the README's three steps say: a
/// replica given the old key with the new one next opens what a replica given the new key
/// with the old one previous seals (a tenant onboarded through it), and that replica's start
/// seals the signing keys and the stored credentials again with the new key; then the new key
/// alone serves every tenant and the tokens issued before, and the old key alone cannot start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_encryption_key_changes_replica_by_replica() {
    const KEY: &str = "TOWER_FHIR_KEY_ENCRYPTION_KEY";
    const NEW: &str = "bmV3LXJlcGxpY2Etc2hhcmVkLTMyLWJ5dGUta2V5ISE=";
    let dir = scratch("replicas-rekey");
    let Some(server) = Postgres::start_or_skip("rekey", "the key change across replicas") else {
        return;
    };
    server.create_database("gateway");
    let url = server.url("gateway");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let file = config_file(&dir, "gateway.json", &upstream, &url);
    let put = |tenant: &'static str, credential: &'static str| {
        json!({"upstreams": [{
            "base_url": upstream.base(&format!("/{tenant}")),
            "fhir_version": "4.0",
            "authorization": credential
        }]})
        .to_string()
    };
    // A read through `replica` for `tenant` reaches its upstream with `credential`.
    let reaches = async |replica: &Replica, tenant: &str, token: &str, credential: &str| {
        let read = replica.client.get_bearer("/Patient/1", token).await;
        assert_eq!(read.status, StatusCode::OK, "{tenant}: {}", read.text());
        let received = upstream.last();
        assert!(
            received.target.starts_with(&format!("/{tenant}/")),
            "{}",
            received.target
        );
        assert_eq!(received.headers.get("authorization").unwrap(), credential);
    };
    let sealed_rows = || {
        server.query(
            "gateway",
            "SELECT (SELECT string_agg(record::text, ',' ORDER BY id) FROM tower_fhir_tenants) \
             || (SELECT string_agg(encode(sealed, 'base64'), ',' ORDER BY kid) FROM tower_fhir_signing_keys)",
        )
    };

    // Before: the old key. TENANT gets a credential.
    let mut before = start(&dir, &file, 1, None);
    let changed = admin(
        &before,
        "PUT",
        &format!("/admin/tenants/{TENANT}"),
        serde_json::from_str(&put(TENANT, "Bearer tenant-credential")).unwrap(),
    )
    .await;
    assert!(changed.status.is_success(), "{}", changed.text());
    let issued = token(&before, TENANT).await;
    reaches(&before, TENANT, &issued, "Bearer tenant-credential").await;

    // Step 1: the old key, the new one next. Writes nothing anew.
    let by_old = sealed_rows();
    let mut waiting = start_with(
        &dir,
        &file,
        2,
        None,
        &[(KEY, KEK), ("TOWER_FHIR_NEXT_KEY_ENCRYPTION_KEY", NEW)],
    );
    assert!(before.proc.terminate());
    let log = std::fs::read_to_string(dir.join("replica2.log")).unwrap();
    assert!(
        log.contains("the key-encryption key is about to change"),
        "{log}"
    );
    reaches(&waiting, TENANT, &issued, "Bearer tenant-credential").await;
    assert_eq!(sealed_rows(), by_old, "step 1 wrote");

    // Step 2: the new key, the old one previous: sealed again at its start.
    let step_two = |n| {
        start_with(
            &dir,
            &file,
            n,
            None,
            &[(KEY, NEW), ("TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY", KEK)],
        )
    };
    // Replica `n`'s log says each of `lines`.
    let says = |n: usize, lines: &[&str]| {
        let log = std::fs::read_to_string(dir.join(format!("replica{n}.log"))).unwrap();
        for said in lines {
            assert!(log.contains(said), "{said}: {log}");
        }
    };
    let mut changing = step_two(3);
    says(
        3,
        &[
            "signing keys sealed with the previous key-encryption key sealed again",
            "the key-encryption key changes: TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY is set",
            "upstream credentials sealed with TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY sealed again",
        ],
    );
    assert_ne!(sealed_rows(), by_old);
    // LATER onboarded through the step-2 replica (sealed with the new key): the step-1
    // replica opens it.
    let onboarded = admin(
        &changing,
        "PUT",
        &format!("/admin/tenants/{LATER}"),
        serde_json::from_str(&put(LATER, "Bearer later-credential")).unwrap(),
    )
    .await;
    assert!(onboarded.status.is_success(), "{}", onboarded.text());
    let for_later = token(&changing, LATER).await;
    within(
        Duration::from_secs(10),
        "the step-1 replica serves LATER",
        async || {
            waiting
                .client
                .get_bearer("/Patient/1", &for_later)
                .await
                .status
                == StatusCode::OK
        },
    )
    .await;
    reaches(&waiting, LATER, &for_later, "Bearer later-credential").await;
    reaches(&changing, TENANT, &issued, "Bearer tenant-credential").await;
    assert!(waiting.proc.terminate());
    assert!(changing.proc.terminate());
    // A step-2 replica started once the others are: nothing left for the previous key.
    let mut last = step_two(5);
    says(
        5,
        &[
            "no signing key sealed with the previous key-encryption key is left",
            "no upstream credential sealed with TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY is left",
        ],
    );
    assert!(last.proc.terminate());

    // Step 3: the new key alone serves both tenants and the token issued at the start; the
    // old key alone cannot open the signing keys.
    let mut after = start_with(&dir, &file, 4, None, &[(KEY, NEW)]);
    reaches(&after, TENANT, &issued, "Bearer tenant-credential").await;
    reaches(&after, LATER, &for_later, "Bearer later-credential").await;
    assert!(after.proc.terminate());
    let refused = Command::new(GATEWAY)
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env(KEY, KEK)
        .env_remove("TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY")
        .env_remove("TOWER_FHIR_NEXT_KEY_ENCRYPTION_KEY")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("cannot be opened with this key-encryption key"),
        "{said}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
