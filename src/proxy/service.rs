//! `FhirProxy`: its configuration, and the service that forwards a routed request to its
//! upstream (the target, headers, transport and response relay each in a file of their own).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;

use super::body::ProxyBody;
use super::deadline::{wait, Turns, Waited, Watched};
use super::headers::{only_chunked, prepare_request_headers, unforwardable, HeaderPolicy};
use super::path::{absolute, upstream_path};
use super::response::{relay_response, Rewriting};
use super::rewrite::BaseRewriter;
use super::slots::Slots;
use super::transport::Transport;
use crate::client_addr::ClientAddr;
use crate::ops::BodyFailure;
use crate::outcome::{IssueType, OperationOutcome};
use crate::route::{Upstream, UpstreamBase};
use crate::tenant::TenantId;
use crate::version::dstu2::{asked_form, request_to_dstu2, response_from_dstu2, AskedForm};
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The innermost service of the gateway: sends each request to the [`Upstream`] the routing
/// layer put in its extensions, and the response back.
///
/// Cheap to clone; clones share one connection pool.
#[derive(Clone)]
pub struct FhirProxy {
    // One `Arc`: the outer layers clone their inner service per request.
    config: Arc<Config>,
}

struct Config {
    transport: Transport,
    public_base: Arc<str>,
    headers: HeaderPolicy,
    timeout: Duration,
    rewrite_limit: usize,
    /// The bytes of response bodies read whole (to rewrite their links) held at once, all
    /// requests together, until each body is sent.
    rewrite_budget: Arc<tokio::sync::Semaphore>,
    slots: Slots,
    /// `tower_fhir_upstream_duration_seconds`, taken from the recorder once (when the proxy is
    /// built), so an answer costs a record, not a registry lookup.
    upstream_duration: metrics::Histogram,
}

impl FhirProxy {
    /// Starts configuring a proxy whose clients know the gateway as `public_base_url` (say
    /// `https://gateway.example/fhir`): upstream URLs in responses are rewritten to it.
    pub fn builder(public_base_url: impl Into<String>) -> FhirProxyBuilder {
        FhirProxyBuilder {
            public_base_url: public_base_url.into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            rewrite_limit: 4 * 1024 * 1024,
            rewrite_budget: DEFAULT_REWRITE_BUDGET,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: DEFAULT_POOL_MAX_IDLE,
            root_certificates: Vec::new(),
            trust_forwarded: false,
            forward_headers: Vec::new(),
        }
    }
}

impl fmt::Debug for FhirProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FhirProxy")
            .field("public_base", &self.config.public_base)
            .field("timeout", &self.config.timeout)
            .field("rewrite_limit", &self.config.rewrite_limit)
            .finish_non_exhaustive()
    }
}

