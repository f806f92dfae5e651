//! Rate limits per tenant and per client: [`RateLimitLayer`].
//!
//! A [`RateLimit`] is a steady rate and a burst (`{"requests_per_second": 2, "burst": 5}`):
//! a key that has been quiet may send `burst` requests at once, and then one every
//! `1 / requests_per_second` seconds (GCRA, the [`governor`] crate's, one limiter per key so
//! that each key has its own quota). Two kinds of keys are limited:
//!
//! | key | its limit comes from | counts |
//! |---|---|---|
//! | the tenant ([`TenantId`] in the extensions) | a [`TenantRateLimit`] in the extensions, which [`TenantRoutingLayer`](crate::route::TenantRoutingLayer) puts there from the tenant's directory record (so no lookup of its own) | every client of that tenant together |
//! | the client (the verified token's [`client_id`](VerifiedClaims::client_id): `client_id`, else `azp`, `appid`, `sub`) | the [`ClientLimits`] given to [`client_limits`](RateLimitBuilder::client_limits) (say the token endpoint's client store), cached per client for [`client_limit_ttl`](RateLimitBuilder::client_limit_ttl) | one client across all its tenants |
//!
//! A request over either limit is answered `429 Too Many Requests` with `Retry-After` (whole
//! seconds until the limit lets a request through again, rounded up, at least 1) and an
//! `OperationOutcome` with the code `throttled`; it never reaches the inner service. Other
//! tenants and clients are untouched: each key has its own limiter. The client's limit is
//! checked first, so a client refused by its own limit takes nothing from its tenant's; and a
//! tenant whose limit refused a request refuses the next ones, until it would let one through
//! again, before the client's limit counts them, so a client of a tenant that others saturate
//! keeps its own quota for its other tenants. (A request that comes as the tenant's limit
//! frees may still find it taken by another client's: its client's count is then spent.)
//! Requests without a tenant, without a limit, or without verified claims pass. A read that
//! a granular SMART scope allows only after a check search counts once: the
//! [`SmartScopeLayer`](crate::smart::SmartScopeLayer)'s first search is counted, and its
//! other searches and the read itself pass; a client over its limit gets `429` for the read
//! before any search reaches the upstream.
//!
//! **A changed limit** applies to its key at the next request that carries it: for a tenant,
//! as soon as the routing cache has the new record (at once where the directory announces
//! changes, see [`RouteCache::follow`](crate::route::RouteCache::follow)); for a client, when
//! its cached limit expires (default 10 s; [`RateLimitLayer::forget_client`] applies it at
//! once, as the gateway's admin API does). The trade-off chosen here, rather than signing the
//! limit into the token: a changed limit reaches tokens already issued, and tokens of other
//! issuers (with the same client id) are limited too, at the cost of one client-store read per
//! client every TTL. The limiter of a key whose limit changed starts afresh (full burst).
//!
//! **Memory is bounded**: at most [`capacity`](RateLimitBuilder::capacity) tenants and as
//! many clients are kept (default 100 000 each). When full, a key whose limiter has refilled
//! (quiet for `burst / requests_per_second`, so forgetting it loses nothing) makes room first;
//! only when none has, another is forgotten (and starts afresh, with its full burst, when it
//! comes back).
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{header, Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fhir::limit::{RateLimit, RateLimitLayer, TenantRateLimit};
//! use tower_fhir::tenant::TenantId;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let service = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new())
//!     .service_fn(|_: Request<Full<Bytes>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
//!     });
//! let limit: RateLimit = serde_json::from_str(r#"{"requests_per_second": 1, "burst": 2}"#).unwrap();
//! let request = |tenant: &str| {
//!     let mut request = Request::new(Full::<Bytes>::default());
//!     request.extensions_mut().insert(TenantId::parse(tenant).unwrap());
//!     request.extensions_mut().insert(TenantRateLimit(limit));
//!     request
//! };
//! let (a, b) = ("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f");
//!
//! // The burst, then a refusal.
//! for _ in 0..2 {
//!     assert_eq!(service.clone().oneshot(request(a)).await.unwrap().status(), StatusCode::OK);
//! }
//! let refused = service.clone().oneshot(request(a)).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
//! let body = refused.into_body().collect().await.unwrap().to_bytes();
//! let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(outcome["issue"][0]["code"], "throttled");
//!
//! // Another tenant is untouched.
//! assert_eq!(service.oneshot(request(b)).await.unwrap().status(), StatusCode::OK);
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{header, HeaderValue, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{MemoKey, VerifiedClaims};
use crate::body::ResponseBody;
use crate::future::PassOrOwn;
use crate::hot_cache::HotCache;
use crate::outcome::{IssueType, OperationOutcome};
use crate::tenant::TenantId;

/// The highest `requests_per_second` and `burst` accepted.
const MAX_RATE: u32 = 1_000_000_000;

/// A steady rate and a burst: `{"requests_per_second": N, "burst": M}` in JSON (`burst`
/// defaults to `requests_per_second`). Both are whole numbers from 1 to 1 000 000 000.
///
/// ```
/// use tower_fhir::limit::RateLimit;
///
/// let limit: RateLimit = serde_json::from_str(r#"{"requests_per_second": 2, "burst": 5}"#).unwrap();
/// assert_eq!((limit.requests_per_second(), limit.burst()), (2, 5));
/// assert_eq!(limit, RateLimit::new(2, 5).unwrap());
/// let refused = serde_json::from_str::<RateLimit>(r#"{"requests_per_second": 0}"#).unwrap_err();
/// assert!(refused.to_string().contains("requests_per_second must be a whole number from 1"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    per_second: NonZeroU32,
    burst: NonZeroU32,
}

/// A rate limit that cannot be used: the one sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRateLimit(String);

impl fmt::Display for InvalidRateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidRateLimit {}

impl RateLimit {
    /// `requests_per_second` steadily, `burst` at once after a quiet time.
    pub fn new(requests_per_second: u32, burst: u32) -> Result<Self, InvalidRateLimit> {
        Ok(Self {
            per_second: checked("requests_per_second", f64::from(requests_per_second))?,
            burst: checked("burst", f64::from(burst))?,
        })
    }

    /// The steady rate.
    pub fn requests_per_second(&self) -> u32 {
        self.per_second.get()
    }

    /// How many requests may come at once after a quiet time.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    fn quota(&self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }

    /// How long a key must be quiet for its limiter to be full again.
    fn refill_nanos(&self) -> u64 {
        u64::from(self.burst.get()).saturating_mul(1_000_000_000) / u64::from(self.per_second.get())
    }
}

fn checked(what: &str, value: f64) -> Result<NonZeroU32, InvalidRateLimit> {
    let whole = value.fract() == 0.0 && (1.0..=f64::from(MAX_RATE)).contains(&value);
    match NonZeroU32::new(value as u32) {
        Some(value) if whole => Ok(value),
        _ => Err(InvalidRateLimit(format!(
            "rate_limit.{what} must be a whole number from 1 to {MAX_RATE}, not {value}"
        ))),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitJson {
    requests_per_second: f64,
    #[serde(default)]
    burst: Option<f64>,
}

impl Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out {
            requests_per_second: u32,
            burst: u32,
        }
        Out {
            requests_per_second: self.requests_per_second(),
            burst: self.burst(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = RateLimitJson::deserialize(deserializer)?;
        let per_second = checked("requests_per_second", json.requests_per_second)
            .map_err(serde::de::Error::custom)?;
        let burst = match json.burst {
            Some(burst) => checked("burst", burst).map_err(serde::de::Error::custom)?,
            None => per_second,
        };
        Ok(Self { per_second, burst })
    }
}

/// The tenant's rate limit, in the request extensions: the routing layer puts it there from
/// the tenant's directory record; put it there yourself in a stack of your own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantRateLimit(pub RateLimit);

/// The future a [`ClientLimits`] returns: the client's limit, `Ok(None)` for none, `Err` when
/// the source could not say.
pub type ClientLimitFuture =
    Pin<Box<dyn Future<Output = Result<Option<RateLimit>, ClientLimitUnknown>> + Send>>;

/// A [`ClientLimits`] source could not read a client's limit (its store is down, say).
#[derive(Debug)]
pub struct ClientLimitUnknown(Box<dyn std::error::Error + Send + Sync>);

impl ClientLimitUnknown {
    /// Wraps why the limit could not be read.
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(cause.into())
    }
}

impl fmt::Display for ClientLimitUnknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the client's rate limit could not be read: {}", self.0)
    }
}

