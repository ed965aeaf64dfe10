//! The ONNX writer against an independent reference: tiny LeukNet graphs are written, run in
//! ONNX Runtime, and compared with a plain-loop forward pass written here from the definition
//! (zero-padded 3x3 conv, ReLU, 2x2 max-pool, linear, sigmoid).

use leuknet::engine::{
    init_runtime, Device, Engine, EngineOptions, SessionTuning, DEFAULT_ORT_LIBRARY,
};
use leuknet::model_card::{Classes, Decision, InputSpec, ModelCard, TensorSpec};
use leuknet::onnx::writer::{
    write_leuknet, InputNormalization, LeukNetSpec, OnnxWriteError, VggLayer, INPUT_NAME,
    LOGIT_OUTPUT, PROBABILITY_OUTPUT,
};
use leuknet::onnx::WeightStorage;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

const BATCH: usize = 3;
const TOLERANCE: f64 = 1e-4;

fn runtime() {
    if let Err(e) = init_runtime(Path::new(DEFAULT_ORT_LIBRARY)) {
        panic!("ONNX Runtime is needed for this test ({e}); run ./scripts/setup first");
    }
}

fn tiny_spec(normalization: Option<InputNormalization>) -> LeukNetSpec {
    LeukNetSpec {
        conv: vec![
            VggLayer::Conv(4),
            VggLayer::MaxPool,
            VggLayer::Conv(8),
            VggLayer::MaxPool,
        ],
        head: vec![8, 4],
        input_size: 16,
        normalization,
        fault_on_white_input: false,
        weight_storage: WeightStorage::Fp32,
    }
}

/// He-uniform weights and small biases, so activations stay of order 1 and logits are not
/// saturated (a saturated sigmoid would hide logit errors).
fn random_weights(spec: &LeukNetSpec, rng: &mut StdRng) -> HashMap<String, Vec<f32>> {
    spec.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let len: usize = shape.iter().product();
            let values = if name.ends_with(".bias") {
                (0..len).map(|_| rng.random_range(-0.1f32..0.1)).collect()
            } else {
                let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
                let bound = (6.0 / fan_in as f32).sqrt();
                (0..len).map(|_| rng.random_range(-bound..bound)).collect()
            };
            (name, values)
        })
        .collect()
}

fn card(spec: &LeukNetSpec, probability_output: &str) -> ModelCard {
    let s = spec.input_size as i64;
    let tensor = |name: &str, shape: Vec<i64>| TensorSpec {
        name: name.into(),
        shape,
    };
    ModelCard {
        name: "writer-test".into(),
        version: "0".into(),
        description: "test".into(),
        onnx_file: "unused.onnx".into(),
        sha256: String::new(),
        input: InputSpec {
            tensor: tensor(INPUT_NAME, vec![-1, 3, s, s]),
            size: spec.input_size as u32,
            channel_order: "RGB".into(),
            layout: "NCHW".into(),
            value_range: [0.0, 1.0],
            resize: "none".into(),
            normalization: "in graph".into(),
        },
        outputs: vec![
            tensor(LOGIT_OUTPUT, vec![-1, 1]),
            tensor(PROBABILITY_OUTPUT, vec![-1, 1]),
        ],
        probability_output: probability_output.into(),
        classes: Classes {
            positive: "p".into(),
            negative: "n".into(),
        },
        decision: Decision {
            threshold: 0.5,
            chosen_by: "test".into(),
            indeterminate: None,
        },
        architecture: serde_json::Value::Null,
        training: serde_json::Value::Null,
        metrics: serde_json::Value::Null,
        intended_use: "test".into(),
        disclaimer: "test".into(),
        fixture: true,
        limitations: Vec::new(),
        explain: None,
        ood: None,
    }
}

/// Runs the model in ONNX Runtime and returns (logits, probabilities). The engine reads the
/// card's `probability_output`, so one engine per output reads both.
fn run_onnx(spec: &LeukNetSpec, model: &[u8], images: &[f32]) -> (Vec<f32>, Vec<f32>) {
    runtime();
    let options = EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
    };
    let read = |output: &str| {
        let mut engine = Engine::load(model, &card(spec, output), &options)
            .unwrap_or_else(|e| panic!("ONNX Runtime rejected the written graph: {e}"));
        engine
            .run(images.to_vec(), BATCH)
            .unwrap_or_else(|e| panic!("running the written graph failed: {e}"))
    };
    (read(LOGIT_OUTPUT), read(PROBABILITY_OUTPUT))
}

// ---- reference forward pass, f64, plain loops ----

struct Map {
    c: usize,
    side: usize,
    v: Vec<f64>,
}

impl Map {
    fn at(&self, c: usize, y: isize, x: isize) -> f64 {
        let s = self.side as isize;
        if y < 0 || x < 0 || y >= s || x >= s {
            0.0
        } else {
            self.v[(c * self.side + y as usize) * self.side + x as usize]
        }
    }
}