/// A configuration the proxy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The public base URL is not an absolute `http`/`https` URL without query.
    InvalidPublicBase(String),
    /// A duration that must be positive is zero.
    ZeroDuration(&'static str),
    /// The TLS configuration (root certificates) is unusable, or TLS is not compiled in.
    Tls(String),
    /// A header given to [`forward_request_header`](FhirProxyBuilder::forward_request_header)
    /// is not a header name, or one the proxy writes itself or has its own rule for.
    RequestHeader {
        /// The name as given.
        name: String,
        /// Why it cannot be forwarded by configuration.
        reason: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPublicBase(url) => write!(
                f,
                "invalid public base URL {url:?}: an absolute http:// or https:// URL with no credentials, query or fragment"
            ),
            Self::ZeroDuration(what) => write!(f, "{what} must be longer than zero"),
            Self::Tls(why) => write!(f, "TLS: {why}"),
            Self::RequestHeader { name, reason } => {
                write!(
                    f,
                    "the request header {name:?} cannot be forwarded: {reason}"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Configures a [`FhirProxy`].
#[derive(Debug, Clone)]
#[must_use]
pub struct FhirProxyBuilder {
    public_base_url: String,
    timeout: Duration,
    connect_timeout: Duration,
    rewrite_limit: usize,
    rewrite_budget: usize,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
    root_certificates: Vec<Vec<u8>>,
    trust_forwarded: bool,
    forward_headers: Vec<String>,
}

impl FhirProxyBuilder {
    /// Also forwards this request header to upstreams (any case; checked by
    /// [`build`](Self::build)).
    ///
    /// By default only the headers FHIR clients need cross, listed with the reason for each in
    /// [`FORWARDED_REQUEST_HEADERS`](super::FORWARDED_REQUEST_HEADERS); every other header a
    /// client sends is dropped (`Cookie`, `X-HTTP-Method-Override`, `X-Original-URL`,
    /// `Accept-Encoding`, ...). Name here what an upstream of yours needs besides (an API key
    /// header the client sends, `Range`, `Accept-Encoding` if you accept that compressed
    /// Bundles keep the upstream's URLs). The proxy refuses, with
    /// [`ConfigError::RequestHeader`], what it writes itself (`Host`, `Authorization`,
    /// `X-Forwarded-Host`/`-Proto`), hop-by-hop headers, the forwarding chain (that is
    /// [`trust_forwarded_headers`](Self::trust_forwarded_headers)) and `Cookie` (that is
    /// per upstream: [`Upstream::with_set_cookie_allowed`](crate::route::Upstream::with_set_cookie_allowed)).
    ///
    /// ```
    /// let proxy = tower_fhir::proxy::FhirProxy::builder("https://gateway.example")
    ///     .forward_request_header("X-Api-Key")
    ///     .build()
    ///     .unwrap();
    /// # drop(proxy);
    /// assert!(tower_fhir::proxy::FhirProxy::builder("https://gateway.example")
    ///     .forward_request_header("cookie")
    ///     .build()
    ///     .is_err());
    /// ```
    pub fn forward_request_header(mut self, name: impl Into<String>) -> Self {
        self.forward_headers.push(name.into());
        self
    }

    /// Whether the `Forwarded` and `X-Forwarded-For` headers a request arrives with are
    /// believed: `true` extends them with the connection's address (the gateway sits behind a
    /// load balancer or proxy of yours that sets them); `false` (the default, for a gateway
    /// clients reach directly) drops them and starts new ones, so a client cannot name another
    /// origin to the upstream. `X-Forwarded-Proto`, `X-Forwarded-Host` and the `proto=` and
    /// `host=` of the proxy's own `Forwarded` element are always the public base URL's, never
    /// the client's `Host`. (`X-Real-IP` and `X-Forwarded-Port`/`-Prefix`/`-Server` follow
    /// the same rule as the chains: kept when trusted, dropped otherwise.)
    ///
    /// ```
    /// let proxy = tower_fhir::proxy::FhirProxy::builder("https://gateway.example")
    ///     .trust_forwarded_headers(true)
    ///     .build()
    ///     .unwrap();
    /// # drop(proxy);
    /// ```
    pub fn trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.trust_forwarded = trust;
        self
    }

    /// Also trusts these PEM root certificates for `https://` upstreams (a hospital's private
    /// CA). Needs the `tls` feature. [`build`](Self::build) fails on a PEM document that is
    /// broken or holds no certificate.
    pub fn root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// How long an upstream may take to answer (its response head) before the gateway
    /// answers 504, unless the upstream has its own timeout. Default 30 s.
    ///
    /// The time runs from when the request was sent whole: while a request body is still
    /// arriving from the client, only the upstream's own delays count (a frame handed over and
    /// not taken). A body that sends nothing for this long is the client's fault: `408` with
    /// an OperationOutcome (`timeout`) and `Connection: close`, the upstream left with an
    /// unfinished request. (A [`BodyTimeoutLayer`](crate::ops::BodyTimeoutLayer) in front
    /// bounds such pauses separately, and for every service.)
    ///
    /// It also bounds the upstream's pauses within its response body. A JSON body read whole
    /// (to rewrite its links) that stops coming for this long is `504`, one that breaks off
    /// `502`, each with an OperationOutcome: nothing of the response has reached the client,
    /// and a cut body never passes for the whole. A streamed body that stops coming ends with
    /// an [`UpstreamStalled`](super::UpstreamStalled) error, which closes the client's
    /// connection (a chunked body is never ended as if whole).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long connecting to an upstream may take. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest JSON Bundle whose links are rewritten; larger bodies stream through
    /// untouched. Default 4 MiB.
    pub fn rewrite_limit(mut self, bytes: usize) -> Self {
        self.rewrite_limit = bytes;
        self
    }

    /// The most bytes of response bodies read whole to rewrite their links (JSON up to
    /// [`rewrite_limit`](Self::rewrite_limit)) that are held at once, all requests together,
    /// each until its client has taken it, so clients that ask for large searches and do not
    /// read the answers cannot fill the memory. The answer to a `GET`, `HEAD` or `OPTIONS`
    /// that would pass it gets `503` with `Retry-After: 1` and an OperationOutcome
    /// (`transient`) instead of being held (asking again changes nothing upstream). Any other
    /// request has been acted on upstream (a create, a transaction): its answer, while it holds
    /// none of the budget, looks for room for up to a second (the upstream's timeout when
    /// shorter), then streams through with its links as the upstream wrote them, logged at
    /// `warn`, rather than tell the client to send again what was done. Default
    /// [`DEFAULT_REWRITE_BUDGET`] (256 MiB); at least the rewrite limit.
    pub fn rewrite_budget(mut self, bytes: usize) -> Self {
        self.rewrite_budget = bytes;
        self
    }

    /// How long an idle pooled connection to an upstream is kept. Default 90 s.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// The most idle connections kept to plain-HTTP HTTP/1.1 upstreams, every upstream and
    /// tenant together (each tenant has connections of its own, so many tenants on one server
    /// would otherwise hold many idle sockets each, and the gateway's file descriptors with
    /// them); beyond it, a connection whose exchange ends is closed rather than kept, until
    /// the idle timeout makes room. HTTPS and h2c upstreams keep at most this many per tenant
    /// and host. `0` keeps none (a connection a request). Default [`DEFAULT_POOL_MAX_IDLE`].
    pub fn pool_max_idle(mut self, connections: usize) -> Self {
        self.pool_max_idle = connections;
        self
    }

    /// Checks the configuration and builds the proxy.
    pub fn build(self) -> Result<FhirProxy, ConfigError> {
        let public = UpstreamBase::parse(&self.public_base_url).map_err(|_| {
            ConfigError::InvalidPublicBase(
                crate::route::without_userinfo(&self.public_base_url).into_owned(),
            )
        })?;
        for (what, value) in [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
            ("pool_idle_timeout", self.pool_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(what));
            }
        }
        let transport = Transport::new(
            self.connect_timeout,
            self.pool_idle_timeout,
            self.pool_max_idle,
            &self.root_certificates,
        )
        .map_err(ConfigError::Tls)?;
        let mut extra = Vec::with_capacity(self.forward_headers.len());
        for name in &self.forward_headers {
            let refused = |reason| ConfigError::RequestHeader {
                name: name.clone(),
                reason,
            };
            let header = http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| refused("not a header name"))?;
            if let Some(reason) = unforwardable(&header) {
                return Err(refused(reason));
            }
            extra.push(header);
        }
        Ok(FhirProxy {
            config: Arc::new(Config {
                transport,
                public_base: Arc::clone(public.shared_text()),
                headers: HeaderPolicy::new(&public, self.trust_forwarded, extra),
                timeout: self.timeout,
                rewrite_limit: self.rewrite_limit,
                rewrite_budget: Arc::new(tokio::sync::Semaphore::new(
                    self.rewrite_budget
                        .max(self.rewrite_limit)
                        .min(tokio::sync::Semaphore::MAX_PERMITS),
                )),
                slots: Slots::new(),
                upstream_duration: metrics::histogram!("tower_fhir_upstream_duration_seconds"),
            }),
        })
    }
}

/// The default [`FhirProxyBuilder::rewrite_budget`]: 256 MiB.
pub const DEFAULT_REWRITE_BUDGET: usize = 256 * 1024 * 1024;

/// The default for [`FhirProxyBuilder::pool_max_idle`]: 512 idle upstream connections.
pub const DEFAULT_POOL_MAX_IDLE: usize = 512;

/// The methods forwarded, as an `Allow` header lists them.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A request body that could not reach the upstream as the client sent it: one under a
/// transfer coding besides `chunked` (`gzip, chunked`: hyper takes the chunks off and would
/// forward the compressed bytes with nothing saying so), `501` as RFC 9112 §6.1 has it; and
/// one on a GET or HEAD, which hyper's client sends without a chunked body (and with a
/// `Content-Length` one), so a GET's body would reach the upstream or not by how it was
/// framed: `400`. Over HTTP/2 a GET's stream may still end without a byte of body (an empty
/// DATA frame ending it, as some clients send): that is for the request's future to find out
/// ([`BodyCheck::MustEndEmpty`]). So too for a DELETE's or OPTIONS's stream declaring no
/// length ([`BodyCheck::MayEndEmpty`]), which goes bodiless when it ends empty, not as an
/// empty chunked body the client never sent.
fn unforwardable_body<B: Body>(request: &Request<B>) -> BodyCheck {
    let headers = request.headers();
    if !only_chunked(headers) {
        return BodyCheck::Refuse(Box::new(outcome(
            StatusCode::NOT_IMPLEMENTED,
            IssueType::NotSupported,
            "This gateway takes request bodies under no transfer coding but chunked, once",
        )));
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        if matches!(*request.method(), Method::DELETE | Method::OPTIONS)
            && request.version() == http::Version::HTTP_2
            && !headers.contains_key(http::header::CONTENT_LENGTH)
            && !request.body().is_end_stream()
        {
            return BodyCheck::MayEndEmpty;
        }
        return BodyCheck::Forward;
    }
    let chunked = headers.contains_key(http::header::TRANSFER_ENCODING);
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|length| length.as_bytes() != b"0");
    if chunked || declared {
        return BodyCheck::Refuse(Box::new(body_on_get()));
    }
    // Over HTTP/2 a body needs no header to come: DATA frames after a HEADERS frame that did
    // not end the stream.
    if request.version() == http::Version::HTTP_2 && !request.body().is_end_stream() {
        return BodyCheck::MustEndEmpty;
    }
    BodyCheck::Forward
}

