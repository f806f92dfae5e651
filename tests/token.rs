//! The token endpoint over real HTTP on loopback: the whole client flow through the bearer and
//! tenant layers, every refusal, secret rotation, a restart of the file store, throttling,
//! timing of failures, and interop with PyJWT.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::StatusCode;
use serde_json::Value;
use support::*;
use tower_fhir::auth::BearerAuthLayer;
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::token::{
    ClientAddr, ClientRecord, ClientSecret, ClientStore, FileClientStore, ForwardedClient,
    InMemoryClientStore, NewClient, SigningKey, SigningKeys, StoreFuture, ThrottlePolicy,
    TokenEndpoint,
};

const ISSUER: &str = "https://gateway.test";
const AUDIENCE: &str = "https://gateway.test/fhir";
const TENANT_A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const TENANT_B: &str = "9b2e7d4a-1c3f-4e5a-8b6c-7d8e9f0a1b2c";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

fn tenant(text: &str) -> TenantId {
    TenantId::parse(text).unwrap()
}

fn endpoint_over(store: impl ClientStore, throttle: ThrottlePolicy) -> TokenEndpoint {
    TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .store(store)
        .throttle(throttle)
        .build()
        .unwrap()
}

/// The token endpoint at `/token`, its JWKS at `/jwks`, and a FHIR resource behind the bearer
/// and tenant layers (configured in-process from the endpoint's keys) echoing the tenant.
async fn gateway(endpoint: TokenEndpoint) -> TestClient {
    let bearer = BearerAuthLayer::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .key_source(endpoint.key_source())
        .build()
        .unwrap();
    let tenant_scope = TenantScopeLayer::builder().from_scope().build().unwrap();
    let fhir = Router::new()
        .route(
            "/Patient/1",
            get(|Extension(tenant): Extension<TenantId>| async move { tenant.to_string() }),
        )
        .layer(tenant_scope)
        .layer(bearer);
    let router = Router::new()
        .route_service("/jwks", endpoint.signing_keys().jwks_service())
        .route_service("/token", endpoint)
        .merge(fhir)
        .layer(axum::middleware::from_fn(name_the_client));
    TestClient::new(serve_naming_clients(router).await)
}

/// Puts the connection's peer in the request extensions as `ClientAddr`, and the client an
/// `X-Forwarded-For` names as `ForwardedClient`, as the gateway binary does (the latter with
/// `client_address_header`).
async fn name_the_client(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    request.extensions_mut().insert(ClientAddr(peer));
    if let Some(client) = ForwardedClient::from_x_forwarded_for(request.headers()) {
        request.extensions_mut().insert(client);
    }
    next.run(request).await
}

/// Serves a router on a loopback port, telling it each connection's peer.
async fn serve_naming_clients(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

/// A store with client `app` entitled to tenant A, and its secret.
async fn store_with_app() -> (InMemoryClientStore, ClientSecret) {
    let store = InMemoryClientStore::new();
    let secret = store
        .register(NewClient::new("app").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    (store, secret)
}

/// `max_failures` within a minute, then blocks from `base` doubling up to `max`.
fn throttle(max_failures: u32, base: Duration, max: Duration) -> ThrottlePolicy {
    ThrottlePolicy {
        max_failures,
        window: Duration::from_secs(60),
        base_block: base,
        max_block: max,
    }
}

async fn token_post(client: &TestClient, id: &str, secret: &str, scope: &str) -> Reply {
    let body = format!(
        "grant_type=client_credentials&client_id={id}&client_secret={secret}&scope={scope}"
    );
    client.send("POST", "/token", &[FORM], &body).await
}

fn assert_error(reply: &Reply, status: StatusCode, error: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.json()["error"], error, "{}", reply.text());
    assert!(reply.json()["error_description"].is_string());
    assert_eq!(reply.headers["cache-control"], "no-store");
}

#[tokio::test]
async fn the_whole_client_flow() {
    let store = InMemoryClientStore::new();
    let secret = store
        .register(
            NewClient::new("app-1")
                .tenant(tenant(TENANT_A))
                .tenant(tenant(TENANT_B)),
        )
        .await
        .unwrap();
    let client = gateway(endpoint_over(store, ThrottlePolicy::default())).await;

    let reply = client
        .send(
            "POST",
            "/token",
            &[FORM, ("authorization", &basic("app-1", secret.expose()))],
            &format!("grant_type=client_credentials&scope={TENANT_B}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert_eq!(reply.headers["pragma"], "no-cache");
    let json = reply.json();
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3600);
    assert_eq!(json["scope"], TENANT_B);
    let token = json["access_token"].as_str().unwrap();

    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].is_string());

    let resource = client.get_bearer("/Patient/1", token).await;
    assert_eq!(resource.status, StatusCode::OK, "{}", resource.text());
    assert_eq!(resource.text(), TENANT_B);

    let jwks = client.get("/jwks", &[]).await;
    assert_eq!(jwks.status, StatusCode::OK);
    assert_eq!(jwks.json()["keys"][0]["kid"], header["kid"]);
}

