//! Revocation under the two-person rule: the request, the revocation when a second operator
//! approves it (with the key blocked for compromise reasons), and what follows the commit (a
//! successor for an external-CA intermediate, the CRL).

use ca_core::crl::Reason;
use ca_store::{ApprovalRequest, AuditEvent, Tx, now_secs};
use serde_json::json;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::approval_kind::{Approval, RevokeCertificate};
use crate::service::certificates::normalise_serial;
use crate::service::crl::publish_crl;
use crate::service::state::AppState;

/// Asks to revoke a certificate. Takes effect when a different operator approves.
pub async fn request(
    state: &AppState,
    op: &Operator,
    serial: &str,
    reason: &str,
) -> Result<ApprovalRequest, ServiceError> {
    let reason: Reason =
        reason.parse().map_err(|e| ServiceError::new(ErrorCode::InvalidReason, format!("{e}")).by(op.actor()))?;
    let reason_name = serde_json::to_value(reason).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let serial = normalise_serial(serial);
    let cert = state
        .store
        .get_certificate(&serial)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no certificate {serial}")).by(op.actor()))?;
    if cert.revoked_at.is_some() {
        return Err(ServiceError::new(ErrorCode::AlreadyRevoked, format!("certificate {serial} is already revoked"))
            .by(op.actor()));
    }
    if !cert.issuer.environment().is_some_and(|e| state.issuers.contains_key(e)) {
        return Err(ServiceError::new(ErrorCode::NoCrl,
            format!(
                "certificate {serial} was issued by {}, which publishes no CRL: let it expire (keep server certificates short) or rotate that intermediate",
                cert.issuer
            ),
        )
        .by(op.actor()));
    }
    let now = now_secs();
    let approval = Approval::RevokeCertificate(RevokeCertificate {
        serial: serial.clone(),
        reason: reason_name.clone(),
        cluster: cert.cluster,
        issuer: cert.issuer,
    });
    let request = approval.request(&uuid::Uuid::new_v4().to_string(), &serial, &op.name, now);
    let mut tx = state.store.write().await?;
    tx.insert_request(&request).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "certificate.revoke.requested",
        &serial,
        json!({"request_id": request.id, "reason": reason_name}),
    ))
    .await?;
    tx.commit().await?;
    Ok(request)
}

/// A revocation written in an approval's transaction, for what follows its commit.
pub struct Revoked {
    /// The issuer whose CRL now changes.
    issuer: String,
    /// The cluster whose intermediate it was, if it was one.
    cluster: Option<String>,
    /// The key was blocked (revoked for compromise).
    key_blocked: bool,
}

/// Revokes the approved request's certificate in `tx`; `None` when it was already revoked.
pub async fn revoke(
    tx: &mut Tx,
    op: &Operator,
    req: &ApprovalRequest,
    payload: &RevokeCertificate,
    now: i64,
) -> Result<Option<Revoked>, ServiceError> {
    let reason = payload.reason.clone();
    let serial = req.subject.clone();
    let cert = tx
        .get_certificate(&serial)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no certificate {serial}")))?;
    if !tx.revoke_certificate(&serial, &reason, now).await? {
        return Ok(None);
    }
    let mut details = json!({"reason": reason, "issuer": cert.issuer, "cluster": cert.cluster});
    let mut key_blocked = false;
    // A compromised key is never certified again: blocked with the revocation, in its
    // transaction and under its audit record.
    if ca_store::BLOCKING_REASONS.contains(&reason.as_str()) {
        let info = ca_core::cert::parse_certs(cert.pem.as_bytes(), "stored certificate")
            .map_err(ServiceError::internal)?
            .into_iter()
            .next()
            .ok_or_else(|| ServiceError::internal(format!("certificate {serial} has no PEM")))?;
        let hash = ca_store::spki_sha256(&info.spki_der);
        tx.block_key(&ca_store::BlockedKey {
            spki_sha256: hash.clone(),
            reason: reason.clone(),
            source_serial: serial.clone(),
            blocked_by: op.actor(),
            blocked_at: now,
        })
        .await?;
        details["blocked_key"] = json!(hash);
        key_blocked = true;
    }
    tx.audit(AuditEvent::new(op.actor(), "certificate.revoked", &serial, details)).await?;
    // Only a cluster's intermediate has a successor; an agent's certificate is simply gone
    // (its agent enrols again with a new token).
    let cluster = cert.cluster.clone().filter(|_| cert.profile == "cluster");
    Ok(Some(Revoked { issuer: cert.issuer.to_string(), cluster, key_blocked }))
}

/// After the revocation committed. It stands even if the HSM is away right now: the CRL
/// follows here, or from the background job, which treats a CRL older than the last revocation
/// as due.
pub async fn after_commit(state: &AppState, op: &Operator, revoked: Revoked) -> Result<(), ServiceError> {
    // A revoked external-CA intermediate stops signing on this replica now, and gets a
    // successor (other replicas drop theirs at their next maintenance round), unless its
    // key was compromised: then the cluster waits for a cluster rotation to a new key.
    if let Some(cluster) = revoked.cluster.as_deref() {
        state.istio.forget(cluster);
        if revoked.key_blocked {
            tracing::warn!(%cluster, "key revoked for compromise: no successor until a cluster rotation brings a new key");
        } else if let Err(e) = crate::service::external_ca::ensure_intermediate(state, cluster, &op.actor()).await {
            tracing::warn!(%cluster, error = %e.detail, "successor intermediate not issued yet; the background job will retry");
        }
    }
    let issuer = state.issuer(&revoked.issuer)?.clone();
    if let Err(e) = publish_crl(state, &issuer, &op.actor()).await {
        tracing::warn!(issuer = %revoked.issuer, error = %e.detail, "CRL not regenerated yet; the background job will retry");
    }
    Ok(())
}
