//! The multi-tenant FHIR gateway: `cargo run --release -p tower-fhir-gateway [-- --config FILE]`.
//!
//! Without `--config` it runs an embedded demo: two small hospital FHIR servers in-process (one
//! DSTU2, one STU3) onboarded as two tenants, a demo client entitled to both, and an admin
//! token; it prints the demo credentials and curl commands that work as printed. With
//! `--config FILE` (a JSON file, every key documented in the README) it serves the clients,
//! tenants and identity providers the file names, keeping its state under `state_dir`.
//! `--check-config FILE` checks such a file without starting (`FILE: ok` and exit 0, or what
//! is wrong and 1); it binds no port, reaches nothing and writes nothing, so a port in use still
//! stops a start. (It reads `state_dir`'s sealed secrets, to check that the key opens them.)
//!
//! Routes: FHIR at the root of the public base URL (version negotiation, unauthenticated
//! `metadata`, bearer validation, tenant from the token's scope, cached routing, the proxy);
//! `POST /oauth/token`; `GET /.well-known/jwks.json`; `GET /.well-known/smart-configuration`;
//! `POST /oauth/clients/{client_id}/secret`; with an `admin_token`, `GET /admin/tenants` and
//! `GET /admin/clients` (list them), `PUT`/`GET`/`DELETE /admin/tenants/{id}`,
//! `PUT`/`GET`/`DELETE /admin/clients/{client_id}` (register a client or change its tenants,
//! scopes and rate limit, read, revoke) and `POST /admin/clients/{client_id}/secret`, on
//! `admin_listen` alone when it is set. Tenants' and clients' `rate_limit` and upstreams'
//! `max_concurrency` are enforced in the stack (`429` or `503`, with `Retry-After`).
//!
//! Logs go to stderr (`RUST_LOG=tower_fhir=debug` shows the gateway's decisions); secrets never
//! appear in them. SIGTERM or Ctrl-C stops it after in-flight requests finish (within
//! `shutdown_grace_seconds`). A startup
//! failure is one sentence on stderr and exit status 1.

mod admin;
mod config;
mod demo;
mod demo_fhir;
mod front;
mod host;
mod per_address;
mod serve;
mod state;
mod throttle;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tower_fhir::auth::BearerAuthLayer;
use tower_fhir::auth::FileRevocationLog;
use tower_fhir::gateway::Gateway;
use tower_fhir::proxy::FhirProxy;
use tower_fhir::route::{InMemoryDirectory, TenantStore};
use tower_fhir::smart::SmartScopeLayer;
use tower_fhir::tenant::TenantScopeLayer;
use tower_fhir::token::{FileReplayGuard, SigningKeys, TokenEndpoint};

use config::{Config, LogFormat};

/// mimalloc: the request path allocates and frees small blocks by the dozen, some on another
/// thread than the one that made them (the audit writer frees what a worker made); glibc's
/// allocator took about a tenth of the gateway's CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The multi-tenant FHIR gateway: OAuth 2.0 client credentials, bearer validation, tenant
/// routing and the proxy to each hospital's FHIR server.
///
/// Without --config it runs a demo (two in-process hospitals, a demo client) and prints curl
/// commands that work as printed.
#[derive(Debug, Parser)]
#[command(name = "tower-fhir-gateway", version)]
struct Args {
    /// The JSON configuration file (its keys are documented in the README).
    #[arg(long, value_name = "FILE", conflicts_with = "check_config")]
    config: Option<PathBuf>,
    /// The socket address to listen on, instead of the configuration's `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Check FILE and exit: print "FILE: ok" and exit 0 when its keys and values are valid
    /// (the TLS files and the audit log are opened too), otherwise say what is wrong and exit 1.
    /// Binds no port, reaches no database, upstream or identity provider, and writes nothing:
    /// of `state_dir` it reads `tenants.json` and `signing-keys.json` alone, to check that
    /// TOWER_FHIR_KEY_ENCRYPTION_KEY (or TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY or
    /// TOWER_FHIR_NEXT_KEY_ENCRYPTION_KEY, while the key changes) opens what they hold sealed
    /// (or, unset, that they hold nothing sealed). A port in use, or a `state_dir` the gateway
    /// may not use, still stops the start.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The main thread's runtime: start-up, then background work (change listeners, key
    // refreshes, metrics); connections are served by the workers' runtimes (see `serve`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return failed(&format!("cannot start the async runtime: {e}")),
    };
    let outcome = match &args.check_config {
        Some(file) => runtime.block_on(check_config(file, args.listen)),
        None => runtime.block_on(run(args)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => failed(&message),
    }
}

