//! Cluster registration and enrolment tokens: a registration or a new token is a request that a
//! second operator approves (`service::approvals`); reads say whether an external-CA cluster
//! stopped on a compromised key.

use ca_store::{ApprovalRequest, AuditEvent, ClusterMode, ClusterRecord, ClusterStatus, Tx, now_secs};
use serde_json::json;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
use crate::service::approval_kind::{Approval, RegisterCluster, ReissueEnrolment};
use crate::service::enrolment_token::{new_token, token_hash};
use crate::service::state::AppState;

/// What an operator asks to register.
pub struct Registration {
    pub name: String,
    pub environment: String,
    pub trust_domain: String,
    /// `plugin` when absent.
    pub mode: Option<String>,
    /// The server-side key (external-CA mode only).
    pub key: Option<String>,
    /// The Istio settings (external-CA mode only, and required there), as sent.
    pub istio: Option<serde_json::Value>,
}

/// A request waiting for a second operator, with the enrolment token it will arm (a plug-in
/// cluster's intermediate, or an external-CA cluster's agent, enrols with it).
pub struct Requested {
    pub cluster: String,
    pub request_id: String,
    pub enrolment_token: Option<String>,
    pub enrolment_expires_at: Option<i64>,
}

/// A cluster as an operator sees it.
pub struct ClusterInfo {
    pub record: ClusterRecord,
    /// external-CA: the key of its newest intermediate was revoked for compromise.
    pub key_compromised: bool,
}

/// Whether an external-CA cluster stopped on a compromised key.
async fn info(state: &AppState, c: ClusterRecord) -> Result<ClusterInfo, ServiceError> {
    let mut compromised = false;
    if let (true, Some(serial)) = (c.is_external_ca(), &c.current_serial)
        && let Some(cert) = state.store.get_certificate(serial).await?
    {
        compromised = crate::service::cluster_ca::current_key_blocked(state, &cert).await?.is_some();
    }
    Ok(ClusterInfo { record: c, key_compromised: compromised })
}

pub async fn list(state: &AppState) -> Result<Vec<ClusterInfo>, ServiceError> {
    let mut out = Vec::new();
    for c in state.store.list_clusters().await? {
        out.push(info(state, c).await?);
    }
    Ok(out)
}

pub async fn get(state: &AppState, op: &Operator, name: &str) -> Result<ClusterInfo, ServiceError> {
    let c = state
        .store
        .get_cluster(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no cluster {name:?}")).by(op.actor()))?;
    info(state, c).await
}

/// Registers a cluster. Takes effect when a different operator approves the request.
pub async fn register(state: &AppState, op: &Operator, req: Registration) -> Result<Requested, ServiceError> {
    if !ca_core::names::is_cluster_name(&req.name) {
        return Err(ServiceError::new(
            ErrorCode::InvalidName,
            "cluster names use lowercase letters, digits and '-' (at most 63)",
        )
        .by(op.actor()));
    }
    let issuer = state.issuers.get(&req.environment).ok_or_else(|| {
        ServiceError::new(ErrorCode::UnknownEnvironment, format!("no environment {:?} is served here", req.environment))
            .by(op.actor())
    })?;
    let td: ca_core::names::TrustDomain = req
        .trust_domain
        .parse()
        .map_err(|e| ServiceError::new(ErrorCode::InvalidTrustDomain, format!("{e}")).by(op.actor()))?;
    let served = issuer.trust_domains();
    if !served.is_empty() && !served.contains(&td.to_string()) {
        return Err(ServiceError::new(
            ErrorCode::InvalidTrustDomain,
            format!("environment {} serves {}, not {td}", issuer.name, served.join(", ")),
        )
        .by(op.actor()));
    }
    let mode = match req.mode.as_deref().map(str::parse::<ClusterMode>).transpose() {
        Ok(mode) => mode.unwrap_or(ClusterMode::Plugin),
        Err(e) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidMode,
                format!("mode {:?} is not plugin or external-ca", e.value),
            )
            .by(op.actor()));
        }
    };
    let external = mode == ClusterMode::ExternalCa;
    let key_ref = match (&req.key, external) {
        (Some(k), true) => {
            let key = k
                .parse::<hsm::KeyRef>()
                .map_err(|e| ServiceError::new(ErrorCode::InvalidKey, e.to_string()).by(op.actor()))?;
            // The same checks as a rotation's new key: a configured module, no key in use
            // here (by public key), not blocked.
            crate::service::keys::check_new_key(state, &key).await.map_err(|e| e.by(op.actor()))?;
            Some(key.to_string())
        }
        (None, true) => {
            return Err(ServiceError::new(ErrorCode::InvalidKey, "external-ca mode needs the server-side key (key)")
                .by(op.actor()));
        }
        (Some(_), false) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidKey,
                "a plug-in cluster holds its own key; key is for external-ca mode only",
            )
            .by(op.actor()));
        }
        (None, false) => None,
    };
    let istio = match (req.istio, external) {
        (Some(v), true) => Some(crate::service::cluster_settings::parse(v).map_err(|e| e.by(op.actor()))?),
        (None, true) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidSettings,
                "external-ca mode needs the cluster's Istio settings (istio, with at least sa_issuer)",
            )
            .by(op.actor()));
        }
        (Some(_), false) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidSettings,
                "istio settings are for external-ca mode only: a plug-in cluster's istiod applies its own",
            )
            .by(op.actor()));
        }
        (None, false) => None,
    };
    let now = now_secs();
    // A one-time token enrols what runs in the cluster: a plug-in cluster's intermediate, or
    // an external-CA cluster's agent (whose intermediate the server issues on approval).
    let token = Some(new_token());
    let expires = Some(now + state.config.policy.enrolment_token_ttl.duration().whole_seconds());
    let request_id = uuid::Uuid::new_v4().to_string();
    let payload = RegisterCluster {
        name: req.name.clone(),
        environment: req.environment.clone(),
        trust_domain: td.to_string(),
        mode,
        key: key_ref.clone(),
        istio,
    };
    let mut tx = state.store.write().await?;
    tx.insert_cluster(&ClusterRecord {
        name: req.name.clone(),
        environment: req.environment.clone(),
        trust_domain: td.to_string(),
        status: ClusterStatus::Pending,
        request_id: request_id.clone(),
        enrolment_token_hash: token.as_deref().map(token_hash),
        enrolment_expires_at: expires,
        enrolled_at: None,
        created_by: op.name.clone(),
        created_at: now,
        current_serial: None,
        previous_serial: None,
        mode,
        key_ref,
    })
    .await
    .map_err(|e| ServiceError::from(e).by(op.actor()))?;
    tx.insert_request(&Approval::RegisterCluster(payload.clone()).request(&request_id, &req.name, &op.name, now))
        .await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "cluster.register.requested",
        &req.name,
        json!({"request_id": request_id, "cluster": audit_view(&payload)}),
    ))
    .await?;
    tx.commit().await?;
    Ok(Requested { cluster: req.name, request_id, enrolment_token: token, enrolment_expires_at: expires })
}

