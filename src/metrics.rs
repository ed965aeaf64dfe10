//! Every Prometheus metric the server exports, in one registry. Names carry the `leuknet_`
//! prefix and their unit; every metric has HELP text.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from 1 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The registry and handles to each metric.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by matched route, method and status code.
    pub requests: IntCounterVec,
    /// Failed requests or images by reason (the error code on the wire, or an internal reason).
    pub failures: IntCounterVec,
    /// Whole-request duration by route.
    pub request_duration: HistogramVec,
    /// Time an image waited in the queue before its batch started.
    pub queue_duration: Histogram,
    /// Decode + resize + normalise time per image.
    pub preprocess_duration: Histogram,
    /// Model run time per batch.
    pub inference_duration: Histogram,
    /// Images per executed batch.
    pub batch_size: Histogram,
    /// Images waiting in the queue.
    pub queue_depth: IntGauge,
    /// HTTP requests being handled.
    pub in_flight: IntGauge,
    /// Images that went through the model.
    pub images_inferred: IntCounter,
    /// Batches the model ran.
    pub batch_executions: IntCounter,
    /// Predictions by label.
    pub predictions: IntCounterVec,
    /// Distribution of the predicted probability of leukemia.
    pub prediction_score: Histogram,
    /// Images whose features were unlike the training data (`in_distribution: false`).
    pub out_of_distribution: IntCounter,
    /// Constant 1, labelled with the model in use.
    pub model_info: IntGaugeVec,
    /// 1 when ready to serve (model loaded and warmed, not draining).
    pub ready: IntGauge,
    /// Audit log lines by outcome: `written`, `failed` (write error), `dropped` (queue full
    /// or writer stopped).
    pub audit_records: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are unique constants below, so registration cannot collide.
    r.register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()))
                .expect("valid histogram")
        };
        Self {
            requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "leuknet_http_requests_total",
                        "HTTP requests by route, method and status code.",
                    ),
                    &["route", "method", "status"],
                )
                .expect("valid"),
            ),
            failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "leuknet_failures_total",
                        "Failed requests or images by reason.",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            request_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "leuknet_http_request_duration_seconds",
                        "Whole HTTP request duration by route.",
                    )
                    .buckets(SECONDS_BUCKETS.to_vec()),
                    &["route"],
                )
                .expect("valid"),
            ),
            queue_duration: reg(
                &r,
                hist(
                    "leuknet_queue_duration_seconds",
                    "Time an image waited in the batching queue.",
                ),
            ),
            preprocess_duration: reg(
                &r,
                hist(
                    "leuknet_preprocess_duration_seconds",
                    "Decode, resize and normalise time per image.",
                ),
            ),
            inference_duration: reg(
                &r,
                hist(
                    "leuknet_inference_duration_seconds",
                    "Model run time per batch.",
                ),
            ),
            batch_size: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("leuknet_batch_size_images", "Images per executed batch.")
                        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )
                .expect("valid"),
            ),
            queue_depth: reg(
                &r,
                IntGauge::new(
                    "leuknet_queue_depth_images",
                    "Images waiting in the batching queue.",
                )
                .expect("valid"),
            ),
            in_flight: reg(
                &r,
                IntGauge::new(
                    "leuknet_http_requests_in_flight",
                    "HTTP requests being handled.",
                )
                .expect("valid"),
            ),
            images_inferred: reg(
                &r,
                IntCounter::new(
                    "leuknet_images_inferred_total",
                    "Images that went through the model.",
                )
                .expect("valid"),
            ),
            batch_executions: reg(
                &r,
                IntCounter::new("leuknet_batch_executions_total", "Batches the model ran.")
                    .expect("valid"),
            ),
            predictions: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("leuknet_predictions_total", "Predictions by label."),
                    &["label"],
                )
                .expect("valid"),
            ),
            prediction_score: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "leuknet_prediction_probability_ratio",
                        "Predicted probability of leukemia.",
                    )
                    .buckets((1..=19).map(|i| i as f64 * 0.05).collect()),
                )
                .expect("valid"),
            ),
            out_of_distribution: reg(
                &r,
                IntCounter::new(
                    "leuknet_out_of_distribution_images_total",
                    "Images whose features were unlike the training data (in_distribution false).",
                )
                .expect("valid"),
            ),
            model_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "leuknet_model_info",
                        "Constant 1, labelled with the model being served.",
                    ),
                    &["name", "version", "sha256", "execution_provider"],
                )
                .expect("valid"),
            ),
            ready: reg(
                &r,
                IntGauge::new(
                    "leuknet_ready",
                    "1 when the model is loaded and warmed and the server is not draining.",
                )
                .expect("valid"),
            ),
            audit_records: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "leuknet_audit_records_total",
                        "Audit log lines by outcome (written, failed, dropped).",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which we never build.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
