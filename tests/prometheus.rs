//! The server's metrics as Prometheus itself reads them: `promtool check metrics` on the real
//! `/metrics` output, `promtool check config` on `deploy/prometheus.yml`, and a real Prometheus
//! on loopback (its own config and data in a temp dir) scraping a real `leuknet-server` every
//! second, queried back through its HTTP API after a classify request.
//!
//! Prometheus and promtool come from Debian's `prometheus` package, installed by
//! `scripts/setup --test`. Without it (and without `.native/test-tools.ready`) these tests print
//! `skipping: ...`; once the test tools are installed a missing binary is a failure.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `/usr/bin/<name>` (or `<name>` on PATH), or None when the test tools were never installed.
fn tool(name: &str) -> Option<PathBuf> {
    let debian = Path::new("/usr/bin").join(name);
    if debian.is_file() {
        return Some(debian);
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    }) {
        return Some(found);
    }
    if !root().join(".native/test-tools.ready").exists() {
        eprintln!("skipping: {name} needs ./scripts/setup --test");
        return None;
    }
    panic!("{name} is missing although the test tools are installed: rerun ./scripts/setup --test");
}

/// A small real PNG (a flat pink square), so the test needs no shared data.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 100, 150]));
    png_of(&img)
}

/// Runs promtool with `stdin` and returns (success, stdout + stderr).
fn promtool(promtool: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_servers_metrics() {
    let Some(promtool_bin) = tool("promtool") else {
        return;
    };
    let server = Server::start(&fixture_card(16), &[]).await;
    // Use every kind of series first: labelled counters and histograms appear only once used.
    let ok = server.classify_raw(png(), "image/png").await;
    assert_eq!(ok.status(), 200, "{}", ok.text().await.unwrap());
    let bad = server
        .classify_raw(b"not an image".to_vec(), "image/png")
        .await;
    assert_eq!(bad.status(), 422);
    let text = server.metrics().await;
    for family in [
        "leuknet_http_requests_total",
        "leuknet_failures_total",
        "leuknet_http_request_duration_seconds",
        "leuknet_predictions_total",
        "leuknet_queue_depth_images",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    let (ok, out) = promtool(&promtool_bin, &["check", "metrics"], &text);
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics complains:\n{out}\n--- metrics:\n{text}"
    );
    // The check does catch a bad exposition (so an empty answer above means something).
    let broken = text.replace(
        "# HELP leuknet_ready ",
        "# HELP leuknet_ready_seconds_total x\n# TYPE leuknet_ready_seconds_total gauge\nleuknet_ready_seconds_total 1\n# HELP leuknet_ready ",
    );
    let (ok, out) = promtool(&promtool_bin, &["check", "metrics"], &broken);
    assert!(
        !ok || !out.trim().is_empty(),
        "promtool check metrics accepted a gauge named like a counter"
    );
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    let Some(promtool_bin) = tool("promtool") else {
        return;
    };
    let config = root().join("deploy/prometheus.yml");
    let (ok, out) = promtool(
        &promtool_bin,
        &["check", "config", &config.to_string_lossy()],
        "",
    );
    assert!(ok, "promtool check config failed:\n{out}");
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A free loopback port (bound then released; Prometheus binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Prometheus on 127.0.0.1, scraping `target` (host:port) every second.
async fn start_prometheus(bin: &Path, target: &str, client: &reqwest::Client) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: leuknet\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(dir.path())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start prometheus");
    let prom = Prometheus {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
        _dir: dir,
    };
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{}/-/ready", prom.base)).send().await {
            if r.status() == 200 {
                return prom;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prometheus not ready:\n{}",
            prom.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query's single sample, or None when it has none.
async fn query(client: &reqwest::Client, prom: &Prometheus, q: &str) -> Option<f64> {
    let url = format!("{}/api/v1/query?query={}", prom.base, encode(q));
    let body: serde_json::Value = client.get(url).send().await.ok()?.json().await.ok()?;
    assert_eq!(body["status"], "success", "query {q}: {body}");
    let result = body["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "query {q} gave several series: {body}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// Polls `q` until `want` holds for its value, within `timeout`.
async fn eventually(
    client: &reqwest::Client,
    prom: &Prometheus,
    q: &str,
    want: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let start = Instant::now();
    loop {
        let got = query(client, prom, q).await;
        if let Some(v) = got.filter(|v| want(*v)) {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "query {q} gave {got:?} after {timeout:?}\n{}",
            prom.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_server() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    let server = Server::start(&fixture_card(16), &[]).await;
    let target = server.base.trim_start_matches("http://").to_string();
    let prom = start_prometheus(&bin, &target, &server.client).await;
    let c = &server.client;
    let timeout = Duration::from_secs(30);

    eventually(c, &prom, "up{job=\"leuknet\"}", |v| v == 1.0, timeout).await;
    eventually(c, &prom, "leuknet_ready", |v| v == 1.0, timeout).await;
    let before = query(c, &prom, "leuknet_images_inferred_total")
        .await
        .unwrap_or(0.0);

    let resp = server.classify_raw(png(), "image/png").await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    let after = eventually(
        c,
        &prom,
        "leuknet_images_inferred_total",
        |v| v >= before + 1.0,
        timeout,
    )
    .await;
    assert_eq!(after, before + 1.0, "one image went through the model");
    let ok = eventually(
        c,
        &prom,
        "leuknet_http_requests_total{route=\"/v1/classify\",method=\"POST\",status=\"200\"}",
        |v| v >= 1.0,
        timeout,
    )
    .await;
    assert_eq!(ok, 1.0);
    // The target carries the labels a dashboard selects on.
    let body: serde_json::Value = c
        .get(format!("{}/api/v1/targets", prom.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let active = body["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{body}");
    assert_eq!(active[0]["health"], "up", "{body}");
    assert_eq!(active[0]["labels"]["instance"], target.as_str(), "{body}");
}
