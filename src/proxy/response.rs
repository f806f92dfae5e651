//! The upstream's response relayed to the client: hop-by-hop headers removed, `Set-Cookie`
//! removed unless the upstream takes part in cookies, `X-Content-Type-Options: nosniff` set,
//! `Content-Security-Policy: sandbox` added unless the answer is JSON or a PDF, its
//! `Content-Length` the one the body was read with, the upstream's base URL rewritten to the
//! gateway's in `Location`, `Content-Location`, `Link` and the links of the JSON Bundles
//! a server answers with (bodies up to a limit; larger or compressed ones stream through
//! untouched; digests of a rewritten body's bytes dropped). An informational answer, a `401`
//! or `407` (the upstream refusing the gateway's own credentials), a redirect outside the
//! upstream's base URL, and an answer under a transfer coding other than `chunked` are `502`
//! instead.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::{poll_upstream_frame, ProxyBody};
use super::headers::{only_chunked, remove_hop_by_hop};
use super::rewrite::{climbs_out, BaseRewriter, Links};
use crate::outcome::{IssueType, OperationOutcome};

/// Whether a redirect's `Location` leads anywhere but under the upstream's base URL (which
/// [`BaseRewriter::header_url`] maps to the gateway's), under the gateway's own public base, or
/// a relative path without a `..` segment: another host, a path of its host outside the base,
/// another scheme, a path climbing out of the base, a backslash or a control character, or no
/// text at all.
fn redirects_elsewhere(location: &HeaderValue, rewriter: &BaseRewriter) -> bool {
    let Ok(location) = location.to_str() else {
        return true;
    };
    // Browsers read `\` as `/` in an http(s) URL (`\\evil.example/x` is another host) and
    // drop tabs and line breaks: none belongs in a URL a client should follow.
    if location.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return true;
    }
    if rewriter.header_url(location).is_some() || rewriter.is_public(location) {
        return false;
    }
    // RFC 3986 §4.2: a relative path's first segment has no `:` (else it is a scheme).
    let first = &location[..location.find(['/', '?', '#']).unwrap_or(location.len())];
    location.starts_with('/') || first.contains(':') || climbs_out(location.as_bytes())
}

