//! Child processes for the tests that run the project's binaries and the interop servers.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr_file: PathBuf,
}

impl Proc {
    pub fn start(mut command: Command, stderr_file: PathBuf, ready_prefix: &str) -> (Self, String) {
        let stderr = std::fs::File::create(&stderr_file).unwrap();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Self {
            child,
            lines,
            stderr_file,
        };
        let ready = proc.wait_for(ready_prefix);
        (proc, ready)
    }

    /// The rest of the first stdout line starting with `prefix`.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!(
                    "no {prefix:?} line; stderr:\n{}",
                    std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
                ),
            }
        }
    }

    /// The process's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    /// The address a gateway's `metrics_listen` was given (say, port 0: a port picked by
    /// `free_port` could be picked for another test's gateway at the same moment), from the
    /// line its start writes on stderr: written before the start line on stdout, it is in the
    /// log once [`start`](Self::start) has returned.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        let stderr = self.stderr();
        stderr
            .lines()
            .find_map(|line| {
                line.strip_prefix("tower-fhir gateway: metrics at http://")?
                    .strip_suffix("/metrics")
            })
            .unwrap_or_else(|| panic!("no metrics address; stderr:\n{stderr}"))
            .parse()
            .unwrap()
    }

    /// Sends the process `signal` (`"TERM"`, `"HUP"`, ...) with `kill`; true when sent.
    pub fn signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success())
    }

    /// SIGTERM, then waits for the exit; true when it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        self.signal("TERM");
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-fhir-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` ports free on 127.0.0.1 as this is called, all different (each held until all are
/// chosen: ports found one after the other could be the same one twice).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|listener| listener.local_addr().unwrap().port())
}

/// Sends `bytes` (a request, or the start of one) on a fresh connection to `addr` and reads
/// until the server closes it (or 10 s pass without a byte): what came, and how long after
/// sending the server took to close.
pub fn send_until_closed(addr: std::net::SocketAddr, bytes: &str) -> (String, Duration) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes.as_bytes()).unwrap();
    let began = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        began.elapsed(),
    )
}

/// Sends `head` (a request head, and no body) on a fresh connection to `addr`; returns the
/// first answer read (10 s at most).
pub fn send_head(addr: std::net::SocketAddr, head: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = [0u8; 4096];
    let read = stream.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..read]).into_owned()
}
