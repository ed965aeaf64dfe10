//! Evaluation metrics, reports, plots and feature analysis (`--features train`).
#![cfg(feature = "train")]

use std::path::Path;

use leuknet::train::eval_metrics::{
    apply_platt, apply_temperature, best_threshold_balanced_accuracy, binary_metrics,
    expected_calibration_error, fit_platt, fit_temperature, mean_std, roc_auc, roc_curve, sigmoid,
    summarize, BinaryMetrics, Confusion,
};
use leuknet::train::features::{pca_svm, tsne_plot};
use leuknet::train::protocol::out_of_source_decision;
use leuknet::train::report::{
    markdown_table_iv, markdown_table_iv_rows, plot_confusion_matrices, plot_roc,
    plot_training_curves, read_json, write_json, EpochRow, Report, RunRecord,
};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

macro_rules! assert_close {
    ($a:expr, $b:expr) => {
        assert_close!($a, $b, 1e-9)
    };
    ($a:expr, $b:expr, $tol:expr) => {{
        let (a, b) = ($a as f64, $b as f64);
        assert!(
            close(a, b, $tol),
            "{} = {a}, expected {b} (tol {})",
            stringify!($a),
            $tol
        );
    }};
}

// ----------------------------------------------------------------------------- metrics

#[test]
fn metrics_match_hand_computed_confusion() {
    // 4 positives, 6 negatives; at 0.5: tp 3, fn 1, fp 2, tn 4.
    let labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0];
    let probs = [0.9, 0.8, 0.6, 0.2, 0.7, 0.55, 0.4, 0.3, 0.1, 0.05];
    let m = binary_metrics(&labels, &probs, 0.5);
    assert_eq!(
        m.confusion,
        Confusion {
            tp: 3,
            fp: 2,
            tn: 4,
            fn_: 1
        }
    );
    assert_eq!(m.n, 10);
    assert_close!(m.accuracy, 0.7);
    assert_close!(m.precision, 0.6);
    assert_close!(m.recall, 0.75);
    assert_close!(m.specificity, 4.0 / 6.0);
    assert_close!(m.f1, 6.0 / 9.0);
    assert_close!(m.balanced_accuracy, (0.75 + 4.0 / 6.0) / 2.0);
    // po = 0.7; predicted positive 0.5, truly positive 0.4; pe = 0.5*0.4 + 0.5*0.6 = 0.5.
    assert_close!(m.kappa, (0.7 - 0.5) / (1.0 - 0.5));
    // AUC by pairs: positives {.9,.8,.6,.2} vs negatives {.7,.55,.4,.3,.1,.05}:
    // .9 -> 6, .8 -> 6, .6 -> 5, .2 -> 2  => 19 / 24.
    assert_close!(m.auc.unwrap(), 19.0 / 24.0);

    // Same labels at threshold 0.65: tp 2 (0.9, 0.8), fp 1 (0.7), fn 2, tn 5.
    let m = binary_metrics(&labels, &probs, 0.65);
    assert_eq!(
        m.confusion,
        Confusion {
            tp: 2,
            fp: 1,
            tn: 5,
            fn_: 2
        }
    );
    assert_close!(m.accuracy, 0.7);
    assert_close!(m.precision, 2.0 / 3.0);
    assert_close!(m.recall, 0.5);
    assert_close!(m.specificity, 5.0 / 6.0);
    assert_close!(m.f1, 4.0 / 7.0);
    // po = 0.7, pred pos 0.3, true pos 0.4 -> pe = 0.12 + 0.42 = 0.54.
    assert_close!(m.kappa, (0.7 - 0.54) / 0.46);
    // Threshold is inclusive: p == threshold counts as positive.
    let m = binary_metrics(&[1, 0], &[0.5, 0.49], 0.5);
    assert_eq!(m.confusion.tp, 1);
    assert_eq!(m.confusion.tn, 1);
}

