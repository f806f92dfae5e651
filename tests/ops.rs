//! The operations layers around the whole gateway, over real HTTP on loopback: request ids
//! from the client to the upstream and back (refusals included), health and readiness,
//! audit records for forwarded, refused and token requests, request body limits (a
//! declared length, a streamed body, a large Bundle within the limit) and a body that stops
//! arriving.

mod support;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::*;
use tower::ServiceBuilder;
use tower_fhir::gateway::Gateway;
use tower_fhir::ops::{
    AuditRecord, BodyLimitLayer, BodyTimeoutLayer, HealthLayer, ObserveLayer, QueryRecording,
    RequestIdLayer,
};
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    ClientStore, InMemoryClientStore, NewClient, SecretHashing, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const UNKNOWN: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "the-first-secret-0123456789";
/// The body limit in these tests.
const LIMIT: u64 = 1024 * 1024;
/// How long a request body may pause in these tests.
const BODY_PAUSE: Duration = Duration::from_secs(1);

type Records = Arc<Mutex<Vec<AuditRecord>>>;

struct Setup {
    client: TestClient,
    addr: std::net::SocketAddr,
    upstream: RecordingUpstream,
    records: Records,
}

async fn setup(query: QueryRecording) -> Setup {
    let upstream = RecordingUpstream::start().await;
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TenantId::parse(TENANT).unwrap(),
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
            .unwrap(),
    );
    let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    store
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(TenantId::parse(TENANT).unwrap())
                .tenant(TenantId::parse(UNKNOWN).unwrap()),
        )
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
        .directory(directory)
        .token_endpoint(endpoint)
        .build()
        .unwrap();
    let records: Records = Arc::default();
    let sink = Arc::clone(&records);
    let auth = gateway.bearer_auth().clone();
    let service = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(HealthLayer::new().readiness("keys", move || {
            let (fetched, all) = auth.key_sources_fetched();
            auth.prefetch_keys();
            fetched == all
        }))
        .layer(
            ObserveLayer::new()
                .metrics(true)
                .audit_query(query)
                .audit(move |record: AuditRecord| sink.lock().unwrap().push(record)),
        )
        .layer(BodyTimeoutLayer::new(BODY_PAUSE))
        .layer(BodyLimitLayer::new(LIMIT))
        .service(gateway);
    serve_tower_on(listener, service);
    Setup {
        client: TestClient::new(addr),
        addr,
        upstream,
        records,
    }
}

async fn access_token(client: &TestClient, scope: &str) -> String {
    client.client_token("app", SECRET, scope).await
}

