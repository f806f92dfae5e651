//! SMART authorization through the gateway binary, over real HTTP: scopes granted at issuance
//! and enforced (`require_smart_scopes`), a `private_key_jwt` client from the configuration
//! and one registered through the admin API, introspection and revocation.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const SECRET: &str = "smart-app-secret-0123456789";
const ADMIN_TOKEN: &str = "an-admin-token-of-some-length";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

struct Running {
    proc: Proc,
    client: TestClient,
    base: String,
}

fn public_jwk(private_pem: &str, kid: &str) -> Value {
    let mut jwk = rsa_jwk(private_pem, kid);
    jwk.as_object_mut().unwrap().remove("alg");
    jwk
}

/// The gateway on port 0, its address read from the start line: a port picked by `free_port`
/// could be picked for another test's gateway at the same moment, and with `SO_REUSEPORT` both
/// would take it and share its connections.
fn start(dir: &Path, upstream: &RecordingUpstream) -> Running {
    start_on(dir, upstream, 0)
}

/// The gateway on `port` (0 for any), its state in `dir`.
fn start_on(dir: &Path, upstream: &RecordingUpstream, port: u16) -> Running {
    start_with(dir, upstream, port, true)
}

/// [`start_on`], with `require_smart_scopes` as given.
fn start_with(
    dir: &Path,
    upstream: &RecordingUpstream,
    port: u16,
    require_smart_scopes: bool,
) -> Running {
    let config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "state_dir": dir.join("state"),
        "require_smart_scopes": require_smart_scopes,
        "admin_token": ADMIN_TOKEN,
        "clients": [
            {"client_id": "app", "client_secret": SECRET, "tenants": [TENANT],
             "scopes": ["system/Patient.rs"]},
            {"client_id": "backend", "token_endpoint_auth_method": "private_key_jwt",
             "jwks": {"keys": [public_jwk(RSA_PRIVATE, "backend-1")]},
             "tenants": [TENANT], "scopes": ["system/*.rs"]},
            {"client_id": "open", "client_secret": SECRET, "tenants": [TENANT]}
        ],
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]}],
        "secret_hashing": {"memory_kib": 64, "iterations": 1}
    });
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command.arg("--config").arg(&file).env("RUST_LOG", "info");
    let (proc, base) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    Running {
        proc,
        client: TestClient::new(addr),
        base,
    }
}

async fn post(client: &TestClient, path: &str, form: &str) -> Reply {
    client.send("POST", path, &[FORM], form).await
}

/// A client credentials grant for the client `id` (its secret [`SECRET`]) and `scope`
/// (form-encoded).
async fn ask_token(client: &TestClient, id: &str, scope: &str) -> Reply {
    let form = format!(
        "grant_type=client_credentials&client_id={id}&client_secret={SECRET}&scope={scope}"
    );
    post(client, "/oauth/token", &form).await
}

/// A client assertion of `client`, signed with `pem`'s key under `kid`, for `base`'s token URL.
fn assertion(pem: &str, kid: &str, client: &str, base: &str, jti: &str) -> String {
    let claims = json!({"iss": client, "sub": client, "aud": format!("{base}/oauth/token"),
        "exp": now() + 240, "jti": jti});
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    format!(
        "client_assertion_type={ASSERTION_TYPE}&client_assertion={}",
        mint_with(&key, Algorithm::RS384, Some(kid), &claims)
    )
}

