//! Refusing repeated failed authentications for one client id for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// How failed authentications are limited, per client id.
///
/// After `max_failures` failures within `window`, the client id is refused (429 with
/// `Retry-After`) for `base_block`; each further block doubles, up to `max_block`. A success
/// resets everything, and a block always ends, so the real client is never locked out for
/// longer than `max_block`.
///
/// Checks that are still running count as failures-to-be: while the failures so far and the
/// checks running reach `max_failures`, a further attempt for that id waits for one to end
/// (so a burst of parallel guesses gets no more tries than a sequence would; a real client's
/// parallel requests wait a moment instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// Failures tolerated within `window` before blocking.
    pub max_failures: u32,
    /// The window failures are counted in.
    pub window: Duration,
    /// The first block.
    pub base_block: Duration,
    /// The longest block.
    pub max_block: Duration,
}

impl Default for ThrottlePolicy {
    /// 5 failures within a minute block for 30 s, then 60 s, 120 s, ... up to 15 minutes.
    fn default() -> Self {
        Self {
            max_failures: 5,
            window: Duration::from_secs(60),
            base_block: Duration::from_secs(30),
            max_block: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocks: u32,
    blocked_until: Option<Instant>,
    /// Checks admitted and not yet ended.
    in_flight: u32,
    /// Wakes attempts waiting for a check to end.
    ended: Option<Arc<Notify>>,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            failures: 0,
            blocks: 0,
            blocked_until: None,
            in_flight: 0,
            ended: None,
        }
    }
}

/// The longest an attempt waits for other checks of its id to end before it is told to come
/// back later.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10);

/// Whether an attempt may check its secret now.
pub(crate) enum Admission {
    /// Yes: the check runs; report how it went on the attempt.
    Go(Attempt),
    /// No, the id is blocked for this long.
    Blocked(Duration),
    /// Not yet: wait for this, then ask again.
    Wait(OwnedNotified),
}

/// Why [`Throttle::admit`] admitted no check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The id is blocked for this long after repeated failures.
    Blocked(Duration),
    /// Other checks of the id ran for [`MAX_WAIT`] without making room (a slow store): nothing
    /// failed, come back shortly.
    Busy,
}

/// An admitted check of one id's secret: it holds its place until dropped, so move it into
/// the work (the hashing) and drop it only when that work ends, even for a request given up
/// half way. Dropped without an outcome (a cancelled request, a failed store), it counts as
/// neither a failure nor a success.
#[must_use]
pub(crate) struct Attempt {
    throttle: Arc<Throttle>,
    client_id: String,
}

impl Attempt {
    /// The secret was wrong; returns the block this starts, if it starts one.
    pub(crate) fn failed(self) -> Option<Duration> {
        self.throttle.failure(&self.client_id, Instant::now())
    }

    /// The secret was right.
    pub(crate) fn succeeded(self) {
        self.throttle.success(&self.client_id);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut entries = self.throttle.lock();
        if let Some(entry) = entries.get_mut(&self.client_id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if let Some(ended) = &entry.ended {
                ended.notify_waiters();
            }
            if entry.in_flight == 0 && entry.failures == 0 && entry.blocked_until.is_none() {
                entries.remove(&self.client_id);
            }
        }
    }
}

// Entries are pruned beyond this many ids, so guessing many ids cannot grow memory unbounded.
const PRUNE_ABOVE: usize = 10_000;

/// Failed-authentication counters per client id.
#[derive(Debug)]
pub(crate) struct Throttle {
    policy: ThrottlePolicy,
    entries: Mutex<HashMap<String, Entry>>,
    /// When the entries were last pruned (at most once a second: a prune visits them all).
    pruned_at: Mutex<Option<Instant>>,
}