#[test]
fn divide_by_zero_cases_are_zero_not_nan() {
    // Nothing predicted positive.
    let m = binary_metrics(&[1, 0, 0], &[0.1, 0.2, 0.3], 0.5);
    assert_eq!(m.precision, 0.0);
    assert_eq!(m.recall, 0.0);
    assert_eq!(m.f1, 0.0);
    assert_close!(m.specificity, 1.0);
    assert_close!(m.balanced_accuracy, 0.5);
    assert_eq!(m.kappa, 0.0);
    // One class only: AUC undefined; balanced accuracy = recall of the present class.
    let m = binary_metrics(&[1, 1, 1, 1], &[0.9, 0.8, 0.3, 0.7], 0.5);
    assert_eq!(m.auc, None);
    assert_eq!(m.specificity, 0.0);
    assert_close!(m.balanced_accuracy, 0.75);
    // Constant labels and predictions that agree: pe = 1, kappa defined as 0.
    let m = binary_metrics(&[0, 0], &[0.1, 0.2], 0.5);
    assert_eq!(m.kappa, 0.0);
    assert_close!(m.accuracy, 1.0);
    // Empty input.
    let m = binary_metrics(&[], &[], 0.5);
    assert_eq!(m.n, 0);
    assert_eq!(m.accuracy, 0.0);
    assert_eq!(m.balanced_accuracy, 0.0);
    for v in [m.accuracy, m.precision, m.recall, m.f1, m.kappa, m.ece] {
        assert!(v.is_finite());
    }
    // JSON round trip of a metrics value with auc = None.
    let json = serde_json::to_string(&m).unwrap();
    let back: BinaryMetrics = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

#[test]
fn auc_perfect_constant_reversed_and_ties() {
    let labels = [0, 0, 0, 1, 1, 1];
    assert_close!(
        roc_auc(&labels, &[0.1, 0.2, 0.3, 0.7, 0.8, 0.9]).unwrap(),
        1.0
    );
    assert_close!(
        roc_auc(&labels, &[0.9, 0.8, 0.7, 0.3, 0.2, 0.1]).unwrap(),
        0.0
    );
    assert_close!(roc_auc(&labels, &[0.5; 6]).unwrap(), 0.5);
    // Ties by hand: positives {0.9, 0.8, 0.4}, negatives {0.8, 0.3, 0.4}.
    // 0.9 beats all 3; 0.8 ties one (1/2) and beats 2; 0.4 beats 0.3, ties 0.4 (1/2), loses 0.8.
    // (3 + 2.5 + 1.5) / 9.
    let auc = roc_auc(&[1, 0, 1, 0, 1, 0], &[0.9, 0.8, 0.8, 0.3, 0.4, 0.4]).unwrap();
    assert_close!(auc, 7.0 / 9.0);
    assert_eq!(roc_auc(&[1, 1], &[0.2, 0.3]), None);

    // Against brute-force pair counting on quantised random scores (many ties).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let labels: Vec<u8> = (0..300).map(|_| rng.random_range(0..2)).collect();
    let probs: Vec<f32> = labels
        .iter()
        .map(|&y| ((rng.random::<f32>() + 0.3 * f32::from(y)) * 10.0).round() / 10.0)
        .collect();
    let (mut wins, mut pairs) = (0.0, 0.0);
    for i in 0..labels.len() {
        for j in 0..labels.len() {
            if labels[i] == 1 && labels[j] == 0 {
                pairs += 1.0;
                if probs[i] > probs[j] {
                    wins += 1.0;
                } else if probs[i] == probs[j] {
                    wins += 0.5;
                }
            }
        }
    }
    let auc = roc_auc(&labels, &probs).unwrap();
    assert_close!(auc, wins / pairs, 1e-12);

    // The trapezoidal area under roc_curve equals the Mann-Whitney AUC, ties included.
    let curve = roc_curve(&labels, &probs);
    assert_eq!((curve[0].0, curve[0].1), (0.0, 0.0));
    let last = curve.last().unwrap();
    assert_eq!((last.0, last.1), (1.0, 1.0));
    let mut area = 0.0;
    for w in curve.windows(2) {
        assert!(w[1].0 >= w[0].0 && w[1].1 >= w[0].1, "curve not monotone");
        assert!(w[1].2 < w[0].2, "thresholds not decreasing");
        area += (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0;
    }
    assert_close!(area, auc, 1e-12);
    assert!(roc_curve(&[0, 0], &[0.1, 0.2]).is_empty());
}

#[test]
fn ece_of_calibrated_bins_is_zero_and_miscalibration_is_measured() {
    // p = 0.25 with 1/4 positive, p = 0.75 with 3/4, p = 0.55 with 11/20.
    let mut labels = vec![1, 0, 0, 0, 1, 1, 1, 0];
    let mut probs = vec![0.25; 4];
    probs.extend([0.75; 4]);
    for i in 0..20 {
        labels.push(u8::from(i < 11));
        probs.push(0.55);
    }
    assert!(expected_calibration_error(&labels, &probs, 10) < 1e-6);
    // Overconfident: p = 0.9 for all, half positive: |0.5 - 0.9| = 0.4.
    let labels = [1, 0, 1, 0];
    assert_close!(
        expected_calibration_error(&labels, &[0.9; 4], 10),
        0.4,
        1e-6
    );
    // Bin weighting: bin 0 holds p = 0.0 (calibrated); p = 1.0 falls in the last bin with the
    // two 0.9s: 3/4 * |2/3 - 2.8/3| = 0.2.
    let ece = expected_calibration_error(&[0, 1, 1, 0], &[0.0, 1.0, 0.9, 0.9], 10);
    assert_close!(ece, 0.5 * 0.4, 1e-6);
    assert_eq!(expected_calibration_error(&[], &[], 10), 0.0);
}

#[test]
fn best_threshold_separates_a_separable_set() {
    let labels = [0, 0, 0, 1, 1, 1];
    let probs = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8];
    let t = best_threshold_balanced_accuracy(&labels, &probs);
    assert!(t > 0.3 && t <= 0.6, "threshold {t}");
    assert_close!(binary_metrics(&labels, &probs, t).balanced_accuracy, 1.0);
    // Separable only far from 0.5: the midpoint 0.775.
    let labels = [0, 0, 1, 1];
    let probs = [0.7, 0.75, 0.8, 0.9];
    let t = best_threshold_balanced_accuracy(&labels, &probs);
    assert_close!(t, 0.775, 1e-6);
    assert_close!(binary_metrics(&labels, &probs, t).balanced_accuracy, 1.0);
    // Unbalanced, not separable: still at least as good as 0.5.
    let labels = [0, 0, 0, 0, 0, 0, 1, 1, 0, 1];
    let probs = [0.1, 0.2, 0.2, 0.3, 0.35, 0.4, 0.42, 0.45, 0.5, 0.6];
    let t = best_threshold_balanced_accuracy(&labels, &probs);
    let ba_t = binary_metrics(&labels, &probs, t).balanced_accuracy;
    let ba_half = binary_metrics(&labels, &probs, 0.5).balanced_accuracy;
    assert!(
        ba_t >= ba_half && close(ba_t, 1.0 - 1.0 / 14.0, 1e-9),
        "{t} {ba_t}"
    );
    // Degenerate inputs fall back to 0.5.
    assert_eq!(best_threshold_balanced_accuracy(&[1, 1], &[0.2, 0.9]), 0.5);
    assert_eq!(best_threshold_balanced_accuracy(&[], &[]), 0.5);
}

#[test]
fn mean_std_and_summary_against_hand_values() {
    let m = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
    assert_close!(m.mean, 5.0);
    assert_close!(m.std, (32.0f64 / 7.0).sqrt());
    assert_eq!(m.n, 8);
    let one = mean_std(&[3.5]);
    assert_eq!((one.mean, one.std, one.n), (3.5, 0.0, 1));
    let none = mean_std(&[]);
    assert_eq!((none.mean, none.std, none.n), (0.0, 0.0, 0));

    let a = binary_metrics(&[1, 1, 0, 0], &[0.9, 0.2, 0.1, 0.3], 0.5); // acc 0.75
    let b = binary_metrics(&[1, 1, 0, 0], &[0.9, 0.8, 0.1, 0.3], 0.5); // acc 1.0
    let c = binary_metrics(&[1, 1], &[0.9, 0.8], 0.5); // auc None
    let s = summarize(&[a, b, c]);
    assert_eq!(s.runs, 3);
    assert_close!(s.accuracy.mean, 2.75 / 3.0);
    assert_close!(s.accuracy.std, mean_std(&[0.75, 1.0, 1.0]).std);
    assert_eq!(s.auc.n, 2);
    // AUC of a: positives {0.9, 0.2} vs negatives {0.1, 0.3} = 3/4; of b: 1.
    assert_close!(s.auc.mean, 0.875);
    assert_close!(s.auc.std, mean_std(&[0.75, 1.0]).std);
    assert_close!(s.tp.mean, 5.0 / 3.0);
}

#[test]
fn platt_recovers_a_known_sigmoid_and_temperature_a_known_scale() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let n = 20_000;
    let z: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    let y: Vec<u8> = z
        .iter()
        .map(|&v| u8::from(rng.random::<f64>() < sigmoid(2.0 * f64::from(v) - 1.0)))
        .collect();
    let (a, b) = fit_platt(&z, &y);
    assert!((a - 2.0).abs() < 0.2, "a = {a}");
    assert!((b + 1.0).abs() < 0.1, "b = {b}");
    let p = apply_platt(&[0.5, 0.0], a, b);
    assert!((p[0] - 0.5).abs() < 0.05 && (p[1] - sigmoid(-1.0) as f32).abs() < 0.05);

    // Temperature: labels from sigmoid(z), model reports 3z -> T ≈ 3.
    let y: Vec<u8> = z
        .iter()
        .map(|&v| u8::from(rng.random::<f64>() < sigmoid(f64::from(v))))
        .collect();
    let scaled: Vec<f32> = z.iter().map(|v| v * 3.0).collect();
    let t = fit_temperature(&scaled, &y);
    assert!((t - 3.0).abs() < 0.3, "T = {t}");
    let p = apply_temperature(&[3.0], t);
    assert!((p[0] - sigmoid(1.0) as f32).abs() < 0.03);
    // Calibration lowers the ECE of the overconfident scores.
    let raw: Vec<f32> = scaled
        .iter()
        .map(|&v| sigmoid(f64::from(v)) as f32)
        .collect();
    let cal = apply_temperature(&scaled, t);
    assert!(expected_calibration_error(&y, &cal, 10) < expected_calibration_error(&y, &raw, 10));
}

