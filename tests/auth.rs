//! API keys on the real server (fixture model, loopback): with `--api-keys-file` /
//! `--api-keys`, protected routes answer 401 `unauthorized` without a valid
//! `Authorization: Bearer` key and serve with one; health, metrics and the page stay open; the
//! key never reaches the log, its name does; a good request among many bad ones still succeeds.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::time::Duration;

const KEY_A: &str = "lk_test_key_A_9f1c2e7d5b3a4c6e8f0a1b2c3d4e5f60";
const KEY_B: &str = "lk_test_key_B_0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d";
const WRONG: &str = "lk_test_key_WRONG_77777777777777777777777777";

fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A small real PNG, so the test needs no shared data.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([200, (x * 3) as u8, (y * 3) as u8])
    });
    png_of(&img)
}

/// A server with key `lab-a` in a keys file and `lab-b` in LEUKNET_API_KEYS, logging at debug.
async fn server_with_keys(dir: &tempfile::TempDir) -> Server {
    let file = dir.path().join("api-keys");
    std::fs::write(
        &file,
        format!(
            "# leuknet API keys: name:sha256(key)\n\nlab-a:{}  # first lab\n",
            sha(KEY_A)
        ),
    )
    .unwrap();
    let inline = format!("lab-b:{}", sha(KEY_B));
    Server::start(
        &fixture_card(16),
        &[
            ("LEUKNET_API_KEYS_FILE", file.to_str().unwrap()),
            ("LEUKNET_API_KEYS", &inline),
            ("LEUKNET_LOG", "debug"),
        ],
    )
    .await
}

/// The log text without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn classify(server: &Server, auth: Option<&str>) -> reqwest::Response {
    let mut req = server
        .client
        .post(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(png());
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.expect("send")
}

async fn assert_unauthorized(resp: reqwest::Response) {
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert_error(resp, 401, "unauthorized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_every_route_but_health_metrics_and_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_keys(&dir).await;
    let c = &server.client;

    // No key, a wrong key, another scheme, an empty token: 401 with the challenge.
    assert_unauthorized(classify(&server, None).await).await;
    assert_unauthorized(classify(&server, Some(&format!("Bearer {WRONG}"))).await).await;
    assert_unauthorized(classify(&server, Some(&format!("Basic {KEY_A}"))).await).await;
    assert_unauthorized(classify(&server, Some("Bearer ")).await).await;
    // The hash itself is not a key.
    assert_unauthorized(classify(&server, Some(&format!("Bearer {}", sha(KEY_A)))).await).await;
    for path in ["/v1/models", "/openapi.yaml", "/no/such/route"] {
        assert_unauthorized(c.get(server.url(path)).send().await.unwrap()).await;
    }

    // The right keys: a real classification, from the file's key and the variable's.
    for (key, scheme) in [(KEY_A, "Bearer"), (KEY_B, "bearer")] {
        let resp = classify(&server, Some(&format!("{scheme} {key}"))).await;
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        let result = &body["results"][0];
        assert!(
            ["leukemic", "healthy", "indeterminate"].contains(&result["label"].as_str().unwrap()),
            "{body}"
        );
        let p = result["probability"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{body}");
    }
    let models = c
        .get(server.url("/v1/models"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);

    // Open without a key.
    for path in ["/health/live", "/health/ready", "/metrics", "/"] {
        let resp = c.get(server.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }

    // Refusals are counted by reason; the successes by route and status.
    let m = server.metrics().await;
    assert_eq!(
        metric_value(&m, "leuknet_failures_total", "reason=\"unauthorized\""),
        Some(8.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "leuknet_http_requests_total",
            "route=\"/v1/classify\",status=\"401\""
        ),
        Some(5.0),
        "{m}"
    );

    // The log names the key that was used and never holds a key.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = strip_ansi(&server.log_text());
    for secret in [KEY_A, KEY_B, WRONG] {
        assert!(!log.contains(secret), "a key reached the log:\n{log}");
    }
    for name in ["lab-a", "lab-b"] {
        assert!(
            log.contains(&format!("api_key={name}"))
                || log.contains(&format!("api_key=\"{name}\"")),
            "the request span does not name key {name}:\n{log}"
        );
    }
    assert!(log.contains("API keys required"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_request_succeeds_among_concurrent_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_keys(&dir).await;
    let bad: Vec<_> = (0..24)
        .map(|i| {
            let auth = match i % 3 {
                0 => None,
                1 => Some(format!("Bearer {WRONG}{i}")),
                _ => Some(format!("Bearer {}", &KEY_A[..KEY_A.len() - 1])),
            };
            let server = &server;
            async move { classify(server, auth.as_deref()).await.status().as_u16() }
        })
        .collect();
    let good = async { classify(&server, Some(&format!("Bearer {KEY_A}"))).await };
    let (good, bad) = tokio::join!(good, futures::future::join_all(bad));
    assert_eq!(good.status(), 200, "{}", good.text().await.unwrap());
    assert!(bad.iter().all(|s| *s == 401), "{bad:?}");
    assert!(!server.log_text().contains(KEY_A));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_every_route_is_open() {
    let server = Server::start(&fixture_card(16), &[]).await;
    let resp = classify(&server, None).await;
    assert_eq!(resp.status(), 200);
    // A key sent to a server without keys is ignored.
    let resp = classify(&server, Some(&format!("Bearer {WRONG}"))).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_keys_file_stops_the_server_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-keys");
    // A raw key where the hash belongs.
    std::fs::write(&file, format!("lab-a:{KEY_A}\n")).unwrap();
    let mut server = Server::spawn(
        &fixture_card(16),
        &[("LEUKNET_API_KEYS_FILE", file.to_str().unwrap())],
    );
    let status = server.wait_exit(Duration::from_secs(120));
    assert!(!status.success());
    let log = server.log_text();
    assert!(
        log.contains("API keys") && log.contains("64 hex digits"),
        "{log}"
    );
    assert!(!log.contains(KEY_A), "the bad entry was echoed:\n{log}");
}
