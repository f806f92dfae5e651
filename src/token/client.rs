//! Registered clients, their hashed secrets, and the [`ClientStore`] trait.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::rand_core::OsRng as SaltRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::limit::{ClientLimitFuture, ClientLimits, RateLimit};
use crate::tenant::TenantId;

/// The cost of the Argon2id hashes client secrets are stored as.
///
/// The default is Argon2id with 4 MiB of memory, 2 passes, 1 lane. Secrets are 32 random bytes
/// minted by the store (never chosen by a person), so no amount of hashing cost changes how
/// guessable they are; the slow, salted hash keeps a leaked store file from revealing them
/// while keeping issuance at a few hundred tokens a second per core. Raise it with
/// [`SecretHashing::new`]; existing hashes keep the cost they were made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretHashing {
    memory_kib: u32,
    iterations: u32,
}

impl Default for SecretHashing {
    fn default() -> Self {
        Self {
            memory_kib: 4096,
            iterations: 2,
        }
    }
}

impl SecretHashing {
    /// Argon2id with this much memory (KiB, at least 8) and passes (at least 1).
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, StoreError> {
        Params::new(memory_kib, iterations, 1, None)
            .map_err(|e| StoreError::new(format!("argon2 parameters: {e}")))?;
        Ok(Self {
            memory_kib,
            iterations,
        })
    }

    fn argon2(&self) -> Argon2<'static> {
        let params = Params::new(self.memory_kib, self.iterations, 1, None)
            .unwrap_or_else(|_| Params::default());
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
    }

    /// A PHC string of the secret, with a fresh salt.
    pub fn hash(&self, secret: &str) -> Result<String, StoreError> {
        let salt = SaltString::generate(&mut SaltRng);
        self.argon2()
            .hash_password(secret.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| StoreError::new(format!("hashing a secret: {e}")))
    }
}

