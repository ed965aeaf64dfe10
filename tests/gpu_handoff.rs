//! The GPU hand-off end to end on CPU at tiny size (docs/gpu-mdft.md): `leuknet-train pack` in
//! parts, `scripts/gpu/mdft.sh` with `TINY=1` as two calls (the second refuses while part 1 is
//! missing), at most 8 files of at most 16 MiB back, then `gpu export-checkpoint` joins the int8
//! parts and exports ONNX with the ONNX Runtime vs tch parity check.
//!
//! Needs `./scripts/setup --train`, `./scripts/setup` and bash; skips with a message where
//! `../shared/data` (or `LEUKNET_DATA`) is absent.
#![cfg(feature = "train")]

mod common;

use common::data_dir;
use std::path::{Path, PathBuf};
use std::process::Command;

fn train() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_leuknet-train"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn ok(c: &mut Command) -> String {
    let out = c.output().expect("spawn");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{c:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A staging folder as one device call would see it: the binary and the named pack parts.
fn stage(root: &Path, pack: &Path, parts: &[&str]) -> PathBuf {
    let s = root.join(format!("stage-{}", parts.join("-")));
    std::fs::create_dir_all(s.join("bin")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_leuknet-train"),
        s.join("bin/leuknet-train"),
    )
    .unwrap();
    for f in ["MANIFEST.csv", "rules-none.json", "pack.json"] {
        std::fs::create_dir_all(s.join("pack")).unwrap();
        std::fs::copy(pack.join(f), s.join("pack").join(f)).unwrap();
    }
    for p in parts {
        copy_dir(&pack.join(p), &s.join("pack").join(p));
    }
    s
}

fn mdft(stage: &Path, keep: &Path, out: &Path, mode: &str) -> std::process::Output {
    Command::new("bash")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("scripts/gpu/mdft.sh")
        .arg(mode)
        .env("TINY", "1")
        .env("STAGE", stage)
        .env("KEEP", keep)
        .env("OUT", out)
        .env("BUDGET_S", "300")
        .output()
        .expect("bash")
}

#[test]
fn pack_two_calls_and_export_with_parity() {
    let Some(data) = data_dir() else {
        eprintln!("skipping: ../shared/data not found (set LEUKNET_DATA)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let pack = tmp.path().join("pack");
    ok(train()
        .args(["pack", "--limit-per-class", "1", "--imagenet", "none"])
        .args([
            "--part-mib".as_ref(),
            "0.1".as_ref(),
            "--out".as_ref(),
            pack.as_os_str(),
            "--manifest".as_ref(),
            data.join("MANIFEST.csv").as_os_str(),
        ]));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pack.join("pack.json")).unwrap()).unwrap();
    let parts: Vec<String> = report["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        parts.len() >= 2,
        "tiny pack should need two parts: {report}"
    );
    assert!(report["mean_abs_error_255"].as_f64().unwrap() < 3.0);
    let manifest = std::fs::read_to_string(pack.join("MANIFEST.csv")).unwrap();
    assert!(manifest.contains(",224,224,JPEG,"));

    let keep = tmp.path().join("keep");
    let first: Vec<&str> = parts[..1].iter().map(String::as_str).collect();
    let rest: Vec<&str> = parts[1..].iter().map(String::as_str).collect();
    let s1 = stage(tmp.path(), &pack, &first);
    let s2 = stage(tmp.path(), &pack, &rest);

    // The second call alone refuses: part 1 was never carried.
    let early = mdft(
        &s2,
        &tmp.path().join("keep-empty"),
        &tmp.path().join("o0"),
        "run",
    );
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stdout).contains("is missing"));

    let o1 = mdft(&s1, &keep, &tmp.path().join("o1"), "stage1");
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stdout)
    );
    let back = tmp.path().join("o2");
    let o2 = mdft(&s2, &keep, &back, "run");
    let log = String::from_utf8_lossy(&o2.stdout);
    assert!(o2.status.success(), "{log}");

    let files: Vec<_> = std::fs::read_dir(&back)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert!(files.len() <= 8, "{} files come back", files.len());
    for f in &files {
        assert!(f.metadata().unwrap().len() <= 16 << 20);
    }
    for f in [
        "final.json",
        "report.json",
        "table.md",
        "bench.json",
        "mdft.log",
    ] {
        assert!(back.join(f).is_file(), "{f} missing:\n{log}");
    }
    let table = std::fs::read_to_string(back.join("table.md")).unwrap();
    for d in ["ALL-IDB2", "ALL-Aria2021", "DeepAPL"] {
        assert!(table.contains(d), "{d} not in table.md");
    }

    let export = tmp.path().join("export");
    let text = ok(train()
        .args(["gpu", "export-checkpoint", "--scratch"])
        .args([
            "--weights-dir".as_ref(),
            back.as_os_str(),
            "--report".as_ref(),
            back.join("report.json").as_os_str(),
            "--manifest".as_ref(),
            pack.join("MANIFEST.csv").as_os_str(),
            "--rules".as_ref(),
            pack.join("rules-none.json").as_os_str(),
            "--export-dir".as_ref(),
            export.as_os_str(),
        ]));
    let r: serde_json::Value = serde_json::from_str(&text).expect("export report");
    assert!(r["max_abs_diff_probability"].as_f64().unwrap() <= 1e-4);
    assert!(export.join("leuknet.onnx").is_file());
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("leuknet.json")).unwrap())
            .unwrap();
    assert!(card["metrics"]["lodo"]["ALL-IDB2"].is_object(), "{card}");
    // The returned report is tabulated and plotted here, as a run made here would be.
    assert!(std::fs::read_to_string(export.join("table.md"))
        .unwrap_or_default()
        .contains("### LODOCV, every metric"));
    for png in ["curves.png", "roc.png", "confusion.png"] {
        let bytes = std::fs::read(export.join(png)).unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
}
