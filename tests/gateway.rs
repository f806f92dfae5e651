//! The one-call gateway over real HTTP on loopback: metadata without a token, the token
//! endpoint and its JWKS, a tenant's request reaching its upstream, a second identity provider
//! with its own audience, the client rotating its own secret, and directory changes taking
//! effect at once.

mod support;

use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use support::*;
use tower_fhir::auth::BearerAuthLayer;
use tower_fhir::gateway::{ConfigError, Gateway};
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::token::{
    ClientStore, InMemoryClientStore, NewClient, SecretHashing, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const OTHER: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "the-first-secret-0123456789";

fn tenant(text: &str) -> TenantId {
    TenantId::parse(text).unwrap()
}

struct Setup {
    client: TestClient,
    base: String,
    keys: tower_fhir::token::SigningKeys,
    upstream: RecordingUpstream,
    directory: InMemoryDirectory,
}

async fn setup(idp: Option<&JwksServer>) -> Setup {
    let upstream = RecordingUpstream::start().await;
    let directory = InMemoryDirectory::new();
    directory.upsert(
        tenant(TENANT),
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::Stu3).unwrap()])
            .unwrap(),
    );
    let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    store
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(tenant(TENANT))
                .tenant(tenant(OTHER)),
        )
        .await
        .unwrap();
    // The address is known before the gateway is built, so its URLs can name it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(store)
        .build()
        .unwrap();
    let keys = endpoint.signing_keys().clone();
    let mut auth = BearerAuthLayer::builder();
    let mut tenants = TenantScopeLayer::builder();
    if let Some(idp) = idp {
        auth = auth
            .jwks_url_for_issuer(idp.url(), "https://idp.test")
            .audience_for_issuer("https://idp.test", "api://fhir");
        // The provider may name this tenant only.
        tenants = tenants.issuer_tenants("https://idp.test", [tenant(TENANT)]);
    }
    let gateway = Gateway::builder(&base)
        .directory(directory.clone())
        .follow(directory.subscribe())
        .token_endpoint(endpoint)
        .auth(auth)
        .tenant(tenants)
        .build()
        .unwrap();
    let served = serve_tower_on(listener, gateway);
    Setup {
        client: TestClient::new(served),
        base,
        keys,
        upstream,
        directory,
    }
}

async fn token(client: &TestClient, secret: &str, scope: &str) -> Reply {
    client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id=app&client_secret={secret}&scope={scope}"
            ),
        )
        .await
}

