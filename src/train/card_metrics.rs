//! Refreshing a model card's measured figures after the export (`leuknet-train card-metrics`):
//! the shipped recipe's LODOCV and stratified k-fold figures over every seed run since, and the
//! baselines and variants measured on the same folds, each summarised from its own result file
//! (a `report.json` of `leuknet-train run`, or a `features.json` of its `features` protocol), so
//! that no figure in the card is typed by hand. The ONNX file and its sha256 are never touched.

use crate::model_card::ModelCard;
use crate::train::eval_metrics::{mean_std, summarize, MeanStd};
use crate::train::export::card_limitations;
use crate::train::feature_protocol::FeatureRun;
use crate::train::report::{summaries_by_split, Report, RunRecord, PROTOCOL_KFOLD, PROTOCOL_LODO};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Why the card could not be refreshed; the card is left as it was in every case.
#[derive(Debug, thiserror::Error)]
pub enum CardMetricsError {
    #[error("bad comparison {0:?}: expected NAME=PATH, or NAME=PATH#FEATURES for a features.json")]
    Spec(String),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Content { path: PathBuf, message: String },
    #[error("cannot update the model card {path}: {message}")]
    Card { path: PathBuf, message: String },
}

/// One row of the card's comparison tables: `NAME=PATH[#FEATURES]`. PATH is a `report.json`
/// (every run in it is summarised) or a `features.json` (the runs of feature set FEATURES, e.g.
/// `imagenet-gap`). Several files under one name are one row (e.g. LODOCV from one file,
/// k-fold from another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub name: String,
    pub path: PathBuf,
    pub features: Option<String>,
}

impl FromStr for Comparison {
    type Err = CardMetricsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CardMetricsError::Spec(s.to_string());
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        let (path, features) = match rest.rsplit_once('#') {
            Some((p, f)) => (p, Some(f.trim().to_string())),
            None => (rest, None),
        };
        if name.trim().is_empty() || path.trim().is_empty() || features.as_deref() == Some("") {
            return Err(bad());
        }
        Ok(Self {
            name: name.trim().to_string(),
            path: PathBuf::from(path.trim()),
            features,
        })
    }
}

/// What the SVM runs of a `features.json` measured, mean ± std over runs (seeds, folds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureSummary {
    pub accuracy: MeanStd,
    pub balanced_accuracy: MeanStd,
    pub kappa: MeanStd,
    pub auc: MeanStd,
    /// How well the source dataset can be read from the same features.
    pub source_accuracy: MeanStd,
    /// Test-set size.
    pub n: MeanStd,
    pub runs: usize,
}

