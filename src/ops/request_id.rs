//! Request ids: kept when the client's is sound, made otherwise, returned on every response.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::HeaderName;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_http::request_id::{MakeRequestId, RequestId, SetRequestId};
use tower_layer::Layer;
use tower_service::Service;

/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `X-Upstream-Request-Id`: an upstream's own `X-Request-Id`, when it answered with another
/// id than the request's.
pub const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// The longest client request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Gives every request an `X-Request-Id` and returns it on the response.
///
/// A client's `X-Request-Id` is kept when it is one header of 1 to 128 characters of
/// `[A-Za-z0-9._-]`; otherwise (absent, repeated, too long, other characters) a UUID is made
/// in its place. The id stays in the request's headers, so the proxy forwards it to the
/// upstream, and is in its extensions as tower-http's
/// [`RequestId`](tower_http::request_id::RequestId) for traces and audit records. Every
/// response, the layers' own refusals included, carries it back, in place of any
/// `X-Request-Id` the response had: an upstream that answers with an id of its own (many
/// make one) has it returned as [`X-Upstream-Request-Id`](X_UPSTREAM_REQUEST_ID). Built on
/// tower-http's `SetRequestId`; the check of the client's value, the id made, and the
/// response's header are this layer's.
///
/// ```
/// use http::{Request, Response};
/// use tower::{service_fn, ServiceExt, Layer};
/// use tower_fhir::ops::RequestIdLayer;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let echo = service_fn(|request: Request<()>| async move {
///     let seen = request.headers()["x-request-id"].clone();
///     Ok::<_, std::convert::Infallible>(Response::new(seen))
/// });
/// let service = RequestIdLayer::new().layer(echo);
///
/// let kept = Request::get("/Patient/1").header("x-request-id", "abc-123").body(()).unwrap();
/// let response = service.clone().oneshot(kept).await.unwrap();
/// assert_eq!(response.headers()["x-request-id"], "abc-123");
/// assert_eq!(response.body(), "abc-123");
///
/// let replaced = Request::get("/").header("x-request-id", "no spaces, please").body(()).unwrap();
/// let response = service.clone().oneshot(replaced).await.unwrap();
/// assert_ne!(response.headers()["x-request-id"], "no spaces, please");
/// assert_eq!(response.headers()["x-request-id"].len(), 36);
///
/// // An upstream's own id is returned beside the request's.
/// let upstream = RequestIdLayer::new().layer(service_fn(|_request: Request<()>| async {
///     let response = Response::builder().header("x-request-id", "hapi-7f3a").body(()).unwrap();
///     Ok::<_, std::convert::Infallible>(response)
/// }));
/// let request = Request::get("/Patient/1").header("x-request-id", "abc-123").body(()).unwrap();
/// let response = upstream.oneshot(request).await.unwrap();
/// assert_eq!(response.headers()["x-request-id"], "abc-123");
/// assert_eq!(response.headers()["x-upstream-request-id"], "hapi-7f3a");
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[must_use]
pub struct RequestIdLayer {
    _private: (),
}

impl RequestIdLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService {
            inner: SetRequestId::new(inner, X_REQUEST_ID, MakeUuid),
        }
    }
}

/// The service [`RequestIdLayer`] makes.
#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: SetRequestId<S, MakeUuid>,
}

pin_project! {
    /// The response future of [`RequestIdService`].
    pub struct RequestIdFuture<F> {
        #[pin]
        future: F,
        id: Option<HeaderValue>,
    }
}

impl<F> RequestIdFuture<F> {
    /// The request's id (the client's, or the one made), until the response has taken it:
    /// what an answer made in the response's place should carry (a server that catches a
    /// panic of the layers inside and answers `500`, as the gateway binary does).
    ///
    /// ```
    /// use http::{Request, Response};
    /// use tower::{service_fn, Layer, Service};
    /// use tower_fhir::ops::RequestIdLayer;
    ///
    /// let mut service = RequestIdLayer::new().layer(service_fn(|_request: Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(()))
    /// }));
    /// let request = Request::get("/Patient/1").header("x-request-id", "abc-123").body(()).unwrap();
    /// let future = service.call(request);
    /// assert_eq!(future.request_id().unwrap(), "abc-123");
    /// ```
    pub fn request_id(&self) -> Option<&HeaderValue> {
        self.id.as_ref()
    }
}

impl<F, B, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.future.poll(cx))?;
        if let Some(id) = this.id.take() {
            let headers = response.headers_mut();
            // Theirs, when another, is kept beside (any others of it are dropped).
            if let Some(theirs) = headers.insert(&X_REQUEST_ID, id.clone()) {
                if theirs != id {
                    headers.insert(&X_UPSTREAM_REQUEST_ID, theirs);
                }
            }
        }
        Poll::Ready(Ok(response))
    }
}

impl<F> std::fmt::Debug for RequestIdFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestIdFuture").finish_non_exhaustive()
    }
}

/// Makes a random (v4) UUID, written straight into the header value: tower-http's
/// `MakeRequestUuid` formats it through `Display` and parses it back, several times the cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeUuid;