/// A line of the start's banner: on stdout, or on stderr when the audit log is stdout (whose
/// readers take one JSON record a line).
///
/// Not `println!`, which panics when the stream is closed (`tower-fhir-gateway ... | head`): a
/// line nobody reads is dropped, and the gateway serves on.
macro_rules! say {
    ($to_stderr:expr, $($line:tt)*) => {{
        use std::io::Write as _;
        let _ = if $to_stderr {
            writeln!(std::io::stderr(), $($line)*)
        } else {
            writeln!(std::io::stdout(), $($line)*)
        };
    }};
}

fn failed(message: &str) -> ExitCode {
    say!(true, "tower-fhir-gateway: {message}");
    ExitCode::FAILURE
}

/// `--check-config FILE` (with `--listen` in place of its `listen`, as the start would take
/// it): everything `run` builds from the file, in memory.
async fn check_config(file: &std::path::Path, listen: Option<SocketAddr>) -> Result<(), String> {
    let mut config = Config::load(file)?;
    if let Some(listen) = listen {
        config.listen = listen;
        config
            .check_listeners()
            .and_then(|()| config.check_own_addresses())
            .map_err(|e| format!("--listen {listen}: {e}"))?;
    }
    config.database_from_env();
    if config.database_url.is_some() {
        // What the start would refuse first: the database's key-encryption key. (The database
        // itself is not reached.)
        tower_fhir::postgres::KeyEncryptionKey::from_env()
            .map_err(|e| format!("cannot use the database: {e}"))?;
    } else {
        // Set, it seals the secrets in state_dir: the start refuses one that is not a key, and
        // a state it does not open (read here, not written).
        let kek = state::state_dir_sealing()?;
        if let Some(dir) = config.state_dir.as_deref().filter(|dir| dir.is_dir()) {
            state::verify_sealed_state(dir, kek.as_ref())?;
        }
    }
    config.check_shared_database()?;
    state::database_roots(&config)?;
    state::check(&config).await?;
    config.tls()?;
    front::check_audit_log(&config)?;
    let base = public_base_url(&config, config.listen);
    check_assembly(&config, &base).await?;
    say!(false, "{}: ok", file.display());
    Ok(())
}

/// Builds everything `config` asks for over in-memory state, then drops it: what the
/// configuration itself makes the start refuse, found without touching the real state.
async fn check_assembly(config: &Config, base: &str) -> Result<(), String> {
    let directory = InMemoryDirectory::new();
    for tenant in &config.tenants {
        directory.upsert(tenant.id, tenant.record.clone());
    }
    let keys = SigningKeys::generate().map_err(|e| format!("cannot make a signing key: {e}"))?;
    let store = tower_fhir::token::InMemoryClientStore::new();
    assemble(
        config,
        base,
        Arc::new(directory),
        Arc::new(store),
        keys,
        None,
        None,
    )
    .await
    .map(drop)
}

/// File descriptors kept besides the clients' connections and the upstream connections their
/// requests hold: the database's pool and listeners, the admin API's and metrics' clients, the
/// audit log, the state files.
#[cfg(unix)]
const OPEN_FILES_RESERVE: u64 = 1024;

/// The most tenants the start names a line each (their upstreams); the rest are counted.
const BANNER_TENANTS: usize = 50;

/// The file descriptors `config` may need at its busiest: `max_connections` clients, an
/// upstream connection for each request they have in flight (one a connection over HTTP/1.1,
/// up to `http2_max_requests_in_flight` over HTTP/2 together), the idle upstream connections
/// kept, and [`OPEN_FILES_RESERVE`].
#[cfg(unix)]
fn open_files_needed(config: &Config) -> u64 {
    2 * u64::from(config.max_connections)
        + u64::from(config.http2_max_requests_in_flight)
        + config.upstream_max_idle_connections as u64
        + OPEN_FILES_RESERVE
}

