//! Stage changes: asked for by one operator, approved by another (the gate checked again
//! inside the approving transaction), and what follows the commit; and the rotation gauges.

use ca_core::rotation::{self, RotationKind, Stage};
use ca_store::{ApprovalRequest, AuditEvent, RotationRecord, Tx, now_secs};
use serde_json::json;

use super::derive::{refresh, refresh_quietly};
use super::gate::{blocked, drain_secs, gate};
use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::approval_kind::{Approval, RotationStage, StartRotation};
use crate::service::rotation_record::{Rotation, Spec, Transition, load, pem_cert};
use crate::service::state::AppState;

/// A stage change asked for, waiting for a second operator.
pub struct StageRequest {
    pub rotation: String,
    pub request_id: String,
    pub from: Stage,
    pub to: Stage,
}

/// Asks to move a rotation to its next stage (`forward`) or one stage back (or to abort it
/// from its first stage). `want` is the stage the caller expects, refused if the rotation is
/// elsewhere. Refused with the list of blockers while the gate is closed; the move takes
/// effect when a second operator approves (`approve_stage` checks the gate again).
pub async fn request_move(
    state: &AppState,
    op: &Operator,
    id: &str,
    want: Option<&str>,
    forward: bool,
) -> Result<StageRequest, ServiceError> {
    let deny = |e: ServiceError| e.by(op.actor());
    let r = load(state, id).await.map_err(deny)?;
    let to = if forward { r.kind.next(r.stage) } else { r.kind.rollback(r.stage) };
    let to = to.ok_or_else(|| {
        deny(ServiceError::new(
            ErrorCode::RotationStage,
            format!("a {} rotation at {} cannot {}", r.kind, r.stage, if forward { "advance" } else { "roll back" }),
        ))
    })?;
    if let Some(want) = want
        && want != to.as_str()
    {
        return Err(deny(ServiceError::new(
            ErrorCode::RotationStage,
            format!(
                "the rotation is at {}; its {} is {to}, not {want}",
                r.stage,
                if forward { "next stage" } else { "rollback" }
            ),
        )));
    }
    let now = now_secs();
    refresh_quietly(state).await;
    let (blockers, _) = gate(state, &r, to, now).await?;
    if !blockers.is_empty() {
        return Err(deny(blocked(&blockers)));
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut tx = state.store.write().await?;
    let approval = Approval::RotationStage(RotationStage { from: r.stage, to });
    tx.insert_request(&approval.request(&request_id, id, &op.name, now)).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "rotation.stage.requested",
        id,
        json!({"request_id": request_id, "from": r.stage, "to": to}),
    ))
    .await?;
    tx.commit().await?;
    Ok(StageRequest { rotation: id.to_string(), request_id, from: r.stage, to })
}

/// What to do once an approved rotation change has committed.
pub struct AfterCommit {
    rotation: String,
    /// Cluster intermediates were revoked: publish this issuer's CRL.
    republish: Option<String>,
}

/// An approved `start-rotation` request: the rotation exists from now on.
pub async fn approve_start(
    state: &AppState,
    tx: &mut Tx,
    req: &ApprovalRequest,
    approver: &Operator,
    payload: StartRotation,
) -> Result<AfterCommit, ServiceError> {
    let StartRotation { kind, target, spec, .. } = payload;
    let spec: Spec = serde_json::from_value(spec).map_err(ServiceError::internal)?;
    let now = now_secs();
    let mut spec = spec;
    spec.entered.insert(Stage::Prepared.to_string(), now);
    let candidate = Rotation {
        rec: RotationRecord {
            id: req.subject.clone(),
            kind: kind.to_string(),
            target: target.clone(),
            stage: Stage::Prepared.to_string(),
            spec: serde_json::to_string(&spec).map_err(ServiceError::internal)?,
            created_by: req.requested_by.clone(),
            created_at: now,
            updated_at: now,
        },
        kind,
        stage: Stage::Prepared,
        spec,
    };
    // The plan was made when it was asked for; it must still start from what is current.
    for (env, plan) in &candidate.spec.environments {
        let issuer = state.issuer(env)?;
        if pem_cert(&plan.old_certificate)?.der != issuer.cert.der {
            return Err(ServiceError::new(
                ErrorCode::RotationStale,
                format!("environment {env} changed since this rotation was asked for; reject it and start again"),
            )
            .by(approver.actor()));
        }
    }
    let clusters = state.store.list_clusters().await?;
    if let Some(plan) = &candidate.spec.cluster {
        let now_key = clusters.iter().find(|c| c.name == target).and_then(|c| c.key_ref.clone());
        if plan.external_ca && now_key != plan.old_key {
            return Err(ServiceError::new(
                ErrorCode::RotationStale,
                format!("cluster {target}'s key changed since this rotation was asked for; reject it and start again"),
            )
            .by(approver.actor()));
        }
    }
    for other in tx.list_active_rotations().await? {
        let other = Rotation::parse(other)?;
        if candidate.overlaps(&other, &clusters) {
            return Err(ServiceError::new(
                ErrorCode::RotationInProgress,
                format!("rotation {} started meanwhile and overlaps this one", other.rec.id),
            )
            .by(approver.actor()));
        }
    }
    tx.insert_rotation(&candidate.rec).await?;
    tx.audit(AuditEvent::new(
        approver.actor(),
        "rotation.started",
        &candidate.rec.id,
        json!({"kind": kind, "target": target, "requested_by": req.requested_by}),
    ))
    .await?;
    Ok(AfterCommit { rotation: candidate.rec.id, republish: None })
}

