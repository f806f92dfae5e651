//! Rewriting the upstream's base URL to the gateway's, so links lead back through the gateway.
//!
//! Done on the bytes rather than by re-serializing JSON: everything but the rewritten URLs
//! stays exactly as the upstream sent it (key order, spacing, numbers).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

/// Rewrites URLs under `from` (the upstream base) to `to` (the gateway's public base).
#[derive(Debug, Clone)]
pub(crate) struct BaseRewriter {
    from: Arc<str>,
    to: Arc<str>,
}

impl BaseRewriter {
    pub(crate) fn new(from: Arc<str>, to: Arc<str>) -> Self {
        Self { from, to }
    }

    /// The upstream's base URL, for the log.
    pub(crate) fn upstream(&self) -> &str {
        &self.from
    }

    /// The URL with its upstream base replaced, or `None` when it is not under that base.
    pub(crate) fn url(&self, url: &str) -> Option<String> {
        let taken = self.base_len(url.as_bytes())?;
        Some(format!("{}{}", self.to, &url[taken..]))
    }

    /// How much of `text`'s start is the upstream's base, when it starts with it (ended at a
    /// boundary): its own URL, or the gateway's origin with the upstream's base path, which an
    /// upstream that builds its links from the `X-Forwarded-Host` and `-Proto` the proxy sends
    /// writes (HAPI's `ApacheProxyAddressStrategy`, Spring's forwarded-header filter): a client
    /// following one would reach the gateway at the upstream's path, under which the gateway
    /// serves nothing. A URL whose path climbs back out of the base ([`climbs_out`]) is not
    /// under it.
    fn base_len(&self, text: &[u8]) -> Option<usize> {
        let from = self.from.as_bytes();
        if text.starts_with(from) && under(&text[from.len()..]) {
            return Some(from.len());
        }
        let (origin, path) = self.forwarded_base()?;
        let rest = text.strip_prefix(origin.as_bytes())?;
        let rest = rest.strip_prefix(path.as_bytes())?;
        under(rest).then_some(origin.len() + path.len())
    }

    /// The gateway's origin and the upstream's base path, when that path is not the gateway's
    /// own (else the URL is the gateway's already): see [`base_len`](Self::base_len).
    fn forwarded_base(&self) -> Option<(&str, &str)> {
        let (scheme, authority, public_path) = split_url(&self.to)?;
        let (_, _, path) = split_url(&self.from)?;
        let path = path.trim_end_matches('/');
        if path.is_empty() || path == public_path.trim_end_matches('/') {
            return None;
        }
        Some((&self.to[..scheme.len() + 3 + authority.len()], path))
    }

    /// [`url`](Self::url) for a header's URL (`Location`, `Content-Location`, a `Link`
    /// target, a Bundle's link), read as a client resolves it: the scheme and host in any
    /// case, the scheme's default port written or not, any user information, and a
    /// path-absolute reference (`/fhir/Patient/1`) under the base's path, which the client
    /// would resolve against the gateway.
    pub(crate) fn header_url(&self, url: &str) -> Option<String> {
        if let Some(rewritten) = self.url(url) {
            return Some(rewritten);
        }
        let (scheme, authority, path) = split_url(&self.from)?;
        let rest = if url.starts_with('/') && !url.starts_with("//") {
            url
        } else {
            let (their_scheme, after) = url.split_once("://")?;
            let end = after.find(['/', '?', '#']).unwrap_or(after.len());
            // User information (`http://user:secret@ehr/fhir/...`) names the same server:
            // rewritten, it is gone.
            let theirs = after[..end]
                .rsplit_once('@')
                .map_or(&after[..end], |(_, host)| host);
            if !their_scheme.eq_ignore_ascii_case(scheme)
                || !same_authority(scheme, theirs, authority)
            {
                return None;
            }
            &after[end..]
        };
        let rest = rest.strip_prefix(path)?;
        under(rest.as_bytes()).then(|| format!("{}{rest}", self.to))
    }

    /// Whether `url` is under the gateway's public base already, read as a client resolves it
    /// (the scheme and host in any case, the default port written or not): an upstream that
    /// knows the gateway's address (HAPI's `server_address` set to it) writes its links so.
    pub(crate) fn is_public(&self, url: &str) -> bool {
        let (Some((scheme, authority, path)), Some((their_scheme, after))) =
            (split_url(&self.to), url.split_once("://"))
        else {
            return false;
        };
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        their_scheme.eq_ignore_ascii_case(scheme)
            && same_authority(scheme, &after[..end], authority)
            && after[end..]
                .strip_prefix(path.trim_end_matches('/'))
                .is_some_and(|rest| under(rest.as_bytes()))
    }

    /// A `Link` header's value (RFC 8288) with each target (`<...>`) under the upstream base
    /// rewritten, and each link whose target would show the client where the upstream is
    /// ([`reveals_upstream`](Self::reveals_upstream): its host outside the base, user
    /// information, a private address) left out; a value that is no list of links is dropped
    /// whole.
    pub(crate) fn link(&self, value: &str) -> Links {
        let Some(links) = link_values(value) else {
            return Links::Dropped;
        };
        let mut out = String::with_capacity(value.len());
        let (mut changed, mut left_out) = (false, false);
        for (link, target) in links {
            let (before, after) = (
                &value[link.start..target.start],
                &value[target.end..link.end],
            );
            // A parameter's URL (an `anchor`, an extension relation) is read as a target.
            // The parameters that hold URLs (RFC 8288): `anchor`, and `rel`/`rev`, whose
            // space-separated relation types may be URLs; a title or a media query is text.
            let leads = |url: &str| self.header_url(url).is_some() || self.reveals_upstream(url);
            let parameters_reveal = after.split(';').skip(1).any(|parameter| {
                let Some((name, value)) = parameter.split_once('=') else {
                    return false;
                };
                let name = name.trim();
                // (A browser drops the spaces around a URL.)
                let value = value.trim().trim_matches('"').trim();
                if name.eq_ignore_ascii_case("anchor") {
                    leads(value)
                } else if name.eq_ignore_ascii_case("rel") || name.eq_ignore_ascii_case("rev") {
                    value
                        .split_ascii_whitespace()
                        .any(|relation| relation.contains(':') && leads(relation))
                } else {
                    false
                }
            });
            if parameters_reveal {
                (changed, left_out) = (true, true);
                continue;
            }
            let kept = match self.header_url(&value[target.clone()]) {
                Some(rewritten) => {
                    changed = true;
                    Some(rewritten)
                }
                None if self.reveals_upstream(&value[target.clone()]) => {
                    (changed, left_out) = (true, true);
                    None
                }
                None => Some(value[target].to_owned()),
            };
            if let Some(target) = kept {
                if !out.is_empty() {
                    out.push_str(", ");
                }
                out.push_str(before);
                out.push_str(&target);
                out.push_str(after);
            }
        }
        match (changed, out.is_empty()) {
            (false, _) => Links::Unchanged,
            (true, true) => Links::Dropped,
            (true, false) => Links::Rewritten(out, left_out),
        }
    }

    /// Whether a URL not under the base (nor rewritten) would show a client where the upstream
    /// is, or hand it what no link should carry, read as a browser's URL parser (WHATWG) reads
    /// an `http`/`https` URL (any run of slashes after the scheme, hosts in numbers): the
    /// upstream's host (in any case, at any port) outside its base, user information, a host
    /// no client outside reaches ([`internal_host`]), a percent-encoded host, a space, a
    /// backslash or a control character. Relative references, which resolve against the
    /// gateway, and other hosts (a profile's canonical URL at `hl7.org`) do not.
    pub(crate) fn reveals_upstream(&self, url: &str) -> bool {
        if url
            .bytes()
            .any(|b| b == b'\\' || b == b' ' || b.is_ascii_control())
        {
            return true;
        }
        let after = match url.split_once(':') {
            Some((scheme, after))
                if ["http", "https", "ws", "wss", "ftp"]
                    .iter()
                    .any(|special| scheme.eq_ignore_ascii_case(special)) =>
            {
                after.trim_start_matches('/')
            }
            Some((scheme, after))
                if !scheme.is_empty()
                    && !scheme.contains(['/', '?', '#'])
                    && after.starts_with("//") =>
            {
                &after[2..]
            }
            _ => match url.strip_prefix("//") {
                Some(after) => after,
                None => return false,
            },
        };
        let authority = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
        if authority.contains(['@', '%']) {
            return true;
        }
        let host = host_of(authority);
        let ours = split_url(&self.from).map(|(_, authority, _)| host_of(authority));
        let same = |ours: String| {
            ours == host
                || matches!(
                    (ours.parse::<std::net::IpAddr>(), host.parse::<std::net::IpAddr>()),
                    (Ok(a), Ok(b)) if a == b
                )
        };
        ours.is_some_and(same) || internal_host(&host)
    }

