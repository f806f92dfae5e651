//! Counts each thread keeps to itself, read by adding every thread's up.
//!
//! An atomic read-modify-write (`lock add`, `lock cmpxchg`) waits for every store before it to
//! reach the cache: on a request path that has just written a few hundred bytes to fresh
//! memory, each costs tens of nanoseconds, where the same add as a load and a store costs
//! one. So each thread adds to words of its own, which only it writes (a relaxed load and a
//! relaxed store, plain moves on x86 and ARM); a reader (a scrape) adds every thread's words
//! up. A thread's words outlive it: the next thread to start takes them over and goes on
//! adding, so nothing counted is lost and the words do not grow with the threads a process
//! has had, only with the most it had at once.
//!
//! A word is named by an id from [`ids`]: a recorder takes a few for each series it
//! registers. A series forgotten (a removed tenant's, say) gives its ids back with
//! [`release`] once nothing can add to them any more; they are zeroed on every thread and
//! taken again by the next [`ids`] of the same count, so the words grow with the series a
//! process has at once, not with every series it ever had.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// Words a chunk: a thread's words grow a chunk at a time, as the ids it adds to need.
const CHUNK: usize = 256;

struct Chunk([AtomicU64; CHUNK]);

impl Chunk {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::array::from_fn(|_| AtomicU64::new(0))))
    }
}

/// One thread's words (or, once it ended, the next one's), by id.
struct Words {
    chunks: RwLock<Vec<Option<Arc<Chunk>>>>,
}

impl Words {
    const fn new() -> Self {
        Self {
            chunks: RwLock::new(Vec::new()),
        }
    }

    /// The chunk holding word `id`, made if it is not there yet.
    fn chunk(&self, id: usize) -> Arc<Chunk> {
        let mut chunks = self.chunks.write().unwrap_or_else(PoisonError::into_inner);
        let at = id / CHUNK;
        if chunks.len() <= at {
            chunks.resize(at + 1, None);
        }
        Arc::clone(chunks[at].get_or_insert_with(Chunk::new))
    }