/// Raises the open files limit (`RLIMIT_NOFILE`) to its hard limit, as a server that holds
/// thousands of connections must (systemd's default soft limit is 1024), and warns when it is
/// still below what the configuration may need ([`open_files_needed`]): then accepts,
/// upstream connects and file opens fail before `max_connections` and
/// `http2_max_requests_in_flight` hold anyone back.
#[cfg(unix)]
fn open_files(config: &Config) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let needed = open_files_needed(config);
    let max_connections = config.max_connections;
    let in_flight = config.http2_max_requests_in_flight;
    // `None`: no limit. Under no hard limit, what is needed (the kernel refuses "unlimited"
    // open files: Linux caps them at `fs.nr_open`).
    let mut soft = limit.current;
    let target = limit.maximum.or(Some(needed));
    if soft.is_some() && soft < target {
        let raised = Rlimit {
            current: target,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = target,
            Err(error) => {
                tracing::warn!(%error, "cannot raise the open files limit to its hard limit")
            }
        }
    }
    if let Some(soft) = soft.filter(|&soft| soft < needed) {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the open files limit ({soft}) is below the {needed} the configuration may need (max_connections, {max_connections}, twice: the clients and their upstream connections; http2_max_requests_in_flight, {in_flight}; upstream_max_idle_connections; {OPEN_FILES_RESERVE} for the database and files): past it, new connections and upstream requests fail before those limits hold anyone back; raise the limit (systemd LimitNOFILE=, ulimit -n) or lower max_connections or http2_max_requests_in_flight"
        );
    }
}

