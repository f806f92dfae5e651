//! `VersionNegotiationLayer`: which FHIR release a request speaks, and `$versions`. The
//! response side (labelling) is in `response.rs`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, GetAll, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tower_layer::Layer;
use tower_service::Service;

use super::media::{
    exact_named_json, is_xml_type, mentions_version, mentions_xml, parse_accept, parse_format,
    parse_parts, split_list, MediaRange, Named,
};
use super::response::{outcome_in_xml, ResponseFuture};
use super::FhirVersion;
use crate::body::ResponseBody;
use crate::outcome::{IssueType, OperationOutcome};

/// A Tower layer that negotiates the FHIR release of each request (the `fhirVersion` MIME
/// parameter in `Accept`, `_format` and, but for a `GET` or `HEAD`, which carries no body,
/// `Content-Type`) and puts it in the request extensions. Its own `$versions` answer varies
/// by `Accept` and `Authorization` (`Vary`).
///
/// `_format` chooses the format. It chooses the release only where its media type names one
/// (`_format=application/fhir+json;fhirVersion=3.0`), and then overrides `Accept`, as FHIR
/// says `_format` does; a `_format` naming none (`json`, `xml`, as HAPI's generic client adds
/// to every request) leaves the release to `Accept`.
///
/// `Accept` may name several releases: the one with the highest q-value that this layer
/// supports (the first among equals) is negotiated, and the others the client accepts, best
/// first, go in the request extensions too, so that the
/// [`TenantRoutingLayer`](crate::route::TenantRoutingLayer) serves the request in the first
/// of them its tenant has a server for where it has none for the best (a range naming no
/// release there accepts any release: what a request naming none gets). A body's release
/// (`Content-Type`) must be one the client accepts (400 if not), and is the one served.
///
/// To a client that prefers XML (`_format=xml`, or an `Accept` taking an XML type at a higher
/// q-value than any JSON one), an `OperationOutcome` made by
/// [`OperationOutcome::to_response`] (this layer's refusals, and those of the layers and the
/// proxy inside it) is written in FHIR XML, in the served release's XML media type; an inner
/// service's other answers pass as they are.
#[derive(Clone)]
#[must_use]
pub struct VersionNegotiationLayer {
    config: Arc<Config>,
}

struct Config {
    supported: Vec<FhirVersion>,
    default: Option<FhirVersion>,
    /// What `$versions` reports as the default when there is no `default`.
    reported_default: Option<FhirVersion>,
    /// Whether `$versions` with credentials is left to the routing layer inside.
    tenant_versions: bool,
}

impl VersionNegotiationLayer {
    /// Starts configuring the layer: every release supported, no default (a request that
    /// names no release goes to its tenant's default upstream).
    pub fn builder() -> VersionNegotiationBuilder {
        VersionNegotiationBuilder {
            supported: FhirVersion::ALL.to_vec(),
            default: None,
            reported_default: None,
            tenant_versions: None,
        }
    }
}

impl fmt::Debug for VersionNegotiationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionNegotiationLayer")
            .field("supported", &self.config.supported)
            .field("default", &self.config.default)
            .finish()
    }
}

/// A configuration the version layer refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// No release is supported.
    NothingSupported,
    /// The default release is not among the supported ones.
    UnsupportedDefault(FhirVersion),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NothingSupported => f.write_str("no FHIR release is supported"),
            Self::UnsupportedDefault(v) => {
                write!(f, "the default release {} is not supported", v.name())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`VersionNegotiationLayer`].
#[derive(Debug, Clone)]
#[must_use]
pub struct VersionNegotiationBuilder {
    supported: Vec<FhirVersion>,
    default: Option<FhirVersion>,
    reported_default: Option<FhirVersion>,
    tenant_versions: Option<bool>,
}

impl VersionNegotiationBuilder {
    /// The releases the gateway serves; a request for any other gets 406 (415 for a body).
    pub fn supported(mut self, versions: impl IntoIterator<Item = FhirVersion>) -> Self {
        self.supported = versions.into_iter().collect();
        self.supported.sort();
        self.supported.dedup();
        self
    }

    /// The release assumed when a request names none. Without one, such requests carry no
    /// `FhirVersion` and the routing layer uses the tenant's default upstream.
    pub fn default_version(mut self, version: FhirVersion) -> Self {
        self.default = Some(version);
        self
    }

    /// The release `$versions` reports as its `default` when no
    /// [`default_version`](Self::default_version) is set. A request that names no release then
    /// goes to its tenant's default upstream, so no one release is every tenant's default:
    /// report the one such a request gets where no tenant decides, as an anonymous `metadata`
    /// request ([`Gateway::builder`](crate::gateway::Gateway::builder) reports the metadata layer's
    /// [`default_version`](crate::metadata::MetadataBuilder::default_version)). It need not
    /// be supported: it says what such a request gets, which a client may not name. Default:
    /// the latest release supported. With [`tenant_versions`](Self::tenant_versions) on, this
    /// is only what a request without credentials is told.
    pub fn reported_default(mut self, version: FhirVersion) -> Self {
        self.reported_default = Some(version);
        self
    }

    /// Leaves `GET $versions` (and `HEAD`) with an `Authorization` header to the
    /// [`TenantRoutingLayer`](crate::route::TenantRoutingLayer) inside, which answers with the
    /// releases the token's tenant is served in that a client may name (those this layer
    /// supports) and, as the `default`, the one a request naming none gets there: this layer's
    /// [`default_version`](Self::default_version) when it has one (even where the tenant has
    /// no server for it, and such a request gets 406), else the tenant's first server's
    /// release (even one this layer does not support, where a tenant has such a server
    /// first). This layer alone knows no tenant: its own answer lists every release it
    /// supports.
    ///
    /// The request passes the bearer and tenant layers as any other does (a missing or bad
    /// token gets 401, a tenant not onboarded 403); the SMART scope layer lets it by, as it
    /// reads no data; the routing layer answers it, before rate limits and any upstream. Off
    /// by default; [`Gateway::builder`](crate::gateway::Gateway::builder) turns it on unless
    /// it was set. Turn it on only with a `TenantRoutingLayer` inside: nothing else answers
    /// such a request, which would reach the service inside with its scopes unchecked.
    pub fn tenant_versions(mut self, on: bool) -> Self {
        self.tenant_versions = Some(on);
        self
    }

    /// [`tenant_versions`](Self::tenant_versions), unless it was set.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn tenant_versions_unless_set(mut self, on: bool) -> Self {
        self.tenant_versions.get_or_insert(on);
        self
    }

    /// Reports `version` as the default, unless a release to report was set.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn reported_default_unless_set(mut self, version: FhirVersion) -> Self {
        self.reported_default.get_or_insert(version);
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<VersionNegotiationLayer, ConfigError> {
        if self.supported.is_empty() {
            return Err(ConfigError::NothingSupported);
        }
        if let Some(default) = self.default.filter(|d| !self.supported.contains(d)) {
            return Err(ConfigError::UnsupportedDefault(default));
        }
        Ok(VersionNegotiationLayer {
            config: Arc::new(Config {
                supported: self.supported,
                default: self.default,
                reported_default: self.reported_default,
                tenant_versions: self.tenant_versions.unwrap_or(false),
            }),
        })
    }
}

