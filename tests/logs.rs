//! What the bearer layer logs: why it refused, never the token or a secret.
//!
//! A test binary of its own on purpose. `tracing` caches each callsite's interest once per
//! process, and with one registered dispatcher it asks the *registering thread's* default: a
//! sibling test reaching `bearer token rejected` first, on a thread without a subscriber, would
//! cache "never" and this test's scoped subscriber would see nothing (tokio-rs/tracing#3611; it
//! failed so once, in CI). Alone in its process, the only thread that logs is this test's.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::json;
use support::*;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What was logged so far.
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Everything this thread logs from now on, at every level (every test here asks for the
/// same, so no callsite's interest depends on which test reached it first), until the guard
/// is dropped.
fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

// current_thread: the server, the key fetch and the test share the thread-local subscriber.
#[tokio::test(flavor = "current_thread")]
async fn logs_say_why_but_never_show_tokens_or_secrets() {
    let (captured, _guard) = capture();

    let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
    server.set_status(StatusCode::INTERNAL_SERVER_ERROR);
    let layer = BearerAuthLayer::builder()
        .issuer("https://auth.test")
        .audience("tower-fhir")
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap().with_kid("hs"))
        .jwks_url(server.url())
        .build()
        .unwrap();
    let router = Router::new()
        .route("/Patient/1", get(|| async { "a patient" }))
        .layer(layer);
    let client = TestClient::new(serve(router).await);
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let tokens = [
        mint(Algorithm::HS256, Some("hs"), &expired),
        mint(Algorithm::RS256, Some("k1"), &claims()),
        mint(Algorithm::HS256, Some("hs"), &claims()),
    ];
    let statuses = [
        StatusCode::UNAUTHORIZED,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::OK,
    ];
    for (token, status) in tokens.iter().zip(statuses) {
        assert_eq!(client.get_bearer("/Patient/1", token).await.status, status);
    }

    let logs = captured.text();
    assert!(logs.contains("The access token expired"), "{logs}");
    assert!(logs.contains("could not fetch verification keys"), "{logs}");
    for token in &tokens {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !logs.contains(signature),
            "a token leaked into the logs:\n{logs}"
        );
    }
    let secret = String::from_utf8_lossy(HMAC_SECRET);
    assert!(
        !logs.contains(&*secret),
        "the HMAC secret leaked into the logs"
    );
}

/// A client id is whatever a client sends: one that reads like the log's own fields (`app
/// from=...`) is quoted in the line that says its authentication failed, so it cannot pass for
/// another client or address.
#[tokio::test(flavor = "current_thread")]
async fn a_client_id_cannot_write_fields_into_the_log() {
    use tower::ServiceExt;
    let (captured, _guard) = capture();
    let endpoint = tower_fhir::token::TokenEndpoint::builder()
        .issuer("https://gateway.test")
        .audience("tower-fhir")
        .store(tower_fhir::token::InMemoryClientStore::new())
        .build()
        .unwrap();
    let forged = "app reason=\"ok\" from=Some(10.9.9.9)";
    let form = format!(
        "grant_type=client_credentials&client_id={}&client_secret=x",
        forged
            .replace(' ', "+")
            .replace('"', "%22")
            .replace('=', "%3D")
    );
    let request = http::Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(axum::body::Body::from(form))
        .unwrap();
    let response = endpoint.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let logs = captured.text();
    let line = logs
        .lines()
        .find(|line| line.contains("client authentication failed"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(
        line.contains(r#"client_id="app reason=\"ok\" from=Some(10.9.9.9)""#),
        "{line}"
    );
    assert!(!line.contains("client_id=app "), "{line}");
}
