//! Writes the LeukNet inference graph (VGG conv base + fully connected head + sigmoid) as ONNX,
//! with the explanation outputs of [`super::explain`] (Grad-CAM map, penultimate features).
//!
//! The graph is built from a [`LeukNetSpec`] and named f32 tensors whose names follow
//! torchvision's `nn.Sequential` numbering (`features.{i}`, `classifier.{j}`), so the trainer,
//! the ImageNet importer and the random-weight fixtures all speak the same names.
//!
//! Weights are streamed: the model is encoded without its weight initializers, whose encoded
//! lengths are known from the spec alone, and each weight tensor is then appended straight to
//! the output. A full-size model (~163 MB) therefore never exists twice in memory, and a lazy
//! [`WeightSource`] can produce one tensor at a time.
//!
//! Weights may be stored as f32, f16 or per-channel int8 ([`WeightStorage`], in
//! [`super::storage`]); conversion nodes at the head of the graph rebuild the f32 weights, so the
//! layer nodes are the same for every storage.

use super::explain::ExplainPlan;
use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::storage::{StoredParameter, WeightStorage};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::io::Write;

/// Name of the graph input; the model card and the server refer to it by this name.
pub const INPUT_NAME: &str = "image";
/// Name of the pre-sigmoid output, kept for calibration and for numerically careful callers.
pub const LOGIT_OUTPUT: &str = "logit";
/// Name of the output the server reads: the probability of leukemia, `[batch, 1]`.
pub const PROBABILITY_OUTPUT: &str = "probability";

/// ONNX opset the graph is written against (every operator used is stable since then).
pub const OPSET_VERSION: i64 = 17;
/// ONNX IR version written; 8 lets initializers stay out of the graph inputs.
pub const IR_VERSION: i64 = 8;
/// `producer_name` stamped on every model this crate writes, to tell ours from foreign files.
pub const PRODUCER_NAME: &str = "leuknet";

/// Symbolic name of the batch dimension, so one graph serves any batch size.
const BATCH_DIM: &str = "batch";

// Field numbers from `proto/onnx.proto`, needed to append weight initializers by hand.
const MODEL_GRAPH_FIELD: u32 = 7;
const GRAPH_INITIALIZER_FIELD: u32 = 5;
const TENSOR_RAW_DATA_FIELD: u32 = 9;

/// Why a LeukNet graph could not be written. Each variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum OnnxWriteError {
    /// A parameter the spec needs was not supplied (often a naming mismatch with the trainer).
    #[error("weight tensor {name:?} is missing (expected shape {shape:?})")]
    MissingWeight { name: String, shape: Vec<usize> },
    /// A parameter was supplied with the wrong number of values (usually a spec mismatch).
    #[error("weight tensor {name:?} has {got} values, expected {expected} for shape {shape:?}")]
    WrongSize {
        name: String,
        got: usize,
        expected: usize,
        shape: Vec<usize>,
    },
    /// The spec itself cannot describe a working network.
    #[error("invalid LeukNet spec: {0}")]
    InvalidSpec(String),
    /// The output could not be written.
    #[error("cannot write the ONNX model: {0}")]
    Io(#[from] std::io::Error),
}

/// One entry of a VGG configuration, as in torchvision's `cfg` lists (`64, 'M', ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VggLayer {
    /// 3x3 convolution, padding 1, with this many output channels, followed by ReLU.
    Conv(usize),
    /// 2x2 max pooling with stride 2 (halves the side, rounding down).
    MaxPool,
}

/// Input normalisation done inside the graph, so clients only send `[0, 1]` RGB:
/// `x' = (reorder(x) * scale - mean[c]) / std[c]`, where `reorder` turns RGB into BGR when
/// `reverse_channels` is set and `c` indexes channels *after* reordering.
///
/// It is written as explicit nodes (Gather, Mul, Sub, Div) rather than folded into the first
/// convolution's weights because folding is not exact at the zero-padded image border.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputNormalization {
    /// Reverse the channel axis (RGB -> BGR) before scaling.
    pub reverse_channels: bool,
    /// Multiplier applied first (255 turns `[0, 1]` into Caffe's `[0, 255]`).
    pub scale: f32,
    /// Per-channel mean subtracted after scaling, in the reordered channel order.
    pub mean: [f32; 3],
    /// Per-channel divisor applied last, in the reordered channel order.
    pub std: [f32; 3],
}

