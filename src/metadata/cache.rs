//! The capability cache: a second middleware, placed between routing and the proxy, that keeps
//! each tenant's upstream CapabilityStatement for a while, so clients asking for `metadata`
//! again and again do not reach the hospital each time.
//!
//! It keeps only what the metadata layer rewrites (a JSON CapabilityStatement or
//! `Conformance`, uncompressed, with a JSON `Content-Type`), per tenant, upstream, negotiated
//! release, query string and `Accept`/`Accept-Language`: an XML statement asked for with
//! `_format=xml` goes to the client as the upstream sent it and is never kept, so it never
//! reaches a client that asked for JSON.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::statement::{is_json, json_statement, read_statement};
use super::ResponseFuture;
use crate::body::ResponseBody;
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A Tower layer, placed between routing and the proxy, that caches each tenant's upstream
/// JSON CapabilityStatement (`GET metadata`) per upstream, FHIR release, query and requested
/// format; anything else (an XML statement, an error) passes through and is not kept.
#[derive(Clone)]
#[must_use]
pub struct CapabilityCacheLayer {
    cache: Arc<StatementCache>,
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
    /// The key of a `GET metadata` routed to a tenant's upstream; `None` for anything else.
    fn of<B>(request: &Request<B>) -> Option<Self> {
        if request.method() != Method::GET || request.uri().path() != "/metadata" {
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

/// A cached statement: its `Content-Type` and body, all a response from the cache carries.
#[derive(Clone)]
struct CachedStatement {
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl CapabilityCacheLayer {
    /// Keeps statements for `ttl`, for at most `capacity` entries (tenant, upstream, release,
    /// query and requested format).
    pub fn new(ttl: std::time::Duration, capacity: u64) -> Self {
        Self {
            cache: Arc::new(
                moka::future::Cache::builder()
                    .time_to_live(ttl)
                    .max_capacity(capacity)
                    .build(),
            ),
        }
    }

    /// Forgets every cached statement.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
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
        }
    }
}

/// Caches upstream CapabilityStatements. Made by [`CapabilityCacheLayer`].
#[derive(Clone)]
pub struct CapabilityCache<S> {
    inner: S,
    cache: Arc<StatementCache>,
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
        let Some(key) = StatementKey::of(&request) else {
            return ResponseFuture::passed(self.inner.call(request));
        };
        // The ready service goes with the request; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cache = Arc::clone(&self.cache);
        ResponseFuture::own(async move {
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
            let content_type = parts.headers.get(header::CONTENT_TYPE);
            let identity = parts
                .headers
                .get(header::CONTENT_ENCODING)
                .is_none_or(|e| e.as_bytes().eq_ignore_ascii_case(b"identity"));
            // Only what the metadata layer rewrites is kept: an XML statement (or anything
            // else) goes to this client alone, as it came.
            if identity && content_type.is_some_and(is_json) && json_statement(&body).is_some() {
                let cached = CachedStatement {
                    content_type: content_type.cloned(),
                    body: body.clone(),
                };
                cache.insert(key, cached).await;
            }
            parts.headers.remove(header::TRANSFER_ENCODING);
            Ok(Response::from_parts(parts, ResponseBody::full(body)))
        })
    }
}

impl CachedStatement {
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
}
