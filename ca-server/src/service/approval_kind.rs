//! What a two-person-rule request asks for: one variant per kind, each with its payload. The
//! serde attributes here are the stored `kind` and `payload` (`approval_requests`), so this
//! enum is the one place that spells them. Adding a kind: a variant here; the compiler then
//! points at `approvals::decide`, whose match dispatches to the module owning the effect.
//!
//! A leaf module: the modules that ask (clusters, revocation, rotation) and `approvals`, which
//! decides, all import it, and it imports none of them.

use ca_core::rotation::{RotationKind, Stage};
use ca_store::{ApprovalRequest, CertIssuer, ClusterMode};
use serde::{Deserialize, Serialize};

use crate::config::IstioSettings;
use crate::error::ServiceError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload", rename_all = "kebab-case")]
pub enum Approval {
    /// A cluster registration (its record waits as `pending`).
    RegisterCluster(RegisterCluster),
    /// A new enrolment token for an existing plug-in cluster.
    ReissueEnrolment(ReissueEnrolment),
    RevokeCertificate(RevokeCertificate),
    /// A rotation with its plan (the request's subject is the rotation's id).
    StartRotation(StartRotation),
    /// A rotation moving from one stage to another.
    RotationStage(RotationStage),
    /// New Istio settings for an external-CA cluster (the request's subject).
    ChangeClusterSettings(ChangeClusterSettings),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCluster {
    pub name: String,
    pub environment: String,
    pub trust_domain: String,
    pub mode: ClusterMode,
    /// external-ca: the server-side key.
    pub key: Option<String>,
    /// external-ca: the cluster's Istio settings, stored when the registration is approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioSettings>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeClusterSettings {
    pub settings: IstioSettings,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReissueEnrolment {
    /// Only the token's hash is stored; `GET /v1/requests` leaves it out.
    pub token_hash: String,
    pub expires_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeCertificate {
    pub serial: String,
    /// The CRL reason's name (`key-compromise`, …).
    pub reason: String,
    pub cluster: Option<String>,
    pub issuer: CertIssuer,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartRotation {
    pub rotation: String,
    pub kind: RotationKind,
    pub target: String,
    /// The plan, a `rotation::Spec`: kept as JSON here so that this module does not depend on
    /// `rotation`, which asks for and approves these requests.
    pub spec: serde_json::Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStage {
    pub from: Stage,
    pub to: Stage,
}

impl Approval {
    /// A new request for this, awaiting a second operator.
    pub fn request(&self, id: &str, subject: &str, requested_by: &str, now: i64) -> ApprovalRequest {
        // Through a JSON value: its keys are sorted, as they always were in stored payloads.
        let tagged = serde_json::to_value(self).expect("approval payloads serialise");
        let kind = tagged["kind"].as_str().expect("adjacently tagged");
        ApprovalRequest::pending(id, kind, subject, &tagged["payload"], requested_by, now)
    }

    /// Reads what a stored request asks for.
    pub fn of(req: &ApprovalRequest) -> Result<Approval, ServiceError> {
        let payload: serde_json::Value = serde_json::from_str(&req.payload).map_err(ServiceError::internal)?;
        serde_json::from_value(serde_json::json!({"kind": req.kind, "payload": payload}))
            .map_err(|e| ServiceError::internal(format!("request {} ({}): {e}", req.id, req.kind)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored spellings that existing databases and `ca-cli` read.
    #[test]
    fn kinds_and_payloads_are_stored_as_before() {
        let stage = Approval::RotationStage(RotationStage { from: Stage::Reissue, to: Stage::Drain });
        let r = stage.request("r1", "rot1", "alice", 7);
        assert_eq!((r.kind.as_str(), r.payload.as_str()), ("rotation-stage", r#"{"from":"reissue","to":"drain"}"#));
        assert_eq!(Approval::of(&r).unwrap(), stage);

        let register = Approval::RegisterCluster(RegisterCluster {
            name: "east".into(),
            environment: "prod".into(),
            trust_domain: "prod.example.com".into(),
            mode: ClusterMode::Plugin,
            key: None,
            istio: None,
        });
        let r = register.request("r2", "east", "alice", 7);
        assert_eq!(r.kind, "register-cluster");
        assert_eq!(
            r.payload,
            r#"{"environment":"prod","key":null,"mode":"plugin","name":"east","trust_domain":"prod.example.com"}"#
        );

        let revoke = Approval::RevokeCertificate(RevokeCertificate {
            serial: "0a".into(),
            reason: "key-compromise".into(),
            cluster: Some("east".into()),
            issuer: CertIssuer::Environment("prod".into()),
        });
        let r = revoke.request("r3", "0a", "alice", 7);
        assert_eq!(r.kind, "revoke-certificate");
        assert_eq!(r.payload, r#"{"cluster":"east","issuer":"prod","reason":"key-compromise","serial":"0a"}"#);

        let reissue = Approval::ReissueEnrolment(ReissueEnrolment { token_hash: "h".into(), expires_at: 9 });
        let r = reissue.request("r4", "east", "alice", 7);
        assert_eq!(
            (r.kind.as_str(), r.payload.as_str()),
            ("reissue-enrolment", r#"{"expires_at":9,"token_hash":"h"}"#)
        );

        let start = Approval::StartRotation(StartRotation {
            rotation: "rot1".into(),
            kind: RotationKind::Cluster,
            target: "east".into(),
            spec: serde_json::json!({"environments": {}}),
        });
        let r = start.request("r5", "rot1", "alice", 7);
        assert_eq!(r.kind, "start-rotation");
        assert_eq!(r.payload, r#"{"kind":"cluster","rotation":"rot1","spec":{"environments":{}},"target":"east"}"#);
        assert_eq!(Approval::of(&r).unwrap(), start);

        // A registration stored before settings existed reads back without them.
        let old = ApprovalRequest::pending(
            "r6",
            "register-cluster",
            "east",
            &serde_json::json!({"environment": "prod",
            "key": "file:/k", "mode": "external-ca", "name": "east", "trust_domain": "prod.example.com"}),
            "alice",
            7,
        );
        let Approval::RegisterCluster(p) = Approval::of(&old).unwrap() else { panic!("a registration") };
        assert_eq!(p.istio, None);
        let settings: IstioSettings = serde_json::from_value(serde_json::json!({"sa_issuer": "https://k"})).unwrap();
        let change = Approval::ChangeClusterSettings(ChangeClusterSettings { settings });
        let r = change.request("r7", "east", "alice", 7);
        assert_eq!(r.kind, "change-cluster-settings");
        assert_eq!(Approval::of(&r).unwrap(), change);
    }
}
