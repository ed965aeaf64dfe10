//! The model card (`models/<name>.json`): what the model is, how to feed it, how far to trust it.
//!
//! The server refuses to start unless the card's sha256 matches the ONNX file and the graph's
//! input/output names and shapes match the card ([`ModelCard::verify_graph`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Why a model card could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("cannot read model card {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model card {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot read model file {path}: {source}")]
    ReadModel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {path} has sha256 {actual}, but its card says {expected}: the card does not describe this file")]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("model graph does not match its card: {0}")]
    GraphMismatch(String),
    #[error("model card is inconsistent: {0}")]
    Invalid(String),
}

/// One named tensor of the graph, with its shape; `-1` marks the symbolic batch dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
}

/// How an image must be turned into the model's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Graph input name and shape, `[-1, 3, size, size]`.
    pub tensor: TensorSpec,
    /// Square side in pixels the image is resized to.
    pub size: u32,
    /// Channel order of the input tensor (`RGB`).
    pub channel_order: String,
    /// Memory layout (`NCHW`).
    pub layout: String,
    /// Range of the input values (`[0, 1]`).
    pub value_range: [f32; 2],
    /// The resize method, in words, so other implementations can match it.
    pub resize: String,
    /// Normalisation applied outside the graph (`none`: the graph normalises itself).
    pub normalization: String,
}

/// The two classes, by output meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classes {
    /// Label when the probability is at or above the threshold.
    pub positive: String,
    /// Label below the threshold.
    pub negative: String,
}

/// The decision rule and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Probability of leukemia at or above which the label is `positive`.
    pub threshold: f32,
    /// How the threshold was chosen (data and criterion), in words.
    pub chosen_by: String,
    /// Probabilities in `[low, high)` are answered `indeterminate` (the server's default band;
    /// absent: no band).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indeterminate: Option<IndeterminateBand>,
}

/// A band of probabilities around the threshold where the model does not commit to a label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndeterminateBand {
    /// Lowest probability answered `indeterminate`.
    pub low: f32,
    /// Probabilities from here up are `positive` again.
    pub high: f32,
    /// How the band was chosen, in words (data and criterion, with the measured figures).
    pub chosen_by: String,
}

/// The in-graph explanation outputs of the model (see [`crate::onnx::explain`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainSpec {
    /// The method, `grad-cam`.
    pub method: String,
    /// Output holding the map, `[-1, rows, cols]`, non-negative and not normalised.
    pub gradcam_output: String,
    /// Output holding the penultimate features, `[-1, width]`.
    pub features_output: String,
    /// Output holding the last conv block's output averaged over space, `[-1, channels]`.
    pub pooled_output: String,
    /// Rows and columns of the map; it covers the whole (squashed) input image.
    pub grid: [u32; 2],
    /// Which layer the map is of and for which output, in words.
    pub layer: String,
}

impl ExplainSpec {
    /// The explanation outputs the writer adds to a graph of `spec`.
    pub fn for_spec(spec: &crate::onnx::LeukNetSpec) -> Self {
        let side = spec.final_side() as u32;
        ExplainSpec {
            method: "grad-cam".into(),
            gradcam_output: crate::onnx::GRADCAM_OUTPUT.into(),
            features_output: crate::onnx::FEATURES_OUTPUT.into(),
            pooled_output: crate::onnx::POOLED_OUTPUT.into(),
            grid: [side, side],
            layer:
                "last conv block after its max-pool, for the leukemia logit (computed in the graph)"
                    .into(),
        }
    }
}

