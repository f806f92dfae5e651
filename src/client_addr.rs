//! The address a request came from, as the server saw it.

use std::net::{IpAddr, SocketAddr};

/// The address of the client that sent a request: the peer of the connection it came on. Put
/// it in the request extensions (the server knows it; the gateway binary does so for every
/// connection).
///
/// The proxy names it in `Forwarded` and `X-Forwarded-For` (feature `proxy`); the token
/// endpoint counts failed authentications per client id *and* address, so that guesses from
/// one address do not lock the client out everywhere (feature `token`). Behind a load balancer
/// it is the balancer's address unless the server puts the real client's there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl ClientAddr {
    /// The client's address as the server put it in `extensions`: a `ClientAddr`, or (feature
    /// `axum`) axum's `ConnectInfo<SocketAddr>`.
    pub fn of(extensions: &http::Extensions) -> Option<Self> {
        let addr = extensions.get::<Self>().copied();
        #[cfg(feature = "axum")]
        let addr = addr.or_else(|| {
            extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|info| Self(info.0))
        });
        addr
    }
}

/// The address of the client behind a load balancer, as the balancer named it: what the
/// throttles count (the token endpoint's failed authentications) instead of the connection's
/// peer, which is then the balancer's address for every client. The server puts it in the
/// request extensions, from the header the balancer sets: [`from_x_forwarded_for`] (its last
/// address, the one the balancer appended) or [`from_forwarded`] (the last element's `for`).
/// Only behind a balancer that sets that header: anywhere else a client names any address it
/// likes there. [`ClientAddr`] stays the peer (what the proxy appends to the forwarding
/// headers).
///
/// [`from_x_forwarded_for`]: Self::from_x_forwarded_for
/// [`from_forwarded`]: Self::from_forwarded
///
/// ```
/// # #[cfg(feature = "proxy")] {
/// use http::HeaderMap;
/// use tower_fhir::proxy::ForwardedClient;
///
/// let mut headers = HeaderMap::new();
/// headers.append("x-forwarded-for", "203.0.113.9, 198.51.100.2".parse().unwrap());
/// headers.append("x-forwarded-for", "192.0.2.44".parse().unwrap());
/// let client = ForwardedClient::from_x_forwarded_for(&headers).unwrap();
/// assert_eq!(client.0.to_string(), "192.0.2.44", "the balancer's own entry, the last");
///
/// let mut headers = HeaderMap::new();
/// headers.insert("forwarded", r#"for=198.51.100.2, for="[2001:db8::1]:4711";proto=https"#.parse().unwrap());
/// let client = ForwardedClient::from_forwarded(&headers).unwrap();
/// assert_eq!(client.0.to_string(), "2001:db8::1");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedClient(pub IpAddr);

impl ForwardedClient {
    /// The last address of the last `X-Forwarded-For` line; `None` when there is none or it
    /// is not an IP address (with or without a port).
    pub fn from_x_forwarded_for(headers: &http::HeaderMap) -> Option<Self> {
        let last = headers.get_all("x-forwarded-for").iter().next_back()?;
        // Bytes, not text: what a client put before the balancer's entry does not matter.
        let entry = last.as_bytes().rsplit(|b| *b == b',').next()?;
        parse_node(std::str::from_utf8(entry).ok()?.trim()).map(Self)
    }

    /// The `for` of the last element of the last `Forwarded` line (RFC 7239); `None` when it
    /// has none, or it is `unknown` or obfuscated.
    pub fn from_forwarded(headers: &http::HeaderMap) -> Option<Self> {
        let last = headers
            .get_all(http::header::FORWARDED)
            .iter()
            .next_back()?;
        let element = last.as_bytes().rsplit(|b| *b == b',').next()?;
        let element = std::str::from_utf8(element).ok()?;
        let node = element.split(';').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("for")
                .then(|| value.trim().trim_matches('"'))
        })?;
        parse_node(node).map(Self)
    }

    /// The address the throttles count for a request: the forwarded client's when the server
    /// put one, else the peer's ([`ClientAddr::of`]).
    pub fn source(extensions: &http::Extensions) -> Option<IpAddr> {
        extensions
            .get::<Self>()
            .map(|Self(ip)| *ip)
            .or_else(|| ClientAddr::of(extensions).map(|ClientAddr(addr)| addr.ip()))
    }
}