impl Throttle {
    pub(crate) fn new(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            entries: Mutex::new(HashMap::new()),
            pruned_at: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a check of `client_id`'s secret, waiting (at most [`MAX_WAIT`]) while other
    /// checks of it are running and could, failing, use up its allowance.
    pub(crate) async fn admit(self: &Arc<Self>, client_id: &str) -> Result<Attempt, Refusal> {
        let give_up = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            match self.try_admit(client_id, Instant::now()) {
                Admission::Go(attempt) => return Ok(attempt),
                Admission::Blocked(wait) => return Err(Refusal::Blocked(wait)),
                Admission::Wait(ended) => {
                    if tokio::time::timeout_at(give_up, ended).await.is_err() {
                        return Err(Refusal::Busy);
                    }
                }
            }
        }
    }

    /// [`admit`](Self::admit)'s decision at `now`, without waiting.
    pub(crate) fn try_admit(self: &Arc<Self>, client_id: &str, now: Instant) -> Admission {
        let mut entries = self.lock();
        self.prune(&mut entries, now);
        let entry = entries
            .entry(client_id.to_owned())
            .or_insert_with(|| Entry::new(now));
        if let Some(until) = entry.blocked_until.filter(|until| *until > now) {
            return Admission::Blocked(until - now);
        }
        self.roll_window(entry, now);
        if entry.failures.saturating_add(entry.in_flight) >= self.policy.max_failures.max(1) {
            let ended = entry.ended.get_or_insert_with(Arc::default);
            // Registered now: a check that ends before this is polled still wakes it.
            return Admission::Wait(Arc::clone(ended).notified_owned());
        }
        entry.in_flight += 1;
        Admission::Go(Attempt {
            throttle: Arc::clone(self),
            client_id: client_id.to_owned(),
        })
    }

    /// A window that has passed starts over with no failures.
    fn roll_window(&self, entry: &mut Entry, now: Instant) {
        if now.duration_since(entry.window_start) >= self.policy.window {
            entry.window_start = now;
            entry.failures = 0;
        }
    }

    /// How long the client id is still blocked, if it is.
    #[cfg(test)]
    pub(crate) fn blocked_for(&self, client_id: &str, now: Instant) -> Option<Duration> {
        let entries = self.lock();
        let until = entries.get(client_id)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Above [`PRUNE_ABOVE`] ids, forgets those with nothing running, no block and no failure
    /// within the window; at most once a second.
    fn prune(&self, entries: &mut HashMap<String, Entry>, now: Instant) {
        if entries.len() > PRUNE_ABOVE {
            let mut pruned_at = self
                .pruned_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pruned_at.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
                return;
            }
            *pruned_at = Some(now);
            let window = self.policy.window;
            entries.retain(|_, e| {
                e.in_flight > 0
                    || e.blocked_until.is_some_and(|t| t > now)
                    || now.duration_since(e.window_start) < window
            });
        }
    }

    /// Records a failure; returns the block it starts, if it starts one.
    pub(crate) fn failure(&self, client_id: &str, now: Instant) -> Option<Duration> {
        let mut entries = self.lock();
        self.prune(&mut entries, now);
        let entry = entries
            .entry(client_id.to_owned())
            .or_insert_with(|| Entry::new(now));
        self.roll_window(entry, now);
        entry.failures += 1;
        if entry.failures < self.policy.max_failures {
            return None;
        }
        let factor = 1u32.checked_shl(entry.blocks.min(20)).unwrap_or(u32::MAX);
        let block = self
            .policy
            .base_block
            .saturating_mul(factor)
            .min(self.policy.max_block);
        entry.blocks = entry.blocks.saturating_add(1);
        entry.failures = 0;
        entry.window_start = now;
        entry.blocked_until = Some(now + block);
        Some(block)
    }

