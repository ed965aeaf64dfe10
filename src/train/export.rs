//! Export of a trained [`LeukNet`] as the served artefacts: `<name>.onnx` (written by
//! [`crate::onnx::write_leuknet_to`] from [`LeukNet::named_weights`]) and `<name>.json` (the
//! [`ModelCard`], `fixture: false`), followed by a parity check: the files are loaded exactly as
//! the server loads them ([`crate::engine::load_from_card`], ONNX Runtime on the CPU) and their
//! probabilities on real preprocessed images are compared with the tch forward pass in eval
//! mode. The export fails, leaving nothing behind, when any |Δp| exceeds [`PARITY_TOLERANCE`].
//! With fp16 or int8 [`WeightStorage`], the tch reference is the model with its weights rounded
//! the same way ([`LeukNet::rounded_copy`]), so the check still proves the graph exact; what the
//! rounding costs in accuracy is measured separately ([`crate::train::protocol::check_storage`]).
//!
//! Files are first written into a staging folder inside `out_dir` and only moved to their final
//! names after the parity check passes, so a failed export neither leaves partial files nor
//! disturbs an earlier export of the same name.

use crate::engine::{self, EngineError, EngineOptions, DEFAULT_ORT_LIBRARY};
use crate::model_card::{leuknet_outputs, Classes, Decision, ExplainSpec, InputSpec, ModelCard};
pub use crate::onnx::WeightStorage;
use crate::onnx::{write_leuknet_file, LeukNetSpec, OnnxWriteError, PROBABILITY_OUTPUT};
use crate::train::model::LeukNet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Largest accepted |p_onnx - p_tch| on any parity image.
pub const PARITY_TOLERANCE: f32 = 1e-4;

/// Images per batch in the parity check (both runtimes).
const PARITY_BATCH: usize = 8;

/// The card fields the trainer decides; everything else (input spec, outputs, architecture,
/// sha256) is derived from the model and the written file.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportCard {
    /// Model version, e.g. `1.0.0`.
    pub version: String,
    /// What the model is, in a sentence or two.
    pub description: String,
    /// Probability at or above which the label is `leukemic`; must be inside (0, 1).
    pub threshold: f32,
    /// How the threshold was chosen (data and criterion).
    pub threshold_chosen_by: String,
    /// Training protocol and provenance (free JSON: data, splits, seeds, optimiser, init ...).
    pub training: serde_json::Value,
    /// Evaluation results (free JSON).
    pub metrics: serde_json::Value,
    /// What the model may be used for.
    pub intended_use: String,
    /// The warning shown with every answer.
    pub disclaimer: String,
    /// Colour normalisation applied before the graph, identical in training and serving
    /// (`null` for none); recorded as `architecture.color_normalization`.
    pub color_normalization: serde_json::Value,
    /// Provenance and licence of pretrained weights, if any (e.g.
    /// [`crate::train::vgg_import::PROVENANCE`]); recorded as `architecture.pretrained_weights`.
    pub pretrained_weights: Option<String>,
    /// Who the parity images are, in the same order (or empty). When given, the card records
    /// each one's exported probability as `metrics.reference_predictions`, so anyone holding the
    /// data can check that a server with this card reproduces them.
    pub reference_images: Vec<ReferenceImage>,
    /// Known limits, recorded as the card's `limitations`.
    pub limitations: Vec<String>,
}

/// One parity image, identified so that it can be found again in a manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReferenceImage {
    /// sha256 of the image file.
    pub sha256: String,
    /// Its dataset (source).
    pub dataset: String,
    /// Its true label: `leukemic` or `healthy`.
    pub true_label: String,
}

impl Default for ExportCard {
    fn default() -> Self {
        Self {
            version: "0.1.0".into(),
            description: "LeukNet: VGG-16 conv base + fully connected head, sigmoid output; \
                          screens blood-smear images for leukemia."
                .into(),
            threshold: 0.5,
            threshold_chosen_by: "default 0.5 (not tuned)".into(),
            training: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
            intended_use: "Research on automated leukemia screening of blood-smear images. \
                           Not a medical device."
                .into(),
            disclaimer: "Research use only. Not a medical device and not validated for \
                         clinical use: never base a diagnosis or treatment decision on it."
                .into(),
            color_normalization: serde_json::Value::Null,
            pretrained_weights: None,
            reference_images: Vec::new(),
            limitations: Vec::new(),
        }
    }
}