/// The inner-sources rule refuses out-of-source predictions that rank the classes the wrong way
/// round (measured on the real data: an inner fold left with one leukemic source predicted the
/// other at AUC 0.31), and keeps well-ordered ones.
#[test]
fn out_of_source_decision_refuses_inverted_predictions() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let z: Vec<f32> = (0..2_000).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    let y: Vec<u8> = z
        .iter()
        .map(|&v| u8::from(rng.random::<f64>() < sigmoid(1.5 * f64::from(v))))
        .collect();
    let d = out_of_source_decision(&z, &y).expect("well-ordered predictions are used");
    assert!(d.platt_a > 1.0 && d.fitted_on == z.len(), "{d:?}");
    assert!((0.0..=1.0).contains(&d.threshold));
    let inverted: Vec<f32> = z.iter().map(|v| -v).collect();
    assert_eq!(out_of_source_decision(&inverted, &y), None);
    // No ranking at all (every logit equal) is no basis either.
    assert_eq!(out_of_source_decision(&vec![0.3; z.len()], &y), None);
}

// ----------------------------------------------------------------------------- reports

fn run(protocol: &str, split: &str, seed: u64, labels: &[u8], probs: &[f32]) -> RunRecord {
    let curve = (0..20)
        .map(|e| EpochRow {
            epoch: e,
            train_loss: 0.7 * (-(e as f64) / (6.0 + seed as f64)).exp() + 0.05,
            val_loss: (e % 5 != 4).then(|| 0.75 * (-(e as f64) / 9.0).exp() + 0.15),
            val_balanced_accuracy: Some(0.5 + 0.45 * (1.0 - (-(e as f64) / 5.0).exp())),
        })
        .collect();
    RunRecord {
        storage_check: None,
        decision: None,
        threshold_rule: None,
        inner_sources: Vec::new(),
        protocol: protocol.into(),
        split: split.into(),
        seed,
        metrics: binary_metrics(labels, probs, 0.5),
        curve,
        roc: roc_curve(labels, probs)
            .into_iter()
            .map(|(f, t, _)| (f, t))
            .collect(),
    }
}