/// The records so far, waiting (up to 10 s: a busy machine may take a while) for the last one
/// (written as the response leaves).
async fn records(setup: &Setup, at_least: usize) -> Vec<AuditRecord> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = setup.records.lock().unwrap().clone();
        if records.len() >= at_least {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {at_least} audit records: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn request_ids_reach_the_upstream_and_every_response() {
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    let auth = format!("Bearer {token}");

    let reply = setup
        .client
        .get(
            "/Patient/1",
            &[("authorization", &auth), ("x-request-id", "trace-42")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-request-id"], "trace-42");
    assert_eq!(setup.upstream.last().headers["x-request-id"], "trace-42");

    // A refusal carries it too; an unsound one is replaced, and the upstream sees the new one.
    let refused = setup
        .client
        .get("/Patient/1", &[("x-request-id", "trace-43")])
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers["x-request-id"], "trace-43");
    let replaced = setup
        .client
        .get(
            "/Patient/2",
            &[("authorization", &auth), ("x-request-id", "bad id!")],
        )
        .await;
    let made = replaced.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(made, "bad id!");
    assert_eq!(setup.upstream.last().headers["x-request-id"], made.as_str());
    let made_too = setup.client.get("/metadata", &[]).await;
    assert!(made_too.headers.contains_key("x-request-id"));

    // An upstream that answers with an id of its own: the client gets the request's, and the
    // upstream's beside it.
    let mut answer = Answer::json(serde_json::json!({"resourceType": "Patient", "id": "3"}));
    answer
        .headers
        .push(("x-request-id".into(), "hapi 7f3a".into()));
    setup.upstream.answer("/fhir/Patient/3", answer);
    let reply = setup
        .client
        .get(
            "/Patient/3",
            &[("authorization", &auth), ("x-request-id", "trace-44")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let ids: Vec<_> = reply.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["trace-44"]);
    assert_eq!(reply.headers["x-upstream-request-id"], "hapi 7f3a");
}

#[tokio::test]
async fn health_and_readiness_need_no_token_and_reveal_nothing() {
    let setup = setup(QueryRecording::Names).await;
    let live = setup.client.get("/healthz", &[]).await;
    assert_eq!(
        (live.status, live.text().as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
    // The token endpoint's keys are in-process: fetched at the first check or soon after.
    // (Up to 10 s: a busy machine may take a while.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut ready = setup.client.get("/readyz", &[]).await;
    while ready.status != StatusCode::OK && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = setup.client.get("/readyz", &[]).await;
    }
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert!(!ready.text().contains(TENANT));
    assert!(setup.upstream.received().is_empty());
}

#[tokio::test]
async fn every_request_gets_one_audit_record_without_secrets() {
    let started = std::time::SystemTime::now();
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    let auth = format!("Bearer {token}");
    let other = access_token(&setup.client, UNKNOWN).await;

    let read = setup
        .client
        .get(
            "/Observation?patient=Smith&code=1234",
            &[("authorization", &auth), ("x-request-id", "r-1")],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    let not_onboarded = setup.client.get_bearer("/Patient/9", &other).await;
    assert_eq!(not_onboarded.status, StatusCode::FORBIDDEN);
    let bad_token = setup.client.get_bearer("/Patient/9", "not.a.token").await;
    assert_eq!(bad_token.status, StatusCode::UNAUTHORIZED);
    let bad_secret = setup
        .client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            "grant_type=client_credentials&client_id=app&client_secret=wrong-secret-0123456789",
        )
        .await;
    assert_eq!(bad_secret.status, StatusCode::UNAUTHORIZED);

    let records = records(&setup, 6).await;
    assert_eq!(records.len(), 6, "{records:#?}");
    for record in &records {
        assert!(
            record.time >= started && record.time <= std::time::SystemTime::now(),
            "{record:?}: its time is the request's"
        );
    }
    let [issued, _, search, refused, invalid, failed] = &records[..] else {
        unreachable!()
    };
    assert_eq!(issued.interaction, Some("token"));
    assert_eq!((issued.status, issued.outcome), (200, "ok"));
    assert_eq!(issued.client_id.as_deref(), Some("app"));
    assert_eq!(issued.tenant, TenantId::parse(TENANT).ok());
    let base = format!("http://{}", setup.addr);
    assert_eq!(issued.issuer.as_deref(), Some(base.as_str()));

    assert_eq!(search.request_id.as_deref(), Some("r-1"));
    assert_eq!(search.interaction, Some("search"));
    assert_eq!(search.resource_type.as_deref(), Some("Observation"));
    assert_eq!(
        search.query.as_deref(),
        Some("patient&code"),
        "values are not recorded"
    );
    assert_eq!(search.client_id.as_deref(), Some("app"));
    assert_eq!(
        search.issuer.as_deref(),
        Some(format!("http://{}", setup.addr).as_str())
    );
    assert_eq!(search.tenant, TenantId::parse(TENANT).ok());
    assert_eq!(
        search.upstream.as_deref(),
        Some(setup.upstream.base("/fhir").as_str())
    );
    assert_eq!((search.status, search.outcome), (200, "ok"));
    assert!(search.duration_ms > 0.0);

    assert_eq!((refused.status, refused.outcome), (403, "forbidden"));
    assert_eq!(refused.tenant, TenantId::parse(UNKNOWN).ok());
    assert_eq!(refused.interaction, Some("read"));
    assert_eq!(refused.upstream, None);
    assert_eq!((invalid.status, invalid.outcome), (401, "invalid_token"));
    assert_eq!(invalid.client_id, None);
    assert_eq!((failed.status, failed.outcome), (401, "invalid_client"));
    assert_eq!(failed.client_id.as_deref(), Some("app"));
    assert_eq!(failed.issuer.as_deref(), Some(base.as_str()));

    let written = serde_json::to_string(&records).unwrap();
    for secret in [SECRET, "wrong-secret", &token, "Smith", "1234"] {
        assert!(!written.contains(secret), "{secret} is in an audit record");
    }
}

#[tokio::test]
async fn a_full_query_is_recorded_when_asked() {
    let setup = setup(QueryRecording::Full).await;
    let token = access_token(&setup.client, TENANT).await;
    setup.client.get_bearer("/Patient?name=Smith", &token).await;
    let records = records(&setup, 2).await;
    assert_eq!(records[1].query.as_deref(), Some("name=Smith"));
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_at_once() {
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    // 100 MiB announced, nothing sent: the answer comes without the body.
    let addr = setup.addr;
    let head = format!(
        "POST /Bundle HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: 104857600\r\n\r\n"
    );
    let answer = tokio::task::spawn_blocking(move || send_head(addr, &head))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too-long"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id"),
        "{answer}"
    );
    assert!(setup.upstream.received().is_empty(), "the upstream saw it");
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_400_not_an_upstream_failure() {
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    let addr = setup.addr;
    // A first chunk, then a chunk size that is not hex: hyper fails the body mid-way, while
    // the request is already on its way upstream. Before, that answered 502 "could not be
    // reached" and logged an upstream failure: a client could fake outages at will.
    let request = format!(
        "POST /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n\
         1\r\n{{\r\nzz\r\n}}\r\n0\r\n\r\n"
    );
    let (answer, _) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("could not be read whole"), "{answer}");
    for received in setup.upstream.received() {
        assert!(received.body.len() < 2, "{received:?}");
    }
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_cut_off_not_buffered() {
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    let addr = setup.addr;
    // A chunked 100 MiB body: the gateway answers once it has read past the limit, and the
    // client never has to send the rest.
    let (answer, sent) = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "POST /Bundle HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .unwrap();
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0u64;
        while sent < 100 * 1024 * 1024 {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if stream.write_all(&framed).is_err() {
                break;
            }
            sent += chunk.len() as u64;
            if sent > 4 * LIMIT {
                break;
            }
        }
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        (String::from_utf8_lossy(&head).into_owned(), sent)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(sent <= 4 * LIMIT + 64 * 1024, "sent {sent}");
    // The upstream never got a whole request: whatever reached it ended short.
    for received in setup.upstream.received() {
        assert!(
            (received.body.len() as u64) < LIMIT,
            "{} bytes",
            received.body.len()
        );
    }
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_and_its_record_says_timeout() {
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    let addr = setup.addr;
    let request = format!(
        "POST /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: 64\r\n\r\n{{\"resourceType\""
    );
    let (answer, waited) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains(r#""code":"timeout""#), "{answer}");
    assert!(
        waited >= BODY_PAUSE - Duration::from_millis(100),
        "{waited:?}"
    );
    assert!(
        waited < Duration::from_secs(9),
        "closed only by the client's timeout: {waited:?}"
    );
    let records = records(&setup, 2).await;
    let record = records.last().unwrap();
    assert_eq!((record.status, record.outcome), (408, "timeout"));
    assert_eq!(
        record.tenant.as_ref().map(ToString::to_string).as_deref(),
        Some(TENANT)
    );
    setup.upstream.assert_started_never_whole(64).await;
}

#[tokio::test]
async fn a_large_bundle_within_the_limit_passes_unchanged() {
    let setup = setup(QueryRecording::Names).await;
    let token = access_token(&setup.client, TENANT).await;
    let entry = r#"{"resource":{"resourceType":"Observation","status":"final"}},"#;
    let mut bundle = String::from(r#"{"resourceType":"Bundle","type":"batch","entry":["#);
    while (bundle.len() as u64) < LIMIT - 1000 {
        bundle.push_str(entry);
    }
    bundle.push_str(r#"{"resource":{"resourceType":"Patient"}}]}"#);
    let reply = setup
        .client
        .send(
            "POST",
            "/",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/fhir+json"),
            ],
            &bundle,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(setup.upstream.last().body, bundle.as_bytes());
}
