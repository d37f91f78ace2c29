//! The REST API: router, middleware, extractors and one module per resource. Handlers
//! translate HTTP into calls of `crate::service` and its results back into HTTP.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};

use crate::error::ServiceError;
use crate::service::state::AppState;

pub mod audit;
pub mod body;
pub mod certificates;
pub mod clusters;
pub mod crl;
pub mod extract;
pub mod health;
mod middleware;
pub mod openapi;
pub mod operator;
pub mod requests;
pub mod rotations;
pub mod server_certificates;
pub mod trust;

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/openapi.json", get(openapi::openapi))
        .route("/v1/issuers", get(health::list_issuers))
        .route("/v1/clusters", post(clusters::register_cluster).get(clusters::list_clusters))
        .route("/v1/clusters/{name}", get(clusters::get_cluster))
        .route("/v1/clusters/{name}/intermediate", post(clusters::issue_intermediate))
        .route("/v1/clusters/{name}/enrolment", post(clusters::reissue_enrolment))
        .route("/v1/clusters/{name}/trust-bundle", get(trust::trust_bundle))
        .route("/v1/clusters/{name}/trust-bundle/configmap", get(trust::trust_bundle_configmap))
        .route("/v1/clusters/{name}/server-certificates", post(server_certificates::issue_server_certificate))
        .route("/v1/requests", get(requests::list_requests))
        .route("/v1/requests/{id}/approve", post(requests::approve_request))
        .route("/v1/requests/{id}/reject", post(requests::reject_request))
        .route("/v1/certificates", get(certificates::list_certificates))
        .route("/v1/certificates/{serial}", get(certificates::get_certificate))
        .route("/v1/certificates/{serial}/revoke", post(certificates::revoke_certificate))
        .route("/v1/crl/{issuer}", get(crl::get_crl))
        .route("/v1/audit", get(audit::list_audit))
        .route("/v1/clusters/{name}/report", post(clusters::report_installed))
        .route("/v1/rotations", post(crate::http::rotations::start).get(crate::http::rotations::list))
        .route("/v1/rotations/{id}", get(crate::http::rotations::get))
        .route("/v1/rotations/{id}/certificates", post(crate::http::rotations::upload_certificate))
        .route("/v1/rotations/{id}/advance", post(crate::http::rotations::advance))
        .route("/v1/rotations/{id}/rollback", post(crate::http::rotations::rollback))
        .fallback(|| async { ServiceError::not_found("no such endpoint") });
    with_layers(routes, state)
}

/// The middleware every route runs behind (public so that a test can put a route of its own,
/// e.g. one that panics, behind exactly the same stack).
pub fn with_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        // No request holds a connection longer than this (HSM calls are bounded well below it).
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_secs(60),
        ))
        // A panicking handler answers 500 and is still seen (and audited) by `audit_denials`.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::edge::panic_response))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::audit_denials))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::observe))
        // ... and a panic in the middleware above still gets an answer.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::edge::panic_response))
        .with_state(state)
}
