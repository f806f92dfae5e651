//! The upstream proxy: forwards each routed request to its tenant's FHIR server.
//!
//! [`FhirProxy`] is the innermost service of the gateway. It reads the
//! [`Upstream`](crate::route::Upstream) that the routing layer put in the request extensions
//! and sends the request there over a pooled connection, changing only what a proxy must:
//!
//! - the path joined under the upstream's base path, the query string byte for byte, method
//!   and body (streamed) untouched;
//! - only the request headers FHIR clients need, each named with why in
//!   [`FORWARDED_REQUEST_HEADERS`] (`Accept`, `Content-Type`, `If-Match`, `If-None-Exist`,
//!   `Prefer`, `X-Request-Id`, ...), plus those you name with
//!   [`forward_request_header`](FhirProxyBuilder::forward_request_header); everything else is
//!   dropped: hop-by-hop headers and those named in `Connection`, `Cookie` (all tenants share
//!   the gateway's origin and a browser's one cookie jar for it), the method and URL overrides
//!   (`X-HTTP-Method-Override`, `X-Original-URL`, `X-Rewrite-URL`) an upstream might honour
//!   behind the gateway's checks, `Accept-Encoding` (a compressed answer could not be
//!   rewritten: `Accept-Encoding: identity` is sent instead, as a request without it takes
//!   any coding), and anything else; a target that is no path is not forwarded (`400`):
//!   `OPTIONS *`, or the authority form (`host:port`, for `CONNECT` alone);
//! - `Host` set to the upstream; `Forwarded` and `X-Forwarded-For` started afresh (a client's
//!   own, and its `X-Real-IP`, `X-Forwarded-Port`, `-Prefix`, `-Server`, dropped), or extended
//!   with [`trust_forwarded_headers`](FhirProxyBuilder::trust_forwarded_headers) behind a load
//!   balancer of yours; `X-Forwarded-Proto`/`-Host` and `Forwarded`'s `proto=`/`host=` are the
//!   public base URL's given to [`FhirProxy::builder`], whatever `Host` the client sent;
//! - the client's `Authorization` replaced by the upstream's own credentials, or removed;
//! - `Cookie` forwarded (several `Cookie` fields, as HTTP/2 clients send them, joined into one
//!   with `; `), and the upstream's `Set-Cookie` returned, only for an upstream that
//!   opts in with [`Upstream::with_set_cookie_allowed`](crate::route::Upstream::with_set_cookie_allowed)
//!   (`"allow_set_cookie": true`); otherwise `Set-Cookie` is removed from its responses, so no
//!   upstream sets cookies on the gateway's origin.
//!
//! A request never leaves its tenant's upstream: dot segments (also percent-encoded, also
//! `..;`, `..%3f`, or trailed by control characters), an encoded `%` (a path encoded twice or
//! more), encoded bytes beyond ASCII, encoded slashes, backslashes and NULs, and path
//! parameters (`/Patient;x=1/1`, which Java servers serve as `Patient/1`) get 400, and an
//! absolute-form target or a `Host` header cannot change the destination. A request body under
//! a transfer coding other than `chunked` gets 501, a GET or HEAD with a body 400 (an HTTP/2
//! stream ended by an empty DATA frame carries none; nor does a DELETE's or OPTIONS's, which
//! goes bodiless, not as an empty chunked body). Responses
//! pass through with hop-by-hop headers and trailers removed, their `Content-Length` the one
//! the body was read with, and the upstream's base URL rewritten to the gateway's public base
//! in `Location`, `Content-Location` and `Link` (read as a client resolves them: host in any
//! case, default port, path-absolute; never one whose path climbs back out of the base with a
//! `..` segment), and JSON Bundles' `link[].url` and `entry[].fullUrl` (XML Bundles' too; bodies up to a
//! limit; larger or compressed ones stream through untouched). An upstream that refuses or
//! resets the connection gives 502, one that does not answer in time 504, each with an
//! `OperationOutcome`. An upstream with a
//! [`max_concurrency`](crate::route::Upstream::with_max_concurrency) takes at most that many
//! requests at once (counted per base URL, until each response body ends); one more waits up
//! to the upstream's timeout for a slot, then gets 503 with `Retry-After` and an
//! `OperationOutcome` (`throttled`), never reaching the upstream.
//!
//! Connections to plain-HTTP upstreams are the proxy's own HTTP/1.1 pool's: per upstream host
//! and tenant (the request's [`TenantId`](crate::tenant::TenantId), so that no connection
//! carries two tenants' requests), idle connections are reused most recently used first,
//! checked before use, returned once they can take the next request (never after a request
//! with a body, which a server may have left unread) and closed after the idle timeout; a
//! request that a closing connection hands back unsent goes out on another, and only a safe
//! request without a body that an idle connection lost unanswered as it went out is ever sent
//! twice. HTTPS upstreams (where ALPN may choose HTTP/2) and h2c ones use hyper-util's pooled
//! client (for HTTPS one a tenant, a request with a body sent with `Connection: close`). Its
//! HTTP/2 connection to an upstream carries every request to it at once, under one
//! flow-control window: each stream is granted 256 KiB and the connection 16 MiB, so it takes
//! 64 answers that their clients leave unread (until the idle watchdog drops them) to make the
//! others' wait.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use http_body_util::Full;
//! use tower::ServiceExt;
//! use tower_fhir::proxy::FhirProxy;
//! use tower_fhir::route::Upstream;
//! use tower_fhir::version::FhirVersion;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let proxy = FhirProxy::builder("https://gateway.example").build().unwrap();
//! // Nothing listens on port 1.
//! let upstream = Upstream::parse("http://127.0.0.1:1/fhir", FhirVersion::Stu3).unwrap();
//!
//! let mut request = Request::get("/Patient/1").body(Full::<Bytes>::default()).unwrap();
//! request.extensions_mut().insert(upstream.clone());
//! let response = proxy.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
//!
//! let mut request = Request::get("/Patient/%2e%2e/other-tenant").body(Full::<Bytes>::default()).unwrap();
//! request.extensions_mut().insert(upstream);
//! let response = proxy.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::BAD_REQUEST);
//! # });
//! ```

mod body;
mod deadline;
mod headers;
mod in_process;
pub(crate) mod path;
mod pool;
mod response;
mod rewrite;
mod service;
mod slots;
mod transport;

pub use crate::client_addr::{ClientAddr, ForwardedClient, SourceNetwork};
pub use body::{ProxyBody, Relayed, UpstreamCut, UpstreamStalled};
pub use headers::{FORWARDED_REQUEST_HEADERS, FORWARDING_CHAIN_HEADERS};
pub use in_process::{DispatchFuture, InProcessOrProxy};
pub use service::{
    ConfigError, FhirProxy, FhirProxyBuilder, ResponseFuture, DEFAULT_POOL_MAX_IDLE,
    DEFAULT_REWRITE_BUDGET,
};
