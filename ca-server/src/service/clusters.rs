//! Cluster registration and enrolment tokens: a registration or a new token is a request that a
//! second operator approves (`service::approvals`); reads say whether an external-CA cluster
//! stopped on a compromised key.

use base64::Engine;
use ca_store::{ApprovalRequest, AuditEvent, ClusterMode, ClusterRecord, ClusterStatus, now_secs};
use serde_json::json;
use sha2::Digest;

use crate::auth::Operator;
use crate::error::{ErrorCode, ServiceError};
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
}

/// A request waiting for a second operator, with the enrolment token it will arm (plug-in
/// clusters only).
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

/// Lowercase letters, digits and '-', at most 63, not starting or ending with '-' (also the
/// rule for Kubernetes namespaces).
pub fn valid_cluster_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// 256 random bits; the `pet_` prefix makes leaked tokens easy to spot in scanners.
fn new_token() -> String {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    format!("pet_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// Whether an external-CA cluster stopped on a compromised key.
async fn info(state: &AppState, c: ClusterRecord) -> Result<ClusterInfo, ServiceError> {
    let mut compromised = false;
    if let (true, Some(serial)) = (c.is_external_ca(), &c.current_serial)
        && let Some(cert) = state.store.get_certificate(serial).await?
    {
        compromised = crate::service::external_ca::current_key_blocked(state, &cert).await?.is_some();
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
    if !valid_cluster_name(&req.name) {
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
    let now = now_secs();
    // A plug-in cluster enrols with a one-time token; an external-CA cluster has nothing to
    // enrol: the server issues its intermediate on approval.
    let token = (!external).then(new_token);
    let expires = (!external).then(|| now + state.config.policy.enrolment_token_ttl.duration().whole_seconds());
    let request_id = uuid::Uuid::new_v4().to_string();
    let payload = json!({"name": req.name, "environment": req.environment, "trust_domain": td.to_string(),
                         "mode": mode, "key": key_ref});
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
    tx.insert_request(&ApprovalRequest::pending(&request_id, "register-cluster", &req.name, &payload, &op.name, now))
        .await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "cluster.register.requested",
        &req.name,
        json!({"request_id": request_id, "cluster": payload}),
    ))
    .await?;
    tx.commit().await?;
    Ok(Requested { cluster: req.name, request_id, enrolment_token: token, enrolment_expires_at: expires })
}

/// Asks for a new one-time enrolment token for an existing plug-in cluster. Takes effect when
/// a different operator approves.
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
    if cluster.is_external_ca() {
        return Err(ServiceError::new(
            ErrorCode::ExternalCaCluster,
            format!("cluster {name} is in external-ca mode: the server holds its key, nothing enrols"),
        )
        .by(op.actor()));
    }
    let now = now_secs();
    let token = new_token();
    let expires = now + state.config.policy.enrolment_token_ttl.duration().whole_seconds();
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut tx = state.store.write().await?;
    tx.insert_request(&ApprovalRequest::pending(
        &request_id,
        "reissue-enrolment",
        name,
        &json!({"token_hash": token_hash(&token), "expires_at": expires}),
        &op.name,
        now,
    ))
    .await?;
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
