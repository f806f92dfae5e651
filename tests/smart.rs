//! SMART scopes enforced by the one-call gateway over real HTTP: every refusal happens before
//! the upstream hears of the request, and what is allowed reaches it unchanged. (A
//! `BodyTimeoutLayer` of one second stands in front, as the gateway binary has one.)

mod support;

use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use support::*;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::gateway::Gateway;
use tower_fhir::ops::BodyTimeoutLayer;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::smart::{SmartScopeBuilder, SmartScopeLayer, MAX_READ_CHECKS, NARROWED_CLAIM};
use tower_fhir::tenant::TenantScopeLayer;
use tower_fhir::token::{
    ClientStore, InMemoryClientStore, NewClient, SecretHashing, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "smart-client-secret-0123456789";

struct Setup {
    client: TestClient,
    upstream: RecordingUpstream,
}

/// How long a request body may pause here.
const BODY_PAUSE: Duration = Duration::from_secs(1);

async fn setup(require_smart_scopes: bool) -> Setup {
    setup_with(
        SmartScopeLayer::builder().require_smart_scopes(require_smart_scopes),
        BODY_PAUSE,
        !require_smart_scopes,
    )
    .await
}

/// The gateway with these SMART settings, its request bodies allowed to pause `pause`, and
/// its token endpoint letting clients without resource scopes ask for some when `narrowing`
/// (as the gateway binary does while `require_smart_scopes` is off).
async fn setup_with(smart: SmartScopeBuilder, pause: Duration, narrowing: bool) -> Setup {
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "123"})),
    );
    let directory = InMemoryDirectory::new();
    directory.upsert(
        TENANT.parse().unwrap(),
        TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
            .unwrap(),
    );
    let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
    store
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(TENANT.parse().unwrap())
                .scope("system/Patient.rs")
                .scope("system/Observation.rs?category=laboratory"),
        )
        .await
        .unwrap();
    // Registered without scopes: tenant-wide tokens, unless it asks for less.
    store
        .register(
            NewClient::new("open")
                .secret(SECRET)
                .tenant(TENANT.parse().unwrap()),
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let endpoint = TokenEndpoint::builder()
        .issuer(&base)
        .audience("tower-fhir")
        .store(store)
        .scopeless_clients_may_narrow(narrowing)
        .build()
        .unwrap();
    let gateway = Gateway::builder(&base)
        .directory(directory)
        .token_endpoint(endpoint)
        // A second issuer, whose tokens the tests mint with any claims.
        .auth(
            BearerAuthLayer::builder()
                .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
                .issuer("https://auth.test")
                .audience_for_issuer("https://auth.test", "tower-fhir"),
        )
        // The tests' issuer mints tokens naming any tenant.
        .tenant(TenantScopeLayer::builder().issuer_any_tenant("https://auth.test"))
        .smart_scopes(smart)
        .build()
        .unwrap();
    let service = tower::Layer::layer(&BodyTimeoutLayer::new(pause), gateway);
    Setup {
        client: TestClient::new(serve_tower_on(listener, service)),
        upstream,
    }
}

/// A token of the second issuer with these extra claims.
fn minted(extra: Value) -> String {
    let mut claims = claims();
    for (name, value) in extra.as_object().unwrap() {
        claims[name] = value.clone();
    }
    mint(Algorithm::HS256, None, &claims)
}

async fn get(client: &TestClient, token: &str, path: &str) -> Reply {
    client.get_bearer(path, token).await
}

async fn send(
    client: &TestClient,
    token: &str,
    method: &str,
    path: &str,
    ty: &str,
    body: &str,
) -> Reply {
    client
        .send(
            method,
            path,
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", ty),
            ],
            body,
        )
        .await
}

/// A Bundle `POST`ed to the base (a batch or transaction).
async fn post_bundle(client: &TestClient, token: &str, bundle: &str) -> Reply {
    send(client, token, "POST", "/", "application/fhir+json", bundle).await
}

#[track_caller]
fn assert_refused(reply: &Reply, sufficient: &str) {
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(
        reply.headers["www-authenticate"],
        format!("Bearer error=\"insufficient_scope\", scope=\"{sufficient}\"").as_str()
    );
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    assert_eq!(reply.json()["issue"][0]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_scopes_are_enforced_before_the_upstream() {
    let Setup { client, upstream } = setup(false).await;
    let reply = client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}&scope={TENANT}%20system/Patient.rs%20system/Observation.rs%3Fcategory%3Dlaboratory"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();

    assert_eq!(
        get(&client, &token, "/Patient/123").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &token, "/Patient?name=x").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(
            &client,
            &token,
            "/Observation?category=laboratory&patient=123"
        )
        .await
        .status,
        StatusCode::OK
    );
    let seen = upstream.received().len();
    assert_eq!(seen, 3);

    // A version of an Observation: the granular scope cannot vouch for an old version.
    assert_refused(
        &get(&client, &token, "/Observation/1/_history/1").await,
        "system/Observation.r",
    );
    assert_refused(
        &get(&client, &token, "/Observation?category=vital-signs").await,
        "system/Observation.s",
    );
    assert_refused(
        &send(
            &client,
            &token,
            "PUT",
            "/Patient/123",
            "application/fhir+json",
            "{}",
        )
        .await,
        "system/Patient.u",
    );
    assert_refused(
        &send(
            &client,
            &token,
            "DELETE",
            "/Patient/123",
            "application/fhir+json",
            "",
        )
        .await,
        "system/Patient.d",
    );
    assert_refused(
        &get(
            &client,
            &token,
            "/Patient?name=x&_revinclude=Provenance:target",
        )
        .await,
        "system/Provenance.r",
    );
    assert_refused(&get(&client, &token, "/_history").await, "system/*.s");
    assert_eq!(
        upstream.received().len(),
        seen,
        "no refused request reached the upstream"
    );
}

/// Asks the token endpoint for `scope`; the reply's status, `scope` or `error`, and token.
async fn ask(client: &TestClient, scope: &str) -> (StatusCode, String, Option<String>) {
    ask_as(client, "app", scope).await
}

