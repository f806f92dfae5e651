//! The whole gateway in one call: every layer in the right order over the proxy, with the
//! token endpoint mounted beside it (feature `proxy`).
//!
//! [`Gateway::builder`] assembles, outermost first: version negotiation, metadata pass-through,
//! bearer validation, tenant scope, tenant routing, rate limits per tenant and per client
//! ([`RateLimitLayer`]; clients' limits read from the token endpoint's store), SMART scopes
//! ([`SmartScopeLayer`]), the per-tenant CapabilityStatement cache and the [`FhirProxy`]. The
//! rate limits come before the SMART checks: a client over its limit is refused before its
//! body is read to check its scopes (so it takes none of the bytes all requests' bodies share,
//! [`max_buffered_total`](crate::smart::SmartScopeBuilder::max_buffered_total)), and a read under a granular scope is counted once, its check
//! search not at all. With a
//! [`TokenEndpoint`](crate::token::TokenEndpoint) (feature `token`) it also answers, ahead of
//! the stack:
//!
//! | route | what |
//! |---|---|
//! | `POST /oauth/token` | client-credentials tokens (RFC 6749 §4.4) |
//! | `GET /.well-known/jwks.json` | the public signing keys |
//! | `POST /oauth/clients/{client_id}/secret` | the client rotates its own secret |
//! | `POST /oauth/introspect` | token introspection (RFC 7662) for registered clients |
//! | `POST /oauth/revoke` | a client revokes a token it holds (RFC 7009) |
//!
//! and the bearer layer accepts the endpoint's tokens (its keys in-process, its issuer and
//! audience, refusing those revoked) beside whatever issuers the [`BearerAuthBuilder`] given to
//! [`auth`](GatewayBuilder::auth) trusts. Everything else is FHIR, at the root of the public
//! base URL. Configuration errors surface from [`build`](GatewayBuilder::build) as one
//! [`ConfigError`].
//!
//! [`GatewayLayer`] is the same stack without the proxy, for an existing FHIR service (your own
//! handlers in place of the proxy, tenants served in-process: see
//! [`InProcessTenant`](crate::route::InProcessTenant)); built with a token endpoint, it answers
//! the same token routes ahead of your service. Under a prefix of an axum app, mount the
//! layered router with `Router::nest_service` (or as its `fallback_service`), not
//! `Router::nest`: a nested router without a fallback gets only the paths its routes match,
//! so the token routes and `metadata` would never reach the layer.
//!
//! ```
//! use http::{Request, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::ServiceExt;
//! use tower_fhir::gateway::Gateway;
//! use tower_fhir::route::InMemoryDirectory;
//! use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = InMemoryClientStore::new();
//! let endpoint = TokenEndpoint::builder()
//!     .issuer("https://gw.example")
//!     .audience("tower-fhir")
//!     .store(store)
//!     .build()
//!     .unwrap();
//! let gateway = Gateway::builder("https://gw.example")
//!     .directory(InMemoryDirectory::new())
//!     .token_endpoint(endpoint)
//!     .build()
//!     .unwrap();
//!
//! let metadata = Request::get("/metadata").body(Full::<Bytes>::default()).unwrap();
//! assert_eq!(gateway.clone().oneshot(metadata).await.unwrap().status(), StatusCode::OK);
//! let jwks = Request::get("/.well-known/jwks.json").body(Full::<Bytes>::default()).unwrap();
//! assert_eq!(gateway.clone().oneshot(jwks).await.unwrap().status(), StatusCode::OK);
//! let patient = Request::get("/Patient/1").body(Full::<Bytes>::default()).unwrap();
//! assert_eq!(gateway.oneshot(patient).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! # });
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
#[cfg(feature = "token")]
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::sync::broadcast;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{BearerAuth, BearerAuthBuilder, BearerAuthLayer};
use crate::body::ResponseBody;
use crate::limit::{RateLimitBuilder, RateLimitLayer, RateLimiting};
use crate::metadata::{
    CapabilityCache, CapabilityCacheLayer, Metadata, MetadataBuilder, MetadataLayer,
};
use crate::outcome::{IssueType, OperationOutcome};
use crate::proxy::{FhirProxy, FhirProxyBuilder, ProxyBody};
use crate::route::{
    RouteCache, TenantDirectory, TenantRouting, TenantRoutingBuilder, TenantRoutingLayer,
};
use crate::smart::{SmartScopeBuilder, SmartScopeLayer, SmartScopes};
use crate::tenant::{TenantId, TenantScope, TenantScopeBuilder, TenantScopeLayer};
use crate::version::{VersionNegotiation, VersionNegotiationBuilder, VersionNegotiationLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The layered stack [`GatewayLayer`] wraps a service in, outermost first.
pub type GatewayStack<S> = VersionNegotiation<
    Metadata<BearerAuth<TenantScope<TenantRouting<RateLimiting<SmartScopes<CapabilityCache<S>>>>>>>,
>;

type RoutingOptions = Box<dyn FnOnce(TenantRoutingBuilder) -> TenantRoutingBuilder + Send>;
type MetadataOptions = Box<dyn FnOnce(MetadataBuilder) -> MetadataBuilder + Send>;
type LimitOptions = Box<dyn FnOnce(RateLimitBuilder) -> RateLimitBuilder + Send>;

/// A gateway configuration [`GatewayBuilder::build`] refuses: which part, and why.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// No [`directory`](GatewayBuilder::directory) was given.
    NoDirectory,
    /// Neither a token endpoint nor a [`token_url`](GatewayBuilder::token_url) was given: the
    /// CapabilityStatement must name one.
    NoTokenUrl,
    /// The public base URL is not an absolute `http`/`https` URL.
    InvalidBaseUrl(String),
    /// Following directory changes needs a tokio runtime.
    NoRuntime,
    /// The version negotiation layer's.
    Version(crate::version::ConfigError),
    /// The metadata layer's.
    Metadata(crate::metadata::ConfigError),
    /// The bearer layer's.
    Auth(crate::auth::ConfigError),
    /// The tenant scope layer's.
    Tenant(crate::tenant::ConfigError),
    /// The SMART scope layer's.
    Smart(crate::smart::ConfigError),
    /// The routing layer's.
    Route(crate::route::ConfigError),
    /// The rate limit layer's.
    Limit(crate::limit::ConfigError),
    /// The proxy's.
    Proxy(crate::proxy::ConfigError),
    /// Beside the token endpoint, the bearer layer trusts this issuer, and the tenant scope
    /// layer binds no issuer to tenants: its tokens could name any tenant. Bind it
    /// ([`TenantScopeBuilder::issuer_tenants`](crate::tenant::TenantScopeBuilder::issuer_tenants)),
    /// or say that it may name any
    /// ([`issuer_any_tenant`](crate::tenant::TenantScopeBuilder::issuer_any_tenant)), in the
    /// builder given to [`GatewayBuilder::tenant`].
    UnboundIssuer(String),
    /// The token endpoint lets clients registered without SMART resource scopes ask for some
    /// ([`scopeless_clients_may_narrow`](crate::token::TokenEndpointBuilder::scopeless_clients_may_narrow)),
    /// and the SMART layer refuses tokens without resource scopes
    /// ([`require_smart_scopes`](crate::smart::SmartScopeBuilder::require_smart_scopes)):
    /// such a client, whose own tokens are refused, could give itself any access.
    ScopelessNarrowingWithScopesRequired,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDirectory => f.write_str("the gateway needs a tenant directory"),
            Self::NoTokenUrl => f.write_str("the gateway needs a token endpoint or the URL of one"),
            Self::InvalidBaseUrl(url) => {
                write!(f, "the public base URL is not an absolute http:// or https:// URL without credentials, query or fragment: {url:?}")
            }
            Self::NoRuntime => f.write_str("following directory changes needs a tokio runtime"),
            Self::Version(e) => write!(f, "version negotiation: {e}"),
            Self::Metadata(e) => write!(f, "metadata: {e}"),
            Self::Auth(e) => write!(f, "bearer validation: {e}"),
            Self::Tenant(e) => write!(f, "tenant scope: {e}"),
            Self::Smart(e) => write!(f, "SMART scopes: {e}"),
            Self::Route(e) => write!(f, "tenant routing: {e}"),
            Self::Limit(e) => write!(f, "rate limits: {e}"),
            Self::Proxy(e) => write!(f, "proxy: {e}"),
            Self::UnboundIssuer(issuer) => write!(
                f,
                "tokens of the trusted issuer {issuer:?} could name any tenant: bind it to its \
                 tenants (TenantScopeLayer::builder().issuer_tenants(..)) or let it name any \
                 (issuer_any_tenant), in the builder given to GatewayBuilder::tenant"
            ),
            Self::ScopelessNarrowingWithScopesRequired => f.write_str(
                "the token endpoint lets clients registered without SMART resource scopes ask \
                 for some (scopeless_clients_may_narrow), but the SMART layer refuses their \
                 tokens without them (require_smart_scopes): they could give themselves any \
                 access; turn one of the two off",
            ),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Version(e) => Some(e),
            Self::Metadata(e) => Some(e),
            Self::Auth(e) => Some(e),
            Self::Tenant(e) => Some(e),
            Self::Smart(e) => Some(e),
            Self::Route(e) => Some(e),
            Self::Limit(e) => Some(e),
            Self::Proxy(e) => Some(e),
            _ => None,
        }
    }
}

