//! The inference engine: one ONNX Runtime session for the LeukNet graph, on the CPU or CUDA
//! execution provider. The batcher owns it on a dedicated thread; it never runs on the async
//! runtime.

use crate::model_card::{CardError, ModelCard, TensorSpec};
use ort::ep::ExecutionProvider as _;
use ort::session::{builder::GraphOptimizationLevel, OutputSelector, RunOptions, Session};
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

/// How ONNX Runtime manages memory and its threads, beyond [`EngineOptions`]. The defaults
/// ([`SessionTuning::default`]) are the server's; see `bench/README.md` for the measurements
/// behind them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTuning {
    /// ONNX Runtime's CPU memory arena: keeps the buffers it allocated for reuse (no page
    /// faults on later runs), so the process keeps the peak of the largest batch it ran,
    /// warm-up included. Off: buffers are allocated and freed per run; resident memory then
    /// still peaks as high during each run (measured), so the arena stays on.
    pub cpu_mem_arena: bool,
    /// Memory-pattern planning: one block per input shape, planned from the first run of that
    /// shape and kept in the arena for the following ones, beside the blocks of every other
    /// batch size. Off: the arena reuses its chunks across shapes, tensor by tensor
    /// (measured: about 30-40 MB less at a largest batch of 1-2, no throughput cost).
    pub memory_pattern: bool,
    /// Whether the intra-op worker threads spin while waiting for work (faster hand-offs,
    /// but the spinning burns CPU that image decoding on the same cores could use).
    pub intra_op_spinning: bool,
    /// Whether kernels keep a pre-packed copy of their weights (ONNX Runtime's default). Off
    /// (`session.disable_prepacking`): one copy of the weights, packed per run where a kernel
    /// needs it.
    pub prepacking: bool,
}

impl Default for SessionTuning {
    /// Arena on, memory pattern off, spinning on, pre-packing on.
    fn default() -> Self {
        SessionTuning {
            cpu_mem_arena: true,
            memory_pattern: false,
            intra_op_spinning: true,
            prepacking: true,
        }
    }
}

/// A loaded model ready to run batches.
pub struct Engine {
    session: Session,
    input_name: String,
    probability_output: String,
    /// The Grad-CAM output and its cells per image, when the card declares it.
    gradcam: Option<(String, usize)>,
    /// Feature-vector outputs fetched on every detailed run, with their widths: by default the
    /// one the card's OOD statistics are of ([`Engine::set_vector_outputs`] changes it).
    vectors: Vec<(String, usize)>,
    image_len: usize,
    provider: &'static str,
}