/// Asks for a new one-time enrolment token for an existing cluster (for its intermediate, or
/// an external-CA cluster's agent). Takes effect when a different operator approves.
pub async fn reissue_enrolment(state: &AppState, op: &Operator, name: &str) -> Result<Requested, ServiceError> {
    let cluster = state
        .store
        .get_cluster(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no cluster {name:?}")).by(op.actor()))?;
    if !cluster.is_active() {
        return Err(ServiceError::new(ErrorCode::ClusterNotActive, format!("cluster {name} is {}", cluster.status))
            .by(op.actor()));
    }
    let now = now_secs();
    let token = new_token();
    let expires = now + state.config.policy.enrolment_token_ttl.duration().whole_seconds();
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut tx = state.store.write().await?;
    let approval = Approval::ReissueEnrolment(ReissueEnrolment { token_hash: token_hash(&token), expires_at: expires });
    tx.insert_request(&approval.request(&request_id, name, &op.name, now)).await?;
    tx.audit(AuditEvent::new(op.actor(), "cluster.enrolment.requested", name, json!({"request_id": request_id})))
        .await?;
    tx.commit().await?;
    Ok(Requested {
        cluster: name.to_string(),
        request_id,
        enrolment_token: Some(token),
        enrolment_expires_at: Some(expires),
    })
}

/// An approved registration: the cluster is active from now on. True when the server now owes
/// it an intermediate (external-CA mode).
pub async fn approve_registration(
    tx: &mut Tx,
    op: &Operator,
    req: &ApprovalRequest,
    payload: RegisterCluster,
) -> Result<bool, ServiceError> {
    tx.set_cluster_status(&req.subject, ClusterStatus::Active).await?;
    let external = payload.mode == ClusterMode::ExternalCa;
    if let Some(settings) = &payload.istio {
        crate::service::cluster_settings::store_new(
            tx,
            &req.subject,
            settings,
            crate::service::cluster_settings::SOURCE_REGISTRATION,
            &op.actor(),
        )
        .await?;
    }
    let details = audit_view(&payload);
    tx.audit(AuditEvent::new(op.actor(), "cluster.registered", &req.subject, details)).await?;
    Ok(external)
}

/// A registration as audit records show it: the settings' JWKS reduced to its key ids.
fn audit_view(p: &RegisterCluster) -> serde_json::Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    if let Some(s) = &p.istio {
        v["istio"] = crate::service::cluster_settings::audit_view(s);
    }
    v
}

pub async fn reject_registration(tx: &mut Tx, req: &ApprovalRequest) -> Result<(), ServiceError> {
    Ok(tx.set_cluster_status(&req.subject, ClusterStatus::Rejected).await?)
}

/// An approved re-enrolment: the new token replaces whatever the cluster enrolled with.
pub async fn approve_reissue(
    tx: &mut Tx,
    op: &Operator,
    req: &ApprovalRequest,
    ReissueEnrolment { token_hash, expires_at }: ReissueEnrolment,
) -> Result<(), ServiceError> {
    if !tx.rearm_enrolment(&req.subject, &token_hash, expires_at).await? {
        return Err(ServiceError::new(ErrorCode::ClusterNotActive, format!("cluster {} is not active", req.subject))
            .by(op.actor()));
    }
    tx.audit(AuditEvent::new(
        op.actor(),
        "cluster.enrolment.reissued",
        &req.subject,
        json!({"expires_at": expires_at}),
    ))
    .await?;
    Ok(())
}
