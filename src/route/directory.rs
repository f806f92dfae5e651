//! Where tenants and their upstreams are looked up.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;
use tokio::sync::broadcast;

use super::upstream::TenantUpstreams;
use crate::tenant::TenantId;

/// Why the directory could not answer. The message is logged, never sent to clients.
#[derive(Debug, Clone)]
pub struct DirectoryError {
    message: Arc<str>,
}

impl DirectoryError {
    /// An error with a message for the logs.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: Arc::from(message.into()),
        }
    }
}

impl fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DirectoryError {}

/// The future a [`TenantDirectory`] returns: the tenant's upstreams, `None` for a tenant that
/// is not onboarded, or an error when the directory cannot answer.
pub type DirectoryFuture =
    Pin<Box<dyn Future<Output = Result<Option<TenantUpstreams>, DirectoryError>> + Send>>;

/// Answers which upstreams a tenant has.
///
/// Asynchronous and assuming nothing in-process, so a shared database can stand behind it.
/// The routing layer caches the answers; any `Fn(TenantId) -> impl Future<Output =
/// Result<Option<TenantUpstreams>, DirectoryError>>` is a directory:
///
/// ```
/// use tower_fhir::route::{DirectoryError, TenantDirectory, TenantUpstreams, Upstream};
/// use tower_fhir::version::FhirVersion;
///
/// let directory = |tenant: tower_fhir::tenant::TenantId| async move {
///     let upstream = Upstream::parse("http://127.0.0.1:9001/fhir", FhirVersion::Stu3).unwrap();
///     Ok::<_, DirectoryError>(TenantUpstreams::new([upstream]))
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
    Fut: Future<Output = Result<Option<TenantUpstreams>, DirectoryError>> + Send + 'static,
{
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
        Box::pin(self(tenant))
    }
}

/// A directory held in memory, updated at run time; clones share the same tenants.
///
/// Every change is announced to [`subscribe`](Self::subscribe)rs, so route caches (see
/// [`RouteCache::follow`](super::RouteCache::follow)) drop what they knew of that tenant.
#[derive(Clone)]
pub struct InMemoryDirectory {
    tenants: Arc<RwLock<HashMap<TenantId, TenantUpstreams>>>,
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

/// One tenant as written in a directory file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    id: TenantId,
    upstreams: TenantUpstreams,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DirectoryFile {
    Wrapped { tenants: Vec<TenantEntry> },
    List(Vec<TenantEntry>),
}

impl InMemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory from JSON: `{"tenants": [{"id": "<guid>", "upstreams": [{"base_url": ...,
    /// "fhir_version": "3.0", "authorization": ..., "timeout_ms": ...}]}]}` (or just the list).
    pub fn from_json(json: &str) -> Result<Self, DirectoryError> {
        let file: DirectoryFile = serde_json::from_str(json)
            .map_err(|e| DirectoryError::new(format!("directory JSON: {e}")))?;
        let entries = match file {
            DirectoryFile::Wrapped { tenants } | DirectoryFile::List(tenants) => tenants,
        };
        let directory = Self::new();
        for entry in entries {
            directory.upsert(entry.id, entry.upstreams);
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
    pub fn upsert(&self, tenant: TenantId, upstreams: TenantUpstreams) {
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
    pub fn get(&self, tenant: TenantId) -> Option<TenantUpstreams> {
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

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TenantId, TenantUpstreams>> {
        self.tenants.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TenantDirectory for InMemoryDirectory {
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
        let found = self.get(tenant);
        Box::pin(std::future::ready(Ok(found)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::FhirVersion;

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

    #[tokio::test]
    async fn loads_json_and_updates_at_run_time() {
        let json = format!(
            r#"{{"tenants": [{{"id": "{}", "upstreams": [{{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "1.0"}}]}}]}}"#,
            A.to_uppercase()
        );
        let directory = InMemoryDirectory::from_json(&json).unwrap();
        let tenant = TenantId::parse(A).unwrap();
        let found = directory.lookup(tenant).await.unwrap().unwrap();
        assert_eq!(found.default_upstream().fhir_version(), FhirVersion::Dstu2);

        let mut changes = directory.subscribe();
        assert!(directory.remove(tenant));
        assert_eq!(changes.recv().await.unwrap(), tenant);
        assert!(directory.lookup(tenant).await.unwrap().is_none());
    }

    #[test]
    fn bad_files_are_errors() {
        for bad in [
            "not json",
            r#"{"tenants": [{"id": "nope", "upstreams": []}]}"#,
            r#"[{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "upstreams": []}]"#,
            r#"[{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", "upstreams": [{"base_url": "http://a", "fhir_version": "9.0"}]}]"#,
        ] {
            assert!(InMemoryDirectory::from_json(bad).is_err(), "{bad}");
        }
        assert!(InMemoryDirectory::from_json_file("/nonexistent/tenants.json").is_err());
    }
}
