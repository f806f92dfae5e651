//! The token endpoint: [`TokenEndpoint`], its builder, and the client-credentials grant
//! (RFC 6749 §4.4).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use rand::RngCore;
use serde_json::json;
use tower_service::Service;

use super::assertion::{Assertions, ReplayGuard};
use super::authenticate::{Authenticator, Denied, HashingLimit};
use super::client::{unix_now, AuthMethod, ClientRecord, ClientStore, StoreError};
use super::error::{json_response, ErrorCode, TokenError, TokenResponseBody};
use super::form::{credentials, posted_form, BodyBounds, Credentials};
use super::scope::grant_scope;
use super::signing::SigningKeys;
use super::throttle::{FailureCounts, ThrottlePolicy};
use crate::auth::{RevocationLog, RevokedTokens};
use crate::tenant::TenantId;

/// How far ahead of now [`TokenEndpoint::revoke_tokens_of`] cuts a client's tokens off: a
/// token request checked just before the change and signed a moment after it, or issued by a
/// replica whose clock is a little ahead, still carries an `iat` at or before the cut-off.
const CUT_OFF_MARGIN_SECS: u64 = 2;

/// The longest clock skew a bearer layer allows on `exp` (its `leeway` is at most an hour).
const MAX_LEEWAY_SECS: u64 = crate::auth::MAX_LEEWAY.as_secs();
use crate::client_addr::ForwardedClient;

/// The future a [`TokenEndpoint`] returns.
pub type TokenFuture =
    Pin<Box<dyn Future<Output = Result<Response<TokenResponseBody>, Infallible>> + Send>>;

/// The OAuth 2.0 client-credentials token endpoint, as a Tower service.
///
/// Mount it at the token URL; see the [module docs](super) for the protocol and an example.
/// Clones share the configuration, the client store, the keys and the failure counters.
#[derive(Clone)]
pub struct TokenEndpoint {
    pub(super) inner: Arc<Inner>,
}

/// What the endpoint's clones, and the [`SecretRotation`](super::SecretRotation) services made
/// from it, share.
pub(super) struct Inner {
    pub(super) issuer: String,
    pub(super) audience: String,
    /// The `WWW-Authenticate: Basic` challenge of a 401.
    pub(super) realm: HeaderValue,
    default_lifetime: Duration,
    /// How large a request body may be, and how long it may take to arrive.
    pub(super) body: BodyBounds,
    /// The client store, and the throttled checks of clients' secrets.
    pub(super) clients: Authenticator,
    pub(super) keys: SigningKeys,
    /// The tokens revoked before they expire.
    pub(super) revoked: RevokedTokens,
    /// `private_key_jwt` assertions: their audience and the `jti`s seen.
    pub(super) assertions: Assertions,
    /// Where revocations are recorded for other processes, if anywhere.
    pub(super) revocation_log: Option<Box<dyn RevocationLog>>,
    /// The tokens (issuer, `jti`) revoked here whose record in the log failed: a revocation
    /// of one again records it (one revoked and recorded is not recorded again).
    pub(super) unrecorded: std::sync::Mutex<std::collections::HashSet<(Option<String>, String)>>,
    /// Where client assertions' `jti`s are checked across processes, if anywhere.
    pub(super) replay_guard: Option<Box<dyn ReplayGuard>>,
    /// Whether a client registered without SMART resource scopes may ask for some.
    scopeless_narrowing: bool,
}

impl Inner {
    /// Until when the tokens a client holds now may be accepted somewhere: its lifetime (or
    /// the default; the longer, should a shorter one have been set since), a second for a
    /// token being issued, and the longest clock skew a bearer layer allows on `exp`.
    fn revoked_until(&self, client: &ClientRecord) -> u64 {
        let lifetime = client
            .token_lifetime_secs
            .unwrap_or(0)
            .max(self.default_lifetime.as_secs());
        unix_now()
            .saturating_add(lifetime)
            .saturating_add(1 + MAX_LEEWAY_SECS)
    }
}

impl fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("default_lifetime", &self.inner.default_lifetime)
            .field("max_body_bytes", &self.inner.body.max_bytes)
            .field("body_timeout", &self.inner.body.timeout)
            .field("keys", &self.inner.keys)
            .field(
                "scopeless_clients_may_narrow",
                &self.inner.scopeless_narrowing,
            )
            .finish_non_exhaustive()
    }
}

