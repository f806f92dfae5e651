//! Client authentication under the throttle, shared by the token grant and secret rotation.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{header, HeaderValue, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::client::{self, unix_now, ClientRecord, ClientStore, StoreError};
use super::error::{ErrorCode, TokenError};
use super::throttle::{Attempt, FailureCounts, Refusal, Source, Throttle, ThrottlePolicy};
use crate::tenant::TenantId;

/// How many secret checks run at once, and how long one waits for room.
#[derive(Debug, Clone, Copy)]
pub(super) struct HashingLimit {
    pub(super) concurrency: usize,
    pub(super) wait: Duration,
}

impl Default for HashingLimit {
    /// The number of CPUs; 2 s.
    fn default() -> Self {
        Self {
            concurrency: std::thread::available_parallelism().map_or(2, usize::from),
            wait: Duration::from_secs(2),
        }
    }
}

/// Checks clients' secrets against their store, under the failure throttle.
pub(super) struct Authenticator {
    /// The client store.
    pub(super) store: Box<dyn ClientStore>,
    throttle: Arc<Throttle>,
    /// Failures counted across processes too, if anywhere.
    shared: Option<Box<dyn FailureCounts>>,
    /// Room for the checks running at once, and how long to wait for it.
    hashing: Arc<Semaphore>,
    hashing_wait: Duration,
    /// The threads the checks run on, as many as the room.
    hashers: HashingThreads,
    /// A hash checked for unknown and revoked clients, made on first need.
    dummy_hash: OnceLock<String>,
}

/// Why a throttled authentication gave no client.
pub(super) enum Denied {
    /// The id is blocked for this source for this long.
    Blocked(Duration),
    /// Other checks of the id (or of the source) took too long to make room; nothing failed.
    Busy,
    /// Every hashing slot stayed taken for the whole wait; nothing failed.
    Overloaded,
    /// The secret is wrong (or the client unknown or revoked).
    Failed,
    /// The store failed (logged).
    StoreFailed(StoreError),
}

/// An authentication admitted under the throttle: report how it went through
/// [`Authenticator::failed`] or [`Authenticator::succeeded`]; dropped, it counts as neither.
pub(super) struct Admitted {
    attempt: Attempt,
    source: Source,
    /// Whether the shared counts held failures or blocks when it was admitted (a success
    /// then clears them).
    shared_counted: bool,
}

/// A client whose secret was right when it was checked.
pub(super) struct Authenticated {
    /// The client as the store had it before the check, narrowed to `tenant`
    /// ([`ClientStore::client_for_tenant`]).
    record: ClientRecord,
    /// The tenant the request is for, if it names one.
    tenant: Option<TenantId>,
    /// The hash its secret matched.
    matched: String,
    /// When (Unix seconds) the secrets were looked up.
    at: u64,
}

impl Authenticated {
    /// The hash (PHC form) the secret matched.
    pub(super) fn matched(&self) -> &str {
        &self.matched
    }
}

impl Denied {
    /// The RFC 6749 answer: 429 while blocked, 503 when busy, 401 `invalid_client` for a wrong
    /// secret (with `challenge`, the `WWW-Authenticate: Basic` value, when the client used
    /// Basic), 503 when the store failed.
    pub(super) fn into_error(self, challenge: Option<&HeaderValue>) -> TokenError {
        match self {
            Self::Blocked(wait) => too_many(wait),
            Self::Busy => busy(),
            Self::Overloaded => overloaded(),
            Self::Failed => TokenError::invalid_client("Client authentication failed", challenge),
            Self::StoreFailed(_) => TokenError::store_unavailable(),
        }
    }
}

impl Authenticator {
    pub(super) fn new(
        store: Box<dyn ClientStore>,
        policy: ThrottlePolicy,
        hashing: HashingLimit,
        shared: Option<Box<dyn FailureCounts>>,
    ) -> Self {
        Self {
            store,
            throttle: Arc::new(Throttle::new(policy)),
            shared,
            hashing: Arc::new(Semaphore::new(
                hashing.concurrency.min(Semaphore::MAX_PERMITS),
            )),
            hashing_wait: hashing.wait,
            hashers: HashingThreads::new(hashing.concurrency),
            dummy_hash: OnceLock::new(),
        }
    }

    /// A place under the throttle for an authentication of `id` from `from` that is not a
    /// secret check (a client assertion): report its outcome on the [`Attempt`].
    pub(super) async fn admit(&self, id: &str, from: Option<IpAddr>) -> Result<Admitted, Denied> {
        let source = Source::of(from);
        let attempt = self
            .throttle
            .admit(id, source)
            .await
            .map_err(|refusal| match refusal {
                Refusal::Blocked(wait) => Denied::Blocked(wait),
                Refusal::Busy => Denied::Busy,
            })?;
        let shared_counted = match &self.shared {
            None => false,
            Some(shared) => match shared
                .standing(id, &source.to_string(), self.throttle.policy())
                .await
            {
                Ok(standing) => match standing.blocked_for {
                    Some(wait) => return Err(Denied::Blocked(wait)),
                    None => standing.failures > 0 || standing.blocks > 0,
                },
                Err(error) => {
                    return Err(Denied::StoreFailed(StoreError::new(format!(
                        "the shared failure counts cannot be read: {error}"
                    ))))
                }
            },
        };
        Ok(Admitted {
            attempt,
            source,
            shared_counted,
        })
    }

