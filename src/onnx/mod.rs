//! ONNX protobuf types (prost, from the vendored `proto/onnx.proto`) and the LeukNet graph writer.

/// Generated ONNX protobuf types.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub mod explain;
pub mod storage;
pub mod writer;

pub use explain::{
    add_explain_outputs, ExplainPlan, FEATURES_OUTPUT, GRADCAM_OUTPUT, POOLED_OUTPUT,
};
pub use storage::{quantize_int8, WeightStorage};
pub use writer::{
    write_leuknet, write_leuknet_file, write_leuknet_to, InputNormalization, LeukNetSpec,
    OnnxWriteError, VggLayer, WeightSource, INPUT_NAME, LOGIT_OUTPUT, PROBABILITY_OUTPUT,
};
