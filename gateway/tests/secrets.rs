//! What the gateway binary keeps to itself, over HTTP: upstream credentials out of its log
//! whatever `RUST_LOG` asks, its audit records out of files it did not open, and a client
//! from being given another tenant as a scope.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::postgres::Postgres;
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const OTHER: &str = "7b3e9a10-2c4d-4e5f-8a6b-0c1d2e3f4a5b";
const SECRET: &str = "secrets-client-secret-0123456789";
const ADMIN: &str = "secrets-admin-token-0123456789";
const CREDENTIAL: &str = "Bearer secrets-upstream-credential-0123456789";
const KEK: &str = "cmVwbGljYXMtc2hhcmUtdGhpcy0zMi1ieXRlLWtleSE=";

fn start(dir: &Path, config: Value, env: &[(&str, &str)]) -> (Proc, TestClient) {
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command.arg("--config").arg(&file).env("RUST_LOG", "info");
    for (name, value) in env {
        command.env(name, value);
    }
    let (proc, base) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    (proc, TestClient::new(addr))
}

fn config(dir: &Path, upstream: &RecordingUpstream) -> Value {
    // Port 0, the address read from the start line: a port picked by `free_port` could be
    // picked for another test's gateway at the same moment, and with `SO_REUSEPORT` both
    // would take it and share its connections.
    json!({
        "listen": "127.0.0.1:0",
        "state_dir": dir.join("state"),
        "admin_token": ADMIN,
        "clients": [{"client_id": "app", "client_secret": SECRET, "tenants": [TENANT]}],
        "tenants": [{"id": TENANT, "upstreams": [{"base_url": upstream.base("/fhir"),
                     "fhir_version": "4.0", "authorization": CREDENTIAL}]}],
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    })
}

/// The audit writer reopens whatever is at its path once a second when the file was moved or
/// deleted: a link planted there by anyone who may write to the directory is followed, and
/// the records are appended to the file it names (as root, any file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_never_written_through_a_link_planted_at_its_path() {
    let dir = scratch("secrets-audit-link");
    let upstream = RecordingUpstream::start().await;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let audit = logs.join("audit.jsonl");
    let victim = dir.join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    let mut settings = config(&dir, &upstream);
    settings["audit_log"] = json!(audit);
    let (_proc, client) = start(&dir, settings, &[]);
    assert_eq!(client.get("/metadata", &[]).await.status, StatusCode::OK);
    // Someone who may write to the log directory moves the log aside and plants a link.
    std::fs::rename(&audit, logs.join("moved.jsonl")).unwrap();
    std::os::unix::fs::symlink(&victim, &audit).unwrap();
    for _ in 0..30 {
        client.get("/metadata", &[]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "untouched\n",
        "audit records were appended through a planted link"
    );
}

/// A tenant GUID registered as one of a client's scopes is copied into every token the client
/// gets for its own tenant: a token naming two tenants, one the client is not entitled to
/// (introspection reports it in `scope`). Registration should refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_be_registered_with_another_tenant_as_a_scope() {
    let dir = scratch("secrets-guid-scope");
    let upstream = RecordingUpstream::start().await;
    let (_proc, client) = start(&dir, config(&dir, &upstream), &[]);
    let auth = format!("Bearer {ADMIN}");
    let reply = client
        .send(
            "PUT",
            "/admin/clients/smuggler",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &json!({"tenants": [TENANT], "scopes": [OTHER]}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
}

/// With `RUST_LOG=debug` (what an operator sets first), tokio-postgres's `log` records reach
/// the log through tracing's `log` bridge, and they print every statement's parameters: a
/// tenant's upstream `authorization` in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_hold_no_upstream_credential_with_a_database() {
    let dir = scratch("secrets-debug-logs");
    let Some(server) = Postgres::start_or_skip(
        "secrets",
        "debug_logs_hold_no_upstream_credential_with_a_database",
    ) else {
        return;
    };
    server.create_database("gateway");
    let upstream = RecordingUpstream::start().await;
    let mut settings = config(&dir, &upstream);
    settings.as_object_mut().unwrap().remove("state_dir");
    settings["database_url"] = json!(server.url("gateway"));
    settings["public_base_url"] = json!("https://gateway.example");
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&settings).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "debug")
        .env("TOWER_FHIR_KEY_ENCRYPTION_KEY", KEK);
    let (proc, base) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let client = TestClient::new(addr);
    let auth = format!("Bearer {ADMIN}");
    let body = json!({"upstreams": [{"base_url": upstream.base("/other"), "fhir_version": "4.0",
                                     "authorization": CREDENTIAL}]});
    let reply = client
        .send(
            "PUT",
            &format!("/admin/tenants/{OTHER}"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &body.to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let logs = proc.stderr();
    drop(proc);
    assert!(
        !logs.contains("secrets-upstream-credential"),
        "an upstream credential is in the log"
    );
}
