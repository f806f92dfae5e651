//! The tower-fhir layers on an axum `Router`: `cargo run --example axum`.
//!
//! A FHIR-flavoured axum app whose handlers extract what the layers verified: the tenant
//! (`TenantId`), the token's claims (`VerifiedClaims`) and the negotiated release
//! (`FhirVersion`), each an axum extractor (the library's feature `axum`). The layers are
//! stacked one by one here and the token endpoint mounted on the same router by hand, the
//! bearer layer verifying its tokens in-process (`examples/fhir_server.rs` does it all with one
//! `GatewayLayer`). Prints the demo client's credentials and curl commands that work as
//! printed.
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8083`).

use std::net::SocketAddr;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tower::ServiceBuilder;
use tower_fhir::auth::{BearerAuthLayer, VerifiedClaims};
use tower_fhir::metadata::MetadataLayer;
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};
use tower_fhir::ServiceBuilderExt;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const CLIENT_ID: &str = "axum-demo";
const CLIENT_SECRET: &str = "axum-demo-secret-0123456789";

/// `GET /Patient/{id}`: answers who asked, for which tenant, in which release.
async fn read_patient(
    tenant: TenantId,
    claims: VerifiedClaims,
    version: FhirVersion,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> impl IntoResponse {
    let patient = json!({
        "resourceType": "Patient",
        "id": id,
        "meta": {"tag": [
            {"system": "urn:example:tenant", "code": tenant.to_string()},
            {"system": "urn:example:client", "code": claims.subject().unwrap_or("")},
            {"system": "urn:example:fhir-release", "code": version.release()}
        ]}
    });
    (
        [(header::CONTENT_TYPE, version.json_media_type())],
        patient.to_string(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut listen: SocketAddr = "127.0.0.1:8083".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let base = format!("http://{}", listener.local_addr()?);

    let clients = InMemoryClientStore::new();
    clients
        .register(
            NewClient::new(CLIENT_ID)
                .secret(CLIENT_SECRET)
                .tenant(TenantId::parse(TENANT)?),
        )
        .await?;
    let tokens = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(clients)
        .build()?;

    // The FHIR routes, behind the layers (outermost first).
    let fhir = Router::new()
        .route("/Patient/{id}", get(read_patient))
        .layer(
            ServiceBuilder::new()
                // A request that names no release is an R4 one (so the handler always gets a
                // `FhirVersion`), and so is the statement `metadata` answers it with.
                .fhir_versions(
                    VersionNegotiationLayer::builder()
                        .default_version(FhirVersion::R4)
                        .build()?,
                )
                .fhir_metadata(
                    MetadataLayer::builder(&base, format!("{base}/oauth/token"))
                        .issuer(&base)
                        .default_version(FhirVersion::R4)
                        .build()?,
                )
                .fhir_bearer_auth(
                    BearerAuthLayer::builder()
                        .key_source_for_issuer(tokens.key_source(), &base)
                        .audience("tower-fhir")
                        .build()?,
                )
                .fhir_tenant_scope(TenantScopeLayer::builder().build()?),
        );
    let app = Router::new()
        .route_service("/oauth/token", tokens.clone())
        .route_service(
            "/.well-known/jwks.json",
            tokens.signing_keys().jwks_service(),
        )
        // metadata and smart-configuration are answered by the metadata layer.
        .fallback_service(fhir);

    println!("axum example listening on {base}");
    println!("demo client: client_id {CLIENT_ID}, client_secret {CLIENT_SECRET}, tenant {TENANT}");
    println!("try:");
    println!("  curl -s {base}/metadata");
    println!("  TOKEN=$(curl -s -u {CLIENT_ID}:{CLIENT_SECRET} -d grant_type=client_credentials -d scope={TENANT} {base}/oauth/token | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" {base}/Patient/42");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
