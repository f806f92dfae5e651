//! The command line: `--help` on stdout with exit 0, mistakes on stderr with exit 2.

use std::process::Command;

const LOADGEN: &str = env!("CARGO_BIN_EXE_fhir-loadgen");

#[test]
fn help_goes_to_stdout_and_exits_0() {
    let out = Command::new(LOADGEN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--target",
        "--connections",
        "--mix",
        "--cpu-of",
        "--mint-key",
        "--max-non-2xx-rate",
        "lower bounds",
        "not corrected for coordinated omission",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    assert!(out.stderr.is_empty());
}

#[test]
fn a_mistake_is_named_on_stderr_with_exit_2() {
    let out = Command::new(LOADGEN).arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown option --frobnicate"), "{stderr}");
    let out = Command::new(LOADGEN).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--target is required"));
}

#[test]
fn numbers_out_of_range_exit_2_without_a_panic() {
    for (flag, value) in [
        ("--duration", "-1"),
        ("--duration", "1e30"),
        ("--warmup", "nan"),
        ("--timeout", "1e30"),
        ("--rate", "0"),
        ("--rate", "nan"),
        ("--rate", "inf"),
        ("--max-non-2xx-rate", "2"),
    ] {
        let out = Command::new(LOADGEN)
            .args(["--target", "http://127.0.0.1:9", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.starts_with(&format!("{flag} {value}: ")), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_rate_too_low_for_a_second_slot_runs_without_a_panic() {
    // Nobody listens on port 9: the one slot fails, and the run ends with exit 1.
    let out = Command::new(LOADGEN)
        .args(["--target", "http://127.0.0.1:9", "--rate", "1e-300"])
        .args(["--duration", "0.3", "--warmup", "0", "--timeout", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

#[test]
fn a_port_out_of_range_exits_2_instead_of_loading_port_80() {
    for (target, port) in [
        ("http://127.0.0.1:99999", "99999"),
        ("http://127.0.0.1:8080x/fhir", "8080x"),
    ] {
        let out = Command::new(LOADGEN)
            .args(["--target", target, "--duration", "0.2", "--warmup", "0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{target}: {stderr}");
        assert!(
            stderr.starts_with(&format!("--target {target}: port {port} is not a port")),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_path_a_uri_cannot_carry_exits_2_before_the_run() {
    // Before, it ran, and each request failed: "invalid uri character".
    let out = Command::new(LOADGEN)
        .args(["--target", "http://127.0.0.1:9", "--path", "/a b"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("--path \"/a b\": not a request path"),
        "{stderr}"
    );
    assert!(stderr.contains("%20"), "{stderr}");
    assert!(out.stdout.is_empty());
}
