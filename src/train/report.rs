//! Evaluation reports: the JSON record of every run, the paper's Table IV layout in Markdown,
//! and PNG plots (training curves, ROC curves, confusion matrices).
//!
//! A [`Report`] holds the runs of one model/configuration; [`markdown_table_iv_rows`] puts
//! several reports side by side, one row each. Mean ± std in the tables is the sample standard
//! deviation over runs: over seeds for each LODOCV test set, over every (seed, fold) run for
//! k-fold.
//!
//! Plots use plotters' bitmap backend with the embedded DejaVu Sans font
//! (`assets/fonts/DejaVuSans.ttf`, Bitstream Vera licence), registered once as `sans-serif`
//! by [`register_fonts`], since plotters' `ab_glyph` text backend has no system font lookup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use super::eval_metrics::{mean_std, summarize, BinaryMetrics, Confusion, MeanStd};

/// Protocol name of leave-one-dataset-out runs in [`RunRecord::protocol`].
pub const PROTOCOL_LODO: &str = "lodo";
/// Protocol name of stratified k-fold runs in [`RunRecord::protocol`].
pub const PROTOCOL_KFOLD: &str = "kfold";

/// One epoch of a training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    pub epoch: usize,
    pub train_loss: f64,
    #[serde(default)]
    pub val_loss: Option<f64>,
    #[serde(default)]
    pub val_balanced_accuracy: Option<f64>,
}

/// One trained model evaluated on one test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// [`PROTOCOL_LODO`] (`"lodo"`) or [`PROTOCOL_KFOLD`] (`"kfold"`).
    pub protocol: String,
    /// The LODOCV test set's name (e.g. `ALL-IDB1`) or the fold (e.g. `fold0`).
    pub split: String,
    pub seed: u64,
    pub metrics: BinaryMetrics,
    #[serde(default)]
    pub curve: Vec<EpochRow>,
    /// ROC points `(fpr, tpr)`, e.g. from [`super::eval_metrics::roc_curve`].
    #[serde(default)]
    pub roc: Vec<(f64, f64)>,
    /// What storing the weights as fp16/int8 changes on this test set, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_check: Option<StorageCheck>,
    /// The calibration and threshold applied to the test set (chosen on training data only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<super::protocol::Decision>,
    /// The rule that gave `decision` (the inner-source rules fall back to `train-set` where the
    /// out-of-source predictions rank the classes the wrong way round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_rule: Option<super::protocol::ThresholdRule>,
    /// With an inner-source rule: each training source it predicted by a model trained without
    /// it, scored with that decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inner_sources: Vec<super::protocol::InnerSourceCheck>,
}

/// The same model evaluated with f32 weights and with its weights as stored in a converted ONNX
/// file (both by whole-network forward passes on the plain test images, same decision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageCheck {
    pub storage: crate::onnx::WeightStorage,
    pub fp32: BinaryMetrics,
    pub stored: BinaryMetrics,
    /// Largest |p_fp32 - p_stored| over the test images.
    pub max_abs_diff_probability: f32,
    /// Test images whose label differs between the two.
    pub changed_decisions: usize,
}

/// Every run of one model/configuration, plus free-form configuration and data description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Training configuration; its `name` (or `backbone`/`mode`/`head`) labels table rows.
    pub config: serde_json::Value,
    pub runs: Vec<RunRecord>,
    /// Data description (datasets, counts, hashes…).
    pub data: serde_json::Value,
}

/// Joins the reports of one recipe run with different seeds (e.g. more seeds run after the
/// export) into one. Refused unless the configurations are equal but for the first seed
/// (`options.seed`) and the number of seeds (`runs`), the data descriptions are equal, and no
/// `(protocol, split, seed)` run appears twice.
pub fn merge_seed_reports(reports: Vec<(PathBuf, Report)>) -> Result<Report> {
    fn recipe(config: &serde_json::Value) -> serde_json::Value {
        let mut c = config.clone();
        if let Some(top) = c.as_object_mut() {
            top.remove("runs");
        }
        if let Some(options) = c.get_mut("options").and_then(|o| o.as_object_mut()) {
            options.remove("seed");
        }
        c
    }
    let mut reports = reports.into_iter();
    let (first, mut merged) = reports.next().context("no report to merge")?;
    let base = recipe(&merged.config);
    let mut seen: std::collections::HashSet<(String, String, u64)> = merged
        .runs
        .iter()
        .map(|r| (r.protocol.clone(), r.split.clone(), r.seed))
        .collect();
    for (path, report) in reports {
        if recipe(&report.config) != base {
            bail!(
                "{} is not the recipe of {}: the configurations differ beyond the seed",
                path.display(),
                first.display()
            );
        }
        if report.data != merged.data {
            bail!(
                "{} was run on other data than {}",
                path.display(),
                first.display()
            );
        }
        for run in report.runs {
            if !seen.insert((run.protocol.clone(), run.split.clone(), run.seed)) {
                bail!(
                    "{}: run {}/{} with seed {} is already in an earlier report",
                    path.display(),
                    run.protocol,
                    run.split,
                    run.seed
                );
            }
            merged.runs.push(run);
        }
    }
    Ok(merged)
}

