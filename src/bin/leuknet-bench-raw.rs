//! leuknet-bench-raw: the engine's own throughput, without HTTP, queueing or decoding, so that
//! the server's figures (bench/run) can be read as a fraction of what the model alone can do.
//!
//! Loads the engine from a model card, preprocesses the `--input` images once (or makes random
//! tensors), then for each batch size runs one untimed warm-up batch and as many timed batches
//! as fit in `--seconds`. Prints one JSON line per batch size and a final summary line; logs go
//! to stderr so stdout stays machine-readable.

use clap::Parser;
use leuknet::engine::{self, Device, Engine, EngineOptions, SessionTuning};
use leuknet::preprocess::{self, Limits};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// leuknet-bench-raw: LeukNet inference throughput per batch size, straight on the engine (no
/// HTTP). Prints JSON lines: {batch, images_per_s, ms_per_batch, runs, ...} per batch size, then
/// {best_batch, best_images_per_s, ...}.
#[derive(Debug, Parser)]
#[command(name = "leuknet-bench-raw", version, about, long_about = None)]
struct Args {
    /// Model card (JSON); the ONNX file it names is loaded from the same folder.
    #[arg(long, env = "LEUKNET_BENCH_MODEL_CARD")]
    model_card: PathBuf,

    /// ONNX Runtime shared library; a relative path is tried from the working directory, then
    /// from the repository root the binary was built in.
    #[arg(long, env = "LEUKNET_BENCH_ORT_LIBRARY", default_value = engine::DEFAULT_ORT_LIBRARY)]
    ort_library: PathBuf,

    /// Execution provider, as for the server (cuda fails if CUDA cannot be used).
    #[arg(long, env = "LEUKNET_BENCH_DEVICE", value_enum, default_value_t = Device::Auto)]
    device: Device,

    /// ONNX Runtime intra-op threads (0 = one per core).
    #[arg(long, env = "LEUKNET_BENCH_INTRA_THREADS", default_value_t = 0)]
    intra_threads: usize,

    /// Batch sizes to measure, comma-separated.
    #[arg(
        long,
        env = "LEUKNET_BENCH_BATCH_SIZES",
        value_delimiter = ',',
        default_value = "1,2,4,8",
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    batch_sizes: Vec<u32>,

    /// Timed seconds per batch size (at least one timed batch always runs).
    #[arg(long, env = "LEUKNET_BENCH_SECONDS", default_value_t = 10.0, value_parser = positive_seconds)]
    seconds: f64,

    /// Image files to preprocess once and cycle through to fill batches (comma-separated in the
    /// environment variable). Without any, batches are random tensors in [0, 1].
    #[arg(long, env = "LEUKNET_BENCH_INPUT", num_args = 1.., value_delimiter = ',')]
    input: Vec<PathBuf>,

    /// ONNX Runtime's CPU memory arena (true/false), as the server's --cpu-mem-arena.
    #[arg(long, env = "LEUKNET_BENCH_CPU_MEM_ARENA", default_value_t = SessionTuning::default().cpu_mem_arena, action = clap::ArgAction::Set)]
    cpu_mem_arena: bool,

    /// ONNX Runtime's memory-pattern planning (true/false), as the server's --memory-pattern.
    #[arg(long, env = "LEUKNET_BENCH_MEMORY_PATTERN", default_value_t = SessionTuning::default().memory_pattern, action = clap::ArgAction::Set)]
    memory_pattern: bool,

    /// Intra-op thread spinning (true/false), as the server's --intra-op-spinning.
    #[arg(long, env = "LEUKNET_BENCH_INTRA_OP_SPINNING", default_value_t = SessionTuning::default().intra_op_spinning, action = clap::ArgAction::Set)]
    intra_op_spinning: bool,
    /// Pre-packed weight copies (true/false), as the server's --prepacking.
    #[arg(long, env = "LEUKNET_BENCH_PREPACKING", default_value_t = SessionTuning::default().prepacking, action = clap::ArgAction::Set)]
    prepacking: bool,

    /// Largest image in pixels accepted by preprocessing, as the server's --max-pixels.
    #[arg(long, env = "LEUKNET_BENCH_MAX_PIXELS", default_value_t = 40_000_000)]
    max_pixels: u64,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a positive number of seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// As `ServerConfig::resolved_ort_library`: as given if it exists, else from the repository root.
fn resolve_ort_library(path: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    let from_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if from_repo.exists() {
        from_repo
    } else {
        path.to_path_buf()
    }
}

/// Reads every `--input` file up front, so a wrong path fails before the model loads.
fn read_inputs(args: &Args) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    args.input
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            Ok((path.clone(), bytes))
        })
        .collect()
}