/// The upstream's response as the client must see it: hop-by-hop headers gone, `Set-Cookie`
/// (and the obsolete `Set-Cookie2`) gone unless `cookies` (the upstream takes part in cookies:
/// all tenants share the gateway's origin), upstream URLs in `Location`, `Content-Location`
/// and JSON Bundle links rewritten to the gateway's base. `wait` is how long the upstream may
/// send nothing of the body.
///
/// `Err` is the answer instead when a body read whole (to rewrite it) failed or ended short of
/// its `Content-Length`, `502`, or the upstream sent nothing of it for `wait`, `504`: nothing
/// of the response has gone to the client yet, and a cut body must not pass for the whole one.
/// A streamed body that ends short of its `Content-Length` ends with an error, so the client's
/// connection is broken off rather than the body taken for whole. (`head`: the request was a
/// HEAD, whose answer sends none of the length it declares.)
pub(super) async fn relay_response(
    response: Response<Incoming>,
    rewriter: &BaseRewriter,
    rewriting: Rewriting<'_>,
    cookies: bool,
    wait: Duration,
    head: bool,
) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
    let rewrite_limit = rewriting.limit;
    let (mut parts, body) = response.into_parts();
    // A final answer only: an upgrade (`101`) the client never asked for would leave it a
    // connection in another protocol.
    if parts.status.is_informational() {
        tracing::warn!(upstream = rewriter.upstream(), status = %parts.status, "upstream answered with an informational status: 502");
        return Err(failed(
            StatusCode::BAD_GATEWAY,
            IssueType::Exception,
            "The tenant's FHIR server gave no final answer",
        ));
    }
    // The client's own credentials never reach the upstream (the gateway sends its own, or
    // none): a `401` (or a proxy's `407`) refuses the gateway's. Relayed, it would tell the
    // client its valid token was refused (so it throws it away and asks again, in a loop), and
    // show it the upstream's challenge (`WWW-Authenticate: Basic realm=...`, which a browser
    // answers with a password prompt on the gateway's origin).
    if matches!(
        parts.status,
        StatusCode::UNAUTHORIZED | StatusCode::PROXY_AUTHENTICATION_REQUIRED
    ) {
        tracing::error!(upstream = rewriter.upstream(), status = %parts.status, "upstream refused the gateway's credentials for it: 502");
        return Err(failed(
            StatusCode::BAD_GATEWAY,
            IssueType::Exception,
            "The tenant's FHIR server refused the gateway's credentials for it",
        ));
    }
    // A redirect leads the client to what it names, with its token in hand if the client
    // follows redirects carelessly: one under the upstream's base is rewritten to the
    // gateway's below; one to another host (an internal address behind the hospital's
    // balancer, say), or to another path on its own host, would take the client around the
    // gateway, and shows it the hospital's network. A relative path resolves under the
    // gateway's URL the client asked for.
    if parts.status.is_redirection() && parts.status != StatusCode::NOT_MODIFIED && {
        // Two `Location`s: which one a client follows is its own choice.
        let mut locations = parts.headers.get_all(header::LOCATION).iter();
        let first = locations.next();
        locations.next().is_some()
            || first.is_some_and(|location| redirects_elsewhere(location, rewriter))
    } {
        tracing::warn!(upstream = rewriter.upstream(), status = %parts.status, "upstream redirected outside its base URL: 502");
        return Err(failed(
            StatusCode::BAD_GATEWAY,
            IssueType::Exception,
            "The tenant's FHIR server redirected outside itself",
        ));
    }
    // The gateway speaks HTTP/1.1 (or 2) to its client whatever its upstream spoke: an
    // HTTP/1.0 upstream's version would tell an HTTP/1.1 client its connection closes.
    parts.version = http::Version::HTTP_11;
    // A transfer coding hyper did not undo (`gzip, chunked`) would reach the client as content
    // once `Transfer-Encoding` is gone: compressed bytes labelled as JSON.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) && !only_chunked(&parts.headers) {
        tracing::warn!(
            upstream = rewriter.upstream(),
            "upstream answered under a transfer coding other than chunked: 502"
        );
        return Err(failed(
            StatusCode::BAD_GATEWAY,
            IssueType::Exception,
            "The tenant's FHIR server answered under a transfer coding this gateway does not take",
        ));
    }
    let chunked = remove_hop_by_hop(&mut parts.headers);
    // Every tenant's answers share the gateway's origin: a browser must take each for the type
    // it is labelled with (or none), never sniff a script or a page out of it.
    parts.headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let bodiless =
        head || parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED;
    // The length the body must have, as hyper framed it (so not a `Content-Length` that a
    // chunked encoding overrides); none for answers that send no body whatever they declare.
    let declared = if bodiless {
        None
    } else {
        body.size_hint().exact()
    };
    // The client's framing is the body's as it was read, never the upstream's header: with
    // `Transfer-Encoding`, a `Content-Length` beside it (`0`, say, before a chunked body that
    // is itself a whole response) would split the answer on the client's connection, the
    // rest read as the answer to its next request (RFC 9112 §6.3: an intermediary removes
    // it). A bodiless answer keeps the length it speaks of (a HEAD's, a 304's), unless a
    // transfer coding made it meaningless; a 204 has none.
    let mut heads = ResponseHeads::scan(&parts.headers);
    // A document a browser renders may run scripts on the gateway's origin, every tenant's
    // (HTML, XHTML, SVG, any XML, FHIR's with its XHTML narratives, no type at all: HAPI's
    // `_format=html`, a Binary's page): `sandbox` gives it an origin of its own, without
    // scripts. Every answer has it but one of a single `Content-Type` naming one JSON type or
    // PDF (a browser takes the last of several types, and a sandbox would keep its PDF viewer
    // from showing a Binary's PDF), a `204`, and a `304` (which has no document, but whose
    // headers replace the cached answer's: one that brings its own policy gets the sandbox
    // added, or it would lift the cached answer's).
    let inert = heads.content_types == 1 && heads.inert;
    let sandboxed = match parts.status {
        StatusCode::NO_CONTENT => false,
        StatusCode::NOT_MODIFIED => parts.headers.contains_key(header::CONTENT_SECURITY_POLICY),
        _ => !inert,
    };
    if sandboxed {
        parts.headers.append(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        );
    }
    if chunked || (!bodiless && declared.is_none()) || parts.status == StatusCode::NO_CONTENT {
        if heads.lengths > 0 {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
    } else if let Some(length) = declared {
        // One value, as read (`5, 5` is one length to hyper, two to some clients); most
        // answers have it so already.
        let as_read = heads.lengths == 1 && heads.length == Some(usize::try_from(length).ok());
        if !as_read {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    if !bodiless {
        heads.length = Some(declared.and_then(|length| usize::try_from(length).ok()));
    }
    if heads.set_cookie && !cookies {
        parts.headers.remove(header::SET_COOKIE);
        parts.headers.remove(SET_COOKIE2);
    }
    if heads.origin_wide {
        let names: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|name| origin_wide(name))
            .cloned()
            .collect();
        for name in names {
            parts.headers.remove(name);
        }
    }
    if heads.software {
        for name in SOFTWARE_HEADERS {
            parts.headers.remove(name);
        }
    }
    if heads.location {
        // A `Location` or `Content-Location` that leads around the gateway (another host, a
        // path of its host outside the base: an internal address, say) is dropped: a `201`'s
        // resource is made, so the answer stands, without a URL the client should not follow
        // or see. (A redirect's own `Location` was refused above.)
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let elsewhere = parts
                .headers
                .get_all(&name)
                .iter()
                .any(|value| redirects_elsewhere(value, rewriter));
            if elsewhere {
                tracing::warn!(upstream = rewriter.upstream(), header = %name, "upstream named a URL outside its base URL: the header is dropped");
                parts.headers.remove(&name);
            }
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let rewritten = parts
                .headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| rewriter.header_url(v))
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(value) = rewritten {
                parts.headers.insert(name, value);
            }
        }
        // Paging links a server sends in `Link` (RFC 8288) lead back through the gateway too;
        // a link that would show the client where the upstream is is left out.
        if parts.headers.contains_key(header::LINK) {
            let mut left_out = false;
            let links: Vec<HeaderValue> = parts
                .headers
                .get_all(header::LINK)
                .iter()
                .filter_map(|value| {
                    let Ok(text) = value.to_str() else {
                        left_out = true;
                        return None;
                    };
                    match rewriter.link(text) {
                        Links::Unchanged => Some(value.clone()),
                        Links::Rewritten(text, some_left_out) => {
                            left_out |= some_left_out;
                            HeaderValue::from_str(&text).ok()
                        }
                        Links::Dropped => {
                            left_out = true;
                            None
                        }
                    }
                })
                .collect();
            if left_out {
                tracing::warn!(
                    upstream = rewriter.upstream(),
                    "upstream named URLs outside its base URL in Link: those links are left out"
                );
            }
            parts.headers.remove(header::LINK);
            for link in links {
                parts.headers.append(header::LINK, link);
            }
        }
    }
    if !heads.may_be_bundle(rewrite_limit) {
        return Ok(Response::from_parts(
            parts,
            ProxyBody::upstream(VecDeque::new(), body, wait).declared(declared),
        ));
    }
    // Read up to the limit; beyond it, stream what was read and the rest untouched. Most
    // bodies come in one chunk: it is kept apart, and a queue made only for more.
    let mut first: Option<Bytes> = None;
    let mut more = VecDeque::new();
    let mut size = 0;
    let mut body = body;
    let mut stall = None;
    // The budget's bytes this body holds, taken as its frames arrive.
    let mut held: Option<OwnedSemaphorePermit> = None;
    while !body.is_end_stream() {
        let next = std::future::poll_fn(|cx| {
            poll_upstream_frame(Pin::new(&mut body), &mut stall, wait, cx)
        })
        .await;
        match next {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if size + data.len() > rewrite_limit {
                        // Past the limit: streamed untouched from here, what was read first
                        // (its bytes held until they are sent).
                        more.push_back(data);
                        let read = in_order(first, more);
                        return Ok(Response::from_parts(
                            parts,
                            ProxyBody::upstream(read, body, wait)
                                .declared(declared)
                                .holding_bytes(held),
                        ));
                    }
                    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    let take = || Arc::clone(rewriting.budget).try_acquire_many_owned(n).ok();
                    let mut taken = take();
                    if taken.is_none() && !rewriting.retry_safe {
                        // Acted on upstream: never refused for the budget. Room is looked for
                        // a moment, while this answer holds none of it (one holding some and
                        // waiting for more could wait on another doing the same), then it
                        // goes through unrewritten. Looked for now and then, not queued for:
                        // tokio's semaphore hands a queued waiter every permit freed until it
                        // has all it asked for, starving the others meanwhile.
                        if held.is_none() {
                            let until = tokio::time::Instant::now() + wait.min(BUDGET_WAIT);
                            while taken.is_none() && tokio::time::Instant::now() < until {
                                tokio::time::sleep(BUDGET_LOOK).await;
                                taken = take();
                            }
                        }
                        if taken.is_none() {
                            tracing::warn!(
                                upstream = rewriter.upstream(),
                                "the response bodies held to rewrite their links fill the proxy's budget: the answer to a request acted on upstream streams through with its links unrewritten"
                            );
                            more.push_back(data);
                            let read = in_order(first, more);
                            return Ok(Response::from_parts(
                                parts,
                                ProxyBody::upstream(read, body, wait)
                                    .declared(declared)
                                    .holding_bytes(held),
                            ));
                        }
                    }
                    let Some(taken) = taken else {
                        tracing::warn!(
                            "the response bodies held to rewrite their links fill the proxy's budget: 503"
                        );
                        let mut busy = failed(
                            StatusCode::SERVICE_UNAVAILABLE,
                            IssueType::Transient,
                            "The gateway holds too many answers for their clients to take; retry shortly",
                        );
                        busy.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        return Err(busy);
                    };
                    match &mut held {
                        Some(held) => held.merge(taken),
                        None => held = Some(taken),
                    }
                    size += data.len();
                    match &first {
                        None => first = Some(data),
                        Some(_) => more.push_back(data),
                    }
                }
            }
            Ok(Some(Err(error))) => {
                tracing::warn!(upstream = rewriter.upstream(), %error, "upstream response body failed");
                return Err(failed(
                    StatusCode::BAD_GATEWAY,
                    IssueType::Exception,
                    "The tenant's FHIR server broke off its answer",
                ));
            }
            Ok(None) => break,
            Err(stalled) => {
                tracing::warn!(upstream = rewriter.upstream(), %stalled, "upstream response body stalled");
                return Err(failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    IssueType::Timeout,
                    "The tenant's FHIR server stopped sending its answer",
                ));
            }
        }
    }
    // An HTTP/2 upstream's reset with NO_ERROR ends the body as if whole: only its declared
    // length tells.
    if let Some(declared) = declared.filter(|&declared| declared != size as u64) {
        tracing::warn!(
            upstream = rewriter.upstream(),
            declared,
            received = size,
            "upstream response body ended short of its Content-Length: 502"
        );
        return Err(failed(
            StatusCode::BAD_GATEWAY,
            IssueType::Exception,
            "The tenant's FHIR server broke off its answer",
        ));
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
    let rewritten = if heads.xml {
        rewriter.xml_bundle(&whole)
    } else {
        rewriter.bundle(&whole)
    };
    let bytes = match rewritten {
        Some(rewritten) => {
            // Digests of the upstream's bytes would not match these: the client would take
            // the answer for corrupted. (A Bundle's `ETag` is kept: weak or strong, it is the
            // version a conditional request names.)
            crate::body::remove_digests(&mut parts.headers, false);
            rewritten
        }
        None => whole,
    };
    // (The length set above is the body's already, unless rewriting changed it or it came
    // chunked.)
    if !bodiless && declared != Some(bytes.len() as u64) {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
    Ok(Response::from_parts(
        parts,
        ProxyBody::full(bytes).holding_bytes(held),
    ))
}

/// How often an answer to a request acted on upstream looks for room in a full budget.
const BUDGET_LOOK: Duration = Duration::from_millis(10);

/// How long an answer to a request acted on upstream looks for room in a full budget (the
/// upstream's timeout when shorter) before it goes through unrewritten.
const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// How the relay rewrites JSON Bundles: the largest it reads whole, and the budget of bytes
/// held so, all requests together.
#[derive(Clone, Copy)]
pub(super) struct Rewriting<'a> {
    pub(super) limit: usize,
    pub(super) budget: &'a Arc<Semaphore>,
    /// The request may be sent again with no harm (`GET`, `HEAD`, `OPTIONS`): with the budget
    /// full, its answer is a `503`; any other's looks for room a moment (while it holds none),
    /// then streams unrewritten.
    pub(super) retry_safe: bool,
}

