//! `ca-cli rotation simulate`: a rotation played out on a throwaway mesh before the real one.
//!
//! M clusters of N workloads, each workload holding a certificate from its cluster and the
//! bundle its cluster had when it last renewed. The stages are `ca_core::rotation`'s (the
//! same definitions ca-server enforces); within each stage the mesh moves over in steps that
//! a real fleet goes through (half the clusters, all clusters, half the workloads, all
//! workloads), and after every step every workload handshakes with every other over real
//! TLS on loopback (rustls and openssl). `--retire-early` skips the drain: retiring the old
//! root while half the workloads still present the old chain, which must fail.

use std::path::Path;

use anyhow::{Context, Result};
use ca_core::cert::{CertInfo, fingerprints};
use ca_core::issue::{CaIssuer, create_root, issue};
use ca_core::names::{SpiffeId, TrustDomain};
use ca_core::profile::{CertRequest, ProfileKind};
use ca_core::rotation::{self, RotationKind, Stage};
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::handshake::{Outcome, Stack, Workload, all_pairs};

pub struct Options {
    pub kind: RotationKind,
    pub clusters: usize,
    pub workloads: usize,
    pub retire_early: bool,
    pub stack: Stack,
}

#[derive(Serialize)]
pub struct Step {
    pub stage: Stage,
    pub step: &'static str,
    pub workloads: usize,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A CA in the simulation: certificate, key, and the chain above it below the root.
struct Ca {
    issuer: CaIssuer,
    above: Vec<CertInfo>,
}

struct Cluster {
    name: String,
    td: TrustDomain,
    ca: Ca,
    bundle: Vec<CertInfo>,
}

struct Mesh<'a> {
    dir: &'a Path,
    keys: usize,
}

impl Mesh<'_> {
    fn key(&mut self) -> Result<hsm::KeySigner> {
        self.keys += 1;
        let k = hsm::KeyRef::file(self.dir.join(format!("ca-{}.key", self.keys)));
        hsm::generate_key(&k, hsm::KeyAlgorithm::EcdsaP256)?;
        Ok(hsm::open_signer(&k)?)
    }
}

fn subject(cn: &str) -> rcgen::DistinguishedName {
    let mut s = rcgen::DistinguishedName::new();
    s.push(rcgen::DnType::CommonName, cn.to_string());
    s
}

fn now() -> OffsetDateTime {
    ca_core::issue::default_not_before()
}

fn root(m: &mut Mesh<'_>, cn: &str) -> Result<Ca> {
    let key = m.key()?;
    let nb = now();
    let req = CertRequest {
        path_len: Some(2),
        ..CertRequest::new(ProfileKind::Root, subject(cn), key.public_key().clone(), nb, nb + Duration::days(3650))
    };
    let cert = create_root(&key, &req)?.cert;
    Ok(Ca { issuer: CaIssuer::new(cert, key)?, above: vec![] })
}

fn intermediate(
    m: &mut Mesh<'_>,
    parent: &Ca,
    profile: ProfileKind,
    cn: &str,
    td: &TrustDomain,
    days: i64,
) -> Result<Ca> {
    let key = m.key()?;
    let nb = now();
    let req = CertRequest {
        trust_domains: vec![td.clone()],
        ..CertRequest::new(profile, subject(cn), key.public_key().clone(), nb, nb + Duration::days(days))
    };
    let cert = issue(&parent.issuer, &req)?.cert;
    let mut above = vec![parent.issuer.cert.clone()];
    above.extend(parent.above.iter().cloned());
    above.retain(|c| !c.is_self_issued());
    Ok(Ca { issuer: CaIssuer::new(cert, key)?, above })
}

/// The same CA certified by another issuer (the cross-sign ceremony's result): same subject,
/// key (reopened: the cross-certificate is used with the original's key) and key identifier.
fn cross_sign(ca: &Ca, cn: &str, new_parent: &Ca, td: &TrustDomain) -> Result<Ca> {
    let orig = &ca.issuer.cert;
    let nb = now();
    let req = CertRequest {
        path_len: orig.path_len,
        trust_domains: vec![td.clone()],
        subject_key_id: orig.ski.clone(),
        exact_subject: Some(orig.subject_raw.clone()),
        ..CertRequest::new(ProfileKind::CrossSign, subject(cn), orig.public_key()?, nb, nb + Duration::days(1800))
    };
    let cert = issue(&new_parent.issuer, &req)?.cert;
    // The key behind the cross-certificate is the original's; reopen it.
    let key = hsm::open_signer(ca.issuer.signer.key_ref())?;
    Ok(Ca { issuer: CaIssuer::new(cert, key)?, above: new_parent.above.clone() })
}

// The simulated mesh's workloads are real TLS endpoints (rustls and `openssl s_server`), which
// need their keys as PKCS#8; the keys live in a throwaway directory for the length of a run.
#[allow(clippy::disallowed_methods)]
fn workload(cluster: &Cluster, name: &str) -> Result<Workload> {
    let kp = rcgen::KeyPair::generate().context("workload key")?;
    let public = hsm::PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp))?;
    let nb = now();
    let id = SpiffeId::istio(&cluster.td, "default", name)?;
    let req = CertRequest {
        spiffe_id: Some(id),
        ..CertRequest::new(ProfileKind::Workload, rcgen::DistinguishedName::new(), public, nb, nb + Duration::hours(24))
    };
    let leaf = issue(&cluster.ca.issuer, &req)?.cert;
    let mut chain = vec![leaf, cluster.ca.issuer.cert.clone()];
    chain.extend(cluster.ca.above.iter().cloned());
    Ok(Workload {
        name: format!("{}-{name}", cluster.name),
        chain,
        key: kp.serialize_der(),
        bundle: cluster.bundle.clone(),
    })
}

