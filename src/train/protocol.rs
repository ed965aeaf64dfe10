//! Evaluation protocols (paper III-E): LODOCV and stratified k-fold, each run R times with
//! different seeds; the decision threshold and the Platt calibration are chosen on training
//! data only (never on the test set), by leave-one-source-out inside the training datasets.

use super::data::{has_both_classes, inner_source_folds, Sample, Split};
use super::eval_metrics::{
    apply_platt, best_threshold_balanced_accuracy, binary_metrics, fit_platt, roc_curve,
    BinaryMetrics,
};
use super::finetune::{hash_indices, predict_logits, train, Context, TrainError, TrainOptions};
use super::model::LeukNet;
use super::report::{RunRecord, StorageCheck};
use crate::onnx::WeightStorage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the decision threshold (and calibration) is chosen, on training data only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThresholdRule {
    /// A fixed threshold on the uncalibrated probability.
    Fixed(f32),
    /// Platt fit and balanced-accuracy threshold on the training images' own predictions
    /// (cheap, optimistic: the model has seen them).
    TrainSet,
    /// Platt fit and balanced-accuracy threshold on out-of-source predictions: one extra model
    /// per training source, trained without that source and predicting it.
    InnerSources,
    /// As `InnerSources`, with only the training sources that hold both classes predicted (a
    /// one-class source cannot rank): fewer extra models, fitted where both classes are.
    InnerBothClassSources,
}

/// A Platt calibration `p = sigmoid(a * logit + b)` and the threshold on `p`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub platt_a: f32,
    pub platt_b: f32,
    pub threshold: f32,
    /// Out-of-source (or training) predictions the choice was made on.
    pub fitted_on: usize,
}

impl Decision {
    /// Calibrated probabilities.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f32> {
        apply_platt(logits, self.platt_a, self.platt_b)
    }
}

fn labels(samples: &[Sample], idx: &[usize]) -> Vec<u8> {
    idx.iter().map(|&i| samples[i].label).collect()
}

fn fit_decision(logits: &[f32], y: &[u8]) -> Decision {
    let (a, b) = fit_platt(logits, y);
    let p = apply_platt(logits, a, b);
    Decision {
        platt_a: a,
        platt_b: b,
        threshold: best_threshold_balanced_accuracy(y, &p),
        fitted_on: y.len(),
    }
}

/// The decision fitted on the training images' own predictions ([`ThresholdRule::TrainSet`]).
fn train_set_decision(
    ctx: &Context,
    model: &LeukNet,
    opts: &TrainOptions,
    train_idx: &[usize],
) -> Decision {
    let (kept, logits) = predict_logits(ctx, model, opts, train_idx);
    fit_decision(&logits, &labels(ctx.samples, &kept))
}

/// The decision fitted on out-of-source predictions, or `None` where its Platt slope is not
/// positive: the predictions rank the classes the wrong way round (e.g. an inner fold left with
/// one leukemic source, whose models learn that source), and calibrating on them would invert
/// the model.
pub fn out_of_source_decision(logits: &[f32], y: &[u8]) -> Option<Decision> {
    let d = fit_decision(logits, y);
    (d.platt_a > 0.0).then_some(d)
}

/// One training source predicted by a model trained without it, scored with the decision that
/// an inner-source rule took from all of them (or, where it fell back, from the training
/// images): the evidence the threshold rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InnerSourceCheck {
    pub dataset: String,
    pub metrics: BinaryMetrics,
}

/// A decision and, for the inner-source rules, the out-of-source evaluations it was chosen on
/// (empty for the other rules).
#[derive(Debug, Clone)]
pub struct Chosen {
    pub decision: Decision,
    /// The rule that gave `decision`: the one asked for, or [`ThresholdRule::TrainSet`] where
    /// the out-of-source predictions ranked the classes the wrong way round.
    pub rule: ThresholdRule,
    pub inner_sources: Vec<InnerSourceCheck>,
}

