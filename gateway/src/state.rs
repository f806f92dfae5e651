//! The gateway's state: clients, tenants and signing keys, opened from `state_dir` or from a
//! PostgreSQL database many replicas share (or made in memory to check a configuration), and
//! seeded from the configuration with what it does not hold yet.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_fhir::auth::FileRevocationLog;
use tower_fhir::ops::{BucketHistograms, ObserveLayer};
use tower_fhir::postgres::{
    KeyEncryptionKey, PgSigningKeys, PgState, PgTenantStore, KEY_ENCRYPTION_KEY_ENV,
    NEXT_KEY_ENCRYPTION_KEY_ENV, PREVIOUS_KEY_ENCRYPTION_KEY_ENV,
};
use tower_fhir::route::{nested_bases, DirectoryError, FileDirectory, TenantRecord, TenantStore};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    ClientStore, FileClientStore, FileReplayGuard, InMemoryClientStore, NewClient, SecretHashing,
    SigningKeys,
};

use crate::config::{ClientConfig, Config, TenantConfig};

/// What the gateway keeps across restarts.
pub(crate) struct State {
    pub(crate) directory: Arc<dyn TenantStore>,
    pub(crate) clients: Arc<dyn ClientStore>,
    pub(crate) keys: SigningKeys,
    /// Where it lives, as the start-up lines say it (no password).
    pub(crate) location: String,
    /// The shared database, when the state is there.
    pub(crate) database: Option<Database>,
    /// In `state_dir`: the revoked tokens and clients, kept across restarts (with a database,
    /// they are in it).
    pub(crate) revocations: Option<FileRevocationLog>,
    /// In `state_dir`: the `jti`s of the client assertions accepted, kept across restarts
    /// (with a database, they are in it).
    pub(crate) assertion_jtis: Option<FileReplayGuard>,
    /// Without a configured `state_dir` nor a database: the fresh directory, removed when this
    /// is dropped.
    _temporary: Option<tempfile::TempDir>,
    /// The lock this process holds on its state directory while it runs (released at exit,
    /// also a crash: the operating system drops it with the process).
    pub(crate) lock: Option<Arc<DirLock>>,
}

/// The lock on `state_dir` (its file `gateway.lock`), watched: a directory removed while the
/// gateway runs (by hand, or by a cleaner of old files) took the lock with it, so a second
/// gateway could take the directory, and state written there would be a part of it only
/// (nothing makes the directory again behind the operator's back).
pub(crate) struct DirLock {
    dir: PathBuf,
    /// The directory as it was when locked (its device and inode, on Unix): one removed and
    /// made again under the same name is another.
    directory: same_file::Handle,
    /// The locked `gateway.lock`, held open (the lock goes with it).
    file: same_file::Handle,
    /// Whether the loss was said (once).
    said: AtomicBool,
}

impl DirLock {
    fn new(dir: PathBuf, file: std::fs::File) -> std::io::Result<Self> {
        Ok(Self {
            directory: same_file::Handle::from_path(&dir)?,
            dir,
            file: same_file::Handle::from_file(file)?,
            said: AtomicBool::new(false),
        })
    }

    /// Whether `state_dir` is still the directory locked at start and its `gateway.lock` the
    /// file this process locked. Once not (removed, replaced, made again: what else went with
    /// it cannot be told), it is not taken again: the first time, an `error` says so.
    pub(crate) fn held(&self) -> bool {
        // Gone, or another file there: not held. Not told (no descriptor free to open it
        // with, say): held, as far as can be said.
        let same =
            |handle: &same_file::Handle, path: &Path| match same_file::Handle::from_path(path) {
                Ok(there) => there == *handle,
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            };
        let held = same(&self.directory, &self.dir) && same(&self.file, &self.dir.join(LOCK_FILE));
        if !held && !self.said.swap(true, Ordering::Relaxed) {
            tracing::error!(
                state_dir = %self.dir.display(),
                "the state directory or its lock file was removed or replaced while the gateway runs: changes to tenants, clients, signing keys and revocations may not be kept (they fail when the directory is gone), and another gateway could take the directory; /readyz says \"state directory\" from now on: restart the gateway over the state it should serve"
            );
        }
        held
    }
}

