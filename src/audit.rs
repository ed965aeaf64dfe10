//! The audit log (`--audit-log <path>`): one JSON line per classified image, for lab systems
//! that must show which image (by sha256), under which accession and specimen, got which
//! answer from which model, and when. The image bytes are never written.
//!
//! A line (keys in this order; optional ones omitted when absent):
//!
//! ```json
//! {"time":"2025-01-31T12:00:00.123Z","request_id":"…","accession_id":"A-1","specimen_id":"S-1",
//!  "image":{"sha256":"…","filename":"a.jpg","format":"jpeg","width":103,"height":103},
//!  "model":{"name":"leuknet","version":"0.2.0","sha256":"…"},"execution_provider":"cpu",
//!  "label":"leukemic","probability":0.73,"threshold":0.5,"in_distribution":true,"ood_score":…,
//!  "timings":{"decode_ms":…,"queue_ms":…,"inference_ms":…}}
//! ```
//!
//! Writing: one dedicated thread owns the file and is fed by a bounded channel, so the async
//! runtime never touches the disk. The file is opened with `O_APPEND`; each line, newline
//! included, goes out in a single `write(2)` with no user-space buffer, so a line is in the
//! kernel (and survives a crash of the process, SIGKILL included) as soon as that call returns.
//! The handler waits (up to [`WAIT`]) until its lines are written before answering, so an
//! answered request is on file; a write failure, a full queue or a slow disk is logged and
//! counted (`leuknet_audit_records_total{outcome="failed"|"dropped"}`) and never fails the
//! request.
//!
//! fsync policy: group commit. After writing the lines waiting in the channel (those of at
//! most 256 requests), the thread calls `fdatasync` once. Requests do not wait for it (only for the `write`), so the
//! disk's flush latency never adds to a response; a power loss or kernel crash can lose at most
//! the last group (the lines written since the previous `fdatasync`, typically those of the
//! last few milliseconds).
//!
//! Torn lines: on open, a file that does not end in `\n` (a crash or a full disk cut its last
//! line) first gets a `\n`, so a new line never merges with a fragment. After any write error
//! the file is closed and reopened (with the same check) before the next line.
//!
//! Rotation by size: a line that would take the file past `--audit-log-max-bytes` first moves
//! `path` to `path.1` (`path.1` to `path.2`, …, the oldest beyond `--audit-log-keep` is
//! overwritten); with `--audit-log-keep 0` the full file is deleted. One process per file.

use crate::metrics::Metrics;
use serde::Serialize;
use serde_json::Value;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Requests whose lines may wait for the writer thread; beyond, lines are dropped (counted).
pub const QUEUE_REQUESTS: usize = 4096;

/// Most requests written between two `fdatasync` calls (so steady load still syncs).
const GROUP: usize = 256;

/// How long a request waits for its lines to be written before it is answered anyway.
pub const WAIT: Duration = Duration::from_secs(1);

/// Where and how much to write.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The live file; rotated files are `path.1` (newest) … `path.keep` (oldest).
    pub path: PathBuf,
    /// Rotate before a line would take the file past this size.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

/// The image fields of a line.
#[derive(Debug, Serialize)]
pub struct ImageRef<'a> {
    pub sha256: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<&'a Value>,
}

/// One line of the audit log, borrowed from the JSON form of a classify response (the same
/// values the client got, whatever fields the result gains later: only these are copied).
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// When the line was made, RFC 3339 UTC with milliseconds.
    pub time: String,
    pub request_id: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accession_id: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specimen_id: Option<&'a Value>,
    pub image: ImageRef<'a>,
    pub model: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_provider: Option<&'a Value>,
    pub label: &'a Value,
    pub probability: &'a Value,
    pub threshold: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indeterminate_band: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_distribution: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_score: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_threshold: Option<&'a Value>,
    pub timings: &'a Value,
}

const NULL: Value = Value::Null;

