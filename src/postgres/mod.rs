//! PostgreSQL as the shared state of many gateway replicas (feature `postgres`): the client
//! store and the tenant directory, the signing keys ([`PgState::signing_keys`], sealed with a
//! [`KeyEncryptionKey`]), revoked tokens ([`PgState::revocation_log`],
//! [`PgState::follow_revocations`]), client assertions' `jti`s
//! ([`PgState::assertion_replay_guard`]) and failed-authentication counts
//! ([`PgState::failure_counts`]), in one database.
//!
//! [`PgState::connect`] opens a pool (tokio-postgres with deadpool) and brings the schema up to
//! date with the migrations embedded here, under a transaction-level advisory lock, so that
//! replicas starting at once against an empty database do not race: one creates the tables,
//! the others wait for it and find them made. From it, [`PgClientStore`] is a
//! [`ClientStore`] and [`PgTenantStore`] a [`TenantStore`]; both keep each record as the JSON
//! the file stores write (table `tower_fhir_clients`, `tower_fhir_tenants`), change it in a
//! transaction that locks its row, and pass the suite every store passes
//! (`tests/stores.rs`). A client's tenants are also kept one row each
//! (`tower_fhir_client_tenants`, which a trigger keeps as the record says), so that a token
//! request looks up the one tenant it asks for and never reads the client's list
//! ([`ClientStore::client_for_tenant`]): it costs the same for a client of one tenant and a
//! client of fifty thousand. A page of either list ([`TenantStore::list_after`],
//! [`ClientStore::clients_after`]) reads only its rows, by an index in the order of the other
//! stores (client ids in byte order, whatever the database's collation). Secrets are hashed
//! before any transaction starts, so a slow hash
//! holds no lock. Each tenant change is announced to this process's [`TenantStore::changes`]
//! subscribers and `NOTIFY`ed on the channel `tower_fhir_changes` (payload
//! `tenant:<id> <origin>`, the origin naming the store that made it) in the same
//! transaction; every other replica's store hears it and tells its own subscribers.
//!
//! ```no_run
//! use tower_fhir::postgres::PgState;
//! use tower_fhir::route::TenantStore;
//! use tower_fhir::token::{ClientStore, SecretHashing};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let state = PgState::connect("postgres://gateway@127.0.0.1:5432/gateway").await?;
//! let clients = state.client_store(SecretHashing::default());
//! let tenants = state.tenant_store();
//! assert!(clients.client("app").await?.is_none());
//! println!("{} tenants", tenants.list().await?.len());
//! # Ok(())
//! # }
//! ```
//!
//! Metrics, through the [`metrics`] recorder installed before the state is opened (the
//! gateway's `/metrics`): each change listener (`listener` label: `tenants` for a tenant
//! store's, `revocations` for the one [`PgState::follow_revocations`] starts, `keys` for the
//! one [`PgState::signing_keys`] starts) adds 1 to the gauge `tower_fhir_db_listener_listening`
//! while it is connected and listening (having caught up), and counts in
//! `tower_fhir_db_listener_reconnections_total` each time it listens again after its
//! connection failed or dropped (each a resynchronisation); both change only as the listener's
//! state does. The pool's gauges are set when asked: [`PgState::record_pool_metrics`].
//!
//! A start waits for the [`MIGRATION_LOCK`] as long as another holds it; past 5 s it says so at
//! `warn` (the lock's key as `pg_locks` shows it, and its holder), and at `info` once it has it.
//!
//! Each session names itself in `pg_stat_activity` (`application_name`): `tower-fhir` for the
//! pool's, `tower-fhir listener tenants`, `tower-fhir listener revocations` and `tower-fhir
//! listener keys` for the change listeners'. An `application_name` in the database URL
//! (`?application_name=gateway-eu-1`) names every session instead.

mod failures;
mod keys;
mod tls;

pub use crate::seal::{
    KeyEncryptionKey, KEY_ENCRYPTION_KEY_ENV, NEXT_KEY_ENCRYPTION_KEY_ENV,
    PREVIOUS_KEY_ENCRYPTION_KEY_ENV,
};
pub use failures::PgFailureCounts;
pub use keys::PgSigningKeys;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::auth::{RevocationLog, RevokedTokens};
use crate::limit::RateLimit;
use crate::route::{
    DirectoryError, DirectoryFuture, TenantDirectory, TenantRecord, TenantStore,
    TenantStoreBorrowingFuture, TenantStoreFuture, TenantWriteLock,
};
use crate::tenant::TenantId;
use crate::token::ReplayGuard;
use crate::token::{
    blocking, ClientKeys, ClientRecord, ClientSecret, ClientStore, ClientUpdate, Clients,
    HashedSecret, NewClient, SecretHashing, StoreError, StoreFuture,
};

/// The advisory lock migrations run under (any number that is this crate's: `towerfhi`),
/// held by the transaction that migrates. An operator finds its holder in `pg_locks` as
/// `locktype = 'advisory'`, `classid = 1953462117` (the key's high half), `objid =
/// 1919314025` (its low half), `objsubid = 1`; a start that waits for it longer than 5 s says
/// so at `warn`, naming the holder's process id when it can read it.
pub const MIGRATION_LOCK: i64 = 0x746f_7765_7266_6869;

/// How long a start waits quietly for the [`MIGRATION_LOCK`] (another replica's migrations
/// take milliseconds) before it says what it waits for.
const MIGRATION_LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// The schema, one migration per version, applied in order and recorded.
const MIGRATIONS: [&str; 9] = [
    "CREATE TABLE tower_fhir_clients (
         id text PRIMARY KEY,
         record jsonb NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE tower_fhir_tenants (
         id uuid PRIMARY KEY,
         record jsonb NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now()
     );",
    "CREATE TABLE tower_fhir_revoked_tokens (
         issuer text NOT NULL,
         jti text NOT NULL,
         expires_at bigint NOT NULL,
         PRIMARY KEY (issuer, jti)
     );",
    "CREATE TABLE tower_fhir_assertion_jtis (
         client text NOT NULL,
         jti text NOT NULL,
         expires_at bigint NOT NULL,
         PRIMARY KEY (client, jti)
     );",
    "CREATE TABLE tower_fhir_signing_keys (
         kid text PRIMARY KEY,
         alg text NOT NULL,
         sealed bytea NOT NULL,
         published_at bigint NOT NULL,
         signs_from bigint NOT NULL,
         retire_at bigint
     );
     CREATE TABLE tower_fhir_auth_failures (
         client text NOT NULL,
         source text NOT NULL,
         window_start bigint NOT NULL,
         failures integer NOT NULL,
         blocks integer NOT NULL,
         blocked_until bigint,
         expires_at bigint NOT NULL,
         PRIMARY KEY (client, source)
     );
     CREATE INDEX tower_fhir_auth_failures_expiry ON tower_fhir_auth_failures (expires_at);",
    "CREATE TABLE tower_fhir_removed_tenants (
         id uuid PRIMARY KEY,
         removed_at timestamptz NOT NULL DEFAULT now()
     );",
    "CREATE TABLE tower_fhir_revoked_clients (
         issuer text NOT NULL,
         client text NOT NULL,
         revoked_at bigint NOT NULL,
         expires_at bigint NOT NULL,
         PRIMARY KEY (issuer, client)
     );",
    // The sweeps and the catch-ups find expired and live rows by `expires_at`.
    "CREATE INDEX tower_fhir_revoked_tokens_expiry ON tower_fhir_revoked_tokens (expires_at);
     CREATE INDEX tower_fhir_assertion_jtis_expiry ON tower_fhir_assertion_jtis (expires_at);
     CREATE INDEX tower_fhir_revoked_clients_expiry ON tower_fhir_revoked_clients (expires_at);",
    CLIENT_TENANTS,
    // Pages of the clients in byte order ([`ClientStore::clients_after`]), read by an index:
    // the primary key's is in the database's collation, which need not be the bytes' (`C`),
    // and serves no `COLLATE "C"` order even where it is (a page of 100 of 50,000 clients:
    // the whole table read and sorted, 13-15 ms, before; 0.7 ms by this index).
    "CREATE INDEX tower_fhir_clients_id_bytewise ON tower_fhir_clients (id COLLATE \"C\");",
];

/// What a token request reads of a client, kept beside its record so that the request never
/// reads the record's list of tenants (a client of 50,000 took 35 ms to read and parse, twice
/// a request): `head`, the record without its `tenants` (a generated column), and
/// `tower_fhir_client_tenants`, one row for each tenant in it, for a look-up of the one asked
/// for by its primary key. The record stays the one truth: a trigger keeps the rows as its
/// `tenants` are, in the transaction that writes it, whoever writes it (a replica of an
/// earlier version during a rolling upgrade, or an operator by hand); a change adds and
/// removes only the rows that differ (a tenant added to a client of 50,000: a few tenths
/// of a second).
///
/// A row holds the tenant as the record spells it: the stores write the hyphenated lower-case
/// form, which a look-up names. One written by hand in another form (upper case, braces) is
/// not found, so a token request for it is refused, though a whole read of the client shows
/// it; the rows take no time to check what each element is (a check of 50,000 took seconds).
const CLIENT_TENANTS: &str = r"
    ALTER TABLE tower_fhir_clients ADD COLUMN head jsonb GENERATED ALWAYS AS (
        CASE WHEN jsonb_typeof(record) = 'object' THEN record - 'tenants' END
    ) STORED;
    CREATE TABLE tower_fhir_client_tenants (
        client text NOT NULL,
        tenant text NOT NULL,
        PRIMARY KEY (client, tenant)
    );
    CREATE FUNCTION tower_fhir_record_tenants(client_record jsonb) RETURNS SETOF text
        LANGUAGE sql IMMUTABLE AS $$
        SELECT listed
        FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(client_record->'tenants') = 'array'
                                            THEN client_record->'tenants' ELSE '[]' END) AS listed
        WHERE listed IS NOT NULL
    $$;
    CREATE FUNCTION tower_fhir_client_tenants_follow() RETURNS trigger
        LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
            IF NEW.record->'tenants' IS NOT DISTINCT FROM OLD.record->'tenants' THEN
                RETURN NULL;
            END IF;
            DELETE FROM tower_fhir_client_tenants
             WHERE client = OLD.id
               AND tenant NOT IN (SELECT tower_fhir_record_tenants(NEW.record));
        ELSIF TG_OP = 'INSERT' THEN
            -- Rows an earlier client of this id left (its row emptied by TRUNCATE).
            DELETE FROM tower_fhir_client_tenants WHERE client = NEW.id;
        ELSE
            DELETE FROM tower_fhir_client_tenants WHERE client = OLD.id;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO tower_fhir_client_tenants (client, tenant)
            SELECT NEW.id, listed FROM tower_fhir_record_tenants(NEW.record) AS listed
            EXCEPT
            SELECT client, tenant FROM tower_fhir_client_tenants WHERE client = NEW.id
            ON CONFLICT DO NOTHING;
        END IF;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER tower_fhir_client_tenants_follow
        AFTER INSERT OR UPDATE OR DELETE ON tower_fhir_clients
        FOR EACH ROW EXECUTE FUNCTION tower_fhir_client_tenants_follow();
    INSERT INTO tower_fhir_client_tenants (client, tenant)
    SELECT clients.id, listed
    FROM tower_fhir_clients AS clients, tower_fhir_record_tenants(clients.record) AS listed
    ON CONFLICT DO NOTHING;
    ANALYZE tower_fhir_client_tenants;
";

/// The oldest PostgreSQL release served (`server_version_num` form): the schema and queries
/// use what 14 has (`jsonb_path_exists` needs 12; 14 is what the tests run on).
const OLDEST_SERVER: u32 = 140_000;

/// Refuses a server older than [`OLDEST_SERVER`] by its `server_version_num`, before any
/// migration: an older one would fail later, on a query a request makes.
fn supported_server(version_num: &str) -> Result<(), PgError> {
    match version_num.trim().parse::<u32>() {
        Ok(number) if number >= OLDEST_SERVER => Ok(()),
        Ok(number) => {
            // 10 on: major * 10000 + minor; before: major * 10000 + minor * 100 + patch.
            let release = if number >= 100_000 {
                format!("{}.{}", number / 10_000, number % 10_000)
            } else {
                format!("{}.{}", number / 10_000, number / 100 % 100)
            };
            Err(PgError::plain(format!(
                "the database server is PostgreSQL {release}: tower-fhir needs PostgreSQL 14 or later"
            )))
        }
        Err(_) => Err(PgError::plain(format!(
            "the database server's version ({version_num:?}) is not PostgreSQL's: tower-fhir needs PostgreSQL 14 or later"
        ))),
    }
}

/// The channel changes are announced on.
pub const CHANGES_CHANNEL: &str = "tower_fhir_changes";

/// Gauge: the pool's connections, by `state` (`in_use`, `idle`); see
/// [`PgState::record_pool_metrics`].
const POOL_CONNECTIONS: &str = "tower_fhir_db_pool_connections";
/// Gauge: the most connections the pool opens.
const POOL_MAX_CONNECTIONS: &str = "tower_fhir_db_pool_max_connections";
/// Gauge: the operations waiting for a pooled connection.
const POOL_WAITING: &str = "tower_fhir_db_pool_waiting";
/// Gauge: by `listener`, how many listeners of that name are connected and listening now (one
/// or none in the gateway).
const LISTENER_LISTENING: &str = "tower_fhir_db_listener_listening";
/// Counter: by `listener`, how often one listened again after a lost connection, having caught
/// up with what it may have missed.
const LISTENER_RECONNECTIONS: &str = "tower_fhir_db_listener_reconnections_total";

/// Why the database could not be opened.
#[derive(Debug)]
pub struct PgError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// Refused for what was asked, not for the database: asking again will not help.
    refused: bool,
}

impl PgError {
    fn plain(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
            refused: false,
        }
    }

    /// Refused for what was asked (say, retiring the key that signs), not because the
    /// database failed.
    fn refused(message: impl Into<String>) -> Self {
        Self {
            refused: true,
            ..Self::plain(message)
        }
    }

    /// Whether the request itself was refused (asking again will not help), rather than the
    /// database failing.
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    fn new(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
            refused: false,
        }
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        // The whole chain: the pool's and the driver's own words ("db error") say little;
        // the server's (a password refused, a database that does not exist) are below them.
        crate::causes::write_sources(
            f,
            String::new(),
            self.source
                .as_deref()
                .map(|source| source as &(dyn std::error::Error + 'static)),
        )
    }
}

impl From<crate::seal::SealError> for PgError {
    fn from(error: crate::seal::SealError) -> Self {
        Self::plain(error.to_string())
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// A pool of connections to the gateway's database, its schema up to date.
#[derive(Clone)]
pub struct PgState {
    pool: Pool,
    /// For the connections that listen for changes.
    config: Dial,
}

/// How a connection of its own (a listener's) is made: the database's configuration and its
/// TLS.
#[derive(Clone)]
struct Dial {
    config: tokio_postgres::Config,
    tls: tls::PgTls,
}

impl fmt::Debug for PgState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: not shown.
        f.debug_struct("PgState")
            .field("pool", &self.pool.status())
            .finish()
    }
}

/// The `application_name` the pool's sessions give the server, for an operator to tell them
/// in `pg_stat_activity`; each change listener's is [`LISTENER_APPLICATION_NAME`] and its
/// name. An `application_name` in the database URL is kept instead, for every session.
const POOL_APPLICATION_NAME: &str = "tower-fhir";