    /// Counts a failed authentication, here and in the shared counts; the block it starts,
    /// if it starts one (the longer of the two).
    pub(super) async fn failed(&self, admitted: Admitted, id: &str) -> Option<Duration> {
        // Counted in the shared counts while this check still holds its place, so a parallel
        // check of the id waits for the count.
        let shared = match &self.shared {
            None => None,
            Some(shared) => {
                let source = admitted.source.to_string();
                match shared.failed(id, &source, self.throttle.policy()).await {
                    Ok(block) => block,
                    Err(error) => {
                        tracing::error!(client_id = %super::LoggedId(id), %error, "a failed authentication could not be counted across replicas");
                        None
                    }
                }
            }
        };
        let local = admitted.attempt.failed();
        shared.max(local)
    }

    /// A successful authentication: clears the id's failures from its source, here and (if
    /// it had any) in the shared counts.
    pub(super) async fn succeeded(&self, admitted: Admitted, id: &str) {
        if admitted.shared_counted {
            if let Some(shared) = &self.shared {
                if let Err(error) = shared.succeeded(id, &admitted.source.to_string()).await {
                    tracing::error!(client_id = %super::LoggedId(id), %error, "a success could not clear the failures counted across replicas");
                }
            }
        }
        admitted.attempt.succeeded();
    }

    /// [`authenticate`](Self::authenticate) under the throttle: refused while the id is
    /// blocked for the request's source address (`from`; `None` when the server did not say),
    /// waiting while parallel checks of it could use up its allowance, a wrong secret counted.
    /// The client is read narrowed to `tenant`, the tenant the request is for
    /// ([`ClientStore::client_for_tenant`]). `doing` names the request in the log.
    pub(super) async fn authenticate_throttled(
        &self,
        id: &str,
        secret: &str,
        tenant: Option<TenantId>,
        from: Option<IpAddr>,
        doing: &'static str,
    ) -> Result<Authenticated, Denied> {
        let admitted = self.admit(id, from).await?;
        // Room to hash: taken before the store is read, given back when the hash ends.
        let slot = match tokio::time::timeout(
            self.hashing_wait,
            Arc::clone(&self.hashing).acquire_owned(),
        )
        .await
        {
            Ok(Ok(slot)) => slot,
            _ => {
                tracing::warn!(client_id = %super::LoggedId(id), "secret checks are all busy; answering 503");
                return Err(Denied::Overloaded);
            }
        };
        match self.authenticate(id, secret, tenant, admitted, slot).await {
            Ok((Some(client), admitted)) => {
                self.succeeded(admitted, id).await;
                Ok(client)
            }
            Ok((None, admitted)) => {
                let from = from.map(|ip| ip.to_canonical());
                tracing::info!(client_id = %super::LoggedId(id), from = ?from, "{doing}: client authentication failed");
                if let Some(wait) = self.failed(admitted, id).await {
                    tracing::warn!(client_id = %super::LoggedId(id), from = ?from, block = ?wait, "too many failed authentications from this address; refusing it for a while");
                }
                Err(Denied::Failed)
            }
            Err(err) => {
                tracing::error!(error = %err, "client store failed");
                Err(Denied::StoreFailed(err))
            }
        }
    }

    /// The client as it is now, if it is still what `checked` found: not revoked, and the
    /// secret that matched still one of its own (live when it was checked: a grace period that
    /// ends during the check does not undo it). A check takes a while (the hash), and the store
    /// may have changed meanwhile; run this right before issuing anything, so that nothing is
    /// issued after a revocation or a rotation returned.
    pub(super) async fn recheck(
        &self,
        checked: &Authenticated,
    ) -> Result<Option<ClientRecord>, StoreError> {
        let current = self
            .store
            .client_for_tenant(&checked.record.id, checked.tenant)
            .await?;
        Ok(current.filter(|record| {
            !record.revoked
                && record
                    .live_secrets(checked.at)
                    .any(|h| h.phc == checked.matched)
        }))
    }

