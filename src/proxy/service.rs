//! `FhirProxy`: forwards a routed request to its upstream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use super::body::ProxyBody;
use super::path::{absolute, upstream_path};
use super::pool::Http1Pool;
use super::rewrite::BaseRewriter;
use crate::client::{connector, http_connector, Connector};
use crate::outcome::{IssueType, OperationOutcome};
use crate::route::{Upstream, UpstreamBase};
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type OutgoingBody = UnsyncBoxBody<Bytes, BoxError>;

/// The address of the client that sent a request; put it in the request extensions (the
/// server knows it) and the proxy names it in `Forwarded` and `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Other headers upstreams read as the client's origin or the gateway's public address; a
/// client's own are dropped unless forwarded headers are trusted.
const UNTRUSTED_ORIGIN_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-server"),
];

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
    // Plain-HTTP HTTP/1.1 upstreams.
    http1: Http1Pool,
    // HTTPS upstreams (ALPN may choose HTTP/2).
    client: Client<Connector, OutgoingBody>,
    // For upstreams that speak HTTP/2 with prior knowledge (h2c).
    h2_client: Client<Connector, OutgoingBody>,
    public_base: Arc<str>,
    public_scheme: String,
    forwarded_proto: HeaderValue,
    timeout: Duration,
    rewrite_limit: usize,
    // Extend the client's `Forwarded`/`X-Forwarded-For` chains rather than start new ones.
    trust_forwarded: bool,
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
            pool_idle_timeout: Duration::from_secs(90),
            root_certificates: Vec::new(),
            trust_forwarded: false,
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
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPublicBase(url) => write!(f, "invalid public base URL {url:?}"),
            Self::ZeroDuration(what) => write!(f, "{what} must be longer than zero"),
            Self::Tls(why) => write!(f, "TLS: {why}"),
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
    pool_idle_timeout: Duration,
    root_certificates: Vec<Vec<u8>>,
    trust_forwarded: bool,
}

impl FhirProxyBuilder {
    /// Whether the `Forwarded` and `X-Forwarded-For` headers a request arrives with are
    /// believed: `true` extends them with the connection's address (the gateway sits behind a
    /// load balancer or proxy of yours that sets them); `false` (the default, for a gateway
    /// clients reach directly) drops them and starts new ones, so a client cannot name another
    /// origin to the upstream. `X-Forwarded-Proto` and `X-Forwarded-Host` are always the
    /// gateway's own.
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
    /// CA). Needs the `tls` feature.
    pub fn root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// How long an upstream may take to answer (its response head) before the gateway
    /// answers 504, unless the upstream has its own timeout. Default 30 s.
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

