//! `POST /v1/classify`: one or more images in, one result per image out, in request order.
//!
//! Body (multipart `image` parts, or a raw `image/*` body) -> size and type checks ->
//! preprocessing on the decoding threads, all images in parallel -> the batching queue -> the
//! engine thread -> one JSON result per image.

use super::error::ApiError;
use super::identifiers::Identifiers;
use super::AppState;
use crate::batching::{JobError, JobOutput};
use crate::model_card::sha256_hex;
use crate::preprocess::{self, ImageFormat, Limits, PreprocessError};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The model's identity, repeated in each result so a stored result stands alone.
#[derive(Debug, Serialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// Where the time went for one image, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
}

/// Facts about the uploaded image.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub format: &'static str,
    pub sha256: String,
    /// File name from the multipart part, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

/// Probabilities in `[low, high)` are answered `indeterminate`; `low == high` means no band.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Band {
    pub low: f32,
    pub high: f32,
}

/// The Grad-CAM map of one image (with `?explain=true`).
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `grad-cam`.
    pub method: &'static str,
    /// The map normalised to its maximum, row by row; it covers the whole image as the model
    /// saw it (squashed to a square).
    pub grid: Vec<Vec<f32>>,
    /// The map's raw maximum (the gradient-weighted activation), before normalising.
    pub grid_max: f32,
    /// RGBA PNG overlay of the map, base64; stretch it over the whole image.
    pub overlay_png_base64: String,
    pub overlay_width: u32,
    pub overlay_height: u32,
}

/// The answer for one image.
#[derive(Debug, Serialize)]
pub struct ClassifyResult {
    /// The positive or negative class, or `indeterminate` inside the band.
    pub label: String,
    /// Calibrated probability of leukemia.
    pub probability: f32,
    pub threshold: f32,
    pub indeterminate_band: Band,
    /// Distance of the image's features to the training data (null when the card has no
    /// statistics); `in_distribution` is false at or above `ood_threshold`.
    pub ood_score: Option<f32>,
    pub ood_threshold: Option<f32>,
    pub in_distribution: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
    pub model: ModelRef,
    pub execution_provider: &'static str,
    pub timings: Timings,
    pub image: ImageInfo,
    pub disclaimer: String,
    /// The request's accession number (`accession_id` field or `X-Accession-Id`), when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accession_id: Option<String>,
    /// The request's specimen identifier (`specimen_id` field or `X-Specimen-Id`), when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specimen_id: Option<String>,
}

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct ClassifyResponse {
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accession_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specimen_id: Option<String>,
    pub results: Vec<ClassifyResult>,
}

/// One image of a request body.
#[derive(Debug)]
pub struct Upload {
    /// The image's bytes.
    pub bytes: Bytes,
    /// File name from the multipart part, when given.
    pub filename: Option<String>,
}