impl<S> Layer<S> for VersionNegotiationLayer {
    type Service = VersionNegotiation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VersionNegotiation {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// Negotiates the FHIR release, answers `$versions`, and labels FHIR responses with their
/// `fhirVersion`. Made by [`VersionNegotiationLayer`].
#[derive(Clone)]
pub struct VersionNegotiation<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for VersionNegotiation<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionNegotiation")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// What negotiation decided for one request.
enum Decision {
    /// The release negotiated, and what else the client accepts should its tenant not serve
    /// that one.
    Proceed(Option<FhirVersion>, Fallback),
    /// A `$versions` with credentials, left to the routing layer (see
    /// [`VersionNegotiationBuilder::tenant_versions`]).
    TenantVersions(Option<FhirVersion>, VersionsQuery),
    Answer(Response<Bytes>),
}

/// A `GET $versions` the [`VersionNegotiationLayer`] left to the routing layer, in the
/// request's extensions: what the tenant's answer needs besides the tenant. (Only the layer
/// puts it there: a client cannot.)
#[derive(Debug, Clone)]
pub(crate) struct VersionsQuery {
    /// The releases the layer supports, ascending.
    supported: Arc<[FhirVersion]>,
    /// The layer's default release, which a request naming none gets.
    default: Option<FhirVersion>,
    /// The answer's format, as the client asked.
    form: VersionsForm,
    /// A `HEAD`: the answer's headers without its body.
    head: bool,
}

/// The format of a `$versions` answer: FHIR's JSON, plain `application/json` (the client's
/// first range asks for it), or FHIR's XML (`_format`, or `Accept` preferring it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionsForm {
    Fhir,
    PlainJson,
    Xml,
}

/// Whether `path` is the `$versions` operation the layer answers or leaves to routing, read as
/// the proxy forwards it (as `metadata` is: empty segments do not count, so `//$versions`
/// is `$versions`, not a request the upstream would answer with its own releases).
fn is_versions_path(path: &str) -> bool {
    path.trim_matches('/') == "$versions"
}

impl VersionsQuery {
    /// The query the layer left on `request`, if any. (The path is compared first: most
    /// requests are answered with no look in their extensions.)
    pub(crate) fn of<B>(request: &Request<B>) -> Option<&Self> {
        if !is_versions_path(request.uri().path()) {
            return None;
        }
        request.extensions().get::<Self>()
    }

    /// The query of a layer supporting `supported`, with `default` as its default release,
    /// answered in `form`.
    pub(crate) fn new(
        supported: &[FhirVersion],
        default: Option<FhirVersion>,
        form: VersionsForm,
    ) -> Self {
        let mut supported = supported.to_vec();
        supported.sort();
        Self {
            supported: supported.into(),
            default,
            form,
            head: false,
        }
    }

    /// The answer for a tenant served in `releases`, whose first server's release is
    /// `first`; `named`, the release the request named, if any, shapes its media type.
    pub(crate) fn answer(
        &self,
        releases: impl IntoIterator<Item = FhirVersion>,
        first: FhirVersion,
        named: Option<FhirVersion>,
    ) -> Response<Bytes> {
        let mut served: Vec<FhirVersion> = releases
            .into_iter()
            .filter(|release| self.supported.contains(release))
            .collect();
        served.sort();
        served.dedup();
        // What a request naming none gets: the layer's default when it has one, else the
        // tenant's first server, whatever its release.
        let default = self.default.unwrap_or(first);
        let answer = versions_answer(&served, default, named.unwrap_or(default), self.form);
        if self.head {
            headless(answer)
        } else {
            answer
        }
    }
}

impl Config {
    fn supports(&self, named: Named) -> Option<FhirVersion> {
        match named {
            Named::Version(v) if self.supported.contains(&v) => Some(v),
            _ => None,
        }
    }

    /// The release `$versions` reports as the default.
    fn reported_default(&self) -> FhirVersion {
        self.default
            .or(self.reported_default)
            .or_else(|| self.supported.last().copied())
            .unwrap_or(FhirVersion::R4)
    }

    /// What to do with a request. `may_ask_for_xml` is set when the request may prefer XML
    /// (its `_format` names XML, or, without one, an `Accept` mentions it): then
    /// [`prefers_xml`] says.
    fn decide(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        may_ask_for_xml: &mut bool,
    ) -> Decision {
        let versions_operation =
            (method == Method::GET || method == Method::HEAD) && is_versions_path(path);
        // (A name may be percent-encoded: `%5Fformat`.)
        let format = match query.filter(|q| q.contains("format") || q.contains('%')) {
            Some(query) => match format_parameter(query) {
                Ok(format) => format,
                Err(()) => {
                    return Decision::Answer(error(
                        StatusCode::BAD_REQUEST,
                        IssueType::Invalid,
                        "More than one _format parameter: servers differ on which one counts",
                    ))
                }
            },
            None => None,
        };
        // `_format` chooses the format; the release only where it names one, and then it
        // overrides `Accept` (FHIR). Naming none (`json`: HAPI's generic client adds it to
        // every request), it leaves the release to `Accept`.
        let format_release = format.as_ref().filter(|f| f.named != Named::Nothing);
        // Most requests name no release: skip parsing unless a header mentions one; and only
        // `$versions` needs the ranges themselves.
        let accept_headers = headers.get_all(header::ACCEPT);
        *may_ask_for_xml = match &format {
            Some(format) => is_xml_type(&format.essence),
            None => accept_headers.iter().any(|v| mentions_xml(v.as_bytes())),
        };
        let accept_values = || accept_headers.iter().filter_map(|v| v.to_str().ok());
        let accept: Vec<MediaRange> = if versions_operation {
            accept_values().flat_map(parse_accept).collect()
        } else {
            Vec::new()
        };
        let choices = if let Some(format) = format_release {
            self.accepted(std::iter::once((format.named, format.q)))
        } else if versions_operation {
            self.accepted(accept.iter().map(|r| (r.named, r.q)))
        } else if let Some(version) = single_exact_named(&accept_headers) {
            // The common form, one release: no parsing.
            self.supports(Named::Version(version))
                .map(|v| Choices::one(Some(v)))
                .ok_or(())
        } else if accept_headers
            .iter()
            .any(|v| mentions_version(v.as_bytes()))
        {
            self.accepted(
                accept_values()
                    .flat_map(split_list)
                    .filter_map(parse_parts)
                    .map(|(_, named, q)| (named, q)),
            )
        } else {
            Ok(Choices::default())
        };
        let choices = match choices {
            Ok(choices) => choices,
            Err(()) => {
                return Decision::Answer(error(
                    StatusCode::NOT_ACCEPTABLE,
                    IssueType::NotSupported,
                    "The requested FHIR version is not supported by this server",
                ))
            }
        };
        let accepted = choices.best();
        // Only a body's `Content-Type` names the body's release: a GET's or HEAD's (they carry
        // none) names nothing.
        let content = if carries_no_body(method) {
            None
        } else {
            let mut types = headers.get_all(header::CONTENT_TYPE).iter();
            let first = types.next();
            // A body has one type: with two, the release routed by here and the one a server
            // reads (the last, say) could differ.
            if types.next().is_some() {
                return Decision::Answer(error(
                    StatusCode::BAD_REQUEST,
                    IssueType::Invalid,
                    "A request has one Content-Type",
                ));
            }
            first.and_then(named_content)
        };
        let body_version = match content {
            None | Some(Named::Nothing) => None,
            Some(named) => match self.supports(named) {
                Some(v) => Some(v),
                None => {
                    return Decision::Answer(error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        IssueType::NotSupported,
                        "The body's FHIR version is not supported by this server",
                    ))
                }
            },
        };
        // A body is in its release: the client must take an answer in it.
        if body_version.is_some_and(|body| !choices.accepts(body)) {
            return Decision::Answer(error(
                StatusCode::BAD_REQUEST,
                IssueType::Invalid,
                "Accept and Content-Type name different FHIR versions",
            ));
        }
        let version = body_version.or(accepted).or(self.default);
        if versions_operation {
            // The answer's own format: `_format`'s, else what `Accept` prefers (plain JSON
            // when its first range asks for it).
            let form = if prefers_xml(query, headers, version) {
                VersionsForm::Xml
            } else if plain_json(format.as_ref().map_or(&accept[..], std::slice::from_ref)) {
                VersionsForm::PlainJson
            } else {
                VersionsForm::Fhir
            };
            if self.tenant_versions && headers.contains_key(header::AUTHORIZATION) {
                let mut query = VersionsQuery::new(&self.supported, self.default, form);
                query.head = method == Method::HEAD;
                return Decision::TenantVersions(version, query);
            }
            let default = self.reported_default();
            let answer =
                versions_answer(&self.supported, default, version.unwrap_or(default), form);
            return Decision::Answer(if method == Method::HEAD {
                headless(answer)
            } else {
                answer
            });
        }
        // A body's release, or none named first: nothing else to fall back on.
        let fallback = match (body_version, accepted) {
            (None, Some(best)) => self.fallback(&choices, best),
            _ => Fallback::Nothing,
        };
        Decision::Proceed(version, fallback)
    }

