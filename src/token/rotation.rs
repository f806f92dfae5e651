//! Secret rotation: a client rotating its own secret, through the service
//! [`SecretRotation`] or [`TokenEndpoint::rotate_own_secret`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::Body;
use serde_json::json;
use tower_service::Service;

use super::authenticate::Denied;
use super::client::{ClientSecret, StoreError};
use super::endpoint::{answer, source, Inner, TokenEndpoint, TokenFuture};
use super::error::{json_response, TokenError, TokenResponseBody};
use super::form::{check_content_type, credentials, post_only, read_form, Credentials};

impl TokenEndpoint {
    /// A Tower service for `POST …/{client_id}/secret` (mount it at, say,
    /// `/oauth/clients/{client_id}/secret`): the client rotates its own secret. It
    /// authenticates with its current secret (HTTP Basic, or `client_secret` in a form body;
    /// the id in the path must be the authenticated one) and gets the new secret as JSON
    /// `{"client_id", "client_secret"}` with `Cache-Control: no-store`. The old secret stops
    /// working at once. Failed authentications count toward the throttle; errors are RFC 6749
    /// JSON as at the token endpoint.
    pub fn secret_rotation_service(&self) -> SecretRotation {
        SecretRotation {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Rotation by the client itself: checks `current_secret`, then gives the client a new
    /// secret; the old one keeps working for `grace`. Failures count toward the throttle, as
    /// from an unknown address (the [`SecretRotation`] service counts them per address).
    pub async fn rotate_own_secret(
        &self,
        client_id: &str,
        current_secret: &str,
        grace: Duration,
    ) -> Result<ClientSecret, StoreError> {
        match self
            .inner
            .clients
            .authenticate_throttled(client_id, current_secret, None, None, "secret rotation")
            .await
        {
            // Only if the secret checked is still the client's (a reset made meanwhile stands).
            Ok(checked) => {
                self.inner
                    .clients
                    .store
                    .rotate_secret_from(client_id, checked.matched(), grace)
                    .await
            }
            Err(Denied::Blocked(_) | Denied::Failed) => {
                Err(StoreError::refused("client authentication failed"))
            }
            Err(Denied::Busy) => Err(StoreError::new(
                "other authentications of this client are still being checked; retry shortly",
            )),
            Err(Denied::Overloaded) => Err(StoreError::new(
                "the secret checks are all busy; retry shortly",
            )),
            Err(Denied::StoreFailed(err)) => Err(err),
        }
    }
}

/// The client's own secret rotation, from [`TokenEndpoint::secret_rotation_service`].
#[derive(Clone)]
pub struct SecretRotation {
    inner: Arc<Inner>,
}

impl fmt::Debug for SecretRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRotation").finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for SecretRotation
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
        answer(async move { inner.rotate_own(request).await })
    }
}

impl Inner {
    pub(super) async fn rotate_own<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<TokenResponseBody>, TokenError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        post_only(request.method(), "Secret rotation accepts POST only")?;
        let path_id = client_id_in_path(request.uri().path())
            .ok_or_else(|| TokenError::bad_request("The path does not name a client"))?;
        let (parts, body) = request.into_parts();
        // A Basic-authenticated rotation may come without a body.
        let form = if parts.headers.contains_key(header::CONTENT_TYPE) {
            check_content_type(&parts.headers)?;
            read_form(&parts.headers, body, self.body).await?
        } else {
            HashMap::new()
        };
        let mut form = form;
        // The path names the client when the form does not.
        form.entry("client_id".to_owned())
            .or_insert(path_id.clone());
        let (id, secret, basic) = match credentials(&parts.headers, &form, &self.realm)? {
            Credentials::Basic { id, secret } => (id, secret, true),
            Credentials::Post { id, secret } => (id, secret, false),
            Credentials::Assertion { .. } => {
                return Err(TokenError::bad_request(
                    "A private_key_jwt client has no secret to rotate",
                ))
            }
        };
        if id != path_id {
            return Err(TokenError::bad_request(
                "client_id does not match the client in the path",
            ));
        }
        let checked = self
            .clients
            .authenticate_throttled(
                &id,
                &secret,
                None,
                source(&parts.extensions),
                "secret rotation",
            )
            .await
            .map_err(|denied| denied.into_error(basic.then_some(&self.realm)))?;
        // Only if the secret it was checked with is still the client's: a reset made while it
        // was hashed (an administrator's, after a leak) is not undone.
        let new_secret = self
            .clients
            .store
            .rotate_secret_from(&id, checked.matched(), Duration::ZERO)
            .await
            .map_err(|err| {
                // Replaced meanwhile (a reset), or refused: revoked or deleted meanwhile. Either
                // way the credentials no longer name a client that may rotate.
                if err.is_conflict() || err.is_refused() {
                    tracing::warn!(client_id = %super::LoggedId(&id), error = %err, "a secret rotation refused: the client changed while its secret was checked");
                    return TokenError::invalid_client(
                        "Client authentication failed",
                        basic.then_some(&self.realm),
                    );
                }
                tracing::error!(error = %err, "could not rotate a client secret");
                TokenError::store_unavailable()
            })?;
        tracing::info!(client_id = %super::LoggedId(&id), "client rotated its secret");
        Ok(json_response(
            StatusCode::OK,
            &json!({"client_id": id, "client_secret": new_secret.expose()}),
        ))
    }
}

/// The `{client_id}` of a path ending `/{client_id}/secret`, percent-decoded.
fn client_id_in_path(path: &str) -> Option<String> {
    let rest = path.strip_suffix("/secret")?;
    let encoded = &rest[rest.rfind('/')? + 1..];
    let id = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_id_is_the_segment_before_secret() {
        assert_eq!(
            client_id_in_path("/oauth/clients/app-1/secret").as_deref(),
            Some("app-1")
        );
        assert_eq!(
            client_id_in_path("/clients/my%20app/secret").as_deref(),
            Some("my app")
        );
        assert_eq!(client_id_in_path("/clients//secret"), None);
        assert_eq!(client_id_in_path("/clients/app-1/secrets"), None);
        assert_eq!(client_id_in_path("secret"), None);
    }
}
