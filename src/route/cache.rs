//! The route cache: directory answers kept in moka, with single-flight misses, negative
//! caching, and stale answers served while the directory is down; fresh answers also in a
//! [`HotCache`] in front, which is all a request touches while its tenant's answer is fresh.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::ops::compute::Op;
use tokio::sync::broadcast;

use super::directory::{DirectoryError, TenantDirectory};
use super::upstream::TenantRecord;
use crate::hot_cache::HotCache;
use crate::tenant::TenantId;

/// How long answers are kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachePolicy {
    pub(crate) ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) stale_grace: Duration,
    pub(crate) failure_backoff: Duration,
    pub(crate) lookup_timeout: Duration,
    pub(crate) capacity: u64,
}

/// The cached lookup of tenants' upstreams, shared by clones of a routing layer.
///
/// Use it to drop what the cache knows of a tenant when the directory changes.
#[derive(Clone)]
pub struct RouteCache {
    inner: Arc<Inner>,
}

struct Inner {
    directory: Box<dyn TenantDirectory>,
    cache: Cache<TenantId, Cached>,
    /// Fresh answers (found or not found, never a failure), each until its `fresh_until`.
    front: HotCache<TenantId, Fresh>,
    /// Count invalidations, each of the tenants whose hash falls in it: an answer looked up
    /// before one of its tenant is not kept after it. (Striped, so that a change of one
    /// tenant leaves the others' answers in flight alone: one kept as the stale route of a
    /// directory that is down, say.)
    generations: Box<[AtomicU64]>,
    /// Counts [`invalidate_all`](RouteCache::invalidate_all)s, added to each stripe's count.
    epoch: AtomicU64,
    policy: CachePolicy,
    /// The front cache's hit and miss counters.
    counts: crate::ops::CacheCounts,
}

#[derive(Clone)]
struct Fresh {
    upstreams: Option<TenantRecord>,
    until: Instant,
}

#[derive(Clone)]
struct Cached {
    /// The answer: upstreams, `None` for an unknown tenant, or the error of a failed lookup
    /// with nothing better to serve.
    answer: Result<Option<TenantRecord>, DirectoryError>,
    /// Until then, the directory is not asked again.
    fresh_until: Instant,
    /// When moka drops the entry.
    expires_at: Instant,
    /// The invalidation count when the directory was asked: an answer asked before an
    /// invalidation (one that lands in moka after it, from a lookup in flight) is not fresh.
    generation: u64,
}

struct UntilExpiry;

impl moka::Expiry<TenantId, Cached> for UntilExpiry {
    fn expire_after_create(&self, _: &TenantId, value: &Cached, now: Instant) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &TenantId,
        value: &Cached,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }
}

impl RouteCache {
    pub(crate) fn new(directory: Box<dyn TenantDirectory>, policy: CachePolicy) -> Self {
        let cache = Cache::builder()
            .max_capacity(policy.capacity)
            .expire_after(UntilExpiry)
            .build();
        Self {
            inner: Arc::new(Inner {
                directory,
                cache,
                front: HotCache::new(usize::try_from(policy.capacity).unwrap_or(usize::MAX)),
                generations: (0..GENERATION_STRIPES).map(|_| AtomicU64::new(0)).collect(),
                epoch: AtomicU64::new(0),
                policy,
                counts: crate::ops::CacheCounts::new("route"),
            }),
        }
    }

    /// The front cache's hit and miss counters.
    pub(crate) fn counts(&self) -> &crate::ops::CacheCounts {
        &self.inner.counts
    }

    /// The tenant's upstreams (`None`: not onboarded), from the cache when fresh.
    ///
    /// Concurrent lookups of one tenant make one directory call. When the directory fails,
    /// a known answer keeps serving until the stale grace runs out, and the directory is asked
    /// again at most once per failure backoff.
    pub async fn resolve(&self, tenant: TenantId) -> Result<Option<TenantRecord>, DirectoryError> {
        if let Some(fresh) = self.fresh(tenant) {
            return Ok(fresh);
        }
        let inner = &self.inner;
        let generation = inner.generation(&tenant);
        let answer = self.resolve_slowly(tenant, generation).await;
        if inner.generation(&tenant) != generation {
            // Invalidated while the directory was asked: the answer may predate the change.
            // Serve it to this request (it was in flight) but keep it nowhere.
            inner.cache.invalidate(&tenant).await;
        } else if let Ok((upstreams, until)) = &answer {
            let fresh = Fresh {
                upstreams: upstreams.clone(),
                until: *until,
            };
            let hash = inner.front.hash(&tenant);
            inner.front.insert_if(
                hash,
                tenant,
                fresh,
                |kept| Instant::now() >= kept.until,
                || inner.generation(&tenant) == generation,
            );
        }
        answer.map(|(upstreams, _)| upstreams)
    }

