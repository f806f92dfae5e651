//! The response body of the tower-fhir layers: the inner service's body, or a rejection.
//!
//! A layer that answers a request itself (a 401, a 406, an `OperationOutcome`) must return the
//! same body type as the service it wraps. [`ResponseBody`] is that type: it streams the inner
//! body untouched, or yields the layer's own buffered bytes. It implements
//! [`http_body::Body`] with `Data = Bytes`, so it works with hyper, axum and tower-http.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower_fhir::body::ResponseBody;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let passed: ResponseBody<Full<Bytes>> = ResponseBody::inner(Full::from("from upstream"));
//! let own: ResponseBody<Full<Bytes>> = ResponseBody::full(Bytes::from_static(b"rejected"));
//! assert_eq!(passed.collect().await.unwrap().to_bytes(), "from upstream");
//! assert_eq!(own.collect().await.unwrap().to_bytes(), "rejected");
//! # });
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A response body: the inner service's, or bytes produced by a tower-fhir layer.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { bytes: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body, passed through as it is.
    pub fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A complete body of the given bytes.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }
}

impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::full(Bytes::new())
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The answer to a HEAD: `response` (the GET's) without its body, its `Content-Length` the
/// body's where the response names none and the body's length is known (so a HEAD tells
/// what the GET would send). The body (perhaps a stream from the upstream) is dropped unread.
pub(crate) fn headless<B: Body + Default>(response: http::Response<B>) -> http::Response<B> {
    let (mut parts, body) = response.into_parts();
    if !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        if let Some(length) = body.size_hint().exact() {
            parts.headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(length),
            );
        }
    }
    http::Response::from_parts(parts, B::default())
}

/// The headers that carry a digest of a body's bytes as they were sent (RFC 9530's
/// `Content-Digest` and `Repr-Digest`, RFC 3230's `Digest`, RFC 1864's `Content-MD5`), and a
/// strong `ETag` when `etag` (a weak one, `W/"..."`, names the content's version, not its
/// bytes): removed from a response whose body a layer rewrote, which they no longer describe.
pub(crate) fn remove_digests(headers: &mut http::HeaderMap, etag: bool) {
    for name in ["content-digest", "repr-digest", "digest", "content-md5"] {
        headers.remove(name);
    }
    if etag
        && headers
            .get(http::header::ETAG)
            .is_some_and(|tag| !tag.as_bytes().starts_with(b"W/"))
    {
        headers.remove(http::header::ETAG);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    #[tokio::test]
    async fn full_body_reports_exact_size_and_ends() {
        let body: ResponseBody<Empty<Bytes>> = ResponseBody::full(Bytes::from_static(b"abc"));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "abc");
    }

    #[test]
    fn empty_full_body_is_at_end() {
        let body: ResponseBody<Empty<Bytes>> = ResponseBody::default();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }

    #[test]
    fn inner_body_passes_size_hint_through() {
        let body = ResponseBody::inner(http_body_util::Full::new(Bytes::from_static(b"hello")));
        assert_eq!(body.size_hint().exact(), Some(5));
    }
}
