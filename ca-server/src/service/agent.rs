//! An external-CA cluster's in-cluster agent: its client certificate (enrolment with the
//! one-time token, renewal over mTLS), how a request proves it comes from the agent, and the
//! agent's reports of the trust bundle each namespace holds, which the rotation gates read.
//!
//! An agent certificate is issued by the cluster's environment intermediate, so that the
//! environment's CRL covers it and operators revoke it like any other certificate. Only the
//! agent's newest certificate, and the one it last renewed with, act for the cluster (as for a
//! plug-in cluster's intermediates); revoking the newest shuts the agent out until it enrols
//! again with a new token (`POST /v1/clusters/{name}/enrolment`), so that an operator who
//! revokes the serial they see is not defeated by the one it was renewed from.

use std::collections::{BTreeMap, BTreeSet};

use ca_core::cert::CertInfo;
use ca_core::csr::VerifiedCsr;
use ca_core::profile::CertRequest;
use ca_core::validity::{Fit, Fitted, fit_validity};
use ca_store::{AuditEvent, CertIssuer, CertRecord, ClusterRecord, ClusterStatus, now_secs};
use serde_json::json;
use sha2::Digest;
use time::OffsetDateTime;

use crate::error::{ErrorCode, ServiceError};
use crate::service::enrolment_token::token_hash;
use crate::service::intermediates::Credential;
use crate::service::issuance::{cert_record, issuer_chain, record_issued};
use crate::service::issuer::Issuer;
use crate::service::state::AppState;

/// The profile agent certificates are recorded under.
pub const PROFILE: &str = "agent";

/// Most namespaces one report may name.
pub const MAX_NAMESPACES: usize = 10_000;
/// Most roots one namespace's ConfigMap may be reported to hold.
pub const MAX_ROOTS_PER_NAMESPACE: usize = 16;
/// Namespaces named in a gate's reason (the rest are counted).
const NAMED_LAGGING: usize = 5;

/// How the agent acts in audit records.
pub fn actor(cluster: &str) -> String {
    format!("agent:{cluster}")
}

/// A newly issued agent certificate.
pub struct Issued {
    pub cert: CertInfo,
    /// The issuer, then each parent up to and including the root.
    pub chain: Vec<CertInfo>,
    /// Roots to trust.
    pub roots: Vec<CertInfo>,
}

