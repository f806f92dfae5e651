//! How long the proxy waits for an upstream's answer when the request has a body: the
//! upstream's timeout runs from when the request was sent whole, not from its first byte, so a
//! slow upload is not blamed on the upstream; and a body that stops arriving for that long is
//! the client's fault (`408`), not the upstream's (`504`).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::ops::BodyFailure;

/// Whose turn it is, and since when: the client's (the body was polled and had nothing) or the
/// upstream's (a frame was handed over and not yet taken, or the body ended).
#[derive(Debug)]
pub(super) struct Turns {
    began: Instant,
    /// Microseconds since `began` shifted left by one; the low bit set while it is the
    /// client's turn.
    turn: AtomicU64,
    /// How the body itself failed, if it did: [`BodyFailure`] as a number, 0 for none. Over
    /// HTTP/2 the upstream connection reports only a reset stream, not the body's error.
    failure: AtomicU8,
}

impl Turns {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            began: Instant::now(),
            turn: AtomicU64::new(0),
            failure: AtomicU8::new(0),
        })
    }

    /// How the body failed, if it did.
    pub(super) fn failure(&self) -> Option<BodyFailure> {
        match self.failure.load(Ordering::Relaxed) {
            1 => Some(BodyFailure::TooLarge),
            2 => Some(BodyFailure::TooSlow),
            3 => Some(BodyFailure::Broken),
            _ => None,
        }
    }

    fn set(&self, clients: bool) {
        let micros = u64::try_from(self.began.elapsed().as_micros()).unwrap_or(u64::MAX >> 1);
        self.turn
            .store((micros << 1) | u64::from(clients), Ordering::Relaxed);
    }

    fn clients_turn(&self) -> bool {
        self.turn.load(Ordering::Relaxed) & 1 == 1
    }

    /// Whether the body has waited on the client, having nothing to hand over, for at least
    /// `at_least` (it has not ended, nor failed): when the upstream gives up on the request
    /// then, it gave up waiting for the client.
    pub(super) fn waiting_on_client(&self, at_least: Duration) -> bool {
        let (clients, since) = self.current();
        clients && since.elapsed() >= at_least
    }

    /// Whose turn it is, and when it began.
    fn current(&self) -> (bool, Instant) {
        let turn = self.turn.load(Ordering::Relaxed);
        (turn & 1 == 1, self.began + Duration::from_micros(turn >> 1))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A request body that tells its [`Turns`] whenever it hands a frame over or has none,
    /// and how it failed; the client's trailers it does not pass on.
    pub(super) struct Watched<B> {
        #[pin]
        body: B,
        turns: Arc<Turns>,
    }
}

impl<B> Watched<B> {
    pub(super) fn new(body: B, turns: Arc<Turns>) -> Self {
        Self { body, turns }
    }
}

impl<D: bytes::Buf> Watched<UnsyncBoxBody<D, BoxError>> {
    /// `body`, its errors boxed, watched by `turns`.
    pub(super) fn boxed<B>(body: B, turns: Arc<Turns>) -> Self
    where
        B: Body<Data = D> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Self::new(body.map_err(Into::into).boxed_unsync(), turns)
    }
}

