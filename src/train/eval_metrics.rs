//! Binary classification metrics as the paper reports them, plus calibration.
//!
//! Conventions, used everywhere in this module:
//! - Label `1` is the positive class (pathological, leukemic); label `0` is healthy. Any non-zero
//!   label counts as `1`.
//! - A probability `p` is the model's probability of class 1; a sample is predicted positive
//!   when `p >= threshold`.
//! - Every ratio whose denominator is zero is defined as `0.0` (never NaN, so that reports stay
//!   valid JSON): precision with no positive predictions, recall with no positive labels,
//!   specificity with no negative labels, F1 when `2tp + fp + fn = 0`, accuracy of an empty set.
//!   Balanced accuracy averages recall over the classes *present in the labels* (as scikit-learn
//!   does), so a single-class test set gets that class's recall. Cohen's kappa is `0.0` when the
//!   expected agreement is 1 (both the labels and the predictions constant and equal), because
//!   there is no agreement beyond chance to measure. ROC AUC is `None` when only one class is
//!   present.
//! - Calibration error (ECE) is the positive-class reliability version: equal-width bins over
//!   `p`, `sum_b |B_b| / n * |mean(y in b) - mean(p in b)|`, with [`ECE_BINS`] bins in
//!   [`binary_metrics`].

use serde::{Deserialize, Serialize};

/// Number of equal-width bins used for the ECE in [`binary_metrics`].
pub const ECE_BINS: usize = 10;

/// Counts of a binary confusion matrix (positive = label 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    /// False negatives (`fn` is a keyword).
    pub fn_: usize,
}

impl Confusion {
    /// Counts from labels and hard predictions (non-zero = positive). Panics on length mismatch.
    pub fn from_predictions(labels: &[u8], predictions: &[u8]) -> Self {
        assert_eq!(
            labels.len(),
            predictions.len(),
            "labels and predictions differ in length"
        );
        let mut c = Confusion::default();
        for (&y, &p) in labels.iter().zip(predictions) {
            match (y != 0, p != 0) {
                (true, true) => c.tp += 1,
                (false, true) => c.fp += 1,
                (false, false) => c.tn += 1,
                (true, false) => c.fn_ += 1,
            }
        }
        c
    }

    /// Counts from labels and probabilities, positive when `p >= threshold`.
    pub fn from_probs(labels: &[u8], probs: &[f32], threshold: f32) -> Self {
        assert_eq!(
            labels.len(),
            probs.len(),
            "labels and probs differ in length"
        );
        let preds: Vec<u8> = probs.iter().map(|&p| u8::from(p >= threshold)).collect();
        Self::from_predictions(labels, &preds)
    }

    /// Total number of samples.
    pub fn n(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// Number of positive labels.
    pub fn positives(&self) -> usize {
        self.tp + self.fn_
    }

    /// Number of negative labels.
    pub fn negatives(&self) -> usize {
        self.tn + self.fp
    }

    /// `(tp + tn) / n`; 0 when empty.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.n())
    }

