//! The state stores a cache miss reaches: a cold route lookup and a token issuance, with the
//! file stores (one process) and with PostgreSQL (many replicas), on a real PostgreSQL server
//! started for the bench (as the tests start theirs; PostgreSQL's tools must be installed).
//!
//! `cargo bench --bench stores`. Two groups:
//! - `cold_route_lookup`: `TenantDirectory::lookup` of one tenant among 1,000, what the route
//!   cache pays on a miss: `file` (`FileDirectory`, held in memory and kept in its file) and
//!   `postgres` (`PgTenantStore`: a pooled connection, one indexed `SELECT`, the JSON record
//!   parsed);
//! - `token_issue`: a whole `client_secret_post` request through `TokenEndpoint` (default
//!   Argon2id cost) with the `file` client store, and with `postgres` as the gateway binary
//!   runs it (the client read twice, the shared failure counts read, keys from the database).
//!
//! A request with a cached token and a cached route reaches neither: these are the costs of
//! the first request of a tenant or of a token.

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code, unreachable_pub)]
mod postgres;
#[path = "../tests/support/process.rs"]
#[allow(dead_code, unreachable_pub)]
mod process;

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, StatusCode};
use http_body_util::Full;
use tower::ServiceExt;
use tower_fhir::postgres::{KeyEncryptionKey, PgState};
use tower_fhir::route::{FileDirectory, TenantDirectory, TenantRecord, TenantStore, Upstream};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    ClientStore, FileClientStore, NewClient, SecretHashing, SigningKeys, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

fn tenants() -> Vec<(TenantId, TenantRecord)> {
    (0..1000u32)
        .map(|n| {
            let id = if n == 0 {
                TenantId::parse(TENANT).unwrap()
            } else {
                TenantId::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).unwrap()
            };
            let upstream = Upstream::parse(
                &format!("http://hospital-{n}.example/fhir"),
                FhirVersion::R4,
            )
            .unwrap();
            (id, TenantRecord::new([upstream]).unwrap())
        })
        .collect()
}

fn endpoint(store: impl ClientStore, keys: SigningKeys) -> TokenEndpoint {
    TokenEndpoint::builder()
        .issuer("https://gateway.bench")
        .audience("fhir")
        .store(store)
        .signing_keys(keys)
        .build()
        .unwrap()
}

fn issue(runtime: &tokio::runtime::Runtime, endpoint: &TokenEndpoint, form: &Bytes) {
    let request = Request::post("/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(form.clone()))
        .unwrap();
    let response = runtime.block_on(endpoint.clone().oneshot(request)).unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

fn stores(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = postgres::Postgres::start("bench");
    server.create_database("bench");
    let dir = std::env::temp_dir().join(format!("tower-fhir-bench-stores-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let (file_directory, pg, pg_directory) = runtime.block_on(async {
        let file = FileDirectory::open(dir.join("tenants.json")).unwrap();
        file.put_all(tenants()).await.unwrap();
        let pg = PgState::connect(&server.url("bench")).await.unwrap();
        let directory = pg.tenant_store();
        directory.put_all(tenants()).await.unwrap();
        (file, pg, directory)
    });
    let tenant = TenantId::parse(TENANT).unwrap();
    let mut group = c.benchmark_group("cold_route_lookup");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("file", |b| {
        b.to_async(&runtime)
            .iter(|| async { file_directory.lookup(tenant).await.unwrap().unwrap() })
    });
    group.bench_function("postgres", |b| {
        b.to_async(&runtime)
            .iter(|| async { pg_directory.lookup(tenant).await.unwrap().unwrap() })
    });
    group.finish();

    let (file_endpoint, pg_endpoint, form) = runtime.block_on(async {
        let file = FileClientStore::open(dir.join("clients.json")).unwrap();
        let secret = file
            .register(NewClient::new("bench").tenant(tenant))
            .await
            .unwrap();
        let file_endpoint = endpoint(file, SigningKeys::generate().unwrap());
        let clients = pg.client_store(SecretHashing::default());
        clients
            .register(
                NewClient::new("bench")
                    .tenant(tenant)
                    .secret(secret.expose()),
            )
            .await
            .unwrap();
        let kek =
            KeyEncryptionKey::from_base64("YmVuY2gtb25seS1rZXktZW5jcnlwdGlvbi1rZXktMzI=").unwrap();
        let keys = pg.signing_keys(kek).await.unwrap();
        let pg_endpoint = TokenEndpoint::builder()
            .issuer("https://gateway.bench")
            .audience("fhir")
            .store(clients)
            .signing_keys(keys.signing_keys())
            .revocation_log(pg.revocation_log())
            .assertion_replay_guard(pg.assertion_replay_guard())
            .shared_failure_counts(pg.failure_counts())
            .build()
            .unwrap();
        let form = Bytes::from(format!(
            "grant_type=client_credentials&client_id=bench&client_secret={}&scope={TENANT}",
            secret.expose()
        ));
        (file_endpoint, pg_endpoint, form)
    });
    let mut group = c.benchmark_group("token_issue");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("file", |b| {
        b.iter(|| issue(&runtime, &file_endpoint, &form))
    });
    group.bench_function("postgres", |b| {
        b.iter(|| issue(&runtime, &pg_endpoint, &form))
    });
    group.finish();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, stores);
criterion_main!(benches);
