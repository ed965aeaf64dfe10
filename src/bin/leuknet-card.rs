//! `leuknet-card`: tools that complete a trained model and its card, using the real ONNX Runtime
//! engine the server uses.
//!
//! - `add-explain`: adds the Grad-CAM and features outputs ([`leuknet::onnx::explain`]) to a
//!   LeukNet ONNX file exported without them, checks that every probability is unchanged, and
//!   updates the card (sha256, outputs, `explain`).
//! - `fit-ood`: runs the model over the shared data, fits the out-of-distribution statistics on a
//!   fixed part of it, chooses their threshold and the indeterminate band, measures how well the
//!   score separates held-out smears from generated non-smear images and from smears at other
//!   magnifications, and writes the card sections and a report (`report.json`, `README.md`).

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::ProgressBar;
use leuknet::engine::{self, Device, Engine, EngineOptions, ImageOutput};
use leuknet::model_card::{sha256_hex, ExplainSpec, IndeterminateBand, ModelCard, TensorSpec};
use leuknet::onnx::proto::ModelProto;
use leuknet::onnx::{add_explain_outputs, ExplainPlan, LeukNetSpec, VggLayer};
use leuknet::ood;
use leuknet::preprocess::{self, Limits};
use leuknet::synthetic;
use prost::Message;
use std::path::{Path, PathBuf};

/// Completes a trained LeukNet model and its card (explanation outputs, OOD statistics).
#[derive(Debug, Parser)]
#[command(name = "leuknet-card", version, about)]
struct Args {
    /// ONNX Runtime shared library.
    #[arg(long, env = "LEUKNET_ORT_LIBRARY", default_value = engine::DEFAULT_ORT_LIBRARY, global = true)]
    ort_library: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Adds the Grad-CAM and features outputs to the card's ONNX file (rewritten in place).
    AddExplain {
        /// The model card (its ONNX file is next to it).
        #[arg(
            long,
            env = "LEUKNET_MODEL_CARD",
            default_value = "models/leuknet.json"
        )]
        card: PathBuf,
    },
    /// Fits the OOD statistics and the indeterminate band, measures them, updates the card.
    FitOod(FitOptions),
}

/// `fit-ood` options.
#[derive(Debug, clap::Args)]
struct FitOptions {
    /// The model card.
    #[arg(
        long,
        env = "LEUKNET_MODEL_CARD",
        default_value = "models/leuknet.json"
    )]
    card: PathBuf,
    /// The shared data folder (holds MANIFEST.csv).
    #[arg(long, env = "LEUKNET_DATA", default_value = "../shared/data")]
    data: PathBuf,
    /// Where the report goes.
    #[arg(long)]
    out_dir: PathBuf,
    /// Fraction of images held out from fitting (chosen by their sha256, so fixed).
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Quantile of the fitting images' scores used as the OOD threshold.
    #[arg(long, default_value_t = 0.99)]
    quantile: f64,
    /// Covariance shrinkage (fraction of the mean variance added to the diagonal). 0.1 is
    /// the smallest of 0.01, 0.1, 0.3, 1 that flags at most 5 % of the held-out smears of
    /// the shipped model (docs/experiments/2026-12-07-ood).
    #[arg(long, default_value_t = 0.1)]
    shrinkage: f32,
    /// Accuracy the decided (non-indeterminate) images must reach on the held-out images
    /// for the narrowest band around the threshold.
    #[arg(long, default_value_t = 0.99)]
    band_accuracy: f64,
    /// Generated images per non-smear kind.
    #[arg(long, default_value_t = 100)]
    synthetic: u64,
    /// At most this many images per dataset (0: all); for quick checks.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Images per model run.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Seed for the generated images.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which output's statistics go into the card (both are measured).
    #[arg(long, default_value = "pooled")]
    ship: String,
    /// Keep the model's outputs per image (by the sha256 of its bytes) in this JSON file,
    /// so refitting with other settings does not run the model again.
    #[arg(long)]
    cache: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    engine::init_runtime(&args.ort_library)?;
    match args.command {
        Command::AddExplain { card } => add_explain(&card),
        Command::FitOod(options) => fit_ood(&options),
    }
}

