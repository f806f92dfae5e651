//! Keys that come from somewhere else (a JWKS URL, a token service in the same process), and
//! the cache that refreshes them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures::future::{FutureExt, Shared};

use super::keys::KeySet;

/// A key set as fetched, with how long the source says it may be cached.
#[derive(Debug, Clone, Default)]
pub struct FetchedKeys {
    /// The keys.
    pub keys: KeySet,
    /// How long the keys may be used before fetching again (HTTP `Cache-Control: max-age`);
    /// `None` uses the layer's refresh interval.
    pub max_age: Option<Duration>,
}

impl From<KeySet> for FetchedKeys {
    fn from(keys: KeySet) -> Self {
        Self {
            keys,
            max_age: None,
        }
    }
}

/// Why a key source could not produce keys. The message is logged, never sent to clients.
#[derive(Debug, Clone)]
pub struct KeySourceError {
    message: String,
}

impl KeySourceError {
    /// An error with a message for the logs.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for KeySourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for KeySourceError {}

impl From<super::keys::KeyError> for KeySourceError {
    fn from(err: super::keys::KeyError) -> Self {
        Self::new(err.to_string())
    }
}

/// The future a [`KeySource`] returns.
pub type KeySourceFuture =
    Pin<Box<dyn Future<Output = Result<FetchedKeys, KeySourceError>> + Send>>;

/// Where verification keys come from when they are not configured statically.
///
/// The layer caches what `fetch` returns, refreshes it on an interval, refetches when a token
/// names an unknown `kid` (at most once per cooldown) and shares one fetch between concurrent
/// requests, so a source only has to fetch. Any `Fn() -> impl Future<Output = Result<FetchedKeys,
/// KeySourceError>>` is a source:
///
/// ```
/// use tower_fhir::auth::{FetchedKeys, KeySet, KeySource, VerificationKey};
///
/// let source = || async {
///     let key = VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more")?.with_kid("k1");
///     Ok::<_, tower_fhir::auth::KeySourceError>(FetchedKeys::from(KeySet::new().with_key(key)))
/// };
/// # fn is_source(_: impl KeySource) {}
/// is_source(source);
/// ```
pub trait KeySource: Send + Sync + 'static {
    /// Fetches the current keys.
    fn fetch(&self) -> KeySourceFuture;

    /// For a source that knows when its keys change (one in the same process): a counter it
    /// moves on every change. The bearer layer then fetches again before the next token is
    /// accepted, so a retired key stops verifying at once, cached tokens included. `None`
    /// (the default): the layer finds changes by its refreshes.
    fn changes(&self) -> Option<KeyChanges> {
        None
    }
}

/// A counter of changes to a [`KeySource`]'s keys, shared by the source (which moves it) and the
/// bearer layers that read from it (which look at it on every request: one atomic load).
#[derive(Debug, Clone, Default)]
pub struct KeyChanges(Arc<AtomicU64>);

impl KeyChanges {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a change: call it after the new keys are what [`KeySource::fetch`] returns.
    pub fn changed(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// How many changes so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl<F, Fut> KeySource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<FetchedKeys, KeySourceError>> + Send + 'static,
{
    fn fetch(&self) -> KeySourceFuture {
        Box::pin(self())
    }
}

/// When a source is fetched again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefreshPolicy {
    /// Refresh after this long when the source gives no max-age.
    pub(crate) interval: Duration,
    /// At most one fetch per cooldown for unknown `kid`s and failed refreshes; also the
    /// shortest max-age honoured.
    pub(crate) cooldown: Duration,
    /// The longest max-age honoured.
    pub(crate) max_age_cap: Duration,
    /// How long the keys of the last good fetch are used while fetches fail: then dropped.
    pub(crate) max_key_age: Duration,
    /// How long one fetch may take.
    pub(crate) timeout: Duration,
}

/// Why a fetch is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// No keys were ever fetched: at most one attempt a second.
    Cold,
    /// A token names a `kid` the set lacks: at most one such refetch per cooldown.
    UnknownKid,
    /// The keys are due for a refresh (scheduled after each fetch).
    Refresh,
    /// The source said its keys changed: fetch at once, whatever the rate limits.
    Changed,
}

const COLD_RETRY: Duration = Duration::from_secs(1);

type FetchResult = Result<(), Arc<str>>;
pub(crate) type SharedFetch = Shared<Pin<Box<dyn Future<Output = FetchResult> + Send>>>;

