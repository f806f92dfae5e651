//! Version negotiation over real HTTP: one tenant with a DSTU2 and an STU3 server behind the
//! whole stack.

mod support;

use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::json;
use support::*;
use tower::ServiceBuilder;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::proxy::FhirProxy;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantRoutingLayer, Upstream};
use tower_fhir::tenant::TenantScopeLayer;
use tower_fhir::version::{FhirVersion, VersionNegotiationBuilder, VersionNegotiationLayer};

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

struct Setup {
    client: TestClient,
    dstu2: RecordingUpstream,
    stu3: RecordingUpstream,
    bearer: String,
}

async fn setup() -> Setup {
    setup_with(VersionNegotiationLayer::builder().supported([
        FhirVersion::Dstu2,
        FhirVersion::Stu3,
        FhirVersion::R4,
    ]))
    .await
}

async fn setup_with(versions: VersionNegotiationBuilder) -> Setup {
    let dstu2 = RecordingUpstream::start().await;
    let stu3 = RecordingUpstream::start().await;
    let mut patient = Answer::json(json!({"resourceType": "Patient", "id": "1"}));
    patient.headers = vec![(
        "content-type".into(),
        "application/json+fhir;charset=UTF-8".into(),
    )];
    dstu2.answer("/", patient);
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TENANT.parse().unwrap(),
        TenantRecord::new([
            Upstream::parse(&dstu2.base("/dstu2"), FhirVersion::Dstu2).unwrap(),
            Upstream::parse(&stu3.base("/stu3"), FhirVersion::Stu3).unwrap(),
        ])
        .unwrap(),
    );
    let stack = ServiceBuilder::new()
        .layer(versions.build().unwrap())
        .layer(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
                .build()
                .unwrap(),
        )
        .layer(TenantScopeLayer::builder().build().unwrap())
        .layer(TenantRoutingLayer::builder(directory).build().unwrap())
        .service(
            FhirProxy::builder("http://gateway.test")
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        );
    let client = TestClient::new(serve_tower(stack).await);
    let mut c = claims();
    c["scope"] = json!(TENANT);
    let bearer = format!("Bearer {}", mint(Algorithm::HS256, None, &c));
    Setup {
        client,
        dstu2,
        stu3,
        bearer,
    }
}

#[tokio::test]
async fn the_named_release_picks_the_tenants_server_for_it() {
    let s = setup().await;
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1",
            &[
                ("authorization", &s.bearer),
                ("accept", "application/fhir+json; fhirVersion=3.0"),
            ],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(s.stu3.last().target, "/stu3/Patient/1");
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=3.0"
    );
    assert!(s.dstu2.received().is_empty());
}

#[tokio::test]
async fn format_with_its_plus_unencoded_picks_the_release_it_names() {
    let s = setup().await;
    let uri = "/Patient/1?_format=application/fhir+json;fhirVersion=3.0";
    let headers = [("authorization", s.bearer.as_str())];
    let reply = s.client.send("GET", uri, &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        s.stu3.last().target,
        "/stu3/Patient/1?_format=application/fhir+json;fhirVersion=3.0",
        "forwarded as sent, to the release it names"
    );
    assert!(s.dstu2.received().is_empty());
    let twice = format!("{uri}&%5Fformat=xml");
    let reply = s.client.send("GET", &twice, &headers, "").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.stu3.received().len(), 1);
}