/// The database the replicas share.
pub(crate) struct Database {
    pub(crate) state: PgState,
    /// The signing keys' handle (kept, they are followed as long as the gateway runs).
    pub(crate) keys: PgSigningKeys,
    /// Whether the database answered the last ping (once a second).
    pub(crate) up: Arc<AtomicBool>,
    /// The tenant directory, whose listener hears other replicas' changes.
    pub(crate) tenants: PgTenantStore,
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

/// The root certificates `database_ca_file` holds (none without it), read now: a file that
/// cannot be read stops the start and `--check-config`.
pub(crate) fn database_roots(config: &Config) -> Result<Vec<Vec<u8>>, String> {
    match &config.database_ca_file {
        None => Ok(Vec::new()),
        Some(path) => std::fs::read(path)
            .map(|pem| vec![pem])
            .map_err(|e| format!("cannot read database_ca_file {}: {e}", path.display())),
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

/// Whether the secrets in `state_dir` are sealed with the key in
/// `TOWER_FHIR_KEY_ENCRYPTION_KEY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateKey {
    /// Read from the environment: set, it must be a key, and it seals the state.
    FromEnv,
    /// Not read (the demo: its state is a temporary directory of published credentials).
    Ignored,
}

/// Opens the state in the database (`database_url`) or in `state_dir` (a fresh temporary
/// directory without either) and seeds it with the configured clients and tenants it does not
/// hold yet.
pub(crate) async fn open(config: &Config, key: StateKey) -> Result<State, String> {
    match &config.database_url {
        Some(url) => open_database(config, url).await,
        None => open_directory(config, key).await,
    }
}

/// The state in the shared database: refused without the key-encryption key, which seals the
/// signing keys there.
async fn open_database(config: &Config, url: &str) -> Result<State, String> {
    let kek = KeyEncryptionKey::from_env().map_err(|e| format!("cannot use the database: {e}"))?;
    say_key_change(&kek);
    let changing = kek.has_previous();
    let location = format!("PostgreSQL at {}", without_password(url));
    if let Some(dir) = &config.state_dir {
        tracing::warn!(state_dir = %dir.display(), "state_dir is not used: the state is in the database");
    }
    let roots = database_roots(config)?;
    let state = PgState::connect_with_roots(url, &roots)
        .await
        .map_err(|e| format!("cannot open the database ({location}): {e}"))?;
    // The signing keys first: they are sealed with the key-encryption key, so a replica given
    // another key than the others' stops here, before it writes anything they would then fail
    // to open (a configured tenant's credential sealed with its key).
    let keys = state
        .signing_keys(kek.clone())
        .await
        .map_err(|e| format!("cannot open the signing keys: {e}"))?;
    let directory = state.sealed_tenant_store(kek);
    {
        // Under the lock every replica's tenant writes take (the admin API's too): a change
        // made on a running replica cannot pass its nesting check between this start's check
        // and its seeding. The configured tenants are checked as if seeded, before any is: one
        // that would nest with a tenant the directory holds is never written (the running
        // replicas would serve both).
        let _writes = directory
            .lock_writes()
            .await
            .map_err(|e| format!("cannot lock the tenant directory ({location}): {e}"))?;
        let seeded: Vec<_> = config
            .tenants
            .iter()
            .map(|tenant| (tenant.id, &tenant.record))
            .collect();
        refuse_nested_bases(&directory, &location, &seeded, &config.own_addresses()).await?;
        for tenant in &config.tenants {
            if directory
                .insert_if_absent(tenant.id, &tenant.record)
                .await
                .map_err(|e| format!("cannot write the configured tenants: {e}"))?
            {
                tracing::info!(tenant = %tenant.id, "tenant onboarded from the configuration");
            }
        }
        // Credentials an earlier version kept in clear are sealed now; with a previous key
        // (the key being changed), those it sealed are sealed again with the key.
        let sealed = directory
            .seal_stored_credentials()
            .await
            .map_err(|e| format!("cannot seal the stored upstream credentials: {e}"))?;
        if sealed.in_clear > 0 {
            let count = sealed.in_clear;
            tracing::warn!(
                tenants = count,
                "sealed the upstream credentials of {count} tenant(s) that the database held in clear; its old row versions, write-ahead log and backups still hold them: rotate those credentials"
            );
        }
        if sealed.previous > 0 {
            tracing::info!(
                tenants = sealed.previous,
                "upstream credentials sealed with {PREVIOUS_KEY_ENCRYPTION_KEY_ENV} sealed again with {KEY_ENCRYPTION_KEY_ENV}"
            );
        } else if changing {
            tracing::info!(
                "no upstream credential sealed with {PREVIOUS_KEY_ENCRYPTION_KEY_ENV} is left (now: a replica still running with the old key alone may seal more)"
            );
        }
    }
    let clients = state.client_store(hashing(config)?);
    register(&clients, &config.clients, true).await?;
    say_unnamed(config, &directory, &clients).await;
    // Serve only once other replicas' tenant changes are heard: a lookup cached before then
    // could miss a change for as long as the cache keeps it.
    if tokio::time::timeout(Duration::from_secs(10), directory.listening())
        .await
        .is_err()
    {
        tracing::warn!("not yet listening for other replicas' tenant changes after 10 s: serving anyway; /readyz says so until it listens");
    }
    let up = Arc::new(AtomicBool::new(true));
    tokio::spawn(watch(state.clone(), Arc::downgrade(&up)));
    Ok(State {
        directory: Arc::new(directory.clone()),
        clients: Arc::new(clients),
        keys: keys.signing_keys(),
        location,
        database: Some(Database {
            state,
            keys,
            up,
            tenants: directory,
        }),
        revocations: None,
        assertion_jtis: None,
        _temporary: None,
        lock: None,
    })
}

/// Refuses to serve a directory where one tenant's upstream base lies under another's on the
/// same server (stored before the admin API refused it, or seeded beside it): the outer
/// tenant's tokens would reach the inner tenant's data. Reads every tenant once; `seeded`
/// (the configured tenants, about to be written where the directory lacks them) count as
/// held where it holds none of their ids. (A configured tenant removed through the admin API,
/// which seeding leaves out, counts too: a configuration naming one that would nest is
/// refused all the same.) Refuses one whose upstream is one of the gateway's own addresses
/// (`own_addresses`) too: stored before a listener moved onto it.
async fn refuse_nested_bases(
    directory: &dyn TenantStore,
    location: &str,
    seeded: &[(TenantId, &TenantRecord)],
    own_addresses: &[(&'static str, std::net::SocketAddr)],
) -> Result<(), String> {
    let failed = |e: DirectoryError| format!("cannot read the tenant directory ({location}): {e}");
    // (Read at once, and found by a set: a lookup each, and a search of them all for each
    // seeded tenant, took most of a minute to start with 50,000 tenants in PostgreSQL.)
    let tenants = directory.records().await.map_err(failed)?;
    let held: Vec<(TenantId, &TenantRecord)> = tenants
        .iter()
        .map(|(tenant, record)| (*tenant, record))
        .collect();
    let held_ids: std::collections::HashSet<TenantId> =
        held.iter().map(|(tenant, _)| *tenant).collect();
    let new = seeded
        .iter()
        .filter(|(id, _)| !held_ids.contains(id))
        .copied();
    // A tenant stored (or configured) before `listen`, `metrics_listen` or `admin_listen`
    // moved onto its upstream's address (or `--listen` did) would send its requests back to
    // the gateway, its clients to the metrics.
    if let Some((tenant, refused)) =
        crate::admin::first_at_own_address(own_addresses, held.iter().copied().chain(new.clone()))
    {
        return Err(format!(
            "the tenant directory ({location}): tenant {tenant}: {refused}. Change the tenant \
             (PUT /admin/tenants/{{id}} on a gateway still running, or in the directory itself) \
             or the listening address before starting this one"
        ));
    }
    match nested_bases(held.iter().copied().chain(new)).first() {
        None => Ok(()),
        Some(nested) => Err(format!(
            "the tenant directory ({location}): {nested}. Change or remove one of them (PUT or \
             DELETE /admin/tenants/{{id}} on a gateway still running, or in the directory \
             itself) before starting this one"
        )),
    }
}

/// Pings the database once a second while anybody reads `up`, and says whether it answers
/// (down after two failed pings in a row); logs each change. Sets the pool's gauges for
/// `/metrics` on the same second (`PgState::record_pool_metrics`: off the request path, and
/// no scrape waits for them).
async fn watch(state: PgState, up: std::sync::Weak<AtomicBool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Down only after two pings in a row failed: one slow answer (a pool busy under load)
    // does not take every replica out at once.
    let mut failed_in_a_row = 0;
    loop {
        every.tick().await;
        // Before the ping, which takes a connection of its own for a moment.
        state.record_pool_metrics();
        let answered = tokio::time::timeout(Duration::from_secs(1), state.ping()).await;
        let Some(up) = up.upgrade() else { return };
        let mut why = None;
        failed_in_a_row = match answered {
            Ok(Ok(())) => 0,
            Ok(Err(error)) => {
                why = Some(error.to_string());
                failed_in_a_row + 1
            }
            Err(_) => {
                why = Some("no answer within a second".to_owned());
                failed_in_a_row + 1
            }
        };
        let now = failed_in_a_row < 2;
        if up.swap(now, Ordering::Relaxed) != now {
            if now {
                tracing::info!("the database answers again");
            } else {
                tracing::error!(error = why.as_deref().unwrap_or_default(), "the database does not answer: cached tenants are still served; token requests and admin changes get 503 until it is back");
            }
        }
    }
}

/// `url` with its password (if any) left out.
fn without_password(url: &str) -> String {
    // Read as tokio-postgres reads it (a password may hold an unencoded `/`, `?` or `#`: its
    // credentials run to the first `@`), and shown from what it read: no password, no options.
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "<a database URL>".into();
    };
    if !url.contains("://") {
        return "<a database URL>".into();
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(at, host)| {
            let host = match host {
                // A password's unencoded `@` ends the credentials early, leaving the rest of
                // the password in the host: not shown.
                tokio_postgres::config::Host::Tcp(name) if name.contains('@') => {
                    "<a host holding an @: write a password's @ as %40>".to_owned()
                }
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            // One port for all hosts, or one each.
            match ports.get(at).or(ports.first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let user = config
        .get_user()
        .map_or(String::new(), |user| format!("{user}@"));
    let database = config.get_dbname().unwrap_or("");
    format!("postgres://{user}{}/{database}", hosts.join(","))
}

/// The state in `state_dir`, owned by this process.
async fn open_directory(config: &Config, key: StateKey) -> Result<State, String> {
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

    let sealing = match key {
        StateKey::FromEnv => state_dir_sealing()?,
        StateKey::Ignored => None,
    };
    let lock = lock(&dir)?;
    // Both files read before either is written: a key that does not open what one holds
    // sealed (or none, for a sealed state) must not seal the other, nor a fresh signing key,
    // with itself; afterwards no one key would open the state.
    verify_sealed_state(&dir, sealing.as_ref())?;
    if let Some(kek) = &sealing {
        tracing::info!("secrets in state_dir sealed with {KEY_ENCRYPTION_KEY_ENV}");
        say_key_change(kek);
    }
    say_missing_files(&dir);
    let keys_file = dir.join("signing-keys.json");
    let tenants_file = dir.join("tenants.json");
    // With a previous key: the two files as they were, to say when it opened nothing.
    let before_change = sealing.as_ref().filter(|kek| kek.has_previous()).map(|_| {
        (
            std::fs::read(&keys_file).ok(),
            std::fs::read(&tenants_file).ok(),
        )
    });
    let keys = match &sealing {
        Some(kek) => SigningKeys::open_sealed(&keys_file, kek.clone()),
        None => SigningKeys::open(&keys_file),
    }
    .map_err(|e| format!("cannot open the signing keys: {e}"))?;
    let directory = match &sealing {
        Some(kek) => FileDirectory::open_sealed(&tenants_file, kek.clone()),
        None => FileDirectory::open(&tenants_file),
    }
    .map_err(|e| format!("cannot open the tenant directory: {e}"))?;
    if let Some(before) = before_change {
        let after = (
            std::fs::read(&keys_file).ok(),
            std::fs::read(&tenants_file).ok(),
        );
        if before == after {
            tracing::info!(
                "nothing in state_dir was sealed with {PREVIOUS_KEY_ENCRYPTION_KEY_ENV}: the key has changed; unset it"
            );
        }
    }
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
    } else {
        // The state holds the tenants from the first start on; one of the configuration's
        // that it lacks was removed through the admin API, or added to the file since. Which,
        // the files do not say: it is not added back, but said. One the state holds otherwise
        // than the file says is kept as held, and said too.
        for tenant in &config.tenants {
            match directory.get(tenant.id) {
                None => tracing::warn!(
                    tenant = %tenant.id,
                    state = %tenants_file.display(),
                    "a tenant of the configuration is not in the state (removed through the admin API, or added to the configuration after the first start): not added; onboard it with PUT /admin/tenants/{{id}}"
                ),
                Some(record) if record != tenant.record => tracing::warn!(
                    tenant = %tenant.id,
                    state = %tenants_file.display(),
                    "a tenant's upstreams in the configuration differ from the state's (changed in the file after the first start, or through the admin API): the state's are used; change them with PUT /admin/tenants/{{id}}"
                ),
                Some(_) => {}
            }
        }
    }
    refuse_nested_bases(
        &directory,
        &format!("{}", tenants_file.display()),
        &[],
        &config.own_addresses(),
    )
    .await?;
    let clients_file = dir.join("clients.json");
    let clients = FileClientStore::open_with_hashing(&clients_file, hashing(config)?)
        .map_err(|e| format!("cannot open the client store: {e}"))?;
    register(&clients, &config.clients, true).await?;
    say_unnamed(config, &directory, &clients).await;
    let revocations = FileRevocationLog::open(dir.join("revoked-tokens.json"))
        .map_err(|e| format!("cannot open the revoked tokens: {e}"))?;
    let assertion_jtis = FileReplayGuard::open(dir.join("assertion-jtis.jsonl"))
        .map_err(|e| format!("cannot open the client assertions' jtis: {e}"))?;
    Ok(State {
        directory: Arc::new(directory),
        clients: Arc::new(clients),
        keys,
        location: dir.display().to_string(),
        database: None,
        revocations: Some(revocations),
        assertion_jtis: Some(assertion_jtis),
        _temporary: temporary,
        lock: Some(Arc::new(DirLock::new(dir.clone(), lock).map_err(|e| {
            format!(
                "cannot open the state directory {} or its lock file: {e}",
                dir.display()
            )
        })?)),
    })
}

/// Checks, reading them alone, that the state in `dir` opens with `kek`: every sealed
/// credential in `tenants.json` and private key in `signing-keys.json` opens with it, or,
/// without a key, neither file holds anything sealed. Writes and creates nothing; missing
/// files are fine (they are made at the start).
pub(crate) fn verify_sealed_state(
    dir: &Path,
    kek: Option<&KeyEncryptionKey>,
) -> Result<(), String> {
    let tenants = dir.join("tenants.json");
    let keys = dir.join("signing-keys.json");
    let (tenants, keys) = match kek {
        Some(kek) => (
            FileDirectory::check_sealed(&tenants, kek),
            SigningKeys::check_sealed(&keys, kek),
        ),
        None => (FileDirectory::check(&tenants), SigningKeys::check(&keys)),
    };
    let refused: Vec<String> = [
        tenants.err().map(|e| format!("the tenant directory: {e}")),
        keys.err().map(|e| format!("the signing keys: {e}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(format!(
        "cannot open the state in {}: {} (tenants.json and signing-keys.json are left as they were)",
        dir.display(),
        refused.join("; ")
    ))
}

/// The key-encryption key that seals the secrets in `state_dir` (the upstreams' credentials
/// in `tenants.json`, the private keys in `signing-keys.json`): the one in
/// `TOWER_FHIR_KEY_ENCRYPTION_KEY` when it is set (an error when it is not a key), none when it
/// is not (the files keep them in clear, as before).
pub(crate) fn state_dir_sealing() -> Result<Option<KeyEncryptionKey>, String> {
    if std::env::var_os(KEY_ENCRYPTION_KEY_ENV).is_none() {
        for other in [PREVIOUS_KEY_ENCRYPTION_KEY_ENV, NEXT_KEY_ENCRYPTION_KEY_ENV] {
            if std::env::var_os(other).is_some() {
                return Err(format!(
                    "cannot open the secrets in state_dir: {other} is set and {KEY_ENCRYPTION_KEY_ENV} is not: it is the key being changed from or to, beside the key that seals (taking the secrets out of their seal is not done)"
                ));
            }
        }
        return Ok(None);
    }
    let kek = KeyEncryptionKey::from_env()
        .map_err(|e| format!("cannot seal the secrets in state_dir: {e}"))?;
    Ok(Some(kek))
}

/// Says at `info` when `kek` changes from a previous key or to a next one, so that an
/// operator changing the key reads from each start which step it is at.
fn say_key_change(kek: &KeyEncryptionKey) {
    if kek.has_previous() {
        tracing::info!(
            "the key-encryption key changes: {PREVIOUS_KEY_ENCRYPTION_KEY_ENV} is set, and what only it opens is sealed again with {KEY_ENCRYPTION_KEY_ENV}"
        );
    } else if kek.has_next() {
        tracing::info!(
            "the key-encryption key is about to change: {NEXT_KEY_ENCRYPTION_KEY_ENV} is set, and what it seals opens here; sealing with {KEY_ENCRYPTION_KEY_ENV} still"
        );
    }
}

/// The configured `state_dir`, created (mode 0700) when missing. One that others may write to,
/// or that lies in a directory others may change, is refused: they could replace the client
/// store or read what is written there next.
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
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // Another user's directory (one planted before the first start, say) is theirs to
        // change whatever its mode: they could replace the keys or the tenants between runs.
        let owner = metadata.uid();
        let me = rustix::process::geteuid().as_raw();
        if owner != me {
            return Err(format!(
                "the state directory {shown} belongs to another user (uid {owner}, this process runs as uid {me}): choose a directory of this user's, or create it afresh"
            ));
        }
        let mode = metadata.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "the state directory {shown} is writable by other users (mode {:o}): run `chmod go-w {shown}` or choose another",
                mode & 0o777
            ));
        }
        parents_are_private(dir, me)?;
    }
    Ok(dir.to_path_buf())
}

/// Refuses a state directory that lies in one any user may write to (and not sticky), or that
/// another user than this one or root owns, as named or as resolved: they could move it (or a link on the way) aside and put theirs in its place
/// between two runs. A sticky directory (as `/tmp`) lets nobody move what they do not own.
#[cfg(unix)]
fn parents_are_private(dir: &Path, me: u32) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let shown = dir.display();
    let named = std::path::absolute(dir)
        .map_err(|e| format!("cannot resolve the state directory {shown}: {e}"))?;
    let resolved = std::fs::canonicalize(dir)
        .map_err(|e| format!("cannot resolve the state directory {shown}: {e}"))?;
    for above in named
        .ancestors()
        .skip(1)
        .chain(resolved.ancestors().skip(1))
    {
        let metadata = std::fs::metadata(above).map_err(|e| {
            format!(
                "cannot read {}, above the state directory: {e}",
                above.display()
            )
        })?;
        let (owner, mode) = (metadata.uid(), metadata.permissions().mode());
        // (Group write is the operator's choice: with a group of one's own, as user private
        // groups and Kubernetes' `fsGroup` volumes have, directories are 0775.)
        let others_write = mode & 0o002 != 0 && mode & 0o1000 == 0;
        if (owner != me && owner != 0) || others_write {
            return Err(format!(
                "the state directory {shown} lies in {}, which other users can change (owner uid {owner}, mode {:o}): they could replace the state directory between two runs; choose a directory whose parents only this user or root can change",
                above.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// Checks what [`open`] would store, in memory: the hashing cost and every configured client
/// (its id, its secret). Nothing is written.
pub(crate) async fn check(config: &Config) -> Result<(), String> {
    let clients = InMemoryClientStore::with_hashing(hashing(config)?);
    // (Registered in memory only: nothing to say.)
    register(&clients, &config.clients, false).await
}

/// The state files every start leaves (`clients.json` is written only once a client is), and
/// what starting without one while the other is there loses.
const STATE_FILES: [(&str, &str); 2] = [
    ("tenants.json", "the tenants are seeded from the configuration again: those onboarded or removed through the admin API are lost"),
    ("signing-keys.json", "new signing keys are made: every token issued before is refused"),
];

/// Logs, at `warn`, a state file missing from a state directory that holds the other (a file
/// deleted, or a backup restored in part): it is made anew, and what that loses is said. A
/// directory holding neither is a first start.
fn say_missing_files(dir: &Path) {
    let missing: Vec<_> = STATE_FILES
        .iter()
        .filter(|(file, _)| !dir.join(file).exists())
        .collect();
    if missing.len() == STATE_FILES.len() {
        return;
    }
    for (file, loses) in missing {
        tracing::warn!(
            state = %dir.display(),
            file,
            "a state file is missing while the rest of the state is there: {loses}"
        );
    }
}

/// Logs, at `info`, the tenants and clients the state serves that the configuration does not
/// name: onboarded through the admin API, or removed from the file after the first start,
/// which removes nothing (the state wins over the file). Those removed clients are not revoked.
async fn say_unnamed(config: &Config, directory: &dyn TenantStore, clients: &dyn ClientStore) {
    /// The most ids named in the line.
    const NAMED: usize = 10;
    let in_file: HashSet<_> = config.tenants.iter().map(|tenant| tenant.id).collect();
    if let Ok(stored) = directory.list().await {
        let unnamed: Vec<_> = stored
            .into_iter()
            .filter(|tenant| !in_file.contains(tenant))
            .collect();
        if !unnamed.is_empty() {
            tracing::info!(
                count = unnamed.len(),
                tenants = ?&unnamed[..unnamed.len().min(NAMED)],
                "tenants the state serves are not in the configuration (onboarded through the admin API, or removed from the file after the first start, which removes nothing): offboard one with DELETE /admin/tenants/{{id}}"
            );
        }
    }
    let in_file: HashSet<_> = config
        .clients
        .iter()
        .map(|c| c.client_id.as_str())
        .collect();
    if let Ok(stored) = clients.clients().await {
        let mut unnamed: Vec<_> = stored
            .into_iter()
            .filter(|client| !client.revoked && !in_file.contains(client.id.as_str()))
            .map(|client| client.id)
            .collect();
        unnamed.sort();
        if !unnamed.is_empty() {
            tracing::info!(
                count = unnamed.len(),
                clients = ?&unnamed[..unnamed.len().min(NAMED)],
                "clients the state serves are not in the configuration (registered through the admin API, or removed from the file after the first start, which revokes nothing): revoke one with DELETE /admin/clients/{{client_id}}"
            );
        }
    }
}

/// Whether what the configuration says of a client (but its secret and keys) differs from
/// what the store holds.
fn differs(record: &tower_fhir::token::ClientRecord, client: &ClientConfig) -> bool {
    let tenants: std::collections::BTreeSet<_> = client.tenants.iter().collect();
    let scopes: std::collections::BTreeSet<_> = client.scopes.iter().collect();
    tenants != record.tenants.iter().collect()
        || scopes != record.scopes.iter().collect()
        || client.rate_limit != record.rate_limit
        || client
            .token_endpoint_auth_method
            .is_some_and(|method| method != record.token_endpoint_auth_method)
}

/// Registers the configured clients the store does not know yet (`say`: each said at
/// `info`). A known client keeps its stored state (a rotated secret stays rotated).
async fn register(
    store: &dyn ClientStore,
    clients: &[ClientConfig],
    say: bool,
) -> Result<(), String> {
    for client in clients {
        let id = &client.client_id;
        let refused = |e: String| format!("a client in the configuration is refused: {e}");
        if let Some(record) = store.client(id).await.map_err(|e| refused(e.to_string()))? {
            if !record.revoked && differs(&record, client) {
                tracing::warn!(
                    client_id = %id,
                    "a client's tenants, scopes, rate limit or authentication method in the configuration differ from the state's (changed in the file after the first start, or through the admin API): the state's are used; change them with PUT /admin/clients/{{client_id}} (a client_secret in the file is used only to register the client: reset it with POST /admin/clients/{{client_id}}/secret)"
                );
            }
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
        match store.register(new).await {
            Ok(_) if say => tracing::info!(client_id = %id, "client registered"),
            Ok(_) => {}
            // Another replica with the same configuration registered it meanwhile.
            Err(e) if e.is_refused() && matches!(store.client(id).await, Ok(Some(_))) => {}
            Err(e) => return Err(refused(e.to_string())),
        }
    }
    Ok(())
}

/// What `/metrics` keeps of each tenant: the request counter's series, held by the layer that
/// counts them and by the recorder that renders them.
pub(crate) struct TenantSeries {
    pub(crate) observe: ObserveLayer,
    pub(crate) histograms: BucketHistograms,
}

impl TenantSeries {
    /// Forgets `tenants`' series: the recorder's first, so that a request counted meanwhile
    /// counts in a series forgotten rather than leave the layer a handle to one no longer
    /// rendered. How many series the layer held.
    fn forget(&self, tenants: &[TenantId]) -> usize {
        let ids: Vec<String> = tenants.iter().map(ToString::to_string).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        // The recorder's under the layer's lock: no request makes a series between the two.
        self.observe.forget_tenants_with(tenants, || {
            self.histograms.forget_labelled("tenant", &ids);
        })
    }
}

/// More tenants than this to check at once, and the directory is listed once rather than
/// asked for each (a round trip each in PostgreSQL).
const LOOKUPS_AT_MOST: usize = 16;

/// How soon tenants are checked again when the directory could not say whether it holds them.
const RECHECK: Duration = Duration::from_secs(10);

/// Forgets the `/metrics` series of every tenant removed from `directory`, `grace` after the
/// removal was heard (`metrics_removed_tenant_grace_seconds`), if the tenant is still absent
/// then: Prometheus reads the final counts meanwhile, and the tenant's last requests end. A
/// tenant added back within it keeps its series as they were; one added back later counts
/// from zero.
///
/// Removals are heard from the directory's changes: the admin API's on this process, and (in
/// PostgreSQL) every other replica's. Once every `grace`, the tenants counted are also
/// checked against the directory, which finds those whose removal was not heard (more changes
/// at once than the channel holds) and those a request counted again after they were
/// forgotten (a token request of a client that still names the tenant). Runs for the life of
/// the process, on the main runtime: nothing here is on a request's path.
pub(crate) async fn forget_removed_tenants(
    directory: Arc<dyn TenantStore>,
    series: TenantSeries,
    grace: Duration,
) {
    use tokio::sync::broadcast::error::RecvError;
    use tokio::time::Instant;
    let mut changes = directory.changes();
    // The tenants to check, by when.
    let mut due: HashMap<TenantId, Instant> = HashMap::new();
    let mut sweep = tokio::time::interval(grace);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = due.values().min().copied();
        tokio::select! {
            heard = changes.recv() => match heard {
                // Checked once the grace is over (a change heard again starts it again).
                Ok(tenant) => {
                    due.insert(tenant, Instant::now() + grace);
                }
                // Changes were missed: the tenants counted are checked now instead.
                Err(RecvError::Lagged(_)) => sweep.reset_immediately(),
                // The directory is gone: so is the process.
                Err(RecvError::Closed) => return,
            },
            _ = sweep.tick() => {
                let unheard: Vec<TenantId> = series
                    .observe
                    .counted_tenants()
                    .into_iter()
                    .filter(|tenant| !due.contains_key(tenant))
                    .collect();
                if unheard.is_empty() {
                    continue;
                }
                match absent(&*directory, unheard).await {
                    Ok(gone) => {
                        for tenant in gone {
                            due.insert(tenant, Instant::now() + grace);
                        }
                    }
                    Err(error) => tracing::debug!(
                        %error,
                        "could not check the tenants counted in /metrics against the directory: checked again later"
                    ),
                }
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                let ready: Vec<TenantId> = due
                    .iter()
                    .filter(|(_, when)| **when <= now)
                    .map(|(tenant, _)| *tenant)
                    .collect();
                for tenant in &ready {
                    due.remove(tenant);
                }
                match absent(&*directory, ready.clone()).await {
                    Ok(gone) if gone.is_empty() => {}
                    Ok(gone) => {
                        let forgotten = series.forget(&gone);
                        tracing::debug!(
                            tenants = gone.len(),
                            series = forgotten,
                            "forgot the /metrics series of removed tenants"
                        );
                    }
                    Err(error) => {
                        tracing::debug!(
                            %error,
                            "could not check removed tenants against the directory: checked again in 10 s"
                        );
                        for tenant in ready {
                            due.entry(tenant).or_insert_with(|| Instant::now() + RECHECK);
                        }
                    }
                }
            }
        }
    }
}

/// Which of `tenants` `directory` does not hold.
async fn absent(
    directory: &dyn TenantStore,
    tenants: Vec<TenantId>,
) -> Result<Vec<TenantId>, DirectoryError> {
    if tenants.len() > LOOKUPS_AT_MOST {
        let held: HashSet<TenantId> = directory.list().await?.into_iter().collect();
        return Ok(tenants
            .into_iter()
            .filter(|tenant| !held.contains(tenant))
            .collect());
    }
    let mut absent = Vec::new();
    for tenant in tenants {
        if directory.lookup(tenant).await?.is_none() {
            absent.push(tenant);
        }
    }
    Ok(absent)
}

#[cfg(test)]
mod removed_tenants {
    use super::*;
    use http::{Request, Response};
    use tower::{Layer, ServiceExt};
    use tower_fhir::ops::RequestFacts;
    use tower_fhir::route::{InMemoryDirectory, Upstream};
    use tower_fhir::version::FhirVersion;

    const GRACE: Duration = Duration::from_millis(300);

    fn tenant(n: u8) -> TenantId {
        TenantId::parse(&format!("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e{n:02x}")).unwrap()
    }

    fn record() -> TenantRecord {
        TenantRecord::new([Upstream::parse("http://127.0.0.1:1/fhir", FhirVersion::R4).unwrap()])
            .unwrap()
    }

    /// The series (as its value) of `tenant`'s requests answered `200`, if there is one.
    fn count(histograms: &BucketHistograms, tenant: TenantId) -> Option<u64> {
        let series = format!(
            "tower_fhir_requests_total{{outcome=\"ok\",status_class=\"2xx\",tenant=\"{tenant}\"}} "
        );
        histograms
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
    }

    struct Counting {
        histograms: BucketHistograms,
        recorder: tower_fhir::ops::WithBucketHistograms<metrics::NoopRecorder>,
        observe: ObserveLayer,
    }

    impl Counting {
        fn new() -> Self {
            let histograms = BucketHistograms::new(&[1.0]).unwrap();
            let recorder = histograms.over(metrics::NoopRecorder);
            let observe =
                metrics::with_local_recorder(&recorder, || ObserveLayer::new().metrics(true));
            Self {
                histograms,
                recorder,
                observe,
            }
        }

        /// A request routed for `tenant`, counted (answered at its first poll, within the
        /// recorder, which is this thread's).
        fn request(&self, tenant: TenantId) {
            use std::future::Future;
            use std::task::{Context, Poll, Waker};
            let service =
                self.observe
                    .layer(tower::service_fn(move |_r: Request<()>| async move {
                        RequestFacts::set_tenant(tenant);
                        RequestFacts::set_upstream(&Arc::from("http://127.0.0.1:1/fhir"));
                        Ok::<_, std::convert::Infallible>(Response::new(()))
                    }));
            let request = Request::get("/Patient/1").body(()).unwrap();
            let mut answer = std::pin::pin!(service.oneshot(request));
            metrics::with_local_recorder(&self.recorder, || {
                let polled = answer
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()));
                assert!(matches!(polled, Poll::Ready(Ok(_))));
            });
        }

        /// `forget_removed_tenants` following `directory` for these counts, until dropped.
        fn follow(&self, directory: &InMemoryDirectory) -> Follower {
            let series = TenantSeries {
                observe: self.observe.clone(),
                histograms: self.histograms.clone(),
            };
            Follower(tokio::spawn(forget_removed_tenants(
                Arc::new(directory.clone()),
                series,
                GRACE,
            )))
        }
    }

    /// A running follower, stopped when dropped.
    struct Follower(tokio::task::JoinHandle<()>);

    impl Drop for Follower {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// Polls `check` every 20 ms for up to 5 s.
    async fn eventually(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..250 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_removed_tenants_series_go_after_the_grace_and_come_back_from_zero() {
        let directory = InMemoryDirectory::new();
        let (gone, kept) = (tenant(1), tenant(2));
        directory.upsert(gone, record());
        directory.upsert(kept, record());
        let counting = Counting::new();
        counting.request(gone);
        counting.request(gone);
        counting.request(kept);
        let _follower = counting.follow(&directory);
        tokio::task::yield_now().await;

        let removed = tokio::time::Instant::now();
        assert!(directory.remove(gone));
        // Within the grace, the final count is still there.
        tokio::time::sleep(GRACE / 3).await;
        assert_eq!(count(&counting.histograms, gone), Some(2));
        assert!(eventually(|| count(&counting.histograms, gone).is_none()).await);
        assert!(removed.elapsed() >= GRACE, "{:?}", removed.elapsed());
        assert_eq!(count(&counting.histograms, kept), Some(1), "untouched");
        assert_eq!(counting.observe.counted_tenants(), vec![kept]);

        directory.upsert(gone, record());
        counting.request(gone);
        assert_eq!(count(&counting.histograms, gone), Some(1), "from zero");
        // Added back and changed (an announcement of its own): kept, as it is held.
        tokio::time::sleep(GRACE * 2).await;
        assert_eq!(count(&counting.histograms, gone), Some(1));
    }

    #[tokio::test]
    async fn a_tenant_added_back_within_the_grace_keeps_its_series() {
        let directory = InMemoryDirectory::new();
        let again = tenant(3);
        directory.upsert(again, record());
        let counting = Counting::new();
        counting.request(again);
        let _follower = counting.follow(&directory);
        tokio::task::yield_now().await;
        directory.remove(again);
        directory.upsert(again, record());
        counting.request(again);
        tokio::time::sleep(GRACE * 3).await;
        assert_eq!(count(&counting.histograms, again), Some(2));
    }

    #[tokio::test]
    async fn a_counted_tenant_the_directory_lacks_is_found_without_a_change_heard() {
        // Counted, but removed before the follower listened (as when changes were missed,
        // or a client's token request counts a tenant removed long ago).
        let directory = InMemoryDirectory::new();
        let (unheard, held) = (tenant(4), tenant(5));
        directory.upsert(held, record());
        let counting = Counting::new();
        counting.request(unheard);
        counting.request(held);
        let _follower = counting.follow(&directory);
        assert!(eventually(|| count(&counting.histograms, unheard).is_none()).await);
        assert_eq!(count(&counting.histograms, held), Some(1));
    }

    #[tokio::test]
    async fn more_changes_than_the_channel_holds_lose_no_removal() {
        let directory = InMemoryDirectory::new();
        let (gone, kept) = (tenant(6), tenant(7));
        directory.upsert(gone, record());
        directory.upsert(kept, record());
        let counting = Counting::new();
        counting.request(gone);
        counting.request(kept);
        let follower = counting.follow(&directory);
        tokio::task::yield_now().await;
        // On this runtime's one thread the follower hears nothing until the test waits: the
        // removal is among the oldest changes, those the channel (1,024) drops.
        directory.remove(gone);
        for _ in 0..1100 {
            directory.upsert(kept, record());
        }
        assert!(eventually(|| count(&counting.histograms, gone).is_none()).await);
        assert_eq!(count(&counting.histograms, kept), Some(1));
        assert!(!follower.0.is_finished(), "the follower goes on");
    }

    #[tokio::test]
    async fn many_removed_at_once_are_forgotten_and_the_others_kept() {
        let directory = InMemoryDirectory::new();
        let counting = Counting::new();
        let tenants: Vec<TenantId> = (10..60).map(tenant).collect();
        for &tenant in &tenants {
            directory.upsert(tenant, record());
            counting.request(tenant);
        }
        let _follower = counting.follow(&directory);
        tokio::task::yield_now().await;
        for &tenant in &tenants[..40] {
            directory.remove(tenant);
        }
        assert!(
            eventually(|| counting.observe.counted_tenants().len() == 10).await,
            "{:?}",
            counting.observe.counted_tenants().len()
        );
        for &tenant in &tenants[40..] {
            assert_eq!(count(&counting.histograms, tenant), Some(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn database_urls_are_shown_without_their_password() {
        assert_eq!(
            without_password("postgres://gateway:s3cret@db.internal:5432/gateway"),
            "postgres://gateway@db.internal:5432/gateway"
        );
        assert_eq!(
            without_password("postgres://gateway@127.0.0.1/gw?password=s3cret"),
            "postgres://gateway@127.0.0.1:5432/gw"
        );
        assert_eq!(
            without_password("host=db password=s3cret"),
            "<a database URL>"
        );
        // tokio-postgres takes the credentials to the first `@`: a password with an
        // unencoded `/` (as `openssl rand -base64` makes) connects, and is not shown.
        let shown = without_password("postgres://gateway:pa/ss?w#0rd@db.internal:5432/gateway");
        assert_eq!(shown, "postgres://gateway@db.internal:5432/gateway");
        assert_eq!(
            without_password("postgresql://u:p@a:1,b:2/db?sslmode=disable&password=x"),
            "postgres://u@a:1,b:2/db"
        );
        assert_eq!(
            without_password("postgres://u:s3cret@db:port/gw"),
            "<a database URL>"
        );
        // A password's unencoded `@`: the rest of the password is read as the host, and not
        // shown either.
        let shown = without_password("postgres://gateway:Corr3ct@Horse-Battery@127.0.0.1:5432/gw");
        assert!(!shown.contains("Horse"), "{shown}");
        assert!(shown.contains("%40"), "{shown}");
    }
}

#[cfg(all(test, unix))]
mod parents {
    use super::parents_are_private;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_state_directory_is_refused_under_a_directory_others_can_change() {
        let top = std::env::temp_dir().join(format!("tower-fhir-parents-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let state = top.join("shared").join("state");
        std::fs::create_dir_all(&state).unwrap();
        let me = rustix::process::geteuid().as_raw();
        let mode = |mode: u32| {
            std::fs::set_permissions(top.join("shared"), std::fs::Permissions::from_mode(mode))
                .unwrap();
        };
        mode(0o755);
        assert_eq!(parents_are_private(&state, me), Ok(()));
        mode(0o1777);
        assert_eq!(parents_are_private(&state, me), Ok(()), "sticky, as /tmp");
        mode(0o775);
        assert_eq!(
            parents_are_private(&state, me),
            Ok(()),
            "group write is allowed"
        );
        for open in [0o777, 0o757, 0o703] {
            mode(open);
            let refused = parents_are_private(&state, me).unwrap_err();
            assert!(
                refused.contains("which other users can change"),
                "{refused}"
            );
        }
        // Reached through a link in a directory others can change: refused as named.
        mode(0o755);
        let open = top.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(top.join("shared"), open.join("link")).unwrap();
        let refused = parents_are_private(&open.join("link").join("state"), me).unwrap_err();
        assert!(refused.contains(&open.display().to_string()), "{refused}");
        std::fs::remove_dir_all(&top).unwrap();
    }
}