/// A [`KeySource`]'s keys, cached and refreshed; readers never wait on a lock held across
/// a fetch.
pub(crate) struct RefreshingKeys {
    source: Box<dyn KeySource>,
    /// The only `iss` the keys of this source may vouch for, when bound to one issuer.
    pub(crate) issuer: Option<Arc<str>>,
    policy: RefreshPolicy,
    keys: RwLock<Arc<KeySet>>,
    control: Mutex<Control>,
    epoch: Instant,
    // Milliseconds since `epoch` at which a refresh is due; u64::MAX before the first fetch.
    refresh_due_ms: AtomicU64,
    // Milliseconds since `epoch` at which the keys held are too old to use (the last good
    // fetch and `max_key_age`); u64::MAX while none are held.
    stale_at_ms: AtomicU64,
    /// The keys were dropped for their age: tokens they would verify get `KeysUnavailable`.
    expired: AtomicBool,
    fetches: AtomicU64,
    /// The source's change counter, and its value when the keys held were fetched.
    changes: Option<KeyChanges>,
    seen_changes: AtomicU64,
}

#[derive(Default)]
struct Control {
    inflight: Option<SharedFetch>,
    last_attempt: Option<Instant>,
    last_kid_refetch: Option<Instant>,
    fetched: bool,
}

impl RefreshingKeys {
    pub(crate) fn new(source: Box<dyn KeySource>, policy: RefreshPolicy) -> Self {
        let changes = source.changes();
        let seen_changes = AtomicU64::new(changes.as_ref().map_or(0, KeyChanges::count));
        Self {
            changes,
            seen_changes,
            source,
            issuer: None,
            policy,
            keys: RwLock::new(Arc::new(KeySet::new())),
            control: Mutex::new(Control::default()),
            epoch: Instant::now(),
            refresh_due_ms: AtomicU64::new(u64::MAX),
            stale_at_ms: AtomicU64::new(u64::MAX),
            expired: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
        }
    }

    /// The keys as last fetched.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether a fetch has ever succeeded.
    pub(crate) fn has_fetched(&self) -> bool {
        self.control().fetched
    }

    /// How many fetches were started.
    #[cfg(test)]
    pub(crate) fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// When the keys are fetched again.
    #[cfg(test)]
    pub(crate) fn policy(&self) -> RefreshPolicy {
        self.policy
    }

    /// Whether the source says its keys changed since they were fetched.
    pub(crate) fn changed(&self) -> bool {
        self.changes
            .as_ref()
            .is_some_and(|changes| changes.count() != self.seen_changes.load(Ordering::Acquire))
    }

    /// Whether the keys were dropped for their age (fetches failing for `max_key_age`): an
    /// outage, not a bad token.
    pub(crate) fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// Starts a background refresh if one is due; never waits. Keys too old to use are
    /// dropped first (a refresh is always due by then: fetches have been failing).
    pub(crate) fn refresh_if_due(self: &Arc<Self>) {
        let due = self.refresh_due_ms.load(Ordering::Relaxed);
        if due != u64::MAX {
            let now = self.millis_since_epoch();
            if now >= due {
                if now >= self.stale_at_ms.load(Ordering::Relaxed) {
                    self.expire(now);
                }
                let _ = self.fetch(Trigger::Refresh);
            }
        }
    }

    /// Drops the keys held: too long since they were last fetched (as of `now`).
    fn expire(&self, now: u64) {
        let previous = {
            let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            // (A fetch may have just installed fresh keys, under this lock.)
            if now < self.stale_at_ms.load(Ordering::Relaxed) {
                return;
            }
            std::mem::replace(&mut *keys, Arc::new(KeySet::new()))
        };
        // Every key retired: tokens cached as verified by them are verified again.
        let _ = KeySet::new().succeed(&previous);
        self.stale_at_ms.store(u64::MAX, Ordering::Relaxed);
        self.expired.store(true, Ordering::Relaxed);
        tracing::error!(
            issuer = self.issuer.as_deref().unwrap_or("(none: keys for any issuer)"),
            max_key_age = ?self.policy.max_key_age,
            "verification keys not fetched successfully for too long: dropped; the tokens they verified are refused (503) until a fetch succeeds"
        );
    }