/// A response header the proxy drops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// It speaks for the whole origin rather than for this response: HSTS, `Alt-Svc`,
    /// `Clear-Site-Data`, key pins, Network Error Logging and its reporting endpoints (`NEL`,
    /// `Report-To`, `Reporting-Endpoints`), `Service-Worker-Allowed` (a service worker's scope
    /// widened to the whole origin), and CORS's `Access-Control-*`. Every tenant's upstream
    /// answers under the gateway's one origin, so one upstream's would bind the others' (HSTS
    /// switched off, a browser's data cleared, every tenant's request URLs reported to it, an
    /// origin given credentialed CORS access past the gateway's `cors_allowed_origins`): they
    /// are the gateway's to send, never an upstream's.
    OriginWide,
    /// It names the server's software and release (`Server: Apache/2.4.57`, HAPI's
    /// `X-Powered-By: HAPI FHIR 7.4.0 REST Server`): which FHIR server a hospital runs, and
    /// whether it is one with a known hole, is not the gateway's clients' to learn (nginx drops
    /// `Server` too). [`SOFTWARE_HEADERS`].
    Software,
}

/// The headers that name a server's software ([`Dropped::Software`]).
const SOFTWARE_HEADERS: [&str; 4] = [
    "server",
    "x-powered-by",
    "x-aspnet-version",
    "x-aspnetmvc-version",
];