/// Chooses the decision for a model trained on `train_idx`, following `rule`. With
/// `checkpoint_root`, the inner models of the inner-source rules are checkpointed
/// (and resumed) in `<root>/`[`inner_checkpoint_name`].
pub fn choose_decision(
    ctx: &Context,
    model: &LeukNet,
    opts: &TrainOptions,
    train_idx: &[usize],
    rule: ThresholdRule,
    label: &str,
    checkpoint_root: Option<&Path>,
) -> Result<Chosen, TrainError> {
    let decision_only = |decision| Chosen {
        decision,
        rule,
        inner_sources: Vec::new(),
    };
    match rule {
        ThresholdRule::Fixed(t) => Ok(decision_only(Decision {
            platt_a: 1.0,
            platt_b: 0.0,
            threshold: t,
            fitted_on: 0,
        })),
        ThresholdRule::TrainSet => Ok(decision_only(train_set_decision(
            ctx, model, opts, train_idx,
        ))),
        ThresholdRule::InnerSources | ThresholdRule::InnerBothClassSources => {
            let mut folds = Vec::new();
            let inner_folds = inner_source_folds(ctx.samples, train_idx)
                .into_iter()
                .filter(|f| {
                    rule == ThresholdRule::InnerSources || has_both_classes(ctx.samples, &f.test)
                });
            for inner in inner_folds {
                let name = format!("{label}-{}", inner.name);
                let ckpt = checkpoint_root
                    .map(|r| r.join(inner_checkpoint_name(ctx.samples, &inner.train, opts.seed)));
                let (m, _) = train(ctx, &inner.train, opts, &name, ckpt.as_deref())?;
                let (kept, logits) = predict_logits(ctx, &m, opts, &inner.test);
                let dataset = inner.test_dataset.unwrap_or(inner.name);
                folds.push((dataset, labels(ctx.samples, &kept), logits));
            }
            let all_logits: Vec<f32> = folds.iter().flat_map(|f| f.2.iter().copied()).collect();
            let all_y: Vec<u8> = folds.iter().flat_map(|f| f.1.iter().copied()).collect();
            let (decision, used) = match out_of_source_decision(&all_logits, &all_y) {
                Some(d) => (d, rule),
                None => {
                    tracing::warn!(
                        run = label,
                        "out-of-source predictions rank the classes the wrong way round; threshold and calibration from the training images instead"
                    );
                    let d = train_set_decision(ctx, model, opts, train_idx);
                    (d, ThresholdRule::TrainSet)
                }
            };
            let inner_sources = folds
                .into_iter()
                .map(|(dataset, y, logits)| InnerSourceCheck {
                    metrics: binary_metrics(
                        &y,
                        &decision.probabilities(&logits),
                        decision.threshold,
                    ),
                    dataset,
                })
                .collect();
            Ok(Chosen {
                decision,
                rule: used,
                inner_sources,
            })
        }
    }
}

/// The checkpoint folder of an inner model, named after what it is trained on rather than after
/// its outer run: `inner-s<seed>-without-<the sources it lacks, sorted, joined by +>-<hash of its
/// samples>`. Under leave-one-source-out the inner model of outer set A without B and that of B
/// without A train on the same sources; with one folder they are trained once (a resumed
/// [`train`] still checks the options and the exact samples before it reuses a checkpoint).
pub fn inner_checkpoint_name(samples: &[Sample], train: &[usize], seed: u64) -> String {
    let present: std::collections::BTreeSet<&str> =
        train.iter().map(|&i| samples[i].dataset.as_str()).collect();
    let absent: std::collections::BTreeSet<&str> = samples
        .iter()
        .map(|s| s.dataset.as_str())
        .filter(|d| !present.contains(d))
        .collect();
    let mut sorted = train.to_vec();
    sorted.sort_unstable();
    let hash = hash_indices(samples, &sorted);
    let absent: Vec<&str> = absent.into_iter().collect();
    format!("inner-s{seed}-without-{}-{}", absent.join("+"), &hash[..12])
}

/// What storing `model`'s weights as `storage` changes on the test samples `test_idx`: both the
/// f32 model and its [`LeukNet::rounded_copy`] run the whole network on the plain images (no
/// activation cache, so both see exactly what an exported graph sees), with the same decision.
pub fn check_storage(
    ctx: &Context,
    model: &LeukNet,
    opts: &TrainOptions,
    decision: &Decision,
    test_idx: &[usize],
    storage: WeightStorage,
) -> Result<StorageCheck, TrainError> {
    let whole = Context {
        samples: ctx.samples,
        images: ctx.images,
        cache: None,
        init: ctx.init,
        device: ctx.device,
    };
    let rounded = model.rounded_copy(storage)?;
    let evaluate = |m: &LeukNet| -> (Vec<f32>, BinaryMetrics) {
        let (kept, logits) = predict_logits(&whole, m, opts, test_idx);
        let p = decision.probabilities(&logits);
        let metrics = binary_metrics(&labels(ctx.samples, &kept), &p, decision.threshold);
        (p, metrics)
    };
    let (p32, fp32) = evaluate(model);
    let (ps, stored) = evaluate(&rounded);
    let max_abs_diff_probability = p32
        .iter()
        .zip(&ps)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let changed_decisions = p32
        .iter()
        .zip(&ps)
        .filter(|(a, b)| (**a >= decision.threshold) != (**b >= decision.threshold))
        .count();
    Ok(StorageCheck {
        storage,
        fp32,
        stored,
        max_abs_diff_probability,
        changed_decisions,
    })
}

/// Whether two evaluations are of the same predictions: identical confusion matrices and AUC
/// equal to 1e-9 (a JSON round trip may move a float by one ulp).
fn same_evaluation(a: &BinaryMetrics, b: &BinaryMetrics) -> bool {
    let auc = match (a.auc, b.auc) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-9,
        (None, None) => true,
        _ => false,
    };
    a.confusion == b.confusion && a.n == b.n && auc
}

