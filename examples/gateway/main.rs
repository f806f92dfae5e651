//! The multi-tenant FHIR gateway: `cargo run --release --example gateway [-- --config FILE]`.
//!
//! Without `--config` it runs an embedded demo: two small hospital FHIR servers in-process (one
//! DSTU2, one STU3) onboarded as two tenants, a demo client entitled to both, and an admin
//! token; it prints the demo credentials and curl commands that work as printed. With
//! `--config FILE` (a JSON file, every key documented in the README) it serves the clients,
//! tenants and identity providers the file names, keeping its state under `state_dir`.
//!
//! Routes: FHIR at the root of the public base URL (version negotiation, unauthenticated
//! `metadata`, bearer validation, tenant from the token's scope, cached routing, the proxy);
//! `POST /oauth/token`; `GET /.well-known/jwks.json`; `GET /.well-known/smart-configuration`;
//! `POST /oauth/clients/{client_id}/secret`; with an `admin_token`, `PUT`/`GET`/`DELETE
//! /admin/tenants/{id}`, `PUT`/`GET`/`DELETE /admin/clients/{client_id}` (register a client or
//! change its tenants and scopes, read, revoke) and `POST /admin/clients/{client_id}/secret`.
//!
//! Options: `--config FILE`, `--listen ADDR` (overrides the file's `listen`). Logs go to stderr
//! (`RUST_LOG=tower_fhir=debug` shows the gateway's decisions); secrets never appear in them.
//! SIGTERM or Ctrl-C stops it after in-flight requests finish.

mod admin;
mod config;
mod demo_fhir;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::convert::Infallible;

use axum::Router;
use bytes::Bytes;
use futures::future;
use http::Request;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tower::{Service, ServiceExt};
use tower_fhir::auth::BearerAuthLayer;
use tower_fhir::gateway::Gateway;
use tower_fhir::proxy::{ClientAddr, FhirProxy};
use tower_fhir::route::{FileDirectory, TenantUpstreams, Upstream};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    ClientStore, FileClientStore, NewClient, SecretHashing, SigningKeys, TokenEndpoint,
};
use tower_fhir::version::FhirVersion;

use config::{ClientConfig, Config, LogFormat, TenantConfig};

