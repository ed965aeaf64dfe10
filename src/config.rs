//! The server's configuration: one clap struct, every flag also a `LEUKNET_*` environment
//! variable, all shown by `leuknet-server --help`.

use crate::engine::Device;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// leuknet-server: classifies blood-smear images (leukemic / healthy) with the LeukNet model
/// over REST. Research use only; not a medical device.
#[derive(Debug, Clone, Parser)]
#[command(name = "leuknet-server", version, about, long_about = None)]
pub struct ServerConfig {
    /// Address to listen on.
    #[arg(long, env = "LEUKNET_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Model card (JSON); the ONNX file it names is loaded from the same folder.
    #[arg(
        long,
        env = "LEUKNET_MODEL_CARD",
        default_value = "models/leuknet.json"
    )]
    pub model_card: PathBuf,

    /// ONNX Runtime shared library (installed by ./scripts/setup). A relative path is tried
    /// from the working directory, then from the repository root the binary was built in.
    #[arg(long, env = "LEUKNET_ORT_LIBRARY", default_value = crate::engine::DEFAULT_ORT_LIBRARY)]
    pub ort_library: PathBuf,

    /// Execution provider: cuda fails at start-up if CUDA cannot be used; auto falls back to cpu.
    #[arg(long, env = "LEUKNET_DEVICE", value_enum, default_value_t = Device::Auto)]
    pub device: Device,

    /// ONNX Runtime intra-op threads (0 = one per core).
    #[arg(long, env = "LEUKNET_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// ONNX Runtime's CPU memory arena (true/false): buffers kept for reuse between runs.
    #[arg(long, env = "LEUKNET_CPU_MEM_ARENA", default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_mem_arena: bool,

    /// ONNX Runtime's memory-pattern planning (true/false): one pre-planned block per input
    /// shape, kept between runs (off by default: it holds a block per batch size; see
    /// bench/README.md).
    #[arg(long, env = "LEUKNET_MEMORY_PATTERN", default_value_t = false, action = clap::ArgAction::Set)]
    pub memory_pattern: bool,

    /// Whether ONNX Runtime's intra-op threads spin while waiting for work (true/false).
    #[arg(long, env = "LEUKNET_INTRA_OP_SPINNING", default_value_t = true, action = clap::ArgAction::Set)]
    pub intra_op_spinning: bool,

    /// Whether ONNX Runtime's kernels keep pre-packed copies of their weights (true/false).
    #[arg(long, env = "LEUKNET_PREPACKING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prepacking: bool,

    /// Most malloc arenas (glibc) the process may use; 0 = glibc's default (8 per core). Few
    /// arenas keep the resident set near what is live under load (bench/memory measures it);
    /// the MALLOC_ARENA_MAX environment variable, when set, takes precedence.
    #[arg(long, env = "LEUKNET_MALLOC_ARENAS", default_value_t = 2)]
    pub malloc_arenas: u32,

    /// Largest batch the model runs, in images; 0 = by execution provider: 8 on CUDA,
    /// 2 on the CPU (larger CPU batches gain no throughput and cost resident memory; see
    /// bench/README.md).
    #[arg(long, env = "LEUKNET_MAX_BATCH_SIZE", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub max_batch_size: u32,

    /// How long the batcher may wait for more images once it holds one and the batch is not
    /// full (ms). 0 runs at once whenever the engine is free: batches then form from the
    /// images that arrived while the previous batch ran, at no added latency.
    #[arg(long, env = "LEUKNET_MAX_QUEUE_DELAY_MS", default_value_t = 0)]
    pub max_queue_delay_ms: u64,

    /// Images that may wait in the queue; more are refused with 429 and Retry-After.
    #[arg(long, env = "LEUKNET_MAX_QUEUE_IMAGES", default_value_t = 64)]
    pub max_queue_images: usize,

    /// Deadline for a request, queue included (ms); expired requests never reach the model (504).
    #[arg(long, env = "LEUKNET_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Largest request body in bytes (413 above).
    #[arg(long, env = "LEUKNET_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest image in pixels (width x height); checked from the header before decoding (413).
    #[arg(long, env = "LEUKNET_MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,

    /// Most images in one request (413 above).
    #[arg(long, env = "LEUKNET_MAX_IMAGES_PER_REQUEST", default_value_t = 32)]
    pub max_images_per_request: usize,

    /// On SIGTERM/ctrl-c, how long accepted requests may take to finish (ms).
    #[arg(long, env = "LEUKNET_DRAIN_TIMEOUT_MS", default_value_t = 30_000)]
    pub drain_timeout_ms: u64,

    /// Longest time a client may take to send a request head (ms); slower connections are
    /// closed without an answer (slow loris). Also bounds how long a kept-alive connection may
    /// wait for its next request.
    #[arg(long, env = "LEUKNET_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,

    /// Longest time to receive a whole request body, from the end of its head (ms); slower
    /// uploads get 408 `body_timeout` and their connection is closed.
    #[arg(long, env = "LEUKNET_BODY_READ_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_ms: u64,

    /// A kept-alive connection with no request in progress that moves no byte for this long
    /// is closed (ms); 0 turns keep-alive off (one request per connection).
    #[arg(
        long,
        env = "LEUKNET_KEEP_ALIVE_IDLE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub keep_alive_idle_timeout_ms: u64,

    /// Most connections open at once; while that many are open, new connections wait in the
    /// kernel's listen backlog (not accepted, not refused) until one closes.
    #[arg(long, env = "LEUKNET_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// API keys file: one `name:sha256hex` per line, the sha256 of each key
    /// (`printf %s "$KEY" | sha256sum`), `#` comments. With keys (here or in --api-keys) every
    /// route but /health/*, /metrics, / and /assets/* needs `Authorization: Bearer <key>` (401).
    #[arg(long, env = "LEUKNET_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// API keys inline: `name:sha256hex` entries separated by commas (joins --api-keys-file).
    #[arg(long, env = "LEUKNET_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// Origins (e.g. `https://lis.example.org`, comma-separated) whose web pages may call the
    /// API from a browser (CORS). Empty (the default): no CORS headers, so browsers allow only
    /// pages served by this server itself.
    #[arg(long, env = "LEUKNET_CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,

    /// Probabilities answered `indeterminate` instead of a label: `card` (the model card's
    /// band), `off`, or `LOW,HIGH` (probabilities in [LOW, HIGH); must hold the threshold).
    #[arg(long, env = "LEUKNET_INDETERMINATE_BAND", default_value = "card", value_parser = parse_band)]
    pub indeterminate_band: BandChoice,

    /// Audit log: append one JSON line per classified image to this file (time, request,
    /// accession and specimen ids, image sha256 and file name, model, label, probability,
    /// timings; never the image). Off when unset.
    #[arg(long, env = "LEUKNET_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Rotate the audit log before it would grow past this many bytes.
    #[arg(long, env = "LEUKNET_AUDIT_LOG_MAX_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_log_max_bytes: u64,

    /// Rotated audit logs to keep (`PATH.1` newest … `PATH.N` oldest); 0 keeps none.
    #[arg(long, env = "LEUKNET_AUDIT_LOG_KEEP", default_value_t = 10)]
    pub audit_log_keep: usize,

    /// Log format.
    #[arg(long, env = "LEUKNET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `leuknet=debug`).
    #[arg(long, env = "LEUKNET_LOG", default_value = "info")]
    pub log: String,
}