/// Writes the report as pretty JSON, creating parent directories.
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    serde_json::to_writer_pretty(&mut w, report).context("serialising report")?;
    std::io::Write::flush(&mut w)?;
    Ok(())
}

/// Reads a report written by [`write_json`].
pub fn read_json(path: &Path) -> Result<Report> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// The row label of a report: `config.name` if it is a string, else the non-empty values of
/// `config.backbone`, `config.mode` (or `fine_tuning`) and `config.head` joined by spaces,
/// else `"model"`.
pub fn config_label(config: &serde_json::Value) -> String {
    if let Some(name) = config.get("name").and_then(|v| v.as_str()) {
        return name.to_string();
    }
    let parts: Vec<String> = ["backbone", "mode", "fine_tuning", "head"]
        .iter()
        .filter_map(|k| config.get(*k))
        .filter_map(|v| match v {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Array(a) if !a.is_empty() => Some(
                a.iter()
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .collect::<Vec<_>>()
                    .join("-"),
            ),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        "model".to_string()
    } else {
        parts.join(" ")
    }
}

/// The paper's Table IV layout for one report (one row); see [`markdown_table_iv_rows`].
pub fn markdown_table_iv(report: &Report) -> String {
    let label = config_label(&report.config);
    markdown_table_iv_rows(&[(label.as_str(), report)])
}

/// Markdown tables, one row per `(label, report)`:
///
/// 1. LODOCV (Table IV layout): per test set (columns in order of first appearance) accuracy
///    in %, then balanced accuracy in %, then ROC AUC, each as mean ± sample std over the runs
///    (seeds) on that test set.
/// 2. Stratified k-fold: accuracy, precision, recall, specificity, F1 (all %), AUC and Cohen's
///    kappa, mean ± sample std over every (seed, fold) run, and the number of runs.
///
/// A table whose protocol has no runs is replaced by a one-line note.
pub fn markdown_table_iv_rows(rows: &[(&str, &Report)]) -> String {
    let mut out = String::new();

    // LODOCV test sets, in order of first appearance.
    let mut test_sets: Vec<String> = Vec::new();
    for (_, r) in rows {
        for run in r.runs.iter().filter(|r| r.protocol == PROTOCOL_LODO) {
            if !test_sets.contains(&run.split) {
                test_sets.push(run.split.clone());
            }
        }
    }
    out.push_str("### LODOCV (leave one dataset out), Table IV layout\n\n");
    if test_sets.is_empty() {
        out.push_str("_No LODOCV runs._\n");
    } else {
        let mut header = vec!["model".to_string()];
        header.extend(test_sets.iter().map(|t| format!("{} acc. %", esc(t))));
        header.extend(test_sets.iter().map(|t| format!("{} bal. acc. %", esc(t))));
        header.extend(test_sets.iter().map(|t| format!("{} AUC", esc(t))));
        push_row(&mut out, &header);
        push_row(&mut out, &vec!["---".to_string(); header.len()]);
        for (label, r) in rows {
            let per_set: Vec<Vec<BinaryMetrics>> = test_sets
                .iter()
                .map(|t| {
                    r.runs
                        .iter()
                        .filter(|x| x.protocol == PROTOCOL_LODO && &x.split == t)
                        .map(|x| x.metrics.clone())
                        .collect()
                })
                .collect();
            let mut cells = vec![esc(label)];
            cells.extend(
                per_set.iter().map(|m| {
                    pct_cell(&mean_std(&m.iter().map(|x| x.accuracy).collect::<Vec<_>>()))
                }),
            );
            cells.extend(per_set.iter().map(|m| {
                pct_cell(&mean_std(
                    &m.iter().map(|x| x.balanced_accuracy).collect::<Vec<_>>(),
                ))
            }));
            cells.extend(per_set.iter().map(|m| {
                frac_cell(&mean_std(
                    &m.iter().filter_map(|x| x.auc).collect::<Vec<_>>(),
                ))
            }));
            push_row(&mut out, &cells);
        }
        let seeds: Vec<usize> = rows
            .iter()
            .flat_map(|(_, r)| {
                test_sets.iter().map(|t| {
                    r.runs
                        .iter()
                        .filter(|x| x.protocol == PROTOCOL_LODO && &x.split == t)
                        .count()
                })
            })
            .collect();
        let (lo, hi) = (
            seeds.iter().copied().min().unwrap_or(0),
            seeds.iter().copied().max().unwrap_or(0),
        );
        let runs = if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        };
        out.push_str(&format!(
            "\nMean ± sample std over {runs} run(s) (seeds) per test set; \"n/a\" = no runs \
             (or AUC undefined).\n"
        ));
    }

    if !test_sets.is_empty() {
        out.push_str("\n### LODOCV, every metric\n\n");
        push_header(
            &mut out,
            &[
                "model",
                "test set",
                "n",
                "runs",
                "accuracy %",
                "bal. acc. %",
                "precision %",
                "recall %",
                "specificity %",
                "F1 %",
                "AUC",
                "ECE",
            ],
        );
        for (label, r) in rows {
            for t in &test_sets {
                let m: Vec<BinaryMetrics> = r
                    .runs
                    .iter()
                    .filter(|x| x.protocol == PROTOCOL_LODO && &x.split == t)
                    .map(|x| x.metrics.clone())
                    .collect();
                if m.is_empty() {
                    continue;
                }
                let s = summarize(&m);
                push_row(
                    &mut out,
                    &[
                        esc(label),
                        esc(t),
                        format!("{:.0}", s.n.mean),
                        s.runs.to_string(),
                        pct_cell(&s.accuracy),
                        pct_cell(&s.balanced_accuracy),
                        pct_cell(&s.precision),
                        pct_cell(&s.recall),
                        pct_cell(&s.specificity),
                        pct_cell(&s.f1),
                        frac_cell(&s.auc),
                        frac_cell(&s.ece),
                    ],
                );
            }
        }
        out.push_str("\nMean ± sample std over the runs (seeds); ECE: 10 equal-width bins.\n");
    }

    out.push_str("\n### Stratified k-fold\n\n");
    let any_kfold = rows
        .iter()
        .any(|(_, r)| r.runs.iter().any(|x| x.protocol == PROTOCOL_KFOLD));
    if !any_kfold {
        out.push_str("_No k-fold runs._\n");
    } else {
        push_header(
            &mut out,
            &[
                "model",
                "accuracy %",
                "precision %",
                "recall %",
                "specificity %",
                "F1 %",
                "AUC",
                "kappa",
                "runs",
            ],
        );
        for (label, r) in rows {
            let m: Vec<BinaryMetrics> = r
                .runs
                .iter()
                .filter(|x| x.protocol == PROTOCOL_KFOLD)
                .map(|x| x.metrics.clone())
                .collect();
            let s = summarize(&m);
            push_row(
                &mut out,
                &[
                    esc(label),
                    pct_cell(&s.accuracy),
                    pct_cell(&s.precision),
                    pct_cell(&s.recall),
                    pct_cell(&s.specificity),
                    pct_cell(&s.f1),
                    frac_cell(&s.auc),
                    frac_cell(&s.kappa),
                    s.runs.to_string(),
                ],
            );
        }
        out.push_str("\nMean ± sample std over every (seed, fold) run.\n");
    }
    out
}