/// A token endpoint configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// No client store was given.
    MissingStore,
    /// No issuer (`iss`) was given.
    MissingIssuer,
    /// No audience (`aud`) was given.
    MissingAudience,
    /// A signing key could not be generated.
    Keys(String),
    /// The realm is not a valid header value.
    InvalidRealm,
    /// A zero lifetime or body cap.
    Zero(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingStore => f.write_str("the token endpoint needs a client store"),
            Self::MissingIssuer => f.write_str("the token endpoint needs an issuer"),
            Self::MissingAudience => f.write_str("the token endpoint needs an audience"),
            Self::Keys(why) => write!(f, "signing keys: {why}"),
            Self::InvalidRealm => f.write_str("the realm must be printable ASCII without '\"'"),
            Self::Zero(what) => write!(f, "{what} must not be zero"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`TokenEndpoint`].
#[must_use]
pub struct TokenEndpointBuilder {
    issuer: Option<String>,
    audience: Option<String>,
    realm: String,
    default_lifetime: Duration,
    max_body_bytes: usize,
    body_timeout: Duration,
    store: Option<Box<dyn ClientStore>>,
    keys: Option<SigningKeys>,
    throttle: ThrottlePolicy,
    hashing: HashingLimit,
    revoked: Option<RevokedTokens>,
    token_url: Option<String>,
    revocation_log: Option<Box<dyn RevocationLog>>,
    replay_guard: Option<Box<dyn ReplayGuard>>,
    failure_counts: Option<Box<dyn FailureCounts>>,
    scopeless_narrowing: bool,
}

impl fmt::Debug for TokenEndpointBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpointBuilder")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenEndpointBuilder {
    /// The `iss` of every token (required); the bearer layer's `issuer`.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// The `aud` of every token (required); the bearer layer's `audience`.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// The client store (required).
    pub fn store(mut self, store: impl ClientStore) -> Self {
        self.store = Some(Box::new(store));
        self
    }

    /// The signing keys; default: a freshly generated `ES256` key (tokens then stop verifying
    /// when the process restarts, so pass persistent keys in production).
    pub fn signing_keys(mut self, keys: SigningKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The lifetime of tokens for clients without their own (default one hour).
    pub fn default_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = lifetime;
        self
    }

    /// The largest request body accepted (default 8 KiB); larger ones get 413.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// How long a request's body may take to arrive whole once its head has (default 30 s);
    /// a slower one gets `408` (`invalid_request`, with `Connection: close`), so that a client
    /// sending a byte now and then cannot hold a connection for ever. The wait is a tokio
    /// timer: the runtime serving the endpoint needs its time driver (`enable_time`, or
    /// `enable_all` as `#[tokio::main]` does).
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// The realm of the `WWW-Authenticate: Basic` challenge (default `tower-fhir`).
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = realm.into();
        self
    }

    /// How repeated failed authentications are refused (default [`ThrottlePolicy::default`]).
    pub fn throttle(mut self, policy: ThrottlePolicy) -> Self {
        self.throttle = policy;
        self
    }

    /// At most `checks` client secret checks (Argon2 hashes, each with its memory) run at once,
    /// whatever the clients and addresses; default: the number of CPUs. A check that finds no
    /// room waits up to [`hashing_wait`](Self::hashing_wait) for one, then is answered `503`
    /// (`temporarily_unavailable`, `Retry-After: 1`). This bounds the memory and threads a
    /// flood of token requests can take.
    pub fn hashing_concurrency(mut self, checks: usize) -> Self {
        self.hashing.concurrency = checks;
        self
    }

    /// How long a secret check waits for room under
    /// [`hashing_concurrency`](Self::hashing_concurrency) (default 2 s).
    pub fn hashing_wait(mut self, wait: Duration) -> Self {
        self.hashing.wait = wait;
        self
    }

    /// The URL clients `POST` token requests to: the `aud` their `private_key_jwt` assertions
    /// must name. Default: the issuer followed by `/oauth/token` (where
    /// [`Gateway`](crate::gateway::Gateway) serves it when the issuer is its base URL).
    pub fn token_url(mut self, url: impl Into<String>) -> Self {
        self.token_url = Some(url.into());
        self
    }

    /// Where revoked tokens are kept (default: a list of the endpoint's own). Give a list
    /// shared with something else, say one a database keeps in step across replicas.
    pub fn revoked_tokens(mut self, revoked: RevokedTokens) -> Self {
        self.revoked = Some(revoked);
        self
    }

    /// Records every revocation here too, for other processes (replicas sharing a database:
    /// `tower_fhir::postgres::PgState::revocation_log`, with
    /// `follow_revocations` on each replica's list). A revocation is answered `200` only once
    /// it is recorded; when recording fails, `503` (`temporarily_unavailable`, `Retry-After`),
    /// though this process refuses the token already.
    pub fn revocation_log(mut self, log: impl RevocationLog) -> Self {
        self.revocation_log = Some(Box::new(log));
        self
    }

    /// Also checks every `private_key_jwt` assertion's `jti` here, so that one accepted by
    /// another process (a replica sharing a database:
    /// `tower_fhir::postgres::PgState::assertion_replay_guard`) is refused as a replay. When
    /// the check cannot be made, the request gets `503` (`temporarily_unavailable`,
    /// `Retry-After`).
    pub fn assertion_replay_guard(mut self, guard: impl ReplayGuard) -> Self {
        self.replay_guard = Some(Box::new(guard));
        self
    }

    /// Counts failed authentications here too, so that guesses spread over several processes
    /// (replicas sharing a database: `tower_fhir::postgres::PgState::failure_counts`) are
    /// throttled as if they met one; see [`FailureCounts`] for the rules. When the counts
    /// cannot be read, the request gets `503` (`temporarily_unavailable`, `Retry-After`).
    pub fn shared_failure_counts(mut self, counts: impl FailureCounts) -> Self {
        self.failure_counts = Some(Box::new(counts));
        self
    }

    /// Lets a client registered without SMART resource scopes ask for some (default: off,
    /// they are left out of its tokens, and asked alone they are `invalid_scope`). Such a
    /// client's tokens have tenant-wide access where a token without resource scopes is
    /// accepted (a [`SmartScopeLayer`](crate::smart::SmartScopeLayer) without
    /// `require_smart_scopes`): asking for `system/Observation.rs`, as SMART Backend Services
    /// clients always ask for `system/` scopes, gets it a token for Observations alone. Turn it
    /// on only there: where such tokens are refused (`require_smart_scopes(true)`), the client
    /// would give itself access it does not have, and
    /// [`GatewayBuilder::build`](crate::gateway::GatewayBuilder::build) refuses the pair. Such
    /// tokens carry [`NARROWED_CLAIM`](crate::smart::NARROWED_CLAIM)` = true` (introspection
    /// says so too), which a SMART layer requiring SMART scopes refuses wherever they go.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::Request;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::ServiceExt;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let tenant = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    /// let store = InMemoryClientStore::new();
    /// let secret = store
    ///     .register(NewClient::new("backend").tenant(tenant.parse().unwrap()))
    ///     .await
    ///     .unwrap();
    /// let endpoint = TokenEndpoint::builder()
    ///     .issuer("https://gateway.example")
    ///     .audience("https://gateway.example/fhir")
    ///     .store(store)
    ///     .scopeless_clients_may_narrow(true)
    ///     .build()
    ///     .unwrap();
    /// let form = format!(
    ///     "grant_type=client_credentials&client_id=backend&client_secret={}\
    ///      &scope={tenant}%20system/Observation.rs",
    ///     secret.expose()
    /// );
    /// let request = Request::post("/oauth/token")
    ///     .header("content-type", "application/x-www-form-urlencoded")
    ///     .body(Full::new(Bytes::from(form)))
    ///     .unwrap();
    /// let response = endpoint.oneshot(request).await.unwrap();
    /// let body = response.into_body().collect().await.unwrap().to_bytes();
    /// let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    /// assert_eq!(body["scope"], format!("{tenant} system/Observation.rs"));
    /// # });
    /// ```
    pub fn scopeless_clients_may_narrow(mut self, narrowing: bool) -> Self {
        self.scopeless_narrowing = narrowing;
        self
    }

    /// Checks the configuration and builds the endpoint.
    pub fn build(self) -> Result<TokenEndpoint, ConfigError> {
        crate::install_crypto_provider();
        let store = self.store.ok_or(ConfigError::MissingStore)?;
        let issuer = self.issuer.ok_or(ConfigError::MissingIssuer)?;
        let audience = self.audience.ok_or(ConfigError::MissingAudience)?;
        if self.default_lifetime.as_secs() == 0 {
            return Err(ConfigError::Zero("the default lifetime"));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::Zero("the body cap"));
        }
        if self.body_timeout.is_zero() {
            return Err(ConfigError::Zero("the body timeout"));
        }
        if self.realm.contains('"') {
            return Err(ConfigError::InvalidRealm);
        }
        if self.hashing.concurrency == 0 {
            return Err(ConfigError::Zero("the hashing concurrency"));
        }
        let realm = HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm))
            .map_err(|_| ConfigError::InvalidRealm)?;
        let token_url = self
            .token_url
            .unwrap_or_else(|| format!("{}/oauth/token", issuer.trim_end_matches('/')));
        let keys = match self.keys {
            Some(keys) => keys,
            None => SigningKeys::generate().map_err(|e| ConfigError::Keys(e.to_string()))?,
        };
        Ok(TokenEndpoint {
            inner: Arc::new(Inner {
                issuer,
                audience,
                realm,
                default_lifetime: self.default_lifetime,
                body: BodyBounds {
                    max_bytes: self.max_body_bytes,
                    timeout: self.body_timeout,
                },
                clients: Authenticator::new(
                    store,
                    self.throttle,
                    self.hashing,
                    self.failure_counts,
                ),
                keys,
                revoked: self.revoked.unwrap_or_default(),
                assertions: Assertions::new(vec![token_url]),
                revocation_log: self.revocation_log,
                unrecorded: std::sync::Mutex::default(),
                replay_guard: self.replay_guard,
                scopeless_narrowing: self.scopeless_narrowing,
            }),
        })
    }
}

