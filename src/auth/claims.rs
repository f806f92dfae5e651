//! The claims of a verified token, as they travel in request extensions.

use std::any::Any;
use std::fmt;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

/// The claims of a bearer token whose signature and claims the layer has verified.
///
/// The bearer layer puts one in the request extensions; later layers and handlers read it
/// (in axum: `Extension<VerifiedClaims>`). Cloning is cheap (one `Arc`). The registered
/// claims have accessors; any other claim is reachable through [`get`](Self::get) and
/// [`raw`](Self::raw).
#[derive(Clone)]
pub struct VerifiedClaims {
    inner: Arc<Inner>,
}

struct Inner {
    claims: Map<String, Value>,
    expires_at: u64,
    key_id: Option<String>,
    algorithm: Option<Algorithm>,
    /// What later layers derived from these claims: the claims of a cached token are shared
    /// by all its requests, so each such layer derives its value once per token, not once per
    /// request. See [`VerifiedClaims::memoized`].
    memo: [OnceLock<Memo>; MEMO_SLOTS],
    /// The [`RevokedTokens`](super::RevokedTokens) generation at which these claims were last
    /// found not revoked.
    revocation_checked: AtomicU64,
}

/// How many layers may keep a value derived from the claims (the gateway's tenant scope, SMART
/// scopes, rate limits and audit records do; room for two more).
const MEMO_SLOTS: usize = 6;

struct Memo {
    key: MemoKey,
    /// Unwind-safe so the claims stay so (they were before they held a memo).
    value: Box<dyn Any + Send + Sync + UnwindSafe + RefUnwindSafe>,
}

/// Names the one deriving that may keep its value in a [`VerifiedClaims`]: each key made is
/// unique in the process, so a layer holding one never reads another layer's memo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoKey(u64);

impl MemoKey {
    /// A key no other caller has.
    pub(crate) fn unique() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl VerifiedClaims {
    pub(crate) fn verified(
        claims: Map<String, Value>,
        key_id: Option<String>,
        algorithm: Algorithm,
    ) -> Option<Self> {
        Self::new(claims, key_id, Some(algorithm))
    }

    /// Claims that the caller vouches for, without any verification.
    ///
    /// For tests of later layers and for services that verify tokens by other means. Returns
    /// `None` when `exp` is missing or not a number: every verified token has one.
    pub fn assume_verified(claims: Map<String, Value>) -> Option<Self> {
        Self::new(claims, None, None)
    }

    fn new(
        claims: Map<String, Value>,
        key_id: Option<String>,
        algorithm: Option<Algorithm>,
    ) -> Option<Self> {
        let expires_at = numeric_date(claims.get("exp")?)?;
        Some(Self {
            inner: Arc::new(Inner {
                claims,
                expires_at,
                key_id,
                algorithm,
                memo: Default::default(),
                revocation_checked: AtomicU64::new(0),
            }),
        })
    }

    /// The revocation list's generation at which these claims were last found not revoked.
    pub(crate) fn revocation_checked(&self) -> u64 {
        self.inner.revocation_checked.load(Ordering::Acquire)
    }

    pub(crate) fn set_revocation_checked(&self, generation: u64) {
        self.inner
            .revocation_checked
            .fetch_max(generation, Ordering::AcqRel);
    }

    /// What `derive` makes of these claims: kept for the first few keys that ask (a gateway
    /// has four such layers) and handed back to each on later requests with the same claims,
    /// derived afresh for any other key. `derive` must depend on the claims alone (and on
    /// what never changes for the key's holder).
    pub(crate) fn memoized<T>(&self, key: MemoKey, derive: impl FnOnce(&Self) -> T) -> T
    where
        T: Clone + Send + Sync + UnwindSafe + RefUnwindSafe + 'static,
    {
        let slots = &self.inner.memo;
        let mut free = None;
        for slot in slots {
            match slot.get() {
                Some(memo) if memo.key == key => {
                    let value: &(dyn Any + Send + Sync) = &*memo.value;
                    return match value.downcast_ref::<T>() {
                        Some(value) => value.clone(),
                        None => derive(self),
                    };
                }
                Some(_) => {}
                None => {
                    free = Some(slot);
                    break;
                }
            }
        }
        let value = derive(self);
        if let Some(slot) = free {
            // Another request may fill the slot first: the value is derived again next time.
            let _ = slot.set(Memo {
                key,
                value: Box::new(value.clone()),
            });
        }
        value
    }

    /// The client the token was issued to: the `client_id` claim (RFC 9068), else `azp`, else
    /// `appid` (Microsoft Entra v1), else `sub` (client-credentials tokens name the client
    /// there).
    ///
    /// ```
    /// use tower_fhir::auth::VerifiedClaims;
    ///
    /// let claims = serde_json::json!({"exp": 1, "sub": "svc", "azp": "app"});
    /// let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
    /// assert_eq!(claims.client_id(), Some("app"));
    /// ```
    pub fn client_id(&self) -> Option<&str> {
        ["client_id", "azp", "appid"]
            .into_iter()
            .find_map(|claim| self.get_str(claim))
            .or_else(|| self.subject())
    }

    /// The `iss` claim.
    pub fn issuer(&self) -> Option<&str> {
        self.get_str("iss")
    }

    /// The `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.get_str("sub")
    }

