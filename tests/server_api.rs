//! End-to-end tests of `leuknet-server`: the real binary on loopback, the real ONNX Runtime,
//! a random-weight fixture model (width / 16) and real images from `../shared/data`.
//!
//! Every bad-input case runs alongside a good request, which must still be answered correctly.

mod common;

use common::*;
use leuknet::engine::{self, Device, EngineOptions};
use leuknet::preprocess::{preprocess, Limits};

/// The probability the model gives one image, computed in this process without HTTP.
fn direct_probability(card: &std::path::Path, bytes: &[u8]) -> f32 {
    engine::init_runtime(std::path::Path::new(engine::DEFAULT_ORT_LIBRARY))
        .expect("ORT: run ./scripts/setup");
    let (_, mut engine) = engine::load_from_card(
        card,
        &EngineOptions {
            device: Device::Cpu,
            intra_threads: 1,
        },
    )
    .unwrap();
    let p = preprocess(bytes, 224, &Limits::default()).unwrap();
    engine.run(p.tensor, 1).unwrap()[0]
}

/// A good request made at the same time as a bad one must succeed with a sane result.
async fn good_request(server: &Server, bytes: &[u8]) {
    let resp = server.classify_raw(bytes.to_vec(), "image/jpeg").await;
    assert_eq!(resp.status(), 200, "good request alongside a bad one");
    let body: serde_json::Value = resp.json().await.unwrap();
    let p = body["results"][0]["probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_raw_and_multipart_match_direct_inference() {
    let Some(images) = real_images() else { return };
    let card = fixture_card(16);
    let server = Server::start(&card, &[]).await;

    // Raw body, one image.
    let (_, jpeg, _) = &images[0];
    let resp = server.classify_raw(jpeg.clone(), "image/jpeg").await;
    assert_eq!(resp.status(), 200);
    let timing = resp.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        timing.contains("inference;dur=") && timing.contains("queue;dur="),
        "{timing}"
    );
    assert!(!resp.headers()["x-request-id"].is_empty());
    let body: serde_json::Value = resp.json().await.unwrap();
    let r = &body["results"][0];
    let expected = direct_probability(&card, jpeg);
    let got = r["probability"].as_f64().unwrap() as f32;
    assert!(
        (got - expected).abs() < 1e-5,
        "server {got} vs direct {expected}"
    );
    let threshold = r["threshold"].as_f64().unwrap() as f32;
    let label = if got >= threshold {
        "leukemic"
    } else {
        "healthy"
    };
    assert_eq!(r["label"], label);
    assert_eq!(r["image"]["format"], "jpeg");
    assert_eq!(r["image"]["width"], 103);
    assert_eq!(r["image"]["sha256"], leuknet::model_card::sha256_hex(jpeg));
    assert_eq!(r["execution_provider"], "cpu");
    assert_eq!(r["model"]["name"], "leuknet-fixture");
    assert!(r["disclaimer"].as_str().unwrap().len() > 10);
    for k in ["decode_ms", "queue_ms", "inference_ms"] {
        assert!(r["timings"][k].as_f64().unwrap() >= 0.0, "{k}");
    }

    // Multipart, several images of several formats (TIFF and PNG made from real images),
    // answered in request order.
    let tiff = reencode(jpeg, image::ImageFormat::Tiff);
    let png = reencode(&images[1].1, image::ImageFormat::Png);
    let parts: Vec<(String, Vec<u8>, &str)> = vec![
        ("a.tif".into(), tiff.clone(), "tiff"),
        ("b.bmp".into(), images[1].1.clone(), "bmp"),
        ("c.jpg".into(), images[2].1.clone(), "jpeg"),
        ("d.png".into(), png.clone(), "png"),
    ];
    let mut form = reqwest::multipart::Form::new().text("note", "ignored field");
    for (name, bytes, _) in &parts {
        form = form.part(
            "image",
            reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
        );
    }
    let resp = server
        .client
        .post(server.url("/v1/classify"))
        .header("x-request-id", "lis-accession-42")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "lis-accession-42");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], "lis-accession-42");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), parts.len());
    for (r, (name, bytes, format)) in results.iter().zip(&parts) {
        assert_eq!(r["image"]["filename"], name.as_str());
        assert_eq!(r["image"]["format"], *format);
        let expected = direct_probability(&card, bytes);
        let got = r["probability"].as_f64().unwrap() as f32;
        assert!(
            (got - expected).abs() < 1e-5,
            "{name}: server {got} vs direct {expected}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_clear_json_error_and_disturbs_nothing() {
    let Some(images) = real_images() else { return };
    let good = images[0].1.clone();
    let card = fixture_card(16);
    let server = Server::start(
        &card,
        &[
            ("LEUKNET_MAX_BODY_BYTES", "1000000"),
            ("LEUKNET_MAX_PIXELS", "4000000"),
            ("LEUKNET_MAX_IMAGES_PER_REQUEST", "3"),
        ],
    )
    .await;
    let c = &server.client;
    let classify = server.url("/v1/classify");

    // A PNG header that claims 50000 x 50000 pixels (a decompression bomb).
    let bomb = png_header_claiming(50_000, 50_000);
    let truncated = good[..good.len() / 2].to_vec();
    let mut corrupt = good.clone();
    for b in corrupt.iter_mut().skip(200).take(400) {
        *b = 0x5a;
    }
    let too_many = {
        let mut f = reqwest::multipart::Form::new();
        for _ in 0..4 {
            f = f.part(
                "image",
                reqwest::multipart::Part::bytes(good.clone()).file_name("x.jpg"),
            );
        }
        f
    };

    type Case = (&'static str, reqwest::RequestBuilder, u16, &'static str);
    let cases: Vec<Case> = vec![
        (
            "empty body",
            c.post(&classify).header("content-type", "image/jpeg"),
            400,
            "empty_body",
        ),
        (
            "not an image",
            c.post(&classify)
                .header("content-type", "image/png")
                .body("hello, I am text"),
            422,
            "not_an_image",
        ),
        (
            "truncated",
            c.post(&classify)
                .header("content-type", "image/jpeg")
                .body(truncated),
            422,
            "corrupt_image",
        ),
        (
            "corrupt",
            c.post(&classify)
                .header("content-type", "image/jpeg")
                .body(corrupt),
            422,
            "corrupt_image",
        ),
        (
            "unsupported type",
            c.post(&classify)
                .header("content-type", "application/pdf")
                .body(good.clone()),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            c.post(&classify).body(good.clone()),
            415,
            "unsupported_media_type",
        ),
        (
            "body too large",
            c.post(&classify)
                .header("content-type", "image/jpeg")
                .body(vec![0xffu8; 1_500_000]),
            413,
            "body_too_large",
        ),
        (
            "pixel bomb",
            c.post(&classify)
                .header("content-type", "image/png")
                .body(bomb),
            413,
            "too_many_pixels",
        ),
        (
            "too many images",
            c.post(&classify).multipart(too_many),
            413,
            "too_many_images",
        ),
        (
            "multipart without image",
            c.post(&classify)
                .multipart(reqwest::multipart::Form::new().text("file", "x")),
            400,
            "missing_image",
        ),
        (
            "unknown route",
            c.get(server.url("/v2/nothing")),
            404,
            "not_found",
        ),
        ("wrong method", c.get(&classify), 405, "method_not_allowed"),
        (
            "wrong method on health",
            c.post(server.url("/health/live")),
            405,
            "method_not_allowed",
        ),
    ];
    for (what, req, status, code) in cases {
        let (bad, ()) = tokio::join!(
            async { req.send().await.unwrap_or_else(|e| panic!("{what}: {e}")) },
            good_request(&server, &good)
        );
        assert_error(bad, status, code).await;
    }
    // The server counted the failures by reason and is still healthy.
    let metrics = server.metrics().await;
    for code in [
        "empty_body",
        "not_an_image",
        "too_many_pixels",
        "body_too_large",
    ] {
        let n = metric_value(
            &metrics,
            "leuknet_failures_total",
            &format!("reason=\"{code}\""),
        );
        assert!(
            n.unwrap_or(0.0) >= 1.0,
            "failures for {code} in:\n{metrics}"
        );
    }
    let resp = c.get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_page() {
    let Some(images) = real_images() else { return };
    let card = fixture_card(16);
    let server = Server::start(&card, &[("LEUKNET_MAX_BATCH_SIZE", "4")]).await;
    let c = &server.client;

    assert_eq!(
        c.get(server.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let models: serde_json::Value = c
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &models["models"][0];
    assert_eq!(m["card"]["name"], "leuknet-fixture");
    assert_eq!(m["card"]["fixture"], true);
    assert_eq!(m["runtime"]["execution_provider"], "cpu");
    assert_eq!(m["runtime"]["max_batch_size"], 4);
    assert_eq!(m["ready"], true);

    for (_, bytes, ct) in &images {
        assert_eq!(server.classify_raw(bytes.clone(), ct).await.status(), 200);
    }
    let text = server.metrics().await;
    for name in [
        "leuknet_http_requests_total",
        "leuknet_failures_total",
        "leuknet_http_request_duration_seconds",
        "leuknet_queue_duration_seconds",
        "leuknet_preprocess_duration_seconds",
        "leuknet_inference_duration_seconds",
        "leuknet_batch_size_images",
        "leuknet_queue_depth_images",
        "leuknet_http_requests_in_flight",
        "leuknet_images_inferred_total",
        "leuknet_batch_executions_total",
        "leuknet_predictions_total",
        "leuknet_prediction_probability_ratio",
        "leuknet_model_info",
        "leuknet_ready",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "HELP for {name}");
    }
    // Warm-up batches are not counted as inferred images: only the 3 real ones are.
    assert_eq!(
        metric_value(&text, "leuknet_images_inferred_total", ""),
        Some(3.0)
    );
    assert!(text.contains("execution_provider=\"cpu\""));
    assert!(
        text.contains("route=\"/v1/classify\",status=\"200\"")
            || text.contains("method=\"POST\",route=\"/v1/classify\",status=\"200\"")
    );
    let predictions: f64 = text
        .lines()
        .filter(|l| l.starts_with("leuknet_predictions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(predictions, 3.0);
    assert_eq!(metric_value(&text, "leuknet_ready", ""), Some(1.0));

    let page = c.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    // The page (src/http/page/): the file input, and script only from a file, never inline.
    assert!(html.contains("name=\"image\"") && html.contains("src=\"/assets/app.js"));
    assert!(html.matches("<script").count() == html.matches("<script src=").count());

    let yaml = c
        .get(server.url("/openapi.yaml"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(yaml.starts_with("openapi: 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched() {
    let Some(images) = real_images() else { return };
    let card = fixture_card(4);
    let server = Server::start(
        &card,
        &[
            ("LEUKNET_MAX_BATCH_SIZE", "8"),
            ("LEUKNET_MAX_QUEUE_DELAY_MS", "20"),
            ("LEUKNET_INTRA_THREADS", "2"),
        ],
    )
    .await;
    let bytes = images[0].1.clone();
    let before = server.metrics().await;
    let batches_before = metric_value(&before, "leuknet_batch_executions_total", "").unwrap();
    let responses = futures::future::join_all(
        (0..24).map(|_| server.classify_raw(bytes.clone(), "image/jpeg")),
    )
    .await;
    let mut probabilities = Vec::new();
    for r in responses {
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        probabilities.push(v["results"][0]["probability"].as_f64().unwrap());
    }
    // Same image, same answer, whatever batch it landed in.
    assert!(
        probabilities
            .iter()
            .all(|p| (p - probabilities[0]).abs() < 1e-5),
        "{probabilities:?}"
    );
    let after = server.metrics().await;
    let batches =
        metric_value(&after, "leuknet_batch_executions_total", "").unwrap() - batches_before;
    assert!(
        batches < 24.0,
        "24 concurrent images ran in {batches} batches: no batching"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cards_colour_normalisation_is_applied_as_in_training() {
    let Some(images) = real_images() else { return };
    // A copy of the fixture whose card asks for grayscale input.
    let src = fixture_card(16);
    let dir = tempfile::tempdir().unwrap();
    for f in ["leuknet.onnx", "leuknet.json"] {
        std::fs::copy(src.parent().unwrap().join(f), dir.path().join(f)).unwrap();
    }
    let card_path = dir.path().join("leuknet.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    card["architecture"]["color_normalization"] = serde_json::json!({"kind": "grayscale"});
    std::fs::write(&card_path, card.to_string()).unwrap();

    let server = Server::start(&card_path, &[]).await;
    let bytes = &images[2].1; // an Aria field: strongly coloured
    let resp = server.classify_raw(bytes.clone(), "image/jpeg").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let got = body["results"][0]["probability"].as_f64().unwrap() as f32;

    engine::init_runtime(std::path::Path::new(engine::DEFAULT_ORT_LIBRARY)).unwrap();
    let (_, mut eng) = engine::load_from_card(
        &card_path,
        &EngineOptions {
            device: Device::Cpu,
            intra_threads: 1,
        },
    )
    .unwrap();
    let mut p = preprocess(bytes, 224, &Limits::default()).unwrap();
    let plain = eng.run(p.tensor.clone(), 1).unwrap()[0];
    leuknet::color_norm::ColorNormalization::Grayscale {
        contrast_stretch: false,
    }
    .apply(&mut p.tensor, 224);
    let gray = eng.run(p.tensor, 1).unwrap()[0];
    assert!(
        (got - gray).abs() < 1e-5,
        "server {got} vs grayscale {gray}"
    );
    assert!(
        (plain - gray).abs() > 1e-6,
        "grayscale made no difference; the test proves nothing"
    );
}
