//! Upstreams: a tenant's FHIR servers.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use crate::limit::RateLimit;
use crate::tenant::TenantId;
use crate::version::FhirVersion;

/// The base URL of an upstream FHIR server: scheme, host and port, and a path prefix
/// (`https://ehr.example/fhir/r3` has the prefix `/fhir/r3`).
///
/// Only absolute `http`/`https` URLs without user info, query or fragment are bases.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UpstreamBase {
    scheme: Scheme,
    authority: Authority,
    // Without a trailing slash; empty for the root.
    path: String,
    // The whole base as text, made once: the proxy compares response URLs with it.
    text: Arc<str>,
}

impl UpstreamBase {
    /// Parses a base URL.
    pub fn parse(url: &str) -> Result<Self, InvalidUpstream> {
        // (Said without the credentials a URL may hold: errors reach logs.)
        let invalid = |why: &str| InvalidUpstream(format!("{why}: {:?}", without_userinfo(url)));
        if url.contains('#') {
            return Err(invalid("a base URL has no fragment"));
        }
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| invalid("not absolute"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid("not http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials belong in `authorization`, not the URL",
            ));
        }
        // `host:port` with a port that is no number (`user:pass` before a `/` in the
        // password, say) is no address to connect to.
        let after_host = authority
            .as_str()
            .rsplit_once(']')
            .map_or(authority.as_str(), |(_, rest)| rest);
        if after_host.contains(':') && authority.port_u16().is_none() {
            return Err(invalid("a port is a number"));
        }
        if uri.query().is_some() {
            return Err(invalid("a base URL has no query"));
        }
        let path = uri.path().trim_end_matches('/');
        if path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(invalid("dot segments in the base path"));
        }
        let text = Arc::from(format!("{scheme}://{authority}{path}"));
        Ok(Self {
            scheme,
            authority,
            path: path.to_owned(),
            text,
        })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// Host and port.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The path prefix, without a trailing slash (empty for the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The base URL, without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn shared_text(&self) -> &Arc<str> {
        &self.text
    }
}

impl fmt::Display for UpstreamBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for UpstreamBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamBase({self})")
    }
}

/// `url` with the credentials of its authority (`user:password@`) replaced by `<redacted>@`,
/// for messages: a URL refused for holding them must not put them in a log.
pub(crate) fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |at| at + 3);
    // Up to the last `@`, wherever it is: a password may hold `/`, `?` or `#`, and a message
    // that hides a query's `a@b` too says no more than it should.
    match url[start..].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &url[start + at..]).into(),
        None => url.into(),
    }
}

/// An upstream that cannot be used as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUpstream(pub String);

impl fmt::Display for InvalidUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid upstream: {}", self.0)
    }
}

impl std::error::Error for InvalidUpstream {}

/// One FHIR server of a tenant: where it is, which release it speaks, how the gateway
/// authenticates to it. Cheap to clone; the routing layer puts the chosen one in the request
/// extensions.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    base: UpstreamBase,
    // The `Host` header toward it, made once.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    host: Option<HeaderValue>,
    version: FhirVersion,
    authorization: Option<HeaderValue>,
    timeout: Option<Duration>,
    http2: bool,
    set_cookie: bool,
    max_concurrency: Option<NonZeroU32>,
}

impl Upstream {
    /// An upstream at `base` speaking `version`.
    pub fn new(base: UpstreamBase, version: FhirVersion) -> Self {
        Self {
            inner: Arc::new(Inner {
                host: HeaderValue::from_str(base.authority().as_str()).ok(),
                base,
                version,
                authorization: None,
                timeout: None,
                http2: false,
                set_cookie: false,
                max_concurrency: None,
            }),
        }
    }

    /// Parses the base URL and makes an upstream.
    pub fn parse(base: &str, version: FhirVersion) -> Result<Self, InvalidUpstream> {
        Ok(Self::new(UpstreamBase::parse(base)?, version))
    }