/// Configures a [`Gateway`] or a [`GatewayLayer`]: each layer's own builder, plus what ties
/// them together.
#[must_use]
pub struct GatewayBuilder {
    public_base: String,
    directory: Option<TenantRoutingBuilder>,
    changes: Option<broadcast::Receiver<TenantId>>,
    token_url: Option<String>,
    versions: VersionNegotiationBuilder,
    metadata: Option<MetadataOptions>,
    auth: BearerAuthBuilder,
    tenant: TenantScopeBuilder,
    smart: SmartScopeBuilder,
    routing: Option<RoutingOptions>,
    limits: Option<LimitOptions>,
    capability_cache: (Duration, u64, u64),
    proxy: Option<FhirProxyBuilder>,
    #[cfg(feature = "token")]
    token: Option<crate::token::TokenEndpoint>,
}

impl fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("public_base", &self.public_base)
            .field("token_url", &self.token_url)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// Where tenants and their upstreams are looked up (required).
    pub fn directory(mut self, directory: impl TenantDirectory) -> Self {
        self.directory = Some(TenantRoutingLayer::builder(directory));
        self
    }

    /// Forgets a tenant's cached route as soon as it changes in the directory (say,
    /// [`InMemoryDirectory::subscribe`](crate::route::InMemoryDirectory::subscribe)). Build
    /// within a tokio runtime.
    pub fn follow(mut self, changes: broadcast::Receiver<TenantId>) -> Self {
        self.changes = Some(changes);
        self
    }

    /// The token URL named in CapabilityStatements and smart-configuration, when tokens come
    /// from elsewhere than [`token_endpoint`](Self::token_endpoint).
    pub fn token_url(mut self, url: impl Into<String>) -> Self {
        self.token_url = Some(url.into());
        self
    }

    /// Mounts the token endpoint at `/oauth/token` with its JWKS at
    /// `/.well-known/jwks.json`, introspection at `/oauth/introspect` (RFC 7662), revocation
    /// at `/oauth/revoke` (RFC 7009) and client secret rotation at
    /// `/oauth/clients/{client_id}/secret`: requests to these paths never reach the service
    /// below. Its tokens are verified with its keys in-process; they must carry its issuer,
    /// its audience and its type `at+jwt` (other issuers' audiences are unaffected).
    #[cfg(feature = "token")]
    #[cfg_attr(docsrs, doc(cfg(feature = "token")))]
    pub fn token_endpoint(mut self, endpoint: crate::token::TokenEndpoint) -> Self {
        self.token = Some(endpoint);
        self
    }

    /// Version negotiation settings (supported releases, default). The gateway turns
    /// [`tenant_versions`](VersionNegotiationBuilder::tenant_versions) on unless it was set,
    /// so that `$versions` with a token answers for its tenant, and, unless
    /// [`reported_default`](VersionNegotiationBuilder::reported_default) is set, reports the
    /// metadata layer's `default_version` (the release an anonymous `metadata` is answered in)
    /// as the default of a `$versions` without one.
    pub fn versions(mut self, versions: VersionNegotiationBuilder) -> Self {
        self.versions = versions;
        self
    }

    /// Adjusts the metadata layer (authorize URL, scopes, software name, an upstream's
    /// statement); the base URL, token URL, issuer and JWKS URL are set already.
    pub fn metadata(
        mut self,
        configure: impl FnOnce(MetadataBuilder) -> MetadataBuilder + Send + 'static,
    ) -> Self {
        self.metadata = Some(Box::new(configure));
        self
    }

    /// Bearer validation settings: the issuers trusted besides the token endpoint (with
    /// [`jwks_url_for_issuer`](BearerAuthBuilder::jwks_url_for_issuer) and
    /// [`audience_for_issuer`](BearerAuthBuilder::audience_for_issuer)), leeway, cache size.
    /// Metadata requests are let through already.
    pub fn auth(mut self, auth: BearerAuthBuilder) -> Self {
        self.auth = auth;
        self
    }

    /// Where the tenant is read from in the verified claims (default: a GUID in `scope`),
    /// and which issuers may name which tenants
    /// ([`issuer_tenants`](TenantScopeBuilder::issuer_tenants)); when any issuer is bound,
    /// the token endpoint's own issuer may name any tenant (it checks clients' tenants at
    /// issuance).
    pub fn tenant(mut self, tenant: TenantScopeBuilder) -> Self {
        self.tenant = tenant;
        self
    }

    /// SMART scope enforcement settings: whether a token without any SMART resource scope is
    /// refused (default: it keeps tenant-wide access), how large a Bundle or `_search` form
    /// may be read to check it.
    pub fn smart_scopes(mut self, smart: SmartScopeBuilder) -> Self {
        self.smart = smart;
        self
    }

    /// Adjusts the routing cache (TTL, negative TTL, grace, capacity).
    pub fn routing(
        mut self,
        configure: impl FnOnce(TenantRoutingBuilder) -> TenantRoutingBuilder + Send + 'static,
    ) -> Self {
        self.routing = Some(Box::new(configure));
        self
    }

    /// Adjusts the rate limit layer (client limit TTL, capacity, another source of clients'
    /// limits). With a [`token_endpoint`](Self::token_endpoint), clients of its tokens are
    /// limited by their records in its store already.
    pub fn rate_limits(
        mut self,
        configure: impl FnOnce(RateLimitBuilder) -> RateLimitBuilder + Send + 'static,
    ) -> Self {
        self.limits = Some(Box::new(configure));
        self
    }

    /// How long, and for how many entries (a tenant's upstream, release, query and requested
    /// format), tenants' CapabilityStatements are cached. Default 5 minutes, 10 000. An
    /// upstream's `Cache-Control` or `Expires` can shorten it or keep its statement out.
    pub fn capability_cache(mut self, ttl: Duration, capacity: u64) -> Self {
        (self.capability_cache.0, self.capability_cache.1) = (ttl, capacity);
        self
    }

    /// The bytes the CapabilityStatement cache holds at most (statements and their keys).
    /// Default [`DEFAULT_CAPABILITY_CACHE_BYTES`](crate::metadata::DEFAULT_CAPABILITY_CACHE_BYTES),
    /// 64 MiB: any token holder can ask with queries and `Accept` values of its choosing, each
    /// an entry of its own (see [`CapabilityCacheLayer`]).
    pub fn capability_cache_bytes(mut self, max_bytes: u64) -> Self {
        self.capability_cache.2 = max_bytes;
        self
    }

    /// Proxy settings (timeouts, root certificates) for the proxy [`build`](Self::build)
    /// makes; its public base URL is the gateway's. [`build_layer`](Self::build_layer) makes
    /// no proxy: under a [`GatewayLayer`] whose directory also holds proxied tenants, use
    /// [`FhirProxy::or_in_process`] with a proxy of your own.
    pub fn proxy(mut self, proxy: FhirProxyBuilder) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// The stack without the proxy, to wrap your own FHIR service (an axum `Router`, say).
    /// With a [`token_endpoint`](Self::token_endpoint), the services it makes answer the token
    /// routes ahead of the stack, as [`Gateway`] does.
    pub fn build_layer(self) -> Result<GatewayLayer, ConfigError> {
        self.assemble()
    }

    /// The gateway: the stack over the proxy, with the token routes when a token endpoint was
    /// given.
    pub fn build(mut self) -> Result<Gateway, ConfigError> {
        check_base(&self.public_base)?;
        let proxy = self
            .proxy
            .take()
            .unwrap_or_else(|| FhirProxy::builder(self.public_base.clone()))
            .build()
            .map_err(ConfigError::Proxy)?;
        let layer = self.assemble()?;
        Ok(Gateway {
            route_cache: layer.route_cache().clone(),
            rate_limits: layer.rate_limits.clone(),
            auth: layer.auth.clone(),
            service: layer.layer(proxy),
        })
    }

    fn assemble(self) -> Result<GatewayLayer, ConfigError> {
        check_base(&self.public_base)?;
        let base = self.public_base.trim_end_matches('/').to_owned();
        #[cfg_attr(not(feature = "token"), allow(unused_mut))]
        let mut auth = self.auth;
        #[cfg_attr(not(feature = "token"), allow(unused_mut))]
        let mut token_url = self.token_url;
        #[cfg_attr(not(feature = "token"), allow(unused_mut))]
        let mut jwks_uri: Option<String> = None;
        #[cfg_attr(not(feature = "token"), allow(unused_mut, unused_variables))]
        let mut issuer: Option<String> = None;
        #[cfg_attr(not(feature = "token"), allow(unused_mut))]
        let mut tenant = self.tenant;
        #[cfg(feature = "token")]
        if let Some(endpoint) = &self.token {
            if endpoint.scopeless_clients_may_narrow() && self.smart.requires_smart_scopes() {
                return Err(ConfigError::ScopelessNarrowingWithScopesRequired);
            }
            // The endpoint issues a tenant only to clients registered for it: when issuers are
            // bound to tenants, its own tokens may name any. Another trusted issuer must be
            // bound (or let name any) by whoever builds the gateway: its tokens' tenants are
            // its own say.
            if tenant.binds_issuers() {
                tenant = tenant.issuer_any_tenant(endpoint.issuer());
            } else if let Some(other) = auth
                .accepted_issuers()
                .iter()
                .find(|issuer| *issuer != endpoint.issuer())
            {
                return Err(ConfigError::UnboundIssuer(other.clone()));
            }
            if auth.has_unbound_keys()
                && auth
                    .accepted_issuers()
                    .iter()
                    .all(|issuer| issuer == endpoint.issuer())
            {
                // Only the endpoint's issuer is accepted, and its own keys alone vouch for it.
                tracing::warn!(
                    "the bearer layer has keys bound to no issuer and accepts no issuer but the token endpoint's: those keys verify no token (accept their issuer, or bind them with key_source_for_issuer)"
                );
            }
            // The endpoint types every token it signs (RFC 9068): another JWT its keys signed
            // (with `SigningKeys::sign`, say) is no access token.
            auth = auth
                .key_source_for_issuer(endpoint.key_source(), endpoint.issuer())
                .audience_for_issuer(endpoint.issuer(), endpoint.audience())
                .token_type_for_issuer(endpoint.issuer(), crate::token::ACCESS_TOKEN_TYPE)
                .revoked_tokens(endpoint.revoked_tokens().clone());
            token_url.get_or_insert_with(|| format!("{base}{TOKEN_PATH}"));
            jwks_uri = Some(format!("{base}{JWKS_PATH}"));
            issuer = Some(endpoint.issuer().to_owned());
        }
        let token_url = token_url.ok_or(ConfigError::NoTokenUrl)?;
        #[cfg_attr(not(feature = "token"), allow(unused_mut))]
        let mut limits = RateLimitLayer::builder();
        #[cfg(feature = "token")]
        if let Some(endpoint) = &self.token {
            limits = limits
                .client_limits(endpoint.clone())
                .client_issuer(endpoint.issuer());
        }
        if let Some(configure) = self.limits {
            limits = configure(limits);
        }

        let mut metadata = MetadataLayer::builder(&base, token_url);
        #[cfg(feature = "token")]
        if let Some(issuer) = issuer {
            metadata = metadata
                .issuer(issuer)
                .introspection_url(format!("{base}{INTROSPECT_PATH}"))
                .revocation_url(format!("{base}{REVOKE_PATH}"))
                .capabilities(SMART_CAPABILITIES)
                .scopes_supported(SMART_SCOPES)
                .token_endpoint_auth_methods([
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                ])
                .token_endpoint_auth_signing_algs(crate::token::assertion_algorithms());
        }
        if let Some(jwks_uri) = jwks_uri {
            metadata = metadata.jwks_uri(jwks_uri);
        }
        if let Some(configure) = self.metadata {
            metadata = configure(metadata);
        }
        let mut routing = self.directory.ok_or(ConfigError::NoDirectory)?;
        if let Some(configure) = self.routing {
            routing = configure(routing);
        }
        let routing = routing.build().map_err(ConfigError::Route)?;
        if let Some(changes) = self.changes {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(ConfigError::NoRuntime);
            }
            // Ends by itself when the directory (the sender) is dropped.
            drop(routing.cache().follow(changes));
        }
        let (ttl, capacity, max_bytes) = self.capability_cache;
        // `$versions` answers for the token's tenant, and without a token reports as its
        // default the release an anonymous `metadata` is answered in.
        let versions = self
            .versions
            .tenant_versions_unless_set(true)
            .reported_default_unless_set(metadata.anonymous_release());
        let layer = GatewayLayer {
            versions: versions.build().map_err(ConfigError::Version)?,
            metadata: metadata.build().map_err(ConfigError::Metadata)?,
            auth: auth.build().map_err(ConfigError::Auth)?,
            tenant: tenant.build().map_err(ConfigError::Tenant)?,
            smart: self.smart.build().map_err(ConfigError::Smart)?,
            routing,
            rate_limits: limits.build().map_err(ConfigError::Limit)?,
            capabilities: CapabilityCacheLayer::new(ttl, capacity).max_bytes(max_bytes),
            #[cfg(feature = "token")]
            token: self
                .token
                .map(|endpoint| Arc::new(TokenRoutes::new(endpoint))),
        };
        Ok(layer)
    }
}