    /// The `aud` claim's values (a string or an array of strings).
    pub fn audience(&self) -> impl Iterator<Item = &str> {
        strings(self.get("aud"))
    }

    /// The `jti` claim.
    pub fn token_id(&self) -> Option<&str> {
        self.get_str("jti")
    }

    /// The `exp` claim, in seconds since the Unix epoch.
    pub fn expires_at(&self) -> u64 {
        self.inner.expires_at
    }

    /// The `nbf` claim, in seconds since the Unix epoch.
    pub fn not_before(&self) -> Option<u64> {
        self.get("nbf").and_then(numeric_date)
    }

    /// The `iat` claim, in seconds since the Unix epoch.
    pub fn issued_at(&self) -> Option<u64> {
        self.get("iat").and_then(numeric_date)
    }

    /// The granted scopes: the `scope` claim split on spaces (RFC 8693), or its array form.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self.get("scope") {
            Some(Value::String(s)) => (Some(s.split(' ').filter(|s| !s.is_empty())), None),
            other => (None, Some(strings(other))),
        };
        one.into_iter().flatten().chain(many.into_iter().flatten())
    }

    /// Whether `scope` grants this scope.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }

    /// Any claim, by name.
    pub fn get(&self, claim: &str) -> Option<&Value> {
        self.inner.claims.get(claim)
    }

    /// All claims, as the token carried them.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.inner.claims
    }

    /// The `kid` of the key that verified the token.
    pub fn key_id(&self) -> Option<&str> {
        self.inner.key_id.as_deref()
    }

    /// The algorithm the token was signed with (`None` for [`assume_verified`](Self::assume_verified)).
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.inner.algorithm
    }

    /// Whether `exp` has passed (no leeway).
    pub fn is_expired(&self) -> bool {
        self.time_left().is_none()
    }

    /// How long until `exp`, or `None` when it has passed.
    pub(crate) fn time_left(&self) -> Option<Duration> {
        // Integer seconds: `UNIX_EPOCH + exp` would overflow (and panic) for a huge `exp`.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let left = Duration::from_secs(self.inner.expires_at).checked_sub(now)?;
        (!left.is_zero()).then_some(left)
    }

    fn get_str(&self, claim: &str) -> Option<&str> {
        self.get(claim).and_then(Value::as_str)
    }
}

fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    let (one, many) = match value {
        Some(Value::String(s)) => (Some(s.as_str()), None),
        Some(Value::Array(items)) => (None, Some(items.iter().filter_map(Value::as_str))),
        _ => (None, None),
    };
    one.into_iter().chain(many.into_iter().flatten())
}

