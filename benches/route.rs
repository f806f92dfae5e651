//! Tenant scope and routing with a warm cache, against the bare inner service.
//!
//! `cargo bench --bench route`. One group: `bare_service` (building the request and calling
//! the inner service), `tenant_scope` (the tenant layer alone), `routing_warm` (the routing
//! layer alone, the `TenantId` already in the extensions, the route cached), and
//! `tenant_and_routing_warm` (both). The figure that matters is the difference to
//! `bare_service`.

use std::convert::Infallible;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use serde_json::json;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_fhir::auth::VerifiedClaims;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantRoutingLayer, Upstream};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

async fn ok(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::default()))
}

fn request_with_tenant(tenant: TenantId) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .uri("/Observation?patient=123&category=vital-signs&_sort:desc=date")
        .header("accept", "application/fhir+json")
        .body(Full::default())
        .unwrap();
    request.extensions_mut().insert(tenant);
    request
}

fn request(claims: &VerifiedClaims) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .uri("/Observation?patient=123&category=vital-signs&_sort:desc=date")
        .header("accept", "application/fhir+json")
        .body(Full::default())
        .unwrap();
    request.extensions_mut().insert(claims.clone());
    request
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tenant: TenantId = TENANT.parse().unwrap();
    let directory = InMemoryDirectory::new();
    let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
    directory.upsert(tenant, TenantRecord::new([upstream]).unwrap());
    let claims = json!({"exp": 4_000_000_000u64, "scope": format!("system/*.read {TENANT}")});
    let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();

    let bare = tower::service_fn(ok);
    let tenant_only = ServiceBuilder::new()
        .layer(TenantScopeLayer::builder().build().unwrap())
        .service_fn(ok);
    let routing = TenantRoutingLayer::builder(directory).build().unwrap();
    let routing_only = ServiceBuilder::new().layer(routing.clone()).service_fn(ok);
    let routed = ServiceBuilder::new()
        .layer(TenantScopeLayer::builder().build().unwrap())
        .layer(routing)
        .service_fn(ok);
    // Warm the route cache.
    runtime.block_on(async {
        let response = routed.clone().oneshot(request(&claims)).await.unwrap();
        assert_eq!(response.status(), 200);
    });

    let mut group = c.benchmark_group("route");
    group.bench_function("bare_service", |b| {
        let mut service = bare;
        b.to_async(&runtime).iter(|| service.call(request(&claims)))
    });
    group.bench_function("tenant_scope", |b| {
        let mut service = tenant_only.clone();
        b.to_async(&runtime).iter(|| service.call(request(&claims)))
    });
    group.bench_function("routing_warm", |b| {
        let mut service = routing_only.clone();
        b.to_async(&runtime)
            .iter(|| service.call(request_with_tenant(tenant)))
    });
    group.bench_function("tenant_and_routing_warm", |b| {
        let mut service = routed.clone();
        b.to_async(&runtime).iter(|| service.call(request(&claims)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