impl TokenEndpoint {
    /// Starts configuring an endpoint.
    pub fn builder() -> TokenEndpointBuilder {
        TokenEndpointBuilder {
            issuer: None,
            audience: None,
            realm: "tower-fhir".into(),
            default_lifetime: Duration::from_secs(3600),
            max_body_bytes: 8 * 1024,
            body_timeout: Duration::from_secs(30),
            store: None,
            keys: None,
            throttle: ThrottlePolicy::default(),
            hashing: HashingLimit::default(),
            revoked: None,
            token_url: None,
            revocation_log: None,
            replay_guard: None,
            failure_counts: None,
            scopeless_narrowing: false,
        }
    }

    /// Whether a client registered without SMART resource scopes may ask for some
    /// ([`scopeless_clients_may_narrow`](TokenEndpointBuilder::scopeless_clients_may_narrow)).
    pub fn scopeless_clients_may_narrow(&self) -> bool {
        self.inner.scopeless_narrowing
    }

    /// The signing keys (a shared handle: rotate them here).
    pub fn signing_keys(&self) -> &SigningKeys {
        &self.inner.keys
    }

    /// The keys as a [`KeySource`](crate::auth::KeySource) for an in-process
    /// [`BearerAuthLayer`](crate::auth::BearerAuthLayer).
    pub fn key_source(&self) -> SigningKeys {
        self.inner.keys.clone()
    }

    /// The JWKS document of the signing keys.
    pub fn jwks(&self) -> serde_json::Value {
        self.inner.keys.jwks()
    }

    /// The client store.
    pub fn store(&self) -> &dyn ClientStore {
        &*self.inner.clients.store
    }

    /// The tokens revoked through [`revocation_service`](Self::revocation_service): hand it
    /// to [`BearerAuthBuilder::revoked_tokens`](crate::auth::BearerAuthBuilder::revoked_tokens)
    /// (the [`Gateway`](crate::gateway::Gateway) does) so that bearer layers refuse them.
    pub fn revoked_tokens(&self) -> &RevokedTokens {
        &self.inner.revoked
    }

    /// Revokes a client and every token it holds: the store's
    /// [`revoke`](ClientStore::revoke) (no new tokens), then the tokens issued to it so far
    /// are refused by every bearer layer following [`revoked_tokens`](Self::revoked_tokens)
    /// (and, with a [`revocation_log`](TokenEndpointBuilder::revocation_log), every replica's)
    /// until the last of them expires. Revoking the client in the store alone leaves its live
    /// tokens working until they expire.
    ///
    /// ```
    /// use tower_fhir::auth::VerifiedClaims;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryClientStore::new();
    /// store.register(NewClient::new("app").secret("app-secret-0123456789")).await.unwrap();
    /// let endpoint = TokenEndpoint::builder()
    ///     .issuer("https://gw.example")
    ///     .audience("fhir")
    ///     .store(store)
    ///     .build()
    ///     .unwrap();
    /// let now = std::time::SystemTime::now()
    ///     .duration_since(std::time::UNIX_EPOCH)
    ///     .unwrap()
    ///     .as_secs();
    /// let issued = serde_json::json!({"iss": "https://gw.example", "sub": "app",
    ///                                 "iat": now, "exp": now + 3600});
    /// let issued = VerifiedClaims::assume_verified(issued.as_object().unwrap().clone()).unwrap();
    ///
    /// endpoint.revoke_client("app").await.unwrap();
    /// assert!(endpoint.revoked_tokens().is_revoked(&issued));
    /// assert!(endpoint.store().client("app").await.unwrap().unwrap().revoked);
    /// # });
    /// ```
    pub async fn revoke_client(&self, id: &str) -> Result<(), StoreError> {
        let inner = &self.inner;
        // (Its token lifetime is what counts; its tenants are not read.)
        let Some(client) = inner.clients.store.client_for_tenant(id, None).await? else {
            return Err(StoreError::refused(format!("no client {id:?}")));
        };
        inner.clients.store.revoke(id).await?;
        let until = inner.revoked_until(&client);
        let issuer = Some(inner.issuer.as_str());
        // Every token issued up to `until`: a token request that passed its check before the
        // store's revoke may still be signed a moment later, or on a replica whose clock is
        // ahead; the client gets no token after, and its id is never registered again.
        inner.revoked.revoke_client(issuer, id, until, until);
        if let Some(log) = &inner.revocation_log {
            log.record_client(issuer, id, until, until)
                .await
                .map_err(|error| {
                    StoreError::new(format!(
                        "the client is revoked here, but its tokens' revocation could not be \
                         recorded in the revocation log (for restarts and other replicas): \
                         {error}"
                    ))
                })?;
        }
        Ok(())
    }

