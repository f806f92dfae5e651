//! One place that sees every request end: metrics, the audit record, the request's span.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;

use super::audit::{AuditDraft, AuditSink, Clock, JsonLinesAudit, QueryRecording};
use super::facts::{Facts, RequestFacts, RequestParts};
use super::request_id::X_REQUEST_ID;
use crate::client_addr::ForwardedClient;
use crate::outcome::Refusal;
use crate::tenant::TenantId;

/// Watches every request to its response: counts it in metrics, writes its audit record,
/// and runs it inside a `tracing` span.
///
/// Put it outside the gateway (or any FHIR stack), inside [`RequestIdLayer`](super::RequestIdLayer)
/// so the id is known. For each request it:
///
/// - keeps the request's [`Facts`](super::Facts), which the tenant, routing and token layers
///   fill through [`RequestFacts`] (client, issuer, tenant, upstream) while it calls and polls
///   the inner service;
/// - runs the inner service inside an `INFO` span `fhir_request` with `request_id`, `method`
///   and `path`, and records `tenant`, `client_id`, `status`, `outcome` and `latency_ms` on
///   it when the response is ready (`tracing-opentelemetry` exports it as it is);
/// - with [`metrics`](Self::metrics) on, counts it through the [`metrics`] facade (install a
///   recorder, say `metrics-exporter-prometheus`, to export them):
///   `tower_fhir_requests_total` (labels `tenant` unless
///   [`tenant_label(false)`](Self::tenant_label), and only for a request routed to an
///   upstream or a token request, `status_class` `2xx`..`5xx`, `outcome`),
///   the `tower_fhir_request_duration_seconds` histogram and the
///   `tower_fhir_requests_in_flight` gauge;
/// - with an [`audit`](Self::audit) sink, gives it one [`AuditRecord`](super::AuditRecord).
///
/// A tenant's series stay until [`forget_tenants`](Self::forget_tenants) drops them: call it
/// for the tenants removed from the directory.
///
/// A request whose client goes away before the response is recorded with status `499` and
/// outcome `client_closed`; one whose inner service panicked, with `500` and `panicked`; one
/// the server cut at its end ([`cutting_in_flight`](super::cutting_in_flight)), with `503` and
/// `shutdown`. When no subscriber wants the span (the gateway binary's log takes
/// events only) and metrics and audit are off, a request passes through untouched.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use http::{Request, Response, StatusCode};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_fhir::ops::{AuditRecord, ObserveLayer};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let records = Arc::new(Mutex::new(Vec::<AuditRecord>::new()));
/// let sink = Arc::clone(&records);
/// let observe = ObserveLayer::new().audit(move |r: AuditRecord| sink.lock().unwrap().push(r));
/// let service = observe.layer(service_fn(|_r: Request<()>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(()))
/// }));
///
/// let request = Request::get("/Patient/7?name=Smith").body(()).unwrap();
/// assert_eq!(service.oneshot(request).await.unwrap().status(), StatusCode::OK);
/// let records = records.lock().unwrap();
/// assert_eq!(records[0].interaction, Some("read"));
/// assert_eq!(records[0].resource_id.as_deref(), Some("7"));
/// assert_eq!(records[0].query.as_deref(), Some("name"), "values are not recorded by default");
/// assert_eq!(records[0].outcome, "ok");
/// # });
/// ```
#[derive(Clone)]
#[must_use]
pub struct ObserveLayer {
    config: Arc<Config>,
}

/// Cloned only when a layer already cloned is configured further: each then goes its own way.
#[derive(Clone)]
struct Config {
    audit: Option<Audit>,
    query: QueryRecording,
    metrics: Option<Arc<Metrics>>,
    tenant_label: bool,
}

/// Where the audit records go.
#[derive(Clone)]
enum Audit {
    /// The audit log, given as it is: it takes each record's parts as the request has them
    /// and writes the line straight from them, with no record made.
    Lines(Arc<JsonLinesAudit>),
    /// Any other sink: it gets each [`AuditRecord`](super::AuditRecord) on the request path.
    Sink(Arc<dyn AuditSink>),
}

/// The request metrics' handles, taken from the recorder once: a request then costs no key
/// building or registry lookup, only the handles' own work (and, for the first request of a
/// tenant, status class and outcome, one registration). Each thread keeps its own copy of the
/// counters' handles it used (see [`REQUEST_COUNTERS`]), so a count takes no lock.
struct Metrics {
    /// Which layer's these are, in the threads' copies: a new one from [`NEXT_ID`] each time
    /// a tenant's handles are forgotten, so that no thread counts through its copy of one.
    /// (Read with every count, as a plain `usize` would be: a relaxed load is the same move.)
    id: AtomicUsize,
    in_flight: metrics::Gauge,
    duration: metrics::Histogram,
    requests: RwLock<HashMap<RequestsKey, metrics::Counter, BuildHasherDefault<KeyHasher>>>,
    /// [`MAX_REQUEST_SERIES`] (fewer in tests).
    max_series: usize,
}

/// The request counters' handles a thread used, by [`Metrics::id`] and labels.
type RequestCounters =
    HashMap<(usize, RequestsKey), metrics::Counter, BuildHasherDefault<KeyHasher>>;

/// A thread's copies of the request counters' handles, and the [`FORGETS`] they were made
/// after.
#[derive(Default)]
struct ThreadCopies {
    forgets: usize,
    copies: RequestCounters,
}