impl InputNormalization {
    /// The convention of the original Caffe/Keras ImageNet VGG-16 weights: BGR, 0-255, minus the
    /// ImageNet mean (B 103.939, G 116.779, R 123.68), no division.
    pub fn caffe_vgg16() -> Self {
        Self {
            reverse_channels: true,
            scale: 255.0,
            mean: [103.939, 116.779, 123.68],
            std: [1.0, 1.0, 1.0],
        }
    }
}

/// The shape of a LeukNet network: a VGG conv base, a fully connected head ending in one logit,
/// the input side and optional in-graph normalisation. Small specs make fast test models.
#[derive(Debug, Clone, PartialEq)]
pub struct LeukNetSpec {
    /// VGG layer configuration, in order.
    pub conv: Vec<VggLayer>,
    /// Hidden sizes of the head (each Linear + ReLU + Dropout); a final Linear to 1 follows.
    pub head: Vec<usize>,
    /// Side of the square input image in pixels.
    pub input_size: usize,
    /// Normalisation applied inside the graph, if any.
    pub normalization: Option<InputNormalization>,
    /// TEST FIXTURES ONLY: make the whole batch fail at run time when any input is all 1.0
    /// (a pure white image), so tests can prove that one failing batch disturbs nothing else.
    /// Never set in a real export.
    pub fault_on_white_input: bool,
    /// How the weight tensors are stored in the file (the graph computes in f32 regardless).
    pub weight_storage: WeightStorage,
}

fn vgg_cfg(blocks: &[(usize, usize)]) -> Vec<VggLayer> {
    let mut cfg = Vec::new();
    for &(channels, repeat) in blocks {
        cfg.extend(std::iter::repeat_n(VggLayer::Conv(channels), repeat));
        cfg.push(VggLayer::MaxPool);
    }
    cfg
}

impl LeukNetSpec {
    /// The paper's network: VGG-16 conv base, head 1024-256-1, 224x224 input, no normalisation.
    pub fn vgg16() -> Self {
        Self {
            conv: vgg_cfg(&[(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]),
            head: vec![1024, 256],
            input_size: 224,
            normalization: None,
            fault_on_white_input: false,
            weight_storage: WeightStorage::Fp32,
        }
    }

    /// The VGG-19 variant (four convs in the last three blocks), same head and input.
    pub fn vgg19() -> Self {
        Self {
            conv: vgg_cfg(&[(64, 2), (128, 2), (256, 4), (512, 4), (512, 4)]),
            ..Self::vgg16()
        }
    }

    /// Narrows every conv and head layer by `n` (at least one unit each; `n = 0` acts as 1), for
    /// fixtures that keep the topology but run fast.
    pub fn with_width_div(mut self, n: usize) -> Self {
        let n = n.max(1);
        for layer in &mut self.conv {
            if let VggLayer::Conv(c) = layer {
                *c = (*c / n).max(1);
            }
        }
        for h in &mut self.head {
            *h = (*h / n).max(1);
        }
        self
    }

    /// Sets how the weights are stored in the file.
    pub fn with_weight_storage(mut self, storage: WeightStorage) -> Self {
        self.weight_storage = storage;
        self
    }

    /// The initializers written for each parameter under this spec's weight storage.
    pub(crate) fn stored_parameters(&self) -> Vec<StoredParameter> {
        self.parameter_shapes()
            .iter()
            .map(|(name, shape)| StoredParameter::new(name, shape, self.weight_storage))
            .collect()
    }

    /// Adds (or removes) the test-only fault of [`LeukNetSpec::fault_on_white_input`].
    pub fn with_fault_on_white_input(mut self, on: bool) -> Self {
        self.fault_on_white_input = on;
        self
    }

    /// The architecture section of a model card: VGG configuration (`"M"` = max-pool), head,
    /// input side, parameter count and the in-graph normalisation. Callers add their own keys.
    pub fn architecture_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let cfg: Vec<serde_json::Value> = self
            .conv
            .iter()
            .map(|l| match l {
                VggLayer::Conv(c) => serde_json::json!(c),
                VggLayer::MaxPool => serde_json::json!("M"),
            })
            .collect();
        let normalization = self.normalization.map(|n| {
            serde_json::json!({
                "reverse_channels": n.reverse_channels,
                "scale": n.scale,
                "mean": n.mean,
                "std": n.std,
                "formula": "x' = (reorder(x) * scale - mean[c]) / std[c], c in the reordered (BGR) order",
            })
        });
        let mut m = serde_json::Map::new();
        m.insert(
            "family".into(),
            "LeukNet: VGG conv base + fully connected head, sigmoid output".into(),
        );
        m.insert("cfg".into(), cfg.into());
        m.insert("head".into(), serde_json::json!(self.head));
        m.insert("output_units".into(), 1.into());
        m.insert("input_size".into(), self.input_size.into());
        m.insert("parameters".into(), self.parameter_count().into());
        m.insert(
            "in_graph_normalization".into(),
            serde_json::json!(normalization),
        );
        m.insert("weight_storage".into(), self.weight_storage.as_str().into());
        m
    }

