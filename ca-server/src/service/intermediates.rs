//! A plug-in cluster's own intermediate: enrolment with the one-time token, renewal with the
//! current intermediate (mTLS), and the reports of what the cluster has installed, which the
//! rotation gates read.

use ca_core::cert::CertInfo;
use ca_core::csr::VerifiedCsr;
use ca_store::{AuditEvent, CertIssuer, CertRecord, ClusterRecord, now_secs};
use serde_json::json;
use sha2::Digest;

use crate::error::{ErrorCode, ServiceError};
use crate::service::certificates::normalise_serial;
use crate::service::enrolment_token::token_hash;
use crate::service::issuance::{cert_record, cluster_request, issuer_chain, record_issued};
use crate::service::state::AppState;

/// How the caller of an intermediate request authenticated.
pub enum Credential<'a> {
    /// `Authorization: Bearer` with the enrolment token.
    Token(&'a str),
    /// The TLS client certificate (DER).
    Certificate(&'a [u8]),
    None,
}

/// A newly issued cluster intermediate.
pub struct Issued {
    pub cert: CertInfo,
    /// The intermediate, then each parent up to and including the root.
    pub chain: Vec<CertInfo>,
    /// Roots to trust.
    pub roots: Vec<CertInfo>,
}

enum Caller {
    Enrolment { token_hash: String },
    Renewal { serial: String },
}

/// Enrols (first time, with the enrolment token) or renews (with the cluster's current,
/// unexpired, unrevoked intermediate) a cluster intermediate for the public key of `csr`.
pub async fn issue(
    state: &AppState,
    name: &str,
    credential: Credential<'_>,
    csr: &str,
) -> Result<Issued, ServiceError> {
    // Until the caller has proved who it is, refusals are recorded as anonymous: the name in
    // the URL is only a claim.
    let claimed = |e: ServiceError| ServiceError { detail: format!("{} (claimed cluster {name:?})", e.detail), ..e };
    let cluster =
        state.store.get_cluster(name).await?.ok_or_else(|| claimed(ServiceError::not_found("no such cluster")))?;
    // An external-CA cluster's intermediate is the server's; its enrolment token is for its
    // agent's client certificate (`service::agent`), never for a CA certificate.
    if cluster.is_external_ca() {
        return Err(claimed(ServiceError::new(
            ErrorCode::ExternalCaCluster,
            format!(
                "cluster {name} is in external-ca mode: the server holds its intermediate; its agent enrols at /v1/clusters/{name}/agent-certificate"
            ),
        )));
    }
    let now = now_secs();
    let token_invalid = || {
        ServiceError::new(ErrorCode::EnrolmentTokenInvalid, "the enrolment token is invalid, expired or already used")
    };
    let caller = match credential {
        Credential::Token(token) => {
            let h = token_hash(token);
            let usable = cluster.is_active()
                && cluster.enrolled_at.is_none()
                && cluster.enrolment_token_hash.as_deref() == Some(h.as_str())
                && cluster.enrolment_expires_at.is_some_and(|e| e > now);
            if !usable {
                if cluster.status == ca_store::ClusterStatus::Pending
                    && cluster.enrolment_token_hash.as_deref() == Some(h.as_str())
                {
                    return Err(ServiceError::new(
                        ErrorCode::ClusterNotActive,
                        "the cluster's registration awaits approval by a second operator",
                    )
                    .by(format!("cluster:{name}")));
                }
                return Err(claimed(token_invalid()));
            }
            Caller::Enrolment { token_hash: h }
        }
        Credential::Certificate(der) => {
            // Refused before the HSM signs anything; checked again under the write lock below.
            let rec = presented_intermediate(state, &cluster, der, now).await?;
            Caller::Renewal { serial: rec.serial }
        }
        Credential::None => {
            return Err(claimed(ServiceError::new(
                ErrorCode::Unauthenticated,
                "enrol with the enrolment token (Authorization: Bearer) or renew over mTLS with the current intermediate",
            )));
        }
    };
    let actor = format!("cluster:{name}");
    let deny = |e: ServiceError| e.by(actor.clone());

    let csr = VerifiedCsr::parse(csr.as_bytes()).map_err(|e| deny(crate::service::issuer::map_core(e.into())))?;
    let spki = csr.public_key().spki_der().to_vec();
    crate::service::keys::refuse_blocked(&state.store, &spki).await.map_err(&deny)?;
    let issuer = state.issuer(&cluster.environment)?.clone();
    let request = cluster_request(state, &issuer, &cluster, csr.public_key().clone()).map_err(&deny)?;
    let result = issuer.with_key(state.hsm_timeout(), move |ca| ca_core::issue::issue(ca, &request)).await;
    let issued = match result {
        Ok(i) => i,
        Err(e) => {
            state.metrics.issued(&issuer.name, "cluster", "error");
            return Err(deny(e));
        }
    };
    let cert = issued.cert;
    let mut tx = state.store.write().await?;
    // Everything checked before signing is checked again under the write lock: a revocation,
    // another renewal or a replayed token may have landed meanwhile. The loser's certificate is
    // never recorded nor returned.
    let (via, renewed_from) = match &caller {
        Caller::Enrolment { token_hash } => {
            if !tx.consume_enrolment(name, token_hash, now).await? {
                return Err(deny(token_invalid()));
            }
            ("enrolment", None)
        }
        Caller::Renewal { serial } => {
            let current =
                tx.get_cluster(name).await?.ok_or_else(|| deny(ServiceError::not_found("no such cluster")))?;
            let presented = tx
                .get_certificate(serial)
                .await?
                .ok_or_else(|| ServiceError::internal("presented certificate vanished"))?;
            let successor_revoked = match &current.current_serial {
                Some(c) if c != serial => tx.get_certificate(c).await?.is_some_and(|c| c.revoked_at.is_some()),
                _ => false,
            };
            renewal_allowed(&presented, &current, successor_revoked, now).map_err(&deny)?;
            // Two renewals with the same intermediate, signed at once: the first to commit
            // wins and the other is refused, so that no answer is silently superseded (and
            // the second cannot push the first's intermediate out of the two that renew).
            if current.current_serial != cluster.current_serial {
                return Err(deny(ServiceError::new(
                    ErrorCode::RenewalSuperseded,
                    format!(
                        "a concurrent renewal with intermediate {serial} completed first (the newest is now {}); this one was not recorded",
                        current.current_serial.as_deref().unwrap_or("none")
                    ),
                )));
            }
            ("renewal", Some(serial.clone()))
        }
    };
    crate::service::keys::refuse_blocked_tx(&mut tx, &spki).await.map_err(&deny)?;
    let record = cert_record(&cert, CertIssuer::Environment(issuer.name.clone()), Some(name), "cluster", &actor);
    record_issued(&mut tx, &record, &actor, json!({"issuer": issuer.name, "via": via, "renewed_from": renewed_from}))
        .await?;
    tx.set_current(name, &cert.serial, renewed_from.as_deref()).await?;
    tx.commit().await?;
    state.metrics.issued(&issuer.name, "cluster", "ok");
    let chain: Vec<CertInfo> = std::iter::once(&cert).chain(&issuer_chain(&issuer)).cloned().collect();
    Ok(Issued { cert, chain, roots: issuer.roots.clone() })
}

/// The intermediate a cluster presented over mTLS, if it may act for the cluster (renew, or
/// report what it has installed): one of our issuers' intermediates for this cluster (it
/// chains to `tls.client_ca` and the inventory knows it; TLS only proved the client holds its
/// key), unrevoked, unexpired, and the cluster's newest or the one it last renewed with.
async fn presented_intermediate(
    state: &AppState,
    cluster: &ClusterRecord,
    der: &[u8],
    now: i64,
) -> Result<CertRecord, ServiceError> {
    let name = &cluster.name;
    let fp = hex::encode(sha2::Sha256::digest(der));
    let rejected = || {
        ServiceError::new(
            ErrorCode::ClientCertificateRejected,
            format!("certificate sha256:{fp} is not an intermediate of this cluster (claimed cluster {name:?})"),
        )
    };
    if !state.client_chain_ok(der) {
        return Err(rejected());
    }
    let rec = match state.store.get_certificate_by_fingerprint(&fp).await? {
        Some(r) if r.cluster.as_deref() == Some(name.as_str()) => r,
        _ => return Err(rejected()),
    };
    let successor_revoked = match &cluster.current_serial {
        Some(c) if *c != rec.serial => state.store.get_certificate(c).await?.is_some_and(|c| c.revoked_at.is_some()),
        _ => false,
    };
    renewal_allowed(&rec, cluster, successor_revoked, now).map_err(|e| e.by(format!("cluster:{name}")))?;
    Ok(rec)
}

/// What a cluster reports having installed.
pub struct Installed {
    /// SHA-256 fingerprints (hex) of the certificates in the installed `root-cert.pem`.
    pub bundle: Vec<String>,
    /// SHA-256 fingerprints of the installed `ca-cert.pem`, then of `cert-chain.pem`'s.
    pub chain: Vec<String>,
    /// Serial of the installed `ca-cert.pem`.
    pub intermediate_serial: String,
}

/// What a cluster should do after its report.
pub struct Advice {
    /// The bundle the cluster should have installed now.
    pub roots: Vec<CertInfo>,
    /// Why the cluster should renew now (a rotation moved its chain), if it should.
    pub renew_because: Option<String>,
}

/// A plug-in cluster reports what it has installed (authenticated by the intermediate it
/// presented over mTLS, `peer`) and learns the bundle it should hold and whether to renew now.
pub async fn report(state: &AppState, name: &str, peer: Option<&[u8]>, req: Installed) -> Result<Advice, ServiceError> {
    let cluster = state
        .store
        .get_cluster(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no such cluster (claimed cluster {name:?})")))?;
    let der = peer.ok_or_else(|| {
        ServiceError::new(ErrorCode::Unauthenticated, "report over mTLS with the cluster's current intermediate")
    })?;
    let now = now_secs();
    presented_intermediate(state, &cluster, der, now).await?;
    let actor = format!("cluster:{name}");
    let valid_fp = |f: &String| f.len() == 64 && f.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if req.bundle.is_empty()
        || req.bundle.len() > 16
        || req.chain.is_empty()
        || req.chain.len() > 16
        || !req.bundle.iter().chain(&req.chain).all(valid_fp)
    {
        return Err(ServiceError::new(
            ErrorCode::InvalidReport,
            "bundle and chain are 1 to 16 lowercase hex SHA-256 fingerprints each",
        )
        .by(actor));
    }
    let installed = state
        .store
        .get_certificate(&normalise_serial(&req.intermediate_serial))
        .await?
        .filter(|c| c.cluster.as_deref() == Some(name))
        .ok_or_else(|| {
            ServiceError::new(ErrorCode::InvalidReport, "intermediate_serial is not an intermediate of this cluster")
                .by(actor.clone())
        })?;
    if req.chain[0] != installed.fingerprint {
        return Err(ServiceError::new(
            ErrorCode::InvalidReport,
            "chain must start with the installed intermediate named by intermediate_serial",
        )
        .by(actor));
    }
    let issuer = state.issuer(&cluster.environment)?;
    let bundle: std::collections::BTreeSet<&String> = req.bundle.iter().collect();
    let report = ca_store::ClusterReport {
        cluster: name.to_string(),
        bundle: serde_json::to_string(&bundle).map_err(ServiceError::internal)?,
        chain: serde_json::to_string(&req.chain).map_err(ServiceError::internal)?,
        intermediate_serial: installed.serial.clone(),
        reported_at: now,
    };
    let (bundle_changed, reissue_after) = crate::service::rotation_record::changed_at(state, &cluster).await?;
    // A report that repeats the stored one, made since the last stage change, tells the gates
    // nothing new: it is not written, so repeated reports cost no write lock.
    let stored = state.store.get_cluster_report(name).await?;
    let news = stored.is_none_or(|r| {
        r.bundle != report.bundle
            || r.chain != report.chain
            || r.intermediate_serial != report.intermediate_serial
            || r.reported_at < bundle_changed.max(reissue_after)
    });
    if news {
        // The gates read this row, so changing it is a state change like any other: audited in
        // the same transaction. Repeats are neither written nor recorded.
        let details = json!({"bundle": bundle, "chain": req.chain, "intermediate_serial": report.intermediate_serial});
        let mut tx = state.store.write().await?;
        tx.put_cluster_report(&report).await?;
        tx.audit(AuditEvent::new(actor, "cluster.report", name, details)).await?;
        tx.commit().await?;
    }
    let renew_because = if !req.chain.contains(&issuer.cert.fingerprint()) {
        Some(format!("the installed chain does not go through {}'s current certificate", issuer.name))
    } else if installed.issued_at < reissue_after {
        Some("a rotation moved this cluster's chain after its intermediate was issued".to_string())
    } else {
        None
    };
    Ok(Advice { roots: issuer.roots.clone(), renew_because })
}

fn superseded(serial: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::ClientCertificateSuperseded,
        format!("intermediate {serial} has been superseded; renew with the cluster's newest intermediate"),
    )
}

/// The presented intermediate may renew: unrevoked, unexpired, its cluster active, and it is
/// the cluster's newest intermediate, or the one the cluster last renewed with (whose response
/// may have been lost on the way back).
fn renewal_allowed(
    rec: &CertRecord,
    cluster: &ClusterRecord,
    successor_revoked: bool,
    now: i64,
) -> Result<(), ServiceError> {
    if rec.revoked_at.is_some() {
        return Err(ServiceError::new(
            ErrorCode::ClientCertificateRevoked,
            format!("intermediate {} is revoked; enrol again", rec.serial),
        ));
    }
    if rec.not_after <= now {
        return Err(ServiceError::new(
            ErrorCode::ClientCertificateExpired,
            format!("intermediate {} has expired; enrol again", rec.serial),
        ));
    }
    if !cluster.is_active() {
        return Err(ServiceError::new(
            ErrorCode::ClusterNotActive,
            format!("cluster {} is {}", cluster.name, cluster.status),
        ));
    }
    let serial = Some(rec.serial.as_str());
    if cluster.current_serial.as_deref() == serial {
        return Ok(());
    }
    // The previous intermediate stands in for a newest one that never arrived, but not for
    // one that was revoked: then the cluster enrols again.
    if cluster.previous_serial.as_deref() == serial && !successor_revoked {
        return Ok(());
    }
    Err(superseded(&rec.serial))
}
