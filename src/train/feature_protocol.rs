//! The feature-space analysis (paper IV-C) and the Vogado et al. 2018 baseline (paper Table
//! VIII) run on the same splits as the networks:
//!
//! - `leuknet-penultimate`: each LODOCV model's own penultimate features (256 for the paper's
//!   head) of its training and test images, a linear SVM fitted on the training side
//!   ([`pca_svm`], PCA only when the features are wider than [`PCA_COMPONENTS`]).
//! - `imagenet-gap`: the Vogado-style baseline: frozen ImageNet VGG-16 conv features (the last
//!   block's output averaged over space, 512 values: only the 13 conv layers' ImageNet weights
//!   are reachable, not VGG's fully connected ones), standardised, PCA to 100, linear SVM, under
//!   LODOCV and stratified k-fold. Vogado et al. used AlexNet/CaffeNet/VGG-f fully connected
//!   features with feature selection; this is the closest reproduction our weights allow.
//!
//! Features come from view 0 (the plain image) of each sample, through the activation cache
//! when the run has one, so the frozen layers are never recomputed.

use super::data::{Sample, Split};
use super::features::{pca_svm, tsne_plot, FeatureResult, PCA_COMPONENTS};
use super::finetune::{fresh_model, Context, TrainError, TrainOptions};
use super::model::{Init, LeukNet, Stage};
use super::pipeline::{progress, view, SIZE};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// Name of the LeukNet penultimate-feature rows in reports.
pub const LEUKNET_FEATURES: &str = "leuknet-penultimate";
/// Name of the frozen ImageNet (Vogado-style) feature rows in reports.
pub const IMAGENET_FEATURES: &str = "imagenet-gap";
/// Name of the same rows when the run's init is not ImageNet (random frozen conv weights).
pub const UNTRAINED_FEATURES: &str = "untrained-gap";
/// Features of each sample (`None` where the image did not decode), indexed like the samples.
pub type SampleFeatures = Vec<Option<Vec<f32>>>;

/// At most this many points go into one t-SNE plot (an even subsample, in sample order).
pub const TSNE_MAX_POINTS: usize = 1200;

/// One SVM evaluation on one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureRun {
    /// [`LEUKNET_FEATURES`] or [`IMAGENET_FEATURES`].
    pub features: String,
    /// `lodo` or `kfold`.
    pub protocol: String,
    /// Test set (LODOCV) or fold name.
    pub split: String,
    pub seed: u64,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub kappa: f64,
    pub auc: Option<f64>,
    /// PCA components used (0 = none).
    pub components: usize,
    pub n_test: usize,
    /// How well the source dataset can be read from the same features
    /// ([`source_predictability`]), over every sample the features were computed for.
    #[serde(default)]
    pub source_accuracy: Option<f64>,
}

impl FeatureRun {
    fn new(features: &str, protocol: &str, split: &Split, seed: u64, r: &FeatureResult) -> Self {
        Self {
            features: features.into(),
            protocol: protocol.into(),
            split: split
                .test_dataset
                .clone()
                .unwrap_or_else(|| split.name.clone()),
            seed,
            accuracy: r.accuracy,
            balanced_accuracy: r.balanced_accuracy,
            kappa: r.kappa,
            auc: r.auc,
            components: r.components_used,
            n_test: r.predictions.len(),
            source_accuracy: None,
        }
    }
}

