//! Trust distribution: the roots a cluster trusts.

use ca_core::cert::CertInfo;

use crate::error::ServiceError;
use crate::service::state::AppState;

/// Every root an active cluster trusts: its environment's roots.
pub async fn cluster_roots(state: &AppState, name: &str) -> Result<Vec<CertInfo>, ServiceError> {
    let cluster = state
        .store
        .get_cluster(name)
        .await?
        .filter(|c| c.is_active())
        .ok_or_else(|| ServiceError::not_found(format!("no active cluster {name:?}")))?;
    Ok(state.issuer(&cluster.environment)?.roots.clone())
}
