//! The proxy's own pool of HTTP/1.1 connections to plain-HTTP upstreams.
//!
//! hyper-util's general-purpose client was the largest single cost of a proxied request in the
//! profile (a keyed pool lookup and return, the URI cloned and re-formed, connection metadata,
//! a large future moved around). This pool does what the proxy needs and no more:
//!
//! - per upstream authority and tenant, a stack of idle connections; the most recently used
//!   goes first, so that the others age out. A connection carries one tenant's requests only:
//!   an upstream that answers out of turn (an answer sent late, after the request that asked
//!   for it was answered; a request body it did not read, read as the next request) can give a
//!   request another request's answer, and never another tenant's;
//!   (Requests that name no tenant, from a stack without the tenant layer, share the
//!   connections of their upstream authority.)
//! - a connection whose request carried a body is not used again: a server that answers a
//!   request before reading its body (a `413`, a `401`, or a `200` from a handler that ignores
//!   it) should close the connection or read the body (RFC 9112 §9.3), and one that does
//!   neither would read the body as the next request, which a client could write to make
//!   another client of its tenant get the answer it chose. Writes cost a connection each;
//! - a connection is checked before use (closed ones are dropped), and a request that a closing
//!   connection hands back unsent is tried on the next one, as hyper-util's client does with
//!   `retry_canceled_requests`;
//! - a safe request with no body (`GET`, `HEAD`, `OPTIONS`) sent on a connection that had been
//!   idle for [`REPLAY_AFTER_IDLE`] or more, and that the upstream closed or reset without a
//!   byte of answer within [`REPLAY_WITHIN`] of sending it, is sent once more on a new
//!   connection: an upstream closes an idle
//!   connection when its own keep-alive timeout ends (5 s for Node's HTTP server, Apache and
//!   uvicorn), and a request can be on its way just then (nginx sends such a request again too;
//!   RFC 9110 §9.2.2 lets a client retry a request whose method is idempotent). Any other
//!   request, one on a connection busy a moment before, one of whose answer a byte came (an
//!   interim `103`, half a head), or one the upstream held longer (it may have acted on it and
//!   failed), is never sent twice;
//! - a connection goes back to the pool once it can take the next request (at once when the
//!   response was read whole with its head, else when its body is done);
//! - idle connections older than the idle timeout are closed: at checkout, and by a sweep that
//!   runs while the pool has idle connections and ends with the pool;
//! - a connection is used only by requests on the runtime that drives it (its connection task
//!   was spawned there), as nginx keeps an upstream keep-alive pool per worker: with the
//!   gateway binary's single-threaded workers, a request never waits on another worker's thread
//!   to move its bytes, nor on a runtime that is not running.
//!
//! HTTPS upstreams (ALPN may choose HTTP/2) and those speaking h2c keep hyper-util's client
//! (for HTTPS, one a tenant, so that tenants share no connection there either).

use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::runtime::Id as RuntimeId;

use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

use super::body::OutgoingBody;
use crate::tenant::TenantId;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection must have been idle for a safe request that it loses unanswered to be
/// sent again on a new one. No upstream closes a kept-alive connection sooner (the shortest
/// keep-alive timeouts in use are about a second); a connection idle for less was busy a
/// moment ago, and one that dies then failed for another reason. It also spares the copy a
/// replay needs on connections that are reused at once, as under load.
pub(crate) const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// How soon after a request is sent the close that loses it must come for it to be sent again:
/// a connection closed as the request arrived reports it at once; one the upstream held on to
/// longer may have worked on it (and failed, or crashed), and a second sending would double
/// that work.
pub(crate) const REPLAY_WITHIN: Duration = Duration::from_secs(1);

/// Idle HTTP/1.1 connections to plain-HTTP upstreams, by authority.
pub(crate) struct Http1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpConnector,
    idle: Mutex<IdleSet>,
    idle_timeout: Duration,
    /// The most idle connections kept, every upstream and tenant together.
    max_idle: usize,
    sweeping: AtomicBool,
}

