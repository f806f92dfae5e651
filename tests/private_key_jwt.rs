//! `private_key_jwt` client authentication (RFC 7523, SMART Backend Services) through the
//! one-call gateway over real HTTP: clients registered with an inline JWK Set and with a
//! `jwks_uri` get tokens, introspect and revoke with signed assertions, and every attack on
//! an assertion is the same bare `401 invalid_client`.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use support::*;
use tower_fhir::gateway::Gateway;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::token::{
    ClientKeys, ClientStore, InMemoryClientStore, NewClient, ReplayGuard, SecretHashing,
    ThrottlePolicy, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

struct Setup {
    client: TestClient,
    token_url: String,
    /// The gateway's client store (clones share it).
    store: InMemoryClientStore,
    _keys: JwksServer,
}

/// The public JWK of a private key, without `alg` (the key serves every algorithm of its kind).
fn public_jwk(private_pem: &str, kid: &str) -> Value {
    let mut jwk = rsa_jwk(private_pem, kid);
    jwk.as_object_mut().unwrap().remove("alg");
    jwk
}

async fn setup() -> Setup {
    setup_with(None).await
}

/// A replay guard that fails its first `failures` checks (a database or disk that is away),
/// then says every `jti` is new.
struct FlakyGuard {
    failures: AtomicU64,
}

impl ReplayGuard for FlakyGuard {
    fn first_use(
        &self,
        _client: &str,
        _jti: &str,
        _until: u64,
    ) -> futures::future::BoxFuture<'static, Result<bool, String>> {
        let failing = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if failing {
                Err("the guard is away".to_owned())
            } else {
                Ok(true)
            }
        })
    }
}

