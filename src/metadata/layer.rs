//! The pass-through layer: `metadata` and `.well-known/smart-configuration` answered without a
//! token, the upstream's CapabilityStatement given the gateway's security section with one.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::cache::InProcessWithoutStatement;
use super::smart::SmartConfiguration;
use super::statement::{respond, respond_xml, Statements};
use super::upstream::AnonymousSource;
use super::{is_metadata_path, ResponseFuture};
use crate::body::{headless, ResponseBody};
use crate::route::UpstreamBase;
use crate::version::{prefers_xml, FhirVersion, VersionHint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A Tower layer that answers `metadata` and `.well-known/smart-configuration` without a
/// token, and puts the gateway's security section into every CapabilityStatement.
#[derive(Clone)]
#[must_use]
pub struct MetadataLayer {
    config: Arc<Config>,
}

struct Config {
    statements: Statements,
    smart: SmartConfiguration,
    anonymous: Option<AnonymousSource>,
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
            auth_methods: vec![
                "client_secret_basic".to_owned(),
                "client_secret_post".to_owned(),
            ],
            auth_signing_algs: Vec::new(),
            introspection_url: None,
            revocation_url: None,
            software: "tower-fhir gateway".to_owned(),
            default_version: FhirVersion::Stu3,
            from_upstream: None,
        }
    }
}

