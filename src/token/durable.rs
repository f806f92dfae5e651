//! A client store kept in a JSON file, replaced atomically on every change.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limit::{ClientLimitFuture, ClientLimits, RateLimit};
use crate::tenant::TenantId;

use super::client::{
    blocking, ClientKeys, ClientRecord, ClientSecret, ClientStore, ClientUpdate, Clients,
    HashedSecret, NewClient, SecretHashing, StoreError, StoreFuture,
};

/// Clients in a JSON file, so registrations, rotations and revocations survive a restart.
///
/// Every change writes the whole file to a temporary file in the same directory, syncs it and
/// renames it over the old one, so a crash leaves the old or the new file, never half of one.
/// Rotated-out secrets are removed from the file (or kept with their absolute expiry time
/// during a grace period), so they never work again after a restart. The file holds only
/// Argon2id hashes; still, keep it readable by the gateway alone. One process owns the file.
///
/// Hashing and writing run on tokio's blocking pool, and look-ups never wait for them: a new
/// secret is hashed before anything is locked, and a change is written while the clients seen
/// by look-ups stay the previous ones until the file is in place.
#[derive(Clone)]
pub struct FileClientStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for FileClientStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileClientStore")
            .field("path", &self.inner.path)
            .field("hashing", &self.inner.hashing)
            .finish_non_exhaustive()
    }
}

struct Inner {
    path: PathBuf,
    /// The clients as last written; look-ups hold this lock only to clone the `Arc` or a
    /// record.
    clients: Mutex<Arc<Clients>>,
    /// Held by a change while it is applied and written, so changes go one at a time.
    writer: Mutex<()>,
    hashing: SecretHashing,
    /// Called by a change right before it writes the file (tests).
    #[cfg(test)]
    before_write: Mutex<Option<BeforeWrite>>,
}

#[cfg(test)]
type BeforeWrite = Box<dyn FnOnce(&FileClientStore) + Send>;

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    clients: Vec<ClientRecord>,
}

impl FileClientStore {
    /// Opens the store at `path`, creating an empty one when the file does not exist (written
    /// at the first change; the directory it is in is made now if need be).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_hashing(path, SecretHashing::default())
    }

    /// Opens the store, hashing new secrets at this cost.
    pub fn open_with_hashing(
        path: impl AsRef<Path>,
        hashing: SecretHashing,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        crate::persist::make_parent(&path)
            .map_err(|e| StoreError::with_source(format!("{}: {e}", path.display()), e))?;
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
                clients: Mutex::new(Arc::new(clients)),
                writer: Mutex::new(()),
                hashing,
                #[cfg(test)]
                before_write: Mutex::new(None),
            }),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Rotates the client's secret, only if `used` is still one of its live secrets when given
    /// ([`ClientStore::rotate_secret_from`]); the new secret hashed outside the lock.
    fn rotate(&self, id: &str, used: Option<String>, grace: Duration) -> StoreFuture<ClientSecret> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || {
            this.current().check_rotatable(&id)?;
            let secret = HashedSecret::generate(this.inner.hashing)?;
            this.change(|c| c.rotate_from(&id, used.as_deref(), grace, secret))
        }))
    }

    /// The clients as last written.
    fn current(&self) -> Arc<Clients> {
        Arc::clone(
            &self
                .inner
                .clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Applies a change to a copy, writes it, and only then makes it visible. Blocking (the
    /// file is synced): call it on the blocking pool. Look-ups go on meanwhile, seeing the
    /// clients as they were.
    fn change<T>(
        &self,
        change: impl FnOnce(&mut Clients) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _writing = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = Clients::clone(&self.current());
        let result = change(&mut next)?;
        #[cfg(test)]
        if let Some(hook) = self.inner.before_write.lock().unwrap().take() {
            hook(self);
        }
        write_atomically(&self.inner.path, &next)?;
        *self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
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
        let found = self.current().clients.get(id).cloned();
        Box::pin(async move { Ok(found) })
    }

    /// Narrowed from the clients in memory: the tenant list is looked through, never copied
    /// (and the file never read).
    fn client_for_tenant(
        &self,
        id: &str,
        tenant: Option<TenantId>,
    ) -> StoreFuture<Option<ClientRecord>> {
        let found = self
            .current()
            .clients
            .get(id)
            .map(|record| record.narrowed(tenant));
        Box::pin(async move { Ok(found) })
    }

    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
        let this = self.clone();
        // Refused before hashing when it can be; hashed before any lock is taken.
        Box::pin(blocking(move || {
            this.current().check_new(&client)?;
            let secret = HashedSecret::for_client(&client, this.inner.hashing)?;
            this.change(|c| c.register(client, secret))
        }))
    }

    fn rotate_secret(&self, id: &str, grace: Duration) -> StoreFuture<ClientSecret> {
        self.rotate(id, None, grace)
    }

    fn rotate_secret_from(
        &self,
        id: &str,
        used: &str,
        grace: Duration,
    ) -> StoreFuture<ClientSecret> {
        self.rotate(id, Some(used.to_owned()), grace)
    }

    fn revoke(&self, id: &str) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || this.change(|c| c.revoke(&id))))
    }

    fn revoked_clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        let revoked = self.current().revoked();
        Box::pin(async move { Ok(revoked) })
    }

    fn clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        let all = self.current().all();
        Box::pin(async move { Ok(all) })
    }

    fn clients_after(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> StoreFuture<Vec<ClientRecord>> {
        let page = self.current().page(after, limit);
        Box::pin(async move { Ok(page) })
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

    fn set_rate_limit(&self, id: &str, limit: Option<RateLimit>) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || {
            this.change(|c| c.set_rate_limit(&id, limit))
        }))
    }

    fn set_keys(&self, id: &str, keys: ClientKeys) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || this.change(|c| c.set_keys(&id, keys))))
    }

    fn update(&self, id: &str, update: ClientUpdate) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(blocking(move || this.change(|c| c.update(&id, update))))
    }

    fn hashing(&self) -> SecretHashing {
        self.inner.hashing
    }
}

/// The clients' limits, read from the store (in memory: no file read).
impl ClientLimits for FileClientStore {
    fn client_limit(&self, client_id: &str) -> ClientLimitFuture {
        super::client::limit_of(self.client_for_tenant(client_id, None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::client::{unix_now, verify};
    use super::*;

    fn works(store: &FileClientStore, id: &str, secret: &ClientSecret) -> bool {
        store.current().clients[id]
            .live_secrets(unix_now())
            .any(|h| verify(secret.expose(), &h.phc))
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

    #[tokio::test]
    async fn look_ups_go_on_while_a_change_is_written() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-store-{}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        let store = FileClientStore::open_with_hashing(
            dir.join("clients.json"),
            SecretHashing::new(8, 1).unwrap(),
        )
        .unwrap();
        store.register(NewClient::new("app")).await.unwrap();
        let (seen, saw) = std::sync::mpsc::channel();
        *store.inner.before_write.lock().unwrap() =
            Some(Box::new(move |store: &FileClientStore| {
                // While the revocation is being written, a look-up answers at once, with the client
                // as it was; another change waits its turn (it would be written over this one).
                let found = futures::FutureExt::now_or_never(store.client("app"));
                let writer_free = store.inner.writer.try_lock().is_ok();
                seen.send((found.map(|r| r.unwrap().unwrap().revoked), writer_free))
                    .unwrap();
            }));
        store.revoke("app").await.unwrap();
        assert_eq!(saw.recv().unwrap(), (Some(false), false));
        assert!(store.client("app").await.unwrap().unwrap().revoked);
        fs::remove_dir_all(&dir).unwrap();
    }
}
