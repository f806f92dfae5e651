//! Tenant scope: which customer tenant a verified token speaks for.
//!
//! [`TenantScopeLayer`] sits after the bearer layer. It takes the tenant id (a GUID, the
//! customer's directory tenant) from the [`VerifiedClaims`]: by default the one `scope` value
//! that is a GUID; or a scope with a prefix (`tenant/<id>`), another claim (`tid`), or a
//! closure. It puts the [`TenantId`] in the request extensions for the routing layer.
//!
//! A tenant hint the client sent itself (`X-FHIR-TENANT-ID`, `X-Tenant-ID` and any header
//! configured) is removed before anything else: only the verified token names the tenant.
//! A token that names no tenant, or more than one, gets 403 with RFC 6750
//! `insufficient_scope` and an `OperationOutcome`.
//!
//! ## Issuers bound to tenants
//!
//! A token from a third-party identity provider names the tenant its issuer chose. When
//! several issuers are trusted, bind each to the tenants it may speak for:
//! [`issuer_tenants`](TenantScopeBuilder::issuer_tenants) (only these) or
//! [`issuer_any_tenant`](TenantScopeBuilder::issuer_any_tenant) (an issuer you trust with
//! every tenant, such as your own token endpoint, which checks each client's tenants when it
//! issues). Once one issuer is bound, every issuer must be: a token whose `iss` is not bound,
//! or that names a tenant its issuer is not bound to, gets the same 403. With no binding at
//! all, any verified token may name any tenant (the layer alone cannot know your issuers).
//!
//! ```
//! use tower_fhir::tenant::{TenantId, TenantScopeLayer};
//!
//! let contoso: TenantId = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap();
//! let _layer = TenantScopeLayer::builder()
//!     .issuer_any_tenant("https://gateway.example")
//!     .issuer_tenants("https://login.contoso.example/v2.0", [contoso])
//!     .build()
//!     .unwrap();
//! ```
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fhir::auth::VerifiedClaims;
//! use tower_fhir::tenant::{TenantId, TenantScopeLayer};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let service = ServiceBuilder::new()
//!     .layer(TenantScopeLayer::builder().build().unwrap())
//!     .service_fn(|req: Request<Full<Bytes>>| async move {
//!         assert!(req.headers().get("x-tenant-id").is_none());
//!         let tenant = req.extensions().get::<TenantId>().unwrap();
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(tenant.to_string())))
//!     });
//!
//! // What the bearer layer would have verified:
//! let claims = serde_json::json!({"exp": 4_000_000_000u64, "scope": "4D1F6C2E-8A3B-4C5D-9E7F-1A2B3C4D5E6F"});
//! let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
//! let mut request = Request::builder()
//!     .header("x-tenant-id", "00000000-0000-0000-0000-000000000001") // ignored and removed
//!     .body(Full::default())
//!     .unwrap();
//! request.extensions_mut().insert(claims);
//! let response = service.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! // A verified token without a tenant: 403 insufficient_scope.
//! let claims = serde_json::json!({"exp": 4_000_000_000u64, "scope": "patient/*.read"});
//! let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
//! let mut request = Request::new(Full::default());
//! request.extensions_mut().insert(claims);
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::FORBIDDEN);
//! # });
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use crate::auth::{MemoKey, VerifiedClaims};
use crate::body::ResponseBody;
use crate::future::ResponseFuture;
use crate::ops::RequestFacts;
use crate::outcome::{IssueType, OperationOutcome};

/// A customer's directory tenant id: a GUID, always shown in lowercase hyphenated form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Uuid);

impl TenantId {
    /// Parses a GUID in any case, hyphenated (also `{braced}` or `urn:uuid:`) or as 32 hex
    /// digits.
    pub fn parse(text: &str) -> Result<Self, InvalidTenantId> {
        Uuid::try_parse(text.trim())
            .map(Self)
            .map_err(|_| InvalidTenantId(text.chars().take(64).collect()))
    }

    /// The id's 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({self})")
    }
}

impl FromStr for TenantId {
    type Err = InvalidTenantId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for TenantId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A string that is not a GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTenantId(pub String);

impl fmt::Display for InvalidTenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a tenant GUID: {:?}", self.0)
    }
}

impl std::error::Error for InvalidTenantId {}

