//! Where tenants and their upstreams are looked up.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::upstream::{TenantEntry, TenantRecord};
use crate::at_rest::{Kek, OpenedBy, SEALED_AUTHORIZATION};
use crate::tenant::TenantId;

/// Why the directory could not answer or change. The message is logged, never sent to
/// clients; [`source`](std::error::Error::source) is the underlying error when there is one.
#[derive(Debug, Clone)]
pub struct DirectoryError {
    message: Arc<str>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl DirectoryError {
    /// An error with a message for the logs.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: Arc::from(message.into()),
            source: None,
        }
    }

    /// An error with a message for the logs, caused by `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: Arc::from(message.into()),
            source: Some(Arc::new(source)),
        }
    }
}

impl fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DirectoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// The future a [`TenantDirectory`] returns: the tenant's upstreams, `None` for a tenant that
/// is not onboarded, or an error when the directory cannot answer.
pub type DirectoryFuture =
    Pin<Box<dyn Future<Output = Result<Option<TenantRecord>, DirectoryError>> + Send>>;

/// Answers which upstreams a tenant has.
///
/// Asynchronous and assuming nothing in-process, so a shared database can stand behind it.
/// The routing layer caches the answers; any `Fn(TenantId) -> impl Future<Output =
/// Result<Option<TenantRecord>, DirectoryError>>` is a directory:
///
/// ```
/// use tower_fhir::route::{DirectoryError, TenantDirectory, TenantRecord, Upstream};
/// use tower_fhir::version::FhirVersion;
///
/// let directory = |tenant: tower_fhir::tenant::TenantId| async move {
///     let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
///     Ok::<_, DirectoryError>(TenantRecord::new([upstream]))
/// };
/// # fn is_directory(_: impl TenantDirectory) {}
/// is_directory(directory);
/// ```
pub trait TenantDirectory: Send + Sync + 'static {
    /// Looks a tenant up.
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture;
}

impl<F, Fut> TenantDirectory for F
where
    F: Fn(TenantId) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<TenantRecord>, DirectoryError>> + Send + 'static,
{
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
        Box::pin(self(tenant))
    }
}

/// The future a [`TenantStore`] change or listing returns.
pub type TenantStoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, DirectoryError>> + Send>>;

/// The future of [`TenantStore::records`], which may borrow the store.
pub type TenantStoreBorrowingFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, DirectoryError>> + Send + 'a>>;

/// Held by a writer from checking a tenant change against the other tenants to writing it
/// (see [`TenantStore::lock_writes`]); let go when dropped.
#[must_use = "the lock is let go when dropped"]
pub struct TenantWriteLock(Option<Box<dyn Send + Sync>>);

impl TenantWriteLock {
    /// A lock that holds nothing: for a store that only one process writes, whose writers
    /// take turns by themselves.
    pub fn in_process() -> Self {
        Self(None)
    }

    /// A lock that holds `guard` until dropped (a database session holding a lock, say).
    pub fn holding(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }
}

impl fmt::Debug for TenantWriteLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantWriteLock")
            .field("holding", &self.0.is_some())
            .finish()
    }
}

/// A [`TenantDirectory`] that can be changed: onboarding, replacing and removing tenants, as
/// an admin API or a bootstrap does.
///
/// Every change is announced on [`changes`](Self::changes) once it is visible to lookups, so a
/// [`RouteCache`](super::RouteCache) that follows it forgets that tenant's route at once.
/// Methods are async and assume nothing in-process, so a shared database can implement the
/// trait; [`InMemoryDirectory`] and [`FileDirectory`] do.
///
/// ```
/// use std::sync::Arc;
/// use tower_fhir::route::{InMemoryDirectory, TenantStore, TenantRecord, Upstream};
/// use tower_fhir::tenant::TenantId;
/// use tower_fhir::version::FhirVersion;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store: Arc<dyn TenantStore> = Arc::new(InMemoryDirectory::new());
/// let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
/// let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
/// let mut changes = store.changes();
///
/// let replaced = store.put(tenant, TenantRecord::new([upstream]).unwrap()).await.unwrap();
/// assert!(!replaced);
/// assert_eq!(changes.recv().await.unwrap(), tenant);
/// assert!(store.lookup(tenant).await.unwrap().is_some());
/// assert_eq!(store.list().await.unwrap(), vec![tenant]);
/// assert!(store.delete(tenant).await.unwrap());
/// assert!(store.lookup(tenant).await.unwrap().is_none());
/// # });
/// ```
pub trait TenantStore: TenantDirectory {
    /// Adds or replaces a tenant; resolves to whether it replaced one.
    fn put(&self, tenant: TenantId, upstreams: TenantRecord) -> TenantStoreFuture<bool>;

    /// Adds or replaces many tenants at once (one write where the store can).
    fn put_all(&self, tenants: Vec<(TenantId, TenantRecord)>) -> TenantStoreFuture<()>;

    /// Removes a tenant; resolves to whether it was there.
    fn delete(&self, tenant: TenantId) -> TenantStoreFuture<bool>;

    /// Every tenant, sorted.
    fn list(&self) -> TenantStoreFuture<Vec<TenantId>>;

    /// A page of [`list`](Self::list): the tenants after `after` (every one for `None`;
    /// `after` need not be a tenant, so a page after one removed meanwhile still works), at
    /// most `limit` of them (every one for `None`), in [`TenantId`]'s order (the order of
    /// their text, lower-case and hyphenated), each once. Paging on, each page's last tenant
    /// the next one's `after`, gives the tenants [`list`](Self::list) gives, in that order
    /// (a tenant added or removed meanwhile is in a page or not according to where it falls):
    /// what the gateway's `GET /admin/tenants?limit=...&after=...` reads.
    ///
    /// The default reads the whole [`list`](Self::list) and keeps the page; a store that can
    /// read one page should override it (the PostgreSQL store reads only the page, in the
    /// order of its key).
    ///
    /// ```
    /// use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantStore, Upstream};
    /// use tower_fhir::tenant::TenantId;
    /// use tower_fhir::version::FhirVersion;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryDirectory::new();
    /// let ids = [
    ///     "0b5e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f",
    ///     "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
    ///     "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f",
    /// ];
    /// let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4).unwrap();
    /// for id in ids {
    ///     let record = TenantRecord::new([upstream.clone()]).unwrap();
    ///     store.put(TenantId::parse(id).unwrap(), record).await.unwrap();
    /// }
    /// let [first, second, third] = ids.map(|id| TenantId::parse(id).unwrap());
    ///
    /// // Pages of two: the first, then the rest after its last tenant.
    /// assert_eq!(store.list_after(None, Some(2)).await.unwrap(), [first, second]);
    /// assert_eq!(store.list_after(Some(second), Some(2)).await.unwrap(), [third]);
    /// // No limit: every tenant after; `after` need not be a tenant.
    /// let gone = TenantId::parse("5a000000-0000-4000-8000-000000000000").unwrap();
    /// assert_eq!(store.list_after(Some(gone), None).await.unwrap(), [third]);
    /// assert_eq!(store.list_after(None, None).await.unwrap(), store.list().await.unwrap());
    /// # });
    /// ```
    fn list_after(
        &self,
        after: Option<TenantId>,
        limit: Option<usize>,
    ) -> TenantStoreFuture<Vec<TenantId>> {
        let listed = self.list();
        Box::pin(async move { Ok(page_of(listed.await?, after, limit)) })
    }

