//! End to end: the real gateway binary (`tower-fhir-gateway`, with `--config`) between a real
//! OpenID provider (`oidc-provider`, npm) and a real FHIR server framework
//! (`@asymmetrik/node-fhir-server-core`, npm) serving DSTU2, STU3 and R4, over loopback HTTP.
//!
//! The npm packages are installed from `tests/interop/package-lock.json` at the repository's
//! root the first time (`npm ci --prefix tests/interop`; Node 20 or later).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

/// The binary under test, built by cargo for this test.
const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");

const DSTU2_TENANT: &str = "1d2d0000-0000-4000-8000-000000000001";
const STU3_TENANT: &str = "3d3d0000-0000-4000-8000-000000000003";
const R4_TENANT: &str = "4d4d0000-0000-4000-8000-000000000004";
const BOTH_TENANT: &str = "bbbb0000-0000-4000-8000-00000000000b";
const SLOW_TENANT: &str = "5105e000-0000-4000-8000-000000000005";
const CLIENT_SECRET: &str = "e2e-client-secret-0123456789";
const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const ALL_TENANTS: [&str; 5] = [
    DSTU2_TENANT,
    STU3_TENANT,
    R4_TENANT,
    BOTH_TENANT,
    SLOW_TENANT,
];
/// The repository's root (`tests/interop` is there).
fn repository_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Installs the npm packages once per test run.
fn npm_installed() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let interop = repository_root().join("tests/interop");
        // nextest runs each test in a process of its own: on a fresh checkout, without this
        // lock, two of them would run `npm ci` into the same directory at once.
        let lock = std::fs::File::create(std::env::temp_dir().join("tower-fhir-npm-ci.lock"))
            .expect("create the npm install lock file");
        lock.lock().expect("lock the npm install lock file");
        if interop.join("node_modules/oidc-provider").exists()
            && interop
                .join("node_modules/@asymmetrik/node-fhir-server-core")
                .exists()
        {
            return;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&interop)
            .status()
            .expect("npm (Node.js 20 or later) is needed for the interop tests");
        assert!(status.success(), "npm ci --prefix tests/interop failed");
    });
}

/// `node tests/interop/fhir.js`; returns the process and its root URL.
fn start_fhir(dir: &Path, name: &str) -> (Proc, String) {
    npm_installed();
    let mut command = Command::new("node");
    command
        .arg(repository_root().join("tests/interop/fhir.js"))
        .args(["--port", "0", "--name", name]);
    Proc::start(command, dir.join(format!("fhir-{name}.log")), "READY ")
}

/// `node tests/interop/oidc.mjs` on `port`; returns the process and its issuer.
fn start_oidc(dir: &Path, port: u16, rotate: bool) -> (Proc, String) {
    npm_installed();
    let mut command = Command::new("node");
    command
        .arg(repository_root().join("tests/interop/oidc.mjs"))
        .args(["--port", &port.to_string(), "--keys"])
        .arg(dir.join("oidc-keys.json"))
        .args([
            "--client",
            "svc:svc-secret",
            "--audience",
            "api://tower-fhir",
        ])
        .args(["--scopes", &ALL_TENANTS.join(" ")]);
    if rotate {
        command.arg("--rotate");
    }
    Proc::start(command, dir.join("oidc.log"), "READY ")
}

struct Gateway {
    proc: Proc,
    client: TestClient,
    base: String,
}

/// The gateway binary with `config` written to `dir/gateway.json`.
fn start_gateway(dir: &Path, config: &Value) -> Gateway {
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info,tower_fhir=debug");
    let (proc, base) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    Gateway {
        proc,
        client: TestClient::new(addr),
        base,
    }
}

fn upstream(root: &str, release: &str, version: &str) -> Value {
    json!({"base_url": format!("{root}/{release}"), "fhir_version": version})
}

/// The gateway's configuration on `port`; on port 0 (any free port, read from the start line),
/// its public URL and token issuer are the defaults, the address it was given. A test that
/// needs that address before the start (a restart that must keep its tokens' issuer) picks a
/// port with `free_port`, which another test's gateway could be given at the same moment: as
/// few as can.
fn config(dir: &Path, port: u16, fhir: &str, other: &str, issuer: Option<&str>) -> Value {
    let trusted: Vec<Value> = issuer
        .map(|issuer| {
            // oidc-provider types its JWT access tokens as RFC 9068 has it: nothing else it
            // signs passes for one.
            vec![json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks"), "audience": "api://tower-fhir",
                "tenants": [STU3_TENANT, DSTU2_TENANT], "token_types": ["at+jwt"]})]
        })
        .unwrap_or_default();
    let mut config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "public_base_url": format!("http://127.0.0.1:{port}"),
        "state_dir": dir.join("state"),
        "token": {"issuer": format!("http://127.0.0.1:{port}"), "audience": "tower-fhir", "ttl_seconds": 3600},
        "trusted_issuers": trusted,
        "clients": [{"client_id": "app", "client_secret": CLIENT_SECRET, "tenants": ALL_TENANTS}],
        "tenants": [
            {"id": DSTU2_TENANT, "upstreams": [upstream(fhir, "1_0_2", "1.0")]},
            {"id": STU3_TENANT, "upstreams": [upstream(fhir, "3_0_1", "3.0")]},
            {"id": R4_TENANT, "upstreams": [upstream(other, "4_0_0", "4.0")]},
            {"id": BOTH_TENANT, "upstreams": [upstream(fhir, "3_0_1", "3.0"), upstream(fhir, "1_0_2", "1.0")]}
        ],
        "admin_token": ADMIN_TOKEN,
        "jwks_refetch_cooldown_seconds": 1
    });
    if port == 0 {
        let config = config.as_object_mut().unwrap();
        config.remove("public_base_url");
        config["token"].as_object_mut().unwrap().remove("issuer");
    }
    config
}