    /// How long an idle pooled connection to an upstream is kept. Default 90 s.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Checks the configuration and builds the proxy.
    pub fn build(self) -> Result<FhirProxy, ConfigError> {
        let public = UpstreamBase::parse(&self.public_base_url)
            .map_err(|_| ConfigError::InvalidPublicBase(self.public_base_url.clone()))?;
        for (what, value) in [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
            ("pool_idle_timeout", self.pool_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(what));
            }
        }
        let connector =
            connector(self.connect_timeout, &self.root_certificates).map_err(ConfigError::Tls)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .build(connector.clone());
        let h2_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .http2_only(true)
            .build(connector);
        let public_scheme = public.scheme().as_str().to_owned();
        Ok(FhirProxy {
            config: Arc::new(Config {
                http1: Http1Pool::new(http_connector(self.connect_timeout), self.pool_idle_timeout),
                client,
                h2_client,
                public_base: Arc::clone(public.shared_text()),
                forwarded_proto: HeaderValue::from_str(&public_scheme)
                    .unwrap_or(HeaderValue::from_static("http")),
                public_scheme,
                timeout: self.timeout,
                rewrite_limit: self.rewrite_limit,
                trust_forwarded: self.trust_forwarded,
            }),
        })
    }
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
            return ready(outcome(
                StatusCode::BAD_GATEWAY,
                IssueType::Exception,
                "No upstream was chosen for this request",
            ));
        };
        // Plain-HTTP HTTP/1.1 upstreams take the proxy's own pool and an origin-form target;
        // the others hyper-util's client and an absolute one.
        let pooled = !upstream.http2() && *upstream.base().scheme() == Scheme::HTTP;
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
        let client_addr = request.extensions().get::<ClientAddr>().copied();
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
            for name in [header::ACCEPT, header::CONTENT_TYPE] {
                swap_media_types(&mut parts.headers, name, &DSTU2_MEDIA_TYPES);
            }
        }
        prepare_request_headers(&mut parts.headers, &upstream, client_addr, &self.config);
        parts.uri = uri;
        parts.version = if upstream.http2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        parts.extensions = http::Extensions::new();
        let outgoing = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());

        let config = Arc::clone(&self.config);
        let timeout = upstream.timeout().unwrap_or(config.timeout);
        Box::pin(async move {
            let sent = async {
                if pooled {
                    config
                        .http1
                        .send(upstream.base().authority(), outgoing)
                        .await
                } else if upstream.http2() {
                    Ok(config.h2_client.request(outgoing).await?)
                } else {
                    Ok(config.client.request(outgoing).await?)
                }
            };
            let response = match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    tracing::warn!(upstream = %upstream.base(), %error, "upstream request failed");
                    return Ok(outcome(
                        StatusCode::BAD_GATEWAY,
                        IssueType::Exception,
                        "The tenant's FHIR server could not be reached",
                    ));
                }
                Err(_) => {
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
            let mut response = relay_response(response, &rewriter, config.rewrite_limit).await;
            if client_wants == AskedForm::Current {
                let back: Vec<_> = DSTU2_MEDIA_TYPES
                    .iter()
                    .map(|(new, old)| (*old, *new))
                    .collect();
                swap_media_types(response.headers_mut(), header::CONTENT_TYPE, &back);
            }
            crate::version::label(response.headers_mut(), upstream.fhir_version());
            response.extensions_mut().insert(upstream.fhir_version());
            Ok(response)
        })
    }
}

/// The STU3+ media types and their DSTU2 forms.
const DSTU2_MEDIA_TYPES: [(&str, &str); 2] = [
    ("application/fhir+json", "application/json+fhir"),
    ("application/fhir+xml", "application/xml+fhir"),
];

/// Which form of the FHIR media types a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AskedForm {
    /// The STU3+ form (`application/fhir+json`).
    Current,
    /// Whatever the upstream answers.
    Upstreams,
}

fn asked_form(headers: &HeaderMap) -> AskedForm {
    let current = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(crate::version::split_list)
        .filter_map(|range| range.split(';').next())
        .any(|essence| {
            DSTU2_MEDIA_TYPES
                .iter()
                .any(|(new, _)| essence.trim().eq_ignore_ascii_case(new))
        });
    if current {
        AskedForm::Current
    } else {
        AskedForm::Upstreams
    }
}

/// Replaces media type essences in a header's ranges, keeping their parameters.
fn swap_media_types(headers: &mut HeaderMap, name: HeaderName, swaps: &[(&str, &str)]) {
    let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let mut changed = false;
    let ranges: Vec<String> = crate::version::split_list(value)
        .map(|range| {
            let (essence, params) = range
                .split_once(';')
                .map_or((range, None), |(e, p)| (e, Some(p)));
            match swaps
                .iter()
                .find(|(from, _)| essence.trim().eq_ignore_ascii_case(from))
            {
                Some((_, to)) => {
                    changed = true;
                    params.map_or_else(|| (*to).to_owned(), |p| format!("{to};{p}"))
                }
                None => range.to_owned(),
            }
        })
        .collect();
    if changed {
        if let Ok(value) = HeaderValue::from_str(&ranges.join(", ")) {
            headers.insert(name, value);
        }
    }
}

fn ready(response: Response<ProxyBody>) -> ResponseFuture {
    Box::pin(std::future::ready(Ok(response)))
}