/// `--indeterminate-band`: the card's band, none, or an explicit one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BandChoice {
    /// The model card's `decision.indeterminate` (none if the card has none).
    Card,
    /// No band: every image gets a label.
    Off,
    /// Probabilities in `[low, high)`.
    Explicit { low: f32, high: f32 },
}

fn parse_band(text: &str) -> Result<BandChoice, String> {
    match text.trim() {
        "card" => Ok(BandChoice::Card),
        "off" | "none" => Ok(BandChoice::Off),
        other => {
            let (low, high) = other
                .split_once(',')
                .ok_or("use card, off, or LOW,HIGH (e.g. 0.3,0.4)")?;
            let p = |v: &str| v.trim().parse::<f32>().map_err(|e| format!("{v:?}: {e}"));
            let (low, high) = (p(low)?, p(high)?);
            if !(0.0 <= low && low <= high && high <= 1.0) {
                return Err(format!("need 0 <= LOW <= HIGH <= 1, got {low},{high}"));
            }
            Ok(BandChoice::Explicit { low, high })
        }
    }
}

/// The largest batch with `--max-batch-size 0` on the CPU provider.
pub const CPU_AUTO_MAX_BATCH: u32 = 2;
/// The largest batch with `--max-batch-size 0` on CUDA.
pub const CUDA_AUTO_MAX_BATCH: u32 = 8;

