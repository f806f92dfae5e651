//! The multi-tenant FHIR gateway with an embedded demo: `cargo run --example gateway`.
//!
//! It starts two small hospital FHIR servers in-process (one DSTU2, one STU3), onboards each as
//! a tenant, and serves the gateway in front of them: version negotiation, unauthenticated
//! metadata, bearer validation, tenant scope from the token, cached tenant routing, the proxy. It prints a demo token for each tenant and curl
//! commands that work as printed.
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8080`). `RUST_LOG=tower_fhir=debug` shows the
//! gateway's decisions. Tokens come from a demo HS256 key; the token endpoint comes later.

mod demo_fhir;

use std::net::SocketAddr;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tower::ServiceBuilder;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::metadata::{CapabilityCacheLayer, MetadataLayer};
use tower_fhir::proxy::{ClientAddr, FhirProxy};
use tower_fhir::route::{InMemoryDirectory, TenantRoutingLayer, TenantUpstreams, Upstream};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};

const DEMO_SECRET: &[u8] = b"tower-fhir-demo-secret-change-me-0123456789";
const DEMO_ISSUER: &str = "urn:tower-fhir:demo";
const DEMO_AUDIENCE: &str = "tower-fhir";
/// Contoso General (DSTU2) and Fabrikam Clinic (STU3), as customers' directory tenants.
const TENANT_DSTU2: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const TENANT_STU3: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut listen: SocketAddr = "127.0.0.1:8080".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }

    let contoso = demo_fhir::start(
        "Contoso General (DSTU2)",
        FhirVersion::Dstu2,
        &[
            ("1001", "Chalmers", "Peter", "1974-12-25"),
            ("1002", "Windsor", "Anne", "1960-03-11"),
        ],
    )
    .await;
    let fabrikam = demo_fhir::start(
        "Fabrikam Clinic (STU3)",
        FhirVersion::Stu3,
        &[
            ("2001", "Nguyen", "Linh", "1988-07-02"),
            ("2002", "Okafor", "Chidi", "1979-05-30"),
        ],
    )
    .await;
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TenantId::parse(TENANT_DSTU2)?,
        TenantUpstreams::new([Upstream::parse(&contoso, FhirVersion::Dstu2)?])
            .ok_or("no upstream")?,
    );
    directory.upsert(
        TenantId::parse(TENANT_STU3)?,
        TenantUpstreams::new([Upstream::parse(&fabrikam, FhirVersion::Stu3)?])
            .ok_or("no upstream")?,
    );

    let listener = tokio::net::TcpListener::bind(listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let routing = TenantRoutingLayer::builder(directory.clone()).build()?;
    let _follow = routing.cache().follow(directory.subscribe());
    let gateway = ServiceBuilder::new()
        .map_request(|mut request: Request| {
            // Name the client in Forwarded / X-Forwarded-For.
            if let Some(ConnectInfo(peer)) = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .copied()
            {
                request.extensions_mut().insert(ClientAddr(peer));
            }
            request
        })
        .layer(VersionNegotiationLayer::builder().build()?)
        .layer(
            MetadataLayer::builder(&base, format!("{base}/oauth/token"))
                .issuer(DEMO_ISSUER)
                .build()?,
        )
        .layer(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(DEMO_SECRET)?.with_algorithm(Algorithm::HS256)?)
                .issuer(DEMO_ISSUER)
                .audience(DEMO_AUDIENCE)
                .build()?,
        )
        .layer(TenantScopeLayer::builder().build()?)
        .layer(routing)
        .layer(CapabilityCacheLayer::new(Duration::from_secs(300), 10_000))
        .service(FhirProxy::builder(&base).build()?);
    let app = Router::new()
        .fallback_service(gateway)
        .layer(tower_http::trace::TraceLayer::new_for_http());

    let token_dstu2 = demo_token(TENANT_DSTU2)?;
    let token_stu3 = demo_token(TENANT_STU3)?;
    println!("tower-fhir gateway listening on {base}");
    println!("  tenant {TENANT_DSTU2} -> {contoso} (DSTU2)");
    println!("  tenant {TENANT_STU3} -> {fabrikam} (STU3)");
    println!("demo token for the DSTU2 tenant (HS256, valid for 1 hour):\n  {token_dstu2}");
    println!("demo token for the STU3 tenant (HS256, valid for 1 hour):\n  {token_stu3}\n");
    println!("try:");
    println!("  curl -s {base}/metadata    # no token needed: names the token endpoint");
    println!("  curl -s -H 'Authorization: Bearer {token_dstu2}' {base}/Patient/1001");
    println!("  curl -s -H 'Authorization: Bearer {token_stu3}' '{base}/Patient?family=ngu'");
    println!("  curl -s -H 'Authorization: Bearer {token_stu3}' -d 'family=okafor' {base}/Patient/_search");
    println!("  curl -si {base}/Patient/1001    # 401 with WWW-Authenticate");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await?;
    Ok(())
}

fn demo_token(tenant: &str) -> Result<String, jsonwebtoken::errors::Error> {
    tower_fhir::install_crypto_provider();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = json!({
        "iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "sub": "demo-client",
        "iat": now, "nbf": now, "exp": now + 3600, "scope": format!("system/*.read {tenant}")
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(DEMO_SECRET),
    )
}

/// Ctrl-C or SIGTERM; in-flight requests finish.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
