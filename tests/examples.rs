//! The library's examples run as a user runs them (`cargo run --example NAME -- --listen ...`)
//! and driven over loopback HTTP: `bearer`, `axum`, `hyper` and `fhir_server`.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use http::StatusCode;
use support::*;

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An example binary `cargo test` built beside this test.
fn example_binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(n, _)| n == name) {
        return path.clone();
    }
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe().unwrap();
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join(&file);
    let path = if is_fresh(&beside) {
        beside
    } else {
        // Run alone (`cargo test --test e2e`), the examples are not built (or are older than
        // the sources): build this one in a target directory of its own (the outer cargo holds
        // the usual one).
        let target = manifest_dir().join("target/e2e");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", name, "--target-dir"])
            .arg(&target)
            .current_dir(manifest_dir())
            .status()
            .unwrap();
        assert!(status.success(), "could not build the {name} example");
        target.join("debug/examples").join(&file)
    };
    built.push((name.to_owned(), path.clone()));
    path
}

/// Whether `binary` exists and is newer than every source it is built from.
fn is_fresh(binary: &Path) -> bool {
    fn newest(path: &Path) -> std::time::SystemTime {
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        match std::fs::read_dir(path) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| newest(&e.path()))
                .fold(modified, std::cmp::max),
            Err(_) => modified,
        }
    }
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return false;
    };
    ["src", "examples", "Cargo.toml"]
        .iter()
        .all(|source| newest(&manifest_dir().join(source)) <= built)
}