    /// Calls `read` with every chunk there is, by index.
    fn read(&self, read: impl FnOnce(&[Option<Arc<Chunk>>])) {
        read(&self.chunks.read().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Every thread's words, and those of threads that ended, for the next to take; and the ids
/// given back, for the next to take.
struct Registry {
    all: Vec<Arc<Words>>,
    free: Vec<Arc<Words>>,
    next_id: usize,
    /// Runs of ids given back (zeroed), by their length: the first id of each.
    released: Vec<(usize, Vec<usize>)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    all: Vec::new(),
    free: Vec::new(),
    next_id: 0,
    released: Vec::new(),
});

/// Words added to with atomic read-modify-writes, by a thread that cannot have its own: one
/// whose thread-local storage is being torn down, or one adding from within an add.
static SHARED: Words = Words::new();

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `count` ids, one after the other, whose words are zero on every thread; the first is
/// returned. A run of `count` given back with [`release`] is taken first.
pub(crate) fn ids(count: usize) -> usize {
    let mut registry = registry();
    if let Some(first) = registry
        .released
        .iter_mut()
        .find(|(length, _)| *length == count)
        .and_then(|(_, firsts)| firsts.pop())
    {
        return first;
    }
    let first = registry.next_id;
    registry.next_id = first
        .checked_add(count)
        .expect("fewer than usize::MAX metric words");
    first
}

/// Gives back the `count` ids from `first` on (taken together with [`ids`]), for another
/// series: zeroes their words on every thread, and on the shared words. Call it only once
/// nothing can add to them any more (the handle that added to them dropped): an add after it
/// would count in the next series given them.
pub(crate) fn release(first: usize, count: usize) {
    let mut registry = registry();
    let all = registry.all.clone();
    for words in all.iter().map(|words| &**words).chain([&SHARED]) {
        words.read(|chunks| {
            for id in first..first.saturating_add(count) {
                if let Some(Some(chunk)) = chunks.get(id / CHUNK) {
                    // (No thread adds to these words: a store cannot lose an add.)
                    chunk.0[id % CHUNK].store(0, Ordering::Relaxed);
                }
            }
        });
    }
    match registry
        .released
        .iter_mut()
        .find(|(length, _)| *length == count)
    {
        Some((_, firsts)) => firsts.push(first),
        None => registry.released.push((count, vec![first])),
    }
}

/// The calling thread's words, and the chunks of them it has looked up (so an add takes no
/// lock).
struct Local {
    words: Arc<Words>,
    chunks: Vec<Option<Arc<Chunk>>>,
}

impl Local {
    /// Words a thread that ended left, or new ones.
    fn take() -> Self {
        let mut registry = registry();
        let words = match registry.free.pop() {
            Some(words) => words,
            None => {
                let words = Arc::new(Words::new());
                registry.all.push(Arc::clone(&words));
                words
            }
        };
        drop(registry);
        let mut chunks = Vec::new();
        words.read(|held| chunks = held.to_vec());
        Self { words, chunks }
    }

    fn word(&mut self, id: usize) -> &AtomicU64 {
        let at = id / CHUNK;
        if !matches!(self.chunks.get(at), Some(Some(_))) {
            self.grow(id);
        }
        match &self.chunks[at] {
            Some(chunk) => &chunk.0[id % CHUNK],
            None => unreachable!("grown above"),
        }
    }

    /// Makes (or finds) the chunk of word `id`.
    #[cold]
    fn grow(&mut self, id: usize) {
        let at = id / CHUNK;
        if self.chunks.len() <= at {
            self.chunks.resize(at + 1, None);
        }
        self.chunks[at] = Some(self.words.chunk(id));
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        registry().free.push(Arc::clone(&self.words));
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Adds to words as their only writer, or (see [`SHARED`]) atomically.
pub(crate) struct Adder<'a>(Option<&'a mut Local>);

impl Adder<'_> {
    /// Adds `n` to the integer in word `id` (wrapping).
    pub(crate) fn add(&mut self, id: usize, n: u64) {
        match &mut self.0 {
            Some(local) => {
                let word = local.word(id);
                word.store(
                    word.load(Ordering::Relaxed).wrapping_add(n),
                    Ordering::Relaxed,
                );
            }
            None => {
                SHARED.chunk(id).0[id % CHUNK].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Adds `x` to the float in word `id` (its bits).
    pub(crate) fn add_f64(&mut self, id: usize, x: f64) {
        let plus = |bits: u64| (f64::from_bits(bits) + x).to_bits();
        match &mut self.0 {
            Some(local) => {
                let word = local.word(id);
                word.store(plus(word.load(Ordering::Relaxed)), Ordering::Relaxed);
            }
            None => {
                let chunk = SHARED.chunk(id);
                let _ = chunk.0[id % CHUNK].fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |bits| Some(plus(bits)),
                );
            }
        }
    }
}

/// Calls `add` with the calling thread's [`Adder`]. `add` should only add: an add within it
/// (from a `Drop`, say) goes to the shared words.
pub(crate) fn with_adder<R>(add: impl FnOnce(&mut Adder<'_>) -> R) -> R {
    let mut add = Some(add);
    let done = LOCAL.try_with(|local| {
        let mut local = local.try_borrow_mut().ok()?;
        if local.is_none() {
            *local = Some(Local::take());
        }
        Some((add.take()?)(&mut Adder(local.as_mut())))
    });
    match (done, add) {
        (Ok(Some(result)), _) => result,
        (_, Some(add)) => add(&mut Adder(None)),
        (_, None) => unreachable!("an add that ran returned its result"),
    }
}

/// Every thread's chunks of words at one moment, to add up: a word is read when it is asked
/// for (a chunk a thread makes later, for words it had not added to before, is not seen).
pub(crate) struct Sums {
    threads: Vec<Vec<Option<Arc<Chunk>>>>,
}

impl Sums {
    /// Takes the list of every thread's chunks.
    pub(crate) fn now() -> Self {
        let all = registry().all.clone();
        let mut threads = Vec::with_capacity(all.len() + 1);
        for words in all.iter().map(|words| &**words).chain([&SHARED]) {
            words.read(|chunks| threads.push(chunks.to_vec()));
        }
        Self { threads }
    }

    fn each(&self, id: usize, mut each: impl FnMut(u64)) {
        for chunks in &self.threads {
            if let Some(Some(chunk)) = chunks.get(id / CHUNK) {
                each(chunk.0[id % CHUNK].load(Ordering::Relaxed));
            }
        }
    }

    /// The integers in word `id`, added up (wrapping).
    pub(crate) fn u64(&self, id: usize) -> u64 {
        let mut sum = 0_u64;
        self.each(id, |n| sum = sum.wrapping_add(n));
        sum
    }

    /// The floats in word `id`, added up.
    pub(crate) fn f64(&self, id: usize) -> f64 {
        let mut sum = 0.0;
        self.each(id, |bits| sum += f64::from_bits(bits));
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_s_adds_are_summed_once_also_after_it_ended() {
        let id = ids(2);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(move || {
                    for _ in 0..10_000 {
                        with_adder(|adder| {
                            adder.add(id, 1);
                            adder.add_f64(id + 1, 0.5);
                        });
                    }
                });
            }
        });
        let sums = Sums::now();
        assert_eq!(sums.u64(id), 80_000);
        assert!((sums.f64(id + 1) - 40_000.0).abs() < f64::EPSILON);
        // A thread started now takes over an ended one's words and adds on.
        std::thread::spawn(move || with_adder(|adder| adder.add(id, 5)))
            .join()
            .unwrap();
        assert_eq!(Sums::now().u64(id), 80_005);
    }

    #[test]
    fn ids_far_apart_grow_a_chunk_each_and_unused_words_read_zero() {
        let low = ids(1);
        let high = ids(3 * CHUNK) + 3 * CHUNK - 1;
        with_adder(|adder| {
            adder.add(low, 2);
            adder.add(high, 3);
        });
        let sums = Sums::now();
        assert_eq!(sums.u64(low), 2);
        assert_eq!(sums.u64(high), 3);
        assert_eq!(sums.u64(high - 1), 0);
        assert_eq!(sums.u64(ids(1) + 10 * CHUNK), 0, "beyond any chunk made");
    }

    #[test]
    fn ids_given_back_are_zeroed_on_every_thread_and_taken_again() {
        // A run length no other test takes, so that another test's ids are not these.
        const RUN: usize = 11;
        let first = ids(RUN);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(move || {
                    with_adder(|adder| {
                        adder.add(first, 3);
                        adder.add_f64(first + RUN - 1, 0.5);
                    });
                });
            }
        });
        with_adder(|adder| {
            adder.add(first, 1);
            with_adder(|shared| shared.add(first, 10));
        });
        assert_eq!(Sums::now().u64(first), 23);
        release(first, RUN);
        let sums = Sums::now();
        assert_eq!(
            sums.u64(first),
            0,
            "zeroed on every thread and the shared words"
        );
        assert!(sums.f64(first + RUN - 1).abs() < f64::EPSILON);
        assert_eq!(ids(RUN), first, "taken again");
        with_adder(|adder| adder.add(first, 2));
        assert_eq!(Sums::now().u64(first), 2, "counted from zero");
        assert_ne!(ids(RUN), first, "given once");
    }

    #[test]
    fn an_add_within_an_add_goes_to_the_shared_words() {
        let id = ids(2);
        with_adder(|adder| {
            adder.add(id, 1);
            with_adder(|inner| {
                assert!(inner.0.is_none(), "the thread's words are in use");
                inner.add(id, 10);
                inner.add_f64(id + 1, 0.25);
            });
            adder.add_f64(id + 1, 0.5);
        });
        let sums = Sums::now();
        assert_eq!(sums.u64(id), 11);
        assert!((sums.f64(id + 1) - 0.75).abs() < f64::EPSILON);
    }
}