impl ServerConfig {
    /// The batch limit in force for `provider` (`"cpu"` or `"cuda"`): `--max-batch-size`, or
    /// when that is 0, [`CPU_AUTO_MAX_BATCH`] / [`CUDA_AUTO_MAX_BATCH`].
    pub fn effective_max_batch_size(&self, provider: &str) -> u32 {
        match (self.max_batch_size, provider) {
            (0, "cuda") => CUDA_AUTO_MAX_BATCH,
            (0, _) => CPU_AUTO_MAX_BATCH,
            (n, _) => n,
        }
    }

    /// The ONNX Runtime memory and thread settings these flags ask for.
    pub fn session_tuning(&self) -> crate::engine::SessionTuning {
        crate::engine::SessionTuning {
            cpu_mem_arena: self.cpu_mem_arena,
            memory_pattern: self.memory_pattern,
            intra_op_spinning: self.intra_op_spinning,
            prepacking: self.prepacking,
        }
    }

    /// The band in force for `card`, checked against its threshold.
    pub fn band(&self, card: &crate::model_card::ModelCard) -> Result<(f32, f32), String> {
        let t = card.decision.threshold;
        let (low, high) = match self.indeterminate_band {
            BandChoice::Card => match &card.decision.indeterminate {
                Some(b) => (b.low, b.high),
                None => (t, t),
            },
            BandChoice::Off => (t, t),
            BandChoice::Explicit { low, high } => (low, high),
        };
        if !(low <= t && t <= high) {
            return Err(format!(
                "--indeterminate-band {low},{high} does not hold the model's threshold {t}"
            ));
        }
        Ok((low, high))
    }

    /// The audit log settings, when `--audit-log` is given.
    pub fn audit(&self) -> Option<crate::audit::AuditConfig> {
        self.audit_log
            .as_ref()
            .map(|path| crate::audit::AuditConfig {
                path: path.clone(),
                max_bytes: self.audit_log_max_bytes,
                keep: self.audit_log_keep,
            })
    }

    /// The API keys of `--api-keys-file` and `--api-keys`; None when neither is given.
    pub fn api_keys(&self) -> Result<Option<crate::http::auth::ApiKeys>, String> {
        crate::http::auth::ApiKeys::load(self.api_keys_file.as_deref(), self.api_keys.as_deref())
    }

