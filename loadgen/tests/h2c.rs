//! `--http2` on an `http://` target (h2c, HTTP/2 with prior knowledge): a server speaking it
//! is driven in HTTP/2; one speaking HTTP/1.1 only stops the run before it starts, said why,
//! instead of thousands of "http2 error"s counted as the target's.

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

mod common;

/// A plain-TCP server speaking HTTP/1.1 and h2c (by the client's preface), answering `200 {}`;
/// its address, and how many HTTP/2 requests it saw.
async fn h2c_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let http2 = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&http2);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let http2 = Arc::clone(&counted);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    if request.version() == Version::HTTP_2 {
                        http2.fetch_add(1, Ordering::Relaxed);
                    }
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from("{}")))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, http2)
}

/// The load generator run with `--http2` for 1 s against `target`, off the runtime.
async fn run(target: String) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(LOADGEN)
            .args(["--target", &target, "--path", "/Patient/1", "--http2"])
            .args(["--duration", "1", "--warmup", "0", "--connections", "2"])
            .args(["--timeout", "5", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_server_is_driven_in_http2() {
    let (addr, http2) = h2c_server().await;
    let out = run(format!("http://{addr}/fhir")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["protocol"], "h2c", "{report:#}");
    assert_eq!(report["error_count"], 0, "{report:#}");
    let answered = report["answered"].as_u64().unwrap();
    assert!(answered > 0, "{report:#}");
    assert!(http2.load(Ordering::Relaxed) as u64 >= answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_server_stops_an_http2_run_before_it_starts() {
    let addr = common::keep_alive_server(|_| {
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
    });
    let out = run(format!("http://{addr}/fhir")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("cannot speak HTTP/2 to the target: it answered HTTP/2's connection preface in HTTP/1 (\"HTTP/1.1 400 Bad Request\")"),
        "{stderr}"
    );
    assert!(stderr.contains("drop --http2"), "{stderr}");
    assert!(out.stdout.is_empty());
}
