//! What ca-server answers, as far as this CLI reads it: the fields of the server's views (in
//! `ca-server`'s REST handlers) that a command uses. Serde ignores the other fields, so a
//! server that adds one does not break the CLI; `Option` marks what the server sends as `null`.
//! With `--output json`, commands that pass a server document through print it as received,
//! not these types.

use ca_store::ClusterMode;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// An RFC 9457 problem document (the server's error answer).
#[derive(Deserialize)]
pub struct Problem {
    pub code: Option<String>,
    pub detail: Option<String>,
}

impl Problem {
    /// Reads a problem document from an error answer; `None` unless it carries both its code
    /// and its detail.
    pub fn parse(body: &str) -> Option<(String, String)> {
        let p = serde_json::from_str::<Problem>(body).ok()?;
        Some((p.code?, p.detail?))
    }
}

/// `GET /v1/issuers`: one environment intermediate.
#[derive(Deserialize)]
pub struct IssuerView {
    pub name: String,
    /// The issuer certificate followed by its chain to the root, PEM.
    pub chain: Vec<String>,
    /// Absent from a server too old to say is not reported as down.
    #[serde(default = "healthy_if_unsaid")]
    pub healthy: bool,
}

fn healthy_if_unsaid() -> bool {
    true
}

/// `GET /v1/clusters`: one registered cluster.
#[derive(Deserialize)]
pub struct ClusterView {
    pub name: String,
    pub environment: String,
    pub mode: ClusterMode,
    pub status: ca_store::ClusterStatus,
    /// Serial of the newest intermediate.
    pub current_serial: Option<String>,
    #[serde(default)]
    pub key_compromised: bool,
}

/// `GET /v1/certificates/{serial}`.
#[derive(Deserialize)]
pub struct CertificateView {
    pub not_before: i64,
    pub not_after: i64,
    pub revoked_at: Option<i64>,
}

/// `GET /v1/rotations`: one rotation, newest first.
#[derive(Deserialize)]
pub struct RotationSummary {
    pub id: String,
    pub kind: String,
    pub target: String,
    pub stage: String,
    pub updated_at: i64,
}

/// `GET /v1/rotations/{id}` (and the answer to adding a certificate): a rotation's stage, each
/// cluster's progress and what blocks the next stage.
#[derive(Deserialize)]
pub struct RotationView {
    pub id: String,
    pub kind: String,
    pub target: String,
    pub stage: String,
    pub next: Option<String>,
    pub rollback: Option<String>,
    pub stages: Vec<String>,
    pub blockers: Vec<BlockerView>,
    pub clusters: Vec<ClusterStatus>,
    pub environments: Vec<EnvView>,
    pub drain_until: Option<i64>,
    /// SHA-256 of the old and new roots (root rotation).
    pub old_root: Option<String>,
    pub new_root: Option<String>,
    pub history: Vec<Transition>,
}

#[derive(Deserialize)]
pub struct BlockerView {
    pub cluster: Option<String>,
    pub reason: String,
}

/// A cluster's progress through a rotation.
#[derive(Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub mode: ClusterMode,
    /// `current` or `lagging`.
    pub state: String,
    pub bundle_ok: bool,
    pub chain_ok: bool,
    pub reported_at: Option<i64>,
    pub stale_bundle_workloads: i64,
    pub stale_chain_workloads: i64,
}

#[derive(Deserialize)]
pub struct EnvView {
    pub name: String,
    /// Serials.
    pub old_certificate: String,
    pub new_certificate: Option<String>,
}

#[derive(Deserialize)]
pub struct Transition {
    pub from: String,
    pub to: String,
    pub at: i64,
    pub requested_by: String,
    pub approved_by: String,
}

/// `POST /v1/rotations`: the request a second operator approves.
#[derive(Deserialize)]
pub struct Started {
    pub rotation: String,
    pub request_id: String,
}

/// `POST /v1/rotations/{id}/advance` and `.../rollback`.
#[derive(Deserialize)]
pub struct MoveRequested {
    pub rotation: String,
    pub request_id: String,
    pub from: String,
    pub to: String,
}

/// `GET /v1/requests` and the answer to approving or rejecting one.
#[derive(Deserialize)]
pub struct RequestView {
    pub id: String,
    pub kind: String,
    pub subject: String,
    /// Its shape depends on `kind`; see [`RequestView::payload`].
    pub payload: serde_json::Value,
    pub requested_by: String,
    pub status: ca_store::RequestStatus,
}

impl RequestView {
    /// The payload read as one kind's (empty fields where it does not fit).
    pub fn payload<T: DeserializeOwned + Default>(&self) -> T {
        serde_json::from_value(self.payload.clone()).unwrap_or_default()
    }
}

/// The payload of a `rotation-stage` request.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct StagePayload {
    pub from: String,
    pub to: String,
}

/// The payload of a `start-rotation` request (it also holds the whole plan, which only
/// `--output json` shows).
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct StartPayload {
    pub kind: String,
    pub target: String,
}

/// `POST /v1/clusters/{name}/intermediate`: an enrolment or renewal.
#[derive(Deserialize)]
pub struct IntermediateResponse {
    pub serial: String,
    pub not_after: String,
    pub certificate: String,
    pub chain: Vec<String>,
    pub trust_bundle: Vec<String>,
}

/// `POST /v1/clusters/{name}/report`: the bundle to hold, and why to renew now if a rotation
/// wants it.
#[derive(Deserialize)]
pub struct ReportResponse {
    pub trust_bundle: Vec<String>,
    pub reason: Option<String>,
}
