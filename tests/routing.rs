//! The gateway's heart over real HTTP: bearer validation, tenant scope, cached routing and the
//! proxy in front of upstream servers that record exactly what they received.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceBuilder;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::proxy::FhirProxy;
use tower_fhir::route::{
    DirectoryError, InMemoryDirectory, RouteCache, TenantDirectory, TenantRecord,
    TenantRoutingLayer, Upstream,
};
use tower_fhir::tenant::{TenantId, TenantScopeLayer};
use tower_fhir::version::FhirVersion;

const TENANT_A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const TENANT_B: &str = "9b2e1c3d-0000-4000-8000-00000000000b";
const PUBLIC_BASE: &str = "http://gateway.test:8080";

fn tenant(id: &str) -> TenantId {
    id.parse().unwrap()
}

fn token_for(tenant: &str) -> String {
    let mut c = claims();
    c["scope"] = json!(format!("system/*.read {tenant}"));
    mint(Algorithm::HS256, None, &c)
}

fn upstreams(base: &str, version: FhirVersion, auth: Option<&str>) -> TenantRecord {
    let mut upstream = Upstream::parse(base, version).unwrap();
    if let Some(auth) = auth {
        upstream = upstream.with_authorization(auth).unwrap();
    }
    TenantRecord::new([upstream]).unwrap()
}

struct Gateway {
    client: TestClient,
    addr: std::net::SocketAddr,
    directory: InMemoryDirectory,
    lookups: Arc<AtomicUsize>,
    directory_down: Arc<AtomicBool>,
    cache: RouteCache,
}

/// A directory in front of `directory` that counts lookups and can be made to fail.
fn counting(
    directory: InMemoryDirectory,
    lookups: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
) -> impl TenantDirectory {
    move |tenant: TenantId| {
        let (directory, lookups, down) = (directory.clone(), lookups.clone(), down.clone());
        async move {
            lookups.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if down.load(Ordering::SeqCst) {
                return Err(DirectoryError::new("directory database unreachable"));
            }
            directory.lookup(tenant).await
        }
    }
}

/// The bearer layer of these tests: HS256 tokens of `https://auth.test` for `tower-fhir`.
fn bearer() -> BearerAuthLayer {
    BearerAuthLayer::builder()
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
        .issuer("https://auth.test")
        .audience("tower-fhir")
        .build()
        .unwrap()
}

/// The proxy's upstream timeout in these tests: short, for the tests of upstreams that stall.
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(500);

/// The gateway of these tests, its proxy's upstream timeout 500 ms (short, for the tests of
/// upstreams that stall).
async fn gateway(tenants: Vec<(&str, TenantRecord)>, ttl: Duration) -> Gateway {
    gateway_with_timeout(tenants, ttl, UPSTREAM_TIMEOUT).await
}

/// [`gateway`] with the proxy's upstream timeout `timeout`.
async fn gateway_with_timeout(
    tenants: Vec<(&str, TenantRecord)>,
    ttl: Duration,
    timeout: Duration,
) -> Gateway {
    let directory = InMemoryDirectory::new();
    for (id, upstreams) in tenants {
        directory.upsert(tenant(id), upstreams);
    }
    let lookups = Arc::new(AtomicUsize::new(0));
    let directory_down = Arc::new(AtomicBool::new(false));
    let routing = TenantRoutingLayer::builder(counting(
        directory.clone(),
        lookups.clone(),
        directory_down.clone(),
    ))
    .ttl(ttl)
    .negative_ttl(Duration::from_secs(30))
    .failure_backoff(Duration::from_millis(50))
    .build()
    .unwrap();
    let cache = routing.cache().clone();
    let stack = ServiceBuilder::new()
        .layer(bearer())
        .layer(TenantScopeLayer::builder().build().unwrap())
        .layer(routing)
        .service(
            FhirProxy::builder(PUBLIC_BASE)
                .timeout(timeout)
                .build()
                .unwrap(),
        );
    let addr = serve_tower(stack).await;
    Gateway {
        client: TestClient::new(addr),
        addr,
        directory,
        lookups,
        directory_down,
        cache,
    }
}

/// The gateway with one tenant, A, served (STU3) at `base`.
async fn one_tenant_at(base: &str) -> Gateway {
    gateway(
        vec![(TENANT_A, upstreams(base, FhirVersion::Stu3, None))],
        Duration::from_secs(60),
    )
    .await
}

async fn one_tenant(upstream: &RecordingUpstream) -> Gateway {
    one_tenant_with_timeout(upstream, UPSTREAM_TIMEOUT).await
}

/// [`one_tenant`] with the proxy's upstream timeout `timeout`.
async fn one_tenant_with_timeout(upstream: &RecordingUpstream, timeout: Duration) -> Gateway {
    gateway_with_timeout(
        vec![(
            TENANT_A,
            upstreams(
                &upstream.base("/fhir/r3"),
                FhirVersion::Stu3,
                Some("Bearer upstream-a-credentials"),
            ),
        )],
        Duration::from_secs(60),
        timeout,
    )
    .await
}

#[tokio::test]
async fn every_client_interaction_reaches_the_upstream_byte_for_byte() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let form = "application/x-www-form-urlencoded";
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/123"}},
        {"request": {"method": "GET", "url": "Observation?patient=123&_count=5"}}
    ]})
    .to_string();
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        ("GET", "/Patient/123", None, ""),
        ("POST", "/Patient/_search", Some(form),
         "family=O%27Brien&given=Se%C3%A1n&birthdate=1970-01-01&gender=male&identifier=urn%3Aoid%3A1.2%7C42&_count=10"),
        ("GET", "/Observation?patient=123&category=vital-signs&_sort:desc=date", None, ""),
        ("GET", "/Observation?patient=123&category=vital-signs&_sort=-date", None, ""),
        ("GET", "/Condition?patient=123&_count=10", None, ""),
        ("GET", "/Encounter?patient=123&_sort:desc=date&_count=1", None, ""),
        ("GET", "/AllergyIntolerance?patient=123", None, ""),
        ("GET", "/MedicationOrder?patient=123&_count=10", None, ""),
        ("GET", "/MedicationRequest?patient=123&_count=10", None, ""),
        ("GET", "/Coverage?patient=123", None, ""),
        ("GET", "/Patient?family:contains=smi%20th&name=%C3%A9", None, ""),
        ("POST", "/", Some("application/fhir+json"), batch.as_str()),
    ];
    for (method, target, content_type, body) in cases {
        let mut headers = vec![
            ("authorization", bearer.as_str()),
            ("accept", "application/fhir+json"),
            // A client naming another origin is not believed.
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;host=\"tenant-b.example\""),
        ];
        if let Some(content_type) = content_type {
            headers.push(("content-type", content_type));
        }
        let reply = gw.client.send(method, target, &headers, body).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {target}: {}",
            reply.text()
        );
        let got = upstream.last();
        assert_eq!(got.method, method);
        let expected_target = if target == "/" {
            "/fhir/r3/".to_owned()
        } else {
            format!("/fhir/r3{target}")
        };
        assert_eq!(got.target, expected_target);
        assert_eq!(got.body, body.as_bytes(), "{method} {target}");
        assert_eq!(got.headers["host"], upstream.addr.to_string());
        assert_eq!(
            got.headers["authorization"],
            "Bearer upstream-a-credentials"
        );
        assert_eq!(got.headers["accept"], "application/fhir+json");
        if let Some(content_type) = content_type {
            assert_eq!(got.headers["content-type"], content_type);
        }
        assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(got.headers["x-forwarded-proto"], "http");
        // The gateway's public address, not the `Host` the client connected with.
        assert_eq!(got.headers["x-forwarded-host"], "gateway.test:8080");
        assert_eq!(
            got.headers["forwarded"],
            "for=127.0.0.1;proto=http;host=\"gateway.test:8080\""
        );
    }
}

#[tokio::test]
async fn what_fhir_clients_send_crosses_and_nothing_else() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let fhir = [
        ("accept", "application/fhir+json"),
        ("accept-language", "de-CH"),
        ("content-type", "application/fhir+json"),
        ("content-language", "de-CH"),
        ("if-match", "W/\"3\""),
        ("if-none-match", "W/\"2\""),
        ("if-modified-since", "Tue, 01 Jul 2025 10:00:00 GMT"),
        ("if-none-exist", "identifier=urn:oid:1.2|42"),
        ("prefer", "return=representation"),
        ("cache-control", "no-cache"),
        ("x-request-id", "req-1"),
        ("x-correlation-id", "corr-1"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "vendor=1"),
        ("user-agent", "HAPI-FHIR/7.0.0 (FHIR Client)"),
        ("origin", "https://app.example"),
    ];
    let other = [
        ("accept-encoding", "gzip, deflate, br"),
        ("referer", "https://app.example/patients/123"),
        ("sec-fetch-mode", "cors"),
        ("x-api-key", "the-client-s"),
        ("x-made-up", "1"),
        ("dnt", "1"),
        // R4's: the server would write the Provenance it carries, past every scope check.
        (
            "x-provenance",
            r#"{"resourceType":"Provenance","target":[{"reference":"Patient/2"}]}"#,
        ),
    ];
    let mut headers = vec![("authorization", bearer.as_str())];
    headers.extend(fhir);
    headers.extend(other);
    let body = r#"{"resourceType":"Patient","id":"1"}"#;
    let reply = gw.client.send("PUT", "/Patient/1", &headers, body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let got = upstream.last();
    for (name, value) in fhir {
        assert_eq!(got.headers[name], value, "{name}");
    }
    assert_eq!(got.headers["content-length"], body.len().to_string());
    for (name, value) in other {
        if name == "accept-encoding" {
            // The client's codings dropped: the proxy asks for an uncompressed answer.
            assert_eq!(
                got.headers[name], "identity",
                "{value} reached the upstream"
            );
            continue;
        }
        assert!(
            !got.headers.contains_key(name),
            "{name} reached the upstream"
        );
    }
    assert_eq!(got.body, body);
}

#[tokio::test]
async fn method_and_url_overrides_never_reach_the_upstream() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let overrides = [
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-original-url", "/fhir/r3/../other-tenant/Patient/1"),
        ("x-rewrite-url", "/fhir/r3/../other-tenant/Patient/1"),
    ];
    let mut headers = vec![("authorization", bearer.as_str())];
    headers.extend(overrides);
    let reply = gw.client.send("GET", "/Patient/1", &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let got = upstream.last();
    assert_eq!(
        (got.method.as_str(), got.target.as_str()),
        ("GET", "/fhir/r3/Patient/1")
    );
    for (name, _) in overrides {
        assert!(
            !got.headers.contains_key(name),
            "{name} reached the upstream"
        );
    }
}

