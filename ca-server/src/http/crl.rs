//! CRLs, public: DER or PEM, for the current key or an earlier one.

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::error::{Problem, ServiceError};
use crate::http::extract::{Path, Query};
use crate::service::state::AppState;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CrlQuery {
    /// `pem` for PEM instead of DER (the default, unless `Accept` asks for
    /// `application/x-pem-file`).
    format: Option<CrlFormat>,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo of the key that issued the certificate being
    /// checked: the CRL that key signs (an environment's earlier key, after a rotation, until
    /// the last certificate it issued has expired). Default: the current key.
    #[param(pattern = "^[0-9a-fA-F]{64}$")]
    key: Option<String>,
}

/// How a CRL is sent: `der` (`application/pkix-crl`) or `pem` (`application/x-pem-file`).
#[derive(Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CrlFormat {
    Der,
    Pem,
}

/// The issuer's current CRL: DER (`application/pkix-crl`), or PEM with `?format=pem` or
/// `Accept: application/x-pem-file`.
#[utoipa::path(tag = "crl", get, path = "/v1/crl/{issuer}", params(("issuer" = String, Path, description = "The environment (issuer) name"), CrlQuery),
    responses((status = 200, description = "The CRL: DER, or PEM when asked for", content(
        (String = "application/pkix-crl"), (String = "application/x-pem-file"))), (status = 404, body = Problem), (status = 503, body = Problem)))]
pub(crate) async fn get_crl(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<CrlQuery>,
    headers: HeaderMap,
) -> Result<Response, ServiceError> {
    let der = crate::service::crl::current_crl(&state, &name, q.key.as_deref()).await?;
    let wants_pem = q.format == Some(CrlFormat::Pem)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/x-pem-file"));
    if wants_pem {
        Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], ca_core::cert::to_pem("X509 CRL", &der))
            .into_response())
    } else {
        Ok(([(header::CONTENT_TYPE, "application/pkix-crl")], Bytes::from(der)).into_response())
    }
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/crl/{issuer}", get(get_crl))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(get_crl), components(schemas(CrlFormat)))]
pub(crate) struct Doc;
