//! `TenantRoutingLayer`, its builder and its service.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::cache::{CachePolicy, RouteCache};
use super::directory::{DirectoryError, TenantDirectory};
use super::upstream::TenantRecord;
use crate::body::ResponseBody;
use crate::future::PassOrOwn;
use crate::ops::RequestFacts;
use crate::outcome::{IssueType, OperationOutcome};
use crate::tenant::TenantId;
use crate::version::{FhirVersion, VersionHint, VersionsQuery};

/// A Tower layer that finds the request's tenant's upstream and puts it in the request
/// extensions.
#[derive(Clone)]
#[must_use]
pub struct TenantRoutingLayer {
    cache: RouteCache,
}

impl TenantRoutingLayer {
    /// Starts configuring a layer that asks `directory`.
    pub fn builder(directory: impl TenantDirectory) -> TenantRoutingBuilder {
        TenantRoutingBuilder {
            directory: Box::new(directory),
            policy: CachePolicy {
                ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(30),
                stale_grace: Duration::from_secs(3600),
                failure_backoff: Duration::from_secs(1),
                lookup_timeout: Duration::from_secs(5),
                capacity: 100_000,
            },
        }
    }

    /// The route cache, to invalidate tenants when the directory changes.
    pub fn cache(&self) -> &RouteCache {
        &self.cache
    }
}

impl fmt::Debug for TenantRoutingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantRoutingLayer")
            .field("cache", &self.cache)
            .finish()
    }
}

impl<S> Layer<S> for TenantRoutingLayer {
    type Service = TenantRouting<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantRouting {
            inner,
            cache: self.cache.clone(),
        }
    }
}

/// A configuration the routing layer refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    ZeroDuration(&'static str),
    /// The cache capacity is zero.
    ZeroCapacity,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroDuration(what) => write!(f, "{what} must be longer than zero"),
            Self::ZeroCapacity => f.write_str("the route cache capacity must be above zero"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`TenantRoutingLayer`].
#[must_use]
pub struct TenantRoutingBuilder {
    directory: Box<dyn TenantDirectory>,
    policy: CachePolicy,
}

impl fmt::Debug for TenantRoutingBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantRoutingBuilder")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl TenantRoutingBuilder {
    /// How long a directory answer is used before asking again. Default 5 min.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.policy.ttl = ttl;
        self
    }

    /// How long "not onboarded" is remembered. Default 30 s.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.policy.negative_ttl = ttl;
        self
    }

    /// How long past its TTL a known route keeps serving while the directory fails.
    /// Default 1 h; zero turns stale serving off.
    pub fn stale_grace(mut self, grace: Duration) -> Self {
        self.policy.stale_grace = grace;
        self
    }

    /// After a failed lookup, how long before the directory is asked again. Default 1 s.
    pub fn failure_backoff(mut self, backoff: Duration) -> Self {
        self.policy.failure_backoff = backoff;
        self
    }

    /// How long one directory lookup may take. Default 5 s.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.policy.lookup_timeout = timeout;
        self
    }

    /// How many tenants the cache holds. Default 100 000.
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.policy.capacity = capacity;
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<TenantRoutingLayer, ConfigError> {
        let policy = self.policy;
        for (what, value) in [
            ("ttl", policy.ttl),
            ("negative_ttl", policy.negative_ttl),
            ("failure_backoff", policy.failure_backoff),
            ("lookup_timeout", policy.lookup_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(what));
            }
        }
        if policy.capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        Ok(TenantRoutingLayer {
            cache: RouteCache::new(self.directory, policy),
        })
    }
}

/// Routes each request to its tenant's upstream (in the request extensions as
/// [`Upstream`](super::Upstream)). Made by [`TenantRoutingLayer`].
#[derive(Clone)]
pub struct TenantRouting<S> {
    inner: S,
    cache: RouteCache,
}

