//! Shared helpers for the integration tests: keys, token minting, loopback servers, a client.
#![allow(dead_code, unreachable_pub)]

pub mod postgres;
pub mod process;

#[allow(unused_imports)] // (not every test runs processes)
pub use process::{free_port, scratch, send_head, send_until_closed, Proc};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const RSA_PRIVATE: &str = include_str!("keys/rsa_private.pem");
pub const RSA_PUBLIC: &str = include_str!("keys/rsa_public.pem");
pub const RSA2_PRIVATE: &str = include_str!("keys/rsa2_private.pem");
pub const RSA2_PUBLIC: &str = include_str!("keys/rsa2_public.pem");
pub const EC_PRIVATE: &str = include_str!("keys/ec_private.pem");
pub const EC_PUBLIC: &str = include_str!("keys/ec_public.pem");
pub const ED_PRIVATE: &str = include_str!("keys/ed_private.pem");
pub const ED_PUBLIC: &str = include_str!("keys/ed_public.pem");
pub const HMAC_SECRET: &[u8] = b"a-shared-secret-of-at-least-64-bytes-so-that-hs512-may-use-it-too";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Makes sure Python 3 with PyJWT (and `cryptography`) can run the interop scripts: installs
/// it when missing, as `.ci/run` does, and fails the test when that fails (an interop test
/// never passes without having run).
pub fn pyjwt_installed() {
    let importable = || {
        std::process::Command::new("python3")
            .args(["-c", "import jwt, cryptography"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if !importable() {
        let installed = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "pyjwt[crypto]"])
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            installed && importable(),
            "the PyJWT interop test needs Python 3 with PyJWT: `python3 -m pip install \"pyjwt[crypto]\"` failed"
        );
    }
}

/// Standard claims valid for an hour, to be adjusted per test.
/// A FHIR `Parameters` resource's parameters as `name=valueCode` (what `$versions` answers).
pub fn parameters(resource: &Value) -> Vec<String> {
    resource["parameter"]
        .as_array()
        .expect("a Parameters resource")
        .iter()
        .map(|p| {
            format!(
                "{}={}",
                p["name"].as_str().unwrap(),
                p["valueCode"].as_str().unwrap()
            )
        })
        .collect()
}

pub fn claims() -> Value {
    json!({"iss": "https://auth.test", "aud": "tower-fhir", "sub": "app-1",
           "exp": now() + 3600, "iat": now(), "scope": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"})
}

pub fn encoding_key(alg: Algorithm) -> EncodingKey {
    tower_fhir::install_crypto_provider();
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(HMAC_SECRET)
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    }
}

/// A token signed with the test key for `alg`.
pub fn mint(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    mint_with(&encoding_key(alg), alg, kid, claims)
}

pub fn mint_with(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    tower_fhir::install_crypto_provider();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

/// The public JWK of a private RSA PEM, with a kid and alg.
pub fn rsa_jwk(private_pem: &str, kid: &str) -> Value {
    tower_fhir::install_crypto_provider();
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).unwrap()
}

/// Serves a router on a loopback port.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// A JWKS endpoint whose document and status the test controls, counting its hits.
#[derive(Clone)]
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<JwksState>,
}

struct JwksState {
    hits: AtomicUsize,
    document: Mutex<(StatusCode, Value, Option<String>)>,
    delay: Mutex<Duration>,
}

impl JwksServer {
    pub async fn start(keys: Vec<Value>) -> Self {
        let state = Arc::new(JwksState {
            hits: AtomicUsize::new(0),
            document: Mutex::new((StatusCode::OK, json!({ "keys": keys }), None)),
            delay: Mutex::new(Duration::ZERO),
        });
        async fn jwks(State(state): State<Arc<JwksState>>) -> impl IntoResponse {
            state.hits.fetch_add(1, Ordering::SeqCst);
            let delay = *state.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let (status, body, cache_control) = state.document.lock().unwrap().clone();
            let mut headers = HeaderMap::new();
            if let Some(cc) = cache_control {
                headers.insert("cache-control", cc.parse().unwrap());
            }
            (status, headers, axum::Json(body))
        }
        let router = Router::new()
            .route("/jwks", get(jwks))
            .with_state(Arc::clone(&state));
        let addr = serve(router).await;
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn set_keys(&self, keys: Vec<Value>) {
        self.state.document.lock().unwrap().1 = json!({ "keys": keys });
    }

    pub fn set_status(&self, status: StatusCode) {
        self.state.document.lock().unwrap().0 = status;
    }

    pub fn set_cache_control(&self, value: &str) {
        self.state.document.lock().unwrap().2 = Some(value.to_owned());
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }
}

/// A response as the test client saw it.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn challenge(&self) -> &str {
        self.headers
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTP/1.1 client over loopback.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
}

