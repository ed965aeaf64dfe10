//! The GPU hand-off around a `leuknet-train run` (see `docs/gpu-mdft.md`): what runs on the
//! GPU machine after training ([`finalize`]: threshold and Platt calibration of the final
//! model, folded into its last layer, weights stored as fp16 or int8 safetensors cut into parts
//! small enough to come back), what runs here after ([`export_checkpoint`]: parts joined,
//! ONNX + card exported with the usual ONNX Runtime vs tch parity check), and a training-step
//! benchmark ([`bench`]) the GPU script runs beside the same step in PyTorch eager.

use super::augment::Augmenter;
use super::data::{self, Sample};
use super::eval_metrics::summarize;
use super::export::{export, ExportCard, ExportError, ExportReport};
use super::finetune::{fold_platt, fresh_model, Context, TrainError, TrainOptions};
use super::model::{device_from, Init, LeukNet, ModelError};
use super::pack::{
    join_indexed, read_tensors, serialize_tensors, write_parts, write_tensors, PackError,
    PartsIndex,
};
use super::pipeline::{prepare_images, view, ImageSet, SIZE};
use super::protocol::{choose_decision, Decision, ThresholdRule};
use super::report::{self, EpochRow, PROTOCOL_KFOLD, PROTOCOL_LODO};
use crate::model_card::sha256_hex;
use crate::onnx::{quantize_int8, WeightStorage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Reduction, Tensor};

/// File name (before `.partNN`) of the final weights coming back, per storage.
pub fn weights_file(storage: WeightStorage) -> String {
    format!("final.{storage}.safetensors")
}

/// File name of the final model's description written by [`finalize`].
pub const FINAL_JSON: &str = "final.json";

/// Why a hand-off step failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// Packing, parts or safetensors.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// The manifest or the rules.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Training or prediction.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The ONNX export.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// libtorch.
    #[error("tch: {0}")]
    Tch(#[from] tch::TchError),
    /// A file.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The inputs do not belong together.
    #[error("{0}")]
    Mismatch(String),
}

fn ferr(path: &Path, e: impl std::fmt::Display) -> GpuError {
    GpuError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The part of a run's `checkpoints/<run>/state.json` this module reads.
#[derive(Debug, Clone, Deserialize)]
struct RunState {
    options: TrainOptions,
    train_hash: String,
    epochs_done: usize,
    curve: Vec<EpochRow>,
}

/// Everything [`export_checkpoint`] needs besides the weights (`final.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinalInfo {
    /// The final run's options (spec, colour normalisation, seed ...).
    pub options: TrainOptions,
    /// Epochs trained.
    pub epochs_done: usize,
    /// Its loss curve.
    pub curve: Vec<EpochRow>,
    /// The decision, already folded into the stored last layer.
    pub decision: Decision,
    /// How it was chosen.
    pub threshold_rule: ThresholdRule,
    /// Training samples (decodable images).
    pub samples: usize,
    /// Datasets trained on.
    pub datasets: Vec<String>,
    /// sha256 over the training samples' hashes (as the checkpoint records it).
    pub train_hash: String,
    /// How the weights are stored.
    pub storage: WeightStorage,
    /// The parts of the weights file.
    pub weights: PartsIndex,
    /// Device it was trained and calibrated on (e.g. `Cuda(0)`).
    pub device: String,
}

/// Samples as `leuknet-train run` loads them: manifest, sha256 dedup, per-class limit.
pub fn load_samples(
    manifest: &Path,
    limit_per_class: Option<usize>,
) -> Result<(Vec<Sample>, data::DataReport), GpuError> {
    let (samples, mut report) = data::load_manifest(manifest)?;
    let samples = data::dedup(samples, &mut report);
    Ok((
        super::data::limit_per_class(samples, limit_per_class),
        report,
    ))
}

fn train_hash(samples: &[Sample], images: &ImageSet) -> String {
    let mut all = String::new();
    for (i, s) in samples.iter().enumerate() {
        if images.images[i].is_some() {
            all.push_str(&s.sha256);
        }
    }
    sha256_hex(all.as_bytes())
}