impl<S: fmt::Debug> fmt::Debug for TenantRouting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantRouting")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The response future of [`TenantRouting`]: the inner service's, once the route was found in
/// the cache (the common case, no allocation); or, when the directory must be asked or the
/// request is refused, the layer's own work, boxed.
pub type ResponseFuture<F, B, E> = PassOrOwn<F, B, E>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TenantRouting<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let Some(tenant) = request.extensions().get::<TenantId>().copied() else {
            return answered(answer(
                StatusCode::FORBIDDEN,
                IssueType::Forbidden,
                "The request names no tenant",
            ));
        };
        if let Some(record) = self.cache.fresh(tenant) {
            self.cache.counts().hit.increment(1);
            return match route(&mut request, tenant, Ok(record)) {
                Ok(served) => PassOrOwn::passed_serving(self.inner.call(request), served),
                Err(refusal) => answered(*refusal),
            };
        }
        self.cache.counts().miss.increment(1);
        // The directory must be asked: the ready service goes with the request, and this one
        // keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cache = self.cache.clone();
        PassOrOwn::own(async move {
            let found = cache.resolve(tenant).await;
            match route(&mut request, tenant, found) {
                Ok(served) => {
                    let mut response = inner.call(request).await?;
                    if let Some(served) = served {
                        crate::future::served_in(&mut response, served);
                    }
                    Ok(response.map(ResponseBody::inner))
                }
                Err(refusal) => Ok((*refusal).map(ResponseBody::full)),
            }
        })
    }
}

/// The layer's own answer (a refusal: the rare path).
fn answered<F, B: 'static, E: 'static>(response: Response<Bytes>) -> ResponseFuture<F, B, E> {
    PassOrOwn::own(async move { Ok(response.map(ResponseBody::full)) })
}

/// Puts what serves this request in its extensions: the tenant's upstream for it, or its
/// [`InProcessTenant`](super::InProcessTenant) with the release chosen (returned too, so the
/// response is labelled with it); or, when nothing can serve it, returns the answer saying why.
/// Where the tenant has no server for the release negotiated, the first other release the
/// client accepts (as the version layer left them) that it has serves it: it replaces the
/// negotiated one in the extensions, and is returned to label the response.
fn route<B>(
    request: &mut Request<B>,
    tenant: TenantId,
    found: Result<Option<TenantRecord>, DirectoryError>,
) -> Result<Option<FhirVersion>, Box<Response<Bytes>>> {
    let record = match found {
        Ok(Some(record)) => record,
        Ok(None) => {
            tracing::debug!(%tenant, "tenant not onboarded");
            return Err(Box::new(answer(
                StatusCode::FORBIDDEN,
                IssueType::Forbidden,
                "The tenant is not onboarded with this gateway",
            )));
        }
        Err(_) => {
            let mut response = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                IssueType::Transient,
                "The tenant directory is unavailable; try again later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(Box::new(response));
        }
    };
    let version = request.extensions().get::<FhirVersion>().copied();
    if let Some(query) = VersionsQuery::of(request) {
        return Err(Box::new(tenant_versions(&record, query, version)));
    }
    // Unnamed but hinted (a DSTU2-only client): the hinted release if the tenant serves it.
    let hint = match (version, request.extensions().get::<VersionHint>()) {
        (None, Some(VersionHint(hint))) => Some(*hint),
        _ => None,
    };
    let not_served = || {
        Box::new(answer(
            StatusCode::NOT_ACCEPTABLE,
            IssueType::NotSupported,
            no_upstream_for(version),
        ))
    };
    // Where the tenant has no server for the release negotiated, the first other release the
    // client accepts that it has (the rare path: only then are they looked up).
    let fallback = || crate::version::fallbacks(request.extensions());
    let served = if let Some(local) = record.in_process_tenant() {
        let release = hint
            .and_then(|hint| local.select(Some(hint)))
            .or_else(|| local.select(version))
            .or_else(|| fallback().find_map(|release| local.select(release)))
            .ok_or_else(not_served)?;
        RequestFacts::set_upstream(local.label());
        let extensions = request.extensions_mut();
        extensions.insert(local.clone());
        // A release the client named is in the extensions already, and labels the response.
        (version != Some(release)).then(|| {
            extensions.insert(release);
            release
        })
    } else {
        let upstream = hint
            .and_then(|hint| record.select(Some(hint)))
            .or_else(|| record.select(version))
            .or_else(|| fallback().find_map(|release| record.select(release)))
            .ok_or_else(not_served)?;
        RequestFacts::set_upstream(upstream.base().shared_text());
        let extensions = request.extensions_mut();
        extensions.insert(upstream.clone());
        // Served in another release than the one negotiated: the request says which, and so
        // does the response.
        let release = upstream.fhir_version();
        version.is_some_and(|named| named != release).then(|| {
            extensions.insert(release);
            release
        })
    };
    if let Some(limit) = record.rate_limit() {
        request
            .extensions_mut()
            .insert(crate::limit::TenantRateLimit(limit));
    }
    Ok(served)
}

