//! TLS on the gateway's listener (`tls_certificate_file`, `tls_private_key_file`), over real
//! TCP against the real binary: HTTP/1.1 and HTTP/2 (ALPN) through the whole flow, a plain
//! HTTP client and a handshake that never comes, a renewed certificate read on SIGHUP and one
//! that cannot be used, and the keys' checks at start. Every wait is bounded.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use support::{scratch, Proc, RecordingUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "71500000-0000-4000-8000-000000000015";
const SECRET: &str = "tls-client-secret-0123456789";

/// A self-signed certificate for `localhost`, and its key.
struct Pair {
    certificate: String,
    key: String,
    der: Vec<u8>,
}

fn pair() -> Pair {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Pair {
        certificate: made.cert.pem(),
        key: made.signing_key.serialize_pem(),
        der: made.cert.der().to_vec(),
    }
}

/// Writes `text` to `path` as a renewal does: a new file renamed over the old.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(next, path).unwrap();
}

/// The gateway with TLS from `pair`, a client and a tenant on `upstream`, and `keys` added.
fn start(name: &str, pair: &Pair, upstream: &RecordingUpstream, keys: Value) -> Gateway {
    let dir = scratch(&format!("tls-{name}"));
    let (certificate, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&certificate, &pair.certificate).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    let mut config = json!({
        "listen": "127.0.0.1:0",
        "state_dir": dir.join("state"),
        "tls_certificate_file": certificate,
        "tls_private_key_file": key,
        "clients": [{"client_id": "app", "client_secret": SECRET, "tenants": [TENANT]}],
        "tenants": [{"id": TENANT, "upstreams": [
            {"base_url": upstream.base("/fhir"), "fhir_version": "4.0"}]}],
        "secret_hashing": {"memory_kib": 8, "iterations": 1}
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(keys.as_object().unwrap().clone());
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info,tower_fhir_gateway=debug");
    let (proc, base) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    let addr = base
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("{base}: not https"))
        .parse()
        .unwrap();
    Gateway {
        proc,
        addr,
        certificate,
        key,
    }
}

/// [`start`], with `metrics_listen` on a port of its own: the gateway and that port.
///
/// Port 0, the port read from what the start says: a port picked by `free_port` could be
/// picked for another test's gateway at the same moment, and one of the two would fail to
/// start.
fn start_with_metrics(
    name: &str,
    pair: &Pair,
    upstream: &RecordingUpstream,
    mut keys: Value,
) -> (Gateway, u16) {
    keys["metrics_listen"] = json!("127.0.0.1:0");
    let gateway = start(name, pair, upstream, keys);
    let port = gateway.proc.metrics_address().port();
    (gateway, port)
}

struct Gateway {
    proc: Proc,
    addr: SocketAddr,
    certificate: PathBuf,
    key: PathBuf,
}

/// A TLS connection to `addr` trusting `trusted` only, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    trusted: &Pair,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.der.clone().into()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("the handshake is answered")
}

