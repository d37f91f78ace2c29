//! What every issuance path shares: the request for a cluster intermediate under an
//! environment, and the inventory record written with its audit record.

use ca_core::cert::CertInfo;
use ca_core::profile::CertRequest;
use ca_core::validity::{Fit, Fitted, fit_validity};
use ca_store::{AuditEvent, CertIssuer, CertRecord, ClusterRecord, now_secs};
use serde_json::json;
use time::OffsetDateTime;

use crate::error::{ErrorCode, ServiceError};
use crate::service::issuer::Issuer;
use crate::service::state::AppState;

/// The issuer followed by its parents (the chain a cluster certificate needs above it).
pub(crate) fn issuer_chain(issuer: &Issuer) -> Vec<CertInfo> {
    std::iter::once(issuer.cert.clone()).chain(issuer.chain.iter().cloned()).collect()
}
pub(crate) fn cluster_request(
    state: &AppState,
    issuer: &Issuer,
    cluster: &ClusterRecord,
    key: hsm::PublicKey,
) -> Result<CertRequest, ServiceError> {
    let not_before = ca_core::issue::default_not_before();
    // Online issuance clamps to the issuer's lifetime instead of refusing: the environment's
    // own rotation is what extends it.
    let end = issuer.cert.not_after;
    let Fitted { not_after, clamped } =
        fit_validity(end, not_before, state.config.policy.cluster_validity.duration(), Fit::Clamp)
            .unwrap_or(Fitted { not_after: end, clamped: true });
    if clamped && not_after <= OffsetDateTime::now_utc() + time::Duration::hours(1) {
        return Err(ServiceError::new(
            ErrorCode::IssuerExpiring,
            format!("issuer {} expires at {}", issuer.name, ca_core::error::fmt_time(issuer.cert.not_after)),
        ));
    }
    let trust_domain =
        cluster.trust_domain.parse().map_err(|e| ServiceError::internal(format!("stored trust domain: {e}")))?;
    Ok(CertRequest::cluster_intermediate(&cluster.name, &cluster.environment, trust_domain, key, not_before, not_after))
}
/// Records a new certificate in the inventory together with its `certificate.issued` audit
/// record: the common fields (cluster, profile, notAfter, fingerprint) plus `extra`.
pub(crate) async fn record_issued(
    tx: &mut ca_store::Tx,
    record: &CertRecord,
    actor: &str,
    extra: serde_json::Value,
) -> Result<(), ServiceError> {
    tx.insert_certificate(record).await?;
    let mut details = json!({"cluster": record.cluster, "profile": record.profile,
                             "not_after": record.not_after, "sha256_fingerprint": record.fingerprint});
    if let (Some(d), serde_json::Value::Object(e)) = (details.as_object_mut(), extra) {
        d.extend(e);
    }
    tx.audit(AuditEvent::new(actor, "certificate.issued", &record.serial, details)).await?;
    Ok(())
}
pub(crate) fn cert_record(
    cert: &CertInfo,
    issuer: CertIssuer,
    cluster: Option<&str>,
    profile: &str,
    requester: &str,
) -> CertRecord {
    let sans: Vec<String> = cert.uris.iter().chain(&cert.dns_names).cloned().collect();
    CertRecord {
        serial: cert.serial.clone(),
        issuer,
        cluster: cluster.map(Into::into),
        profile: profile.into(),
        subject: cert.subject.clone(),
        sans: serde_json::to_string(&sans).expect("strings serialise"),
        not_before: cert.not_before.unix_timestamp(),
        not_after: cert.not_after.unix_timestamp(),
        fingerprint: cert.fingerprint(),
        requester: requester.into(),
        pem: cert.pem(),
        issued_at: now_secs(),
        revoked_at: None,
        revocation_reason: None,
    }
}