    /// The `Authorization` value the gateway sends to this upstream (the client's own token
    /// is never forwarded). Marked sensitive, never shown in `Debug`. It must be visible
    /// ASCII (spaces and tabs between): other bytes would not be kept when the upstream is
    /// saved, nor read alike by every server.
    pub fn with_authorization(mut self, value: &str) -> Result<Self, InvalidUpstream> {
        let invalid = || {
            InvalidUpstream(
                "authorization is not a valid header value (visible ASCII, spaces and tabs between)"
                    .into(),
            )
        };
        if !value.is_ascii() {
            return Err(invalid());
        }
        let mut value = HeaderValue::from_str(value).map_err(|_| invalid())?;
        value.set_sensitive(true);
        self.inner_mut().authorization = Some(value);
        Ok(self)
    }

    /// How long a request to this upstream may take before the gateway answers 504. In JSON,
    /// `"timeout_ms"`, from 1 to a day: a zero timeout would answer 504 or not by a race.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.inner_mut().timeout = Some(timeout);
        self
    }

    /// Speaks HTTP/2 to this upstream from the first byte (prior knowledge, for `http://`
    /// upstreams that serve h2c); `https://` upstreams negotiate HTTP/2 by ALPN anyway.
    pub fn with_http2(mut self) -> Self {
        self.inner_mut().http2 = true;
        self
    }

    /// Whether requests go out as HTTP/2 with prior knowledge.
    pub fn http2(&self) -> bool {
        self.inner.http2
    }

    /// Lets this upstream take part in cookies: its `Set-Cookie` reaches the client, and the
    /// client's `Cookie` reaches it (`"allow_set_cookie": true` in JSON). Off by default: every
    /// tenant shares the gateway's one origin, so a browser would carry one tenant's cookies to
    /// another's server, and any upstream could set cookies on the gateway's origin. Turn it on
    /// only for an upstream trusted with every cookie of that origin (session affinity, say),
    /// and on as few as possible: each upstream with it receives the others' cookies too.
    pub fn with_set_cookie_allowed(mut self) -> Self {
        self.inner_mut().set_cookie = true;
        self
    }

    /// At most `max` requests in flight to this upstream (`"max_concurrency": N` in JSON); more
    /// wait for a slot up to the upstream's timeout, then get 503 with `Retry-After`. A request
    /// holds its slot until the upstream's response body has been sent (or dropped).
    ///
    /// The proxy counts requests per base URL and limit, whichever tenant's record the
    /// upstream comes from, so re-reading the same upstream from the directory neither resets
    /// nor doubles the count; tenants sharing one server should give it the same limit (each
    /// different limit for one base URL counts on its own).
    pub fn with_max_concurrency(mut self, max: NonZeroU32) -> Self {
        self.inner_mut().max_concurrency = Some(max);
        self
    }

    /// The most requests in flight to this upstream, if limited.
    pub fn max_concurrency(&self) -> Option<NonZeroU32> {
        self.inner.max_concurrency
    }

    /// Whether this upstream takes part in cookies
    /// ([`with_set_cookie_allowed`](Self::with_set_cookie_allowed)).
    pub fn set_cookie_allowed(&self) -> bool {
        self.inner.set_cookie
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::make_mut(&mut self.inner)
    }

    /// The `Host` header value toward it.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn host_header(&self) -> Option<&HeaderValue> {
        self.inner.host.as_ref()
    }

    /// The base URL.
    pub fn base(&self) -> &UpstreamBase {
        &self.inner.base
    }

    /// The FHIR release the upstream speaks.
    pub fn fhir_version(&self) -> FhirVersion {
        self.inner.version
    }

    /// The gateway's own credentials toward the upstream.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.inner.authorization.as_ref()
    }

    /// The upstream's request timeout, if it has its own.
    pub fn timeout(&self) -> Option<Duration> {
        self.inner.timeout
    }
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
            || (self.inner.base == other.inner.base
                && self.inner.version == other.inner.version
                && self.inner.authorization == other.inner.authorization
                && self.inner.timeout == other.inner.timeout
                && self.inner.http2 == other.inner.http2
                && self.inner.set_cookie == other.inner.set_cookie
                && self.inner.max_concurrency == other.inner.max_concurrency)
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.inner.base)
            .field("fhir_version", &self.inner.version)
            .field(
                "authorization",
                &self.inner.authorization.as_ref().map(|_| "[redacted]"),
            )
            .field("timeout", &self.inner.timeout)
            .field("http2", &self.inner.http2)
            .field("allow_set_cookie", &self.inner.set_cookie)
            .field("max_concurrency", &self.inner.max_concurrency)
            .finish()
    }
}