#[tokio::test]
async fn forwarded_host_and_proto_are_the_public_base_whatever_host_the_client_sends() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let headers = [
        ("authorization", bearer.as_str()),
        ("host", "evil.example"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6;proto=https;host=\"evil.example\""),
    ];
    let reply = gw.client.send("GET", "/Patient/1", &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    let got = upstream.last();
    assert_eq!(got.headers["host"], upstream.addr.to_string());
    assert_eq!(got.headers["x-forwarded-host"], "gateway.test:8080");
    assert_eq!(got.headers["x-forwarded-proto"], "http");
    let forwarded: Vec<_> = got.headers.get_all("forwarded").iter().collect();
    assert_eq!(
        forwarded,
        ["for=127.0.0.1;proto=http;host=\"gateway.test:8080\""]
    );
    assert!(
        !format!("{:?}", got.headers).contains("evil.example"),
        "{:?}",
        got.headers
    );
}

/// An upstream answer that sets two cookies, one naming `who`.
fn setting_cookies(who: &str) -> Answer {
    Answer {
        headers: vec![
            ("content-type".into(), "application/fhir+json".into()),
            (
                "set-cookie".into(),
                format!("session={who}; Path=/; HttpOnly"),
            ),
            ("set-cookie".into(), "AWSALB=sticky; Path=/".into()),
        ],
        ..Answer::json(json!({"resourceType": "Patient", "id": "1"}))
    }
}

#[tokio::test]
async fn cookies_cross_neither_way_by_default() {
    let upstream = RecordingUpstream::start().await;
    upstream.answer("/fhir", setting_cookies("upstream"));
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    // The browser's one cookie jar for the gateway's origin, whichever tenant set them.
    let headers = [
        ("authorization", bearer.as_str()),
        ("cookie", "session=from-tenant-b"),
    ];
    let reply = gw.client.send("GET", "/Patient/1", &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        !upstream.last().headers.contains_key("cookie"),
        "a browser's cookies reached a tenant's server"
    );
    assert!(
        !reply.headers.contains_key("set-cookie"),
        "an upstream set a cookie on the gateway's origin: {:?}",
        reply.headers
    );
}

#[tokio::test]
async fn an_upstream_refusing_the_gateways_credentials_is_a_bad_gateway_not_a_refused_token() {
    let upstream = RecordingUpstream::start().await;
    for (status, challenge) in [
        (StatusCode::UNAUTHORIZED, "www-authenticate"),
        (
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy-authenticate",
        ),
    ] {
        upstream.answer(
            "/fhir",
            Answer {
                status,
                headers: vec![
                    ("content-type".into(), "application/fhir+json".into()),
                    (challenge.into(), "Basic realm=\"EHR-prod\"".into()),
                ],
                body: r#"{"resourceType": "OperationOutcome"}"#.into(),
                delay: Duration::ZERO,
            },
        );
        let gw = one_tenant(&upstream).await;
        let reply = gw
            .client
            .get_bearer("/Patient/1", &token_for(TENANT_A))
            .await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{status}");
        assert!(
            !reply.headers.contains_key("www-authenticate")
                && !reply.headers.contains_key("proxy-authenticate"),
            "{:?}",
            reply.headers
        );
        let outcome: Value = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("credentials"),
            "{outcome}"
        );
    }
    // The upstream's other refusals are its answer to the client's request: relayed.
    upstream.answer(
        "/fhir",
        Answer {
            status: StatusCode::FORBIDDEN,
            ..Answer::json(json!({"resourceType": "OperationOutcome"}))
        },
    );
    let gw = one_tenant(&upstream).await;
    let reply = gw
        .client
        .get_bearer("/Patient/1", &token_for(TENANT_A))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_upstream_that_opts_in_takes_part_in_cookies() {
    let plain = RecordingUpstream::start().await;
    let opted = RecordingUpstream::start().await;
    plain.answer("/fhir", setting_cookies("plain"));
    opted.answer("/fhir", setting_cookies("opted"));
    // The opt-in as the directory JSON and the gateway's configuration write it.
    let opted_upstreams: TenantRecord = serde_json::from_value(json!([{
        "base_url": opted.base("/fhir"), "fhir_version": "3.0", "allow_set_cookie": true
    }]))
    .unwrap();
    let gw = gateway(
        vec![
            (
                TENANT_A,
                upstreams(&plain.base("/fhir"), FhirVersion::Stu3, None),
            ),
            (TENANT_B, opted_upstreams),
        ],
        Duration::from_secs(60),
    )
    .await;
    let cookie = "session=opted; AWSALB=sticky";

    let bearer_b = format!("Bearer {}", token_for(TENANT_B));
    let headers = [("authorization", bearer_b.as_str()), ("cookie", cookie)];
    let reply = gw.client.send("GET", "/Patient/1", &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(opted.last().headers["cookie"], cookie);
    let set: Vec<_> = reply.headers.get_all("set-cookie").iter().collect();
    assert_eq!(
        set,
        ["session=opted; Path=/; HttpOnly", "AWSALB=sticky; Path=/"]
    );

    // The other tenant's upstream, which did not opt in, still takes no part.
    let bearer_a = format!("Bearer {}", token_for(TENANT_A));
    let headers = [("authorization", bearer_a.as_str()), ("cookie", cookie)];
    let reply = gw.client.send("GET", "/Patient/1", &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!plain.last().headers.contains_key("cookie"));
    assert!(!reply.headers.contains_key("set-cookie"));
}

#[tokio::test]
async fn methods_fhir_never_uses_get_405_and_never_reach_the_upstream() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    for method in ["TRACE", "PROPFIND", "FROBNICATE"] {
        let reply = gw
            .client
            .send(method, "/Patient/1", &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.json()["resourceType"], "OperationOutcome", "{method}");
        assert_eq!(
            reply.headers["allow"],
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        );
    }
    // CONNECT, written by hand: HTTP clients only send it to open tunnels.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "CONNECT /Patient/1 HTTP/1.1\r\nHost: {}\r\nAuthorization: {bearer}\r\nConnection: close\r\n\r\n",
        gw.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.starts_with("HTTP/1.1 2"),
        "CONNECT was answered as if forwarded: {answer}"
    );
    assert!(upstream.received().is_empty(), "{:?}", upstream.received());
    // What FHIR does use still goes through.
    for method in ["GET", "HEAD", "DELETE", "OPTIONS"] {
        let reply = gw
            .client
            .send(method, "/Patient/1", &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{method}");
    }
    assert_eq!(upstream.received().len(), 4);
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_upstream_s_response_stay_there() {
    let upstream = RecordingUpstream::start().await;
    let mut answer = Answer::json(json!({"resourceType": "Patient", "id": "1"}));
    answer.headers.extend(
        [
            ("connection", "x-upstream-hop"),
            ("x-upstream-hop", "for the proxy only"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"upstream\""),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x-checksum"),
            ("x-end-to-end", "kept"),
            // Headers for the whole origin, which every tenant's upstream answers under.
            ("strict-transport-security", "max-age=0"),
            ("alt-svc", "h3=\":443\""),
            ("clear-site-data", "\"*\""),
            ("access-control-allow-origin", "https://evil.example"),
            ("access-control-allow-credentials", "true"),
            ("public-key-pins", "pin-sha256=\"x\"; max-age=1"),
            (
                "nel",
                "{\"report_to\":\"x\",\"max_age\":86400,\"success_fraction\":1.0}",
            ),
            (
                "report-to",
                "{\"group\":\"x\",\"endpoints\":[{\"url\":\"https://evil.example\"}]}",
            ),
            ("service-worker-allowed", "/"),
            // The upstream's software, which the clients are not to learn.
            ("server", "Apache/2.4.57 (Debian)"),
            (
                "x-powered-by",
                "HAPI FHIR 7.4.0 REST Server (FHIR Server; FHIR 4.0.1/R4)",
            ),
            ("x-aspnet-version", "4.0.30319"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned())),
    );
    upstream.answer("/fhir/r3/Patient", answer);
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let reply = gw
        .client
        .send("GET", "/Patient/1", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    for gone in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "strict-transport-security",
        "alt-svc",
        "clear-site-data",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "public-key-pins",
        "nel",
        "report-to",
        "service-worker-allowed",
        "server",
        "x-powered-by",
        "x-aspnet-version",
    ] {
        assert!(
            !reply.headers.contains_key(gone),
            "{gone} came back to the client: {:?}",
            reply.headers
        );
    }
    assert_eq!(reply.headers["x-end-to-end"], "kept");
    // Whatever the upstream says of sniffing, a browser is told not to.
    assert_eq!(reply.headers["x-content-type-options"], "nosniff");
}

/// Every relayed answer a browser could render as a document that runs scripts (an upstream's
/// HTML page, SVG, any XML, FHIR's with its XHTML narratives, a body of no type or of several
/// types, of which a browser takes the last) comes with `Content-Security-Policy: sandbox`:
/// not on the gateway's origin, every tenant's. One JSON type, or a PDF (which a sandbox would
/// keep a browser's viewer from showing), comes as it was; so does a `304` without a policy
/// of its own (one with its own would lift the cached answer's sandbox: it gets one too).
#[tokio::test]
async fn documents_a_browser_would_run_scripts_in_are_sandboxed() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let typed = |types: &[&str]| {
        types
            .iter()
            .map(|t| ("content-type".to_owned(), (*t).to_owned()))
            .collect::<Vec<_>>()
    };
    for (path, status, headers, sandboxes) in [
        (
            "/Patient/html",
            200,
            typed(&["text/html; charset=utf-8"]),
            1,
        ),
        ("/Patient/xhtml", 200, typed(&["application/xhtml+xml"]), 1),
        ("/Binary/svg", 200, typed(&["image/svg+xml"]), 1),
        ("/Binary/xml", 200, typed(&["Application/XML"]), 1),
        (
            "/Patient/fhir-xml",
            200,
            typed(&["application/fhir+xml"]),
            1,
        ),
        ("/Binary/untyped", 200, typed(&[]), 1),
        ("/Binary/empty-type", 200, typed(&[""]), 1),
        ("/Binary/listed", 200, typed(&["text/plain, text/html"]), 1),
        (
            "/Binary/two",
            200,
            typed(&["application/pdf", "text/html"]),
            1,
        ),
        ("/Binary/png", 200, typed(&["image/png"]), 1),
        ("/Patient/json", 200, typed(&["application/fhir+json"]), 0),
        ("/Binary/pdf", 200, typed(&["application/pdf"]), 0),
        ("/Patient/not-modified", 304, typed(&[]), 0),
        (
            "/Patient/not-modified-own-policy",
            304,
            vec![(
                "content-security-policy".to_owned(),
                "default-src *".to_owned(),
            )],
            1,
        ),
    ] {
        upstream.answer(
            &format!("/fhir/r3{path}"),
            Answer {
                status: StatusCode::from_u16(status).unwrap(),
                headers,
                body: if status == 304 {
                    String::new()
                } else {
                    "<html><script>alert(1)</script></html>".into()
                },
                ..Answer::json(json!({}))
            },
        );
        let reply = gw
            .client
            .send("GET", path, &[("authorization", bearer.as_str())], "")
            .await;
        assert_eq!(reply.status.as_u16(), status, "{path}");
        let policies: Vec<_> = reply
            .headers
            .get_all("content-security-policy")
            .iter()
            .filter(|v| *v == "sandbox")
            .collect();
        assert_eq!(policies.len(), sandboxes, "{path}: {:?}", reply.headers);
    }
}