/// What [`unforwardable_body`] found of a request's body.
enum BodyCheck {
    /// It goes to the upstream as it comes.
    Forward,
    /// This answer instead.
    Refuse(Box<Response<ProxyBody>>),
    /// A GET's or HEAD's HTTP/2 stream still open: it goes bodiless if the stream ends with
    /// nothing in it ([`first_frame`]), else [`body_on_get`].
    MustEndEmpty,
    /// A DELETE's or OPTIONS's HTTP/2 stream still open with no length declared: it goes
    /// bodiless if the stream ends with nothing in it, else as it comes.
    MayEndEmpty,
}

fn body_on_get() -> Response<ProxyBody> {
    outcome(
        StatusCode::BAD_REQUEST,
        IssueType::Invalid,
        "A GET or HEAD request has no body in FHIR: send the search parameters in the query, \
         or POST them to _search",
    )
}

/// How long a request body must have been waiting on the client, with nothing to hand over,
/// for an upstream that then closes the exchange unanswered to have given up waiting for the
/// rest (Tomcat does after 20 s, for one): the client's doing, `408`, not `502`. Shorter
/// waits are a client between two chunks, and the upstream's failure is its own.
const CLIENT_STALL: Duration = Duration::from_secs(2);

/// Whether `error` says the upstream closed or reset the connection before answering (what
/// a server that gave up on a request body does), rather than answering something unreadable
/// or failing otherwise.
pub(super) fn closed_unanswered(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        current = error.source();
    }
    false
}

