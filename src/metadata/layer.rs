//! The pass-through layer: `metadata` and `.well-known/smart-configuration` answered without a
//! token, the upstream's CapabilityStatement given the gateway's security section with one.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::smart::SmartConfiguration;
use super::statement::{respond, respond_xml, Statements};
use super::upstream::AnonymousSource;
use super::ResponseFuture;
use crate::body::ResponseBody;
use crate::route::UpstreamBase;
use crate::version::{prefers_xml, FhirVersion};

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
    /// section) instead of a generated one; if the upstream fails, a generated one.
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

    /// The release of the generated CapabilityStatement when none was negotiated; default STU3.
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
            let response = config.smart.response().map(ResponseBody::full);
            return ResponseFuture::own(std::future::ready(Ok(response)));
        }
        let version = request.extensions().get::<FhirVersion>().copied();
        if !request.headers().contains_key(header::AUTHORIZATION) {
            let negotiated = version;
            let version = version.unwrap_or(config.statements.default_version);
            // XML is written for the generated statement only (an upstream's has elements
            // whose XML order the gateway does not know): a client that asks for XML gets it.
            if prefers_xml(request.uri().query(), request.headers(), negotiated) {
                let response = respond_xml(&config.statements.generated(version), version);
                return ResponseFuture::own(std::future::ready(Ok(
                    response.map(ResponseBody::full)
                )));
            }
            if config.anonymous.is_none() {
                let response = respond(&config.statements.generated(version), version);
                return ResponseFuture::own(std::future::ready(Ok(
                    response.map(ResponseBody::full)
                )));
            }
            return ResponseFuture::own(async move {
                Ok(config.anonymous(version).await.map(ResponseBody::full))
            });
        }
        // The statement is read and rewritten: asked for uncompressed, or a compressed one
        // would pass unread, with the upstream's own security section.
        request.headers_mut().remove(header::ACCEPT_ENCODING);
        let future = self.inner.call(request);
        ResponseFuture::own(async move {
            let response = future.await?;
            if response.status() != StatusCode::OK {
                return Ok(response.map(ResponseBody::inner));
            }
            Ok(config.statements.secure_upstream_statement(response).await)
        })
    }
}

impl Config {
    /// The statement for requests without a token: the configured upstream's (cached), or
    /// one generated from the configuration.
    async fn anonymous(&self, version: FhirVersion) -> Response<Bytes> {
        if let Some(source) = &self.anonymous {
            if let Some(serde_json::Value::Object(mut statement)) = source.statement(version).await
            {
                let served = self.statements.secure(&mut statement);
                return respond(&serde_json::Value::Object(statement), served);
            }
            tracing::warn!("the configured upstream gave no CapabilityStatement; generating one");
        }
        respond(&self.statements.generated(version), version)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{call, get};
    use super::*;
    use http_body_util::Full;

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
