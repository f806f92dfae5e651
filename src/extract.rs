//! Axum extractors for what the layers put in a request (feature `axum`).
//!
//! Behind the stack ([`GatewayLayer`](crate::gateway::GatewayLayer), or the layers one by
//! one), a handler takes what it needs as arguments:
//!
//! | extractor | put there by | what |
//! |---|---|---|
//! | [`TenantId`] | [`TenantScopeLayer`](crate::tenant::TenantScopeLayer) | the tenant the token speaks for |
//! | [`VerifiedClaims`] | [`BearerAuthLayer`](crate::auth::BearerAuthLayer) | the verified token's claims |
//! | [`FhirVersion`] | [`VersionNegotiationLayer`](crate::version::VersionNegotiationLayer), or [`TenantRoutingLayer`](crate::route::TenantRoutingLayer) for an in-process tenant | the release to answer in |
//! | [`InProcessTenant`] | [`TenantRoutingLayer`](crate::route::TenantRoutingLayer) | the tenant's key in your application, its releases |
//!
//! Each also extracts as an `Option`, which is `None` when absent. Absent where it is required,
//! the handler is not behind the layer that provides it: a deployment mistake, not the
//! client's, so the rejection ([`MissingLayer`]) is `500` with an `OperationOutcome` naming the
//! missing layer (and an error in the log), never a panic. `FhirVersion` is absent for a
//! proxied-style route whose client named no release; take it as `Option<FhirVersion>` there.
//!
//! With this feature the token endpoint also reads the client's address from axum's
//! `ConnectInfo<SocketAddr>` when the server put no [`ClientAddr`](crate::token::ClientAddr)
//! (serve with `into_make_service_with_connect_info::<SocketAddr>()`), so its brute-force
//! throttle counts per address.
//!
//! ```
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_fhir::route::InProcessTenant;
//! use tower_fhir::tenant::TenantId;
//! use tower_fhir::version::FhirVersion;
//!
//! async fn read(tenant: TenantId, local: InProcessTenant, version: FhirVersion) -> String {
//!     format!("{tenant} {} {}", local.key(), version.mime_code())
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // Mounted without the layers, by mistake: a 500 naming the missing one.
//! let app = Router::new().route("/Patient/{id}", get(read));
//! let response = app.oneshot(Request::get("/Patient/1").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(outcome["resourceType"], "OperationOutcome");
//! assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("TenantScopeLayer"));
//! # });
//! ```

use std::convert::Infallible;
use std::fmt;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::auth::VerifiedClaims;
use crate::outcome::{IssueType, OperationOutcome};
use crate::route::InProcessTenant;
use crate::tenant::TenantId;
use crate::version::FhirVersion;

/// The rejection of an extractor whose value is not in the request: the handler is not behind
/// the layer that puts it there. Answers `500` with an `OperationOutcome` (`exception`) naming
/// what is missing and which layer provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingLayer {
    what: &'static str,
    layer: &'static str,
}

impl MissingLayer {
    /// What the handler asked for (`TenantId`, ...).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The layer that provides it.
    pub fn layer(&self) -> &'static str {
        self.layer
    }
}

impl fmt::Display for MissingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "The request carries no {}: this handler is not behind {}",
            self.what, self.layer
        )
    }
}

impl std::error::Error for MissingLayer {}

impl IntoResponse for MissingLayer {
    fn into_response(self) -> Response {
        tracing::error!(
            missing = self.what,
            layer = self.layer,
            "a handler was reached without the layer that provides what it extracts"
        );
        OperationOutcome::error(IssueType::Exception, self.to_string())
            .to_response(StatusCode::INTERNAL_SERVER_ERROR)
            .map(axum::body::Body::from)
    }
}

/// The extension `T`, or the rejection naming the layer that provides it.
fn required<T: Clone + Send + Sync + 'static>(
    parts: &Parts,
    what: &'static str,
    layer: &'static str,
) -> Result<T, MissingLayer> {
    parts
        .extensions
        .get::<T>()
        .cloned()
        .ok_or(MissingLayer { what, layer })
}

