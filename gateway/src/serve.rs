//! Serving: HTTP/1.1 and HTTP/2 connections, over TLS when it is configured (see
//! [`crate::tls`]), the admin API beside the gateway, graceful shutdown on SIGTERM or Ctrl-C.
//!
//! One worker per CPU (`workers`), as nginx runs one per core: each a thread of its own with a
//! single-threaded tokio runtime and a listening socket of its own on the same address
//! (`SO_REUSEPORT`: the kernel spreads new connections over them). A connection lives on the
//! worker that accepted it; a request never changes threads, and no work-stealing scheduler
//! runs between it and the socket. The workers share the gateway (its caches, keys and
//! limits); background work (change listeners, key refreshes, metrics) runs on the main
//! thread's runtime.
//!
//! Each connection is bounded: a whole request head within the header-read timeout, no idle
//! keep-alive beyond the idle timeout, at most `max_connections` served at once (beyond, each
//! worker holds one accepted connection unserved and the rest wait in the kernel's listen
//! backlog), and at shutdown in-flight requests get the grace period, no more.
//! HTTP/1.1's heads are timed by hyper's header-read timer, given a [`HeadTimer`] of the
//! connection's own: the first head must be whole within the header-read timeout of the
//! connection; a keep-alive connection waiting for its next request is idle until that
//! request's first byte (closed after the idle timeout if none comes), and from that byte the
//! head must be whole within the header-read timeout. The per-connection watchdog covers the
//! rest:
//!
//! - a connection that has started no request within the header-read timeout (HTTP/2, or
//!   still picking its protocol) is closed;
//! - one with no request in flight and nothing to send for the idle timeout is closed
//!   gracefully, whatever else it sends (HTTP/2 PINGs keep no connection open);
//! - one whose client has taken none of its response for the idle timeout, or less than
//!   16 KiB of what waits (it stopped reading, or an HTTP/2 client stopped granting
//!   flow-control window, or grants it a byte at a time) is dropped, its socket reset: such a
//!   response may never finish, so a graceful close would wait for ever. A request waiting on
//!   its upstream is not the client's doing and is never cut.
//!
//! A request is in flight from the moment hyper hands it over until its response body ends
//! (or is given up); the body's chunks are still to send until hyper has written them (or
//! HTTP/2 has framed them), and the bytes it writes of them are the client's progress. The
//! watchdog wakes a few times per idle timeout, never per request; what a request costs it is
//! a few relaxed atomic operations, a shared progress record for a body that yields data (an
//! allocation and a push under the connection's own lock) and an `Arc` clone per chunk:
//! about 650 instructions in all (`benches/instructions.sh`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Buf;
use futures::future;
use http::{HeaderValue, Request};
use http_body_util::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};
use tower_fhir::ops::{MakeUuid, ParseErrorOutcomes, RequestIdFuture, X_REQUEST_ID};
use tower_fhir::outcome::{IssueType, OperationOutcome, Severity};
use tower_fhir::proxy::ClientAddr;

use crate::config::PeerSays;
use crate::front::{AdminFront, Front, Served};
use crate::per_address::PerAddress;
use crate::tls::FrontTls;

/// The connection bounds, and how requests name their client, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A connection must send a whole request head within this (`header_read_timeout_seconds`).
    pub(crate) header_read_timeout: Duration,
    /// A connection with nothing in flight and no bytes for this long is closed
    /// (`idle_timeout_seconds`).
    pub(crate) idle_timeout: Duration,
    /// The most connections open at once (`max_connections`, at least 1).
    pub(crate) max_connections: u32,
    /// The most requests at once on one HTTP/2 connection (`http2_max_concurrent_streams`).
    pub(crate) http2_max_streams: u32,
    /// The HTTP/2 requests in flight, every connection together: a permit each, at most
    /// `http2_max_requests_in_flight` (shared by the workers).
    pub(crate) http2_in_flight: &'static Semaphore,
    /// How long in-flight requests may take after SIGTERM or Ctrl-C (`shutdown_grace_seconds`).
    pub(crate) shutdown_grace: Duration,
    /// The header a load balancer names each request's client in (`client_address_header`),
    /// read from the trusted balancers into a
    /// [`ForwardedClient`](tower_fhir::token::ForwardedClient) for the throttles, and whose
    /// forwarding headers `trust_forwarded_headers` keeps. Made once for the process.
    pub(crate) client_address: Option<&'static crate::config::ClientAddressRule>,
    /// The most connections one address holds (`max_connections_per_address`), and its
    /// counts (shared by the workers).
    pub(crate) per_address: Option<&'static PerAddress>,
}

/// `workers` listening sockets on `addr` (the first one's port for the others, when `addr`
/// names port 0), each with `SO_REUSEPORT` (on Unix; elsewhere one socket, one worker).
/// Call it inside a tokio runtime.
pub(crate) fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    // First without SO_REUSEPORT: an address another process listens on (a second gateway
    // started by mistake, say) is refused, instead of the two splitting its connections.
    let probe = std::net::TcpListener::bind(addr)?;
    let mut addr = probe.local_addr()?;
    drop(probe);
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        #[cfg(unix)]
        {
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        addr = listener.local_addr()?;
        listeners.push(listener.into_std()?);
        if cfg!(not(unix)) {
            break;
        }
    }
    Ok(listeners)
}

/// The most connections `admin_listen` holds open at once, apart from `max_connections`: a
/// flood on `listen` does not lock the administrator out.
const ADMIN_MAX_CONNECTIONS: u32 = 64;

