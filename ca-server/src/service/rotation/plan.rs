//! Starting a rotation: the plan made from what is current when it is asked for (checked
//! again at approval), and a root rotation's re-signed environment certificates.

use std::collections::BTreeMap;

use ca_core::cert::CertInfo;
use ca_core::rotation::{RotationKind, Stage};
use ca_store::{AuditEvent, RotationRecord, now_secs};
use serde_json::json;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::approval_kind::{Approval, StartRotation};
use crate::service::issuer::Issuer;
use crate::service::rotation_record::{ClusterPlan, EnvPlan, Rotation, Spec, pem_cert};
use crate::service::state::AppState;

/// What an operator asks a rotation to do; which fields apply depends on `kind`.
#[derive(Clone, Debug, Default)]
pub struct StartInput {
    /// `root`, `environment` or `cluster`.
    pub kind: String,
    /// root: the new root certificate (PEM, made in a ceremony).
    pub new_root: Option<String>,
    /// root: SHA-256 of the root being replaced (default: the only root in use).
    pub old_root: Option<String>,
    /// environment: which one.
    pub environment: Option<String>,
    /// environment: the new intermediate (PEM), signed by the same root.
    pub certificate: Option<String>,
    /// environment: its key. cluster (external-CA): the new server-held key.
    pub key: Option<String>,
    /// cluster: which one.
    pub cluster: Option<String>,
}

/// A start asked for, waiting for a second operator.
pub struct StartRequest {
    pub rotation: String,
    pub request_id: String,
}

fn bad(code: ErrorCode, detail: impl Into<String>) -> ServiceError {
    ServiceError::new(code, detail)
}

fn plan_from(issuer: &Issuer) -> EnvPlan {
    EnvPlan {
        old_certificate: issuer.cert.pem(),
        old_chain: issuer.chain.iter().map(CertInfo::pem).collect(),
        old_key: issuer.key_ref.to_string(),
        new_certificate: None,
        new_chain: vec![],
        new_key: issuer.key_ref.to_string(),
    }
}

/// Checks a root rotation's re-signed environment certificate: the environment's own subject
/// and key, under the new root, a CA valid now.
fn check_resigned(issuer: &CertInfo, new_root: &CertInfo, cert: &CertInfo) -> Result<(), ServiceError> {
    if cert.subject_raw != issuer.subject_raw || cert.spki_der != issuer.spki_der {
        return Err(bad(
            ErrorCode::InvalidCertificate,
            "the certificate must have the environment's subject and key (a cross-signature)",
        ));
    }
    if !cert.is_ca || !cert.key_cert_sign || cert.path_len.is_some_and(|p| p < 1) {
        return Err(bad(
            ErrorCode::InvalidCertificate,
            "the certificate must be a CA that may sign cluster CAs (pathLen ≥ 1)",
        ));
    }
    let (had, has) = (issuer.trust_domains(), cert.trust_domains());
    if let Some(td) = had.iter().find(|t| !has.contains(t)) {
        return Err(bad(
            ErrorCode::InvalidCertificate,
            format!("the certificate does not carry the environment's trust domain {td}"),
        ));
    }
    ca_core::chain::verify_chain(cert, &[], std::slice::from_ref(new_root), time::OffsetDateTime::now_utc()).map_err(
        |e| bad(ErrorCode::InvalidCertificate, format!("the certificate does not chain to the new root: {e}")),
    )?;
    Ok(())
}

