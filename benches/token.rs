//! Token issuance: the endpoint called in-process with a valid request, against signing alone.
//!
//! `cargo bench --bench token`. One group, `token_es256`:
//! - `sign_only`: `SigningKeys::sign` of the same claims (the baseline);
//! - `endpoint_issue`: a full `client_secret_post` request through `TokenEndpoint`: form
//!   parsing, the Argon2id secret check (default `SecretHashing`: 4 MiB, 2 passes, 1 lane),
//!   scope resolution, signing and the JSON response. Requests run one at a time, so this is
//!   one core's worth of work (the hash runs on tokio's blocking pool while the caller waits).

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tower::ServiceExt;
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, SigningKeys, TokenEndpoint};

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

fn issuance(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = InMemoryClientStore::new();
    let tenant = TenantId::parse(TENANT).unwrap();
    let secret = runtime
        .block_on(store.register(NewClient::new("bench").tenant(tenant)))
        .unwrap();
    let keys = SigningKeys::generate().unwrap();
    let endpoint = TokenEndpoint::builder()
        .issuer("https://gateway.bench")
        .audience("fhir")
        .store(store)
        .signing_keys(keys.clone())
        .build()
        .unwrap();
    let form = Bytes::from(format!(
        "grant_type=client_credentials&client_id=bench&client_secret={}&scope={TENANT}",
        secret.expose()
    ));

    let mut group = c.benchmark_group("token_es256");
    group.measurement_time(Duration::from_secs(5));
    let claims = json!({"iss": "https://gateway.bench", "sub": "bench", "aud": "fhir",
        "iat": 1, "nbf": 1, "exp": 4_000_000_000u64, "jti": "x", "scope": TENANT});
    group.bench_function("sign_only", |b| b.iter(|| keys.sign(&claims).unwrap()));
    group.bench_function("endpoint_issue", |b| {
        b.to_async(&runtime).iter(|| {
            let request = Request::post("/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(form.clone()))
                .unwrap();
            let endpoint = endpoint.clone();
            async move {
                let response = endpoint.oneshot(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                response
            }
        })
    });
    group.finish();
}

criterion_group!(benches, issuance);
criterion_main!(benches);