/// The model's weights as a safetensors buffer stored as `storage`: rank >= 2 `.weight`s as
/// F16, or as I8 plus a per-output-channel F32 `<name>.scale` (exactly
/// [`crate::onnx::quantize_int8`]); everything else F32.
pub fn encode_weights(model: &LeukNet, storage: WeightStorage) -> Result<Vec<u8>, GpuError> {
    let shapes: HashMap<String, Vec<usize>> = model.spec.parameter_shapes().into_iter().collect();
    let mut tensors = Vec::new();
    for (name, values) in model.named_weights() {
        let shape = shapes
            .get(&name)
            .cloned()
            .ok_or_else(|| GpuError::Mismatch(format!("no shape for {name}")))?;
        let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        if !storage.converts(&name, &shape) {
            tensors.push((name, safetensors::Dtype::F32, shape, f32_bytes(&values)));
            continue;
        }
        match storage {
            WeightStorage::Fp32 => {
                tensors.push((name, safetensors::Dtype::F32, shape, f32_bytes(&values)))
            }
            WeightStorage::Fp16 => {
                let b = values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect();
                tensors.push((name, safetensors::Dtype::F16, shape, b));
            }
            WeightStorage::Int8 => {
                let (q, scales) = quantize_int8(&values, shape[0]);
                let channels = scales.len();
                tensors.push((
                    format!("{name}.scale"),
                    safetensors::Dtype::F32,
                    vec![channels],
                    f32_bytes(&scales),
                ));
                tensors.push((
                    name,
                    safetensors::Dtype::I8,
                    shape,
                    q.iter().map(|&v| v as u8).collect(),
                ));
            }
        }
    }
    let meta = HashMap::from([("storage".to_string(), storage.to_string())]);
    Ok(serialize_tensors(
        &tensors,
        meta,
        Path::new(&weights_file(storage)),
    )?)
}