    /// Joins the fetch in flight, or starts one if the trigger's rate limit allows; `None`
    /// when it does not.
    pub(crate) fn fetch(self: &Arc<Self>, trigger: Trigger) -> Option<SharedFetch> {
        let mut control = self.control();
        if let Some(inflight) = &control.inflight {
            return Some(inflight.clone());
        }
        let now = Instant::now();
        let within = |last: Option<Instant>, gap| last.is_some_and(|t| now.duration_since(t) < gap);
        let allowed = match trigger {
            Trigger::Cold => !within(control.last_attempt, COLD_RETRY),
            Trigger::UnknownKid => !within(control.last_kid_refetch, self.policy.cooldown),
            Trigger::Refresh | Trigger::Changed => true,
        };
        if !allowed {
            return None;
        }
        // Only tokio drives the fetch to completion whoever waits on it, so require one.
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        control.last_attempt = Some(now);
        if trigger == Trigger::UnknownKid {
            control.last_kid_refetch = Some(now);
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);

        let this = Arc::clone(self);
        let task = runtime.spawn(async move {
            // Frees the in-flight slot even if the source panics or the task is cancelled, so
            // a later request can fetch again.
            let _clear = ClearInflight(Arc::clone(&this));
            // Read before the fetch: a change during it is seen as a change next time.
            let changes = this.changes.as_ref().map(KeyChanges::count);
            let fetched = tokio::time::timeout(this.policy.timeout, this.source.fetch()).await;
            let fetched = match fetched {
                Ok(result) => result,
                Err(_) => Err(KeySourceError::new(format!(
                    "key fetch timed out after {:?}",
                    this.policy.timeout
                ))),
            };
            let installed = this.install(fetched);
            if let (Some(changes), Ok(())) = (changes, &installed) {
                this.seen_changes.store(changes, Ordering::Release);
            }
            installed
        });
        let shared: Pin<Box<dyn Future<Output = FetchResult> + Send>> = Box::pin(
            task.map(|joined| joined.unwrap_or_else(|_| Err(Arc::from("key fetch task failed")))),
        );
        let shared = shared.shared();
        control.inflight = Some(shared.clone());
        Some(shared)
    }

    fn install(&self, fetched: Result<FetchedKeys, KeySourceError>) -> FetchResult {
        let fetched = fetched.and_then(|keys| {
            // An empty set would retire every key: more likely a broken endpoint than a real
            // rotation, so keep the last good keys.
            if keys.keys.is_empty() && !self.current().is_empty() {
                Err(KeySourceError::new("the source returned no usable keys"))
            } else {
                Ok(keys)
            }
        });
        let result = match fetched {
            Ok(FetchedKeys { keys, max_age }) => {
                let previous = self.current();
                let keys = Arc::new(keys.succeed(&previous));
                let count = keys.len();
                {
                    let mut held = self.keys.write().unwrap_or_else(PoisonError::into_inner);
                    *held = keys;
                    let stale_at = self
                        .millis_since_epoch()
                        .saturating_add(self.policy.max_key_age.as_millis() as u64);
                    self.stale_at_ms.store(stale_at, Ordering::Relaxed);
                }
                self.expired.store(false, Ordering::Relaxed);
                let fresh_for = max_age.unwrap_or(self.policy.interval).clamp(
                    self.policy.cooldown,
                    self.policy.max_age_cap.max(self.policy.cooldown),
                );
                self.schedule_refresh(fresh_for);
                tracing::debug!(keys = count, refresh_in = ?fresh_for, "verification keys fetched");
                Ok(())
            }
            Err(err) => {
                let issuer = self
                    .issuer
                    .as_deref()
                    .unwrap_or("(none: keys for any issuer)");
                if self.has_fetched() {
                    tracing::warn!(
                        issuer,
                        error = %err,
                        "could not fetch verification keys; keeping the last good ones"
                    );
                } else {
                    tracing::warn!(
                        issuer,
                        error = %err,
                        "could not fetch verification keys; no keys are known yet"
                    );
                }
                self.schedule_refresh(self.policy.cooldown);
                Err(Arc::from(err.to_string()))
            }
        };
        let issuer = self.issuer.as_deref().unwrap_or("").to_owned();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("tower_fhir_jwks_fetches_total", "issuer" => issuer, "result" => outcome)
            .increment(1);
        // The in-flight slot is cleared by the task's `ClearInflight` guard.
        self.control().fetched |= result.is_ok();
        result
    }

