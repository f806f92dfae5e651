//! Token introspection (RFC 7662) and revocation (RFC 7009) through the one-call gateway
//! over real HTTP: what a live token is, that anything else is only `{"active": false}`, that
//! a client revokes only its own tokens, and that the bearer layer refuses a revoked token at
//! once though it had cached it.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use support::*;
use tower_fhir::auth::{BearerAuthLayer, RevocationLog, VerificationKey};
use tower_fhir::gateway::Gateway;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::tenant::TenantScopeLayer;
use tower_fhir::token::{
    ClientStore, InMemoryClientStore, NewClient, SecretHashing, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const ELSEWHERE: &str = "9b2e1c3d-0000-4000-8000-00000000000b";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "introspecting-client-secret-0123";
const OTHER_SECRET: &str = "another-client-secret-0123456789";

struct Setup {
    client: TestClient,
    base: String,
    upstream: RecordingUpstream,
    /// The token endpoint's revoked list.
    revoked: tower_fhir::auth::RevokedTokens,
}

async fn setup() -> Setup {
    setup_logging_to(None).await
}

/// A revocation log whose records fail while `failing` is set; the `jti`s it recorded.
#[derive(Clone, Default)]
struct FlakyLog {
    failing: Arc<AtomicBool>,
    recorded: Arc<Mutex<Vec<String>>>,
}

impl RevocationLog for FlakyLog {
    fn record(
        &self,
        _issuer: Option<&str>,
        jti: &str,
        _expires_at: u64,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let result = if self.failing.load(Ordering::SeqCst) {
            Err("the disk is full".to_owned())
        } else {
            self.recorded.lock().unwrap().push(jti.to_owned());
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

async fn setup_logging_to(log: Option<FlakyLog>) -> Setup {
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TENANT.parse().unwrap(),
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
            .unwrap(),
    );
    let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    for (id, secret, lifetime) in [
        ("app", SECRET, None),
        ("other", OTHER_SECRET, None),
        // Three seconds: token times are whole seconds, so a token issued late in a second
        // has at least two left (one second could leave it a few milliseconds).
        ("brief", OTHER_SECRET, Some(Duration::from_secs(3))),
        // Another customer's client.
        ("elsewhere", OTHER_SECRET, None),
    ] {
        let tenant = if id == "elsewhere" { ELSEWHERE } else { TENANT };
        let mut client = NewClient::new(id)
            .secret(secret)
            .tenant(tenant.parse().unwrap())
            .scope("system/Patient.rs");
        if let Some(lifetime) = lifetime {
            client = client.token_lifetime(lifetime);
        }
        store.register(client).await.unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(store);
    if let Some(log) = log {
        endpoint = endpoint.revocation_log(log);
    }
    let endpoint = endpoint.build().unwrap();
    let revoked = endpoint.revoked_tokens().clone();
    let gateway = Gateway::builder(&base)
        .directory(directory)
        .token_endpoint(endpoint)
        // A second issuer, whose tokens the gateway accepts but does not introspect.
        .auth(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
                .issuer("https://auth.test")
                .audience_for_issuer("https://auth.test", "tower-fhir"),
        )
        // The tests' issuer mints tokens naming any tenant.
        .tenant(TenantScopeLayer::builder().issuer_any_tenant("https://auth.test"))
        .build()
        .unwrap();
    Setup {
        client: TestClient::new(serve_tower_on(listener, gateway)),
        base,
        upstream,
        revoked,
    }
}

/// While the revoked list is staler than it may be (a replica cut off from the others'
/// revocations), no token is vouched for: introspection says inactive, the bearer layer `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_revoked_list_vouches_for_no_token() {
    let Setup {
        client, revoked, ..
    } = setup().await;
    let live = token(&client, "app", SECRET).await;
    assert_eq!(introspect(&client, &live).await["active"], true);
    revoked.set_max_staleness(Some(Duration::from_secs(5)));
    assert_eq!(introspect(&client, &live).await, json!({"active": false}));
    assert_eq!(
        client.get_bearer("/Patient/1", &live).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    revoked.confirm_current(std::time::Instant::now());
    assert_eq!(introspect(&client, &live).await["active"], true);
    assert_eq!(
        client.get_bearer("/Patient/1", &live).await.status,
        StatusCode::OK
    );
}

async fn post(client: &TestClient, path: &str, form: &str) -> Reply {
    client.send("POST", path, &[FORM], form).await
}

async fn token(client: &TestClient, id: &str, secret: &str) -> String {
    let reply = post(
        client,
        "/oauth/token",
        &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

async fn introspect(client: &TestClient, token: &str) -> Value {
    introspect_as(client, "other", token).await
}

async fn introspect_as(client: &TestClient, asking: &str, token: &str) -> Value {
    let reply = post(
        client,
        "/oauth/introspect",
        &format!("token={token}&client_id={asking}&client_secret={OTHER_SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "no-store");
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_describes_live_tokens_and_nothing_else() {
    let Setup { client, base, .. } = setup().await;
    let live = token(&client, "app", SECRET).await;
    let answer = introspect(&client, &live).await;
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["client_id"], "app");
    assert_eq!(answer["sub"], "app");
    assert_eq!(answer["iss"], base.as_str());
    assert_eq!(answer["aud"], "tower-fhir");
    assert_eq!(answer["tenant"], TENANT);
    assert_eq!(answer["scope"], format!("{TENANT} system/Patient.rs"));
    assert_eq!(answer["token_type"], "Bearer");
    let (exp, iat) = (
        answer["exp"].as_u64().unwrap(),
        answer["iat"].as_u64().unwrap(),
    );
    assert!(exp > now() && iat <= now() && exp - iat == 3600, "{answer}");

    // Another issuer's token (which the bearer layer accepts), a forged one with our issuer,
    // garbage, `alg: none`, an empty token, an expired one: inactive, and nothing more.
    let foreign = mint(Algorithm::HS256, None, &claims());
    let mut forged_claims = claims();
    forged_claims["iss"] = json!(base);
    let forged = mint(Algorithm::HS256, None, &forged_claims);
    let header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64_url(forged_claims.to_string().as_bytes());
    let none = format!("{header}.{payload}.");
    let brief = token(&client, "brief", OTHER_SECRET).await;
    assert_eq!(introspect(&client, &brief).await["active"], true);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for token in [&foreign, &forged, &none, "garbage", "", &brief] {
        assert_eq!(
            introspect(&client, token).await,
            json!({"active": false}),
            "{token}"
        );
    }

    // Another customer's client learns nothing of the token, not even that it is live; of
    // its own, all.
    assert_eq!(
        introspect_as(&client, "elsewhere", &live).await,
        json!({"active": false})
    );
    let own = token(&client, "elsewhere", OTHER_SECRET).await;
    let answer = introspect_as(&client, "elsewhere", &own).await;
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["tenant"], ELSEWHERE);

    // Without a token to look at: invalid_request.
    let reply = post(
        &client,
        "/oauth/introspect",
        &format!("client_id=other&client_secret={OTHER_SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"], "invalid_request");

    // Only registered clients may ask; a wrong secret is invalid_client.
    let reply = post(&client, "/oauth/introspect", &format!("token={live}")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"], "invalid_client");
    let reply = post(
        &client,
        "/oauth/introspect",
        &format!("token={live}&client_id=other&client_secret=wrong-secret-0123456789"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"], "invalid_client");
    let reply = client.get("/oauth/introspect", &[]).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);

    // The SMART configuration names both endpoints.
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_at_once_cached_or_not() {
    let Setup {
        client, upstream, ..
    } = setup().await;
    let mine = token(&client, "app", SECRET).await;
    let kept = token(&client, "app", SECRET).await;
    // Used once, so the bearer layer has it cached.
    assert_eq!(
        client.get_bearer("/Patient/1", &mine).await.status,
        StatusCode::OK
    );

    // Another client cannot revoke it: refused, and the token keeps working.
    let reply = post(
        &client,
        "/oauth/revoke",
        &format!("token={mine}&client_id=other&client_secret={OTHER_SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"], "unauthorized_client");
    assert_eq!(
        client.get_bearer("/Patient/1", &mine).await.status,
        StatusCode::OK
    );

    // Its own client revokes it (with the optional hint): refused from the next request.
    let seen = upstream.received().len();
    let reply = post(
        &client,
        "/oauth/revoke",
        &format!("token={mine}&token_type_hint=access_token&client_id=app&client_secret={SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = client.get_bearer("/Patient/1", &mine).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(
        reply.challenge().contains("invalid_token"),
        "{}",
        reply.challenge()
    );
    assert!(reply.text().contains("revoked"), "{}", reply.text());
    assert_eq!(
        upstream.received().len(),
        seen,
        "the revoked token reached the upstream"
    );
    assert_eq!(introspect(&client, &mine).await, json!({"active": false}));
    // The client's other token is untouched.
    assert_eq!(
        client.get_bearer("/Patient/1", &kept).await.status,
        StatusCode::OK
    );

    // Nothing to revoke (garbage, another issuer's token, already revoked): 200 all the same.
    for token in ["garbage", &mint(Algorithm::HS256, None, &claims()), &mine] {
        let reply = post(
            &client,
            "/oauth/revoke",
            &format!("token={token}&client_id=app&client_secret={SECRET}"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{token}: {}", reply.text());
    }
    // Revocation needs the client's credentials and a token.
    let reply = post(&client, "/oauth/revoke", &format!("token={kept}")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = post(
        &client,
        "/oauth/revoke",
        &format!("client_id=app&client_secret={SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"], "invalid_request");
    assert_eq!(
        client.get_bearer("/Patient/1", &kept).await.status,
        StatusCode::OK
    );
}

/// A revocation the log could not record is `503`, "retry": the token is refused here at once,
/// and the retry, though the token is revoked here already, is recorded before its `200`
/// (answered without it, the revocation was lost at the next restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_retried_after_the_log_failed_is_recorded() {
    let log = FlakyLog::default();
    let Setup { client, .. } = setup_logging_to(Some(log.clone())).await;
    let mine = token(&client, "app", SECRET).await;
    let revoke = format!("token={mine}&client_id=app&client_secret={SECRET}");
    log.failing.store(true, Ordering::SeqCst);
    let reply = post(&client, "/oauth/revoke", &revoke).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "temporarily_unavailable");
    assert_eq!(
        client.get_bearer("/Patient/1", &mine).await.status,
        StatusCode::UNAUTHORIZED,
        "refused here at once"
    );
    assert!(log.recorded.lock().unwrap().is_empty());
    // Still failing: still 503, never a 200 without the record.
    let reply = post(&client, "/oauth/revoke", &revoke).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    log.failing.store(false, Ordering::SeqCst);
    let reply = post(&client, "/oauth/revoke", &revoke).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        log.recorded.lock().unwrap().len(),
        1,
        "the retry recorded it"
    );
    // Recorded once: revoked again, it is not recorded again (every retry of a client would
    // add a line, or a notice to every replica).
    let reply = post(&client, "/oauth/revoke", &revoke).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(log.recorded.lock().unwrap().len(), 1);
    let other = token(&client, "app", SECRET).await;
    let revoke = format!("token={other}&client_id=app&client_secret={SECRET}");
    for _ in 0..3 {
        let reply = post(&client, "/oauth/revoke", &revoke).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(log.recorded.lock().unwrap().len(), 2);
}

fn base64_url(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_expiry_but_within_the_leeway_can_still_be_revoked() {
    let Setup { client, .. } = setup().await;
    let brief = token(&client, "brief", OTHER_SECRET).await;
    // Expired (three seconds at most), but within the bearer layer's leeway (a minute): taken.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(introspect(&client, &brief).await, json!({"active": false}));
    assert_eq!(
        client.get_bearer("/Patient/1", &brief).await.status,
        StatusCode::OK
    );
    // Its client revokes it: refused from then on, though it has expired.
    let reply = post(
        &client,
        "/oauth/revoke",
        &format!("token={brief}&client_id=brief&client_secret={OTHER_SECRET}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = client.get_bearer("/Patient/1", &brief).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
}