async fn run(args: Args) -> Result<(), String> {
    let demo = args.config.is_none();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => demo::config().await,
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
        config
            .check_listeners()
            .and_then(|()| config.check_own_addresses())
            .map_err(|e| format!("--listen {listen}: {e}"))?;
    }
    if demo {
        demo::keep_admin_on_loopback(&mut config);
    }
    // The demo's credentials are published: they never go into a shared database, whatever
    // the environment says (a container started without its arguments, on a replica's host).
    let ignored_database = demo && config::database_url_from_env().is_some();
    if !demo {
        config.database_from_env();
        config.check_shared_database()?;
    }
    init_logs(config.log_format);
    if ignored_database {
        tracing::warn!(
            "the demo ignores {}: its published client secret and admin token never go into a shared database; its state is a temporary directory",
            config::DATABASE_URL_ENV
        );
    }
    let ignored_keys: Vec<&str> = [
        tower_fhir::seal::KEY_ENCRYPTION_KEY_ENV,
        tower_fhir::seal::PREVIOUS_KEY_ENCRYPTION_KEY_ENV,
        tower_fhir::seal::NEXT_KEY_ENCRYPTION_KEY_ENV,
    ]
    .into_iter()
    .filter(|name| demo && std::env::var_os(name).is_some())
    .collect();
    if !ignored_keys.is_empty() {
        tracing::warn!(
            "the demo ignores {}: its state is a temporary directory removed at exit, holding only the demo's published credentials; the key seals a configured state_dir",
            ignored_keys.join(" and ")
        );
    }
    #[cfg(unix)]
    open_files(&config);
    // SIGHUP reopens the audit log, and from here on never ends the process (a log rotation
    // that signals a gateway still starting).
    #[cfg(unix)]
    let hangups = serve::hangups();

    // Metrics first: what the start does (the first key fetches) is counted too.
    let mut histograms = None;
    if let Some(addr) = config.metrics_listen {
        let listener = front::bind_metrics(addr).await?;
        let page = front::install_metrics()?;
        histograms = Some(page.histograms().clone());
        let local = listener.local_addr().unwrap_or(addr);
        front::serve_metrics(listener, page);
        say!(
            true,
            "tower-fhir gateway: metrics at http://{local}/metrics"
        );
    }
    // Read before listening: a certificate that cannot be used stops the start, as does an
    // audit log that cannot be opened.
    let tls = config.tls()?;
    front::check_audit_log(&config)?;
    #[cfg(unix)]
    front::warn_if_audit_log_readable(&config);
    let workers = config.worker_count();
    let listeners = serve::bind(config.listen, workers)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local = listeners
        .first()
        .ok_or("no listening socket")?
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let base = public_base_url(&config, local);
    // Before the state is opened: a first start seeds it from the configuration, and one
    // refused after that (a key the gateway cannot use, a client the store refuses, an
    // admin_listen already taken) would
    // leave it seeded from a file the operator is about to correct, which then no longer
    // counts (the state wins over the file).
    check_assembly(&config, &base).await?;
    state::check(&config).await?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(
            serve::bind(addr, 1)
                .map_err(|e| format!("cannot listen on {addr} (admin_listen): {e}"))?
                .remove(0),
        ),
        None => None,
    };
    let state = state::open(
        &config,
        if demo {
            state::StateKey::Ignored
        } else {
            state::StateKey::FromEnv
        },
    )
    .await?;
    if !demo && config.public_base_url.is_none() && config.listen.ip().is_unspecified() {
        tracing::warn!(
            "public_base_url is not set: the gateway names itself by its listening address ({}) in its tokens' issuer, its token endpoint and its links, which clients cannot use; set public_base_url to the URL clients reach it by",
            config.listen
        );
    }
    if tls.is_some()
        && config
            .public_base_url
            .as_deref()
            .is_some_and(|base| base.starts_with("http://"))
    {
        tracing::warn!(
            "public_base_url is http:// while the gateway serves TLS: the token endpoint and links it advertises send clients to plain HTTP; write it https://"
        );
    }
    if config.trust_forwarded_headers && config.client_address_trusted_peers.is_empty() {
        tracing::warn!(
            "trust_forwarded_headers without client_address_trusted_peers: every client's Forwarded and X-Forwarded-* headers (the addresses, the prefix, the port it claims) reach the upstreams; name the balancers there to keep theirs only"
        );
    }
    if !demo && config.state_dir.is_none() && config.database_url.is_none() {
        tracing::warn!(
            state = %state.location,
            "the state is in a temporary directory removed at exit: every restart makes new signing keys (refusing the tokens issued before it), forgets rotated secrets and revocations, and loses every admin change; set state_dir (one process) or database_url (many replicas) to keep it"
        );
    }
    let (gateway, endpoint, revocations) = assemble(
        &config,
        &base,
        Arc::clone(&state.directory),
        Arc::clone(&state.clients),
        state.keys.clone(),
        state.database.as_ref().map(|database| &database.state),
        state
            .revocations
            .as_ref()
            .zip(state.assertion_jtis.as_ref())
            .map(|(revocations, assertion_jtis)| Kept {
                revocations,
                assertion_jtis,
            }),
    )
    .await?;

    // The admin API (axum) answers under /admin/; everything else goes to the gateway. Off,
    // it says why there. With admin_listen, it answers there alone, and /admin/ here is a 404.
    let admin = match &config.admin_token {
        Some(token) => admin::routes(Arc::new(admin::Admin {
            token: token.clone(),
            directory: Arc::clone(&state.directory),
            routes: gateway.route_cache().clone(),
            clients: Arc::clone(&state.clients),
            limits: gateway.rate_limits().clone(),
            throttle: admin::AdminThrottle::default(),
            keys: match &state.database {
                Some(database) => admin::KeyAdmin::Database(database.keys.clone()),
                None => admin::KeyAdmin::Files(state.keys.clone()),
            },
            token_lifetime: Duration::from_secs(config.token.ttl_seconds.unwrap_or(3600)),
            tenant_writes: tokio::sync::Mutex::new(()),
            endpoint: endpoint.clone(),
            body_timeout: Duration::from_secs(config.body_read_timeout_seconds),
            body_min_rate: config.body_min_bytes_per_second,
            own_addresses: config.own_addresses(),
            state_lock: state.lock.clone(),
        })),
        None if demo => admin::off(
            "this demo listens beyond loopback and its admin token is published; run it on 127.0.0.1 to use it",
        ),
        None => admin::off("the configuration sets no admin_token; set one to use it"),
    }
    .layer(tower_http::trace::TraceLayer::new_for_http());
    let admins = match config.admin_listen {
        Some(_) => (
            Some(admin::elsewhere().layer(tower_http::trace::TraceLayer::new_for_http())),
            Some(admin),
        ),
        None => (Some(admin), None),
    };

    // SIGTERM and Ctrl-C are handled from here on: before anyone is told the gateway listens.
    let stop = serve::shutdown();
    // The audit log on stdout takes it whole: one JSON record a line.
    let banner_to_stderr = config.audit_log.as_deref() == Some(std::path::Path::new("-"));
    // The address bound (`--listen` may differ from the configuration's), then the URL the
    // gateway names itself by where that is another.
    let scheme = if tls.is_some() { "https" } else { "http" };
    let bound = format!("{scheme}://{local}");
    say!(banner_to_stderr, "tower-fhir gateway listening on {bound}");
    if base != bound {
        say!(banner_to_stderr, "  public base URL {base}");
    }
    say!(
        banner_to_stderr,
        "  {workers} worker thread(s), one listening socket each (SO_REUSEPORT)"
    );
    say!(banner_to_stderr, "  state in {}", state.location);
    if let Some(listener) = &admin_listener {
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot read admin_listen's address: {e}"))?;
        say!(
            banner_to_stderr,
            "  admin API at {scheme}://{local}/admin/ (admin_listen; not on {base})"
        );
    }
    if let (Some(certificate), Some(_)) = (&config.tls_certificate_file, &tls) {
        say!(
            banner_to_stderr,
            "  TLS with the certificate in {} (read again on SIGHUP or when it changes)",
            certificate.display()
        );
    }
    // (Read at once: a lookup each took most of a minute for 50,000 tenants in PostgreSQL.)
    let tenants = state
        .directory
        .records()
        .await
        .map_err(|e| format!("cannot list the tenants: {e}"))?;
    // A line each for the first tenants; with thousands, a count (the start's output is read
    // by a person, and a line per tenant took 50,000 lines).
    let unlisted = tenants.len().saturating_sub(BANNER_TENANTS);
    for (shown, (tenant, record)) in tenants.into_iter().enumerate() {
        for upstream in record.upstreams().iter().filter(|_| shown < BANNER_TENANTS) {
            say!(
                banner_to_stderr,
                "  tenant {tenant} -> {} ({})",
                upstream.base(),
                upstream.fhir_version().name()
            );
        }
        // (Said for every tenant: a warning.)
        if let Some(local) = record.in_process_tenant() {
            say!(
                banner_to_stderr,
                "  tenant {tenant} -> served in-process as {:?}: this gateway proxies, so its requests get 502",
                local.key()
            );
        }
    }
    if unlisted > 0 {
        say!(
            banner_to_stderr,
            "  and {unlisted} more tenants (the admin API's GET /admin/tenants lists them all)"
        );
    }
    for trusted in &config.trusted_issuers {
        let tenants = if trusted.any_tenant {
            "for any tenant".to_owned()
        } else if trusted.tenants.is_empty() {
            "for no tenant: give it tenants or any_tenant, or every one of its tokens is refused"
                .to_owned()
        } else {
            format!("for {} tenant(s)", trusted.tenants.len())
        };
        say!(
            banner_to_stderr,
            "  trusting tokens from {} (audience {}) {tenants}",
            trusted.issuer,
            trusted.audience
        );
        if !trusted.any_tenant && trusted.tenants.is_empty() {
            tracing::warn!(
                issuer = %trusted.issuer,
                "a trusted issuer bound to no tenant: its tokens are refused"
            );
        }
    }
    if demo {
        demo::print(&base, &gateway, config.admin_token.is_some()).await;
    }
    let database = state.database.as_ref().map(|database| front::Listening {
        up: Arc::clone(&database.up),
        tenants: database.tenants.clone(),
        revocations,
        revoked: endpoint.revoked_tokens().clone(),
    });
    let mut served = front::front(
        &config,
        gateway,
        admins,
        &state.keys,
        database,
        state.lock.clone(),
    )?;
    if let Some(lock) = state.lock.clone() {
        // Said within seconds of a removal, whether or not anything asks `/readyz`.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                lock.held();
            }
        });
    }
    // A removed tenant's series leave /metrics once Prometheus has had time to scrape their
    // final counts (however it was removed: through this replica's admin API, or another's
    // heard through the shared database).
    if let (Some(histograms), true) = (histograms, config.metrics_tenant_label) {
        tokio::spawn(state::forget_removed_tenants(
            Arc::clone(&state.directory),
            state::TenantSeries {
                observe: served.observe.clone(),
                histograms,
            },
            Duration::from_secs(config.metrics_removed_tenant_grace_seconds),
        ));
    }
    let reopener = served.reopener.take();
    #[cfg(unix)]
    if let Some(hangups) = hangups {
        tokio::spawn(serve::reopen_on_hangup(hangups, reopener, tls.clone()));
    }
    if let Some(tls) = &tls {
        tokio::spawn(tls::reload_when_changed(tls.clone()));
    }
    #[cfg(not(unix))]
    drop(reopener);
    let limits = serve::Limits {
        header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
        idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
        max_connections: config.max_connections,
        http2_max_streams: config.http2_max_concurrent_streams,
        http2_in_flight: Box::leak(Box::new(tokio::sync::Semaphore::new(
            config.http2_max_requests_in_flight as usize,
        ))),
        shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
        // Checked when the configuration was loaded; kept for the whole process.
        client_address: config
            .client_address_rule()?
            .map(|rule| &*Box::leak(Box::new(rule))),
        per_address: config
            .per_address()?
            .map(|counts| &*Box::leak(Box::new(counts))),
    };
    serve::serve(listeners, admin_listener, served, tls, limits, stop).await?;
    // (A temporary state directory, which nobody asked to keep, goes with `state`.)
    drop(state);
    tracing::info!("gateway stopped");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). The log takes events only: the