    /// A FHIR JSON Bundle the server answered with (a `searchset`, `history`,
    /// `batch-response` or `transaction-response`) with its own `link[].url`,
    /// `entry[].fullUrl` and `entry[].response.location` under the upstream base rewritten;
    /// `None` when the body is no such Bundle or holds nothing to rewrite. Nothing inside the
    /// entries' resources is touched (a canonical `url`, an extension's, a Bundle within), and
    /// a Bundle read as a resource (a `document`, a `collection`) is left whole, so resources
    /// read are the ones the upstream holds.
    ///
    /// A link written with escapes (`http:\/\/ehr\/fhir\/Patient\/1`, as PHP's
    /// `json_encode` writes every `/`) is read as a JSON reader reads it: under the base, it is
    /// written anew, rewritten, with only the escapes JSON needs.
    pub(crate) fn bundle(&self, body: &[u8]) -> Option<Bytes> {
        // Cheap tests first: most responses are no Bundle (its searcher is built once), or
        // hold no upstream URL, as written or escaped.
        find_bundle(body)?;
        if !self.may_hold_upstream_urls(body, b'\\') {
            return None;
        }
        let values = bundle_links(body)?;
        let mut out: Vec<u8> = Vec::new();
        let mut copied = 0;
        for value in values {
            let rest = &body[value.clone()];
            if let Some(taken) = self.base_len(rest) {
                out.extend_from_slice(&body[copied..value.start]);
                out.extend_from_slice(self.to.as_bytes());
                copied = value.start + taken;
            } else if memchr::memchr(b'\\', rest).is_some() {
                // The value with its quotes, read as JSON.
                let quoted = &body[value.start - 1..value.end + 1];
                let Some(rewritten) = serde_json::from_slice::<String>(quoted)
                    .ok()
                    .and_then(|url| self.header_url(&url))
                else {
                    continue;
                };
                out.extend_from_slice(&body[copied..value.start - 1]);
                out.extend_from_slice(Value::String(rewritten).to_string().as_bytes());
                copied = value.end + 1;
            } else if let Some(rewritten) = std::str::from_utf8(rest)
                .ok()
                .and_then(|url| self.header_url(url))
            {
                // Another spelling of the base (the scheme or host in capitals, the default
                // port written, user information, a path-absolute reference): read as a client
                // resolves it. Without escapes, nothing to escape.
                out.extend_from_slice(&body[copied..value.start]);
                out.extend_from_slice(rewritten.as_bytes());
                copied = value.end;
            }
        }
        if copied == 0 {
            return None;
        }
        out.extend_from_slice(&body[copied..]);
        Some(Bytes::from(out))
    }

    /// [`bundle`](Self::bundle) for a FHIR XML Bundle: its own `link/url`, `entry/fullUrl`
    /// and `entry/response/location` `value`s under the upstream base rewritten, everything
    /// else byte for byte as the upstream wrote it; `None` when the body is no such Bundle
    /// (another root, a prefixed one, a `document` or `collection`, an XML form this reader
    /// does not take: a `DOCTYPE`, a tag it cannot read) or holds nothing to rewrite.
    pub(crate) fn xml_bundle(&self, body: &[u8]) -> Option<Bytes> {
        find(body, b"<Bundle")?;
        // No upstream URL, as written or behind a reference: nothing to scan for.
        if !self.may_hold_upstream_urls(body, b'&') {
            return None;
        }
        let values = xml_bundle_links(body)?;
        let mut out: Vec<u8> = Vec::new();
        let mut copied = 0;
        for value in values {
            let Some(url) = crate::xml::unescape(&body[value.clone()]) else {
                continue;
            };
            let Some(rewritten) = self.header_url(&url) else {
                continue;
            };
            out.extend_from_slice(&body[copied..value.start]);
            crate::outcome::xml_escape_attribute(&mut out, &rewritten);
            copied = value.end;
        }
        if copied == 0 {
            return None;
        }
        out.extend_from_slice(&body[copied..]);
        Some(Bytes::from(out))
    }
}

impl BaseRewriter {
    /// Whether `body` may hold a URL under the upstream base, in any spelling a client
    /// resolves as one (see [`header_url`](Self::header_url)), or written with `escape` (JSON's
    /// `\\`, XML's `&`): the base as written, the gateway's origin with the base's path, or
    /// the base's path (in every other spelling). A base at the root of its host has no path
    /// to look for: every Bundle is read.
    fn may_hold_upstream_urls(&self, body: &[u8], escape: u8) -> bool {
        let path = split_url(&self.from).map_or("", |(_, _, path)| path.trim_end_matches('/'));
        path.is_empty()
            || find(body, path.as_bytes()).is_some()
            || memchr::memchr(escape, body).is_some()
            || self
                .forwarded_base()
                .is_some_and(|(origin, _)| find(body, origin.as_bytes()).is_some())
    }
}

/// Where a JSON value stands, as far as a Bundle's links go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The top-level object.
    Root,
    /// `link`, and one of its objects.
    Links,
    Link,
    /// `entry`, one of its objects, and its `response`.
    Entries,
    Entry,
    Response,
    /// Anywhere else (an entry's resource included).
    Other,
}

impl Place {
    /// The place of the value under `key` of an object here (`None`: an element of an array
    /// here).
    fn child(self, key: Option<&[u8]>) -> Self {
        match (self, key) {
            (Self::Root, Some(b"link")) => Self::Links,
            (Self::Root, Some(b"entry")) => Self::Entries,
            (Self::Links, None) => Self::Link,
            (Self::Entries, None) => Self::Entry,
            (Self::Entry, Some(b"response")) => Self::Response,
            _ => Self::Other,
        }
    }

    /// Whether the string under `key` of an object here is a link to rewrite.
    fn holds_link(self, key: &[u8]) -> bool {
        matches!(
            (self, key),
            (Self::Link, b"url") | (Self::Entry, b"fullUrl") | (Self::Response, b"location")
        )
    }
}

/// The `Bundle.type`s a server makes as its answer, whose links lead to it: a search's, a
/// history's, a batch's or a transaction's. Any other Bundle (a `document`, a `collection`, a
/// `message`, a `transaction` stored as it was sent) is a resource the server holds, read as
/// any other (`GET /Bundle/1`): a document's signature covers its `fullUrl`s.
const ANSWER_TYPES: [&[u8]; 4] = [
    b"searchset",
    b"history",
    b"batch-response",
    b"transaction-response",
];

/// The byte ranges (inside the quotes) of a JSON Bundle's `link[].url`, `entry[].fullUrl`
/// and `entry[].response.location` string values, in order; `None` when the body is not a
/// JSON object whose `resourceType` is `"Bundle"` and whose `type` is one of
/// [`ANSWER_TYPES`], or is cut short. Keys are compared as
/// written (one spelt with escapes is no link key: left as it is). A scan of the structure
/// only: string contents are skipped with `memchr`.
fn bundle_links(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    // Each open object or array: its place, and (objects) the key whose value comes next.
    struct Open<'a> {
        place: Place,
        object: bool,
        key: Option<&'a [u8]>,
    }
    let mut stack: Vec<Open<'_>> = Vec::new();
    let mut links = Vec::new();
    let mut bundle = false;
    // Whether its `type` is one the server makes as an answer.
    let mut answer = false;
    // Inside an object: whether the next string is a key (else a value).
    let mut expect_key = false;
    let mut at = 0;
    while at < body.len() {
        match body[at] {
            b'{' | b'[' => {
                let object = body[at] == b'{';
                let place = match stack.last() {
                    None => Place::Root,
                    Some(open) if open.object => open.place.child(open.key),
                    Some(open) => open.place.child(None),
                };
                if stack.is_empty() && !object {
                    return None;
                }
                stack.push(Open {
                    place,
                    object,
                    key: None,
                });
                expect_key = object;
                at += 1;
            }
            b'}' | b']' => {
                stack.pop()?;
                if stack.is_empty() {
                    // The top-level value ends: only white space may follow.
                    return (bundle
                        && answer
                        && body[at + 1..].iter().all(u8::is_ascii_whitespace))
                    .then_some(links);
                }
                expect_key = false;
                at += 1;
            }
            b'"' => {
                let start = at + 1;
                let end = string_end(body, start)?;
                let text = &body[start..end];
                let open = stack.last_mut()?;
                if open.object && expect_key {
                    open.key = Some(text);
                    expect_key = false;
                } else if open.object {
                    let key = open.key.unwrap_or_default();
                    if open.place.holds_link(key) {
                        links.push(start..end);
                    } else if open.place == Place::Root && key == b"resourceType" {
                        bundle = text == b"Bundle";
                    } else if open.place == Place::Root && key == b"type" {
                        answer = ANSWER_TYPES.contains(&text);
                    }
                }
                at = end + 1;
            }
            b',' => {
                expect_key = stack.last().is_some_and(|open| open.object);
                at += 1;
            }
            // `:`, white space, numbers, `true`, `false`, `null`.
            _ => at += 1,
        }
    }
    None
}

