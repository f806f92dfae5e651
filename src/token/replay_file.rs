//! Client assertions' `jti`s kept in a file, so that an assertion accepted before a restart is
//! still refused after it: [`FileReplayGuard`].

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::assertion::ReplayGuard;
use super::client::unix_now;
use crate::persist::{LineLog, LiveEntries};

/// A [`ReplayGuard`] in one file, for a single process: the `jti` of every client assertion
/// the token endpoint accepts is appended to it (one JSON object a line) before the token is
/// issued, and read again when the file is opened, so that a process restarting within an
/// assertion's lifetime (five minutes at most) refuses it as a replay instead of accepting it
/// a second time.
///
/// The line is written to the file before the answer (no `fsync`: it survives the process, a
/// crash or a restart, not a crash of the machine in the next seconds). When it cannot be
/// written (a full disk, say), the assertion is not accepted: the token endpoint answers `503`
/// and the client retries. Expired entries are forgotten; the file is rewritten with only the
/// live ones when it is opened and whenever it has grown to more than twice those (written
/// atomically, readable by its owner only). Clones share the file; it is not for several
/// processes at once (PostgreSQL's guard is).
///
/// ```
/// use tower_fhir::token::{FileReplayGuard, ReplayGuard};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let dir = std::env::temp_dir().join(format!("replay-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("assertion-jtis.jsonl");
/// let guard = FileReplayGuard::open(&path).unwrap();
/// assert!(guard.first_use("backend", "a-1", 4_000_000_000).await.unwrap());
/// assert!(!guard.first_use("backend", "a-1", 4_000_000_000).await.unwrap());
///
/// // After a restart: the file read again, the jti still used.
/// drop(guard);
/// let guard = FileReplayGuard::open(&path).unwrap();
/// assert!(!guard.first_use("backend", "a-1", 4_000_000_000).await.unwrap());
/// assert!(guard.first_use("other-client", "a-1", 4_000_000_000).await.unwrap());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct FileReplayGuard {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    log: LineLog,
    used: Used,
}

/// Until when each `(client, jti)` stays used (Unix seconds).
struct Used(HashMap<(String, String), u64>);

/// One line of the file.
#[derive(Serialize, Deserialize)]
struct Entry {
    client: String,
    jti: String,
    until: u64,
}

impl LiveEntries for Used {
    type Line = Entry;

    fn sweep(&mut self) -> usize {
        let now = unix_now();
        self.0.retain(|_, &mut until| until > now);
        self.0.len()
    }

    fn lines(&self) -> Vec<Entry> {
        self.0
            .iter()
            .map(|((client, jti), &until)| Entry {
                client: client.clone(),
                jti: jti.clone(),
                until,
            })
            .collect()
    }
}

impl fmt::Debug for FileReplayGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("FileReplayGuard")
            .field("path", &inner.log.path())
            .field("remembered", &inner.used.0.len())
            .finish_non_exhaustive()
    }
}

impl FileReplayGuard {
    /// Opens the guard at `path` (an absent file is an empty one, made now, its directory
    /// too if need be), forgets what has
    /// expired and rewrites the file with the rest. A line cut short at the end (the process
    /// stopped mid-write) is dropped; a file whose other lines are not its own is an error,
    /// never overwritten.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        crate::persist::make_parent(path)?;
        let mut used = Used(HashMap::new());
        let now = unix_now();
        for entry in LineLog::read::<Entry>(path, "a file of client assertion jtis")? {
            if entry.until > now {
                used.0.insert((entry.client, entry.jti), entry.until);
            }
        }
        let log = LineLog::create(path, &used.lines())?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner { log, used })),
        })
    }

    /// The `jti`s remembered now, all clients together.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .used
            .0
            .len()
    }

    /// Whether no `jti` is remembered now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// [`ReplayGuard::first_use`], on a blocking thread.
    fn first_use(&mut self, client: String, jti: String, until: u64) -> Result<bool, String> {
        let now = unix_now();
        let key = (client, jti);
        if self.used.0.get(&key).is_some_and(|&until| until > now) {
            return Ok(false);
        }
        let entry = Entry {
            client: key.0,
            jti: key.1,
            until,
        };
        self.log.append(&entry, &mut self.used)?;
        self.used.0.insert((entry.client, entry.jti), until);
        Ok(true)
    }
}

