//! Tokens from a token endpoint: fetched again before they expire, once, in the background.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LOADGEN: &str = env!("CARGO_BIN_EXE_fhir-loadgen");

mod common;

/// A keep-alive server with a slow token endpoint (`POST /oauth/token`: 300 ms, tokens that
/// live 2 s) counting its token requests, and a FHIR endpoint answering `200 {}`.
fn server(token_requests: Arc<AtomicUsize>) -> String {
    let addr = common::keep_alive_server(move |head| {
        if head.starts_with("post /oauth/token") {
            token_requests.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            let body = r#"{"access_token":"t0ken","token_type":"Bearer","expires_in":2}"#;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec()
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_token_is_fetched_again_once_before_it_expires_not_by_every_connection() {
    let token_requests = Arc::new(AtomicUsize::new(0));
    let base = server(Arc::clone(&token_requests));
    let out = Command::new(LOADGEN)
        .args(["--target", &format!("{base}/fhir"), "--path", "/Patient/1"])
        .args(["--token-url", &format!("{base}/oauth/token")])
        .args([
            "--client-id",
            "app",
            "--client-secret",
            "s3cret-s3cret-s3cret",
        ])
        .args(["--tenants", "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"])
        .args([
            "--duration",
            "4",
            "--warmup",
            "0.5",
            "--connections",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error_count"], 0, "{report:#}");
    // The first, then one about every 1.6 s (80% of 2 s) over 4.5 s: 4 at most. Every
    // connection fetching its own when the token is due would make 8 or more at each turn.
    let fetched = token_requests.load(Ordering::SeqCst);
    assert!((2..=4).contains(&fetched), "{fetched} token requests");
}

#[test]
fn another_gateways_scope_client_authentication_and_headers() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = Arc::clone(&seen);
    let addr = common::keep_alive_server_with_bodies(move |head, body| {
        log.lock()
            .unwrap()
            .push(format!("{head}\n\n{}", String::from_utf8_lossy(body)));
        if head.starts_with("post /token") {
            let body = r#"{"access_token":"t0ken","token_type":"Bearer","expires_in":3600}"#;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()
        }
    });
    let base = format!("http://{addr}");
    let out = Command::new(LOADGEN)
        .args(["--target", &format!("{base}/fhir"), "--path", "/Patient/1"])
        .args([
            "--token-url",
            &format!("{base}/token"),
            "--client-auth",
            "basic",
        ])
        .args(["--client-id", "app", "--client-secret", "s3cret:with&odd"])
        .args(["--scope", "api://fhir/.default {tenant}"])
        .args(["--tenants", "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"])
        .args([
            "--header",
            "Ocp-Apim-Subscription-Key: k3y",
            "--header",
            "Prefer: handling=strict",
        ])
        .args([
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--connections",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let seen = seen.lock().unwrap();
    let token = seen
        .iter()
        .find(|r| r.starts_with("post /token"))
        .expect("a token request");
    // RFC 6749 §2.3.1: `app:s3cret%3Awith%26odd`, base64; nothing of the client in the form.
    assert!(
        token.contains("authorization: basic yxbwonmzy3jldcuzqxdpdgglmjzvzgq="),
        "{token}"
    );
    let form = token.split("\n\n").nth(1).unwrap();
    assert_eq!(
        form,
        "grant_type=client_credentials&scope=api%3A%2F%2Ffhir%2F.default%204d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"
    );
    let read = seen
        .iter()
        .find(|r| r.starts_with("get /fhir/patient/1"))
        .expect("a read");
    assert!(read.contains("ocp-apim-subscription-key: k3y"), "{read}");
    assert!(read.contains("prefer: handling=strict"), "{read}");
    assert!(read.contains("authorization: bearer t0ken"), "{read}");
}