/// A Markdown table of every run whose weight storage was checked ([`StorageCheck`]): the
/// same model's test metrics with f32 weights and with the stored (fp16/int8) weights. Empty
/// when no run was checked.
pub fn markdown_storage_checks(runs: &[RunRecord]) -> String {
    let checked: Vec<(&RunRecord, &StorageCheck)> = runs
        .iter()
        .filter_map(|r| r.storage_check.as_ref().map(|c| (r, c)))
        .collect();
    if checked.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n### Weight storage: f32 weights vs the stored weights (whole-network forward, same threshold)\n\n\
         | protocol | test set | seed | storage | acc. % f32 → stored | bal. acc. % f32 → stored | AUC f32 → stored | max abs Δp | changed labels |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let auc = |m: &BinaryMetrics| m.auc.map_or("n/a".to_string(), |a| format!("{a:.4}"));
    for (r, c) in checked {
        push_row(
            &mut out,
            &[
                esc(&r.protocol),
                esc(&r.split),
                r.seed.to_string(),
                c.storage.to_string(),
                format!(
                    "{:.2} → {:.2}",
                    c.fp32.accuracy * 100.0,
                    c.stored.accuracy * 100.0
                ),
                format!(
                    "{:.2} → {:.2}",
                    c.fp32.balanced_accuracy * 100.0,
                    c.stored.balanced_accuracy * 100.0
                ),
                format!("{} → {}", auc(&c.fp32), auc(&c.stored)),
                format!("{:.2e}", c.max_abs_diff_probability),
                format!("{} of {}", c.changed_decisions, c.fp32.n),
            ],
        );
    }
    out
}