    /// What the client accepts, from its ranges' (release, q): each release this layer
    /// supports, or any release (a range naming none), at the highest q a range gives it,
    /// best first (the first among equals), nothing after any release; `Err` when there are
    /// ranges and none is acceptable (each names a release this server does not serve).
    fn accepted(&self, ranges: impl Iterator<Item = (Named, f32)>) -> Result<Choices, ()> {
        // Each choice once, with its best q and the range that gave it: at most the five
        // releases and any, so on the stack.
        let mut found = [(None, 0.0_f32, 0_usize); CHOICES];
        let mut len = 0;
        // Ranges at `q=0` too: an `Accept` of nothing but those accepts nothing (RFC 9110
        // §12.4.2), so is answered 406, not with what a request naming nothing gets.
        let mut ranges_seen = false;
        for (at, (named, q)) in ranges.enumerate() {
            ranges_seen = true;
            if q <= 0.0 {
                continue;
            }
            let choice = match named {
                Named::Nothing => None,
                named => match self.supports(named) {
                    Some(version) => Some(version),
                    None => continue,
                },
            };
            match found[..len].iter_mut().find(|(c, ..)| *c == choice) {
                Some(entry) if q > entry.1 => (entry.1, entry.2) = (q, at),
                Some(_) => {}
                None => {
                    found[len] = (choice, q, at);
                    len += 1;
                }
            }
        }
        if len == 0 {
            return if ranges_seen {
                Err(())
            } else {
                Ok(Choices::default())
            };
        }
        let found = &mut found[..len];
        found.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
        let mut choices = Choices::default();
        for (choice, ..) in found.iter() {
            choices.push(*choice);
            if choice.is_none() {
                break;
            }
        }
        Ok(choices)
    }

    /// What the client accepts after `best`, for routing: any release is what a request
    /// naming none gets (this layer's default, if it has one).
    fn fallback(&self, choices: &Choices, best: FhirVersion) -> Fallback {
        let mut rest = Choices::default();
        for choice in choices.after_best() {
            let choice = match choice {
                None => self.default,
                release => *release,
            };
            if choice != Some(best) && !rest.contains(choice) {
                rest.push(choice);
            }
        }
        match rest.as_slice() {
            [] => Fallback::Nothing,
            [None] => Fallback::Any,
            _ => Fallback::Listed(rest),
        }
    }
}

/// The most choices `Accept` can make: each release, and any release.
const CHOICES: usize = FhirVersion::ALL.len() + 1;

/// What a client accepts, best first: releases, and `None` for any release (a range naming
/// none; nothing follows it). Fixed in size: reading `Accept` allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Choices {
    items: [Option<FhirVersion>; CHOICES],
    len: u8,
}

impl Choices {
    fn one(choice: Option<FhirVersion>) -> Self {
        let mut choices = Self::default();
        choices.push(choice);
        choices
    }

    fn push(&mut self, choice: Option<FhirVersion>) {
        if let Some(slot) = self.items.get_mut(usize::from(self.len)) {
            *slot = choice;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[Option<FhirVersion>] {
        &self.items[..usize::from(self.len)]
    }

    fn contains(&self, choice: Option<FhirVersion>) -> bool {
        self.as_slice().contains(&choice)
    }

    /// The release the client prefers; `None` when it prefers none, or names none.
    fn best(&self) -> Option<FhirVersion> {
        self.as_slice().first().copied().flatten()
    }

    /// The choices after the best.
    fn after_best(&self) -> &[Option<FhirVersion>] {
        self.as_slice().get(1..).unwrap_or_default()
    }

    /// Whether an answer in `release` is one the client takes: it names no release, or this
    /// one, or takes any.
    fn accepts(&self, release: FhirVersion) -> bool {
        self.len == 0 || self.contains(Some(release)) || self.contains(None)
    }
}

/// What a client accepts besides the release negotiated, should its tenant not serve that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// Nothing: the common case (one release, or none, named).
    Nothing,
    /// Any release, the tenant's default server (`Accept` names one release, then a range
    /// naming none).
    Any,
    /// These, in order (`None`: any release).
    Listed(Choices),
}

/// The releases a client accepts besides the negotiated [`FhirVersion`], best first (`None`:
/// any release, the tenant's default server), in the request extensions for routing. Only the
/// [`VersionNegotiationLayer`] puts it there (a client cannot), and only where there is more
/// than one thing to try: not where `Accept` names no release, or one alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AlsoAccepted(Choices);

/// [`AlsoAccepted`] holding any release alone: zero-sized, so that putting it in the
/// extensions (a boxed value each) allocates nothing where `Accept` names a single release.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AnyAlsoAccepted;

/// The releases the client accepts besides the negotiated one, best first, as the
/// [`VersionNegotiationLayer`] left them in `extensions` (`None`: any release). Read by
/// routing only where the tenant has no server for the negotiated release.
pub(crate) fn fallbacks(
    extensions: &http::Extensions,
) -> impl Iterator<Item = Option<FhirVersion>> + '_ {
    let listed = extensions
        .get::<AlsoAccepted>()
        .map_or(&[][..], |also| also.0.as_slice());
    let any = extensions.get::<AnyAlsoAccepted>().map(|_| None);
    listed.iter().copied().chain(any)
}

/// Whether `$versions` is answered as plain `application/json`: the client's first range asks
/// for it.
fn plain_json(accept: &[MediaRange]) -> bool {
    accept
        .first()
        .is_some_and(|r| r.essence == "application/json" || r.essence == "text/json")
}

/// `$versions`' answer: a `Parameters` resource with each `version` and the `default`, in
/// `form`, its FHIR media type that of release `shape`.
fn versions_answer(
    versions: &[FhirVersion],
    default: FhirVersion,
    shape: FhirVersion,
    form: VersionsForm,
) -> Response<Bytes> {
    let parameters = versions
        .iter()
        .map(|v| ("version", v.mime_code()))
        .chain(std::iter::once(("default", default.mime_code())));
    let (body, media_type) = if form == VersionsForm::Xml {
        // Names and codes are the crate's own: nothing to escape.
        let mut body = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Parameters xmlns=\"http://hl7.org/fhir\">",
        );
        for (name, code) in parameters {
            body.push_str(&format!(
                "<parameter><name value=\"{name}\"/><valueCode value=\"{code}\"/></parameter>"
            ));
        }
        body.push_str("</Parameters>");
        let media_type = format!(
            "{}; fhirVersion={}",
            shape.xml_media_type(),
            shape.mime_code()
        );
        (body, media_type)
    } else {
        let parameter: Vec<_> = parameters
            .map(|(name, code)| json!({"name": name, "valueCode": code}))
            .collect();
        let body = json!({"resourceType": "Parameters", "parameter": parameter}).to_string();
        let media_type = if form == VersionsForm::PlainJson {
            "application/json".to_owned()
        } else {
            format!(
                "{}; fhirVersion={}",
                shape.json_media_type(),
                shape.mime_code()
            )
        };
        (body, media_type)
    };
    let mut response = Response::new(Bytes::from(body));
    if let Ok(value) = HeaderValue::from_str(&media_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    // `Accept` chose its media type (and release); with a token, it is the tenant's answer
    // (where the routing layer answers it): a shared cache must not give it to another client.
    super::vary_on(response.headers_mut(), &["Accept", "Authorization"]);
    response
}

/// The answer to a `HEAD`: `response` without its body, its `Content-Length` the body's.
fn headless(response: Response<Bytes>) -> Response<Bytes> {
    crate::body::headless(response.map(http_body_util::Full::new)).map(|_| Bytes::new())
}

/// A `$versions` answer's parameters as `name=valueCode`, for tests.
#[cfg(test)]
pub(crate) fn parameters_of(body: &[u8]) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(json["resourceType"], "Parameters");
    json["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}={}",
                p["name"].as_str().unwrap(),
                p["valueCode"].as_str().unwrap()
            )
        })
        .collect()
}

