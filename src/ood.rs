//! Out-of-distribution score: the Mahalanobis distance of an image's penultimate features to
//! the nearest class mean of the training features, under their shared (within-class)
//! covariance (Lee et al., NeurIPS 2018). The statistics live in the model card
//! ([`OodStats`]); [`fit`] computes them from feature vectors.

use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

/// The card's out-of-distribution statistics and the threshold on the score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodStats {
    /// The method, in words.
    pub method: String,
    /// The graph output the statistics are of.
    pub features_output: String,
    /// Feature width.
    pub dim: usize,
    /// Class names, in the order of `class_means`.
    pub class_names: Vec<String>,
    /// Mean feature vector per class.
    pub class_means: Vec<Vec<f32>>,
    /// Inverse of the shrunk shared covariance, `dim x dim`, row-major; in the card as base64
    /// of little-endian f32 (exact, and one line instead of `dim * dim`).
    #[serde(with = "f32_base64")]
    pub precision: Vec<f32>,
    /// Shrinkage towards a scaled identity used before inverting (fraction of the mean
    /// variance added to the diagonal).
    pub shrinkage: f32,
    /// Scores at or above this are out of distribution.
    pub threshold: f32,
    /// How the threshold was chosen, in words.
    pub chosen_by: String,
    /// Images the statistics were fitted on.
    pub fitted_on: usize,
    /// Measured separation (free form; written by `leuknet-card fit-ood`).
    #[serde(default)]
    pub evaluation: serde_json::Value,
}

/// Serialises an f32 vector as base64 of its little-endian bytes.
mod f32_base64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(
                "f32 data length is not a multiple of 4",
            ));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Why statistics could not be fitted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OodError {
    #[error("need at least two feature vectors per class, class {0} has fewer")]
    TooFew(String),
    #[error("feature vectors have different widths ({0} and {1})")]
    Width(usize, usize),
    #[error("labels ({0}) and feature vectors ({1}) differ in number")]
    Labels(usize, usize),
    #[error("the shrunk covariance is not positive definite")]
    NotPositiveDefinite,
}

impl OodStats {
    /// Shapes agree and the numbers are finite.
    pub fn validate(&self) -> Result<(), String> {
        let d = self.dim;
        if d == 0
            || self.class_means.is_empty()
            || self.class_means.len() != self.class_names.len()
            || self.class_means.iter().any(|m| m.len() != d)
            || self.precision.len() != d * d
        {
            return Err(format!(
                "ood statistics have inconsistent shapes (dim {d}, {} means, {} precision values)",
                self.class_means.len(),
                self.precision.len()
            ));
        }
        let finite = self
            .precision
            .iter()
            .chain(self.class_means.iter().flatten());
        if !self.threshold.is_finite() || finite.into_iter().any(|v| !v.is_finite()) {
            return Err("ood statistics hold a non-finite number".into());
        }
        Ok(())
    }

    /// Distance to the nearest class mean, `min_k sqrt((f - m_k)' P (f - m_k))`; `NaN` when
    /// the width is wrong.
    pub fn score(&self, features: &[f32]) -> f32 {
        let d = self.dim;
        if features.len() != d {
            return f32::NAN;
        }
        let mut best = f64::INFINITY;
        let mut diff = vec![0f64; d];
        for mean in &self.class_means {
            for (x, (f, m)) in diff.iter_mut().zip(features.iter().zip(mean)) {
                *x = (*f - *m) as f64;
            }
            let mut total = 0f64;
            for (row, x) in self.precision.chunks_exact(d).zip(&diff) {
                let dot: f64 = row.iter().zip(&diff).map(|(p, y)| *p as f64 * y).sum();
                total += x * dot;
            }
            best = best.min(total.max(0.0));
        }
        best.sqrt() as f32
    }

    /// Whether a score is below the threshold.
    pub fn in_distribution(&self, score: f32) -> bool {
        score < self.threshold
    }

