//! LeukNet in tch: the same network the ONNX writer emits, with the same parameter names, plus
//! the paper's four fine-tuning modes.
//!
//! **Names.** Every variable lives in a [`VarStore`] under exactly the names of
//! [`LeukNetSpec::parameter_shapes`] (`features.{i}.weight` `[out, in, 3, 3]`, `.bias`;
//! `classifier.{j}.weight` `[out, in]`, `.bias`), so checkpoints, the ImageNet import
//! ([`crate::train::vgg_import`]) and the ONNX export ([`LeukNet::named_weights`] ->
//! [`crate::onnx::write_leuknet`]) all agree without a renaming table.
//!
//! **Forward.** `[0, 1]` RGB NCHW in -> in-graph normalisation ([`LeukNetSpec::normalization`],
//! computed with the same operations in the same order as the ONNX nodes: reorder, `* scale`,
//! `- mean`, `/ std`) -> VGG blocks (conv 3x3 pad 1 + ReLU, max-pool 2x2) -> flatten -> head
//! (Linear + ReLU + Dropout per hidden layer) -> Linear to one logit. The sigmoid is left to the
//! loss (`binary_cross_entropy_with_logits`) and to the ONNX graph.
//!
//! **Dropout.** The paper's head is `1024 (ReLU) -> dropout 0.5 -> 256 (ReLU) -> dropout 0.6`.
//! [`default_dropout`] therefore gives `[0.5, 0.6]` for any two-layer head (also the
//! 4096-4096 head of SFT/DFT) and `0.5` after each hidden layer for other head lengths;
//! [`LeukNet::with_dropout`] overrides it.
//!
//! **Fine-tuning modes** ([`FineTuneMode`], paper section III-C), for the VGG-16 spec:
//!
//! | mode | head ([`FineTuneMode::paper_head`]) | frozen | trained |
//! |---|---|---|---|
//! | SFT  | original 4096-4096 | conv blocks 1-4 (`features.0` ... `features.21`) | block 5 (`features.24/26/28`) + whole head |
//! | DFT  | original 4096-4096 | nothing | everything |
//! | mSFT | new 1024-256 | all 13 convs (`features.*`) | the whole (new) head (`classifier.*`) |
//! | mDFT | new 1024-256 | nothing | everything (LeukNet = VGG-16 + mDFT) |
//!
//! "Early conv layers frozen" (SFT) is taken as the classic Keras recipe of fine-tuning only the
//! last conv block: every conv block but the last is frozen ([`FineTuneMode::frozen_blocks`]
//! generalises this to any spec by counting max-pools). The 4096-4096 "original head" has no
//! ImageNet weights available (no package ships VGG-16's FC layers here), so in SFT/DFT it is
//! freshly initialised like torchvision's VGG (normal(0, 0.01), zero bias), as are the new
//! heads of mSFT/mDFT. The final layer is always a new Linear to one logit.
//!
//! **Partial fine-tuning from cached activations.** Frozen layers have no dropout, so their
//! output is the same in train and eval mode: [`LeukNet::forward_until`] computes it once
//! ([`FineTuneMode::cache_stage`]: `Pool(4)` for SFT on VGG-16, `Flatten` for mSFT) and
//! [`LeukNet::forward_from`] trains the rest. Caching is only valid for un-augmented inputs (or
//! per augmented copy).

use crate::onnx::{InputNormalization, LeukNetSpec, VggLayer};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Why a model could not be built, initialised, loaded or placed on a device.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid LeukNet spec: {0}")]
    InvalidSpec(String),
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error("weights file {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("unknown device {0:?}: use auto, cpu or cuda")]
    UnknownDevice(String),
    #[error("CUDA requested but unavailable: {0}")]
    CudaUnavailable(String),
    #[error("invalid dropout: {0}")]
    Dropout(String),
}

