//! The capability cache: a second middleware, placed between routing and the proxy, that keeps
//! each tenant's upstream CapabilityStatement for a while, so clients asking for `metadata`
//! again and again do not reach the hospital each time.
//!
//! It keeps only what the metadata layer rewrites (a JSON CapabilityStatement or
//! `Conformance`, uncompressed, with a JSON `Content-Type`), per tenant, upstream, negotiated
//! release, query string and `Accept`/`Accept-Language`: an XML statement asked for with
//! `_format=xml` goes to the client as the upstream sent it and is never kept, so it never
//! reaches a client that asked for JSON.
//!
//! Any token holder chooses the query and `Accept` it asks with, so the entries a client can
//! make are many: what they hold is bounded in bytes (each entry weighs its statement and its
//! key, and at least the byte bound over the entry bound), and so are the statements being
//! read on a miss ([`MAX_STATEMENT_READS`] at once for one tenant, so one tenant's clients
//! cannot hold up another's).
//!
//! It is a shared cache, so it follows what the upstream says of its answer (RFC 9111): a
//! statement sent with `Cache-Control: no-store`, `no-cache` or `private`, with a `Vary` on a
//! header the key does not hold (or `*`), or already stale, is served and not kept; `s-maxage`,
//! else `max-age`, else `Expires` (against the upstream's `Date`), less its `Age`, shortens
//! how long it is kept (never beyond the layer's own lifetime).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::Semaphore;
use tower_layer::Layer;
use tower_service::Service;

use super::statement::{json_statement, plain_json, read_statement};
use super::{is_metadata_path, ResponseFuture};
use crate::body::ResponseBody;
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A Tower layer, placed between routing and the proxy, that caches each tenant's upstream
/// JSON CapabilityStatement (`GET metadata`) per upstream, FHIR release, query and requested
/// format; anything else (an XML statement, an error) passes through and is not kept.
///
/// A `GET metadata` for a tenant served in-process goes to the service inside, uncached; if
/// that has no statement (it answers 404 or 405), the answer says so to the
/// [`MetadataLayer`](super::MetadataLayer), which answers with its generated statement.
#[derive(Clone)]
#[must_use]
pub struct CapabilityCacheLayer {
    cache: Arc<StatementCache>,
    reads: Reads,
    ttl: std::time::Duration,
    capacity: u64,
    max_bytes: u64,
}

/// The bytes a [`CapabilityCacheLayer`] keeps at most unless told
/// ([`max_bytes`](CapabilityCacheLayer::max_bytes)): 64 MiB.
pub const DEFAULT_CAPABILITY_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// At most this many upstream statements missing from the cache are read at once for one
/// tenant (each up to 8 MiB); more of that tenant's wait their turn, then look in the cache
/// again.
pub const MAX_STATEMENT_READS: usize = 4;

/// Each tenant's turns to read a statement (forgotten after a while unused).
type Reads = moka::future::Cache<crate::tenant::TenantId, Arc<Semaphore>>;

fn reads() -> Reads {
    moka::future::Cache::builder()
        .max_capacity(100_000)
        .time_to_idle(std::time::Duration::from_secs(600))
        .build()
}

type StatementCache = moka::future::Cache<StatementKey, CachedStatement>;

/// Everything that can change an upstream's answer to `GET metadata`.
#[derive(Clone, PartialEq, Eq, Hash)]
struct StatementKey {
    tenant: crate::tenant::TenantId,
    /// The upstream's base URL and release.
    upstream: Arc<str>,
    upstream_release: FhirVersion,
    /// The release negotiated with the client, if any.
    release: Option<FhirVersion>,
    /// The query string as sent (`_format`, `mode`, `_summary`, ...).
    query: Option<Box<str>>,
    /// Every `Accept` value, as sent.
    accept: Box<[HeaderValue]>,
    /// Every `Accept-Language` value, as sent.
    accept_language: Box<[HeaderValue]>,
}

impl StatementKey {
    /// About the bytes the key holds.
    fn bytes(&self) -> usize {
        let values = self.accept.iter().chain(self.accept_language.iter());
        std::mem::size_of::<Self>()
            + self.upstream.len()
            + self.query.as_ref().map_or(0, |query| query.len())
            + values.map(|value| value.len() + 16).sum::<usize>()
    }

