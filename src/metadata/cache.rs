//! The capability cache: a second middleware, placed between routing and the proxy, that keeps
//! each tenant's upstream CapabilityStatement for a while, so clients asking for `metadata`
//! again and again do not reach the hospital each time.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::statement::read_statement;
use super::ResponseFuture;
use crate::body::ResponseBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A Tower layer, placed between routing and the proxy, that caches each tenant's upstream
/// CapabilityStatement (`GET metadata`) per upstream and FHIR release.
#[derive(Clone)]
#[must_use]
pub struct CapabilityCacheLayer {
    cache: Arc<StatementCache>,
}

type StatementCache = moka::future::Cache<(crate::tenant::TenantId, String), CachedStatement>;

/// A cached statement: its `Content-Type` and body, all a response from the cache carries.
#[derive(Clone)]
struct CachedStatement {
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl CapabilityCacheLayer {
    /// Keeps statements for `ttl`, for at most `capacity` tenant/upstream pairs.
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
        let key = (request.method() == Method::GET && request.uri().path() == "/metadata")
            .then(|| {
                let tenant = request
                    .extensions()
                    .get::<crate::tenant::TenantId>()
                    .copied()?;
                let upstream = request.extensions().get::<crate::route::Upstream>()?;
                Some((
                    tenant,
                    format!("{} {}", upstream.base(), upstream.fhir_version()),
                ))
            })
            .flatten();
        let Some(key) = key else {
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
            match read_statement(body).await {
                Ok(body) => {
                    let cached = CachedStatement {
                        content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                        body,
                    };
                    cache.insert(key, cached.clone()).await;
                    parts.headers.remove(header::TRANSFER_ENCODING);
                    Ok(Response::from_parts(parts, ResponseBody::full(cached.body)))
                }
                Err(unreadable) => Ok(unreadable.map(ResponseBody::full)),
            }
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
    use crate::version::FhirVersion;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn statements_are_cached_per_tenant_and_upstream() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let service = CapabilityCacheLayer::new(std::time::Duration::from_secs(60), 100).layer(
            service_fn(move |_req: Request<Full<Bytes>>| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(
                        "{\"resourceType\":\"CapabilityStatement\"}",
                    )))
                }
            }),
        );
        let upstream = crate::route::Upstream::parse("http://ehr/fhir", FhirVersion::Stu3).unwrap();
        let request = |tenant: &str, path: &str| {
            let mut request = get(path);
            request
                .extensions_mut()
                .insert(tenant.parse::<crate::tenant::TenantId>().unwrap());
            request.extensions_mut().insert(upstream.clone());
            request
        };
        let a = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
        let b = "9b2e1c3d-0000-4000-8000-00000000000b";
        for _ in 0..3 {
            let response = service
                .clone()
                .oneshot(request(a, "/metadata"))
                .await
                .unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "{\"resourceType\":\"CapabilityStatement\"}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        service
            .clone()
            .oneshot(request(b, "/metadata"))
            .await
            .unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "another tenant, another entry"
        );
        service
            .clone()
            .oneshot(request(a, "/Patient/1"))
            .await
            .unwrap();
        service
            .clone()
            .oneshot(request(a, "/Patient/1"))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4, "only metadata is cached");
    }
}