/// The network shape recorded in a card's `architecture` (`cfg`, `head`, `input_size`).
fn spec_of(card: &ModelCard) -> Result<LeukNetSpec> {
    let a = &card.architecture;
    let cfg = a["cfg"]
        .as_array()
        .context("card architecture.cfg missing")?;
    let conv = cfg
        .iter()
        .map(|v| match (v.as_u64(), v.as_str()) {
            (Some(c), _) => Ok(VggLayer::Conv(c as usize)),
            (_, Some("M")) => Ok(VggLayer::MaxPool),
            _ => bail!("architecture.cfg entry {v} is neither a width nor \"M\""),
        })
        .collect::<Result<Vec<_>>>()?;
    let head = a["head"]
        .as_array()
        .context("card architecture.head missing")?
        .iter()
        .map(|v| v.as_u64().map(|n| n as usize).context("head width"))
        .collect::<Result<Vec<_>>>()?;
    Ok(LeukNetSpec {
        conv,
        head,
        input_size: card.input.size as usize,
        ..LeukNetSpec::vgg16()
    })
}

fn write_card(card: &ModelCard, path: &Path) -> Result<()> {
    card.validate()?;
    let mut json = serde_json::to_string_pretty(card)?;
    json.push('\n');
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn cpu() -> EngineOptions {
    EngineOptions {
        device: Device::Cpu,
        intra_threads: 0,
    }
}

fn add_explain(card_path: &Path) -> Result<()> {
    let card = ModelCard::load(card_path)?;
    ensure!(
        card.explain.is_none(),
        "{} already declares explanation outputs",
        card_path.display()
    );
    let onnx = card.onnx_path(card_path);
    let before = card.read_verified_model(&onnx)?;
    let spec = spec_of(&card)?;
    let plan = ExplainPlan::for_spec(&spec);
    let mut model = ModelProto::decode(before.as_slice()).context("decode the ONNX file")?;
    add_explain_outputs(&mut model, &plan)?;
    let after = model.encode_to_vec();

    // Same probabilities from both graphs, on images that exercise every ReLU.
    let mut old_engine = Engine::load(&before, &card, &cpu())?;
    let mut new_card = card.clone();
    new_card.sha256 = sha256_hex(&after);
    for (name, shape) in plan.output_shapes() {
        new_card.outputs.push(TensorSpec {
            name: name.into(),
            shape,
        });
    }
    new_card.explain = Some(ExplainSpec::for_spec(&spec));
    let mut new_engine = Engine::load(&after, &new_card, &cpu())?;
    let n = 3;
    let len = n * new_engine.image_len();
    let input: Vec<f32> = (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let old = old_engine.run(input.clone(), n)?;
    let new = new_engine.run_detailed(input, n, true)?;
    let worst = old
        .iter()
        .zip(&new)
        .map(|(a, b)| (a - b.probability).abs())
        .fold(0f32, f32::max);
    ensure!(
        worst == 0.0,
        "probabilities changed by {worst} after adding outputs"
    );
    ensure!(
        new.iter().all(|o| o.gradcam.is_some()),
        "the new outputs are missing"
    );

    let tmp = onnx.with_extension("onnx.tmp");
    std::fs::write(&tmp, &after).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &onnx)?;
    write_card(&new_card, card_path)?;
    println!(
        "added {}, {} and {} to {} ({} -> {} bytes; probabilities identical on {n} images); card {} updated",
        leuknet::onnx::GRADCAM_OUTPUT,
        leuknet::onnx::FEATURES_OUTPUT,
        leuknet::onnx::POOLED_OUTPUT,
        onnx.display(),
        before.len(),
        after.len(),
        card_path.display()
    );
    Ok(())
}

/// The model's outputs per image, by the sha256 of the encoded bytes.
type Cache = std::collections::HashMap<String, (f32, Vec<Vec<f32>>)>;

/// How the card's limitation sentence about the OOD warning starts (replaced on refits).
const OOD_LIMIT_PREFIX: &str = "Out-of-distribution warning:";

/// One manifest row we use.
struct Row {
    dataset: String,
    path: String,
    label: usize,
    sha256: String,
}

fn read_manifest(data: &Path, limit: usize) -> Result<Vec<Row>> {
    let path = data.join("MANIFEST.csv");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read {} (is the shared data there?)", path.display()))?;
    let mut rows = Vec::new();
    let mut per_dataset = std::collections::HashMap::<String, usize>::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        ensure!(
            f.len() == 9,
            "{}:{}: expected 9 fields",
            path.display(),
            i + 1
        );
        let n = per_dataset.entry(f[0].to_string()).or_default();
        if limit > 0 && *n >= limit {
            continue;
        }
        *n += 1;
        rows.push(Row {
            dataset: f[0].into(),
            path: f[1].into(),
            label: f[2]
                .parse()
                .with_context(|| format!("line {}: label", i + 1))?,
            sha256: f[5].into(),
        });
    }
    Ok(rows)
}

