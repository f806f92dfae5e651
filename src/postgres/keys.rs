//! The token endpoint's signing keys, shared by every replica through the database: sealed
//! at rest with a key-encryption key, published before they sign, retired after their last
//! token expires.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use jsonwebtoken::Algorithm;
use tokio::sync::Notify;

use super::{bounded, listen, Handler, PgError, CHANGES_CHANNEL};
use crate::at_rest::OpenedBy;
use crate::seal::{
    KeyEncryptionKey, KEY_ENCRYPTION_KEY_ENV, NEXT_KEY_ENCRYPTION_KEY_ENV,
    PREVIOUS_KEY_ENCRYPTION_KEY_ENV,
};
use crate::token::{SigningKey, SigningKeys};

/// The advisory lock key changes run under, so that two replicas starting on an empty
/// database make one first key, and two rotations do not interleave.
const KEYS_LOCK: i64 = 0x746f_7765_726b_6579; // "towerkey"

/// How often a replica reads the keys again though it heard of no change.
const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// The notification payload of a key change.
const KEYS_CHANGED: &str = "keys";

/// One row of `tower_fhir_signing_keys`, opened.
#[derive(Clone)]
struct Row {
    key: Arc<SigningKey>,
    /// Unix milliseconds from which it may sign.
    signs_from: i64,
    /// Unix milliseconds from which it is no longer published, if that is decided.
    retire_at: Option<i64>,
    /// Whether only the key-encryption key's previous key opened it: it is to be sealed again.
    by_previous: bool,
}

