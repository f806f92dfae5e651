//! The proxy's bodies: the outgoing request's, and the response's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request sent upstream: the client's, streamed, boxed to one type whatever the
/// server's body type is.
pub(super) type OutgoingBody = UnsyncBoxBody<Bytes, BoxError>;

pin_project! {
    /// The body of a proxied response: the upstream's, streamed (after any chunks already
    /// read), or bytes the proxy made (a rewritten Bundle, an `OperationOutcome`).
    ///
    /// An upstream that sends nothing more of a streamed body for its timeout (it hung, or its
    /// host went away without a word) ends it with an error ([`UpstreamStalled`]), so the
    /// client's connection is closed rather than kept waiting, and the response is never taken
    /// for complete. Only the upstream's silence counts: a client that reads slowly makes the
    /// body wait to be polled, not the upstream.
    #[derive(Debug)]
    pub struct ProxyBody {
        #[pin]
        kind: Kind,
        // The upstream's concurrency slot, held until the body ends or is dropped.
        slot: Option<OwnedSemaphorePermit>,
        // The rewrite budget's bytes this body holds, until it ends or is dropped.
        bytes: Option<OwnedSemaphorePermit>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind {
        Upstream {
            read: VecDeque<Bytes>,
            #[pin]
            rest: Incoming,
            // How long the upstream may send nothing, and the timer of the current wait (made
            // only when the upstream has nothing ready).
            wait: Duration,
            stall: Option<Pin<Box<Sleep>>>,
            // The bytes the upstream's `Content-Length` says are still to come (after `read`).
            left: Option<u64>,
        },
        Full { bytes: Option<Bytes> },
    }
}

/// In a response's extensions: [`FhirProxy`](super::FhirProxy) relayed it from an upstream.
/// Its body may still be coming from the upstream's connection, and it holds the upstream's
/// concurrency slot and the Bundle rewrite budget's bytes until it ends: a client that takes
/// nothing of it holds them. Any other response (a layer's refusal, the proxy's own
/// `OperationOutcome` for an upstream that failed, a CapabilityStatement from a cache or read
/// whole by the metadata layer's cache, which takes the mark off, an in-process tenant's
/// answer) has none of them.
///
/// A server that bounds the requests in flight can tell the two apart: the gateway binary
/// counts an HTTP/2 request among its `http2_max_requests_in_flight` until its response is
/// delivered when the response is `Relayed`, and only until the response is ready otherwise,
/// so that a client that grants no flow-control window holds no place with requests anyone
/// may send without a token.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::ServiceExt;
/// use tower_fhir::proxy::{FhirProxy, Relayed};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let proxy = FhirProxy::builder("https://gateway.example").build().unwrap();
/// // No upstream chosen for the request: the proxy answers `502` itself, nothing relayed.
/// let answer = proxy.oneshot(http::Request::new(Full::<Bytes>::default())).await.unwrap();
/// assert_eq!(answer.status(), http::StatusCode::BAD_GATEWAY);
/// assert!(answer.extensions().get::<Relayed>().is_none());
/// # });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Relayed;

/// The largest frame a body made here is handed over in.
const FULL_FRAME: usize = 64 * 1024;

/// The error a [`ProxyBody`] ends with when the upstream sent nothing more of it for its
/// timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStalled {
    /// The upstream's timeout, that long without a byte.
    pub waited: Duration,
}

impl std::fmt::Display for UpstreamStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upstream sent nothing more of its response body for {:?}",
            self.waited
        )
    }
}

impl std::error::Error for UpstreamStalled {}

/// The error a [`ProxyBody`] ends with when the upstream's body ended before the length its
/// `Content-Length` declared (an HTTP/2 upstream that resets the stream with `NO_ERROR`
/// mid-body, say, which ends the body as if whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamCut {
    /// The bytes declared and never sent.
    pub missing: u64,
}

impl std::fmt::Display for UpstreamCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upstream's response body ended {} bytes short of its Content-Length",
            self.missing
        )
    }
}

impl std::error::Error for UpstreamCut {}

/// What the upstream's body gave when polled: its next frame, its end or its error, as
/// [`Body::poll_frame`] gives them.
pub(super) type UpstreamFrame = Option<Result<Frame<Bytes>, hyper::Error>>;