/// Where the JSON string starting at `start` (after its opening quote) ends: its closing
/// quote's index.
fn string_end(body: &[u8], mut start: usize) -> Option<usize> {
    loop {
        let at = start + memchr::memchr2(b'"', b'\\', &body[start..])?;
        if body[at] == b'"' {
            return Some(at);
        }
        // An escape: the next byte is escaped, whatever it is.
        start = at + 2;
        if start > body.len() {
            return None;
        }
    }
}

/// A base URL's scheme, authority and path (`http`, `ehr:9001`, `/fhir`).
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let end = after.find('/').unwrap_or(after.len());
    Some((scheme, &after[..end], &after[end..]))
}

/// What [`BaseRewriter::link`] made of a `Link` header's value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Links {
    /// Nothing to rewrite or leave out: as the upstream wrote it.
    Unchanged,
    /// Its targets under the base rewritten, or some links left out (then `true`).
    Rewritten(String, bool),
    /// Nothing left: every link was left out, or it is no list of links.
    Dropped,
}

/// A `Link` value's links (RFC 8288 §3): each one's range, and its target's (inside `<>`);
/// `None` when the value is no such list (a link that does not start with `<...>`, a quoted
/// string left open).
fn link_values(value: &str) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
    let bytes = value.as_bytes();
    let mut links = Vec::new();
    let mut at = 0;
    loop {
        while at < bytes.len() && matches!(bytes[at], b' ' | b'\t' | b',') {
            at += 1;
        }
        if at == bytes.len() {
            return Some(links);
        }
        if bytes[at] != b'<' {
            return None;
        }
        let start = at;
        let close = at + value[at..].find('>')?;
        let target = at + 1..close;
        at = close + 1;
        // Its parameters, up to a `,` outside a quoted string.
        let mut quoted = false;
        while at < bytes.len() {
            match (quoted, bytes[at]) {
                (false, b',') => break,
                (false, b'"') => quoted = true,
                (true, b'\\') => at += 1,
                (true, b'"') => quoted = false,
                _ => {}
            }
            at += 1;
        }
        if quoted {
            return None;
        }
        let end = start + value[start..at.min(bytes.len())].trim_end().len();
        links.push((start..end, target));
    }
}

