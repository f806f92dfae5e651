//! Loopback proxy benchmark: throughput and latency through `FhirProxy` (alone, and behind the
//! whole stack) against a bare hyper pass-through, same upstream, same run.
//!
//! `cargo bench --bench proxy` (`PROXY_BENCH_SECS`, default 5, and `PROXY_BENCH_CONNECTIONS`,
//! default 32, to change the load). Everything runs on this machine: the upstream, the proxies
//! and the load generator share the cores, so compare the rows with each other, not with other
//! machines.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tower::{Service, ServiceBuilder};
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::proxy::FhirProxy;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantRoutingLayer, Upstream};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret";
const PATIENT: &str = r#"{"resourceType":"Patient","id":"123","name":[{"family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25"}"#;

/// Serves `service` on a loopback port.
async fn serve<S, B>(service: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(service),
                    )
                    .await;
            });
        }
    });
    addr
}

async fn upstream() -> SocketAddr {
    serve(tower::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/fhir+json")
                .body(Full::<Bytes>::from(PATIENT))
                .unwrap(),
        )
    }))
    .await
}

/// The baseline: a hyper pass-through that only swaps the URI.
async fn bare_passthrough(upstream: SocketAddr) -> SocketAddr {
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    serve(tower::service_fn(move |mut req: Request<Incoming>| {
        let client = client.clone();
        async move {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            *req.uri_mut() = format!("http://{upstream}/fhir{path}")
                .parse::<Uri>()
                .unwrap();
            req.headers_mut().remove("host");
            let response = client.request(req).await.unwrap();
            Ok::<_, Infallible>(response)
        }
    }))
    .await
}

fn upstream_of(addr: SocketAddr) -> Upstream {
    Upstream::parse(&format!("http://{addr}/fhir"), FhirVersion::Stu3).unwrap()
}

async fn proxy_only(upstream: SocketAddr) -> SocketAddr {
    let proxy = FhirProxy::builder("http://127.0.0.1:8080").build().unwrap();
    let upstream = upstream_of(upstream);
    serve(
        ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(upstream.clone());
                req
            })
            .service(proxy),
    )
    .await
}

async fn whole_stack(upstream: SocketAddr) -> SocketAddr {
    let tenant: TenantId = TENANT.parse().unwrap();
    let directory = InMemoryDirectory::new();
    directory.upsert(tenant, TenantRecord::new([upstream_of(upstream)]).unwrap());
    let stack = ServiceBuilder::new()
        .layer(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(SECRET).unwrap())
                .build()
                .unwrap(),
        )
        .layer(TenantScopeLayer::builder().build().unwrap())
        .layer(TenantRoutingLayer::builder(directory).build().unwrap())
        .service(FhirProxy::builder("http://127.0.0.1:8080").build().unwrap());
    serve(stack).await
}

struct Run {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

async fn load(target: SocketAddr, token: &str, connections: usize, duration: Duration) -> Run {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http();
    let uri: Uri = format!("http://{target}/Patient/123").parse().unwrap();
    let authorization = format!("Bearer {token}");
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, uri, authorization) = (client.clone(), uri.clone(), authorization.clone());
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let (mut requests, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let request = Request::get(uri.clone())
                        .header("authorization", &authorization)
                        .header("accept", "application/fhir+json")
                        .body(Full::default())
                        .unwrap();
                    let sent = Instant::now();
                    let ok = match client.request(request).await {
                        Ok(response) => {
                            let ok = response.status() == 200;
                            ok && response.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    latency.saturating_record(sent.elapsed().as_micros() as u64);
                    requests += 1;
                    errors += u64::from(!ok);
                }
                (requests, errors, latency)
            })
        })
        .collect();
    let mut run = Run {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    };
    for task in tasks {
        let (requests, errors, latency) = task.await.unwrap();
        run.requests += requests;
        run.errors += errors;
        run.latency.add(latency).unwrap();
    }
    run.elapsed = start.elapsed();
    run
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent: stay quick there.
    if std::env::args().any(|a| a == "--list" || a == "--test")
        || !std::env::args().any(|a| a == "--bench")
    {
        return;
    }
    tower_fhir::install_crypto_provider();
    let seconds = env("PROXY_BENCH_SECS", 5);
    let connections = env("PROXY_BENCH_CONNECTIONS", 32) as usize;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims = json!({"sub": "bench", "exp": now + 3600, "scope": TENANT});
        let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        let upstream = upstream().await;
        let targets = [
            ("bare hyper pass-through", bare_passthrough(upstream).await),
            ("FhirProxy", proxy_only(upstream).await),
            ("auth+tenant+route+proxy", whole_stack(upstream).await),
        ];
        let duration = Duration::from_secs(seconds);
        println!("proxy bench: {connections} connections, {seconds} s per target, GET /Patient/123 over loopback");
        println!("{:<26} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7}", "target", "req/s", "ratio", "p50 us", "p99 us", "max us", "errors");
        let mut baseline = None;
        for (name, addr) in targets {
            // Warm the pools, caches and keys.
            let _ = load(addr, &token, connections, Duration::from_millis(300)).await;
            let run = load(addr, &token, connections, duration).await;
            let rate = run.requests as f64 / run.elapsed.as_secs_f64();
            let ratio = rate / *baseline.get_or_insert(rate);
            println!(
                "{:<26} {:>10.0} {:>8.3} {:>9} {:>9} {:>9} {:>7}",
                name,
                rate,
                ratio,
                run.latency.value_at_quantile(0.5),
                run.latency.value_at_quantile(0.99),
                run.latency.max(),
                run.errors
            );
        }
    });
}