/// How an upstream is written in JSON (directory files, the admin API).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamConfig {
    base_url: String,
    fhir_version: FhirVersion,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    http2: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    allow_set_cookie: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<serde_json::Number>,
}

impl Serialize for Upstream {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        UpstreamConfig {
            base_url: self.inner.base.to_string(),
            fhir_version: self.inner.version,
            authorization: self
                .inner
                .authorization
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            timeout_ms: self.inner.timeout.map(|t| t.as_millis() as u64),
            http2: self.inner.http2,
            allow_set_cookie: self.inner.set_cookie,
            max_concurrency: self.inner.max_concurrency.map(|n| n.get().into()),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let config = UpstreamConfig::deserialize(deserializer)?;
        let mut upstream = Upstream::parse(&config.base_url, config.fhir_version)
            .map_err(serde::de::Error::custom)?;
        if let Some(authorization) = &config.authorization {
            upstream = upstream
                .with_authorization(authorization)
                .map_err(serde::de::Error::custom)?;
        }
        if let Some(ms) = config.timeout_ms {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(serde::de::Error::custom(format!(
                    "timeout_ms must be from 1 to {MAX_TIMEOUT_MS} (a day), not {ms}"
                )));
            }
            upstream = upstream.with_timeout(Duration::from_millis(ms));
        }
        if config.http2 {
            upstream = upstream.with_http2();
        }
        if config.allow_set_cookie {
            upstream = upstream.with_set_cookie_allowed();
        }
        if let Some(max) = config.max_concurrency {
            let max = max
                .as_u64()
                .and_then(|max| u32::try_from(max).ok())
                .and_then(NonZeroU32::new)
                .filter(|max| max.get() <= MAX_CONCURRENCY)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "max_concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {max}"
                    ))
                })?;
            upstream = upstream.with_max_concurrency(max);
        }
        Ok(upstream)
    }
}

/// The highest `max_concurrency` accepted in JSON (tokio's semaphores take fewer permits
/// than `u32::MAX`).
const MAX_CONCURRENCY: u32 = 1 << 20;

/// The longest `timeout_ms` accepted in JSON: a day.
const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// A tenant served by the application in this process rather than proxied: the releases it
/// serves (the first is the default) and an opaque key the application chooses (a store key, a
/// database schema name), with no URL.
///
/// The routing layer puts it in the request extensions of that tenant's requests, with the
/// release chosen for the request as a [`FhirVersion`]; a handler reads the key to find the
/// tenant's data (with feature `axum`, it is an extractor). In JSON (directory files, the admin
/// API): `"in_process": {"key": "contoso", "fhir_versions": ["4.0", "1.0"]}` in place of
/// `"upstreams"`.
///
/// ```
/// use tower_fhir::route::InProcessTenant;
/// use tower_fhir::version::FhirVersion;
///
/// let tenant = InProcessTenant::new("contoso", [FhirVersion::R4, FhirVersion::Dstu2]).unwrap();
/// assert_eq!(tenant.key(), "contoso");
/// assert_eq!(tenant.select(None), Some(FhirVersion::R4), "the first release is the default");
/// assert_eq!(tenant.select(Some(FhirVersion::Dstu2)), Some(FhirVersion::Dstu2));
/// assert_eq!(tenant.select(Some(FhirVersion::Stu3)), None);
/// assert!(InProcessTenant::new("", [FhirVersion::R4]).is_err());
/// assert!(InProcessTenant::new("contoso", []).is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct InProcessTenant {
    inner: Arc<InProcessInner>,
}

#[derive(PartialEq, Eq)]
struct InProcessInner {
    key: Box<str>,
    releases: Box<[FhirVersion]>,
    /// `in-process:{key}`, what audit records name as the upstream.
    label: Arc<str>,
}

/// The longest key [`InProcessTenant::new`] accepts, in bytes.
const MAX_KEY_LEN: usize = 256;

