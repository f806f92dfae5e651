//! Composable [Tower] layers that turn any hyper-compatible service into a multi-tenant FHIR
//! gateway.
//!
//! A client application authenticates with OAuth 2.0 client credentials and sends its bearer
//! token with every request; the gateway verifies it, finds the customer's tenant in the
//! token's scope, and forwards the request to that hospital's FHIR server. Each step is a
//! layer of its own, usable alone or stacked. The layers, outermost first:
//!
//! - [`version`]: FHIR releases ([`FhirVersion`](version::FhirVersion)) and their negotiation
//!   ([`VersionNegotiationLayer`](version::VersionNegotiationLayer)).
//! - [`metadata`]: `metadata` and the SMART configuration without a token
//!   ([`MetadataLayer`](metadata::MetadataLayer)), and the tenants' CapabilityStatements
//!   cached in front of the proxy ([`CapabilityCacheLayer`](metadata::CapabilityCacheLayer)).
//! - [`auth`]: bearer JWT validation ([`BearerAuthLayer`](auth::BearerAuthLayer)).
//! - [`tenant`]: the tenant a verified token speaks for ([`TenantScopeLayer`](tenant::TenantScopeLayer)).
//! - [`route`]: the tenant's upstream, through a cached directory
//!   ([`TenantRoutingLayer`](route::TenantRoutingLayer)).
//! - [`limit`]: rate limits per tenant and per client ([`RateLimitLayer`](limit::RateLimitLayer)).
//! - [`smart`]: SMART scopes enforced per FHIR interaction
//!   ([`SmartScopeLayer`](smart::SmartScopeLayer)).
//! - `proxy`: forwarding to the upstream (`FhirProxy`, feature `proxy`); with
//!   `FhirProxy::or_in_process`, beside your own service for tenants served in-process.
//!
//! Around them:
//!
//! - `token`: the OAuth 2.0 client-credentials token endpoint, client stores and signing keys
//!   (`TokenEndpoint`, feature `token`).
//! - `gateway`: every layer assembled in one call, over the proxy (`Gateway`) or over your
//!   own service (`GatewayLayer`), feature `proxy`; its token routes
//!   (`GatewayBuilder::token_endpoint`) need feature `token` too.
//! - `postgres`: the client store, tenant directory, signing keys, revocations and
//!   failed-authentication counts of many replicas in one PostgreSQL database (`PgState`,
//!   feature `postgres`).
//! - [`ops`]: running it as a service: request ids, health and readiness, metrics, audit
//!   records, traces, body limits and timeouts, CORS.
//! - `extract`: axum extractors for what the layers verified and chose (feature `axum`).
//!
//! Shared by the layers:
//!
//! - [`interaction`]: which FHIR interaction a request is.
//! - [`outcome`]: FHIR `OperationOutcome` error bodies shared by every layer.
//! - [`body`]: the response body type the layers return.
//! - [`future`]: the response futures the layers return.
//!
//! Every rejection is an HTTP response, never a service error, so a stack over an
//! `Infallible` service stays `Infallible` and drops into `axum::Router::layer`.
//!
//! # Features
//! - `aws-lc-rs` (default): JWT crypto with aws-lc-rs. `rust-crypto`: pure-Rust crypto
//!   instead. With both enabled, aws-lc-rs is used.
//! - `remote-jwks` (default): fetch JWKS documents over HTTP with the hyper-util client: the
//!   bearer layer's JWKS URLs, and the `jwks_uri` of token endpoint clients that sign
//!   assertions (`private_key_jwt`).
//! - `proxy` (default): the `proxy` and `gateway` modules: forward requests to upstream FHIR
//!   servers over pooled connections.
//! - `tls`: `https://` upstreams and JWKS URLs, with rustls (the aws-lc-rs provider) and the
//!   webpki roots, plus any root certificates you add; for `proxy` and `remote-jwks`, which
//!   it does not enable.
//! - `token` (default): the `token` module, the client-credentials token endpoint, and the
//!   gateway's token routes.
//! - `seal`: the `seal` module, a key-encryption key (AES-256-GCM) that seals the upstreams'
//!   credentials and the private signing keys at rest, in files as in the database
//!   (`FileDirectory::open_sealed`, `SigningKeys::open_sealed`). A build without it refuses
//!   a file holding a sealed secret, saying so.
//! - `postgres`: the `postgres` module (tokio-postgres with a deadpool pool, AES-256-GCM
//!   sealed signing keys); enables `token` and `seal`.
//! - `axum`: axum extractors (`FromRequestParts`) for [`TenantId`](tenant::TenantId),
//!   [`VerifiedClaims`](auth::VerifiedClaims), [`FhirVersion`](version::FhirVersion) and
//!   [`InProcessTenant`](route::InProcessTenant); the token endpoint reads the client's
//!   address from axum's `ConnectInfo` too.
//!
//! [Tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_cfg))]
// Some docs link to items of optional features (the proxy, PostgreSQL). A build without one
// renders those links as text; the build with every feature (docs.rs's, and CI's) checks
// every link.
#![cfg_attr(
    not(all(feature = "proxy", feature = "postgres")),
    allow(rustdoc::broken_intra_doc_links)
)]

