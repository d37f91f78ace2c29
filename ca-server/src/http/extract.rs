//! axum's `Path` and `Query` with problem-document rejections. axum answers an undecodable
//! path parameter (`/v1/crl/%ff`) or query string with a plain-text 400 that the middleware
//! could only guess a code for; these say which part of the request was wrong.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::{ErrorCode, ServiceError};

/// A path parameter; an undecodable one is refused as `invalid-path`.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ServiceError::new(ErrorCode::InvalidPath, e.body_text())),
        }
    }
}

/// A query string; one that does not fit the documented parameters is refused as
/// `invalid-query`.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ServiceError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(ServiceError::new(ErrorCode::InvalidQuery, e.body_text())),
        }
    }
}

/// How a cluster-side caller authenticated an enrolment or a renewal: the one-time token as
/// `Authorization: Bearer`, else the TLS client certificate. The token wins over a client
/// certificate sent alongside it.
pub fn enrolment_credential<'a>(
    headers: &'a axum::http::HeaderMap,
    conn: Option<&'a crate::tls::ConnInfo>,
) -> crate::service::intermediates::Credential<'a> {
    use crate::service::intermediates::Credential;
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (bearer, conn.and_then(|c| c.peer_cert.as_deref())) {
        (Some(token), _) => Credential::Token(token),
        (None, Some(der)) => Credential::Certificate(der),
        (None, None) => Credential::None,
    }
}