/// The paper's four fine-tuning modes (section III-C). See the module documentation for exactly
/// what each trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FineTuneMode {
    /// Shallow fine-tuning: original 4096-4096 head; conv blocks 1-4 frozen, block 5 + head train.
    Sft,
    /// Deep fine-tuning: original 4096-4096 head; everything trains.
    Dft,
    /// Modified shallow fine-tuning: new 1024-256 head; only the head trains.
    MSft,
    /// Modified deep fine-tuning (LeukNet): new 1024-256 head; everything trains.
    MDft,
}

impl FineTuneMode {
    /// All modes, in the paper's order.
    pub const ALL: [FineTuneMode; 4] = [
        FineTuneMode::Sft,
        FineTuneMode::Dft,
        FineTuneMode::MSft,
        FineTuneMode::MDft,
    ];

    /// The paper's spelling: `SFT`, `DFT`, `mSFT`, `mDFT`.
    pub fn as_str(self) -> &'static str {
        match self {
            FineTuneMode::Sft => "SFT",
            FineTuneMode::Dft => "DFT",
            FineTuneMode::MSft => "mSFT",
            FineTuneMode::MDft => "mDFT",
        }
    }

    /// True for the "modified" modes, which replace the head by a smaller new one.
    pub fn is_modified(self) -> bool {
        matches!(self, FineTuneMode::MSft | FineTuneMode::MDft)
    }

    /// Hidden sizes of the head the paper uses with this mode: VGG's original `[4096, 4096]`
    /// for SFT/DFT, LeukNet's `[1024, 256]` for mSFT/mDFT.
    pub fn paper_head(self) -> Vec<usize> {
        if self.is_modified() {
            vec![1024, 256]
        } else {
            vec![4096, 4096]
        }
    }

    /// The paper's network for this mode: VGG-16 conv base, [`FineTuneMode::paper_head`],
    /// 224 px input, Caffe ImageNet normalisation in the graph (what the ImageNet weights expect).
    pub fn paper_spec(self) -> LeukNetSpec {
        LeukNetSpec {
            head: self.paper_head(),
            ..LeukNetSpec::vgg16()
        }
        .with_normalization(Some(InputNormalization::caffe_vgg16()))
    }

    /// Number of leading conv blocks (a block ends at a max-pool) frozen in this mode for
    /// `spec`: all but the last for SFT (4 of 5 for VGG-16), all of them for mSFT, none for
    /// DFT/mDFT.
    pub fn frozen_blocks(self, spec: &LeukNetSpec) -> usize {
        let blocks = spec.pool_count();
        match self {
            FineTuneMode::Sft => blocks.saturating_sub(1),
            FineTuneMode::MSft => blocks,
            FineTuneMode::Dft | FineTuneMode::MDft => 0,
        }
    }

    /// Whether convolutions after the last max-pool (none in VGG) are frozen: only in mSFT.
    fn freezes_whole_backbone(self) -> bool {
        self == FineTuneMode::MSft
    }

    /// The furthest stage whose output does not depend on any trained variable, i.e. where
    /// activations can be cached: [`Stage::Input`] for DFT/mDFT, [`Stage::Pool`]`(4)` for SFT
    /// on VGG-16, [`Stage::Flatten`] for mSFT.
    pub fn cache_stage(self, spec: &LeukNetSpec) -> Stage {
        if self.freezes_whole_backbone() {
            return Stage::Flatten;
        }
        match self.frozen_blocks(spec) {
            0 => Stage::Input,
            k => Stage::Pool(k),
        }
    }
}

impl fmt::Display for FineTuneMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FineTuneMode {
    type Err = String;
    /// Case-insensitive `sft`, `dft`, `msft`, `mdft`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sft" => Ok(FineTuneMode::Sft),
            "dft" => Ok(FineTuneMode::Dft),
            "msft" => Ok(FineTuneMode::MSft),
            "mdft" => Ok(FineTuneMode::MDft),
            other => Err(format!(
                "unknown fine-tuning mode {other:?}: use SFT, DFT, mSFT or mDFT"
            )),
        }
    }
}

/// Where a forward pass can be cut (see [`LeukNet::forward_until`], [`LeukNet::forward_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The raw `[0, 1]` RGB input, before normalisation (`N, 3, S, S`).
    Input,
    /// The output of the `k`-th max-pool (1-based; block `k` of VGG), `N, C, H, W`.
    Pool(usize),
    /// The flattened backbone output fed to the head, `N, flatten_size`.
    Flatten,
}