/// [`ask`], as the client `id`.
async fn ask_as(
    client: &TestClient,
    id: &str,
    scope: &str,
) -> (StatusCode, String, Option<String>) {
    let scope = scope
        .replace(' ', "%20")
        .replace('?', "%3F")
        .replace('=', "%3D");
    let reply = client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id={id}&client_secret={SECRET}&scope={scope}"
            ),
        )
        .await;
    let json = reply.json();
    let said = json["scope"]
        .as_str()
        .or(json["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    let token = json["access_token"].as_str().map(str::to_owned);
    (reply.status, said, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_at_issuance_are_what_the_client_may_have() {
    let Setup { client, .. } = setup(false).await;
    // Only the tenant: every registered scope, enforced.
    let (status, scope, token) = ask(&client, TENANT).await;
    assert_eq!(status, StatusCode::OK, "{scope}");
    assert_eq!(
        scope,
        format!("{TENANT} system/Patient.rs system/Observation.rs?category=laboratory")
    );
    let token = token.unwrap();
    assert_eq!(
        get(&client, &token, "/Patient/1").await.status,
        StatusCode::OK
    );
    assert_refused(
        &get(&client, &token, "/Encounter/1").await,
        "system/Encounter.r",
    );
    // Narrower than registered: granted as asked, and no more.
    let (status, scope, token) = ask(&client, &format!("{TENANT} system/Patient.r")).await;
    assert_eq!(status, StatusCode::OK, "{scope}");
    assert_eq!(scope, format!("{TENANT} system/Patient.r"));
    let token = token.unwrap();
    assert_eq!(
        get(&client, &token, "/Patient/1").await.status,
        StatusCode::OK
    );
    assert_refused(
        &get(&client, &token, "/Patient?name=x").await,
        "system/Patient.s",
    );
    // What it may not have beside what it may: left out.
    let (status, scope, _) = ask(
        &client,
        &format!("{TENANT} system/Patient.rs system/Patient.cud system/Observation.rs"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{scope}");
    assert_eq!(scope, format!("{TENANT} system/Patient.rs"));
    // Only what it may not have: invalid_scope.
    for wider in ["system/Encounter.rs", "system/*.rs", "user/Patient.r"] {
        let (status, error, _) = ask(&client, &format!("{TENANT} {wider}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{wider}");
        assert_eq!(error, "invalid_scope", "{wider}");
    }
    // A character RFC 6749 does not allow in a scope (a tab, which a resource server that
    // splits on any white space reads as a separator): invalid_scope, nothing issued.
    let (status, error, token) = ask(
        &client,
        &format!("{TENANT} system/Observation.rs?category=laboratory%26x=%09system/*.cruds"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error, "invalid_scope");
    assert!(token.is_none());
}

/// A client registered without resource scopes gets tenant-wide tokens, and any resource
/// scopes it asks for instead (less than tenant-wide), enforced as registered ones are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registered_without_scopes_may_ask_for_less() {
    let Setup { client, upstream } = setup(false).await;
    let (status, scope, token) = ask_as(&client, "open", TENANT).await;
    assert_eq!((status, scope.as_str()), (StatusCode::OK, TENANT));
    let token = token.unwrap();
    for path in ["/Patient/1", "/Encounter/1"] {
        assert_eq!(get(&client, &token, path).await.status, StatusCode::OK);
    }
    let (status, scope, token) = ask_as(
        &client,
        "open",
        &format!("{TENANT} system/Patient.r launch openid"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{scope}");
    assert_eq!(scope, format!("{TENANT} system/Patient.r"));
    let token = token.unwrap();
    // Marked as narrowed, which a registered client's tokens are not.
    assert_eq!(payload(&token)[NARROWED_CLAIM], true);
    let (_, _, registered) = ask(&client, TENANT).await;
    assert!(payload(&registered.unwrap()).get(NARROWED_CLAIM).is_none());
    assert_eq!(
        get(&client, &token, "/Patient/1").await.status,
        StatusCode::OK
    );
    let seen = upstream.received().len();
    assert_refused(
        &get(&client, &token, "/Encounter/1").await,
        "system/Encounter.r",
    );
    assert_eq!(upstream.received().len(), seen);
    // Only scopes that are not resource scopes: nothing it may have but the tenant.
    let (status, error, _) = ask_as(&client, "open", &format!("{TENANT} launch")).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_scope")
    );
}

/// Where tokens without resource scopes are refused, a client registered without any cannot
/// give itself some: its tokens stay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_scopes_cannot_give_itself_some_where_they_are_required() {
    let Setup { client, upstream } = setup(true).await;
    let (status, scope, token) = ask_as(&client, "open", TENANT).await;
    assert_eq!((status, scope.as_str()), (StatusCode::OK, TENANT));
    let refused = get(&client, &token.unwrap(), "/Patient/1").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    // (`openid`, not registered for it either.)
    for asked in [
        "system/*.cruds",
        "system/Patient.r",
        "patient/*.rs",
        "openid system/*.cruds",
    ] {
        let (status, error, token) = ask_as(&client, "open", &format!("{TENANT} {asked}")).await;
        assert_eq!(
            (status, error.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_scope"),
            "{asked}"
        );
        assert!(token.is_none());
    }
    assert!(upstream.received().is_empty());
}

/// A token marked narrowed (issued by a replica, or before a restart, or by another gateway
/// trusted here, with `require_smart_scopes` off) is refused where SMART scopes are required,
/// whatever its scopes; accepted, and held to them, where they are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_token_is_refused_where_scopes_are_required() {
    let scoped = |narrowed: Value| {
        minted(json!({"scope": format!("{TENANT} system/*.cruds"), NARROWED_CLAIM: narrowed}))
    };
    let strict = setup(true).await;
    let lenient = setup(false).await;
    for marked in [json!(true), json!("yes"), json!(1)] {
        let refused = get(&strict.client, &scoped(marked.clone()), "/Patient/1").await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{marked}");
        assert!(
            refused.text().contains(NARROWED_CLAIM),
            "{}",
            refused.text()
        );
        assert!(refused.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
        assert_eq!(
            get(&lenient.client, &scoped(marked), "/Patient/1")
                .await
                .status,
            StatusCode::OK
        );
    }
    assert!(strict.upstream.received().is_empty());
    // Not marked (or marked false): its scopes decide.
    for unmarked in [json!(false), Value::Null] {
        let token = if unmarked.is_null() {
            minted(json!({"scope": format!("{TENANT} system/*.cruds")}))
        } else {
            scoped(unmarked)
        };
        assert_eq!(
            get(&strict.client, &token, "/Patient/1").await.status,
            StatusCode::OK
        );
    }
}

/// A read that only granular scopes could allow is checked with a search for each, at most
/// `MAX_READ_CHECKS`: a token with more such scopes for the type is refused the read before
/// any reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_takes_at_most_max_read_checks_searches() {
    let Setup { client, upstream } = setup(false).await;
    let granular = |count: usize| {
        let scopes: Vec<String> = (0..count)
            .map(|i| format!("system/Observation.rs?category=c{i}"))
            .collect();
        minted(json!({"scope": format!("{TENANT} {}", scopes.join(" "))}))
    };
    let refused = get(&client, &granular(MAX_READ_CHECKS + 1), "/Observation/1").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains(&format!("at most {MAX_READ_CHECKS}")),
        "{}",
        refused.text()
    );
    assert!(upstream.received().is_empty());
    // As many as allowed: each searched for, one after another, none finding it.
    upstream.answer(
        "/fhir/Observation?_id=1&",
        Answer::json(json!({"resourceType": "Bundle", "type": "searchset", "total": 0})),
    );
    let refused = get(&client, &granular(MAX_READ_CHECKS), "/Observation/1").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    let searches = upstream.received();
    assert_eq!(searches.len(), MAX_READ_CHECKS);
    assert!(searches
        .iter()
        .all(|search| search.target.starts_with("/fhir/Observation?_id=1&")));
}

/// A create or update the token may make but whose result it may not read (no `r` on the
/// type, or only a granular one) is forwarded as sent, and its answer's resource replaced by an
/// OperationOutcome (`information`, `suppressed`), its status and `ETag` kept; a token
/// that reads the type gets the resource, and a refusal from the server is shown as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_resource_the_token_may_not_read_is_not_shown() {
    let Setup { client, upstream } = setup(false).await;
    let mut created = Answer::json(json!({"resourceType": "Patient", "id": "9",
        "name": [{"family": "Smith"}], "birthDate": "1970-01-01"}));
    created.status = StatusCode::CREATED;
    created.headers.push((
        "location".into(),
        format!("{}/Patient/9/_history/1", upstream.base("/fhir")),
    ));
    created.headers.push(("etag".into(), "W/\"1\"".into()));
    upstream.answer("/fhir/Patient", created);
    let mut refusal = Answer::json(json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad name"}]}));
    refusal.status = StatusCode::UNPROCESSABLE_ENTITY;
    upstream.answer("/fhir/Observation", refusal);
    let body = r#"{"resourceType": "Patient", "active": true}"#;
    let patch = r#"[{"op": "replace", "path": "/active", "value": true}]"#;
    for (scope, method, path, ty, sent) in [
        (
            "system/Patient.u",
            "PUT",
            "/Patient/9",
            "application/fhir+json",
            body,
        ),
        (
            "system/Patient.c",
            "POST",
            "/Patient",
            "application/fhir+json",
            body,
        ),
        (
            "system/Patient.u system/Patient.r?identifier=x",
            "PUT",
            "/Patient/9",
            "application/fhir+json",
            body,
        ),
    ] {
        let token = minted(json!({"scope": format!("{TENANT} {scope}")}));
        let reply = send(&client, &token, method, path, ty, sent).await;
        let said = format!("{scope} {method}: {}", reply.text());
        assert_eq!(reply.status, StatusCode::CREATED, "{said}");
        let outcome = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{said}");
        assert_eq!(outcome["issue"][0]["severity"], "information", "{said}");
        assert_eq!(outcome["issue"][0]["code"], "suppressed", "{said}");
        assert!(!reply.text().contains("Smith"), "{said}");
        assert_eq!(reply.headers["etag"], "W/\"1\"");
        // (Rewritten to the gateway's base, as any answer's.)
        assert_eq!(
            reply.headers["location"],
            format!("http://{}/Patient/9/_history/1", client.addr()).as_str(),
            "{said}"
        );
        assert!(reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json"));
        // Forwarded as sent.
        let received = upstream.last();
        assert_eq!(received.method, method);
        assert_eq!(received.body, sent.as_bytes());
    }
    // A patch is applied to the resource as stored (its answer, or its failure, a `copy` into
    // a field that does not take the value, a failing `test`, shows it): refused without `r`,
    // alone or in a Bundle, before the upstream hears of it.
    let seen = upstream.received().len();
    for scope in [
        "system/Patient.u",
        "system/Patient.u system/Patient.r?identifier=x",
    ] {
        let token = minted(json!({"scope": format!("{TENANT} {scope}")}));
        let copy = r#"[{"op": "copy", "from": "/name/0/family", "path": "/birthDate"}]"#;
        let reply = send(
            &client,
            &token,
            "PATCH",
            "/Patient/9",
            "application/json-patch+json",
            copy,
        )
        .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        assert!(
            reply.text().contains("A patch of Patient resources"),
            "{}",
            reply.text()
        );
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "PATCH", "url": "Patient/9"},
             "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                          "data": "W10="}}]});
        let reply = send(
            &client,
            &token,
            "POST",
            "/",
            "application/fhir+json",
            &bundle.to_string(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        assert!(
            reply.text().contains("Entry 0 of the Bundle"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(upstream.received().len(), seen);
    // A token that reads what it writes gets it, and may patch.
    let token = minted(json!({"scope": format!("{TENANT} system/Patient.ru")}));
    let reply = send(
        &client,
        &token,
        "PATCH",
        "/Patient/9",
        "application/json-patch+json",
        patch,
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(upstream.last().body, patch.as_bytes());
    let reply = send(
        &client,
        &token,
        "PUT",
        "/Patient/9",
        "application/fhir+json",
        body,
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json()["name"][0]["family"], "Smith");
    // A refusal is no resource: shown as the server wrote it.
    let token = minted(json!({"scope": format!("{TENANT} system/Observation.c")}));
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation",
        "application/fhir+json",
        r#"{"resourceType": "Observation"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.json()["issue"][0]["diagnostics"], "bad name");
}

/// An `access_token` in a posted form (a `_search`'s, an operation's parameters) would reach
/// the FHIR server and its logs, as one in the query string would: `400` (`invalid_request`),
/// whatever the token's scopes, before the upstream hears of it; a form without one goes as
/// sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_in_a_posted_form_is_refused() {
    let Setup { client, upstream } = setup(false).await;
    upstream.answer(
        "/fhir/Patient/_search",
        Answer::json(json!({"resourceType": "Bundle", "type": "searchset", "total": 0})),
    );
    let tenant_wide = minted(json!({"scope": TENANT}));
    let scoped = minted(json!({"scope": format!("{TENANT} system/Patient.rs")}));
    let form = "application/x-www-form-urlencoded";
    for token in [&tenant_wide, &scoped] {
        for body in [
            "name=x&access_token=eyJabc",
            "access%5Ftoken=eyJabc",
            "name=x;access_token=eyJabc",
        ] {
            let reply = send(&client, token, "POST", "/Patient/_search", form, body).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{body}: {}",
                reply.text()
            );
            assert_eq!(
                reply.headers["www-authenticate"],
                "Bearer error=\"invalid_request\""
            );
            assert!(reply.text().contains("form body"), "{}", reply.text());
        }
        assert!(upstream.received().is_empty());
    }
    // A form with a method FHIR never sends one with, which some servers read as parameters
    // all the same (a `_cascade=delete`): refused, whatever the token; so is a tenant-wide
    // token's form in a charset this layer does not read as the server would.
    let deleter = minted(json!({"scope": format!("{TENANT} system/Patient.d")}));
    for (token, method) in [
        (&tenant_wide, "DELETE"),
        (&deleter, "DELETE"),
        (&tenant_wide, "PUT"),
    ] {
        let reply = send(
            &client,
            token,
            method,
            "/Patient/1",
            form,
            "_cascade=delete",
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{method}: {}",
            reply.text()
        );
    }
    let latin = "application/x-www-form-urlencoded; charset=ISO-8859-1";
    let reply = send(
        &client,
        &tenant_wide,
        "POST",
        "/Patient/_search",
        latin,
        "name=x",
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );
    assert!(upstream.received().is_empty());
    // Without one: forwarded byte for byte, tenant-wide or scoped.
    for token in [&tenant_wide, &scoped] {
        let body = "name=x&_count=10";
        let reply = send(&client, token, "POST", "/Patient/_search", form, body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(upstream.last().body, body.as_bytes());
    }
}

/// The claims of a token, unverified.
fn payload(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The one-call gateway refuses a token endpoint that lets scopeless clients narrow beside a
/// SMART layer that requires resource scopes.
#[test]
fn narrowing_beside_required_scopes_is_refused() {
    let build = |narrowing: bool, require: bool| {
        let endpoint = TokenEndpoint::builder()
            .issuer("http://gw.test")
            .audience("tower-fhir")
            .store(InMemoryClientStore::new())
            .scopeless_clients_may_narrow(narrowing)
            .build()
            .unwrap();
        Gateway::builder("http://gw.test")
            .directory(InMemoryDirectory::new())
            .token_endpoint(endpoint)
            .smart_scopes(SmartScopeLayer::builder().require_smart_scopes(require))
            .build()
            .map(|_| ())
    };
    let refused = build(true, true).unwrap_err();
    assert!(
        refused.to_string().contains("require_smart_scopes"),
        "{refused}"
    );
    for (narrowing, require) in [(true, false), (false, true), (false, false)] {
        build(narrowing, require).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granular_reads_are_checked_with_a_search_first() {
    let Setup { client, upstream } = setup(false).await;
    let (status, _, token) = ask(
        &client,
        &format!("{TENANT} system/Observation.rs?category=laboratory"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let token = token.unwrap();
    let bundle = |total: u64| {
        Answer::json(json!({"resourceType": "Bundle", "type": "searchset", "total": total}))
    };
    upstream.answer("/fhir/Observation?_id=lab-1&", bundle(1));
    upstream.answer("/fhir/Observation?_id=vital-2&", bundle(0));
    // A server that ignored the category (lenient handling) and says so in its `self` link.
    upstream.answer(
        "/fhir/Observation?_id=lenient&",
        Answer::json(
            json!({"resourceType": "Bundle", "type": "searchset", "total": 1,
            "link": [{"relation": "self",
                      "url": "http://fhir.example/Observation?_id=lenient&_summary=count"}]}),
        ),
    );
    // The same, with a name in its link that FHIR could not define: still read as names.
    upstream.answer(
        "/fhir/Observation?_id=odd&",
        Answer::json(
            json!({"resourceType": "Bundle", "type": "searchset", "total": 1,
            "link": [{"relation": "self",
                      "url": "http://fhir.example/Observation?_id=odd&?x=1&_summary=count"}]}),
        ),
    );
    // A self link that does not echo the search (no `_id`) tells nothing either way.
    upstream.answer(
        "/fhir/Observation?_id=paged&",
        Answer::json(
            json!({"resourceType": "Bundle", "type": "searchset", "total": 1,
            "link": [{"relation": "self", "url": "http://fhir.example/?_getpages=abc"}]}),
        ),
    );
    // One that used both, naming them in another order and encoding.
    upstream.answer(
        "/fhir/Observation?_id=strict&",
        Answer::json(json!({"resourceType": "Bundle", "type": "searchset", "total": 1,
            "link": [{"relation": "self",
                      "url": "http://fhir.example/Observation?_summary=count&%63ategory=laboratory&_id=strict"}]})),
    );
    upstream.answer(
        "/fhir/Observation?_id=broken&",
        Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..bundle(0)
        },
    );
    upstream.answer(
        "/fhir/Observation/lab-1",
        Answer::json(json!({"resourceType": "Observation", "id": "lab-1"})),
    );

    // A laboratory Observation: the search finds it, then the read goes as the client sent it.
    let reply = get(&client, &token, "/Observation/lab-1").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["id"], "lab-1");
    let received = upstream.received();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            "/fhir/Observation?_id=lab-1&category=laboratory&_summary=count",
            "/fhir/Observation/lab-1"
        ]
    );
    assert_eq!(received[0].method, "GET");
    assert!(received[0].body.is_empty());
    // The server is asked to fail on a parameter it does not support, not to ignore it.
    assert_eq!(received[0].headers["prefer"], "handling=strict");

    // The search's `self` link shows the category was not used: it cannot vouch, 502.
    for id in ["lenient", "odd"] {
        let reply = get(&client, &token, &format!("/Observation/{id}")).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_GATEWAY,
            "{id}: {}",
            reply.text()
        );
        assert!(upstream.last().target.contains("_summary=count"));
    }
    for id in ["strict", "paged"] {
        let reply = get(&client, &token, &format!("/Observation/{id}")).await;
        assert_eq!(
            upstream.last().target,
            format!("/fhir/Observation/{id}"),
            "{}",
            reply.text()
        );
    }

    // Another category: the search finds nothing, the read is refused and never sent.
    assert_refused(
        &get(&client, &token, "/Observation/vital-2").await,
        "system/Observation.r",
    );
    assert_eq!(
        upstream.last().target,
        "/fhir/Observation?_id=vital-2&category=laboratory&_summary=count"
    );
    // The upstream cannot say: 502, and the read not sent.
    let reply = get(&client, &token, "/Observation/broken").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    assert!(upstream.last().target.contains("_summary=count"));
    // Another type is not probed at all.
    let seen = upstream.received().len();
    assert_refused(
        &get(&client, &token, "/Encounter/lab-1").await,
        "system/Encounter.r",
    );
    assert_eq!(upstream.received().len(), seen);
    // Nor a read whose parameters ask for more than the resource (other types included,
    // contained ones): the probe would vouch for the resource, not for them. Refused, nothing
    // sent; a read's own parameters that shape the answer are probed as a plain read.
    for query in [
        "_include=*",
        "_revinclude=*",
        "_INCLUDE=Observation:subject",
        "_contained=true&_containedType=container",
        "_has:Observation:has-member:category=vital-signs",
    ] {
        let reply = get(&client, &token, &format!("/Observation/lab-1?{query}")).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{query}: {}",
            reply.text()
        );
        assert_eq!(upstream.received().len(), seen, "{query}");
    }
    let reply = get(
        &client,
        &token,
        "/Observation/lab-1?_elements=status&_format=json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        upstream.last().target,
        "/fhir/Observation/lab-1?_elements=status&_format=json"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_scp_arrays_and_patient_scopes() {
    let Setup { client, upstream } = setup(false).await;
    let entra = minted(json!({"scp": ["system/Patient.r", "system/Observation.s"]}));
    assert_eq!(
        get(&client, &entra, "/Patient/9").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &entra, "/Observation?code=x").await.status,
        StatusCode::OK
    );
    assert_refused(
        &get(&client, &entra, "/Patient?name=x").await,
        "system/Patient.s",
    );

    let patient = minted(json!({"scope": format!("{TENANT} patient/*.rs"), "patient": "123"}));
    assert_eq!(
        get(&client, &patient, "/Patient/123").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &patient, "/Observation?patient=123")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &patient, "/Patient/123/Observation")
            .await
            .status,
        StatusCode::OK
    );
    let before = upstream.received().len();
    for other in [
        "/Patient/124",
        "/Observation?patient=124",
        "/Observation",
        "/Observation/5",
    ] {
        let reply = get(&client, &patient, other).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{other}");
    }
    // A hint smuggled in the query does not widen it: the patient is the token's.
    assert_eq!(
        get(&client, &patient, "/Observation?patient=123&patient=124")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // Nor do includes that may bring in other patients, or filters on other types' data.
    for other in [
        "/Observation?patient=123&_include=Observation:performer:Patient",
        "/Observation?patient=123&_include=Observation:patient&_include:iterate=Patient:link:Patient",
        "/Patient?_id=123&_revinclude=Patient:link",
        "/Patient?_id=123&_has:Observation:patient:code=x",
        "/Observation?patient=123&subject:Patient.name=x",
    ] {
        let reply = get(&client, &patient, other).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{other}");
    }
    assert_eq!(upstream.received().len(), before);
    assert_eq!(
        get(
            &client,
            &patient,
            "/Observation?patient=123&_include=Observation:patient"
        )
        .await
        .status,
        StatusCode::OK
    );
    // Which patients have an Observation with a code tells about the Observations.
    // A search allowed only by its parameters reaches the upstream with `handling=strict`
    // in place of the client's `handling=lenient`: a server that ignored `patient` (on a type
    // without it) would return every patient's. One the scopes allow outright keeps it.
    for (token, path, reached) in [
        (
            &patient,
            "/Observation?patient=123",
            "handling=strict, return=minimal",
        ),
        (
            &entra,
            "/Observation?code=x",
            "return=minimal, handling=lenient",
        ),
    ] {
        let bearer = format!("Bearer {token}");
        let headers = [
            ("authorization", bearer.as_str()),
            ("prefer", "return=minimal, handling=lenient"),
        ];
        let reply = client.send("GET", path, &headers, "").await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(upstream.last().headers["prefer"], reached, "{path}");
    }
    let before = upstream.received().len();
    let patients = minted(json!({"scope": format!("{TENANT} system/Patient.rs")}));
    let has = "/Patient?_has:Observation:patient:code=x";
    assert_refused(&get(&client, &patients, has).await, "system/Observation.s");
    assert_eq!(upstream.received().len(), before);
    let both = minted(json!({"scope": format!("{TENANT} system/Patient.rs system/Observation.s")}));
    assert_eq!(get(&client, &both, has).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_whose_body_stops_arriving_while_it_is_checked_gets_408() {
    let Setup { client, upstream } = setup(false).await;
    let token = minted(json!({"scope": format!("{TENANT} system/Patient.crus")}));
    let addr = client.addr();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: 200\r\n\r\n{{\"resourceType\":\"Bundle\""
    );
    let (answer, waited) = tokio::task::spawn_blocking(move || send_until_closed(addr, &request))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"timeout""#), "{answer}");
    assert!(
        waited >= BODY_PAUSE - Duration::from_millis(100),
        "{waited:?}"
    );
    assert!(
        waited < Duration::from_secs(9),
        "closed only by the client: {waited:?}"
    );
    assert!(
        upstream.received().is_empty(),
        "a Bundle still being checked reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_held_at_once_beyond_the_budget_get_503_and_are_not_forwarded() {
    // The budget holds one largest body: a Bundle that announced it and is still arriving
    // takes all of it.
    let Setup { client, upstream } = setup_with(
        SmartScopeLayer::builder()
            .max_buffered_body(4096)
            .max_buffered_total(4096),
        Duration::from_secs(20),
        true,
    )
    .await;
    let token = minted(json!({"scope": format!("{TENANT} system/Patient.crus")}));
    let addr = client.addr();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: 4096\r\n\r\n{{\"resourceType\":\"Bundle\""
    );
    let hold = || async {
        let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut held, head.as_bytes())
            .await
            .unwrap();
        held
    };
    let mut held = hold().await;
    // Another Bundle is refused, 503 with Retry-After, once the first holds the budget.
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": []}).to_string();
    let post_bundle = || {
        send(
            &client,
            &token,
            "POST",
            "/",
            "application/fhir+json",
            &bundle,
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let reply = post_bundle().await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(
            std::time::Instant::now() < deadline,
            "the held Bundle never took the budget"
        );
        // The held one's head may have come while one of these was being read: then it was
        // the one refused (it has an answer, or its connection closed). It comes again.
        let mut answer = [0u8; 64];
        match held.try_read(&mut answer) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => held = hold().await,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["issue"][0]["code"], "transient");
    let forwarded = upstream.received().len();
    // The held one is abandoned: its share is let go, and Bundles pass again.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = post_bundle().await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned Bundle's share was never let go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        upstream.received().len(),
        forwarded + 1,
        "a refused Bundle reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_search_forms_are_checked_and_passed_unchanged() {
    let Setup { client, upstream } = setup(false).await;
    let token =
        minted(json!({"scope": format!("{TENANT} system/Patient.crus system/Observation.rs")}));
    let allowed = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
        {"request": {"method": "GET", "url": "Observation?code=x"}}
    ]})
    .to_string();
    let reply = post_bundle(&client, &token, &allowed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let last = upstream.last();
    assert_eq!(
        last.body,
        allowed.as_bytes(),
        "the Bundle reaches the upstream as sent"
    );

    let seen = upstream.received().len();
    let one_out = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
        {"request": {"method": "DELETE", "url": "Observation/7"}}
    ]})
    .to_string();
    assert_refused(
        &post_bundle(&client, &token, &one_out).await,
        "system/Observation.d",
    );
    let xml = "<Bundle xmlns=\"http://hl7.org/fhir\"/>";
    let reply = send(&client, &token, "POST", "/", "application/fhir+xml", xml).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "an XML Bundle cannot be checked: {}",
        reply.text()
    );
    assert!(
        !reply.headers.contains_key("www-authenticate"),
        "not a scope the token lacks"
    );
    assert_eq!(upstream.received().len(), seen);

    // A form search: its body's parameters count, and the body goes on as sent.
    let form = "name=x&_include=Observation:performer:Practitioner";
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        FORM.1,
        form,
    )
    .await;
    assert_refused(&reply, "system/Practitioner.r");
    let form = "code=x&category=laboratory";
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        FORM.1,
        form,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.last().body, form.as_bytes());
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        "application/x-www-form-urlencoded; charset=UTF-8",
        form,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // A body of another type (or none named) would not be read as a form by the FHIR server,
    // which would then search without the parameters checked here (`patient=`, `category=`):
    // 415, nothing forwarded.
    let seen = upstream.received().len();
    for ty in [
        "text/plain",
        "application/json",
        "multipart/form-data; boundary=x",
    ] {
        let reply = send(
            &client,
            &token,
            "POST",
            "/Observation/_search",
            ty,
            "category=laboratory",
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{ty}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    }
    let bearer = format!("Bearer {token}");
    let untyped = client
        .send(
            "POST",
            "/Observation/_search",
            &[("authorization", &bearer)],
            "category=laboratory",
        )
        .await;
    assert_eq!(untyped.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A checked header named in `Connection` (removed on the way upstream), or two
    // Content-Types (some servers join them): 400, nothing forwarded.
    for extra in [
        [("connection", "keep-alive, Content-Type"), ("x-unused", "")],
        [("connection", "prefer"), ("x-unused", "")],
        [("content-type", "text/plain"), ("x-unused", "")],
    ] {
        let mut headers = vec![("authorization", bearer.as_str()), FORM];
        headers.extend(extra.iter().filter(|(_, v)| !v.is_empty()).copied());
        let reply = client
            .send(
                "POST",
                "/Observation/_search",
                &headers,
                "category=laboratory",
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{extra:?}: {}",
            reply.text()
        );
    }
    assert_eq!(upstream.received().len(), seen);
    // No body and no type: the query's parameters are the search.
    let reply = client
        .send(
            "POST",
            "/Observation/_search?category=laboratory",
            &[("authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_issuers_key_cannot_sign_in_the_token_endpoints_name() {
    let Setup { client, upstream } = setup(false).await;
    // The second issuer's key is bound to no issuer; the endpoint's tokens may name any tenant
    // it issued them for. A token signed by that key with the endpoint's `iss` is refused.
    let endpoint = format!("http://{}", client.addr());
    let forged = minted(json!({"iss": endpoint, "scope": format!("{TENANT} system/*.cruds")}));
    let reply = get(&client, &forged, "/Patient/123").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert!(
        reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token"),
        "{:?}",
        reply.headers
    );
    assert!(upstream.received().is_empty());
    // In its own name it is served.
    let own = minted(json!({"scope": format!("{TENANT} system/Patient.rs")}));
    assert_eq!(
        get(&client, &own, "/Patient/123").await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_only_tokens_keep_tenant_wide_access_unless_required() {
    let Setup { client, .. } = setup(false).await;
    let tenant_only = minted(json!({}));
    let reply = send(
        &client,
        &tenant_only,
        "PUT",
        "/Observation/1",
        "application/fhir+json",
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    tenant_only_batches_name_nothing_outside_the_base(&tenant_only).await;

    let Setup { client, upstream } = setup(true).await;
    let reply = get(&client, &tenant_only, "/Observation/1").await;
    assert_refused(&reply, "system/Observation.r");
    assert!(upstream.received().is_empty());
    // `$versions` reads no data and reaches no server: the tenant's releases, whatever the
    // scopes.
    let reply = get(&client, &tenant_only, "/$versions").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let parameters = reply.json()["parameter"].clone();
    assert_eq!(
        parameters,
        json!([{"name": "version", "valueCode": "4.0"}, {"name": "default", "valueCode": "4.0"}])
    );
    assert!(upstream.received().is_empty());
    let scoped = minted(json!({"scope": format!("{TENANT} system/*.cruds")}));
    assert_eq!(
        get(&client, &scoped, "/Observation/1").await.status,
        StatusCode::OK
    );
}

/// Under a tenant-only token, a batch's entries are read by the FHIR server relative to the
/// tenant's base: an entry URL that could name another base (another tenant's on the same
/// server) is refused before it is sent, in JSON and XML; a batch that names none passes
/// byte for byte.
async fn tenant_only_batches_name_nothing_outside_the_base(token: &str) {
    let Setup { client, upstream } = setup(false).await;
    let json = |url: &str| {
        json!({"resourceType": "Bundle", "type": "batch",
            "entry": [{"request": {"method": "GET", "url": url}}]})
        .to_string()
    };
    let xml = |url: &str| {
        format!(
            "<Bundle xmlns=\"http://hl7.org/fhir\"><type value=\"transaction\"/><entry>\
             <request><method value=\"GET\"/><url value=\"{url}\"/></request></entry></Bundle>"
        )
    };
    for url in [
        "http://127.0.0.1:9100/fhir/b/Patient/1",
        "../b/Patient/1",
        "Patient/%2e%2e/%2e%2e/b",
        "/fhir/b/Patient/1",
    ] {
        for (ty, body) in [
            ("application/fhir+json", json(url)),
            ("application/fhir+xml", xml(url)),
        ] {
            let reply = send(&client, token, "POST", "/", ty, &body).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{url}: {}",
                reply.text()
            );
            assert_eq!(reply.json()["issue"][0]["code"], "invalid");
        }
    }
    // What cannot be read as the server reads it: another charset, a compressed body.
    for headers in [
        &[("content-type", "application/fhir+json; charset=utf-16")][..],
        &[
            ("content-type", "application/fhir+json"),
            ("content-encoding", "gzip"),
        ][..],
    ] {
        let auth = format!("Bearer {token}");
        let mut all = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let reply = client.send("POST", "/", &all, &json("Patient")).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{headers:?}"
        );
    }
    assert!(upstream.received().is_empty(), "a refused batch was sent");
    for (ty, body) in [
        (
            "application/fhir+json",
            json("Observation?code=http://loinc.org|8867-4"),
        ),
        ("application/fhir+xml", xml("Patient/1")),
    ] {
        let reply = send(&client, token, "POST", "/", ty, &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let received = upstream.received();
        assert_eq!(received.last().unwrap().body, body.as_bytes());
    }
}

/// `POST /Patient` with an `If-None-Exist` header of each search, with `token`.
async fn conditional_create(client: &TestClient, token: &str, searches: &[&str]) -> Reply {
    let bearer = format!("Bearer {token}");
    let mut headers = vec![
        ("authorization", bearer.as_str()),
        ("content-type", "application/fhir+json"),
    ];
    headers.extend(searches.iter().map(|search| ("if-none-exist", *search)));
    client
        .send(
            "POST",
            "/Patient",
            &headers,
            r#"{"resourceType": "Patient"}"#,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_could_reach_other_types_needs_scopes_on_them() {
    let Setup { client, upstream } = setup(false).await;
    let patients = minted(json!({"scope": format!("{TENANT} system/Patient.crus")}));
    // Operations answering with any type: every type's read and search.
    for path in [
        "/Patient/$everything",
        "/Patient/1/$summary",
        "/Encounter/1/$everything",
        "/Patient/1/$graphql?query=%7BObservationList%7Bid%7D%7D",
    ] {
        assert_refused(
            &get(&client, &patients, path).await,
            "system/*.r system/*.s",
        );
    }
    // One that stays within its type: its type's scopes decide.
    let reply = get(&client, &patients, "/Patient/1/$meta").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.received().len();

    // A read's `_include` (a server may honour it as a search's), membership (`_in`), and a
    // name in another case: what they reach needs its own scopes.
    for (path, sufficient) in [
        (
            "/Patient/1?_include=Patient:organization",
            "system/Organization.r",
        ),
        ("/Patient?_in=Group/7", "system/Group.r"),
        (
            "/Patient?_INCLUDE=Patient:organization",
            "system/Organization.r",
        ),
    ] {
        assert_refused(&get(&client, &patients, path).await, sufficient);
    }
    // A `;` as it is: some servers split parameters there.
    let reply = get(&client, &patients, "/Patient?name=x;_include=*").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(upstream.received().len(), seen);

    // A transaction entry writes the type its resource says: it must be the url's; and a
    // conditional create's search names no other type.
    for (entry, why) in [
        (
            json!({"request": {"method": "POST", "url": "Patient"},
                   "resource": {"resourceType": "Observation", "status": "final"}}),
            "not a Patient",
        ),
        (
            json!({"request": {"method": "POST", "url": "Patient",
                               "ifNoneExist": "Observation?code=secret"},
                   "resource": {"resourceType": "Patient"}}),
            "searches another type",
        ),
    ] {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [entry]});
        let reply = send(
            &client,
            &patients,
            "POST",
            "/",
            "application/fhir+json",
            &bundle.to_string(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        assert!(reply.text().contains(why), "{}", reply.text());
    }
    // And it needs search on its own type, in a Bundle or an If-None-Exist header.
    let creator = minted(json!({"scope": format!("{TENANT} system/Patient.c")}));
    let reply = conditional_create(&client, &creator, &["identifier=x"]).await;
    assert_refused(&reply, "system/Patient.s");
    // So do a conditional update, patch and delete: whether (and how many) resources match
    // shows in the answer.
    let writer = minted(json!({"scope": format!("{TENANT} system/Patient.cud")}));
    let conditionally = |token: String, method: &'static str| {
        let client = client.clone();
        async move {
            let body = r#"{"resourceType": "Patient"}"#;
            let path = "/Patient?identifier=x";
            send(&client, &token, method, path, "application/fhir+json", body).await
        }
    };
    for method in ["PUT", "PATCH", "DELETE"] {
        let reply = conditionally(writer.clone(), method).await;
        assert_refused(&reply, "system/Patient.s");
    }
    assert_eq!(
        upstream.received().len(),
        seen,
        "nothing refused was forwarded"
    );
    // A conditional update that finds nothing creates: it needs `c` too.
    let updater = minted(json!({"scope": format!("{TENANT} system/Patient.us")}));
    assert_refused(&conditionally(updater, "PUT").await, "system/Patient.c");
    let searcher = minted(json!({"scope": format!("{TENANT} system/Patient.cus")}));
    let reply = conditionally(searcher, "PUT").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.received().len();

    // A resource scope that does not parse grants nothing, and does not leave the token with
    // the tenant-wide access of a token without SMART scopes.
    let typo = minted(json!({"scope": format!("{TENANT} system/patient.rs")}));
    let reply = send(
        &client,
        &typo,
        "DELETE",
        "/Observation/1",
        "application/fhir+json",
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(
        reply.text().contains("system/patient.rs"),
        "{}",
        reply.text()
    );
    assert_eq!(upstream.received().len(), seen);
    let reply = conditional_create(&client, &patients, &["identifier=x"]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Two searches for one create: which would the server use? A malformed request, not a
    // scope the token lacks.
    let reply = conditional_create(&client, &patients, &["identifier=x", "identifier=y"]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["issue"][0]["code"], "invalid");
    // An operation that only reads across types may come by POST (its parameters in a body).
    let everyone = minted(json!({"scope": format!("{TENANT} system/*.rs")}));
    let reply = send(
        &client,
        &everyone,
        "POST",
        "/Patient/1/$everything",
        "application/fhir+json",
        r#"{"resourceType": "Parameters"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_resource_must_be_of_the_type_its_url_names() {
    let Setup { client, upstream } = setup(false).await;
    let writer = minted(json!({"scope": format!("{TENANT} system/Observation.cruds")}));
    let patient = r#"{"resourceType": "Patient", "id": "1"}"#;
    let observation = r#"{"resourceType": "Observation", "id": "1"}"#;
    let seen = upstream.received().len();
    // A Patient written through an Observation URL: the server stores what the body says.
    for (method, path) in [
        ("POST", "/Observation"),
        ("PUT", "/Observation/1"),
        ("PUT", "/Observation?identifier=x"),
    ] {
        let reply = send(
            &client,
            &writer,
            method,
            path,
            "application/fhir+json",
            patient,
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            reply.text()
        );
        assert!(
            reply.text().contains("not a Observation"),
            "{}",
            reply.text()
        );
        let xml = r#"<Patient xmlns="http://hl7.org/fhir"><id value="1"/></Patient>"#;
        let reply = send(&client, &writer, method, path, "application/fhir+xml", xml).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{method} {path} XML");
    }
    // Bodies whose type cannot be read, or told two ways.
    let twice = r#"{"resourceType": "Observation", "resourceType": "Patient"}"#;
    let reply = send(
        &client,
        &writer,
        "POST",
        "/Observation",
        "application/fhir+json",
        twice,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = send(
        &client,
        &writer,
        "POST",
        "/Observation",
        "text/plain",
        observation,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );
    assert_eq!(
        upstream.received().len(),
        seen,
        "nothing refused was forwarded"
    );

    // The right type passes, its body unchanged.
    for (method, path) in [("POST", "/Observation"), ("PUT", "/Observation/1")] {
        let reply = send(
            &client,
            &writer,
            method,
            path,
            "application/fhir+json",
            observation,
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {path}: {}",
            reply.text()
        );
        assert_eq!(upstream.last().body, observation.as_bytes());
    }
    // A conditional reference is a search of the type it names, which the server makes.
    let referring =
        r#"{"resourceType": "Observation", "subject": {"reference": "Patient?name=smith"}}"#;
    let seen = upstream.received().len();
    let reply = send(
        &client,
        &writer,
        "POST",
        "/Observation",
        "application/fhir+json",
        referring,
    )
    .await;
    assert_refused(&reply, "system/Patient.s");
    let xml = r#"<Observation xmlns="http://hl7.org/fhir"><subject><reference value="Patient?name=smith"/></subject></Observation>"#;
    let reply = send(
        &client,
        &writer,
        "POST",
        "/Observation",
        "application/fhir+xml",
        xml,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("JSON only"), "{}", reply.text());
    // A patch that writes one in.
    let patch =
        r#"[{"op": "add", "path": "/subject", "value": {"reference": "Patient?name=smith"}}]"#;
    let json_patch = "application/json-patch+json";
    let reply = send(
        &client,
        &writer,
        "PATCH",
        "/Observation/1",
        json_patch,
        patch,
    )
    .await;
    assert_refused(&reply, "system/Patient.s");
    assert_eq!(
        upstream.received().len(),
        seen,
        "nothing refused was forwarded"
    );
    let searcher =
        minted(json!({"scope": format!("{TENANT} system/Observation.cruds system/Patient.s")}));
    let reply = send(
        &client,
        &searcher,
        "POST",
        "/Observation",
        "application/fhir+json",
        referring,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A Binary is created from any content.
    let binary = minted(json!({"scope": format!("{TENANT} system/Binary.c")}));
    let reply = send(
        &client,
        &binary,
        "POST",
        "/Binary",
        "image/png",
        "\u{89}PNG",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A JSON or XML document that is not FHIR's is a Binary's content too (a CDA document).
    for (ty, body) in [
        ("application/json", r#"{"a": 1}"#),
        ("text/xml", "<ClinicalDocument xmlns=\"urn:hl7-org:v3\"/>"),
    ] {
        let reply = send(&client, &binary, "POST", "/Binary", ty, body).await;
        assert_eq!(reply.status, StatusCode::OK, "{ty}: {}", reply.text());
        assert_eq!(upstream.last().body, body.as_bytes());
    }
    // In FHIR's own format it is a Binary resource, of that type.
    let fhir_json = "application/fhir+json";
    let reply = send(&client, &binary, "POST", "/Binary", fhir_json, patient).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operations_form_parameters_are_checked_as_a_searchs() {
    let Setup { client, upstream } = setup(false).await;
    // (An operation invoked by POST may write what it touches: `c` and `u` too.)
    let token = minted(json!({"scope": format!("{TENANT} system/Observation.cruds")}));
    let seen = upstream.received().len();
    // In the query, refused; posted as a form (which servers read as the query), too.
    let including = "_include=Observation:patient&patient.name=smith";
    let post = async |form: &str| {
        client
            .send(
                "POST",
                "/Observation/$lastn",
                &[("authorization", &format!("Bearer {token}")), FORM],
                form,
            )
            .await
    };
    let reply = get(&client, &token, &format!("/Observation/$lastn?{including}")).await;
    assert_refused(&reply, "system/Patient.r system/Patient.s");
    assert_refused(&post(including).await, "system/Patient.r system/Patient.s");
    assert_eq!(
        upstream.received().len(),
        seen,
        "nothing refused was forwarded"
    );
    let reply = post("code=1234-5").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.last().body, &b"code=1234-5"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_server_could_read_otherwise_than_checked_are_refused() {
    let Setup { client, upstream } = setup(false).await;
    let token = minted(json!({"scope": format!("{TENANT} system/Observation.rs")}));
    let seen = upstream.received().len();
    // A parameter name FHIR could not define: HAPI strips a leading `?`, so `??_include` is an
    // `_include` of anything; in the query of a GET or of a form search, or in the form.
    for path in [
        "/Observation??_include:iterate=*",
        "/Observation?%3F_revinclude:iterate=*",
    ] {
        let reply = get(&client, &token, path).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["issue"][0]["code"], "invalid");
    }
    for (path, form) in [
        ("/Observation/_search??_include:iterate=*", "code=x"),
        ("/Observation/_search", "?_revinclude:iterate=*&code=x"),
        // A query that cannot be read is not skipped for the form's sake.
        ("/Observation/_search?%FF=1&_include=*", "code=x"),
    ] {
        let reply = send(&client, &token, "POST", path, FORM.1, form).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path} {form}: {}",
            reply.text()
        );
    }
    // A form a server might not read as the one checked (and then run the search with no
    // parameters at all): a Content-Encoding, even `identity`; another spelling of the type;
    // another charset.
    let form_search = |headers: Vec<(&'static str, &'static str)>| {
        let client = client.clone();
        let token = token.clone();
        async move {
            let authorization = format!("Bearer {token}");
            let mut all = vec![("authorization", authorization.as_str())];
            all.extend(headers);
            client
                .send("POST", "/Observation/_search", &all, "code=x")
                .await
        }
    };
    for headers in [
        vec![(FORM.0, FORM.1), ("content-encoding", "identity")],
        vec![(FORM.0, "Application/X-WWW-Form-Urlencoded")],
        vec![(FORM.0, "application/x-www-form-urlencoded; charset=utf-16")],
        vec![(FORM.0, "application/x-www-form-urlencoded; boundary=x")],
        // What begins as a form's type is one to HAPI.
        vec![(FORM.0, "application/x-www-form-urlencodedx")],
        vec![(FORM.0, "application/x-www-form-urlencoded charset=utf-8")],
    ] {
        let reply = form_search(headers.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{headers:?}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(
        upstream.received().len(),
        seen,
        "nothing refused was forwarded"
    );
    // UTF-8 said outright is fine, and the body goes on as sent.
    let reply = form_search(vec![(
        FORM.0,
        "application/x-www-form-urlencoded; charset=UTF-8",
    )])
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.last().body, &b"code=x"[..]);

    // A JSON Patch setting a conditional reference by its `value`: the server resolves it
    // with a search of Patient, which the token cannot make.
    let writer = minted(json!({"scope": format!("{TENANT} system/Observation.rus")}));
    let seen = upstream.received().len();
    let patch =
        r#"[{"op": "replace", "path": "/subject/reference", "value": "Patient?identifier=x"}]"#;
    let reply = send(
        &client,
        &writer,
        "PATCH",
        "/Observation/1",
        "application/json-patch+json",
        patch,
    )
    .await;
    assert_refused(&reply, "system/Patient.s");
    assert_eq!(upstream.received().len(), seen);
    // An operation's form too, which would otherwise not be read as one: its `_revinclude`
    // would go unchecked.
    let reply = client
        .send(
            "POST",
            "/Observation/$lastn?patient=1",
            &[
                ("authorization", &format!("Bearer {token}")),
                (FORM.0, "application/x-www-form-urlencoded charset=utf-8"),
            ],
            "_revinclude:iterate=*",
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );
    assert_eq!(upstream.received().len(), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_entrys_resource_is_checked_whatever_its_url() {
    let Setup { client, upstream } = setup(false).await;
    // HAPI creates a POST entry's resource, whatever the url: a search's creates a Patient.
    let token = minted(json!({"scope": format!("{TENANT} system/Observation.s")}));
    let seen = upstream.received().len();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation/_search"},
         "resource": {"resourceType": "Patient", "name": [{"family": "Planted"}]}}
    ]})
    .to_string();
    let reply = post_bundle(&client, &token, &bundle).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    assert_eq!(
        upstream.received().len(),
        seen,
        "the Bundle reached the upstream"
    );
    // The search alone goes on.
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Observation/_search?code=x"}}
    ]})
    .to_string();
    let reply = post_bundle(&client, &token, &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascading_deletes_need_delete_on_every_type() {
    let Setup { client, upstream } = setup(false).await;
    let token = minted(json!({"scope": format!("{TENANT} system/Patient.d")}));
    let bearer = format!("Bearer {token}");
    let seen = upstream.received().len();
    // HAPI deletes whatever refers to the patient, by `_cascade=delete` or `X-Cascade: delete`.
    let reply = send(
        &client,
        &token,
        "DELETE",
        "/Patient/1?_cascade=delete",
        FORM.1,
        "",
    )
    .await;
    assert_refused(&reply, "system/*.d");
    let reply = client
        .send(
            "DELETE",
            "/Patient/1",
            &[("authorization", &bearer), ("x-cascade", "delete")],
            "",
        )
        .await;
    assert_refused(&reply, "system/*.d");
    // A batch's query (its deletes cascade on HAPI) is checked too, and takes nothing but
    // `_format`, `_pretty` and a `_cascade` the scopes allow.
    let deleting = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/1"}}
    ]})
    .to_string();
    let fhir_json = "application/fhir+json";
    let reply = send(
        &client,
        &token,
        "POST",
        "/?_cascade=delete",
        fhir_json,
        &deleting,
    )
    .await;
    assert_refused(&reply, "system/*.d");
    let reply = send(
        &client,
        &token,
        "POST",
        "/?_unknown=1",
        fhir_json,
        &deleting,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = send(&client, &token, "POST", "/?%FF=1", fhir_json, &deleting).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(
        upstream.received().len(),
        seen,
        "a refused request reached the upstream"
    );

    let reply = send(
        &client,
        &token,
        "POST",
        "/?_format=json&_pretty=true",
        fhir_json,
        &deleting,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = client
        .send(
            "DELETE",
            "/Patient/1?_cascade=none",
            &[("authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let everything = minted(json!({"scope": format!("{TENANT} system/*.d")}));
    let reply = send(
        &client,
        &everything,
        "POST",
        "/?_cascade=delete",
        fhir_json,
        &deleting,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.last().target, "/fhir/?_cascade=delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_takes_only_narrowing_parameters_under_patient_scopes() {
    let Setup { client, upstream } = setup(false).await;
    let patient = minted(json!({"scope": format!("{TENANT} patient/*.rs"), "patient": "123"}));
    let seen = upstream.received().len();
    // HAPI's `_mdm=true` adds the records of every patient linked to this one.
    assert_refused(
        &get(&client, &patient, "/Patient/123/$everything?_mdm=true").await,
        "system/*.r system/*.s",
    );
    let parameters = |name: &str| {
        json!({"resourceType": "Parameters", "parameter": [{"name": name, "valueString": "true"}]})
            .to_string()
    };
    let fhir_json = "application/fhir+json";
    let path = "/Patient/123/$everything";
    let reply = send(
        &client,
        &patient,
        "POST",
        path,
        fhir_json,
        &parameters("_mdm"),
    )
    .await;
    assert_refused(&reply, "system/*.r system/*.s");
    let reply = send(&client, &patient, "POST", path, FORM.1, "_mdm=true").await;
    assert_refused(&reply, "system/*.r system/*.s");
    // Parameters that cannot be read here: only with scopes that would not need them read.
    let xml = "<Parameters xmlns=\"http://hl7.org/fhir\"><parameter><name value=\"_mdm\"/>\
               <valueBoolean value=\"true\"/></parameter></Parameters>";
    let reply = send(&client, &patient, "POST", path, "application/fhir+xml", xml).await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text()
    );
    assert_eq!(
        upstream.received().len(),
        seen,
        "a refused request reached the upstream"
    );

    assert_eq!(
        get(
            &client,
            &patient,
            "/Patient/123/$everything?_count=10&_since=2024-01-01"
        )
        .await
        .status,
        StatusCode::OK
    );
    let counted = parameters("_count");
    let reply = send(&client, &patient, "POST", path, fhir_json, &counted).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.last().body, counted.as_bytes());
    let everyone = minted(json!({"scope": format!("{TENANT} system/*.rs")}));
    let reply = send(
        &client,
        &everyone,
        "POST",
        path,
        "application/fhir+xml",
        xml,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contained_resources_need_read_and_search_on_every_type() {
    let Setup { client, .. } = setup(false).await;
    let token = minted(json!({"scope": format!("{TENANT} system/Observation.s")}));
    assert_refused(
        &get(
            &client,
            &token,
            "/Observation?code=x&_contained=true&_containedType=container",
        )
        .await,
        "system/*.r system/*.s",
    );
    // Nor is a granular scope with `_contained` narrower than the one registered.
    let (status, error, token) = ask(
        &client,
        &format!("{TENANT} system/Observation.rs?category=laboratory%26_contained=true"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error, "invalid_scope");
    assert!(token.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_a_servlet_container_would_drop_are_refused() {
    let Setup { client, upstream } = setup(false).await;
    let token =
        minted(json!({"scope": format!("{TENANT} system/Observation.rs?category=laboratory")}));
    let seen = upstream.received().len();
    // Past Tomcat's maxParameterCount (1000 in its newer releases), or its 2 MB maxPostSize,
    // the form's parameters are dropped: the search would run without `category`.
    let filler = "x=1&".repeat(1_500);
    let form = format!("{filler}category=laboratory");
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        FORM.1,
        &form,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    let query = format!("/Observation?{filler}category=laboratory");
    let reply = get(&client, &token, &query).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    // A search by a few thousand ids fits; past a servlet container's limits it does not.
    let ids: Vec<String> = (0..6_000).map(|i| format!("obs-{i:08}")).collect();
    let many_ids = format!("_id={}&category=laboratory", ids.join(","));
    assert!(many_ids.len() > 64 * 1024);
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        FORM.1,
        &many_ids,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // It, and none of those refused before it, reached the upstream.
    assert_eq!(upstream.received().len(), seen + 1);
    let seen = seen + 1;
    let long = format!("code={}&category=laboratory", "a".repeat(1100 * 1024));
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        FORM.1,
        &long,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(
        upstream.received().len(),
        seen,
        "a refused form reached the upstream"
    );
    let form = format!("{}category=laboratory", "x=1&".repeat(100));
    let reply = send(
        &client,
        &token,
        "POST",
        "/Observation/_search",
        FORM.1,
        &form,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_and_every_type_of_a_compartment_are_searches() {
    let Setup { client, upstream } = setup(false).await;
    let token = minted(json!({"scope": format!("{TENANT} system/Patient.rs")}));
    let bearer = format!("Bearer {token}");
    for path in [
        "/Patient?name=x",
        "/Patient/_history",
        "/Patient/1/_history",
    ] {
        let reply = client
            .send("HEAD", path, &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.headers);
        assert_eq!(upstream.last().method, "HEAD", "{path}");
    }
    let everyone = minted(json!({"scope": format!("{TENANT} system/*.s")}));
    assert_eq!(
        get(&client, &everyone, "/Patient/123/*").await.status,
        StatusCode::OK
    );
    assert_refused(&get(&client, &token, "/Patient/123/*").await, "system/*.s");
}