/// Plays the rotation and returns every step's handshake outcome.
pub fn run(o: &Options, scratch: &Path) -> Result<Vec<Step>> {
    let mut m = Mesh { dir: scratch, keys: 0 };
    let td: TrustDomain = "mesh.example.com".parse()?;
    let old_root = root(&mut m, "Simulated Root A")?;
    let env_old = intermediate(&mut m, &old_root, ProfileKind::Environment, "Simulated Env", &td, 1800)?;
    // What the rotation moves to.
    let new_root = match o.kind {
        RotationKind::Root => Some(root(&mut m, "Simulated Root B")?),
        _ => None,
    };
    let env_new = match (o.kind, &new_root) {
        (RotationKind::Root, Some(r)) => Some(cross_sign(&env_old, "Simulated Env", r, &td)?),
        (RotationKind::Environment, _) => {
            Some(intermediate(&mut m, &old_root, ProfileKind::Environment, "Simulated Env 2", &td, 1800)?)
        }
        _ => None,
    };
    let bundle_for = |stage: Stage| {
        let t = rotation::trust(o.kind, stage);
        let mut b = Vec::new();
        if t.old {
            b.push(old_root.issuer.cert.clone());
        }
        if let (true, Some(n)) = (t.new, &new_root) {
            b.push(n.issuer.cert.clone());
        }
        b
    };
    let mut clusters = Vec::new();
    for i in 0..o.clusters {
        let name = format!("c{i}");
        let ca = intermediate(&mut m, &env_old, ProfileKind::Cluster, &format!("{name} Cluster CA"), &td, 365)?;
        clusters.push(Cluster { name, td: td.clone(), ca, bundle: bundle_for(Stage::Prepared) });
    }
    let mut workloads: Vec<Vec<Workload>> = Vec::new();
    for c in &clusters {
        workloads.push((0..o.workloads).map(|j| workload(c, &format!("w{j}"))).collect::<Result<_>>()?);
    }
    let mut steps = Vec::new();
    let mut check = |stage: Stage, step: &'static str, ws: &[Vec<Workload>]| -> Result<()> {
        let flat: Vec<Workload> = ws.iter().flatten().cloned().collect();
        let outcome = all_pairs(&flat, o.stack, &scratch.join("tls"))?;
        steps.push(Step { stage, step, workloads: flat.len(), outcome });
        Ok(())
    };
    check(Stage::Prepared, "before", &workloads)?;

    let mut stages: Vec<Stage> = o.kind.stages().iter().copied().filter(|s| *s != Stage::Prepared).collect();
    if o.retire_early {
        stages.retain(|s| *s != Stage::Drain);
    }
    let mut previous = Stage::Prepared;
    for (i, &stage) in stages.iter().enumerate() {
        let chain_moves = rotation::new_chain(stage) && !rotation::new_chain(previous);
        let bundle = bundle_for(stage);
        // Retiring early: the stage before retire ends as soon as every cluster moved, while
        // half the workloads still present the old chain (what the drain waits out).
        let cut_short = o.retire_early && stages.get(i + 1) == Some(&Stage::Retire);
        if stage == Stage::Drain {
            // Draining is waiting: every workload renews on the chain its cluster has.
            renew_workloads(&clusters, &mut workloads, 1.0)?;
            check(stage, "drained", &workloads)?;
        } else if chain_moves || fingerprints(&bundle) != fingerprints(&bundle_for(previous)) {
            let half = clusters.len().div_ceil(2);
            let parent = env_new.as_ref().unwrap_or(&env_old);
            for c in clusters.iter_mut().take(half) {
                move_cluster(&mut m, c, &bundle, chain_moves, parent)?;
            }
            renew_workloads(&clusters[..half], &mut workloads[..half], 0.5)?;
            check(stage, "half the clusters moved", &workloads)?;
            for c in clusters.iter_mut().skip(half) {
                move_cluster(&mut m, c, &bundle, chain_moves, parent)?;
            }
            renew_workloads(&clusters[half..], &mut workloads[half..], 0.5)?;
            check(stage, "all clusters moved", &workloads)?;
            if !cut_short {
                renew_workloads(&clusters, &mut workloads, 1.0)?;
                check(stage, "all workloads renewed", &workloads)?;
            }
        } else {
            check(stage, "no change", &workloads)?;
        }
        previous = stage;
    }
    Ok(steps)
}

/// A cluster takes the stage's bundle, and a new intermediate when the chain moves.
fn move_cluster(m: &mut Mesh<'_>, c: &mut Cluster, bundle: &[CertInfo], chain_moves: bool, parent: &Ca) -> Result<()> {
    c.bundle = bundle.to_vec();
    if chain_moves {
        c.ca = intermediate(m, parent, ProfileKind::Cluster, &format!("{} Cluster CA", c.name), &c.td.clone(), 365)?;
    }
    Ok(())
}

/// The first `fraction` of each cluster's workloads get a new certificate and their cluster's
/// current bundle, as an agent renewing at half its certificate's life does.
fn renew_workloads(clusters: &[Cluster], workloads: &mut [Vec<Workload>], fraction: f64) -> Result<()> {
    for (c, ws) in clusters.iter().zip(workloads.iter_mut()) {
        let n = ((ws.len() as f64) * fraction).ceil() as usize;
        for (j, w) in ws.iter_mut().enumerate().take(n) {
            *w = workload(c, &format!("w{j}"))?;
        }
    }
    Ok(())
}