#[tokio::test]
async fn hop_by_hop_headers_and_client_credentials_do_not_cross() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let headers = [
        ("authorization", bearer.as_str()),
        ("connection", "x-hop"),
        ("x-hop", "secret"),
        ("proxy-authorization", "Basic eDp5"),
        ("x-tenant-id", TENANT_B),
        ("x-request-id", "abc"),
    ];
    assert_eq!(
        gw.client
            .send("GET", "/Patient/1", &headers, "")
            .await
            .status,
        StatusCode::OK
    );
    let got = upstream.last();
    for gone in ["x-hop", "proxy-authorization", "x-tenant-id"] {
        assert!(
            !got.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(got.headers["x-request-id"], "abc");
    // The upstream's own credentials replace the client's token, whole.
    assert_eq!(
        got.headers["authorization"],
        "Bearer upstream-a-credentials"
    );
    let signature = token_for(TENANT_A).rsplit('.').next().unwrap().to_owned();
    assert!(
        !format!("{:?}", got.headers).contains(&signature),
        "the client's token was forwarded"
    );
}

#[tokio::test]
async fn two_tenants_never_reach_each_other() {
    // Both tenants on one upstream host, under different base paths: the hardest case.
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(
        vec![
            (
                TENANT_A,
                upstreams(&upstream.base("/fhir/a"), FhirVersion::Stu3, None),
            ),
            (
                TENANT_B,
                upstreams(&upstream.base("/fhir/b"), FhirVersion::Dstu2, None),
            ),
        ],
        Duration::from_secs(60),
    )
    .await;
    let bearer_a = format!("Bearer {}", token_for(TENANT_A));
    let host_b = upstream.addr.to_string();
    let tricks: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "/Patient/1",
            vec![("x-tenant-id", TENANT_B), ("x-fhir-tenant-id", TENANT_B)],
        ),
        ("/Patient/1", vec![("host", host_b.as_str())]),
        (
            "/Patient/1?tenant=9b2e1c3d-0000-4000-8000-00000000000b",
            vec![],
        ),
        ("/../b/Patient/1", vec![]),
        ("/%2e%2e/b/Patient/1", vec![]),
        ("/Patient/..%2F..%2Fb%2FPatient", vec![]),
        ("/..;/b/Patient/1", vec![]),
        ("/Patient;b/1", vec![]),
    ];
    for (target, extra) in tricks {
        let mut headers = vec![("authorization", bearer_a.as_str())];
        headers.extend(extra.iter().copied());
        let reply = gw.client.send("GET", target, &headers, "").await;
        // Header tricks are ignored (served from A); path tricks are refused.
        let expected = if target.contains("..") || target.contains("%2e") || target.contains(';') {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        assert_eq!(reply.status, expected, "{target}");
    }
    // An absolute-form request target naming tenant B's base, written by hand.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let raw = format!(
        "GET http://{host_b}/fhir/b/Patient/1 HTTP/1.1\r\nHost: {host_b}\r\nAuthorization: {bearer_a}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    let received = upstream.received();
    assert!(!received.is_empty());
    for got in &received {
        assert!(
            got.target.starts_with("/fhir/a/"),
            "tenant A's request reached {}",
            got.target
        );
    }
}

#[tokio::test]
async fn one_directory_call_for_a_hundred_concurrent_requests_to_a_cold_tenant() {
    let upstream = RecordingUpstream::start().await;
    // A hundred requests on this test's one thread, the upstream's among them: on a busy
    // machine the last are answered well after the usual 500 ms upstream timeout (a 504 once).
    let gw = one_tenant_with_timeout(&upstream, Duration::from_secs(30)).await;
    let token = token_for(TENANT_A);
    let requests = (0..100).map(|_| {
        let (client, token) = (gw.client.clone(), token.clone());
        tokio::spawn(async move { client.get_bearer("/Patient/1", &token).await.status })
    });
    for status in futures::future::join_all(requests).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(gw.lookups.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.received().len(), 100);
}

#[tokio::test]
async fn unknown_tenants_get_403_and_are_cached_negatively() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let token = token_for(TENANT_B);
    for _ in 0..3 {
        let reply = gw.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(
            reply.json()["issue"][0]["diagnostics"],
            "The tenant is not onboarded with this gateway"
        );
    }
    assert_eq!(gw.lookups.load(Ordering::SeqCst), 1);
    // A token without any tenant never reaches the directory.
    let mut c = claims();
    c["scope"] = json!("system/*.read");
    let reply = gw
        .client
        .get_bearer("/Patient/1", &mint(Algorithm::HS256, None, &c))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.challenge().contains("insufficient_scope"));
    assert_eq!(gw.lookups.load(Ordering::SeqCst), 1);
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn invalidation_moves_a_tenant_to_its_new_upstream() {
    let old = RecordingUpstream::start().await;
    let new = RecordingUpstream::start().await;
    let gw = one_tenant(&old).await;
    let token = token_for(TENANT_A);
    assert_eq!(
        gw.client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    gw.directory.upsert(
        tenant(TENANT_A),
        upstreams(&new.base("/fhir"), FhirVersion::Stu3, None),
    );
    // Cached: still the old upstream until the route is invalidated.
    assert_eq!(
        gw.client.get_bearer("/Patient/2", &token).await.status,
        StatusCode::OK
    );
    assert_eq!(old.received().len(), 2);
    gw.cache.invalidate(tenant(TENANT_A)).await;
    assert_eq!(
        gw.client.get_bearer("/Patient/3", &token).await.status,
        StatusCode::OK
    );
    assert_eq!(new.last().target, "/fhir/Patient/3");
    assert_eq!(old.received().len(), 2);
}

#[tokio::test]
async fn directory_changes_can_invalidate_by_themselves() {
    let old = RecordingUpstream::start().await;
    let new = RecordingUpstream::start().await;
    let gw = one_tenant(&old).await;
    let _follower = gw.cache.follow(gw.directory.subscribe());
    let token = token_for(TENANT_A);
    assert_eq!(
        gw.client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    gw.directory.upsert(
        tenant(TENANT_A),
        upstreams(&new.base("/fhir"), FhirVersion::Stu3, None),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        gw.client.get_bearer("/Patient/2", &token).await.status,
        StatusCode::OK
    );
    assert_eq!(new.last().target, "/fhir/Patient/2");
}

#[tokio::test]
async fn known_routes_keep_serving_while_the_directory_is_down() {
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(
        vec![(
            TENANT_A,
            upstreams(&upstream.base("/fhir"), FhirVersion::Stu3, None),
        )],
        Duration::from_millis(100),
    )
    .await;
    let token = token_for(TENANT_A);
    assert_eq!(
        gw.client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    gw.directory_down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        gw.client.get_bearer("/Patient/2", &token).await.status,
        StatusCode::OK
    );
    assert!(
        gw.lookups.load(Ordering::SeqCst) >= 2,
        "the directory was asked again"
    );

    // A tenant never seen while the directory is down: 503.
    let reply = gw
        .client
        .get_bearer("/Patient/1", &token_for(TENANT_B))
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.headers.contains_key("retry-after"));
    assert!(
        !reply.text().contains("database"),
        "directory errors stay in the logs"
    );
}

#[tokio::test]
async fn a_redirect_outside_the_upstreams_base_is_a_502() {
    let upstream = RecordingUpstream::start().await;
    let base = upstream.base("/fhir/r3");
    let host = base.trim_end_matches("/fhir/r3").to_owned();
    let gw = one_tenant(&upstream).await;
    let token = token_for(TENANT_A);
    let redirect = |to: &str| {
        let mut answer = Answer::json(json!({}));
        answer.status = StatusCode::FOUND;
        answer.headers.push(("location".into(), to.to_owned()));
        answer
    };
    // Under the base: rewritten to the gateway's. A relative path: as sent.
    for (to, expected) in [
        (
            format!("{base}/Patient/2"),
            format!("{PUBLIC_BASE}/Patient/2"),
        ),
        (
            "/fhir/r3/Patient/2".to_owned(),
            format!("{PUBLIC_BASE}/Patient/2"),
        ),
        ("Patient/2".to_owned(), "Patient/2".to_owned()),
        ("?page=2".to_owned(), "?page=2".to_owned()),
        // The gateway's own URL already (an upstream that knows its address): as sent.
        (
            format!("{PUBLIC_BASE}/Patient/2"),
            format!("{PUBLIC_BASE}/Patient/2"),
        ),
        (
            "HTTP://Gateway.test:8080/Patient/2".to_owned(),
            "HTTP://Gateway.test:8080/Patient/2".to_owned(),
        ),
    ] {
        upstream.answer("/fhir/r3/Patient/1", redirect(&to));
        let reply = gw.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::FOUND, "{to}");
        assert_eq!(reply.headers["location"], expected.as_str(), "{to}");
    }
    // Anywhere else: the client is not led around the gateway, nor shown where.
    for to in [
        "http://10.0.0.7:8080/fhir/r3/Patient/1".to_owned(),
        format!("{host}/other/Patient/1"),
        "/other/Patient/1".to_owned(),
        "//evil.example/fhir/r3/Patient/1".to_owned(),
        "https://evil.example/".to_owned(),
        "javascript:alert(1)".to_owned(),
        // A browser reads `\` as `/`: another host.
        "\\\\evil.example/x".to_owned(),
        "\\/evil.example/x".to_owned(),
        "/\\evil.example/x".to_owned(),
        "http://gateway.test:8081/Patient/2".to_owned(),
        // Under the base, then out of it again: rewritten, it would lead the client (and its
        // token) elsewhere on the gateway's origin.
        format!("{base}/../admin"),
        format!("{base}/Patient/%2e%2e/%2E%2E/%2e%2e/admin"),
        "/fhir/r3/../../admin".to_owned(),
        format!("{PUBLIC_BASE}/../admin"),
        "../../admin".to_owned(),
    ] {
        upstream.answer("/fhir/r3/Patient/1", redirect(&to));
        let reply = gw.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{to}");
        assert!(reply.headers.get("location").is_none(), "{to}");
        assert!(!reply.text().contains("10.0.0.7"), "{to}");
        assert_eq!(reply.json()["resourceType"], "OperationOutcome", "{to}");
    }
    // Two Locations: which one a client follows is its own choice.
    let mut two = redirect("Patient/2");
    two.headers
        .push(("location".into(), "http://10.0.0.7/x".into()));
    upstream.answer("/fhir/r3/Patient/1", two);
    let reply = gw.client.get_bearer("/Patient/1", &token).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    // A 304 has no Location worth the name; a 201's Location is no redirect.
    let mut created = Answer::json(json!({"resourceType": "Patient", "id": "3"}));
    created.status = StatusCode::CREATED;
    created
        .headers
        .push(("location".into(), "http://10.0.0.7/x".into()));
    created
        .headers
        .push(("content-location".into(), "/elsewhere/Patient/3".into()));
    upstream.answer("/fhir/r3/Patient/1", created);
    let reply = gw.client.get_bearer("/Patient/1", &token).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    // The resource is made: the answer stands, without the URLs that lead around the gateway.
    assert!(reply.headers.get("location").is_none());
    assert!(reply.headers.get("content-location").is_none());
    assert_eq!(reply.json()["id"], "3");
    // A relative one resolves under the gateway's URL: kept.
    let mut created = Answer::json(json!({"resourceType": "Patient", "id": "4"}));
    created.status = StatusCode::CREATED;
    created
        .headers
        .push(("location".into(), "Patient/4/_history/1".into()));
    upstream.answer("/fhir/r3/Patient/1", created);
    let reply = gw.client.get_bearer("/Patient/1", &token).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.headers["location"], "Patient/4/_history/1");
}

