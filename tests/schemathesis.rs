//! Schemathesis (property-based API testing) against a real server, driven by `openapi.yaml`,
//! with every check on: status codes, content types, headers and bodies must match the
//! document; schema-valid requests must be accepted and invalid ones refused; no 5xx.
//!
//! Image bytes cannot be described by JSON Schema, so `tests/schemathesis/hooks.py` swaps about
//! half of the generated image bodies for real PNGs (their 200 answers are then checked against
//! the response schemas) and drops only the refusals that are not the server's fault (random
//! bytes answered 422, and the two others it lists). Bounded: `--max-examples` per operation and
//! a time budget (`LEUKNET_SCHEMATHESIS_SECONDS`, default 60) with a fixed seed
//! (`LEUKNET_SCHEMATHESIS_SEED`, default 1). The JUnit report goes to
//! `target/test-artifacts/schemathesis/`.
//!
//! Needs `schemathesis` in `.native/venv-test` (`./scripts/setup --test`): without it the test
//! prints `skipping: ...`, unless `.native/test-tools.ready` exists, then it fails.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The venv's `st`, or None (skip) when the test tools were never installed; a panic when
/// `.native/test-tools.ready` says they were.
fn schemathesis() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let st = root.join(".native/venv-test/bin/st");
    let usable = st.is_file()
        && Command::new(&st)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if usable {
        return Some(st);
    }
    assert!(
        !root.join(".native/test-tools.ready").exists(),
        ".native/test-tools.ready exists but .native/venv-test has no schemathesis: \
         rerun ./scripts/setup-test"
    );
    eprintln!(
        "skipping: schemathesis is not installed in .native/venv-test; this test needs \
         ./scripts/setup --test"
    );
    None
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_server_conforms_to_openapi_yaml() {
    let Some(st) = schemathesis() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    let server = Server::start(&fixture_card(16), &[]).await;
    let report_dir = root.join("target/test-artifacts/schemathesis");
    std::fs::create_dir_all(&report_dir).unwrap();
    let seconds = env_or("LEUKNET_SCHEMATHESIS_SECONDS", "60");
    let seed = env_or("LEUKNET_SCHEMATHESIS_SEED", "1");
    let mut cmd = Command::new(&st);
    // Run from the report folder: st keeps its cache (`.schemathesis/`) in the working directory.
    cmd.current_dir(&report_dir)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", root.join("tests/schemathesis"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_COLOR", "1")
        .arg("run")
        .arg(root.join("openapi.yaml"))
        .args(["--url", &server.base])
        .args(["--checks", "all"])
        .args([
            "--max-examples",
            "20",
            "--max-time",
            &seconds,
            "--seed",
            &seed,
        ])
        .args(["--generation-database", "none", "--no-color"])
        .args(["--request-timeout", "30"])
        .args(["--report", "junit", "--report-dir"])
        .arg(&report_dir);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run st"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The summary, for the test log.
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            ["generated", "Filtered", "passed", "failed", "Seed"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    eprintln!("schemathesis: {}", summary.join(" | "));
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}\nserver log:\n{}",
        out.status.code(),
        server.log_text()
    );
    assert!(
        stdout.contains("passed"),
        "no test case ran:\n{stdout}\n{stderr}"
    );
    // The server answered every request: no 5xx (checked by st) and it is still ready.
    let ready = server
        .client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}
