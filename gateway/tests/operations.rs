//! Operating the gateway binary, over real HTTP: health and readiness, request ids, metrics,
//! audit records (to a file, and to a full disk), CORS, request body limits, a flood of
//! token requests with unknown client ids, and a trusted identity provider whose access
//! tokens are typed. Each attack is bounded in time: a regression fails, it does not hang.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const SECRET: &str = "operations-secret-0123456789";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const RSA_PRIVATE: &str = include_str!("../../tests/support/keys/rsa_private.pem");

struct Running {
    proc: Proc,
    client: TestClient,
    addr: SocketAddr,
}

/// The gateway with the base configuration plus `extra`, in front of `upstream`.
fn start(dir: &Path, upstream: &RecordingUpstream, extra: Value) -> Running {
    // Port 0, the address read from the start line: a port picked by `free_port` could be
    // picked for another test's gateway at the same moment, and with `SO_REUSEPORT` both
    // would take it and share its connections.
    let mut config = json!({
        "listen": "127.0.0.1:0",
        "state_dir": dir.join("state"),
        "clients": [{"client_id": "app", "client_secret": SECRET, "tenants": [TENANT]}],
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]}],
        "secret_hashing": {"memory_kib": 4096, "iterations": 2}
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
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
        addr,
    }
}

async fn token(client: &TestClient) -> String {
    client.client_token("app", SECRET, TENANT).await
}