    /// Refuses every token issued to the client `id` so far and for the next two seconds (its
    /// `iat` at or before that cut-off), while the client stays registered and gets new tokens
    /// after it: for a secret reset (a token taken with the old secret stops working at once,
    /// not when it expires) or entitlements taken away (a token for a tenant no longer the
    /// client's). As with [`revoke_client`](Self::revoke_client), the tokens are refused by
    /// every bearer layer following [`revoked_tokens`](Self::revoked_tokens) and, with a
    /// [`revocation_log`](TokenEndpointBuilder::revocation_log), by every replica and after a
    /// restart, until the last of them expires. The margin covers a token request checked just
    /// before the change and signed just after it, and replicas' clocks a little apart. Until
    /// the cut-off has passed, a token the client asks for is refused, `503`
    /// (`temporarily_unavailable`) with `Retry-After` (three seconds at most): one issued then
    /// would be refused too, and the client proves itself again after it (with its new secret,
    /// after a reset). Fails when the client is unknown, or, after refusing the tokens here,
    /// when the log cannot record it for the other replicas.
    ///
    /// ```
    /// use tower_fhir::auth::VerifiedClaims;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient, TokenEndpoint};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryClientStore::new();
    /// store.register(NewClient::new("app").secret("app-secret-0123456789")).await.unwrap();
    /// let endpoint = TokenEndpoint::builder()
    ///     .issuer("https://gw.example")
    ///     .audience("fhir")
    ///     .store(store)
    ///     .build()
    ///     .unwrap();
    /// let now = std::time::SystemTime::now()
    ///     .duration_since(std::time::UNIX_EPOCH)
    ///     .unwrap()
    ///     .as_secs();
    /// let token = |iat: u64| {
    ///     let claims = serde_json::json!({"iss": "https://gw.example", "sub": "app",
    ///                                     "iat": iat, "exp": now + 3600});
    ///     VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap()
    /// };
    ///
    /// endpoint.revoke_tokens_of("app").await.unwrap();
    /// assert!(endpoint.revoked_tokens().is_revoked(&token(now)));
    /// assert!(!endpoint.revoked_tokens().is_revoked(&token(now + 4)), "a later token works");
    /// assert!(!endpoint.store().client("app").await.unwrap().unwrap().revoked);
    /// # });
    /// ```
    pub async fn revoke_tokens_of(&self, id: &str) -> Result<(), StoreError> {
        let inner = &self.inner;
        // (Its token lifetime is what counts; its tenants are not read.)
        let Some(client) = inner.clients.store.client_for_tenant(id, None).await? else {
            return Err(StoreError::refused(format!("no client {id:?}")));
        };
        let until = inner
            .revoked_until(&client)
            .saturating_add(CUT_OFF_MARGIN_SECS);
        let cut_off = unix_now().saturating_add(CUT_OFF_MARGIN_SECS);
        let issuer = Some(inner.issuer.as_str());
        inner.revoked.revoke_client(issuer, id, cut_off, until);
        if let Some(log) = &inner.revocation_log {
            log.record_client(issuer, id, cut_off, until)
                .await
                .map_err(|error| {
                    StoreError::new(format!(
                        "the client's tokens are refused here, but that could not be recorded \
                         in the revocation log (for restarts and other replicas): {error}"
                    ))
                })?;
        }
        Ok(())
    }

    /// Refuses, in this process, the tokens every client revoked so far may still hold
    /// (issued up to now): for a process starting over a persistent store with persistent
    /// signing keys, whose list of revoked tokens began empty. Revoked clients get no new
    /// tokens, so nothing they could use is lost. Returns how many clients it read; fails
    /// when the store cannot list them ([`ClientStore::revoked_clients`]).
    pub async fn refuse_revoked_clients(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let revoked = inner.clients.store.revoked_clients().await?;
        for client in &revoked {
            let until = inner.revoked_until(client);
            inner
                .revoked
                .revoke_client(Some(&inner.issuer), &client.id, until, until);
        }
        Ok(revoked.len())
    }

    /// The URL `private_key_jwt` assertions must name as their `aud`
    /// ([`token_url`](TokenEndpointBuilder::token_url)).
    pub fn token_url(&self) -> &str {
        self.inner
            .assertions
            .audiences()
            .first()
            .map_or("", String::as_str)
    }

    /// The `iss` of the tokens it issues.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The `aud` of the tokens it issues.
    pub fn audience(&self) -> &str {
        &self.inner.audience
    }
}

impl<B> Service<Request<B>> for TokenEndpoint
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
            let answered = inner.token(request).await;
            let result = match &answered {
                Ok(_) => "issued",
                Err(error) => error.code.as_str(),
            };
            metrics::counter!("tower_fhir_token_requests_total", "result" => result).increment(1);
            answered
        })
    }
}

/// The endpoint's answer: the response, or the RFC 6749 error as one.
pub(super) fn answer(
    handled: impl Future<Output = Result<Response<TokenResponseBody>, TokenError>> + Send + 'static,
) -> TokenFuture {
    Box::pin(async move { Ok(handled.await.unwrap_or_else(TokenError::into_response)) })
}

impl Inner {
    /// The client-credentials grant: a signed token for an authenticated client.
    async fn token<B>(&self, request: Request<B>) -> Result<Response<TokenResponseBody>, TokenError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The issuer of the token asked for, in the request's audit record.
        crate::ops::RequestFacts::set_issuer(&self.issuer);
        let (parts, form) =
            posted_form(request, "The token endpoint accepts POST only", self.body).await?;

        let grant = match (form.get("grant_type"), form.get("grant-type")) {
            (Some(a), Some(b)) if a != b => {
                return Err(TokenError::bad_request("grant_type is given twice"))
            }
            (Some(grant), _) | (None, Some(grant)) => grant.as_str(),
            (None, None) => return Err(TokenError::bad_request("grant_type is missing")),
        };
        if grant != "client_credentials" {
            return Err(TokenError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::UnsupportedGrantType,
                "Only grant_type=client_credentials is supported",
            ));
        }

        // The client is read with the one tenant asked for (or its only one) among its
        // tenants: a client of thousands costs what a client of one does.
        let named = super::scope::named_tenant(form.get("scope").map(String::as_str));
        let client = self
            .authenticate_client(&parts, &form, named, "token request")
            .await?;
        let (tenant, scopes) = grant_scope(
            &client,
            form.get("scope").map(String::as_str),
            self.scopeless_narrowing,
        )?;
        crate::ops::RequestFacts::set_tenant(tenant);
        let lifetime = client
            .token_lifetime_secs
            .unwrap_or(self.default_lifetime.as_secs());
        // Resource scopes a client registered without any asked for: marked, so that where
        // tokens without resource scopes are refused, these are too.
        let narrowed = self.scopeless_narrowing && super::scope::narrows(&client, &scopes);
        let mut scope = tenant.to_string();
        for extra in &scopes {
            scope.push(' ');
            scope.push_str(extra);
        }
        let now = self.issue_time(&client.id)?;
        let mut claims = json!({
            "iss": self.issuer,
            "sub": client.id,
            "client_id": client.id,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now.saturating_add(lifetime),
            "jti": jti(),
            "scope": scope,
        });
        if narrowed {
            claims[crate::smart::NARROWED_CLAIM] = json!(true);
        }
        let token = self.keys.sign_access_token(&claims).map_err(|err| {
            tracing::error!(error = %err, "could not sign a token");
            TokenError::server_error()
        })?;
        tracing::debug!(client_id = %super::LoggedId(&client.id), tenant = %tenant, "token issued");
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": scope,
            }),
        ))
    }
}