/// What an export produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// `<out_dir>/<name>.onnx`.
    pub onnx_path: PathBuf,
    /// `<out_dir>/<name>.json`.
    pub card_path: PathBuf,
    /// sha256 of the ONNX file (as in the card).
    pub sha256: String,
    /// Largest |p_onnx - p_tch| over the parity images.
    pub max_abs_diff_probability: f32,
    /// Number of parity images compared.
    pub parity_images: usize,
}

/// The outcome of [`check_parity`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Parity {
    /// Largest |p_onnx - p_tch| (infinite when either side produced NaN).
    pub max_abs_diff: f32,
    /// Index of the image with the largest difference.
    pub worst_image: usize,
    /// Probabilities from ONNX Runtime, one per image.
    pub onnx: Vec<f32>,
    /// Probabilities from tch (eval mode), one per image.
    pub tch: Vec<f32>,
}

/// Why an export failed. Nothing is left in `out_dir` after any of these.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid export request: {0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the ONNX graph: {0}")]
    Onnx(OnnxWriteError),
    #[error("cannot serialise the model card: {0}")]
    Card(#[from] serde_json::Error),
    #[error("cannot update the model card {path}: {message}")]
    CardUpdate { path: PathBuf, message: String },
    #[error("ONNX Runtime could not load or run the exported model: {0}")]
    Engine(#[from] EngineError),
    #[error("tch forward pass failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error(
        "parity check failed: max |p_onnx - p_tch| = {max_abs_diff} on image {worst_image} \
         (tolerance {tolerance}); the exported graph does not compute what the trained model \
         computes, so nothing was exported"
    )]
    Parity {
        max_abs_diff: f32,
        worst_image: usize,
        tolerance: f32,
    },
}

/// Exports `model` to `<out_dir>/<name>.onnx` + `<name>.json` and proves them equal to the tch
/// model on `parity_images` (preprocessed CHW tensors of real images, `3 * S * S` values in
/// `[0, 1]` each, from [`crate::preprocess::preprocess`]), with weights stored as `storage`.
pub fn export(
    model: &LeukNet,
    out_dir: &Path,
    name: &str,
    card_fields: ExportCard,
    parity_images: &[Vec<f32>],
    storage: WeightStorage,
) -> Result<ExportReport, ExportError> {
    export_with_weight_hook(
        model,
        out_dir,
        name,
        card_fields,
        parity_images,
        storage,
        |_| {},
    )
}