/// Whether `secret` matches the PHC string (Argon2 compares in constant time).
pub(crate) fn verify(secret: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(secret.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// A new high-entropy secret: 32 random bytes, base64url without padding.
pub(crate) fn new_secret() -> ClientSecret {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    ClientSecret(URL_SAFE_NO_PAD.encode(bytes))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A client secret in clear, as handed out once at registration or rotation.
///
/// Its `Debug` output is redacted; read it with [`expose`](ClientSecret::expose). A client
/// registered to authenticate with `private_key_jwt` has no secret: registering it returns an
/// empty one ([`is_empty`](ClientSecret::is_empty)), which authenticates nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(String);

impl ClientSecret {
    /// The secret, to hand to the client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether there is no secret (a `private_key_jwt` client's registration).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A `private_key_jwt` client's public keys: a JWK Set, or where it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKeys {
    /// The keys themselves (a JWK Set).
    Jwks(serde_json::Value),
    /// The URL the client publishes them at.
    JwksUri(String),
}

impl ClientKeys {
    /// Refuses keys that could never verify an assertion, as
    /// [`ClientStore::set_keys`] would (a JWK Set without a usable public signing key or with
    /// a symmetric one, a `jwks_uri` that is not `https://` or loopback `http://`): to check a
    /// change whole before writing any of it.
    ///
    /// # Errors
    ///
    /// Why the keys are refused.
    pub fn check(&self, client_id: &str) -> Result<(), StoreError> {
        let mut check = NewClient::new(client_id);
        match self {
            Self::Jwks(jwks) => check.jwks = Some(jwks.clone()),
            Self::JwksUri(uri) => check.jwks_uri = Some(uri.clone()),
        }
        check_keys(&check)
    }
}

/// A change to a registered client, written whole or not at all by
/// [`ClientStore::update`]: its tenants and scopes, and optionally its keys and rate limit.
///
/// ```
/// use tower_fhir::limit::RateLimit;
/// use tower_fhir::tenant::TenantId;
/// use tower_fhir::token::{ClientKeys, ClientStore, ClientUpdate, InMemoryClientStore, NewClient};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
/// let store = InMemoryClientStore::new();
/// store.register(NewClient::new("app-1").tenant(tenant)).await.unwrap();
/// let limit = RateLimit::new(10, 20).unwrap();
///
/// let update = ClientUpdate::new(vec![tenant], vec!["system/*.read".into()]).rate_limit(Some(limit));
/// store.update("app-1", update).await.unwrap();
/// let record = store.client("app-1").await.unwrap().unwrap();
/// assert_eq!((record.scopes.as_slice(), record.rate_limit), (["system/*.read".to_owned()].as_slice(), Some(limit)));
///
/// // Keys for a client that authenticates with a secret: refused, and nothing else changed.
/// let keys = ClientKeys::JwksUri("https://app.example/jwks".into());
/// let refused = ClientUpdate::new(vec![], vec![]).keys(keys).rate_limit(None);
/// assert!(store.update("app-1", refused).await.is_err());
/// let record = store.client("app-1").await.unwrap().unwrap();
/// assert_eq!((record.tenants, record.rate_limit), (vec![tenant], Some(limit)));
///
/// // A change decided on the client as read is not made over one made since.
/// let read = store.client("app-1").await.unwrap().unwrap();
/// store.update("app-1", ClientUpdate::new(vec![], vec![])).await.unwrap();
/// let stale = ClientUpdate::new(vec![tenant], vec![]).if_unchanged(&read);
/// assert!(store.update("app-1", stale).await.unwrap_err().is_conflict());
/// let now = store.client("app-1").await.unwrap().unwrap();
/// assert!(now.tenants.is_empty());
/// let fresh = ClientUpdate::new(vec![tenant], vec![]).if_unchanged(&now);
/// store.update("app-1", fresh).await.unwrap();
/// # });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct ClientUpdate {
    tenants: Vec<TenantId>,
    scopes: Vec<String>,
    keys: Option<ClientKeys>,
    rate_limit: Option<Option<RateLimit>>,
    /// The client as the caller read it, when the change is made only if it is still so.
    read: Option<Entitlements>,
}

/// What [`ClientUpdate::if_unchanged`] compares: what a client may get tokens for, and with
/// what keys.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entitlements {
    tenants: Vec<TenantId>,
    scopes: Vec<String>,
    revoked: bool,
    token_endpoint_auth_method: AuthMethod,
    jwks: Option<serde_json::Value>,
    jwks_uri: Option<String>,
}

/// The conflict of a change made [`if_unchanged`](ClientUpdate::if_unchanged).
fn changed_since_read(id: &str) -> StoreError {
    StoreError::conflict(format!("client {id:?} was changed since it was read"))
}

impl Entitlements {
    fn of(record: &ClientRecord) -> Self {
        Self {
            tenants: record.tenants.clone(),
            scopes: record.scopes.clone(),
            revoked: record.revoked,
            token_endpoint_auth_method: record.token_endpoint_auth_method,
            jwks: record.jwks.clone(),
            jwks_uri: record.jwks_uri.clone(),
        }
    }

    /// Whether `record` has the same ones (the same tenants and scopes in any order).
    fn matches(&self, record: &ClientRecord) -> bool {
        // (Sets, not a search of one list for each of the other's: a client of 50,000
        // tenants took seconds, under the store's lock.)
        fn same_set<T: Eq + std::hash::Hash>(a: &[T], b: &[T]) -> bool {
            use std::collections::HashSet;
            a.iter().collect::<HashSet<&T>>() == b.iter().collect::<HashSet<&T>>()
        }
        same_set(&self.tenants, &record.tenants)
            && same_set(&self.scopes, &record.scopes)
            && self.revoked == record.revoked
            && self.token_endpoint_auth_method == record.token_endpoint_auth_method
            && self.jwks == record.jwks
            && self.jwks_uri == record.jwks_uri
    }
}

impl ClientUpdate {
    /// Replaces the client's tenants and scopes (as
    /// [`set_entitlements`](ClientStore::set_entitlements) does), leaving its keys and rate
    /// limit as they are unless [`keys`](Self::keys) or [`rate_limit`](Self::rate_limit) say.
    pub fn new(tenants: Vec<TenantId>, scopes: Vec<String>) -> Self {
        Self {
            tenants,
            scopes,
            keys: None,
            rate_limit: None,
            read: None,
        }
    }

    /// Makes the change only if the client's tenants, scopes, keys, authentication method and
    /// revocation are still those of `read` (the record the caller decided the change on): otherwise the store
    /// answers a [conflict](StoreError::is_conflict) and changes nothing. For a caller whose
    /// decision depends on what the client had: one that refuses the client's tokens when the
    /// change takes a tenant or a scope away, say, must not write over a tenant another
    /// request granted meanwhile, whose tokens it never refused. Tenants and scopes compare
    /// as sets; the secrets and the rate limit are not compared.
    ///
    /// The crate's stores compare and write under one lock (one transaction, the client's row
    /// locked, in PostgreSQL). A store of your own does so by overriding
    /// [`ClientStore::update`] with [`apply`](Self::apply); the trait's default, which cannot,
    /// fails such a change rather than make it unchecked.
    pub fn if_unchanged(mut self, read: &ClientRecord) -> Self {
        self.read = Some(Entitlements::of(read));
        self
    }

    /// Also replaces a `private_key_jwt` client's keys (as [`set_keys`](ClientStore::set_keys)).
    pub fn keys(mut self, keys: ClientKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Also sets (or, with `None`, removes) the client's rate limit (as
    /// [`set_rate_limit`](ClientStore::set_rate_limit)).
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Refuses what the crate's stores' [`ClientStore::update`] refuses of this change to
    /// `client` as it is: scopes no request could name, keys that could never verify an
    /// assertion, keys for a client that authenticates with a secret, a revoked client; and,
    /// made [`if_unchanged`](Self::if_unchanged), a client no longer as read (a
    /// [conflict](StoreError::is_conflict)). To check a change before acting on it (refusing
    /// the client's tokens, say); the store checks it again (a store of your own may refuse
    /// more).
    ///
    /// # Errors
    ///
    /// Why the change is refused, or the conflict.
    pub fn check(&self, client: &ClientRecord) -> Result<(), StoreError> {
        let id = client.id.as_str();
        if self.read.as_ref().is_some_and(|read| !read.matches(client)) {
            return Err(changed_since_read(id));
        }
        if client.revoked {
            return Err(StoreError::refused(format!("no active client {id:?}")));
        }
        check_scopes(id, &self.scopes)?;
        if let Some(keys) = &self.keys {
            if client.token_endpoint_auth_method != AuthMethod::PrivateKeyJwt {
                return Err(StoreError::refused(format!(
                    "client {id:?} authenticates with a secret, not with keys"
                )));
            }
            keys.check(id)?;
        }
        Ok(())
    }

    /// Applies the change to `record` (the client as a store holds it) as the crate's stores
    /// do: whole or, refused (or a [conflict](StoreError::is_conflict) when made
    /// [`if_unchanged`](Self::if_unchanged)), not at all. For a store of your own, in its
    /// [`update`](ClientStore::update): read the client, apply, write it back, under one lock
    /// or transaction.
    ///
    /// # Errors
    ///
    /// Why the change is refused, or the conflict; `record` is then as it was.
    pub fn apply(self, record: &mut ClientRecord) -> Result<(), StoreError> {
        let mut clients = Clients::default();
        clients.clients.insert(record.id.clone(), record.clone());
        clients.update(&record.id, self)?;
        if let Some(changed) = clients.clients.remove(&record.id) {
            *record = changed;
        }
        Ok(())
    }
}

/// How a client authenticates at the token endpoint (and at introspection and revocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMethod {
    /// With its secret, by HTTP Basic or in the form (`client_secret_basic`,
    /// `client_secret_post`).
    #[default]
    #[serde(rename = "client_secret_basic", alias = "client_secret_post")]
    ClientSecret,
    /// With a JWT signed by its private key (`private_key_jwt`, RFC 7523, SMART Backend
    /// Services), verified with its registered `jwks` or `jwks_uri`. It has no secret.
    #[serde(rename = "private_key_jwt")]
    PrivateKeyJwt,
}

impl AuthMethod {
    /// The method's name in `token_endpoint_auth_method`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecret => "client_secret_basic",
            Self::PrivateKeyJwt => "private_key_jwt",
        }
    }

    fn is_secret(&self) -> bool {
        *self == Self::ClientSecret
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

/// One stored secret hash; during a rotation's grace period a client has two.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash {
    /// The Argon2id PHC string.
    pub phc: String,
    /// Unix time (seconds) after which the secret no longer works; `None`: until rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl SecretHash {
    /// Whether the secret still works at `now` (Unix seconds).
    pub fn is_live(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretHash")
            .field("phc", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A registered client as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The `client_id`.
    pub id: String,
    /// The hashes of the secrets that work (more than one only during a grace period).
    pub secrets: Vec<SecretHash>,
    /// The tenants the client may get tokens for.
    pub tenants: Vec<TenantId>,
    /// Scopes besides the tenant the client may ask for (default none).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The token lifetime for this client, in seconds; `None`: the endpoint's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_lifetime_secs: Option<u64>,
    /// A revoked client gets no new tokens.
    #[serde(default)]
    pub revoked: bool,
    /// The client's rate limit across all its tenants (see [`crate::limit`]); `None`:
    /// unlimited. Records written without one read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// How the client authenticates; records written without it use their secret.
    #[serde(default, skip_serializing_if = "AuthMethod::is_secret")]
    pub token_endpoint_auth_method: AuthMethod,
    /// A `private_key_jwt` client's public keys, as a JWK Set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// Where a `private_key_jwt` client publishes its public keys (fetched and cached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
}

impl ClientRecord {
    /// The hashes still live at `now` (Unix seconds).
    pub fn live_secrets(&self, now: u64) -> impl Iterator<Item = &SecretHash> {
        self.secrets.iter().filter(move |s| s.is_live(now))
    }

    /// This record as [`ClientStore::client_for_tenant`] gives it for `tenant`: everything
    /// but its tenants copied, its tenants narrowed (one look through them, no copy of the
    /// list).
    pub(crate) fn narrowed(&self, tenant: Option<TenantId>) -> Self {
        Self {
            id: self.id.clone(),
            secrets: self.secrets.clone(),
            tenants: narrowed_tenants(&self.tenants, tenant),
            scopes: self.scopes.clone(),
            token_lifetime_secs: self.token_lifetime_secs,
            revoked: self.revoked,
            rate_limit: self.rate_limit,
            token_endpoint_auth_method: self.token_endpoint_auth_method,
            jwks: self.jwks.clone(),
            jwks_uri: self.jwks_uri.clone(),
        }
    }
}

/// What [`ClientStore::client_for_tenant`] keeps of a client's `tenants` for a request for
/// `tenant`: that tenant if it is among them; for `None`, the only one if they are one tenant
/// (a record written by hand may name it twice). Nothing otherwise.
pub(crate) fn narrowed_tenants(tenants: &[TenantId], tenant: Option<TenantId>) -> Vec<TenantId> {
    match (tenant, tenants) {
        (Some(tenant), _) if tenants.contains(&tenant) => vec![tenant],
        (None, [only, rest @ ..]) if rest.iter().all(|other| other == only) => vec![*only],
        _ => Vec::new(),
    }
}

/// What to register: the client's id, tenants, extra scopes and token lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewClient {
    id: String,
    tenants: Vec<TenantId>,
    scopes: Vec<String>,
    token_lifetime: Option<Duration>,
    secret: Option<ClientSecret>,
    rate_limit: Option<RateLimit>,
    jwks: Option<serde_json::Value>,
    jwks_uri: Option<String>,
    method: Option<AuthMethod>,
}

/// The shortest secret [`NewClient::secret`] accepts.
pub const MIN_SECRET_LEN: usize = 16;

/// The longest secret [`NewClient::secret`] accepts, in bytes: a token request's form is read
/// up to 8 KiB, so a much longer one could never be sent.
pub const MAX_SECRET_LEN: usize = 1024;

impl NewClient {
    /// A client with this id, entitled to no tenant yet.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            tenants: Vec::new(),
            scopes: Vec::new(),
            token_lifetime: None,
            secret: None,
            rate_limit: None,
            jwks: None,
            jwks_uri: None,
            method: None,
        }
    }

    /// States how the client authenticates (`token_endpoint_auth_method`), checked at
    /// registration against what else it was given: `private_key_jwt` needs
    /// [`jwks`](Self::jwks) or [`jwks_uri`](Self::jwks_uri), a secret method refuses them.
    /// Without it, the method follows from whether keys were given.
    #[must_use]
    pub fn token_endpoint_auth_method(mut self, method: AuthMethod) -> Self {
        self.method = Some(method);
        self
    }

    /// The client authenticates with `private_key_jwt`, its assertions verified with the
    /// public keys of this JWK Set (RSA, EC P-256/P-384 or Ed25519 signing keys; symmetric
    /// keys are refused). It has no secret.
    #[must_use]
    pub fn jwks(mut self, jwks: serde_json::Value) -> Self {
        self.jwks = Some(jwks);
        self
    }

    /// The client authenticates with `private_key_jwt`, its assertions verified with the keys
    /// published at this URL (`https://`, or `http://` on loopback; fetched and cached as
    /// trusted issuers' keys are, refetched for an unknown `kid`). Needs the `remote-jwks`
    /// feature. It has no secret.
    #[must_use]
    pub fn jwks_uri(mut self, uri: impl Into<String>) -> Self {
        self.jwks_uri = Some(uri.into());
        self
    }

    /// The client's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How the client will authenticate.
    pub fn auth_method(&self) -> AuthMethod {
        if let Some(method) = self.method {
            return method;
        }
        if self.jwks.is_some() || self.jwks_uri.is_some() {
            AuthMethod::PrivateKeyJwt
        } else {
            AuthMethod::ClientSecret
        }
    }

    /// Limits the client's requests across all its tenants (see [`crate::limit`]).
    #[must_use]
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Entitles the client to a tenant.
    #[must_use]
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenants.push(tenant);
        self
    }

    /// Allows the client a scope besides its tenant (such as `system/*.read`).
    #[must_use]
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }

    /// The lifetime of this client's tokens, instead of the endpoint's default.
    #[must_use]
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = Some(lifetime);
        self
    }

    /// Registers the client with this secret instead of a generated one, for a secret
    /// provisioned elsewhere (a configuration file, a secrets manager). Registration refuses
    /// one shorter than [`MIN_SECRET_LEN`] characters or longer than [`MAX_SECRET_LEN`] bytes.
    /// Only its hash is stored.
    #[must_use]
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(ClientSecret(secret.into()));
        self
    }
}

/// Why a store operation failed. The message is for logs and administrators.
///
/// A *refusal* is the request's fault (an id already taken or unknown, a revoked client, a
/// secret too short, a malformed scope): asking again the same way fails again. A *conflict*
/// is a change made only if the client is still as read ([`ClientUpdate::if_unchanged`]) that
/// found it changed. Any other error is the store's (a file or database that cannot be read or
/// written), with the underlying error as its [`source`](std::error::Error::source) when there
/// is one. Two errors are equal when their messages and kinds are.
#[derive(Debug, Clone)]
pub struct StoreError {
    message: String,
    kind: ErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// What a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Failed,
    Refused,
    Conflict,
}

impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.kind == other.kind
    }
}

impl Eq for StoreError {}

