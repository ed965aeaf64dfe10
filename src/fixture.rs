//! Random-weight LeukNet-shaped models for tests and benchmarks. Never shipped, never trusted.
//!
//! A fixture has the real model's graph (VGG-16 conv base, 1024-256-1 head, Caffe ImageNet
//! normalisation inside the graph, `image` -> `logit`, `probability`) so the server, the
//! batcher and the benchmarks exercise the same shapes and costs as production; `width_div`
//! narrows every layer for fast tests. Its card says `fixture: true` and, loudly, that its
//! weights are random.

use crate::model_card::{leuknet_outputs, Classes, Decision, ExplainSpec, InputSpec, ModelCard};
use crate::onnx::writer::{
    write_leuknet_file, InputNormalization, LeukNetSpec, OnnxWriteError, WeightSource,
    PROBABILITY_OUTPUT,
};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File name of the fixture's ONNX graph inside the output directory.
pub const FIXTURE_ONNX_FILE: &str = "leuknet.onnx";
/// File name of the fixture's model card inside the output directory.
pub const FIXTURE_CARD_FILE: &str = "leuknet.json";
/// Model name written in fixture cards, so logs and `/model` show what is being served.
pub const FIXTURE_NAME: &str = "leuknet-fixture";

/// Typical magnitude of a Caffe-normalised pixel (0-255 minus the ImageNet mean). He-normal
/// layers carry that scale to the last layer, whose weights are divided by it so that logits
/// on real images are of order 1 and probabilities are not all saturated at 0 or 1.
const CAFFE_PIXEL_SCALE: f32 = 64.0;

/// Why a fixture could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// `width_div` 0 would mean zero-width layers.
    #[error("width_div must be at least 1")]
    ZeroWidthDiv,
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The graph writer refused the spec or weights (a bug in this module if it happens).
    #[error("cannot build the fixture graph: {0}")]
    Graph(OnnxWriteError),
    /// The card could not be serialised.
    #[error("cannot serialise the fixture model card: {0}")]
    Card(#[from] serde_json::Error),
}

/// The spec a fixture is built from: the production network narrowed by `width_div`, with the
/// production input normalisation.
pub fn fixture_spec(width_div: usize) -> LeukNetSpec {
    LeukNetSpec::vgg16()
        .with_width_div(width_div)
        .with_normalization(Some(InputNormalization::caffe_vgg16()))
}

/// Writes `leuknet.onnx` and `leuknet.json` (a fixture model card) into `out_dir`, creating it
/// if needed, and returns the card's path. The same `width_div` and `seed` give the same bytes.
///
/// Weights are generated one tensor at a time and streamed to disk while being hashed, so even
/// the full-size model (~163 MB) is never held twice in memory. Files are written under a
/// temporary name and renamed, so a failure never leaves a card pointing at a partial model.
pub fn write_fixture(out_dir: &Path, width_div: usize, seed: u64) -> Result<PathBuf, FixtureError> {
    write_fixture_with(out_dir, width_div, seed, false)
}