/// [`export`], with `hook` allowed to alter the weights handed to the ONNX writer. Meant for
/// tests that prove the parity check catches a graph that differs from the tch model; a real
/// export passes a no-op (or calls [`export`]).
#[doc(hidden)]
pub fn export_with_weight_hook(
    model: &LeukNet,
    out_dir: &Path,
    name: &str,
    card_fields: ExportCard,
    parity_images: &[Vec<f32>],
    storage: WeightStorage,
    hook: impl FnOnce(&mut BTreeMap<String, Vec<f32>>),
) -> Result<ExportReport, ExportError> {
    validate_request(model, name, &card_fields, parity_images)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let staging = out_dir.join(format!(".{name}.export-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir(&staging).map_err(io(&staging))?;

    let result = (|| {
        let onnx_file = format!("{name}.onnx");
        let card_file = format!("{name}.json");
        let mut weights = model.named_weights();
        hook(&mut weights);
        let spec = model.spec.clone().with_weight_storage(storage);
        let sha256 = write_onnx(&spec, &weights, &staging.join(&onnx_file))?;
        drop(weights);
        let mut card = build_card(model, &spec, &card_fields, &onnx_file, sha256.clone());
        let staged_card = staging.join(&card_file);
        write_card(&card, &staged_card).map_err(io(&staged_card))?;

        let reference = match storage {
            WeightStorage::Fp32 => None,
            other => Some(model.rounded_copy(other).map_err(|e| match e {
                crate::train::model::ModelError::Torch(t) => ExportError::Torch(t),
                other => ExportError::Invalid(other.to_string()),
            })?),
        };
        let parity = check_parity(
            reference.as_ref().unwrap_or(model),
            &staged_card,
            parity_images,
        )?;
        if parity.max_abs_diff > PARITY_TOLERANCE {
            return Err(ExportError::Parity {
                max_abs_diff: parity.max_abs_diff,
                worst_image: parity.worst_image,
                tolerance: PARITY_TOLERANCE,
            });
        }
        if !card_fields.reference_images.is_empty() {
            let predictions: Vec<serde_json::Value> = card_fields
                .reference_images
                .iter()
                .zip(&parity.onnx)
                .map(|(r, p)| serde_json::json!({"sha256": r.sha256, "dataset": r.dataset, "true_label": r.true_label, "probability": p}))
                .collect();
            if !card.metrics.is_object() {
                card.metrics = serde_json::json!({});
            }
            card.metrics["reference_predictions"] = predictions.into();
            write_card(&card, &staged_card).map_err(io(&staged_card))?;
        }
        let onnx_path = out_dir.join(&onnx_file);
        let card_path = out_dir.join(&card_file);
        std::fs::rename(staging.join(&onnx_file), &onnx_path).map_err(io(&onnx_path))?;
        if let Err(e) = std::fs::rename(&staged_card, &card_path) {
            let _ = std::fs::remove_file(&onnx_path);
            return Err(io(&card_path)(e));
        }
        Ok(ExportReport {
            onnx_path,
            card_path,
            sha256,
            max_abs_diff_probability: parity.max_abs_diff,
            parity_images: parity_images.len(),
        })
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn validate_request(
    model: &LeukNet,
    name: &str,
    card: &ExportCard,
    parity_images: &[Vec<f32>],
) -> Result<(), ExportError> {
    let invalid = |m: String| Err(ExportError::Invalid(m));
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return invalid(format!(
            "model name {name:?} must be non-empty ASCII letters, digits, '-', '_' or '.', \
             not starting with '.'"
        ));
    }
    if !(card.threshold > 0.0 && card.threshold < 1.0) {
        return invalid(format!(
            "decision threshold {} is not inside (0, 1)",
            card.threshold
        ));
    }
    if model.spec.fault_on_white_input {
        return invalid("fault_on_white_input is a test-fixture feature; never export it".into());
    }
    if !card.reference_images.is_empty() && card.reference_images.len() != parity_images.len() {
        return invalid(format!(
            "{} reference images described for {} parity images",
            card.reference_images.len(),
            parity_images.len()
        ));
    }
    if parity_images.is_empty() {
        return invalid("the parity check needs at least one real preprocessed image".into());
    }
    let side = model.spec.input_size;
    let want = 3 * side * side;
    if let Some((i, img)) = parity_images
        .iter()
        .enumerate()
        .find(|(_, img)| img.len() != want)
    {
        return invalid(format!(
            "parity image {i} has {} values, expected 3 x {side} x {side} = {want}",
            img.len()
        ));
    }
    Ok(())
}

fn write_card(card: &ModelCard, path: &Path) -> std::io::Result<()> {
    let mut json = serde_json::to_string_pretty(card).map_err(std::io::Error::other)?;
    json.push('\n');
    std::fs::write(path, json)
}

/// The data's provenance for the card: `SOURCES.md` beside the manifest (origin, citation and
/// terms of each dataset), verbatim with its sha256, or a note that it was not found.
pub fn card_data_sources(manifest: &Path) -> serde_json::Value {
    let path = manifest.with_file_name("SOURCES.md");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::json!({
            "file": path,
            "sha256": crate::model_card::sha256_hex(text.as_bytes()),
            "text": text,
        }),
        Err(e) => serde_json::json!({"file": path, "error": e.to_string()}),
    }
}

/// The card's known limits (shared by every export path): the measured LODOCV transfer, then what is known of the data.
pub fn card_limitations(
    lodo: &serde_json::Map<String, serde_json::Value>,
    seeds: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    if !lodo.is_empty() {
        let figures: Vec<String> = lodo
            .iter()
            .map(|(set, s)| {
                let pct = |k: &str| {
                    s[k]["mean"]
                        .as_f64()
                        .map_or("n/a".into(), |v| format!("{:.1} %", v * 100.0))
                };
                format!(
                    "{set} {} (AUC {})",
                    pct("balanced_accuracy"),
                    s["auc"]["mean"]
                        .as_f64()
                        .map_or("n/a".into(), |v| format!("{v:.3}"))
                )
            })
            .collect();
        out.push(format!(
            "Transfer to an unseen laboratory is measured by leaving one dataset out (LODOCV): balanced accuracy {}. Expect near-chance answers on images from a source unlike the training sets.",
            figures.join(", ")
        ));
    }
    out.extend([
        "Trained on six small public datasets only; two of the three sets holding leukemic images are single-cell crops and one (ALL-Aria2021) whole low-magnification fields.".to_string(),
        "The ALL-IDB2 copy used is a ~103 px JPEG re-encode of the original 257x257 TIFF cells; DeepAPL labels are per cell type (a leukemic patient's normal-looking cells are labelled as their type), not per patient diagnosis.".to_string(),
        if seeds < 2 {
            "Every LODOCV figure is from one seed: no variance across seeds is known.".to_string()
        } else {
            format!("LODOCV figures are mean ± std over {seeds} seeds.")
        },
        "Research use only: not a medical device, not validated for clinical use.".to_string(),
    ]);
    out
}

/// Streams the graph to `path` while hashing it; returns the sha256.
fn write_onnx(
    spec: &LeukNetSpec,
    weights: &BTreeMap<String, Vec<f32>>,
    path: &Path,
) -> Result<String, ExportError> {
    let io = |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    };
    write_leuknet_file(spec, weights, path).map_err(|e| match e {
        OnnxWriteError::Io(source) => io(source),
        other => ExportError::Onnx(other),
    })
}

fn build_card(
    model: &LeukNet,
    spec: &LeukNetSpec,
    fields: &ExportCard,
    onnx_file: &str,
    sha256: String,
) -> ModelCard {
    let mut architecture = spec.architecture_json();
    architecture.insert("dropout".into(), serde_json::json!(model.dropout));
    architecture.insert(
        "color_normalization".into(),
        fields.color_normalization.clone(),
    );
    architecture.insert(
        "pretrained_weights".into(),
        serde_json::json!(fields.pretrained_weights),
    );
    ModelCard {
        name: onnx_file.trim_end_matches(".onnx").to_string(),
        version: fields.version.clone(),
        description: fields.description.clone(),
        onnx_file: onnx_file.into(),
        sha256,
        input: InputSpec::leuknet(spec.input_size as u32),
        outputs: leuknet_outputs(spec),
        probability_output: PROBABILITY_OUTPUT.into(),
        classes: Classes::leuknet(),
        decision: Decision {
            threshold: fields.threshold,
            chosen_by: fields.threshold_chosen_by.clone(),
            indeterminate: None,
        },
        architecture: architecture.into(),
        training: fields.training.clone(),
        metrics: fields.metrics.clone(),
        intended_use: fields.intended_use.clone(),
        disclaimer: fields.disclaimer.clone(),
        fixture: false,
        limitations: fields.limitations.clone(),
        explain: Some(ExplainSpec::for_spec(spec)),
        ood: None,
    }
}

/// The ONNX Runtime library to load: `LEUKNET_ORT_LIBRARY` if set, else
/// [`DEFAULT_ORT_LIBRARY`] from the working directory, else from this checkout.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("LEUKNET_ORT_LIBRARY") {
        return PathBuf::from(p);
    }
    let relative = PathBuf::from(DEFAULT_ORT_LIBRARY);
    if relative.is_file() {
        return relative;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_ORT_LIBRARY)
}

