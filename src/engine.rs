//! The inference engine: one ONNX Runtime session for the LeukNet graph, on the CPU or CUDA
//! execution provider. The batcher owns it on a dedicated thread; it never runs on the async
//! runtime.

use crate::model_card::{CardError, ModelCard, TensorSpec};
use ort::ep::ExecutionProvider as _;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{Tensor, ValueType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Which execution provider to run the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// CUDA; start-up fails if it cannot be registered.
    Cuda,
    /// CUDA when it can be registered, otherwise CPU with a warning.
    Auto,
}

/// Why the engine could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime library not found at {0}: run ./scripts/setup, or point --ort-library \
         (LEUKNET_ORT_LIBRARY) at libonnxruntime.so"
    )]
    LibraryMissing(PathBuf),
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    LibraryLoad { path: PathBuf, message: String },
    #[error("CUDA execution provider requested but unavailable: {0}")]
    CudaUnavailable(String),
    #[error("cannot create the ONNX Runtime session: {0}")]
    Session(String),
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("inference failed: {0}")]
    Run(String),
    #[error("input has {got} values, expected {expected} for a batch of {batch}")]
    InputSize {
        got: usize,
        expected: usize,
        batch: usize,
    },
}

fn err<E: std::fmt::Display>(f: fn(String) -> EngineError) -> impl Fn(E) -> EngineError {
    move |e| f(e.to_string())
}

static RUNTIME: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime shared library once per process (ort allows one environment).
/// Later calls return the first outcome, whatever path they pass.
pub fn init_runtime(library: &Path) -> Result<(), EngineError> {
    if !library.is_file() {
        return Err(EngineError::LibraryMissing(library.to_path_buf()));
    }
    let outcome = RUNTIME.get_or_init(|| {
        ort::init_from(library)
            .map_err(|e| e.to_string())
            .and_then(|b| b.with_name("leuknet").build().map_err(|e| e.to_string()))
    });
    outcome
        .as_ref()
        .map(|_| ())
        .map_err(|message| EngineError::LibraryLoad {
            path: library.to_path_buf(),
            message: message.clone(),
        })
}

fn environment() -> Result<&'static ort::environment::Environment, EngineError> {
    match RUNTIME.get() {
        Some(Ok(env)) => Ok(env),
        Some(Err(m)) => Err(EngineError::Session(m.clone())),
        None => Err(EngineError::Session(
            "init_runtime must be called before loading a model".into(),
        )),
    }
}

/// The library `scripts/setup` installs, relative to the repository root.
pub const DEFAULT_ORT_LIBRARY: &str = ".native/onnxruntime/lib/libonnxruntime.so.1.31.1";

/// How to build a session.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Execution provider choice.
    pub device: Device,
    /// ONNX Runtime intra-op threads; 0 lets ONNX Runtime decide (one per core).
    pub intra_threads: usize,
}

/// A loaded model ready to run batches.
pub struct Engine {
    session: Session,
    input_name: String,
    probability_output: String,
    image_len: usize,
    provider: &'static str,
}

fn tensor_specs(outlets: &[ort::value::Outlet]) -> Vec<TensorSpec> {
    outlets
        .iter()
        .map(|o| TensorSpec {
            name: o.name().to_string(),
            shape: match o.dtype() {
                ValueType::Tensor { shape, .. } => shape.to_vec(),
                _ => vec![],
            },
        })
        .collect()
}

impl Engine {
    /// Builds a session from model bytes already checked against the card's sha256, then checks
    /// the graph's inputs and outputs against the card. [`init_runtime`] must have run.
    pub fn load(
        model: &[u8],
        card: &ModelCard,
        options: &EngineOptions,
    ) -> Result<Self, EngineError> {
        let (session, provider) = match options.device {
            Device::Cpu => (build_session(model, options, false)?, "cpu"),
            Device::Cuda => (build_session(model, options, true)?, "cuda"),
            Device::Auto => match build_session(model, options, true) {
                Ok(s) => (s, "cuda"),
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA unavailable, falling back to the CPU provider");
                    (build_session(model, options, false)?, "cpu")
                }
            },
        };
        card.verify_graph(
            &tensor_specs(session.inputs()),
            &tensor_specs(session.outputs()),
        )?;
        let size = card.input.size as usize;
        Ok(Self {
            session,
            input_name: card.input.tensor.name.clone(),
            probability_output: card.probability_output.clone(),
            image_len: 3 * size * size,
            provider,
        })
    }

    /// The execution provider in use: `cpu` or `cuda`.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Number of f32 values of one preprocessed image.
    pub fn image_len(&self) -> usize {
        self.image_len
    }

    /// Runs one batch of `batch` images laid out back to back (NCHW) and returns one
    /// probability of leukemia per image.
    pub fn run(&mut self, input: Vec<f32>, batch: usize) -> Result<Vec<f32>, EngineError> {
        let expected = batch * self.image_len;
        if input.len() != expected || batch == 0 {
            return Err(EngineError::InputSize {
                got: input.len(),
                expected,
                batch,
            });
        }
        let side = ((self.image_len / 3) as f64).sqrt() as usize;
        let tensor = Tensor::from_array(([batch, 3, side, side], input.into_boxed_slice()))
            .map_err(err(EngineError::Run))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(err(EngineError::Run))?;
        let value = outputs
            .get(self.probability_output.as_str())
            .ok_or_else(|| EngineError::Run(format!("no output {}", self.probability_output)))?;
        let (_, data) = value
            .try_extract_tensor::<f32>()
            .map_err(err(EngineError::Run))?;
        if data.len() != batch {
            return Err(EngineError::Run(format!(
                "output has {} values for a batch of {batch}",
                data.len()
            )));
        }
        Ok(data.to_vec())
    }
}

fn build_session(
    model: &[u8],
    options: &EngineOptions,
    cuda: bool,
) -> Result<Session, EngineError> {
    let env = environment()?;
    let mut builder = Session::builder(env)
        .map_err(err(EngineError::Session))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(err(EngineError::Session))?
        // LeukNet graphs quantise weights only (int8 + DequantizeLinear on constants), never
        // activations. With QDQ handling off, constant folding turns each DequantizeLinear into
        // an f32 initializer once, at load, instead of dequantising 40M weights on every run
        // (measured: int8 then runs as fast as fp32).
        .with_config_entry("session.disable_quant_qdq", "1")
        .map_err(err(EngineError::Session))?;
    if options.intra_threads > 0 {
        builder = builder
            .with_intra_threads(options.intra_threads)
            .map_err(err(EngineError::Session))?;
    }
    if cuda {
        match ort::ep::CUDA::is_available() {
            Ok(true) => {}
            Ok(false) => {
                return Err(EngineError::CudaUnavailable(
                    "this ONNX Runtime library was built without the CUDA provider".into(),
                ))
            }
            Err(e) => return Err(EngineError::CudaUnavailable(e.to_string())),
        }
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(err(EngineError::CudaUnavailable))?;
    }
    builder
        .commit_from_memory(model)
        .map_err(err(EngineError::Session))
}

/// Loads card + model from disk, verifying sha256 and graph, and builds the engine.
pub fn load_from_card(
    card_path: &Path,
    options: &EngineOptions,
) -> Result<(ModelCard, Engine), EngineError> {
    let card = ModelCard::load(card_path)?;
    let bytes = card.read_verified_model(&card.onnx_path(card_path))?;
    let engine = Engine::load(&bytes, &card, options)?;
    Ok((card, engine))
}