/// The public base URL as the proxy takes it (for `build_layer` too, which has no proxy to
/// refuse it): absolute `http(s)`, no credentials, query or fragment.
fn check_base(base: &str) -> Result<(), ConfigError> {
    match crate::route::UpstreamBase::parse(base) {
        Ok(_) => Ok(()),
        Err(_) => Err(ConfigError::InvalidBaseUrl(
            crate::route::without_userinfo(base).into_owned(),
        )),
    }
}

#[cfg(feature = "token")]
const TOKEN_PATH: &str = "/oauth/token";
#[cfg(feature = "token")]
const JWKS_PATH: &str = "/.well-known/jwks.json";
#[cfg(feature = "token")]
const CLIENTS_PREFIX: &str = "/oauth/clients/";
/// What a gateway with a token endpoint advertises in `.well-known/smart-configuration`.
#[cfg(feature = "token")]
const SMART_CAPABILITIES: [&str; 4] = [
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "permission-v1",
    "permission-v2",
];
/// The SMART scope forms a client may ask for (each narrowed as the client's registration
/// allows).
#[cfg(feature = "token")]
const SMART_SCOPES: [&str; 9] = [
    "system/*.cruds",
    "system/*.rs",
    "system/*.read",
    "system/*.write",
    "user/*.cruds",
    "user/*.rs",
    "patient/*.cruds",
    "patient/*.rs",
    "patient/*.read",
];
#[cfg(feature = "token")]
const INTROSPECT_PATH: &str = "/oauth/introspect";
#[cfg(feature = "token")]
const REVOKE_PATH: &str = "/oauth/revoke";