/// How to initialise the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// Conv layers from an ImageNet safetensors file (from [`crate::train::vgg_import`]);
    /// the head as in [`Init::Scratch`].
    ImageNet(PathBuf),
    /// torchvision's VGG init: conv Kaiming-normal (fan_out, ReLU), Linear normal(0, 0.01), biases
    /// zero. Seed with `tch::manual_seed` first for reproducibility.
    Scratch,
}

/// Default dropout probabilities after the hidden layers of a head of `head_len` layers: the
/// paper's `[0.5, 0.6]` for two layers, `0.5` each otherwise.
pub fn default_dropout(head_len: usize) -> Vec<f64> {
    if head_len == 2 {
        vec![0.5, 0.6]
    } else {
        vec![0.5; head_len]
    }
}

struct Conv {
    /// 1-based block (number of max-pools before it + 1).
    block: usize,
    weight: Tensor,
    bias: Tensor,
}

enum Layer {
    Conv(Conv),
    Pool,
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

struct Normalization {
    order: Option<Tensor>,
    scale: Tensor,
    mean: Tensor,
    std: Tensor,
}

/// LeukNet in tch. Variables are in [`LeukNet::vs`] under the ONNX writer's names.
pub struct LeukNet {
    /// The variables (`features.{i}.weight` ..., `classifier.{j}.bias`). Build optimisers from it;
    /// frozen variables have `requires_grad == false` and receive no gradient.
    pub vs: VarStore,
    /// The network shape; the same spec is handed to the ONNX writer at export.
    pub spec: LeukNetSpec,
    /// Dropout probability after each hidden head layer (train mode only).
    pub dropout: Vec<f64>,
    layers: Vec<Layer>,
    linears: Vec<Linear>,
    normalization: Option<Normalization>,
}

impl fmt::Debug for LeukNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeukNet")
            .field("spec", &self.spec)
            .field("dropout", &self.dropout)
            .field("device", &self.vs.device())
            .finish_non_exhaustive()
    }
}

fn check_spec(spec: &LeukNetSpec) -> Result<(), ModelError> {
    let invalid = |m: String| Err(ModelError::InvalidSpec(m));
    if spec.input_size == 0 {
        return invalid("input_size is 0".into());
    }
    if spec.conv.contains(&VggLayer::Conv(0)) || spec.head.contains(&0) {
        return invalid("a layer has 0 units".into());
    }
    if spec.final_side() == 0 {
        return invalid(format!(
            "{} max-pools reduce a {}-pixel input to nothing",
            spec.pool_count(),
            spec.input_size
        ));
    }
    if spec.fault_on_white_input {
        return invalid(
            "fault_on_white_input is a test-fixture graph feature, not trainable".into(),
        );
    }
    if let Some(n) = &spec.normalization {
        if !n.scale.is_finite()
            || n.mean.iter().any(|m| !m.is_finite())
            || n.std.iter().any(|s| !s.is_finite() || *s == 0.0)
        {
            return invalid(format!("normalisation {n:?} is not finite and non-zero"));
        }
    }
    Ok(())
}

fn conv_init() -> tch::nn::Init {
    tch::nn::Init::Kaiming {
        dist: NormalOrUniform::Normal,
        fan: FanInOut::FanOut,
        non_linearity: NonLinearity::ReLU,
    }
}

const LINEAR_INIT: tch::nn::Init = tch::nn::Init::Randn {
    mean: 0.0,
    stdev: 0.01,
};

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