    /// The card without the large arrays (means and precision), for `/v1/models`.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "method": self.method,
            "features_output": self.features_output,
            "dim": self.dim,
            "class_names": self.class_names,
            "threshold": self.threshold,
            "chosen_by": self.chosen_by,
            "fitted_on": self.fitted_on,
            "shrinkage": self.shrinkage,
            "evaluation": self.evaluation,
            "class_means": "omitted here: see the model card file",
            "precision": "omitted here: see the model card file",
        })
    }
}

/// Fits class means and the shrunk shared covariance's inverse to `features` (one vector per
/// image) with `labels` indexing `class_names`. The threshold is left at infinity: choose it
/// with [`quantile`] on scores of held-out in-distribution images.
pub fn fit(
    features: &[Vec<f32>],
    labels: &[usize],
    class_names: &[String],
    shrinkage: f32,
    features_output: &str,
) -> Result<OodStats, OodError> {
    if features.len() != labels.len() {
        return Err(OodError::Labels(labels.len(), features.len()));
    }
    let d = features.first().map_or(0, Vec::len);
    if let Some(f) = features.iter().find(|f| f.len() != d) {
        return Err(OodError::Width(d, f.len()));
    }
    let k = class_names.len();
    let mut sums = vec![DVector::<f64>::zeros(d); k];
    let mut counts = vec![0usize; k];
    for (f, &label) in features.iter().zip(labels) {
        if label < k {
            sums[label] += DVector::from_iterator(d, f.iter().map(|&v| v as f64));
            counts[label] += 1;
        }
    }
    if let Some(c) = (0..k).find(|&c| counts[c] < 2) {
        return Err(OodError::TooFew(class_names[c].clone()));
    }
    let means: Vec<DVector<f64>> = sums
        .into_iter()
        .zip(&counts)
        .map(|(s, &n)| s / n as f64)
        .collect();
    let mut cov = DMatrix::<f64>::zeros(d, d);
    let mut used = 0usize;
    for (f, &label) in features.iter().zip(labels) {
        if label < k {
            let x = DVector::from_iterator(d, f.iter().map(|&v| v as f64)) - &means[label];
            cov.ger(1.0, &x, &x, 1.0);
            used += 1;
        }
    }
    cov /= (used - k).max(1) as f64;
    let mean_variance = cov.trace() / d.max(1) as f64;
    let ridge = (shrinkage as f64 * mean_variance).max(1e-9);
    for i in 0..d {
        cov[(i, i)] += ridge;
    }
    let precision = cov
        .cholesky()
        .ok_or(OodError::NotPositiveDefinite)?
        .inverse();
    Ok(OodStats {
        method: "Mahalanobis distance of the penultimate features to the nearest class mean, \
                 shared within-class covariance shrunk towards the identity (Lee et al. 2018)"
            .into(),
        features_output: features_output.into(),
        dim: d,
        class_names: class_names.to_vec(),
        class_means: means
            .iter()
            .map(|m| m.iter().map(|&v| v as f32).collect())
            .collect(),
        precision: precision.transpose().iter().map(|&v| v as f32).collect(),
        shrinkage,
        threshold: f32::INFINITY,
        chosen_by: String::new(),
        fitted_on: used,
        evaluation: serde_json::Value::Null,
    })
}

/// The `q`-quantile (0..=1) of `values` by linear interpolation; `NaN` when empty.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f32::NAN;
    }
    v.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let t = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * t
}

