//! The secrets in `state_dir` sealed with `TOWER_FHIR_KEY_ENCRYPTION_KEY`, over real HTTP
//! through the gateway binary: a state written in clear is sealed at the first start with the
//! key (the upstreams' credentials in `tenants.json`, the private keys in
//! `signing-keys.json`), a credential onboarded through the admin API is written sealed,
//! proxied requests carry the opened credential, a token issued before a restart still
//! verifies after it; without the key, with another one, or with one that is no key, the
//! gateway refuses to start and names the variable.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
/// Onboarded through the admin API.
const ONBOARDED: &str = "7b3e9a10-2c4d-4e5f-8a6b-0c1d2e3f4a5b";
const CREDENTIAL: &str = "Bearer sealed-state-upstream-credential-0123456789";
const ONBOARDED_CREDENTIAL: &str = "Bearer sealed-state-onboarded-credential-9876543210";
const SECRET: &str = "sealed-state-client-secret-0123456789";
const ADMIN: &str = "sealed-state-admin-token-0123456789";
const KEK: &str = "c2VhbGVkLXN0YXRlLWtleS1lbmNyeXB0aW9uLWtleSE=";
const OTHER_KEK: &str = "YW5vdGhlci1rZXktZW5jcnlwdGlvbi1rZXktMzJieXQ=";
const ENV: &str = "TOWER_FHIR_KEY_ENCRYPTION_KEY";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

/// The configuration: one tenant whose upstream (at `/tenant` on `upstream`) takes
/// [`CREDENTIAL`], the client `app` for it and for [`ONBOARDED`], the admin API, the state in
/// `dir/state`.
fn config(dir: &Path, upstream: &RecordingUpstream) -> Value {
    json!({
        "state_dir": dir.join("state"),
        "admin_token": ADMIN,
        "public_base_url": "https://gateway.example",
        "clients": [{"client_id": "app", "client_secret": SECRET, "tenants": [TENANT, ONBOARDED]}],
        "tenants": [{
            "id": TENANT,
            "upstreams": [{
                "base_url": upstream.base("/tenant"),
                "fhir_version": "4.0",
                "authorization": CREDENTIAL
            }]
        }],
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    })
}

/// The gateway command on `dir/gateway.json`, listening on port 0, with `kek` as its
/// key-encryption key (none for `None`) and no database URL from this environment.
fn command(dir: &Path, config: &Value, kek: Option<&str>) -> Command {
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env_remove("TOWER_FHIR_DATABASE_URL");
    match kek {
        Some(kek) => command.env(ENV, kek),
        None => command.env_remove(ENV),
    };
    command
}

/// A gateway started as [`command`] says, its log in `dir/{name}.log`.
fn start(dir: &Path, name: &str, config: &Value, kek: Option<&str>) -> (Proc, TestClient, String) {
    let log = dir.join(format!("{name}.log"));
    let (proc, base) = Proc::start(
        command(dir, config, kek),
        log.clone(),
        "tower-fhir gateway listening on ",
    );
    let client = TestClient::new(base.trim_start_matches("http://").parse().unwrap());
    (proc, client, log.display().to_string())
}

/// What a gateway that must refuse to start said (its stderr), once it has exited, failing.
fn refused(dir: &Path, config: &Value, kek: Option<&str>) -> String {
    let mut child = command(dir, config, kek)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(!status.success(), "started: {said}");
    said
}