    /// Resolves the ONNX Runtime library path: as given if it exists, else relative to the
    /// repository root recorded at build time (so `cargo run` works from any folder).
    pub fn resolved_ort_library(&self) -> PathBuf {
        if self.ort_library.is_absolute() || self.ort_library.exists() {
            return self.ort_library.clone();
        }
        let from_repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&self.ort_library);
        if from_repo.exists() {
            from_repo
        } else {
            self.ort_library.clone()
        }
    }

    /// The connection limits of the accept loop ([`crate::accept`]).
    pub fn conn_limits(&self) -> crate::accept::ConnLimits {
        crate::accept::ConnLimits {
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            keep_alive_idle_timeout: std::time::Duration::from_millis(
                self.keep_alive_idle_timeout_ms,
            ),
            max_connections: self.max_connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServerConfig {
        let mut all = vec!["leuknet-server"];
        all.extend_from_slice(args);
        ServerConfig::try_parse_from(all).expect("flags parse")
    }

    #[test]
    fn memory_flags_default_to_arena_on_pattern_off_spinning_on_prepacking_on() {
        let c = parse(&[]);
        let t = c.session_tuning();
        assert!(t.cpu_mem_arena && !t.memory_pattern && t.intra_op_spinning && t.prepacking);
        assert_eq!(t, crate::engine::SessionTuning::default());
        let c = parse(&[
            "--cpu-mem-arena",
            "false",
            "--memory-pattern",
            "true",
            "--intra-op-spinning",
            "false",
            "--prepacking",
            "false",
        ]);
        let t = c.session_tuning();
        assert!(!t.cpu_mem_arena && t.memory_pattern && !t.intra_op_spinning && !t.prepacking);
        assert!(
            ServerConfig::try_parse_from(["leuknet-server", "--cpu-mem-arena", "maybe"]).is_err()
        );
    }

    #[test]
    fn audit_log_is_off_by_default_and_rotates_at_64_mib_keeping_10() {
        let c = parse(&[]);
        assert!(c.audit().is_none());
        assert_eq!(c.audit_log_max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.audit_log_keep, 10);
        let c = parse(&[
            "--audit-log",
            "/var/log/leuknet/audit.jsonl",
            "--audit-log-max-bytes",
            "1000",
            "--audit-log-keep",
            "3",
        ]);
        let a = c.audit().unwrap();
        assert_eq!(a.path, PathBuf::from("/var/log/leuknet/audit.jsonl"));
        assert_eq!((a.max_bytes, a.keep), (1000, 3));
        assert!(
            ServerConfig::try_parse_from(["leuknet-server", "--audit-log-max-bytes", "0"]).is_err()
        );
    }

    #[test]
    fn indeterminate_band_parses_card_off_and_pairs() {
        assert_eq!(parse(&[]).indeterminate_band, BandChoice::Card);
        assert_eq!(
            parse(&["--indeterminate-band", "off"]).indeterminate_band,
            BandChoice::Off
        );
        assert_eq!(
            parse(&["--indeterminate-band", "0.25,0.5"]).indeterminate_band,
            BandChoice::Explicit {
                low: 0.25,
                high: 0.5
            }
        );
        for bad in ["0.5,0.2", "x", "0.1,1.5"] {
            assert!(
                ServerConfig::try_parse_from(["leuknet-server", "--indeterminate-band", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn max_batch_size_zero_means_by_provider() {
        let c = parse(&[]);
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.effective_max_batch_size("cpu"), CPU_AUTO_MAX_BATCH);
        assert_eq!(c.effective_max_batch_size("cuda"), CUDA_AUTO_MAX_BATCH);
        let c = parse(&["--max-batch-size", "5"]);
        assert_eq!(c.effective_max_batch_size("cpu"), 5);
        assert_eq!(c.effective_max_batch_size("cuda"), 5);
        assert!(
            ServerConfig::try_parse_from(["leuknet-server", "--max-batch-size", "257"]).is_err()
        );
    }

    #[test]
    fn connection_limits_default_and_parse() {
        let c = parse(&[]);
        assert_eq!(
            (
                c.header_read_timeout_ms,
                c.body_read_timeout_ms,
                c.keep_alive_idle_timeout_ms,
                c.max_connections
            ),
            (10_000, 30_000, 5_000, 1024)
        );
        let l = parse(&[
            "--header-read-timeout-ms",
            "250",
            "--keep-alive-idle-timeout-ms",
            "0",
            "--max-connections",
            "3",
        ])
        .conn_limits();
        assert_eq!(l.header_read_timeout, std::time::Duration::from_millis(250));
        assert!(l.keep_alive_idle_timeout.is_zero());
        assert_eq!(l.max_connections, 3);
        for bad in [
            ["--header-read-timeout-ms", "0"],
            ["--body-read-timeout-ms", "0"],
            ["--max-connections", "0"],
        ] {
            let mut args = vec!["leuknet-server"];
            args.extend_from_slice(&bad);
            assert!(ServerConfig::try_parse_from(args).is_err(), "{bad:?}");
        }
    }
}
