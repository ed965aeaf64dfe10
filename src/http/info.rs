//! Read-only routes: model info, health, metrics and the OpenAPI document (the web page is
//! `page.rs`).

use super::error::ApiError;
use super::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// The OpenAPI document, embedded at build time.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// `GET /v1/models`: the model card (out-of-distribution statistics summarised) plus runtime
/// facts.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "models": [{
            "card": state.card_summary,
            "runtime": state.runtime,
            "ready": state.is_ready(),
        }]
    }))
}

/// `GET /health/live`: the process is up and answering.
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "live"}))
}

/// `GET /health/ready`: 200 once the model is loaded and warmed, 503 before and while draining.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else if state.shutdown.is_draining() {
        ApiError::ShuttingDown.into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `GET /openapi.yaml`.
pub async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI_YAML,
    )
        .into_response()
}