/// Serves HTTP/1.1 and HTTP/2 on `listeners`, a worker each (see the [module docs](self)),
/// and the admin API alone on `admin_listener` (`admin_listen`) when there is one, until Ctrl-C
/// or SIGTERM, then lets in-flight requests finish within `limits.shutdown_grace`.
pub(crate) async fn serve(
    listeners: Vec<std::net::TcpListener>,
    admin_listener: Option<std::net::TcpListener>,
    served: Served,
    tls: Option<FrontTls>,
    limits: Limits,
    mut stop: Signals,
) -> Result<(), String> {
    // Each connection holds a permit, whichever worker has it: with none left, the next one
    // waits in the listen backlog. The admin listener's are its own.
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let admin_permits = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS as usize));
    let (stopping, stop_watch) = watch::channel(false);
    // Told when the main thread has stopped waiting for connections: the workers then end.
    let (finished, finished_watch) = watch::channel(false);
    let tls = tls.as_ref().map(|tls| tls.acceptor().clone());
    let Served {
        gateway,
        admin,
        admin_apart,
        ..
    } = served;
    let mut workers = Vec::with_capacity(listeners.len() + 1);
    for (n, listener) in listeners.into_iter().enumerate() {
        let fronts = Fronts {
            gateway: gateway.clone(),
            admin: admin.clone(),
            only_admin: false,
            tls: tls.clone(),
        };
        workers.push(worker(
            format!("tower-fhir-worker-{n}"),
            listener,
            fronts,
            limits,
            Arc::clone(&permits),
            (stop_watch.clone(), finished_watch.clone()),
        )?);
    }
    if let (Some(listener), Some(admin)) = (admin_listener, admin_apart) {
        let fronts = Fronts {
            gateway,
            admin: Some(admin),
            only_admin: true,
            tls,
        };
        // Its connections are its own: an address holding its share on `listen` (an office
        // behind one NAT) is not held out of the admin API for it, nor are HTTP/2 requests
        // by a flood of them on `listen`.
        let admin_limits = Limits {
            per_address: None,
            http2_in_flight: Box::leak(Box::new(Semaphore::new(
                (ADMIN_MAX_CONNECTIONS * limits.http2_max_streams) as usize,
            ))),
            ..limits
        };
        workers.push(worker(
            "tower-fhir-admin".to_owned(),
            listener,
            fronts,
            admin_limits,
            Arc::clone(&admin_permits),
            (stop_watch, finished_watch),
        )?);
    }
    stop.received().await;
    tracing::info!(
        "shutting down: finishing in-flight requests (a second Ctrl-C or SIGTERM stops at once)"
    );
    let _ = stopping.send(true);
    // Every permit back means every connection is closed.
    let all = limits.max_connections;
    let drained = tokio::time::timeout(
        limits.shutdown_grace,
        future::join(
            permits.acquire_many(all),
            admin_permits.acquire_many(ADMIN_MAX_CONNECTIONS),
        ),
    );
    let open = || {
        (all as usize).saturating_sub(permits.available_permits())
            + (ADMIN_MAX_CONNECTIONS as usize).saturating_sub(admin_permits.available_permits())
    };
    tokio::select! {
        drained = drained => if drained.is_err() {
            let open = open();
            tracing::warn!(
                open_connections = open,
                grace_seconds = limits.shutdown_grace.as_secs(),
                "shutdown grace period over with {open} connections still open; exiting anyway"
            );
            // The requests still in flight are cut: recorded as the gateway's doing.
            tower_fhir::ops::cutting_in_flight();
        },
        () = stop.received() => {
            let open = open();
            tracing::warn!(open_connections = open, "a second stop signal: exiting now with {open} connections still open");
            tower_fhir::ops::cutting_in_flight();
        }
    }
    let _ = finished.send(true);
    for worker in workers {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    Ok(())
}

/// A worker thread serving `listener` on a single-threaded runtime of its own until
/// `watches.0` says stop, and staying until `watches.1` says every connection is done.
fn worker(
    name: String,
    listener: std::net::TcpListener,
    fronts: Fronts,
    limits: Limits,
    permits: Arc<Semaphore>,
    watches: (watch::Receiver<bool>, watch::Receiver<bool>),
) -> Result<std::thread::JoinHandle<()>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a worker's runtime: {e}"))?;
    let (stop_watch, mut finished_watch) = watches;
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => accept(listener, fronts, limits, permits, stop_watch).await,
                    Err(error) => tracing::error!(%error, "a worker cannot listen"),
                }
                // Its connections run on this thread: it stays until they are done.
                let _ = finished_watch.wait_for(|&finished| finished).await;
            });
        })
        .map_err(|e| format!("cannot start a worker thread: {e}"))
}