/// Every gateway layer in order, as one [`Layer`]: wraps a FHIR service (the proxy, or your
/// own) in version negotiation, metadata, bearer validation, tenant scope, routing, rate
/// limits, SMART scopes and the CapabilityStatement cache. Built with a token endpoint, the service it makes answers
/// the token routes ahead of the stack, exactly as [`Gateway`] does.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_fhir::gateway::Gateway;
/// use tower_fhir::outcome::{IssueType, OperationOutcome};
/// use tower_fhir::route::{InMemoryDirectory, InProcessTenant, TenantRecord};
/// use tower_fhir::smart::ScopedBody;
/// use tower_fhir::token::{InMemoryClientStore, TokenEndpoint};
/// use tower_fhir::version::FhirVersion;
///
/// // Your FHIR server: reached only with a valid token for an onboarded tenant, the body as
/// // the client sent it (a `ScopedBody`: the SMART scope layer may have read it to check it).
/// // A tenant whose record names upstream servers (not `in_process`) comes without an
/// // `InProcessTenant`: answered 502, as the proxy answers a request it has no server for.
/// // (`FhirProxy::or_in_process` would send those to a proxy instead.)
/// async fn fhir(
///     request: Request<ScopedBody<Full<Bytes>>>,
/// ) -> Result<Response<Full<Bytes>>, Infallible> {
///     let Some(tenant) = request.extensions().get::<InProcessTenant>() else {
///         let outcome = OperationOutcome::error(
///             IssueType::Exception,
///             "The tenant is not served in-process by this service",
///         );
///         return Ok(outcome.to_response(StatusCode::BAD_GATEWAY).map(Full::new));
///     };
///     Ok(Response::new(Full::from(tenant.key().to_owned())))
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let directory = InMemoryDirectory::new();
/// let contoso = InProcessTenant::new("contoso", [FhirVersion::R4]).unwrap();
/// directory.upsert(
///     "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap(),
///     TenantRecord::in_process(contoso),
/// );
/// let endpoint = TokenEndpoint::builder()
///     .issuer("https://fhir.example")
///     .audience("tower-fhir")
///     .store(InMemoryClientStore::new())
///     .build()
///     .unwrap();
/// let layer = Gateway::builder("https://fhir.example")
///     .directory(directory)
///     .token_endpoint(endpoint)
///     .build_layer()
///     .unwrap();
/// let service = layer.layer(service_fn(fhir));
///
/// // The token routes are the layer's own, ahead of your service.
/// let jwks = Request::get("/.well-known/jwks.json").body(Full::default()).unwrap();
/// assert_eq!(service.clone().oneshot(jwks).await.unwrap().status(), StatusCode::OK);
/// let token = Request::post("/oauth/token").body(Full::default()).unwrap();
/// assert_eq!(service.clone().oneshot(token).await.unwrap().status(), StatusCode::BAD_REQUEST);
/// let patient = Request::get("/Patient/1").body(Full::default()).unwrap();
/// assert_eq!(service.oneshot(patient).await.unwrap().status(), StatusCode::UNAUTHORIZED);
/// // Your service, given a request of a tenant it does not serve, answers 502.
/// let proxied = Request::get("/Patient/1").body(ScopedBody::passed(Full::default())).unwrap();
/// assert_eq!(fhir(proxied).await.unwrap().status(), StatusCode::BAD_GATEWAY);
/// # });
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct GatewayLayer {
    versions: VersionNegotiationLayer,
    metadata: MetadataLayer,
    auth: BearerAuthLayer,
    tenant: TenantScopeLayer,
    smart: SmartScopeLayer,
    routing: TenantRoutingLayer,
    rate_limits: RateLimitLayer,
    capabilities: CapabilityCacheLayer,
    #[cfg(feature = "token")]
    token: Option<Arc<TokenRoutes>>,
}