/// Reads `body` up to its first frame with something in it, within `wait`: `Ok(None)` when
/// the stream ends first (empty DATA frames at most), else the body with that frame put back
/// in front. `Err` is the answer when it does not come in time (`408`, as any body that keeps
/// the gateway waiting) or the body fails as it is read.
async fn first_frame<B>(
    body: B,
    wait: Duration,
) -> Result<Option<Prepended<B>>, Response<ProxyBody>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let read = async {
        let mut body = Box::pin(body);
        loop {
            match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                None => return Ok(None),
                Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                Some(Ok(frame)) => {
                    return Ok(Some(Prepended {
                        first: Some(frame),
                        rest: body,
                    }))
                }
                Some(Err(error)) => {
                    let error = error.into();
                    let failure = BodyFailure::of(&*error).unwrap_or(BodyFailure::Broken);
                    return Err(failure.answer(None).map(ProxyBody::full));
                }
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(read) => read,
        Err(_) => {
            tracing::info!(
                ?wait,
                "an HTTP/2 stream that may carry no body neither ended nor sent anything for the upstream's timeout"
            );
            Err(BodyFailure::TooSlow.answer(None).map(ProxyBody::full))
        }
    }
}

/// A request body whose first frame [`first_frame`] read ahead, handed out again first.
struct Prepended<B> {
    first: Option<http_body::Frame<Bytes>>,
    rest: Pin<Box<B>>,
}

