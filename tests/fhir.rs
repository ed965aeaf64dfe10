//! Lab-system features of `POST /v1/classify` on the real server: the accession and specimen
//! identifiers (multipart fields or headers, echoed, logged, refused when bad) and the FHIR R4
//! Bundle answered to `Accept: application/fhir+json`, validated with a real FHIR library
//! (fhir.resources in .native/venv-test, installed by ./scripts/setup-test).
//!
//! Every bad-input case runs alongside a good request, which must still be answered correctly.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const FHIR: &str = "application/fhir+json";

/// The venv's Python with fhir.resources, or None (skip) when the test tools were never
/// installed; a panic when `.native/test-tools.ready` says they were.
fn validator() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".native/venv-test/bin/python");
    let usable = python.is_file()
        && Command::new(&python)
            .args(["-c", "import fhir.resources.R4B.bundle"])
            .status()
            .is_ok_and(|s| s.success());
    if usable {
        return Some(python);
    }
    assert!(
        !root.join(".native/test-tools.ready").exists(),
        ".native/test-tools.ready exists but .native/venv-test has no fhir.resources: \
         rerun ./scripts/setup-test"
    );
    eprintln!(
        "skipping the FHIR library validation: .native/venv-test is missing \
         (run ./scripts/setup-test, or ./scripts/setup --test)"
    );
    None
}

/// Runs tests/fhir/validate.py on a body; panics with its report unless valid.
fn validate(python: &Path, body: &str, name: &str) {
    let file = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fhir-{}-{name}.json", std::process::id()));
    std::fs::write(&file, body).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fhir/validate.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(&file)
        .output()
        .expect("run validate.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name}: {report}");
    assert!(report.contains("valid FHIR R4 Bundle"), "{report}");
    eprintln!("{}", report.trim());
}

/// The text without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn entries<'a>(bundle: &'a Value, resource_type: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == resource_type)
        .collect()
}

