//! `SmartScopeLayer`, its builder, its service and the request body it hands on.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_layer::Layer;
use tower_service::Service;

use super::check::{interaction_of, operation_parameters, Allowed, Check, Refused};
use super::scope::{parse_query, Grants, Param};
use crate::auth::{names_a_token, MemoKey, VerifiedClaims};
use crate::body::ResponseBody;
use crate::future::PassOrOwn;
use crate::interaction::Interaction;
use crate::outcome::{IssueType, OperationOutcome};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default for [`SmartScopeBuilder::max_buffered_body`]: 16 MiB, the gateway's default
/// request body limit.
pub const DEFAULT_MAX_BUFFERED_BODY: usize = 16 * 1024 * 1024;

/// The default for [`SmartScopeBuilder::max_buffered_total`]: 256 MiB, sixteen of the largest
/// bodies at once.
pub const DEFAULT_MAX_BUFFERED_TOTAL: usize = 256 * 1024 * 1024;

/// The largest form (`application/x-www-form-urlencoded`: a `POST _search`'s, an operation's)
/// read to check it, 1 MiB (or [`max_buffered_body`](SmartScopeBuilder::max_buffered_body)
/// if less); a larger one gets `413`. A servlet container reads no parameter of a form past
/// its own limit (Tomcat's `maxPostSize`, 2 MB by default, Jetty's 200,000 bytes): the FHIR
/// server would search without those the request was allowed by. A search by a few thousand
/// `_id`s fits.
pub const MAX_FORM_BODY: usize = 1024 * 1024;

/// The most search parameters a request may carry, its query's and its form's together; more
/// is `400`. A servlet container that meets more than it takes (Tomcat's
/// `maxParameterCount`, 10000, or 1000 in its newer releases) drops the rest, or all: the FHIR
/// server would search without the one (`patient=`, a granular scope's) the request was
/// allowed by.
pub const MAX_SEARCH_PARAMETERS: usize = 500;

/// The most check searches a read allowed only by granular scopes may take: one for each of
/// the token's granular scopes that could allow it (`system/Observation.rs?category=...`), made
/// one after another until one finds the resource. A token with more such scopes for the type
/// read is refused the read (`403`, `insufficient_scope`): the searches after the first are not
/// counted by the rate limits, so a client asking for hundreds of granular scopes would make
/// hundreds of upstream requests with each read.
pub const MAX_READ_CHECKS: usize = 16;

/// A Tower layer that enforces the token's SMART scopes on each FHIR interaction (see the
/// [module docs](super)).
#[derive(Clone)]
#[must_use]
pub struct SmartScopeLayer {
    config: Arc<Config>,
}

struct Config {
    require_smart_scopes: bool,
    max_buffered_body: usize,
    /// The bytes of bodies held at once, across every request through the layer's clones: a
    /// permit a byte.
    buffered: Arc<Semaphore>,
    max_buffered_total: usize,
    /// This layer's key for the grants it keeps with a token's claims: a cached token's scopes
    /// are parsed once, not on each of its requests.
    memo: MemoKey,
}

impl SmartScopeLayer {
    /// Starts configuring the layer.
    pub fn builder() -> SmartScopeBuilder {
        SmartScopeBuilder {
            require_smart_scopes: false,
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            max_buffered_total: DEFAULT_MAX_BUFFERED_TOTAL,
        }
    }
}

impl fmt::Debug for SmartScopeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmartScopeLayer")
            .field("require_smart_scopes", &self.config.require_smart_scopes)
            .field("max_buffered_body", &self.config.max_buffered_body)
            .field("max_buffered_total", &self.config.max_buffered_total)
            .finish()
    }
}

