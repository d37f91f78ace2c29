//! Probes and the issuers this server serves.

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ca_core::cert::CertInfo;
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::state::AppState;

#[utoipa::path(tag = "health", get, path = "/healthz", responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Ready {
    ready: bool,
    database: bool,
    /// Whether each issuer's key answered its last probe.
    issuers: std::collections::BTreeMap<String, bool>,
}

#[utoipa::path(tag = "health", get, path = "/readyz", responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let r = crate::service::health::readiness(&state).await;
    let ready = r.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Ready { ready, database: r.database, issuers: r.issuers })).into_response()
}

#[derive(Serialize, ToSchema)]
pub(crate) struct IssuerView {
    name: String,
    subject: String,
    not_after: String,
    trust_domains: Vec<String>,
    healthy: bool,
    /// The issuer certificate followed by its chain to the root, PEM.
    chain: Vec<String>,
}

#[utoipa::path(tag = "health", get, path = "/v1/issuers", responses((status = 200, body = [IssuerView])))]
pub(crate) async fn list_issuers(State(state): State<AppState>) -> Json<Vec<IssuerView>> {
    Json(
        state
            .issuers
            .all()
            .iter()
            .map(|i| IssuerView {
                name: i.name.clone(),
                subject: i.cert.subject.clone(),
                not_after: ca_core::error::fmt_time(i.cert.not_after),
                trust_domains: i.trust_domains(),
                healthy: i.is_healthy(),
                chain: std::iter::once(&i.cert).chain(&i.chain).map(CertInfo::pem).collect(),
            })
            .collect(),
    )
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/v1/issuers", get(list_issuers))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(healthz, readyz, list_issuers), components(schemas(IssuerView, Ready)))]
pub(crate) struct Doc;
