//! The gateway's state: clients, tenants and signing keys, opened from `state_dir` (or made in
//! memory to check a configuration) and seeded from the configuration at the first start.

use std::path::PathBuf;
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
    let dir = match &config.state_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tower-fhir-gateway-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;

    let tenants_file = dir.join("tenants.json");
    let directory = FileDirectory::open(&tenants_file)
        .map_err(|e| format!("cannot open the tenant directory: {e}"))?;
    if !directory.existed() {
        let tenants = config
            .tenants
            .iter()
            .map(|TenantConfig { id, upstreams }| (*id, upstreams.clone()))
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
    })
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
        let refused = |e| format!("a client in the configuration is refused: {e}");
        if store.client(id).await.map_err(refused)?.is_some() {
            continue;
        }
        let mut new = NewClient::new(id).secret(&client.client_secret);
        for tenant in &client.tenants {
            new = new.tenant(*tenant);
        }
        for scope in &client.scopes {
            new = new.scope(scope);
        }
        store.register(new).await.map_err(refused)?;
        tracing::info!(client_id = %id, "client registered");
    }
    Ok(())
}