impl<S> Layer<S> for SmartScopeLayer {
    type Service = SmartScopes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SmartScopes {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// Configures a [`SmartScopeLayer`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SmartScopeBuilder {
    require_smart_scopes: bool,
    max_buffered_body: usize,
    max_buffered_total: usize,
}

/// A setting [`SmartScopeBuilder::build`] refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_buffered_body` is zero.
    NoBodyRoom,
    /// `max_buffered_total` is below `max_buffered_body` (the largest body could never be
    /// checked), or above what a semaphore counts.
    TotalBelowBody,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoBodyRoom => f.write_str("max_buffered_body must be at least 1 byte"),
            Self::TotalBelowBody => f.write_str(
                "max_buffered_total must be at least max_buffered_body (and at most 2^61 bytes)",
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl SmartScopeBuilder {
    /// Refuses (`403`) a token with no SMART resource scope. Off by default: such a token (the
    /// tenant in its scope and nothing else, as the gateway's own clients get) keeps access to
    /// everything its tenant's server holds.
    ///
    /// With it, a token marked [`NARROWED_CLAIM`](super::NARROWED_CLAIM) is refused too
    /// (`403`): its resource scopes narrow the tenant-wide access of a client registered
    /// without any, which such a client does not have here.
    pub fn require_smart_scopes(mut self, require: bool) -> Self {
        self.require_smart_scopes = require;
        self
    }

    /// Whether tokens without SMART resource scopes are refused
    /// ([`require_smart_scopes`](Self::require_smart_scopes)).
    #[cfg_attr(not(all(feature = "token", feature = "proxy")), allow(dead_code))]
    pub(crate) fn requires_smart_scopes(&self) -> bool {
        self.require_smart_scopes
    }

    /// The largest request body read to check it: a batch or transaction Bundle, a form
    /// `POST _search` (at most [`MAX_FORM_BODY`] whatever this says). Larger ones get `413`.
    /// Default [`DEFAULT_MAX_BUFFERED_BODY`].
    pub fn max_buffered_body(mut self, bytes: usize) -> Self {
        self.max_buffered_body = bytes;
        self
    }

    /// The most bytes of request bodies the layer holds at once to check them, across all
    /// requests (through every clone of the layer and its services): many large Bundles at
    /// once cannot take the process's memory. A body that would take the total past it gets
    /// `503` with `Retry-After: 1` (an OperationOutcome, `transient`), read no further and not
    /// forwarded; a body held is let go when it has been forwarded or refused. Default
    /// [`DEFAULT_MAX_BUFFERED_TOTAL`]; at least [`max_buffered_body`](Self::max_buffered_body).
    pub fn max_buffered_total(mut self, bytes: usize) -> Self {
        self.max_buffered_total = bytes;
        self
    }

    /// The layer.
    pub fn build(self) -> Result<SmartScopeLayer, ConfigError> {
        if self.max_buffered_body == 0 {
            return Err(ConfigError::NoBodyRoom);
        }
        if self.max_buffered_total < self.max_buffered_body
            || self.max_buffered_total > Semaphore::MAX_PERMITS
        {
            return Err(ConfigError::TotalBelowBody);
        }
        Ok(SmartScopeLayer {
            config: Arc::new(Config {
                require_smart_scopes: self.require_smart_scopes,
                max_buffered_body: self.max_buffered_body,
                buffered: Arc::new(Semaphore::new(self.max_buffered_total)),
                max_buffered_total: self.max_buffered_total,
                memo: MemoKey::unique(),
            }),
        })
    }
}

/// The service of [`SmartScopeLayer`].
#[derive(Clone)]
pub struct SmartScopes<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for SmartScopes<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmartScopes")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The response future of [`SmartScopes`]: the inner service's for a request checked from its
/// head (no allocation); the layer's own, boxed, for a refusal or a body read to be checked.
pub type ResponseFuture<F, B, E> = PassOrOwn<F, B, E>;

/// What a request's head says must be done with it.
enum Plan {
    /// Let it through as it is.
    Pass,
    /// Let it through, asking the FHIR server not to ignore any search parameter
    /// (`Prefer: handling=strict`): the scopes allowed it by its parameters.
    PassStrict,
    /// Refuse it.
    Refuse(Box<Response<Bytes>>),
    /// Read its body and check it: a Bundle, or a `_search` form.
    ReadBody(BodyCheck),
    /// A read allowed only if the resource matches a granular scope's query: ask the inner
    /// service first whether a search by its id and each query finds it.
    Probe {
        /// The searches to try, each `[type]?_id=[id]&[query]&_summary=count`.
        searches: Vec<String>,
        /// The refusal if none finds it.
        refusal: Box<Response<Bytes>>,
    },
}

enum BodyCheck {
    Bundle,
    /// A batch or transaction under a token the scopes do not restrict: only its entries'
    /// URLs are checked ([`bundle_entry_urls`](super::check::bundle_entry_urls)).
    BundleUrls,
    /// The parameters of an operation on a patient's compartment (`$everything`, `$summary`)
    /// posted otherwise than as a form: JSON `Parameters` are read as its parameters;
    /// another format (`None`: neither JSON nor XML) only passes with scopes that do not need
    /// its parameters read.
    OperationParameters {
        format: Option<ResourceFormat>,
    },
    /// A `_search` form, or an operation's parameters posted as one; `untyped` when the
    /// request has no `Content-Type` (then only an empty body will do).
    SearchForm {
        untyped: bool,
    },
    /// A form posted under a token the scopes do not restrict: only checked for an
    /// `access_token` ([`form_token`]).
    FormToken,
    /// A created or updated resource, allowed by the head: it must be of the type the URL
    /// names (`None`: a patch, of no type), which the scopes were checked for, and its
    /// conditional references need what their searches would.
    Resource {
        ty: Option<Box<str>>,
        format: ResourceFormat,
        allowed: Allowed,
    },
}

/// How a created or updated resource is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResourceFormat {
    Json,
    Xml,
    /// No `Content-Type`: JSON or XML as its first byte says.
    Untyped,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SmartScopes<S>
where
    S: Service<Request<ScopedBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let grants = match request.extensions().get::<VerifiedClaims>() {
            Some(claims) => {
                claims.memoized(self.config.memo, |claims| Arc::new(Grants::of(claims)))
            }
            None => {
                return refused(
                    OperationOutcome::error(
                        IssueType::Forbidden,
                        "The request carries no verified token",
                    )
                    .to_response(StatusCode::FORBIDDEN),
                )
            }
        };
        // A write the token may make but whose result it may not read: the resource is not
        // shown (found before the request goes in; writes only, the others pay nothing).
        let hidden = hidden_result(&grants, &request);
        let future = match plan(&self.config, &grants, &request) {
            Plan::Pass => PassOrOwn::passed(self.inner.call(request.map(ScopedBody::passed))),
            Plan::PassStrict => {
                let mut request = request.map(ScopedBody::passed);
                prefer_strict(request.headers_mut());
                PassOrOwn::passed(self.inner.call(request))
            }
            Plan::Refuse(response) => refused(*response),
            Plan::Probe { searches, refusal } => {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let mut prober = self.inner.clone();
                // The first search is counted by the rate limits as the client's request; the
                // others, and the read once one finds the resource, are not counted again.
                let probes: Vec<_> = searches
                    .iter()
                    .filter_map(|search| search.parse::<http::Uri>().ok())
                    .enumerate()
                    .filter_map(|(i, search)| probe_request(&request, search, i > 0))
                    .collect();
                PassOrOwn::own(async move {
                    for search in probes {
                        match probe(&mut prober, search).await {
                            Ok(true) => {
                                let mut request = request.map(ScopedBody::passed);
                                request.extensions_mut().insert(ScopeProbe);
                                return Ok(inner.call(request).await?.map(ResponseBody::inner));
                            }
                            Ok(false) => {}
                            Err(response) => return Ok(response.map(ResponseBody::full)),
                        }
                    }
                    Ok(refusal.map(ResponseBody::full))
                })
            }
            Plan::ReadBody(what) => {
                // The body must be read first: the ready service goes with the request, and
                // this one keeps a fresh clone.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let max = match what {
                    BodyCheck::SearchForm { .. } | BodyCheck::FormToken => {
                        self.config.max_buffered_body.min(MAX_FORM_BODY)
                    }
                    _ => self.config.max_buffered_body,
                };
                let budget = Arc::clone(&self.config.buffered);
                PassOrOwn::own(async move {
                    let (parts, body) = request.into_parts();
                    let (bytes, held) = match read_within(body, max, budget).await {
                        Ok(Some(read)) => read,
                        Ok(None) => return Ok(too_many_bodies().map(ResponseBody::full)),
                        Err(error) => {
                            let response = match crate::ops::BodyFailure::of(&*error) {
                                Some(failure) => failure.answer(Some(max as u64)),
                                None => OperationOutcome::error(
                                    IssueType::Invalid,
                                    "The request body could not be read",
                                )
                                .to_response(StatusCode::BAD_REQUEST),
                            };
                            return Ok(response.map(ResponseBody::full));
                        }
                    };
                    if matches!(what, BodyCheck::SearchForm { .. } | BodyCheck::FormToken)
                        && names_a_token(&String::from_utf8_lossy(&bytes))
                    {
                        return Ok(form_token().map(ResponseBody::full));
                    }
                    let checked = match what {
                        BodyCheck::FormToken => Ok(Allowed::default()),
                        BodyCheck::Bundle => Check::new(&grants).bundle(&bytes),
                        BodyCheck::BundleUrls => {
                            super::check::bundle_entry_urls(&bytes).map(|()| Allowed::default())
                        }
                        BodyCheck::OperationParameters { format } => {
                            match posted_parameters(&grants, &parts, &bytes, format) {
                                Ok(allowed) => Ok(allowed),
                                Err(response) => return Ok((*response).map(ResponseBody::full)),
                            }
                        }
                        BodyCheck::Resource {
                            ty,
                            format,
                            allowed,
                        } => written_resource(&grants, &bytes, ty.as_deref(), format)
                            .map(|()| allowed),
                        BodyCheck::SearchForm { untyped: true } if !bytes.is_empty() => {
                            return Ok(not_a_form().map(ResponseBody::full));
                        }
                        BodyCheck::SearchForm { .. } => {
                            let query =
                                parse_query(parts.uri.query().unwrap_or("")).map_err(|why| {
                                    Refused::malformed(format!("The query string {why}"))
                                });
                            let form = std::str::from_utf8(&bytes)
                                .map_err(|_| super::scope::Unreadable::NotUtf8)
                                .and_then(parse_query)
                                .map_err(|why| Refused::malformed(format!("The form {why}")));
                            query.and_then(|mut params| {
                                params.extend(form?);
                                if params.len() > MAX_SEARCH_PARAMETERS {
                                    return Err(too_many_parameters());
                                }
                                Check::new(&grants).request(
                                    &parts.method,
                                    parts.uri.path(),
                                    &params,
                                )
                            })
                        }
                    };
                    let mut parts = parts;
                    match checked {
                        Err(why) => return Ok(insufficient_scope(&why).map(ResponseBody::full)),
                        Ok(allowed) if allowed.by_parameters => prefer_strict(&mut parts.headers),
                        Ok(_) => {}
                    }
                    let request = Request::from_parts(parts, ScopedBody::held(bytes, held));
                    Ok(inner.call(request).await?.map(ResponseBody::inner))
                })
            }
        };
        match hidden {
            None => future,
            Some(ty) => PassOrOwn::own(async move {
                future
                    .await
                    .map(|response| without_written_resource(response, &ty))
            }),
        }
    }
}

/// The type written, when the request creates, updates or patches a resource the token may
/// not read once written (see [`Check::reads_what_it_writes`]): its response must not show it.
fn hidden_result<B>(grants: &Grants, request: &Request<B>) -> Option<Box<str>> {
    let method = request.method();
    if grants.is_empty() || !matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        return None;
    }
    let path = request.uri().path();
    // A create is a POST to a type: its last segment a type's name. The POSTs that are not
    // (`_search`, `$operation`s, a batch) are not classified again here.
    if *method == Method::POST
        && !path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .is_some_and(|last| last.starts_with(|c: char| c.is_ascii_uppercase()))
    {
        return None;
    }
    let found = interaction_of(method, path);
    match (found.interaction, found.resource_type) {
        (Some(Interaction::Create | Interaction::Update | Interaction::Patch), Some(ty))
            if !Check::new(grants).reads_what_it_writes(ty) =>
        {
            Some(Box::from(ty))
        }
        _ => None,
    }
}

/// A successful write's response with an OperationOutcome (`information`, `suppressed`) in
/// place of the resource the server answered with: the token may write `ty` but not read it,
/// and a patch's or an update's answer would show what it may not read (the fields it did not
/// send, whoever's resource it is). The status and the other headers (`Location`, `ETag`,
/// `Last-Modified`) stay; an answer without a body (`204`, `Content-Length: 0`) is left as it
/// is.
fn without_written_resource<B>(
    response: Response<ResponseBody<B>>,
    ty: &str,
) -> Response<ResponseBody<B>> {
    let status = response.status();
    let empty = status == StatusCode::NO_CONTENT
        || response
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() == b"0");
    if !status.is_success() || empty {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    drop(body);
    let outcome = OperationOutcome::new(
        crate::outcome::Severity::Information,
        IssueType::Suppressed,
        format!(
            "The {ty} written is not shown: the token may write {ty} resources but not read \
             them (a scope with r on {ty})"
        ),
    );
    // The answer as the outcome's own (its type, length and caching), the server's other
    // headers kept.
    let shown = outcome.to_response(status);
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::TRANSFER_ENCODING,
        header::CACHE_CONTROL,
        header::X_CONTENT_TYPE_OPTIONS,
    ] {
        parts.headers.remove(&name);
    }
    for name in ["digest", "content-digest", "repr-digest", "content-md5"] {
        parts.headers.remove(name);
    }
    let (shown, bytes) = shown.into_parts();
    for (name, value) in &shown.headers {
        parts.headers.insert(name, value.clone());
    }
    // (Written in XML for a client that asks for it; no refusal: the write was made.)
    if let Some(written) = shown.extensions.get::<crate::outcome::Written>() {
        parts.extensions.insert(written.clone());
    }
    Response::from_parts(parts, ResponseBody::full(bytes))
}