thread_local! {
    static REQUEST_COUNTERS: RefCell<ThreadCopies> = RefCell::new(ThreadCopies::default());
}

/// The next [`Metrics::id`].
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// How many times any layer forgot tenants' handles: a thread whose copies were made before
/// drops them all at its next copy (a count that finds none, as every count through a layer
/// that forgot does, its id new), so the handles of series forgotten are let go.
static FORGETS: AtomicUsize = AtomicUsize::new(0);

/// The most handles a thread copies (see [`REQUEST_COUNTERS`]): when full, its copies are
/// dropped and made again as they are used, which also lets go of those of layers gone.
const MAX_THREAD_COPIES: usize = 4096;

/// `tower_fhir_requests_total`'s labels: tenant (when labelled), status class, outcome.
///
/// The status class and outcome are `&'static str`s, compared and hashed by address: the same
/// text at two addresses makes two entries, whose handles count in the same series.
#[derive(Clone, Copy)]
struct RequestsKey {
    tenant: Option<TenantId>,
    class: &'static str,
    outcome: &'static str,
}

impl PartialEq for RequestsKey {
    fn eq(&self, other: &Self) -> bool {
        self.tenant == other.tenant
            && std::ptr::eq(self.class, other.class)
            && std::ptr::eq(self.outcome, other.outcome)
    }
}

impl Eq for RequestsKey {}

impl Hash for RequestsKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let tenant = self
            .tenant
            .map_or(0, |tenant| u128::from_le_bytes(*tenant.as_bytes()));
        state.write_u64(tenant as u64);
        state.write_u64((tenant >> 64) as u64);
        state.write_u64(self.class.as_ptr() as u64);
        state.write_u64(self.outcome.as_ptr() as u64 ^ ((self.outcome.len() as u64) << 48));
    }
}

/// A multiply-rotate hash of a [`RequestsKey`]'s words: its tenants are verified ones and its
/// series are bounded, so it needs no protection against chosen collisions, only speed.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// More series than this and the tenant label is dropped for new tenants (the series count
/// of a metric must stay bounded). Series forgotten ([`ObserveLayer::forget_tenants`]) are
/// not counted: the bound is on the series the layer holds now.
const MAX_REQUEST_SERIES: usize = 100_000;

impl Metrics {
    fn new() -> Self {
        Self {
            id: AtomicUsize::new(NEXT_ID.fetch_add(1, Ordering::Relaxed)),
            in_flight: metrics::gauge!("tower_fhir_requests_in_flight"),
            duration: metrics::histogram!("tower_fhir_request_duration_seconds"),
            requests: RwLock::default(),
            max_series: MAX_REQUEST_SERIES,
        }
    }

    /// Counts one request in `tower_fhir_requests_total`, through this thread's copy of its
    /// handle when there is one.
    fn count(&self, key: RequestsKey) {
        let id = self.id.load(Ordering::Relaxed);
        let counted = REQUEST_COUNTERS.try_with(|copies| {
            let mut copies = copies.try_borrow_mut().ok()?;
            match copies.copies.get(&(id, key)) {
                Some(counter) => counter.increment(1),
                None => self.count_and_copy(&mut copies, id, key),
            }
            Some(())
        });
        if counted != Ok(Some(())) {
            self.counter(key).1.increment(1);
        }
    }

    /// Counts one request whose handle this thread has no copy of (under the layer's id now,
    /// `id`), and copies it. (Apart, and cold: the count through a copy stays as small as it
    /// was.)
    #[cold]
    #[inline(never)]
    fn count_and_copy(&self, copies: &mut ThreadCopies, id: usize, key: RequestsKey) {
        let (series, counter) = self.counter(key);
        counter.increment(1);
        // Made before a layer forgot tenants, the copies may hold handles to series
        // forgotten (and keep them from being let go): all are made again as they are used.
        let forgets = FORGETS.load(Ordering::Relaxed);
        if copies.forgets != forgets {
            copies.copies.clear();
            copies.forgets = forgets;
        }
        // (A key counted without its tenant, past the series bound, is not copied: the
        // copies stay as few as the series.)
        if series == key {
            if copies.copies.len() >= MAX_THREAD_COPIES {
                copies.copies.clear();
            }
            copies.copies.insert((id, key), counter);
        }
    }

