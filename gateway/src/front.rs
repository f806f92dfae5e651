//! What stands in front of the gateway: request ids, CORS, health and readiness, metrics and
//! audit records, the request body timeout and limit; and the Prometheus endpoint beside it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower::util::Either;
use tower::{Layer, ServiceBuilder};
use tower_fhir::gateway::Gateway;
use tower_fhir::ops::{
    fhir_cors, AuditReopener, BodyLimit, BodyLimitLayer, BodyTimeout, BodyTimeoutLayer,
    BucketHistograms, FhirCors, Health, HealthLayer, JsonLinesAudit, Observe, ObserveLayer,
    RequestIdLayer, RequestIdService, DURATION_BUCKETS,
};
use tower_fhir::postgres::{PgTenantStore, RevocationsFollowed};
use tower_fhir::token::SigningKeys;

use crate::config::Config;
use crate::state::DirLock;

/// The stack under the CORS layer.
type Inner = Health<Observe<BodyTimeout<BodyLimit<Gateway>>>>;

/// The whole service a connection is served by.
pub(crate) type Front = RequestIdService<Either<FhirCors<Inner>, Inner>>;

/// The admin API as a connection serves it: request ids, metrics, audit records and the
/// request's span, as the gateway's requests have them.
pub(crate) type AdminFront = RequestIdService<Observe<Router>>;

/// Warns when the audit log is a regular file others than its owner may read (a file the
/// gateway creates is 0600; one that was there, or a log rotation's, keeps its mode): it names
/// clients, tenants, resources and query parameters.
#[cfg(unix)]
pub(crate) fn warn_if_audit_log_readable(config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = config
        .audit_log
        .as_deref()
        .filter(|path| path.as_os_str() != "-")
    else {
        return;
    };
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if metadata.is_file() && mode & 0o077 != 0 {
            tracing::warn!(
                audit_log = %path.display(),
                mode = format_args!("{mode:o}"),
                "the audit log may be read (or written) by users other than its owner: it names clients, tenants, resources and query parameters; chmod 600 it (the gateway creates it 0600, and a log rotation should too)"
            );
        }
    }
}

/// Whether the audit log can be opened (appended to, created if absent) as the start will:
/// `Err` says why. Without side effects: a path that is not a regular file (a FIFO a log
/// shipper reads, a device) is left alone, an existing file is opened for appending and
/// closed, and a missing one is created only if nothing is there (`O_EXCL`, so a link is not
/// followed) and removed again.
pub(crate) fn check_audit_log(config: &Config) -> Result<(), String> {
    let Some(path) = config.audit_log.as_deref() else {
        return Ok(());
    };
    if path.as_os_str() == "-" {
        return Ok(());
    }
    let cannot = |e: std::io::Error| format!("cannot open the audit log {}: {e}", path.display());
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => {
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(cannot)?;
        }
        Ok(metadata) if metadata.is_dir() => {
            return Err(cannot(std::io::Error::other("it is a directory")));
        }
        // A FIFO, a socket or a device: opening it could block, or end a reader's stream.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => {
                    let _ = std::fs::remove_file(path);
                }
                // Something is there after all (a link to a missing file, say): the start
                // follows it and creates the file then.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(cannot(e)),
            }
        }
        Err(e) => return Err(cannot(e)),
    }
    Ok(())
}

/// What readiness watches of a shared database: whether it answers its pings, and whether
/// this process hears the other replicas' tenant changes and revocations.
pub(crate) struct Listening {
    pub(crate) up: Arc<AtomicBool>,
    pub(crate) tenants: PgTenantStore,
    /// `None` when revocations are not followed (never, once the gateway runs).
    pub(crate) revocations: Option<RevocationsFollowed>,
    /// The revoked list they fill, not ready while staler than `revocation_max_staleness_seconds`.
    pub(crate) revoked: tower_fhir::auth::RevokedTokens,
}

/// What the workers serve, each wrapped as the configuration says.
pub(crate) struct Served {
    pub(crate) gateway: Front,
    /// What answers `/admin/...` on `listen`: the admin API, or with `admin_listen` a `404`.
    pub(crate) admin: Option<AdminFront>,
    /// The admin API on `admin_listen`, alone there.
    pub(crate) admin_apart: Option<AdminFront>,
    /// What reopens the audit log file (for rotation), when there is one.
    pub(crate) reopener: Option<AuditReopener>,
    /// The layer counting requests (a clone, sharing its handles): what forgets a removed
    /// tenant's series.
    pub(crate) observe: ObserveLayer,
}