/// Whether the proxy drops a response header, and why: one look at its name.
fn dropped(name: &HeaderName) -> Option<Dropped> {
    let name = name.as_str();
    match name {
        "strict-transport-security"
        | "alt-svc"
        | "clear-site-data"
        | "public-key-pins"
        | "public-key-pins-report-only"
        | "nel"
        | "report-to"
        | "reporting-endpoints"
        | "service-worker-allowed" => Some(Dropped::OriginWide),
        "server" | "x-powered-by" | "x-aspnet-version" | "x-aspnetmvc-version" => {
            Some(Dropped::Software)
        }
        _ if name.starts_with("access-control-") => Some(Dropped::OriginWide),
        _ => None,
    }
}

fn origin_wide(name: &HeaderName) -> bool {
    dropped(name) == Some(Dropped::OriginWide)
}

/// An `OperationOutcome` answer of the proxy's own.
fn failed(status: StatusCode, code: IssueType, diagnostics: &str) -> Response<ProxyBody> {
    OperationOutcome::error(code, diagnostics)
        .to_response(status)
        .map(ProxyBody::full)
}

/// The chunks read so far, the first one first.
fn in_order(first: Option<Bytes>, mut more: VecDeque<Bytes>) -> VecDeque<Bytes> {
    if let Some(first) = first {
        more.push_front(first);
    }
    more
}

