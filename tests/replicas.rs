//! Gateways sharing one PostgreSQL database, over real HTTP: a token revoked through one
//! replica is refused by another within a second, cached there or not, and by a replica
//! started afterwards at once. (The replicas share their signing keys in-process here: keeping
//! those in the database is the PostgreSQL issue's next step.)

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::*;
use tower_fhir::gateway::Gateway;
use tower_fhir::postgres::PgState;
use tower_fhir::route::{TenantRecord, TenantStore, Upstream};
use tower_fhir::token::{ClientStore, NewClient, SecretHashing, SigningKeys, TokenEndpoint};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "replicated-client-secret-0123";
const ISSUER: &str = "https://gateway.example";

/// One replica: a gateway over the shared database, on its own port.
async fn replica(url: &str, keys: &SigningKeys) -> TestClient {
    let state = PgState::connect(url).await.unwrap();
    let endpoint = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience("tower-fhir")
        .store(state.client_store(SecretHashing::new(64, 1).unwrap()))
        .signing_keys(keys.clone())
        .revocation_log(state.revocation_log())
        .assertion_replay_guard(state.assertion_replay_guard())
        .build()
        .unwrap();
    state
        .follow_revocations(endpoint.revoked_tokens())
        .await
        .unwrap();
    let gateway = Gateway::builder(ISSUER)
        .directory(state.tenant_store())
        .token_endpoint(endpoint)
        .build()
        .unwrap();
    TestClient::new(serve_tower(gateway).await)
}

/// A PostgreSQL server with an empty database `name`, its URL, and the state over it.
async fn database(name: &str) -> (support::postgres::Postgres, String, PgState) {
    let server = support::postgres::Postgres::start(name);
    server.create_database(name);
    let url = server.url(name);
    let state = PgState::connect(&url).await.unwrap();
    (server, url, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_reaches_the_others() {
    let (_server, url, state) = database("replicas").await;
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    state
        .tenant_store()
        .put(
            TENANT.parse().unwrap(),
            TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
                .unwrap(),
        )
        .await
        .unwrap();
    state
        .client_store(SecretHashing::new(64, 1).unwrap())
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(TENANT.parse().unwrap()),
        )
        .await
        .unwrap();
    let keys = SigningKeys::generate().unwrap();
    let (one, two) = (replica(&url, &keys).await, replica(&url, &keys).await);

    // A token from replica one works on replica two (and is cached there).
    let reply = one
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        two.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );

    // Revoked through replica one: replica two refuses it within a second.
    let reply = one
        .send(
            "POST",
            "/oauth/revoke",
            &[FORM],
            &format!("token={token}&client_id=app&client_secret={SECRET}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let revoked_at = Instant::now();
    loop {
        let status = two.get_bearer("/Patient/1", &token).await.status;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "replica two still accepts the revoked token after a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A replica started afterwards refuses it from its first request.
    let three = replica(&url, &keys).await;
    assert_eq!(
        three.get_bearer("/Patient/1", &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The client's other tokens are untouched everywhere.
    let reply = two
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}"),
        )
        .await;
    let fresh = reply.json()["access_token"].as_str().unwrap().to_owned();
    for replica in [&one, &two, &three] {
        assert_eq!(
            replica.get_bearer("/Patient/1", &fresh).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_assertion_accepted_by_one_replica_is_a_replay_at_the_others() {
    let (server, url, state) = database("assertions").await;
    let mut key = rsa_jwk(RSA_PRIVATE, "backend-1");
    key.as_object_mut().unwrap().remove("alg");
    state
        .client_store(SecretHashing::new(64, 1).unwrap())
        .register(
            NewClient::new("backend")
                .tenant(TENANT.parse().unwrap())
                .jwks(json!({"keys": [key]})),
        )
        .await
        .unwrap();
    let keys = SigningKeys::generate().unwrap();
    let (one, two) = (replica(&url, &keys).await, replica(&url, &keys).await);
    let assertion = |jti: &str| {
        let claims = json!({"iss": "backend", "sub": "backend", "aud": format!("{ISSUER}/oauth/token"),
            "exp": now() + 240, "jti": jti});
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        format!(
            "grant_type=client_credentials&client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion={}",
            mint_with(&key, jsonwebtoken::Algorithm::RS384, Some("backend-1"), &claims)
        )
    };
    let once = assertion("once");
    let reply = one.send("POST", "/oauth/token", &[FORM], &once).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // The same assertion at the other replica, which never saw it: a replay.
    let reply = two.send("POST", "/oauth/token", &[FORM], &once).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_client");
    // A fresh one works there.
    let reply = two
        .send("POST", "/oauth/token", &[FORM], &assertion("twice"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // The database gone: the client cannot be read nor its assertion checked, so none is
    // accepted: 503 with Retry-After (not 401: nothing is wrong with the client's).
    drop(server);
    let reply = one
        .send("POST", "/oauth/token", &[FORM], &assertion("thrice"))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(reply.headers.contains_key("retry-after"));
}
