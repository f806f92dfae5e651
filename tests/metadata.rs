//! Metadata pass-through over real HTTP, in front of the whole stack.

mod support;

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::json;
use support::*;
use tower::ServiceBuilder;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::gateway::Gateway;
use tower_fhir::metadata::{CapabilityCacheLayer, MetadataLayer};
use tower_fhir::proxy::FhirProxy;
use tower_fhir::route::{
    InMemoryDirectory, InProcessTenant, TenantRecord, TenantRoutingLayer, Upstream,
};
use tower_fhir::tenant::TenantScopeLayer;
use tower_fhir::version::{FhirVersion, VersionNegotiationLayer};

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

async fn setup() -> (TestClient, RecordingUpstream, String) {
    setup_with(CapabilityCacheLayer::new(
        std::time::Duration::from_secs(60),
        1000,
    ))
    .await
}

async fn setup_with(cache: CapabilityCacheLayer) -> (TestClient, RecordingUpstream, String) {
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir/metadata",
        Answer::json(
            json!({"resourceType": "Conformance", "fhirVersion": "1.0.2",
            "rest": [{"mode": "server", "security": {"extension": [{"url": OAUTH_URIS,
                "extension": [{"url": "token", "valueUri": "http://ehr.internal/token"}]}]}}]}),
        ),
    );
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TENANT.parse().unwrap(),
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::Dstu2).unwrap()])
            .unwrap(),
    );
    let stack = ServiceBuilder::new()
        .layer(VersionNegotiationLayer::builder().build().unwrap())
        .layer(
            MetadataLayer::builder("http://gateway.test", "http://gateway.test/oauth/token")
                .build()
                .unwrap(),
        )
        .layer(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
                .build()
                .unwrap(),
        )
        .layer(TenantScopeLayer::builder().build().unwrap())
        .layer(TenantRoutingLayer::builder(directory).build().unwrap())
        .layer(cache)
        .service(FhirProxy::builder("http://gateway.test").build().unwrap());
    let client = TestClient::new(serve_tower(stack).await);
    let mut c = claims();
    c["scope"] = json!(TENANT);
    (
        client,
        upstream,
        format!("Bearer {}", mint(Algorithm::HS256, None, &c)),
    )
}

