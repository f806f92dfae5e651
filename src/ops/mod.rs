//! Running the gateway as a service: request ids, body limits, health and readiness,
//! metrics, audit records, traces and CORS, as layers for any axum or hyper stack.
//!
//! | layer or item | what it does |
//! |---|---|
//! | [`RequestIdLayer`] | keeps a sound `X-Request-Id` or makes one; returns it on every response |
//! | [`HealthLayer`] | `GET /healthz`, `GET /readyz` with your readiness checks, no token |
//! | [`ObserveLayer`] | metrics, one [`AuditRecord`] per request to an [`AuditSink`], a span per request |
//! | [`BodyLimitLayer`] | `413` with an OperationOutcome for bodies over a limit, nothing buffered |
//! | [`BodyTimeoutLayer`] | `408` with an OperationOutcome for a body that stops arriving mid-way |
//! | [`fhir_cors`] | tower-http's `CorsLayer` for browser apps, answering preflights only |
//! | [`JsonLinesAudit`] | an audit sink writing JSON lines to a file or stdout |
//! | [`BucketHistograms`] | a metrics recorder wrapper: histograms as Prometheus buckets, every metric counted per thread |
//! | [`RequestFacts`] | what inner layers learned (client, tenant, upstream), for the record |
//! | [`ParseErrorOutcomes`] | a connection's I/O on which hyper's own answers to unparsable request heads carry an OperationOutcome |
//!
//! Outermost first: `RequestIdLayer`, `fhir_cors`, `HealthLayer`, `ObserveLayer`,
//! `BodyTimeoutLayer`, `BodyLimitLayer`, then the gateway (or your FHIR stack):
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_fhir::ops::{
//!     fhir_cors, BodyLimitLayer, BodyTimeoutLayer, HealthLayer, ObserveLayer, RequestIdLayer,
//! };
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fhir = service_fn(|_r: Request<_>| async {
//!     Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! });
//! // Install the metrics recorder before this: the layers take their metrics' handles now.
//! let service = ServiceBuilder::new()
//!     .layer(RequestIdLayer::new())
//!     .layer(fhir_cors(["https://app.example"]).unwrap())
//!     .layer(HealthLayer::new())
//!     .layer(ObserveLayer::new().metrics(true))
//!     .layer(BodyTimeoutLayer::new(std::time::Duration::from_secs(30)))
//!     .layer(BodyLimitLayer::new(16 * 1024 * 1024))
//!     .service(fhir);
//!
//! let request = Request::get("/healthz").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert!(response.headers().contains_key("x-request-id"));
//! # });
//! ```
//!
//! Metrics go through the [`metrics`] facade: nothing is exported until the application
//! installs a recorder (the gateway binary serves Prometheus text at `metrics_listen`). The
//! layers take their metrics' handles when they are built: install the recorder first.
//! Besides the requests counted by [`ObserveLayer`], the library counts:
//!
//! | metric | labels | where |
//! |---|---|---|
//! | `tower_fhir_upstream_duration_seconds` (histogram) | | the proxy, to the upstream's response head, or to its failure (a timeout counts its whole wait; a client's request body that fails does not count) |
//! | `tower_fhir_token_requests_total` | `result` (`issued` or the RFC 6749 error) | the token endpoint, and [`BodyLimitLayer`] for the token requests it refuses before the endpoint |
//! | `tower_fhir_jwks_fetches_total` | `issuer`, `result` (`ok`, `error`) | the bearer layer's key sources |
//! | `tower_fhir_cache_total` | `cache` (`token`, `route`), `result` (`hit`, `miss`) | bearer and routing caches |
//! | `tower_fhir_upstream_replays_total` | | the proxy, a safe request sent again after an idle upstream connection closed unanswered as it went out |
//! | `tower_fhir_body_too_large_total` | | [`BodyLimitLayer`], the proxy, and the OAuth endpoints' own limit (token, introspection, revocation) |
//! | `tower_fhir_body_timeouts_total` | | [`BodyTimeoutLayer`], and the proxy when a body pauses as long as the upstream may take |
//! | `tower_fhir_rate_limited_total` | `limit` (`tenant`, `client`, `upstream`) | the rate limit layer, the proxy's `max_concurrency` |
//! | `tower_fhir_audit_records_dropped_total`, `tower_fhir_audit_records_delayed_total` | | [`JsonLinesAudit`] |

mod audit;
mod body_limit;
mod body_timeout;
mod cors;
mod facts;
mod health;
mod histogram;
mod observe;
mod parse_errors;
mod request_id;
mod tally;

/// Set by [`cutting_in_flight`].
static CUTTING_IN_FLIGHT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that the server is cutting the requests still in flight (its shutdown grace period is
/// over, and it exits without their answers): from now on, an [`ObserveLayer`] records a
/// request whose future is dropped unfinished with status `503` and outcome `shutdown` rather
/// than as its client's leaving (`499`, `client_closed`), in its metrics and audit record.
/// Process-wide, and for good: call it at the end of the process's life, just before its
/// runtimes (and the requests on them) are dropped.
///
/// ```no_run
/// // At the end of a shutdown whose grace period ran out (not run here: it is for good).
/// tower_fhir::ops::cutting_in_flight();
/// ```
pub fn cutting_in_flight() {
    CUTTING_IN_FLIGHT.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub use audit::{
    AuditRecord, AuditReopener, AuditSink, JsonLinesAudit, QueryRecording, DEFAULT_AUDIT_BYTES,
    DEFAULT_AUDIT_QUEUE,
};
pub use body_limit::{
    BodyLimit, BodyLimitFuture, BodyLimitLayer, LimitedBody, DEFAULT_MAX_REQUEST_BODY_BYTES,
};
pub use body_timeout::{
    BodyTimeout, BodyTimeoutError, BodyTimeoutLayer, TimedBody, DEFAULT_BODY_MIN_RATE,
    DEFAULT_BODY_READ_TIMEOUT,
};
pub use cors::{fhir_cors, FhirCors, FhirCorsLayer, InvalidOrigin};
pub use facts::{Facts, RequestFacts};
pub use health::{Health, HealthLayer, HEALTHZ_PATH, READYZ_PATH};
pub use histogram::{BucketHistograms, InvalidBuckets, WithBucketHistograms, DURATION_BUCKETS};
pub use observe::{Observe, ObserveFuture, ObserveLayer};
pub use parse_errors::ParseErrorOutcomes;
pub use request_id::{
    MakeUuid, RequestIdFuture, RequestIdLayer, RequestIdService, MAX_REQUEST_ID_LEN, X_REQUEST_ID,
    X_UPSTREAM_REQUEST_ID,
};

pub(crate) use body_limit::{is_length_limit, too_large};
pub(crate) use body_timeout::is_body_timeout;

/// How many shards a sharded structure has: twice as many as CPUs (so each worker thread can
/// have one to itself), rounded up to a power of two (see [`shard_of_thread`]), at most `max`.
pub(crate) fn shard_count(max: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, usize::from);
    (2 * cpus).next_power_of_two().min(max)
}

/// The shard (of `shards`) the calling thread uses: threads take one each in turn, so a few
/// request threads (a worker per CPU) each have one to themselves. The audit log's buffers and
/// the histograms' counts are sharded so.
pub(crate) fn shard_of_thread(shards: usize) -> usize {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Taken on first use (`usize::MAX` until then): a const-initialised cell is read with
        // no lazy-initialisation check.
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|shard| {
        let mut taken = shard.get();
        if taken == usize::MAX {
            taken = NEXT.fetch_add(1, Ordering::Relaxed) & (usize::MAX >> 1);
            shard.set(taken);
        }
        // (A mask, not a division, for the usual power of two.)
        if shards.is_power_of_two() {
            taken & (shards - 1)
        } else {
            taken % shards
        }
    })
}

/// A request body's own failure, found in an error's `source()` chain: what a layer that
/// reads or forwards bodies answers instead of its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFailure {
    /// Past a [`BodyLimitLayer`]'s limit: `413`.
    TooLarge = 1,
    /// A [`BodyTimeoutLayer`] gave up on it: `408`.
    TooSlow = 2,
    /// It failed otherwise, as read from the client (a malformed chunked encoding, a
    /// connection cut mid-body): `400`, the client's doing, not the upstream's. (Told by the
    /// proxy, which streams bodies.)
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    Broken = 3,
}

impl BodyFailure {
    /// What `error`, or an error it was caused by, says of the body.
    pub(crate) fn of(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        if is_length_limit(error) {
            Some(Self::TooLarge)
        } else if is_body_timeout(error) {
            Some(Self::TooSlow)
        } else {
            None
        }
    }

    /// The answer: `413` naming the limit `max` when known, or `408` with `Connection: close`.
    pub(crate) fn answer(self, max: Option<u64>) -> http::Response<bytes::Bytes> {
        match self {
            Self::TooLarge => too_large(max),
            Self::TooSlow => body_timeout::body_too_slow(),
            Self::Broken => {
                let mut response = crate::outcome::OperationOutcome::error(
                    crate::outcome::IssueType::Invalid,
                    "The request body could not be read whole: it is malformed or was cut off",
                )
                .to_response(http::StatusCode::BAD_REQUEST);
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                response
            }
        }
    }
}

/// `tower_fhir_cache_total`'s two counters for one cache, taken from the recorder once (when
/// the layer is built), so a lookup costs an atomic increment, not a registry lookup.
pub(crate) struct CacheCounts {
    pub(crate) hit: metrics::Counter,
    pub(crate) miss: metrics::Counter,
}

impl CacheCounts {
    pub(crate) fn new(cache: &'static str) -> Self {
        Self {
            hit: metrics::counter!("tower_fhir_cache_total", "cache" => cache, "result" => "hit"),
            miss: metrics::counter!("tower_fhir_cache_total", "cache" => cache, "result" => "miss"),
        }
    }
}
