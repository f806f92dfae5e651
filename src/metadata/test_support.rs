//! What the metadata tests share: a configured layer around a stand-in authenticated stack.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_layer::Layer;

use super::statement::OAUTH_URIS;
use super::MetadataLayer;

/// The layer under test, every URL configured.
pub(super) fn layer() -> MetadataLayer {
    MetadataLayer::builder("https://gw.example/fhir/", "https://gw.example/oauth/token")
        .authorize_url("https://gw.example/oauth/authorize")
        .issuer("https://gw.example")
        .jwks_uri("https://gw.example/.well-known/jwks.json")
        .build()
        .unwrap()
}

/// The authenticated stack: answers with an upstream-like CapabilityStatement.
async fn upstream(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let statement = json!({"resourceType": "CapabilityStatement", "fhirVersion": "3.0.1",
        "implementation": {"description": "EHR", "url": "http://ehr.internal/fhir"},
        "rest": [{"mode": "server", "security": {
            "extension": [{"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": "http://ehr.internal/token"}]},
                          {"url": "http://example.org/other"}],
            "service": [{"text": "Basic"}]}}]});
    let status = if req.headers().contains_key("authorization") {
        200
    } else {
        401
    };
    Ok(Response::builder()
        .status(status)
        .body(Full::from(statement.to_string()))
        .unwrap())
}

/// Sends `request` through [`layer`] around [`upstream`]: the status, headers and JSON body
/// (`Null` if not JSON).
pub(super) async fn call(request: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Value) {
    let response = layer()
        .layer(tower::service_fn(upstream))
        .oneshot(request)
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A `GET` of `uri` without a body.
pub(super) fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}
