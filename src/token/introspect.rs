//! Token introspection (RFC 7662) and revocation (RFC 7009): [`Introspection`] and
//! [`Revocation`], made by [`TokenEndpoint::introspection_service`] and
//! [`TokenEndpoint::revocation_service`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use serde_json::{json, Map, Value};
use tower_service::Service;

use super::client::ClientRecord;
use super::endpoint::{answer, Inner, TokenEndpoint, TokenFuture};
use super::error::{json_response, ErrorCode, TokenError, TokenResponseBody};
use super::form::posted_form;
use crate::auth::{verify_with_keys, Algorithm, Expected, VerifiedClaims};
use crate::tenant::TenantId;

/// The algorithms the endpoint signs with.
const OWN_ALGORITHMS: [Algorithm; 2] = [Algorithm::ES256, Algorithm::RS256];

impl TokenEndpoint {
    /// A Tower service for token introspection (RFC 7662; mount it at, say,
    /// `/oauth/introspect`). A registered client authenticates as at the token endpoint and
    /// `POST`s `token=<access token>` (`token_type_hint` is optional and ignored; without
    /// `token`, `400 invalid_request`). A live token of this endpoint (its signature, issuer
    /// and audience good, not expired, not revoked) that the asking client was issued, or
    /// that names a tenant the asking client is registered for too, gets `{"active": true,
    /// "scope", "client_id", "sub", "iss", "aud", "exp", "iat", "tenant", "token_type":
    /// "Bearer", "jti"}`; any other (expired, revoked, another issuer's, garbled, or another
    /// customer's) gets `{"active": false}` and nothing more. Answers carry
    /// `Cache-Control: no-store`; client authentication failures are RFC 6749 errors, counted
    /// by the throttle.
    ///
    /// ```
    /// use http::{Request, StatusCode};
    /// use http_body_util::{BodyExt, Full};
    /// use bytes::Bytes;
    /// use tower::ServiceExt;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryClientStore::new();
    /// let tenant = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
    /// let secret = store.register(NewClient::new("app").tenant(tenant)).await.unwrap();
    /// let endpoint = TokenEndpoint::builder().issuer("https://gw.example").audience("fhir").store(store).build().unwrap();
    /// let form = |body: String| {
    ///     Request::post("/")
    ///         .header("content-type", "application/x-www-form-urlencoded")
    ///         .body(Full::new(Bytes::from(body)))
    ///         .unwrap()
    /// };
    /// let credentials = format!("client_id=app&client_secret={}", secret.expose());
    /// let issued = endpoint.clone().oneshot(form(format!("grant_type=client_credentials&{credentials}"))).await.unwrap();
    /// let issued: serde_json::Value = serde_json::from_slice(&issued.into_body().collect().await.unwrap().to_bytes()).unwrap();
    /// let token = issued["access_token"].as_str().unwrap();
    ///
    /// let asked = endpoint.introspection_service().oneshot(form(format!("token={token}&{credentials}"))).await.unwrap();
    /// assert_eq!(asked.status(), StatusCode::OK);
    /// let answer: serde_json::Value = serde_json::from_slice(&asked.into_body().collect().await.unwrap().to_bytes()).unwrap();
    /// assert_eq!(answer["active"], true);
    /// assert_eq!(answer["tenant"], "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f");
    ///
    /// // Revoked by its client: no longer active.
    /// let revoked = endpoint.revocation_service().oneshot(form(format!("token={token}&{credentials}"))).await.unwrap();
    /// assert_eq!(revoked.status(), StatusCode::OK);
    /// let asked = endpoint.introspection_service().oneshot(form(format!("token={token}&{credentials}"))).await.unwrap();
    /// let answer: serde_json::Value = serde_json::from_slice(&asked.into_body().collect().await.unwrap().to_bytes()).unwrap();
    /// assert_eq!(answer, serde_json::json!({"active": false}));
    /// # });
    /// ```
    pub fn introspection_service(&self) -> Introspection {
        Introspection {
            inner: Arc::clone(&self.inner),
        }
    }

