//! From stage to issuers: what each environment's issuer should be, given the configuration
//! and the rotations that started from it.

use std::collections::BTreeSet;
use std::sync::Arc;

use ca_core::cert::{CertInfo, fingerprints};
use ca_core::rotation::{self, Stage};

use crate::error::ServiceError;
use crate::service::issuer::Issuer;
use crate::service::rotation_record::{Rotation, all_rotations, pem_cert, pem_certs};
use crate::service::state::AppState;

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
fn desired_issuer(configured: &Issuer, rotations: &[Rotation]) -> Result<Desired, ServiceError> {
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
        if trust.new
            && let Some(root) = &r.spec.new_root
        {
            bundle.push(pem_cert(root)?);
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
/// Brings every environment's issuer in line with the rotations: the certificate and key it
/// signs with, the bundle it hands out and the predecessor it still accepts.
pub async fn refresh(state: &AppState) -> Result<(), ServiceError> {
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

async fn refresh_one(state: &AppState, configured: &Issuer, rotations: &[Rotation]) -> Result<(), ServiceError> {
    let name = &configured.name;
    let Some(current) = state.issuers.get(name) else { return Ok(()) };
    let d = desired_issuer(configured, rotations)?;
    if same(&current, &d) {
        return Ok(());
    }
    let key: hsm::KeyRef = d.key.parse().map_err(ServiceError::internal)?;
    let issuer = Issuer::from_certs(name, key, d.cert, d.chain)
        .map_err(|e| ServiceError::internal(format!("{e:#}")))?
        .with_trust(d.bundle, d.accepted);
    let issuer = Arc::new(issuer);
    match issuer.reconnect_within(state.hsm_timeout()).await {
        Ok(()) => {}
        Err(_) => tracing::error!(issuer = %name, "the rotated issuer's key did not open; the probe retries"),
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
