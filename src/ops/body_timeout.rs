//! A bound on how long a request body may keep the server waiting for its next bytes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

use crate::outcome::{IssueType, OperationOutcome};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default time a request body may pause between two reads, 30 s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails a request body whose next bytes do not arrive in time, as nginx's
/// `client_body_timeout` does.
///
/// The timeout runs between two reads, not over the whole body: a slow upload that keeps
/// arriving is never cut, and one that stops (a client gone quiet mid-body, or one sending a
/// byte now and then to hold the server's resources) fails with a [`BodyTimeoutError`] once
/// nothing has come for the timeout. The [`FhirProxy`](crate::proxy::FhirProxy) then abandons
/// the upstream request mid-body (the upstream never receives a complete request) and answers
/// `408 Request Timeout` with an OperationOutcome (`timeout`) and `Connection: close`; so does
/// the SMART scope layer when it reads a body. Each failure counts in the
/// `tower_fhir_body_timeouts_total` metric.
///
/// A body's length and end are passed through unchanged (a `Content-Length` stays one), and a
/// timer is armed only while the body has nothing ready: a request without a body, or whose
/// body is already read, costs no timer.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{channel::Channel, BodyExt};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_fhir::ops::{BodyTimeoutError, BodyTimeoutLayer};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// let service = BodyTimeoutLayer::new(Duration::from_secs(5)).layer(service_fn(
///     |request: Request<_>| async move {
///         let read = request.into_body().collect().await;
///         let timed_out = read.is_err_and(|e| e.is::<BodyTimeoutError>());
///         Ok::<_, std::convert::Infallible>(Response::new(timed_out))
///     },
/// ));
///
/// // Two bytes, then nothing more: the body fails once five seconds have passed.
/// let (mut sender, stalled) = Channel::<Bytes>::new(1);
/// sender.send_data(Bytes::from("{\"")).await.unwrap();
/// let request = Request::post("/Patient").body(stalled).unwrap();
/// assert!(*service.oneshot(request).await.unwrap().body());
/// drop(sender);
/// # });
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BodyTimeoutLayer {
    timeout: Duration,
}

impl BodyTimeoutLayer {
    /// Bodies may pause at most `timeout` between two reads.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl Default for BodyTimeoutLayer {
    /// [`DEFAULT_BODY_READ_TIMEOUT`].
    fn default() -> Self {
        Self::new(DEFAULT_BODY_READ_TIMEOUT)
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`BodyTimeoutLayer`] makes.
#[derive(Debug, Clone)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody> Service<Request<ReqBody>> for BodyTimeout<S>
where
    S: Service<Request<TimedBody<ReqBody>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let timeout = self.timeout;
        self.inner
            .call(request.map(|body| TimedBody::new(body, timeout)))
    }
}

pin_project! {
    /// A request body that fails with [`BodyTimeoutError`] when its next frame has not come
    /// within the timeout; made by [`BodyTimeoutLayer`].
    pub struct TimedBody<B> {
        #[pin]
        body: B,
        // Armed when a poll finds nothing ready, disarmed when a frame comes.
        #[pin]
        waiting: Option<Sleep>,
        timeout: Duration,
    }
}

impl<B> TimedBody<B> {
    /// `body`, failing once it has kept its reader waiting `timeout` for a frame.
    pub fn new(body: B, timeout: Duration) -> Self {
        Self {
            body,
            waiting: None,
            timeout,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedBody")
            .field("body", &self.body)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            this.waiting.set(None);
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.waiting.is_none() {
            this.waiting.set(Some(tokio::time::sleep(*this.timeout)));
        }
        if let Some(waiting) = this.waiting.as_mut().as_pin_mut() {
            ready!(waiting.poll(cx));
        }
        this.waiting.set(None);
        metrics::counter!("tower_fhir_body_timeouts_total").increment(1);
        Poll::Ready(Some(Err(Box::new(BodyTimeoutError {
            timeout: *this.timeout,
        }))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body's next bytes did not arrive within its [`BodyTimeoutLayer`]'s timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeoutError {
    timeout: Duration,
}

impl BodyTimeoutError {
    /// The timeout that passed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for BodyTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body sent nothing for {:?}", self.timeout)
    }
}

impl std::error::Error for BodyTimeoutError {}

/// Whether `error` (or what caused it) is a [`BodyTimeoutError`].
pub(crate) fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    super::body_limit::caused_by::<BodyTimeoutError>(error)
}

/// `408` with an OperationOutcome (`timeout`) and `Connection: close`: the rest of the body
/// will not be read, so the connection cannot serve another request.
pub(crate) fn body_too_slow() -> Response<bytes::Bytes> {
    let mut response = OperationOutcome::error(
        IssueType::Timeout,
        "The request body stopped arriving before it was complete",
    )
    .to_response(StatusCode::REQUEST_TIMEOUT);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::channel::{Channel, Sender};
    use http_body_util::{BodyExt, Full};

    fn streamed(timeout: Duration) -> (Sender<Bytes>, TimedBody<Channel<Bytes>>) {
        let (sender, body) = Channel::new(4);
        (sender, TimedBody::new(body, timeout))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_arriving_is_never_cut_however_long_it_takes() {
        let (mut sender, body) = streamed(Duration::from_secs(5));
        let feed = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                sender.send_data(Bytes::from("ab")).await.unwrap();
            }
        });
        let began = tokio::time::Instant::now();
        let read = body.collect().await.expect("never cut").to_bytes();
        assert_eq!(read.len(), 20);
        assert_eq!(began.elapsed(), Duration::from_secs(40));
        feed.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_fails_one_timeout_after_its_last_bytes() {
        let (mut sender, body) = streamed(Duration::from_secs(5));
        let mut body = std::pin::pin!(body);
        sender.send_data(Bytes::from("ab")).await.unwrap();
        let began = tokio::time::Instant::now();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let error = body.frame().await.unwrap().expect_err("timed out");
        assert_eq!(
            began.elapsed(),
            Duration::from_secs(8),
            "from the next read"
        );
        assert!(is_body_timeout(&*error));
        assert_eq!(
            error.downcast_ref::<BodyTimeoutError>().unwrap().timeout(),
            Duration::from_secs(5)
        );
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn length_and_end_pass_through_and_a_ready_body_arms_no_timer() {
        let body = TimedBody::new(Full::new(Bytes::from("{}")), Duration::from_secs(1));
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        let mut body = Box::pin(body);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(body.waiting.is_none());
        assert!(body.is_end_stream());
        let empty = TimedBody::new(
            http_body_util::Empty::<Bytes>::new(),
            Duration::from_secs(1),
        );
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }

    #[test]
    fn the_answer_is_408_with_a_close_and_an_outcome() {
        let response = body_too_slow();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["issue"][0]["code"], "timeout");
        assert_eq!(
            response.extensions().get::<crate::outcome::Refusal>(),
            Some(&crate::outcome::Refusal("timeout"))
        );
    }
}
