//! A limit on request bodies: `413` with an OperationOutcome, nothing buffered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::future::ResponseFuture;
use crate::outcome::{IssueType, OperationOutcome};

/// The default limit, 16 MiB.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// Refuses request bodies larger than a limit, without buffering them.
///
/// A request whose `Content-Length` exceeds the limit is answered `413 Content Too Large`
/// with an OperationOutcome (`too-long`) at once: the inner service never sees it, and its
/// body is not read. Any other body is passed on as a [`LimitedBody`] (an
/// [`http_body_util::Limited`]), which fails once more than the limit has been read, with
/// `Limited`'s error: the [`FhirProxy`](crate::proxy::FhirProxy) then abandons the upstream
/// request mid-body (the upstream never receives a complete request) and answers `413` with
/// the same OperationOutcome. Whatever else the inner service answers a body it found too
/// long with (an axum extractor's plain-text `413`, or `400` when it does not recognise a
/// wrapped error), an error status is replaced by that `413` OperationOutcome. Each refusal
/// counts in the `tower_fhir_body_too_large_total` metric.
///
/// A request to an OAuth 2.0 endpoint (a path under `/oauth/`: the token endpoint,
/// introspection, revocation, a client's secret rotation) is refused the same way in the form
/// its client reads: RFC 6749 §5.2's JSON error, `invalid_request`, with the same status and
/// description.
///
/// The limit is on the bytes sent, so a body sent compressed (a `Content-Encoding` other than
/// `identity`) would be held to it only as compressed: a few MiB of gzip can inflate to
/// gigabytes in a server that decompresses request bodies (HAPI does, by default). Such a
/// request is answered `415 Unsupported Media Type` with an OperationOutcome
/// (`not-supported`) and `Accept-Encoding: identity`, unless
/// [`allow_coded_bodies`](Self::allow_coded_bodies) says the servers behind bound what they
/// inflate.
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_fhir::ops::BodyLimitLayer;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let inner = service_fn(|_request: Request<_>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("stored"))))
/// });
/// let service = BodyLimitLayer::new(1024).layer(inner);
///
/// let small = Request::post("/Patient").body(Full::new(Bytes::from("{}"))).unwrap();
/// assert_eq!(service.clone().oneshot(small).await.unwrap().status(), StatusCode::OK);
///
/// let large = Request::post("/Patient")
///     .header("content-length", "2048")
///     .body(Full::new(Bytes::from(vec![b' '; 2048])))
///     .unwrap();
/// let refused = service.clone().oneshot(large).await.unwrap();
/// assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
///
/// let gzipped = Request::post("/Patient")
///     .header("content-encoding", "gzip")
///     .body(Full::new(Bytes::from_static(b"\x1f\x8b")))
///     .unwrap();
/// let refused = service.oneshot(gzipped).await.unwrap();
/// assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
/// assert_eq!(refused.headers()["accept-encoding"], "identity");
/// # });
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BodyLimitLayer {
    max: u64,
    coded: bool,
}

impl BodyLimitLayer {
    /// Bodies of at most `max_bytes` pass (uncompressed ones).
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max: max_bytes,
            coded: false,
        }
    }

    /// Passes bodies with a `Content-Encoding` (held to the limit as sent). Default off:
    /// turn it on only when every service behind bounds what it decompresses.
    pub fn allow_coded_bodies(mut self, allow: bool) -> Self {
        self.coded = allow;
        self
    }
}

impl Default for BodyLimitLayer {
    /// [`DEFAULT_MAX_REQUEST_BODY_BYTES`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_REQUEST_BODY_BYTES)
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
            coded: self.coded,
        }
    }
}

/// The service [`BodyLimitLayer`] makes.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
    coded: bool,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BodyLimit<S>
where
    S: Service<Request<LimitedBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = BodyLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // The OAuth endpoints' clients read RFC 6749 errors, not OperationOutcomes.
        let oauth = is_oauth(request.uri().path());
        if declared.is_some_and(|length| length > self.max) {
            count_token_refusal(request.uri().path());
            return BodyLimitFuture::answered(too_large_for(Some(self.max), oauth));
        }
        // (A request that has no body has nothing to inflate. An HTTP/2 GET may have one.)
        let no_body = || declared == Some(0) || request.body().is_end_stream();
        if !self.coded && is_coded(request.headers()) && !no_body() {
            count_token_refusal(request.uri().path());
            return BodyLimitFuture::answered(coded_refused(oauth));
        }
        // Watched only when there may be a body (not for the reads that are most requests).
        let hit = (!no_body()).then(Arc::default);
        // `Limited` counts in `usize`; a limit beyond it cannot be reached anyway.
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        let watch = hit.clone();
        let future = self.inner.call(request.map(|body| LimitedBody {
            inner: Limited::new(body, max),
            hit: watch,
        }));
        BodyLimitFuture {
            inner: ResponseFuture::inner(future),
            hit,
            max: self.max,
            oauth,
        }
    }
}

