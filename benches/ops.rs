//! What the operations layers cost per request: the warm in-process stack with and without
//! them, in one group so the figures are ratios measured in the same run.
//!
//! `cargo bench --bench ops` (add `-- --warm-up-time 1 --measurement-time 3` for a quick run).
//! The request, token and stack are the stack bench's `full/HS256/warm` (version negotiation,
//! bearer auth from the token cache, tenant scope, routing from the cache, over a bare
//! `service_fn`), with a `tracing` subscriber installed as the gateway binary has one (a log
//! at INFO taking events only, writing to nowhere). Rows, in this order:
//! - `stack`: the stack alone, no metrics recorder;
//! - `stack+ops/quiet`: under `RequestIdLayer`, `HealthLayer`, `ObserveLayer` (span only:
//!   metrics and audit off), `BodyTimeoutLayer` and `BodyLimitLayer`, as in the gateway binary;
//! - `stack/recorder`: the stack alone once a Prometheus recorder is installed (the library's
//!   cache counters now count);
//! - `stack+ops/metrics+audit`: everything on: metrics into the Prometheus recorder, and an
//!   audit record per request to a `JsonLinesAudit` writing to `io::sink()`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::ops::{
    BodyLimitLayer, BodyTimeoutLayer, HealthLayer, JsonLinesAudit, ObserveLayer, RequestIdLayer,
};
use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantRoutingLayer, Upstream};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};
use tower_fhir::ServiceBuilderExt;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const SECRET: &[u8] = b"a-shared-secret-of-at-least-32-bytes!!";

async fn ok<B>(_request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/fhir+json")
        .body(Full::default())
        .unwrap())
}

fn request(authorization: &str) -> Request<Full<Bytes>> {
    Request::get("/Observation?patient=123&category=vital-signs&_sort:desc=date")
        .header("accept", "application/fhir+json; fhirVersion=3.0")
        .header("authorization", authorization)
        .header("x-request-id", "bench-request-0001")
        .body(Full::default())
        .unwrap()
}

fn bearer() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": "https://auth.test", "aud": "tower-fhir", "sub": "app-1",
        "iat": now, "exp": now + 3600, "scope": format!("system/*.read {TENANT}")});
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k".into());
    format!(
        "Bearer {}",
        encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    )
}

fn bench(c: &mut Criterion) {
    tower_fhir::install_crypto_provider();
    {
        use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter};
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let events = LevelFilter::INFO.and(filter_fn(|metadata| metadata.is_event()));
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(events),
            )
            .init();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let directory = InMemoryDirectory::new();
    let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
    directory.upsert(
        TENANT.parse::<TenantId>().unwrap(),
        TenantRecord::new([upstream]).unwrap(),
    );
    let routing = TenantRoutingLayer::builder(directory).build().unwrap();
    let auth = BearerAuthLayer::builder()
        .key(VerificationKey::hmac(SECRET).unwrap().with_kid("k"))
        .issuer("https://auth.test")
        .audience("tower-fhir")
        .build()
        .unwrap();
    let versions = VersionNegotiationLayer::builder().build().unwrap();
    let scope = TenantScopeLayer::builder().build().unwrap();
    // A macro, not a closure: each use infers its own request body type.
    macro_rules! stack {
        () => {
            ServiceBuilder::new()
                .fhir_versions(versions.clone())
                .fhir_bearer_auth(auth.clone())
                .fhir_tenant_scope(scope.clone())
                .fhir_tenant_routing(routing.clone())
                .service_fn(ok)
        };
    }
    let token = bearer();
    macro_rules! ops {
        ($observe:expr) => {
            ServiceBuilder::new()
                .layer(RequestIdLayer::new())
                .layer(HealthLayer::new().readiness("keys", || true))
                .layer($observe)
                .layer(BodyTimeoutLayer::default())
                .layer(BodyLimitLayer::default())
                .service(stack!())
        };
    }

    let mut group = c.benchmark_group("ops");
    macro_rules! row {
        ($name:expr, $service:expr) => {{
            let mut service = $service;
            runtime.block_on(async {
                let response = service
                    .ready()
                    .await
                    .unwrap()
                    .call(request(&token))
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            });
            group.bench_function($name, |b| {
                b.to_async(&runtime).iter(|| service.call(request(&token)))
            });
        }};
    }
    row!("stack", stack!());
    row!("stack+ops/quiet", ops!(ObserveLayer::new()));
    // The gateway binary's recorder: every metric counted per thread, histograms as buckets,
    // counters and gauges given to the exporter when rendered.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let histograms =
        tower_fhir::ops::BucketHistograms::new(&tower_fhir::ops::DURATION_BUCKETS).unwrap();
    metrics::set_global_recorder(histograms.over(prometheus)).unwrap();
    row!("stack/recorder", stack!());
    row!(
        "stack+ops/metrics+audit",
        ops!(ObserveLayer::new()
            .metrics(true)
            .audit(JsonLinesAudit::writer(std::io::sink(), 65_536)))
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