/// Features of view 0 of every sample in `indices` (`None` where the image did not decode),
/// computed by `f` from activations at the run's stage (cache rows when there is a cache).
fn extract(
    ctx: &Context,
    opts: &TrainOptions,
    indices: &[usize],
    what: &str,
    f: impl Fn(&Tensor, Stage) -> Tensor,
) -> SampleFeatures {
    let mut out = vec![None; ctx.samples.len()];
    let kept: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| ctx.images.images[i].is_some())
        .collect();
    let pb = progress(kept.len() as u64, what);
    for chunk in kept.chunks(32) {
        pb.inc(chunk.len() as u64);
        let keys: Vec<(usize, usize)> = chunk.iter().map(|&i| (i, 0)).collect();
        let (x, stage) = match ctx.cache {
            Some(cache) => match cache.batch(&keys, ctx.device) {
                Some(x) => (x, cache.stage),
                None => continue,
            },
            None => {
                let flat: Vec<f32> = chunk
                    .iter()
                    .filter_map(|&i| view(ctx.images, i, 0, &opts.augmenter, &opts.color_norm, 0))
                    .flatten()
                    .collect();
                let x = Tensor::from_slice(&flat).view([-1, 3, SIZE as i64, SIZE as i64]);
                (x, Stage::Input)
            }
        };
        let y = tch::no_grad(|| f(&x, stage))
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous();
        let width = y.size().get(1).copied().unwrap_or(0) as usize;
        let flat = Vec::<f32>::try_from(&y.view([-1])).unwrap_or_default();
        for (&i, row) in chunk.iter().zip(flat.chunks(width.max(1))) {
            out[i] = Some(row.to_vec());
        }
    }
    pb.finish_and_clear();
    out
}

/// The penultimate features of `model` for every sample of `split` (train and test).
pub fn penultimate(
    ctx: &Context,
    model: &LeukNet,
    opts: &TrainOptions,
    split: &Split,
) -> SampleFeatures {
    let all: Vec<usize> = split.train.iter().chain(&split.test).copied().collect();
    extract(ctx, opts, &all, "features", |x, stage| {
        model.features_from(x, stage)
    })
}

/// Frozen conv features (spatially averaged last block) of every sample, from the run's init,
/// and their report name: [`IMAGENET_FEATURES`], or [`UNTRAINED_FEATURES`] for a scratch init.
pub fn imagenet_gap(
    ctx: &Context,
    opts: &TrainOptions,
) -> Result<(&'static str, SampleFeatures), TrainError> {
    let model = fresh_model(opts, ctx.init, ctx.device)?;
    let name = match ctx.init {
        Init::ImageNet(_) => IMAGENET_FEATURES,
        Init::Scratch => UNTRAINED_FEATURES,
    };
    let all: Vec<usize> = (0..ctx.samples.len()).collect();
    let features = extract(ctx, opts, &all, "frozen conv", |x, stage| {
        model.pooled_backbone_from(x, stage)
    });
    Ok((name, features))
}

/// Fits the SVM on `split.train`'s features and evaluates it on `split.test`'s; samples
/// without features are left out. PCA to [`PCA_COMPONENTS`] when the features are wider.
pub fn svm_on_split(
    samples: &[Sample],
    features: &[Option<Vec<f32>>],
    split: &Split,
) -> Result<FeatureResult> {
    let side = |idx: &[usize]| -> (Vec<Vec<f32>>, Vec<u8>) {
        idx.iter()
            .filter_map(|&i| features[i].clone().map(|f| (f, samples[i].label)))
            .unzip()
    };
    let (train_x, train_y) = side(&split.train);
    let (test_x, test_y) = side(&split.test);
    let width = train_x.first().map_or(0, Vec::len);
    let components = if width > PCA_COMPONENTS {
        PCA_COMPONENTS
    } else {
        0
    };
    pca_svm(&train_x, &train_y, &test_x, &test_y, components)
}

/// Folds of [`source_predictability`].
pub const SOURCE_FOLDS: usize = 5;