macro_rules! extractor {
    ($type:ty, $what:literal, $layer:literal) => {
        impl<S: Send + Sync> FromRequestParts<S> for $type {
            type Rejection = MissingLayer;

            async fn from_request_parts(
                parts: &mut Parts,
                _state: &S,
            ) -> Result<Self, Self::Rejection> {
                required(parts, $what, $layer)
            }
        }

        impl<S: Send + Sync> OptionalFromRequestParts<S> for $type {
            type Rejection = Infallible;

            async fn from_request_parts(
                parts: &mut Parts,
                _state: &S,
            ) -> Result<Option<Self>, Self::Rejection> {
                Ok(parts.extensions.get::<$type>().cloned())
            }
        }
    };
}

extractor!(TenantId, "TenantId", "TenantScopeLayer (or GatewayLayer)");
extractor!(
    VerifiedClaims,
    "VerifiedClaims",
    "BearerAuthLayer (or GatewayLayer)"
);
extractor!(
    FhirVersion,
    "FhirVersion",
    "VersionNegotiationLayer with a release the client named, or TenantRoutingLayer for an in-process tenant (or GatewayLayer); take Option<FhirVersion> where no release may be named"
);
extractor!(
    InProcessTenant,
    "InProcessTenant",
    "TenantRoutingLayer (or GatewayLayer) for a tenant served in-process, or it is a proxied tenant's request (send those to a FhirProxy: FhirProxy::or_in_process; or take Option<InProcessTenant>)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(app: Router, request: Request<Body>) -> (StatusCode, String) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn request(extensions: impl FnOnce(&mut http::Extensions)) -> Request<Body> {
        let mut request = Request::get("/").body(Body::empty()).unwrap();
        extensions(request.extensions_mut());
        request
    }

    #[tokio::test]
    async fn present_values_are_extracted() {
        let tenant: TenantId = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
        let local = InProcessTenant::new("contoso", [FhirVersion::R4]).unwrap();
        let app = Router::new().route(
            "/",
            get(
                |tenant: TenantId, local: InProcessTenant, version: FhirVersion| async move {
                    format!("{tenant} {} {}", local.key(), version.mime_code())
                },
            ),
        );
        let (status, body) = call(
            app,
            request(|e| {
                e.insert(tenant);
                e.insert(local);
                e.insert(FhirVersion::R4);
            }),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("{tenant} contoso 4.0"));
    }

    #[tokio::test]
    async fn each_missing_value_names_its_layer() {
        let cases: [(Router, &str); 4] = [
            (
                Router::new().route("/", get(|_: TenantId| async { "" })),
                "TenantScopeLayer",
            ),
            (
                Router::new().route("/", get(|_: VerifiedClaims| async { "" })),
                "BearerAuthLayer",
            ),
            (
                Router::new().route("/", get(|_: FhirVersion| async { "" })),
                "VersionNegotiationLayer",
            ),
            (
                Router::new().route("/", get(|_: InProcessTenant| async { "" })),
                "TenantRoutingLayer",
            ),
        ];
        for (app, layer) in cases {
            let (status, body) = call(app, request(|_| {})).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{layer}");
            let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            assert_eq!(outcome["issue"][0]["code"], "exception");
            let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
            assert!(diagnostics.contains(layer), "{diagnostics}");
        }
    }

    #[tokio::test]
    async fn optional_extractors_say_none_instead() {
        let app = Router::new().route(
            "/",
            get(
                |tenant: Option<TenantId>,
                 claims: Option<VerifiedClaims>,
                 version: Option<FhirVersion>,
                 local: Option<InProcessTenant>| async move {
                    format!(
                        "{} {} {} {}",
                        tenant.is_some(),
                        claims.is_some(),
                        version.is_some(),
                        local.is_some()
                    )
                },
            ),
        );
        let (status, body) = call(app, request(|_| {})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "false false false false");
    }
}
