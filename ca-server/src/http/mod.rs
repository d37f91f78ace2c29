//! The REST API: router, middleware, extractors and one module per resource. Handlers
//! translate HTTP into calls of `crate::service` and its results back into HTTP. A resource
//! module holds its endpoints whole: handlers, views, `routes()` and its OpenAPI `Doc`; an
//! endpoint is added in that one file. A new resource module is listed here and in `openapi.rs`.

use axum::Router;
use axum::http::StatusCode;

use crate::error::ServiceError;
use crate::service::state::AppState;

pub mod audit;
pub mod body;
pub mod certificates;
pub mod cluster_settings;
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

/// Every resource module's routes: each module declares its own (`routes()`), and its
/// operations for the OpenAPI document (`Doc`, merged in `openapi.rs`).
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .merge(health::routes())
        .merge(openapi::routes())
        .merge(clusters::routes())
        .merge(cluster_settings::routes())
        .merge(trust::routes())
        .merge(server_certificates::routes())
        .merge(requests::routes())
        .merge(certificates::routes())
        .merge(crl::routes())
        .merge(audit::routes())
        .merge(rotations::routes())
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
