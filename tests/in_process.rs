//! An axum FHIR server of one's own behind `GatewayLayer`, over real HTTP: the token routes
//! through the layer, in-process tenants on their own stores, the axum extractors, the
//! release each client asked for, and the attacks that would reach another tenant's store.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use support::*;
use tower_fhir::gateway::Gateway;
use tower_fhir::ops::BodyLimitLayer;
use tower_fhir::route::{InMemoryDirectory, InProcessTenant, TenantRecord};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    ClientStore, InMemoryClientStore, NewClient, SecretHashing, ThrottlePolicy, TokenEndpoint,
};
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};

const CONTOSO: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const FABRIKAM: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "in-process-secret-0123456789";

/// Patients by store key, then by id.
type Stores = Arc<HashMap<&'static str, HashMap<&'static str, Value>>>;

/// `GET /Patient/{id}` from the tenant's own store, in the release chosen for the request.
async fn read(
    State(stores): State<Stores>,
    tenant: TenantId,
    local: InProcessTenant,
    version: FhirVersion,
    Path(id): Path<String>,
) -> Response {
    let Some(patient) = stores
        .get(local.key())
        .and_then(|patients| patients.get(id.as_str()))
    else {
        return (StatusCode::NOT_FOUND, format!("no Patient/{id}")).into_response();
    };
    let mut patient = patient.clone();
    patient["meta"] = json!({"tag": [
        {"system": "urn:test:tenant", "code": tenant.to_string()},
        {"system": "urn:test:release", "code": version.mime_code()}
    ]});
    (
        [(header::CONTENT_TYPE, version.json_media_type())],
        patient.to_string(),
    )
        .into_response()
}

/// `GET /Patient`: a search that applies every parameter it is given (`_id`, `gender`) and
/// fails on any other, as `Prefer: handling=strict` asks; `_summary=count` gives the total only.
async fn search(
    State(stores): State<Stores>,
    local: InProcessTenant,
    Query(parameters): Query<Vec<(String, String)>>,
) -> Response {
    let patients = stores.get(local.key()).into_iter().flat_map(|p| p.values());
    let mut found: Vec<&Value> = patients.collect();
    let mut count_only = false;
    for (name, value) in &parameters {
        match name.as_str() {
            "_id" => found.retain(|p| p["id"] == value.as_str()),
            "gender" => found.retain(|p| p["gender"] == value.as_str()),
            "_summary" if value == "count" => count_only = true,
            _ => {
                return (StatusCode::BAD_REQUEST, format!("unknown parameter {name}"))
                    .into_response()
            }
        }
    }
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": found.len()});
    if !count_only {
        bundle["entry"] = found.iter().map(|p| json!({"resource": p})).collect();
    }
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        bundle.to_string(),
    )
        .into_response()
}

/// A catch-all route of the application's own: the token routes must be answered by the layer
/// even where the router has a route matching their paths.
async fn any_resource(local: InProcessTenant, Path((kind, id)): Path<(String, String)>) -> String {
    format!("{} {kind}/{id}", local.key())
}

/// The request body limit of these tests' server.
const BODY_LIMIT: u64 = 1024;

/// `POST /Patient`: the body's length, read whole by axum's extractor.
async fn create(_local: InProcessTenant, body: axum::body::Bytes) -> String {
    format!("{} bytes", body.len())
}

struct Server {
    client: TestClient,
}

async fn server(throttle: Option<ThrottlePolicy>) -> Server {
    let stores: Stores = Arc::new(HashMap::from([
        (
            "contoso-db",
            HashMap::from([
                (
                    "100",
                    json!({"resourceType": "Patient", "id": "100", "gender": "female"}),
                ),
                (
                    "101",
                    json!({"resourceType": "Patient", "id": "101", "gender": "male"}),
                ),
            ]),
        ),
        (
            "fabrikam-db",
            HashMap::from([("200", json!({"resourceType": "Patient", "id": "200"}))]),
        ),
    ]));
    let directory = InMemoryDirectory::new();
    directory.upsert(
        CONTOSO.parse().unwrap(),
        TenantRecord::in_process(
            InProcessTenant::new("contoso-db", [FhirVersion::R4, FhirVersion::Dstu2]).unwrap(),
        ),
    );
    directory.upsert(
        FABRIKAM.parse().unwrap(),
        TenantRecord::in_process(InProcessTenant::new("fabrikam-db", [FhirVersion::R4]).unwrap()),
    );
    let clients = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    clients
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(CONTOSO.parse().unwrap())
                .tenant(FABRIKAM.parse().unwrap()),
        )
        .await
        .unwrap();
    clients
        .register(
            NewClient::new("women")
                .secret(SECRET)
                .tenant(CONTOSO.parse().unwrap())
                .scope("system/Patient.rs?gender=female"),
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let mut endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(clients);
    if let Some(policy) = throttle {
        endpoint = endpoint.throttle(policy);
    }
    let layer = Gateway::builder(&base)
        .directory(directory.clone())
        .follow(directory.subscribe())
        .versions(
            VersionNegotiationLayer::builder().supported([FhirVersion::Dstu2, FhirVersion::R4]),
        )
        .token_endpoint(endpoint.build().unwrap())
        .build_layer()
        .unwrap();
    let fhir = Router::new()
        .route("/Patient/{id}", get(read))
        .route("/Patient", get(search).post(create))
        .route("/{kind}/{id}", get(any_resource).post(any_resource))
        .with_state(stores);
    // The layer over the whole router (not `Router::layer`, which wraps each route's handler
    // apart): a granular scope's search is routed to the application's search handler.
    let app = Router::new()
        .fallback_service(tower::Layer::layer(&layer, fhir))
        .layer(BodyLimitLayer::new(BODY_LIMIT));
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    Server {
        client: TestClient::new(addr),
    }
}