    /// The client (narrowed to `tenant`) and the hash its secret matched, if the secret is one
    /// of its live ones, and the `attempt` back. Unknown and revoked clients are checked
    /// against a dummy hash, so every failure costs the same Argon2 work. The attempt goes
    /// along into the hashing and is dropped with it if this future is (a client that hangs
    /// up cannot free its place while its hash still runs).
    async fn authenticate(
        &self,
        id: &str,
        secret: &str,
        tenant: Option<TenantId>,
        attempt: Admitted,
        slot: OwnedSemaphorePermit,
    ) -> Result<(Option<Authenticated>, Admitted), StoreError> {
        let record = self.store.client_for_tenant(id, tenant).await?;
        let now = unix_now();
        let mut hashes: Vec<String> = record
            .as_ref()
            .filter(|r| !r.revoked)
            .map(|r| r.live_secrets(now).map(|h| h.phc.clone()).collect())
            .unwrap_or_default();
        let known = !hashes.is_empty();
        if !known {
            hashes.push(self.dummy_hash()?);
        }
        let secret = secret.to_owned();
        let (matched, attempt) = self
            .hashers
            .run(move || {
                // Check every hash so the time does not tell which one matched.
                let matched = hashes.into_iter().fold(None, |found, phc| {
                    let ok = client::verify(&secret, &phc);
                    found.or(ok.then_some(phc))
                });
                drop(slot);
                (matched, attempt)
            })
            .await?;
        let authenticated = record
            .zip(matched)
            .filter(|_| known)
            .map(|(record, matched)| Authenticated {
                record,
                tenant,
                matched,
                at: now,
            });
        Ok((authenticated, attempt))
    }

    fn dummy_hash(&self) -> Result<String, StoreError> {
        if let Some(hash) = self.dummy_hash.get() {
            return Ok(hash.clone());
        }
        let hash = self.store.hashing().hash(client::new_secret().expose())?;
        Ok(self.dummy_hash.get_or_init(|| hash).clone())
    }
}

fn too_many(wait: Duration) -> TokenError {
    // Round up so a client waiting `Retry-After` seconds is never refused again.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    TokenError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TemporarilyUnavailable,
        "Too many failed authentications for this client from this address; retry later",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))
}

type HashJob = Box<dyn FnOnce() + Send>;

/// A fixed set of threads for secret checks, started on first use.
///
/// Each check takes megabytes (Argon2's memory): on tokio's blocking pool they would run on
/// whichever of its many threads is free, and the allocator keeps freed memory per thread,
/// so a flood of checks would leave the process holding megabytes per pool thread. A few
/// threads of its own, as many as checks may run at once, keep that to a few blocks.
struct HashingThreads {
    count: usize,
    jobs: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>>,
}

impl HashingThreads {
    fn new(count: usize) -> Self {
        Self {
            count: count.max(1),
            jobs: OnceLock::new(),
        }
    }

    fn sender(&self) -> &std::sync::Mutex<std::sync::mpsc::Sender<HashJob>> {
        self.jobs.get_or_init(|| {
            let (sender, receiver) = std::sync::mpsc::channel::<HashJob>();
            let receiver = Arc::new(std::sync::Mutex::new(receiver));
            for n in 0..self.count {
                let receiver = Arc::clone(&receiver);
                let spawned = std::thread::Builder::new()
                    .name(format!("tower-fhir-hash-{n}"))
                    .spawn(move || loop {
                        // The lock is held only while waiting: one thread takes each job.
                        let job = receiver
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        match job {
                            // A panicking check loses its answer, not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            // The endpoint is gone.
                            Err(_) => break,
                        }
                    });
                if let Err(error) = spawned {
                    tracing::error!(%error, "could not start a secret-checking thread");
                }
            }
            std::sync::Mutex::new(sender)
        })
    }

    /// Runs `work` on one of the threads.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move || {
            let _ = done.send(work());
        });
        self.sender()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job)
            .map_err(|_| StoreError::new("the secret-checking threads stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::new("a secret check failed"))
    }
}

fn overloaded() -> TokenError {
    TokenError::unavailable(
        "The token endpoint is busy checking other clients' secrets; retry shortly",
    )
}

fn busy() -> TokenError {
    TokenError::unavailable(
        "Other authentications of this client or from this address are still being checked; retry shortly",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{InMemoryClientStore, NewClient, SecretHashing};

    #[tokio::test]
    async fn a_check_that_finds_no_room_in_time_is_503_and_counts_nothing() {
        let store = InMemoryClientStore::with_hashing(SecretHashing::new(64, 1).unwrap());
        let secret = store
            .register(NewClient::new("app").secret("a-secret-of-16-chars-or-more"))
            .await
            .unwrap();
        let limit = HashingLimit {
            concurrency: 1,
            wait: Duration::from_millis(50),
        };
        // One failure would block the id: a refusal for want of room must not count as one.
        let policy = ThrottlePolicy {
            max_failures: 1,
            ..ThrottlePolicy::default()
        };
        let auth = Authenticator::new(Box::new(store), policy, limit, None);
        // Every slot taken: the check waits 50 ms, then gives up.
        let held = Arc::clone(&auth.hashing).acquire_owned().await.unwrap();
        let denied = auth
            .authenticate_throttled("app", secret.expose(), None, None, "test")
            .await
            .err()
            .expect("no room");
        assert!(matches!(denied, Denied::Overloaded));
        let error = denied.into_error(None).into_response();
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.headers()[header::RETRY_AFTER], "1");
        // With the slot free again the same secret works: the refusal counted no failure.
        drop(held);
        assert!(auth
            .authenticate_throttled("app", secret.expose(), None, None, "test")
            .await
            .is_ok());
    }
}