    /// Which of `tenants` the store holds: what the gateway's admin API reads to show the
    /// tenants a client may get tokens for that are not onboarded. The default reads the whole
    /// [`list`](Self::list); the in-memory, file and PostgreSQL stores look up only those asked
    /// for (a page of clients of a directory of 50,000 tenants would otherwise read all 50,000).
    ///
    /// ```
    /// use tower_fhir::route::{InMemoryDirectory, TenantRecord, TenantStore, Upstream};
    /// use tower_fhir::tenant::TenantId;
    /// use tower_fhir::version::FhirVersion;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = InMemoryDirectory::new();
    /// let [held, unknown] = ["4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f"]
    ///     .map(|id| TenantId::parse(id).unwrap());
    /// let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4).unwrap();
    /// store.put(held, TenantRecord::new([upstream]).unwrap()).await.unwrap();
    ///
    /// let present = store.present(vec![held, unknown, held]).await.unwrap();
    /// assert_eq!(present, [held].into());
    /// assert!(store.present(Vec::new()).await.unwrap().is_empty());
    /// # });
    /// ```
    fn present(&self, tenants: Vec<TenantId>) -> TenantStoreFuture<HashSet<TenantId>> {
        if tenants.is_empty() {
            return Box::pin(std::future::ready(Ok(HashSet::new())));
        }
        let listed = self.list();
        Box::pin(async move {
            let asked: HashSet<TenantId> = tenants.into_iter().collect();
            Ok(listed
                .await?
                .into_iter()
                .filter(|tenant| asked.contains(tenant))
                .collect())
        })
    }

    /// Every tenant with its record, in [`list`](Self::list)'s order: what a check against
    /// all of them reads (the admin API's, that no two tenants' upstream bases nest). The
    /// default lists them, then looks each up (a tenant removed meanwhile is left out); a store
    /// that can read them at once should (the PostgreSQL store reads them in one query, not a
    /// round trip each: 50,000 tenants took 10 s).
    fn records(&self) -> TenantStoreBorrowingFuture<'_, Vec<(TenantId, TenantRecord)>> {
        Box::pin(async move {
            let mut records = Vec::new();
            for tenant in self.list().await? {
                if let Some(record) = self.lookup(tenant).await? {
                    records.push((tenant, record));
                }
            }
            Ok(records)
        })
    }

    /// The tenants that change from now on. A tenant may be announced more than once for one
    /// change (the PostgreSQL store announces one it heard of again once it has read its
    /// version), never not at all: a cache that follows it forgets the tenant each time.
    fn changes(&self) -> broadcast::Receiver<TenantId>;

    /// Takes the lock a writer holds from checking a change against the other tenants (two
    /// upstream bases nested, say) to writing it, so that two such changes, from any process,
    /// cannot each pass a check the other breaks.
    ///
    /// The default holds nothing: enough for a store that one process writes, if its writers
    /// take turns (the gateway's admin API does). A store several processes write should
    /// override it, as [`PgTenantStore`](crate::postgres::PgTenantStore) does.
    fn lock_writes(&self) -> TenantStoreFuture<TenantWriteLock> {
        Box::pin(std::future::ready(Ok(TenantWriteLock::in_process())))
    }
}

/// Every tenant of `tenants`, sorted (by their text, as the files list them).
fn sorted(mut tenants: Vec<TenantId>) -> Vec<TenantId> {
    tenants.sort_by_key(|t| t.to_string());
    tenants
}

/// The page [`TenantStore::list_after`] gives of `tenants` (in any order, repeats allowed).
/// ([`TenantId`]'s order is their text's: the bytes of a GUID in order, each two hex digits.)
fn page_of(
    mut tenants: Vec<TenantId>,
    after: Option<TenantId>,
    limit: Option<usize>,
) -> Vec<TenantId> {
    if let Some(after) = after {
        tenants.retain(|tenant| *tenant > after);
    }
    tenants.sort_unstable();
    tenants.dedup();
    if let Some(limit) = limit {
        tenants.truncate(limit);
    }
    tenants
}

/// The list of tenants of a directory's JSON: `{"tenants": [...]}` or just the list.
fn tenant_list(mut file: serde_json::Value) -> serde_json::Value {
    match file.get_mut("tenants") {
        Some(tenants) => tenants.take(),
        None => file,
    }
}

/// The key-encryption key a [`FileDirectory`] seals the credentials with, and the credentials
/// as sealed in its file, kept to be written again while they are unchanged: a write seals
/// only what changed (a fresh nonce each), not every credential again.
struct Sealing {
    kek: Kek,
    /// The sealed text of each credential in the file, by tenant, base URL and credential.
    written: Mutex<SealedCredentials>,
}

/// Sealed credentials as written in a directory file: by tenant, upstream base URL and the
/// credential in clear, the text (base64) that seals it.
type SealedCredentials = HashMap<(TenantId, String, String), String>;

/// A directory file, read and its sealed credentials opened; nothing written.
struct FileRead {
    memory: InMemoryDirectory,
    existed: bool,
    /// The tenants holding a credential in clear while a key is given (to seal).
    in_clear: usize,
    /// The tenants holding a credential that only the key's previous key opens (to seal
    /// again with the key).
    previous: usize,
    sealed: SealedCredentials,
}

/// Reads the directory file in `path` (an empty directory when there is none), each sealed
/// credential opened with `kek`; writes and creates nothing. Refused: a file that is not a
/// directory's JSON, a sealed credential without a key or that the key does not open, an upstream
/// holding its credential both in clear and sealed.
fn read_file(path: &Path, kek: Option<&Kek>) -> Result<FileRead, DirectoryError> {
    let unreadable = |e: &dyn fmt::Display| DirectoryError::new(format!("{}: {e}", path.display()));
    let bytes = match crate::persist::read_if_exists(path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Ok(FileRead {
                memory: InMemoryDirectory::new(),
                existed: false,
                in_clear: 0,
                previous: 0,
                sealed: HashMap::new(),
            })
        }
        Err(e) => {
            return Err(DirectoryError::with_source(
                format!("{}: {e}", path.display()),
                e,
            ))
        }
    };
    let file: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(&format!("directory JSON: {e}")))?;
    let mut list = tenant_list(file);
    let (mut in_clear, mut previous) = (0, 0);
    let mut sealed = HashMap::new();
    for entry in list.as_array_mut().into_iter().flatten() {
        let id = entry
            .get("id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let tenant = id.as_deref().and_then(|id| TenantId::parse(id).ok());
        let (mut clear, mut stale) = (false, false);
        for upstream in crate::at_rest::upstreams_of(entry) {
            let Some(tenant) = tenant else {
                if upstream.contains_key(SEALED_AUTHORIZATION) {
                    return Err(unreadable(&format!(
                        "tenant {:?} is not a tenant id, and holds a sealed credential",
                        id.as_deref().unwrap_or("")
                    )));
                }
                // (Refused below, as any entry that is not a tenant.)
                continue;
            };
            match crate::at_rest::open_upstream(kek, tenant, upstream)
                .map_err(|e| unreadable(&e))?
            {
                // Not kept to be written again: sealed anew with the key.
                Some(opened) if opened.by == OpenedBy::Previous => stale = true,
                Some(opened) => {
                    sealed.insert((tenant, opened.base_url, opened.credential), opened.sealed);
                }
                None => clear |= upstream.get("authorization").is_some_and(|v| !v.is_null()),
            }
        }
        if clear && kek.is_some() {
            in_clear += 1;
        }
        previous += usize::from(stale);
    }
    Ok(FileRead {
        memory: InMemoryDirectory::from_value(list).map_err(|e| unreadable(&e))?,
        existed: true,
        in_clear,
        previous,
        sealed,
    })
}

