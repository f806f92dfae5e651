//! How a request reaches its upstream: the proxy's own HTTP/1.1 pool for plain-HTTP upstreams,
//! hyper-util's pooled clients for HTTPS (ALPN may choose HTTP/2) and h2c ones, behind one type.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::uri::Scheme;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Builder, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::OutgoingBody;
use super::pool::Http1Pool;
use crate::client::{connector, http_connector, Connector};
use crate::route::Upstream;
use crate::tenant::TenantId;

/// The most an HTTP/1.1 upstream connection buffers of a response it reads (hyper's default is
/// about 400 KiB): a streamed body waits in it for the client to take what was read, so
/// each response a client does not read holds up to this much, besides the kernel's buffers.
pub(super) const MAX_BUF_SIZE: usize = 64 * 1024;

/// What one HTTP/2 stream to an upstream may be sent before the proxy takes it (hyper's
/// default is 2 MiB): a response a client does not read holds this much of its connection's
/// window, besides its own buffer. 256 KiB still carries about 12 MB/s a stream at a 20 ms
/// round trip (3 MB/s at 80 ms: a distant upstream's large downloads are slower than with
/// hyper's 2 MiB).
pub(super) const HTTP2_STREAM_WINDOW: u32 = 256 * 1024;

/// What one HTTP/2 connection to an upstream may be sent before the proxy takes it, for all
/// its streams together (hyper's default is 5 MiB): every request to that upstream shares
/// it, so it takes 64 responses that clients do not read to stall the others' answers on the
/// connection (with hyper's defaults, three). It is also the most the connection buffers.
pub(super) const HTTP2_CONNECTION_WINDOW: u32 = 64 * HTTP2_STREAM_WINDOW;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One tenant's HTTPS client, and when it was last given a request.
struct TenantClient {
    client: Client<Connector, OutgoingBody>,
    used: Instant,
}

/// The connections to upstreams, shared by every clone of the proxy.
pub(super) struct Transport {
    // Plain-HTTP HTTP/1.1 upstreams.
    http1: Http1Pool,
    // HTTPS upstreams (ALPN may choose HTTP/2): a client, with a pool of its own, per tenant,
    // so that no HTTP/1.1 connection carries two tenants' requests (as the own pool keeps
    // them apart). Made on a tenant's first HTTPS request, from `https` and `connector`, and
    // dropped when another tenant's is made once no request has begun on it for
    // `idle_timeout` (its pool then holds no connection, unless a response longer than that
    // was still streaming, whose connection is then closed when it ends instead of kept):
    // tenants removed or moved elsewhere leave nothing behind.
    clients: Mutex<HashMap<Option<TenantId>, TenantClient>>,
    idle_timeout: Duration,
    https: Builder,
    connector: Connector,
    // For upstreams that speak HTTP/2 with prior knowledge (h2c).
    h2_client: Client<Connector, OutgoingBody>,
}