/// Pushes a Markdown table's header row and separator.
fn push_header(out: &mut String, columns: &[&str]) {
    let header: Vec<String> = columns.iter().map(|s| s.to_string()).collect();
    push_row(out, &header);
    push_row(out, &vec!["---".to_string(); header.len()]);
}

fn push_row(out: &mut String, cells: &[String]) {
    out.push('|');
    for c in cells {
        out.push(' ');
        out.push_str(c);
        out.push_str(" |");
    }
    out.push('\n');
}

fn esc(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn pct_cell(m: &MeanStd) -> String {
    if m.n == 0 {
        "n/a".to_string()
    } else {
        format!("{:.2} ± {:.2}", m.mean * 100.0, m.std * 100.0)
    }
}

fn frac_cell(m: &MeanStd) -> String {
    if m.n == 0 {
        "n/a".to_string()
    } else {
        format!("{:.3} ± {:.3}", m.mean, m.std)
    }
}

// ---------------------------------------------------------------------------------------------
// Plots

static FONT_DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded DejaVu Sans as plotters' `sans-serif` (normal and bold). Idempotent;
/// every plotting function here calls it.
pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font("sans-serif", style, FONT_DEJAVU_SANS).is_err() {
                tracing::warn!("embedded DejaVu Sans font was rejected; plot text will be missing");
            }
        }
    });
}

/// Tableau-10 colours, used in order for series.
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub(crate) fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// Runs grouped by `(protocol, split)`, in order of first appearance.
fn group_runs(runs: &[RunRecord]) -> Vec<((String, String), Vec<&RunRecord>)> {
    let mut groups: Vec<((String, String), Vec<&RunRecord>)> = Vec::new();
    for r in runs {
        let key = (r.protocol.clone(), r.split.clone());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    groups
}

fn group_title(protocol: &str, split: &str) -> String {
    match protocol {
        PROTOCOL_LODO => format!("LODOCV, test set {split}"),
        PROTOCOL_KFOLD => format!("k-fold, {split}"),
        _ => format!("{protocol}, {split}"),
    }
}

/// Grid shape `(rows, cols)` for `n` panels, at most 3 columns.
fn grid(n: usize) -> (usize, usize) {
    let cols = n.clamp(1, 3);
    (n.div_ceil(cols).max(1), cols)
}

fn draw_message<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, msg: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from(("sans-serif", 24).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(
        msg.to_string(),
        (w as i32 / 2, h as i32 / 2),
        style,
    ))
    .map_err(|e| anyhow::anyhow!("drawing text: {e}"))?;
    Ok(())
}