/// Everything the engine reports for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOutput {
    /// Probability of leukemia (calibrated when the card says so).
    pub probability: f32,
    /// One vector per [`Engine::set_vector_outputs`] output, in that order (by default the
    /// features the card's OOD statistics are of; none without statistics).
    pub vectors: Vec<Vec<f32>>,
    /// The Grad-CAM grid, row-major, when asked for and the graph has it.
    pub gradcam: Option<Vec<f32>>,
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
        Self::load_tuned(model, card, options, &SessionTuning::default())
    }

    /// [`Engine::load`] with explicit [`SessionTuning`].
    pub fn load_tuned(
        model: &[u8],
        card: &ModelCard,
        options: &EngineOptions,
        tuning: &SessionTuning,
    ) -> Result<Self, EngineError> {
        Self::load_source(ModelSource::Bytes(model), card, options, tuning)
    }

    fn load_source(
        model: ModelSource<'_>,
        card: &ModelCard,
        options: &EngineOptions,
        tuning: &SessionTuning,
    ) -> Result<Self, EngineError> {
        let (session, provider) = match options.device {
            Device::Cpu => (build_session(model, options, tuning, false)?, "cpu"),
            Device::Cuda => (build_session(model, options, tuning, true)?, "cuda"),
            Device::Auto => match build_session(model, options, tuning, true) {
                Ok(s) => (s, "cuda"),
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA unavailable, falling back to the CPU provider");
                    (build_session(model, options, tuning, false)?, "cpu")
                }
            },
        };
        card.verify_graph(
            &tensor_specs(session.inputs()),
            &tensor_specs(session.outputs()),
        )?;
        let size = card.input.size as usize;
        let gradcam = card
            .explain
            .as_ref()
            .map(|e| (e.gradcam_output.clone(), (e.grid[0] * e.grid[1]) as usize));
        let vectors = match &card.ood {
            Some(ood) => vec![vector_output(card, &ood.features_output)?],
            None => Vec::new(),
        };
        Ok(Self {
            session,
            input_name: card.input.tensor.name.clone(),
            probability_output: card.probability_output.clone(),
            gradcam,
            vectors,
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

    /// Chooses the feature-vector outputs [`Engine::run_detailed`] returns (each must be a
    /// card output of shape `[-1, width]`).
    pub fn set_vector_outputs(
        &mut self,
        card: &ModelCard,
        names: &[&str],
    ) -> Result<(), EngineError> {
        self.vectors = names
            .iter()
            .map(|name| vector_output(card, name))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Runs one batch of `batch` images laid out back to back (NCHW) and returns one
    /// probability of leukemia per image (only the probability output is asked for).
    pub fn run(&mut self, input: Vec<f32>, batch: usize) -> Result<Vec<f32>, EngineError> {
        let outputs = self.run_outputs(input, batch, false, false)?;
        Ok(outputs.into_iter().map(|o| o.probability).collect())
    }

    /// Runs one batch and returns, per image, the probability, the feature vectors (see
    /// [`Engine::set_vector_outputs`]) and, when `gradcam` is set and the graph has it, the
    /// Grad-CAM grid.
    pub fn run_detailed(
        &mut self,
        input: Vec<f32>,
        batch: usize,
        gradcam: bool,
    ) -> Result<Vec<ImageOutput>, EngineError> {
        self.run_outputs(input, batch, true, gradcam)
    }

    fn run_outputs(
        &mut self,
        input: Vec<f32>,
        batch: usize,
        features: bool,
        gradcam: bool,
    ) -> Result<Vec<ImageOutput>, EngineError> {
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
        let mut selector = OutputSelector::no_default().with(self.probability_output.as_str());
        let vectors: &[(String, usize)] = if features { &self.vectors } else { &[] };
        let gradcam = self.gradcam.as_ref().filter(|_| gradcam);
        for (name, _) in vectors {
            selector = selector.with(name.as_str());
        }
        if let Some((name, _)) = gradcam {
            selector = selector.with(name.as_str());
        }
        let options = RunOptions::new()
            .map_err(err(EngineError::Run))?
            .with_outputs(selector);
        let outputs = self
            .session
            .run_with_options(ort::inputs![self.input_name.as_str() => tensor], &options)
            .map_err(err(EngineError::Run))?;
        let read = |name: &str, per_image: usize| -> Result<Vec<Vec<f32>>, EngineError> {
            let value = outputs
                .get(name)
                .ok_or_else(|| EngineError::Run(format!("no output {name}")))?;
            let (_, data) = value
                .try_extract_tensor::<f32>()
                .map_err(err(EngineError::Run))?;
            if data.len() != batch * per_image {
                return Err(EngineError::Run(format!(
                    "output {name} has {} values for a batch of {batch}",
                    data.len()
                )));
            }
            Ok(data.chunks(per_image).map(<[f32]>::to_vec).collect())
        };
        let probabilities = read(&self.probability_output, 1)?;
        let mut per_image: Vec<Vec<Vec<f32>>> = vec![Vec::new(); batch];
        for (name, width) in vectors {
            for (image, v) in per_image.iter_mut().zip(read(name, *width)?) {
                image.push(v);
            }
        }
        let mut gradcam = match gradcam {
            Some((name, cells)) => read(name, *cells)?.into_iter().map(Some).collect(),
            None => vec![None; batch],
        };
        Ok(probabilities
            .into_iter()
            .enumerate()
            .map(|(i, probability)| ImageOutput {
                probability: probability[0],
                vectors: std::mem::take(&mut per_image[i]),
                gradcam: gradcam[i].take(),
            })
            .collect())
    }
}

/// A card output of shape `[-1, width]`, with its width.
fn vector_output(card: &ModelCard, name: &str) -> Result<(String, usize), EngineError> {
    card.outputs
        .iter()
        .find(|o| o.name == name)
        .and_then(|o| match o.shape[..] {
            [-1, w] if w > 0 => Some((name.to_string(), w as usize)),
            _ => None,
        })
        .ok_or_else(|| {
            EngineError::Card(CardError::Invalid(format!(
                "{name:?} is not an output of shape [-1, width] in the card"
            )))
        })
}

/// Where ONNX Runtime reads the model from.
#[derive(Clone, Copy)]
enum ModelSource<'a> {
    /// Bytes already in memory.
    Bytes(&'a [u8]),
    /// A file ONNX Runtime parses as a stream, so the whole file is never in memory besides
    /// the weights ONNX Runtime keeps (at start-up, one model size less than from bytes).
    File(&'a Path),
}

fn build_session(
    model: ModelSource<'_>,
    options: &EngineOptions,
    tuning: &SessionTuning,
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
        .map_err(err(EngineError::Session))?
        .with_memory_pattern(tuning.memory_pattern)
        .map_err(err(EngineError::Session))?
        .with_intra_op_spinning(tuning.intra_op_spinning)
        .map_err(err(EngineError::Session))?
        .with_prepacking(tuning.prepacking)
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
    // The CPU provider's arena switch is a session option; it applies beside CUDA too.
    builder = builder
        .with_execution_providers([ort::ep::CPU::default()
            .with_arena_allocator(tuning.cpu_mem_arena)
            .build()])
        .map_err(err(EngineError::Session))?;
    match model {
        ModelSource::Bytes(bytes) => builder.commit_from_memory(bytes),
        ModelSource::File(path) => builder.commit_from_file(path),
    }
    .map_err(err(EngineError::Session))
}

/// Loads card + model from disk, verifying sha256 and graph, and builds the engine.
pub fn load_from_card(
    card_path: &Path,
    options: &EngineOptions,
) -> Result<(ModelCard, Engine), EngineError> {
    load_from_card_tuned(card_path, options, &SessionTuning::default())
}

/// [`load_from_card`] with explicit [`SessionTuning`].
pub fn load_from_card_tuned(
    card_path: &Path,
    options: &EngineOptions,
    tuning: &SessionTuning,
) -> Result<(ModelCard, Engine), EngineError> {
    let card = ModelCard::load(card_path)?;
    let onnx = card.onnx_path(card_path);
    // The sha256 is checked on the file, which ONNX Runtime then reads itself (streaming):
    // holding the bytes while ONNX Runtime builds the session would add one model size to
    // the start-up peak of resident memory.
    card.verify_model_file(&onnx)?;
    let engine = Engine::load_source(ModelSource::File(&onnx), &card, options, tuning)?;
    Ok((card, engine))
}
