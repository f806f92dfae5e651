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
        // `vary`: the token was verified, so the response says it depends on it.
        Calling { #[pin] future: S::Future, vary: bool },
        Rejected { response: Option<Box<Response<bytes::Bytes>>> },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// A request let through without a token (a skipped path).
    pub(crate) fn call(future: S::Future) -> Self {
        Self {
            state: State::Calling {
                future,
                vary: false,
            },
        }
    }

    /// A request whose token was verified.
    pub(crate) fn accepted(future: S::Future) -> Self {
        Self {
            state: State::Calling { future, vary: true },
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
                StateProj::Calling { future, vary } => {
                    let mut response = ready!(future.poll(cx))?;
                    if *vary {
                        vary_by_authorization(response.headers_mut());
                    }
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
                                vary: true,
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

/// Adds `Vary: Authorization` unless the response varies by it (or by everything) already.
///
/// What a verified token's request gets depends on the token: the same URL answers each
/// tenant with its own data. Without it, a cache (a browser's, a shared one for a `public`
/// answer) could hand one token's response to a request with another.
fn vary_by_authorization(headers: &mut http::HeaderMap) {
    crate::version::vary_by(headers, http::HeaderValue::from_static("Authorization"));
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

#[cfg(test)]
mod tests {
    use super::vary_by_authorization;
    use http::header::VARY;
    use http::{HeaderMap, HeaderValue};

    fn varied(upstream: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut headers = HeaderMap::new();
        for value in upstream {
            headers.append(VARY, HeaderValue::from_bytes(value).unwrap());
        }
        vary_by_authorization(&mut headers);
        headers
            .get_all(VARY)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn authorization_is_added_once_and_only_where_missing() {
        let bytes = |values: &[&str]| -> Vec<Vec<u8>> {
            values.iter().map(|v| v.as_bytes().to_vec()).collect()
        };
        assert_eq!(varied(&[]), bytes(&["Authorization"]));
        assert_eq!(varied(&[b"Accept"]), bytes(&["Accept", "Authorization"]));
        // Already varying by it (any case, in a list) or by everything: left as it is.
        for kept in [
            &b"authorization"[..],
            b"Accept, AUTHORIZATION",
            b"*",
            b"Accept,*",
        ] {
            assert_eq!(varied(&[kept]), vec![kept.to_vec()]);
        }
        assert_eq!(
            varied(&[b"Accept", b"Authorization"]),
            bytes(&["Accept", "Authorization"])
        );
        // A value that is not text does not hide a missing one.
        assert_eq!(
            varied(&[b"\xffx"]),
            vec![b"\xffx".to_vec(), b"Authorization".to_vec()]
        );
    }
}