fn normalize(image: &[f32], side: usize, n: &InputNormalization) -> Map {
    let mut v = vec![0.0; 3 * side * side];
    for c in 0..3 {
        let src = if n.reverse_channels { 2 - c } else { c };
        for k in 0..side * side {
            let x = image[src * side * side + k] as f64;
            v[c * side * side + k] = (x * n.scale as f64 - n.mean[c] as f64) / n.std[c] as f64;
        }
    }
    Map { c: 3, side, v }
}

fn conv3x3_relu(input: &Map, weight: &[f32], bias: &[f32], out_c: usize) -> Map {
    let s = input.side;
    let mut v = vec![0.0; out_c * s * s];
    for o in 0..out_c {
        for y in 0..s {
            for x in 0..s {
                let mut acc = bias[o] as f64;
                for i in 0..input.c {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let w = weight[((o * input.c + i) * 3 + ky) * 3 + kx] as f64;
                            acc += w * input.at(
                                i,
                                y as isize + ky as isize - 1,
                                x as isize + kx as isize - 1,
                            );
                        }
                    }
                }
                v[(o * s + y) * s + x] = acc.max(0.0);
            }
        }
    }
    Map {
        c: out_c,
        side: s,
        v,
    }
}

fn max_pool(input: &Map) -> Map {
    let s = input.side / 2;
    let mut v = vec![0.0; input.c * s * s];
    for c in 0..input.c {
        for y in 0..s {
            for x in 0..s {
                let mut m = f64::NEG_INFINITY;
                for dy in 0..2 {
                    for dx in 0..2 {
                        m = m.max(input.at(c, (2 * y + dy) as isize, (2 * x + dx) as isize));
                    }
                }
                v[(c * s + y) * s + x] = m;
            }
        }
    }
    Map {
        c: input.c,
        side: s,
        v,
    }
}

fn linear(input: &[f64], weight: &[f32], bias: &[f32]) -> Vec<f64> {
    let n_in = input.len();
    (0..bias.len())
        .map(|o| {
            bias[o] as f64
                + (0..n_in)
                    .map(|i| weight[o * n_in + i] as f64 * input[i])
                    .sum::<f64>()
        })
        .collect()
}

