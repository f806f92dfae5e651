//! `BearerAuthLayer` and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::Response;
use jsonwebtoken::{Algorithm, Validation};
use tower_layer::Layer;

use super::config::{Config, RejectFn, SkipFn};
use super::keys::{KeySet, VerificationKey};
use super::rejection::Rejection;
use super::revoked::RevokedTokens;
use super::service::BearerAuth;
use super::source::{KeySource, RefreshPolicy, RefreshingKeys};
use super::verify::{token_type_name, Audiences, TokenCache, TokenTypes, Verifier};

/// The longest clock-skew leeway accepted.
pub(crate) const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Every algorithm jsonwebtoken verifies; `none` is not one of them.
const ALL_ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A Tower layer that requires a valid bearer JWT on every request.
///
/// Built with [`BearerAuthLayer::builder`]; cloning is cheap and clones share the key cache
/// and the verified-token cache.
#[derive(Clone)]
#[must_use]
pub struct BearerAuthLayer {
    pub(crate) config: Arc<Config>,
}

impl BearerAuthLayer {
    /// Starts configuring the layer.
    pub fn builder() -> BearerAuthBuilder {
        BearerAuthBuilder::default()
    }

    /// How many of the layer's key sources (JWKS URLs, in-process sources) have been fetched
    /// at least once, of how many: a readiness check (`/readyz`) waits for all of them.
    /// Static keys need no fetch and are not counted.
    ///
    /// ```
    /// use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
    ///
    /// let layer = BearerAuthLayer::builder()
    ///     .key(VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap())
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.key_sources_fetched(), (0, 0));
    /// ```
    pub fn key_sources_fetched(&self) -> (usize, usize) {
        let sources = &self.config.verifier.sources;
        let fetched = sources.iter().filter(|s| s.has_fetched()).count();
        (fetched, sources.len())
    }

    /// Starts a fetch of every key source never fetched yet (at most one attempt a second
    /// each), without waiting: call it at startup so the first request does not wait for
    /// the keys, and from a readiness check. Needs a tokio runtime; without one it does
    /// nothing.
    pub fn prefetch_keys(&self) {
        for source in &self.config.verifier.sources {
            if !source.has_fetched() {
                let _ = source.fetch(super::source::Trigger::Cold);
            }
        }
    }
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth::new(inner, Arc::clone(&self.config))
    }
}

impl fmt::Debug for BearerAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verifier = &self.config.verifier;
        f.debug_struct("BearerAuthLayer")
            .field("realm", &verifier.realm)
            .field(
                "algorithms",
                &verifier
                    .validations
                    .iter()
                    .map(|(a, _)| a)
                    .collect::<Vec<_>>(),
            )
            .field("static_keys", &verifier.static_keys.len())
            .field("key_sources", &verifier.sources.len())
            .field("token_cache", &verifier.cache.is_some())
            .finish_non_exhaustive()
    }
}