pub mod auth;
pub mod body;
#[cfg(any(feature = "proxy", feature = "postgres"))]
mod causes;
#[cfg(any(feature = "proxy", feature = "remote-jwks"))]
mod client;
// (The audit records read it too; its types are public with `proxy` or `token`.)
mod at_rest;
#[cfg_attr(
    not(any(feature = "proxy", feature = "token")),
    allow(dead_code, unreachable_pub)
)]
mod client_addr;
mod crypto;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
pub mod future;
#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
pub mod gateway;
mod hot_cache;
pub mod interaction;
pub mod limit;
pub mod metadata;
pub mod ops;
pub mod outcome;
mod persist;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
pub mod proxy;
pub mod route;
#[cfg(feature = "seal")]
#[cfg_attr(docsrs, doc(cfg(feature = "seal")))]
pub mod seal;
pub mod smart;
pub mod tenant;
#[cfg(test)]
mod testing;
#[cfg(any(
    all(feature = "tls", any(feature = "proxy", feature = "remote-jwks")),
    feature = "postgres"
))]
mod tls_client;
#[cfg(feature = "token")]
#[cfg_attr(docsrs, doc(cfg(feature = "token")))]
pub mod token;
pub mod version;
mod xml;

pub use crypto::install_crypto_provider;

use tower::layer::util::Stack;
use tower::ServiceBuilder;

/// Adds the tower-fhir layers to a [`ServiceBuilder`], one method per layer, to be called in
/// this order (outermost first).
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
/// use tower_fhir::limit::RateLimitLayer;
/// use tower_fhir::metadata::MetadataLayer;
/// use tower_fhir::route::{InMemoryDirectory, TenantRoutingLayer};
/// use tower_fhir::tenant::TenantScopeLayer;
/// use tower_fhir::version::VersionNegotiationLayer;
/// use tower_fhir::ServiceBuilderExt;
///
/// let auth = BearerAuthLayer::builder()
///     .key(VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap())
///     .build()
///     .unwrap();
/// let _builder = ServiceBuilder::new()
///     .fhir_versions(VersionNegotiationLayer::builder().build().unwrap())
///     .fhir_metadata(MetadataLayer::builder("https://gw.example", "https://gw.example/token").build().unwrap())
///     .fhir_bearer_auth(auth)
///     .fhir_tenant_scope(TenantScopeLayer::builder().build().unwrap())
///     .fhir_tenant_routing(TenantRoutingLayer::builder(InMemoryDirectory::new()).build().unwrap())
///     .fhir_rate_limits(RateLimitLayer::new());
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Negotiates the FHIR release; see [`version`].
    fn fhir_versions(
        self,
        layer: version::VersionNegotiationLayer,
    ) -> ServiceBuilder<Stack<version::VersionNegotiationLayer, L>>;

    /// Answers `metadata` and SMART configuration without a token; see [`metadata`].
    fn fhir_metadata(
        self,
        layer: metadata::MetadataLayer,
    ) -> ServiceBuilder<Stack<metadata::MetadataLayer, L>>;

    /// Requires a valid bearer token; see [`auth`].
    fn fhir_bearer_auth(
        self,
        layer: auth::BearerAuthLayer,
    ) -> ServiceBuilder<Stack<auth::BearerAuthLayer, L>>;

    /// Takes the tenant from the verified token; see [`tenant`].
    fn fhir_tenant_scope(
        self,
        layer: tenant::TenantScopeLayer,
    ) -> ServiceBuilder<Stack<tenant::TenantScopeLayer, L>>;

    /// Routes to the tenant's upstream; see [`route`].
    fn fhir_tenant_routing(
        self,
        layer: route::TenantRoutingLayer,
    ) -> ServiceBuilder<Stack<route::TenantRoutingLayer, L>>;

    /// Refuses requests over their tenant's or client's rate limit; see [`limit`].
    fn fhir_rate_limits(
        self,
        layer: limit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<limit::RateLimitLayer, L>>;

    /// Enforces the token's SMART scopes per FHIR interaction; see [`smart`]. After the rate
    /// limits: a request over a limit is refused before its body is read to be checked.
    fn fhir_smart_scopes(
        self,
        layer: smart::SmartScopeLayer,
    ) -> ServiceBuilder<Stack<smart::SmartScopeLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn fhir_versions(
        self,
        layer: version::VersionNegotiationLayer,
    ) -> ServiceBuilder<Stack<version::VersionNegotiationLayer, L>> {
        self.layer(layer)
    }

    fn fhir_metadata(
        self,
        layer: metadata::MetadataLayer,
    ) -> ServiceBuilder<Stack<metadata::MetadataLayer, L>> {
        self.layer(layer)
    }

    fn fhir_bearer_auth(
        self,
        layer: auth::BearerAuthLayer,
    ) -> ServiceBuilder<Stack<auth::BearerAuthLayer, L>> {
        self.layer(layer)
    }

    fn fhir_tenant_scope(
        self,
        layer: tenant::TenantScopeLayer,
    ) -> ServiceBuilder<Stack<tenant::TenantScopeLayer, L>> {
        self.layer(layer)
    }

    fn fhir_tenant_routing(
        self,
        layer: route::TenantRoutingLayer,
    ) -> ServiceBuilder<Stack<route::TenantRoutingLayer, L>> {
        self.layer(layer)
    }

    fn fhir_rate_limits(
        self,
        layer: limit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<limit::RateLimitLayer, L>> {
        self.layer(layer)
    }

    fn fhir_smart_scopes(
        self,
        layer: smart::SmartScopeLayer,
    ) -> ServiceBuilder<Stack<smart::SmartScopeLayer, L>> {
        self.layer(layer)
    }
}

// Compiles the README's Rust examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
