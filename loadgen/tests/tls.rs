//! `https://` targets and token URLs, against a real TLS server on loopback (rustls, with a
//! throwaway certificate for `localhost`): HTTP/1.1 and HTTP/2 by ALPN, the certificate
//! trusted with `--ca-file`, refused without it, and taken unchecked with `--insecure`.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const LOADGEN: &str = env!("CARGO_BIN_EXE_fhir-loadgen");
const TOKEN: &str = "t0ken-over-tls";

/// What the server saw.
#[derive(Default)]
struct Seen {
    http1: AtomicUsize,
    http2: AtomicUsize,
    tokens_issued: AtomicUsize,
    refused: AtomicUsize,
}

/// A TLS server for `localhost` (HTTP/1.1 and HTTP/2 by ALPN): `POST /token` issues [`TOKEN`],
/// anything else answers `200 {}` to a request bearing it and `401` otherwise. Its address, the
/// certificate's PEM, and what it saw.
async fn server() -> (SocketAddr, String, Arc<Seen>) {
    server_offering(&[b"h2", b"http/1.1"]).await
}

/// [`server`], agreeing to the protocols `alpn` only.
async fn server_offering(alpn: &[&[u8]]) -> (SocketAddr, String, Arc<Seen>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let certificate = made.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certificate], key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counted = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&counted));
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to serve.
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move { Ok::<_, std::convert::Infallible>(answer(&request, &seen)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, made.cert.pem(), seen)
}

fn answer(request: &Request<Incoming>, seen: &Seen) -> Response<Full<Bytes>> {
    match request.version() {
        Version::HTTP_2 => seen.http2.fetch_add(1, Ordering::Relaxed),
        _ => seen.http1.fetch_add(1, Ordering::Relaxed),
    };
    if request.uri().path() == "/token" {
        seen.tokens_issued.fetch_add(1, Ordering::Relaxed);
        let body =
            format!(r#"{{"access_token":"{TOKEN}","token_type":"Bearer","expires_in":3600}}"#);
        return Response::new(Full::from(body));
    }
    let bearer = format!("Bearer {TOKEN}");
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == bearer.as_bytes());
    let (status, body) = if authorized {
        (200, "{}")
    } else {
        seen.refused.fetch_add(1, Ordering::Relaxed);
        (401, "")
    };
    Response::builder()
        .status(status)
        .body(Full::from(body))
        .unwrap()
}

/// The load generator run for 1 s against `addr`'s `/fhir` with `extra`, its tokens from the
/// server's token endpoint (unless `extra` gives one), off the runtime.
async fn run(addr: SocketAddr, extra: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let base = format!("https://localhost:{}", addr.port());
        let mut command = Command::new(LOADGEN);
        command
            .args(["--target", &format!("{base}/fhir"), "--path", "/Patient/1"])
            .args(["--duration", "1", "--warmup", "0", "--connections", "2"])
            .args(["--timeout", "5", "--json"]);
        if !extra.iter().any(|arg| arg == "--bearer") {
            command
                .args(["--token-url", &format!("{base}/token")])
                .args(["--client-id", "loadgen", "--client-secret", "s3cret"]);
        }
        command.args(extra).output().unwrap()
    })
    .await
    .unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error_count"], 0, "{report:#}");
    assert_eq!(report["non_2xx"], 0, "{report:#}");
    assert!(report["answered"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["tls"], true, "{report:#}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_targets_and_token_urls_with_a_ca_file_in_http1_and_http2() {
    let (addr, certificate, seen) = server().await;
    let dir = std::env::temp_dir().join(format!("fhir-loadgen-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &certificate).unwrap();
    let ca = ca.display().to_string();

    let out = run(addr, vec!["--ca-file".into(), ca.clone()]).await;
    let answered = report(&out)["answered"].as_u64().unwrap();
    assert_eq!(report(&out)["protocol"], "http/1.1");
    assert!(seen.http1.load(Ordering::Relaxed) as u64 > answered);
    assert_eq!(seen.http2.load(Ordering::Relaxed), 0);
    assert_eq!(seen.tokens_issued.load(Ordering::Relaxed), 1);

    let out = run(addr, vec!["--ca-file".into(), ca, "--http2".into()]).await;
    let answered = report(&out)["answered"].as_u64().unwrap();
    assert_eq!(report(&out)["protocol"], "h2");
    assert!(seen.http2.load(Ordering::Relaxed) as u64 >= answered);
    assert_eq!(seen.tokens_issued.load(Ordering::Relaxed), 2);
    assert_eq!(seen.refused.load(Ordering::Relaxed), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_unless_insecure() {
    let (addr, _, seen) = server().await;
    // Not trusted: the token endpoint is not reached, and the run says why.
    let out = run(addr, vec![]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not get tokens"), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert_eq!(seen.tokens_issued.load(Ordering::Relaxed), 0);
    // Nor is the target: one connection tries, and the run stops before it starts.
    let out = run(addr, vec!["--bearer".into(), TOKEN.into()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot speak TLS to the target"),
        "{stderr}"
    );
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(seen.http1.load(Ordering::Relaxed), 0);

    // `--insecure`: the same server is used, unchecked.
    let out = run(addr, vec!["--insecure".into()]).await;
    report(&out);
    assert_eq!(seen.tokens_issued.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_from_a_server_that_does_not_agree_to_it_stops_the_run() {
    for alpn in [&[b"http/1.1".as_slice()][..], &[]] {
        let (addr, _, seen) = server_offering(alpn).await;
        let out = run(addr, vec!["--insecure".into(), "--http2".into()]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("cannot speak TLS to the target"),
            "{stderr}"
        );
        assert_eq!(seen.http2.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn a_ca_file_and_insecure_together_are_refused() {
    let out = Command::new(LOADGEN)
        .args([
            "--target",
            "https://localhost:1/fhir",
            "--insecure",
            "--ca-file",
            "x.pem",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--ca-file or --insecure, not both"),
        "{stderr}"
    );
}

#[test]
fn a_ca_file_that_holds_no_certificate_is_an_error_before_the_run() {
    let file = std::env::temp_dir().join(format!("fhir-loadgen-noca-{}.pem", std::process::id()));
    std::fs::write(&file, "not a certificate\n").unwrap();
    let out = Command::new(LOADGEN)
        .args(["--target", "https://localhost:1/fhir", "--ca-file"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no CERTIFICATE in it"), "{stderr}");
}