    /// The key of a `GET metadata` routed to a tenant's upstream; `None` for anything else.
    /// `metadata` is read as the proxy forwards it ([`is_metadata_path`]: `//metadata` and
    /// `/metadata/` too, under the same key as `/metadata`).
    fn of<B>(request: &Request<B>) -> Option<Self> {
        if request.method() != Method::GET || !is_metadata_path(request.uri().path()) {
            return None;
        }
        let extensions = request.extensions();
        let tenant = extensions.get::<crate::tenant::TenantId>().copied()?;
        let upstream = extensions.get::<crate::route::Upstream>()?;
        let headers = request.headers();
        Some(Self {
            tenant,
            upstream: Arc::from(upstream.base().as_str()),
            upstream_release: upstream.fhir_version(),
            release: extensions.get::<FhirVersion>().copied(),
            query: request.uri().query().map(Box::from),
            accept: headers.get_all(header::ACCEPT).iter().cloned().collect(),
            accept_language: headers
                .get_all(header::ACCEPT_LANGUAGE)
                .iter()
                .cloned()
                .collect(),
        })
    }
}

/// A cached statement: its `Content-Type` and body, all a response from the cache carries,
/// and how long it is kept.
#[derive(Clone)]
struct CachedStatement {
    content_type: Option<HeaderValue>,
    body: Bytes,
    lifetime: Duration,
}

/// Keeps each statement for its own lifetime.
struct StatementLifetime;

impl moka::Expiry<StatementKey, CachedStatement> for StatementLifetime {
    fn expire_after_create(
        &self,
        _: &StatementKey,
        statement: &CachedStatement,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(statement.lifetime)
    }

    fn expire_after_update(
        &self,
        _: &StatementKey,
        statement: &CachedStatement,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(statement.lifetime)
    }
}

/// The request headers whose values the key holds, or whose answers differ only in what the
/// cache does not keep: a `Vary` naming only these still lets a statement be kept.
/// (`Accept-Encoding`: only an uncoded statement is kept, which any client takes; `Origin`:
/// only the CORS headers differ, and the cache keeps none.)
const VARY_COVERED: [&str; 4] = ["accept", "accept-language", "accept-encoding", "origin"];

/// How long a shared cache may keep a response with these headers, at most `ceiling`: `None`
/// when it may not keep it at all (RFC 9111 sections 3, 4.2 and 5.2.2). A directive that
/// cannot be read, two different values of one, or an `Expires` that is not a date counts as
/// stale.
fn freshness(headers: &http::HeaderMap, ceiling: Duration) -> Option<Duration> {
    let mut max_age = None;
    let mut s_maxage = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        for directive in value.to_str().ok()?.split(',') {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim())),
                None => (directive.trim(), None),
            };
            let seconds = || -> Option<u64> {
                let digits = argument?.trim_matches('"');
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Past 2^31 seconds RFC 9111 has a cache take 2^31.
                Some(digits.parse().unwrap_or(u64::MAX).min(1 << 31))
            };
            let slot = if name.eq_ignore_ascii_case("no-store")
                || name.eq_ignore_ascii_case("no-cache")
                || name.eq_ignore_ascii_case("private")
            {
                return None;
            } else if name.eq_ignore_ascii_case("s-maxage") {
                &mut s_maxage
            } else if name.eq_ignore_ascii_case("max-age") {
                &mut max_age
            } else {
                continue;
            };
            let seconds = seconds()?;
            if slot.is_some_and(|was| was != seconds) {
                return None;
            }
            *slot = Some(seconds);
        }
    }
    for value in headers.get_all(header::VARY) {
        for field in value.to_str().ok()?.split(',') {
            let field = field.trim();
            if !field.is_empty() && !VARY_COVERED.iter().any(|c| field.eq_ignore_ascii_case(c)) {
                return None;
            }
        }
    }
    let lifetime = match s_maxage.or(max_age) {
        Some(seconds) => Duration::from_secs(seconds),
        None => match headers.get(header::EXPIRES) {
            Some(expires) => {
                let expires = httpdate::parse_http_date(expires.to_str().ok()?).ok()?;
                let date = headers
                    .get(header::DATE)
                    .and_then(|date| httpdate::parse_http_date(date.to_str().ok()?).ok())
                    .unwrap_or_else(std::time::SystemTime::now);
                expires.duration_since(date).ok()?
            }
            None => ceiling,
        },
    };
    let age = match headers.get(header::AGE) {
        Some(age) => {
            let age = age.to_str().ok()?;
            if age.is_empty() || !age.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Duration::from_secs(age.parse().unwrap_or(u64::MAX))
        }
        None => Duration::ZERO,
    };
    Some(lifetime.saturating_sub(age).min(ceiling)).filter(|left| !left.is_zero())
}