impl std::error::Error for ClientLimitUnknown {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Where clients' rate limits are read from (the gateway: its token endpoint's client store).
///
/// Asked once per client per [`client_limit_ttl`](RateLimitBuilder::client_limit_ttl), never
/// per request. Only a client's first request (and its first after
/// [`forget_client`](RateLimitLayer::forget_client)) waits for the read; later, the limit
/// read before keeps counting while it is read again on a task of its own (one read at a
/// time, given up after a `client_limit_ttl`), so a slow store holds up no request; a read
/// begun before a `forget_client` is not kept. When the source fails (`Err`), the client's
/// limit last read stays in force until the next read, a `client_limit_ttl` later (logged at
/// `warn`): a store that is down does not lift the limits it held. A client whose limit was
/// never read passes unlimited by it until then. A fixed table is a source:
///
/// ```
/// use std::collections::HashMap;
/// use tower_fhir::limit::{ClientLimits, RateLimit};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limits = HashMap::from([("app-1".to_owned(), RateLimit::new(10, 20).unwrap())]);
/// assert_eq!(limits.client_limit("app-1").await.unwrap(), Some(RateLimit::new(10, 20).unwrap()));
/// assert_eq!(limits.client_limit("app-2").await.unwrap(), None);
/// # });
/// ```
pub trait ClientLimits: Send + Sync + 'static {
    /// The client's limit.
    fn client_limit(&self, client_id: &str) -> ClientLimitFuture;
}

impl ClientLimits for HashMap<String, RateLimit> {
    fn client_limit(&self, client_id: &str) -> ClientLimitFuture {
        Box::pin(std::future::ready(Ok(self.get(client_id).copied())))
    }
}

impl<T: ClientLimits + ?Sized> ClientLimits for Arc<T> {
    fn client_limit(&self, client_id: &str) -> ClientLimitFuture {
        (**self).client_limit(client_id)
    }
}