impl Row {
    fn published(&self, now: i64) -> bool {
        self.retire_at.is_none_or(|at| at > now)
    }
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The published keys at `now` and the one that signs: of those whose time to sign has come,
/// the latest; before any has (it cannot happen through [`PgSigningKeys`]), the earliest.
fn ring(rows: &[Row], now: i64) -> Option<(Vec<Arc<SigningKey>>, Arc<SigningKey>)> {
    let mut live: Vec<&Row> = rows.iter().filter(|row| row.published(now)).collect();
    live.sort_by(|a, b| (a.signs_from, a.key.kid()).cmp(&(b.signs_from, b.key.kid())));
    let current = live
        .iter()
        .rev()
        .find(|row| row.signs_from <= now)
        .or(live.first())?;
    let current = Arc::clone(&current.key);
    Some((
        live.iter().map(|row| Arc::clone(&row.key)).collect(),
        current,
    ))
}

/// When `ring` next changes by itself after `now`: a key starts signing or is retired.
fn next_change(rows: &[Row], now: i64) -> Option<i64> {
    rows.iter()
        .flat_map(|row| [Some(row.signs_from), row.retire_at])
        .flatten()
        .filter(|at| *at > now)
        .min()
}

/// Every key in the table, opened with `kek`.
async fn load(pool: &Pool, kek: &KeyEncryptionKey) -> Result<Vec<Row>, PgError> {
    bounded(load_unbounded(pool, kek)).await
}

async fn load_unbounded(pool: &Pool, kek: &KeyEncryptionKey) -> Result<Vec<Row>, PgError> {
    let connection = pool
        .get()
        .await
        .map_err(|e| PgError::new("cannot connect to the database", e))?;
    let rows = connection
        .query(
            "SELECT kid, alg, sealed, signs_from, retire_at FROM tower_fhir_signing_keys",
            &[],
        )
        .await
        .map_err(|e| PgError::new("cannot read the signing keys", e))?;
    let read = rows.iter().map(|row| {
            let kid: String = row.get(0);
            let alg: String = row.get(1);
            let sealed: Vec<u8> = row.get(2);
            let (pem, by) = kek.open_by(&kid, &sealed).ok_or_else(|| {
                PgError::plain(format!(
                    "the signing key {kid:?} in the database cannot be opened with this key-encryption key: every replica needs the {KEY_ENCRYPTION_KEY_ENV} the keys were sealed with (while the key changes, the other one in {PREVIOUS_KEY_ENCRYPTION_KEY_ENV} or {NEXT_KEY_ENCRYPTION_KEY_ENV})"
                ))
            })?;
            let alg: Algorithm = alg
                .parse()
                .map_err(|_| PgError::plain(format!("signing key {kid:?}: unknown algorithm {alg:?}")))?;
            let key = SigningKey::from_pem(alg, &pem, kid.as_str())
                .map_err(|e| PgError::plain(format!("signing key {kid:?}: {e}")))?;
            Ok(Row {
                key: Arc::new(key),
                signs_from: row.get(3),
                retire_at: row.get(4),
                by_previous: by == OpenedBy::Previous,
            })
        });
    let (mut opened, mut unreadable) = (Vec::new(), Vec::new());
    for row in read {
        match row {
            Ok(row) => opened.push(row),
            Err(error) => unreadable.push(error),
        }
    }
    // None opens: another key-encryption key than the one the keys were sealed with, which
    // refuses the start (before it writes anything). Some do: the others are rows this
    // replica cannot use (written by hand, or damaged), left out with an error each, so that
    // one of them stops no rotation and no start.
    if opened.is_empty() {
        if let Some(error) = unreadable.into_iter().next() {
            return Err(error);
        }
        return Ok(opened);
    }
    for error in unreadable {
        tracing::error!(%error, "a signing key in the database cannot be used: left out (delete its row in tower_fhir_signing_keys)");
    }
    Ok(opened)
}

/// Inserts `key`, sealed, signing from `signs_from`.
async fn insert(
    transaction: &deadpool_postgres::Transaction<'_>,
    kek: &KeyEncryptionKey,
    key: &SigningKey,
    now: i64,
    signs_from: i64,
) -> Result<(), PgError> {
    let sealed = kek.seal(key.kid(), key.pem().as_bytes())?;
    let alg = format!("{:?}", key.algorithm());
    transaction
        .execute(
            "INSERT INTO tower_fhir_signing_keys (kid, alg, sealed, published_at, signs_from)
             VALUES ($1, $2, $3, $4, $5)",
            &[&key.kid(), &alg, &sealed, &now, &signs_from],
        )
        .await
        .map_err(|e| PgError::new("cannot store a signing key", e))?;
    Ok(())
}

/// Seals again with `kek` every signing key only its previous key opens (the key being
/// changed): how many. A key neither opens is left as it is (the start refuses it, or leaves it
/// out, as [`load`] says).
async fn reseal(
    transaction: &deadpool_postgres::Transaction<'_>,
    kek: &KeyEncryptionKey,
) -> Result<usize, PgError> {
    let failed = |e| PgError::new("cannot seal the signing keys again", e);
    let rows = transaction
        .query("SELECT kid, sealed FROM tower_fhir_signing_keys", &[])
        .await
        .map_err(failed)?;
    let mut resealed = 0;
    for row in rows {
        let kid: String = row.get(0);
        let sealed: Vec<u8> = row.get(1);
        let Some((pem, OpenedBy::Previous)) = kek.open_by(&kid, &sealed) else {
            continue;
        };
        let again = kek.seal(&kid, &pem)?;
        transaction
            .execute(
                "UPDATE tower_fhir_signing_keys SET sealed = $2 WHERE kid = $1",
                &[&kid, &again],
            )
            .await
            .map_err(failed)?;
        resealed += 1;
    }
    Ok(resealed)
}

/// [`reseal`] in a transaction of its own under the keys' lock, the count said at `info`, a
/// failure at `warn` (the keys still open with the previous key; the next read tries again).
async fn reseal_locked(pool: &Pool, kek: &KeyEncryptionKey) {
    let resealed = bounded(async {
        let mut connection = connect(pool).await?;
        let failed = |e| PgError::new("cannot seal the signing keys again", e);
        let transaction = locked(&mut connection, failed).await?;
        let resealed = reseal(&transaction, kek).await?;
        transaction.commit().await.map_err(failed)?;
        Ok::<_, PgError>(resealed)
    })
    .await;
    match resealed {
        Ok(0) => {}
        Ok(keys) => tracing::info!(
            keys,
            "signing keys sealed with the previous key-encryption key sealed again with the key"
        ),
        Err(error) => {
            tracing::warn!(%error, "cannot seal the signing keys again with the key-encryption key; trying again at the next read")
        }
    }
}

async fn connect(pool: &Pool) -> Result<deadpool_postgres::Object, PgError> {
    pool.get()
        .await
        .map_err(|e| PgError::new("cannot connect to the database", e))
}

/// A transaction holding the keys' advisory lock until it ends.
async fn locked(
    connection: &mut deadpool_postgres::Object,
    failed: impl Fn(tokio_postgres::Error) -> PgError,
) -> Result<deadpool_postgres::Transaction<'_>, PgError> {
    let transaction = connection.transaction().await.map_err(&failed)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&KEYS_LOCK])
        .await
        .map_err(&failed)?;
    Ok(transaction)
}