/// Whether a request of `method` carries no body whose `Content-Type` could name a release:
/// `GET` and `HEAD`, which have none in FHIR (the proxy refuses one). Their `Content-Type`, if
/// sent, describes nothing, and is not read: an answer chosen by it (a DSTU2 statement to a
/// `GET metadata` sent with `Content-Type: ...; fhirVersion=1.0`) would vary on a header
/// that caches do not key it by. `DELETE` and `OPTIONS` may carry a body under HTTP, and a
/// client naming a release there names the server it means: their `Content-Type` is read as
/// a `POST`'s is.
fn carries_no_body(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

/// Whether the request's `Accept` and `Content-Type` (not read for a `GET` or `HEAD`:
/// [`carries_no_body`]) use DSTU2's media types (`json+fhir`, `xml+fhir`) and none of the
/// later ones (`fhir+json`, `fhir+xml`).
fn speaks_dstu2_only(method: &Method, headers: &http::HeaderMap) -> bool {
    let (mut old, mut new) = (false, false);
    let content_type = if carries_no_body(method) {
        None
    } else {
        Some(headers.get_all(header::CONTENT_TYPE))
    };
    for value in headers
        .get_all(header::ACCEPT)
        .iter()
        .chain(content_type.into_iter().flatten())
    {
        let bytes = value.as_bytes();
        // Only a `+` can make a FHIR media type: look around each one.
        for plus in memchr::memchr_iter(b'+', bytes) {
            let (before, after) = (&bytes[..plus], &bytes[plus + 1..]);
            let ends = |suffix: &[u8]| {
                before.len() >= suffix.len()
                    && before[before.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            };
            let starts = |prefix: &[u8]| {
                after.len() >= prefix.len() && after[..prefix.len()].eq_ignore_ascii_case(prefix)
            };
            old |= (ends(b"json") || ends(b"xml")) && starts(b"fhir");
            new |= ends(b"fhir") && (starts(b"json") || starts(b"xml"));
        }
    }
    old && !new
}

/// The release named by an `Accept` made of one value in the common exact form
/// ([`exact_named_json`]), which needs no parsing.
fn single_exact_named(accept: &GetAll<'_, HeaderValue>) -> Option<FhirVersion> {
    let mut values = accept.iter();
    match (values.next(), values.next()) {
        (Some(only), None) => exact_named_json(only.as_bytes()),
        _ => None,
    }
}

/// What a `Content-Type` says about the release: `None` when it names none or is no media type.
fn named_content(value: &HeaderValue) -> Option<Named> {
    if let Some(version) = exact_named_json(value.as_bytes()) {
        return Some(Named::Version(version));
    }
    if !mentions_version(value.as_bytes()) {
        return None;
    }
    parse_parts(value.to_str().ok()?).map(|(_, named, _)| named)
}

/// Whether a request asks for XML rather than JSON: its `_format` names XML (`xml`,
/// `application/fhir+xml`, `application/xml+fhir`, `application/xml`, `text/xml`), or, without
/// a `_format`, its `Accept` takes an XML type at a higher q-value than any JSON one (or
/// `*/*`). Equal preferences (HAPI's clients send both at `q=1.0`), no `Accept`, or one
/// naming neither: JSON. Only the ranges that allow the `negotiated` release count (a range
/// naming another `fhirVersion` was not the one chosen), so the answer is a format and
/// release the client takes together.
pub(crate) fn prefers_xml(
    query: Option<&str>,
    headers: &HeaderMap,
    negotiated: Option<FhirVersion>,
) -> bool {
    let is_xml = is_xml_type;
    if let Ok(Some(format)) = format_parameter(query.unwrap_or("")) {
        return is_xml(&format.essence);
    }
    let mut best_xml = 0.0_f32;
    let mut best_json = 0.0_f32;
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for range in parse_accept(value) {
            let allows = match (range.named, negotiated) {
                (Named::Nothing, _) | (_, None) => true,
                (Named::Version(named), Some(negotiated)) => named == negotiated,
                (Named::Unknown, Some(_)) => false,
            };
            if !allows {
                continue;
            }
            if is_xml(&range.essence) {
                best_xml = best_xml.max(range.q);
            } else if matches!(
                range.essence.as_str(),
                "application/fhir+json"
                    | "application/json+fhir"
                    | "application/json"
                    | "application/*"
                    | "*/*"
            ) {
                best_json = best_json.max(range.q);
            }
        }
    }
    best_xml > best_json
}

/// The `_format` query parameter (its name percent-decoded as servers decode it), its value
/// percent-decoded with a `+` sent unencoded inside the media type read as the `+` it is
/// (`application/fhir+json`, which form decoding would make `application/fhir json`, as no
/// server means). `Err` when the parameter is there more than once.
fn format_parameter(query: &str) -> Result<Option<MediaRange>, ()> {
    let is_format = |name: &str| {
        name == "_format"
            || (name.contains('%')
                && percent_encoding::percent_decode_str(name).eq(b"_format".iter().copied()))
    };
    let mut found = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if is_format(name) {
            if found.is_some() {
                return Err(());
            }
            found = Some(value);
        }
    }
    let Some(value) = found else {
        return Ok(None);
    };
    let value = value.replace('+', " ");
    let Ok(decoded) = percent_encoding::percent_decode_str(&value).decode_utf8() else {
        return Ok(None);
    };
    // A media type holds no space: one between its type's characters was a `+`.
    let decoded = decoded.trim();
    let (essence, parameters) = decoded.split_at(decoded.find(';').unwrap_or(decoded.len()));
    let essence = essence.trim_end().replace(' ', "+");
    Ok(parse_format(&format!("{essence}{parameters}")))
}

