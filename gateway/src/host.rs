//! The `Host` rules of RFC 9112 §3.2 for the requests an HTTP/1.x connection brings.
//!
//! A server must answer `400` to an HTTP/1.1 request without a `Host` header field, and to any
//! request with more than one, or with an invalid value. hyper checks none of it, and the
//! gateway reads no `Host` (the upstream gets its own, links use `public_base_url`), but a
//! balancer or cache in front may key on it: one that reads a request's `Host` otherwise than
//! the gateway would is a known way to poison a cache or confuse routing. So such a request is
//! refused as the connection reads it, before any layer: `400` with an OperationOutcome, a new
//! `X-Request-Id` and, over HTTP/1.x, `Connection: close` (the client's framing is not to be
//! trusted further), logged at `info` and counted as a `malformed_request` closing. HTTP/2
//! requests name their authority in `:authority`; a `Host` beside it is checked the same way,
//! and must name the same authority (RFC 9113 §8.3.1), and an `:authority` with user
//! information is refused as malformed there too.

use http::header::HOST;
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use tower_fhir::ops::{MakeUuid, X_REQUEST_ID};
use tower_fhir::outcome::{IssueType, OperationOutcome};

/// Why a request's `Host` breaks RFC 9112 §3.2 (or, over HTTP/2, its `:authority`,
/// `authority`, RFC 9113 §8.3.1), if it does.
pub(crate) fn problem(
    version: Version,
    authority: Option<&Authority>,
    headers: &HeaderMap,
) -> Option<&'static str> {
    if version == Version::HTTP_2 {
        if let Some(authority) = authority {
            if authority.as_str().contains('@') {
                return Some(
                    "The :authority pseudo-header field has user information (RFC 9113 §8.3.1)",
                );
            }
            if headers
                .get(HOST)
                .is_some_and(|host| !same_authority(host.as_bytes(), authority))
            {
                return Some(
                    "The Host header field names another authority than :authority (RFC 9113 \
                     §8.3.1)",
                );
            }
        }
    }
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => {
            Some("An HTTP/1.1 request must have a Host header field (RFC 9112 §3.2)")
        }
        (None, _) => None,
        (Some(_), Some(_)) => Some("The request has more than one Host header field"),
        (Some(host), None) if !is_valid(host) => Some(
            "The Host header field is not a host and port (RFC 9112 §3.2: `host` or \
             `host:port`, no user information)",
        ),
        (Some(_), None) => None,
    }
}

/// Whether a `Host` value names `authority` once both are normalised as RFC 3986 §6.2.3 has
/// it for http(s): the host in any case and without a trailing dot; a port left out equal to
/// the default of either scheme (the other side's `80` or `443`), or an empty one.
fn same_authority(host: &[u8], authority: &Authority) -> bool {
    /// The host, lowercased without a trailing dot, and the port, if one is given.
    fn split(value: &[u8]) -> Option<(Vec<u8>, Option<u16>)> {
        let (host, port) = match value.iter().rposition(|&byte| byte == b':') {
            // A colon inside brackets is the IPv6 address's own.
            Some(colon) if !value[colon..].contains(&b']') => {
                let port = std::str::from_utf8(&value[colon + 1..]).ok()?;
                let port = if port.is_empty() {
                    None
                } else {
                    Some(port.parse().ok()?)
                };
                (&value[..colon], port)
            }
            _ => (value, None),
        };
        let host = host.strip_suffix(b".").unwrap_or(host);
        Some((host.to_ascii_lowercase(), port))
    }
    let (Some((host, host_port)), Some((named, named_port))) =
        (split(host), split(authority.as_str().as_bytes()))
    else {
        return false;
    };
    let ports = match (host_port, named_port) {
        (Some(a), Some(b)) => a == b,
        (None, None) => true,
        (Some(port), None) | (None, Some(port)) => port == 80 || port == 443,
    };
    host == named && ports
}

