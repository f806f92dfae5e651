//! Refusing repeated failed authentications for one client id from one source for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// How failed authentications are limited, per client id and source address.
///
/// Failures are counted per client id *and* the address the request came from (the
/// [`ClientAddr`](crate::token::ClientAddr) in its extensions, or the
/// [`ForwardedClient`](crate::token::ForwardedClient) a load balancer names; an IPv6 address by its /64
/// network; requests without one share a single "unknown" source). After `max_failures`
/// failures within `window`, that client id is refused from that source (429 with
/// `Retry-After`) for `base_block`; each further block doubles, up to `max_block`. A success
/// resets that source's count, and a block always ends. Guesses from one address therefore never
/// lock the client out when it calls from another one.
///
/// Checks that are still running count as failures-to-be: while the failures so far and the
/// checks running reach `max_failures`, a further attempt for that id from that source waits for
/// one to end (so a burst of parallel guesses gets no more tries than a sequence would; a real
/// client's parallel requests wait a moment instead). One source runs at most
/// 16 checks at once whatever the client ids, so one address cannot make unbounded parallel
/// work by guessing many ids.
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

/// Failed authentications counted across processes, so that guesses spread over several
/// replicas of a token endpoint are throttled as if they all met one
/// ([`TokenEndpointBuilder::shared_failure_counts`](crate::token::TokenEndpointBuilder::shared_failure_counts);
/// `tower_fhir::postgres::PgState::failure_counts` keeps them in PostgreSQL).
///
/// Counts are per client id and source network (its text: `192.0.2.1`, `2001:db8::/64`,
/// `unknown`), under the endpoint's [`ThrottlePolicy`]: `max_failures` within `window` start a
/// block of `base_block`, each further block doubling up to `max_block`; a success clears them.
/// The endpoint asks for the standing before each check (refusing with 429 while blocked), and
/// reports each failure, and a success after failures. Each process still limits its own
/// parallel checks: a burst of parallel guesses spread over N processes gets at most N times
/// `max_failures` tries before the first block, a sequence no more than one process allows.
/// An error (for the log) answers the request 503 `temporarily_unavailable`.
pub trait FailureCounts: Send + Sync + 'static {
    /// How `client_id` stands from `source` now, under `policy`.
    fn standing(
        &self,
        client_id: &str,
        source: &str,
        policy: ThrottlePolicy,
    ) -> futures::future::BoxFuture<'static, Result<Standing, String>>;

    /// Counts a failure; the block it starts, if it starts one.
    fn failed(
        &self,
        client_id: &str,
        source: &str,
        policy: ThrottlePolicy,
    ) -> futures::future::BoxFuture<'static, Result<Option<Duration>, String>>;

    /// Clears the failures and blocks of `client_id` from `source`.
    fn succeeded(
        &self,
        client_id: &str,
        source: &str,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;
}

/// How a client id stands from one source, in [`FailureCounts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// Blocked for this long more.
    pub blocked_for: Option<Duration>,
    /// Failures counted in the current window.
    pub failures: u32,
    /// Blocks so far (each further one lasts twice as long), until a success clears them.
    pub blocks: u32,
}

/// One (client id, source)'s counts as a shared store keeps them, in Unix milliseconds, with
/// the rules [`Throttle`] applies.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) window_start: i64,
    pub(crate) failures: u32,
    pub(crate) blocks: u32,
    pub(crate) blocked_until: Option<i64>,
}

#[cfg(feature = "postgres")]
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(feature = "postgres")]
impl Counts {
    /// How they stand at `now`.
    pub(crate) fn standing(&self, now: i64, policy: ThrottlePolicy) -> Standing {
        let blocked_for = self
            .blocked_until
            .filter(|until| *until > now)
            .map(|until| Duration::from_millis(u64::try_from(until - now).unwrap_or(0)));
        let in_window = now.saturating_sub(self.window_start) < millis(policy.window);
        Standing {
            blocked_for,
            failures: if in_window { self.failures } else { 0 },
            blocks: self.blocks,
        }
    }