impl GatewayLayer {
    /// The routing layer's cache, to invalidate a tenant by hand.
    pub fn route_cache(&self) -> &RouteCache {
        self.routing.cache()
    }

    /// The rate limit layer, to apply a client's changed limit at once
    /// ([`forget_client`](RateLimitLayer::forget_client)).
    pub fn rate_limits(&self) -> &RateLimitLayer {
        &self.rate_limits
    }

    /// The bearer layer: whether its key sources have been fetched
    /// ([`key_sources_fetched`](BearerAuthLayer::key_sources_fetched)), for a readiness check.
    pub fn bearer_auth(&self) -> &BearerAuthLayer {
        &self.auth
    }
}

impl<S> Layer<S> for GatewayLayer {
    type Service = GatewayService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = self.capabilities.layer(inner);
        let inner = self.smart.layer(inner);
        let inner = self.rate_limits.layer(inner);
        let inner = self.routing.layer(inner);
        let inner = self.tenant.layer(inner);
        let inner = self.auth.layer(inner);
        let inner = self.metadata.layer(inner);
        GatewayService {
            stack: self.versions.layer(inner),
            #[cfg(feature = "token")]
            token: self.token.clone(),
        }
    }
}

/// The token endpoint's routes, answered beside the FHIR stack.
#[cfg(feature = "token")]
#[derive(Clone)]
struct TokenRoutes {
    endpoint: crate::token::TokenEndpoint,
    jwks: crate::token::JwksService,
    rotation: crate::token::SecretRotation,
    introspection: crate::token::Introspection,
    revocation: crate::token::Revocation,
}

