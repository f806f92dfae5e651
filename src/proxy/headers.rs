//! Request headers as the upstream must see them: an explicit policy of what crosses (the
//! headers FHIR clients need, see [`FORWARDED_REQUEST_HEADERS`], the rest dropped), `Host` and
//! credentials the upstream's, the `Forwarded`/`X-Forwarded-*` chain started or extended and
//! naming the gateway's public address.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

use crate::client_addr::{write_ipv4, ClientAddr};
use crate::route::{Upstream, UpstreamBase};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The request headers a client's request keeps on its way to the upstream, besides those the
/// proxy writes itself (`Host`, `Authorization`, `Forwarded`, `X-Forwarded-For`,
/// `-Proto`, `-Host`). Everything else a client sends is dropped: `Cookie` (one browser jar
/// for every tenant behind the one gateway origin; forwarded only to an upstream with
/// [`with_set_cookie_allowed`](crate::route::Upstream::with_set_cookie_allowed)), the
/// method and URL overrides (`X-HTTP-Method-Override`, `X-Original-URL`, `X-Rewrite-URL`: an
/// upstream honouring them would bypass the gateway's method and path checks),
/// `Accept-Encoding` (a compressed answer could not have its upstream URLs rewritten; the
/// proxy sends `Accept-Encoding: identity` instead, unless configured to forward the client's),
/// `X-Provenance` (FHIR R4's: the server writes the `Provenance` resource it carries, a write
/// no scope check sees), browsers' `Referer`, `Sec-*` and the like, and anything made up. Add
/// more with
/// [`FhirProxyBuilder::forward_request_header`](super::FhirProxyBuilder::forward_request_header).
///
/// | header | why it crosses |
/// |---|---|
/// | `accept` | the format and `fhirVersion` the client reads (FHIR content negotiation) |
/// | `accept-language` | the language of narratives and display texts |
/// | `content-type` | the body's format and `fhirVersion`; the body is forwarded byte for byte |
/// | `content-length` | the body's length, checked against it by hyper on both sides |
/// | `content-encoding` | how the forwarded body is compressed, if it is |
/// | `content-language` | the language of the forwarded body's texts |
/// | `if-match` | version-aware update, patch and delete (`W/"3"`) |
/// | `if-none-match` | conditional read (`304`) |
/// | `if-modified-since` | conditional read (`304`) |
/// | `if-none-exist` | FHIR conditional create |
/// | `prefer` | `return=minimal/representation/OperationOutcome`, `handling=strict/lenient`, `respond-async` |
/// | `cache-control` | `no-cache`: the client wants a fresh answer, not a cached one |
/// | `x-request-id` | correlation with the upstream's logs (FHIR's custom headers) |
/// | `x-correlation-id` | the same, FHIR's other name for it |
/// | `traceparent` | W3C Trace Context: the trace the request belongs to |
/// | `tracestate` | W3C Trace Context: vendors' trace data |
/// | `user-agent` | which client software, for the upstream's logs and support |
/// | `origin` | an upstream that answers CORS needs it to name the allowed origin |
/// | `access-control-request-method` | a CORS preflight's question |
/// | `access-control-request-headers` | a CORS preflight's question |
pub const FORWARDED_REQUEST_HEADERS: [&str; 20] = [
    "accept",
    "accept-language",
    "content-type",
    "content-length",
    "content-encoding",
    "content-language",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-none-exist",
    "prefer",
    "cache-control",
    "x-request-id",
    "x-correlation-id",
    "traceparent",
    "tracestate",
    "user-agent",
    "origin",
    "access-control-request-method",
    "access-control-request-headers",
];

/// The request headers that say where a request came from: `Forwarded`, `X-Forwarded-For`,
/// `X-Real-IP`, `X-Forwarded-Port`, `X-Forwarded-Prefix`, `X-Forwarded-Server`. A client's are
/// dropped (the proxy starts `Forwarded` and `X-Forwarded-For`, naming the peer) unless
/// [`FhirProxyBuilder::trust_forwarded_headers`](super::FhirProxyBuilder::trust_forwarded_headers)
/// keeps and extends them: a server that lets clients other than its trusted balancers reach
/// such a proxy removes these from those clients' requests first.
pub const FORWARDING_CHAIN_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
];