impl LeukNet {
    /// Builds the network for `spec` on `device`, initialised as [`Init::Scratch`] (seed with
    /// `tch::manual_seed` first), with [`default_dropout`] and every variable trainable.
    pub fn new(spec: LeukNetSpec, device: Device) -> Result<Self, ModelError> {
        check_spec(&spec)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let mut layers = Vec::new();
        let mut index = 0;
        let mut block = 1;
        let mut cin = 3i64;
        for layer in &spec.conv {
            match *layer {
                VggLayer::Conv(cout) => {
                    let cout = cout as i64;
                    let p = &root / "features" / index;
                    let weight = p.f_var("weight", &[cout, cin, 3, 3], conv_init())?;
                    let bias = p.f_var("bias", &[cout], tch::nn::Init::Const(0.0))?;
                    layers.push(Layer::Conv(Conv {
                        block,
                        weight,
                        bias,
                    }));
                    cin = cout;
                    index += 2;
                }
                VggLayer::MaxPool => {
                    layers.push(Layer::Pool);
                    index += 1;
                    block += 1;
                }
            }
        }
        let mut linears = Vec::new();
        let mut fin = spec.flatten_size() as i64;
        let outs: Vec<i64> = spec
            .head
            .iter()
            .map(|&h| h as i64)
            .chain(std::iter::once(1))
            .collect();
        for (k, &out) in outs.iter().enumerate() {
            let p = &root / "classifier" / (3 * k);
            let weight = p.f_var("weight", &[out, fin], LINEAR_INIT)?;
            let bias = p.f_var("bias", &[out], tch::nn::Init::Const(0.0))?;
            linears.push(Linear { weight, bias });
            fin = out;
        }
        let normalization = spec.normalization.map(|n| Normalization {
            order: n
                .reverse_channels
                .then(|| Tensor::from_slice(&[2i64, 1, 0]).to_device(device)),
            scale: Tensor::from_slice(&[n.scale]).to_device(device),
            mean: Tensor::from_slice(&n.mean)
                .reshape([1, 3, 1, 1])
                .to_device(device),
            std: Tensor::from_slice(&n.std)
                .reshape([1, 3, 1, 1])
                .to_device(device),
        });
        let dropout = default_dropout(spec.head.len());
        let model = Self {
            vs,
            spec,
            dropout,
            layers,
            linears,
            normalization,
        };
        model.check_names()?;
        Ok(model)
    }

    /// [`LeukNet::new`] followed by [`LeukNet::load_init`].
    pub fn with_init(spec: LeukNetSpec, device: Device, init: &Init) -> Result<Self, ModelError> {
        let mut model = Self::new(spec, device)?;
        model.load_init(init)?;
        Ok(model)
    }

    /// Replaces the dropout probabilities (one per hidden head layer, each in `[0, 1)`).
    pub fn with_dropout(mut self, dropout: Vec<f64>) -> Result<Self, ModelError> {
        if dropout.len() != self.spec.head.len() {
            return Err(ModelError::Dropout(format!(
                "{} probabilities for {} hidden layers",
                dropout.len(),
                self.spec.head.len()
            )));
        }
        if dropout.iter().any(|p| !(0.0..1.0).contains(p)) {
            return Err(ModelError::Dropout(format!(
                "{dropout:?} not all in [0, 1)"
            )));
        }
        self.dropout = dropout;
        Ok(self)
    }

    /// A copy whose weights are what an ONNX file with `storage` computes with (each weight
    /// rounded by [`crate::onnx::WeightStorage::round_trip`]): the reference for checking a
    /// converted export and for measuring what the storage costs in accuracy.
    pub fn rounded_copy(&self, storage: crate::onnx::WeightStorage) -> Result<Self, ModelError> {
        let copy =
            Self::new(self.spec.clone(), self.device())?.with_dropout(self.dropout.clone())?;
        let shapes: HashMap<String, Vec<usize>> =
            self.spec.parameter_shapes().into_iter().collect();
        let dst = copy.vs.variables();
        tch::no_grad(|| {
            for (name, values) in self.named_weights() {
                let (Some(shape), Some(var)) = (shapes.get(&name), dst.get(&name)) else {
                    continue;
                };
                let rounded = storage.round_trip(&name, shape, &values);
                let src = Tensor::from_slice(&rounded)
                    .view(dims(shape).as_slice())
                    .to_device(self.device());
                var.shallow_clone().f_copy_(&src)?;
            }
            Ok::<(), tch::TchError>(())
        })?;
        Ok(copy)
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Guards the naming contract with the ONNX writer.
    fn check_names(&self) -> Result<(), ModelError> {
        let vars = self.vs.variables();
        let want = self.spec.parameter_shapes();
        let ok = vars.len() == want.len()
            && want
                .iter()
                .all(|(name, shape)| vars.get(name).is_some_and(|t| t.size() == dims(shape)));
        if ok {
            Ok(())
        } else {
            Err(ModelError::InvalidSpec(format!(
                "variables {:?} do not match the writer's parameter names",
                self.variable_names()
            )))
        }
    }

    /// Variable names in network order (the order of [`LeukNetSpec::parameter_shapes`]).
    pub fn variable_names(&self) -> Vec<String> {
        self.variable_shapes().into_iter().map(|(n, _)| n).collect()
    }

    /// Every variable with its shape, in network order.
    pub fn variable_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let vars = self.vs.variables();
        self.spec
            .parameter_shapes()
            .into_iter()
            .filter_map(|(n, _)| {
                vars.get(&n)
                    .map(|t| (n, t.size().iter().map(|&d| d as usize).collect()))
            })
            .collect()
    }

