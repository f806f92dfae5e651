//! Tokens revoked before they expire: [`RevokedTokens`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::claims::VerifiedClaims;

/// The tokens revoked before they expire, by issuer and `jti`, shared by whoever revokes
/// (the token endpoint's `POST /oauth/revoke`) and the bearer layers that must refuse them
/// ([`BearerAuthBuilder::revoked_tokens`](super::BearerAuthBuilder::revoked_tokens)).
///
/// Whole clients can be revoked too ([`revoke_client`](Self::revoke_client)): every token
/// issued to one up to a time.
///
/// A bearer layer looks here only when something was revoked since it last checked a token
/// (one atomic load per request otherwise), cached tokens included. An entry is kept until
/// the token it names expires, then dropped at a later revocation; a token without `jti`
/// cannot be revoked by itself (only with its client). Clones share the list.
///
/// A list filled from elsewhere (another replica's revocations, heard through a database)
/// may fall behind when this process cannot hear of them: [`set_max_staleness`] makes the
/// bearer layers refuse every token (`503`) while the list was last
/// [confirmed current](Self::confirm_current) longer ago than that, rather than accept a
/// token revoked elsewhere meanwhile.
///
/// [`set_max_staleness`]: Self::set_max_staleness
///
/// ```
/// use tower_fhir::auth::{RevokedTokens, VerifiedClaims};
///
/// let claims = serde_json::json!({"iss": "https://gw.example", "jti": "t-1", "exp": 4_000_000_000u64});
/// let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
/// let revoked = RevokedTokens::new();
/// assert!(!revoked.is_revoked(&claims));
/// assert!(revoked.revoke(&claims));
/// assert!(revoked.is_revoked(&claims));
/// assert_eq!(revoked.len(), 1);
/// ```
#[derive(Clone)]
pub struct RevokedTokens {
    inner: Arc<Inner>,
}

impl Default for RevokedTokens {
    fn default() -> Self {
        // The staleness clock starts before any instant a user of the list takes.
        epoch();
        Self {
            inner: Arc::default(),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Moves on every revocation; 0 while nothing was ever revoked, so claims (which start
    /// at 0) need no look-up until then.
    generation: AtomicU64,
    /// `jti` → the issuers that revoked a token with it, and when each expires.
    entries: RwLock<HashMap<String, Vec<Entry>>>,
    /// How many `jti`s were kept when expired entries last went.
    entries_pruned_at: AtomicUsize,
    /// Client (`sub`) → the issuers that revoked every token issued to it until then, and
    /// until when such a token may live.
    clients: RwLock<HashMap<String, Vec<ClientEntry>>>,
    /// How many clients were kept when expired entries last went.
    clients_pruned_at: AtomicUsize,
    /// The longest the list may go unconfirmed, in milliseconds; 0: no limit.
    max_staleness_ms: AtomicU64,
    /// As of when the list was last confirmed current: milliseconds since [`epoch`], plus 1
    /// (0: never).
    current_as_of: AtomicU64,
}

/// The instant the staleness clock counts from: a day before the first list was made (or as
/// long before as the clock goes back), so that the instants its users take are after it.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        [86_400, 3_600, 60, 1]
            .into_iter()
            .find_map(|back| now.checked_sub(Duration::from_secs(back)))
            .unwrap_or(now)
    })
}

/// `at` as milliseconds since [`epoch`] plus 1; 0 (never) for an instant before it, which
/// must not count as later than it was.
fn clock_mark(at: Instant) -> u64 {
    match at.checked_duration_since(epoch()) {
        Some(since) => u64::try_from(since.as_millis()).unwrap_or(u64::MAX - 1) + 1,
        None => 0,
    }
}

struct Entry {
    issuer: Option<String>,
    expires_at: u64,
}

struct ClientEntry {
    issuer: Option<String>,
    /// Tokens issued (`iat`) at or before this time are refused.
    revoked_at: u64,
    /// When the last of them expires: the entry is dropped after.
    until: u64,
}