/// A configuration [`RateLimitBuilder::build`] refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The client limit TTL is zero.
    ZeroTtl,
    /// The capacity is zero.
    ZeroCapacity,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroTtl => f.write_str("the client limit TTL must be longer than zero"),
            Self::ZeroCapacity => f.write_str("the rate limit capacity must be above zero"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`RateLimitLayer`].
#[must_use]
pub struct RateLimitBuilder {
    source: Option<Box<dyn ClientLimits>>,
    issuer: Option<String>,
    ttl: Duration,
    capacity: usize,
}

impl fmt::Debug for RateLimitBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("client_limits", &self.source.is_some())
            .field("client_issuer", &self.issuer)
            .field("client_limit_ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl RateLimitBuilder {
    /// Where clients' limits are read (without it, only tenants are limited).
    pub fn client_limits(mut self, source: impl ClientLimits) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Limits clients only in tokens of this issuer (`iss`): the one whose client ids the
    /// [`client_limits`](Self::client_limits) source knows. Default: tokens of any issuer.
    pub fn client_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// How long a client's limit is used before the source is asked again. Default 10 s.
    pub fn client_limit_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How many tenants, and how many clients, are kept. Default 100 000.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<RateLimitLayer, ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::ZeroTtl);
        }
        if self.capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        Ok(self.build_checked())
    }

    fn build_checked(self) -> RateLimitLayer {
        let clock = DefaultClock::default();
        RateLimitLayer {
            shared: Arc::new(Shared {
                epoch: clock.now(),
                clock,
                tenants: HotCache::new(self.capacity),
                clients: HotCache::new(self.capacity),
                source: self.source,
                issuer: self.issuer.map(Box::from),
                ttl_nanos: u64::try_from(self.ttl.as_nanos()).unwrap_or(u64::MAX),
                memo: MemoKey::unique(),
            }),
        }
    }
}

