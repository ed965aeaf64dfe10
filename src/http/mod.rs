//! The HTTP API: [`app`] builds the axum router from an [`AppState`]. One file per route
//! group (`classify`, `info`, `page`: the web page), one error type ([`error::ApiError`]), and
//! one middleware that records every request in the metrics.

pub mod auth;
pub mod classify;
pub mod error;
pub mod fhir;
pub mod identifiers;
pub mod info;
pub mod page;

use crate::batching::BatchQueue;
use crate::metrics::Metrics;
use crate::model_card::ModelCard;
use crate::shutdown::Shutdown;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

/// Per-request limits, from the configuration.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Largest body in bytes.
    pub max_body_bytes: usize,
    /// Largest image in pixels.
    pub max_pixels: u64,
    /// Most images per request.
    pub max_images: usize,
    /// Deadline per request, queue included.
    pub request_timeout: Duration,
    /// Longest time to receive a whole body (408 `body_timeout`).
    pub body_read_timeout: Duration,
}

/// Runtime facts reported by `GET /v1/models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeInfo {
    /// Execution provider in use (`cpu` or `cuda`).
    pub execution_provider: &'static str,
    /// Most images per model run.
    pub max_batch_size: usize,
    /// Longest wait to fill a batch, in ms.
    pub max_queue_delay_ms: u64,
    /// Queue capacity in images.
    pub max_queue_images: usize,
    /// Most images per request.
    pub max_images_per_request: usize,
    /// Largest body in bytes.
    pub max_body_bytes: usize,
    /// Largest image in pixels.
    pub max_pixels: u64,
    /// Request deadline in ms.
    pub request_timeout_ms: u64,
    /// ONNX Runtime intra-op threads (0 = ONNX Runtime's default).
    pub intra_threads: usize,
}

/// Everything the handlers share.
pub struct AppState {
    /// The model card of the served model.
    pub card: ModelCard,
    /// The card as `/v1/models` shows it ([`ModelCard::summary_json`]), made once at start-up.
    pub card_summary: serde_json::Value,
    /// The card's colour normalisation, applied after preprocessing as in training.
    pub color_norm: crate::color_norm::ColorNormalization,
    /// The batching queue in front of the engine.
    pub queue: BatchQueue,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Drain signal.
    pub shutdown: Shutdown,
    /// True once warm-up has finished.
    pub warmed: Arc<AtomicBool>,
    /// Request limits.
    pub limits: RequestLimits,
    /// Facts for `/v1/models`.
    pub runtime: RuntimeInfo,
    /// Bounds concurrent decoding to the number of cores, so large uploads cannot flood the
    /// decoding threads' queue and starve the engine.
    pub decode_permits: tokio::sync::Semaphore,
    /// The decoding threads (as many as permits).
    pub decoder: crate::decode_pool::DecodePool,
    /// Classify requests accepted and not yet answered; draining waits for it to reach zero.
    pub active_classify: std::sync::atomic::AtomicUsize,
    /// API keys (`--api-keys-file`, `--api-keys`); None: every route is open.
    pub api_keys: Option<auth::ApiKeys>,
    /// Origins allowed to call the API from a browser (`--cors-allow-origins`); empty: CORS off.
    pub cors_allow_origins: Vec<HeaderValue>,
    /// The audit log (`--audit-log`), when enabled: one line per classified image.
    pub audit: Option<crate::audit::AuditLog>,
    /// Probabilities answered `indeterminate` (the card's band, or the `--indeterminate-band`
    /// flag's; `low == high` when off).
    pub band: classify::Band,
}

impl AppState {
    /// Ready means warmed up and not draining.
    pub fn is_ready(&self) -> bool {
        self.warmed.load(Ordering::SeqCst) && !self.shutdown.is_draining()
    }
}

/// One route: method, path (OpenAPI template syntax) and the status codes it can answer.
/// `openapi.yaml` must document exactly these (checked by a test).
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// HTTP method, upper case.
    pub method: &'static str,
    /// Path.
    pub path: &'static str,
    /// Every status code the route can answer with.
    pub statuses: &'static [u16],
}

/// The routes [`app`] serves.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "POST",
        path: "/v1/classify",
        statuses: &[200, 400, 401, 408, 413, 415, 422, 429, 500, 503, 504],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/models",
        statuses: &[200, 401],
    },
    RouteDoc {
        method: "GET",
        path: "/health/live",
        statuses: &[200],
    },
    RouteDoc {
        method: "GET",
        path: "/health/ready",
        statuses: &[200, 503],
    },
    RouteDoc {
        method: "GET",
        path: "/metrics",
        statuses: &[200],
    },
    RouteDoc {
        method: "GET",
        path: "/openapi.yaml",
        statuses: &[200, 401],
    },
    RouteDoc {
        method: "GET",
        path: "/",
        statuses: &[200, 304],
    },
    RouteDoc {
        method: "GET",
        path: "/assets/app.js",
        statuses: &[200, 304],
    },
    RouteDoc {
        method: "GET",
        path: "/assets/app.css",
        statuses: &[200, 304],
    },
];

/// Builds the router with every route, fallback and middleware.
pub fn app(state: Arc<AppState>) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let cors = cors_layer(&state.cors_allow_origins);
    let router = Router::new()
        .route("/v1/classify", post(classify::classify))
        .route("/v1/models", get(info::models))
        .route("/health/live", get(info::live))
        .route("/health/ready", get(info::ready))
        .route("/metrics", get(info::metrics))
        .route("/openapi.yaml", get(info::openapi))
        .route("/", get(page::index))
        .route(page::APP_JS_PATH, get(page::app_js))
        .route(page::APP_CSS_PATH, get(page::app_css))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            // The API key's name (never the key) is recorded by the auth middleware.
            tracing::info_span!(
                "request",
                method = %req.method(),
                uri = %req.uri(),
                request_id = %id,
                api_key = tracing::field::Empty,
                accession_id = tracing::field::Empty,
                specimen_id = tracing::field::Empty,
            )
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state);
    // Outermost, so that a browser's preflight is answered before authentication.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins (none: no layer, no CORS headers): the API's methods, the
/// request headers a client sends, and the response headers worth reading.
fn cors_layer(origins: &[HeaderValue]) -> Option<tower_http::cors::CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let name = HeaderName::from_static;
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins.to_vec())
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::ACCEPT,
                name("x-request-id"),
                name("x-accession-id"),
                name("x-specimen-id"),
            ])
            .expose_headers([
                name("x-request-id"),
                name("server-timing"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// The error code a response carries, so the metrics middleware can count failures by reason.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// Keeps the in-flight gauge right even when the client leaves and the handler is dropped;
/// a request dropped before its answer is counted with status 499 (client closed request).
struct InFlight<'a> {
    metrics: &'a Metrics,
    route: &'a str,
    method: &'a str,
    start: Instant,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.answered {
            self.metrics
                .requests
                .with_label_values(&[self.route, self.method, "499"])
                .inc();
            self.metrics
                .request_duration
                .with_label_values(&[self.route])
                .observe(self.start.elapsed().as_secs_f64());
        }
    }
}

async fn record(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let metrics = &state.metrics;
    metrics.in_flight.inc();
    let mut guard = InFlight {
        metrics,
        route: &route,
        method: &method,
        start: Instant::now(),
        answered: false,
    };
    let response = next.run(req).await;
    guard.answered = true;
    let status = response.status();
    metrics
        .requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    metrics
        .request_duration
        .with_label_values(&[route.as_str()])
        .observe(guard.start.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics.failures.with_label_values(&[code]).inc();
    }
    response
}