    // ----- forward ------------------------------------------------------------------------

    fn normalize(&self, x: &Tensor) -> Tensor {
        let x = x.to_device(self.device()).to_kind(Kind::Float);
        match &self.normalization {
            None => x,
            Some(n) => {
                let x = match &n.order {
                    Some(order) => x.index_select(1, order),
                    None => x,
                };
                ((x * &n.scale) - &n.mean) / &n.std
            }
        }
    }

    /// Position in `layers` right after `stage` (for `Pool(k)`: after the k-th max-pool).
    fn layer_position(&self, stage: Stage) -> usize {
        match stage {
            Stage::Input => 0,
            Stage::Flatten => self.layers.len(),
            Stage::Pool(k) => {
                let pools = self.spec.pool_count();
                assert!(
                    (1..=pools).contains(&k),
                    "Stage::Pool({k}) does not exist: the spec has {pools} max-pools"
                );
                let mut seen = 0;
                for (i, layer) in self.layers.iter().enumerate() {
                    if matches!(layer, Layer::Pool) {
                        seen += 1;
                        if seen == k {
                            return i + 1;
                        }
                    }
                }
                unreachable!("pool count checked above")
            }
        }
    }

    fn run_layers(&self, mut x: Tensor, from: usize, to: usize) -> Tensor {
        for layer in &self.layers[from..to] {
            x = match layer {
                Layer::Conv(c) => x
                    .conv2d(&c.weight, Some(&c.bias), [1, 1], [1, 1], [1, 1], 1)
                    .relu(),
                Layer::Pool => x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
            };
        }
        x
    }

    /// The output at `stage` for input `x` (`N, 3, S, S` in `[0, 1]`; moved to the model's
    /// device). `Stage::Input` returns `x` itself. No dropout is involved, so there is no train
    /// flag; wrap in `tch::no_grad` when caching activations.
    ///
    /// # Panics
    /// When `stage` is `Pool(k)` with `k` outside `1..=pool_count`.
    pub fn forward_until(&self, x: &Tensor, stage: Stage) -> Tensor {
        if stage == Stage::Input {
            return x.to_device(self.device());
        }
        let end = self.layer_position(stage);
        let y = self.run_layers(self.normalize(x), 0, end);
        if stage == Stage::Flatten {
            y.flatten(1, -1)
        } else {
            y
        }
    }

    /// Continues a forward pass from activations `act` taken at `stage` (as
    /// [`LeukNet::forward_until`] returns them) to the `N, 1` logits.
    ///
    /// # Panics
    /// As [`LeukNet::forward_until`].
    pub fn forward_from(&self, act: &Tensor, stage: Stage, train: bool) -> Tensor {
        self.head(&self.flatten_from(act, stage), train, false)
    }