/// The cluster named in the URL, which is only a claim until the caller has proved otherwise.
pub async fn claimed_cluster(state: &AppState, name: &str) -> Result<ClusterRecord, ServiceError> {
    state
        .store
        .get_cluster(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no such cluster (claimed cluster {name:?})")))
}

/// The agent certificate presented over mTLS (`peer_der`), if it may act for `cluster`: an
/// agent certificate recorded for that cluster (found by SHA-256 fingerprint; TLS only proved
/// the client holds its key) that chains to `tls.client_ca`, unrevoked, unexpired, and the
/// agent's newest or the one it last renewed with (see [`may_act`]).
pub async fn authenticate(
    state: &AppState,
    cluster: &ClusterRecord,
    peer_der: Option<&[u8]>,
) -> Result<CertRecord, ServiceError> {
    let name = &cluster.name;
    let der = peer_der.ok_or_else(|| {
        ServiceError::new(
            ErrorCode::Unauthenticated,
            format!("present the agent certificate of cluster {name} over mTLS (claimed cluster {name:?})"),
        )
    })?;
    let fp = hex::encode(sha2::Sha256::digest(der));
    let rejected = || {
        ServiceError::new(
            ErrorCode::ClientCertificateRejected,
            format!("certificate sha256:{fp} is not an agent certificate of this cluster (claimed cluster {name:?})"),
        )
    };
    if !state.client_chain_ok(der) {
        return Err(rejected());
    }
    let rec = match state.store.get_certificate_by_fingerprint(&fp).await? {
        Some(r) if r.profile == PROFILE && r.cluster.as_deref() == Some(name.as_str()) => r,
        _ => return Err(rejected()),
    };
    let agent = state.store.get_agent(name).await?;
    let successor_revoked = match &agent {
        Some(a) if a.current_serial != rec.serial => {
            state.store.get_certificate(&a.current_serial).await?.is_some_and(|c| c.revoked_at.is_some())
        }
        _ => false,
    };
    may_act(&rec, cluster, agent.as_ref(), successor_revoked, now_secs()).map_err(|e| e.by(actor(name)))?;
    Ok(rec)
}

/// Whether agent certificate `rec` may act for `cluster` now: unrevoked, unexpired, the
/// cluster active and enrolled (a new token retires what the agent held), and the agent's
/// newest certificate, or the one it last renewed with (whose successor may have been lost on
/// the way back) unless that successor is revoked: revoking an agent's newest certificate
/// shuts the agent out until it enrols again.
fn may_act(
    rec: &CertRecord,
    cluster: &ClusterRecord,
    agent: Option<&ca_store::AgentRecord>,
    successor_revoked: bool,
    now: i64,
) -> Result<(), ServiceError> {
    if rec.revoked_at.is_some() {
        return Err(ServiceError::new(
            ErrorCode::ClientCertificateRevoked,
            format!("agent certificate {} is revoked; enrol again with a new enrolment token", rec.serial),
        ));
    }
    if rec.not_after <= now {
        return Err(ServiceError::new(
            ErrorCode::ClientCertificateExpired,
            format!("agent certificate {} has expired; enrol again with a new enrolment token", rec.serial),
        ));
    }
    if !cluster.is_active() {
        return Err(ServiceError::new(
            ErrorCode::ClusterNotActive,
            format!("cluster {} is {}", cluster.name, cluster.status),
        ));
    }
    let serial = rec.serial.as_str();
    match agent {
        _ if cluster.enrolled_at.is_none() => {}
        Some(a) if a.current_serial == serial => return Ok(()),
        Some(a) if a.previous_serial.as_deref() == Some(serial) && !successor_revoked => return Ok(()),
        Some(a) if a.previous_serial.as_deref() == Some(serial) => {
            return Err(ServiceError::new(
                ErrorCode::ClientCertificateRevoked,
                format!(
                    "agent certificate {} was renewed into {}, which is revoked; enrol again with a new enrolment token",
                    rec.serial, a.current_serial
                ),
            ));
        }
        _ => {}
    }
    Err(ServiceError::new(
        ErrorCode::ClientCertificateSuperseded,
        format!(
            "agent certificate {} has been superseded (by a renewal or a new enrolment token); use the newest one or enrol with the new token",
            rec.serial
        ),
    ))
}

enum Caller {
    Enrolment { token_hash: String },
    Renewal { serial: String },
}

/// Enrols (first time, with the cluster's one-time enrolment token) or renews (with an agent
/// certificate that may act for the cluster) an agent certificate for the key of `csr`.
pub async fn issue(
    state: &AppState,
    name: &str,
    credential: Credential<'_>,
    csr: &str,
) -> Result<Issued, ServiceError> {
    let claimed = |e: ServiceError| ServiceError { detail: format!("{} (claimed cluster {name:?})", e.detail), ..e };
    let cluster = claimed_cluster(state, name).await?;
    if !cluster.is_external_ca() {
        return Err(claimed(ServiceError::new(
            ErrorCode::PluginCluster,
            format!(
                "cluster {name} is in plug-in mode: its agent authenticates with the cluster intermediate (/v1/clusters/{name}/intermediate)"
            ),
        )));
    }
    let now = now_secs();
    // The agent's newest certificate before anything is checked or signed, to detect a
    // concurrent renewal under the write lock.
    let newest = state.store.get_agent(name).await?.map(|a| a.current_serial);
    let token_invalid = || {
        ServiceError::new(ErrorCode::EnrolmentTokenInvalid, "the enrolment token is invalid, expired or already used")
    };
    let caller = match credential {
        Credential::Token(token) => {
            let h = token_hash(token);
            let matches = cluster.enrolment_token_hash.as_deref() == Some(h.as_str());
            if cluster.status == ClusterStatus::Pending && matches {
                return Err(ServiceError::new(
                    ErrorCode::ClusterNotActive,
                    "the cluster's registration awaits approval by a second operator",
                )
                .by(actor(name)));
            }
            let usable = cluster.is_active()
                && cluster.enrolled_at.is_none()
                && matches
                && cluster.enrolment_expires_at.is_some_and(|e| e > now);
            if !usable {
                return Err(claimed(token_invalid()));
            }
            Caller::Enrolment { token_hash: h }
        }
        Credential::Certificate(der) => {
            // Refused before the HSM signs anything; checked again under the write lock below.
            let rec = authenticate(state, &cluster, Some(der)).await?;
            Caller::Renewal { serial: rec.serial }
        }
        Credential::None => {
            return Err(claimed(ServiceError::new(
                ErrorCode::Unauthenticated,
                "enrol with the enrolment token (Authorization: Bearer) or renew over mTLS with the agent certificate",
            )));
        }
    };
    let actor = actor(name);
    let deny = |e: ServiceError| e.by(actor.clone());
    let csr = VerifiedCsr::parse(csr.as_bytes()).map_err(|e| deny(crate::service::issuer::map_core(e.into())))?;
    let spki = csr.public_key().spki_der().to_vec();
    crate::service::keys::refuse_blocked(&state.store, &spki).await.map_err(&deny)?;
    let issuer = state.issuer(&cluster.environment)?.clone();
    let request = agent_request(state, &issuer, name, csr.public_key().clone()).map_err(&deny)?;
    let issued = match issuer.with_key(state.hsm_timeout(), move |ca| ca_core::issue::issue(ca, &request)).await {
        Ok(i) => i,
        Err(e) => {
            state.metrics.issued(&issuer.name, PROFILE, "error");
            return Err(deny(e));
        }
    };
    let cert = issued.cert;
    let mut tx = state.store.write().await?;
    // What was checked before signing is checked again under the write lock: a replayed
    // token, a revocation or a new enrolment may have landed meanwhile. The loser's
    // certificate is never recorded nor returned.
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
            let agent = tx.get_agent(name).await?;
            let successor_revoked = match &agent {
                Some(a) if a.current_serial != *serial => {
                    tx.get_certificate(&a.current_serial).await?.is_some_and(|c| c.revoked_at.is_some())
                }
                _ => false,
            };
            may_act(&presented, &current, agent.as_ref(), successor_revoked, now).map_err(&deny)?;
            // Two renewals with the same certificate, signed at once: the first to commit
            // wins, and the other is refused rather than silently superseding it.
            if agent.as_ref().map(|a| &a.current_serial) != newest.as_ref() {
                return Err(deny(ServiceError::new(
                    ErrorCode::RenewalSuperseded,
                    format!(
                        "a concurrent renewal with agent certificate {serial} completed first; this one was not recorded"
                    ),
                )));
            }
            ("renewal", Some(serial.clone()))
        }
    };
    crate::service::keys::refuse_blocked_tx(&mut tx, &spki).await.map_err(&deny)?;
    let record = cert_record(&cert, CertIssuer::Environment(issuer.name.clone()), Some(name), PROFILE, &actor);
    record_issued(&mut tx, &record, &actor, json!({"issuer": issuer.name, "via": via, "renewed_from": renewed_from}))
        .await?;
    tx.set_agent_current(name, &cert.serial, renewed_from.as_deref()).await?;
    tx.commit().await?;
    state.metrics.issued(&issuer.name, PROFILE, "ok");
    Ok(Issued { cert, chain: issuer_chain(&issuer), roots: issuer.roots.clone() })
}