/// A Bundle's two `link[].url`s and first `entry[].fullUrl`: under the gateway's base, with
/// these paths.
fn assert_bundle_urls(bundle: &Value, links: [&str; 2], full_url: &str) {
    for (at, link) in links.iter().enumerate() {
        assert_eq!(bundle["link"][at]["url"], format!("{PUBLIC_BASE}{link}"));
    }
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("{PUBLIC_BASE}{full_url}")
    );
}

#[tokio::test]
async fn upstream_urls_in_location_and_bundles_lead_back_through_the_gateway() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let base = upstream.base("/fhir/r3");
    upstream.answer(
        "/fhir/r3/Patient?",
        Answer::json(json!({"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "self", "url": format!("{base}/Patient?family=x")},
                     {"relation": "next", "url": format!("{base}?_getpages=abc&_getpagesoffset=10")}],
            "entry": [{"fullUrl": format!("{base}/Patient/1"), "resource": {"resourceType": "Patient", "id": "1"}}]})),
    );
    let mut created = Answer::json(json!({"resourceType": "Patient", "id": "9"}));
    created.status = StatusCode::CREATED;
    created
        .headers
        .push(("location".into(), format!("{base}/Patient/9/_history/1")));
    created.headers.push((
        "content-location".into(),
        format!("{base}/Patient/9/_history/1"),
    ));
    upstream.answer("/fhir/r3/Patient/new", created);
    // The same spelt as a client reads it: the host in capitals, a path-absolute reference,
    // and paging links in a `Link` header.
    let mut spelt = Answer::json(json!({"resourceType": "Patient", "id": "9"}));
    spelt.status = StatusCode::CREATED;
    spelt.headers.push((
        "location".into(),
        base.replace("http://127.0.0.1", "HTTP://127.0.0.1") + "/Patient/9",
    ));
    spelt
        .headers
        .push(("content-location".into(), "/fhir/r3/Patient/9".into()));
    spelt.headers.push((
        "link".into(),
        format!("<{base}/Patient?page=2>; rel=\"next\", <https://hl7.org/fhir>; rel=\"help\""),
    ));
    upstream.answer("/fhir/r3/Patient/spelt", spelt);
    // Links that would show the client where the upstream is: its host at another path, with
    // credentials, an internal address; and a Bundle's links spelt otherwise.
    let mut revealing = Answer::json(json!({"resourceType": "Bundle", "type": "searchset",
        "link": [{"relation": "next", "url": base.replace("http://", "HTTP://") + "/Patient?page=2"},
                 {"relation": "prev", "url": "/fhir/r3/Patient?page=0"}],
        "entry": [{"fullUrl": base.replace("http://", "http://user:secret@") + "/Patient/1"}]}));
    let host = base.trim_end_matches("/fhir/r3");
    revealing.headers.push((
        "link".into(),
        format!(
            "<{}/Patient/9>; rel=\"next\", <{host}/fhir/r2/Patient>; rel=\"alternate\", \
             <http://10.0.0.7:8080/fhir/x>; rel=\"prev\", \
             <http://hl7.org/fhir/StructureDefinition/Patient>; rel=\"profile\"",
            base.replace("http://", "http://user:secret@")
        ),
    ));
    revealing
        .headers
        .push(("link".into(), format!("<{host}/admin>; rel=\"help\"")));
    upstream.answer("/fhir/r3/Patient/revealing", revealing);

    let token = token_for(TENANT_A);
    let reply = gw.client.get_bearer("/Patient?family=x", &token).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_bundle_urls(
        &reply.json(),
        ["/Patient?family=x", "?_getpages=abc&_getpagesoffset=10"],
        "/Patient/1",
    );
    assert_eq!(
        reply.headers["content-length"],
        reply.body.len().to_string()
    );

    let reply = gw.client.get_bearer("/Patient/new", &token).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.headers["location"],
        format!("{PUBLIC_BASE}/Patient/9/_history/1")
    );
    assert_eq!(
        reply.headers["content-location"],
        format!("{PUBLIC_BASE}/Patient/9/_history/1")
    );

    let reply = gw.client.get_bearer("/Patient/spelt", &token).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.headers["location"],
        format!("{PUBLIC_BASE}/Patient/9")
    );
    assert_eq!(
        reply.headers["content-location"],
        format!("{PUBLIC_BASE}/Patient/9")
    );
    assert_eq!(
        reply.headers["link"],
        format!(
            "<{PUBLIC_BASE}/Patient?page=2>; rel=\"next\", <https://hl7.org/fhir>; rel=\"help\""
        )
        .as_str()
    );

    let reply = gw.client.get_bearer("/Patient/revealing", &token).await;
    assert_eq!(reply.status, StatusCode::OK);
    let links: Vec<_> = reply.headers.get_all("link").iter().collect();
    assert_eq!(
        links,
        [format!(
            "<{PUBLIC_BASE}/Patient/9>; rel=\"next\", \
             <http://hl7.org/fhir/StructureDefinition/Patient>; rel=\"profile\""
        )
        .as_str()]
    );
    assert_bundle_urls(
        &reply.json(),
        ["/Patient?page=2", "/Patient?page=0"],
        "/Patient/1",
    );
    assert!(!reply.text().contains("secret"), "{}", reply.text());
}

/// A Bundle read as a resource (a signed document) comes as the upstream holds it; a rewritten
/// answer loses the digests of the upstream's bytes, an untouched one keeps them.
#[tokio::test]
async fn stored_bundles_are_read_unchanged_and_rewritten_answers_lose_their_digests() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let base = upstream.base("/fhir/r3");
    let document = json!({"resourceType": "Bundle", "id": "d", "type": "document",
        "entry": [{"fullUrl": format!("{base}/Composition/1"), "resource": {"resourceType": "Composition", "id": "1"}}],
        "signature": {"data": "c2lnbmVk"}});
    let mut stored = Answer::json(document.clone());
    stored
        .headers
        .push(("content-digest".into(), "sha-256=:AAAA:".into()));
    upstream.answer("/fhir/r3/Bundle/d", stored);
    let mut search = Answer::json(json!({"resourceType": "Bundle", "type": "searchset",
        "entry": [{"fullUrl": format!("{base}/Patient/1"), "resource": {"resourceType": "Patient", "id": "1"}}]}));
    for (name, value) in [
        ("content-digest", "sha-256=:AAAA:"),
        ("repr-digest", "sha-256=:AAAA:"),
        ("digest", "SHA-256=AAAA"),
        ("content-md5", "AAAA"),
    ] {
        search.headers.push((name.into(), value.into()));
    }
    upstream.answer("/fhir/r3/Patient?", search);
    let token = token_for(TENANT_A);

    let reply = gw.client.get_bearer("/Bundle/d", &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), document);
    assert_eq!(reply.headers["content-digest"], "sha-256=:AAAA:");

    let reply = gw.client.get_bearer("/Patient?family=x", &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["entry"][0]["fullUrl"],
        format!("{PUBLIC_BASE}/Patient/1")
    );
    for gone in ["content-digest", "repr-digest", "digest", "content-md5"] {
        assert!(
            !reply.headers.contains_key(gone),
            "{gone}: {:?}",
            reply.headers
        );
    }
}