pin_project! {
    /// A request body as [`BodyLimit`] passes it on: at most its limit, then
    /// [`http_body_util::Limited`]'s error (a
    /// [`LengthLimitError`](http_body_util::LengthLimitError) in a `BoxError`), which the
    /// layer remembers.
    pub struct LimitedBody<B> {
        #[pin]
        inner: Limited<B>,
        hit: Option<Arc<AtomicBool>>,
    }
}

impl<B> std::fmt::Debug for LimitedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedBody").finish_non_exhaustive()
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let (Some(Err(error)), Some(hit)) = (&frame, this.hit.as_ref()) {
            if is_length_limit(&**error) {
                hit.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// The response future of [`BodyLimit`]: the inner service's answer, or `413` when it
    /// answered an error status to a body it found too long.
    pub struct BodyLimitFuture<F> {
        #[pin]
        inner: ResponseFuture<F>,
        hit: Option<Arc<AtomicBool>>,
        max: u64,
        oauth: bool,
    }
}

impl<F> BodyLimitFuture<F> {
    fn answered(response: Response<Bytes>) -> Self {
        Self {
            inner: ResponseFuture::answered(response),
            hit: None,
            max: 0,
            oauth: false,
        }
    }
}

impl<F> std::fmt::Debug for BodyLimitFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyLimitFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for BodyLimitFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let status = response.status();
        let refused = this
            .hit
            .as_ref()
            .is_some_and(|hit| hit.load(Ordering::Relaxed));
        // The proxy's own 413 (an OperationOutcome, counted already) is kept, as is the token
        // endpoint's (RFC 6749 JSON); a success stays what it was.
        let own_413 = status == StatusCode::PAYLOAD_TOO_LARGE
            && response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|t| {
                    let t = t.as_bytes();
                    t.starts_with(b"application/fhir+json")
                        || (*this.oauth && t.starts_with(b"application/json"))
                });
        if refused && !own_413 && (status.is_client_error() || status.is_server_error()) {
            let answer = too_large_for(Some(*this.max), *this.oauth);
            return Poll::Ready(Ok(answer.map(ResponseBody::full)));
        }
        Poll::Ready(Ok(response))
    }
}

/// Whether the body has a content coding other than `identity`.
fn is_coded(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| {
            value.as_bytes().split(|&b| b == b',').any(|coding| {
                let coding = coding.trim_ascii();
                !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
            })
        })
}

/// Counts a request to the token endpoint refused here, before the endpoint sees it, as the
/// endpoint counts its own refusals (`tower_fhir_token_requests_total`, `invalid_request`).
fn count_token_refusal(path: &str) {
    if path == "/oauth/token" {
        metrics::counter!("tower_fhir_token_requests_total", "result" => "invalid_request")
            .increment(1);
    }
}

/// Whether `path` is one of the OAuth 2.0 endpoints (`/oauth/token`, introspection,
/// revocation, a client's secret rotation), whose clients read RFC 6749 errors.
fn is_oauth(path: &str) -> bool {
    path.starts_with("/oauth/")
}

/// A refusal in the form its client reads: an OperationOutcome of `code` for FHIR, RFC 6749
/// §5.2's `invalid_request` for the OAuth endpoints (`oauth`), with `description` either way.
fn refusal(
    oauth: bool,
    status: StatusCode,
    code: IssueType,
    description: &str,
) -> Response<bytes::Bytes> {
    if !oauth {
        return OperationOutcome::error(code, description).to_response(status);
    }
    let body = serde_json::json!({
        "error": "invalid_request",
        "error_description": description,
    });
    let mut response = crate::outcome::oauth_json(status, &body);
    response
        .extensions_mut()
        .insert(crate::outcome::Refusal("invalid_request"));
    response
}