    /// Logits `N, 1` and penultimate features `N, head[-1]` in one pass from activations at
    /// `stage`; `train` turns dropout on (the features are taken after it).
    pub fn forward_parts(&self, act: &Tensor, stage: Stage, train: bool) -> (Tensor, Tensor) {
        let features = self.head(&self.flatten_from(act, stage), train, true);
        let last = &self.linears[self.linears.len() - 1];
        let logits = features.linear(&last.weight, Some(&last.bias));
        (logits, features)
    }

    /// The flattened backbone output (`N, flatten_size`) from activations taken at `stage`.
    fn flatten_from(&self, act: &Tensor, stage: Stage) -> Tensor {
        match stage {
            Stage::Flatten => act.to_device(self.device()).to_kind(Kind::Float),
            Stage::Input => self
                .run_layers(self.normalize(act), 0, self.layers.len())
                .flatten(1, -1),
            Stage::Pool(_) => {
                let start = self.layer_position(stage);
                let act = act.to_device(self.device()).to_kind(Kind::Float);
                self.run_layers(act, start, self.layers.len())
                    .flatten(1, -1)
            }
        }
    }

    /// Penultimate features (eval mode, as [`LeukNet::features`]) from activations taken at
    /// `stage`, e.g. rows of an activation cache.
    pub fn features_from(&self, act: &Tensor, stage: Stage) -> Tensor {
        self.head(&self.flatten_from(act, stage), false, true)
    }

    /// The last conv block's output averaged over space (`N, C`; 512 for VGG-16), from
    /// activations taken at `stage`: the frozen-CNN features of the Vogado et al. baseline.
    pub fn pooled_backbone_from(&self, act: &Tensor, stage: Stage) -> Tensor {
        let flat = self.flatten_from(act, stage);
        let side = self.spec.final_side() as i64;
        let channels = self.spec.last_channels() as i64;
        flat.view([-1, channels, side, side])
            .mean_dim(&[2i64, 3][..], false, Kind::Float)
    }