impl CapabilityCacheLayer {
    /// Keeps statements for `ttl` (less when the upstream's `Cache-Control` or `Expires` says
    /// so; not at all when it says `no-store`, `no-cache` or `private`), for at most
    /// `capacity` entries (tenant, upstream, release, query and requested format) and
    /// [`DEFAULT_CAPABILITY_CACHE_BYTES`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fhir::metadata::CapabilityCacheLayer;
    ///
    /// // Five minutes, 1,000 entries, and 16 MiB of statements at most.
    /// let cache = CapabilityCacheLayer::new(Duration::from_secs(300), 1_000).max_bytes(16 << 20);
    /// assert_eq!(cache.entry_count(), 0);
    /// ```
    pub fn new(ttl: std::time::Duration, capacity: u64) -> Self {
        Self {
            cache: Arc::new(statement_cache(capacity, DEFAULT_CAPABILITY_CACHE_BYTES)),
            reads: reads(),
            ttl,
            capacity,
            max_bytes: DEFAULT_CAPABILITY_CACHE_BYTES,
        }
    }

    /// Keeps at most `max_bytes` of statements and their keys (each entry counted as at least
    /// `max_bytes / capacity`, so the entry bound holds too); a statement larger than that is
    /// not kept, nor anything under a bound of 1 KiB (or with a capacity of 0). Forgets what
    /// the cache held.
    pub fn max_bytes(self, max_bytes: u64) -> Self {
        Self {
            cache: Arc::new(statement_cache(self.capacity, max_bytes)),
            max_bytes,
            ..self
        }
    }

    /// How many statements the cache holds (after its pending upkeep, approximately).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Forgets every cached statement.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}

/// A cache weighing each entry its bytes, and at least `max_bytes / capacity` (in KiB, so that
/// a weight fits a `u32`; the bound is lowered to `capacity` times the heaviest weight).
fn statement_cache(capacity: u64, max_bytes: u64) -> StatementCache {
    let max_kib = max_bytes / 1024;
    let least = max_kib
        .div_ceil(capacity.max(1))
        .clamp(1, u64::from(u32::MAX));
    moka::future::Cache::builder()
        .expire_after(StatementLifetime)
        .weigher(move |key: &StatementKey, statement: &CachedStatement| {
            let kib = ((key.bytes() + statement.bytes()) as u64).div_ceil(1024);
            u32::try_from(kib.max(least)).unwrap_or(u32::MAX)
        })
        .max_capacity(max_kib.min(least.saturating_mul(capacity)))
        .build()
}

impl fmt::Debug for CapabilityCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapabilityCacheLayer")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl<S> Layer<S> for CapabilityCacheLayer {
    type Service = CapabilityCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CapabilityCache {
            inner,
            cache: Arc::clone(&self.cache),
            reads: self.reads.clone(),
            max_bytes: self.max_bytes,
            ttl: self.ttl,
            keeps: self.capacity > 0 && self.max_bytes >= 1024,
        }
    }
}

/// Caches upstream CapabilityStatements. Made by [`CapabilityCacheLayer`].
#[derive(Clone)]
pub struct CapabilityCache<S> {
    inner: S,
    cache: Arc<StatementCache>,
    reads: Reads,
    max_bytes: u64,
    /// The longest a statement is kept.
    ttl: Duration,
    /// Whether anything is kept (not with a capacity of 0).
    keeps: bool,
}

