//! The CapabilityStatement for requests without a token, when a configured upstream's stands in
//! for a generated one: fetched through a service (the proxy, say) and cached per release.

// Only `MetadataBuilder::statement_from_upstream` (feature `proxy`) makes a source.
#![cfg_attr(not(feature = "proxy"), allow(dead_code))]

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// How long a statement fetched is kept.
const STATEMENT_TTL: Duration = Duration::from_secs(300);

/// How long a failed fetch is remembered: meanwhile requests get the generated statement and
/// the upstream is not asked again.
const FAILURE_TTL: Duration = Duration::from_secs(30);

/// Where the statement for requests without a token comes from, and its cache.
pub(super) struct AnonymousSource {
    fetch: Box<FetchStatement>,
    cache: moka::future::Cache<FhirVersion, Fetched>,
    /// How long a failure is remembered ([`FAILURE_TTL`]; shorter in tests).
    failure_ttl: Duration,
}

/// What a fetch gave for one release: the statement, or `None` (it failed), and how long that
/// is kept.
#[derive(Clone)]
struct Fetched {
    statement: Option<Value>,
    lifetime: Duration,
}

/// Keeps each fetch's outcome for its own lifetime.
struct FetchedLifetime;

impl moka::Expiry<FhirVersion, Fetched> for FetchedLifetime {
    fn expire_after_create(
        &self,
        _: &FhirVersion,
        fetched: &Fetched,
        _: Instant,
    ) -> Option<Duration> {
        Some(fetched.lifetime)
    }

    fn expire_after_update(
        &self,
        _: &FhirVersion,
        fetched: &Fetched,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(fetched.lifetime)
    }
}

impl AnonymousSource {
    /// Fetches `GET /metadata` through `service`, `upstream` in the request's extensions and
    /// the release asked for in its `Accept`; keeps a `CapabilityStatement` or `Conformance`
    /// answered with 200 for five minutes, and remembers that there was none (no answer,
    /// another status, not a JSON statement) for 30 seconds.
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
                .expire_after(FetchedLifetime)
                .max_capacity(16)
                .build(),
            failure_ttl: FAILURE_TTL,
        }
    }

    /// The upstream's statement for `version`, cached or fetched (one fetch for concurrent
    /// requests); `None` when the upstream gave none, now or within the last
    /// [`FAILURE_TTL`].
    pub(super) async fn statement(&self, version: FhirVersion) -> Option<Value> {
        let fetched = self
            .cache
            .get_with(version, async {
                match (self.fetch)(version).await {
                    Some(statement) => Fetched {
                        statement: Some(statement),
                        lifetime: STATEMENT_TTL,
                    },
                    None => {
                        tracing::warn!(
                            release = version.mime_code(),
                            "the configured upstream gave no CapabilityStatement; serving a \
                             generated one, and asking again in {} s",
                            self.failure_ttl.as_secs()
                        );
                        Fetched {
                            statement: None,
                            lifetime: self.failure_ttl,
                        }
                    }
                }
            })
            .await;
        fetched.statement
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

    #[tokio::test]
    async fn a_failed_fetch_is_remembered_a_while() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let failing = service_fn(move |_request: Request<Empty<Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {
                let mut response = Response::new(Full::<Bytes>::default());
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, Infallible>(response)
            }
        });
        let upstream = Upstream::parse("http://ehr/fhir", FhirVersion::R4).unwrap();
        let mut source = AnonymousSource::through(failing, upstream);
        assert_eq!(source.failure_ttl, FAILURE_TTL);
        source.failure_ttl = Duration::from_millis(300);
        for _ in 0..3 {
            assert!(source.statement(FhirVersion::R4).await.is_none());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the failure is remembered");
        // Another release is another question.
        assert!(source.statement(FhirVersion::Stu3).await.is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Once forgotten, the upstream is asked again.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(source.statement(FhirVersion::R4).await.is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
