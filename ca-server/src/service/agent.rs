//! A cluster's in-cluster agent, authenticated by its client certificate (mTLS).

use ca_store::{ClusterRecord, now_secs};
use sha2::Digest;

use crate::error::{ErrorCode, ServiceError};
use crate::service::state::AppState;

/// Accepts `peer_der` (the TLS client certificate) as `cluster`'s agent: an unrevoked,
/// unexpired certificate of profile `agent` recorded for this cluster (found by its SHA-256
/// fingerprint in the inventory) that chains to `tls.client_ca`. Every refusal is the same
/// `client-certificate-rejected`, naming the fingerprint, never why in more detail than it
/// needs: a caller probing with other certificates learns nothing.
pub async fn authenticate(state: &AppState, cluster: &ClusterRecord, peer_der: &[u8]) -> Result<(), ServiceError> {
    let name = &cluster.name;
    let fp = hex::encode(sha2::Sha256::digest(peer_der));
    let rejected = |why: &str| {
        ServiceError::new(
            ErrorCode::ClientCertificateRejected,
            format!("certificate sha256:{fp} is not an agent certificate of cluster {name:?}: {why}"),
        )
    };
    let rec = match state.store.get_certificate_by_fingerprint(&fp).await? {
        Some(r) if r.profile == "agent" && r.cluster.as_deref() == Some(name.as_str()) => r,
        _ => return Err(rejected("not issued to this cluster's agent")),
    };
    if rec.revoked_at.is_some() {
        return Err(ServiceError::new(
            ErrorCode::ClientCertificateRevoked,
            format!("agent certificate {} of cluster {name:?} is revoked", rec.serial),
        ));
    }
    let now = now_secs();
    if rec.not_after <= now || rec.not_before > now {
        return Err(ServiceError::new(
            ErrorCode::ClientCertificateExpired,
            format!("agent certificate {} of cluster {name:?} is not valid now", rec.serial),
        ));
    }
    if !state.client_chain_ok(peer_der) {
        return Err(rejected("it does not chain to tls.client_ca"));
    }
    Ok(())
}