#[tokio::test]
async fn bundle_links_written_with_escaped_slashes_lead_back_through_the_gateway_too() {
    // PHP's `json_encode` writes every `/` as `\/`: the same URLs to a JSON reader.
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let escaped = upstream.base("/fhir/r3").replace('/', "\\/");
    let mut answer = Answer::json(json!({}));
    answer.body = format!(
        r#"{{"resourceType":"Bundle","type":"searchset","link":[{{"relation":"next","url":"{escaped}\/Patient?page=2"}}],"entry":[{{"fullUrl":"{escaped}\/Patient\/1","resource":{{"resourceType":"Patient","id":"1","text":{{"div":"<div>{escaped}<\/div>"}}}}}}]}}"#
    );
    upstream.answer("/fhir/r3/Patient?", answer);
    let reply = gw
        .client
        .get_bearer("/Patient?family=x", &token_for(TENANT_A))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let bundle = reply.json();
    assert_eq!(
        bundle["link"][0]["url"],
        format!("{PUBLIC_BASE}/Patient?page=2")
    );
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("{PUBLIC_BASE}/Patient/1")
    );
    // The resource is as the upstream wrote it, escapes and all.
    assert!(
        reply
            .text()
            .contains(&format!(r#""div":"<div>{escaped}<\/div>""#)),
        "{}",
        reply.text()
    );
    assert_eq!(
        reply.headers["content-length"],
        reply.body.len().to_string()
    );
}

#[tokio::test]
async fn xml_bundle_links_lead_back_through_the_gateway_too() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let base = upstream.base("/fhir/r3");
    let mut answer = Answer::json(json!({}));
    answer.headers = vec![(
        "content-type".into(),
        "application/fhir+xml;charset=utf-8".into(),
    )];
    answer.body = format!(
        "<Bundle xmlns=\"http://hl7.org/fhir\"><type value=\"searchset\"/>\
         <link><relation value=\"next\"/><url value=\"{base}/Patient?page=2&amp;_count=1\"/></link>\
         <entry><fullUrl value=\"{base}/Patient/1\"/><resource><Patient><id value=\"1\"/>\
         <photo><url value=\"{base}/Binary/1\"/></photo></Patient></resource></entry></Bundle>"
    );
    upstream.answer("/fhir/r3/Patient?", answer);
    let reply = gw
        .client
        .get(
            "/Patient?family=x",
            &[
                ("authorization", &format!("Bearer {}", token_for(TENANT_A))),
                ("accept", "application/fhir+xml"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    assert!(
        text.contains(&format!(
            "<url value=\"{PUBLIC_BASE}/Patient?page=2&amp;_count=1\"/>"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("<fullUrl value=\"{PUBLIC_BASE}/Patient/1\"/>")),
        "{text}"
    );
    // The resource is as the upstream wrote it.
    assert!(
        text.contains(&format!("<photo><url value=\"{base}/Binary/1\"/></photo>")),
        "{text}"
    );
    assert_eq!(
        reply.headers["content-length"],
        reply.body.len().to_string()
    );
}

#[tokio::test]
async fn a_bundle_sent_in_chunks_is_read_whole_and_rewritten() {
    // An upstream that writes its Bundle in three chunks, pausing between them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let parts = [
        r#"{"resourceType":"Bundle","type":"searchset","#.to_owned(),
        format!(r#""link":[{{"relation":"self","url":"{base}/Patient?family=x"}}],"#),
        format!(r#""entry":[{{"fullUrl":"{base}/Patient/1"}}]}}"#),
    ];
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = vec![0; 8192];
        let _ = stream.read(&mut request).await.unwrap();
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        for part in parts {
            let chunk = format!("{:x}\r\n{part}\r\n", part.len());
            stream.write_all(chunk.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.write_all(b"0\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let gw = one_tenant_at(&base).await;
    let reply = gw
        .client
        .get_bearer("/Patient?family=x", &token_for(TENANT_A))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({"resourceType": "Bundle", "type": "searchset",
               "link": [{"relation": "self", "url": format!("{PUBLIC_BASE}/Patient?family=x")}],
               "entry": [{"fullUrl": format!("{PUBLIC_BASE}/Patient/1")}]})
    );
    assert_eq!(
        reply.headers["content-length"],
        reply.body.len().to_string()
    );
}

#[tokio::test]
async fn large_bundles_stream_through_untouched() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let base = upstream.base("/fhir/r3");
    let filler = "x".repeat(5 * 1024 * 1024);
    let body = json!({"resourceType": "Bundle", "link": [{"relation": "self", "url": format!("{base}/Patient")}],
                      "meta": {"tag": [{"code": filler}]}});
    upstream.answer("/fhir/r3/Patient", Answer::json(body.clone()));
    let reply = gw.client.get_bearer("/Patient", &token_for(TENANT_A)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        body,
        "above the rewrite limit the body is passed as it is"
    );
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_and_a_slow_upstream_blocks_no_one_else() {
    let slow = RecordingUpstream::start().await;
    let fast = RecordingUpstream::start().await;
    let mut delayed = Answer::json(json!({"resourceType": "Patient"}));
    delayed.delay = Duration::from_secs(2);
    slow.answer("/", delayed);
    // A port with nothing behind it.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gw = gateway(
        vec![
            (
                TENANT_A,
                upstreams(&slow.base("/fhir"), FhirVersion::Stu3, None),
            ),
            (
                TENANT_B,
                upstreams(&format!("http://{closed}/fhir"), FhirVersion::Stu3, None),
            ),
        ],
        Duration::from_secs(60),
    )
    .await;
    let reply = gw
        .client
        .get_bearer("/Patient/1", &token_for(TENANT_B))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");

    gw.directory.upsert(
        tenant(TENANT_B),
        upstreams(&fast.base("/fhir"), FhirVersion::Stu3, None),
    );
    gw.cache.invalidate(tenant(TENANT_B)).await;
    let slow_request = {
        let client = gw.client.clone();
        let token = token_for(TENANT_A);
        tokio::spawn(async move { client.get_bearer("/Patient/1", &token).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        assert_eq!(
            gw.client
                .get_bearer("/Patient/1", &token_for(TENANT_B))
                .await
                .status,
            StatusCode::OK
        );
    }
    assert!(
        !slow_request.is_finished(),
        "tenant B was served while tenant A's upstream hung"
    );
    let reply = slow_request.await.unwrap();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["issue"][0]["code"], "timeout");
}

/// An upstream that answers every request with a response head and the first chunk of its
/// body, then, by the request's last path segment: `stall` sends nothing more (holding the
/// connection), `cut` closes the connection. `json` in the path makes it FHIR JSON (read whole
/// by the proxy to rewrite), else an octet stream (streamed through).
async fn half_answering_upstream() -> String {
    raw_upstream(|head, mut stream| async move {
        let ty = if head.contains("json") {
            "application/fhir+json"
        } else {
            "application/octet-stream"
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{{\"resourceType\":\r\n"
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
        if head.contains("/stall ") {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        // `cut`: the connection closes mid-body.
    })
    .await
}

#[tokio::test]
async fn an_upstream_that_stalls_or_breaks_off_mid_body_never_passes_for_a_whole_answer() {
    let base = half_answering_upstream().await;
    // The proxy's upstream timeout is 500 ms.
    let gw = one_tenant_at(&base).await;
    let token = token_for(TENANT_A);
    // A JSON body (read whole to rewrite its links, before the client gets the head): 504
    // when it stops coming, 502 when it breaks off; an OperationOutcome either way, not a
    // 200 with the cut body.
    let started = std::time::Instant::now();
    let reply = gw.client.get_bearer("/Patient/json/stall", &token).await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["issue"][0]["code"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(10));
    let reply = gw.client.get_bearer("/Patient/json/cut", &token).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");

    // A streamed body: the head and the first chunk reach the client, then its connection is
    // closed without the chunked body's end, so no client takes the cut body for the whole.
    for (path, what) in [("/Binary/stall", "stalled"), ("/Binary/cut", "cut")] {
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            gw.addr
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let started = std::time::Instant::now();
        let ended =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(
            ended.is_ok(),
            "{what}: the connection is still open after 10 s"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        assert!(answer.contains("{\"resourceType\":"), "{what}: {answer}");
        assert!(
            !answer.ends_with("0\r\n\r\n"),
            "{what}: the cut body was ended as if whole: {answer:?}"
        );
    }
}

/// An upstream answering every request with a JSON Bundle of about 40 KB, sent in two parts
/// a second apart.
async fn slow_bundle_upstream() -> String {
    // One answer a connection, said so (`Connection: close`): a connection it closes after
    // answering is never taken again from the proxy's pool, where a request could race its
    // close and fail.
    // Requests begun so far: the first two answers end only once both have begun (and a
    // second more), so that each holds its first part while the other's is read, however
    // slowly a loaded machine starts the second request.
    let (begun, _) = tokio::sync::watch::channel(0usize);
    let begun = Arc::new(begun);
    raw_upstream(move |_head, mut stream| {
        let begun = Arc::clone(&begun);
        async move {
            let first = format!(
                "{{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"meta\":{{\"tag\":[{{\"code\":\"{}",
                "x".repeat(40_000)
            );
            let last = "\"}]}}";
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{first}\r\n",
                first.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
            begun.send_modify(|n| *n += 1);
            let mut both = begun.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(30), both.wait_for(|n| *n >= 2)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let end = format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len());
            let _ = stream.write_all(end.as_bytes()).await;
        }
    })
    .await
}

/// The stack over `base` with a proxy that reads JSON up to 64 KiB to rewrite it, and holds
/// 64 KiB of such bodies at most: a client of it.
async fn budget_of_64_kib(base: &str) -> TestClient {
    let directory = InMemoryDirectory::new();
    directory.upsert(tenant(TENANT_A), upstreams(base, FhirVersion::Stu3, None));
    let stack = ServiceBuilder::new()
        .layer(bearer())
        .layer(TenantScopeLayer::builder().build().unwrap())
        .layer(TenantRoutingLayer::builder(directory).build().unwrap())
        .service(
            FhirProxy::builder(PUBLIC_BASE)
                .rewrite_limit(64 * 1024)
                .rewrite_budget(64 * 1024)
                .build()
                .unwrap(),
        );
    TestClient::new(serve_tower(stack).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_to_rewrite_beyond_the_budget_get_503_and_the_budget_comes_back() {
    let base = slow_bundle_upstream().await;
    let client = budget_of_64_kib(&base).await;
    let token = token_for(TENANT_A);
    // Two at once: each holds its first 40 KB while the rest comes; the second to read its
    // part passes the 64 KB budget and is refused, the other completes.
    let (one, two) = tokio::join!(
        client.get_bearer("/Patient?one", &token),
        client.get_bearer("/Patient?two", &token)
    );
    let mut statuses = [one.status, two.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE],
        "{} / {}",
        one.text(),
        two.text()
    );
    let refused = if one.status == StatusCode::OK {
        &two
    } else {
        &one
    };
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["issue"][0]["code"], "transient");
    let served = if one.status == StatusCode::OK {
        &one
    } else {
        &two
    };
    assert_eq!(served.json()["resourceType"], "Bundle");
    // Once taken, its bytes are free: the next one alone passes.
    let again = client.get_bearer("/Patient?three", &token).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
}

/// The answers to requests the upstream has acted on (two transactions here) are never refused
/// for the budget: where a `GET`'s would get `503`, the second looks for room a moment and,
/// found or not, is answered whole (rewritten or as the upstream wrote it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_writes_are_never_refused_for_the_budget() {
    let base = slow_bundle_upstream().await;
    let client = budget_of_64_kib(&base).await;
    let auth = format!("Bearer {}", token_for(TENANT_A));
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/fhir+json"),
    ];
    let body = r#"{"resourceType":"Bundle","type":"transaction","entry":[]}"#;
    let (one, two) = tokio::join!(
        client.send("POST", "/", &headers, body),
        client.send("POST", "/", &headers, body)
    );
    for reply in [&one, &two] {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["resourceType"], "Bundle");
    }
}

#[tokio::test]
async fn traversal_is_a_bad_request_that_never_reaches_the_upstream() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let token = token_for(TENANT_A);
    for target in [
        "/../x",
        "/%2e%2e/x",
        "/Patient%2F..%2Fx",
        "/Patient/.%2E/x",
        "/%252e%252e/x",
        "/Patient%255c..%255cx",
        "/Patient\\..\\x",
        "/%25252e%25252e/x",
        "/..%09/x",
        "/..%3f/x",
        "/%c0%ae%c0%ae/x",
        "/%ef%bc%8e%ef%bc%8e/x",
        // The fullwidth full stops sent as they are.
        "/Patient/\u{ff0e}\u{ff0e}/\u{ff0e}\u{ff0e}/x",
    ] {
        let reply = gw.client.get_bearer(target, &token).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{target}");
        let outcome: Value = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn upstreams_may_speak_http2_with_prior_knowledge() {
    let upstream = RecordingUpstream::start().await;
    let h2 = Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4)
        .unwrap()
        .with_http2();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([h2]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let reply = gw
        .client
        .send(
            "POST",
            "/Patient/_search",
            &[
                ("authorization", &format!("Bearer {}", token_for(TENANT_A))),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "family=x",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let got = upstream.last();
    assert_eq!(got.version, http::Version::HTTP_2);
    assert_eq!(got.target, "/fhir/Patient/_search");
    assert_eq!(got.body, "family=x".as_bytes());
    assert_eq!(
        upstream
            .received()
            .iter()
            .filter(|r| r.version == http::Version::HTTP_11)
            .count(),
        0
    );
}

#[tokio::test]
async fn answers_vary_by_the_token_so_no_cache_shares_them_across_tenants() {
    // Every tenant reads `/Patient/1` at the same URL: a cache must key it by the token.
    let upstream = RecordingUpstream::start().await;
    let mut cacheable = Answer::json(json!({"resourceType": "Patient", "id": "1"}));
    cacheable
        .headers
        .push(("cache-control".into(), "public, max-age=3600".into()));
    cacheable.headers.push(("vary".into(), "Accept".into()));
    upstream.answer("/fhir/Patient/1", cacheable);
    let record =
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
            .unwrap();
    let gw = gateway(
        vec![(TENANT_A, record.clone()), (TENANT_B, record)],
        Duration::from_secs(60),
    )
    .await;
    for (path, upstream_vary) in [("/Patient/1", vec!["Accept"]), ("/Patient/2", vec![])] {
        let reply = gw.client.get_bearer(path, &token_for(TENANT_A)).await;
        assert_eq!(reply.status, StatusCode::OK);
        let vary: Vec<&str> = reply
            .headers
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        let expected: Vec<&str> = upstream_vary.into_iter().chain(["Authorization"]).collect();
        assert_eq!(vary, expected, "{path}");
    }
    // A refusal does not depend on a token's tenant.
    let reply = gw.client.get("/Patient/1", &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.headers.get("vary").is_none(), "{:?}", reply.headers);
}

/// An HTTP/2 upstream that answers every request `200` with `Content-Length: 1000` and the
/// content type `content_type`, sends 16 bytes of it, then resets the stream with `NO_ERROR`
/// (which a client's HTTP/2 stack takes for the body's end).
async fn resetting_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    tokio::spawn(async move {
                        let content_type = if request.uri().path().contains("/Binary/") {
                            "application/octet-stream"
                        } else {
                            "application/fhir+json"
                        };
                        let response = http::Response::builder()
                            .header("content-type", content_type)
                            .header("content-length", "1000")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(response, false) else {
                            return;
                        };
                        let _ =
                            send.send_data(bytes::Bytes::from_static(b"{\"resourceType\":"), false);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        send.send_reset(h2::Reason::NO_ERROR);
                    });
                }
            });
        }
    });
    format!("http://{addr}/fhir")
}

#[tokio::test]
async fn an_http2_upstream_body_cut_short_of_its_length_never_passes_for_whole() {
    let base = resetting_upstream().await;
    let upstream = Upstream::parse(&base, FhirVersion::R4)
        .unwrap()
        .with_http2();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.client.addr();
    let token = token_for(TENANT_A);
    // JSON, read whole to rewrite its links: 502, nothing of the cut body.
    let request = format!(
        "GET /Patient/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (answer, _) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("broke off its answer"), "{answer}");
    // Streamed: the head has gone, so the client's connection is broken off at once, short
    // of the length declared (before, it waited 30 s for the rest, or a chunked body ended as
    // if whole).
    let request = format!(
        "GET /Binary/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (answer, took) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    assert!(body.len() < 1000, "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// An HTTP/2 (h2c) upstream answering `/fhir/Binary/big` with 32 MiB and anything else with a
/// small Patient.
async fn large_answers_upstream() -> String {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let big = bytes::Bytes::from(vec![b'x'; 32 << 20]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let big = big.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let big = big.clone();
                    async move {
                        let _: &hyper::body::Incoming = request.body();
                        let (content_type, body) = if request.uri().path() == "/fhir/Binary/big" {
                            ("application/octet-stream", big)
                        } else {
                            (
                                "application/fhir+json",
                                bytes::Bytes::from_static(
                                    br#"{"resourceType":"Patient","id":"1"}"#,
                                ),
                            )
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", content_type)
                                .body(Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}/fhir")
}

#[tokio::test]
async fn clients_that_read_nothing_of_large_http2_answers_do_not_stall_the_others() {
    // Every request to an HTTP/2 upstream shares one connection and its flow-control window.
    // A client that asks for a large answer and reads none of it holds what its stream was
    // granted; with hyper's defaults (2 MiB a stream, 5 MiB the connection) three such
    // clients held the whole window and every other answer on the connection waited for the
    // idle watchdog to drop them.
    let base = large_answers_upstream().await;
    let upstream = Upstream::parse(&base, FhirVersion::R4)
        .unwrap()
        .with_http2();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let token = token_for(TENANT_A);
    assert_eq!(
        gw.client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(gw.addr).await.unwrap();
        stream
            .write_all(
                format!(
                    "GET /Binary/big HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        stalled.push(stream);
    }
    // Long enough for the upstream to fill what each stalled stream may hold.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        gw.client.get_bearer("/Patient/1", &token),
    )
    .await
    .expect("an answer on the shared HTTP/2 connection waited on the clients that read nothing");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["id"], "1");
    drop(stalled);
}

#[tokio::test]
async fn an_upstreams_101_to_a_plain_request_is_a_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that switches protocols though nobody asked it to.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).await;
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let upstream = Upstream::parse(&format!("http://{addr}/fhir"), FhirVersion::R4).unwrap();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let bearer = format!("Bearer {}", token_for(TENANT_A));
    let reply = gw
        .client
        .send("GET", "/Patient/1", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(
        reply.text().contains("gave no final answer"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn a_clients_trailers_reach_no_upstream() {
    // Trailers would pass around the header policy: an Authorization, a tenant hint, a
    // method override. hyper never sends them to an HTTP/1.1 upstream; HTTP/2 could.
    let upstream = RecordingUpstream::start().await;
    let h2 = Upstream::parse(&upstream.base("/h2"), FhirVersion::R4)
        .unwrap()
        .with_http2();
    let h1 = Upstream::parse(&upstream.base("/h1"), FhirVersion::R4).unwrap();
    let gw = gateway(
        vec![
            (TENANT_A, TenantRecord::new([h2]).unwrap()),
            (TENANT_B, TenantRecord::new([h1]).unwrap()),
        ],
        Duration::from_secs(60),
    )
    .await;
    for tenant in [TENANT_A, TENANT_B] {
        let request = format!(
            "POST /Patient HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n\
             2\r\n{{}}\r\n0\r\nAuthorization: Bearer smuggled\r\nX-Tenant-Id: {TENANT_B}\r\n\
             X-HTTP-Method-Override: DELETE\r\nCookie: session=x\r\n\r\n",
            token_for(tenant)
        );
        let addr = gw.client.addr();
        let (answer, _) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    for request in received {
        assert_eq!(
            request.body,
            "{}".as_bytes(),
            "the body still arrives whole"
        );
        assert!(request.trailers.is_none(), "{request:?}");
        assert!(request.headers.get("x-tenant-id").is_none());
    }
}

/// An upstream that counts its connections and ends each after three answers
/// (`Connection: close`), echoing every request's method, target and body.
async fn keep_alive_upstream() -> (String, Arc<AtomicUsize>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let answered = Arc::new(AtomicUsize::new(0));
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let answered = Arc::clone(&answered);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let echo = json!({
                            "resourceType": "Parameters",
                            "method": parts.method.as_str(),
                            "target": parts.uri.to_string(),
                            "body": String::from_utf8_lossy(&body),
                        });
                        let mut response = http::Response::builder()
                            .header("content-type", "application/fhir+json");
                        if (answered.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(3) {
                            response = response.header("connection", "close");
                        }
                        let body = http_body_util::Full::new(bytes::Bytes::from(echo.to_string()));
                        Ok::<_, hyper::Error>(response.body(body).unwrap())
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
        }
    });
    (format!("http://{addr}/fhir"), connections)
}

#[tokio::test]
async fn upstream_connections_are_kept_between_requests_and_closed_ones_replaced() {
    let (base, connections) = keep_alive_upstream().await;
    let gw = one_tenant_at(&base).await;
    let auth = format!("Bearer {}", token_for(TENANT_A));
    for i in 0..11 {
        // Reads, and at 9 a write, whose connection is not used again (a server may leave a
        // body unread): the read after it opens another.
        let (method, body) = if i != 9 {
            ("GET", String::new())
        } else {
            (
                "POST",
                format!(r#"{{"resourceType":"Observation","id":"{i}"}}"#),
            )
        };
        let reply = gw
            .client
            .send(
                method,
                &format!("/Observation?n={i}"),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/fhir+json"),
                ],
                &body,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        let echo = reply.json();
        assert_eq!(echo["method"], method, "request {i}");
        assert_eq!(echo["target"], format!("/fhir/Observation?n={i}"));
        assert_eq!(echo["body"], body, "request {i}: the body arrives whole");
    }
    // Three answers per connection, each connection used until the upstream closed it; then
    // one for the write, one after it.
    assert_eq!(connections.load(Ordering::SeqCst), 5);

    // Requests at once open connections of their own; afterwards they are reused.
    let token = token_for(TENANT_A);
    let requests = (0..6).map(|_| gw.client.get_bearer("/Patient/1", &token));
    for reply in futures::future::join_all(requests).await {
        assert_eq!(reply.status, StatusCode::OK);
    }
    let opened = connections.load(Ordering::SeqCst);
    assert!(opened <= 5 + 6, "{opened} connections");
    for _ in 0..2 {
        let reply = gw.client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        opened,
        "the burst's connections are reused"
    );
}

/// The next request head on `stream`, read byte by byte (nothing past it); `None` when the
/// connection ends first.
async fn next_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An upstream that answers the first request of each connection and keeps it open, then, on
/// reading the next request's head, closes the connection unanswered: an upstream whose
/// keep-alive timeout ends just as a request arrives. Records each request line it read.
async fn closing_keep_alive_upstream() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let heads = Arc::clone(&seen);
    let base = raw_upstream(move |head, mut stream| {
        let heads = Arc::clone(&heads);
        async move {
            let line = |head: &str| head.lines().next().unwrap_or_default().to_owned();
            heads.lock().unwrap().push(line(&head));
            let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 26\r\n\r\n{\"resourceType\":\"Patient\"}";
            stream.write_all(answer.as_bytes()).await.unwrap();
            let Some(next) = next_head(&mut stream).await else {
                return;
            };
            heads.lock().unwrap().push(line(&next));
            // Closed unanswered as `stream` drops.
        }
    })
    .await;
    (base, seen)
}

#[tokio::test]
async fn a_safe_request_lost_as_the_upstream_closes_an_idle_connection_goes_again_once() {
    let (base, seen) = closing_keep_alive_upstream().await;
    let gw = one_tenant_at(&base).await;
    let auth = format!("Bearer {}", token_for(TENANT_A));
    let send = |method: &'static str, target: &'static str| {
        let (client, auth) = (gw.client.clone(), auth.clone());
        async move {
            let headers = [
                ("authorization", auth.as_str()),
                ("content-type", "application/fhir+json"),
            ];
            let body = if method == "POST" {
                r#"{"resourceType":"Patient"}"#
            } else {
                ""
            };
            client.send(method, target, &headers, body).await
        }
    };
    // Past a tenth of a second idle (as any upstream's keep-alive timeout is): a GET the
    // upstream closed the connection on goes again on a new connection, and is answered.
    assert_eq!(send("GET", "/Patient/1").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = send("GET", "/Patient/2").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["resourceType"], "Patient");
    // A POST may have been acted on: never sent twice, 502.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = send("POST", "/Patient").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "GET /fhir/Patient/1 HTTP/1.1",
            "GET /fhir/Patient/2 HTTP/1.1",
            "GET /fhir/Patient/2 HTTP/1.1",
            "POST /fhir/Patient HTTP/1.1",
        ]
    );
}

/// An upstream serving two tenants' bases that answers out of turn: on its first connection,
/// a tenth of a second after its first answer, it sends a second one no request asked for
/// (as a server with a bug in its keep-alive handling may). Every other answer is a Patient
/// whose id is the request's path.
async fn answering_twice_upstream() -> String {
    let connections = Arc::new(AtomicUsize::new(0));
    raw_upstream(move |mut head, mut stream| {
        let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let answer = |path: &str| {
                let body = format!(r#"{{"resourceType":"Patient","id":"{path}"}}"#);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let mut answered = 0;
            loop {
                let path = head.split(' ').nth(1).unwrap_or_default().replace('/', "-");
                if stream.write_all(answer(&path).as_bytes()).await.is_err() {
                    return;
                }
                answered += 1;
                if first && answered == 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = stream.write_all(answer("SMUGGLED").as_bytes()).await;
                }
                let Some(next) = next_head(&mut stream).await else {
                    return;
                };
                head = next;
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_upstream_answering_out_of_turn_never_gives_one_tenant_anothers_answer() {
    let base = answering_twice_upstream().await;
    let gw = gateway(
        vec![
            (TENANT_A, upstreams(&base, FhirVersion::Stu3, None)),
            (
                TENANT_B,
                upstreams(&format!("{base}2"), FhirVersion::Stu3, None),
            ),
        ],
        Duration::from_secs(60),
    )
    .await;
    let (a, b) = (token_for(TENANT_A), token_for(TENANT_B));
    let reply = gw.client.get_bearer("/Patient/1", &a).await;
    assert_eq!(reply.json()["id"], "-fhir-Patient-1");
    // Tenant B asks while A's connection waits to send its stray answer: on a connection of
    // its own, it gets its own answer.
    for _ in 0..3 {
        let reply = gw.client.get_bearer("/Patient/2", &b).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["id"], "-fhir2-Patient-2");
    }
}

/// An answer under a transfer coding hyper does not undo (`gzip, chunked`; `chunked, chunked`,
/// which leaves one framing in the body) would reach the client as content once
/// `Transfer-Encoding` is gone: `502`, for an answer read whole and a streamed one.
#[tokio::test]
async fn answers_under_a_transfer_coding_but_chunked_are_a_502() {
    for coding in ["gzip, chunked", "chunked, chunked", "x-custom, chunked"] {
        for (content_type, path) in [
            ("application/fhir+json", "/Patient/1"),
            ("application/octet-stream", "/Binary/1"),
        ] {
            let base = raw_upstream(move |_head, mut stream| async move {
                let body = "{\"resourceType\":\"Patient\"}";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\
                     Transfer-Encoding: {coding}\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            })
            .await;
            let base = Box::leak(base.into_boxed_str());
            let upstream = Upstream::parse(base, FhirVersion::R4).unwrap();
            let gw = gateway(
                vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
                Duration::from_secs(60),
            )
            .await;
            let reply = gw.client.get_bearer(path, &token_for(TENANT_A)).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_GATEWAY,
                "{coding} {path}: {}",
                reply.text()
            );
            assert_eq!(reply.json()["resourceType"], "OperationOutcome");
        }
    }
}

/// An upstream that frames its answers twice, `Content-Length` beside `Transfer-Encoding:
/// chunked`, each chunked body itself a whole HTTP response: `length` is the `Content-Length`
/// it claims, `content_type` its type.
async fn twice_framing_upstream(length: &'static str, content_type: &'static str) -> String {
    raw_upstream(move |_head, mut stream| async move {
        let forged = FORGED_RESPONSE;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\
             Content-Length: {length}\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{forged}\r\n0\r\n\r\n",
            forged.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    })
    .await
}

/// What [`twice_framing_upstream`] sends as the body of each answer.
const FORGED_RESPONSE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\
    Set-Cookie: session=forged\r\nAccess-Control-Allow-Origin: https://evil.example\r\n\r\nforged!";

#[tokio::test]
async fn an_upstream_framing_its_answer_twice_cannot_split_the_clients_connection() {
    use http_body_util::BodyExt;
    // A Content-Length of 0 (the body would be read as the next answer), one shorter than the
    // body (its tail would), one longer (the next answer would be swallowed); for a JSON
    // answer (read whole) and a streamed one.
    for length in ["0", "5", "1000"] {
        for (content_type, path) in [
            ("application/fhir+json", "/Patient/1"),
            ("application/octet-stream", "/Binary/1"),
        ] {
            let base = Box::leak(
                twice_framing_upstream(length, content_type)
                    .await
                    .into_boxed_str(),
            );
            let upstream = Upstream::parse(base, FhirVersion::R4).unwrap();
            let gw = gateway(
                vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
                Duration::from_secs(60),
            )
            .await;
            // One keep-alive connection, two requests, as a balancer in front would send them.
            let stream = tokio::net::TcpStream::connect(gw.client.addr())
                .await
                .unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let request = |path: &str, token: bool| {
                let mut request = http::Request::get(path).header("host", "gw");
                if token {
                    request =
                        request.header("authorization", format!("Bearer {}", token_for(TENANT_A)));
                }
                request
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap()
            };
            let case = format!("Content-Length: {length}, {content_type}");
            let first = sender.send_request(request(path, true)).await.unwrap();
            assert_eq!(first.status(), StatusCode::OK, "{case}");
            let first_length = first.headers().get("content-length").cloned();
            let body = first.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                body,
                FORGED_RESPONSE.as_bytes(),
                "{case}: the body as sent, all of it"
            );
            if let Some(declared) = first_length {
                assert_eq!(declared, body.len().to_string().as_str(), "{case}");
            }
            // The next answer on the connection is the gateway's own (no token: 401), not
            // the forged one.
            sender.ready().await.unwrap();
            let second = sender
                .send_request(request("/Patient/2", false))
                .await
                .unwrap();
            assert_eq!(second.status(), StatusCode::UNAUTHORIZED, "{case}");
            assert!(second.headers().get("set-cookie").is_none(), "{case}");
            let body = second.into_body().collect().await.unwrap().to_bytes();
            let outcome: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("{case}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{case}");
        }
    }
}

#[tokio::test]
async fn an_upstreams_trailers_reach_no_client() {
    // An HTTP/2 upstream whose answer ends with trailers the head could not carry past the
    // header policy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let response = http::Response::builder()
                        .header("content-type", "application/octet-stream")
                        .body(())
                        .unwrap();
                    let Ok(mut send) = respond.send_response(response, false) else {
                        return;
                    };
                    let _ = send.send_data(bytes::Bytes::from_static(b"binary"), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("set-cookie", "session=from-a-trailer".parse().unwrap());
                    trailers.insert(
                        "access-control-allow-origin",
                        "https://evil.example".parse().unwrap(),
                    );
                    let _ = send.send_trailers(trailers);
                }
            });
        }
    });
    let upstream = Upstream::parse(&format!("http://{addr}/fhir"), FhirVersion::R4)
        .unwrap()
        .with_http2();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    // An HTTP/2 client, to whom a server sends trailers as they come.
    let mut sender = http2_client(gw.client.addr()).await;
    let request = http::Request::get("http://gw/Binary/1")
        .header("authorization", format!("Bearer {}", token_for(TENANT_A)))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(
        collected.trailers(),
        None,
        "the upstream's trailers reached the client"
    );
    assert_eq!(collected.to_bytes(), "binary");
}

#[tokio::test]
async fn a_body_that_could_not_reach_the_upstream_as_sent_is_refused() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let addr = gw.client.addr();
    let token = token_for(TENANT_A);
    let send =
        |request: String| tokio::task::spawn_blocking(move || send_until_closed(addr, &request).0);
    // Compressed in transit: the chunks taken off, the bytes would go on still compressed.
    let gzip = format!(
        "POST /Patient HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nTransfer-Encoding: gzip, chunked\r\n\
         Connection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
    );
    let answer = send(gzip).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    // A GET's body reached the upstream or not by how it was framed.
    for framing in [
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Content-Length: 5\r\n\r\nhello",
    ] {
        let get = format!(
            "GET /Patient?name=x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n{framing}"
        );
        let answer = send(get).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing}: {answer}");
        assert!(answer.contains("_search"), "{answer}");
    }
    assert!(
        upstream.received().is_empty(),
        "nothing refused was forwarded"
    );
    // An empty one is no body.
    let get = format!(
        "GET /Patient?name=x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = send(get).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn an_http_1_0_upstream_is_answered_for_in_http_1_1() {
    let base = raw_upstream(|_head, mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}")
            .await;
    })
    .await;
    let upstream = Upstream::parse(&base, FhirVersion::R4).unwrap();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.client.addr();
    let request = format!(
        "GET /Patient/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token_for(TENANT_A)
    );
    let (answer, _) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("{}"), "{answer}");
}

/// Without the `tls` feature, an https:// upstream cannot be reached: the answer says why.
#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn without_tls_an_https_upstream_gets_a_502_that_says_why() {
    let upstream = Upstream::parse("https://127.0.0.1:9/fhir", FhirVersion::R4).unwrap();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let reply = gw
        .client
        .get_bearer("/Patient/1", &token_for(TENANT_A))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(reply.text().contains("`tls` feature"), "{}", reply.text());
}

#[tokio::test]
async fn an_http2_get_with_a_body_is_refused_and_one_without_passes() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let mut sender = http2_client(gw.client.addr()).await;
    let get = |body: &'static str| {
        // DATA frames with no `content-length` (a stream body, not a full one).
        let (mut tx, rx) = futures::channel::mpsc::channel::<
            Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >(1);
        if !body.is_empty() {
            tx.try_send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                body.as_bytes(),
            ))))
            .unwrap();
        }
        drop(tx);
        let body = http_body_util::StreamBody::new(rx);
        http::Request::get("http://gw/Patient?name=x")
            .header("authorization", format!("Bearer {}", token_for(TENANT_A)))
            .body(http_body_util::Either::Left(body))
            .unwrap()
    };
    let refused = sender.send_request(get("name=y")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(upstream.received().is_empty());
    sender.ready().await.unwrap();
    let empty = http::Request::get("http://gw/Patient?name=x")
        .header("authorization", format!("Bearer {}", token_for(TENANT_A)))
        .body(http_body_util::Either::Right(http_body_util::Empty::<
            bytes::Bytes,
        >::new()))
        .unwrap();
    let passed = sender.send_request(empty).await.unwrap();
    assert_eq!(passed.status(), StatusCode::OK);
    // A stream left open by its HEADERS and ended by an empty DATA frame carries no body.
    sender.ready().await.unwrap();
    let passed = sender.send_request(get("")).await.unwrap();
    assert_eq!(passed.status(), StatusCode::OK);
    assert_eq!(upstream.received().len(), 2);
}