/// RFC 2965's `Set-Cookie2`, obsolete, that some servers may still send.
const SET_COOKIE2: header::HeaderName = header::HeaderName::from_static("set-cookie2");

/// What the relay needs of the upstream's response headers, read in one pass over them (five
/// lookups by name cost more). Each name's first value counts, as with `HeaderMap::get`.
#[derive(Debug, Default)]
struct ResponseHeads {
    /// A `Location`, `Content-Location` or `Link` is there (to rewrite if it names the
    /// upstream).
    location: bool,
    /// A `Set-Cookie` or `Set-Cookie2` is there (to remove unless the upstream may set cookies).
    set_cookie: bool,
    /// A header that speaks for the whole origin is there (to remove: [`Dropped::OriginWide`]).
    origin_wide: bool,
    /// A header naming the upstream's software is there (to remove: [`Dropped::Software`]).
    software: bool,
    /// The first `Content-Type`'s media type is a JSON one.
    json: Option<bool>,
    /// The first `Content-Type`'s media type is FHIR's XML (`application/fhir+xml`, DSTU2's
    /// `application/xml+fhir`).
    xml: bool,
    /// The first `Content-Type` names one media type (no list), a JSON one or PDF: nothing a
    /// browser runs scripts in.
    inert: bool,
    /// How many `Content-Type`s there are (at most 255 counted).
    content_types: u8,
    /// The first `Content-Encoding` is `identity`.
    identity: Option<bool>,
    /// The first `Content-Length`, if it reads as a number (an unreadable one counts as unknown).
    length: Option<Option<usize>>,
    /// How many `Content-Length` values there are (at most 255 counted).
    lengths: u8,
}