/// What a change listener's `application_name` begins with: `tower-fhir listener tenants`,
/// `tower-fhir listener revocations`, `tower-fhir listener keys`.
const LISTENER_APPLICATION_NAME: &str = "tower-fhir listener";

/// Set on each pooled connection when it is made: the server finds a replica that went away
/// without a word (its host down, a network cut) in about a minute, not at its operating
/// system's default of two hours, so the locks its session or transaction held (the tenant
/// writes', the signing keys') are let go. A `SET`, not a startup option: a pooler in front
/// of the database (PgBouncer) refuses unknown startup options, and takes a `SET` (there the
/// server's peer is the pooler, and the pooler's own keepalives find a dead replica). On a
/// Unix-domain socket the server ignores them.
///
/// With them, the server's own bounds on what a session waits for: a lock at most as long as
/// an operation may take ([`OPERATION_TIMEOUT`]), a statement at most as long as the slowest
/// ([`LONG_OPERATION_TIMEOUT`]), a transaction left idle (a replica frozen while it held a
/// row's lock) a minute. An operation the gateway gave up on stops waiting on the server too:
/// dropping its connection does not reach a backend waiting for a lock (the server reads
/// nothing from its client meanwhile), so without them every request a table lock outlived
/// left a backend behind, and the pool's next connections joined them until the server had
/// no connection slot left for anyone. Migrations, which may take longer, lift them for
/// their own transaction.
const SESSION_SETTINGS: &str = "SET tcp_keepalives_idle = 30; \
     SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000; \
     SET lock_timeout = 5000; SET statement_timeout = 60000; \
     SET idle_in_transaction_session_timeout = 60000";

impl PgState {
    /// Connects to `url` (`postgres://user[:password]@host:port/database`) and migrates the
    /// schema. At most 16 connections are pooled; a connection is waited for at most 5 s.
    /// The migrations wait for the [`MIGRATION_LOCK`] without a bound (a replica starting
    /// while another migrates starts once that one is done), saying so at `warn` after 5 s.
    ///
    /// A database beyond loopback is reached over TLS, its certificate checked against the
    /// webpki roots for the URL's host, or not at all, unless the URL says `sslmode=disable`;
    /// a loopback address, `localhost` or a Unix socket in clear unless it says
    /// `sslmode=require` (`prefer`, or none, is read as the place says). A private CA:
    /// [`connect_with_roots`](Self::connect_with_roots).
    pub async fn connect(url: &str) -> Result<Self, PgError> {
        Self::connect_with_roots(url, &[]).await
    }

    /// [`connect`](Self::connect), trusting the server certificates `extra_roots` (PEM
    /// certificates: a private CA's) sign as well as the webpki roots.
    pub async fn connect_with_roots(url: &str, extra_roots: &[Vec<u8>]) -> Result<Self, PgError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| PgError::new("the database URL is not valid", e))?;
        tls::default_ssl_mode(&mut config);
        let tls = tls::PgTls::new(extra_roots).map_err(PgError::plain)?;
        // A connection whose peer went away without a word (a host down, a firewall or NAT
        // that forgets idle flows) is found out by TCP in about a minute, not hours: idle,
        // by keepalive probes; with data unacknowledged, by the user timeout.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5));
        // The listeners name their sessions themselves (`listen`), unless the URL names them.
        let dial = config.clone();
        if config.get_application_name().is_none() {
            config.application_name(POOL_APPLICATION_NAME);
        }
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                // Each pooled connection is checked (an empty query, at most 2 s) before it
                // is used again: one that stopped answering is let go, not handed to the next
                // request to hang on.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(SESSION_SETTINGS)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)
                })
            }))
            .max_size(16)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| PgError::new("the connection pool cannot be made", e))?;
        let state = Self {
            pool,
            config: Dial { config: dial, tls },
        };
        state.migrate().await?;
        Ok(state)
    }

    /// Whether the database answers now (a `SELECT 1` through the pool): for a readiness
    /// check. A pool with every connection in use counts as answering, without a query: its
    /// requests are being served, and a ping waiting its turn behind them (up to 5 s) would
    /// take every busy replica out of its balancer at once under load. The price: a database
    /// that hangs with its connections open shows as answering for as long as requests keep
    /// every connection taken (each of them fails after its 5 s meanwhile); one that is down
    /// is found out as its connections fail and the pool shrinks.
    pub async fn ping(&self) -> Result<(), PgError> {
        let status = self.pool.status();
        if status.available == 0 && status.size >= status.max_size {
            return Ok(());
        }
        let connection = self
            .pool
            .get()
            .await
            .map_err(|e| PgError::new("cannot connect to the database", e))?;
        connection
            .execute("SELECT 1", &[])
            .await
            .map_err(|e| PgError::new("the database does not answer", e))?;
        Ok(())
    }

    /// Applies the migrations not applied yet, under the advisory lock.
    async fn migrate(&self) -> Result<(), PgError> {
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|e| PgError::new("cannot connect to the database", e))?;
        let failed = |e| PgError::new("the database schema cannot be brought up to date", e);
        let version: String = connection
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(failed)?
            .get(0);
        supported_server(&version)?;
        let transaction = connection.transaction().await.map_err(failed)?;
        // Another replica's migrations may hold the lock, and a migration take, longer than
        // a request's bounds (`SESSION_SETTINGS`). (No `NOTICE` either: every start's
        // "relation already exists, skipping" reached the log, through `tokio_postgres`.)
        transaction
            .batch_execute(
                "SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0; \
                 SET LOCAL client_min_messages = warning",
            )
            .await
            .map_err(failed)?;
        take_migration_lock(
            &self.pool,
            transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]),
        )
        .await
        .map_err(failed)?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS tower_fhir_migrations (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(failed)?;
        let applied: i32 = transaction
            .query_one(
                "SELECT coalesce(max(version), 0) FROM tower_fhir_migrations",
                &[],
            )
            .await
            .map_err(failed)?
            .get(0);
        if usize::try_from(applied).unwrap_or(usize::MAX) > MIGRATIONS.len() {
            return Err(PgError::plain(format!(
                "the database's schema is at version {applied}, past this version's {}: a newer tower-fhir migrated it; run that one",
                MIGRATIONS.len()
            )));
        }
        for (version, migration) in (1..).zip(MIGRATIONS) {
            if version <= applied {
                continue;
            }
            transaction.batch_execute(migration).await.map_err(failed)?;
            transaction
                .execute(
                    "INSERT INTO tower_fhir_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await
                .map_err(failed)?;
            tracing::info!(version, "database migration applied");
        }
        transaction.commit().await.map_err(failed)
    }

    /// Sets the connection pool's gauges to its state now: `tower_fhir_db_pool_connections`
    /// (label `state`: `in_use`, handed to an operation, or `idle`, open and waiting in the
    /// pool), `tower_fhir_db_pool_max_connections` (the most it opens, 16) and
    /// `tower_fhir_db_pool_waiting` (operations waiting for a connection, each at most 5 s),
    /// through the [`metrics`] recorder installed. A lock and four gauges set: call it on an
    /// interval (the gateway does once a second) or before rendering a scrape, never on a
    /// request's path. (The listeners' metrics need no call: see the [module docs](self).)
    pub fn record_pool_metrics(&self) {
        let status = self.pool.status();
        let in_use = status.size.saturating_sub(status.available);
        // (Counts of connections and waiters: far within f64's exact integers.)
        #[allow(clippy::cast_precision_loss)]
        let count = |count: usize| count as f64;
        metrics::gauge!(POOL_CONNECTIONS, "state" => "in_use").set(count(in_use));
        metrics::gauge!(POOL_CONNECTIONS, "state" => "idle").set(count(status.available));
        metrics::gauge!(POOL_MAX_CONNECTIONS).set(count(status.max_size));
        metrics::gauge!(POOL_WAITING).set(count(status.waiting));
    }

    /// Where a token endpoint records its revocations
    /// ([`TokenEndpointBuilder::revocation_log`](crate::token::TokenEndpointBuilder::revocation_log)):
    /// a table, each revocation `NOTIFY`ed; with [`follow_revocations`](Self::follow_revocations)
    /// every replica refuses a revoked token within moments.
    pub fn revocation_log(&self) -> PgRevocationLog {
        PgRevocationLog {
            pool: self.pool.clone(),
        }
    }

    /// Where a token endpoint checks client assertions' `jti`s across replicas
    /// ([`TokenEndpointBuilder::assertion_replay_guard`](crate::token::TokenEndpointBuilder::assertion_replay_guard)):
    /// an assertion accepted by one replica is refused by every other until it expires.
    pub fn assertion_replay_guard(&self) -> PgReplayGuard {
        PgReplayGuard {
            pool: self.pool.clone(),
        }
    }

    /// Keeps `revoked` (the list a replica's bearer layer refuses tokens from; the token
    /// endpoint's [`revoked_tokens`](crate::token::TokenEndpoint::revoked_tokens)) in step with
    /// every replica's revocations: those still in force before this returns (so a replica
    /// refuses them from its first request), then each as it is announced, and all of them
    /// again after the listening connection was lost. The listening stops when nothing else
    /// holds the list. Needs a tokio runtime.
    ///
    /// The answer tells whether the listener hears the announcements now
    /// ([`RevocationsFollowed::is_listening`]): while it does not (its connection lost, until
    /// it is made again and has read every revocation anew), a revocation another replica
    /// records is not refused here. A readiness check.
    ///
    /// The list is [confirmed current](RevokedTokens::confirm_current) as the listener shows
    /// it hears the database: when it has read every revocation, and by an empty query on its
    /// connection at least every fifth of the list's
    /// [`max_staleness`](RevokedTokens::set_max_staleness) (1 s at least), as of that query
    /// once every revocation announced before it was read (a burst of announcements, or a
    /// flood of forged ones, holds a confirmation back by the reads it waits for, no more).
    /// With a limit set, a replica cut off from the database refuses every token (`503`) once
    /// its list was last confirmed longer ago than that, instead of taking those revoked
    /// through another replica meanwhile.
    pub async fn follow_revocations(
        &self,
        revoked: &RevokedTokens,
    ) -> Result<RevocationsFollowed, PgError> {
        let asked = std::time::Instant::now();
        let now = revocations(&self.pool)
            .await
            .map_err(|e| PgError::plain(format!("cannot read the revoked tokens: {e}")))?;
        for entry in now {
            revoked.revoke_id(entry.iss.as_deref(), &entry.jti, entry.exp);
        }
        let clients = revoked_clients(&self.pool)
            .await
            .map_err(|e| PgError::plain(format!("cannot read the revoked clients: {e}")))?;
        for entry in clients {
            entry.apply(revoked);
        }
        // (Until the listener listens, nothing revoked after `asked` is heard: the list
        // turns stale after its limit if that takes too long.)
        revoked.confirm_current(asked);
        let (up, listening) = watch::channel(false);
        tokio::spawn(listen(
            self.config.clone(),
            RevocationChanges {
                pool: self.pool.clone(),
                revoked: revoked.clone(),
                up,
                rereads: Arc::new(tokio::sync::Semaphore::new(REREADS)),
                catching_up: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                catch_up_again: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                progress: Arc::default(),
            },
        ));
        Ok(RevocationsFollowed { listening })
    }

    /// The token endpoint's signing keys, shared by every replica
    /// ([`TokenEndpointBuilder::signing_keys`](crate::token::TokenEndpointBuilder::signing_keys)
    /// takes [`PgSigningKeys::signing_keys`]). Private keys are kept sealed with `kek`
    /// (AES-256-GCM), which every replica needs; one sealed with another key is an error
    /// here. The first call against a database without keys makes one (`ES256`), under an
    /// advisory lock, so replicas starting together share it. Each replica then follows every
    /// change within moments (`NOTIFY`, and a new read after a lost connection) and applies
    /// each key's schedule itself: see [`PgSigningKeys::rotate`]. Needs a tokio runtime.
    pub async fn signing_keys(&self, kek: KeyEncryptionKey) -> Result<PgSigningKeys, PgError> {
        PgSigningKeys::open(self.pool.clone(), self.config.clone(), kek).await
    }

    /// Failed authentications counted across replicas
    /// ([`TokenEndpointBuilder::shared_failure_counts`](crate::token::TokenEndpointBuilder::shared_failure_counts)),
    /// so that guesses spread over the replicas are throttled as if they met one.
    pub fn failure_counts(&self) -> PgFailureCounts {
        PgFailureCounts {
            pool: self.pool.clone(),
        }
    }

    /// The clients, their secrets hashed with `hashing`.
    pub fn client_store(&self, hashing: SecretHashing) -> PgClientStore {
        PgClientStore {
            pool: self.pool.clone(),
            hashing,
        }
    }

    /// The tenant directory. Its [`changes`](TenantStore::changes) carry this process's
    /// changes and, through a connection that `LISTEN`s on [`CHANGES_CHANNEL`], every other
    /// replica's, within moments of their commit. When that connection drops, it is made
    /// again (waiting 0.25 s, doubling up to 5 s, between attempts) and each tenant whose row
    /// changed meanwhile (by its version, `xmin`) is announced as changed, with those heard of
    /// whose versions it had not read yet, so caches forget what they may have missed and keep
    /// the rest; nothing waits for it meanwhile. (The listener reads the version of each
    /// tenant it hears of once notifications pause, at least once a second, and announces
    /// that tenant again then.) The listening stops when the last clone of the store is
    /// dropped. Needs a tokio runtime.
    pub fn tenant_store(&self) -> PgTenantStore {
        self.tenant_store_sealing(None)
    }

    /// [`tenant_store`](Self::tenant_store), sealing the upstreams' `authorization`
    /// credentials it writes with `kek` (AES-256-GCM, bound to the tenant and the upstream's
    /// base URL: a sealed credential copied to another tenant or upstream opens for none), so
    /// that the database, its backups and its replicas hold no usable credential. It reads
    /// credentials written in clear before (sealed when their tenant is next written) and
    /// sealed ones; a store without the key cannot read a sealed one (an error, not a tenant
    /// without its credential).
    pub fn sealed_tenant_store(&self, kek: KeyEncryptionKey) -> PgTenantStore {
        self.tenant_store_sealing(Some(kek))
    }

    fn tenant_store_sealing(&self, sealing: Option<KeyEncryptionKey>) -> PgTenantStore {
        let (changes, _) = broadcast::channel(1024);
        let alive = Arc::new(());
        let (up, listening) = watch::channel(false);
        let store = PgTenantStore {
            pool: self.pool.clone(),
            sealing: sealing.map(Arc::new),
            changes,
            _alive: Arc::clone(&alive),
            origin: Arc::from(origin()),
            listening,
        };
        tokio::spawn(listen(
            self.config.clone(),
            TenantChanges {
                store: store.clone_detached(),
                alive: Arc::downgrade(&alive),
                listed: HashMap::new(),
                pending: HashSet::new(),
                overflowed: false,
                up,
            },
        ));
        drop(alive);
        store
    }
}