struct Decoded {
    tensor: Vec<f32>,
    width: u32,
    height: u32,
    format: ImageFormat,
    sha256: String,
    decode_time: Duration,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Handles `POST /v1/classify`.
pub async fn classify(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let deadline = started + state.limits.request_timeout;
    let _active = ActiveGuard::enter(&state);
    if state.shutdown.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let explain = parse_explain(query.as_deref())?;
    if explain && state.card.explain.is_none() {
        return Err(ApiError::BadRequest(
            "explain=true: this model has no Grad-CAM output (re-export it, see README)".into(),
        ));
    }
    let (uploads, ids) = read_uploads(&state, &headers, body).await?;
    let span = tracing::Span::current();
    if let Some(id) = &ids.accession_id {
        span.record("accession_id", tracing::field::display(id));
    }
    if let Some(id) = &ids.specimen_id {
        span.record("specimen_id", tracing::field::display(id));
    }
    // The bodies move into the decoders and are freed as soon as each is decoded: a request
    // waiting in the queue holds its 224x224 tensor, not its (up to megabytes of) upload.
    let (bodies, filenames): (Vec<Bytes>, Vec<Option<String>>) =
        uploads.into_iter().map(|u| (u.bytes, u.filename)).unzip();
    let decoded = decode_all(&state, bodies).await?;

    let (tensors, decoded): (Vec<_>, Vec<_>) = decoded
        .into_iter()
        .map(|mut d| (std::mem::take(&mut d.tensor), d))
        .unzip();
    let receivers = state
        .queue
        .submit(tensors, deadline, explain)
        .map_err(|full| ApiError::QueueFull(full.to_string(), retry_after_secs(&state)))?;

    let mut outputs: Vec<JobOutput> = Vec::with_capacity(receivers.len());
    for rx in receivers {
        let answer = tokio::time::timeout_at(deadline.into(), rx)
            .await
            .map_err(|_| ApiError::DeadlineExceeded)?
            .map_err(|_| ApiError::Internal("the engine dropped a request".into()))?;
        outputs.push(answer.map_err(|e| match e {
            JobError::DeadlineExceeded => ApiError::DeadlineExceeded,
            JobError::Inference(m) => ApiError::Inference(m),
            JobError::ShuttingDown => ApiError::ShuttingDown,
        })?);
    }

    let card = &state.card;
    let threshold = card.decision.threshold;
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut max = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let results: Vec<ClassifyResult> = decoded
        .into_iter()
        .zip(outputs)
        .zip(filenames)
        .map(|((d, out), filename)| {
            let p = out.probability;
            let label = if state.band.low <= p && p < state.band.high {
                INDETERMINATE
            } else if p >= threshold {
                &card.classes.positive
            } else {
                &card.classes.negative
            };
            let ood_score = card
                .ood
                .as_ref()
                .zip(out.features.as_deref())
                .map(|(ood, f)| ood.score(f));
            let in_distribution = card
                .ood
                .as_ref()
                .zip(ood_score)
                .map(|(o, s)| o.in_distribution(s));
            if in_distribution == Some(false) {
                state.metrics.out_of_distribution.inc();
            }
            let explanation = out
                .gradcam
                .as_deref()
                .zip(card.explain.as_ref())
                .map(|(grid, e)| {
                    let [rows, cols] = e.grid.map(|v| v as usize);
                    let size = card.input.size;
                    Explanation {
                        method: "grad-cam",
                        grid: crate::heatmap::normalised_rows(grid, cols),
                        grid_max: grid.iter().copied().fold(0f32, f32::max),
                        overlay_png_base64: base64::engine::general_purpose::STANDARD
                            .encode(crate::heatmap::overlay_png(grid, rows, cols, size)),
                        overlay_width: size,
                        overlay_height: size,
                    }
                });
            state.metrics.predictions.with_label_values(&[label]).inc();
            state
                .metrics
                .prediction_score
                .observe(out.probability as f64);
            max = (
                max.0.max(d.decode_time),
                max.1.max(out.queue_time),
                max.2.max(out.inference_time),
            );
            ClassifyResult {
                label: label.to_string(),
                probability: out.probability,
                threshold,
                indeterminate_band: state.band,
                ood_score,
                ood_threshold: card.ood.as_ref().map(|o| o.threshold),
                in_distribution,
                explanation,
                model: ModelRef {
                    name: card.name.clone(),
                    version: card.version.clone(),
                    sha256: card.sha256.clone(),
                },
                execution_provider: state.runtime.execution_provider,
                timings: Timings {
                    decode_ms: ms(d.decode_time),
                    queue_ms: ms(out.queue_time),
                    inference_ms: ms(out.inference_time),
                },
                image: ImageInfo {
                    width: d.width,
                    height: d.height,
                    format: d.format.as_str(),
                    sha256: d.sha256,
                    filename,
                },
                disclaimer: card.disclaimer.clone(),
                accession_id: ids.accession_id.clone(),
                specimen_id: ids.specimen_id.clone(),
            }
        })
        .collect();

    tracing::info!(images = results.len(), "classified");
    let response = ClassifyResponse {
        request_id,
        accession_id: ids.accession_id,
        specimen_id: ids.specimen_id,
        results,
    };
    let fhir = super::fhir::prefers_fhir(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut response = render(&state, &response, fhir).await?;
    let timing = format!(
        "decode;dur={}, queue;dur={}, inference;dur={}, total;dur={}",
        ms(max.0),
        ms(max.1),
        ms(max.2),
        ms(started.elapsed())
    );
    if let Ok(v) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", v);
    }
    Ok(response)
}

/// The answer's body, JSON or (when the client prefers it) a FHIR R4 Bundle, with
/// `Vary: Accept`; the audit lines are written first (see [`crate::audit`]).
async fn render(
    state: &AppState,
    response: &ClassifyResponse,
    fhir: bool,
) -> Result<Response, ApiError> {
    let internal =
        |e: serde_json::Error| ApiError::Internal(format!("cannot encode the answer: {e}"));
    let json = serde_json::to_vec(response).map_err(internal)?;
    let vary = (header::VARY, HeaderValue::from_static("accept"));
    let json_type = (
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if state.audit.is_none() && !fhir {
        return Ok(([json_type, vary], json).into_response());
    }
    // Read back from the text, so the audit log and FHIR carry the very numbers the JSON shows.
    let value: serde_json::Value = serde_json::from_slice(&json).map_err(internal)?;
    let now = std::time::SystemTime::now();
    if let Some(audit) = &state.audit {
        audit.record(&crate::audit::records(&value, now)).await;
    }
    if !fhir {
        return Ok(([json_type, vary], json).into_response());
    }
    let bundle = super::fhir::bundle(&value, &state.card, now, uuid::Uuid::new_v4());
    let body = serde_json::to_vec(&bundle).map_err(internal)?;
    let fhir_type = (
        header::CONTENT_TYPE,
        HeaderValue::from_static(super::fhir::CONTENT_TYPE),
    );
    Ok(([fhir_type, vary], body).into_response())
}

/// The label inside the indeterminate band.
pub const INDETERMINATE: &str = "indeterminate";

/// `explain=true|false|1|0` is the only query parameter.
fn parse_explain(query: Option<&str>) -> Result<bool, ApiError> {
    let mut explain = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (key, value) {
            ("explain", "true" | "1") => explain = true,
            ("explain", "false" | "0") => explain = false,
            ("explain", other) => {
                return Err(ApiError::BadRequest(format!(
                    "explain={other:?}: use explain=true or explain=false"
                )))
            }
            (other, _) => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}: the only one is explain"
                )))
            }
        }
    }
    Ok(explain)
}

