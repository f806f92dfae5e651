//! `GET /healthz` and `GET /readyz`, answered without a token.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::future::ResponseFuture;

/// The liveness path.
pub const HEALTHZ_PATH: &str = "/healthz";
/// The readiness path.
pub const READYZ_PATH: &str = "/readyz";

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

/// Answers `GET /healthz` and `GET /readyz` ahead of the inner service, without a token.
///
/// - `/healthz`: `200 {"status":"ok"}` while the process serves.
/// - `/readyz`: `200 {"status":"ready"}` when every readiness check passes, otherwise
///   `503 {"status":"not ready","waiting_for":[...]}` naming the checks that fail, by the
///   names given to [`readiness`](Self::readiness). Name checks by kind ("signing keys",
///   "trusted issuers' keys"): the answers are public and should reveal no tenant, client or
///   upstream.
///
/// Both are `Cache-Control: no-store`; `HEAD` works too, other methods get `405`. Every other
/// path goes to the inner service.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use http::{Request, Response, StatusCode};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_fhir::ops::HealthLayer;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let loaded = Arc::new(AtomicBool::new(false));
/// let flag = Arc::clone(&loaded);
/// let health = HealthLayer::new().readiness("state", move || flag.load(Ordering::Relaxed));
/// let service = health.layer(service_fn(|_r: Request<String>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
/// }));
///
/// let get = |path: &str| Request::get(path).body(String::new()).unwrap();
/// assert_eq!(service.clone().oneshot(get("/healthz")).await.unwrap().status(), StatusCode::OK);
/// let waiting = service.clone().oneshot(get("/readyz")).await.unwrap();
/// assert_eq!(waiting.status(), StatusCode::SERVICE_UNAVAILABLE);
/// loaded.store(true, Ordering::Relaxed);
/// assert_eq!(service.oneshot(get("/readyz")).await.unwrap().status(), StatusCode::OK);
/// # });
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct HealthLayer {
    checks: Vec<(String, Check)>,
}

impl HealthLayer {
    /// Health endpoints with no readiness check yet (ready at once).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a readiness check: `/readyz` is `503` while `ready` returns false, naming it
    /// `name`. Checks are called on each `/readyz` request; keep them quick.
    pub fn readiness(
        mut self,
        name: impl Into<String>,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name.into(), Arc::new(ready)));
        self
    }
}

impl fmt::Debug for HealthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthLayer")
            .field(
                "readiness",
                &self.checks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<S> Layer<S> for HealthLayer {
    type Service = Health<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Health {
            inner,
            checks: Arc::new(self.checks.clone()),
        }
    }
}

/// The service [`HealthLayer`] makes.
#[derive(Clone)]
pub struct Health<S> {
    inner: S,
    checks: Arc<Vec<(String, Check)>>,
}

impl<S: fmt::Debug> fmt::Debug for Health<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Health<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let live = path == HEALTHZ_PATH;
        if !live && path != READYZ_PATH {
            return ResponseFuture::inner(self.inner.call(request));
        }
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response = answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"status": "method not allowed"}),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return ResponseFuture::answered(response);
        }
        if live {
            return ResponseFuture::answered(answer(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            ));
        }
        let waiting: Vec<&str> = self
            .checks
            .iter()
            .filter(|(_, ready)| !ready())
            .map(|(name, _)| name.as_str())
            .collect();
        let response = if waiting.is_empty() {
            answer(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        } else {
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "not ready", "waiting_for": waiting}),
            )
        };
        ResponseFuture::answered(response)
    }
}

fn answer(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tower::ServiceExt;

    fn service(
        checks: HealthLayer,
    ) -> Health<
        impl Service<
                Request<()>,
                Response = Response<http_body_util::Full<Bytes>>,
                Error = Infallible,
            > + Clone,
    > {
        checks.layer(tower::service_fn(|_r: Request<()>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                "inner",
            ))))
        }))
    }

    async fn body_of(
        service: Health<
            impl Service<
                    Request<()>,
                    Response = Response<http_body_util::Full<Bytes>>,
                    Error = Infallible,
                > + Clone,
        >,
        method: Method,
        path: &str,
    ) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readiness_names_what_fails_and_nothing_else() {
        let health = HealthLayer::new()
            .readiness("signing keys", || true)
            .readiness("trusted issuers' keys", || false);
        let (status, body) = body_of(service(health), Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"status": "not ready", "waiting_for": ["trusted issuers' keys"]})
        );
    }

    #[tokio::test]
    async fn other_paths_and_methods() {
        let health = HealthLayer::new().readiness("never", || false);
        let (status, body) = body_of(service(health.clone()), Method::GET, "/healthz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"status":"ok"}"#)
        );
        let (status, _) = body_of(service(health.clone()), Method::POST, "/healthz").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, body) = body_of(service(health.clone()), Method::GET, "/healthz/x").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "inner"));
        let (_, body) = body_of(service(health), Method::GET, "/Patient/healthz").await;
        assert_eq!(body, "inner");
    }
}