/// The agent certificate's request: `policy.agent_certificate_validity`, never past the issuer.
fn agent_request(
    state: &AppState,
    issuer: &Issuer,
    cluster: &str,
    key: hsm::PublicKey,
) -> Result<CertRequest, ServiceError> {
    let not_before = ca_core::issue::default_not_before();
    let end = issuer.cert.not_after;
    let wanted = state.config.policy.agent_certificate_validity.duration();
    let Fitted { not_after, .. } =
        fit_validity(end, not_before, wanted, Fit::Clamp).unwrap_or(Fitted { not_after: end, clamped: true });
    if not_after <= OffsetDateTime::now_utc() + time::Duration::minutes(5) {
        return Err(ServiceError::new(
            ErrorCode::IssuerExpiring,
            format!("issuer {} expires at {}", issuer.name, ca_core::error::fmt_time(issuer.cert.not_after)),
        ));
    }
    Ok(CertRequest::agent_client(cluster, key, not_before, not_after))
}

/// What an agent reports: namespace → SHA-256 fingerprints of the roots in its
/// `istio-ca-root-cert` (empty: the ConfigMap is missing).
pub type Namespaces = BTreeMap<String, Vec<String>>;

fn is_fingerprint(f: &str) -> bool {
    f.len() == 64 && f.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The report in its stored form (each namespace's roots as a sorted set), or why it is refused.
fn canonical(namespaces: &Namespaces) -> Result<BTreeMap<&str, BTreeSet<&str>>, String> {
    if namespaces.len() > MAX_NAMESPACES {
        return Err(format!("at most {MAX_NAMESPACES} namespaces per report ({} sent)", namespaces.len()));
    }
    let mut out = BTreeMap::new();
    for (ns, roots) in namespaces {
        if !ca_core::names::is_dns1123_label(ns) {
            return Err(format!("{:?} is not a Kubernetes namespace name", crate::edge::cap(ns, 80)));
        }
        if roots.len() > MAX_ROOTS_PER_NAMESPACE {
            return Err(format!("namespace {ns}: at most {MAX_ROOTS_PER_NAMESPACE} roots ({} sent)", roots.len()));
        }
        if let Some(bad) = roots.iter().find(|f| !is_fingerprint(f)) {
            return Err(format!(
                "namespace {ns}: {:?} is not a lowercase hex SHA-256 fingerprint",
                crate::edge::cap(bad, 80)
            ));
        }
        out.insert(ns.as_str(), roots.iter().map(String::as_str).collect());
    }
    Ok(out)
}

/// What the agent should do after its report.
pub struct Advice {
    /// The bundle every namespace should hold now.
    pub roots: Vec<CertInfo>,
    /// Why the agent should renew its certificate now, if it should.
    pub renew_because: Option<String>,
}

/// The agent of `cluster` (authenticated with `presented`) reports its namespaces' bundles,
/// and learns the bundle every namespace should hold and whether to renew now. Stored (and
/// audited) only when it changed.
pub async fn report_namespaces(
    state: &AppState,
    cluster: &ClusterRecord,
    presented: &CertRecord,
    namespaces: &Namespaces,
) -> Result<Advice, ServiceError> {
    let name = &cluster.name;
    let actor = actor(name);
    let report = canonical(namespaces).map_err(|d| ServiceError::new(ErrorCode::InvalidReport, d).by(actor.clone()))?;
    let issuer = state.issuer(&cluster.environment)?;
    let stored = serde_json::to_string(&report).map_err(ServiceError::internal)?;
    // A report that repeats the stored one tells the gates nothing new: not written, so that
    // repeated reports cost no write lock.
    let previous = state.store.get_namespace_report(name).await?;
    if previous.as_ref().is_none_or(|p| p.namespaces != stored) {
        let current: BTreeSet<String> = issuer.roots.iter().map(CertInfo::fingerprint).collect();
        let lagging: Vec<&str> = report
            .iter()
            .filter(|(_, roots)| roots.len() != current.len() || !roots.iter().all(|f| current.contains(*f)))
            .map(|(ns, _)| *ns)
            .collect();
        // The namespaces are counted, not listed: a report may name ten thousand of them.
        let details = json!({"namespaces": report.len(), "lagging": lagging.len(),
                             "lagging_named": lagging.iter().take(NAMED_LAGGING).collect::<Vec<_>>()});
        let mut tx = state.store.write().await?;
        tx.put_namespace_report(&ca_store::NamespaceReport {
            cluster: name.clone(),
            namespaces: stored,
            reported_at: now_secs(),
        })
        .await?;
        tx.audit(AuditEvent::new(actor, "cluster.namespace_report", name, details)).await?;
        tx.commit().await?;
    }
    // An environment rotation moves the environment to a new key: an agent certificate from
    // the old one stops chaining once the rotation ends, so the agent moves over now.
    let renew_because = (!crate::service::rotation_record::pem_cert(&presented.pem)
        .is_ok_and(|c| c.issued_by(&issuer.cert)))
    .then(|| format!("the agent certificate was not issued by {}'s current certificate; renew now", issuer.name));
    Ok(Advice { roots: issuer.roots.clone(), renew_because })
}

/// What the gate sees of an external-CA cluster's namespaces: `None` when the cluster has no
/// agent (never enrolled one, and no report), else its last report judged against `bundle`.
pub fn namespace_bundles(
    cluster: &ClusterRecord,
    report: Option<&ca_store::NamespaceReport>,
    bundle: &BTreeSet<String>,
) -> Result<Option<ca_core::rotation::NamespaceBundles>, ServiceError> {
    let Some(report) = report else {
        return Ok(cluster.enrolled_at.map(|_| ca_core::rotation::NamespaceBundles::default()));
    };
    let namespaces: BTreeMap<String, BTreeSet<String>> =
        serde_json::from_str(&report.namespaces).map_err(ServiceError::internal)?;
    let lagging: Vec<&String> = namespaces.iter().filter(|(_, roots)| *roots != bundle).map(|(ns, _)| ns).collect();
    Ok(Some(ca_core::rotation::NamespaceBundles {
        reported_at: Some(report.reported_at),
        reported: namespaces.len(),
        lagging: lagging.iter().take(NAMED_LAGGING).map(|s| s.to_string()).collect(),
        lagging_total: lagging.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_checked_and_stored_in_one_form() {
        let fp = "ab".repeat(32);
        let mut n = Namespaces::new();
        n.insert("default".into(), vec![fp.clone(), fp.clone()]);
        n.insert("empty".into(), vec![]);
        let c = canonical(&n).unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), format!(r#"{{"default":["{fp}"],"empty":[]}}"#));
        for (ns, roots, why) in [
            ("Default", vec![fp.clone()], "namespace name"),
            ("a.b", vec![], "namespace name"),
            ("ok", vec![fp.to_uppercase()], "fingerprint"),
            ("ok", vec!["ab".into()], "fingerprint"),
            ("ok", vec![fp.clone(); 17], "at most 16"),
        ] {
            let mut n = Namespaces::new();
            n.insert(ns.into(), roots);
            let e = canonical(&n).unwrap_err();
            assert!(e.contains(why), "{ns}: {e}");
        }
        let many: Namespaces = (0..=MAX_NAMESPACES).map(|i| (format!("ns-{i}"), vec![])).collect();
        assert!(canonical(&many).unwrap_err().contains("at most 10000 namespaces"));
    }
}
