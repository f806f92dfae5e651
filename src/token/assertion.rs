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
/// The most assertions of one client remembered at once: a client that makes assertions
/// faster than about 30 a second (each remembered five and a half minutes) is refused
/// until some expire, and cannot fill the memory shared with the other clients.
const MAX_REMEMBERED_PER_CLIENT: usize = 10_000;
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

/// The `jti`s of accepted assertions, by client, until each expires.
#[derive(Debug, Default)]
struct Seen {
    by_client: HashMap<String, HashMap<String, u64>>,
    /// How many `jti`s `by_client` holds, all clients together.
    total: usize,
}

impl Seen {
    fn remember(
        &mut self,
        client: &str,
        jti: &str,
        until: u64,
        now: u64,
    ) -> Result<(), &'static str> {
        if let Some(jtis) = self.by_client.get(client) {
            if jtis.get(jti).is_some_and(|&expires| expires > now) {
                return Err("its jti was used before");
            }
            if jtis.len() >= MAX_REMEMBERED_PER_CLIENT {
                self.forget_expired(Some(client), now);
                if self.by_client.get(client).map_or(0, HashMap::len) >= MAX_REMEMBERED_PER_CLIENT {
                    return Err(
                        "too many of the client's assertions are remembered; refused until some expire",
                    );
                }
            }
        }
        if self.total >= MAX_REMEMBERED {
            self.forget_expired(None, now);
            if self.total >= MAX_REMEMBERED {
                return Err("too many assertions are remembered; refused until some expire");
            }
        }
        let jtis = self.by_client.entry(client.to_owned()).or_default();
        if jtis.insert(jti.to_owned(), until).is_none() {
            self.total += 1;
        }
        Ok(())
    }

    /// Forgets the expired `jti`s of `client`, or of every client.
    fn forget_expired(&mut self, client: Option<&str>, now: u64) {
        let mut forgotten = 0;
        let mut sweep = |jtis: &mut HashMap<String, u64>| {
            let before = jtis.len();
            jtis.retain(|_, expires| *expires > now);
            forgotten += before - jtis.len();
        };
        match client {
            Some(client) => {
                if let Some(jtis) = self.by_client.get_mut(client) {
                    sweep(jtis);
                }
            }
            None => self.by_client.values_mut().for_each(&mut sweep),
        }
        self.by_client.retain(|_, jtis| !jtis.is_empty());
        self.total -= forgotten;
    }
}

/// Verifies client assertions and remembers their `jti`s until they expire.
pub(super) struct Assertions {
    /// What an assertion's `aud` must be: the token endpoint's URL.
    audiences: Vec<String>,
    /// The `jti`s of assertions accepted, by client, and when each expires.
    seen: Mutex<Seen>,
    /// The keys of clients registered with a `jwks_uri`, fetched and cached per URL.
    #[cfg(feature = "remote-jwks")]
    remote: Mutex<HashMap<String, Arc<crate::auth::RemoteKeys>>>,
}

