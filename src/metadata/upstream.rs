//! The CapabilityStatement for requests without a token, when a configured upstream's stands in
//! for a generated one: fetched through a service (the proxy, say) and cached per release.

// Only `MetadataBuilder::statement_from_upstream` (feature `proxy`) makes a source.
#![cfg_attr(not(feature = "proxy"), allow(dead_code))]

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;
use tower_service::Service;

use super::statement::MAX_STATEMENT_BYTES;
use crate::route::Upstream;
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type FetchStatement =
    dyn Fn(FhirVersion) -> Pin<Box<dyn Future<Output = Option<Value>> + Send>> + Send + Sync;

/// Where the statement for requests without a token comes from, and its cache.
pub(super) struct AnonymousSource {
    fetch: Box<FetchStatement>,
    cache: moka::future::Cache<FhirVersion, Value>,
}

impl AnonymousSource {
    /// Fetches `GET /metadata` through `service`, `upstream` in the request's extensions and
    /// the release asked for in its `Accept`; keeps a `CapabilityStatement` or `Conformance`
    /// answered with 200 for five minutes.
    pub(super) fn through<S, B>(service: S, upstream: Upstream) -> Self
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Behind a lock only so that the fetch is `Sync` for any service: each fetch takes a
        // clone of it.
        let service = Mutex::new(service);
        let fetch = move |version: FhirVersion| {
            let mut service = service.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let upstream = upstream.clone();
            let fetched = async move {
                let accept = format!("application/fhir+json; fhirVersion={}", version.mime_code());
                let mut request = Request::get("/metadata")
                    .header(header::ACCEPT, accept)
                    .body(Empty::<Bytes>::new())
                    .ok()?;
                request.extensions_mut().insert(upstream);
                // The proxy is always ready; another service may not be.
                std::future::poll_fn(|cx| service.poll_ready(cx))
                    .await
                    .ok()?;
                let response = service.call(request).await.ok()?;
                if response.status() != StatusCode::OK {
                    return None;
                }
                let body = Limited::new(response.into_body(), MAX_STATEMENT_BYTES)
                    .collect()
                    .await
                    .ok()?;
                super::statement::json_statement(&body.to_bytes()).map(Value::Object)
            };
            Box::pin(fetched) as Pin<Box<dyn Future<Output = Option<Value>> + Send>>
        };
        Self {
            fetch: Box::new(fetch),
            cache: moka::future::Cache::builder()
                .time_to_live(std::time::Duration::from_secs(300))
                .max_capacity(16)
                .build(),
        }
    }

    /// The upstream's statement for `version`, cached or fetched; `None` when the upstream
    /// gave none.
    pub(super) async fn statement(&self, version: FhirVersion) -> Option<Value> {
        self.cache
            .optionally_get_with(version, (self.fetch)(version))
            .await
    }
}

#[cfg(all(test, feature = "proxy"))]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::Full;
    use tower::{service_fn, ServiceExt};
    use tower_layer::Layer;

    use super::super::test_support::get;
    use super::super::MetadataLayer;
    use super::*;

    #[tokio::test]
    async fn any_cloneable_service_can_fetch_the_statement() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let fetcher = service_fn(move |request: Request<Empty<Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            assert!(request.extensions().get::<Upstream>().is_some());
            assert_eq!(
                request.headers()[header::ACCEPT],
                "application/fhir+json; fhirVersion=4.0"
            );
            async {
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(
                    r#"{"resourceType":"CapabilityStatement","fhirVersion":"4.0.1","software":{"name":"EHR"}}"#,
                )))
            }
        });
        let upstream = Upstream::parse("http://ehr/fhir", FhirVersion::R4).unwrap();
        let service = MetadataLayer::builder("https://gw.example", "https://gw.example/token")
            .statement_from_upstream(fetcher, upstream)
            .build()
            .unwrap()
            .layer(service_fn(|_request: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }));
        for _ in 0..3 {
            let mut request = get("/metadata");
            request.extensions_mut().insert(FhirVersion::R4);
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let statement: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(statement["software"]["name"], "EHR");
            assert_eq!(statement["implementation"]["url"], "https://gw.example");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "fetched once, then cached");
    }
}