/// The idle connections, by upstream, and how many there are.
#[derive(Default)]
struct IdleSet {
    by_authority: HashMap<Authority, Tenants, BuildHasherDefault<AuthorityHasher>>,
    count: usize,
}

/// A multiply-rotate hash (FxHash's) for the pool's keys. `Authority` hashes byte by byte,
/// which SipHash makes the most expensive step of a checkout; the keys are upstream authorities
/// from the gateway's configuration and the ids of tenants it serves (a verified token's),
/// never chosen at will by a client, so no keyed hash is needed.
#[derive(Default)]
struct AuthorityHasher(u64);

impl Hasher for AuthorityHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes a round (a tenant id's sixteen in two).
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut eight = [0; 8];
            eight.copy_from_slice(word);
            self.write_u64(u64::from_le_bytes(eight));
        }
        for &byte in words.remainder() {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.write_u64(u64::from(byte));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A connection: its sender, and how many reads brought bytes from the upstream so far.
struct Connection {
    sender: SendRequest<OutgoingBody>,
    heard: Arc<AtomicU64>,
}

struct Idle {
    connection: Connection,
    since: Instant,
}

/// One upstream's idle connections, by the tenant whose requests they carry (`None`: requests
/// that name no tenant), a stack per runtime that drives them (a handful at most: one per
/// worker).
type Tenants = HashMap<Option<TenantId>, Stacks, BuildHasherDefault<AuthorityHasher>>;
type Stacks = Vec<(RuntimeId, Vec<Idle>)>;

/// An upstream connection's socket, counting the reads that brought bytes (the pool's own
/// reads: one writer, so a load and a store, no atomic read-modify-write).
struct Counted {
    stream: TcpStream,
    heard: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let heard = self.heard.load(Ordering::Relaxed);
            self.heard.store(heard + 1, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Http1Pool {
    /// A pool keeping at most `max_idle` idle connections in all, each for `idle_timeout`.
    pub(crate) fn new(connector: HttpConnector, idle_timeout: Duration, max_idle: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                idle: Mutex::new(IdleSet::default()),
                idle_timeout,
                max_idle,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (its URI in origin form, its `Host` set) to `http://{authority}`, on an
    /// idle connection this runtime drives that carried only `tenant`'s requests, or a new one.
    ///
    /// `replayable` says the request may be sent twice: a safe method with no body. Then, sent
    /// on a connection idle for [`REPLAY_AFTER_IDLE`] or more that closes without a byte of
    /// answer, it is sent again on a new connection, once.
    pub(crate) async fn send(
        &self,
        authority: &Authority,
        tenant: Option<TenantId>,
        mut request: Request<OutgoingBody>,
        replayable: bool,
    ) -> Result<Response<Incoming>, BoxError> {
        // The runtime this request runs on, which drives the connections it opens (the proxy
        // runs on tokio: its upstream timeout needs tokio's timer).
        let driver = tokio::runtime::Handle::current().id();
        let key = (authority, tenant);
        let carries_body = !http_body::Body::is_end_stream(request.body());
        while let Some((mut connection, idle_for)) = self.inner.checkout(key, driver) {
            // The copy and when it went out, boxed: the future awaiting the answer stays small
            // (it is moved as the layers above poll it), and most requests need neither.
            let copy = (replayable && idle_for >= REPLAY_AFTER_IDLE)
                .then(|| Box::new((bodiless_copy(&request), Instant::now())));
            let heard = connection.heard.load(Ordering::Relaxed);
            match connection.sender.try_send_request(request).await {
                Ok(response) => {
                    self.inner.give_back(key, driver, connection, carries_body);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // The connection closed before the request was written: the next one.
                    Some(unsent) => request = unsent,
                    None => {
                        let error = error.into_error();
                        let unanswered = heard == connection.heard.load(Ordering::Relaxed)
                            && super::service::closed_unanswered(&error);
                        match copy {
                            Some(copy) if unanswered && copy.1.elapsed() < REPLAY_WITHIN => {
                                // The upstream closed it as the request went out: the other
                                // idle connections of the same age may be closing too.
                                tracing::debug!(
                                    %authority,
                                    ?idle_for,
                                    %error,
                                    "an idle upstream connection closed as a request went out: \
                                     sent again on a new one"
                                );
                                metrics::counter!("tower_fhir_upstream_replays_total").increment(1);
                                request = copy.0;
                                break;
                            }
                            _ => return Err(error.into()),
                        }
                    }
                },
            }
        }
        // Its connection task is spawned on this runtime: `driver` drives it.
        let mut connection = self.connect(authority).await?;
        let response = connection.sender.send_request(request).await?;
        self.inner.give_back(key, driver, connection, carries_body);
        Ok(response)
    }

    async fn connect(&self, authority: &Authority) -> Result<Connection, BoxError> {
        let origin = Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let mut connector = self.inner.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let heard = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(Counted {
            stream: connector.call(origin).await?.into_inner(),
            heard: Arc::clone(&heard),
        });
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(super::transport::MAX_BUF_SIZE)
            .handshake(io)
            .await?;
        let upstream = authority.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                if error.to_string().contains("unexpected message") {
                    // Bytes no request asked for (an answer sent twice, or late): a server
                    // that answers out of turn, which the operator should hear of.
                    tracing::warn!(upstream = %upstream, %error, "upstream connection ended: the upstream sent what no request asked for");
                } else {
                    tracing::debug!(%error, "upstream connection ended");
                }
            }
        });
        Ok(Connection { sender, heard })
    }

    /// How many idle connections the pool holds (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        let count = idle
            .by_authority
            .values()
            .flat_map(|tenants| tenants.values().flatten())
            .map(|(_, stack)| stack.len())
            .sum();
        assert_eq!(idle.count, count, "the count kept is the count held");
        count
    }
}