async fn announce(transaction: &deadpool_postgres::Transaction<'_>) -> Result<(), PgError> {
    transaction
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANGES_CHANNEL, &KEYS_CHANGED],
        )
        .await
        .map_err(|e| PgError::new("cannot announce a key change", e))?;
    Ok(())
}

/// The token endpoint's signing keys, kept in the database and shared by every replica (see
/// [`PgState::signing_keys`](super::PgState::signing_keys)).
#[derive(Clone)]
pub struct PgSigningKeys {
    pool: Pool,
    kek: KeyEncryptionKey,
    keys: SigningKeys,
    /// Wakes this process's follower to read the keys again.
    reload: Arc<Notify>,
    /// Held while the keys are read and applied, by the follower or by a change made here;
    /// counts those reads, so the follower knows when rows it holds are older than the keys.
    applying: Arc<tokio::sync::Mutex<u64>>,
}

impl fmt::Debug for PgSigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSigningKeys")
            .field("current", &self.keys.current_kid())
            .finish_non_exhaustive()
    }
}

impl PgSigningKeys {
    /// Opens the keys: makes the first one (`ES256`) when the database holds none, under an
    /// advisory lock, so replicas starting together make one; then follows every change.
    pub(super) async fn open(
        pool: Pool,
        config: super::Dial,
        kek: KeyEncryptionKey,
    ) -> Result<Self, PgError> {
        {
            let mut connection = connect(&pool).await?;
            let failed = |e| PgError::new("cannot make the first signing key", e);
            let transaction = locked(&mut connection, failed).await?;
            let now = unix_millis();
            let live: i64 = transaction
                .query_one(
                    "SELECT count(*) FROM tower_fhir_signing_keys
                     WHERE retire_at IS NULL OR retire_at > $1",
                    &[&now],
                )
                .await
                .map_err(failed)?
                .get(0);
            if live == 0 {
                let key = SigningKey::generate_es256()
                    .map_err(|e| PgError::plain(format!("cannot make a signing key: {e}")))?;
                // Nothing was published before: no replica has a token to verify yet.
                insert(&transaction, &kek, &key, now, now).await?;
                announce(&transaction).await?;
                tracing::info!(kid = key.kid(), "first signing key made");
            }
            if kek.has_previous() {
                let resealed = reseal(&transaction, &kek).await?;
                if resealed > 0 {
                    tracing::info!(
                        keys = resealed,
                        "signing keys sealed with the previous key-encryption key sealed again with the key"
                    );
                } else {
                    tracing::info!(
                        "no signing key sealed with the previous key-encryption key is left (now: a replica still running with the old key alone may seal more)"
                    );
                }
            }
            transaction.commit().await.map_err(failed)?;
        }
        let rows = load(&pool, &kek).await?;
        let (published, current) = ring(&rows, unix_millis())
            .ok_or_else(|| PgError::plain("the database holds no signing key"))?;
        let keys = SigningKeys::managed(published, current, "the database");
        let reload = Arc::new(Notify::new());
        let applying = Arc::new(tokio::sync::Mutex::new(0));
        tokio::spawn(follow(
            pool.clone(),
            kek.clone(),
            keys.clone(),
            Arc::clone(&reload),
            Arc::clone(&applying),
            rows,
        ));
        tokio::spawn(listen(
            config,
            KeyChanges {
                keys: keys.clone(),
                reload: Arc::clone(&reload),
            },
        ));
        Ok(Self {
            pool,
            kek,
            keys,
            reload,
            applying,
        })
    }