#[tokio::test]
async fn a_dstu2_server_gets_its_own_media_types_and_the_client_gets_its_own_back() {
    let s = setup().await;
    let body = r#"{"resourceType":"Patient","name":[{"family":"Chalmers"}]}"#;
    let reply = s
        .client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &s.bearer),
                ("accept", "application/fhir+json; fhirVersion=1.0"),
                ("content-type", "application/fhir+json; fhirVersion=1.0"),
            ],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let got = s.dstu2.last();
    assert_eq!(got.target, "/dstu2/Patient");
    assert_eq!(
        got.headers["accept"],
        "application/json+fhir; fhirVersion=1.0"
    );
    assert_eq!(
        got.headers["content-type"],
        "application/json+fhir; fhirVersion=1.0"
    );
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json;charset=UTF-8; fhirVersion=1.0"
    );

    // A client speaking DSTU2's own types gets them back.
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1",
            &[
                ("authorization", &s.bearer),
                ("accept", "application/json+fhir; fhirVersion=1.0"),
            ],
            "",
        )
        .await;
    assert_eq!(
        reply.headers["content-type"],
        "application/json+fhir;charset=UTF-8; fhirVersion=1.0"
    );
}

#[tokio::test]
async fn no_release_named_goes_to_the_tenants_default() {
    let s = setup().await;
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1",
            &[("authorization", &s.bearer), ("accept", "application/json")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(s.dstu2.last().target, "/dstu2/Patient/1");
}

/// A GET has no body: a `Content-Type` sent with one names no release (it would choose an
/// answer that caches do not key by), and does not disagree with `Accept`.
#[tokio::test]
async fn a_gets_content_type_names_no_release() {
    let s = setup().await;
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1",
            &[
                ("authorization", &s.bearer),
                ("content-type", "application/fhir+json; fhirVersion=3.0"),
            ],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        s.dstu2.last().target,
        "/dstu2/Patient/1",
        "the tenant's default"
    );
    assert!(s.stu3.received().is_empty());
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1",
            &[
                ("authorization", &s.bearer),
                ("accept", "application/fhir+json; fhirVersion=1.0"),
                ("content-type", "application/fhir+json; fhirVersion=5.0"),
            ],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.dstu2.received().len(), 2);
}

