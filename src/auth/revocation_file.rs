//! Revocations kept in a file, so that a process restarting with its signing keys also keeps
//! refusing what it revoked: [`FileRevocationLog`].

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::revoked::{unix_now, RevocationLog, RevokedTokens};

/// A [`RevocationLog`] in one JSON file, for a single process whose signing keys outlive a
/// restart (kept in a file too): what it revoked is written before the revocation is answered,
/// and [`apply`](Self::apply) at start refuses it again until it expires. Expired entries are
/// dropped at each write. Written atomically (a new temporary file renamed over the old),
/// readable by its owner only. Clones share the file; it is not for several processes at once
/// (PostgreSQL's log is).
///
/// ```
/// use tower_fhir::auth::{FileRevocationLog, RevocationLog, RevokedTokens, VerifiedClaims};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let dir = std::env::temp_dir().join(format!("revocations-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("revoked.json");
/// let log = FileRevocationLog::open(&path).unwrap();
/// log.record(Some("https://gw.example"), "t-1", 4_000_000_000).await.unwrap();
///
/// // After a restart: a fresh list, the file read again.
/// let revoked = RevokedTokens::new();
/// FileRevocationLog::open(&path).unwrap().apply(&revoked);
/// let claims = serde_json::json!({"iss": "https://gw.example", "jti": "t-1", "exp": 4_000_000_000u64});
/// let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
/// assert!(revoked.is_revoked(&claims));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct FileRevocationLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// What the file holds; written whole under this lock.
    entries: Mutex<Entries>,
}

#[derive(Default, Clone, Serialize, Deserialize)]
struct Entries {
    #[serde(default)]
    tokens: Vec<Token>,
    #[serde(default)]
    clients: Vec<Client>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Token {
    iss: Option<String>,
    jti: String,
    exp: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct Client {
    iss: Option<String>,
    client: String,
    revoked_at: u64,
    until: u64,
}

impl fmt::Debug for FileRevocationLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileRevocationLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl FileRevocationLog {
    /// Opens the log at `path` (an absent file is an empty log, made at the first
    /// revocation). A file that is not one of its own is an error, never overwritten.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let entries = match crate::persist::read_if_exists(&path)? {
            None => Entries::default(),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a revocation log: {e}", path.display()),
                )
            })?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                entries: Mutex::new(entries),
            }),
        })
    }

    /// Revokes in `revoked` everything the log holds that has not expired: at start, before
    /// the first request.
    pub fn apply(&self, revoked: &RevokedTokens) {
        let entries = self.entries();
        for token in &entries.tokens {
            revoked.revoke_id(token.iss.as_deref(), &token.jti, token.exp);
        }
        for client in &entries.clients {
            revoked.revoke_client(
                client.iss.as_deref(),
                &client.client,
                client.revoked_at,
                client.until,
            );
        }
    }

    fn entries(&self) -> Entries {
        self.inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds to the log with `change`, drops what expired, and writes the file (on a blocking
    /// thread); the change is kept only once written.
    fn write(
        &self,
        change: impl FnOnce(&mut Entries) + Send + 'static,
    ) -> BoxFuture<'static, Result<(), String>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || {
                let mut entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
                let mut next = entries.clone();
                change(&mut next);
                let now = unix_now();
                next.tokens.retain(|token| token.exp > now);
                next.clients.retain(|client| client.until > now);
                let bytes = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
                crate::persist::write_atomically(&inner.path, &bytes)
                    .map_err(|e| format!("{}: {e}", inner.path.display()))?;
                *entries = next;
                Ok(())
            })
            .await;
            written.map_err(|e| e.to_string())?
        })
    }
}

impl RevocationLog for FileRevocationLog {
    fn record(
        &self,
        issuer: Option<&str>,
        jti: &str,
        expires_at: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        let token = Token {
            iss: issuer.map(str::to_owned),
            jti: jti.to_owned(),
            exp: expires_at,
        };
        self.write(move |entries| entries.tokens.push(token))
    }

    fn record_client(
        &self,
        issuer: Option<&str>,
        client: &str,
        revoked_at: u64,
        until: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        let client = Client {
            iss: issuer.map(str::to_owned),
            client: client.to_owned(),
            revoked_at,
            until,
        };
        self.write(move |entries| entries.clients.push(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::VerifiedClaims;
    use serde_json::json;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("revocation-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("revoked.json")
    }

    fn claims(value: serde_json::Value) -> VerifiedClaims {
        VerifiedClaims::assume_verified(value.as_object().unwrap().clone()).unwrap()
    }

    #[tokio::test]
    async fn what_was_recorded_is_refused_after_reopening_and_the_expired_is_dropped() {
        let path = scratch("reopen");
        let log = FileRevocationLog::open(&path).unwrap();
        log.record(Some("https://a"), "live", 4_000_000_000)
            .await
            .unwrap();
        log.record(Some("https://a"), "expired", 1).await.unwrap();
        log.record_client(Some("https://a"), "app", 2_000, 4_000_000_000)
            .await
            .unwrap();
        drop(log);

        let revoked = RevokedTokens::new();
        FileRevocationLog::open(&path).unwrap().apply(&revoked);
        let token = claims(json!({"iss": "https://a", "jti": "live", "exp": 4_000_000_000u64}));
        let of_app = claims(
            json!({"iss": "https://a", "sub": "app", "iat": 1_999, "exp": 4_000_000_000u64}),
        );
        let later = claims(
            json!({"iss": "https://a", "sub": "app", "iat": 2_001, "exp": 4_000_000_000u64}),
        );
        assert!(revoked.is_revoked(&token));
        assert!(revoked.is_revoked(&of_app));
        assert!(!revoked.is_revoked(&later));
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(!file.contains("expired"), "{file}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn an_unwritable_file_fails_the_record_and_keeps_nothing() {
        let dir = scratch("unwritable").parent().unwrap().to_path_buf();
        let path = dir.join("missing-dir").join("revoked.json");
        let log = FileRevocationLog::open(&path).unwrap();
        assert!(log.record(None, "t", 4_000_000_000).await.is_err());
        let revoked = RevokedTokens::new();
        log.apply(&revoked);
        assert!(revoked.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_not_overwritten() {
        let path = scratch("foreign");
        std::fs::write(&path, "not json").unwrap();
        let error = FileRevocationLog::open(&path).unwrap_err();
        assert!(
            error.to_string().contains("not a revocation log"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not json");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