/// Waits for the migration lock (`lock`: the migrating transaction's `pg_advisory_xact_lock`)
/// as long as it takes: two replicas must never migrate at once, and one that gave up would
/// not start at all, where waiting starts it as soon as the other is done. A wait past
/// [`MIGRATION_LOCK_PATIENCE`] is not a migration's (those take milliseconds) but a replica
/// stuck in one, or a session holding the lock by hand: said once at `warn`, with the lock's
/// key as `pg_locks` shows it and who holds it, and at `info` once the lock is taken.
async fn take_migration_lock(
    pool: &Pool,
    lock: impl std::future::Future<Output = Result<u64, tokio_postgres::Error>>,
) -> Result<(), tokio_postgres::Error> {
    let mut lock = std::pin::pin!(lock);
    let asked = std::time::Instant::now();
    if let Ok(taken) = tokio::time::timeout(MIGRATION_LOCK_PATIENCE, &mut lock).await {
        return taken.map(drop);
    }
    // (Read on another pooled connection; the lock's request stays queued on its own.)
    let holders = migration_lock_holders(pool)
        .await
        .unwrap_or_else(|error| format!("unknown (pg_locks cannot be read: {error})"));
    let (classid, objid) = advisory_key_halves(MIGRATION_LOCK);
    tracing::warn!(
        lock_key = MIGRATION_LOCK,
        holders = %holders,
        waited = ?asked.elapsed(),
        "waiting for the database migration lock: another replica is migrating the schema, or a session holds advisory lock {MIGRATION_LOCK} (in pg_locks: locktype 'advisory', classid {classid}, objid {objid}, objsubid 1); waiting on until it is let go"
    );
    lock.await?;
    tracing::info!(
        waited = ?asked.elapsed(),
        "database migration lock taken: migrating"
    );
    Ok(())
}

/// A `bigint` advisory lock key as `pg_locks` shows it: its high 32 bits in `classid`, its low
/// 32 bits in `objid`.
fn advisory_key_halves(key: i64) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = key.to_be_bytes();
    (
        u32::from_be_bytes([a, b, c, d]),
        u32::from_be_bytes([e, f, g, h]),
    )
}

/// The sessions holding the [`MIGRATION_LOCK`] in this database, with their application
/// and address where `pg_stat_activity` shows them (`$1`, `$2`: the key's halves).
const MIGRATION_LOCK_HOLDERS: &str = "SELECT l.pid, a.application_name, host(a.client_addr)
     FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.classid::bigint = $1 AND l.objid::bigint = $2
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Who holds the [`MIGRATION_LOCK`] in this database now, as `pg_locks` and `pg_stat_activity`
/// say (`pid 4242 (application "psql", from 10.0.0.5)`, comma-separated; `none found` when
/// nobody does any more), read within [`OPERATION_TIMEOUT`]. A role without
/// `pg_read_all_stats` sees other roles' process ids but not their application or address.
async fn migration_lock_holders(pool: &Pool) -> Result<String, String> {
    let (classid, objid) = advisory_key_halves(MIGRATION_LOCK);
    bounded(async move {
        let connection = pool.get().await.map_err(|e| e.to_string())?;
        let rows = connection
            .query(
                MIGRATION_LOCK_HOLDERS,
                &[&i64::from(classid), &i64::from(objid)],
            )
            .await
            .map_err(|e| crate::causes::Causes(&e).to_string())?;
        let holders = rows
            .iter()
            .map(|row| {
                Ok(lock_holder(
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                ))
            })
            .collect::<Result<Vec<String>, tokio_postgres::Error>>()
            .map_err(|e| crate::causes::Causes(&e).to_string())?;
        Ok(if holders.is_empty() {
            "none found".to_owned()
        } else {
            holders.join(", ")
        })
    })
    .await
}

/// One holder of a lock as an operator looks for it: its process id (none: a prepared
/// transaction), its application and address when known.
fn lock_holder(pid: Option<i32>, application: Option<String>, address: Option<String>) -> String {
    let pid = pid.map_or_else(
        || "a prepared transaction".to_owned(),
        |pid| format!("pid {pid}"),
    );
    match (application.filter(|name| !name.is_empty()), address) {
        (Some(application), Some(address)) => {
            format!("{pid} (application {application:?}, from {address})")
        }
        (Some(application), None) => format!("{pid} (application {application:?})"),
        (None, Some(address)) => format!("{pid} (from {address})"),
        (None, None) => pid,
    }
}

fn store_error(doing: &str, error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::with_source(format!("the database failed while {doing}"), error)
}

/// The longest a database operation may take (connecting included) before it fails as
/// the database not answering: a database that stops answering without closing its
/// connections (a hung server, a network that drops packets) must not hang requests.
pub(crate) const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// The same for operations that may be slow by nature: many tenants written or listed at
/// once, a secret hashed.
const LONG_OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// A database operation that got no answer within its time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimedOut(Duration);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the database did not answer within {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

impl From<tokio::time::error::Elapsed> for TimedOut {
    fn from(_: tokio::time::error::Elapsed) -> Self {
        Self(OPERATION_TIMEOUT)
    }
}

impl From<TimedOut> for StoreError {
    fn from(timed_out: TimedOut) -> Self {
        StoreError::with_source(timed_out.to_string(), timed_out)
    }
}

impl From<TimedOut> for DirectoryError {
    fn from(timed_out: TimedOut) -> Self {
        DirectoryError::with_source(timed_out.to_string(), timed_out)
    }
}

impl From<TimedOut> for PgError {
    fn from(timed_out: TimedOut) -> Self {
        PgError::new("the database did not answer in time", timed_out)
    }
}

impl From<TimedOut> for String {
    fn from(timed_out: TimedOut) -> Self {
        timed_out.to_string()
    }
}

/// `operation`, failing with [`TimedOut`] after [`OPERATION_TIMEOUT`].
pub(crate) async fn bounded<T, E: From<TimedOut>>(
    operation: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    bounded_for(OPERATION_TIMEOUT, operation).await
}

/// `operation`, failing with [`TimedOut`] after `limit`.
pub(crate) async fn bounded_for<T, E: From<TimedOut>>(
    limit: Duration,
    operation: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => result,
        Err(_) => Err(TimedOut(limit).into()),
    }
}

/// Clients in PostgreSQL (see the [module docs](self)).
#[derive(Clone)]
pub struct PgClientStore {
    pool: Pool,
    hashing: SecretHashing,
}

impl fmt::Debug for PgClientStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgClientStore")
            .field("hashing", &self.hashing)
            .finish_non_exhaustive()
    }
}

impl PgClientStore {
    /// A pooled connection to read client `id` with, or `None` when no client can have such
    /// an id (one with a NUL, which PostgreSQL's text cannot hold, would fail the query as a
    /// database error).
    async fn connection_for(
        &self,
        id: &str,
    ) -> Result<Option<deadpool_postgres::Object>, StoreError> {
        if !crate::token::is_client_id(id) {
            return Ok(None);
        }
        let connection = self
            .pool
            .get()
            .await
            .map_err(|e| store_error("connecting", e))?;
        Ok(Some(connection))
    }

    async fn read(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        let Some(connection) = self.connection_for(id).await? else {
            return Ok(None);
        };
        // Prepared once per pooled connection: one round trip a read.
        let statement = connection
            .prepare_cached("SELECT record FROM tower_fhir_clients WHERE id = $1")
            .await
            .map_err(|e| store_error("reading a client", e))?;
        let row = connection
            .query_opt(&statement, &[&id])
            .await
            .map_err(|e| store_error("reading a client", e))?;
        row.map(|row| client_record(id, row.get(0))).transpose()
    }

    /// The client narrowed to `tenant` ([`ClientStore::client_for_tenant`]), in one round
    /// trip: its `head` (the record without its tenants) and, by the primary key of
    /// `tower_fhir_client_tenants`, the tenant asked for (or, for `None`, the first two: one
    /// is the client's only tenant). Nothing read grows with the client's tenants (see
    /// [`CLIENT_TENANTS`]).
    async fn read_for_tenant(
        &self,
        id: &str,
        tenant: Option<TenantId>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        let Some(connection) = self.connection_for(id).await? else {
            return Ok(None);
        };
        let failed = |e| store_error("reading a client", e);
        // Two statements, not one with `$2 IS NULL OR ...`: a plan made for any `$2` could not
        // look the tenant up by the key. (`ORDER BY`, which the key's index gives: without it,
        // where a few clients hold most rows, a plan made for any client scans the table for
        // two rows, all of it for a client of one tenant.)
        let row = match tenant {
            Some(tenant) => {
                let statement = connection
                    .prepare_cached(
                        "SELECT c.head, ARRAY(SELECT t.tenant FROM tower_fhir_client_tenants t
                                               WHERE t.client = c.id AND t.tenant = $2)
                         FROM tower_fhir_clients c WHERE c.id = $1",
                    )
                    .await
                    .map_err(failed)?;
                connection
                    .query_opt(&statement, &[&id, &tenant.to_string()])
                    .await
            }
            None => {
                let statement = connection
                    .prepare_cached(
                        "SELECT c.head, ARRAY(SELECT t.tenant FROM tower_fhir_client_tenants t
                                               WHERE t.client = c.id ORDER BY t.tenant LIMIT 2)
                         FROM tower_fhir_clients c WHERE c.id = $1",
                    )
                    .await
                    .map_err(failed)?;
                connection.query_opt(&statement, &[&id]).await
            }
        }
        .map_err(failed)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let head: Option<serde_json::Value> = row.get(0);
        let found: Vec<String> = row.get(1);
        let mut head = match head {
            Some(serde_json::Value::Object(head)) => head,
            // Not an object: the whole record cannot be read either, and says why.
            _ => return client_record(id, head.unwrap_or_default()).map(Some),
        };
        head.insert("tenants".into(), serde_json::Value::Array(Vec::new()));
        let mut record = client_record(id, serde_json::Value::Object(head))?;
        record.tenants = match (tenant, found.as_slice()) {
            (Some(tenant), [_]) => vec![tenant],
            // (A row that is no tenant id, written by hand: no tenant.)
            (None, [only]) => TenantId::parse(only).into_iter().collect(),
            _ => Vec::new(),
        };
        Ok(Some(record))
    }

    /// Rotates the client's secret, only if `used` is still one of its live secrets when given
    /// ([`ClientStore::rotate_secret_from`]).
    fn rotate(&self, id: &str, used: Option<String>, grace: Duration) -> StoreFuture<ClientSecret> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            // Refused before hashing when it can be; checked again under the row lock.
            let mut current = Clients::default();
            if let Some(record) = this.read(&id).await? {
                current.clients.insert(id.clone(), record);
            }
            current.check_rotatable(&id)?;
            let hashing = this.hashing;
            let secret = blocking(move || HashedSecret::generate(hashing)).await?;
            this.modify(&id, "rotating a secret", move |clients, id| {
                clients.check_rotatable(id)?;
                clients.rotate_from(id, used.as_deref(), grace, secret)
            })
            .await
        }))
    }

    /// Runs `change` on the client's record (alone in a [`Clients`]) in a transaction that
    /// locks its row, and writes back what it leaves.
    async fn modify<T: Send + 'static>(
        &self,
        id: &str,
        doing: &'static str,
        change: impl FnOnce(&mut Clients, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(mut connection) = self.connection_for(id).await? else {
            return Err(StoreError::refused(format!("no client {id:?}")));
        };
        let failed = |e| store_error(doing, e);
        let transaction = connection.transaction().await.map_err(failed)?;
        let row = transaction
            .query_opt(
                "SELECT record FROM tower_fhir_clients WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(failed)?;
        let mut clients = Clients::default();
        if let Some(row) = row {
            let record: ClientRecord = client_record(id, row.get(0))?;
            clients.clients.insert(id.to_owned(), record);
        }
        let result = change(&mut clients, id)?;
        if let Some(record) = clients.clients.get(id) {
            let json = serde_json::to_value(record).map_err(|e| store_error(doing, e))?;
            transaction
                .execute(
                    "UPDATE tower_fhir_clients SET record = $2, updated_at = now() WHERE id = $1",
                    &[&id, &json],
                )
                .await
                .map_err(failed)?;
        }
        transaction.commit().await.map_err(failed)?;
        Ok(result)
    }
}

impl PgClientStore {
    /// The client records a query (`SELECT record ...`, no parameters) finds; `doing` names it
    /// in a failure.
    fn records(
        &self,
        query: &'static str,
        doing: &'static str,
        unreadable: Unreadable,
    ) -> StoreFuture<Vec<ClientRecord>> {
        let pool = self.pool.clone();
        Box::pin(bounded(async move {
            let connection = pool.get().await.map_err(|e| store_error("connecting", e))?;
            let rows = connection
                .query(query, &[])
                .await
                .map_err(|e| store_error(doing, e))?;
            let mut records = Vec::with_capacity(rows.len());
            for row in rows {
                let id: String = row.get(0);
                match client_record(&id, row.get(1)) {
                    Ok(record) => records.push(record),
                    Err(error) if unreadable == Unreadable::LeftOut => {
                        tracing::error!(client = %id, %error, "a stored client record cannot be read: left out of the list (correct or delete its row in tower_fhir_clients)");
                    }
                    Err(error) => return Err(error),
                }
            }
            Ok(records)
        }))
    }
}

/// What a listing does with a stored client record it cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreadable {
    /// Leaves it out, with an error in the log: one bad row does not hide every client from
    /// the administrator.
    LeftOut,
    /// Fails the listing, naming it: the revoked clients, whose tokens must stay refused.
    Fails,
}

/// A stored client record, read; an error naming the client when it cannot be (a row written
/// by hand, or by a later version).
fn client_record(id: &str, record: serde_json::Value) -> Result<ClientRecord, StoreError> {
    serde_json::from_value(record).map_err(|e| {
        StoreError::with_source(
            format!("the stored record of client {id:?} cannot be read"),
            e,
        )
    })
}