/// Trains on a split, chooses the decision on its training side, evaluates on its test side;
/// with `storage` (other than fp32), also measures what that weight storage changes there
/// ([`check_storage`]), or reuses `previous`'s check when `previous` (this split's record in an
/// earlier report) has exactly the same test metrics.
#[allow(clippy::too_many_arguments)]
pub fn run_split(
    ctx: &Context,
    split: &Split,
    protocol: &str,
    opts: &TrainOptions,
    rule: ThresholdRule,
    checkpoint_root: Option<&Path>,
    storage: WeightStorage,
    previous: Option<&RunRecord>,
) -> Result<(RunRecord, Decision, LeukNet), TrainError> {
    let label = format!("{}-s{}", split.name, opts.seed);
    let ckpt = checkpoint_root.map(|r| r.join(&label));
    let (model, curve) = train(ctx, &split.train, opts, &label, ckpt.as_deref())?;
    let Chosen {
        decision,
        rule: rule_used,
        inner_sources,
    } = choose_decision(
        ctx,
        &model,
        opts,
        &split.train,
        rule,
        &label,
        checkpoint_root,
    )?;
    for check in &inner_sources {
        tracing::info!(
            split = %split.name,
            inner_source = %check.dataset,
            n = check.metrics.n,
            accuracy = check.metrics.accuracy,
            balanced_accuracy = check.metrics.balanced_accuracy,
            auc = ?check.metrics.auc,
            "out-of-source prediction behind the threshold"
        );
    }
    let (kept, logits) = predict_logits(ctx, &model, opts, &split.test);
    let y = labels(ctx.samples, &kept);
    let p = decision.probabilities(&logits);
    let metrics = binary_metrics(&y, &p, decision.threshold);
    let roc = roc_curve(&y, &p)
        .into_iter()
        .map(|(f, t, _)| (f, t))
        .collect();
    tracing::info!(
        split = %split.name,
        seed = opts.seed,
        accuracy = metrics.accuracy,
        balanced_accuracy = metrics.balanced_accuracy,
        auc = ?metrics.auc,
        threshold = decision.threshold,
        "split evaluated"
    );
    // A resumed run whose test metrics are exactly those of an earlier report evaluated the same
    // model with the same decision: its storage check (two whole-network passes) is reused.
    let earlier = previous
        .filter(|r| same_evaluation(&r.metrics, &metrics))
        .and_then(|r| r.storage_check.clone())
        .filter(|c| c.storage == storage);
    let storage_check = if storage == WeightStorage::Fp32 {
        None
    } else if let Some(check) = earlier {
        tracing::info!(split = %split.name, %storage, "weight storage check reused from the earlier report");
        Some(check)
    } else {
        let check = check_storage(ctx, &model, opts, &decision, &split.test, storage)?;
        tracing::info!(
            split = %split.name,
            %storage,
            fp32_balanced_accuracy = check.fp32.balanced_accuracy,
            stored_balanced_accuracy = check.stored.balanced_accuracy,
            max_abs_diff_probability = check.max_abs_diff_probability,
            "weight storage checked"
        );
        Some(check)
    };
    let record = RunRecord {
        protocol: protocol.to_string(),
        split: split
            .test_dataset
            .clone()
            .unwrap_or_else(|| split.name.clone()),
        seed: opts.seed,
        metrics,
        curve,
        roc,
        storage_check,
        decision: Some(decision),
        threshold_rule: Some(rule_used),
        inner_sources,
    };
    Ok((record, decision, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::train::data::test_sample as sample;

    #[test]
    fn inner_models_on_the_same_sources_share_one_checkpoint() {
        let samples: Vec<Sample> = ["A", "B", "C", "D"]
            .iter()
            .enumerate()
            .flat_map(|(d, name)| (0..3).map(move |i| sample(name, d * 3 + i)))
            .collect();
        let without = |out: &[&str]| -> Vec<usize> {
            (0..samples.len())
                .filter(|&i| !out.contains(&samples[i].dataset.as_str()))
                .collect()
        };
        // Outer A, inner B and outer B, inner A: the same training set, in any order.
        let ab = inner_checkpoint_name(&samples, &without(&["A", "B"]), 4);
        let mut reversed = without(&["B", "A"]);
        reversed.reverse();
        assert_eq!(ab, inner_checkpoint_name(&samples, &reversed, 4));
        assert!(ab.starts_with("inner-s4-without-A+B-"), "{ab}");
        // Another seed, another source left out, or one sample fewer: another folder.
        assert_ne!(
            ab,
            inner_checkpoint_name(&samples, &without(&["A", "B"]), 5)
        );
        assert_ne!(
            ab,
            inner_checkpoint_name(&samples, &without(&["A", "C"]), 4)
        );
        let fewer = &without(&["A", "B"])[1..];
        let other = inner_checkpoint_name(&samples, fewer, 4);
        assert!(
            other.starts_with("inner-s4-without-A+B-") && other != ab,
            "{other}"
        );
    }
}