impl InProcessTenant {
    /// A tenant served in-process under `key` (1 to 256 bytes, no control characters) in
    /// `releases` (at least one, each once; the first is the default).
    pub fn new(
        key: impl Into<String>,
        releases: impl IntoIterator<Item = FhirVersion>,
    ) -> Result<Self, InvalidTenant> {
        let key = key.into();
        if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
            return Err(InvalidTenant(format!(
                "an in-process key is 1 to {MAX_KEY_LEN} bytes without control characters"
            )));
        }
        let releases: Box<[FhirVersion]> = releases.into_iter().collect();
        if releases.is_empty() {
            return Err(InvalidTenant(
                "an in-process tenant serves at least one FHIR release".into(),
            ));
        }
        if releases
            .iter()
            .enumerate()
            .any(|(i, release)| releases[..i].contains(release))
        {
            return Err(InvalidTenant(
                "an in-process tenant names each release once".into(),
            ));
        }
        Ok(Self {
            inner: Arc::new(InProcessInner {
                label: Arc::from(format!("in-process:{key}")),
                key: key.into_boxed_str(),
                releases,
            }),
        })
    }

    /// The application's key for this tenant.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The releases served, the default first.
    pub fn releases(&self) -> &[FhirVersion] {
        &self.inner.releases
    }

    /// The release to serve a request in: the requested one if served, the default when none
    /// was requested; `None` when the requested one is not served.
    pub fn select(&self, version: Option<FhirVersion>) -> Option<FhirVersion> {
        match version {
            None => Some(self.inner.releases[0]),
            Some(version) => self.inner.releases.contains(&version).then_some(version),
        }
    }

    /// What audit records and the request's facts name as its upstream.
    pub(crate) fn label(&self) -> &Arc<str> {
        &self.inner.label
    }
}

impl fmt::Debug for InProcessTenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessTenant")
            .field("key", &self.key())
            .field("releases", &self.releases())
            .finish()
    }
}

/// How an in-process tenant is written in JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InProcessConfig {
    key: String,
    fhir_versions: Vec<FhirVersion>,
}

impl Serialize for InProcessTenant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        InProcessConfig {
            key: self.key().to_owned(),
            fhir_versions: self.releases().to_vec(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for InProcessTenant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let config = InProcessConfig::deserialize(deserializer)?;
        Self::new(config.key, config.fhir_versions).map_err(serde::de::Error::custom)
    }
}

/// A tenant record (or an in-process tenant) that cannot be: why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTenant(pub String);

impl fmt::Display for InvalidTenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid tenant: {}", self.0)
    }
}

impl std::error::Error for InvalidTenant {}

/// A tenant's record in the directory: how it is served, proxied to its upstreams (one or
/// more, the first the default) or [in-process](InProcessTenant), and its [`RateLimit`], if it
/// has one. Routing, caching, rate limits and the stores treat both kinds alike.
///
/// In JSON (directory files, the admin API, the gateway's configuration) it is an object,
/// `{"upstreams": [...]}` or `{"in_process": {...}}`, with `"rate_limit"` beside either; a bare
/// list of upstreams reads too. A tenant's entry in a list adds its `"id"`
/// ([`TenantEntry`]).
///
/// ```
/// use tower_fhir::route::{InProcessTenant, TenantRecord, Upstream};
/// use tower_fhir::version::FhirVersion;
///
/// let proxied: TenantRecord = serde_json::from_str(
///     r#"{"upstreams": [{"base_url": "https://ehr.example/fhir", "fhir_version": "3.0"}]}"#,
/// ).unwrap();
/// assert_eq!(proxied.select(None).unwrap().base().as_str(), "https://ehr.example/fhir");
///
/// let local: TenantRecord = serde_json::from_str(
///     r#"{"in_process": {"key": "contoso", "fhir_versions": ["4.0"]}}"#,
/// ).unwrap();
/// assert_eq!(local.in_process_tenant().map(InProcessTenant::key), Some("contoso"));
/// assert!(local.select(None).is_none(), "no upstream: nothing to proxy");
/// assert_eq!(serde_json::to_value(&local).unwrap()["in_process"]["fhir_versions"][0], "4.0");
/// ```
#[derive(Clone, PartialEq)]
pub struct TenantRecord {
    serving: Serving,
    rate_limit: Option<RateLimit>,
}