    /// Replaces the in-graph normalisation.
    pub fn with_normalization(mut self, normalization: Option<InputNormalization>) -> Self {
        self.normalization = normalization;
        self
    }

    /// Number of max-pooling layers, which sets the spatial side reaching the head.
    pub fn pool_count(&self) -> usize {
        self.conv
            .iter()
            .filter(|l| matches!(l, VggLayer::MaxPool))
            .count()
    }

    /// Channels leaving the conv base (3 when it has no convolution).
    pub fn last_channels(&self) -> usize {
        self.conv
            .iter()
            .rev()
            .find_map(|l| match l {
                VggLayer::Conv(c) => Some(*c),
                VggLayer::MaxPool => None,
            })
            .unwrap_or(3)
    }

    /// Side of the feature map reaching the head (each pool halves, rounding down).
    pub fn final_side(&self) -> usize {
        self.conv.iter().fold(self.input_size, |side, l| match l {
            VggLayer::Conv(_) => side,
            VggLayer::MaxPool => side / 2,
        })
    }

    /// Width of the flattened conv output, i.e. the first head layer's input size.
    pub fn flatten_size(&self) -> usize {
        let side = self.final_side();
        self.last_channels() * side * side
    }

    /// Every trainable tensor with its shape, in graph order, under torchvision-style names:
    /// conv `features.{i}.weight` `[out, in, 3, 3]` and `.bias` `[out]` (ReLU and MaxPool each
    /// take an index too), head `classifier.{j}.weight` `[out, in]` and `.bias` (Linear, ReLU,
    /// Dropout per hidden layer, then the final Linear to 1).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        for (index, in_channels, out_channels) in self.conv_layers() {
            shapes.push((
                format!("features.{index}.weight"),
                vec![out_channels, in_channels, 3, 3],
            ));
            shapes.push((format!("features.{index}.bias"), vec![out_channels]));
        }
        for (index, in_features, out_features) in self.linear_layers() {
            shapes.push((
                format!("classifier.{index}.weight"),
                vec![out_features, in_features],
            ));
            shapes.push((format!("classifier.{index}.bias"), vec![out_features]));
        }
        shapes
    }

    /// Total number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// `(sequential index, in channels, out channels)` of each convolution.
    fn conv_layers(&self) -> Vec<(usize, usize, usize)> {
        let mut layers = Vec::new();
        let mut index = 0;
        let mut channels = 3;
        for layer in &self.conv {
            match *layer {
                VggLayer::Conv(out) => {
                    layers.push((index, channels, out));
                    channels = out;
                    index += 2; // Conv2d, ReLU
                }
                VggLayer::MaxPool => index += 1,
            }
        }
        layers
    }

    /// `(sequential index, in features, out features)` of each Linear, the last one to 1.
    fn linear_layers(&self) -> Vec<(usize, usize, usize)> {
        let mut layers = Vec::new();
        let mut features = self.flatten_size();
        for (k, &hidden) in self.head.iter().enumerate() {
            layers.push((3 * k, features, hidden)); // Linear, ReLU, Dropout
            features = hidden;
        }
        layers.push((3 * self.head.len(), features, 1));
        layers
    }

    /// Rejects specs that would produce an empty or degenerate graph, before any byte is written.
    fn validate(&self) -> Result<(), OnnxWriteError> {
        let invalid = |m: String| Err(OnnxWriteError::InvalidSpec(m));
        if self.input_size == 0 {
            return invalid("input_size is 0".into());
        }
        if self.conv.contains(&VggLayer::Conv(0)) {
            return invalid("a convolution has 0 output channels".into());
        }
        if self.head.contains(&0) {
            return invalid("a head layer has 0 units".into());
        }
        if self.final_side() == 0 {
            return invalid(format!(
                "{} max-pools reduce a {}-pixel input to nothing",
                self.pool_count(),
                self.input_size
            ));
        }
        if let Some(n) = &self.normalization {
            if !n.scale.is_finite() || n.mean.iter().any(|m| !m.is_finite()) {
                return invalid("normalisation scale and mean must be finite".into());
            }
            if n.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                return invalid(format!(
                    "normalisation std {:?} must be finite and non-zero",
                    n.std
                ));
            }
        }
        Ok(())
    }
}

