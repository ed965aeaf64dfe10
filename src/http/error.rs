//! The one error shape on the wire: `{"error": {"code": "...", "message": "..."}}`, with the
//! status each code maps to decided here and nowhere else.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every error the HTTP API can answer with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is empty: send an image")]
    EmptyBody,
    #[error("no `image` part in the multipart form: send the file as `-F image=@file`")]
    MissingImage,
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidIdentifier(String),
    #[error("{0}")]
    NotAnImage(String),
    #[error("{0}")]
    CorruptImage(String),
    #[error("unsupported content type {0:?}: use multipart/form-data or image/png, image/jpeg, image/tiff, image/bmp")]
    UnsupportedMediaType(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("{0}")]
    TooManyPixels(String),
    #[error("too many images in one request: {count}, limit {limit}")]
    TooManyImages { count: usize, limit: usize },
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("the server is overloaded ({0}); retry after {1} s")]
    QueueFull(String, u64),
    #[error("the request deadline passed before the model ran")]
    DeadlineExceeded,
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the model is not ready yet")]
    NotReady,
    #[error("internal error: {0}")]
    Internal(String),
}

/// Every (code, status) pair, for documentation checks and tests.
pub const ERROR_CODES: &[(&str, u16)] = &[
    ("empty_body", 400),
    ("missing_image", 400),
    ("bad_request", 400),
    ("invalid_identifier", 400),
    ("not_an_image", 422),
    ("corrupt_image", 422),
    ("unsupported_media_type", 415),
    ("body_too_large", 413),
    ("body_timeout", 408),
    ("too_many_pixels", 413),
    ("too_many_images", 413),
    ("not_found", 404),
    ("method_not_allowed", 405),
    ("unauthorized", 401),
    ("queue_full", 429),
    ("deadline_exceeded", 504),
    ("inference_failed", 500),
    ("shutting_down", 503),
    ("not_ready", 503),
    ("internal", 500),
];

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyBody => "empty_body",
            Self::MissingImage => "missing_image",
            Self::BadRequest(_) => "bad_request",
            Self::InvalidIdentifier(_) => "invalid_identifier",
            Self::NotAnImage(_) => "not_an_image",
            Self::CorruptImage(_) => "corrupt_image",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::TooManyPixels(_) => "too_many_pixels",
            Self::TooManyImages { .. } => "too_many_images",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Unauthorized(_) => "unauthorized",
            Self::QueueFull(..) => "queue_full",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Inference(_) => "inference_failed",
            Self::ShuttingDown => "shutting_down",
            Self::NotReady => "not_ready",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status for this error (from [`ERROR_CODES`]).
    pub fn status(&self) -> StatusCode {
        let code = self.code();
        ERROR_CODES
            .iter()
            .find(|(c, _)| *c == code)
            .and_then(|(_, s)| StatusCode::from_u16(*s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && !matches!(self, Self::ShuttingDown | Self::NotReady) {
            tracing::error!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        let body = Body {
            error: Inner {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        response
            .extensions_mut()
            .insert(super::ErrorCode(self.code()));
        if let Self::Unauthorized(_) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::QueueFull(_, retry_after) = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
    }
}