    /// A successful authentication forgets the id's failures and blocks.
    pub(crate) fn success(&self, client_id: &str) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(client_id) {
            entry.failures = 0;
            entry.blocks = 0;
            entry.blocked_until = None;
            if let Some(ended) = &entry.ended {
                ended.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_failures_doubles_and_resets_on_success() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(throttle.failure("app", t0), None);
        }
        assert_eq!(throttle.failure("app", t0), Some(Duration::from_secs(30)));
        assert_eq!(
            throttle.blocked_for("app", t0),
            Some(Duration::from_secs(30))
        );
        assert_eq!(throttle.blocked_for("other", t0), None);
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(throttle.blocked_for("app", t1), None);
        for _ in 0..4 {
            throttle.failure("app", t1);
        }
        assert_eq!(throttle.failure("app", t1), Some(Duration::from_secs(60)));
        throttle.success("app");
        assert_eq!(throttle.blocked_for("app", t1), None);
    }

    #[test]
    fn blocks_are_capped() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let mut now = Instant::now();
        let mut last = None;
        for _ in 0..12 {
            for _ in 0..5 {
                last = throttle.failure("app", now).or(last);
            }
            now += Duration::from_secs(3600);
        }
        assert_eq!(last, Some(Duration::from_secs(900)));
    }

    #[test]
    fn running_checks_count_toward_the_allowance() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy::default()));
        let now = Instant::now();
        fn go(throttle: &Arc<Throttle>, now: Instant) -> Option<Attempt> {
            match throttle.try_admit("app", now) {
                Admission::Go(attempt) => Some(attempt),
                _ => None,
            }
        }
        let mut running: Vec<_> = (0..5).map(|_| go(&throttle, now).unwrap()).collect();
        // Five checks running: a sixth waits, another id does not.
        assert!(matches!(throttle.try_admit("app", now), Admission::Wait(_)));
        assert!(go_other(&throttle, now));
        // One ends without an outcome (a cancelled request): its place is free again.
        drop(running.pop());
        running.push(go(&throttle, now).unwrap());
        // All five fail: blocked, and a waiting attempt learns it.
        let mut blocks = running.into_iter().filter_map(Attempt::failed);
        assert_eq!(blocks.next(), Some(Duration::from_secs(30)));
        assert!(matches!(
            throttle.try_admit("app", now),
            Admission::Blocked(_)
        ));
    }

    fn go_other(throttle: &Arc<Throttle>, now: Instant) -> bool {
        matches!(throttle.try_admit("other", now), Admission::Go(_))
    }

    #[test]
    fn nothing_is_kept_for_ids_whose_checks_ended_well_or_were_given_up() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy::default()));
        let now = Instant::now();
        let Admission::Go(first) = throttle.try_admit("app", now) else {
            panic!("admitted")
        };
        let Admission::Go(second) = throttle.try_admit("app", now) else {
            panic!("admitted")
        };
        first.succeeded();
        drop(second);
        let Admission::Go(other) = throttle.try_admit("other", now) else {
            panic!("admitted")
        };
        drop(other);
        assert!(throttle.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_waits_at_most_max_wait_and_is_then_busy_not_blocked() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy {
            max_failures: 1,
            ..ThrottlePolicy::default()
        }));
        // A check that never ends (a store that hangs).
        let _stuck = throttle.admit("app").await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = throttle.admit("app").await.err();
        assert_eq!(refused, Some(Refusal::Busy));
        assert_eq!(started.elapsed(), MAX_WAIT);
    }

    #[tokio::test]
    async fn a_waiting_attempt_is_woken_when_a_check_ends() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy {
            max_failures: 2,
            ..ThrottlePolicy::default()
        }));
        let first = throttle.admit("app").await.unwrap();
        let second = throttle.admit("app").await.unwrap();
        let third = throttle.admit("app");
        tokio::pin!(third);
        assert!(futures::FutureExt::now_or_never(third.as_mut()).is_none());
        // A success resets the count: the waiting attempt goes on.
        first.succeeded();
        let third = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("woken")
            .expect("admitted");
        // Both remaining fail: the second failure blocks.
        assert_eq!(second.failed(), None);
        assert_eq!(third.failed(), Some(Duration::from_secs(30)));
        assert!(throttle.admit("app").await.is_err());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let mut now = Instant::now();
        for _ in 0..20 {
            assert_eq!(throttle.failure("app", now), None);
            now += Duration::from_secs(16);
        }
    }
}