/// What to do with a request, from its head and the grants.
fn plan<B: Body>(config: &Config, grants: &Grants, request: &Request<B>) -> Plan {
    // (A form type on an empty body, which some clients send on every request, holds nothing.)
    if matches!(
        *request.method(),
        Method::PUT | Method::PATCH | Method::DELETE
    ) && !request.body().is_end_stream()
        && !matches!(form_body(request.headers()), Ok(false))
    {
        return Plan::Refuse(Box::new(form_not_posted()));
    }
    if grants.narrowed() && config.require_smart_scopes {
        // Scopes a client without any asked for: they narrow a tenant-wide access, which a
        // token without resource scopes does not have here.
        return Plan::Refuse(Box::new(insufficient_scope(&Refused::new(format!(
            "The token's resource scopes were asked for by a client registered without any \
             ({}): they narrow the access of a token without resource scopes, which SMART \
             scopes being required here refuses",
            super::NARROWED_CLAIM
        )))));
    }
    if grants.is_empty() && !config.require_smart_scopes {
        // The tenant alone: tenant-wide access, as before SMART scopes were enforced. But a
        // batch's entries are read by the FHIR server relative to the tenant's base: one
        // that could name another base (another tenant's, on the same server) is refused.
        // (A POST to the base: a path of nothing but slashes, as the classification reads it.)
        if request.method() == Method::POST && request.uri().path().bytes().all(|b| b == b'/') {
            if let Some(why) = unreadable_batch(request.headers()) {
                return Plan::Refuse(Box::new(
                    OperationOutcome::error(IssueType::NotSupported, why)
                        .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                ));
            }
            return Plan::ReadBody(BodyCheck::BundleUrls);
        }
        // A form (a `_search`'s, an operation's parameters) is read for an `access_token`,
        // which would reach the FHIR server (and its logs) in it; one this layer cannot read
        // as the server would (another charset) is refused, as a scoped token's is.
        if request.method() == Method::POST {
            match form_body(request.headers()) {
                Ok(false) => {}
                Ok(true) => return Plan::ReadBody(BodyCheck::FormToken),
                Err(why) => {
                    return Plan::Refuse(Box::new(
                        OperationOutcome::error(IssueType::NotSupported, why)
                            .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                    ))
                }
            }
        }
        return Plan::Pass;
    }
    // `$versions`, left by the version layer to the routing layer: which releases the
    // tenant's servers speak, as `metadata` says what they do, reaching no server and no data.
    if crate::version::VersionsQuery::of(request).is_some() {
        return Plan::Pass;
    }
    // A header the checks read, named in `Connection`, would be removed on the way to the
    // FHIR server (a hop-by-hop field, RFC 9110 §7.6.1): the server would see another request
    // than the one checked. And two `Content-Type`s are read as one by some servers.
    if let Some(why) = unsound_heads(request.headers()) {
        return Plan::Refuse(Box::new(
            OperationOutcome::error(IssueType::Invalid, why).to_response(StatusCode::BAD_REQUEST),
        ));
    }
    let form = match form_body(request.headers()) {
        Ok(form) => form,
        Err(why) => {
            return Plan::Refuse(Box::new(
                OperationOutcome::error(IssueType::NotSupported, why)
                    .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ))
        }
    };
    let check = Check::new(grants);
    // HAPI cascades a delete by a header as well as by `_cascade=delete`: for each delete of
    // a batch too.
    if let Err(why) = cascade_header(request.headers(), &check) {
        return Plan::Refuse(Box::new(insufficient_scope(&why)));
    }
    let params = match request.uri().query() {
        None => Vec::new(),
        Some(query) => match parse_query(query) {
            Ok(params) => params,
            Err(why) => {
                return Plan::Refuse(Box::new(
                    OperationOutcome::error(IssueType::Invalid, format!("The query string {why}"))
                        .to_response(StatusCode::BAD_REQUEST),
                ))
            }
        },
    };
    if params.len() > MAX_SEARCH_PARAMETERS {
        return Plan::Refuse(Box::new(insufficient_scope(&too_many_parameters())));
    }
    let method = request.method();
    let path = request.uri().path();
    let found = interaction_of(method, path);
    let operation_form =
        found.interaction == Some(Interaction::Operation) && *method == Method::POST && form;
    match found.interaction {
        Some(Interaction::Batch) if *method == Method::POST => {
            // Its query applies to every entry (HAPI cascades each delete by `_cascade`).
            return match check.batch_query(&params) {
                Ok(()) => Plan::ReadBody(BodyCheck::Bundle),
                Err(why) => Plan::Refuse(Box::new(insufficient_scope(&why))),
            };
        }
        // An operation's parameters posted as a form are search parameters to a server that
        // reads a form's as the query's (`$lastn` with an `_include`): checked as they are.
        _ if operation_form => return Plan::ReadBody(BodyCheck::SearchForm { untyped: false }),
        Some(Interaction::Search) if *method == Method::POST => {
            // The FHIR server reads the body's parameters only from a form: of any other
            // type, it would run a search other than the one checked here.
            return match request.headers().get(header::CONTENT_TYPE) {
                None => Plan::ReadBody(BodyCheck::SearchForm { untyped: true }),
                Some(_) if form => Plan::ReadBody(BodyCheck::SearchForm { untyped: false }),
                Some(_) => Plan::Refuse(Box::new(not_a_form())),
            };
        }
        // `Patient/[id]/$everything` by POST, its parameters in a body: under a `patient/`
        // scope, each must only narrow what it answers with (HAPI's `_mdm=true` would add
        // other patients' records), so the body is read.
        Some(Interaction::Operation)
            if *method == Method::POST
                && found.resource_type == Some("Patient")
                && found.resource_id.is_some()
                && matches!(found.operation, Some("everything" | "summary"))
                && !takes_any_parameter(&check, method, path, &params) =>
        {
            let format = match request.headers().get(header::CONTENT_TYPE) {
                None => Some(ResourceFormat::Untyped),
                Some(value) => format_of(value).map(|(format, _)| format),
            };
            return Plan::ReadBody(BodyCheck::OperationParameters { format });
        }
        _ => {}
    }
    let checked = check
        .classified(method, path, found, &params)
        .and_then(|allowed| {
            // A conditional create searches too.
            let mut searches = request.headers().get_all("if-none-exist").iter();
            match (found.interaction, searches.next(), searches.next()) {
                (Some(Interaction::Create), Some(query), None) => match query.to_str() {
                    Ok(query) => check
                        .if_none_exist(found.resource_type.unwrap_or_default(), query)
                        .map(|search| allowed.and(search)),
                    Err(_) => Err(Refused::malformed("The If-None-Exist header is not text")),
                },
                (Some(Interaction::Create), Some(_), Some(_)) => Err(Refused::malformed(
                    "A create has one If-None-Exist header at most",
                )),
                _ => Ok(allowed),
            }
        });
    if let (Ok(_), Some(Interaction::Patch), Some(ty)) =
        (&checked, found.interaction, found.resource_type)
    {
        if let Err(why) = check.patch_reads(ty, None) {
            return Plan::Refuse(Box::new(insufficient_scope(&why)));
        }
    }
    if let (
        Ok(allowed),
        Some(interaction @ (Interaction::Create | Interaction::Update | Interaction::Patch)),
        Some(ty),
    ) = (&checked, found.interaction, found.resource_type)
    {
        if !check.writes_every_type() {
            let allowed = *allowed;
            let format = match request.headers().get(header::CONTENT_TYPE).map(format_of) {
                None => ResourceFormat::Untyped,
                // A Binary is created from any content but FHIR's own formats (FHIR's raw
                // binary create): a JSON or XML document is stored as a Binary's content.
                Some(Some((_, false))) if ty == "Binary" => return pass(allowed),
                Some(Some((format, _))) => format,
                // A patch in another format (none is FHIR's) holds no reference to check.
                _ if interaction == Interaction::Patch || ty == "Binary" => return pass(allowed),
                Some(None) => return Plan::Refuse(Box::new(not_a_resource_format())),
            };
            return Plan::ReadBody(BodyCheck::Resource {
                // A patch (JSON Patch, a FHIRPath Patch's Parameters) is not the resource: only
                // its references are checked.
                ty: (interaction != Interaction::Patch).then(|| ty.into()),
                format,
                allowed,
            });
        }
    }
    match checked {
        Ok(allowed) => pass(allowed),
        Err(why) => {
            let refusal = Box::new(insufficient_scope(&why));
            // A read (not a vread: an old version may not match what the current one does)
            // that a granular scope of its type may allow: a plain one, whose parameters only
            // shape the answer. Any other (an `_include`, a `_contained`, a chain) may be what
            // was refused, and the probe says nothing of it.
            let plain = params.iter().all(|(name, _)| {
                matches!(
                    name.as_ref(),
                    "_format" | "_pretty" | "_summary" | "_elements"
                )
            });
            if let (Some(Interaction::Read), Some(ty), Some(id), true) = (
                found.interaction,
                found.resource_type,
                found.resource_id,
                plain,
            ) {
                // The FHIR base as the client reached it: the path before `[type]/[id]`.
                let base = path
                    .trim_end_matches('/')
                    .strip_suffix(&format!("{ty}/{id}"))
                    .unwrap_or("/");
                let searches: Vec<String> = check
                    .granular_reads(ty)
                    .iter()
                    .map(|query| probe_search(base, ty, query, id))
                    .collect();
                if searches.len() > MAX_READ_CHECKS {
                    return Plan::Refuse(Box::new(insufficient_scope(&Refused::new(format!(
                        "The token has {} granular scopes that could allow reading this {ty}: \
                         a read is checked with a search for each, and at most \
                         {MAX_READ_CHECKS} are made; use a token with fewer",
                        searches.len()
                    )))));
                }
                if !searches.is_empty() {
                    return Plan::Probe { searches, refusal };
                }
            }
            Plan::Refuse(refusal)
        }
    }
}