fn outcome(status: StatusCode, code: IssueType, diagnostics: &str) -> Response<ProxyBody> {
    OperationOutcome::error(code, diagnostics)
        .to_response(status)
        .map(ProxyBody::full)
}

/// Headers as the upstream must see them: hop-by-hop gone, `Host` the upstream's, the client's
/// credentials replaced by the gateway's own, the forwarding chain started (or, when trusted,
/// extended).
fn prepare_request_headers(
    headers: &mut HeaderMap,
    upstream: &Upstream,
    client: Option<ClientAddr>,
    config: &Config,
) {
    use std::fmt::Write;
    remove_hop_by_hop(headers);
    // Replacing a value in place costs less than removing it and inserting another.
    let original_host = match upstream.host_header() {
        Some(host) => headers.insert(header::HOST, host.clone()),
        None => headers.remove(header::HOST),
    };
    match upstream.authorization() {
        Some(credentials) => headers.insert(header::AUTHORIZATION, credentials.clone()),
        None => headers.remove(header::AUTHORIZATION),
    };

    let client_ip = client.map(|ClientAddr(addr)| addr.ip());
    let mut forwarded = String::with_capacity(96);
    forwarded.push_str("for=");
    // Where the address is written: `X-Forwarded-For` takes the same text.
    let mut ip_at = 0..0;
    match client_ip {
        Some(std::net::IpAddr::V6(ip)) => {
            forwarded.push_str("\"[");
            let start = forwarded.len();
            let _ = write!(forwarded, "{ip}");
            ip_at = start..forwarded.len();
            forwarded.push_str("]\"");
        }
        Some(std::net::IpAddr::V4(ip)) => {
            push_ipv4(&mut forwarded, ip);
            ip_at = 4..forwarded.len();
        }
        None => forwarded.push_str("unknown"),
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(&config.public_scheme);
    if let Some(host) = original_host.as_ref().and_then(|h| h.to_str().ok()) {
        forwarded.push_str(";host=\"");
        if memchr::memchr2(b'"', b'\\', host.as_bytes()).is_none() {
            forwarded.push_str(host);
        } else {
            forwarded.extend(host.chars().filter(|c| *c != '"' && *c != '\\'));
        }
        forwarded.push('"');
    }
    // The client's own claims of where it came from are not passed on, unless trusted. Most
    // requests make none: one pass over their names before any removal.
    if !config.trust_forwarded
        && headers.keys().any(|name| {
            name == header::FORWARDED
                || name == X_FORWARDED_FOR
                || UNTRUSTED_ORIGIN_HEADERS.contains(name)
        })
    {
        headers.remove(header::FORWARDED);
        headers.remove(X_FORWARDED_FOR);
        for name in UNTRUSTED_ORIGIN_HEADERS {
            headers.remove(name);
        }
    }
    append(headers, header::FORWARDED, &forwarded);
    if client_ip.is_some() {
        append(headers, X_FORWARDED_FOR, &forwarded[ip_at]);
    }
    headers.insert(X_FORWARDED_PROTO, config.forwarded_proto.clone());
    match original_host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// Writes an IPv4 address in dotted decimal (what `Display` writes, without the formatter).
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// Adds to a comma-separated list header, keeping what earlier proxies wrote.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    // One lookup: through the entry, whether or not the header is there.
    let mut entry = match headers.entry(name) {
        Entry::Vacant(vacant) => {
            if let Ok(value) = HeaderValue::from_str(value) {
                vacant.insert(value);
            }
            return;
        }
        Entry::Occupied(entry) => entry,
    };
    let combined = match entry
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        existing if existing.is_empty() => value.to_owned(),
        existing => format!("{}, {value}", existing.join(", ")),
    };
    if let Ok(combined) = HeaderValue::from_str(&combined) {
        // Replaces every value, as `HeaderMap::insert` does.
        entry.insert(combined);
    }
}

