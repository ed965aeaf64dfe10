//! LeukNet: screening blood-smear images for leukemia (research use only).
//!
//! The crate is a library with thin binaries in `src/bin/`. Modules, top-down:
//! - [`color_norm`]: optional input colour normalisation, applied identically in training and serving.
//! - [`config`]: the server's command line (clap; every flag also a `LEUKNET_*` env var).
//! - [`http`]: the axum router, one file per route group, and the one JSON error shape.
//! - [`batching`]: the bounded queue and the task that cuts batches (size cap, delay, deadlines).
//! - [`engine`]: the ONNX Runtime session, execution-provider choice and warm-up.
//! - [`preprocess`]: bytes -> RGB -> 224x224 -> [0, 1] NCHW f32, shared by server and trainer.
//! - [`decode_pool`]: the server's decoding threads, each its own one-thread rayon pool.
//! - [`progress`]: progress bars with ETA (redrawn on a terminal, throttled lines in logs).
//! - [`model_card`]: the model card schema and its checks against the ONNX file.
//! - [`onnx`]: ONNX protobuf types and the writer of the LeukNet graph.
//! - [`ood`]: the out-of-distribution score (Mahalanobis distance on the penultimate features).
//! - [`heatmap`]: Grad-CAM grid -> normalised grid and PNG overlay.
//! - [`fixture`]: random-weight LeukNet-shaped models for tests and benchmarks (never shipped).
//! - [`metrics`]: every Prometheus metric, in one registry.
//! - [`synthetic`]: non-smear images (noise, text, scenes, other magnifications) for OOD checks.
//! - [`shutdown`]: the drain signal shared by listener, batcher and readiness.
//! - [`accept`]: the accept loop: header-read and idle timeouts, connection limit, graceful close.
//! - [`malloc`]: the C allocator's arena limit (glibc), set first thing by the server.
//! - [`audit`]: the audit log (`--audit-log`): one JSON line per classified image, rotated by size.

pub mod accept;
pub mod audit;
pub mod batching;
pub mod color_norm;
pub mod config;
pub mod decode_pool;
pub mod engine;
pub mod fixture;
pub mod heatmap;
pub mod http;
pub mod malloc;
pub mod metrics;
pub mod model_card;
pub mod onnx;
pub mod ood;
pub mod preprocess;
pub mod progress;
pub mod server;
pub mod shutdown;
pub mod synthetic;
#[cfg(feature = "train")]
pub mod train;