fn feature_summary(runs: &[&FeatureRun]) -> FeatureSummary {
    let field = |f: &dyn Fn(&FeatureRun) -> Option<f64>| {
        mean_std(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    FeatureSummary {
        accuracy: field(&|r| Some(r.accuracy)),
        balanced_accuracy: field(&|r| Some(r.balanced_accuracy)),
        kappa: field(&|r| Some(r.kappa)),
        auc: field(&|r| r.auc),
        source_accuracy: field(&|r| r.source_accuracy),
        n: field(&|r| Some(r.n_test as f64)),
        runs: runs.len(),
    }
}

fn read(path: &Path) -> Result<Value, CardMetricsError> {
    let text = std::fs::read_to_string(path).map_err(|e| CardMetricsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| CardMetricsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn content(path: &Path, message: impl Into<String>) -> CardMetricsError {
    CardMetricsError::Content {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn to_value(x: impl Serialize) -> Value {
    serde_json::to_value(x).unwrap_or(Value::Null)
}

/// The LODOCV figures per held-out set and the k-fold figures pooled over folds and seeds, of
/// one file; `recipe` says what was run.
struct Figures {
    recipe: Value,
    lodo: Map<String, Value>,
    kfold: Option<Value>,
}

/// The card's figures of `runs`: every metric's mean ± std per LODOCV test set, and over every
/// k-fold run pooled (`None` without k-fold runs). Used by the export and by [`refresh_card_metrics`].
pub fn card_figures(runs: &[RunRecord]) -> (Map<String, Value>, Option<Value>) {
    let lodo = summaries_by_split(runs)
        .into_iter()
        .filter_map(|(key, s)| {
            let split = key.strip_prefix(&format!("{PROTOCOL_LODO}/"))?;
            Some((split.to_string(), to_value(s)))
        })
        .collect();
    let kfold: Vec<_> = runs
        .iter()
        .filter(|r| r.protocol == PROTOCOL_KFOLD)
        .map(|r| r.metrics.clone())
        .collect();
    (
        lodo,
        (!kfold.is_empty()).then(|| to_value(summarize(&kfold))),
    )
}

fn report_figures(report: &Report) -> Figures {
    let (lodo, kfold) = card_figures(&report.runs);
    Figures {
        recipe: report.config["name"].clone(),
        lodo,
        kfold,
    }
}

fn comparison_figures(c: &Comparison) -> Result<Figures, CardMetricsError> {
    let value = read(&c.path)?;
    match (&value, &c.features) {
        (Value::Object(_), None) => {
            let report: Report = serde_json::from_value(value)
                .map_err(|e| content(&c.path, format!("not a leuknet-train report: {e}")))?;
            if report.runs.is_empty() {
                return Err(content(&c.path, "holds no runs"));
            }
            Ok(report_figures(&report))
        }
        (Value::Array(_), Some(features)) => {
            let runs: Vec<FeatureRun> = serde_json::from_value(value)
                .map_err(|e| content(&c.path, format!("not a features.json: {e}")))?;
            let mine: Vec<&FeatureRun> = runs.iter().filter(|r| &r.features == features).collect();
            if mine.is_empty() {
                let mut known: Vec<&str> = runs.iter().map(|r| r.features.as_str()).collect();
                known.dedup();
                return Err(content(
                    &c.path,
                    format!("no runs of features {features:?} (it holds {known:?})"),
                ));
            }
            let mut lodo = Map::new();
            for r in mine.iter().filter(|r| r.protocol == PROTOCOL_LODO) {
                if !lodo.contains_key(&r.split) {
                    let same: Vec<&FeatureRun> = mine
                        .iter()
                        .copied()
                        .filter(|x| x.protocol == PROTOCOL_LODO && x.split == r.split)
                        .collect();
                    lodo.insert(r.split.clone(), to_value(feature_summary(&same)));
                }
            }
            let kfold: Vec<&FeatureRun> = mine
                .iter()
                .copied()
                .filter(|r| r.protocol == PROTOCOL_KFOLD)
                .collect();
            let components = mine[0].components;
            Ok(Figures {
                recipe: json!(format!(
                    "{features} features, {} + linear SVM",
                    if components == 0 {
                        "no PCA".to_string()
                    } else {
                        format!("PCA {components}")
                    }
                )),
                lodo,
                kfold: (!kfold.is_empty()).then(|| to_value(feature_summary(&kfold))),
            })
        }
        (Value::Array(_), None) => Err(content(
            &c.path,
            "is a features.json: name the feature set, NAME=PATH#FEATURES",
        )),
        _ => Err(content(
            &c.path,
            "is neither a report.json nor a features.json (with #FEATURES)",
        )),
    }
}

/// The card entries of `comparisons`, in the order given, files under one name joined into one
/// entry. Refused when a file has no figures or two files under one name both give LODOCV (or
/// both k-fold) figures.
pub fn comparison_entries(comparisons: &[Comparison]) -> Result<Vec<Value>, CardMetricsError> {
    let mut entries: Vec<(String, Vec<&Comparison>, Vec<Figures>)> = Vec::new();
    for c in comparisons {
        let figures = comparison_figures(c)?;
        if figures.lodo.is_empty() && figures.kfold.is_none() {
            return Err(content(&c.path, "holds no LODOCV or k-fold runs"));
        }
        match entries.iter_mut().find(|(name, _, _)| name == &c.name) {
            Some((_, files, all)) => {
                if all
                    .iter()
                    .any(|f| !f.lodo.is_empty() && !figures.lodo.is_empty())
                    || all
                        .iter()
                        .any(|f| f.kfold.is_some() && figures.kfold.is_some())
                {
                    return Err(content(
                        &c.path,
                        format!(
                            "gives figures that another file of {:?} already gives (one file per protocol and name)",
                            c.name
                        ),
                    ));
                }
                files.push(c);
                all.push(figures);
            }
            None => entries.push((c.name.clone(), vec![c], vec![figures])),
        }
    }
    Ok(entries
        .into_iter()
        .map(|(name, files, figures)| {
            let mut lodo = Map::new();
            let mut kfold = Value::Null;
            let mut recipes = Vec::new();
            for f in figures {
                lodo.extend(f.lodo);
                if f.kfold.is_some() {
                    kfold = f.kfold.unwrap_or(Value::Null);
                }
                if !recipes.contains(&f.recipe) {
                    recipes.push(f.recipe);
                }
            }
            json!({
                "name": name,
                "files": files.iter().map(|c| match &c.features {
                    Some(f) => format!("{}#{f}", c.path.display()),
                    None => c.path.display().to_string(),
                }).collect::<Vec<_>>(),
                "recipe": if recipes.len() == 1 { recipes.remove(0) } else { Value::Array(recipes) },
                "lodo": lodo,
                "kfold": kfold,
            })
        })
        .collect())
}

/// What to put into the card: the shipped recipe's runs (several seeds' reports merged by
/// [`crate::train::report::merge_seed_reports`]) and the comparison rows.
pub struct CardFigures<'a> {
    /// The merged report of the shipped recipe and the files it came from, if any.
    pub recipe: Option<(&'a Report, &'a [PathBuf])>,
    /// Rows for `metrics.baselines` (replaced when non-empty).
    pub baselines: &'a [Comparison],
    /// Rows for `metrics.variants` (replaced when non-empty).
    pub variants: &'a [Comparison],
    /// Known limits added after those written from the recipe's LODOCV figures (needs them).
    pub limitations: &'a [String],
}

/// What [`refresh_card_metrics`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Seeds now behind `metrics.lodo` (0: not replaced).
    pub lodo_seeds: usize,
    /// k-fold runs (folds x seeds) now behind `metrics.kfold` (0: not replaced).
    pub kfold_runs: usize,
    pub baselines: usize,
    pub variants: usize,
    /// The card's comparison table as written ([`markdown_comparison`]).
    pub table: String,
}

fn seeds_of(runs: &[RunRecord], protocol: &str) -> Vec<u64> {
    let mut seeds: Vec<u64> = runs
        .iter()
        .filter(|r| r.protocol == protocol)
        .map(|r| r.seed)
        .collect();
    seeds.sort_unstable();
    seeds.dedup();
    seeds
}

/// Updates the card at `card_path` in place: `metrics.lodo` (and the limitations quoting it)
/// from the recipe's LODOCV runs, `metrics.kfold` (pooled over folds and seeds) from its k-fold
/// runs, each with a `*_report` entry naming the files and seeds, and `metrics.baselines` /
/// `metrics.variants`. Parts without new figures are left as they are; everything is read and
/// checked before the card is written.
pub fn refresh_card_metrics(
    card_path: &Path,
    figures: &CardFigures<'_>,
) -> Result<Refreshed, CardMetricsError> {
    let card_err = |message: String| CardMetricsError::Card {
        path: card_path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(card_path).map_err(|e| card_err(e.to_string()))?;
    let mut card: ModelCard = serde_json::from_str(&text).map_err(|e| card_err(e.to_string()))?;
    let baselines = comparison_entries(figures.baselines)?;
    let variants = comparison_entries(figures.variants)?;
    if !card.metrics.is_object() {
        card.metrics = json!({});
    }
    let lodo_given = figures
        .recipe
        .is_some_and(|(r, _)| r.runs.iter().any(|run| run.protocol == PROTOCOL_LODO));
    if !figures.limitations.is_empty() && !lodo_given {
        return Err(card_err(
            "limitations are written with the recipe's LODOCV figures: give its LODOCV report too"
                .into(),
        ));
    }
    let mut done = Refreshed::default();
    if let Some((report, paths)) = figures.recipe {
        let f = report_figures(report);
        if f.lodo.is_empty() && f.kfold.is_none() {
            return Err(card_err(format!(
                "{} hold no LODOCV or k-fold runs",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let note = |p: &str| {
            format!("{p} models are trained with the shipped recipe, one per test split and seed; the shipped model is the recipe trained on all six sets")
        };
        if !f.lodo.is_empty() {
            let seeds = seeds_of(&report.runs, PROTOCOL_LODO);
            card.limitations = card_limitations(&f.lodo, seeds.len() as u64);
            card.limitations.extend(figures.limitations.iter().cloned());
            card.metrics["lodo"] = Value::Object(f.lodo);
            card.metrics["lodo_report"] = json!({
                "files": paths, "seeds": seeds, "config": report.config, "note": note("LODOCV"),
            });
            done.lodo_seeds = seeds.len();
        }
        if let Some(kfold) = f.kfold {
            let seeds = seeds_of(&report.runs, PROTOCOL_KFOLD);
            done.kfold_runs = kfold["runs"].as_u64().unwrap_or(0) as usize;
            card.metrics["kfold"] = kfold;
            card.metrics["kfold_report"] = json!({
                "files": paths, "seeds": seeds, "config": report.config,
                "note": format!("{}; mean ± std over every fold and seed; stratified, grouped by patient where known", note("k-fold")),
            });
        }
    }
    if !baselines.is_empty() {
        done.baselines = baselines.len();
        card.metrics["baselines"] = Value::Array(baselines);
    }
    if !variants.is_empty() {
        done.variants = variants.len();
        card.metrics["variants"] = Value::Array(variants);
    }
    done.table = markdown_comparison(&card);
    let mut out = serde_json::to_string_pretty(&card).map_err(|e| card_err(e.to_string()))?;
    out.push('\n');
    std::fs::write(card_path, out).map_err(|e| card_err(e.to_string()))?;
    Ok(done)
}

/// The card's comparison as a Markdown table: LODOCV balanced accuracy / AUC per held-out set,
/// k-fold balanced accuracy and, where measured, how readable the source dataset is from the
/// features, for the shipped recipe, then each baseline and variant.
pub fn markdown_comparison(card: &ModelCard) -> String {
    let m = &card.metrics;
    let sets: Vec<String> = m["lodo"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let cell = |s: &Value| -> String {
        let pct = |v: &Value| {
            let (mean, std, n) = (v["mean"].as_f64(), v["std"].as_f64(), v["n"].as_u64());
            match (mean, std, n) {
                (Some(mean), Some(std), Some(n)) if n > 1 => {
                    format!("{:.2} ± {:.2} %", mean * 100.0, std * 100.0)
                }
                (Some(mean), _, _) => format!("{:.2} %", mean * 100.0),
                _ => "—".into(),
            }
        };
        if s.is_null() {
            return "—".into();
        }
        match s["auc"]["mean"].as_f64() {
            Some(auc) => format!("{} / {auc:.3}", pct(&s["balanced_accuracy"])),
            None => pct(&s["balanced_accuracy"]),
        }
    };
    // How well a nearest-centroid classifier reads the source dataset from the same features,
    // per held-out set (one figure where all are equal); only rows from a features.json have it.
    let source = |entry: &Value| -> String {
        let v: Vec<String> = sets
            .iter()
            .filter_map(|s| entry["lodo"][s]["source_accuracy"]["mean"].as_f64())
            .map(|x| format!("{:.1}", x * 100.0))
            .collect();
        match v.first() {
            None => "—".into(),
            Some(first) if v.iter().all(|x| x == first) => format!("{first} %"),
            Some(_) => format!("{} %", v.join(" / ")),
        }
    };
    let mut out = format!(
        "| model | {} | stratified k-fold | source readable from the features |\n|---|{}---|---|\n",
        sets.join(" | "),
        "---|".repeat(sets.len())
    );
    let mut row = |name: &str, entry: &Value| {
        let cells: Vec<String> = sets.iter().map(|s| cell(&entry["lodo"][s])).collect();
        out.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            cells.join(" | "),
            cell(&entry["kfold"]),
            source(entry)
        ));
    };
    let seeds = m["lodo_report"]["seeds"].as_array().map_or(0, Vec::len);
    row(
        &format!(
            "**{} {} (shipped), {seeds} seed(s)**",
            card.name, card.version
        ),
        m,
    );
    for (kind, key) in [("baseline", "baselines"), ("variant", "variants")] {
        for e in m[key].as_array().into_iter().flatten() {
            row(&format!("{kind}: {}", e["name"].as_str().unwrap_or("?")), e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comparison_specs() {
        let c: Comparison = "plain mSFT=runs/a/report.json".parse().unwrap();
        assert_eq!(c.name, "plain mSFT");
        assert_eq!(c.path, PathBuf::from("runs/a/report.json"));
        assert_eq!(c.features, None);
        let c: Comparison = "SVM = x/features.json#imagenet-gap".parse().unwrap();
        assert_eq!(c.name, "SVM");
        assert_eq!(c.features.as_deref(), Some("imagenet-gap"));
        for bad in ["no-equals", "=path", "name=", "name=path#"] {
            assert!(bad.parse::<Comparison>().is_err(), "{bad} accepted");
        }
    }
}