/// Labels and scores with roughly the given accuracy.
fn synthetic(n: usize, quality: f32, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let labels: Vec<u8> = (0..n).map(|i| u8::from(i % 2 == 0)).collect();
    let probs = labels
        .iter()
        .map(|&y| {
            let noise: f32 = rng.random_range(-0.5..0.5);
            (0.5 + quality * (f32::from(y) - 0.5) + noise * (1.0 - quality)).clamp(0.0, 1.0)
        })
        .collect();
    (labels, probs)
}

fn sample_report() -> Report {
    let mut runs = Vec::new();
    for (si, split) in ["ALL-IDB1", "ALL-IDB2", "UFG"].iter().enumerate() {
        for seed in 0..3u64 {
            let (l, p) = synthetic(60, 0.5 - 0.1 * si as f32, 10 * si as u64 + seed);
            runs.push(run("lodo", split, seed, &l, &p));
        }
    }
    for fold in 0..5 {
        let (l, p) = synthetic(80, 0.6, 100 + fold);
        runs.push(run("kfold", &format!("fold{fold}"), 0, &l, &p));
    }
    Report {
        config: serde_json::json!({"backbone": "VGG-16", "mode": "mDFT", "head": [1024, 256]}),
        runs,
        data: serde_json::json!({"datasets": ["ALL-IDB1", "ALL-IDB2", "UFG"]}),
    }
}