/// Whether `value` is RFC 3986's `uri-host [ ":" port ]`: a registered name or IPv4 address
/// (unreserved characters, sub-delimiters but `,`, percent-encoded bytes; empty allowed), or
/// an IPv6 or IPvFuture address in brackets; a port of digits up to 65535.
fn is_valid(value: &HeaderValue) -> bool {
    let value = value.as_bytes();
    let (host, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|&byte| byte == b']') else {
            return false;
        };
        let literal = &rest[..close];
        let ipv6 = std::str::from_utf8(literal)
            .ok()
            .and_then(|ip| ip.parse::<std::net::Ipv6Addr>().ok())
            .is_some();
        if !ipv6 && !is_ip_future(literal) {
            return false;
        }
        match &rest[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&[][..], Some(port)),
            _ => return false,
        }
    } else {
        match value.iter().rposition(|&byte| byte == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    // `port = *DIGIT`: leading zeros allowed, the number at most 65535.
    let port_ok = port.is_none_or(|port| {
        port.iter()
            .try_fold(0u32, |number, &digit| {
                let number = number * 10 + u32::from(digit.checked_sub(b'0')?);
                (digit.is_ascii_digit() && number <= 65_535).then_some(number)
            })
            .is_some()
    });
    port_ok && is_reg_name(host)
}

/// RFC 3986's `IPvFuture`: `v` 1*HEXDIG `.` 1*( unreserved / sub-delims / `:` ).
fn is_ip_future(literal: &[u8]) -> bool {
    let Some(rest) = literal
        .strip_prefix(b"v")
        .or_else(|| literal.strip_prefix(b"V"))
    else {
        return false;
    };
    let Some(dot) = rest.iter().position(|&byte| byte == b'.') else {
        return false;
    };
    let (version, address) = (&rest[..dot], &rest[dot + 1..]);
    !version.is_empty()
        && version.iter().all(u8::is_ascii_hexdigit)
        && !address.is_empty()
        && address
            .iter()
            .all(|&byte| byte == b':' || (byte != b'%' && is_reg_name(&[byte])))
}

/// The bytes a `reg-name` takes as they are: unreserved characters and sub-delimiters but
/// `,` (`a,b` is what a proxy that joins two `Host` lines makes). A table: every request's
/// `Host` is read, a byte at a time.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b';'
                    | b'='
            );
        byte += 1;
    }
    table
};

/// RFC 3986's `reg-name` (which an IPv4 address also is).
fn is_reg_name(name: &[u8]) -> bool {
    // Most are plain: one pass over the table.
    if name.iter().all(|&byte| REG_NAME[usize::from(byte)]) {
        return true;
    }
    let mut bytes = name.iter();
    while let Some(&byte) = bytes.next() {
        let fine = match byte {
            b'%' => {
                let hex = |byte: Option<&u8>| byte.is_some_and(u8::is_ascii_hexdigit);
                hex(bytes.next()) && hex(bytes.next())
            }
            _ => REG_NAME[usize::from(byte)],
        };
        if !fine {
            return false;
        }
    }
    true
}