impl StoreError {
    /// The store failed.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Failed,
            source: None,
        }
    }

    /// The store failed because of `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            source: Some(Arc::new(source)),
            ..Self::new(message)
        }
    }

    /// The store refused what was asked.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Refused,
            source: None,
        }
    }

    /// The change was not made because the client is no longer as the caller read it (see
    /// [`ClientUpdate::if_unchanged`]): read it again and decide again.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: ErrorKind::Conflict,
            source: None,
        }
    }

    /// Whether the request was refused (rather than the store failing). A
    /// [`conflict`](Self::is_conflict) is not a refusal: the same request may succeed once
    /// decided again on what the store holds now.
    pub fn is_refused(&self) -> bool {
        self.kind == ErrorKind::Refused
    }

    /// Whether the change was not made because the client changed since it was read (see
    /// [`ClientUpdate::if_unchanged`]).
    pub fn is_conflict(&self) -> bool {
        self.kind == ErrorKind::Conflict
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// The future a [`ClientStore`] method returns.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Where clients live: look-up, registration, secret rotation, revocation.
///
/// Secrets are only ever stored as Argon2id hashes; registration and rotation return the new
/// secret in clear exactly once. Methods are async and assume nothing in-process, so a shared
/// database can back the trait.
pub trait ClientStore: Send + Sync + 'static {
    /// The client with this id, if registered (revoked clients included, marked revoked).
    fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>>;

    /// The client with this id as a token request for `tenant` needs it: the record
    /// [`client`](Self::client) gives, but with only what such a request can be granted in
    /// its `tenants`: `tenant` if the client is entitled to it (nothing if not); for `None` (a
    /// request naming no tenant), its only tenant when it has just one (nothing when it has
    /// several, or none). `None` when no client has this id.
    ///
    /// The token endpoint reads clients this way (and introspection, for the tenant of the
    /// token asked about), so that a request costs the same for a client of one tenant as for
    /// an interoperability partner's application entitled to thousands. The default reads the
    /// whole record with [`client`](Self::client) and narrows it; a store that can answer
    /// without reading the whole list should override it (the crate's stores do: the
    /// PostgreSQL store looks the one tenant up in an index, and never reads the list).
    ///
    /// A narrowed record is for answering a request, not for deciding a change on: its
    /// `tenants` are not the client's (a change made
    /// [`if_unchanged`](ClientUpdate::if_unchanged) on it finds the client changed).
    ///
    /// ```
    /// use tower_fhir::tenant::TenantId;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let first = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
    /// let second = TenantId::parse("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f").unwrap();
    /// let store = InMemoryClientStore::new();
    /// store.register(NewClient::new("partner-app").tenant(first).tenant(second)).await.unwrap();
    /// store.register(NewClient::new("clinic-app").tenant(first)).await.unwrap();
    ///
    /// // The tenant asked for, if the client has it; the rest of the record as it is.
    /// let read = store.client_for_tenant("partner-app", Some(second)).await.unwrap().unwrap();
    /// assert_eq!(read.tenants, [second]);
    /// let whole = store.client("partner-app").await.unwrap().unwrap();
    /// assert_eq!((read.id, read.secrets), (whole.id, whole.secrets));
    ///
    /// // Naming none: the only tenant of a client that has one, nothing for one that has several.
    /// let only = store.client_for_tenant("clinic-app", None).await.unwrap().unwrap();
    /// assert_eq!(only.tenants, [first]);
    /// let several = store.client_for_tenant("partner-app", None).await.unwrap().unwrap();
    /// assert!(several.tenants.is_empty());
    ///
    /// // A tenant the client does not have; a client that does not exist.
    /// let not_its = store.client_for_tenant("clinic-app", Some(second)).await.unwrap().unwrap();
    /// assert!(not_its.tenants.is_empty());
    /// assert!(store.client_for_tenant("nobody", None).await.unwrap().is_none());
    /// # });
    /// ```
    fn client_for_tenant(
        &self,
        id: &str,
        tenant: Option<TenantId>,
    ) -> StoreFuture<Option<ClientRecord>> {
        let read = self.client(id);
        Box::pin(async move {
            Ok(read.await?.map(|mut record| {
                record.tenants = narrowed_tenants(&record.tenants, tenant);
                record
            }))
        })
    }

    /// Registers a client and returns its first secret. Refuses an id already registered.
    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret>;

    /// Gives the client a new secret and returns it; the old one stops working after `grace`
    /// (at once when zero). Refuses unknown or revoked clients.
    fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret>;

    /// Rotates the secret as [`rotate_secret`](Self::rotate_secret) does, only if `used` (the
    /// hash, in PHC form, of the secret the request authenticated with) is still one of the
    /// client's live secrets; otherwise a [conflict](StoreError::is_conflict), and nothing
    /// changes. A client rotating its own secret checks it first (a hash takes a while): a
    /// reset made meanwhile, by an administrator after the old secret leaked, is then not
    /// undone by a rotation that began with the old secret (which would hand whoever holds it
    /// the client again, and take the new secret from the administrator). A reset with a grace
    /// period leaves the old secret live until it ends, so it stands only against rotations
    /// made after that: reset a leaked secret without grace (as the gateway's admin API does).
    ///
    /// The crate's stores check and rotate under one lock (the client's row locked, in
    /// PostgreSQL). The default, for stores written before this method, does not check: it
    /// rotates (a store should override it).
    fn rotate_secret_from(
        &self,
        id: &str,
        used: &str,
        grace: Duration,
    ) -> StoreFuture<ClientSecret> {
        let _ = used;
        self.rotate_secret(id, grace)
    }

    /// Revokes the client: it gets no new tokens from now on.
    /// [`TokenEndpoint::revoke_client`](super::TokenEndpoint::revoke_client) also refuses the
    /// tokens it holds.
    fn revoke(&self, id: &str) -> StoreFuture<()>;

    /// The revoked clients, for refusing the tokens they may still hold after a restart
    /// ([`TokenEndpoint::refuse_revoked_clients`](super::TokenEndpoint::refuse_revoked_clients)).
    /// The default fails: a store that cannot tell must not pass for one that has none.
    fn revoked_clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        Box::pin(std::future::ready(Err(StoreError::new(
            "this client store cannot list its revoked clients",
        ))))
    }

    /// Every registered client, revoked ones included (marked revoked), in `id` order: what an
    /// administrator lists (the gateway's `GET /admin/clients`). Each record is as
    /// [`client`](Self::client) gives it, its secrets' hashes included: show only what is not
    /// secret. The default fails: a store that cannot tell must not pass for one that has none.
    ///
    /// ```
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryClientStore::new();
    /// assert!(store.clients().await.unwrap().is_empty());
    /// store.register(NewClient::new("app-2")).await.unwrap();
    /// store.register(NewClient::new("app-1")).await.unwrap();
    /// store.revoke("app-2").await.unwrap();
    ///
    /// let listed = store.clients().await.unwrap();
    /// let ids: Vec<&str> = listed.iter().map(|client| client.id.as_str()).collect();
    /// assert_eq!(ids, ["app-1", "app-2"]);
    /// assert!(!listed[0].revoked && listed[1].revoked);
    /// # });
    /// ```
    fn clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        Box::pin(std::future::ready(Err(StoreError::new(
            "this client store cannot list its clients",
        ))))
    }

    /// A page of [`clients`](Self::clients): the clients whose `id` sorts after `after`
    /// (every one for `None`; `after` need not be a client's, so a page after one deleted
    /// meanwhile still works), at most `limit` of them (every one for `None`), in `id` order:
    /// the order of the ids' bytes (Rust's `str` order, `"B-app" < "a-app"`, `"app-1" <
    /// "app_1"`; not a database's collation), each once. Paging on, each page's last `id`
    /// the next one's `after`, gives the clients [`clients`](Self::clients) gives, in that
    /// order (one registered or deleted meanwhile is in a page or not according to where it
    /// falls): what the gateway's `GET /admin/clients?limit=...&after=...` reads. Each
    /// record as [`clients`](Self::clients) gives it, its secrets' hashes included.
    ///
    /// The default reads every client with [`clients`](Self::clients) (so it fails where that
    /// does) and keeps the page; a store that can read one page should override it (the
    /// crate's in-memory store copies only the page's records; the PostgreSQL store reads
    /// only the page, by an index in byte order).
    ///
    /// ```
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryClientStore::new();
    /// for id in ["app_1", "a-app", "app-1", "B-app"] {
    ///     store.register(NewClient::new(id)).await.unwrap();
    /// }
    /// let ids = |page: Vec<tower_fhir::token::ClientRecord>| -> Vec<String> {
    ///     page.into_iter().map(|client| client.id).collect()
    /// };
    ///
    /// // Pages of two, in byte order: upper case before lower, '-' before '_'.
    /// let first = ids(store.clients_after(None, Some(2)).await.unwrap());
    /// assert_eq!(first, ["B-app", "a-app"]);
    /// let second = ids(store.clients_after(Some("a-app"), Some(2)).await.unwrap());
    /// assert_eq!(second, ["app-1", "app_1"]);
    /// assert!(store.clients_after(Some("app_1"), Some(2)).await.unwrap().is_empty());
    /// // No limit: every client after; `after` need not be a client's.
    /// assert_eq!(ids(store.clients_after(Some("app"), None).await.unwrap()), ["app-1", "app_1"]);
    /// let all = ids(store.clients().await.unwrap());
    /// assert_eq!(ids(store.clients_after(None, None).await.unwrap()), all);
    /// # });
    /// ```
    fn clients_after(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> StoreFuture<Vec<ClientRecord>> {
        let listed = self.clients();
        let after = after.map(str::to_owned);
        Box::pin(async move { Ok(page_of(listed.await?, after.as_deref(), limit)) })
    }

    /// Replaces what the client may get tokens for: its tenants, and the scopes it may ask for
    /// besides a tenant (each an RFC 6749 scope token: printable ASCII without spaces, `"` or
    /// `\`). Refuses unknown or revoked clients. Tokens issued before keep the scope they
    /// were issued with until they expire; new tokens follow the new entitlements at once.
    ///
    /// ```
    /// use tower_fhir::tenant::TenantId;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let first = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
    /// let second = TenantId::parse("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f").unwrap();
    /// let store = InMemoryClientStore::new();
    /// store.register(NewClient::new("app-1").tenant(first)).await.unwrap();
    ///
    /// // A new customer onboarded: the app may now get tokens for both tenants.
    /// store
    ///     .set_entitlements("app-1", vec![first, second], vec!["system/*.read".into()])
    ///     .await
    ///     .unwrap();
    /// let record = store.client("app-1").await.unwrap().unwrap();
    /// assert_eq!(record.tenants, [first, second]);
    /// assert_eq!(record.scopes, ["system/*.read"]);
    ///
    /// // Not a scope a token request could name; an unknown client.
    /// assert!(store.set_entitlements("app-1", vec![first], vec!["a b".into()]).await.is_err());
    /// assert!(store.set_entitlements("app-2", vec![first], vec![]).await.is_err());
    /// # });
    /// ```
    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> StoreFuture<()>;

    /// The hashing cost the store uses (the endpoint hashes its dummy secret with it, so that
    /// unknown clients take as long as known ones).
    fn hashing(&self) -> SecretHashing {
        SecretHashing::default()
    }

    /// Sets or (with `None`) removes the client's rate limit across all its tenants. Refuses
    /// unknown or revoked clients. The default refuses every change: a store that keeps no
    /// rate limits.
    ///
    /// ```
    /// use tower_fhir::limit::RateLimit;
    /// use tower_fhir::token::{ClientStore, InMemoryClientStore, NewClient};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryClientStore::new();
    /// store.register(NewClient::new("app-1")).await.unwrap();
    /// let limit = RateLimit::new(10, 20).unwrap();
    /// store.set_rate_limit("app-1", Some(limit)).await.unwrap();
    /// assert_eq!(store.client("app-1").await.unwrap().unwrap().rate_limit, Some(limit));
    /// assert!(store.set_rate_limit("app-2", None).await.is_err());
    /// # });
    /// ```
    fn set_rate_limit(&self, id: &str, limit: Option<RateLimit>) -> StoreFuture<()> {
        let _ = (id, limit);
        Box::pin(std::future::ready(Err(StoreError::refused(
            "this client store keeps no rate limits",
        ))))
    }

    /// Replaces a `private_key_jwt` client's public keys (its key rotation: publish the new
    /// key beside the old one, switch, then drop the old one). Refuses unknown or revoked
    /// clients, clients that authenticate with a secret, and keys that could never verify an
    /// assertion (as [`register`](Self::register) does). The default refuses every change: a
    /// store that keeps no keys.
    ///
    /// ```
    /// use tower_fhir::token::{ClientKeys, ClientStore, InMemoryClientStore, NewClient};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let key = |kid: &str| serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
    ///     "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    ///     "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
    /// let store = InMemoryClientStore::new();
    /// store.register(NewClient::new("backend").jwks(serde_json::json!({"keys": [key("k1")]}))).await.unwrap();
    /// let rotated = serde_json::json!({"keys": [key("k2")]});
    /// store.set_keys("backend", ClientKeys::Jwks(rotated.clone())).await.unwrap();
    /// assert_eq!(store.client("backend").await.unwrap().unwrap().jwks, Some(rotated));
    /// assert!(store.set_keys("backend", ClientKeys::Jwks(serde_json::json!({"keys": []}))).await.is_err());
    /// # });
    /// ```
    fn set_keys(&self, id: &str, keys: ClientKeys) -> StoreFuture<()> {
        let _ = (id, keys);
        Box::pin(std::future::ready(Err(StoreError::refused(
            "this client store keeps no client keys",
        ))))
    }

    /// Applies `update` to the client: its tenants and scopes, and the keys and rate limit it
    /// names, refused as the single setters refuse them. The crate's stores write it whole or
    /// not at all (one transaction in PostgreSQL), so a refusal or a failure leaves the client
    /// as it was, and no reader sees half of it.
    ///
    /// The default, for stores written before this method, is not atomic. It refuses what it
    /// can tell without the store (unusable keys, [`ClientKeys::check`]; malformed scopes),
    /// then makes the [`set_entitlements`](Self::set_entitlements),
    /// [`set_keys`](Self::set_keys) and [`set_rate_limit`](Self::set_rate_limit) calls at once
    /// (a future borrows nothing of the store, so none can wait for the one before) and awaits
    /// them in this order, returning the first failure. A store whose setters act when called
    /// may so apply one part while refusing another (keys for a client that uses a secret).
    /// A change made [`if_unchanged`](ClientUpdate::if_unchanged) it cannot make (no read and
    /// write under one lock): it fails (not a refusal) and writes nothing. A store should
    /// override it: read the client, [`apply`](ClientUpdate::apply) the change to the record
    /// and write it, under one lock or transaction.
    fn update(&self, id: &str, update: ClientUpdate) -> StoreFuture<()> {
        let ClientUpdate {
            tenants,
            scopes,
            keys,
            rate_limit,
            read,
        } = update;
        if read.is_some() {
            return Box::pin(std::future::ready(Err(StoreError::new(
                "this client store cannot make a change only if the client is unchanged: its \
                 `update` must be overridden (see `ClientUpdate::apply`)",
            ))));
        }
        if let Some(Err(err)) = keys.as_ref().map(|keys| keys.check(id)) {
            return Box::pin(std::future::ready(Err(err)));
        }
        if let Err(err) = check_scopes(id, &scopes) {
            return Box::pin(std::future::ready(Err(err)));
        }
        let entitlements = self.set_entitlements(id, tenants, scopes);
        let keys = keys.map(|keys| self.set_keys(id, keys));
        let limit = rate_limit.map(|limit| self.set_rate_limit(id, limit));
        Box::pin(async move {
            entitlements.await?;
            if let Some(keys) = keys {
                keys.await?;
            }
            if let Some(limit) = limit {
                limit.await?;
            }
            Ok(())
        })
    }
}