    /// The handle `key` counts in, and its labels: `key`'s, or without the tenant once there
    /// are [`MAX_REQUEST_SERIES`].
    fn counter(&self, key: RequestsKey) -> (RequestsKey, metrics::Counter) {
        if let Some(counter) = self
            .requests
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return (key, counter.clone());
        }
        let mut series = self
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let key = if series.len() >= self.max_series {
            RequestsKey {
                tenant: None,
                ..key
            }
        } else {
            key
        };
        let counter = series.entry(key).or_insert_with(|| {
            let RequestsKey {
                tenant,
                class,
                outcome,
            } = key;
            match tenant {
                Some(tenant) => metrics::counter!(
                    "tower_fhir_requests_total",
                    "tenant" => tenant.to_string(), "status_class" => class, "outcome" => outcome
                ),
                None => metrics::counter!(
                    "tower_fhir_requests_total",
                    "status_class" => class, "outcome" => outcome
                ),
            }
        });
        (key, counter.clone())
    }

    /// Drops the handles of `tenants`' series, after `first` (the recorder's own forgetting)
    /// ran under the same lock: no request makes a series between the two; how many series it
    /// dropped.
    fn forget(&self, tenants: &HashSet<TenantId>, first: impl FnOnce()) -> usize {
        let mut series = self
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        first();
        let before = series.len();
        series.retain(|key, _| !key.tenant.is_some_and(|tenant| tenants.contains(&tenant)));
        let forgotten = before - series.len();
        if forgotten > 0 {
            // Under the lock, the new id after the handles are gone: a thread that reads it
            // finds no copy, and takes the handle from the map, which no longer has them.
            FORGETS.fetch_add(1, Ordering::Relaxed);
            self.id
                .store(NEXT_ID.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        }
        forgotten
    }

    /// Every tenant with a series.
    fn tenants(&self) -> Vec<TenantId> {
        let series = self.requests.read().unwrap_or_else(PoisonError::into_inner);
        let tenants: HashSet<TenantId> = series.keys().filter_map(|key| key.tenant).collect();
        tenants.into_iter().collect()
    }
}

impl Default for ObserveLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ObserveLayer {
    /// Spans only: no metrics, no audit records.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                audit: None,
                query: QueryRecording::default(),
                metrics: None,
                tenant_label: true,
            }),
        }
    }

    /// This layer's configuration, its own from now on if it was shared with a clone.
    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Gives every request's [`AuditRecord`](super::AuditRecord) to `sink`.
    ///
    /// A [`JsonLinesAudit`] given here gets more than the record: the request's parts as they
    /// are, from which it writes the line into its buffer with no record (no string) made.
    pub fn audit<S: AuditSink>(mut self, sink: S) -> Self {
        let mut sink = Some(sink);
        let audit = match (&mut sink as &mut dyn Any).downcast_mut::<Option<JsonLinesAudit>>() {
            Some(lines) => Audit::Lines(Arc::new(lines.take().expect("given above"))),
            None => Audit::Sink(Arc::new(sink.take().expect("given above"))),
        };
        self.config().audit = Some(audit);
        self
    }

    /// The same, for a sink already shared (which gets [`AuditRecord`](super::AuditRecord)s, made on the request
    /// path: give a [`JsonLinesAudit`] to [`audit`](Self::audit) instead).
    pub fn audit_shared(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.config().audit = Some(Audit::Sink(sink));
        self
    }

    /// How the audit record keeps the query string; default [`QueryRecording::Names`].
    pub fn audit_query(mut self, query: QueryRecording) -> Self {
        self.config().query = query;
        self
    }

    /// Counts requests in metrics. Default off. The metrics' handles are taken from the
    /// recorder installed now: install it (`metrics::set_global_recorder`, or the exporter's
    /// `install_recorder`) before this call.
    pub fn metrics(mut self, on: bool) -> Self {
        self.config().metrics = on.then(|| Arc::new(Metrics::new()));
        self
    }

    /// Labels `tower_fhir_requests_total` with the tenant. Default on; turn it off with many
    /// thousands of tenants (a series per tenant, status class and outcome). At most 100,000
    /// series are labelled; past that, new ones are counted without the tenant. A tenant's
    /// series stay until [`forget_tenants`](Self::forget_tenants) drops them.
    pub fn tenant_label(mut self, on: bool) -> Self {
        self.config().tenant_label = on;
        self
    }

    /// Drops this layer's (and its clones') handles of `tenants`' `tower_fhir_requests_total`
    /// series: call it for tenants removed from the directory, whose series would otherwise
    /// stay for the life of the process (memory, and the scrape's size). The series forgotten
    /// no longer count toward the 100,000 labelled, and a request for one of these tenants
    /// later (one added again) counts in a new series, from zero. Returns how many series it
    /// dropped.
    ///
    /// The recorder holds the series too: with [`BucketHistograms`](super::BucketHistograms),
    /// call its [`forget_labelled`](super::BucketHistograms::forget_labelled) through
    /// [`forget_tenants_with`](Self::forget_tenants_with) (it then renders them no more); `metrics-exporter-prometheus` alone drops a series only once it
    /// is idle for its `idle_timeout`. Give Prometheus a scrape or two of the final counts
    /// first, and the tenant's last requests time to end: call it some minutes after the
    /// tenant went (the gateway binary waits `metrics_removed_tenant_grace_seconds`, 300 by
    /// default). A request for one of them still being answered counts in a new series.
    ///
    /// Nothing is added to a request's work: each thread lets go of its copies of the
    /// handles (see [`tenant_label`](Self::tenant_label)) the next time it makes one.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use http::{Request, Response};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_fhir::ops::{BucketHistograms, ObserveLayer, RequestFacts, DURATION_BUCKETS};
    /// use tower_fhir::tenant::TenantId;
    ///
    /// // (In an application the recorder is installed globally; here, for this thread only.)
    /// let histograms = BucketHistograms::new(&DURATION_BUCKETS).unwrap();
    /// let recorder = histograms.over(metrics::NoopRecorder);
    /// let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let observe =
    ///     metrics::with_local_recorder(&recorder, || ObserveLayer::new().metrics(true));
    /// let gone = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
    /// let kept = TenantId::parse("0b5e0bd5-5a43-4c6b-9d43-2f1d8c3a4b6e").unwrap();
    /// // A request routed for `tenant` (the routing layer says so in the gateway).
    /// let request = |tenant: TenantId| {
    ///     let service = observe.layer(service_fn(move |_r: Request<()>| async move {
    ///         RequestFacts::set_tenant(tenant);
    ///         RequestFacts::set_upstream(&Arc::from("http://fhir.example"));
    ///         Ok::<_, std::convert::Infallible>(Response::new(()))
    ///     }));
    ///     let request = Request::get("/Patient/1").body(()).unwrap();
    ///     metrics::with_local_recorder(&recorder, || runtime.block_on(service.oneshot(request)))
    ///         .unwrap();
    /// };
    /// request(gone);
    /// request(gone);
    /// request(kept);
    /// let series = |tenant: TenantId, count: u32| {
    ///     format!("tower_fhir_requests_total{{outcome=\"ok\",status_class=\"2xx\",tenant=\"{tenant}\"}} {count}\n")
    /// };
    /// assert!(histograms.render().contains(&series(gone, 2)));
    ///
    /// // The tenant was removed some minutes ago: its series go, the recorder's first.
    /// let forgotten = observe.forget_tenants_with(&[gone], || {
    ///     assert_eq!(histograms.forget_labelled("tenant", &[&gone.to_string()]), 1);
    /// });
    /// assert_eq!(forgotten, 1);
    /// let page = histograms.render();
    /// assert!(!page.contains(&gone.to_string()), "{page}");
    /// assert!(page.contains(&series(kept, 1)), "{page}");
    /// assert_eq!(observe.counted_tenants(), vec![kept]);
    ///
    /// // Added again, it counts from zero.
    /// request(gone);
    /// assert!(histograms.render().contains(&series(gone, 1)));
    /// ```
    pub fn forget_tenants(&self, tenants: &[TenantId]) -> usize {
        self.forget_tenants_with(tenants, || {})
    }

    /// [`forget_tenants`](Self::forget_tenants), with `recorder` (which forgets the recorder's
    /// series of them: [`BucketHistograms::forget_labelled`](super::BucketHistograms::forget_labelled))
    /// run first, under the lock a request takes to make a series: one made between the two
    /// would be a handle the layer no longer holds on a series the recorder shows for ever
    /// (and a tenant added back would count on from it). `recorder` runs even when the layer
    /// counts no metrics or holds none of their series.
    pub fn forget_tenants_with(&self, tenants: &[TenantId], recorder: impl FnOnce()) -> usize {
        match &self.config.metrics {
            Some(metrics) if !tenants.is_empty() => {
                metrics.forget(&tenants.iter().copied().collect(), recorder)
            }
            _ => {
                recorder();
                0
            }
        }
    }

    /// The tenants that have a `tower_fhir_requests_total` series in this layer now, in no
    /// particular order: those to check against the directory for any removed that
    /// [`forget_tenants`](Self::forget_tenants) was not told of.
    pub fn counted_tenants(&self) -> Vec<TenantId> {
        self.config
            .metrics
            .as_ref()
            .map_or_else(Vec::new, |metrics| metrics.tenants())
    }
}

