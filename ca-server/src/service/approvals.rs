//! The two-person rule: a pending request is approved by an operator other than the one who
//! asked, or rejected; an approval carries out what was asked in the same transaction.

use ca_store::{ApprovalRequest, AuditEvent, ClusterMode, ClusterStatus, RequestStatus, now_secs};
use serde_json::json;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::state::AppState;

pub async fn list(state: &AppState, status: Option<RequestStatus>) -> Result<Vec<ApprovalRequest>, ServiceError> {
    Ok(state.store.list_requests(status).await?)
}

/// Approves (`approve`) or rejects a pending request, and returns it as decided.
pub async fn decide(state: &AppState, op: &Operator, id: &str, approve: bool) -> Result<ApprovalRequest, ServiceError> {
    // Rotation approvals judge against this replica's issuers: bring them up to date before
    // the write transaction, which must not wait on opening a key.
    crate::service::rotation::refresh_quietly(state).await;
    let mut tx = state.store.write().await?;
    let req = tx
        .get_request(id)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no request {id:?}")).by(op.actor()))?;
    if req.status != RequestStatus::Pending {
        return Err(ServiceError::new(ErrorCode::AlreadyDecided, format!("request {id} is already {}", req.status))
            .by(op.actor()));
    }
    if approve && req.requested_by == op.name {
        return Err(ServiceError::new(ErrorCode::TwoPersonRule, "a different operator must approve this request")
            .by(op.actor()));
    }
    let now = now_secs();
    let status = if approve { RequestStatus::Approved } else { RequestStatus::Rejected };
    if !tx.decide_request(id, status, &op.name, now).await? {
        return Err(ServiceError::new(ErrorCode::AlreadyDecided, format!("request {id} was decided concurrently"))
            .by(op.actor()));
    }
    tx.audit(AuditEvent::new(
        op.actor(),
        format!("request.{status}"),
        id,
        json!({"kind": req.kind, "subject": req.subject, "requested_by": req.requested_by}),
    ))
    .await?;
    let payload: serde_json::Value = serde_json::from_str(&req.payload).map_err(ServiceError::internal)?;
    let mut revoked = None;
    let mut external_ca = None;
    let mut rotation = None;
    match (req.kind.as_str(), approve) {
        ("start-rotation", true) => {
            rotation = Some(crate::service::rotation::approve_start(state, &mut tx, &req, op).await?);
        }
        ("rotation-stage", true) => {
            rotation = Some(crate::service::rotation::approve_stage(state, &mut tx, &req, op).await?);
        }
        ("register-cluster", true) => {
            tx.set_cluster_status(&req.subject, ClusterStatus::Active).await?;
            if payload["mode"].as_str() == Some(ClusterMode::ExternalCa.as_str()) {
                external_ca = Some(req.subject.clone());
            }
            tx.audit(AuditEvent::new(op.actor(), "cluster.registered", &req.subject, payload)).await?;
        }
        ("register-cluster", false) => {
            tx.set_cluster_status(&req.subject, ClusterStatus::Rejected).await?;
        }
        ("reissue-enrolment", true) => {
            let (Some(hash), Some(expires)) = (payload["token_hash"].as_str(), payload["expires_at"].as_i64()) else {
                return Err(ServiceError::internal("reissue request without a token"));
            };
            if !tx.rearm_enrolment(&req.subject, hash, expires).await? {
                return Err(ServiceError::new(
                    ErrorCode::ClusterNotActive,
                    format!("cluster {} is not active", req.subject),
                )
                .by(op.actor()));
            }
            tx.audit(AuditEvent::new(
                op.actor(),
                "cluster.enrolment.reissued",
                &req.subject,
                json!({"expires_at": expires}),
            ))
            .await?;
        }
        ("revoke-certificate", true) => {
            revoked = crate::service::revocation::revoke(&mut tx, op, &req, &payload, now).await?;
        }
        _ => {}
    }
    tx.commit().await?;
    if let Some(a) = rotation {
        crate::service::rotation::after_commit(state, a, &op.actor()).await;
    }
    if let Some(r) = revoked {
        crate::service::revocation::after_commit(state, op, r).await?;
    }
    // The approval stands even if the key is away right now; the background job retries.
    if let Some(name) = external_ca {
        if let Err(e) = crate::service::external_ca::ensure_intermediate(state, &name, &op.actor()).await {
            tracing::warn!(cluster = %name, error = %e.detail, "external-CA intermediate not issued yet; the background job will retry");
        }
    }
    let decided = state.store.get_request(id).await?.ok_or_else(|| ServiceError::internal("request vanished"))?;
    Ok(decided)
}