    /// How long answers are kept, and how many.
    #[cfg(test)]
    pub(crate) fn policy(&self) -> CachePolicy {
        self.inner.policy
    }

    /// The most tenants the front map and the moka cache keep.
    #[cfg(test)]
    pub(crate) fn capacities(&self) -> (usize, Option<u64>) {
        (
            self.inner.front.capacity(),
            self.inner.cache.policy().max_capacity(),
        )
    }

    /// The tenant's answer if the cache holds a fresh one, without waiting.
    pub(crate) fn fresh(&self, tenant: TenantId) -> Option<Option<TenantRecord>> {
        let front = &self.inner.front;
        let fresh = front.get(front.hash(&tenant), &tenant)?;
        (Instant::now() < fresh.until).then_some(fresh.upstreams)
    }

    /// The answer from moka or the directory, and until when it is fresh.
    async fn resolve_slowly(
        &self,
        tenant: TenantId,
        generation: u64,
    ) -> Result<(Option<TenantRecord>, Instant), DirectoryError> {
        // Fresh: within its time, and asked no earlier than this request began (an answer from
        // before an invalidation may be the very route that was invalidated).
        let fresh = |cached: &Cached| {
            Instant::now() < cached.fresh_until && cached.generation >= generation
        };
        if let Some(cached) = self.inner.cache.get(&tenant).await {
            if fresh(&cached) {
                return cached
                    .answer
                    .map(|upstreams| (upstreams, cached.fresh_until));
            }
        }
        let inner = &self.inner;
        let computed = inner
            .cache
            .entry(tenant)
            .and_compute_with(|existing| async move {
                let previous = existing.map(|entry| entry.into_value());
                if let Some(previous) = &previous {
                    // Another request refreshed it while this one waited for the key lock.
                    if fresh(previous) {
                        return Op::Nop;
                    }
                }
                let asked_at = inner.generation(&tenant);
                Op::Put(inner.ask_directory(tenant, previous, asked_at).await)
            })
            .await;
        match computed.into_entry() {
            Some(entry) => {
                let cached = entry.into_value();
                cached
                    .answer
                    .map(|upstreams| (upstreams, cached.fresh_until))
            }
            None => Err(DirectoryError::new("the route cache kept no answer")),
        }
    }

    /// Forgets what the cache knows of a tenant: the next request asks the directory.
    pub async fn invalidate(&self, tenant: TenantId) {
        let inner = &self.inner;
        inner.generations[inner.stripe(&tenant)].fetch_add(1, Ordering::AcqRel);
        inner.front.remove(inner.front.hash(&tenant), &tenant);
        inner.cache.invalidate(&tenant).await;
    }

    /// Forgets every tenant.
    pub fn invalidate_all(&self) {
        let inner = &self.inner;
        inner.epoch.fetch_add(1, Ordering::AcqRel);
        inner.front.clear();
        inner.cache.invalidate_all();
    }

    /// Invalidates each tenant announced on `changes` (say, an
    /// [`InMemoryDirectory::subscribe`](super::InMemoryDirectory::subscribe) stream, or a
    /// database's change feed), until the sender is dropped. Call it within a tokio runtime.
    pub fn follow(
        &self,
        mut changes: broadcast::Receiver<TenantId>,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(tenant) => cache.invalidate(tenant).await,
                    // Missed changes: forget everything rather than serve a stale route.
                    Err(broadcast::error::RecvError::Lagged(_)) => cache.invalidate_all(),
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }
}

/// How many invalidation counts tenants share (by their hash): 32 KiB of counts. A change of
/// one tenant makes an answer for another of its stripe being looked up at that moment kept
/// nowhere (its stale route, the fallback while the directory is down, with it): 1 pair of
/// tenants in 4,096 shares a stripe.
const GENERATION_STRIPES: usize = 4096;

impl Inner {
    /// Which invalidation count is `tenant`'s.
    fn stripe(&self, tenant: &TenantId) -> usize {
        // (The stripe count divides 2^64: every stripe is as likely.)
        (self.front.hash(tenant) % GENERATION_STRIPES as u64) as usize
    }