/// Whether a header belongs to one connection and never crosses a proxy (RFC 9110 §7.6.1): a
/// match on the text (its length first), cheaper than comparing names one by one.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (cheap comparisons) before any removal.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    named.extend(headers.keys().filter(|name| is_hop_by_hop(name)).cloned());
    for name in named {
        headers.remove(name);
    }
}

/// The upstream's response as the client must see it: hop-by-hop headers gone, upstream URLs
/// in `Location`, `Content-Location` and JSON Bundle links rewritten to the gateway's base.
async fn relay_response(
    response: Response<Incoming>,
    rewriter: &BaseRewriter,
    rewrite_limit: usize,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let heads = ResponseHeads::scan(&parts.headers);
    if heads.location {
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let rewritten = parts
                .headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| rewriter.url(v))
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(value) = rewritten {
                parts.headers.insert(name, value);
            }
        }
    }
    if !heads.may_be_json_bundle(rewrite_limit) {
        return Response::from_parts(parts, ProxyBody::upstream(VecDeque::new(), body));
    }
    // Read up to the limit; beyond it, stream what was read and the rest untouched. Most
    // bodies come in one chunk: it is kept apart, and a queue made only for more.
    let mut first: Option<Bytes> = None;
    let mut more = VecDeque::new();
    let mut size = 0;
    let mut body = body;
    while !body.is_end_stream() {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    match &first {
                        None => first = Some(data),
                        Some(_) => more.push_back(data),
                    }
                    if size > rewrite_limit {
                        let read = in_order(first, more);
                        return Response::from_parts(parts, ProxyBody::upstream(read, body));
                    }
                }
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "upstream response body failed");
                let read = in_order(first, more);
                return Response::from_parts(parts, ProxyBody::upstream(read, body));
            }
            None => break,
        }
    }
    let whole = match (first, more.is_empty()) {
        (Some(only), true) => only,
        (first, _) => {
            let mut whole = Vec::with_capacity(size);
            for chunk in first.iter().chain(&more) {
                whole.extend_from_slice(chunk);
            }
            Bytes::from(whole)
        }
    };
    let bytes = match rewriter.bundle(&whole) {
        Some(rewritten) => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
            rewritten
        }
        None => whole,
    };
    Response::from_parts(parts, ProxyBody::full(bytes))
}

/// The chunks read so far, the first one first.
fn in_order(first: Option<Bytes>, mut more: VecDeque<Bytes>) -> VecDeque<Bytes> {
    if let Some(first) = first {
        more.push_front(first);
    }
    more
}

/// What the relay needs of the upstream's response headers, read in one pass over them (five
/// lookups by name cost more). Each name's first value counts, as with `HeaderMap::get`.
#[derive(Debug, Default)]
struct ResponseHeads {
    /// A `Location` or `Content-Location` is there (to rewrite if it names the upstream).
    location: bool,
    /// The first `Content-Type`'s media type is a JSON one.
    json: Option<bool>,
    /// The first `Content-Encoding` is `identity`.
    identity: Option<bool>,
    /// The first `Content-Length`, if it reads as a number (an unreadable one counts as unknown).
    length: Option<Option<usize>>,
}

impl ResponseHeads {
    fn scan(headers: &HeaderMap) -> Self {
        let mut heads = Self::default();
        for (name, value) in headers {
            if name == header::LOCATION || name == header::CONTENT_LOCATION {
                heads.location = true;
            } else if name == header::CONTENT_TYPE {
                heads.json.get_or_insert_with(|| {
                    // The media type before any parameter, compared as bytes.
                    let value = value.as_bytes();
                    let end = memchr::memchr(b';', value).unwrap_or(value.len());
                    let media = value[..end].trim_ascii();
                    [
                        b"application/fhir+json".as_slice(),
                        b"application/json+fhir",
                        b"application/json",
                    ]
                    .iter()
                    .any(|json| media.eq_ignore_ascii_case(json))
                });
            } else if name == header::CONTENT_ENCODING {
                heads
                    .identity
                    .get_or_insert_with(|| value.as_bytes().eq_ignore_ascii_case(b"identity"));
            } else if name == header::CONTENT_LENGTH {
                heads.length.get_or_insert_with(|| {
                    value.to_str().ok().and_then(|v| v.parse::<usize>().ok())
                });
            }
        }
        heads
    }