/// A configuration the layer refuses to build with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Neither a key nor a key source was given: no token could ever be accepted.
    NoKeys,
    /// The algorithm allow-list is empty.
    NoAlgorithms,
    /// The realm has characters a `WWW-Authenticate` quoted string cannot carry.
    InvalidRealm(String),
    /// The JWKS URL is not an absolute `http://` URL.
    InvalidJwksUrl(String),
    /// A duration that must be positive is zero.
    ZeroDuration(&'static str),
    /// The leeway is longer than an hour.
    LeewayTooLong(Duration),
    /// A token type is not a media type name (`at+jwt`, `application/at+jwt`).
    InvalidTokenType(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoKeys => f.write_str("no verification key or key source configured"),
            Self::NoAlgorithms => f.write_str("the algorithm allow-list is empty"),
            Self::InvalidRealm(realm) => write!(f, "invalid realm {realm:?}"),
            Self::InvalidJwksUrl(url)
                if cfg!(not(feature = "tls"))
                    && url
                        .get(..8)
                        .is_some_and(|s| s.eq_ignore_ascii_case("https://")) =>
            {
                write!(
                    f,
                    "an https:// JWKS URL needs tower-fhir's `tls` feature, which this build lacks: {url:?}"
                )
            }
            Self::InvalidJwksUrl(url) => write!(
                f,
                "not a JWKS URL keys may be fetched from: an absolute https:// URL (with the `tls` feature), or http:// to a loopback address only (keys over plain HTTP elsewhere could be swapped on the way), with no credentials in it: {url:?}"
            ),
            Self::ZeroDuration(what) => write!(f, "{what} must be longer than zero"),
            Self::LeewayTooLong(leeway) => write!(f, "leeway {leeway:?} is longer than an hour"),
            Self::InvalidTokenType(typ) => {
                write!(f, "not a token type (a media type name): {typ:?}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`BearerAuthLayer`]. Every setting has a default but the keys.
#[must_use]
pub struct BearerAuthBuilder {
    realm: String,
    algorithms: Vec<Algorithm>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    issuer_audiences: Vec<(String, Vec<String>)>,
    types: Vec<String>,
    issuer_types: Vec<(String, Vec<String>)>,
    leeway: Duration,
    static_keys: KeySet,
    sources: Vec<(Box<dyn KeySource>, Option<String>)>,
    jwks_urls: Vec<(String, Option<String>)>,
    refresh_interval: Duration,
    refetch_cooldown: Duration,
    fetch_timeout: Duration,
    max_age_cap: Duration,
    max_key_age: Duration,
    cache_capacity: u64,
    max_token_bytes: usize,
    skip: Option<Box<SkipFn>>,
    on_reject: Option<Box<RejectFn>>,
    revoked: Option<RevokedTokens>,
}

impl Default for BearerAuthBuilder {
    fn default() -> Self {
        Self {
            realm: "fhir".to_owned(),
            algorithms: ALL_ALGORITHMS.to_vec(),
            issuers: Vec::new(),
            audiences: Vec::new(),
            issuer_audiences: Vec::new(),
            types: Vec::new(),
            issuer_types: Vec::new(),
            leeway: Duration::from_secs(60),
            static_keys: KeySet::new(),
            sources: Vec::new(),
            jwks_urls: Vec::new(),
            refresh_interval: Duration::from_secs(300),
            refetch_cooldown: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
            max_age_cap: Duration::from_secs(3_600),
            max_key_age: Duration::from_secs(86_400),
            cache_capacity: 10_000,
            max_token_bytes: 16 * 1024,
            skip: None,
            on_reject: None,
            revoked: None,
        }
    }
}

impl BearerAuthBuilder {
    /// The realm named in `WWW-Authenticate` challenges. Default `fhir`.
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = realm.into();
        self
    }

    /// The algorithms accepted at all; each key further restricts to its own. Default: all
    /// that jsonwebtoken verifies (`none` never is).
    pub fn algorithms(mut self, algorithms: impl IntoIterator<Item = Algorithm>) -> Self {
        self.algorithms = algorithms.into_iter().collect();
        self
    }

    /// Accepts tokens from this issuer (`iss`); call again to allow several. When any issuer
    /// is configured, `iss` is required.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }

    /// Accepts tokens for this audience (`aud`); call again to allow several. When any
    /// audience is configured, `aud` is required; when none is, `aud` is not checked.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audiences.push(audience.into());
        self
    }

    /// Tokens whose `iss` is `issuer` must name this audience (`aud`) instead of those set
    /// with [`audience`](Self::audience); call again to allow several. For trusting another
    /// identity provider whose tokens carry its own audience: each issuer's audiences hold
    /// for its tokens only. Adds `issuer` to the accepted issuers.
    pub fn audience_for_issuer(
        mut self,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        let issuer = issuer.into();
        match self.issuer_audiences.iter_mut().find(|(i, _)| *i == issuer) {
            Some((_, audiences)) => audiences.push(audience.into()),
            None => {
                self.issuers.push(issuer.clone());
                self.issuer_audiences.push((issuer, vec![audience.into()]));
            }
        }
        self
    }

    /// Accepts tokens whose JWS header declares this type (`typ`); call again to allow several.
    /// When any type is set, `typ` is required; when none is (the default), it is not checked.
    ///
    /// Explicit typing (RFC 8725 §3.11): an identity provider signs other JWTs than access
    /// tokens with the same keys, ID tokens among them, and an ID token issued to an
    /// application registered under the API's own audience would otherwise pass for an access
    /// token. RFC 9068's access tokens declare `at+jwt`. Types are media types, compared
    /// without case and with `application/` optional (`at+jwt` accepts `application/at+jwt`).
    /// Providers that declare only `JWT` on every token (Microsoft Entra ID, Keycloak) cannot
    /// be told apart so: leave the type unchecked for them, or set it per issuer with
    /// [`token_type_for_issuer`](Self::token_type_for_issuer).
    ///
    /// ```
    /// use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
    ///
    /// let layer = BearerAuthLayer::builder()
    ///     .key(VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap())
    ///     .token_type("at+jwt")
    ///     .build();
    /// assert!(layer.is_ok());
    /// let bad = BearerAuthLayer::builder()
    ///     .key(VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap())
    ///     .token_type("at+jwt; q=1")
    ///     .build();
    /// assert!(bad.is_err(), "a type is a media type name, nothing more");
    /// ```
    pub fn token_type(mut self, typ: impl Into<String>) -> Self {
        self.types.push(typ.into());
        self
    }

    /// Tokens whose `iss` is `issuer` must declare this type (`typ`) instead of those set with
    /// [`token_type`](Self::token_type); call again to allow several. For an identity provider
    /// that types its access tokens (`at+jwt`) beside others that do not. Adds `issuer` to the
    /// accepted issuers.
    pub fn token_type_for_issuer(
        mut self,
        issuer: impl Into<String>,
        typ: impl Into<String>,
    ) -> Self {
        let issuer = issuer.into();
        match self.issuer_types.iter_mut().find(|(i, _)| *i == issuer) {
            Some((_, types)) => types.push(typ.into()),
            None => {
                self.issuers.push(issuer.clone());
                self.issuer_types.push((issuer, vec![typ.into()]));
            }
        }
        self
    }

    /// Clock skew allowed on `exp` and `nbf`. Default 60 s; at most an hour.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Adds a static verification key. It vouches for tokens of any accepted issuer, except
    /// the issuers whose keys are bound to them ([`key_source_for_issuer`](Self::key_source_for_issuer),
    /// `jwks_url_for_issuer`, the token endpoint's in a gateway): only their own keys do.
    pub fn key(mut self, key: VerificationKey) -> Self {
        self.static_keys = self.static_keys.with_key(key);
        self
    }

    /// Adds static verification keys, such as a parsed JWKS document. Like [`key`](Self::key)'s,
    /// they do not vouch for an issuer whose keys are bound to it.
    pub fn keys(mut self, keys: KeySet) -> Self {
        for key in keys.into_keys() {
            self.static_keys = self.static_keys.with_shared_key(key);
        }
        self
    }

    /// Adds a source of keys fetched at run time, cached, refreshed and refetched. Bound to no
    /// issuer: like [`key`](Self::key)'s, its keys do not vouch for an issuer whose keys are
    /// bound to it.
    pub fn key_source(mut self, source: impl KeySource) -> Self {
        self.sources.push((Box::new(source), None));
        self
    }

    /// Whether some key is bound to no issuer (static keys, `key_source`, `jwks_url`).
    #[cfg_attr(not(all(feature = "proxy", feature = "token")), allow(dead_code))]
    pub(crate) fn has_unbound_keys(&self) -> bool {
        !self.static_keys.is_empty()
            || self.sources.iter().any(|(_, issuer)| issuer.is_none())
            || self.jwks_urls.iter().any(|(_, issuer)| issuer.is_none())
    }

    /// The issuers whose tokens are accepted (empty: any).
    #[cfg_attr(not(all(feature = "proxy", feature = "token")), allow(dead_code))]
    pub(crate) fn accepted_issuers(&self) -> &[String] {
        &self.issuers
    }

    /// Adds a source of keys that vouch only for tokens whose `iss` is `issuer` (also added
    /// to the accepted issuers): with several identity providers, one cannot sign tokens in
    /// another's name. Keys bound to no issuer ([`key`](Self::key), [`key_source`](Self::key_source))
    /// then no longer vouch for `issuer` either.
    pub fn key_source_for_issuer(
        mut self,
        source: impl KeySource,
        issuer: impl Into<String>,
    ) -> Self {
        let issuer = issuer.into();
        self.issuers.push(issuer.clone());
        self.sources.push((Box::new(source), Some(issuer)));
        self
    }

    /// Adds a JWKS URL (`http://`), fetched with the hyper-util client. Bound to no issuer:
    /// like [`key`](Self::key)'s, its keys do not vouch for an issuer whose keys are bound to
    /// it.
    #[cfg(feature = "remote-jwks")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote-jwks")))]
    pub fn jwks_url(mut self, url: impl Into<String>) -> Self {
        self.jwks_urls.push((url.into(), None));
        self
    }

    /// Adds a JWKS URL whose keys vouch only for tokens whose `iss` is `issuer` (also added to
    /// the accepted issuers); keys bound to no issuer then no longer vouch for `issuer`.
    #[cfg(feature = "remote-jwks")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote-jwks")))]
    pub fn jwks_url_for_issuer(
        mut self,
        url: impl Into<String>,
        issuer: impl Into<String>,
    ) -> Self {
        let issuer = issuer.into();
        self.issuers.push(issuer.clone());
        self.jwks_urls.push((url.into(), Some(issuer)));
        self
    }

    /// How often fetched keys are refreshed when the source gives no `max-age`. Default 5 min.
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// The least time between two fetches caused by unknown `kid`s or failed refreshes; also
    /// the shortest `max-age` honoured. Default 30 s.
    pub fn refetch_cooldown(mut self, cooldown: Duration) -> Self {
        self.refetch_cooldown = cooldown;
        self
    }

    /// How long one key fetch may take. Default 5 s.
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// The longest `max-age` of a key source's answer honoured: its keys are fetched again at
    /// least this often, so a key its owner withdrew stops verifying within this time.
    /// Default 1 h.
    pub fn max_age_cap(mut self, cap: Duration) -> Self {
        self.max_age_cap = cap;
        self
    }

    /// How long fetched keys are used while every fetch fails (or answers no usable key): past
    /// this time since the last good fetch they are dropped, and the tokens they would verify
    /// get `503` (`KeysUnavailable`) until a fetch succeeds, so an identity provider that
    /// withdraws its keys by taking them down is heeded too. Raised to
    /// [`max_age_cap`](Self::max_age_cap) plus the fetch cooldown when shorter. Default 24 h.
    pub fn max_key_age(mut self, age: Duration) -> Self {
        self.max_key_age = age;
        self
    }

    /// How many verified tokens to remember (each no longer than its `exp`); `0` turns the
    /// cache off. Default 10 000.
    pub fn token_cache_capacity(mut self, capacity: u64) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Refuses the tokens in this list (`401 invalid_token`, "revoked") until they expire,
    /// cached ones included: the token endpoint's `revoked_tokens()`, filled by its
    /// revocation route. The list is looked at only when something was revoked since a token
    /// was last checked. While the list is staler than it allows
    /// ([`RevokedTokens::set_max_staleness`]), every token is refused with `503`.
    pub fn revoked_tokens(mut self, revoked: RevokedTokens) -> Self {
        self.revoked = Some(revoked);
        self
    }

    /// The longest bearer token accepted, in bytes; longer ones get 400. Default 16 KiB.
    pub fn max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }

    /// Lets requests for which `skip` returns true through without a token (and without
    /// claims in their extensions).
    pub fn skip_if(mut self, skip: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.skip = Some(Box::new(skip));
        self
    }

    /// Replaces the default rejection response (status, `WWW-Authenticate`, OperationOutcome).
    pub fn rejection_response(
        mut self,
        respond: impl Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.on_reject = Some(Box::new(respond));
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<BearerAuthLayer, ConfigError> {
        crate::install_crypto_provider();
        if self.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        if self.realm.is_empty()
            || !self
                .realm
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            return Err(ConfigError::InvalidRealm(self.realm));
        }
        if self.leeway > MAX_LEEWAY {
            return Err(ConfigError::LeewayTooLong(self.leeway));
        }
        for (what, value) in [
            ("refresh_interval", self.refresh_interval),
            ("refetch_cooldown", self.refetch_cooldown),
            ("fetch_timeout", self.fetch_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(what));
            }
        }
        let names = |types: Vec<String>| -> Result<Vec<String>, ConfigError> {
            let names = types
                .into_iter()
                .map(|typ| token_type_name(&typ).ok_or(ConfigError::InvalidTokenType(typ)))
                .collect::<Result<_, _>>()?;
            Ok(dedup(names))
        };
        let types = names(self.types)?;
        let issuer_types = self
            .issuer_types
            .into_iter()
            .map(|(issuer, types)| Ok((issuer, names(types)?)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let types = (!types.is_empty() || !issuer_types.is_empty()).then_some(TokenTypes {
            per_issuer: issuer_types,
            default: types,
        });
        #[cfg_attr(not(feature = "remote-jwks"), allow(unused_mut))]
        let mut sources = self.sources;
        #[cfg(feature = "remote-jwks")]
        for (url, issuer) in &self.jwks_urls {
            // (Named without credentials or query: the error may be printed or logged.)
            let jwks = super::HttpJwks::new(url)
                .map_err(|e| ConfigError::InvalidJwksUrl(e.redacted_url()))?;
            sources.push((Box::new(jwks), issuer.clone()));
        }
        if self.static_keys.is_empty() && sources.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        let policy = RefreshPolicy {
            interval: self.refresh_interval,
            cooldown: self.refetch_cooldown,
            max_age_cap: self.max_age_cap,
            max_key_age: self
                .max_key_age
                .max(self.max_age_cap.saturating_add(self.refetch_cooldown)),
            timeout: self.fetch_timeout,
        };
        let algorithms = dedup(self.algorithms);
        let issuers = dedup(self.issuers);
        // With per-issuer audiences, the verifier checks `aud` itself.
        let (global_audiences, audiences) = if self.issuer_audiences.is_empty() {
            (self.audiences, None)
        } else {
            let audiences = Audiences {
                per_issuer: self.issuer_audiences,
                default: self.audiences,
            };
            (Vec::new(), Some(audiences))
        };
        let validations = algorithms
            .iter()
            .map(|&alg| {
                (
                    alg,
                    validation(alg, &issuers, &global_audiences, self.leeway),
                )
            })
            .collect();
        let single_key = match (self.static_keys.keys(), sources.is_empty()) {
            ([key], true) => {
                let pinned: Vec<Algorithm> = key
                    .algorithms()
                    .iter()
                    .copied()
                    .filter(|a| algorithms.contains(a))
                    .collect();
                pinned.first().copied().map(|first| {
                    let mut validation =
                        validation(first, &issuers, &global_audiences, self.leeway);
                    validation.algorithms = pinned;
                    (Arc::clone(key), validation)
                })
            }
            _ => None,
        };
        let verifier = Verifier {
            realm: Arc::from(self.realm),
            validations,
            static_keys: self.static_keys,
            sources: sources
                .into_iter()
                .map(|(source, issuer)| {
                    let mut keys = RefreshingKeys::new(source, policy);
                    keys.issuer = issuer.map(Arc::from);
                    Arc::new(keys)
                })
                .collect(),
            cache: (self.cache_capacity > 0).then(|| TokenCache::new(self.cache_capacity)),
            max_token_bytes: self.max_token_bytes,
            single_key,
            cache_counts: crate::ops::CacheCounts::new("token"),
            audiences,
            revoked: self.revoked,
            types,
        };
        Ok(BearerAuthLayer {
            config: Arc::new(Config {
                verifier: Arc::new(verifier),
                skip: self.skip,
                on_reject: self.on_reject,
            }),
        })
    }
}

/// `items` in their order, each once.
pub(crate) fn dedup<T: Eq + std::hash::Hash>(items: Vec<T>) -> Vec<T> {
    // (A set, not a search of what is kept for each: a client of 50,000 tenants took seconds.)
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let first: Vec<bool> = items.iter().map(|item| seen.insert(item)).collect();
    drop(seen);
    items
        .into_iter()
        .zip(first)
        .filter_map(|(item, first)| first.then_some(item))
        .collect()
}

fn validation(
    alg: Algorithm,
    issuers: &[String],
    audiences: &[String],
    leeway: Duration,
) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if issuers.is_empty() {
        validation.iss = None;
    } else {
        validation.set_issuer(issuers);
        required.push("iss");
    }
    if audiences.is_empty() {
        // jsonwebtoken refuses any token with an `aud` unless an audience is set.
        validation.validate_aud = false;
    } else {
        validation.set_audience(audiences);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

impl fmt::Debug for BearerAuthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuthBuilder")
            .field("realm", &self.realm)
            .field("algorithms", &self.algorithms)
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .field("token_types", &self.types)
            .field("leeway", &self.leeway)
            .field("static_keys", &self.static_keys)
            .field("jwks_urls", &self.jwks_urls)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::FetchedKeys;

    fn hmac() -> VerificationKey {
        VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap()
    }

    #[test]
    fn dedup_keeps_each_first_in_its_order() {
        assert_eq!(dedup(vec![3, 1, 3, 2, 1]), [3, 1, 2]);
        assert!(dedup(Vec::<u8>::new()).is_empty());
        // Many: each once, in order (a set, so linear; a search of what is kept was quadratic).
        let many: Vec<u32> = (0..50_000).chain(0..50_000).collect();
        assert_eq!(dedup(many), (0..50_000).collect::<Vec<_>>());
    }

    #[cfg(all(feature = "remote-jwks", not(feature = "tls")))]
    #[test]
    fn an_https_jwks_url_without_tls_says_which_feature_it_needs() {
        let refused = BearerAuthLayer::builder()
            .jwks_url("https://login.example/keys")
            .build()
            .unwrap_err();
        assert!(refused.to_string().contains("`tls` feature"), "{refused}");
    }

    #[test]
    fn refuses_bad_configuration() {
        assert_eq!(
            BearerAuthLayer::builder().build().unwrap_err(),
            ConfigError::NoKeys
        );
        assert_eq!(
            BearerAuthLayer::builder()
                .key(hmac())
                .algorithms([])
                .build()
                .unwrap_err(),
            ConfigError::NoAlgorithms
        );
        assert!(matches!(
            BearerAuthLayer::builder().key(hmac()).realm("a\"b").build(),
            Err(ConfigError::InvalidRealm(_))
        ));
        assert_eq!(
            BearerAuthLayer::builder()
                .key(hmac())
                .refetch_cooldown(Duration::ZERO)
                .build()
                .unwrap_err(),
            ConfigError::ZeroDuration("refetch_cooldown")
        );
        assert!(matches!(
            BearerAuthLayer::builder()
                .key(hmac())
                .leeway(Duration::from_secs(u64::MAX))
                .build(),
            Err(ConfigError::LeewayTooLong(_))
        ));
    }

    #[cfg(feature = "remote-jwks")]
    #[test]
    fn refuses_bad_jwks_url() {
        assert!(matches!(
            BearerAuthLayer::builder().jwks_url("ftp://x/jwks").build(),
            Err(ConfigError::InvalidJwksUrl(_))
        ));
    }

    #[test]
    fn requires_configured_claims() {
        let v = validation(
            Algorithm::RS256,
            &["i".into()],
            &["a".into()],
            Duration::from_secs(5),
        );
        assert_eq!(v.leeway, 5);
        assert!(v.validate_nbf && v.validate_exp && v.validate_aud);
        for claim in ["exp", "iss", "aud"] {
            assert!(v.required_spec_claims.contains(claim), "{claim}");
        }
        let v = validation(Algorithm::RS256, &[], &[], Duration::ZERO);
        assert!(!v.validate_aud && v.iss.is_none());
        assert_eq!(v.algorithms, [Algorithm::RS256]);
    }

    /// The defaults README.md and the setters' docs state, in the builder and in what the
    /// built layer runs with.
    #[test]
    fn documented_defaults() {
        const SECOND: Duration = Duration::from_secs(1);
        let builder = BearerAuthLayer::builder();
        assert_eq!(builder.realm, "fhir");
        assert_eq!(builder.algorithms, ALL_ALGORITHMS);
        assert_eq!(builder.leeway, 60 * SECOND);
        assert_eq!(builder.refresh_interval, 5 * 60 * SECOND);
        assert_eq!(builder.refetch_cooldown, 30 * SECOND);
        assert_eq!(builder.fetch_timeout, 5 * SECOND);
        assert_eq!(builder.max_age_cap, 60 * 60 * SECOND);
        assert_eq!(builder.max_key_age, 24 * 60 * 60 * SECOND);
        assert_eq!(builder.cache_capacity, 10_000);
        assert_eq!(builder.max_token_bytes, 16 * 1024);

        let source = || async { Ok(FetchedKeys::from(KeySet::new())) };
        let layer = builder.key_source(source).build().unwrap();
        let verifier = &layer.config.verifier;
        assert_eq!(&*verifier.realm, "fhir");
        assert_eq!(
            verifier
                .validations
                .iter()
                .map(|(alg, _)| *alg)
                .collect::<Vec<_>>(),
            ALL_ALGORITHMS
        );
        for (alg, validation) in &verifier.validations {
            assert_eq!(validation.leeway, 60, "{alg:?}");
        }
        let [source] = &verifier.sources[..] else {
            panic!("one key source");
        };
        let policy = source.policy();
        assert_eq!(policy.interval, 5 * 60 * SECOND);
        assert_eq!(policy.cooldown, 30 * SECOND);
        assert_eq!(policy.timeout, 5 * SECOND);
        assert_eq!(policy.max_age_cap, 60 * 60 * SECOND);
        assert_eq!(policy.max_key_age, 24 * 60 * 60 * SECOND);
        assert_eq!(
            verifier.cache.as_ref().map(TokenCache::capacity),
            Some(10_000)
        );
        assert_eq!(verifier.max_token_bytes, 16 * 1024);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let layer = BearerAuthLayer::builder()
            .key(VerificationKey::hmac("hunter2-hunter2-hunter2-hunter2-hunter2").unwrap())
            .build()
            .unwrap();
        let shown = format!("{layer:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("fhir"),
            "{shown}"
        );
    }
}
