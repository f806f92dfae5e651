//! A client store kept in a JSON file, replaced atomically on every change.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tenant::TenantId;

use super::client::{
    blocking, ClientRecord, ClientSecret, ClientStore, Clients, NewClient, SecretHashing,
    StoreError, StoreFuture,
};

/// Clients in a JSON file, so registrations, rotations and revocations survive a restart.
///
/// Every change writes the whole file to a temporary file in the same directory, syncs it and
/// renames it over the old one, so a crash leaves the old or the new file, never half of one.
/// Rotated-out secrets are removed from the file (or kept with their absolute expiry time
/// during a grace period), so they never work again after a restart. The file holds only
/// Argon2id hashes; still, keep it readable by the gateway alone. One process owns the file.
#[derive(Debug, Clone)]
pub struct FileClientStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    clients: Mutex<Clients>,
    hashing: SecretHashing,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    clients: Vec<ClientRecord>,
}

impl FileClientStore {
    /// Opens the store at `path`, creating an empty one when the file does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_hashing(path, SecretHashing::default())
    }

    /// Opens the store, hashing new secrets at this cost.
    pub fn open_with_hashing(
        path: impl AsRef<Path>,
        hashing: SecretHashing,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let clients = match fs::read(&path) {
            Ok(bytes) => {
                let file: FileFormat = serde_json::from_slice(&bytes).map_err(|e| {
                    StoreError::with_source(
                        format!("{}: not a client store: {e}", path.display()),
                        e,
                    )
                })?;
                if file.version != 1 {
                    return Err(StoreError::new(format!(
                        "{}: unknown store version {}",
                        path.display(),
                        file.version
                    )));
                }
                Clients {
                    clients: file
                        .clients
                        .into_iter()
                        .map(|c| (c.id.clone(), c))
                        .collect(),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Clients::default(),
            Err(e) => {
                return Err(StoreError::with_source(
                    format!("{}: {e}", path.display()),
                    e,
                ))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                clients: Mutex::new(clients),
                hashing,
            }),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Applies a change to a copy, writes it, and only then makes it visible.
    fn change<T>(
        &self,
        change: impl FnOnce(&mut Clients) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = clients.clone();
        let result = change(&mut next)?;
        write_atomically(&self.inner.path, &next)?;
        *clients = next;
        Ok(result)
    }
}

fn write_atomically(path: &Path, clients: &Clients) -> Result<(), StoreError> {
    let mut records: Vec<&ClientRecord> = clients.clients.values().collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    let bytes = serde_json::to_vec_pretty(&serde_json::json!({"version": 1, "clients": records}))
        .map_err(|e| StoreError::new(e.to_string()))?;
    crate::persist::write_atomically(path, &bytes)
        .map_err(|e| StoreError::with_source(format!("{}: {e}", path.display()), e))
}

impl ClientStore for FileClientStore {
    fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
        let found = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clients
            .get(id)
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
        let this = self.clone();
        Box::pin(blocking(move || {
            this.change(|c| c.register(client, this.inner.hashing))
        }))
    }

    fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || {
            this.change(|c| c.rotate(&id, grace, this.inner.hashing))
        }))
    }

    fn revoke(&self, id: &str) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || this.change(|c| c.revoke(&id))))
    }

    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || {
            this.change(|c| c.set_entitlements(&id, tenants, scopes))
        }))
    }

    fn hashing(&self) -> SecretHashing {
        self.inner.hashing
    }
}

#[cfg(test)]
mod tests {
    use super::super::client::{unix_now, verify};
    use super::*;

    fn works(store: &FileClientStore, id: &str, secret: &ClientSecret) -> bool {
        let clients = store.inner.clients.lock().unwrap();
        let works = clients.clients[id]
            .live_secrets(unix_now())
            .any(|h| verify(secret.expose(), &h.phc));
        works
    }

    #[tokio::test]
    async fn survives_a_restart_and_rotated_secrets_stay_rotated() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-store-{}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clients.json");
        let store = FileClientStore::open(&path).unwrap();
        let old = store.register(NewClient::new("app")).await.unwrap();
        let new = store.rotate_secret("app", Duration::ZERO).await.unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(old.expose()) && !text.contains(new.expose()));
        drop(store);

        let reopened = FileClientStore::open(&path).unwrap();
        assert!(!works(&reopened, "app", &old));
        assert!(works(&reopened, "app", &new));
        let tenant =
            crate::tenant::TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        reopened
            .set_entitlements("app", vec![tenant], vec!["system/*.read".into()])
            .await
            .unwrap();
        let record = FileClientStore::open(&path)
            .unwrap()
            .client("app")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.tenants, [tenant]);
        assert_eq!(record.scopes, ["system/*.read"]);
        reopened.revoke("app").await.unwrap();
        let again = FileClientStore::open(&path).unwrap();
        assert!(again.client("app").await.unwrap().unwrap().revoked);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_file_that_is_not_a_store() {
        let path = std::env::temp_dir().join(format!("tower-fhir-bad-{}", rand::random::<u64>()));
        fs::write(&path, b"not json").unwrap();
        assert!(FileClientStore::open(&path).is_err());
        fs::remove_file(&path).unwrap();
    }
}