#[tokio::test]
async fn without_a_token_the_gateway_describes_itself() {
    let (client, upstream, _) = setup().await;
    let reply = client.send("GET", "/metadata?_format=json", &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["fhirVersion"],
        "3.0.2",
        "_format names no release: the default"
    );
    let reply = client
        .send(
            "GET",
            "/metadata",
            &[("accept", "application/fhir+json; fhirVersion=4.0")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let statement = reply.json();
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    let oauth = &statement["rest"][0]["security"]["extension"][0];
    assert_eq!(oauth["url"], OAUTH_URIS);
    assert_eq!(
        oauth["extension"][0]["valueUri"],
        "http://gateway.test/oauth/token"
    );
    assert!(upstream.received().is_empty());

    let reply = client
        .send(
            "GET",
            "/.well-known/smart-configuration",
            &[("accept", "text/html")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["token_endpoint"],
        "http://gateway.test/oauth/token"
    );
}

#[tokio::test]
async fn a_client_that_asks_for_xml_gets_the_statement_in_xml() {
    let (client, upstream, _) = setup().await;
    for (query, accept) in [
        ("/metadata?_format=xml", None),
        ("/metadata", Some("application/fhir+xml; fhirVersion=4.0")),
        (
            "/metadata",
            Some("application/fhir+xml;q=1.0, application/fhir+json;q=0.8"),
        ),
    ] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let reply = client.send("GET", query, &headers, "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["vary"], "Accept, Authorization");
        let content_type = reply.headers["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("application/fhir+xml; fhirVersion="),
            "{content_type}"
        );
        let xml = reply.text();
        assert!(
            xml.contains(r#"<CapabilityStatement xmlns="http://hl7.org/fhir">"#),
            "{xml}"
        );
        assert!(xml.contains(&format!(r#"<extension url="{OAUTH_URIS}"><extension url="token"><valueUri value="http://gateway.test/oauth/token"/>"#)), "{xml}");
    }
    // DSTU2's own media type and root.
    let reply = client
        .send(
            "GET",
            "/metadata",
            &[("accept", "application/xml+fhir; fhirVersion=1.0")],
            "",
        )
        .await;
    assert_eq!(
        reply.headers["content-type"],
        "application/xml+fhir; fhirVersion=1.0"
    );
    assert!(reply
        .text()
        .contains(r#"<Conformance xmlns="http://hl7.org/fhir">"#));
    // HAPI's clients take either at the same preference: JSON.
    let hapi = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0, application/xml+fhir;q=0.9, application/json+fhir;q=0.9";
    let reply = client
        .send("GET", "/metadata", &[("accept", hapi)], "")
        .await;
    assert_eq!(reply.json()["resourceType"], "CapabilityStatement");
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn with_a_token_the_tenants_server_answers_with_the_gateways_security() {
    let (client, upstream, bearer) = setup().await;
    let reply = client
        .send("GET", "/metadata", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.last().target, "/fhir/metadata");
    let statement = reply.json();
    assert_eq!(statement["resourceType"], "Conformance");
    assert_eq!(statement["fhirVersion"], "1.0.2");
    assert_eq!(statement["implementation"]["url"], "http://gateway.test");
    let oauth = &statement["rest"][0]["security"]["extension"][0];
    assert_eq!(
        oauth["extension"][0]["valueUri"],
        "http://gateway.test/oauth/token"
    );
    assert!(!reply.text().contains("ehr.internal"));

    // Cached per tenant and upstream: the hospital is asked once.
    let again = client
        .send("GET", "/metadata", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(again.json(), statement);
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test]
async fn look_alike_paths_need_a_token() {
    let (client, upstream, _) = setup().await;
    for target in [
        "/metadata/x",
        "//metadata/x",
        "/%6detadata",
        "/METADATA",
        "/Patient?x=metadata",
    ] {
        let reply = client.send("GET", target, &[], "").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{target}");
    }
    assert!(upstream.received().is_empty());
}

/// The proxy merges runs of slashes (and an upstream ignores a trailing one): these reach the
/// hospital as its `metadata`, so the gateway answers them as `metadata`, rewritten and cached.
#[tokio::test]
async fn metadata_spelled_with_empty_segments_is_metadata() {
    let (client, upstream, bearer) = setup().await;
    let targets = ["//metadata", "///metadata", "/metadata/", "/metadata//"];
    for target in targets {
        let reply = client
            .send("GET", target, &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{target}: {}", reply.text());
        let statement = reply.json();
        assert_eq!(statement["resourceType"], "Conformance", "{target}");
        let oauth = &statement["rest"][0]["security"]["extension"][0];
        assert_eq!(
            oauth["extension"][0]["valueUri"], "http://gateway.test/oauth/token",
            "{target}"
        );
        assert!(!reply.text().contains("ehr.internal"), "{target}");
    }
    assert_eq!(upstream.received().len(), 1, "asked once, then cached");
    assert_eq!(upstream.last().target, "/fhir/metadata");
    // Without a token: the gateway's own statement, as for `/metadata`.
    for target in targets {
        let reply = client.send("GET", target, &[], "").await;
        assert_eq!(reply.status, StatusCode::OK, "{target}");
        assert_eq!(reply.json()["fhirVersion"], "3.0.2", "{target}");
    }
    assert_eq!(upstream.received().len(), 1);
}

/// A HEAD tells what the GET would send: the length of the rewritten statement.
#[tokio::test]
async fn a_head_of_metadata_has_the_length_of_the_get() {
    let (client, upstream, bearer) = setup().await;
    for token in [Some(bearer.as_str()), None] {
        let headers: Vec<(&str, &str)> = token.map(|t| ("authorization", t)).into_iter().collect();
        let get = client.send("GET", "/metadata", &headers, "").await;
        assert_eq!(get.status, StatusCode::OK);
        let head = client.send("HEAD", "/metadata", &headers, "").await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty());
        assert_eq!(
            head.headers["content-length"],
            get.body.len().to_string(),
            "token: {}",
            token.is_some()
        );
        assert_eq!(head.headers["content-type"], get.headers["content-type"]);
    }
    assert_eq!(
        upstream.received().len(),
        1,
        "the HEAD was answered from the cache"
    );
}

#[tokio::test]
async fn without_a_token_a_dstu2_only_client_gets_dstu2() {
    let (client, _, _) = setup().await;
    let reply = client
        .send(
            "GET",
            "/metadata",
            &[("accept", "application/json+fhir")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["resourceType"], "Conformance");
    assert_eq!(reply.json()["fhirVersion"], "1.0.2");
    assert_eq!(
        reply.headers["content-type"],
        "application/json+fhir; fhirVersion=1.0"
    );
}

/// A GET has no body: its `Content-Type` names no release, and the answer varies only by what
/// a cache keys it with (and `Vary` names).
#[tokio::test]
async fn a_gets_content_type_does_not_choose_the_statement() {
    let (client, _, _) = setup().await;
    let reply = client
        .send(
            "GET",
            "/metadata",
            &[("content-type", "application/fhir+json; fhirVersion=1.0")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["resourceType"], "CapabilityStatement");
    assert_eq!(reply.json()["fhirVersion"], "3.0.2");
    let vary: Vec<_> = reply.headers.get_all("vary").iter().collect();
    assert_eq!(vary, ["Accept, Authorization"]);
}

#[tokio::test]
async fn without_a_token_a_configured_upstreams_statement_can_stand_in() {
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir/metadata",
        Answer::json(
            json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
            "software": {"name": "Hospital EHR"}, "rest": [{"mode": "server"}]}),
        ),
    );
    let proxy = FhirProxy::builder("http://gateway.test").build().unwrap();
    let source = Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap();
    let stack = ServiceBuilder::new()
        .layer(VersionNegotiationLayer::builder().build().unwrap())
        .layer(
            MetadataLayer::builder("http://gateway.test", "http://gateway.test/oauth/token")
                .statement_from_upstream(proxy.clone(), source)
                .build()
                .unwrap(),
        )
        .layer(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
                .build()
                .unwrap(),
        )
        .service(proxy);
    let client = TestClient::new(serve_tower(stack).await);
    for _ in 0..3 {
        let reply = client
            .send(
                "GET",
                "/metadata",
                &[("accept", "application/fhir+json; fhirVersion=4.0")],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        let statement = reply.json();
        assert_eq!(statement["software"]["name"], "Hospital EHR");
        assert_eq!(
            statement["rest"][0]["security"]["extension"][0]["url"],
            OAUTH_URIS
        );
        assert_eq!(statement["implementation"]["url"], "http://gateway.test");
    }
    assert_eq!(upstream.received().len(), 1, "fetched once, then cached");
    assert!(!upstream.last().headers.contains_key("authorization"));
}

#[tokio::test]
async fn an_upstream_that_gives_no_statement_is_not_asked_for_each_client() {
    let upstream = RecordingUpstream::start().await;
    let mut unavailable = Answer::json(json!({"resourceType": "OperationOutcome"}));
    unavailable.status = StatusCode::SERVICE_UNAVAILABLE;
    upstream.answer("/fhir/metadata", unavailable);
    let proxy = FhirProxy::builder("http://gateway.test").build().unwrap();
    let source = Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap();
    let stack = ServiceBuilder::new()
        .layer(VersionNegotiationLayer::builder().build().unwrap())
        .layer(
            MetadataLayer::builder("http://gateway.test", "http://gateway.test/oauth/token")
                .default_version(FhirVersion::R4)
                .statement_from_upstream(proxy.clone(), source)
                .build()
                .unwrap(),
        )
        .service(proxy);
    let client = TestClient::new(serve_tower(stack).await);
    for _ in 0..5 {
        let reply = client.send("GET", "/metadata", &[], "").await;
        assert_eq!(reply.status, StatusCode::OK);
        let statement = reply.json();
        assert_eq!(
            statement["software"]["name"], "tower-fhir gateway",
            "generated"
        );
        assert_eq!(statement["fhirVersion"], "4.0.1");
    }
    assert_eq!(upstream.received().len(), 1, "the failure is remembered");
}

#[tokio::test]
async fn an_xml_statement_is_never_cached_nor_served_to_a_json_client() {
    let (client, upstream, bearer) = setup().await;
    // The upstream's own XML statement: its OAuth URIs and internal hosts, which the gateway
    // does not rewrite.
    let xml = r#"<Conformance xmlns="http://hl7.org/fhir"><rest><security><extension url="http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"><extension url="token"><valueUri value="http://ehr.internal/token"/></extension></extension></security></rest></Conformance>"#;
    upstream.answer(
        "/fhir/metadata?_format=xml",
        Answer {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "application/xml+fhir".into())],
            body: xml.into(),
            delay: std::time::Duration::ZERO,
        },
    );
    let ask_xml = || async {
        let headers = [("authorization", bearer.as_str())];
        client
            .send("GET", "/metadata?_format=xml", &headers, "")
            .await
    };
    let ask_json = || async {
        let headers = [
            ("authorization", bearer.as_str()),
            ("accept", "application/fhir+json"),
            ("accept-encoding", "gzip"),
        ];
        client.send("GET", "/metadata", &headers, "").await
    };
    let check_json = |reply: &Reply| {
        assert_eq!(reply.status, StatusCode::OK);
        let content_type = reply.headers["content-type"].to_str().unwrap();
        assert!(content_type.contains("json"), "{content_type}");
        let statement = reply.json();
        assert_eq!(statement["resourceType"], "Conformance", "{}", reply.text());
        let oauth = &statement["rest"][0]["security"]["extension"][0];
        assert_eq!(oauth["url"], OAUTH_URIS);
        assert_eq!(
            oauth["extension"][0]["valueUri"],
            "http://gateway.test/oauth/token"
        );
        assert!(!reply.text().contains("ehr.internal"), "{}", reply.text());
    };

    // A client of the tenant asks for XML: passed through as the upstream sent it.
    let reply = ask_xml().await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), xml);
    assert_eq!(upstream.last().target, "/fhir/metadata?_format=xml");
    // The next client of that tenant asks for JSON: JSON, with the gateway's security.
    let reply = ask_json().await;
    check_json(&reply);
    assert_eq!(
        upstream.received().len(),
        2,
        "the XML statement was served from the cache"
    );
    assert_eq!(upstream.last().target, "/fhir/metadata");
    assert_eq!(
        upstream.last().headers["accept-encoding"],
        "identity",
        "the statement must come uncompressed to be rewritten"
    );
    // XML again: never kept, asked again; JSON again: kept.
    assert_eq!(ask_xml().await.text(), xml);
    assert_eq!(upstream.received().len(), 3);
    check_json(&ask_json().await);
    assert_eq!(upstream.received().len(), 3, "the JSON statement is cached");
}

#[tokio::test]
async fn a_statement_larger_than_the_caches_bytes_is_served_and_never_kept() {
    let cache = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 1000);
    let (client, upstream, bearer) = setup_with(cache.max_bytes(100 << 10)).await;
    let padding = "x".repeat(200 << 10);
    upstream.answer(
        "/fhir/metadata",
        Answer::json(
            json!({"resourceType": "Conformance", "fhirVersion": "1.0.2",
            "text": {"status": "generated", "div": padding}, "rest": [{"mode": "server"}]}),
        ),
    );
    for asked in 1..=2 {
        let headers = [("authorization", bearer.as_str())];
        let reply = client.send("GET", "/metadata", &headers, "").await;
        assert_eq!(reply.status, StatusCode::OK);
        let statement = reply.json();
        assert_eq!(
            statement["text"]["div"].as_str().map(str::len),
            Some(200 << 10)
        );
        let oauth = &statement["rest"][0]["security"]["extension"][0];
        assert_eq!(
            oauth["extension"][0]["valueUri"],
            "http://gateway.test/oauth/token"
        );
        assert_eq!(upstream.received().len(), asked, "asked again, not kept");
    }
}

#[tokio::test]
async fn a_statement_the_upstream_marks_no_store_is_asked_for_each_time() {
    let (client, upstream, bearer) = setup().await;
    let statement = json!({"resourceType": "Conformance", "fhirVersion": "1.0.2",
        "rest": [{"mode": "server"}]});
    let mut answer = Answer::json(statement);
    answer
        .headers
        .push(("cache-control".into(), "no-store".into()));
    upstream.answer("/fhir/metadata", answer.clone());
    let headers = [("authorization", bearer.as_str())];
    for asked in 1..=2 {
        let reply = client.send("GET", "/metadata", &headers, "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["resourceType"], "Conformance");
        assert_eq!(upstream.received().len(), asked, "kept against no-store");
    }
    // The same statement with a lifetime of its own is kept.
    answer.headers.pop();
    answer
        .headers
        .push(("cache-control".into(), "public, max-age=120".into()));
    upstream.answer("/fhir/metadata", answer);
    for _ in 0..2 {
        let reply = client
            .send("GET", "/metadata?mode=full", &headers, "")
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(upstream.received().len(), 3, "asked once, then kept");
}

/// The upstream's statement, its own OAuth token endpoint in it.
fn hospital_statement() -> serde_json::Value {
    json!({"resourceType": "Conformance", "fhirVersion": "1.0.2",
        "rest": [{"mode": "server", "security": {"extension": [{"url": OAUTH_URIS,
            "extension": [{"url": "token", "valueUri": "http://ehr.internal/token"}]}]}}]})
}

/// Some .NET servers start their JSON with a UTF-8 byte order mark: a statement all the same,
/// rewritten and cached as any other.
#[tokio::test]
async fn a_statement_after_a_byte_order_mark_is_rewritten_and_cached() {
    let (client, upstream, bearer) = setup().await;
    upstream.answer(
        "/fhir/metadata",
        Answer {
            status: StatusCode::OK,
            headers: vec![(
                "content-type".into(),
                "application/json+fhir; charset=utf-8".into(),
            )],
            body: format!("\u{feff}{}", hospital_statement()),
            delay: std::time::Duration::ZERO,
        },
    );
    for _ in 0..2 {
        let reply = client
            .send("GET", "/metadata", &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(!reply.text().contains("ehr.internal"), "{}", reply.text());
        let statement = reply.json();
        assert_eq!(statement["resourceType"], "Conformance", "{}", reply.text());
        let oauth = &statement["rest"][0]["security"]["extension"][0];
        assert_eq!(
            oauth["extension"][0]["valueUri"],
            "http://gateway.test/oauth/token"
        );
    }
    assert_eq!(upstream.received().len(), 1, "asked once, then cached");
}

/// A statement sent as JSON that is no JSON statement would reach the client with the
/// hospital's own security section: 502 with an OperationOutcome instead. (Another resource,
/// a `TerminologyCapabilities`, has none, and passes.)
#[tokio::test]
async fn a_json_typed_statement_that_does_not_parse_is_a_502() {
    let (client, upstream, bearer) = setup().await;
    let whole = hospital_statement().to_string();
    for (content_type, body) in [
        // Cut short.
        ("application/fhir+json", &whole[..whole.len() - 2]),
        // A statement without its type.
        (
            "application/json",
            r#"{"rest":[{"security":{"service":[{"text":"ehr.internal"}]}}]}"#,
        ),
    ] {
        upstream.answer(
            "/fhir/metadata",
            Answer {
                status: StatusCode::OK,
                headers: vec![("content-type".into(), content_type.into())],
                body: body.to_owned(),
                delay: std::time::Duration::ZERO,
            },
        );
        let reply = client
            .send("GET", "/metadata", &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{content_type}");
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
        assert!(!reply.text().contains("ehr.internal"), "{}", reply.text());
    }
}

/// A tenant served in-process by an application behind `GatewayLayer`, with or without a
/// `metadata` route of its own; its client's token.
async fn in_process(own_statement: bool) -> (TestClient, String) {
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TENANT.parse().unwrap(),
        TenantRecord::in_process(
            InProcessTenant::new("store", [FhirVersion::R4, FhirVersion::Dstu2]).unwrap(),
        ),
    );
    let layer = Gateway::builder("http://gateway.test")
        .directory(directory)
        .token_url("http://gateway.test/oauth/token")
        .auth(BearerAuthLayer::builder().key(VerificationKey::hmac(HMAC_SECRET).unwrap()))
        .versions(
            VersionNegotiationLayer::builder().supported([FhirVersion::Dstu2, FhirVersion::R4]),
        )
        .build_layer()
        .unwrap();
    let mut app = axum::Router::new().route(
        "/Patient/{id}",
        axum::routing::get(|| async { "a patient" }),
    );
    if own_statement {
        app = app.route(
            "/metadata",
            axum::routing::get(|| async {
                let statement = json!({"resourceType": "CapabilityStatement",
                    "fhirVersion": "4.0.1", "software": {"name": "the app"},
                    "rest": [{"mode": "server"}]});
                (
                    [("content-type", "application/fhir+json")],
                    statement.to_string(),
                )
            }),
        );
    }
    let client = TestClient::new(serve(app.layer(layer)).await);
    let mut c = claims();
    c["scope"] = json!(TENANT);
    (
        client,
        format!("Bearer {}", mint(Algorithm::HS256, None, &c)),
    )
}

/// FHIR clients fetch `metadata` with their token too: an in-process application without a
/// `metadata` route gets the statement the gateway generates, in the tenant's release, as a
/// request without a token does.
#[tokio::test]
async fn an_in_process_tenant_without_a_statement_of_its_own_gets_the_generated_one() {
    let (client, bearer) = in_process(false).await;
    let with_token = |accept: Option<&'static str>| {
        let mut headers = vec![("authorization", bearer.clone())];
        headers.extend(accept.map(|a| ("accept", a.to_owned())));
        headers
    };
    let send = |method: &'static str, uri: &'static str, headers: Vec<(&'static str, String)>| {
        let client = client.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            client.send(method, uri, &headers, "").await
        }
    };
    let reply = send("GET", "/metadata", with_token(None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let statement = reply.json();
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1", "the tenant's default");
    assert_eq!(
        statement["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        "http://gateway.test/oauth/token"
    );
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=4.0"
    );
    // In the release the client names; as XML where it asks for XML.
    let dstu2 = Some("application/json+fhir; fhirVersion=1.0");
    let reply = send("GET", "/metadata", with_token(dstu2)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "Conformance");
    let reply = send("GET", "/metadata?_format=xml", with_token(None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.text().contains("<CapabilityStatement xmlns"),
        "{}",
        reply.text()
    );
    // A HEAD: the GET's headers, no body.
    let get = send("GET", "/metadata", with_token(None)).await;
    let head = send("HEAD", "/metadata", with_token(None)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], get.body.len().to_string());
    // Without a token, asked in that release: the same statement (naming none, the
    // gateway's default release, STU3, as no tenant is known).
    let r4 = vec![(
        "accept",
        "application/fhir+json; fhirVersion=4.0".to_owned(),
    )];
    let anonymous = send("GET", "/metadata", r4).await;
    assert_eq!(anonymous.json(), get.json());
    // The application's other routes are its own: a path it has no route for is its 404.
    let reply = send("GET", "/Observation/1", with_token(None)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // So is a TerminologyCapabilities it does not serve: the statement is none.
    let reply = send("GET", "/metadata?mode=terminology", with_token(None)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// An in-process application that serves its own statement: it is served, with the gateway's
/// security section.
#[tokio::test]
async fn an_in_process_tenants_own_statement_is_served_with_the_gateways_security() {
    let (client, bearer) = in_process(true).await;
    let reply = client
        .send("GET", "/metadata", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let statement = reply.json();
    assert_eq!(statement["software"]["name"], "the app");
    assert_eq!(
        statement["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        "http://gateway.test/oauth/token"
    );
}