    /// The invalidations of `tenant` so far (with those of the tenants sharing its stripe, and
    /// every `invalidate_all`): a sum of two counts that only grow, so it grows with either.
    fn generation(&self, tenant: &TenantId) -> u64 {
        self.epoch.load(Ordering::Acquire)
            + self.generations[self.stripe(tenant)].load(Ordering::Acquire)
    }

    async fn ask_directory(
        &self,
        tenant: TenantId,
        previous: Option<Cached>,
        generation: u64,
    ) -> Cached {
        let policy = &self.policy;
        let asked =
            tokio::time::timeout(policy.lookup_timeout, self.directory.lookup(tenant)).await;
        let answer =
            asked.unwrap_or_else(|_| Err(DirectoryError::new("directory lookup timed out")));
        let now = Instant::now();
        match answer {
            Ok(Some(upstreams)) => Cached {
                answer: Ok(Some(upstreams)),
                fresh_until: now + policy.ttl,
                expires_at: now + policy.ttl + policy.stale_grace,
                generation,
            },
            Ok(None) => Cached {
                answer: Ok(None),
                fresh_until: now + policy.negative_ttl,
                expires_at: now + policy.negative_ttl,
                generation,
            },
            Err(error) => {
                let fresh_until = now + policy.failure_backoff;
                match previous {
                    // Serve what was known, within its grace; ask again after the backoff.
                    Some(Cached {
                        answer: Ok(Some(upstreams)),
                        expires_at,
                        ..
                    }) if expires_at > now => {
                        tracing::warn!(%tenant, %error, "tenant directory failed; serving the last known route");
                        Cached {
                            answer: Ok(Some(upstreams)),
                            fresh_until: fresh_until.min(expires_at),
                            expires_at,
                            generation,
                        }
                    }
                    _ => {
                        tracing::warn!(%tenant, %error, "tenant directory failed");
                        Cached {
                            answer: Err(error),
                            fresh_until,
                            expires_at: fresh_until,
                            generation,
                        }
                    }
                }
            }
        }
    }
}

