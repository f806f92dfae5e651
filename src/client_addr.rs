//! The address a request came from, as the server saw it.

use std::net::SocketAddr;

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