async fn token_for(client: &TestClient, secret: &str, tenant: &str) -> Reply {
    token_of(client, "app", secret, tenant).await
}

async fn token_of(client: &TestClient, id: &str, secret: &str, scope: &str) -> Reply {
    client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id={id}&client_secret={secret}&scope={scope}"
            ),
        )
        .await
}

async fn token(client: &TestClient, scope: &str) -> String {
    let reply = token_for(client, SECRET, scope).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

async fn read_as(client: &TestClient, token: &str, path: &str, accept: &str) -> Reply {
    client
        .get(
            path,
            &[
                ("authorization", &format!("Bearer {token}")),
                ("accept", accept),
            ],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_serves_the_token_routes_ahead_of_the_application() {
    let Server { client } = server(None).await;
    // The token endpoint, its JWKS and secret rotation answer through the layer, although the
    // router's catch-all `/{kind}/{id}` matches `/oauth/token`.
    let contoso = token(&client, CONTOSO).await;
    let jwks = client.get("/.well-known/jwks.json", &[]).await;
    assert_eq!(jwks.status, StatusCode::OK);
    assert!(!jwks.json()["keys"].as_array().unwrap().is_empty());
    let rotated = client
        .send(
            "POST",
            "/oauth/clients/app/secret",
            &[FORM],
            &format!("client_id=app&client_secret={SECRET}"),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let new_secret = rotated.json()["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(
        token_for(&client, &new_secret, FABRIKAM).await.status,
        StatusCode::OK
    );
    // The metadata stays open and names the token endpoint served here.
    let metadata = client.get("/metadata", &[]).await;
    assert_eq!(metadata.status, StatusCode::OK);
    assert!(metadata.text().contains("/oauth/token"));
    // Everything else needs a token: the application's routes are behind the stack.
    assert_eq!(
        client.get("/Patient/100", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reply = read_as(&client, &contoso, "/Patient/100", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_reads_its_own_store_only() {
    let Server { client } = server(None).await;
    let contoso = token(&client, CONTOSO).await;
    let fabrikam = token(&client, FABRIKAM).await;
    let fhir = "application/fhir+json";

    let reply = read_as(&client, &contoso, "/Patient/100", fhir).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["meta"]["tag"][0]["code"], CONTOSO);
    assert_eq!(
        read_as(&client, &contoso, "/Patient/200", fhir)
            .await
            .status,
        StatusCode::NOT_FOUND,
        "another tenant's patient is not in this tenant's store"
    );
    assert_eq!(
        read_as(&client, &fabrikam, "/Patient/200", fhir)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        read_as(&client, &fabrikam, "/Patient/100", fhir)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // The application's catch-all gets the tenant's key too.
    let reply = read_as(&client, &fabrikam, "/Observation/7", fhir).await;
    assert_eq!(reply.text(), "fabrikam-db Observation/7");

    // A tenant hint in headers or the query changes nothing: the tenant is the token's.
    for (name, value) in [
        ("x-tenant-id", FABRIKAM),
        ("x-ms-tenant-id", FABRIKAM),
        ("tenant", "fabrikam-db"),
    ] {
        let reply = client
            .get(
                "/Patient/200",
                &[
                    ("authorization", &format!("Bearer {contoso}")),
                    (name, value),
                ],
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{name}");
    }
    assert_eq!(
        read_as(&client, &contoso, "/Patient/200?tenant=fabrikam-db", fhir)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // A token for a tenant nobody onboarded: 403, nothing reaches the application.
    let unknown = client.get_bearer("/Patient/100", "not-even-a-token").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dstu2_and_an_r4_client_each_get_their_release() {
    let Server { client } = server(None).await;
    let contoso = token(&client, CONTOSO).await;
    let fabrikam = token(&client, FABRIKAM).await;

    // A DSTU2 client (the DSTU2 media type) of a tenant serving R4 and DSTU2.
    let reply = read_as(&client, &contoso, "/Patient/100", "application/json+fhir").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["meta"]["tag"][1]["code"], "1.0");
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json+fhir"));
    // An R4 client naming its release.
    let reply = read_as(
        &client,
        &contoso,
        "/Patient/100",
        "application/fhir+json; fhirVersion=4.0",
    )
    .await;
    assert_eq!(reply.json()["meta"]["tag"][1]["code"], "4.0");
    // No release named: the tenant's default (its first), and the response says which.
    let reply = read_as(&client, &contoso, "/Patient/100", "application/fhir+json").await;
    assert_eq!(reply.json()["meta"]["tag"][1]["code"], "4.0");
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=4.0"
    );
    // A release the tenant does not serve: 406 with an OperationOutcome, before the handler.
    let reply = read_as(
        &client,
        &fabrikam,
        "/Patient/200",
        "application/fhir+json; fhirVersion=1.0",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_throttle_counts_axum_connect_info_addresses() {
    let policy = ThrottlePolicy {
        max_failures: 3,
        window: Duration::from_secs(60),
        base_block: Duration::from_secs(60),
        max_block: Duration::from_secs(60),
    };
    let Server { client: guesser } = server(Some(policy)).await;
    let real = guesser.connecting_from("127.0.0.2".parse().unwrap());
    for _ in 0..3 {
        assert_eq!(
            token_for(&guesser, "guess", CONTOSO).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        token_for(&guesser, SECRET, CONTOSO).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "locked out at its address"
    );
    assert_eq!(
        token_for(&real, SECRET, CONTOSO).await.status,
        StatusCode::OK,
        "the client from another address is not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_gets_413_with_an_outcome_from_an_axum_handler() {
    let Server { client } = server(None).await;
    let token = token(&client, CONTOSO).await;
    let addr = client.addr();
    // Within the limit, the handler has it; chunked past it (so no Content-Length refuses it
    // first), axum's extractor fails, and the client gets the layer's 413, not axum's text.
    let small = client
        .send(
            "POST",
            "/Patient",
            &[("authorization", &format!("Bearer {token}"))],
            "{}",
        )
        .await;
    assert_eq!(small.status, StatusCode::OK, "{}", small.text());
    assert_eq!(small.text(), "2 bytes");
    let chunk = "x".repeat(1000);
    let request = format!(
        "POST /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n3e8\r\n{chunk}\r\n3e8\r\n{chunk}\r\n0\r\n\r\n"
    );
    let (answer, _) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"too-long\""), "{answer}");
    assert!(answer.contains("application/fhir+json"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granular_scope_read_is_checked_with_the_applications_own_search() {
    let Server { client } = server(None).await;
    // Only female patients: a read is allowed once the application's search for the id and
    // the scope's parameters finds the patient (the layer asks the router, not a proxy).
    let scope = format!("{CONTOSO}%20system/Patient.rs%3Fgender%3Dfemale");
    let reply = token_of(&client, "women", SECRET, &scope).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let women = reply.json()["access_token"].as_str().unwrap().to_owned();
    let fhir = "application/fhir+json";
    let reply = read_as(&client, &women, "/Patient/100", fhir).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["gender"], "female");
    let reply = read_as(&client, &women, "/Patient/101", fhir).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    // A search under the scope carries its parameters to the application's search.
    let reply = read_as(&client, &women, "/Patient?gender=female", fhir).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_directory_serves_in_process_and_proxied_tenants_through_or_in_process() {
    use tower_fhir::proxy::FhirProxy;
    use tower_fhir::route::Upstream;
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir/Patient/300",
        Answer::json(json!({"resourceType": "Patient", "id": "300"})),
    );
    let directory = InMemoryDirectory::new();
    directory.upsert(
        CONTOSO.parse().unwrap(),
        TenantRecord::in_process(InProcessTenant::new("contoso-db", [FhirVersion::R4]).unwrap()),
    );
    directory.upsert(
        FABRIKAM.parse().unwrap(),
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
            .unwrap(),
    );
    let clients = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    clients
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(CONTOSO.parse().unwrap())
                .tenant(FABRIKAM.parse().unwrap()),
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(clients)
        .build()
        .unwrap();
    let layer = Gateway::builder(&base)
        .directory(directory)
        .token_endpoint(endpoint)
        .build_layer()
        .unwrap();
    let fhir = Router::new().route(
        "/Patient/{id}",
        get(
            |local: InProcessTenant, Path(id): Path<String>| async move {
                format!("{} read {id}", local.key())
            },
        ),
    );
    let proxy = FhirProxy::builder(&base).build().unwrap();
    let app =
        Router::new().fallback_service(tower::Layer::layer(&layer, proxy.or_in_process(fhir)));
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let client = TestClient::new(addr);
    // The in-process tenant: the application answers, and no request reaches the upstream.
    let contoso = token(&client, CONTOSO).await;
    let reply = read_as(&client, &contoso, "/Patient/100", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "contoso-db read 100");
    assert!(upstream.received().is_empty());
    // The proxied one: its upstream answers, the client's token not forwarded.
    let fabrikam = token(&client, FABRIKAM).await;
    let reply = read_as(&client, &fabrikam, "/Patient/300", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["id"], "300");
    let received = upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].target, "/fhir/Patient/300");
    assert!(received[0].headers.get("authorization").is_none());
}
