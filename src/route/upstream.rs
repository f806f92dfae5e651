//! Upstreams: a tenant's FHIR servers.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use crate::limit::RateLimit;
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
        let invalid = |why: &str| InvalidUpstream(format!("{why}: {url:?}"));
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
    /// is never forwarded). Marked sensitive, never shown in `Debug`.
    pub fn with_authorization(mut self, value: &str) -> Result<Self, InvalidUpstream> {
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| InvalidUpstream("authorization is not a valid header value".into()))?;
        value.set_sensitive(true);
        self.inner_mut().authorization = Some(value);
        Ok(self)
    }

    /// How long a request to this upstream may take before the gateway answers 504.
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

/// A tenant's record in the directory: its upstreams, one or more (the first is the default),
/// and its [`RateLimit`], if it has one.
///
/// It is written in JSON as the list of upstreams; the rate limit is a sibling key of
/// `upstreams` in a tenant's entry (directory files, the admin API, the gateway's
/// configuration), so a record without one reads and writes as before.
#[derive(Clone, PartialEq)]
pub struct TenantUpstreams {
    upstreams: Arc<[Upstream]>,
    rate_limit: Option<RateLimit>,
}

impl TenantUpstreams {
    /// The upstreams, the first being the default; `None` when empty.
    pub fn new(upstreams: impl IntoIterator<Item = Upstream>) -> Option<Self> {
        let upstreams: Arc<[Upstream]> = upstreams.into_iter().collect();
        (!upstreams.is_empty()).then_some(Self {
            upstreams,
            rate_limit: None,
        })
    }

    /// The same upstreams with this rate limit for all the tenant's clients together (`None`:
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

    /// The upstream for this release, or the default when no release was negotiated.
    pub fn select(&self, version: Option<FhirVersion>) -> Option<&Upstream> {
        match version {
            None => self.upstreams.first(),
            Some(version) => self.upstreams.iter().find(|u| u.fhir_version() == version),
        }
    }

    /// The default upstream.
    pub fn default_upstream(&self) -> &Upstream {
        &self.upstreams[0]
    }

    /// All upstreams.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.upstreams.iter()
    }
}

impl fmt::Debug for TenantUpstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.upstreams.iter()).finish()?;
        if let Some(limit) = &self.rate_limit {
            write!(f, " rate_limit: {limit:?}")?;
        }
        Ok(())
    }
}

impl Serialize for TenantUpstreams {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.upstreams.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TenantUpstreams {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let upstreams = Vec::<Upstream>::deserialize(deserializer)?;
        Self::new(upstreams)
            .ok_or_else(|| serde::de::Error::custom("a tenant needs at least one upstream"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let upstreams = TenantUpstreams::new([dstu2.clone(), stu3.clone()]).unwrap();
        assert_eq!(upstreams.select(None), Some(&dstu2));
        assert_eq!(upstreams.select(Some(FhirVersion::Stu3)), Some(&stu3));
        assert_eq!(upstreams.select(Some(FhirVersion::R4)), None);
        assert!(TenantUpstreams::new([]).is_none());
    }

    #[test]
    fn json_round_trip_and_redacted_debug() {
        let json = json!([{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0",
                           "authorization": "Bearer upstream-secret", "timeout_ms": 1500}]);
        let upstreams: TenantUpstreams = serde_json::from_value(json.clone()).unwrap();
        let upstream = upstreams.default_upstream();
        assert_eq!(upstream.fhir_version(), FhirVersion::Stu3);
        assert_eq!(upstream.timeout(), Some(Duration::from_millis(1500)));
        assert!(upstream.authorization().unwrap().is_sensitive());
        assert_eq!(serde_json::to_value(&upstreams).unwrap(), json);
        assert!(!format!("{upstreams:?}").contains("upstream-secret"));
        assert!(!upstream.set_cookie_allowed(), "cookies are off by default");
        assert!(serde_json::from_value::<TenantUpstreams>(json!([])).is_err());
        assert!(serde_json::from_value::<TenantUpstreams>(
            json!([{"base_url": "x", "fhir_version": "3.0"}])
        )
        .is_err());
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