    /// Counts a failure at `now`; the block it starts, if it starts one.
    pub(crate) fn fail(&mut self, now: i64, policy: ThrottlePolicy) -> Option<Duration> {
        if now.saturating_sub(self.window_start) >= millis(policy.window) {
            self.window_start = now;
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures < policy.max_failures {
            return None;
        }
        let block = block_after(policy, self.blocks);
        self.blocks = self.blocks.saturating_add(1);
        self.failures = 0;
        self.window_start = now;
        self.blocked_until = Some(now.saturating_add(millis(block)));
        Some(block)
    }

    /// When nothing about them matters any more.
    pub(crate) fn expires(&self, policy: ThrottlePolicy) -> i64 {
        let window_ends = self.window_start.saturating_add(millis(policy.window));
        // A later block doubles from the count of earlier ones, so they are kept as long as
        // the longest block.
        let remembered = self.blocked_until.map_or(window_ends, |until| {
            until.saturating_add(millis(policy.max_block))
        });
        remembered.max(window_ends)
    }
}

/// The block that the `blocks`+1th time of too many failures starts.
fn block_after(policy: ThrottlePolicy, blocks: u32) -> Duration {
    let factor = 1u32.checked_shl(blocks.min(20)).unwrap_or(u32::MAX);
    policy
        .base_block
        .saturating_mul(factor)
        .min(policy.max_block)
}

/// Where an authentication came from, as the throttle counts it.
pub(crate) use crate::client_addr::SourceNetwork as Source;

/// How many checks one source may run at once, whatever the client ids.
pub(crate) const MAX_CHECKS_PER_SOURCE: u32 = 16;

/// The most (client id, source) pairs remembered; beyond, those whose failures matter least
/// (nothing running, the soonest to expire) are forgotten.
const MAX_ENTRIES: usize = 100_000;

// Entries are pruned beyond this many pairs, so guessing many ids cannot grow memory unbounded.
const PRUNE_ABOVE: usize = 10_000;

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

    /// When nothing about this entry matters any more (its window and its block are over).
    fn expires(&self, window: Duration) -> Instant {
        let window_ends = self.window_start + window;
        self.blocked_until
            .map_or(window_ends, |until| until.max(window_ends))
    }
}

/// The checks one source is running, over every client id.
#[derive(Debug, Default)]
struct Running {
    in_flight: u32,
    /// Wakes attempts waiting for one of this source's checks to end.
    ended: Option<Arc<Notify>>,
}

type Key = (Source, String);

#[derive(Debug, Default)]
struct State {
    /// Failures and checks per (source, client id).
    entries: HashMap<Key, Entry>,
    /// Checks running per source; a source is here only while it runs one.
    sources: HashMap<Source, Running>,
}

/// The longest an attempt waits for other checks of its id to end before it is told to come
/// back later.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10);

/// Whether an attempt may check its secret now.
pub(crate) enum Admission {
    /// Yes: the check runs; report how it went on the attempt.
    Go(Attempt),
    /// No, the id is blocked for this source for this long.
    Blocked(Duration),
    /// Not yet: wait for this, then ask again.
    Wait(OwnedNotified),
}

/// Why [`Throttle::admit`] admitted no check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The id is blocked for this source for this long after repeated failures.
    Blocked(Duration),
    /// Other checks of the id (or of the source) ran for [`MAX_WAIT`] without making room (a
    /// slow store): nothing failed, come back shortly.
    Busy,
}

/// An admitted check of one id's secret: it holds its place until dropped, so move it into
/// the work (the hashing) and drop it only when that work ends, even for a request given up
/// half way. Dropped without an outcome (a cancelled request, a failed store), it counts as
/// neither a failure nor a success.
#[must_use]
pub(crate) struct Attempt {
    throttle: Arc<Throttle>,
    key: Key,
}

impl Attempt {
    /// The secret was wrong; returns the block this starts, if it starts one.
    pub(crate) fn failed(self) -> Option<Duration> {
        self.throttle.failure(&self.key, Instant::now())
    }

    /// The secret was right.
    pub(crate) fn succeeded(self) {
        self.throttle.success(&self.key);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut state = self.throttle.lock();
        if let Some(entry) = state.entries.get_mut(&self.key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if let Some(ended) = &entry.ended {
                ended.notify_waiters();
            }
            if entry.in_flight == 0 && entry.failures == 0 && entry.blocked_until.is_none() {
                state.entries.remove(&self.key);
            }
        }
        let source = self.key.0;
        if let Some(running) = state.sources.get_mut(&source) {
            running.in_flight = running.in_flight.saturating_sub(1);
            if let Some(ended) = &running.ended {
                ended.notify_waiters();
            }
            if running.in_flight == 0 {
                state.sources.remove(&source);
            }
        }
    }
}

