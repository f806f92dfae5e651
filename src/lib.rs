//! Composable [Tower] layers that turn any hyper-compatible service into a multi-tenant FHIR
//! gateway.
//!
//! A client application authenticates with OAuth 2.0 client credentials and sends its bearer
//! token with every request; the gateway verifies it, finds the customer's tenant in the
//! token's scope, and forwards the request to that hospital's FHIR server. Each step is a
//! layer of its own, usable alone or stacked:
//!
//! - [`auth`]: bearer JWT validation ([`BearerAuthLayer`](auth::BearerAuthLayer)).
//! - [`tenant`]: the tenant a verified token speaks for ([`TenantScopeLayer`](tenant::TenantScopeLayer)).
//! - [`route`]: the tenant's upstream, through a cached directory
//!   ([`TenantRoutingLayer`](route::TenantRoutingLayer)).
//! - `proxy`: forwarding to the upstream (`FhirProxy`, feature `proxy`).
//! - `token`: the OAuth 2.0 client-credentials token endpoint, client store and signing keys
//!   (`TokenEndpoint`, feature `token`).
//! - [`version`]: FHIR releases ([`FhirVersion`](version::FhirVersion)).
//! - [`outcome`]: FHIR `OperationOutcome` error bodies shared by every layer.
//! - [`body`]: the response body type the layers return.
//!
//! Every rejection is an HTTP response, never a service error, so a stack over an
//! `Infallible` service stays `Infallible` and drops into `axum::Router::layer`.
//!
//! # Features
//! - `aws-lc-rs` (default): JWT crypto with aws-lc-rs. `rust-crypto`: pure-Rust crypto
//!   instead. With both enabled, aws-lc-rs is used.
//! - `remote-jwks` (default): fetch JWKS documents over HTTP with the hyper-util client.
//! - `proxy` (default): forward requests to upstream FHIR servers with the hyper-util client.
//! - `token` (default): the client-credentials token endpoint.
//!
//! [Tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
pub mod body;
mod crypto;
pub mod future;
pub mod outcome;
#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
pub mod proxy;
pub mod route;
pub mod tenant;
#[cfg(feature = "token")]
#[cfg_attr(docsrs, doc(cfg(feature = "token")))]
pub mod token;
pub mod version;

pub use crypto::install_crypto_provider;

use tower::layer::util::Stack;
use tower::ServiceBuilder;

/// Adds the tower-fhir layers to a [`ServiceBuilder`].
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
/// use tower_fhir::ServiceBuilderExt;
///
/// let auth = BearerAuthLayer::builder()
///     .key(VerificationKey::hmac("a-long-shared-secret").unwrap())
///     .build()
///     .unwrap();
/// let _builder = ServiceBuilder::new().fhir_bearer_auth(auth);
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Requires a valid bearer token; see [`auth`].
    fn fhir_bearer_auth(
        self,
        layer: auth::BearerAuthLayer,
    ) -> ServiceBuilder<Stack<auth::BearerAuthLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn fhir_bearer_auth(
        self,
        layer: auth::BearerAuthLayer,
    ) -> ServiceBuilder<Stack<auth::BearerAuthLayer, L>> {
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