fn present<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// The audit records of a classify response (its JSON form), one per result, in order.
pub fn records(response: &Value, time: SystemTime) -> Vec<AuditRecord<'_>> {
    let time = rfc3339_utc(time);
    let request_id = response.get("request_id").unwrap_or(&NULL);
    let results = response
        .get("results")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    results
        .iter()
        .map(|r| {
            let image = r.get("image").unwrap_or(&NULL);
            AuditRecord {
                time: time.clone(),
                request_id,
                accession_id: present(r, "accession_id")
                    .or_else(|| present(response, "accession_id")),
                specimen_id: present(r, "specimen_id").or_else(|| present(response, "specimen_id")),
                image: ImageRef {
                    sha256: image.get("sha256").unwrap_or(&NULL),
                    filename: present(image, "filename"),
                    format: present(image, "format"),
                    width: present(image, "width"),
                    height: present(image, "height"),
                },
                model: r.get("model").unwrap_or(&NULL),
                execution_provider: present(r, "execution_provider"),
                label: r.get("label").unwrap_or(&NULL),
                probability: r.get("probability").unwrap_or(&NULL),
                threshold: r.get("threshold").unwrap_or(&NULL),
                indeterminate_band: present(r, "indeterminate_band"),
                in_distribution: present(r, "in_distribution"),
                ood_score: present(r, "ood_score"),
                ood_threshold: present(r, "ood_threshold"),
                timings: r.get("timings").unwrap_or(&NULL),
            }
        })
        .collect()
}

/// One line per record: compact JSON and `\n`.
pub fn lines(records: &[AuditRecord<'_>]) -> Vec<Vec<u8>> {
    records
        .iter()
        .map(|r| {
            // Serialising borrowed JSON values into a Vec cannot fail.
            let mut line = serde_json::to_vec(r).unwrap_or_default();
            line.push(b'\n');
            line
        })
        .collect()
}

/// `time` as RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T12:00:00.123Z`.
pub fn rfc3339_utc(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

enum Msg {
    /// Lines of one request, and where to say that they were written (true) or not.
    Lines(Vec<Vec<u8>>, tokio::sync::oneshot::Sender<bool>),
    Close,
}

/// The running audit log: a handle to the writer thread.
pub struct AuditLog {
    tx: SyncSender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    path: PathBuf,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

impl AuditLog {
    /// Opens (or creates) the file, mends a torn last line, and starts the writer thread.
    /// Fails when the file cannot be opened, so a bad path stops the server at start-up.
    pub fn open(config: AuditConfig, metrics: Arc<Metrics>) -> io::Result<Self> {
        let writer = Writer::open(config.clone(), metrics.clone())?;
        let (tx, rx) = sync_channel(QUEUE_REQUESTS);
        let thread = std::thread::Builder::new()
            .name("leuknet-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            tx,
            thread: Mutex::new(Some(thread)),
            metrics,
            path: config.path,
        })
    }

    /// The live file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the lines to the writer thread without blocking; the receiver says whether they
    /// were written. `None` when the queue is full or the writer has stopped (counted as
    /// dropped and logged).
    pub fn submit(&self, lines: Vec<Vec<u8>>) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        let n = lines.len() as u64;
        let (done, rx) = tokio::sync::oneshot::channel();
        match self.tx.try_send(Msg::Lines(lines, done)) {
            Ok(()) => Some(rx),
            Err(e) => {
                let why = match e {
                    TrySendError::Full(_) => "the audit queue is full",
                    TrySendError::Disconnected(_) => "the audit writer has stopped",
                };
                tracing::error!(lines = n, path = %self.path.display(), "audit lines dropped: {why}");
                self.metrics
                    .audit_records
                    .with_label_values(&["dropped"])
                    .inc_by(n);
                None
            }
        }
    }

    /// Writes the records of one response: waits (asynchronously, at most [`WAIT`]) until the
    /// writer thread has written them. Never fails: problems are logged and counted.
    pub async fn record(&self, records: &[AuditRecord<'_>]) {
        if records.is_empty() {
            return;
        }
        let Some(rx) = self.submit(lines(records)) else {
            return;
        };
        if tokio::time::timeout(WAIT, rx).await.is_err() {
            tracing::warn!(
                path = %self.path.display(),
                "audit lines not written within {} ms: answering anyway",
                WAIT.as_millis()
            );
        }
    }

    /// Writes what is queued, syncs, and stops the writer thread (blocking: call it from a
    /// blocking context, after the last request). Later lines are dropped.
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Close);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The writer thread's state.
struct Writer {
    config: AuditConfig,
    metrics: Arc<Metrics>,
    file: Option<File>,
    size: u64,
}

/// `path` with `.n` appended to its file name.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Opens `path` for appending (creating it and its folder); if it does not end in `\n`,
/// writes one. Returns the file and its size.
fn open_append(path: &Path) -> io::Result<(File, u64)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let mut size = file.metadata()?.len();
    if size > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::End(-1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            tracing::warn!(path = %path.display(), "audit log ends in a torn line: starting a new line");
            file.write_all(b"\n")?;
            size += 1;
        }
    }
    Ok((file, size))
}