/// Where revocations are recorded for other processes to learn of (a database shared by
/// replicas, which tells each of them: see `tower_fhir::postgres`). The token endpoint calls
/// [`record`](Self::record) for every token it revokes, after revoking it in its own
/// [`RevokedTokens`], and answers only once it succeeded.
pub trait RevocationLog: Send + Sync + 'static {
    /// Records that the token of `issuer` with this `jti` is revoked until `expires_at` (Unix
    /// seconds: the token endpoint gives [`revoked_until`] of its `exp`, an hour past it, as
    /// long as a bearer layer may take it). The error is for the log.
    fn record(
        &self,
        issuer: Option<&str>,
        jti: &str,
        expires_at: u64,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;

    /// Records that every token `issuer` issued to `client` (its `sub`) up to `revoked_at` is
    /// revoked, until `until` (when the last of them expires); see
    /// [`RevokedTokens::revoke_client`]. The default fails: a log that cannot tell other
    /// processes leaves their bearer layers accepting the tokens, which must not pass
    /// unnoticed.
    fn record_client(
        &self,
        issuer: Option<&str>,
        client: &str,
        revoked_at: u64,
        until: u64,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let _ = (issuer, client, revoked_at, until);
        Box::pin(std::future::ready(Err(
            "this revocation log does not record revoked clients".to_owned(),
        )))
    }
}

impl fmt::Debug for RevokedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevokedTokens")
            .field("len", &self.len())
            .finish()
    }
}

/// Until when a token that expires at `expires_at` (Unix seconds) must stay revoked: past its
/// expiry by the longest leeway a bearer layer takes (an hour), for a layer with a leeway
/// still takes it until then. What to give [`RevokedTokens::revoke_id`] and a
/// [`RevocationLog`]'s `record` for a token revoked by its claims.
pub fn revoked_until(expires_at: u64) -> u64 {
    expires_at.saturating_add(super::MAX_LEEWAY.as_secs())
}

impl RevokedTokens {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes the token these claims are from, until it can verify no more: its expiry and
    /// then the longest clock-skew leeway a bearer layer takes (an hour; [`revoked_until`]),
    /// since a layer with a leeway still takes it that long after its `exp`. `false` when it
    /// has no `jti` (it cannot be told from others) or verifies no more (nothing to revoke).
    pub fn revoke(&self, claims: &VerifiedClaims) -> bool {
        match claims.token_id() {
            Some(jti) => self.revoke_id(claims.issuer(), jti, revoked_until(claims.expires_at())),
            None => false,
        }
    }