/// Why a verified token names no usable tenant; the text is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRejection(&'static str);

impl TenantRejection {
    /// A rejection with this description (no `"` or `\`: it goes into `WWW-Authenticate`).
    pub const fn new(description: &'static str) -> Self {
        Self(description)
    }

    /// The description.
    pub fn description(&self) -> &'static str {
        self.0
    }
}

type TenantFn = dyn Fn(&VerifiedClaims) -> Result<TenantId, TenantRejection> + Send + Sync;

enum Source {
    Scope,
    ScopePrefix(String),
    Claim(String),
    Custom(Box<TenantFn>),
}

/// The headers a client might use to name a tenant itself; always removed.
pub const DEFAULT_HINT_HEADERS: [&str; 5] = [
    "x-fhir-tenant-id",
    "x-tenant-id",
    "x-tenant",
    "tenant-id",
    "x-ms-tenant-id",
];

/// A Tower layer that puts the token's [`TenantId`] in the request extensions.
#[derive(Clone)]
#[must_use]
pub struct TenantScopeLayer {
    config: Arc<Config>,
}

struct Config {
    source: Source,
    /// This layer's key for the tenant it keeps with a token's claims
    /// ([`VerifiedClaims::memoized`]): a cached token's tenant is found once, not on each of
    /// its requests.
    memo: MemoKey,
    hint_headers: Vec<HeaderName>,
    /// The tenants each issuer may name; empty: any issuer, any tenant.
    issuers: HashMap<String, IssuerTenants>,
}

/// The tenants one issuer's tokens may name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IssuerTenants {
    Any,
    Only(HashSet<TenantId>),
}

impl TenantScopeLayer {
    /// Starts configuring the layer; by default the tenant is the GUID in `scope`.
    pub fn builder() -> TenantScopeBuilder {
        TenantScopeBuilder {
            source: Source::Scope,
            hint_headers: DEFAULT_HINT_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            issuers: HashMap::new(),
        }
    }
}

impl fmt::Debug for TenantScopeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.config.source {
            Source::Scope => "scope".to_owned(),
            Source::ScopePrefix(prefix) => format!("scope prefix {prefix:?}"),
            Source::Claim(claim) => format!("claim {claim:?}"),
            Source::Custom(_) => "custom".to_owned(),
        };
        f.debug_struct("TenantScopeLayer")
            .field("source", &source)
            .field("hint_headers", &self.config.hint_headers)
            .field("issuers", &self.config.issuers)
            .finish()
    }
}

/// A configuration the tenant layer refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A hint header name is not a valid HTTP header name.
    InvalidHeaderName(String),
    /// The scope prefix or claim name is empty.
    EmptyName,
    /// An issuer was bound to tenants with an empty issuer name.
    EmptyIssuer,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidHeaderName(name) => write!(f, "invalid header name {name:?}"),
            Self::EmptyName => f.write_str("the scope prefix or claim name is empty"),
            Self::EmptyIssuer => f.write_str("an issuer bound to tenants has an empty name"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`TenantScopeLayer`].
#[must_use]
pub struct TenantScopeBuilder {
    source: Source,
    hint_headers: Vec<String>,
    issuers: HashMap<String, IssuerTenants>,
}

impl fmt::Debug for TenantScopeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantScopeBuilder")
            .field("hint_headers", &self.hint_headers)
            .field("issuers", &self.issuers)
            .finish_non_exhaustive()
    }
}

impl TenantScopeBuilder {
    /// The tenant is the one `scope` value that is a GUID (the default).
    pub fn from_scope(mut self) -> Self {
        self.source = Source::Scope;
        self
    }