impl ClientStore for PgClientStore {
    fn client(&self, id: &str) -> StoreFuture<Option<ClientRecord>> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded(async move { this.read(&id).await }))
    }

    /// Without reading the client's record or its list of tenants: the record without its
    /// tenants, and the tenant asked for looked up by key in `tower_fhir_client_tenants` (see
    /// the [module docs](self)), in one round trip.
    fn client_for_tenant(
        &self,
        id: &str,
        tenant: Option<TenantId>,
    ) -> StoreFuture<Option<ClientRecord>> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded(
            async move { this.read_for_tenant(&id, tenant).await },
        ))
    }

    fn revoked_clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        // Compared as text: a row whose `revoked` is no boolean fails no cast (and is read,
        // named if it cannot be, as the others). Found by `head`: the records of the clients
        // not revoked, their tenant lists, are not read.
        self.records(
            "SELECT id, record FROM tower_fhir_clients WHERE head->>'revoked' = 'true'",
            "listing the revoked clients",
            Unreadable::Fails,
        )
    }

    fn clients(&self) -> StoreFuture<Vec<ClientRecord>> {
        // Byte order, as the other stores sort: not the database's collation.
        self.records(
            "SELECT id, record FROM tower_fhir_clients ORDER BY id COLLATE \"C\"",
            "listing the clients",
            Unreadable::LeftOut,
        )
    }

    /// Only the page's rows, in byte order (`COLLATE "C"`, whatever the database's
    /// collation), read by the index `tower_fhir_clients_id_bytewise` (migration 9), never
    /// the whole table. A stored record that cannot be read is left out, as
    /// [`clients`](ClientStore::clients) leaves it out (with an error in the log), and the
    /// page filled from the rows after it. An `after` holding a NUL, which no stored id can
    /// (PostgreSQL's text cannot), pages as its part before the NUL does: the same clients
    /// sort after both.
    fn clients_after(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> StoreFuture<Vec<ClientRecord>> {
        let pool = self.pool.clone();
        let after = after.map(|after| after.split('\0').next().unwrap_or_default().to_owned());
        Box::pin(bounded(async move {
            const AFTER: &str = "SELECT id, record FROM tower_fhir_clients
                 WHERE id COLLATE \"C\" > $1 ORDER BY id COLLATE \"C\" LIMIT $2";
            const FIRST: &str =
                "SELECT id, record FROM tower_fhir_clients ORDER BY id COLLATE \"C\" LIMIT $1";
            let connection = pool.get().await.map_err(|e| store_error("connecting", e))?;
            let failed = |e| store_error("listing the clients", e);
            let (mut page, mut after) = (Vec::new(), after);
            loop {
                // (`LIMIT NULL`: no limit.)
                let wanted = limit.map(|limit| limit.saturating_sub(page.len()));
                let asked = wanted.map(|wanted| i64::try_from(wanted).unwrap_or(i64::MAX));
                let rows = match &after {
                    Some(after) => connection.query(AFTER, &[after, &asked]).await,
                    None => connection.query(FIRST, &[&asked]).await,
                }
                .map_err(failed)?;
                let read = rows.len();
                for row in rows {
                    let id: String = row.get(0);
                    match client_record(&id, row.get(1)) {
                        Ok(record) => page.push(record),
                        Err(error) => {
                            tracing::error!(client = %id, %error, "a stored client record cannot be read: left out of the list (correct or delete its row in tower_fhir_clients)");
                        }
                    }
                    after = Some(id);
                }
                // The rows ran out, or the page is full.
                if wanted.is_none_or(|wanted| read < wanted)
                    || limit.is_some_and(|limit| page.len() >= limit)
                {
                    return Ok(page);
                }
            }
        }))
    }

    fn register(&self, client: NewClient) -> StoreFuture<ClientSecret> {
        let this = self.clone();
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            // Everything but "already taken" is checked before hashing; the hash is made
            // before any transaction; the insert refuses a taken id atomically.
            Clients::default().check_new(&client)?;
            let hashing = this.hashing;
            let (client, secret) = blocking(move || {
                let secret = HashedSecret::for_client(&client, hashing)?;
                Ok((client, secret))
            })
            .await?;
            let id = client.id().to_owned();
            let mut made = Clients::default();
            let secret = made.register(client, secret)?;
            let record = made
                .clients
                .get(&id)
                .ok_or_else(|| StoreError::new("the registered client went missing"))?;
            let json =
                serde_json::to_value(record).map_err(|e| store_error("registering a client", e))?;
            let connection = this
                .pool
                .get()
                .await
                .map_err(|e| store_error("connecting", e))?;
            let inserted = connection
                .execute(
                    "INSERT INTO tower_fhir_clients (id, record) VALUES ($1, $2)
                     ON CONFLICT (id) DO NOTHING",
                    &[&id, &json],
                )
                .await
                .map_err(|e| store_error("registering a client", e))?;
            if inserted == 0 {
                return Err(StoreError::refused(format!(
                    "client {id:?} is already registered"
                )));
            }
            Ok(secret)
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
        Box::pin(bounded(async move {
            this.modify(&id, "revoking a client", move |clients, id| {
                clients.revoke(id)
            })
            .await
        }))
    }

    fn set_entitlements(
        &self,
        id: &str,
        tenants: Vec<TenantId>,
        scopes: Vec<String>,
    ) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded(async move {
            this.modify(&id, "changing entitlements", move |clients, id| {
                clients.set_entitlements(id, tenants, scopes)
            })
            .await
        }))
    }

    fn hashing(&self) -> SecretHashing {
        self.hashing
    }

    fn set_rate_limit(&self, id: &str, limit: Option<RateLimit>) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded(async move {
            this.modify(&id, "changing a rate limit", move |clients, id| {
                clients.set_rate_limit(id, limit)
            })
            .await
        }))
    }

    fn set_keys(&self, id: &str, keys: ClientKeys) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded(async move {
            this.modify(&id, "replacing client keys", move |clients, id| {
                clients.set_keys(id, keys)
            })
            .await
        }))
    }

    fn update(&self, id: &str, update: ClientUpdate) -> StoreFuture<()> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(bounded(async move {
            this.modify(&id, "changing a client", move |clients, id| {
                clients.update(id, update)
            })
            .await
        }))
    }
}

/// The clients' rate limits, read from the database (without their tenants).
impl crate::limit::ClientLimits for PgClientStore {
    fn client_limit(&self, client_id: &str) -> crate::limit::ClientLimitFuture {
        crate::token::limit_of(self.client_for_tenant(client_id, None))
    }
}

/// What [`PgTenantStore::seal_stored_credentials`] sealed: how many tenants' records held a
/// credential in clear, and how many one that only the key's previous key opened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CredentialsSealed {
    /// Tenants whose records held an upstream credential in clear, sealed now.
    pub in_clear: usize,
    /// Tenants whose records held an upstream credential sealed with the previous key,
    /// sealed again with the key.
    pub previous: usize,
}

/// How many tenants [`PgTenantStore`]'s `present` looks up by their ids at most; more, and
/// it reads the list (20,000 tenants: 3.7 ms for 1,000 ids, 53 ms for 50,000, 26 ms for the
/// list).
const PRESENT_BY_LIST: usize = 20_000;

/// The tenant directory in PostgreSQL (see the [module docs](self)).
#[derive(Clone)]
pub struct PgTenantStore {
    pool: Pool,
    /// Seals the upstreams' credentials it writes, opens those it reads.
    sealing: Option<Arc<KeyEncryptionKey>>,
    changes: broadcast::Sender<TenantId>,
    /// Held by every clone the user has: the listener stops when none is left.
    _alive: Arc<()>,
    /// Names this store in its notifications, so its listener skips its own changes (its
    /// subscribers heard them already).
    origin: Arc<str>,
    /// Whether the listener is connected and listening now.
    listening: watch::Receiver<bool>,
}

impl fmt::Debug for PgTenantStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTenantStore").finish_non_exhaustive()
    }
}

fn directory_error(
    doing: &str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> DirectoryError {
    DirectoryError::with_source(format!("the database failed while {doing}"), error)
}

fn uuid(tenant: TenantId) -> Uuid {
    Uuid::from_bytes(*tenant.as_bytes())
}

impl PgTenantStore {
    /// Whether the listener for other replicas' changes is connected and listening now: false
    /// until its first `LISTEN` has taken effect, and while it connects again after a drop.
    /// Until then, a change another replica makes reaches this process's caches only when
    /// their entries expire (or, after a drop, when it resynchronises): a readiness check.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Resolves once the listener is connected and listening (at once if it is). A process
    /// that awaits it before serving caches nothing a change could go unheard for: a tenant
    /// another replica onboards in the moments after this store is made would otherwise stay
    /// cached as unknown for the route cache's negative TTL.
    pub async fn listening(&self) {
        let mut listening = self.listening.clone();
        // An error: the listener has stopped, which it does only when no store is left.
        let _ = listening.wait_for(|up| *up).await;
    }

    /// A clone that does not keep the listener alive (the listener's own).
    fn clone_detached(&self) -> Detached {
        Detached {
            pool: self.pool.clone(),
            changes: self.changes.clone(),
            origin: Arc::clone(&self.origin),
            resealing: self
                .sealing
                .clone()
                .filter(|kek| kek.has_previous())
                .map(|kek| Resealing::start(self.pool.clone(), kek, Arc::downgrade(&self._alive))),
        }
    }

    /// Adds `tenant` unless the directory holds it already or held it and it was removed (the
    /// addition announced as every change is); whether it was added. For seeding many
    /// replicas from one configuration: none of them overwrites a change made since through
    /// another, nor brings back a tenant removed since. ([`put`](TenantStore::put) onboards a
    /// removed tenant again.)
    pub async fn insert_if_absent(
        &self,
        tenant: TenantId,
        record: &TenantRecord,
    ) -> Result<bool, DirectoryError> {
        let failed = |e| directory_error("adding a tenant", e);
        let json =
            serde_json::to_value(record).map_err(|e| directory_error("adding a tenant", e))?;
        let json = seal_credentials(self.sealing.as_deref(), tenant, json)?;
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|e| directory_error("connecting", e))?;
        let transaction = connection.transaction().await.map_err(failed)?;
        let added = transaction
            .execute(
                "INSERT INTO tower_fhir_tenants (id, record)
                 SELECT $1, $2
                 WHERE NOT EXISTS (SELECT 1 FROM tower_fhir_removed_tenants WHERE id = $1)
                 ON CONFLICT (id) DO NOTHING",
                &[&uuid(tenant), &json],
            )
            .await
            .map_err(failed)?
            == 1;
        if added {
            notify(&transaction, tenant, &self.origin)
                .await
                .map_err(failed)?;
        }
        transaction.commit().await.map_err(failed)?;
        if added {
            let _ = self.changes.send(tenant);
        }
        Ok(added)
    }

    /// Seals the upstream credentials the directory holds in clear (written by a store
    /// without the key, or by a version before sealing) and, when the key has a previous
    /// key ([`KeyEncryptionKey::with_previous`]: the key being changed), seals again with the
    /// key those only the previous key opens; each tenant's record rewritten only if
    /// unchanged meanwhile. Nothing changes in what the records say (no change is announced).
    /// Without a key, none. Old row versions, the write-ahead log and backups keep what was in
    /// clear: rotate such credentials.
    ///
    /// With a previous key every record holding a credential is read (once, at start), and
    /// one that neither key opens is an error (as a lookup of that tenant would be).
    pub async fn seal_stored_credentials(&self) -> Result<CredentialsSealed, DirectoryError> {
        let Some(kek) = self.sealing.as_deref() else {
            return Ok(CredentialsSealed::default());
        };
        let failed = |e| directory_error("sealing the stored credentials", e);
        let connection = self
            .pool
            .get()
            .await
            .map_err(|e| directory_error("connecting", e))?;
        let rows = connection
            .query(
                "SELECT id, record FROM tower_fhir_tenants
                 WHERE jsonb_path_exists(record, '$.upstreams[*].authorization')
                    OR ($1 AND jsonb_path_exists(record, '$.upstreams[*].authorization_sealed'))",
                &[&kek.has_previous()],
            )
            .await
            .map_err(failed)?;
        let mut sealed = CredentialsSealed::default();
        for row in rows {
            let id: Uuid = row.try_get(0).map_err(failed)?;
            let record: serde_json::Value = row.try_get(1).map_err(failed)?;
            let Ok(tenant) = TenantId::parse(&id.to_string()) else {
                continue;
            };
            // Opened first: a record may hold some upstreams' credentials sealed beside others
            // in clear (written by hand); one holding a credential both ways is refused, saying
            // so.
            let Some((json, resealed)) =
                crate::at_rest::reseal_credentials(kek, tenant, record.clone())
                    .map_err(DirectoryError::new)?
            else {
                continue;
            };
            let written = connection
                .execute(
                    "UPDATE tower_fhir_tenants SET record = $2 WHERE id = $1 AND record = $3",
                    &[&id, &json, &record],
                )
                .await
                .map_err(failed)?;
            if written > 0 {
                sealed.in_clear += usize::from(resealed.in_clear > 0);
                sealed.previous += usize::from(resealed.previous > 0);
            }
        }
        Ok(sealed)
    }

    /// Writes `tenants` in one transaction, each change `NOTIFY`ed with it; `true` for each
    /// that replaced a tenant.
    async fn write(
        &self,
        tenants: Vec<(TenantId, TenantRecord)>,
    ) -> Result<Vec<bool>, DirectoryError> {
        let failed = |e| directory_error("writing tenants", e);
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|e| directory_error("connecting", e))?;
        let transaction = connection.transaction().await.map_err(failed)?;
        let mut replaced = Vec::with_capacity(tenants.len());
        for (tenant, record) in &tenants {
            let json =
                serde_json::to_value(record).map_err(|e| directory_error("writing tenants", e))?;
            let json = seal_credentials(self.sealing.as_deref(), *tenant, json)?;
            let row = transaction
                .query_one(
                    "INSERT INTO tower_fhir_tenants (id, record) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, updated_at = now()
                     RETURNING (xmax <> 0)",
                    &[&uuid(*tenant), &json],
                )
                .await
                .map_err(failed)?;
            replaced.push(row.get(0));
            transaction
                .execute(
                    "DELETE FROM tower_fhir_removed_tenants WHERE id = $1",
                    &[&uuid(*tenant)],
                )
                .await
                .map_err(failed)?;
            notify(&transaction, *tenant, &self.origin)
                .await
                .map_err(failed)?;
        }
        transaction.commit().await.map_err(failed)?;
        for (tenant, _) in tenants {
            let _ = self.changes.send(tenant);
        }
        Ok(replaced)
    }
}

/// The advisory lock tenant writers that check other tenants take (`tfhirtnt`, another than
/// the migrations').
const TENANT_WRITES_LOCK: i64 = 0x7466_6869_7274_6e74;

/// A pooled connection holding a session lock: closed when dropped (taken out of the pool),
/// which ends the session and frees the lock.
struct SessionLock(Option<deadpool_postgres::Object>);

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            drop(deadpool_postgres::Object::take(connection));
        }
    }
}

/// `NOTIFY`s a tenant's change: `tenant:<id> <origin>`.
async fn notify(
    transaction: &deadpool_postgres::Transaction<'_>,
    tenant: TenantId,
    origin: &str,
) -> Result<(), tokio_postgres::Error> {
    transaction
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANGES_CHANNEL, &format!("tenant:{tenant} {origin}")],
        )
        .await
        .map(drop)
}

/// A tenant record's JSON with each upstream's `authorization` sealed (with `kek`; as it is
/// without one).
fn seal_credentials(
    kek: Option<&KeyEncryptionKey>,
    tenant: TenantId,
    json: serde_json::Value,
) -> Result<serde_json::Value, DirectoryError> {
    crate::at_rest::seal_credentials(kek, tenant, json).map_err(DirectoryError::new)
}

/// A tenant record's JSON as read, each sealed credential opened with `kek` (an error when it
/// cannot be: no key, the wrong key, or a credential moved from another tenant or upstream).
fn open_credentials(
    kek: Option<&KeyEncryptionKey>,
    tenant: TenantId,
    json: serde_json::Value,
) -> Result<serde_json::Value, DirectoryError> {
    crate::at_rest::open_credentials(kek, tenant, json).map_err(DirectoryError::new)
}

impl TenantDirectory for PgTenantStore {
    fn lookup(&self, tenant: TenantId) -> DirectoryFuture {
        let pool = self.pool.clone();
        let sealing = self.sealing.clone();
        Box::pin(bounded(async move {
            let connection = pool
                .get()
                .await
                .map_err(|e| directory_error("connecting", e))?;
            // Prepared once per pooled connection: one round trip a lookup.
            let statement = connection
                .prepare_cached("SELECT record FROM tower_fhir_tenants WHERE id = $1")
                .await
                .map_err(|e| directory_error("looking a tenant up", e))?;
            let row = connection
                .query_opt(&statement, &[&uuid(tenant)])
                .await
                .map_err(|e| directory_error("looking a tenant up", e))?;
            row.map(|row| {
                let json = open_credentials(sealing.as_deref(), tenant, row.get(0))?;
                serde_json::from_value(json).map_err(|e| {
                    DirectoryError::with_source(
                        format!("the stored record of tenant {tenant} cannot be read"),
                        e,
                    )
                })
            })
            .transpose()
        }))
    }
}

