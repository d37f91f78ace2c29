//! A rotation as stored: its record and its plan (`Spec`, JSON in `rotations.spec`), parsed,
//! and the reads other services make of it (which clusters it covers, what they must have
//! caught up with). The stage logic that acts on rotations is `rotation`.

use std::collections::BTreeMap;

use ca_core::cert::CertInfo;
use ca_core::rotation::{RotationKind, Stage};
use ca_store::{ClusterRecord, RotationRecord};
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ServiceError};
use crate::service::state::AppState;

/// The plan of one rotation, stored as JSON in `rotations.spec`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spec {
    /// Root rotation: the old and the new root (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_root: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_root: Option<String>,
    /// Root and environment rotations: each environment's old and new certificate.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvPlan>,
    /// Cluster rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterPlan>,
    /// When each stage was last entered.
    #[serde(default)]
    pub entered: BTreeMap<String, i64>,
    /// When bundles last changed, and when chains last changed: what clusters must have
    /// caught up with since.
    #[serde(default)]
    pub bundle_changed_at: i64,
    #[serde(default)]
    pub chain_changed_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_until: Option<i64>,
    #[serde(default)]
    pub history: Vec<Transition>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnvPlan {
    pub old_certificate: String,
    pub old_chain: Vec<String>,
    pub old_key: String,
    /// Root rotation: the environment re-signed under the new root (uploaded during the
    /// rotation). Environment rotation: the new intermediate (given at the start).
    #[serde(default)]
    pub new_certificate: Option<String>,
    #[serde(default)]
    pub new_chain: Vec<String>,
    pub new_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterPlan {
    pub external_ca: bool,
    /// External-CA: the server-held key before and after.
    pub old_key: Option<String>,
    pub new_key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transition {
    pub from: String,
    pub to: String,
    pub at: i64,
    pub requested_by: String,
    pub approved_by: String,
}

pub struct Rotation {
    pub rec: RotationRecord,
    pub kind: RotationKind,
    pub stage: Stage,
    pub spec: Spec,
}

impl Rotation {
    pub fn parse(rec: RotationRecord) -> Result<Rotation, ServiceError> {
        let corrupt = |e: String| ServiceError::internal(format!("rotation {}: {e}", rec.id));
        let kind = rec.kind.parse().map_err(corrupt)?;
        let stage = rec.stage.parse().map_err(corrupt)?;
        let spec = serde_json::from_str(&rec.spec).map_err(|e| corrupt(e.to_string()))?;
        Ok(Rotation { rec, kind, stage, spec })
    }

    pub fn covers_env(&self, env: &str) -> bool {
        self.kind != RotationKind::Cluster && self.spec.environments.contains_key(env)
    }

    pub fn covers_cluster(&self, c: &ClusterRecord) -> bool {
        match self.kind {
            RotationKind::Cluster => self.rec.target == c.name,
            _ => self.covers_env(&c.environment),
        }
    }

    /// Two active rotations may not touch the same issuer or cluster.
    pub fn overlaps(&self, other: &Rotation, clusters: &[ClusterRecord]) -> bool {
        let env_of = |name: &str| clusters.iter().find(|c| c.name == name).map(|c| c.environment.clone());
        match (self.kind, other.kind) {
            (RotationKind::Root, _) | (_, RotationKind::Root) => true,
            (RotationKind::Environment, RotationKind::Environment) => self.rec.target == other.rec.target,
            (RotationKind::Cluster, RotationKind::Cluster) => self.rec.target == other.rec.target,
            (RotationKind::Environment, RotationKind::Cluster) => {
                env_of(&other.rec.target).as_deref() == Some(self.rec.target.as_str())
            }
            (RotationKind::Cluster, RotationKind::Environment) => {
                env_of(&self.rec.target).as_deref() == Some(other.rec.target.as_str())
            }
        }
    }
}

pub fn pem_cert(pem: &str) -> Result<CertInfo, ServiceError> {
    let certs = ca_core::cert::parse_certs(pem.as_bytes(), "certificate")
        .map_err(|e| ServiceError::new(ErrorCode::InvalidCertificate, e.to_string()))?;
    let [cert] = <[CertInfo; 1]>::try_from(certs)
        .map_err(|_| ServiceError::new(ErrorCode::InvalidCertificate, "expected exactly one PEM certificate"))?;
    Ok(cert)
}

pub fn pem_certs(pems: &[String]) -> Result<Vec<CertInfo>, ServiceError> {
    pems.iter().map(|p| pem_cert(p)).collect()
}

/// A rotation by id.
pub async fn load(state: &AppState, id: &str) -> Result<Rotation, ServiceError> {
    Rotation::parse(
        state.store.get_rotation(id).await?.ok_or_else(|| ServiceError::not_found(format!("no rotation {id:?}")))?,
    )
}

/// Every rotation, newest first.
pub async fn list(state: &AppState) -> Result<Vec<RotationRecord>, ServiceError> {
    Ok(state.store.list_rotations(false).await?)
}

pub async fn all_rotations(state: &AppState) -> Result<Vec<Rotation>, ServiceError> {
    state.store.list_rotations(false).await?.into_iter().map(Rotation::parse).collect()
}

/// When the bundle, and when the chain, a cluster should hold last changed (0: never): an
/// intermediate issued before the chain changed is renewed.
pub async fn changed_at(state: &AppState, cluster: &ClusterRecord) -> Result<(i64, i64), ServiceError> {
    let rotations = all_rotations(state).await?;
    let mine = rotations.iter().filter(|r| r.covers_cluster(cluster));
    Ok(mine.fold((0, 0), |(b, c), r| (b.max(r.spec.bundle_changed_at), c.max(r.spec.chain_changed_at))))
}