/// Asks to start a rotation: checks what it replaces, makes its plan and records an approval
/// request. The rotation exists once a second operator approves (`approve_start`).
pub async fn start(state: &AppState, op: &Operator, req: StartInput) -> Result<StartRequest, ServiceError> {
    let deny = |e: ServiceError| e.by(op.actor());
    let kind: RotationKind = req.kind.parse().map_err(|e: String| deny(bad(ErrorCode::InvalidKind, e)))?;
    let now = now_secs();
    let mut spec = Spec::default();
    let clusters = state.store.list_clusters().await?;
    let target = match kind {
        RotationKind::Root => {
            let pem = req
                .new_root
                .as_deref()
                .ok_or_else(|| deny(bad(ErrorCode::InvalidRoot, "new_root (PEM) is required")))?;
            let new_root = pem_cert(pem).map_err(deny)?;
            let self_signed =
                new_root.is_self_issued() && new_root.public_key().is_ok_and(|k| new_root.verify_signed_by(&k).is_ok());
            let t = time::OffsetDateTime::now_utc();
            if !self_signed
                || !new_root.is_ca
                || !new_root.key_cert_sign
                || new_root.not_before > t
                || new_root.not_after <= t
            {
                return Err(deny(bad(
                    ErrorCode::InvalidRoot,
                    "new_root must be a self-signed CA certificate valid now",
                )));
            }
            let in_use: BTreeMap<String, CertInfo> =
                state.issuers.all().iter().flat_map(|i| i.roots.clone()).map(|c| (c.fingerprint(), c)).collect();
            let old_fp = match &req.old_root {
                Some(f) => f.to_ascii_lowercase().replace(':', ""),
                None if in_use.len() == 1 => in_use.keys().next().cloned().unwrap_or_default(),
                None => {
                    return Err(deny(bad(
                        ErrorCode::InvalidRoot,
                        "several roots are in use: name the one to replace (old_root, its SHA-256)",
                    )));
                }
            };
            let old_root = in_use.get(&old_fp).ok_or_else(|| {
                deny(bad(ErrorCode::InvalidRoot, format!("no issuer uses a root with SHA-256 {old_fp}")))
            })?;
            if old_root.fingerprint() == new_root.fingerprint() {
                return Err(deny(bad(ErrorCode::InvalidRoot, "the new root is the old root")));
            }
            for issuer in state.issuers.all().iter().filter(|i| i.roots.iter().any(|r| r.fingerprint() == old_fp)) {
                spec.environments.insert(issuer.name.clone(), plan_from(issuer));
            }
            spec.old_root = Some(old_root.pem());
            spec.new_root = Some(new_root.pem());
            old_fp
        }
        RotationKind::Environment => {
            let env = req
                .environment
                .clone()
                .ok_or_else(|| deny(bad(ErrorCode::InvalidEnvironment, "environment is required")))?;
            let issuer = state.issuers.get(&env).ok_or_else(|| {
                deny(bad(ErrorCode::UnknownEnvironment, format!("no environment {env:?} is served here")))
            })?;
            let cert = pem_cert(
                req.certificate
                    .as_deref()
                    .ok_or_else(|| deny(bad(ErrorCode::InvalidCertificate, "certificate (PEM) is required")))?,
            )
            .map_err(deny)?;
            let key_str = req.key.clone().ok_or_else(|| {
                deny(bad(ErrorCode::InvalidKey, "key (the new intermediate's key reference) is required"))
            })?;
            let key: hsm::KeyRef =
                key_str.parse().map_err(|e: hsm::HsmError| deny(bad(ErrorCode::InvalidKey, e.to_string())))?;
            if cert.spki_der == issuer.cert.spki_der {
                return Err(deny(bad(ErrorCode::InvalidCertificate, "the new intermediate must have a new key")));
            }
            if !cert.is_ca || !cert.key_cert_sign || cert.path_len.is_some_and(|p| p < 1) {
                return Err(deny(bad(
                    ErrorCode::InvalidCertificate,
                    "the new intermediate must be a CA that may sign cluster CAs (pathLen ≥ 1)",
                )));
            }
            let intermediates: Vec<CertInfo> = issuer.chain.iter().filter(|c| !c.is_self_issued()).cloned().collect();
            ca_core::chain::verify_chain(&cert, &intermediates, &issuer.roots, time::OffsetDateTime::now_utc())
                .map_err(|e| {
                    deny(bad(
                        ErrorCode::InvalidCertificate,
                        format!("the new intermediate does not chain to the environment's root: {e}"),
                    ))
                })?;
            let served = cert.trust_domains();
            if let Some(c) = clusters.iter().find(|c| {
                c.environment == env && c.is_active() && !served.is_empty() && !served.contains(&c.trust_domain)
            }) {
                return Err(deny(bad(
                    ErrorCode::InvalidCertificate,
                    format!("the new intermediate does not cover cluster {}'s trust domain {}", c.name, c.trust_domain),
                )));
            }
            let public = crate::service::keys::check_new_key(state, &key).await.map_err(deny)?;
            if public.spki_der() != cert.spki_der {
                return Err(deny(bad(ErrorCode::InvalidKey, "the key does not match the new intermediate")));
            }
            let mut plan = plan_from(&issuer);
            plan.new_certificate = Some(cert.pem());
            plan.new_chain = issuer.chain.iter().map(CertInfo::pem).collect();
            plan.new_key = key.to_string();
            spec.environments.insert(env.clone(), plan);
            env
        }
        RotationKind::Cluster => {
            let name =
                req.cluster.clone().ok_or_else(|| deny(bad(ErrorCode::InvalidCluster, "cluster is required")))?;
            let c =
                clusters.iter().find(|c| c.name == name && c.is_active() && c.current_serial.is_some()).ok_or_else(
                    || deny(bad(ErrorCode::UnknownCluster, format!("no active cluster {name:?} with an intermediate"))),
                )?;
            let new_key = match (c.is_external_ca(), &req.key) {
                (true, Some(k)) => {
                    let key: hsm::KeyRef =
                        k.parse().map_err(|e: hsm::HsmError| deny(bad(ErrorCode::InvalidKey, e.to_string())))?;
                    crate::service::keys::check_new_key(state, &key).await.map_err(deny)?;
                    Some(key.to_string())
                }
                (true, None) => {
                    return Err(deny(bad(
                        ErrorCode::InvalidKey,
                        "an external-CA cluster needs its new server-side key (key)",
                    )));
                }
                (false, Some(_)) => {
                    return Err(deny(bad(
                        ErrorCode::InvalidKey,
                        "a plug-in cluster makes its own new key when it renews; key is for external-ca clusters",
                    )));
                }
                (false, None) => None,
            };
            spec.cluster = Some(ClusterPlan { external_ca: c.is_external_ca(), old_key: c.key_ref.clone(), new_key });
            name
        }
    };
    if kind != RotationKind::Root && req.new_root.is_some() {
        return Err(deny(bad(ErrorCode::InvalidRoot, "new_root is for root rotations")));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let candidate = Rotation {
        rec: RotationRecord {
            id: id.clone(),
            kind: kind.to_string(),
            target: target.clone(),
            stage: Stage::Prepared.to_string(),
            spec: String::new(),
            created_by: op.name.clone(),
            created_at: now,
            updated_at: now,
        },
        kind,
        stage: Stage::Prepared,
        spec,
    };
    for other in state.store.list_rotations(true).await?.into_iter().map(Rotation::parse) {
        let other = other?;
        if candidate.overlaps(&other, &clusters) {
            return Err(deny(ServiceError::new(
                ErrorCode::RotationInProgress,
                format!(
                    "rotation {} ({} {}) is in progress at stage {}",
                    other.rec.id, other.kind, other.rec.target, other.stage
                ),
            )));
        }
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    let spec = serde_json::to_value(&candidate.spec).map_err(ServiceError::internal)?;
    let approval = Approval::StartRotation(StartRotation { rotation: id.clone(), kind, target: target.clone(), spec });
    let mut tx = state.store.write().await?;
    tx.insert_request(&approval.request(&request_id, &id, &op.name, now)).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "rotation.start.requested",
        &id,
        json!({"request_id": request_id, "kind": kind, "target": target}),
    ))
    .await?;
    tx.commit().await?;
    Ok(StartRequest { rotation: id, request_id })
}