impl TenantStore for PgTenantStore {
    fn put(&self, tenant: TenantId, upstreams: TenantRecord) -> TenantStoreFuture<bool> {
        let this = self.clone();
        Box::pin(bounded(async move {
            let replaced = this.write(vec![(tenant, upstreams)]).await?;
            Ok(replaced.first().copied().unwrap_or(false))
        }))
    }

    fn put_all(&self, tenants: Vec<(TenantId, TenantRecord)>) -> TenantStoreFuture<()> {
        let this = self.clone();
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            this.write(tenants).await.map(drop)
        }))
    }

    fn delete(&self, tenant: TenantId) -> TenantStoreFuture<bool> {
        let this = self.clone();
        Box::pin(bounded(async move {
            let failed = |e| directory_error("removing a tenant", e);
            let mut connection = this
                .pool
                .get()
                .await
                .map_err(|e| directory_error("connecting", e))?;
            let transaction = connection.transaction().await.map_err(failed)?;
            let removed = transaction
                .execute(
                    "DELETE FROM tower_fhir_tenants WHERE id = $1",
                    &[&uuid(tenant)],
                )
                .await
                .map_err(failed)?
                > 0;
            if removed {
                // Remembered, so that seeding from a configuration does not bring it back.
                transaction
                    .execute(
                        "INSERT INTO tower_fhir_removed_tenants (id) VALUES ($1)
                         ON CONFLICT (id) DO UPDATE SET removed_at = now()",
                        &[&uuid(tenant)],
                    )
                    .await
                    .map_err(failed)?;
                notify(&transaction, tenant, &this.origin)
                    .await
                    .map_err(failed)?;
            }
            transaction.commit().await.map_err(failed)?;
            if removed {
                let _ = this.changes.send(tenant);
            }
            Ok(removed)
        }))
    }

    fn list(&self) -> TenantStoreFuture<Vec<TenantId>> {
        let pool = self.pool.clone();
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            list(&pool).await
        }))
    }

    /// Only the page's ids, read by the primary key's index in its order: a `uuid`'s order
    /// is its bytes', [`TenantId`]'s (and its text's). Within the 60 s of a listing (a page
    /// without a limit may be every tenant).
    fn list_after(
        &self,
        after: Option<TenantId>,
        limit: Option<usize>,
    ) -> TenantStoreFuture<Vec<TenantId>> {
        let pool = self.pool.clone();
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            let connection = pool
                .get()
                .await
                .map_err(|e| directory_error("connecting", e))?;
            // (`LIMIT NULL`: no limit.)
            let limit = limit.map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
            const AFTER: &str =
                "SELECT id FROM tower_fhir_tenants WHERE id > $1 ORDER BY id LIMIT $2";
            const FIRST: &str = "SELECT id FROM tower_fhir_tenants ORDER BY id LIMIT $1";
            let rows = match after {
                Some(after) => connection.query(AFTER, &[&uuid(after), &limit]).await,
                None => connection.query(FIRST, &[&limit]).await,
            }
            .map_err(|e| directory_error("listing tenants", e))?;
            Ok(rows
                .iter()
                .map(|row| TenantId::from_uuid(row.get::<_, Uuid>(0)))
                .collect())
        }))
    }

    /// One query for those asked for (`id = ANY($1)`, on the primary key), not the whole list;
    /// past 20,000 of them, the list (cheaper than as many look-ups).
    fn present(&self, tenants: Vec<TenantId>) -> TenantStoreFuture<HashSet<TenantId>> {
        let pool = self.pool.clone();
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            if tenants.is_empty() {
                return Ok(HashSet::new());
            }
            if tenants.len() > PRESENT_BY_LIST {
                let asked: HashSet<TenantId> = tenants.into_iter().collect();
                let listed = list(&pool).await?;
                return Ok(listed.into_iter().filter(|t| asked.contains(t)).collect());
            }
            let connection = pool
                .get()
                .await
                .map_err(|e| directory_error("connecting", e))?;
            let ids: Vec<Uuid> = tenants.into_iter().map(uuid).collect();
            let rows = connection
                .query(
                    "SELECT id FROM tower_fhir_tenants WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(|e| directory_error("looking tenants up", e))?;
            Ok(rows
                .iter()
                .map(|row| TenantId::from_uuid(row.get::<_, Uuid>(0)))
                .collect())
        }))
    }

    /// One query for every tenant's record (each opened as [`lookup`] opens it), within the
    /// 60 s of a listing.
    ///
    /// [`lookup`]: TenantDirectory::lookup
    fn records(&self) -> TenantStoreBorrowingFuture<'_, Vec<(TenantId, TenantRecord)>> {
        let pool = self.pool.clone();
        let sealing = self.sealing.clone();
        Box::pin(bounded_for(LONG_OPERATION_TIMEOUT, async move {
            let connection = pool
                .get()
                .await
                .map_err(|e| directory_error("connecting", e))?;
            let rows = connection
                .query("SELECT id, record FROM tower_fhir_tenants ORDER BY id", &[])
                .await
                .map_err(|e| directory_error("listing tenants", e))?;
            rows.into_iter()
                .map(|row| {
                    let tenant = TenantId::from_uuid(row.get::<_, Uuid>(0));
                    let json = open_credentials(sealing.as_deref(), tenant, row.get(1))?;
                    let record = serde_json::from_value(json).map_err(|e| {
                        DirectoryError::with_source(
                            format!("the stored record of tenant {tenant} cannot be read"),
                            e,
                        )
                    })?;
                    Ok((tenant, record))
                })
                .collect()
        }))
    }

    fn changes(&self) -> broadcast::Receiver<TenantId> {
        self.changes.subscribe()
    }

    /// A session lock every replica's writers take (`pg_advisory_lock`), on a connection of
    /// its own that is closed, not pooled, when the lock is let go: ending the session frees
    /// the lock whatever happened meanwhile. Waiting for it fails after 5 s.
    fn lock_writes(&self) -> TenantStoreFuture<TenantWriteLock> {
        let pool = self.pool.clone();
        Box::pin(bounded(async move {
            let connection = pool
                .get()
                .await
                .map_err(|e| directory_error("connecting", e))?;
            // Held from here: a wait cut short closes the session, and with it the lock.
            let session = SessionLock(Some(connection));
            let Some(connection) = &session.0 else {
                unreachable!("set above")
            };
            connection
                .execute("SELECT pg_advisory_lock($1)", &[&TENANT_WRITES_LOCK])
                .await
                .map_err(|e| directory_error("locking tenant writes", e))?;
            Ok(TenantWriteLock::holding(session))
        }))
    }
}

/// What the listener needs of the store, without keeping it alive.
struct Detached {
    pool: Pool,
    changes: broadcast::Sender<TenantId>,
    origin: Arc<str>,
    /// While the store's key has a previous key: another replica's change is sealed again
    /// with it as it is heard of (see [`Resealing`]).
    resealing: Option<Resealing>,
}

/// The tenants heard of while the key changes, to be sealed again (see [`reseal_heard`]) by
/// one task of the store's, a tenant at a time: each once however often it was heard of, and
/// never more than one pooled connection (a replica onboarding thousands of tenants meanwhile
/// must not take them all, nor queue a task for each).
#[derive(Clone)]
struct Resealing {
    pending: Arc<Mutex<HashSet<TenantId>>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Resealing {
    /// Starts the task sealing again what is heard of with `kek`'s key; it ends once no store
    /// is `alive`.
    fn start(pool: Pool, kek: Arc<KeyEncryptionKey>, alive: Weak<()>) -> Self {
        let resealing = Self {
            pending: Arc::default(),
            wake: Arc::default(),
        };
        let this = resealing.clone();
        tokio::spawn(async move {
            while alive.strong_count() > 0 {
                // (Woken by a tenant heard of, or after a while to see whether the store is
                // gone.)
                let _ = tokio::time::timeout(Duration::from_secs(1), this.wake.notified()).await;
                let heard: Vec<TenantId> = std::mem::take(
                    &mut *this.pending.lock().unwrap_or_else(PoisonError::into_inner),
                )
                .into_iter()
                .collect();
                for tenant in heard {
                    reseal_heard(pool.clone(), Arc::clone(&kek), tenant).await;
                }
            }
        });
        resealing
    }

    /// `tenant`, heard of, to be sealed again.
    fn heard(&self, tenant: TenantId) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tenant);
        self.wake.notify_one();
    }
}

/// Every tenant in the directory, sorted by their text (as the other stores list them).
async fn list(pool: &Pool) -> Result<Vec<TenantId>, DirectoryError> {
    let connection = pool
        .get()
        .await
        .map_err(|e| directory_error("connecting", e))?;
    let rows = connection
        .query("SELECT id FROM tower_fhir_tenants ORDER BY id", &[])
        .await
        .map_err(|e| directory_error("listing tenants", e))?;
    Ok(rows
        .iter()
        .map(|row| TenantId::from_uuid(row.get::<_, Uuid>(0)))
        .collect())
}