    fn schedule_refresh(&self, after: Duration) {
        let due = self
            .millis_since_epoch()
            .saturating_add(after.as_millis() as u64);
        self.refresh_due_ms.store(due, Ordering::Relaxed);
    }

    fn millis_since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Clears the in-flight slot when dropped: at the end of a fetch, however it ends.
struct ClearInflight(Arc<RefreshingKeys>);

impl Drop for ClearInflight {
    fn drop(&mut self) {
        self.0.control().inflight = None;
    }
}

impl fmt::Debug for RefreshingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingKeys")
            .field("policy", &self.policy)
            .field("keys", &self.current().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::VerificationKey;
    use std::sync::atomic::AtomicUsize;

    fn policy() -> RefreshPolicy {
        RefreshPolicy {
            interval: Duration::from_secs(300),
            cooldown: Duration::from_secs(30),
            max_age_cap: Duration::from_secs(86_400),
            max_key_age: Duration::from_secs(2 * 86_400),
            timeout: Duration::from_secs(5),
        }
    }

    fn counting_source(calls: Arc<AtomicUsize>, fail: bool) -> Box<dyn KeySource> {
        Box::new(move || {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                if fail {
                    return Err(KeySourceError::new("down"));
                }
                let key = VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more")
                    .unwrap()
                    .with_kid("k");
                Ok(FetchedKeys::from(KeySet::new().with_key(key)))
            }
        })
    }

    /// A source that announces its changes.
    struct Announcing {
        calls: Arc<AtomicUsize>,
        changes: KeyChanges,
    }

    impl KeySource for Announcing {
        fn fetch(&self) -> KeySourceFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let key = VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more")
                .unwrap()
                .with_kid("k");
            Box::pin(std::future::ready(Ok(FetchedKeys::from(
                KeySet::new().with_key(key),
            ))))
        }