impl<T: ClientStore + ?Sized> ClientStore for Arc<T> {
    fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
        (**self).client(id)
    }
    fn client_for_tenant(
        &self,
        id: &str,
        tenant: Option<TenantId>,
    ) -> StoreFuture<Option<ClientRecord>> {
        (**self).client_for_tenant(id, tenant)
    }
    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
        (**self).register(client)
    }
    fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
        (**self).rotate_secret(id, grace)
    }
    fn rotate_secret_from(
        &self,
        id: &str,
        used: &str,
        grace: Duration,
    ) -> StoreFuture<ClientSecret> {
        (**self).rotate_secret_from(id, used, grace)
    }
    fn revoke(&self, id: &str) -> StoreFuture<()> {
        (**self).revoke(id)
    }
    fn revoked_clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        (**self).revoked_clients()
    }
    fn clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        (**self).clients()
    }
    fn clients_after(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> StoreFuture<Vec<ClientRecord>> {
        (**self).clients_after(after, limit)
    }
    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> StoreFuture<()> {
        (**self).set_entitlements(id, tenants, scopes)
    }
    fn hashing(&self) -> SecretHashing {
        (**self).hashing()
    }
    fn set_rate_limit(&self, id: &str, limit: Option<RateLimit>) -> StoreFuture<()> {
        (**self).set_rate_limit(id, limit)
    }
    fn set_keys(&self, id: &str, keys: ClientKeys) -> StoreFuture<()> {
        (**self).set_keys(id, keys)
    }
    fn update(&self, id: &str, update: ClientUpdate) -> StoreFuture<()> {
        (**self).update(id, update)
    }
}

/// The page [`ClientStore::clients_after`] gives of `clients` (in any order; of two with one
/// id, the first kept).
fn page_of(
    mut clients: Vec<ClientRecord>,
    after: Option<&str>,
    limit: Option<usize>,
) -> Vec<ClientRecord> {
    if let Some(after) = after {
        clients.retain(|client| client.id.as_str() > after);
    }
    clients.sort_by(|a, b| a.id.cmp(&b.id));
    clients.dedup_by(|later, earlier| later.id == earlier.id);
    if let Some(limit) = limit {
        clients.truncate(limit);
    }
    clients
}

/// A client's limit as a store read gives it: a failed read is logged and limits nothing.
pub(crate) fn limit_of(read: StoreFuture<Option<ClientRecord>>) -> ClientLimitFuture {
    Box::pin(async move {
        read.await
            .map(|record| record.and_then(|record| record.rate_limit))
            .map_err(crate::limit::ClientLimitUnknown::new)
    })
}

/// The clients' limits, read from the store.
impl ClientLimits for InMemoryClientStore {
    fn client_limit(&self, client_id: &str) -> ClientLimitFuture {
        limit_of(self.client_for_tenant(client_id, None))
    }
}

/// A secret in clear and its hash, made before any lock is taken: hashing is slow, and a
/// store's lock is also what its look-ups take.
pub(crate) struct HashedSecret {
    secret: ClientSecret,
    /// `None` for a client without a secret (`private_key_jwt`).
    hash: Option<SecretHash>,
}

impl HashedSecret {
    /// A new generated secret, hashed.
    pub(crate) fn generate(hashing: SecretHashing) -> Result<Self, StoreError> {
        Self::of(new_secret(), hashing)
    }

    /// The secret `client` is to be registered with (the one it was given, or a new one),
    /// hashed.
    pub(crate) fn for_client(
        client: &NewClient,
        hashing: SecretHashing,
    ) -> Result<Self, StoreError> {
        if client.auth_method() == AuthMethod::PrivateKeyJwt {
            return Ok(Self {
                secret: ClientSecret(String::new()),
                hash: None,
            });
        }
        Self::of(client.secret.clone().unwrap_or_else(new_secret), hashing)
    }

    fn of(secret: ClientSecret, hashing: SecretHashing) -> Result<Self, StoreError> {
        let phc = hashing.hash(secret.expose())?;
        Ok(Self {
            secret,
            hash: Some(SecretHash {
                phc,
                expires_at: None,
            }),
        })
    }
}

/// The clients map and the operations both built-in stores share.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Clients {
    pub(crate) clients: HashMap<String, ClientRecord>,
}

impl Clients {
    /// The revoked clients.
    pub(crate) fn revoked(&self) -> Vec<ClientRecord> {
        self.clients
            .values()
            .filter(|client| client.revoked)
            .cloned()
            .collect()
    }

