//! The OAuth 2.0 client-credentials token endpoint (RFC 6749 §4.4) that issues the tokens the
//! [`auth`](crate::auth) layer validates (feature `token`).
//!
//! A registered client `POST`s `grant_type=client_credentials` with its credentials (HTTP
//! Basic or `client_id`/`client_secret` form fields) and `scope=<tenant id>`; it gets a JWT
//! signed by the gateway (`ES256` by default, `RS256` with a key you supply) whose `scope`
//! holds the tenant, with `iss`, `sub` (the client id), `aud`, `iat`, `nbf`, `exp` and a
//! random `jti`. Errors are RFC 6749 §5.2 JSON.
//!
//! - [`TokenEndpoint`]: the Tower service to mount at the token URL.
//! - [`ClientStore`]: where clients live; [`InMemoryClientStore`] and [`FileClientStore`]
//!   (a JSON file replaced atomically, surviving restarts). Secrets are stored only as
//!   Argon2id hashes ([`SecretHashing`]) and can be rotated, with or without a grace period.
//! - [`SigningKeys`]: the signing keys, their JWKS document ([`JwksService`]) and rotation;
//!   also a [`KeySource`](crate::auth::KeySource), so a bearer layer in the same process
//!   verifies the endpoint's tokens without HTTP.
//! - [`ThrottlePolicy`]: repeated failed authentications for one client id from one address
//!   (the [`ClientAddr`] the server puts in the request extensions, or behind a load balancer
//!   the [`ForwardedClient`] it names) get 429 for a while.
//!
//! Signing keys: [`SigningKey::generate_es256`] generates a P-256 key at run time in every
//! build (pure Rust, `p256`); `ES256` and `RS256` keys can also be loaded from PEM.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::ServiceExt;
//! use tower_fhir::tenant::TenantId;
//! use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
//! let store = InMemoryClientStore::new();
//! let secret = store.register(NewClient::new("app-1").tenant(tenant)).await.unwrap();
//! let endpoint = TokenEndpoint::builder()
//!     .issuer("https://gateway.example")
//!     .audience("https://gateway.example/fhir")
//!     .store(store)
//!     .build()
//!     .unwrap();
//!
//! let form = format!(
//!     "grant_type=client_credentials&client_id=app-1&client_secret={}&scope={tenant}",
//!     secret.expose()
//! );
//! let request = Request::post("/token")
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body(Full::new(Bytes::from(form)))
//!     .unwrap();
//! let response = endpoint.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.headers()["cache-control"], "no-store");
//!
//! let wrong = Request::post("/token")
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body(Full::new(Bytes::from("grant_type=client_credentials&client_id=app-1&client_secret=nope")))
//!     .unwrap();
//! assert_eq!(endpoint.oneshot(wrong).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! # });
//! ```
//!
//! | status | `error` | when |
//! |---|---|---|
//! | 400 | `invalid_request` | no or repeated parameter, no `grant_type`, both Basic and form secret, no Content-Type, a `client_id` that is not 1–255 printable ASCII characters |
//! | 401 | `invalid_client` | unknown client, wrong secret, revoked client, no credentials (`WWW-Authenticate: Basic` unless the form was used) |
//! | 400 | `unsupported_grant_type` | a grant other than `client_credentials` |
//! | 400 | `invalid_scope` | a tenant the client is not entitled to, several tenants, no tenant while the client has several, only scopes the client may not have (those it may not have beside ones it may are left out; none asked for grants all its registered scopes) |
//! | 405 | `invalid_request` | not `POST` (`Allow: POST`) |
//! | 413 | `invalid_request` | body above the cap |
//! | 415 | `invalid_request` | Content-Type other than `application/x-www-form-urlencoded` |
//! | 429 | `temporarily_unavailable` | too many failed authentications for the client id from the request's address (`Retry-After`) |
//! | 500 | `server_error` | signing failed (logged) |
//! | 503 | `temporarily_unavailable` | the client store failed: a database down, a disk failing (logged; `Retry-After: 1`) |
//! | 503 | `temporarily_unavailable` | other checks of the same client id from the same address, or 16 checks of that address, ran 10 s without making room (a slow store; `Retry-After: 1`) |

mod assertion;
mod authenticate;
mod client;
mod durable;
mod endpoint;
mod error;
mod form;
mod introspect;
mod replay_file;
mod rotation;
mod scope;
mod signing;
pub(crate) mod throttle;

pub use crate::client_addr::{ClientAddr, ForwardedClient, SourceNetwork};
pub use assertion::ReplayGuard;
#[cfg(feature = "postgres")]
pub(crate) use client::{blocking, limit_of, Clients, HashedSecret};
pub use client::{
    is_client_id, AuthMethod, ClientKeys, ClientRecord, ClientSecret, ClientStore, ClientUpdate,
    InMemoryClientStore, NewClient, SecretHash, SecretHashing, StoreError, StoreFuture,
    MAX_SECRET_LEN, MIN_SECRET_LEN,
};
pub use durable::FileClientStore;
pub use endpoint::{ConfigError, TokenEndpoint, TokenEndpointBuilder, TokenFuture};
pub use error::{ErrorCode, TokenResponseBody};
pub use introspect::{Introspection, Revocation};
pub use replay_file::FileReplayGuard;
pub use rotation::SecretRotation;

/// The algorithms a `private_key_jwt` client assertion may be signed with, as JOSE names
/// (`RS384`, `ES384` first, as SMART Backend Services asks).
pub fn assertion_algorithms() -> impl Iterator<Item = &'static str> {
    assertion::ASSERTION_ALGORITHMS.iter().map(|alg| match alg {
        crate::auth::Algorithm::RS256 => "RS256",
        crate::auth::Algorithm::RS384 => "RS384",
        crate::auth::Algorithm::RS512 => "RS512",
        crate::auth::Algorithm::ES256 => "ES256",
        crate::auth::Algorithm::ES384 => "ES384",
        crate::auth::Algorithm::PS256 => "PS256",
        crate::auth::Algorithm::PS384 => "PS384",
        crate::auth::Algorithm::PS512 => "PS512",
        _ => "EdDSA",
    })
}
#[cfg(feature = "proxy")]
pub(crate) use signing::ACCESS_TOKEN_TYPE;
pub use signing::{JwksService, SigningKey, SigningKeys};
pub use throttle::{FailureCounts, Standing, ThrottlePolicy};

/// A client id as a client sent it, for the logs: as it is when it holds only characters
/// that cannot pass for the log's own (letters, digits, `-._~:@/+`), otherwise quoted with
/// its quotes, backslashes and control characters escaped, so that an id such as
/// `app from=10.9.9.9` cannot write a field of its own into a text log line.
pub(crate) struct LoggedId<'a>(pub(crate) &'a str);

impl std::fmt::Display for LoggedId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~:@/+".contains(&b));
        if plain {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

#[cfg(test)]
mod logged_id_tests {
    use super::LoggedId;

    #[test]
    fn an_id_that_could_pass_for_log_fields_is_quoted() {
        assert_eq!(LoggedId("app-1").to_string(), "app-1");
        assert_eq!(
            LoggedId("urn:app@example.org/x").to_string(),
            "urn:app@example.org/x"
        );
        assert_eq!(
            LoggedId("app reason=\"ok\" from=Some(10.9.9.9)").to_string(),
            r#""app reason=\"ok\" from=Some(10.9.9.9)""#
        );
        assert_eq!(LoggedId("a\nb").to_string(), r#""a\nb""#);
        assert_eq!(LoggedId("").to_string(), r#""""#);
    }
}