fn error(status: StatusCode, code: IssueType, diagnostics: &str) -> Response<Bytes> {
    OperationOutcome::error(code, diagnostics).to_response(status)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for VersionNegotiation<S>
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
        // A `.well-known` document (RFC 8615: the SMART configuration) is no FHIR: its
        // clients' `Accept` or `_format` is not the gateway's to refuse. (Read only: anything
        // sent there is checked as any request.)
        if matches!(*request.method(), Method::GET | Method::HEAD)
            && request.uri().path().starts_with("/.well-known/")
        {
            return ResponseFuture::inner(self.inner.call(request), None, false);
        }
        let mut may_ask_for_xml = false;
        let decision = self.config.decide(
            request.method(),
            request.uri().path(),
            request.uri().query(),
            request.headers(),
            &mut may_ask_for_xml,
        );
        // The gateway's own OperationOutcomes (the layers' refusals, the proxy's 502s) go in
        // XML to a client that prefers XML; what an upstream answered is never rewritten.
        let outcomes_in_xml = |request: &Request<ReqBody>, version| {
            may_ask_for_xml && prefers_xml(request.uri().query(), request.headers(), version)
        };
        let version = match decision {
            Decision::Answer(mut response) => {
                if outcomes_in_xml(&request, None) {
                    if let Some(xml) = outcome_in_xml(&mut response, None) {
                        *response.body_mut() = xml;
                    }
                }
                return ResponseFuture::answered(response);
            }
            Decision::Proceed(version, fallback) => {
                match fallback {
                    Fallback::Nothing => {}
                    Fallback::Any => {
                        request.extensions_mut().insert(AnyAlsoAccepted);
                    }
                    Fallback::Listed(choices) => {
                        request.extensions_mut().insert(AlsoAccepted(choices));
                    }
                }
                version
            }
            Decision::TenantVersions(version, query) => {
                request.extensions_mut().insert(query);
                version
            }
        };
        match version {
            Some(version) => {
                request.extensions_mut().insert(version);
            }
            None if speaks_dstu2_only(request.method(), request.headers()) => {
                request
                    .extensions_mut()
                    .insert(super::VersionHint(FhirVersion::Dstu2));
            }
            None => {}
        }
        let xml = outcomes_in_xml(&request, version);
        ResponseFuture::inner(self.inner.call(request), version, xml)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn well_known_documents_are_not_negotiated() {
        for (uri, accept) in [
            (
                "/.well-known/smart-configuration",
                "application/fhir+json; fhirVersion=9.9",
            ),
            (
                "/.well-known/smart-configuration?_format=a&_format=b",
                "*/*",
            ),
        ] {
            let (status, _, body) = run(layer(), get(uri, &[("accept", accept)])).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(body, "none", "{uri}");
        }
        // Nor is a write there: checked as any request.
        let mut post = post("application/fhir+json; fhirVersion=9.9", None);
        *post.uri_mut() = "/.well-known/x".parse().unwrap();
        assert_eq!(
            run(layer(), post).await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        // FHIR's own paths still are.
        let (status, ..) = run(
            layer(),
            get(
                "/Patient",
                &[("accept", "application/fhir+json; fhirVersion=9.9")],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
    }

    #[test]
    fn versions_is_read_as_the_proxy_forwards_it() {
        for path in ["/$versions", "//$versions", "/$versions/", "///$versions//"] {
            assert!(is_versions_path(path), "{path}");
        }
        for path in ["/$versions/x", "/x/$versions", "/%24versions", "/$VERSIONS"] {
            assert!(!is_versions_path(path), "{path}");
        }
    }
    use crate::version::media::parse_media;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn layer() -> VersionNegotiationLayer {
        VersionNegotiationLayer::builder()
            .supported([FhirVersion::Dstu2, FhirVersion::Stu3, FhirVersion::R4])
            .build()
            .unwrap()
    }

    /// What `service` answers `request`: its status, headers and body as text.
    async fn answer_of<S, B>(
        service: S,
        request: Request<Full<Bytes>>,
    ) -> (StatusCode, HeaderMap, String)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let response = service.oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    async fn run(
        layer: VersionNegotiationLayer,
        request: Request<Full<Bytes>>,
    ) -> (StatusCode, HeaderMap, String) {
        let service = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
            let version = req
                .extensions()
                .get::<FhirVersion>()
                .map(|v| v.mime_code())
                .unwrap_or("none");
            let response = Response::builder()
                .header("content-type", "application/fhir+json")
                .body(Full::<Bytes>::from(version))
                .unwrap();
            Ok::<_, Infallible>(response)
        }));
        answer_of(service, request).await
    }

    fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut request = Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Full::default()).unwrap()
    }

    fn post(content_type: &str, accept: Option<&str>) -> Request<Full<Bytes>> {
        let mut request = Request::post("/Patient").header("content-type", content_type);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.body(Full::from("{}")).unwrap()
    }

    #[tokio::test]
    async fn the_named_version_reaches_the_inner_service_and_labels_the_response() {
        let (status, headers, body) = run(
            layer(),
            get(
                "/Patient/1",
                &[("accept", "application/fhir+json; fhirVersion=3.0")],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "3.0");
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; fhirVersion=3.0"
        );
    }

    /// The layer over a service answering every request with a 404 `OperationOutcome` made
    /// by `to_response` (as the gateway's layers and proxy make theirs), or, for a path under
    /// `/upstream`, with one written as an upstream writes it.
    async fn refused(request: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
        let service = layer().layer(service_fn(|request: Request<Full<Bytes>>| async move {
            let response = if request.uri().path().starts_with("/upstream") {
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("content-type", "application/fhir+json")
                    .body(Full::from(r#"{"resourceType":"OperationOutcome"}"#))
                    .unwrap()
            } else {
                OperationOutcome::error(IssueType::NotFound, "No <Patient/1> here")
                    .to_response(StatusCode::NOT_FOUND)
                    .map(Full::new)
            };
            Ok::<_, Infallible>(response)
        }));
        answer_of(service, request).await
    }

    #[tokio::test]
    async fn the_gateways_own_outcomes_go_in_xml_to_a_client_that_prefers_xml() {
        let xml = r#"<OperationOutcome xmlns="http://hl7.org/fhir"><issue><severity value="error"/><code value="not-found"/><diagnostics value="No &lt;Patient/1&gt; here"/></issue></OperationOutcome>"#;
        for (uri, accept, media_type) in [
            // No release named, none by default: none labelled.
            ("/Patient/1", "application/fhir+xml", "application/fhir+xml"),
            (
                "/Patient/1?_format=xml",
                "application/fhir+json",
                "application/fhir+xml",
            ),
            (
                "/Patient/1",
                "application/fhir+xml; fhirVersion=3.0",
                "application/fhir+xml; fhirVersion=3.0",
            ),
            (
                "/Patient/1",
                "application/xml+fhir; fhirVersion=1.0",
                "application/xml+fhir; fhirVersion=1.0",
            ),
        ] {
            let (status, headers, body) = refused(get(uri, &[("accept", accept)])).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri} {accept}");
            assert_eq!(headers["content-type"], media_type, "{uri} {accept}");
            assert_eq!(body, xml, "{uri} {accept}");
            assert_eq!(headers["vary"], "Accept", "{uri} {accept}");
            assert_eq!(headers["cache-control"], "no-store");
        }
        // JSON where JSON is preferred, or as much as XML (HAPI's clients), or nothing is said.
        let hapi = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0";
        for accept in ["application/fhir+json", hapi, "*/*", ""] {
            let (_, headers, body) = refused(get("/Patient/1", &[("accept", accept)])).await;
            assert!(
                headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("application/fhir+json"),
                "{accept}"
            );
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["issue"][0]["code"], "not-found");
        }
        // An upstream's answer passes as it was written, whatever the client prefers.
        let (_, headers, body) = refused(get(
            "/upstream/Patient/1",
            &[("accept", "application/fhir+xml")],
        ))
        .await;
        assert_eq!(headers["content-type"], "application/fhir+json");
        assert_eq!(body, r#"{"resourceType":"OperationOutcome"}"#);
        // The layer's own refusals too.
        let mut request = post(
            "application/fhir+xml; fhirVersion=5.0",
            Some("application/fhir+xml"),
        );
        *request.uri_mut() = "/Patient".parse().unwrap();
        let (status, headers, body) = refused(request).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(headers["content-type"], "application/fhir+xml");
        assert!(body.starts_with("<OperationOutcome"), "{body}");
    }

    #[test]
    fn xml_is_chosen_only_when_asked_for_more_than_json() {
        let prefers = |query: Option<&str>, accept: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in accept {
                headers.append(header::ACCEPT, HeaderValue::from_str(value).unwrap());
            }
            prefers_xml(query, &headers, None)
        };
        for query in [
            "_format=xml",
            "_format=application/fhir%2Bxml",
            "_format=application/fhir+xml",
            "_format=application/xml+fhir;fhirVersion=1.0",
            "_format=text/xml",
            "x=1&%5Fformat=application/xml",
        ] {
            assert!(prefers(Some(query), &[]), "{query}");
            // `_format` wins over `Accept`.
            assert!(prefers(Some(query), &["application/fhir+json"]), "{query}");
        }
        for query in [
            "_format=json",
            "_format=application/fhir+json",
            "_format=html",
        ] {
            assert!(!prefers(Some(query), &["application/fhir+xml"]), "{query}");
        }
        assert!(prefers(None, &["application/fhir+xml"]));
        assert!(prefers(None, &["application/xml+fhir"]));
        assert!(prefers(
            None,
            &["application/fhir+xml;q=1.0, application/fhir+json;q=0.5"]
        ));
        assert!(prefers(None, &["text/html", "application/fhir+xml"]));
        // Equal preference (HAPI's clients), JSON first, wildcards, nothing: JSON.
        let hapi = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0, application/xml+fhir;q=0.9, application/json+fhir;q=0.9";
        assert!(!prefers(None, &[hapi]));
        assert!(!prefers(
            None,
            &["application/fhir+json, application/fhir+xml;q=0.9"]
        ));
        assert!(!prefers(None, &["application/fhir+xml;q=0.5, */*"]));
        assert!(!prefers(None, &["application/fhir+xml;q=0"]));
        assert!(!prefers(None, &[]));
        assert!(!prefers(Some("_format=xml&_format=json"), &[]));

        // A range naming another release than the one negotiated does not count.
        let accept = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
            headers
        };
        let r4 = Some(FhirVersion::R4);
        let xml_r5 =
            "application/fhir+xml; fhirVersion=5.0, application/fhir+json; fhirVersion=4.0; q=0.5";
        assert!(!prefers_xml(None, &accept(xml_r5), r4));
        assert!(prefers_xml(None, &accept(xml_r5), None));
        let json_r5 =
            "application/fhir+json; fhirVersion=5.0, application/fhir+xml; fhirVersion=4.0; q=0.5";
        assert!(prefers_xml(None, &accept(json_r5), r4));
        let unknown = "application/fhir+xml; fhirVersion=9.9, application/fhir+json; q=0.5";
        assert!(!prefers_xml(None, &accept(unknown), r4));
    }

    #[tokio::test]
    async fn best_acceptable_range_wins() {
        let accept = "application/fhir+json; fhirVersion=5.0; q=1, application/fhir+json; fhirVersion=1.0; q=0.8";
        assert_eq!(
            run(layer(), get("/Patient", &[("accept", accept)])).await.2,
            "1.0"
        );
        // A range without a version accepts any: the default applies.
        let accept = "application/fhir+json; fhirVersion=5.0, */*; q=0.1";
        assert_eq!(
            run(layer(), get("/Patient", &[("accept", accept)])).await.2,
            "none"
        );
        // HAPI's STU3 client names no version at all.
        let hapi = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0, application/xml+fhir;q=0.9, application/json+fhir;q=0.9";
        assert_eq!(
            run(layer(), get("/Patient", &[("accept", hapi)])).await.2,
            "none"
        );
    }

    #[tokio::test]
    async fn unsupported_versions_are_406_and_415() {
        let (status, headers, body) = run(
            layer(),
            get(
                "/Patient",
                &[("accept", "application/fhir+json; fhirVersion=5.0")],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(headers["content-type"], "application/fhir+json");
        assert!(body.contains("OperationOutcome"));
        let (status, ..) = run(
            layer(),
            get(
                "/Patient",
                &[("accept", "application/fhir+json; fhirVersion=7.7")],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        // A release refused at `q=0`, and nothing else accepted: not what a request naming
        // nothing gets (the default, here that very release), but 406.
        for accept in [
            "application/fhir+json; fhirVersion=4.0; q=0",
            "application/fhir+json; fhirVersion=3.0; q=0, application/fhir+xml; q=0",
        ] {
            let (status, ..) = run(layer(), get("/Patient", &[("accept", accept)])).await;
            assert_eq!(status, StatusCode::NOT_ACCEPTABLE, "{accept}");
        }
        let (status, ..) = run(
            layer(),
            post("application/fhir+json; fhirVersion=5.0", None),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn accept_and_content_type_must_agree() {
        let (status, ..) = run(
            layer(),
            post(
                "application/fhir+json; fhirVersion=3.0",
                Some("application/fhir+json; fhirVersion=4.0"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, body) = run(
            layer(),
            post("application/fhir+json; fhirVersion=3.0", Some("*/*")),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "3.0"));
    }

    #[tokio::test]
    async fn format_overrides_accept_but_not_the_body() {
        let uri = "/Patient?_format=application/fhir%2Bjson%3B%20fhirVersion%3D4.0";
        let accept = [("accept", "application/fhir+json; fhirVersion=1.0")];
        assert_eq!(run(layer(), get(uri, &accept)).await.2, "4.0");
        // Naming none, it leaves the release to `Accept`.
        assert_eq!(
            run(layer(), get("/Patient?_format=json", &accept)).await.2,
            "1.0"
        );
        let mut request = post("application/fhir+json; fhirVersion=3.0", None);
        *request.uri_mut() = "/Patient?_format=application/fhir%2Bjson;fhirVersion=4.0"
            .parse()
            .unwrap();
        assert_eq!(run(layer(), request).await.0, StatusCode::BAD_REQUEST);
    }

    /// HAPI's generic client adds `_format=json` to every request: the format is `_format`'s,
    /// the release still `Accept`'s where `_format` names none.
    #[tokio::test]
    async fn a_format_naming_no_release_leaves_the_release_to_accept() {
        let stu3 = [("accept", "application/fhir+json; fhirVersion=3.0")];
        for uri in [
            "/Patient/1?_format=json",
            "/Patient/1?_format=xml",
            "/Patient/1?_format=application/fhir%2Bjson",
            "/Patient/1?_format=application/fhir+xml;charset=utf-8",
        ] {
            assert_eq!(run(layer(), get(uri, &stu3)).await.2, "3.0", "{uri}");
        }
        // Every Accept value is read, as without `_format`.
        let ranges = [
            ("accept", "application/fhir+json; fhirVersion=5.0"),
            ("accept", "application/fhir+json; fhirVersion=1.0; q=0.5"),
        ];
        assert_eq!(
            run(layer(), get("/Patient?_format=json", &ranges)).await.2,
            "1.0"
        );
        // A release Accept names that is not served is refused, `_format` or not.
        let r5 = [("accept", "application/fhir+json; fhirVersion=5.0")];
        let (status, _, body) = run(layer(), get("/Patient?_format=json", &r5)).await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        assert!(body.contains("OperationOutcome"));
        // `_format` naming a release wins over Accept (FHIR: `_format` overrides `Accept`).
        let uri = "/Patient?_format=application/fhir%2Bjson;fhirVersion=4.0";
        assert_eq!(run(layer(), get(uri, &r5)).await.2, "4.0");
        // `$versions`: shaped by Accept's release, typed by `_format`.
        let (status, headers, _) = run(layer(), get("/$versions?_format=json", &stu3)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; fhirVersion=3.0"
        );
        let plain = [("accept", "application/json")];
        let (_, headers, _) = run(layer(), get("/$versions?_format=json", &plain)).await;
        assert_eq!(
            headers["content-type"], "application/fhir+json; fhirVersion=4.0",
            "`_format=json` is FHIR's JSON"
        );
    }

    /// What the client accepts besides the release negotiated, best first, as routing reads it.
    async fn also_accepted(
        layer: VersionNegotiationLayer,
        request: Request<Full<Bytes>>,
    ) -> (StatusCode, String) {
        let service = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
            let version = req.extensions().get::<FhirVersion>().copied();
            let mut seen = version.map_or("none".to_owned(), |v| v.mime_code().to_owned());
            let fallbacks = crate::version::fallbacks(req.extensions());
            for fallback in fallbacks {
                seen.push(' ');
                seen.push_str(fallback.map_or("any", FhirVersion::mime_code));
            }
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(seen)))
        }));
        let response = service.oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn every_accepted_release_is_carried_best_first() {
        let accept = |value: &'static str| get("/Patient", &[("accept", value)]);
        let json = "application/fhir+json";
        for (value, seen) in [
            // One release, or none: nothing else.
            ("application/fhir+json; fhirVersion=3.0", "3.0"),
            ("application/fhir+json; fhirVersion=3.0; q=0.5", "3.0"),
            (json, "none"),
            ("*/*, application/fhir+json; fhirVersion=3.0; q=0.5", "none"),
            // Several: best first, the first among equals, each once at its best q.
            (
                "application/fhir+json; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0; q=0.5",
                "4.0 3.0",
            ),
            (
                "application/fhir+json; fhirVersion=1.0; q=0.2, application/fhir+xml; fhirVersion=3.0; q=0.9, application/fhir+json; fhirVersion=4.0; q=0.9, application/fhir+xml; fhirVersion=1.0",
                "1.0 3.0 4.0",
            ),
            // Releases not served, unknown ones and `q=0` are no choice.
            (
                "application/fhir+json; fhirVersion=5.0, application/fhir+json; fhirVersion=9.9, application/fhir+json; fhirVersion=4.0; q=0, application/fhir+json; fhirVersion=3.0; q=0.1",
                "3.0",
            ),
            // A range naming none, after: any release; nothing after it counts.
            (
                "application/fhir+json; fhirVersion=4.0, */*; q=0.1, application/fhir+json; fhirVersion=3.0; q=0.05",
                "4.0 any",
            ),
            (
                "application/fhir+json; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0; q=0.8, application/fhir+json; q=0.5",
                "4.0 3.0 any",
            ),
        ] {
            assert_eq!(
                also_accepted(layer(), accept(value)).await,
                (StatusCode::OK, seen.to_owned()),
                "{value}"
            );
        }
        // Across Accept values, as within one.
        let request = get(
            "/Patient",
            &[
                ("accept", "application/fhir+json; fhirVersion=3.0; q=0.5"),
                ("accept", "application/fhir+json; fhirVersion=1.0"),
            ],
        );
        assert_eq!(also_accepted(layer(), request).await.1, "1.0 3.0");
        // With a default, any release is the default: what a request naming none gets.
        let with_default = VersionNegotiationLayer::builder()
            .supported([FhirVersion::Dstu2, FhirVersion::Stu3, FhirVersion::R4])
            .default_version(FhirVersion::Stu3)
            .build()
            .unwrap();
        for (value, seen) in [
            ("application/fhir+json; fhirVersion=4.0, */*; q=0.1", "4.0 3.0"),
            (
                "application/fhir+json; fhirVersion=3.0, application/fhir+json; fhirVersion=4.0; q=0.5, */*; q=0.1",
                "3.0 4.0",
            ),
        ] {
            let seen_now = also_accepted(with_default.clone(), accept(value)).await;
            assert_eq!(seen_now.1, seen, "{value}");
        }
        // A body names its release: the one served, if the client accepts it at all.
        let mut request = post(
            "application/fhir+json; fhirVersion=3.0",
            Some("application/fhir+json; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0; q=0.5"),
        );
        assert_eq!(
            also_accepted(layer(), request).await,
            (StatusCode::OK, "3.0".to_owned())
        );
        request = post(
            "application/fhir+json; fhirVersion=1.0",
            Some("application/fhir+json; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0; q=0.5"),
        );
        assert_eq!(
            also_accepted(layer(), request).await.0,
            StatusCode::BAD_REQUEST
        );
        request = post(
            "application/fhir+json; fhirVersion=1.0",
            Some("application/fhir+json; fhirVersion=4.0, */*; q=0.5"),
        );
        assert_eq!(also_accepted(layer(), request).await.1, "1.0");
    }

    #[tokio::test]
    async fn format_is_read_as_servers_read_it() {
        let version = |uri: &'static str| async move {
            let accept = [("accept", "application/fhir+json; fhirVersion=1.0")];
            run(layer(), get(uri, &accept)).await
        };
        // A `+` sent unencoded (form decoding makes it a space), an encoded name.
        for uri in [
            "/Patient?_format=application/fhir+json;fhirVersion=3.0",
            "/Patient?_format=application/fhir+json;+fhirVersion=3.0",
            "/Patient?_format=+application/fhir+json+;fhirVersion%3D3.0",
            "/Patient?%5Fformat=application/fhir%2Bjson;fhirVersion=3.0",
            "/Patient?name=a%20b&%5fformat=application/fhir+json;fhirVersion=3.0",
        ] {
            assert_eq!(version(uri).await.2, "3.0", "{uri}");
        }
        // Twice: which one a server reads is anyone's guess.
        for uri in [
            "/Patient?_format=json&_format=application/fhir+json;fhirVersion=3.0",
            "/Patient?_format=xml&%5Fformat=json",
        ] {
            assert_eq!(version(uri).await.0, StatusCode::BAD_REQUEST, "{uri}");
        }
        // Names that are not it.
        assert_eq!(version("/Patient?x_format=json").await.2, "1.0");
        assert_eq!(version("/Patient?name=%5Fformat").await.2, "1.0");
    }

    #[tokio::test]
    async fn dstu2_only_media_types_hint_at_dstu2() {
        async fn hint(layer: VersionNegotiationLayer, accept: &str) -> Option<FhirVersion> {
            let service = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
                let hint = req.extensions().get::<crate::version::VersionHint>();
                let mut response = Response::new(Full::<Bytes>::default());
                if let Some(hint) = hint {
                    response.extensions_mut().insert(hint.0);
                }
                Ok::<_, Infallible>(response)
            }));
            let response = service
                .oneshot(get("/Patient", &[("accept", accept)]))
                .await
                .unwrap();
            response.extensions().get::<FhirVersion>().copied()
        }
        let dstu2 = Some(FhirVersion::Dstu2);
        assert_eq!(hint(layer(), "application/json+fhir").await, dstu2);
        assert_eq!(
            hint(layer(), "application/XML+FHIR;q=0.9, */*;q=0.1").await,
            dstu2
        );
        // HAPI's STU3 client lists both generations: no hint.
        let hapi = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0, application/xml+fhir;q=0.9, application/json+fhir;q=0.9";
        assert_eq!(hint(layer(), hapi).await, None);
        assert_eq!(hint(layer(), "application/fhir+json").await, None);
        assert_eq!(hint(layer(), "*/*").await, None);
        // A named release is negotiated, not hinted.
        assert_eq!(
            hint(layer(), "application/json+fhir; fhirVersion=3.0").await,
            None
        );
        let with_default = VersionNegotiationLayer::builder()
            .default_version(FhirVersion::Stu3)
            .build()
            .unwrap();
        assert_eq!(hint(with_default, "application/json+fhir").await, None);
    }

    #[tokio::test]
    async fn a_request_without_a_body_is_not_negotiated_by_its_content_type() {
        let request = |method: Method, uri: &str, headers: &[(&str, &str)]| {
            let mut request = Request::builder().method(method).uri(uri);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.body(Full::default()).unwrap()
        };
        let dstu2 = [("content-type", "application/fhir+json; fhirVersion=1.0")];
        for method in [Method::GET, Method::HEAD] {
            // Names nothing: no release, whatever it says.
            let (status, _, body) =
                run(layer(), request(method.clone(), "/metadata", &dstu2)).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "none"),
                "{method}"
            );
            let r5 = [("content-type", "application/fhir+json; fhirVersion=5.0")];
            let (status, _, _) = run(layer(), request(method.clone(), "/metadata", &r5)).await;
            assert_eq!(status, StatusCode::OK, "{method}: not a 415");
            let both = [
                ("accept", "application/fhir+json; fhirVersion=3.0"),
                dstu2[0],
            ];
            let (status, _, body) =
                run(layer(), request(method.clone(), "/Patient/1", &both)).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "3.0"),
                "{method}: not a 400"
            );
        }
        // A method that may carry a body: read as before.
        for method in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            let (_, _, body) = run(layer(), request(method.clone(), "/Patient/1", &dstu2)).await;
            assert_eq!(body, "1.0", "{method}");
        }
        // Nor does a GET's Content-Type hint at DSTU2.
        let old = [("content-type", "application/json+fhir")];
        let hinted = |request: Request<Full<Bytes>>| async move {
            let service = layer().layer(service_fn(|req: Request<Full<Bytes>>| async move {
                let hint = req
                    .extensions()
                    .get::<crate::version::VersionHint>()
                    .is_some();
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(hint.to_string())))
            }));
            let response = service.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        };
        assert_eq!(
            hinted(request(Method::GET, "/metadata", &old)).await,
            "false"
        );
        assert_eq!(
            hinted(request(Method::POST, "/Patient", &old)).await,
            "true"
        );
    }

    #[tokio::test]
    async fn the_default_applies_when_nothing_is_named() {
        let layer = VersionNegotiationLayer::builder()
            .default_version(FhirVersion::Stu3)
            .build()
            .unwrap();
        assert_eq!(run(layer, get("/Patient", &[])).await.2, "3.0");
    }

    #[tokio::test]
    async fn versions_operation_lists_the_supported_releases() {
        let (status, headers, body) = run(layer(), get("/$versions", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; fhirVersion=4.0"
        );
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["resourceType"], "Parameters");
        let codes: Vec<_> = json["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap(),
                    p["valueCode"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            codes,
            [
                ("version", "1.0"),
                ("version", "3.0"),
                ("version", "4.0"),
                ("default", "4.0")
            ]
        );
        // Chosen by `Accept`, and (with tenant versions) by the token: a shared cache must not
        // give it to another client.
        assert_eq!(headers["vary"], "Accept, Authorization");
        let (_, headers, _) = run(
            layer(),
            get("/$versions", &[("accept", "application/json")]),
        )
        .await;
        assert_eq!(headers["content-type"], "application/json");
        let (_, headers, _) = run(
            layer(),
            get(
                "/$versions",
                &[("accept", "application/json+fhir; fhirVersion=1.0")],
            ),
        )
        .await;
        assert_eq!(
            headers["content-type"],
            "application/json+fhir; fhirVersion=1.0"
        );
        // A HEAD: the same headers, its length the GET's, no body.
        let (_, get_headers, get_body) = run(layer(), get("/$versions", &[])).await;
        let mut head = get("/$versions", &[]);
        *head.method_mut() = Method::HEAD;
        let (status, headers, body) = run(layer(), head).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "");
        assert_eq!(headers["content-type"], get_headers["content-type"]);
        assert_eq!(
            headers["content-length"],
            get_body.len().to_string().as_str()
        );
        // In XML when asked for it, by `Accept` or `_format`.
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Parameters xmlns=\"http://hl7.org/fhir\">\
            <parameter><name value=\"version\"/><valueCode value=\"1.0\"/></parameter>\
            <parameter><name value=\"version\"/><valueCode value=\"3.0\"/></parameter>\
            <parameter><name value=\"version\"/><valueCode value=\"4.0\"/></parameter>\
            <parameter><name value=\"default\"/><valueCode value=\"4.0\"/></parameter></Parameters>";
        for request in [
            get("/$versions", &[("accept", "application/fhir+xml")]),
            get(
                "/$versions?_format=xml",
                &[("accept", "application/fhir+json")],
            ),
            get(
                "/$versions",
                &[(
                    "accept",
                    "application/fhir+json;q=0.5, application/fhir+xml",
                )],
            ),
        ] {
            let (status, headers, body) = run(layer(), request).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                headers["content-type"],
                "application/fhir+xml; fhirVersion=4.0"
            );
            assert_eq!(body, xml);
        }
        let (_, headers, _) = run(
            layer(),
            get(
                "/$versions",
                &[("accept", "application/xml+fhir; fhirVersion=1.0")],
            ),
        )
        .await;
        assert_eq!(
            headers["content-type"],
            "application/xml+fhir; fhirVersion=1.0"
        );
    }

    #[tokio::test]
    async fn versions_reports_the_default_it_is_given_where_none_is_set() {
        let layer = VersionNegotiationLayer::builder()
            .supported([FhirVersion::Stu3, FhirVersion::R4])
            .reported_default(FhirVersion::Stu3)
            .build()
            .unwrap();
        let (status, headers, body) = run(layer.clone(), get("/$versions", &[])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; fhirVersion=3.0"
        );
        assert_eq!(
            parameters_of(body.as_bytes()),
            ["version=3.0", "version=4.0", "default=3.0"]
        );
        // A request naming none gets no release from the layer: its tenant's decides.
        let (_, _, body) = run(layer, get("/Patient/1", &[])).await;
        assert_eq!(body, "none");
        // A default that is set is what a request naming none gets, and is reported.
        let with_default = VersionNegotiationLayer::builder()
            .supported([FhirVersion::Stu3, FhirVersion::R4])
            .default_version(FhirVersion::R4)
            .reported_default(FhirVersion::Stu3)
            .build()
            .unwrap();
        let (_, _, body) = run(with_default, get("/$versions", &[])).await;
        assert_eq!(
            parameters_of(body.as_bytes()).last().unwrap(),
            &"default=4.0"
        );
        // A release the layer does not negotiate may be what a request naming none gets (an
        // anonymous `metadata` in STU3 where only R4 is supported): reported as it is.
        let r4_only = VersionNegotiationLayer::builder()
            .supported([FhirVersion::R4])
            .reported_default(FhirVersion::Stu3)
            .build()
            .unwrap();
        let (_, _, body) = run(r4_only, get("/$versions", &[])).await;
        assert_eq!(
            parameters_of(body.as_bytes()),
            ["version=4.0", "default=3.0"]
        );
        // Set by the gateway only where the user set none.
        let builder = VersionNegotiationLayer::builder().supported([FhirVersion::R4]);
        let set = builder.reported_default_unless_set(FhirVersion::Stu3);
        assert_eq!(set.reported_default, Some(FhirVersion::Stu3));
        let kept = VersionNegotiationLayer::builder()
            .reported_default(FhirVersion::R4)
            .reported_default_unless_set(FhirVersion::Stu3)
            .tenant_versions(false)
            .tenant_versions_unless_set(true);
        assert_eq!(kept.reported_default, Some(FhirVersion::R4));
        assert_eq!(kept.tenant_versions, Some(false));
        let set = VersionNegotiationLayer::builder().tenant_versions_unless_set(true);
        assert_eq!(set.tenant_versions, Some(true));
    }

    #[tokio::test]
    async fn tenant_versions_leaves_versions_with_credentials_to_the_routing_layer() {
        let tenant_layer = VersionNegotiationLayer::builder()
            .supported([FhirVersion::Stu3, FhirVersion::R4])
            .tenant_versions(true)
            .build()
            .unwrap();
        // What the inner service is given: the query and the release named.
        let seen = |req: Request<Full<Bytes>>| async move {
            let query = req.extensions().get::<VersionsQuery>().cloned();
            let body = match query {
                Some(query) => {
                    let answer = query.answer(
                        [FhirVersion::Dstu2, FhirVersion::R4],
                        FhirVersion::R4,
                        req.extensions().get::<FhirVersion>().copied(),
                    );
                    let content_type = answer.headers()["content-type"].clone();
                    let body = answer.into_body();
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", content_type)
                            .body(Full::new(body))
                            .unwrap(),
                    );
                }
                None => Bytes::from_static(b"no query"),
            };
            Ok(Response::new(Full::new(body)))
        };
        let call = |request| {
            let service = tenant_layer.clone().layer(service_fn(seen));
            answer_of(service, request)
        };
        // With credentials: passed inward, answered for the tenant (DSTU2 is not supported
        // here, so not listed).
        let (status, headers, body) =
            call(get("/$versions", &[("authorization", "Bearer x")])).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; fhirVersion=4.0"
        );
        assert_eq!(
            parameters_of(body.as_bytes()),
            ["version=4.0", "default=4.0"]
        );
        // The release the client named shapes the answer; plain JSON stays plain.
        let (_, headers, _) = call(get(
            "/$versions",
            &[
                ("authorization", "Bearer x"),
                ("accept", "application/fhir+json; fhirVersion=3.0"),
            ],
        ))
        .await;
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; fhirVersion=3.0"
        );
        let (_, headers, _) = call(get(
            "/$versions",
            &[
                ("authorization", "Bearer x"),
                ("accept", "application/json"),
            ],
        ))
        .await;
        assert_eq!(headers["content-type"], "application/json");
        // Without: the layer's own answer, every release it supports.
        let (_, _, body) = call(get("/$versions", &[])).await;
        assert_eq!(
            parameters_of(body.as_bytes()),
            ["version=3.0", "version=4.0", "default=4.0"]
        );
        // A release the layer does not serve is still refused by the layer.
        let (status, _, _) = call(get(
            "/$versions",
            &[
                ("authorization", "Bearer x"),
                ("accept", "application/fhir+json; fhirVersion=1.0"),
            ],
        ))
        .await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        // Off (the default): answered by the layer, credentials or not.
        let (_, _, body) = run(layer(), get("/$versions", &[("authorization", "Bearer x")])).await;
        assert_eq!(parameters_of(body.as_bytes()).len(), 4);
        // A tenant whose first server speaks a release the layer does not support: a request
        // naming none goes there, so it is the default, though a client may not name it.
        let query = VersionsQuery::new(&[FhirVersion::R4], None, VersionsForm::Fhir);
        let answer = query.answer(
            [FhirVersion::Stu3, FhirVersion::R4],
            FhirVersion::Stu3,
            None,
        );
        assert_eq!(parameters_of(answer.body()), ["version=4.0", "default=3.0"]);
        // The layer's default is what a request naming none gets, whatever the tenant's first
        // server (or 406, where the tenant has no server for it: still its default).
        let query = VersionsQuery::new(
            &[FhirVersion::Stu3, FhirVersion::R4],
            Some(FhirVersion::R4),
            VersionsForm::Fhir,
        );
        let answer = query.answer(
            [FhirVersion::Stu3, FhirVersion::R4],
            FhirVersion::Stu3,
            None,
        );
        assert_eq!(
            parameters_of(answer.body()),
            ["version=3.0", "version=4.0", "default=4.0"]
        );
        let answer = query.answer([FhirVersion::Stu3], FhirVersion::Stu3, None);
        assert_eq!(parameters_of(answer.body()), ["version=3.0", "default=4.0"]);
    }

    #[test]
    fn refuses_bad_configuration() {
        assert_eq!(
            VersionNegotiationLayer::builder()
                .supported([])
                .build()
                .unwrap_err(),
            ConfigError::NothingSupported
        );
        assert_eq!(
            VersionNegotiationLayer::builder()
                .supported([FhirVersion::Stu3])
                .default_version(FhirVersion::R4)
                .build()
                .unwrap_err(),
            ConfigError::UnsupportedDefault(FhirVersion::R4)
        );
    }

    #[test]
    fn content_type_reading_agrees_with_the_parser() {
        for content_type in [
            "application/fhir+json; fhirVersion=3.0",
            "application/json+fhir;fhirVersion=1.0",
            "application/fhir+json; fhirVersion=9.9",
            "Application/FHIR+JSON ; FHIRVersion = \"4.0\"",
            "application/fhir+json; fhirVersion=3.0; fhirVersion=4.0",
            "application/fhir+json; fhirVersion=4.0.1; charset=utf-8",
            "application/fhir+json",
            "application/fhir+json; charset=utf-8",
            "text/plain; fhirVersion",
            "garbage; fhirVersion=3.0",
        ] {
            let value = HeaderValue::from_static(content_type);
            let parsed = parse_media(content_type)
                .map(|range| range.named)
                .filter(|named| *named != Named::Nothing);
            assert_eq!(
                named_content(&value).filter(|n| *n != Named::Nothing),
                parsed,
                "{content_type}"
            );
        }
    }
}