impl fmt::Debug for ObserveLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserveLayer")
            .field("audit", &self.config.audit.is_some())
            .field("query", &self.config.query)
            .field("metrics", &self.config.metrics.is_some())
            .field("tenant_label", &self.config.tenant_label)
            .finish()
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`ObserveLayer`] makes.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Observe<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observe")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Observe<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let span = tracing::info_span!(
            "fhir_request",
            request_id = request_id(&request)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            method = %request.method(),
            path = request.uri().path(),
            tenant = tracing::field::Empty,
            client_id = tracing::field::Empty,
            status = tracing::field::Empty,
            outcome = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let config = &self.config;
        if span.is_disabled() && config.audit.is_none() && config.metrics.is_none() {
            // Nobody listens: the request passes as it came.
            return ObserveFuture {
                future: self.inner.call(request),
                watch: None,
                polling: false,
            };
        }
        let start = Instant::now();
        let parts = config.audit.is_some().then(|| {
            RequestParts::new(
                start,
                request.method().clone(),
                ForwardedClient::source(request.extensions()),
                request.uri(),
                request_id(&request),
            )
        });
        if let Some(metrics) = &config.metrics {
            metrics.in_flight.increment(1.0);
        }
        // Finished `500`/`panicked` if the call panics (a bug of an inner layer as the request
        // is called): the request is recorded, and counted out of those in flight, all the same.
        let mut calling = Calling(Some(Watch {
            config: Arc::clone(&self.config),
            facts: Facts::default(),
            parts,
            span,
            start,
        }));
        let future = {
            let watch = calling.0.as_mut().expect("made above");
            let _entered = watch.span.enter();
            let inner = &mut self.inner;
            RequestFacts::watching(&mut watch.facts, || inner.call(request))
        };
        ObserveFuture {
            future,
            watch: calling.0.take(),
            polling: false,
        }
    }
}

/// The request's `X-Request-Id`. (Not tower-http's `RequestId` extension, cheaper to find: a
/// `SetRequestIdLayer` of another header outside, or one that found the extension already
/// there, leaves it naming another id than the header the upstream and the client see.)
fn request_id<B>(request: &Request<B>) -> Option<&http::HeaderValue> {
    request.headers().get(&X_REQUEST_ID)
}