/// A Tower layer that refuses requests over their tenant's or their client's rate limit (see
/// the [module docs](self)). Clones share the limiters.
#[derive(Clone)]
#[must_use]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Tenant limits only, with the defaults.
    pub fn new() -> Self {
        Self::builder().build_checked()
    }

    /// Starts configuring a layer.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder {
            source: None,
            issuer: None,
            ttl: Duration::from_secs(10),
            capacity: 100_000,
        }
    }

    /// Forgets the client's cached limit: its next request reads it anew (call it when the
    /// limit changed in the source). Its limiter's state is kept if the limit is the same.
    pub fn forget_client(&self, client_id: &str) {
        let clients = &self.shared.clients;
        let hash = clients.hash(client_id);
        // An entry even for a client not cached: a first read of its limit may be under way,
        // begun before the change, and must not be kept for a ttl.
        clients.update(
            hash,
            Box::from(client_id),
            |kept| ClientEntry {
                limiter: kept.and_then(|kept| kept.limiter.clone()),
                until: 0,
                forgotten: true,
                generation: kept.map_or(0, |kept| kept.generation) + 1,
            },
            |_| false,
        );
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimiting<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimiting {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared {
    clock: DefaultClock,
    epoch: <DefaultClock as Clock>::Instant,
    tenants: HotCache<TenantId, Arc<Limiter>>,
    clients: HotCache<Box<str>, ClientEntry>,
    source: Option<Box<dyn ClientLimits>>,
    issuer: Option<Box<str>>,
    ttl_nanos: u64,
    /// Names this layer's memo in verified claims: a cached token's client id (and its hash)
    /// is found once, not on each of its requests.
    memo: MemoKey,
}

/// One key's limiter, and when it was last used (nanoseconds since the layer's epoch).
struct Limiter {
    limit: RateLimit,
    gcra: DefaultDirectRateLimiter,
    last_used: AtomicU64,
    /// Until then (the clock's nanoseconds, as `last_used`) it refuses: set by a refusal, so
    /// that a tenant's limit reached is told before its client's is counted.
    refused_until: AtomicU64,
}

#[derive(Clone)]
struct ClientEntry {
    /// `None`: the client has no limit.
    limiter: Option<Arc<Limiter>>,
    /// Until then (nanoseconds since the epoch) the limit is used without asking the source.
    until: u64,
    /// Set by [`RateLimitLayer::forget_client`]: the next request reads the limit first.
    forgotten: bool,
    /// Counts [`RateLimitLayer::forget_client`] calls: a read begun before one is not kept.
    generation: u64,
}

impl ClientEntry {
    /// The limit `kept` held (none without one), used until `until`.
    fn keeping(kept: Option<&ClientEntry>, until: u64, generation: u64) -> Self {
        Self {
            limiter: kept.and_then(|kept| kept.limiter.clone()),
            until,
            forgotten: false,
            generation,
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whose {
    Tenant,
    Client,
}

impl Shared {
    fn now(&self) -> u64 {
        self.clock.now().duration_since(self.epoch).as_u64()
    }

    fn limiter(&self, limit: RateLimit, now: u64) -> Arc<Limiter> {
        Arc::new(Limiter {
            limit,
            gcra: RateLimiter::direct_with_clock(limit.quota(), self.clock.clone()),
            last_used: AtomicU64::new(now),
            refused_until: AtomicU64::new(0),
        })
    }

    /// How long `limiter` still refuses for after its last refusal, if it does: known without
    /// counting a request against it.
    fn refusing(limiter: &Limiter, now: u64) -> Option<Duration> {
        let until = limiter.refused_until.load(Ordering::Relaxed);
        (now < until).then(|| Duration::from_nanos(until - now))
    }

    /// Counts a request against `limiter`: `Err` with the time until one would pass.
    fn check(&self, limiter: &Limiter, now: u64) -> Result<(), Duration> {
        limiter.last_used.store(now, Ordering::Relaxed);
        limiter.gcra.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            let until = now.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
            limiter.refused_until.fetch_max(until, Ordering::Relaxed);
            wait
        })
    }

    /// The limiter of `tenant` under `limit` (a fresh one when its limit changed).
    fn tenant_limiter(&self, tenant: TenantId, limit: RateLimit, now: u64) -> Arc<Limiter> {
        let hash = self.tenants.hash(&tenant);
        match self.tenants.get(hash, &tenant) {
            Some(limiter) if limiter.limit == limit => limiter,
            _ => self.tenants.update(
                hash,
                tenant,
                |kept| match kept {
                    Some(kept) if kept.limit == limit => Arc::clone(kept),
                    _ => self.limiter(limit, now),
                },
                |kept| refilled(kept, now),
            ),
        }
    }

    /// Marks the client's stale entry fresh for another ttl, for the request that will read
    /// it again: the entry's generation, or `None` when another request did so first.
    fn claim_refresh(&self, client: &str, hash: u64, now: u64) -> Option<u64> {
        let mut claimed = None;
        let until = now.saturating_add(self.ttl_nanos);
        self.clients.update(
            hash,
            Box::from(client),
            |kept| match kept {
                Some(kept) if now < kept.until || kept.forgotten => kept.clone(),
                kept => {
                    let generation = kept.map_or(0, |kept| kept.generation);
                    claimed = Some(generation);
                    ClientEntry::keeping(kept, until, generation)
                }
            },
            |kept| self.forgettable(kept, now),
        );
        claimed
    }

    /// Whether an entry may go to make room: stale, and its limiter (if any) full again.
    fn forgettable(&self, entry: &ClientEntry, now: u64) -> bool {
        now >= entry.until && entry.limiter.as_ref().is_none_or(|l| refilled(l, now))
    }

    /// Keeps the client's limit as just read by a read begun at `generation`, its limiter
    /// kept when the limit is the same; when it could not be read (`Err`), the limit last
    /// read, if any. An entry forgotten since the read began is left as it is, to be read
    /// anew.
    fn store_client(
        &self,
        client: &str,
        limit: Result<Option<RateLimit>, ()>,
        now: u64,
        generation: u64,
    ) -> ClientEntry {
        let hash = self.clients.hash(client);
        let until = now.saturating_add(self.ttl_nanos);
        self.clients.update(
            hash,
            Box::from(client),
            |kept| {
                if let Some(kept) = kept.filter(|kept| kept.generation != generation) {
                    return kept.clone();
                }
                let Ok(limit) = limit else {
                    return ClientEntry::keeping(kept, until, generation);
                };
                let limiter = match (kept, limit) {
                    (_, None) => None,
                    (
                        Some(ClientEntry {
                            limiter: Some(kept),
                            ..
                        }),
                        Some(limit),
                    ) if kept.limit == limit => Some(Arc::clone(kept)),
                    (_, Some(limit)) => Some(self.limiter(limit, now)),
                };
                ClientEntry {
                    limiter,
                    until,
                    forgotten: false,
                    generation,
                }
            },
            |kept| self.forgettable(kept, now),
        )
    }

    /// The client id limits apply to ([`VerifiedClaims::client_id`]); none for another issuer
    /// than the configured one.
    fn client_of<'c>(&self, claims: &'c VerifiedClaims) -> Option<&'c str> {
        self.source.as_ref()?;
        if let Some(issuer) = &self.issuer {
            if claims.issuer() != Some(&**issuer) {
                return None;
            }
        }
        claims.client_id()
    }
}

/// Whether the limiter has been quiet long enough to be full again (forgetting it loses
/// nothing).
fn refilled(limiter: &Limiter, now: u64) -> bool {
    now.saturating_sub(limiter.last_used.load(Ordering::Relaxed)) >= limiter.limit.refill_nanos()
}

/// Refuses requests over their tenant's or client's rate limit. Made by [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimiting<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for RateLimiting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiting")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The response future of [`RateLimiting`]: the inner service's (no allocation) when the
/// limits are known; the layer's own work, boxed, when a client's limit must be read first or
/// the request is refused.
pub type ResponseFuture<F, B, E> = PassOrOwn<F, B, E>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimiting<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let extensions = request.extensions();
        let tenant = extensions
            .get::<TenantId>()
            .copied()
            .zip(extensions.get::<TenantRateLimit>().map(|limit| limit.0));
        let claims = extensions.get::<VerifiedClaims>();
        let client = claims.and_then(|claims| {
            claims.memoized(shared.memo, |claims| {
                shared
                    .client_of(claims)
                    .map(|id| (Arc::<str>::from(id), shared.clients.hash(id)))
            })
        });
        // (A check search of the SMART layer's, whose read was counted: see `ScopeProbe`.)
        if tenant.is_none() && client.is_none()
            || extensions.get::<crate::smart::ScopeProbe>().is_some()
        {
            return PassOrOwn::passed(self.inner.call(request));
        }
        let now = shared.now();
        // A tenant whose limit refuses now refuses before the client's limit counts the
        // request: a client of a tenant others saturate keeps its quota for its other tenants.
        let limiter = tenant.map(|(tenant, limit)| shared.tenant_limiter(tenant, limit, now));
        if let Some(wait) = limiter.as_deref().and_then(|t| Shared::refusing(t, now)) {
            return refused(Whose::Tenant, wait);
        }
        if let Some((client, hash)) = &client {
            let (client, hash) = (&**client, *hash);
            match shared.clients.get(hash, client) {
                // A stale limit is read again in the background, one read at a time, while it
                // still counts: a slow store holds up no request.
                Some(entry)
                    if !entry.forgotten
                        && (now < entry.until || self.refresh_client(client, hash, now)) =>
                {
                    if let Some(limiter) = &entry.limiter {
                        if let Err(wait) = shared.check(limiter, now) {
                            return refused(Whose::Client, wait);
                        }
                    }
                }
                _ => {
                    let client = client.to_owned();
                    return self.read_client_first(request, client, tenant);
                }
            }
        }
        if let Some(limiter) = &limiter {
            if let Err(wait) = shared.check(limiter, now) {
                return refused(Whose::Tenant, wait);
            }
        }
        PassOrOwn::passed(self.inner.call(request))
    }
}