/// `415` for a compressed body, with `Accept-Encoding: identity` (RFC 9110 §15.5.16).
fn coded_refused(oauth: bool) -> Response<bytes::Bytes> {
    let mut response = refusal(
        oauth,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        IssueType::NotSupported,
        "This gateway does not accept compressed request bodies (Content-Encoding): send the \
         body uncompressed",
    );
    response.headers_mut().insert(
        header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    response
}

/// `413` with an OperationOutcome naming the limit when known; counted.
pub(crate) fn too_large(max: Option<u64>) -> Response<bytes::Bytes> {
    too_large_for(max, false)
}

/// `413` naming the limit when known, as an OperationOutcome or (`oauth`) an RFC 6749 error;
/// counted.
fn too_large_for(max: Option<u64>, oauth: bool) -> Response<bytes::Bytes> {
    metrics::counter!("tower_fhir_body_too_large_total").increment(1);
    let diagnostics = match max {
        Some(max) => format!("The request body is larger than this gateway accepts ({max} bytes)"),
        None => "The request body is larger than this gateway accepts".to_owned(),
    };
    refusal(
        oauth,
        StatusCode::PAYLOAD_TOO_LARGE,
        IssueType::TooLong,
        &diagnostics,
    )
}

/// Whether `error` (or what caused it) is a [`Limited`] body's "too long".
pub(crate) fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<http_body_util::LengthLimitError>(error)
}