/// One worker's accept loop: each connection served on this thread, until `stop_watch` says
/// stop (then every connection is told to finish its requests and close).
async fn accept(
    listener: tokio::net::TcpListener,
    front: Fronts,
    limits: Limits,
    permits: Arc<Semaphore>,
    stop_watch: watch::Receiver<bool>,
) {
    let Fronts {
        gateway,
        admin,
        only_admin,
        tls,
    } = front;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Replaced by each connection's own `HeadTimer`.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A response its client does not read waits in this buffer (hyper's default is about
        // 400 KiB a connection); request heads past it get 431.
        .max_buf_size(MAX_BUF_SIZE);
    builder
        .http2()
        .max_concurrent_streams(limits.http2_max_streams)
        // What a stream's response may have waiting to be sent besides the chunk in hand
        // (hyper's default is 400 KiB a stream): a client that grants a large window and then
        // reads nothing would otherwise hold that much of the gateway's memory per stream,
        // 100 streams a connection. The kernel's socket buffer still holds what a fast link
        // needs in flight.
        .max_send_buf_size(HTTP2_SEND_BUF_SIZE);
    let builder = Arc::new(builder);
    let mut stop_signal = stop_watch.clone();
    let stop = async move {
        let _ = stop_signal.wait_for(|&stop| stop).await;
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // One address holding its share already: closed at once, before it takes a permit.
        let slot = match limits.per_address {
            Some(per_address) => match per_address.admit(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    closed("per_address_limit");
                    tracing::debug!(%peer, "connection refused: its address holds max_connections_per_address");
                    continue;
                }
            },
            None => None,
        };
        // Accepted first, then a permit waited for: a permit freed on another worker must not
        // sit with a worker whose own backlog is empty while this one's connection waits. So
        // at max_connections each worker holds at most one connection unserved; the rest wait
        // in the kernel's backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let connection_gateway = ConnectionGateway::new(gateway.clone());
        let admin = admin.clone();
        let requests = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let mut in_flight = InFlight::start(&requests);
            // Each HTTP/2 request holds one of `http2_max_requests_in_flight` (with many
            // streams a connection, the connections bound them only by their product); past
            // it, 503 at once. An HTTP/1.1 connection carries one request at a time:
            // `max_connections` bounds those. The place is held until the response is ready,
            // and when an upstream's response is relayed (its body may hold the upstream's
            // connection) until it is delivered.
            let over_budget = request.version() == http::Version::HTTP_2
                && match limits.http2_in_flight.try_acquire() {
                    Ok(permit) => {
                        in_flight.slot = Some(permit);
                        false
                    }
                    Err(_) => true,
                };
            // Name the client in Forwarded / X-Forwarded-For.
            request.extensions_mut().insert(ClientAddr(peer));
            // Behind a balancer: the client it names, for the throttles; a peer that is no
            // balancer has its claims of where the request came from dropped.
            if let Some(rule) = limits.client_address {
                match rule.peer_says(peer.ip(), request.headers()) {
                    PeerSays::Client(client) => {
                        request.extensions_mut().insert(client);
                    }
                    PeerSays::Nothing => {}
                    PeerSays::DropChains => drop_chains(request.headers_mut()),
                }
            }
            // RFC 9112 §3.2: no Host, more than one, or one that is no host and port: 400.
            let bad_host = crate::host::problem(
                request.version(),
                request.uri().authority(),
                request.headers(),
            );
            // A HEAD's answer has no body (RFC 9110 §9.3.2): hyper's HTTP/1.1 server drops
            // it, its HTTP/2 server would send it (a protocol error to the client).
            let bodiless = request.method() == http::Method::HEAD
                && request.version() == http::Version::HTTP_2;
            let to_admin = only_admin || request.uri().path().starts_with("/admin/");
            // A panic of a layer inside (a bug), as it is called or as its answer is polled,
            // is answered 500 here rather than ending the connection (with HTTP/2, every
            // other request on it, when it panics as it is called).
            let answer = if let Some(why) = bad_host {
                // (An HTTP/2 connection goes on: only the stream is answered.)
                if request.version() <= http::Version::HTTP_11 {
                    closed("malformed_request");
                }
                Err(Box::new(crate::host::refused(why, peer, request.version())))
            } else if over_budget {
                Err(Box::new(too_many_in_flight(peer)))
            } else {
                call_contained(|| {
                    match admin.as_ref().filter(|_| to_admin) {
                        // Boxed: the admin API's future is as large as the gateway's, and a
                        // request's future is moved whole (hyper stores it per request).
                        Some(router) => future::Either::Right(Box::pin(call_now(
                            router.clone(),
                            request.map(axum::body::Body::new),
                        ))),
                        None => future::Either::Left(connection_gateway.call(request)),
                    }
                })
            };
            async move {
                let mut response = match answer {
                    // Answered already: a panic as the request was called, or its Host.
                    Err(answered) => (*answered).map(Either::Right),
                    Ok(future::Either::Left(gateway)) => match Contained::new(gateway).await {
                        Ok(response) => response.map(Either::Left),
                        Err(panicked) => panicked.map(Either::Right),
                    },
                    Ok(future::Either::Right(admin)) => match Contained::new(admin).await {
                        Ok(response) | Err(response) => response.map(Either::Right),
                    },
                };
                // (Its headers, `Content-Length` included, are the GET's.)
                if bodiless {
                    *response.body_mut() = Either::Right(axum::body::Body::empty());
                }
                // A response made here, by a layer, from a cache or by an in-process tenant
                // holds nothing but its bytes: its place is free now. Otherwise a client that
                // grants no flow-control window (its streams' answers never sent) would hold
                // places with requests anyone may send without a token, a hundred a
                // connection, and every tenant's HTTP/2 requests would get 503 meanwhile.
                if in_flight.slot.is_some()
                    && response
                        .extensions()
                        .get::<tower_fhir::proxy::Relayed>()
                        .is_none()
                {
                    in_flight.slot = None;
                }
                // In flight until the client has taken the body (or hyper gives it up).
                Ok::<_, Infallible>(response.map(|body| Delivered::new(body, in_flight)))
            }
        });
        let mut stop_watch = stop_watch.clone();
        let (builder, tls) = (Arc::clone(&builder), tls.clone());
        tokio::spawn(async move {
            // Released when the connection is over, letting the next one be accepted.
            let _permit = permit;
            let _slot = slot;
            let _open = OpenConnection::count();
            let stream = match tls {
                None => Stream::Plain(stream),
                Some(tls) => {
                    // The handshake within the header-read timeout; the request head's own
                    // begins after it.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, tls.accept(stream));
                    tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                            Ok(Err(error)) => {
                                closed("tls_handshake_failed");
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                closed("tls_handshake_timeout");
                                tracing::debug!(%peer, "no TLS handshake within the header-read timeout");
                                return;
                            }
                        },
                        _ = stop_watch.wait_for(|&stop| stop) => return,
                    }
                }
            };
            // hyper's own answers to request heads it cannot parse go out with an
            // OperationOutcome and a request id.
            let io = TokioIo::new(
                ParseErrorOutcomes::new(CountingIo {
                    stream,
                    activity: Arc::clone(&activity),
                })
                .peer(peer),
            );
            let mut builder = auto::Builder::clone(&builder);
            builder.http1().timer(HeadTimer {
                activity: Arc::clone(&activity),
                head: limits.header_read_timeout,
                idle: limits.idle_timeout,
            });
            let connection = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            let mut connection = std::pin::pin!(connection);
            let mut watchdog = Watchdog::new(Arc::clone(&activity), limits);
            let mut closing = false;
            loop {
                tokio::select! {
                    // The connection first: after a wait for the CPU, what it can now write
                    // counts before the watchdog looks.
                    biased;
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            if is_header_read_timeout(&*error) {
                                closed(if activity.idle_out.load(Ordering::Relaxed) {
                                    "idle"
                                } else {
                                    "header_read_timeout"
                                });
                            } else if is_malformed(&*error) {
                                // hyper answered it (400, 431, 414; given a FHIR body by
                                // `ParseErrorOutcomes` when it was the connection's first
                                // head) before any layer saw a request: no audit record;
                                // said here.
                                closed("malformed_request");
                                tracing::info!(%peer, %error, "a request head the HTTP server could not parse was answered by it, and its connection closed");
                            }
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop_watch.wait_for(|&stop| stop), if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                        watchdog.closing();
                    }
                    close = watchdog.next() => match close {
                        Close::NoRequest | Close::Idle => {
                            closed(if close == Close::NoRequest { "no_request" } else { "idle" });
                            tracing::debug!(%peer, "closing a connection: no request head in time, or idle");
                            closing = true;
                            // Never cuts a request in flight: HTTP/1.1 finishes it (and then
                            // closes), HTTP/2 sends GOAWAY and finishes its streams. A client
                            // that stops taking what is still to send is dropped all the same.
                            connection.as_mut().graceful_shutdown();
                            watchdog.closing();
                        }
                        Close::Stalled => {
                            tracing::info!(%peer, "dropping a connection: its client has taken none of its response for the idle timeout (or less than 16 KiB of what waits)");
                            closed("stalled");
                            // A reset frees at once what the kernel holds for a client that
                            // takes nothing.
                            activity.drop_now();
                            break;
                        }
                        Close::Unfinished => {
                            tracing::info!(%peer, "dropping a connection: its graceful close has not ended after the idle timeout");
                            closed("unfinished");
                            // A plain close: the kernel still sends what it holds, then FIN.
                            break;
                        }
                    },
                }
            }
        });
    }
    drop(listener);
}

/// What one connection has done, for its watchdog: requests started and finished, socket
/// writes, and the progress of each response body still being sent. Relaxed atomics: the
/// watchdog only compares them between its wakes.
#[derive(Debug, Default)]
struct Activity {
    /// Requests handed to the service.
    started: AtomicU64,
    /// Requests whose response body has ended, or was given up (its future or body dropped).
    finished: AtomicU64,
    /// Socket writes that moved bytes (made by the connection's task alone).
    writes: AtomicU64,
    /// Socket reads that brought bytes (made by the connection's task alone).
    reads: AtomicU64,
    /// The [`HeadTimer`] ended a keep-alive connection's wait for its next request: closed
    /// as idle, not for a slow head.
    idle_out: AtomicBool,
    /// A socket write found no room, and none has moved bytes since: the client is not reading.
    write_blocked: AtomicBool,
    /// The connection is being dropped: its socket is reset rather than left to send what it
    /// still holds to a client that takes nothing.
    reset: AtomicBool,
    /// The response bodies that have yielded data, each until it and its chunks are gone
    /// (the entries only this list holds are pruned as new ones come).
    bodies: Mutex<Vec<Arc<Progress>>>,
    /// Response body bytes sent on the connection, all bodies together (shared with each
    /// body's [`Progress`]).
    sent: Arc<AtomicU64>,
}

