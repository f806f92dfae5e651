//! Runs against targets that misbehave: a server that never answers, one that closes every
//! connection after its answer, a port nobody listens on. Each run is bounded in time.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOADGEN: &str = env!("CARGO_BIN_EXE_fhir-loadgen");

/// Runs the load generator with `args`, killing it (and failing) past `limit`.
fn run_within(limit: Duration, args: &[&str]) -> Output {
    let mut child = Command::new(LOADGEN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A server that accepts connections, reads what comes and never answers; its address.
fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_target_that_never_answers_ends_the_run_with_timeouts() {
    let target = silent_server();
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--connections",
        "4",
        "--timeout",
        "1",
        "--json",
    ];
    // 0.5 s of warm-up, 2 s measured, then at most 1 s for the last requests (and slack for a
    // busy machine).
    let out = run_within(Duration::from_secs(30), &args);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let timeouts = report["errors"]["timeout"].as_u64().unwrap();
    assert!(timeouts >= 4, "{report:#}");
    assert_eq!(report["error_count"].as_u64(), Some(timeouts), "{report:#}");
    assert_eq!(report["interrupted"], false);
    assert_eq!(out.status.code(), Some(1), "every request failed");
}

#[test]
fn a_rate_the_target_cannot_keep_counts_what_was_never_sent() {
    let target = silent_server();
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--rate",
        "50",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--connections",
        "2",
        "--timeout",
        "1",
        "--json",
    ];
    let out = run_within(Duration::from_secs(30), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
    let count = |field: &str| report[field].as_u64().unwrap();
    // 2 s at 50/s: 100 slots, each sent or counted unsent.
    assert_eq!(count("scheduled"), 100, "{report:#}");
    assert_eq!(count("sent") + count("unsent"), 100, "{report:#}");
    assert!(count("unsent") > 50, "{report:#}");
    assert!(stderr.contains("fell behind the rate"), "{stderr}");
    let timeline: u64 = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum();
    assert!(timeline >= count("unsent"), "{report:#}");
}

#[test]
fn a_dead_port_is_reported_as_errors_and_fails_the_run() {
    // A port just freed: nobody listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("http://127.0.0.1:{port}");
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--connections",
        "2",
    ];
    let out = run_within(Duration::from_secs(30), &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(" 0 answered, 0 req/s"), "{text}");
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("connect:"), "{text}");
    // The timeline counts the failures in their second.
    let out = run_within(Duration::from_secs(30), &[&args[..], &["--json"]].concat());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = &report["timeline"][0];
    assert_eq!(second["requests"], 0, "{report:#}");
    assert!(second["errors"].as_u64().unwrap() > 0, "{report:#}");
}

/// A server that answers one request per connection, `Connection: close`, and closes it (as
/// nginx does after `keepalive_requests`); its address.
fn closing_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(n) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}",
                );
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_connection_the_server_closes_after_its_answer_is_opened_again() {
    let target = closing_server();
    for rate in [None, Some("100")] {
        let mut args = vec![
            "--target",
            &target,
            "--path",
            "/Patient/1",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--connections",
            "2",
            "--json",
        ];
        if let Some(rate) = rate {
            args.extend(["--rate", rate]);
        }
        let out = run_within(Duration::from_secs(30), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
        assert_eq!(report["error_count"], 0, "{report:#}");
        assert!(report["answered"].as_u64().unwrap() > 10, "{report:#}");
        assert!(out.status.success(), "{report:#}");
    }
}