/// Where the writer gets parameter values from. Implemented for maps of name to values; a lazy
/// source (such as a seeded generator) can produce each tensor on demand to save memory.
pub trait WeightSource {
    /// The named tensor's values, row-major in the shape [`LeukNetSpec::parameter_shapes`]
    /// gives, or `None` when the source has no such tensor.
    fn weight(&self, name: &str) -> Option<Cow<'_, [f32]>>;

    /// The named tensor's number of values, so every tensor can be checked before anything is
    /// written. Override it when [`WeightSource::weight`] is expensive.
    fn weight_len(&self, name: &str) -> Option<usize> {
        self.weight(name).map(|w| w.len())
    }
}

impl<S: BuildHasher> WeightSource for HashMap<String, Vec<f32>, S> {
    fn weight(&self, name: &str) -> Option<Cow<'_, [f32]>> {
        self.get(name).map(|v| Cow::Borrowed(v.as_slice()))
    }
    fn weight_len(&self, name: &str) -> Option<usize> {
        self.get(name).map(Vec::len)
    }
}

impl WeightSource for BTreeMap<String, Vec<f32>> {
    fn weight(&self, name: &str) -> Option<Cow<'_, [f32]>> {
        self.get(name).map(|v| Cow::Borrowed(v.as_slice()))
    }
    fn weight_len(&self, name: &str) -> Option<usize> {
        self.get(name).map(Vec::len)
    }
}

/// Encodes the LeukNet inference graph with its weights into ONNX bytes, in memory.
///
/// Every tensor of [`LeukNetSpec::parameter_shapes`] must be present with the right number of
/// values; the error names the first offender. Extra tensors in `weights` are ignored.
pub fn write_leuknet<W: WeightSource + ?Sized>(
    spec: &LeukNetSpec,
    weights: &W,
) -> Result<Vec<u8>, OnnxWriteError> {
    let mut out = Vec::new();
    write_leuknet_to(spec, weights, &mut out)?;
    Ok(out)
}

