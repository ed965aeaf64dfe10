//! leuknet-bench-preprocess: CPU cost of the server's image preprocessing, per input file.
//!
//! Calls [`leuknet::preprocess::preprocess`] (the function the server and the trainer use:
//! decode, resize to 224x224, `v / 255` into a CHW f32 tensor) on the file's bytes, already in
//! memory, over and over on one thread, and reads the process's CPU clock
//! (`CLOCK_PROCESS_CPUTIME_ID`: user + system time of every thread, so work a decoder hands to
//! a helper thread still counts) around each call. Prints one JSON line per file with the
//! median, p10, p90 and mean CPU milliseconds per image, the median wall time and the median
//! CPU time of the calling thread alone. The first call per file is a warm-up, not counted.
//! `bench/preprocess` runs it beside Pillow's paths (`bench/peers/preprocess_pillow.py`),
//! in `--serve` mode: one `ITERATIONS PATH` request per stdin line, one JSON line back, so
//! that short bursts of every path can alternate on a machine whose load changes.

use clap::Parser;
use leuknet::preprocess::{preprocess, Limits};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// leuknet-bench-preprocess: CPU milliseconds per image of the server's preprocessing (decode,
/// resize, normalise), one JSON line per input file.
#[derive(Debug, Parser)]
#[command(name = "leuknet-bench-preprocess", version, about, long_about = None)]
struct Args {
    /// Image files to measure, one after the other.
    #[arg(required_unless_present = "serve")]
    input: Vec<PathBuf>,

    /// Instead of the files given, read requests from stdin, one `ITERATIONS PATH` per line,
    /// and answer each with one JSON line (files are read once and kept).
    #[arg(long)]
    serve: bool,

    /// Timed calls per file (at least; see --min-seconds).
    #[arg(long, env = "LEUKNET_BENCH_ITERATIONS", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,

    /// Keep calling until at least this many seconds have passed per file.
    #[arg(long, env = "LEUKNET_BENCH_MIN_SECONDS", default_value_t = 0.0)]
    min_seconds: f64,

    /// Side of the square model input, as in the model card (224 for LeukNet).
    #[arg(long, env = "LEUKNET_BENCH_SIZE", default_value_t = 224)]
    size: u32,

    /// Largest image in pixels accepted by preprocessing, as the server's --max-pixels.
    #[arg(long, env = "LEUKNET_BENCH_MAX_PIXELS", default_value_t = 40_000_000)]
    max_pixels: u64,

    /// Leave a decoder's rayon work to rayon's global pool, as the server did before its
    /// decoding threads became one-thread rayon pools (for a before/after comparison).
    #[arg(long, env = "LEUKNET_BENCH_GLOBAL_RAYON")]
    global_rayon: bool,
}

/// Seconds on one of the kernel's CPU clocks.
fn cpu_clock(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clock ids exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

/// Times `iterations` calls (after one untimed warm-up) on `bytes` and returns the JSON line.
fn measure(
    path: &std::path::Path,
    bytes: &[u8],
    iterations: usize,
    min_seconds: f64,
    size: u32,
    limits: &Limits,
) -> anyhow::Result<serde_json::Value> {
    let expected = 3 * size as usize * size as usize;
    let first =
        preprocess(bytes, size, limits).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(first.tensor.len() == expected, "unexpected tensor length");
    let (mut cpu, mut thread, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    while cpu.len() < iterations.max(1) || started.elapsed().as_secs_f64() < min_seconds {
        let (c0, t0, w0) = (
            cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID),
            cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID),
            Instant::now(),
        );
        let out = preprocess(bytes, size, limits)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let w = w0.elapsed().as_secs_f64();
        let t = cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID) - t0;
        let c = cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID) - c0;
        std::hint::black_box(out);
        cpu.push(c * 1e3);
        thread.push(t * 1e3);
        wall.push(w * 1e3);
    }
    let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
    for v in [&mut cpu, &mut thread, &mut wall] {
        v.sort_by(f64::total_cmp);
    }
    Ok(json!({
        "file": path,
        "path": "ours",
        "width": first.width,
        "height": first.height,
        "format": first.format.as_str(),
        "iterations": cpu.len(),
        "cpu_ms_median": round4(quantile(&cpu, 0.5)),
        "cpu_ms_p10": round4(quantile(&cpu, 0.1)),
        "cpu_ms_p90": round4(quantile(&cpu, 0.9)),
        "cpu_ms_mean": round4(mean),
        "thread_cpu_ms_median": round4(quantile(&thread, 0.5)),
        "wall_ms_median": round4(quantile(&wall, 0.5)),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.global_rayon {
        return run(args);
    }
    // As on the server's decoding threads (`leuknet::decode_pool`): rayon work started by a
    // decoder runs on this thread.
    leuknet::decode_pool::on_local_rayon(|| run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    let limits = Limits {
        max_pixels: args.max_pixels,
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    if args.serve {
        use std::io::{BufRead, Write};
        let mut files: std::collections::HashMap<PathBuf, Vec<u8>> = Default::default();
        let stdout = std::io::stdout();
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let Some((n, path)) = line.trim().split_once(' ') else {
                anyhow::bail!("expected `ITERATIONS PATH`, got {line:?}");
            };
            let n: usize = n.parse()?;
            let path = PathBuf::from(path);
            if !files.contains_key(&path) {
                files.insert(path.clone(), read(&path)?);
            }
            let out = measure(&path, &files[&path], n, 0.0, args.size, &limits)?;
            let mut lock = stdout.lock();
            writeln!(lock, "{out}")?;
            lock.flush()?;
        }
        return Ok(());
    }
    for path in &args.input {
        let bytes = read(path)?;
        let out = measure(
            path,
            &bytes,
            args.iterations as usize,
            args.min_seconds,
            args.size,
            &limits,
        )?;
        println!("{out}");
    }
    Ok(())
}