/// A directory held in memory, updated at run time; clones share the same tenants.
///
/// Every change is announced to [`subscribe`](Self::subscribe)rs, so route caches (see
/// [`RouteCache::follow`](super::RouteCache::follow)) drop what they knew of that tenant.
#[derive(Clone)]
pub struct InMemoryDirectory {
    tenants: Arc<RwLock<HashMap<TenantId, TenantRecord>>>,
    changes: broadcast::Sender<TenantId>,
}

impl Default for InMemoryDirectory {
    fn default() -> Self {
        Self {
            tenants: Arc::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl InMemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory from JSON: `{"tenants": [{"id": "<guid>", "upstreams": [{"base_url": ...,
    /// "fhir_version": "3.0", "authorization": ..., "timeout_ms": ...}], "rate_limit":
    /// {"requests_per_second": ..., "burst": ...}}]}` (or just the list; `rate_limit` is
    /// optional), each tenant a [`TenantEntry`]: proxied (`upstreams`) or served in-process
    /// (`"in_process": {"key": ..., "fhir_versions": [...]}`).
    pub fn from_json(json: &str) -> Result<Self, DirectoryError> {
        let file: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| DirectoryError::new(format!("directory JSON: {e}")))?;
        Self::from_value(tenant_list(file))
    }

    /// A directory from the list of tenants of [`from_json`](Self::from_json)'s JSON.
    fn from_value(list: serde_json::Value) -> Result<Self, DirectoryError> {
        let error = |e: serde_json::Error| DirectoryError::new(format!("directory JSON: {e}"));
        let entries = Vec::<TenantEntry>::deserialize(list).map_err(error)?;
        let directory = Self::new();
        for entry in entries {
            directory.upsert(entry.id, entry.record);
        }
        Ok(directory)
    }

    /// A directory loaded from a JSON file (see [`from_json`](Self::from_json)).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, DirectoryError> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| DirectoryError::new(format!("{}: {e}", path.display())))?;
        Self::from_json(&json)
    }

    /// Adds or replaces a tenant.
    pub fn upsert(&self, tenant: TenantId, upstreams: TenantRecord) {
        self.write().insert(tenant, upstreams);
        let _ = self.changes.send(tenant);
    }

    /// Removes a tenant; returns whether it was there.
    pub fn remove(&self, tenant: TenantId) -> bool {
        let removed = self.write().remove(&tenant).is_some();
        let _ = self.changes.send(tenant);
        removed
    }

    /// A tenant's upstreams.
    pub fn get(&self, tenant: TenantId) -> Option<TenantRecord> {
        self.tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&tenant)
            .cloned()
    }

    /// The tenants, in no particular order.
    pub fn tenants(&self) -> Vec<TenantId> {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        tenants.keys().copied().collect()
    }

    /// A stream of the tenants that change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TenantId> {
        self.changes.subscribe()
    }

    /// The page [`TenantStore::list_after`] gives: only the tenants after `after` copied out
    /// of the lock, and only the first `limit` of those sorted.
    fn page(&self, after: Option<TenantId>, limit: Option<usize>) -> Vec<TenantId> {
        let mut page: Vec<TenantId> = {
            let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
            tenants
                .keys()
                .filter(|tenant| after.is_none_or(|after| **tenant > after))
                .copied()
                .collect()
        };
        if let Some(limit) = limit.filter(|limit| *limit < page.len()) {
            // The `limit` least first (in no order), the rest after them.
            page.select_nth_unstable(limit);
            page.truncate(limit);
        }
        page.sort_unstable();
        page
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TenantId, TenantRecord>> {
        self.tenants.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TenantDirectory for InMemoryDirectory {
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
        let found = self.get(tenant);
        Box::pin(std::future::ready(Ok(found)))
    }
}

impl TenantStore for InMemoryDirectory {
    fn put(&self, tenant: TenantId, upstreams: TenantRecord) -> TenantStoreFuture<bool> {
        let replaced = self.write().insert(tenant, upstreams).is_some();
        let _ = self.changes.send(tenant);
        Box::pin(std::future::ready(Ok(replaced)))
    }

    fn put_all(&self, tenants: Vec<(TenantId, TenantRecord)>) -> TenantStoreFuture<()> {
        for (tenant, upstreams) in tenants {
            self.upsert(tenant, upstreams);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete(&self, tenant: TenantId) -> TenantStoreFuture<bool> {
        Box::pin(std::future::ready(Ok(self.remove(tenant))))
    }

    fn list(&self) -> TenantStoreFuture<Vec<TenantId>> {
        Box::pin(std::future::ready(Ok(sorted(self.tenants()))))
    }

    /// Without copying or sorting the tenants before `after`, nor sorting those past the page.
    fn list_after(
        &self,
        after: Option<TenantId>,
        limit: Option<usize>,
    ) -> TenantStoreFuture<Vec<TenantId>> {
        Box::pin(std::future::ready(Ok(self.page(after, limit))))
    }

    /// Each looked up under one read lock, the others not copied.
    fn present(&self, tenants: Vec<TenantId>) -> TenantStoreFuture<HashSet<TenantId>> {
        let held = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        let present = tenants
            .into_iter()
            .filter(|tenant| held.contains_key(tenant))
            .collect();
        Box::pin(std::future::ready(Ok(present)))
    }

    fn changes(&self) -> broadcast::Receiver<TenantId> {
        self.subscribe()
    }
}

impl fmt::Debug for InMemoryDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryDirectory")
            .field(
                "tenants",
                &self
                    .tenants
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len(),
            )
            .finish()
    }
}

/// A directory kept in a JSON file, so tenants onboarded, changed or removed at run time stay
/// that way across restarts.
///
/// Lookups are served from memory (an [`InMemoryDirectory`] inside); every change is written
/// to the file first (atomically, owner-readable only: upstream credentials are in it) and
/// then made visible and announced to [`subscribe`](Self::subscribe)rs. The file has the
/// format [`InMemoryDirectory::from_json`] reads. One process owns the file.
///
/// Opened with a key-encryption key (`open_sealed`, the `seal` feature), the upstreams'
/// credentials are sealed in the file (`authorization_sealed`, as the PostgreSQL store seals
/// them) rather than in clear.
///
/// ```
/// use tower_fhir::route::{FileDirectory, TenantRecord, Upstream};
/// use tower_fhir::tenant::TenantId;
/// use tower_fhir::version::FhirVersion;
///
/// let path = std::env::temp_dir().join(format!("tower-fhir-doc-{}.json", std::process::id()));
/// # let _ = std::fs::remove_file(&path);
/// let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
/// let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
///
/// let directory = FileDirectory::open(&path).unwrap();
/// assert!(!directory.existed());
/// directory.upsert(tenant, TenantRecord::new([upstream]).unwrap()).unwrap();
///
/// let reopened = FileDirectory::open(&path).unwrap();
/// assert!(reopened.existed());
/// assert!(reopened.get(tenant).is_some());
/// # std::fs::remove_file(&path).unwrap();
/// ```
#[derive(Clone)]
pub struct FileDirectory {
    memory: InMemoryDirectory,
    path: Arc<PathBuf>,
    /// Held while a change is written, so changes reach the file in order.
    writing: Arc<Mutex<()>>,
    existed: bool,
    /// Seals the credentials written (opened with `open_sealed`).
    sealing: Option<Arc<Sealing>>,
}

#[derive(Serialize)]
struct FileOut<'a> {
    tenants: Vec<EntryOut<'a>>,
}

