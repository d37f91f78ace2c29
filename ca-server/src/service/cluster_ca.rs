//! Loading an external-CA cluster's CA: its current intermediate from storage, its key opened
//! in the HSM, cached in `Istio` (single-flight, with failures remembered for a moment).

use std::sync::Arc;

use ca_core::cert::CertInfo;
use ca_store::ClusterRecord;

use crate::error::{ErrorCode, ServiceError};
use crate::service::hsm_call::HsmFailure;
use crate::service::issuer::Issuer;
use crate::service::istio::ClusterCa;
use crate::service::state::AppState;

/// The cluster's CA, from the cache or loaded from storage (and its key opened).
pub async fn cluster_ca(state: &AppState, name: &str) -> Result<Arc<ClusterCa>, ServiceError> {
    if let Some(c) = state.istio.cached(name) {
        return Ok(c);
    }
    if let Some(e) = state.istio.recent_failure(name) {
        return Err(e);
    }
    let _guard = state.istio.loading.lock().await;
    if let Some(c) = state.istio.cached(name) {
        return Ok(c);
    }
    if let Some(e) = state.istio.recent_failure(name) {
        return Err(e);
    }
    match load_cluster(state, name).await {
        Ok(ca) => {
            state.istio.loaded_now(name, ca.clone());
            Ok(ca)
        }
        Err(e) => {
            state.istio.failed_now(name, &e);
            Err(e)
        }
    }
}

async fn load_cluster(state: &AppState, name: &str) -> Result<Arc<ClusterCa>, ServiceError> {
    let record =
        state.store.get_cluster(name).await?.filter(|c| c.is_external_ca() && c.is_active()).ok_or_else(|| {
            ServiceError::new(
                ErrorCode::ClusterNotServed,
                format!("cluster {name:?} is not an active external-CA cluster here"),
            )
        })?;
    load_cluster_ca(state, &record).await
}

/// The block on the key of a cluster's intermediate, if its key was revoked for compromise.
pub async fn current_key_blocked(
    state: &AppState,
    cert: &ca_store::CertRecord,
) -> Result<Option<ca_store::BlockedKey>, ServiceError> {
    let info = ca_core::cert::parse_certs(cert.pem.as_bytes(), "stored certificate")
        .map_err(ServiceError::internal)?
        .into_iter()
        .next()
        .ok_or_else(|| ServiceError::internal(format!("certificate {} has no PEM", cert.serial)))?;
    Ok(state.store.blocked_key(&ca_store::spki_sha256(&info.spki_der)).await?)
}

/// An external-CA cluster whose key was revoked for compromise: nothing is signed with it, and
/// nothing certifies it again; a cluster rotation to a new key is the way back.
pub(super) fn key_compromised(name: &str, b: &ca_store::BlockedKey) -> ServiceError {
    ServiceError::new(
        ErrorCode::KeyCompromised,
        format!(
            "cluster {name}'s key was revoked for {} (certificate {}): it issues nothing until a cluster rotation brings a new key",
            b.reason, b.source_serial
        ),
    )
}

async fn load_cluster_ca(state: &AppState, record: &ClusterRecord) -> Result<Arc<ClusterCa>, ServiceError> {
    let name = &record.name;
    let not_ready = || {
        ServiceError::new(
            ErrorCode::IntermediateNotReady,
            format!("cluster {name} has no intermediate yet; try again shortly"),
        )
    };
    let serial = record.current_serial.clone().ok_or_else(not_ready)?;
    let cert_rec = state.store.get_certificate(&serial).await?.ok_or_else(not_ready)?;
    if let Some(b) = current_key_blocked(state, &cert_rec).await? {
        return Err(key_compromised(name, &b));
    }
    if cert_rec.revoked_at.is_some() {
        return Err(ServiceError::new(
            ErrorCode::IntermediateRevoked,
            format!("cluster {name}'s intermediate {serial} is revoked; a new one is being issued"),
        ));
    }
    let cert = pem::parse(cert_rec.pem.as_bytes())
        .map_err(ServiceError::internal)
        .and_then(|p| CertInfo::from_der(p.into_contents()).map_err(ServiceError::internal))?;
    let env = state.issuer(&record.environment)?.clone();
    let chain: Vec<CertInfo> = std::iter::once(env.cert.clone()).chain(env.chain.iter().cloned()).collect();
    let key_ref: hsm::KeyRef = record
        .key_ref
        .as_deref()
        .ok_or_else(|| ServiceError::internal(format!("external-CA cluster {name} has no key reference")))?
        .parse()
        .map_err(ServiceError::internal)?;
    // The cluster trusts what its environment hands out (both roots during a rotation), not
    // just the root its own chain ends in.
    let issuer = Arc::new(
        Issuer::from_certs(name, key_ref, cert.clone(), chain.clone())
            .map_err(ServiceError::internal)?
            .with_trust(env.roots.clone(), vec![]),
    );
    match issuer.reconnect_within(state.hsm_timeout()).await {
        Ok(()) => {}
        Err(HsmFailure::Failed(e)) => {
            tracing::error!(cluster = %name, error = %format!("{e:#}"), "cluster intermediate key unavailable");
            return Err(ServiceError::new(
                ErrorCode::HsmUnavailable,
                format!("the key of cluster {name} is unavailable"),
            ));
        }
        Err(HsmFailure::TimedOut | HsmFailure::Panicked(_)) => {
            return Err(ServiceError::new(
                ErrorCode::HsmTimeout,
                format!("the key of cluster {name} did not answer in time"),
            ));
        }
    }
    let below_root: Vec<CertInfo> =
        std::iter::once(cert).chain(chain.into_iter().filter(|c| !c.is_self_issued())).collect();
    let chain_pem: Vec<String> = below_root.iter().map(CertInfo::pem).collect();
    let oldest = env.roots.first().map(CertInfo::fingerprint);
    let ends_in_oldest =
        |chain: &[CertInfo]| chain.iter().any(|c| c.is_self_issued() && Some(c.fingerprint()) == oldest);
    let serving_chain =
        match env.accepted.iter().find(|(c, ch)| {
            c.subject_raw == env.cert.subject_raw && c.spki_der == env.cert.spki_der && ends_in_oldest(ch)
        }) {
            Some((c, ch)) if !ends_in_oldest(&env.chain) => std::iter::once(below_root[0].clone())
                .chain(std::iter::once(c.clone()))
                .chain(ch.iter().filter(|x| !x.is_self_issued()).cloned())
                .collect(),
            _ => below_root,
        };
    let bundle_pem: String = issuer.roots.iter().map(CertInfo::pem).collect();
    Ok(Arc::new(ClusterCa {
        trust_domain: record.trust_domain.parse().map_err(ServiceError::internal)?,
        serial,
        chain_pem,
        serving_chain,
        bundle_pem,
        issuer,
    }))
}
