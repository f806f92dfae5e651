//! Refusing an address that keeps presenting wrong admin tokens, for a while.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// Wrong admin tokens tolerated from one address within [`WINDOW`] before it is refused.
pub(crate) const MAX_FAILURES: u32 = 5;
/// The window wrong tokens are counted in.
const WINDOW: Duration = Duration::from_secs(60);
/// The first block; each further one doubles, up to [`MAX_BLOCK`].
pub(crate) const BASE_BLOCK: Duration = Duration::from_secs(60);
/// The longest block.
const MAX_BLOCK: Duration = Duration::from_secs(60 * 60);
/// Addresses are pruned beyond this many (at most once a second).
const PRUNE_ABOVE: usize = 10_000;
/// The most addresses remembered; beyond, those whose failures expire soonest are forgotten.
const MAX_ENTRIES: usize = 100_000;

/// Where a request came from, as counted (an IPv6 address by its /64 network).
pub(crate) use tower_fhir::proxy::SourceNetwork as Source;

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocks: u32,
    blocked_until: Option<Instant>,
}

impl Entry {
    /// When nothing about this entry matters any more.
    fn expires(&self) -> Instant {
        let window_ends = self.window_start + WINDOW;
        self.blocked_until
            .map_or(window_ends, |until| until.max(window_ends))
    }
}

/// What [`AdminThrottle::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The right token.
    Allowed,
    /// No token, or a wrong one (counted).
    Refused,
    /// The address presented too many wrong tokens: refused unchecked for this long.
    Blocked(Duration),
}

/// Wrong admin tokens per source address: after [`MAX_FAILURES`] within a minute the address
/// is refused for [`BASE_BLOCK`], each further block doubling up to an hour; the right token
/// resets it. A request without a token is refused without counting (it guesses nothing).
#[derive(Debug, Default)]
pub(crate) struct AdminThrottle {
    entries: Mutex<HashMap<Source, Entry>>,
    pruned_at: Mutex<Option<Instant>>,
}

impl AdminThrottle {
    /// Checks `presented` against `expected` (in constant time) for a request from `source`,
    /// unless the source is blocked; counts a wrong token. One lock held throughout, so
    /// parallel guesses get no more tries than sequential ones.
    pub(crate) fn check(
        &self,
        source: Source,
        presented: Option<&str>,
        expected: &str,
        now: Instant,
    ) -> Verdict {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        self.prune(&mut entries, now);
        if let Some(until) = entries
            .get(&source)
            .and_then(|entry| entry.blocked_until)
            .filter(|until| *until > now)
        {
            return Verdict::Blocked(until - now);
        }
        let Some(presented) = presented.filter(|token| !token.is_empty()) else {
            return Verdict::Refused;
        };
        // `subtle` compares in constant time (the length is not secret: a different one fails
        // at once).
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            entries.remove(&source);
            return Verdict::Allowed;
        }
        let entry = entries.entry(source).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocks: 0,
            blocked_until: None,
        });
        if now.duration_since(entry.window_start) >= WINDOW {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures += 1;
        if entry.failures >= MAX_FAILURES {
            let factor = 1u32.checked_shl(entry.blocks.min(20)).unwrap_or(u32::MAX);
            let block = BASE_BLOCK.saturating_mul(factor).min(MAX_BLOCK);
            entry.blocks = entry.blocks.saturating_add(1);
            entry.failures = 0;
            entry.window_start = now;
            entry.blocked_until = Some(now + block);
            tracing::warn!(
                %source,
                ?block,
                "too many wrong admin tokens; refusing this address for a while"
            );
        }
        Verdict::Refused
    }

    /// Above [`PRUNE_ABOVE`] addresses, forgets those with no block and no failure within the
    /// window; still above [`MAX_ENTRIES`], those that expire soonest. At most once a second.
    fn prune(&self, entries: &mut HashMap<Source, Entry>, now: Instant) {
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
        entries.retain(|_, entry| entry.expires() > now);
        if entries.len() > MAX_ENTRIES {
            let mut by_expiry: Vec<(Instant, Source)> = entries
                .iter()
                .map(|(source, entry)| (entry.expires(), *source))
                .collect();
            by_expiry.sort_unstable_by_key(|(expires, _)| *expires);
            let excess = entries.len() - MAX_ENTRIES / 10 * 9;
            for (_, source) in by_expiry.into_iter().take(excess) {
                entries.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "the-admin-token-0123456789";

    #[test]
    fn wrong_tokens_block_their_address_only_and_blocks_double() {
        let throttle = AdminThrottle::default();
        let here = Source::of(Some("192.0.2.1".parse().unwrap()));
        let there = Source::of(Some("::ffff:192.0.2.2".parse().unwrap()));
        let t0 = Instant::now();
        // No token at all counts for nothing.
        for _ in 0..10 {
            assert_eq!(throttle.check(here, None, TOKEN, t0), Verdict::Refused);
        }
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                throttle.check(here, Some("guess"), TOKEN, t0),
                Verdict::Refused
            );
        }
        // Blocked, the right token included; another address goes on.
        assert_eq!(
            throttle.check(here, Some(TOKEN), TOKEN, t0),
            Verdict::Blocked(BASE_BLOCK)
        );
        assert_eq!(
            throttle.check(there, Some(TOKEN), TOKEN, t0),
            Verdict::Allowed
        );
        // The block ends; the next one is twice as long; the right token resets.
        let t1 = t0 + BASE_BLOCK;
        for _ in 0..MAX_FAILURES {
            throttle.check(here, Some("guess"), TOKEN, t1);
        }
        assert_eq!(
            throttle.check(here, None, TOKEN, t1),
            Verdict::Blocked(BASE_BLOCK * 2)
        );
        let t2 = t1 + BASE_BLOCK * 2;
        assert_eq!(
            throttle.check(here, Some(TOKEN), TOKEN, t2),
            Verdict::Allowed
        );
        assert!(throttle.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_network() {
        let of = |text: &str| Source::of(Some(text.parse().unwrap()));
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:2:ffff::9"));
        assert_ne!(of("2001:db8:1:2::1"), of("2001:db8:1:3::1"));
        assert_eq!(of("::ffff:192.0.2.1"), of("192.0.2.1"));
    }

    #[test]
    fn wrong_tokens_from_very_many_addresses_keep_memory_bounded() {
        let throttle = AdminThrottle::default();
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES + 10_000 {
            let source = Source::V4((i as u32).to_be_bytes());
            throttle.check(source, Some("guess"), TOKEN, t0);
        }
        throttle.check(
            Source::Unknown,
            Some("guess"),
            TOKEN,
            t0 + Duration::from_secs(2),
        );
        assert!(throttle.entries.lock().unwrap().len() <= MAX_ENTRIES);
    }
}