/// One tenant as written in a directory file: its [`TenantEntry`], borrowed.
struct EntryOut<'a> {
    id: TenantId,
    record: &'a TenantRecord,
}

impl<'a> EntryOut<'a> {
    fn new(id: TenantId, record: &'a TenantRecord) -> Self {
        Self { id, record }
    }
}

impl Serialize for EntryOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        super::upstream::entry_fields(self.id, self.record).serialize(serializer)
    }
}

impl FileDirectory {
    /// Opens the directory in `path`; an empty one when the file does not exist yet (it is
    /// created at the first change; the directory it is in is made now if need be).
    ///
    /// A file holding a sealed credential (written by `open_sealed`) is refused: it opens only
    /// with the key it was sealed with (and a build without the `seal` feature opens none).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DirectoryError> {
        Self::open_with(path.as_ref(), None)
    }

    /// What [`open`](Self::open) would refuse of the file in `path`, found by reading it
    /// alone: nothing is written nor created (a file that does not exist is fine). A file
    /// holding a sealed credential is refused, as `open` refuses it.
    ///
    /// ```
    /// use tower_fhir::route::FileDirectory;
    ///
    /// let path = std::env::temp_dir().join(format!("tower-fhir-check-{}.json", std::process::id()));
    /// std::fs::write(&path, r#"{"tenants": [{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
    ///     "upstreams": [{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "4.0",
    ///                    "authorization_sealed": "c2VhbGVk"}]}]}"#).unwrap();
    /// let refused = FileDirectory::check(&path).unwrap_err();
    /// assert!(refused.to_string().contains("TOWER_FHIR_KEY_ENCRYPTION_KEY"), "{refused}");
    /// std::fs::remove_file(&path).unwrap();
    /// assert!(FileDirectory::check(&path).is_ok(), "no file: nothing to refuse");
    /// assert!(!path.exists());
    /// ```
    pub fn check(path: impl AsRef<Path>) -> Result<(), DirectoryError> {
        read_file(path.as_ref(), None).map(drop)
    }

    /// [`open`](Self::open), the upstreams' credentials sealed in the file with `kek`
    /// (AES-256-GCM, each bound to its tenant and upstream base URL, as the PostgreSQL store
    /// seals them: a sealed credential copied to another tenant or upstream opens for none).
    /// Credentials found in clear (a file written without the key) are sealed at once: the
    /// file is written again. One sealed with another key is an error (nothing is written),
    /// never a tenant without its credential. A change seals only the credentials it changes:
    /// the others are written as they were.
    ///
    /// ```
    /// use tower_fhir::route::{FileDirectory, TenantRecord, Upstream};
    /// use tower_fhir::seal::KeyEncryptionKey;
    /// use tower_fhir::tenant::TenantId;
    /// use tower_fhir::version::FhirVersion;
    ///
    /// let path = std::env::temp_dir().join(format!("tower-fhir-sealed-{}.json", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// let kek = KeyEncryptionKey::from_base64("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").unwrap();
    /// let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
    /// let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4)
    ///     .unwrap()
    ///     .with_authorization("Bearer upstream-secret")
    ///     .unwrap();
    ///
    /// let directory = FileDirectory::open_sealed(&path, kek.clone()).unwrap();
    /// directory.upsert(tenant, TenantRecord::new([upstream]).unwrap()).unwrap();
    /// assert!(!std::fs::read_to_string(&path).unwrap().contains("upstream-secret"));
    ///
    /// let reopened = FileDirectory::open_sealed(&path, kek).unwrap();
    /// let record = reopened.get(tenant).unwrap();
    /// assert_eq!(record.upstreams()[0].authorization().unwrap(), "Bearer upstream-secret");
    /// // Without the key, the file does not open.
    /// assert!(FileDirectory::open(&path).is_err());
    /// # std::fs::remove_file(&path).unwrap();
    /// ```
    #[cfg(feature = "seal")]
    #[cfg_attr(docsrs, doc(cfg(feature = "seal")))]
    pub fn open_sealed(
        path: impl AsRef<Path>,
        kek: crate::seal::KeyEncryptionKey,
    ) -> Result<Self, DirectoryError> {
        Self::open_with(path.as_ref(), Some(kek))
    }

    /// What [`open_sealed`](Self::open_sealed) would refuse of the file in `path` with `kek`
    /// (a sealed credential the key does not open, above all), found by reading it alone:
    /// nothing is written nor created, and credentials in clear are left so. To try a key on
    /// a state before anything is sealed with it.
    ///
    /// ```
    /// use tower_fhir::route::{FileDirectory, TenantRecord, Upstream};
    /// use tower_fhir::seal::KeyEncryptionKey;
    /// use tower_fhir::tenant::TenantId;
    /// use tower_fhir::version::FhirVersion;
    ///
    /// let path = std::env::temp_dir().join(format!("tower-fhir-check-sealed-{}.json", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// let kek = KeyEncryptionKey::from_base64("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").unwrap();
    /// let other = KeyEncryptionKey::from_base64("YW5vdGhlci1rZXktZW5jcnlwdGlvbi1rZXktMzJieXQ=").unwrap();
    /// let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4)
    ///     .unwrap()
    ///     .with_authorization("Bearer upstream-secret")
    ///     .unwrap();
    /// FileDirectory::open_sealed(&path, kek.clone())
    ///     .unwrap()
    ///     .upsert(TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap(), TenantRecord::new([upstream]).unwrap())
    ///     .unwrap();
    /// let written = std::fs::read(&path).unwrap();
    ///
    /// assert!(FileDirectory::check_sealed(&path, &kek).is_ok());
    /// let refused = FileDirectory::check_sealed(&path, &other).unwrap_err();
    /// assert!(refused.to_string().contains("the wrong key"), "{refused}");
    /// assert_eq!(std::fs::read(&path).unwrap(), written);
    /// # std::fs::remove_file(&path).unwrap();
    /// ```
    #[cfg(feature = "seal")]
    #[cfg_attr(docsrs, doc(cfg(feature = "seal")))]
    pub fn check_sealed(
        path: impl AsRef<Path>,
        kek: &crate::seal::KeyEncryptionKey,
    ) -> Result<(), DirectoryError> {
        read_file(path.as_ref(), Some(kek)).map(drop)
    }

    fn open_with(path: &Path, kek: Option<Kek>) -> Result<Self, DirectoryError> {
        crate::persist::make_parent(path)
            .map_err(|e| DirectoryError::with_source(format!("{}: {e}", path.display()), e))?;
        let read = read_file(path, kek.as_ref())?;
        let had_sealed = !read.sealed.is_empty() || read.previous > 0;
        let directory = Self {
            memory: read.memory,
            path: Arc::new(path.to_path_buf()),
            writing: Arc::default(),
            existed: read.existed,
            sealing: kek.map(|kek| {
                Arc::new(Sealing {
                    kek,
                    written: Mutex::new(read.sealed),
                })
            }),
        };
        if read.in_clear > 0 || read.previous > 0 {
            let _writing = directory
                .writing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            directory.write_with(None, None)?;
        }
        if read.previous > 0 {
            tracing::info!(
                file = %directory.path.display(),
                tenants = read.previous,
                "upstream credentials sealed with the previous key-encryption key sealed again with the key"
            );
        }
        if read.in_clear > 0 {
            if had_sealed {
                // Beside sealed ones: written by hand, or copied in. The sealing keeps them
                // secret; it does not say who put them there.
                tracing::warn!(
                    file = %directory.path.display(),
                    tenants = read.in_clear,
                    "upstream credentials found in clear in a file that held sealed ones (written there by hand, or by a gateway without the key-encryption key): sealed now; check that they are yours"
                );
            } else {
                tracing::info!(
                    file = %directory.path.display(),
                    tenants = read.in_clear,
                    "upstream credentials found in clear sealed with the key-encryption key"
                );
            }
        }
        Ok(directory)
    }

    /// Whether the file existed when the directory was opened (so a first start can seed it).
    pub fn existed(&self) -> bool {
        self.existed
    }

    /// The file the directory lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds or replaces a tenant: written to the file, then visible and announced.
    pub fn upsert(&self, tenant: TenantId, upstreams: TenantRecord) -> Result<(), DirectoryError> {
        self.replace(tenant, upstreams).map(drop)
    }

    /// [`upsert`](Self::upsert), telling whether the tenant was there before.
    fn replace(&self, tenant: TenantId, upstreams: TenantRecord) -> Result<bool, DirectoryError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let replaced = self.memory.get(tenant).is_some();
        self.write_with(Some((tenant, &upstreams)), None)?;
        self.memory.upsert(tenant, upstreams);
        Ok(replaced)
    }

    /// Adds or replaces many tenants with one write of the file (onboarding thousands of
    /// tenants one [`upsert`](Self::upsert) at a time would rewrite it thousands of times).
    pub fn upsert_all(
        &self,
        tenants: impl IntoIterator<Item = (TenantId, TenantRecord)>,
    ) -> Result<(), DirectoryError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let tenants: HashMap<TenantId, TenantRecord> = tenants.into_iter().collect();
        {
            let current = self
                .memory
                .tenants
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let mut entries: Vec<EntryOut<'_>> = current
                .iter()
                .filter(|(id, _)| !tenants.contains_key(id))
                .chain(tenants.iter())
                .map(|(id, upstreams)| EntryOut::new(*id, upstreams))
                .collect();
            entries.sort_by_key(|e| e.id.to_string());
            self.write_entries(entries)?;
        }
        for (tenant, upstreams) in tenants {
            self.memory.upsert(tenant, upstreams);
        }
        Ok(())
    }

    /// Removes a tenant; returns whether it was there.
    pub fn remove(&self, tenant: TenantId) -> Result<bool, DirectoryError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.memory.get(tenant).is_none() {
            return Ok(false);
        }
        self.write_with(None, Some(tenant))?;
        Ok(self.memory.remove(tenant))
    }

    /// A tenant's upstreams.
    pub fn get(&self, tenant: TenantId) -> Option<TenantRecord> {
        self.memory.get(tenant)
    }

    /// The tenants, in no particular order.
    pub fn tenants(&self) -> Vec<TenantId> {
        self.memory.tenants()
    }

    /// A stream of the tenants that change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TenantId> {
        self.memory.subscribe()
    }

    /// Writes the directory as it will be after the change.
    fn write_with(
        &self,
        upsert: Option<(TenantId, &TenantRecord)>,
        remove: Option<TenantId>,
    ) -> Result<(), DirectoryError> {
        let tenants = self
            .memory
            .tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut entries: Vec<EntryOut<'_>> = tenants
            .iter()
            .filter(|(id, _)| Some(**id) != remove && upsert.is_none_or(|(t, _)| t != **id))
            .map(|(id, upstreams)| EntryOut::new(*id, upstreams))
            .chain(upsert.map(|(id, upstreams)| EntryOut::new(id, upstreams)))
            .collect();
        entries.sort_by_key(|e| e.id.to_string());
        self.write_entries(entries)
    }

    fn write_entries(&self, entries: Vec<EntryOut<'_>>) -> Result<(), DirectoryError> {
        let failed =
            |e: &dyn fmt::Display| DirectoryError::new(format!("{}: {e}", self.path.display()));
        let Some(sealing) = &self.sealing else {
            let bytes =
                serde_json::to_vec_pretty(&FileOut { tenants: entries }).map_err(|e| failed(&e))?;
            return crate::persist::write_atomically(&self.path, &bytes).map_err(|e| {
                DirectoryError::with_source(format!("{}: {e}", self.path.display()), e)
            });
        };
        // Held to the end of the write: what it keeps is what the file holds.
        let mut written = sealing
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut now = SealedCredentials::new();
        let mut tenants = Vec::with_capacity(entries.len());
        for entry in &entries {
            let mut json = serde_json::to_value(entry).map_err(|e| failed(&e))?;
            for upstream in crate::at_rest::upstreams_of(&mut json) {
                let sealed = crate::at_rest::seal_upstream(
                    &sealing.kek,
                    entry.id,
                    upstream,
                    |base, credential| {
                        written
                            .get(&(entry.id, base.to_owned(), credential.to_owned()))
                            .cloned()
                    },
                )
                .map_err(|e| failed(&e))?;
                if let Some(sealed) = sealed {
                    now.insert(
                        (entry.id, sealed.base_url, sealed.credential),
                        sealed.sealed,
                    );
                }
            }
            tenants.push(json);
        }
        let bytes = serde_json::to_vec_pretty(&serde_json::json!({ "tenants": tenants }))
            .map_err(|e| failed(&e))?;
        crate::persist::write_atomically(&self.path, &bytes)
            .map_err(|e| DirectoryError::with_source(format!("{}: {e}", self.path.display()), e))?;
        *written = now;
        Ok(())
    }
}