        fn changes(&self) -> Option<KeyChanges> {
            Some(self.changes.clone())
        }
    }

    #[tokio::test]
    async fn an_announced_change_is_fetched_at_once_whatever_the_cooldown() {
        let calls = Arc::new(AtomicUsize::new(0));
        let changes = KeyChanges::new();
        let source = Announcing {
            calls: calls.clone(),
            changes: changes.clone(),
        };
        let keys = Arc::new(RefreshingKeys::new(Box::new(source), policy()));
        assert!(!keys.changed());
        keys.fetch(Trigger::Cold).unwrap().await.unwrap();
        for round in 1..=3 {
            changes.changed();
            assert!(keys.changed());
            // Within the 30 s cooldown, and again and again: each change is fetched.
            keys.fetch(Trigger::Changed).unwrap().await.unwrap();
            assert!(!keys.changed());
            assert_eq!(calls.load(Ordering::SeqCst), 1 + round);
        }
        // A source without a counter never reports a change.
        let silent = RefreshingKeys::new(counting_source(calls, false), policy());
        assert!(!silent.changed());
    }

    #[tokio::test]
    async fn concurrent_fetches_share_one_call() {
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = Arc::new(RefreshingKeys::new(
            counting_source(calls.clone(), false),
            policy(),
        ));
        let waits: Vec<_> = (0..50)
            .map(|_| keys.fetch(Trigger::Cold).unwrap())
            .collect();
        for result in futures::future::join_all(waits).await {
            assert!(result.is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(keys.current().len(), 1);
        assert!(keys.has_fetched());
        // An unknown kid refetches once, then not again within the cooldown.
        keys.fetch(Trigger::UnknownKid).unwrap().await.unwrap();
        assert!(keys.fetch(Trigger::UnknownKid).is_none());
        assert_eq!(keys.fetch_count(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failure_keeps_last_good_keys() {
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = Arc::new(RefreshingKeys::new(
            counting_source(calls.clone(), true),
            policy(),
        ));
        assert!(keys.fetch(Trigger::Cold).unwrap().await.is_err());
        assert!(!keys.has_fetched());
        // Cold retries are limited to one a second.
        assert!(keys.fetch(Trigger::Cold).is_none());
        keys.install(Ok(FetchedKeys::from(KeySet::new().with_key(
            VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap(),
        ))))
        .unwrap();
        keys.install(Err(KeySourceError::new("down again")))
            .unwrap_err();
        assert_eq!(keys.current().len(), 1);
    }

    #[test]
    fn a_failure_before_any_fetch_says_no_keys_are_known_yet() {
        let buffer = crate::testing::LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.writer())
            .finish();
        let logged = || buffer.take();
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = RefreshingKeys::new(counting_source(calls, true), policy());
        tracing::subscriber::with_default(subscriber, || {
            keys.install(Err(KeySourceError::new("down"))).unwrap_err();
            let first = logged();
            assert!(first.contains("no keys are known yet"), "{first}");
            assert!(!first.contains("last good"), "{first}");

            keys.install(Ok(FetchedKeys::from(KeySet::new().with_key(
                VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap(),
            ))))
            .unwrap();
            keys.install(Err(KeySourceError::new("down again")))
                .unwrap_err();
            let later = logged();
            assert!(later.contains("keeping the last good ones"), "{later}");
            assert!(!later.contains("no keys are known yet"), "{later}");
        });
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_cancel_the_fetch() {
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = Arc::new(RefreshingKeys::new(
            counting_source(calls.clone(), false),
            policy(),
        ));
        drop(keys.fetch(Trigger::Cold).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(keys.has_fetched());
    }

    #[tokio::test]
    async fn a_panicking_source_does_not_stop_later_fetches() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let source: Box<dyn KeySource> = Box::new(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("a buggy key source");
                }
                Ok(FetchedKeys::from(KeySet::new().with_key(
                    VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap(),
                )))
            }
        });
        let keys = Arc::new(RefreshingKeys::new(source, policy()));
        assert!(keys.fetch(Trigger::Cold).unwrap().await.is_err());
        tokio::time::sleep(COLD_RETRY + Duration::from_millis(50)).await;
        assert!(keys.fetch(Trigger::Cold).unwrap().await.is_ok());
        assert_eq!(keys.current().len(), 1);
    }

    #[tokio::test]
    async fn an_empty_set_does_not_replace_good_keys() {
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = Arc::new(RefreshingKeys::new(counting_source(calls, false), policy()));
        keys.fetch(Trigger::Cold).unwrap().await.unwrap();
        assert!(keys.install(Ok(FetchedKeys::default())).is_err());
        assert_eq!(keys.current().len(), 1);
        assert!(!keys.current().iter().any(|k| k.kid().is_none()));
    }

    #[tokio::test]
    async fn keys_not_fetched_again_within_their_max_age_are_dropped_until_a_fetch_succeeds() {
        let up = Arc::new(AtomicBool::new(true));
        let answering = Arc::clone(&up);
        let source: Box<dyn KeySource> = Box::new(move || {
            let up = answering.load(Ordering::SeqCst);
            async move {
                if !up {
                    return Err(KeySourceError::new("down"));
                }
                let key = VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more")
                    .unwrap()
                    .with_kid("k");
                Ok(FetchedKeys::from(KeySet::new().with_key(key)))
            }
        });
        let keys = Arc::new(RefreshingKeys::new(
            source,
            RefreshPolicy {
                interval: Duration::from_millis(20),
                cooldown: Duration::from_millis(10),
                max_age_cap: Duration::from_millis(20),
                max_key_age: Duration::from_millis(300),
                timeout: Duration::from_secs(5),
            },
        ));
        keys.fetch(Trigger::Cold).unwrap().await.unwrap();
        let key = Arc::clone(&keys.current().keys()[0]);
        up.store(false, Ordering::SeqCst);
        // Failing refreshes keep the last good keys while they are young enough...
        tokio::time::sleep(Duration::from_millis(50)).await;
        keys.refresh_if_due();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(keys.current().len(), 1);
        assert!(!keys.expired());
        // ... and no longer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        keys.refresh_if_due();
        assert!(keys.current().is_empty());
        assert!(keys.expired());
        assert!(
            key.is_retired(),
            "tokens cached as verified by it are verified again"
        );
        assert!(
            keys.has_fetched(),
            "fetched once: still ready, as a readiness check sees it"
        );
        // A good fetch brings them back.
        up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        keys.refresh_if_due();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(keys.current().len(), 1);
        assert!(!keys.expired());
    }

    #[test]
    fn no_runtime_means_no_fetch_rather_than_a_panic() {
        let calls = Arc::new(AtomicUsize::new(0));
        let keys = Arc::new(RefreshingKeys::new(counting_source(calls, false), policy()));
        assert!(keys.fetch(Trigger::Cold).is_none());
    }
}
