//! The two-person rule: a pending request is approved by an operator other than the one who
//! asked, or rejected; an approval carries out what was asked in the same transaction.

use ca_store::{ApprovalRequest, AuditEvent, RequestStatus, now_secs};
use serde_json::json;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::approval_kind::Approval;
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
    let approval = Approval::of(&req)?;
    let mut revoked = None;
    let mut external_ca = None;
    let mut rotation = None;
    // Settings changed: this replica's token validators follow at once (others within a round).
    let mut settings_changed = false;
    // Each kind's effect lives in the module that owns what it changes.
    if approve {
        match approval {
            Approval::ChangeClusterSettings(p) => {
                crate::service::cluster_settings::approve_change(state, &mut tx, op, &req, p).await?;
                settings_changed = true;
            }
            Approval::StartRotation(p) => {
                rotation = Some(crate::service::rotation::approve_start(state, &mut tx, &req, op, p).await?);
            }
            Approval::RotationStage(p) => {
                rotation = Some(crate::service::rotation::approve_stage(state, &mut tx, &req, op, p).await?);
            }
            Approval::RegisterCluster(p) => {
                settings_changed = p.istio.is_some();
                if crate::service::clusters::approve_registration(&mut tx, op, &req, p).await? {
                    external_ca = Some(req.subject.clone());
                }
            }
            Approval::ReissueEnrolment(p) => crate::service::clusters::approve_reissue(&mut tx, op, &req, p).await?,
            Approval::RevokeCertificate(p) => {
                revoked = crate::service::revocation::revoke(&mut tx, op, &req, &p, now).await?;
            }
        }
    } else if let Approval::RegisterCluster(_) = approval {
        crate::service::clusters::reject_registration(&mut tx, &req).await?;
    }
    tx.commit().await?;
    if settings_changed {
        crate::service::cluster_settings::reload_quietly(state).await;
    }
    if let Some(a) = rotation {
        crate::service::rotation::after_commit(state, a, &op.actor()).await;
    }
    if let Some(r) = revoked {
        crate::service::revocation::after_commit(state, op, r).await?;
    }
    // The approval stands even if the key is away right now; the background job retries.
    if let Some(name) = external_ca
        && let Err(e) = crate::service::external_ca::ensure_intermediate(state, &name, &op.actor()).await
    {
        tracing::warn!(cluster = %name, error = %e.detail, "external-CA intermediate not issued yet; the background job will retry");
    }
    let decided = state.store.get_request(id).await?.ok_or_else(|| ServiceError::internal("request vanished"))?;
    Ok(decided)
}