/// `$versions` for the tenant (see
/// [`VersionNegotiationBuilder::tenant_versions`](crate::version::VersionNegotiationBuilder::tenant_versions)):
/// the releases it is served in, and the one a request naming none gets.
fn tenant_versions(
    record: &TenantRecord,
    query: &VersionsQuery,
    named: Option<FhirVersion>,
) -> Response<Bytes> {
    let (releases, first): (Vec<FhirVersion>, _) = match record.in_process_tenant() {
        Some(local) => (local.releases().to_vec(), local.select(None)),
        None => (
            record
                .upstreams()
                .iter()
                .map(|u| u.fhir_version())
                .collect(),
            record.default_upstream().map(|u| u.fhir_version()),
        ),
    };
    match first {
        Some(first) => query.answer(releases, first, named),
        // (A record always has a first server.)
        None => answer(
            StatusCode::NOT_ACCEPTABLE,
            IssueType::NotSupported,
            "The tenant has no FHIR server",
        ),
    }
}

fn no_upstream_for(version: Option<FhirVersion>) -> &'static str {
    match version {
        Some(FhirVersion::Dstu2) => "The tenant has no FHIR server for DSTU2 (1.0)",
        Some(FhirVersion::Stu3) => "The tenant has no FHIR server for STU3 (3.0)",
        Some(FhirVersion::R4) => "The tenant has no FHIR server for R4 (4.0)",
        Some(FhirVersion::R4B) => "The tenant has no FHIR server for R4B (4.3)",
        Some(FhirVersion::R5) => "The tenant has no FHIR server for R5 (5.0)",
        _ => "The tenant has no FHIR server for the requested version",
    }
}

