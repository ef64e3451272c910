//! The application's one error type and its RFC 9457 problem+json rendering.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub type Result<T, E = AppError> = std::result::Result<T, E>;

/// One invalid input field. `index` is set for items of a batch.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            index: None,
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("authentication failed: {0}")]
    Unauthorized(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A decrypting read by a privacy officer without `X-Access-Reason`:
    /// a 400, audited as a denied request like a 401 or 403.
    #[error("access reason required: {0}")]
    ReasonRequired(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("gone: {0}")]
    Gone(String),
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    /// Stored ciphertext failed authentication: tampering or corruption.
    /// The detail is logged, never sent.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl AppError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) | Self::ReasonRequired(_) => StatusCode::BAD_REQUEST,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Gone(_) => StatusCode::GONE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Integrity(_) | Self::Database(_) | Self::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn problem_type(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::BadRequest(_) => "bad-request",
            Self::ReasonRequired(_) => "access-reason-required",
            Self::Validation(_) => "validation",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::Gone(_) => "gone",
            Self::Unavailable(_) => "unavailable",
            Self::Integrity(_) => "integrity",
            Self::Database(_) | Self::Internal(_) => "internal",
        }
    }
}

/// Maps database constraint violations to client errors in one place.
pub trait ResultExt<T> {
    /// If the error violates `constraint`, map it with `f`. PostgreSQL names
    /// the constraint; SQLite only names the columns, so `constraint` is
    /// `"name|table.column"` and either part matching counts.
    fn on_constraint(self, constraint: &str, f: impl FnOnce() -> AppError) -> Result<T>;
}

impl<T, E: Into<AppError>> ResultExt<T> for std::result::Result<T, E> {
    fn on_constraint(self, constraint: &str, f: impl FnOnce() -> AppError) -> Result<T> {
        self.map_err(|e| match e.into() {
            AppError::Database(sqlx::Error::Database(db)) if violates(&*db, constraint) => f(),
            other => other,
        })
    }
}

fn violates(err: &dyn sqlx::error::DatabaseError, constraint: &str) -> bool {
    let (name, columns) = constraint
        .split_once('|')
        .unwrap_or((constraint, constraint));
    err.constraint() == Some(name)
        || ((err.is_unique_violation() || err.is_foreign_key_violation())
            && err.message().contains(columns))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The detail of an error response, for layers that audit it.
#[derive(Clone, Debug)]
pub struct ProblemDetail(pub String);

/// Marks a refusal other than a 401 or 403 that is audited as a denied
/// request ([`AppError::ReasonRequired`]).
#[derive(Clone, Copy, Debug)]
pub struct Denied;

pub fn problem_response(
    status: StatusCode,
    kind: &str,
    detail: Option<String>,
    errors: Vec<FieldError>,
) -> Response {
    let body = Problem {
        kind: format!("https://transfer-ledger.dev/problems/{kind}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        detail,
        request_id: crate::telemetry::current_request_id(),
        errors,
    };
    let mut resp = (status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(d) = &body.detail {
        resp.extensions_mut().insert(ProblemDetail(d.clone()));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // What is unavailable (the database, a lock held by a batch) is
        // usually back within seconds.
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let kind = self.problem_type();
        let denied = matches!(self, Self::ReasonRequired(_));
        let (detail, errors) = match self {
            Self::Unauthorized(d)
            | Self::Forbidden(d)
            | Self::NotFound(d)
            | Self::BadRequest(d)
            | Self::ReasonRequired(d)
            | Self::Conflict(d)
            | Self::PayloadTooLarge(d)
            | Self::Gone(d)
            | Self::Unavailable(d) => (Some(d), Vec::new()),
            Self::Validation(errors) => {
                let n = errors.len();
                (
                    Some(format!(
                        "{n} invalid field{}",
                        if n == 1 { "" } else { "s" }
                    )),
                    errors,
                )
            }
            Self::Integrity(d) => {
                tracing::error!(detail = %d, "stored data failed its integrity check");
                (
                    Some("stored data failed its integrity check; it was not returned".into()),
                    Vec::new(),
                )
            }
            Self::Database(e) => {
                tracing::error!(error = %e, "database error");
                (None, Vec::new())
            }
            Self::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                (None, Vec::new())
            }
        };
        let mut resp = problem_response(status, kind, detail, errors);
        if denied {
            resp.extensions_mut().insert(Denied);
        }
        resp
    }
}