fn table_lines(md: &str, heading: &str) -> Vec<String> {
    md.split(heading)
        .nth(1)
        .unwrap()
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(str::to_string)
        .collect()
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn markdown_table_has_the_right_rows_and_columns() {
    let report = sample_report();
    let md = markdown_table_iv(&report);
    let lodo = table_lines(&md, "### LODOCV");
    assert_eq!(lodo.len(), 3, "header, separator, one row:\n{md}");
    let header = cells(&lodo[0]);
    assert_eq!(header.len(), 1 + 3 * 3);
    assert_eq!(header[0], "model");
    assert_eq!(header[1], "ALL-IDB1 acc. %");
    assert_eq!(header[2], "ALL-IDB2 acc. %");
    assert_eq!(header[3], "UFG acc. %");
    assert_eq!(header[4], "ALL-IDB1 bal. acc. %");
    assert_eq!(header[7], "ALL-IDB1 AUC");
    let row = cells(&lodo[2]);
    assert_eq!(row.len(), header.len());
    assert_eq!(row[0], "VGG-16 mDFT 1024-256");
    // The ALL-IDB1 accuracy cell is the mean ± std over its three seeds, in %.
    let accs: Vec<f64> = report
        .runs
        .iter()
        .filter(|r| r.protocol == "lodo" && r.split == "ALL-IDB1")
        .map(|r| r.metrics.accuracy)
        .collect();
    let ms = mean_std(&accs);
    assert_eq!(
        row[1],
        format!("{:.2} ± {:.2}", ms.mean * 100.0, ms.std * 100.0)
    );
    assert!(row[7].starts_with("0.") || row[7].starts_with("1.000"));

    let kfold = table_lines(&md, "### Stratified k-fold");
    assert_eq!(kfold.len(), 3);
    let header = cells(&kfold[0]);
    assert_eq!(
        header,
        [
            "model",
            "accuracy %",
            "precision %",
            "recall %",
            "specificity %",
            "F1 %",
            "AUC",
            "kappa",
            "runs"
        ]
    );
    let row = cells(&kfold[2]);
    assert_eq!(row.len(), header.len());
    assert_eq!(row[8], "5");

    // Every LODOCV metric: one row per test set, mean ± std over its seeds.
    let every = table_lines(&md, "### LODOCV, every metric");
    assert_eq!(
        every.len(),
        2 + 3,
        "header, separator, three test sets:\n{md}"
    );
    let header = cells(&every[0]);
    assert_eq!(header[1], "test set");
    assert_eq!(header[11], "ECE");
    let row = cells(&every[2]);
    assert_eq!(row.len(), header.len());
    assert_eq!(
        (row[1].as_str(), row[2].as_str(), row[3].as_str()),
        ("ALL-IDB1", "60", "3")
    );
    let of = |f: fn(&RunRecord) -> f64| {
        let v: Vec<f64> = report
            .runs
            .iter()
            .filter(|r| r.protocol == "lodo" && r.split == "ALL-IDB1")
            .map(f)
            .collect();
        mean_std(&v)
    };
    let bal = of(|r| r.metrics.balanced_accuracy);
    assert_eq!(
        row[5],
        format!("{:.2} ± {:.2}", bal.mean * 100.0, bal.std * 100.0)
    );
    let ece = of(|r| r.metrics.ece);
    assert_eq!(row[11], format!("{:.3} ± {:.3}", ece.mean, ece.std));

    // Several configurations: one row each; a missing test set shows n/a.
    let mut other = sample_report();
    other.config = serde_json::json!({"name": "ResNet50 | mDFT"});
    other.runs.retain(|r| r.split != "UFG");
    let md = markdown_table_iv_rows(&[("LeukNet", &report), ("ResNet50 | mDFT", &other)]);
    let lodo = table_lines(&md, "### LODOCV");
    assert_eq!(lodo.len(), 4);
    let row = cells(&lodo[3].replace("\\|", "/"));
    assert_eq!(row[0], "ResNet50 / mDFT");
    assert_eq!(row[3], "n/a");
    assert_eq!(table_lines(&md, "### Stratified k-fold").len(), 4);

    // No runs at all: notes instead of tables.
    let empty = Report {
        config: serde_json::json!({}),
        runs: vec![],
        data: serde_json::Value::Null,
    };
    let md = markdown_table_iv(&empty);
    assert!(md.contains("No LODOCV runs") && md.contains("No k-fold runs"));
}

#[test]
fn json_report_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/report.json");
    let report = sample_report();
    write_json(&report, &path).unwrap();
    let back = read_json(&path).unwrap();
    assert_eq!(back.runs.len(), report.runs.len());
    assert_eq!(back.runs[0].metrics, report.runs[0].metrics);
    assert_eq!(back.config, report.config);
}

