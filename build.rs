//! Compiles the vendored `proto/onnx.proto` into Rust types (prost) with a vendored protoc,
//! so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.compile_protos(&["proto/onnx.proto"], &["proto/"])?;
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_some() {
        // Let the trainer and its tests find libtorch without LD_LIBRARY_PATH.
        let root = std::env::var("CARGO_MANIFEST_DIR")?;
        println!("cargo:rustc-link-arg=-Wl,-rpath,{root}/.native/torch211/torch/lib");
    }
    Ok(())
}