async fn token(gateway: &Gateway, secret: &str, tenant: &str) -> Reply {
    token_as(gateway, "app", secret, tenant).await
}

async fn token_as(gateway: &Gateway, client_id: &str, secret: &str, tenant: &str) -> Reply {
    gateway
        .client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id={client_id}&client_secret={secret}&scope={tenant}"
            ),
        )
        .await
}

async fn access_token(gateway: &Gateway, tenant: &str) -> String {
    let reply = token(gateway, CLIENT_SECRET, tenant).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

fn release_tag(resource: &Value) -> String {
    resource["meta"]["tag"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["system"] == "urn:tower-fhir:interop:fhir-release")
        .and_then(|t| t["code"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// GET through the gateway with a bearer token and an Accept header.
async fn get(gateway: &Gateway, token: &str, path: &str, accept: &str) -> Reply {
    get_with(&gateway.client, token, path, accept).await
}

async fn get_with(client: &TestClient, token: &str, path: &str, accept: &str) -> Reply {
    client
        .get(
            path,
            &[
                ("authorization", &format!("Bearer {token}")),
                ("accept", accept),
            ],
        )
        .await
}

/// The interactions a deployed DSTU2/STU3 client makes, for one tenant, each of which must pass
/// through untouched: `GET Patient/<id>`; `POST Patient/_search` with a form-encoded body
/// (`family`, `given`, `birthdate`, `gender`, `identifier`, `_count`);
/// `GET Observation?patient=<id>&category=vital-signs&_sort:desc=date` (DSTU2) or `_sort=-date`
/// (STU3); `GET Condition?patient=<id>&_count=10`; `GET Encounter?patient=<id>&_sort:desc=date&_count=1`;
/// `GET AllergyIntolerance?patient=<id>`; `GET MedicationOrder?patient=<id>&_count=10` (DSTU2) or
/// `MedicationRequest` (STU3); `GET Coverage?patient=<id>`; `POST [base]` with a `batch` Bundle.
async fn client_sequence(gateway: &Gateway, tenant: &str, release: &str, dstu2: bool) {
    let accept = if dstu2 {
        "application/json+fhir"
    } else {
        "application/fhir+json"
    };
    let token = access_token(gateway, tenant).await;
    let bearer = format!("Bearer {token}");

    let reply = get(gateway, &token, "/Patient/p1", accept).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let patient = reply.json();
    assert_eq!(patient["resourceType"], "Patient");
    assert_eq!(release_tag(&patient), release);
    let content_type = reply.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with(accept), "{content_type}");

    let reply = gateway
        .client
        .send(
            "POST",
            "/Patient/_search",
            &[("authorization", &bearer), ("accept", accept), FORM],
            "family=Smith&given=John&gender=male&_count=10",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let bundle = reply.json();
    assert_eq!(bundle["resourceType"], "Bundle");
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    assert!(!entries.is_empty(), "the search found nothing: {bundle}");
    for entry in &entries {
        let full_url = entry["fullUrl"].as_str().unwrap();
        assert!(
            full_url.starts_with(&format!("{}/Patient/", gateway.base)),
            "{full_url}"
        );
    }

    let sort = if dstu2 {
        "_sort:desc=date"
    } else {
        "_sort=-date"
    };
    let medication = if dstu2 {
        "MedicationOrder"
    } else {
        "MedicationRequest"
    };
    for path in [
        format!("/Observation?patient=p1&category=vital-signs&{sort}"),
        "/Condition?patient=p1&_count=10".to_owned(),
        format!("/Encounter?patient=p1&{sort}&_count=1"),
        "/AllergyIntolerance?patient=p1".to_owned(),
        format!("/{medication}?patient=p1&_count=10"),
        "/Coverage?patient=p1".to_owned(),
    ] {
        let reply = get(gateway, &token, &path, accept).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        let bundle = reply.json();
        assert_eq!(bundle["resourceType"], "Bundle", "{path}");
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        assert!(!entries.is_empty(), "{path}: no results: {bundle}");
        for entry in &entries {
            assert_eq!(release_tag(&entry["resource"]), release, "{path}");
        }
    }

    // Paging: each `next` link leads back through the gateway.
    let mut path = "/Patient?_count=2".to_owned();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let reply = get(gateway, &token, &path, accept).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        let page = reply.json();
        for entry in page["entry"].as_array().into_iter().flatten() {
            seen.push(entry["resource"]["id"].as_str().unwrap().to_owned());
        }
        let next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_owned);
        match next {
            Some(next) => {
                path = next
                    .strip_prefix(&gateway.base)
                    .unwrap_or_else(|| panic!("next link {next} does not lead through the gateway"))
                    .to_owned();
            }
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert!(seen.len() >= 5, "paging saw {seen:?}");

    // A batch Bundle to the base.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p1"}},
        {"request": {"method": "GET", "url": "Patient/p2"}}
    ]});
    let reply = gateway
        .client
        .send(
            "POST",
            "/",
            &[
                ("authorization", &bearer),
                ("accept", accept),
                ("content-type", accept),
            ],
            &batch.to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "batch: {}", reply.text());
    assert_eq!(reply.json()["type"], "batch-response");

    // Create: the Location points at the gateway.
    let patient =
        json!({"resourceType": "Patient", "name": [{"family": "Created", "given": ["E2e"]}]});
    let reply = gateway
        .client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &bearer),
                ("accept", accept),
                ("content-type", accept),
            ],
            &patient.to_string(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "create: {}",
        reply.text()
    );
    let location = reply.headers["location"].to_str().unwrap();
    assert!(
        location.starts_with(&format!("{}/Patient/", gateway.base)),
        "{location}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dstu2_stu3_and_r4_tenants_through_a_real_fhir_server() {
    let dir = scratch("sequence");
    let (_fhir, root) = start_fhir(&dir, "hospital-a");
    let (_other, other_root) = start_fhir(&dir, "hospital-b");
    let gateway = start_gateway(&dir, &config(&dir, 0, &root, &other_root, None));

    // Metadata without a token names the gateway's token endpoint.
    let reply = gateway.client.get("/metadata", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let statement = reply.json();
    let oauth = &statement["rest"][0]["security"]["extension"][0];
    assert_eq!(
        oauth["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert_eq!(
        oauth["extension"][0]["valueUri"],
        format!("{}/oauth/token", gateway.base)
    );
    let smart = gateway
        .client
        .get("/.well-known/smart-configuration", &[])
        .await
        .json();
    assert_eq!(
        smart["token_endpoint"],
        format!("{}/oauth/token", gateway.base)
    );

    client_sequence(&gateway, DSTU2_TENANT, "1_0_2", true).await;
    client_sequence(&gateway, STU3_TENANT, "3_0_1", false).await;

    // Oversized header sections are refused by the server (431) before any layer runs: too
    // many header lines, or more bytes than it buffers.
    let stu3 = access_token(&gateway, STU3_TENANT).await;
    let bearer = format!("Bearer {stu3}");
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h-{i}"), "v".into())).collect();
    let huge = "a".repeat(512 * 1024);
    for extra in [
        many.iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        vec![("x-huge", huge.as_str())],
    ] {
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend(extra);
        let reply = gateway
            .client
            .send("GET", "/Patient/p1", &headers, "")
            .await;
        assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // (On this kept-alive connection the server's own empty answer: only a connection's
        // first head gets an OperationOutcome, which the hardening tests check.)
    }

    // The R4 tenant, on the other server.
    let token = access_token(&gateway, R4_TENANT).await;
    let reply = get(&gateway, &token, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(release_tag(&reply.json()), "4_0_0");

    // With a token, metadata is the tenant's own server's, with the gateway's security.
    let reply = get(&gateway, &token, "/metadata", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let statement = reply.json();
    assert_eq!(statement["fhirVersion"], "4.0.0");
    assert_eq!(
        statement["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        format!("{}/oauth/token", gateway.base)
    );

    // `$versions` with a token names the tenant's releases and the one a request naming none
    // gets there; without one, every release the gateway supports and, as the default, the
    // release an anonymous `metadata` is answered in.
    let versions = |reply: Reply| -> Vec<String> {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        parameters(&reply.json())
    };
    assert_eq!(
        versions(get(&gateway, &token, "/$versions", "application/fhir+json").await),
        ["version=4.0", "default=4.0"]
    );
    let both = access_token(&gateway, BOTH_TENANT).await;
    assert_eq!(
        versions(get(&gateway, &both, "/$versions", "application/fhir+json").await),
        ["version=1.0", "version=3.0", "default=3.0"]
    );
    let anonymous = versions(gateway.client.get("/$versions", &[]).await);
    assert_eq!(anonymous.last().unwrap(), "default=3.0");
    assert!(
        anonymous.contains(&"version=4.0".to_owned()),
        "{anonymous:?}"
    );
    let reply = gateway.client.get("/metadata", &[]).await;
    assert_eq!(reply.json()["fhirVersion"], "3.0.2");

    // A tenant with DSTU2 and STU3 upstreams: fhirVersion picks; none means the first.
    let token = access_token(&gateway, BOTH_TENANT).await;
    for (accept, release) in [
        ("application/fhir+json; fhirVersion=1.0", "1_0_2"),
        // A DSTU2-only client (DSTU2 media types, no fhirVersion) reaches the DSTU2 server.
        ("application/json+fhir", "1_0_2"),
        ("application/fhir+json; fhirVersion=3.0", "3_0_1"),
        ("application/fhir+json", "3_0_1"),
    ] {
        let reply = get(&gateway, &token, "/Patient/p2", accept).await;
        assert_eq!(reply.status, StatusCode::OK, "{accept}: {}", reply.text());
        assert_eq!(release_tag(&reply.json()), release, "{accept}");
    }
    let reply = get(
        &gateway,
        &token,
        "/Patient/p2",
        "application/fhir+json; fhirVersion=4.0",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn default_fhir_version_is_the_release_of_what_the_gateway_answers_without_a_token() {
    let dir = scratch("default-release");
    let mut config = config(&dir, 0, "http://127.0.0.1:9", "http://127.0.0.1:9", None);
    config["default_fhir_version"] = json!("4.0");
    let gateway = start_gateway(&dir, &config);
    let reply = gateway.client.get("/metadata", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["fhirVersion"], "4.0.1");
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; fhirVersion=4.0"
    );
    let reply = gateway.client.get("/$versions", &[]).await;
    let parameters = reply.json()["parameter"].as_array().unwrap().clone();
    assert_eq!(
        parameters.last().unwrap(),
        &json!({"name": "default", "valueCode": "4.0"})
    );
    // A tenant's `$versions` still names its own servers' releases and default.
    let token = access_token(&gateway, BOTH_TENANT).await;
    let reply = get(&gateway, &token, "/$versions", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["parameter"],
        json!([{"name": "version", "valueCode": "1.0"}, {"name": "version", "valueCode": "3.0"},
               {"name": "default", "valueCode": "3.0"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openid_provider_s_tokens_and_its_key_rotation() {
    let dir = scratch("oidc");
    let (_fhir, root) = start_fhir(&dir, "hospital");
    let oidc_port = free_port();
    let (mut oidc, issuer) = start_oidc(&dir, oidc_port, false);
    let gateway = start_gateway(&dir, &config(&dir, 0, &root, &root, Some(&issuer)));
    let idp = TestClient::new(issuer.trim_start_matches("http://").parse().unwrap());
    let provider_token = |tenant: &'static str| {
        let idp = idp.clone();
        async move {
            let basic = format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    "svc:svc-secret"
                )
            );
            let reply = idp
                .send(
                    "POST",
                    "/token",
                    &[FORM, ("authorization", &basic)],
                    &format!("grant_type=client_credentials&scope={tenant}"),
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK, "provider: {}", reply.text());
            reply.json()["access_token"].as_str().unwrap().to_owned()
        }
    };

    let first = provider_token(STU3_TENANT).await;
    let reply = get(&gateway, &first, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(release_tag(&reply.json()), "3_0_1");
    // The provider's audience is its own: the gateway's token endpoint audience does not
    // cover it, and a gateway token still works beside it.
    let own = access_token(&gateway, STU3_TENANT).await;
    assert_eq!(
        get(&gateway, &own, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::OK
    );
    let unused = provider_token(DSTU2_TENANT).await;
    // The provider is trusted for two tenants: its token for a third is refused, though the
    // provider signed it and the gateway's own clients reach that tenant.
    let foreign = provider_token(R4_TENANT).await;
    let reply = get(&gateway, &foreign, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(
        reply.text().contains("may not name this tenant"),
        "{}",
        reply.text()
    );
    let own = access_token(&gateway, R4_TENANT).await;
    assert_eq!(
        get(&gateway, &own, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::OK
    );

    // The provider rotates its key (restarted with a new signing key, the old one published).
    assert!(oidc.terminate(), "the provider did not stop cleanly");
    drop(oidc);
    let (oidc, _) = start_oidc(&dir, oidc_port, true);
    let rotated = provider_token(STU3_TENANT).await;
    let kid = |token: &str| -> String {
        let header = token.split('.').next().unwrap();
        let header: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap(),
        )
        .unwrap();
        header["kid"].as_str().unwrap().to_owned()
    };
    assert_ne!(kid(&first), kid(&rotated), "the provider did not rotate");
    tokio::time::sleep(Duration::from_millis(1100)).await; // the refetch cooldown
    let reply = get(&gateway, &rotated, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "rotated key not picked up: {}",
        reply.text()
    );

    // The provider goes down, and a fetch fails during the outage (a token naming a `kid`
    // nobody published, once the cooldown has passed): keys already fetched keep working,
    // `unused` verified with them for the first time.
    drop(oidc);
    tokio::time::sleep(Duration::from_millis(1100)).await; // the refetch cooldown
    let unknown_kid = mint(
        jsonwebtoken::Algorithm::ES256,
        Some("never-published"),
        &json!({"iss": issuer, "aud": "api://tower-fhir", "exp": now() + 600, "scope": STU3_TENANT}),
    );
    let reply = get(
        &gateway,
        &unknown_kid,
        "/Patient/p1",
        "application/fhir+json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    let logged = gateway.proc.stderr();
    assert!(
        logged.contains("could not fetch verification keys"),
        "no fetch failed during the outage:\n{logged}"
    );
    for token in [&unused, &first, &rotated] {
        let reply = get(&gateway, token, "/Patient/p1", "application/fhir+json").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // A forged token (the provider's issuer, another key) is still refused.
    let forged = mint(
        jsonwebtoken::Algorithm::ES256,
        Some(&kid(&first)),
        &json!({"iss": issuer, "aud": "api://tower-fhir", "exp": now() + 600, "scope": STU3_TENANT}),
    );
    assert_eq!(
        get(&gateway, &forged, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_admin_changes_and_a_restart() {
    let dir = scratch("restart");
    let (_fhir, root) = start_fhir(&dir, "hospital");
    let port = free_port();
    let config = config(&dir, port, &root, &root, None);
    let mut gateway = start_gateway(&dir, &config);
    let before_restart = access_token(&gateway, STU3_TENANT).await;

    // The client rotates its own secret: the old one stops working.
    let reply = gateway
        .client
        .send(
            "POST",
            "/oauth/clients/app/secret",
            &[FORM],
            &format!("client_secret={CLIENT_SECRET}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let rotated = reply.json()["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(
        token(&gateway, CLIENT_SECRET, STU3_TENANT).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token(&gateway, &rotated, STU3_TENANT).await.status,
        StatusCode::OK
    );

    // The admin API: refused without the admin token; onboard, then remove, tenants.
    let admin = [("authorization", format!("Bearer {ADMIN_TOKEN}"))];
    let admin: Vec<(&str, &str)> = admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let body = json!({"upstreams": [upstream(&root, "4_0_0", "4.0")]}).to_string();
    let reply = gateway
        .client
        .send(
            "PUT",
            &format!("/admin/tenants/{SLOW_TENANT}"),
            &[("authorization", "Bearer nope")],
            &body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Every admin route refuses without the admin token, before looking at anything else.
    for (method, path) in [
        ("DELETE", format!("/admin/tenants/{STU3_TENANT}")),
        ("GET", format!("/admin/tenants/{STU3_TENANT}")),
        ("PUT", "/admin/tenants/not-a-guid".to_owned()),
        ("POST", "/admin/clients/app/secret".to_owned()),
        ("DELETE", "/admin/clients/app/tokens".to_owned()),
        ("PUT", "/admin/clients/app".to_owned()),
        ("GET", "/admin/clients/app".to_owned()),
        ("DELETE", "/admin/clients/app".to_owned()),
    ] {
        let reply = gateway.client.send(method, &path, &[], "").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert!(reply.challenge().starts_with("Bearer"), "{method} {path}");
    }
    let mut with_credentials = upstream(&root, "4_0_0", "4.0");
    with_credentials["authorization"] = json!("Bearer upstream-secret-0123456789");
    let body = json!({"upstreams": [with_credentials]}).to_string();
    let reply = gateway
        .client
        .send(
            "PUT",
            &format!("/admin/tenants/{SLOW_TENANT}"),
            &admin,
            &body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    // The upstream's credentials are never shown back.
    assert_eq!(reply.json()["upstreams"][0]["authorization"], "<redacted>");
    let reply = gateway
        .client
        .send("GET", &format!("/admin/tenants/{SLOW_TENANT}"), &admin, "")
        .await;
    assert!(
        !reply.text().contains("upstream-secret"),
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["upstreams"][0]["authorization"], "<redacted>");
    let reply = gateway
        .client
        .send("PUT", "/admin/tenants/not-a-guid", &admin, &body)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = gateway
        .client
        .send(
            "PUT",
            &format!("/admin/tenants/{SLOW_TENANT}"),
            &admin,
            "{\"upstreams\": []}",
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // A base under another tenant's on the same server, or holding one, is refused: that
    // tenant's tokens would reach the other's data through the path. Nothing is saved.
    // Another spelling of the same host is the same server.
    let slow = format!("/admin/tenants/{SLOW_TENANT}");
    assert!(root.contains("//127.0.0.1:"), "{root}");
    let respelt = ["localhost", "127.1", "0x7f000001"].map(|host| root.replace("127.0.0.1", host));
    let cases = [
        (root.as_str(), "4_0_0/tenant-b", "4.0"),
        (root.as_str(), "", "3.0"),
        (respelt[0].as_str(), "4_0_0/tenant-b", "4.0"),
        (respelt[1].as_str(), "4_0_0/tenant-b", "4.0"),
        (respelt[2].as_str(), "", "3.0"),
    ];
    for (root, release, version) in cases {
        let body = json!({"upstreams": [upstream(root, release, version)]}).to_string();
        let reply = gateway.client.send("PUT", &slow, &admin, &body).await;
        assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .contains("lies under"),
            "{}",
            reply.text()
        );
    }
    let reply = gateway.client.send("GET", &slow, &admin, "").await;
    assert_eq!(
        reply.json()["upstreams"][0]["base_url"],
        format!("{root}/4_0_0"),
        "{}",
        reply.text()
    );
    let onboarded = {
        let reply = token(&gateway, &rotated, SLOW_TENANT).await;
        reply.json()["access_token"].as_str().unwrap().to_owned()
    };
    let reply = get(&gateway, &onboarded, "/Patient/p3", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(release_tag(&reply.json()), "4_0_0");
    let reply = gateway
        .client
        .send("DELETE", &format!("/admin/tenants/{R4_TENANT}"), &admin, "")
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let r4 = {
        let reply = token(&gateway, &rotated, R4_TENANT).await;
        reply.json()["access_token"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        get(&gateway, &r4, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // A tenant served in-process (by another service sharing the directory) is kept, shown and
    // changed like any other; this gateway, which proxies, answers its requests 502, saying so.
    let body = json!({"in_process": {"key": "r4-store", "fhir_versions": ["4.0"]},
                      "rate_limit": {"requests_per_second": 50, "burst": 50}})
    .to_string();
    let path = format!("/admin/tenants/{R4_TENANT}");
    let reply = gateway.client.send("PUT", &path, &admin, &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.json()["in_process"]["key"], "r4-store");
    let reply = gateway.client.send("GET", &path, &admin, "").await;
    assert_eq!(reply.json()["in_process"]["fhir_versions"], json!(["4.0"]));
    assert_eq!(reply.json()["rate_limit"]["burst"], 50);
    assert!(reply.json().get("upstreams").is_none());
    let reply = get(&gateway, &r4, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(
        reply.text().contains("served in-process"),
        "{}",
        reply.text()
    );
    let both = json!({"in_process": {"key": "r4-store", "fhir_versions": ["4.0"]},
                      "upstreams": [upstream(&root, "4_0_0", "4.0")]})
    .to_string();
    let reply = gateway.client.send("PUT", &path, &admin, &both).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.text().contains("not both"), "{}", reply.text());
    let reply = gateway.client.send("DELETE", &path, &admin, "").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);

    // An administrator resets the secret. A secret sent with it would not be the one set:
    // refused, nothing changed.
    let reply = gateway
        .client
        .send(
            "POST",
            "/admin/clients/app/secret",
            &admin,
            r#"{"client_secret": "chosen-by-the-administrator-0123"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("takes no body"), "{}", reply.text());
    assert_eq!(
        token(&gateway, &rotated, STU3_TENANT).await.status,
        StatusCode::OK
    );
    let reply = gateway
        .client
        .send("POST", "/admin/clients/app/secret", &admin, "{ }")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reset = reply.json()["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(
        token(&gateway, &rotated, STU3_TENANT).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The tokens taken with the old secrets are refused at once, not when they expire.
    for (held, path) in [
        (&before_restart, "/Patient/p1"),
        (&onboarded, "/Patient/p3"),
    ] {
        let reply = get(&gateway, held, path, "application/fhir+json").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    }
    let reply = after_cut_off(async || token_as(&gateway, "app", &reset, STU3_TENANT).await).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let leaked = reply.json()["access_token"].as_str().unwrap().to_owned();
    let reply = get(&gateway, &leaked, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A token leaked, not the secret: its tokens are refused, nothing else changes.
    let reply = gateway
        .client
        .send("DELETE", "/admin/clients/app/tokens", &admin, "")
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
    let reply = get(&gateway, &leaked, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    let reply = gateway
        .client
        .send("DELETE", "/admin/clients/nobody/tokens", &admin, "")
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    let reply = after_cut_off(async || token_as(&gateway, "app", &reset, STU3_TENANT).await).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the same secret: {}",
        reply.text()
    );
    let after_reset = reply.json()["access_token"].as_str().unwrap().to_owned();
    let reply = get(
        &gateway,
        &after_reset,
        "/Patient/p1",
        "application/fhir+json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // An administrator registers a second application, entitled to one tenant.
    let path = "/admin/clients/care-app";
    let body = json!({"tenants": [STU3_TENANT], "scopes": ["system/*.read"]}).to_string();
    let reply = gateway.client.send("PUT", path, &admin, &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "no-store");
    let created = reply.json();
    let care_secret = created["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(created["tenants"], json!([STU3_TENANT]));
    assert_eq!(created["tenants_not_onboarded"], json!([]));
    let reply = token_as(&gateway, "care-app", &care_secret, STU3_TENANT).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let care_stu3 = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        get(&gateway, &care_stu3, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        token_as(&gateway, "care-app", &care_secret, DSTU2_TENANT)
            .await
            .json()["error"],
        "invalid_scope"
    );
    // A change that leaves the client's scopes out would lift them without saying so (a
    // tenant-only token reads and writes everything): refused, nothing changed.
    let body =
        json!({"tenants": [DSTU2_TENANT, "0000aaaa-0000-4000-8000-00000000000a"]}).to_string();
    let reply = gateway.client.send("PUT", path, &admin, &body).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains("a PUT without \\\"scopes\\\" would lift that"),
        "{}",
        reply.text()
    );
    let reply = get(&gateway, &care_stu3, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A new customer: the application is entitled to its tenant too; the other one is taken
    // away, and its scopes lifted in so many words. New tokens follow at once; the secret
    // stays.
    let body =
        json!({"tenants": [DSTU2_TENANT, "0000aaaa-0000-4000-8000-00000000000a"], "scopes": []})
            .to_string();
    let reply = gateway.client.send("PUT", path, &admin, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let changed = reply.json();
    assert!(changed.get("client_secret").is_none(), "{changed}");
    assert_eq!(changed["scopes"], json!([]));
    assert_eq!(
        changed["tenants_not_onboarded"],
        json!(["0000aaaa-0000-4000-8000-00000000000a"])
    );
    // The token it holds for the tenant taken away is refused at once.
    let reply = get(&gateway, &care_stu3, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(
        token_as(&gateway, "care-app", &care_secret, STU3_TENANT)
            .await
            .json()["error"],
        "invalid_scope"
    );
    let reply =
        after_cut_off(async || token_as(&gateway, "care-app", &care_secret, DSTU2_TENANT).await)
            .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let care_dstu2 = reply.json()["access_token"].as_str().unwrap().to_owned();
    let reply = get(
        &gateway,
        &care_dstu2,
        "/Patient/p1",
        "application/fhir+json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A tenant given, none taken: the tokens it holds keep working, and a new one comes at once.
    let body =
        json!({"tenants": [DSTU2_TENANT, "0000aaaa-0000-4000-8000-00000000000a", STU3_TENANT]})
            .to_string();
    let reply = gateway.client.send("PUT", path, &admin, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = get(
        &gateway,
        &care_dstu2,
        "/Patient/p1",
        "application/fhir+json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = token_as(&gateway, "care-app", &care_secret, STU3_TENANT).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = gateway.client.send("GET", path, &admin, "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!reply.text().contains(&care_secret) && !reply.text().contains("argon2"));
    // The scheme in any case; a wrong token of the right length is still refused.
    let lower = format!("bearer {ADMIN_TOKEN}");
    let reply = gateway
        .client
        .send("GET", path, &[("authorization", lower.as_str())], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let wrong = format!("Bearer {}", "x".repeat(ADMIN_TOKEN.len()));
    let reply = gateway
        .client
        .send("GET", path, &[("authorization", wrong.as_str())], "")
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Refused: not GUIDs, a scope no request could name, a secret for a registered client, an
    // unknown field, a short provisioned secret; a revoked client cannot come back.
    for (body, status) in [
        (json!({"tenants": ["not-a-guid"]}), StatusCode::BAD_REQUEST),
        (
            json!({"tenants": [STU3_TENANT], "scopes": ["a b"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"tenants": [], "client_secret": "0123456789abcdefgh"}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"tenant": [STU3_TENANT]}), StatusCode::BAD_REQUEST),
    ] {
        let reply = gateway
            .client
            .send("PUT", path, &admin, &body.to_string())
            .await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
    }
    let short = json!({"tenants": [], "client_secret": "short"}).to_string();
    let reply = gateway
        .client
        .send("PUT", "/admin/clients/other-app", &admin, &short)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = gateway
        .client
        .send("PUT", "/admin/clients/a:b", &admin, "{\"tenants\": []}")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    // Revoked: no new tokens, and the one already issued is refused at once.
    assert_eq!(
        get(
            &gateway,
            &care_dstu2,
            "/Patient/p1",
            "application/fhir+json"
        )
        .await
        .status,
        StatusCode::OK
    );
    let reply = gateway
        .client
        .send("DELETE", "/admin/clients/nobody", &admin, "")
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = gateway.client.send("DELETE", path, &admin, "").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let tokens = format!("{path}/tokens");
    let reply = gateway.client.send("DELETE", &tokens, &admin, "").await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "a revoked client's tokens are refused already"
    );
    assert_eq!(
        token_as(&gateway, "care-app", &care_secret, DSTU2_TENANT)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let reply = get(
        &gateway,
        &care_dstu2,
        "/Patient/p1",
        "application/fhir+json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    let body = json!({"tenants": [DSTU2_TENANT]}).to_string();
    let reply = gateway.client.send("PUT", path, &admin, &body).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    let reply = gateway.client.send("GET", path, &admin, "").await;
    assert_eq!(reply.json()["revoked"], true);

    // A token its client revokes (RFC 7009) is refused.
    let revoked = after_cut_off(async || token_as(&gateway, "app", &reset, STU3_TENANT).await)
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let reply = gateway.client.revoke(&revoked, "app", &reset).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = get(&gateway, &revoked, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());

    // Restart: secrets, tenants and signing keys are as they were, and the revoked token, the
    // revoked client's tokens and those taken before the secret was reset are still refused.
    let log = gateway.proc.stderr();
    assert!(gateway.proc.terminate(), "the gateway did not stop cleanly");
    drop(gateway);
    let gateway = start_gateway(&dir, &config);
    for token in [&care_stu3, &care_dstu2, &revoked, &before_restart] {
        let reply = get(&gateway, token, "/Patient/p1", "application/fhir+json").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    }
    assert_eq!(
        token(&gateway, CLIENT_SECRET, STU3_TENANT).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token(&gateway, &rotated, STU3_TENANT).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        token(&gateway, &reset, STU3_TENANT).await.status,
        StatusCode::OK
    );
    let reply = get(
        &gateway,
        &after_reset,
        "/Patient/p1",
        "application/fhir+json",
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a token from before the restart: {}",
        reply.text()
    );
    assert_eq!(
        get(&gateway, &onboarded, "/Patient/p3", "application/fhir+json")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // A tenant removed before the restart is still not routed.
    let reply = token(&gateway, &reset, R4_TENANT).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let r4 = reply.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        get(&gateway, &r4, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // No secret reached the logs.
    let log = log + &gateway.proc.stderr();
    for secret in [
        CLIENT_SECRET,
        &rotated,
        &reset,
        ADMIN_TOKEN,
        &before_restart,
        &after_reset,
        &leaked,
        &onboarded,
        &care_secret,
        &care_stu3,
        &care_dstu2,
        "upstream-secret-0123456789",
    ] {
        assert!(!log.contains(secret), "a secret is in the gateway's log");
    }
    let state = std::fs::read_to_string(dir.join("state/clients.json")).unwrap();
    assert!(!state.contains(&reset), "a secret is stored in clear");
}

#[tokio::test]
async fn wrong_admin_tokens_get_their_address_429_and_only_theirs() {
    let dir = scratch("admin-throttle");
    // No upstream is contacted: nothing needs to listen there.
    let nowhere = "http://127.0.0.1:9";
    let gateway = start_gateway(&dir, &config(&dir, 0, nowhere, nowhere, None));
    let right = format!("Bearer {ADMIN_TOKEN}");
    let guesser = &gateway.client; // from 127.0.0.1
    let admin = gateway.client.connecting_from("127.0.0.2".parse().unwrap());
    let path = "/admin/clients/app";
    // Requests without a token guess nothing and count for nothing.
    for _ in 0..10 {
        assert_eq!(
            guesser.send("GET", path, &[], "").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    for i in 0..5 {
        let wrong = format!("Bearer wrong-admin-token-{i:04}");
        let reply = guesser
            .send("GET", path, &[("authorization", wrong.as_str())], "")
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    // The guessing address is refused now, the right token included, and told when to retry.
    for auth in [
        &[("authorization", "Bearer one-more-guess-0000")][..],
        &[("authorization", right.as_str())][..],
        &[][..],
    ] {
        let reply = guesser.send("GET", path, auth, "").await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.text()
        );
        // ceil(blocked until - now): 59 once a second has passed since the fifth guess.
        let retry = reply.headers["retry-after"].to_str().unwrap();
        assert!(matches!(retry, "59" | "60"), "retry-after {retry}");
        assert!(reply.json()["error"].is_string());
    }
    // The administrator, from another address, goes on.
    let reply = admin
        .send("GET", path, &[("authorization", right.as_str())], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["client_id"], "app");
    // The rest of the gateway does not care: the guessing address still gets tokens.
    let reply = token(&gateway, CLIENT_SECRET, STU3_TENANT).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let log = gateway.proc.stderr();
    assert!(log.contains("too many wrong admin tokens"), "{log}");
    assert!(!log.contains(ADMIN_TOKEN), "the admin token is in the log");
    // The address itself, not Rust's `Some(...)` around it.
    for says in [
        "too many wrong admin tokens",
        "missing or wrong admin token",
    ] {
        let line = log.lines().find(|line| line.contains(says)).unwrap();
        assert!(
            line.contains("127.0.0.1") && !line.contains("Some("),
            "{line}"
        );
    }
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_throttles_count_the_client_it_names() {
    let right = format!("Bearer {ADMIN_TOKEN}");
    let path = "/admin/clients/app";
    let nowhere = "http://127.0.0.1:9";
    // Two clients behind one balancer (one peer address), named in X-Forwarded-For.
    let send = |gateway: &Gateway, client: &'static str, auth: String| {
        let client_headers = [
            ("x-forwarded-for", client),
            ("authorization", auth.as_str()),
        ]
        .map(|(k, v)| (k, v.to_owned()));
        let gateway_client = gateway.client.clone();
        async move {
            let headers: Vec<(&str, &str)> = client_headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            gateway_client.send("GET", path, &headers, "").await
        }
    };
    // Not read at all; read from the balancer's network (loopback here); read only from
    // another network, so not from this peer.
    for (case, peers, other_client_served) in [
        ("off", None, false),
        ("trusted", Some("127.0.0.0/8"), true),
        ("elsewhere", Some("10.0.0.0/8"), false),
    ] {
        let trusted = case;
        let dir = scratch(&format!("balancer-{case}"));
        let mut config = config(&dir, 0, nowhere, nowhere, None);
        if let Some(peers) = peers {
            config["client_address_header"] = json!("x-forwarded-for");
            config["client_address_trusted_peers"] = json!([peers]);
        }
        let gateway = start_gateway(&dir, &config);
        for i in 0..5 {
            let reply = send(
                &gateway,
                "203.0.113.5",
                format!("Bearer wrong-{i:04}-guess"),
            )
            .await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "guess {i}");
        }
        let guesser = send(&gateway, "203.0.113.5", right.clone()).await;
        assert_eq!(guesser.status, StatusCode::TOO_MANY_REQUESTS);
        // Another client behind the same balancer: counted apart only when the gateway reads
        // the balancer's header (otherwise anybody could name any address there).
        let other = send(&gateway, "198.51.100.7", right.clone()).await;
        let expected = if other_client_served {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(
            other.status,
            expected,
            "trusted {trusted}: {}",
            other.text()
        );
        drop(gateway);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_missing_short_or_spaced_admin_token_keeps_the_gateway_from_starting() {
    let dir = scratch("admin-token");
    for token in ["", "short", "sixteen chars with spaces"] {
        let file = dir.join("gateway.json");
        // Port 0: were the token taken, the gateway would listen on a port of its own, not
        // one `free_port` may have picked for another test's gateway at the same moment.
        let config = json!({
            "listen": "127.0.0.1:0",
            "state_dir": dir.join("state"),
            "admin_token": token,
        });
        std::fs::write(&file, config.to_string()).unwrap();
        let out = Command::new(GATEWAY)
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with admin_token {token:?}");
        assert!(
            stderr.contains("admin_token must be at least 16"),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_mid_run_and_a_graceful_shutdown() {
    let dir = scratch("faults");
    let (_fhir, root) = start_fhir(&dir, "hospital-a");
    let (mut doomed, doomed_root) = start_fhir(&dir, "hospital-b");
    let slow = RecordingUpstream::start().await;
    slow.answer(
        "/slow/Patient",
        Answer {
            delay: Duration::from_millis(1500),
            ..Answer::json(json!({"resourceType": "Patient", "id": "slow"}))
        },
    );
    let mut config = config(&dir, 0, &root, &doomed_root, None);
    config["tenants"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": SLOW_TENANT, "upstreams": [{"base_url": slow.base("/slow"), "fhir_version": "3.0"}]}));
    let mut gateway = start_gateway(&dir, &config);
    let r4 = access_token(&gateway, R4_TENANT).await;
    let stu3 = access_token(&gateway, STU3_TENANT).await;
    assert_eq!(
        get(&gateway, &r4, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::OK
    );

    assert!(doomed.terminate());
    let reply = get(&gateway, &r4, "/Patient/p1", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    assert_eq!(
        get(&gateway, &stu3, "/Patient/p1", "application/fhir+json")
            .await
            .status,
        StatusCode::OK
    );

    // SIGTERM while a request is in flight: it finishes, then the gateway exits cleanly.
    let token = access_token(&gateway, SLOW_TENANT).await;
    let client = gateway.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .get(
                "/Patient/1",
                &[("authorization", &format!("Bearer {token}"))],
            )
            .await
    });
    // In flight once the upstream has it (recorded before its 1.5 s delay).
    let deadline = Instant::now() + Duration::from_secs(10);
    while slow.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the request never reached the slow upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = tokio::task::spawn_blocking(move || gateway.proc.terminate());
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(stopped.await.unwrap(), "the gateway did not exit cleanly");
}