impl fmt::Debug for MetadataLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataLayer")
            .field("public_base", &self.config.statements.public_base)
            .field("token_url", &self.config.statements.token_url)
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
    auth_methods: Vec<String>,
    auth_signing_algs: Vec<String>,
    introspection_url: Option<String>,
    revocation_url: Option<String>,
    software: String,
    default_version: FhirVersion,
    from_upstream: Option<AnonymousSource>,
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
    /// through `service`, cached for five minutes per release, with the gateway's security
    /// section) instead of a generated one; if the upstream fails, a generated one. A failure
    /// (no answer, a status but 200, no JSON statement) is remembered for 30 seconds per
    /// release: meanwhile the generated statement is served without asking the upstream
    /// again, so a failing upstream is asked at most twice a minute, however many clients
    /// ask. (Concurrent requests for a release not cached wait for one fetch.)
    ///
    /// `service` is a [`FhirProxy`](crate::proxy::FhirProxy), or any service that sends a
    /// request to the [`Upstream`](crate::route::Upstream) in its extensions: each fetch is a
    /// `GET /metadata` through a clone of it, once it is ready.
    #[cfg(feature = "proxy")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
    pub fn statement_from_upstream<S, B>(
        mut self,
        service: S,
        upstream: crate::route::Upstream,
    ) -> Self
    where
        S: Service<Request<http_body_util::Empty<Bytes>>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.from_upstream = Some(AnonymousSource::through(service, upstream));
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

    /// The token endpoint's client authentication methods, for
    /// `token_endpoint_auth_methods_supported`; default `client_secret_basic`,
    /// `client_secret_post`.
    pub fn token_endpoint_auth_methods(
        mut self,
        methods: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.auth_methods = methods.into_iter().map(Into::into).collect();
        self
    }

    /// The algorithms `private_key_jwt` assertions may be signed with, for
    /// `token_endpoint_auth_signing_alg_values_supported` (left out when none, the default).
    pub fn token_endpoint_auth_signing_algs(
        mut self,
        algorithms: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.auth_signing_algs = algorithms.into_iter().map(Into::into).collect();
        self
    }

    /// The token introspection endpoint (RFC 7662), for `introspection_endpoint`.
    pub fn introspection_url(mut self, url: impl Into<String>) -> Self {
        self.introspection_url = Some(url.into());
        self
    }

    /// The token revocation endpoint (RFC 7009), for `revocation_endpoint`.
    pub fn revocation_url(mut self, url: impl Into<String>) -> Self {
        self.revocation_url = Some(url.into());
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

    /// The release of the CapabilityStatement served without a token when the request named
    /// none (no [`FhirVersion`] was negotiated) and its media types hint at none (no
    /// [`VersionHint`]: a client whose media types are DSTU2's alone gets DSTU2); default STU3.
    pub fn default_version(mut self, version: FhirVersion) -> Self {
        self.default_version = version;
        self
    }

    /// The release an anonymous `metadata` request naming none is answered in (asked of the
    /// upstream, when its statement is read from one).
    #[cfg(feature = "proxy")]
    pub(crate) fn anonymous_release(&self) -> FhirVersion {
        self.default_version
    }

    /// Checks the URLs and builds the layer.
    pub fn build(self) -> Result<MetadataLayer, ConfigError> {
        let absolute = |url: &str| {
            UpstreamBase::parse(url)
                .map(|_| url.trim_end_matches('/').to_owned())
                .map_err(|_| ConfigError::NotAbsolute(url.to_owned()))
        };
        let public_base = absolute(&self.public_base)?;
        let token_url = absolute(&self.token_url)?;
        let authorize_url = self.authorize_url.as_deref().map(absolute).transpose()?;
        let jwks_uri = self.jwks_uri.as_deref().map(absolute).transpose()?;
        let introspection_url = self
            .introspection_url
            .as_deref()
            .map(absolute)
            .transpose()?;
        let revocation_url = self.revocation_url.as_deref().map(absolute).transpose()?;
        Ok(MetadataLayer {
            config: Arc::new(Config {
                statements: Statements {
                    public_base,
                    token_url: token_url.clone(),
                    authorize_url: authorize_url.clone(),
                    software: self.software,
                    default_version: self.default_version,
                },
                smart: SmartConfiguration {
                    issuer: self.issuer,
                    jwks_uri,
                    authorize_url,
                    token_url,
                    scopes_supported: self.scopes_supported,
                    capabilities: self.capabilities,
                    auth_methods: self.auth_methods,
                    auth_signing_algs: self.auth_signing_algs,
                    introspection_url,
                    revocation_url,
                },
                anonymous: self.from_upstream,
            }),
        })
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

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let head = request.method() == Method::HEAD;
        let read = head || request.method() == Method::GET;
        let path = request.uri().path();
        // `//metadata` and `/metadata/` too: the proxy would send them upstream as `metadata`.
        let metadata = read && is_metadata_path(path);
        let smart_configuration = read && path == "/.well-known/smart-configuration";
        if !(metadata || smart_configuration) {
            // Everything else passes through untouched.
            return ResponseFuture::passed(self.inner.call(request));
        }
        let config = Arc::clone(&self.config);
        if !metadata {
            let response = config.smart.response();
            return ResponseFuture::own(std::future::ready(Ok(own_answer(response, head))));
        }
        let version = request.extensions().get::<FhirVersion>().copied();
        if !request.headers().contains_key(header::AUTHORIZATION) {
            let negotiated = version;
            // Named, else hinted (a client speaking DSTU2's media types alone), else the
            // configured default.
            let hinted = request.extensions().get::<VersionHint>().map(|hint| hint.0);
            let version = version
                .or(hinted)
                .unwrap_or(config.statements.default_version);
            // XML is written for the generated statement only (an upstream's has elements
            // whose XML order the gateway does not know): a client that asks for XML gets it.
            if prefers_xml(request.uri().query(), request.headers(), negotiated) {
                let response = respond_xml(&config.statements.generated(version), version);
                return ResponseFuture::own(std::future::ready(Ok(own_answer(response, head))));
            }
            if config.anonymous.is_none() {
                let response = respond(&config.statements.generated(version), version);
                return ResponseFuture::own(std::future::ready(Ok(own_answer(response, head))));
            }
            return ResponseFuture::own(async move {
                Ok(own_answer(config.anonymous(version).await, head))
            });
        }
        // Where an in-process application has no statement of its own, the generated one is
        // the answer, in the format asked for as without a token.
        let xml = prefers_xml(request.uri().query(), request.headers(), version);
        // The statement is read and rewritten: asked for uncompressed, or a compressed one
        // would pass unread, with the upstream's own security section.
        request.headers_mut().remove(header::ACCEPT_ENCODING);
        // Asked as `GET /metadata` whatever its spelling: what the upstream, the SMART scope
        // layer and the capability cache each take for `metadata`. A HEAD is asked as a GET,
        // so that its headers are the rewritten statement's (and the cache answers it), then
        // answered without the body.
        if let Some(uri) = canonical_metadata(request.uri()) {
            *request.uri_mut() = uri;
        }
        if head {
            *request.method_mut() = Method::GET;
        }
        let future = self.inner.call(request);
        ResponseFuture::own(async move {
            let response = future.await?;
            let generate = response.extensions().get::<InProcessWithoutStatement>();
            let response = if let Some(&InProcessWithoutStatement(release)) = generate {
                let statement = config.statements.generated(release);
                let answer = if xml {
                    respond_xml(&statement, release)
                } else {
                    respond(&statement, release)
                };
                answer.map(ResponseBody::full)
            } else if response.status() == StatusCode::OK {
                config.statements.secure_upstream_statement(response).await
            } else {
                response.map(ResponseBody::inner)
            };
            Ok(if head { headless(response) } else { response })
        })
    }
}

