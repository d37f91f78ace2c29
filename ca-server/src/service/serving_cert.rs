//! The gRPC serving certificate: issued by this server from the serving cluster's
//! intermediate, with a key that never leaves memory, renewed at half-life or when the chain
//! above it changes.

use std::sync::{Arc, RwLock};

use ca_core::cert::CertInfo;
use ca_core::profile::{CertRequest, ProfileKind};
use ca_store::now_secs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::config::IstioConfig;
use crate::error::{ErrorCode, ServiceError};
use crate::service::external_ca::{ClusterCa, cluster_ca};
use crate::service::state::AppState;

/// The gRPC serving certificate: issued by this server from the serving cluster's
/// intermediate (so agents verify it against the mesh root), with a key that never leaves
/// memory, renewed at half-life.
#[derive(Default)]
pub struct ServingCert {
    current: RwLock<Option<(Arc<CertifiedKey>, i64, String)>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(k, _, _)| k.clone())
    }
}

impl ServingCert {
    /// Due at half-life, or as soon as the chain above it changed (a rotation: agents may
    /// soon trust only the new root).
    fn renew_due(&self, now: i64, chain: Option<&str>) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|(_, at, issued_under)| now >= *at || chain.is_some_and(|c| c != issued_under))
    }
}

/// Identifies the chain a certificate from `ca` carries.
fn chain_id(ca: &ClusterCa) -> String {
    ca.serving_chain.iter().map(CertInfo::fingerprint).collect::<Vec<_>>().join(",")
}

/// The configured serving cluster, or else the first configured cluster (by name) that is
/// active here: a configured but not yet approved cluster must not keep the listener dark.
async fn serving_ca(state: &AppState, cfg: &IstioConfig) -> Result<(String, Arc<ClusterCa>), ServiceError> {
    if let Some(name) = &cfg.serving_cluster {
        return Ok((name.clone(), cluster_ca(state, name).await?));
    }
    let mut last = ServiceError::new(ErrorCode::IntermediateNotReady, "no external-CA cluster is active yet");
    for name in cfg.clusters.keys() {
        match cluster_ca(state, name).await {
            Ok(ca) => return Ok((name.clone(), ca)),
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
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ServiceError::internal)?;
    let public = hsm::PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&key))
        .map_err(ServiceError::internal)?;
    let not_before = ca_core::issue::default_not_before();
    let not_after = (not_before + cfg.serving_cert_validity.duration()).min(ca.issuer.cert.not_after);
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, "ca-server");
    let request = CertRequest {
        server_names: cfg.server_names.clone(),
        ..CertRequest::new(ProfileKind::Server, subject, public, not_before, not_after)
    };
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
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der).map_err(ServiceError::internal)?;
    let renew_at = cert.not_before.unix_timestamp() + (cert.not_after - cert.not_before).whole_seconds() / 2;
    *state.istio.serving.current.write().unwrap_or_else(|p| p.into_inner()) =
        Some((Arc::new(CertifiedKey::new(chain, signing)), renew_at, chain_id(&ca)));
    tracing::info!(serial = %cert.serial, cluster = %name, "gRPC serving certificate issued");
    Ok(())
}