impl fmt::Debug for RouteCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteCache")
            .field("policy", &self.inner.policy)
            .field("entries", &self.inner.cache.entry_count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Upstream;
    use crate::version::FhirVersion;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

    fn policy() -> CachePolicy {
        CachePolicy {
            ttl: Duration::from_millis(100),
            negative_ttl: Duration::from_millis(50),
            stale_grace: Duration::from_millis(400),
            failure_backoff: Duration::from_millis(30),
            lookup_timeout: Duration::from_millis(200),
            capacity: 100,
        }
    }

    struct Fake {
        calls: AtomicUsize,
        down: AtomicBool,
        known: AtomicBool,
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            calls: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            known: AtomicBool::new(true),
        })
    }

    fn cache(fake: &Arc<Fake>) -> RouteCache {
        let fake = Arc::clone(fake);
        RouteCache::new(
            Box::new(move |_tenant| {
                let fake = Arc::clone(&fake);
                async move {
                    fake.calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if fake.down.load(Ordering::SeqCst) {
                        return Err(DirectoryError::new("down"));
                    }
                    let upstream =
                        Upstream::parse("http://127.0.0.1:1/fhir", FhirVersion::Stu3).unwrap();
                    Ok(fake
                        .known
                        .load(Ordering::SeqCst)
                        .then(|| TenantRecord::new([upstream]).unwrap()))
                }
            }),
            policy(),
        )
    }

    fn tenant() -> TenantId {
        TenantId::parse(A).unwrap()
    }

    #[tokio::test]
    async fn an_answer_asked_before_an_invalidation_is_not_served_after_it() {
        let fake = fake();
        let cache = cache(&fake);
        let tenant = TenantId::parse(A).unwrap();
        assert!(cache.resolve(tenant).await.unwrap().is_some());
        // A lookup in flight across the invalidation lands its answer in moka after it.
        let late = cache.inner.cache.get(&tenant).await.unwrap();
        fake.known.store(false, Ordering::SeqCst);
        cache.invalidate(tenant).await;
        cache.inner.cache.insert(tenant, late).await;

        assert!(
            cache.resolve(tenant).await.unwrap().is_none(),
            "the invalidated route came back"
        );
        assert_eq!(cache.fresh(tenant), Some(None));
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    /// Once the directory has been asked `calls` times.
    async fn asked(fake: &Fake, calls: usize) {
        while fake.calls.load(Ordering::SeqCst) < calls {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    // (Paused time: the directory's 10 ms pass only once every task waits, so each
    // invalidation below lands while a lookup is in flight, however busy the machine.)
    #[tokio::test(start_paused = true)]
    async fn another_tenants_invalidation_leaves_an_answer_in_flight_kept() {
        let fake = fake();
        let cache = cache(&fake);
        let tenant = tenant();
        // Another tenant, of another invalidation count.
        let other = (1..)
            .map(|n| TenantId::parse(&format!("4d1f6c2e-8a3b-4c5d-9e7f-{n:012}")).unwrap())
            .find(|other| cache.inner.stripe(other) != cache.inner.stripe(&tenant))
            .unwrap();
        let in_flight = tokio::spawn({
            let cache = cache.clone();
            async move { cache.resolve(tenant).await }
        });
        // Once the directory is asked (it answers after 10 ms).
        asked(&fake, 1).await;
        cache.invalidate(other).await;
        assert!(in_flight.await.unwrap().unwrap().is_some());
        assert!(
            cache.inner.cache.get(&tenant).await.is_some(),
            "the answer was dropped for another tenant's change"
        );
        // The same with the tenant's own change: the answer, landing in moka after the
        // invalidation, is not kept.
        cache.invalidate(tenant).await;
        let in_flight = tokio::spawn({
            let cache = cache.clone();
            async move { cache.resolve(tenant).await }
        });
        asked(&fake, 2).await;
        cache.invalidate(tenant).await;
        assert!(in_flight.await.unwrap().unwrap().is_some());
        assert!(cache.inner.cache.get(&tenant).await.is_none());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_directory_call() {
        let fake = fake();
        let cache = cache(&fake);
        let lookups = (0..100).map(|_| cache.resolve(tenant()));
        for answer in futures::future::join_all(lookups).await {
            assert!(answer.unwrap().is_some());
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_tenants_are_cached_for_the_negative_ttl() {
        let fake = fake();
        fake.known.store(false, Ordering::SeqCst);
        let cache = cache(&fake);
        assert!(cache.resolve(tenant()).await.unwrap().is_none());
        assert!(cache.resolve(tenant()).await.unwrap().is_none());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        fake.known.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(cache.resolve(tenant()).await.unwrap().is_some());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn stale_routes_serve_while_the_directory_is_down_until_the_grace_ends() {
        let fake = fake();
        let cache = cache(&fake);
        assert!(cache.resolve(tenant()).await.unwrap().is_some());
        fake.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            cache.resolve(tenant()).await.unwrap().is_some(),
            "stale answer served"
        );
        // Within the failure backoff the directory is not asked again.
        let calls = fake.calls.load(Ordering::SeqCst);
        assert!(cache.resolve(tenant()).await.unwrap().is_some());
        assert_eq!(fake.calls.load(Ordering::SeqCst), calls);
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(
            cache.resolve(tenant()).await.is_err(),
            "grace over, directory down: error"
        );
    }

    #[tokio::test]
    async fn directory_down_and_nothing_cached_is_an_error() {
        let fake = fake();
        fake.down.store(true, Ordering::SeqCst);
        let cache = cache(&fake);
        assert!(cache.resolve(tenant()).await.is_err());
        fake.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            cache.resolve(tenant()).await.unwrap().is_some(),
            "recovers after the backoff"
        );
    }

    #[tokio::test]
    async fn an_answer_looked_up_across_an_invalidation_is_not_kept() {
        let fake = fake();
        let cache = cache(&fake);
        // The directory takes 10 ms; the tenant changes (and is invalidated) meanwhile.
        let (answer, ()) = tokio::join!(cache.resolve(tenant()), async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            cache.invalidate(tenant()).await;
        });
        assert!(answer.unwrap().is_some());
        assert!(cache.fresh(tenant()).is_none(), "not put in front");
        cache.resolve(tenant()).await.unwrap();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "asked again");
        cache.resolve(tenant()).await.unwrap();
        assert!(cache.fresh(tenant()).is_some());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "then kept");
    }

    #[tokio::test]
    async fn invalidation_forces_a_new_lookup() {
        let fake = fake();
        let cache = cache(&fake);
        cache.resolve(tenant()).await.unwrap();
        cache.invalidate(tenant()).await;
        cache.resolve(tenant()).await.unwrap();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_hanging_directory_times_out() {
        let cache = RouteCache::new(
            Box::new(|_| std::future::pending::<Result<Option<TenantRecord>, DirectoryError>>()),
            policy(),
        );
        assert!(cache.resolve(tenant()).await.is_err());
    }
}
