//! Shared helpers for integration tests: a random-weight fixture model, the real
//! `leuknet-server` binary on a loopback port, and real images from `../shared/data`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Writes (once per test process) a fixture model with the given width divisor and returns
/// the card path.
pub fn fixture_card(width_div: usize) -> PathBuf {
    static CARDS: OnceLock<std::sync::Mutex<std::collections::HashMap<usize, PathBuf>>> =
        OnceLock::new();
    let cards = CARDS.get_or_init(Default::default);
    let mut cards = cards.lock().unwrap();
    cards
        .entry(width_div)
        .or_insert_with(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("fixture-{}-div{width_div}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            leuknet::fixture::write_fixture(&dir, width_div, 7).expect("write fixture")
        })
        .clone()
}

/// The shared data folder, or None (tests then skip with a message).
pub fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LEUKNET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    dir.join("MANIFEST.csv").is_file().then_some(dir)
}

/// Reads a file from the shared data, or None with a skip message.
pub fn shared_image(rel: &str) -> Option<Vec<u8>> {
    match data_dir() {
        Some(d) => Some(std::fs::read(d.join(rel)).expect("read shared image")),
        None => {
            eprintln!("skipping: ../shared/data not found (set LEUKNET_DATA)");
            None
        }
    }
}

/// A few real images of different formats: (name, bytes, content type).
pub fn real_images() -> Option<Vec<(&'static str, Vec<u8>, &'static str)>> {
    Some(vec![
        (
            "ALL-IDB2/Im001_1.jpg",
            shared_image("ALL-IDB2/Im001_1.jpg")?,
            "image/jpeg",
        ),
        (
            "JTSC-Zheng2018/001.bmp",
            shared_image("JTSC-Zheng2018/001.bmp")?,
            "image/bmp",
        ),
        ("ALL-Aria2021", first_of("ALL-Aria2021")?, "image/jpeg"),
    ])
}

/// MANIFEST.csv of the data folder `dir`, as sha256 -> relative path.
pub fn manifest_paths_by_sha256(dir: &Path) -> std::collections::HashMap<String, String> {
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.csv")).expect("manifest");
    manifest
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(5)?.to_string(), f.get(1)?.to_string()))
        })
        .collect()
}

/// The first file of a dataset in the manifest.
pub fn first_of(dataset: &str) -> Option<Vec<u8>> {
    let dir = data_dir()?;
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.csv")).ok()?;
    let rel = manifest
        .lines()
        .skip(1)
        .find(|l| l.starts_with(&format!("{dataset},")))?
        .split(',')
        .nth(1)?
        .to_string();
    std::fs::read(dir.join(rel)).ok()
}

/// PNG bytes of a generated image (tests that need no shared data).
pub fn png_of(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode");
    out.into_inner()
}

/// Re-encodes image bytes to another format (for TIFF and PNG inputs).
pub fn reencode(bytes: &[u8], format: image::ImageFormat) -> Vec<u8> {
    let img = image::load_from_memory(bytes).expect("decode");
    let mut out = std::io::Cursor::new(Vec::new());
    img.to_rgb8().write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// A running `leuknet-server` process on 127.0.0.1 with an ephemeral port.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client with a generous timeout.
    pub client: reqwest::Client,
    log: PathBuf,
}

impl Server {
    /// Starts the server with the fixture card and extra `LEUKNET_*` env vars, and waits for
    /// readiness.
    pub async fn start(card: &Path, env: &[(&str, &str)]) -> Server {
        let server = Self::spawn(card, env);
        server.wait_ready(Duration::from_secs(120)).await;
        server
    }

    /// Starts the server without waiting for readiness.
    pub fn spawn(card: &Path, env: &[(&str, &str)]) -> Server {
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "server-{}-{}.log",
            std::process::id(),
            next_log_number()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leuknet-server"));
        cmd.env("LEUKNET_ADDR", "127.0.0.1:0")
            .env("LEUKNET_MODEL_CARD", card)
            .env("LEUKNET_DEVICE", "cpu")
            .env("LEUKNET_INTRA_THREADS", "1")
            .env("LEUKNET_LOG", "info")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start leuknet-server");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("leuknet-server listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "server did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            child: Some(child),
            base: addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            log,
        }
    }

    /// Polls `/health/ready` until 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.client.get(self.url("/health/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "server not ready: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Sends SIGKILL (a crash: no drain, nothing flushed) and waits for the process to end.
    pub fn sigkill(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        child.kill().expect("SIGKILL");
        child.wait().unwrap()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "server did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// POSTs one raw image.
    pub async fn classify_raw(&self, bytes: Vec<u8>, content_type: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/classify"))
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .expect("send")
    }
}

/// The value of an unlabelled metric, or of the first sample whose line contains `filter`.
pub fn metric_value(text: &str, name: &str, filter: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
                && l.contains(filter)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn next_log_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts a JSON error response with the given status and code.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    let got = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.expect("JSON error body");
    assert_eq!(got, status, "status for {code}: body {body}");
    assert_eq!(body["error"]["code"], code, "body {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    body
}

/// A PNG signature and IHDR chunk claiming `width` x `height` 8-bit gray pixels, followed by a
/// tiny IDAT and IEND: a decompression bomb's header without the bomb.
pub fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}