/// Training curves, one panel per `(protocol, split)`: training loss (blue) and validation loss
/// (orange) on the left axis, validation balanced accuracy (green, dashed) on the right axis
/// `[0, 1]`, one line per run (seed). Non-finite values are skipped.
pub fn plot_training_curves(runs: &[RunRecord], path_png: &Path) -> Result<()> {
    register_fonts();
    ensure_parent(path_png)?;
    let groups: Vec<_> = group_runs(runs)
        .into_iter()
        .filter(|(_, v)| v.iter().any(|r| !r.curve.is_empty()))
        .collect();
    let (rows, cols) = grid(groups.len());
    let (pw, ph) = (640u32, 440u32);
    let root =
        BitMapBackend::new(path_png, (pw * cols as u32, ph * rows as u32 + 50)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled("Training curves", ("sans-serif", 28))
        .map_err(plot_err)?;
    if groups.is_empty() {
        draw_message(&root, "no training curves recorded")?;
        root.present().map_err(plot_err)?;
        return Ok(());
    }
    let train_c = PALETTE[0];
    let val_c = PALETTE[1];
    let ba_c = PALETTE[2];
    for (panel, ((protocol, split), group)) in root.split_evenly((rows, cols)).iter().zip(&groups) {
        let finite = |v: f64| v.is_finite().then_some(v);
        let epochs = group.iter().flat_map(|r| r.curve.iter().map(|e| e.epoch));
        let (mut e_lo, mut e_hi) = (usize::MAX, 0usize);
        for e in epochs {
            e_lo = e_lo.min(e);
            e_hi = e_hi.max(e);
        }
        if e_hi <= e_lo {
            e_hi = e_lo + 1;
        }
        let loss_max = group
            .iter()
            .flat_map(|r| {
                r.curve
                    .iter()
                    .flat_map(|e| [finite(e.train_loss), e.val_loss.and_then(finite)])
            })
            .flatten()
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.05;
        let mut chart = ChartBuilder::on(panel)
            .margin(12)
            .caption(
                format!("{} ({} run(s))", group_title(protocol, split), group.len()),
                ("sans-serif", 20),
            )
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(e_lo as f64..e_hi as f64, 0.0..loss_max)
            .map_err(plot_err)?
            .set_secondary_coord(e_lo as f64..e_hi as f64, 0.0..1.0);
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("loss")
            .x_labels((e_hi - e_lo + 1).min(10))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(plot_err)?;
        chart
            .configure_secondary_axes()
            .y_desc("validation balanced accuracy")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(plot_err)?;
        for (i, r) in group.iter().enumerate() {
            let train: Vec<(f64, f64)> = r
                .curve
                .iter()
                .filter_map(|e| finite(e.train_loss).map(|l| (e.epoch as f64, l)))
                .collect();
            let val: Vec<(f64, f64)> = r
                .curve
                .iter()
                .filter_map(|e| e.val_loss.and_then(finite).map(|l| (e.epoch as f64, l)))
                .collect();
            let ba: Vec<(f64, f64)> = r
                .curve
                .iter()
                .filter_map(|e| {
                    e.val_balanced_accuracy
                        .and_then(finite)
                        .map(|l| (e.epoch as f64, l))
                })
                .collect();
            let s = chart
                .draw_series(LineSeries::new(train, train_c.stroke_width(2)))
                .map_err(plot_err)?;
            if i == 0 {
                s.label("train loss").legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], train_c.stroke_width(2))
                });
            }
            if !val.is_empty() {
                let s = chart
                    .draw_series(LineSeries::new(val, val_c.stroke_width(2)))
                    .map_err(plot_err)?;
                if i == 0 {
                    s.label("validation loss").legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], val_c.stroke_width(2))
                    });
                }
            }
            if !ba.is_empty() {
                let s = chart
                    .draw_secondary_series(DashedLineSeries::new(ba, 6, 4, ba_c.stroke_width(2)))
                    .map_err(plot_err)?;
                if i == 0 {
                    s.label("val. balanced acc. (right)").legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], ba_c.stroke_width(2))
                    });
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::MiddleRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// ROC curves in one chart: one colour per `(protocol, split)`, one line per run (seed), the
/// legend giving the mean ± std AUC of that split; the chance diagonal dashed.
pub fn plot_roc(runs: &[RunRecord], path_png: &Path) -> Result<()> {
    register_fonts();
    ensure_parent(path_png)?;
    let root = BitMapBackend::new(path_png, (900, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let groups: Vec<_> = group_runs(runs)
        .into_iter()
        .filter(|(_, v)| v.iter().any(|r| r.roc.len() >= 2))
        .collect();
    let protocols: std::collections::BTreeSet<&str> =
        groups.iter().map(|((p, _), _)| p.as_str()).collect();
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .caption("ROC curves", ("sans-serif", 28))
        .x_label_area_size(50)
        .y_label_area_size(60)
        // A little padding so that perfect curves along the axes stay visible.
        .build_cartesian_2d(-0.01..1.01, -0.01..1.01)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate (1 - specificity)")
        .y_desc("true positive rate (sensitivity)")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(plot_err)?;
    let grey = RGBColor(150, 150, 150);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            8,
            6,
            grey.stroke_width(1),
        ))
        .map_err(plot_err)?
        .label("chance")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(1)));
    for (gi, ((protocol, split), group)) in groups.iter().enumerate() {
        let color = PALETTE[gi % PALETTE.len()];
        let aucs = mean_std(
            &group
                .iter()
                .filter_map(|r| r.metrics.auc)
                .collect::<Vec<_>>(),
        );
        let name = if protocols.len() > 1 {
            format!("{protocol} {split}")
        } else {
            split.clone()
        };
        let label = if aucs.n == 0 {
            format!("{name} (AUC n/a, {} run(s))", group.len())
        } else {
            format!(
                "{name} (AUC {:.3} ± {:.3}, {} run(s))",
                aucs.mean,
                aucs.std,
                group.len()
            )
        };
        for (i, r) in group.iter().filter(|r| r.roc.len() >= 2).enumerate() {
            let pts: Vec<(f64, f64)> = r
                .roc
                .iter()
                .map(|&(x, y)| (x.clamp(0.0, 1.0), y.clamp(0.0, 1.0)))
                .collect();
            let s = chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(plot_err)?;
            if i == 0 {
                s.label(label.clone()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                });
            }
        }
    }
    if groups.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new(
                "no ROC curves recorded",
                (0.3, 0.6),
                ("sans-serif", 22).into_font(),
            )))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Confusion matrices in a grid, one per `(protocol, split)`, counts summed over that split's
