//! Rate limits and upstream concurrency limits through the whole gateway over real HTTP: a
//! tenant's limit refuses its third immediate request while another tenant goes on, a client's
//! limit spans its tenants, and an upstream with `max_concurrency: 1` makes a second request
//! wait (or, with a short timeout, refuses it with 503) until the first one's body has ended.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use support::*;
use tower_fhir::gateway::Gateway;
use tower_fhir::limit::RateLimit;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    ClientStore, InMemoryClientStore, NewClient, SecretHashing, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const LIMITED: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
/// A burst of 2, then one a second: slow enough for a loaded machine's requests to find the
/// burst spent.
const SLOWLY: &str = "1d2d0000-0000-4000-8000-000000000005";
const FREE: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const FIRST: &str = "1d2d0000-0000-4000-8000-000000000001";
const SECOND: &str = "1d2d0000-0000-4000-8000-000000000002";
const PATIENT: &str = "1d2d0000-0000-4000-8000-000000000003";
const HASTY: &str = "1d2d0000-0000-4000-8000-000000000004";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "the-first-secret-0123456789";

fn tenant(text: &str) -> TenantId {
    TenantId::parse(text).unwrap()
}

/// A FHIR server whose `/slow` answers after `delay`, and whose `/stream` sends its head at
/// once and ends its body after `delay`; it counts the requests in flight at once. The delay
/// can be changed (`set_delay`); a request uses the one current when it arrives.
#[derive(Clone)]
struct SlowServer {
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

impl SlowServer {
    async fn start(delay: Duration) -> (Self, String) {
        let server = Self {
            in_flight: Arc::default(),
            most: Arc::default(),
            delay_ms: Arc::new(AtomicU64::new(delay.as_millis() as u64)),
        };
        let (slow, stream) = (server.clone(), server.clone());
        let router = Router::new()
            .route(
                "/fhir/slow",
                get(move || {
                    let server = slow.clone();
                    async move {
                        let _counted = server.enter();
                        tokio::time::sleep(server.delay()).await;
                        "{}"
                    }
                }),
            )
            .route(
                "/fhir/stream",
                get(move || {
                    let server = stream.clone();
                    async move {
                        let counted = server.enter();
                        let delay = server.delay();
                        let chunks = futures::stream::unfold(0, move |n| async move {
                            match n {
                                0 => Some((Ok::<_, std::io::Error>(Bytes::from("{")), 1)),
                                1 => {
                                    tokio::time::sleep(delay).await;
                                    Some((Ok(Bytes::from("}")), 2))
                                }
                                _ => None,
                            }
                        });
                        // The count ends with the body.
                        let body = Body::from_stream(futures::StreamExt::map(chunks, move |c| {
                            let _ = &counted;
                            c
                        }));
                        ([("content-type", "application/octet-stream")], body)
                    }
                }),
            );
        let addr = serve(router).await;
        (server, format!("http://{addr}/fhir"))
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Waits (up to 10 s) until `count` requests are in flight.
    async fn wait_in_flight(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.in_flight.load(Ordering::SeqCst) != count {
            assert!(
                Instant::now() < deadline,
                "never {count} in flight: {}",
                self.in_flight.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn enter(&self) -> Leave {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        Leave(Arc::clone(&self.in_flight))
    }
}

struct Leave(Arc<AtomicUsize>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Setup {
    client: TestClient,
    addr: std::net::SocketAddr,
    slow: SlowServer,
    upstream: RecordingUpstream,
}

async fn setup() -> Setup {
    let upstream = RecordingUpstream::start().await;
    let (slow, slow_base) = SlowServer::start(Duration::from_millis(400)).await;
    let plain = |tenant_limit: Option<RateLimit>| {
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
            .unwrap()
            .with_rate_limit(tenant_limit)
    };
    let directory = InMemoryDirectory::new();
    directory.upsert(tenant(LIMITED), plain(RateLimit::new(2, 2).ok()));
    directory.upsert(tenant(SLOWLY), plain(RateLimit::new(1, 2).ok()));
    directory.upsert(tenant(FREE), plain(None));
    directory.upsert(tenant(FIRST), plain(None));
    directory.upsert(tenant(SECOND), plain(None));
    // One server under two tenants: the same slots, whichever record the request comes from.
    let one_at_a_time = |timeout_ms: u64| {
        TenantRecord::new([Upstream::parse(&slow_base, FhirVersion::R4)
            .unwrap()
            .with_max_concurrency(1.try_into().unwrap())
            .with_timeout(Duration::from_millis(timeout_ms))])
        .unwrap()
    };
    directory.upsert(tenant(PATIENT), one_at_a_time(5_000));
    directory.upsert(tenant(HASTY), one_at_a_time(150));

    let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    let entitled = |client: NewClient| {
        [LIMITED, SLOWLY, FREE, FIRST, SECOND, PATIENT, HASTY]
            .into_iter()
            .fold(client.secret(SECRET), |client, t| client.tenant(tenant(t)))
    };
    store
        .register(entitled(NewClient::new("app")))
        .await
        .unwrap();
    store
        .register(entitled(NewClient::new("other")))
        .await
        .unwrap();
    store
        .register(entitled(NewClient::new("metered")).rate_limit(RateLimit::new(1, 3).unwrap()))
        .await
        .unwrap();
    store
        .register(entitled(NewClient::new("women")).scope("system/Patient.rs?gender=female"))
        .await
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(store)
        .build()
        .unwrap();
    let gateway = Gateway::builder(&base)
        .directory(directory.clone())
        .follow(directory.subscribe())
        .token_endpoint(endpoint)
        .build()
        .unwrap();
    let served = serve_tower_on(listener, gateway);
    Setup {
        client: TestClient::new(served),
        addr: served,
        slow,
        upstream,
    }
}

async fn token(client: &TestClient, id: &str, tenant: &str) -> String {
    let reply = client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id={id}&client_secret={SECRET}&scope={tenant}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

fn assert_throttled(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let retry: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "throttled", "{outcome}");
}

#[tokio::test]
async fn a_tenant_over_its_limit_gets_429_and_other_tenants_go_on() {
    let Setup { client, .. } = setup().await;
    let limited = token(&client, "app", LIMITED).await;
    let free = token(&client, "app", FREE).await;
    let other_client = token(&client, "other", LIMITED).await;

    assert_eq!(
        client.get_bearer("/Patient", &limited).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get_bearer("/Patient", &limited).await.status,
        StatusCode::OK
    );
    // The third immediate request of the tenant, whichever of its clients sends it.
    assert_throttled(
        &client.get_bearer("/Patient", &other_client).await,
        StatusCode::TOO_MANY_REQUESTS,
    );
    assert_throttled(
        &client.get_bearer("/Patient", &limited).await,
        StatusCode::TOO_MANY_REQUESTS,
    );
    // Another tenant of the same client is untouched.
    for _ in 0..5 {
        assert_eq!(
            client.get_bearer("/Patient", &free).await.status,
            StatusCode::OK
        );
    }
    // At 2 per second, a request goes through again after half a second.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        client.get_bearer("/Patient", &limited).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_client_limit_spans_its_tenants() {
    let Setup { client, .. } = setup().await;
    let first = token(&client, "metered", FIRST).await;
    let second = token(&client, "metered", SECOND).await;
    let unmetered = token(&client, "app", SECOND).await;

    // A burst of 3 across both tenants.
    for token in [&first, &second, &first] {
        assert_eq!(
            client.get_bearer("/Patient", token).await.status,
            StatusCode::OK
        );
    }
    let refused = client.get_bearer("/Patient", &second).await;
    assert_throttled(&refused, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.text().contains("client"), "{}", refused.text());
    // Another client of the same tenant is untouched.
    for _ in 0..5 {
        assert_eq!(
            client.get_bearer("/Patient", &unmetered).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn max_concurrency_makes_a_second_request_wait_then_503_after_the_timeout() {
    let Setup { client, slow, .. } = setup().await;
    let patient = token(&client, "app", PATIENT).await;
    let hasty = token(&client, "app", HASTY).await;

    // Two at once to a server that takes one: the second waits for the first.
    let started = Instant::now();
    let (a, b) = tokio::join!(
        client.get_bearer("/slow", &patient),
        client.get_bearer("/slow", &patient)
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.most.load(Ordering::SeqCst), 1);

    // While one request is in flight (held for 3 s), one that may wait only 150 ms gets 503,
    // never sent.
    slow.set_delay(Duration::from_secs(3));
    let busy = {
        let (client, patient) = (client.clone(), patient.clone());
        tokio::spawn(async move { client.get_bearer("/slow", &patient).await })
    };
    slow.wait_in_flight(1).await;
    let started = Instant::now();
    let refused = client.get_bearer("/slow", &hasty).await;
    assert_throttled(&refused, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(busy.await.unwrap().status, StatusCode::OK);
    assert_eq!(slow.most.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_slot_is_held_until_the_response_body_ends() {
    let Setup {
        client, addr, slow, ..
    } = setup().await;
    let patient = token(&client, "app", PATIENT).await;
    let hasty = token(&client, "app", HASTY).await;

    // The head of a streamed response arrives; its body is still coming (for 3 s).
    slow.set_delay(Duration::from_secs(3));
    let raw: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("http://{addr}/stream"))
        .header("authorization", format!("Bearer {patient}"))
        .body(Full::default())
        .unwrap();
    let streaming = raw.request(request).await.unwrap();
    assert_eq!(streaming.status(), StatusCode::OK);
    assert_eq!(slow.in_flight.load(Ordering::SeqCst), 1);
    assert_throttled(
        &client.get_bearer("/slow", &hasty).await,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    // Once the body has ended, the slot is free.
    let body = streaming.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{}");
    slow.set_delay(Duration::from_millis(400));
    let after = client.get_bearer("/slow", &patient).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.text());
}

#[tokio::test]
async fn a_granular_scopes_check_search_is_not_counted_against_the_limits() {
    let Setup {
        client, upstream, ..
    } = setup().await;
    upstream.answer(
        "/fhir/Patient?_id=1&",
        Answer::json(json!({"resourceType": "Bundle", "type": "searchset", "total": 1})),
    );
    upstream.answer(
        "/fhir/Patient/1",
        Answer::json(json!({"resourceType": "Patient", "id": "1", "gender": "female"})),
    );
    // The tenant's limit: a burst of 2. Each read is checked with a search first, and only the
    // read counts: two reads pass, the third is the read's own 429, not a failed check's 502.
    let scope = format!("{SLOWLY}%20system/Patient.rs%3Fgender%3Dfemale");
    let token = token(&client, "women", &scope).await;
    for _ in 0..2 {
        let reply = client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = client.get_bearer("/Patient/1", &token).await;
    assert_throttled(&reply, StatusCode::TOO_MANY_REQUESTS);
    let probes = upstream
        .received()
        .iter()
        .filter(|r| r.target.starts_with("/fhir/Patient?_id=1&"))
        .count();
    assert_eq!(probes, 2);
}

#[tokio::test]
async fn a_request_over_its_tenants_limit_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Setup { client, addr, .. } = setup().await;
    // A token whose scopes need a transaction's body read to be checked.
    let scope = format!("{SLOWLY}%20system/Patient.rs%3Fgender%3Dfemale");
    let token = token(&client, "women", &scope).await;
    // The tenant's burst of 2, spent.
    for _ in 0..2 {
        client.get_bearer("/Patient?gender=female", &token).await;
    }
    // A transaction whose body never comes whole: the limit answers without waiting for it.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {token}\r\n\
         content-type: application/fhir+json\r\ncontent-length: 100000\r\n\r\n\
         {{\"resourceType\": \"Bundle\", \"type\": \"transaction\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered before the body came")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("throttled"), "{answer}");
}

#[tokio::test]
async fn a_tenants_refusals_take_nothing_from_its_clients_limits() {
    let Setup { client, .. } = setup().await;
    let app = token(&client, "app", SLOWLY).await;
    let metered_limited = token(&client, "metered", SLOWLY).await;
    let metered_free = token(&client, "metered", FREE).await;
    // Another client spends the tenant's burst of 2, and is refused a third.
    for _ in 0..2 {
        let reply = client.get_bearer("/Patient/1", &app).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = client.get_bearer("/Patient/1", &app).await;
    assert_throttled(&reply, StatusCode::TOO_MANY_REQUESTS);
    assert!(reply.text().contains("for this tenant"), "{}", reply.text());
    // The metered client (a burst of 3) asks the saturated tenant three times: the tenant's
    // refusals, which count nothing against the client's own limit...
    for _ in 0..3 {
        let reply = client.get_bearer("/Patient/1", &metered_limited).await;
        assert_throttled(&reply, StatusCode::TOO_MANY_REQUESTS);
        assert!(reply.text().contains("for this tenant"), "{}", reply.text());
    }
    // ... so its whole burst is left for its other tenant.
    for _ in 0..3 {
        let reply = client.get_bearer("/Patient/1", &metered_free).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = client.get_bearer("/Patient/1", &metered_free).await;
    assert_throttled(&reply, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        reply.text().contains("from this client"),
        "{}",
        reply.text()
    );
}
