//! `InProcessOrProxy`: one service for a directory that holds both kinds of tenant.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::ServiceExt as _;
use tower_service::Service;

use super::service::{FhirProxy, ResponseFuture as ProxyFuture};
use super::ProxyBody;
use crate::route::InProcessTenant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Each routed request to your in-process FHIR service when its tenant is served in-process
/// (the routing layer put an [`InProcessTenant`] in its extensions), else to the
/// [`FhirProxy`] (a tenant whose record names upstream servers: an
/// [`Upstream`](crate::route::Upstream) in its extensions). Made by
/// [`FhirProxy::or_in_process`]; put it under
/// [`GatewayLayer`](crate::gateway::GatewayLayer) (or the routing layer) so that one directory
/// can hold both kinds of tenant.
///
/// It is always ready: a request for an in-process tenant waits in its own future for the
/// service (a clone of it) to be ready, so a busy or failed in-process service holds up no
/// proxied tenant. The response body is the proxy's or the service's, as an [`Either`].
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceExt};
/// use tower_fhir::proxy::FhirProxy;
/// use tower_fhir::route::{InProcessTenant, Upstream};
/// use tower_fhir::version::FhirVersion;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let fhir = service_fn(|request: Request<Full<Bytes>>| async move {
///     let tenant = request.extensions().get::<InProcessTenant>().unwrap();
///     Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(format!("served {}", tenant.key()))))
/// });
/// let proxy = FhirProxy::builder("https://gateway.example").build().unwrap();
/// let service = proxy.or_in_process(fhir);
///
/// // What the routing layer puts in a request for an in-process tenant...
/// let mut request = Request::get("/Patient/1").body(Full::default()).unwrap();
/// request
///     .extensions_mut()
///     .insert(InProcessTenant::new("contoso", [FhirVersion::R4]).unwrap());
/// let answer = service.clone().oneshot(request).await.unwrap();
/// assert_eq!(answer.status(), StatusCode::OK);
/// let body = answer.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(&body[..], b"served contoso");
///
/// // ...and for a proxied one: to its upstream (nothing listens on port 1 here: 502).
/// let mut request = Request::get("/Patient/1").body(Full::default()).unwrap();
/// request
///     .extensions_mut()
///     .insert(Upstream::parse("http://127.0.0.1:1/fhir", FhirVersion::R4).unwrap());
/// let answer = service.oneshot(request).await.unwrap();
/// assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
/// # });
/// ```
#[derive(Clone)]
pub struct InProcessOrProxy<S> {
    proxy: FhirProxy,
    in_process: S,
}

impl FhirProxy {
    /// This proxy for proxied tenants and `in_process` for the tenants served in-process: see
    /// [`InProcessOrProxy`].
    pub fn or_in_process<S>(self, in_process: S) -> InProcessOrProxy<S> {
        InProcessOrProxy {
            proxy: self,
            in_process,
        }
    }
}

impl<S> InProcessOrProxy<S> {
    /// The in-process service.
    pub fn in_process(&self) -> &S {
        &self.in_process
    }

    /// The proxy.
    pub fn proxy(&self) -> &FhirProxy {
        &self.proxy
    }
}

impl<S, B, ResBody> Service<Request<B>> for InProcessOrProxy<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<ProxyBody, ResBody>>;
    type Error = S::Error;
    type Future = DispatchFuture<Oneshot<S, Request<B>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.extensions().get::<InProcessTenant>().is_some() {
            DispatchFuture {
                inner: Inner::InProcess {
                    future: self.in_process.clone().oneshot(request),
                },
            }
        } else {
            DispatchFuture {
                inner: Inner::Proxy {
                    future: self.proxy.call(request),
                },
            }
        }
    }
}

pin_project! {
    /// The response future of [`InProcessOrProxy`].
    pub struct DispatchFuture<F> {
        #[pin]
        inner: Inner<F>,
    }
}