fn check_png(path: &Path, min_w: u32, min_h: u32) {
    let meta = std::fs::metadata(path).unwrap();
    assert!(
        meta.len() > 1000,
        "{} is only {} bytes",
        path.display(),
        meta.len()
    );
    let img = image::open(path).unwrap().to_rgb8();
    assert!(img.width() >= min_w && img.height() >= min_h);
    // Not a blank canvas: some dark (text/axes) and some coloured pixels.
    let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
    let coloured = img
        .pixels()
        .filter(|p| {
            let (mx, mn) = (p.0.iter().max().unwrap(), p.0.iter().min().unwrap());
            mx - mn > 60
        })
        .count();
    assert!(dark > 500, "{}: only {dark} dark pixels", path.display());
    assert!(
        coloured > 500,
        "{}: only {coloured} coloured pixels",
        path.display()
    );
}

/// Where plots go: `LEUKNET_TEST_PLOT_DIR` to keep them for a look, else a temp dir.
fn plot_dir() -> (Option<tempfile::TempDir>, std::path::PathBuf) {
    match std::env::var_os("LEUKNET_TEST_PLOT_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            (None, d.into())
        }
        None => {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    }
}

#[test]
fn plots_write_valid_pngs() {
    let (_guard, dir) = plot_dir();
    let report = sample_report();
    let curves = dir.join("curves.png");
    let roc = dir.join("roc.png");
    let cm = dir.join("confusion.png");
    plot_training_curves(&report.runs, &curves).unwrap();
    plot_roc(&report.runs, &roc).unwrap();
    plot_confusion_matrices(&report.runs, &cm).unwrap();
    check_png(&curves, 600, 400);
    check_png(&roc, 600, 600);
    check_png(&cm, 400, 400);
    // LODOCV only, as a pipeline would plot it.
    let lodo: Vec<RunRecord> = report
        .runs
        .iter()
        .filter(|r| r.protocol == "lodo")
        .cloned()
        .collect();
    let roc_lodo = dir.join("roc_lodo.png");
    plot_roc(&lodo, &roc_lodo).unwrap();
    check_png(&roc_lodo, 600, 600);
    // Empty inputs still produce a readable image.
    let empty = dir.join("empty_curves.png");
    plot_training_curves(&[], &empty).unwrap();
    assert!(image::open(&empty).is_ok());
}