/// Sends `request` over `stream` (HTTP/2 when ALPN chose `h2`): status and body.
async fn send(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    request: http::Request<Full<Bytes>>,
) -> (u16, Value) {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        let mut request = request;
        *request.version_mut() = http::Version::HTTP_2;
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn get(path: &str, token: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::get(format!("https://localhost{path}"))
        .header("host", "localhost")
        .header("accept", "application/fhir+json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(Full::default()).unwrap()
}

async fn token(gateway: &Gateway, pair: &Pair) -> String {
    let form = format!(
        "grant_type=client_credentials&client_id=app&client_secret={SECRET}&scope={TENANT}"
    );
    let request = http::Request::post("https://localhost/oauth/token")
        .header("host", "localhost")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::from(form))
        .unwrap();
    let stream = connect(gateway.addr, pair, &[b"http/1.1"]).await.unwrap();
    let (status, body) = send(stream, request).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// The server's certificate on a fresh connection.
async fn served_certificate(gateway: &Gateway, trusted: &Pair) -> std::io::Result<Vec<u8>> {
    let stream = connect(gateway.addr, trusted, &[]).await?;
    Ok(stream.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// A public base written `http://` while the gateway serves TLS sends clients to plain HTTP:
/// the start says so at `warn`; `https://` is not warned of.
#[test]
fn an_http_public_base_under_tls_is_warned_of() {
    let pair = pair();
    for (base, warned) in [
        ("http://gateway.example", true),
        ("https://gateway.example", false),
    ] {
        let dir = scratch(&format!("tls-base-{warned}"));
        let (certificate, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&certificate, &pair.certificate).unwrap();
        std::fs::write(&key, &pair.key).unwrap();
        let config = json!({
            "listen": "127.0.0.1:0",
            "state_dir": dir.join("state"),
            "public_base_url": base,
            "tls_certificate_file": certificate,
            "tls_private_key_file": key,
        });
        let file = dir.join("gateway.json");
        std::fs::write(&file, config.to_string()).unwrap();
        let mut command = Command::new(GATEWAY);
        command.arg("--config").arg(&file).env("RUST_LOG", "warn");
        let (mut proc, _) = Proc::start(
            command,
            dir.join("gateway.log"),
            "tower-fhir gateway listening on ",
        );
        let log = proc.stderr();
        assert_eq!(
            log.contains("public_base_url is http:// while the gateway serves TLS"),
            warned,
            "{base}: {log}"
        );
        proc.terminate();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_a_client_gets_a_token_and_reads_over_http1_and_http2() {
    let upstream = RecordingUpstream::start().await;
    let pair = pair();
    let gateway = start("flow", &pair, &upstream, json!({}));

    // The statement names the token endpoint at the https:// base.
    let stream = connect(gateway.addr, &pair, &[b"http/1.1"]).await.unwrap();
    let (status, statement) = send(stream, get("/metadata", None)).await;
    assert_eq!(status, 200, "{statement}");
    let text = statement.to_string();
    assert!(
        text.contains(&format!("https://{}/oauth/token", gateway.addr)),
        "{text}"
    );

    let token = token(&gateway, &pair).await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let stream = connect(gateway.addr, &pair, &[alpn]).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        let (status, body) = send(stream, get("/Patient/1", Some(&token))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["resourceType"], "Patient");
    }
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    assert!(received.iter().all(|r| r.target == "/fhir/Patient/1"));
    // The upstream is told the client came over https.
    let proto = received[0].headers.get("x-forwarded-proto").unwrap();
    assert_eq!(proto, "https");

    // A token without TLS's protection is no use to an eavesdropper who cannot connect
    // without it: plain HTTP on the TLS port gets no HTTP answer, and the connection ends.
    let mut plain = TcpStream::connect(gateway.addr).await.unwrap();
    plain
        .write_all(b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
        .await
        .expect("plain HTTP on the TLS port is closed, not left open");
    let _ = read;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_never_finishes_its_handshake_is_closed_after_the_header_read_timeout() {
    let upstream = RecordingUpstream::start().await;
    let pair = pair();
    let (gateway, metrics) = start_with_metrics(
        "handshake",
        &pair,
        &upstream,
        json!({"header_read_timeout_seconds": 1}),
    );
    // One sends nothing; the other the first bytes of a ClientHello, then nothing.
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    let mut half = TcpStream::connect(gateway.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let began = Instant::now();
    for stream in [&mut silent, &mut half] {
        let mut rest = Vec::new();
        // Ended (closed, or reset) within 10 s, with nothing sent back.
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await
            .expect("closed within 10 s");
        assert!(rest.is_empty(), "{rest:?}");
    }
    assert!(began.elapsed() >= Duration::from_millis(900));
    // Meanwhile and after, others are served.
    let stream = connect(gateway.addr, &pair, &[]).await.unwrap();
    assert_eq!(send(stream, get("/metadata", None)).await.0, 200);

    let page = metrics_page(metrics).await;
    let line = page
        .lines()
        .find(|line| {
            line.starts_with(
                "tower_fhir_connections_closed_total{reason=\"tls_handshake_timeout\"}",
            )
        })
        .unwrap_or_else(|| panic!("{page}"));
    assert!(line.ends_with(" 2"), "{line}");
}

/// `GET /metrics` on `port`, over plain HTTP.
async fn metrics_page(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut page))
        .await
        .unwrap()
        .unwrap();
    page
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_serves_a_renewed_certificate_and_keeps_the_one_in_use_when_the_new_one_is_unusable()
{
    let upstream = RecordingUpstream::start().await;
    let first = pair();
    let mut gateway = start("renew", &first, &upstream, json!({}));
    assert_eq!(
        served_certificate(&gateway, &first).await.unwrap(),
        first.der
    );
    // A connection made before the renewal, kept open across it.
    let before = connect(gateway.addr, &first, &[b"http/1.1"]).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(before))
        .await
        .unwrap();
    tokio::spawn(connection);

    let second = pair();
    replace(&gateway.certificate, &second.certificate);
    replace(&gateway.key, &second.key);
    assert!(gateway.proc.signal("HUP"));
    wait_for_log(&gateway, "SIGHUP: TLS certificate read again", 1).await;
    assert_eq!(
        served_certificate(&gateway, &second).await.unwrap(),
        second.der
    );
    assert!(
        connect(gateway.addr, &first, &[]).await.is_err(),
        "the old certificate is no longer served"
    );

    // Half a renewal: a certificate whose key has not come. Refused, the last one kept.
    let third = pair();
    replace(&gateway.certificate, &third.certificate);
    assert!(gateway.proc.signal("HUP"));
    wait_for_log(&gateway, "the TLS certificate cannot be used", 1).await;
    assert_eq!(
        served_certificate(&gateway, &second).await.unwrap(),
        second.der
    );
    // The connection from before the renewals still serves.
    let response = sender.send_request(get("/metadata", None)).await.unwrap();
    assert_eq!(response.status(), 200);
    // And the gateway is still running: the signal ended nothing.
    assert!(matches!(gateway.proc.child.try_wait(), Ok(None)));
    assert!(gateway.proc.terminate());
}

/// Waits up to 10 s for the gateway's log to hold `text` `times` times.
async fn wait_for_log(gateway: &Gateway, text: &str, times: usize) {
    let began = Instant::now();
    while gateway.proc.stderr().matches(text).count() < times {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "no {text:?} logged:\n{}",
            gateway.proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn tls_keys_that_cannot_be_used_stop_the_start_and_the_check_and_say_why() {
    let dir = scratch("tls-refused");
    let (one, other) = (pair(), pair());
    let certificate = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let other_key = dir.join("other-key.pem");
    std::fs::write(&certificate, &one.certificate).unwrap();
    std::fs::write(&key, &one.key).unwrap();
    std::fs::write(&other_key, &other.key).unwrap();
    let cases = [
        (
            json!({"tls_certificate_file": certificate}),
            "tls_certificate_file and tls_private_key_file go together",
        ),
        (
            json!({"tls_certificate_file": certificate, "tls_private_key_file": other_key}),
            "cannot serve tls_certificate_file",
        ),
        (
            json!({"tls_certificate_file": dir.join("missing.pem"), "tls_private_key_file": key}),
            "cannot read",
        ),
    ];
    for (n, (keys, said)) in cases.into_iter().enumerate() {
        let mut config =
            json!({"listen": "127.0.0.1:0", "state_dir": dir.join(format!("state-{n}"))});
        config
            .as_object_mut()
            .unwrap()
            .extend(keys.as_object().unwrap().clone());
        let file = dir.join(format!("gateway-{n}.json"));
        std::fs::write(&file, config.to_string()).unwrap();
        for check in [false, true] {
            let flag = if check { "--check-config" } else { "--config" };
            let output = Command::new(GATEWAY).arg(flag).arg(&file).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{flag} {keys}: {stderr}");
            assert!(stderr.contains(said), "{flag} {keys}: {stderr}");
            assert!(
                !String::from_utf8_lossy(&output.stdout).contains("listening on"),
                "{flag} {keys}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_a_client_that_stops_reading_is_dropped_after_the_idle_timeout() {
    let upstream = RecordingUpstream::start().await;
    // 8 MiB: far more than the socket buffers and rustls's own hold.
    let big = format!(
        "{{\"resourceType\":\"Binary\",\"id\":\"big\",\"data\":\"{}\"}}",
        "A".repeat(8 << 20)
    );
    upstream.answer(
        "/fhir/Binary",
        support::Answer {
            status: http::StatusCode::OK,
            headers: vec![("content-type".into(), "application/fhir+json".into())],
            body: big,
            delay: Duration::ZERO,
        },
    );
    let pair = pair();
    let (gateway, metrics) = start_with_metrics(
        "stalled",
        &pair,
        &upstream,
        json!({"idle_timeout_seconds": 1}),
    );
    let token = token(&gateway, &pair).await;
    let mut stream = connect(gateway.addr, &pair, &[b"http/1.1"]).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /Binary/big HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Then reads nothing more: dropped within a few idle timeouts.
    let began = Instant::now();
    let stalled = "tower_fhir_connections_closed_total{reason=\"stalled\"} 1";
    while !metrics_page(metrics).await.contains(stalled) {
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "not dropped: {}",
            metrics_page(metrics).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What it still gets is cut short of the 8 MiB.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(rest.len() < 8 << 20, "{} bytes", rest.len());
}

/// An HTTPS FHIR server for `localhost` with `pair`'s certificate (HTTP/1.1), answering every
/// request with a Patient; its port.
async fn tls_fhir_upstream(pair: &Pair) -> u16 {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pair.der.clone().into()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_: http::Request<_>| async {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/fhir+json")
                            .body(Full::<Bytes>::from(
                                r#"{"resourceType":"Patient","id":"private-ca"}"#,
                            ))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// `upstream_ca_file`: a hospital's HTTPS server whose certificate chains to its private CA
/// is reached with that CA's PEM; without it, `502`, and the log says why (the certificate,
/// not only "client error (Connect)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_of_a_private_ca_is_reached_with_upstream_ca_file() {
    let hospital = pair();
    let port = tls_fhir_upstream(&hospital).await;
    let unused = RecordingUpstream::start().await;
    let ca = scratch("tls-private-ca").join("hospital-ca.pem");
    std::fs::write(&ca, &hospital.certificate).unwrap();
    let tenants = json!([{"id": TENANT, "upstreams": [
        {"base_url": format!("https://localhost:{port}/fhir"), "fhir_version": "4.0"}]}]);
    for (case, keys, expected) in [
        ("untrusted", json!({"tenants": tenants}), 502),
        (
            "trusted",
            json!({"tenants": tenants, "upstream_ca_file": ca}),
            200,
        ),
    ] {
        let pair = pair();
        let gateway = start(&format!("private-ca-{case}"), &pair, &unused, keys);
        let token = token(&gateway, &pair).await;
        let stream = connect(gateway.addr, &pair, &[b"http/1.1"]).await.unwrap();
        let (status, body) = send(stream, get("/Patient/1", Some(&token))).await;
        assert_eq!(status, expected, "{case}: {body}");
        if expected == 200 {
            assert_eq!(body["id"], "private-ca");
        } else {
            let log = gateway.proc.stderr();
            assert!(
                log.contains("upstream request failed") && log.contains("invalid peer certificate"),
                "{case}: {log}"
            );
        }
    }
    // A file that cannot be read stops the check, saying which.
    let dir = scratch("tls-private-ca-missing");
    let file = dir.join("gateway.json");
    let config = json!({"listen": "127.0.0.1:0", "state_dir": dir.join("state"),
                        "upstream_ca_file": dir.join("missing.pem")});
    std::fs::write(&file, config.to_string()).unwrap();
    // Missing, then there but holding no certificate: each named by the key.
    for (contents, says) in [
        (None, "cannot read upstream_ca_file"),
        (Some("not a certificate"), "holds no PEM certificate"),
    ] {
        if let Some(contents) = contents {
            std::fs::write(dir.join("missing.pem"), contents).unwrap();
        }
        let checked = Command::new(GATEWAY)
            .arg("--check-config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!checked.status.success());
        let said = String::from_utf8_lossy(&checked.stderr);
        assert!(said.contains(says), "{said}");
    }
}