    /// A JSON body, not compressed, that fits the rewrite limit if its length is known.
    fn may_be_json_bundle(&self, limit: usize) -> bool {
        self.json == Some(true)
            && self.identity != Some(false)
            && self.length.flatten().is_none_or(|len| len <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_by_hop_headers_are_rfc_9110s_and_no_others() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let name = HeaderName::from_static(name);
            assert!(is_hop_by_hop(&name), "{name}");
        }
        for name in [
            header::HOST,
            header::USER_AGENT,
            header::AUTHORIZATION,
            HeaderName::from_static("connections"),
            HeaderName::from_static("tea"),
        ] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
    }

    #[test]
    fn dstu2_media_types_swap_keeping_parameters() {
        let mut h = headers(&[
            (
                "accept",
                "application/fhir+json; q=1.0, application/xml+fhir;q=0.9, */*;q=0.1",
            ),
            ("content-type", "application/fhir+json;charset=utf-8"),
        ]);
        assert_eq!(asked_form(&h), AskedForm::Current);
        swap_media_types(&mut h, header::ACCEPT, &DSTU2_MEDIA_TYPES);
        swap_media_types(&mut h, header::CONTENT_TYPE, &DSTU2_MEDIA_TYPES);
        assert_eq!(
            h["accept"],
            "application/json+fhir; q=1.0, application/xml+fhir;q=0.9, */*;q=0.1"
        );
        assert_eq!(h["content-type"], "application/json+fhir;charset=utf-8");
        assert_eq!(
            asked_form(&headers(&[("accept", "application/json+fhir")])),
            AskedForm::Upstreams
        );
        assert_eq!(asked_form(&HeaderMap::new()), AskedForm::Upstreams);
    }

    fn upstream(auth: Option<&str>) -> Upstream {
        let upstream = Upstream::parse("http://ehr:9001/fhir", FhirVersion::Stu3).unwrap();
        match auth {
            Some(auth) => upstream.with_authorization(auth).unwrap(),
            None => upstream,
        }
    }

