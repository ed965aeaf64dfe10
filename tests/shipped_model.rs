//! The shipped default model (`models/leuknet.json` + `models/leuknet.onnx`): its card is
//! complete and honest, its sha256 matches, and the real server loading it reproduces, on real
//! images from `../shared/data`, the reference predictions the exporter recorded in the card
//! (skipping that part with a message where the data are absent).

mod common;

use common::{data_dir, manifest_paths_by_sha256, Server};
use leuknet::model_card::ModelCard;
use std::path::Path;
use std::time::Duration;

/// Largest accepted |p_server - p_card|: the card's values come from ONNX Runtime on the same
/// preprocessing, so only batch-composition rounding separates them.
const PROBABILITY_TOLERANCE: f64 = 1e-3;

fn shipped_card_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/leuknet.json")
}

fn shipped_card() -> ModelCard {
    ModelCard::load(&shipped_card_path()).expect("models/leuknet.json loads")
}

#[test]
fn card_is_a_trained_model_with_matching_sha256() {
    let card = shipped_card();
    assert!(
        !card.fixture,
        "a random-weight fixture must never be shipped"
    );
    let onnx = shipped_card_path().with_file_name(&card.onnx_file);
    card.read_verified_model(&onnx)
        .expect("sha256 of models/leuknet.onnx matches the card");
    let size = std::fs::metadata(&onnx).expect("stat").len();
    assert!(
        size <= 50_000_000,
        "shipped model is {size} bytes (limit 50 MB)"
    );
    assert!(card.decision.threshold > 0.0 && card.decision.threshold < 1.0);
    assert!(!card.decision.chosen_by.is_empty());
    assert!(card.disclaimer.to_lowercase().contains("not"));
    assert!(card.intended_use.to_lowercase().contains("research"));
    for key in ["lodo", "weight_storage", "reference_predictions"] {
        assert!(
            card.metrics.get(key).is_some(),
            "card metrics lack {key:?}: {}",
            card.metrics
        );
    }
    assert!(card.architecture.get("pretrained_weights").is_some());
    assert!(card.training.get("options").is_some());
}

#[tokio::test]
async fn server_reproduces_the_cards_reference_predictions_on_real_images() {
    let card = shipped_card();
    let Some(dir) = data_dir() else {
        eprintln!("skipping: ../shared/data not found (set LEUKNET_DATA)");
        return;
    };
    let by_sha = manifest_paths_by_sha256(&dir);
    let reference = card.metrics["reference_predictions"]
        .as_array()
        .expect("reference_predictions is a list")
        .clone();
    assert!(
        reference.len() >= 20,
        "too few reference images: {}",
        reference.len()
    );

    // The card's reference labels are the plain threshold's: no indeterminate band here (the
    // band is tested in tests/explain.rs).
    let server = Server::start(
        &shipped_card_path(),
        &[("LEUKNET_INDETERMINATE_BAND", "off")],
    )
    .await;
    server.wait_ready(Duration::from_secs(120)).await;
    let threshold = card.decision.threshold as f64;
    let (mut correct, mut correct_card, mut worst) = (0usize, 0usize, 0.0f64);
    for r in &reference {
        let sha = r["sha256"].as_str().expect("sha256");
        let want = r["probability"].as_f64().expect("probability");
        let truth = r["true_label"].as_str().expect("true_label");
        let Some(rel) = by_sha.get(sha) else {
            panic!("reference image {sha} is not in the manifest");
        };
        let bytes = std::fs::read(dir.join(rel)).expect("read image");
        let content_type = match rel
            .rsplit('.')
            .next()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("bmp") => "image/bmp",
            Some("png") => "image/png",
            Some("tif" | "tiff") => "image/tiff",
            _ => "image/jpeg",
        };
        let resp = server.classify_raw(bytes, content_type).await;
        assert_eq!(resp.status(), 200, "{rel}");
        let body: serde_json::Value = resp.json().await.expect("json");
        let result = &body["results"][0];
        let got = result["probability"].as_f64().expect("probability");
        worst = worst.max((got - want).abs());
        assert!(
            (got - want).abs() <= PROBABILITY_TOLERANCE,
            "{rel}: server p = {got}, card p = {want}"
        );
        correct += usize::from(result["label"] == truth);
        correct_card += usize::from((want >= threshold) == (truth == "leukemic"));
    }
    eprintln!(
        "shipped model on {} reference images: server accuracy {correct}/{n}, card {correct_card}/{n}, max |dp| {worst:.2e}",
        reference.len(),
        n = reference.len()
    );
    assert_eq!(
        correct, correct_card,
        "server labels differ from the card's"
    );
}