impl<S: fmt::Debug> fmt::Debug for CapabilityCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapabilityCache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CapabilityCache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if let Some(release) = in_process_metadata(&request) {
            // Not cached (no hospital to spare); where the application has no statement of
            // its own, the metadata layer answers with its generated one.
            let future = self.inner.call(request);
            return ResponseFuture::own(async move {
                let mut response = future.await?;
                if matches!(
                    response.status(),
                    StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                ) {
                    response
                        .extensions_mut()
                        .insert(InProcessWithoutStatement(release));
                }
                Ok(response.map(ResponseBody::inner))
            });
        }
        let Some(key) = StatementKey::of(&request) else {
            return ResponseFuture::passed(self.inner.call(request));
        };
        // The ready service goes with the request; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cache = Arc::clone(&self.cache);
        let reads = self.reads.clone();
        let (max_bytes, ttl, keeps) = (self.max_bytes, self.ttl, self.keeps);
        ResponseFuture::own(async move {
            if let Some(cached) = cache.get(&key).await {
                return Ok(cached.response());
            }
            // A turn to read among the tenant's (never closed); meanwhile another request may
            // have cached it.
            let turns = reads
                .get_with(key.tenant, async {
                    Arc::new(Semaphore::new(MAX_STATEMENT_READS))
                })
                .await;
            let _turn = turns.acquire().await;
            if let Some(cached) = cache.get(&key).await {
                return Ok(cached.response());
            }
            let response = inner.call(request).await?;
            if response.status() != StatusCode::OK {
                return Ok(response.map(ResponseBody::inner));
            }
            let (mut parts, body) = response.into_parts();
            let body = match read_statement(body).await {
                Ok(body) => body,
                Err(unreadable) => return Ok(unreadable.map(ResponseBody::full)),
            };
            // Only what the metadata layer rewrites (a JSON statement, after a byte order mark
            // or not), and the upstream lets a shared cache keep, is kept: an XML statement (or
            // anything else) goes to this client alone, as it came.
            let lifetime = freshness(&parts.headers, ttl);
            if let Some(lifetime) =
                lifetime.filter(|_| plain_json(&parts.headers) && json_statement(&body).is_some())
            {
                let cached = CachedStatement {
                    content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                    body: body.clone(),
                    lifetime,
                };
                // (One over the whole bound would be served until the cache's next upkeep.)
                if keeps && ((key.bytes() + cached.bytes()) as u64) <= max_bytes {
                    cache.insert(key, cached).await;
                }
            }
            parts.headers.remove(header::TRANSFER_ENCODING);
            // Read whole: nothing of the upstream's connection or slots is held any more, so
            // a server bounding what relayed answers hold until delivered need not count it.
            #[cfg(feature = "proxy")]
            parts.extensions.remove::<crate::proxy::Relayed>();
            Ok(Response::from_parts(parts, ResponseBody::full(body)))
        })
    }
}

/// On the answer to a `GET metadata` for a tenant served in-process, whose application has no
/// `metadata` of its own (it answered 404 or 405): the release the request was served in. The
/// [`MetadataLayer`](super::MetadataLayer) answers such a request with its generated
/// statement in that release, as it answers one without a token.
#[derive(Debug, Clone, Copy)]
pub(super) struct InProcessWithoutStatement(pub(super) FhirVersion);

/// The release of a `GET metadata` routed to a tenant served in-process; `None` for any other
/// request.
fn in_process_metadata<B>(request: &Request<B>) -> Option<FhirVersion> {
    if request.method() != Method::GET || !is_metadata_path(request.uri().path()) {
        return None;
    }
    // `mode=terminology` asks for a TerminologyCapabilities, which the generated statement
    // is not: the application's own answer stands.
    if request.uri().query().is_some_and(|query| {
        query.split('&').any(|pair| {
            pair.starts_with("mode=") && pair != "mode=full" && pair != "mode=normative"
        })
    }) {
        return None;
    }
    let extensions = request.extensions();
    let local = extensions.get::<crate::route::InProcessTenant>()?;
    // Routing puts the release chosen in the extensions; else the tenant's default.
    extensions
        .get::<FhirVersion>()
        .copied()
        .or_else(|| local.select(None))
}