/// Every tenant (or those of `only` that are there) with its row's version: `xmin`, the
/// transaction that wrote it, different after any write (for as long as a listener compares
/// them: transaction ids wrap after four billion).
async fn versions(
    pool: &Pool,
    only: Option<&[TenantId]>,
) -> Result<HashMap<TenantId, i64>, DirectoryError> {
    let connection = pool
        .get()
        .await
        .map_err(|e| directory_error("connecting", e))?;
    let rows = match only {
        None => {
            connection
                .query("SELECT id, xmin::text::bigint FROM tower_fhir_tenants", &[])
                .await
        }
        Some(tenants) => {
            let ids: Vec<Uuid> = tenants.iter().map(|tenant| uuid(*tenant)).collect();
            connection
                .query(
                    "SELECT id, xmin::text::bigint FROM tower_fhir_tenants WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
        }
    }
    .map_err(|e| directory_error("listing tenants", e))?;
    Ok(rows
        .iter()
        .map(|row| (TenantId::from_uuid(row.get::<_, Uuid>(0)), row.get(1)))
        .collect())
}

/// What a listener does with what it hears, and when to stop.
trait Handler: Send + 'static {
    /// The listener's name in its metrics' `listener` label (`tenants`, `revocations`,
    /// `keys`).
    fn name(&self) -> &'static str;

    /// Whether anybody still wants what it hears.
    fn alive(&self) -> bool;

    /// Connected and listening; `missed`: after a connection that failed or dropped, so
    /// notifications may have gone unheard. `Err` when it could not catch up with what it may
    /// have missed: the listener then connects again and retries, rather than listen on with
    /// a gap.
    fn listening(
        &mut self,
        missed: bool,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;

    /// A notification's payload.
    fn heard(&mut self, payload: &str);

    /// Not listening any more: the connection dropped (it is made again unless the handler
    /// is not alive).
    fn stopped(&mut self) {}

    /// How often the connection must show it is there even while notifications come (an
    /// empty query each time, then [`vouched`](Self::vouched)); `None`: only after
    /// [`LISTEN_HEARTBEAT`] of quiet.
    fn vouch_every(&self) -> Option<Duration> {
        None
    }

    /// The connection answered a query asked at `asked`, and every notification sent before
    /// that answer was handed to [`heard`](Self::heard): nothing announced before `asked` went
    /// unheard.
    fn vouched(&mut self, asked: std::time::Instant) {
        let _ = asked;
    }

    /// Catches up with what was heard, once every notification that came is handed to
    /// [`heard`](Self::heard) (and at least once a second while they keep coming), given up on
    /// after [`SETTLE_EVERY`] (then tried again at a later turn: it must leave its state as
    /// it was when cut short): reads what it needs to (the tenant listener, the versions of
    /// the tenants heard of). Nothing by default.
    fn settle(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// How long a listener that keeps hearing notifications goes at most without catching up with
/// them ([`Handler::settle`]), and how long it gives a catch-up before it goes on with the
/// notifications.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// How long the change listener may hear nothing before it checks its connection (an empty
/// query, answered within [`OPERATION_TIMEOUT`], else it connects again and catches up).
const LISTEN_HEARTBEAT: Duration = Duration::from_secs(10);

/// A listener's metrics, labelled with its name: whether it is connected and listening now
/// ([`LISTENER_LISTENING`]: it adds 1 while it is, so the gauge is 1 or 0 for the one listener
/// of each name a gateway has) and how often it listened again after a lost connection
/// ([`LISTENER_RECONNECTIONS`]). Changed only as the listener's state changes (a thread's own
/// word each, see `ops::BucketHistograms`), never on a request's path.
struct ListenerMetrics {
    listening: metrics::Gauge,
    reconnections: metrics::Counter,
    /// Whether this listener counts itself in `listening` now.
    up: bool,
}

impl ListenerMetrics {
    /// Registers the listener's metrics with the recorder installed now, so that a scrape
    /// shows them (at 0) before its first connection.
    fn new(listener: &'static str) -> Self {
        Self {
            listening: metrics::gauge!(LISTENER_LISTENING, "listener" => listener),
            reconnections: metrics::counter!(LISTENER_RECONNECTIONS, "listener" => listener),
            up: false,
        }
    }

    /// Listening, having caught up; `missed`: after a lost connection (a reconnection).
    fn listening(&mut self, missed: bool) {
        if missed {
            self.reconnections.increment(1);
        }
        if !self.up {
            self.up = true;
            self.listening.increment(1.0);
        }
    }

    /// Not listening (any more).
    fn stopped(&mut self) {
        if self.up {
            self.up = false;
            self.listening.decrement(1.0);
        }
    }
}

impl Drop for ListenerMetrics {
    /// A listener that ends (nothing wants what it hears, or its runtime shuts down) listens
    /// no more.
    fn drop(&mut self) {
        self.stopped();
    }
}

/// Listens on [`CHANGES_CHANNEL`] and hands what it hears to `handler`, connecting again
/// (waiting 0.25 s, doubling up to 5 s) whenever the connection drops, until the handler
/// is not alive any more. Its state is kept in [`ListenerMetrics`].
async fn listen(dial: Dial, mut handler: impl Handler) {
    let Dial { mut config, tls } = dial;
    if config.get_application_name().is_none() {
        config.application_name(format!("{LISTENER_APPLICATION_NAME} {}", handler.name()));
    }
    let mut metrics = ListenerMetrics::new(handler.name());
    let mut wait = Duration::from_millis(250);
    // Whether notifications may have gone unheard: after a connection that failed or
    // dropped (at the start, nothing was cached before the listener was made).
    let mut missed = false;
    while handler.alive() {
        // (A database that accepts the connection and then says nothing is given up on.)
        let connected = tokio::time::timeout(OPERATION_TIMEOUT, config.connect(tls.clone())).await;
        match connected.map_err(TimedOut::from) {
            Err(timed_out) => {
                tracing::warn!(%timed_out, retry_in = ?wait, "cannot connect to listen for database changes");
            }
            Ok(connected) => match connected {
                Ok((client, mut connection)) => {
                    let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(message) = futures::StreamExt::next(&mut messages).await {
                            match message {
                                Ok(tokio_postgres::AsyncMessage::Notification(note)) => {
                                    if notes.send(note.payload().to_owned()).is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => {}
                                Err(error) => {
                                    tracing::warn!(error = %crate::causes::Causes(&error), "the database change listener lost its connection");
                                    break;
                                }
                            }
                        }
                    });
                    let listening = tokio::time::timeout(
                        OPERATION_TIMEOUT,
                        client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")),
                    )
                    .await;
                    // (Catching up reads the database too: bounded, or the listener would
                    // hang on a database that stopped answering right then.)
                    let caught_up = match listening {
                        Err(_) => Err("the LISTEN got no answer".to_owned()),
                        Ok(Err(error)) => Err(crate::causes::Causes(&error).to_string()),
                        Ok(Ok(())) => {
                            tokio::time::timeout(LONG_OPERATION_TIMEOUT, handler.listening(missed))
                                .await
                                .map_err(|_| "catching up got no answer".to_owned())
                                .and_then(|caught_up| caught_up)
                        }
                    };
                    if let Err(error) = caught_up {
                        tracing::warn!(%error, "cannot listen for database changes");
                        handler.stopped();
                    } else {
                        metrics.listening(missed);
                        wait = Duration::from_millis(250);
                        let mut last_heard = tokio::time::Instant::now();
                        let mut last_vouched = tokio::time::Instant::now();
                        let mut last_settled = tokio::time::Instant::now();
                        loop {
                            match tokio::time::timeout(Duration::from_secs(1), received.recv())
                                .await
                            {
                                Ok(None) => break,
                                Ok(Some(note)) => {
                                    last_heard = tokio::time::Instant::now();
                                    handler.heard(&note);
                                }
                                Err(_) if !handler.alive() => break,
                                Err(_) => {}
                            }
                            // What came is handled (or notifications keep coming for a second).
                            if received.is_empty() || last_settled.elapsed() >= SETTLE_EVERY {
                                // (Given up on after a second, not to hold up the notifications
                                // behind it on a slow database: it settles at a later turn.)
                                let _ = tokio::time::timeout(SETTLE_EVERY, handler.settle()).await;
                                last_settled = tokio::time::Instant::now();
                            }
                            let vouch = handler
                                .vouch_every()
                                .is_some_and(|every| last_vouched.elapsed() >= every);
                            if !vouch && last_heard.elapsed() < LISTEN_HEARTBEAT {
                                continue;
                            }
                            // Nothing heard for a while (is the connection still there? One
                            // that went quiet without closing, as when a firewall forgets it,
                            // would leave this replica deaf), or the handler must vouch for it.
                            let asked = tokio::time::Instant::now();
                            let answered =
                                tokio::time::timeout(OPERATION_TIMEOUT, client.simple_query(""))
                                    .await;
                            if !matches!(answered, Ok(Ok(_))) {
                                tracing::warn!(
                                    "the database change listener's connection stopped answering: connecting again"
                                );
                                break;
                            }
                            last_heard = tokio::time::Instant::now();
                            // What the server sent before its answer is in the channel now
                            // (the driver hands notifications over in the order they came).
                            while let Ok(note) = received.try_recv() {
                                handler.heard(&note);
                            }
                            if vouch {
                                last_vouched = asked;
                                handler.vouched(asked.into_std());
                            }
                        }
                        metrics.stopped();
                        handler.stopped();
                    }
                    driver.abort();
                    drop(client);
                }
                Err(error) => {
                    tracing::warn!(error = %crate::causes::Causes(&error), retry_in = ?wait, "cannot connect to listen for database changes");
                }
            },
        }
        missed = true;
        if !handler.alive() {
            break;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Seals again with `kek` the credentials of `tenant`'s record that only its previous key
/// opens, as [`PgTenantStore::seal_stored_credentials`] does at start: for a change another
/// replica made, heard (or found changed after the listener reconnected) while the key changes (a replica still sealing with the old key, whose
/// writes after this one's start would otherwise stay sealed with it). Rewritten only if
/// unchanged meanwhile; a failure is said at `warn` (the next start with the previous key
/// seals it again).
async fn reseal_heard(pool: Pool, kek: Arc<KeyEncryptionKey>, tenant: TenantId) {
    let resealed = async {
        let connection = pool.get().await.map_err(|e| e.to_string())?;
        let Some(row) = connection
            .query_opt(
                "SELECT record FROM tower_fhir_tenants WHERE id = $1",
                &[&uuid(tenant)],
            )
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(false);
        };
        let record: serde_json::Value = row.try_get(0).map_err(|e| e.to_string())?;
        let Some((json, _)) = crate::at_rest::reseal_credentials(&kek, tenant, record.clone())?
        else {
            return Ok(false);
        };
        connection
            .execute(
                "UPDATE tower_fhir_tenants SET record = $2 WHERE id = $1 AND record = $3",
                &[&uuid(tenant), &json, &record],
            )
            .await
            .map(|written| written > 0)
            .map_err(|e| e.to_string())
    };
    match bounded::<bool, String>(resealed).await {
        Ok(true) => {
            tracing::info!(%tenant, "a tenant's upstream credentials written by another replica with the previous key-encryption key sealed again with the key")
        }
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%tenant, %error, "cannot seal a tenant's upstream credentials again with the key-encryption key; the next start with the previous key does")
        }
    }
}

/// A tenant store's listener: other replicas' tenant changes to its subscribers.
struct TenantChanges {
    store: Detached,
    alive: Weak<()>,
    /// Each tenant by its row's version as last read (the listing at the last (re)connection,
    /// or a [`settle`](Handler::settle) since): what a resynchronisation compares with.
    listed: HashMap<TenantId, i64>,
    /// The tenants heard of since their version was last read: a cache may hold them as
    /// anything since, until their version is read again.
    pending: HashSet<TenantId>,
    /// More than [`PENDING_AT_MOST`] were: every tenant is read again.
    overflowed: bool,
    /// Whether it listens now, for [`PgTenantStore::is_listening`].
    up: watch::Sender<bool>,
}

/// The most tenants heard of the listener keeps apart until their versions are read (a flood
/// of notifications naming made-up tenants must not grow it without end); past it, it reads
/// every tenant's again, and a resynchronisation before that announces every tenant.
const PENDING_AT_MOST: usize = 100_000;

/// The tenants to announce after notifications may have gone unheard, `listed` and `pending`
/// as [`TenantChanges`] keeps them and `now` the tenants' versions now: each whose row is not
/// the version read before (changed, removed or made meanwhile), and each heard of since;
/// every one if too many were heard of (`overflowed`). A tenant unchanged is not announced: a
/// route cache keeps its entry, the fallback it serves while the database is down.
fn changed_unheard(
    listed: &HashMap<TenantId, i64>,
    pending: &HashSet<TenantId>,
    overflowed: bool,
    now: &HashMap<TenantId, i64>,
) -> Vec<TenantId> {
    let mut changed: Vec<TenantId> = pending.iter().copied().collect();
    let mut announce = |tenant: &TenantId| {
        if !pending.contains(tenant) {
            changed.push(*tenant);
        }
    };
    for (tenant, version) in listed {
        if overflowed || now.get(tenant) != Some(version) {
            announce(tenant);
        }
    }
    for tenant in now.keys() {
        if !listed.contains_key(tenant) {
            announce(tenant);
        }
    }
    changed
}

impl Handler for TenantChanges {
    fn name(&self) -> &'static str {
        "tenants"
    }

    fn alive(&self) -> bool {
        self.alive.strong_count() > 0
    }

    async fn listening(&mut self, missed: bool) -> Result<(), String> {
        // Whatever changed while nobody listened is announced: a row's version (`xmin`, the
        // transaction that wrote it) differs after any write, even one that wrote back what
        // was there before, and a cache may have read the row in between.
        let now = versions(&self.store.pool, None)
            .await
            .map_err(|error| format!("cannot resynchronise tenants: {error}"))?;
        if missed {
            let changed = changed_unheard(&self.listed, &self.pending, self.overflowed, &now);
            for tenant in &changed {
                let _ = self.store.changes.send(*tenant);
                if let Some(resealing) = &self.store.resealing {
                    resealing.heard(*tenant);
                }
            }
            tracing::info!(
                changed = changed.len(),
                "database change listener reconnected; caches resynchronised"
            );
        }
        self.listed = now;
        self.pending.clear();
        self.overflowed = false;
        self.up.send_replace(true);
        Ok(())
    }

    fn stopped(&mut self) {
        self.up.send_replace(false);
    }

    fn heard(&mut self, payload: &str) {
        let Some((id, from)) = payload
            .strip_prefix("tenant:")
            .and_then(|rest| rest.split_once(' '))
        else {
            return;
        };
        if let Ok(tenant) = TenantId::parse(id) {
            // Its own changes too: the route cache may read the tenant again at any version
            // from now on, until its version is read ([`settle`](Handler::settle)).
            if self.pending.len() < PENDING_AT_MOST {
                self.pending.insert(tenant);
            } else {
                self.overflowed = true;
            }
            if from != &*self.store.origin {
                let _ = self.store.changes.send(tenant);
                if let Some(resealing) = &self.store.resealing {
                    resealing.heard(tenant);
                }
            }
        }
    }

    async fn settle(&mut self) {
        // Each version read after the notifications handled so far, each tenant read announced
        // again after it (below): any later change is heard (and the tenant pending again),
        // or, unheard, leaves another version.
        if self.overflowed {
            match versions(&self.store.pool, None).await {
                Ok(now) => {
                    let read = std::mem::take(&mut self.listed);
                    for tenant in read.keys().chain(now.keys()).chain(&self.pending) {
                        let _ = self.store.changes.send(*tenant);
                    }
                    self.listed = now;
                    self.pending.clear();
                    self.overflowed = false;
                }
                Err(error) => tracing::debug!(%error, "cannot read the tenants' versions"),
            }
            return;
        }
        if self.pending.is_empty() {
            return;
        }
        let pending: Vec<TenantId> = self.pending.iter().copied().collect();
        match versions(&self.store.pool, Some(&pending)).await {
            Ok(found) => {
                for tenant in pending {
                    match found.get(&tenant) {
                        Some(version) => self.listed.insert(tenant, *version),
                        None => self.listed.remove(&tenant),
                    };
                    self.pending.remove(&tenant);
                    // Announced again, now: the read may have seen a change whose notification
                    // is still on its way (and lost, should the connection drop now), which a
                    // cache may have read the row before. Dropped here, whatever a cache reads
                    // from now on is that version or a later one, and a later one is either
                    // heard or, unheard, another version at the next catch-up.
                    let _ = self.store.changes.send(tenant);
                }
            }
            // (Kept pending: a resynchronisation announces them.)
            Err(error) => tracing::debug!(%error, "cannot read the tenants' versions"),
        }
    }
}

/// A revocation as it is announced: `revoked:` and this, as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct Revoked {
    iss: Option<String>,
    jti: String,
    exp: u64,
}

/// A client's tokens revoked, as announced: `revoked-client:` and this, as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct RevokedClient {
    iss: Option<String>,
    client: String,
    revoked_at: u64,
    until: u64,
}

impl Revoked {
    /// A row of `issuer, jti, expires_at`.
    fn of_row(row: &tokio_postgres::Row) -> Self {
        Self {
            iss: issuer_of(row),
            jti: row.get(1),
            exp: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
        }
    }
}

impl RevokedClient {
    /// A row of `issuer, client, revoked_at, expires_at`.
    fn of_row(row: &tokio_postgres::Row) -> Self {
        Self {
            iss: issuer_of(row),
            client: row.get(1),
            revoked_at: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
            until: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
        }
    }

    fn apply(&self, revoked: &RevokedTokens) {
        revoked.revoke_client(
            self.iss.as_deref(),
            &self.client,
            self.revoked_at,
            self.until,
        );
    }
}

/// What [`PgState::follow_revocations`] started: its listener for other replicas'
/// revocations.
#[derive(Debug, Clone)]
pub struct RevocationsFollowed {
    listening: watch::Receiver<bool>,
}

impl RevocationsFollowed {
    /// Whether the listener is connected, has read every revocation in force, and hears each
    /// new one now: false until its first `LISTEN` has taken effect, and from a lost
    /// connection until it is made again and has caught up. A readiness check: meanwhile a
    /// revocation another replica records is not refused here.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Resolves once the listener listens (at once if it does), or once it has stopped
    /// (nothing holds the revoked list any more): check [`is_listening`](Self::is_listening)
    /// after it.
    pub async fn listening(&self) {
        let mut listening = self.listening.clone();
        // An error: the listener has stopped (nothing holds the revoked list any more).
        let _ = listening.wait_for(|up| *up).await;
    }
}

/// Every replica's revocations, into one process's [`RevokedTokens`].
struct RevocationChanges {
    pool: Pool,
    revoked: RevokedTokens,
    /// Whether it listens now, for [`RevocationsFollowed::is_listening`].
    up: watch::Sender<bool>,
    /// The announced revocations being read again at once, at most [`REREADS`].
    rereads: Arc<tokio::sync::Semaphore>,
    /// Whether a catch-up (every revocation read again) is under way.
    catching_up: Arc<std::sync::atomic::AtomicBool>,
    /// Whether a catch-up was asked for since the running one's read began.
    catch_up_again: Arc<std::sync::atomic::AtomicBool>,
    /// What was heard and is not read yet, and the vouches waiting for it.
    progress: Arc<std::sync::Mutex<ReadProgress>>,
}

/// What the revocation listener has heard and not yet read, for its vouches: a vouch (the
/// connection answered a query asked at some instant, so every revocation announced before
/// it was heard) confirms the list as of that instant once every announcement heard before
/// it has been read, and every catch-up asked for before it (or by a read of such an
/// announcement that failed) has read the revocations again, beginning after it was asked.
/// Reads heard after a vouch, and catch-ups asked after it, do not hold it back: a burst of
/// announcements (or a flood of forged ones) delays a confirmation by the reads it waits for,
/// no longer.
#[derive(Debug, Default)]
struct ReadProgress {
    /// The number the next announcement read again gets.
    next: u64,
    /// The numbers of those being read now.
    reading: std::collections::BTreeSet<u64>,
    /// How many catch-ups were asked for.
    asked: u64,
    /// How many of those a catch-up that succeeded had been asked for as its read began.
    caught_up: u64,
    /// Vouches waiting, oldest first; at most [`WAITING_VOUCHES`].
    waiting: std::collections::VecDeque<WaitingVouch>,
}

/// A vouch waiting for reads: see [`ReadProgress`].
#[derive(Debug)]
struct WaitingVouch {
    /// When the query that vouched was asked.
    asked: std::time::Instant,
    /// It waits for the reads numbered below this.
    heard_before: u64,
    /// And for a catch-up begun after this many were asked for.
    catch_ups: u64,
}

/// The most vouches kept waiting; beyond, the oldest is forgotten (a later one confirms more).
const WAITING_VOUCHES: usize = 16;

impl ReadProgress {
    /// An announcement begins to be read again: its number, for [`read`](Self::read).
    fn reading(&mut self) -> u64 {
        let number = self.next;
        self.next += 1;
        self.reading.insert(number);
        number
    }