/// `request` again, for a second sending: its head, and no body (it has none).
fn bodiless_copy(request: &Request<OutgoingBody>) -> Request<OutgoingBody> {
    let mut copy = Request::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// An upstream's authority, and the tenant whose requests its connections carry.
type Key<'a> = (&'a Authority, Option<TenantId>);

impl Inner {
    /// The most recently returned idle connection for `key` driven by `driver` that can take a
    /// request, and how long it has been idle; closed and expired ones met on the way are
    /// dropped.
    fn checkout(
        &self,
        (authority, tenant): Key<'_>,
        driver: RuntimeId,
    ) -> Option<(Connection, Duration)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let IdleSet {
            by_authority,
            count,
        } = &mut *idle;
        let stacks = by_authority.get_mut(authority)?.get_mut(&tenant)?;
        let (_, stack) = stacks.iter_mut().find(|(of, _)| *of == driver)?;
        while let Some(entry) = stack.pop() {
            *count -= 1;
            let idle_for = entry.since.elapsed();
            if entry.connection.sender.is_ready() && idle_for < self.idle_timeout {
                return Some((entry.connection, idle_for));
            }
        }
        None
    }

    /// Returns a connection `driver` drives that carried a request, once it can carry the
    /// next; not one whose request carried a body (the server may have left the body unread,
    /// to read it as the next request).
    fn give_back(
        self: &Arc<Self>,
        key: Key<'_>,
        driver: RuntimeId,
        mut connection: Connection,
        carried_body: bool,
    ) {
        if carried_body {
            // Dropped: the connection ends once this exchange does.
            return;
        }
        if connection.sender.is_ready() {
            self.keep(key, driver, connection);
        } else if !connection.sender.is_closed() {
            // The response's body is still being read: back when it is done.
            let pool = Arc::downgrade(self);
            let (authority, tenant) = (key.0.clone(), key.1);
            tokio::spawn(async move {
                if connection.sender.ready().await.is_ok() {
                    if let Some(pool) = pool.upgrade() {
                        pool.keep((&authority, tenant), driver, connection);
                    }
                }
            });
        }
    }

    fn keep(
        self: &Arc<Self>,
        (authority, tenant): Key<'_>,
        driver: RuntimeId,
        connection: Connection,
    ) {
        let entry = Idle {
            connection,
            since: Instant::now(),
        };
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.count >= self.max_idle {
                // Full: closed rather than kept (the idle timeout makes room). Dropped after
                // the lock is let go.
                drop(idle);
                tracing::debug!(upstream = %authority, max = self.max_idle, "the upstream connection pool is full: a connection is closed rather than kept");
                return;
            }
            idle.count += 1;
            // One look-up of the authority where it has connections already (the common case).
            match idle.by_authority.get_mut(authority) {
                Some(tenants) => push(tenants, tenant, driver, entry),
                None => {
                    let mut tenants = Tenants::default();
                    push(&mut tenants, tenant, driver, entry);
                    idle.by_authority.insert(authority.clone(), tenants);
                }
            }
        }
        // A load first: the swap's write would be made on every request.
        if !self.sweeping.load(Ordering::Acquire) && !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