impl TestClient {
    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::from(body.to_owned())).unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }

    /// A client of the same server whose connections come from `local` (any `127.x.y.z` on
    /// Linux loopback), so the server sees another source address.
    pub fn connecting_from(&self, local: std::net::IpAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(local));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            addr: self.addr,
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = http::Request::get(format!("http://{}{}", self.addr, path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .client
            .request(request.body(Full::default()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get_bearer(&self, path: &str, token: &str) -> Reply {
        self.get(path, &[("authorization", &format!("Bearer {token}"))])
            .await
    }

    /// An access token from `POST /oauth/token` (client credentials) for the client
    /// `client_id` with `secret` and `scope`; the request must succeed.
    pub async fn client_token(&self, client_id: &str, secret: &str, scope: &str) -> String {
        let reply = self
            .send(
                "POST",
                "/oauth/token",
                &[("content-type", "application/x-www-form-urlencoded")],
                &format!(
                    "grant_type=client_credentials&client_id={client_id}&client_secret={secret}&scope={scope}"
                ),
            )
            .await;
        assert_eq!(reply.status, http::StatusCode::OK, "{}", reply.text());
        reply.json()["access_token"].as_str().unwrap().to_owned()
    }

    /// `POST /oauth/revoke` of `token` by the client `client_id` with `secret` (RFC 7009).
    pub async fn revoke(&self, token: &str, client_id: &str, secret: &str) -> Reply {
        self.send(
            "POST",
            "/oauth/revoke",
            &[("content-type", "application/x-www-form-urlencoded")],
            &format!("token={token}&client_id={client_id}&client_secret={secret}"),
        )
        .await
    }
}

/// What an upstream test server received, exactly.
#[derive(Debug, Clone)]
pub struct Received {
    pub version: http::Version,
    pub method: String,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body's trailers, when it had any.
    pub trailers: Option<HeaderMap>,
}

/// How an upstream test server answers a path (the first rule whose prefix matches).
#[derive(Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Answer {
    pub fn json(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "application/fhir+json".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
}

/// A FHIR server stand-in that records every request and answers by path prefix.
#[derive(Clone)]
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    answers: Arc<Mutex<Vec<(String, Answer)>>>,
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answers: Arc<Mutex<Vec<(String, Answer)>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (rec, ans) = (received.clone(), answers.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (rec, ans) = (rec.clone(), ans.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (rec, ans) = (rec.clone(), ans.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let (body, trailers) = match body.collect().await {
                                    Ok(collected) => {
                                        let trailers = collected.trailers().cloned();
                                        (collected.to_bytes(), trailers)
                                    }
                                    Err(_) => (Bytes::new(), None),
                                };
                                let target = parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default();
                                rec.lock().unwrap().push(Received {
                                    version: parts.version,
                                    method: parts.method.to_string(),
                                    target: target.clone(),
                                    headers: parts.headers.clone(),
                                    body: body.clone(),
                                    trailers,
                                });
                                let answer = ans
                                    .lock()
                                    .unwrap()
                                    .iter()
                                    .find(|(prefix, _)| target.starts_with(prefix.as_str()))
                                    .map(|(_, a)| a.clone())
                                    .unwrap_or_else(|| {
                                        Answer::json(json!({"resourceType": "Patient", "id": "1"}))
                                    });
                                tokio::time::sleep(answer.delay).await;
                                let mut response = http::Response::builder().status(answer.status);
                                for (name, value) in &answer.headers {
                                    response = response.header(name, value);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    response.body(Full::<Bytes>::from(answer.body)).unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            answers,
        }
    }

    pub fn base(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn answer(&self, prefix: &str, answer: Answer) {
        self.answers
            .lock()
            .unwrap()
            .insert(0, (prefix.to_owned(), answer));
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until a request has reached this upstream, then asserts that none
    /// came with a whole body of `length` bytes (a request cut off mid-body is recorded with
    /// none).
    pub async fn assert_started_never_whole(&self, length: usize) {
        for _ in 0..1000 {
            if !self.received().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let received = self.received();
        assert!(!received.is_empty(), "no request reached the upstream");
        for request in received {
            assert!(request.body.len() < length, "{request:?}");
        }
    }

    pub fn last(&self) -> Received {
        self.received()
            .last()
            .cloned()
            .expect("the upstream received nothing")
    }
}

#[cfg(feature = "proxy")]
/// Serves a tower service over HTTP/1.1 and HTTP/2 on loopback, putting each connection's
/// peer address in the request extensions as `ClientAddr`.
pub async fn serve_tower<S, B>(service: S) -> SocketAddr
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_tower_on(listener, service)
}

#[cfg(feature = "proxy")]
/// [`serve_tower`] on a listener bound already (so the service can be built knowing its address).
pub fn serve_tower_on<S, B>(listener: tokio::net::TcpListener, service: S) -> SocketAddr
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                break;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let service = tower::ServiceBuilder::new()
                    .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                        req.extensions_mut()
                            .insert(tower_fhir::proxy::ClientAddr(peer));
                        req
                    })
                    .service(service);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(service),
                    )
                    .await;
            });
        }
    });
    addr
}