/// Checks an operation on a patient's compartment whose parameters are posted in `body` (not a
/// form): none, or JSON `Parameters`, are checked as the query's would be; parameters that
/// cannot be read here (XML, another format) pass only if the scopes would allow any
/// parameter (`r` and `s` on `*`), else `415`.
fn posted_parameters(
    grants: &Grants,
    parts: &http::request::Parts,
    body: &[u8],
    format: Option<ResourceFormat>,
) -> Result<Allowed, Box<Response<Bytes>>> {
    let check = Check::new(grants);
    let path = parts.uri.path();
    let refuse = |why: Refused| Box::new(insufficient_scope(&why));
    // The query was read already, in `plan`.
    let mut params: Vec<Param<'_>> =
        parse_query(parts.uri.query().unwrap_or("")).unwrap_or_default();
    let start = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .trim_ascii_start();
    let json = match format {
        _ if start.is_empty() => None,
        Some(ResourceFormat::Json) => Some(true),
        Some(ResourceFormat::Untyped) => Some(start.first() == Some(&b'{')),
        _ => Some(false),
    };
    match json {
        // No body: the query's parameters are all.
        None => {}
        Some(true) => {
            let parameters = super::check::json_resource(start).map_err(refuse)?;
            if parameters
                .get("resourceType")
                .and_then(serde_json::Value::as_str)
                != Some("Parameters")
            {
                return Err(refuse(Refused::malformed(
                    "An operation's body must be its Parameters (or a form)",
                )));
            }
            let posted = operation_parameters(&parameters).map_err(|why| {
                refuse(Refused::malformed(format!("The operation's body: {why}")))
            })?;
            params.extend(posted);
            if params.len() > MAX_SEARCH_PARAMETERS {
                return Err(refuse(too_many_parameters()));
            }
        }
        Some(false) => {
            let allowed = check
                .request(&parts.method, path, &params)
                .map_err(refuse)?;
            // Parameters not read: allowed only where any parameter would be.
            return if takes_any_parameter(&check, &parts.method, path, &params) {
                Ok(allowed)
            } else {
                Err(Box::new(unreadable_parameters()))
            };
        }
    }
    check.request(&parts.method, path, &params).map_err(refuse)
}

/// Whether the scopes allow this request whatever parameters it is given (`r` and `s` on
/// `*`, say): then its body need not be read for them.
fn takes_any_parameter(
    check: &Check<'_>,
    method: &Method,
    path: &str,
    params: &[Param<'_>],
) -> bool {
    let mut any = params.to_vec();
    any.push(("(any parameter)".into(), "".into()));
    check.request(method, path, &any).is_ok()
}

/// `415`: an operation's parameters in a body they cannot be read from, which the scopes
/// allow only with parameters that narrow it.
fn unreadable_parameters() -> Response<Bytes> {
    OperationOutcome::error(
        IssueType::NotSupported,
        "The operation's parameters must be posted as JSON Parameters or a form to be checked: \
         the token's scopes allow it only with parameters that narrow it to the patient's \
         compartment",
    )
    .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE)
}

/// The refusal of a request with more than [`MAX_SEARCH_PARAMETERS`] parameters.
fn too_many_parameters() -> Refused {
    Refused::malformed(format!(
        "The request carries more than {MAX_SEARCH_PARAMETERS} parameters, its query's and its \
         form's together: a servlet container may drop those past its limit, or all, and the \
         FHIR server search without those the request was allowed by"
    ))
}

/// Checks a cascading delete asked for by a header (HAPI's `X-Cascade: delete`; any value
/// but `none`, one that is not text too).
fn cascade_header(headers: &http::HeaderMap, check: &Check<'_>) -> Result<(), Refused> {
    let cascades = headers.get_all(X_CASCADE).iter().any(|value| {
        value
            .to_str()
            .map_or(true, |value| !value.trim().eq_ignore_ascii_case("none"))
    });
    if cascades {
        check.cascade()?;
    }
    Ok(())
}

const X_CASCADE: header::HeaderName = header::HeaderName::from_static("x-cascade");

/// Passes a request allowed from its head, strictly if by its parameters.
fn pass(allowed: Allowed) -> Plan {
    if allowed.by_parameters {
        Plan::PassStrict
    } else {
        Plan::Pass
    }
}

/// The format a `Content-Type` names (`application/fhir+json`, `application/json`,
/// `application/xml+fhir`, `text/xml`, any `+json` or `+xml`), if JSON or XML, and whether it
/// is FHIR's own (`fhir+json`, `json+fhir`, `fhir+xml`, `xml+fhir`).
fn format_of(value: &HeaderValue) -> Option<(ResourceFormat, bool)> {
    let value = value.to_str().ok()?;
    let media = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let (kind, subtype) = media.split_once('/')?;
    if !matches!(kind, "application" | "text") {
        return None;
    }
    let fhir = matches!(subtype, "fhir+json" | "json+fhir" | "fhir+xml" | "xml+fhir");
    let subtype = subtype.strip_suffix("+fhir").unwrap_or(subtype);
    if subtype == "json" || subtype.ends_with("+json") {
        Some((ResourceFormat::Json, fhir))
    } else if subtype == "xml" || subtype.ends_with("+xml") {
        Some((ResourceFormat::Xml, fhir))
    } else {
        None
    }
}

/// `415`: a create or update in a format whose resource type cannot be read.
fn not_a_resource_format() -> Response<Bytes> {
    OperationOutcome::error(
        IssueType::NotSupported,
        "A created or updated resource must be FHIR JSON or XML: its resource type is checked \
         against the type the URL names",
    )
    .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE)
}