impl Inner {
    /// The second to issue a token to `client` at: now, unless its tokens were cut off at
    /// this second or later ([`TokenEndpoint::revoke_tokens_of`]), so that a token issued now
    /// would be refused with the ones before it: then `503` (`temporarily_unavailable`) with
    /// `Retry-After`, for the client to ask again once the cut-off has passed (and prove
    /// itself again then: its secret may have been reset this very second).
    fn issue_time(&self, client: &str) -> Result<u64, TokenError> {
        let now = unix_now();
        match self.revoked.client_revoked_at(Some(&self.issuer), client) {
            Some(cut_off) if cut_off >= now => {
                if cut_off - now > CUT_OFF_MARGIN_SECS + 1 {
                    // Not one this gateway sets (two seconds ahead): a replica's clock far
                    // ahead, or a row written by hand. The client is told to ask again in
                    // three seconds, and is refused until then.
                    tracing::warn!(
                        client,
                        seconds = cut_off - now,
                        "a client's tokens are cut off further ahead than any change sets: refused until then"
                    );
                }
                Err(TokenError::unavailable(
                "The client's tokens were refused moments ago (its secret reset or its entitlements changed); ask again after Retry-After",
            )
            .with_header(
                http::header::RETRY_AFTER,
                // The cut-off is two seconds after the change that set it; one further off
                // (a row written by hand, a replica's clock far ahead) is asked about again
                // in three seconds all the same, never told to wait for ages.
                HeaderValue::from((cut_off - now + 1).min(CUT_OFF_MARGIN_SECS + 1)),
            ))
            }
            _ => Ok(now),
        }
    }

    /// The client a form request (a token, introspection or revocation request) authenticates
    /// as, under the throttle, as the store has it after the check (the check takes a while:
    /// the client may have been revoked, rotated or given other tenants meanwhile), its
    /// tenants narrowed to `tenant`, the one the request is for
    /// ([`ClientStore::client_for_tenant`]). `doing` names the request in the log.
    pub(super) async fn authenticate_client(
        &self,
        parts: &http::request::Parts,
        form: &HashMap<String, String>,
        tenant: Option<TenantId>,
        doing: &'static str,
    ) -> Result<ClientRecord, TokenError> {
        let credentials = credentials(&parts.headers, form, &self.realm)?;
        let (id, secret, basic) = match &credentials {
            Credentials::Basic { id, secret } => (id.as_str(), secret.as_str(), true),
            Credentials::Post { id, secret } => (id.as_str(), secret.as_str(), false),
            Credentials::Assertion { id, assertion } => {
                return self
                    .authenticate_assertion(parts, id, assertion, tenant, doing)
                    .await;
            }
        };
        crate::ops::RequestFacts::set_client_id(id);
        let challenge = basic.then_some(&self.realm);
        let checked = self
            .clients
            .authenticate_throttled(id, secret, tenant, source(&parts.extensions), doing)
            .await
            .map_err(|denied| denied.into_error(challenge))?;
        match self.clients.recheck(&checked).await {
            Ok(Some(client)) => Ok(client),
            Ok(None) => {
                tracing::info!(client_id = %super::LoggedId(id), doing, "the client was revoked or its secret rotated during the check");
                Err(Denied::Failed.into_error(challenge))
            }
            Err(err) => {
                tracing::error!(error = %err, "client store failed");
                Err(TokenError::store_unavailable())
            }
        }
    }
}

impl Inner {
    /// The client a `private_key_jwt` assertion proves the request comes from, under the
    /// throttle (a failure counts as a wrong secret does), narrowed to `tenant` as
    /// [`authenticate_client`](Self::authenticate_client) reads it. Every failure is the same
    /// `401 invalid_client`; the log says why.
    async fn authenticate_assertion(
        &self,
        parts: &http::request::Parts,
        id: &str,
        assertion: &str,
        tenant: Option<TenantId>,
        doing: &'static str,
    ) -> Result<ClientRecord, TokenError> {
        crate::ops::RequestFacts::set_client_id(id);
        let from = source(&parts.extensions);
        let attempt = self
            .clients
            .admit(id, from)
            .await
            .map_err(|denied| denied.into_error(None))?;
        let record = match self.clients.store.client_for_tenant(id, tenant).await {
            Ok(record) => record,
            Err(err) => {
                tracing::error!(error = %err, "client store failed");
                return Err(TokenError::store_unavailable());
            }
        };
        let verdict = match record {
            Some(record) if record.revoked => Err("the client is revoked"),
            Some(record) if record.token_endpoint_auth_method != AuthMethod::PrivateKeyJwt => {
                Err("the client does not authenticate with private_key_jwt")
            }
            Some(record) => match self.assertions.verify(&record, assertion).await {
                Ok((jti, until)) => match &self.replay_guard {
                    None => Ok(record),
                    Some(guard) => match guard.first_use(id, &jti, until).await {
                        Ok(true) => Ok(record),
                        Ok(false) => {
                            Err("its jti was used before (at another replica, or before a restart)")
                        }
                        Err(error) => {
                            // Not used after all: the retry this answer asks for may bring the
                            // same assertion.
                            self.assertions.forget(id, &jti);
                            tracing::error!(client_id = %super::LoggedId(id), %error, "client assertion jtis cannot be checked across replicas or restarts");
                            return Err(TokenError::unavailable(
                                "Client assertions cannot be checked now; retry shortly",
                            ));
                        }
                    },
                },
                Err(why) => Err(why),
            },
            None => Err("no such client"),
        };
        match verdict {
            Ok(checked) => {
                self.clients.succeeded(attempt, id).await;
                // The verification may take a while (a `jwks_uri` fetched): the client as the
                // store has it now, refused if its keys were replaced or it was revoked
                // meanwhile (a token proved with a key just replaced must not be issued after
                // the cut-off). As for a secret rotated during its check, no failure counts.
                match self.clients.store.client_for_tenant(id, tenant).await {
                    Ok(Some(now))
                        if !now.revoked
                            && now.token_endpoint_auth_method
                                == checked.token_endpoint_auth_method
                            && now.jwks == checked.jwks
                            && now.jwks_uri == checked.jwks_uri =>
                    {
                        Ok(now)
                    }
                    Ok(_) => {
                        tracing::info!(client_id = %super::LoggedId(id), doing, "the client was revoked or its keys replaced during the check");
                        Err(TokenError::invalid_client(
                            "Client authentication failed",
                            None,
                        ))
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "client store failed");
                        Err(TokenError::store_unavailable())
                    }
                }
            }
            Err(why) => {
                let from = from.map(|ip| ip.to_canonical());
                tracing::info!(client_id = %super::LoggedId(id), from = ?from, reason = why, "{doing}: client assertion refused");
                if let Some(wait) = self.clients.failed(attempt, id).await {
                    tracing::warn!(client_id = %super::LoggedId(id), from = ?from, block = ?wait, "too many failed authentications from this address; refusing it for a while");
                }
                Err(TokenError::invalid_client(
                    "Client authentication failed",
                    None,
                ))
            }
        }
    }
}

