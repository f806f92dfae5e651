//! The response future of `BearerAuth`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::claims::VerifiedClaims;
use super::config::Config;
use super::rejection::Rejection;
use crate::body::ResponseBody;

pin_project! {
    /// Response future of [`BearerAuth`](super::BearerAuth).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        // The rare paths are boxed: this future is moved through every outer layer, and a
        // request held inline would make it several hundred bytes.
        Verifying { waiting: Option<Box<Waiting<S, ReqBody>>> },
        Calling { #[pin] future: S::Future },
        Rejected { response: Option<Box<Response<bytes::Bytes>>> },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn call(future: S::Future) -> Self {
        Self {
            state: State::Calling { future },
        }
    }

    pub(crate) fn reject(config: &Config, rejection: &Rejection) -> Self {
        tracing::debug!(kind = ?rejection.kind(), reason = rejection.description(), "bearer token rejected");
        let response = match &config.on_reject {
            Some(respond) => respond(rejection),
            None => rejection.to_response(),
        };
        Self {
            state: State::Rejected {
                response: Some(Box::new(response)),
            },
        }
    }

    pub(crate) fn wait(
        verifying: BoxFuture<'static, Result<VerifiedClaims, Rejection>>,
        inner: S,
        request: Request<ReqBody>,
        config: Arc<Config>,
    ) -> Self {
        Self {
            state: State::Verifying {
                waiting: Some(Box::new(Waiting {
                    verifying,
                    inner,
                    request,
                    config,
                })),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Calling { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok((*response).map(ResponseBody::full)));
                }
                StateProj::Verifying { waiting } => {
                    let pending = waiting.as_mut().expect("polled after completion");
                    let verified = ready!(pending.verifying.as_mut().poll(cx));
                    let Waiting {
                        mut inner,
                        mut request,
                        config,
                        ..
                    } = *waiting.take().expect("polled after completion");
                    let next = match verified {
                        Ok(claims) => {
                            request.extensions_mut().insert(claims);
                            State::Calling {
                                future: inner.call(request),
                            }
                        }
                        Err(rejection) => Self::reject(&config, &rejection).state,
                    };
                    self.as_mut().project().state.set(next);
                }
            }
        }
    }
}

/// A request waiting for its token to be verified (keys being fetched).
struct Waiting<S, ReqBody> {
    verifying: BoxFuture<'static, Result<VerifiedClaims, Rejection>>,
    inner: S,
    request: Request<ReqBody>,
    config: Arc<Config>,
}

impl<S, ReqBody> std::fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
