//! `leuknet-fixture`: writes a RANDOM-WEIGHT LeukNet-shaped model (ONNX + model card) for tests
//! and benchmarks. The card is marked `fixture: true`; the model's predictions mean nothing.

use clap::Parser;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

/// Writes a RANDOM-WEIGHT LeukNet-shaped model for tests and benchmarks only.
///
/// The output directory receives `leuknet.onnx` (the production graph: VGG-16 conv base,
/// 1024-256-1 head, in-graph Caffe normalisation) filled with seeded random weights, and
/// `leuknet.json`, its model card (marked `fixture: true`). Its predictions are meaningless:
/// never use it on patient data or ship it. Prints the card's path.
#[derive(Debug, Parser)]
#[command(name = "leuknet-fixture", version, about, long_about)]
struct Args {
    /// Directory to write leuknet.onnx and leuknet.json into (created if missing).
    #[arg(long, env = "LEUKNET_FIXTURE_OUT")]
    out: PathBuf,
    /// Divide every layer's width by this (16 gives a fast, small model for tests; 1 is
    /// full size, ~40.7M parameters, ~163 MB).
    #[arg(long, env = "LEUKNET_FIXTURE_WIDTH_DIV", default_value_t = NonZeroUsize::MIN)]
    width_div: NonZeroUsize,
    /// Seed of the random weights; the same seed and width give the same files.
    #[arg(long, env = "LEUKNET_FIXTURE_SEED", default_value_t = 0)]
    seed: u64,
    /// TEST ONLY: any batch holding a pure white image fails to run (to test that one failing
    /// batch disturbs nothing else).
    #[arg(long, env = "LEUKNET_FIXTURE_FAULT_ON_WHITE_INPUT")]
    fault_on_white_input: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match leuknet::fixture::write_fixture_with(
        &args.out,
        args.width_div.get(),
        args.seed,
        args.fault_on_white_input,
    ) {
        Ok(card) => {
            println!("{}", card.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leuknet-fixture: {e}");
            ExitCode::FAILURE
        }
    }
}