    /// The keys to sign with and publish
    /// ([`TokenEndpointBuilder::signing_keys`](crate::token::TokenEndpointBuilder::signing_keys)),
    /// kept in step with the database. Their own `add`, `rotate`, `retire` and `make_current`
    /// are refused: change them here.
    pub fn signing_keys(&self) -> SigningKeys {
        self.keys.clone()
    }

    /// Rotates to a fresh `ES256` key and returns its `kid`. The key is published at once by
    /// every replica (each hears of it within moments) and signs from `publish_for` later, so
    /// that every replica (and every verifier reading a replica's JWKS) has it before any token
    /// it signed is presented; give `publish_for` more than a few seconds, and more than the
    /// JWKS document may be cached (`max-age=300`) when verifiers outside the gateway read it. Every older key
    /// still published stays so until `retire_after` past that switch: pass the longest
    /// lifetime a token is issued for, so the last token an old key signed expires first.
    pub async fn rotate(
        &self,
        publish_for: Duration,
        retire_after: Duration,
    ) -> Result<String, PgError> {
        let key = SigningKey::generate_es256()
            .map_err(|e| PgError::plain(format!("cannot make a signing key: {e}")))?;
        bounded(self.store_rotation(&key, publish_for, retire_after)).await?;
        self.apply_now().await;
        self.reload.notify_one();
        tracing::info!(kid = key.kid(), signs_in = ?publish_for, "signing key rotation started");
        Ok(key.kid().to_owned())
    }

    /// The database side of [`rotate`](Self::rotate).
    async fn store_rotation(
        &self,
        key: &SigningKey,
        publish_for: Duration,
        retire_after: Duration,
    ) -> Result<(), PgError> {
        let mut connection = connect(&self.pool).await?;
        let failed = |e| PgError::new("cannot rotate the signing keys", e);
        let transaction = locked(&mut connection, failed).await?;
        let now = unix_millis();
        let switch = now.saturating_add(millis(publish_for));
        // Keys long gone go now; the ones still published get their end.
        transaction
            .execute(
                "DELETE FROM tower_fhir_signing_keys WHERE retire_at <= $1",
                &[&now],
            )
            .await
            .map_err(failed)?;
        transaction
            .execute(
                "UPDATE tower_fhir_signing_keys SET retire_at = $1 WHERE retire_at IS NULL",
                &[&switch.saturating_add(millis(retire_after))],
            )
            .await
            .map_err(failed)?;
        insert(&transaction, &self.kek, key, now, switch).await?;
        announce(&transaction).await?;
        transaction.commit().await.map_err(failed)
        // (The connection goes back to the pool before `apply_now`: the follower may be
        // waiting for one while it holds what `apply_now` waits for.)
    }

    /// Stops publishing the key `kid` everywhere at once, for a compromised key: tokens it
    /// signed are refused by every replica within moments. The key that signs now cannot be
    /// retired: [`rotate`](Self::rotate) first (with a short `publish_for`). A new key retired
    /// before its time to sign cancels its rotation: the keys it was to replace stay published
    /// until the next rotation.
    pub async fn retire(&self, kid: &str) -> Result<(), PgError> {
        bounded(self.store_retirement(kid)).await?;
        self.apply_now().await;
        self.reload.notify_one();
        Ok(())
    }

