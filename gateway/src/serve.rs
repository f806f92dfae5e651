//! Serving: HTTP/1.1 and HTTP/2 connections, the admin API beside the gateway, graceful
//! shutdown on SIGTERM or Ctrl-C.

use std::convert::Infallible;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use futures::future;
use http::Request;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tower::{Service, ServiceExt};
use tower_fhir::proxy::ClientAddr;

use crate::front::Front;

/// Serves HTTP/1.1 and HTTP/2 until Ctrl-C or SIGTERM, then lets in-flight requests finish.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Front,
    admin: Option<Router>,
) {
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown());
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
        let _ = stream.set_nodelay(true);
        let connection_gateway = ConnectionGateway::new(gateway.clone());
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            // Name the client in Forwarded / X-Forwarded-For.
            request.extensions_mut().insert(ClientAddr(peer));
            let to_admin = request.uri().path().starts_with("/admin/");
            let answer = match admin.as_ref().filter(|_| to_admin) {
                Some(router) => future::Either::Right(
                    router.clone().oneshot(request.map(axum::body::Body::new)),
                ),
                None => future::Either::Left(connection_gateway.call(request)),
            };
            async move {
                Ok::<_, Infallible>(match answer {
                    future::Either::Left(gateway) => gateway.await?.map(Either::Left),
                    future::Either::Right(admin) => admin.await?.map(Either::Right),
                })
            }
        });
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
    ) -> future::Either<
        <Front as Service<Request<Incoming>>>::Future,
        tower::util::Oneshot<Front, Request<Incoming>>,
    > {
        let mut gateway = self.gateway.lock().unwrap_or_else(PoisonError::into_inner);
        // The gateway applies no backpressure (every layer is ready at once); should it ever
        // not be ready, this request waits on a clone of its own.
        let mut cx = Context::from_waker(Waker::noop());
        match Service::<Request<Incoming>>::poll_ready(&mut *gateway, &mut cx) {
            Poll::Ready(Ok(())) => future::Either::Left(gateway.call(request)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => future::Either::Right(gateway.clone().oneshot(request)),
        }
    }
}

/// Ctrl-C or SIGTERM; in-flight requests finish.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing in-flight requests");
}