#[tokio::test]
async fn an_http2_delete_ended_by_an_empty_data_frame_goes_bodiless_and_one_with_a_body_keeps_it() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let mut sender = http2_client(gw.client.addr()).await;
    // HEADERS without END_STREAM and no `content-length`, then DATA frames (`chunks`, perhaps
    // one empty) and the stream's end.
    let request = |method: &str, chunks: &[&'static str]| {
        let (mut tx, rx) = futures::channel::mpsc::channel::<
            Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >(4);
        for chunk in chunks {
            tx.try_send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                chunk.as_bytes(),
            ))))
            .unwrap();
        }
        drop(tx);
        http::Request::builder()
            .method(method)
            .uri("http://gw/Patient/1")
            .header("authorization", format!("Bearer {}", token_for(TENANT_A)))
            .body(http_body_util::StreamBody::new(rx))
            .unwrap()
    };
    for (method, chunks) in [
        ("DELETE", &[""][..]),
        ("OPTIONS", &[][..]),
        ("DELETE", &["", "{\"a\":", "1}"][..]),
    ] {
        sender.ready().await.unwrap();
        let answer = sender.send_request(request(method, chunks)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{method} {chunks:?}");
    }
    let received = upstream.received();
    assert_eq!(received.len(), 3);
    for (bodiless, label) in received[..2].iter().zip(["DELETE", "OPTIONS"]) {
        assert_eq!(bodiless.method, label);
        // No framing the client did not send: no `Transfer-Encoding: chunked`, no length.
        assert!(
            !bodiless.headers.contains_key("transfer-encoding"),
            "{label}: {:?}",
            bodiless.headers
        );
        assert!(bodiless.body.is_empty());
    }
    // A body sent goes whole, its first frame read ahead of the rest.
    assert_eq!(received[2].method, "DELETE");
    assert_eq!(&received[2].body[..], b"{\"a\":1}");
}