/// An approved `rotation-stage` request: the gate is checked again, then the stage moves.
pub async fn approve_stage(
    state: &AppState,
    tx: &mut Tx,
    req: &ApprovalRequest,
    approver: &Operator,
    RotationStage { from, to }: RotationStage,
) -> Result<AfterCommit, ServiceError> {
    let deny = |e: ServiceError| e.by(approver.actor());
    let mut r = Rotation::parse(
        tx.get_rotation(&req.subject).await?.ok_or_else(|| deny(ServiceError::not_found("the rotation is gone")))?,
    )?;
    if r.stage != from {
        return Err(deny(ServiceError::new(
            ErrorCode::RotationStage,
            format!("the rotation moved to {} since this was requested; reject this request", r.stage),
        )));
    }
    let now = now_secs();
    let (blockers, evidence) = gate(state, &r, to, now).await?;
    if !blockers.is_empty() {
        return Err(deny(blocked(&blockers)));
    }
    let t = &mut r.spec;
    if rotation::trust(r.kind, from) != rotation::trust(r.kind, to) {
        t.bundle_changed_at = now;
    }
    if rotation::new_chain(from) != rotation::new_chain(to) {
        t.chain_changed_at = now;
    }
    // The drain starts when chains have just moved; coming back from retire, it already ran.
    if to == Stage::Drain && from == Stage::Reissue {
        t.drain_until = Some(now + drain_secs(state));
    }
    t.entered.insert(to.to_string(), now);
    t.history.push(Transition {
        from: from.to_string(),
        to: to.to_string(),
        at: now,
        requested_by: req.requested_by.clone(),
        approved_by: approver.name.clone(),
    });
    let mut republish = None;
    // What the gate saw, cluster by cluster: the evidence the stage moved on.
    let seen: Vec<serde_json::Value> = evidence
        .iter()
        .map(|c| {
            json!({"cluster": c.name, "state": c.state, "bundle_ok": c.bundle_ok, "chain_ok": c.chain_ok,
                        "intermediate": c.intermediate_serial, "reported_at": c.reported_at})
        })
        .collect();
    let mut details = json!({"from": from, "to": to, "kind": r.kind, "target": r.rec.target,
                             "requested_by": req.requested_by, "clusters": seen});
    if r.kind == RotationKind::Cluster {
        let plan = r.spec.cluster.clone().ok_or_else(|| ServiceError::internal("cluster rotation without a plan"))?;
        // External-CA: the server's key moves with the chain; the background round (or the
        // code after commit) issues the intermediate for it.
        if plan.external_ca && rotation::new_chain(from) != rotation::new_chain(to) {
            let key = if rotation::new_chain(to) { plan.new_key } else { plan.old_key };
            tx.set_cluster_key(&r.rec.target, key.as_deref().unwrap_or_default()).await?;
        }
        if to == Stage::Retire {
            let cluster =
                tx.get_cluster(&r.rec.target).await?.ok_or_else(|| ServiceError::internal("cluster vanished"))?;
            let mut revoked = Vec::new();
            for c in tx.live_cluster_certificates(&r.rec.target, now).await? {
                if Some(&c.serial) == cluster.current_serial.as_ref() {
                    continue;
                }
                if tx.revoke_certificate(&c.serial, "superseded", now).await? {
                    tx.audit(AuditEvent::new(
                        approver.actor(),
                        "certificate.revoked",
                        &c.serial,
                        json!({"reason": "superseded", "issuer": c.issuer, "cluster": c.cluster, "rotation": r.rec.id}),
                    ))
                    .await?;
                    republish = Some(c.issuer.to_string());
                    revoked.push(c.serial);
                }
            }
            details["revoked"] = json!(revoked);
        }
    }
    if r.kind == RotationKind::Environment && to == Stage::Retire {
        details["note"] = json!(
            "the old environment intermediate no longer renews clusters; revoke it on the root's CRL in the next CRL ceremony"
        );
    }
    let spec = serde_json::to_string(&r.spec).map_err(ServiceError::internal)?;
    if !tx.update_rotation(&r.rec.id, from.as_str(), to.as_str(), &spec, now).await? {
        return Err(deny(ServiceError::new(ErrorCode::RotationStage, "the rotation moved meanwhile")));
    }
    tx.audit(AuditEvent::new(approver.actor(), "rotation.stage", &r.rec.id, details)).await?;
    Ok(AfterCommit { rotation: r.rec.id, republish })
}