async fn token(client: &TestClient, tenant: &str) -> String {
    let reply = client
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!(
                "grant_type=client_credentials&client_id=app&client_secret={SECRET}&scope={tenant}"
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"].as_str().unwrap().to_owned()
}

/// A read with `token` reaches `upstream` with `credential` as its `Authorization`.
async fn reaches(client: &TestClient, upstream: &RecordingUpstream, token: &str, credential: &str) {
    let read = client.get_bearer("/Patient/1", token).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let received = upstream.last();
    assert_eq!(
        received.headers.get("authorization").unwrap(),
        credential,
        "{}",
        received.target
    );
}

/// The state files, read: neither the credentials nor a private key in clear.
fn assert_sealed(dir: &Path) {
    let state = dir.join("state");
    let tenants = std::fs::read_to_string(state.join("tenants.json")).unwrap();
    let keys = std::fs::read_to_string(state.join("signing-keys.json")).unwrap();
    for file in [&tenants, &keys] {
        assert!(!file.contains("credential-0123456789"), "{file}");
        assert!(!file.contains("credential-9876543210"), "{file}");
        assert!(!file.contains("PRIVATE KEY"), "{file}");
    }
    assert!(tenants.contains("authorization_sealed"), "{tenants}");
    assert!(keys.contains("pem_sealed"), "{keys}");
    #[cfg(unix)]
    for file in ["tenants.json", "signing-keys.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file}: {mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_state_dir_are_sealed_with_the_key_encryption_key() {
    let dir = scratch("sealed-state");
    let upstream = RecordingUpstream::start().await;
    let config = config(&dir, &upstream);

    // A first start without the key: the state in clear, as before.
    let (mut clear, client, log) = start(&dir, "clear", &config, None);
    let before = token(&client, TENANT).await;
    reaches(&client, &upstream, &before, CREDENTIAL).await;
    let tenants = std::fs::read_to_string(dir.join("state/tenants.json")).unwrap();
    assert!(tenants.contains(CREDENTIAL), "{tenants}");
    let keys = std::fs::read_to_string(dir.join("state/signing-keys.json")).unwrap();
    assert!(keys.contains("PRIVATE KEY"), "{keys}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("sealed with"), "{said}");
    assert!(clear.terminate());

    // With the key: sealed at start; the token issued before still verifies, and the
    // upstream still gets its credential.
    let (mut sealed, client, log) = start(&dir, "sealed", &config, Some(KEK));
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("secrets in state_dir sealed with TOWER_FHIR_KEY_ENCRYPTION_KEY"),
        "{said}"
    );
    assert_sealed(&dir);
    reaches(&client, &upstream, &before, CREDENTIAL).await;
    let issued = token(&client, TENANT).await;
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    // A tenant onboarded through the admin API is written sealed.
    let onboarded = client
        .send(
            "PUT",
            &format!("/admin/tenants/{ONBOARDED}"),
            &[
                ("authorization", &format!("Bearer {ADMIN}")),
                ("content-type", "application/json"),
            ],
            &json!({"upstreams": [{
                "base_url": upstream.base("/onboarded"),
                "fhir_version": "4.0",
                "authorization": ONBOARDED_CREDENTIAL
            }]})
            .to_string(),
        )
        .await;
    assert!(onboarded.status.is_success(), "{}", onboarded.text());
    assert_sealed(&dir);
    let for_onboarded = token(&client, ONBOARDED).await;
    reaches(&client, &upstream, &for_onboarded, ONBOARDED_CREDENTIAL).await;
    assert!(sealed.terminate());

    // Restarted with the same key: the tokens issued before verify, the credentials open.
    let (mut again, client, _) = start(&dir, "again", &config, Some(KEK));
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    reaches(&client, &upstream, &for_onboarded, ONBOARDED_CREDENTIAL).await;
    assert_sealed(&dir);
    assert!(again.terminate());
    let state = std::fs::read(dir.join("state/tenants.json")).unwrap();

    // Without the key, with another, with one that is no key: refused, the variable named,
    // nothing written.
    let said = refused(&dir, &config, None);
    assert!(said.contains(ENV), "no key: {said}");
    let said = refused(&dir, &config, Some(OTHER_KEK));
    assert!(said.contains(ENV), "another key: {said}");
    assert!(said.contains("does not open"), "another key: {said}");
    let said = refused(&dir, &config, Some("c2hvcnQ="));
    assert!(said.contains(ENV), "no key at all: {said}");
    assert_eq!(
        std::fs::read(dir.join("state/tenants.json")).unwrap(),
        state
    );
    assert_sealed(&dir);

    // `--check-config` refuses a key that is no key, as the start does.
    let file = dir.join("gateway.json");
    let checked = Command::new(GATEWAY)
        .arg("--check-config")
        .arg(&file)
        .env("RUST_LOG", "off")
        .env(ENV, "c2hvcnQ=")
        .env_remove("TOWER_FHIR_DATABASE_URL")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success(), "{said}");
    assert!(said.contains(ENV), "{said}");

    // The key still opens everything after the refusals.
    let (mut last, client, _) = start(&dir, "last", &config, Some(KEK));
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    assert!(last.terminate());
    std::fs::remove_dir_all(&dir).unwrap();
}