impl<B: Body<Error = BoxError>> Body for Watched<B> {
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.is_trailers() {
                // The client's trailers would reach an HTTP/2 upstream around the header
                // policy (hyper drops them toward HTTP/1.1): they are not forwarded. They end
                // the body.
                polled = Poll::Ready(None);
            }
        }
        if polled.is_pending() {
            if !this.turns.clients_turn() {
                this.turns.set(true);
            }
        } else {
            // A frame (or the end) handed over: the upstream's turn, from now.
            this.turns.set(false);
            if let Poll::Ready(Some(Err(error))) = &polled {
                // Whatever else failed in the client's body is the client's doing too.
                let failure = BodyFailure::of(&**error).unwrap_or(BodyFailure::Broken);
                this.turns.failure.store(failure as u8, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What waiting for the upstream's answer came to.
#[derive(Debug)]
pub(super) enum Waited<T> {
    Answered(T),
    /// The upstream had the request (or the body's last frame) for `timeout` without
    /// answering (or taking more).
    UpstreamTooSlow,
    /// The request body sent nothing for `timeout` while the upstream waited for it.
    BodyTooSlow,
}

/// Waits for `answer`: at most `timeout` of the upstream's turn at a time. The wait ends when
/// either side has kept the other waiting for `timeout`.
pub(super) async fn wait<F: Future>(
    answer: F,
    timeout: Duration,
    turns: &Turns,
) -> Waited<F::Output> {
    let mut answer = pin!(answer);
    let mut alarm = pin!(tokio::time::sleep(timeout));
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(answered) = answer.as_mut().poll(cx) {
            return Poll::Ready(Waited::Answered(answered));
        }
        ready!(alarm.as_mut().poll(cx));
        let (clients, since) = turns.current();
        // (An alarm that far off would have saturated to tokio's far future already.)
        let Some(deadline) = since.checked_add(timeout) else {
            return Poll::Pending;
        };
        if deadline <= Instant::now() {
            return Poll::Ready(if clients {
                metrics::counter!("tower_fhir_body_timeouts_total").increment(1);
                Waited::BodyTooSlow
            } else {
                Waited::UpstreamTooSlow
            });
        }
        alarm.as_mut().reset(deadline);
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::channel::Channel;
    use http_body_util::BodyExt;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// An "upstream" that reads the body as it comes and answers `after` its end.
    async fn upstream<B: Body + Unpin>(mut body: B, after: Duration) -> usize {
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            read += usize::from(frame.is_ok());
        }
        tokio::time::sleep(after).await;
        read
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_upload_is_not_the_upstreams_time() {
        let (mut sender, body) = Channel::<Bytes>::new(1);
        let turns = Turns::new();
        let body = Watched::boxed(body, Arc::clone(&turns));
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                sender.send_data(Bytes::from("x")).await.unwrap();
            }
        });
        let began = Instant::now();
        let waited = wait(upstream(body, Duration::from_secs(9)), TIMEOUT, &turns).await;
        assert!(matches!(waited, Waited::Answered(5)), "{waited:?}");
        assert_eq!(began.elapsed(), Duration::from_secs(49));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_slow_after_the_body_is_too_slow_one_timeout_after_its_end() {
        let (mut sender, body) = Channel::<Bytes>::new(1);
        let turns = Turns::new();
        let body = Watched::boxed(body, Arc::clone(&turns));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            sender.send_data(Bytes::from("x")).await.unwrap();
        });
        let began = Instant::now();
        let waited = wait(upstream(body, Duration::from_secs(60)), TIMEOUT, &turns).await;
        assert!(matches!(waited, Waited::UpstreamTooSlow), "{waited:?}");
        assert_eq!(began.elapsed(), Duration::from_secs(18));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_is_the_clients_fault() {
        let (mut sender, body) = Channel::<Bytes>::new(1);
        let turns = Turns::new();
        let body = Watched::boxed(body, Arc::clone(&turns));
        sender.send_data(Bytes::from("x")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let began = Instant::now();
        let waited = wait(upstream(body, Duration::ZERO), TIMEOUT, &turns).await;
        assert!(matches!(waited, Waited::BodyTooSlow), "{waited:?}");
        assert_eq!(began.elapsed(), TIMEOUT);
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bodys_own_failure_is_kept_whatever_the_connection_reports() {
        let turns = Turns::new();
        let (_sender, stalled) = Channel::<Bytes>::new(1);
        let slow = crate::ops::TimedBody::new(stalled, Duration::from_secs(1));
        let mut body = Watched::boxed(slow, Arc::clone(&turns));
        assert_eq!(turns.failure(), None);
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(turns.failure(), Some(BodyFailure::TooSlow));

        let turns = Turns::new();
        let large =
            http_body_util::Limited::new(http_body_util::Full::new(Bytes::from("12345")), 2);
        let mut body = Watched::boxed(large, Arc::clone(&turns));
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(turns.failure(), Some(BodyFailure::TooLarge));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_stops_taking_the_body_is_the_upstreams_fault() {
        let (mut sender, body) = Channel::<Bytes>::new(1);
        let turns = Turns::new();
        let mut body = Watched::boxed(body, Arc::clone(&turns));
        sender.send_data(Bytes::from("x")).await.unwrap();
        // One frame taken, then the upstream takes no more (and never answers).
        let taker = async move {
            body.frame().await;
            std::future::pending::<()>().await;
        };
        let began = Instant::now();
        let waited = wait(taker, TIMEOUT, &turns).await;
        assert!(matches!(waited, Waited::UpstreamTooSlow), "{waited:?}");
        assert_eq!(began.elapsed(), TIMEOUT);
        drop(sender);
    }
}
