//! The token endpoint service: RFC 6749 §4.4 client credentials.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use rand::RngCore;
use serde_json::json;
use tower_service::Service;

use super::client::{self, unix_now, ClientRecord, ClientSecret, ClientStore, StoreError};
use super::error::{json_response, ErrorCode, TokenError, TokenResponseBody};
use super::signing::SigningKeys;
use super::throttle::{Attempt, Refusal, Throttle, ThrottlePolicy};
use crate::tenant::TenantId;

/// The future a [`TokenEndpoint`] returns.
pub type TokenFuture =
    Pin<Box<dyn Future<Output = Result<Response<TokenResponseBody>, Infallible>> + Send>>;

/// The OAuth 2.0 client-credentials token endpoint, as a Tower service.
///
/// Mount it at the token URL; see the [module docs](super) for the protocol and an example.
/// Clones share the configuration, the client store, the keys and the failure counters.
#[derive(Clone)]
pub struct TokenEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    audience: String,
    realm: HeaderValue,
    default_lifetime: Duration,
    max_body_bytes: usize,
    store: Box<dyn ClientStore>,
    keys: SigningKeys,
    throttle: Arc<Throttle>,
    dummy_hash: OnceLock<String>,
}

impl fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("default_lifetime", &self.inner.default_lifetime)
            .field("max_body_bytes", &self.inner.max_body_bytes)
            .field("keys", &self.inner.keys)
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
    store: Option<Box<dyn ClientStore>>,
    keys: Option<SigningKeys>,
    throttle: ThrottlePolicy,
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
        if self.realm.contains('"') {
            return Err(ConfigError::InvalidRealm);
        }
        let realm = HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm))
            .map_err(|_| ConfigError::InvalidRealm)?;
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
                max_body_bytes: self.max_body_bytes,
                store,
                keys,
                throttle: Arc::new(Throttle::new(self.throttle)),
                dummy_hash: OnceLock::new(),
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
            store: None,
            keys: None,
            throttle: ThrottlePolicy::default(),
        }
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
        &*self.inner.store
    }

    /// The `iss` of the tokens it issues.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The `aud` of the tokens it issues.
    pub fn audience(&self) -> &str {
        &self.inner.audience
    }

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
    /// secret; the old one keeps working for `grace`. Failures count toward the throttle.
    pub async fn rotate_own_secret(
        &self,
        client_id: &str,
        current_secret: &str,
        grace: Duration,
    ) -> Result<ClientSecret, StoreError> {
        match self
            .inner
            .authenticate_throttled(client_id, current_secret, "secret rotation")
            .await
        {
            Ok(_) => self.inner.store.rotate_secret(client_id, grace).await,
            Err(Denied::Blocked(_) | Denied::Failed) => {
                Err(StoreError::refused("client authentication failed"))
            }
            Err(Denied::Busy) => Err(StoreError::new(
                "other authentications of this client are still being checked; retry shortly",
            )),
            Err(Denied::StoreFailed(err)) => Err(err),
        }
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
        answer(async move { inner.token(request).await })
    }
}

