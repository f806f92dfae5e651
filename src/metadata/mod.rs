//! Metadata pass-through: how a client learns to authenticate before it has a token.
//!
//! [`MetadataLayer`] sits between version negotiation and bearer validation. It lets exactly
//! two requests through without a token:
//!
//! - `GET [base]/metadata` (any query, such as `?_format=json`): without a token, a
//!   CapabilityStatement (DSTU2: `Conformance`) generated for the negotiated release (or a
//!   configured upstream's, fetched and cached: `statement_from_upstream`); with a
//!   token, the request goes through the authenticated stack to the tenant's own server, and
//!   its answer comes back with the gateway's security section.
//! - `GET [base]/.well-known/smart-configuration`: JSON whatever the `Accept` header, naming the
//!   token endpoint, the grant type and the client authentication methods.
//!
//! [`CapabilityCacheLayer`] goes just in front of the proxy (after routing) and keeps each
//! tenant's upstream CapabilityStatement per upstream and release for a while, so clients
//! asking for `metadata` again and again do not reach the hospital each time.
//!
//! Anything else (`metadata/x`, `//metadata`, `%6detadata`, `Patient?x=metadata`, another
//! method) goes to the authenticated stack. Every CapabilityStatement the gateway returns
//! carries in `rest[].security` the `OAuth` (and `SMART-on-FHIR`) service and the extension
//! `http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris` with `token` (and
//! `authorize` where configured) pointing at the gateway, replacing whatever the upstream said;
//! `implementation.url` is the gateway's base; `fhirVersion` stays the upstream's.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fhir::metadata::MetadataLayer;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let layer = MetadataLayer::builder("https://gw.example/fhir", "https://gw.example/oauth/token")
//!     .build()
//!     .unwrap();
//! // Stands for the authenticated stack: nothing reaches it without a token.
//! let service = ServiceBuilder::new().layer(layer).service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, Infallible>(Response::builder().status(401).body(Full::<Bytes>::default()).unwrap())
//! });
//!
//! let request = Request::get("/metadata").body(Full::default()).unwrap();
//! let response = service.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! let statement: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! let oauth = &statement["rest"][0]["security"]["extension"][0];
//! assert_eq!(oauth["url"], "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris");
//! assert_eq!(oauth["extension"][0]["valueUri"], "https://gw.example/oauth/token");
//!
//! let request = Request::get("/metadata/x").body(Full::default()).unwrap();
//! assert_eq!(service.oneshot(request).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Map, Value};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::outcome::{IssueType, OperationOutcome};
use crate::route::UpstreamBase;
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";
/// The largest upstream CapabilityStatement read; real ones are well under a megabyte.
const MAX_STATEMENT_BYTES: usize = 8 * 1024 * 1024;

/// A Tower layer that answers `metadata` and `.well-known/smart-configuration` without a
/// token, and puts the gateway's security section into every CapabilityStatement.
#[derive(Clone)]
#[must_use]
pub struct MetadataLayer {
    config: Arc<Config>,
}

struct Config {
    public_base: String,
    token_url: String,
    authorize_url: Option<String>,
    issuer: Option<String>,
    jwks_uri: Option<String>,
    scopes_supported: Vec<String>,
    capabilities: Vec<String>,
    software: String,
    default_version: FhirVersion,
    anonymous: Option<AnonymousSource>,
}

type FetchStatement =
    dyn Fn(FhirVersion) -> Pin<Box<dyn Future<Output = Option<Value>> + Send>> + Send + Sync;

/// Where the statement for requests without a token comes from, and its cache.
struct AnonymousSource {
    fetch: Box<FetchStatement>,
    cache: moka::future::Cache<FhirVersion, Value>,
}

impl MetadataLayer {
    /// Starts configuring the layer for a gateway at `public_base_url` whose token endpoint is
    /// `token_url` (both absolute).
    pub fn builder(
        public_base_url: impl Into<String>,
        token_url: impl Into<String>,
    ) -> MetadataBuilder {
        MetadataBuilder {
            public_base: public_base_url.into(),
            token_url: token_url.into(),
            authorize_url: None,
            issuer: None,
            jwks_uri: None,
            scopes_supported: Vec::new(),
            capabilities: vec!["client-confidential-symmetric".to_owned()],
            software: "tower-fhir gateway".to_owned(),
            default_version: FhirVersion::Stu3,
            #[cfg(feature = "proxy")]
            from_upstream: None,
        }
    }
}