/// An authority's host, lower case, without user information, port, brackets or a final dot.
fn host_of(authority: &str) -> String {
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host.strip_prefix('[') {
        Some(literal) => literal.split(']').next().unwrap_or(literal),
        None => host.split(':').next().unwrap_or(host),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host` (lower case, no port) is one no client outside reaches: an IP address that
/// is loopback, private, shared (100.64/10), link-local, unique local or unspecified (IPv4 in
/// any notation a browser reads: `127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`; an IPv4
/// address mapped into or compatible with IPv6 as itself), or a name of one label
/// (`localhost`, `ehr-server`) or under a name private networks use (`localhost`, `local`,
/// `internal`, `lan`, `localdomain`, `intranet`, `corp`, `home.arpa`, Kubernetes' `svc`).
fn internal_host(host: &str) -> bool {
    let v4 = |ip: std::net::Ipv4Addr| {
        let [a, b, ..] = ip.octets();
        ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_unspecified()
            || (a == 100 && b & 0xC0 == 64)
    };
    if let Ok(ip) = host.parse::<std::net::Ipv6Addr>() {
        let segments = ip.segments();
        let octets = ip.octets();
        let embedded = |at: usize| {
            std::net::Ipv4Addr::new(octets[at], octets[at + 1], octets[at + 2], octets[at + 3])
        };
        return ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_unique_local()
            || ip.is_unicast_link_local()
            // Site-local (deprecated, still routed inside some networks).
            || segments[0] & 0xffc0 == 0xfec0
            || ip.to_ipv4().is_some_and(v4)
            // NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48): the IPv4 address last.
            || (segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && v4(embedded(12)))
            || (segments[..2] == [0x64, 0xff9b] && segments[2] == 1)
            // 6to4 (2002::/16): the IPv4 address after the prefix.
            || (segments[0] == 0x2002 && v4(embedded(2)));
    }
    // A browser reads a host whose last label is a number as an IPv4 address, in any base:
    // only the dotted-decimal form of a public address passes.
    let last = host.rsplit('.').next().unwrap_or(host);
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit())));
    if numeric {
        return host.parse::<std::net::Ipv4Addr>().map_or(true, v4)
            || host
                .split('.')
                .any(|label| label.len() > 1 && label.starts_with('0'));
    }
    !host.contains('.')
        || [
            "localhost",
            "local",
            "internal",
            "lan",
            "localdomain",
            "intranet",
            "corp",
            "svc",
        ]
        .contains(&last)
        || host.ends_with(".home.arpa")
}

/// Whether two authorities name one host and port to a client: the host in any case, the
/// scheme's default port written or not. (User information never matches.)
fn same_authority(scheme: &str, theirs: &str, ours: &str) -> bool {
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    let parts = |authority: &str| -> Option<(String, u16)> {
        if authority.contains('@') {
            return None;
        }
        // An IPv6 literal's colons are inside its brackets.
        let port_at = authority
            .rfind(':')
            .filter(|&at| !authority[at..].contains(']'));
        let (host, port) = match port_at {
            Some(at) => (&authority[..at], authority[at + 1..].parse().ok()?),
            None => (authority, default),
        };
        Some((host.to_ascii_lowercase(), port))
    };
    matches!((parts(theirs), parts(ours)), (Some(a), Some(b)) if a == b)
}

/// Whether what follows the base ends it: a path, a query, the end of the string.
fn at_boundary(rest: &[u8]) -> bool {
    matches!(rest.first(), None | Some(b'/' | b'?' | b'#'))
}

/// Whether what follows a base leaves a URL under it: it ends the base ([`at_boundary`]),
/// holds only what a URL may ([`url_bytes`]), and does not [`climb_out`](climbs_out) of it.
fn under(rest: &[u8]) -> bool {
    at_boundary(rest) && url_bytes(rest) && !climbs_out(rest)
}

/// Whether the path at the start of `rest` (up to a query or a fragment) holds no byte a URL
/// path never does (RFC 3986): no space, control character (which a browser drops:
/// `/.<TAB>./` is `/../`), `"`, `<`, `>`, `\` (a browser's `/`), `^`, `` ` ``, `{`, `|` or `}`. A
/// client's parser may read any of them otherwise than the gateway does
/// (`https://gw"@evil.example/` has `evil.example` for its host), so a URL holding one is not
/// rewritten. (Bytes beyond ASCII, an IRI's, are taken; so is a query's text, which leads
/// nowhere else.)
fn url_bytes(rest: &[u8]) -> bool {
    let end = rest
        .iter()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(rest.len());
    !rest[..end].iter().any(|b| {
        b.is_ascii_control()
            || matches!(
                b,
                b' ' | b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
            )
    })
}

/// Whether the path at the start of `rest` (up to a query or a fragment) holds a `..` segment, also percent-encoded (`%2e%2e`, `.%2E`) or ended by a backslash, as a
/// browser reads one: a client resolving it leaves the base it starts under
/// (`http://ehr/fhir/../admin` is `http://ehr/admin`), so rewritten to the gateway's base it
/// would lead elsewhere on the gateway's origin.
pub(super) fn climbs_out(rest: &[u8]) -> bool {
    let end = rest
        .iter()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(rest.len());
    rest[..end]
        .split(|b| matches!(b, b'/' | b'\\'))
        .any(|segment| {
            let mut dots = 0;
            let mut at = 0;
            while at < segment.len() {
                if segment[at] == b'.' {
                    at += 1;
                } else if segment[at..].len() >= 3
                    && segment[at..at + 2] == *b"%2"
                    && segment[at + 2].eq_ignore_ascii_case(&b'e')
                {
                    at += 3;
                } else {
                    return false;
                }
                dots += 1;
            }
            dots == 2
        })
}

/// The byte ranges (inside the quotes) of a FHIR XML Bundle's `link/url`, `entry/fullUrl` and
/// `entry/response/location` `value` attributes, in order; `None` when the body is not one
/// whole XML Bundle [`crate::xml::bundle_values`] reads, or its `type` is not among
/// [`ANSWER_TYPES`].
fn xml_bundle_links(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let found = crate::xml::bundle_values(
        body,
        &[
            &[b"Bundle", b"link", b"url"],
            &[b"Bundle", b"entry", b"fullUrl"],
            &[b"Bundle", b"entry", b"response", b"location"],
        ],
    )?;
    let kind = &body[found.kind?];
    ANSWER_TYPES.contains(&kind).then_some(found.values)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// `"Bundle"`, searched for in every JSON response: its searcher is built once.
fn find_bundle(haystack: &[u8]) -> Option<usize> {
    static BUNDLE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"Bundle\""));
    BUNDLE.find(haystack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewriter() -> BaseRewriter {
        BaseRewriter::new(
            "http://ehr:9001/fhir/r3".into(),
            "https://gw.example".into(),
        )
    }

    #[test]
    fn rewrites_urls_under_the_base_only() {
        let r = rewriter();
        assert_eq!(
            r.url("http://ehr:9001/fhir/r3/Patient/1").unwrap(),
            "https://gw.example/Patient/1"
        );
        assert_eq!(
            r.url("http://ehr:9001/fhir/r3?_getpages=x").unwrap(),
            "https://gw.example?_getpages=x"
        );
        assert_eq!(
            r.url("http://ehr:9001/fhir/r3").unwrap(),
            "https://gw.example"
        );
        assert_eq!(r.url("http://ehr:9001/fhir/r30/Patient"), None);
        assert_eq!(r.url("http://other/fhir/r3/Patient"), None);
        // A path that climbs back out of the base is not under it: rewritten, it would lead a
        // client (and its token) elsewhere on the gateway's origin.
        for out in [
            "http://ehr:9001/fhir/r3/../admin",
            "http://ehr:9001/fhir/r3/..",
            "http://ehr:9001/fhir/r3/Patient/../../../admin?x=1",
            "http://ehr:9001/fhir/r3/%2e%2e/%2E%2E/admin/tenants",
            "http://ehr:9001/fhir/r3/.%2e/admin",
            "http://ehr:9001/fhir/r3/..\\admin",
            "https://gw.example/fhir/r3/../admin",
        ] {
            assert_eq!(r.url(out), None, "{out}");
            assert_eq!(r.header_url(out), None, "{out}");
        }
        assert_eq!(r.header_url("/fhir/r3/../admin"), None);
        // Bytes no URL holds, which a client's parser reads otherwise: `https://gw.example"@evil
        // .example/` has `evil.example` for its host; a tab is dropped, leaving `..`.
        for odd in [
            "http://ehr:9001/fhir/r3\"@evil.example/Patient",
            "http://ehr:9001/fhir/r3/x\"/../../admin",
            "http://ehr:9001/fhir/r3/.\t./admin",
            "http://ehr:9001/fhir/r3/a b",
            "http://ehr:9001/fhir/r3/{x}",
        ] {
            assert_eq!(r.url(odd), None, "{odd:?}");
            assert_eq!(r.header_url(odd), None, "{odd:?}");
        }
        // Nor in a JSON Bundle, escaped or not (`\u002e\u002e` is `..`).
        for odd in [
            r#"r3\"@evil.example/x"#,
            r#"r3/\u002e\u002e/admin"#,
            r#"r3/.\t./admin"#,
        ] {
            let body = format!(
                r#"{{"resourceType":"Bundle","type":"searchset","link":[{{"url":"http://ehr:9001/fhir/{odd}"}}]}}"#
            );
            assert_eq!(r.bundle(body.as_bytes()), None, "{odd}");
        }
        assert!(!r.is_public("https://gw.example/../admin"));
        let body = br#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":"http://ehr:9001/fhir/r3/../other/Patient"}]}"#;
        assert_eq!(r.bundle(body), None);
        // Dots that are no `..` segment, and `..` in the query, stay under it.
        for kept in [
            "http://ehr:9001/fhir/r3/Patient/a..b",
            "http://ehr:9001/fhir/r3/Patient/.../x",
            "http://ehr:9001/fhir/r3/./Patient",
            "http://ehr:9001/fhir/r3/Patient?path=../x",
            "http://ehr:9001/fhir/r3/Patient#/../x",
        ] {
            assert!(r.url(kept).is_some(), "{kept}");
        }
    }

    #[test]
    fn links_an_upstream_built_from_the_forwarded_host_lead_back_too() {
        // HAPI behind a proxy that says where it is: the gateway's origin, its own path.
        let r = rewriter();
        assert_eq!(
            r.url("https://gw.example/fhir/r3/Patient/1").unwrap(),
            "https://gw.example/Patient/1"
        );
        assert_eq!(
            r.url("https://gw.example/fhir/r3?_getpages=x").unwrap(),
            "https://gw.example?_getpages=x"
        );
        // The gateway's own URLs, and other paths, stay.
        assert_eq!(r.url("https://gw.example/Patient/1"), None);
        assert_eq!(r.url("https://gw.example/fhir/r30/Patient"), None);
        let body = br#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":"https://gw.example/fhir/r3?_getpages=x"}],"entry":[{"fullUrl":"https://gw.example/fhir/r3/Patient/1"}]}"#;
        assert_eq!(
            &r.bundle(body).unwrap()[..],
            &br#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":"https://gw.example?_getpages=x"}],"entry":[{"fullUrl":"https://gw.example/Patient/1"}]}"#[..]
        );
        // A gateway whose path is the upstream's: its URLs are its own already.
        let same = BaseRewriter::new(
            "http://ehr:9001/fhir".into(),
            "https://gw.example/fhir".into(),
        );
        assert_eq!(same.url("https://gw.example/fhir/Patient/1"), None);
        // An upstream at its host's root has no path of its own to tell apart.
        let root = BaseRewriter::new("http://ehr:9001".into(), "https://gw.example".into());
        assert_eq!(root.url("https://gw.example/Patient/1"), None);
    }

    #[test]
    fn header_urls_are_read_as_a_client_resolves_them() {
        let r = rewriter();
        for spelling in [
            "http://ehr:9001/fhir/r3/Patient/1",
            "HTTP://EHR:9001/fhir/r3/Patient/1",
            "/fhir/r3/Patient/1",
            // User information names the same server (the client would reach it): rewritten,
            // it is gone.
            "http://user@ehr:9001/fhir/r3/Patient/1",
            "http://elsewhere.example@ehr:9001/fhir/r3/Patient/1",
        ] {
            assert_eq!(
                r.header_url(spelling).as_deref(),
                Some("https://gw.example/Patient/1"),
                "{spelling}"
            );
        }
        for other in [
            "/fhir/r30/Patient/1",
            "/other/Patient/1",
            "//ehr:9001/fhir/r3/Patient/1",
            "http://ehr:9002/fhir/r3/Patient/1",
            "http://ehr:9001@elsewhere.example/fhir/r3/Patient/1",
            "https://ehr:9001/fhir/r3/Patient/1",
            "http://ehr:9001/FHIR/r3/Patient/1",
            "Patient/1",
        ] {
            assert_eq!(r.header_url(other), None, "{other}");
        }
        // The scheme's default port, written or not.
        let default = BaseRewriter::new("http://ehr/fhir".into(), "https://gw.example".into());
        assert_eq!(
            default
                .header_url("http://Ehr:80/fhir/Patient/1")
                .as_deref(),
            Some("https://gw.example/Patient/1")
        );
        let six = BaseRewriter::new("http://[::1]:9001/fhir".into(), "https://gw".into());
        assert_eq!(
            six.header_url("http://[::1]:9001/fhir/Patient/1")
                .as_deref(),
            Some("https://gw/Patient/1")
        );
        // A Link header's targets.
        let rewritten = |text: &str| Links::Rewritten(text.to_owned(), false);
        let left_out = |text: &str| Links::Rewritten(text.to_owned(), true);
        assert_eq!(
            r.link(r#"<http://ehr:9001/fhir/r3/Patient?page=2>; rel="next", <https://elsewhere.example/x>; rel="help""#),
            rewritten(r#"<https://gw.example/Patient?page=2>; rel="next", <https://elsewhere.example/x>; rel="help""#)
        );
        assert_eq!(
            r.link(r#"<https://elsewhere.example/x>; rel="help""#),
            Links::Unchanged
        );
        assert_eq!(r.link("<unclosed"), Links::Dropped);
        assert_eq!(r.link(r#"<a>; title="open"#), Links::Dropped);
        assert_eq!(r.link("next=http://ehr:9001/fhir/r3/x"), Links::Dropped);
        assert_eq!(
            r.link(r#"<http://ehr:9001/fhir/r3/Patient?page=2>; rel="next"; title="a<b, c>""#),
            rewritten(r#"<https://gw.example/Patient?page=2>; rel="next"; title="a<b, c>""#)
        );
        // User information names the same server: rewritten without it.
        assert_eq!(
            r.link("<http://user:secret@ehr:9001/fhir/r3/Patient/9>; rel=next"),
            rewritten("<https://gw.example/Patient/9>; rel=next")
        );
        // Links that would show where the upstream is are left out; the others stay.
        for revealing in [
            "http://ehr:9001/fhir/r2/Patient/1",
            "http://EHR./other",
            "http://ehr:80/fhir/r3/x",
            "http://u@elsewhere.example/x",
            "http://10.0.0.7:8080/fhir/x",
            "http://[::ffff:127.0.0.1]:9001/fhir/x",
            "http://[fd00::1]/x",
            "//192.168.1.2/x",
            "http://elsewhere.example/a\\b",
            "http://localhost:8080/fhir/x",
            "http://api.localhost/x",
            "http://ehr-server/x",
            "http://db.internal/x",
            "http://127.1/x",
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://0177.0.0.1/x",
            "http:/10.0.0.7/x",
            "http:10.0.0.7/y",
            "https:///10.0.0.7/",
            "HTTP://%31%30.0.0.7/x",
            "http://e%68r:9001/x",
            "http://[::127.0.0.1]/x",
            "http://[fe80::1%25eth0]/x",
            "http://100.64.1.2/x",
            "http://elsewhere.example /x",
            "ws:10.0.0.7/x",
            "http://ehr.default.svc/x",
            "http://printer.home.arpa/x",
            "http://files.corp/x",
            "http://[64:ff9b::10.0.0.7]/x",
            "http://[64:ff9b:1::a00:7]/x",
            "http://[2002:a00:7::1]/x",
            "http://[fec0::1]/x",
        ] {
            assert_eq!(
                r.link(&format!(
                    "<{revealing}>; rel=prev, <Patient?page=3>; rel=next"
                )),
                left_out("<Patient?page=3>; rel=next"),
                "{revealing}"
            );
            assert_eq!(
                r.link(&format!("<{revealing}>")),
                Links::Dropped,
                "{revealing}"
            );
        }
        for kept in [
            "http://hl7.org/fhir/StructureDefinition/Patient",
            "Patient?page=2",
            "/other/path",
            "https://8.8.8.8/x",
            "https://[64:ff9b::8.8.8.8]/x",
            "https://[2002:808:808::1]/x",
            "https://[2001:db8::1]/x",
            "urn:uuid:6f1c0b4e-2d9a-4c7e-9b1a-3e5f7a9c2d4b",
            "next",
        ] {
            assert!(!r.reveals_upstream(kept), "{kept}");
        }
        // A parameter naming such a URL takes its link with it.
        assert_eq!(
            r.link(
                r#"<Patient?p=2>; rel=next; anchor="http://10.0.0.7/fhir", <Patient?p=0>; rel=prev"#
            ),
            left_out("<Patient?p=0>; rel=prev")
        );
        assert_eq!(
            r.link(r#"<Patient?p=2>; rel="http://example.org/rel/next""#),
            Links::Unchanged
        );
        for revealing in [
            r#"rel="next http://10.0.0.7/rels/x""#,
            r#"anchor=" http://10.0.0.7/""#,
            r#"anchor="/\10.0.0.7/""#,
            r#"rev=http://ehr:9001/fhir/r3/rel"#,
        ] {
            assert_eq!(
                r.link(&format!("<Patient?p=2>; {revealing}")),
                Links::Dropped,
                "{revealing}"
            );
        }
        // Text parameters are text.
        for text in [r#"title="Page: 2 of 5""#, r#"media="screen: x y""#] {
            assert_eq!(
                r.link(&format!("<Patient?p=2>; rel=next; {text}")),
                Links::Unchanged,
                "{text}"
            );
        }
    }

    #[test]
    fn bundle_links_in_any_spelling_a_client_resolves_are_rewritten() {
        let body = br#"{"resourceType":"Bundle","type":"searchset",
 "link":[{"relation":"next","url":"HTTP://EHR:9001/fhir/r3/Patient?page=2"},
         {"relation":"prev","url":"/fhir/r3/Patient?page=0"}],
 "entry":[{"fullUrl":"http://user:secret@ehr:9001/fhir/r3/Patient/1"},
          {"fullUrl":"http://ehr:9001/fhir/r30/Patient/2"},
          {"fullUrl":"Patient/3"}]}"#;
        let out = String::from_utf8(rewriter().bundle(body).unwrap().to_vec()).unwrap();
        let expected = String::from_utf8_lossy(body)
            .replace("HTTP://EHR:9001/fhir/r3/", "https://gw.example/")
            .replace("\"/fhir/r3/", "\"https://gw.example/")
            .replace(
                "http://user:secret@ehr:9001/fhir/r3/",
                "https://gw.example/",
            );
        assert_eq!(out, expected);
        let xml = br#"<Bundle xmlns="http://hl7.org/fhir"><type value="searchset"/><link><relation value="next"/><url value="HTTP://ehr:9001/fhir/r3/Patient?page=2&amp;x=1"/></link></Bundle>"#;
        let out = String::from_utf8(rewriter().xml_bundle(xml).unwrap().to_vec()).unwrap();
        assert!(
            out.contains(r#"<url value="https://gw.example/Patient?page=2&amp;x=1"/>"#),
            "{out}"
        );
        // A base at its host's root: the default port written out.
        let root = BaseRewriter::new("http://ehr".into(), "https://gw.example".into());
        let body = br#"{"resourceType":"Bundle","type":"searchset","link":[{"url":"http://ehr:80/Patient?page=2"}]}"#;
        let out = String::from_utf8(root.bundle(body).unwrap().to_vec()).unwrap();
        assert!(
            out.contains(r#""url":"https://gw.example/Patient?page=2""#),
            "{out}"
        );
    }

    #[test]
    fn rewrites_bundle_links_and_full_urls_leaving_the_rest_byte_for_byte() {
        let body = br#"{"resourceType":"Bundle","type":"searchset","total":2,
 "link":[{"relation":"self","url":"http://ehr:9001/fhir/r3/Patient?family=x"},
         {"relation":"next", "url" : "http://ehr:9001/fhir/r3?_getpages=abc&_getpagesoffset=10"}],
 "entry":[{"fullUrl":"http://ehr:9001/fhir/r3/Patient/1","resource":{"resourceType":"Patient","id":"1",
   "text":{"div":"see http://ehr:9001/fhir/r3/Patient/1"},
   "extension":[{"url":"http://hl7.org/fhir/ext","valueDecimal":1.50}]}}]}"#;
        let out = rewriter().bundle(body).unwrap();
        let expected = String::from_utf8_lossy(body)
            .replace(
                "\"url\":\"http://ehr:9001/fhir/r3",
                "\"url\":\"https://gw.example",
            )
            .replace(
                "\"url\" : \"http://ehr:9001/fhir/r3",
                "\"url\" : \"https://gw.example",
            )
            .replace(
                "\"fullUrl\":\"http://ehr:9001/fhir/r3",
                "\"fullUrl\":\"https://gw.example",
            );
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert!(String::from_utf8_lossy(&out).contains("see http://ehr:9001/fhir/r3/Patient/1"));
        assert!(String::from_utf8_lossy(&out).contains("1.50"));
    }

    #[test]
    fn rewrites_only_the_bundles_a_server_answers_with() {
        let with_type = |kind: &str| {
            format!(
                r#"{{"resourceType":"Bundle",{kind}"link":[{{"relation":"self","url":"http://ehr:9001/fhir/r3/Bundle/d"}}],"entry":[{{"fullUrl":"http://ehr:9001/fhir/r3/Composition/1","resource":{{"resourceType":"Composition"}}}}]}}"#
            )
        };
        for kind in [
            "searchset",
            "history",
            "batch-response",
            "transaction-response",
        ] {
            let body = with_type(&format!(r#""type":"{kind}","#));
            let out = rewriter().bundle(body.as_bytes()).expect(kind);
            let out = String::from_utf8(out.to_vec()).unwrap();
            assert!(!out.contains("ehr:9001"), "{kind}: {out}");
        }
        // A Bundle the server holds, read as a resource (a signed document, a collection, a
        // transaction or a message as sent), or one with no type: as the server has it.
        for kind in [
            r#""type":"document","#,
            r#""type":"collection","#,
            r#""type":"transaction","#,
            r#""type":"message","#,
            r#""type":"Searchset","#,
            "",
        ] {
            let body = with_type(kind);
            assert_eq!(rewriter().bundle(body.as_bytes()), None, "{kind}");
        }
        // The type may come last.
        let last = r#"{"resourceType":"Bundle","link":[{"url":"http://ehr:9001/fhir/r3/Patient"}],"type":"searchset"}"#;
        assert!(rewriter().bundle(last.as_bytes()).is_some());
    }

    #[test]
    fn leaves_what_the_entries_resources_hold_as_the_upstream_has_it() {
        // A canonical or extension URL under the base is the resource's own data; a Bundle
        // within an entry has links of its own. A transaction response's location is the
        // Bundle's: rewritten as the Location header is.
        let body = br#"{"resourceType":"Bundle","type":"searchset",
 "entry":[{"fullUrl":"http://ehr:9001/fhir/r3/StructureDefinition/x",
   "resource":{"resourceType":"StructureDefinition","url":"http://ehr:9001/fhir/r3/StructureDefinition/x",
     "extension":[{"url":"http://ehr:9001/fhir/r3/ext"}]}},
  {"fullUrl":"urn:uuid:1","resource":{"resourceType":"Bundle","link":[{"url":"http://ehr:9001/fhir/r3/Patient"}]}},
  {"response":{"status":"201","location":"http://ehr:9001/fhir/r3/Patient/1/_history/1"}}]}"#;
        let out = String::from_utf8(rewriter().bundle(body).unwrap().to_vec()).unwrap();
        let expected = String::from_utf8_lossy(body)
            .replacen(
                "\"fullUrl\":\"http://ehr:9001/fhir/r3",
                "\"fullUrl\":\"https://gw.example",
                1,
            )
            .replace(
                "\"location\":\"http://ehr:9001/fhir/r3",
                "\"location\":\"https://gw.example",
            );
        assert_eq!(out, expected);
        // Escaped quotes in a string, keys spelt with escapes, and a body cut short.
        let escaped = br#"{"resourceType":"Bundle","type":"history","note":"a \"link\" [{","link":[{"url":"http://ehr:9001/fhir/r3/x"},{"u\u0072l":"http://ehr:9001/fhir/r3/y"}]}"#;
        let out = String::from_utf8(rewriter().bundle(escaped).unwrap().to_vec()).unwrap();
        assert!(out.contains(r#""url":"https://gw.example/x""#), "{out}");
        assert!(
            out.contains(r#""u\u0072l":"http://ehr:9001/fhir/r3/y""#),
            "{out}"
        );
        assert!(rewriter().bundle(&escaped[..escaped.len() - 2]).is_none());
    }

    #[test]
    fn reads_links_written_with_escapes_as_a_json_reader_does() {
        // PHP's `json_encode` escapes every `/`; any character may be written `\uXXXX`.
        let body = br#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":"http:\/\/ehr:9001\/fhir\/r3\/Patient?_page=2&x=\"q\""}],
 "entry":[{"fullUrl":"\u0068ttp://ehr:9001/fhir/r3/Patient/1","resource":{"resourceType":"Patient","id":"1","url":"http:\/\/ehr:9001\/fhir\/r3\/x"}},
  {"fullUrl":"http:\/\/ehr:9001\/fhir\/r30\/Patient\/2"},
  {"fullUrl":"http:\/\/elsewhere\/fhir\/r3\/Patient\/3"}]}"#;
        let out = String::from_utf8(rewriter().bundle(body).unwrap().to_vec()).unwrap();
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            json["link"][0]["url"],
            "https://gw.example/Patient?_page=2&x=\"q\""
        );
        assert_eq!(json["entry"][0]["fullUrl"], "https://gw.example/Patient/1");
        // Written anew with only the escapes JSON needs; the rest byte for byte: a resource's
        // own URL, a base that goes on (`r30`), another host.
        assert!(
            out.contains(r#""url":"https://gw.example/Patient?_page=2&x=\"q\""}"#),
            "{out}"
        );
        for kept in [
            r#""url":"http:\/\/ehr:9001\/fhir\/r3\/x""#,
            r#""fullUrl":"http:\/\/ehr:9001\/fhir\/r30\/Patient\/2""#,
            r#""fullUrl":"http:\/\/elsewhere\/fhir\/r3\/Patient\/3""#,
        ] {
            assert!(out.contains(kept), "{kept} in {out}");
        }
        // Escapes and no upstream URL in any link: nothing to do.
        let none = br#"{"resourceType":"Bundle","type":"searchset","link":[{"url":"https:\/\/gw.example\/x"}]}"#;
        assert!(rewriter().bundle(none).is_none());
        // An escape that is no JSON (a lone surrogate) is left as it is.
        let odd =
            br#"{"resourceType":"Bundle","type":"searchset","link":[{"url":"http:\/\/ehr:9001\/fhir\/r3\/\ud800"}]}"#;
        assert!(rewriter().bundle(odd).is_none());
    }

    #[test]
    fn rewrites_xml_bundle_links_leaving_the_rest_byte_for_byte() {
        let r = rewriter();
        let body = concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- a <Bundle> in a comment -->",
            "<Bundle xmlns=\"http://hl7.org/fhir\"><id value=\"b\"/><type value=\"searchset\"/>",
            "<link><relation value=\"next\"/><url value=\"http://ehr:9001/fhir/r3?_getpages=x&amp;_count=2\"/></link>",
            "<link><relation value='self'/><url value='http://other/fhir/r3/Patient'/></link>",
            "<entry><fullUrl value=\"http://ehr:9001/fhir/r3/Patient/1\"/>",
            "<resource><Patient><text><div xmlns=\"http://www.w3.org/1999/xhtml\"><![CDATA[<url value=\"x\">]]>",
            "<a href=\"http://ehr:9001/fhir/r3/Patient/9\">a &gt; b</a></div></text>",
            "<photo><url value=\"http://ehr:9001/fhir/r3/Binary/1\"/></photo></Patient></resource>",
            "<response><status value=\"200\"/><location value=\"http://ehr:9001/fhir/r3/Patient/1/_history/2\"/></response>",
            "</entry></Bundle>\n"
        );
        let rewritten = r.xml_bundle(body.as_bytes()).expect("rewritten");
        let expected = body
            .replace(
                "http://ehr:9001/fhir/r3?_getpages=x&amp;_count=2",
                "https://gw.example?_getpages=x&amp;_count=2",
            )
            .replacen(
                "http://ehr:9001/fhir/r3/Patient/1\"",
                "https://gw.example/Patient/1\"",
                1,
            )
            .replace(
                "http://ehr:9001/fhir/r3/Patient/1/_history/2",
                "https://gw.example/Patient/1/_history/2",
            );
        // Inside the resource (the narrative, a photo's `url`), nothing changes.
        assert_eq!(std::str::from_utf8(&rewritten).unwrap(), expected);
        // A stored Bundle (a `document`, a `collection`), a Bundle in an entry, another root, a
        // prefixed root, a DOCTYPE, a cut body: left alone.
        let link = "<link><url value=\"http://ehr:9001/fhir/r3/Patient\"/></link>";
        for other in [
            format!("<Bundle xmlns=\"http://hl7.org/fhir\"><type value=\"collection\"/>{link}</Bundle>"),
            format!("<Parameters><parameter><resource><Bundle><type value=\"searchset\"/>{link}</Bundle></resource></parameter></Parameters>"),
            format!("<f:Bundle xmlns:f=\"http://hl7.org/fhir\"><f:type value=\"searchset\"/>{link}</f:Bundle>"),
            format!("<!DOCTYPE Bundle><Bundle><type value=\"searchset\"/>{link}</Bundle>"),
            format!("<Bundle><type value=\"searchset\"/>{link}"),
            format!("<Bundle><type value=\"searchset\"/>{link}</Bundle><Bundle/>"),
            format!("<Bundle><type value=\"searchset\"/>{link}</Patient>"),
        ] {
            assert_eq!(r.xml_bundle(other.as_bytes()), None, "{other}");
        }
        // A link that climbs out of the base stays as written.
        let out = "<Bundle><type value=\"searchset\"/><link><url value=\"http://ehr:9001/fhir/r3/../admin\"/></link></Bundle>";
        assert_eq!(r.xml_bundle(out.as_bytes()), None);
        // Character references are read; the URL is written back escaped.
        let referenced = "<Bundle><type value=\"history\"/><link><url value=\"http&#58;//ehr:9001/fhir/r3/Patient?a=1&#x26;b=&apos;2&apos;\"/></link></Bundle>";
        assert_eq!(
            std::str::from_utf8(&r.xml_bundle(referenced.as_bytes()).unwrap()).unwrap(),
            "<Bundle><type value=\"history\"/><link><url value=\"https://gw.example/Patient?a=1&amp;b=&apos;2&apos;\"/></link></Bundle>"
        );
        // What no URL holds, decoded (a `"` a client's parser would end the host at, a tab it
        // would drop), or a reference to no character: not rewritten.
        for odd in ["&quot;@evil.example/x", "/.&#9;./admin", "/&#0;", "/&#+58;"] {
            let body = format!("<Bundle><type value=\"searchset\"/><link><url value=\"http://ehr:9001/fhir/r3{odd}\"/></link></Bundle>");
            assert_eq!(r.xml_bundle(body.as_bytes()), None, "{odd}");
        }
    }

    #[test]
    fn leaves_other_bodies_alone() {
        let r = rewriter();
        assert!(r
            .bundle(br#"{"resourceType":"Patient","url":"http://ehr:9001/fhir/r3/x"}"#)
            .is_none());
        assert!(r.bundle(b"not json").is_none());
        assert!(r
            .bundle(br#"{"resourceType":"Bundle","type":"searchset","link":[]}"#)
            .is_none());
    }
}

#[cfg(test)]
mod properties {
    //! Bodies built from what upstream Bundles hold (the upstream base, `"url"`/`"fullUrl"` and
    //! other keys, JSON whitespace, the base inside text and escaped markup), each with the
    //! body the gateway must send on, byte for byte.

    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::HashMap;

    const FROM: &str = "http://ehr:9001/fhir/r3";
    const TO: &str = "https://gw.example";

    fn rewriter() -> BaseRewriter {
        BaseRewriter::new(FROM.into(), TO.into())
    }

    fn select(items: &[&'static str]) -> impl Strategy<Value = &'static str> {
        prop::sample::select(items.to_vec())
    }

    /// What becomes of one occurrence of the upstream base in a Bundle.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Fate {
        /// Starts a `"url"` or `"fullUrl"` string value, followed by a path, query, fragment or
        /// the value's end: rewritten.
        Rewritten,
        /// Starts the string value of another key: kept.
        OtherKey,
        /// Starts a value, but continues the base's last segment (`.../r30`, `...:8080`): kept.
        NotAtBoundary,
        /// Further inside a string (`see http://...`, a query parameter): kept.
        InsideText,
        /// Right after an escaped quote inside a string (`href=\"...`, `\"url\":\"...`): kept.
        AfterEscapedQuote,
        /// The base spelled otherwise ([`RESPELLED`]: its scheme and host in capitals) as a
        /// `"url"` or `"fullUrl"` value: rewritten, as a client resolves it.
        Respelled,
    }

    /// A URL under the base, spelled as a client reads it but not as the base is written.
    const RESPELLED: &str = "HTTP://EHR:9001/fhir/r3/Patient/1";

    /// The fate of each occurrence of the base in a string value (JSON text, escapes and all).
    fn fates(value: &str, url_key: bool) -> Vec<Fate> {
        if value == RESPELLED {
            return vec![if url_key {
                Fate::Respelled
            } else {
                Fate::OtherKey
            }];
        }
        value
            .match_indices(FROM)
            .map(|(at, _)| {
                if at > 0 {
                    return if value[..at].ends_with("\\\"") {
                        Fate::AfterEscapedQuote
                    } else {
                        Fate::InsideText
                    };
                }
                let boundary = matches!(
                    value[FROM.len()..].bytes().next(),
                    None | Some(b'/' | b'?' | b'#')
                );
                match (boundary, url_key) {
                    (false, _) => Fate::NotAtBoundary,
                    (true, true) => Fate::Rewritten,
                    (true, false) => Fate::OtherKey,
                }
            })
            .collect()
    }

    /// The string value, as JSON text, with its leading base rewritten when `fates` says so.
    fn rewritten(value: &str, fates: &[Fate]) -> String {
        match fates.first() {
            Some(Fate::Rewritten) => format!("{TO}{}", &value[FROM.len()..]),
            Some(Fate::Respelled) => format!("{TO}/Patient/1"),
            _ => value.to_owned(),
        }
    }

    /// A string value as JSON text: under the base, near it, or holding it further in.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => select(&[
                "", "/", "/Patient/1", "/Patient/1/_history/2", "/Patient?family=x&_count=10",
                "?_getpages=abc&_getpagesoffset=10", "#p",
            ])
            .prop_map(|rest| format!("{FROM}{rest}")),
            1 => select(&["0/Patient/1", "-old/Patient", ".json", "%2FPatient", ":8080/Patient"])
                .prop_map(|rest| format!("{FROM}{rest}")),
            3 => prop::sample::select(vec![
                format!("see {FROM}/Patient/1"),
                format!("{FROM}/Patient?next={FROM}/x"),
                format!("<a href=\\\"{FROM}/Patient/1\\\">Patient 1</a>"),
                format!("\\\"url\\\": \\\"{FROM}/Patient/1\\\""),
                format!("\\\"fullUrl\\\":\\\"{FROM}\\\""),
                "http://ehr:9001/fhir".to_owned(),
                "https://ehr:9001/fhir/r3/Patient/1".to_owned(),
                RESPELLED.to_owned(),
                "Patient/1".to_owned(),
                "urn:uuid:6f1c0b4e-2d9a-4c7e-9b1a-3e5f7a9c2d4b".to_owned(),
                format!("{TO}/Patient/1"),
            ]),
        ]
    }

    /// JSON text as the upstream sends it and as it must leave the gateway, with the fates
    /// of the base in it.
    #[derive(Debug, Clone, Default)]
    struct Json {
        sent: String,
        expected: String,
        fates: Vec<Fate>,
    }

    impl Json {
        fn same(text: &str) -> Self {
            Self {
                sent: text.to_owned(),
                expected: text.to_owned(),
                fates: Vec::new(),
            }
        }

        fn join(open: &str, items: Vec<Json>, close: &str) -> Self {
            let mut joined = Self::same(open);
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    joined.sent.push(',');
                    joined.expected.push(',');
                }
                joined.sent.push_str(&item.sent);
                joined.expected.push_str(&item.expected);
                joined.fates.extend(item.fates);
            }
            joined.sent.push_str(close);
            joined.expected.push_str(close);
            joined
        }

        fn object(members: Vec<Json>) -> Self {
            Self::join("{", members, "}")
        }

        /// `"key":` and a value that is no string.
        fn member(key: &str, value: Json) -> Self {
            Self::join(&format!("\"{key}\":"), vec![value], "")
        }
    }

    /// A member with a string value (and whitespace around it), under a URL key or another;
    /// `link_key` is the key whose value is a link to rewrite where the member stands (`url`
    /// in a `link` object, `fullUrl` in an `entry`; none in a resource or the Bundle itself).
    fn string_member(link_key: Option<&'static str>) -> impl Strategy<Value = Json> {
        let key = prop_oneof![
            // (The place's link key, most often where there is one.)
            3 => Just(link_key.unwrap_or("url")),
            2 => select(&["url", "fullUrl"]),
            2 => select(&[
                "reference", "div", "system", "valueUri", "URL", "fullurl", "Url", "myurl",
                "fullUrl2", "link",
            ]),
        ];
        let space = || select(&["", " ", "  ", "\n    ", "\t", "\r\n"]);
        (space(), key, space(), space(), value()).prop_map(
            move |(lead, key, before, after, value)| {
                let fates = fates(&value, Some(key) == link_key);
                let head = format!("{lead}\"{key}\"{before}:{after}\"");
                Json {
                    sent: format!("{head}{value}\""),
                    expected: format!("{head}{}\"", rewritten(&value, &fates)),
                    fates,
                }
            },
        )
    }

    /// An object of fixed members, then generated ones.
    fn object(fixed: Vec<Json>, members: Vec<Json>) -> Json {
        Json::object(fixed.into_iter().chain(members).collect())
    }

    /// A Bundle with `link`s, `entry`s (each with a resource) and members of its own; mostly a
    /// Bundle, else a resource holding the same.
    fn body() -> impl Strategy<Value = (&'static str, Json)> {
        let members =
            |link_key, most: usize| prop::collection::vec(string_member(link_key), 0..=most);
        let entry = (
            select(&["Patient", "Observation", "Bundle"]),
            members(Some("fullUrl"), 2),
            members(None, 3),
        );
        (
            prop_oneof![6 => Just("Bundle"), 1 => Just("Patient"), 1 => Just("Parameters")],
            any::<bool>(),
            prop::collection::vec(members(Some("url"), 2), 0..3),
            prop::collection::vec(entry, 0..3),
            members(None, 2),
        )
            .prop_map(|(resource_type, type_first, links, entries, own)| {
                let type_of = |name: &str| Json::same(&format!("\"resourceType\":\"{name}\""));
                let links = links
                    .into_iter()
                    .map(|members| object(vec![Json::same("\"relation\":\"next\"")], members))
                    .collect();
                let entries = entries
                    .into_iter()
                    .map(|(inner_type, members, resource)| {
                        let resource = object(vec![type_of(inner_type)], resource);
                        object(vec![Json::member("resource", resource)], members)
                    })
                    .collect();
                let mut fixed = vec![
                    Json::same("\"type\":\"searchset\""),
                    Json::member("link", Json::join("[", links, "]")),
                    Json::member("entry", Json::join("[", entries, "]")),
                ];
                // Servers put `resourceType` first, but JSON does not require it.
                if type_first {
                    fixed.insert(0, type_of(resource_type));
                } else {
                    fixed.push(type_of(resource_type));
                }
                (resource_type, object(fixed, own))
            })
    }

    /// What the rewriter must answer for a body: the rewritten bytes, or `None` (no Bundle,
    /// or nothing under the base in a URL value).
    fn expected((resource_type, body): &(&str, Json)) -> Option<String> {
        (*resource_type == "Bundle"
            && (body.fates.contains(&Fate::Rewritten) || body.fates.contains(&Fate::Respelled)))
        .then(|| body.expected.clone())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Exactly the links' `"url"` and the entries' `"fullUrl"` values under the base are
        /// rewritten (not a resource's `url`, nor the Bundle's own), and every other byte is
        /// as sent.
        #[test]
        fn bundles_rewrite_exactly_their_url_values(case in body()) {
            let sent = &case.1.sent;
            prop_assert!(serde_json::from_str::<serde_json::Value>(sent).is_ok(), "{}", sent);
            let out = rewriter()
                .bundle(sent.as_bytes())
                .map(|out| String::from_utf8(out.to_vec()).unwrap());
            prop_assert_eq!(out, expected(&case));
        }

        /// A URL (a `Location`, say) is rewritten when it starts with the base at a boundary.
        #[test]
        fn urls_are_rewritten_only_under_the_base(value in value()) {
            let fates = fates(&value, true);
            let expected = (fates.first() == Some(&Fate::Rewritten))
                .then(|| rewritten(&value, &fates));
            prop_assert_eq!(rewriter().url(&value), expected);
        }

        /// Any text (with the base and URL keys in it) in a Bundle's string: no panic, the
        /// links rewritten, the text kept.
        #[test]
        fn text_holding_the_base_is_kept(
            pieces in prop::collection::vec(
                prop_oneof![
                    Just(FROM.to_owned()), Just("\"url\":".to_owned()),
                    Just("\"fullUrl\" : ".to_owned()), Just("\"".to_owned()),
                    Just("\\".to_owned()), Just("/".to_owned()), ".{0,10}",
                ],
                0..12,
            ),
            links in 0usize..4,
        ) {
            let noise: String = pieces.concat();
            let r = rewriter();
            let mut body = String::from("{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"link\":[");
            for i in 0..links {
                if i > 0 { body.push(','); }
                body.push_str(&format!("{{\"url\":\"{FROM}/Patient/{i}\"}}"));
            }
            body.push_str("],\"note\":");
            body.push_str(&serde_json::to_string(&noise).unwrap());
            body.push('}');
            let _ = r.bundle(noise.as_bytes());
            match r.bundle(body.as_bytes()) {
                Some(out) => {
                    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
                    for i in 0..links {
                        let url = out["link"][i]["url"].as_str().unwrap();
                        prop_assert_eq!(url, format!("{TO}/Patient/{i}"));
                    }
                    prop_assert_eq!(out["note"].as_str().unwrap(), noise.as_str());
                }
                None => prop_assert_eq!(links, 0),
            }
        }
    }

    /// The generated bodies reach every path of [`BaseRewriter::bundle`]: counts over a fixed
    /// sample (`--nocapture` shows them).
    #[test]
    fn the_generated_bodies_reach_every_path() {
        let mut runner = TestRunner::deterministic();
        let strategy = body();
        let mut fates: HashMap<Fate, usize> = HashMap::new();
        let (mut rewritten, mut nothing_to_rewrite, mut no_bundle) = (0, 0, 0);
        const SAMPLE: usize = 256;
        for _ in 0..SAMPLE {
            let case = strategy.new_tree(&mut runner).unwrap().current();
            let (resource_type, body) = &case;
            let holds_base = !body.fates.is_empty();
            match (*resource_type == "Bundle", expected(&case).is_some()) {
                (true, true) => rewritten += 1,
                (true, false) if holds_base => nothing_to_rewrite += 1,
                (false, _) if holds_base => no_bundle += 1,
                _ => {}
            }
            if *resource_type == "Bundle" {
                for fate in &body.fates {
                    *fates.entry(*fate).or_default() += 1;
                }
            }
        }
        eprintln!(
            "of {SAMPLE} bodies: {rewritten} rewritten, {nothing_to_rewrite} Bundles holding the \
             base with nothing to rewrite, {no_bundle} other resources holding it; occurrences \
             of the base in Bundles: {fates:?}"
        );
        assert!(rewritten >= SAMPLE / 4, "{rewritten}");
        assert!(nothing_to_rewrite >= 5, "{nothing_to_rewrite}");
        assert!(no_bundle >= 10, "{no_bundle}");
        for fate in [
            Fate::Rewritten,
            Fate::OtherKey,
            Fate::NotAtBoundary,
            Fate::InsideText,
            Fate::AfterEscapedQuote,
        ] {
            assert!(
                fates.get(&fate).copied().unwrap_or(0) >= 50,
                "{fate:?}: {fates:?}"
            );
        }
    }
}
