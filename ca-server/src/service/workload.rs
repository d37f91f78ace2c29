//! One workload certificate for Istio's certificate API, whichever protocol carried the
//! request: the caller a service-account token proves, the identity it may have (its own, or
//! for a trusted node account the one it impersonates), the CSR and lifetime judged before the
//! key is used, the signature, and the record that must be durable before anything is answered.

use ca_core::csr::VerifiedCsr;
use ca_core::names::{SpiffeId, is_k8s_object_name};
use ca_core::profile::CertRequest;
use ca_core::workload::{TtlPolicy, WorkloadDenial};
use ca_store::{WorkloadRecord, now_secs};
use sha2::Digest;
use time::OffsetDateTime;

use crate::auth::service_account::Caller;
use crate::error::{ErrorCode, ServiceError};
use crate::service::cluster_ca::cluster_ca;
use crate::service::recorder::Entry;
use crate::service::state::AppState;

fn not_served(cluster: &str) -> ServiceError {
    ServiceError::new(ErrorCode::ClusterNotServed, format!("cluster {cluster:?} is not served by this CA"))
}

/// The workload a service-account token (`None`: none was sent) speaks for in `cluster`.
/// Every refusal here is of a caller not yet authenticated.
pub async fn authenticate(state: &AppState, cluster: &str, token: Option<&str>) -> Result<Caller, ServiceError> {
    let Some(validator) = state.istio.validator(cluster) else {
        return Err(not_served(cluster));
    };
    let token = token.ok_or_else(|| {
        ServiceError::new(
            ErrorCode::Unauthenticated,
            "send the workload's service-account token as authorization: Bearer <JWT>",
        )
    })?;
    validator.verify(token).await
}

/// Issues a workload certificate to an authenticated caller of `cluster` and returns what
/// the response carries: the certificate, the chain below the root, and the cluster's bundle.
/// `impersonated` is the identity a node agent asks for on a workload's behalf; `validity`
/// the lifetime in seconds as the request gave it (`ca_core::workload::lifetime` decides).
pub async fn issue(
    state: &AppState,
    cluster: &str,
    caller: &Caller,
    impersonated: Option<&str>,
    csr: String,
    validity: i64,
) -> Result<Vec<String>, ServiceError> {
    // The settings as served now (the database's, reloaded by `cluster_settings::reload`).
    let validator = state.istio.validator(cluster).ok_or_else(|| not_served(cluster))?;
    let ccfg = validator.settings();
    let ca = cluster_ca(state, cluster).await?;
    let mut identity = SpiffeId::istio(&ca.trust_domain, &caller.namespace, &caller.service_account)
        .map_err(|e| ServiceError::new(ErrorCode::InvalidToken, e.to_string()))?;
    if let Some(imp) = impersonated {
        if !ccfg.trusted_node_accounts.contains(&caller.account()) {
            return Err(ServiceError::new(
                ErrorCode::ImpersonationDenied,
                format!("{} is not a trusted node account and may not act for {imp}", caller.account()),
            ));
        }
        let id: SpiffeId = imp.parse().map_err(|e: ca_core::PolicyError| {
            ServiceError::new(ErrorCode::InvalidImpersonatedIdentity, e.to_string())
        })?;
        if id.trust_domain() != &ca.trust_domain {
            return Err(ServiceError::new(
                ErrorCode::ImpersonationDenied,
                format!("{imp} is outside the cluster's trust domain {}", ca.trust_domain),
            ));
        }
        // Only workload identities of the Istio form, and never a node account itself.
        let path = imp.split_once("://").and_then(|(_, r)| r.split_once('/')).map_or("", |(_, p)| p);
        let target = match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", ns, "sa", sa] if is_k8s_object_name(ns) && is_k8s_object_name(sa) => format!("{ns}/{sa}"),
            _ => {
                return Err(ServiceError::new(
                    ErrorCode::ImpersonationDenied,
                    format!("{imp} is not a workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)"),
                ));
            }
        };
        if ccfg.trusted_node_accounts.contains(&target) {
            return Err(ServiceError::new(
                ErrorCode::ImpersonationDenied,
                format!("{imp} is a trusted node account and cannot be impersonated"),
            ));
        }
        identity = id;
    }
    let policy =
        TtlPolicy { default: ccfg.default_ttl.duration(), max: ccfg.max_ttl.duration(), over_max: ccfg.over_max };
    if !ca.issuer.is_healthy() {
        // The key is away: a bad request is still the caller's error, a good one waits.
        judge(&csr, &identity, validity, &policy, ca.issuer.cert.not_after).map_err(judged_error)?;
    }
    // Judging and signing share one trip to a blocking thread (none for a file key): the
    // CSR check is CPU work of the same order as the signature.
    let id = identity.clone();
    let permit = state
        .istio
        .issuing
        .acquire()
        .await
        .map_err(|_| ServiceError::new(ErrorCode::ShuttingDown, "the server is stopping"))?;
    let issued = ca
        .issuer
        .with_key_short(state.hsm_timeout(), move |ca| match judge(&csr, &id, validity, &policy, ca.cert.not_after) {
            Ok(req) => ca_core::issue::issue(ca, &req).map(Ok),
            Err(j) => Ok(Err(j)),
        })
        .await;
    // Held for the CPU work only, not while the record commits.
    drop(permit);
    let issued = issued?.map_err(judged_error)?;
    let cert = issued.cert;
    let sha256 = hex::encode(sha2::Sha256::digest(&cert.der));
    let record = WorkloadRecord {
        serial: cert.serial.clone(),
        cluster: cluster.to_string(),
        identity: identity.to_string(),
        issuer_serial: ca.serial.clone(),
        not_before: cert.not_before.unix_timestamp(),
        not_after: cert.not_after.unix_timestamp(),
        issued_at: now_secs(),
        audit_seq: 0,
        der: cert.der.clone(),
    };
    // Only a durable record is answered: a certificate nobody can find is never handed out.
    state.istio.recorder.record(Entry::Issued { record, sha256 }).await?;
    state.metrics.issued(cluster, "workload", "ok");
    let mut chain = Vec::with_capacity(ca.chain_pem.len() + 2);
    chain.push(cert.pem());
    chain.extend(ca.chain_pem.iter().cloned());
    chain.push(ca.bundle_pem.clone());
    Ok(chain)
}