/// Puts `entry` on top of `tenant`'s stack of connections `driver` drives.
fn push(tenants: &mut Tenants, tenant: Option<TenantId>, driver: RuntimeId, entry: Idle) {
    let stacks = tenants.entry(tenant).or_default();
    match stacks.iter_mut().find(|(of, _)| *of == driver) {
        Some((_, stack)) => stack.push(entry),
        None => stacks.push((driver, vec![entry])),
    }
}

/// Closes idle connections past the idle timeout (and drops closed ones) every half timeout,
/// until no idle connection is left or the pool is gone.
async fn sweep(pool: Weak<Inner>, idle_timeout: Duration) {
    /// Clears the pool's `sweeping` flag when the sweep ends, however it ends (its runtime may
    /// be dropped under it): the next connection kept then starts another.
    struct Ended(Weak<Inner>);
    impl Drop for Ended {
        fn drop(&mut self) {
            if let Some(pool) = self.0.upgrade() {
                pool.sweeping.store(false, Ordering::Release);
            }
        }
    }
    let mut ended = Ended(pool.clone());
    let period = (idle_timeout / 2).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut count = 0;
        idle.by_authority.retain(|_, tenants| {
            tenants.retain(|_, stacks| {
                stacks.retain_mut(|(_, stack)| {
                    stack.retain(|entry| {
                        !entry.connection.sender.is_closed()
                            && entry.since.elapsed() < pool.idle_timeout
                    });
                    count += stack.len();
                    !stack.is_empty()
                });
                !stacks.is_empty()
            });
            !tenants.is_empty()
        });
        idle.count = count;
        if idle.by_authority.is_empty() {
            // The next connection kept starts a new sweep: said under the lock, so that one
            // kept just after this sees it.
            pool.sweeping.store(false, Ordering::Release);
            ended.0 = Weak::new();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A server reading the request heads of each connection it accepts (bodies are not read
    /// as such: their bytes wait for the next head) and answering the `nth` head of its
    /// `connection`th connection (both from 0) with what `reply` gives: the bytes to write,
    /// and whether to close the connection after them. Counts connections and heads.
    async fn scripted_server<F>(reply: F) -> (Authority, Arc<AtomicUsize>, Arc<AtomicUsize>)
    where
        F: Fn(usize, usize) -> (&'static [u8], bool) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counted, seen) = (Arc::clone(&connections), Arc::clone(&heads));
        let reply = Arc::new(reply);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let connection = counted.fetch_add(1, Ordering::SeqCst);
                let (seen, reply) = (Arc::clone(&seen), Arc::clone(&reply));
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 4096];
                    let mut held = Vec::new();
                    let mut nth = 0;
                    while let Ok(n @ 1..) = socket.read(&mut buffer).await {
                        held.extend_from_slice(&buffer[..n]);
                        while let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                            held.drain(..end + 4);
                            seen.fetch_add(1, Ordering::SeqCst);
                            let (bytes, close) = reply(connection, nth);
                            nth += 1;
                            if socket.write_all(bytes).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), connections, heads)
    }

    /// A server answering each request on a connection with a short 200, counting connections;
    /// with `close_after`, it closes each connection after that many answers (`Connection:
    /// close` on the last).
    async fn server(close_after: Option<usize>) -> (Authority, Arc<AtomicUsize>) {
        let (origin, connections, _) = scripted_server(move |_, nth| {
            if close_after == Some(nth + 1) {
                (
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                    true,
                )
            } else {
                (OK, false)
            }
        })
        .await;
        (origin, connections)
    }

    /// A server that answers the first request of each connection (keeping it open), then
    /// reads the next request's head and closes the connection after `last_words` (none: not
    /// a byte), as an upstream whose keep-alive timeout ends just as a request arrives. With
    /// `only_the_first`, every connection after the first closes so at once. Counts
    /// connections and heads.
    async fn closing_server(
        only_the_first: bool,
        last_words: &'static [u8],
    ) -> (Authority, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        scripted_server(move |connection, nth| {
            if nth == 0 && !(only_the_first && connection > 0) {
                (OK, false)
            } else {
                (last_words, true)
            }
        })
        .await
    }

    /// A server that answers every request `413` at once, keeping the connection, whether it
    /// read the body or not (it reads on, taking what it did not read for the next request).
    async fn refusing_server() -> (Authority, Arc<AtomicUsize>) {
        let (origin, connections, _) = scripted_server(|_, _| {
            (
                b"HTTP/1.1 413 Too Large\r\ncontent-length: 0\r\n\r\n",
                false,
            )
        })
        .await;
        (origin, connections)
    }

    fn request(origin: &Authority) -> Request<OutgoingBody> {
        Request::get("/Patient/1")
            .header(http::header::HOST, origin.as_str())
            .body(Empty::<Bytes>::new().map_err(Into::into).boxed_unsync())
            .unwrap()
    }

    async fn get(pool: &Http1Pool, origin: &Authority) -> Result<Bytes, BoxError> {
        let response = pool.send(origin, None, request(origin), true).await?;
        assert_eq!(response.status(), http::StatusCode::OK);
        Ok(response.into_body().collect().await?.to_bytes())
    }

    fn pool(idle_timeout: Duration) -> Http1Pool {
        Http1Pool::new(HttpConnector::new(), idle_timeout, 512)
    }

    #[tokio::test]
    async fn one_connection_carries_requests_in_turn() {
        let (origin, connections) = server(None).await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(get(&pool, &origin).await.unwrap(), "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[test]
    fn each_single_threaded_runtime_uses_the_connections_it_drives() {
        let serving = tokio::runtime::Runtime::new().unwrap();
        let (origin, connections) = serving.block_on(server(None));
        let pool = Arc::new(pool(Duration::from_secs(60)));
        // Two workers, as the gateway runs them: A's connection is idle in the pool while B
        // asks, and B opens its own rather than take one A's runtime drives.
        let (a_done, after_a) = std::sync::mpsc::channel::<()>();
        let (b_done, after_b) = std::sync::mpsc::channel::<()>();
        let turn = Duration::from_secs(30);
        let worker = |first: bool,
                      done: std::sync::mpsc::Sender<()>,
                      wait: std::sync::mpsc::Receiver<()>| {
            let (pool, origin) = (Arc::clone(&pool), origin.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let three = || {
                    runtime.block_on(async {
                        for _ in 0..3 {
                            // A connection of A's, idle while A's runtime is not running,
                            // would never answer B.
                            let got =
                                tokio::time::timeout(Duration::from_secs(5), get(&pool, &origin))
                                    .await
                                    .expect("a request used a connection another runtime drives");
                            assert_eq!(got.unwrap(), "ok");
                        }
                    })
                };
                // A worker that fails drops its sender: the other goes on rather than wait.
                if first {
                    three();
                    let _ = done.send(());
                    let _ = wait.recv_timeout(turn);
                    three();
                } else {
                    let _ = wait.recv_timeout(turn);
                    three();
                    let _ = done.send(());
                }
            })
        };
        let (a, b) = (
            worker(true, a_done, after_b),
            worker(false, b_done, after_a),
        );
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_threaded_runtime_every_thread_shares_the_connections() {
        let (origin, connections) = server(None).await;
        let pool = Arc::new(pool(Duration::from_secs(60)));
        for _ in 0..8 {
            let (pool, origin) = (Arc::clone(&pool), origin.clone());
            let answer = tokio::spawn(async move { get(&pool, &origin).await.unwrap() });
            assert_eq!(answer.await.unwrap(), "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_their_own_connections_and_all_are_kept() {
        let (origin, connections) = server(None).await;
        let pool = pool(Duration::from_secs(60));
        let requests = (0..4).map(|_| get(&pool, &origin));
        for body in futures::future::join_all(requests).await {
            assert_eq!(body.unwrap(), "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle_count(), 4);
        // Then they are reused: no new connection.
        for _ in 0..8 {
            get(&pool, &origin).await.unwrap();
        }
        assert_eq!(connections.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn beyond_the_most_idle_connections_a_connection_is_closed_not_kept() {
        let (origin, connections) = server(None).await;
        let (other, _) = server(None).await;
        let pool = Http1Pool::new(HttpConnector::new(), Duration::from_secs(60), 3);
        let requests = (0..4).map(|_| get(&pool, &origin));
        for body in futures::future::join_all(requests).await {
            assert_eq!(body.unwrap(), "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle_count(), 3, "three kept, one closed");
        // Every upstream and tenant together: another upstream's connection finds no room
        // either, until one is taken.
        get(&pool, &other).await.unwrap();
        assert_eq!(pool.idle_count(), 3);
        get(&pool, &origin).await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 4, "a kept one was used");
        // None kept at all.
        let none = Http1Pool::new(HttpConnector::new(), Duration::from_secs(60), 0);
        for _ in 0..2 {
            get(&none, &origin).await.unwrap();
            assert_eq!(none.idle_count(), 0);
        }
        assert_eq!(connections.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        let (origin, connections) = server(Some(1)).await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(get(&pool, &origin).await.unwrap(), "ok");
            assert_eq!(pool.idle_count(), 0, "a closing connection is not kept");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_the_sweep_closes_them() {
        let (origin, connections) = server(None).await;
        let pool = pool(Duration::from_millis(100));
        get(&pool, &origin).await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(pool.idle_count(), 0, "the sweep closed it");
        get(&pool, &origin).await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 1, "a new sweep keeps running");
    }

    #[tokio::test]
    async fn a_safe_request_lost_on_a_connection_closed_as_it_went_out_goes_again_once() {
        let (origin, connections, heads) = closing_server(false, b"").await;
        let pool = pool(Duration::from_secs(60));
        let sent = |replayable| pool.send(&origin, None, request(&origin), replayable);
        let ok = |response: Response<Incoming>| assert_eq!(response.status(), 200);

        // Idle long enough for its upstream to close it: sent again on a new connection.
        ok(sent(true).await.unwrap());
        tokio::time::sleep(REPLAY_AFTER_IDLE + Duration::from_millis(20)).await;
        ok(sent(true).await.unwrap());
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(
            heads.load(Ordering::SeqCst),
            3,
            "the lost request went out twice"
        );

        // Not replayable (an unsafe method, or a body): the error, sent once.
        tokio::time::sleep(REPLAY_AFTER_IDLE + Duration::from_millis(20)).await;
        let error = sent(false).await.unwrap_err();
        assert!(super::super::service::closed_unanswered(&*error), "{error}");
        assert_eq!(heads.load(Ordering::SeqCst), 4);

        // A connection busy a moment ago that dies failed for another reason: not replayed.
        ok(sent(true).await.unwrap());
        sent(true).await.unwrap_err();
        assert_eq!(connections.load(Ordering::SeqCst), 3);
        assert_eq!(heads.load(Ordering::SeqCst), 6);

        // One replay at most: when the new connection closes unanswered too, the error.
        let (origin, connections, heads) = closing_server(true, b"").await;
        let pool = super::Http1Pool::new(HttpConnector::new(), Duration::from_secs(60), 512);
        ok(pool
            .send(&origin, None, request(&origin), true)
            .await
            .unwrap());
        tokio::time::sleep(REPLAY_AFTER_IDLE + Duration::from_millis(20)).await;
        pool.send(&origin, None, request(&origin), true)
            .await
            .unwrap_err();
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(heads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_request_of_whose_answer_a_byte_came_is_never_sent_again() {
        for last_words in [
            &b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-ty",
        ] {
            let (origin, connections, heads) = closing_server(false, last_words).await;
            let pool = pool(Duration::from_secs(60));
            get(&pool, &origin).await.unwrap();
            tokio::time::sleep(REPLAY_AFTER_IDLE + Duration::from_millis(20)).await;
            let error = pool
                .send(&origin, None, request(&origin), true)
                .await
                .unwrap_err();
            assert!(super::super::service::closed_unanswered(&*error), "{error}");
            assert_eq!(heads.load(Ordering::SeqCst), 2, "sent once");
            assert_eq!(connections.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn tenants_never_share_a_connection() {
        let (origin, connections) = server(None).await;
        let pool = pool(Duration::from_secs(60));
        let (a, b): (TenantId, TenantId) = (
            "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".parse().unwrap(),
            "9b2e1c3d-0000-4000-8000-00000000000b".parse().unwrap(),
        );
        for tenant in [Some(a), Some(b), None, Some(a), Some(b), None] {
            let response = pool
                .send(&origin, tenant, request(&origin), true)
                .await
                .unwrap();
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
        }
        // One each, each used twice.
        assert_eq!(connections.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(), 3);
    }

    #[tokio::test]
    async fn a_connection_that_carried_a_request_body_is_not_used_again() {
        let (origin, connections) = refusing_server().await;
        let pool = pool(Duration::from_secs(60));
        let post = || {
            Request::post("/Patient")
                .header(http::header::HOST, origin.as_str())
                .header(http::header::CONTENT_LENGTH, "34")
                .body(
                    http_body_util::Full::new(Bytes::from_static(
                        b"GET /fhir/Patient/secret HTTP/1.1\n",
                    ))
                    .map_err(Into::into)
                    .boxed_unsync(),
                )
                .unwrap()
        };
        for _ in 0..2 {
            let response = pool.send(&origin, None, post(), false).await.unwrap();
            assert_eq!(response.status(), 413);
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            2,
            "each on its own connection"
        );
        assert_eq!(pool.idle_count(), 0);
        // A request without a body leaves nothing unread: its connection is kept, answered
        // as it may be.
        let response = pool
            .send(&origin, None, request(&origin), true)
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        response.into_body().collect().await.unwrap();
        for _ in 0..100 {
            if pool.idle_count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        let pool = pool(Duration::from_secs(60));
        let origin: Authority = "127.0.0.1:1".parse().unwrap();
        assert!(pool
            .send(&origin, None, request(&origin), true)
            .await
            .is_err());
        assert_eq!(pool.idle_count(), 0);
    }
}