/// Checks a created or updated resource's body: it must be a resource of type `ty` (the
/// server stores what the body says it is, and the scopes were checked for the type the URL
/// names), and its conditional references need what their searches would (see
/// [`Check::conditional_references`]; in XML, whose references are not parsed here, one is
/// refused: the resource can be sent as JSON). An empty body is the server's to refuse.
fn written_resource(
    grants: &Grants,
    body: &[u8],
    ty: Option<&str>,
    format: ResourceFormat,
) -> Result<(), Refused> {
    let start = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .trim_ascii_start();
    let Some(&first) = start.first() else {
        return Ok(());
    };
    let xml = match format {
        ResourceFormat::Json => false,
        ResourceFormat::Xml => true,
        ResourceFormat::Untyped => first == b'<',
    };
    let of_type = |said: Option<&str>, what: &str| match (ty, said) {
        (None, _) => Ok(()),
        (Some(ty), Some(said)) if said == ty => Ok(()),
        (Some(ty), Some(said)) => Err(Refused::new(format!(
            "The body is a {said}, not a {ty}, the type the URL names"
        ))),
        (Some(_), None) => Err(Refused::malformed(format!(
            "The body is not a {what} resource whose type can be read"
        ))),
    };
    if xml {
        of_type(xml_root(start), "FHIR XML")?;
        // A patch may set a reference by a value of any name (`valueString`, an XML Patch's
        // text): any `?` past the prolog, or a character reference that could be one, may be
        // a conditional reference. Read as UTF-8 with an ASCII root element (EBCDIC's `?` is
        // no `?` byte, UTF-16's `&#` no `&#` pair) and no document type (whose entities could
        // spell one; `xml_root` finds no root past one).
        if ty.is_none() {
            let body = xml_body(start);
            let unreadable = std::str::from_utf8(start).is_err() || xml_root(start).is_none();
            if unreadable || body.contains(&b'?') || memchr::memmem::find(body, b"&#").is_some() {
                return Err(Refused::malformed(
                    "The patch may set a conditional reference (it holds a ? or a character \
                     reference, or is not UTF-8 XML with no document type), which is checked in \
                     JSON only: send it as JSON",
                ));
            }
        }
        if xml_may_hold_conditional_reference(start) {
            return Err(Refused::malformed(
                "The body may hold a conditional reference (a reference value with a ? or a \
                 character reference), which is checked in JSON only: send it as \
                 application/fhir+json",
            ));
        }
        return Ok(());
    }
    let resource = super::check::json_resource(start)?;
    of_type(
        resource
            .get("resourceType")
            .and_then(serde_json::Value::as_str),
        "FHIR JSON",
    )?;
    match ty {
        Some(_) => Check::new(grants).conditional_references(&resource),
        None => Check::new(grants).patch_references(&resource),
    }
}

/// Whether an XML resource may hold a conditional reference: a `reference` element (any
/// prefix) with an attribute value holding a `?`, or a `&` (a character reference such as
/// `&#63;` is a `?` to the server). Attribute values are read in their quotes, so a `>` in
/// one does not end the tag; a `reference` that is not an element's name (in text, in
/// another attribute) does not count.
fn xml_may_hold_conditional_reference(xml: &[u8]) -> bool {
    memchr::memmem::find_iter(xml, b"reference").any(|at| {
        // The element's name: after `<` or a prefix's `:`, ending at a space, `/` or `>`.
        let named = match at.checked_sub(1).map(|before| xml[before]) {
            Some(b'<') => true,
            Some(b':') => xml[..at - 1]
                .iter()
                .rposition(|&b| b == b'<')
                .is_some_and(|open| {
                    xml[open + 1..at - 1]
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                }),
            _ => false,
        };
        let rest = &xml[at + b"reference".len()..];
        if !named
            || !matches!(
                rest.first(),
                Some(b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>')
            )
        {
            return false;
        }
        // Its attributes, to the `>` outside quotes.
        let mut quote = None;
        for &b in rest {
            match quote {
                Some(q) if b == q => quote = None,
                Some(_) if b == b'?' || b == b'&' => return true,
                Some(_) => {}
                None if b == b'"' || b == b'\'' => quote = Some(b),
                None if b == b'>' => return false,
                None => {}
            }
        }
        // A tag that never ends: refuse rather than guess.
        true
    })
}

/// An XML document past its prolog (the declaration, processing instructions, comments).
fn xml_body(xml: &[u8]) -> &[u8] {
    let mut rest = xml;
    loop {
        rest = rest.trim_ascii_start();
        let skipped = if let Some(after) = rest.strip_prefix(b"<?") {
            after
                .windows(2)
                .position(|w| w == b"?>")
                .map(|end| &after[end + 2..])
        } else if let Some(after) = rest.strip_prefix(b"<!--") {
            after
                .windows(3)
                .position(|w| w == b"-->")
                .map(|end| &after[end + 3..])
        } else {
            None
        };
        match skipped {
            Some(after) => rest = after,
            None => return rest,
        }
    }
}

/// The local name of an XML document's root element (`Patient` of `<f:Patient xmlns:f=...>`),
/// past a declaration, processing instructions and comments; `None` for anything else (a
/// document type declaration among them: entities could make the element another).
pub(super) fn xml_root(xml: &[u8]) -> Option<&str> {
    let rest = xml_body(xml);
    let name = rest.strip_prefix(b"<")?;
    let end = name
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b'/' || b == b'>')?;
    let name = std::str::from_utf8(&name[..end]).ok()?;
    let local = name.rsplit(':').next()?;
    (!local.is_empty() && local.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(local)
}

/// `[base][type]?_id=[id]&[name]=[value]...&_summary=count`, each value encoded.
fn probe_search(base: &str, ty: &str, query: &[(String, String)], id: &str) -> String {
    // Everything but unreserved characters escaped (`,`, `|`, `:` included: the upstream reads
    // each value exactly as the scope has it).
    const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let encode = |text: &str| percent_encoding::utf8_percent_encode(text, COMPONENT).to_string();
    let mut search = format!("{base}{ty}?_id={}", encode(id));
    for (name, value) in query {
        search.push('&');
        search.push_str(&encode(name));
        search.push('=');
        search.push_str(&encode(value));
    }
    search.push_str("&_summary=count");
    search
}

/// The largest probe answer read.
const MAX_PROBE_ANSWER: usize = 1024 * 1024;

/// The search `search` (under the read's FHIR base), with the read's extensions, asking for
/// JSON, without a body; marked [`ScopeProbe`] when the rate limits counted the read already.
fn probe_request<B, ReqBody>(
    read: &Request<B>,
    search: http::Uri,
    counted: bool,
) -> Option<Request<ScopedBody<ReqBody>>> {
    let mut request = Request::get(search)
        .header(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        )
        // A server that does not support one of the parameters must fail, not ignore it and
        // find the resource by its id alone (FHIR's default handling is lenient).
        .header(PREFER, HeaderValue::from_static("handling=strict"))
        .body(ScopedBody::buffered(Bytes::new()))
        .ok()?;
    *request.extensions_mut() = read.extensions().clone();
    if counted {
        request.extensions_mut().insert(ScopeProbe);
    }
    Some(request)
}

/// In a request's extensions: the request belongs to a client's read under a granular scope
/// whose first check search the rate limits counted already (a later check search, or the read
/// itself once a search found the resource). The rate limits let it pass, so such a read costs
/// the client one request; a limit reached refuses the first search, and the client gets that
/// `429` (a search's `429` is the read's answer, never a failed check's `502`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScopeProbe;

/// Whether the probe search finds the resource; `Err` with the answer to give when that
/// cannot be told.
async fn probe<S, ReqBody, ResBody>(
    inner: &mut S,
    request: Request<ScopedBody<ReqBody>>,
) -> Result<bool, Response<Bytes>>
where
    S: Service<Request<ScopedBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let unavailable = || {
        OperationOutcome::error(
            IssueType::Transient,
            "Whether the resource matches the token's granular scope could not be checked",
        )
        .to_response(StatusCode::BAD_GATEWAY)
    };
    std::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .map_err(|_| unavailable())?;
    // The parameters the search must have used: all but `_summary`.
    let mut required = names(request.uri().query().unwrap_or(""));
    required.retain(|name| name != "_summary");
    let response = inner.call(request).await.map_err(|_| unavailable())?;
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        // A rate limit reached (the gateway's, or the server's own): the read's answer, with
        // its `Retry-After`.
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_PROBE_ANSWER)
            .collect()
            .await
            .map_err(|_| unavailable())?
            .to_bytes();
        return Err(Response::from_parts(parts, body));
    }
    if response.status() != StatusCode::OK {
        tracing::info!(status = %response.status(), "a granular-scope probe search failed");
        return Err(unavailable());
    }
    let body = Limited::new(response.into_body(), MAX_PROBE_ANSWER)
        .collect()
        .await
        .map_err(|_| unavailable())?
        .to_bytes();
    let bundle: serde_json::Value = serde_json::from_slice(&body).map_err(|_| unavailable())?;
    if bundle.get("resourceType").and_then(|t| t.as_str()) != Some("Bundle") {
        return Err(unavailable());
    }
    // A server reports the parameters it used in the `self` link; one that dropped one of
    // ours (lenient handling despite `Prefer`) found the resource by less than the scope says.
    let used = bundle
        .get("link")
        .and_then(|links| links.as_array())
        .into_iter()
        .flatten()
        .find(|link| link.get("relation").and_then(|r| r.as_str()) == Some("self"))
        .and_then(|link| link.get("url").and_then(|u| u.as_str()));
    if let Some(used) = used {
        let used = names(used.split_once('?').map_or("", |(_, q)| q));
        // A link without `_id` does not echo the search's parameters (a paging token, say):
        // it tells nothing either way.
        let echoes = used.iter().any(|name| name == "_id");
        if let Some(dropped) = required.iter().find(|name| echoes && !used.contains(name)) {
            tracing::warn!(
                parameter = %dropped,
                "a granular-scope probe search did not use one of its parameters"
            );
            return Err(unavailable());
        }
    }
    let total = bundle.get("total").and_then(serde_json::Value::as_u64);
    let entries = bundle
        .get("entry")
        .and_then(|e| e.as_array())
        .map_or(0, Vec::len);
    Ok(total.unwrap_or(entries as u64) > 0)
}