    /// The database side of [`retire`](Self::retire).
    async fn store_retirement(&self, kid: &str) -> Result<(), PgError> {
        let mut connection = connect(&self.pool).await?;
        let failed = |e| PgError::new("cannot retire a signing key", e);
        let transaction = locked(&mut connection, failed).await?;
        let now = unix_millis();
        let mut live: Vec<(i64, String)> = transaction
            .query(
                "SELECT signs_from, kid FROM tower_fhir_signing_keys
                 WHERE retire_at IS NULL OR retire_at > $1",
                &[&now],
            )
            .await
            .map_err(failed)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        live.sort();
        // As `ring` chooses it.
        let current = live
            .iter()
            .rev()
            .find(|(from, _)| *from <= now)
            .or(live.first());
        if current.is_some_and(|(_, current)| current == kid) {
            return Err(PgError::refused(
                "the key that signs now cannot be retired: rotate first",
            ));
        }
        if !live.iter().any(|(_, published)| published == kid) {
            return Err(PgError::refused(format!(
                "no published signing key {kid:?}"
            )));
        }
        let pending = transaction
            .query_opt(
                "SELECT 1 FROM tower_fhir_signing_keys WHERE kid = $1 AND signs_from > $2",
                &[&kid, &now],
            )
            .await
            .map_err(failed)?
            .is_some();
        transaction
            .execute(
                "UPDATE tower_fhir_signing_keys SET retire_at = $2 WHERE kid = $1",
                &[&kid, &now],
            )
            .await
            .map_err(failed)?;
        if pending {
            // A key retired before it signed: the keys its rotation was to replace stay
            // published (until the next rotation schedules them), or nothing would sign.
            transaction
                .execute(
                    "UPDATE tower_fhir_signing_keys SET retire_at = NULL
                     WHERE retire_at > $1 AND signs_from <= $1",
                    &[&now],
                )
                .await
                .map_err(failed)?;
        }
        announce(&transaction).await?;
        transaction.commit().await.map_err(failed)
    }

    /// Reads the keys back and applies them before a change made here is answered, so this
    /// replica (the one a client or an operator just changed them through) already signs,
    /// publishes and verifies as they say; the others hear of it within moments. If the read
    /// fails, the follower, told to read again, applies them.
    async fn apply_now(&self) {
        let mut applied = self.applying.lock().await;
        match load(&self.pool, &self.kek).await {
            Ok(rows) => {
                apply(&self.keys, &rows, unix_millis());
                *applied += 1;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the changed signing keys back: this replica applies them within moments");
            }
        }
    }
}

/// Makes `keys` what `rows` say at `now`; `false` when no key in them is published.
fn apply(keys: &SigningKeys, rows: &[Row], now: i64) -> bool {
    let Some((published, current)) = ring(rows, now) else {
        return false;
    };
    let (kids, current_kid) = keys.kids();
    let same = current_kid == current.kid()
        && kids.len() == published.len()
        && kids.iter().zip(&published).all(|(a, b)| a == b.kid());
    if !same {
        tracing::info!(
            current = current.kid(),
            published = published.len(),
            "signing keys changed"
        );
        keys.replace(published, current);
    }
    true
}