/// The endpoint's answer: the response, or the RFC 6749 error as one.
fn answer(
    handled: impl Future<Output = Result<Response<TokenResponseBody>, TokenError>> + Send + 'static,
) -> TokenFuture {
    Box::pin(async move { Ok(handled.await.unwrap_or_else(TokenError::into_response)) })
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

/// How the client authenticated.
enum Credentials {
    Basic { id: String, secret: String },
    Post { id: String, secret: String },
}

/// Why a throttled authentication gave no client.
enum Denied {
    /// The id is blocked for this long.
    Blocked(Duration),
    /// Other checks of the id took too long to make room; nothing failed.
    Busy,
    /// The secret is wrong (or the client unknown or revoked).
    Failed,
    /// The store failed (logged).
    StoreFailed(StoreError),
}

impl Inner {
    async fn token<B>(&self, request: Request<B>) -> Result<Response<TokenResponseBody>, TokenError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if request.method() != Method::POST {
            return Err(TokenError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidRequest,
                "The token endpoint accepts POST only",
            )
            .with_header(header::ALLOW, HeaderValue::from_static("POST")));
        }
        check_content_type(request.headers())?;
        let (parts, body) = request.into_parts();
        let form = self.read_form(&parts.headers, body).await?;

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

        let credentials = self.credentials(&parts.headers, &form)?;
        let (id, secret, basic) = match &credentials {
            Credentials::Basic { id, secret } => (id.as_str(), secret.as_str(), true),
            Credentials::Post { id, secret } => (id.as_str(), secret.as_str(), false),
        };
        let client = match self
            .authenticate_throttled(id, secret, "token request")
            .await
        {
            Ok(client) => client,
            Err(Denied::Blocked(wait)) => return Err(too_many(wait)),
            Err(Denied::Busy) => return Err(busy()),
            Err(Denied::Failed) => {
                return Err(self.invalid_client(basic, "Client authentication failed"))
            }
            Err(Denied::StoreFailed(_)) => return Err(TokenError::server_error()),
        };

        let (tenant, scopes) = grant_scope(&client, form.get("scope").map(String::as_str))?;
        let lifetime = client
            .token_lifetime_secs
            .unwrap_or(self.default_lifetime.as_secs());
        let mut scope = tenant.to_string();
        for extra in &scopes {
            scope.push(' ');
            scope.push_str(extra);
        }
        let now = unix_now();
        let claims = json!({
            "iss": self.issuer,
            "sub": client.id,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": jti(),
            "scope": scope,
        });
        let token = self.keys.sign(&claims).map_err(|err| {
            tracing::error!(error = %err, "could not sign a token");
            TokenError::server_error()
        })?;
        tracing::debug!(client_id = %client.id, tenant = %tenant, "token issued");
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

    async fn rotate_own<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<TokenResponseBody>, TokenError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if request.method() != Method::POST {
            return Err(TokenError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidRequest,
                "Secret rotation accepts POST only",
            )
            .with_header(header::ALLOW, HeaderValue::from_static("POST")));
        }
        let path_id = client_id_in_path(request.uri().path())
            .ok_or_else(|| TokenError::bad_request("The path does not name a client"))?;
        let (parts, body) = request.into_parts();
        // A Basic-authenticated rotation may come without a body.
        let form = if parts.headers.contains_key(header::CONTENT_TYPE) {
            check_content_type(&parts.headers)?;
            self.read_form(&parts.headers, body).await?
        } else {
            HashMap::new()
        };
        let mut form = form;
        // The path names the client when the form does not.
        form.entry("client_id".to_owned())
            .or_insert(path_id.clone());
        let (id, secret, basic) = match self.credentials(&parts.headers, &form)? {
            Credentials::Basic { id, secret } => (id, secret, true),
            Credentials::Post { id, secret } => (id, secret, false),
        };
        if id != path_id {
            return Err(TokenError::bad_request(
                "client_id does not match the client in the path",
            ));
        }
        match self
            .authenticate_throttled(&id, &secret, "secret rotation")
            .await
        {
            Ok(_) => {}
            Err(Denied::Blocked(wait)) => return Err(too_many(wait)),
            Err(Denied::Busy) => return Err(busy()),
            Err(Denied::Failed) => {
                return Err(self.invalid_client(basic, "Client authentication failed"))
            }
            Err(Denied::StoreFailed(_)) => return Err(TokenError::server_error()),
        }
        let new_secret = self
            .store
            .rotate_secret(&id, Duration::ZERO)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "could not rotate a client secret");
                TokenError::server_error()
            })?;
        tracing::info!(client_id = %id, "client rotated its secret");
        Ok(json_response(
            StatusCode::OK,
            &json!({"client_id": id, "client_secret": new_secret.expose()}),
        ))
    }

    async fn read_form<B>(
        &self,
        headers: &HeaderMap,
        body: B,
    ) -> Result<HashMap<String, String>, TokenError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let too_large = || {
            TokenError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::InvalidRequest,
                "The request body is too large",
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let bytes = match Limited::new(body, self.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(_) => {
                return Err(TokenError::bad_request(
                    "The request body could not be read",
                ))
            }
        };
        let mut form = HashMap::new();
        for (name, value) in form_urlencoded::parse(&bytes) {
            // RFC 6749 §3.2: parameters must not be repeated.
            if form.insert(name.into_owned(), value.into_owned()).is_some() {
                return Err(TokenError::bad_request("A parameter is repeated"));
            }
        }
        Ok(form)
    }

    fn credentials(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Result<Credentials, TokenError> {
        let credentials = self.given_credentials(headers, form)?;
        let (Credentials::Basic { id, .. } | Credentials::Post { id, .. }) = &credentials;
        // Checked before it is looked up, counted or logged: no control characters (forged
        // log lines) and no 8 KB ids (a throttle entry each).
        if !client::is_client_id(id) {
            return Err(TokenError::bad_request(
                "The client_id is not a valid client identifier",
            ));
        }
        Ok(credentials)
    }

    fn given_credentials(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Result<Credentials, TokenError> {
        let form_secret = form.get("client_secret");
        let form_id = form.get("client_id");
        match headers.get(header::AUTHORIZATION) {
            Some(value) => {
                if form_secret.is_some() {
                    return Err(TokenError::bad_request(
                        "Use one client authentication method, not both",
                    ));
                }
                let (id, secret) = parse_basic(value)
                    .ok_or_else(|| self.invalid_client(true, "Malformed Basic authentication"))?;
                if form_id.is_some_and(|form_id| *form_id != id) {
                    return Err(TokenError::bad_request(
                        "client_id does not match the authenticated client",
                    ));
                }
                Ok(Credentials::Basic { id, secret })
            }
            None => match (form_id, form_secret) {
                (Some(id), Some(secret)) => Ok(Credentials::Post {
                    id: id.clone(),
                    secret: secret.clone(),
                }),
                _ => Err(self.invalid_client(true, "Client authentication is missing")),
            },
        }
    }

    fn invalid_client(&self, basic: bool, description: &'static str) -> TokenError {
        let error = TokenError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidClient,
            description,
        );
        if basic {
            error.with_header(header::WWW_AUTHENTICATE, self.realm.clone())
        } else {
            error
        }
    }

    /// [`authenticate`](Self::authenticate) under the throttle: refused while the id is
    /// blocked, waiting while parallel checks of it could use up its allowance, a wrong secret
    /// counted. `doing` names the request in the log.
    async fn authenticate_throttled(
        &self,
        id: &str,
        secret: &str,
        doing: &'static str,
    ) -> Result<ClientRecord, Denied> {
        let attempt = self
            .throttle
            .admit(id)
            .await
            .map_err(|refusal| match refusal {
                Refusal::Blocked(wait) => Denied::Blocked(wait),
                Refusal::Busy => Denied::Busy,
            })?;
        match self.authenticate(id, secret, attempt).await {
            Ok((Some(client), attempt)) => {
                attempt.succeeded();
                Ok(client)
            }
            Ok((None, attempt)) => {
                tracing::info!(client_id = %id, "{doing}: client authentication failed");
                if let Some(wait) = attempt.failed() {
                    tracing::warn!(client_id = %id, block = ?wait, "too many failed authentications; refusing for a while");
                }
                Err(Denied::Failed)
            }
            Err(err) => {
                tracing::error!(error = %err, "client store failed");
                Err(Denied::StoreFailed(err))
            }
        }
    }

    /// The client, if the secret is one of its live ones, and the `attempt` back. Unknown and
    /// revoked clients are checked against a dummy hash, so every failure costs the same Argon2
    /// work. The attempt goes along into the hashing and is dropped with it if this future is
    /// (a client that hangs up cannot free its place while its hash still runs).
    async fn authenticate(
        &self,
        id: &str,
        secret: &str,
        attempt: Attempt,
    ) -> Result<(Option<ClientRecord>, Attempt), StoreError> {
        let record = self.store.client(id).await?;
        let now = unix_now();
        let mut hashes: Vec<String> = record
            .as_ref()
            .filter(|r| !r.revoked)
            .map(|r| r.live_secrets(now).map(|h| h.phc.clone()).collect())
            .unwrap_or_default();
        let known = !hashes.is_empty();
        if !known {
            hashes.push(self.dummy_hash()?);
        }
        let secret = secret.to_owned();
        let (matched, attempt) = client::blocking(move || {
            // Check every hash so the time does not tell which one matched.
            let matched = hashes
                .iter()
                .fold(false, |ok, phc| client::verify(&secret, phc) | ok);
            Ok((matched, attempt))
        })
        .await?;
        Ok((record.filter(|_| known && matched), attempt))
    }

    fn dummy_hash(&self) -> Result<String, StoreError> {
        if let Some(hash) = self.dummy_hash.get() {
            return Ok(hash.clone());
        }
        let hash = self.store.hashing().hash(client::new_secret().expose())?;
        Ok(self.dummy_hash.get_or_init(|| hash).clone())
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), TokenError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(TokenError::bad_request(
            "Content-Type application/x-www-form-urlencoded is required",
        ));
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(TokenError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::InvalidRequest,
            "Content-Type must be application/x-www-form-urlencoded",
        ))
    }
}

