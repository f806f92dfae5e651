//! Runs against targets that misbehave: a server that never answers, one that closes every
//! connection after its answer, a port nobody listens on. Each run is bounded in time.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOADGEN: &str = env!("CARGO_BIN_EXE_fhir-loadgen");

mod common;

/// Runs the load generator with `args`, killing it (and failing) past `limit`.
/// The JSON report a run printed (`--json`), or a failure with what it said on stderr.
fn report_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
}

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
    silent_server_counting().0
}

/// [`silent_server`], and how many of its connections have sent it something (a request it
/// will never answer).
fn silent_server_counting() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                let mut counted = false;
                while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {
                    if !counted {
                        counted = true;
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), asked)
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
    let report = report_of(&out);
    let timeouts = report["errors"]["timeout"].as_u64().unwrap();
    assert!(timeouts >= 4, "{report:#}");
    assert_eq!(report["error_count"].as_u64(), Some(timeouts), "{report:#}");
    assert_eq!(report["interrupted"], false);
    assert_eq!(out.status.code(), Some(1), "every request failed");
    // The timeouts are in the latencies, each at least the timeout: not an empty histogram.
    assert_eq!(report["latency_includes"]["failed"], timeouts, "{report:#}");
    assert!(
        report["latency_us"]["p50"].as_u64().unwrap() >= 1_000_000,
        "{report:#}"
    );
    assert_eq!(report["answered_latency_us"]["max"], 0, "{report:#}");
}

/// A server that answers every request but every `nth` at once, and never answers those; its
/// address.
fn sometimes_silent_server(nth: usize) -> String {
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let addr = common::keep_alive_server(move |_| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % nth == nth - 1 {
            std::thread::sleep(Duration::from_secs(60));
        }
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()
    });
    format!("http://{addr}")
}

