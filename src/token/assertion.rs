//! `private_key_jwt` client authentication (RFC 7523 §2.2, SMART Backend Services): a client
//! proves who it is with a short-lived JWT signed by its private key.

use std::collections::HashMap;
#[cfg(feature = "remote-jwks")]
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

use super::client::{client_keys, unix_now, ClientRecord};
use crate::auth::{verify_with_keys, Algorithm, Expected, KeySet};

/// `client_assertion_type` of a JWT client assertion.
pub(super) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The algorithms an assertion may be signed with (each key allows only its own).
pub(crate) const ASSERTION_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS384,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// The furthest ahead an assertion's `exp` may be (SMART: five minutes).
const MAX_LIFETIME_SECS: u64 = 300;
/// Clock skew allowed on `exp`, `nbf` and the lifetime.
const LEEWAY_SECS: u64 = 30;
/// The most assertions remembered at once (each for at most its lifetime).
const MAX_REMEMBERED: usize = 100_000;
/// The longest `jti` accepted.
const MAX_JTI_LEN: usize = 256;

/// Where client assertions' `jti`s are remembered across processes (a database that replicas
/// share: `tower_fhir::postgres::PgState::assertion_replay_guard`), so that an assertion
/// accepted by one is refused by every other.
pub trait ReplayGuard: Send + Sync + 'static {
    /// Records that `client` used `jti`, until `until` (Unix seconds): `true` the first time,
    /// `false` when it was used before. The error is for the log.
    fn first_use(
        &self,
        client: &str,
        jti: &str,
        until: u64,
    ) -> futures::future::BoxFuture<'static, Result<bool, String>>;
}

/// Verifies client assertions and remembers their `jti`s until they expire.
pub(super) struct Assertions {
    /// What an assertion's `aud` must be: the token endpoint's URL.
    audiences: Vec<String>,
    /// `(client id, jti)` of assertions accepted, and when each expires.
    seen: Mutex<HashMap<(String, String), u64>>,
    /// The keys of clients registered with a `jwks_uri`, fetched and cached per URL.
    #[cfg(feature = "remote-jwks")]
    remote: Mutex<HashMap<String, Arc<crate::auth::RemoteKeys>>>,
}

impl Assertions {
    pub(super) fn new(audiences: Vec<String>) -> Self {
        Self {
            audiences,
            seen: Mutex::new(HashMap::new()),
            #[cfg(feature = "remote-jwks")]
            remote: Mutex::new(HashMap::new()),
        }
    }

    /// The audiences an assertion may name.
    pub(super) fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// The client an assertion says it is from (its `sub`, else `iss`), read without
    /// verifying anything: only to know whose keys to verify it with.
    pub(super) fn claimed_client(assertion: &str) -> Option<String> {
        let payload = assertion.split('.').nth(1)?;
        let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        claims
            .get("sub")
            .or_else(|| claims.get("iss"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// Whether `assertion` proves it comes from `client`: signed by one of its keys with an
    /// accepted algorithm, `iss` and `sub` its id, `aud` this endpoint, `exp` no more than
    /// five minutes ahead, a `jti` never seen before here (then remembered until `exp`). On
    /// success, the `jti` and until when it must stay unused, for a check across processes.
    /// The error says why, for the log only.
    pub(super) async fn verify(
        &self,
        client: &ClientRecord,
        assertion: &str,
    ) -> Result<(String, u64), &'static str> {
        let expected = Expected {
            algorithms: &ASSERTION_ALGORITHMS,
            issuer: Some(&client.id),
            audiences: &self.audiences,
            leeway: LEEWAY_SECS,
        };
        let claims = match (&client.jwks, &client.jwks_uri) {
            (Some(jwks), _) => {
                let keys = client_keys(jwks).map_err(|_| "its registered jwks is unusable")?;
                verify_with_keys(&keys, assertion, &expected)?
            }
            (None, Some(uri)) => self.verify_remote(uri, assertion, &expected).await?,
            (None, None) => return Err("it has no keys registered"),
        };
        if claims.subject() != Some(client.id.as_str()) {
            return Err("its sub is not the client id");
        }
        if claims.expires_at() > unix_now() + MAX_LIFETIME_SECS + LEEWAY_SECS {
            return Err("its exp is more than five minutes ahead");
        }
        let jti = match claims.token_id() {
            Some(jti) if !jti.is_empty() && jti.len() <= MAX_JTI_LEN => jti,
            _ => return Err("it has no jti (or one too long)"),
        };
        let until = claims.expires_at() + LEEWAY_SECS;
        self.remember(&client.id, jti, until)?;
        Ok((jti.to_owned(), until))
    }

    /// Remembers an assertion's `jti` until `until`; refuses one seen before.
    fn remember(&self, client: &str, jti: &str, until: u64) -> Result<(), &'static str> {
        let now = unix_now();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (client.to_owned(), jti.to_owned());
        if seen.get(&key).is_some_and(|&expires| expires > now) {
            return Err("its jti was used before");
        }
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, expires| *expires > now);
            if seen.len() >= MAX_REMEMBERED {
                return Err("too many assertions are remembered; refused until some expire");
            }
        }
        seen.insert(key, until);
        Ok(())
    }

    #[cfg(feature = "remote-jwks")]
    async fn verify_remote(
        &self,
        uri: &str,
        assertion: &str,
        expected: &Expected<'_>,
    ) -> Result<crate::auth::VerifiedClaims, &'static str> {
        let keys = {
            let mut remote = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
            match remote.get(uri) {
                Some(keys) => Arc::clone(keys),
                None => {
                    let keys = Arc::new(
                        crate::auth::RemoteKeys::new(uri)
                            .map_err(|_| "its jwks_uri is not one keys can be fetched from")?,
                    );
                    remote.insert(uri.to_owned(), Arc::clone(&keys));
                    keys
                }
            }
        };
        let current: Arc<KeySet> = keys.current().await;
        match verify_with_keys(&current, assertion, expected) {
            Err("no key for it") => {
                // A key the client added since: fetch again (at most once per cooldown).
                let refreshed = keys.refetch().await;
                verify_with_keys(&refreshed, assertion, expected)
            }
            verified => verified,
        }
    }

    #[cfg(not(feature = "remote-jwks"))]
    async fn verify_remote(
        &self,
        _uri: &str,
        _assertion: &str,
        _expected: &Expected<'_>,
    ) -> Result<crate::auth::VerifiedClaims, &'static str> {
        let _: Option<KeySet> = None;
        Err("its jwks_uri needs the remote-jwks feature")
    }
}
