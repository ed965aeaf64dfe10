//! Start-up checks of the real binary: it refuses to start, at once and with a message that
//! names the fix, when the model, its card or ONNX Runtime is wrong or missing.

mod common;

use common::fixture_card;
use std::path::Path;
use std::process::Command;

fn run_server(env: &[(&str, &std::ffi::OsStr)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leuknet-server"));
    cmd.env("LEUKNET_ADDR", "127.0.0.1:0")
        .env("LEUKNET_DEVICE", "cpu")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run leuknet-server");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Copies the fixture model and card into a fresh folder for tampering.
fn fixture_copy() -> tempfile::TempDir {
    let card = fixture_card(16);
    let dir = tempfile::tempdir().unwrap();
    for f in ["leuknet.onnx", "leuknet.json"] {
        std::fs::copy(card.parent().unwrap().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn no_model_card_names_the_fixture_command() {
    let (code, err) = run_server(&[("LEUKNET_MODEL_CARD", "/nonexistent/leuknet.json".as_ref())]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no model card") && err.contains("leuknet-fixture"),
        "{err}"
    );
}

#[test]
fn missing_onnx_runtime_names_scripts_setup() {
    let card = fixture_card(16);
    let (code, err) = run_server(&[
        ("LEUKNET_MODEL_CARD", card.as_os_str()),
        (
            "LEUKNET_ORT_LIBRARY",
            "/nonexistent/libonnxruntime.so".as_ref(),
        ),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("./scripts/setup") && err.contains("LEUKNET_ORT_LIBRARY"),
        "{err}"
    );
}

#[test]
fn tampered_model_file_is_refused_by_sha256() {
    let dir = fixture_copy();
    let onnx = dir.path().join("leuknet.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&onnx, bytes).unwrap();
    let card = dir.path().join("leuknet.json");
    let (code, err) = run_server(&[("LEUKNET_MODEL_CARD", card.as_os_str())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sha256"), "{err}");
}

#[test]
fn card_that_disagrees_with_the_graph_is_refused() {
    for (what, edit) in [
        (
            "input name",
            ("/input/tensor/name", serde_json::json!("pixels")),
        ),
        (
            "output shape",
            ("/outputs/0/shape", serde_json::json!([-1, 2])),
        ),
    ] {
        let dir = fixture_copy();
        let card_path = dir.path().join("leuknet.json");
        let mut card: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
        *card.pointer_mut(edit.0).unwrap() = edit.1;
        std::fs::write(&card_path, serde_json::to_string_pretty(&card).unwrap()).unwrap();
        let (code, err) = run_server(&[("LEUKNET_MODEL_CARD", card_path.as_os_str())]);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains("does not match its card"), "{what}: {err}");
    }
}

#[test]
fn cuda_requested_without_cuda_fails_at_start_up() {
    if Path::new("/dev/nvidia0").exists() {
        eprintln!("skipping: this machine has a GPU");
        return;
    }
    let card = fixture_card(16);
    let (code, err) = run_server(&[
        ("LEUKNET_MODEL_CARD", card.as_os_str()),
        ("LEUKNET_DEVICE", "cuda".as_ref()),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CUDA"), "{err}");
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    use clap::CommandFactory;
    let out = Command::new(env!("CARGO_BIN_EXE_leuknet-server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let cmd = leuknet::config::ServerConfig::command();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let long = arg.get_long().unwrap();
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{long} has no env var"));
        let env = env.to_string_lossy();
        assert!(env.starts_with("LEUKNET_"), "--{long}: {env}");
        assert!(
            help.contains(&format!("--{long}")),
            "--{long} missing from --help"
        );
        assert!(help.contains(env.as_ref()), "{env} missing from --help");
    }
}

#[test]
fn unknown_colour_normalisation_in_the_card_is_refused() {
    let dir = fixture_copy();
    let card_path = dir.path().join("leuknet.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    card["architecture"]["color_normalization"] = serde_json::json!({"kind": "sepia"});
    std::fs::write(&card_path, card.to_string()).unwrap();
    let (code, err) = run_server(&[("LEUKNET_MODEL_CARD", card_path.as_os_str())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("color_normalization"), "{err}");
}