    /// `tp / (tp + fp)`; 0 when nothing is predicted positive.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// Recall (sensitivity) `tp / (tp + fn)`; 0 when there are no positive labels.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.positives())
    }

    /// Specificity `tn / (tn + fp)`; 0 when there are no negative labels.
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.negatives())
    }

    /// `2tp / (2tp + fp + fn)`; 0 when that denominator is 0.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// Mean of recall and specificity over the classes present in the labels; 0 when empty.
    pub fn balanced_accuracy(&self) -> f64 {
        match (self.positives() > 0, self.negatives() > 0) {
            (true, true) => 0.5 * (self.recall() + self.specificity()),
            (true, false) => self.recall(),
            (false, true) => self.specificity(),
            (false, false) => 0.0,
        }
    }

    /// Cohen's kappa `(po - pe) / (1 - pe)`; 0 when empty or when `pe = 1`. Computed in the
    /// exact binary form `2 (tp tn - fn fp) / ((tp + fp)(fp + tn) + (tp + fn)(fn + tn))`, so
    /// chance-level predictions give exactly 0.
    pub fn kappa(&self) -> f64 {
        let (tp, fp, tn, fn_) = (
            self.tp as f64,
            self.fp as f64,
            self.tn as f64,
            self.fn_ as f64,
        );
        let den = (tp + fp) * (fp + tn) + (tp + fn_) * (fn_ + tn);
        if den == 0.0 {
            0.0
        } else {
            2.0 * (tp * tn - fn_ * fp) / den
        }
    }

    /// Element-wise sum of two confusion matrices.
    pub fn add(&self, other: &Confusion) -> Confusion {
        Confusion {
            tp: self.tp + other.tp,
            fp: self.fp + other.fp,
            tn: self.tn + other.tn,
            fn_: self.fn_ + other.fn_,
        }
    }
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Every metric of one evaluation (one model, one test set, one threshold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub precision: f64,
    /// Sensitivity.
    pub recall: f64,
    pub specificity: f64,
    pub f1: f64,
    /// `None` when the labels hold one class only.
    pub auc: Option<f64>,
    pub kappa: f64,
    /// Expected calibration error with [`ECE_BINS`] bins.
    pub ece: f64,
    pub confusion: Confusion,
    pub n: usize,
}

impl BinaryMetrics {
    /// Metrics from a confusion matrix alone (no scores: `auc = None`, `ece = 0`).
    pub fn from_confusion(confusion: Confusion) -> Self {
        BinaryMetrics {
            accuracy: confusion.accuracy(),
            balanced_accuracy: confusion.balanced_accuracy(),
            precision: confusion.precision(),
            recall: confusion.recall(),
            specificity: confusion.specificity(),
            f1: confusion.f1(),
            auc: None,
            kappa: confusion.kappa(),
            ece: 0.0,
            confusion,
            n: confusion.n(),
        }
    }
}

/// All metrics for labels (0/1) and probabilities of class 1, predicted positive when
/// `p >= threshold`. Panics when the lengths differ.
pub fn binary_metrics(labels: &[u8], probs: &[f32], threshold: f32) -> BinaryMetrics {
    let confusion = Confusion::from_probs(labels, probs, threshold);
    BinaryMetrics {
        auc: roc_auc(labels, probs),
        ece: expected_calibration_error(labels, probs, ECE_BINS),
        ..BinaryMetrics::from_confusion(confusion)
    }
}

/// ROC curve as `(fpr, tpr, threshold)` points, from `(0, 0, +inf)` to `(1, 1, min score)`,
/// one point per distinct score (a sample is positive when `p >= threshold`). Empty when the
/// labels hold one class only (the curve is undefined).
pub fn roc_curve(labels: &[u8], probs: &[f32]) -> Vec<(f64, f64, f32)> {
    assert_eq!(
        labels.len(),
        probs.len(),
        "labels and probs differ in length"
    );
    let pos = labels.iter().filter(|&&y| y != 0).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut out = vec![(0.0, 0.0, f32::INFINITY)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let score = probs[order[i]];
        // Consume every sample tied at this score.
        while i < order.len() && probs[order[i]].total_cmp(&score).is_eq() {
            if labels[order[i]] != 0 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        out.push((fp as f64 / neg as f64, tp as f64 / pos as f64, score));
    }
    out
}

/// Exact ROC AUC as the Mann-Whitney U statistic, `U / (n_pos * n_neg)`, with tied scores
/// given their average rank (a tied positive/negative pair counts 1/2). `None` with one class.
pub fn roc_auc(labels: &[u8], probs: &[f32]) -> Option<f64> {
    assert_eq!(
        labels.len(),
        probs.len(),
        "labels and probs differ in length"
    );
    let n_pos = labels.iter().filter(|&&y| y != 0).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
    // Sum of (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j < order.len() && probs[order[j]].total_cmp(&probs[order[i]]).is_eq() {
            j += 1;
        }
        // Ranks i+1 ..= j share their mean.
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let pos_in_group = order[i..j].iter().filter(|&&k| labels[k] != 0).count();
        rank_sum_pos += avg_rank * pos_in_group as f64;
        i = j;
    }
    let u = rank_sum_pos - (n_pos as f64) * (n_pos as f64 + 1.0) / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Expected calibration error with `bins` equal-width bins over `[0, 1]` of the probability of