/// Streams the LeukNet inference graph with its weights to `out` and returns the bytes written.
///
/// All tensors are checked (through [`WeightSource::weight_len`]) before the first byte is
/// written. Should the source then hand back a tensor of another size, or `out` fail, `out` is
/// left holding a truncated model: write to a temporary file and rename it on success.
pub fn write_leuknet_to<W: WeightSource + ?Sized, O: Write>(
    spec: &LeukNetSpec,
    weights: &W,
    out: &mut O,
) -> Result<u64, OnnxWriteError> {
    spec.validate()?;
    let parameters = spec.parameter_shapes();
    for (name, shape) in &parameters {
        check_len(name, shape, weights.weight_len(name))?;
    }

    let stored = spec.stored_parameters();
    let graph = build_graph(spec, &stored);
    let headers: Vec<Vec<(TensorProto, usize)>> = stored
        .iter()
        .map(|p| {
            p.tensors
                .iter()
                .map(|t| (tensor_header(&t.name, &t.dims, t.data_type), t.raw_len))
                .collect()
        })
        .collect();
    let graph_len = graph.encoded_len()
        + headers
            .iter()
            .flatten()
            .map(|(h, raw)| field_len(GRAPH_INITIALIZER_FIELD, streamed_tensor_len(h, *raw)))
            .sum::<usize>();

    let mut prefix = model_without_graph().encode_to_vec();
    encode_key(MODEL_GRAPH_FIELD, WireType::LengthDelimited, &mut prefix);
    encode_varint(graph_len as u64, &mut prefix);
    graph.encode(&mut prefix).map_err(std::io::Error::other)?;
    out.write_all(&prefix)?;
    let mut written = prefix.len() as u64;

    for (param, headers) in stored.iter().zip(&headers) {
        let values = weights.weight(&param.name);
        check_len(&param.name, &param.shape, values.as_ref().map(|v| v.len()))?;
        let values = values.unwrap_or_default();
        let mut quantized = None;
        for (k, (header, raw_len)) in headers.iter().enumerate() {
            written += write_initializer(header, *raw_len, out, |out| {
                param.write_raw(k, &values, &mut quantized, out)
            })?;
        }
    }
    Ok(written)
}

/// Appends one initializer field: key, length, the tensor header, then `raw_data` from `raw`.
fn write_initializer<O: Write>(
    header: &TensorProto,
    raw_len: usize,
    out: &mut O,
    raw: impl FnOnce(&mut O) -> std::io::Result<()>,
) -> Result<u64, OnnxWriteError> {
    let mut head = Vec::with_capacity(header.encoded_len() + 24);
    encode_key(
        GRAPH_INITIALIZER_FIELD,
        WireType::LengthDelimited,
        &mut head,
    );
    encode_varint(streamed_tensor_len(header, raw_len) as u64, &mut head);
    header.encode(&mut head).map_err(std::io::Error::other)?;
    encode_key(TENSOR_RAW_DATA_FIELD, WireType::LengthDelimited, &mut head);
    encode_varint(raw_len as u64, &mut head);
    out.write_all(&head)?;
    raw(out)?;
    Ok((head.len() + raw_len) as u64)
}

/// Writes the graph to the file at `path` (buffered, synced) and returns the file's sha256 in
/// lowercase hex, computed while writing so the model card needs no second read of the file.
pub fn write_leuknet_file<W: WeightSource + ?Sized>(
    spec: &LeukNetSpec,
    weights: &W,
    path: &std::path::Path,
) -> Result<String, OnnxWriteError> {
    use sha2::Digest;
    let file = std::fs::File::create(path)?;
    let mut out = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: sha2::Sha256::new(),
    };
    write_leuknet_to(spec, weights, &mut out)?;
    let file = out.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(hex::encode(out.hasher.finalize()))
}

/// Passes bytes through while hashing them.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn check_len(name: &str, shape: &[usize], got: Option<usize>) -> Result<(), OnnxWriteError> {
    let expected = shape.iter().product::<usize>();
    match got {
        None => Err(OnnxWriteError::MissingWeight {
            name: name.to_string(),
            shape: shape.to_vec(),
        }),
        Some(got) if got != expected => Err(OnnxWriteError::WrongSize {
            name: name.to_string(),
            got,
            expected,
            shape: shape.to_vec(),
        }),
        Some(_) => Ok(()),
    }
}

/// Encoded length of a length-delimited field holding `len` bytes.
fn field_len(field: u32, len: usize) -> usize {
    key_len(field) + encoded_len_varint(len as u64) + len
}

/// Encoded length of a tensor whose header is encoded by prost and whose `raw_data` is appended.
fn streamed_tensor_len(header: &TensorProto, raw_len: usize) -> usize {
    header.encoded_len() + field_len(TENSOR_RAW_DATA_FIELD, raw_len)
}