impl MakeUuid {
    /// A new id, for an answer made where no request (or no request's id) is at hand: a
    /// refusal before any layer, say.
    ///
    /// ```
    /// let id = tower_fhir::ops::MakeUuid.new_id();
    /// assert_eq!(id.len(), 36);
    /// assert_ne!(id, tower_fhir::ops::MakeUuid.new_id());
    /// ```
    pub fn new_id(self) -> HeaderValue {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        // Lower-case hex digits and hyphens: always a valid header value.
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

impl MakeRequestId for MakeUuid {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(self.new_id()))
    }
}

impl<S> std::fmt::Debug for RequestIdService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestIdService").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestIdService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let headers = request.headers_mut();
        let mut given = headers.get_all(&X_REQUEST_ID).iter();
        let sound = match (given.next(), given.next()) {
            (None, _) => true,
            (Some(value), None) => is_sound(value),
            (Some(_), Some(_)) => false,
        };
        if !sound {
            headers.remove(&X_REQUEST_ID);
        }
        // Made here when missing, so the response can carry it back (`SetRequestId` then
        // finds it and puts the `RequestId` extension in).
        let id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) => Some(id.clone()),
            None => MakeUuid.make_request_id(&request).map(|id| {
                let id = id.into_header_value();
                request.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }),
        };
        RequestIdFuture {
            future: self.inner.call(request),
            id,
        }
    }
}

/// 1-128 characters of `[A-Za-z0-9._-]`.
pub(crate) fn is_sound(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=MAX_REQUEST_ID_LEN).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    async fn seen(request: Request<()>) -> (String, String) {
        let service = RequestIdLayer::new().layer(tower::service_fn(|r: Request<()>| async move {
            let id = r
                .extensions()
                .get::<tower_http::request_id::RequestId>()
                .map(|id| id.header_value().to_str().unwrap().to_owned())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(id))
        }));
        let response = service.oneshot(request).await.unwrap();
        let returned = response.headers()[&X_REQUEST_ID]
            .to_str()
            .unwrap()
            .to_owned();
        (returned, response.into_body())
    }

    #[tokio::test]
    async fn sound_ids_are_kept_others_replaced() {
        for good in ["a", "A-b_c.9", &"x".repeat(128)] {
            let request = Request::get("/")
                .header("x-request-id", good)
                .body(())
                .unwrap();
            let (returned, inner) = seen(request).await;
            assert_eq!(returned, good);
            assert_eq!(inner, good);
        }
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(129), "a\"b", "a,b"] {
            let Ok(value) = HeaderValue::from_bytes(bad.as_bytes()) else {
                continue;
            };
            let request = Request::get("/")
                .header("x-request-id", value)
                .body(())
                .unwrap();
            let (returned, inner) = seen(request).await;
            assert_ne!(returned, bad);
            assert_eq!(returned, inner, "the inner service sees the id returned");
            assert!(uuid::Uuid::parse_str(&returned).is_ok(), "{returned}");
        }
    }

    #[tokio::test]
    async fn two_ids_are_replaced_by_one() {
        let request = Request::get("/")
            .header("x-request-id", "one")
            .header("x-request-id", "two")
            .body(())
            .unwrap();
        let (returned, _) = seen(request).await;
        assert!(uuid::Uuid::parse_str(&returned).is_ok(), "{returned}");
    }

    #[tokio::test]
    async fn the_requests_id_replaces_the_upstreams_which_is_kept_beside() {
        let answer = |ids: &'static [&'static str]| {
            RequestIdLayer::new().layer(tower::service_fn(move |_r: Request<()>| async move {
                let mut response = Response::builder();
                for id in ids {
                    response = response.header("x-request-id", *id);
                }
                Ok::<_, Infallible>(response.body(()).unwrap())
            }))
        };
        let request = || {
            Request::get("/Patient/1")
                .header("x-request-id", "client-1")
                .body(())
                .unwrap()
        };
        let ids = |response: &Response<()>, name: HeaderName| -> Vec<String> {
            let values = response.headers().get_all(name).iter();
            values.map(|v| v.to_str().unwrap().to_owned()).collect()
        };
        let response = answer(&["upstream id, with spaces", "second"])
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(ids(&response, X_REQUEST_ID), ["client-1"]);
        assert_eq!(
            ids(&response, X_UPSTREAM_REQUEST_ID),
            ["upstream id, with spaces"]
        );
        // The same id, or none: nothing beside.
        for given in [&["client-1"][..], &[]] {
            let response = answer(given).oneshot(request()).await.unwrap();
            assert_eq!(ids(&response, X_REQUEST_ID), ["client-1"]);
            assert!(ids(&response, X_UPSTREAM_REQUEST_ID).is_empty());
        }
    }

    #[tokio::test]
    async fn a_missing_id_is_made() {
        let (a, _) = seen(Request::get("/").body(()).unwrap()).await;
        let (b, _) = seen(Request::get("/").body(()).unwrap()).await;
        assert_ne!(a, b);
    }
}