fn tempfile_dir() -> Result<PathBuf, GpuError> {
    let d = std::env::temp_dir().join(format!(
        "leuknet-gpu-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&d).map_err(|e| ferr(&d, e))?;
    Ok(d)
}

/// Decodes [`encode_weights`]'s buffer back to f32 safetensors (names and shapes of the
/// model; int8 as `q * scale`, fp16 widened) at `dst`.
pub fn decode_weights(bytes: &[u8], src: &Path, dst: &Path) -> Result<(), GpuError> {
    let (tensors, _) = read_tensors(bytes, src)?;
    let scales: HashMap<&str, Vec<f32>> = tensors
        .iter()
        .filter_map(|(n, _, _, b)| {
            n.strip_suffix(".scale").map(|base| {
                (
                    base,
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            })
        })
        .collect();
    let mut out = Vec::new();
    for (n, d, s, b) in &tensors {
        if n.ends_with(".scale") && scales.contains_key(n.trim_end_matches(".scale")) {
            continue;
        }
        let values: Vec<f32> = match d {
            safetensors::Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::I8 => {
                let sc = scales
                    .get(n.as_str())
                    .ok_or_else(|| ferr(src, format!("{n} is int8 without {n}.scale")))?;
                let per = (b.len() / sc.len().max(1)).max(1);
                b.iter()
                    .enumerate()
                    .map(|(k, &v)| f32::from(v as i8) * sc[(k / per).min(sc.len() - 1)])
                    .collect()
            }
            other => return Err(ferr(src, format!("{n}: unexpected dtype {other:?}"))),
        };
        out.push((
            n.clone(),
            safetensors::Dtype::F32,
            s.clone(),
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    write_tensors(&out, HashMap::new(), dst)?;
    Ok(())
}

/// What [`finalize`] reads and writes.
#[derive(Debug, Clone)]
pub struct FinalizeOptions {
    /// The `--out` folder of `leuknet-train run --protocols ...,final`.
    pub run_dir: PathBuf,
    /// The manifest that run read.
    pub manifest: PathBuf,
    /// The rules that run read.
    pub rules: PathBuf,
    /// The `--limit-per-class` that run had.
    pub limit_per_class: Option<usize>,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    /// How the returned weights are stored.
    pub storage: WeightStorage,
    /// Largest part, in bytes.
    pub part_bytes: u64,
    /// Output folder (parts + `final.json`).
    pub out: PathBuf,
}

/// Loads the final run's last checkpoint, chooses its decision on its training images
/// ([`ThresholdRule::TrainSet`], as `run --threshold train-set` does), folds the Platt
/// calibration into the last layer, and writes the weights as `storage` in parts plus
/// `final.json`. Refuses when the manifest's samples are not the ones the run trained on.
pub fn finalize(opts: &FinalizeOptions) -> Result<FinalInfo, GpuError> {
    let ckpt_dir = opts.run_dir.join("checkpoints").join("final");
    let state_path = ckpt_dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| ferr(&state_path, e))?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| ferr(&state_path, e))?;
    let (samples, _) = load_samples(&opts.manifest, opts.limit_per_class)?;
    let rules = data::load_rules(&opts.rules)?;
    let (images, _) = prepare_images(&samples, &rules);
    let hash = train_hash(&samples, &images);
    if hash != state.train_hash {
        return Err(GpuError::Mismatch(format!(
            "the samples of {} (limit {:?}) are not those the final run trained on",
            opts.manifest.display(),
            opts.limit_per_class
        )));
    }
    let device = device_from(&opts.device)?;
    let init = Init::Scratch;
    let mut model = fresh_model(&state.options, &init, device)?;
    model.load_safetensors(&ckpt_dir.join("latest.safetensors"))?;
    let ctx = Context {
        samples: &samples,
        images: &images,
        cache: None,
        init: &init,
        device,
    };
    let all: Vec<usize> = (0..samples.len()).collect();
    let rule = ThresholdRule::TrainSet;
    let decision =
        choose_decision(&ctx, &model, &state.options, &all, rule, "final", None)?.decision;
    fold_platt(&model, decision.platt_a, decision.platt_b)?;
    let bytes = encode_weights(&model, opts.storage)?;
    let weights = write_parts(
        &bytes,
        &opts.out,
        &weights_file(opts.storage),
        opts.part_bytes,
    )?;
    let mut datasets: Vec<String> = samples.iter().map(|s| s.dataset.clone()).collect();
    datasets.sort();
    datasets.dedup();
    let info = FinalInfo {
        options: state.options,
        epochs_done: state.epochs_done,
        curve: state.curve,
        decision,
        threshold_rule: rule,
        samples: images.images.iter().filter(|i| i.is_some()).count(),
        datasets,
        train_hash: hash,
        storage: opts.storage,
        weights,
        device: format!("{device:?}"),
    };
    let p = opts.out.join(FINAL_JSON);
    let text = serde_json::to_string_pretty(&info).map_err(|e| ferr(&p, e))?;
    std::fs::write(&p, text + "\n").map_err(|e| ferr(&p, e))?;
    Ok(info)
}

/// What [`export_checkpoint`] reads and writes.
#[derive(Debug, Clone)]
pub struct ExportCheckpointOptions {
    /// Folder holding `final.json` and the weight parts.
    pub weights_dir: PathBuf,
    /// The GPU run's `report.json` (LODOCV metrics for the card), if any.
    pub report: Option<PathBuf>,
    /// Manifest to take the parity images from (the pack's).
    pub manifest: PathBuf,
    /// Its rules (the pack's empty rules).
    pub rules: PathBuf,
    /// Parity images per dataset and class.
    pub reference_per_class: usize,
    /// Export folder.
    pub export_dir: PathBuf,
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// How the ONNX file stores its weights.
    pub storage: WeightStorage,
    /// Whether the conv base started from the ImageNet weights.
    pub imagenet_init: bool,
}

/// Joins the weight parts (checking their sha256), rebuilds the model, and exports the ONNX
/// file and its card with the parity check (ONNX Runtime vs tch on real pack images).
pub fn export_checkpoint(opts: &ExportCheckpointOptions) -> Result<ExportReport, GpuError> {
    let p = opts.weights_dir.join(FINAL_JSON);
    let text = std::fs::read_to_string(&p).map_err(|e| ferr(&p, e))?;
    let info: FinalInfo = serde_json::from_str(&text).map_err(|e| ferr(&p, e))?;
    let bytes = join_indexed(&opts.weights_dir, &info.weights)?;
    let tmp = tempfile_dir()?;
    let f32_file = tmp.join("final-f32.safetensors");
    decode_weights(
        &bytes,
        &opts.weights_dir.join(&info.weights.file),
        &f32_file,
    )?;
    let init = Init::Scratch;
    let mut model = fresh_model(&info.options, &init, Device::Cpu)?;
    model.load_safetensors(&f32_file)?;
    let _ = std::fs::remove_dir_all(&tmp);

    let (samples, _) = load_samples(&opts.manifest, Some(opts.reference_per_class.max(1)))?;
    let rules = data::load_rules(&opts.rules)?;
    let (images, _) = prepare_images(&samples, &rules);
    let parity: Vec<Vec<f32>> = (0..samples.len())
        .filter_map(|i| {
            view(
                &images,
                i,
                0,
                &Augmenter::none(),
                &info.options.color_norm,
                0,
            )
        })
        .collect();
    if parity.is_empty() {
        return Err(GpuError::Mismatch(format!(
            "no decodable image in {} for the parity check",
            opts.manifest.display()
        )));
    }

    let mut lodo = serde_json::Map::new();
    let mut checks = Vec::new();
    let mut kfold = Vec::new();
    let mut lodo_seeds = std::collections::BTreeSet::new();
    if let Some(r) = &opts.report {
        let rep = report::read_json(r).map_err(|e| ferr(r, format!("{e:#}")))?;
        for (key, s) in report::summaries_by_split(&rep.runs) {
            if let Some(split) = key.strip_prefix(&format!("{PROTOCOL_LODO}/")) {
                lodo.insert(
                    split.to_string(),
                    serde_json::to_value(s).map_err(|e| ferr(r, e))?,
                );
            }
        }
        for run in &rep.runs {
            if run.protocol == PROTOCOL_LODO {
                lodo_seeds.insert(run.seed);
            }
            if let Some(c) = &run.storage_check {
                checks.push(serde_json::json!({"protocol": run.protocol, "test_set": run.split, "seed": run.seed, "check": c}));
            }
            if run.protocol == PROTOCOL_KFOLD {
                kfold.push(run.metrics.clone());
            }
        }
    }
    let o = &info.options;
    let d = &info.decision;
    let card = ExportCard {
        version: opts.version.clone(),
        description: format!(
            "LeukNet ({}, head {:?}{}): VGG-16 conv base from {}, trained on a GPU machine on {} images of {} public blood-smear datasets ({} epochs).",
            o.mode,
            o.head,
            o.frozen_blocks
                .map(|k| format!(", conv blocks 1-{k} frozen"))
                .unwrap_or_default(),
            if opts.imagenet_init { "ImageNet" } else { "scratch" },
            info.samples,
            info.datasets.len(),
            info.epochs_done
        ),
        threshold: d.threshold,
        threshold_chosen_by:
            "maximum balanced accuracy of the calibrated probability on the training images"
                .into(),
        training: serde_json::json!({
            "options": o,
            "threshold_rule": info.threshold_rule,
            "calibration": {"method": "Platt, folded into the last layer", "a": d.platt_a, "b": d.platt_b, "fitted_on": d.fitted_on},
            "curve": info.curve,
            "datasets": info.datasets,
            "trained_on": info.device,
            "returned_weights": {"storage": info.storage, "file": info.weights.file, "sha256": info.weights.sha256},
            "train_hash": info.train_hash,
            "data_sources": super::export::card_data_sources(&opts.manifest),
        }),
        metrics: serde_json::json!({
            "lodo": lodo,
            "kfold": if kfold.is_empty() { serde_json::Value::Null } else { serde_json::to_value(summarize(&kfold)).unwrap_or_default() },
            "weight_storage": {
                "storage": opts.storage,
                "note": "LODOCV metrics are of the f32 models on the GPU machine; each check re-evaluates a test set with the weights rounded as stored",
                "checks": checks,
            },
        }),
        color_normalization: serde_json::to_value(&o.color_norm).unwrap_or_default(),
        pretrained_weights: opts
            .imagenet_init
            .then(|| super::vgg_import::PROVENANCE.to_string()),
        limitations: super::export::card_limitations(&lodo, lodo_seeds.len() as u64),
        ..ExportCard::default()
    };
    Ok(export(
        &model,
        &opts.export_dir,
        &opts.name,
        card,
        &parity,
        opts.storage,
    )?)
}

/// What [`bench`] measures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Device used.
    pub device: String,
    /// Width divisor of the network (1 = the real one).
    pub width_div: usize,
    /// Batch size.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Mean milliseconds per training step (forward, BCE, backward, SGD update, loss read
    /// back as the training loop does).
    pub step_ms: f64,
    /// Training images per second.
    pub images_per_s: f64,
    /// Milliseconds to draw one augmented view (paper + stain) on one CPU core.
    pub augment_view_ms: f64,
    /// Milliseconds for a no-grad forward of one batch (evaluation).
    pub eval_batch_ms: f64,
}

/// Times `steps` full-network training steps (mDFT: every layer trains) on random inputs
/// after `warmup` steps, exactly as [`crate::train::finetune::train`] runs one step, plus an
/// evaluation forward and one augmented view.
pub fn bench(
    device: &str,
    width_div: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
) -> Result<BenchReport, GpuError> {
    let device = device_from(device)?;
    let opts = TrainOptions {
        mode: super::model::FineTuneMode::MDft,
        frozen_blocks: None,
        head: super::model::FineTuneMode::MDft.paper_head(),
        width_div,
        epochs: 1,
        lr: 0.001,
        momentum: 0.8,
        weight_decay: 0.0,
        batch,
        class_weighting: false,
        balanced: true,
        views: 1,
        augmenter: Augmenter::paper_with_stain(),
        color_norm: crate::color_norm::ColorNormalization::None,
        seed: 1,
        domain_adversarial: 0.0,
    };
    let model = fresh_model(&opts, &Init::Scratch, device)?;
    let mut sgd = tch::nn::Sgd {
        momentum: opts.momentum,
        dampening: 0.0,
        wd: 0.0,
        nesterov: false,
    }
    .build(&model.vs, opts.lr)?;
    let s = SIZE as i64;
    let x = Tensor::rand([batch as i64, 3, s, s], (Kind::Float, device));
    let y = Tensor::rand([batch as i64], (Kind::Float, device)).round();
    let mut step = || -> f64 {
        let logits = model.forward_t(&x, true).view([-1]);
        let loss =
            logits.binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Mean);
        sgd.backward_step(&loss);
        loss.double_value(&[])
    };
    for _ in 0..warmup {
        step();
    }
    let t = std::time::Instant::now();
    for _ in 0..steps.max(1) {
        step();
    }
    let step_ms = t.elapsed().as_secs_f64() * 1000.0 / steps.max(1) as f64;
    let t = std::time::Instant::now();
    let evals = 5;
    for _ in 0..evals {
        let p = tch::no_grad(|| model.forward_t(&x, false));
        let _ = p.sum(Kind::Float).double_value(&[]);
    }
    let eval_batch_ms = t.elapsed().as_secs_f64() * 1000.0 / evals as f64;
    let img: Vec<f32> = (0..3 * SIZE * SIZE)
        .map(|k| ((k * 37) % 255) as f32 / 255.0)
        .collect();
    let aug = Augmenter::paper_with_stain();
    let n = 20;
    let t = std::time::Instant::now();
    for v in 0..n {
        let _ = aug.view(&img, SIZE, 1, 0, v as u64 + 1);
    }
    let augment_view_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    Ok(BenchReport {
        device: format!("{device:?}"),
        width_div,
        batch,
        steps,
        step_ms,
        images_per_s: batch as f64 * 1000.0 / step_ms,
        augment_view_ms,
        eval_batch_ms,
    })
}

/// `leuknet-train pack` arguments.
#[derive(Debug, clap::Args)]
pub struct PackArgs {
    /// Source manifest.
    #[arg(long, default_value = "../shared/data/MANIFEST.csv")]
    pub manifest: PathBuf,
    /// Per-dataset rules applied before encoding.
    #[arg(long, default_value = "configs/datasets.json")]
    pub rules: PathBuf,
    /// Output folder (absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Image encoding.
    #[arg(long, value_enum, default_value = "jpeg")]
    pub format: super::pack::PackFormat,
    /// JPEG quality.
    #[arg(long, default_value_t = 95)]
    pub quality: u8,
    /// Largest part folder, in MiB (one device call carries one part).
    #[arg(long, default_value_t = 48.0)]
    pub part_mib: f64,
    /// ImageNet f32 safetensors to pack as fp16 (`none` for no weights).
    #[arg(long, default_value = ".native/weights/vgg16-imagenet.safetensors")]
    pub imagenet: PathBuf,
    /// Keep at most this many images per dataset and class.
    #[arg(long)]
    pub limit_per_class: Option<usize>,
}

/// `leuknet-train gpu ...`: the steps around a GPU run.
#[derive(Debug, clap::Subcommand)]
pub enum GpuCommand {
    /// fp16 safetensors -> f32 safetensors (the packed ImageNet weights, on the GPU machine).
    Widen {
        /// Input (fp16).
        #[arg(long)]
        input: PathBuf,
        /// Output (f32).
        #[arg(long)]
        out: PathBuf,
    },
    /// After `run --protocols ...,final --threshold train-set`: decision, Platt folded,
    /// weights stored as fp16/int8 in parts, `final.json`.
    Finalize {
        /// The run's --out.
        #[arg(long)]
        run_dir: PathBuf,
        /// The run's manifest.
        #[arg(long)]
        manifest: PathBuf,
        /// The run's rules.
        #[arg(long)]
        rules: PathBuf,
        /// The run's --limit-per-class.
        #[arg(long)]
        limit_per_class: Option<usize>,
        /// auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        /// fp32, fp16 or int8.
        #[arg(long, default_value = "int8")]
        storage: WeightStorage,
        /// Largest part in MiB.
        #[arg(long, default_value_t = 15.5)]
        part_mib: f64,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Here, after the GPU run: joins the parts and exports ONNX + card with parity.
    ExportCheckpoint {
        /// Folder with final.json and the parts.
        #[arg(long)]
        weights_dir: PathBuf,
        /// The GPU run's report.json.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Manifest for the parity images (the pack's).
        #[arg(long)]
        manifest: PathBuf,
        /// Its rules (the pack's rules-none.json).
        #[arg(long)]
        rules: PathBuf,
        /// Parity images per dataset and class.
        #[arg(long, default_value_t = 4)]
        reference_per_class: usize,
        /// Export folder.
        #[arg(long)]
        export_dir: PathBuf,
        /// Model name.
        #[arg(long, default_value = "leuknet")]
        name: String,
        /// Model version.
        #[arg(long, default_value = "0.2.0")]
        version: String,
        /// How the ONNX file stores its weights.
        #[arg(long, default_value = "int8")]
        storage: WeightStorage,
        /// The conv base was trained from scratch (no ImageNet provenance in the card).
        #[arg(long)]
        scratch: bool,
    },
    /// Times full-network training steps on random inputs (JSON on stdout).
    Bench {
        /// auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Width divisor (1 = the real network).
        #[arg(long, default_value_t = 1)]
        width_div: usize,
        /// Batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
    },
}

fn mib(v: f64) -> u64 {
    (v * 1024.0 * 1024.0) as u64
}

/// Runs `leuknet-train pack`; prints the pack report as JSON.
pub fn run_pack(a: PackArgs) -> Result<(), GpuError> {
    let imagenet = (a.imagenet.as_os_str() != "none").then_some(a.imagenet);
    let report = super::pack::pack(&super::pack::PackOptions {
        manifest: a.manifest,
        rules: a.rules,
        out: a.out,
        format: a.format,
        quality: a.quality,
        part_bytes: mib(a.part_mib),
        imagenet,
        limit_per_class: a.limit_per_class,
    })?;
    let mut summary = serde_json::to_value(&report).unwrap_or_default();
    if let Some(p) = summary.get_mut("problems") {
        let n = report.problems.len();
        *p = serde_json::json!(format!("{n} (listed in pack.json)"));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    Ok(())
}

/// Runs one `leuknet-train gpu ...` command; prints its result as JSON.
pub fn run_gpu(cmd: GpuCommand) -> Result<(), GpuError> {
    let out = match cmd {
        GpuCommand::Widen { input, out } => {
            let bytes = super::pack::widen_safetensors(&input, &out)?;
            serde_json::json!({"out": out, "bytes": bytes})
        }
        GpuCommand::Finalize {
            run_dir,
            manifest,
            rules,
            limit_per_class,
            device,
            storage,
            part_mib,
            out,
        } => {
            let info = finalize(&FinalizeOptions {
                run_dir,
                manifest,
                rules,
                limit_per_class,
                device,
                storage,
                part_bytes: mib(part_mib),
                out,
            })?;
            serde_json::json!({"decision": info.decision, "epochs_done": info.epochs_done, "samples": info.samples, "weights": info.weights})
        }
        GpuCommand::ExportCheckpoint {
            weights_dir,
            report,
            manifest,
            rules,
            reference_per_class,
            export_dir,
            name,
            version,
            storage,
            scratch,
        } => {
            let r = export_checkpoint(&ExportCheckpointOptions {
                weights_dir,
                report: report.clone(),
                manifest,
                rules,
                reference_per_class,
                export_dir: export_dir.clone(),
                name,
                version,
                storage,
                imagenet_init: !scratch,
            })?;
            if let Some(path) = report {
                // The returned report's tables and plots, as a run made here writes them.
                let rep = report::read_json(&path).map_err(|e| ferr(&path, e))?;
                report::write_outputs(&rep, &export_dir).map_err(|e| ferr(&export_dir, e))?;
            }
            serde_json::to_value(r).unwrap_or_default()
        }
        GpuCommand::Bench {
            device,
            width_div,
            batch,
            steps,
            warmup,
        } => serde_json::to_value(bench(&device, width_div, batch, steps, warmup)?)
            .unwrap_or_default(),
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::pipeline::view_batch;

    fn tiny_options() -> TrainOptions {
        serde_json::from_value(serde_json::json!({
            "mode": "MDft", "frozen_blocks": null, "head": [8, 4], "width_div": 16,
            "epochs": 1, "lr": 0.001, "momentum": 0.8, "weight_decay": 0.0, "batch": 4,
            "class_weighting": false, "balanced": false, "views": 1,
            "augmenter": Augmenter::none(),
            "color_norm": crate::color_norm::ColorNormalization::None,
            "seed": 3, "domain_adversarial": 0.0
        }))
        .unwrap_or_else(|e| panic!("options: {e}"))
    }

    #[test]
    fn stored_weights_decode_to_what_the_onnx_storage_computes_with() {
        let opts = tiny_options();
        let model = fresh_model(&opts, &Init::Scratch, Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("leuknet-gpu-test-{}", std::process::id()));
        for storage in [WeightStorage::Int8, WeightStorage::Fp16] {
            let bytes = encode_weights(&model, storage).unwrap();
            let f32_file = dir.join(format!("{storage}.safetensors"));
            decode_weights(&bytes, Path::new("x"), &f32_file).unwrap();
            let mut back = fresh_model(&opts, &Init::Scratch, Device::Cpu).unwrap();
            back.load_safetensors(&f32_file).unwrap();
            let rounded = model.rounded_copy(storage).unwrap().named_weights();
            for (name, values) in back.named_weights() {
                assert_eq!(values, rounded[&name], "{storage} {name}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parallel_views_equal_one_at_a_time() {
        let n = 3 * SIZE * SIZE;
        let images = ImageSet {
            images: (0..3)
                .map(|k| Some((0..n).map(|p| ((p * (k + 3)) % 251) as u8).collect()))
                .collect(),
        };
        let aug = Augmenter::paper_with_stain();
        let norm = crate::color_norm::ColorNormalization::None;
        let keys = [(0, 1), (1, 0), (2, 5), (0, 2), (1, 3)];
        let batch = view_batch(&images, &keys, &aug, &norm, 7).unwrap();
        let one: Vec<f32> = keys
            .iter()
            .flat_map(|&(i, v)| view(&images, i, v, &aug, &norm, 7).unwrap())
            .collect();
        assert_eq!(batch, one);
    }
}
