//! The `BearerAuth` service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::config::Config;
use super::future::ResponseFuture;
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
        if let Err(rejection) = verifier.refuse_query_token(request.uri().query()) {
            return ResponseFuture::reject(&self.config, &rejection);
        }
        let verdict = match verifier.extract(request.headers()) {
            Ok(token) => verifier.verify(token),
            Err(rejection) => Verdict::Reject(rejection),
        };
        match verdict {
            Verdict::Accept(claims) => {
                request.extensions_mut().insert(claims);
                ResponseFuture::accepted(self.inner.call(request))
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use bytes::Bytes;
    use http::{header, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;
    use tower::{service_fn, Layer, ServiceExt};

    use crate::auth::{
        BearerAuthLayer, FetchedKeys, KeySet, KeySourceError, VerificationKey, VerifiedClaims,
    };

    const SECRET: &[u8] = b"unit-test-secret-unit-test-secret";

    fn token(kid: Option<&str>, exp_in: i64) -> String {
        crate::install_crypto_provider();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        let claims = json!({"sub": "app", "exp": now + exp_in, "scope": "t1"});
        encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn request(token: Option<&str>) -> Request<Full<Bytes>> {
        let mut request = Request::builder().uri("/Patient/1");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        request.body(Full::default()).unwrap()
    }

    /// Answers with the subject of the claims it was given, or `-` without claims.
    async fn echo_subject(
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let subject = request
            .extensions()
            .get::<VerifiedClaims>()
            .and_then(|c| c.subject().map(str::to_owned))
            .unwrap_or_else(|| "-".to_owned());
        Ok(Response::new(Full::from(subject)))
    }

    async fn body(response: Response<crate::body::ResponseBody<Full<Bytes>>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn static_layer() -> BearerAuthLayer {
        BearerAuthLayer::builder()
            .key(VerificationKey::hmac(SECRET).unwrap())
            .skip_if(|parts| parts.uri.path() == "/metadata")
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn claims_reach_the_inner_service_and_errors_stay_infallible() {
        let service = static_layer().layer(service_fn(echo_subject));
        let response: Result<_, Infallible> =
            service.oneshot(request(Some(&token(None, 60)))).await;
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "app");
    }

    #[tokio::test]
    async fn rejections_are_responses_and_skip_the_inner_service() {
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let service = static_layer().layer(service_fn(move |r| {
            counted.fetch_add(1, Ordering::SeqCst);
            echo_subject(r)
        }));
        let response = service.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let response = service
            .clone()
            .oneshot(request(Some(&token(None, -600))))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(body(response).await.contains("OperationOutcome"));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_token_in_the_query_is_refused_before_the_inner_service() {
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let service = static_layer().layer(service_fn(move |r| {
            counted.fetch_add(1, Ordering::SeqCst);
            echo_subject(r)
        }));
        let good = token(None, 60);
        for uri in [
            format!("/Patient?access_token={good}"),
            format!("/Patient?_count=1&%61ccess_token={good}"),
        ] {
            // With the header too (two ways at once), or alone.
            for header in [true, false] {
                let mut request = Request::get(uri.as_str());
                if header {
                    request = request.header(header::AUTHORIZATION, format!("Bearer {good}"));
                }
                let response = service
                    .clone()
                    .oneshot(request.body(Full::default()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{uri}");
                let challenge = response.headers()[header::WWW_AUTHENTICATE]
                    .to_str()
                    .unwrap()
                    .to_owned();
                assert!(challenge.contains("invalid_request"), "{challenge}");
                assert!(body(response).await.contains("query string"));
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // A parameter that merely holds the words passes.
        let request = Request::get("/Patient?name=access_token")
            .header(header::AUTHORIZATION, format!("Bearer {good}"))
            .body(Full::default())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_stale_revoked_list_refuses_every_token_until_confirmed() {
        let revoked = crate::auth::RevokedTokens::new();
        revoked.set_max_staleness(Some(Duration::from_secs(5)));
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let layer = BearerAuthLayer::builder()
            .key(VerificationKey::hmac(SECRET).unwrap())
            .revoked_tokens(revoked.clone())
            .skip_if(|parts| parts.uri.path() == "/metadata")
            .build()
            .unwrap();
        let service = layer.layer(service_fn(move |r| {
            counted.fetch_add(1, Ordering::SeqCst);
            echo_subject(r)
        }));
        let good = token(None, 60);
        // Never confirmed: a good token, a forged one and an expired one alike.
        for token in [good.clone(), format!("{good}x"), token(None, -600)] {
            let response = service
                .clone()
                .oneshot(request(Some(&token)))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "5");
            assert!(!response.headers().contains_key(header::WWW_AUTHENTICATE));
            assert!(body(response).await.contains("\"transient\""));
        }
        // No token still gets its challenge, and a skipped request passes.
        let response = service.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let metadata = Request::get("/metadata").body(Full::default()).unwrap();
        let response = service.clone().oneshot(metadata).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        revoked.confirm_current(std::time::Instant::now());
        let response = service.clone().oneshot(request(Some(&good))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // Stale again (confirmed longer ago than the limit): the cached token too.
        revoked.set_max_staleness(Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        let response = service.clone().oneshot(request(Some(&good))).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        revoked.set_max_staleness(None);
        let response = service.oneshot(request(Some(&good))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn skipped_requests_pass_without_claims() {
        let service = static_layer().layer(service_fn(echo_subject));
        let request = Request::get("/metadata").body(Full::default()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "-");
    }

    #[tokio::test]
    async fn a_request_waits_for_the_first_key_fetch() {
        let fetches = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        let layer = BearerAuthLayer::builder()
            .key_source(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let key = VerificationKey::hmac(SECRET)
                        .map_err(|e| KeySourceError::new(e.to_string()))?
                        .with_kid("k1");
                    Ok(FetchedKeys::from(KeySet::new().with_key(key)))
                }
            })
            .build()
            .unwrap();
        let service = layer.layer(service_fn(echo_subject));
        let (a, b) = tokio::join!(
            service
                .clone()
                .oneshot(request(Some(&token(Some("k1"), 60)))),
            service
                .clone()
                .oneshot(request(Some(&token(Some("k1"), 120)))),
        );
        assert_eq!(a.unwrap().status(), StatusCode::OK);
        assert_eq!(b.unwrap().status(), StatusCode::OK);
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failing_source_at_cold_start_is_503() {
        let layer = BearerAuthLayer::builder()
            .key_source(|| async { Err(KeySourceError::new("idp down")) })
            .build()
            .unwrap();
        let response = layer
            .layer(service_fn(echo_subject))
            .oneshot(request(Some(&token(Some("k1"), 60))))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            !body(response).await.contains("idp down"),
            "source errors stay in the logs"
        );
    }
}