    /// Logits `N, 1` for `x` (`N, 3, S, S`, RGB in `[0, 1]`). `train` turns dropout on.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_from(x, Stage::Input, train)
    }

    /// Probabilities of leukemia `N` (sigmoid of the eval-mode logits), without gradient.
    pub fn predict(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.forward_t(x, false).sigmoid().view([-1]))
    }

    /// Penultimate features (eval mode): the last hidden layer after its ReLU, `N, head[-1]`
    /// (256 for LeukNet); the flattened backbone output when the head has no hidden layer.
    pub fn features(&self, x: &Tensor) -> Tensor {
        let flat = self.forward_until(x, Stage::Flatten);
        self.head(&flat, false, true)
    }

    /// The head on flattened features; `penultimate` stops before the last Linear.
    fn head(&self, flat: &Tensor, train: bool, penultimate: bool) -> Tensor {
        let mut x = flat.shallow_clone();
        let last = self.linears.len() - 1;
        for (k, lin) in self.linears.iter().enumerate() {
            if k == last {
                if penultimate {
                    return x;
                }
                x = x.linear(&lin.weight, Some(&lin.bias));
            } else {
                x = x.linear(&lin.weight, Some(&lin.bias)).relu();
                let p = self.dropout.get(k).copied().unwrap_or(0.5);
                if train && p > 0.0 {
                    x = x.dropout(p, true);
                }
            }
        }
        x
    }

    // ----- trainability -------------------------------------------------------------------

    /// Freezes and unfreezes variables for `mode` (see the module docs): conv layers in the
    /// first [`FineTuneMode::frozen_blocks`] blocks (all convs for mSFT) get
    /// `requires_grad = false`; everything else `true`. Idempotent; can be called again to
    /// switch modes.
    pub fn set_trainable(&mut self, mode: FineTuneMode) {
        if mode.freezes_whole_backbone() {
            self.set_frozen_blocks(usize::MAX);
        } else {
            self.set_frozen_blocks(mode.frozen_blocks(&self.spec));
        }
    }

    /// Freezes the conv layers of the first `k` blocks (a block ends at a max-pool; `k` at or
    /// above the number of max-pools freezes every conv) and makes every other variable,
    /// the head included, trainable. `set_frozen_blocks(0)` trains everything.
    pub fn set_frozen_blocks(&mut self, k: usize) {
        let all = k >= self.spec.pool_count();
        for layer in &self.layers {
            if let Layer::Conv(c) = layer {
                let train = !(all || c.block <= k);
                let _ = c.weight.set_requires_grad(train);
                let _ = c.bias.set_requires_grad(train);
            }
        }
        for lin in &self.linears {
            let _ = lin.weight.set_requires_grad(true);
            let _ = lin.bias.set_requires_grad(true);
        }
    }

    /// Variables that currently require a gradient, in network order.
    pub fn trainable_variables(&self) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        self.spec
            .parameter_shapes()
            .into_iter()
            .filter_map(|(n, _)| vars.get(&n).map(|t| (n, t.shallow_clone())))
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// Names of the variables that currently require a gradient, in network order.
    pub fn trainable_names(&self) -> Vec<String> {
        self.trainable_variables()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    // ----- weights in and out ---------------------------------------------------------------

    /// (Re-)initialises the weights: [`Init::Scratch`] re-draws everything; [`Init::ImageNet`]
    /// re-draws everything, then loads every conv tensor from the file (all must be present
    /// with this spec's exact shapes: only the VGG-16 conv base fits). Returns the names loaded
    /// from the file.
    pub fn load_init(&mut self, init: &Init) -> Result<Vec<String>, ModelError> {
        tch::no_grad(|| -> Result<(), ModelError> {
            for layer in &self.layers {
                if let Layer::Conv(c) = layer {
                    let w =
                        tch::nn::f_init(conv_init(), &c.weight.size(), self.device(), Kind::Float)?;
                    c.weight.shallow_clone().f_copy_(&w)?;
                    let _ = c.bias.shallow_clone().f_zero_()?;
                }
            }
            for lin in &self.linears {
                let w =
                    tch::nn::f_init(LINEAR_INIT, &lin.weight.size(), self.device(), Kind::Float)?;
                lin.weight.shallow_clone().f_copy_(&w)?;
                let _ = lin.bias.shallow_clone().f_zero_()?;
            }
            Ok(())
        })?;
        match init {
            Init::Scratch => Ok(Vec::new()),
            Init::ImageNet(path) => {
                let names: Vec<String> = self
                    .spec
                    .parameter_shapes()
                    .into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| n.starts_with("features."))
                    .collect();
                self.copy_from_file(path, &names, false)?;
                Ok(names)
            }
        }
    }

    /// Copies the tensors `names` from a safetensors file, checking exact shapes; with
    /// `reject_extra`, a file holding any other tensor is refused.
    fn copy_from_file(
        &self,
        path: &Path,
        names: &[String],
        reject_extra: bool,
    ) -> Result<(), ModelError> {
        let werr = |message: String| ModelError::Weights {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(werr(
                "not found (ImageNet weights: run ./scripts/setup --train, then import them with \
                 leuknet::train::vgg_import::import_vgg16)"
                    .into(),
            ));
        }
        let file: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| werr(e.to_string()))?
            .into_iter()
            .collect();
        if reject_extra {
            let mut extra: Vec<&String> = file.keys().filter(|n| !names.contains(n)).collect();
            if !extra.is_empty() {
                extra.sort();
                return Err(werr(format!(
                    "holds tensors this spec does not have: {extra:?}"
                )));
            }
        }
        let vars = self.vs.variables();
        tch::no_grad(|| {
            for name in names {
                let src = file
                    .get(name)
                    .ok_or_else(|| werr(format!("has no tensor {name:?}")))?;
                let mut dst = vars
                    .get(name)
                    .ok_or_else(|| werr(format!("model has no variable {name:?}")))?
                    .shallow_clone();
                if src.size() != dst.size() {
                    return Err(werr(format!(
                        "{name:?} has shape {:?}, the model needs {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                if src.kind() != Kind::Float {
                    return Err(werr(format!("{name:?} is {:?}, expected f32", src.kind())));
                }
                dst.f_copy_(src)
                    .map_err(|e| werr(format!("{name:?}: {e}")))?;
            }
            Ok(())
        })
    }

    /// Saves every variable to a `.safetensors` checkpoint (names as the writer's).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), ModelError> {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(ModelError::Weights {
                path: path.to_path_buf(),
                message: "checkpoint file name must end in .safetensors".into(),
            });
        }
        self.vs.save(path)?;
        Ok(())
    }

    /// Loads every variable from a `.safetensors` checkpoint; all names must be present with
    /// exactly this spec's shapes. Extra tensors in the file are an error too (another spec).
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), ModelError> {
        let names = self.variable_names();
        self.copy_from_file(path, &names, true)
    }

    /// Every variable as f32 values (row-major, PyTorch layout), for
    /// [`crate::onnx::write_leuknet`].
    pub fn named_weights(&self) -> BTreeMap<String, Vec<f32>> {
        let vars = self.vs.variables();
        vars.into_iter()
            .map(|(name, t)| {
                let flat = t
                    .detach()
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Float)
                    .contiguous()
                    .view([-1]);
                let values = Vec::<f32>::try_from(&flat).unwrap_or_default();
                (name, values)
            })
            .collect()
    }
}