/// A client credentials grant with [`assertion`].
fn assertion_grant(pem: &str, kid: &str, client: &str, base: &str, jti: &str) -> String {
    format!(
        "grant_type=client_credentials&{}",
        assertion(pem, kid, client, base, jti)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_backend_clients_introspection_and_revocation_through_the_binary() {
    let dir = scratch("smart-auth");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let running = start(&dir, &upstream);
    let (client, base) = (&running.client, running.base.clone());

    // The tenant alone grants the registered scopes, which are enforced.
    let reply = ask_token(client, "app", TENANT).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], format!("{TENANT} system/Patient.rs"));
    let app_token = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &app_token).await.status,
        StatusCode::OK
    );
    let refused = client.get_bearer("/Observation/1", &app_token).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert!(refused.challenge().contains("insufficient_scope"));
    let forwarded = upstream.received().len();

    // The configured private_key_jwt client: a token, then introspection of the app's token.
    let reply = post(
        client,
        "/oauth/token",
        &assertion_grant(RSA_PRIVATE, "backend-1", "backend", &base, "b-1"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = post(
        client,
        "/oauth/introspect",
        &format!(
            "token={app_token}&{}",
            assertion(RSA_PRIVATE, "backend-1", "backend", &base, "b-2")
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let described = reply.json();
    assert_eq!(described["active"], true);
    assert_eq!(described["client_id"], "app");
    assert_eq!(described["tenant"], TENANT);
    // The same assertion again: a replay.
    let reply = post(
        client,
        "/oauth/introspect",
        &format!(
            "token={app_token}&{}",
            assertion(RSA_PRIVATE, "backend-1", "backend", &base, "b-2")
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());

    // The app revokes its token: refused from the next request, inactive to introspection.
    let reply = post(
        client,
        "/oauth/revoke",
        &format!("token={app_token}&client_id=app&client_secret={SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        client.get_bearer("/Patient/1", &app_token).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reply = post(
        client,
        "/oauth/introspect",
        &format!("token={app_token}&client_id=app&client_secret={SECRET}"),
    )
    .await;
    assert_eq!(reply.json(), json!({"active": false}));
    assert_eq!(
        upstream.received().len(),
        forwarded,
        "nothing refused was forwarded"
    );

    // An administrator registers another backend client with its keys: no secret is shown.
    let admin = [
        ("authorization", &*format!("Bearer {ADMIN_TOKEN}")),
        ("content-type", "application/json"),
    ];
    let body = json!({"tenants": [TENANT], "scopes": ["system/Patient.r"],
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [public_jwk(RSA2_PRIVATE, "ops-1")]}});
    let reply = client
        .send("PUT", "/admin/clients/ops", &admin, &body.to_string())
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let created = reply.json();
    assert_eq!(created["token_endpoint_auth_method"], "private_key_jwt");
    assert!(created.get("client_secret").is_none(), "{created}");
    // It has no secret to reset: a conflict that says so, not "no such client".
    let reply = client
        .send("POST", "/admin/clients/ops/secret", &admin, "")
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    assert!(reply.text().contains("private_key_jwt"), "{}", reply.text());
    let reply = post(
        client,
        "/oauth/token",
        &assertion_grant(RSA2_PRIVATE, "ops-1", "ops", &base, "o-1"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], format!("{TENANT} system/Patient.r"));
    let held = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &held).await.status,
        StatusCode::OK
    );
    // The other backend's key does not make an assertion of this one.
    let reply = post(
        client,
        "/oauth/token",
        &assertion_grant(RSA_PRIVATE, "ops-1", "ops", &base, "o-2"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    // The administrator replaces its keys (its key rotation): the new key works (once the
    // second of the change is over), the old one no longer does, and the token taken with
    // the old one is refused at once.
    let body = json!({"tenants": [TENANT], "scopes": ["system/Patient.r"],
        "jwks": {"keys": [public_jwk(RSA_PRIVATE, "ops-2")]}});
    let reply = client
        .send("PUT", "/admin/clients/ops", &admin, &body.to_string())
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        client.get_bearer("/Patient/1", &held).await.status,
        StatusCode::UNAUTHORIZED
    );
    // (Each attempt a new assertion: a jti is used once.)
    let mut attempt = 0;
    let reply = after_cut_off(async || {
        attempt += 1;
        let jti = format!("o-2-{attempt}");
        let form = assertion_grant(RSA_PRIVATE, "ops-2", "ops", &base, &jti);
        post(client, "/oauth/token", &form).await
    })
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    for (pem, kid, jti, status) in [
        (RSA_PRIVATE, "ops-2", "o-3", StatusCode::OK),
        (RSA2_PRIVATE, "ops-1", "o-4", StatusCode::UNAUTHORIZED),
    ] {
        let reply = post(
            client,
            "/oauth/token",
            &assertion_grant(pem, kid, "ops", &base, jti),
        )
        .await;
        assert_eq!(reply.status, status, "{kid}: {}", reply.text());
    }
    // Keys and a secret at once, a secret or unusable keys for a registered client: refused.
    for (path, body) in [
        (
            "/admin/clients/both",
            json!({"tenants": [TENANT], "client_secret": "a-secret-of-16-or-more",
                "jwks": {"keys": [public_jwk(RSA2_PRIVATE, "x")]}}),
        ),
        (
            "/admin/clients/ops",
            json!({"tenants": [TENANT], "client_secret": "a-secret-of-16-or-more"}),
        ),
        (
            "/admin/clients/ops",
            json!({"tenants": [TENANT], "jwks": {"keys": []}}),
        ),
        (
            "/admin/clients/app",
            json!({"tenants": [TENANT], "jwks": {"keys": [public_jwk(RSA_PRIVATE, "y")]}}),
        ),
        (
            "/admin/clients/symmetric",
            json!({"tenants": [TENANT], "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldA"}]}}),
        ),
    ] {
        let reply = client.send("PUT", path, &admin, &body.to_string()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            reply.text()
        );
    }
    // A body refused for its scopes, or for its keys, changes nothing: the key that worked
    // still does, and the scopes are as they were.
    for body in [
        json!({"tenants": [TENANT], "scopes": ["not a scope"],
            "jwks": {"keys": [public_jwk(RSA2_PRIVATE, "ops-3")]}}),
        json!({"tenants": [TENANT], "scopes": ["system/Observation.r"],
            "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldA"}]}}),
    ] {
        let reply = client
            .send("PUT", "/admin/clients/ops", &admin, &body.to_string())
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    }
    let stored = client.get("/admin/clients/ops", &admin).await.json();
    assert_eq!(stored["scopes"], json!(["system/Patient.r"]), "{stored}");
    let reply = post(
        client,
        "/oauth/token",
        &assertion_grant(RSA_PRIVATE, "ops-2", "ops", &base, "o-5"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // What the SMART configuration advertises.
    let config = client
        .get("/.well-known/smart-configuration", &[])
        .await
        .json();
    assert_eq!(
        config["introspection_endpoint"],
        format!("{base}/oauth/introspect")
    );
    assert_eq!(
        config["revocation_endpoint"],
        format!("{base}/oauth/revoke")
    );
    assert!(config["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "private_key_jwt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_assertion_accepted_before_a_restart_is_refused_after_it() {
    let dir = scratch("smart-auth-replay");
    let upstream = RecordingUpstream::start().await;
    let mut running = start(&dir, &upstream);
    let form = assertion_grant(
        RSA_PRIVATE,
        "backend-1",
        "backend",
        &running.base,
        "before-restart",
    );
    let reply = post(&running.client, "/oauth/token", &form).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A replay: refused as the client's failure.
    let replayed = async |running: &Running| {
        let reply = post(&running.client, "/oauth/token", &form).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
        assert_eq!(reply.json()["error"], "invalid_client");
    };
    replayed(&running).await;
    assert!(running.proc.terminate(), "the gateway did not stop");

    // The same state and address (so the same token URL, the assertion's audience): the port
    // the first start was given, free again now that it has stopped.
    let port = running.client.addr().port();
    let running = start_on(&dir, &upstream, port);
    replayed(&running).await;
    let fresh = assertion_grant(
        RSA_PRIVATE,
        "backend-1",
        "backend",
        &running.base,
        "after-restart",
    );
    let reply = post(&running.client, "/oauth/token", &fresh).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        running.proc.stderr().contains("before a restart"),
        "the replay is not logged as one:\n{}",
        running.proc.stderr()
    );
}

/// A client registered without SMART resource scopes may ask for some while
/// `require_smart_scopes` is off (its tokens are tenant-wide: they narrow them), and not while
/// it is on (its tokens are refused: they would give it access); a token narrowed before a
/// restart that turned the setting on is refused after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_scopes_narrows_only_where_scopes_are_not_required() {
    let dir = scratch("smart-narrowing");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let narrowing = format!("{TENANT}%20system/Patient.r");
    let mut running = start_with(&dir, &upstream, 0, false);
    let client = &running.client;
    let reply = ask_token(client, "open", &narrowing).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], format!("{TENANT} system/Patient.r"));
    let narrowed = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &narrowed).await.status,
        StatusCode::OK
    );
    let refused = client.get_bearer("/Observation/1", &narrowed).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert!(running.proc.terminate(), "the gateway did not stop");

    // The same state (signing keys) and address (issuer), SMART scopes now required.
    let port = running.client.addr().port();
    let running = start_with(&dir, &upstream, port, true);
    let client = &running.client;
    let refused = client.get_bearer("/Patient/1", &narrowed).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert!(
        refused.text().contains("tower_fhir_narrowed"),
        "{}",
        refused.text()
    );
    let reply = ask_token(client, "open", &narrowing).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_scope");
    // The client registered with scopes is unaffected.
    let reply = ask_token(client, "app", TENANT).await;
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
}