/// The parameter names of a query string, decoded (lossily: a name that is not UTF-8 or not
/// one FHIR could define is still a name, and matches none of the request's, so a server's
/// `self` link holding one cannot hide a parameter it dropped).
fn names(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            percent_encoding::percent_decode_str(&name.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// The body whole, within `max` bytes (else the `Limited` error), and the permits it holds in
/// `budget`: a byte each of the memory it takes (the buffer's capacity, into which each frame
/// is copied and then let go, so a body sent a byte a frame costs what its bytes do). A body
/// whose length is known takes its share before a byte is read. `None` when the budget has
/// not room for it (the body is read no further).
async fn read_within<B>(
    body: B,
    max: usize,
    budget: Arc<Semaphore>,
) -> Result<Option<(Bytes, Option<OwnedSemaphorePermit>)>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut held = Held {
        budget,
        permit: None,
        bytes: 0,
    };
    let mut buffer = bytes::BytesMut::new();
    // A known length within the limit (a larger one is `Limited`'s to refuse).
    if let Some(length) = body.size_hint().exact() {
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length <= max {
            buffer.reserve(length);
            if !held.cover(buffer.capacity()) {
                return Ok(None);
            }
        }
    }
    let mut body = std::pin::pin!(Limited::new(body, max));
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buffer.reserve(data.len());
        if !held.cover(buffer.capacity()) {
            return Ok(None);
        }
        buffer.extend_from_slice(&data);
    }
    Ok(Some((buffer.freeze(), held.permit)))
}

/// The permits a body holds, and how many bytes they are.
struct Held {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Held {
    /// Takes permits until they cover `bytes`; false when the budget has not that many free.
    fn cover(&mut self, bytes: usize) -> bool {
        while self.bytes < bytes {
            let more = u32::try_from(bytes - self.bytes).unwrap_or(u32::MAX);
            let Ok(permit) = Arc::clone(&self.budget).try_acquire_many_owned(more) else {
                return false;
            };
            self.bytes += more as usize;
            match &mut self.permit {
                Some(held) => held.merge(permit),
                None => self.permit = Some(permit),
            }
        }
        true
    }
}

/// `503`: the bodies held to be checked fill the layer's budget.
fn too_many_bodies() -> Response<Bytes> {
    let mut response = OperationOutcome::error(
        IssueType::Transient,
        "Too many request bodies are being checked at once; retry shortly",
    )
    .to_response(StatusCode::SERVICE_UNAVAILABLE);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Why a request's headers would reach the FHIR server otherwise than checked, if they would.
fn unsound_heads(headers: &http::HeaderMap) -> Option<&'static str> {
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    for name in named {
        if [&b"content-type"[..], b"prefer", b"if-none-exist"]
            .iter()
            .any(|checked| name.eq_ignore_ascii_case(checked))
        {
            return Some(
                "Connection names a header the token's scopes are checked with (Content-Type, \
                 Prefer or If-None-Exist): it would not reach the FHIR server",
            );
        }
    }
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Some("The request has more than one Content-Type");
    }
    None
}

/// Asks the FHIR server not to ignore any search parameter: `Prefer: handling=strict` in
/// place of any `handling` preference the client sent, its other preferences kept (all
/// `Prefer` headers in one). A server that supports `Prefer` (RFC 7240; FHIR's search
/// `handling`) then fails a search with a parameter it does not know, rather than searching
/// without it, which would return more than the scopes allowed.
fn prefer_strict(headers: &mut http::HeaderMap) {
    let mut preferences: Vec<&str> = headers
        .get_all(PREFER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|preference| {
            // (Any item with a `handling` in it, as its name or a parameter: parsers differ
            // on which of `return=minimal; handling=lenient` they read.)
            !preference.is_empty()
                && !preference.split(';').any(|part| {
                    let name = part.split('=').next().unwrap_or("").trim();
                    name.eq_ignore_ascii_case("handling")
                })
        })
        .collect();
    // First: RFC 7240 has the first of a preference count.
    preferences.insert(0, "handling=strict");
    let joined = preferences.join(", ");
    // (Each piece came from a header value, so the joined text is one too.)
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(PREFER, value);
    }
}

const PREFER: header::HeaderName = header::HeaderName::from_static("prefer");

/// Whether the body is a form (`application/x-www-form-urlencoded`) whose parameters every
/// FHIR server reads as this layer does: the media type in lower case, no parameter but
/// `charset=utf-8`, and no `Content-Encoding`.
///
/// # Errors
///
/// A form spelt or sent otherwise: servers differ on reading it. HAPI takes a form only by a
/// case-sensitive prefix and reads none when the request has a `Content-Encoding` (even
/// `identity`) and no query string; a servlet container decodes the body in the charset it
/// names. The layer would check parameters the server never reads, and the server would run
/// a search with none.
fn form_body(headers: &http::HeaderMap) -> Result<bool, &'static str> {
    const FORM: &[u8] = b"application/x-www-form-urlencoded";
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(false);
    };
    // A type that begins as a form's is one to HAPI (it reads a form by that prefix, even
    // `application/x-www-form-urlencodedx` or one with no `;` before its charset).
    let whole = value.as_bytes().trim_ascii_start();
    if !whole
        .get(..FORM.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(FORM))
    {
        return Ok(false);
    }
    let mut parts = whole.split(|&b| b == b';');
    let media = parts.next().unwrap_or_default().trim_ascii();
    // Each parameter `charset=utf-8` (any case, quoted or not); an empty one (`;;`) is none.
    let charset_ok = parts.all(|param| match media_parameter(param) {
        Some((name, value)) => {
            name.eq_ignore_ascii_case(b"charset") && value.eq_ignore_ascii_case(b"utf-8")
        }
        None => param.trim_ascii().is_empty(),
    });
    if media != FORM || !charset_ok {
        return Err(
            "A form's Content-Type must be application/x-www-form-urlencoded, in lower case, \
             with no parameter but charset=utf-8: FHIR servers differ on reading any other",
        );
    }
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Err(
            "A form must come without Content-Encoding: some FHIR servers read no form with one",
        );
    }
    Ok(true)
}

/// Why a batch's body cannot be read here as the FHIR server reads it, if it cannot: a
/// `Content-Encoding` other than `identity`, or a `charset` other than UTF-8 (HAPI decodes a
/// body in the charset its `Content-Type` names: UTF-16 would be read there, not here).
fn unreadable_batch(headers: &http::HeaderMap) -> Option<&'static str> {
    let coded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| {
            !value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"identity")
        });
    if coded {
        return Some("A batch or transaction must come without Content-Encoding to be checked");
    }
    let other_charset = headers.get_all(header::CONTENT_TYPE).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b';')
            .skip(1)
            .filter_map(media_parameter)
            .any(|(name, value)| {
                name.eq_ignore_ascii_case(b"charset") && !value.eq_ignore_ascii_case(b"utf-8")
            })
    });
    other_charset.then_some("A batch or transaction must be in UTF-8 to be checked")
}

/// A media type parameter (what stands between two `;`): its name and its value, trimmed and
/// unquoted; `None` without an `=`.
fn media_parameter(param: &[u8]) -> Option<(&[u8], &[u8])> {
    let param = param.trim_ascii();
    let at = param.iter().position(|&b| b == b'=')?;
    let (name, value) = (param[..at].trim_ascii(), param[at + 1..].trim_ascii());
    let value = value
        .strip_prefix(b"\"")
        .and_then(|value| value.strip_suffix(b"\""))
        .unwrap_or(value);
    Some((name, value))
}

/// `400` (`invalid_request`, RFC 6750 §3.1: a token sent in more than one way) for a form
/// holding an `access_token` parameter (in any spelling a server reads as one): the form goes
/// to the FHIR server as sent, so the token would reach it and its logs, as one in the query
/// string would (which the bearer layer refuses, with the same code and outcome).
fn form_token() -> Response<Bytes> {
    let mut response = OperationOutcome::error(
        IssueType::Invalid,
        "An access token in a form body is not accepted: it would be forwarded to the FHIR \
         server and its logs. Send it in an Authorization: Bearer header only",
    )
    .to_response(StatusCode::BAD_REQUEST);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_request\""),
    );
    // (The bearer layer's outcome for a token in the query string.)
    response
        .extensions_mut()
        .insert(crate::outcome::Refusal("invalid_request"));
    response
}