    fn config_for(public_base: &str) -> Arc<Config> {
        FhirProxy::builder(public_base).build().unwrap().config
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn ipv4_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
        ] {
            let mut out = String::new();
            push_ipv4(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip);
        }
    }

    #[test]
    fn request_headers_lose_hop_by_hop_and_client_credentials() {
        let mut h = headers(&[
            ("host", "gateway:8080"),
            ("authorization", "Bearer client-token"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("accept", "application/fhir+json"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=6.6.6.6;host=\"tenant-b.example\""),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-prefix", "/tenant-b"),
            ("x-forwarded-port", "8443"),
        ]);
        let sent = h.clone();
        let client = ClientAddr("127.0.0.7:5555".parse().unwrap());
        prepare_request_headers(
            &mut h,
            &upstream(Some("Bearer upstream")),
            Some(client),
            &config_for("https://gw.example"),
        );
        assert_eq!(h["host"], "ehr:9001");
        assert_eq!(h["authorization"], "Bearer upstream");
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["accept"], "application/fhir+json");
        // The client's own chains are not believed by default: new ones start here.
        assert_eq!(h["x-forwarded-for"], "127.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "gateway:8080");
        let all = |h: &HeaderMap, name: &str| {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all(&h, "forwarded"),
            ["for=127.0.0.7;proto=https;host=\"gateway:8080\""]
        );
        for gone in ["x-real-ip", "x-forwarded-prefix", "x-forwarded-port"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        // Behind a proxy of yours that sets them, they are extended.
        let trusted = FhirProxy::builder("https://gw.example")
            .trust_forwarded_headers(true)
            .build()
            .unwrap()
            .config;
        let mut h = sent;
        prepare_request_headers(&mut h, &upstream(None), Some(client), &trusted);
        assert_eq!(all(&h, "x-forwarded-for"), ["10.0.0.1, 127.0.0.7"]);
        assert_eq!(h["x-forwarded-prefix"], "/tenant-b");
        assert_eq!(
            all(&h, "forwarded"),
            [
                "for=6.6.6.6;host=\"tenant-b.example\", for=127.0.0.7;proto=https;host=\"gateway:8080\""
            ]
        );

        let mut h = headers(&[
            ("authorization", "Bearer client-token"),
            ("x-forwarded-host", "spoofed"),
        ]);
        let v6 = ClientAddr("[::1]:1".parse().unwrap());
        prepare_request_headers(
            &mut h,
            &upstream(None),
            Some(v6),
            &config_for("http://gw.example"),
        );
        assert!(
            !h.contains_key("authorization"),
            "no upstream credentials: none forwarded"
        );
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(
            !h.contains_key("x-forwarded-host"),
            "no Host, no claim of one"
        );

        // Quotes and backslashes cannot break out of the quoted `host=`; no address, `unknown`.
        let mut h = headers(&[("host", "gw\"x\\y"), ("x-forwarded-for", "6.6.6.6")]);
        prepare_request_headers(&mut h, &upstream(None), None, &config_for("http://gw"));
        assert_eq!(h["forwarded"], "for=unknown;proto=http;host=\"gwxy\"");
        assert!(!h.contains_key("x-forwarded-for"));
        assert_eq!(h["x-forwarded-host"], "gw\"x\\y");
    }

    fn may_be_json_bundle(headers: &HeaderMap, limit: usize) -> bool {
        ResponseHeads::scan(headers).may_be_json_bundle(limit)
    }

    #[test]
    fn only_plain_json_within_the_limit_is_buffered() {
        assert!(may_be_json_bundle(
            &headers(&[("content-type", "application/fhir+json;charset=utf-8")]),
            10
        ));
        assert!(may_be_json_bundle(
            &headers(&[
                ("content-type", "application/json+fhir"),
                ("content-length", "10")
            ]),
            10
        ));
        assert!(!may_be_json_bundle(
            &headers(&[
                ("content-type", "application/fhir+json"),
                ("content-length", "11")
            ]),
            10
        ));
        assert!(!may_be_json_bundle(
            &headers(&[
                ("content-type", "application/fhir+json"),
                ("content-encoding", "gzip")
            ]),
            10
        ));
        assert!(!may_be_json_bundle(
            &headers(&[("content-type", "application/fhir+xml")]),
            10
        ));
        assert!(may_be_json_bundle(
            &headers(&[
                ("Content-Type", " Application/JSON ; charset=utf-8"),
                ("content-encoding", "IDENTITY"),
                ("content-length", "not a number"),
            ]),
            10
        ));
        assert!(!may_be_json_bundle(&headers(&[]), 10));
        // The first value of each header counts, as `HeaderMap::get` reads it.
        assert!(!may_be_json_bundle(
            &headers(&[
                ("content-type", "text/plain"),
                ("content-type", "application/json"),
            ]),
            10
        ));
        assert!(may_be_json_bundle(
            &headers(&[
                ("content-type", "application/json"),
                ("content-length", "5"),
                ("content-length", "50"),
            ]),
            10
        ));
    }

    #[test]
    fn the_response_scan_sees_either_location_header() {
        assert!(!ResponseHeads::scan(&headers(&[("content-type", "x/y")])).location);
        assert!(ResponseHeads::scan(&headers(&[("location", "http://up/Patient/1")])).location);
        assert!(ResponseHeads::scan(&headers(&[("content-location", "/a")])).location);
    }

    #[test]
    fn refuses_bad_configuration() {
        assert!(matches!(
            FhirProxy::builder("not a url").build(),
            Err(ConfigError::InvalidPublicBase(_))
        ));
        assert_eq!(
            FhirProxy::builder("http://gw")
                .timeout(Duration::ZERO)
                .build()
                .unwrap_err(),
            ConfigError::ZeroDuration("timeout")
        );
    }
}
