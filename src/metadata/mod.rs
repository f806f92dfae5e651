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
//!   XML, or compressed, passes as the upstream sent it: the gateway rewrites JSON only). A
//!   statement after a UTF-8 byte order mark (some .NET servers send one) is JSON too. An
//!   answer sent as uncompressed JSON that is no JSON statement (cut short, another resource)
//!   is a 502 with an OperationOutcome: passed on, it would carry the upstream's own security
//!   section. A tenant served in-process ([`InProcessTenant`](crate::route::InProcessTenant))
//!   whose application has no `metadata` of its own (it answers 404 or 405) gets the
//!   generated statement, in the release the request is served in, as without a token (this
//!   needs the [`CapabilityCacheLayer`] between routing and the application, where
//!   [`GatewayLayer`](crate::gateway::GatewayLayer) puts it).
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
//! `metadata` is recognised as the proxy forwards it and the SMART scope layer reads it:
//! empty segments do not count, so `//metadata`, `///metadata`, `/metadata/` and
//! `/metadata//` are `metadata` too (the proxy would send each upstream as a `metadata`
//! request), answered as above; with a token, the request goes on as `GET /metadata`. A
//! `HEAD` is answered with the headers the `GET` would have had (its `Content-Length`
//! included) and no body: with a token, it goes through the authenticated stack as a `GET`,
//! so the statement's length is that of the rewritten statement, and the capability cache
//! answers it.
//!
//! Anything else (`metadata/x`, `%6detadata`, `METADATA`, `Patient?x=metadata`, another
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

/// Whether `path` (a request's path, without its query) is `metadata` at the FHIR base, read
/// as the proxy forwards it and the SMART scope layer classifies it: its non-empty segments
/// are `metadata` alone. The proxy merges runs of slashes and keeps a trailing one (which FHIR
/// servers ignore), so `//metadata`, `///metadata`, `/metadata/` and `/metadata//` all reach
/// the upstream as its `metadata`, and the metadata layer and the capability cache must
/// treat them as such: otherwise the upstream's own statement, security section and all,
/// would reach the client unrewritten, past the cache. Case and percent-encoding count:
/// `/METADATA` and `/%6detadata` are not `metadata`.
pub(crate) fn is_metadata_path(path: &str) -> bool {
    // `metadata` holds no slash: trimming the slashes around it leaves it alone exactly when
    // every other segment is empty.
    path.trim_matches('/') == "metadata"
}

#[cfg(test)]
mod tests {
    use super::is_metadata_path;
    use crate::interaction::{classify, Interaction};
    use http::Method;
    use proptest::prelude::*;

    /// The path the proxy sends upstream for `path` (runs of slashes merged, as
    /// `proxy::path::upstream_path` does), read as an upstream reads it (a trailing slash
    /// ignored), at the base.
    fn as_forwarded(path: &str) -> String {
        let mut merged = String::new();
        for c in path.chars() {
            if c != '/' || !merged.ends_with('/') {
                merged.push(c);
            }
        }
        if merged.len() > 1 {
            if let Some(trimmed) = merged.strip_suffix('/') {
                merged.truncate(trimmed.len());
            }
        }
        merged
    }

    #[test]
    fn metadata_is_read_as_the_proxy_forwards_it() {
        for path in [
            "/metadata",
            "//metadata",
            "///metadata",
            "/metadata/",
            "/metadata//",
            "//metadata/",
        ] {
            assert!(is_metadata_path(path), "{path}");
            assert_eq!(as_forwarded(path), "/metadata", "{path}");
        }
        for path in [
            "/",
            "",
            "/metadata/x",
            "/x/metadata",
            "//metadata/x",
            "/%6detadata",
            "/METADATA",
            "/metadata.json",
            "/metadata%2F",
            "/ metadata",
        ] {
            assert!(!is_metadata_path(path), "{path}");
        }
    }

    proptest! {
        /// Whatever the slashes around it, a path is `metadata` exactly when the proxy would
        /// send it upstream as `metadata`; and whatever the SMART scope layer classifies as
        /// `capabilities` is `metadata`.
        #[test]
        fn agrees_with_the_proxy_and_the_smart_check(
            segments in proptest::collection::vec(
                prop_oneof![Just(""), Just("metadata"), Just("Metadata"), Just("x"), Just("$meta")],
                0..5,
            ),
        ) {
            let path = format!("/{}", segments.join("/"));
            prop_assert_eq!(is_metadata_path(&path), as_forwarded(&path) == "/metadata", "{}", path);
            if classify(&Method::GET, &path).interaction == Some(Interaction::Capabilities) {
                prop_assert!(is_metadata_path(&path), "{}", path);
            }
        }
    }
}