/// `415` for a form sent with a method FHIR never sends one with (`PUT`, `PATCH`, `DELETE`):
/// some servers read such a body as request parameters all the same (Spring's form content
/// filter, Jetty for `PUT`), which a FHIR server would then take as the request's (a
/// `_cascade=delete` for a `DELETE`, an `access_token`), unchecked here.
fn form_not_posted() -> Response<Bytes> {
    OperationOutcome::error(
        IssueType::NotSupported,
        "A form body is only taken with POST (a _search, an operation's parameters): some \
         servers read one sent with PUT, PATCH or DELETE as the request's parameters",
    )
    .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE)
}

/// `415`: a `_search` body that is not a form, whose parameters the FHIR server would not
/// read as the ones checked.
fn not_a_form() -> Response<Bytes> {
    OperationOutcome::error(
        IssueType::NotSupported,
        "A _search body must be application/x-www-form-urlencoded: its parameters are what \
         the token's scopes are checked against",
    )
    .to_response(StatusCode::UNSUPPORTED_MEDIA_TYPE)
}

/// A refusal, answered at once.
fn refused<F, B: 'static, E: 'static>(response: Response<Bytes>) -> ResponseFuture<F, B, E> {
    PassOrOwn::own(async move { Ok(response.map(ResponseBody::full)) })
}

/// 403 with an OperationOutcome (`forbidden`) and `WWW-Authenticate: Bearer
/// error="insufficient_scope", scope="<what would have sufficed>"` (RFC 6750 §3.1).
fn insufficient_scope(why: &Refused) -> Response<Bytes> {
    if why.malformed {
        // Not a scope the token lacks: no challenge.
        return OperationOutcome::error(IssueType::Invalid, why.diagnostics.as_str())
            .to_response(StatusCode::BAD_REQUEST);
    }
    let mut response = OperationOutcome::error(IssueType::Forbidden, why.diagnostics.as_str())
        .to_response(StatusCode::FORBIDDEN);
    let mut challenge = String::from("Bearer error=\"insufficient_scope\"");
    if !why.sufficient.is_empty() {
        challenge.push_str(", scope=\"");
        challenge.push_str(&why.sufficient.join(" "));
        challenge.push('"');
    }
    // Scopes are printable ASCII without `"` or `\` once parsed; anything else is left out.
    let value = HeaderValue::from_str(&challenge)
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"insufficient_scope\""));
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, value);
    response
}

pin_project! {
    /// The request body [`SmartScopes`] hands on: the client's, untouched, or (after the layer
    /// read it to check a Bundle or a `_search` form) the same bytes again.
    pub struct ScopedBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passed { #[pin] body: B },
        Buffered { body: Full<Bytes>, held: Option<OwnedSemaphorePermit> },
    }
}

impl<B> ScopedBody<B> {
    /// The client's body, as it is.
    pub fn passed(body: B) -> Self {
        Self {
            kind: Kind::Passed { body },
        }
    }

    /// A body read whole.
    pub fn buffered(bytes: Bytes) -> Self {
        Self::held(bytes, None)
    }

    /// A body read whole, holding its share of the layer's budget until it is dropped.
    fn held(bytes: Bytes, held: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            kind: Kind::Buffered {
                body: Full::new(bytes),
                held,
            },
        }
    }
}

impl<B> fmt::Debug for ScopedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedBody").finish_non_exhaustive()
    }
}