#[test]
fn timeouts_show_in_the_percentiles_and_the_answered_apart() {
    let target = sometimes_silent_server(20);
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--connections",
        "4",
        "--timeout",
        "0.3",
        "--max-error-rate",
        "0.5",
    ];
    for json in [true, false] {
        let args = [&args[..], if json { &["--json"][..] } else { &[] }].concat();
        let out = run_within(Duration::from_secs(30), &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        if !json {
            assert!(
                stdout.contains("failed and unsent counted as lower bounds"),
                "{stdout}"
            );
            assert!(stdout.contains("answered us"), "{stdout}");
            continue;
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let timeouts = report["errors"]["timeout"].as_u64().unwrap();
        let answered = report["answered"].as_u64().unwrap();
        // One in 20.
        assert!(timeouts > 0 && answered >= 15 * timeouts, "{report:#}");
        // Under 5% timed out, yet they are the p99.
        let p99 = report["latency_us"]["p99"].as_u64().unwrap();
        assert!(p99 >= 300_000, "{report:#}");
        let answered_p99 = report["answered_latency_us"]["p99"].as_u64().unwrap();
        assert!(answered_p99 < 300_000, "{report:#}");
        let includes = &report["latency_includes"];
        assert_eq!(includes["failed"], timeouts, "{report:#}");
        assert_eq!(includes["answered"], answered, "{report:#}");
        // And in the timeline, by the second they were due.
        let timeline: u64 = report["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(timeline, answered + timeouts, "{report:#}");
    }
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
        // (With a warm-up, its backlog would hold both connections for the whole window, and
        // nothing due in it would be sent: `with_nothing_sent_in_the_window_...`.)
        "--warmup",
        "0",
        "--connections",
        "2",
        "--timeout",
        "1",
        "--json",
    ];
    let out = run_within(Duration::from_secs(30), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = report_of(&out);
    let count = |field: &str| report[field].as_u64().unwrap();
    // 2 s at 50/s: 100 slots, each sent or counted unsent.
    assert_eq!(count("scheduled"), 100, "{report:#}");
    assert_eq!(count("sent") + count("unsent"), 100, "{report:#}");
    assert!(count("unsent") > 50, "{report:#}");
    assert!(count("sent") > 0, "{report:#}");
    // Two connections, each stuck 1 s on a request, cannot send 50 a second; the target took
    // as long with one busy as with both: said so.
    assert!(
        stderr.contains("the load generator's connections were the limit"),
        "{stderr}"
    );
    assert!(stderr.contains("run with --connections"), "{stderr}");
    assert_eq!(report["connection_limited"], true, "{report:#}");
    assert_eq!(report["limited_by"], "connections", "{report:#}");
    assert!(
        count("all_connections_busy") >= count("unsent"),
        "{report:#}"
    );
    let timeline: u64 = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum();
    assert!(timeline >= count("unsent"), "{report:#}");
    // The unsent count only until the run stopped: the percentiles are lower bounds, said so,
    // and each second says how many of its requests were never sent.
    assert_eq!(report["latencies_are_lower_bounds"], true, "{report:#}");
    let note = report["lower_bounds_note"].as_str().unwrap();
    assert!(
        note.contains(&format!("{} were never sent", count("unsent"))),
        "{report:#}"
    );
    let unsent: u64 = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["unsent"].as_u64().unwrap())
        .sum();
    assert_eq!(unsent, count("unsent"), "{report:#}");
    assert_eq!(report["latency_includes"]["unsent"], count("unsent"));
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
    let out = run_within(
        Duration::from_secs(30),
        &[&args[..], &["--duration", "2"]].concat(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(" 0 answered, 0 req/s"), "{text}");
    // stderr is no terminal here: no progress line over the last (`\r`, `ESC [K`), and none
    // at all in a run shorter than its 5 s (what it says is tested beside its code).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\r') && !stderr.contains('\u{1b}'),
        "{stderr:?}"
    );
    assert!(!stderr.contains("req/s"), "{stderr}");
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("connect:"), "{text}");
    // The timeline counts the failures in their second, among its requests.
    let out = run_within(Duration::from_secs(30), &[&args[..], &["--json"]].concat());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = &report["timeline"][0];
    assert!(second["errors"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(second["requests"], second["errors"], "{report:#}");
    // Each connection pauses 5 ms after a failure: at most about 200 tries a second each,
    // not a tight loop (tens of thousands).
    let errors = report["error_count"].as_u64().unwrap();
    assert!(
        errors <= 2 * 200 + 50,
        "{errors} tries in 1 s on 2 connections"
    );
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
        let report = report_of(&out);
        assert_eq!(report["error_count"], 0, "{report:#}");
        assert!(report["answered"].as_u64().unwrap() > 10, "{report:#}");
        assert!(out.status.success(), "{report:#}");
    }
}

/// A server that answers every request after `delay`; its address.
fn slow_server(delay: Duration) -> String {
    let addr = common::keep_alive_server(move |_| {
        std::thread::sleep(delay);
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()
    });
    format!("http://{addr}")
}

#[test]
fn a_rate_too_high_for_the_connections_is_blamed_on_them() {
    // 40 req/s at 100 ms each keeps 4 connections busy.
    let target = slow_server(Duration::from_millis(100));
    for (connections, limited) in [("2", true), ("12", false)] {
        let args = [
            "--target",
            &target,
            "--path",
            "/Patient/1",
            "--rate",
            "40",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--connections",
            connections,
            "--json",
        ];
        let out = run_within(Duration::from_secs(30), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let report = report_of(&out);
        assert_eq!(report["connection_limited"], limited, "{report:#}");
        let busy = report["all_connections_busy"].as_u64().unwrap();
        let warning = report["warning"].as_str().unwrap_or_default();
        if limited {
            // 100 ms with one connection busy as with both: the connections, not the target.
            assert_eq!(report["limited_by"], "connections", "{report:#}");
            assert!(busy > 40, "{report:#}");
            assert!(
                warning.contains("the load generator's connections were the limit"),
                "{report:#}"
            );
            assert!(warning.contains("about 4 connections busy"), "{report:#}");
            assert!(!warning.contains("target fell behind"), "{report:#}");
            assert!(stderr.contains("run with --connections"), "{stderr}");
        } else {
            assert!(busy == 0 && warning.is_empty(), "{report:#}");
            assert_eq!(report["unsent"], 0, "{report:#}");
        }
    }
}

#[test]
fn a_target_that_cannot_keep_up_is_blamed_not_the_connections() {
    // One request at a time, 10 ms each, in the order they came: 100 a second at most,
    // whatever the connections, and each waits for those ahead of it. (A mutex, which lets a
    // late request barge past waiting ones, made those sent at a light load wait as long as
    // the others on a busy machine, and the run could not tell the target was the limit.)
    let (queue, served) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<()>>();
    std::thread::spawn(move || {
        for done in served {
            std::thread::sleep(Duration::from_millis(10));
            let _ = done.send(());
        }
    });
    let addr = common::keep_alive_server(move |_| {
        let (done, answered) = std::sync::mpsc::channel();
        queue.send(done).unwrap();
        answered.recv().unwrap();
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()
    });
    let target = format!("http://{addr}");
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--rate",
        "200",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--connections",
        "8",
        "--json",
    ];
    let out = run_within(Duration::from_secs(30), &args);
    let report = report_of(&out);
    // Before, "the load generator's connections were the limit ... run with --connections
    // 16 or more": with 16, each request waits for 15 at the target instead of 7.
    assert_eq!(report["connection_limited"], true, "{report:#}");
    assert_eq!(report["limited_by"], "target", "{report:#}");
    let warning = report["warning"].as_str().unwrap();
    assert!(
        warning.contains("the target could not keep up"),
        "{warning}"
    );
    assert!(
        warning.contains("More connections would wait at the target"),
        "{warning}"
    );
    assert!(!warning.contains("run with --connections"), "{warning}");
    // Each request waited for the others at the target: slower with every connection busy.
    let load = &report["service_by_load"];
    let light = load["half_or_fewer_busy"]["mean_service_us"]
        .as_f64()
        .unwrap();
    let full = load["all_busy"]["mean_service_us"].as_f64().unwrap();
    assert!(full > 1.5 * light, "{report:#}");
}

#[test]
fn a_rate_far_beyond_the_connections_queues_a_bounded_backlog() {
    // 20,000 a second on one connection to a target taking 100 ms: 10 sent a second. The
    // queue holds the slots due in one --timeout (10,000); the others, refused by the full
    // queue, are unsent as the backlog's are: counted, each with its latency until the run
    // stopped, in the second it was due.
    let target = slow_server(Duration::from_millis(100));
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--rate",
        "20000",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--connections",
        "1",
        "--timeout",
        "0.5",
        "--json",
    ];
    let out = run_within(Duration::from_secs(30), &args);
    let report = report_of(&out);
    let count = |field: &str| report[field].as_u64().unwrap();
    assert_eq!(count("scheduled"), 20_000, "{report:#}");
    assert_eq!(count("sent") + count("unsent"), 20_000, "{report:#}");
    assert!(count("sent") <= 20, "{report:#}");
    assert_eq!(report["latency_includes"]["unsent"], count("unsent"));
    let max = report["latency_us"]["max"].as_u64().unwrap();
    assert!(max >= 1_000_000, "{report:#}");
    let timeline = report["timeline"].as_array().unwrap();
    let unsent: u64 = timeline.iter().map(|s| s["unsent"].as_u64().unwrap()).sum();
    assert_eq!(unsent, count("unsent"), "{report:#}");
    // Slots refused by the full queue came with every connection busy, but for those due
    // while the connection was still opening (not waits for a busy one: at 20,000 a second,
    // about 120 in the few milliseconds it takes here; up to 50 ms' worth allowed).
    assert!(
        count("all_connections_busy") + 20 + 1_000 >= count("unsent"),
        "{report:#}"
    );
    assert_eq!(report["latencies_are_lower_bounds"], true, "{report:#}");
}

#[test]
fn with_nothing_sent_in_the_window_no_advice_is_made_up() {
    // The warm-up's first request never answered: the one connection is busy with it past
    // the window, and nothing due in the window is sent. Before: "send delay p99 0.0 ms ...
    // keeps about 0 connections busy: run with --connections 2 or more".
    let target = silent_server();
    let args = [
        "--target",
        &target,
        "--path",
        "/Patient/1",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--connections",
        "1",
        "--timeout",
        "2.5",
        "--json",
    ];
    let out = run_within(Duration::from_secs(30), &args);
    let report = report_of(&out);
    assert_eq!(report["sent"], 0, "{report:#}");
    assert_eq!(report["limited_by"], "nothing_sent", "{report:#}");
    let warning = report["warning"].as_str().unwrap();
    assert!(
        warning.contains("none of the 100 requests due in the measured window was sent"),
        "{warning}"
    );
    for nonsense in ["0.0 ms", "about 0", "--connections"] {
        assert!(!warning.contains(nonsense), "{nonsense:?} in {warning}");
    }
}

/// Sends SIGINT (Ctrl-C) to the process `pid`.
fn interrupt(pid: u32) {
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn ctrl_c_counts_the_requests_it_cuts_off() {
    // A target that never answers: on Ctrl-C, each connection has a request in flight. Before,
    // they were dropped without a word.
    let (target, asked) = silent_server_counting();
    for rate in [None, Some("50")] {
        let mut args = vec![
            "--target",
            &target,
            "--path",
            "/Patient/1",
            "--duration",
            "30",
            "--warmup",
            "0",
            "--connections",
            "2",
            "--timeout",
            "30",
            "--json",
        ];
        if let Some(rate) = rate {
            args.extend(["--rate", rate]);
        }
        let child = Command::new(LOADGEN)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both connections' requests in flight (the target has them: a busy machine may take
        // a while to start the run), then held 1.5 s.
        let before = asked.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while asked.load(Ordering::SeqCst) < before + 2 {
            assert!(
                Instant::now() < deadline,
                "the run's two requests never reached the target"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(1500));
        interrupt(child.id());
        let started = Instant::now();
        let out = child.wait_with_output().unwrap();
        // It stops at once, not when the requests time out.
        assert!(started.elapsed() < Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
        assert_eq!(report["interrupted"], true, "{report:#}");
        assert_eq!(report["in_flight_at_stop"], 2, "{report:#}");
        assert_eq!(report["latency_includes"]["in_flight_at_stop"], 2);
        // Not the target's errors: cut off by the load generator.
        assert_eq!(report["error_count"], 0, "{report:#}");
        assert_eq!(report["latencies_are_lower_bounds"], true, "{report:#}");
        let note = report["lower_bounds_note"].as_str().unwrap();
        assert!(
            note.contains("2 were in flight when Ctrl-C stopped the run"),
            "{report:#}"
        );
        // Each counted with its time in flight until then (about 1.5 s), a lower bound.
        let max = report["latency_us"]["max"].as_u64().unwrap();
        assert!(max >= 1_000_000, "{report:#}");
        if rate.is_some() {
            // The slots queued behind them were never sent.
            assert!(report["unsent"].as_u64().unwrap() > 40, "{report:#}");
        }
    }
}
