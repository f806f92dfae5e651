//! A real run against a small HTTP/1.1 server on loopback: the JSON report with its per-second
//! timeline, and the SVG chart, in a closed loop and at a fixed rate.

use std::process::Command;

const LOADGEN: &str = env!("CARGO_BIN_EXE_fhir-loadgen");

mod common;

/// A keep-alive server answering every request with `200 {}` (`401` for a bearer token other
/// than `t0ken`); its FHIR base.
fn server() -> String {
    let addr = common::keep_alive_server(|head| {
        // A bearer token, when sent, must be the right one.
        let refused =
            head.contains("authorization:") && !head.contains("authorization: bearer t0ken");
        if refused {
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec()
        }
    });
    format!("http://{addr}/fhir")
}

fn run(extra: &[&str]) -> (serde_json::Value, String) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let plot = std::env::temp_dir().join(format!(
        "fhir-loadgen-run-{}-{}.svg",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let out = Command::new(LOADGEN)
        .args([
            "--target",
            &server(),
            "--path",
            "/Patient/1",
            "--duration",
            "2",
        ])
        .args(["--warmup", "0.5", "--connections", "2", "--json", "--plot"])
        .arg(&plot)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("plot written to"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let svg = std::fs::read_to_string(&plot).unwrap();
    std::fs::remove_file(&plot).unwrap();
    (report, svg)
}

fn check(report: &serde_json::Value, svg: &str) {
    assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["error_count"], 0, "{report:#}");
    assert_eq!(report["answered"], report["requests"], "{report:#}");
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests > 20, "{report:#}");
    assert_eq!(report["statuses"]["200"].as_u64(), Some(requests));
    let timeline = report["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 2, "two measured seconds: {report:#}");
    let counted: u64 = timeline
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(
        counted, requests,
        "every measured request is in the timeline"
    );
    for second in timeline {
        assert!(second["p50_us"].as_u64() <= second["p99_us"].as_u64());
        assert!(second["p99_us"].as_u64() <= second["max_us"].as_u64());
    }
    assert!(svg.starts_with("<svg"));
    for text in [
        "requests per second",
        "latency over time",
        "latency by percentile",
        "p99",
    ] {
        assert!(svg.contains(text), "the chart lacks {text:?}");
    }
}

#[test]
fn a_closed_loop_run_reports_its_timeline_and_draws_it() {
    let (report, svg) = run(&[]);
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["rate"], serde_json::Value::Null);
    // A closed loop's latencies are not corrected for coordinated omission: said so.
    assert_eq!(
        report["coordinated_omission_corrected"], false,
        "{report:#}"
    );
    assert_eq!(report["latencies_are_lower_bounds"], false, "{report:#}");
    assert_eq!(
        (&report["warmup_seconds"], &report["duration_seconds"]),
        (&serde_json::json!(0.5), &serde_json::json!(2.0))
    );
    check(&report, &svg);
}

#[test]
fn a_fixed_rate_run_keeps_its_rate_second_by_second() {
    let (report, svg) = run(&["--rate", "200"]);
    assert_eq!(report["mode"], "rate 200/s");
    assert_eq!(report["rate"], 200.0);
    assert_eq!(report["coordinated_omission_corrected"], true, "{report:#}");
    assert_eq!(report["latencies_are_lower_bounds"], false, "{report:#}");
    assert_eq!(report["unsent"], 0, "{report:#}");
    check(&report, &svg);
    // The load generator's own lateness is reported apart (no bound asserted: the machine
    // may be busy).
    let delay = &report["send_delay_us"];
    assert!(delay["p50"].as_u64() <= delay["p99"].as_u64(), "{report:#}");
    assert!(delay["p99"].as_u64().is_some(), "{report:#}");
    for second in report["timeline"].as_array().unwrap() {
        let n = second["requests"].as_u64().unwrap();
        assert!((190..=210).contains(&n), "{second}");
    }
}

#[test]
fn a_plot_that_is_not_svg_is_refused() {
    let out = Command::new(LOADGEN)
        .args(["--target", "http://127.0.0.1:9/fhir", "--plot", "run.png"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(".svg"));
}

#[test]
fn one_bearer_token_goes_with_every_request() {
    let (report, svg) = run(&["--bearer", "t0ken"]);
    check(&report, &svg);
    let (report, _) = run(&["--bearer", "wrong"]);
    let requests = report["requests"].as_u64().unwrap();
    assert_eq!(
        report["statuses"]["401"].as_u64(),
        Some(requests),
        "{report:#}"
    );
}

#[test]
fn answers_not_2xx_fail_the_run_when_asked() {
    // Every answer a 401, and no more than 10% allowed: exit 1, said why.
    for json in [true, false] {
        let out = Command::new(LOADGEN)
            .args(["--target", &server(), "--path", "/Patient/1"])
            .args(["--bearer", "wrong", "--max-non-2xx-rate", "0.1"])
            .args(["--duration", "1", "--warmup", "0", "--connections", "2"])
            .args(if json { &["--json"][..] } else { &[] })
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        if json {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["failed"], true, "{report:#}");
            assert_eq!(report["non_2xx_rate"], 1.0, "{report:#}");
            assert_eq!(report["max_non_2xx_rate"], 0.1, "{report:#}");
            let failures = report["failures"][0].as_str().unwrap();
            assert!(failures.contains("answers were not 2xx"), "{report:#}");
        } else {
            assert!(stdout.contains("FAILED"), "{stdout}");
            assert!(
                stdout.contains("more than --max-non-2xx-rate 10%"),
                "{stdout}"
            );
        }
    }
}

#[test]
fn a_duration_of_10_s_holds_with_a_number_of_requests() {
    // Before, `--duration 10` was taken for "no duration given" beside `--requests`: the
    // run went on for an hour. Killed (and failed) past 30 s.
    let mut child = Command::new(LOADGEN)
        .args(["--target", &server(), "--path", "/Patient/1"])
        .args(["--duration", "10", "--requests", "1000000", "--rate", "20"])
        .args(["--warmup", "0", "--connections", "2", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed().as_secs() > 30 {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("--duration 10 with --requests: still running after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // stderr is no terminal here: a plain progress line every 5 s, no escape codes.
    assert!(
        !stderr.contains('\r') && !stderr.contains('\u{1b}'),
        "{stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(" req/s")).collect();
    assert!((1..=2).contains(&lines.len()), "{stderr}");
    assert!(lines[0].starts_with("   5.0 s "), "{stderr}");
    assert!(lines[0].contains(" requests  "), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["duration_seconds"], 10.0, "{report:#}");
    let seconds = report["seconds"].as_f64().unwrap();
    assert!((9.5..=10.5).contains(&seconds), "{report:#}");
    let answered = report["answered"].as_u64().unwrap();
    assert!((190..=210).contains(&answered), "{report:#}");
}

#[test]
fn a_number_of_requests_is_met_exactly() {
    for extra in [&[][..], &["--rate", "500"][..]] {
        let out = Command::new(LOADGEN)
            .args([
                "--target",
                &server(),
                "--path",
                "/Patient/1",
                "--requests",
                "300",
            ])
            .args(["--warmup", "0.2", "--connections", "16", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["answered"], 300, "{report:#}");
        assert_eq!(report["requests"], 300, "{report:#}");
        // No duration asked: none reported (the run ends when the 300 are measured).
        assert_eq!(report["duration_seconds"], serde_json::Value::Null);
    }
}

#[test]
fn a_closed_loop_report_says_its_latencies_are_not_corrected() {
    let out = Command::new(LOADGEN)
        .args(["--target", &server(), "--path", "/Patient/1"])
        .args(["--duration", "0.5", "--warmup", "0", "--connections", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "note         closed loop: latencies are not corrected for coordinated omission"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("use --rate for an open loop"), "{stdout}");
    assert!(!stdout.contains("LOWER BOUNDS"), "{stdout}");
}

#[test]
fn slots_due_while_the_connections_open_are_not_waits_for_a_busy_one() {
    // With no warm-up, the first slot is due as the connections open. Before, it counted as
    // having come "with all 2 connections busy" (1 of 20, in most runs), though none was busy.
    for _ in 0..3 {
        let out = Command::new(LOADGEN)
            .args(["--target", &server(), "--path", "/Patient/1", "--json"])
            .args(["--rate", "20", "--duration", "1", "--warmup", "0"])
            .args(["--connections", "2"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["scheduled"], 20, "{report:#}");
        assert_eq!(report["all_connections_busy"], 0, "{report:#}");
        assert_eq!(report["connection_limited"], false, "{report:#}");
        assert_eq!(report["warning"], serde_json::Value::Null, "{report:#}");
    }
}