/// Held out when the first 8 hex digits of its sha256, as a fraction, fall below `holdout`.
fn held_out(sha256: &str, holdout: f64) -> bool {
    let head = u32::from_str_radix(sha256.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    (head as f64 / u32::MAX as f64) < holdout
}

fn bar(len: u64, what: &str) -> ProgressBar {
    leuknet::progress::progress(len, what)
}

/// Runs encoded images through preprocessing (as the server does) and the engine, reusing
/// and filling `cache`.
fn infer(
    engine: &mut Engine,
    card: &ModelCard,
    images: &[Vec<u8>],
    batch: usize,
    bar: &ProgressBar,
    cache: &mut Cache,
) -> Result<Vec<ImageOutput>> {
    let norm = card.color_normalization()?;
    let size = card.input.size;
    let keys: Vec<String> = images.iter().map(|b| sha256_hex(b)).collect();
    let todo: Vec<usize> = (0..images.len())
        .filter(|&i| !cache.contains_key(&keys[i]))
        .collect();
    bar.inc((images.len() - todo.len()) as u64);
    for chunk in todo.chunks(batch.max(1)) {
        let mut input = Vec::with_capacity(chunk.len() * engine.image_len());
        for &i in chunk {
            let mut p = preprocess::preprocess(&images[i], size, &Limits::default())?;
            norm.apply(&mut p.tensor, size as usize);
            input.extend_from_slice(&p.tensor);
        }
        let outputs = engine.run_detailed(input, chunk.len(), false)?;
        for (&i, o) in chunk.iter().zip(outputs) {
            cache.insert(keys[i].clone(), (o.probability, o.vectors));
        }
        bar.inc(chunk.len() as u64);
    }
    Ok(keys
        .iter()
        .map(|k| {
            let (probability, vectors) = cache[k].clone();
            ImageOutput {
                probability,
                vectors,
                gradcam: None,
            }
        })
        .collect())
}

fn load_cache(path: Option<&Path>) -> Cache {
    path.and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_cache(path: Option<&Path>, cache: &Cache) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec(cache)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

fn fit_ood(o: &FitOptions) -> Result<()> {
    let mut card = ModelCard::load(&o.card)?;
    let explain = card
        .explain
        .clone()
        .context("the card declares no feature outputs: run `leuknet-card add-explain` first")?;
    ensure!(
        !card.fixture,
        "refusing to fit OOD statistics for a random-weight fixture"
    );
    let candidates = [
        explain.pooled_output.as_str(),
        explain.features_output.as_str(),
    ];
    ensure!(
        candidates.contains(&o.ship.as_str()),
        "--ship must be one of {candidates:?}"
    );
    let (_, mut engine) = engine::load_from_card(&o.card, &cpu())?;
    engine.set_vector_outputs(&card, &candidates)?;
    let rows = read_manifest(&o.data, o.limit)?;
    ensure!(!rows.is_empty(), "no images in the manifest");
    let mut images = Vec::with_capacity(rows.len());
    for r in &rows {
        let bytes =
            std::fs::read(o.data.join(&r.path)).with_context(|| format!("read {}", r.path))?;
        ensure!(
            sha256_hex(&bytes) == r.sha256,
            "{}: sha256 differs from MANIFEST.csv",
            r.path
        );
        images.push(bytes);
    }
    let mut cache = load_cache(o.cache.as_deref());
    let progress = bar(rows.len() as u64, "shared images");
    let outputs = infer(
        &mut engine,
        &card,
        &images,
        o.batch as usize,
        &progress,
        &mut cache,
    )?;
    progress.finish();
    save_cache(o.cache.as_deref(), &cache)?;
    let holdout: Vec<bool> = rows
        .iter()
        .map(|r| held_out(&r.sha256, o.holdout))
        .collect();
    let fit_idx: Vec<usize> = (0..rows.len()).filter(|&i| !holdout[i]).collect();
    let test_idx: Vec<usize> = (0..rows.len()).filter(|&i| holdout[i]).collect();
    ensure!(!test_idx.is_empty(), "nothing held out: raise --holdout");

    // Generated non-smear images and smears at other magnifications (from held-out images).
    let smears: Vec<image::RgbImage> = test_idx
        .iter()
        .filter_map(|&i| {
            image::load_from_memory(&images[i])
                .ok()
                .map(|m| m.to_rgb8())
        })
        .collect();
    let mut generated = Vec::new();
    for kind in synthetic::Kind::ALL {
        let encoded: Vec<Vec<u8>> = (0..o.synthetic)
            .map(|i| synthetic::make(kind, i, o.seed, &smears))
            .collect();
        let progress = bar(encoded.len() as u64, kind.name());
        let outs = infer(
            &mut engine,
            &card,
            &encoded,
            o.batch as usize,
            &progress,
            &mut cache,
        )?;
        progress.finish();
        save_cache(o.cache.as_deref(), &cache)?;
        generated.push((kind, outs));
    }

    let classes = vec![card.classes.negative.clone(), card.classes.positive.clone()];
    let mut md = format!(
        "# Out-of-distribution score and indeterminate band of {} {}\n\nMade by `leuknet-card \
         fit-ood` (README). {} shared images: {} fit the statistics, {} are held out (by \
         sha256, fixed). Generated sets: {} images each (seed {}). Flagged = score at or \
         above the threshold, the {:.1} % quantile of the fitting images' scores.\n",
        card.name,
        card.version,
        rows.len(),
        fit_idx.len(),
        test_idx.len(),
        o.synthetic,
        o.seed,
        o.quantile * 100.0
    );
    let mut reports = serde_json::Map::new();
    let mut shipped = None;
    for (j, name) in candidates.iter().enumerate() {
        let vectors = |outs: &[ImageOutput], idx: &[usize]| -> Vec<Vec<f32>> {
            idx.iter().map(|&i| outs[i].vectors[j].clone()).collect()
        };
        let mut stats = ood::fit(
            &vectors(&outputs, &fit_idx),
            &fit_idx.iter().map(|&i| rows[i].label).collect::<Vec<_>>(),
            &classes,
            o.shrinkage,
            name,
        )?;
        let scores: Vec<f32> = outputs.iter().map(|x| stats.score(&x.vectors[j])).collect();
        let fit_scores: Vec<f32> = fit_idx.iter().map(|&i| scores[i]).collect();
        let test_scores: Vec<f32> = test_idx.iter().map(|&i| scores[i]).collect();
        stats.threshold = ood::quantile(&fit_scores, o.quantile);
        stats.chosen_by = format!(
            "the {:.1} % quantile of the scores of the {} fitting images",
            o.quantile * 100.0,
            fit_idx.len()
        );
        let flagged = |s: &[f32]| {
            s.iter().filter(|&&v| v >= stats.threshold).count() as f64 / s.len().max(1) as f64
        };
        let mut per_dataset = serde_json::Map::new();
        let mut datasets: Vec<&str> = rows.iter().map(|r| r.dataset.as_str()).collect();
        datasets.sort();
        datasets.dedup();
        for d in &datasets {
            let s: Vec<f32> = test_idx
                .iter()
                .filter(|&&i| rows[i].dataset == *d)
                .map(|&i| scores[i])
                .collect();
            per_dataset.insert(
                d.to_string(),
                serde_json::json!({"held_out": s.len(), "flagged_ood": flagged(&s),
                                   "median_score": ood::quantile(&s, 0.5)}),
            );
        }
        md += &format!(
            "\n## `{name}` output{}\n\nThreshold {:.3}; held-out smears flagged: {:.1} % \
             (fitting images: {:.1} %).\n\n| set | images | AUROC vs held-out smears | flagged \
             | median score |\n|---|---|---|---|---|\n",
            if *name == o.ship { " (shipped)" } else { "" },
            stats.threshold,
            flagged(&test_scores) * 100.0,
            flagged(&fit_scores) * 100.0
        );
        let mut set_reports = Vec::new();
        for (kind, outs) in &generated {
            let s: Vec<f32> = outs.iter().map(|x| stats.score(&x.vectors[j])).collect();
            let auroc = ood::auroc(&test_scores, &s);
            md += &format!(
                "| {} | {} | {auroc:.3} | {:.1} % | {:.2} |\n",
                kind.name(),
                s.len(),
                flagged(&s) * 100.0,
                ood::quantile(&s, 0.5)
            );
            set_reports.push(serde_json::json!({
                "set": kind.name(), "images": s.len(), "auroc_vs_held_out_smears": auroc,
                "flagged_ood": flagged(&s), "median_score": ood::quantile(&s, 0.5),
            }));
        }
        md += "\n| held-out dataset | images | flagged | median score |\n|---|---|---|---|\n";
        for (d, v) in &per_dataset {
            md += &format!(
                "| {d} | {} | {:.1} % | {:.2} |\n",
                v["held_out"],
                v["flagged_ood"].as_f64().unwrap_or(f64::NAN) * 100.0,
                v["median_score"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let evaluation = serde_json::json!({
            "held_out_smears": {"images": test_scores.len(), "flagged_ood": flagged(&test_scores),
                                "median_score": ood::quantile(&test_scores, 0.5)},
            "fitting_smears": {"images": fit_scores.len(), "flagged_ood": flagged(&fit_scores)},
            "per_dataset_held_out": per_dataset,
            "generated": set_reports,
            "held_out_rule": format!("sha256 prefix below {:.2} of its range (fixed)", o.holdout),
            "report": "docs/experiments (leuknet-card fit-ood --out-dir)",
        });
        stats.evaluation = evaluation.clone();
        reports.insert(
            name.to_string(),
            serde_json::json!({"threshold": stats.threshold, "evaluation": evaluation}),
        );
        if *name == o.ship {
            shipped = Some(stats);
        }
    }
    let stats = shipped.context("the shipped output was not evaluated")?;

    // The indeterminate band: the narrowest band, symmetric in logit around the threshold,
    // outside which the held-out images reach the accuracy asked for.
    let t = card.decision.threshold;
    let logit = |p: f32| {
        let p = p.clamp(1e-6, 1.0 - 1e-6);
        (p / (1.0 - p)).ln()
    };
    let sigmoid = |z: f32| 1.0 / (1.0 + (-z).exp());
    let held: Vec<(f32, usize)> = test_idx
        .iter()
        .map(|&i| (outputs[i].probability, rows[i].label))
        .collect();
    let mut curve = Vec::new();
    let mut chosen = None;
    md += "\n## Indeterminate band\n\n| logit margin | band | decided | accuracy of decided |\n|---|---|---|---|\n";
    for step in 0..=40 {
        let m = step as f32 * 0.1;
        let (low, high) = if step == 0 {
            (t, t)
        } else {
            (sigmoid(logit(t) - m), sigmoid(logit(t) + m))
        };
        let decided: Vec<&(f32, usize)> = held
            .iter()
            .filter(|(p, _)| !(low <= *p && *p < high))
            .collect();
        let correct = decided
            .iter()
            .filter(|(p, y)| (*p >= t) == (*y == 1))
            .count();
        let accuracy = correct as f64 / decided.len().max(1) as f64;
        let coverage = decided.len() as f64 / held.len().max(1) as f64;
        if step % 5 == 0 {
            md += &format!(
                "| {m:.1} | [{low:.3}, {high:.3}) | {:.1} % | {:.1} % |\n",
                coverage * 100.0,
                accuracy * 100.0
            );
        }
        curve.push(
            serde_json::json!({"logit_margin": m, "low": low, "high": high,
                                      "coverage": coverage, "accuracy": accuracy}),
        );
        if chosen.is_none() && accuracy >= o.band_accuracy {
            chosen = Some((m, low, high, coverage, accuracy));
        }
    }
    let (margin, low, high, coverage, accuracy) =
        chosen.context("no band reaches the accuracy asked for: lower --band-accuracy")?;
    md += &format!(
        "\nChosen: logit margin {margin:.1}, band [{low:.3}, {high:.3}): the narrowest whose decided \
         held-out images reach {:.0} % accuracy ({:.1} % decided, {:.1} % correct). These images \
         were in the model's training set, so the accuracy is optimistic.\n",
        o.band_accuracy * 100.0,
        coverage * 100.0,
        accuracy * 100.0
    );
    card.decision.indeterminate = Some(IndeterminateBand {
        low,
        high,
        chosen_by: format!(
            "narrowest band symmetric in logit around the threshold (margin {margin:.1}) outside \
             which the {} held-out shared images reach {:.0} % accuracy ({:.1} % decided, {:.1} % \
             correct); the model was trained on these images too, so the band is optimistic for \
             a new laboratory (LODOCV accuracy is far lower, see metrics.lodo)",
            held.len(),
            o.band_accuracy * 100.0,
            coverage * 100.0,
            accuracy * 100.0
        ),
    });
    let limit = |name: &str| -> String {
        let e = &stats.evaluation;
        let held = e["held_out_smears"]["flagged_ood"]
            .as_f64()
            .unwrap_or(f64::NAN);
        let kinds: Vec<String> = e["generated"]
            .as_array()
            .map(|sets| {
                sets.iter()
                    .map(|k| {
                        format!(
                            "{} {:.0} %",
                            k["set"].as_str().unwrap_or("?"),
                            k["flagged_ood"].as_f64().unwrap_or(f64::NAN) * 100.0
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "{OOD_LIMIT_PREFIX} it flags {:.1} % of held-out smears of the training datasets and, \
             of generated non-smear images, {} (`{name}` output; docs/experiments/2026-12-07-ood). \
             A smear from an unseen laboratory may or may not be flagged.",
            held * 100.0,
            kinds.join(", ")
        )
    };
    card.limitations
        .retain(|l| !l.starts_with(OOD_LIMIT_PREFIX));
    card.limitations.push(limit(&o.ship));
    card.ood = Some(stats);
    write_card(&card, &o.card)?;

    std::fs::create_dir_all(&o.out_dir)?;
    let report = serde_json::json!({
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "shipped_output": o.ship,
        "candidates": reports,
        "indeterminate_band": {"low": low, "high": high, "margin": margin,
                               "coverage": coverage, "accuracy": accuracy, "curve": curve},
    });
    std::fs::write(
        o.out_dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(o.out_dir.join("README.md"), &md)?;
    print!("{md}");
    Ok(())
}
