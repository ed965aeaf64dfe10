//! Feature-space analysis of the paper's section IV-C: penultimate-layer features classified by
//! a linear SVM (after PCA to 100 components for the 4096-wide heads), and t-SNE plots with the
//! SVM's decision regions.
//!
//! Choices (the paper does not state them):
//! - Features are standardised (zero mean, unit variance per feature; a constant feature is
//!   only centred) with statistics of the *training* samples only, then reduced by PCA fitted on
//!   the training samples only (linfa-reduction, LOBPCG truncated SVD, no whitening). PCA is
//!   skipped when `components` is 0 or not smaller than the feature width (the paper uses the
//!   256 mDFT features as they are); it is capped at the number of training samples.
//! - The SVM is linfa-svm's C-SVC with a linear kernel, `C = 1` for both classes
//!   ([`SVM_C`], scikit-learn's and LIBSVM's default) and SMO tolerance 1e-3 ([`SVM_EPS`],
//!   LIBSVM's default). A sample is predicted leukemic (1) when its decision value is `>= 0`.
//! - t-SNE: Barnes-Hut (theta 0.5), Euclidean distance on the features as given, 1000 epochs,
//!   a seeded N(0, 1e-4) initial embedding ([`TSNE_SEED`]); the perplexity is lowered to what
//!   the sample count allows (`3 * perplexity <= n - 1`). The decision regions drawn behind the
//!   points come from a linear SVM trained on the 2-D embedding itself: like the paper's
//!   figures, this is an *illustration* of separability, not the classifier whose accuracy is
//!   reported (t-SNE has no out-of-sample mapping).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use linfa::traits::{Fit, PredictInplace};
use linfa::DatasetBase;
use linfa_reduction::Pca;
use linfa_svm::Svm;
use ndarray16::{Array1, Array2, ArrayView2, Axis};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::eval_metrics::{roc_auc, Confusion};
use super::report::{blend, ensure_parent, plot_err, register_fonts, CLASS_NAMES, PALETTE};

/// SVM penalty C for both classes.
pub const SVM_C: f64 = 1.0;
/// SMO stopping tolerance.
pub const SVM_EPS: f64 = 1e-3;
/// The paper's PCA size for 4096-wide features.
pub const PCA_COMPONENTS: usize = 100;
/// Seed of the t-SNE initial embedding.
pub const TSNE_SEED: u64 = 42;
/// t-SNE optimisation epochs.
pub const TSNE_EPOCHS: usize = 1000;

/// Test-set result of [`pca_svm`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureResult {
    pub accuracy: f64,
    /// Cohen's kappa of the test predictions.
    pub kappa: f64,
    pub balanced_accuracy: f64,
    /// Predicted label (0/1) per test sample.
    pub predictions: Vec<u8>,
    /// SVM decision value per test sample (`>= 0` means class 1).
    pub decision_values: Vec<f32>,
    /// ROC AUC of the decision values; `None` when the test set holds one class.
    pub auc: Option<f64>,
    /// PCA components actually used (0 = no PCA).
    pub components_used: usize,
}

/// Per-feature standardisation fitted on training rows.
struct Standardizer {
    mean: Array1<f64>,
    scale: Array1<f64>,
}

impl Standardizer {
    fn fit(x: &Array2<f64>) -> Self {
        let n = x.nrows().max(1) as f64;
        let mean = x
            .mean_axis(Axis(0))
            .unwrap_or_else(|| Array1::zeros(x.ncols()));
        let var = x
            .axis_iter(Axis(0))
            .fold(Array1::<f64>::zeros(x.ncols()), |acc, row| {
                let d = &row - &mean;
                acc + &d * &d
            })
            / n;
        let scale = var.mapv(|v| if v.sqrt() > 1e-12 { v.sqrt() } else { 1.0 });
        Standardizer { mean, scale }
    }

