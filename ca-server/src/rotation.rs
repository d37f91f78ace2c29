//! Staged rotations: root, environment intermediate and cluster intermediate.
//!
//! What a stage means (which roots bundles carry, whether chains go through the new issuer,
//! when a stage may be left) is `ca_core::rotation`; this module stores rotations, turns the
//! stage into the issuers every handler reads (`refresh`), gathers each cluster's progress for
//! the gates, and serves the API. Every stage change is an approval request that a second
//! operator approves; the gate is checked when it is asked for and again, inside the
//! approving transaction, when it is approved.
//!
//! Issuers are derived, never edited: `refresh` computes each environment's certificate, key,
//! trust bundle and still-accepted predecessor from the configuration (as read at start) and
//! the rotations that started from it, and swaps the issuer when that differs. Every replica does this on each
//! background round, and the approving replica at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ca_core::cert::{CertInfo, fingerprints};
use ca_core::rotation::{self, Blocker, ClusterProgress, GateInput, RotationKind, Stage};
use ca_store::{ApprovalRequest, AuditEvent, ClusterRecord, RotationRecord, Tx, now_secs};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::auth::{Operator, Role};
use crate::error::ApiError;
use crate::http::body::Body;
use crate::http::extract::Path;
use crate::service::state::{AppState, Issuer};