impl Writer {
    fn open(config: AuditConfig, metrics: Arc<Metrics>) -> io::Result<Self> {
        let (file, size) = open_append(&config.path)?;
        Ok(Self {
            config,
            metrics,
            file: Some(file),
            size,
        })
    }

    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            let mut wrote = false;
            let mut close = false;
            let mut group = 0;
            // Group commit: write everything waiting (up to GROUP requests), then one fdatasync.
            while let Some(msg) = next.take() {
                group += 1;
                match msg {
                    Msg::Lines(lines, done) => {
                        let ok = self.write_lines(&lines);
                        wrote |= ok;
                        let _ = done.send(ok);
                    }
                    Msg::Close => close = true,
                }
                if !close && group < GROUP {
                    next = rx.try_recv().ok();
                }
            }
            if wrote {
                self.sync();
            }
            if close {
                break;
            }
        }
    }

    /// Writes each line; true when all were written.
    fn write_lines(&mut self, lines: &[Vec<u8>]) -> bool {
        let mut all = true;
        for line in lines {
            match self.write_line(line) {
                Ok(()) => self
                    .metrics
                    .audit_records
                    .with_label_values(&["written"])
                    .inc(),
                Err(e) => {
                    all = false;
                    // Reopen before the next line: that also mends a torn tail.
                    self.file = None;
                    self.metrics
                        .audit_records
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::error!(path = %self.config.path.display(), error = %e, "cannot write to the audit log");
                }
            }
        }
        all
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let (file, size) = open_append(&self.config.path)?;
            self.file = Some(file);
            self.size = size;
        }
        if self.size > 0 && self.size + line.len() as u64 > self.config.max_bytes {
            self.rotate()?;
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("audit file not open"))?;
        // One write(2) for the whole line, newline included.
        let n = file.write(line)?;
        if n < line.len() {
            // A short write (nearly full disk, a signal): finish the line.
            file.write_all(&line[n..])?;
        }
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let path = &self.config.path;
        let keep = self.config.keep;
        if keep == 0 {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            for n in (1..keep).rev() {
                let from = rotated_path(path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated_path(path, n + 1))?;
                }
            }
            std::fs::rename(path, rotated_path(path, 1))?;
        }
        let (file, size) = open_append(path)?;
        self.file = Some(file);
        self.size = size;
        tracing::info!(path = %path.display(), keep, "audit log rotated");
        Ok(())
    }

    fn sync(&mut self) {
        if let Some(file) = &self.file {
            if let Err(e) = file.sync_data() {
                tracing::warn!(path = %self.config.path.display(), error = %e, "audit log fdatasync failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response() -> Value {
        json!({
            "request_id": "req-1",
            "accession_id": "A-1",
            "results": [
                {
                    "accession_id": "A-1",
                    "label": "leukemic",
                    "probability": 0.7,
                    "threshold": 0.5,
                    "model": {"name": "leuknet", "version": "0.2.0", "sha256": "ab"},
                    "execution_provider": "cpu",
                    "timings": {"decode_ms": 1.5, "queue_ms": 0.1, "inference_ms": 20.0},
                    "image": {"width": 10, "height": 12, "format": "jpeg", "sha256": "cd", "filename": "a.jpg"},
                    "disclaimer": "research use only",
                    "in_distribution": true,
                    "ood_score": 1.25,
                    "explanation": {"heatmap_png_base64": "QUJDRA=="}
                },
                {
                    "label": "healthy",
                    "probability": 0.1,
                    "threshold": 0.5,
                    "model": {"name": "leuknet", "version": "0.2.0", "sha256": "ab"},
                    "timings": {"decode_ms": 1.0, "queue_ms": 0.0, "inference_ms": 20.0},
                    "image": {"width": 10, "height": 12, "format": "png", "sha256": "ef"},
                    "disclaimer": "research use only"
                }
            ]
        })
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new())
    }

    fn counted(m: &Metrics, outcome: &str) -> u64 {
        m.audit_records.with_label_values(&[outcome]).get()
    }

    #[test]
    fn rfc3339_formats_utc_with_millis() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // a leap day
        assert_eq!(rfc3339_utc(t), "2024-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_utc(t), "2000-02-29T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339_utc(t), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn one_line_per_result_with_ids_and_never_the_image() {
        let resp = response();
        let recs = records(&resp, UNIX_EPOCH + Duration::from_millis(1500));
        let lines = lines(&recs);
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert!(l.ends_with(b"\n"));
            assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
        }
        let a: Value = serde_json::from_slice(&lines[0]).unwrap();
        let text = String::from_utf8(lines[0].clone()).unwrap();
        assert!(text.starts_with("{\"time\":\"1970-01-01T00:00:01.500Z\",\"request_id\":\"req-1\""));
        assert_eq!(a["accession_id"], "A-1");
        assert!(a.get("specimen_id").is_none());
        assert_eq!(a["image"]["sha256"], "cd");
        assert_eq!(a["image"]["filename"], "a.jpg");
        assert_eq!(a["model"]["sha256"], "ab");
        assert_eq!(a["label"], "leukemic");
        assert_eq!(a["probability"], 0.7);
        assert_eq!(a["threshold"], 0.5);
        assert_eq!(a["in_distribution"], true);
        assert_eq!(a["ood_score"], 1.25);
        assert_eq!(a["timings"]["inference_ms"], 20.0);
        // Only the listed keys: no explanation, no disclaimer, no pixels.
        let keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
        for k in &keys {
            assert!(
                [
                    "time",
                    "request_id",
                    "accession_id",
                    "specimen_id",
                    "image",
                    "model",
                    "execution_provider",
                    "label",
                    "probability",
                    "threshold",
                    "in_distribution",
                    "ood_score",
                    "timings"
                ]
                .contains(k),
                "{k}"
            );
        }
        assert!(!text.contains("QUJDRA=="));
        // The second result takes the request's accession id; absent OOD fields are omitted.
        let b: Value = serde_json::from_slice(&lines[1]).unwrap();
        assert_eq!(b["accession_id"], "A-1");
        assert!(b.get("in_distribution").is_none() && b.get("ood_score").is_none());
        assert!(b["image"].get("filename").is_none());
    }

    fn line(n: usize, len: usize) -> Vec<u8> {
        let mut l = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
        while l.len() < len - 3 {
            l.push(b'x');
        }
        l.extend_from_slice(b"\"}\n");
        l
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let m = metrics();
        let mut w = Writer::open(
            AuditConfig {
                path: path.clone(),
                max_bytes: 250,
                keep: 2,
            },
            m.clone(),
        )
        .unwrap();
        // 100-byte lines: two per file.
        for n in 0..9 {
            assert!(w.write_lines(&[line(n, 100)]));
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let ns = |text: String| -> Vec<u64> {
            text.lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["n"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(ns(read(&path)), vec![8]);
        assert_eq!(ns(read(&rotated_path(&path, 1))), vec![6, 7]);
        assert_eq!(ns(read(&rotated_path(&path, 2))), vec![4, 5]);
        assert!(!rotated_path(&path, 3).exists());
        assert_eq!(counted(&m, "written"), 9);

        // keep = 0: the full file is dropped, nothing rotated.
        let path0 = dir.path().join("zero.jsonl");
        let mut w = Writer::open(
            AuditConfig {
                path: path0.clone(),
                max_bytes: 250,
                keep: 0,
            },
            m.clone(),
        )
        .unwrap();
        for n in 0..5 {
            assert!(w.write_lines(&[line(n, 100)]));
        }
        assert_eq!(ns(read(&path0)), vec![4]);
        assert!(!rotated_path(&path0, 1).exists());

        // A line longer than the limit still gets written, alone in its file.
        let path_big = dir.path().join("big.jsonl");
        let mut w = Writer::open(
            AuditConfig {
                path: path_big.clone(),
                max_bytes: 50,
                keep: 1,
            },
            m,
        )
        .unwrap();
        assert!(w.write_lines(&[line(1, 100), line(2, 100)]));
        assert_eq!(ns(read(&path_big)), vec![2]);
        assert_eq!(ns(read(&rotated_path(&path_big, 1))), vec![1]);
    }

    #[test]
    fn a_torn_last_line_is_closed_before_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"n\":0}\n{\"n\":1,\"cut").unwrap();
        let log = AuditLog::open(
            AuditConfig {
                path: path.clone(),
                max_bytes: 1 << 20,
                keep: 3,
            },
            metrics(),
        )
        .unwrap();
        let rx = log.submit(vec![b"{\"n\":2}\n".to_vec()]).unwrap();
        assert!(rx.blocking_recv().unwrap());
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"n\":0}\n{\"n\":1,\"cut\n{\"n\":2}\n");
        // A clean file gets nothing added.
        let log = AuditLog::open(
            AuditConfig {
                path: path.clone(),
                max_bytes: 1 << 20,
                keep: 3,
            },
            metrics(),
        )
        .unwrap();
        log.close();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn write_failures_are_counted_and_do_not_stop_the_writer() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let full = Path::new("/dev/full");
        if !full.exists() {
            eprintln!("skipping: no /dev/full");
            return;
        }
        let m = metrics();
        let log = AuditLog::open(
            AuditConfig {
                path: full.to_path_buf(),
                max_bytes: u64::MAX,
                keep: 0,
            },
            m.clone(),
        )
        .unwrap();
        for _ in 0..3 {
            let rx = log
                .submit(vec![b"{}\n".to_vec(), b"{}\n".to_vec()])
                .unwrap();
            assert!(!rx.blocking_recv().unwrap());
        }
        log.close();
        assert_eq!(counted(&m, "failed"), 6);
        assert_eq!(counted(&m, "written"), 0);
        // After close, lines are dropped, counted.
        assert!(log.submit(vec![b"{}\n".to_vec()]).is_none());
        assert_eq!(counted(&m, "dropped"), 1);
    }

    #[test]
    fn concurrent_submitters_get_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = Arc::new(
            AuditLog::open(
                AuditConfig {
                    path: path.clone(),
                    max_bytes: 1 << 30,
                    keep: 1,
                },
                metrics(),
            )
            .unwrap(),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let l = line(t * 1000 + i, 300);
                        let rx = log.submit(vec![l]).unwrap();
                        assert!(rx.blocking_recv().unwrap());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ns: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        ns.sort();
        assert_eq!(ns.len(), 200);
        ns.dedup();
        assert_eq!(ns.len(), 200);
    }
}