async fn metrics(addr: SocketAddr) -> String {
    TestClient::new(addr).get("/metrics", &[]).await.text()
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Polls `check` every 50 ms for up to `within`.
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The audit log's text and records once it holds at least `count` (for at most 5 s).
async fn audit_records(audit: &Path, count: usize) -> (String, Vec<Value>) {
    let recorded = eventually(Duration::from_secs(5), async || {
        std::fs::read_to_string(audit)
            .unwrap_or_default()
            .lines()
            .count()
            >= count
    })
    .await;
    assert!(recorded, "fewer than {count} audit records");
    let written = std::fs::read_to_string(audit).unwrap();
    let records = written
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (written, records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_body_that_breaks_off_is_logged_and_cut_for_the_client() {
    use tokio::io::AsyncWriteExt;
    // An upstream whose streamed (not JSON) answer has a malformed second chunk.
    let base = raw_upstream(|_head, mut stream| async move {
        let _ = stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                  Transfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",
            )
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.write_all(b"zz\r\nnot a chunk\r\n").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    let dir = scratch("operations-body-breaks-off");
    let unused = RecordingUpstream::start().await;
    let gw = start(
        &dir,
        &unused,
        json!({"tenants": [{"id": TENANT, "upstreams": [{"base_url": base, "fhir_version": "4.0"}]}]}),
    );
    let token = token(&gw.client).await;
    let request = format!(
        "GET /Binary/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let addr = gw.addr;
    let (answer, took) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    // The head had gone: the client gets what came, then its connection is broken off
    // without the chunked body's end, so it cannot take the part for the whole.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("0123456789abcdef"), "{answer}");
    assert!(!answer.ends_with("0\r\n\r\n"), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let logged = eventually(Duration::from_secs(5), async || {
        let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
        without_colours(&log)
            .lines()
            .any(|line| line.contains("WARN") && line.contains("upstream response body broke off"))
    })
    .await;
    assert!(
        logged,
        "no warning: {}",
        std::fs::read_to_string(dir.join("gateway.log")).unwrap()
    );
}

/// The decoded JSON of a compact JWT's header (`part` 0) or payload (1).
fn jwt_part(token: &str, part: usize) -> Value {
    use base64::Engine;
    let encoded = token.split('.').nth(part).unwrap();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .unwrap();
    serde_json::from_slice(&decoded).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_issuers_token_types_refuse_its_other_jwts_and_our_tokens_are_typed() {
    let dir = scratch("operations-token-types");
    let upstream = RecordingUpstream::start().await;
    let idp = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
    let gw = start(
        &dir,
        &upstream,
        json!({"trusted_issuers": [{"issuer": "https://idp.test", "jwks_uri": idp.url(),
            "audience": "api://fhir", "any_tenant": true, "token_types": ["at+jwt"]}]}),
    );
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let minted = |typ: Option<&str>| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.typ = typ.map(str::to_owned);
        header.kid = Some("k1".to_owned());
        let claims = json!({"iss": "https://idp.test", "aud": "api://fhir", "sub": "svc",
            "exp": now() + 600, "scope": TENANT});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let read = async |token: &str| {
        gw.client
            .get(
                "/Patient/1",
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await
    };

    let typed = read(&minted(Some("at+jwt"))).await;
    assert_eq!(typed.status, StatusCode::OK, "{}", typed.text());
    let forwarded = upstream.received().len();
    // An ID token or any other JWT the provider signs with the same key, typed otherwise or
    // not at all, is not an access token here.
    for typ in [Some("JWT"), None, Some("logout+jwt")] {
        let refused = read(&minted(typ)).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{typ:?}");
        let challenge = refused.headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("error=\"invalid_token\"")
                && challenge.contains("The token's type (typ) is not one accepted"),
            "{typ:?}: {challenge}"
        );
        assert_eq!(refused.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(
        upstream.received().len(),
        forwarded,
        "a refused token reached the upstream"
    );

    // The gateway's own tokens are RFC 9068 access tokens: typed, naming their client.
    let own = token(&gw.client).await;
    assert_eq!(jwt_part(&own, 0)["typ"], "at+jwt");
    assert_eq!(jwt_part(&own, 1)["client_id"], "app");
    assert_eq!(read(&own).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_request_ids_metrics_and_audit_records() {
    let started = SystemTime::now();
    let dir = scratch("operations");
    let upstream = RecordingUpstream::start().await;
    let idp = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
    idp.set_status(StatusCode::SERVICE_UNAVAILABLE);
    let audit = dir.join("audit.jsonl");
    let gw = start(
        &dir,
        &upstream,
        json!({
            "trusted_issuers": [{"issuer": "https://idp.test", "jwks_uri": idp.url(), "audience": "api://fhir"}],
            "metrics_listen": "127.0.0.1:0",
            "audit_log": audit,
            "audit_query": "full",
        }),
    );
    let metrics_addr = gw.proc.metrics_address();

    // Alive at once; not ready while the identity provider's keys cannot be fetched, and the
    // answer names the kind of thing missing, not the issuer.
    let live = gw.client.get("/healthz", &[]).await;
    assert_eq!(live.status, StatusCode::OK);
    let waiting = gw.client.get("/readyz", &[]).await;
    assert_eq!(
        waiting.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        waiting.text()
    );
    assert_eq!(
        waiting.json()["waiting_for"],
        json!(["trusted issuers' keys"])
    );
    assert!(!waiting.text().contains("idp.test"));
    // The provider answers again only once a failed fetch has been counted (the first fetch
    // may still be on its way when readiness is first asked).
    let failed = eventually(Duration::from_secs(10), async || {
        sample(
            &metrics(metrics_addr).await,
            "tower_fhir_jwks_fetches_total",
            &["https://idp.test", "result=\"error\""],
        )
        .is_some()
    })
    .await;
    assert!(failed, "no failed JWKS fetch was counted");
    idp.set_status(StatusCode::OK);
    let ready = eventually(Duration::from_secs(10), async || {
        gw.client.get("/readyz", &[]).await.status == StatusCode::OK
    })
    .await;
    assert!(
        ready,
        "/readyz never became ready once the keys could be fetched"
    );

    // A request id goes to the upstream and comes back; refusals carry one too.
    let token = token(&gw.client).await;
    let read = gw
        .client
        .get(
            "/Patient/1?_elements=name",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-request-id", "op-1"),
            ],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.headers["x-request-id"], "op-1");
    assert_eq!(upstream.last().headers["x-request-id"], "op-1");
    let refused = gw.client.get("/Patient/1", &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.headers.contains_key("x-request-id"));

    // Metrics: requests by tenant, status class and outcome; tokens; latencies; JWKS fetches.
    let text = metrics(metrics_addr).await;
    // The token request (for the tenant) and the read.
    let ok = sample(
        &text,
        "tower_fhir_requests_total",
        &[TENANT, "status_class=\"2xx\"", "outcome=\"ok\""],
    );
    assert_eq!(ok, Some(2.0), "{text}");
    let missing = sample(
        &text,
        "tower_fhir_requests_total",
        &["status_class=\"4xx\"", "outcome=\"missing_token\""],
    );
    assert_eq!(missing, Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "tower_fhir_token_requests_total",
            &["result=\"issued\""]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "tower_fhir_jwks_fetches_total",
            &["https://idp.test", "result=\"error\""]
        )
        .is_some(),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "tower_fhir_jwks_fetches_total",
            &["https://idp.test", "result=\"ok\""]
        )
        .is_some(),
        "{text}"
    );
    // Every request counted has its duration in the histogram; the read went upstream once.
    let requests: f64 = text
        .lines()
        .filter(|line| line.starts_with("tower_fhir_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    for (histogram, count) in [
        ("tower_fhir_request_duration_seconds", requests),
        ("tower_fhir_upstream_duration_seconds", 1.0),
    ] {
        // Once: kept as buckets, not also by the exporter.
        let types = text.matches(&format!("# TYPE {histogram} ")).count();
        assert_eq!(types, 1, "{text}");
        assert!(
            text.contains(&format!("# TYPE {histogram} histogram\n")),
            "{text}"
        );
        let counted = sample(&text, &format!("{histogram}_count"), &[]);
        assert_eq!(counted, Some(count), "{text}");
        let all = sample(&text, &format!("{histogram}_bucket"), &["le=\"+Inf\""]);
        assert_eq!(all, Some(count), "{text}");
        let under_30s = sample(&text, &format!("{histogram}_bucket"), &["le=\"30\""]);
        assert_eq!(under_30s, Some(count), "{text}");
    }
    assert!(
        sample(&text, "tower_fhir_cache_total", &["cache=\"route\""]).is_some(),
        "{text}"
    );
    assert!(text.contains("tower_fhir_requests_in_flight"), "{text}");

    // The audit log: the token request, the read, the refusal; no token or secret.
    let (written, records) = audit_records(&audit, 3).await;
    let read = records
        .iter()
        .find(|r| r["request_id"] == "op-1")
        .expect("the read's record");
    assert_eq!(read["interaction"], "read");
    assert_eq!(read["resource_type"], "Patient");
    assert_eq!(read["resource_id"], "1");
    assert_eq!(read["tenant"], TENANT);
    assert_eq!(read["client_id"], "app");
    assert_eq!(read["client_address"], "127.0.0.1");
    assert_eq!(read["query"], "_elements=name");
    assert_eq!(read["status"], 200);
    assert_eq!(read["outcome"], "ok");
    assert_eq!(read["upstream"], upstream.base("/fhir"));
    assert!(read["duration_ms"].as_f64().unwrap() >= 0.0);
    // The request's wall time, to the millisecond, read from the monotonic clock against
    // the writer's wall clock.
    let time = humantime::parse_rfc3339(read["time"].as_str().unwrap()).unwrap();
    assert!(
        time + Duration::from_millis(1) >= started && time <= SystemTime::now(),
        "{time:?} is not between the test's start {started:?} and now"
    );
    assert!(records
        .iter()
        .any(|r| r["interaction"] == "token" && r["status"] == 200));
    assert!(records
        .iter()
        .any(|r| r["outcome"] == "missing_token" && r["status"] == 401));
    assert!(!written.contains(&token) && !written.contains(SECRET));
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_audit_records_loudly_and_requests_go_on() {
    let dir = scratch("operations-full-disk");
    let upstream = RecordingUpstream::start().await;
    let gw = start(
        &dir,
        &upstream,
        json!({"audit_log": "/dev/full", "metrics_listen": "127.0.0.1:0"}),
    );
    let metrics_addr = gw.proc.metrics_address();
    let token = token(&gw.client).await;
    for _ in 0..5 {
        let reply = gw.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let counted = eventually(Duration::from_secs(5), async || {
        sample(
            &metrics(metrics_addr).await,
            "tower_fhir_audit_records_dropped_total",
            &[],
        )
        .is_some_and(|dropped| dropped >= 6.0)
    })
    .await;
    assert!(counted, "{}", metrics(metrics_addr).await);
    assert!(
        gw.proc.stderr().contains("audit records dropped"),
        "{}",
        gw.proc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_without_a_token_for_allowed_origins_only() {
    let dir = scratch("operations-cors");
    let upstream = RecordingUpstream::start().await;
    let gw = start(
        &dir,
        &upstream,
        json!({"cors_allowed_origins": ["https://app.example"]}),
    );
    let preflight = |origin: &'static str| {
        let client = &gw.client;
        async move {
            client
                .send(
                    "OPTIONS",
                    "/Patient/1",
                    &[
                        ("origin", origin),
                        ("access-control-request-method", "GET"),
                        ("access-control-request-headers", "authorization"),
                    ],
                    "",
                )
                .await
        }
    };
    let allowed = preflight("https://app.example").await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(
        allowed.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(allowed.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let other = preflight("https://evil.example").await;
    assert!(other.headers.get("access-control-allow-origin").is_none());
    // An actual request from the allowed origin still needs its token, and may read the id.
    let refused = gw
        .client
        .get("/Patient/1", &[("origin", "https://app.example")])
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(upstream.received().is_empty());
    // An OPTIONS that is no preflight (DSTU2's capabilities interaction) is the stack's: it
    // needs a token, and with one reaches the upstream.
    let options = gw.client.send("OPTIONS", "/", &[], "").await;
    assert_eq!(options.status, StatusCode::UNAUTHORIZED);
    let token = token(&gw.client).await;
    let bearer = format!("Bearer {token}");
    let options = gw
        .client
        .send("OPTIONS", "/", &[("authorization", &bearer)], "")
        .await;
    assert!(options
        .headers
        .get("access-control-allow-methods")
        .is_none());
    assert_eq!(upstream.last().method, "OPTIONS");
    // From a page of the allowed origin, the browser may read it.
    let headers = [
        ("authorization", bearer.as_str()),
        ("origin", "https://app.example"),
    ];
    let options = gw.client.send("OPTIONS", "/", &headers, "").await;
    assert_eq!(
        options.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(upstream.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_are_refused_and_large_ones_within_pass_unchanged() {
    let dir = scratch("operations-bodies");
    let upstream = RecordingUpstream::start().await;
    let gw = start(&dir, &upstream, json!({}));
    let token = token(&gw.client).await;

    // 100 MiB announced against the default 16 MiB: refused before a byte of it is read.
    let addr = gw.addr;
    let bearer = token.clone();
    let answer = tokio::task::spawn_blocking(move || {
        send_head(
            addr,
            &format!("POST /Bundle HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/fhir+json\r\nContent-Length: 104857600\r\n\r\n"),
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too-long"), "{answer}");
    assert!(upstream.received().is_empty());

    // The token endpoint's clients read RFC 6749 errors, also from the limit in front of it:
    // a body announced past the limit, and a compressed one.
    for (extra, status) in [
        ("Content-Length: 17000000\r\n", "413"),
        ("Content-Encoding: gzip\r\nContent-Length: 3\r\n", "415"),
    ] {
        let answer = tokio::task::spawn_blocking(move || {
            send_head(
                addr,
                &format!("POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n{extra}\r\nabc"),
            )
        })
        .await
        .unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\ncontent-type: application/json;charset=utf-8\r\n"),
            "{answer}"
        );
        assert!(answer.contains(r#""error":"invalid_request""#), "{answer}");
    }

    // A 10 MiB Bundle passes byte for byte.
    let entry =
        r#"{"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"}}},"#;
    let mut bundle = String::from(r#"{"resourceType":"Bundle","type":"transaction","entry":["#);
    while bundle.len() < 10 * 1024 * 1024 {
        bundle.push_str(entry);
    }
    bundle.push_str(r#"{"resource":{"resourceType":"Patient"}}]}"#);
    let reply = gw
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
    assert_eq!(upstream.last().body, bundle.as_bytes());
    drop(gw);

    // A smaller configured limit applies to what is streamed without a length too.
    let dir = scratch("operations-bodies-small");
    let gw = start(&dir, &upstream, json!({"max_request_body_bytes": 1000}));
    let token = self::token(&gw.client).await;
    let reply = gw
        .client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/fhir+json"),
            ],
            &" ".repeat(2000),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["issue"][0]["code"], "too-long");

    // A compressed body, which the limit would count compressed (a gzip bomb): refused.
    let received = upstream.received().len();
    let reply = gw
        .client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/fhir+json"),
                ("content-encoding", "gzip"),
            ],
            "\u{1f}\u{8b}",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply.headers["accept-encoding"], "identity");
    assert_eq!(reply.json()["issue"][0]["code"], "not-supported");
    assert_eq!(upstream.received().len(), received);
}

/// A token request refused for its body is counted as a token request and as a body too
/// large, whichever limit refused it: `max_request_body_bytes` in front of the token endpoint,
/// or the endpoint's own 8 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_refused_for_their_bodies_are_counted() {
    let dir = scratch("operations-token-bodies");
    let upstream = RecordingUpstream::start().await;
    let gw = start(
        &dir,
        &upstream,
        json!({"max_request_body_bytes": 20000, "metrics_listen": "127.0.0.1:0"}),
    );
    let at = gw.proc.metrics_address();
    let form = ("content-type", "application/x-www-form-urlencoded");
    let refused = |metrics: &str| {
        (
            sample(
                metrics,
                "tower_fhir_token_requests_total",
                &[r#"result="invalid_request""#],
            )
            .unwrap_or(0.0),
            sample(metrics, "tower_fhir_body_too_large_total", &[]).unwrap_or(0.0),
        )
    };
    for (body, headers, status, expected) in [
        // Over `max_request_body_bytes`, said by its length.
        (
            "x".repeat(30_000),
            vec![form],
            StatusCode::PAYLOAD_TOO_LARGE,
            (1.0, 1.0),
        ),
        // Within it, over the token endpoint's own 8 KiB.
        (
            "x".repeat(10_000),
            vec![form],
            StatusCode::PAYLOAD_TOO_LARGE,
            (2.0, 2.0),
        ),
        // Compressed.
        (
            "\u{1f}\u{8b}".to_owned(),
            vec![form, ("content-encoding", "gzip")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            (3.0, 2.0),
        ),
    ] {
        let reply = gw
            .client
            .send("POST", "/oauth/token", &headers, &body)
            .await;
        assert_eq!(reply.status, status, "{}", reply.text());
        assert_eq!(reply.json()["error"], "invalid_request");
        let counted = refused(&metrics(at).await);
        assert_eq!(counted, expected, "{} bytes", body.len());
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tower_fhir_upstream_duration_seconds` counts the exchanges that failed too: a `504` its
/// whole wait (a histogram of answers alone hides the slowest), a refused connection until
/// it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_durations_count_timeouts_and_refused_connections() {
    let dir = scratch("operations-upstream-durations");
    let upstream = RecordingUpstream::start().await;
    let mut slow = Answer::json(json!({"resourceType": "Patient", "id": "1"}));
    slow.delay = Duration::from_secs(3);
    upstream.answer("/fhir/Patient/slow", slow);
    let refusing = format!("http://127.0.0.1:{}/fhir", free_port());
    let tenants = json!([
        {"id": TENANT, "upstreams": [
            {"base_url": upstream.base("/fhir"), "fhir_version": "4.0", "timeout_ms": 1000}]},
        {"id": "9b2e1c3d-0000-4000-8000-00000000000b", "upstreams": [
            {"base_url": refusing, "fhir_version": "4.0"}]}
    ]);
    let clients = json!([
        {"client_id": "app", "client_secret": SECRET, "tenants": [TENANT]},
        {"client_id": "gone", "client_secret": SECRET,
         "tenants": ["9b2e1c3d-0000-4000-8000-00000000000b"]}
    ]);
    let gw = start(
        &dir,
        &upstream,
        json!({"tenants": tenants, "clients": clients, "metrics_listen": "127.0.0.1:0"}),
    );
    let at = gw.proc.metrics_address();
    let bearer = format!("Bearer {}", token(&gw.client).await);
    let reply = gw
        .client
        .get("/Patient/slow", &[("authorization", &bearer)])
        .await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    let text = metrics(at).await;
    let count =
        |text: &str| sample(text, "tower_fhir_upstream_duration_seconds_count", &[]).unwrap_or(0.0);
    let sum = sample(&text, "tower_fhir_upstream_duration_seconds_sum", &[]).unwrap();
    assert_eq!(count(&text), 1.0, "{text}");
    assert!(sum >= 1.0, "the whole wait: {sum}");
    let form = format!(
        "grant_type=client_credentials&client_id=gone&client_secret={SECRET}&scope=9b2e1c3d-0000-4000-8000-00000000000b"
    );
    let reply = gw.client.send("POST", "/oauth/token", &[FORM], &form).await;
    let bearer = format!("Bearer {}", reply.json()["access_token"].as_str().unwrap());
    let reply = gw
        .client
        .get("/Patient/1", &[("authorization", &bearer)])
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(count(&metrics(at).await), 2.0);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_looks_like_the_servers_own_refusal_passes_byte_for_byte() {
    // What hyper writes when it cannot parse a head, as a stored Binary's bytes, sent after
    // the response head (so the gateway writes them to the client on their own): the gateway
    // gives hyper's own refusal a FHIR body, but never touches a response's body.
    let lookalike = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
    let base = support::raw_upstream(move |_head, mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            lookalike.len() * 2
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.flush().await;
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.write_all(lookalike.as_bytes()).await;
            let _ = stream.flush().await;
        }
    })
    .await;
    let dir = scratch("operations-lookalike");
    let unused = RecordingUpstream::start().await;
    let tenants = json!([{"id": TENANT, "upstreams": [{"base_url": base, "fhir_version": "4.0"}]}]);
    let gw = start(&dir, &unused, json!({"tenants": tenants}));
    let token = token(&gw.client).await;
    for _ in 0..3 {
        let reply = gw
            .client
            .send(
                "GET",
                "/Binary/1",
                &[("authorization", &format!("Bearer {token}"))],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), lookalike.repeat(2));
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_no_path_is_refused_not_sent_to_the_tenants_base() {
    let dir = scratch("operations-targets");
    let upstream = RecordingUpstream::start().await;
    let gw = start(&dir, &upstream, json!({}));
    let token = token(&gw.client).await;
    let addr = gw.addr;
    for (line, says) in [
        // The authority form, for CONNECT alone: its empty path would become the base's.
        (
            format!("GET 127.0.0.1:{} HTTP/1.1", addr.port()),
            "only CONNECT",
        ),
        (
            "POST upstream.example:443 HTTP/1.1".to_owned(),
            "only CONNECT",
        ),
        ("GET * HTTP/1.1".to_owned(), "asks of the server itself"),
        ("OPTIONS * HTTP/1.1".to_owned(), "asks of the server itself"),
    ] {
        let head = format!(
            "{line}\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
        );
        let answer = tokio::task::spawn_blocking(move || send_head(addr, &head))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{line}: {answer}");
        assert!(answer.contains(says), "{line}: {answer}");
        assert!(answer.contains("application/fhir+json"), "{line}: {answer}");
    }
    assert!(upstream.received().is_empty());
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_client_ids_stays_bounded_and_a_real_client_is_served() {
    let dir = scratch("operations-flood");
    let upstream = RecordingUpstream::start().await;
    let gw = start(&dir, &upstream, json!({"token_hashing_concurrency": 2}));

    // 1,000 token requests with unknown ids over 200 parallel connections.
    let client = TestClient::new(gw.addr);
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for worker in 0..200 {
        let client = TestClient::new(gw.addr);
        flood.spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..5 {
                let body = format!(
                    "grant_type=client_credentials&client_id=intruder-{worker}-{i}&client_secret=guess-0123456789abcdef"
                );
                let reply = tokio::time::timeout(
                    Duration::from_secs(60),
                    client.send("POST", "/oauth/token", &[FORM], &body),
                )
                .await
                .expect("a token request hung");
                statuses.push(reply.status);
            }
            statuses
        });
    }
    // Meanwhile a correct client, from another address, gets its token.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut peak = gw.proc.rss_kib();
    let real = client.connecting_from("127.0.0.2".parse().unwrap());
    let asked = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        real.send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id=app&client_secret={SECRET}&scope={TENANT}"
            ),
        ),
    )
    .await
    .expect("the real client's token request hung");
    let waited = asked.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        waited < Duration::from_secs(5),
        "the real client waited {waited:?}"
    );

    let mut statuses = Vec::new();
    while let Some(done) = flood.join_next().await {
        statuses.extend(done.unwrap());
        peak = peak.max(gw.proc.rss_kib());
    }
    assert_eq!(statuses.len(), 1000);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED
            || *s == StatusCode::SERVICE_UNAVAILABLE
            || *s == StatusCode::TOO_MANY_REQUESTS),
        "{:?}",
        statuses
            .iter()
            .filter(|s| s.is_server_error() && **s != StatusCode::SERVICE_UNAVAILABLE)
            .collect::<Vec<_>>()
    );
    assert!(!statuses.contains(&StatusCode::INTERNAL_SERVER_ERROR));
    assert!(peak < 150 * 1024, "resident memory peaked at {peak} KiB");
    eprintln!(
        "flood: {} requests in {:?}; {} refused 401, {} busy 503; real client waited {waited:?}; peak RSS {} MiB",
        statuses.len(),
        started.elapsed(),
        statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(),
        statuses.iter().filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE).count(),
        peak / 1024
    );
}

/// The audit file's request ids, in order (none when it does not exist); a last line not yet
/// written whole is left out.
fn audited_ids(file: &Path) -> Vec<String> {
    let written = std::fs::read_to_string(file).unwrap_or_default();
    let whole = written.rfind('\n').map_or("", |end| &written[..end]);
    whole
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["request_id"].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_audit_log_for_rotation_and_loses_no_record() {
    let dir = scratch("operations-rotate");
    let upstream = RecordingUpstream::start().await;
    let (audit, rotated) = (dir.join("audit.jsonl"), dir.join("audit.jsonl.1"));
    let gw = start(&dir, &upstream, json!({"audit_log": audit}));
    let token = token(&gw.client).await;
    let read = async |id: &str| {
        let reply = gw
            .client
            .get(
                "/Patient/1",
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("x-request-id", id),
                ],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    };
    read("before-1").await;
    // Both records made before the rotation (the token request's and the read's) are written
    // before the file is renamed. The writer takes each worker thread's buffer in turn, so a
    // record can reach the file after a later one (requests on two connections, each served
    // by its own worker); one still waiting at the reopen would go to the new file.
    let written = eventually(Duration::from_secs(5), async || {
        let ids = audited_ids(&audit);
        ids.len() >= 2 && ids.contains(&"\"before-1\"".to_owned())
    })
    .await;
    assert!(written, "{:?}", audited_ids(&audit));
    let before = audited_ids(&audit);
    assert_eq!(before.len(), 2, "{before:?}");

    // Rotate: rename, then SIGHUP; once reopened, the renamed file is written no more.
    std::fs::rename(&audit, &rotated).unwrap();
    assert!(gw.proc.signal("HUP"), "kill -HUP failed");
    let reopened = eventually(Duration::from_secs(10), async || {
        gw.proc.stderr().contains("audit log reopened")
    })
    .await;
    assert!(reopened, "{}", gw.proc.stderr());
    let rotated_len = std::fs::metadata(&rotated).unwrap().len();
    read("after-1").await;
    read("after-2").await;
    let written = eventually(Duration::from_secs(5), async || {
        audited_ids(&audit).len() >= 2
    })
    .await;
    assert!(written, "{:?}", audited_ids(&audit));
    // Each record once, in either order: the client's pool may send the second read on a new
    // connection, served (and its record buffered) by the other worker thread.
    let mut after = audited_ids(&audit);
    after.sort();
    assert_eq!(after, ["\"after-1\"", "\"after-2\""]);
    assert_eq!(std::fs::metadata(&rotated).unwrap().len(), rotated_len);
    assert_eq!(audited_ids(&rotated), before);
    // The gateway still serves (the signal did not end it).
    assert_eq!(gw.client.get("/healthz", &[]).await.status, StatusCode::OK);
    // The reopened file is private, as the first one.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&audit).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_an_audit_file_is_logged_and_ignored() {
    let dir = scratch("operations-hup");
    let upstream = RecordingUpstream::start().await;
    let gw = start(&dir, &upstream, json!({}));
    assert!(gw.proc.signal("HUP"), "kill -HUP failed");
    let logged = eventually(Duration::from_secs(10), async || {
        gw.proc.stderr().contains("no audit log file to reopen")
    })
    .await;
    assert!(logged, "{}", gw.proc.stderr());
    assert_eq!(gw.client.get("/healthz", &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_label_and_query_values_can_be_left_out() {
    let dir = scratch("operations-quiet");
    let upstream = RecordingUpstream::start().await;
    let audit = dir.join("audit.jsonl");
    let gw = start(
        &dir,
        &upstream,
        json!({
            "metrics_listen": "127.0.0.1:0",
            "metrics_tenant_label": false,
            "audit_log": audit,
            "audit_query": "none",
        }),
    );
    let metrics_addr = gw.proc.metrics_address();
    let token = token(&gw.client).await;
    let reply = gw
        .client
        .get_bearer("/Patient?name=Smith&birthdate=1970", &token)
        .await;
    assert_eq!(reply.status, StatusCode::OK);

    let text = metrics(metrics_addr).await;
    let ok = sample(
        &text,
        "tower_fhir_requests_total",
        &["status_class=\"2xx\"", "outcome=\"ok\""],
    );
    assert_eq!(ok, Some(2.0), "{text}");
    assert!(!text.contains(TENANT), "a tenant label is left: {text}");

    let (written, records) = audit_records(&audit, 2).await;
    let search = records
        .iter()
        .find(|r| r["interaction"] == "search")
        .expect("the search's record");
    assert_eq!(search["query"], Value::Null);
    assert_eq!(search["tenant"], TENANT, "the record keeps the tenant");
    assert!(!written.contains("Smith") && !written.contains("birthdate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_get_request_ids_audit_records_and_metrics() {
    let dir = scratch("operations-admin-audit");
    let upstream = RecordingUpstream::start().await;
    let audit = dir.join("audit.jsonl");
    let admin_token = "operations-admin-token-0123456789";
    let gw = start(
        &dir,
        &upstream,
        json!({
            "admin_token": admin_token,
            "audit_log": audit,
            "metrics_listen": "127.0.0.1:0",
        }),
    );
    let metrics_addr = gw.proc.metrics_address();
    let good = format!("Bearer {admin_token}");
    let ok = gw
        .client
        .send(
            "GET",
            "/admin/clients/app",
            &[("authorization", &good), ("x-request-id", "admin-1")],
            "",
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.headers["x-request-id"], "admin-1");
    let refused = gw
        .client
        .send(
            "DELETE",
            "/admin/clients/app",
            &[
                ("authorization", "Bearer wrong"),
                ("x-request-id", "admin-2"),
            ],
            "",
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers["x-request-id"], "admin-2");
    let unknown = gw
        .client
        .send("GET", "/admin/nothing", &[("authorization", &good)], "")
        .await;
    assert!(
        unknown.headers.contains_key("x-request-id"),
        "an id is made for a request that came without one"
    );

    let (written, records) = audit_records(&audit, 3).await;
    assert!(
        !written.contains(admin_token),
        "the admin token was written"
    );
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no record of {id}: {written}"))
            .clone()
    };
    let read = by_id("admin-1");
    assert_eq!(
        (&read["interaction"], &read["method"], &read["path"]),
        (&json!("admin"), &json!("GET"), &json!("/admin/clients/app"))
    );
    assert_eq!(
        (&read["status"], &read["outcome"]),
        (&json!(200), &json!("ok"))
    );
    let delete = by_id("admin-2");
    assert_eq!(delete["interaction"], "admin");
    assert_eq!(
        (&delete["status"], &delete["outcome"]),
        (&json!(401), &json!("login"))
    );
    let text = metrics(metrics_addr).await;
    let refused = sample(
        &text,
        "tower_fhir_requests_total",
        &["status_class=\"4xx\"", "outcome=\"login\""],
    );
    assert_eq!(refused, Some(1.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_path_needs_the_token_and_every_refusal_is_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = scratch("operations-admin-json");
    let upstream = RecordingUpstream::start().await;
    let admin_token = "operations-admin-token-0123456789";
    let gw = start(&dir, &upstream, json!({"admin_token": admin_token}));
    let auth = format!("Bearer {admin_token}");
    // A path that names no route: 401 without the token (the routes cannot be listed), 404
    // with it; a method a route does not take: 405. Each a JSON error.
    let reply = gw.client.send("GET", "/admin/no-such-route", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    let with_token = [("authorization", auth.as_str())];
    for (method, path, status, says) in [
        (
            "GET",
            "/admin/no-such-route",
            StatusCode::NOT_FOUND,
            "no such admin route",
        ),
        (
            "POST",
            "/admin/clients/app",
            StatusCode::METHOD_NOT_ALLOWED,
            "this admin route does not take that method",
        ),
    ] {
        let reply = gw.client.send(method, path, &with_token, "").await;
        assert_eq!(reply.status, status, "{}", reply.text());
        assert_eq!(reply.json()["error"], says, "{}", reply.text());
    }
    // Two `Authorization` headers present no token, the right one first or not (a proxy in
    // front may read the other).
    for pair in [
        [
            ("authorization", auth.as_str()),
            ("authorization", "Bearer wrong"),
        ],
        [
            ("authorization", "Bearer wrong"),
            ("authorization", auth.as_str()),
        ],
    ] {
        let reply = gw.client.send("GET", "/admin/tenants", &pair, "").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    }
    // RFC 6750's `Bearer 1*SP token`, the scheme in any case: read as the FHIR routes read it.
    for spelled in [
        format!("Bearer  {admin_token}"),
        format!("bearer {admin_token}"),
        format!("BEARER   {admin_token}"),
    ] {
        let reply = gw
            .client
            .send("GET", "/admin/tenants", &[("authorization", &spelled)], "")
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{spelled:?}: {}",
            reply.text()
        );
    }
    // A chunked body past the limit, found as it arrives: 413, JSON too.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT /admin/clients/big HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
    for _ in 0..40 {
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    assert!(
        answer.contains("an admin request's body may hold at most"),
        "{answer}"
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `audit_log: "-"` stdout carries the audit records alone, one JSON object a line: the
/// start's banner goes to stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_audit_log_on_stdout_every_stdout_line_is_a_record() {
    use std::io::{BufRead, BufReader};
    let dir = scratch("operations-audit-stdout");
    let upstream = RecordingUpstream::start().await;
    let port = free_port();
    let config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "state_dir": dir.join("state"),
        "audit_log": "-",
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]}],
    });
    let file = dir.join("gateway.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let stderr_file = dir.join("gateway.log");
    let mut child = Command::new(GATEWAY)
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let client = TestClient::new(SocketAddr::from(([127, 0, 0, 1], port)));
    let ready = eventually(Duration::from_secs(30), async || {
        std::fs::read_to_string(&stderr_file)
            .unwrap_or_default()
            .contains("tower-fhir gateway listening on ")
    })
    .await;
    assert!(
        ready,
        "{}",
        std::fs::read_to_string(&stderr_file).unwrap_or_default()
    );
    for _ in 0..2 {
        let reply = client.get("/metadata", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let mut records = 0;
    while records < 2 {
        let line = read
            .recv_timeout(Duration::from_secs(10))
            .expect("an audit record on stdout");
        let record: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON record on stdout: {line:?}: {e}"));
        assert_eq!(record["interaction"], "capabilities", "{line}");
        records += 1;
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `trust_forwarded_headers` keeps a request's `Forwarded`/`X-Forwarded-*` chains only from
/// `client_address_trusted_peers` when they are named: from any other peer (a client that
/// reached the gateway past the balancer) they are dropped, and the gateway starts the chains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_kept_from_the_trusted_peers_only() {
    let claims = [
        ("forwarded", "for=198.51.100.7;host=evil.example"),
        ("x-forwarded-for", "198.51.100.7"),
        ("x-real-ip", "198.51.100.7"),
        ("x-forwarded-prefix", "/other-tenant"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-server", "evil.example"),
    ];
    // (the keys, whether the client's chains reach the upstream)
    for (case, keys, kept) in [
        ("off", json!({}), false),
        ("any-peer", json!({"trust_forwarded_headers": true}), true),
        (
            "peer-trusted",
            json!({"trust_forwarded_headers": true, "client_address_trusted_peers": ["127.0.0.0/8"]}),
            true,
        ),
        (
            "peer-untrusted",
            json!({"trust_forwarded_headers": true, "client_address_trusted_peers": ["10.0.0.0/8"]}),
            false,
        ),
    ] {
        let dir = scratch(&format!("operations-chains-{case}"));
        let upstream = RecordingUpstream::start().await;
        let gw = start(&dir, &upstream, keys);
        let bearer = format!("Bearer {}", token(&gw.client).await);
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend(claims);
        let reply = gw.client.get("/Patient/1", &headers).await;
        assert_eq!(reply.status, StatusCode::OK, "{case}: {}", reply.text());
        let got = upstream.last();
        let text = |name: &str| {
            got.headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (name, value) in claims {
            assert_eq!(
                text(name).contains(value),
                kept,
                "{case}: {name}: {:?}",
                text(name)
            );
        }
        // Either way the gateway names its peer last.
        assert!(
            text("x-forwarded-for").ends_with("127.0.0.1"),
            "{case}: {}",
            text("x-forwarded-for")
        );
        assert!(
            text("forwarded").contains("for=127.0.0.1"),
            "{case}: {}",
            text("forwarded")
        );
        drop(gw);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The audit record's `client_address`: the address a trusted balancer named in
/// `client_address_header`, else (another peer, or no header) the connection's peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_name_the_client_address_a_trusted_balancer_gave() {
    for (case, trusted, expected) in [
        ("trusted", "127.0.0.0/8", "203.0.113.9"),
        ("untrusted", "10.0.0.0/8", "127.0.0.1"),
    ] {
        let dir = scratch(&format!("operations-client-address-{case}"));
        let upstream = RecordingUpstream::start().await;
        let audit = dir.join("audit.jsonl");
        let gw = start(
            &dir,
            &upstream,
            json!({"audit_log": audit, "client_address_header": "x-forwarded-for",
                   "client_address_trusted_peers": [trusted]}),
        );
        let bearer = format!("Bearer {}", token(&gw.client).await);
        let forwarded = [
            ("authorization", bearer.as_str()),
            ("x-forwarded-for", "198.51.100.1, 203.0.113.9"),
            ("x-request-id", "forwarded"),
        ];
        let reply = gw.client.get("/Patient/1", &forwarded).await;
        assert_eq!(reply.status, StatusCode::OK, "{case}: {}", reply.text());
        let direct = [
            ("authorization", bearer.as_str()),
            ("x-request-id", "direct"),
        ];
        let reply = gw.client.get("/Patient/1", &direct).await;
        assert_eq!(reply.status, StatusCode::OK, "{case}: {}", reply.text());
        let (_, records) = audit_records(&audit, 3).await;
        let address = |id: &str| {
            records
                .iter()
                .find(|r| r["request_id"] == id)
                .unwrap_or_else(|| panic!("{case}: no record of {id}: {records:?}"))
                ["client_address"]
                .clone()
        };
        assert_eq!(address("forwarded"), expected, "{case}");
        assert_eq!(address("direct"), "127.0.0.1", "{case}");
        drop(gw);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `state_dir` removed while the gateway runs (by hand, or by a cleaner of old files), its
/// lock file alone, the lock file replaced by another of the same name, or the directory made
/// again: `/readyz` says so, the loss is logged at
/// `error`, and admin changes are refused (`503`) instead of being written to a directory
/// that holds only some of the state (or another gateway's); nothing makes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_removed_under_the_gateway_is_said_and_not_made_again() {
    let admin_token = "operations-admin-token-0123456789";
    let auth = format!("Bearer {admin_token}");
    for case in ["lock", "lock replaced", "directory", "made again"] {
        let dir = scratch(&format!("operations-state-removed-{case}"));
        let upstream = RecordingUpstream::start().await;
        let gw = start(&dir, &upstream, json!({"admin_token": admin_token}));
        let state = dir.join("state");
        let put_client = async |id: &str| {
            gw.client
                .send(
                    "PUT",
                    &format!("/admin/clients/{id}"),
                    &[
                        ("authorization", auth.as_str()),
                        ("content-type", "application/json"),
                    ],
                    &json!({"tenants": [TENANT]}).to_string(),
                )
                .await
        };
        // Ready once its own signing keys are read as a trusted issuer's (fetched at start).
        let ready = async || gw.client.get("/readyz", &[]).await.status == StatusCode::OK;
        assert!(eventually(Duration::from_secs(10), ready).await, "{case}");
        assert_eq!(put_client("before").await.status, StatusCode::CREATED);
        match case {
            "lock" => std::fs::remove_file(state.join("gateway.lock")).unwrap(),
            "lock replaced" => {
                std::fs::remove_file(state.join("gateway.lock")).unwrap();
                std::fs::write(state.join("gateway.lock"), b"").unwrap();
            }
            "directory" => std::fs::remove_dir_all(&state).unwrap(),
            _ => {
                std::fs::remove_dir_all(&state).unwrap();
                std::fs::create_dir(&state).unwrap();
            }
        }
        let reply = gw.client.get("/readyz", &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{case}: {}",
            reply.text()
        );
        assert!(
            reply.json()["waiting_for"]
                .as_array()
                .unwrap()
                .contains(&json!("state directory")),
            "{case}: {}",
            reply.text()
        );
        let reply = put_client("after").await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{case}: {}",
            reply.text()
        );
        assert!(
            reply.text().contains("state directory"),
            "{case}: {}",
            reply.text()
        );
        match case {
            "directory" => assert!(!state.exists(), "the state directory was made again"),
            "made again" => assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0),
            "lock replaced" => assert_eq!(std::fs::read(state.join("gateway.lock")).unwrap(), b""),
            _ => assert!(!state.join("gateway.lock").exists()),
        }
        // Reads go on, and tokens are issued and served from what the process holds.
        let reply = gw
            .client
            .get("/admin/clients/before", &[("authorization", auth.as_str())])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{case}: {}", reply.text());
        let bearer = format!("Bearer {}", token(&gw.client).await);
        let reply = gw
            .client
            .get("/Patient/1", &[("authorization", &bearer)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{case}");
        let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap();
        assert_eq!(
            log.matches("the state directory or its lock file was removed")
                .count(),
            1,
            "{case}: said once: {log}"
        );
        drop(gw);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `admin_listen`: the admin API answers there and only there (`listen` says `404` under
/// `/admin/`, whatever the token), nothing but the admin API answers there, and a `listen`
/// holding all its `max_connections` does not hold the administrator out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_serves_the_admin_api_apart_from_the_gateway() {
    let dir = scratch("operations-admin-listen");
    let upstream = RecordingUpstream::start().await;
    let admin_token = "operations-admin-token-0123456789";
    // Port 0, the address read from what the start says (as for `listen`).
    let mut gw = start(
        &dir,
        &upstream,
        json!({"admin_token": admin_token, "admin_listen": "127.0.0.1:0",
               "max_connections": 2, "max_connections_per_address": 2}),
    );
    let said = gw.proc.wait_for("  admin API at ");
    let admin_addr: SocketAddr = said
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once("/admin/"))
        .and_then(|(addr, _)| addr.parse().ok())
        .unwrap_or_else(|| panic!("no admin address: {said}"));
    let auth = format!("Bearer {admin_token}");
    let with_token = [("authorization", auth.as_str())];
    let admin = TestClient::new(admin_addr);

    // listen's two connections held open (max_connections 2, and this address's two), before
    // anything else: the admin API still answers, its connection counted in neither. (Two,
    // not one: the test's client may open a second connection while its first is idle.)
    let held = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        admin.send("GET", "/admin/clients", &with_token, ""),
    )
    .await
    .expect("the admin API answers while listen is full");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    drop((held, waiting));
    // Its place on listen (and its address's) comes back once the gateway has seen it close:
    // until then a new connection from this address is closed as it comes.
    let served = eventually(Duration::from_secs(10), async || {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(gw.addr).await else {
            return false;
        };
        let asked = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        asked.is_ok()
            && stream.read_to_end(&mut answer).await.is_ok()
            && answer.starts_with(b"HTTP/1.1 200")
    })
    .await;
    assert!(
        served,
        "listen never served again after its connection closed"
    );
    // (The probe's own place, given back as its connection task ends.)
    tokio::time::sleep(Duration::from_millis(300)).await;

    // On listen: 404 under /admin/, with the token or without, a JSON error with a request id;
    // the gateway's own routes as before.
    for headers in [&with_token[..], &[]] {
        let reply = gw.client.send("GET", "/admin/tenants", headers, "").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
        assert_eq!(reply.json()["error"], "not found", "{}", reply.text());
        assert!(reply.headers.contains_key("x-request-id"));
        assert!(!reply.text().contains(TENANT), "{}", reply.text());
    }
    let bearer = token(&gw.client).await;
    let reply = gw
        .client
        .get(
            "/Patient/1",
            &[("authorization", &format!("Bearer {bearer}"))],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // On admin_listen: the admin API, its token needed on every path; nothing else.
    let reply = admin.send("GET", "/admin/tenants", &with_token, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.text().contains(TENANT), "{}", reply.text());
    let reply = admin.send("GET", "/admin/tenants", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    for path in ["/metadata", "/Patient/1", "/healthz"] {
        let reply = admin.send("GET", path, &[], "").await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{path}: {}",
            reply.text()
        );
        let reply = admin.send("GET", path, &with_token, "").await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{path}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["error"], "no such admin route");
    }
    let reply = admin
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id=app&client_secret={SECRET}&scope={TENANT}"
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert!(!reply.text().contains("access_token"), "{}", reply.text());

    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_registrations_of_one_client_make_one_and_tell_the_others() {
    let dir = scratch("operations-race");
    let upstream = RecordingUpstream::start().await;
    let admin_token = "operations-admin-token-0123456789";
    let gw = start(&dir, &upstream, json!({"admin_token": admin_token}));
    let auth = format!("Bearer {admin_token}");
    for round in 0..3 {
        let path = format!("/admin/clients/racer-{round}");
        let body = json!({"tenants": [TENANT]}).to_string();
        let puts = (0..8).map(|_| {
            let (client, path, body, auth) =
                (gw.client.clone(), path.clone(), body.clone(), auth.clone());
            tokio::spawn(async move {
                client
                    .send(
                        "PUT",
                        &path,
                        &[
                            ("authorization", &auth),
                            ("content-type", "application/json"),
                        ],
                        &body,
                    )
                    .await
            })
        });
        let mut created = 0;
        for reply in futures::future::join_all(puts).await {
            let reply = reply.unwrap();
            match reply.status {
                StatusCode::CREATED => created += 1,
                // Made after the registration (an update), or beside it (not applied).
                StatusCode::OK => {}
                StatusCode::CONFLICT => {
                    assert!(
                        reply.text().contains("at the same time"),
                        "{}",
                        reply.text()
                    )
                }
                other => panic!("{other}: {}", reply.text()),
            }
        }
        assert_eq!(created, 1, "round {round}");
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_and_retire_through_the_admin_api() {
    let dir = scratch("operations-keys");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let admin_token = "operations-admin-token-0123456789";
    let gw = start(&dir, &upstream, json!({"admin_token": admin_token}));
    let auth = format!("Bearer {admin_token}");
    let admin = async |method: &str, path: &str, body: &str| {
        gw.client
            .send(method, path, &[("authorization", &auth)], body)
            .await
    };
    let old = token(&gw.client).await;
    let listed = admin("GET", "/admin/signing-keys", "").await.json();
    let old_kid = listed["current"].as_str().unwrap().to_owned();
    assert_eq!(listed["published"], json!([old_kid]));

    // On files one process signs: publishing ahead is refused, a rotation signs at once.
    let reply = admin("POST", "/admin/signing-keys", r#"{"publish_seconds": 30}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = admin("POST", "/admin/signing-keys", "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let new_kid = reply.json()["kid"].as_str().unwrap().to_owned();
    assert_eq!(reply.json()["replaced_keys_retire_in_seconds"], 3660);
    let new = token(&gw.client).await;
    assert_eq!(
        jsonwebtoken::decode_header(&new).unwrap().kid.unwrap(),
        new_kid
    );
    let jwks = gw.client.get("/.well-known/jwks.json", &[]).await.json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    for token in [&old, &new] {
        assert_eq!(
            gw.client.get_bearer("/Patient/1", token).await.status,
            StatusCode::OK
        );
    }

    // The key that signs cannot be retired; the old one can, and its tokens go with it.
    let reply = admin("DELETE", &format!("/admin/signing-keys/{new_kid}"), "").await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    let reply = admin("DELETE", "/admin/signing-keys/no-such-kid", "").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    let reply = admin("DELETE", &format!("/admin/signing-keys/{old_kid}"), "").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    assert_eq!(
        gw.client.get_bearer("/Patient/1", &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        gw.client.get_bearer("/Patient/1", &new).await.status,
        StatusCode::OK
    );
    // Without the admin token, nothing.
    let reply = gw.client.send("POST", "/admin/signing-keys", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

/// The demo's admin token is published: its admin API answers only when the demo listens on
/// loopback; beyond it (`--listen 0.0.0.0:...`) the demo runs without one, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_admin_api_is_on_loopback_only() {
    for (host, admin) in [("127.0.0.1", true), ("0.0.0.0", false)] {
        let port = free_port();
        let dir = scratch(&format!("demo-admin-{admin}"));
        let mut command = Command::new(GATEWAY);
        // A shared database named in the environment (a replica's host) is not the demo's:
        // its published credentials never go there (this one does not even answer).
        command
            .arg("--listen")
            .arg(format!("{host}:{port}"))
            .env("RUST_LOG", "warn")
            .env(
                "TOWER_FHIR_DATABASE_URL",
                "postgres://gateway@127.0.0.1:1/shared",
            );
        let (mut proc, _) = Proc::start(
            command,
            dir.join("gateway.log"),
            "tower-fhir gateway listening on ",
        );
        proc.wait_for(if admin {
            "demo admin token: "
        } else {
            "the admin API is off"
        });
        // The demo's state is meant to go with it: no warning that it does.
        let log = proc.stderr();
        assert!(
            !log.contains("the state is in a temporary directory"),
            "{log}"
        );
        assert!(
            log.contains("the demo ignores TOWER_FHIR_DATABASE_URL"),
            "{log}"
        );
        let client = TestClient::new(SocketAddr::from(([127, 0, 0, 1], port)));
        let reply = client
            .get(
                "/admin/signing-keys",
                &[("authorization", "Bearer demo-admin-token-change-me")],
            )
            .await;
        if admin {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        } else {
            // Said as the start said it, not taken for a FHIR request with a bad token.
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
            let error = reply.json()["error"].as_str().unwrap().to_owned();
            assert!(
                error.starts_with("the admin API is off: ") && error.contains("loopback"),
                "{error}"
            );
        }
        proc.terminate();
    }
}

/// Without `admin_token` the admin API is off, and `/admin/...` says so (a JSON `404`)
/// instead of being taken for a FHIR request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_admin_paths_say_the_admin_api_is_off() {
    let dir = scratch("operations-admin-off");
    let upstream = RecordingUpstream::start().await;
    let gw = start(&dir, &upstream, json!({}));
    for (method, path) in [
        ("GET", format!("/admin/tenants/{TENANT}")),
        ("POST", "/admin/signing-keys".to_owned()),
    ] {
        let reply = gw
            .client
            .send(method, &path, &[("authorization", "Bearer anything")], "")
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(
            error.starts_with("the admin API is off: ") && error.contains("admin_token"),
            "{error}"
        );
    }
    assert!(upstream.received().is_empty());
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log as text: without the terminal colours that split `name=value` fields.
fn without_colours(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = match rest.find('m') {
            Some(end) => &rest[end + 1..],
            None => "",
        };
    }
    plain.push_str(rest);
    plain
}

/// With `state_dir`, tenants are seeded at the first start only: one added to the
/// configuration later is not added (the files do not say whether it was removed through the
/// admin API), and the log says so; one removed from the file later is still served, and the
/// log says that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_added_to_the_configuration_after_the_first_start_is_logged_not_added() {
    let dir = scratch("late-tenant");
    let upstream = RecordingUpstream::start().await;
    let mut first = start(&dir, &upstream, json!({}));
    // Written to a file, the log has no colours' escape codes.
    assert!(
        !first.proc.stderr().contains('\x1b'),
        "{}",
        first.proc.stderr()
    );
    // The client registered once, said once (not again by the configuration's check).
    let log = without_colours(&first.proc.stderr());
    assert_eq!(log.matches("client registered").count(), 1, "{log}");
    first.proc.terminate();
    let late = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
    let tenants = json!([
        {"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]},
        {"id": late, "upstreams": [{"base_url": "http://127.0.0.1:9/late", "fhir_version": "4.0"}]}
    ]);
    let mut second = start(&dir, &upstream, json!({ "tenants": tenants }));
    let log = without_colours(&second.proc.stderr());
    assert!(
        log.contains("a tenant of the configuration is not in the state") && log.contains(late),
        "{log}"
    );
    assert!(!log.contains(&format!("tenant={TENANT}")), "{log}");
    assert!(!log.contains("differ from the state's"), "{log}");
    assert!(!log.contains("client registered"), "already stored: {log}");
    second.proc.terminate();

    // A tenant's upstream and a client's tenants changed in the file: the state's are kept,
    // and the log says so (the old upstream still serves).
    let tenants = json!([
        {"id": TENANT, "upstreams": [{"base_url": "http://127.0.0.1:9/moved", "fhir_version": "4.0"}]}
    ]);
    let clients = json!([{"client_id": "app", "client_secret": SECRET, "tenants": [TENANT, late]}]);
    let mut third = start(
        &dir,
        &upstream,
        json!({ "tenants": tenants, "clients": clients }),
    );
    let log = without_colours(&third.proc.stderr());
    assert!(
        log.contains("a tenant's upstreams in the configuration differ from the state's")
            && log.contains(&format!("tenant={TENANT}")),
        "{log}"
    );
    assert!(
        log.contains("a client's tenants, scopes, rate limit or authentication method in the configuration differ")
            && log.contains("client_id=app"),
        "{log}"
    );
    let token = token(&third.client).await;
    let reply = third.client.get_bearer("/Patient/1", &token).await;
    assert_eq!(upstream.received().len(), 1, "{}", reply.text());
    assert!(
        !log.contains("the state serves are not in the configuration"),
        "{log}"
    );
    third.proc.terminate();

    // The tenant and the client removed from the file: removed from nothing (the state wins),
    // and the log says so, with how to offboard them.
    let mut fourth = start(&dir, &upstream, json!({"tenants": [], "clients": []}));
    let log = without_colours(&fourth.proc.stderr());
    assert!(
        log.contains("tenants the state serves are not in the configuration")
            && log.contains("DELETE /admin/tenants/")
            && log.contains(TENANT),
        "{log}"
    );
    assert!(
        log.contains("clients the state serves are not in the configuration")
            && log.contains("DELETE /admin/clients/")
            && log.contains("\"app\""),
        "{log}"
    );
    let fresh = self::token(&fourth.client).await;
    let reply = fourth.client.get_bearer("/Patient/1", &fresh).await;
    assert_eq!(upstream.received().len(), 2, "{}", reply.text());
    fourth.proc.terminate();
}

/// An audit log the gateway creates is `0600`, and said nothing of; one that was there already
/// readable by others (or a log rotation's) is used, and the start warns of its mode.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_others_may_read_is_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    let warning = "the audit log may be read (or written) by users other than its owner";
    let dir = scratch("audit-mode");
    let upstream = RecordingUpstream::start().await;
    let path = dir.join("audit.jsonl");
    let mut created = start(&dir, &upstream, json!({"audit_log": path}));
    created.client.get("/metadata", &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "no audit log written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    assert!(!without_colours(&created.proc.stderr()).contains(warning));
    created.proc.terminate();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut readable = start(&dir, &upstream, json!({"audit_log": path}));
    let log = without_colours(&readable.proc.stderr());
    assert!(log.contains(warning) && log.contains("mode=644"), "{log}");
    readable.proc.terminate();
}

/// A state file deleted (or left out of a restored backup) while the rest of the state is there
/// is made anew at the next start, and the log says what that loses: new signing keys refuse
/// every token issued before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_state_file_is_made_anew_and_said() {
    let dir = scratch("missing-state-file");
    let upstream = RecordingUpstream::start().await;
    let mut first = start(&dir, &upstream, json!({}));
    let before = token(&first.client).await;
    assert!(!without_colours(&first.proc.stderr()).contains("a state file is missing"));
    first.proc.terminate();
    let state = dir.join("state");
    std::fs::remove_file(state.join("signing-keys.json")).unwrap();
    let mut second = start(&dir, &upstream, json!({}));
    let log = without_colours(&second.proc.stderr());
    assert!(
        log.contains("a state file is missing while the rest of the state is there")
            && log.contains("every token issued before is refused")
            && log.contains("signing-keys.json"),
        "{log}"
    );
    let reply = second.client.get_bearer("/Patient/1", &before).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    second.proc.terminate();
}

/// A tenant read with `GET /admin/tenants/{id}` shows its upstream's credential as
/// `<redacted>`: sending that record back unchanged is refused (`400`, saying what to send),
/// and the stored credential still goes upstream. The same placeholder in the configuration
/// file stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sent_back_with_its_redacted_credential_is_refused() {
    let dir = scratch("operations-redacted");
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    let admin_token = "operations-admin-token-0123456789";
    let tenants = json!([{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"),
        "fhir_version": "4.0", "authorization": "Bearer upstream-secret"}]}]);
    let gw = start(
        &dir,
        &upstream,
        json!({"admin_token": admin_token, "tenants": tenants}),
    );
    let auth = format!("Bearer {admin_token}");
    let path = format!("/admin/tenants/{TENANT}");
    let read = gw
        .client
        .send("GET", &path, &[("authorization", &auth)], "")
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(read.json()["upstreams"][0]["authorization"], "<redacted>");

    // Read, edit, write: the placeholder comes back as it was shown, the id with it.
    let record = read.json();
    assert_eq!(record["id"], TENANT);
    let reply = gw
        .client
        .send(
            "PUT",
            &path,
            &[("authorization", &auth)],
            &record.to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("send the real credential, or leave authorization out"),
        "{error}"
    );
    assert!(error.contains("no Authorization header"), "{error}");

    // The stored credential is untouched and still the one sent upstream.
    let token = token(&gw.client).await;
    let answer = gw.client.get_bearer("/Patient/1", &token).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        upstream.last().headers["authorization"],
        "Bearer upstream-secret"
    );
    drop(gw);

    // The configuration file's tenants are held to the same.
    let config = json!({
        "listen": "127.0.0.1:0",
        "state_dir": dir.join("state-2"),
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"),
            "fhir_version": "4.0", "authorization": "<redacted>"}]}]
    });
    let file = dir.join("redacted.json");
    std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
    for flag in ["--check-config", "--config"] {
        let out = Command::new(GATEWAY)
            .arg(flag)
            .arg(&file)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: accepted");
        assert!(
            stderr.contains(&format!("tenant {TENANT}: the authorization of upstream"))
                && stderr.contains("send the real credential"),
            "{flag}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET /admin/tenants` and `GET /admin/clients` need the admin token, and list what exists as
/// it changes: a tenant added then removed, a client registered then revoked. The tenants are
/// ids only, sorted; the clients sorted by id, each as `GET /admin/clients/{id}` shows it, and
/// never a secret or its hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_tenants_and_clients_as_they_change() {
    const ADDED: &str = "1d2d0000-0000-4000-8000-000000000001";
    const NOT_ONBOARDED: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
    let dir = scratch("operations-admin-lists");
    let upstream = RecordingUpstream::start().await;
    let admin_token = "operations-admin-token-0123456789";
    let gw = start(&dir, &upstream, json!({"admin_token": admin_token}));
    let auth = format!("Bearer {admin_token}");
    let admin = async |method: &str, path: &str, body: &str| {
        gw.client
            .send(method, path, &[("authorization", &auth)], body)
            .await
    };

    // Without the admin token, or with a wrong one: 401, JSON, nothing listed.
    for path in ["/admin/tenants", "/admin/clients"] {
        for headers in [
            vec![],
            vec![("authorization", "Bearer not-the-admin-token")],
        ] {
            let reply = gw.client.send("GET", path, &headers, "").await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(reply.json()["error"], "a valid admin token is required");
            assert!(!reply.text().contains(TENANT), "{path}: {}", reply.text());
        }
        // A method the route does not take: 405, JSON.
        let reply = admin("POST", path, "").await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(
            reply.json()["error"],
            "this admin route does not take that method"
        );
    }

    // The configuration's tenant; one added (sorted before it), then removed.
    let tenants = async || {
        let reply = admin("GET", "/admin/tenants", "").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    };
    assert_eq!(tenants().await, json!({"tenants": [TENANT]}));
    let record =
        json!({"upstreams": [{"base_url": upstream.base("/other"), "fhir_version": "4.0"}]});
    let added = format!("/admin/tenants/{}", ADDED.to_ascii_uppercase());
    let reply = admin("PUT", &added, &record.to_string()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(tenants().await, json!({"tenants": [ADDED, TENANT]}));
    let reply = admin("DELETE", &format!("/admin/tenants/{ADDED}"), "").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    assert_eq!(tenants().await, json!({"tenants": [TENANT]}));

    // The configuration's client; one registered, then revoked.
    let clients = async || {
        let reply = admin("GET", "/admin/clients", "").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let text = reply.text();
        assert!(
            !text.contains("argon2") && !text.contains("secret\"") && !text.contains(SECRET),
            "a secret or its hash is listed: {text}"
        );
        reply.json()["clients"].as_array().unwrap().clone()
    };
    let listed = clients().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            &listed[0]["client_id"],
            &listed[0]["revoked"],
            &listed[0]["tenants"],
            &listed[0]["token_endpoint_auth_method"]
        ),
        (
            &json!("app"),
            &json!(false),
            &json!([TENANT]),
            &json!("client_secret_basic")
        )
    );
    let body = json!({"tenants": [TENANT, NOT_ONBOARDED], "scopes": ["system/*.read"]});
    let reply = admin("PUT", "/admin/clients/Backend", &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let secret = reply.json()["client_secret"].as_str().unwrap().to_owned();
    let listed = clients().await;
    let ids: Vec<&str> = listed
        .iter()
        .map(|client| client["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["Backend", "app"], "sorted by id, byte by byte");
    assert!(!serde_json::to_string(&listed).unwrap().contains(&secret));
    // Each as its own GET shows it: the same rendering.
    for client in &listed {
        let path = format!("/admin/clients/{}", client["client_id"].as_str().unwrap());
        assert_eq!(&admin("GET", &path, "").await.json(), client);
    }
    assert_eq!(listed[0]["tenants_not_onboarded"], json!([NOT_ONBOARDED]));
    assert_eq!(listed[0]["revoked"], false);
    let reply = admin("DELETE", "/admin/clients/Backend", "").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    let listed = clients().await;
    assert_eq!(
        (&listed[0]["client_id"], &listed[0]["revoked"]),
        (&json!("Backend"), &json!(true)),
        "a revoked client stays listed, marked"
    );
    assert_eq!(listed[1]["revoked"], false);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tenant read with `GET /admin/tenants/{id}` names its id; `PUT` takes that record back
/// (read, edit, write), the id written in any spelling of the same GUID; an id that is another
/// tenant's is refused (`400`, saying so), and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_read_with_get_is_put_back_and_another_id_is_refused() {
    const OTHER: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
    let dir = scratch("operations-admin-round-trip");
    let upstream = RecordingUpstream::start().await;
    let admin_token = "operations-admin-token-0123456789";
    let gw = start(&dir, &upstream, json!({"admin_token": admin_token}));
    let auth = format!("Bearer {admin_token}");
    let admin = async |method: &str, path: &str, body: &str| {
        gw.client
            .send(method, path, &[("authorization", &auth)], body)
            .await
    };
    let path = format!("/admin/tenants/{TENANT}");
    let read = admin("GET", &path, "").await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let mut record = read.json();
    assert_eq!(record["id"], TENANT);

    // Edited and written back whole, id included: replaced.
    record["rate_limit"] = json!({"requests_per_second": 5, "burst": 10});
    let reply = admin("PUT", &path, &record.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), record);
    assert_eq!(admin("GET", &path, "").await.json(), record);

    // The same GUID spelled otherwise, in the body or in the path.
    let mut upper = record.clone();
    upper["id"] = json!(TENANT.to_ascii_uppercase());
    let reply = admin("PUT", &path, &upper.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let digits = format!(
        "/admin/tenants/{}",
        TENANT.replace('-', "").to_ascii_uppercase()
    );
    let reply = admin("PUT", &digits, &record.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Another tenant's id: refused, saying so; neither tenant changes.
    let mut moved = record.clone();
    moved["id"] = json!(OTHER);
    moved["upstreams"][0]["base_url"] = json!(upstream.base("/moved"));
    let reply = admin("PUT", &path, &moved.to_string()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains(&format!(
            "the body's id {OTHER} is not the tenant of the path, {TENANT}"
        )),
        "{error}"
    );
    assert_eq!(admin("GET", &path, "").await.json(), record);
    let listed = admin("GET", "/admin/tenants", "").await.json();
    assert_eq!(listed, json!({"tenants": [TENANT]}));
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