fn answer(status: StatusCode, code: IssueType, diagnostics: &str) -> Response<Bytes> {
    OperationOutcome::error(code, diagnostics).to_response(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::VersionsForm;

    /// The defaults README.md and the setters' docs state, in what the built layer runs with.
    #[test]
    fn documented_defaults() {
        const SECOND: Duration = Duration::from_secs(1);
        let directory = |_: TenantId| async { Ok::<Option<TenantRecord>, DirectoryError>(None) };
        let layer = TenantRoutingLayer::builder(directory).build().unwrap();
        let policy = layer.cache().policy();
        assert_eq!(policy.ttl, 5 * 60 * SECOND);
        assert_eq!(policy.negative_ttl, 30 * SECOND);
        assert_eq!(policy.stale_grace, 60 * 60 * SECOND);
        assert_eq!(policy.failure_backoff, SECOND);
        assert_eq!(policy.lookup_timeout, 5 * SECOND);
        assert_eq!(policy.capacity, 100_000);
        assert_eq!(layer.cache().capacities(), (100_000, Some(100_000)));
    }

    /// A client accepting several releases is served in the first the tenant has, proxied or
    /// in-process; the release chosen is the one the inner service finds, and labels the answer.
    #[tokio::test]
    async fn the_first_accepted_release_the_tenant_serves_is_chosen() {
        use crate::route::{InMemoryDirectory, InProcessTenant, Upstream};
        use crate::version::VersionNegotiationLayer;
        use http_body_util::{BodyExt, Full};
        use tower::{service_fn, ServiceExt};

        let proxied: TenantId = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
        let local: TenantId = "9b2e1c3d-0000-4000-8000-00000000000b".parse().unwrap();
        let directory = InMemoryDirectory::new();
        let upstream = |version| Upstream::parse("http://fhir.test/x", version).unwrap();
        directory.upsert(
            proxied,
            TenantRecord::new([upstream(FhirVersion::Dstu2), upstream(FhirVersion::Stu3)]).unwrap(),
        );
        directory.upsert(
            local,
            TenantRecord::in_process(
                InProcessTenant::new("store", [FhirVersion::Dstu2, FhirVersion::Stu3]).unwrap(),
            ),
        );
        let routing = TenantRoutingLayer::builder(directory).build().unwrap();
        let versions = VersionNegotiationLayer::builder().build().unwrap();
        // Says which release serves it (the upstream's, or the in-process one), and in which
        // release the request reached it.
        let inner = service_fn(|request: Request<Full<Bytes>>| async move {
            let extensions = request.extensions();
            let served = match extensions.get::<crate::route::Upstream>() {
                Some(upstream) => upstream.fhir_version(),
                None => *extensions.get::<FhirVersion>().unwrap(),
            };
            let named = extensions.get::<FhirVersion>().copied();
            let text = format!(
                "{served} {}",
                named.map_or("none".into(), |v| v.to_string())
            );
            let response = Response::builder()
                .header(header::CONTENT_TYPE, "application/fhir+json")
                .body(Full::new(Bytes::from(text)))
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        });
        let service = tower::ServiceBuilder::new()
            .layer(versions)
            .layer(routing)
            .service(inner);
        let ask = |tenant: TenantId, accept: &'static str| {
            let service = service.clone();
            async move {
                let mut request = Request::get("/Patient/1")
                    .header(header::ACCEPT, accept)
                    .body(Full::<Bytes>::default())
                    .unwrap();
                request.extensions_mut().insert(tenant);
                let response = service.oneshot(request).await.unwrap();
                let status = response.status();
                let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (
                    status,
                    content_type,
                    String::from_utf8(body.to_vec()).unwrap(),
                )
            }
        };
        let r4_then_stu3 =
            "application/fhir+json; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0; q=0.5";
        let r4_or_any = "application/fhir+json; fhirVersion=4.0, */*; q=0.1";
        for tenant in [proxied, local] {
            let (status, content_type, body) = ask(tenant, r4_then_stu3).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body, "3.0 3.0", "served in STU3, and told so");
            assert_eq!(
                content_type.unwrap(),
                "application/fhir+json; fhirVersion=3.0"
            );
            // Any release, after R4: the tenant's first.
            let (status, _, body) = ask(tenant, r4_or_any).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "1.0 1.0"));
            // R4 alone: 406.
            let (status, ..) = ask(tenant, "application/fhir+json; fhirVersion=4.0").await;
            assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        }
    }

    fn parameters(response: Response<Bytes>) -> Vec<String> {
        crate::version::parameters_of(response.body())
    }

    #[test]
    fn versions_names_the_tenants_releases_and_the_one_it_serves_by_default() {
        use crate::route::{InProcessTenant, Upstream};
        let all = VersionsQuery::new(&FhirVersion::ALL, None, VersionsForm::Fhir);
        let upstream = |version| Upstream::parse("http://fhir.test/x", version).unwrap();
        let proxied =
            TenantRecord::new([upstream(FhirVersion::Stu3), upstream(FhirVersion::Dstu2)]).unwrap();
        assert_eq!(
            parameters(tenant_versions(&proxied, &all, None)),
            ["version=1.0", "version=3.0", "default=3.0"]
        );
        let local = TenantRecord::in_process(
            InProcessTenant::new("store", [FhirVersion::R4, FhirVersion::R5]).unwrap(),
        );
        let response = tenant_versions(&local, &all, Some(FhirVersion::R5));
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/fhir+json; fhirVersion=5.0"
        );
        assert_eq!(
            parameters(response),
            ["version=4.0", "version=5.0", "default=4.0"]
        );
        // Served in no release the gateway supports: none a client may name, and the one a
        // request naming none gets.
        let r4_only = VersionsQuery::new(&[FhirVersion::R4], None, VersionsForm::Fhir);
        assert_eq!(
            parameters(tenant_versions(&proxied, &r4_only, None)),
            ["default=3.0"]
        );
    }
}