#[derive(Clone, PartialEq)]
enum Serving {
    Proxied(Arc<[Upstream]>),
    InProcess(InProcessTenant),
}

impl TenantRecord {
    /// A tenant proxied to these upstreams, the first being the default; `None` when empty.
    pub fn new(upstreams: impl IntoIterator<Item = Upstream>) -> Option<Self> {
        let upstreams: Arc<[Upstream]> = upstreams.into_iter().collect();
        (!upstreams.is_empty()).then_some(Self {
            serving: Serving::Proxied(upstreams),
            rate_limit: None,
        })
    }

    /// A tenant served in-process.
    pub fn in_process(tenant: InProcessTenant) -> Self {
        Self {
            serving: Serving::InProcess(tenant),
            rate_limit: None,
        }
    }

    /// The same record with this rate limit for all the tenant's clients together (`None`:
    /// unlimited). The routing layer hands it to
    /// [`RateLimitLayer`](crate::limit::RateLimitLayer) as a
    /// [`TenantRateLimit`](crate::limit::TenantRateLimit).
    #[must_use]
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// The tenant's rate limit, if it has one.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.rate_limit
    }

    /// The upstream for this release, or the default when no release was negotiated; `None`
    /// when the tenant has none for it, or is served in-process.
    pub fn select(&self, version: Option<FhirVersion>) -> Option<&Upstream> {
        let Serving::Proxied(upstreams) = &self.serving else {
            return None;
        };
        match version {
            None => upstreams.first(),
            Some(version) => upstreams.iter().find(|u| u.fhir_version() == version),
        }
    }

    /// A FHIR release two of the upstreams serve, if any: [`select`](Self::select) picks the
    /// first, so the second is never reached. (Allowed, for records stored before; a
    /// configuration or an API taking new records should refuse it.)
    pub fn repeated_release(&self) -> Option<FhirVersion> {
        let Serving::Proxied(upstreams) = &self.serving else {
            return None;
        };
        upstreams.iter().enumerate().find_map(|(at, upstream)| {
            let version = upstream.fhir_version();
            upstreams[..at]
                .iter()
                .any(|u| u.fhir_version() == version)
                .then_some(version)
        })
    }

    /// The default upstream; `None` for a tenant served in-process.
    pub fn default_upstream(&self) -> Option<&Upstream> {
        self.select(None)
    }

    /// The upstreams (none for a tenant served in-process).
    pub fn upstreams(&self) -> &[Upstream] {
        match &self.serving {
            Serving::Proxied(upstreams) => upstreams,
            Serving::InProcess(_) => &[],
        }
    }

    /// The in-process tenant, when the tenant is served in-process.
    pub fn in_process_tenant(&self) -> Option<&InProcessTenant> {
        match &self.serving {
            Serving::InProcess(tenant) => Some(tenant),
            Serving::Proxied(_) => None,
        }
    }

    fn fields(&self, id: Option<TenantId>) -> RecordFields<'_> {
        RecordFields {
            id,
            upstreams: match &self.serving {
                Serving::Proxied(upstreams) => Some(&**upstreams),
                Serving::InProcess(_) => None,
            },
            in_process: self.in_process_tenant(),
            rate_limit: self.rate_limit,
        }
    }

    fn from_fields(fields: RecordFieldsIn) -> Result<Self, InvalidTenant> {
        let record = match (fields.upstreams, fields.in_process) {
            (Some(_), Some(_)) => {
                return Err(InvalidTenant(
                    "a tenant has either upstreams (proxied) or in_process, not both".into(),
                ))
            }
            (Some(upstreams), None) => Self::new(upstreams)
                .ok_or_else(|| InvalidTenant("a tenant needs at least one upstream".into()))?,
            (None, Some(tenant)) => Self::in_process(tenant),
            (None, None) => {
                return Err(InvalidTenant(
                    "a tenant needs upstreams (proxied) or in_process".into(),
                ))
            }
        };
        Ok(record.with_rate_limit(fields.rate_limit))
    }
}

