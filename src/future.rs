//! The response futures shared by the layers: the inner service's future, or a response (or
//! work) of the layer's own.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;

pin_project! {
    /// Either the inner service's response future, or a response the layer made itself.
    ///
    /// The response future of [`TenantScope`](crate::tenant::TenantScope) and other layers
    /// that decide without waiting.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        // Boxed: a rare path, and the future stays small to move through the layers.
        Answered { response: Option<Box<Response<Bytes>>> },
    }
}

impl<F> ResponseFuture<F> {
    /// Waits for the inner service's response.
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    /// Answers with this response.
    pub(crate) fn answered(response: Response<Bytes>) -> Self {
        Self {
            kind: Kind::Answered {
                response: Some(Box::new(response)),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Answered { response } => {
                let response = response.take().expect("polled after completion");
                Poll::Ready(Ok((*response).map(ResponseBody::full)))
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The layer's own work, boxed: it is the rare path.
type Own<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// Either the inner service's response future, passed through without allocation, or the
    /// layer's own work, boxed.
    ///
    /// The response future of [`Metadata`](crate::metadata::Metadata),
    /// [`CapabilityCache`](crate::metadata::CapabilityCache) and
    /// [`TenantRouting`](crate::route::TenantRouting) (see their `ResponseFuture` aliases).
    pub struct PassOrOwn<F, B, E> {
        #[pin]
        kind: PassOrOwnKind<F, B, E>,
    }
}

pin_project! {
    #[project = PassOrOwnProj]
    enum PassOrOwnKind<F, B, E> {
        Passed { #[pin] future: F, served: Option<crate::version::FhirVersion> },
        Own { future: Own<B, E> },
    }
}

impl<F, B, E> PassOrOwn<F, B, E> {
    /// Waits for the inner service's response.
    pub(crate) fn passed(future: F) -> Self {
        Self::passed_serving(future, None)
    }

    /// Waits for the inner service's response, which is in `served` unless it says otherwise
    /// (a [`FhirVersion`](crate::version::FhirVersion) in its extensions).
    pub(crate) fn passed_serving(future: F, served: Option<crate::version::FhirVersion>) -> Self {
        Self {
            kind: PassOrOwnKind::Passed { future, served },
        }
    }

    /// Waits for the layer's own work.
    pub(crate) fn own(
        future: impl Future<Output = Result<Response<ResponseBody<B>>, E>> + Send + 'static,
    ) -> Self {
        Self {
            kind: PassOrOwnKind::Own {
                future: Box::pin(future),
            },
        }
    }
}

impl<F, B, E> Future for PassOrOwn<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            PassOrOwnProj::Passed { future, served } => {
                let mut response = ready!(future.poll(cx))?;
                if let Some(served) = *served {
                    served_in(&mut response, served);
                }
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            PassOrOwnProj::Own { future } => future.as_mut().poll(cx),
        }
    }
}

/// Says that `response` is in `release`, unless it says otherwise already.
pub(crate) fn served_in<B>(response: &mut Response<B>, release: crate::version::FhirVersion) {
    let extensions = response.extensions_mut();
    if extensions.get::<crate::version::FhirVersion>().is_none() {
        extensions.insert(release);
    }
}

impl<F, B, E> std::fmt::Debug for PassOrOwn<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassOrOwn").finish_non_exhaustive()
    }
}