/// Counts an accepted classify request until it is answered (or its client leaves).
struct ActiveGuard<'a>(&'a AppState);

impl<'a> ActiveGuard<'a> {
    fn enter(state: &'a AppState) -> Self {
        state
            .active_classify
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0
            .active_classify
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A hint for clients refused with 429: roughly how long the queue takes to drain.
fn retry_after_secs(state: &AppState) -> u64 {
    let batches = state
        .queue
        .depth()
        .div_ceil(state.runtime.max_batch_size.max(1)) as f64;
    let per_batch = {
        let h = &state.metrics.inference_duration;
        let n = h.get_sample_count();
        if n == 0 {
            1.0
        } else {
            h.get_sample_sum() / n as f64
        }
    };
    (batches * per_batch).ceil().clamp(1.0, 60.0) as u64
}

/// Reads the body within the size limit and splits it into uploads.
async fn read_uploads(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<Upload>, Identifiers), ApiError> {
    let mut ids = Identifiers::from_headers(headers)?;
    let limit = state.limits.max_body_bytes;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let multipart = essence == "multipart/form-data";
    if !multipart && ImageFormat::from_content_type(&essence).is_none() {
        return Err(ApiError::UnsupportedMediaType(content_type));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let body_timeout = state.limits.body_read_timeout;
    let collected = tokio::time::timeout(
        body_timeout,
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await
    .map_err(|_| ApiError::BodyTimeout {
        timeout_ms: body_timeout.as_millis() as u64,
    })?;
    let bytes = collected
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::BodyTooLarge { limit }
            } else {
                ApiError::BadRequest(format!("cannot read the body: {e}"))
            }
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Err(ApiError::EmptyBody);
    }
    let uploads = split_body(&content_type, bytes, &mut ids, state.limits.max_images).await?;
    Ok((uploads, ids))
}

/// Splits a whole request body into its images: a raw image body is one upload; a multipart
/// form gives one upload per `image` part (at most `max_images`, else 413), sets the identifier
/// fields in `ids`, and ignores other fields. No I/O (async only because `multer` is): the fuzz
/// target `fuzz/fuzz_targets/classify_body.rs` drives it directly.
pub async fn split_body(
    content_type: &str,
    bytes: Bytes,
    ids: &mut Identifiers,
    max_images: usize,
) -> Result<Vec<Upload>, ApiError> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        let upload = Upload {
            bytes,
            filename: None,
        };
        return Ok(vec![upload]);
    }
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::BadRequest(format!("multipart boundary: {e}")))?;
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut uploads = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::BadRequest(format!("malformed multipart body: {e}")))?
    {
        if let Some(name) = field.name().filter(|n| Identifiers::is_field(n)) {
            let name = name.to_string();
            let value = field
                .text()
                .await
                .map_err(|e| ApiError::BadRequest(format!("malformed multipart body: {e}")))?;
            ids.set(&name, &value)?;
            continue;
        }
        if field.name() != Some("image") {
            continue;
        }
        if uploads.len() == max_images {
            return Err(ApiError::TooManyImages {
                count: uploads.len() + 1,
                limit: max_images,
            });
        }
        let filename = field.file_name().map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::BadRequest(format!("malformed multipart body: {e}")))?;
        uploads.push(Upload { bytes, filename });
    }
    if uploads.is_empty() {
        return Err(ApiError::MissingImage);
    }
    Ok(uploads)
}

