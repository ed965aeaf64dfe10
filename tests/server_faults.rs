//! Overload, deadlines, clients that leave, and graceful shutdown, against the real server with
//! a slower fixture model (width / 2) so that a queue really forms.

mod common;

use common::*;
use std::time::Duration;

fn slow_card() -> std::path::PathBuf {
    fixture_card(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_with_retry_after_then_recovers() {
    let Some(images) = real_images() else { return };
    let bytes = images[0].1.clone();
    let server = Server::start(
        &slow_card(),
        &[
            ("LEUKNET_MAX_BATCH_SIZE", "1"),
            ("LEUKNET_MAX_QUEUE_IMAGES", "2"),
        ],
    )
    .await;
    let responses = futures::future::join_all(
        (0..16).map(|_| server.classify_raw(bytes.clone(), "image/jpeg")),
    )
    .await;
    let (mut ok, mut full) = (0, 0);
    for r in responses {
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry));
                assert_error(r, 429, "queue_full").await;
                full += 1;
            }
            s => panic!("unexpected status {s}: {}", r.text().await.unwrap()),
        }
    }
    assert!(ok >= 1 && full >= 1, "ok {ok}, queue_full {full}");
    // Recovery: once the queue drains, requests are served again.
    assert_eq!(
        server
            .classify_raw(bytes.clone(), "image/jpeg")
            .await
            .status(),
        200
    );
    let m = server.metrics().await;
    assert!(metric_value(&m, "leuknet_failures_total", "reason=\"queue_full\"").unwrap() >= 1.0);
    assert_eq!(
        metric_value(&m, "leuknet_queue_depth_images", ""),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_never_reach_the_model() {
    let Some(images) = real_images() else { return };
    let bytes = images[0].1.clone();
    let server = Server::start(
        &slow_card(),
        &[
            ("LEUKNET_MAX_BATCH_SIZE", "1"),
            ("LEUKNET_REQUEST_TIMEOUT_MS", "250"),
        ],
    )
    .await;
    let before =
        metric_value(&server.metrics().await, "leuknet_images_inferred_total", "").unwrap();
    let n = 16;
    let responses =
        futures::future::join_all((0..n).map(|_| server.classify_raw(bytes.clone(), "image/jpeg")))
            .await;
    let (mut ok, mut expired) = (0, 0);
    for r in responses {
        match r.status().as_u16() {
            200 => ok += 1,
            504 => {
                assert_error(r, 504, "deadline_exceeded").await;
                expired += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(expired >= 1, "no request expired (ok {ok})");
    // Let the engine drain what is left, then count what reached the model.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = server.metrics().await;
    let inferred = metric_value(&m, "leuknet_images_inferred_total", "").unwrap() - before;
    assert!(
        inferred < n as f64,
        "all {n} images were inferred although {expired} expired"
    );
    let skipped = metric_value(
        &m,
        "leuknet_failures_total",
        "reason=\"deadline_exceeded_queued\"",
    )
    .unwrap_or(0.0)
        + metric_value(&m, "leuknet_failures_total", "reason=\"client_gone\"").unwrap_or(0.0);
    assert!(
        skipped >= 1.0,
        "no expired image was skipped by the batcher:\n{m}"
    );
    assert_eq!(server.classify_raw(bytes, "image/jpeg").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_while_queued_are_skipped_and_nothing_leaks() {
    let Some(images) = real_images() else { return };
    let bytes = images[0].1.clone();
    let server = Server::start(&slow_card(), &[("LEUKNET_MAX_BATCH_SIZE", "1")]).await;
    let before =
        metric_value(&server.metrics().await, "leuknet_images_inferred_total", "").unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let n = 12;
    let results = futures::future::join_all((0..n).map(|_| {
        impatient
            .post(server.url("/v1/classify"))
            .header("content-type", "image/jpeg")
            .body(bytes.clone())
            .send()
    }))
    .await;
    let gave_up = results.iter().filter(|r| r.is_err()).count();
    assert!(
        gave_up >= 1,
        "every client got its answer within 200 ms; the test needs a slower model"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = server.metrics().await;
    let inferred = metric_value(&m, "leuknet_images_inferred_total", "").unwrap() - before;
    let gone = metric_value(&m, "leuknet_failures_total", "reason=\"client_gone\"").unwrap_or(0.0);
    assert!(
        gone >= 1.0,
        "no queued image of a departed client was skipped:\n{m}"
    );
    assert!(
        inferred + gone <= n as f64 + 0.5,
        "inferred {inferred} + skipped {gone} > {n}"
    );
    assert_eq!(
        metric_value(&m, "leuknet_queue_depth_images", ""),
        Some(0.0)
    );
    // Only this /metrics request is in flight.
    assert_eq!(
        metric_value(&m, "leuknet_http_requests_in_flight", ""),
        Some(1.0)
    );
    assert_eq!(server.classify_raw(bytes, "image/jpeg").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_accepted_request_and_exits_zero() {
    let Some(images) = real_images() else { return };
    let bytes = images[0].1.clone();
    let mut server = Server::start(&slow_card(), &[("LEUKNET_MAX_BATCH_SIZE", "2")]).await;
    let n = 10;
    let accepted = {
        let c = server.client.clone();
        let url = server.url("/v1/classify");
        let bytes = bytes.clone();
        tokio::spawn(async move {
            futures::future::join_all((0..n).map(|_| {
                c.post(&url)
                    .header("content-type", "image/jpeg")
                    .body(bytes.clone())
                    .send()
            }))
            .await
        })
    };
    // Wait until all of them are in flight (plus this /metrics request).
    let start = std::time::Instant::now();
    loop {
        let m = server.metrics().await;
        if metric_value(&m, "leuknet_http_requests_in_flight", "").unwrap_or(0.0) >= (n + 1) as f64
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "requests never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.sigterm();
    tokio::time::sleep(Duration::from_millis(30)).await;
    // While draining: not ready, and new work is refused with 503.
    let ready = server
        .client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_error(ready, 503, "shutting_down").await;
    let late = server.classify_raw(bytes.clone(), "image/jpeg").await;
    assert_error(late, 503, "shutting_down").await;
    // Every accepted request is answered.
    for r in accepted.await.unwrap() {
        let r = r.expect("an accepted request lost its connection");
        assert_eq!(r.status(), 200);
    }
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        server.log_text()
    );
    assert!(server.log_text().contains("drained"));
}

/// A white PNG: the fault-injecting fixture fails any batch that holds one.
fn white_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_error_fails_only_its_batch() {
    let Some(images) = real_images() else { return };
    let good = images[0].1.clone();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("faulty-{}", std::process::id()));
    let card = leuknet::fixture::write_fixture_with(&dir, 16, 3, true).unwrap();
    // Batch size 1: the white image's batch holds only itself.
    let server = Server::start(&card, &[("LEUKNET_MAX_BATCH_SIZE", "1")]).await;
    let (bad, goods) = tokio::join!(
        server.classify_raw(white_png(), "image/png"),
        futures::future::join_all((0..6).map(|_| server.classify_raw(good.clone(), "image/jpeg")))
    );
    assert_error(bad, 500, "inference_failed").await;
    for r in goods {
        assert_eq!(
            r.status(),
            200,
            "a good request failed next to the faulty batch"
        );
    }
    // The service keeps serving afterwards, and counted the failure.
    assert_eq!(server.classify_raw(good, "image/jpeg").await.status(), 200);
    let m = server.metrics().await;
    // One request answered 500; one image lost to the engine error.
    let failures = |reason: &str| {
        metric_value(
            &m,
            "leuknet_failures_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(failures("inference_failed"), Some(1.0));
    assert_eq!(failures("engine_error_images"), Some(1.0));
    assert_eq!(metric_value(&m, "leuknet_ready", ""), Some(1.0));
}

/// Clients that send half a body and hang up: each is dropped, nothing stays in flight or
/// queued, and a good request made at the same time succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_mid_upload_leak_nothing() {
    use tokio::io::AsyncWriteExt;
    let card = fixture_card(16);
    let server = Server::start(&card, &[]).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let n = 16;
    let quitters = (0..n).map(|_| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
                        Content-Length: 100000\r\n\r\n";
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&[0x89, b'P', b'N', b'G'][..]).await.unwrap();
            s.write_all(&vec![0u8; 4000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(s); // hang up mid-body
        }
    });
    let good = async {
        let png = {
            let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 120, 160]));
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        };
        server.classify_raw(png, "image/png").await.status()
    };
    let (_, status) = tokio::join!(futures::future::join_all(quitters), good);
    assert_eq!(
        status, 200,
        "good request alongside clients leaving mid-upload"
    );
    // The server notices the hang-ups; then nothing is left in flight or queued.
    let start = std::time::Instant::now();
    loop {
        let m = server.metrics().await;
        let in_flight = metric_value(&m, "leuknet_http_requests_in_flight", "").unwrap();
        let gone = metric_value(&m, "leuknet_http_requests_total", "status=\"499\"").unwrap_or(0.0)
            + metric_value(&m, "leuknet_http_requests_total", "status=\"400\"").unwrap_or(0.0);
        if in_flight == 1.0 && gone >= n as f64 {
            assert_eq!(
                metric_value(&m, "leuknet_queue_depth_images", ""),
                Some(0.0)
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "in flight {in_flight}, ended {gone} of {n}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM while 64 clients keep the server saturated: readiness goes false, every request
/// the server took on is answered (the audit log lists what it processed; each of those got
/// its 200), and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_sustained_load_at_concurrency_64_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let card = fixture_card(16);
    let mut server = Server::start(
        &card,
        &[
            ("LEUKNET_AUDIT_LOG", audit.to_str().unwrap()),
            ("LEUKNET_MAX_QUEUE_IMAGES", "256"),
        ],
    )
    .await;
    let png = {
        let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 120, 160]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let client = reqwest::Client::new();
            let url = server.url("/v1/classify");
            let png = png.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut refused, mut failed) = (Vec::new(), 0usize, Vec::new());
                for k in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("c{c}-{k}");
                    let r = client
                        .post(&url)
                        .header("content-type", "image/png")
                        .header("x-accession-id", &id)
                        .body(png.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => ok.push(id),
                        Ok(r) if r.status() == 503 => refused += 1,
                        Ok(r) => panic!("{id}: unexpected status {}", r.status()),
                        Err(e) => {
                            failed.push((id, e.to_string()));
                            break; // the listener has closed
                        }
                    }
                    if refused > 0 {
                        break;
                    }
                }
                (ok, refused, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before =
        metric_value(&server.metrics().await, "leuknet_images_inferred_total", "").unwrap();
    assert!(before >= 10.0, "the load never got going: {before} images");
    server.sigterm();
    tokio::time::sleep(Duration::from_millis(20)).await;
    if let Ok(r) = server.client.get(server.url("/health/ready")).send().await {
        assert_eq!(r.status(), 503, "ready while draining");
    }
    let mut answered = std::collections::HashSet::new();
    let mut refused = 0;
    let mut failed = Vec::new();
    for c in clients {
        let (ok, r, f) = c.await.unwrap();
        answered.extend(ok);
        refused += r;
        failed.extend(f);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit {status:?}: {}", server.log_text());
    let processed: std::collections::HashSet<String> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("complete audit line");
            v["accession_id"].as_str().unwrap().to_string()
        })
        .collect();
    let lost: Vec<&String> = processed.difference(&answered).collect();
    assert!(
        lost.is_empty(),
        "processed but not answered: {lost:?}; client errors {failed:?}"
    );
    let unlogged: Vec<&String> = answered.difference(&processed).collect();
    assert!(
        unlogged.is_empty(),
        "answered but not in the audit log: {unlogged:?}"
    );
    eprintln!(
        "SIGTERM at concurrency 64: {} answered (all logged), {refused} refused with 503 while \
         draining, {} connections closed before being taken on",
        answered.len(),
        failed.len()
    );
}
