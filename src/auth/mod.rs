//! Bearer token validation: the layer that lets only requests with a valid JWT through.
//!
//! [`BearerAuthLayer`] reads `Authorization: Bearer <jwt>`, verifies the signature with
//! jsonwebtoken against keys pinned to their algorithms, checks `exp`, `nbf` (with leeway),
//! `iss` and `aud` (and the header's `typ`, when [`token_type`](BearerAuthBuilder::token_type)
//! names the types access tokens declare), and calls the inner service with the [`VerifiedClaims`] in the request
//! extensions. Anything else is answered by the layer itself, per RFC 6750, with an
//! `OperationOutcome` body:
//!
//! | request | status | `WWW-Authenticate` |
//! |---|---|---|
//! | no `Authorization`, or another scheme (`Basic`) | 401 | `Bearer realm="fhir"` |
//! | two `Authorization` headers, empty, oversized or non-`b64token` token | 400 | `error="invalid_request"` |
//! | bad signature, `alg: none`, algorithm not allowed for the key, unknown `kid`, expired, not yet valid, wrong `iss`/`aud`/`typ`, no `exp`, revoked; a claim named twice, an `iss`, `sub` or `jti` that is not a string, an `iat` or `nbf` that is not a NumericDate | 401 | `error="invalid_token"` |
//! | keys cannot be fetched (and none were ever fetched) | 503 | (`Retry-After`) |
//! | any token while the revoked list is staler than allowed ([`RevokedTokens::set_max_staleness`]) | 503 | (`Retry-After`) |
//!
//! Keys are static ([`VerificationKey`], [`KeySet`]) or fetched ([`KeySource`], a JWKS URL
//! with the `remote-jwks` feature). Fetched keys are cached and refreshed on an interval (or
//! the source's `Cache-Control: max-age`, an hour at most); a token with an unknown `kid`
//! triggers one refetch, at most once per cooldown, shared by all requests waiting on it; when
//! the source is down the last good keys keep working, for a day at most
//! ([`BearerAuthBuilder::max_key_age`]): then they are dropped and their tokens get `503`.
//! With sources bound to issuers (`key_source_for_issuer`,
//! `jwks_url_for_issuer`), a token is checked against, and refetches, only the sources of the
//! issuer its `iss` names (or, when no source is bound to it, the static keys and the unbound
//! sources): one identity provider that hangs or whose `kid`s are forged neither delays nor
//! uses up the refetches of another's tokens. Verified tokens are cached (bounded, each entry no longer than
//! the token's `exp`, dropped when its key leaves the key set). Tokens revoked before they
//! expire ([`RevokedTokens`], which the token endpoint's revocation fills) are refused from
//! then on, cached ones included.
//!
//! The answer to a request whose token was verified carries `Vary: Authorization` (added
//! unless it varies by it, or by `*`, already): what it holds was chosen by the token, so a
//! cache must not hand it to a request with another.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fhir::auth::{BearerAuthLayer, VerificationKey, VerifiedClaims};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let layer = BearerAuthLayer::builder()
//!     .key(VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap())
//!     .issuer("https://auth.example")
//!     .build()
//!     .unwrap();
//!
//! let service = ServiceBuilder::new().layer(layer).service_fn(|req: Request<Full<Bytes>>| async move {
//!     let claims = req.extensions().get::<VerifiedClaims>().unwrap();
//!     Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(claims.subject().unwrap().to_owned())))
//! });
//!
//! // No token: 401 with a bare challenge.
//! let response = service.clone().oneshot(Request::new(Full::default())).await.unwrap();
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"fhir\"");
//!
//! // A valid token: the handler sees its claims.
//! let claims = serde_json::json!({"iss": "https://auth.example", "sub": "app", "exp": 4_000_000_000u64});
//! let key = EncodingKey::from_secret(b"a-shared-secret-of-32-bytes-or-more");
//! let token = encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
//! let request = Request::builder()
//!     .header("authorization", format!("Bearer {token}"))
//!     .body(Full::default())
//!     .unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.headers()["vary"], "Authorization");
//! # });
//! ```

mod claims;
mod config;
mod future;
#[cfg(feature = "remote-jwks")]
mod jwks;
mod keys;
mod layer;
mod rejection;
mod revocation_file;
mod revoked;
mod service;
mod source;
mod verify;

pub(crate) use claims::MemoKey;
pub use claims::VerifiedClaims;
pub use future::ResponseFuture;
pub use jsonwebtoken::Algorithm;
#[cfg(all(feature = "remote-jwks", feature = "token"))]
pub(crate) use jwks::RemoteKeys;
#[cfg(feature = "remote-jwks")]
#[cfg_attr(docsrs, doc(cfg(feature = "remote-jwks")))]
pub use jwks::{HttpJwks, InvalidJwksUrl};
pub use keys::{KeyError, KeySet, VerificationKey};
#[cfg(feature = "token")]
pub(crate) use layer::dedup;
pub(crate) use layer::MAX_LEEWAY;
pub use layer::{BearerAuthBuilder, BearerAuthLayer, ConfigError};
pub use rejection::{Rejection, RejectionKind};
pub use revocation_file::FileRevocationLog;
pub use revoked::{revoked_until, RevocationLog, RevokedTokens};
pub use service::BearerAuth;
pub use source::{FetchedKeys, KeyChanges, KeySource, KeySourceError, KeySourceFuture};
pub(crate) use verify::{is_parameter, names_a_token};
#[cfg(feature = "token")]
pub(crate) use verify::{verify_with_keys, Expected};