/// Area under the ROC curve for telling `positives` (scored higher) from `negatives`, with
/// ties counted as one half.
pub fn auroc(negatives: &[f32], positives: &[f32]) -> f64 {
    if negatives.is_empty() || positives.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0f64;
    let mut sorted = negatives.to_vec();
    sorted.sort_by(f32::total_cmp);
    for &p in positives {
        let below = sorted.partition_point(|&n| n < p);
        let equal = sorted[below..].partition_point(|&n| n <= p);
        wins += below as f64 + 0.5 * equal as f64;
    }
    wins / (negatives.len() as f64 * positives.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn sample(rng: &mut StdRng, centre: f32, n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                vec![
                    centre + rng.random_range(-1.0..1.0),
                    rng.random_range(-1.0..1.0),
                ]
            })
            .collect()
    }

    #[test]
    fn mahalanobis_matches_a_hand_computed_case() {
        // Diagonal covariance: variance 4 on x, 1 on y; one class at the origin.
        let stats = OodStats {
            method: String::new(),
            features_output: "features".into(),
            dim: 2,
            class_names: vec!["a".into()],
            class_means: vec![vec![0.0, 0.0]],
            precision: vec![0.25, 0.0, 0.0, 1.0],
            shrinkage: 0.0,
            threshold: 3.0,
            chosen_by: String::new(),
            fitted_on: 0,
            evaluation: serde_json::Value::Null,
        };
        assert!((stats.score(&[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!((stats.score(&[0.0, 2.0]) - 2.0).abs() < 1e-6);
        assert!(stats.score(&[1.0]).is_nan());
        assert!(stats.in_distribution(2.9) && !stats.in_distribution(3.0));
    }

    #[test]
    fn fitted_statistics_separate_near_from_far() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut features = sample(&mut rng, -3.0, 200);
        features.extend(sample(&mut rng, 3.0, 200));
        let labels: Vec<usize> = (0..400).map(|i| i / 200).collect();
        let names = vec!["healthy".to_string(), "leukemic".to_string()];
        let mut stats = fit(&features, &labels, &names, 0.01, "features").unwrap();
        assert!(stats.validate().is_err(), "no threshold chosen yet");
        stats.threshold = 3.0;
        stats.validate().unwrap();
        assert!((stats.class_means[0][0] + 3.0).abs() < 0.2);
        let near: Vec<f32> = sample(&mut rng, 3.0, 50)
            .iter()
            .map(|f| stats.score(f))
            .collect();
        let far: Vec<f32> = (0..50)
            .map(|i| stats.score(&[0.0, 8.0 + i as f32]))
            .collect();
        assert_eq!(auroc(&near, &far), 1.0);
        assert!(quantile(&near, 0.99) < 3.0);
    }

    #[test]
    fn fit_rejects_bad_input() {
        let names = vec!["a".to_string(), "b".to_string()];
        let f = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![2.0, 2.0]];
        assert_eq!(
            fit(&f, &[0, 0, 1], &names, 0.1, "x").unwrap_err(),
            OodError::TooFew("b".into())
        );
        assert_eq!(
            fit(&f, &[0, 1], &names, 0.1, "x").unwrap_err(),
            OodError::Labels(2, 3)
        );
        let ragged = vec![vec![0.0, 1.0], vec![1.0]];
        assert_eq!(
            fit(&ragged, &[0, 1], &names, 0.1, "x").unwrap_err(),
            OodError::Width(2, 1)
        );
    }

    #[test]
    fn precision_round_trips_through_base64_exactly() {
        let stats = OodStats {
            method: String::new(),
            features_output: "pooled".into(),
            dim: 2,
            class_names: vec!["a".into()],
            class_means: vec![vec![0.5, -1.0]],
            precision: vec![0.1, -2.5e-7, f32::MIN_POSITIVE, 3.0],
            shrinkage: 0.1,
            threshold: 3.0,
            chosen_by: String::new(),
            fitted_on: 0,
            evaluation: serde_json::Value::Null,
        };
        let json = serde_json::to_value(&stats).unwrap();
        assert!(json["precision"].is_string());
        let back: OodStats = serde_json::from_value(json).unwrap();
        assert_eq!(back, stats);
        let mut bad = serde_json::to_value(&stats).unwrap();
        bad["precision"] = "AAA=".into();
        assert!(serde_json::from_value::<OodStats>(bad).is_err());
    }

    #[test]
    fn quantile_and_auroc_basics() {
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[0.0, 10.0], 0.25), 2.5);
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(auroc(&[0.0, 1.0], &[2.0, 3.0]), 1.0);
        assert_eq!(auroc(&[1.0], &[1.0]), 0.5);
        assert_eq!(auroc(&[2.0, 3.0], &[0.0, 1.0]), 0.0);
    }
}