impl<B> Body for Prepended<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.rest
            .as_mut()
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// Whether FHIR (or a CORS preflight) uses `method`. `TRACE`, `CONNECT` and made-up methods
/// are answered here: an upstream or a proxy behind it might honour them.
fn is_fhir_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

/// The response future of [`FhirProxy`].
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl<B> Service<Request<B>> for FhirProxy
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The client queues or opens connections per request: always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(upstream) = request.extensions().get::<Upstream>().cloned() else {
            let why = if request
                .extensions()
                .get::<crate::route::InProcessTenant>()
                .is_some()
            {
                "The tenant is served in-process, by another service than this proxy"
            } else {
                "No upstream was chosen for this request"
            };
            return ready(outcome(StatusCode::BAD_GATEWAY, IssueType::Exception, why));
        };
        if !is_fhir_method(request.method()) {
            let mut response = outcome(
                StatusCode::METHOD_NOT_ALLOWED,
                IssueType::NotSupported,
                "FHIR uses GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS only",
            );
            response.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static(ALLOWED_METHODS),
            );
            return ready(response);
        }
        let check = unforwardable_body(&request);
        let (open, may_carry) = match check {
            BodyCheck::Forward => (false, true),
            BodyCheck::Refuse(refusal) => return ready(*refusal),
            BodyCheck::MustEndEmpty => (true, false),
            BodyCheck::MayEndEmpty => (true, true),
        };
        #[cfg(not(feature = "tls"))]
        if *upstream.base().scheme() == http::uri::Scheme::HTTPS {
            tracing::warn!(upstream = %upstream.base(), "an https:// upstream, and this build has no TLS client (tower-fhir's `tls` feature): 502");
            return ready(outcome(
                StatusCode::BAD_GATEWAY,
                IssueType::Exception,
                "The tenant's FHIR server is reached by https://, which this gateway was built \
                 without (tower-fhir's `tls` feature)",
            ));
        }
        // Plain-HTTP HTTP/1.1 upstreams take the proxy's own pool and an origin-form target;
        // the others hyper-util's client and an absolute one.
        let pooled = Transport::pooled(&upstream);
        let uri = match upstream_path(upstream.base(), request.uri()).and_then(|path| {
            if pooled {
                Ok(Uri::from(path))
            } else {
                absolute(upstream.base(), path)
            }
        }) {
            Ok(uri) => uri,
            Err(unsafe_path) => {
                return ready(outcome(
                    StatusCode::BAD_REQUEST,
                    IssueType::Invalid,
                    unsafe_path.0,
                ))
            }
        };
        let client_addr = ClientAddr::of(request.extensions());
        // Whose request: the pool's connections carry one tenant's requests each.
        let tenant = request.extensions().get::<TenantId>().copied();
        let (mut parts, body) = request.into_parts();
        // Some DSTU2 servers answer 406 to the STU3+ media types: speak theirs, and answer the
        // client in the form it asked for.
        let dstu2 = upstream.fhir_version() == FhirVersion::Dstu2;
        let client_wants = if dstu2 {
            asked_form(&parts.headers)
        } else {
            AskedForm::Upstreams
        };
        if dstu2 {
            request_to_dstu2(&mut parts.headers);
        }
        prepare_request_headers(
            &mut parts.headers,
            &upstream,
            client_addr,
            &self.config.headers,
        );
        parts.uri = uri;
        parts.version = if upstream.http2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        parts.extensions = http::Extensions::new();
        // An open HTTP/2 stream that may carry no body goes bodiless once it is seen to end
        // empty.
        let (body, open_stream) = if open {
            (None, Some(body))
        } else {
            (Some(body), None)
        };
        // A body still to come is watched, so that the upstream's time starts once it is sent.
        let turns = body
            .as_ref()
            .is_some_and(|body| !body.is_end_stream())
            .then(Turns::new);
        let body = match (body, &turns) {
            (None, _) => http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
            (Some(body), None) => body.map_err(Into::into).boxed_unsync(),
            (Some(body), Some(turns)) => Watched::boxed(body, Arc::clone(turns)).boxed_unsync(),
        };
        // A HEAD's answer declares a length it does not send.
        let head = parts.method == Method::HEAD;
        // A method whose answer may be refused after the upstream has acted on it: safe ones.
        let retry_safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let mut outgoing = Request::from_parts(parts, body);

        let config = Arc::clone(&self.config);
        let timeout = upstream.timeout().unwrap_or(config.timeout);
        Box::pin(async move {
            let mut turns = turns;
            if let Some(open_stream) = open_stream {
                match first_frame(open_stream, timeout).await {
                    Ok(None) => {}
                    Ok(Some(_)) if !may_carry => return Ok(body_on_get()),
                    Ok(Some(body)) => {
                        let watching = Turns::new();
                        *outgoing.body_mut() =
                            Watched::boxed(body, Arc::clone(&watching)).boxed_unsync();
                        turns = Some(watching);
                    }
                    Err(answer) => return Ok(answer),
                }
            }
            let Ok(slot) = config.slots.acquire(&upstream, timeout).await else {
                return Ok(busy(&upstream));
            };
            // A safe request with no body may go out again if the connection it went out on
            // closes unanswered.
            let replayable = retry_safe && outgoing.body().is_end_stream();
            let started = std::time::Instant::now();
            let sent = config
                .transport
                .send(&upstream, pooled, tenant, outgoing, replayable);
            let waited = match &turns {
                None => match tokio::time::timeout(timeout, sent).await {
                    Ok(answered) => Waited::Answered(answered),
                    Err(_) => Waited::UpstreamTooSlow,
                },
                Some(turns) => wait(sent, timeout, turns).await,
            };
            let response = match waited {
                Waited::Answered(Ok(response)) => {
                    config
                        .upstream_duration
                        .record(started.elapsed().as_secs_f64());
                    response
                }
                Waited::Answered(Err(error)) => {
                    // A body that failed while it was streamed left the upstream an unfinished
                    // request, and the client gets the body's answer. (Over HTTP/2 the
                    // connection reports only a reset stream: the body's own record says why.)
                    let failure = BodyFailure::of(&*error).or_else(|| turns.as_ref()?.failure());
                    if failure.is_none() {
                        // The upstream's failure (closed, reset, refused), as long as it took.
                        config
                            .upstream_duration
                            .record(started.elapsed().as_secs_f64());
                    }
                    // An upstream that closed the exchange while the body had long been waiting
                    // on the client gave up waiting for it (its own body timeout is shorter
                    // than ours): the client's doing, as when our timeout ends the wait.
                    let stalled = failure.is_none()
                        && closed_unanswered(&*error)
                        && turns
                            .as_ref()
                            .is_some_and(|turns| turns.waiting_on_client(CLIENT_STALL));
                    return Ok(match failure {
                        None if stalled => {
                            tracing::info!(
                                upstream = %upstream.base(),
                                %error,
                                "the upstream gave up on a request body that stopped arriving"
                            );
                            metrics::counter!("tower_fhir_body_timeouts_total").increment(1);
                            BodyFailure::TooSlow.answer(None).map(ProxyBody::full)
                        }
                        Some(failure) => {
                            tracing::info!(upstream = %upstream.base(), ?failure, "request body failed");
                            failure.answer(None).map(ProxyBody::full)
                        }
                        None => {
                            // With its causes: hyper-util's "client error (Connect)" says
                            // nothing of a refused connection or an untrusted certificate.
                            tracing::warn!(upstream = %upstream.base(), error = %crate::causes::Causes(&*error), "upstream request failed");
                            outcome(
                                StatusCode::BAD_GATEWAY,
                                IssueType::Exception,
                                "The tenant's FHIR server could not be reached",
                            )
                        }
                    });
                }
                Waited::BodyTooSlow => {
                    tracing::info!(
                        upstream = %upstream.base(),
                        ?timeout,
                        "request body sent nothing for the upstream's timeout"
                    );
                    return Ok(BodyFailure::TooSlow.answer(None).map(ProxyBody::full));
                }
                Waited::UpstreamTooSlow => {
                    // The whole wait: a histogram of answers alone hides the slowest.
                    config
                        .upstream_duration
                        .record(started.elapsed().as_secs_f64());
                    tracing::warn!(upstream = %upstream.base(), ?timeout, "upstream timed out");
                    return Ok(outcome(
                        StatusCode::GATEWAY_TIMEOUT,
                        IssueType::Timeout,
                        "The tenant's FHIR server did not answer in time",
                    ));
                }
            };
            let rewriter = BaseRewriter::new(
                Arc::clone(upstream.base().shared_text()),
                Arc::clone(&config.public_base),
            );
            let relayed = relay_response(
                response,
                &rewriter,
                Rewriting {
                    limit: config.rewrite_limit,
                    budget: &config.rewrite_budget,
                    retry_safe,
                },
                upstream.set_cookie_allowed(),
                timeout,
                head,
            )
            .await;
            let mut response = match relayed {
                Ok(response) => response,
                Err(failed) => return Ok(failed),
            };
            if client_wants == AskedForm::Current {
                response_from_dstu2(response.headers_mut());
            }
            crate::version::label(response.headers_mut(), upstream.fhir_version());
            let extensions = response.extensions_mut();
            extensions.insert(upstream.fhir_version());
            extensions.insert(super::Relayed);
            Ok(response.map(|body| body.holding(slot)))
        })
    }
}