impl<S> RateLimiting<S> {
    /// Starts reading the stale limit of `client` again, on a task of its own, unless another
    /// request just did: `true` when the stale limit may count meanwhile; `false` outside a
    /// Tokio runtime (the caller then reads it first).
    fn refresh_client(&self, client: &str, hash: u64, now: u64) -> bool {
        let shared = &self.shared;
        let (Some(source), Ok(runtime)) = (&shared.source, tokio::runtime::Handle::try_current())
        else {
            return false;
        };
        if let Some(generation) = shared.claim_refresh(client, hash, now) {
            let read = source.client_limit(client);
            let (shared, client) = (Arc::clone(shared), client.to_owned());
            runtime.spawn(async move {
                // Bounded by the ttl, so that reads of a hung store do not pile up.
                let ttl = Duration::from_nanos(shared.ttl_nanos);
                let limit = match tokio::time::timeout(ttl, read).await {
                    Ok(read) => read.map_err(|unknown| warn_unknown(&client, &unknown)),
                    Err(_) => {
                        let unknown = ClientLimitUnknown::new("no answer within the ttl");
                        warn_unknown(&client, &unknown);
                        Err(())
                    }
                };
                shared.store_client(&client, limit, shared.now(), generation);
            });
        }
        true
    }

    /// The client's limit is not cached: read it, then check both limits and call the inner
    /// service.
    fn read_client_first<ReqBody, ResBody>(
        &mut self,
        request: Request<ReqBody>,
        client: String,
        tenant: Option<(TenantId, RateLimit)>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send,
        ReqBody: Send + 'static,
        ResBody: 'static,
    {
        // The ready service goes with the request; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        // The generation the read begins at: a forget_client meanwhile makes it stale.
        let generation = shared
            .clients
            .get(shared.clients.hash(&client), &*client)
            .map_or(0, |entry| entry.generation);
        let read = shared
            .source
            .as_ref()
            .map(|source| source.client_limit(&client));
        PassOrOwn::own(async move {
            let limit = match read {
                Some(read) => read
                    .await
                    .map_err(|unknown| warn_unknown(&client, &unknown)),
                None => Ok(None),
            };
            let now = shared.now();
            let entry = shared.store_client(&client, limit, now, generation);
            // The tenant's limiter as it is after the read (its limit may have changed).
            let tenant = tenant.map(|(tenant, limit)| shared.tenant_limiter(tenant, limit, now));
            let refusing = tenant.as_deref().and_then(|t| Shared::refusing(t, now));
            let checked = match refusing {
                Some(wait) => Err((Whose::Tenant, wait)),
                None => match &entry.limiter {
                    Some(limiter) => shared.check(limiter, now).map_err(|w| (Whose::Client, w)),
                    None => Ok(()),
                },
            }
            .and_then(|()| match &tenant {
                Some(tenant) => shared.check(tenant, now).map_err(|w| (Whose::Tenant, w)),
                None => Ok(()),
            });
            match checked {
                Ok(()) => Ok(inner.call(request).await?.map(ResponseBody::inner)),
                Err((whose, wait)) => Ok(refusal(whose, wait).map(ResponseBody::full)),
            }
        })
    }
}

fn warn_unknown(client: &str, unknown: &ClientLimitUnknown) {
    tracing::warn!(
        client_id = %client,
        error = %unknown,
        "the client's rate limit last read stays in force"
    );
}

fn refused<F, B: 'static, E: 'static>(whose: Whose, wait: Duration) -> ResponseFuture<F, B, E> {
    let response = refusal(whose, wait);
    PassOrOwn::own(async move { Ok(response.map(ResponseBody::full)) })
}

/// The 429 answer: `Retry-After` in whole seconds, rounded up, at least 1.
fn refusal(whose: Whose, wait: Duration) -> Response<Bytes> {
    let limit = match whose {
        Whose::Tenant => "tenant",
        Whose::Client => "client",
    };
    metrics::counter!("tower_fhir_rate_limited_total", "limit" => limit).increment(1);
    let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let diagnostics = match whose {
        Whose::Tenant => "Too many requests for this tenant; retry after the time in Retry-After",
        Whose::Client => "Too many requests from this client; retry after the time in Retry-After",
    };
    tracing::debug!(limit = ?whose, retry_after = seconds, "request over its rate limit");
    let mut response = OperationOutcome::error(IssueType::Throttled, diagnostics)
        .to_response(StatusCode::TOO_MANY_REQUESTS);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full};
    use serde_json::json;
    use tower::ServiceExt;

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    const B: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";