    /// Announcement `number` was read (`failed`: it could not be, and the catch-up asked for
    /// since, which the vouches heard after it now wait for). The instant the list is now
    /// confirmed current as of, if a waiting vouch is.
    fn read(&mut self, number: u64, failed: bool) -> Option<std::time::Instant> {
        if failed {
            for vouch in &mut self.waiting {
                if vouch.heard_before > number {
                    vouch.catch_ups = vouch.catch_ups.max(self.asked);
                }
            }
        }
        self.reading.remove(&number);
        self.settle()
    }

    /// A catch-up is asked for.
    fn ask_catch_up(&mut self) {
        self.asked += 1;
    }

    /// A catch-up's read begins: what [`caught_up`](Self::caught_up) takes when it succeeds.
    fn catch_up_begins(&self) -> u64 {
        self.asked
    }

    /// The catch-up whose read began when `began` ([`catch_up_begins`](Self::catch_up_begins))
    /// succeeded: as [`read`](Self::read).
    fn caught_up(&mut self, began: u64) -> Option<std::time::Instant> {
        self.caught_up = self.caught_up.max(began);
        self.settle()
    }

    /// The connection vouched with a query asked at `asked`: as [`read`](Self::read) (at once
    /// when nothing heard is unread).
    fn vouched(&mut self, asked: std::time::Instant) -> Option<std::time::Instant> {
        if self.waiting.len() == WAITING_VOUCHES {
            self.waiting.pop_front();
        }
        self.waiting.push_back(WaitingVouch {
            asked,
            heard_before: self.next,
            catch_ups: self.asked,
        });
        self.settle()
    }

    /// The latest instant a waiting vouch now confirms, those vouches dropped. (A later vouch
    /// waits for every read and catch-up an earlier one does, and more.)
    fn settle(&mut self) -> Option<std::time::Instant> {
        let mut confirmed = None;
        while let Some(vouch) = self.waiting.front() {
            let read = self
                .reading
                .first()
                .is_none_or(|&oldest| oldest >= vouch.heard_before);
            if !read || self.caught_up < vouch.catch_ups {
                break;
            }
            confirmed = Some(vouch.asked);
            self.waiting.pop_front();
        }
        confirmed
    }
}

/// The most announced revocations read again at once; more at once (a flood of `NOTIFY`s,
/// which any role that may connect can send) make one catch-up instead.
const REREADS: usize = 4;

impl RevocationChanges {
    /// Reads every revocation in force again and applies it, until that succeeds (waiting 1 s,
    /// doubling up to 30 s, between tries), unless one is under way already: what an
    /// announcement that could not be read, or one among too many, may have said.
    fn catch_up(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        // Asked for: a read begun after this, whether one is under way or not.
        self.progress().ask_catch_up();
        self.catch_up_again.store(true, SeqCst);
        if self.catching_up.swap(true, SeqCst) {
            return;
        }
        let (pool, revoked, catching_up, again, progress) = (
            self.pool.clone(),
            self.revoked.clone(),
            Arc::clone(&self.catching_up),
            Arc::clone(&self.catch_up_again),
            Arc::clone(&self.progress),
        );
        tokio::spawn(async move {
            loop {
                let mut wait = Duration::from_secs(1);
                // Until a read begun after the last request for one has succeeded.
                while again.swap(false, SeqCst) {
                    loop {
                        let began = lock(&progress).catch_up_begins();
                        match read_all_revocations(&pool).await {
                            Ok((tokens, clients)) => {
                                for entry in tokens {
                                    revoked.revoke_id(entry.iss.as_deref(), &entry.jti, entry.exp);
                                }
                                for entry in clients {
                                    entry.apply(&revoked);
                                }
                                if let Some(as_of) = lock(&progress).caught_up(began) {
                                    revoked.confirm_current(as_of);
                                }
                                break;
                            }
                            Err(error) => {
                                // (Nobody holds the list but the listener and this task:
                                // nothing is left to keep revoked.)
                                if revoked.holders() <= 2 {
                                    catching_up.store(false, SeqCst);
                                    return;
                                }
                                tracing::warn!(%error, retry_in = ?wait, "cannot read the revocations again");
                                tokio::time::sleep(wait).await;
                                wait = (wait * 2).min(Duration::from_secs(30));
                            }
                        }
                    }
                }
                catching_up.store(false, SeqCst);
                // A request made between the last read and now saw a catch-up under way and
                // left it to this one: taken, unless another task has taken it since.
                if !again.load(SeqCst) || catching_up.swap(true, SeqCst) {
                    return;
                }
            }
        });
    }
}

impl RevocationChanges {
    /// The listener's [`ReadProgress`], locked.
    fn progress(&self) -> std::sync::MutexGuard<'_, ReadProgress> {
        lock(&self.progress)
    }
}

/// `progress` locked (its state holds no invariant a panic while it was held could break
/// worse than a lost vouch: a poisoned lock is taken as it is).
fn lock(progress: &std::sync::Mutex<ReadProgress>) -> std::sync::MutexGuard<'_, ReadProgress> {
    progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every revocation in force, tokens and clients, each read within [`OPERATION_TIMEOUT`].
async fn read_all_revocations(pool: &Pool) -> Result<(Vec<Revoked>, Vec<RevokedClient>), String> {
    let tokens = tokio::time::timeout(OPERATION_TIMEOUT, revocations(pool))
        .await
        .map_err(|_| "timed out".to_owned())??;
    let clients = tokio::time::timeout(OPERATION_TIMEOUT, revoked_clients(pool))
        .await
        .map_err(|_| "timed out".to_owned())??;
    Ok((tokens, clients))
}

impl Handler for RevocationChanges {
    fn name(&self) -> &'static str {
        "revocations"
    }

    fn alive(&self) -> bool {
        // The listener's own handle is one; somebody else must still hold the list.
        self.revoked.holders() > 1
    }

    async fn listening(&mut self, _missed: bool) -> Result<(), String> {
        // Every revocation still in force, at the start as after a gap (the `LISTEN` has taken
        // effect: what is revoked from now on is heard, what was before is read).
        let asked = std::time::Instant::now();
        let tokens = revocations(&self.pool)
            .await
            .map_err(|error| format!("cannot read the revoked tokens: {error}"))?;
        for entry in tokens {
            self.revoked
                .revoke_id(entry.iss.as_deref(), &entry.jti, entry.exp);
        }
        let clients = revoked_clients(&self.pool)
            .await
            .map_err(|error| format!("cannot read the revoked clients: {error}"))?;
        for entry in clients {
            entry.apply(&self.revoked);
        }
        self.revoked.confirm_current(asked);
        self.up.send_replace(true);
        Ok(())
    }

    fn stopped(&mut self) {
        self.up.send_replace(false);
    }

    fn vouch_every(&self) -> Option<Duration> {
        let max = self.revoked.max_staleness()?;
        Some((max / 5).max(Duration::from_secs(1)))
    }

    fn vouched(&mut self, asked: std::time::Instant) {
        // Once every revocation announced before it is read (at once when none is left): the
        // list holds it only then.
        if let Some(as_of) = self.progress().vouched(asked) {
            self.revoked.confirm_current(as_of);
        }
    }

    fn heard(&mut self, payload: &str) {
        // What a notification names is read again from its table, never taken as sent: any
        // role that may connect to the database may `NOTIFY` (PostgreSQL checks no right for
        // it), and a forged `revoked-client` with a far `until` would refuse a client's every
        // token. (Revocations are rare: a query each.) At most `REREADS` at once; beyond, and
        // when a read fails, every revocation is read again (a revocation is never lost to a
        // busy pool or a flood of announcements).
        let token = payload
            .strip_prefix("revoked:")
            .and_then(|json| serde_json::from_str::<Revoked>(json).ok());
        let client = payload
            .strip_prefix("revoked-client:")
            .and_then(|json| serde_json::from_str::<RevokedClient>(json).ok());
        if token.is_none() && client.is_none() {
            return;
        }
        let Ok(permit) = Arc::clone(&self.rereads).try_acquire_owned() else {
            self.catch_up();
            return;
        };
        let number = self.progress().reading();
        let this = Self {
            pool: self.pool.clone(),
            revoked: self.revoked.clone(),
            up: self.up.clone(),
            rereads: Arc::clone(&self.rereads),
            catching_up: Arc::clone(&self.catching_up),
            catch_up_again: Arc::clone(&self.catch_up_again),
            progress: Arc::clone(&self.progress),
        };
        tokio::spawn(async move {
            let _permit = permit;
            let unfinished = Unfinished {
                changes: &this,
                number,
            };
            let read = match (&token, &client) {
                (Some(entry), _) => tokio::time::timeout(
                    OPERATION_TIMEOUT,
                    revoked_token(&this.pool, entry.iss.as_deref(), &entry.jti),
                )
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|read| read)
                .map(|row| {
                    row.map(|row| {
                        this.revoked
                            .revoke_id(row.iss.as_deref(), &row.jti, row.exp)
                    })
                    .is_some()
                }),
                (None, Some(entry)) => tokio::time::timeout(
                    OPERATION_TIMEOUT,
                    revoked_client(&this.pool, entry.iss.as_deref(), &entry.client),
                )
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|read| read)
                .map(|row| row.map(|row| row.apply(&this.revoked)).is_some()),
                (None, None) => Ok(true),
            };
            let failed = match read {
                Ok(true) => false,
                Ok(false) => {
                    tracing::warn!(
                        "a revocation was announced that the database does not hold: ignored"
                    );
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read an announced revocation: reading them all again");
                    // (Asked for before the read counts as done: a vouch waiting for it then
                    // waits for the catch-up.)
                    this.catch_up();
                    true
                }
            };
            std::mem::forget(unfinished);
            if let Some(as_of) = this.progress().read(number, failed) {
                this.revoked.confirm_current(as_of);
            }
        });
    }
}

/// A re-read of an announced revocation under way: dropped before it ended (its task panicked,
/// or was cancelled), it counts as failed, so that the vouches waiting for it wait for a
/// catch-up instead of for ever (while a runtime is there to run one; otherwise they wait).
struct Unfinished<'a> {
    changes: &'a RevocationChanges,
    number: u64,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.changes.catch_up();
            if let Some(as_of) = self.changes.progress().read(self.number, true) {
                self.changes.revoked.confirm_current(as_of);
            }
        }
    }
}

/// The revocation of `issuer`'s token `jti` as the table holds it, while in force.
async fn revoked_token(
    pool: &Pool,
    issuer: Option<&str>,
    jti: &str,
) -> Result<Option<Revoked>, String> {
    let connection = pool.get().await.map_err(|e| e.to_string())?;
    let row = connection
        .query_opt(
            "SELECT issuer, jti, expires_at FROM tower_fhir_revoked_tokens
             WHERE issuer = $1 AND jti = $2 AND expires_at > $3",
            &[&issuer.unwrap_or(""), &jti, &unix_now()],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.as_ref().map(Revoked::of_row))
}

/// The revocation of the tokens `issuer` issued to `client` as the table holds it, while in
/// force.
async fn revoked_client(
    pool: &Pool,
    issuer: Option<&str>,
    client: &str,
) -> Result<Option<RevokedClient>, String> {
    let connection = pool.get().await.map_err(|e| e.to_string())?;
    let row = connection
        .query_opt(
            "SELECT issuer, client, revoked_at, expires_at FROM tower_fhir_revoked_clients
             WHERE issuer = $1 AND client = $2 AND expires_at > $3",
            &[&issuer.unwrap_or(""), &client, &unix_now()],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.as_ref().map(RevokedClient::of_row))
}

/// The clients whose tokens are revoked, while some may still live.
async fn revoked_clients(pool: &Pool) -> Result<Vec<RevokedClient>, String> {
    unexpired(
        pool,
        "SELECT issuer, client, revoked_at, expires_at FROM tower_fhir_revoked_clients
         WHERE expires_at > $1",
        RevokedClient::of_row,
    )
    .await
}

/// The revocations that have not expired.
async fn revocations(pool: &Pool) -> Result<Vec<Revoked>, String> {
    unexpired(
        pool,
        "SELECT issuer, jti, expires_at FROM tower_fhir_revoked_tokens WHERE expires_at > $1",
        Revoked::of_row,
    )
    .await
}

/// The rows `query` selects with `$1` the time now, each made into a `T`.
async fn unexpired<T>(
    pool: &Pool,
    query: &str,
    each: impl Fn(&tokio_postgres::Row) -> T,
) -> Result<Vec<T>, String> {
    let connection = pool.get().await.map_err(|e| e.to_string())?;
    let rows = connection
        .query(query, &[&unix_now()])
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.iter().map(each).collect())
}

/// A revocation row's issuer (column 0; empty for none).
fn issuer_of(row: &tokio_postgres::Row) -> Option<String> {
    let issuer: String = row.get(0);
    (!issuer.is_empty()).then_some(issuer)
}

/// A table whose rows expire (`expires_at`): its expired rows are removed at most once a
/// minute from each process, outside any other transaction, skipping rows another holds.
pub(super) struct Expiring {
    table: &'static str,
    /// When (Unix milliseconds) this process last removed them.
    swept_at: std::sync::atomic::AtomicI64,
}

static REVOKED: Expiring = Expiring::new("tower_fhir_revoked_tokens");
static REVOKED_CLIENTS: Expiring = Expiring::new("tower_fhir_revoked_clients");
static JTIS: Expiring = Expiring::new("tower_fhir_assertion_jtis");

impl Expiring {
    pub(super) const fn new(table: &'static str) -> Self {
        Self {
            table,
            swept_at: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Removes the rows expired by `now` (in the table's unit), unless this process did so
    /// less than a minute ago: in a task of its own, on a connection of its own, so that the
    /// request whose write came first is answered without waiting for it (a slow sweep must
    /// not turn a committed write into a timeout). A failure is left for the next time.
    pub(super) fn sweep(&'static self, pool: &Pool, now: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let last = self.swept_at.load(Relaxed);
        if wall.saturating_sub(last) < 60_000
            || self
                .swept_at
                .compare_exchange(last, wall, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let table = self.table;
            let removed = tokio::time::timeout(OPERATION_TIMEOUT, async {
                let connection = pool.get().await.map_err(|e| e.to_string())?;
                connection
                    .execute(
                        &format!(
                            "DELETE FROM {table} WHERE ctid IN (
                                 SELECT ctid FROM {table} WHERE expires_at <= $1 FOR UPDATE SKIP LOCKED)"
                        ),
                        &[&now],
                    )
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            match removed {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, table, "expired rows not removed this time");
                }
                Err(_) => tracing::debug!(table, "expired rows not removed this time: timed out"),
            }
        });
    }
}

/// Records `(key, id)` in `table` (columns `key.0`, `jti`, `expires_at`) until `expires_at`
/// (Unix seconds) unless it is there and has not expired, `NOTIFY`ing `payload` in the same
/// transaction when given; whether it was new. Expired rows are swept now and then.
async fn remember(
    pool: &Pool,
    table: &'static Expiring,
    key: (&str, &str),
    jti: &str,
    expires_at: i64,
    payload: Option<&str>,
) -> Result<bool, String> {
    let failed = |e: tokio_postgres::Error| e.to_string();
    let mut connection = pool.get().await.map_err(|e| e.to_string())?;
    let transaction = connection.transaction().await.map_err(failed)?;
    let (column, value) = key;
    let now = unix_now();
    let inserted = transaction
        .execute(
            // An expired row not swept yet counts as absent.
            &format!(
                "INSERT INTO {table} ({column}, jti, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT ({column}, jti) DO UPDATE SET expires_at = EXCLUDED.expires_at
                 WHERE {table}.expires_at <= $4",
                table = table.table
            ),
            &[&value, &jti, &expires_at, &now],
        )
        .await
        .map_err(failed)?;
    if let Some(payload) = payload {
        transaction
            .execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &payload])
            .await
            .map_err(failed)?;
    }
    transaction.commit().await.map_err(failed)?;
    table.sweep(pool, now);
    Ok(inserted == 1)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Revocations recorded in the database and announced to every replica (see
/// [`PgState::revocation_log`]).
#[derive(Clone)]
pub struct PgRevocationLog {
    pool: Pool,
}

impl fmt::Debug for PgRevocationLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRevocationLog").finish_non_exhaustive()
    }
}