#[tokio::test]
async fn unservable_releases_and_disagreements_are_refused() {
    let s = setup().await;
    let cases = [
        // The gateway serves R4, the tenant does not: 406 from routing.
        (
            vec![("accept", "application/fhir+json; fhirVersion=4.0")],
            StatusCode::NOT_ACCEPTABLE,
        ),
        // Nobody serves R5: 406 from negotiation, before authentication.
        (
            vec![("accept", "application/fhir+json; fhirVersion=5.0")],
            StatusCode::NOT_ACCEPTABLE,
        ),
        (
            vec![("content-type", "application/fhir+json; fhirVersion=5.0")],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            vec![
                ("accept", "application/fhir+json; fhirVersion=1.0"),
                ("content-type", "application/fhir+json; fhirVersion=3.0"),
            ],
            StatusCode::BAD_REQUEST,
        ),
        // Two types for one body: the release routed by and the one the server reads could
        // differ.
        (
            vec![
                ("content-type", "application/fhir+json; fhirVersion=3.0"),
                ("content-type", "application/fhir+json; fhirVersion=1.0"),
            ],
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (headers, status) in cases {
        let mut all = vec![("authorization", s.bearer.as_str())];
        all.extend(headers.iter().copied());
        let reply = s.client.send("POST", "/Patient", &all, "{}").await;
        assert_eq!(reply.status, status, "{headers:?}");
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    }
    assert!(s.dstu2.received().is_empty() && s.stu3.received().is_empty());
}

#[tokio::test]
async fn versions_needs_no_token() {
    let s = setup().await;
    let reply = s
        .client
        .send("GET", "/$versions", &[("accept", "application/json")], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    // Chosen by `Accept` (and, with a token, by its tenant): not for a shared cache to give
    // another client.
    assert_eq!(reply.headers["vary"], "Accept, Authorization");
    let codes: Vec<String> = reply.json()["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "version")
        .map(|p| p["valueCode"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(codes, ["1.0", "3.0", "4.0"]);
}

/// `GET $versions` with the tenant's token.
async fn tenant_versions(s: &Setup) -> Reply {
    s.client
        .send("GET", "/$versions", &[("authorization", &s.bearer)], "")
        .await
}

/// `GET /Patient/1` with the tenant's token, naming no release.
async fn read_naming_no_release(s: &Setup) -> Reply {
    s.client
        .send("GET", "/Patient/1", &[("authorization", &s.bearer)], "")
        .await
}

#[tokio::test]
async fn versions_with_a_token_names_the_tenants_releases_and_its_default() {
    let s = setup_with(
        VersionNegotiationLayer::builder()
            .supported([FhirVersion::Dstu2, FhirVersion::Stu3, FhirVersion::R4])
            .reported_default(FhirVersion::Stu3)
            .tenant_versions(true),
    )
    .await;
    // The tenant's servers speak DSTU2 (its default: a request naming none goes there) and
    // STU3; not R4, which the gateway supports.
    let reply = tenant_versions(&s).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        parameters(&reply.json()),
        ["version=1.0", "version=3.0", "default=1.0"]
    );
    assert_eq!(
        reply.headers["content-type"],
        "application/json+fhir; fhirVersion=1.0"
    );
    // A HEAD is answered as the GET, without the body (it was proxied to the upstream).
    let reply = s
        .client
        .send("HEAD", "/$versions", &[("authorization", &s.bearer)], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.headers["content-type"],
        "application/json+fhir; fhirVersion=1.0"
    );
    assert!(reply.text().is_empty());
    assert!(s.dstu2.received().is_empty() && s.stu3.received().is_empty());
    // In XML for a client that asks for it, the tenant's answer too.
    let reply = s
        .client
        .send(
            "GET",
            "/$versions?_format=xml",
            &[("authorization", &s.bearer)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.headers["content-type"],
        "application/xml+fhir; fhirVersion=1.0"
    );
    assert!(
        reply
            .text()
            .contains("<parameter><name value=\"default\"/><valueCode value=\"1.0\"/></parameter>"),
        "{}",
        reply.text()
    );
    // Spelt with empty segments (the proxy would send it upstream as `$versions`): the same
    // answer, not the upstream's.
    for path in ["//$versions", "/$versions/"] {
        let spelt = s
            .client
            .send("GET", path, &[("authorization", &s.bearer)], "")
            .await;
        assert_eq!(spelt.status, StatusCode::OK, "{path}: {}", spelt.text());
        assert_eq!(
            parameters(&spelt.json()),
            ["version=1.0", "version=3.0", "default=1.0"],
            "{path}"
        );
    }
    let reply = s
        .client
        .send(
            "GET",
            "/$versions",
            &[
                ("authorization", &s.bearer),
                ("accept", "application/fhir+json; fhirVersion=3.0"),
            ],
            "",
        )
        .await;
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=3.0"
    );
    // What it says is so: a request naming no release reaches the DSTU2 server.
    let reply = read_naming_no_release(&s).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(s.dstu2.received().len(), 1);
    assert!(s.stu3.received().is_empty());
    // A bad token gets 401, as for any request: nothing about any tenant.
    let reply = s
        .client
        .send("GET", "/$versions", &[("authorization", "Bearer nope")], "")
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Without a token: every release the gateway supports, and the default it was given.
    let reply = s.client.send("GET", "/$versions", &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        parameters(&reply.json()),
        ["version=1.0", "version=3.0", "version=4.0", "default=3.0"]
    );
    // None of these reached a FHIR server.
    assert_eq!(s.dstu2.received().len(), 1);
    assert!(s.stu3.received().is_empty());
}

/// With a `default_version` on the version layer, a request naming no release is sent in
/// that release, not to the tenant's first server: the tenant's `$versions` says so.
#[tokio::test]
async fn a_tenants_versions_default_is_the_layers_default_where_it_has_one() {
    let s = setup_with(
        VersionNegotiationLayer::builder()
            .supported([FhirVersion::Dstu2, FhirVersion::Stu3, FhirVersion::R4])
            .default_version(FhirVersion::Stu3)
            .tenant_versions(true),
    )
    .await;
    let reply = read_naming_no_release(&s).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.stu3.received().len(), 1);
    assert!(s.dstu2.received().is_empty());
    // `Accept` chose the server (a request naming DSTU2 would get another's answer), the
    // token the tenant: a cache keys the answer by both.
    let mut vary: Vec<_> = reply
        .headers
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(str::trim)
        .collect();
    vary.sort_unstable();
    assert_eq!(vary, ["Accept", "Authorization"]);
    let reply = tenant_versions(&s).await;
    assert_eq!(
        parameters(&reply.json()),
        ["version=1.0", "version=3.0", "default=3.0"]
    );
}

/// A tenant whose first server speaks a release the layer does not support: a request naming
/// none still goes there, so `$versions` names it as the default, though not among the
/// releases a client may name.
#[tokio::test]
async fn a_tenants_versions_default_is_its_first_servers_release_even_one_not_supported() {
    let s = setup_with(
        VersionNegotiationLayer::builder()
            .supported([FhirVersion::Stu3, FhirVersion::R4])
            .tenant_versions(true),
    )
    .await;
    let reply = tenant_versions(&s).await;
    assert_eq!(parameters(&reply.json()), ["version=3.0", "default=1.0"]);
    let reply = read_naming_no_release(&s).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.dstu2.received().len(), 1);
}

/// `GET` with the tenant's token and `headers`, of `uri`.
async fn read_with(s: &Setup, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("authorization", s.bearer.as_str())];
    all.extend_from_slice(headers);
    s.client.send("GET", uri, &all, "").await
}

/// HAPI's generic client adds `_format=json` to every request: `_format` chooses the format,
/// and, naming no release, leaves the release to `Accept`.
#[tokio::test]
async fn a_format_naming_no_release_leaves_the_release_to_accept() {
    let s = setup().await;
    let stu3 = "application/fhir+json; fhirVersion=3.0";
    let reply = read_with(&s, "/Patient/1?_format=json", &[("accept", stu3)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        s.dstu2.received().is_empty(),
        "not the tenant's default server"
    );
    let got = s.stu3.last();
    assert_eq!(got.target, "/stu3/Patient/1?_format=json");
    assert_eq!(got.headers["accept"], stu3, "forwarded as sent");
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=3.0"
    );
    // `_format=xml` too: the format is XML, the release still Accept's.
    let reply = read_with(&s, "/Patient/1?_format=xml", &[("accept", stu3)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.stu3.received().len(), 2);
    // A `_format` naming a release overrides the one Accept names (FHIR: `_format` overrides
    // `Accept`).
    let uri = "/Patient/1?_format=application/fhir%2Bjson;fhirVersion=1.0";
    let reply = read_with(&s, uri, &[("accept", stu3)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.dstu2.received().len(), 1);
    // A release the gateway does not serve, named in Accept beside `_format=json`: 406.
    let r5 = [("accept", "application/fhir+json; fhirVersion=5.0")];
    let reply = read_with(&s, "/Patient/1?_format=json", &r5).await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    assert_eq!(s.stu3.received().len() + s.dstu2.received().len(), 3);
}

/// Every `Accept` value reaches a DSTU2 server, each in DSTU2's media types, in order.
#[tokio::test]
async fn a_dstu2_server_gets_every_accept_value() {
    let s = setup().await;
    let reply = read_with(
        &s,
        "/Patient/1",
        &[
            ("accept", "application/fhir+json; fhirVersion=1.0"),
            ("accept", "application/fhir+xml;q=0.5"),
            ("accept", "text/plain;q=0.1"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let got = s.dstu2.last();
    let accept: Vec<&str> = got
        .headers
        .get_all("accept")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        accept,
        [
            "application/json+fhir; fhirVersion=1.0",
            "application/xml+fhir;q=0.5",
            "text/plain;q=0.1"
        ]
    );
}

/// A client that accepts several releases is served in the first of them, in its order of
/// preference, that its tenant has a server for.
#[tokio::test]
async fn the_first_accepted_release_the_tenant_serves_is_chosen() {
    let s = setup().await;
    // R4 is supported by the gateway, not served by this tenant; STU3 is.
    let r4_then_stu3 =
        "application/fhir+json; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0; q=0.5";
    let reply = read_with(&s, "/Patient/1", &[("accept", r4_then_stu3)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.stu3.last().target, "/stu3/Patient/1");
    assert_eq!(s.stu3.last().headers["accept"], r4_then_stu3);
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=3.0"
    );
    // In separate values, and with an unknown release first.
    let reply = read_with(
        &s,
        "/Patient/1",
        &[
            ("accept", "application/fhir+json; fhirVersion=9.9"),
            ("accept", "application/fhir+json; fhirVersion=4.0; q=0.9"),
            ("accept", "application/json+fhir; fhirVersion=1.0; q=0.8"),
            ("accept", "application/fhir+json; fhirVersion=3.0; q=0.7"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.dstu2.received().len(), 1, "DSTU2 before STU3");
    // A range naming no release, after: any release, so the tenant's default server.
    let r4_or_any = "application/fhir+json; fhirVersion=4.0, application/fhir+json; q=0.1";
    let reply = read_with(&s, "/Patient/1", &[("accept", r4_or_any)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.dstu2.received().len(), 2);
    // A body in a release the client accepts, if not first: that release.
    let reply = s
        .client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &s.bearer),
                ("accept", r4_then_stu3),
                ("content-type", "application/fhir+json; fhirVersion=3.0"),
            ],
            "{}",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(s.stu3.last().target, "/stu3/Patient");
    // Nothing the tenant serves among them: 406, as before.
    let r4 = [("accept", "application/fhir+json; fhirVersion=4.0")];
    let reply = read_with(&s, "/Patient/1", &r4).await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(s.stu3.received().len() + s.dstu2.received().len(), 4);
}

/// A client that prefers XML gets the gateway's own refusals in XML, in the release it asked
/// for; what an upstream answered passes as it was written.
#[tokio::test]
async fn the_gateways_refusals_go_in_xml_to_a_client_that_prefers_xml() {
    let s = setup().await;
    let xml = [("accept", "application/fhir+xml; fhirVersion=3.0")];
    // No token: the bearer layer's 401, its challenge kept.
    let reply = s.client.send("GET", "/Patient/1", &xml, "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+xml; fhirVersion=3.0"
    );
    assert!(reply.headers.contains_key("www-authenticate"));
    let body = reply.text();
    assert!(
        body.starts_with(r#"<OperationOutcome xmlns="http://hl7.org/fhir"><issue><severity value="error"/><code value="login"/>"#),
        "{body}"
    );
    // A token for a tenant the directory does not know: the routing layer's refusal, and
    // `_format` asks as `Accept` does.
    let mut c = claims();
    c["scope"] = json!("9b2e1c3d-0000-4000-8000-00000000000b");
    let stranger = format!("Bearer {}", mint(Algorithm::HS256, None, &c));
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1?_format=xml",
            &[("authorization", stranger.as_str())],
            "",
        )
        .await;
    assert!(reply.status.is_client_error(), "{}", reply.status);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+xml"),
        "{:?}",
        reply.headers
    );
    assert!(
        reply.text().starts_with("<OperationOutcome "),
        "{}",
        reply.text()
    );
    // The same refusal in JSON to a client that prefers JSON.
    let reply = s
        .client
        .send(
            "GET",
            "/Patient/1",
            &[("authorization", stranger.as_str())],
            "",
        )
        .await;
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    // An upstream's own answer, JSON, is relayed as written.
    let reply = read_with(&s, "/Patient/1", &xml).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["resourceType"], "Patient");
}