// ----- device choice --------------------------------------------------------------------------

static CUDA_LIBRARY: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();

/// Folders where `libtorch_cuda.so` may be: next to the loaded `libtorch_cpu.so`, `$LIBTORCH/lib`,
/// every `LD_LIBRARY_PATH` entry, and this checkout's `.native/torch211/torch/lib`.
fn cuda_library_candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for line in maps.lines() {
            if let Some(pos) = line.find('/') {
                let p = Path::new(&line[pos..]);
                if p.file_name().and_then(|f| f.to_str()) == Some("libtorch_cpu.so") {
                    if let Some(dir) = p.parent() {
                        dirs.push(dir.to_path_buf());
                    }
                }
            }
        }
    }
    if let Some(lt) = std::env::var_os("LIBTORCH") {
        dirs.push(PathBuf::from(lt).join("lib"));
    }
    if let Some(ld) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&ld));
    }
    dirs.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.native/torch211/torch/lib"
    )));
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let f = d.join("libtorch_cuda.so");
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// dlopens `libtorch_cuda.so` once (RTLD_NOW | RTLD_GLOBAL, never closed), so that libtorch
/// registers its CUDA backend; the binary itself does not link it (`--as-needed`).
fn load_cuda_library() -> Result<PathBuf, String> {
    CUDA_LIBRARY
        .get_or_init(|| {
            let mut tried = Vec::new();
            for path in cuda_library_candidates() {
                if !path.is_file() {
                    continue;
                }
                let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
                    continue;
                };
                // SAFETY: dlopen with a valid NUL-terminated path; the handle is deliberately
                // leaked (the library stays loaded for the life of the process).
                let handle =
                    unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !handle.is_null() {
                    return Ok(path);
                }
                // SAFETY: dlerror returns a thread-local C string or null.
                let why = unsafe {
                    let e = libc::dlerror();
                    if e.is_null() {
                        "unknown dlopen error".to_string()
                    } else {
                        std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                    }
                };
                tried.push(format!("{}: {why}", path.display()));
            }
            if tried.is_empty() {
                Err(
                    "libtorch_cuda.so not found next to libtorch_cpu.so, in $LIBTORCH/lib or \
                     LD_LIBRARY_PATH"
                        .into(),
                )
            } else {
                Err(tried.join("; "))
            }
        })
        .clone()
}

/// The tch device for `choice`: `cpu`; `cuda` (error unless libtorch_cuda.so loads and a GPU is
/// visible); `auto` (CUDA when possible, otherwise CPU; a missing libtorch_cuda.so is fine).
pub fn device_from(choice: &str) -> Result<Device, ModelError> {
    match choice.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            let lib = load_cuda_library().map_err(ModelError::CudaUnavailable)?;
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(ModelError::CudaUnavailable(format!(
                    "{} loaded but libtorch sees no CUDA device",
                    lib.display()
                )))
            }
        }
        "auto" => {
            if load_cuda_library().is_ok() && tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        other => Err(ModelError::UnknownDevice(other.into())),
    }
}