/// Returns (logit, probability) of one image, computed from the layer definitions.
fn reference(spec: &LeukNetSpec, w: &HashMap<String, Vec<f32>>, image: &[f32]) -> (f64, f64) {
    let side = spec.input_size;
    let identity = InputNormalization {
        reverse_channels: false,
        scale: 1.0,
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let mut map = normalize(
        image,
        side,
        spec.normalization.as_ref().unwrap_or(&identity),
    );
    let mut index = 0;
    for layer in &spec.conv {
        match *layer {
            VggLayer::Conv(out_c) => {
                map = conv3x3_relu(
                    &map,
                    &w[&format!("features.{index}.weight")],
                    &w[&format!("features.{index}.bias")],
                    out_c,
                );
                index += 2;
            }
            VggLayer::MaxPool => {
                map = max_pool(&map);
                index += 1;
            }
        }
    }
    let mut x = map.v;
    for j in 0..spec.head.len() {
        let k = 3 * j;
        x = linear(
            &x,
            &w[&format!("classifier.{k}.weight")],
            &w[&format!("classifier.{k}.bias")],
        );
        x.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    let k = 3 * spec.head.len();
    let logit = linear(
        &x,
        &w[&format!("classifier.{k}.weight")],
        &w[&format!("classifier.{k}.bias")],
    );
    assert_eq!(logit.len(), 1);
    (logit[0], 1.0 / (1.0 + (-logit[0]).exp()))
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// A tiny graph with random weights, written, and `BATCH` random images for it.
struct Written {
    spec: LeukNetSpec,
    weights: HashMap<String, Vec<f32>>,
    model: Vec<u8>,
    images: Vec<f32>,
    image_len: usize,
}

fn written(normalization: Option<InputNormalization>, seed: u64) -> Written {
    let spec = tiny_spec(normalization);
    let mut rng = StdRng::seed_from_u64(seed);
    let weights = random_weights(&spec, &mut rng);
    let image_len = 3 * spec.input_size * spec.input_size;
    let images: Vec<f32> = (0..BATCH * image_len)
        .map(|_| rng.random::<f32>())
        .collect();
    let model = write_leuknet(&spec, &weights).expect("tiny spec with all weights writes");
    Written {
        spec,
        weights,
        model,
        images,
        image_len,
    }
}

fn check_against_reference(normalization: Option<InputNormalization>, seed: u64) {
    let Written {
        spec,
        weights,
        model,
        images,
        image_len,
    } = written(normalization, seed);
    let (logits, probabilities) = run_onnx(&spec, &model, &images);

    let expected: Vec<(f64, f64)> = images
        .chunks(image_len)
        .map(|image| reference(&spec, &weights, image))
        .collect();
    let want_logits: Vec<f64> = expected.iter().map(|e| e.0).collect();
    let want_probs: Vec<f64> = expected.iter().map(|e| e.1).collect();
    let d_logit = max_abs_diff(&logits, &want_logits);
    let d_prob = max_abs_diff(&probabilities, &want_probs);
    assert!(
        d_logit <= TOLERANCE && d_prob <= TOLERANCE,
        "ONNX vs reference: logits {logits:?} vs {want_logits:?} (max diff {d_logit:e}), \
         probabilities {probabilities:?} vs {want_probs:?} (max diff {d_prob:e})"
    );
    // The comparison must be able to fail: images should not all give the same answer.
    let spread = want_logits.iter().cloned().fold(f64::MIN, f64::max)
        - want_logits.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 1e-3, "degenerate test: logits {want_logits:?}");

    if let Some(n) = normalization {
        // Without the channel reversal the reference must disagree, or the test proves nothing.
        let unreversed = tiny_spec(Some(InputNormalization {
            reverse_channels: false,
            ..n
        }));
        let other: Vec<f64> = images
            .chunks(image_len)
            .map(|image| reference(&unreversed, &weights, image).0)
            .collect();
        assert!(max_abs_diff(&logits, &other) > 100.0 * TOLERANCE);
    }
}

/// Every session switch the server exposes (arena, memory pattern, spinning, pre-packing)
/// changes how ONNX Runtime runs the graph, never what it computes.
#[test]
fn every_session_tuning_matches_the_reference() {
    let w = written(None, 11);
    let want: Vec<f64> = w
        .images
        .chunks(w.image_len)
        .map(|image| reference(&w.spec, &w.weights, image).1)
        .collect();
    runtime();
    let options = EngineOptions {
        device: Device::Cpu,
        intra_threads: 2,
    };
    let default = SessionTuning::default();
    let flipped = [
        SessionTuning {
            cpu_mem_arena: !default.cpu_mem_arena,
            ..default
        },
        SessionTuning {
            memory_pattern: !default.memory_pattern,
            ..default
        },
        SessionTuning {
            intra_op_spinning: !default.intra_op_spinning,
            ..default
        },
        SessionTuning {
            prepacking: !default.prepacking,
            ..default
        },
    ];
    for tuning in std::iter::once(default).chain(flipped) {
        let mut engine = Engine::load_tuned(
            &w.model,
            &card(&w.spec, PROBABILITY_OUTPUT),
            &options,
            &tuning,
        )
        .unwrap_or_else(|e| panic!("{tuning:?}: session not built: {e}"));
        for _ in 0..2 {
            let probabilities = engine
                .run(w.images.clone(), BATCH)
                .unwrap_or_else(|e| panic!("{tuning:?}: run failed: {e}"));
            let d = max_abs_diff(&probabilities, &want);
            assert!(d <= TOLERANCE, "{tuning:?}: {probabilities:?} vs {want:?}");
        }
    }
}

#[test]
fn matches_reference_without_normalization() {
    check_against_reference(None, 7);
}

#[test]
fn matches_reference_with_reversed_channels_and_mean_std() {
    check_against_reference(
        Some(InputNormalization {
            reverse_channels: true,
            scale: 255.0,
            mean: [100.0, 120.0, 130.0],
            std: [50.0, 60.0, 70.0],
        }),
        11,
    );
}

#[test]
fn vgg16_conv_base_has_13_layers_and_14_714_688_parameters() {
    let shapes = LeukNetSpec::vgg16().parameter_shapes();
    let conv: Vec<_> = shapes
        .iter()
        .filter(|(name, _)| name.starts_with("features."))
        .collect();
    let weights: Vec<&str> = conv
        .iter()
        .filter(|(name, _)| name.ends_with(".weight"))
        .map(|(name, _)| name.as_str())
        .collect();
    let want: Vec<String> = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
        .iter()
        .map(|i| format!("features.{i}.weight"))
        .collect();
    assert_eq!(weights, want);
    let total: usize = conv.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(total, 14_714_688);
    let head: Vec<(&str, &[usize])> = shapes
        .iter()
        .filter(|(name, _)| name.starts_with("classifier."))
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    assert_eq!(
        head,
        vec![
            ("classifier.0.weight", &[1024, 25088][..]),
            ("classifier.0.bias", &[1024][..]),
            ("classifier.3.weight", &[256, 1024][..]),
            ("classifier.3.bias", &[256][..]),
            ("classifier.6.weight", &[1, 256][..]),
            ("classifier.6.bias", &[1][..]),
        ]
    );
    assert_eq!(LeukNetSpec::vgg19().parameter_shapes().len(), 2 * (16 + 3));
}

#[test]
fn width_div_narrows_every_layer() {
    let spec = LeukNetSpec::vgg16().with_width_div(16);
    assert_eq!(spec.conv[0], VggLayer::Conv(4));
    assert_eq!(spec.head, vec![64, 16]);
    assert_eq!(LeukNetSpec::vgg16().with_width_div(10_000).head, vec![1, 1]);
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let spec = tiny_spec(None);
    let mut weights = random_weights(&spec, &mut StdRng::seed_from_u64(1));
    weights.remove("features.3.bias");
    let err = write_leuknet(&spec, &weights).expect_err("a missing tensor must fail");
    assert!(
        matches!(&err, OnnxWriteError::MissingWeight { name, .. } if name == "features.3.bias"),
        "{err:?}"
    );
    assert!(err.to_string().contains("features.3.bias"), "{err}");
}

#[test]
fn wrong_sized_tensor_is_an_error_naming_it() {
    let spec = tiny_spec(None);
    let mut weights = random_weights(&spec, &mut StdRng::seed_from_u64(2));
    weights
        .get_mut("classifier.3.weight")
        .expect("present")
        .pop();
    let err = write_leuknet(&spec, &weights).expect_err("a short tensor must fail");
    assert!(
        matches!(&err, OnnxWriteError::WrongSize { name, got: 31, expected: 32, .. }
            if name == "classifier.3.weight"),
        "{err:?}"
    );
    assert!(err.to_string().contains("classifier.3.weight"), "{err}");
}

#[test]
fn spec_that_pools_to_nothing_is_rejected() {
    let mut spec = tiny_spec(None);
    spec.input_size = 3;
    let weights = random_weights(&spec, &mut StdRng::seed_from_u64(3));
    assert!(matches!(
        write_leuknet(&spec, &weights),
        Err(OnnxWriteError::InvalidSpec(_))
    ));
}

/// fp16 and int8 storage: ONNX Runtime must compute exactly what the reference computes with the
/// stored (rounded) weights, and int8 must differ measurably from the unrounded weights, or the
/// dequantisation would not be exercised.
#[test]
fn converted_weight_storage_matches_reference_on_rounded_weights() {
    for (storage, seed) in [(WeightStorage::Fp16, 21), (WeightStorage::Int8, 22)] {
        let spec = tiny_spec(Some(InputNormalization::caffe_vgg16())).with_weight_storage(storage);
        let mut rng = StdRng::seed_from_u64(seed);
        let weights = random_weights(&spec, &mut rng);
        let shapes: HashMap<String, Vec<usize>> = spec.parameter_shapes().into_iter().collect();
        let rounded: HashMap<String, Vec<f32>> = weights
            .iter()
            .map(|(name, values)| {
                (
                    name.clone(),
                    storage.round_trip(name, &shapes[name], values),
                )
            })
            .collect();
        let image_len = 3 * spec.input_size * spec.input_size;
        let images: Vec<f32> = (0..BATCH * image_len)
            .map(|_| rng.random::<f32>())
            .collect();

        let model = write_leuknet(&spec, &weights).expect("writes");
        let (logits, _) = run_onnx(&spec, &model, &images);
        let want: Vec<f64> = images
            .chunks(image_len)
            .map(|image| reference(&spec, &rounded, image).0)
            .collect();
        let d = max_abs_diff(&logits, &want);
        assert!(
            d <= TOLERANCE,
            "{storage}: ONNX {logits:?} vs rounded reference {want:?} ({d:e})"
        );
        if storage == WeightStorage::Int8 {
            let exact: Vec<f64> = images
                .chunks(image_len)
                .map(|image| reference(&spec, &weights, image).0)
                .collect();
            assert!(
                max_abs_diff(&logits, &exact) > 10.0 * TOLERANCE,
                "int8 logits equal the f32 ones: the weights were not quantised"
            );
        }
    }
}

#[test]
fn converted_weight_storage_shrinks_the_file() {
    let spec = LeukNetSpec::vgg16().with_width_div(8);
    let weights: HashMap<String, Vec<f32>> = spec
        .parameter_shapes()
        .into_iter()
        .map(|(n, s)| (n, vec![0.25; s.iter().product()]))
        .collect();
    let size = |storage| {
        write_leuknet(&spec.clone().with_weight_storage(storage), &weights)
            .expect("writes")
            .len() as f64
    };
    let fp32 = size(WeightStorage::Fp32);
    let fp16 = size(WeightStorage::Fp16) / fp32;
    let int8 = size(WeightStorage::Int8) / fp32;
    assert!(fp16 < 0.55, "fp16 file is {fp16:.3} of fp32");
    assert!(int8 < 0.30, "int8 file is {int8:.3} of fp32");
}
