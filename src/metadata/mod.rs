//! Metadata pass-through: how a client learns to authenticate before it has a token.
//!
//! [`MetadataLayer`] sits between version negotiation and bearer validation. It lets exactly
//! two requests through without a token:
//!
//! - `GET [base]/metadata` (any query, such as `?_format=json`): without a token, a
//!   CapabilityStatement (DSTU2: `Conformance`) generated for the negotiated release (or a
//!   configured upstream's, fetched and cached: `statement_from_upstream`), in FHIR XML
//!   when the client asks for XML (`_format=xml`, or an `Accept` preferring XML to JSON:
//!   always the generated statement then, whose XML form the gateway writes); with a
//!   token, the request goes through the authenticated stack to the tenant's own server, and
//!   its JSON answer comes back with the gateway's security section (one in another format,
//!   XML, passes as the upstream sent it: the gateway rewrites JSON only).
//! - `GET [base]/.well-known/smart-configuration`: JSON whatever the `Accept` header, naming the
//!   token endpoint, the grant type and the client authentication methods.
//!
//! [`CapabilityCacheLayer`] goes just in front of the proxy (after routing) and keeps each
//! tenant's upstream CapabilityStatement for a while, so clients asking for `metadata` again
//! and again do not reach the hospital each time. It keeps only the statements this layer
//! rewrites (JSON, uncompressed), per tenant, upstream, negotiated release, query string and
//! `Accept`/`Accept-Language`; a statement in another format (`_format=xml`) passes through
//! as the upstream sent it, to that client only, and is never kept. [`MetadataLayer`] drops
//! the client's `Accept-Encoding` from `metadata` requests, so that the upstream's statement
//! comes uncompressed and can be rewritten.
//!
//! Anything else (`metadata/x`, `//metadata`, `%6detadata`, `Patient?x=metadata`, another
//! method) goes to the authenticated stack. Every JSON CapabilityStatement the gateway returns
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

mod cache;
mod layer;
mod smart;
mod statement;
#[cfg(test)]
mod test_support;
mod upstream;

pub use cache::{
    CapabilityCache, CapabilityCacheLayer, DEFAULT_CAPABILITY_CACHE_BYTES, MAX_STATEMENT_READS,
};
pub use layer::{ConfigError, Metadata, MetadataBuilder, MetadataLayer};

/// The response future of [`Metadata`] and [`CapabilityCache`]: the inner service's (every
/// request but `metadata` and smart-configuration), or the layer's own work.
pub type ResponseFuture<F, B, E> = crate::future::PassOrOwn<F, B, E>;