async fn setup_with(guard: Option<FlakyGuard>) -> Setup {
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
    let remote_keys = JwksServer::start(vec![public_jwk(RSA2_PRIVATE, "remote-1")]).await;
    let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    let tenant = TENANT.parse().unwrap();
    let inline = store
        .register(
            NewClient::new("backend")
                .tenant(tenant)
                .scope("system/Patient.rs")
                .jwks(json!({"keys": [public_jwk(RSA_PRIVATE, "inline-1")]})),
        )
        .await
        .unwrap();
    assert!(inline.is_empty(), "a private_key_jwt client has no secret");
    store
        .register(
            NewClient::new("remote")
                .tenant(tenant)
                .jwks_uri(remote_keys.url()),
        )
        .await
        .unwrap();
    store
        .register(
            NewClient::new("secret-app")
                .tenant(tenant)
                .secret("a-secret-of-16-or-more-chars"),
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(store.clone())
        // The attacks below come from one address: let them all be answered, not throttled.
        .throttle(ThrottlePolicy {
            max_failures: 1000,
            ..ThrottlePolicy::default()
        });
    let endpoint = match guard {
        Some(guard) => endpoint.assertion_replay_guard(guard),
        None => endpoint,
    }
    .build()
    .unwrap();
    let token_url = endpoint.token_url().to_owned();
    assert_eq!(token_url, format!("{base}/oauth/token"));
    let gateway = Gateway::builder(&base)
        .directory(directory)
        .token_endpoint(endpoint)
        .build()
        .unwrap();
    Setup {
        client: TestClient::new(serve_tower_on(listener, gateway)),
        token_url,
        store,
        _keys: remote_keys,
    }
}

fn jti() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("jti-{}-{}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Good assertion claims for `client` at `aud`.
fn assertion_claims(client: &str, aud: &str) -> Value {
    json!({"iss": client, "sub": client, "aud": aud, "exp": now() + 240, "iat": now(), "jti": jti()})
}

fn sign(pem: &str, alg: Algorithm, kid: &str, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    mint_with(&key, alg, Some(kid), claims)
}

async fn post(client: &TestClient, path: &str, form: &str) -> Reply {
    client.send("POST", path, &[FORM], form).await
}

async fn token_with(client: &TestClient, assertion: &str, extra: &str) -> Reply {
    post(
        client,
        "/oauth/token",
        &format!("grant_type=client_credentials&client_assertion_type={ASSERTION_TYPE}&client_assertion={assertion}{extra}"),
    )
    .await
}

fn assert_refused(reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "{what}: {}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "invalid_client", "{what}");
    // Nothing that tells an attacker which check failed.
    assert_eq!(
        reply.json()["error_description"],
        "Client authentication failed",
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_assertions_authenticate_backend_clients() {
    let Setup {
        client, token_url, ..
    } = setup().await;
    // RS384, as SMART Backend Services asks, with the client id in the form too.
    let assertion = sign(
        RSA_PRIVATE,
        Algorithm::RS384,
        "inline-1",
        &assertion_claims("backend", &token_url),
    );
    let reply = token_with(
        &client,
        &assertion,
        &format!("&client_id=backend&scope={TENANT}%20system/Patient.r"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], format!("{TENANT} system/Patient.r"));
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );

    // The same client introspects and revokes with fresh assertions.
    let fresh = |claims: Value| sign(RSA_PRIVATE, Algorithm::RS256, "inline-1", &claims);
    let auth = |assertion: String| {
        format!("client_assertion_type={ASSERTION_TYPE}&client_assertion={assertion}")
    };
    let reply = post(
        &client,
        "/oauth/introspect",
        &format!(
            "token={token}&{}",
            auth(fresh(assertion_claims("backend", &token_url)))
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["active"], true);
    assert_eq!(reply.json()["client_id"], "backend");
    let reply = post(
        &client,
        "/oauth/revoke",
        &format!(
            "token={token}&{}",
            auth(fresh(assertion_claims("backend", &token_url)))
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A client whose keys are at a jwks_uri (fetched on first use).
    let assertion = sign(
        RSA2_PRIVATE,
        Algorithm::PS256,
        "remote-1",
        &assertion_claims("remote", &token_url),
    );
    let reply = token_with(&client, &assertion, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // The SMART configuration says how.
    let config = client
        .get("/.well-known/smart-configuration", &[])
        .await
        .json();
    assert_eq!(
        config["token_endpoint_auth_methods_supported"],
        json!([
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt"
        ])
    );
    let algs = config["token_endpoint_auth_signing_alg_values_supported"].clone();
    assert!(
        algs.as_array().unwrap().iter().any(|a| a == "RS384")
            && algs.as_array().unwrap().iter().any(|a| a == "ES384"),
        "{algs}"
    );
    for capability in [
        "client-confidential-asymmetric",
        "client-confidential-symmetric",
        "permission-v1",
        "permission-v2",
    ] {
        assert!(
            config["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == capability),
            "{capability}: {config}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_on_an_assertion_is_a_bare_invalid_client() {
    let Setup {
        client, token_url, ..
    } = setup().await;
    let good = |claims: &Value| sign(RSA_PRIVATE, Algorithm::RS384, "inline-1", claims);

    // A replayed assertion: the first use works, the second is refused.
    let once = good(&assertion_claims("backend", &token_url));
    assert_eq!(token_with(&client, &once, "").await.status, StatusCode::OK);
    // The token URL alone in an array is still one audience.
    let mut alone = assertion_claims("backend", &token_url);
    alone["aud"] = json!([token_url]);
    let alone = good(&alone);
    assert_eq!(token_with(&client, &alone, "").await.status, StatusCode::OK);
    assert_refused(&token_with(&client, &once, "").await, "replayed jti");

    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = assertion_claims("backend", &token_url);
        change(&mut claims);
        claims
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong aud",
            good(&with(&|c| {
                c["aud"] = json!("https://elsewhere.example/token")
            })),
        ),
        (
            "aud the issuer, not the token URL",
            good(&with(&|c| {
                c["aud"] = json!(token_url.trim_end_matches("/oauth/token"))
            })),
        ),
        (
            // Any other server it names could replay it here (RFC 7523bis: one audience).
            "aud the token URL among others",
            good(&with(&|c| {
                c["aud"] = json!([token_url, "https://other-as.example/token"])
            })),
        ),
        (
            "iss an array holding the client",
            good(&with(&|c| c["iss"] = json!(["backend", "someone-else"]))),
        ),
        (
            "exp too far ahead",
            good(&with(&|c| c["exp"] = json!(now() + 600))),
        ),
        ("expired", good(&with(&|c| c["exp"] = json!(now() - 120)))),
        (
            "made in the future",
            good(&with(&|c| c["iat"] = json!(now() + 3_000))),
        ),
        (
            // Read as no `iat` at all, it passed the check of its value.
            "made in the future, the iat a string",
            good(&with(&|c| c["iat"] = json!((now() + 3_000).to_string()))),
        ),
        (
            "not valid yet",
            good(&with(&|c| c["nbf"] = json!(now() + 120))),
        ),
        (
            "no jti",
            good(&with(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            })),
        ),
        (
            "a jti with a NUL (no store can keep it)",
            good(&with(&|c| c["jti"] = json!("a\u{0}b"))),
        ),
        (
            "iss not the client",
            good(&with(&|c| c["iss"] = json!("someone-else"))),
        ),
        (
            "sub not the client",
            good(&with(&|c| c["sub"] = json!("secret-app"))),
        ),
        (
            "unknown kid",
            sign(
                RSA_PRIVATE,
                Algorithm::RS384,
                "never-registered",
                &assertion_claims("backend", &token_url),
            ),
        ),
        (
            "a key of another client",
            sign(
                RSA2_PRIVATE,
                Algorithm::RS384,
                "inline-1",
                &assertion_claims("backend", &token_url),
            ),
        ),
        (
            "an EC key nobody registered",
            sign(
                EC_PRIVATE,
                Algorithm::ES256,
                "inline-1",
                &assertion_claims("backend", &token_url),
            ),
        ),
        (
            "HMAC with the public key",
            mint_with(
                &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
                Algorithm::HS256,
                Some("inline-1"),
                &assertion_claims("backend", &token_url),
            ),
        ),
        ("alg none", {
            let encode = |v: &Value| {
                base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    v.to_string(),
                )
            };
            format!(
                "{}.{}.",
                encode(&json!({"alg": "none", "kid": "inline-1"})),
                encode(&assertion_claims("backend", &token_url))
            )
        }),
        ("a tampered payload", {
            let signed = good(&assertion_claims("backend", &token_url));
            let parts: Vec<&str> = signed.split('.').collect();
            let forged = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                with(&|c| c["exp"] = json!(now() + 240)).to_string(),
            );
            format!("{}.{forged}.{}", parts[0], parts[2])
        }),
        (
            "an assertion for a secret client",
            sign(
                RSA_PRIVATE,
                Algorithm::RS384,
                "inline-1",
                &assertion_claims("secret-app", &token_url),
            ),
        ),
        (
            "an assertion for an unknown client",
            sign(
                RSA_PRIVATE,
                Algorithm::RS384,
                "inline-1",
                &assertion_claims("nobody", &token_url),
            ),
        ),
        ("garbage", "not-a-jwt".to_owned()),
    ];
    for (what, assertion) in &cases {
        assert_refused(&token_with(&client, assertion, "").await, what);
    }
    // client_id in the form naming another client than the assertion.
    let assertion = good(&assertion_claims("backend", &token_url));
    assert_refused(
        &token_with(&client, &assertion, "&client_id=secret-app").await,
        "client_id mismatch",
    );

    // A private_key_jwt client has no secret to authenticate with.
    let reply = post(
        &client,
        "/oauth/token",
        "grant_type=client_credentials&client_id=backend&client_secret=",
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    // Malformed requests: a wrong assertion type, an assertion without its type, both methods.
    for form in [
        format!("grant_type=client_credentials&client_assertion_type=urn:other&client_assertion={assertion}"),
        format!("grant_type=client_credentials&client_assertion={assertion}"),
        format!("grant_type=client_credentials&client_assertion_type={ASSERTION_TYPE}&client_assertion={assertion}&client_secret=x"),
    ] {
        let reply = post(&client, "/oauth/token", &form).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{form}: {}", reply.text());
        assert_eq!(reply.json()["error"], "invalid_request");
    }
    // After all that, a good assertion still works.
    let assertion = good(&assertion_claims("backend", &token_url));
    assert_eq!(
        token_with(&client, &assertion, "").await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_made_by_pyjwt_authenticate() {
    // An independent JOSE implementation makes the keys and signs the assertions.
    pyjwt_installed();
    let Setup {
        client,
        token_url,
        store,
        ..
    } = setup().await;
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/assert_pyjwt.py"
        ))
        .args(["py-backend", &token_url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "assert_pyjwt.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    let assertions = made["assertions"].as_object().unwrap();
    // Not registered yet: refused.
    let first = assertions["ES384"].as_str().unwrap();
    assert_refused(&token_with(&client, first, "").await, "unknown client");
    store
        .register(
            NewClient::new("py-backend")
                .tenant(TENANT.parse().unwrap())
                .jwks(made["jwks"].clone()),
        )
        .await
        .unwrap();
    for (alg, assertion) in assertions {
        let reply = token_with(&client, assertion.as_str().unwrap(), "").await;
        assert_eq!(reply.status, StatusCode::OK, "{alg}: {}", reply.text());
    }
    assert_eq!(assertions.len(), 4, "{assertions:?}");
}

/// Keys replaced while an assertion is being checked (its `jwks_uri` slow to answer, the old
/// key still there): the client is read again once the assertion is verified, and no token
/// comes of a key the administrator has just replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_replaced_during_the_check_refuse_the_token() {
    let Setup {
        client,
        token_url,
        store,
        _keys: keys,
    } = setup().await;
    keys.set_delay(std::time::Duration::from_millis(600));
    let assertion = sign(
        RSA2_PRIVATE,
        Algorithm::PS256,
        "remote-1",
        &assertion_claims("remote", &token_url),
    );
    let replaced = json!({"keys": [public_jwk(RSA_PRIVATE, "replacement-1")]});
    let (reply, ()) = tokio::join!(token_with(&client, &assertion, ""), async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        store
            .set_keys("remote", ClientKeys::Jwks(replaced.clone()))
            .await
            .unwrap();
    });
    assert!(keys.hits() >= 1, "the jwks_uri was not fetched");
    assert_refused(
        &reply,
        "an assertion checked against keys replaced meanwhile",
    );
    // The replacement key works.
    keys.set_delay(std::time::Duration::ZERO);
    let assertion = sign(
        RSA_PRIVATE,
        Algorithm::PS256,
        "replacement-1",
        &assertion_claims("remote", &token_url),
    );
    let reply = token_with(&client, &assertion, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_the_replay_guard_could_not_record_is_taken_when_retried() {
    let Setup {
        client, token_url, ..
    } = setup_with(Some(FlakyGuard {
        failures: AtomicU64::new(1),
    }))
    .await;
    let assertion = sign(
        RSA_PRIVATE,
        Algorithm::RS384,
        "inline-1",
        &assertion_claims("backend", &token_url),
    );
    // The guard away: 503, retry shortly.
    let reply = token_with(&client, &assertion, "").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    // The retry, with the same assertion, is no replay: it was never accepted.
    let reply = token_with(&client, &assertion, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Accepted now: a replay from here on.
    assert_refused(&token_with(&client, &assertion, "").await, "a replay");
}