/// Keeps `keys` what the rows say: read again when told (a change heard, a reconnection),
/// and recomputed when a key's time to sign or to go comes. Stops when nobody else holds the
/// keys.
async fn follow(
    pool: Pool,
    kek: KeyEncryptionKey,
    keys: SigningKeys,
    reload: Arc<Notify>,
    applying: Arc<tokio::sync::Mutex<u64>>,
    mut rows: Vec<Row>,
) {
    let mut stale = false;
    // The reads applied when `rows` were read: fewer than now, and a change made through this
    // process applied newer ones.
    let mut seen = 0;
    let mut read_at = tokio::time::Instant::now();
    let mut unusable = false;
    while keys.holders() > 1 {
        let now = unix_millis();
        // At most a second asleep: to see that nobody holds the keys, and to retry a failed read.
        let wait = next_change(&rows, now).map_or(1000, |at| (at - now).clamp(1, 1000));
        let woken = tokio::time::timeout(
            Duration::from_millis(u64::try_from(wait).unwrap_or(1000)),
            reload.notified(),
        )
        .await
        .is_ok();
        let mut applied = applying.lock().await;
        // Read again when told, after a failed read, when newer keys were applied here, and
        // every minute whatever was heard (a listening connection can die without a word).
        if woken || stale || *applied != seen || read_at.elapsed() >= RELOAD_EVERY {
            read_at = tokio::time::Instant::now();
            match load(&pool, &kek).await {
                Ok(fresh) => {
                    if fresh.iter().any(|row| row.by_previous) {
                        // Added by a replica still sealing with the previous key (while the
                        // key changes): sealed again with the key, as at start.
                        reseal_locked(&pool, &kek).await;
                    }
                    rows = fresh;
                    stale = false;
                    *applied += 1;
                    seen = *applied;
                }
                Err(error) => {
                    if !stale {
                        tracing::error!(%error, "cannot read the signing keys; retrying every second");
                    }
                    stale = true;
                }
            }
        }
        if *applied != seen {
            // The read failed, and newer keys were applied here since `rows` were read:
            // applying these would undo them. Read again first.
            continue;
        }
        if apply(&keys, &rows, unix_millis()) {
            unusable = false;
        } else {
            if !unusable {
                tracing::error!("the database holds no signing key that is still published: signing on with the keys last read");
            }
            unusable = true;
        }
        drop(applied);
    }
}

/// Tells the follower to read the keys again on a change and after a reconnection.
struct KeyChanges {
    keys: SigningKeys,
    reload: Arc<Notify>,
}

impl Handler for KeyChanges {
    fn name(&self) -> &'static str {
        "keys"
    }

    fn alive(&self) -> bool {
        // The listener's and the follower's handles; somebody else must hold one more.
        self.keys.holders() > 2
    }

    async fn listening(&mut self, _missed: bool) -> Result<(), String> {
        // Every time, the first included: a change committed between the first read and
        // this connection's LISTEN would otherwise go unheard. (The reload retries on its
        // own when the read fails.)
        self.reload.notify_one();
        Ok(())
    }

    fn heard(&mut self, payload: &str) {
        if payload == KEYS_CHANGED {
            self.reload.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kid: &str, signs_from: i64, retire_at: Option<i64>) -> Row {
        let key = SigningKey::generate_es256().unwrap();
        let pem = key.pem().to_owned();
        Row {
            key: Arc::new(SigningKey::ec_pem(pem, kid).unwrap()),
            signs_from,
            retire_at,
            by_previous: false,
        }
    }

    #[test]
    fn a_new_key_signs_only_from_its_time_and_an_old_one_stays_until_retired() {
        let rows = vec![row("old", 0, Some(5_000)), row("new", 2_000, None)];
        let kids = |at| {
            let (published, current) = ring(&rows, at).unwrap();
            let published: Vec<String> = published.iter().map(|k| k.kid().to_owned()).collect();
            (published, current.kid().to_owned())
        };
        assert_eq!(
            kids(1_000),
            (vec!["old".into(), "new".into()], "old".into())
        );
        assert_eq!(
            kids(2_000),
            (vec!["old".into(), "new".into()], "new".into())
        );
        assert_eq!(kids(5_000), (vec!["new".into()], "new".into()));
        assert_eq!(next_change(&rows, 1_000), Some(2_000));
        assert_eq!(next_change(&rows, 2_000), Some(5_000));
        assert_eq!(next_change(&rows, 5_000), None);
    }
}