impl ResponseHeads {
    fn scan(headers: &HeaderMap) -> Self {
        let mut heads = Self::default();
        for (name, value) in headers {
            if name == header::LOCATION || name == header::CONTENT_LOCATION || name == header::LINK
            {
                heads.location = true;
            } else if name == header::SET_COOKIE || name == SET_COOKIE2 {
                heads.set_cookie = true;
            } else if name == header::CONTENT_TYPE {
                heads.content_types = heads.content_types.saturating_add(1);
                if heads.json.is_some() {
                    continue;
                }
                // The media type before any parameter, compared as bytes.
                let value = value.as_bytes();
                let end = memchr::memchr(b';', value).unwrap_or(value.len());
                let media = value[..end].trim_ascii();
                let is = |types: &[&[u8]]| types.iter().any(|t| media.eq_ignore_ascii_case(t));
                let json = is(&[
                    b"application/fhir+json",
                    b"application/json+fhir",
                    b"application/json",
                ]);
                heads.json = Some(json);
                // FHIR's own XML types only: other XML (a Binary's) streams as it comes.
                heads.xml = !json && is(&[b"application/fhir+xml", b"application/xml+fhir"]);
                heads.inert =
                    (json || is(&[b"application/pdf"])) && memchr::memchr(b',', value).is_none();
            } else if name == header::CONTENT_ENCODING {
                heads
                    .identity
                    .get_or_insert_with(|| value.as_bytes().eq_ignore_ascii_case(b"identity"));
            } else if name == header::CONTENT_LENGTH {
                heads.lengths = heads.lengths.saturating_add(1);
                heads.length.get_or_insert_with(|| {
                    value.to_str().ok().and_then(|v| v.parse::<usize>().ok())
                });
            } else {
                match dropped(name) {
                    Some(Dropped::OriginWide) => heads.origin_wide = true,
                    Some(Dropped::Software) => heads.software = true,
                    None => {}
                }
            }
        }
        heads
    }

    /// A JSON or XML body, not compressed, that fits the rewrite limit if its length is known.
    fn may_be_bundle(&self, limit: usize) -> bool {
        (self.json == Some(true) || self.xml)
            && self.identity != Some(false)
            && self.length.flatten().is_none_or(|len| len <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::headers;

    fn may_be_bundle(headers: &HeaderMap, limit: usize) -> bool {
        ResponseHeads::scan(headers).may_be_bundle(limit)
    }

    #[test]
    fn only_plain_json_or_xml_within_the_limit_is_buffered() {
        assert!(may_be_bundle(
            &headers(&[("content-type", "application/fhir+json;charset=utf-8")]),
            10
        ));
        assert!(may_be_bundle(
            &headers(&[
                ("content-type", "application/json+fhir"),
                ("content-length", "10")
            ]),
            10
        ));
        assert!(!may_be_bundle(
            &headers(&[
                ("content-type", "application/fhir+json"),
                ("content-length", "11")
            ]),
            10
        ));
        assert!(!may_be_bundle(
            &headers(&[
                ("content-type", "application/fhir+json"),
                ("content-encoding", "gzip")
            ]),
            10
        ));
        // FHIR's XML too (its Bundles are rewritten as JSON ones), but not other types.
        assert!(may_be_bundle(
            &headers(&[("content-type", "application/fhir+xml")]),
            10
        ));
        assert!(!may_be_bundle(
            &headers(&[("content-type", "text/html")]),
            10
        ));
        // Other XML (a Binary's) streams.
        assert!(!may_be_bundle(
            &headers(&[("content-type", "application/xml")]),
            10
        ));
        assert!(may_be_bundle(
            &headers(&[
                ("Content-Type", " Application/JSON ; charset=utf-8"),
                ("content-encoding", "IDENTITY"),
                ("content-length", "not a number"),
            ]),
            10
        ));
        assert!(!may_be_bundle(&headers(&[]), 10));
        // The first value of each header counts, as `HeaderMap::get` reads it.
        assert!(!may_be_bundle(
            &headers(&[
                ("content-type", "text/plain"),
                ("content-type", "application/json"),
            ]),
            10
        ));
        assert!(may_be_bundle(
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
    fn the_response_scan_sees_cookies_being_set() {
        assert!(!ResponseHeads::scan(&headers(&[("cookie", "a=b")])).set_cookie);
        assert!(ResponseHeads::scan(&headers(&[("Set-Cookie", "a=b")])).set_cookie);
        assert!(ResponseHeads::scan(&headers(&[("set-cookie2", "a=b")])).set_cookie);
    }
}
