//! Version negotiation against the bare inner service.
//!
//! `cargo bench --bench version`. One group: `bare_service` (building the request and calling
//! the inner service) and the layer for a HAPI-style `Accept` without a version, and for one
//! naming `fhirVersion`. The figure that matters is the difference to `bare_service`.

use std::convert::Infallible;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_fhir::version::VersionNegotiationLayer;

const HAPI_STU3: &str = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0, application/xml+fhir;q=0.9, application/json+fhir;q=0.9";
const NAMED: &str = "application/fhir+json; fhirVersion=3.0";

async fn ok(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/fhir+json")
        .body(Full::default())
        .unwrap())
}

fn request(accept: &str) -> Request<Full<Bytes>> {
    Request::get("/Observation?patient=123&category=vital-signs&_sort:desc=date")
        .header("accept", accept)
        .body(Full::default())
        .unwrap()
}

fn call<S>(service: &mut S, request: Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>, Error = Infallible>,
{
    // Everything here answers without waiting.
    service.call(request).now_or_never().unwrap().unwrap()
}

fn bench(c: &mut Criterion) {
    let mut bare = tower::service_fn(ok);
    let mut negotiated = VersionNegotiationLayer::builder()
        .build()
        .unwrap()
        .layer(tower::service_fn(ok));
    let mut group = c.benchmark_group("version");
    group.bench_function("bare_service", |b| {
        b.iter(|| call(&mut bare, request(HAPI_STU3)))
    });
    group.bench_function("layer_hapi_accept", |b| {
        b.iter(|| call(&mut negotiated, request(HAPI_STU3)))
    });
    group.bench_function("layer_named_version", |b| {
        b.iter(|| call(&mut negotiated, request(NAMED)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