/// Failed-authentication counters per client id and source.
#[derive(Debug)]
pub(crate) struct Throttle {
    policy: ThrottlePolicy,
    state: Mutex<State>,
    /// When the entries were last pruned (at most once a second: a prune visits them all).
    pruned_at: Mutex<Option<Instant>>,
}

impl Throttle {
    pub(crate) fn new(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(State::default()),
            pruned_at: Mutex::new(None),
        }
    }

    pub(crate) fn policy(&self) -> ThrottlePolicy {
        self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a check of `client_id`'s secret from `source`, waiting (at most [`MAX_WAIT`])
    /// while other checks of it from there are running and could, failing, use up its
    /// allowance, or while the source runs [`MAX_CHECKS_PER_SOURCE`] checks.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        client_id: &str,
        source: Source,
    ) -> Result<Attempt, Refusal> {
        let give_up = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            match self.try_admit(client_id, source, Instant::now()) {
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
    pub(crate) fn try_admit(
        self: &Arc<Self>,
        client_id: &str,
        source: Source,
        now: Instant,
    ) -> Admission {
        let mut state = self.lock();
        self.prune(&mut state, now);
        let State { entries, sources } = &mut *state;
        let key = (source, client_id.to_owned());
        let entry = entries
            .entry(key.clone())
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
        let running = sources.entry(source).or_default();
        if running.in_flight >= MAX_CHECKS_PER_SOURCE {
            let ended = running.ended.get_or_insert_with(Arc::default);
            let wait = Arc::clone(ended).notified_owned();
            // Nothing kept for a pair that only waits.
            if entry.in_flight == 0 && entry.failures == 0 && entry.blocked_until.is_none() {
                entries.remove(&key);
            }
            return Admission::Wait(wait);
        }
        running.in_flight += 1;
        entry.in_flight += 1;
        Admission::Go(Attempt {
            throttle: Arc::clone(self),
            key,
        })
    }

    /// A window that has passed starts over with no failures.
    fn roll_window(&self, entry: &mut Entry, now: Instant) {
        if now.duration_since(entry.window_start) >= self.policy.window {
            entry.window_start = now;
            entry.failures = 0;
        }
    }

    /// How long the client id is still blocked for the source, if it is.
    #[cfg(test)]
    pub(crate) fn blocked_for(
        &self,
        client_id: &str,
        source: Source,
        now: Instant,
    ) -> Option<Duration> {
        let state = self.lock();
        let until = state
            .entries
            .get(&(source, client_id.to_owned()))?
            .blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Above [`PRUNE_ABOVE`] pairs, forgets those with nothing running, no block and no failure
    /// within the window; still above [`MAX_ENTRIES`] (failures from very many addresses),
    /// forgets the idle ones that expire soonest. At most once a second.
    fn prune(&self, state: &mut State, now: Instant) {
        let entries = &mut state.entries;
        if entries.len() <= PRUNE_ABOVE {
            return;
        }
        let mut pruned_at = self
            .pruned_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pruned_at.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            return;
        }
        *pruned_at = Some(now);
        let window = self.policy.window;
        entries.retain(|_, e| e.in_flight > 0 || e.expires(window) > now);
        if entries.len() > MAX_ENTRIES {
            let mut idle: Vec<(Instant, Key)> = entries
                .iter()
                .filter(|(_, e)| e.in_flight == 0)
                .map(|(key, e)| (e.expires(window), key.clone()))
                .collect();
            idle.sort_unstable_by_key(|(expires, _)| *expires);
            // Down to nine tenths, so that this does not run again at once.
            let excess = entries.len() - MAX_ENTRIES / 10 * 9;
            for (_, key) in idle.into_iter().take(excess) {
                entries.remove(&key);
            }
        }
    }

    /// Records a failure; returns the block it starts, if it starts one.
    pub(crate) fn failure(&self, key: &Key, now: Instant) -> Option<Duration> {
        let mut state = self.lock();
        self.prune(&mut state, now);
        let entry = state
            .entries
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now));
        self.roll_window(entry, now);
        entry.failures += 1;
        if entry.failures < self.policy.max_failures {
            return None;
        }
        let block = block_after(self.policy, entry.blocks);
        entry.blocks = entry.blocks.saturating_add(1);
        entry.failures = 0;
        entry.window_start = now;
        entry.blocked_until = Some(now + block);
        Some(block)
    }

    /// A successful authentication forgets the failures and blocks of its id from its source
    /// (not those from elsewhere: a guesser's count is not reset by the real client).
    pub(crate) fn success(&self, key: &Key) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(key) {
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

    const HERE: Source = Source::V4([192, 0, 2, 1]);

    fn key(id: &str) -> Key {
        (HERE, id.to_owned())
    }

    #[test]
    fn blocks_after_failures_doubles_and_resets_on_success() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(throttle.failure(&key("app"), t0), None);
        }
        assert_eq!(
            throttle.failure(&key("app"), t0),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            throttle.blocked_for("app", HERE, t0),
            Some(Duration::from_secs(30))
        );
        assert_eq!(throttle.blocked_for("other", HERE, t0), None);
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(throttle.blocked_for("app", HERE, t1), None);
        for _ in 0..4 {
            throttle.failure(&key("app"), t1);
        }
        assert_eq!(
            throttle.failure(&key("app"), t1),
            Some(Duration::from_secs(60))
        );
        throttle.success(&key("app"));
        assert_eq!(throttle.blocked_for("app", HERE, t1), None);
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn shared_counts_block_like_the_local_ones_and_remember_their_blocks() {
        let policy = ThrottlePolicy::default();
        let mut counts = Counts::default();
        let t0 = 1_000_000;
        for _ in 0..4 {
            assert_eq!(counts.fail(t0, policy), None);
        }
        assert_eq!(counts.standing(t0, policy).failures, 4);
        assert_eq!(counts.fail(t0, policy), Some(Duration::from_secs(30)));
        let blocked = counts.standing(t0 + 1_000, policy);
        assert_eq!(blocked.blocked_for, Some(Duration::from_secs(29)));
        // After the block: no failures in the window, but a block to clear on success (or the
        // next one would last twice as long).
        let after = counts.standing(t0 + 31_000, policy);
        assert_eq!(
            (after.blocked_for, after.failures, after.blocks),
            (None, 0, 1)
        );
        for _ in 0..4 {
            counts.fail(t0 + 31_000, policy);
        }
        assert_eq!(
            counts.fail(t0 + 31_000, policy),
            Some(Duration::from_secs(60))
        );
        assert!(counts.expires(policy) >= t0 + 31_000 + 60_000 + 900_000);
    }

    #[test]
    fn blocks_are_capped() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let mut now = Instant::now();
        let mut last = None;
        for _ in 0..12 {
            for _ in 0..5 {
                last = throttle.failure(&key("app"), now).or(last);
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
            match throttle.try_admit("app", HERE, now) {
                Admission::Go(attempt) => Some(attempt),
                _ => None,
            }
        }
        let mut running: Vec<_> = (0..5).map(|_| go(&throttle, now).unwrap()).collect();
        // Five checks running: a sixth waits, another id does not.
        assert!(matches!(
            throttle.try_admit("app", HERE, now),
            Admission::Wait(_)
        ));
        assert!(go_other(&throttle, now));
        // One ends without an outcome (a cancelled request): its place is free again.
        drop(running.pop());
        running.push(go(&throttle, now).unwrap());
        // All five fail: blocked, and a waiting attempt learns it.
        let mut blocks = running.into_iter().filter_map(Attempt::failed);
        assert_eq!(blocks.next(), Some(Duration::from_secs(30)));
        assert!(matches!(
            throttle.try_admit("app", HERE, now),
            Admission::Blocked(_)
        ));
    }

    fn go_other(throttle: &Arc<Throttle>, now: Instant) -> bool {
        matches!(throttle.try_admit("other", HERE, now), Admission::Go(_))
    }

    #[test]
    fn nothing_is_kept_for_ids_whose_checks_ended_well_or_were_given_up() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy::default()));
        let now = Instant::now();
        let Admission::Go(first) = throttle.try_admit("app", HERE, now) else {
            panic!("admitted")
        };
        let Admission::Go(second) = throttle.try_admit("app", HERE, now) else {
            panic!("admitted")
        };
        first.succeeded();
        drop(second);
        let Admission::Go(other) = throttle.try_admit("other", HERE, now) else {
            panic!("admitted")
        };
        drop(other);
        let state = throttle.lock();
        assert!(state.entries.is_empty() && state.sources.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_waits_at_most_max_wait_and_is_then_busy_not_blocked() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy {
            max_failures: 1,
            ..ThrottlePolicy::default()
        }));
        // A check that never ends (a store that hangs).
        let _stuck = throttle.admit("app", HERE).await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = throttle.admit("app", HERE).await.err();
        assert_eq!(refused, Some(Refusal::Busy));
        assert_eq!(started.elapsed(), MAX_WAIT);
    }

    #[tokio::test]
    async fn a_waiting_attempt_is_woken_when_a_check_ends() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy {
            max_failures: 2,
            ..ThrottlePolicy::default()
        }));
        let first = throttle.admit("app", HERE).await.unwrap();
        let second = throttle.admit("app", HERE).await.unwrap();
        let third = throttle.admit("app", HERE);
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
        assert!(throttle.admit("app", HERE).await.is_err());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let mut now = Instant::now();
        for _ in 0..20 {
            assert_eq!(throttle.failure(&key("app"), now), None);
            now += Duration::from_secs(16);
        }
    }

    #[test]
    fn failures_from_one_source_do_not_block_the_id_from_another() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy::default()));
        let elsewhere = Source::V4([198, 51, 100, 7]);
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(throttle.failure(&key("app"), now), None);
        }
        assert!(throttle.failure(&key("app"), now).is_some());
        assert!(matches!(
            throttle.try_admit("app", HERE, now),
            Admission::Blocked(_)
        ));
        // The real client, from its own address, goes on; its success does not unblock the
        // guesser.
        let Admission::Go(real) = throttle.try_admit("app", elsewhere, now) else {
            panic!("admitted from elsewhere")
        };
        real.succeeded();
        assert!(throttle.blocked_for("app", HERE, now).is_some());
        assert_eq!(throttle.blocked_for("app", elsewhere, now), None);
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_networks() {
        let of = |text: &str| Source::of(Some(text.parse().unwrap()));
        assert_eq!(of("192.0.2.1"), Source::V4([192, 0, 2, 1]));
        assert_eq!(of("::ffff:192.0.2.1"), of("192.0.2.1"));
        assert_ne!(of("192.0.2.1"), of("192.0.2.2"));
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:2:ffff::9"));
        assert_ne!(of("2001:db8:1:2::1"), of("2001:db8:1:3::1"));
        assert_ne!(of("::ffff:192.0.2.1"), of("::ffff:192.0.2.2"));
        assert_eq!(Source::of(None), Source::Unknown);
    }

    #[test]
    fn one_source_runs_a_bounded_number_of_checks_whatever_the_ids() {
        let throttle = Arc::new(Throttle::new(ThrottlePolicy::default()));
        let now = Instant::now();
        let mut running: Vec<Attempt> = (0..MAX_CHECKS_PER_SOURCE)
            .map(
                |i| match throttle.try_admit(&format!("id-{i}"), HERE, now) {
                    Admission::Go(attempt) => attempt,
                    _ => panic!("check {i} admitted"),
                },
            )
            .collect();
        assert!(matches!(
            throttle.try_admit("one-more", HERE, now),
            Admission::Wait(_)
        ));
        // Nothing is kept for the pair that only waited.
        assert_eq!(throttle.lock().entries.len(), running.len());
        // Another source is not held up.
        let elsewhere = Source::V6([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1]);
        assert!(matches!(
            throttle.try_admit("one-more", elsewhere, now),
            Admission::Go(_)
        ));
        // One check ends: room for one more.
        drop(running.pop());
        running.push(match throttle.try_admit("one-more", HERE, now) {
            Admission::Go(attempt) => attempt,
            _ => panic!("admitted once a check ended"),
        });
        drop(running);
        let state = throttle.lock();
        assert!(state.entries.is_empty() && state.sources.is_empty());
    }

    #[test]
    fn failures_from_very_many_addresses_keep_memory_bounded() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let t0 = Instant::now();
        let source = |i: usize| Source::V4((i as u32).to_be_bytes());
        for i in 0..MAX_ENTRIES + 10_000 {
            throttle.failure(&(source(i), "app".to_owned()), t0);
        }
        // A blocked pair, newer than the rest.
        let t1 = t0 + Duration::from_secs(2);
        let blocked = (Source::Unknown, "app".to_owned());
        for _ in 0..5 {
            throttle.failure(&blocked, t1);
        }
        let state = throttle.lock();
        assert!(
            state.entries.len() <= MAX_ENTRIES,
            "{}",
            state.entries.len()
        );
        assert!(state.entries[&blocked].blocked_until.is_some());
    }
}
