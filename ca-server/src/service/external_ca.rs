//! External-CA mode: the cluster intermediates whose keys this server holds.
//! `ensure_intermediate` issues a cluster's intermediate when due and `maintain` is the
//! periodic upkeep; what the mode keeps in memory is `istio`, loading a cluster's CA is
//! `cluster_ca`.

use anyhow::Result;
use ca_core::validity::{CLUSTER_RENEWAL, renewal_due};
use ca_store::{AuditEvent, now_secs};
use serde_json::json;

use crate::error::{ErrorCode, ServiceError};
use crate::service::cluster_ca::key_compromised;
use crate::service::hsm_call::{HsmFailure, open_public};
use crate::service::serving_cert::ensure_serving_cert;
use crate::service::state::AppState;

/// Issues (or renews) the intermediate of an external-CA cluster for the key the server holds.
/// Due when the cluster has none, its newest is revoked, or `CLUSTER_RENEWAL` of its life has
/// passed.
pub async fn ensure_intermediate(state: &AppState, name: &str, actor: &str) -> Result<bool, ServiceError> {
    let Some(cluster) = state.store.get_cluster(name).await? else { return Ok(false) };
    if !cluster.is_external_ca() || !cluster.is_active() {
        return Ok(false);
    }
    let now = now_secs();
    // A rotation that moved the cluster's chain (or key) wants an intermediate issued since.
    let (_, reissue_after) = crate::service::rotation_record::changed_at(state, &cluster).await?;
    if let Some(serial) = &cluster.current_serial
        && let Some(c) = state.store.get_certificate(serial).await?
    {
        let due = renewal_due(c.not_before, c.not_after, CLUSTER_RENEWAL, now);
        if c.revoked_at.is_none() && !due && c.issued_at >= reissue_after {
            return Ok(false);
        }
    }
    let key_ref: hsm::KeyRef = cluster
        .key_ref
        .as_deref()
        .ok_or_else(|| ServiceError::internal(format!("cluster {name} has no key reference")))?
        .parse()
        .map_err(ServiceError::internal)?;
    let public = match open_public(state.hsm_timeout(), &key_ref).await {
        Ok(p) => p,
        Err(HsmFailure::Failed(e)) => {
            return Err(ServiceError::new(
                ErrorCode::HsmUnavailable,
                format!("opening the key of cluster {name}: {e}"),
            ));
        }
        Err(HsmFailure::TimedOut | HsmFailure::Panicked(_)) => {
            return Err(ServiceError::new(ErrorCode::HsmTimeout, format!("the key of cluster {name} did not answer")));
        }
    };
    // Not for a key revoked for compromise, whatever the revocation's own path did.
    let spki = public.spki_der().to_vec();
    if let Some(b) = state.store.blocked_key(&ca_store::spki_sha256(&spki)).await? {
        return Err(key_compromised(name, &b));
    }
    let issuer = state.issuer(&cluster.environment)?.clone();
    let request = crate::service::issuance::cluster_request(state, &issuer, &cluster, public)?;
    let issued = issuer.with_key(state.hsm_timeout(), move |ca| ca_core::issue::issue(ca, &request)).await?;
    let cert = issued.cert;
    let mut tx = state.store.write().await?;
    // Someone else (another replica, an approval) may have got there first.
    let current = tx.get_cluster(name).await?.ok_or_else(|| ServiceError::internal("cluster vanished"))?;
    if current.current_serial != cluster.current_serial || !current.is_active() {
        return Ok(false);
    }
    if let Some(b) = tx.blocked_key(&ca_store::spki_sha256(&spki)).await? {
        return Err(key_compromised(name, &b));
    }
    let record = crate::service::issuance::cert_record(
        &cert,
        ca_store::CertIssuer::Environment(issuer.name.clone()),
        Some(name),
        "cluster",
        actor,
    );
    crate::service::issuance::record_issued(
        &mut tx,
        &record,
        actor,
        json!({"issuer": issuer.name, "via": "external-ca", "renewed_from": cluster.current_serial,
               "key": key_ref.to_string()}),
    )
    .await?;
    tx.set_current(name, &cert.serial, cluster.current_serial.as_deref()).await?;
    tx.commit().await?;
    state.metrics.issued(&issuer.name, "cluster", "ok");
    state.istio.forget(name);
    tracing::info!(cluster = %name, serial = %cert.serial, "external-CA cluster intermediate issued");
    Ok(true)
}

/// Every active external-CA cluster gets its intermediate when due; cached CAs whose cluster
/// moved on (a renewal by another replica, a deactivation) are dropped and reload on use.
pub async fn maintain(state: &AppState, leader: bool) -> Result<()> {
    if state.config.istio.is_none() {
        return Ok(());
    }
    let clusters = state.store.list_clusters().await?;
    if leader {
        for c in clusters.iter().filter(|c| c.is_external_ca() && c.is_active()) {
            if let Err(e) = ensure_intermediate(state, &c.name, &state.job_actor()).await {
                // Expected until a cluster rotation; said once at revocation, not every round.
                if e.code == ErrorCode::KeyCompromised {
                    tracing::debug!(cluster = %c.name, error = %e.detail, "external-CA cluster stopped");
                    continue;
                }
                tracing::warn!(cluster = %c.name, error = %e.detail, "external-CA intermediate not issued; will retry");
            }
        }
    }
    // A cluster that got a new intermediate above was already dropped from the cache by
    // `ensure_intermediate`; at worst this list is a round old and a fresh CA reloads once.
    for ca in state.istio.loaded() {
        let current = clusters.iter().any(|c| {
            c.name == ca.issuer.name && c.is_active() && c.current_serial.as_deref() == Some(ca.serial.as_str())
        });
        let revoked = state.store.get_certificate(&ca.serial).await?.is_none_or(|c| c.revoked_at.is_some());
        // An HSM failure or timeout marks the key unhealthy; dropping it makes the next request
        // open the key afresh (a new login) instead of refusing until the process restarts.
        if !current || revoked || !ca.issuer.is_healthy() {
            state.istio.forget(&ca.issuer.name);
        }
    }
    state.istio.refresh_keys().await;
    if leader {
        let retention = state.config.istio.as_ref().map_or(0, |c| c.retention.duration().whole_seconds());
        let before = now_secs() - retention;
        let mut tx = state.store.write().await?;
        let pruned = tx.prune_workload_certificates(before).await?;
        if pruned > 0 {
            tx.audit(AuditEvent::new(
                state.job_actor(),
                "workload.pruned",
                format!("{pruned} certificates"),
                json!({"count": pruned, "expired_before": before}),
            ))
            .await?;
        }
        tx.commit().await?;
    }
    if let Err(e) = ensure_serving_cert(state).await {
        tracing::warn!(error = %e.detail, "gRPC serving certificate not renewed; will retry");
    }
    Ok(())
}
