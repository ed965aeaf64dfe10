//! Random-weight fixtures: written, loaded through the card checks, run; and refused once the
//! model file or the card is tampered with.

use leuknet::engine::{load_from_card, Device, EngineError, EngineOptions, DEFAULT_ORT_LIBRARY};
use leuknet::fixture::{write_fixture, FIXTURE_ONNX_FILE};
use leuknet::model_card::{CardError, ModelCard};
use std::path::{Path, PathBuf};

const WIDTH_DIV: usize = 16;

fn options() -> EngineOptions {
    if let Err(e) = leuknet::engine::init_runtime(Path::new(DEFAULT_ORT_LIBRARY)) {
        panic!("ONNX Runtime is needed for this test ({e}); run ./scripts/setup first");
    }
    EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
    }
}

fn fixture(dir: &tempfile::TempDir) -> PathBuf {
    write_fixture(dir.path(), WIDTH_DIV, 3).expect("fixture writes")
}

/// A smooth, smear-like image: pinkish background with darker purple blobs, in [0, 1].
fn image(side: usize, phase: f32) -> Vec<f32> {
    let mut v = vec![0.0f32; 3 * side * side];
    let base = [0.85f32, 0.7, 0.8];
    let cell = [0.45f32, 0.25, 0.6];
    for y in 0..side {
        for x in 0..side {
            let (fx, fy) = (x as f32 / side as f32, y as f32 / side as f32);
            let blob = ((fx * 9.0 + phase).sin() * (fy * 7.0 - phase).cos())
                .max(0.0)
                .powi(2);
            for c in 0..3 {
                v[(c * side + y) * side + x] = base[c] * (1.0 - blob) + cell[c] * blob;
            }
        }
    }
    v
}

#[test]
fn fixture_loads_and_gives_distinct_unsaturated_probabilities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let card_path = fixture(&dir);
    let (card, mut engine) = load_from_card(&card_path, &options()).expect("fixture loads");
    assert!(card.fixture);
    assert!(
        card.disclaimer.contains("RANDOM WEIGHTS"),
        "{}",
        card.disclaimer
    );
    assert!(
        card.description.contains("RANDOM WEIGHTS"),
        "{}",
        card.description
    );
    assert_eq!(card.training["trained"], false);
    assert_eq!(card.input.resize, leuknet::preprocess::RESIZE_METHOD);
    assert_eq!(card.architecture["width_div"], WIDTH_DIV);
    assert_eq!(engine.provider(), "cpu");

    let side = card.input.size as usize;
    let mut batch = image(side, 0.0);
    batch.extend(image(side, 2.0));
    let p = engine.run(batch, 2).expect("runs");
    assert_eq!(p.len(), 2);
    for &q in &p {
        assert!(q.is_finite() && q > 0.0 && q < 1.0, "probabilities {p:?}");
    }
    assert!(
        (p[0] - p[1]).abs() > 1e-6,
        "two different images gave {p:?}"
    );
}

#[test]
fn fixture_is_deterministic_in_its_seed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(FIXTURE_ONNX_FILE)).unwrap();
    write_fixture(a.path(), 32, 5).unwrap();
    write_fixture(b.path(), 32, 5).unwrap();
    assert_eq!(read(&a), read(&b));
    write_fixture(b.path(), 32, 6).unwrap();
    assert_ne!(read(&a), read(&b));
    assert!(write_fixture(b.path(), 0, 6).is_err());
}

#[test]
fn corrupted_model_fails_the_sha256_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let card_path = fixture(&dir);
    let onnx = dir.path().join(FIXTURE_ONNX_FILE);
    let mut bytes = std::fs::read(&onnx).expect("read model");
    let k = bytes.len() / 2;
    bytes[k] ^= 0x01;
    std::fs::write(&onnx, bytes).expect("write model");
    match load_from_card(&card_path, &options()) {
        Err(EngineError::Card(CardError::Sha256Mismatch { .. })) => {}
        Err(e) => panic!("expected a sha256 mismatch, got {e}"),
        Ok(_) => panic!("a corrupted model loaded"),
    }
}

#[test]
fn card_with_another_input_shape_fails_the_graph_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let card_path = fixture(&dir);
    let mut card = ModelCard::load(&card_path).expect("card loads");
    card.input.size = 112;
    card.input.tensor.shape = vec![-1, 3, 112, 112];
    std::fs::write(&card_path, serde_json::to_string_pretty(&card).unwrap()).expect("write card");
    match load_from_card(&card_path, &options()) {
        Err(EngineError::Card(CardError::GraphMismatch(m))) => {
            assert!(m.contains("112"), "{m}")
        }
        Err(e) => panic!("expected a graph mismatch, got {e}"),
        Ok(_) => panic!("a card with the wrong input shape was accepted"),
    }
}