fn model_without_graph() -> ModelProto {
    ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some(PRODUCER_NAME.to_string()),
        producer_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        doc_string: Some("LeukNet: VGG conv base + fully connected head, sigmoid output".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET_VERSION),
        }],
        ..Default::default()
    }
}

/// The whole graph except the weight initializers (those are streamed after it).
fn build_graph(spec: &LeukNetSpec, stored: &[StoredParameter]) -> GraphProto {
    let mut g = GraphBuilder::default();
    for param in stored {
        g.restore_f32(param);
    }
    let side = spec.input_size as i64;
    let mut x = INPUT_NAME.to_string();
    if let Some(n) = &spec.normalization {
        x = g.normalization(n, &x);
    }
    let convs = spec.conv_layers();
    let mut convs = convs.iter();
    let mut index = 0;
    for layer in &spec.conv {
        match layer {
            VggLayer::Conv(_) => {
                // conv_layers() yields one entry per Conv, in order.
                if let Some(&(i, _, _)) = convs.next() {
                    x = g.conv_relu(i, &x);
                    index = i + 2;
                }
            }
            VggLayer::MaxPool => {
                x = g.max_pool(index, &x);
                index += 1;
            }
        }
    }
    let mut explain = ExplainPlan::for_spec(spec);
    explain.pooled = x.clone();
    x = g.flatten(&x);
    explain.flattened = x.clone();
    let linears = spec.linear_layers();
    for (k, &(j, _, _)) in linears.iter().enumerate() {
        if k + 1 < linears.len() {
            x = g.linear_relu(j, &x);
        } else if spec.fault_on_white_input {
            let logit = g.linear(j, &x, &format!("classifier.{j}.out"));
            x = g.fault_on_white(INPUT_NAME, &logit, LOGIT_OUTPUT);
        } else {
            x = g.linear(j, &x, LOGIT_OUTPUT);
        }
    }
    g.node("Sigmoid", "sigmoid", &[&x], PROBABILITY_OUTPUT, vec![]);
    let explain_outputs = explain.append(&mut g.nodes, &mut g.constants);

    GraphProto {
        name: Some("leuknet".into()),
        node: g.nodes,
        initializer: g.constants,
        input: vec![value_info(
            INPUT_NAME,
            &[
                Dim::Batch,
                Dim::Fixed(3),
                Dim::Fixed(side),
                Dim::Fixed(side),
            ],
        )],
        output: [
            value_info(LOGIT_OUTPUT, &[Dim::Batch, Dim::Fixed(1)]),
            value_info(PROBABILITY_OUTPUT, &[Dim::Batch, Dim::Fixed(1)]),
        ]
        .into_iter()
        .chain(explain_outputs)
        .collect(),
        ..Default::default()
    }
}

/// Collects nodes and small constant initializers; each method returns its output's name.
#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    constants: Vec<TensorProto>,
}