/// Runs a blocking file change on tokio's blocking pool: a write and its `fsync` must not stall
/// the async workers serving requests.
fn blocking<T: Send + 'static>(
    change: impl FnOnce() -> Result<T, DirectoryError> + Send + 'static,
) -> TenantStoreFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(change)
            .await
            .unwrap_or_else(|e| {
                Err(DirectoryError::new(format!(
                    "a directory write failed: {e}"
                )))
            })
    })
}

/// Writes go to the file on tokio's blocking pool (so build and use it within a tokio runtime).
impl TenantStore for FileDirectory {
    fn put(&self, tenant: TenantId, upstreams: TenantRecord) -> TenantStoreFuture<bool> {
        let this = self.clone();
        blocking(move || this.replace(tenant, upstreams))
    }

    fn put_all(&self, tenants: Vec<(TenantId, TenantRecord)>) -> TenantStoreFuture<()> {
        let this = self.clone();
        blocking(move || this.upsert_all(tenants))
    }

    fn delete(&self, tenant: TenantId) -> TenantStoreFuture<bool> {
        let this = self.clone();
        blocking(move || this.remove(tenant))
    }

    fn list(&self) -> TenantStoreFuture<Vec<TenantId>> {
        Box::pin(std::future::ready(Ok(sorted(self.tenants()))))
    }

