//! A FHIR endpoint protected by the bearer layer: `cargo run --example bearer`.
//!
//! With no arguments it runs a demo: tokens are HS256 with a built-in secret, and it prints a
//! token valid for an hour and curl commands that work as printed. To accept tokens from a
//! real identity provider instead:
//!
//! ```text
//! cargo run --example bearer -- --jwks-url http://127.0.0.1:9000/jwks \
//!     --issuer http://127.0.0.1:9000 --audience tower-fhir
//! ```
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8080`), `--jwks-url URL`, `--issuer ISS`,
//! `--audience AUD` (both repeatable). `RUST_LOG=tower_fhir=debug` shows why tokens are refused.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Path;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey, VerifiedClaims};

const DEMO_SECRET: &[u8] = b"tower-fhir-demo-secret-change-me-0123456789";
const DEMO_TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const DEMO_ISSUER: &str = "urn:tower-fhir:demo";
const DEMO_AUDIENCE: &str = "tower-fhir";

struct Options {
    listen: SocketAddr,
    jwks_url: Option<String>,
    issuers: Vec<String>,
    audiences: Vec<String>,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        listen: "127.0.0.1:8080".parse().unwrap(),
        jwks_url: None,
        issuers: Vec::new(),
        audiences: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                options.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?
            }
            "--jwks-url" => options.jwks_url = Some(value()?),
            "--issuer" => options.issuers.push(value()?),
            "--audience" => options.audiences.push(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(options)
}

async fn patient(
    Path(id): Path<String>,
    Extension(claims): Extension<VerifiedClaims>,
) -> impl IntoResponse {
    let patient = json!({
        "resourceType": "Patient",
        "id": id,
        "name": [{"family": "Chalmers", "given": ["Peter"]}],
        "meta": {"tag": [{"system": "urn:tower-fhir:client", "code": claims.subject()}]}
    });
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        patient.to_string(),
    )
}

async fn metadata() -> impl IntoResponse {
    let capability = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "3.0.2",
        "format": ["json"],
        "rest": [{"mode": "server", "resource": [{"type": "Patient", "interaction": [{"code": "read"}]}]}]
    });
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        capability.to_string(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let options = options()?;

    let mut auth = BearerAuthLayer::builder().skip_if(|parts| parts.uri.path() == "/metadata");
    let demo_token = match &options.jwks_url {
        Some(url) => {
            auth = auth.jwks_url(url);
            None
        }
        None => {
            auth = auth
                .key(VerificationKey::hmac(DEMO_SECRET)?.with_algorithm(Algorithm::HS256)?)
                .issuer(DEMO_ISSUER)
                .audience(DEMO_AUDIENCE);
            Some(demo_token()?)
        }
    };
    for issuer in &options.issuers {
        auth = auth.issuer(issuer);
    }
    for audience in &options.audiences {
        auth = auth.audience(audience);
    }

    let app = Router::new()
        .route("/Patient/{id}", get(patient))
        .route("/metadata", get(metadata))
        .layer(auth.build()?)
        .layer(tower_http::trace::TraceLayer::new_for_http());

    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("tower-fhir bearer example listening on {base}");
    match demo_token {
        Some(token) => {
            println!("demo token (HS256, valid for 1 hour, scope {DEMO_TENANT}):\n  {token}\n");
            println!("try:");
            println!("  curl -s {base}/metadata");
            println!("  curl -s -H 'Authorization: Bearer {token}' {base}/Patient/example");
            println!("  curl -si {base}/Patient/example    # 401 with WWW-Authenticate");
        }
        None => println!(
            "accepting tokens verified through {}",
            options.jwks_url.unwrap_or_default()
        ),
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
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

fn demo_token() -> Result<String, jsonwebtoken::errors::Error> {
    tower_fhir::install_crypto_provider();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = json!({
        "iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "sub": "demo-client",
        "iat": now, "nbf": now, "exp": now + 3600, "scope": DEMO_TENANT
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(DEMO_SECRET),
    )
}
