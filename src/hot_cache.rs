//! A bounded concurrent map for lookups made on every request (verified tokens, tenants'
//! routes): a fixed set of read-write-locked shards, so a hit costs one keyed hash, one
//! uncontended read lock and one probe, whatever the number of entries.
//!
//! It keeps no recency or frequency: when a shard is full, an insert first drops the stale
//! entries it finds among a few, else one entry it happens to meet first (in effect a random
//! one). What the callers keep is cheap to recompute and has its own expiry; what matters is
//! that the map never grows past its bound and that a hit stays cheap.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// At most this many shards.
const MAX_SHARDS: usize = 16;
/// A shard for about this many entries, up to the most shards: a small map is one shard.
const ENTRIES_PER_SHARD: usize = 64;
/// How many entries a full shard looks at for stale ones before evicting.
const EVICTION_SCAN: usize = 16;

pub(crate) struct HotCache<K, V> {
    shards: Box<[RwLock<Shard<K, V>>]>,
    shard_capacity: usize,
    hasher: RandomState,
}

/// Entries keyed by their (already keyed) hash; the key is kept to compare on a hit, so two
/// keys with one hash share a slot rather than answer for each other.
type Shard<K, V> = HashMap<u64, (K, V), BuildHasherDefault<PassThrough>>;