impl Transport {
    /// Pools connecting within `connect_timeout`, keeping idle connections for
    /// `pool_idle_timeout`, at most `pool_max_idle` of them (the own pool's in all; each HTTPS
    /// and h2c client's per host), trusting `root_certificates` (PEM) too for HTTPS; the error
    /// says why the TLS configuration is unusable.
    pub(super) fn new(
        connect_timeout: Duration,
        pool_idle_timeout: Duration,
        pool_max_idle: usize,
        root_certificates: &[Vec<u8>],
    ) -> Result<Self, String> {
        let connector = connector(connect_timeout, root_certificates)?;
        let mut https = Client::builder(TokioExecutor::new());
        // (With a timer, so that idle connections past the timeout are closed by a sweep, not
        // only found so when next used.)
        https
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool_idle_timeout)
            .pool_max_idle_per_host(pool_max_idle)
            .http1_max_buf_size(MAX_BUF_SIZE)
            .http2_initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .http2_initial_connection_window_size(HTTP2_CONNECTION_WINDOW);
        let h2_client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool_idle_timeout)
            .pool_max_idle_per_host(pool_max_idle)
            .http2_only(true)
            .http2_initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .http2_initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .build(connector.clone());
        Ok(Self {
            http1: Http1Pool::new(
                http_connector(connect_timeout),
                pool_idle_timeout,
                pool_max_idle,
            ),
            clients: Mutex::new(HashMap::new()),
            idle_timeout: pool_idle_timeout,
            https,
            connector,
            h2_client,
        })
    }

    /// Whether `upstream` is reached over the proxy's own pool (plain-HTTP HTTP/1.1), which
    /// takes an origin-form target; hyper-util's clients take an absolute one.
    pub(super) fn pooled(upstream: &Upstream) -> bool {
        !upstream.http2() && *upstream.base().scheme() == Scheme::HTTP
    }

    /// Sends `request` to `upstream`: over the own pool when `pooled` (what
    /// [`pooled`](Self::pooled) said of it), else over the h2c or the HTTPS client.
    /// `replayable` (a safe method, no body) lets the own pool send it again on a new
    /// connection when an idle one closes as it goes out. No HTTP/1.1 connection carries
    /// another tenant's requests than `tenant`'s (HTTP/2 streams, each its own exchange,
    /// share h2c connections).
    pub(super) async fn send(
        &self,
        upstream: &Upstream,
        pooled: bool,
        tenant: Option<TenantId>,
        mut request: Request<OutgoingBody>,
        replayable: bool,
    ) -> Result<Response<Incoming>, BoxError> {
        if pooled {
            self.http1
                .send(upstream.base().authority(), tenant, request, replayable)
                .await
        } else if upstream.http2() {
            Ok(self.h2_client.request(request).await?)
        } else {
            // A connection that carried a request body is not used again (see the own pool):
            // a request saying `Connection: close` makes hyper (from 1.12, which Cargo.toml
            // asks for) close its connection after the exchange whatever the upstream answers.
            // (HTTP/2, where each exchange is a stream, drops the header.)
            if !http_body::Body::is_end_stream(request.body()) {
                request.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            let client = self.https_client(tenant, Instant::now());
            Ok(client.request(request).await?)
        }
    }

    /// `tenant`'s HTTPS client, made when it has none; making one drops the clients unused
    /// for the idle timeout. (A request in flight on a dropped client's connection goes on:
    /// the connection is closed when it ends, instead of kept.)
    fn https_client(
        &self,
        tenant: Option<TenantId>,
        now: Instant,
    ) -> Client<Connector, OutgoingBody> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = clients.get_mut(&tenant) {
            found.used = now;
            return found.client.clone();
        }
        clients.retain(|_, other| now.saturating_duration_since(other.used) < self.idle_timeout);
        let client = self.https.build(self.connector.clone());
        clients.insert(
            tenant,
            TenantClient {
                client: client.clone(),
                used: now,
            },
        );
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_https_client_unused_for_the_idle_timeout_goes_when_another_is_made() {
        let idle = Duration::from_secs(90);
        let transport = Transport::new(Duration::from_secs(1), idle, 8, &[]).unwrap();
        let tenant =
            |n: u8| Some(TenantId::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).unwrap());
        let held = |transport: &Transport| {
            let mut tenants: Vec<_> = transport.clients.lock().unwrap().keys().copied().collect();
            tenants.sort();
            tenants
        };
        let t0 = Instant::now();
        for n in 1..=3 {
            transport.https_client(tenant(n), t0);
        }
        transport.https_client(None, t0);
        // Tenant 1 is used again later; the others are not.
        transport.https_client(tenant(1), t0 + Duration::from_secs(60));
        assert_eq!(held(&transport).len(), 4);
        // Found again, nothing is dropped, however long the others were idle.
        transport.https_client(tenant(1), t0 + Duration::from_secs(120));
        assert_eq!(held(&transport).len(), 4);
        // A new tenant's client: those unused for 90 s go (2, 3 and the tenant-less one).
        transport.https_client(tenant(4), t0 + Duration::from_secs(150));
        assert_eq!(held(&transport), vec![tenant(1), tenant(4)]);
    }
}