/// Preprocesses every upload in parallel on the decoding threads (bounded by the decode permits).
async fn decode_all(state: &Arc<AppState>, uploads: Vec<Bytes>) -> Result<Vec<Decoded>, ApiError> {
    let many = uploads.len() > 1;
    let size = state.card.input.size;
    let max_pixels = state.limits.max_pixels;
    let tasks = uploads.into_iter().map(|bytes| {
        let state = state.clone();
        async move {
            let _permit = state
                .decode_permits
                .acquire()
                .await
                .map_err(|_| ApiError::ShuttingDown)?;
            let metrics = state.metrics.clone();
            let color_norm = state.color_norm.clone();
            state
                .decoder
                .run(move || {
                    let start = Instant::now();
                    let result = preprocess::preprocess(&bytes, size, &Limits { max_pixels }).map(
                        |mut p| {
                            color_norm.apply(&mut p.tensor, size as usize);
                            p
                        },
                    );
                    let decode_time = start.elapsed();
                    metrics
                        .preprocess_duration
                        .observe(decode_time.as_secs_f64());
                    result.map(|p| Decoded {
                        tensor: p.tensor,
                        width: p.width,
                        height: p.height,
                        format: p.format,
                        sha256: sha256_hex(&bytes),
                        decode_time,
                    })
                })
                .await
                .map_err(|e| ApiError::Internal(format!("decoder task failed: {e}")))
        }
    });
    let results = futures::future::join_all(tasks).await;
    let mut decoded = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        let prefix = if many {
            format!("image {}: ", i + 1)
        } else {
            String::new()
        };
        decoded.push(r?.map_err(|e| match e {
            PreprocessError::Empty => ApiError::EmptyBody,
            PreprocessError::NotAnImage => {
                ApiError::NotAnImage(format!("{prefix}not a PNG, JPEG, TIFF or BMP image"))
            }
            PreprocessError::TooManyPixels { .. } => {
                ApiError::TooManyPixels(format!("{prefix}{e}"))
            }
            other => ApiError::CorruptImage(format!("{prefix}{other}")),
        })?);
    }
    Ok(decoded)
}