/// A request's [`Watch`] while its inner service is called: finished `500`/`panicked` if
/// dropped with it, as a panic of the call unwinds.
struct Calling(Option<Watch>);

impl Drop for Calling {
    fn drop(&mut self) {
        if let Some(watch) = self.0.take() {
            watch.finish(500, "panicked");
        }
    }
}

/// One request's bookkeeping, finished when its response is ready or its future dropped.
struct Watch {
    config: Arc<Config>,
    /// What the inner layers learned.
    facts: Facts,
    /// The request's parts, when there is an audit.
    parts: Option<RequestParts>,
    span: Span,
    start: Instant,
}

impl Watch {
    fn finish(self, status: u16, outcome: &'static str) {
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(self.start);
        let config = &self.config;
        let span = &self.span;
        if !span.is_disabled() {
            let facts = &self.facts;
            if let Some(tenant) = facts.tenant {
                span.record("tenant", tracing::field::display(tenant));
            }
            if let Some(client) = facts.client_id() {
                span.record("client_id", client.as_str());
            }
            span.record("status", status);
            span.record("outcome", outcome);
            span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
        }
        if let Some(metrics) = &config.metrics {
            let class = match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            };
            metrics.in_flight.decrement(1.0);
            metrics.duration.record(elapsed.as_secs_f64());
            let tenant = labelled_tenant(&self.facts, config.tenant_label);
            metrics.count(RequestsKey {
                tenant,
                class,
                outcome,
            });
        }
        let (Some(audit), Some(parts)) = (&config.audit, self.parts) else {
            return;
        };
        let draft = AuditDraft::new(parts, self.facts, status, outcome, elapsed, config.query);
        match audit {
            Audit::Lines(lines) => lines.draft(done, draft),
            Audit::Sink(sink) => sink.record(draft.into_record(Clock::at(done))),
        }
    }
}

/// The tenant `tower_fhir_requests_total` names: one the request was routed for (it has an
/// upstream), or the tenant of a token request (its client's, so a registered one); not one
/// only a token named (an identity provider trusted for any tenant lets a token name any
/// GUID, and each would be a series of its own). `None` when the label is off.
fn labelled_tenant(facts: &Facts, label: bool) -> Option<TenantId> {
    if label && (facts.upstream.is_some() || facts.claims.is_none()) {
        facts.tenant
    } else {
        None
    }
}

pin_project! {
    /// The response future of [`Observe`].
    pub struct ObserveFuture<F> {
        #[pin]
        future: F,
        watch: Option<Watch>,
        // Set while the inner future is polled: still set after, a panic left its poll.
        polling: bool,
    }

    impl<F> PinnedDrop for ObserveFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(watch) = this.watch.take() {
                // Dropped while a panic unwinds it, or after a panic left its poll and was
                // caught (one of the inner layers' bugs): the gateway failed the request, not
                // the client that left.
                if std::thread::panicking() || *this.polling {
                    watch.finish(500, "panicked");
                } else if super::CUTTING_IN_FLIGHT.load(std::sync::atomic::Ordering::Relaxed) {
                    // The server gave up on it (its shutdown grace period over).
                    watch.finish(503, "shutdown");
                } else {
                    watch.finish(499, "client_closed");
                }
            }
        }
    }
}

impl<F, B, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.watch.as_mut() {
            Some(watch) => {
                let _entered = watch.span.enter();
                let future = this.future;
                *this.polling = true;
                let poll = RequestFacts::watching(&mut watch.facts, || future.poll(cx));
                *this.polling = false;
                ready!(poll)
            }
            None => ready!(this.future.poll(cx)),
        };
        if let Some(watch) = this.watch.take() {
            let _entered = watch.span.clone().entered();
            match &result {
                Ok(response) => {
                    let outcome = response
                        .extensions()
                        .get::<Refusal>()
                        .map_or("ok", |refusal| refusal.0);
                    watch.finish(response.status().as_u16(), outcome);
                }
                Err(_) => watch.finish(500, "error"),
            }
        }
        Poll::Ready(result)
    }
}