/// One preprocessed tensor per input file, or one random tensor when there are none.
fn images(
    inputs: &[(PathBuf, Vec<u8>)],
    max_pixels: u64,
    size: u32,
    image_len: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    if inputs.is_empty() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x1e0c);
        return Ok(vec![(0..image_len).map(|_| rng.random::<f32>()).collect()]);
    }
    let limits = Limits { max_pixels };
    inputs
        .iter()
        .map(|(path, bytes)| {
            let pre = preprocess::preprocess(bytes, size, &limits)
                .map_err(|e| anyhow::anyhow!("cannot preprocess {}: {e}", path.display()))?;
            anyhow::ensure!(
                pre.tensor.len() == image_len,
                "{}: preprocessing gave {} values, the model takes {image_len}",
                path.display(),
                pre.tensor.len()
            );
            Ok(pre.tensor)
        })
        .collect()
}

/// Timings of one batch size.
struct Measured {
    batch: usize,
    runs: usize,
    /// Time inside `Engine::run`, summed over the timed runs.
    busy: Duration,
    /// Per-run times, sorted.
    sorted_ms: Vec<f64>,
}

impl Measured {
    fn images_per_s(&self) -> f64 {
        (self.batch * self.runs) as f64 / self.busy.as_secs_f64()
    }

    fn ms_per_batch(&self) -> f64 {
        self.busy.as_secs_f64() * 1000.0 / self.runs as f64
    }

    /// Nearest-rank percentile of the per-run times.
    fn percentile_ms(&self, p: f64) -> f64 {
        let rank = ((p / 100.0) * self.sorted_ms.len() as f64).ceil() as usize;
        self.sorted_ms[rank.clamp(1, self.sorted_ms.len()) - 1]
    }
}

/// One warm-up run, then timed runs until `seconds` have passed. Only `Engine::run` is timed:
/// copying the prepared batch into the owned input vector happens outside the clock.
fn measure(
    engine: &mut Engine,
    images: &[Vec<f32>],
    batch: usize,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let mut input = Vec::with_capacity(batch * engine.image_len());
    for i in 0..batch {
        input.extend_from_slice(&images[i % images.len()]);
    }
    let check = |probabilities: &[f32]| -> anyhow::Result<()> {
        anyhow::ensure!(
            probabilities
                .iter()
                .all(|p| p.is_finite() && (0.0..=1.0).contains(p)),
            "the model returned a value outside [0, 1]: {probabilities:?}"
        );
        Ok(())
    };
    check(&engine.run(input.clone(), batch)?)?;

    let budget = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut busy = Duration::ZERO;
    let mut times = Vec::new();
    while times.is_empty() || started.elapsed() < budget {
        let owned = input.clone();
        let t0 = Instant::now();
        let out = engine.run(owned, batch)?;
        let dt = t0.elapsed();
        check(&out)?;
        busy += dt;
        times.push(dt.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        batch,
        runs: times.len(),
        busy,
        sorted_ms: times,
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leuknet-bench-raw: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEUKNET_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let inputs = read_inputs(args)?;
    engine::init_runtime(&resolve_ort_library(&args.ort_library))?;
    let options = EngineOptions {
        device: args.device,
        intra_threads: args.intra_threads,
    };
    let tuning = SessionTuning {
        cpu_mem_arena: args.cpu_mem_arena,
        memory_pattern: args.memory_pattern,
        intra_op_spinning: args.intra_op_spinning,
        prepacking: args.prepacking,
    };
    let (card, mut engine) = engine::load_from_card_tuned(&args.model_card, &options, &tuning)?;
    let images = images(
        &inputs,
        args.max_pixels,
        card.input.size,
        engine.image_len(),
    )?;

    let mut best: Option<Measured> = None;
    for &batch in &args.batch_sizes {
        let m = measure(&mut engine, &images, batch as usize, args.seconds)?;
        println!(
            "{}",
            json!({
                "batch": m.batch,
                "images_per_s": round3(m.images_per_s()),
                "ms_per_batch": round3(m.ms_per_batch()),
                "runs": m.runs,
                "p50_ms": round3(m.percentile_ms(50.0)),
                "p99_ms": round3(m.percentile_ms(99.0)),
            })
        );
        if best
            .as_ref()
            .is_none_or(|b| m.images_per_s() > b.images_per_s())
        {
            best = Some(m);
        }
    }
    let best = best.ok_or_else(|| anyhow::anyhow!("no batch sizes given"))?;
    println!(
        "{}",
        json!({
            "best_batch": best.batch,
            "best_images_per_s": round3(best.images_per_s()),
            "execution_provider": engine.provider(),
            "model": {"name": card.name, "version": card.version, "sha256": card.sha256, "fixture": card.fixture},
            "inputs": if args.input.is_empty() { json!("random") } else { json!(args.input.len()) },
            "seconds_per_batch_size": args.seconds,
            "intra_threads": args.intra_threads,
            "cpu_mem_arena": args.cpu_mem_arena,
            "memory_pattern": args.memory_pattern,
            "intra_op_spinning": args.intra_op_spinning,
            "prepacking": args.prepacking,
        })
    );
    Ok(())
}