/// Whether `error`, or an error in its `source()` chain, is an `E`.
pub(crate) fn caused_by<E: std::error::Error + 'static>(
    error: &(dyn std::error::Error + 'static),
) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<E>() {
            return true;
        }
        // An `io::Error` wrapping one hides it from `source()`.
        if let Some(wrapped) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if caused_by::<E>(wrapped) {
                return true;
            }
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_coded_body_is_refused_unless_allowed() {
        let service = |allow| {
            BodyLimitLayer::new(1024)
                .allow_coded_bodies(allow)
                .layer(tower::service_fn(
                    |_r: Request<LimitedBody<http_body_util::Full<Bytes>>>| async {
                        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
                    },
                ))
        };
        let request = |codings: &[&str]| {
            let mut request = Request::post("/Patient");
            for coding in codings {
                request = request.header("content-encoding", *coding);
            }
            request
                .body(http_body_util::Full::new(Bytes::from("x")))
                .unwrap()
        };
        for codings in [&[][..], &["identity"], &["IDENTITY"], &[" identity , "]] {
            let response = service(false).oneshot(request(codings)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{codings:?}");
        }
        // No body: nothing to inflate.
        let empty = Request::delete("/Patient/1")
            .header("content-encoding", "gzip")
            .header("content-length", "0")
            .body(http_body_util::Full::default())
            .unwrap();
        let get = Request::get("/Patient/1")
            .header("content-encoding", "gzip")
            .body(http_body_util::Full::default())
            .unwrap();
        for request in [empty, get] {
            let response = service(false).oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        for codings in [
            &["gzip"][..],
            &["identity, br"],
            &["identity", "deflate"],
            &["x"],
        ] {
            let response = service(false).oneshot(request(codings)).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{codings:?}"
            );
            assert_eq!(response.headers()[header::ACCEPT_ENCODING], "identity");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["issue"][0]["code"], "not-supported");
            let allowed = service(true).oneshot(request(codings)).await.unwrap();
            assert_eq!(allowed.status(), StatusCode::OK, "{codings:?}");
        }
    }

    #[tokio::test]
    async fn the_oauth_endpoints_are_refused_with_rfc_6749_errors() {
        let inner = tower::service_fn(|_r: Request<LimitedBody<http_body_util::Full<Bytes>>>| {
            async {
                // An endpoint whose body read failed at the limit answers some error of its
                // own: replaced by the 413 in its client's form.
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::BAD_REQUEST)
                        .body(http_body_util::Empty::<Bytes>::new())
                        .unwrap(),
                )
            }
        });
        let service = BodyLimitLayer::new(4).layer(inner);
        let declared = |path: &str| {
            Request::post(path)
                .header("content-length", "5")
                .body(http_body_util::Full::new(Bytes::from("12345")))
                .unwrap()
        };
        let coded = |path: &str| {
            Request::post(path)
                .header("content-encoding", "gzip")
                .body(http_body_util::Full::new(Bytes::from("x")))
                .unwrap()
        };
        let streamed = |path: &str| {
            let chunks = futures::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
                Bytes::from("12345"),
            ))]);
            Request::post(path).body(StreamBody::new(chunks)).unwrap()
        };
        for path in [
            "/oauth/token",
            "/oauth/introspect",
            "/oauth/revoke",
            "/oauth/clients/app/secret",
        ] {
            for (request, status) in [
                (declared(path), StatusCode::PAYLOAD_TOO_LARGE),
                (coded(path), StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ] {
                let response = service.clone().oneshot(request).await.unwrap();
                assert_oauth_error(response, status, path).await;
            }
            let streaming = BodyLimitLayer::new(4).layer(tower::service_fn(
                |request: Request<LimitedBody<StreamBody<_>>>| async move {
                    let read = request.into_body().collect().await;
                    assert!(read.is_err());
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::BAD_REQUEST)
                            .body(http_body_util::Empty::<Bytes>::new())
                            .unwrap(),
                    )
                },
            ));
            let response = streaming.oneshot(streamed(path)).await.unwrap();
            assert_oauth_error(response, StatusCode::PAYLOAD_TOO_LARGE, path).await;
        }
        // FHIR paths, `/oauth` itself and look-alikes keep the OperationOutcome.
        for path in ["/Patient", "/oauth", "/oauthx/token", "/Binary/oauth/"] {
            let response = service.clone().oneshot(declared(path)).await.unwrap();
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/fhir+json",
                "{path}"
            );
        }
    }

    async fn assert_oauth_error<B>(response: Response<B>, status: StatusCode, path: &str)
    where
        B: Body,
        B::Error: std::fmt::Debug,
    {
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json;charset=UTF-8",
            "{path}"
        );
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            response.extensions().get::<crate::outcome::Refusal>(),
            Some(&crate::outcome::Refusal("invalid_request"))
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"], "invalid_request", "{path}");
        assert!(error["error_description"].as_str().is_some(), "{path}");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_never_reaches_the_inner_service() {
        let called = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&called);
        let service = BodyLimitLayer::new(10).layer(tower::service_fn(
            move |_r: Request<LimitedBody<http_body_util::Empty<Bytes>>>| {
                seen.store(true, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new())) }
            },
        ));
        let request = Request::post("/Bundle")
            .header("content-length", "11")
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!called.load(Ordering::SeqCst));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["issue"][0]["code"], "too-long");
    }

    #[tokio::test]
    async fn a_streamed_body_fails_past_the_limit_and_the_error_is_recognised() {
        let service = BodyLimitLayer::new(10).layer(tower::service_fn(
            |r: Request<LimitedBody<StreamBody<_>>>| async move {
                let error = r
                    .into_body()
                    .collect()
                    .await
                    .map(|_| ())
                    .expect_err("over the limit");
                let answer = if is_length_limit(&*error) {
                    "limit"
                } else {
                    "other"
                };
                Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                    answer,
                ))))
            },
        ));
        let chunks = futures::stream::iter(
            (0..3).map(|_| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from("12345")))),
        );
        let request = Request::post("/Bundle")
            .body(StreamBody::new(chunks))
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let recognised = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(recognised, "limit");
    }

    #[tokio::test]
    async fn an_error_answered_to_a_body_over_the_limit_becomes_413_and_other_answers_stay() {
        // An inner service that reads the body and answers `status` whatever happened (as an
        // axum extractor that does not recognise a wrapped error answers 400).
        let answering = |status: StatusCode, content_type: &'static str| {
            BodyLimitLayer::new(10).layer(tower::service_fn(
                move |r: Request<LimitedBody<StreamBody<_>>>| async move {
                    let _ = r.into_body().collect().await;
                    let mut response = Response::new(http_body_util::Full::new(Bytes::from("x")));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, Infallible>(response)
                },
            ))
        };
        let service = |status| answering(status, "text/plain");
        let body = |chunks: usize| {
            StreamBody::new(futures::stream::iter((0..chunks).map(|_| {
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from("12345")))
            })))
        };
        let post = |chunks| Request::post("/Patient").body(body(chunks)).unwrap();
        for status in [StatusCode::BAD_REQUEST, StatusCode::INTERNAL_SERVER_ERROR] {
            let response = service(status).oneshot(post(3)).await.unwrap();
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{status}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["issue"][0]["code"], "too-long");
            // Within the limit, the inner answer stands.
            let response = service(status).oneshot(post(2)).await.unwrap();
            assert_eq!(response.status(), status);
        }
        // A success stays a success, and a 413 OperationOutcome (the proxy's) is kept; a plain
        // 413 (axum's text) is replaced.
        for (status, content_type, kept) in [
            (StatusCode::OK, "text/plain", true),
            (StatusCode::PAYLOAD_TOO_LARGE, "application/fhir+json", true),
            (StatusCode::PAYLOAD_TOO_LARGE, "text/plain", false),
        ] {
            let response = answering(status, content_type)
                .oneshot(post(3))
                .await
                .unwrap();
            assert_eq!(response.status(), status);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body == "x", kept, "{status} {content_type}");
        }
    }

    #[tokio::test]
    async fn an_unrelated_error_is_not_a_length_limit() {
        let error = std::io::Error::other("reset");
        assert!(!is_length_limit(&error));
        let over = Limited::new(http_body_util::Full::new(Bytes::from("12345")), 2);
        let error = over.collect().await.err().unwrap();
        assert!(is_length_limit(&*error));
        let wrapped = std::io::Error::other(error);
        assert!(is_length_limit(&wrapped), "found through source()");
    }
}