    fn transform(&self, x: &Array2<f64>) -> Array2<f64> {
        (x - &self.mean) / &self.scale
    }
}

fn to_array(x: &[Vec<f32>], d: usize, what: &str) -> Result<Array2<f64>> {
    let mut a = Array2::<f64>::zeros((x.len(), d));
    for (i, row) in x.iter().enumerate() {
        ensure!(
            row.len() == d,
            "{what} row {i} has {} features, expected {d}",
            row.len()
        );
        for (j, &v) in row.iter().enumerate() {
            ensure!(v.is_finite(), "{what} row {i} feature {j} is not finite");
            a[[i, j]] = f64::from(v);
        }
    }
    Ok(a)
}

/// PCA fitted on `x` (already standardised), returning the projection of both inputs.
fn pca_project(
    train: &Array2<f64>,
    test: &Array2<f64>,
    components: usize,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let pca = Pca::params(components)
        .fit(&DatasetBase::from(train.view()))
        .context("fitting PCA")?;
    let project = |x: &Array2<f64>| -> Array2<f64> {
        let mut out = pca.default_target(x);
        pca.predict_inplace(x, &mut out);
        out
    };
    Ok((project(train), project(test)))
}

/// A fitted linear SVM, returning decision values.
struct LinearSvm {
    model: Svm<f64, bool>,
}

impl LinearSvm {
    fn fit(x: ArrayView2<f64>, y: &[u8]) -> Result<Self> {
        let targets: Array1<bool> = y.iter().map(|&v| v != 0).collect();
        let model = Svm::<f64, bool>::params()
            .pos_neg_weights(SVM_C, SVM_C)
            .linear_kernel()
            .eps(SVM_EPS)
            .fit(&DatasetBase::new(x, targets.view()))
            .context("fitting linear SVM")?;
        Ok(LinearSvm { model })
    }

    fn decision(&self, x: &Array2<f64>) -> Vec<f64> {
        x.axis_iter(Axis(0))
            .map(|row| self.model.weighted_sum(&row) - self.model.rho)
            .collect()
    }
}

/// Standardise (train statistics) → PCA to `components` (fitted on train) → linear SVM
/// (C = 1) trained on the training features, evaluated on the test features.
///
/// Errors on empty input, mismatched lengths or widths, non-finite features, or a training set
/// with one class only.
pub fn pca_svm(
    train_x: &[Vec<f32>],
    train_y: &[u8],
    test_x: &[Vec<f32>],
    test_y: &[u8],
    components: usize,
) -> Result<FeatureResult> {
    ensure!(!train_x.is_empty(), "no training samples");
    ensure!(
        train_x.len() == train_y.len(),
        "train_x has {} rows but train_y {}",
        train_x.len(),
        train_y.len()
    );
    ensure!(
        test_x.len() == test_y.len(),
        "test_x has {} rows but test_y {}",
        test_x.len(),
        test_y.len()
    );
    let n_pos = train_y.iter().filter(|&&v| v != 0).count();
    if n_pos == 0 || n_pos == train_y.len() {
        bail!("the training set holds one class only; a binary SVM needs both");
    }
    let d = train_x[0].len();
    ensure!(d > 0, "features are empty");
    let train = to_array(train_x, d, "train")?;
    let test = to_array(test_x, d, "test")?;

    let scaler = Standardizer::fit(&train);
    let train = scaler.transform(&train);
    let test = scaler.transform(&test);

    let k = components.min(train.nrows());
    let (train, test, used) = if components > 0 && components < d {
        let (a, b) = pca_project(&train, &test, k)?;
        let used = a.ncols();
        (a, b, used)
    } else {
        (train, test, 0)
    };

    let svm = LinearSvm::fit(train.view(), train_y)?;
    let decision = svm.decision(&test);
    let predictions: Vec<u8> = decision.iter().map(|&v| u8::from(v >= 0.0)).collect();
    let decision_values: Vec<f32> = decision.iter().map(|&v| v as f32).collect();
    let c = Confusion::from_predictions(test_y, &predictions);
    Ok(FeatureResult {
        accuracy: c.accuracy(),
        kappa: c.kappa(),
        balanced_accuracy: c.balanced_accuracy(),
        auc: roc_auc(test_y, &decision_values),
        predictions,
        decision_values,
        components_used: used,
    })
}

