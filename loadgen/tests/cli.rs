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