fn component(obs: &Value, code: &str) -> f64 {
    obs["component"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"]["coding"][0]["code"] == code)
        .and_then(|c| c["valueQuantity"]["value"].as_f64())
        .unwrap_or_else(|| panic!("component {code} in {obs}"))
}

fn multipart(parts: &[(&str, Vec<u8>)], fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    for (name, bytes) in parts {
        form = form.part(
            "image",
            reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.to_string()),
        );
    }
    form
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_bundles_of_real_images_validate_and_match_the_json_answer() {
    let Some(images) = real_images() else { return };
    let python = validator();
    let card = fixture_card(16);
    let server = Server::start(&card, &[]).await;
    let url = server.url("/v1/classify");
    let parts: Vec<(&str, Vec<u8>)> = vec![
        ("Im001_1.jpg", images[0].1.clone()),
        ("001.bmp", images[1].1.clone()),
        ("aria.jpg", images[2].1.clone()),
    ];
    let fields = [
        ("accession_id", "ACC-2024/0001"),
        ("specimen_id", "SP.1:a_b"),
    ];

    // The JSON answer (the default), identifiers echoed at the top and in every result.
    let resp = server
        .client
        .post(&url)
        .multipart(multipart(&parts, &fields))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(resp.headers()["vary"], "accept");
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["accession_id"], "ACC-2024/0001");
    assert_eq!(json["specimen_id"], "SP.1:a_b");
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert_eq!(r["accession_id"], "ACC-2024/0001");
        assert_eq!(r["specimen_id"], "SP.1:a_b");
    }

    // The same request as FHIR: a valid Bundle with the same answers.
    let resp = server
        .client
        .post(&url)
        .header("accept", "application/json;q=0.5, application/fhir+json")
        .header("x-request-id", "lab-run-7")
        .multipart(multipart(&parts, &fields))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with(FHIR), "{ct}");
    assert_eq!(resp.headers()["vary"], "accept");
    let text = resp.text().await.unwrap();
    let bundle: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "collection");
    assert_eq!(bundle["identifier"]["value"], "lab-run-7");
    let devices = entries(&bundle, "Device");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["deviceName"][0]["name"], "leuknet-fixture");
    assert_eq!(devices[0]["type"]["text"], "AI model");
    let observations = entries(&bundle, "Observation");
    assert_eq!(observations.len(), 3);
    assert_eq!(entries(&bundle, "Media").len(), 3);
    for (o, r) in observations.iter().zip(results) {
        assert_eq!(o["status"], "preliminary");
        assert_eq!(o["meta"]["security"][0]["code"], "AIAST");
        assert_eq!(o["valueCodeableConcept"]["coding"][0]["code"], r["label"]);
        let p = component(o, "probability-leukemic");
        assert!((p - r["probability"].as_f64().unwrap()).abs() < 1e-6);
        assert_eq!(
            o["derivedFrom"][0]["identifier"]["value"],
            r["image"]["sha256"]
        );
        assert_eq!(o["basedOn"][0]["identifier"]["value"], "ACC-2024/0001");
        assert_eq!(o["specimen"]["identifier"]["value"], "SP.1:a_b");
    }
    if let Some(py) = &python {
        validate(py, &text, "multipart");
    }

    // A raw body carries its identifiers in headers; Accept without q-values.
    let resp = server
        .client
        .post(&url)
        .header("content-type", "image/jpeg")
        .header("accept", FHIR)
        .header("x-accession-id", "ACC-9")
        .header("x-specimen-id", "SP-9")
        .body(images[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let bundle: Value = serde_json::from_str(&text).unwrap();
    let o = entries(&bundle, "Observation")[0];
    assert_eq!(o["basedOn"][0]["identifier"]["value"], "ACC-9");
    assert_eq!(o["specimen"]["identifier"]["value"], "SP-9");
    if let Some(py) = &python {
        validate(py, &text, "raw");
    }

    // The identifiers are in the request's log line (ANSI colours removed).
    let log = strip_ansi(&server.log_text());
    assert!(
        log.contains("accession_id=ACC-2024/0001") && log.contains("specimen_id=SP-9"),
        "identifiers in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_header_picks_json_or_fhir() {
    let Some(images) = real_images() else { return };
    let server = Server::start(&fixture_card(16), &[]).await;
    let jpeg = images[0].1.clone();
    for (accept, fhir) in [
        (None, false),
        (Some("*/*"), false),
        (Some("application/json"), false),
        (
            Some("application/fhir+json;q=0.4, application/json;q=0.6"),
            false,
        ),
        (Some("application/fhir+json, */*;q=0.1"), true),
        (Some("application/fhir+json; fhirVersion=4.0"), true),
    ] {
        let mut req = server
            .client
            .post(server.url("/v1/classify"))
            .header("content-type", "image/jpeg")
            .body(jpeg.clone());
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{accept:?}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let body: Value = resp.json().await.unwrap();
        if fhir {
            assert!(ct.starts_with(FHIR), "{accept:?}: {ct}");
            assert_eq!(body["resourceType"], "Bundle", "{accept:?}");
        } else {
            assert!(ct.starts_with("application/json"), "{accept:?}: {ct}");
            assert!(body["results"].is_array(), "{accept:?}");
            // No identifiers given: none echoed.
            assert!(body.get("accession_id").is_none() && body.get("specimen_id").is_none());
            assert!(body["results"][0].get("accession_id").is_none());
        }
    }
}

/// A good JSON request with identifiers, sent at the same time as a bad one.
async fn good_request(server: &Server, bytes: &[u8]) {
    let resp = server
        .client
        .post(server.url("/v1/classify"))
        .header("content-type", "image/jpeg")
        .header("x-accession-id", "GOOD-1")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "good request alongside a bad one");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accession_id"], "GOOD-1");
    assert_eq!(body["results"][0]["accession_id"], "GOOD-1");
    let p = body["results"][0]["probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_identifiers_and_bad_fhir_requests_get_json_errors_and_disturb_nothing() {
    let Some(images) = real_images() else { return };
    let good = images[0].1.clone();
    let server = Server::start(&fixture_card(16), &[]).await;
    let c = &server.client;
    let url = server.url("/v1/classify");
    let raw = |accept: &str| {
        c.post(&url)
            .header("content-type", "image/jpeg")
            .header("accept", accept)
            .body(good.clone())
    };
    let form = |fields: &[(&str, &str)]| multipart(&[("a.jpg", good.clone())], fields);
    let long = "A".repeat(65);

    type Case = (&'static str, reqwest::RequestBuilder, u16, &'static str);
    let cases: Vec<Case> = vec![
        (
            "header with a space",
            raw("application/json").header("x-accession-id", "ACC 1"),
            400,
            "invalid_identifier",
        ),
        (
            "header with a semicolon, FHIR asked",
            raw(FHIR).header("x-specimen-id", "S;1"),
            400,
            "invalid_identifier",
        ),
        (
            "header not ASCII",
            raw(FHIR).header(
                "x-specimen-id",
                reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            ),
            400,
            "invalid_identifier",
        ),
        (
            "field of 65 characters",
            c.post(&url).multipart(form(&[("accession_id", &long)])),
            400,
            "invalid_identifier",
        ),
        (
            "empty field",
            c.post(&url).multipart(form(&[("specimen_id", "")])),
            400,
            "invalid_identifier",
        ),
        (
            "header and field differ",
            c.post(&url)
                .header("accept", FHIR)
                .header("x-accession-id", "ACC-1")
                .multipart(form(&[("accession_id", "ACC-2")])),
            400,
            "invalid_identifier",
        ),
        (
            "two fields differ",
            c.post(&url)
                .multipart(form(&[("specimen_id", "S-1"), ("specimen_id", "S-2")])),
            400,
            "invalid_identifier",
        ),
        (
            "FHIR asked for a non-image",
            c.post(&url)
                .header("content-type", "image/png")
                .header("accept", FHIR)
                .header("x-accession-id", "ACC-3")
                .body("not an image"),
            422,
            "not_an_image",
        ),
        (
            "FHIR asked, multipart without image",
            c.post(&url)
                .header("accept", FHIR)
                .multipart(reqwest::multipart::Form::new().text("accession_id", "ACC-4")),
            400,
            "missing_image",
        ),
    ];
    for (what, req, status, code) in cases {
        let (bad, ()) = tokio::join!(
            async { req.send().await.unwrap_or_else(|e| panic!("{what}: {e}")) },
            good_request(&server, &good)
        );
        let ct = bad.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            ct.starts_with("application/json"),
            "{what}: errors stay JSON, got {ct}"
        );
        let body = assert_error(bad, status, code).await;
        // Bad values are never echoed back.
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("S;1") && !message.contains("ACC 1"),
            "{what}: {message}"
        );
    }
    // Agreeing header and field are fine.
    let resp = c
        .post(&url)
        .header("x-accession-id", "ACC-5")
        .multipart(form(&[("accession_id", "ACC-5")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = server.metrics().await;
    let n = metric_value(
        &metrics,
        "leuknet_failures_total",
        "reason=\"invalid_identifier\"",
    );
    assert_eq!(n, Some(7.0), "{metrics}");
    let resp = c.get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Every optional part (indeterminate label and band, OOD figures, identifiers, file name)
/// in one Bundle, built by the library from a made-up answer, passes the FHIR library too.
#[test]
fn a_bundle_with_every_optional_component_validates() {
    let Some(python) = validator() else { return };
    let card = leuknet::model_card::ModelCard::load(&fixture_card(16)).unwrap();
    let result = |label: &str, p: f64, extra: Value| {
        let mut r = serde_json::json!({
            "label": label, "probability": p, "threshold": card.decision.threshold,
            "indeterminate_band": {"low": 0.4, "high": 0.6},
            "ood_score": null, "ood_threshold": null, "in_distribution": null,
            "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
            "execution_provider": "cpu",
            "timings": {"decode_ms": 1.0, "queue_ms": 0.0, "inference_ms": 9.0},
            "image": {"width": 640, "height": 480, "format": "tiff",
                      "sha256": "0".repeat(64), "filename": "slide 1.tif"},
            "disclaimer": card.disclaimer,
            "accession_id": "ACC-1", "specimen_id": "SP-1",
        });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let response = serde_json::json!({
        "request_id": "req 1",
        "accession_id": "ACC-1", "specimen_id": "SP-1",
        "results": [
            result("leukemic", 0.9, serde_json::json!({"ood_score": 1.5, "ood_threshold": 4.0, "in_distribution": true})),
            result("indeterminate", 0.5, serde_json::json!({"ood_score": 7.25, "ood_threshold": 4.0, "in_distribution": false})),
            result("healthy", 0.01, serde_json::json!({"image": {"width": 1, "height": 1, "format": "bmp", "sha256": "f".repeat(64)}})),
        ]
    });
    let bundle = leuknet::http::fhir::bundle(
        &response,
        &card,
        std::time::SystemTime::now(),
        uuid::Uuid::new_v4(),
    );
    let obs = entries(&bundle, "Observation");
    assert_eq!(obs.len(), 3);
    assert_eq!(component(obs[1], "ood-score"), 7.25);
    validate(&python, &bundle.to_string(), "synthetic");
}
