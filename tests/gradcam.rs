//! The in-graph Grad-CAM map and features of an exported LeukNet against tch autograd on the
//! same weights: the export writes the map as a chain of ONNX nodes (see
//! `leuknet::onnx::explain`), tch computes it by back-propagation, and the two must agree.
//!
//! Needs `./scripts/setup --train` (libtorch) and `./scripts/setup` (ONNX Runtime).
#![cfg(feature = "train")]

use leuknet::engine::{self, Device as EngineDevice, EngineOptions};
use leuknet::onnx::{InputNormalization, LeukNetSpec};
use leuknet::train::export::{export, ExportCard, WeightStorage};
use leuknet::train::model::{LeukNet, Stage};
use tch::{Device, Kind, Tensor};

/// The map's tolerance, relative to its largest value (1e-4 on the normalised grid).
const GRID_TOLERANCE: f32 = 1e-4;

fn spec() -> LeukNetSpec {
    LeukNetSpec::vgg16()
        .with_width_div(16)
        .with_normalization(Some(InputNormalization::caffe_vgg16()))
}

/// Smooth random images in [0, 1] (per image a different pattern), `N x 3 x S x S`, flat.
fn images(n: usize, side: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|k| {
            (0..3 * side * side)
                .map(|i| {
                    let (c, y, x) = (i / (side * side), (i / side) % side, i % side);
                    let v = ((x as f32 * (0.05 + 0.02 * k as f32)).sin()
                        + (y as f32 * 0.07 + c as f32 + k as f32).cos())
                        * 0.25
                        + 0.5;
                    v.clamp(0.0, 1.0)
                })
                .collect()
        })
        .collect()
}

/// Grad-CAM by autograd: gradient of the logit w.r.t. the last pool's output, averaged per
/// channel, weighting the channels, summed, ReLU.
fn autograd_gradcam(model: &LeukNet, x: &Tensor, pools: usize) -> Tensor {
    let stage = Stage::Pool(pools);
    let pooled = model
        .forward_until(x, stage)
        .detach()
        .set_requires_grad(true);
    let logits = model.forward_from(&pooled, stage, false);
    let grads = Tensor::run_backward(&[logits.sum(Kind::Float)], &[&pooled], false, false);
    let alpha = grads[0].mean_dim(&[2i64, 3][..], true, Kind::Float);
    (alpha * &pooled)
        .sum_dim_intlist(&[1i64][..], false, Kind::Float)
        .relu()
}

#[test]
fn in_graph_gradcam_and_features_match_tch_autograd() {
    let spec = spec();
    let side = spec.input_size;
    tch::manual_seed(21);
    let model = LeukNet::new(spec.clone(), Device::Cpu).expect("model builds");
    let imgs = images(3, side);
    let dir = tempfile::tempdir().expect("tempdir");
    let fields = ExportCard {
        version: "0.0.1-gradcam-test".into(),
        training: serde_json::json!({"test": true}),
        ..ExportCard::default()
    };
    let report = export(
        &model,
        dir.path(),
        "cam",
        fields,
        &imgs,
        WeightStorage::Fp32,
    )
    .expect("export passes parity");

    engine::init_runtime(std::path::Path::new(engine::DEFAULT_ORT_LIBRARY))
        .expect("ONNX Runtime: run ./scripts/setup");
    let options = EngineOptions {
        device: EngineDevice::Cpu,
        intra_threads: 1,
    };
    let (card, mut onnx) = engine::load_from_card(&report.card_path, &options).expect("loads");
    let explain = card
        .explain
        .clone()
        .expect("the export declares the explanation outputs");
    onnx.set_vector_outputs(&card, &[&explain.features_output, &explain.pooled_output])
        .expect("both vector outputs are in the card");
    let grid = explain.grid;
    assert_eq!(grid, [7, 7]);
    let flat: Vec<f32> = imgs.iter().flatten().copied().collect();
    let outputs = onnx
        .run_detailed(flat.clone(), imgs.len(), true)
        .expect("runs");

    let x = Tensor::from_slice(&flat).view([imgs.len() as i64, 3, side as i64, side as i64]);
    let cam = autograd_gradcam(&model, &x, spec.pool_count());
    let features = tch::no_grad(|| model.features(&x));
    let pooled = tch::no_grad(|| {
        model
            .forward_until(&x, Stage::Pool(spec.pool_count()))
            .mean_dim(&[2i64, 3][..], false, Kind::Float)
    });
    let mut worst_grid = 0f32;
    let mut worst_features = 0f32;
    for (i, out) in outputs.iter().enumerate() {
        let want: Vec<f32> = Vec::try_from(cam.get(i as i64).flatten(0, -1)).expect("cam");
        let got = out.gradcam.as_ref().expect("gradcam asked for");
        assert_eq!(got.len(), want.len());
        let max = want.iter().copied().fold(0f32, f32::max);
        assert!(
            max > 0.0,
            "image {i}: the autograd map is all zero, nothing is compared"
        );
        let nonzero = want.iter().filter(|&&v| v > 0.0).count();
        assert!(nonzero > 1, "image {i}: a one-cell map proves little");
        for (g, w) in got.iter().zip(&want) {
            worst_grid = worst_grid.max((g - w).abs() / max);
        }
        let want_f: Vec<f32> = Vec::try_from(features.get(i as i64)).expect("features");
        let got_f = &out.vectors[0];
        assert_eq!(got_f.len(), want_f.len());
        for (g, w) in got_f.iter().zip(&want_f) {
            worst_features = worst_features.max((g - w).abs() / w.abs().max(1.0));
        }
        let want_p: Vec<f32> = Vec::try_from(pooled.get(i as i64)).expect("pooled");
        let got_p = &out.vectors[1];
        assert_eq!(got_p.len(), want_p.len());
        for (g, w) in got_p.iter().zip(&want_p) {
            worst_features = worst_features.max((g - w).abs() / w.abs().max(1.0));
        }
    }
    eprintln!("gradcam parity: max |d|/max = {worst_grid:e}; features and pooled max rel |d| = {worst_features:e}");
    assert!(worst_grid <= GRID_TOLERANCE, "grid differs by {worst_grid}");
    assert!(
        worst_features <= 1e-4,
        "features differ by {worst_features}"
    );

    // Without asking, no map is computed or returned; probabilities are the same either way.
    let plain = onnx.run_detailed(flat, imgs.len(), false).expect("runs");
    for (a, b) in plain.iter().zip(&outputs) {
        assert!(a.gradcam.is_none());
        assert_eq!(a.probability, b.probability);
    }
}