impl Assertions {
    pub(super) fn new(audiences: Vec<String>) -> Self {
        Self {
            audiences,
            seen: Mutex::new(Seen::default()),
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
    /// accepted algorithm, `iss` and `sub` its id, `aud` this endpoint alone, `exp` no more than
    /// five minutes ahead, an `iat` (when there is one) not in the future, a `jti` never seen
    /// before here (then remembered until `exp`). On
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
        // This endpoint among others: any of them could replay it here within its minutes.
        if claims.audience().nth(1).is_some() {
            return Err("its aud names other servers too");
        }
        let now = unix_now();
        if claims.expires_at() > now + MAX_LIFETIME_SECS + LEEWAY_SECS {
            return Err("its exp is more than five minutes ahead");
        }
        // Made in the future: a clock far off, or an assertion made ahead to be used later.
        if claims
            .issued_at()
            .is_some_and(|iat| iat > now + LEEWAY_SECS)
        {
            return Err("its iat is in the future");
        }
        let jti = match claims.token_id() {
            // (Printable ASCII and space, as a client id: what every store can keep.)
            Some(jti)
                if !jti.is_empty()
                    && jti.len() <= MAX_JTI_LEN
                    && jti.bytes().all(|b| (0x20..=0x7E).contains(&b)) =>
            {
                jti
            }
            _ => return Err("it has no jti (or one too long, or not printable ASCII)"),
        };
        // One second more: an assertion is taken until `exp + LEEWAY_SECS` inclusive, and a `jti`
        // remembered until then counts as unused from that second on.
        let until = claims.expires_at() + LEEWAY_SECS + 1;
        self.remember(&client.id, jti, until)?;
        Ok((jti.to_owned(), until))
    }

    /// Forgets that `client` used `jti`: an assertion remembered and then not accepted after
    /// all (the replay guard could not record it).
    pub(super) fn forget(&self, client: &str, jti: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(jtis) = seen.by_client.get_mut(client) else {
            return;
        };
        if jtis.remove(jti).is_some() {
            if jtis.is_empty() {
                seen.by_client.remove(client);
            }
            seen.total -= 1;
        }
    }

    /// Remembers an assertion's `jti` until `until`; refuses one seen before, and one past
    /// the client's share or everyone's (until some expire).
    fn remember(&self, client: &str, jti: &str, until: u64) -> Result<(), &'static str> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remember(client, jti, until, unix_now())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_until_it_expires() {
        let mut seen = Seen::default();
        assert_eq!(seen.remember("app", "j1", 100, 0), Ok(()));
        assert_eq!(
            seen.remember("app", "j1", 100, 50),
            Err("its jti was used before")
        );
        // Another client's jti of the same text is its own.
        assert_eq!(seen.remember("other", "j1", 100, 50), Ok(()));
        // Past its expiry the entry no longer counts.
        assert_eq!(seen.remember("app", "j1", 200, 100), Ok(()));
        assert_eq!(seen.total, 2);
    }

    #[test]
    fn one_client_cannot_fill_what_every_client_shares() {
        let mut seen = Seen::default();
        for n in 0..MAX_REMEMBERED_PER_CLIENT {
            assert_eq!(seen.remember("greedy", &n.to_string(), 1_000, 0), Ok(()));
        }
        // The greedy client is refused until some of its assertions expire; others are not.
        let refused = seen.remember("greedy", "one more", 1_000, 10);
        assert!(refused.unwrap_err().contains("the client's assertions"));
        assert_eq!(seen.remember("polite", "j1", 1_000, 10), Ok(()));
        assert_eq!(seen.total, MAX_REMEMBERED_PER_CLIENT + 1);
        // Once they expire, the greedy client's expired ones are forgotten, the polite
        // client's still-live one kept.
        assert_eq!(seen.remember("greedy", "one more", 3_000, 1_000), Ok(()));
        assert_eq!(seen.by_client["greedy"].len(), 1);
        assert_eq!(seen.by_client["polite"].len(), 1);
        assert_eq!(seen.total, 2);
    }

    #[test]
    fn everyones_total_is_bounded_and_freed_as_assertions_expire() {
        let mut seen = Seen::default();
        let clients = MAX_REMEMBERED / MAX_REMEMBERED_PER_CLIENT;
        for client in 0..clients {
            for n in 0..MAX_REMEMBERED_PER_CLIENT {
                let until = if client == 0 { 10 } else { 1_000 };
                seen.remember(&client.to_string(), &n.to_string(), until, 0)
                    .unwrap();
            }
        }
        assert_eq!(seen.total, MAX_REMEMBERED);
        // Full: a new client is refused while nothing has expired...
        assert_eq!(
            seen.remember("new", "j1", 1_000, 5),
            Err("too many assertions are remembered; refused until some expire")
        );
        // ... and taken once the first client's have: they are forgotten.
        assert_eq!(seen.remember("new", "j1", 1_000, 20), Ok(()));
        assert!(!seen.by_client.contains_key("0"));
        assert_eq!(seen.total, MAX_REMEMBERED - MAX_REMEMBERED_PER_CLIENT + 1);
    }
}