#[cfg(feature = "token")]
impl TokenRoutes {
    fn new(endpoint: crate::token::TokenEndpoint) -> Self {
        Self {
            jwks: endpoint.signing_keys().jwks_service(),
            rotation: endpoint.secret_rotation_service(),
            introspection: endpoint.introspection_service(),
            revocation: endpoint.revocation_service(),
            endpoint,
        }
    }

    /// The token route `path` names, if any.
    fn route(path: &str) -> Option<TokenRoute> {
        if path == TOKEN_PATH {
            Some(TokenRoute::Token)
        } else if path == JWKS_PATH {
            Some(TokenRoute::Jwks)
        } else if path == INTROSPECT_PATH {
            Some(TokenRoute::Introspect)
        } else if path == REVOKE_PATH {
            Some(TokenRoute::Revoke)
        } else if path
            .strip_prefix(CLIENTS_PREFIX)
            .and_then(|rest| rest.strip_suffix("/secret"))
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
        {
            Some(TokenRoute::Rotation)
        } else {
            None
        }
    }

    fn call<B>(&self, route: TokenRoute, request: Request<B>) -> Boxed
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match route {
            TokenRoute::Token => oneshot(self.endpoint.clone(), request),
            TokenRoute::Jwks => oneshot(self.jwks.clone(), request),
            TokenRoute::Rotation => oneshot(self.rotation.clone(), request),
            TokenRoute::Introspect => oneshot(self.introspection.clone(), request),
            TokenRoute::Revoke => oneshot(self.revocation.clone(), request),
        }
    }
}