impl Activity {
    /// Marks the connection as dropped by the watchdog: its socket closes with a reset.
    fn drop_now(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }

    /// A new response body's progress, watched from now on.
    fn watch_body(&self) -> Arc<Progress> {
        let progress = Arc::new(Progress {
            waiting_since: AtomicU64::new(NOT_WAITING),
            connection_sent: Arc::clone(&self.sent),
            ..Progress::default()
        });
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.retain(|body| Arc::strong_count(body) > 1);
        bodies.push(Arc::clone(&progress));
        progress
    }
}

/// [`Progress::waiting_since`] of a body with nothing waiting to be sent.
const NOT_WAITING: u64 = u64::MAX;

/// The most an HTTP/1.1 connection buffers of its responses (and of a request head).
const MAX_BUF_SIZE: usize = 64 * 1024;

/// The most an HTTP/2 stream buffers of its response beyond the chunk it is sending.
const HTTP2_SEND_BUF_SIZE: usize = 16 * 1024;

/// The least a response body with bytes waiting must send per idle timeout (unless it sends
/// all it has waiting): an HTTP/2 frame's worth. A client that grants a byte of flow-control
/// window now and then holds its streams, and their connection, no longer than one that grants
/// none.
const MIN_PROGRESS: u64 = 16 * 1024;

/// How one response body's sending goes.
#[derive(Debug, Default)]
struct Progress {
    /// Bytes of its chunks hyper has written to the socket (or HTTP/2 has framed).
    sent: AtomicU64,
    /// Its chunks taken from the service and not yet all sent.
    unsent: AtomicU64,
    /// The connection's [`Activity::sent`].
    connection_sent: Arc<AtomicU64>,
    /// The watchdog's own: `sent` as last seen, since when (milliseconds since the watchdog
    /// began) bytes have waited with `sent` unmoved ([`NOT_WAITING`] when none wait), and the
    /// connection's `sent` then.
    seen: AtomicU64,
    waiting_since: AtomicU64,
    connection_seen: AtomicU64,
}

/// One request in flight on a connection, until dropped.
struct InFlight {
    activity: Arc<Activity>,
    /// An HTTP/2 request's place among `http2_max_requests_in_flight`.
    slot: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::Relaxed);
        Self {
            activity: Arc::clone(activity),
            slot: None,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `503` an HTTP/2 request gets while `http2_max_requests_in_flight` are in flight: an
/// OperationOutcome (`throttled`), `Retry-After: 1`, a request id; counted in
/// `tower_fhir_rate_limited_total{limit="http2_in_flight"}`.
fn too_many_in_flight(peer: SocketAddr) -> http::Response<axum::body::Body> {
    metrics::counter!("tower_fhir_rate_limited_total", "limit" => "http2_in_flight").increment(1);
    let id = MakeUuid.new_id();
    tracing::info!(
        %peer,
        request_id = id.to_str().ok(),
        "an HTTP/2 request refused: http2_max_requests_in_flight are in flight"
    );
    let mut response = OperationOutcome::error(
        IssueType::Throttled,
        "The gateway has as many HTTP/2 requests in flight as it takes; try again later",
    )
    .to_response(http::StatusCode::SERVICE_UNAVAILABLE)
    .map(axum::body::Body::from);
    let headers = response.headers_mut();
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(X_REQUEST_ID, id);
    response
}

pin_project! {
    /// A response body, with its request counted in flight until the body has ended or is
    /// dropped, and each chunk of it counted as unsent until hyper has sent it all.
    struct Delivered<B> {
        #[pin]
        body: B,
        in_flight: Option<InFlight>,
        // Made when the body first yields data.
        progress: Option<Arc<Progress>>,
    }
}

impl<B> Delivered<B> {
    fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            in_flight: Some(in_flight),
            progress: None,
        }
    }
}