/// What the policy does with one request header a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// FHIR clients need it: it crosses as it came.
    Forward,
    /// A claim of where the request came from (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`,
    /// `X-Forwarded-Port`/`-Prefix`/`-Server`): kept and extended only when forwarded headers
    /// are trusted (a load balancer of yours sets them).
    Chain,
    /// `Cookie`: only toward an upstream that takes part in cookies.
    Cookie,
    /// Everything else, and what the proxy writes itself (`Host`, `Authorization`,
    /// `X-Forwarded-Host`, `X-Forwarded-Proto`) or what belongs to one connection.
    Drop,
}

/// The policy for a header name, by its text: one `match` (the length first, then the bytes),
/// no lookup, no allocation. Agrees with [`FORWARDED_REQUEST_HEADERS`] (a test checks).
fn policy(name: &str) -> Policy {
    match name {
        "accept"
        | "accept-language"
        | "content-type"
        | "content-length"
        | "content-encoding"
        | "content-language"
        | "if-match"
        | "if-none-match"
        | "if-modified-since"
        | "if-none-exist"
        | "prefer"
        | "cache-control"
        | "x-request-id"
        | "x-correlation-id"
        | "traceparent"
        | "tracestate"
        | "user-agent"
        | "origin"
        | "access-control-request-method"
        | "access-control-request-headers" => Policy::Forward,
        "forwarded" | "x-forwarded-for" | "x-real-ip" | "x-forwarded-port"
        | "x-forwarded-prefix" | "x-forwarded-server" => Policy::Chain,
        "cookie" => Policy::Cookie,
        _ => Policy::Drop,
    }
}

/// Why [`HeaderPolicy::new`] refuses to forward a header by configuration, if it does: the
/// proxy writes it itself, it belongs to one connection, or it has its own rule.
pub(super) fn unforwardable(name: &HeaderName) -> Option<&'static str> {
    if is_hop_by_hop(name) {
        return Some("it belongs to one connection (hop-by-hop)");
    }
    match name.as_str() {
        "host" | "authorization" | "x-forwarded-host" | "x-forwarded-proto" => {
            Some("the proxy writes it itself")
        }
        "cookie" => Some("cookies cross only to an upstream with `allow_set_cookie`"),
        "x-http-method-override"
        | "x-http-method"
        | "x-method-override"
        | "x-original-url"
        | "x-original-uri"
        | "x-rewrite-url" => Some(
            "it overrides the method or the path: an upstream honouring it would bypass the \
             gateway's checks of them",
        ),
        // HAPI's: a delete that takes every resource referring to its target with it, of
        // whatever type, past the scope check of the one deleted.
        "x-cascade" => Some("it widens a delete beyond the resource the request names"),
        _ if policy(name.as_str()) == Policy::Chain => Some("it follows `trust_forwarded_headers`"),
        _ => None,
    }
}

/// What crosses to the upstream, and what the forwarding headers say of the gateway.
pub(super) struct HeaderPolicy {
    /// `;proto=<public scheme>;host="<public host>"`: the end of each `Forwarded` element the
    /// proxy writes.
    forwarded_tail: String,
    forwarded_proto: HeaderValue,
    forwarded_host: Option<HeaderValue>,
    // Extend the client's `Forwarded`/`X-Forwarded-For` chains rather than start new ones.
    trust_forwarded: bool,
    /// Headers forwarded besides [`FORWARDED_REQUEST_HEADERS`], by configuration.
    extra: Box<[HeaderName]>,
    /// `Accept-Encoding` is not forwarded: the proxy asks for `identity` (a request without
    /// one accepts every coding).
    identity_only: bool,
}

impl HeaderPolicy {
    /// For a gateway known to its clients as `public`; `trust_forwarded` extends the chains a
    /// request arrives with rather than replacing them; `extra` are forwarded too (checked
    /// with [`unforwardable`] already).
    pub(super) fn new(
        public: &UpstreamBase,
        trust_forwarded: bool,
        extra: Vec<HeaderName>,
    ) -> Self {
        let scheme = public.scheme().as_str();
        let host = public.authority().as_str();
        let mut forwarded_tail = format!(";proto={scheme}");
        // An authority has no quote or backslash; kept out all the same.
        if memchr::memchr2(b'"', b'\\', host.as_bytes()).is_none() {
            forwarded_tail.push_str(&format!(";host=\"{host}\""));
        }
        let mut unique: Vec<HeaderName> = Vec::with_capacity(extra.len());
        for name in extra {
            // Those forwarded anyway need no second look.
            if policy(name.as_str()) == Policy::Drop && !unique.contains(&name) {
                unique.push(name);
            }
        }
        Self {
            forwarded_tail,
            forwarded_proto: HeaderValue::from_str(scheme)
                .unwrap_or(HeaderValue::from_static("http")),
            forwarded_host: HeaderValue::from_str(host).ok(),
            trust_forwarded,
            identity_only: !unique.contains(&header::ACCEPT_ENCODING),
            extra: unique.into_boxed_slice(),
        }
    }