pin_project! {
    #[project = InnerProjection]
    enum Inner<F> {
        Proxy { #[pin] future: ProxyFuture },
        InProcess { #[pin] future: F },
    }
}

impl<F, ResBody, E> Future for DispatchFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<Either<ProxyBody, ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            InnerProjection::Proxy { future } => future.poll(cx).map(|answer| match answer {
                Ok(response) => Ok(response.map(Either::Left)),
                Err(never) => match never {},
            }),
            InnerProjection::InProcess { future } => future
                .poll(cx)
                .map(|answer| answer.map(|response| response.map(Either::Right))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Upstream;
    use crate::version::FhirVersion;
    use http::StatusCode;
    use http_body_util::Full;
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// An in-process FHIR server answering every request with `in-process`.
    #[derive(Clone)]
    struct Local;

    impl Service<Request<Full<Bytes>>> for Local {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            std::future::ready(Ok(Response::new(Full::from("in-process"))))
        }
    }

    /// The proxy, with [`Local`] serving the in-process tenants.
    fn proxy_or_local() -> InProcessOrProxy<Local> {
        FhirProxy::builder("https://gw.example")
            .build()
            .unwrap()
            .or_in_process(Local)
    }

    /// A `GET /Patient/1` routed as the tenant layers would: to an in-process tenant.
    fn for_in_process() -> Request<Full<Bytes>> {
        let mut request = Request::get("/Patient/1").body(Full::default()).unwrap();
        request
            .extensions_mut()
            .insert(InProcessTenant::new("contoso", [FhirVersion::R4]).unwrap());
        request
    }

    /// A `GET /Patient/1` routed to the upstream at `base`.
    fn for_upstream(base: &str) -> Request<Full<Bytes>> {
        let mut request = Request::get("/Patient/1").body(Full::default()).unwrap();
        request
            .extensions_mut()
            .insert(Upstream::parse(base, FhirVersion::R4).unwrap());
        request
    }

    #[tokio::test]
    async fn each_request_goes_where_its_tenant_is_served() {
        let service = proxy_or_local();
        let answer = service.clone().oneshot(for_in_process()).await.unwrap();
        assert!(matches!(answer.body(), Either::Right(_)));
        let proxied = for_upstream("http://127.0.0.1:1/fhir");
        let answer = service.clone().oneshot(proxied).await.unwrap();
        assert!(matches!(answer.body(), Either::Left(_)));
        // Neither: the proxy's own answer (no upstream chosen), never the in-process service.
        let answer = service
            .oneshot(Request::new(Full::default()))
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
        assert!(matches!(answer.body(), Either::Left(_)));
    }

    /// A relayed response is marked [`Relayed`](crate::proxy::Relayed) (its body may hold the
    /// upstream's connection); the proxy's own answers and an in-process tenant's are not.
    #[tokio::test]
    async fn only_what_an_upstream_answered_is_marked_relayed() {
        use crate::proxy::Relayed;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0; 1];
                if stream.read(&mut byte).await.unwrap() == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let body = r#"{"resourceType":"Patient","id":"1"}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        let service = proxy_or_local();
        let answer = service.clone().oneshot(for_upstream(&base)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.extensions().get::<Relayed>(), Some(&Relayed));
        let answer = service.clone().oneshot(for_in_process()).await.unwrap();
        assert!(answer.extensions().get::<Relayed>().is_none());
        // The upstream gone: the proxy's own 502.
        let failed = for_upstream("http://127.0.0.1:1/fhir");
        let answer = service.oneshot(failed).await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
        assert!(answer.extensions().get::<Relayed>().is_none());
    }

    /// An in-process service that is never ready.
    #[derive(Clone)]
    struct Stuck;

    impl Service<Request<Full<Bytes>>> for Stuck {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Pending
        }

        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            unreachable!("called without being ready")
        }
    }

    #[tokio::test]
    async fn a_stuck_in_process_service_holds_up_no_proxied_tenant() {
        let mut service = FhirProxy::builder("https://gw.example")
            .build()
            .unwrap()
            .or_in_process(Stuck);
        let proxied = for_upstream("http://127.0.0.1:1/fhir");
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            service.ready().await.unwrap().call(proxied),
        )
        .await
        .expect("a proxied request waited on the in-process service")
        .unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
        // Its own tenant's request waits for it, in its own future.
        let waiting = service.ready().await.unwrap().call(for_in_process());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), waiting)
                .await
                .is_err()
        );
    }
}