    /// Revokes the token of `issuer` with this `jti`, until `expires_at` (Unix seconds: for a
    /// token whose `exp` is known, [`revoked_until`] of it). `false` when that time has passed.
    pub fn revoke_id(&self, issuer: Option<&str>, jti: &str, expires_at: u64) -> bool {
        let now = unix_now();
        if expires_at <= now {
            return false;
        }
        let mut entries = self
            .inner
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Expired entries go now and then: when the map has doubled since they last went (a
        // start or a listener's catch-up applying every revoked token stays linear, not a
        // scan of all of them for each).
        let pruned = &self.inner.entries_pruned_at;
        if entries.len() >= 2 * pruned.load(Ordering::Relaxed) {
            entries.retain(|_, revoked| {
                revoked.retain(|entry| entry.expires_at > now);
                !revoked.is_empty()
            });
            pruned.store(entries.len().max(16), Ordering::Relaxed);
        }
        let revoked = entries.entry(jti.to_owned()).or_default();
        match revoked
            .iter_mut()
            .find(|entry| entry.issuer.as_deref() == issuer)
        {
            // (An entry left from before, expired or not, lasts as long as the later one.)
            Some(entry) => entry.expires_at = entry.expires_at.max(expires_at),
            None => revoked.push(Entry {
                issuer: issuer.map(str::to_owned),
                expires_at,
            }),
        }
        drop(entries);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Revokes every token `issuer` issued to `client` (the token's `sub`, as the token
    /// endpoint issues them) up to `revoked_at` (its `iat` at or before it; a token without
    /// `iat` too), until `until` (Unix seconds: when the last such token expires). For a
    /// client whose registration is revoked: its live tokens stop working at once, not when
    /// they expire. `false` when `until` has passed.
    pub fn revoke_client(
        &self,
        issuer: Option<&str>,
        client: &str,
        revoked_at: u64,
        until: u64,
    ) -> bool {
        let now = unix_now();
        if until <= now {
            return false;
        }
        let mut clients = self
            .inner
            .clients
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Expired entries go now and then: when the map has doubled since they last went (a
        // start applying every revoked client stays linear).
        let pruned = &self.inner.clients_pruned_at;
        if clients.len() >= 2 * pruned.load(Ordering::Relaxed) {
            clients.retain(|_, revoked| {
                revoked.retain(|entry| entry.until > now);
                !revoked.is_empty()
            });
            pruned.store(clients.len().max(16), Ordering::Relaxed);
        }
        let revoked = clients.entry(client.to_owned()).or_default();
        match revoked
            .iter_mut()
            .find(|entry| entry.issuer.as_deref() == issuer)
        {
            Some(entry) => {
                entry.revoked_at = entry.revoked_at.max(revoked_at);
                entry.until = entry.until.max(until);
            }
            None => revoked.push(ClientEntry {
                issuer: issuer.map(str::to_owned),
                revoked_at,
                until,
            }),
        }
        drop(clients);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Whether the token these claims are from was revoked, by its `jti` or with its client.
    pub fn is_revoked(&self, claims: &VerifiedClaims) -> bool {
        if let Some(jti) = claims.token_id() {
            let entries = self
                .inner
                .entries
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let by_id = entries.get(jti).is_some_and(|revoked| {
                revoked
                    .iter()
                    .any(|entry| entry.issuer.as_deref() == claims.issuer())
            });
            if by_id {
                return true;
            }
        }
        let Some(client) = claims.subject() else {
            return false;
        };
        let clients = self
            .inner
            .clients
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.get(client).is_some_and(|revoked| {
            revoked.iter().any(|entry| {
                entry.issuer.as_deref() == claims.issuer()
                    && claims
                        .issued_at()
                        .is_none_or(|issued| issued <= entry.revoked_at)
            })
        })
    }

    /// The latest cut-off of the tokens `issuer` issued to `client` that is still kept: every
    /// one issued (`iat`) at or before this second is refused. `None` when none is kept.
    #[cfg(feature = "token")]
    pub(crate) fn client_revoked_at(&self, issuer: Option<&str>, client: &str) -> Option<u64> {
        let now = unix_now();
        self.inner
            .clients
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(client)?
            .iter()
            .filter(|entry| entry.issuer.as_deref() == issuer && entry.until > now)
            .map(|entry| entry.revoked_at)
            .max()
    }

    /// How many revoked tokens are listed by `jti` that are not past their time yet (expired
    /// ones are kept until the list has doubled, then dropped together); revoked clients are
    /// not counted.
    pub fn len(&self) -> usize {
        let now = unix_now();
        self.inner
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flatten()
            .filter(|entry| entry.expires_at > now)
            .count()
    }

    /// Whether no token is listed by `jti` (clients may be revoked).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the bearer layers given this list refuse every token (`503`, an `OperationOutcome`
    /// of `transient`, `Retry-After: 5`) while the list was last
    /// [confirmed current](Self::confirm_current) more than `max` ago, or never was; `None`
    /// (the default) lifts the limit. For a list that hears of revocations made elsewhere (a
    /// follower such as `tower_fhir::postgres`'s `follow_revocations` confirms it as it
    /// hears its database): a token revoked there is then never taken here for longer than
    /// `max` while this process is cut off, at the price of refusing every token meanwhile. A
    /// list filled only in this process needs no limit. Checked before a token is verified:
    /// one clock read a request while a limit is set, nothing otherwise.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use tower_fhir::auth::RevokedTokens;
    ///
    /// let revoked = RevokedTokens::new();
    /// assert!(!revoked.is_stale());
    /// revoked.set_max_staleness(Some(Duration::from_secs(5)));
    /// assert!(revoked.is_stale(), "never confirmed");
    /// revoked.confirm_current(Instant::now());
    /// assert!(!revoked.is_stale());
    /// revoked.set_max_staleness(Some(Duration::from_millis(1)));
    /// std::thread::sleep(Duration::from_millis(5));
    /// assert!(revoked.is_stale(), "confirmed too long ago");
    /// ```
    pub fn set_max_staleness(&self, max: Option<Duration>) {
        let ms = max.map_or(0, |max| {
            u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.inner.max_staleness_ms.store(ms, Ordering::Relaxed);
    }

    /// The limit [`set_max_staleness`](Self::set_max_staleness) set, if any.
    pub fn max_staleness(&self) -> Option<Duration> {
        match self.inner.max_staleness_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Says the list holds every revocation recorded anywhere up to `as_of` (a follower
    /// calls it with the instant it asked its source, once the answer showed it had missed
    /// nothing). An earlier instant than one confirmed before changes nothing.
    pub fn confirm_current(&self, as_of: Instant) {
        self.inner
            .current_as_of
            .fetch_max(clock_mark(as_of), Ordering::AcqRel);
    }

    /// Whether the bearer layers refuse tokens now for the list's staleness: a limit is set
    /// and the list was last confirmed current longer ago than it, or never.
    pub fn is_stale(&self) -> bool {
        let max = self.inner.max_staleness_ms.load(Ordering::Relaxed);
        if max == 0 {
            return false;
        }
        match self.inner.current_as_of.load(Ordering::Acquire) {
            0 => true,
            mark => clock_mark(Instant::now()).saturating_sub(mark) > max,
        }
    }

    /// How many handles share this list.
    #[cfg(feature = "postgres")]
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// A number that moves on every revocation.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Whether `claims` were revoked, looked up only when something was revoked since they
    /// were last checked (then remembered in them).
    pub(crate) fn refuses(&self, claims: &VerifiedClaims) -> bool {
        let generation = self.generation();
        if claims.revocation_checked() == generation {
            return false;
        }
        if self.is_revoked(claims) {
            return true;
        }
        claims.set_revocation_checked(generation);
        false
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: serde_json::Value) -> VerifiedClaims {
        VerifiedClaims::assume_verified(value.as_object().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_list_is_stale_only_with_a_limit_and_past_it() {
        let revoked = RevokedTokens::new();
        let now = Instant::now();
        let ago = |secs| now.checked_sub(Duration::from_secs(secs)).unwrap_or(now);
        revoked.confirm_current(ago(30));
        assert!(!revoked.is_stale(), "no limit, never stale");
        assert_eq!(revoked.max_staleness(), None);
        revoked.set_max_staleness(Some(Duration::from_secs(10)));
        assert_eq!(revoked.max_staleness(), Some(Duration::from_secs(10)));
        assert!(revoked.is_stale(), "confirmed 30 s ago (or never)");
        revoked.confirm_current(now);
        assert!(!revoked.is_stale(), "confirmed now");
        // An earlier confirmation (a slow answer to an older question) takes nothing back,
        // and clones share the state.
        revoked.clone().confirm_current(ago(20));
        assert!(!revoked.is_stale());
        revoked.set_max_staleness(Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(revoked.clone().is_stale(), "5 ms is past a 1 ms limit");
        revoked.set_max_staleness(None);
        assert!(!revoked.is_stale(), "the limit lifted");
        let never = RevokedTokens::new();
        never.set_max_staleness(Some(Duration::from_secs(86_400)));
        assert!(
            never.is_stale(),
            "never confirmed is stale, whatever the limit"
        );
        // An instant before the clock's start counts as never, not as its start.
        assert_eq!(clock_mark(epoch()), 1);
        if let Some(before) = epoch().checked_sub(Duration::from_secs(1)) {
            assert_eq!(clock_mark(before), 0);
        }
    }

    #[test]
    fn a_revoked_client_loses_the_tokens_issued_to_it_until_then() {
        let revoked = RevokedTokens::new();
        let token = |iss: &str, sub: &str, iat: u64| {
            claims(json!({"iss": iss, "sub": sub, "iat": iat, "exp": 4_000_000_000u64}))
        };
        let (before, same_second, after) = (
            token("https://a", "app", 1_000),
            token("https://a", "app", 2_000),
            token("https://a", "app", 2_001),
        );
        let other_issuer = token("https://b", "app", 1_000);
        let other_client = token("https://a", "web", 1_000);
        let no_iat = claims(json!({"iss": "https://a", "sub": "app", "exp": 4_000_000_000u64}));
        assert!(!revoked.refuses(&before));
        assert!(revoked.revoke_client(Some("https://a"), "app", 2_000, 4_000_000_000));
        assert!(revoked.refuses(&before), "a checked token is checked again");
        assert!(revoked.refuses(&same_second));
        assert!(revoked.refuses(&no_iat));
        assert!(!revoked.refuses(&after), "issued after the revocation");
        assert!(!revoked.refuses(&other_issuer));
        assert!(!revoked.refuses(&other_client));
        assert_eq!(revoked.len(), 0, "no token is listed by jti");
        // Past its tokens' lifetime, nothing is revoked.
        assert!(!revoked.revoke_client(Some("https://a"), "web", 0, 1));
        assert!(!revoked.refuses(&other_client));
    }

    #[test]
    fn revokes_by_issuer_and_jti_until_expiry() {
        let revoked = RevokedTokens::new();
        let ours = claims(json!({"iss": "https://a", "jti": "1", "exp": 4_000_000_000u64}));
        let theirs = claims(json!({"iss": "https://b", "jti": "1", "exp": 4_000_000_000u64}));
        let no_jti = claims(json!({"iss": "https://a", "exp": 4_000_000_000u64}));
        assert!(!revoked.refuses(&ours));
        assert!(revoked.revoke(&ours));
        assert!(revoked.is_revoked(&ours) && revoked.refuses(&ours));
        assert!(
            !revoked.is_revoked(&theirs),
            "another issuer's token with the same jti"
        );
        assert!(!revoked.revoke(&no_jti) && !revoked.refuses(&no_jti));
        // Twice is once.
        assert!(revoked.revoke(&ours));
        assert_eq!(revoked.len(), 1);
        // Revoked by its claims: kept past its expiry by the longest leeway a bearer layer
        // takes, within which a layer may still take it.
        let recent = unix_now() - 60;
        let lately = claims(json!({"iss": "https://a", "jti": "lately", "exp": recent}));
        assert!(revoked.revoke(&lately) && revoked.is_revoked(&lately));
        assert_eq!(revoked_until(recent), recent + 3600);
        assert!(revoked.revoke_id(Some("https://a"), "lately", revoked_until(recent)));
        let gone = claims(json!({"iss": "https://a", "jti": "gone", "exp": unix_now() - 3601}));
        assert!(!revoked.revoke(&gone));
        revoked.inner.entries.write().unwrap().remove("lately");
        // Expired: nothing to revoke; expired entries are not counted (and are dropped once
        // the list has doubled).
        assert!(!revoked.revoke_id(Some("https://a"), "old", 1));
        let soon = unix_now() + 1;
        assert!(revoked.revoke_id(Some("https://a"), "soon", soon));
        assert_eq!(revoked.len(), 2);
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert!(revoked.revoke(&theirs));
        assert_eq!(revoked.len(), 2, "the expired entry was counted");
    }

    #[test]
    fn many_revocations_at_once_drop_expired_entries_now_and_then_not_each_time() {
        let revoked = RevokedTokens::new();
        let later = unix_now() + 3600;
        for n in 0..20_000 {
            assert!(revoked.revoke_id(Some("https://a"), &n.to_string(), later));
        }
        assert_eq!(revoked.len(), 20_000);
        // Pruned when it doubles: never more than twice what still counts.
        let soon = unix_now() + 1;
        for n in 0..40 {
            assert!(revoked.revoke_id(Some("https://b"), &format!("soon-{n}"), soon));
        }
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(revoked.len(), 20_000);
        // A jti revoked again keeps the later time.
        assert!(revoked.revoke_id(Some("https://a"), "0", later + 10));
        assert!(revoked.revoke_id(Some("https://a"), "0", later - 10));
        let kept = revoked.inner.entries.read().unwrap()["0"][0].expires_at;
        assert_eq!(kept, later + 10);
    }

    #[test]
    fn a_checked_token_is_looked_up_again_only_after_a_revocation() {
        let revoked = RevokedTokens::new();
        let token = claims(json!({"iss": "https://a", "jti": "1", "exp": 4_000_000_000u64}));
        let other = claims(json!({"iss": "https://a", "jti": "2", "exp": 4_000_000_000u64}));
        assert!(!revoked.refuses(&token));
        assert_eq!(token.revocation_checked(), revoked.generation());
        revoked.revoke(&other);
        assert_ne!(token.revocation_checked(), revoked.generation());
        assert!(!revoked.refuses(&token));
        revoked.revoke(&token);
        // The claims a cache shares are refused on their next use.
        assert!(revoked.refuses(&token.clone()));
        assert!(revoked.refuses(&token));
    }
}
