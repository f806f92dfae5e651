//! A real PostgreSQL server for the tests: `initdb` into a scratch directory (as the `postgres`
//! user when the tests run as root, since `initdb` refuses root), started with `pg_ctl` on a
//! free loopback port, stopped when dropped. The tools must be on the PATH (PostgreSQL 15's
//! Debian package puts them in `/usr/lib/postgresql/15/bin`, which is tried too). Without
//! them, a test under CI (`CI` set) fails, saying so; elsewhere it says loudly on stderr that it
//! did not run, and returns.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::process::free_port;

pub struct Postgres {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Where a PostgreSQL tool is: on the PATH, or in a Debian package's directory.
fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if on_path.is_some() {
        return on_path;
    }
    ["17", "16", "15", "14"]
        .iter()
        .map(|version| PathBuf::from(format!("/usr/lib/postgresql/{version}/bin/{name}")))
        .find(|path| path.exists())
}

fn missing(name: &str) -> String {
    format!(
        "the PostgreSQL tests need `{name}` (PostgreSQL 14 or later: `apt-get install postgresql`), and it is not installed"
    )
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("{}", missing(name)))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

impl Postgres {
    /// [`start`](Self::start)s a server when PostgreSQL's tools are installed. When they are
    /// not: under CI (`CI` set) the test fails; elsewhere this says on stderr that the test
    /// `test` did not run, and gives `None` (return from the test).
    pub fn start_or_skip(name: &str, test: &str) -> Option<Self> {
        if let Some(tool) = ["initdb", "pg_ctl", "createdb", "psql"]
            .into_iter()
            .find(|tool| find_tool(tool).is_none())
        {
            if std::env::var_os("CI").is_some() {
                panic!("{}", missing(tool));
            }
            eprintln!(
                "\n*** SKIPPED: {test} did not run: {}. It is reported as passed, but tested nothing. ***\n",
                missing(tool)
            );
            return None;
        }
        Some(Self::start(name))
    }

    /// Starts a fresh server; panics with the tool's output when it cannot.
    pub fn start(name: &str) -> Self {
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "tower-fhir-pg-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(
                chown.success(),
                "cannot hand {} to the postgres user",
                dir.display()
            );
        }
        let port = free_port();
        let server = Self {
            dir,
            port,
            as_postgres,
        };
        let data = server.dir.join("data");
        server.run(
            &tool("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "gateway",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        server.resume();
        server
    }

    /// Turns TLS on with this certificate chain and key (PEM), and restarts the server.
    pub fn use_tls(&self, certificate: &str, key: &str) {
        let data = self.dir.join("data");
        self.pause();
        std::fs::write(data.join("server.crt"), certificate).unwrap();
        std::fs::write(data.join("server.key"), key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\n");
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        if self.as_postgres {
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .arg(data.join("postgresql.conf"))
                .status()
                .unwrap();
            assert!(chown.success());
        }
        self.resume();
    }

    /// Starts the server (again, after [`pause`](Self::pause)) on its port.
    pub fn resume(&self) {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        self.run(
            &tool("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                self.dir.join("server.log").to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// Stops the server (every connection dropped at once), keeping its data.
    pub fn pause(&self) {
        let data = self.dir.join("data");
        self.run(
            &tool("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    fn run(&self, program: &Path, args: &[&str]) -> Output {
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(program)
                .args(args)
                .current_dir(&self.dir)
                .output()
        }
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?} failed:\n{}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The URL of `database` on this server, as the `gateway` superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://gateway@127.0.0.1:{}/{database}", self.port)
    }

    /// What `psql` prints for `sql` in `database`: unaligned, tuples only.
    pub fn query(&self, database: &str, sql: &str) -> String {
        let out = self.run(
            &tool("psql"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "gateway",
                "-d",
                database,
                "-tAc",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates an empty database.
    pub fn create_database(&self, database: &str) {
        self.run(
            &tool("createdb"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "gateway",
                database,
            ],
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.run_quietly(
            &tool("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Postgres {
    fn run_quietly(&self, program: &Path, args: &[&str]) -> std::io::Result<Output> {
        if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args)
                .output()
        } else {
            Command::new(program).args(args).output()
        }
    }
}

impl Postgres {
    /// The port the server listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of its Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }
}

/// A TCP proxy on a loopback port to a PostgreSQL server's, that can stop passing bytes either
/// way without closing anything: what a hung server, or a firewall that forgot a flow, looks
/// like to a client (its bytes are taken, no answer comes).
pub struct FreezingProxy {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    pub async fn start(target: u16) -> Self {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(&frozen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, Arc::clone(&shared)));
                tokio::spawn(pump(server_read, client_write, Arc::clone(&shared)));
            }
        });
        Self { port, frozen }
    }

    /// Stops (`true`) or resumes passing bytes.
    pub fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// The URL of `database` through the proxy.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://gateway@127.0.0.1:{}/{database}", self.port)
    }
}

/// Copies `from` to `to`, holding whatever it has while frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    let held = || async {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    loop {
        held().await;
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        held().await;
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