/// How well the source dataset can be read from `features`: the accuracy of a nearest-centroid
/// classifier of the dataset (features standardised over the samples used), [`SOURCE_FOLDS`]-fold
/// by sample position, over the samples of `indices` that have features. `None` with fewer than
/// two datasets or too few samples. (Chance is the largest dataset's share.)
pub fn source_predictability(
    samples: &[Sample],
    features: &[Option<Vec<f32>>],
    indices: &[usize],
) -> Option<f64> {
    let rows: Vec<(&Vec<f32>, &str)> = indices
        .iter()
        .filter_map(|&i| {
            features[i]
                .as_ref()
                .map(|f| (f, samples[i].dataset.as_str()))
        })
        .collect();
    let mut names: Vec<&str> = rows.iter().map(|r| r.1).collect();
    names.sort_unstable();
    names.dedup();
    let width = rows.first()?.0.len();
    if names.len() < 2 || rows.len() < 2 * SOURCE_FOLDS || width == 0 {
        return None;
    }
    let n = rows.len() as f64;
    let mut mean = vec![0.0f64; width];
    for (f, _) in &rows {
        for (m, v) in mean.iter_mut().zip(f.iter()) {
            *m += f64::from(*v) / n;
        }
    }
    let mut sd = vec![0.0f64; width];
    for (f, _) in &rows {
        for ((s, v), m) in sd.iter_mut().zip(f.iter()).zip(&mean) {
            *s += (f64::from(*v) - m).powi(2) / n;
        }
    }
    let scale: Vec<f64> = sd
        .iter()
        .map(|s| if *s > 0.0 { 1.0 / s.sqrt() } else { 0.0 })
        .collect();
    let z = |f: &[f32]| -> Vec<f64> {
        f.iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((v, m), s)| (f64::from(*v) - m) * s)
            .collect()
    };
    let zs: Vec<(Vec<f64>, usize)> = rows
        .iter()
        .map(|(f, d)| (z(f), names.iter().position(|x| x == d).unwrap_or(0)))
        .collect();
    let mut correct = 0usize;
    for fold in 0..SOURCE_FOLDS {
        let mut sums = vec![vec![0.0f64; width]; names.len()];
        let mut counts = vec![0usize; names.len()];
        for (k, (x, d)) in zs.iter().enumerate() {
            if k % SOURCE_FOLDS != fold {
                counts[*d] += 1;
                for (s, v) in sums[*d].iter_mut().zip(x) {
                    *s += v;
                }
            }
        }
        for (k, (x, d)) in zs.iter().enumerate() {
            if k % SOURCE_FOLDS != fold {
                continue;
            }
            let best = (0..names.len())
                .filter(|&c| counts[c] > 0)
                .map(|c| {
                    let dist: f64 = sums[c]
                        .iter()
                        .zip(x)
                        .map(|(s, v)| (s / counts[c] as f64 - v).powi(2))
                        .sum();
                    (c, dist)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(c, _)| c);
            correct += usize::from(best == Some(*d));
        }
    }
    Some(correct as f64 / n)
}

/// A t-SNE plot of the features of (an even subsample of) `indices`.
pub fn plot(
    samples: &[Sample],
    features: &[Option<Vec<f32>>],
    indices: &[usize],
    path_png: &Path,
) -> Result<()> {
    let have: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| features[i].is_some())
        .collect();
    let step = have.len().div_ceil(TSNE_MAX_POINTS).max(1);
    let chosen: Vec<usize> = have.into_iter().step_by(step).collect();
    let x: Vec<Vec<f32>> = chosen.iter().filter_map(|&i| features[i].clone()).collect();
    let y: Vec<u8> = chosen.iter().map(|&i| samples[i].label).collect();
    let ds: Vec<String> = chosen.iter().map(|&i| samples[i].dataset.clone()).collect();
    tsne_plot(&x, &y, &ds, path_png, 30.0)?;
    Ok(())
}

