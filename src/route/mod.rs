//! Tenant routing: from the request's tenant to that tenant's FHIR server.
//!
//! [`TenantRoutingLayer`] reads the [`TenantId`](crate::tenant::TenantId) (and, when a version
//! layer negotiated one, the [`FhirVersion`](crate::version::FhirVersion)) from the request
//! extensions, looks the tenant up in a [`TenantDirectory`] through a cache, and calls the inner
//! service with what serves the request in the extensions. A tenant's [`TenantRecord`] is one
//! of two kinds, treated alike by the cache, the rate limits and the stores:
//!
//! - proxied: its [`Upstream`]s; the one for that version (or the default) goes in the
//!   extensions, and the proxy forwards there;
//! - served in-process by your own handlers: an [`InProcessTenant`] (an opaque key of yours and
//!   the releases served, no URL) goes in the extensions with the release chosen as a
//!   [`FhirVersion`](crate::version::FhirVersion), and the response is labelled with it.
//!
//! A tenant's [`RateLimit`](crate::limit::RateLimit), when its record has one
//! ([`TenantRecord::with_rate_limit`]), goes in the extensions too, as a
//! [`TenantRateLimit`](crate::limit::TenantRateLimit) for the
//! [`RateLimitLayer`](crate::limit::RateLimitLayer) after it.
//!
//! | case | status |
//! |---|---|
//! | tenant not onboarded (the token is valid, the tenant is unknown) | 403 |
//! | no upstream (or in-process release) for the requested FHIR version, nor for any other release the client's `Accept` takes | 406 |
//! | directory down and nothing cached | 503 (`Retry-After`) |
//! | no `TenantId` in the extensions (no tenant layer in front) | 403 |
//!
//! The cache (moka) keeps answers for a TTL, coalesces concurrent misses for a tenant into
//! one directory call, remembers unknown tenants for a shorter time, serves known routes for a
//! grace period while the directory fails, and can be invalidated per tenant
//! ([`RouteCache::invalidate`], or [`RouteCache::follow`] a change stream).
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fhir::route::{InMemoryDirectory, TenantRoutingLayer, TenantRecord, Upstream};
//! use tower_fhir::tenant::TenantId;
//! use tower_fhir::version::FhirVersion;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tenant: TenantId = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
//! let directory = InMemoryDirectory::new();
//! let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
//! directory.upsert(tenant, TenantRecord::new([upstream]).unwrap());
//!
//! let service = ServiceBuilder::new()
//!     .layer(TenantRoutingLayer::builder(directory).build().unwrap())
//!     .service_fn(|req: Request<Full<Bytes>>| async move {
//!         let upstream = req.extensions().get::<Upstream>().unwrap();
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(upstream.base().to_string())))
//!     });
//!
//! let mut request = Request::new(Full::default());
//! request.extensions_mut().insert(tenant);
//! assert_eq!(service.clone().oneshot(request).await.unwrap().status(), StatusCode::OK);
//!
//! // Asking for a release the tenant does not run: 406.
//! let mut request = Request::new(Full::default());
//! request.extensions_mut().insert(tenant);
//! request.extensions_mut().insert(FhirVersion::R4);
//! assert_eq!(service.clone().oneshot(request).await.unwrap().status(), StatusCode::NOT_ACCEPTABLE);
//!
//! // A tenant nobody onboarded: 403.
//! let mut request = Request::new(Full::default());
//! request.extensions_mut().insert("00000000-0000-4000-8000-000000000000".parse::<TenantId>().unwrap());
//! assert_eq!(service.oneshot(request).await.unwrap().status(), StatusCode::FORBIDDEN);
//! # });
//! ```

mod cache;
mod directory;
mod layer;
mod nesting;
mod upstream;

pub use cache::RouteCache;
pub use directory::{
    DirectoryError, DirectoryFuture, FileDirectory, InMemoryDirectory, TenantDirectory,
    TenantStore, TenantStoreBorrowingFuture, TenantStoreFuture, TenantWriteLock,
};
pub use layer::{
    ConfigError, ResponseFuture, TenantRouting, TenantRoutingBuilder, TenantRoutingLayer,
};
pub use nesting::{host_address, nested_bases, NestedBases};
pub(crate) use upstream::without_userinfo;
pub use upstream::{
    InProcessTenant, InvalidTenant, InvalidUpstream, TenantEntry, TenantRecord, Upstream,
    UpstreamBase,
};