// ---- the stored plan ------------------------------------------------------------------------

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

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
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

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterPlan {
    pub external_ca: bool,
    /// External-CA: the server-held key before and after.
    pub old_key: Option<String>,
    pub new_key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
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
    pub fn parse(rec: RotationRecord) -> Result<Rotation, ApiError> {
        let corrupt = |e: String| ApiError::internal(format!("rotation {}: {e}", rec.id));
        let kind = rec.kind.parse().map_err(corrupt)?;
        let stage = rec.stage.parse().map_err(corrupt)?;
        let spec = serde_json::from_str(&rec.spec).map_err(|e| corrupt(e.to_string()))?;
        Ok(Rotation { rec, kind, stage, spec })
    }

    fn covers_env(&self, env: &str) -> bool {
        self.kind != RotationKind::Cluster && self.spec.environments.contains_key(env)
    }

    fn covers_cluster(&self, c: &ClusterRecord) -> bool {
        match self.kind {
            RotationKind::Cluster => self.rec.target == c.name,
            _ => self.covers_env(&c.environment),
        }
    }

    /// Two active rotations may not touch the same issuer or cluster.
    fn overlaps(&self, other: &Rotation, clusters: &[ClusterRecord]) -> bool {
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

fn pem_cert(pem: &str) -> Result<CertInfo, ApiError> {
    let certs = ca_core::cert::parse_certs(pem.as_bytes(), "certificate")
        .map_err(|e| ApiError::bad_request("invalid-certificate", e.to_string()))?;
    let [cert] = <[CertInfo; 1]>::try_from(certs)
        .map_err(|_| ApiError::bad_request("invalid-certificate", "expected exactly one PEM certificate"))?;
    Ok(cert)
}

fn pem_certs(pems: &[String]) -> Result<Vec<CertInfo>, ApiError> {
    pems.iter().map(|p| pem_cert(p)).collect()
}

// ---- from stage to issuers ------------------------------------------------------------------

/// What an environment's issuer should be right now.
struct Desired {
    cert: CertInfo,
    chain: Vec<CertInfo>,
    key: String,
    bundle: Vec<CertInfo>,
    accepted: Vec<(CertInfo, Vec<CertInfo>)>,
}

/// An environment's issuer: the configuration, carried forward through every rotation that
/// started from what the environment had then (oldest first). The configuration wins outright
/// once it names a certificate no rotation knows (an operator moved it on); while it still
/// names one of them, each finished rotation leads to its result, and an active one decides by
/// its stage. Aborted rotations left things as they were.
fn desired_issuer(configured: &Issuer, rotations: &[Rotation]) -> Result<Desired, ApiError> {
    let name = &configured.name;
    let roots_of = |chain: &[CertInfo]| chain.iter().filter(|c| c.is_self_issued()).cloned().collect::<Vec<_>>();
    let mut cur = Desired {
        bundle: configured.roots.clone(),
        cert: configured.cert.clone(),
        chain: configured.chain.clone(),
        key: configured.key_ref.to_string(),
        accepted: vec![],
    };
    // Rotations are listed newest first.
    let mine: Vec<&Rotation> =
        rotations.iter().rev().filter(|r| r.stage != Stage::Aborted && r.covers_env(name)).collect();
    let mut known = BTreeSet::new();
    for r in &mine {
        let plan = &r.spec.environments[name];
        known.insert(pem_cert(&plan.old_certificate)?.fingerprint());
        if let Some(c) = &plan.new_certificate {
            known.insert(pem_cert(c)?.fingerprint());
        }
    }
    if !known.contains(&cur.cert.fingerprint()) {
        return Ok(cur);
    }
    for r in mine {
        let plan = &r.spec.environments[name];
        let old = (pem_cert(&plan.old_certificate)?, pem_certs(&plan.old_chain)?, plan.old_key.clone());
        if old.0.fingerprint() != cur.cert.fingerprint() {
            // Started from another certificate: not part of this environment's line.
            continue;
        }
        let new = match &plan.new_certificate {
            Some(c) => Some((pem_cert(c)?, pem_certs(&plan.new_chain)?, plan.new_key.clone())),
            None => None,
        };
        let trust = rotation::trust(r.kind, r.stage);
        let mut bundle = Vec::new();
        if trust.old {
            bundle.extend(roots_of(&old.1));
        }
        if trust.new {
            if let Some(root) = &r.spec.new_root {
                bundle.push(pem_cert(root)?);
            }
        }
        let (current, other) = match new {
            Some(n) if rotation::new_chain(r.stage) => (n, Some(old)),
            n => (old, n),
        };
        let accepted = match other {
            Some((c, ch, _)) if r.stage.is_active() && r.stage != Stage::Retire => vec![(c, ch)],
            _ => vec![],
        };
        cur = Desired { cert: current.0, chain: current.1, key: current.2, bundle, accepted };
        if r.stage.is_active() {
            break;
        }
    }
    Ok(cur)
}

fn same(i: &Issuer, d: &Desired) -> bool {
    i.cert.der == d.cert.der
        && d.key.parse::<hsm::KeyRef>().is_ok_and(|k| k.to_string() == i.key_ref.to_string())
        && fingerprints(&i.chain) == fingerprints(&d.chain)
        && fingerprints(&i.roots) == fingerprints(&d.bundle)
        && i.accepted.iter().map(|(c, _)| c.fingerprint()).eq(d.accepted.iter().map(|(c, _)| c.fingerprint()))
}

async fn all_rotations(state: &AppState) -> Result<Vec<Rotation>, ApiError> {
    state.store.list_rotations(false).await?.into_iter().map(Rotation::parse).collect()
}

/// Brings every environment's issuer in line with the rotations: the certificate and key it
/// signs with, the bundle it hands out and the predecessor it still accepts.
pub async fn refresh(state: &AppState) -> Result<(), ApiError> {
    let rotations = all_rotations(state).await?;
    let mut first_error = None;
    for configured in state.issuers.configured() {
        // One environment that cannot be brought in line does not hold the others back.
        if let Err(e) = refresh_one(state, configured, &rotations).await {
            tracing::error!(issuer = %configured.name, error = %e.detail, "issuer not brought in line with its rotation");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn refresh_one(state: &AppState, configured: &Issuer, rotations: &[Rotation]) -> Result<(), ApiError> {
    let name = &configured.name;
    let Some(current) = state.issuers.get(name) else { return Ok(()) };
    let d = desired_issuer(configured, rotations)?;
    if same(&current, &d) {
        return Ok(());
    }
    let key: hsm::KeyRef = d.key.parse().map_err(ApiError::internal)?;
    let issuer = Issuer::from_certs(name, key, d.cert, d.chain)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?
        .with_trust(d.bundle, d.accepted);
    let issuer = Arc::new(issuer);
    let i = issuer.clone();
    match tokio::time::timeout(state.hsm_timeout(), tokio::task::spawn_blocking(move || i.reconnect())).await {
        Ok(Ok(Ok(()))) => {}
        _ => tracing::error!(issuer = %name, "the rotated issuer's key did not open; the probe retries"),
    }
    tracing::info!(issuer = %name, subject = %issuer.cert.subject, serial = %issuer.cert.serial,
        bundle = ?fingerprints(&issuer.roots), "issuer updated by a rotation");
    state.issuers.replace(issuer);
    // Cluster CAs hold the environment's chain and bundle: reload them.
    state.istio.forget_all();
    Ok(())
}

/// `refresh`, for callers that go on with whatever issuers this replica has.
pub async fn refresh_quietly(state: &AppState) {
    if let Err(e) = refresh(state).await {
        tracing::warn!(error = %e.detail, "issuers not fully brought in line with the rotations");
    }
}

/// When the bundle, and when the chain, a cluster should hold last changed (0: never): an
/// intermediate issued before the chain changed is renewed.
pub async fn changed_at(state: &AppState, cluster: &ClusterRecord) -> Result<(i64, i64), ApiError> {
    let rotations = all_rotations(state).await?;
    let mine = rotations.iter().filter(|r| r.covers_cluster(cluster));
    Ok(mine.fold((0, 0), |(b, c), r| (b.max(r.spec.bundle_changed_at), c.max(r.spec.chain_changed_at))))
}

// ---- progress and gates -----------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct ClusterStatus {
    pub name: String,
    pub environment: String,
    #[schema(value_type = crate::http::clusters::ClusterMode)]
    pub mode: String,
    /// `current` or `lagging`.
    pub state: String,
    pub bundle_ok: bool,
    pub chain_ok: bool,
    pub intermediate_serial: Option<String>,
    pub reported_at: Option<i64>,
    pub stale_bundle_workloads: i64,
    pub stale_chain_workloads: i64,
    pub blockers: Vec<String>,
}

/// Each cluster the rotation covers, as far as the server can tell.
/// Clusters a rotation covers, with their progress; and those left out because their newest
/// intermediate is revoked or expired (they cannot report or renew until they enrol again,
/// and then get what the current stage hands out), with why.
type Progress = (Vec<(ClusterRecord, ClusterProgress)>, Vec<(ClusterRecord, String)>);

async fn progress(state: &AppState, r: &Rotation, now: i64) -> Result<Progress, ApiError> {
    let reports: BTreeMap<String, ca_store::ClusterReport> =
        state.store.cluster_reports().await?.into_iter().map(|r| (r.cluster.clone(), r)).collect();
    // A replica learns of a bundle change within one background round; a certificate issued
    // in that window may still carry the old bundle.
    let grace = state.config.jobs.interval.duration().whole_seconds() + 1;
    let mut out = Vec::new();
    let mut excluded = Vec::new();
    for c in state.store.list_clusters().await? {
        if c.status != "active" || c.current_serial.is_none() || !r.covers_cluster(&c) {
            continue;
        }
        let current = state.store.get_certificate(c.current_serial.as_deref().unwrap_or_default()).await?;
        match &current {
            Some(rec) if rec.revoked_at.is_some() => {
                excluded.push((c, format!("excluded: its newest intermediate {} is revoked", rec.serial)));
                continue;
            }
            Some(rec) if rec.not_after <= now => {
                excluded.push((c, format!("excluded: its newest intermediate {} has expired", rec.serial)));
                continue;
            }
            _ => {}
        }
        let env = state.issuer(&c.environment)?;
        let bundle: BTreeSet<String> = env.roots.iter().map(CertInfo::fingerprint).collect();
        let mut p = ClusterProgress { name: c.name.clone(), external_ca: c.is_external_ca(), ..Default::default() };
        if c.is_external_ca() {
            if let Some(rec) = &current {
                p.intermediate_issued_at = Some(rec.issued_at);
                p.chain_ok = signed_by(&rec.pem, &env.cert);
            }
            p.bundle_ok = true;
            p.stale_bundle_workloads =
                state.store.count_workloads_issued_before(&c.name, now, r.spec.bundle_changed_at + grace).await?;
            p.stale_chain_workloads =
                state.store.count_workloads_under_intermediates_before(&c.name, now, r.spec.chain_changed_at).await?;
        } else if let Some(rep) = reports.get(&c.name) {
            let installed: BTreeSet<String> = serde_json::from_str(&rep.bundle).map_err(ApiError::internal)?;
            let chain: Vec<String> = serde_json::from_str(&rep.chain).map_err(ApiError::internal)?;
            p.bundle_ok = installed == bundle;
            p.chain_ok = chain.contains(&env.cert.fingerprint())
                && c.current_serial.as_deref() == Some(rep.intermediate_serial.as_str());
            p.reported_at = Some(rep.reported_at);
            p.intermediate_issued_at =
                state.store.get_certificate(&rep.intermediate_serial).await?.map(|r| r.issued_at);
        }
        out.push((c, p));
    }
    Ok((out, excluded))
}

fn signed_by(pem: &str, issuer: &CertInfo) -> bool {
    let Ok(cert) = pem_cert(pem) else { return false };
    cert.issuer_raw == issuer.subject_raw && issuer.public_key().is_ok_and(|k| cert.verify_signed_by(&k).is_ok())
}

/// The longest a workload certificate lives, plus the margin.
fn drain_secs(state: &AppState) -> i64 {
    let c = &state.config.rotation;
    c.workload_ttl.duration().whole_seconds() + c.drain_margin.duration().whole_seconds()
}

/// Preconditions that are not about clusters.
fn missing(r: &Rotation, to: Stage) -> Vec<String> {
    let mut out = Vec::new();
    if r.kind == RotationKind::Root && rotation::new_chain(to) && !rotation::new_chain(r.stage) {
        for (env, plan) in &r.spec.environments {
            if plan.new_certificate.is_none() {
                out.push(format!(
                    "environment {env} has no certificate under the new root yet: run the cross-sign ceremony and `ca-cli rotation certificate {} --environment {env} --certificate FILE`",
                    r.rec.id
                ));
            }
        }
    }
    out
}

/// The gate from `r`'s stage to `to`, and each cluster's status. Judged against the issuers
/// this replica holds: callers outside a write transaction `refresh` first; approvals are
/// preceded by one in `decide`, so that no transaction waits on opening a key.
async fn gate(
    state: &AppState,
    r: &Rotation,
    to: Stage,
    now: i64,
) -> Result<(Vec<Blocker>, Vec<ClusterStatus>), ApiError> {
    let (clusters, excluded) = progress(state, r, now).await?;
    let ps: Vec<ClusterProgress> = clusters.iter().map(|(_, p)| p.clone()).collect();
    let input = GateInput {
        kind: r.kind,
        from: r.stage,
        to,
        bundle_changed_at: r.spec.bundle_changed_at,
        chain_changed_at: r.spec.chain_changed_at,
        drain_until: r.spec.drain_until,
        settle_until: (r.spec.chain_changed_at > 0).then(|| r.spec.chain_changed_at + drain_secs(state)),
        now,
        clusters: &ps,
        missing: missing(r, to),
    };
    let blockers = rotation::blockers(&input);
    let statuses = clusters
        .into_iter()
        .map(|(c, p)| {
            // What would hold this cluster back from the next forward stage.
            let own: Vec<String> = rotation::cluster_blockers(&input, &p).into_iter().map(|b| b.reason).collect();
            ClusterStatus {
                state: if own.is_empty() { "current".into() } else { "lagging".into() },
                blockers: own,
                environment: c.environment.clone(),
                mode: c.mode.clone(),
                intermediate_serial: c.current_serial.clone(),
                name: p.name,
                bundle_ok: p.bundle_ok,
                chain_ok: p.chain_ok,
                reported_at: p.reported_at,
                stale_bundle_workloads: p.stale_bundle_workloads,
                stale_chain_workloads: p.stale_chain_workloads,
            }
        })
        .chain(excluded.into_iter().map(|(c, why)| ClusterStatus {
            name: c.name.clone(),
            environment: c.environment.clone(),
            mode: c.mode.clone(),
            state: "excluded".into(),
            bundle_ok: false,
            chain_ok: false,
            intermediate_serial: c.current_serial.clone(),
            reported_at: None,
            stale_bundle_workloads: 0,
            stale_chain_workloads: 0,
            blockers: vec![why],
        }))
        .collect();
    Ok((blockers, statuses))
}

fn blocked(blockers: &[Blocker]) -> ApiError {
    let list: Vec<String> = blockers
        .iter()
        .map(|b| match &b.cluster {
            Some(c) => format!("cluster {c}: {}", b.reason),
            None => b.reason.clone(),
        })
        .collect();
    ApiError::conflict("rotation-blocked", list.join("; "))
}

// ---- API ----------------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct RotationView {
    id: String,
    kind: String,
    target: String,
    stage: String,
    /// The next stage forward, and where a rollback would go.
    next: Option<String>,
    rollback: Option<String>,
    stages: Vec<String>,
    /// Why the rotation may not move to `next` now (empty: it may, with a second operator).
    blockers: Vec<BlockerView>,
    clusters: Vec<ClusterStatus>,
    environments: Vec<EnvView>,
    drain_until: Option<i64>,
    bundle_changed_at: i64,
    chain_changed_at: i64,
    /// SHA-256 of the old and new roots (root rotation).
    old_root: Option<String>,
    new_root: Option<String>,
    history: Vec<Transition>,
    created_by: String,
    created_at: i64,
    updated_at: i64,
}

#[derive(Serialize, ToSchema)]
struct BlockerView {
    /// The cluster that holds the stage back, if it is about one.
    cluster: Option<String>,
    reason: String,
}

#[derive(Serialize, ToSchema)]
struct EnvView {
    name: String,
    old_certificate: String,
    new_certificate: Option<String>,
}

async fn view(state: &AppState, r: &Rotation, now: i64) -> Result<RotationView, ApiError> {
    refresh_quietly(state).await;
    let next = r.kind.next(r.stage);
    let (blockers, clusters) = match next {
        Some(to) => gate(state, r, to, now).await?,
        None => (vec![], vec![]),
    };
    let fp = |p: &Option<String>| -> Result<Option<String>, ApiError> {
        p.as_deref().map(|p| pem_cert(p).map(|c| c.fingerprint())).transpose()
    };
    let environments = r
        .spec
        .environments
        .iter()
        .map(|(name, p)| {
            Ok(EnvView {
                name: name.clone(),
                old_certificate: pem_cert(&p.old_certificate)?.serial,
                new_certificate: p.new_certificate.as_deref().map(pem_cert).transpose()?.map(|c| c.serial),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(RotationView {
        id: r.rec.id.clone(),
        kind: r.kind.to_string(),
        target: r.rec.target.clone(),
        stage: r.stage.to_string(),
        next: next.map(|s| s.to_string()),
        rollback: r.kind.rollback(r.stage).map(|s| s.to_string()),
        stages: r.kind.stages().iter().map(|s| s.to_string()).collect(),
        blockers: blockers.into_iter().map(|b| BlockerView { cluster: b.cluster, reason: b.reason }).collect(),
        clusters,
        environments,
        drain_until: r.spec.drain_until,
        bundle_changed_at: r.spec.bundle_changed_at,
        chain_changed_at: r.spec.chain_changed_at,
        old_root: fp(&r.spec.old_root)?,
        new_root: fp(&r.spec.new_root)?,
        history: r.spec.history.clone(),
        created_by: r.rec.created_by.clone(),
        created_at: r.rec.created_at,
        updated_at: r.rec.updated_at,
    })
}

async fn load(state: &AppState, id: &str) -> Result<Rotation, ApiError> {
    Rotation::parse(
        state.store.get_rotation(id).await?.ok_or_else(|| ApiError::not_found(format!("no rotation {id:?}")))?,
    )
}

#[derive(Serialize, ToSchema)]
pub struct RotationSummary {
    id: String,
    kind: String,
    target: String,
    stage: String,
    created_at: i64,
    updated_at: i64,
}

/// Every rotation, newest first.
#[utoipa::path(get, path = "/v1/rotations", responses((status = 200, body = [RotationSummary])), security(("bearer" = ["operator", "admin", "auditor"])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<Json<Vec<RotationSummary>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing rotations")?;
    Ok(Json(
        state
            .store
            .list_rotations(false)
            .await?
            .into_iter()
            .map(|r| RotationSummary {
                id: r.id,
                kind: r.kind,
                target: r.target,
                stage: r.stage,
                created_at: r.created_at,
                updated_at: r.updated_at,
            })
            .collect(),
    ))
}

/// A rotation's stage, each cluster's progress and what blocks the next stage.
#[utoipa::path(get, path = "/v1/rotations/{id}", params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 200, body = RotationView), (status = 404, body = crate::error::Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
pub async fn get(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RotationView>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading rotations")?;
    let r = load(&state, &id).await.map_err(|e| e.by(op.actor()))?;
    Ok(Json(view(&state, &r, now_secs()).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRotation {
    /// `root`, `environment` or `cluster`.
    // A string so that a wrong kind is `invalid-kind`, not a JSON error.
    #[schema(value_type = RotationKindName)]
    kind: String,
    /// root: the new root certificate (PEM, made in a ceremony).
    new_root: Option<String>,
    /// root: SHA-256 of the root being replaced (default: the only root in use).
    old_root: Option<String>,
    /// environment: which one.
    environment: Option<String>,
    /// environment: the new intermediate (PEM), signed by the same root.
    certificate: Option<String>,
    /// environment: its key. cluster (external-CA): the new server-held key.
    key: Option<String>,
    /// cluster: which one.
    cluster: Option<String>,
}

/// What a rotation replaces (documents `RotationKind`'s names; never built).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = RotationKind)]
#[allow(dead_code)]
enum RotationKindName {
    Root,
    Environment,
    Cluster,
}

#[derive(Serialize, ToSchema)]
pub struct Started {
    rotation: String,
    request_id: String,
    status: String,
}

fn bad(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, detail)
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
fn check_resigned(issuer: &CertInfo, new_root: &CertInfo, cert: &CertInfo) -> Result<(), ApiError> {
    if cert.subject_raw != issuer.subject_raw || cert.spki_der != issuer.spki_der {
        return Err(bad(
            "invalid-certificate",
            "the certificate must have the environment's subject and key (a cross-signature)",
        ));
    }
    if !cert.is_ca || !cert.key_cert_sign || cert.path_len.is_some_and(|p| p < 1) {
        return Err(bad("invalid-certificate", "the certificate must be a CA that may sign cluster CAs (pathLen ≥ 1)"));
    }
    let (had, has) = (issuer.trust_domains(), cert.trust_domains());
    if let Some(td) = had.iter().find(|t| !has.contains(t)) {
        return Err(bad(
            "invalid-certificate",
            format!("the certificate does not carry the environment's trust domain {td}"),
        ));
    }
    ca_core::chain::verify_chain(cert, &[], std::slice::from_ref(new_root), time::OffsetDateTime::now_utc())
        .map_err(|e| bad("invalid-certificate", format!("the certificate does not chain to the new root: {e}")))?;
    Ok(())
}

/// Asks to start a rotation. It exists once a second operator approves.
#[utoipa::path(post, path = "/v1/rotations", request_body = StartRotation,
    responses((status = 202, body = Started), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem),
        (status = 503, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn start(
    State(state): State<AppState>,
    op: Operator,
    Body(req): Body<StartRotation>,
) -> Result<Response, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "starting a rotation")?;
    let deny = |e: ApiError| e.by(op.actor());
    let kind: RotationKind = req.kind.parse().map_err(|e: String| deny(bad("invalid-kind", e)))?;
    let now = now_secs();
    let mut spec = Spec::default();
    let clusters = state.store.list_clusters().await?;
    let target = match kind {
        RotationKind::Root => {
            let pem = req.new_root.as_deref().ok_or_else(|| deny(bad("invalid-root", "new_root (PEM) is required")))?;
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
                return Err(deny(bad("invalid-root", "new_root must be a self-signed CA certificate valid now")));
            }
            let in_use: BTreeMap<String, CertInfo> =
                state.issuers.all().iter().flat_map(|i| i.roots.clone()).map(|c| (c.fingerprint(), c)).collect();
            let old_fp = match &req.old_root {
                Some(f) => f.to_ascii_lowercase().replace(':', ""),
                None if in_use.len() == 1 => in_use.keys().next().cloned().unwrap_or_default(),
                None => {
                    return Err(deny(bad(
                        "invalid-root",
                        "several roots are in use: name the one to replace (old_root, its SHA-256)",
                    )));
                }
            };
            let old_root = in_use
                .get(&old_fp)
                .ok_or_else(|| deny(bad("invalid-root", format!("no issuer uses a root with SHA-256 {old_fp}"))))?;
            if old_root.fingerprint() == new_root.fingerprint() {
                return Err(deny(bad("invalid-root", "the new root is the old root")));
            }
            for issuer in state.issuers.all().iter().filter(|i| i.roots.iter().any(|r| r.fingerprint() == old_fp)) {
                spec.environments.insert(issuer.name.clone(), plan_from(issuer));
            }
            spec.old_root = Some(old_root.pem());
            spec.new_root = Some(new_root.pem());
            old_fp
        }
        RotationKind::Environment => {
            let env =
                req.environment.clone().ok_or_else(|| deny(bad("invalid-environment", "environment is required")))?;
            let issuer = state
                .issuers
                .get(&env)
                .ok_or_else(|| deny(bad("unknown-environment", format!("no environment {env:?} is served here"))))?;
            let cert = pem_cert(
                req.certificate
                    .as_deref()
                    .ok_or_else(|| deny(bad("invalid-certificate", "certificate (PEM) is required")))?,
            )
            .map_err(deny)?;
            let key_str = req
                .key
                .clone()
                .ok_or_else(|| deny(bad("invalid-key", "key (the new intermediate's key reference) is required")))?;
            let key: hsm::KeyRef =
                key_str.parse().map_err(|e: hsm::HsmError| deny(bad("invalid-key", e.to_string())))?;
            if cert.spki_der == issuer.cert.spki_der {
                return Err(deny(bad("invalid-certificate", "the new intermediate must have a new key")));
            }
            if !cert.is_ca || !cert.key_cert_sign || cert.path_len.is_some_and(|p| p < 1) {
                return Err(deny(bad(
                    "invalid-certificate",
                    "the new intermediate must be a CA that may sign cluster CAs (pathLen ≥ 1)",
                )));
            }
            let intermediates: Vec<CertInfo> = issuer.chain.iter().filter(|c| !c.is_self_issued()).cloned().collect();
            ca_core::chain::verify_chain(&cert, &intermediates, &issuer.roots, time::OffsetDateTime::now_utc())
                .map_err(|e| {
                    deny(bad(
                        "invalid-certificate",
                        format!("the new intermediate does not chain to the environment's root: {e}"),
                    ))
                })?;
            let served = cert.trust_domains();
            if let Some(c) = clusters.iter().find(|c| {
                c.environment == env && c.status == "active" && !served.is_empty() && !served.contains(&c.trust_domain)
            }) {
                return Err(deny(bad(
                    "invalid-certificate",
                    format!("the new intermediate does not cover cluster {}'s trust domain {}", c.name, c.trust_domain),
                )));
            }
            let public = crate::service::keys::check_new_key(&state, &key).await.map_err(deny)?;
            if public.spki_der() != cert.spki_der {
                return Err(deny(bad("invalid-key", "the key does not match the new intermediate")));
            }
            let mut plan = plan_from(&issuer);
            plan.new_certificate = Some(cert.pem());
            plan.new_chain = issuer.chain.iter().map(CertInfo::pem).collect();
            plan.new_key = key.to_string();
            spec.environments.insert(env.clone(), plan);
            env
        }
        RotationKind::Cluster => {
            let name = req.cluster.clone().ok_or_else(|| deny(bad("invalid-cluster", "cluster is required")))?;
            let c = clusters
                .iter()
                .find(|c| c.name == name && c.status == "active" && c.current_serial.is_some())
                .ok_or_else(|| {
                    deny(bad("unknown-cluster", format!("no active cluster {name:?} with an intermediate")))
                })?;
            let new_key = match (c.is_external_ca(), &req.key) {
                (true, Some(k)) => {
                    let key: hsm::KeyRef =
                        k.parse().map_err(|e: hsm::HsmError| deny(bad("invalid-key", e.to_string())))?;
                    crate::service::keys::check_new_key(&state, &key).await.map_err(deny)?;
                    Some(key.to_string())
                }
                (true, None) => {
                    return Err(deny(bad("invalid-key", "an external-CA cluster needs its new server-side key (key)")));
                }
                (false, Some(_)) => {
                    return Err(deny(bad(
                        "invalid-key",
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
        return Err(deny(bad("invalid-root", "new_root is for root rotations")));
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
            return Err(deny(ApiError::conflict(
                "rotation-in-progress",
                format!(
                    "rotation {} ({} {}) is in progress at stage {}",
                    other.rec.id, other.kind, other.rec.target, other.stage
                ),
            )));
        }
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    let payload = json!({"rotation": id, "kind": kind, "target": target, "spec": candidate.spec});
    let mut tx = state.store.write().await?;
    tx.insert_request(&ApprovalRequest::pending(&request_id, "start-rotation", &id, &payload, &op.name, now)).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "rotation.start.requested",
        &id,
        json!({"request_id": request_id, "kind": kind, "target": target}),
    ))
    .await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(Started { rotation: id, request_id, status: "pending-approval".into() }))
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadCertificate {
    environment: String,
    /// The environment's certificate re-signed by the new root (PEM).
    certificate: String,
}

/// Root rotation: records an environment's certificate under the new root (from the
/// cross-sign ceremony). Checked, not trusted: same subject and key, chains to the new root.
#[utoipa::path(post, path = "/v1/rotations/{id}/certificates", request_body = UploadCertificate, params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 200, body = RotationView), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn upload_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Body(req): Body<UploadCertificate>,
) -> Result<Json<RotationView>, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "adding rotation certificates")?;
    let deny = |e: ApiError| e.by(op.actor());
    let mut tx = state.store.write().await?;
    let mut r = Rotation::parse(
        tx.get_rotation(&id).await?.ok_or_else(|| deny(ApiError::not_found(format!("no rotation {id:?}"))))?,
    )?;
    // A certificate for a rotation that does not exist is a 404 whatever the certificate.
    let cert = pem_cert(&req.certificate).map_err(deny)?;
    if r.kind != RotationKind::Root || !matches!(r.stage, Stage::Prepared | Stage::Distribute) {
        return Err(deny(ApiError::conflict(
            "rotation-stage",
            format!(
                "certificates are added to a root rotation before reissue; this is a {} rotation at {}",
                r.kind, r.stage
            ),
        )));
    }
    let new_root = pem_cert(r.spec.new_root.as_deref().unwrap_or_default())?;
    let plan = r.spec.environments.get_mut(&req.environment).ok_or_else(|| {
        deny(bad("unknown-environment", format!("environment {:?} is not part of this rotation", req.environment)))
    })?;
    check_resigned(&pem_cert(&plan.old_certificate)?, &new_root, &cert).map_err(deny)?;
    plan.new_certificate = Some(cert.pem());
    plan.new_chain = vec![new_root.pem()];
    let now = now_secs();
    let spec = serde_json::to_string(&r.spec).map_err(ApiError::internal)?;
    let stage = r.stage.to_string();
    if !tx.update_rotation(&id, &stage, &stage, &spec, now).await? {
        return Err(deny(ApiError::conflict("rotation-stage", "the rotation changed meanwhile; try again")));
    }
    tx.audit(AuditEvent::new(
        op.actor(),
        "rotation.certificate.added",
        &id,
        json!({"environment": req.environment, "serial": cert.serial, "sha256_fingerprint": cert.fingerprint()}),
    ))
    .await?;
    tx.commit().await?;
    r.rec.spec = spec;
    Ok(Json(view(&state, &r, now).await?))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Move {
    /// The stage expected next (optional): refused if the rotation is elsewhere.
    to: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MoveRequested {
    rotation: String,
    request_id: String,
    from: String,
    to: String,
    status: String,
}

/// Asks to move a rotation to its next stage. Refused with the list of blockers while any
/// cluster lags; takes effect when a second operator approves (the gate is checked again).
#[utoipa::path(post, path = "/v1/rotations/{id}/advance", request_body = Move, params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 202, body = MoveRequested), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn advance(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Body(req): Body<Move>,
) -> Result<Response, ApiError> {
    request_move(state, op, id, req, true).await
}

/// Asks to move a rotation one stage back, or to abort it from its first stage. Moves that
/// drop a root or abandon a chain wait until nothing on that chain is live.
#[utoipa::path(post, path = "/v1/rotations/{id}/rollback", request_body = Move, params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 202, body = MoveRequested), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn rollback(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Body(req): Body<Move>,
) -> Result<Response, ApiError> {
    request_move(state, op, id, req, false).await
}

async fn request_move(
    state: AppState,
    op: Operator,
    id: String,
    req: Move,
    forward: bool,
) -> Result<Response, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "changing a rotation's stage")?;
    let deny = |e: ApiError| e.by(op.actor());
    let r = load(&state, &id).await.map_err(deny)?;
    let to = if forward { r.kind.next(r.stage) } else { r.kind.rollback(r.stage) };
    let to = to.ok_or_else(|| {
        deny(ApiError::conflict(
            "rotation-stage",
            format!("a {} rotation at {} cannot {}", r.kind, r.stage, if forward { "advance" } else { "roll back" }),
        ))
    })?;
    if let Some(want) = &req.to {
        if want != to.as_str() {
            return Err(deny(ApiError::conflict(
                "rotation-stage",
                format!(
                    "the rotation is at {}; its {} is {to}, not {want}",
                    r.stage,
                    if forward { "next stage" } else { "rollback" }
                ),
            )));
        }
    }
    let now = now_secs();
    refresh_quietly(&state).await;
    let (blockers, _) = gate(&state, &r, to, now).await?;
    if !blockers.is_empty() {
        return Err(deny(blocked(&blockers)));
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut tx = state.store.write().await?;
    tx.insert_request(&ApprovalRequest::pending(
        &request_id,
        "rotation-stage",
        &id,
        &json!({"from": r.stage, "to": to}),
        &op.name,
        now,
    ))
    .await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "rotation.stage.requested",
        &id,
        json!({"request_id": request_id, "from": r.stage, "to": to}),
    ))
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(MoveRequested {
            rotation: id,
            request_id,
            from: r.stage.to_string(),
            to: to.to_string(),
            status: "pending-approval".into(),
        }),
    )
        .into_response())
}

// ---- approvals ----------------------------------------------------------------------------

/// What to do once an approved rotation change has committed.
pub struct AfterCommit {
    rotation: String,
    /// Cluster intermediates were revoked: publish this issuer's CRL.
    republish: Option<String>,
}

/// An approved `start-rotation` request: the rotation exists from now on.
pub async fn approve_start(
    state: &AppState,
    tx: &mut Tx,
    req: &ApprovalRequest,
    approver: &Operator,
) -> Result<AfterCommit, ApiError> {
    let payload: serde_json::Value = serde_json::from_str(&req.payload).map_err(ApiError::internal)?;
    let kind: RotationKind = payload["kind"].as_str().unwrap_or_default().parse().map_err(ApiError::internal)?;
    let target = payload["target"].as_str().unwrap_or_default().to_string();
    let spec: Spec = serde_json::from_value(payload["spec"].clone()).map_err(ApiError::internal)?;
    let now = now_secs();
    let mut spec = spec;
    spec.entered.insert(Stage::Prepared.to_string(), now);
    let candidate = Rotation {
        rec: RotationRecord {
            id: req.subject.clone(),
            kind: kind.to_string(),
            target: target.clone(),
            stage: Stage::Prepared.to_string(),
            spec: serde_json::to_string(&spec).map_err(ApiError::internal)?,
            created_by: req.requested_by.clone(),
            created_at: now,
            updated_at: now,
        },
        kind,
        stage: Stage::Prepared,
        spec,
    };
    // The plan was made when it was asked for; it must still start from what is current.
    for (env, plan) in &candidate.spec.environments {
        let issuer = state.issuer(env)?;
        if pem_cert(&plan.old_certificate)?.der != issuer.cert.der {
            return Err(ApiError::conflict(
                "rotation-stale",
                format!("environment {env} changed since this rotation was asked for; reject it and start again"),
            )
            .by(approver.actor()));
        }
    }
    let clusters = state.store.list_clusters().await?;
    if let Some(plan) = &candidate.spec.cluster {
        let now_key = clusters.iter().find(|c| c.name == target).and_then(|c| c.key_ref.clone());
        if plan.external_ca && now_key != plan.old_key {
            return Err(ApiError::conflict(
                "rotation-stale",
                format!("cluster {target}'s key changed since this rotation was asked for; reject it and start again"),
            )
            .by(approver.actor()));
        }
    }
    for other in tx.list_active_rotations().await? {
        let other = Rotation::parse(other)?;
        if candidate.overlaps(&other, &clusters) {
            return Err(ApiError::conflict(
                "rotation-in-progress",
                format!("rotation {} started meanwhile and overlaps this one", other.rec.id),
            )
            .by(approver.actor()));
        }
    }
    tx.insert_rotation(&candidate.rec).await?;
    tx.audit(AuditEvent::new(
        approver.actor(),
        "rotation.started",
        &candidate.rec.id,
        json!({"kind": kind, "target": target, "requested_by": req.requested_by}),
    ))
    .await?;
    Ok(AfterCommit { rotation: candidate.rec.id, republish: None })
}

/// An approved `rotation-stage` request: the gate is checked again, then the stage moves.
pub async fn approve_stage(
    state: &AppState,
    tx: &mut Tx,
    req: &ApprovalRequest,
    approver: &Operator,
) -> Result<AfterCommit, ApiError> {
    let payload: serde_json::Value = serde_json::from_str(&req.payload).map_err(ApiError::internal)?;
    let from: Stage = payload["from"].as_str().unwrap_or_default().parse().map_err(ApiError::internal)?;
    let to: Stage = payload["to"].as_str().unwrap_or_default().parse().map_err(ApiError::internal)?;
    let deny = |e: ApiError| e.by(approver.actor());
    let mut r = Rotation::parse(
        tx.get_rotation(&req.subject).await?.ok_or_else(|| deny(ApiError::not_found("the rotation is gone")))?,
    )?;
    if r.stage != from {
        return Err(deny(ApiError::conflict(
            "rotation-stage",
            format!("the rotation moved to {} since this was requested; reject this request", r.stage),
        )));
    }
    let now = now_secs();
    let (blockers, evidence) = gate(state, &r, to, now).await?;
    if !blockers.is_empty() {
        return Err(deny(blocked(&blockers)));
    }
    let t = &mut r.spec;
    if rotation::trust(r.kind, from) != rotation::trust(r.kind, to) {
        t.bundle_changed_at = now;
    }
    if rotation::new_chain(from) != rotation::new_chain(to) {
        t.chain_changed_at = now;
    }
    // The drain starts when chains have just moved; coming back from retire, it already ran.
    if to == Stage::Drain && from == Stage::Reissue {
        t.drain_until = Some(now + drain_secs(state));
    }
    t.entered.insert(to.to_string(), now);
    t.history.push(Transition {
        from: from.to_string(),
        to: to.to_string(),
        at: now,
        requested_by: req.requested_by.clone(),
        approved_by: approver.name.clone(),
    });
    let mut republish = None;
    // What the gate saw, cluster by cluster: the evidence the stage moved on.
    let seen: Vec<serde_json::Value> = evidence
        .iter()
        .map(|c| {
            json!({"cluster": c.name, "state": c.state, "bundle_ok": c.bundle_ok, "chain_ok": c.chain_ok,
                        "intermediate": c.intermediate_serial, "reported_at": c.reported_at})
        })
        .collect();
    let mut details = json!({"from": from, "to": to, "kind": r.kind, "target": r.rec.target,
                             "requested_by": req.requested_by, "clusters": seen});
    if r.kind == RotationKind::Cluster {
        let plan = r.spec.cluster.clone().ok_or_else(|| ApiError::internal("cluster rotation without a plan"))?;
        // External-CA: the server's key moves with the chain; the background round (or the
        // code after commit) issues the intermediate for it.
        if plan.external_ca && rotation::new_chain(from) != rotation::new_chain(to) {
            let key = if rotation::new_chain(to) { plan.new_key } else { plan.old_key };
            tx.set_cluster_key(&r.rec.target, key.as_deref().unwrap_or_default()).await?;
        }
        if to == Stage::Retire {
            let cluster = tx.get_cluster(&r.rec.target).await?.ok_or_else(|| ApiError::internal("cluster vanished"))?;
            let mut revoked = Vec::new();
            for c in tx.live_cluster_certificates(&r.rec.target, now).await? {
                if Some(&c.serial) == cluster.current_serial.as_ref() {
                    continue;
                }
                if tx.revoke_certificate(&c.serial, "superseded", now).await? {
                    tx.audit(AuditEvent::new(
                        approver.actor(),
                        "certificate.revoked",
                        &c.serial,
                        json!({"reason": "superseded", "issuer": c.issuer, "cluster": c.cluster, "rotation": r.rec.id}),
                    ))
                    .await?;
                    republish = Some(c.issuer.clone());
                    revoked.push(c.serial);
                }
            }
            details["revoked"] = json!(revoked);
        }
    }
    if r.kind == RotationKind::Environment && to == Stage::Retire {
        details["note"] = json!(
            "the old environment intermediate no longer renews clusters; revoke it on the root's CRL in the next CRL ceremony"
        );
    }
    let spec = serde_json::to_string(&r.spec).map_err(ApiError::internal)?;
    if !tx.update_rotation(&r.rec.id, from.as_str(), to.as_str(), &spec, now).await? {
        return Err(deny(ApiError::conflict("rotation-stage", "the rotation moved meanwhile")));
    }
    tx.audit(AuditEvent::new(approver.actor(), "rotation.stage", &r.rec.id, details)).await?;
    Ok(AfterCommit { rotation: r.rec.id, republish })
}

/// After an approved change: this replica takes the new issuers at once, external-CA
/// clusters get their intermediates on the new chain, CRLs follow revocations. Failures are
/// retried by the background round.
pub async fn after_commit(state: &AppState, a: AfterCommit, actor: &str) {
    if let Err(e) = refresh(state).await {
        tracing::warn!(rotation = %a.rotation, error = %e.detail, "issuers not refreshed yet; the background job will retry");
    }
    let Ok(Some(rec)) = state.store.get_rotation(&a.rotation).await else { return };
    let Ok(r) = Rotation::parse(rec) else { return };
    if let Ok(clusters) = state.store.list_clusters().await {
        for c in clusters.iter().filter(|c| c.is_external_ca() && c.status == "active" && r.covers_cluster(c)) {
            state.istio.forget(&c.name);
            if let Err(e) = crate::istio::ensure_intermediate(state, &c.name, actor).await {
                tracing::warn!(cluster = %c.name, error = %e.detail, "intermediate not re-issued yet; the background job will retry");
            }
        }
    }
    if let Some(name) = a.republish {
        if let Ok(issuer) = state.issuer(&name) {
            if let Err(e) = crate::service::crl::publish_crl(state, &issuer, actor).await {
                tracing::warn!(issuer = %name, error = %e.detail, "CRL not regenerated yet; the background job will retry");
            }
        }
    }
}

/// Stage index used by the `ca_rotation_stage` gauge.
fn stage_index(s: Stage) -> i64 {
    match s {
        Stage::Prepared => 0,
        Stage::Distribute => 1,
        Stage::Reissue => 2,
        Stage::Drain => 3,
        Stage::Retire => 4,
        Stage::Done | Stage::Aborted => 5,
    }
}

/// Exports every active rotation's stage and lagging clusters; finished ones disappear.
pub async fn update_gauges(state: &AppState) -> Result<(), ApiError> {
    let now = now_secs();
    let mut exported = Vec::new();
    for rec in state.store.list_rotations(true).await? {
        let r = Rotation::parse(rec)?;
        let labels = crate::metrics::RotationLabels {
            rotation: r.rec.id.clone(),
            kind: r.kind.to_string(),
            target: r.rec.target.clone(),
        };
        let lagging = match r.kind.next(r.stage) {
            Some(to) => gate(state, &r, to, now).await?.1.iter().filter(|c| c.state == "lagging").count(),
            None => 0,
        };
        state.metrics.rotation_stage.get_or_create(&labels).set(stage_index(r.stage));
        state.metrics.rotation_lagging.get_or_create(&labels).set(lagging as i64);
        exported.push(labels);
    }
    let mut last = state.metrics.rotation_exported.lock().unwrap_or_else(|p| p.into_inner());
    for gone in last.iter().filter(|l| !exported.contains(l)) {
        state.metrics.rotation_stage.remove(gone);
        state.metrics.rotation_lagging.remove(gone);
    }
    *last = exported;
    Ok(())
}