#[tokio::test]
async fn an_http2_get_whose_stream_never_ends_gets_408_after_the_upstreams_timeout() {
    // The proxy's timeout here is 500 ms.
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let mut sender = http2_client(gw.client.addr()).await;
    // HEADERS without END_STREAM, then nothing: the sender is kept, so the stream stays open.
    let (_open, rx) = futures::channel::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(1);
    let request = http::Request::get("http://gw/Patient/1")
        .header("authorization", format!("Bearer {}", token_for(TENANT_A)))
        .body(http_body_util::StreamBody::new(rx))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("no answer to a GET whose stream stays open")
        .unwrap();
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    let outcome: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "timeout");
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn a_token_in_the_query_never_reaches_the_upstream() {
    let upstream = RecordingUpstream::start().await;
    let gw = one_tenant(&upstream).await;
    let token = token_for(TENANT_A);
    // As sent, and spelt as servers that trim names (a `+` is a space), decode them or compare
    // them as Java's `equalsIgnoreCase` does (the Kelvin sign a `k`) read it.
    for name in [
        "access_token",
        "access_token+",
        "access_token%09",
        "ACCESS%5FTOKEN",
        "access_to%E2%84%AAen",
        // Unencoded; and as PHP (`.` for `_`) and array parsers (`[]`) read names.
        "access_to\u{212A}en",
        "access.token",
        "access_token[]",
        "acce%C3%9F_token",
    ] {
        let reply = gw
            .client
            .send(
                "GET",
                &format!("/Patient?name=x&{name}={token}"),
                &[("authorization", &format!("Bearer {token}"))],
                "",
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{name}: {}",
            reply.text()
        );
        assert!(reply.text().contains("query string"), "{}", reply.text());
    }
    assert!(upstream.received().is_empty());
}

