//! The fixed parts of `benches/compare.sh`: `cargo run --release -p fhir-loadgen --bin bench_servers -- MODE`.
//!
//! - `upstream --listen ADDR`: a FHIR server that answers every request at once with the same
//!   small Patient (HTTP/1.1 and HTTP/2), so what is measured in front of it is the proxy.
//! - `passthrough --listen ADDR --upstream URL`: the least a Rust proxy can do, the baseline
//!   the gateway is held to: hyper server, pooled hyper-util client, the request forwarded as
//!   it came (method, path and query, headers but `Host`, streamed body), nothing checked.
//!
//! Both run as many tokio workers as the CPUs they may use (pin them with `taskset`).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// mimalloc, as the gateway binary uses: the upstream and the pass-through then spend on
/// allocation what the gateway does, and a comparison measures the HTTP work, not two
/// allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PATIENT: &str = r#"{"resourceType":"Patient","id":"123","meta":{"versionId":"1","lastUpdated":"2026-11-01T09:30:00Z"},"identifier":[{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"12345"}],"name":[{"family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25"}"#;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let mode = args
        .next()
        .ok_or("usage: bench_servers upstream|passthrough --listen ADDR [--upstream URL]")?;
    let mut listen: SocketAddr = "127.0.0.1:9001".parse()?;
    let mut upstream: Option<String> = None;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?.parse()?,
            "--upstream" => upstream = Some(args.next().ok_or("--upstream needs a URL")?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{mode} listening on http://{}", listener.local_addr()?);
    match mode.as_str() {
        "upstream" => loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    // Read what was sent, as a real server would.
                    let _ = request.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/fhir+json")
                            .body(Full::new(Bytes::from_static(PATIENT.as_bytes())))
                            .expect("a valid response"),
                    )
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        },
        "passthrough" => {
            let upstream: Uri = upstream
                .ok_or("passthrough needs --upstream URL")?
                .parse()?;
            let authority = upstream
                .authority()
                .ok_or("--upstream needs a host")?
                .clone();
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<HttpConnector, Incoming> =
                Client::builder(TokioExecutor::new()).build(connector);
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let (client, authority) = (client.clone(), authority.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (client, authority) = (client.clone(), authority.clone());
                        async move {
                            let (mut parts, body) = request.into_parts();
                            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                            parts.uri = format!("http://{authority}{target}")
                                .parse()
                                .expect("a valid URI");
                            parts.headers.remove(http::header::HOST);
                            parts.version = http::Version::HTTP_11;
                            let response = match client
                                .request(Request::from_parts(parts, body))
                                .await
                            {
                                Ok(response) => response.map(|b| b.map_err(BoxError::from).boxed()),
                                Err(_) => Response::builder()
                                    .status(502)
                                    .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
                                    .expect("a valid response"),
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
        other => Err(format!("unknown mode {other}").into()),
    }
}
