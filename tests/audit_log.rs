//! The audit log (`--audit-log`) on the real server: a crash (SIGKILL) in the middle of
//! sustained load from several clients leaves every written line whole, each line matches a
//! request that was sent (and the answer, when one came back), every answered request is on
//! file, and a server restarted on the same file starts its lines on a line of their own.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 4;
/// Answered requests before the kill.
const BEFORE_KILL: usize = 120;

/// Splits the file into complete lines and the trailing fragment (empty when the file ends
/// in `\n`).
fn split(text: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = text.split('\n').collect();
    let tail = parts.pop().unwrap_or("");
    (parts, tail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_leaves_whole_lines_and_a_restart_starts_a_new_line() {
    let Some(images) = real_images() else { return };
    let card = fixture_card(16);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit/leuknet.jsonl");
    let log_env = log_path.to_str().unwrap().to_string();
    let env = [
        ("LEUKNET_AUDIT_LOG", log_env.as_str()),
        ("LEUKNET_MAX_QUEUE_IMAGES", "256"),
    ];
    let mut server = Server::start(&card, &env).await;

    let sent = Arc::new(Mutex::new(HashSet::<String>::new()));
    let answered = Arc::new(Mutex::new(HashMap::<String, Value>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let images: Arc<Vec<Vec<u8>>> = Arc::new(images.into_iter().map(|i| i.1).collect());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (sent, answered, stop, images) =
                (sent.clone(), answered.clone(), stop.clone(), images.clone());
            let client = server.client.clone();
            let url = server.url("/v1/classify");
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let id = format!("crash-{c}-{n}");
                    let bytes = images[(c + n) % images.len()].clone();
                    let ct = if (c + n) % images.len() == 1 {
                        "image/bmp"
                    } else {
                        "image/jpeg"
                    };
                    sent.lock().unwrap().insert(id.clone());
                    let resp = client
                        .post(&url)
                        .header("content-type", ct)
                        .header("x-request-id", &id)
                        .header("x-accession-id", format!("ACC-{c}-{n}"))
                        .header("x-specimen-id", format!("SP-{c}"))
                        .body(bytes)
                        .send()
                        .await;
                    n += 1;
                    let Ok(resp) = resp else { break };
                    if resp.status() != 200 {
                        continue;
                    }
                    if let Ok(body) = resp.json::<Value>().await {
                        answered.lock().unwrap().insert(id, body);
                    }
                }
            })
        })
        .collect();

    let start = Instant::now();
    while answered.lock().unwrap().len() < BEFORE_KILL {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "only {} answers: {}",
            answered.lock().unwrap().len(),
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-stream: the clients are still sending.
    let status = server.sigkill();
    assert!(!status.success());
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() >= BEFORE_KILL);
    assert!(sent.len() > answered.len() || sent.len() >= BEFORE_KILL);

    let text = std::fs::read_to_string(&log_path).unwrap();
    let (lines, fragment) = split(&text);
    let mut seen = HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let rec: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {} does not parse ({e}): {line:?}", i + 1));
        let id = rec["request_id"].as_str().unwrap().to_string();
        assert!(
            sent.contains(&id),
            "line {} for a request never sent: {line}",
            i + 1
        );
        assert!(seen.insert(id.clone()), "two lines for {id}");
        let c_n = id.strip_prefix("crash-").unwrap();
        let (c, n) = c_n.split_once('-').unwrap();
        assert_eq!(rec["accession_id"], format!("ACC-{c}-{n}"));
        assert_eq!(rec["specimen_id"], format!("SP-{c}"));
        assert!(rec["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(rec["model"]["sha256"].as_str().unwrap().len(), 64);
        if let Some(answer) = answered.get(&id) {
            let r = &answer["results"][0];
            assert_eq!(rec["image"]["sha256"], r["image"]["sha256"], "{id}");
            assert_eq!(rec["label"], r["label"], "{id}");
            assert_eq!(rec["probability"], r["probability"], "{id}");
            assert_eq!(rec["threshold"], r["threshold"], "{id}");
            assert_eq!(rec["model"], r["model"], "{id}");
            assert_eq!(rec["timings"], r["timings"], "{id}");
        }
        // Never the image itself.
        assert!(line.len() < 2048, "line {} is {} bytes", i + 1, line.len());
    }
    // The handler waits for its line before answering: every answer is on file.
    for id in answered.keys() {
        assert!(seen.contains(id), "answered request {id} has no audit line");
    }
    eprintln!(
        "sent {}, answered {}, lines {}, fragment {} bytes",
        sent.len(),
        answered.len(),
        lines.len(),
        fragment.len()
    );

    // A crash can cut the last line; if this one did not, cut one by hand as a crash would.
    let fragment = if fragment.is_empty() {
        let cut = &lines[lines.len() - 1][..lines[lines.len() - 1].len() / 2];
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .unwrap();
        f.write_all(cut.as_bytes()).unwrap();
        cut.to_string()
    } else {
        fragment.to_string()
    };
    let before = std::fs::read_to_string(&log_path).unwrap();
    assert!(!before.ends_with('\n'));

    // Restart on the same file and classify again.
    let server = Server::start(&card, &env).await;
    let resp = server
        .client
        .post(server.url("/v1/classify"))
        .header("content-type", "image/jpeg")
        .header("x-request-id", "after-restart")
        .header("x-accession-id", "ACC-after")
        .body(images[0].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let after = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        after.starts_with(&before),
        "earlier bytes are never rewritten"
    );
    assert!(after.ends_with('\n'));
    let (lines, tail) = split(&after);
    assert!(tail.is_empty());
    let last: Value = serde_json::from_str(lines[lines.len() - 1]).expect("new line parses");
    assert_eq!(last["request_id"], "after-restart");
    assert_eq!(last["accession_id"], "ACC-after");
    assert_eq!(last["probability"], answer["results"][0]["probability"]);
    // The fragment stays alone on its line; the new line did not merge with it.
    assert_eq!(lines[lines.len() - 2], fragment);
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "leuknet_audit_records_total",
            "outcome=\"written\""
        ),
        Some(1.0),
        "{metrics}"
    );
}