/// Audits an authenticated caller's refusal on the denials recorder, so that refusals never
/// share (or delay) an issuance's commit.
pub async fn record_denial(state: &AppState, denial: serde_json::Value) -> Result<(), ServiceError> {
    state.istio.denials.record(Entry::Denied(denial)).await
}

fn judged_error(j: Judged) -> ServiceError {
    match j {
        Judged::Csr(e) => crate::service::issuer::map_core(e),
        Judged::Denial(WorkloadDenial::Forbidden(m)) => ServiceError::new(ErrorCode::IdentityMismatch, m),
        Judged::Denial(WorkloadDenial::Invalid(m)) => ServiceError::new(ErrorCode::InvalidRequest, m),
        Judged::Denial(WorkloadDenial::IssuerExpiring(m)) => ServiceError::new(ErrorCode::IssuerExpiring, m),
    }
}

/// Why a request was refused before signing.
pub enum Judged {
    Csr(ca_core::CoreError),
    Denial(WorkloadDenial),
}

/// The CSR's signature, key and names, and the lifetime: everything decided before signing.
/// Public for the fuzz target.
pub fn judge(
    csr: &str,
    identity: &SpiffeId,
    validity: i64,
    policy: &TtlPolicy,
    issuer_not_after: OffsetDateTime,
) -> Result<CertRequest, Judged> {
    let csr = VerifiedCsr::parse(csr.as_bytes()).map_err(|e| Judged::Csr(e.into()))?;
    ca_core::workload::check_requested_names(&csr, identity).map_err(Judged::Denial)?;
    let (not_before, not_after) =
        ca_core::workload::lifetime(validity, policy, issuer_not_after, OffsetDateTime::now_utc())
            .map_err(Judged::Denial)?;
    Ok(CertRequest::workload(identity.clone(), csr.public_key().clone(), not_before, not_after))
}