    /// Whether a header the client sent crosses to `upstream` (`cookies`: it takes part in
    /// cookies).
    fn forwards(&self, name: &HeaderName, cookies: bool) -> bool {
        match policy(name.as_str()) {
            Policy::Forward => true,
            Policy::Chain => self.trust_forwarded,
            Policy::Cookie => cookies,
            Policy::Drop => self.extra.contains(name),
        }
    }
}

/// Headers as the upstream must see them: only what the policy forwards (hop-by-hop headers
/// and those `Connection` names never), `Host` the upstream's, the client's credentials
/// replaced by the gateway's own, the forwarding chain started (or, when trusted, extended),
/// `X-Forwarded-Host`/`-Proto` and `Forwarded`'s `host=`/`proto=` the gateway's public ones.
///
/// One pass over the headers, moving the kept ones into a new map (one allocation for the map,
/// none per header).
pub(super) fn prepare_request_headers(
    headers: &mut HeaderMap,
    upstream: &Upstream,
    client: Option<ClientAddr>,
    policy: &HeaderPolicy,
) {
    use std::fmt::Write;
    // Rare: a `Connection` naming more than `keep-alive` or `close`.
    let connection_named = connection_named(headers);
    let cookies = upstream.set_cookie_allowed();
    // The usual request has a few names to drop (`Host`, `Authorization`, ...): note them in
    // one pass and remove them in place, without allocating; rebuild the map only for a
    // request with more.
    let mut dropped: [Option<HeaderName>; 8] = Default::default();
    let mut count = 0;
    for name in headers.keys() {
        if !policy.forwards(name, cookies) {
            if count == dropped.len() {
                count += 1;
                break;
            }
            dropped[count] = Some(name.clone());
            count += 1;
        }
    }
    if count <= dropped.len() {
        for name in dropped.iter_mut().take(count) {
            if let Some(name) = name.take() {
                headers.remove(name);
            }
        }
    } else {
        keep_forwarded(headers, policy, cookies);
    }
    for name in connection_named.into_iter().flatten() {
        headers.remove(name);
    }
    if let Some(host) = upstream.host_header() {
        headers.insert(header::HOST, host.clone());
    }
    if let Some(credentials) = upstream.authorization() {
        headers.insert(header::AUTHORIZATION, credentials.clone());
    }
    if policy.identity_only {
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    if cookies {
        join_cookies(headers);
    }

    // An IPv4 client of a dual-stack listener comes as `::ffff:a.b.c.d`: named as IPv4.
    let client_ip = client.map(|ClientAddr(addr)| addr.ip().to_canonical());
    let mut forwarded = String::with_capacity(64 + policy.forwarded_tail.len());
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
            write_ipv4(ip, |b| forwarded.push(char::from(b)));
            ip_at = 4..forwarded.len();
        }
        None => forwarded.push_str("unknown"),
    }
    forwarded.push_str(&policy.forwarded_tail);
    append(headers, header::FORWARDED, &forwarded);
    if client_ip.is_some() {
        append(headers, X_FORWARDED_FOR, &forwarded[ip_at]);
    }
    headers.insert(X_FORWARDED_PROTO, policy.forwarded_proto.clone());
    if let Some(host) = &policy.forwarded_host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

