//! `scripts/nested-select`: the nested choice between training recipes reads only the inner
//! models' scores, never the held-out set's, and merges one report per seed under one name.

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

/// One LODOCV run record as `leuknet-train run --threshold inner-both-class-sources` writes it
/// (only the fields the script reads).
fn record(split: &str, seed: u64, inner_aucs: &[f64], test_bal_acc: f64) -> Value {
    let inner: Vec<Value> = inner_aucs
        .iter()
        .enumerate()
        .map(|(i, auc)| json!({"dataset": format!("inner-{i}"), "metrics": {"auc": auc}}))
        .collect();
    json!({
        "protocol": "lodo",
        "split": split,
        "seed": seed,
        "threshold_rule": "inner-both-class-sources",
        "metrics": {"balanced_accuracy": test_bal_acc, "auc": 0.9},
        "inner_sources": inner,
    })
}

fn write_report(dir: &Path, name: &str, runs: Vec<Value>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, json!({ "runs": runs }).to_string()).expect("report written");
    path.display().to_string()
}

fn nested_select(args: &[String]) -> Output {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nested-select"))
        .args(args)
        .output()
        .expect("python3 runs scripts/nested-select")
}

/// The last stdout line is the JSON summary.
fn summary(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line not JSON ({e}): {stdout}"))
}

#[test]
fn picks_by_inner_auc_not_by_the_held_out_score_and_merges_seeds() {
    let dir = tempfile::tempdir().unwrap();
    // Recipe A ranks the inner sources better on ALL-IDB2 (both seeds) but scores worse on the
    // held-out set; B is the other way round on DeepAPL. The pick must follow the inner AUC.
    let a2 = write_report(
        dir.path(),
        "a2.json",
        vec![
            record("ALL-IDB2", 2, &[0.9, 0.8], 0.60),
            record("DeepAPL", 2, &[0.5, 0.5], 0.90),
        ],
    );
    let a3 = write_report(
        dir.path(),
        "a3.json",
        vec![
            record("ALL-IDB2", 3, &[0.7, 0.9], 0.70),
            record("DeepAPL", 3, &[0.4, 0.6], 0.80),
        ],
    );
    let b = write_report(
        dir.path(),
        "b.json",
        vec![
            record("ALL-IDB2", 2, &[0.6, 0.6], 0.95),
            record("DeepAPL", 2, &[0.7, 0.7], 0.55),
            record("ALL-IDB2", 3, &[0.6, 0.6], 0.85),
            record("DeepAPL", 3, &[0.6, 0.8], 0.65),
        ],
    );
    let out = nested_select(&[format!("A={a2}"), format!("A={a3}"), format!("B={b}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    let rows = s["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "two held-out sets x two seeds: {s}");
    let picked = |split: &str, seed: u64| {
        rows.iter()
            .find(|r| r["split"] == split && r["seed"] == seed)
            .unwrap_or_else(|| panic!("no row {split} {seed}: {s}"))["picked"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(picked("ALL-IDB2", 2), "A");
    assert_eq!(picked("ALL-IDB2", 3), "A");
    assert_eq!(picked("DeepAPL", 2), "B");
    assert_eq!(picked("DeepAPL", 3), "B");
    // Nested mean: the picked recipes' held-out scores, 0.60, 0.70, 0.55, 0.65.
    let nested = s["nested_mean_balanced_accuracy"].as_f64().unwrap();
    assert!((nested - 0.625).abs() < 1e-9, "{nested}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "| ALL-IDB2 | 2 | 65.00 ± 7.07 % | 90.00 ± 7.07 % | 65.00 ± 7.07 % | 2: A, 3: A |"
        ),
        "per-held-out-set table over seeds missing: {stdout}"
    );
}

#[test]
fn refuses_a_seed_twice_and_a_record_without_inner_sources() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_report(
        dir.path(),
        "a.json",
        vec![record("ALL-IDB2", 2, &[0.9], 0.6)],
    );
    let b = write_report(
        dir.path(),
        "b.json",
        vec![record("ALL-IDB2", 2, &[0.8], 0.7)],
    );
    let out = nested_select(&[format!("A={a}"), format!("A={a}"), format!("B={b}")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ALL-IDB2 seed 2 is in two of its reports"),
        "{err}"
    );

    let bare = write_report(
        dir.path(),
        "bare.json",
        vec![record("ALL-IDB2", 2, &[], 0.6)],
    );
    let out = nested_select(&[format!("A={bare}"), format!("B={b}")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no inner source with both classes"),
        "{err}"
    );

    let out = nested_select(&[format!("A={a}")]);
    assert!(!out.status.success(), "one recipe is no choice");
}
