//! The whole gateway on a plain hyper 1 server, no axum: `cargo run --example hyper`.
//!
//! `tower_fhir::gateway::Gateway` (every layer, the proxy and the token routes) served with
//! hyper-util's connection builder (HTTP/1.1 and HTTP/2) and a graceful shutdown on Ctrl-C.
//! Its one tenant's upstream is a tiny FHIR server started in-process, also plain hyper.
//! Prints the demo client's credentials and curl commands that work as printed.
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8084`).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tower_fhir::gateway::Gateway;
use tower_fhir::proxy::ClientAddr;
use tower_fhir::route::{InMemoryDirectory, TenantRecord, Upstream};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const CLIENT_ID: &str = "hyper-demo";
const CLIENT_SECRET: &str = "hyper-demo-secret-0123456789";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut listen: SocketAddr = "127.0.0.1:8084".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let upstream = start_upstream().await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let base = format!("http://{}", listener.local_addr()?);

    let directory = InMemoryDirectory::new();
    directory.upsert(
        TenantId::parse(TENANT)?,
        TenantRecord::new([Upstream::parse(&upstream, FhirVersion::R4)?]).ok_or("no upstream")?,
    );
    let clients = InMemoryClientStore::new();
    clients
        .register(
            NewClient::new(CLIENT_ID)
                .secret(CLIENT_SECRET)
                .tenant(TenantId::parse(TENANT)?),
        )
        .await?;
    let gateway = Gateway::builder(&base)
        .directory(directory)
        .token_endpoint(
            TokenEndpoint::builder()
                .issuer(&base)
                .audience("tower-fhir")
                .store(clients)
                .build()?,
        )
        .build()?;

    println!("hyper example listening on {base}");
    println!("  tenant {TENANT} -> {upstream} (R4)");
    println!("demo client: client_id {CLIENT_ID}, client_secret {CLIENT_SECRET}");
    println!("try:");
    println!("  curl -s {base}/metadata");
    println!("  TOKEN=$(curl -s -u {CLIENT_ID}:{CLIENT_SECRET} -d grant_type=client_credentials -d scope={TENANT} {base}/oauth/token | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" {base}/Patient/example");

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                // Name the client in Forwarded / X-Forwarded-For.
                let service = tower::ServiceBuilder::new()
                    .map_request(move |mut request: Request<Incoming>| {
                        request.extensions_mut().insert(ClientAddr(peer));
                        request
                    })
                    .service(gateway.clone());
                let connection = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                });
            }
            _ = &mut ctrl_c => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A one-resource R4 server on a loopback port; returns its base URL.
async fn start_upstream() -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/r4", listener.local_addr()?);
    let answer_base = base.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let base = answer_base.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let body = match request.uri().path() {
                    "/r4/Patient/example" => json!({"resourceType": "Patient", "id": "example",
                        "name": [{"family": "Chalmers", "given": ["Peter"]}]}),
                    "/r4/metadata" => json!({"resourceType": "CapabilityStatement",
                        "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
                        "format": ["json"], "implementation": {"url": base}}),
                    path => {
                        json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                        "code": "not-found", "diagnostics": format!("{path} is not here")}]})
                    }
                };
                let status = if body["resourceType"] == "OperationOutcome" {
                    404
                } else {
                    200
                };
                std::future::ready(Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/fhir+json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("a valid response"),
                ))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(base)
}