/// Several `Cookie` fields made one, their values joined by `; `: HTTP/2 clients send each
/// cookie in a field of its own, which must be joined before HTTP/1.1 (RFC 9113 §8.2.3), where a
/// request has one `Cookie` (RFC 6265 §5.4); the same for an HTTP/2 upstream.
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Each value was a valid field value: so is their join.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Keeps only the headers `policy` forwards, rebuilding the map in one pass (for a request
/// with many names to drop).
fn keep_forwarded(headers: &mut HeaderMap, policy: &HeaderPolicy, cookies: bool) {
    let capacity = headers.keys_len() + 6;
    let incoming = std::mem::replace(headers, HeaderMap::with_capacity(capacity));
    // The entry of the header whose further values follow (`None` names in the iteration).
    let mut kept: Option<header::OccupiedEntry<'_, HeaderValue>> = None;
    for (name, value) in incoming {
        match name {
            Some(name) => {
                kept = None;
                if policy.forwards(&name, cookies) {
                    kept = Some(match headers.entry(name) {
                        Entry::Vacant(vacant) => vacant.insert_entry(value),
                        Entry::Occupied(mut occupied) => {
                            occupied.append(value);
                            occupied
                        }
                    });
                }
            }
            None => {
                if let Some(entry) = kept.as_mut() {
                    entry.append(value);
                }
            }
        }
    }
}

/// The headers a request's `Connection` names besides `keep-alive`, `close`, `upgrade` and `te`
/// (which name no header that crosses anyway); `None`, without allocating, for the usual
/// request.
fn connection_named(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let values = headers.get_all(header::CONNECTION);
    let usual = values.iter().all(|value| {
        value.as_bytes().split(|b| *b == b',').all(|token| {
            let token = token.trim_ascii();
            token.is_empty()
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"upgrade")
                || token.eq_ignore_ascii_case(b"te")
        })
    });
    if usual {
        return None;
    }
    Some(
        values
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect(),
    )
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

/// Whether a message's `Transfer-Encoding` names no coding but `chunked`, at most once: what
/// hyper takes off whole. Under any other (`gzip, chunked`) the body hyper reads is still
/// coded (and `chunked, chunked` leaves one framing in it), which the message would no longer
/// say once the hop-by-hop header is gone.
pub(super) fn only_chunked(headers: &HeaderMap) -> bool {
    let codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    let mut chunked = false;
    for coding in codings {
        if !coding.eq_ignore_ascii_case(b"chunked") || chunked {
            return false;
        }
        chunked = true;
    }
    true
}

/// Removes the hop-by-hop headers and those the `Connection` header names, from a request or a
/// response; whether a `Transfer-Encoding` was among them.
pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // Most messages carry none: one pass over the names (cheap comparisons) before any removal.
    if !headers.keys().any(is_hop_by_hop) {
        return false;
    }
    let coded = headers.contains_key(header::TRANSFER_ENCODING);
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
    coded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::FhirVersion;

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

    fn upstream(auth: Option<&str>) -> Upstream {
        let upstream = Upstream::parse("http://ehr:9001/fhir", FhirVersion::Stu3).unwrap();
        match auth {
            Some(auth) => upstream.with_authorization(auth).unwrap(),
            None => upstream,
        }
    }

    /// The header policy of a proxy built for `public_base`, with the defaults.
    fn config_for(public_base: &str) -> HeaderPolicy {
        HeaderPolicy::new(
            &UpstreamBase::parse(public_base).unwrap(),
            false,
            Vec::new(),
        )
    }

    use crate::testing::headers;

    fn all(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn the_allowlist_and_the_policy_agree() {
        for name in FORWARDED_REQUEST_HEADERS {
            assert_eq!(policy(name), Policy::Forward, "{name}");
            // Each is a valid, lower-case header name.
            assert_eq!(HeaderName::from_static(name).as_str(), name);
        }
        for name in [
            "host",
            "authorization",
            "accept-encoding",
            "accept-charset",
            "referer",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-tenant-id",
            "sec-fetch-mode",
            "range",
            "expect",
            "connection",
            "transfer-encoding",
            "acceptx",
            "Accept",
        ] {
            assert_eq!(policy(name), Policy::Drop, "{name}");
        }
        assert_eq!(policy("cookie"), Policy::Cookie);
        for name in FORWARDING_CHAIN_HEADERS {
            assert_eq!(policy(name), Policy::Chain, "{name}");
        }
    }

    #[test]
    fn only_the_allowlist_crosses() {
        let mut sent: Vec<(&str, &str)> = FORWARDED_REQUEST_HEADERS
            .iter()
            .map(|name| (*name, "1"))
            .collect();
        sent.extend([
            ("accept", "application/fhir+xml;q=0.9"),
            ("prefer", "handling=strict"),
            ("cookie", "session=tenant-a"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-url", "/other"),
            ("x-rewrite-url", "/other"),
            ("accept-encoding", "gzip"),
            ("referer", "https://app.example/patient/123"),
            ("sec-fetch-mode", "cors"),
            ("x-made-up", "1"),
            ("x-made-up", "2"),
        ]);
        let mut h = headers(&sent);
        prepare_request_headers(&mut h, &upstream(None), None, &config_for("https://gw"));
        for name in FORWARDED_REQUEST_HEADERS {
            assert!(h.contains_key(name), "{name} was dropped");
        }
        // Every value of a repeated header, in order.
        assert_eq!(all(&h, "accept"), ["1", "application/fhir+xml;q=0.9"]);
        assert_eq!(all(&h, "prefer"), ["1", "handling=strict"]);
        let forwarded = FORWARDED_REQUEST_HEADERS.len();
        let written = [
            "host",
            "forwarded",
            "x-forwarded-proto",
            "x-forwarded-host",
            "accept-encoding",
        ];
        assert_eq!(h.keys_len(), forwarded + written.len(), "{h:?}");
        // The client's coding dropped, and `identity` asked for: a request without
        // `Accept-Encoding` takes any coding, and a compressed answer is not rewritten.
        assert_eq!(all(&h, "accept-encoding"), ["identity"]);

        // A cookie crosses to an upstream that takes part in cookies; configured headers too.
        let extra = vec![
            HeaderName::from_static("x-made-up"),
            HeaderName::from_static("accept"),
            HeaderName::from_static("x-made-up"),
        ];
        let configured =
            HeaderPolicy::new(&UpstreamBase::parse("https://gw").unwrap(), false, extra);
        assert_eq!(
            configured.extra.len(),
            1,
            "duplicates and defaults left out"
        );
        let mut h = headers(&sent);
        let cookies = upstream(None).with_set_cookie_allowed();
        prepare_request_headers(&mut h, &cookies, None, &configured);
        assert_eq!(h["cookie"], "session=tenant-a");
        assert_eq!(all(&h, "x-made-up"), ["1", "2"]);
        assert!(!h.contains_key("x-http-method-override"));
        assert_eq!(all(&h, "accept-encoding"), ["identity"]);

        // `Accept-Encoding` configured to cross: the client's, as sent.
        let codings = HeaderPolicy::new(
            &UpstreamBase::parse("https://gw").unwrap(),
            false,
            vec![header::ACCEPT_ENCODING],
        );
        let mut h = headers(&sent);
        prepare_request_headers(&mut h, &upstream(None), None, &codings);
        assert_eq!(all(&h, "accept-encoding"), ["gzip"]);
    }

    #[test]
    fn cookie_fields_are_joined_into_one_for_an_upstream_that_takes_cookies() {
        // An HTTP/2 client sends a field a cookie (RFC 9113 §8.2.3).
        let sent = [
            ("cookie", "sid=abc"),
            ("accept", "application/fhir+json"),
            ("cookie", "lang=en"),
            ("cookie", "a=1; b=2"),
        ];
        let cookies = upstream(None).with_set_cookie_allowed();
        let mut h = headers(&sent);
        prepare_request_headers(&mut h, &cookies, None, &config_for("https://gw"));
        assert_eq!(all(&h, "cookie"), ["sid=abc; lang=en; a=1; b=2"]);
        let mut one = headers(&[("cookie", "sid=abc")]);
        prepare_request_headers(&mut one, &cookies, None, &config_for("https://gw"));
        assert_eq!(all(&one, "cookie"), ["sid=abc"]);
        // None for an upstream that does not take part in cookies.
        let mut h = headers(&sent);
        prepare_request_headers(&mut h, &upstream(None), None, &config_for("https://gw"));
        assert!(!h.contains_key("cookie"));
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_named_as_ipv4() {
        let client = ClientAddr("[::ffff:192.0.2.7]:4000".parse().unwrap());
        let mut h = HeaderMap::new();
        prepare_request_headers(
            &mut h,
            &upstream(None),
            Some(client),
            &config_for("https://gw"),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .starts_with("for=192.0.2.7;"),
            "{:?}",
            h["forwarded"]
        );
    }

    #[test]
    fn few_or_many_names_to_drop_leave_the_same_headers() {
        // Up to 8 names are removed in place, more rebuild the map: both keep exactly the
        // allowed headers, every value in order.
        for dropped in 0..=12 {
            let mut sent: Vec<(String, String)> = vec![
                ("accept".into(), "application/fhir+json".into()),
                ("if-match".into(), "W/\"1\"".into()),
            ];
            for i in 0..dropped {
                sent.push((format!("x-dropped-{i}"), "v".into()));
                sent.push(("accept".into(), format!("application/fhir+xml;q=0.{i}")));
            }
            let sent: Vec<(&str, &str)> =
                sent.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let mut h = headers(&sent);
            prepare_request_headers(&mut h, &upstream(None), None, &config_for("https://gw"));
            let accepts: Vec<String> = std::iter::once("application/fhir+json".to_owned())
                .chain((0..dropped).map(|i| format!("application/fhir+xml;q=0.{i}")))
                .collect();
            assert_eq!(all(&h, "accept"), accepts, "{dropped} dropped");
            assert_eq!(h["if-match"], "W/\"1\"");
            assert!(
                h.keys().all(|name| !name.as_str().starts_with("x-dropped")),
                "{dropped} dropped: {h:?}"
            );
        }
    }

    #[test]
    fn connection_named_headers_go_even_when_allowed() {
        let mut h = headers(&[
            ("connection", "Keep-Alive"),
            ("connection", "prefer, close"),
            ("prefer", "return=minimal"),
            ("accept", "application/fhir+json"),
        ]);
        prepare_request_headers(&mut h, &upstream(None), None, &config_for("http://gw"));
        assert!(!h.contains_key("prefer"));
        assert!(!h.contains_key("connection"));
        assert_eq!(h["accept"], "application/fhir+json");
        assert!(connection_named(&headers(&[("connection", "keep-alive , Close")])).is_none());
        assert!(connection_named(&headers(&[("accept", "x/y")])).is_none());
    }

    #[test]
    fn the_gateways_public_address_is_forwarded_whatever_the_client_says() {
        let mut h = headers(&[
            ("host", "evil.example"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=6.6.6.6;proto=http;host=\"evil.example\""),
        ]);
        let client = ClientAddr("10.1.2.3:4".parse().unwrap());
        prepare_request_headers(
            &mut h,
            &upstream(None),
            Some(client),
            &config_for("https://gw.example:8443/fhir"),
        );
        assert_eq!(h["host"], "ehr:9001");
        assert_eq!(h["x-forwarded-host"], "gw.example:8443");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            all(&h, "forwarded"),
            ["for=10.1.2.3;proto=https;host=\"gw.example:8443\""]
        );
        // Trusted chains are extended, but the host and protocol are still the gateway's.
        let trusted = HeaderPolicy::new(
            &UpstreamBase::parse("http://gw.example").unwrap(),
            true,
            Vec::new(),
        );
        let mut h = headers(&[
            ("host", "evil.example"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        prepare_request_headers(&mut h, &upstream(None), Some(client), &trusted);
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(
            all(&h, "forwarded"),
            ["for=6.6.6.6, for=10.1.2.3;proto=http;host=\"gw.example\""]
        );
    }

    #[test]
    fn managed_headers_cannot_be_configured_to_cross() {
        for name in [
            "host",
            "authorization",
            "cookie",
            "connection",
            "te",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-real-ip",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-original-url",
            "x-original-uri",
            "x-rewrite-url",
            "x-cascade",
        ] {
            assert!(
                unforwardable(&HeaderName::from_static(name)).is_some(),
                "{name}"
            );
        }
        for name in ["x-api-key", "range", "accept-encoding", "accept"] {
            assert!(
                unforwardable(&HeaderName::from_static(name)).is_none(),
                "{name}"
            );
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
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(
            all(&h, "forwarded"),
            ["for=127.0.0.7;proto=https;host=\"gw.example\""]
        );
        for gone in ["x-real-ip", "x-forwarded-prefix", "x-forwarded-port"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        // Behind a proxy of yours that sets them, they are extended.
        let trusted = HeaderPolicy::new(
            &UpstreamBase::parse("https://gw.example").unwrap(),
            true,
            Vec::new(),
        );
        let mut h = sent;
        prepare_request_headers(&mut h, &upstream(None), Some(client), &trusted);
        assert_eq!(all(&h, "x-forwarded-for"), ["10.0.0.1, 127.0.0.7"]);
        assert_eq!(h["x-forwarded-prefix"], "/tenant-b");
        assert_eq!(
            all(&h, "forwarded"),
            [
                "for=6.6.6.6;host=\"tenant-b.example\", for=127.0.0.7;proto=https;host=\"gw.example\""
            ]
        );

        let mut h = headers(&[("authorization", "Bearer client-token")]);
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
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";proto=http;host=\"gw.example\""
        );
        assert_eq!(h["x-forwarded-for"], "::1");

        // No address: `unknown`, and no `X-Forwarded-For`.
        let mut h = headers(&[("x-forwarded-for", "6.6.6.6")]);
        prepare_request_headers(&mut h, &upstream(None), None, &config_for("http://gw"));
        assert_eq!(h["forwarded"], "for=unknown;proto=http;host=\"gw\"");
        assert!(!h.contains_key("x-forwarded-for"));
    }
}