async fn access_token(client: &TestClient, secret: &str, scope: &str) -> String {
    let reply = token(client, secret, scope).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_whole_client_sequence() {
    let Setup {
        client,
        base,
        upstream,
        ..
    } = setup(None).await;

    // Metadata needs no token and names the token endpoint.
    let reply = client.get("/metadata", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let statement = reply.json();
    let uris = &statement["rest"][0]["security"]["extension"][0]["extension"];
    assert_eq!(uris[0]["url"], "token");
    assert_eq!(uris[0]["valueUri"], format!("{base}/oauth/token"));
    let smart = client
        .get("/.well-known/smart-configuration", &[])
        .await
        .json();
    assert_eq!(smart["token_endpoint"], format!("{base}/oauth/token"));
    assert_eq!(smart["jwks_uri"], format!("{base}/.well-known/jwks.json"));
    assert!(
        upstream.received().is_empty(),
        "metadata reached the upstream"
    );

    // The JWKS holds the public key only.
    let jwks = client.get("/.well-known/jwks.json", &[]).await;
    assert_eq!(jwks.status, StatusCode::OK);
    let key = &jwks.json()["keys"][0];
    assert_eq!(key["alg"], "ES256");
    assert!(key.get("d").is_none());

    // A token for the tenant, then a request that reaches the tenant's upstream untouched.
    let token = access_token(&client, SECRET, TENANT).await;
    let reply = client
        .send(
            "POST",
            "/Patient/_search",
            &[("authorization", &format!("Bearer {token}")), FORM],
            "family=chalmers&_count=10",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let received = upstream.last();
    assert_eq!(received.target, "/fhir/Patient/_search");
    assert_eq!(received.body, "family=chalmers&_count=10");
    assert!(
        received.headers.get("authorization").is_none(),
        "the client's token leaked upstream"
    );

    // A tenant with no upstream is refused; no token at all is 401.
    let other = access_token(&client, SECRET, OTHER).await;
    assert_eq!(
        client.get_bearer("/Patient/1", &other).await.status,
        StatusCode::FORBIDDEN
    );
    let reply = client.get("/Patient/1", &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.challenge().starts_with("Bearer"));
}

#[tokio::test]
async fn the_endpoints_keys_vouch_for_its_typed_access_tokens_only() {
    let Setup { client, keys, .. } = setup(None).await;
    let token = access_token(&client, SECRET, TENANT).await;
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    // The same claims under the same key, typed `at+jwt` as the endpoint signs them, pass; as
    // any other JWT the keys sign (`SigningKeys::sign`: `typ: JWT`), they are no access token.
    let typed = keys.sign_access_token(&claims).unwrap();
    assert_eq!(
        client.get_bearer("/Patient/1", &typed).await.status,
        StatusCode::OK
    );
    let other = keys.sign(&claims).unwrap();
    let reply = client.get_bearer("/Patient/1", &other).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert!(
        reply
            .challenge()
            .contains("The token's type (typ) is not one accepted for access tokens"),
        "{}",
        reply.challenge()
    );
}

#[tokio::test]
async fn a_client_rotates_its_own_secret() {
    let Setup { client, .. } = setup(None).await;
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("app:{SECRET}")
        )
    );

    // Wrong secret, someone else's path, wrong method: refused, nothing changes.
    let reply = client
        .send(
            "POST",
            "/oauth/clients/app/secret",
            &[FORM],
            "client_secret=wrong-secret-0123456",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"], "invalid_client");
    let reply = client
        .send(
            "POST",
            "/oauth/clients/someone-else/secret",
            &[("authorization", &basic)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = client
        .get("/oauth/clients/app/secret", &[("authorization", &basic)])
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(token(&client, SECRET, TENANT).await.status, StatusCode::OK);

    // Basic authentication with the current secret, no body.
    let reply = client
        .send(
            "POST",
            "/oauth/clients/app/secret",
            &[("authorization", &basic)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "no-store");
    let new_secret = reply.json()["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(reply.json()["client_id"], "app");
    assert_ne!(new_secret, SECRET);

    // The old secret stops working at once; the new one works.
    assert_eq!(
        token(&client, SECRET, TENANT).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token(&client, &new_secret, TENANT).await.status,
        StatusCode::OK
    );

    // The form way, with the new secret.
    let reply = client
        .send(
            "POST",
            "/oauth/clients/app/secret",
            &[FORM],
            &format!("client_secret={new_secret}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        token(&client, &new_secret, TENANT).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_trusted_identity_provider_with_its_own_audience() {
    let idp = JwksServer::start(vec![rsa_jwk(RSA2_PRIVATE, "idp-1")]).await;
    let Setup { client, .. } = setup(Some(&idp)).await;
    let key = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
    let idp_token_for = |aud: &str, tenant: &str| {
        let claims = json!({"iss": "https://idp.test", "aud": aud, "sub": "svc",
                            "exp": now() + 600, "iat": now(), "scope": tenant});
        mint_with(&key, Algorithm::RS256, Some("idp-1"), &claims)
    };
    let idp_token = |aud: &str| idp_token_for(aud, TENANT);
    assert_eq!(
        client
            .get_bearer("/Patient/1", &idp_token("api://fhir"))
            .await
            .status,
        StatusCode::OK
    );
    // The gateway's own audience is not the provider's.
    assert_eq!(
        client
            .get_bearer("/Patient/1", &idp_token("tower-fhir"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Nor may it name a tenant it is not bound to.
    assert_eq!(
        client
            .get_bearer("/Patient/1", &idp_token_for("api://fhir", OTHER))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // And the gateway's own tokens still work beside it.
    let own = access_token(&client, SECRET, TENANT).await;
    assert_eq!(
        client.get_bearer("/Patient/1", &own).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn directory_changes_take_effect_at_once() {
    let Setup {
        client,
        upstream,
        directory,
        ..
    } = setup(None).await;
    let token = access_token(&client, SECRET, TENANT).await;
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    let second = RecordingUpstream::start().await;
    directory.upsert(
        tenant(TENANT),
        TenantRecord::new([Upstream::parse(&second.base("/r3"), FhirVersion::Stu3).unwrap()])
            .unwrap(),
    );
    // The routing cache hears of the change from the directory's change feed, on a task of
    // its own, which a busy machine may run a while later than a fixed sleep allows: the
    // change is waited for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while second.received().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new upstream was not used"
        );
        assert_eq!(
            client.get_bearer("/Patient/2", &token).await.status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(second.last().target, "/r3/Patient/2");
    // From then on every request goes to the new upstream.
    let before = upstream.received().len();
    for _ in 0..3 {
        assert_eq!(
            client.get_bearer("/Patient/2", &token).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(upstream.received().len(), before);
    assert_eq!(second.received().len(), 4);
    directory.remove(tenant(TENANT));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get_bearer("/Patient/3", &token).await.status;
        if status == StatusCode::FORBIDDEN {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed tenant was still routed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And stays refused.
    assert_eq!(
        client.get_bearer("/Patient/3", &token).await.status,
        StatusCode::FORBIDDEN
    );
}

#[test]
fn configuration_errors_surface_when_built() {
    let no_directory = Gateway::builder("http://127.0.0.1:8080")
        .token_url("http://x/token")
        .build();
    assert!(matches!(no_directory, Err(ConfigError::NoDirectory)));
    let no_token_url = Gateway::builder("http://127.0.0.1:8080")
        .directory(InMemoryDirectory::new())
        .build();
    assert!(matches!(no_token_url, Err(ConfigError::NoTokenUrl)));
    let bad_base = Gateway::builder("gateway.example")
        .directory(InMemoryDirectory::new())
        .token_url("http://x/token")
        .build();
    assert!(matches!(bad_base, Err(ConfigError::InvalidBaseUrl(_))));
    // The same for a layer over a service of one's own, which has no proxy to refuse it; a
    // password is not shown.
    for base in [
        "gateway.example",
        "https://user:secret-pw@gateway.example",
        "https://gateway.example/fhir?x=1",
        "https://gateway.example/fhir#top",
    ] {
        let refused = Gateway::builder(base)
            .directory(InMemoryDirectory::new())
            .token_url("http://x/token")
            .build_layer();
        match refused {
            Err(error @ ConfigError::InvalidBaseUrl(_)) => {
                assert!(!error.to_string().contains("secret-pw"), "{error}")
            }
            other => panic!("{base}: {:?}", other.err()),
        }
    }
    let no_keys = Gateway::builder("http://127.0.0.1:8080")
        .directory(InMemoryDirectory::new())
        .token_url("http://x/token")
        .build();
    assert!(matches!(no_keys, Err(ConfigError::Auth(_))), "{no_keys:?}");
    let follow_without_runtime = Gateway::builder("http://127.0.0.1:8080")
        .directory(InMemoryDirectory::new())
        .follow(InMemoryDirectory::new().subscribe())
        .token_url("http://x/token")
        .build();
    assert!(matches!(
        follow_without_runtime,
        Err(ConfigError::NoRuntime)
    ));
    // Beside the token endpoint, another issuer must be told which tenants it may name.
    let endpoint = || {
        TokenEndpoint::builder()
            .issuer("http://127.0.0.1:8080")
            .audience("tower-fhir")
            .store(InMemoryClientStore::new())
            .build()
            .unwrap()
    };
    let other = || {
        BearerAuthLayer::builder()
            .key(tower_fhir::auth::VerificationKey::hmac(HMAC_SECRET).unwrap())
            .issuer("https://idp.test")
    };
    let unbound = Gateway::builder("http://127.0.0.1:8080")
        .directory(InMemoryDirectory::new())
        .token_endpoint(endpoint())
        .auth(other())
        .build();
    match unbound {
        Err(ConfigError::UnboundIssuer(issuer)) => assert_eq!(issuer, "https://idp.test"),
        other => panic!("{:?}", other.err()),
    }
    for tenants in [
        TenantScopeLayer::builder().issuer_any_tenant("https://idp.test"),
        TenantScopeLayer::builder().issuer_tenants("https://idp.test", [tenant(TENANT)]),
    ] {
        let bound = Gateway::builder("http://127.0.0.1:8080")
            .directory(InMemoryDirectory::new())
            .token_endpoint(endpoint())
            .auth(other())
            .tenant(tenants)
            .build();
        assert!(bound.is_ok(), "{:?}", bound.err());
    }
}