/// A JWT NumericDate: seconds since the epoch, possibly fractional (RFC 7519 §2).
fn numeric_date(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

impl fmt::Debug for VerifiedClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only what identifies the token; other claims may carry personal data.
        f.debug_struct("VerifiedClaims")
            .field("iss", &self.issuer())
            .field("sub", &self.subject())
            .field("exp", &self.expires_at())
            .field("scope", &self.scopes().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> VerifiedClaims {
        VerifiedClaims::assume_verified(value.as_object().unwrap().clone()).unwrap()
    }

    #[test]
    fn registered_claims_have_accessors() {
        let c = claims(json!({
            "iss": "https://idp", "sub": "app", "aud": ["a", "b"], "exp": 4_000_000_000u64,
            "nbf": 1.5, "iat": 10, "jti": "j", "scope": "t1  patient/*.read", "tid": "x"
        }));
        assert_eq!(c.issuer(), Some("https://idp"));
        assert_eq!(c.subject(), Some("app"));
        assert_eq!(c.audience().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.expires_at(), 4_000_000_000);
        assert_eq!(c.not_before(), Some(1));
        assert_eq!(c.issued_at(), Some(10));
        assert_eq!(c.token_id(), Some("j"));
        assert_eq!(c.scopes().collect::<Vec<_>>(), ["t1", "patient/*.read"]);
        assert!(c.has_scope("t1") && !c.has_scope("t"));
        assert_eq!(c.get("tid"), Some(&json!("x")));
        assert!(!c.is_expired());
    }

    #[test]
    fn scope_may_be_an_array_and_aud_a_string() {
        let c = claims(json!({"exp": 1, "scope": ["a", "b"], "aud": "x"}));
        assert_eq!(c.scopes().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.audience().collect::<Vec<_>>(), ["x"]);
        assert!(c.is_expired());
    }

    #[test]
    fn a_huge_exp_does_not_panic() {
        let c = claims(json!({"exp": 1e19}));
        assert!(!c.is_expired());
        assert!(c.time_left().is_some());
        let c = claims(json!({"exp": u64::MAX}));
        assert!(!c.is_expired());
    }

    #[test]
    fn exp_is_required() {
        assert!(VerifiedClaims::assume_verified(Map::new()).is_none());
        let bad = json!({"exp": "soon"}).as_object().unwrap().clone();
        assert!(VerifiedClaims::assume_verified(bad).is_none());
    }

    #[test]
    fn the_first_keys_keep_their_memos_and_others_derive_afresh() {
        let c = claims(json!({"exp": 1, "sub": "app"}));
        let keys: Vec<MemoKey> = (0..=MEMO_SLOTS).map(|_| MemoKey::unique()).collect();
        assert_ne!(keys[0], keys[1]);
        let derived = std::cell::Cell::new(0);
        let derive = |c: &VerifiedClaims| {
            derived.set(derived.get() + 1);
            c.subject().map(str::to_owned)
        };
        for key in &keys[..MEMO_SLOTS] {
            for _ in 0..3 {
                assert_eq!(c.memoized(*key, derive).as_deref(), Some("app"));
            }
        }
        assert_eq!(
            derived.get(),
            MEMO_SLOTS,
            "each of the first keys derived once"
        );
        // A clone shares the memo: it is the same token's claims.
        assert_eq!(c.clone().memoized(keys[0], derive).as_deref(), Some("app"));
        assert_eq!(derived.get(), MEMO_SLOTS);
        // One key too many derives every time.
        for _ in 0..2 {
            assert_eq!(c.memoized(keys[MEMO_SLOTS], derive).as_deref(), Some("app"));
        }
        assert_eq!(derived.get(), MEMO_SLOTS + 2);
        // The same key asking for another type derives afresh too.
        assert_eq!(c.memoized(keys[0], |_| 7u8), 7);
    }

    #[test]
    fn claims_stay_unwind_safe() {
        fn unwind_safe<T: UnwindSafe + RefUnwindSafe>() {}
        unwind_safe::<VerifiedClaims>();
    }

    #[test]
    fn debug_leaves_out_other_claims() {
        let c = claims(json!({"exp": 1, "sub": "app", "name": "Jane Patient"}));
        let shown = format!("{c:?}");
        assert!(shown.contains("app") && !shown.contains("Jane"), "{shown}");
    }
}