/// class 1: `sum_b |B_b| / n * |fraction of positives in b - mean p in b|`. Probabilities are
/// clamped to `[0, 1]`; `p = 1` falls in the last bin. 0 for empty input or `bins = 0`.
pub fn expected_calibration_error(labels: &[u8], probs: &[f32], bins: usize) -> f64 {
    assert_eq!(
        labels.len(),
        probs.len(),
        "labels and probs differ in length"
    );
    if labels.is_empty() || bins == 0 {
        return 0.0;
    }
    let mut count = vec![0usize; bins];
    let mut sum_p = vec![0.0f64; bins];
    let mut sum_y = vec![0.0f64; bins];
    for (&y, &p) in labels.iter().zip(probs) {
        let p = if p.is_nan() {
            0.0
        } else {
            f64::from(p).clamp(0.0, 1.0)
        };
        let b = ((p * bins as f64).floor() as usize).min(bins - 1);
        count[b] += 1;
        sum_p[b] += p;
        sum_y[b] += f64::from(u8::from(y != 0));
    }
    let n = labels.len() as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let c = count[b] as f64;
            c / n * (sum_y[b] / c - sum_p[b] / c).abs()
        })
        .sum()
}

/// The decision threshold that maximises balanced accuracy on `(labels, probs)`, meant to be
/// chosen on training/validation folds and then applied unchanged to the test set.
///
/// Candidates are the midpoints between consecutive distinct scores (so the threshold keeps a
/// margin on both sides). Ties in balanced accuracy go to the candidate closest to 0.5, and 0.5
/// itself is returned when no split beats chance (including when one class is missing or the
/// input is empty).
pub fn best_threshold_balanced_accuracy(labels: &[u8], probs: &[f32]) -> f32 {
    assert_eq!(
        labels.len(),
        probs.len(),
        "labels and probs differ in length"
    );
    let n_pos = labels.iter().filter(|&&y| y != 0).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return 0.5;
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
    let (mut best_ba, mut best_t) = (0.5f64, 0.5f32);
    // Samples strictly below the current split are predicted negative.
    let (mut pos_below, mut neg_below) = (0usize, 0usize);
    for i in 1..order.len() {
        if labels[order[i - 1]] != 0 {
            pos_below += 1;
        } else {
            neg_below += 1;
        }
        let (lo, hi) = (probs[order[i - 1]], probs[order[i]]);
        if lo.total_cmp(&hi).is_ge() {
            continue; // not a split between distinct scores
        }
        let tpr = (n_pos - pos_below) as f64 / n_pos as f64;
        let tnr = neg_below as f64 / n_neg as f64;
        let ba = 0.5 * (tpr + tnr);
        let mut t = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32;
        if t <= lo || t > hi {
            t = hi; // `p >= hi` selects exactly the samples at or above the split
        }
        let better = ba > best_ba + 1e-12
            || ((ba - best_ba).abs() <= 1e-12 && (t - 0.5).abs() < (best_t - 0.5).abs());
        if better {
            best_ba = ba;
            best_t = t;
        }
    }
    best_t
}

/// Mean and sample standard deviation of a set of values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    /// Sample standard deviation (divides by `n - 1`); 0 when `n <= 1`.
    pub std: f64,
    pub n: usize,
}