impl GraphBuilder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute: attributes,
            ..Default::default()
        });
        output.to_string()
    }

    fn normalization(&mut self, n: &InputNormalization, input: &str) -> String {
        let mut x = input.to_string();
        if n.reverse_channels {
            let order = "normalization.channel_order";
            self.constants.push(int64_tensor(order, &[3], &[2, 1, 0]));
            x = self.node(
                "Gather",
                "normalization.reverse_channels",
                &[&x, order],
                "normalization.reordered",
                vec![attr_int("axis", 1)],
            );
        }
        let scale = "normalization.scale";
        let mean = "normalization.mean";
        let std = "normalization.std";
        self.constants.push(f32_tensor(scale, &[], &[n.scale]));
        self.constants
            .push(f32_tensor(mean, &[1, 3, 1, 1], &n.mean));
        self.constants.push(f32_tensor(std, &[1, 3, 1, 1], &n.std));
        x = self.node(
            "Mul",
            "normalization.mul_scale",
            &[&x, scale],
            "normalization.scaled",
            vec![],
        );
        x = self.node(
            "Sub",
            "normalization.sub_mean",
            &[&x, mean],
            "normalization.centred",
            vec![],
        );
        self.node(
            "Div",
            "normalization.div_std",
            &[&x, std],
            "normalization.out",
            vec![],
        )
    }

    /// `features.{i}` Conv 3x3 pad 1, then `features.{i+1}` ReLU.
    fn conv_relu(&mut self, i: usize, input: &str) -> String {
        let weight = format!("features.{i}.weight");
        let bias = format!("features.{i}.bias");
        let conv = self.node(
            "Conv",
            &format!("features.{i}"),
            &[input, &weight, &bias],
            &format!("features.{i}.out"),
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_ints("strides", &[1, 1]),
            ],
        );
        let relu = i + 1;
        self.node(
            "Relu",
            &format!("features.{relu}"),
            &[&conv],
            &format!("features.{relu}.out"),
            vec![],
        )
    }

    /// For a parameter stored converted, the node that rebuilds its f32 value under its own
    /// name: `Cast` from f16, or `DequantizeLinear` (per output channel, axis 0) from int8.
    fn restore_f32(&mut self, param: &StoredParameter) {
        let names: Vec<&str> = param.tensors.iter().map(|t| t.name.as_str()).collect();
        match param.storage {
            WeightStorage::Fp32 => {}
            WeightStorage::Fp16 => {
                self.node(
                    "Cast",
                    &format!("{}.cast", param.name),
                    &names,
                    &param.name,
                    vec![attr_int("to", DataType::Float as i64)],
                );
            }
            WeightStorage::Int8 => {
                self.node(
                    "DequantizeLinear",
                    &format!("{}.dequantize", param.name),
                    &names,
                    &param.name,
                    vec![attr_int("axis", 0)],
                );
            }
        }
    }

    /// `features.{i}` MaxPool 2x2 stride 2.
    fn max_pool(&mut self, i: usize, input: &str) -> String {
        self.node(
            "MaxPool",
            &format!("features.{i}"),
            &[input],
            &format!("features.{i}.out"),
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        )
    }

    /// Test-only fault: `output = logit + 0 * sum(reshape([1.0], [1 + any_white]))`. The
    /// Reshape of one value to two fails at run time when every input value is >= 1.0, so the
    /// whole batch errors; otherwise the output equals `logit` exactly.
    fn fault_on_white(&mut self, image: &str, logit: &str, output: &str) -> String {
        self.constants.push(f32_tensor("fault.one_f", &[], &[1.0]));
        self.constants.push(f32_tensor("fault.zero_f", &[], &[0.0]));
        self.constants
            .push(f32_tensor("fault.payload", &[1], &[1.0]));
        self.constants.push(int64_tensor("fault.one_i", &[], &[1]));
        self.constants.push(int64_tensor("fault.axes0", &[1], &[0]));
        let min = self.node(
            "ReduceMin",
            "fault.min",
            &[image],
            "fault.min.out",
            vec![attr_int("keepdims", 0)],
        );
        let white = self.node(
            "GreaterOrEqual",
            "fault.white",
            &[&min, "fault.one_f"],
            "fault.white.out",
            vec![],
        );
        let flag = self.node(
            "Cast",
            "fault.cast",
            &[&white],
            "fault.flag",
            vec![attr_int("to", 7)],
        );
        let n = self.node(
            "Add",
            "fault.len",
            &[&flag, "fault.one_i"],
            "fault.len.out",
            vec![],
        );
        let shape = self.node(
            "Unsqueeze",
            "fault.shape",
            &[&n, "fault.axes0"],
            "fault.shape.out",
            vec![],
        );
        let r = self.node(
            "Reshape",
            "fault.reshape",
            &["fault.payload", &shape],
            "fault.reshape.out",
            vec![],
        );
        let sum = self.node(
            "ReduceSum",
            "fault.sum",
            &[&r],
            "fault.sum.out",
            vec![attr_int("keepdims", 0)],
        );
        let zero = self.node(
            "Mul",
            "fault.zero",
            &[&sum, "fault.zero_f"],
            "fault.zero.out",
            vec![],
        );
        self.node("Add", "fault.add", &[logit, &zero], output, vec![])
    }

    fn flatten(&mut self, input: &str) -> String {
        self.node(
            "Flatten",
            "flatten",
            &[input],
            "flatten.out",
            vec![attr_int("axis", 1)],
        )
    }

    /// `classifier.{j}` Gemm with PyTorch-layout weight `[out, in]` (transB = 1).
    fn linear(&mut self, j: usize, input: &str, output: &str) -> String {
        let weight = format!("classifier.{j}.weight");
        let bias = format!("classifier.{j}.bias");
        self.node(
            "Gemm",
            &format!("classifier.{j}"),
            &[input, &weight, &bias],
            output,
            vec![attr_int("transB", 1)],
        )
    }

    /// `classifier.{j}` Linear then `classifier.{j+1}` ReLU; the Dropout at `j+2` is the
    /// identity at inference and is not written.
    fn linear_relu(&mut self, j: usize, input: &str) -> String {
        let x = self.linear(j, input, &format!("classifier.{j}.out"));
        let relu = j + 1;
        self.node(
            "Relu",
            &format!("classifier.{relu}"),
            &[&x],
            &format!("classifier.{relu}.out"),
            vec![],
        )
    }
}