/// Polls `rest` for its next frame; while it has none, `stall` (made on the first wait) runs
/// out after `wait`: then `Err`.
pub(super) fn poll_upstream_frame(
    rest: Pin<&mut Incoming>,
    stall: &mut Option<Pin<Box<Sleep>>>,
    wait: Duration,
    cx: &mut Context<'_>,
) -> Poll<Result<UpstreamFrame, UpstreamStalled>> {
    if let Poll::Ready(frame) = rest.poll_frame(cx) {
        *stall = None;
        return Poll::Ready(Ok(frame));
    }
    let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => {
            *stall = None;
            Poll::Ready(Err(UpstreamStalled { waited: wait }))
        }
        Poll::Pending => Poll::Pending,
    }
}

impl ProxyBody {
    /// The upstream's body, after the chunks already `read`; `wait` is how long the upstream
    /// may send nothing before the body ends with [`UpstreamStalled`].
    pub(crate) fn upstream(read: VecDeque<Bytes>, rest: Incoming, wait: Duration) -> Self {
        Self {
            kind: Kind::Upstream {
                read,
                rest,
                wait,
                stall: None,
                left: None,
            },
            slot: None,
            bytes: None,
        }
    }

    /// The upstream declared `length` bytes in all (read ones included): a body that ends
    /// before them ends with [`UpstreamCut`].
    pub(crate) fn declared(mut self, length: Option<u64>) -> Self {
        if let Kind::Upstream { read, left, .. } = &mut self.kind {
            let read: u64 = read.iter().map(|chunk| chunk.len() as u64).sum();
            *left = length.map(|length| length.saturating_sub(read));
        }
        self
    }

    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
            slot: None,
            bytes: None,
        }
    }

    /// Holds bytes of the proxy's rewrite budget until the body ends (or is dropped).
    pub(crate) fn holding_bytes(mut self, bytes: Option<OwnedSemaphorePermit>) -> Self {
        self.bytes = bytes;
        self
    }

    /// Holds the upstream's concurrency slot until the body ends (or is dropped).
    pub(crate) fn holding(mut self, slot: Option<OwnedSemaphorePermit>) -> Self {
        self.slot = slot;
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Upstream {
                read,
                rest,
                wait,
                stall,
                left,
            } => match read.pop_front() {
                Some(chunk) => {
                    if read.is_empty() {
                        // What was read first is handed over: its budget bytes are free.
                        this.bytes.take();
                    }
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                None => match poll_upstream_frame(rest, stall, *wait, cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(None)) if left.is_some_and(|left| left > 0) => {
                        let cut = UpstreamCut {
                            missing: left.unwrap_or_default(),
                        };
                        tracing::warn!(%cut, "upstream response body cut short: the client's connection is broken off");
                        Poll::Ready(Some(Err(cut.into())))
                    }
                    Poll::Ready(Ok(Some(Err(error)))) => {
                        // A reset, a malformed chunk: what the client has is not the whole.
                        tracing::warn!(%error, "upstream response body broke off: the client's connection is broken off");
                        Poll::Ready(Some(Err(error.into())))
                    }
                    Poll::Ready(Ok(Some(Ok(frame)))) if frame.is_trailers() => {
                        // The upstream's trailers would reach the client past the header
                        // policy the head went through (a `Set-Cookie`, an origin-wide
                        // header): dropped, as the client's are on the way up. The body's end
                        // follows them; polled again to take it as any other end.
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Poll::Ready(Ok(frame)) => {
                        if let (Some(left), Some(Ok(frame))) = (left.as_mut(), &frame) {
                            let len = frame.data_ref().map_or(0, |data| data.len() as u64);
                            *left = left.saturating_sub(len);
                        }
                        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                    }
                    Poll::Ready(Err(stalled)) => {
                        tracing::warn!(%stalled, "upstream response body stalled: the client's connection is closed");
                        Poll::Ready(Some(Err(stalled.into())))
                    }
                },
            },
            // In frames of at most 64 KiB: the connection takes one when it can send it, so
            // a body its client does not read stays here, counted in the budget, rather than
            // in the connection's buffers.
            KindProj::Full { bytes } => Poll::Ready(
                bytes
                    .as_mut()
                    .map(|rest| {
                        let frame = if rest.len() > FULL_FRAME {
                            rest.split_to(FULL_FRAME)
                        } else {
                            std::mem::take(rest)
                        };
                        Ok(Frame::data(frame))
                    })
                    .inspect(|_| {
                        if bytes.as_ref().is_some_and(Bytes::is_empty) {
                            *bytes = None;
                        }
                    }),
            ),
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // The upstream is done with this request: its slot is free, and the bytes held.
            this.slot.take();
            this.bytes.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { read, rest, .. } => read.is_empty() && rest.is_end_stream(),
            Kind::Full { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { read, rest, .. } => {
                let buffered: u64 = read.iter().map(|b| b.len() as u64).sum();
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
            Kind::Full { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