/// runs and annotated with the row (true-class) percentage; cell shade = row fraction.
pub fn plot_confusion_matrices(runs: &[RunRecord], path_png: &Path) -> Result<()> {
    register_fonts();
    ensure_parent(path_png)?;
    let groups = group_runs(runs);
    let (rows, cols) = grid(groups.len());
    let (pw, ph) = (460u32, 420u32);
    let root =
        BitMapBackend::new(path_png, (pw * cols as u32, ph * rows as u32 + 50)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled("Confusion matrices", ("sans-serif", 28))
        .map_err(plot_err)?;
    if groups.is_empty() {
        draw_message(&root, "no runs recorded")?;
        root.present().map_err(plot_err)?;
        return Ok(());
    }
    for (panel, ((protocol, split), group)) in root.split_evenly((rows, cols)).iter().zip(&groups) {
        let total = group
            .iter()
            .fold(Confusion::default(), |acc, r| acc.add(&r.metrics.confusion));
        let subtitle = if group.len() == 1 {
            format!("accuracy {:.1} %", total.accuracy() * 100.0)
        } else {
            format!(
                "sum of {} runs, pooled accuracy {:.1} %",
                group.len(),
                total.accuracy() * 100.0
            )
        };
        draw_confusion_panel(panel, &group_title(protocol, split), &subtitle, &total)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Class names used on plot axes, index = label.
pub const CLASS_NAMES: [&str; 2] = ["healthy (0)", "leukemic (1)"];

fn draw_confusion_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    subtitle: &str,
    c: &Confusion,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let center = Pos::new(HPos::Center, VPos::Center);
    let title_style = TextStyle::from(("sans-serif", 20).into_font())
        .color(&BLACK)
        .pos(center);
    let small = TextStyle::from(("sans-serif", 15).into_font())
        .color(&BLACK)
        .pos(center);
    let e = |r: Result<(), DrawingAreaErrorKind<DB::ErrorType>>| {
        r.map_err(|e| anyhow::anyhow!("drawing confusion matrix: {e}"))
    };
    e(area.draw(&Text::new(
        title.to_string(),
        (w / 2, 18),
        title_style.clone(),
    )))?;
    e(area.draw(&Text::new(subtitle.to_string(), (w / 2, 42), small.clone())))?;

    // Matrix geometry.
    let left = 130;
    let top = 80;
    let size = ((w - left - 30).min(h - top - 70)).max(40);
    let cell = size / 2;
    // counts[true][pred]
    let counts = [[c.tn, c.fp], [c.fn_, c.tp]];
    for (t, row) in counts.iter().enumerate() {
        let row_total: usize = row.iter().sum();
        for (p, &n) in row.iter().enumerate() {
            let frac = if row_total == 0 {
                0.0
            } else {
                n as f64 / row_total as f64
            };
            let shade = blend(RGBColor(255, 255, 255), RGBColor(8, 69, 148), frac);
            let x0 = left + p as i32 * cell;
            let y0 = top + t as i32 * cell;
            e(area.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell, y0 + cell)],
                shade.filled(),
            )))?;
            e(area.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell, y0 + cell)],
                BLACK.stroke_width(1),
            )))?;
            let txt_color = if frac > 0.55 { WHITE } else { BLACK };
            let big = TextStyle::from(("sans-serif", 28).into_font())
                .color(&txt_color)
                .pos(center);
            let pct = TextStyle::from(("sans-serif", 15).into_font())
                .color(&txt_color)
                .pos(center);
            let kind = match (t, p) {
                (0, 0) => "TN",
                (0, _) => "FP",
                (_, 0) => "FN",
                _ => "TP",
            };
            e(area.draw(&Text::new(
                format!("{n}"),
                (x0 + cell / 2, y0 + cell / 2 - 12),
                big,
            )))?;
            e(area.draw(&Text::new(
                format!("{kind}, {:.1} % of row", frac * 100.0),
                (x0 + cell / 2, y0 + cell / 2 + 18),
                pct,
            )))?;
        }
    }
    // Axis labels.
    for (i, name) in CLASS_NAMES.iter().enumerate() {
        e(area.draw(&Text::new(
            name.to_string(),
            (left + i as i32 * cell + cell / 2, top + 2 * cell + 16),
            small.clone(),
        )))?;
        e(area.draw(&Text::new(
            name.to_string(),
            (left - 55, top + i as i32 * cell + cell / 2),
            small.clone(),
        )))?;
    }
    let axis = TextStyle::from(("sans-serif", 17).into_font())
        .color(&BLACK)
        .pos(center);
    e(area.draw(&Text::new(
        "predicted class",
        (left + cell, top + 2 * cell + 42),
        axis.clone(),
    )))?;
    e(area.draw(&Text::new("true class", (left - 55, top - 18), axis)))?;
    Ok(())
}