/// `uri` with `/metadata` for its path (its query kept), unless it is so already.
fn canonical_metadata(uri: &Uri) -> Option<Uri> {
    if uri.path() == "/metadata" {
        return None;
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("/metadata?{query}"),
        None => "/metadata".to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

/// One of the layer's own answers, to a GET, or to a HEAD (`head`): the same headers then,
/// and no body.
fn own_answer<B: Body<Data = Bytes>>(
    response: Response<Bytes>,
    head: bool,
) -> Response<ResponseBody<B>> {
    let response = response.map(ResponseBody::full);
    if head {
        headless(response)
    } else {
        response
    }
}

impl Config {
    /// The statement for requests without a token: the configured upstream's (cached, and a
    /// failure to get it remembered a while), or one generated from the configuration.
    async fn anonymous(&self, version: FhirVersion) -> Response<Bytes> {
        if let Some(source) = &self.anonymous {
            if let Some(serde_json::Value::Object(mut statement)) = source.statement(version).await
            {
                let served = self.statements.secure(&mut statement);
                return respond(&serde_json::Value::Object(statement), served);
            }
        }
        respond(&self.statements.generated(version), version)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{call, get, layer};
    use super::*;
    use http::HeaderValue;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::ServiceExt;

    #[tokio::test]
    async fn only_metadata_and_smart_configuration_skip_authentication() {
        for open in [
            "/metadata",
            "/metadata?_format=json",
            "/.well-known/smart-configuration",
            // The proxy would send these upstream as `metadata`: the same answer.
            "//metadata",
            "///metadata?_format=json",
            "/metadata/",
            "/metadata//",
        ] {
            let (status, _, statement) = call(get(open)).await;
            assert_eq!(status, StatusCode::OK, "{open}");
            assert_ne!(statement, serde_json::Value::Null, "{open}");
        }
        for closed in [
            "/metadata/x",
            "//metadata/x",
            "/%6detadata",
            "/Patient?x=metadata",
            "/fhir/metadata",
            "/METADATA",
            "/.well-known//smart-configuration",
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

    /// `request` with a bearer token.
    fn with_token(mut request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        request
    }

    /// The token endpoint the security section of an upstream statement names once rewritten.
    fn token_endpoint(statement: &serde_json::Value) -> &serde_json::Value {
        &statement["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"]
    }

    #[tokio::test]
    async fn metadata_with_empty_segments_is_rewritten_and_asked_as_metadata() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&asked);
        let service = layer().layer(tower::service_fn(move |request: Request<Full<Bytes>>| {
            seen.lock().unwrap().push(request.uri().to_string());
            // The upstream's own statement, its own OAuth endpoints in it.
            let statement = r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server",
                "security":{"extension":[{"url":"http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension":[{"url":"token","valueUri":"http://ehr.internal/token"}]}]}}]}"#;
            async move { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(statement))) }
        }));
        for path in [
            "//metadata",
            "///metadata?_summary=true",
            "/metadata/",
            "/metadata//",
        ] {
            let response = service
                .clone()
                .oneshot(with_token(get(path)))
                .await
                .unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let statement: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                token_endpoint(&statement),
                "https://gw.example/oauth/token",
                "{path}"
            );
        }
        assert_eq!(
            *asked.lock().unwrap(),
            [
                "/metadata",
                "/metadata?_summary=true",
                "/metadata",
                "/metadata"
            ]
        );
    }

    /// An upstream as the proxy relays it: to a GET, the statement and its length; to a HEAD,
    /// the length alone. Records the methods it is asked with.
    #[derive(Clone, Default)]
    struct HeadAwareUpstream(Arc<std::sync::Mutex<Vec<Method>>>);

    impl tower_service::Service<Request<Full<Bytes>>> for HeadAwareUpstream {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            self.0.lock().unwrap().push(request.method().clone());
            let statement = r#"{"resourceType":"CapabilityStatement","fhirVersion":"4.0.1","rest":[{"mode":"server"}]}"#;
            let body = if request.method() == Method::HEAD {
                Full::default()
            } else {
                Full::from(statement)
            };
            let response = Response::builder()
                .header(header::CONTENT_TYPE, "application/fhir+json")
                .header(header::CONTENT_LENGTH, statement.len())
                .header(header::ETAG, "W/\"1\"")
                .body(body)
                .unwrap();
            std::future::ready(Ok(response))
        }
    }

    #[tokio::test]
    async fn a_head_gets_the_headers_of_the_get_and_no_body() {
        let upstream = HeadAwareUpstream::default();
        let service = layer().layer(upstream.clone());
        let ask = |method: Method, token: bool| {
            let service = service.clone();
            async move {
                let mut request = Request::builder()
                    .method(method)
                    .uri("/metadata")
                    .body(Full::default())
                    .unwrap();
                if token {
                    request = with_token(request);
                }
                let (parts, body) = service.oneshot(request).await.unwrap().into_parts();
                (parts, body.collect().await.unwrap().to_bytes())
            }
        };
        for token in [true, false] {
            let (get, statement) = ask(Method::GET, token).await;
            let (head, nothing) = ask(Method::HEAD, token).await;
            assert_eq!(head.status, StatusCode::OK);
            assert!(nothing.is_empty(), "a HEAD's answer has no body");
            assert_eq!(
                head.headers[header::CONTENT_LENGTH],
                statement.len().to_string(),
                "the length of the statement the GET gets (token: {token})"
            );
            for name in [header::CONTENT_TYPE, header::VARY, header::ETAG] {
                assert_eq!(head.headers.get(&name), get.headers.get(&name), "{name}");
            }
        }
        // With a token, the HEAD was asked as a GET: the statement read and rewritten (and,
        // in the gateway, answered by the capability cache).
        assert_eq!(*upstream.0.lock().unwrap(), [Method::GET, Method::GET]);

        // A refusal keeps its headers and loses its body.
        let refusing = layer().layer(tower::service_fn(
            |request: Request<Full<Bytes>>| async move {
                assert_eq!(request.method(), Method::GET);
                let response = Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .body(Full::<Bytes>::from("refused"))
                    .unwrap();
                Ok::<_, Infallible>(response)
            },
        ));
        let head = with_token(Request::head("/metadata").body(Full::default()).unwrap());
        let (refused, body) = refusing.oneshot(head).await.unwrap().into_parts();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.headers[header::CONTENT_LENGTH], "7");
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
        let head = Request::head("/Patient/1").body(Full::default()).unwrap();
        let response = layer().layer(upstream.clone()).oneshot(head).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "anything else passes as it is"
        );
        assert_eq!(upstream.0.lock().unwrap().last(), Some(&Method::HEAD));
    }

    #[tokio::test]
    async fn a_dstu2_only_client_gets_a_dstu2_statement_without_a_token() {
        let mut request = get("/metadata");
        request
            .extensions_mut()
            .insert(VersionHint(FhirVersion::Dstu2));
        let (_, headers, statement) = call(request).await;
        assert_eq!(statement["resourceType"], "Conformance");
        assert_eq!(statement["fhirVersion"], "1.0.2");
        assert_eq!(
            headers["content-type"],
            "application/json+fhir; fhirVersion=1.0"
        );
        // A release the client named comes first.
        let mut request = get("/metadata");
        request.extensions_mut().insert(FhirVersion::R4);
        request
            .extensions_mut()
            .insert(VersionHint(FhirVersion::Dstu2));
        let (_, _, statement) = call(request).await;
        assert_eq!(statement["fhirVersion"], "4.0.1");
    }

    #[tokio::test]
    async fn the_answer_without_a_token_varies_by_accept_and_authorization() {
        for uri in ["/metadata", "/metadata?_format=xml"] {
            let (status, headers, _) = call(get(uri)).await;
            assert_eq!(status, StatusCode::OK);
            let vary: Vec<_> = headers.get_all(header::VARY).iter().collect();
            assert_eq!(vary, ["Accept, Authorization"], "{uri}");
        }
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