impl fmt::Debug for TenantRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.serving {
            Serving::Proxied(upstreams) => f.debug_list().entries(upstreams.iter()).finish()?,
            Serving::InProcess(tenant) => tenant.fmt(f)?,
        }
        if let Some(limit) = &self.rate_limit {
            write!(f, " rate_limit: {limit:?}")?;
        }
        Ok(())
    }
}

/// A record's JSON fields, to write.
#[derive(Serialize)]
struct RecordFields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<TenantId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstreams: Option<&'a [Upstream]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_process: Option<&'a InProcessTenant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<RateLimit>,
}

/// A record's JSON fields, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFieldsIn {
    #[serde(default)]
    id: Option<TenantId>,
    #[serde(default)]
    upstreams: Option<Vec<Upstream>>,
    #[serde(default)]
    in_process: Option<InProcessTenant>,
    #[serde(default)]
    rate_limit: Option<RateLimit>,
}

impl Serialize for TenantRecord {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.fields(None).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TenantRecord {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Read as a value first: an object and a bare list each get their own precise error.
        let value = serde_json::Value::deserialize(deserializer)?;
        if value.is_array() {
            let upstreams = Vec::<Upstream>::deserialize(value).map_err(D::Error::custom)?;
            return Self::new(upstreams)
                .ok_or_else(|| D::Error::custom("a tenant needs at least one upstream"));
        }
        let fields = RecordFieldsIn::deserialize(value).map_err(D::Error::custom)?;
        if fields.id.is_some() {
            return Err(D::Error::custom(
                "a tenant's record does not name its id here",
            ));
        }
        Self::from_fields(fields).map_err(D::Error::custom)
    }
}

/// A tenant with its record, as a directory file or a configuration lists it:
/// `{"id": "<guid>", "upstreams": [...]}` or `{"id": "<guid>", "in_process": {...}}`, with
/// `"rate_limit"` beside either.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantEntry {
    /// The tenant.
    pub id: TenantId,
    /// Its record.
    pub record: TenantRecord,
}

impl Serialize for TenantEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.record.fields(Some(self.id)).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TenantEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = RecordFieldsIn::deserialize(deserializer)?;
        let id = fields
            .id
            .take()
            .ok_or_else(|| D::Error::missing_field("id"))?;
        let record = TenantRecord::from_fields(fields).map_err(D::Error::custom)?;
        Ok(Self { id, record })
    }
}