impl<B> Body for ScopedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Passed { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Buffered { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passed { body } => body.is_end_stream(),
            Kind::Buffered { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passed { body } => body.size_hint(),
            Kind::Buffered { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_resource_is_read_as_the_server_reads_its_type() {
        let grants = Grants::from_scopes(["system/Observation.cu"], None);
        let written =
            |body: &[u8], format| written_resource(&grants, body, Some("Observation"), format);
        let json = ResourceFormat::Json;
        assert!(written(br#"{"resourceType": "Observation"}"#, json).is_ok());
        let other = written(br#"{"resourceType": "Patient"}"#, json);
        assert!(
            !other.unwrap_err().malformed,
            "another type: a scope matter, 403"
        );
        for malformed in [
            &br#"{"resourceType": "Observation", "resourceType": "Patient"}"#[..],
            b"{\"resourceType\": 1}",
            b"[]",
            b"not json",
        ] {
            let refused = written(malformed, json).unwrap_err();
            assert!(refused.malformed, "{}", String::from_utf8_lossy(malformed));
        }
        assert!(written(b"  ", json).is_ok(), "empty: the server's");
        let xml = ResourceFormat::Xml;
        for good in [
            &b"<Observation xmlns=\"http://hl7.org/fhir\"/>"[..],
            b"\xEF\xBB\xBF<?xml version=\"1.0\"?>\n<!-- a comment --><f:Observation xmlns:f=\"http://hl7.org/fhir\">",
        ] {
            assert!(written(good, xml).is_ok());
        }
        assert!(!written(b"<Patient/>", xml).unwrap_err().malformed);
        for malformed in [
            &b"<!DOCTYPE x [<!ENTITY e \"Patient\">]><Observation/>"[..],
            b"<?xml version=\"1.0\"",
            b"<>",
        ] {
            assert!(written(malformed, xml).unwrap_err().malformed);
        }
        // A conditional reference: in JSON checked as the search it is; in XML refused.
        let referring =
            br#"{"resourceType": "Observation", "subject": {"reference": "Patient?name=x"}}"#;
        assert!(written(referring, json).is_err());
        // In XML however it is spelt: a character reference, a `>` in another attribute, a
        // prefix; and not for `reference` in text or another element's name.
        for referring in [
            &b"<Observation><subject><reference value=\"Patient?name=x\"/></subject></Observation>"[..],
            b"<Observation><subject><reference value=\"Patient&#63;name=x\"/></subject></Observation>",
            b"<Observation><subject><reference id=\">\" value=\"Patient?name=x\"/></subject></Observation>",
            b"<f:Observation><f:subject><f:reference value='Patient?name=x'/></f:subject></f:Observation>",
        ] {
            let refused = written(referring, xml).unwrap_err();
            assert!(refused.malformed, "{}", String::from_utf8_lossy(referring));
        }
        for plain in [
            &b"<Observation><text value=\"a reference? none\"/></Observation>"[..],
            b"<Observation><subject><reference value=\"Patient/1\"/></subject><url value=\"http://x/reference?x=1\"/></Observation>",
            b"<Observation><referenceRange><text value=\"what?\"/></referenceRange></Observation>",
        ] {
            assert!(written(plain, xml).is_ok(), "{}", String::from_utf8_lossy(plain));
        }
        // A patch has no type; its references count.
        let patch = br#"[{"op": "add", "path": "/subject", "value": {"reference": "Patient?identifier=x"}}]"#;
        assert!(written_resource(&grants, patch, None, json).is_err());
        let plain_patch = br#"[{"op": "replace", "path": "/status", "value": "final"}]"#;
        assert!(written_resource(&grants, plain_patch, None, json).is_ok());
        // Nor only under a `reference` key: a JSON Patch's string value, a FHIRPath Patch's
        // `valueString`, set a reference the server resolves all the same.
        for patch in [
            &br#"[{"op": "replace", "path": "/subject/reference", "value": "Patient?identifier=x"}]"#[..],
            br#"{"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Observation.subject.reference"},
                {"name": "value", "valueString": "Patient?identifier=x"}]}]}"#,
        ] {
            assert!(
                written_resource(&grants, patch, None, json).is_err(),
                "{}",
                String::from_utf8_lossy(patch)
            );
        }
        // Only where a reference goes: text elsewhere is text, however it reads.
        for text in [
            "worse? no",
            "Pain? none",
            "Fever?",
            "https://cdn/Reports/Scan1?sig=x",
        ] {
            let patch =
                serde_json::json!([{"op": "replace", "path": "/note/0/text", "value": text}]);
            assert!(
                written_resource(&grants, patch.to_string().as_bytes(), None, json).is_ok(),
                "{text}"
            );
            let fhirpath = serde_json::json!({"resourceType": "Parameters", "parameter": [
                {"name": "operation", "part": [
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Observation.note.text"},
                    {"name": "value", "valueString": text}]}]});
            assert!(
                written_resource(&grants, fhirpath.to_string().as_bytes(), None, json).is_ok(),
                "{text}"
            );
        }
        // A FHIRPath Patch adding the reference by its name.
        let added =
            br#"{"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Observation.subject"},
            {"name": "name", "valueString": "reference"},
            {"name": "value", "valueString": "Patient?identifier=x"}]}]}"#;
        assert!(written_resource(&grants, added, None, json).is_err());
        // As HAPI reads a reference: the type after the last `/` before the `?` (refused, as
        // only `[type]?...` can be checked); a URL whose last segment is no type is text.
        for value in [
            "Patient/?identifier=x",
            "http://ehr/fhir/Patient?identifier=x",
        ] {
            let patch = serde_json::json!([{"op": "replace", "path": "/subject/reference", "value": value}]);
            let refused =
                written_resource(&grants, patch.to_string().as_bytes(), None, json).unwrap_err();
            assert!(refused.malformed, "{value}: {}", refused.diagnostics);
        }
        let link =
            br#"[{"op": "add", "path": "/note/0/text", "value": "see http://x.org/page?a=1"}]"#;
        assert!(written_resource(&grants, link, None, json).is_ok());
        // A copy or move into a reference takes a value the patch does not hold: refused.
        for (op, path) in [
            ("copy", "/subject/reference"),
            ("move", "/performer/0/reference"),
        ] {
            let patch = serde_json::json!([{"op": op, "from": "/note/0/text", "path": path}]);
            let refused =
                written_resource(&grants, patch.to_string().as_bytes(), None, json).unwrap_err();
            assert!(refused.malformed, "{op} {path}");
        }
        for copy in [
            &br#"[{"op": "copy", "from": "/note/0", "path": "/note/1"}]"#[..],
            br#"[{"op": "copy", "from": "/identifier/0", "path": "/identifier/-"}]"#,
        ] {
            assert!(written_resource(&grants, copy, None, json).is_ok());
        }
        // In XML, any `?` (or a character reference) in a patch: send it as JSON.
        let xml_patch = b"<Parameters><parameter><part><valueString value=\"Patient?identifier=x\"/></part></parameter></Parameters>";
        assert!(
            written_resource(&grants, xml_patch, None, xml)
                .unwrap_err()
                .malformed
        );
        let plain_xml_patch = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- a patch? -->\n<Parameters><parameter><part><valueCode value=\"final\"/></part></parameter></Parameters>";
        assert!(written_resource(&grants, plain_xml_patch, None, xml).is_ok());
        // One a server would read otherwise: UTF-16 (its `?` is no `?` byte), entities.
        let utf16: Vec<u8> =
            "<Parameters><valueString value=\"Patient?identifier=x\"/></Parameters>"
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect();
        let doctype = b"<!DOCTYPE Parameters [<!ENTITY q \"Patient\">]><Parameters><valueString value=\"&q;\"/></Parameters>";
        for unreadable in [&utf16[..], doctype] {
            assert!(
                written_resource(&grants, unreadable, None, xml)
                    .unwrap_err()
                    .malformed
            );
        }
        // No `Content-Type`: as the first byte says.
        let untyped = ResourceFormat::Untyped;
        assert!(written(b"<Observation/>", untyped).is_ok());
        assert!(written(br#"{"resourceType":"Patient"}"#, untyped).is_err());
    }

    #[test]
    fn resource_formats_are_told_by_their_media_types() {
        use ResourceFormat::{Json, Xml};
        for (value, format) in [
            ("application/fhir+json", Some((Json, true))),
            ("application/json; charset=utf-8", Some((Json, false))),
            ("application/json+fhir", Some((Json, true))),
            ("application/json-patch+json", Some((Json, false))),
            ("Application/FHIR+XML", Some((Xml, true))),
            ("application/xml+fhir", Some((Xml, true))),
            ("text/xml", Some((Xml, false))),
            ("text/plain", None),
            ("image/png", None),
            ("application/fhir+turtle", None),
        ] {
            assert_eq!(
                format_of(&HeaderValue::from_static(value)),
                format,
                "{value}"
            );
        }
    }

    #[test]
    fn strict_handling_replaces_the_clients_and_keeps_its_other_preferences() {
        let strict = |sent: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in sent {
                headers.append(PREFER, HeaderValue::from_str(value).unwrap());
            }
            prefer_strict(&mut headers);
            let all: Vec<_> = headers.get_all(PREFER).iter().collect();
            assert_eq!(all.len(), 1, "{sent:?}");
            all[0].to_str().unwrap().to_owned()
        };
        assert_eq!(strict(&[]), "handling=strict");
        assert_eq!(strict(&["handling=lenient"]), "handling=strict");
        assert_eq!(
            strict(&["return=minimal, Handling = lenient", "respond-async"]),
            "handling=strict, return=minimal, respond-async"
        );
        assert_eq!(
            strict(&["handling=strict; x=1,return=representation"]),
            "handling=strict, return=representation"
        );
        // A `handling` hidden as a parameter of another preference goes too.
        assert_eq!(
            strict(&["return=minimal; handling=lenient", "respond-async"]),
            "handling=strict, respond-async"
        );
    }
    use http_body_util::channel::Channel;
    use std::convert::Infallible;
    use tower::ServiceExt;

    const BUNDLE: &str = r#"{"resourceType":"Bundle","type":"batch"}"#;

    fn request<B>(body: B) -> Request<B> {
        let claims = serde_json::json!({"scope": "system/Patient.crus", "exp": 4_000_000_000u64});
        let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
        let mut request = Request::post("/")
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .body(body)
            .unwrap();
        request.extensions_mut().insert(claims);
        request
    }

    /// Waits until `budget` has `free` permits or fewer.
    async fn until_held(budget: &Semaphore, free: usize) {
        let held = async {
            while budget.available_permits() > free {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), held)
            .await
            .expect("the body's part is not held");
    }

    #[tokio::test]
    async fn bodies_held_at_once_stay_within_the_budget_and_the_rest_get_503() {
        let total = BUNDLE.len() + 10;
        let layer = SmartScopeLayer::builder()
            .max_buffered_body(BUNDLE.len())
            .max_buffered_total(total)
            .build()
            .unwrap();
        let budget = &layer.config.buffered;
        // The inner services read the body they are given whole, then answer with it.
        let streamed = layer.layer(tower::service_fn(
            |request: Request<ScopedBody<Channel<Bytes, Infallible>>>| async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            },
        ));
        let whole_bodies = layer.layer(tower::service_fn(
            |request: Request<ScopedBody<Full<Bytes>>>| async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            },
        ));

        // One Bundle arrives in part and waits for the rest: its part is held.
        let (mut sender, body) = Channel::<Bytes, Infallible>::new(1);
        let first = tokio::spawn(streamed.clone().oneshot(request(body)));
        sender
            .send_data(Bytes::from_static(&BUNDLE.as_bytes()[..20]))
            .await
            .unwrap();
        until_held(budget, total - 20).await;

        // Another whole Bundle, its length known, would take the total past the budget: 503
        // before it is read, not forwarded.
        let whole = Full::new(Bytes::from_static(BUNDLE.as_bytes()));
        let refused = whole_bodies.clone().oneshot(request(whole)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
        // One of unknown length is refused at the frame that does not fit, and lets go what
        // it held.
        let (mut partial, body) = Channel::<Bytes, Infallible>::new(1);
        let second = tokio::spawn(streamed.clone().oneshot(request(body)));
        partial
            .send_data(Bytes::from_static(b"{\"re"))
            .await
            .unwrap();
        let _ = partial
            .send_data(Bytes::from_static(&BUNDLE.as_bytes()[4..]))
            .await;
        let refused = second.await.unwrap().unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(partial);
        until_held(budget, total - 20).await;
        assert!(budget.available_permits() >= total - 20);

        // The first one ends, is checked and forwarded whole; its share is let go.
        sender
            .send_data(Bytes::from_static(&BUNDLE.as_bytes()[20..]))
            .await
            .unwrap();
        drop(sender);
        let answered = first.await.unwrap().unwrap();
        assert_eq!(answered.status(), StatusCode::OK);
        let echoed = answered.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed, BUNDLE.as_bytes());
        assert_eq!(budget.available_permits(), total);
        let whole = Full::new(Bytes::from_static(BUNDLE.as_bytes()));
        let again = whole_bodies.oneshot(request(whole)).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(budget.available_permits(), total);
    }

    #[test]
    fn a_budget_below_one_body_is_refused() {
        let refused = SmartScopeLayer::builder()
            .max_buffered_body(100)
            .max_buffered_total(99)
            .build()
            .unwrap_err();
        assert_eq!(refused, ConfigError::TotalBelowBody);
    }
}
