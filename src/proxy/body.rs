//! The proxy's bodies: the outgoing request's, and the response's.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request sent upstream: the client's, streamed, boxed to one type whatever the
/// server's body type is.
pub(super) type OutgoingBody = UnsyncBoxBody<Bytes, BoxError>;

pin_project! {
    /// The body of a proxied response: the upstream's, streamed (after any chunks already
    /// read), or bytes the proxy made (a rewritten Bundle, an `OperationOutcome`).
    #[derive(Debug)]
    pub struct ProxyBody {
        #[pin]
        kind: Kind,
        // The upstream's concurrency slot, held until the body ends or is dropped.
        slot: Option<OwnedSemaphorePermit>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind {
        Upstream { read: VecDeque<Bytes>, #[pin] rest: Incoming },
        Full { bytes: Option<Bytes> },
    }
}

impl ProxyBody {
    pub(crate) fn upstream(read: VecDeque<Bytes>, rest: Incoming) -> Self {
        Self {
            kind: Kind::Upstream { read, rest },
            slot: None,
        }
    }

    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
            slot: None,
        }
    }

    /// Holds the upstream's concurrency slot until the body ends (or is dropped).
    pub(crate) fn holding(mut self, slot: Option<OwnedSemaphorePermit>) -> Self {
        self.slot = slot;
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Upstream { read, rest } => match read.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => rest.poll_frame(cx),
            },
            KindProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // The upstream is done with this request: its slot is free.
            this.slot.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { read, rest } => read.is_empty() && rest.is_end_stream(),
            Kind::Full { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { read, rest } => {
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