    /// From memory, as [`InMemoryDirectory`] pages (the file is not read).
    fn list_after(
        &self,
        after: Option<TenantId>,
        limit: Option<usize>,
    ) -> TenantStoreFuture<Vec<TenantId>> {
        self.memory.list_after(after, limit)
    }

    /// From memory, as [`InMemoryDirectory`] looks them up.
    fn present(&self, tenants: Vec<TenantId>) -> TenantStoreFuture<HashSet<TenantId>> {
        self.memory.present(tenants)
    }

    fn changes(&self) -> broadcast::Receiver<TenantId> {
        self.subscribe()
    }
}

impl TenantDirectory for FileDirectory {
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
        self.memory.lookup(tenant)
    }
}

impl fmt::Debug for FileDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDirectory")
            .field("path", &self.path)
            .field(
                "tenants",
                &self
                    .memory
                    .tenants
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::FhirVersion;

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

    #[cfg(feature = "seal")]
    mod sealed {
        use super::*;
        use crate::route::Upstream;
        use crate::seal::KeyEncryptionKey;

        const B: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";

        fn kek(byte: u8) -> KeyEncryptionKey {
            use base64::Engine;
            KeyEncryptionKey::from_base64(
                &base64::engine::general_purpose::STANDARD.encode([byte; 32]),
            )
            .unwrap()
        }

        fn record(base: &str, credential: &str) -> TenantRecord {
            let upstream = Upstream::parse(base, FhirVersion::R4)
                .unwrap()
                .with_authorization(credential)
                .unwrap();
            TenantRecord::new([upstream]).unwrap()
        }

        fn file(name: &str) -> PathBuf {
            let path = std::env::temp_dir().join(format!(
                "tower-fhir-sealed-dir-{name}-{}.json",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&path);
            path
        }

        /// The directory at `path`, sealed with `kek(1)`, holding tenant A with a credential.
        fn sealed_with_a(path: &Path) -> FileDirectory {
            let directory = FileDirectory::open_sealed(path, kek(1)).unwrap();
            directory
                .upsert(
                    TenantId::parse(A).unwrap(),
                    record("http://127.0.0.1:9001/fhir", "Bearer a-secret"),
                )
                .unwrap();
            directory
        }

        fn credential(directory: &FileDirectory, tenant: &str) -> String {
            let record = directory.get(TenantId::parse(tenant).unwrap()).unwrap();
            let upstream = record.default_upstream().unwrap();
            upstream
                .authorization()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        }

        /// The sealed text of each tenant's first upstream's credential in the file.
        fn sealed_in(path: &Path) -> HashMap<String, String> {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            json["tenants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|entry| {
                    let sealed = &entry["upstreams"][0][SEALED_AUTHORIZATION];
                    let sealed = sealed.as_str().expect("sealed").to_owned();
                    (entry["id"].as_str().unwrap().to_owned(), sealed)
                })
                .collect()
        }

        #[test]
        fn a_changed_key_seals_again_what_only_its_previous_key_opens() {
            let path = file("change-key");
            let (a, b) = (TenantId::parse(A).unwrap(), TenantId::parse(B).unwrap());
            let old = sealed_with_a(&path);
            old.upsert(b, record("http://127.0.0.1:9002/fhir", "Bearer b-secret"))
                .unwrap();
            let by_old = sealed_in(&path);
            drop(old);

            let changing = kek(2).with_previous(kek(1));
            FileDirectory::check_sealed(&path, &changing).unwrap();
            assert_eq!(sealed_in(&path), by_old, "a check writes nothing");
            let directory = FileDirectory::open_sealed(&path, changing.clone()).unwrap();
            let by_new = sealed_in(&path);
            assert!(by_new
                .values()
                .all(|text| !by_old.values().any(|o| o == text)));
            assert_eq!(credential(&directory, A), "Bearer a-secret");
            // Written again as they are now: no credential sealed with the old key comes back.
            directory
                .upsert(a, record("http://127.0.0.1:9001/fhir", "Bearer a-rotated"))
                .unwrap();
            assert_eq!(sealed_in(&path)[B], by_new[B]);
            drop(directory);

            // The new key alone opens the file; the old one no longer does.
            let reopened = FileDirectory::open_sealed(&path, kek(2)).unwrap();
            assert_eq!(credential(&reopened, A), "Bearer a-rotated");
            assert_eq!(credential(&reopened, B), "Bearer b-secret");
            let refused = FileDirectory::check_sealed(&path, &kek(1)).unwrap_err();
            assert!(refused.to_string().contains("the wrong key"), "{refused}");
            // Opened with the pair again: nothing to seal again, nothing written.
            let unchanged = sealed_in(&path);
            FileDirectory::open_sealed(&path, changing).unwrap();
            assert_eq!(sealed_in(&path), unchanged);
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn a_write_seals_only_the_credentials_it_changes() {
            let path = file("unchanged");
            let (a, b) = (TenantId::parse(A).unwrap(), TenantId::parse(B).unwrap());
            let directory = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            directory
                .upsert(a, record("http://127.0.0.1:9001/fhir", "Bearer a-secret"))
                .unwrap();
            let first = sealed_in(&path);
            directory
                .upsert(b, record("http://127.0.0.1:9002/fhir", "Bearer b-secret"))
                .unwrap();
            let second = sealed_in(&path);
            assert_eq!(second[A], first[A], "A unchanged: written as it was");

            // A's credential changed: sealed anew; B's kept.
            directory
                .upsert(a, record("http://127.0.0.1:9001/fhir", "Bearer a-rotated"))
                .unwrap();
            let third = sealed_in(&path);
            assert_ne!(third[A], second[A]);
            assert_eq!(third[B], second[B]);
            // A's upstream moved: sealed anew (bound to the base URL).
            directory
                .upsert(a, record("http://127.0.0.1:9003/fhir", "Bearer a-rotated"))
                .unwrap();
            let fourth = sealed_in(&path);
            assert_ne!(fourth[A], third[A]);

            // Reopened: what the file holds is kept too.
            let reopened = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(
                sealed_in(&path),
                fourth,
                "nothing in clear: not written again"
            );
            reopened.remove(a).unwrap();
            assert_eq!(sealed_in(&path)[B], fourth[B]);
            assert_eq!(credential(&reopened, B), "Bearer b-secret");
            let again = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(credential(&again, B), "Bearer b-secret");
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn a_credential_both_in_clear_and_sealed_is_refused() {
            let path = file("both");
            sealed_with_a(&path);
            let mut json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            json["tenants"][0]["upstreams"][0]["authorization"] = "Bearer planted".into();
            let both = serde_json::to_vec(&json).unwrap();
            std::fs::write(&path, &both).unwrap();
            for refused in [
                FileDirectory::open_sealed(&path, kek(1)).err().unwrap(),
                FileDirectory::check_sealed(&path, &kek(1)).unwrap_err(),
                FileDirectory::open(&path).err().unwrap(),
            ] {
                let refused = refused.to_string();
                assert!(refused.contains("both in clear"), "{refused}");
                assert!(refused.contains(A), "{refused}");
            }
            assert_eq!(std::fs::read(&path).unwrap(), both, "nothing written");
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn a_check_writes_nothing() {
            let path = file("check");
            // No file: fine, and none made (nor its directory).
            let missing = path.with_extension("d").join("tenants.json");
            assert!(FileDirectory::check_sealed(&missing, &kek(1)).is_ok());
            assert!(FileDirectory::check(&missing).is_ok());
            assert!(!missing.parent().unwrap().exists());

            // In clear: a key finds nothing to refuse, and seals nothing.
            FileDirectory::open(&path)
                .unwrap()
                .upsert(
                    TenantId::parse(A).unwrap(),
                    record("http://127.0.0.1:9001/fhir", "Bearer a-secret"),
                )
                .unwrap();
            let clear = std::fs::read(&path).unwrap();
            FileDirectory::check_sealed(&path, &kek(1)).unwrap();
            FileDirectory::check(&path).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), clear);

            // Sealed: refused without the key and with another, said so; nothing written.
            std::fs::remove_file(&path).unwrap();
            FileDirectory::open_sealed(&path, kek(1))
                .unwrap()
                .upsert(
                    TenantId::parse(A).unwrap(),
                    record("http://127.0.0.1:9001/fhir", "Bearer a-secret"),
                )
                .unwrap();
            let sealed = std::fs::read(&path).unwrap();
            FileDirectory::check_sealed(&path, &kek(1)).unwrap();
            let refused = FileDirectory::check(&path).unwrap_err().to_string();
            assert!(refused.contains("no key-encryption key"), "{refused}");
            let refused = FileDirectory::check_sealed(&path, &kek(2))
                .unwrap_err()
                .to_string();
            assert!(refused.contains("the wrong key"), "{refused}");
            assert!(refused.contains(&path.display().to_string()), "{refused}");
            assert_eq!(std::fs::read(&path).unwrap(), sealed);
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn credentials_are_sealed_in_the_file_and_open_with_their_key() {
            let path = file("round-trip");
            let directory = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            let a = TenantId::parse(A).unwrap();
            directory
                .upsert(a, record("http://127.0.0.1:9001/fhir", "Bearer a-secret"))
                .unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("a-secret"), "{text}");
            assert!(text.contains(SEALED_AUTHORIZATION), "{text}");

            let reopened = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(credential(&reopened, A), "Bearer a-secret");
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                text,
                "nothing in clear: not written again"
            );
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn credentials_in_clear_are_sealed_at_open() {
            let path = file("clear");
            let clear = FileDirectory::open(&path).unwrap();
            clear
                .upsert(
                    TenantId::parse(A).unwrap(),
                    record("http://127.0.0.1:9001/fhir", "Bearer a-secret"),
                )
                .unwrap();
            assert!(std::fs::read_to_string(&path).unwrap().contains("a-secret"));

            let sealed = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(credential(&sealed, A), "Bearer a-secret");
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("a-secret"), "sealed at open: {text}");
            assert!(text.contains(SEALED_AUTHORIZATION), "{text}");
            let again = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(credential(&again, A), "Bearer a-secret");
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn a_sealed_file_does_not_open_without_its_key() {
            let path = file("refused");
            sealed_with_a(&path);
            let sealed_text = std::fs::read_to_string(&path).unwrap();

            let refused = FileDirectory::open(&path).unwrap_err().to_string();
            assert!(
                refused.contains(crate::at_rest::KEY_ENV),
                "no key: {refused}"
            );
            let refused = FileDirectory::open_sealed(&path, kek(2))
                .unwrap_err()
                .to_string();
            assert!(refused.contains("does not open"), "wrong key: {refused}");
            assert!(
                refused.contains(crate::at_rest::KEY_ENV),
                "wrong key: {refused}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                sealed_text,
                "a refused open writes nothing"
            );
            std::fs::remove_file(&path).unwrap();
        }

        #[test]
        fn a_sealed_credential_copied_to_another_tenant_or_upstream_does_not_open() {
            let path = file("copied");
            let directory = sealed_with_a(&path);
            directory
                .upsert(
                    TenantId::parse(B).unwrap(),
                    record("http://127.0.0.1:9002/fhir", "Bearer b-secret"),
                )
                .unwrap();
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let sealed_a = json["tenants"][0]["upstreams"][0][SEALED_AUTHORIZATION].clone();
            assert!(sealed_a.is_string(), "{json}");

            // A's credential given to B.
            let mut copied = json.clone();
            copied["tenants"][1]["upstreams"][0][SEALED_AUTHORIZATION] = sealed_a;
            std::fs::write(&path, serde_json::to_vec(&copied).unwrap()).unwrap();
            let refused = FileDirectory::open_sealed(&path, kek(1)).unwrap_err();
            assert!(refused.to_string().contains(B), "{refused}");

            // A's credential kept, its upstream moved to another base URL.
            let mut moved = json.clone();
            moved["tenants"][0]["upstreams"][0]["base_url"] = "http://127.0.0.1:9003/fhir".into();
            std::fs::write(&path, serde_json::to_vec(&moved).unwrap()).unwrap();
            let refused = FileDirectory::open_sealed(&path, kek(1)).unwrap_err();
            assert!(refused.to_string().contains(A), "{refused}");

            std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
            let opened = FileDirectory::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(credential(&opened, B), "Bearer b-secret");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[tokio::test]
    async fn loads_json_and_updates_at_run_time() {
        let json = format!(
            r#"{{"tenants": [{{"id": "{}", "upstreams": [{{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "1.0"}}]}}]}}"#,
            A.to_uppercase()
        );
        let directory = InMemoryDirectory::from_json(&json).unwrap();
        let tenant = TenantId::parse(A).unwrap();
        let found = directory.lookup(tenant).await.unwrap().unwrap();
        assert_eq!(
            found.default_upstream().unwrap().fhir_version(),
            FhirVersion::Dstu2
        );
        assert_eq!(
            found.rate_limit(),
            None,
            "a tenant without rate_limit reads as before"
        );
        let limited = InMemoryDirectory::from_json(&format!(
            r#"[{{"id": "{A}", "rate_limit": {{"requests_per_second": 5, "burst": 10}},
                 "upstreams": [{{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0"}}]}}]"#
        ))
        .unwrap();
        let found = limited.get(tenant).unwrap();
        assert_eq!(found.rate_limit(), crate::limit::RateLimit::new(5, 10).ok());

        let mut changes = directory.subscribe();
        assert!(directory.remove(tenant));
        assert_eq!(changes.recv().await.unwrap(), tenant);
        assert!(directory.lookup(tenant).await.unwrap().is_none());
    }

    /// A tenant made of `n` (spread over the id's first and last bytes, so that the order of
    /// the ids is not the order of `n`).
    fn numbered(n: u32) -> TenantId {
        let spread = n.wrapping_mul(0x9E37_79B9);
        TenantId::parse(&format!("{spread:08x}-0000-4000-8000-{n:012x}")).unwrap()
    }

    fn record() -> TenantRecord {
        let upstream =
            crate::route::Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::R4).unwrap();
        TenantRecord::new([upstream]).unwrap()
    }

    /// A store whose `list` gives its tenants unsorted, some twice: `list_after` is the
    /// trait's default.
    struct Unsorted(InMemoryDirectory);

    impl TenantDirectory for Unsorted {
        fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
            self.0.lookup(tenant)
        }
    }

    impl TenantStore for Unsorted {
        fn put(&self, tenant: TenantId, upstreams: TenantRecord) -> TenantStoreFuture<bool> {
            self.0.put(tenant, upstreams)
        }
        fn put_all(&self, tenants: Vec<(TenantId, TenantRecord)>) -> TenantStoreFuture<()> {
            self.0.put_all(tenants)
        }
        fn delete(&self, tenant: TenantId) -> TenantStoreFuture<bool> {
            self.0.delete(tenant)
        }
        fn list(&self) -> TenantStoreFuture<Vec<TenantId>> {
            let mut listed = self.0.tenants();
            listed.extend(self.0.tenants().into_iter().step_by(3));
            listed.reverse();
            Box::pin(std::future::ready(Ok(listed)))
        }
        fn changes(&self) -> broadcast::Receiver<TenantId> {
            self.0.changes()
        }
    }

    /// Every page of `store` (after nothing, each tenant, ids between and beyond them; limits
    /// none, 0 to 3 and past the end) is `list`'s sorted tenants after `after`, the first
    /// `limit`; and pages of 1 to 4, each after the last's last tenant, make up `list`.
    async fn pages_agree_with_the_list(store: &dyn TenantStore, expected: &[TenantId]) {
        let mut sorted_list = store.list().await.unwrap();
        sorted_list.sort_unstable();
        sorted_list.dedup();
        assert_eq!(sorted_list, expected);
        let between = (0..40).map(|n| numbered(1000 + n));
        let edges = [
            TenantId::parse("00000000-0000-0000-0000-000000000000").unwrap(),
            TenantId::parse("ffffffff-ffff-ffff-ffff-ffffffffffff").unwrap(),
        ];
        let afters = std::iter::once(None).chain(
            expected
                .iter()
                .copied()
                .chain(between)
                .chain(edges)
                .map(Some),
        );
        for after in afters {
            for limit in [None, Some(0), Some(1), Some(2), Some(3), Some(1000)] {
                let page = store.list_after(after, limit).await.unwrap();
                let wanted: Vec<TenantId> = expected
                    .iter()
                    .copied()
                    .filter(|tenant| after.is_none_or(|after| *tenant > after))
                    .take(limit.unwrap_or(usize::MAX))
                    .collect();
                assert_eq!(page, wanted, "after {after:?}, limit {limit:?}");
            }
        }
        for size in 1..=4 {
            let (mut walked, mut after) = (Vec::new(), None);
            loop {
                let page = store.list_after(after, Some(size)).await.unwrap();
                walked.extend_from_slice(&page);
                match page.last() {
                    Some(last) if page.len() == size => after = Some(*last),
                    _ => break,
                }
            }
            assert_eq!(walked, expected, "pages of {size}");
        }
    }

    #[tokio::test]
    async fn the_default_page_is_the_sorted_list_without_repeats_after_after() {
        let store = Unsorted(InMemoryDirectory::new());
        assert!(store.list_after(None, Some(2)).await.unwrap().is_empty());
        let mut expected: Vec<TenantId> = (0..11).map(numbered).collect();
        for tenant in &expected {
            store.put(*tenant, record()).await.unwrap();
        }
        expected.sort_unstable();
        assert_ne!(
            store.list().await.unwrap(),
            expected,
            "the list is unsorted, with repeats"
        );
        pages_agree_with_the_list(&store, &expected).await;
        // TenantId's order is the order of the ids' text.
        let by_text = sorted(expected.clone());
        assert_eq!(by_text, expected);
    }

    #[tokio::test]
    async fn in_memory_and_file_directories_page_as_the_default_does() {
        let memory = InMemoryDirectory::new();
        assert!(memory.list_after(None, None).await.unwrap().is_empty());
        let path =
            std::env::temp_dir().join(format!("tower-fhir-dir-pages-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = FileDirectory::open(&path).unwrap();
        let mut expected: Vec<TenantId> = (0..13).map(numbered).collect();
        memory
            .put_all(expected.iter().map(|t| (*t, record())).collect())
            .await
            .unwrap();
        file.put_all(expected.iter().map(|t| (*t, record())).collect())
            .await
            .unwrap();
        expected.sort_unstable();
        pages_agree_with_the_list(&memory, &expected).await;
        pages_agree_with_the_list(&file, &expected).await;
        // A tenant removed: a page after it goes on from the next one.
        let removed = expected.remove(5);
        assert!(file.delete(removed).await.unwrap());
        assert_eq!(
            file.list_after(Some(removed), Some(2)).await.unwrap(),
            expected[5..7]
        );
        pages_agree_with_the_list(&file, &expected).await;
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_files_are_errors() {
        for bad in [
            "not json",
            r#"{"tenants": [{"id": "nope", "upstreams": []}]}"#,
            r#"[{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "upstreams": []}]"#,
            r#"[{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "upstreams": [{"base_url": "http://a", "fhir_version": "9.0"}]}]"#,
            r#"[{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "upstreams": [{"base_url": "http://a", "fhir_version": "3.0"}], "rate_limit": {"requests_per_second": 0}}]"#,
        ] {
            assert!(InMemoryDirectory::from_json(bad).is_err(), "{bad}");
        }
        assert!(InMemoryDirectory::from_json_file("/nonexistent/tenants.json").is_err());
    }

    #[tokio::test]
    async fn a_file_directory_keeps_changes_across_reopening() {
        let path = std::env::temp_dir().join(format!("tower-fhir-dir-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let tenant = TenantId::parse(A).unwrap();
        let other = TenantId::parse("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f").unwrap();
        let upstreams = |url: &str| {
            TenantRecord::new([crate::route::Upstream::parse(url, FhirVersion::Stu3)
                .unwrap()
                .with_authorization("Bearer upstream-secret")
                .unwrap()])
            .unwrap()
        };
        let directory = FileDirectory::open(&path).unwrap();
        let mut changes = directory.subscribe();
        directory
            .upsert(tenant, upstreams("http://127.0.0.1:9001/fhir"))
            .unwrap();
        directory
            .upsert(other, upstreams("http://127.0.0.1:9002/fhir"))
            .unwrap();
        directory
            .upsert(tenant, upstreams("http://127.0.0.1:9003/fhir"))
            .unwrap();
        assert!(directory.remove(other).unwrap());
        assert!(!directory.remove(other).unwrap());
        assert_eq!(changes.recv().await.unwrap(), tenant);

        let limit = crate::limit::RateLimit::new(2, 4).unwrap();
        let limited = upstreams("http://127.0.0.1:9003/fhir").with_rate_limit(Some(limit));
        directory.upsert(tenant, limited).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(
            written.contains(r#""rate_limit": {"#),
            "next to the upstreams: {written}"
        );

        let local = crate::route::InProcessTenant::new("schema_b", [FhirVersion::R4]).unwrap();
        directory
            .upsert(other, TenantRecord::in_process(local.clone()))
            .unwrap();
        let reopened = FileDirectory::open(&path).unwrap();
        assert_eq!(
            reopened.get(other).unwrap().in_process_tenant(),
            Some(&local),
            "an in-process tenant is kept like any other"
        );
        assert!(reopened.remove(other).unwrap());

        let reopened = FileDirectory::open(&path).unwrap();
        assert_eq!(reopened.tenants(), vec![tenant]);
        assert_eq!(reopened.get(tenant).unwrap().rate_limit(), Some(limit));
        let found = reopened.lookup(tenant).await.unwrap().unwrap();
        assert_eq!(
            found.default_upstream().unwrap().base().to_string(),
            "http://127.0.0.1:9003/fhir"
        );
        assert!(reopened.lookup(other).await.unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
        assert!(
            FileDirectory::open("/proc/version").is_err(),
            "not a directory file"
        );
    }
}