impl CachedStatement {
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.body.len()
            + self.content_type.as_ref().map_or(0, HeaderValue::len)
    }

    fn response<B>(&self) -> Response<ResponseBody<B>> {
        let mut response = Response::new(ResponseBody::full(self.body.clone()));
        if let Some(content_type) = &self.content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type.clone());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::get;
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{service_fn, ServiceExt};

    const JSON: &str = r#"{"resourceType":"CapabilityStatement"}"#;
    const XML: &str = r#"<CapabilityStatement xmlns="http://hl7.org/fhir"/>"#;
    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    const B: &str = "9b2e1c3d-0000-4000-8000-00000000000b";

    /// What the cache answers in these tests.
    type Answer = Response<ResponseBody<Full<Bytes>>>;

    /// A cache in front of an upstream stand-in that answers XML to `_format=xml` or an XML
    /// `Accept`, JSON otherwise (gzipped with `?gzip`), counting the calls that reach it.
    fn cached_upstream() -> (
        impl Service<Request<Full<Bytes>>, Response = Answer, Error = Infallible> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let service = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 100).layer(
            service_fn(move |request: Request<Full<Bytes>>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let query = request.uri().query().unwrap_or_default();
                let xml = query.contains("_format=xml")
                    || request
                        .headers()
                        .get(header::ACCEPT)
                        .is_some_and(|a| a.as_bytes().ends_with(b"xml"));
                let (content_type, body) = if xml {
                    ("application/fhir+xml", XML)
                } else {
                    ("application/fhir+json", JSON)
                };
                let mut response = Response::builder().header(header::CONTENT_TYPE, content_type);
                if query.contains("gzip") {
                    response = response.header(header::CONTENT_ENCODING, "gzip");
                }
                let response = response.body(Full::<Bytes>::from(body)).unwrap();
                async { Ok::<_, Infallible>(response) }
            }),
        );
        (service, calls)
    }

    /// A request as routing leaves it: the tenant and its upstream in the extensions.
    fn routed(tenant: &str, uri: &str, accept: Option<&str>) -> Request<Full<Bytes>> {
        let upstream = crate::route::Upstream::parse("http://ehr/fhir", FhirVersion::Stu3).unwrap();
        let mut request = get(uri);
        if let Some(accept) = accept {
            request
                .headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
        }
        request
            .extensions_mut()
            .insert(tenant.parse::<crate::tenant::TenantId>().unwrap());
        request.extensions_mut().insert(upstream);
        request
    }

    async fn body<S>(service: &S, request: Request<Full<Bytes>>) -> Bytes
    where
        S: Service<Request<Full<Bytes>>, Response = Answer, Error = Infallible> + Clone,
    {
        let response = service.clone().oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn statements_are_cached_per_tenant_and_upstream() {
        let (service, calls) = cached_upstream();
        for _ in 0..3 {
            assert_eq!(body(&service, routed(A, "/metadata", None)).await, JSON);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        body(&service, routed(B, "/metadata", None)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "another tenant, another entry"
        );
        body(&service, routed(A, "/Patient/1", None)).await;
        body(&service, routed(A, "/Patient/1", None)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 4, "only metadata is cached");
    }

    /// A statement after a UTF-8 byte order mark (some .NET servers) is a JSON statement: kept,
    /// and served as it came.
    /// A statement read whole is no longer [`Relayed`](crate::proxy::Relayed): it holds
    /// nothing of the upstream's; any other answer passed on keeps the mark.
    #[cfg(feature = "proxy")]
    #[tokio::test]
    async fn a_statement_read_whole_is_no_longer_marked_relayed() {
        use crate::proxy::Relayed;
        let service = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 100).layer(
            service_fn(|request: Request<Full<Bytes>>| {
                let found = request.uri().query() != Some("_summary=missing");
                let mut response = Response::builder()
                    .status(if found { 200 } else { 404 })
                    .header(header::CONTENT_TYPE, "application/fhir+json")
                    .body(Full::<Bytes>::from(JSON))
                    .unwrap();
                response.extensions_mut().insert(Relayed);
                async { Ok::<_, Infallible>(response) }
            }),
        );
        let fetched = service
            .clone()
            .oneshot(routed(A, "/metadata", None))
            .await
            .unwrap();
        assert_eq!(fetched.status(), StatusCode::OK);
        assert!(fetched.extensions().get::<Relayed>().is_none());
        let cached = service
            .clone()
            .oneshot(routed(A, "/metadata", None))
            .await
            .unwrap();
        assert!(cached.extensions().get::<Relayed>().is_none());
        // Not read here (not a `200`, or not a statement fetch): passed on as it came.
        let missing = service
            .clone()
            .oneshot(routed(B, "/metadata?_summary=missing", None))
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(missing.extensions().get::<Relayed>(), Some(&Relayed));
        let passed = service
            .oneshot(routed(A, "/Patient/1", None))
            .await
            .unwrap();
        assert_eq!(passed.extensions().get::<Relayed>(), Some(&Relayed));
    }

    #[tokio::test]
    async fn a_statement_after_a_byte_order_mark_is_kept() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let with_bom = Bytes::from([b"\xEF\xBB\xBF".as_slice(), JSON.as_bytes()].concat());
        let answer = with_bom.clone();
        let service = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 100).layer(
            service_fn(move |_request: Request<Full<Bytes>>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let response = Response::builder()
                    .header(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")
                    .body(Full::new(answer.clone()))
                    .unwrap();
                async { Ok::<_, Infallible>(response) }
            }),
        );
        for _ in 0..3 {
            assert_eq!(body(&service, routed(A, "/metadata", None)).await, with_bom);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn metadata_with_empty_segments_is_cached_as_metadata() {
        let (service, calls) = cached_upstream();
        // The proxy would send each of these upstream as `metadata`: one statement, one entry.
        for path in [
            "//metadata",
            "/metadata",
            "///metadata",
            "/metadata/",
            "/metadata//",
        ] {
            assert_eq!(body(&service, routed(A, path, None)).await, JSON, "{path}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(StatementKey::of(&routed(A, "/metadata/x", None)).is_none());
    }

    #[tokio::test]
    async fn an_xml_statement_is_never_kept_nor_served_for_json() {
        let (service, calls) = cached_upstream();
        // XML first, twice: passed through each time, never kept.
        for _ in 0..2 {
            assert_eq!(
                body(&service, routed(A, "/metadata?_format=xml", None)).await,
                XML
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let json = Some("application/fhir+json");
        assert_eq!(body(&service, routed(A, "/metadata", json)).await, JSON);
        assert_eq!(body(&service, routed(A, "/metadata", json)).await, JSON);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the JSON one is kept");
        // The JSON statement kept is not served to a request for XML either.
        let xml = Some("application/fhir+xml");
        assert_eq!(body(&service, routed(A, "/metadata", xml)).await, XML);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Another query or release is another question.
        body(&service, routed(A, "/metadata?mode=full", json)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        let mut r4 = routed(A, "/metadata", json);
        r4.extensions_mut().insert(FhirVersion::R4);
        body(&service, r4).await;
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        // A compressed statement cannot be rewritten: never kept.
        for _ in 0..2 {
            body(&service, routed(A, "/metadata?gzip", json)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 8);
    }

    /// A cache in front of an upstream answering a JSON statement of `size` bytes, counting
    /// the calls that reach it and the most at once.
    fn large_statements(
        layer: &CapabilityCacheLayer,
        size: usize,
        pause: std::time::Duration,
    ) -> (
        impl Service<Request<Full<Bytes>>, Response = Answer, Error = Infallible> + Clone,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let (calls, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let now = Arc::new(AtomicUsize::new(0));
        let padding = "x".repeat(size);
        let statement = format!(r#"{{"resourceType":"CapabilityStatement","text":"{padding}"}}"#);
        let (counted, highest) = (Arc::clone(&calls), Arc::clone(&most));
        let service = layer.layer(service_fn(move |request: Request<Full<Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
            highest.fetch_max(at_once, Ordering::SeqCst);
            let (now, body) = (Arc::clone(&now), statement.clone());
            let slow = request.uri().query().is_some_and(|q| q.contains("slow"));
            async move {
                if slow {
                    tokio::time::sleep(pause).await;
                }
                now.fetch_sub(1, Ordering::SeqCst);
                let response = Response::builder()
                    .header(header::CONTENT_TYPE, "application/fhir+json")
                    .body(Full::<Bytes>::from(body))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        }));
        (service, calls, most)
    }

    #[tokio::test]
    async fn what_the_entries_hold_is_bounded_in_bytes_and_entries() {
        // One client asking with queries of its choosing: 50 entries of about 300 KiB.
        let ttl = std::time::Duration::from_secs(60);
        let layer = CapabilityCacheLayer::new(ttl, 10_000).max_bytes(1 << 20);
        let (service, calls, _) = large_statements(&layer, 300 << 10, Default::default());
        for n in 0..50 {
            let uri = format!("/metadata?junk={n}");
            assert!(body(&service, routed(A, &uri, None)).await.len() > 300 << 10);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 50);
        layer.cache.run_pending_tasks().await;
        assert!(
            layer.cache.weighted_size() <= 1 << 20,
            "{}",
            layer.cache.weighted_size()
        );
        assert!(
            (1..=3).contains(&layer.entry_count()),
            "{}",
            layer.entry_count()
        );

        // The entry bound holds for small statements too.
        let layer = CapabilityCacheLayer::new(ttl, 10);
        let (service, _, _) = large_statements(&layer, 10, Default::default());
        for n in 0..50 {
            body(&service, routed(A, &format!("/metadata?junk={n}"), None)).await;
        }
        layer.cache.run_pending_tasks().await;
        assert!(layer.entry_count() <= 10, "{}", layer.entry_count());

        // A statement larger than the bound is served, never kept.
        let layer = CapabilityCacheLayer::new(ttl, 10).max_bytes(100 << 10);
        let (service, calls, _) = large_statements(&layer, 200 << 10, Default::default());
        for _ in 0..2 {
            assert!(body(&service, routed(A, "/metadata", None)).await.len() > 200 << 10);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn misses_are_read_a_few_at_a_time_per_tenant_and_look_again_after_waiting() {
        let layer = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 100);
        let pause = std::time::Duration::from_millis(50);
        let (service, calls, most) = large_statements(&layer, 10, pause);
        // Distinct questions: at most MAX_STATEMENT_READS of a tenant's reach it at once.
        let distinct = (0..20).map(|n| {
            let service = service.clone();
            async move { body(&service, routed(A, &format!("/metadata?slow&n={n}"), None)).await }
        });
        futures::future::join_all(distinct).await;
        assert_eq!(calls.load(Ordering::SeqCst), 20);
        assert_eq!(most.load(Ordering::SeqCst), MAX_STATEMENT_READS);
        // One question asked 20 times at once: those that waited find it cached.
        let before = calls.load(Ordering::SeqCst);
        let same = (0..20).map(|_| body(&service, routed(B, "/metadata?slow", None)));
        futures::future::join_all(same).await;
        let reached = calls.load(Ordering::SeqCst) - before;
        assert!(reached <= MAX_STATEMENT_READS, "{reached}");
    }

    #[tokio::test]
    async fn one_tenants_slow_reads_do_not_hold_up_anothers() {
        let layer = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 100);
        let (service, _, _) = large_statements(&layer, 10, std::time::Duration::from_secs(30));
        let stuck =
            futures::future::join_all(
                (0..20).map(|n| {
                    let service = service.clone();
                    async move {
                        body(&service, routed(A, &format!("/metadata?slow&n={n}"), None)).await
                    }
                }),
            );
        let other = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let other = body(&service, routed(B, "/metadata", None));
            tokio::time::timeout(std::time::Duration::from_secs(5), other).await
        };
        tokio::select! {
            _ = stuck => panic!("A's reads ended first"),
            answered = other => assert!(answered.is_ok(), "tenant B waited on tenant A's reads"),
        }
    }

    #[tokio::test]
    async fn the_bounds_hold_at_their_edges() {
        let ttl = std::time::Duration::from_secs(60);
        // A capacity of 0, or a bound under a KiB: nothing kept.
        for layer in [
            CapabilityCacheLayer::new(ttl, 0),
            CapabilityCacheLayer::new(ttl, 10).max_bytes(1000),
        ] {
            let (service, calls, _) = large_statements(&layer, 10, Default::default());
            for _ in 0..3 {
                body(&service, routed(A, "/metadata", None)).await;
            }
            assert_eq!(calls.load(Ordering::SeqCst), 3);
        }
        // A huge byte bound: the entry bound still holds.
        let layer = CapabilityCacheLayer::new(ttl, 2).max_bytes(u64::MAX);
        let (service, _, _) = large_statements(&layer, 10, Default::default());
        for n in 0..20 {
            body(&service, routed(A, &format!("/metadata?n={n}"), None)).await;
        }
        layer.cache.run_pending_tasks().await;
        assert!(layer.entry_count() <= 2, "{}", layer.entry_count());
    }

    /// A cache in front of an upstream answering a JSON statement with `headers`, counting the
    /// calls that reach it.
    fn answering_with(
        headers: &'static [(&'static str, &'static str)],
    ) -> (
        impl Service<Request<Full<Bytes>>, Response = Answer, Error = Infallible> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let layer = CapabilityCacheLayer::new(Duration::from_secs(60), 100);
        let service = layer.layer(service_fn(move |_: Request<Full<Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut response =
                Response::builder().header(header::CONTENT_TYPE, "application/fhir+json");
            for (name, value) in headers {
                response = response.header(*name, *value);
            }
            let response = response.body(Full::<Bytes>::from(JSON)).unwrap();
            async { Ok::<_, Infallible>(response) }
        }));
        (service, calls)
    }

    #[tokio::test]
    async fn what_the_upstream_forbids_a_shared_cache_is_not_kept() {
        let refused: [&[(&str, &str)]; 11] = [
            &[("cache-control", "no-store")],
            &[("cache-control", "public, No-Cache")],
            &[("cache-control", "no-cache=\"set-cookie\"")],
            &[("cache-control", "private, max-age=600")],
            &[("cache-control", "max-age=0")],
            &[("cache-control", "max-age=ten")],
            &[("cache-control", "max-age=10"), ("age", "20")],
            &[("vary", "Accept, Authorization")],
            &[("vary", "*")],
            &[("expires", "0")],
            &[
                ("date", "Thu, 03 Dec 2026 17:00:00 GMT"),
                ("expires", "Thu, 03 Dec 2026 16:00:00 GMT"),
            ],
        ];
        for headers in refused {
            let (service, calls) = answering_with(headers);
            for _ in 0..2 {
                assert_eq!(body(&service, routed(A, "/metadata", None)).await, JSON);
            }
            assert_eq!(calls.load(Ordering::SeqCst), 2, "kept with {headers:?}");
        }
        let kept: [&[(&str, &str)]; 4] = [
            &[],
            &[("cache-control", "public, max-age=300, must-revalidate")],
            &[("cache-control", "max-age=0, s-maxage=60")],
            &[
                ("vary", "Accept, accept-language,Origin"),
                ("cache-control", "max-age=\"30\""),
            ],
        ];
        for headers in kept {
            let (service, calls) = answering_with(headers);
            for _ in 0..2 {
                assert_eq!(body(&service, routed(A, "/metadata", None)).await, JSON);
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1, "not kept with {headers:?}");
        }
    }

    #[tokio::test]
    async fn a_statement_is_kept_no_longer_than_the_upstream_says() {
        let (service, calls) = answering_with(&[("cache-control", "max-age=1")]);
        body(&service, routed(A, "/metadata", None)).await;
        body(&service, routed(A, "/metadata", None)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        body(&service, routed(A, "/metadata", None)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "kept past its max-age");
    }

    #[test]
    fn freshness_follows_rfc_9111() {
        let ceiling = Duration::from_secs(300);
        let of = |headers: &[(&str, &str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in headers {
                map.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            freshness(&map, ceiling).map(|d| d.as_secs())
        };
        assert_eq!(of(&[]), Some(300), "nothing said: the layer's own lifetime");
        assert_eq!(of(&[("cache-control", "max-age=60")]), Some(60));
        assert_eq!(
            of(&[("cache-control", "max-age=6000")]),
            Some(300),
            "never past the ceiling"
        );
        assert_eq!(
            of(&[("cache-control", "max-age=99999999999999999999999")]),
            Some(300)
        );
        assert_eq!(
            of(&[("cache-control", "max-age=60, s-maxage=10")]),
            Some(10),
            "s-maxage first"
        );
        assert_eq!(
            of(&[
                ("cache-control", "max-age=60"),
                ("cache-control", "max-age=60")
            ]),
            Some(60)
        );
        assert_eq!(
            of(&[
                ("cache-control", "max-age=60"),
                ("cache-control", "max-age=61")
            ]),
            None
        );
        assert_eq!(
            of(&[("cache-control", "max-age=60"), ("age", "45")]),
            Some(15)
        );
        assert_eq!(of(&[("cache-control", "max-age=60"), ("age", "-1")]), None);
        assert_eq!(of(&[("cache-control", "max-age=")]), None);
        assert_eq!(of(&[("cache-control", "max-age=+5")]), None);
        assert_eq!(
            of(&[("cache-control", "immutable, stale-while-revalidate=9")]),
            Some(300)
        );
        let date = "Thu, 03 Dec 2026 17:00:00 GMT";
        let expires = "Thu, 03 Dec 2026 17:01:40 GMT";
        assert_eq!(of(&[("date", date), ("expires", expires)]), Some(100));
        assert_eq!(
            of(&[
                ("date", date),
                ("expires", expires),
                ("cache-control", "max-age=5")
            ]),
            Some(5),
            "max-age before Expires"
        );
        assert_eq!(of(&[("vary", "")]), Some(300));
        assert_eq!(of(&[("vary", "accept-encoding"), ("vary", "Prefer")]), None);
    }
}