/// After an approved change: this replica takes the new issuers at once, external-CA
/// clusters get their intermediates on the new chain, CRLs follow revocations. Failures are
/// retried by the background round.
pub async fn after_commit(state: &AppState, a: AfterCommit, actor: &str) {
    if let Err(e) = refresh(state).await {
        tracing::warn!(rotation = %a.rotation, error = %e.detail, "issuers not refreshed yet; the background job will retry");
    }
    let Ok(Some(rec)) = state.store.get_rotation(&a.rotation).await else { return };
    let Ok(r) = Rotation::parse(rec) else { return };
    if let Ok(clusters) = state.store.list_clusters().await {
        for c in clusters.iter().filter(|c| c.is_external_ca() && c.is_active() && r.covers_cluster(c)) {
            state.istio.forget(&c.name);
            if let Err(e) = crate::service::external_ca::ensure_intermediate(state, &c.name, actor).await {
                tracing::warn!(cluster = %c.name, error = %e.detail, "intermediate not re-issued yet; the background job will retry");
            }
        }
    }
    if let Some(name) = a.republish
        && let Ok(issuer) = state.issuer(&name)
        && let Err(e) = crate::service::crl::publish_crl(state, &issuer, actor).await
    {
        tracing::warn!(issuer = %name, error = %e.detail, "CRL not regenerated yet; the background job will retry");
    }
}

/// Stage index used by the `ca_rotation_stage` gauge.
fn stage_index(s: Stage) -> i64 {
    match s {
        Stage::Prepared => 0,
        Stage::Distribute => 1,
        Stage::Reissue => 2,
        Stage::Drain => 3,
        Stage::Retire => 4,
        Stage::Done | Stage::Aborted => 5,
    }
}

/// Exports every active rotation's stage and lagging clusters; finished ones disappear.
pub async fn update_gauges(state: &AppState) -> Result<(), ServiceError> {
    let now = now_secs();
    let mut exported = Vec::new();
    for rec in state.store.list_rotations(true).await? {
        let r = Rotation::parse(rec)?;
        let labels = crate::metrics::RotationLabels {
            rotation: r.rec.id.clone(),
            kind: r.kind.to_string(),
            target: r.rec.target.clone(),
        };
        let lagging = match r.kind.next(r.stage) {
            Some(to) => gate(state, &r, to, now).await?.1.iter().filter(|c| c.state == "lagging").count(),
            None => 0,
        };
        state.metrics.rotation_stage.get_or_create(&labels).set(stage_index(r.stage));
        state.metrics.rotation_lagging.get_or_create(&labels).set(lagging as i64);
        exported.push(labels);
    }
    let mut last = state.metrics.rotation_exported.lock().unwrap_or_else(|p| p.into_inner());
    for gone in last.iter().filter(|l| !exported.contains(l)) {
        state.metrics.rotation_stage.remove(gone);
        state.metrics.rotation_lagging.remove(gone);
    }
    *last = exported;
    Ok(())
}
