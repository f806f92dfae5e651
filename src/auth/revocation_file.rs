//! Revocations kept in a file, so that a process restarting with its signing keys also keeps
//! refusing what it revoked: [`FileRevocationLog`].

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::revoked::{unix_now, RevocationLog, RevokedTokens};
use crate::persist::{LineLog, LiveEntries};

/// A [`RevocationLog`] in one file, for a single process whose signing keys outlive a
/// restart (kept in a file too): what it revoked is appended to the file (one JSON object a
/// line) and synced to the disk before the revocation is answered, and [`apply`](Self::apply) at start refuses it
/// again until it expires.
///
/// A revocation costs one line however many are kept: the file is rewritten with only the
/// unexpired entries at the first revocation after opening and whenever it has grown to more
/// than twice those (atomically, a new temporary file renamed over the old), readable by its
/// owner only. A line cut short at the end (the process stopped mid-write) is dropped when
/// read; the whole-file JSON object earlier versions wrote is read too, and rewritten as
/// lines. Clones share the file; it is not for several processes at once (PostgreSQL's log
/// is).
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
    state: Mutex<State>,
}

struct State {
    /// The file, once the first revocation since opening has rewritten it.
    log: Option<LineLog>,
    /// What the file holds (expired entries until the next sweep).
    entries: Entries,
}

/// The file as earlier versions wrote it (one JSON object), and the entries kept.
#[derive(Default, Clone, Deserialize)]
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

/// One line of the file.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Token(Token),
    Client(Client),
}

impl LiveEntries for Entries {
    type Line = Line;

    fn sweep(&mut self) -> usize {
        let now = unix_now();
        self.tokens.retain(|token| token.exp > now);
        self.clients.retain(|client| client.until > now);
        self.tokens.len() + self.clients.len()
    }