/// Mean and sample standard deviation (`n - 1`); `std = 0` for `n = 1`, all zero for `n = 0`.
pub fn mean_std(values: &[f64]) -> MeanStd {
    let n = values.len();
    if n == 0 {
        return MeanStd::default();
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std = if n == 1 {
        0.0
    } else {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    MeanStd { mean, std, n }
}

/// Mean ± std over runs of every field of [`BinaryMetrics`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSummary {
    pub accuracy: MeanStd,
    pub balanced_accuracy: MeanStd,
    pub precision: MeanStd,
    pub recall: MeanStd,
    pub specificity: MeanStd,
    pub f1: MeanStd,
    /// Over the runs whose AUC is defined (`auc.n` says how many).
    pub auc: MeanStd,
    pub kappa: MeanStd,
    pub ece: MeanStd,
    pub tp: MeanStd,
    pub fp: MeanStd,
    pub tn: MeanStd,
    pub fn_: MeanStd,
    /// Test-set size.
    pub n: MeanStd,
    /// Number of runs summarised.
    pub runs: usize,
}

/// Mean ± sample std of every metric across runs (seeds, folds).
pub fn summarize(runs: &[BinaryMetrics]) -> MetricsSummary {
    let field = |f: &dyn Fn(&BinaryMetrics) -> f64| -> MeanStd {
        mean_std(&runs.iter().map(f).collect::<Vec<_>>())
    };
    let aucs: Vec<f64> = runs.iter().filter_map(|m| m.auc).collect();
    MetricsSummary {
        accuracy: field(&|m| m.accuracy),
        balanced_accuracy: field(&|m| m.balanced_accuracy),
        precision: field(&|m| m.precision),
        recall: field(&|m| m.recall),
        specificity: field(&|m| m.specificity),
        f1: field(&|m| m.f1),
        auc: mean_std(&aucs),
        kappa: field(&|m| m.kappa),
        ece: field(&|m| m.ece),
        tp: field(&|m| m.confusion.tp as f64),
        fp: field(&|m| m.confusion.fp as f64),
        tn: field(&|m| m.confusion.tn as f64),
        fn_: field(&|m| m.confusion.fn_ as f64),
        n: field(&|m| m.n as f64),
        runs: runs.len(),
    }
}

/// The logistic function, computed without overflow.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Probability of class 1 to logit, with `p` clamped to `[1e-7, 1 - 1e-7]`.
pub fn logit(p: f32) -> f32 {
    let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln() as f32
}

/// Platt scaling: fits `p = sigmoid(a * z + b)` to logits (or any scores) `z` and labels by
/// maximum likelihood, with Platt's smoothed targets `(N+ + 1) / (N+ + 2)` and `1 / (N- + 2)`,
/// by Newton's method with backtracking (Lin, Lin & Weng 2007, "A note on Platt's probabilistic
/// outputs"). Returns `(1, 0)` (the identity on logits) for empty input.
///
/// Note the sign convention: Platt's paper writes `1 / (1 + exp(A f + B))`; here `a = -A`,
/// `b = -B`, so a well-ordered model has `a > 0`.
pub fn fit_platt(logits: &[f32], labels: &[u8]) -> (f32, f32) {
    assert_eq!(
        logits.len(),
        labels.len(),
        "logits and labels differ in length"
    );
    if logits.is_empty() {
        return (1.0, 0.0);
    }
    let n_pos = labels.iter().filter(|&&y| y != 0).count() as f64;
    let n_neg = labels.len() as f64 - n_pos;
    let hi = (n_pos + 1.0) / (n_pos + 2.0);
    let lo = 1.0 / (n_neg + 2.0);
    let t: Vec<f64> = labels
        .iter()
        .map(|&y| if y != 0 { hi } else { lo })
        .collect();
    let z: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();

    // Negative log-likelihood of sigmoid(a z + b) against soft targets t, computed stably.
    let nll = |a: f64, b: f64| -> f64 {
        z.iter()
            .zip(&t)
            .map(|(&zi, &ti)| {
                let f = a * zi + b;
                // -[t log s(f) + (1-t) log(1-s(f))] = log(1 + e^f) - t f
                softplus(f) - ti * f
            })
            .sum()
    };

    let (mut a, mut b) = (0.0f64, ((n_pos + 1.0) / (n_neg + 1.0)).ln());
    let mut f_val = nll(a, b);
    const SIGMA: f64 = 1e-12; // Levenberg-style ridge keeping the Hessian positive definite
    for _ in 0..100 {
        // Gradient and Hessian of the NLL in (a, b).
        let (mut g1, mut g2) = (0.0, 0.0);
        let (mut h11, mut h22, mut h21) = (SIGMA, SIGMA, 0.0);
        for (&zi, &ti) in z.iter().zip(&t) {
            let p = sigmoid(a * zi + b);
            let d = p - ti;
            let w = p * (1.0 - p);
            g1 += zi * d;
            g2 += d;
            h11 += zi * zi * w;
            h22 += w;
            h21 += zi * w;
        }
        if g1.abs() < 1e-9 && g2.abs() < 1e-9 {
            break;
        }
        let det = h11 * h22 - h21 * h21;
        if det.abs() < 1e-300 {
            break;
        }
        let da = -(h22 * g1 - h21 * g2) / det;
        let db = -(-h21 * g1 + h11 * g2) / det;
        let gd = g1 * da + g2 * db;
        let mut step = 1.0;
        let mut moved = false;
        while step >= 1e-10 {
            let (na, nb) = (a + step * da, b + step * db);
            let nf = nll(na, nb);
            if nf < f_val + 1e-4 * step * gd {
                a = na;
                b = nb;
                f_val = nf;
                moved = true;
                break;
            }
            step /= 2.0;
        }
        if !moved {
            break;
        }
    }
    (a as f32, b as f32)
}

fn softplus(f: f64) -> f64 {
    if f > 0.0 {
        f + (-f).exp().ln_1p()
    } else {
        f.exp().ln_1p()
    }
}

/// Applies a Platt fit: `sigmoid(a * z + b)` for each logit `z`.
pub fn apply_platt(logits: &[f32], a: f32, b: f32) -> Vec<f32> {
    logits
        .iter()
        .map(|&z| sigmoid(f64::from(a) * f64::from(z) + f64::from(b)) as f32)
        .collect()
}

/// Temperature scaling: the `T > 0` minimising the NLL of `sigmoid(z / T)` (hard labels),
/// found by golden-section search on `ln T` over `[ln 0.05, ln 20]`. Unlike Platt scaling it
/// cannot move the decision boundary at `z = 0`, so accuracy is unchanged. Returns 1 for empty
/// input.
pub fn fit_temperature(logits: &[f32], labels: &[u8]) -> f32 {
    assert_eq!(
        logits.len(),
        labels.len(),
        "logits and labels differ in length"
    );
    if logits.is_empty() {
        return 1.0;
    }
    let nll = |log_t: f64| -> f64 {
        let inv_t = (-log_t).exp();
        logits
            .iter()
            .zip(labels)
            .map(|(&z, &y)| {
                let f = f64::from(z) * inv_t;
                softplus(f) - if y != 0 { f } else { 0.0 }
            })
            .sum()
    };
    let (mut lo, mut hi) = (0.05f64.ln(), 20.0f64.ln());
    let gr = (5.0f64.sqrt() - 1.0) / 2.0;
    let mut c = hi - gr * (hi - lo);
    let mut d = lo + gr * (hi - lo);
    let (mut fc, mut fd) = (nll(c), nll(d));
    for _ in 0..100 {
        if fc < fd {
            hi = d;
            d = c;
            fd = fc;
            c = hi - gr * (hi - lo);
            fc = nll(c);
        } else {
            lo = c;
            c = d;
            fc = fd;
            d = lo + gr * (hi - lo);
            fd = nll(d);
        }
        if hi - lo < 1e-7 {
            break;
        }
    }
    ((lo + hi) / 2.0).exp() as f32
}

/// Applies temperature scaling: `sigmoid(z / t)` for each logit `z`.
pub fn apply_temperature(logits: &[f32], t: f32) -> Vec<f32> {
    logits
        .iter()
        .map(|&z| sigmoid(f64::from(z) / f64::from(t)) as f32)
        .collect()
}