    /// A Tower service for token revocation (RFC 7009; mount it at, say, `/oauth/revoke`).
    /// A client authenticates as at the token endpoint and `POST`s `token=<access token>`
    /// (`token_type_hint` optional: `access_token`, or anything else, which is ignored). A live
    /// token this endpoint issued to that client is added to
    /// [`revoked_tokens`](Self::revoked_tokens) until it expires; bearer layers given that list
    /// refuse it from then on, cached or not. The answer is `200` with an empty body, also for
    /// a token that is expired, garbled or not this endpoint's (RFC 7009 §2.2: there is
    /// nothing to revoke); a live token of another client is `400 unauthorized_client`, and
    /// stays valid.
    pub fn revocation_service(&self) -> Revocation {
        Revocation {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Token introspection (RFC 7662), from [`TokenEndpoint::introspection_service`].
#[derive(Clone)]
pub struct Introspection {
    inner: Arc<Inner>,
}

/// Token revocation (RFC 7009), from [`TokenEndpoint::revocation_service`].
#[derive(Clone)]
pub struct Revocation {
    inner: Arc<Inner>,
}

impl fmt::Debug for Introspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspection").finish_non_exhaustive()
    }
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation").finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for Introspection
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<TokenResponseBody>;
    type Error = Infallible;
    type Future = TokenFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        answer(async move {
            let (client, form) = inner
                .authenticated_form(request, Asks::OfItsTenant, "introspection")
                .await?;
            let Some(token) = form.get("token") else {
                return Err(TokenError::bad_request("token is missing"));
            };
            let answer = match inner.live_token(token) {
                Some(claims) if may_introspect(&client, &claims) => describe(&claims),
                _ => json!({"active": false}),
            };
            Ok(json_response(StatusCode::OK, &answer))
        })
    }
}

impl<B> Service<Request<B>> for Revocation
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<TokenResponseBody>;
    type Error = Infallible;
    type Future = TokenFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        answer(async move {
            let (client, form) = inner
                .authenticated_form(request, Asks::OfItsOwn, "revocation")
                .await?;
            let Some(token) = form.get("token") else {
                return Err(TokenError::bad_request("token is missing"));
            };
            if let Some(claims) = inner.revocable_token(token) {
                if claims.subject() != Some(client.id.as_str()) {
                    tracing::info!(client_id = %super::LoggedId(&client.id), "revocation of another client's token refused");
                    return Err(TokenError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::UnauthorizedClient,
                        "The token was not issued to this client",
                    ));
                }
                let known = (
                    claims.issuer().map(str::to_owned),
                    claims.token_id().unwrap_or_default().to_owned(),
                );
                // Revoked here already: answered as done, unless its record failed (`503`,
                // "retry"): a retry must not be answered without it.
                if inner.revoked.is_revoked(&claims) && !inner.unrecorded().contains(&known) {
                    return Ok(json_response(StatusCode::OK, &Value::Object(Map::new())));
                }
                inner.revoked.revoke(&claims);
                if let (Some(log), Some(jti)) = (&inner.revocation_log, claims.token_id()) {
                    let until = crate::auth::revoked_until(claims.expires_at());
                    if let Err(error) = log.record(claims.issuer(), jti, until).await {
                        tracing::error!(client_id = %super::LoggedId(&client.id), %error, "a revocation could not be recorded in the revocation log (for restarts and other replicas)");
                        inner.unrecorded().insert(known);
                        return Err(TokenError::unavailable(
                            "The revocation could not be recorded everywhere; retry shortly",
                        ));
                    }
                    inner.unrecorded().remove(&known);
                }
                tracing::info!(client_id = %super::LoggedId(&client.id), "token revoked");
            }
            Ok(json_response(StatusCode::OK, &Value::Object(Map::new())))
        })
    }
}

impl Inner {
    /// The revoked tokens whose record in the revocation log failed.
    fn unrecorded(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<(Option<String>, String)>> {
        self.unrecorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The form of a `POST` to introspection or revocation, and the client it authenticates,
    /// read with what `asks` needs of its tenants.
    async fn authenticated_form<B>(
        &self,
        request: Request<B>,
        asks: Asks,
        doing: &'static str,
    ) -> Result<(ClientRecord, HashMap<String, String>), TokenError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, form) =
            posted_form(request, "This endpoint accepts POST only", self.body).await?;
        let tenant = match asks {
            // (The token is checked again once the client is: it may be revoked meanwhile.)
            Asks::OfItsTenant => form
                .get("token")
                .and_then(|token| self.live_token(token))
                .and_then(|claims| only_tenant(&claims)),
            Asks::OfItsOwn => None,
        };
        let client = self
            .authenticate_client(&parts, &form, tenant, doing)
            .await?;
        Ok((client, form))
    }

    /// The claims of `token` when it is a live token of this endpoint: signed by one of its
    /// current keys, its issuer and audience, not expired (no leeway), not revoked.
    pub(super) fn live_token(&self, token: &str) -> Option<VerifiedClaims> {
        let claims = self.own_token(token, 0)?;
        // (While the revoked list is staler than it may be, no token can be vouched for.)
        (!claims.is_expired() && !self.revoked.is_revoked(&claims) && !self.revoked.is_stale())
            .then_some(claims)
    }

