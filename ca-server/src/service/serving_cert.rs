//! The gRPC serving certificate: issued by this server from the serving cluster's
//! intermediate, with a key that never leaves memory, renewed at half-life or when the chain
//! above it changes.

use std::sync::Arc;

use ca_core::cert::CertInfo;
use ca_core::profile::CertRequest;
use ca_core::validity::{Fit, LifeFraction, fit_validity, renew_at};
use ca_store::now_secs;
use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::config::IstioConfig;
use crate::error::{ErrorCode, ServiceError};
use crate::service::cluster_ca::cluster_ca;
use crate::service::istio::ClusterCa;
use crate::service::state::AppState;

/// Identifies the chain a certificate from `ca` carries.
fn chain_id(ca: &ClusterCa) -> String {
    ca.serving_chain.iter().map(CertInfo::fingerprint).collect::<Vec<_>>().join(",")
}

/// The configured serving cluster, or else the first served cluster (by name) whose CA loads:
/// a cluster whose intermediate is not issued yet must not keep the listener dark.
async fn serving_ca(state: &AppState, cfg: &IstioConfig) -> Result<(String, Arc<ClusterCa>), ServiceError> {
    if let Some(name) = &cfg.serving_cluster {
        return Ok((name.clone(), cluster_ca(state, name).await?));
    }
    let mut last = ServiceError::new(ErrorCode::IntermediateNotReady, "no external-CA cluster is active yet");
    for name in state.istio.served() {
        match cluster_ca(state, &name).await {
            Ok(ca) => return Ok((name, ca)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub async fn ensure_serving_cert(state: &AppState) -> Result<(), ServiceError> {
    let Some(cfg) = &state.config.istio else { return Ok(()) };
    let now = now_secs();
    let (name, ca) = match serving_ca(state, cfg).await {
        Ok(found) => found,
        // Keep serving the current certificate while no CA is at hand.
        Err(_) if !state.istio.serving.renew_due(now, None) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !state.istio.serving.renew_due(now, Some(&chain_id(&ca))) {
        return Ok(());
    }
    let (public, signing) = hsm::tls::ephemeral_key(hsm::KeyAlgorithm::EcdsaP256).map_err(ServiceError::internal)?;
    let not_before = ca_core::issue::default_not_before();
    let end = ca.issuer.cert.not_after;
    let not_after =
        fit_validity(end, not_before, cfg.serving_cert_validity.duration(), Fit::Clamp).map_or(end, |f| f.not_after);
    let request = CertRequest::server("ca-server", cfg.server_names.clone(), public, not_before, not_after);
    let issued = ca.issuer.with_key(state.hsm_timeout(), move |c| ca_core::issue::issue(c, &request)).await?;
    let cert = issued.cert;
    let actor = state.job_actor();
    // Issued by a cluster intermediate, not an environment: no environment CRL covers it.
    let record = crate::service::issuance::cert_record(
        &cert,
        ca_store::CertIssuer::Cluster(name.clone()),
        Some(&name),
        "server",
        &actor,
    );
    let mut tx = state.store.write().await?;
    crate::service::issuance::record_issued(
        &mut tx,
        &record,
        &actor,
        json!({"issuer": ca.serial, "via": "grpc-serving-certificate", "names": cfg.server_names}),
    )
    .await?;
    tx.commit().await?;
    let mut chain = vec![rustls_pki_types::CertificateDer::from(cert.der.clone())];
    chain.extend(ca.serving_chain.iter().map(|c| rustls_pki_types::CertificateDer::from(c.der.clone())));
    let renew_at = renew_at(cert.not_before.unix_timestamp(), cert.not_after.unix_timestamp(), LifeFraction::HALF);
    state.istio.serving.install(Arc::new(CertifiedKey::new(chain, signing)), renew_at, chain_id(&ca));
    tracing::info!(serial = %cert.serial, cluster = %name, "gRPC serving certificate issued");
    Ok(())
}
