//! A bound on how long a request body may keep the server waiting for its next bytes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::outcome::{IssueType, OperationOutcome};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default time a request body may pause between two reads, 30 s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The default least average rate of a request body, in bytes a second, once its first
/// timeout has passed (as Apache's `mod_reqtimeout` `MinRate`).
pub const DEFAULT_BODY_MIN_RATE: u32 = 500;

/// Fails a request body whose next bytes do not arrive in time, as nginx's
/// `client_body_timeout` does.
///
/// The timeout runs between two reads, not over the whole body: a slow upload that keeps
/// arriving is not cut, and one that stops (a client gone quiet mid-body) fails with a
/// [`BodyTimeoutError`] once nothing has come for the timeout. A client that sends a byte now
/// and then, just within each timeout, to hold the server's resources is caught by the least
/// average rate instead: from the body's first read, each byte earns `1 / min_rate` seconds
/// beyond the first timeout ([`DEFAULT_BODY_MIN_RATE`], 500 bytes a second, unless
/// [`min_rate`](Self::min_rate) says otherwise), and a body behind that schedule fails when it
/// next keeps its reader waiting. A 16 MiB upload may so take about nine hours.
///
/// On either failure the [`FhirProxy`](crate::proxy::FhirProxy) abandons the upstream request
/// mid-body (the upstream never receives a complete request; over HTTP/2 its stream is reset)
/// and answers `408 Request Timeout` with an OperationOutcome (`timeout`) and `Connection:
/// close` (which hyper's HTTP/2 server drops: there only the stream ends); so do the SMART
/// scope layer when it reads a body and the token endpoint. Each failure counts in the
/// `tower_fhir_body_timeouts_total` metric.
///
/// A body's length and end are passed through unchanged (a `Content-Length` stays one), and a
/// timer is armed (and allocated) only while the body has nothing ready: a request whose body
/// is already there costs no timer. A body that is never read (a `GET`'s, or one refused
/// before it is needed) costs a wrapper of a few words.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{channel::Channel, BodyExt};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_fhir::ops::{BodyTimeoutError, BodyTimeoutLayer, TimedBody};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// let service = BodyTimeoutLayer::new(Duration::from_secs(5)).layer(service_fn(
///     |request: Request<TimedBody<Channel<Bytes>>>| async move {
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
    min_rate: u32,
}

impl BodyTimeoutLayer {
    /// Bodies may pause at most `timeout` between two reads, and must average
    /// [`DEFAULT_BODY_MIN_RATE`] bytes a second after the first `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            min_rate: DEFAULT_BODY_MIN_RATE,
        }
    }

    /// The least average rate, in bytes a second; 0 turns the rate off (then only pauses
    /// longer than the timeout fail).
    pub fn min_rate(mut self, bytes_per_second: u32) -> Self {
        self.min_rate = bytes_per_second;
        self
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
            min_rate: self.min_rate,
        }
    }
}

/// The service [`BodyTimeoutLayer`] makes.
#[derive(Debug, Clone)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
    min_rate: u32,
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
        let (timeout, min_rate) = (self.timeout, self.min_rate);
        self.inner
            .call(request.map(|body| TimedBody::new(body, timeout).min_rate(min_rate)))
    }
}

pin_project! {
    /// A request body that fails with [`BodyTimeoutError`] when its next frame has not come
    /// within the timeout, or it has fallen behind its least average rate; made by
    /// [`BodyTimeoutLayer`].
    pub struct TimedBody<B> {
        #[pin]
        body: B,
        // Armed when a poll finds nothing ready, disarmed when a frame comes. Boxed: most
        // bodies never wait, and the request (this inline) moves through every layer.
        waiting: Option<Pin<Box<Sleep>>>,
        timeout: Duration,
        min_rate: u32,
        // The first read, and the data bytes read since.
        began: Option<Instant>,
        received: u64,
        // Whether the armed deadline is the rate's (else the pause's).
        by_rate: bool,
    }
}

impl<B> TimedBody<B> {
    /// `body`, failing once it has kept its reader waiting `timeout` for a frame, or is
    /// behind [`DEFAULT_BODY_MIN_RATE`].
    pub fn new(body: B, timeout: Duration) -> Self {
        Self {
            body,
            waiting: None,
            timeout,
            min_rate: DEFAULT_BODY_MIN_RATE,
            began: None,
            received: 0,
            by_rate: false,
        }
    }

    /// The least average rate, in bytes a second (0: none), as
    /// [`BodyTimeoutLayer::min_rate`].
    #[must_use]
    pub fn min_rate(mut self, bytes_per_second: u32) -> Self {
        self.min_rate = bytes_per_second;
        self
    }
}

