//! The gateway's state: clients, tenants and signing keys, opened from `state_dir` (or made in
//! memory to check a configuration) and seeded from the configuration at the first start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tower_fhir::route::{FileDirectory, TenantStore};
use tower_fhir::token::{
    ClientStore, FileClientStore, InMemoryClientStore, NewClient, SecretHashing, SigningKeys,
};

use crate::config::{ClientConfig, Config, TenantConfig};

/// What the gateway keeps across restarts.
pub(crate) struct State {
    pub(crate) directory: Arc<dyn TenantStore>,
    pub(crate) clients: Arc<dyn ClientStore>,
    pub(crate) keys: SigningKeys,
    /// Where it lives.
    pub(crate) dir: PathBuf,
    /// Without a configured `state_dir`: the fresh directory, removed when this is dropped.
    _temporary: Option<tempfile::TempDir>,
    /// The lock this process holds on the directory while it runs (released at exit, also a
    /// crash: the operating system drops it with the process).
    _lock: std::fs::File,
}

/// The file in `state_dir` whose lock says which process owns the directory.
const LOCK_FILE: &str = "gateway.lock";

/// Takes the state directory for this process: a second process on the same directory would
/// write the same files, each overwriting the other's changes.
fn lock(dir: &Path) -> Result<std::fs::File, String> {
    let path = dir.join(LOCK_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&path)
        .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "the state directory {} is in use by another tower-fhir-gateway process (it holds {}); stop that one, or give this one another state_dir",
            dir.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(format!("cannot lock {}: {e}", path.display()))
        }
    }
}

/// The secret hashing cost the configuration names.
fn hashing(config: &Config) -> Result<SecretHashing, String> {
    match config.secret_hashing {
        Some(cost) => SecretHashing::new(cost.memory_kib, cost.iterations)
            .map_err(|e| format!("secret_hashing is not usable: {e}")),
        None => Ok(SecretHashing::default()),
    }
}

/// Opens the state in `state_dir` (a fresh temporary directory without one) and seeds it with
/// the configured clients and tenants it does not hold yet.
pub(crate) async fn open(config: &Config) -> Result<State, String> {
    let (dir, temporary) = match &config.state_dir {
        Some(dir) => (private_directory(dir)?, None),
        None => {
            // A fresh directory with a random name, mode 0700: another local user can neither
            // guess it beforehand nor plant files in it.
            let mut builder = tempfile::Builder::new();
            builder.prefix("tower-fhir-gateway-");
            #[cfg(unix)]
            builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
            let temporary = builder
                .tempdir()
                .map_err(|e| format!("cannot create a temporary state directory: {e}"))?;
            (temporary.path().to_path_buf(), Some(temporary))
        }
    };

    let lock = lock(&dir)?;
    let tenants_file = dir.join("tenants.json");
    let directory = FileDirectory::open(&tenants_file)
        .map_err(|e| format!("cannot open the tenant directory: {e}"))?;
    if !directory.existed() {
        let tenants = config
            .tenants
            .iter()
            .map(|tenant: &TenantConfig| (tenant.id, tenant.record.clone()))
            .collect();
        directory
            .put_all(tenants)
            .await
            .map_err(|e| format!("cannot write the configured tenants: {e}"))?;
    }
    let clients_file = dir.join("clients.json");
    let clients = FileClientStore::open_with_hashing(&clients_file, hashing(config)?)
        .map_err(|e| format!("cannot open the client store: {e}"))?;
    register(&clients, &config.clients).await?;
    let keys = SigningKeys::open(dir.join("signing-keys.json"))
        .map_err(|e| format!("cannot open the signing keys: {e}"))?;
    Ok(State {
        directory: Arc::new(directory),
        clients: Arc::new(clients),
        keys,
        dir,
        _temporary: temporary,
        _lock: lock,
    })
}

/// The configured `state_dir`, created (mode 0700) when missing. One that others may write to
/// is refused: they could replace the client store or read what is written there next.
fn private_directory(dir: &Path) -> Result<PathBuf, String> {
    let shown = dir.display();
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create the state directory {shown}: {e}"))?;
    let metadata = std::fs::metadata(dir)
        .map_err(|e| format!("cannot read the state directory {shown}: {e}"))?;
    if !metadata.is_dir() {
        return Err(format!("the state directory {shown} is not a directory"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "the state directory {shown} is writable by other users (mode {:o}): run `chmod go-w {shown}` or choose another",
                mode & 0o777
            ));
        }
    }
    Ok(dir.to_path_buf())
}

/// Checks what [`open`] would store, in memory: the hashing cost and every configured client
/// (its id, its secret). Nothing is written.
pub(crate) async fn check(config: &Config) -> Result<(), String> {
    let clients = InMemoryClientStore::with_hashing(hashing(config)?);
    register(&clients, &config.clients).await
}

/// Registers the configured clients the store does not know yet. A known client keeps its
/// stored state (a rotated secret stays rotated).
async fn register(store: &dyn ClientStore, clients: &[ClientConfig]) -> Result<(), String> {
    for client in clients {
        let id = &client.client_id;
        let refused = |e: String| format!("a client in the configuration is refused: {e}");
        if store
            .client(id)
            .await
            .map_err(|e| refused(e.to_string()))?
            .is_some()
        {
            continue;
        }
        let mut new = NewClient::new(id);
        match (&client.client_secret, &client.jwks, &client.jwks_uri) {
            (Some(secret), _, _) => new = new.secret(secret),
            (None, None, None) => {
                return Err(refused(format!(
                    "client {id:?} needs a client_secret, or jwks or jwks_uri for private_key_jwt"
                )))
            }
            _ => {}
        }
        if let Some(jwks) = &client.jwks {
            new = new.jwks(jwks.clone());
        }
        if let Some(uri) = &client.jwks_uri {
            new = new.jwks_uri(uri);
        }
        if let Some(method) = client.token_endpoint_auth_method {
            new = new.token_endpoint_auth_method(method);
        }
        for tenant in &client.tenants {
            new = new.tenant(*tenant);
        }
        for scope in &client.scopes {
            new = new.scope(scope);
        }
        if let Some(limit) = client.rate_limit {
            new = new.rate_limit(limit);
        }
        store
            .register(new)
            .await
            .map_err(|e| refused(e.to_string()))?;
        tracing::info!(client_id = %id, "client registered");
    }
    Ok(())
}