// ----------------------------------------------------------------------------- features

fn gaussian_clusters(n: usize, d: usize, shift: f32, seed: u64) -> (Vec<Vec<f32>>, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let mut x = Vec::with_capacity(n);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let label = u8::from(i % 2 == 1);
        let mu = if label == 1 { shift } else { -shift };
        x.push((0..d).map(|_| mu + normal.sample(&mut rng)).collect());
        y.push(label);
    }
    (x, y)
}

#[test]
fn pca_svm_separates_gaussian_clusters_and_is_chance_on_random_labels() {
    // Mean difference 0.3 per dimension in 300-D: ||delta|| = 5.2, Bayes error ~0.5 %.
    let (train_x, train_y) = gaussian_clusters(240, 300, 0.15, 1);
    let (test_x, test_y) = gaussian_clusters(200, 300, 0.15, 2);
    let r = pca_svm(&train_x, &train_y, &test_x, &test_y, 100).unwrap();
    assert_eq!(r.predictions.len(), 200);
    assert!(r.components_used > 0 && r.components_used <= 100);
    assert!(r.accuracy > 0.95, "accuracy {}", r.accuracy);
    assert!(r.kappa > 0.9, "kappa {}", r.kappa);
    assert!(r.balanced_accuracy > 0.95);
    assert!(r.auc.unwrap() > 0.98);

    // Random labels: nothing to learn.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (tx, _) = gaussian_clusters(240, 300, 0.0, 4);
    let (vx, _) = gaussian_clusters(400, 300, 0.0, 5);
    let ty: Vec<u8> = (0..240).map(|_| rng.random_range(0..2)).collect();
    let vy: Vec<u8> = (0..400).map(|_| rng.random_range(0..2)).collect();
    let r = pca_svm(&tx, &ty, &vx, &vy, 100).unwrap();
    assert!(
        (0.4..=0.6).contains(&r.accuracy),
        "accuracy on random labels {}",
        r.accuracy
    );
    assert!(r.kappa.abs() < 0.2);

    // Without PCA (256-wide mDFT features are used as they are).
    let (a, ay) = gaussian_clusters(100, 20, 0.5, 6);
    let (b, by) = gaussian_clusters(100, 20, 0.5, 7);
    let r = pca_svm(&a, &ay, &b, &by, 100).unwrap();
    assert_eq!(r.components_used, 0);
    assert!(r.accuracy > 0.95);

    // One training class is an error, not a panic.
    assert!(pca_svm(&a, &[1; 100], &b, &by, 10).is_err());
}

#[test]
fn tsne_plot_writes_a_png() {
    let (_guard, dir) = plot_dir();
    let (x, y) = gaussian_clusters(60, 10, 1.5, 11);
    let datasets: Vec<String> = (0..60)
        .map(|i| ["ALL-IDB1", "ALL-IDB2", "UFG", "Raabin"][i % 4].to_string())
        .collect();
    let path = dir.join("tsne.png");
    let out = tsne_plot(&x, &y, &datasets, &path, 30.0).unwrap();
    assert_eq!(out.embedding.len(), 60);
    assert!(out.perplexity <= 19.0, "perplexity {}", out.perplexity);
    assert!(out.embedding.iter().flatten().all(|v| v.is_finite()));
    assert!(out.svm_accuracy_2d.unwrap() > 0.9);
    check_png(&path, 800, 600);
}