#[cfg(feature = "token")]
impl fmt::Debug for TokenRoutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRoutes")
            .field("issuer", &self.endpoint.issuer())
            .finish_non_exhaustive()
    }
}

/// A service wrapped by [`GatewayLayer`]: the token routes (when the layer was built with a
/// token endpoint) answered ahead of the stack, everything else through the stack to it. A
/// Tower service for any request body hyper or axum gives; clones share everything.
#[derive(Clone)]
pub struct GatewayService<S> {
    stack: GatewayStack<S>,
    #[cfg(feature = "token")]
    token: Option<Arc<TokenRoutes>>,
}

impl<S> fmt::Debug for GatewayService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayService").finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for GatewayService<S>
where
    GatewayStack<S>: Service<Request<B>, Response = Response<ResBody>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody<ResBody>>;
    type Error = <GatewayStack<S> as Service<Request<B>>>::Error;
    type Future = GatewayFuture<<GatewayStack<S> as Service<Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The token routes are always ready; the stack is readied here and called directly,
        // so a request costs no clone of it.
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // A target that names no resource (`*`, `host:port`): refused before any layer reads
        // its path as one.
        if let Some(why) = crate::proxy::path::not_a_path(request.uri().path()) {
            let refused = OperationOutcome::error(IssueType::Invalid, why.0)
                .to_response(http::StatusCode::BAD_REQUEST)
                .map(|body| {
                    http_body_util::Full::new(body)
                        .map_err(|never| match never {})
                        .boxed_unsync()
                });
            return GatewayFuture {
                kind: FutureKind::Boxed {
                    future: Box::pin(std::future::ready(refused)),
                },
            };
        }
        #[cfg(feature = "token")]
        if let Some(token) = &self.token {
            if let Some(route) = TokenRoutes::route(request.uri().path()) {
                return GatewayFuture {
                    kind: FutureKind::Boxed {
                        future: token.call(route, request),
                    },
                };
            }
        }
        GatewayFuture {
            kind: FutureKind::Stack {
                future: self.stack.call(request),
            },
        }
    }
}

/// The gateway: [`GatewayLayer`] over [`FhirProxy`], with the token routes. A Tower service
/// for any request body hyper or axum gives; clones share everything.
#[derive(Clone)]
pub struct Gateway {
    service: GatewayService<FhirProxy>,
    route_cache: RouteCache,
    rate_limits: RateLimitLayer,
    auth: BearerAuthLayer,
}