/// A Markdown table of the runs: one row per (features, protocol, test set or "all folds"),
/// mean ± sample std over its runs of accuracy, balanced accuracy, AUC and kappa.
pub fn markdown(runs: &[FeatureRun]) -> String {
    use super::eval_metrics::mean_std;
    let mut out = String::from(
        "\n### Feature space (paper IV-C) and the Vogado et al. baseline (paper Table VIII)\n\n\
         | features | protocol | test set | runs | accuracy % | balanced accuracy % | AUC | kappa | source readable % |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in runs {
        let split = if r.protocol == "kfold" {
            "all folds".to_string()
        } else {
            r.split.clone()
        };
        let key = (r.features.clone(), r.protocol.clone(), split);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (features, protocol, split) in keys {
        let rows: Vec<&FeatureRun> = runs
            .iter()
            .filter(|r| {
                r.features == features
                    && r.protocol == protocol
                    && (protocol == "kfold" || r.split == split)
            })
            .collect();
        let cell = |v: Vec<f64>, scale: f64, digits: usize| {
            let m = mean_std(&v);
            if m.n == 0 {
                "n/a".to_string()
            } else {
                format!(
                    "{:.*} ± {:.*}",
                    digits,
                    m.mean * scale,
                    digits,
                    m.std * scale
                )
            }
        };
        out.push_str(&format!(
            "| {features} | {protocol} | {split} | {} | {} | {} | {} | {} | {} |\n",
            rows.len(),
            cell(rows.iter().map(|r| r.accuracy).collect(), 100.0, 2),
            cell(rows.iter().map(|r| r.balanced_accuracy).collect(), 100.0, 2),
            cell(rows.iter().filter_map(|r| r.auc).collect(), 1.0, 3),
            cell(rows.iter().map(|r| r.kappa).collect(), 1.0, 3),
            cell(
                rows.iter().filter_map(|r| r.source_accuracy).collect(),
                100.0,
                1
            ),
        ));
    }
    out
}

/// Runs the Vogado-style baseline under LODOCV (`lodo`) and stratified k-fold (`kfold`).
pub fn frozen_baseline(
    name: &str,
    samples: &[Sample],
    features: &[Option<Vec<f32>>],
    lodo: &[Split],
    kfold: &[Split],
    seed: u64,
) -> Result<Vec<FeatureRun>> {
    let mut runs = Vec::new();
    let all: Vec<usize> = (0..samples.len()).collect();
    let source_accuracy = source_predictability(samples, features, &all);
    for (protocol, splits) in [("lodo", lodo), ("kfold", kfold)] {
        for split in splits {
            let r = svm_on_split(samples, features, split)?;
            let mut run = FeatureRun::new(name, protocol, split, seed, &r);
            run.source_accuracy = source_accuracy;
            tracing::info!(
                features = name,
                protocol,
                split = %run.split,
                accuracy = run.accuracy,
                balanced_accuracy = run.balanced_accuracy,
                "feature SVM evaluated"
            );
            runs.push(run);
        }
    }
    Ok(runs)
}

/// The penultimate-feature SVM of one trained LODOCV model on its own split.
pub fn leuknet_run(
    samples: &[Sample],
    features: &[Option<Vec<f32>>],
    split: &Split,
    seed: u64,
) -> Result<FeatureRun> {
    let r = svm_on_split(samples, features, split)?;
    let mut run = FeatureRun::new(LEUKNET_FEATURES, "lodo", split, seed, &r);
    let all: Vec<usize> = split.train.iter().chain(&split.test).copied().collect();
    run.source_accuracy = source_predictability(samples, features, &all);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::train::data::test_sample as sample;

    #[test]
    fn source_is_readable_from_separated_features_and_not_from_identical_ones() {
        let samples: Vec<Sample> = (0..40)
            .map(|k| sample(if k < 20 { "a" } else { "b" }, k))
            .collect();
        let all: Vec<usize> = (0..samples.len()).collect();
        let separated: SampleFeatures = (0..40)
            .map(|k| Some(vec![if k < 20 { 0.0 } else { 10.0 } + (k % 3) as f32, 1.0]))
            .collect();
        assert_eq!(source_predictability(&samples, &separated, &all), Some(1.0));
        let identical: SampleFeatures = (0..40).map(|_| Some(vec![1.0, 2.0])).collect();
        let acc = source_predictability(&samples, &identical, &all).expect("computed");
        assert!((acc - 0.5).abs() < 1e-9, "ties fall to one class: {acc}");
        let one_source: Vec<usize> = (0..20).collect();
        assert_eq!(
            source_predictability(&samples, &separated, &one_source),
            None
        );
    }
}