/// per-request `fhir_request` span is for tracing exporters, and formatting each request's
/// span for a log nobody reads would cost microseconds a request.
fn init_logs(format: LogFormat) {
    use tracing_subscriber::filter::{filter_fn, FilterExt};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info".into())
            .and(filter_fn(|metadata| metadata.is_event()))
            .and(filter_fn(|metadata| {
                // tokio-postgres logs each statement's parameters at debug (a tenant's upstream
                // credentials, secret hashes): never in this log, whatever `RUST_LOG` asks.
                !metadata.target().starts_with("tokio_postgres")
                    || *metadata.level() <= tracing::Level::INFO
            }))
    };
    // Colours for a terminal only: a file or a log collector got their escape codes.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colours);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => registry.with(logs.with_filter(filter())).init(),
        LogFormat::Json => registry.with(logs.json().with_filter(filter())).init(),
    }
}

/// The URL clients use: the configured one, or `http://` (`https://` with TLS) and the
/// listening address.
fn public_base_url(config: &Config, listening: SocketAddr) -> String {
    let scheme = if config.tls_certificate_file.is_some() {
        "https"
    } else {
        "http"
    };
    config
        .public_base_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{listening}"))
        .trim_end_matches('/')
        .to_owned()
}

/// What `state_dir` keeps for the token endpoint across restarts.
struct Kept<'a> {
    revocations: &'a FileRevocationLog,
    assertion_jtis: &'a FileReplayGuard,
}

