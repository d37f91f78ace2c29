//! The operator extractor: the bearer token verified by `crate::auth::Auth`, the actor made
//! known to the middleware, and the second factor required of every state change.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::state::AppState;

pub fn bearer(parts: &Parts) -> Option<&str> {
    parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| {
            ServiceError::new(ErrorCode::Unauthenticated, "send an operator token as Authorization: Bearer <JWT>")
        })?;
        let op = state.auth.verify(token.trim()).await?;
        if let Some(a) = parts.extensions.get::<crate::edge::Authenticated>() {
            a.set(op.actor());
        }
        // Every operator call that is not a read changes state or decides a request: all of
        // them, not a list of handlers, so that a new endpoint cannot forget the check.
        if !parts.method.is_safe() && !op.second_factor {
            return Err(ServiceError::new(
                ErrorCode::MfaRequired,
                "this call needs a token that proves a second factor (see auth.require_mfa); sign in again with one",
            )
            .by(op.actor()));
        }
        Ok(op)
    }
}