#[tokio::test]
async fn form_credentials_and_the_grant_dash_type_spelling() {
    let store = InMemoryClientStore::new();
    let secret = store
        .register(NewClient::new("legacy").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    let client = gateway(endpoint_over(store, ThrottlePolicy::default())).await;
    let body = format!(
        "grant-type=client_credentials&client_id=legacy&client_secret={}",
        secret.expose()
    );
    let reply = client.send("POST", "/token", &[FORM], &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], TENANT_A);
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.text(),
        TENANT_A
    );
}

#[tokio::test]
async fn every_refusal() {
    let store = InMemoryClientStore::new();
    let secret = store
        .register(NewClient::new("app-1").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    let other = store
        .register(NewClient::new("app-2").tenant(tenant(TENANT_B)))
        .await
        .unwrap();
    let client = gateway(endpoint_over(store, ThrottlePolicy::default())).await;
    let s = secret.expose();
    let good = format!("grant_type=client_credentials&client_id=app-1&client_secret={s}");

    let reply = client.send("GET", "/token", &[], "").await;
    assert_error(&reply, StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
    assert_eq!(reply.headers["allow"], "POST");
    let reply = client
        .send(
            "POST",
            "/token",
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    assert_error(
        &reply,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request",
    );
    let reply = client.send("POST", "/token", &[], &good).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    let big = format!("{good}&padding={}", "x".repeat(10_000));
    let reply = client.send("POST", "/token", &[FORM], &big).await;
    assert_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    let reply = client
        .send(
            "POST",
            "/token",
            &[FORM],
            &good.replace("client_credentials", "authorization_code"),
        )
        .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "unsupported_grant_type");
    let reply = client
        .send(
            "POST",
            "/token",
            &[FORM],
            &format!("client_id=app-1&client_secret={s}"),
        )
        .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    // Both methods at once.
    let reply = client
        .send(
            "POST",
            "/token",
            &[FORM, ("authorization", &basic("app-1", s))],
            &good,
        )
        .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    // Two Authorization headers, even both good: which one a proxy in front read is unknown.
    let reply = client
        .send(
            "POST",
            "/token",
            &[
                FORM,
                ("authorization", &basic("app-1", s)),
                ("authorization", &basic("app-1", s)),
            ],
            "grant_type=client_credentials",
        )
        .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        reply.text().contains("More than one Authorization header"),
        "{}",
        reply.text()
    );
    // None.
    let reply = client
        .send("POST", "/token", &[FORM], "grant_type=client_credentials")
        .await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(reply.challenge().starts_with("Basic realm=\"tower-fhir\""));
    // Wrong secret by Basic: 401 with a Basic challenge.
    let reply = client
        .send(
            "POST",
            "/token",
            &[FORM, ("authorization", &basic("app-1", "wrong"))],
            "grant_type=client_credentials",
        )
        .await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(reply.challenge().starts_with("Basic realm="));
    // A bearer token instead of client credentials: 401, saying which schemes this takes.
    let reply = client
        .send(
            "POST",
            "/token",
            &[
                FORM,
                ("authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
            ],
            "grant_type=client_credentials",
        )
        .await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(reply.text().contains("Basic scheme"), "{}", reply.text());
    assert!(reply.challenge().starts_with("Basic realm="));
    // Unknown client and wrong secret by form: the same answer.
    let unknown = token_post(&client, "nobody", s, "").await;
    let wrong = token_post(&client, "app-1", "wrong", "").await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "invalid_client");
    assert_eq!(unknown.body, wrong.body);
    // Another client's tenant, two tenants, a scope not allowed.
    let reply = token_post(&client, "app-1", s, TENANT_B).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let reply = token_post(&client, "app-2", other.expose(), TENANT_A).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let reply = token_post(&client, "app-1", s, &format!("{TENANT_A}+{TENANT_B}")).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let reply = token_post(&client, "app-1", s, &format!("{TENANT_A}+admin")).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    // And the client still gets its own tenant.
    assert_eq!(
        token_post(&client, "app-1", s, TENANT_A).await.status,
        StatusCode::OK
    );
}

/// Sends a token request's head (with `Connection: close`) and the first `sent` bytes of
/// `body` on a new connection, then waits: what the server answers within `within` (up to the
/// connection's end).
async fn held_body_answer(addr: SocketAddr, body: &str, sent: usize, within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..sent]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closed() {
    let (store, secret) = store_with_app().await;
    let endpoint = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .store(store)
        .body_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let router = Router::new()
        .route_service("/token", endpoint)
        .layer(axum::middleware::from_fn(name_the_client));
    let addr = serve_naming_clients(router).await;
    let body = format!(
        "grant_type=client_credentials&client_id=app&client_secret={}&scope={TENANT_A}",
        secret.expose()
    );

    // Ten bytes of the body, then nothing: 408 after the timeout, and the connection ends
    // (read_to_end returns well within the 10 s).
    let began = Instant::now();
    let answer = held_body_answer(addr, &body, 10, Duration::from_secs(10)).await;
    let waited = began.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"invalid_request\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(9),
        "{waited:?}"
    );

    // The whole body at once: a token, as ever.
    let answer = held_body_answer(addr, &body, body.len(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("access_token"), "{answer}");
}

#[test]
fn a_zero_body_timeout_is_refused() {
    let built = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .store(InMemoryClientStore::new())
        .body_timeout(Duration::ZERO)
        .build();
    assert!(built.is_err());
}

#[tokio::test]
async fn rotation_without_and_with_grace_and_revocation() {
    let store = InMemoryClientStore::new();
    let first = store
        .register(NewClient::new("app").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    let endpoint = endpoint_over(store, ThrottlePolicy::default());
    let client = gateway(endpoint.clone()).await;

    // By the client itself, no grace: the old secret stops at once.
    assert!(endpoint
        .rotate_own_secret("app", "not-the-secret", Duration::ZERO)
        .await
        .is_err());
    let second = endpoint
        .rotate_own_secret("app", first.expose(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        token_post(&client, "app", first.expose(), "").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token_post(&client, "app", second.expose(), "").await.status,
        StatusCode::OK
    );

    // By an administrator, with grace: both work.
    let third = endpoint
        .store()
        .rotate_secret("app", Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(
        token_post(&client, "app", second.expose(), "").await.status,
        StatusCode::OK
    );
    assert_eq!(
        token_post(&client, "app", third.expose(), "").await.status,
        StatusCode::OK
    );

    // Revocation stops new tokens at once.
    endpoint.store().revoke("app").await.unwrap();
    let reply = token_post(&client, "app", third.expose(), "").await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test]
async fn a_short_grace_ends() {
    let store = InMemoryClientStore::new();
    let first = store
        .register(NewClient::new("app").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    let second = store
        .rotate_secret("app", Duration::from_secs(6))
        .await
        .unwrap();
    let client = gateway(endpoint_over(store, ThrottlePolicy::default())).await;
    assert_eq!(
        token_post(&client, "app", first.expose(), "").await.status,
        StatusCode::OK
    );
    // Expiry has one-second resolution: a 6 s grace ends between 5 s and 6 s from now (long
    // enough that Argon2 checks on a busy machine still see the old secret live above).
    tokio::time::sleep(Duration::from_millis(6100)).await;
    assert_eq!(
        token_post(&client, "app", first.expose(), "").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token_post(&client, "app", second.expose(), "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_file_store_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("tower-fhir-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("clients.json");
    let _ = std::fs::remove_file(&path);

    let store = FileClientStore::open(&path).unwrap();
    let old = store
        .register(
            NewClient::new("app")
                .tenant(tenant(TENANT_A))
                .token_lifetime(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    let new = store.rotate_secret("app", Duration::ZERO).await.unwrap();
    store
        .register(NewClient::new("gone").tenant(tenant(TENANT_B)))
        .await
        .unwrap();
    store.revoke("gone").await.unwrap();
    drop(store);

    // A new process: a new store over the same file.
    let reopened = FileClientStore::open(&path).unwrap();
    let client = gateway(endpoint_over(reopened, ThrottlePolicy::default())).await;
    assert_eq!(
        token_post(&client, "app", old.expose(), "").await.status,
        StatusCode::UNAUTHORIZED
    );
    let reply = token_post(&client, "app", new.expose(), "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["expires_in"], 300);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(old.expose()) && !text.contains(new.expose()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn repeated_failures_get_429_then_the_client_gets_back_in() {
    let (store, secret) = store_with_app().await;
    let policy = throttle(5, Duration::from_secs(1), Duration::from_secs(4));
    let client = gateway(endpoint_over(store, policy)).await;
    for _ in 0..5 {
        assert_eq!(
            token_post(&client, "app", "guess", "").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // Blocked, even with the right secret, and told when to retry.
    let reply = token_post(&client, "app", secret.expose(), "").await;
    assert_error(
        &reply,
        StatusCode::TOO_MANY_REQUESTS,
        "temporarily_unavailable",
    );
    assert_eq!(reply.headers["retry-after"], "1");
    // Other clients are not affected.
    assert_eq!(
        token_post(&client, "other", "x", "").await.status,
        StatusCode::UNAUTHORIZED
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        token_post(&client, "app", secret.expose(), "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn guesses_from_one_address_do_not_lock_the_client_out_from_another() {
    let (store, secret) = store_with_app().await;
    let policy = throttle(5, Duration::from_secs(60), Duration::from_secs(60));
    // The guesser connects from 127.0.0.1, the real client from 127.0.0.2.
    let guesser = gateway(endpoint_over(store, policy)).await;
    let real = guesser.connecting_from("127.0.0.2".parse().unwrap());
    for _ in 0..5 {
        assert_eq!(
            token_post(&guesser, "app", "guess", "").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let reply = token_post(&guesser, "app", "guess", "").await;
    assert_error(
        &reply,
        StatusCode::TOO_MANY_REQUESTS,
        "temporarily_unavailable",
    );
    assert_eq!(reply.headers["retry-after"], "60");
    // The real client, from its own address, still gets its tokens, again and again.
    for _ in 0..2 {
        let reply = token_post(&real, "app", secret.expose(), "").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // Its successes do not reset the guesser, who stays throttled (even with the right
    // secret: it is refused before any check).
    assert_eq!(
        token_post(&guesser, "app", "guess", "").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        token_post(&guesser, "app", secret.expose(), "")
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Wrong guesses from the real client's address count there, not against the guesser.
    assert_eq!(
        token_post(&real, "app", "typo", "").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token_post(&real, "app", secret.expose(), "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn behind_a_balancer_guesses_count_against_the_client_it_names() {
    let (store, secret) = store_with_app().await;
    let policy = throttle(5, Duration::from_secs(60), Duration::from_secs(60));
    // Both come through one balancer (one peer address), which names them.
    let balancer = gateway(endpoint_over(store, policy)).await;
    let post = |named: &'static str, secret: String| {
        let balancer = balancer.clone();
        async move {
            let body =
                format!("grant_type=client_credentials&client_id=app&client_secret={secret}");
            balancer
                .send("POST", "/token", &[FORM, ("x-forwarded-for", named)], &body)
                .await
        }
    };
    for _ in 0..5 {
        let reply = post("203.0.113.5", "guess".into()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = post("203.0.113.5", secret.expose().to_owned()).await;
    assert_error(
        &reply,
        StatusCode::TOO_MANY_REQUESTS,
        "temporarily_unavailable",
    );
    let reply = post("198.51.100.7", secret.expose().to_owned()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// An in-memory store whose next look-up, once armed, reads the client, says so, and answers
/// only when told to: what it read is then stale, deterministically.
#[derive(Clone, Default)]
struct PausingStore {
    inner: InMemoryClientStore,
    armed: Arc<Mutex<Option<Pause>>>,
}

struct Pause {
    reached: tokio::sync::oneshot::Sender<()>,
    resume: tokio::sync::oneshot::Receiver<()>,
}

impl PausingStore {
    /// Arms the next look-up; returns (it has read the client, let it answer).
    fn pause_next_lookup(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let (resume_tx, resume) = tokio::sync::oneshot::channel();
        *self.armed.lock().unwrap() = Some(Pause { reached, resume });
        (reached_rx, resume_tx)
    }
}

impl ClientStore for PausingStore {
    fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
        let read = self.inner.client(id);
        let pause = self.armed.lock().unwrap().take();
        Box::pin(async move {
            let record = read.await?;
            if let Some(pause) = pause {
                pause.reached.send(()).unwrap();
                pause.resume.await.unwrap();
            }
            Ok(record)
        })
    }
    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
        self.inner.register(client)
    }
    fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
        self.inner.rotate_secret(id, grace)
    }
    fn revoke(&self, id: &str) -> StoreFuture<()> {
        self.inner.revoke(id)
    }
    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> StoreFuture<()> {
        self.inner.set_entitlements(id, tenants, scopes)
    }
}

#[tokio::test]
async fn no_token_after_a_revocation_rotation_or_entitlement_change_returned() {
    let store = PausingStore::default();
    let mut secrets = Vec::new();
    for id in ["revoked", "rotated", "moved", "kept"] {
        let secret = store
            .register(NewClient::new(id).tenant(tenant(TENANT_A)))
            .await
            .unwrap();
        secrets.push(secret.expose().to_owned());
    }
    let client = gateway(endpoint_over(store.clone(), ThrottlePolicy::default())).await;
    // Each token request reads its client, then waits while an administrator changes the
    // client and the change returns; only then does the request go on.
    let changes: [(&str, StatusCode, &str); 4] = [
        ("revoked", StatusCode::UNAUTHORIZED, "invalid_client"),
        ("rotated", StatusCode::UNAUTHORIZED, "invalid_client"),
        ("moved", StatusCode::BAD_REQUEST, "invalid_scope"),
        ("kept", StatusCode::OK, ""),
    ];
    for ((id, status, error), secret) in changes.into_iter().zip(secrets) {
        let (reached, resume) = store.pause_next_lookup();
        let request = tokio::spawn({
            let client = client.clone();
            async move { token_post(&client, id, &secret, TENANT_A).await }
        });
        reached.await.unwrap();
        match id {
            "revoked" => store.revoke(id).await.unwrap(),
            "rotated" => drop(store.rotate_secret(id, Duration::ZERO).await.unwrap()),
            "moved" => store
                .set_entitlements(id, vec![tenant(TENANT_B)], vec![])
                .await
                .unwrap(),
            _ => {}
        }
        resume.send(()).unwrap();
        let reply = request.await.unwrap();
        if status == StatusCode::OK {
            assert_eq!(reply.status, status, "{id}: {}", reply.text());
        } else {
            assert_error(&reply, status, error);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_parallel_guesses_gets_no_more_tries_than_a_sequence() {
    let (store, secret) = store_with_app().await;
    let policy = throttle(5, Duration::from_secs(60), Duration::from_secs(60));
    let client = gateway(endpoint_over(store.clone(), policy)).await;
    // 40 wrong secrets at once: five are checked (and refused), every other one is told to
    // come back later, and so is the right secret after them.
    let guesses = (0..40).map(|i| {
        let client = client.clone();
        async move {
            token_post(&client, "app", &format!("guess-{i}"), "")
                .await
                .status
        }
    });
    let statuses = futures::future::join_all(guesses).await;
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((checked, refused), (5, 35), "{statuses:?}");
    assert_eq!(
        token_post(&client, "app", secret.expose(), "").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // The real client's own parallel requests all succeed (they wait their turn).
    let other = store
        .register(NewClient::new("busy").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    let requests = (0..20).map(|_| {
        let (client, secret) = (client.clone(), other.expose().to_owned());
        async move { token_post(&client, "busy", &secret, "").await.status }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_client_id_with_control_characters_or_too_long_is_refused_before_anything() {
    let store = InMemoryClientStore::new();
    let client = gateway(endpoint_over(store, ThrottlePolicy::default())).await;
    let long = "a".repeat(256);
    for id in ["app%0Aforged log line", "app%00", "%C3%A9", long.as_str()] {
        let reply = token_post(&client, id, "secret", "").await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // In Basic credentials too.
    let basic = format!("Basic {}", STANDARD.encode(b"app\r\nx:secret"));
    let reply = client
        .send(
            "POST",
            "/token",
            &[FORM, ("authorization", basic.as_str())],
            "grant_type=client_credentials",
        )
        .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn failed_self_rotations_count_toward_the_throttle() {
    let (store, secret) = store_with_app().await;
    let policy = throttle(3, Duration::from_secs(60), Duration::from_secs(60));
    let endpoint = endpoint_over(store, policy);
    for _ in 0..3 {
        assert!(endpoint
            .rotate_own_secret("app", "guess", Duration::ZERO)
            .await
            .unwrap_err()
            .is_refused());
    }
    // Blocked now, even with the right secret.
    assert!(endpoint
        .rotate_own_secret("app", secret.expose(), Duration::ZERO)
        .await
        .is_err());
}

#[tokio::test]
async fn unknown_client_and_wrong_secret_take_comparable_time() {
    let store = InMemoryClientStore::new();
    store
        .register(NewClient::new("app").tenant(tenant(TENANT_A)))
        .await
        .unwrap();
    let lenient = ThrottlePolicy {
        max_failures: 1000,
        ..ThrottlePolicy::default()
    };
    let client = gateway(endpoint_over(store, lenient)).await;
    // Warm up (the dummy hash is computed on first use).
    token_post(&client, "nobody", "x", "").await;
    let time = |id: &'static str| {
        let client = client.clone();
        async move {
            let start = Instant::now();
            let reply = token_post(&client, id, "wrong-secret", "").await;
            let took = start.elapsed();
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
            took
        }
    };
    // Interleaved pairs (in alternating order), so that both kinds see the same machine: a
    // burst of load slows a pair, not one kind.
    let (mut unknown, mut wrong, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..15 {
        let (u, w) = if pair % 2 == 0 {
            let u = time("nobody").await;
            (u, time("app").await)
        } else {
            let w = time("app").await;
            (time("nobody").await, w)
        };
        unknown.push(u);
        wrong.push(w);
        ratios.push(u.as_secs_f64() / w.as_secs_f64());
    }
    unknown.sort();
    wrong.sort();
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    assert!(
        (1.0 / 3.0..3.0).contains(&ratio),
        "median ratio {ratio:.2}: unknown {:?} vs wrong secret {:?} (medians)",
        unknown[unknown.len() / 2],
        wrong[wrong.len() / 2]
    );
}

#[tokio::test]
async fn signing_key_rotation_keeps_old_tokens_valid_until_retired_and_not_a_request_longer() {
    let (store, secret) = store_with_app().await;
    let keys = SigningKeys::new(SigningKey::rsa_pem(RSA_PRIVATE, "rsa-1").unwrap());
    let endpoint = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .store(store)
        .signing_keys(keys.clone())
        .build()
        .unwrap();
    let client = gateway(endpoint).await;
    let old = token_post(&client, "app", secret.expose(), "").await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &old).await.status,
        StatusCode::OK
    );

    keys.rotate(SigningKey::generate_es256().unwrap()).unwrap();
    let new = token_post(&client, "app", secret.expose(), "").await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        client.get_bearer("/Patient/1", &new).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get_bearer("/Patient/1", &old).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get("/jwks", &[]).await.json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    keys.retire("rsa-1").unwrap();
    assert_eq!(
        client.get("/jwks", &[]).await.json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Retired (for compromise, say): the old token stops at once, though the bearer layer has
    // it cached and its refresh is minutes away; the new key's token goes on.
    let refused = client.get_bearer("/Patient/1", &old).await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        refused.text()
    );
    assert_eq!(
        client.get_bearer("/Patient/1", &new).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn tokens_validate_under_pyjwt() {
    pyjwt_installed();
    let store = InMemoryClientStore::new();
    let secret = store
        .register(
            NewClient::new("app")
                .tenant(tenant(TENANT_A))
                .scope("system/*.read"),
        )
        .await
        .unwrap();
    let keys = SigningKeys::generate().unwrap();
    keys.add(SigningKey::rsa_pem(RSA_PRIVATE, "rsa-next").unwrap())
        .unwrap();
    let endpoint = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience(AUDIENCE)
        .store(store)
        .signing_keys(keys.clone())
        .build()
        .unwrap();
    let client = gateway(endpoint).await;
    let dir = std::env::temp_dir().join(format!("tower-fhir-pyjwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One ES256 token, then one RS256 after rotating to the RSA key.
    for round in 0..2 {
        if round == 1 {
            keys.make_current("rsa-next").unwrap();
        }
        let reply = token_post(
            &client,
            "app",
            secret.expose(),
            &format!("{TENANT_A}+system/*.read"),
        )
        .await;
        let token = reply.json()["access_token"].as_str().unwrap().to_owned();
        let jwks = client.get("/jwks", &[]).await.text();
        std::fs::write(dir.join("jwks.json"), jwks).unwrap();
        std::fs::write(dir.join("token"), &token).unwrap();
        let out = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/interop/verify_pyjwt.py"
            ))
            .arg(dir.join("jwks.json"))
            .arg(dir.join("token"))
            .args([AUDIENCE, ISSUER])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PyJWT refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(claims["sub"], "app");
        assert_eq!(claims["scope"], format!("{TENANT_A} system/*.read"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A store where an administrator resets the client's secret (or, with `true`, revokes the
/// client) while the client's own rotation is being checked (between its check and its
/// rotation).
struct ResetMeanwhile(InMemoryClientStore, bool);

impl ClientStore for ResetMeanwhile {
    fn client(
        &self,
        id: &str,
    ) -> tower_fhir::token::StoreFuture<Option<tower_fhir::token::ClientRecord>> {
        self.0.client(id)
    }
    fn register(
        &self,
        client: NewClient,
    ) -> tower_fhir::token::StoreFuture<tower_fhir::token::ClientSecret> {
        self.0.register(client)
    }
    fn rotate_secret(
        &self,
        id: &str,
        grace: Duration,
    ) -> tower_fhir::token::StoreFuture<tower_fhir::token::ClientSecret> {
        self.0.rotate_secret(id, grace)
    }
    fn rotate_secret_from(
        &self,
        id: &str,
        used: &str,
        grace: Duration,
    ) -> tower_fhir::token::StoreFuture<tower_fhir::token::ClientSecret> {
        let (store, id, used) = (self.0.clone(), id.to_owned(), used.to_owned());
        let revoke = self.1;
        Box::pin(async move {
            if revoke {
                store.revoke(&id).await?;
            } else {
                store.rotate_secret(&id, Duration::ZERO).await?;
            }
            store.rotate_secret_from(&id, &used, grace).await
        })
    }
    fn revoke(&self, id: &str) -> tower_fhir::token::StoreFuture<()> {
        self.0.revoke(id)
    }
    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> tower_fhir::token::StoreFuture<()> {
        self.0.set_entitlements(id, tenants, scopes)
    }
}

#[tokio::test]
async fn a_reset_made_while_a_clients_own_rotation_is_checked_stands() {
    let (store, first, endpoint) = meanwhile(false).await;
    // Through the library's call and through the HTTP service alike: the rotation that began
    // with the old secret is refused, and hands out no secret.
    let refused = endpoint
        .rotate_own_secret("app", first.expose(), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(refused.is_conflict(), "{refused}");
    let reset = store.client("app").await.unwrap().unwrap();
    assert_eq!(reset.secrets.len(), 1, "the reset's secret stands alone");

    let second = store.rotate_secret("app", Duration::ZERO).await.unwrap();
    refused_as_a_client(&endpoint, second.expose()).await;
}

/// A store with `app` registered (its first secret), and an endpoint over it where an
/// administrator resets `app`'s secret (or, `revoke`, revokes it) during its own rotation.
async fn meanwhile(revoke: bool) -> (InMemoryClientStore, ClientSecret, TokenEndpoint) {
    let (store, first) = store_with_app().await;
    let endpoint = endpoint_over(
        ResetMeanwhile(store.clone(), revoke),
        ThrottlePolicy::default(),
    );
    (store, first, endpoint)
}

/// `app`'s own rotation with `secret`, over HTTP, is refused `401 invalid_client` with no secret.
async fn refused_as_a_client(endpoint: &TokenEndpoint, secret: &str) {
    let client = TestClient::new(serve_tower(endpoint.secret_rotation_service()).await);
    let basic = format!("Basic {}", STANDARD.encode(format!("app:{secret}")));
    let reply = client
        .send(
            "POST",
            "/oauth/clients/app/secret",
            &[("authorization", &basic)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_client");
    assert!(reply.json().get("client_secret").is_none());
}

#[tokio::test]
async fn a_client_revoked_while_its_own_rotation_is_checked_is_refused_as_a_client() {
    let (store, first, endpoint) = meanwhile(true).await;
    // The store refuses a revoked client: that is the client's failure, not the endpoint's.
    refused_as_a_client(&endpoint, first.expose()).await;
    assert!(store.client("app").await.unwrap().unwrap().revoked);
}
