//! The certificate inventory (issued certificates, and workload certificates in their own
//! table), and server certificates issued from an external-CA cluster's intermediate.

use ca_core::cert::CertInfo;
use ca_core::csr::VerifiedCsr;
use ca_core::names::is_dns_name;
use ca_core::profile::CertRequest;
use ca_core::validity::{Fit, fit_validity};
use ca_store::{CertFilter, CertIssuer, CertRecord, WorkloadRecord, now_secs};
use serde_json::json;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::issuance::{cert_record, record_issued};
use crate::service::state::AppState;

/// A serial as the inventory stores it (lowercase hex, no colons, no sign pad); input that is
/// not a serial at all simply matches nothing.
pub fn normalise_serial(s: &str) -> String {
    ca_core::crl::parse_serial(s).map(hex::encode).unwrap_or_else(|_| s.to_ascii_lowercase())
}

/// Which certificates to list.
pub struct ListQuery {
    pub cluster: Option<String>,
    pub issuer: Option<String>,
    /// `valid`, `revoked` or `expired`.
    pub status: Option<&'static str>,
    /// A duration such as `30d`: valid certificates expiring within it.
    pub expiring_within: Option<String>,
    /// At most 1000; default 100.
    pub limit: Option<i64>,
}

pub async fn list(state: &AppState, op: &Operator, q: ListQuery) -> Result<Vec<CertRecord>, ServiceError> {
    let expiring = match &q.expiring_within {
        Some(d) => Some(
            ca_core::duration::Validity::parse_window(d)
                .map_err(|e| {
                    ServiceError::new(ErrorCode::InvalidQuery, format!("expiring_within: {e}")).by(op.actor())
                })?
                .duration()
                .whole_seconds(),
        ),
        None => None,
    };
    let filter = CertFilter {
        cluster: q.cluster,
        issuer: q.issuer,
        status: q.status.map(str::to_string),
        expiring_within_secs: expiring,
        now: now_secs(),
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    Ok(state.store.list_certificates(&filter).await?)
}

/// A certificate found by serial.
#[allow(clippy::large_enum_variant)] // one per request, returned once: boxing buys nothing
pub enum Found {
    Issued(CertRecord),
    /// A workload certificate, with the certificate parsed from its DER.
    Workload(WorkloadRecord, CertInfo),
}

pub async fn get(state: &AppState, op: &Operator, serial: &str) -> Result<Found, ServiceError> {
    let serial = normalise_serial(serial);
    if let Some(r) = state.store.get_certificate(&serial).await? {
        return Ok(Found::Issued(r));
    }
    // Workload certificates live in their own table (batched, pruned after retention).
    let w = state
        .store
        .get_workload_certificate(&serial)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no certificate {serial}")).by(op.actor()))?;
    let cert = CertInfo::from_der(w.der.clone()).map_err(ServiceError::internal)?;
    Ok(Found::Workload(w, cert))
}

/// What an admin asks for: a TLS server certificate from a cluster's intermediate.
pub struct ServerCertificate {
    /// PEM CSR. Only its public key is used.
    pub csr: String,
    pub dns_names: Vec<String>,
    /// Lifetime, e.g. `30d` (default 30d, at most 90d, never past the intermediate).
    pub validity: Option<String>,
}

pub struct IssuedServerCertificate {
    pub cert: CertInfo,
    /// The cluster intermediate and its parents below the root (PEM).
    pub chain_pem: Vec<String>,
    pub roots: Vec<CertInfo>,
}

/// Issues a TLS server certificate (e.g. istiod's own, which it needs when its CA is off) from
/// an external-CA cluster's intermediate.
pub async fn issue_server_certificate(
    state: &AppState,
    op: &Operator,
    name: &str,
    req: ServerCertificate,
) -> Result<IssuedServerCertificate, ServiceError> {
    let deny = |e: ServiceError| e.by(op.actor());
    let validity: time::Duration = match &req.validity {
        None => time::Duration::days(30),
        Some(v) => v
            .parse::<ca_core::duration::Validity>()
            .map_err(|e| deny(ServiceError::new(ErrorCode::InvalidValidity, e.to_string())))?
            .duration(),
    };
    if validity <= time::Duration::ZERO || validity > time::Duration::days(90) {
        return Err(deny(ServiceError::new(ErrorCode::InvalidValidity, "validity must be positive and at most 90d")));
    }
    if req.dns_names.is_empty() || !req.dns_names.iter().all(|n| is_dns_name(n)) {
        return Err(deny(ServiceError::new(
            ErrorCode::InvalidNames,
            "dns_names must be one or more lowercase DNS names without wildcards",
        )));
    }
    // A certificate for any name under the mesh root would let one person intercept istiod's
    // traffic: only the names configured for the cluster, never the CA's own.
    let allowed = crate::service::cluster_settings::server_certificate_names(state, name).await?;
    let own = state.config.istio.as_ref().map(|c| c.server_names.clone()).unwrap_or_default();
    if let Some(n) = req.dns_names.iter().find(|n| !allowed.contains(n) || own.contains(n)) {
        return Err(deny(ServiceError::new(
            ErrorCode::NameNotAllowed,
            format!("{n} is not among cluster {name}'s server_certificate_names ({})", allowed.join(", ")),
        )));
    }
    let ca = crate::service::cluster_ca::cluster_ca(state, name).await.map_err(deny)?;
    let csr = VerifiedCsr::parse(req.csr.as_bytes()).map_err(|e| deny(crate::service::issuer::map_core(e.into())))?;
    let spki = csr.public_key().spki_der().to_vec();
    crate::service::keys::refuse_blocked(&state.store, &spki).await.map_err(deny)?;
    let not_before = ca_core::issue::default_not_before();
    let end = ca.issuer.cert.not_after;
    let not_after = fit_validity(end, not_before, validity, Fit::Clamp).map_or(end, |f| f.not_after);
    let request =
        CertRequest::server(&req.dns_names[0], req.dns_names.clone(), csr.public_key().clone(), not_before, not_after);
    let cert =
        ca.issuer.with_key(state.hsm_timeout(), move |c| ca_core::issue::issue(c, &request)).await.map_err(deny)?.cert;
    let record = cert_record(&cert, CertIssuer::Cluster(name.to_string()), Some(name), "server", &op.actor());
    let mut tx = state.store.write().await?;
    crate::service::keys::refuse_blocked_tx(&mut tx, &spki).await.map_err(deny)?;
    record_issued(&mut tx, &record, &op.actor(), json!({"issuer": ca.serial, "names": req.dns_names})).await?;
    tx.commit().await?;
    state.metrics.issued(name, "server", "ok");
    Ok(IssuedServerCertificate { cert, chain_pem: ca.chain_pem.clone(), roots: ca.issuer.roots.clone() })
}