    /// Every client, in id order.
    pub(crate) fn all(&self) -> Vec<ClientRecord> {
        let mut all: Vec<ClientRecord> = self.clients.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The page [`ClientStore::clients_after`] gives: only the page's records copied (a
    /// client's record holds its list of tenants, which may be thousands long), and only
    /// the first `limit` after `after` sorted.
    pub(crate) fn page(&self, after: Option<&str>, limit: Option<usize>) -> Vec<ClientRecord> {
        let mut page: Vec<&ClientRecord> = self
            .clients
            .values()
            .filter(|client| after.is_none_or(|after| client.id.as_str() > after))
            .collect();
        if let Some(limit) = limit.filter(|limit| *limit < page.len()) {
            // The `limit` least first (in no order), the rest after them.
            page.select_nth_unstable_by(limit, |a, b| a.id.cmp(&b.id));
            page.truncate(limit);
        }
        page.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        page.into_iter().cloned().collect()
    }

    /// Whether `client` can be registered: its id, its scopes, a given secret's length, the id
    /// not taken. Cheap: check it before hashing the secret, and again (in
    /// [`register`](Self::register)) when inserting.
    pub(crate) fn check_new(&self, client: &NewClient) -> Result<(), StoreError> {
        if !is_client_id(&client.id) || client.id.contains(':') {
            return Err(StoreError::refused(
                "a client id must be 1 to 255 printable ASCII characters (spaces allowed) without ':'",
            ));
        }
        if self.clients.contains_key(&client.id) {
            return Err(StoreError::refused(format!(
                "client {:?} is already registered",
                client.id
            )));
        }
        check_scopes(&client.id, &client.scopes)?;
        check_keys(client)?;
        match &client.secret {
            Some(given) if given.0.chars().count() < MIN_SECRET_LEN => {
                Err(StoreError::refused(format!(
                    "client {:?}: a secret needs at least {MIN_SECRET_LEN} characters",
                    client.id
                )))
            }
            Some(given) if given.0.len() > MAX_SECRET_LEN => Err(StoreError::refused(format!(
                "client {:?}: a secret of more than {MAX_SECRET_LEN} bytes could not be sent \
                 in a token request",
                client.id
            ))),
            _ => Ok(()),
        }
    }

    /// Registers `client` with `secret`, hashed beforehand by
    /// [`HashedSecret::for_client`] (outside any lock: hashing is slow).
    pub(crate) fn register(
        &mut self,
        client: NewClient,
        secret: HashedSecret,
    ) -> Result<ClientSecret, StoreError> {
        self.check_new(&client)?;
        let method = client.auth_method();
        let record = ClientRecord {
            id: client.id.clone(),
            secrets: secret.hash.into_iter().collect(),
            tenants: crate::auth::dedup(client.tenants),
            scopes: crate::auth::dedup(client.scopes),
            token_lifetime_secs: client.token_lifetime.map(|d| d.as_secs().max(1)),
            revoked: false,
            rate_limit: client.rate_limit,
            token_endpoint_auth_method: method,
            jwks: client.jwks,
            jwks_uri: client.jwks_uri,
        };
        self.clients.insert(client.id, record);
        Ok(secret.secret)
    }

    /// Refuses a client that is unknown or revoked (before hashing a new secret for it).
    pub(crate) fn check_active(&self, id: &str) -> Result<(), StoreError> {
        match self.clients.get(id) {
            Some(record) if !record.revoked => Ok(()),
            _ => Err(StoreError::refused(format!("no active client {id:?}"))),
        }
    }

    /// Refuses a client that is unknown, revoked, or has no secret to rotate.
    pub(crate) fn check_rotatable(&self, id: &str) -> Result<(), StoreError> {
        self.check_active(id)?;
        match self.clients.get(id) {
            Some(record) if record.token_endpoint_auth_method == AuthMethod::PrivateKeyJwt => {
                Err(StoreError::refused(format!(
                    "client {id:?} authenticates with private_key_jwt and has no secret"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Gives the client `secret` (hashed beforehand, outside any lock); its old secrets stop
    /// at once, or when `grace` ends. Only if `used` (a hash) is one of the client's live
    /// secrets, when given: a [conflict](StoreError::is_conflict) otherwise.
    pub(crate) fn rotate_from(
        &mut self,
        id: &str,
        used: Option<&str>,
        grace: Duration,
        secret: HashedSecret,
    ) -> Result<ClientSecret, StoreError> {
        let record = self
            .clients
            .get_mut(id)
            .filter(|r| !r.revoked)
            .ok_or_else(|| StoreError::refused(format!("no active client {id:?}")))?;
        let now = unix_now();
        if used.is_some_and(|used| !record.live_secrets(now).any(|h| h.phc == used)) {
            return Err(StoreError::conflict(format!(
                "the secret client {id:?} authenticated with was replaced since"
            )));
        }
        let grace_ends = now.saturating_add(grace.as_secs());
        // Old secrets stop at once, or when the grace ends (never later than they would have).
        record.secrets.retain(|s| s.is_live(now));
        if grace.is_zero() {
            record.secrets.clear();
        } else {
            for old in &mut record.secrets {
                old.expires_at = Some(old.expires_at.map_or(grace_ends, |t| t.min(grace_ends)));
            }
        }
        record.secrets.extend(secret.hash);
        Ok(secret.secret)
    }

    pub(crate) fn set_entitlements(
        &mut self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> Result<(), StoreError> {
        check_scopes(id, &scopes)?;
        let record = self
            .clients
            .get_mut(id)
            .filter(|r| !r.revoked)
            .ok_or_else(|| StoreError::refused(format!("no active client {id:?}")))?;
        record.tenants = crate::auth::dedup(tenants);
        record.scopes = crate::auth::dedup(scopes);
        Ok(())
    }

    pub(crate) fn set_rate_limit(
        &mut self,
        id: &str,
        limit: Option<RateLimit>,
    ) -> Result<(), StoreError> {
        let record = self
            .clients
            .get_mut(id)
            .filter(|r| !r.revoked)
            .ok_or_else(|| StoreError::refused(format!("no active client {id:?}")))?;
        record.rate_limit = limit;
        Ok(())
    }

    pub(crate) fn set_keys(&mut self, id: &str, keys: ClientKeys) -> Result<(), StoreError> {
        let record = self
            .clients
            .get_mut(id)
            .filter(|r| !r.revoked)
            .ok_or_else(|| StoreError::refused(format!("no active client {id:?}")))?;
        if record.token_endpoint_auth_method != AuthMethod::PrivateKeyJwt {
            return Err(StoreError::refused(format!(
                "client {id:?} authenticates with a secret, not with keys"
            )));
        }
        let (jwks, jwks_uri) = match keys {
            ClientKeys::Jwks(jwks) => (Some(jwks), None),
            ClientKeys::JwksUri(uri) => (None, Some(uri)),
        };
        let mut check = NewClient::new(id);
        check.jwks = jwks;
        check.jwks_uri = jwks_uri;
        check_keys(&check)?;
        record.jwks = check.jwks;
        record.jwks_uri = check.jwks_uri;
        Ok(())
    }

    /// Applies `update` whole, or (refused) changes nothing.
    pub(crate) fn update(&mut self, id: &str, update: ClientUpdate) -> Result<(), StoreError> {
        let kept = self.clients.get(id).cloned();
        if let (Some(read), Some(record)) = (&update.read, &kept) {
            if !read.matches(record) {
                return Err(changed_since_read(id));
            }
        }
        let ClientUpdate {
            tenants,
            scopes,
            keys,
            rate_limit,
            read: _,
        } = update;
        let result = (|| {
            self.set_entitlements(id, tenants, scopes)?;
            if let Some(keys) = keys {
                self.set_keys(id, keys)?;
            }
            match rate_limit {
                Some(limit) => self.set_rate_limit(id, limit),
                None => Ok(()),
            }
        })();
        if result.is_err() {
            if let Some(record) = kept {
                self.clients.insert(id.to_owned(), record);
            }
        }
        result
    }

    pub(crate) fn revoke(&mut self, id: &str) -> Result<(), StoreError> {
        let record = self
            .clients
            .get_mut(id)
            .ok_or_else(|| StoreError::refused(format!("no client {id:?}")))?;
        record.revoked = true;
        record.secrets.clear();
        Ok(())
    }
}

/// The longest client id accepted.
pub(crate) const MAX_CLIENT_ID_LEN: usize = 255;

/// Whether `id` can be a client id: RFC 6749's `VSCHAR`s (printable ASCII and space), 1 to
/// 255 of them. Nothing else is registered, looked up or logged: an admin tool can check an id
/// with it before asking a store.
///
/// ```
/// use tower_fhir::token::is_client_id;
///
/// assert!(is_client_id("care-app"));
/// assert!(is_client_id("a client id with spaces ~!"));
/// assert!(!is_client_id(""));
/// assert!(!is_client_id("caf\u{e9}"));
/// assert!(!is_client_id("line\nbreak"));
/// assert!(!is_client_id(&"a".repeat(256)));
/// ```
pub fn is_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len()) && id.bytes().all(|b| (0x20..=0x7E).contains(&b))
}

/// Refuses `private_key_jwt` keys that could never verify an assertion: both `jwks` and
/// `jwks_uri`, a JWK Set without a usable public signing key or with a symmetric one, a
/// `jwks_uri` that is not `https://` (or `http://` on loopback), and a secret beside them.
fn check_keys(client: &NewClient) -> Result<(), StoreError> {
    let id = &client.id;
    let refused = |why: String| Err(StoreError::refused(format!("client {id:?}: {why}")));
    let keys_given = client.jwks.is_some() || client.jwks_uri.is_some();
    match (client.method, keys_given) {
        (Some(AuthMethod::PrivateKeyJwt), false) => {
            return refused("private_key_jwt needs jwks or jwks_uri".into())
        }
        (Some(AuthMethod::ClientSecret), true) => {
            return refused("jwks and jwks_uri are for private_key_jwt clients".into())
        }
        _ => {}
    }
    match (&client.jwks, &client.jwks_uri) {
        (None, None) => return Ok(()),
        (Some(_), Some(_)) => return refused("give jwks or jwks_uri, not both".into()),
        (Some(jwks), None) => {
            if let Some(member) = private_member(jwks) {
                return refused(format!(
                    "jwks holds a private key (its {member:?}): give the public key only; \
                     the private key stays with the client"
                ));
            }
            if let Err(why) = client_keys(jwks) {
                return refused(why);
            }
        }
        (None, Some(uri)) => {
            #[cfg(feature = "remote-jwks")]
            if let Err(e) = crate::auth::HttpJwks::new(uri) {
                return refused(format!("jwks_uri: {e}"));
            }
            #[cfg(not(feature = "remote-jwks"))]
            return refused(format!(
                "jwks_uri {uri:?} needs the remote-jwks feature; give jwks"
            ));
        }
    }
    if client.secret.is_some() {
        return refused("a private_key_jwt client has no secret".into());
    }
    Ok(())
}

/// The first private-key member (RFC 7518 §6.2.2, §6.3.2) of a key in a JWK Set: a client's
/// registered keys are kept and shown as given, so a private key among them would be stored
/// and shown beside the public one.
fn private_member(jwks: &serde_json::Value) -> Option<&'static str> {
    const PRIVATE: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];
    let keys = jwks.get("keys")?.as_array()?;
    keys.iter()
        .filter_map(|key| key.as_object())
        .find_map(|key| PRIVATE.into_iter().find(|member| key.contains_key(*member)))
}

/// The public signing keys of a `private_key_jwt` client's JWK Set; symmetric keys refused.
pub(crate) fn client_keys(jwks: &serde_json::Value) -> Result<crate::auth::KeySet, String> {
    let is_symmetric =
        |key: &serde_json::Value| key.get("kty").and_then(|k| k.as_str()) == Some("oct");
    if jwks
        .get("keys")
        .and_then(|keys| keys.as_array())
        .is_some_and(|keys| keys.iter().any(is_symmetric))
    {
        return Err("jwks holds a symmetric (oct) key: private_key_jwt needs public keys".into());
    }
    let keys = crate::auth::KeySet::from_jwks(jwks.to_string())
        .map_err(|e| format!("jwks is not a usable JWK Set: {e}"))?;
    if keys.is_empty() {
        return Err("jwks holds no public signing key".into());
    }
    Ok(keys)
}

/// Refuses a scope a token request could never name: empty, or outside RFC 6749's
/// `scope-token` characters (`%x21 / %x23-5B / %x5D-7E`); and one that looks like a SMART
/// resource scope (`system/...`, `patient/...`, `user/...`) but does not parse.
fn check_scopes(id: &str, scopes: &[String]) -> Result<(), StoreError> {
    let bad = |scope: &String| !super::scope::is_scope_token(scope);
    if let Some(scope) = scopes.iter().find(|scope| bad(scope)) {
        return Err(StoreError::refused(format!(
            "client {id:?}: {scope:?} is not a scope (printable ASCII without spaces, '\"' or '\\')"
        )));
    }
    // A tenant is granted by `tenants`, which the token endpoint checks against the scope
    // asked for: a tenant id among the scopes would be copied into every token the client
    // gets, naming a tenant it is not entitled to beside its own.
    if let Some(scope) = scopes
        .iter()
        .find(|scope| crate::tenant::TenantId::parse(scope).is_ok())
    {
        return Err(StoreError::refused(format!(
            "client {id:?}: {scope:?} is a tenant id: a client's tenants are its tenants, not \
             its scopes"
        )));
    }
    // A resource scope that does not parse would grant nothing, silently.
    let unreadable = |scope: &&String| {
        crate::smart::looks_like_resource_scope(scope)
            && crate::smart::ResourceScope::parse(scope).is_none()
    };
    match scopes.iter().find(unreadable) {
        Some(scope) => Err(StoreError::refused(format!(
            "client {id:?}: {scope:?} is not a SMART resource scope (such as system/Patient.rs, \
             patient/*.read or user/Observation.rs?category=laboratory; a granular scope's \
             query gives each parameter a value, one at least selecting rather than shaping \
             the answer as _count, _sort or _include do)"
        ))),
        None => Ok(()),
    }
}

/// Clients kept in memory; lost at restart (see [`FileClientStore`](super::FileClientStore)).
#[derive(Debug, Clone, Default)]
pub struct InMemoryClientStore {
    clients: Arc<Mutex<Clients>>,
    hashing: SecretHashing,
}

impl InMemoryClientStore {
    /// An empty store with the default hashing cost.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store hashing secrets at this cost.
    pub fn with_hashing(hashing: SecretHashing) -> Self {
        Self {
            hashing,
            ..Self::default()
        }
    }

    /// Rotates the client's secret, only if `used` is still one of its live secrets when given
    /// ([`ClientStore::rotate_secret_from`]); the new secret hashed outside the lock.
    fn rotate(&self, id: &str, used: Option<String>, grace: Duration) -> StoreFuture<ClientSecret> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || {
            this.with(|c| c.check_rotatable(&id))?;
            let secret = HashedSecret::generate(this.hashing)?;
            this.with(|c| c.rotate_from(&id, used.as_deref(), grace, secret))
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Clients) -> T) -> T {
        f(&mut self.clients.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ClientStore for InMemoryClientStore {
    fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
        let found = self.with(|c| c.clients.get(id).cloned());
        Box::pin(async move { Ok(found) })
    }

    /// Narrowed under the lock: the client's tenant list is looked through, never copied.
    fn client_for_tenant(
        &self,
        id: &str,
        tenant: Option<TenantId>,
    ) -> StoreFuture<Option<ClientRecord>> {
        let found = self.with(|c| c.clients.get(id).map(|record| record.narrowed(tenant)));
        Box::pin(async move { Ok(found) })
    }

    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
        let this = self.clone();
        // Hashing is slow: off the async worker threads, and outside the lock look-ups take.
        Box::pin(blocking(move || {
            this.with(|c| c.check_new(&client))?;
            let secret = HashedSecret::for_client(&client, this.hashing)?;
            this.with(|c| c.register(client, secret))
        }))
    }

    fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
        self.rotate(id, None, grace)
    }

    fn rotate_secret_from(
        &self,
        id: &str,
        used: &str,
        grace: Duration,
    ) -> StoreFuture<ClientSecret> {
        self.rotate(id, Some(used.to_owned()), grace)
    }

    fn revoke(&self, id: &str) -> StoreFuture<()> {
        let result = self.with(|c| c.revoke(id));
        Box::pin(async move { result })
    }

    fn revoked_clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        let revoked = self.with(|c| c.revoked());
        Box::pin(async move { Ok(revoked) })
    }

    fn clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        let all = self.with(|c| c.all());
        Box::pin(async move { Ok(all) })
    }

    /// Only the page's records copied, under the lock.
    fn clients_after(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> StoreFuture<Vec<ClientRecord>> {
        let page = self.with(|c| c.page(after, limit));
        Box::pin(async move { Ok(page) })
    }

    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> StoreFuture<()> {
        let result = self.with(|c| c.set_entitlements(id, tenants, scopes));
        Box::pin(async move { result })
    }

    fn set_rate_limit(&self, id: &str, limit: Option<RateLimit>) -> StoreFuture<()> {
        let result = self.with(|c| c.set_rate_limit(id, limit));
        Box::pin(async move { result })
    }

    fn set_keys(&self, id: &str, keys: ClientKeys) -> StoreFuture<()> {
        let result = self.with(|c| c.set_keys(id, keys));
        Box::pin(async move { result })
    }

    fn update(&self, id: &str, update: ClientUpdate) -> StoreFuture<()> {
        let result = self.with(|c| c.update(id, update));
        Box::pin(async move { result })
    }

    fn hashing(&self) -> SecretHashing {
        self.hashing
    }
}

/// Runs slow work (hashing, file I/O) on tokio's blocking pool when there is a runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(work)
            .await
            .map_err(|e| StoreError::new(format!("store task failed: {e}")))?,
        Err(_) => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

    /// A store with only the setters: `update` is the trait's default.
    struct SettersOnly(InMemoryClientStore);

    impl ClientStore for SettersOnly {
        fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
            self.0.client(id)
        }
        fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
            self.0.register(client)
        }
        fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
            self.0.rotate_secret(id, grace)
        }
        fn revoke(&self, id: &str) -> StoreFuture<()> {
            self.0.revoke(id)
        }
        fn set_entitlements(
            &self,
            id: &str,
            tenants: Vec<TenantId>,
            scopes: Vec<String>,
        ) -> StoreFuture<()> {
            self.0.set_entitlements(id, tenants, scopes)
        }
        fn set_rate_limit(&self, id: &str, limit: Option<RateLimit>) -> StoreFuture<()> {
            self.0.set_rate_limit(id, limit)
        }
        fn set_keys(&self, id: &str, keys: ClientKeys) -> StoreFuture<()> {
            self.0.set_keys(id, keys)
        }
    }

    /// Client ids whose byte order is not a dictionary's: upper case before lower, `' '`
    /// before `'+'` before `'-'` before `'_'`, a prefix before what extends it.
    const PAGED: [&str; 11] = [
        "app_1", "a-app", "app-1", "B-app", "app 2", "app+x", "Zed", "app", "app-10", "~tilde",
        "!bang",
    ];

    /// A store whose `clients` gives them unsorted, one twice: `clients_after` is the trait's
    /// default.
    struct Unsorted(InMemoryClientStore);

    impl ClientStore for Unsorted {
        fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
            self.0.client(id)
        }
        fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
            self.0.register(client)
        }
        fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
            self.0.rotate_secret(id, grace)
        }
        fn revoke(&self, id: &str) -> StoreFuture<()> {
            self.0.revoke(id)
        }
        fn set_entitlements(
            &self,
            id: &str,
            tenants: Vec<TenantId>,
            scopes: Vec<String>,
        ) -> StoreFuture<()> {
            self.0.set_entitlements(id, tenants, scopes)
        }
        fn clients(&self) -> StoreFuture<Vec<ClientRecord>> {
            let mut all = self.0.with(|c| c.all());
            all.reverse();
            all.extend(all.first().cloned());
            Box::pin(std::future::ready(Ok(all)))
        }
    }

    async fn register_paged(store: &dyn ClientStore) -> Vec<String> {
        for id in PAGED {
            store.register(NewClient::new(id)).await.unwrap();
        }
        store.revoke("app").await.unwrap();
        let mut expected: Vec<String> = PAGED.iter().map(|id| (*id).to_owned()).collect();
        expected.sort_unstable();
        assert_eq!(
            expected[..4],
            ["!bang", "B-app", "Zed", "a-app"],
            "byte order"
        );
        expected
    }

    /// Every page of `store` (after nothing, each id, ids between and beyond them; limits
    /// none, 0 to 3 and past the end) is the ids after `after` in byte order, the first
    /// `limit`; and pages of 1 to 4, each after the last's last id, make up `clients`.
    async fn pages_agree_with_the_list(store: &dyn ClientStore, expected: &[String]) {
        let ids = |page: Vec<ClientRecord>| -> Vec<String> {
            page.into_iter().map(|client| client.id).collect()
        };
        let mut listed = ids(store.clients().await.unwrap());
        listed.sort_unstable();
        listed.dedup();
        assert_eq!(listed, expected);
        let others = ["", " ", "A", "app-", "app-0", "app_0", "b", "~~", "\u{7f}"];
        let afters = std::iter::once(None)
            .chain(expected.iter().map(String::as_str).chain(others).map(Some));
        for after in afters {
            for limit in [None, Some(0), Some(1), Some(2), Some(3), Some(1000)] {
                let page = store.clients_after(after, limit).await.unwrap();
                let wanted: Vec<&String> = expected
                    .iter()
                    .filter(|id| after.is_none_or(|after| id.as_str() > after))
                    .take(limit.unwrap_or(usize::MAX))
                    .collect();
                let got: Vec<&String> = page.iter().map(|client| &client.id).collect();
                assert_eq!(got, wanted, "after {after:?}, limit {limit:?}");
                for client in &page {
                    let whole = store.client(&client.id).await.unwrap().unwrap();
                    assert_eq!(
                        (client.revoked, &client.secrets),
                        (whole.revoked, &whole.secrets),
                        "each record as `client` gives it"
                    );
                }
            }
        }
        for size in 1..=4 {
            let (mut walked, mut after) = (Vec::new(), None::<String>);
            loop {
                let page = ids(store
                    .clients_after(after.as_deref(), Some(size))
                    .await
                    .unwrap());
                let full = page.len() == size;
                after = page.last().cloned();
                walked.extend(page);
                if !full {
                    break;
                }
            }
            assert_eq!(walked, expected, "pages of {size}");
        }
    }

    #[tokio::test]
    async fn the_default_page_is_the_clients_in_byte_order_after_after() {
        let cheap = SecretHashing::new(8, 1).unwrap();
        let store = Unsorted(InMemoryClientStore::with_hashing(cheap));
        assert!(store.clients_after(None, None).await.unwrap().is_empty());
        let expected = register_paged(&store).await;
        pages_agree_with_the_list(&store, &expected).await;
        // A store that cannot list its clients cannot page them either.
        let unlisted = SettersOnly(InMemoryClientStore::with_hashing(cheap));
        unlisted.register(NewClient::new("app")).await.unwrap();
        assert!(unlisted.clients_after(None, Some(1)).await.is_err());
        // Through an `Arc`, the store's own.
        let shared: Arc<dyn ClientStore> = Arc::new(store);
        assert_eq!(
            shared.clients_after(Some("app"), Some(1)).await.unwrap()[0].id,
            "app 2"
        );
    }

    #[tokio::test]
    async fn in_memory_and_file_stores_page_in_byte_order() {
        let cheap = SecretHashing::new(8, 1).unwrap();
        let memory = InMemoryClientStore::with_hashing(cheap);
        let expected = register_paged(&memory).await;
        pages_agree_with_the_list(&memory, &expected).await;

        let path = std::env::temp_dir().join(format!(
            "tower-fhir-client-pages-{}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let file = super::super::FileClientStore::open_with_hashing(&path, cheap).unwrap();
        assert_eq!(register_paged(&file).await, expected);
        pages_agree_with_the_list(&file, &expected).await;
        let reopened = super::super::FileClientStore::open_with_hashing(&path, cheap).unwrap();
        pages_agree_with_the_list(&reopened, &expected).await;
        std::fs::remove_file(&path).unwrap();
        // A client gone: a page after its id goes on from the next one.
        memory.with(|c| c.clients.remove("app-1"));
        let after_deleted = memory.clients_after(Some("app-1"), Some(2)).await.unwrap();
        let ids: Vec<&str> = after_deleted.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["app-10", "app_1"]);
    }

    #[tokio::test]
    async fn an_update_checked_before_is_refused_as_the_store_refuses_it() {
        let store = InMemoryClientStore::new();
        let tenant = TenantId::parse(TENANT).unwrap();
        store
            .register(NewClient::new("app").tenant(tenant))
            .await
            .unwrap();
        let jwks = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        let uri = ClientKeys::JwksUri("https://app.example/jwks".into());
        let cases = [
            (
                ClientUpdate::new(vec![tenant], vec!["system/*.read".into()]),
                true,
            ),
            (ClientUpdate::new(vec![], vec!["a b".into()]), false),
            (ClientUpdate::new(vec![], vec![TENANT.into()]), false),
            // Keys for a client with a secret, usable or not.
            (ClientUpdate::new(vec![tenant], vec![]).keys(uri), false),
            (
                ClientUpdate::new(vec![tenant], vec![]).keys(ClientKeys::Jwks(jwks)),
                false,
            ),
        ];
        for (update, ok) in cases {
            let record = store.client("app").await.unwrap().unwrap();
            let checked = update.check(&record);
            assert_eq!(checked.is_ok(), ok, "{update:?}: {checked:?}");
            let stored = store.update("app", update.clone()).await;
            assert_eq!(stored.is_ok(), ok, "the store agrees on {update:?}");
        }
        store.revoke("app").await.unwrap();
        let revoked = store.client("app").await.unwrap().unwrap();
        let update = ClientUpdate::new(vec![tenant], vec![]);
        assert!(update.check(&revoked).is_err());
        assert!(store.update("app", update).await.is_err());
    }

    #[tokio::test]
    async fn the_default_update_refuses_what_it_can_tell_before_writing_anything() {
        let store = SettersOnly(InMemoryClientStore::new());
        let tenant = TenantId::parse(TENANT).unwrap();
        store
            .register(NewClient::new("app").tenant(tenant))
            .await
            .unwrap();
        let limit = RateLimit::new(1, 1).unwrap();
        for refused in [
            ClientUpdate::new(vec![], vec!["two words".into()]).rate_limit(Some(limit)),
            ClientUpdate::new(vec![], vec![])
                .keys(ClientKeys::JwksUri("ftp://keys.example".into()))
                .rate_limit(Some(limit)),
        ] {
            assert!(store.update("app", refused).await.unwrap_err().is_refused());
        }
        let record = store.client("app").await.unwrap().unwrap();
        assert_eq!((record.tenants, record.rate_limit), (vec![tenant], None));
        // Accepted whole.
        let update =
            ClientUpdate::new(vec![], vec!["system/*.read".into()]).rate_limit(Some(limit));
        store.update("app", update).await.unwrap();
        let record = store.client("app").await.unwrap().unwrap();
        assert_eq!((record.scopes.len(), record.rate_limit), (1, Some(limit)));
    }

    #[tokio::test]
    async fn an_update_made_if_unchanged_is_a_conflict_once_the_client_changed() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let store = InMemoryClientStore::new();
        store.register(NewClient::new("app")).await.unwrap();
        let read = store.client("app").await.unwrap().unwrap();
        // Another writer grants a tenant after the read.
        store
            .update("app", ClientUpdate::new(vec![tenant], vec![]))
            .await
            .unwrap();
        let stale = ClientUpdate::new(vec![], vec!["system/*.read".into()])
            .rate_limit(Some(RateLimit::new(1, 1).unwrap()))
            .if_unchanged(&read);
        let now = store.client("app").await.unwrap().unwrap();
        assert!(stale.check(&now).unwrap_err().is_conflict());
        assert!(stale.check(&read).is_ok());
        let conflict = store.update("app", stale.clone()).await.unwrap_err();
        assert!(
            conflict.is_conflict() && !conflict.is_refused(),
            "{conflict}"
        );
        // Nothing of it was written, the rate limit included; nor by `apply`.
        assert_eq!(store.client("app").await.unwrap().unwrap(), now);
        let mut record = now.clone();
        assert!(stale.apply(&mut record).unwrap_err().is_conflict());
        assert_eq!(record, now);
        // Decided on the client as it is: made.
        let fresh = ClientUpdate::new(vec![], vec!["system/*.read".into()]).if_unchanged(&now);
        fresh.clone().apply(&mut record).unwrap();
        store.update("app", fresh).await.unwrap();
        assert_eq!(store.client("app").await.unwrap().unwrap(), record);
        assert_eq!((record.tenants.len(), record.scopes.len()), (0, 1));
        // Revoked since the read: a conflict too.
        let read = store.client("app").await.unwrap().unwrap();
        store.revoke("app").await.unwrap();
        let late = ClientUpdate::new(vec![], vec![]).if_unchanged(&read);
        assert!(store.update("app", late).await.unwrap_err().is_conflict());

        // The trait's default `update` cannot compare and write under one lock: it fails
        // such a change (the store's failure, not a refusal) and writes nothing.
        let default = SettersOnly(InMemoryClientStore::new());
        default.register(NewClient::new("app")).await.unwrap();
        let read = default.client("app").await.unwrap().unwrap();
        let unchecked = ClientUpdate::new(vec![tenant], vec![]).if_unchanged(&read);
        let failed = default.update("app", unchecked).await.unwrap_err();
        assert!(!failed.is_refused() && !failed.is_conflict(), "{failed}");
        assert_eq!(default.client("app").await.unwrap().unwrap(), read);
    }

    #[test]
    fn apply_refuses_as_the_stores_do_and_leaves_the_record_as_it_was() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let mut record = ClientRecord {
            id: "app".into(),
            secrets: Vec::new(),
            tenants: vec![tenant],
            scopes: Vec::new(),
            token_lifetime_secs: None,
            revoked: false,
            rate_limit: None,
            token_endpoint_auth_method: AuthMethod::ClientSecret,
            jwks: None,
            jwks_uri: None,
        };
        let was = record.clone();
        let keys = ClientKeys::JwksUri("https://app.example/jwks".into());
        for refused in [
            ClientUpdate::new(vec![], vec!["two words".into()]),
            ClientUpdate::new(vec![], vec![]).keys(keys),
        ] {
            assert!(refused.apply(&mut record).unwrap_err().is_refused());
            assert_eq!(record, was);
        }
        let limit = RateLimit::new(2, 4).unwrap();
        ClientUpdate::new(vec![], vec![])
            .rate_limit(Some(limit))
            .apply(&mut record)
            .unwrap();
        assert_eq!((record.tenants.len(), record.rate_limit), (0, Some(limit)));
    }

    #[tokio::test]
    async fn a_store_that_cannot_list_its_clients_fails_rather_than_listing_none() {
        let store = SettersOnly(InMemoryClientStore::new());
        store.register(NewClient::new("app")).await.unwrap();
        let failed = store.clients().await.unwrap_err();
        assert!(!failed.is_refused(), "{failed}");
        assert!(failed.to_string().contains("cannot list its clients"));
    }

    fn live_secret_matches(record: &ClientRecord, secret: &ClientSecret) -> bool {
        record
            .live_secrets(unix_now())
            .any(|h| verify(secret.expose(), &h.phc))
    }

    #[tokio::test]
    async fn a_given_secret_is_used_and_a_short_one_refused() {
        let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
        let secret = store
            .register(NewClient::new("app").secret("configured-secret-0123"))
            .await
            .unwrap();
        assert_eq!(secret.expose(), "configured-secret-0123");
        let record = store.client("app").await.unwrap().unwrap();
        assert!(!format!("{record:?}").contains("configured-secret-0123"));
        assert!(store
            .register(NewClient::new("short").secret("too-short"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_resource_scope_that_does_not_parse_is_refused() {
        let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
        for typo in [
            "system/patient.rs",
            "system/Patient.sr",
            "patient.Patient.read",
        ] {
            let refused = store
                .register(NewClient::new("app").scope(typo))
                .await
                .unwrap_err();
            assert!(refused.is_refused(), "{typo}");
            assert!(refused.to_string().contains(typo), "{refused}");
        }
        store
            .register(
                NewClient::new("app")
                    .scope("system/Patient.rs")
                    .scope("openid"),
            )
            .await
            .unwrap();
        let refused = store
            .set_entitlements("app", Vec::new(), vec!["user/Observation.r?".into()])
            .await
            .unwrap_err();
        assert!(refused.is_refused());
    }

    #[tokio::test]
    async fn a_tenant_id_is_no_scope_a_client_may_be_given() {
        // It would be copied into every token the client gets, beside the tenant it asks for.
        let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
        let other = "7B3E9A10-2C4D-4E5F-8A6B-0C1D2E3F4A5B";
        for spelling in [
            other.to_owned(),
            format!("{{{other}}}"),
            other.replace('-', ""),
        ] {
            let refused = store
                .register(
                    NewClient::new("app")
                        .secret("a-secret-of-16-or-more")
                        .scope(&spelling),
                )
                .await
                .unwrap_err();
            assert!(refused.is_refused(), "{spelling}");
            assert!(refused.to_string().contains("is a tenant id"), "{refused}");
        }
        store
            .register(
                NewClient::new("app")
                    .secret("a-secret-of-16-or-more")
                    .scope("system/Patient.rs"),
            )
            .await
            .unwrap();
        let refused = store
            .set_entitlements("app", Vec::new(), vec![other.into()])
            .await
            .unwrap_err();
        assert!(refused.is_refused());
    }

    #[tokio::test]
    async fn private_key_jwt_clients_have_keys_and_no_secret() {
        let store = InMemoryClientStore::new();
        let key = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
        let jwks = serde_json::json!({"keys": [key]});
        let secret = store
            .register(NewClient::new("backend").jwks(jwks.clone()))
            .await
            .unwrap();
        assert!(secret.is_empty());
        let record = store.client("backend").await.unwrap().unwrap();
        assert_eq!(record.token_endpoint_auth_method, AuthMethod::PrivateKeyJwt);
        assert!(record.secrets.is_empty() && record.jwks == Some(jwks.clone()));
        // It has no secret to rotate.
        assert!(store
            .rotate_secret("backend", Duration::ZERO)
            .await
            .unwrap_err()
            .is_refused());
        // The record reads back as written; older records (no method) are secret clients.
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["token_endpoint_auth_method"], "private_key_jwt");
        assert_eq!(
            serde_json::from_value::<ClientRecord>(json).unwrap(),
            record
        );
        let old: ClientRecord = serde_json::from_value(serde_json::json!({
            "id": "old", "secrets": [], "tenants": []
        }))
        .unwrap();
        assert_eq!(old.token_endpoint_auth_method, AuthMethod::ClientSecret);

        let refused = |client: NewClient| {
            let store = store.clone();
            async move { store.register(client).await.unwrap_err().to_string() }
        };
        let oct = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}]});
        // The key pair as a key generator prints it: the private member beside the public ones.
        let mut pair = jwks.clone();
        pair["keys"][0]["d"] = serde_json::json!("c2VjcmV0LXNlY3JldC1zZWNyZXQ");
        for (client, why) in [
            (NewClient::new("a").jwks(oct), "symmetric"),
            (
                NewClient::new("h").jwks(pair),
                "holds a private key (its \"d\")",
            ),
            (
                NewClient::new("b").jwks(serde_json::json!({"keys": []})),
                "no public signing key",
            ),
            (
                NewClient::new("c").jwks(serde_json::json!("nope")),
                "not a usable JWK Set",
            ),
            (
                NewClient::new("d")
                    .jwks(jwks.clone())
                    .jwks_uri("https://keys.example/jwks"),
                "not both",
            ),
            (
                NewClient::new("e")
                    .jwks(jwks.clone())
                    .secret("a-secret-of-16-or-more"),
                "has no secret",
            ),
            (
                NewClient::new("f").token_endpoint_auth_method(AuthMethod::PrivateKeyJwt),
                "needs jwks or jwks_uri",
            ),
            (
                NewClient::new("g")
                    .jwks(jwks.clone())
                    .token_endpoint_auth_method(AuthMethod::ClientSecret),
                "are for private_key_jwt clients",
            ),
        ] {
            let message = refused(client).await;
            assert!(message.contains(why), "{why}: {message}");
        }
    }

    #[tokio::test]
    async fn register_rotate_revoke() {
        let store = InMemoryClientStore::new();
        let tenant = TenantId::parse(TENANT).unwrap();
        let first = store
            .register(NewClient::new("app").tenant(tenant))
            .await
            .unwrap();
        assert_eq!(first.expose().len(), 43);
        assert!(store.register(NewClient::new("app")).await.is_err());
        let record = store.client("app").await.unwrap().unwrap();
        assert!(!record.secrets[0].phc.contains(first.expose()));
        assert!(record.secrets[0].phc.starts_with("$argon2id$"));
        assert!(live_secret_matches(&record, &first));

        let second = store.rotate_secret("app", Duration::ZERO).await.unwrap();
        assert_ne!(first, second);
        let record = store.client("app").await.unwrap().unwrap();
        assert!(!live_secret_matches(&record, &first));
        assert!(live_secret_matches(&record, &second));

        let third = store
            .rotate_secret("app", Duration::from_secs(60))
            .await
            .unwrap();
        let record = store.client("app").await.unwrap().unwrap();
        assert!(live_secret_matches(&record, &second));
        assert!(live_secret_matches(&record, &third));

        store.revoke("app").await.unwrap();
        let record = store.client("app").await.unwrap().unwrap();
        assert!(record.revoked);
        assert!(store.rotate_secret("app", Duration::ZERO).await.is_err());
    }

    async fn tenants_of(store: &InMemoryClientStore, id: &str) -> Vec<TenantId> {
        store.client(id).await.unwrap().unwrap().tenants
    }

    #[tokio::test]
    async fn entitlements_change_for_active_clients_only() {
        let store = InMemoryClientStore::with_hashing(SecretHashing::new(8, 1).unwrap());
        let (a, b) = (
            TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap(),
            TenantId::parse("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f").unwrap(),
        );
        let secret = store
            .register(NewClient::new("app").tenant(a))
            .await
            .unwrap();
        // Repeats are kept once, in their order.
        store
            .set_entitlements("app", vec![b, a, b], vec!["x".into(), "x".into()])
            .await
            .unwrap();
        let record = store.client("app").await.unwrap().unwrap();
        assert_eq!(
            (record.tenants.as_slice(), record.scopes.as_slice()),
            (&[b, a][..], &["x".to_owned()][..])
        );
        // The secret is untouched.
        assert!(live_secret_matches(&record, &secret));
        // No tenant at all is allowed (the client then gets no token until given one).
        store.set_entitlements("app", vec![], vec![]).await.unwrap();
        assert!(tenants_of(&store, "app").await.is_empty());
        for bad in ["", "a b", "quote\"", "back\\slash", "tab\t", "é"] {
            let refused = store
                .set_entitlements("app", vec![a], vec![bad.into()])
                .await;
            assert!(refused.is_err(), "{bad:?}");
        }
        // A refused change changes nothing.
        assert!(tenants_of(&store, "app").await.is_empty());
        assert!(store
            .register(NewClient::new("spaced").scope("a b"))
            .await
            .is_err());
        // Client ids: printable ASCII (spaces allowed), 1 to 255 of them, no ':'.
        let long = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        for bad in ["", "a:b", "line\nbreak", "nul\0", "é", long.as_str()] {
            let refused = store.register(NewClient::new(bad)).await.unwrap_err();
            assert!(refused.is_refused(), "{bad:?}: {refused}");
        }
        store.register(NewClient::new("care app 2")).await.unwrap();
        store
            .register(NewClient::new("y".repeat(MAX_CLIENT_ID_LEN)))
            .await
            .unwrap();
        store.revoke("app").await.unwrap();
        for id in ["app", "nobody"] {
            let refused = store
                .set_entitlements(id, vec![a], vec![])
                .await
                .unwrap_err();
            assert!(refused.is_refused(), "{refused}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let secret = new_secret();
        let hash = SecretHashing::default().hash(secret.expose()).unwrap();
        let record = SecretHash {
            phc: hash.clone(),
            expires_at: None,
        };
        assert!(!format!("{secret:?}").contains(secret.expose()));
        assert!(!format!("{record:?}").contains(&hash));
    }
}
