//! The whole in-process stack against the bare inner service, in one group so every figure is
//! a ratio to `bare_service` measured in the same run.
//!
//! `cargo bench --bench stack` (add `-- --warm-up-time 1 --measurement-time 3` for a quick
//! run, or a row name to filter). Every request is
//! `GET /Observation?patient=123&category=vital-signs&_sort:desc=date` with
//! `Accept: application/fhir+json; fhirVersion=3.0` and a bearer token; the inner service is a
//! bare `service_fn` answering 200 (no proxy, no network). Rows:
//! - `bare_service`: building the request and calling the inner service, no layer;
//! - `crypto_only/{alg}`: raw `jsonwebtoken::decode` of the same token with the same checks
//!   (no request, no layer), the floor for a stack that verifies every token;
//! - `layer_version`, `layer_auth/{alg}/warm|cold`, `layer_tenant`, `layer_routing`: each
//!   layer alone over the bare service (the tenant layer gets verified claims, the routing
//!   layer a `TenantId`, already in the extensions);
//! - `full/{alg}/warm`: version negotiation, bearer auth, tenant scope and tenant routing
//!   (an `InMemoryDirectory`, route cached) over the bare service, the same token every time,
//!   answered from the verified-token cache;
//! - `full/{alg}/cold`: the same with the token cache turned off (`token_cache_capacity(0)`),
//!   so every request verifies its signature (distinct tokens with the cache on would also pay
//!   for a cache insertion);
//! - `full/HS256/warm/1000_tenants`: 1,000 onboarded tenants, one token each, sent round-robin
//!   (token and route caches warm), against the one-tenant `full/HS256/warm`;
//! - `layer_limits/tenant`, `layer_limits/tenant_and_client`: the rate limit layer alone over
//!   the bare service, the tenant's limit (and the claims, for the client's) in the extensions,
//!   limits too high to refuse;
//! - `full/HS256/warm/limited`: `full/HS256/warm` with the rate limit layer after routing, the
//!   tenant's record carrying a limit and the client having one (cached), against
//!   `full/HS256/warm`;
//! - `layer_routing/in_process`, `full/HS256/warm/in_process`: the same with the tenant served
//!   in-process (an `InProcessTenant` and its release put in the extensions, the response
//!   labelled), against `layer_routing` and `full/HS256/warm`;
//! - `gateway_layer/HS256/warm/in_process`: `GatewayLayer` built with a token endpoint (every
//!   layer: version, metadata, auth, tenant, routing, rate limits, the CapabilityStatement
//!   cache, and the token routes' path check) over the bare service, against
//!   `full/HS256/warm/in_process`;
//! - `full/HS256/warm/read`, `full/HS256/warm/read/smart`: the four-layer stack with a read of
//!   one resource (`GET /Observation/123`), without and with the SMART scope layer after the
//!   tenant scope (the token's `system/*.read` checked, its grants parsed once per token);
//!   `full/HS256/warm/smart`: the search request with the SMART layer, against
//!   `full/HS256/warm`;
//! - `full/HS256/warm/revocable`: `full/HS256/warm` with a revocation list holding another
//!   token (what `Gateway` wires from its token endpoint), against `full/HS256/warm`.

mod common;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{cases, Case};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use jsonwebtoken::{encode, Algorithm, Header, Validation};
use serde_json::{json, Map, Value};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_fhir::auth::{BearerAuthLayer, VerifiedClaims};
use tower_fhir::gateway::Gateway;
use tower_fhir::limit::{RateLimit, RateLimitLayer, TenantRateLimit};
use tower_fhir::route::{
    InMemoryDirectory, InProcessTenant, TenantRecord, TenantRoutingLayer, Upstream,
};
use tower_fhir::smart::{ScopedBody, SmartScopeLayer};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::token::{InMemoryClientStore, TokenEndpoint};
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};
use tower_fhir::ServiceBuilderExt;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const ACCEPT: &str = "application/fhir+json; fhirVersion=3.0";
const TENANTS: u32 = 1_000;

async fn ok(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/fhir+json")
        .body(Full::default())
        .unwrap())
}