/// The whole gateway and its token endpoint, as the configuration says; with a shared
/// `database`, revocations, client assertions' `jti`s and failed authentications are shared
/// with every replica; in `state_dir`, revocations and `jti`s are kept across restarts.
async fn assemble(
    config: &Config,
    base: &str,
    directory: Arc<dyn TenantStore>,
    clients: Arc<dyn tower_fhir::token::ClientStore>,
    keys: SigningKeys,
    database: Option<&tower_fhir::postgres::PgState>,
    kept: Option<Kept<'_>>,
) -> Result<
    (
        Gateway,
        TokenEndpoint,
        Option<tower_fhir::postgres::RevocationsFollowed>,
    ),
    String,
> {
    let issuer = config.token.issuer.as_deref().unwrap_or(base);
    // Another issuer's keys bound to the gateway's own name would vouch for tokens naming any
    // tenant (the gateway's own tokens may), whatever its `tenants` say.
    if let Some(trusted) = config.trusted_issuers.iter().find(|t| t.issuer == issuer) {
        return Err(format!(
            "trusted issuer {:?} is the gateway's own issuer: its tokens would be taken as the gateway's, for any tenant; give the gateway another token.issuer or remove the entry",
            trusted.issuer
        ));
    }
    let endpoint = TokenEndpoint::builder()
        .issuer(issuer)
        .token_url(format!("{base}/oauth/token"))
        .audience(config.token.audience.as_deref().unwrap_or("tower-fhir"))
        .store(clients)
        .signing_keys(keys)
        // A client registered without SMART resource scopes has tenant-wide tokens unless
        // they are required: then asking for some would give it access, not take some away.
        .scopeless_clients_may_narrow(!config.require_smart_scopes)
        .default_lifetime(Duration::from_secs(
            config.token.ttl_seconds.unwrap_or(3600),
        ))
        // A token request's body (8 KiB at most) must come within the head's time after it.
        .body_timeout(Duration::from_secs(config.header_read_timeout_seconds));
    let endpoint = match config.token_hashing_concurrency {
        Some(checks) => endpoint.hashing_concurrency(checks),
        None => endpoint,
    };
    let endpoint = match database {
        Some(database) => endpoint
            .revocation_log(database.revocation_log())
            .assertion_replay_guard(database.assertion_replay_guard())
            .shared_failure_counts(database.failure_counts()),
        None => match &kept {
            Some(kept) => endpoint
                .revocation_log(kept.revocations.clone())
                .assertion_replay_guard(kept.assertion_jtis.clone()),
            None => endpoint,
        },
    };
    let endpoint = endpoint
        .build()
        .map_err(|e| format!("the token endpoint cannot be set up: {e}"))?;
    // The signing keys outlive a restart, and so do the tokens revoked before it, and those of
    // the clients revoked before it.
    if let Some(kept) = &kept {
        kept.revocations.apply(endpoint.revoked_tokens());
    }
    endpoint
        .refuse_revoked_clients()
        .await
        .map_err(|e| format!("cannot read the revoked clients: {e}"))?;
    // (Only with a database: the configuration refuses the setting without one.)
    endpoint.revoked_tokens().set_max_staleness(
        config
            .revocation_max_staleness_seconds
            .map(Duration::from_secs),
    );
    let followed = match database {
        Some(database) => Some(
            database
                .follow_revocations(endpoint.revoked_tokens())
                .await
                .map_err(|e| format!("cannot follow the revocations: {e}"))?,
        ),
        None => None,
    };

    // Both at least 1 s: the configuration refuses 0.
    let mut auth = BearerAuthLayer::builder()
        .refetch_cooldown(Duration::from_secs(config.jwks_refetch_cooldown_seconds));
    // Every issuer is bound to the tenants it may name: the gateway's own to any (it issues a
    // tenant only to clients registered for it), each trusted one to its `tenants`.
    let mut tenant = TenantScopeLayer::builder().issuer_any_tenant(issuer);
    for trusted in &config.trusted_issuers {
        auth = auth
            .jwks_url_for_issuer(&trusted.jwks_uri, &trusted.issuer)
            .audience_for_issuer(&trusted.issuer, &trusted.audience);
        for typ in &trusted.token_types {
            auth = auth.token_type_for_issuer(&trusted.issuer, typ);
        }
        tenant = if trusted.any_tenant {
            tenant.issuer_any_tenant(&trusted.issuer)
        } else {
            tenant.issuer_tenants(&trusted.issuer, trusted.tenants.iter().copied())
        };
    }
    let mut proxy = FhirProxy::builder(base)
        .timeout(Duration::from_secs(config.upstream_timeout_seconds))
        .pool_max_idle(config.upstream_max_idle_connections)
        .trust_forwarded_headers(config.trust_forwarded_headers);
    for name in &config.forward_request_headers {
        proxy = proxy.forward_request_header(name);
    }
    if let Some(path) = &config.upstream_ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read upstream_ca_file {}: {e}", path.display()))?;
        // (The proxy reads the certificates when built; said here by the key's name.)
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(format!(
                "upstream_ca_file {} holds no PEM certificate",
                path.display()
            ));
        }
        proxy = proxy.root_certificates_pem(pem);
    }
    let default_release = config.default_fhir_version;
    let gateway = Gateway::builder(base)
        .metadata(move |metadata| match default_release {
            Some(release) => metadata.default_version(release),
            None => metadata,
        })
        .follow(directory.changes())
        .directory(move |tenant| directory.lookup(tenant))
        .token_endpoint(endpoint.clone())
        .auth(auth)
        .tenant(tenant)
        .smart_scopes(
            SmartScopeLayer::builder()
                .require_smart_scopes(config.require_smart_scopes)
                .max_buffered_body(
                    usize::try_from(config.max_request_body_bytes).unwrap_or(usize::MAX),
                )
                .max_buffered_total(
                    usize::try_from(config.max_buffered_total()).unwrap_or(usize::MAX),
                ),
        )
        .proxy(proxy)
        .build()
        .map_err(|e| format!("the gateway cannot be set up: {e}"))?;
    Ok((gateway, endpoint, followed))
}