/// `Authorization: Basic` with the id and secret form-urlencoded first (RFC 6749 §2.3.1).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let id = form_decode(id)?;
    (!id.is_empty()).then_some((id, form_decode(secret)?))
}

/// Decodes one application/x-www-form-urlencoded value. Not `form_urlencoded::parse`: that
/// would split a value containing `&` or `=`.
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The tenant and the extra scopes granted for the requested `scope`.
fn grant_scope(
    client: &ClientRecord,
    requested: Option<&str>,
) -> Result<(TenantId, Vec<String>), TokenError> {
    let mut tenants = Vec::new();
    let mut extras: Vec<String> = Vec::new();
    for value in requested.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
        match TenantId::parse(value) {
            Ok(tenant) => {
                if !tenants.contains(&tenant) {
                    tenants.push(tenant);
                }
            }
            Err(_) => {
                if !client.scopes.iter().any(|allowed| allowed == value) {
                    return Err(TokenError::invalid_scope(
                        "The scope asks for something the client may not have",
                    ));
                }
                if !extras.iter().any(|e| e == value) {
                    extras.push(value.to_owned());
                }
            }
        }
    }
    let tenant = match tenants.as_slice() {
        [tenant] => *tenant,
        [] if client.tenants.len() == 1 => client.tenants[0],
        [] => {
            return Err(TokenError::invalid_scope(
                "The scope must name the tenant (the client has several)",
            ))
        }
        _ => {
            return Err(TokenError::invalid_scope(
                "The scope names more than one tenant",
            ))
        }
    };
    if !client.tenants.contains(&tenant) {
        return Err(TokenError::invalid_scope(
            "The client is not entitled to that tenant",
        ));
    }
    Ok((tenant, extras))
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

fn too_many(wait: Duration) -> TokenError {
    // Round up so a client waiting `Retry-After` seconds is never refused again.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    TokenError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TemporarilyUnavailable,
        "Too many failed authentications for this client; retry later",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))
}

fn busy() -> TokenError {
    TokenError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TemporarilyUnavailable,
        "Other authentications of this client are still being checked; retry shortly",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

fn jti() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{InMemoryClientStore, NewClient};
    use http_body_util::Full;
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

    #[test]
    fn basic_credentials_are_form_decoded() {
        let raw = format!("Basic {}", STANDARD.encode("my%3Aapp:s%2Bcret+x%26y"));
        let parsed = parse_basic(&HeaderValue::from_str(&raw).unwrap()).unwrap();
        assert_eq!(parsed, ("my:app".to_owned(), "s+cret x&y".to_owned()));
        assert!(parse_basic(&HeaderValue::from_static("Bearer abc")).is_none());
        assert!(parse_basic(&HeaderValue::from_static("Basic !!!")).is_none());
        assert_eq!(form_decode("%zz"), None);
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
    }
}