/// The gateway wrapped as the configuration says, and the admin API (`admin`: on `listen`;
/// `admin_apart`: on `admin_listen`) wrapped in the same request ids, metrics and audit
/// records. `/readyz` also waits for `state_dir`'s lock (`lock`) to be held.
pub(crate) fn front(
    config: &Config,
    gateway: Gateway,
    (admin, admin_apart): (Option<Router>, Option<Router>),
    keys: &SigningKeys,
    database: Option<Listening>,
    lock: Option<Arc<DirLock>>,
) -> Result<Served, String> {
    let mut observe = ObserveLayer::new()
        .metrics(config.metrics_listen.is_some())
        .tenant_label(config.metrics_tenant_label)
        .audit_query(config.audit_query.recording());
    let mut reopener = None;
    if let Some(path) = &config.audit_log {
        // Given as it is (not shared), the audit log writes the lines with no record made.
        let sink = if path.as_os_str() == "-" {
            JsonLinesAudit::stdout()
        } else {
            JsonLinesAudit::file(path)
                .map_err(|e| format!("cannot open the audit log {}: {e}", path.display()))?
        };
        reopener = sink.reopener();
        observe = observe.audit(sink);
    }
    let auth = gateway.bearer_auth().clone();
    // Fetch every trusted issuer's keys now, so that readiness does not wait for a token.
    auth.prefetch_keys();
    let keys = keys.clone();
    let mut health = HealthLayer::new();
    if let Some(Listening {
        up,
        tenants,
        revocations,
        revoked,
    }) = database
    {
        health = health
            .readiness("database", move || up.load(Ordering::Relaxed))
            .readiness("database change listener", move || tenants.is_listening())
            // (Every token is refused meanwhile: `revocation_max_staleness_seconds`.)
            .readiness("revoked tokens current", move || !revoked.is_stale());
        if let Some(revocations) = revocations {
            health = health.readiness("database revocation listener", move || {
                revocations.is_listening()
            });
        }
    }
    if let Some(lock) = lock {
        health = health.readiness("state directory", move || lock.held());
    }
    let health = health
        .readiness("signing keys", move || {
            keys.jwks()["keys"]
                .as_array()
                .is_some_and(|k| !k.is_empty())
        })
        .readiness("trusted issuers' keys", move || {
            let (fetched, all) = auth.key_sources_fetched();
            if fetched < all {
                auth.prefetch_keys();
            }
            fetched == all
        });
    let cors = if config.cors_allowed_origins.is_empty() {
        None
    } else {
        Some(
            fhir_cors(&config.cors_allowed_origins)
                .map_err(|e| format!("cors_allowed_origins: {e}"))?,
        )
    };
    let wrap = |router| RequestIdLayer::new().layer(observe.clone().layer(router));
    let (admin, admin_apart) = (admin.map(wrap), admin_apart.map(wrap));
    let counting = observe.clone();
    let inner = ServiceBuilder::new()
        .layer(health)
        .layer(observe)
        .layer(
            BodyTimeoutLayer::new(Duration::from_secs(config.body_read_timeout_seconds))
                .min_rate(config.body_min_bytes_per_second),
        )
        .layer(BodyLimitLayer::new(config.max_request_body_bytes))
        .service(gateway);
    let gateway = RequestIdLayer::new().layer(tower::util::option_layer(cors).layer(inner));
    Ok(Served {
        gateway,
        admin,
        admin_apart,
        reopener,
        observe: counting,
    })
}

/// What `GET /metrics` renders: the Prometheus recorder's counters and gauges, and the
/// histograms kept as buckets beside them (each thread counts on its own, with no atomic
/// read-modify-write; rendering the histograms first gives the counters and gauges to the
/// exporter).
#[derive(Clone)]
pub(crate) struct MetricsPage {
    counters: PrometheusHandle,
    histograms: BucketHistograms,
}

impl MetricsPage {
    fn render(&self) -> String {
        let histograms = self.histograms.render();
        self.counters.render() + &histograms
    }

    /// The histograms, which also keep the tenant-labelled request counter: what forgets a
    /// removed tenant's series.
    pub(crate) fn histograms(&self) -> &BucketHistograms {
        &self.histograms
    }
}

/// Installs the recorder: every metric from here on is kept for `/metrics`.
pub(crate) fn install_metrics() -> Result<MetricsPage, String> {
    let prometheus = PrometheusBuilder::new().build_recorder();
    let counters = prometheus.handle();
    let histograms = BucketHistograms::new(&DURATION_BUCKETS)
        .map_err(|e| format!("cannot set up metrics: {e}"))?;
    metrics::set_global_recorder(histograms.over(prometheus))
        .map_err(|e| format!("cannot set up metrics: {e}"))?;
    Ok(MetricsPage {
        counters,
        histograms,
    })
}

/// How many connections the metrics endpoint holds at once; more are closed as they come.
/// (A scraper or two, and a person with curl, need a handful.)
const METRICS_CONNECTIONS: usize = 16;
/// How long a metrics connection may take to send a request head.
const METRICS_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a metrics connection is kept at most, idle or not (a scraper connects again).
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// Serves `GET /metrics` on `listener` until the process ends: at most
/// [`METRICS_CONNECTIONS`] connections at once (more are closed at once, and counted in the
/// log), each given [`METRICS_HEADER_READ_TIMEOUT`] for a request head and kept no longer
/// than [`METRICS_CONNECTION_LIFETIME`], so a few slow or idle connections cannot take the
/// process's file descriptors.
pub(crate) fn serve_metrics(listener: tokio::net::TcpListener, page: MetricsPage) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let page = page.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    page.render(),
                )
            }
        }),
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    tokio::spawn(async move {
        let mut refused: u64 = 0;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "the metrics endpoint could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                refused += 1;
                // Said once, then every thousandth: a flood does not flood the log.
                if refused == 1 || refused.is_multiple_of(1000) {
                    tracing::warn!(refused, "the metrics endpoint holds {METRICS_CONNECTIONS} connections: a new one is closed");
                }
                drop(stream);
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // An error is the client's (gone, or too slow): nothing to say.
                let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, connection).await;
                drop(slot);
            });
        }
    });
}

/// Binds the metrics address.
pub(crate) async fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
}