/// Borrows an entry's parts to write it.
pub(crate) fn entry_fields(id: TenantId, record: &TenantRecord) -> impl Serialize + '_ {
    record.fields(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_do_not_repeat_credentials() {
        for url in [
            "http://user:secret@ehr/fhir",
            "https://user:secret@ehr:8443/fhir?x=1",
            "http://a@b:secret@ehr",
            "https://user:se#cret@ehr/fhir",
            "https://user:se/cret@ehr/fhir",
            "https://user:se?cret@ehr",
        ] {
            let refused = UpstreamBase::parse(url).unwrap_err().to_string();
            assert!(!refused.contains("secret"), "{refused}");
            assert!(refused.contains("<redacted>@ehr"), "{refused}");
        }
        assert_eq!(without_userinfo("http://ehr/fhir"), "http://ehr/fhir");
        assert_eq!(without_userinfo("ehr@x"), "<redacted>@x");
    }
    use serde_json::json;

    #[test]
    fn bases_parse_and_normalise() {
        let base = UpstreamBase::parse("https://ehr.example:8443/fhir/r3/").unwrap();
        assert_eq!(base.to_string(), "https://ehr.example:8443/fhir/r3");
        assert_eq!(base.path(), "/fhir/r3");
        assert_eq!(
            UpstreamBase::parse("http://127.0.0.1:9001").unwrap().path(),
            ""
        );
        for bad in [
            "ehr.example/fhir",
            "/fhir",
            "ftp://ehr.example/fhir",
            "https://user:pw@ehr.example/fhir",
            "https://ehr.example/fhir?x=1",
            "https://ehr.example/fhir#top",
            "https://ehr.example/fhir/../other",
            "not a url",
        ] {
            assert!(UpstreamBase::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selects_by_version_or_default() {
        let dstu2 = Upstream::parse("http://a/fhir", FhirVersion::Dstu2).unwrap();
        let stu3 = Upstream::parse("http://b/fhir", FhirVersion::Stu3).unwrap();
        let upstreams = TenantRecord::new([dstu2.clone(), stu3.clone()]).unwrap();
        assert_eq!(upstreams.select(None), Some(&dstu2));
        assert_eq!(upstreams.select(Some(FhirVersion::Stu3)), Some(&stu3));
        assert_eq!(upstreams.select(Some(FhirVersion::R4)), None);
        assert!(TenantRecord::new([]).is_none());
    }

    #[test]
    fn json_round_trip_and_redacted_debug() {
        let json = json!([{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0",
                           "authorization": "Bearer upstream-secret", "timeout_ms": 1500}]);
        let upstreams: TenantRecord = serde_json::from_value(json.clone()).unwrap();
        let upstream = upstreams.default_upstream().unwrap();
        assert_eq!(upstream.fhir_version(), FhirVersion::Stu3);
        assert_eq!(upstream.timeout(), Some(Duration::from_millis(1500)));
        assert!(upstream.authorization().unwrap().is_sensitive());
        assert_eq!(
            serde_json::to_value(&upstreams).unwrap(),
            json!({ "upstreams": json }),
            "written as an object, the bare list read for compatibility"
        );
        assert!(!format!("{upstreams:?}").contains("upstream-secret"));
        assert!(!upstream.set_cookie_allowed(), "cookies are off by default");
        assert!(serde_json::from_value::<TenantRecord>(json!([])).is_err());
        assert!(serde_json::from_value::<TenantRecord>(
            json!([{"base_url": "x", "fhir_version": "3.0"}])
        )
        .is_err());
    }

    #[test]
    fn an_authorization_that_is_not_ascii_is_refused_not_dropped() {
        for value in ["Bearer t\u{f6}k\u{e9}n", "Bearer a\nb", "Bearer \u{7f}"] {
            let refused = Upstream::parse("http://ehr:9001/fhir", FhirVersion::R4)
                .unwrap()
                .with_authorization(value)
                .unwrap_err();
            assert!(refused.to_string().contains("authorization"), "{value:?}");
            let json = serde_json::json!({"base_url": "http://ehr:9001/fhir", "fhir_version": "4.0",
                                          "authorization": value});
            assert!(
                serde_json::from_value::<Upstream>(json).is_err(),
                "{value:?}"
            );
        }
        let kept = Upstream::parse("http://ehr:9001/fhir", FhirVersion::R4)
            .unwrap()
            .with_authorization("Basic dXNlcjpwYXNz\t x")
            .unwrap();
        let json = serde_json::to_value(&kept).unwrap();
        assert_eq!(json["authorization"], "Basic dXNlcjpwYXNz\t x");
    }
    #[test]
    fn in_process_records_round_trip_and_bad_ones_are_refused() {
        let json = json!({"in_process": {"key": "contoso-db", "fhir_versions": ["4.0", "1.0"]},
                          "rate_limit": {"requests_per_second": 5, "burst": 10}});
        let record: TenantRecord = serde_json::from_value(json.clone()).unwrap();
        let local = record.in_process_tenant().unwrap();
        assert_eq!(local.key(), "contoso-db");
        assert_eq!(local.releases(), [FhirVersion::R4, FhirVersion::Dstu2]);
        assert_eq!(local.label().as_ref(), "in-process:contoso-db");
        assert!(record.upstreams().is_empty() && record.default_upstream().is_none());
        assert_eq!(serde_json::to_value(&record).unwrap(), json);
        assert!(format!("{record:?}").contains("contoso-db"));

        let id = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
        let entry: TenantEntry = serde_json::from_value(
            json!({"id": id, "in_process": {"key": "k", "fhir_versions": ["3.0"]}}),
        )
        .unwrap();
        assert_eq!(entry.id.to_string(), id);
        assert_eq!(
            serde_json::to_value(&entry).unwrap(),
            json!({"id": id, "in_process": {"key": "k", "fhir_versions": ["3.0"]}})
        );

        let upstream = json!({"base_url": "http://a/fhir", "fhir_version": "4.0"});
        for (bad, says) in [
            (
                json!({"in_process": {"key": "k", "fhir_versions": ["4.0"]}, "upstreams": [upstream]}),
                "not both",
            ),
            (json!({}), "needs upstreams (proxied) or in_process"),
            (json!({"upstreams": []}), "at least one upstream"),
            (
                json!({"in_process": {"key": "", "fhir_versions": ["4.0"]}}),
                "1 to 256 bytes",
            ),
            (
                json!({"in_process": {"key": "a\nb", "fhir_versions": ["4.0"]}}),
                "control characters",
            ),
            (
                json!({"in_process": {"key": "k", "fhir_versions": []}}),
                "at least one FHIR release",
            ),
            (
                json!({"in_process": {"key": "k", "fhir_versions": ["4.0", "4.0"]}}),
                "each release once",
            ),
            (
                json!({"in_process": {"key": "k", "fhir_versions": ["4.0"], "url": "x"}}),
                "unknown field",
            ),
            (
                json!({"in_process": {"key": "k", "fhir_versions": ["4.0"]}, "id": id}),
                "does not name its id",
            ),
            (json!({"upstream": [upstream]}), "unknown field"),
        ] {
            let error = serde_json::from_value::<TenantRecord>(bad.clone())
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        let key = "k".repeat(MAX_KEY_LEN + 1);
        assert!(InProcessTenant::new(key, [FhirVersion::R4]).is_err());
        assert!(
            serde_json::from_value::<TenantEntry>(json!({"upstreams": [upstream]})).is_err(),
            "an entry names its tenant"
        );
    }

    #[test]
    fn max_concurrency_round_trips_and_refuses_bad_values() {
        let json = json!({"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "4.0",
                          "max_concurrency": 3});
        let upstream: Upstream = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(upstream.max_concurrency(), NonZeroU32::new(3));
        assert_eq!(serde_json::to_value(&upstream).unwrap(), json);
        let plain = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4).unwrap();
        assert_eq!(plain.max_concurrency(), None);
        assert_ne!(plain, upstream);
        for bad in [json!(0), json!(-1), json!(1.5), json!(u64::MAX), json!("2")] {
            let json = json!({"base_url": "http://a/fhir", "fhir_version": "4.0",
                              "max_concurrency": bad});
            let error = serde_json::from_value::<Upstream>(json)
                .unwrap_err()
                .to_string();
            let says = if bad.is_string() {
                "invalid type"
            } else {
                "max_concurrency must be a whole number from 1"
            };
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_timeout_is_from_a_millisecond_to_a_day() {
        let upstream = |timeout: serde_json::Value| {
            serde_json::from_value::<Upstream>(json!({"base_url": "http://a/fhir",
                "fhir_version": "4.0", "timeout_ms": timeout}))
        };
        for good in [1_u64, 1500, MAX_TIMEOUT_MS] {
            let timeout = upstream(json!(good)).unwrap().timeout();
            assert_eq!(timeout, Some(Duration::from_millis(good)));
        }
        for bad in [0, MAX_TIMEOUT_MS + 1, u64::MAX] {
            let error = upstream(json!(bad)).unwrap_err().to_string();
            assert!(
                error.contains("timeout_ms must be from 1 to 86400000"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn set_cookie_is_an_opt_in_that_round_trips() {
        let json = json!({"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "4.0",
                          "allow_set_cookie": true});
        let upstream: Upstream = serde_json::from_value(json.clone()).unwrap();
        assert!(upstream.set_cookie_allowed());
        assert_eq!(serde_json::to_value(&upstream).unwrap(), json);
        assert!(format!("{upstream:?}").contains("allow_set_cookie: true"));
        let plain = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4).unwrap();
        assert_ne!(plain, upstream);
        assert_eq!(plain.clone().with_set_cookie_allowed(), upstream);
        assert!(serde_json::to_value(&plain)
            .unwrap()
            .get("allow_set_cookie")
            .is_none());
    }
}
