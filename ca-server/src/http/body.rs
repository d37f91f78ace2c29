//! The REST layer's extractors of request bodies.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};

use crate::error::{ErrorCode, ServiceError};
use crate::service::state::AppState;

/// A JSON body, read up to the configured limit. Every refusal is a problem document (and so
/// audited): a `Content-Type` other than `application/json` is 415, a body over the limit 413,
/// a body whose framing breaks off or is malformed 400 `malformed-body`, and JSON that does not
/// fit the request type 400 `malformed-json`.
pub struct Body<T>(pub T);
/// `application/json`, with any parameters (`; charset=utf-8`); media types are
/// case-insensitive.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}
impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ServiceError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_json(req, state.config.policy.max_body_bytes).await.map(Body)
    }
}

/// As [`Body`], up to `limit` bytes: for the few endpoints whose callers are authenticated
/// before the body is read and whose documents may be larger.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(req: Request, limit: usize) -> Result<T, ServiceError> {
    if !is_json(req.headers()) {
        return Err(ServiceError::new(
            ErrorCode::UnsupportedMediaType,
            "request bodies are JSON: send Content-Type: application/json",
        ));
    }
    let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        // Only the limit is the client sending too much; anything else is a body that could
        // not be read as sent (bad chunked framing, a connection cut short).
        if e.into_inner().downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            ServiceError::new(ErrorCode::PayloadTooLarge, format!("request bodies are limited to {limit} bytes"))
        } else {
            ServiceError::new(ErrorCode::MalformedBody, "the request body could not be read as framed")
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ServiceError::new(ErrorCode::MalformedJson, format!("request body: {e}")))
}