    fn limit(per_second: u32, burst: u32) -> RateLimit {
        RateLimit::new(per_second, burst).unwrap()
    }

    #[test]
    fn limits_parse_and_refuse_bad_values_in_one_sentence() {
        let parsed: RateLimit =
            serde_json::from_value(json!({"requests_per_second": 2, "burst": 5})).unwrap();
        assert_eq!(parsed, limit(2, 5));
        assert_eq!(
            serde_json::to_value(parsed).unwrap(),
            json!({"requests_per_second": 2, "burst": 5})
        );
        let defaulted: RateLimit =
            serde_json::from_value(json!({"requests_per_second": 7})).unwrap();
        assert_eq!(defaulted, limit(7, 7));
        for (bad, says) in [
            (
                json!({"requests_per_second": 0}),
                "requests_per_second must be a whole number from 1",
            ),
            (
                json!({"requests_per_second": -3}),
                "requests_per_second must be a whole number from 1",
            ),
            (json!({"requests_per_second": 2.5}), "not 2.5"),
            (
                json!({"requests_per_second": 1, "burst": 0}),
                "burst must be a whole number from 1",
            ),
            (json!({"requests_per_second": 1e12}), "to 1000000000,"),
            (json!({"burst": 3}), "requests_per_second"),
            (
                json!({"requests_per_second": 1, "bursts": 3}),
                "unknown field",
            ),
            (json!({"requests_per_second": "2"}), "invalid type"),
        ] {
            let error = serde_json::from_value::<RateLimit>(bad.clone()).unwrap_err();
            assert!(error.to_string().contains(says), "{bad}: {error}");
        }
        assert!(RateLimit::new(0, 1).is_err());
        assert!(RateLimit::new(1, MAX_RATE + 1).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_at_least_one() {
        for (wait, expected) in [
            (Duration::ZERO, "1"),
            (Duration::from_millis(1), "1"),
            (Duration::from_millis(1000), "1"),
            (Duration::from_millis(1001), "2"),
            (Duration::from_secs(30), "30"),
        ] {
            let response = refusal(Whose::Tenant, wait);
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                response.headers()[header::RETRY_AFTER],
                expected,
                "{wait:?}"
            );
        }
        let response = refusal(Whose::Client, Duration::from_millis(10));
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/fhir+json"
        );
        let outcome: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["code"], "throttled");
        assert!(outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("client"));
    }

    type Bare =
        tower::util::BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

    /// A service that counts the requests reaching it.
    fn counted(layer: &RateLimitLayer) -> (RateLimiting<Bare>, Arc<AtomicUsize>) {
        let reached = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&reached);
        let bare = tower::service_fn(move |_: Request<Full<Bytes>>| {
            count.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok"))) }
        });
        (layer.layer(Bare::new(bare)), reached)
    }

    fn request(tenant: Option<(&str, RateLimit)>, client: Option<&str>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::default());
        if let Some((tenant, limit)) = tenant {
            request
                .extensions_mut()
                .insert(TenantId::parse(tenant).unwrap());
            request.extensions_mut().insert(TenantRateLimit(limit));
        }
        if let Some(client) = client {
            let claims = json!({"iss": "https://gw.example", "sub": client, "exp": u64::MAX / 2});
            let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone());
            request.extensions_mut().insert(claims.unwrap());
        }
        request
    }

    async fn status<S>(service: &S, request: Request<Full<Bytes>>) -> StatusCode
    where
        S: Service<
                Request<Full<Bytes>>,
                Response = Response<ResponseBody<Full<Bytes>>>,
                Error = Infallible,
            > + Clone,
    {
        service.clone().oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn each_tenant_has_its_own_limiter() {
        let layer = RateLimitLayer::new();
        let (service, reached) = counted(&layer);
        let slow = limit(1, 2);
        assert_eq!(
            status(&service, request(Some((A, slow)), None)).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(Some((A, slow)), None)).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(Some((A, slow)), None)).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            reached.load(Ordering::SeqCst),
            2,
            "a refusal never reaches the service"
        );
        assert_eq!(
            status(&service, request(Some((B, slow)), None)).await,
            StatusCode::OK
        );
        // Without a limit, or without a tenant, nothing is limited.
        for _ in 0..5 {
            assert_eq!(status(&service, request(None, None)).await, StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn the_smart_layers_check_searches_are_not_counted_again() {
        let layer = RateLimitLayer::new();
        let (service, reached) = counted(&layer);
        let one = limit(1, 1);
        assert_eq!(
            status(&service, request(Some((A, one)), None)).await,
            StatusCode::OK
        );
        // A read's further check searches and the read itself, its first search counted.
        for _ in 0..3 {
            let mut probe = request(Some((A, one)), None);
            probe.extensions_mut().insert(crate::smart::ScopeProbe);
            assert_eq!(status(&service, probe).await, StatusCode::OK);
        }
        assert_eq!(reached.load(Ordering::SeqCst), 4);
        assert_eq!(
            status(&service, request(Some((A, one)), None)).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[tokio::test]
    async fn a_changed_limit_applies_to_its_key() {
        let layer = RateLimitLayer::new();
        let (service, _) = counted(&layer);
        let one = limit(1, 1);
        assert_eq!(
            status(&service, request(Some((A, one)), None)).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(Some((A, one)), None)).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        // Raised: a fresh limiter with the new burst.
        let more = limit(1, 3);
        for _ in 0..3 {
            assert_eq!(
                status(&service, request(Some((A, more)), None)).await,
                StatusCode::OK
            );
        }
        assert_eq!(
            status(&service, request(Some((A, more)), None)).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[tokio::test]
    async fn clients_are_limited_across_tenants_and_read_once_per_ttl() {
        let reads = Arc::new(AtomicUsize::new(0));
        struct Counting(
            Arc<AtomicUsize>,
            std::sync::Mutex<HashMap<String, RateLimit>>,
        );
        impl ClientLimits for Counting {
            fn client_limit(&self, client_id: &str) -> ClientLimitFuture {
                self.0.fetch_add(1, Ordering::SeqCst);
                let found = self.1.lock().unwrap().get(client_id).copied();
                Box::pin(std::future::ready(Ok(found)))
            }
        }
        let source = Arc::new(Counting(
            Arc::clone(&reads),
            std::sync::Mutex::new(HashMap::from([("app".to_owned(), limit(1, 3))])),
        ));
        let layer = RateLimitLayer::builder()
            .client_limits(Arc::clone(&source))
            .client_issuer("https://gw.example")
            .client_limit_ttl(Duration::from_secs(3600))
            .build()
            .unwrap();
        let (service, _) = counted(&layer);
        let roomy = limit(100, 100);
        for tenant in [A, B, A] {
            assert_eq!(
                status(&service, request(Some((tenant, roomy)), Some("app"))).await,
                StatusCode::OK
            );
        }
        let refused = service
            .clone()
            .oneshot(request(Some((B, roomy)), Some("app")))
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("this client"));
        // Another client is untouched; and the source was read once per client.
        assert_eq!(
            status(&service, request(None, Some("other"))).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(None, Some("other"))).await,
            StatusCode::OK
        );
        assert_eq!(reads.load(Ordering::SeqCst), 2);

        // A changed limit, forgotten by hand, applies at the next request.
        source
            .1
            .lock()
            .unwrap()
            .insert("app".to_owned(), limit(1, 2));
        layer.forget_client("app");
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(reads.load(Ordering::SeqCst), 3);

        // Tokens of another issuer are not the source's clients.
        let mut foreign = request(None, None);
        let claims = json!({"iss": "https://idp.example", "sub": "app", "exp": u64::MAX / 2});
        foreign
            .extensions_mut()
            .insert(VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap());
        assert_eq!(status(&service, foreign).await, StatusCode::OK);
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_source_that_fails_leaves_the_limit_last_read_in_force() {
        /// Answers from its table until told to fail.
        struct Flaky(
            std::sync::Mutex<HashMap<String, RateLimit>>,
            std::sync::atomic::AtomicBool,
        );
        impl ClientLimits for Flaky {
            fn client_limit(&self, client_id: &str) -> ClientLimitFuture {
                let answer = if self.1.load(Ordering::SeqCst) {
                    Err(ClientLimitUnknown::new("the store is down"))
                } else {
                    Ok(self.0.lock().unwrap().get(client_id).copied())
                };
                Box::pin(std::future::ready(answer))
            }
        }
        let source = Arc::new(Flaky(
            std::sync::Mutex::new(HashMap::from([("app".to_owned(), limit(1, 2))])),
            Default::default(),
        ));
        let layer = RateLimitLayer::builder()
            .client_limits(Arc::clone(&source))
            .client_issuer("https://gw.example")
            .build()
            .unwrap();
        let (service, _) = counted(&layer);
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::OK
        );
        // The store goes down; the limit is read again (forgotten by hand, as a change
        // would), and the one read before still counts.
        source.1.store(true, Ordering::SeqCst);
        layer.forget_client("app");
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::TOO_MANY_REQUESTS,
            "the limit was lifted while the store was down"
        );
        // A client never read passes while the store is down.
        assert_eq!(
            status(&service, request(None, Some("new"))).await,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_stale_limit_counts_while_a_hung_store_is_read_once_in_the_background() {
        /// Answers the first read, then hangs, counting reads.
        struct Hanging(AtomicUsize);
        impl ClientLimits for Hanging {
            fn client_limit(&self, _: &str) -> ClientLimitFuture {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    Box::pin(std::future::ready(Ok(Some(limit(1, 3)))))
                } else {
                    Box::pin(std::future::pending())
                }
            }
        }
        let source = Arc::new(Hanging(AtomicUsize::new(0)));
        let layer = RateLimitLayer::builder()
            .client_limits(Arc::clone(&source))
            .client_issuer("https://gw.example")
            .client_limit_ttl(Duration::from_millis(50))
            .build()
            .unwrap();
        let (service, _) = counted(&layer);
        assert_eq!(
            status(&service, request(None, Some("app"))).await,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Stale now, and the store hangs: nobody waits for it, and it is read once.
        let statuses = tokio::time::timeout(
            Duration::from_secs(5),
            futures::future::join_all((0..6).map(|_| status(&service, request(None, Some("app"))))),
        )
        .await
        .expect("requests waited for a hung store");
        let refused = statuses
            .iter()
            .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
            .count();
        // (Two of the burst of 3 are left, and one more comes a second.)
        assert!(
            refused >= 2,
            "the limit read before was lifted: {statuses:?}"
        );
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
    }

    /// A source that answers each read now but the `held`th (from 0), which answers only when
    /// let go, with the limit it had when asked.
    struct Gated {
        held: usize,
        calls: AtomicUsize,
        limit: std::sync::Mutex<RateLimit>,
        gate: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    }
    impl ClientLimits for Gated {
        fn client_limit(&self, _: &str) -> ClientLimitFuture {
            let limit = *self.limit.lock().unwrap();
            if self.calls.fetch_add(1, Ordering::SeqCst) == self.held {
                let gate = self.gate.lock().unwrap().take().unwrap();
                return Box::pin(async move {
                    let _ = gate.await;
                    Ok(Some(limit))
                });
            }
            Box::pin(std::future::ready(Ok(Some(limit))))
        }
    }

    #[tokio::test]
    async fn a_read_begun_before_forget_client_does_not_undo_the_one_after() {
        let (open, gate) = tokio::sync::oneshot::channel();
        let source = Arc::new(Gated {
            held: 1,
            calls: AtomicUsize::new(0),
            limit: std::sync::Mutex::new(limit(1, 1)),
            gate: std::sync::Mutex::new(Some(gate)),
        });
        let layer = RateLimitLayer::builder()
            .client_limits(Arc::clone(&source))
            .client_issuer("https://gw.example")
            .client_limit_ttl(Duration::from_millis(200))
            .build()
            .unwrap();
        let (service, _) = counted(&layer);
        status(&service, request(None, Some("app"))).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Stale: read again in the background (held at the gate), with the old limit.
        status(&service, request(None, Some("app"))).await;
        // The limit changes, and is forgotten: the next request reads the new one.
        *source.limit.lock().unwrap() = limit(100, 100);
        layer.forget_client("app");
        status(&service, request(None, Some("app"))).await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
        // The old read ends now: what it read is older than the forget, and not kept.
        open.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        for _ in 0..10 {
            assert_eq!(
                status(&service, request(None, Some("app"))).await,
                StatusCode::OK,
                "the limit read before forget_client came back"
            );
        }
    }

    #[tokio::test]
    async fn a_first_read_begun_before_forget_client_is_not_kept() {
        let (open, gate) = tokio::sync::oneshot::channel();
        let source = Arc::new(Gated {
            held: 0,
            calls: AtomicUsize::new(0),
            limit: std::sync::Mutex::new(limit(1, 1)),
            gate: std::sync::Mutex::new(Some(gate)),
        });
        let layer = RateLimitLayer::builder()
            .client_limits(Arc::clone(&source))
            .client_issuer("https://gw.example")
            .build()
            .unwrap();
        let (service, _) = counted(&layer);
        // The client's first request reads its limit (held at the gate) ...
        let first = tokio::spawn(service.clone().oneshot(request(None, Some("app"))));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // ... the limit changes and is forgotten before that read ends.
        *source.limit.lock().unwrap() = limit(100, 100);
        layer.forget_client("app");
        open.send(()).unwrap();
        first.await.unwrap().unwrap();
        for _ in 0..10 {
            assert_eq!(
                status(&service, request(None, Some("app"))).await,
                StatusCode::OK,
                "the limit read before forget_client was kept"
            );
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn memory_stays_within_the_capacity() {
        let layer = RateLimitLayer::builder().capacity(64).build().unwrap();
        let shared = &layer.shared;
        let now = shared.now();
        for n in 0..10_000u32 {
            let tenant = TenantId::parse(&format!("00000000-0000-4000-8000-{n:012}")).unwrap();
            let limiter = shared.tenant_limiter(tenant, limit(1, 1), now);
            shared.check(&limiter, now).unwrap();
            shared.store_client(&format!("client-{n}"), Ok(Some(limit(1, 1))), now, 0);
        }
        assert!(shared.tenants.len() <= shared.tenants.capacity());
        assert!(shared.clients.len() <= shared.clients.capacity());
        assert!(
            shared.tenants.capacity() < 200,
            "{}",
            shared.tenants.capacity()
        );
    }

    #[test]
    fn a_quiet_limiter_is_the_first_to_go() {
        let shared = &RateLimitLayer::new().shared;
        let limiter = shared.limiter(limit(2, 4), 0);
        assert!(!refilled(&limiter, 1_999_999_999));
        assert!(refilled(&limiter, 2_000_000_000));
    }
}