impl<F> fmt::Debug for ObserveFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserveFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::VerifiedClaims;
    use crate::ops::AuditRecord;
    use crate::outcome::{IssueType, OperationOutcome};
    use crate::tenant::TenantId;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use tower::ServiceExt;

    type Records = Arc<Mutex<Vec<AuditRecord>>>;

    fn observed<S>(inner: S, query: QueryRecording) -> (Observe<S>, Records) {
        let records: Records = Arc::default();
        let sink = Arc::clone(&records);
        let layer = ObserveLayer::new()
            .audit(move |r: AuditRecord| sink.lock().unwrap().push(r))
            .audit_query(query)
            .metrics(true);
        (layer.layer(inner), records)
    }

    #[tokio::test]
    async fn the_facts_the_layers_learn_reach_the_record() {
        let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        let inner = tower::service_fn(move |_r: Request<()>| async move {
            let claims = serde_json::json!({"exp": 1, "iss": "https://idp", "client_id": "app"});
            RequestFacts::set_claims(
                &VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap(),
            );
            RequestFacts::set_tenant(tenant);
            RequestFacts::set_upstream(&Arc::from("http://fhir.example"));
            Ok::<_, Infallible>(Response::new(()))
        });
        let (service, records) = observed(inner, QueryRecording::Full);
        let request = Request::post("/Observation/_search?code=x")
            .header("x-request-id", "abc")
            .body(())
            .unwrap();
        service.oneshot(request).await.unwrap();
        let record = records.lock().unwrap().pop().unwrap();
        assert_eq!(record.request_id.as_deref(), Some("abc"));
        assert_eq!(record.client_id.as_deref(), Some("app"));
        assert_eq!(record.issuer.as_deref(), Some("https://idp"));
        assert_eq!(record.tenant, Some(tenant));
        assert_eq!(record.interaction, Some("search"));
        assert_eq!(record.resource_type.as_deref(), Some("Observation"));
        assert_eq!(record.query.as_deref(), Some("code=x"));
        assert_eq!(record.upstream.as_deref(), Some("http://fhir.example"));
        assert_eq!((record.status, record.outcome), (200, "ok"));
    }

    #[test]
    fn only_a_routed_tenant_or_a_token_requests_labels_the_request_counter() {
        let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        let claims = serde_json::json!({"exp": 1, "iss": "https://idp", "client_id": "app"});
        let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
        let routed = Facts {
            claims: Some(claims.clone()),
            tenant: Some(tenant),
            upstream: Some(Arc::from("http://fhir.example")),
            ..Facts::default()
        };
        assert_eq!(labelled_tenant(&routed, true), Some(tenant));
        assert_eq!(labelled_tenant(&routed, false), None);
        // A token naming a tenant the directory does not know (refused, never routed).
        let named_only = Facts {
            claims: Some(claims),
            tenant: Some(tenant),
            ..Facts::default()
        };
        assert_eq!(labelled_tenant(&named_only, true), None);
        // A token request, for its client's tenant.
        let token_request = Facts {
            client: Some("app".into()),
            tenant: Some(tenant),
            ..Facts::default()
        };
        assert_eq!(labelled_tenant(&token_request, true), Some(tenant));
    }

    #[tokio::test]
    async fn a_clone_configured_further_goes_its_own_way() {
        let records: Records = Arc::default();
        let sink = Arc::clone(&records);
        let plain = ObserveLayer::new();
        let kept = plain.clone();
        // Configuring a layer that is shared with a clone used to panic.
        let audited = plain.audit(move |r: AuditRecord| sink.lock().unwrap().push(r));
        let ok = || {
            tower::service_fn(|_r: Request<()>| async { Ok::<_, Infallible>(Response::new(())) })
        };
        for layer in [&kept, &audited] {
            layer
                .layer(ok())
                .oneshot(Request::get("/Patient/1").body(()).unwrap())
                .await
                .unwrap();
        }
        assert_eq!(
            records.lock().unwrap().len(),
            1,
            "the clone has no audit sink"
        );
        assert!(format!("{kept:?}").contains("audit: false"), "{kept:?}");
    }

    #[tokio::test]
    async fn a_refusal_is_the_outcome_and_a_token_request_is_named() {
        let inner = tower::service_fn(|_r: Request<()>| async {
            Ok::<_, Infallible>(
                OperationOutcome::error(IssueType::Forbidden, "no")
                    .to_response(http::StatusCode::FORBIDDEN),
            )
        });
        let (service, records) = observed(inner, QueryRecording::Names);
        service
            .clone()
            .oneshot(Request::get("/Patient/1").body(()).unwrap())
            .await
            .unwrap();
        service
            .oneshot(Request::post("/oauth/token").body(()).unwrap())
            .await
            .unwrap();
        let records = records.lock().unwrap();
        assert_eq!((records[0].status, records[0].outcome), (403, "forbidden"));
        assert_eq!(records[1].interaction, Some("token"));
        assert_eq!(records[1].resource_type, None);
    }

    #[test]
    fn the_span_carries_the_request_id_tenant_client_status_and_latency() {
        let buffer = crate::testing::LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(buffer.writer())
            .finish();
        let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let inner = tower::service_fn(move |_r: Request<()>| async move {
                RequestFacts::set_client_id("app");
                RequestFacts::set_tenant(tenant);
                Ok::<_, Infallible>(Response::new(()))
            });
            let service = ObserveLayer::new().layer(inner);
            let request = Request::get("/Patient/1")
                .header("x-request-id", "span-1")
                .body(())
                .unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(service.oneshot(request)).unwrap();
        });
        let written = buffer.take();
        let closed: serde_json::Value = written
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .find(|event| event["span"]["name"] == "fhir_request")
            .unwrap_or_else(|| panic!("no fhir_request span closed: {written}"));
        let span = &closed["span"];
        assert_eq!(span["request_id"], "span-1");
        assert_eq!(span["method"], "GET");
        assert_eq!(span["path"], "/Patient/1");
        assert_eq!(span["tenant"], tenant.to_string());
        assert_eq!(span["client_id"], "app");
        assert_eq!(span["status"], 200);
        assert_eq!(span["outcome"], "ok");
        assert!(span["latency_ms"].as_f64().is_some(), "{span}");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_is_recorded() {
        let inner = tower::service_fn(|_r: Request<()>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(()))
        });
        let (mut service, records) = observed(inner, QueryRecording::None);
        let future = service.call(Request::delete("/Patient/1").body(()).unwrap());
        drop(future);
        let record = records.lock().unwrap().pop().unwrap();
        assert_eq!((record.status, record.outcome), (499, "client_closed"));
        assert_eq!(record.interaction, Some("delete"));
    }

    /// A service whose answer panics once polled a second time.
    fn panics_after_a_turn() -> impl Service<
        Request<()>,
        Response = Response<()>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<()>, Infallible>> + Send,
    > {
        tower::service_fn(|_r: Request<()>| async {
            tokio::task::yield_now().await;
            panic!("a bug in an inner layer");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(Response::new(()))
        })
    }

    #[tokio::test]
    async fn a_panic_is_recorded_as_the_gateways_failure() {
        let (mut service, records) = observed(panics_after_a_turn(), QueryRecording::None);
        let future = service.call(Request::get("/Patient/1").body(()).unwrap());
        let joined = tokio::spawn(future).await;
        assert!(joined.unwrap_err().is_panic());
        let record = records.lock().unwrap().pop().unwrap();
        assert_eq!((record.status, record.outcome), (500, "panicked"));
    }

    #[tokio::test]
    async fn a_panic_caught_outside_is_recorded_as_the_gateways_failure_once_dropped() {
        use futures::FutureExt;
        let (mut service, records) = observed(panics_after_a_turn(), QueryRecording::None);
        let mut future = Box::pin(service.call(Request::get("/Patient/1").body(()).unwrap()));
        // Caught around the future (as a server answering 500 would), the future kept.
        let caught = std::panic::AssertUnwindSafe(future.as_mut())
            .catch_unwind()
            .await;
        assert!(caught.is_err());
        assert!(
            records.lock().unwrap().is_empty(),
            "recorded only once dropped"
        );
        drop(future);
        let record = records.lock().unwrap().pop().unwrap();
        assert_eq!((record.status, record.outcome), (500, "panicked"));
    }

    #[test]
    fn a_panic_as_the_request_is_called_is_recorded_as_the_gateways_failure() {
        let inner = tower::service_fn(|request: Request<()>| {
            RequestFacts::set_client_id("app");
            assert!(request.uri().path() != "/Patient/1", "a bug in call");
            std::future::ready(Ok::<_, Infallible>(Response::new(())))
        });
        let (mut service, records) = observed(inner, QueryRecording::Full);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.call(
                Request::get("/Patient/1?name=x")
                    .header("x-request-id", "r-7")
                    .body(())
                    .unwrap(),
            )
        }));
        assert!(panicked.is_err());
        let record = records.lock().unwrap().pop().expect("recorded");
        assert_eq!((record.status, record.outcome), (500, "panicked"));
        assert_eq!(record.request_id.as_deref(), Some("r-7"));
        assert_eq!(
            record.client_id.as_deref(),
            Some("app"),
            "what was learned before"
        );
        assert_eq!(
            (
                record.method.as_str(),
                record.interaction,
                record.query.as_deref()
            ),
            ("GET", Some("read"), Some("name=x"))
        );
        assert!(!RequestFacts::is_watched());
        // The next request is recorded as it goes.
        let answered = service.call(Request::get("/Patient/2").body(()).unwrap());
        drop(answered);
        assert_eq!(records.lock().unwrap().len(), 1);
    }

    /// A service whose `call` panics on a path starting `/panic`.
    #[derive(Clone)]
    struct PanicsInCall;

    impl Service<Request<()>> for PanicsInCall {
        type Response = Response<()>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<()>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<()>) -> Self::Future {
            assert!(!request.uri().path().starts_with("/panic"), "a bug in call");
            RequestFacts::set_client_id("app");
            std::future::ready(Ok(Response::new(())))
        }
    }

    fn tenant(n: u8) -> TenantId {
        TenantId::parse(&format!("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e{n:02x}")).unwrap()
    }

    fn ok_for(tenant: TenantId) -> RequestsKey {
        RequestsKey {
            tenant: Some(tenant),
            class: "2xx",
            outcome: "ok",
        }
    }

    /// `tenant`'s `2xx`/`ok` count on `page` (or the series without a tenant's), if any.
    fn counted(page: &str, tenant: Option<TenantId>) -> Option<u64> {
        let labels = match tenant {
            Some(tenant) => format!("{{outcome=\"ok\",status_class=\"2xx\",tenant=\"{tenant}\"}} "),
            None => "{outcome=\"ok\",status_class=\"2xx\"} ".to_owned(),
        };
        let series = format!("tower_fhir_requests_total{labels}");
        page.lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
    }

    /// A request that makes a series of a tenant being forgotten waits for the forgetting to
    /// end, the recorder's included: its series is then one the layer holds and the recorder
    /// shows, from zero. (With the recorder's forgotten first and apart, the request could
    /// make one between the two: shown for ever, and held by no layer to forget it again.)
    #[test]
    fn a_series_made_while_a_tenant_is_forgotten_is_held_and_shown() {
        let (_, histograms, recorder) = crate::ops::histogram::tests::over_prometheus();
        let metrics = Metrics::new();
        let gone = tenant(9);
        let failed = RequestsKey {
            tenant: Some(gone),
            class: "5xx",
            outcome: "error",
        };
        metrics::with_local_recorder(&recorder, || metrics.count(ok_for(gone)));
        std::thread::scope(|scope| {
            metrics.forget(&HashSet::from([gone]), || {
                histograms.forget_labelled("tenant", &[&gone.to_string()]);
                // A request, on another thread, meanwhile.
                scope.spawn(|| {
                    metrics::with_local_recorder(&recorder, || metrics.count(failed));
                });
                std::thread::sleep(std::time::Duration::from_millis(50));
            });
        });
        let page = histograms.render();
        assert_eq!(metrics.tenants(), vec![gone], "{page}");
        assert!(
            page.contains(&format!(
                "tower_fhir_requests_total{{outcome=\"error\",status_class=\"5xx\",tenant=\"{gone}\"}} 1"
            )),
            "{page}"
        );
        assert_eq!(counted(&page, Some(gone)), None, "{page}");
        // Forgotten again, it is gone.
        metrics.forget(&HashSet::from([gone]), || {
            histograms.forget_labelled("tenant", &[&gone.to_string()]);
        });
        assert!(!histograms.render().contains(&gone.to_string()));
    }

    #[test]
    fn forgetting_tenants_frees_their_room_under_the_bound() {
        let (_, histograms, recorder) = crate::ops::histogram::tests::over_prometheus();
        let mut metrics = Metrics::new();
        metrics.max_series = 3;
        let (a, b, c, d) = (tenant(1), tenant(2), tenant(3), tenant(4));
        metrics::with_local_recorder(&recorder, || {
            for tenant in [a, a, b, c, d] {
                metrics.count(ok_for(tenant));
            }
        });
        let page = histograms.render();
        assert_eq!(counted(&page, Some(a)), Some(2), "{page}");
        assert_eq!(counted(&page, Some(c)), Some(1), "{page}");
        assert_eq!(counted(&page, Some(d)), None, "past the bound: {page}");
        assert_eq!(counted(&page, None), Some(1), "{page}");
        let mut tenants = metrics.tenants();
        tenants.sort_by_key(ToString::to_string);
        assert_eq!(tenants, [a, b, c]);

        let forgotten = HashSet::from([a, b]);
        assert_eq!(metrics.forget(&forgotten, || {}), 2);
        assert_eq!(metrics.forget(&forgotten, || {}), 0, "forgotten once");
        metrics::with_local_recorder(&recorder, || metrics.count(ok_for(d)));
        let page = histograms.render();
        assert_eq!(
            counted(&page, Some(d)),
            Some(1),
            "labelled, in the room forgetting made: {page}"
        );
    }

    #[test]
    fn a_tenant_forgotten_counts_again_from_zero_through_no_threads_old_copy() {
        let (_, histograms, recorder) = crate::ops::histogram::tests::over_prometheus();
        let layer = metrics::with_local_recorder(&recorder, || ObserveLayer::new().metrics(true));
        let metrics = Arc::clone(layer.config.metrics.as_ref().unwrap());
        let (gone, kept) = (tenant(5), tenant(6));
        // Counted on this thread and on another, each keeping copies of the handles.
        let count =
            |tenant| metrics::with_local_recorder(&recorder, || metrics.count(ok_for(tenant)));
        count(gone);
        count(kept);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                count(gone);
                count(kept);
            });
        });
        let page = histograms.render();
        assert_eq!(counted(&page, Some(gone)), Some(2), "{page}");

        histograms.forget_labelled("tenant", &[&gone.to_string()]);
        assert_eq!(layer.forget_tenants(&[gone]), 1);
        assert_eq!(layer.counted_tenants(), [kept]);
        assert!(!histograms.render().contains(&gone.to_string()));
        // Added again: each thread counts it in a new series, not through the copy it had.
        count(gone);
        std::thread::scope(|scope| {
            scope.spawn(|| count(gone));
        });
        count(kept);
        let page = histograms.render();
        assert_eq!(counted(&page, Some(gone)), Some(2), "{page}");
        assert_eq!(counted(&page, Some(kept)), Some(3), "{page}");
        assert_eq!(
            layer.forget_tenants(&[]),
            0,
            "nothing to forget, nothing done"
        );
        assert_eq!(
            ObserveLayer::new().forget_tenants(&[kept]),
            0,
            "metrics off"
        );
    }

    #[test]
    fn requests_in_flight_count_each_request_once_also_when_call_panics() {
        let (text, histograms, recorder) = crate::ops::histogram::tests::over_prometheus();
        let mut service =
            metrics::with_local_recorder(&recorder, || ObserveLayer::new().metrics(true))
                .layer(PanicsInCall);
        let in_flight = || {
            histograms.publish();
            text.render()
                .lines()
                .find(|line| line.starts_with("tower_fhir_requests_in_flight "))
                .map(str::to_owned)
        };
        let pending = service.call(Request::get("/Patient/1").body(()).unwrap());
        assert_eq!(
            in_flight().as_deref(),
            Some("tower_fhir_requests_in_flight 1")
        );
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.call(Request::get("/panic").body(()).unwrap())
        }));
        assert!(panicked.is_err());
        assert_eq!(
            in_flight().as_deref(),
            Some("tower_fhir_requests_in_flight 1"),
            "counted in and out"
        );
        drop(pending);
        assert_eq!(
            in_flight().as_deref(),
            Some("tower_fhir_requests_in_flight 0")
        );
        assert!(
            !RequestFacts::is_watched(),
            "the panic left no facts watched"
        );
    }
}