    /// The tenant is the one `scope` value starting with `prefix` (say `tenant/`), followed
    /// by a GUID.
    pub fn from_scope_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.source = Source::ScopePrefix(prefix.into());
        self
    }

    /// The tenant is this claim's string value (say `tid`), a GUID.
    pub fn from_claim(mut self, claim: impl Into<String>) -> Self {
        self.source = Source::Claim(claim.into());
        self
    }

    /// The tenant is what this closure makes of the claims.
    pub fn from_fn(
        mut self,
        tenant: impl Fn(&VerifiedClaims) -> Result<TenantId, TenantRejection> + Send + Sync + 'static,
    ) -> Self {
        self.source = Source::Custom(Box::new(tenant));
        self
    }

    /// Also removes this header from every request (besides the
    /// [`DEFAULT_HINT_HEADERS`]).
    pub fn strip_header(mut self, name: impl Into<String>) -> Self {
        self.hint_headers.push(name.into());
        self
    }

    /// Tokens whose `iss` is `issuer` may name only these tenants (called again for the same
    /// issuer, the tenants add up). Once any issuer is bound, tokens of issuers not bound are
    /// refused for every tenant.
    pub fn issuer_tenants(
        mut self,
        issuer: impl Into<String>,
        tenants: impl IntoIterator<Item = TenantId>,
    ) -> Self {
        let entry = self
            .issuers
            .entry(issuer.into())
            .or_insert_with(|| IssuerTenants::Only(HashSet::new()));
        if let IssuerTenants::Only(allowed) = entry {
            allowed.extend(tenants);
        }
        self
    }

    /// Tokens whose `iss` is `issuer` may name any tenant: for an issuer that checks the
    /// tenant itself, such as this crate's token endpoint (which issues a tenant only to the
    /// clients registered for it). Wins over [`issuer_tenants`](Self::issuer_tenants) for the
    /// same issuer.
    pub fn issuer_any_tenant(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.insert(issuer.into(), IssuerTenants::Any);
        self
    }

    /// Whether any issuer is bound to tenants (then every issuer must be).
    pub fn binds_issuers(&self) -> bool {
        !self.issuers.is_empty()
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<TenantScopeLayer, ConfigError> {
        if self.issuers.contains_key("") {
            return Err(ConfigError::EmptyIssuer);
        }
        match &self.source {
            Source::ScopePrefix(name) | Source::Claim(name) if name.is_empty() => {
                return Err(ConfigError::EmptyName)
            }
            _ => {}
        }
        let hint_headers = self
            .hint_headers
            .iter()
            .map(|name| {
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| ConfigError::InvalidHeaderName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TenantScopeLayer {
            config: Arc::new(Config {
                source: self.source,
                memo: MemoKey::unique(),
                hint_headers,
                issuers: self.issuers,
            }),
        })
    }
}

impl<S> Layer<S> for TenantScopeLayer {
    type Service = TenantScope<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantScope {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// Puts the token's [`TenantId`] in the request extensions. Made by [`TenantScopeLayer`].
#[derive(Clone)]
pub struct TenantScope<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for TenantScope<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantScope")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TenantScope<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // Most requests carry no hint: one pass over their names before any removal.
        let hints = &self.config.hint_headers;
        if request.headers().keys().any(|name| hints.contains(name)) {
            for name in hints {
                request.headers_mut().remove(name);
            }
        }
        let tenant = match request.extensions().get::<VerifiedClaims>() {
            Some(claims) => match self.config.source {
                // A user's function may look beyond the claims: asked every time.
                Source::Custom(_) => self.config.bound_tenant_of(claims),
                _ => claims.memoized(self.config.memo, |claims| {
                    self.config.bound_tenant_of(claims)
                }),
            },
            None => Err(TenantRejection::new(
                "The request carries no verified token",
            )),
        };
        if RequestFacts::is_watched() {
            if let Some(claims) = request.extensions().get::<VerifiedClaims>() {
                RequestFacts::set_claims(claims);
            }
            if let Ok(tenant) = &tenant {
                RequestFacts::set_tenant(*tenant);
            }
        }
        match tenant {
            Ok(tenant) => {
                request.extensions_mut().insert(tenant);
                ResponseFuture::inner(self.inner.call(request))
            }
            Err(rejection) => {
                tracing::debug!(reason = rejection.description(), "no tenant in the token");
                ResponseFuture::answered(insufficient_scope(&rejection))
            }
        }
    }
}

impl Config {
    /// The token's tenant, when its issuer may name it.
    fn bound_tenant_of(&self, claims: &VerifiedClaims) -> Result<TenantId, TenantRejection> {
        let tenant = self.tenant_of(claims)?;
        if self.issuers.is_empty() {
            return Ok(tenant);
        }
        match claims.issuer().and_then(|issuer| self.issuers.get(issuer)) {
            Some(IssuerTenants::Any) => Ok(tenant),
            Some(IssuerTenants::Only(allowed)) if allowed.contains(&tenant) => Ok(tenant),
            Some(IssuerTenants::Only(_)) => Err(TenantRejection::new(
                "The token's issuer may not name this tenant",
            )),
            None => Err(TenantRejection::new(
                "The token's issuer is not bound to any tenant",
            )),
        }
    }

    fn tenant_of(&self, claims: &VerifiedClaims) -> Result<TenantId, TenantRejection> {
        const NONE: TenantRejection = TenantRejection::new("The token's scope names no tenant");
        const MANY: TenantRejection =
            TenantRejection::new("The token's scope names more than one tenant");
        const MALFORMED: TenantRejection = TenantRejection::new("The token's tenant is not a GUID");
        match &self.source {
            Source::Scope => one(
                claims.scopes().filter_map(|s| TenantId::parse(s).ok()),
                NONE,
                MANY,
            ),
            Source::ScopePrefix(prefix) => {
                let tenants = claims
                    .scopes()
                    .filter_map(|s| s.strip_prefix(prefix.as_str()));
                let parsed: Vec<_> = tenants.map(TenantId::parse).collect();
                if parsed.iter().any(Result::is_err) {
                    return Err(MALFORMED);
                }
                one(parsed.into_iter().flatten(), NONE, MANY)
            }
            Source::Claim(claim) => match claims.get(claim).and_then(|v| v.as_str()) {
                Some(value) => TenantId::parse(value).map_err(|_| MALFORMED),
                None => Err(TenantRejection::new("The token has no tenant claim")),
            },
            Source::Custom(tenant) => tenant(claims),
        }
    }
}

/// The one distinct tenant among `tenants`.
fn one(
    tenants: impl Iterator<Item = TenantId>,
    none: TenantRejection,
    many: TenantRejection,
) -> Result<TenantId, TenantRejection> {
    let mut found = None;
    for tenant in tenants {
        match found {
            None => found = Some(tenant),
            Some(seen) if seen == tenant => {}
            Some(_) => return Err(many),
        }
    }
    found.ok_or(none)
}

/// 403 with `WWW-Authenticate: Bearer error="insufficient_scope"` (RFC 6750 §3.1).
fn insufficient_scope(rejection: &TenantRejection) -> Response<Bytes> {
    let mut response = OperationOutcome::error(IssueType::Forbidden, rejection.description())
        .to_response(StatusCode::FORBIDDEN);
    let challenge = format!(
        "Bearer error=\"insufficient_scope\", error_description=\"{}\"",
        rejection.description()
    );
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use serde_json::json;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    const B: &str = "9b2e1c3d-0000-4000-8000-00000000000b";

    fn claims(extra: serde_json::Value) -> VerifiedClaims {
        let mut map = json!({"exp": 4_000_000_000u64})
            .as_object()
            .unwrap()
            .clone();
        map.extend(extra.as_object().unwrap().clone());
        VerifiedClaims::assume_verified(map).unwrap()
    }

    async fn run(
        layer: TenantScopeLayer,
        claims: Option<VerifiedClaims>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String, Option<String>) {
        let service = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
            let leaked: Vec<_> = req.headers().keys().map(|k| k.to_string()).collect();
            let tenant = req.extensions().get::<TenantId>().map(ToString::to_string);
            Ok::<_, Infallible>(Response::new(Full::from(format!("{tenant:?} {leaked:?}"))))
        }));
        let mut request = Request::builder();
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Full::default()).unwrap();
        if let Some(claims) = claims {
            request.extensions_mut().insert(claims);
        }
        let response = service.oneshot(request).await.unwrap();
        let status = response.status();
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap(), challenge)
    }

    fn default_layer() -> TenantScopeLayer {
        TenantScopeLayer::builder().build().unwrap()
    }

    #[test]
    fn tenant_ids_are_normalised_and_validated() {
        let upper = TenantId::parse(&A.to_uppercase()).unwrap();
        assert_eq!(upper.to_string(), A);
        assert_eq!(TenantId::parse(&format!("{{{A}}}")).unwrap(), upper);
        assert_eq!(TenantId::parse(&A.replace('-', "")).unwrap(), upper);
        for bad in [
            "",
            "tenant",
            "4d1f6c2e-8a3b-4c5d-9e7f",
            "../4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
        let json = serde_json::to_string(&upper).unwrap();
        assert_eq!(json, format!("\"{A}\""));
        assert_eq!(serde_json::from_str::<TenantId>(&json).unwrap(), upper);
    }

    #[tokio::test]
    async fn each_layer_finds_its_own_tenant_in_shared_claims() {
        // One token (one claims value, as the token cache hands out) read by three layers with
        // different rules, in turn and repeatedly: each gets what its rule finds.
        let shared = claims(json!({"scope": format!("{A} t:{B}"), "tid": B}));
        let by_scope = default_layer();
        let by_claim = TenantScopeLayer::builder()
            .from_claim("tid")
            .build()
            .unwrap();
        let by_prefix = TenantScopeLayer::builder()
            .from_scope_prefix("t:")
            .build()
            .unwrap();
        for _ in 0..2 {
            let (_, body, _) = run(by_scope.clone(), Some(shared.clone()), &[]).await;
            assert!(body.starts_with(&format!("Some(\"{A}\")")), "{body}");
            let (_, body, _) = run(by_claim.clone(), Some(shared.clone()), &[]).await;
            assert!(body.starts_with(&format!("Some(\"{B}\")")), "{body}");
            let (_, body, _) = run(by_prefix.clone(), Some(shared.clone()), &[]).await;
            assert!(body.starts_with(&format!("Some(\"{B}\")")), "{body}");
        }
        // A rejection is remembered the same way, and stays a rejection.
        let none = claims(json!({"scope": "patient/*.read"}));
        for _ in 0..2 {
            let (status, _, _) = run(by_scope.clone(), Some(none.clone()), &[]).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
        }
    }

    #[tokio::test]
    async fn takes_the_guid_from_scope_among_other_scopes() {
        let (status, body, _) = run(
            default_layer(),
            Some(claims(
                json!({"scope": format!("patient/*.read {}", A.to_uppercase())}),
            )),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with(&format!("Some(\"{A}\")")), "{body}");
    }

    #[tokio::test]
    async fn no_tenant_or_two_tenants_is_insufficient_scope() {
        for scope in [
            "patient/*.read".to_owned(),
            format!("{A} {B}"),
            String::new(),
        ] {
            let (status, body, challenge) =
                run(default_layer(), Some(claims(json!({"scope": scope}))), &[]).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{scope}");
            assert!(challenge
                .unwrap()
                .starts_with("Bearer error=\"insufficient_scope\""));
            assert!(
                body.contains("OperationOutcome") && body.contains("forbidden"),
                "{body}"
            );
        }
        // The same tenant twice (in different case) is one tenant.
        let scope = format!("{A} {}", A.to_uppercase());
        let (status, _, _) = run(default_layer(), Some(claims(json!({"scope": scope}))), &[]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn hint_headers_are_stripped_and_never_trusted() {
        let layer = TenantScopeLayer::builder()
            .strip_header("X-Customer")
            .build()
            .unwrap();
        let headers = [
            ("x-fhir-tenant-id", B),
            ("X-Tenant-ID", B),
            ("x-tenant", B),
            ("Tenant-Id", B),
            ("x-ms-tenant-id", B),
            ("x-customer", B),
            ("accept", "x"),
        ];
        let (status, body, _) =
            run(layer.clone(), Some(claims(json!({"scope": A}))), &headers).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("Some(\"{A}\") [\"accept\"]"));
        // A hint cannot stand in for a tenant the token lacks.
        let (status, _, _) = run(layer, Some(claims(json!({"scope": "x"}))), &headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn other_sources_of_the_tenant() {
        let prefixed = TenantScopeLayer::builder()
            .from_scope_prefix("tenant/")
            .build()
            .unwrap();
        let c = claims(json!({"scope": format!("{B} tenant/{A}")}));
        assert!(run(prefixed.clone(), Some(c), &[]).await.1.contains(A));
        let c = claims(json!({"scope": "tenant/not-a-guid"}));
        assert_eq!(run(prefixed, Some(c), &[]).await.0, StatusCode::FORBIDDEN);

        let claim = TenantScopeLayer::builder()
            .from_claim("tid")
            .build()
            .unwrap();
        assert!(run(
            claim.clone(),
            Some(claims(json!({"tid": A, "scope": B}))),
            &[]
        )
        .await
        .1
        .contains(A));
        assert_eq!(
            run(claim, Some(claims(json!({"scope": A}))), &[]).await.0,
            StatusCode::FORBIDDEN
        );

        let custom = TenantScopeLayer::builder()
            .from_fn(|c| {
                c.get("org")
                    .and_then(|v| v.as_str())
                    .and_then(|org| TenantId::parse(org).ok())
                    .ok_or(TenantRejection::new("no org"))
            })
            .build()
            .unwrap();
        assert!(run(custom, Some(claims(json!({"org": B}))), &[])
            .await
            .1
            .contains(B));
    }

    #[tokio::test]
    async fn issuers_bound_to_tenants_name_only_those() {
        let (a, b) = (TenantId::parse(A).unwrap(), TenantId::parse(B).unwrap());
        let layer = TenantScopeLayer::builder()
            .issuer_tenants("https://idp.a", [a])
            .issuer_any_tenant("https://gateway")
            .build()
            .unwrap();
        let token = |iss: Option<&str>, tenant: &str| match iss {
            Some(iss) => claims(json!({"iss": iss, "scope": tenant})),
            None => claims(json!({"scope": tenant})),
        };
        let status = |iss, tenant| {
            let layer = layer.clone();
            async move { run(layer, Some(token(iss, tenant)), &[]).await }
        };
        assert_eq!(status(Some("https://idp.a"), A).await.0, StatusCode::OK);
        assert_eq!(status(Some("https://gateway"), A).await.0, StatusCode::OK);
        assert_eq!(status(Some("https://gateway"), B).await.0, StatusCode::OK);
        // The bound issuer naming another tenant, an unbound issuer, no issuer at all; each
        // twice, so the remembered answer is the same.
        for (iss, tenant, reason) in [
            (Some("https://idp.a"), B, "may not name this tenant"),
            (Some("https://idp.b"), A, "not bound to any tenant"),
            (Some("https://IDP.A"), A, "not bound to any tenant"),
            (None, A, "not bound to any tenant"),
        ] {
            let shared = token(iss, tenant);
            for _ in 0..2 {
                let (code, body, challenge) = run(layer.clone(), Some(shared.clone()), &[]).await;
                assert_eq!(code, StatusCode::FORBIDDEN, "{iss:?} {tenant}");
                assert!(body.contains(reason), "{body}");
                assert!(challenge.unwrap().contains("insufficient_scope"));
            }
        }
        // The tenants of repeated calls add up; `issuer_any_tenant` wins.
        let builder = TenantScopeLayer::builder()
            .issuer_tenants("https://idp.a", [a])
            .issuer_tenants("https://idp.a", [b]);
        assert!(builder.binds_issuers());
        let layer = builder.build().unwrap();
        assert_eq!(
            run(layer, Some(token(Some("https://idp.a"), B)), &[])
                .await
                .0,
            StatusCode::OK
        );
        let layer = TenantScopeLayer::builder()
            .issuer_any_tenant("https://idp.a")
            .issuer_tenants("https://idp.a", [a])
            .build()
            .unwrap();
        assert_eq!(
            run(layer, Some(token(Some("https://idp.a"), B)), &[])
                .await
                .0,
            StatusCode::OK
        );
        // No binding: any issuer, any tenant.
        assert!(!TenantScopeLayer::builder().binds_issuers());
        assert_eq!(
            run(default_layer(), Some(token(Some("https://idp.z"), B)), &[])
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            TenantScopeLayer::builder()
                .issuer_any_tenant("")
                .build()
                .unwrap_err(),
            ConfigError::EmptyIssuer
        );
    }

    #[tokio::test]
    async fn without_verified_claims_nothing_passes() {
        let (status, _, _) = run(default_layer(), None, &[("x-tenant-id", A)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn refuses_bad_configuration() {
        assert!(matches!(
            TenantScopeLayer::builder()
                .strip_header("bad header")
                .build(),
            Err(ConfigError::InvalidHeaderName(_))
        ));
        assert_eq!(
            TenantScopeLayer::builder()
                .from_claim("")
                .build()
                .unwrap_err(),
            ConfigError::EmptyName
        );
    }
}