impl<B: fmt::Debug> fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedBody")
            .field("body", &self.body)
            .field("timeout", &self.timeout)
            .field("min_rate", &self.min_rate)
            .field("received", &self.received)
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
        let this = self.project();
        let began = *this.began.get_or_insert_with(Instant::now);
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            *this.waiting = None;
            if let Some(Ok(frame)) = &frame {
                *this.received += frame.data_ref().map_or(0, |d| d.remaining() as u64);
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.waiting.is_none() {
            let quiet = Instant::now() + *this.timeout;
            // Each byte read so far earns 1 / min_rate s beyond the first timeout.
            let earned = (*this.min_rate > 0)
                .then(|| {
                    let seconds = *this.received as f64 / f64::from(*this.min_rate);
                    let earned = Duration::try_from_secs_f64(seconds).ok()?;
                    began.checked_add(*this.timeout)?.checked_add(earned)
                })
                .flatten();
            *this.by_rate = earned.is_some_and(|earned| earned < quiet);
            let deadline = earned.filter(|_| *this.by_rate).unwrap_or(quiet);
            *this.waiting = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
        if let Some(waiting) = this.waiting.as_mut() {
            ready!(waiting.as_mut().poll(cx));
        }
        *this.waiting = None;
        metrics::counter!("tower_fhir_body_timeouts_total").increment(1);
        Poll::Ready(Some(Err(Box::new(BodyTimeoutError {
            timeout: *this.timeout,
            min_rate: this.by_rate.then_some(*this.min_rate),
        }))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body's next bytes did not arrive within its [`BodyTimeoutLayer`]'s timeout, or
/// it fell behind the layer's least average rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeoutError {
    timeout: Duration,
    min_rate: Option<u32>,
}

impl BodyTimeoutError {
    /// The timeout (the longest pause allowed).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The least rate the body fell behind, in bytes a second; `None` when it paused longer
    /// than the timeout instead.
    pub fn min_rate(&self) -> Option<u32> {
        self.min_rate
    }
}

impl fmt::Display for BodyTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.min_rate {
            None => write!(f, "the request body sent nothing for {:?}", self.timeout),
            Some(rate) => write!(
                f,
                "the request body arrived slower than {rate} bytes a second on average"
            ),
        }
    }
}

impl std::error::Error for BodyTimeoutError {}

/// Whether `error` (or what caused it) is a [`BodyTimeoutError`].
pub(crate) fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    super::body_limit::caused_by::<BodyTimeoutError>(error)
}

/// `408` with an OperationOutcome (`timeout`) and `Connection: close`: the rest of the body
/// will not be read, so an HTTP/1.1 connection cannot serve another request (over HTTP/2 the
/// header is dropped and only the stream ends).
pub(super) fn body_too_slow() -> Response<bytes::Bytes> {
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
    async fn a_body_that_keeps_arriving_fast_enough_is_never_cut_however_long_it_takes() {
        let (mut sender, body) = streamed(Duration::from_secs(5));
        let feed = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                sender
                    .send_data(Bytes::from(vec![b'a'; 2_500]))
                    .await
                    .unwrap();
            }
        });
        let began = tokio::time::Instant::now();
        let read = body.collect().await.expect("never cut").to_bytes();
        assert_eq!(read.len(), 25_000);
        assert_eq!(began.elapsed(), Duration::from_secs(40));
        feed.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_fails_one_timeout_after_its_last_bytes() {
        let (mut sender, body) = streamed(Duration::from_secs(5));
        let mut body = std::pin::pin!(body.min_rate(0));
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
    async fn a_byte_now_and_then_within_each_timeout_falls_behind_the_least_rate() {
        let (mut sender, body) = streamed(Duration::from_secs(5));
        let feed = tokio::spawn(async move {
            while sender.send_data(Bytes::from("a")).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        });
        let began = tokio::time::Instant::now();
        let error = body.collect().await.expect_err("cut");
        let error = error.downcast_ref::<BodyTimeoutError>().unwrap();
        assert_eq!(error.min_rate(), Some(DEFAULT_BODY_MIN_RATE));
        // The first timeout, plus 1/500 s for each of the two bytes read by then.
        assert_eq!(began.elapsed(), Duration::from_millis(5_004));
        assert!(error.to_string().contains("500 bytes a second"), "{error}");
        feed.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_least_rate_passes_and_no_rate_means_only_pauses_count() {
        for (rate, pause) in [(500, 1_000), (0, 4_000)] {
            let (mut sender, body) = streamed(Duration::from_secs(5));
            let body = body.min_rate(rate);
            // 500 bytes a second, or a byte every 4 s with no rate asked for.
            let bytes = if rate > 0 { 500 } else { 1 };
            let feed = tokio::spawn(async move {
                for _ in 0..30 {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    sender
                        .send_data(Bytes::from(vec![b' '; bytes]))
                        .await
                        .unwrap();
                }
            });
            let read = body.collect().await.expect("not cut").to_bytes();
            assert_eq!(read.len(), 30 * bytes);
            feed.await.unwrap();
        }
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
