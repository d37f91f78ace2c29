//! The gates: each cluster's progress as far as the server can tell, and what blocks a
//! rotation's move from one stage to another (`ca_core::rotation::blockers` decides).

use std::collections::{BTreeMap, BTreeSet};

use ca_core::cert::CertInfo;
use ca_core::rotation::{self, Blocker, ClusterProgress, GateInput, RotationKind, Stage};
use ca_store::ClusterRecord;

use crate::error::{ErrorCode, ServiceError};
use crate::service::rotation_record::{Rotation, pem_cert};
use crate::service::state::AppState;

/// What the gate sees of one cluster.
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    pub name: String,
    pub environment: String,
    pub mode: ca_store::ClusterMode,
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

async fn progress(state: &AppState, r: &Rotation, now: i64) -> Result<Progress, ServiceError> {
    let reports: BTreeMap<String, ca_store::ClusterReport> =
        state.store.cluster_reports().await?.into_iter().map(|r| (r.cluster.clone(), r)).collect();
    let namespace_reports: BTreeMap<String, ca_store::NamespaceReport> =
        state.store.namespace_reports().await?.into_iter().map(|r| (r.cluster.clone(), r)).collect();
    // A replica learns of a bundle change within one background round; a certificate issued
    // in that window may still carry the old bundle.
    let grace = state.config.jobs.interval.duration().whole_seconds() + 1;
    let mut out = Vec::new();
    let mut excluded = Vec::new();
    for c in state.store.list_clusters().await? {
        if !c.is_active() || c.current_serial.is_none() || !r.covers_cluster(&c) {
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
                p.chain_ok = pem_cert(&rec.pem).is_ok_and(|c| c.issued_by(&env.cert));
            }
            // With an agent, its report says what each namespace's ConfigMap holds; without
            // one, the server hands the bundle out itself and only workload certificates lag.
            let namespaces = crate::service::agent::namespace_bundles(&c, namespace_reports.get(&c.name), &bundle)?;
            p.bundle_ok = namespaces.as_ref().is_none_or(|n| n.blocker().is_none());
            p.reported_at = namespaces.as_ref().and_then(|n| n.reported_at);
            p.namespaces = namespaces;
            p.stale_bundle_workloads =
                state.store.count_workloads_issued_before(&c.name, now, r.spec.bundle_changed_at + grace).await?;
            p.stale_chain_workloads =
                state.store.count_workloads_under_intermediates_before(&c.name, now, r.spec.chain_changed_at).await?;
        } else if let Some(rep) = reports.get(&c.name) {
            let installed: BTreeSet<String> = serde_json::from_str(&rep.bundle).map_err(ServiceError::internal)?;
            let chain: Vec<String> = serde_json::from_str(&rep.chain).map_err(ServiceError::internal)?;
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

/// The longest a workload certificate lives, plus the margin.
pub(super) fn drain_secs(state: &AppState) -> i64 {
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
pub async fn gate(
    state: &AppState,
    r: &Rotation,
    to: Stage,
    now: i64,
) -> Result<(Vec<Blocker>, Vec<ClusterStatus>), ServiceError> {
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
                mode: c.mode,
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
            mode: c.mode,
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

pub(super) fn blocked(blockers: &[Blocker]) -> ServiceError {
    let list: Vec<String> = blockers
        .iter()
        .map(|b| match &b.cluster {
            Some(c) => format!("cluster {c}: {}", b.reason),
            None => b.reason.clone(),
        })
        .collect();
    ServiceError::new(ErrorCode::RotationBlocked, list.join("; "))
}