/// A raw HTTP/1.1 upstream on a loopback port: each request's head (as text) and its
/// connection go to `answer`. Returns its base URL (`/fhir`).
pub async fn raw_upstream<F, Fut>(answer: F) -> String
where
    F: Fn(String, tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tokio::io::AsyncReadExt::read(&mut stream, &mut byte)
                        .await
                        .unwrap_or(0)
                        == 0
                    {
                        return;
                    }
                    head.push(byte[0]);
                }
                answer(String::from_utf8_lossy(&head).into_owned(), stream).await;
            });
        }
    });
    format!("http://{addr}/fhir")
}

/// A token request's answer (`ask` makes the request), asked once more when it was refused
/// because the client's tokens were refused moments ago (an administrator reset its secret or
/// took something away: until the cut-off, `503 temporarily_unavailable` with a `Retry-After`
/// of one to four seconds), after that wait.
pub async fn after_cut_off(mut ask: impl AsyncFnMut() -> Reply) -> Reply {
    let reply = ask().await;
    if reply.status != StatusCode::SERVICE_UNAVAILABLE {
        return reply;
    }
    assert_eq!(
        reply.json()["error"],
        "temporarily_unavailable",
        "{}",
        reply.text()
    );
    let wait: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=4).contains(&wait), "Retry-After {wait}");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    ask().await
}

/// Starts the gateway binary `gateway` on `config`, written to `dir/{name}.json`, listening on
/// port 0 (a port picked by `free_port` could be picked for another test's gateway at the same
/// moment), with `kek` as its key-encryption key and no database URL from this environment:
/// its process, a client for it, and its `metrics_listen` address (which `config` must set).
pub fn start_gateway_with_metrics(
    gateway: &str,
    dir: &std::path::Path,
    name: &str,
    config: &serde_json::Value,
    kek: &str,
) -> (Proc, TestClient, SocketAddr) {
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut command = std::process::Command::new(gateway);
    command
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("TOWER_FHIR_KEY_ENCRYPTION_KEY", kek)
        .env_remove("TOWER_FHIR_DATABASE_URL");
    let (proc, base) = Proc::start(
        command,
        dir.join(format!("{name}.log")),
        "tower-fhir gateway listening on ",
    );
    let client = TestClient::new(base.trim_start_matches("http://").parse().unwrap());
    let metrics = proc.metrics_address();
    (proc, client, metrics)
}