/// Contoso General (DSTU2) and Fabrikam Clinic (STU3), as customers' directory tenants.
const TENANT_DSTU2: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const TENANT_STU3: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const DEMO_CLIENT: &str = "demo-app";
const DEMO_SECRET: &str = "demo-secret-change-me-0123456789";
const DEMO_ADMIN_TOKEN: &str = "demo-admin-token-change-me";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut config_file: Option<PathBuf> = None;
    let mut listen: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--config" => config_file = Some(args.next().ok_or("--config needs a file")?.into()),
            "--listen" => listen = Some(args.next().ok_or("--listen needs an address")?.parse()?),
            "--help" | "-h" => {
                println!("usage: gateway [--config FILE] [--listen ADDR]");
                return Ok(());
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let demo = config_file.is_none();
    let mut config = match &config_file {
        Some(path) => Config::load(path)?,
        None => demo_config().await?,
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        );
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let local = listener.local_addr()?;
    let base = config
        .public_base_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"))
        .trim_end_matches('/')
        .to_owned();
    let state_dir = match &config.state_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tower-fhir-gateway-{}", std::process::id())),
    };
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| format!("state_dir {}: {e}", state_dir.display()))?;

    let directory = FileDirectory::open(state_dir.join("tenants.json"))?;
    if !directory.existed() {
        directory.upsert_all(
            config
                .tenants
                .iter()
                .map(|TenantConfig { id, upstreams }| (*id, upstreams.clone())),
        )?;
    }
    let hashing = match config.secret_hashing {
        Some(cost) => SecretHashing::new(cost.memory_kib, cost.iterations)?,
        None => SecretHashing::default(),
    };
    let clients = FileClientStore::open_with_hashing(state_dir.join("clients.json"), hashing)?;
    register_clients(&clients, &config.clients).await?;
    let keys = SigningKeys::open(state_dir.join("signing-keys.json"))?;
    let issuer = config.token.issuer.clone().unwrap_or_else(|| base.clone());
    let endpoint = TokenEndpoint::builder()
        .issuer(&issuer)
        .audience(config.token.audience.as_deref().unwrap_or("tower-fhir"))
        .store(clients.clone())
        .signing_keys(keys)
        .default_lifetime(Duration::from_secs(
            config.token.ttl_seconds.unwrap_or(3600),
        ))
        .build()?;

    let mut auth = BearerAuthLayer::builder().refetch_cooldown(Duration::from_secs(
        config.jwks_refetch_cooldown_seconds.max(1),
    ));
    for trusted in &config.trusted_issuers {
        auth = auth
            .jwks_url_for_issuer(&trusted.jwks_uri, &trusted.issuer)
            .audience_for_issuer(&trusted.issuer, &trusted.audience);
    }
    let gateway = Gateway::builder(&base)
        .directory(directory.clone())
        .follow(directory.subscribe())
        .token_endpoint(endpoint.clone())
        .auth(auth)
        .proxy(
            FhirProxy::builder(&base)
                .timeout(Duration::from_secs(config.upstream_timeout_seconds.max(1)))
                .trust_forwarded_headers(config.trust_forwarded_headers),
        )
        .build()?;
    // The admin API (axum) answers under /admin/; everything else goes to the gateway.
    let admin = config.admin_token.as_ref().map(|token| {
        admin::routes(Arc::new(admin::Admin {
            token: token.clone(),
            directory: directory.clone(),
            clients: Arc::new(clients.clone()),
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http())
    });

    println!("tower-fhir gateway listening on {base}");
    println!("  state in {}", state_dir.display());
    let mut tenants = directory.tenants();
    tenants.sort_by_key(|t| t.to_string());
    for tenant in tenants {
        if let Some(upstreams) = directory.get(tenant) {
            for upstream in upstreams.iter() {
                println!(
                    "  tenant {tenant} -> {} ({})",
                    upstream.base(),
                    upstream.fhir_version().name()
                );
            }
        }
    }
    for trusted in &config.trusted_issuers {
        println!(
            "  trusting tokens from {} (audience {})",
            trusted.issuer, trusted.audience
        );
    }
    if demo {
        print_demo(&base, &gateway).await;
    }
    serve(listener, gateway, admin).await;
    if config.state_dir.is_none() {
        // Nobody asked to keep it.
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Registers the configured clients the store does not know yet. A known client keeps its
/// stored state (a rotated secret stays rotated).
async fn register_clients(
    store: &FileClientStore,
    clients: &[ClientConfig],
) -> Result<(), BoxError> {
    for client in clients {
        if store.client(&client.client_id).await?.is_some() {
            continue;
        }
        let mut new = NewClient::new(&client.client_id).secret(&client.client_secret);
        for tenant in &client.tenants {
            new = new.tenant(*tenant);
        }
        for scope in &client.scopes {
            new = new.scope(scope);
        }
        store.register(new).await?;
        tracing::info!(client_id = %client.client_id, "client registered");
    }
    Ok(())
}

/// The demo: two in-process hospitals as tenants, one client entitled to both.
async fn demo_config() -> Result<Config, BoxError> {
    let contoso = demo_fhir::start(
        "Contoso General (DSTU2)",
        FhirVersion::Dstu2,
        &[
            ("1001", "Chalmers", "Peter", "1974-12-25"),
            ("1002", "Windsor", "Anne", "1960-03-11"),
        ],
    )
    .await;
    let fabrikam = demo_fhir::start(
        "Fabrikam Clinic (STU3)",
        FhirVersion::Stu3,
        &[
            ("2001", "Nguyen", "Linh", "1988-07-02"),
            ("2002", "Okafor", "Chidi", "1979-05-30"),
        ],
    )
    .await;
    let tenant = |id: &str, base: &str, version| -> Result<TenantConfig, BoxError> {
        Ok(TenantConfig {
            id: TenantId::parse(id)?,
            upstreams: TenantUpstreams::new([Upstream::parse(base, version)?])
                .ok_or("no upstream")?,
        })
    };
    let mut config = Config::empty();
    config.tenants = vec![
        tenant(TENANT_DSTU2, &contoso, FhirVersion::Dstu2)?,
        tenant(TENANT_STU3, &fabrikam, FhirVersion::Stu3)?,
    ];
    config.clients = vec![ClientConfig {
        client_id: DEMO_CLIENT.into(),
        client_secret: DEMO_SECRET.into(),
        tenants: vec![
            TenantId::parse(TENANT_DSTU2)?,
            TenantId::parse(TENANT_STU3)?,
        ],
        scopes: Vec::new(),
    }];
    config.admin_token = Some(DEMO_ADMIN_TOKEN.into());
    Ok(config)
}

/// Serves HTTP/1.1 and HTTP/2 until Ctrl-C or SIGTERM, then lets in-flight requests finish.
async fn serve(listener: tokio::net::TcpListener, gateway: Gateway, admin: Option<Router>) {
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let connection_gateway = ConnectionGateway::new(gateway.clone());
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            // Name the client in Forwarded / X-Forwarded-For.
            request.extensions_mut().insert(ClientAddr(peer));
            let to_admin = request.uri().path().starts_with("/admin/");
            let answer = match admin.as_ref().filter(|_| to_admin) {
                Some(router) => future::Either::Right(
                    router.clone().oneshot(request.map(axum::body::Body::new)),
                ),
                None => future::Either::Left(connection_gateway.call(request)),
            };
            async move {
                Ok::<_, Infallible>(match answer {
                    future::Either::Left(gateway) => gateway.await?.map(Either::Left),
                    future::Either::Right(admin) => admin.await?.map(Either::Right),
                })
            }
        });
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One connection's gateway: its requests are sent to one readied [`Gateway`] rather than to a
/// clone of it each (hyper calls services through `&self`, Tower through `&mut self`).
struct ConnectionGateway {
    gateway: Mutex<Gateway>,
}

impl ConnectionGateway {
    fn new(gateway: Gateway) -> Self {
        Self {
            gateway: Mutex::new(gateway),
        }
    }

    fn call(
        &self,
        request: Request<Incoming>,
    ) -> future::Either<
        <Gateway as Service<Request<Incoming>>>::Future,
        tower::util::Oneshot<Gateway, Request<Incoming>>,
    > {
        let mut gateway = self.gateway.lock().unwrap_or_else(PoisonError::into_inner);
        // The gateway applies no backpressure (every layer is ready at once); should it ever
        // not be ready, this request waits on a clone of its own.
        let mut cx = Context::from_waker(Waker::noop());
        match Service::<Request<Incoming>>::poll_ready(&mut *gateway, &mut cx) {
            Poll::Ready(Ok(())) => future::Either::Left(gateway.call(request)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => future::Either::Right(gateway.clone().oneshot(request)),
        }
    }
}

/// Prints the demo credentials, a token per tenant (from the gateway's own token endpoint)
/// and curl commands that work as printed.
async fn print_demo(base: &str, gateway: &Gateway) {
    let token = |tenant: &'static str| {
        let gateway = gateway.clone();
        async move {
            let request = axum::http::Request::post("/oauth/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::<Bytes>::from(format!(
                    "grant_type=client_credentials&client_id={DEMO_CLIENT}&client_secret={DEMO_SECRET}&scope={tenant}"
                )))
                .expect("a valid request");
            let response = gateway.oneshot(request).await.expect("infallible");
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["access_token"].as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    };
    let token_dstu2 = token(TENANT_DSTU2).await;
    let token_stu3 = token(TENANT_STU3).await;
    println!("demo client: client_id {DEMO_CLIENT}, client_secret {DEMO_SECRET}");
    println!("demo admin token: {DEMO_ADMIN_TOKEN}");
    println!("demo token for the DSTU2 tenant (ES256, valid for 1 hour):\n  {token_dstu2}");
    println!("demo token for the STU3 tenant (ES256, valid for 1 hour):\n  {token_stu3}\n");
    println!("try:");
    println!("  curl -s {base}/metadata    # no token needed: names the token endpoint");
    println!("  curl -s -u {DEMO_CLIENT}:{DEMO_SECRET} -d grant_type=client_credentials -d scope={TENANT_STU3} {base}/oauth/token");
    println!("  curl -s -H 'Authorization: Bearer {token_stu3}' '{base}/Patient?family=ngu'");
    println!("  curl -s -H 'Authorization: Bearer {token_dstu2}' {base}/Patient/1001");
    println!("  curl -s -H 'Authorization: Bearer {token_stu3}' -d 'family=okafor' {base}/Patient/_search");
    println!("  curl -si {base}/Patient/1001    # 401 with WWW-Authenticate");
}

/// Ctrl-C or SIGTERM; in-flight requests finish.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing in-flight requests");
}
