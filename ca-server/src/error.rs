//! The one place errors become HTTP: `application/problem+json` (RFC 9457) with a stable
//! `code`. Internal causes are logged, never sent. Every 4xx is also audited by the
//! `audit_denials` middleware (one record, or a count in the anonymous summary), which reads
//! the [`Denied`] extension set here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Who was refused, when known (an authenticated operator, a cluster).
    pub actor: Option<String>,
}

/// Attached to error responses so that the denial can be audited after the fact.
#[derive(Clone, Debug)]
pub struct Denied {
    pub code: &'static str,
    pub detail: String,
    pub actor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable, machine-readable error code.
    pub code: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, code, detail: detail.into(), actor: None }
    }

    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub fn unauthenticated(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, detail)
    }
    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }
    pub fn unavailable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
    }

    /// An internal failure: the cause is logged with the request, the client sees a code.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }
}

impl From<ca_store::StoreError> for ApiError {
    fn from(e: ca_store::StoreError) -> Self {
        match e {
            ca_store::StoreError::Conflict(what) => ApiError::conflict("conflict", format!("{what} already exists")),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error").to_string();
        let body = Problem {
            kind: format!("urn:pki-mesh:problem:{}", self.code),
            title,
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_string(),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        resp.extensions_mut().insert(Denied { code: self.code, detail: self.detail, actor: self.actor });
        resp
    }
}

/// The same errors for gRPC: the status code from the HTTP class, the message from the code
/// and detail (internal causes were already replaced by a generic detail).
impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let code = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Code::PermissionDenied,
            StatusCode::CONFLICT => Code::FailedPrecondition,
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            _ => Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", e.code, e.detail))
    }
}
