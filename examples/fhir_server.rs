//! Your own FHIR server in Rust, made multi-tenant by tower-fhir: `cargo run --example fhir_server`.
//!
//! The complete code of the guide `docs/in-process.md`. An axum app keeps each hospital's
//! patients in a store of its own. `GatewayLayer`, built with a token endpoint, goes over the
//! whole router: it answers `POST /oauth/token` (and the JWKS, and secret rotation) itself,
//! verifies every other request's token, finds the tenant in it, and hands the handler that
//! tenant's store key (`InProcessTenant`), the tenant (`TenantId`) and the FHIR release to
//! answer in (`FhirVersion`), as axum extractors. Nothing is proxied; no tenant has a URL.
//!
//! The router has no `metadata` route: `GET /metadata` is answered by the layer, without a
//! token and with one (then in the tenant's release), naming the token endpoint.
//!
//! Two tenants on two stores: Contoso serves R4 and DSTU2, Fabrikam R4 only. Two client
//! applications: `dstu2-app` speaks DSTU2 (`Accept: application/json+fhir`), `r4-app` R4.
//! Prints their credentials and curl commands that work as printed.
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8082`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tower_fhir::gateway::Gateway;
use tower_fhir::outcome::{IssueType, OperationOutcome};
use tower_fhir::route::{InMemoryDirectory, InProcessTenant, TenantRecord};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};

/// The customers' directory tenants, each with its store key and the releases it serves.
const TENANTS: [(&str, &str, &[FhirVersion]); 2] = [
    (
        "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
        "contoso",
        &[FhirVersion::R4, FhirVersion::Dstu2],
    ),
    (
        "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f",
        "fabrikam",
        &[FhirVersion::R4],
    ),
];

/// The client applications (demo secrets: keep real ones out of code), entitled to both.
const CLIENTS: [(&str, &str); 2] = [
    ("dstu2-app", "dstu2-app-secret-0123456789"),
    ("r4-app", "r4-app-secret-0123456789"),
];

/// One hospital's patients, by id.
type Store = RwLock<HashMap<String, Value>>;

/// Every hospital's store, by the key its tenant record names.
type Stores = Arc<HashMap<String, Store>>;

/// A FHIR error answer: an OperationOutcome, as the layers' own.
fn outcome(status: StatusCode, code: IssueType, diagnostics: String) -> Response {
    OperationOutcome::error(code, diagnostics)
        .to_response(status)
        .map(axum::body::Body::from)
}

/// A resource in the release the request is served in.
fn resource(version: FhirVersion, status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, version.json_media_type())],
        body.to_string(),
    )
        .into_response()
}

/// The answer for a tenant whose store this process does not have (a directory out of step
/// with the stores: the server's mistake, not the client's).
fn no_store(tenant: &InProcessTenant) -> Response {
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        IssueType::Exception,
        format!("no store named {:?}", tenant.key()),
    )
}

/// `GET /Patient/{id}`: a read, from this tenant's store only.
async fn read(
    State(stores): State<Stores>,
    tenant: InProcessTenant,
    version: FhirVersion,
    Path(id): Path<String>,
) -> Response {
    let Some(store) = stores.get(tenant.key()) else {
        return no_store(&tenant);
    };
    let patients = store.read().unwrap_or_else(|e| e.into_inner());
    match patients.get(&id) {
        Some(patient) => resource(version, StatusCode::OK, patient),
        None => outcome(
            StatusCode::NOT_FOUND,
            IssueType::NotFound,
            format!("Patient/{id} is not known"),
        ),
    }
}

/// `GET /Patient`: a search of this tenant's patients. It applies every parameter it takes
/// (`_id`, `_summary=count`) and refuses any other with `400`: a search that ignored a
/// parameter would find more than asked, and the gateway's check of a granular SMART scope
/// (`system/Patient.rs?...`) is such a search (sent with `Prefer: handling=strict`).
async fn search(
    State(stores): State<Stores>,
    tenant: InProcessTenant,
    id: TenantId,
    version: FhirVersion,
    Query(parameters): Query<Vec<(String, String)>>,
) -> Response {
    let Some(store) = stores.get(tenant.key()) else {
        return no_store(&tenant);
    };
    let patients = store.read().unwrap_or_else(|e| e.into_inner());
    let mut found: Vec<&Value> = patients.values().collect();
    let mut count_only = false;
    for (name, value) in &parameters {
        match name.as_str() {
            "_id" => found.retain(|patient| patient["id"] == value.as_str()),
            "_summary" if value == "count" => count_only = true,
            _ => {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    IssueType::NotSupported,
                    format!("this server does not search by {name}={value}"),
                )
            }
        }
    }
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": found.len(),
        "meta": {"tag": [{"system": "urn:example:tenant", "code": id.to_string()}]}});
    if !count_only {
        bundle["entry"] = found.iter().map(|p| json!({"resource": p})).collect();
    }
    resource(version, StatusCode::OK, &bundle)
}

/// The next id a create gives (ids below are the demo's).
static NEXT_ID: AtomicU64 = AtomicU64::new(1000);

/// `POST /Patient`: a create, into this tenant's store.
async fn create(
    State(stores): State<Stores>,
    tenant: InProcessTenant,
    version: FhirVersion,
    body: Bytes,
) -> Response {
    let Some(store) = stores.get(tenant.key()) else {
        return no_store(&tenant);
    };
    let mut patient: Value = match serde_json::from_slice(&body) {
        Ok(patient @ Value::Object(_)) if patient["resourceType"] == "Patient" => patient,
        _ => {
            return outcome(
                StatusCode::BAD_REQUEST,
                IssueType::Invalid,
                "the body must be a Patient resource in JSON".into(),
            )
        }
    };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed).to_string();
    let mut patients = store.write().unwrap_or_else(|e| e.into_inner());
    patient["id"] = json!(id);
    patients.insert(id.clone(), patient.clone());
    let mut response = resource(version, StatusCode::CREATED, &patient);
    if let Ok(location) = format!("Patient/{id}").parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
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
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let base = format!("http://{}", listener.local_addr()?);

    // 1. The tenants: served in-process, each under its store key, in its releases.
    let directory = InMemoryDirectory::new();
    let mut stores = HashMap::new();
    for (i, (tenant, key, releases)) in TENANTS.iter().enumerate() {
        let record = TenantRecord::in_process(InProcessTenant::new(*key, releases.to_vec())?);
        directory.upsert(tenant.parse()?, record);
        let id = (100 + i).to_string();
        let patient = json!({"resourceType": "Patient", "id": id,
            "name": [{"family": format!("Patient of {key}")}]});
        stores.insert(key.to_string(), RwLock::new(HashMap::from([(id, patient)])));
    }

    // 2. The clients, entitled to both tenants; and the token endpoint issuing their tokens.
    let clients = InMemoryClientStore::new();
    for (client_id, secret) in CLIENTS {
        let mut client = NewClient::new(client_id).secret(secret);
        for (tenant, _, _) in TENANTS {
            client = client.tenant(tenant.parse()?);
        }
        clients.register(client).await?;
    }
    let tokens = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(clients)
        .build()?;

    // 3. The whole stack as one layer: token routes, metadata, version negotiation, bearer
    //    validation, tenant scope, routing, rate limits.
    let gateway = Gateway::builder(&base)
        .directory(directory)
        .versions(
            VersionNegotiationLayer::builder().supported([FhirVersion::Dstu2, FhirVersion::R4]),
        )
        .token_endpoint(tokens)
        .build_layer()?;

    // 4. Your FHIR routes, behind it. No `metadata` route is needed: the layer answers
    //    `GET /metadata` (with a token, in the tenant's release) where the router has none.
    //    The layer goes over the whole router, not with `Router::layer` (which wraps each
    //    route's handler apart): a granular scope's check is a search the layer sends back
    //    through it, which must reach the search route.
    let fhir = Router::new()
        .route("/Patient/{id}", get(read))
        .route("/Patient", get(search).post(create))
        .with_state(Arc::new(stores));
    let app = Router::new().fallback_service(tower::Layer::layer(&gateway, fhir));

    println!("tower-fhir in-process FHIR server listening on {base}");
    for (tenant, key, releases) in TENANTS {
        let releases: Vec<&str> = releases.iter().map(|r| r.name()).collect();
        println!("tenant {tenant}: store {key}, {}", releases.join(" and "));
    }
    for (client_id, secret) in CLIENTS {
        println!("client {client_id}: secret {secret}");
    }
    let (contoso, _, _) = TENANTS[0];
    let (client_id, secret) = CLIENTS[0];
    println!("try:");
    println!("  TOKEN=$(curl -s -u {client_id}:{secret} -d grant_type=client_credentials -d scope={contoso} {base}/oauth/token | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Accept: application/json+fhir' {base}/Patient/100");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Accept: application/fhir+json; fhirVersion=4.0' {base}/Patient");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" {base}/metadata");
    // The client's address reaches the token endpoint's brute-force throttle as ConnectInfo.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