impl ReplayGuard for FileReplayGuard {
    fn first_use(
        &self,
        client: &str,
        jti: &str,
        until: u64,
    ) -> BoxFuture<'static, Result<bool, String>> {
        let inner = Arc::clone(&self.inner);
        let (client, jti) = (client.to_owned(), jti.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                inner
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .first_use(client, jti, until)
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("replay-file-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir.join("jtis.jsonl")
    }

    const LATER: u64 = 4_000_000_000;

    #[tokio::test]
    async fn a_jti_used_before_reopening_is_refused_after_it_and_the_expired_is_forgotten() {
        let path = scratch("reopen");
        let guard = FileReplayGuard::open(&path).unwrap();
        assert!(guard.first_use("a", "1", LATER).await.unwrap());
        assert!(guard.first_use("a", "expired", 1).await.unwrap());
        assert!(!guard.first_use("a", "1", LATER).await.unwrap());
        drop(guard);

        let guard = FileReplayGuard::open(&path).unwrap();
        assert!(!guard.first_use("a", "1", LATER).await.unwrap());
        // Another client's same jti is its own.
        assert!(guard.first_use("b", "1", LATER).await.unwrap());
        // An expired one is not remembered, and not in the file rewritten at the opening.
        assert!(guard.first_use("a", "expired", LATER).await.unwrap());
        assert_eq!(guard.len(), 3);
        drop(guard);
        let file = fs::read_to_string(&path).unwrap();
        assert_eq!(file.lines().count(), 3, "{file}");
        assert!(!file.contains("\"until\":1}"), "{file}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o077,
            0,
            "owner only"
        );
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_line_cut_short_at_the_end_is_dropped_and_a_foreign_file_is_refused() {
        let path = scratch("torn");
        fs::write(
            &path,
            "{\"client\":\"a\",\"jti\":\"1\",\"until\":4000000000}\n{\"client\":\"a\",\"jti\":\"2\",\"unt",
        )
        .unwrap();
        let guard = FileReplayGuard::open(&path).unwrap();
        assert!(!guard.first_use("a", "1", LATER).await.unwrap());
        assert!(guard.first_use("a", "2", LATER).await.unwrap());
        drop(guard);
        assert!(FileReplayGuard::open(&path).is_ok());

        let foreign = path.with_file_name("foreign.jsonl");
        fs::write(
            &foreign,
            "not json\n{\"client\":\"a\",\"jti\":\"1\",\"until\":4000000000}\n",
        )
        .unwrap();
        let error = FileReplayGuard::open(&foreign).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            fs::read_to_string(&foreign).unwrap().lines().count(),
            2,
            "left as it was"
        );
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn the_file_is_rewritten_with_the_live_entries_once_it_has_grown_past_twice_them() {
        let path = scratch("compact");
        let guard = FileReplayGuard::open(&path).unwrap();
        // Entries expiring now: each written, none live at the next check.
        let now = unix_now();
        for i in 0..1100 {
            assert!(guard
                .first_use("a", &format!("old-{i}"), now)
                .await
                .unwrap());
        }
        assert!(guard.first_use("a", "live", LATER).await.unwrap());
        let file = fs::read_to_string(&path).unwrap();
        assert!(
            file.lines().count() < 1100,
            "{} lines",
            file.lines().count()
        );
        assert!(file.contains("\"live\""));
        drop(guard);
        let guard = FileReplayGuard::open(&path).unwrap();
        assert!(!guard.first_use("a", "live", LATER).await.unwrap());
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_jti_that_cannot_be_written_is_not_accepted_nor_remembered() {
        let path = scratch("unwritable");
        let guard = FileReplayGuard::open(&path).unwrap();
        // /dev/full: every write fails as on a full disk.
        guard
            .inner
            .lock()
            .unwrap()
            .log
            .append_to(OpenOptions::new().append(true).open("/dev/full").unwrap());
        let error = guard.first_use("a", "1", LATER).await.unwrap_err();
        assert!(error.contains("jtis.jsonl"), "{error}");
        assert!(guard.is_empty());
        // Written again once the disk has room: the file made anew (whatever part of a line
        // the failed write left), so it opens after a restart.
        std::fs::write(&path, "{\"client\":\"a\",\"jti\":\"0\",\"un").unwrap();
        assert!(guard.first_use("a", "1", LATER).await.unwrap());
        drop(guard);
        let guard = FileReplayGuard::open(&path).unwrap();
        assert!(!guard.first_use("a", "1", LATER).await.unwrap());
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