/// Writes an IPv4 address's dotted text, as `Display` writes it, a byte at a time to `push`
/// (`Display` goes through the formatting machinery: several times the instructions, on every
/// request that names its client in a forwarding header or an audit record).
#[inline]
pub(crate) fn write_ipv4(ip: std::net::Ipv4Addr, mut push: impl FnMut(u8)) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    node.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Where a request came from, as a throttle counts it: an IPv4 address, an IPv6 address's /64
/// network (what one subscriber is usually given, so one subscriber counts once), or nothing
/// known. IPv4-mapped IPv6 addresses count as the IPv4 address.
///
/// ```
/// # #[cfg(feature = "proxy")] {
/// use tower_fhir::proxy::SourceNetwork;
///
/// let a = SourceNetwork::of(Some("2001:db8::1".parse().unwrap()));
/// let b = SourceNetwork::of(Some("2001:db8::ffff".parse().unwrap()));
/// assert_eq!(a, b, "one /64");
/// let v4 = SourceNetwork::of(Some("192.0.2.1".parse().unwrap()));
/// assert_eq!(v4, SourceNetwork::of(Some("::ffff:192.0.2.1".parse().unwrap())));
/// assert_eq!(SourceNetwork::of(None), SourceNetwork::Unknown);
/// assert_eq!(a.to_string(), "2001:db8::/64");
/// assert_eq!(v4.to_string(), "192.0.2.1");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceNetwork {
    /// The server did not say (no [`ClientAddr`]).
    Unknown,
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

/// `192.0.2.1`, `2001:db8:0:1::/64`, or `unknown`: how a shared store names the source.
impl std::fmt::Display for SourceNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown"),
            Self::V4(octets) => std::net::Ipv4Addr::from(*octets).fmt(f),
            Self::V6(network) => {
                let mut octets = [0; 16];
                octets[..8].copy_from_slice(network);
                write!(f, "{}/64", std::net::Ipv6Addr::from(octets))
            }
        }
    }
}

impl SourceNetwork {
    /// The network `addr` counts as.
    pub fn of(addr: Option<IpAddr>) -> Self {
        match addr.map(|ip| ip.to_canonical()) {
            None => Self::Unknown,
            Some(IpAddr::V4(v4)) => Self::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut network = [0; 8];
                network.copy_from_slice(&v6.octets()[..8]);
                Self::V6(network)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &str, values: &[&str]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for value in values {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        headers
    }

    #[test]
    fn ipv4_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
            "9.10.99.100",
        ] {
            let mut text = Vec::new();
            write_ipv4(ip.parse().unwrap(), |b| text.push(b));
            assert_eq!(text, ip.as_bytes());
        }
    }

    #[test]
    fn the_balancers_entry_is_the_last_and_nothing_else_is_guessed() {
        let xff = |values: &[&str]| {
            ForwardedClient::from_x_forwarded_for(&headers("x-forwarded-for", values))
                .map(|c| c.0.to_string())
        };
        assert_eq!(xff(&["1.1.1.1, 2.2.2.2"]).as_deref(), Some("2.2.2.2"));
        assert_eq!(xff(&["1.1.1.1", "3.3.3.3"]).as_deref(), Some("3.3.3.3"));
        assert_eq!(xff(&["[2001:db8::1]:80"]).as_deref(), Some("2001:db8::1"));
        assert_eq!(xff(&["9.9.9.9:1234"]).as_deref(), Some("9.9.9.9"));
        // The last entry is not an address: nothing (not the one before it).
        assert_eq!(xff(&["1.1.1.1, unknown"]), None);
        assert_eq!(xff(&["1.1.1.1, "]), None);
        assert_eq!(xff(&[]), None);
        // What the client wrote before the balancer's entry, text or not, does not matter.
        let mut obs = http::HeaderMap::new();
        obs.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe, 4.4.4.4").unwrap(),
        );
        assert_eq!(
            ForwardedClient::from_x_forwarded_for(&obs).map(|c| c.0.to_string()),
            Some("4.4.4.4".to_owned())
        );
        let fwd = |values: &[&str]| {
            ForwardedClient::from_forwarded(&headers("forwarded", values)).map(|c| c.0.to_string())
        };
        assert_eq!(
            fwd(&["for=1.1.1.1, For=2.2.2.2;proto=http"]).as_deref(),
            Some("2.2.2.2")
        );
        assert_eq!(
            fwd(&["proto=https;for=\"[::1]:9\""]).as_deref(),
            Some("::1")
        );
        assert_eq!(fwd(&["for=1.1.1.1, for=_hidden"]), None);
        assert_eq!(fwd(&["for=unknown"]), None);
        assert_eq!(fwd(&["proto=https"]), None);
    }

    #[test]
    fn the_throttles_count_the_forwarded_client_when_there_is_one() {
        let mut extensions = http::Extensions::new();
        assert_eq!(ForwardedClient::source(&extensions), None);
        extensions.insert(ClientAddr("10.0.0.1:5000".parse().unwrap()));
        assert_eq!(
            ForwardedClient::source(&extensions),
            Some("10.0.0.1".parse().unwrap())
        );
        extensions.insert(ForwardedClient("192.0.2.7".parse().unwrap()));
        assert_eq!(
            ForwardedClient::source(&extensions),
            Some("192.0.2.7".parse().unwrap())
        );
    }
}