impl<B: Body> Body for Delivered<B> {
    type Data = Chunk<B::Data>;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match ready!(this.body.poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = frame.map_data(|data| {
                    let progress = match (data.has_remaining(), &this.in_flight) {
                        (true, Some(in_flight)) => Some(Arc::clone(
                            this.progress
                                .get_or_insert_with(|| in_flight.activity.watch_body()),
                        )),
                        _ => None,
                    };
                    Chunk::new(data, progress)
                });
                Poll::Ready(Some(Ok(frame)))
            }
            end => {
                *this.in_flight = None;
                // The end, or an error: no frame with data to count.
                Poll::Ready(
                    end.map(|result| result.map(|frame| frame.map_data(|d| Chunk::new(d, None)))),
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A chunk of a response body: counted as unsent until dropped (hyper drops a chunk once it
/// has written it all, HTTP/2 once it has framed it all), its bytes counted as sent as hyper
/// advances over them.
struct Chunk<D> {
    data: D,
    progress: Option<Arc<Progress>>,
}

impl<D> Chunk<D> {
    fn new(data: D, progress: Option<Arc<Progress>>) -> Self {
        if let Some(progress) = &progress {
            progress.unsent.fetch_add(1, Ordering::Relaxed);
        }
        Self { data, progress }
    }

    fn sent(&self, bytes: usize) {
        if let Some(progress) = &self.progress {
            progress.sent.fetch_add(bytes as u64, Ordering::Relaxed);
            progress
                .connection_sent
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

impl<D: Buf> Buf for Chunk<D> {
    fn remaining(&self) -> usize {
        self.data.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.data.chunk()
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        self.data.chunks_vectored(dst)
    }

    fn advance(&mut self, cnt: usize) {
        self.data.advance(cnt);
        self.sent(cnt);
    }

    fn copy_to_bytes(&mut self, len: usize) -> bytes::Bytes {
        let bytes = self.data.copy_to_bytes(len);
        self.sent(len);
        bytes
    }
}

impl<D> Drop for Chunk<D> {
    fn drop(&mut self) {
        if let Some(progress) = &self.progress {
            progress.unsent.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Counts a connection closed by the gateway in `tower_fhir_connections_closed_total`, by
/// `reason`: `tls_handshake_timeout`, `tls_handshake_failed`, `header_read_timeout` (hyper's
/// timer: no whole head in time), `no_request` (no request started within the header-read
/// timeout), `idle`, `stalled` (its client took too little of its response for the idle
/// timeout), `unfinished` (a graceful close not ended an idle timeout later with nothing in
/// flight), `malformed_request` (a request head hyper could not parse, answered by hyper
/// itself) or `per_address_limit` (closed as it came: its address held
/// `max_connections_per_address`). These are events: a connection closed
/// gracefully (`no_request`, `idle`) and then dropped (`stalled`, `unfinished`) counts twice.
fn closed(reason: &'static str) {
    metrics::counter!("tower_fhir_connections_closed_total", "reason" => reason).increment(1);
}

/// Whether a connection's error is hyper's header-read timeout.
fn is_header_read_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// Whether a connection's error is hyper refusing a request head it could not parse (which
/// it answers itself: `400`, or `431` for one too large).
fn is_malformed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(|error| error.is_parse() || error.is_parse_too_large())
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// One open connection, counted in the `tower_fhir_connections_open` gauge while it lives.
struct OpenConnection;

impl OpenConnection {
    fn count() -> Self {
        metrics::gauge!("tower_fhir_connections_open").increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("tower_fhir_connections_open").decrement(1.0);
    }
}

/// Why the watchdog says to close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// No request started within the header-read timeout: close gracefully.
    NoRequest,
    /// Nothing in flight for the idle timeout: close gracefully.
    Idle,
    /// The client has taken none of a response for the idle timeout: drop the connection.
    Stalled,
    /// Closing gracefully, it has had nothing in flight and nothing to send for another idle
    /// timeout and is still open (an HTTP/2 client that never answers the closing PING):
    /// drop it.
    Unfinished,
}

/// When a counter last changed, as seen by the watchdog's wakes.
struct Since {
    seen: u64,
    at: Instant,
}

impl Since {
    fn new(seen: u64, at: Instant) -> Self {
        Self { seen, at }
    }

    /// How long `current` has stayed the same, as of `now`.
    fn quiet(&mut self, current: u64, now: Instant) -> Duration {
        if current != self.seen {
            self.seen = current;
            self.at = now;
        }
        now.duration_since(self.at)
    }
}

/// One connection's watchdog. [`next`](Self::next) completes when the connection should be
/// closed:
///
/// - [`Close::NoRequest`]: it has started no request within the header-read timeout;
/// - [`Close::Idle`]: it has had no request in flight and nothing to send for the idle
///   timeout (whatever else it sent: HTTP/2 PINGs, say);
/// - [`Close::Stalled`]: its client has taken too little of a response for the idle timeout
///   while the response waited for it: a response body had bytes waiting to be sent (in
///   hyper's or HTTP/2's hands: no room in the socket, or no flow-control window for its
///   stream) and fewer than [`MIN_PROGRESS`] bytes (and not all) were, unless the other
///   streams took at least that much each and not yet a fair turn (an excuse that holds for
///   one more idle timeout at most); or a socket write found no room and none has moved bytes
///   since;
/// - [`Close::Unfinished`], once [`closing`](Self::closing): a graceful close that has not
///   ended after another idle timeout with nothing in flight and nothing to send.
///
/// A request waiting on its upstream, however long, is none of these. Wakes every quarter of
/// the idle timeout (at least every 50 ms), so such a connection is closed between one and
/// about one and a half idle timeouts after it went quiet.
struct Watchdog {
    activity: Arc<Activity>,
    limits: Limits,
    began: Instant,
    head_deadline: Option<Instant>,
    closing: bool,
    requests: Since,
    writes: Since,
}

impl Watchdog {
    fn new(activity: Arc<Activity>, limits: Limits) -> Self {
        let began = Instant::now();
        Self {
            activity,
            limits,
            began,
            head_deadline: Some(began + limits.header_read_timeout),
            closing: false,
            requests: Since::new(0, began),
            writes: Since::new(0, began),
        }
    }

    /// The connection is closing gracefully: from now on, only stalls and a close that does
    /// not end count.
    fn closing(&mut self) {
        self.closing = true;
        self.head_deadline = None;
        self.requests = Since::new(self.requests.seen, Instant::now());
    }

    async fn next(&mut self) -> Close {
        let tick = (self.limits.idle_timeout / 4).max(Duration::from_millis(50));
        loop {
            let mut wake = Instant::now() + tick;
            if let Some(deadline) = self.head_deadline {
                wake = wake.min(deadline);
            }
            tokio::time::sleep_until(wake).await;
            if let Some(close) = self.check(Instant::now()) {
                return close;
            }
        }
    }

    fn check(&mut self, now: Instant) -> Option<Close> {
        let activity = &*self.activity;
        let idle = self.limits.idle_timeout;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        // `finished` first, so that `started >= finished`.
        let finished = load(&activity.finished);
        let started = load(&activity.started);
        if let Some(deadline) = self.head_deadline {
            if now >= deadline {
                if started == 0 {
                    return Some(Close::NoRequest);
                }
                self.head_deadline = None;
            }
        }
        // A socket write that finds no room: stalled once it has found none for the idle
        // timeout (the clock starts when it is first found blocked).
        let writes = if activity.write_blocked.load(Ordering::Relaxed) {
            load(&activity.writes)
        } else {
            // Not blocked: a value it never has, so the clock restarts when it blocks.
            u64::MAX
        };
        if self.writes.quiet(writes, now) >= idle && writes != u64::MAX {
            return Some(Close::Stalled);
        }
        // Each response body with bytes waiting: stalled once, for the idle timeout (the clock
        // starts when it first has some waiting), it has neither sent them all nor moved
        // `MIN_PROGRESS` bytes (a client that lets a byte through now and then is not taking
        // it), unless the connection, moving meanwhile, may not have come round to it: HTTP/2
        // sends its streams a frame (16 KiB at most) each in turn, so a stream is excused only
        // while the others took at least `MIN_PROGRESS` each but not yet two frames each.
        let at = u64::try_from(now.duration_since(self.began).as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let connection_sent = load(&activity.sent);
        let bodies = activity
            .bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let waiting = bodies.iter().filter(|b| load(&b.unsent) > 0).count() as u64;
        let round = waiting.saturating_mul(2 * 16 * 1024);
        // (The others: the stream judged is one of those waiting. Alone, the others must have
        // taken something.)
        let busy = waiting
            .saturating_sub(1)
            .saturating_mul(MIN_PROGRESS)
            .max(1);
        for body in bodies.iter() {
            if load(&body.unsent) == 0 {
                body.waiting_since.store(NOT_WAITING, Ordering::Relaxed);
                continue;
            }
            let sent = load(&body.sent);
            let since = load(&body.waiting_since);
            let moved = sent.wrapping_sub(load(&body.seen));
            if since == NOT_WAITING || moved >= MIN_PROGRESS {
                body.seen.store(sent, Ordering::Relaxed);
                body.waiting_since.store(at, Ordering::Relaxed);
                body.connection_seen
                    .store(connection_sent, Ordering::Relaxed);
                continue;
            }
            let others = connection_sent
                .wrapping_sub(load(&body.connection_seen))
                .saturating_sub(moved);
            // The excuse lasts one more idle timeout at most: the others' bytes, counted from
            // when this one began to wait, stay in the window once they stop moving (a small
            // answer on another stream, then nothing), and a client that grants this stream
            // no window would be excused for ever.
            let waited = at.saturating_sub(since);
            if waited >= idle_ms
                && (others < busy || others >= round || waited >= idle_ms.saturating_mul(2))
            {
                return Some(Close::Stalled);
            }
        }
        drop(bodies);
        // Quiet: nothing in flight, nothing to send, no write blocked, and so since the idle
        // timeout (the clock restarts at every check that finds the connection busy).
        let requests = started.wrapping_add(finished);
        if started != finished || waiting > 0 || writes != u64::MAX {
            self.requests = Since::new(requests, now);
            return None;
        }
        if self.requests.quiet(requests, now) < idle {
            return None;
        }
        Some(if self.closing {
            Close::Unfinished
        } else {
            Close::Idle
        })
    }
}

/// The connection's socket, noting the writes that move bytes and those that find no room.
struct CountingIo {
    stream: Stream,
    activity: Arc<Activity>,
}

/// Removes what a request says of where it came from (`Forwarded`, `X-Forwarded-For`,
/// `X-Real-IP`, `X-Forwarded-Port`/`-Prefix`/`-Server`): from a peer that is not one of
/// `client_address_trusted_peers`, `trust_forwarded_headers` must not pass them on. (The
/// proxy then starts the chains, naming the peer.)
fn drop_chains(headers: &mut http::HeaderMap) {
    for name in tower_fhir::proxy::FORWARDING_CHAIN_HEADERS {
        headers.remove(name);
    }
}

/// What a worker serves: the gateway, the admin API beside it (under `/admin/`, or every path
/// when `only_admin`: the `admin_listen` worker), and the listener's TLS (`None`: plain TCP).
struct Fronts {
    gateway: Front,
    admin: Option<AdminFront>,
    only_admin: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A connection's bytes: plain TCP, or TLS over it (boxed: a TLS session is large, and most
/// gateways run behind a balancer that ends TLS).
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

impl CountingIo {
    fn wrote(&self, poll: &Poll<io::Result<usize>>) {
        let activity = &self.activity;
        match poll {
            Poll::Ready(Ok(n)) if *n > 0 => {
                // Only this connection's task writes: no read-modify-write needed.
                let writes = activity.writes.load(Ordering::Relaxed);
                activity.writes.store(writes + 1, Ordering::Relaxed);
                if activity.write_blocked.load(Ordering::Relaxed) {
                    activity.write_blocked.store(false, Ordering::Relaxed);
                }
            }
            Poll::Pending => activity.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(_) => {}
        }
    }
}

impl Drop for CountingIo {
    fn drop(&mut self) {
        if self.activity.reset.load(Ordering::Relaxed) {
            // A reset frees at once what the kernel still holds for a client that takes
            // nothing, instead of trying to send it for minutes after the close.
            let _ = self.stream.tcp().set_zero_linger();
        }
    }
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Only this connection's task reads: no read-modify-write needed.
            let reads = &self.activity.reads;
            reads.store(reads.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        poll
    }
}

/// hyper's HTTP/1.1 header-read timer for one connection, so that a keep-alive connection
/// waiting for its next request is timed as idle, not as a slow head.
///
/// hyper arms its timer when it starts reading a head: the connection's first, or the next
/// one once an exchange has ended. For the first head the deadline is hyper's own (the
/// header-read timeout from the connection's start). For a later one the connection is idle
/// until a byte of that head is read: the deadline is the idle timeout from then, and when the
/// first byte comes (hyper polls its timer whenever a read leaves the head unfinished), the
/// header-read timeout from that byte. Bytes of the next head read before the exchange ended
/// (pipelined behind a request) do not count as its first byte, so such a head has the idle
/// timeout: never longer than any client may hold the connection by sending nothing.
#[derive(Clone)]
struct HeadTimer {
    activity: Arc<Activity>,
    head: Duration,
    idle: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = Instant::from_std(deadline);
        if self.activity.started.load(Ordering::Relaxed) == 0 {
            return Box::pin(HeadSleep {
                sleep: tokio::time::sleep_until(deadline),
                later: None,
            });
        }
        // hyper's deadline is the header-read timeout from now: the wait begins now.
        let armed = deadline.checked_sub(self.head).unwrap_or(deadline);
        Box::pin(HeadSleep {
            sleep: tokio::time::sleep_until(armed + self.idle),
            later: Some(LaterHead {
                activity: Arc::clone(&self.activity),
                reads: self.activity.reads.load(Ordering::Relaxed),
                head: self.head,
                begun: false,
            }),
        })
    }
}

/// A later head's wait: idle until a byte of it is read, then the header-read timeout.
struct LaterHead {
    activity: Arc<Activity>,
    /// The connection's reads when the wait began.
    reads: u64,
    head: Duration,
    /// A byte of the head has been read: the deadline is the header-read timeout from then.
    begun: bool,
}

pin_project! {
    /// What [`HeadTimer`] gives hyper: a deadline, moved once for a later head.
    struct HeadSleep {
        #[pin]
        sleep: tokio::time::Sleep,
        // `None` for the connection's first head.
        later: Option<LaterHead>,
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl std::future::Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Some(later) = this.later.as_mut() {
            if !later.begun && later.activity.reads.load(Ordering::Relaxed) != later.reads {
                later.begun = true;
                this.sleep.as_mut().reset(Instant::now() + later.head);
            }
        }
        ready!(this.sleep.poll(cx));
        if let Some(later) = this.later.as_ref().filter(|later| !later.begun) {
            later.activity.idle_out.store(true, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What the gateway answers a request with.
type FrontFuture = <Front as Service<Request<Incoming>>>::Future;

/// The gateway readied and called for one request, when the connection's own was not ready.
type FrontOneshot = tower::util::Oneshot<Front, Request<Incoming>>;

/// `service` called at once when it is ready at once (every layer here is), else readied
/// first.
fn call_now<S, R>(mut service: S, request: R) -> future::Either<S::Future, Oneshot<S, R>>
where
    S: Service<R>,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => future::Either::Left(service.call(request)),
        // An error or a wait: the oneshot meets it again.
        _ => future::Either::Right(service.oneshot(request)),
    }
}

/// The request id of a request's future (none when it cannot tell), for an answer made in its
/// place.
trait RequestIdOf {
    fn request_id_of(&self) -> Option<HeaderValue>;
}

impl<F> RequestIdOf for RequestIdFuture<F> {
    fn request_id_of(&self) -> Option<HeaderValue> {
        self.request_id().cloned()
    }
}

impl<A: RequestIdOf, B> RequestIdOf for future::Either<A, B> {
    fn request_id_of(&self) -> Option<HeaderValue> {
        match self {
            future::Either::Left(known) => known.request_id_of(),
            future::Either::Right(_) => None,
        }
    }
}

impl<F: RequestIdOf + ?Sized> RequestIdOf for Pin<Box<F>> {
    fn request_id_of(&self) -> Option<HeaderValue> {
        self.as_ref().get_ref().request_id_of()
    }
}

pin_project! {
    /// A request's answer, or, when polling it panicked (a bug of a layer inside), `500`
    /// with an OperationOutcome and the request's id. The panic's message is logged at
    /// `error` with the id (the panic hook has written where it happened to standard error),
    /// the `ObserveLayer` records the request `500`/`panicked` as the future is dropped, and
    /// the connection carries on. (A panic while the response's body is sent still ends an
    /// HTTP/1.1 connection, the response's head being gone; over HTTP/2, its stream.)
    struct Contained<F> {
        #[pin]
        future: F,
    }
}

impl<F> Contained<F> {
    fn new(future: F) -> Self {
        Self { future }
    }
}

impl<F, B> Future for Contained<F>
where
    F: Future<Output = Result<http::Response<B>, Infallible>> + RequestIdOf,
{
    type Output = Result<http::Response<B>, http::Response<axum::body::Body>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut future = self.project().future;
        let poll = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        match poll {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(response))) => Poll::Ready(Ok(response)),
            Ok(Poll::Ready(Err(never))) => match never {},
            Err(payload) => Poll::Ready(Err(answer_panic(&*payload, future.request_id_of()))),
        }
    }
}

/// What `call` returns, or when it panics (a layer's bug as a request is called: the request
/// is gone with it, and its id), `500` with a new id ([`answer_panic`]).
fn call_contained<F>(call: impl FnOnce() -> F) -> Result<F, Box<http::Response<axum::body::Body>>> {
    std::panic::catch_unwind(AssertUnwindSafe(call))
        .map_err(|payload| Box::new(answer_panic(&*payload, None)))
}

/// Logs a panic of a request's handling at `error` under the request's id (`id`, or one made
/// when it is not known: the panic came before the request had one, or where it cannot be
/// read), and answers it `500`.
fn answer_panic(
    payload: &(dyn std::any::Any + Send),
    id: Option<HeaderValue>,
) -> http::Response<axum::body::Body> {
    let id = id.unwrap_or_else(|| MakeUuid.new_id());
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(
        request_id = id.to_str().ok(),
        panic = message,
        "a request's handling panicked: answered 500"
    );
    panicked_answer(id)
}

/// The `500` a request whose handling panicked gets.
fn panicked_answer(id: HeaderValue) -> http::Response<axum::body::Body> {
    let outcome = OperationOutcome::new(
        Severity::Fatal,
        IssueType::Exception,
        "The gateway failed while handling this request; it is logged under the request's id",
    )
    .to_response(http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = outcome.map(axum::body::Body::from);
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}

/// One connection's gateway: its requests are sent to one readied [`Front`] rather than to a
/// clone of it each (hyper calls services through `&self`, Tower through `&mut self`).
struct ConnectionGateway {
    gateway: Mutex<Front>,
}

impl ConnectionGateway {
    fn new(gateway: Front) -> Self {
        Self {
            gateway: Mutex::new(gateway),
        }
    }

    fn call(
        &self,
        request: Request<Incoming>,
    ) -> future::Either<FrontFuture, Pin<Box<FrontOneshot>>> {
        let mut gateway = self.gateway.lock().unwrap_or_else(PoisonError::into_inner);
        // The gateway applies no backpressure (every layer is ready at once); should it ever
        // not be ready, this request waits on a clone of its own.
        let mut cx = Context::from_waker(Waker::noop());
        match Service::<Request<Incoming>>::poll_ready(&mut *gateway, &mut cx) {
            Poll::Ready(Ok(())) => future::Either::Left(gateway.call(request)),
            Poll::Ready(Err(never)) => match never {},
            // Boxed: never taken today, it would double every request's future (a whole
            // gateway and request inside).
            Poll::Pending => future::Either::Right(Box::pin(gateway.clone().oneshot(request))),
        }
    }
}

/// SIGHUP from now on, which then no longer ends the process: see [`reopen_on_hangup`].
#[cfg(unix)]
pub(crate) fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(error) => {
            tracing::error!(%error, "cannot handle SIGHUP: it ends the gateway, and reopens no audit log");
            None
        }
    }
}

/// Each SIGHUP reopens the audit log file at its path, for log rotation: rename the file, then
/// send SIGHUP; once `audit log reopened` is logged (by the audit log's writer, as it switches),
/// the renamed file is written no more. Without an audit log file (none, or standard output)
/// there is none to reopen. With TLS on, it also reads the certificate and key again (kept as
/// they were, with an `error` logged, when they cannot be used).
#[cfg(unix)]
pub(crate) async fn reopen_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reopener: Option<tower_fhir::ops::AuditReopener>,
    tls: Option<crate::tls::FrontTls>,
) {
    while hangups.recv().await.is_some() {
        if let Some(tls) = tls.clone() {
            match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(())) => tracing::info!("SIGHUP: TLS certificate read again"),
                Ok(Err(error)) => tracing::error!(
                    %error,
                    "SIGHUP: the TLS certificate cannot be used: still serving the one before"
                ),
                Err(error) => tracing::error!(%error, "SIGHUP: reading the TLS certificate failed"),
            }
        }
        let Some(reopener) = reopener.clone() else {
            if tls.is_none() {
                tracing::info!("SIGHUP: no audit log file to reopen");
            }
            continue;
        };
        let path = reopener.path().display().to_string();
        // (It waits for the audit writer to switch files: not on the runtime's thread.)
        match tokio::task::spawn_blocking(move || reopener.reopen()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::TimedOut => tracing::warn!(
                path,
                %error,
                "SIGHUP: the audit log is reopened, but its writer has not switched yet"
            ),
            Ok(Err(error)) => {
                tracing::error!(path, %error, "SIGHUP: the audit log was not reopened");
            }
            Err(error) => tracing::error!(path, %error, "SIGHUP: reopening the audit log failed"),
        }
    }
}

/// Ctrl-C or SIGTERM: the first stops the gateway gracefully (in-flight requests get the
/// grace period), a second during the grace stops it at once. The handlers are installed
/// when this is called: call it before saying the gateway listens, so a SIGTERM sent as soon
/// as it does is a graceful stop, not the default kill.
pub(crate) fn shutdown() -> Signals {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }
    #[cfg(not(unix))]
    Signals {}
}

/// The stop signals (see [`shutdown`]).
pub(crate) struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Resolves at the next Ctrl-C or SIGTERM.
    pub(crate) async fn received(&mut self) {
        #[cfg(unix)]
        {
            async fn wait(stream: &mut Option<tokio::signal::unix::Signal>) {
                match stream {
                    Some(stream) => {
                        stream.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! { () = wait(&mut self.interrupt) => {}, () = wait(&mut self.term) => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Layer;

    /// A service that panics while its answer is polled.
    fn panicking() -> impl Service<
        Request<()>,
        Response = http::Response<()>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<()>, Infallible>>,
    > + Clone {
        tower::service_fn(|_request: Request<()>| async {
            tokio::task::yield_now().await;
            panic!("a bug in a layer");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(http::Response::new(()))
        })
    }

    #[tokio::test]
    async fn a_panic_while_answering_is_a_500_with_the_requests_id() {
        let (records, sink) = {
            let records = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&records);
            (records, move |record: tower_fhir::ops::AuditRecord| {
                sink.lock().unwrap().push(record);
            })
        };
        let service = tower_fhir::ops::RequestIdLayer::new().layer(
            tower_fhir::ops::ObserveLayer::new()
                .audit(sink)
                .layer(panicking()),
        );
        let request = Request::get("/Patient/1")
            .header("x-request-id", "abc-123")
            .body(())
            .unwrap();
        let answer = Contained::new(call_now(service, request))
            .await
            .expect_err("the panic is answered in the response's place");
        assert_eq!(answer.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.headers()["x-request-id"], "abc-123");
        assert_eq!(answer.headers()["content-type"], "application/fhir+json");
        let body = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap()
            .to_bytes();
        let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["code"], "exception");
        // Recorded as the gateway's failure, under the same id.
        let record = records.lock().unwrap().pop().expect("a record");
        assert_eq!((record.status, record.outcome), (500, "panicked"));
        assert_eq!(record.request_id.as_deref(), Some("abc-123"));
    }

    #[test]
    fn a_panic_as_a_request_is_called_is_a_500_too() {
        let answer = call_contained(|| -> () { panic!("a bug in a layer's call") })
            .expect_err("answered 500");
        assert_eq!(answer.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.headers()["x-request-id"].len(), 36);
        assert!(call_contained(|| 7).is_ok_and(|seven| seven == 7));
    }

    #[test]
    fn a_panic_as_a_request_is_called_is_recorded_under_the_requests_id() {
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&records);
        let mut service = tower_fhir::ops::RequestIdLayer::new().layer(
            tower_fhir::ops::ObserveLayer::new()
                .audit(move |record: tower_fhir::ops::AuditRecord| {
                    sink.lock().unwrap().push(record);
                })
                .layer(tower::service_fn(
                    |_: Request<()>| -> std::future::Ready<Result<http::Response<()>, Infallible>> {
                        panic!("a bug in a layer's call")
                    },
                )),
        );
        let request = Request::get("/Patient/1")
            .header("x-request-id", "abc-123")
            .body(())
            .unwrap();
        let answer = call_contained(|| service.call(request)).expect_err("answered 500");
        assert_eq!(answer.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        let record = records.lock().unwrap().pop().expect("a record");
        assert_eq!((record.status, record.outcome), (500, "panicked"));
        assert_eq!(record.request_id.as_deref(), Some("abc-123"));
    }

    #[tokio::test]
    async fn a_panic_with_no_id_to_hand_is_answered_with_a_new_one() {
        // As the gateway's future is when it had to be readied first (a oneshot: no id).
        type Known = RequestIdFuture<std::future::Ready<Result<http::Response<()>, Infallible>>>;
        let oneshot = panicking().oneshot(Request::new(()));
        let answer = Contained::new(future::Either::<Known, _>::Right(Box::pin(oneshot)))
            .await
            .expect_err("answered 500");
        assert_eq!(answer.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.headers()["x-request-id"].len(), 36);
    }

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(1),
            max_connections: 10,
            http2_max_streams: 100,
            http2_in_flight: Box::leak(Box::new(Semaphore::new(10_000))),
            shutdown_grace: Duration::from_secs(1),
            client_address: None,
            per_address: None,
        }
    }

    /// `bytes` of `body` sent on its connection.
    fn send(activity: &Activity, body: &Progress, bytes: u64) {
        body.sent.fetch_add(bytes, Ordering::Relaxed);
        activity.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Two streams with bytes waiting on one connection, after `a` and `b` bytes of them are
    /// sent in a little more than the idle timeout: what the watchdog says.
    fn two_streams(a: u64, b: u64) -> Option<Close> {
        let activity = Arc::new(Activity::default());
        activity.started.store(2, Ordering::Relaxed);
        let (first, second) = (activity.watch_body(), activity.watch_body());
        first.unsent.store(1, Ordering::Relaxed);
        second.unsent.store(1, Ordering::Relaxed);
        let mut watchdog = Watchdog::new(Arc::clone(&activity), limits());
        let began = watchdog.began;
        assert_eq!(watchdog.check(began), None);
        send(&activity, &first, a);
        send(&activity, &second, b);
        watchdog.check(began + Duration::from_millis(1100))
    }

    #[test]
    fn a_response_must_move_its_floor_unless_passed_over_for_the_others() {
        // Both take their 16 KiB: busy, not stalled.
        assert_eq!(two_streams(16 * 1024, 16 * 1024), None);
        // A few bytes each: no better than none.
        assert_eq!(two_streams(100, 100), Some(Close::Stalled));
        assert_eq!(two_streams(0, 0), Some(Close::Stalled));
        // One passed over while the other takes at least 16 KiB, not yet a fair turn (two
        // 16 KiB frames for each stream waiting): excused.
        assert_eq!(two_streams(20 * 1024, 0), None);
        // Passed over for a whole turn and more: stalled.
        assert_eq!(two_streams(64 * 1024, 0), Some(Close::Stalled));
        // Passed over while the other trickles: stalled.
        assert_eq!(two_streams(1000, 0), Some(Close::Stalled));
    }

    #[test]
    fn an_excuse_ends_an_idle_timeout_later() {
        // One response its client grants no window, and a small answer on another stream
        // once: the others' bytes stay in the excusing window for good once they stop, so the
        // excuse must end.
        let activity = Arc::new(Activity::default());
        activity.started.store(2, Ordering::Relaxed);
        activity.finished.store(1, Ordering::Relaxed);
        let stalled = activity.watch_body();
        stalled.unsent.store(1, Ordering::Relaxed);
        let mut watchdog = Watchdog::new(Arc::clone(&activity), limits());
        let began = watchdog.began;
        assert_eq!(watchdog.check(began), None);
        activity.sent.fetch_add(300, Ordering::Relaxed);
        for millis in [500, 1100, 1600] {
            assert_eq!(
                watchdog.check(began + Duration::from_millis(millis)),
                None,
                "{millis} ms"
            );
        }
        assert_eq!(
            watchdog.check(began + Duration::from_millis(2100)),
            Some(Close::Stalled)
        );
    }
}