/// The IP address the request came from, when the server put it in the extensions: the
/// forwarded client's behind a balancer, else the peer's ([`ForwardedClient::source`]).
pub(super) fn source(extensions: &http::Extensions) -> Option<std::net::IpAddr> {
    ForwardedClient::source(extensions)
}

fn jti() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The clients' rate limits, read from the endpoint's client store (see
/// [`crate::limit`]): what the gateway limits clients of its own tokens by.
impl crate::limit::ClientLimits for TokenEndpoint {
    fn client_limit(&self, client_id: &str) -> crate::limit::ClientLimitFuture {
        super::client::limit_of(self.store().client_for_tenant(client_id, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;
    use crate::token::{ClientSecret, InMemoryClientStore, Introspection, NewClient};
    use base64::engine::general_purpose::STANDARD;
    use http::{header, HeaderMap};
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    const B: &str = "9b2e7d4a-1c3f-4e5a-8b6c-7d8e9f0a1b2c";
    const FORM: &str = "application/x-www-form-urlencoded";

    async fn endpoint(client: NewClient) -> (TokenEndpoint, String) {
        let store = InMemoryClientStore::new();
        let secret = store.register(client).await.unwrap();
        let endpoint = TokenEndpoint::builder()
            .issuer("https://issuer.test")
            .audience("fhir")
            .store(store)
            .build()
            .unwrap();
        (endpoint, secret.expose().to_owned())
    }

    fn tenant(text: &str) -> TenantId {
        TenantId::parse(text).unwrap()
    }

    /// The defaults README.md and the setters' docs state, in the builder and in what the
    /// built endpoint runs with.
    #[test]
    fn documented_defaults() {
        const SECOND: Duration = Duration::from_secs(1);
        let builder = TokenEndpoint::builder();
        assert_eq!(builder.realm, "tower-fhir");
        assert_eq!(builder.default_lifetime, 60 * 60 * SECOND);
        assert_eq!(builder.max_body_bytes, 8 * 1024);
        assert_eq!(
            builder.throttle,
            ThrottlePolicy {
                max_failures: 5,
                window: 60 * SECOND,
                base_block: 30 * SECOND,
                max_block: 15 * 60 * SECOND,
            }
        );
        assert_eq!(crate::token::throttle::MAX_WAIT, 10 * SECOND);
        assert_eq!(
            crate::token::SecretHashing::default(),
            crate::token::SecretHashing::new(4096, 2).unwrap()
        );

        let endpoint = builder
            .issuer("https://issuer.test")
            .audience("fhir")
            .store(InMemoryClientStore::new())
            .build()
            .unwrap();
        let inner = &endpoint.inner;
        assert_eq!(inner.realm, "Basic realm=\"tower-fhir\"");
        assert_eq!(inner.default_lifetime, 60 * 60 * SECOND);
        assert_eq!(inner.body.max_bytes, 8 * 1024);
        assert_eq!(inner.body.timeout, Duration::from_secs(30));
        assert_eq!(
            endpoint.signing_keys().jwks()["keys"][0]["alg"],
            "ES256",
            "a generated ES256 key"
        );
    }

    async fn post(
        endpoint: &TokenEndpoint,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut request = Request::post("/token");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = endpoint.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap_or_default(),
        )
    }

    #[tokio::test]
    async fn issues_a_token_for_the_only_tenant_and_echoes_allowed_scopes() {
        let (endpoint, secret) = endpoint(
            NewClient::new("app")
                .tenant(tenant(A))
                .scope("system/*.read"),
        )
        .await;
        let body = format!(
            "grant_type=client_credentials&client_id=app&client_secret={secret}&scope=system/*.read"
        );
        let (status, headers, json) = post(&endpoint, &[("content-type", FORM)], &body).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(headers[header::PRAGMA], "no-cache");
        assert_eq!(json["token_type"], "Bearer");
        assert_eq!(json["expires_in"], 3600);
        assert_eq!(json["scope"], format!("{A} system/*.read"));

        let body = format!(
            "grant_type=client_credentials&client_id=app&client_secret={secret}&scope=patient/*.write"
        );
        let (status, _, json) = post(&endpoint, &[("content-type", FORM)], &body).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_scope"))
        );
    }

    /// A store that fails every whole read of a client: what reads clients only narrowed to a
    /// tenant ([`ClientStore::client_for_tenant`]) works over it.
    struct NarrowedReadsOnly(InMemoryClientStore);

    impl ClientStore for NarrowedReadsOnly {
        fn client(&self, id: &str) -> crate::token::StoreFuture<Option<ClientRecord>> {
            let refused = StoreError::new(format!("a whole read of {id:?}"));
            Box::pin(std::future::ready(Err(refused)))
        }
        fn client_for_tenant(
            &self,
            id: &str,
            tenant: Option<TenantId>,
        ) -> crate::token::StoreFuture<Option<ClientRecord>> {
            self.0.client_for_tenant(id, tenant)
        }
        fn register(&self, client: NewClient) -> crate::token::StoreFuture<ClientSecret> {
            self.0.register(client)
        }
        fn rotate_secret(
            &self,
            id: &str,
            grace: Duration,
        ) -> crate::token::StoreFuture<ClientSecret> {
            self.0.rotate_secret(id, grace)
        }
        fn revoke(&self, id: &str) -> crate::token::StoreFuture<()> {
            self.0.revoke(id)
        }
        fn set_entitlements(
            &self,
            id: &str,
            tenants: Vec<TenantId>,
            scopes: Vec<String>,
        ) -> crate::token::StoreFuture<()> {
            self.0.set_entitlements(id, tenants, scopes)
        }
    }

    /// A token request, introspection, revocation, the client's rate limit and a cut-off of
    /// its tokens read the client narrowed to the tenant they are about, never whole: for a
    /// client entitled to thousands of tenants they cost what they cost for a client of one.
    #[tokio::test]
    async fn requests_read_the_client_narrowed_to_their_tenant_never_whole() {
        use crate::limit::ClientLimits;
        let store = InMemoryClientStore::new();
        let secret = "a-secret-of-16-chars-or-more";
        let partner = NewClient::new("partner")
            .tenant(tenant(A))
            .tenant(tenant(B));
        store.register(partner.secret(secret)).await.unwrap();
        let clinic = NewClient::new("clinic").tenant(tenant(B)).secret(secret);
        store.register(clinic).await.unwrap();
        let endpoint = TokenEndpoint::builder()
            .issuer("https://issuer.test")
            .audience("fhir")
            .store(NarrowedReadsOnly(store))
            .build()
            .unwrap();
        let ask = |id: &str, scope: &str| {
            format!(
                "grant_type=client_credentials&client_id={id}&client_secret={secret}&scope={scope}"
            )
        };
        let other = "11111111-2222-4333-8444-555555555555";
        let mut tokens = Vec::new();
        for (id, scope, expected) in [
            ("partner", A, Ok(A)),
            ("partner", B, Ok(B)),
            (
                "partner",
                "",
                Err("The scope must name the tenant (the client has several)"),
            ),
            (
                "partner",
                other,
                Err("The client is not entitled to that tenant"),
            ),
            ("clinic", "", Ok(B)),
            (
                "clinic",
                A,
                Err("The client is not entitled to that tenant"),
            ),
        ] {
            let (status, _, json) =
                post(&endpoint, &[("content-type", FORM)], &ask(id, scope)).await;
            match expected {
                Ok(granted) => {
                    assert_eq!(
                        (status, json["scope"].as_str()),
                        (StatusCode::OK, Some(granted))
                    );
                    tokens.push((id, json["access_token"].as_str().unwrap().to_owned()));
                }
                Err(why) => assert_eq!(
                    (status, json["error_description"].as_str()),
                    (StatusCode::BAD_REQUEST, Some(why)),
                    "{id} {scope:?}"
                ),
            }
        }
        // Each client learns of the tokens for its tenants: the partner of all three, the
        // clinic of those for its one tenant only.
        let form = |service: Introspection, id: &str, token: &str| {
            let body = format!("client_id={id}&client_secret={secret}&token={token}");
            let request = Request::post("/introspect")
                .header("content-type", FORM)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            async move {
                let response = service.oneshot(request).await.unwrap();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["active"].clone()
            }
        };
        for (issued_to, token) in &tokens {
            let of_a = *issued_to == "partner" && tokens[0].1 == *token;
            let partner = form(endpoint.introspection_service(), "partner", token).await;
            let clinic = form(endpoint.introspection_service(), "clinic", token).await;
            assert_eq!(
                (partner, clinic),
                (json!(true), json!(!of_a)),
                "{issued_to}"
            );
        }
        let body = format!(
            "client_id=clinic&client_secret={secret}&token={}",
            tokens[2].1
        );
        let revoked = endpoint
            .revocation_service()
            .oneshot(
                Request::post("/revoke")
                    .header("content-type", FORM)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(revoked.status(), StatusCode::OK);
        assert_eq!(endpoint.client_limit("partner").await.unwrap(), None);
        endpoint.revoke_tokens_of("partner").await.unwrap();
    }

    #[tokio::test]
    async fn scope_rules() {
        let (endpoint, secret) =
            endpoint(NewClient::new("app").tenant(tenant(A)).tenant(tenant(B))).await;
        let ask = |scope: &str| {
            format!(
                "grant_type=client_credentials&client_id=app&client_secret={secret}&scope={scope}"
            )
        };
        let other = "11111111-2222-4333-8444-555555555555";
        for (scope, expected) in [
            (A.to_owned(), StatusCode::OK),
            (format!("{A}+{B}"), StatusCode::BAD_REQUEST),
            (other.to_owned(), StatusCode::BAD_REQUEST),
            (String::new(), StatusCode::BAD_REQUEST),
        ] {
            let (status, _, json) = post(&endpoint, &[("content-type", FORM)], &ask(&scope)).await;
            assert_eq!(status, expected, "scope {scope:?}: {json}");
            if status != StatusCode::OK {
                assert_eq!(json["error"], "invalid_scope");
            }
        }
    }

    #[tokio::test]
    async fn tokens_carry_every_claim_and_a_fresh_jti() {
        let client = NewClient::new("app")
            .tenant(tenant(A))
            .token_lifetime(Duration::from_secs(120));
        let (endpoint, secret) = endpoint(client).await;
        let body = format!("grant_type=client_credentials&client_id=app&client_secret={secret}");
        let mut jtis = Vec::new();
        for _ in 0..2 {
            let (status, _, json) = post(&endpoint, &[("content-type", FORM)], &body).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(json["expires_in"], 120);
            let token = json["access_token"].as_str().unwrap();
            let payload = token.split('.').nth(1).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(claims["iss"], "https://issuer.test");
            assert_eq!(claims["sub"], "app");
            assert_eq!(claims["aud"], "fhir");
            assert_eq!(claims["scope"], A);
            let iat = claims["iat"].as_u64().unwrap();
            assert_eq!(claims["nbf"].as_u64(), Some(iat));
            assert_eq!(claims["exp"].as_u64(), Some(iat + 120));
            jtis.push(claims["jti"].as_str().unwrap().to_owned());
        }
        assert_ne!(jtis[0], jtis[1]);
    }

    #[tokio::test]
    async fn a_token_asked_for_by_the_cut_off_second_is_asked_for_again_after_it() {
        let (endpoint, secret) = endpoint(NewClient::new("app").tenant(tenant(A))).await;
        let body = format!("grant_type=client_credentials&client_id=app&client_secret={secret}");
        let form = [("content-type", FORM)];
        let now = unix_now();
        let revoked = endpoint.revoked_tokens();
        // Cut off in the past: a token now comes after it.
        revoked.revoke_client(Some("https://issuer.test"), "app", now - 5, now + 60);
        assert_eq!(post(&endpoint, &form, &body).await.0, StatusCode::OK);
        // Another issuer's cut-off is not this endpoint's.
        revoked.revoke_client(Some("https://other.test"), "app", now + 9, now + 60);
        assert_eq!(post(&endpoint, &form, &body).await.0, StatusCode::OK);
        // Cut off at a second still to come (a replica whose clock is ahead): a token issued
        // now would be refused, so none is; the client asks again after Retry-After.
        revoked.revoke_client(Some("https://issuer.test"), "app", now + 3, now + 60);
        let (status, headers, json) = post(&endpoint, &form, &body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["error"], "temporarily_unavailable");
        let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert_eq!(wait, 3, "Retry-After {wait}");
        // One far off (a row written by hand): asked about again in three seconds all the same.
        revoked.revoke_client(
            Some("https://issuer.test"),
            "app",
            i64::MAX as u64,
            u64::MAX,
        );
        let (status, headers, _) = post(&endpoint, &form, &body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "3");
        // A wrong secret is still told as such, not asked to wait.
        let wrong =
            "grant_type=client_credentials&client_id=app&client_secret=wrong-secret-0123456789";
        assert_eq!(
            post(&endpoint, &form, wrong).await.0,
            StatusCode::UNAUTHORIZED
        );
    }

    #[tokio::test]
    async fn revoking_a_clients_tokens_keeps_the_client_and_is_told_to_the_log() {
        #[derive(Default)]
        struct Log(std::sync::Mutex<Vec<(String, u64, u64)>>);
        impl RevocationLog for Arc<Log> {
            fn record(
                &self,
                _: Option<&str>,
                _: &str,
                _: u64,
            ) -> futures::future::BoxFuture<'static, Result<(), String>> {
                Box::pin(std::future::ready(Ok(())))
            }
            fn record_client(
                &self,
                issuer: Option<&str>,
                client: &str,
                revoked_at: u64,
                until: u64,
            ) -> futures::future::BoxFuture<'static, Result<(), String>> {
                assert_eq!(issuer, Some("https://issuer.test"));
                self.0
                    .lock()
                    .unwrap()
                    .push((client.to_owned(), revoked_at, until));
                Box::pin(std::future::ready(Ok(())))
            }
        }
        let store = InMemoryClientStore::new();
        let secret = store
            .register(
                NewClient::new("app")
                    .tenant(tenant(A))
                    .token_lifetime(Duration::from_secs(120)),
            )
            .await
            .unwrap();
        let log = Arc::new(Log::default());
        let endpoint = TokenEndpoint::builder()
            .issuer("https://issuer.test")
            .audience("fhir")
            .store(store)
            .revocation_log(Arc::clone(&log))
            .build()
            .unwrap();
        let before = unix_now();
        endpoint.revoke_tokens_of("app").await.unwrap();
        let recorded = log.0.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1);
        let (client, cut_off, until) = &recorded[0];
        assert_eq!(client, "app");
        assert!(
            (before + 2..=before + 3).contains(cut_off),
            "{cut_off} {before}"
        );
        assert!(
            *until >= cut_off + 120,
            "kept until the last token cut off expires"
        );
        assert_eq!(
            endpoint
                .revoked_tokens()
                .client_revoked_at(Some("https://issuer.test"), "app"),
            Some(*cut_off)
        );
        assert!(
            !endpoint
                .store()
                .client("app")
                .await
                .unwrap()
                .unwrap()
                .revoked
        );
        // The client is not revoked: once the cut-off second is over, it gets tokens again.
        let body = format!(
            "grant_type=client_credentials&client_id=app&client_secret={}",
            secret.expose()
        );
        let after = Duration::from_secs((cut_off + 1).saturating_sub(unix_now()));
        tokio::time::sleep(after + Duration::from_millis(100)).await;
        assert_eq!(
            post(&endpoint, &[("content-type", FORM)], &body).await.0,
            StatusCode::OK
        );
        let unknown = endpoint.revoke_tokens_of("nobody").await.unwrap_err();
        assert!(unknown.is_refused(), "{unknown}");
    }

    #[tokio::test]
    async fn refusals() {
        let (endpoint, secret) = endpoint(NewClient::new("app").tenant(tenant(A))).await;
        let good = format!("grant_type=client_credentials&client_id=app&client_secret={secret}");
        let basic = format!("Basic {}", STANDARD.encode(format!("app:{secret}")));

        let (status, _, json) =
            post(&endpoint, &[("content-type", "application/json")], &good).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("invalid_request"))
        );
        let (status, _, _) = post(&endpoint, &[], &good).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, json) = post(
            &endpoint,
            &[("content-type", FORM)],
            &good.replace("client_credentials", "password"),
        )
        .await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
        );
        let (status, _, json) = post(
            &endpoint,
            &[("content-type", FORM), ("authorization", &basic)],
            &good,
        )
        .await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
        let (status, headers, json) = post(
            &endpoint,
            &[("content-type", FORM)],
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_client"))
        );
        assert!(headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic realm="));
        let (status, _, _) = post(
            &endpoint,
            &[("content-type", FORM)],
            &format!("{good}&scope=a&scope=b"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let big = format!("{good}&pad={}", "x".repeat(9000));
        let (status, _, _) = post(&endpoint, &[("content-type", FORM)], &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, _, _) = post(
            &endpoint,
            &[
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
                ("authorization", &basic),
            ],
            "grant-type=client_credentials",
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        let get = Request::get("/token")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = endpoint.oneshot(get).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "POST");
    }

    #[tokio::test]
    async fn rejects_bad_configuration() {
        assert_eq!(
            TokenEndpoint::builder()
                .issuer("i")
                .audience("a")
                .build()
                .unwrap_err(),
            ConfigError::MissingStore
        );
        let err = TokenEndpoint::builder()
            .issuer("i")
            .audience("a")
            .store(InMemoryClientStore::new())
            .realm("a\"b")
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::InvalidRealm);
        let err = TokenEndpoint::builder()
            .issuer("i")
            .audience("a")
            .store(InMemoryClientStore::new())
            .hashing_concurrency(0)
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::Zero("the hashing concurrency"));
    }
}