/// Starts an example with `--listen 127.0.0.1:0`; returns it and a client for its address.
fn start_example(dir: &Path, name: &str, ready_prefix: &str) -> (Proc, TestClient) {
    let mut command = Command::new(example_binary(name));
    command.args(["--listen", "127.0.0.1:0"]);
    let (proc, base) = Proc::start(command, dir.join(format!("{name}.log")), ready_prefix);
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    (proc, TestClient::new(addr))
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

async fn client_token(client: &TestClient, id: &str, secret: &str, tenant: &str) -> String {
    let reply = client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}&scope={tenant}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_axum_example_hands_its_handlers_the_tenant_and_claims() {
    let dir = scratch("axum-example");
    let (_proc, client) = start_example(&dir, "axum", "axum example listening on ");
    assert_eq!(client.get("/metadata", &[]).await.status, StatusCode::OK);
    assert_eq!(
        client.get("/Patient/42", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let tenant = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    let token = client_token(&client, "axum-demo", "axum-demo-secret-0123456789", tenant).await;
    // As the example prints it: no release named (R4 then), and then naming one.
    let bearer = format!("Bearer {token}");
    let reply = client
        .get("/Patient/42", &[("authorization", bearer.as_str())])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["meta"]["tag"][2]["code"], "4.0.1");
    let statement = client.get("/metadata", &[]).await.json();
    assert_eq!(statement["fhirVersion"], "4.0.1");
    let reply = get_with(
        &client,
        &token,
        "/Patient/42",
        "application/fhir+json; fhirVersion=3.0",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let tags = reply.json()["meta"]["tag"].clone();
    assert_eq!(tags[0]["code"], tenant);
    assert_eq!(tags[1]["code"], "axum-demo");
    assert_eq!(tags[2]["code"], "3.0.2");
    assert_eq!(
        client.get("/.well-known/jwks.json", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hyper_example_serves_the_whole_gateway() {
    let dir = scratch("hyper-example");
    let (_proc, client) = start_example(&dir, "hyper", "hyper example listening on ");
    let reply = client.get("/metadata", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let token = client_token(
        &client,
        "hyper-demo",
        "hyper-demo-secret-0123456789",
        "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f",
    )
    .await;
    let reply = get_with(&client, &token, "/Patient/example", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["name"][0]["family"], "Chalmers");
    let reply = get_with(&client, &token, "/Patient/missing", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        client.get("/Patient/example", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fhir_server_example_keeps_tenants_apart_in_each_clients_release() {
    const CONTOSO: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    const FABRIKAM: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
    let dir = scratch("fhir-server-example");
    let (_proc, client) = start_example(
        &dir,
        "fhir_server",
        "tower-fhir in-process FHIR server listening on ",
    );
    // Tokens from the token endpoint, through the layer over the application's router.
    let dstu2 = client_token(&client, "dstu2-app", "dstu2-app-secret-0123456789", CONTOSO).await;
    let r4 = client_token(&client, "r4-app", "r4-app-secret-0123456789", FABRIKAM).await;
    let r4_contoso = client_token(&client, "r4-app", "r4-app-secret-0123456789", CONTOSO).await;

    // The DSTU2 client reads Contoso's patient, in DSTU2.
    let reply = get_with(&client, &dstu2, "/Patient/100", "application/json+fhir").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["name"][0]["family"], "Patient of contoso");
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json+fhir"));
    // Fabrikam's patient is not in Contoso's store.
    let reply = get_with(&client, &dstu2, "/Patient/101", "application/json+fhir").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");

    // The R4 client reads Fabrikam's, in R4; Contoso's is not there.
    let fhir_r4 = "application/fhir+json; fhirVersion=4.0";
    let reply = get_with(&client, &r4, "/Patient/101", fhir_r4).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], fhir_r4);
    assert_eq!(
        get_with(&client, &r4, "/Patient/100", fhir_r4).await.status,
        StatusCode::NOT_FOUND
    );
    // Fabrikam serves R4 only: DSTU2 asked of it by name is refused before the handler.
    assert_eq!(
        get_with(
            &client,
            &r4,
            "/Patient/101",
            "application/fhir+json; fhirVersion=1.0"
        )
        .await
        .status,
        StatusCode::NOT_ACCEPTABLE
    );

    // A create lands in the tenant's own store, and its search sees it; the other's does not.
    let created = client
        .send(
            "POST",
            "/Patient",
            &[
                ("authorization", &format!("Bearer {r4}")),
                ("content-type", "application/fhir+json"),
            ],
            r#"{"resourceType": "Patient", "name": [{"family": "New at Fabrikam"}]}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let search = get_with(&client, &r4, "/Patient", fhir_r4).await;
    assert_eq!(search.json()["total"], 2);
    assert_eq!(search.json()["meta"]["tag"][0]["code"], FABRIKAM);
    let search = get_with(&client, &r4_contoso, "/Patient", fhir_r4).await;
    assert_eq!(search.json()["total"], 1);
    let refused = client
        .send(
            "POST",
            "/Patient",
            &[("authorization", &format!("Bearer {r4}"))],
            "not json",
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);

    // No token, no data; the metadata stays open.
    assert_eq!(
        client.get("/Patient/100", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(client.get("/metadata", &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_example_lets_its_demo_token_in_and_nothing_else() {
    let dir = scratch("bearer-example");
    let (mut proc, client) =
        start_example(&dir, "bearer", "tower-fhir bearer example listening on ");
    // The token is printed on the line after "demo token ...", indented.
    let token = format!("eyJ{}", proc.wait_for("  eyJ"));
    assert_eq!(client.get("/metadata", &[]).await.status, StatusCode::OK);
    let reply = get_with(&client, &token, "/Patient/example", "application/fhir+json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let missing = client.get("/Patient/example", &[]).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert!(missing.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    // One signature character changed: verification, not decoding, refuses it.
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let middle = signature.len() / 2;
    let swapped = if &signature[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    let tampered = format!(
        "{signed}.{}{swapped}{}",
        &signature[..middle],
        &signature[middle + 1..]
    );
    let reply = get_with(
        &client,
        &tampered,
        "/Patient/example",
        "application/fhir+json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    assert_eq!(reply.json()["resourceType"], "OperationOutcome");
}
