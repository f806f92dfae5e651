//! Writing state files so that a crash leaves the old or the new file, never half of one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Tells the temporary files of one process apart.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// Makes the directory `path` is in (with its parents, readable by their owner only on Unix:
/// it holds keys and hashes) if it does not exist yet: what a store does when it is opened,
/// so that its first write finds it.
pub(crate) fn make_parent(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
/// The file is readable by its owner only on Unix (it may hold hashes, keys or upstream
/// credentials). Its directory must exist (see [`make_parent`]): one removed while the
/// process runs is not made again behind the operator's back, with only this file in it (the
/// write fails, and says so).
///
/// The temporary file is always a new one (`O_CREAT | O_EXCL`): a file or a symlink someone
/// planted under its name is never written through, nor its mode kept; another name is tried.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let (tmp, file) = (|| {
        let mut attempts = 0;
        loop {
            let n = TEMPORARIES.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
            match options.open(&tmp) {
                Ok(file) => return Ok((tmp, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 64 => {
                    attempts += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("its directory {} is gone: {e}", dir.display()),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    })()?;
    let written = (|| {
        let mut file = file;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(err) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    // Make the rename itself durable (a no-op where directories cannot be opened).
    if let Ok(dir) = fs::File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Whether `file` is the file at `path` now (the same device and inode, on Unix; elsewhere
/// only whether a file is there): not one removed, renamed away or replaced under the process.
pub(crate) fn is_file_at(file: &fs::File, path: &Path) -> bool {
    let (Ok(open), Ok(there)) = (file.metadata(), fs::metadata(path)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        open.dev() == there.dev() && open.ino() == there.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = open;
        there.is_file()
    }
}

/// Reads a state file; `None` when it does not exist yet.
pub(crate) fn read_if_exists(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a [`LineLog`] holds live, kept by its owner (in a map, say) beside the file.
pub(crate) trait LiveEntries {
    /// One line of the file.
    type Line: Serialize;
    /// Forgets what has expired; how many entries are left.
    fn sweep(&mut self) -> usize;
    /// The entries left, as lines.
    fn lines(&self) -> Vec<Self::Line>;
}

/// A file of JSON lines, one entry each, for state that grows one entry at a time (used
/// `jti`s, revocations): each entry is appended (synced to the disk only when
/// [`durable`](Self::durable); otherwise it survives the process, not a crash of the machine
/// in the next seconds), and the file is rewritten atomically with only
/// the live entries when it has grown to more than twice those, so an entry costs the same
/// however many are kept. A write that failed (a full disk) may have left part of a line: the
/// file is rewritten before the next one. Readable by its owner only.
pub(crate) struct LineLog {
    path: PathBuf,
    /// The file, opened for appending.
    file: fs::File,
    /// The lines the file holds.
    lines: usize,
    /// At how many lines the expired entries are next forgotten (and the file rewritten if
    /// it holds more than twice the live ones).
    check_at: usize,
    torn: bool,
    /// The file swapped for another by a test ([`append_to`](Self::append_to)): not compared
    /// with the one at the path.
    #[cfg(test)]
    swapped: bool,
    /// Each line synced to the disk before [`append`](Self::append) returns.
    durable: bool,
}

impl LineLog {
    /// The entries of the file at `path` (none when it does not exist). A line cut short at
    /// the end (the process stopped mid-write: JSON that ends early, with no newline after
    /// it, and maybe zero bytes where the machine stopped) is dropped; any other line that is not an entry is an error naming the file
    /// as not `what`.
    pub(crate) fn read<E: DeserializeOwned>(path: &Path, what: &str) -> io::Result<Vec<E>> {
        let Some(bytes) = read_if_exists(path)? else {
            return Ok(Vec::new());
        };
        let whole = bytes.ends_with(b"\n");
        let mut entries = Vec::new();
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            if line.is_empty() {
                continue;
            }
            let last = lines.peek().is_none_or(|rest| rest.is_empty());
            // A crash of the machine may leave the end of the file zeroed.
            let cut = last && !whole;
            let line = match line.iter().rposition(|&b| b != 0) {
                Some(end) if cut => &line[..=end],
                None if cut => continue,
                _ => line,
            };
            match serde_json::from_slice(line) {
                Ok(entry) => entries.push(entry),
                // (Cut short: JSON that ends early, as a write stopped midway leaves it.)
                Err(e) if cut && e.is_eof() => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: not {what}: {e}", path.display()),
                    ))
                }
            }
        }
        Ok(entries)
    }

    /// Writes `live` as the whole file at `path` and opens it for appending.
    pub(crate) fn create<T: Serialize>(path: &Path, live: &[T]) -> io::Result<Self> {
        let file = rewrite(path, live)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            lines: live.len(),
            check_at: next_check(live.len(), live.len()),
            torn: false,
            #[cfg(test)]
            swapped: false,
            durable: false,
        })
    }

    /// Each line appended is synced to the disk (`fdatasync`) before `append` returns, so it
    /// survives a crash of the machine too, not only of the process.
    #[must_use]
    pub(crate) fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// The file's path.
    #[cfg(feature = "token")]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends to `file` from now on (`/dev/full`, to fail as a full disk does).
    #[cfg(test)]
    pub(crate) fn append_to(&mut self, file: fs::File) {
        self.file = file;
        self.swapped = true;
    }

    /// Whether the open file is still the one at its path.
    fn still_at_its_path(&self) -> bool {
        #[cfg(test)]
        if self.swapped {
            return true;
        }
        is_file_at(&self.file, &self.path)
    }

    /// Appends `entry`; before, when due, forgets what expired in `live` and rewrites the
    /// file if it holds more than twice what is left (or a write failed before). The entry
    /// is the caller's to add to `live` once this succeeded.
    pub(crate) fn append<S: LiveEntries>(
        &mut self,
        entry: &impl Serialize,
        live: &mut S,
    ) -> Result<(), String> {
        let mut line = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        line.push(b'\n');
        // A file removed or replaced under the process (its directory removed, a log
        // rotation's rename): lines appended to the open file would be lost with it. It is
        // written anew at its path, whole (or, its directory gone, the append fails).
        if !self.torn && !self.still_at_its_path() {
            self.torn = true;
        }
        if self.torn || self.lines >= self.check_at {
            let left = live.sweep();
            if self.torn || self.lines > 2 * left {
                self.file = rewrite(&self.path, &live.lines())
                    .map_err(|e| format!("{}: {e}", self.path.display()))?;
                self.lines = left;
                self.torn = false;
            }
            self.check_at = next_check(self.lines, left);
        }
        let written = self.file.write_all(&line);
        let written = match written {
            Ok(()) if self.durable => self.file.sync_data(),
            other => other,
        };
        if let Err(e) = written {
            // (A full disk may have taken part of the line: the next line must not follow it.)
            self.torn = true;
            return Err(format!("{}: {e}", self.path.display()));
        }
        self.lines += 1;
        Ok(())
    }
}

/// When to look for expired entries next: after as many lines more as are live, and at least
/// 1,024 (so each line's share of the sweeps and rewrites stays constant).
fn next_check(lines: usize, live: usize) -> usize {
    lines + live.max(1024)
}

/// Writes `live` to `path` atomically, one JSON line each, and opens it for appending.
fn rewrite<T: Serialize>(path: &Path, live: &[T]) -> io::Result<fs::File> {
    let mut bytes = Vec::new();
    for entry in live {
        serde_json::to_writer(&mut bytes, entry).map_err(io::Error::other)?;
        bytes.push(b'\n');
    }
    write_atomically(path, &bytes)?;
    let file = fs::OpenOptions::new().append(true).open(path)?;
    // The file renamed into place is a regular file of this process's making; one swapped in
    // since (a link to elsewhere) is not written through.
    let meta = file.metadata()?;
    if !meta.is_file() || fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_made_when_opened_and_never_again_behind_the_operators_back() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-made-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("state").join("file.json");
        make_parent(&path).unwrap();
        make_parent(&path).unwrap();
        write_atomically(&path, b"{}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for made in [dir.clone(), dir.join("state")] {
                let mode = fs::metadata(&made).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o700, "{}", made.display());
            }
        }
        // Removed while the process runs: the write fails, and makes nothing.
        fs::remove_dir_all(dir.join("state")).unwrap();
        let error = write_atomically(&path, b"{}").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(error.to_string().contains("is gone"), "{error}");
        assert!(!dir.join("state").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Lines kept by the test's [`LiveEntries`].
    struct Kept(Vec<u32>);

    impl LiveEntries for Kept {
        type Line = u32;
        fn sweep(&mut self) -> usize {
            self.0.len()
        }
        fn lines(&self) -> Vec<u32> {
            self.0.clone()
        }
    }

    #[test]
    fn a_line_log_removed_or_replaced_under_it_is_written_anew_and_its_directory_not() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-lines-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("lines.jsonl");
        make_parent(&path).unwrap();
        let mut kept = Kept(vec![1]);
        let mut log = LineLog::create(&path, &kept.lines()).unwrap();
        let append = |log: &mut LineLog, kept: &mut Kept, n: u32| {
            let appended = log.append(&n, kept);
            if appended.is_ok() {
                kept.0.push(n);
            }
            appended
        };
        append(&mut log, &mut kept, 2).unwrap();
        let read = |path: &Path| LineLog::read::<u32>(path, "numbers").unwrap();
        assert_eq!(read(&path), [1, 2]);
        // Removed: the next line writes the file anew, with every live line.
        fs::remove_file(&path).unwrap();
        append(&mut log, &mut kept, 3).unwrap();
        assert_eq!(read(&path), [1, 2, 3]);
        // Renamed away and replaced (a rotation): the same.
        fs::rename(&path, dir.join("old")).unwrap();
        fs::write(&path, "9\n").unwrap();
        append(&mut log, &mut kept, 4).unwrap();
        assert_eq!(read(&path), [1, 2, 3, 4]);
        // Its directory removed: the line fails, and nothing is made.
        fs::remove_dir_all(&dir).unwrap();
        assert!(append(&mut log, &mut kept, 5).is_err());
        assert!(!dir.exists());
        assert_eq!(kept.0, [1, 2, 3, 4]);
    }

    #[test]
    fn a_line_cut_short_at_the_end_is_dropped_but_not_a_whole_foreign_one() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-lines-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lines.jsonl");
        let read = |text: &str| {
            fs::write(&path, text).unwrap();
            LineLog::read::<serde_json::Map<String, serde_json::Value>>(&path, "lines")
        };
        assert_eq!(read("{\"a\":1}\n{\"a\":").unwrap().len(), 1);
        assert_eq!(read("{\"a\":1}\n").unwrap().len(), 1);
        assert_eq!(read("{\"a\":1}\n\0\0\0").unwrap().len(), 1);
        assert_eq!(read("{\"a\":1}\n{\"a\"\0\0").unwrap().len(), 1);
        // Whole JSON that is no entry, or not JSON, is no line cut short.
        assert!(read("{\"a\":1}\n[1]").is_err());
        assert!(read("{\"a\":1}\nnot json").is_err());
        assert!(read("not json\n{\"a\":1}\n").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-persist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert!(read_if_exists(&path).unwrap().is_none());
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(read_if_exists(&path).unwrap().unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "owner only");
        }
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_is_never_written_through() {
        let dir =
            std::env::temp_dir().join(format!("tower-fhir-persist-plant-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, b"untouched").unwrap();
        // Symlinks under the next temporary names, toward the victim: each is skipped.
        let next = TEMPORARIES.load(Ordering::Relaxed);
        for n in next..next + 4 {
            let planted = dir.join(format!(".state.json.{}.{n}.tmp", std::process::id()));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        let path = dir.join("state.json");
        write_atomically(&path, b"secret").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert!(!fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(&dir).unwrap();
    }
}