pub(crate) fn blend(a: RGBColor, b: RGBColor, t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let m = |x: u8, y: u8| (f64::from(x) + (f64::from(y) - f64::from(x)) * t).round() as u8;
    RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

pub(crate) fn plot_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::Error::new(e).context("plotting")
}

/// Writes `report.json`, `table.md` (Table IV layout, every LODOCV metric, k-fold, weight
/// storage checks), `curves.png`, `roc.png`, `confusion.png` and `epochs.csv` into `out`.
pub fn write_outputs(report: &Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    write_json(report, &out.join("report.json"))?;
    let mut table = markdown_table_iv(report);
    table.push_str(&markdown_storage_checks(&report.runs));
    std::fs::write(out.join("table.md"), table)?;
    if !report.runs.is_empty() {
        plot_training_curves(&report.runs, &out.join("curves.png"))?;
        plot_roc(&report.runs, &out.join("roc.png"))?;
        plot_confusion_matrices(&report.runs, &out.join("confusion.png"))?;
        let mut csv = String::from("protocol,split,seed,epoch,train_loss\n");
        for r in &report.runs {
            for e in &r.curve {
                csv.push_str(&format!(
                    "{},{},{},{},{}\n",
                    r.protocol, r.split, r.seed, e.epoch, e.train_loss
                ));
            }
        }
        std::fs::write(out.join("epochs.csv"), csv)?;
    }
    Ok(())
}

/// Mean ± std of every metric per `(protocol, split)`, keyed `"protocol/split"`; handy
/// for logs and the JSON summary.
pub fn summaries_by_split(
    runs: &[RunRecord],
) -> BTreeMap<String, super::eval_metrics::MetricsSummary> {
    group_runs(runs)
        .into_iter()
        .map(|((p, s), v)| {
            let m: Vec<BinaryMetrics> = v.iter().map(|r| r.metrics.clone()).collect();
            (format!("{p}/{s}"), summarize(&m))
        })
        .collect()
}