impl Gateway {
    /// The routing layer's cache, to invalidate a tenant by hand (or use
    /// [`follow`](GatewayBuilder::follow)).
    pub fn route_cache(&self) -> &RouteCache {
        &self.route_cache
    }

    /// The rate limit layer, to apply a client's changed limit at once
    /// ([`forget_client`](RateLimitLayer::forget_client)).
    pub fn rate_limits(&self) -> &RateLimitLayer {
        &self.rate_limits
    }

    /// The bearer layer: whether its key sources (the token endpoint's keys, each trusted
    /// issuer's JWKS) have been fetched
    /// ([`key_sources_fetched`](BearerAuthLayer::key_sources_fetched),
    /// [`prefetch_keys`](BearerAuthLayer::prefetch_keys)), for a readiness check.
    pub fn bearer_auth(&self) -> &BearerAuthLayer {
        &self.auth
    }

    /// Starts configuring a gateway served at `public_base_url` (absolute; FHIR at its root).
    pub fn builder(public_base_url: impl Into<String>) -> GatewayBuilder {
        GatewayBuilder {
            public_base: public_base_url.into(),
            directory: None,
            changes: None,
            token_url: None,
            versions: VersionNegotiationLayer::builder(),
            metadata: None,
            auth: BearerAuthLayer::builder(),
            tenant: TenantScopeLayer::builder(),
            smart: SmartScopeLayer::builder(),
            routing: None,
            limits: None,
            capability_cache: (
                Duration::from_secs(300),
                10_000,
                crate::metadata::DEFAULT_CAPABILITY_CACHE_BYTES,
            ),
            proxy: None,
            #[cfg(feature = "token")]
            token: None,
        }
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// The response body of the whole stack over the proxy, one [`ResponseBody`] per layer over
/// the proxy's.
type StackBody = ResponseBody<
    ResponseBody<
        ResponseBody<
            ResponseBody<ResponseBody<ResponseBody<ResponseBody<ResponseBody<ProxyBody>>>>>,
        >,
    >,
>;

impl<B> Service<Request<B>> for Gateway
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody<StackBody>>;
    type Error = Infallible;
    type Future = GatewayFuture<<GatewayStack<FhirProxy> as Service<Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request<B>>::poll_ready(&mut self.service, cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.service.call(request)
    }
}

/// A token route's answer, its body boxed.
type Boxed = Pin<Box<dyn Future<Output = Response<UnsyncBoxBody<Bytes, BoxError>>> + Send>>;

pin_project! {
    /// The future a [`GatewayService`] (and so a [`Gateway`]) returns: the stack's own (FHIR
    /// requests: no allocation of its own), or the token routes' boxed one.
    pub struct GatewayFuture<F> {
        #[pin]
        kind: FutureKind<F>,
    }
}

pin_project! {
    #[project = FutureKindProj]
    enum FutureKind<F> {
        Stack { #[pin] future: F },
        Boxed { future: Boxed },
    }
}

impl<F, B, E> Future for GatewayFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<GatewayBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureKindProj::Stack { future } => future.poll(cx).map_ok(|response| {
                response.map(|body| GatewayBody {
                    kind: BodyKind::Stack { body },
                })
            }),
            FutureKindProj::Boxed { future } => future.as_mut().poll(cx).map(|response| {
                Ok(response.map(|body| GatewayBody {
                    kind: BodyKind::Boxed { body },
                }))
            }),
        }
    }
}

impl<F> fmt::Debug for GatewayFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayFuture").finish_non_exhaustive()
    }
}

/// The token endpoint's routes.
#[cfg(feature = "token")]
enum TokenRoute {
    Token,
    Jwks,
    Rotation,
    Introspect,
    Revoke,
}

/// Readies `service`, calls it, and boxes the response body.
#[cfg(feature = "token")]
fn oneshot<S, B, ResBody>(mut service: S, request: Request<B>) -> Boxed
where
    S: Service<Request<B>, Response = Response<ResBody>, Error = Infallible> + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    Box::pin(async move {
        let response = match std::future::poll_fn(|cx| service.poll_ready(cx)).await {
            Ok(()) => service.call(request).await,
            Err(never) => Err(never),
        };
        let Ok(response) = response;
        response.map(|body| body.map_err(Into::into).boxed_unsync())
    })
}

pin_project! {
    /// The response body of a [`GatewayService`] (and so of a [`Gateway`]): the stack's, or a
    /// token route's.
    pub struct GatewayBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Stack { #[pin] body: B },
        Boxed { body: UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl<B> fmt::Debug for GatewayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBody").finish_non_exhaustive()
    }
}

impl<B> Body for GatewayBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            BodyKindProj::Stack { body } => body.poll_frame(cx).map_err(Into::into),
            BodyKindProj::Boxed { body } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Stack { body } => body.is_end_stream(),
            BodyKind::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Stack { body } => body.size_hint(),
            BodyKind::Boxed { body } => body.size_hint(),
        }
    }
}