    /// The claims of `token` when it is a token of this endpoint that a bearer layer may still
    /// take, or would but for a revocation: signed by one of its current keys, its issuer and
    /// audience, expired less than the longest leeway a bearer layer takes (an hour) ago. What
    /// a client may revoke (again: a revocation whose record failed is retried).
    fn revocable_token(&self, token: &str) -> Option<VerifiedClaims> {
        self.own_token(token, crate::auth::MAX_LEEWAY.as_secs())
    }

    /// The claims of `token` when this endpoint signed it (one of its current keys, its issuer
    /// and audience), expired no more than `leeway` seconds ago.
    fn own_token(&self, token: &str, leeway: u64) -> Option<VerifiedClaims> {
        let keys = self.keys.key_set().ok()?;
        let expected = Expected {
            algorithms: &OWN_ALGORITHMS,
            issuer: Some(&self.issuer),
            audiences: std::slice::from_ref(&self.audience),
            leeway,
        };
        verify_with_keys(&keys, token, &expected).ok()
    }
}

/// What a request asks of a token, and so what of the client's tenants it needs.
#[derive(Clone, Copy)]
enum Asks {
    /// Introspection: the client may learn of a token for one of its tenants, so the client
    /// is read with the token's tenant alone among its tenants, if it has it
    /// ([`ClientStore::client_for_tenant`](super::ClientStore::client_for_tenant)): a client
    /// of thousands costs what a client of one does.
    OfItsTenant,
    /// Revocation: only of its own tokens; none of its tenants is needed.
    OfItsOwn,
}

/// The tenant a token is for, when it names exactly one (as every token of the endpoint does).
fn only_tenant(claims: &VerifiedClaims) -> Option<TenantId> {
    let mut tenants = claims
        .scopes()
        .filter_map(|scope| TenantId::parse(scope).ok());
    let first = tenants.next()?;
    tenants.all(|other| other == first).then_some(first)
}

/// Whether `client` may learn of `claims`' token (RFC 7662 §4: the server decides who may
/// introspect what): its own, or one for a tenant it is registered for too. Of any other
/// token it learns nothing, not even whether it is live.
fn may_introspect(client: &ClientRecord, claims: &VerifiedClaims) -> bool {
    claims.subject() == Some(client.id.as_str())
        || claims
            .scopes()
            .filter_map(|scope| TenantId::parse(scope).ok())
            .any(|tenant| client.tenants.contains(&tenant))
}

/// RFC 7662 §2.2: what an active token is.
fn describe(claims: &VerifiedClaims) -> Value {
    let scope: Vec<&str> = claims.scopes().collect();
    let tenant = scope.iter().find_map(|s| TenantId::parse(s).ok());
    let mut answer = json!({
        "active": true,
        "token_type": "Bearer",
        "scope": scope.join(" "),
        "exp": claims.expires_at(),
    });
    let fields = [
        ("client_id", claims.subject().map(Value::from)),
        ("sub", claims.subject().map(Value::from)),
        ("iss", claims.issuer().map(Value::from)),
        ("aud", claims.get("aud").cloned()),
        ("iat", claims.issued_at().map(Value::from)),
        ("nbf", claims.not_before().map(Value::from)),
        ("jti", claims.token_id().map(Value::from)),
        ("tenant", tenant.map(|t| Value::from(t.to_string()))),
        // Its resource scopes narrow a tenant-wide client's access: nothing where SMART scopes
        // are required (a resource server reading this answer needs to know).
        (
            crate::smart::NARROWED_CLAIM,
            claims.get(crate::smart::NARROWED_CLAIM).cloned(),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            answer[name] = value;
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(extra: Value) -> VerifiedClaims {
        let mut claims = json!({"iss": "https://gw.example", "sub": "app", "exp": 4_000_000_000u64,
            "scope": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f system/Patient.r"});
        for (name, value) in extra.as_object().unwrap() {
            claims[name] = value.clone();
        }
        VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_narrowed_token_is_described_as_one() {
        let narrowed = describe(&claims(json!({crate::smart::NARROWED_CLAIM: true})));
        assert_eq!(narrowed[crate::smart::NARROWED_CLAIM], true);
        assert_eq!(narrowed["tenant"], "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f");
        let registered = describe(&claims(json!({})));
        assert!(registered.get(crate::smart::NARROWED_CLAIM).is_none());
    }
}