impl fmt::Debug for MetadataLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataLayer")
            .field("public_base", &self.config.public_base)
            .field("token_url", &self.config.token_url)
            .finish_non_exhaustive()
    }
}

/// A configuration the metadata layer refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A URL that must be absolute `http`/`https` is not.
    NotAbsolute(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute(url) => write!(f, "not an absolute http(s) URL: {url:?}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`MetadataLayer`].
#[must_use]
pub struct MetadataBuilder {
    public_base: String,
    token_url: String,
    authorize_url: Option<String>,
    issuer: Option<String>,
    jwks_uri: Option<String>,
    scopes_supported: Vec<String>,
    capabilities: Vec<String>,
    software: String,
    default_version: FhirVersion,
    #[cfg(feature = "proxy")]
    #[allow(clippy::type_complexity)]
    from_upstream: Option<(crate::proxy::FhirProxy, crate::route::Upstream)>,
}

impl fmt::Debug for MetadataBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataBuilder")
            .field("public_base", &self.public_base)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

impl MetadataBuilder {
    /// Serves, to requests without a token, this upstream's CapabilityStatement (fetched
    /// through `proxy`, cached for five minutes per release, with the gateway's security
    /// section) instead of a generated one; if the upstream fails, a generated one.
    #[cfg(feature = "proxy")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
    pub fn statement_from_upstream(
        mut self,
        proxy: crate::proxy::FhirProxy,
        upstream: crate::route::Upstream,
    ) -> Self {
        self.from_upstream = Some((proxy, upstream));
        self
    }

    /// The authorization endpoint, where there is one (client credentials needs none).
    pub fn authorize_url(mut self, url: impl Into<String>) -> Self {
        self.authorize_url = Some(url.into());
        self
    }

    /// The token issuer, for `.well-known/smart-configuration`.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Where the token signing keys are published, for `.well-known/smart-configuration`.
    pub fn jwks_uri(mut self, url: impl Into<String>) -> Self {
        self.jwks_uri = Some(url.into());
        self
    }

    /// Scopes advertised in `.well-known/smart-configuration`.
    pub fn scopes_supported(mut self, scopes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.scopes_supported = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// SMART capabilities advertised; default `client-confidential-symmetric`.
    pub fn capabilities(
        mut self,
        capabilities: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.capabilities = capabilities.into_iter().map(Into::into).collect();
        self
    }

    /// The `software.name` of the generated CapabilityStatement.
    pub fn software_name(mut self, name: impl Into<String>) -> Self {
        self.software = name.into();
        self
    }

    /// The release of the generated CapabilityStatement when none was negotiated; default STU3.
    pub fn default_version(mut self, version: FhirVersion) -> Self {
        self.default_version = version;
        self
    }

    /// Checks the URLs and builds the layer.
    pub fn build(self) -> Result<MetadataLayer, ConfigError> {
        let anonymous = self.anonymous_source();
        let absolute = |url: &str| {
            UpstreamBase::parse(url)
                .map(|_| url.trim_end_matches('/').to_owned())
                .map_err(|_| ConfigError::NotAbsolute(url.to_owned()))
        };
        Ok(MetadataLayer {
            config: Arc::new(Config {
                public_base: absolute(&self.public_base)?,
                token_url: absolute(&self.token_url)?,
                authorize_url: self.authorize_url.as_deref().map(absolute).transpose()?,
                issuer: self.issuer,
                jwks_uri: self.jwks_uri.as_deref().map(absolute).transpose()?,
                scopes_supported: self.scopes_supported,
                capabilities: self.capabilities,
                software: self.software,
                default_version: self.default_version,
                anonymous,
            }),
        })
    }
}

impl MetadataBuilder {
    #[cfg(feature = "proxy")]
    fn anonymous_source(&self) -> Option<AnonymousSource> {
        let (proxy, upstream) = self.from_upstream.clone()?;
        let fetch = move |version: FhirVersion| {
            let (proxy, upstream) = (proxy.clone(), upstream.clone());
            let fetched = async move {
                let accept = format!("application/fhir+json; fhirVersion={}", version.mime_code());
                let mut request = Request::get("/metadata")
                    .header(header::ACCEPT, accept)
                    .body(http_body_util::Empty::<Bytes>::new())
                    .ok()?;
                request.extensions_mut().insert(upstream);
                // The proxy is always ready.
                let mut proxy = proxy;
                let response = Service::call(&mut proxy, request).await.ok()?;
                if response.status() != StatusCode::OK {
                    return None;
                }
                let body = Limited::new(response.into_body(), MAX_STATEMENT_BYTES)
                    .collect()
                    .await
                    .ok()?;
                let statement: Value = serde_json::from_slice(&body.to_bytes()).ok()?;
                let kind = statement.get("resourceType").and_then(Value::as_str);
                matches!(kind, Some("CapabilityStatement" | "Conformance")).then_some(statement)
            };
            Box::pin(fetched) as Pin<Box<dyn Future<Output = Option<Value>> + Send>>
        };
        Some(AnonymousSource {
            fetch: Box::new(fetch),
            cache: moka::future::Cache::builder()
                .time_to_live(std::time::Duration::from_secs(300))
                .max_capacity(16)
                .build(),
        })
    }

    #[cfg(not(feature = "proxy"))]
    fn anonymous_source(&self) -> Option<AnonymousSource> {
        None
    }
}

impl<S> Layer<S> for MetadataLayer {
    type Service = Metadata<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metadata {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// Answers metadata requests around the authenticated stack. Made by [`MetadataLayer`].
#[derive(Clone)]
pub struct Metadata<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Metadata<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metadata")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The response future of [`Metadata`] and [`CapabilityCache`]: the inner service's (every
/// request but `metadata` and smart-configuration), or the layer's own work.
pub type ResponseFuture<F, B, E> = crate::future::PassOrOwn<F, B, E>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metadata<S>
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
        let read = request.method() == Method::GET || request.method() == Method::HEAD;
        let path = request.uri().path();
        let metadata = read && path == "/metadata";
        let smart_configuration = read && path == "/.well-known/smart-configuration";
        if !(metadata || smart_configuration) {
            // Everything else passes through untouched.
            return ResponseFuture::passed(self.inner.call(request));
        }
        let config = Arc::clone(&self.config);
        if !metadata {
            let response = config.smart_configuration().map(ResponseBody::full);
            return ResponseFuture::own(std::future::ready(Ok(response)));
        }
        let version = request.extensions().get::<FhirVersion>().copied();
        if !request.headers().contains_key(header::AUTHORIZATION) {
            let version = version.unwrap_or(config.default_version);
            if config.anonymous.is_none() {
                let response = config.respond(&config.generated(version), version);
                return ResponseFuture::own(std::future::ready(Ok(
                    response.map(ResponseBody::full)
                )));
            }
            return ResponseFuture::own(async move {
                Ok(config.anonymous(version).await.map(ResponseBody::full))
            });
        }
        let future = self.inner.call(request);
        ResponseFuture::own(async move {
            let response = future.await?;
            if response.status() != StatusCode::OK {
                return Ok(response.map(ResponseBody::inner));
            }
            Ok(config.secure_upstream_statement(response).await)
        })
    }
}

impl Config {
    fn security(&self, version: FhirVersion) -> Value {
        let system = match version {
            FhirVersion::Dstu2 | FhirVersion::Stu3 => {
                "http://hl7.org/fhir/restful-security-service"
            }
            _ => "http://terminology.hl7.org/CodeSystem/restful-security-service",
        };
        let mut uris = vec![json!({"url": "token", "valueUri": self.token_url})];
        if let Some(authorize) = &self.authorize_url {
            uris.push(json!({"url": "authorize", "valueUri": authorize}));
        }
        json!({
            "extension": [{"url": OAUTH_URIS, "extension": uris}],
            "service": [
                {"coding": [{"system": system, "code": "OAuth"}], "text": "OAuth 2.0 client credentials"},
                {"coding": [{"system": system, "code": "SMART-on-FHIR"}]}
            ],
            "description": "Send a bearer token from the token endpoint; its scope names the tenant."
        })
    }

    fn generated(&self, version: FhirVersion) -> Value {
        let resource_type = if version == FhirVersion::Dstu2 {
            "Conformance"
        } else {
            "CapabilityStatement"
        };
        let mut statement = json!({
            "resourceType": resource_type,
            "status": "active",
            "date": "2026-01-01",
            "kind": "instance",
            "software": {"name": self.software, "version": env!("CARGO_PKG_VERSION")},
            "implementation": {"description": "Multi-tenant FHIR gateway", "url": self.public_base},
            "fhirVersion": version.release(),
            "format": ["json", "xml"],
            "rest": [{"mode": "server", "security": self.security(version)}]
        });
        if matches!(version, FhirVersion::Dstu2 | FhirVersion::Stu3) {
            statement["acceptUnknown"] = json!("both");
        }
        statement
    }

    fn respond(&self, statement: &Value, version: FhirVersion) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(statement.to_string()));
        let media_type = format!(
            "{}; fhirVersion={}",
            version.json_media_type(),
            version.mime_code()
        );
        if let Ok(value) = HeaderValue::from_str(&media_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    }

    fn smart_configuration(&self) -> Response<Bytes> {
        let mut document = Map::new();
        if let Some(issuer) = &self.issuer {
            document.insert("issuer".into(), json!(issuer));
        }
        if let Some(jwks) = &self.jwks_uri {
            document.insert("jwks_uri".into(), json!(jwks));
        }
        if let Some(authorize) = &self.authorize_url {
            document.insert("authorization_endpoint".into(), json!(authorize));
        }
        document.insert("token_endpoint".into(), json!(self.token_url));
        document.insert(
            "grant_types_supported".into(),
            json!(["client_credentials"]),
        );
        document.insert(
            "token_endpoint_auth_methods_supported".into(),
            json!(["client_secret_basic", "client_secret_post"]),
        );
        if !self.scopes_supported.is_empty() {
            document.insert("scopes_supported".into(), json!(self.scopes_supported));
        }
        document.insert("capabilities".into(), json!(self.capabilities));
        let mut response = Response::new(Bytes::from(Value::Object(document).to_string()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    /// Puts the gateway's security section and base into a CapabilityStatement; returns its
    /// release.
    fn secure(&self, statement: &mut Map<String, Value>) -> FhirVersion {
        let version = statement
            .get("fhirVersion")
            .and_then(Value::as_str)
            .and_then(FhirVersion::parse)
            .unwrap_or(self.default_version);
        let security = self.security(version);
        match statement.get_mut("rest").and_then(Value::as_array_mut) {
            Some(rests) if !rests.is_empty() => {
                for rest in rests.iter_mut().filter_map(Value::as_object_mut) {
                    merge_security(rest, &security);
                }
            }
            _ => {
                statement.insert(
                    "rest".into(),
                    json!([{"mode": "server", "security": security}]),
                );
            }
        }
        let implementation = statement
            .entry("implementation")
            .or_insert_with(|| json!({"description": "Multi-tenant FHIR gateway"}));
        if let Some(implementation) = implementation.as_object_mut() {
            implementation.insert("url".into(), json!(self.public_base));
        }
        version
    }

    /// The statement for requests without a token: the configured upstream's (cached), or
    /// one generated from the configuration.
    async fn anonymous(&self, version: FhirVersion) -> Response<Bytes> {
        if let Some(source) = &self.anonymous {
            let fetched = source
                .cache
                .optionally_get_with(version, (source.fetch)(version))
                .await;
            if let Some(Value::Object(mut statement)) = fetched {
                let served = self.secure(&mut statement);
                return self.respond(&Value::Object(statement), served);
            }
            tracing::warn!("the configured upstream gave no CapabilityStatement; generating one");
        }
        self.respond(&self.generated(version), version)
    }

    /// The upstream's CapabilityStatement with the gateway's security section and base.
    async fn secure_upstream_statement<B>(&self, response: Response<B>) -> Response<ResponseBody<B>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = response.into_parts();
        let bytes = match read_statement(body).await {
            Ok(bytes) => bytes,
            Err(unreadable) => return unreadable.map(ResponseBody::full),
        };
        let Ok(Value::Object(mut statement)) = serde_json::from_slice::<Value>(&bytes) else {
            // Not JSON (XML, say): passed on as it came.
            return Response::from_parts(parts, ResponseBody::full(bytes));
        };
        let kind = statement.get("resourceType").and_then(Value::as_str);
        if !matches!(kind, Some("CapabilityStatement" | "Conformance")) {
            return Response::from_parts(parts, ResponseBody::full(bytes));
        }
        self.secure(&mut statement);
        let body = Bytes::from(Value::Object(statement).to_string());
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Response::from_parts(parts, ResponseBody::full(body))
    }
}

/// An upstream CapabilityStatement's bytes, up to the limit; or the 502 that says it could
/// not be read.
async fn read_statement<B>(body: B) -> Result<Bytes, Response<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, MAX_STATEMENT_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            tracing::warn!(%error, "could not read the upstream CapabilityStatement");
            Err(OperationOutcome::error(
                IssueType::Exception,
                "The tenant's CapabilityStatement could not be read",
            )
            .to_response(StatusCode::BAD_GATEWAY))
        }
    }
}

/// Puts the gateway's service and oauth-uris into a `rest` entry's security, keeping the
/// upstream's other security extensions.
fn merge_security(rest: &mut Map<String, Value>, ours: &Value) {
    let security = rest.entry("security").or_insert_with(|| json!({}));
    let Some(security) = security.as_object_mut() else {
        rest.insert("security".into(), ours.clone());
        return;
    };
    let mut extensions: Vec<Value> = security
        .get("extension")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter(|x| x["url"] != OAUTH_URIS)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    extensions.extend(ours["extension"].as_array().cloned().unwrap_or_default());
    security.insert("extension".into(), Value::Array(extensions));
    security.insert("service".into(), ours["service"].clone());
}

/// A Tower layer, placed between routing and the proxy, that caches each tenant's upstream
/// CapabilityStatement (`GET metadata`) per upstream and FHIR release.
#[derive(Clone)]
#[must_use]
pub struct CapabilityCacheLayer {
    cache: Arc<StatementCache>,
}

type StatementCache = moka::future::Cache<(crate::tenant::TenantId, String), CachedStatement>;

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
    use super::*;
    use http_body_util::Full;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn layer() -> MetadataLayer {
        MetadataLayer::builder("https://gw.example/fhir/", "https://gw.example/oauth/token")
            .authorize_url("https://gw.example/oauth/authorize")
            .issuer("https://gw.example")
            .jwks_uri("https://gw.example/.well-known/jwks.json")
            .build()
            .unwrap()
    }

    /// The authenticated stack: answers with an upstream-like CapabilityStatement.
    async fn upstream(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
        let statement = json!({"resourceType": "CapabilityStatement", "fhirVersion": "3.0.1",
            "implementation": {"description": "EHR", "url": "http://ehr.internal/fhir"},
            "rest": [{"mode": "server", "security": {
                "extension": [{"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": "http://ehr.internal/token"}]},
                              {"url": "http://example.org/other"}],
                "service": [{"text": "Basic"}]}}]});
        let status = if req.headers().contains_key("authorization") {
            200
        } else {
            401
        };
        Ok(Response::builder()
            .status(status)
            .body(Full::from(statement.to_string()))
            .unwrap())
    }

    async fn call(request: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Value) {
        let response = layer()
            .layer(service_fn(upstream))
            .oneshot(request)
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn get(uri: &str) -> Request<Full<Bytes>> {
        Request::get(uri).body(Full::default()).unwrap()
    }

    #[tokio::test]
    async fn only_the_exact_paths_skip_authentication() {
        for open in [
            "/metadata",
            "/metadata?_format=json",
            "/.well-known/smart-configuration",
        ] {
            assert_eq!(call(get(open)).await.0, StatusCode::OK, "{open}");
        }
        for closed in [
            "/metadata/x",
            "//metadata",
            "/%6detadata",
            "/Patient?x=metadata",
            "/fhir/metadata",
            "/METADATA",
        ] {
            assert_eq!(
                call(get(closed)).await.0,
                StatusCode::UNAUTHORIZED,
                "{closed}"
            );
        }
        let post = Request::post("/metadata").body(Full::default()).unwrap();
        assert_eq!(call(post).await.0, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn generated_statements_follow_the_negotiated_release() {
        let mut request = get("/metadata");
        request.extensions_mut().insert(FhirVersion::Dstu2);
        let (_, headers, statement) = call(request).await;
        assert_eq!(statement["resourceType"], "Conformance");
        assert_eq!(statement["fhirVersion"], "1.0.2");
        assert_eq!(
            headers["content-type"],
            "application/json+fhir; fhirVersion=1.0"
        );
        let (_, _, statement) = call(get("/metadata")).await;
        assert_eq!(statement["resourceType"], "CapabilityStatement");
        assert_eq!(
            statement["implementation"]["url"],
            "https://gw.example/fhir"
        );
        let uris = &statement["rest"][0]["security"]["extension"][0]["extension"];
        assert_eq!(
            uris[0],
            json!({"url": "token", "valueUri": "https://gw.example/oauth/token"})
        );
        assert_eq!(
            uris[1],
            json!({"url": "authorize", "valueUri": "https://gw.example/oauth/authorize"})
        );
        assert_eq!(
            statement["rest"][0]["security"]["service"][0]["coding"][0]["code"],
            "OAuth"
        );
    }

    #[tokio::test]
    async fn the_upstream_statement_gets_the_gateways_security_and_base() {
        let request = Request::get("/metadata")
            .header("authorization", "Bearer x")
            .body(Full::default())
            .unwrap();
        let (status, _, statement) = call(request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            statement["fhirVersion"], "3.0.1",
            "the upstream's release stays"
        );
        assert_eq!(
            statement["implementation"]["url"],
            "https://gw.example/fhir"
        );
        let extensions = statement["rest"][0]["security"]["extension"]
            .as_array()
            .unwrap();
        let oauth: Vec<_> = extensions
            .iter()
            .filter(|e| e["url"] == OAUTH_URIS)
            .collect();
        assert_eq!(
            oauth.len(),
            1,
            "the upstream's oauth-uris replaced: {extensions:?}"
        );
        assert_eq!(
            oauth[0]["extension"][0]["valueUri"],
            "https://gw.example/oauth/token"
        );
        assert!(extensions
            .iter()
            .any(|e| e["url"] == "http://example.org/other"));
        assert_eq!(
            statement["rest"][0]["security"]["service"][0]["coding"][0]["code"],
            "OAuth"
        );
    }

    #[tokio::test]
    async fn smart_configuration_is_json_whatever_the_accept() {
        let request = Request::get("/.well-known/smart-configuration")
            .header("accept", "application/fhir+xml")
            .header("authorization", "Bearer x")
            .body(Full::default())
            .unwrap();
        let (status, headers, document) = call(request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(document["token_endpoint"], "https://gw.example/oauth/token");
        assert_eq!(
            document["grant_types_supported"],
            json!(["client_credentials"])
        );
        assert_eq!(
            document["token_endpoint_auth_methods_supported"],
            json!(["client_secret_basic", "client_secret_post"])
        );
        assert_eq!(
            document["jwks_uri"],
            "https://gw.example/.well-known/jwks.json"
        );
        assert_eq!(document["issuer"], "https://gw.example");
        assert_eq!(
            document["capabilities"],
            json!(["client-confidential-symmetric"])
        );
    }

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

    #[test]
    fn urls_must_be_absolute() {
        assert!(matches!(
            MetadataLayer::builder("/fhir", "https://gw/token").build(),
            Err(ConfigError::NotAbsolute(_))
        ));
        assert!(MetadataLayer::builder("https://gw", "/token")
            .build()
            .is_err());
    }
}
