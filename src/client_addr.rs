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
