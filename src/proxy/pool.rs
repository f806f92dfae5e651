//! The proxy's own pool of HTTP/1.1 connections to plain-HTTP upstreams.
//!
//! hyper-util's general-purpose client was the largest single cost of a proxied request in the
//! profile (a keyed pool lookup and return, the URI cloned and re-formed, connection metadata,
//! a large future moved around). This pool does what the proxy needs and no more:
//!
//! - per upstream authority, a stack of idle connections; the most recently used goes first,
//!   so that the others age out;
//! - a connection is checked before use (closed ones are dropped), and a request that a closing
//!   connection hands back unsent is tried on the next one, as hyper-util's client does with
//!   `retry_canceled_requests`; a request that was sent is never sent twice;
//! - a connection goes back to the pool once it can take the next request (at once when the
//!   response was read whole with its head, else when its body is done);
//! - idle connections older than the idle timeout are closed: at checkout, and by a sweep that
//!   runs while the pool has idle connections and ends with the pool;
//! - a connection is used only by requests on the runtime that drives it (its connection task
//!   was spawned there), as nginx keeps an upstream keep-alive pool per worker: with the
//!   gateway binary's single-threaded workers, a request never waits on another worker's thread
//!   to move its bytes, nor on a runtime that is not running.
//!
//! HTTPS upstreams (ALPN may choose HTTP/2) and those speaking h2c keep hyper-util's client.

use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::runtime::Id as RuntimeId;

use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use super::body::OutgoingBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle HTTP/1.1 connections to plain-HTTP upstreams, by authority.
pub(crate) struct Http1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpConnector,
    idle: Mutex<HashMap<Authority, Stacks, BuildHasherDefault<AuthorityHasher>>>,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

/// A multiply-rotate hash (FxHash's) for the pool's keys. `Authority` hashes byte by byte,
/// which SipHash makes the most expensive step of a checkout; the keys are upstream authorities
/// from the gateway's configuration, never chosen by a client, so no keyed hash is needed.
#[derive(Default)]
struct AuthorityHasher(u64);

impl Hasher for AuthorityHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
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

struct Idle {
    sender: SendRequest<OutgoingBody>,
    since: Instant,
}

/// One upstream's idle connections, a stack per runtime that drives them (a handful at most:
/// one per worker).
type Stacks = Vec<(RuntimeId, Vec<Idle>)>;

impl Http1Pool {
    pub(crate) fn new(connector: HttpConnector, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                idle: Mutex::new(HashMap::default()),
                idle_timeout,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (its URI in origin form, its `Host` set) to `http://{authority}`, on an
    /// idle connection this runtime drives or a new one.
    pub(crate) async fn send(
        &self,
        authority: &Authority,
        mut request: Request<OutgoingBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        // The runtime this request runs on, which drives the connections it opens (the proxy
        // runs on tokio: its upstream timeout needs tokio's timer).
        let driver = tokio::runtime::Handle::current().id();
        while let Some(mut sender) = self.inner.checkout(authority, driver) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.inner.give_back(authority, driver, sender);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // The connection closed before the request was written: the next one.
                    Some(unsent) => request = unsent,
                    None => return Err(error.into_error().into()),
                },
            }
        }
        // Its connection task is spawned on this runtime: `driver` drives it.
        let mut sender = self.connect(authority).await?;
        let response = sender.send_request(request).await?;
        self.inner.give_back(authority, driver, sender);
        Ok(response)
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<OutgoingBody>, BoxError> {
        let origin = Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let mut connector = self.inner.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(origin).await?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(super::transport::MAX_BUF_SIZE)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// How many idle connections the pool holds (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().flatten().map(|(_, stack)| stack.len()).sum()
    }
}

impl Inner {
    /// The most recently returned idle connection to `authority` driven by `driver` that can
    /// take a request; closed and expired ones met on the way are dropped.
    fn checkout(
        &self,
        authority: &Authority,
        driver: RuntimeId,
    ) -> Option<SendRequest<OutgoingBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let stacks = idle.get_mut(authority)?;
        let (_, stack) = stacks.iter_mut().find(|(of, _)| *of == driver)?;
        while let Some(entry) = stack.pop() {
            if entry.sender.is_ready() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Returns a connection `driver` drives that carried a request, once it can carry the next.
    fn give_back(
        self: &Arc<Self>,
        authority: &Authority,
        driver: RuntimeId,
        mut sender: SendRequest<OutgoingBody>,
    ) {
        if sender.is_ready() {
            self.keep(authority, driver, sender);
        } else if !sender.is_closed() {
            // The response's body is still being read: back when it is done.
            let pool = Arc::downgrade(self);
            let authority = authority.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    if let Some(pool) = pool.upgrade() {
                        pool.keep(&authority, driver, sender);
                    }
                }
            });
        }
    }

    fn keep(
        self: &Arc<Self>,
        authority: &Authority,
        driver: RuntimeId,
        sender: SendRequest<OutgoingBody>,
    ) {
        let entry = Idle {
            sender,
            since: Instant::now(),
        };
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            match idle.get_mut(authority) {
                Some(stacks) => match stacks.iter_mut().find(|(of, _)| *of == driver) {
                    Some((_, stack)) => stack.push(entry),
                    None => stacks.push((driver, vec![entry])),
                },
                None => {
                    idle.insert(authority.clone(), vec![(driver, vec![entry])]);
                }
            }
        }
        // A load first: the swap's write would be made on every request.
        if !self.sweeping.load(Ordering::Acquire) && !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
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
        idle.retain(|_, stacks| {
            stacks.retain_mut(|(_, stack)| {
                stack.retain(|entry| {
                    !entry.sender.is_closed() && entry.since.elapsed() < pool.idle_timeout
                });
                !stack.is_empty()
            });
            !stacks.is_empty()
        });
        if idle.is_empty() {
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

    /// A server answering each request on a connection with a short 200, counting connections;
    /// with `close_after`, it closes each connection after that many answers (`Connection:
    /// close` on the last).
    async fn server(close_after: Option<usize>) -> (Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut answered = 0;
                    let mut buffer = vec![0u8; 4096];
                    let mut held = Vec::new();
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        held.extend_from_slice(&buffer[..n]);
                        while let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                            held.drain(..end + 4);
                            answered += 1;
                            let last = close_after == Some(answered);
                            let reply: &[u8] = if last {
                                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            if socket.write_all(reply).await.is_err() || last {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), connections)
    }

    fn request(origin: &Authority) -> Request<OutgoingBody> {
        Request::get("/Patient/1")
            .header(http::header::HOST, origin.as_str())
            .body(Empty::<Bytes>::new().map_err(Into::into).boxed_unsync())
            .unwrap()
    }

    async fn get(pool: &Http1Pool, origin: &Authority) -> Result<Bytes, BoxError> {
        let response = pool.send(origin, request(origin)).await?;
        assert_eq!(response.status(), http::StatusCode::OK);
        Ok(response.into_body().collect().await?.to_bytes())
    }

    fn pool(idle_timeout: Duration) -> Http1Pool {
        Http1Pool::new(HttpConnector::new(), idle_timeout)
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
    async fn an_unreachable_upstream_is_an_error() {
        let pool = pool(Duration::from_secs(60));
        let origin: Authority = "127.0.0.1:1".parse().unwrap();
        assert!(pool.send(&origin, request(&origin)).await.is_err());
        assert_eq!(pool.idle_count(), 0);
    }
}
