//! `https://` upstreams through rustls, against a TLS server with a certificate made here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;
use tower_fhir::auth::HttpJwks;
use tower_fhir::proxy::FhirProxy;
use tower_fhir::route::Upstream;
use tower_fhir::tenant::TenantId;
use tower_fhir::version::FhirVersion;

/// A TLS FHIR server for `localhost` (HTTP/1.1: it offers no ALPN); returns its port and its
/// certificate (PEM).
async fn tls_upstream() -> (u16, String) {
    let (port, cert, _) = counting_tls_upstream(false).await;
    (port, cert)
}

/// [`tls_upstream`], and the connections it accepted so far. With `keeps_open`, it answers
/// every request `200` and keeps the connection open, whatever the request's `Connection`
/// says (as a server that answers before reading a body may).
async fn counting_tls_upstream(keeps_open: bool) -> (u16, String, Arc<AtomicUsize>) {
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = certified.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                if keeps_open {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut held = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                        held.extend_from_slice(&buffer[..n]);
                        while let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                            held.drain(..end + 4);
                            let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 26\r\n\r\n{\"resourceType\":\"Patient\"}";
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                    return;
                }
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let body = format!(
                            "{{\"resourceType\":\"Patient\",\"id\":\"tls\",\"path\":\"{}\"}}",
                            req.uri().path()
                        );
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/fhir+json")
                                .body(Full::<Bytes>::from(body))
                                .unwrap(),
                        )
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, cert_pem, connections)
}

/// A proxy that trusts `cert_pem` (the test server's certificate) besides the usual roots.
fn trusting(cert_pem: String) -> FhirProxy {
    FhirProxy::builder("https://gateway.test")
        .root_certificates_pem(cert_pem)
        .build()
        .unwrap()
}

async fn get_through(proxy: FhirProxy, port: u16) -> (StatusCode, String) {
    get_for(proxy, port, None).await
}

/// A `GET` through `proxy` to the upstream on `port`, for `tenant` (as the tenant layer
/// says it).
async fn get_for(proxy: FhirProxy, port: u16, tenant: Option<TenantId>) -> (StatusCode, String) {
    let upstream =
        Upstream::parse(&format!("https://localhost:{port}/fhir"), FhirVersion::R4).unwrap();
    let mut request = Request::get("/Patient/tls")
        .body(Full::<Bytes>::default())
        .unwrap();
    request.extensions_mut().insert(upstream);
    if let Some(tenant) = tenant {
        request.extensions_mut().insert(tenant);
    }
    let response = proxy.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_https_upstream_with_a_trusted_root_is_reached() {
    let (port, cert_pem) = tls_upstream().await;
    let proxy = trusting(cert_pem);
    let (status, body) = get_through(proxy, port).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"path\":\"/fhir/Patient/tls\""), "{body}");
}

/// An HTTP/1.1 connection carries one tenant's requests: an upstream answering out of turn
/// could not give one tenant another's answer.
#[tokio::test]
async fn tenants_never_share_an_https_connection() {
    let (port, cert_pem, connections) = counting_tls_upstream(false).await;
    let proxy = trusting(cert_pem);
    let a: TenantId = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
    let b: TenantId = "9b2e1c3d-0000-4000-8000-00000000000b".parse().unwrap();
    for tenant in [a, b, a, b, a] {
        let (status, body) = get_for(proxy.clone(), port, Some(tenant)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one a tenant, each kept"
    );
    // A request with a body leaves its connection to close: the next opens another.
    let upstream =
        Upstream::parse(&format!("https://localhost:{port}/fhir"), FhirVersion::R4).unwrap();
    let mut post = Request::post("/Patient")
        .header("content-type", "application/fhir+json")
        .body(Full::<Bytes>::from(r#"{"resourceType":"Patient"}"#))
        .unwrap();
    post.extensions_mut().insert(upstream);
    post.extensions_mut().insert(a);
    let response = proxy.clone().oneshot(post).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let (status, body) = get_for(proxy.clone(), port, Some(a)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

/// A server that keeps a connection open after a request with a body, whatever the request
/// said, may have left the body unread: the gateway does not use that connection again.
#[tokio::test]
async fn an_https_connection_that_carried_a_body_is_not_used_again_whatever_the_server_says() {
    let (port, cert_pem, connections) = counting_tls_upstream(true).await;
    let proxy = trusting(cert_pem);
    let upstream =
        Upstream::parse(&format!("https://localhost:{port}/fhir"), FhirVersion::R4).unwrap();
    for _ in 0..2 {
        // The server reads heads only: the body's bytes wait as the start of a next head.
        let mut post = Request::post("/Patient")
            .header("content-type", "application/fhir+json")
            .body(Full::<Bytes>::from("{}"))
            .unwrap();
        post.extensions_mut().insert(upstream.clone());
        let response = proxy.clone().oneshot(post).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2, "one a write");
    // Reads reuse theirs.
    for _ in 0..2 {
        let (status, body) = get_through(proxy.clone(), port).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_bad_gateway() {
    let (port, _) = tls_upstream().await;
    let proxy = FhirProxy::builder("https://gateway.test").build().unwrap();
    let (status, body) = get_through(proxy, port).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
}

#[test]
fn https_jwks_urls_are_accepted_and_bad_roots_refused() {
    assert!(HttpJwks::new("https://idp.example/.well-known/jwks.json").is_ok());
    assert!(HttpJwks::with_roots(
        "https://idp.example/jwks",
        &[b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec()]
    )
    .is_err());
    assert!(FhirProxy::builder("https://gw")
        .root_certificates_pem("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
        .build()
        .is_err());
    // A document with no certificate in it (a key file, or the wrong file) trusts nothing:
    // refused rather than taken silently.
    for nothing in ["", "not a certificate\n"] {
        assert!(FhirProxy::builder("https://gw")
            .root_certificates_pem(nothing)
            .build()
            .is_err());
        assert!(HttpJwks::with_roots("https://idp.example/jwks", &[nothing.into()]).is_err());
    }
}
