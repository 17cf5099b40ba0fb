//! API errors: one enum, each variant a status code and a stable machine code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Everything the API can refuse with. The `code` strings are part of the API
/// contract (documented in `docs/openapi.yaml`); messages are for humans.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0}")]
    InvalidLimit(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("an Authorization: Bearer <token> header is required")]
    Unauthorized,
    #[error("no such alias, or the token does not match")]
    NotFound,
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The detail is logged, not sent: it may name internal conditions.
    #[error("the cluster cannot take this request right now; retry later")]
    Unavailable(String),
    #[error("the node is overloaded")]
    Overloaded,
    #[error("{0}")]
    InvalidIdempotencyKey(String),
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// The alias of a replayed key cannot be shown with its token (the
    /// cluster secret changed since it was created).
    #[error("the alias created with this Idempotency-Key cannot be shown again")]
    IdempotencyConflict,
    /// The target already has this many live aliases (`[limits]
    /// max_aliases_per_target`).
    #[error("the target address already has {0} live aliases, the most this service allows; revoke one or wait until one expires")]
    TargetFull(u32),
    /// Refused by a rate limit; retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest(_)
            | ApiError::InvalidTarget(_)
            | ApiError::InvalidLimit(_)
            | ApiError::LimitExceeded(_)
            | ApiError::InvalidIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::IdempotencyConflict | ApiError::TargetFull(_) => StatusCode::CONFLICT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code in the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidTarget(_) => "invalid_target",
            ApiError::InvalidLimit(_) => "invalid_limit",
            ApiError::LimitExceeded(_) => "limit_exceeded",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound => "not_found",
            ApiError::NoRoute => "no_route",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Overloaded => "overloaded",
            ApiError::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyConflict => "idempotency_conflict",
            ApiError::TargetFull(_) => "target_limit_reached",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Internal => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Unavailable(detail) = &self {
            tracing::warn!(%detail, "answering 503");
        }
        let body = json!({ "error": self.code(), "message": self.to_string() });
        let mut resp = (status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        match self {
            ApiError::Unavailable(_) | ApiError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        resp
    }
}
