//! `leuknet-train run` end to end on real images at tiny size: LODOCV with an int8 weight-storage
//! check, the feature-space protocol (penultimate-feature SVM, Vogado-style ImageNet-feature
//! baseline, t-SNE plots) and an int8 export whose card carries reference predictions.
//!
//! Needs `./scripts/setup --train` and `./scripts/setup`; skips with a message where
//! `../shared/data` (or `LEUKNET_DATA`) is absent.
#![cfg(feature = "train")]

mod common;

use common::data_dir;
use std::path::Path;
use std::process::Command;

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} not written: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn run_lodo_features_and_int8_export_on_tiny_model() {
    let Some(data) = data_dir() else {
        eprintln!("skipping: ../shared/data not found (set LEUKNET_DATA)");
        return;
    };
    let out = tempfile::tempdir().expect("tempdir");
    let export = out.path().join("export");
    let status = Command::new(env!("CARGO_BIN_EXE_leuknet-train"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "run",
            "--init",
            "scratch",
            "--width-div",
            "16",
            "--frozen-blocks",
            "4",
        ])
        .args([
            "--limit-per-class",
            "3",
            "--epochs",
            "1",
            "--views",
            "1",
            "--batch",
            "8",
        ])
        .args(["--folds", "2", "--protocols", "lodo,features,final"])
        .args([
            "--weight-storage",
            "int8",
            "--device",
            "cpu",
            "--domain-adversarial",
            "0.3",
        ])
        .arg("--manifest")
        .arg(data.join("MANIFEST.csv"))
        .arg("--out")
        .arg(out.path())
        .arg("--export-dir")
        .arg(&export)
        .status()
        .expect("leuknet-train runs");
    assert!(status.success(), "leuknet-train run failed: {status}");

    // Every run's checkpoint keeps the domain adversary beside the model, so a resumed run
    // goes on against the same source classifier (it once restarted from random weights).
    let ckpts: Vec<_> = std::fs::read_dir(out.path().join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(ckpts.len() >= 4, "final + 3 LODOCV checkpoints: {ckpts:?}");
    for dir in &ckpts {
        for file in ["latest.safetensors", "domain.safetensors"] {
            let len = std::fs::metadata(dir.join(file))
                .map(|m| m.len())
                .unwrap_or(0);
            assert!(len > 0, "{} has no {file}", dir.display());
        }
    }

    // LODOCV with the int8 check on every held-out set.
    let report = json(&out.path().join("report.json"));
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(
        runs.len(),
        3,
        "ALL-IDB2, ALL-Aria2021 and DeepAPL held out once each"
    );
    // The default threshold rule, inner-sources: each record carries the decision and the
    // out-of-source predictions it was chosen on, one per training source (five: the manifest's
    // six sets less the held-out one), each model checkpointed so that a resumed run skips it.
    for r in runs {
        let threshold = r["decision"]["threshold"].as_f64().expect("threshold");
        assert!((0.0..=1.0).contains(&threshold), "{r}");
        let inner = r["inner_sources"].as_array().expect("inner_sources");
        assert_eq!(inner.len(), 5, "{r}");
        assert!(inner.iter().all(|i| i["dataset"] != r["split"]), "{r}");
        let fitted: u64 = inner
            .iter()
            .map(|i| i["metrics"]["n"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(r["decision"]["fitted_on"].as_u64(), Some(fitted), "{r}");
        // Named after the two sources the inner model lacks (the held-out set and the inner
        // one), so that outer A's model without B is outer B's model without A.
        for i in inner {
            let mut lacks = [
                r["split"].as_str().expect("split"),
                i["dataset"].as_str().expect("dataset"),
            ];
            lacks.sort_unstable();
            let prefix = format!("inner-s1-without-{}-", lacks.join("+"));
            let found: Vec<_> = ckpts
                .iter()
                .filter(|d| {
                    let name = d.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.starts_with(&prefix) && d.join("latest.safetensors").exists()
                })
                .collect();
            assert_eq!(found.len(), 1, "{prefix}*: {ckpts:?}");
        }
    }
    // 3 held-out sets x 5 inner models, of which the 3 pairs among the held-out sets coincide.
    let pairs = ckpts
        .iter()
        .filter_map(|d| d.file_name().and_then(|n| n.to_str()))
        .filter(|n| n.starts_with("inner-s1-without-") && n.contains('+'))
        .count();
    assert_eq!(pairs, 12, "{ckpts:?}");
    for r in runs {
        let check = &r["storage_check"];
        assert_eq!(check["storage"], "int8", "{r}");
        assert_eq!(check["fp32"]["n"], check["stored"]["n"]);
        assert!(check["max_abs_diff_probability"].as_f64().expect("diff") < 0.5);
    }
    let table = std::fs::read_to_string(out.path().join("table.md")).expect("table");
    assert!(table.contains("### Weight storage"), "{table}");
    assert!(table.contains("### LODOCV, every metric"), "{table}");

    // `leuknet-train report` writes the same table and the plots again from report.json alone.
    let again = out.path().join("again");
    let status = Command::new(env!("CARGO_BIN_EXE_leuknet-train"))
        .args(["report", "--report"])
        .arg(out.path().join("report.json"))
        .arg("--out-dir")
        .arg(&again)
        .status()
        .expect("leuknet-train report runs");
    assert!(status.success(), "leuknet-train report failed: {status}");
    assert_eq!(
        std::fs::read_to_string(again.join("table.md")).expect("table again"),
        table
    );
    for png in ["curves.png", "roc.png", "confusion.png"] {
        assert!(std::fs::read(again.join(png))
            .unwrap_or_default()
            .starts_with(b"\x89PNG"));
    }

    // Feature protocol: the frozen-feature baseline (random conv weights here: scratch init at
    // width/16, so it is named untrained-gap, not imagenet-gap) under LODOCV and 2-fold, and
    // the penultimate-feature SVM of each LODOCV model.
    let features = json(&out.path().join("features.json"));
    let features = features.as_array().expect("list");
    let count = |f: &str, p: &str| {
        features
            .iter()
            .filter(|r| r["features"] == f && r["protocol"] == p)
            .count()
    };
    assert_eq!(count("untrained-gap", "lodo"), 3);
    assert_eq!(count("untrained-gap", "kfold"), 2);
    assert_eq!(count("leuknet-penultimate", "lodo"), 3);
    for r in features {
        let acc = r["accuracy"].as_f64().expect("accuracy");
        assert!((0.0..=1.0).contains(&acc), "{r}");
        let source = r["source_accuracy"]
            .as_f64()
            .expect("source predictability");
        assert!((0.0..=1.0).contains(&source), "{r}");
    }
    for png in ["tsne-untrained-gap.png", "tsne-lodo-ALL-IDB2.png"] {
        let bytes = std::fs::read(out.path().join(png)).expect(png);
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }

    // int8 export with reference predictions for 3 images per dataset and class at most.
    let card = json(&export.join("leuknet.json"));
    assert_eq!(card["architecture"]["weight_storage"], "int8");
    let refs = card["metrics"]["reference_predictions"]
        .as_array()
        .expect("reference predictions");
    assert!(refs.len() >= 12, "{} reference images", refs.len());
    let basis = card["training"]["threshold_basis"]
        .as_array()
        .expect("threshold basis");
    assert_eq!(
        basis.len(),
        6,
        "the final threshold rests on all six sources"
    );
    assert!(card["decision"]["chosen_by"]
        .as_str()
        .is_some_and(|s| s.contains("out-of-source")));
    // The rule asked for, and the one that gave the threshold (the same, or the fall-back).
    assert_eq!(card["training"]["threshold_rule_asked"], "inner-sources");
    let used = &card["training"]["threshold_rule"];
    assert!(used == "inner-sources" || used == "train-set", "{used}");
    assert_eq!(
        card["metrics"]["weight_storage"]["checks"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // More seeds of the recipe later, in a report of their own: `card-metrics` merges it with
    // the export's and puts the mean ± std into the card, leaving the model (and the card's
    // sha256 of it) alone. A "seed" with balanced accuracy 0.5 on every set stands in for one.
    let report_path = out.path().join("report.json");
    let mut report = json(&report_path);
    let extra: Vec<serde_json::Value> = report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| r["protocol"] == "lodo")
        .map(|r| {
            let mut r = r.clone();
            r["seed"] = serde_json::json!(r["seed"].as_u64().unwrap_or(0) + 100);
            r["metrics"]["balanced_accuracy"] = serde_json::json!(0.5);
            r
        })
        .collect();
    // Two k-fold "folds" of the same seed (balanced accuracy 0.6 and 0.8) go into metrics.kfold.
    let kfold: Vec<serde_json::Value> = [0.6, 0.8]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut r = extra[0].clone();
            r["protocol"] = serde_json::json!("kfold");
            r["split"] = serde_json::json!(format!("fold-{}of2", i + 1));
            r["metrics"]["balanced_accuracy"] = serde_json::json!(b);
            r
        })
        .collect();
    report["runs"] = serde_json::Value::Array(extra.into_iter().chain(kfold).collect());
    report["config"]["options"]["seed"] = serde_json::json!(101);
    report["config"]["runs"] = serde_json::json!(2);
    let report2 = out.path().join("report-seed-101.json");
    std::fs::write(&report2, report.to_string()).expect("write report");
    let card_metrics_with = |reports: &[&Path], more: &[String]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leuknet-train"));
        cmd.args(["card-metrics", "--card"])
            .arg(export.join("leuknet.json"));
        for r in reports {
            cmd.arg("--report").arg(r);
        }
        cmd.args(more);
        cmd.output().expect("leuknet-train card-metrics runs")
    };
    let card_metrics = |reports: &[&Path]| card_metrics_with(reports, &[]);
    // Another recipe (here: more epochs) is refused and the card stays as it was.
    report["config"]["options"]["epochs"] = serde_json::json!(99);
    let other = out.path().join("report-other-recipe.json");
    std::fs::write(&other, report.to_string()).expect("write report");
    let refused = card_metrics(&[&report_path, &other]);
    assert!(!refused.status.success(), "another recipe was merged");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("differ beyond the seed"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(json(&export.join("leuknet.json")), card);
    // Baselines and variants come from their own result files; bad ones are refused, card as it was.
    let features_json = out.path().join("features.json");
    let svm = format!("--baseline=svm={}#untrained-gap", features_json.display());
    for (bad, says) in [
        (
            format!("--baseline=svm={}", features_json.display()),
            "name the feature set",
        ),
        (
            format!("--baseline=svm={}#nope", features_json.display()),
            "no runs of features",
        ),
        (
            format!("--baseline=svm={}", report_path.display()),
            "already gives",
        ),
        ("--variant=no-equals-sign".to_string(), "bad comparison"),
    ] {
        let refused = card_metrics_with(&[&report_path, &report2], &[svm.clone(), bad.clone()]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{bad} was accepted");
        assert!(stderr.contains(says), "{bad}: {stderr}");
        assert_eq!(
            json(&export.join("leuknet.json")),
            card,
            "{bad} changed the card"
        );
    }
    // A limitation is written with the recipe's LODOCV figures; without them it is refused.
    let alone = card_metrics_with(&[], &[svm.clone(), "--limitation=chosen by hand".into()]);
    assert!(
        !alone.status.success(),
        "a limitation without LODOCV runs was accepted"
    );
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("LODOCV report"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    assert_eq!(json(&export.join("leuknet.json")), card);
    let merged = card_metrics_with(
        &[&report_path, &report2],
        &[
            "--limitation=The recipe was chosen by hand.".into(),
            svm,
            format!(
                "--variant=penultimate SVM={}#leuknet-penultimate",
                features_json.display()
            ),
        ],
    );
    assert!(
        merged.status.success(),
        "card-metrics failed: {}",
        String::from_utf8_lossy(&merged.stderr)
    );
    let updated = json(&export.join("leuknet.json"));
    let first = card["metrics"]["lodo"]["ALL-IDB2"]["balanced_accuracy"]["mean"]
        .as_f64()
        .expect("first seed");
    let both = &updated["metrics"]["lodo"]["ALL-IDB2"]["balanced_accuracy"];
    assert_eq!(both["n"], 2, "{both}");
    assert!((both["mean"].as_f64().expect("mean") - (first + 0.5) / 2.0).abs() < 1e-12);
    assert_eq!(
        updated["metrics"]["lodo_report"]["seeds"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(updated["sha256"], card["sha256"]);
    assert_eq!(
        updated["metrics"]["reference_predictions"],
        card["metrics"]["reference_predictions"]
    );
    let kfold = &updated["metrics"]["kfold"]["balanced_accuracy"];
    assert_eq!(kfold["n"], 2, "{kfold}");
    assert!((kfold["mean"].as_f64().expect("mean") - 0.7).abs() < 1e-12);
    assert_eq!(
        updated["metrics"]["kfold_report"]["seeds"],
        serde_json::json!([101])
    );
    let baseline = &updated["metrics"]["baselines"][0];
    assert_eq!(baseline["name"], "svm");
    let idb2: Vec<f64> = features
        .iter()
        .filter(|r| r["features"] == "untrained-gap" && r["split"] == "ALL-IDB2")
        .filter_map(|r| r["balanced_accuracy"].as_f64())
        .collect();
    let got = baseline["lodo"]["ALL-IDB2"]["balanced_accuracy"]["mean"]
        .as_f64()
        .expect("baseline figure");
    assert!((got - idb2[0]).abs() < 1e-12, "{got} vs {idb2:?}");
    assert_eq!(baseline["kfold"]["runs"], 2);
    assert_eq!(
        updated["metrics"]["variants"][0]["lodo"]
            .as_object()
            .map(|o| o.len()),
        Some(3)
    );
    let table = String::from_utf8_lossy(&merged.stdout);
    assert!(
        table.contains("| baseline: svm |") && table.contains("| variant: penultimate SVM |"),
        "{table}"
    );
    // The last column: how readable the source is from the features, where a features.json
    // measured it (the frozen-feature baseline), and "—" for a trained model's own report.
    let source = baseline["lodo"]["ALL-IDB2"]["source_accuracy"]["mean"]
        .as_f64()
        .expect("source readability");
    let svm_row = table
        .lines()
        .find(|l| l.starts_with("| baseline: svm |"))
        .expect("svm row");
    assert!(
        svm_row.contains(&format!("{:.1}", source * 100.0)),
        "{svm_row}"
    );
    let shipped_row = table.lines().nth(2).expect("shipped row");
    assert!(shipped_row.ends_with("| — |"), "{shipped_row}");
    let limits = updated["limitations"].to_string();
    assert!(limits.contains("over 2 seeds"), "{limits}");
    assert_eq!(
        updated["limitations"].as_array().and_then(|l| l.last()),
        Some(&serde_json::json!("The recipe was chosen by hand.")),
        "{limits}"
    );
    leuknet::model_card::ModelCard::load(&export.join("leuknet.json"))
        .expect("the server still loads it");
}
