//! The `BearerAuth` service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::Config;
use super::verify::Verdict;
use crate::body::ResponseBody;

/// Requires a valid bearer token, then calls the inner service with [`VerifiedClaims`] in the
/// request extensions. Made by [`BearerAuthLayer`].
///
/// [`VerifiedClaims`]: super::VerifiedClaims
/// [`BearerAuthLayer`]: super::BearerAuthLayer
#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> BearerAuth<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BearerAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if let Some(skip) = &self.config.skip {
            let (parts, body) = request.into_parts();
            let skipped = skip(&parts);
            request = Request::from_parts(parts, body);
            if skipped {
                return ResponseFuture::call(self.inner.call(request));
            }
        }
        let verifier = &self.config.verifier;
        let verdict = match verifier.extract(request.headers()) {
            Ok(token) => verifier.verify(token),
            Err(rejection) => Verdict::Reject(rejection),
        };
        match verdict {
            Verdict::Accept(claims) => {
                request.extensions_mut().insert(claims);
                ResponseFuture::call(self.inner.call(request))
            }
            Verdict::Reject(rejection) => ResponseFuture::reject(&self.config, &rejection),
            Verdict::Wait(verifying) => {
                // The ready service goes with the request; this one keeps a fresh clone.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::wait(verifying, inner, request, Arc::clone(&self.config))
            }
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for BearerAuth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