    fn lines(&self) -> Vec<Line> {
        let tokens = self.tokens.iter().cloned().map(Line::Token);
        tokens
            .chain(self.clients.iter().cloned().map(Line::Client))
            .collect()
    }
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
    /// revocation; its directory is made now if need be). A file that is not one of its own
    /// is an error, never overwritten.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        crate::persist::make_parent(&path)?;
        let what = "a revocation log";
        let earlier = crate::persist::read_if_exists(&path)?
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .filter(|whole| whole.get("tokens").is_some() || whole.get("clients").is_some());
        let mut entries = match earlier {
            Some(whole) => serde_json::from_value(whole).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not {what}: {e}", path.display()),
                )
            })?,
            None => {
                let mut entries = Entries::default();
                for line in LineLog::read::<Line>(&path, what)? {
                    match line {
                        Line::Token(token) => entries.tokens.push(token),
                        Line::Client(client) => entries.clients.push(client),
                    }
                }
                entries
            }
        };
        entries.sweep();
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new(State { log: None, entries }),
            }),
        })
    }

    /// Revokes in `revoked` everything the log holds that has not expired: at start, before
    /// the first request.
    pub fn apply(&self, revoked: &RevokedTokens) {
        let state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = unix_now();
        for token in state.entries.tokens.iter().filter(|token| token.exp > now) {
            revoked.revoke_id(token.iss.as_deref(), &token.jti, token.exp);
        }
        for client in state
            .entries
            .clients
            .iter()
            .filter(|client| client.until > now)
        {
            revoked.revoke_client(
                client.iss.as_deref(),
                &client.client,
                client.revoked_at,
                client.until,
            );
        }
    }

    /// Appends `line` to the file (on a blocking thread); kept only once written.
    fn write(&self, line: Line) -> BoxFuture<'static, Result<(), String>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || {
                let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
                let State { log, entries } = &mut *state;
                let log = match log {
                    Some(log) => log,
                    None => {
                        // The first since opening: the file made anew, in lines, unexpired
                        // entries only (whatever part of a line a stop mid-write left).
                        entries.sweep();
                        let made = LineLog::create(&inner.path, &entries.lines())
                            .map_err(|e| format!("{}: {e}", inner.path.display()))?;
                        log.insert(made.durable())
                    }
                };
                log.append(&line, entries)?;
                match line {
                    Line::Token(token) => entries.tokens.push(token),
                    Line::Client(client) => entries.clients.push(client),
                }
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
        self.write(Line::Token(Token {
            iss: issuer.map(str::to_owned),
            jti: jti.to_owned(),
            exp: expires_at,
        }))
    }

    fn record_client(
        &self,
        issuer: Option<&str>,
        client: &str,
        revoked_at: u64,
        until: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        self.write(Line::Client(Client {
            iss: issuer.map(str::to_owned),
            client: client.to_owned(),
            revoked_at,
            until,
        }))
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
        // One line a revocation; the first after opening rewrites the file without the
        // expired.
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(file.lines().count(), 3, "{file}");
        let log = FileRevocationLog::open(&path).unwrap();
        log.record(None, "next", 4_000_000_000).await.unwrap();
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(!file.contains("expired"), "{file}");
        assert_eq!(file.lines().count(), 3, "{file}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn an_unwritable_file_fails_the_record_and_keeps_nothing() {
        let dir = scratch("unwritable").parent().unwrap().to_path_buf();
        let path = dir.join("missing-dir").join("revoked.json");
        let log = FileRevocationLog::open(&path).unwrap();
        // A regular file where its directory was: nothing can be written there.
        std::fs::remove_dir(dir.join("missing-dir")).unwrap();
        std::fs::write(dir.join("missing-dir"), b"").unwrap();
        assert!(log.record(None, "t", 4_000_000_000).await.is_err());
        let revoked = RevokedTokens::new();
        log.apply(&revoked);
        assert!(revoked.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_earlier_whole_file_object_is_read_and_rewritten_as_lines() {
        let path = scratch("earlier");
        let earlier = json!({
            "tokens": [{"iss": "https://a", "jti": "t", "exp": 4_000_000_000u64}],
            "clients": [{"iss": null, "client": "app", "revoked_at": 2_000, "until": 4_000_000_000u64}]
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&earlier).unwrap()).unwrap();
        // Read as it is, and left so while nothing is revoked.
        let revoked = RevokedTokens::new();
        FileRevocationLog::open(&path).unwrap().apply(&revoked);
        let t = claims(json!({"iss": "https://a", "jti": "t", "exp": 4_000_000_000u64}));
        assert!(revoked.is_revoked(&t));
        let untouched = std::fs::read(&path).unwrap();
        assert_eq!(untouched, serde_json::to_vec_pretty(&earlier).unwrap());
        let log = FileRevocationLog::open(&path).unwrap();
        log.record(Some("https://a"), "u", 4_000_000_000)
            .await
            .unwrap();
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(file.lines().count(), 3, "{file}");
        let revoked = RevokedTokens::new();
        FileRevocationLog::open(&path).unwrap().apply(&revoked);
        for jti in ["t", "u"] {
            let token = claims(json!({"iss": "https://a", "jti": jti, "exp": 4_000_000_000u64}));
            assert!(revoked.is_revoked(&token), "{jti}");
        }
        let of_app = claims(json!({"sub": "app", "iat": 1_999, "exp": 4_000_000_000u64}));
        assert!(revoked.is_revoked(&of_app));
        // A line cut short at the end (a stop mid-write) is dropped, the rest kept.
        std::fs::write(&path, format!("{file}{{\"iss\":null,\"jti\":\"v\",\"ex")).unwrap();
        let revoked = RevokedTokens::new();
        FileRevocationLog::open(&path).unwrap().apply(&revoked);
        assert_eq!(revoked.len(), 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_revocation_costs_a_line_and_the_expired_are_rewritten_away() {
        let path = scratch("compact");
        let log = FileRevocationLog::open(&path).unwrap();
        // Entries expiring now: each written, none live at the next sweep.
        let now = unix_now();
        for i in 0..1100 {
            log.record(None, &format!("old-{i}"), now).await.unwrap();
        }
        log.record(None, "live", 4_000_000_000).await.unwrap();
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(
            file.lines().count() < 1100,
            "{} lines",
            file.lines().count()
        );
        assert!(file.contains("\"live\""));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
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
