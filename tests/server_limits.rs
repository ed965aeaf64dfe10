//! Hostile and slow clients against the real server: a client that sends half a header (slow
//! loris), one that drips its head byte by byte, one that stalls mid-body, idle kept-alive
//! connections and the connection limit. In every case a good request made at the same time
//! is answered.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A small generated PNG: the fixture model takes any image.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(96, 80, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
    });
    png_of(&img)
}

fn host_port(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(host_port(server)).await.unwrap()
}

/// Reads until the server closes the connection (EOF or reset), within `limit`; returns what
/// arrived and when the connection ended. Panics if it is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection was still open after {limit:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A good classify request, answered 200.
async fn good_request(server: &Server) {
    let r = server.classify_raw(png(), "image/png").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_is_disconnected_after_the_header_timeout() {
    let server = Server::start(
        &fixture_card(16),
        &[
            ("LEUKNET_HEADER_READ_TIMEOUT_MS", "1000"),
            ("LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS", "30000"),
        ],
    )
    .await;
    // Half a head, then nothing.
    let mut loris = connect(&server).await;
    loris
        .write_all(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    // One that keeps dripping a byte every 100 ms: the limit is on the whole head.
    let mut drip = connect(&server).await;
    let dripping = tokio::spawn(async move {
        let head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let start = Instant::now();
        for b in head.iter() {
            if drip.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (got, _) = read_until_closed(&mut drip, Duration::from_secs(10)).await;
        (got, start.elapsed())
    });
    let start = Instant::now();
    // A good request at the same time is answered.
    good_request(&server).await;
    let (got, _) = read_until_closed(&mut loris, Duration::from_secs(10)).await;
    let took = start.elapsed();
    assert!(got.is_empty(), "an answer to half a head: {got:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}, timeout 1 s"
    );
    let (got, took) = dripping.await.unwrap();
    assert!(got.is_empty(), "an answer to a dripped head: {got:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "dripping client closed after {took:?}, timeout 1 s"
    );
    // Still serving.
    good_request(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_gets_408_body_timeout_and_is_closed() {
    let server = Server::start(
        &fixture_card(16),
        &[
            ("LEUKNET_BODY_READ_TIMEOUT_MS", "1000"),
            // Shorter than the body timeout: a request in the handler is not idle.
            ("LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let mut stalled = connect(&server).await;
    stalled
        .write_all(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
              Content-Length: 1000\r\n\r\n\x89PNG\r\n\x1a\n\0\0",
        )
        .await
        .unwrap();
    let start = Instant::now();
    good_request(&server).await;
    let (got, _) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 408 "), "answer: {text:?}");
    let body = &text[text.find("\r\n\r\n").expect("a head") + 4..];
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(json["error"]["code"], "body_timeout", "{json}");
    assert!(json["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("1000 ms")));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?}, timeout 1 s"
    );
    let m = server.metrics().await;
    assert_eq!(
        metric_value(&m, "leuknet_failures_total", "reason=\"body_timeout\""),
        Some(1.0),
        "{m}"
    );
    // Draining does not wait for it any more: nothing is left in flight.
    assert_eq!(
        metric_value(&m, "leuknet_http_requests_in_flight", ""),
        Some(1.0)
    );
    good_request(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_kept_alive_connections_are_closed() {
    let server = Server::start(
        &fixture_card(16),
        &[("LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS", "500")],
    )
    .await;
    let mut conn = connect(&server).await;
    conn.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
    let start = Instant::now();
    let (rest, took) = read_until_closed(&mut conn, Duration::from_secs(10)).await;
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).ends_with('}'),
        "{rest:?}"
    );
    let took = took.max(start.elapsed());
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(4),
        "idle connection closed after {took:?}, timeout 500 ms"
    );

    // 0 turns keep-alive off: one request per connection.
    let off = Server::start(
        &fixture_card(16),
        &[("LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS", "0")],
    )
    .await;
    let mut conn = connect(&off).await;
    conn.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, took) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ") && text.contains("connection: close"));
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_connections_wait_until_one_closes() {
    let server = Server::spawn(
        &fixture_card(16),
        &[
            ("LEUKNET_MAX_CONNECTIONS", "2"),
            ("LEUKNET_HEADER_READ_TIMEOUT_MS", "60000"),
            ("LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS", "60000"),
        ],
    );
    // A client that keeps no connection open, so only the raw ones below hold slots.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let start = Instant::now();
    loop {
        match fresh.get(server.url("/health/ready")).send().await {
            Ok(r) if r.status() == 200 => break,
            _ => {}
        }
        assert!(start.elapsed() < Duration::from_secs(120), "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Two connections that never send anything hold both slots.
    let mut a = connect(&server).await;
    let b = connect(&server).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::spawn({
        let fresh = fresh.clone();
        let url = server.url("/health/live");
        async move {
            let start = Instant::now();
            let r = fresh.get(&url).send().await.unwrap();
            (r.status().as_u16(), start.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served while two were open"
    );
    assert!(server.log_text().contains("connection limit reached"));
    // Closing one lets it in.
    a.shutdown().await.unwrap();
    drop(a);
    let (status, took) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(700), "{took:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_slow_and_idle_clients_still_drains_and_exits_zero() {
    let mut server = Server::start(
        &fixture_card(16),
        &[
            ("LEUKNET_HEADER_READ_TIMEOUT_MS", "1000"),
            ("LEUKNET_BODY_READ_TIMEOUT_MS", "1500"),
            ("LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS", "30000"),
            ("LEUKNET_DRAIN_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    // An idle kept-alive connection (it served one request), half a head, a stalled body.
    let mut idle = connect(&server).await;
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    let mut loris = connect(&server).await;
    loris
        .write_all(b"GET /v1/models HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut stalled = connect(&server).await;
    stalled
        .write_all(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
              Content-Length: 1000\r\n\r\n\x89PNG",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    server.sigterm();
    let (answer, _) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 408 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        server.log_text()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(server.log_text().contains("drained"));
    let (rest, _) = read_until_closed(&mut idle, Duration::from_secs(1)).await;
    assert!(rest.is_empty());
    let (rest, _) = read_until_closed(&mut loris, Duration::from_secs(1)).await;
    assert!(rest.is_empty());
}
