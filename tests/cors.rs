//! CORS: off by default (no `Access-Control-*` header at all), and with
//! `--cors-allow-origins` exactly the listed origins may call the API from a browser, preflight
//! included, even when API keys are required.

mod common;

use common::*;

const LIS: &str = "https://lis.example.org";

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(40, 30, image::Rgb([210, 150, 170]));
    png_of(&img)
}

async fn preflight(server: &Server, origin: &str) -> reqwest::Response {
    server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/v1/classify"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-accession-id,authorization",
        )
        .send()
        .await
        .unwrap()
}

/// POSTs the PNG from the LIS origin, with `key` as a bearer token when given.
async fn classify_from_lis(server: &Server, key: Option<&str>) -> reqwest::Response {
    let mut request = server
        .client
        .post(server.url("/v1/classify"))
        .header("origin", LIS)
        .header("content-type", "image/png");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.body(png()).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default() {
    let server = Server::start(&fixture_card(16), &[]).await;
    let r = preflight(&server, LIS).await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = classify_from_lis(&server, None).await;
    assert_eq!(r.status(), 200);
    assert!(r
        .headers()
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_origins_only_and_preflight_before_authentication() {
    let key = "cors-test-key";
    let server = Server::start(
        &fixture_card(16),
        &[
            (
                "LEUKNET_CORS_ALLOW_ORIGINS",
                "https://other.example, https://lis.example.org",
            ),
            (
                "LEUKNET_API_KEYS",
                &format!("lis:{}", leuknet::model_card::sha256_hex(key.as_bytes())),
            ),
        ],
    )
    .await;
    let r = preflight(&server, LIS).await;
    assert!(r.status().is_success(), "preflight {}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], LIS);
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in ["content-type", "x-accession-id", "authorization"] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    // Another origin gets no permission; a real request from the listed one does.
    let r = preflight(&server, "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = classify_from_lis(&server, Some(key)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], LIS);
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );
    // CORS grants no access by itself: without the key it is still 401.
    let r = classify_from_lis(&server, None).await;
    assert_error(r, 401, "unauthorized").await;
}