/// The model card. Free-form sections (`architecture`, `training`, `metrics`) stay JSON so the
/// trainer can record whatever its protocol produced without a schema change here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub name: String,
    pub version: String,
    pub description: String,
    /// File name of the ONNX graph, relative to the card.
    pub onnx_file: String,
    /// sha256 of the ONNX file, lowercase hex.
    pub sha256: String,
    pub input: InputSpec,
    /// Graph outputs; the one named [`ModelCard::probability_output`] is read by the server.
    pub outputs: Vec<TensorSpec>,
    /// Name of the output that holds the probability of leukemia, shape `[-1, 1]`.
    pub probability_output: String,
    pub classes: Classes,
    pub decision: Decision,
    pub architecture: serde_json::Value,
    pub training: serde_json::Value,
    pub metrics: serde_json::Value,
    pub intended_use: String,
    pub disclaimer: String,
    /// True for random-weight test fixtures: such a model must never be shipped or trusted.
    #[serde(default)]
    pub fixture: bool,
    /// Known limits of the model, in plain sentences (measured where they give figures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limitations: Vec<String>,
    /// The graph's explanation outputs, when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<ExplainSpec>,
    /// Statistics of the training features for the out-of-distribution score, when fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood: Option<crate::ood::OodStats>,
}

impl InputSpec {
    /// The input of every LeukNet graph the ONNX writer produces: `image`, `[-1, 3, size, size]`,
    /// RGB in [0, 1], preprocessed by [`crate::preprocess::preprocess`], normalised in-graph.
    pub fn leuknet(size: u32) -> Self {
        let side = size as i64;
        InputSpec {
            tensor: TensorSpec {
                name: crate::onnx::INPUT_NAME.into(),
                shape: vec![-1, 3, side, side],
            },
            size,
            channel_order: "RGB".into(),
            layout: "NCHW".into(),
            value_range: [0.0, 1.0],
            resize: crate::preprocess::RESIZE_METHOD.into(),
            normalization: "none (applied inside the graph)".into(),
        }
    }
}

/// The outputs of every LeukNet graph the ONNX writer produces for `spec`: `logit` and
/// `probability`, both `[-1, 1]`, then the explanation outputs `gradcam` and `features`.
pub fn leuknet_outputs(spec: &crate::onnx::LeukNetSpec) -> Vec<TensorSpec> {
    let scores = [crate::onnx::LOGIT_OUTPUT, crate::onnx::PROBABILITY_OUTPUT]
        .into_iter()
        .map(|name| TensorSpec {
            name: name.into(),
            shape: vec![-1, 1],
        });
    let explain = crate::onnx::ExplainPlan::for_spec(spec)
        .output_shapes()
        .into_iter()
        .map(|(name, shape)| TensorSpec {
            name: name.into(),
            shape,
        });
    scores.chain(explain).collect()
}

impl Classes {
    /// LeukNet's classes: `leukemic` at or above the threshold, `healthy` below.
    pub fn leuknet() -> Self {
        Classes {
            positive: "leukemic".into(),
            negative: "healthy".into(),
        }
    }
}

/// Lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl ModelCard {
    /// Reads and parses a card from disk.
    pub fn load(path: &Path) -> Result<Self, CardError> {
        let text = std::fs::read_to_string(path).map_err(|source| CardError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let card: ModelCard = serde_json::from_str(&text).map_err(|source| CardError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        card.validate()?;
        Ok(card)
    }

    /// Internal consistency: a threshold in (0, 1), the probability output listed, a 4-d input.
    pub fn validate(&self) -> Result<(), CardError> {
        if !(self.decision.threshold > 0.0 && self.decision.threshold < 1.0) {
            return Err(CardError::Invalid(format!(
                "decision threshold {} is not inside (0, 1)",
                self.decision.threshold
            )));
        }
        if !self
            .outputs
            .iter()
            .any(|o| o.name == self.probability_output)
        {
            return Err(CardError::Invalid(format!(
                "probability output {:?} is not among the outputs",
                self.probability_output
            )));
        }
        self.color_normalization()?;
        if let Some(band) = &self.decision.indeterminate {
            let t = self.decision.threshold;
            if !(band.low <= t && t <= band.high && band.low >= 0.0 && band.high <= 1.0) {
                return Err(CardError::Invalid(format!(
                    "indeterminate band [{}, {}) does not hold the threshold {t} inside [0, 1]",
                    band.low, band.high
                )));
            }
        }
        for (what, name) in [
            self.explain
                .as_ref()
                .map(|e| ("explain.gradcam_output", &e.gradcam_output)),
            self.explain
                .as_ref()
                .map(|e| ("explain.features_output", &e.features_output)),
            self.ood
                .as_ref()
                .map(|o| ("ood.features_output", &o.features_output)),
        ]
        .into_iter()
        .flatten()
        {
            if !self.outputs.iter().any(|o| &o.name == name) {
                return Err(CardError::Invalid(format!(
                    "{what} {name:?} is not among the outputs"
                )));
            }
        }
        if let Some(ood) = &self.ood {
            ood.validate().map_err(CardError::Invalid)?;
        }
        let s = self.input.size as i64;
        if self.input.tensor.shape.len() != 4 || self.input.tensor.shape[1..] != [3, s, s] {
            return Err(CardError::Invalid(format!(
                "input shape {:?} is not [-1, 3, {s}, {s}]",
                self.input.tensor.shape
            )));
        }
        Ok(())
    }

    /// The colour normalisation the model was trained with (`architecture.color_normalization`;
    /// absent or null means none). The server applies it after preprocessing, exactly as the
    /// trainer did.
    pub fn color_normalization(&self) -> Result<crate::color_norm::ColorNormalization, CardError> {
        match self.architecture.get("color_normalization") {
            None | Some(serde_json::Value::Null) => Ok(Default::default()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| CardError::Invalid(format!("architecture.color_normalization: {e}"))),
        }
    }

    /// The card as JSON with the out-of-distribution statistics summarised (their precision
    /// matrix is feature-width squared: the card file has it), as `GET /v1/models` shows it.
    pub fn summary_json(&self) -> serde_json::Value {
        let mut card = serde_json::to_value(self).unwrap_or_default();
        if let (Some(ood), Some(object)) = (&self.ood, card.as_object_mut()) {
            object.insert("ood".into(), ood.summary());
        }
        card
    }

    /// Path of the ONNX file this card describes, relative to the card's own location.
    pub fn onnx_path(&self, card_path: &Path) -> PathBuf {
        card_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&self.onnx_file)
    }

    /// Reads the model file, checks its sha256 against the card and returns the bytes.
    pub fn read_verified_model(&self, model_path: &Path) -> Result<Vec<u8>, CardError> {
        let bytes = std::fs::read(model_path).map_err(|source| CardError::ReadModel {
            path: model_path.to_path_buf(),
            source,
        })?;
        self.check_sha256(model_path, sha256_hex(&bytes))?;
        Ok(bytes)
    }

    /// `Sha256Mismatch` unless `actual` (hex) is the card's sha256.
    fn check_sha256(&self, model_path: &Path, actual: String) -> Result<(), CardError> {
        if actual != self.sha256 {
            return Err(CardError::Sha256Mismatch {
                path: model_path.to_path_buf(),
                expected: self.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Checks the model file's sha256 against the card, reading it in chunks (the file is
    /// never held in memory whole), for loaders that then read the file themselves.
    pub fn verify_model_file(&self, model_path: &Path) -> Result<(), CardError> {
        use std::io::Read;
        let read_error = |source| CardError::ReadModel {
            path: model_path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(model_path).map_err(read_error)?;
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            hasher.update(&chunk[..n]);
        }
        self.check_sha256(model_path, hex::encode(hasher.finalize()))
    }

    /// Checks the graph's declared inputs and outputs (as read by the engine) against the card.
    /// Every card output must exist with the same shape; the graph may have more outputs.
    pub fn verify_graph(
        &self,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<(), CardError> {
        match inputs {
            [only] if only == &self.input.tensor => {}
            _ => {
                return Err(CardError::GraphMismatch(format!(
                    "graph inputs {inputs:?}, card expects exactly {:?}",
                    self.input.tensor
                )))
            }
        }
        for want in &self.outputs {
            match outputs.iter().find(|o| o.name == want.name) {
                Some(got) if got == want => {}
                Some(got) => {
                    return Err(CardError::GraphMismatch(format!(
                        "output {:?} has shape {:?}, card says {:?}",
                        want.name, got.shape, want.shape
                    )))
                }
                None => {
                    return Err(CardError::GraphMismatch(format!(
                        "output {:?} is missing; the graph has {:?}",
                        want.name,
                        outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
                    )))
                }
            }
        }
        Ok(())
    }
}
