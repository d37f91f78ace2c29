//! The audit trail, for auditors and admins.

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Operator, Role};
use crate::error::ServiceError;
use crate::http::extract::Query;
use crate::service::state::AppState;

#[derive(Serialize, ToSchema)]
pub(crate) struct AuditView {
    seq: i64,
    /// Unix milliseconds.
    time: i64,
    actor: String,
    action: String,
    subject: String,
    details: serde_json::Value,
    prev_hash: String,
    hash: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Return records with a sequence number above this.
    after: Option<i64>,
    /// At most 1000; default 100.
    limit: Option<i64>,
}

#[utoipa::path(tag = "audit", get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = [AuditView])), security(("bearer" = ["auditor", "admin"])))]
pub(crate) async fn list_audit(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditView>>, ServiceError> {
    op.require(&[Role::Auditor, Role::Admin], "reading the audit trail")?;
    let records = crate::service::audit::list(&state, q.after, q.limit).await?;
    Ok(Json(
        records
            .into_iter()
            .map(|r| AuditView {
                seq: r.seq,
                time: r.time,
                actor: r.actor,
                action: r.action,
                subject: r.subject,
                details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
            .collect(),
    ))
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list_audit))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(list_audit), components(schemas(AuditView)))]
pub(crate) struct Doc;