impl RevocationLog for PgRevocationLog {
    fn record(
        &self,
        issuer: Option<&str>,
        jti: &str,
        expires_at: u64,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let pool = self.pool.clone();
        let entry = Revoked {
            iss: issuer.map(str::to_owned),
            jti: jti.to_owned(),
            exp: expires_at,
        };
        Box::pin(bounded(async move {
            let payload = format!(
                "revoked:{}",
                serde_json::to_string(&entry).map_err(|e| e.to_string())?
            );
            let issuer = entry.iss.as_deref().unwrap_or("");
            let expires = i64::try_from(entry.exp).unwrap_or(i64::MAX);
            remember(
                &pool,
                &REVOKED,
                ("issuer", issuer),
                &entry.jti,
                expires,
                Some(&payload),
            )
            .await
            .map(drop)
        }))
    }

    fn record_client(
        &self,
        issuer: Option<&str>,
        client: &str,
        revoked_at: u64,
        until: u64,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let pool = self.pool.clone();
        let entry = RevokedClient {
            iss: issuer.map(str::to_owned),
            client: client.to_owned(),
            revoked_at,
            until,
        };
        Box::pin(bounded(async move {
            let failed = |e: tokio_postgres::Error| e.to_string();
            let payload = format!(
                "revoked-client:{}",
                serde_json::to_string(&entry).map_err(|e| e.to_string())?
            );
            let issuer = entry.iss.as_deref().unwrap_or("");
            let revoked_at = i64::try_from(entry.revoked_at).unwrap_or(i64::MAX);
            let until = i64::try_from(entry.until).unwrap_or(i64::MAX);
            let mut connection = pool.get().await.map_err(|e| e.to_string())?;
            let transaction = connection.transaction().await.map_err(failed)?;
            transaction
                .execute(
                    "INSERT INTO tower_fhir_revoked_clients (issuer, client, revoked_at, expires_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (issuer, client) DO UPDATE SET
                         revoked_at = greatest(tower_fhir_revoked_clients.revoked_at, EXCLUDED.revoked_at),
                         expires_at = greatest(tower_fhir_revoked_clients.expires_at, EXCLUDED.expires_at)",
                    &[&issuer, &entry.client, &revoked_at, &until],
                )
                .await
                .map_err(failed)?;
            transaction
                .execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &payload])
                .await
                .map_err(failed)?;
            transaction.commit().await.map_err(failed)?;
            REVOKED_CLIENTS.sweep(&pool, unix_now());
            Ok(())
        }))
    }
}

/// A name for one store, unique enough across replicas: the process, a counter, the time.
fn origin() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Client assertions' `jti`s, remembered in the database until they expire (see
/// [`PgState::assertion_replay_guard`]).
#[derive(Clone)]
pub struct PgReplayGuard {
    pool: Pool,
}

impl fmt::Debug for PgReplayGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReplayGuard").finish_non_exhaustive()
    }
}

impl ReplayGuard for PgReplayGuard {
    fn first_use(
        &self,
        client: &str,
        jti: &str,
        until: u64,
    ) -> futures::future::BoxFuture<'static, Result<bool, String>> {
        let (pool, client, jti) = (self.pool.clone(), client.to_owned(), jti.to_owned());
        Box::pin(bounded(async move {
            let until = i64::try_from(until).unwrap_or(i64::MAX);
            remember(&pool, &JTIS, ("client", &client), &jti, until, None).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        advisory_key_halves, supported_server, ListenerMetrics, PgError, LISTENER_LISTENING,
        LISTENER_RECONNECTIONS, MIGRATION_LOCK,
    };
    use std::fmt;

    /// A reconnected tenant listener announces what changed while it did not listen, by the
    /// rows' versions, and what it heard of since its listing; not the tenants unchanged, whose
    /// cached routes must stay (the fallback while the database is down).
    #[test]
    fn a_resynchronisation_announces_the_tenants_changed_and_no_other() {
        use super::changed_unheard;
        use crate::tenant::TenantId;
        use std::collections::{BTreeSet, HashMap, HashSet};
        let id = |n: u8| TenantId::from_uuid(uuid::Uuid::from_u128(0x1d2d_0000 + u128::from(n)));
        let set = |tenants: Vec<TenantId>| tenants.into_iter().collect::<BTreeSet<_>>();
        // 1 unchanged, 2 changed, 3 removed, 4 heard of (its version unread) and unchanged
        // since, 5 heard of and gone, 6 made meanwhile.
        let listed = HashMap::from([(id(1), 10), (id(2), 11), (id(3), 12), (id(4), 14)]);
        let pending = HashSet::from([id(4), id(5)]);
        let now = HashMap::from([(id(1), 10), (id(2), 13), (id(4), 14), (id(6), 15)]);
        let announced = changed_unheard(&listed, &pending, false, &now);
        assert_eq!(announced.len(), 5, "each once: {announced:?}");
        assert_eq!(set(announced), set(vec![id(2), id(3), id(4), id(5), id(6)]));
        // Too many heard of to keep apart: every tenant.
        assert_eq!(
            set(changed_unheard(&listed, &pending, true, &now)),
            set((1..=6).map(id).collect())
        );
        // Nothing changed: nothing announced.
        let same = HashMap::from([(id(1), 10)]);
        assert!(changed_unheard(&same, &HashSet::new(), false, &same).is_empty());
    }

    /// The revocation listener vouches for its list only once every revocation announced
    /// before the vouch is read: a vouch made while one is being read confirms the list as of
    /// its own instant when that read ends, not before.
    #[tokio::test]
    async fn a_vouch_confirms_the_list_once_what_was_heard_before_it_is_read() {
        use super::{Handler, RevocationChanges, REREADS};
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        // A pool that is never used (nothing connects until asked).
        let manager = deadpool_postgres::Manager::from_config(
            tokio_postgres::Config::new(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig::default(),
        );
        let pool = deadpool_postgres::Pool::builder(manager).build().unwrap();
        let revoked = crate::auth::RevokedTokens::new();
        let mut changes = RevocationChanges {
            pool,
            revoked: revoked.clone(),
            up: tokio::sync::watch::channel(false).0,
            rereads: Arc::new(tokio::sync::Semaphore::new(REREADS)),
            catching_up: Arc::new(AtomicBool::new(false)),
            catch_up_again: Arc::new(AtomicBool::new(false)),
            progress: Arc::default(),
        };
        assert_eq!(changes.vouch_every(), None, "no limit: no vouching");
        revoked.set_max_staleness(Some(Duration::from_secs(10)));
        assert_eq!(changes.vouch_every(), Some(Duration::from_secs(2)));
        revoked.set_max_staleness(Some(Duration::from_secs(5)));
        assert_eq!(
            changes.vouch_every(),
            Some(Duration::from_secs(1)),
            "a second at least"
        );
        assert!(revoked.is_stale(), "never confirmed");

        let reading = changes.progress().reading();
        changes.vouched(Instant::now());
        assert!(
            revoked.is_stale(),
            "confirmed while a revocation was being read"
        );
        let confirmed = changes.progress().read(reading, false);
        assert!(confirmed.is_some(), "the read ended: the vouch confirms");
        changes.vouched(Instant::now());
        assert!(!revoked.is_stale(), "nothing left to read: confirmed");

        // A re-read whose task ends before it does (a panic, a cancellation) counts as failed:
        // the vouches waiting for it wait for a catch-up, not for ever.
        let reading = changes.progress().reading();
        let asked = Instant::now();
        assert_eq!(changes.progress().vouched(asked), None);
        drop(super::Unfinished {
            changes: &changes,
            number: reading,
        });
        assert!(changes.progress().reading.is_empty());
        let began = changes.progress().catch_up_begins();
        assert_eq!(changes.progress().caught_up(began), Some(asked));
    }

    /// What each vouch waits for: the reads heard before it (not after), and a catch-up begun
    /// after those asked for before it or by a failed read heard before it.
    #[test]
    fn a_vouch_waits_for_what_was_heard_before_it_and_no_more() {
        use super::ReadProgress;
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut progress = ReadProgress::default();

        // Reads heard before a vouch hold it; one heard after does not.
        let first = progress.reading();
        let second = progress.reading();
        assert_eq!(progress.vouched(at(1)), None);
        let later = progress.reading();
        assert_eq!(progress.read(second, false), None, "the first is unread");
        assert_eq!(progress.read(first, false), Some(at(1)));
        assert_eq!(progress.vouched(at(2)), None, "a read heard before it");
        assert_eq!(progress.read(later, false), Some(at(2)));
        assert_eq!(progress.vouched(at(3)), Some(at(3)), "nothing unread");

        // Two vouches waiting: the latest one whose reads are done is the one confirmed.
        let a = progress.reading();
        assert_eq!(progress.vouched(at(4)), None);
        let b = progress.reading();
        assert_eq!(progress.vouched(at(5)), None);
        assert_eq!(progress.read(b, false), None, "both wait for a");
        assert_eq!(progress.read(a, false), Some(at(5)));

        // A catch-up asked for before a vouch: only one whose read began after it counts.
        progress.ask_catch_up();
        let stale = progress.catch_up_begins() - 1;
        assert_eq!(progress.vouched(at(6)), None);
        assert_eq!(progress.caught_up(stale), None, "began before it was asked");
        let began = progress.catch_up_begins();
        progress.ask_catch_up(); // asked after the vouch: it does not wait for this one
        assert_eq!(progress.caught_up(began), Some(at(6)));
        let began = progress.catch_up_begins();
        assert_eq!(progress.caught_up(began), None, "no vouch waiting");

        // A read that fails, heard before a vouch: the vouch waits for the catch-up it asks
        // for; a vouch made before the read was heard does not.
        assert_eq!(progress.vouched(at(7)), Some(at(7)));
        let failing = progress.reading();
        assert_eq!(progress.vouched(at(8)), None);
        progress.ask_catch_up();
        assert_eq!(
            progress.read(failing, true),
            None,
            "the catch-up is still to come"
        );
        let began = progress.catch_up_begins();
        assert_eq!(progress.caught_up(began), Some(at(8)));

        // A flood of catch-ups asked after each vouch holds no vouch back for longer than
        // one catch-up begun after it.
        for second in 9..20 {
            progress.ask_catch_up();
            assert_eq!(progress.vouched(at(second)), None);
            let began = progress.catch_up_begins();
            progress.ask_catch_up();
            assert_eq!(progress.caught_up(began), Some(at(second)));
        }
        let began = progress.catch_up_begins();
        assert_eq!(progress.caught_up(began), None, "no vouch waiting");

        // Vouches kept waiting are bounded: the oldest are forgotten, the latest still
        // confirms.
        let stuck = progress.reading();
        for second in 20..60 {
            assert_eq!(progress.vouched(at(second)), None);
        }
        assert_eq!(progress.waiting.len(), super::WAITING_VOUCHES);
        assert_eq!(progress.read(stuck, false), Some(at(59)));
        assert!(progress.waiting.is_empty());
    }

    #[test]
    fn an_error_says_its_whole_chain_once() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl fmt::Display for Layer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        // As deadpool and tokio-postgres nest a refused password.
        let server = Layer("password authentication failed for user \"gateway\"", None);
        let driver = Layer("db error", Some(Box::new(server)));
        let pool = Layer(
            "Error occurred while creating a new object: db error",
            Some(Box::new(driver)),
        );
        assert_eq!(
            PgError::new("cannot connect to the database", pool).to_string(),
            "cannot connect to the database: Error occurred while creating a new object: db error: \
             password authentication failed for user \"gateway\""
        );
    }

    #[test]
    fn servers_older_than_14_are_refused_by_name() {
        assert!(supported_server("140000").is_ok());
        assert!(supported_server("150004\n").is_ok());
        assert!(supported_server("170002").is_ok());
        let old = supported_server("130015").unwrap_err().to_string();
        assert!(old.contains("PostgreSQL 13.15"), "{old}");
        assert!(old.contains("14 or later"), "{old}");
        let older = supported_server("90624").unwrap_err().to_string();
        assert!(older.contains("PostgreSQL 9.6"), "{older}");
        let other = supported_server("cockroach").unwrap_err().to_string();
        assert!(other.contains("\"cockroach\""), "{other}");
    }

    #[test]
    fn the_migration_locks_key_is_shown_as_pg_locks_shows_it() {
        // The figures the docs and the README give an operator to look for.
        assert_eq!(
            advisory_key_halves(MIGRATION_LOCK),
            (1_953_462_117, 1_919_314_025)
        );
        assert_eq!(MIGRATION_LOCK, 8_390_055_908_409_239_657);
        assert_eq!(advisory_key_halves(-1), (u32::MAX, u32::MAX));
        assert_eq!(advisory_key_halves(1), (0, 1));
    }

    #[test]
    fn a_listeners_metrics_follow_its_state_and_count_its_reconnections() {
        // The gateway's recorder: the exporter's text, counted on each thread.
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let text = prometheus.handle();
        let histograms = crate::ops::BucketHistograms::new(&[1.0]).unwrap();
        let recorder = histograms.over(prometheus);
        let sample = |name: &str| {
            histograms.publish();
            let prefix = format!("{name}{{listener=\"tenants\"}} ");
            text.render()
                .lines()
                .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        };
        let mut metrics =
            metrics::with_local_recorder(&recorder, || ListenerMetrics::new("tenants"));
        // Shown before the first connection, at 0.
        assert_eq!(sample(LISTENER_LISTENING).as_deref(), Some("0"));
        assert_eq!(sample(LISTENER_RECONNECTIONS).as_deref(), Some("0"));
        // The first connection is no reconnection; a drop and the next connection are.
        metrics.listening(false);
        assert_eq!(sample(LISTENER_LISTENING).as_deref(), Some("1"));
        assert_eq!(sample(LISTENER_RECONNECTIONS).as_deref(), Some("0"));
        metrics.stopped();
        metrics.stopped();
        assert_eq!(sample(LISTENER_LISTENING).as_deref(), Some("0"));
        metrics.listening(true);
        assert_eq!(sample(LISTENER_LISTENING).as_deref(), Some("1"));
        assert_eq!(sample(LISTENER_RECONNECTIONS).as_deref(), Some("1"));
        // A listener that ends while listening listens no more.
        drop(metrics);
        assert_eq!(sample(LISTENER_LISTENING).as_deref(), Some("0"));
        assert_eq!(sample(LISTENER_RECONNECTIONS).as_deref(), Some("1"));
    }
}
