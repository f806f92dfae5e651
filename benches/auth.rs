//! Bearer validation cost, as ratios against raw `jsonwebtoken::decode` and the bare service.
//!
//! `cargo bench --bench auth`. Per algorithm, one group with:
//! - `raw_decode`: `jsonwebtoken::decode` with the same key and validation (the baseline for
//!   the layer without cache);
//! - `bare_service`: building the request and calling the inner service, no layer (the baseline
//!   for the warm cache);
//! - `layer_no_cache`: the layer verifying every request;
//! - `layer_warm_cache`: the layer answering from its verified-token cache.

mod common;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::cases;
use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use jsonwebtoken::{encode, Header, Validation};
use serde_json::{json, Map, Value};
use tower::{Layer, Service};
use tower_fhir::auth::BearerAuthLayer;

fn request(authorization: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("/Patient/123")
        .header("authorization", authorization)
        .body(Full::default())
        .unwrap()
}

async fn ok(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::default()))
}

fn call<S>(service: &mut S, request: Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>, Error = Infallible>,
{
    // Every service here is always ready and answers without waiting.
    service.call(request).now_or_never().unwrap().unwrap()
}

fn bench(c: &mut Criterion) {
    tower_fhir::install_crypto_provider();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": "https://auth.test", "aud": "tower-fhir", "sub": "app-1",
        "iat": now, "exp": now + 3600, "scope": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"});
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();

    for case in cases() {
        let mut header = Header::new(case.alg);
        header.kid = Some("k".into());
        let token = encode(&header, &claims, &case.encoding).unwrap();
        let authorization = format!("Bearer {token}");
        let mut validation = Validation::new(case.alg);
        validation.set_issuer(&["https://auth.test"]);
        validation.set_audience(&["tower-fhir"]);
        validation.validate_nbf = true;

        let layer = |capacity| {
            BearerAuthLayer::builder()
                .key((case.key)())
                .issuer("https://auth.test")
                .audience("tower-fhir")
                .token_cache_capacity(capacity)
                .build()
                .unwrap()
        };
        let mut bare = tower::service_fn(ok);
        let mut no_cache = layer(0).layer(tower::service_fn(ok));
        let mut cached = layer(1000).layer(tower::service_fn(ok));
        assert_eq!(call(&mut no_cache, request(&authorization)).status(), 200);
        assert_eq!(call(&mut cached, request(&authorization)).status(), 200);

        let mut group = c.benchmark_group(format!("auth/{:?}", case.alg));
        group.bench_function("raw_decode", |b| {
            b.iter(|| {
                jsonwebtoken::decode::<Map<String, Value>>(&token, &case.decoding, &validation)
                    .unwrap()
            })
        });
        group.bench_function("bare_service", |b| {
            b.iter(|| call(&mut bare, request(&authorization)))
        });
        group.bench_function("layer_no_cache", |b| {
            b.iter(|| call(&mut no_cache, request(&authorization)))
        });
        group.bench_function("layer_warm_cache", |b| {
            b.iter(|| call(&mut cached, request(&authorization)))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