/// Result of [`tsne_plot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TsneOutput {
    /// 2-D embedding, one point per input row.
    pub embedding: Vec<[f32; 2]>,
    /// Perplexity actually used (lowered for small `n`).
    pub perplexity: f32,
    /// Training accuracy of the illustrative SVM on the embedding (`None` with one class).
    pub svm_accuracy_2d: Option<f64>,
}

/// The largest usable perplexity for `n` samples (bhtsne needs `3 * floor(p) <= n - 1`).
fn usable_perplexity(perplexity: f32, n: usize) -> Result<f32> {
    ensure!(n >= 4, "t-SNE needs at least 4 samples, got {n}");
    ensure!(
        perplexity.is_finite() && perplexity > 0.0,
        "perplexity must be positive"
    );
    let max = ((n - 1) / 3) as f32;
    Ok(perplexity.clamp(1.0, max))
}

/// Barnes-Hut t-SNE 2-D embedding of `x` (Euclidean), seeded initial layout. Returns the
/// embedding and the perplexity used.
pub fn tsne_embed(x: &[Vec<f32>], perplexity: f32, seed: u64) -> Result<(Vec<[f32; 2]>, f32)> {
    let n = x.len();
    let perplexity = usable_perplexity(perplexity, n)?;
    let d = x[0].len();
    ensure!(
        x.iter().all(|r| r.len() == d),
        "rows differ in feature count"
    );
    ensure!(
        x.iter().flatten().all(|v| v.is_finite()),
        "features must be finite"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1e-4).context("normal distribution")?;
    let init: Vec<f32> = (0..n * 2).map(|_| normal.sample(&mut rng)).collect();
    let samples: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
    let mut tsne = bhtsne::tSNE::<f32, &[f32], 2>::new(&samples);
    tsne.perplexity(perplexity)
        .epochs(TSNE_EPOCHS)
        .initial_embedding(init)
        .barnes_hut(0.5, |a, b| {
            a.iter()
                .zip(b.iter())
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f32>()
                .sqrt()
        });
    let flat = tsne.embedding();
    ensure!(flat.len() == n * 2, "t-SNE returned {} values", flat.len());
    Ok((flat.chunks(2).map(|c| [c[0], c[1]]).collect(), perplexity))
}

/// Outline colours for datasets; combined with [`MARKER_SHAPES`] shapes (circle, triangle,
/// square, diamond, inverted triangle) they give 35 distinct markers.
const DATASET_OUTLINES: [RGBColor; 7] = [
    RGBColor(0, 0, 0),
    RGBColor(0, 120, 0),
    RGBColor(130, 0, 160),
    RGBColor(230, 140, 0),
    RGBColor(0, 150, 170),
    RGBColor(120, 70, 20),
    RGBColor(220, 0, 160),
];
const MARKER_SHAPES: usize = 5;

fn class_color(label: u8) -> RGBColor {
    if label != 0 {
        PALETTE[3] // red: leukemic
    } else {
        PALETTE[0] // blue: healthy
    }
}

