//! Refusing repeated failed authentications for one client id for a while.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How failed authentications are limited, per client id.
///
/// After `max_failures` failures within `window`, the client id is refused (429 with
/// `Retry-After`) for `base_block`; each further block doubles, up to `max_block`. A success
/// resets everything, and a block always ends, so the real client is never locked out for
/// longer than `max_block`.
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

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocks: u32,
    blocked_until: Option<Instant>,
}

// Entries are pruned beyond this many ids, so guessing many ids cannot grow memory unbounded.
const PRUNE_ABOVE: usize = 10_000;

/// Failed-authentication counters per client id.
#[derive(Debug)]
pub(crate) struct Throttle {
    policy: ThrottlePolicy,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Throttle {
    pub(crate) fn new(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long the client id is still blocked, if it is.
    pub(crate) fn blocked_for(&self, client_id: &str, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let until = entries.get(client_id)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failure; returns the block it starts, if it starts one.
    pub(crate) fn failure(&self, client_id: &str, now: Instant) -> Option<Duration> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() > PRUNE_ABOVE {
            let window = self.policy.window;
            entries.retain(|_, e| {
                e.blocked_until.is_some_and(|t| t > now)
                    || now.duration_since(e.window_start) < window
            });
        }
        let entry = entries.entry(client_id.to_owned()).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocks: 0,
            blocked_until: None,
        });
        if now.duration_since(entry.window_start) >= self.policy.window {
            entry.window_start = now;
            entry.failures = 0;
        }
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

    /// A successful authentication forgets the id's failures.
    pub(crate) fn success(&self, client_id: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.remove(client_id);
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
    fn failures_outside_the_window_do_not_add_up() {
        let throttle = Throttle::new(ThrottlePolicy::default());
        let mut now = Instant::now();
        for _ in 0..20 {
            assert_eq!(throttle.failure("app", now), None);
            now += Duration::from_secs(16);
        }
    }
}