fn ready(response: Response<ProxyBody>) -> ResponseFuture {
    Box::pin(std::future::ready(Ok(response)))
}

/// The upstream's `max_concurrency` requests were in flight for as long as this one could
/// wait: 503, never sent.
fn busy(upstream: &Upstream) -> Response<ProxyBody> {
    metrics::counter!("tower_fhir_rate_limited_total", "limit" => "upstream").increment(1);
    tracing::warn!(upstream = %upstream.base(), "upstream busy: no concurrency slot in time");
    let mut response = outcome(
        StatusCode::SERVICE_UNAVAILABLE,
        IssueType::Throttled,
        "The tenant's FHIR server has as many requests in flight as it takes; try again later",
    );
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn outcome(status: StatusCode, code: IssueType, diagnostics: &str) -> Response<ProxyBody> {
    OperationOutcome::error(code, diagnostics)
        .to_response(status)
        .map(ProxyBody::full)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream body of `chunks` (each a DATA frame), ended after them unless `open`.
    fn stream(
        chunks: &[&'static str],
        open: bool,
    ) -> impl Body<Data = Bytes, Error = Infallible> + Send + 'static {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        for chunk in chunks {
            tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from_static(
                chunk.as_bytes(),
            ))))
            .unwrap();
        }
        if open {
            std::mem::forget(tx);
        }
        http_body_util::StreamBody::new(rx)
    }

    #[tokio::test(start_paused = true)]
    async fn first_frame_reads_past_empty_frames_and_puts_back_what_it_read() {
        let wait = Duration::from_secs(5);
        assert!(first_frame(stream(&["", ""], false), wait)
            .await
            .unwrap()
            .is_none());
        let body = first_frame(stream(&["", "a", "", "b"], false), wait)
            .await
            .unwrap()
            .expect("a body");
        assert!(!body.is_end_stream());
        let whole = body.collect().await.unwrap().to_bytes();
        assert_eq!(&whole[..], b"ab");
        // A stream that neither ends nor sends: 408 once `wait` is over.
        let Err(answer) = first_frame(stream(&[""], true), wait).await else {
            panic!("an open stream read as ended or sending");
        };
        assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[test]
    fn refuses_bad_configuration() {
        assert!(matches!(
            FhirProxy::builder("not a url").build(),
            Err(ConfigError::InvalidPublicBase(_))
        ));
        // Said without the credentials it holds.
        let refused = FhirProxy::builder("https://gw:secret@gw.example")
            .build()
            .unwrap_err()
            .to_string();
        assert!(!refused.contains("secret"), "{refused}");
        assert!(
            refused.contains("no credentials, query or fragment"),
            "{refused}"
        );
        assert_eq!(
            FhirProxy::builder("http://gw")
                .timeout(Duration::ZERO)
                .build()
                .unwrap_err(),
            ConfigError::ZeroDuration("timeout")
        );
        for (name, refused) in [
            ("x-api-key", false),
            (" Range ", false),
            ("Accept-Encoding", false),
            ("not a name", true),
            ("", true),
            ("Host", true),
            ("authorization", true),
            ("cookie", true),
            ("connection", true),
            ("x-forwarded-host", true),
            ("x-forwarded-for", true),
        ] {
            let built = FhirProxy::builder("http://gw")
                .forward_request_header(name)
                .build();
            assert_eq!(
                matches!(built, Err(ConfigError::RequestHeader { .. })),
                refused,
                "{name:?}"
            );
        }
    }
}