/// Draws one marker, centred at pixel `(x, y)` of `area` (an un-shifted root area).
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    shape: usize,
    fill: RGBColor,
    outline: RGBColor,
    r: i32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let pts: Vec<(i32, i32)> = match shape % MARKER_SHAPES {
        0 => {
            area.draw(&Circle::new((x, y), r, fill.filled()))
                .map_err(plot_err)?;
            return area
                .draw(&Circle::new((x, y), r, outline.stroke_width(2)))
                .map_err(plot_err);
        }
        1 => vec![(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)],
        2 => vec![
            (x - r, y - r),
            (x + r, y - r),
            (x + r, y + r),
            (x - r, y + r),
        ],
        3 => vec![
            (x, y - r - 2),
            (x + r + 2, y),
            (x, y + r + 2),
            (x - r - 2, y),
        ],
        _ => vec![(x - r - 1, y - r), (x + r + 1, y - r), (x, y + r + 1)],
    };
    area.draw(&Polygon::new(pts.clone(), fill.filled()))
        .map_err(plot_err)?;
    let mut closed = pts.clone();
    closed.push(pts[0]);
    area.draw(&PathElement::new(closed, outline.stroke_width(2)))
        .map_err(plot_err)?;
    Ok(())
}

/// t-SNE plot of features `x` with labels `y` (0 healthy / 1 leukemic) and the dataset name of
/// each sample: points filled by class, marker shape and outline colour by dataset, and the
/// decision regions of a linear SVM trained on the 2-D embedding as a light background grid
/// (an illustration, as in the paper; see the module notes). Returns the embedding.
pub fn tsne_plot(
    x: &[Vec<f32>],
    y: &[u8],
    dataset: &[String],
    path_png: &Path,
    perplexity: f32,
) -> Result<TsneOutput> {
    ensure!(
        x.len() == y.len() && x.len() == dataset.len(),
        "x, y and dataset differ in length ({}, {}, {})",
        x.len(),
        y.len(),
        dataset.len()
    );
    let (embedding, perplexity) = tsne_embed(x, perplexity, TSNE_SEED)?;
    register_fonts();
    ensure_parent(path_png)?;

    // Illustrative SVM on the standardised embedding.
    let emb = Array2::from_shape_fn((embedding.len(), 2), |(i, j)| f64::from(embedding[i][j]));
    let n_pos = y.iter().filter(|&&v| v != 0).count();
    let svm = if n_pos > 0 && n_pos < y.len() {
        let scaler = Standardizer::fit(&emb);
        let svm = LinearSvm::fit(scaler.transform(&emb).view(), y)?;
        Some((scaler, svm))
    } else {
        None
    };
    let svm_accuracy_2d = svm.as_ref().map(|(scaler, svm)| {
        let preds: Vec<u8> = svm
            .decision(&scaler.transform(&emb))
            .iter()
            .map(|&v| u8::from(v >= 0.0))
            .collect();
        Confusion::from_predictions(y, &preds).accuracy()
    });

    // Axis ranges with padding.
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in &embedding {
        x0 = x0.min(f64::from(p[0]));
        x1 = x1.max(f64::from(p[0]));
        y0 = y0.min(f64::from(p[1]));
        y1 = y1.max(f64::from(p[1]));
    }
    let (px, py) = (((x1 - x0) * 0.06).max(1e-3), ((y1 - y0) * 0.06).max(1e-3));
    let (x0, x1, y0, y1) = (x0 - px, x1 + px, y0 - py, y1 + py);

    // Dataset → marker index, in order of first appearance.
    let mut names: Vec<&str> = Vec::new();
    for d in dataset {
        if !names.contains(&d.as_str()) {
            names.push(d);
        }
    }

    let (w, h) = (1240u32, 860u32);
    let root = BitMapBackend::new(path_png, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (plot_area, legend_area) = root.split_horizontally(900);
    let caption = format!(
        "t-SNE of {} samples (perplexity {perplexity:.0})",
        embedding.len()
    );
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(20)
        .caption(caption, ("sans-serif", 26))
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;

    if let Some((scaler, svm)) = &svm {
        const G: usize = 150;
        let (dx, dy) = ((x1 - x0) / G as f64, (y1 - y0) / G as f64);
        let mut centres = Array2::<f64>::zeros((G * G, 2));
        for i in 0..G {
            for j in 0..G {
                centres[[i * G + j, 0]] = x0 + (i as f64 + 0.5) * dx;
                centres[[i * G + j, 1]] = y0 + (j as f64 + 0.5) * dy;
            }
        }
        let dec = svm.decision(&scaler.transform(&centres));
        let light = [
            blend(class_color(0), WHITE, 0.82),
            blend(class_color(1), WHITE, 0.82),
        ];
        chart
            .draw_series((0..G * G).map(|k| {
                let (i, j) = (k / G, k % G);
                let c = light[usize::from(dec[k] >= 0.0)];
                let (ax, ay) = (x0 + i as f64 * dx, y0 + j as f64 * dy);
                Rectangle::new([(ax, ay), (ax + dx, ay + dy)], c.filled())
            }))
            .map_err(plot_err)?;
    }
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("t-SNE 1")
        .y_desc("t-SNE 2")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(plot_err)?;

    // Points: pixel positions in the root area (plot_area starts at the root's origin).
    let pa = chart.plotting_area();
    for (i, p) in embedding.iter().enumerate() {
        let pix = pa.map_coordinate(&(f64::from(p[0]), f64::from(p[1])));
        let di = names.iter().position(|n| *n == dataset[i]).unwrap_or(0);
        draw_marker(
            &root,
            pix,
            di % MARKER_SHAPES,
            class_color(y[i]),
            DATASET_OUTLINES[di % DATASET_OUTLINES.len()],
            5,
        )?;
    }

    // Legend panel.
    let (lx, _) = legend_area.get_base_pixel();
    let left = TextStyle::from(("sans-serif", 16).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let head = TextStyle::from(("sans-serif", 18).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let mut ty = 60;
    let text = |s: String, x: i32, y: i32, st: &TextStyle| -> Result<()> {
        root.draw(&Text::new(s, (x, y), st.clone()))
            .map_err(plot_err)
    };
    text("Class (fill colour)".into(), lx + 10, ty, &head)?;
    ty += 30;
    for (label, name) in CLASS_NAMES.iter().enumerate() {
        draw_marker(&root, (lx + 25, ty), 0, class_color(label as u8), BLACK, 6)?;
        text(name.to_string(), lx + 45, ty, &left)?;
        ty += 26;
    }
    ty += 14;
    text("Dataset (shape, outline)".into(), lx + 10, ty, &head)?;
    ty += 30;
    let grey = RGBColor(200, 200, 200);
    let max_rows = ((h as i32 - ty - 120) / 24).max(1) as usize;
    for (di, name) in names.iter().enumerate().take(max_rows) {
        draw_marker(
            &root,
            (lx + 25, ty),
            di % MARKER_SHAPES,
            grey,
            DATASET_OUTLINES[di % DATASET_OUTLINES.len()],
            6,
        )?;
        let short: String = name.chars().take(26).collect();
        text(short, lx + 45, ty, &left)?;
        ty += 24;
    }
    if names.len() > max_rows {
        text(
            format!("… and {} more", names.len() - max_rows),
            lx + 45,
            ty,
            &left,
        )?;
        ty += 24;
    }
    ty += 20;
    let note = TextStyle::from(("sans-serif", 14).into_font())
        .color(&RGBColor(60, 60, 60))
        .pos(Pos::new(HPos::Left, VPos::Center));
    let note_lines: Vec<String> = match svm_accuracy_2d {
        Some(acc) => vec![
            "Background: decision regions of a".into(),
            "linear SVM fitted on this 2-D".into(),
            format!("embedding (train acc. {:.1} %);", acc * 100.0),
            "an illustration only.".into(),
        ],
        None => vec!["One class only: no SVM regions.".into()],
    };
    for l in note_lines {
        text(l, lx + 10, ty, &note)?;
        ty += 20;
    }
    root.present().map_err(plot_err)?;
    Ok(TsneOutput {
        embedding,
        perplexity,
        svm_accuracy_2d,
    })
}
