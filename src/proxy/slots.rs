//! Per-upstream concurrency limits: the slots a request to an upstream with
//! `max_concurrency` takes, one semaphore per base URL and limit.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::hot_cache::HotCache;
use crate::route::Upstream;

/// How many distinct limited upstreams (base URL and limit) are kept. An upstream with no
/// request in flight is the first to make room, and forgetting it loses nothing.
const CAPACITY: usize = 10_000;

/// The semaphores of the upstreams with a `max_concurrency`, shared by every clone of the
/// proxy. Keyed by the base URL and the limit, not by the `Upstream` value: the routing
/// cache re-reads upstreams from the directory, and each read is a new value of the same
/// server, which must find the same count (neither reset nor doubled). A changed limit is
/// another key: new requests count against it at once, while those in flight finish on the
/// old one.
pub(super) struct Slots {
    semaphores: HotCache<(Arc<str>, u32), Slot>,
}

#[derive(Clone)]
struct Slot {
    max: u32,
    semaphore: Arc<Semaphore>,
}

/// Why no slot was given.
#[derive(Debug)]
pub(super) struct Busy;

impl Slots {
    pub(super) fn new() -> Self {
        Self {
            semaphores: HotCache::new(CAPACITY),
        }
    }

    /// A slot of `upstream` (none needed when it has no limit), waiting at most `wait` for one.
    pub(super) async fn acquire(
        &self,
        upstream: &Upstream,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, Busy> {
        let Some(max) = upstream.max_concurrency() else {
            return Ok(None);
        };
        let semaphore = self.semaphore(upstream, max);
        // Without waiting first: the common case, a free slot.
        if let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() {
            return Ok(Some(permit));
        }
        match tokio::time::timeout(wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            // Timed out (a semaphore is never closed here).
            _ => Err(Busy),
        }
    }

    fn semaphore(&self, upstream: &Upstream, max: NonZeroU32) -> Arc<Semaphore> {
        let max = max.get();
        let key = (Arc::clone(upstream.base().shared_text()), max);
        let hash = self.semaphores.hash(&key);
        if let Some(slot) = self.semaphores.get(hash, &key) {
            return slot.semaphore;
        }
        self.semaphores
            .update(
                hash,
                key,
                |kept| match kept {
                    Some(kept) => kept.clone(),
                    None => Slot {
                        max,
                        semaphore: Arc::new(Semaphore::new(max as usize)),
                    },
                },
                |kept| kept.semaphore.available_permits() == kept.max as usize,
            )
            .semaphore
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::FhirVersion;

    fn upstream(base: &str, max: u32) -> Upstream {
        Upstream::parse(base, FhirVersion::R4)
            .unwrap()
            .with_max_concurrency(NonZeroU32::new(max).unwrap())
    }

    #[tokio::test]
    async fn one_count_per_server_however_often_it_is_read() {
        let slots = Slots::new();
        let wait = Duration::from_millis(20);
        let first = slots
            .acquire(&upstream("http://a/fhir", 1), wait)
            .await
            .unwrap();
        assert!(first.is_some());
        // The same server read anew from the directory: the same count.
        assert!(slots
            .acquire(&upstream("http://a/fhir", 1), wait)
            .await
            .is_err());
        // Another server, or no limit: not counted with it.
        assert!(slots
            .acquire(&upstream("http://b/fhir", 1), wait)
            .await
            .is_ok());
        let free = Upstream::parse("http://a/fhir", FhirVersion::R4).unwrap();
        assert!(slots.acquire(&free, wait).await.unwrap().is_none());
        // A changed limit counts anew.
        assert!(slots
            .acquire(&upstream("http://a/fhir", 2), wait)
            .await
            .is_ok());
        // A slot given back lets the next one in.
        drop(first);
        assert!(slots
            .acquire(&upstream("http://a/fhir", 1), wait)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn a_waiting_request_gets_the_slot_when_it_is_freed() {
        let slots = Arc::new(Slots::new());
        let limited = upstream("http://a/fhir", 1);
        let held = slots
            .acquire(&limited, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        let waiting = {
            let (slots, limited) = (Arc::clone(&slots), limited.clone());
            tokio::spawn(async move { slots.acquire(&limited, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(held);
        assert!(waiting.await.unwrap().unwrap().is_some());
    }
}