/// Loads the card at `card_path` and its ONNX file as the server does (sha256 and graph checked,
/// ONNX Runtime CPU provider) and compares its probabilities with `model`'s eval-mode tch
/// probabilities on `images` (CHW `[0, 1]` tensors). Returns the comparison; the caller decides
/// what difference is acceptable ([`export`] uses [`PARITY_TOLERANCE`]).
pub fn check_parity(
    model: &LeukNet,
    card_path: &Path,
    images: &[Vec<f32>],
) -> Result<Parity, ExportError> {
    engine::init_runtime(&ort_library())?;
    let options = EngineOptions {
        device: engine::Device::Cpu,
        intra_threads: 0,
    };
    let (card, mut session) = engine::load_from_card(card_path, &options)?;
    let side = card.input.size as usize;
    let image_len = 3 * side * side;
    if let Some(i) = images.iter().position(|img| img.len() != image_len) {
        return Err(ExportError::Invalid(format!(
            "parity image {i} has {} values, the card's input needs {image_len}",
            images[i].len()
        )));
    }
    let mut onnx = Vec::with_capacity(images.len());
    let mut torch = Vec::with_capacity(images.len());
    for chunk in images.chunks(PARITY_BATCH) {
        let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
        let x = Tensor::from_slice(&flat).view([chunk.len() as i64, 3, side as i64, side as i64]);
        let p = model.predict(&x).to_device(tch::Device::Cpu).contiguous();
        torch.extend(Vec::<f32>::try_from(&p)?);
        onnx.extend(session.run(flat, chunk.len())?);
    }
    let mut max_abs_diff = 0.0f32;
    let mut worst_image = 0;
    for (i, (a, b)) in onnx.iter().zip(&torch).enumerate() {
        let d = (a - b).abs();
        let d = if d.is_nan() { f32::INFINITY } else { d };
        if d > max_abs_diff {
            max_abs_diff = d;
            worst_image = i;
        }
    }
    Ok(Parity {
        max_abs_diff,
        worst_image,
        onnx,
        tch: torch,
    })
}