/// An upstream that reads a request's body until it has sent nothing for `patience`, then
/// writes `last` (nothing: it closes the connection unanswered, as Tomcat does to a body that
/// stops arriving) and closes.
async fn impatient_upstream(patience: Duration, last: &'static [u8]) -> String {
    raw_upstream(move |_head, mut stream| async move {
        let mut buf = [0u8; 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(patience, stream.read(&mut buf)).await {
            if n == 0 {
                break;
            }
        }
        let _ = stream.write_all(last).await;
    })
    .await
}

/// Sends `request` (raw bytes, perhaps a body cut short and left open) to `addr` and reads
/// the answer's head, within 8 s.
async fn answer_head(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), async {
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 8 s");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_upstream_giving_up_on_a_body_that_stopped_arriving_is_the_clients_408_not_a_502() {
    let base = impatient_upstream(Duration::from_millis(2500), b"").await;
    let upstream = Upstream::parse(&base, FhirVersion::Stu3)
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.addr;
    let token = token_for(TENANT_A);
    // A body of 100 bytes that stops after 16.
    let head = format!(
        "POST /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{{\"resourceType\":"
    );
    let answer = answer_head(addr, &head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // An upstream answering something unreadable while the body waits is at fault itself.
    let garbage = impatient_upstream(Duration::from_millis(2500), b"garbage\r\n\r\n").await;
    let upstream = Upstream::parse(&garbage, FhirVersion::Stu3)
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    gw.directory
        .upsert(tenant(TENANT_A), TenantRecord::new([upstream]).unwrap());
    gw.cache.invalidate(tenant(TENANT_A)).await;
    let answer = answer_head(addr, &head).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");

    // An upstream that fails while the body is not waiting on the client is the upstream's
    // failure still: a whole body, the connection closed unanswered.
    let body = r#"{"resourceType":"Patient"}"#;
    let reply = gw
        .client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/fhir+json"),
            ],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
}

#[tokio::test]
async fn a_bodiless_answer_keeps_the_length_it_speaks_of_and_a_204_has_none() {
    // An upstream answering HEAD with the length of the GET's body, a 304 with its
    // representation's, and a DELETE with a 204 that declares a length anyway.
    let base = raw_upstream(|head, mut stream| async move {
        let answer: &[u8] = if head.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 42\r\n\r\n"
        } else if head.starts_with("DELETE") {
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 304 Not Modified\r\nETag: W/\"1\"\r\nContent-Length: 42\r\n\r\n"
        };
        let _ = stream.write_all(answer).await;
    })
    .await;
    let upstream = Upstream::parse(&base, FhirVersion::R4).unwrap();
    let gw = gateway(
        vec![(TENANT_A, TenantRecord::new([upstream]).unwrap())],
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.client.addr();
    let token = token_for(TENANT_A);
    let ask = |method: &str, extra: &str| {
        let request = format!(
            "{method} /Patient/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n{extra}\
             Connection: close\r\n\r\n"
        );
        tokio::task::spawn_blocking(move || send_until_closed(addr, &request).0)
    };
    let head = ask("HEAD", "").await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 42\r\n"), "{head}");
    let not_modified = ask("GET", "If-None-Match: W/\"1\"\r\n").await.unwrap();
    assert!(not_modified.starts_with("HTTP/1.1 304"), "{not_modified}");
    assert!(
        not_modified.ends_with("\r\n\r\n"),
        "no body: {not_modified}"
    );
    let deleted = ask("DELETE", "").await.unwrap().to_ascii_lowercase();
    assert!(deleted.starts_with("http/1.1 204"), "{deleted}");
    assert!(!deleted.contains("content-length"), "{deleted}");
}

/// An HTTP/2 (prior knowledge) connection to `addr`, its driver spawned.
async fn http2_client<B>(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}