/// [`ok`] behind the SMART scope layer, which hands the body on as a `ScopedBody`.
async fn ok_scoped(
    _request: Request<ScopedBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/fhir+json")
        .body(Full::default())
        .unwrap())
}

/// A read of one resource, the same headers as [`request`].
fn read_request(authorization: &str) -> Request<Full<Bytes>> {
    Request::get("/Observation/123")
        .header("accept", ACCEPT)
        .header("authorization", authorization)
        .body(Full::default())
        .unwrap()
}

fn request(authorization: &str) -> Request<Full<Bytes>> {
    Request::get("/Observation?patient=123&category=vital-signs&_sort:desc=date")
        .header("accept", ACCEPT)
        .header("authorization", authorization)
        .body(Full::default())
        .unwrap()
}

/// A request carrying `extension`, as a layer behind another finds it.
fn request_with(
    authorization: &str,
    extension: impl Clone + Send + Sync + 'static,
) -> Request<Full<Bytes>> {
    let mut request = request(authorization);
    request.extensions_mut().insert(extension);
    request
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `Bearer <token>` for `tenant`, signed with the case's key.
fn bearer(case: &Case, tenant: &str) -> String {
    let claims = json!({"iss": "https://auth.test", "aud": "tower-fhir", "sub": "app-1",
        "iat": now(), "exp": now() + 3600, "scope": format!("system/*.read {tenant}")});
    let mut header = Header::new(case.alg);
    header.kid = Some("k".into());
    format!(
        "Bearer {}",
        encode(&header, &claims, &case.encoding).unwrap()
    )
}

fn auth_layer(case: &Case, token_cache_capacity: u64) -> BearerAuthLayer {
    BearerAuthLayer::builder()
        .key((case.key)())
        .issuer("https://auth.test")
        .audience("tower-fhir")
        .token_cache_capacity(token_cache_capacity)
        .build()
        .unwrap()
}

/// The `n`th bench tenant; the first is [`TENANT`].
fn tenant(n: u32) -> TenantId {
    if n == 0 {
        return TENANT.parse().unwrap();
    }
    format!("00000000-0000-4000-8000-{n:012}").parse().unwrap()
}

/// Sends each request once (warming the caches) and checks that it gets through.
fn warm<S, B>(
    runtime: &tokio::runtime::Runtime,
    service: &mut S,
    requests: impl IntoIterator<Item = Request<Full<Bytes>>>,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    runtime.block_on(async {
        for request in requests {
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            assert_eq!(response.status(), 200);
        }
    })
}

fn bench(c: &mut Criterion) {
    tower_fhir::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();

    let directory = InMemoryDirectory::new();
    for n in 0..TENANTS {
        let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
        directory.upsert(tenant(n), TenantRecord::new([upstream]).unwrap());
    }
    let routing = TenantRoutingLayer::builder(directory).build().unwrap();
    // Limits too high to refuse anything: the cost of counting, not of refusing.
    let high = RateLimit::new(1_000_000_000, 1_000_000_000).unwrap();
    let limited_directory = InMemoryDirectory::new();
    let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
    limited_directory.upsert(
        tenant(0),
        TenantRecord::new([upstream])
            .unwrap()
            .with_rate_limit(Some(high)),
    );
    let limited_routing = TenantRoutingLayer::builder(limited_directory)
        .build()
        .unwrap();
    let limits = RateLimitLayer::builder()
        .client_limits(std::collections::HashMap::from([(
            "app-1".to_owned(),
            high,
        )]))
        .build()
        .unwrap();
    let versions = VersionNegotiationLayer::builder().build().unwrap();
    let scope = TenantScopeLayer::builder().build().unwrap();
    let stack = |auth: BearerAuthLayer| {
        ServiceBuilder::new()
            .fhir_versions(versions.clone())
            .fhir_bearer_auth(auth)
            .fhir_tenant_scope(scope.clone())
            .fhir_tenant_routing(routing.clone())
            .service_fn(ok)
    };

    let cases = cases();
    // The rows without the auth layer send a real token too, so every row builds the same
    // request.
    let hs256_token = bearer(&cases[0], TENANT);
    let mut group = c.benchmark_group("stack");
    group.bench_function("bare_service", |b| {
        let mut service = tower::service_fn(ok);
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });

    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&["https://auth.test"]);
    validation.set_audience(&["tower-fhir"]);
    validation.validate_nbf = true;
    for case in &cases {
        let token = bearer(case, TENANT);
        let raw = token.trim_start_matches("Bearer ").to_owned();
        let mut validation = validation.clone();
        validation.algorithms = vec![case.alg];
        group.bench_function(format!("crypto_only/{:?}", case.alg), |b| {
            b.iter(|| {
                jsonwebtoken::decode::<Map<String, Value>>(&raw, &case.decoding, &validation)
                    .unwrap()
            })
        });
    }

    let claims = json!({"exp": 4_000_000_000u64, "scope": format!("system/*.read {TENANT}")});
    let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
    group.bench_function("layer_version", |b| {
        let mut service = versions.layer(tower::service_fn(ok));
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });
    group.bench_function("layer_tenant", |b| {
        let mut service = scope.layer(tower::service_fn(ok));
        b.to_async(&runtime)
            .iter(|| service.call(request_with(&hs256_token, claims.clone())))
    });
    group.bench_function("layer_routing", |b| {
        let mut service = routing.layer(tower::service_fn(ok));
        warm(
            &runtime,
            &mut service,
            std::iter::once(request_with(&hs256_token, tenant(0))),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request_with(&hs256_token, tenant(0))))
    });

    for case in &cases {
        let token = bearer(case, TENANT);
        for (cache, capacity) in [("warm", 10_000), ("cold", 0)] {
            let alg = case.alg;
            group.bench_function(format!("layer_auth/{alg:?}/{cache}"), |b| {
                let mut service = auth_layer(case, capacity).layer(tower::service_fn(ok));
                warm(&runtime, &mut service, std::iter::once(request(&token)));
                b.to_async(&runtime).iter(|| service.call(request(&token)))
            });
            group.bench_function(format!("full/{alg:?}/{cache}"), |b| {
                let mut service = stack(auth_layer(case, capacity));
                warm(&runtime, &mut service, std::iter::once(request(&token)));
                b.to_async(&runtime).iter(|| service.call(request(&token)))
            });
        }
    }

    // Many tenants: a token per tenant, round-robin, every cache warm.
    let hs256 = &cases[0];
    let tokens: Vec<String> = (0..TENANTS)
        .map(|n| bearer(hs256, &tenant(n).to_string()))
        .collect();
    group.bench_function(format!("full/HS256/warm/{TENANTS}_tenants"), |b| {
        let mut service = stack(auth_layer(hs256, 10_000));
        warm(
            &runtime,
            &mut service,
            tokens.iter().map(|token| request(token)),
        );
        let mut next = tokens.iter().cycle();
        b.to_async(&runtime)
            .iter(|| service.call(request(next.next().unwrap())))
    });

    // Revocation: the bearer layer given a revocation list in which another token was revoked
    // (so the list is looked at once for this token, then one atomic load a request).
    group.bench_function("full/HS256/warm/revocable", |b| {
        let revoked = tower_fhir::auth::RevokedTokens::new();
        revoked.revoke_id(Some("https://auth.test"), "some-other-token", 4_000_000_000);
        let auth = BearerAuthLayer::builder()
            .key((hs256.key)())
            .issuer("https://auth.test")
            .audience("tower-fhir")
            .revoked_tokens(revoked)
            .build()
            .unwrap();
        let mut service = stack(auth);
        warm(
            &runtime,
            &mut service,
            std::iter::once(request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });

    // Rate limits.
    group.bench_function("layer_limits/tenant", |b| {
        let mut service = limits.layer(tower::service_fn(ok));
        let tenant_request = || {
            let mut request = request_with(&hs256_token, tenant(0));
            request.extensions_mut().insert(TenantRateLimit(high));
            request
        };
        warm(&runtime, &mut service, std::iter::once(tenant_request()));
        b.to_async(&runtime).iter(|| service.call(tenant_request()))
    });
    let limited_claims =
        json!({"iss": "https://auth.test", "sub": "app-1", "exp": 4_000_000_000u64});
    let limited_claims =
        VerifiedClaims::assume_verified(limited_claims.as_object().unwrap().clone()).unwrap();
    group.bench_function("layer_limits/tenant_and_client", |b| {
        let mut service = limits.layer(tower::service_fn(ok));
        let both = || {
            let mut request = request_with(&hs256_token, tenant(0));
            request.extensions_mut().insert(TenantRateLimit(high));
            request.extensions_mut().insert(limited_claims.clone());
            request
        };
        warm(&runtime, &mut service, std::iter::once(both()));
        b.to_async(&runtime).iter(|| service.call(both()))
    });
    group.bench_function("full/HS256/warm/limited", |b| {
        let mut service = ServiceBuilder::new()
            .fhir_versions(versions.clone())
            .fhir_bearer_auth(auth_layer(hs256, 10_000))
            .fhir_tenant_scope(scope.clone())
            .fhir_tenant_routing(limited_routing.clone())
            .fhir_rate_limits(limits.clone())
            .service_fn(ok);
        warm(
            &runtime,
            &mut service,
            std::iter::once(request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });

    // A tenant served in-process.
    let local_directory = InMemoryDirectory::new();
    local_directory.upsert(
        tenant(0),
        TenantRecord::in_process(InProcessTenant::new("store-0", [FhirVersion::Stu3]).unwrap()),
    );
    let local_routing = TenantRoutingLayer::builder(local_directory.clone())
        .build()
        .unwrap();
    group.bench_function("layer_routing/in_process", |b| {
        let mut service = local_routing.layer(tower::service_fn(ok));
        warm(
            &runtime,
            &mut service,
            std::iter::once(request_with(&hs256_token, tenant(0))),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request_with(&hs256_token, tenant(0))))
    });
    group.bench_function("full/HS256/warm/in_process", |b| {
        let mut service = ServiceBuilder::new()
            .fhir_versions(versions.clone())
            .fhir_bearer_auth(auth_layer(hs256, 10_000))
            .fhir_tenant_scope(scope.clone())
            .fhir_tenant_routing(local_routing.clone())
            .service_fn(ok);
        warm(
            &runtime,
            &mut service,
            std::iter::once(request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });
    group.bench_function("gateway_layer/HS256/warm/in_process", |b| {
        let endpoint = TokenEndpoint::builder()
            .issuer("https://gateway.test")
            .audience("tower-fhir")
            .store(InMemoryClientStore::new())
            .build()
            .unwrap();
        let layer = Gateway::builder("https://gateway.test")
            .directory(local_directory.clone())
            .auth(
                BearerAuthLayer::builder()
                    .key((hs256.key)())
                    .issuer("https://auth.test")
                    .audience_for_issuer("https://auth.test", "tower-fhir"),
            )
            .tenant(TenantScopeLayer::builder().issuer_any_tenant("https://auth.test"))
            .token_endpoint(endpoint)
            .build_layer()
            .unwrap();
        let mut service = layer.layer(tower::service_fn(ok_scoped));
        warm(
            &runtime,
            &mut service,
            std::iter::once(request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });

    // SMART scopes: the token's `system/*.read` checked against each request.
    let smart = SmartScopeLayer::builder().build().unwrap();
    let smart_stack = |auth: BearerAuthLayer| {
        ServiceBuilder::new()
            .fhir_versions(versions.clone())
            .fhir_bearer_auth(auth)
            .fhir_tenant_scope(scope.clone())
            .fhir_tenant_routing(routing.clone())
            .fhir_smart_scopes(smart.clone())
            .service_fn(ok_scoped)
    };
    group.bench_function("full/HS256/warm/read", |b| {
        let mut service = stack(auth_layer(hs256, 10_000));
        warm(
            &runtime,
            &mut service,
            std::iter::once(read_request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(read_request(&hs256_token)))
    });
    group.bench_function("full/HS256/warm/read/smart", |b| {
        let mut service = smart_stack(auth_layer(hs256, 10_000));
        warm(
            &runtime,
            &mut service,
            std::iter::once(read_request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(read_request(&hs256_token)))
    });
    group.bench_function("full/HS256/warm/smart", |b| {
        let mut service = smart_stack(auth_layer(hs256, 10_000));
        warm(
            &runtime,
            &mut service,
            std::iter::once(request(&hs256_token)),
        );
        b.to_async(&runtime)
            .iter(|| service.call(request(&hs256_token)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