impl<K, V: Clone> HotCache<K, V> {
    /// A map of at most about `capacity` entries (rounded up to a multiple of its shards).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // A power of two (the shard is picked by masking the hash).
        let count = (capacity / ENTRIES_PER_SHARD).clamp(1, MAX_SHARDS);
        let count = 1 << count.ilog2();
        Self {
            shards: (0..count).map(|_| RwLock::new(Shard::default())).collect(),
            shard_capacity: capacity.div_ceil(count),
            hasher: RandomState::new(),
        }
    }

    /// The keyed hash of `key` (or of whatever part of it the caller chooses to hash) that the
    /// other methods take.
    pub(crate) fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The value kept for `key`, if any.
    pub(crate) fn get<Q>(&self, hash: u64, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let shard = self.read(hash);
        let (kept, value) = shard.get(&hash)?;
        (kept.borrow() == key).then(|| value.clone())
    }

    /// Keeps `value` for `key`, replacing what was kept for it. When the shard is full, entries
    /// for which `is_stale` holds go first, else one other entry.
    pub(crate) fn insert(&self, hash: u64, key: K, value: V, is_stale: impl Fn(&V) -> bool) {
        self.insert_if(hash, key, value, is_stale, || true);
    }

    /// [`insert`](Self::insert), if `still_wanted` holds once the shard is locked (a check
    /// against a concurrent [`remove`](Self::remove) or [`clear`](Self::clear)).
    pub(crate) fn insert_if(
        &self,
        hash: u64,
        key: K,
        value: V,
        is_stale: impl Fn(&V) -> bool,
        still_wanted: impl FnOnce() -> bool,
    ) {
        let mut shard = self.write(hash);
        if !still_wanted() {
            return;
        }
        self.make_room(&mut shard, hash, is_stale);
        shard.insert(hash, (key, value));
    }

    /// Keeps what `update` makes of the value kept for `key` (`None` when there is none), and
    /// returns it; read and replaced under the shard's lock, so concurrent callers agree on one
    /// value. A full shard makes room as [`insert`](Self::insert) does.
    pub(crate) fn update(
        &self,
        hash: u64,
        key: K,
        update: impl FnOnce(Option<&V>) -> V,
        is_stale: impl Fn(&V) -> bool,
    ) -> V
    where
        K: Eq,
    {
        let mut shard = self.write(hash);
        let kept = shard
            .get(&hash)
            .and_then(|(kept, value)| (*kept == key).then_some(value));
        let value = update(kept);
        self.make_room(&mut shard, hash, is_stale);
        shard.insert(hash, (key, value.clone()));
        value
    }

    /// When the shard is full and `hash` has no slot in it, drops the stale entries among the
    /// first few, else one of them.
    fn make_room(&self, shard: &mut Shard<K, V>, hash: u64, is_stale: impl Fn(&V) -> bool) {
        if shard.len() >= self.shard_capacity && !shard.contains_key(&hash) {
            let mut stale = [0u64; EVICTION_SCAN];
            let mut found = 0;
            let mut first = None;
            for (&slot, (_, kept)) in shard.iter().take(EVICTION_SCAN) {
                first.get_or_insert(slot);
                if is_stale(kept) {
                    stale[found] = slot;
                    found += 1;
                }
            }
            if found == 0 {
                stale[0] = first.unwrap_or_default();
                found = 1;
            }
            for slot in &stale[..found] {
                shard.remove(slot);
            }
        }
    }

    /// Forgets `key`.
    pub(crate) fn remove<Q>(&self, hash: u64, key: &Q)
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let mut shard = self.write(hash);
        if shard
            .get(&hash)
            .is_some_and(|(kept, _)| kept.borrow() == key)
        {
            shard.remove(&hash);
        }
    }

    /// Forgets every entry.
    pub(crate) fn clear(&self) {
        for shard in &*self.shards {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// The most entries it keeps: its capacity rounded up to a multiple of its shards.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.shards.len() * self.shard_capacity
    }

    /// How many entries are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard<K, V>> {
        // High bits pick the shard; the shard's table uses the low ones.
        let index = (hash >> 48) as usize & (self.shards.len() - 1);
        &self.shards[index]
    }

    // Nothing panics while a lock is held (the callers' closures compare and clone `Arc`s),
    // and a map is consistent after any panic anyway: a poisoned lock is used as it is.
    fn read(&self, hash: u64) -> RwLockReadGuard<'_, Shard<K, V>> {
        self.shard(hash)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, Shard<K, V>> {
        self.shard(hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The keys are keyed hashes already: hashing them again would only cost time.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; fold anything else rather than drop it.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn answers_for_the_very_key_only() {
        let cache: HotCache<String, u32> = HotCache::new(100);
        let a = cache.hash("a");
        cache.insert(a, "a".to_owned(), 1, |_| false);
        assert_eq!(cache.get(a, "a"), Some(1));
        assert_eq!(cache.get(cache.hash("b"), "b"), None);
        // Another key under the same hash is a miss, not the other key's value.
        assert_eq!(cache.get(a, "b"), None);
        cache.insert(a, "a".to_owned(), 2, |_| false);
        assert_eq!(cache.get(a, "a"), Some(2));
        cache.remove(a, "b");
        assert_eq!(cache.get(a, "a"), Some(2), "removing another key keeps it");
        cache.remove(a, "a");
        assert_eq!(cache.get(a, "a"), None);
    }

    #[test]
    fn never_grows_past_its_bound() {
        for capacity in [1, 3, 16, 100, 1000] {
            let cache: HotCache<u32, u32> = HotCache::new(capacity);
            for key in 0..(capacity as u32 * 10) {
                cache.insert(cache.hash(&key), key, key, |_| false);
            }
            let bound = capacity.div_ceil(cache.shards.len()) * cache.shards.len();
            assert!(cache.len() <= bound, "{capacity}: {}", cache.len());
            assert!(cache.len() >= capacity / 2, "{capacity}: {}", cache.len());
        }
    }

    /// The keys a cache holds among `keys` (each under [`hash`]`(key)`).
    fn kept(cache: &HotCache<u64, bool>, keys: impl IntoIterator<Item = u64>) -> Vec<u64> {
        keys.into_iter()
            .filter(|&key| cache.get(hash(key), &key).is_some())
            .collect()
    }

    /// A hash chosen by the test rather than keyed at random: the same entries land in the
    /// same places on every run, spread over the shard's table.
    fn hash(key: u64) -> u64 {
        key.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn a_full_shard_drops_exactly_its_stale_entries() {
        // One shard of 4, every entry within the eviction scan. For every way of marking some
        // of the 4 entries stale (each at every position of the shard's table, over rounds
        // with other hashes), inserting a fifth entry drops exactly the stale ones and keeps
        // the others. An eviction that ignored staleness, or evicted at random, would drop a
        // live entry in most of these cases; no timing, no chance.
        for round in 0..32u64 {
            for stale_mask in 1..16u32 {
                let cache: HotCache<u64, bool> = HotCache::new(4);
                assert_eq!((cache.shards.len(), cache.shard_capacity), (1, 4));
                let keys: Vec<u64> = (0..4).map(|i| round * 5 + i + 1).collect();
                for (i, &key) in keys.iter().enumerate() {
                    let stale = stale_mask & (1 << i) != 0;
                    cache.insert(hash(key), key, stale, |&stale| stale);
                }
                assert_eq!(cache.len(), 4);
                let new = round * 5 + 5;
                cache.insert(hash(new), new, false, |&stale| stale);
                let live: Vec<u64> = keys
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| stale_mask & (1 << i) == 0)
                    .map(|(_, &key)| key)
                    .chain([new])
                    .collect();
                assert_eq!(
                    kept(&cache, keys.iter().copied().chain([new])),
                    live,
                    "round {round}, stale mask {stale_mask:04b}"
                );
                assert_eq!(cache.len(), live.len());
            }
        }
    }

    #[test]
    fn a_full_shard_without_stale_entries_drops_exactly_one() {
        let cache: HotCache<u64, bool> = HotCache::new(4);
        for key in 1..=4 {
            cache.insert(hash(key), key, false, |&stale| stale);
        }
        for new in 5..=40 {
            cache.insert(hash(new), new, false, |&stale| stale);
            let kept = kept(&cache, 1..=new);
            assert_eq!(kept.len(), 4, "{kept:?}");
            assert!(kept.contains(&new), "the new entry is kept: {kept:?}");
        }
        // Replacing a kept key's value evicts nothing.
        let before = kept(&cache, 1..=40);
        let last = *before.last().unwrap();
        cache.insert(hash(last), last, false, |_| true);
        assert_eq!(kept(&cache, 1..=40), before);
    }

    #[test]
    fn insert_if_checks_under_the_lock() {
        let cache: HotCache<u32, u32> = HotCache::new(10);
        let hash = cache.hash(&1);
        cache.insert_if(hash, 1, 1, |_| false, || false);
        assert_eq!(cache.get(hash, &1), None);
        cache.insert_if(hash, 1, 1, |_| false, || true);
        assert_eq!(cache.get(hash, &1), Some(1));
        cache.clear();
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn shared_between_threads() {
        let cache: Arc<HotCache<u32, u32>> = Arc::new(HotCache::new(1000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let key = t * 10_000 + i;
                        let hash = cache.hash(&key);
                        cache.insert(hash, key, key, |_| false);
                        if let Some(value) = cache.get(hash, &key) {
                            assert_eq!(value, key);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(cache.len() <= 1008);
    }
}
