//! An existing in-process FHIR service gaining multi-tenant routing: `cargo run --example fhir_server`.
//!
//! No proxy here: the routing layer's `Upstream` picks a per-tenant patient store inside this
//! process (the upstream's base URL only names the store). Each tenant sees its own patients
//! and nothing else. Prints a demo token per tenant and curl commands.
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8082`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tower::ServiceBuilder;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantRoutingLayer, Upstream};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::version::FhirVersion;

const DEMO_SECRET: &[u8] = b"tower-fhir-demo-secret-change-me-0123456789";
const TENANTS: [(&str, &str); 2] = [
    ("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "store://contoso"),
    ("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f", "store://fabrikam"),
];

/// Patients by store name (the upstream's host), then by id.
type Stores = Arc<RwLock<HashMap<String, HashMap<String, Value>>>>;

fn store_of(upstream: &Upstream) -> String {
    upstream.base().authority().to_string()
}

async fn read(
    State(stores): State<Stores>,
    Extension(upstream): Extension<Upstream>,
    Path(id): Path<String>,
) -> Response {
    let stores = stores.read().unwrap_or_else(|e| e.into_inner());
    match stores.get(&store_of(&upstream)).and_then(|patients| patients.get(&id)) {
        Some(patient) => ([(header::CONTENT_TYPE, "application/fhir+json")], patient.to_string()).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "not-found", "diagnostics": format!("Patient/{id} is not known")}]}))).into_response(),
    }
}

async fn search(
    State(stores): State<Stores>,
    Extension(upstream): Extension<Upstream>,
    Extension(tenant): Extension<TenantId>,
) -> Response {
    let stores = stores.read().unwrap_or_else(|e| e.into_inner());
    let entries: Vec<Value> = stores
        .get(&store_of(&upstream))
        .map(|patients| patients.values().map(|p| json!({"resource": p})).collect())
        .unwrap_or_default();
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(),
        "meta": {"tag": [{"system": "urn:tower-fhir:tenant", "code": tenant.to_string()}]}, "entry": entries});
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        bundle.to_string(),
    )
        .into_response()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: SocketAddr = "127.0.0.1:8082".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let stores: Stores = Arc::default();
    let directory = InMemoryDirectory::new();
    for (i, (tenant, store)) in TENANTS.iter().enumerate() {
        // The "upstream" names a store in this process; nothing is proxied.
        let upstream = Upstream::parse(
            &format!("http://{}", store.trim_start_matches("store://")),
            FhirVersion::R4,
        )?;
        directory.upsert(
            tenant.parse()?,
            TenantRecord::new([upstream.clone()]).ok_or("no upstream")?,
        );
        let id = format!("{}", 100 + i);
        let patient = json!({"resourceType": "Patient", "id": id, "name": [{"family": format!("Patient of {store}")}]});
        stores
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(store_of(&upstream), HashMap::from([(id, patient)]));
    }
    let fhir = Router::new()
        .route("/Patient/{id}", get(read))
        .route("/Patient", get(search))
        .with_state(stores)
        .layer(
            ServiceBuilder::new()
                .layer(
                    BearerAuthLayer::builder()
                        .key(VerificationKey::hmac(DEMO_SECRET)?)
                        .build()?,
                )
                .layer(TenantScopeLayer::builder().build()?)
                .layer(TenantRoutingLayer::builder(directory).build()?),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("tower-fhir in-process FHIR server listening on {base}");
    for (tenant, store) in TENANTS {
        println!("token for tenant {tenant} ({store}):\n  {}", token(tenant)?);
    }
    println!("try: curl -s -H 'Authorization: Bearer <token>' {base}/Patient");
    axum::serve(listener, fhir)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn token(tenant: &str) -> Result<String, jsonwebtoken::errors::Error> {
    tower_fhir::install_crypto_provider();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = json!({"sub": "demo-client", "exp": now + 3600, "scope": tenant});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(DEMO_SECRET),
    )
}