/// The `400` a request whose `Host` breaks the rules gets: logged at `info` with its new
/// request id.
pub(crate) fn refused(
    why: &'static str,
    peer: std::net::SocketAddr,
    version: Version,
) -> http::Response<axum::body::Body> {
    let id = MakeUuid.new_id();
    tracing::info!(
        %peer,
        request_id = id.to_str().ok(),
        why,
        "a request refused for its Host header field"
    );
    let mut response = OperationOutcome::error(IssueType::Invalid, why)
        .to_response(StatusCode::BAD_REQUEST)
        .map(axum::body::Body::from);
    let headers = response.headers_mut();
    // (HTTP/2 has no `Connection`: its other streams are not this request's.)
    if version <= Version::HTTP_11 {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    headers.insert(X_REQUEST_ID, id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_hosts(hosts: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(HOST, HeaderValue::from_static(host));
        }
        headers
    }

    /// Over HTTP/2, `:authority` may not carry user information, and a `Host` beside it must
    /// name the same authority (in any case).
    #[test]
    fn an_http2_authority_with_user_information_or_another_host_is_refused() {
        let authority = |text: &str| text.parse::<Authority>().unwrap();
        let at = authority("fhir.example:443");
        assert_eq!(problem(Version::HTTP_2, Some(&at), &with_hosts(&[])), None);
        // The same authority, normalised: case, a trailing dot, a default port.
        for same in [
            "FHIR.example:443",
            "fhir.example",
            "fhir.example.:443",
            "fhir.example:",
        ] {
            assert_eq!(
                problem(Version::HTTP_2, Some(&at), &with_hosts(&[same])),
                None,
                "{same}"
            );
        }
        assert!(problem(
            Version::HTTP_2,
            Some(&at),
            &with_hosts(&["fhir.example:8443"])
        )
        .is_some());
        let v6 = authority("[::1]:8080");
        assert_eq!(
            problem(Version::HTTP_2, Some(&v6), &with_hosts(&["[::1]:8080"])),
            None
        );
        assert!(problem(Version::HTTP_2, Some(&v6), &with_hosts(&["[::1]"])).is_some());
        assert_eq!(
            problem(
                Version::HTTP_2,
                Some(&at),
                &with_hosts(&["FHIR.example:443"])
            ),
            None
        );
        assert!(
            problem(Version::HTTP_2, Some(&at), &with_hosts(&["evil.example"]))
                .unwrap()
                .contains("another authority")
        );
        assert!(problem(
            Version::HTTP_2,
            Some(&authority("user@fhir.example")),
            &with_hosts(&[])
        )
        .unwrap()
        .contains("user information"));
        // HTTP/1.1 in absolute form: the target's authority is not compared (the gateway reads
        // neither), the Host is checked as always.
        assert_eq!(
            problem(Version::HTTP_11, Some(&at), &with_hosts(&["other.example"])),
            None
        );
    }

    #[test]
    fn one_valid_host_passes() {
        for host in [
            "fhir.example",
            "fhir.example:443",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::7]:443",
            "x:",
            "",
            "gw_1.internal",
            "a%41b",
            "FHIR.Example",
            "fhir.example.",
            "x:000080",
            "[v1.fe80::a+en1]",
            "[V7.x]:80",
        ] {
            assert_eq!(
                problem(Version::HTTP_11, None, &with_hosts(&[host])),
                None,
                "{host}"
            );
        }
    }

    #[test]
    fn a_missing_repeated_or_invalid_host_is_refused() {
        assert!(problem(Version::HTTP_11, None, &with_hosts(&[]))
            .unwrap()
            .contains("must have"));
        // HTTP/1.0 and HTTP/2 need none.
        assert_eq!(problem(Version::HTTP_10, None, &with_hosts(&[])), None);
        assert_eq!(problem(Version::HTTP_2, None, &with_hosts(&[])), None);
        for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            assert!(problem(version, None, &with_hosts(&["a", "b"]))
                .unwrap()
                .contains("more than one"));
            assert!(problem(version, None, &with_hosts(&["a", "a"])).is_some());
        }
        for host in [
            "a b",
            "user@evil.example",
            "user:pass@evil.example",
            "[::1",
            "[::1]x",
            "[not-ip]",
            "[::1]:99999",
            "x:99999999",
            "x:65536",
            "x:8a",
            "x:-1",
            "a/b",
            "a?b",
            "a#b",
            "a\\\\b",
            "%zz",
            "%4",
            "a:b:c",
            "a,b",
            "a, b",
            "[v.x]",
            "[v1.]",
            "[vz.x]",
            "x:0065536",
        ] {
            assert!(
                problem(Version::HTTP_11, None, &with_hosts(&[host])).is_some(),
                "{host}"
            );
        }
    }
}