/// [`write_fixture`], optionally with the test-only fault of
/// [`LeukNetSpec::fault_on_white_input`]: any batch holding a pure white image fails to run.
pub fn write_fixture_with(
    out_dir: &Path,
    width_div: usize,
    seed: u64,
    fault_on_white_input: bool,
) -> Result<PathBuf, FixtureError> {
    if width_div == 0 {
        return Err(FixtureError::ZeroWidthDiv);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FixtureError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let spec = fixture_spec(width_div).with_fault_on_white_input(fault_on_white_input);
    let weights = FixtureWeights::new(&spec, seed);

    let onnx_path = out_dir.join(FIXTURE_ONNX_FILE);
    let onnx_tmp = out_dir.join(format!("{FIXTURE_ONNX_FILE}.tmp"));
    let sha256 = write_leuknet_file(&spec, &weights, &onnx_tmp).map_err(|e| match e {
        OnnxWriteError::Io(source) => io(&onnx_tmp)(source),
        other => FixtureError::Graph(other),
    })?;
    std::fs::rename(&onnx_tmp, &onnx_path).map_err(io(&onnx_path))?;

    let card = fixture_card(&spec, width_div, seed, sha256);
    let card_path = out_dir.join(FIXTURE_CARD_FILE);
    let card_tmp = out_dir.join(format!("{FIXTURE_CARD_FILE}.tmp"));
    let mut json = serde_json::to_string_pretty(&card)?;
    json.push('\n');
    std::fs::write(&card_tmp, json).map_err(io(&card_tmp))?;
    std::fs::rename(&card_tmp, &card_path).map_err(io(&card_path))?;
    Ok(card_path)
}

/// The card of a fixture: every field a real card has, and `fixture: true` with warnings that
/// cannot be missed.
fn fixture_card(spec: &LeukNetSpec, width_div: usize, seed: u64, sha256: String) -> ModelCard {
    let mut architecture = spec.architecture_json();
    architecture.insert("width_div".into(), width_div.into());
    architecture.insert(
        "fault_on_white_input".into(),
        spec.fault_on_white_input.into(),
    );
    ModelCard {
        name: FIXTURE_NAME.into(),
        version: format!("0.0.0-fixture.w{width_div}.s{seed}"),
        description: format!(
            "RANDOM WEIGHTS - TEST FIXTURE ONLY. A LeukNet-shaped network (VGG-16 conv base, \
             head {:?}-1, sigmoid; width divided by {width_div}) whose weights are random \
             numbers, not a trained model: its outputs mean nothing.",
            spec.head
        ),
        onnx_file: FIXTURE_ONNX_FILE.into(),
        sha256,
        input: InputSpec::leuknet(spec.input_size as u32),
        outputs: leuknet_outputs(spec),
        probability_output: PROBABILITY_OUTPUT.into(),
        classes: Classes::leuknet(),
        decision: Decision {
            threshold: 0.5,
            chosen_by: "not chosen: random-weight fixture".into(),
            indeterminate: None,
        },
        architecture: architecture.into(),
        training: serde_json::json!({
            "trained": false,
            "init": "random (He normal)",
            "seed": seed,
        }),
        metrics: serde_json::Value::Null,
        intended_use: "tests and benchmarks only".into(),
        disclaimer: "THIS MODEL HAS RANDOM WEIGHTS. It is a test fixture for tests and \
                     benchmarks only: its predictions are meaningless. Never use it on patient \
                     data, never ship it, never base any decision on it."
            .into(),
        fixture: true,
        limitations: vec!["Random weights: its answers mean nothing.".into()],
        explain: Some(ExplainSpec::for_spec(spec)),
        ood: None,
    }
}

/// Seeded weights produced on demand, one tensor at a time: He-normal convolutions and hidden
/// layers, zero biases, and a last layer scaled down by [`CAFFE_PIXEL_SCALE`].
struct FixtureWeights {
    /// name -> (position in the parameter list, number of values, standard deviation)
    tensors: HashMap<String, (u64, usize, f32)>,
    seed: u64,
}

impl FixtureWeights {
    fn new(spec: &LeukNetSpec, seed: u64) -> Self {
        let shapes = spec.parameter_shapes();
        let last_weight = shapes
            .iter()
            .rposition(|(name, _)| name.ends_with(".weight"));
        let tensors = shapes
            .iter()
            .enumerate()
            .map(|(k, (name, shape))| {
                let len = shape.iter().product::<usize>();
                // fan_in: everything but the output axis.
                let fan_in = shape.iter().skip(1).product::<usize>().max(1) as f32;
                let std = if name.ends_with(".bias") {
                    0.0
                } else if Some(k) == last_weight {
                    (1.0 / fan_in).sqrt() / CAFFE_PIXEL_SCALE
                } else {
                    (2.0 / fan_in).sqrt()
                };
                (name.clone(), (k as u64, len, std))
            })
            .collect();
        Self { tensors, seed }
    }
}

impl WeightSource for FixtureWeights {
    fn weight(&self, name: &str) -> Option<Cow<'_, [f32]>> {
        let &(index, len, std) = self.tensors.get(name)?;
        if std == 0.0 {
            return Some(Cow::Owned(vec![0.0; len]));
        }
        // An independent stream per tensor, so tensors can be produced in any order.
        let stream = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut rng = StdRng::seed_from_u64(stream);
        let normal = Normal::new(0.0f32, std).ok()?;
        Some(Cow::Owned(normal.sample_iter(&mut rng).take(len).collect()))
    }

    fn weight_len(&self, name: &str) -> Option<usize> {
        self.tensors.get(name).map(|&(_, len, _)| len)
    }
}
