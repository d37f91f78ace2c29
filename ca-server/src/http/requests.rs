//! The two-person rule: pending requests, approved or rejected by a second operator.

use axum::Router;
use axum::routing::{get, post};
use utoipa::OpenApi;

use axum::Json;
use axum::extract::State;
use ca_store::ApprovalRequest;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Operator, Role};
use crate::error::{Problem, ServiceError};
use crate::http::extract::{Path, Query};
use crate::service::state::AppState;

/// A two-person-rule request's state.
// Documents `ca_store::RequestStatus` (the store does not depend on utoipa); never built.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
pub(crate) enum RequestStatus {
    Pending,
    Approved,
    Rejected,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct RequestView {
    id: String,
    kind: String,
    subject: String,
    payload: serde_json::Value,
    requested_by: String,
    requested_at: i64,
    #[schema(value_type = RequestStatus)]
    status: ca_store::RequestStatus,
    decided_by: Option<String>,
    decided_at: Option<i64>,
}

impl From<ApprovalRequest> for RequestView {
    fn from(r: ApprovalRequest) -> Self {
        RequestView {
            id: r.id,
            kind: r.kind,
            subject: r.subject,
            payload: {
                let mut p: serde_json::Value = serde_json::from_str(&r.payload).unwrap_or(serde_json::Value::Null);
                // Only a hash, but nobody needs it.
                if let Some(o) = p.as_object_mut() {
                    o.remove("token_hash");
                }
                p
            },
            requested_by: r.requested_by,
            requested_at: r.requested_at,
            status: r.status,
            decided_by: r.decided_by,
            decided_at: r.decided_at,
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RequestQuery {
    #[param(value_type = Option<RequestStatus>)]
    status: Option<ca_store::RequestStatus>,
}

#[utoipa::path(tag = "requests", get, path = "/v1/requests", params(RequestQuery), responses((status = 200, body = [RequestView])), security(("bearer" = ["operator", "admin", "auditor"])))]
pub(crate) async fn list_requests(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<RequestQuery>,
) -> Result<Json<Vec<RequestView>>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing requests")?;
    let requests = crate::service::approvals::list(&state, q.status).await?;
    Ok(Json(requests.into_iter().map(Into::into).collect()))
}

/// Approves a pending request. The approver must not be the requester.
#[utoipa::path(tag = "requests", post, path = "/v1/requests/{id}/approve", params(("id" = String, Path, description = "The request's id")),
    responses((status = 200, body = RequestView),
        (status = 403, body = Problem, description = "two-person-rule: the requester cannot approve; forbidden: no operator or admin role"),
        (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub(crate) async fn approve_request(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ServiceError> {
    decide(state, op, id, true).await
}

#[utoipa::path(tag = "requests", post, path = "/v1/requests/{id}/reject", params(("id" = String, Path, description = "The request's id")),
    responses((status = 200, body = RequestView), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = ["operator", "admin"])))]
pub(crate) async fn reject_request(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ServiceError> {
    decide(state, op, id, false).await
}

async fn decide(state: AppState, op: Operator, id: String, approve: bool) -> Result<Json<RequestView>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "deciding requests")?;
    Ok(Json(crate::service::approvals::decide(&state, &op, &id, approve).await?.into()))
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/requests", get(list_requests))
        .route("/v1/requests/{id}/approve", post(approve_request))
        .route("/v1/requests/{id}/reject", post(reject_request))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(list_requests, approve_request, reject_request), components(schemas(RequestView, RequestStatus)))]
pub(crate) struct Doc;