/// A dimension of a declared graph input or output.
pub(super) enum Dim {
    Batch,
    Fixed(i64),
}

pub(super) fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Batch => tensor_shape_proto::dimension::Value::DimParam(BATCH_DIM.into()),
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

pub(super) fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A tensor's name, dims and element type, without data: the data is streamed after it.
fn tensor_header<D: Copy + TryInto<i64>>(
    name: &str,
    dims: &[D],
    data_type: DataType,
) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims
            .iter()
            .map(|&d| d.try_into().unwrap_or(i64::MAX))
            .collect(),
        data_type: Some(data_type as i32),
        ..Default::default()
    }
}

pub(super) fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..tensor_header(name, dims, DataType::Float)
    }
}

pub(super) fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..tensor_header(name, dims, DataType::Int64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vgg16_names_follow_torchvision() {
        let names: Vec<String> = LeukNetSpec::vgg16()
            .parameter_shapes()
            .into_iter()
            .filter(|(n, _)| n.ends_with(".weight"))
            .map(|(n, _)| n)
            .collect();
        let convs: Vec<usize> = vec![0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
        let mut want: Vec<String> = convs
            .iter()
            .map(|i| format!("features.{i}.weight"))
            .collect();
        want.extend([0, 3, 6].iter().map(|j| format!("classifier.{j}.weight")));
        assert_eq!(names, want);
        assert_eq!(LeukNetSpec::vgg16().flatten_size(), 512 * 7 * 7);
        assert_eq!(LeukNetSpec::vgg16().parameter_count(), 40_668_481);
    }

    #[test]
    fn streamed_encoding_decodes_as_one_model() {
        let spec = LeukNetSpec {
            conv: vec![VggLayer::Conv(2), VggLayer::MaxPool],
            head: vec![3],
            input_size: 4,
            normalization: Some(InputNormalization::caffe_vgg16()),
            fault_on_white_input: false,
            weight_storage: WeightStorage::Fp32,
        };
        let weights: HashMap<String, Vec<f32>> = spec
            .parameter_shapes()
            .into_iter()
            .map(|(n, s)| {
                let len = s.iter().product::<usize>();
                (n, (0..len).map(|k| k as f32 * 0.5).collect())
            })
            .collect();
        let bytes = write_leuknet(&spec, &weights).expect("writes");
        let model = ModelProto::decode(bytes.as_slice()).expect("decodes");
        let graph = model.graph.expect("has a graph");
        let init = graph
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("classifier.0.weight"))
            .expect("weight present");
        assert_eq!(init.dims, vec![3, 8]);
        let raw = init.raw_data.as_deref().expect("raw data");
        assert_eq!(raw.len(), 24 * 4);
        assert_eq!(f32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]), 0.5);
        assert_eq!(model.ir_version, Some(IR_VERSION));
        assert_eq!(model.producer_name.as_deref(), Some(PRODUCER_NAME));
    }
}