/// Root rotation: records an environment's certificate under the new root (from the
/// cross-sign ceremony). Checked, not trusted: same subject and key, chains to the new root.
/// Returns the rotation as updated, and the time it was updated at.
pub async fn add_certificate(
    state: &AppState,
    op: &Operator,
    id: &str,
    environment: &str,
    certificate: &str,
) -> Result<(Rotation, i64), ServiceError> {
    let deny = |e: ServiceError| e.by(op.actor());
    let mut tx = state.store.write().await?;
    let mut r = Rotation::parse(
        tx.get_rotation(id).await?.ok_or_else(|| deny(ServiceError::not_found(format!("no rotation {id:?}"))))?,
    )?;
    // A certificate for a rotation that does not exist is a 404 whatever the certificate.
    let cert = pem_cert(certificate).map_err(deny)?;
    if r.kind != RotationKind::Root || !matches!(r.stage, Stage::Prepared | Stage::Distribute) {
        return Err(deny(ServiceError::new(
            ErrorCode::RotationStage,
            format!(
                "certificates are added to a root rotation before reissue; this is a {} rotation at {}",
                r.kind, r.stage
            ),
        )));
    }
    let new_root = pem_cert(r.spec.new_root.as_deref().unwrap_or_default())?;
    let plan = r.spec.environments.get_mut(environment).ok_or_else(|| {
        deny(bad(ErrorCode::UnknownEnvironment, format!("environment {:?} is not part of this rotation", environment)))
    })?;
    check_resigned(&pem_cert(&plan.old_certificate)?, &new_root, &cert).map_err(deny)?;
    plan.new_certificate = Some(cert.pem());
    plan.new_chain = vec![new_root.pem()];
    let now = now_secs();
    let spec = serde_json::to_string(&r.spec).map_err(ServiceError::internal)?;
    let stage = r.stage.to_string();
    if !tx.update_rotation(id, &stage, &stage, &spec, now).await? {
        return Err(deny(ServiceError::new(ErrorCode::RotationStage, "the rotation changed meanwhile; try again")));
    }
    tx.audit(AuditEvent::new(
        op.actor(),
        "rotation.certificate.added",
        id,
        json!({"environment": environment, "serial": cert.serial, "sha256_fingerprint": cert.fingerprint()}),
    ))
    .await?;
    tx.commit().await?;
    r.rec.spec = spec;
    Ok((r, now))
}
