//! Request headers as the upstream must see them: hop-by-hop headers removed, `Host` and
//! credentials the upstream's, the `Forwarded`/`X-Forwarded-*` chain started or extended.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

use crate::client_addr::ClientAddr;
use crate::route::{Upstream, UpstreamBase};

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

/// What the forwarding headers say of the gateway, and whether a client's own are believed.
pub(super) struct Forwarding {
    public_scheme: String,
    forwarded_proto: HeaderValue,
    // Extend the client's `Forwarded`/`X-Forwarded-For` chains rather than start new ones.
    trust_forwarded: bool,
}

impl Forwarding {
    /// For a gateway known to its clients as `public`; `trust_forwarded` extends the chains a
    /// request arrives with rather than replacing them.
    pub(super) fn new(public: &UpstreamBase, trust_forwarded: bool) -> Self {
        let public_scheme = public.scheme().as_str().to_owned();
        Self {
            forwarded_proto: HeaderValue::from_str(&public_scheme)
                .unwrap_or(HeaderValue::from_static("http")),
            public_scheme,
            trust_forwarded,
        }
    }
}

/// Headers as the upstream must see them: hop-by-hop gone, `Host` the upstream's, the client's
/// credentials replaced by the gateway's own, the forwarding chain started (or, when trusted,
/// extended).
pub(super) fn prepare_request_headers(
    headers: &mut HeaderMap,
    upstream: &Upstream,
    client: Option<ClientAddr>,
    forwarding: &Forwarding,
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
    forwarded.push_str(&forwarding.public_scheme);
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
    if !forwarding.trust_forwarded
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
    headers.insert(X_FORWARDED_PROTO, forwarding.forwarded_proto.clone());
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

/// Removes the hop-by-hop headers and those the `Connection` header names, from a request or a
/// response.
pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap) {
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

    /// The forwarding configuration of a proxy built for `public_base`.
    fn config_for(public_base: &str) -> Forwarding {
        Forwarding::new(&UpstreamBase::parse(public_base).unwrap(), false)
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
        let trusted = Forwarding::new(&UpstreamBase::parse("https://gw.example").unwrap(), true);
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
}
