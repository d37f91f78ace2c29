//! Staged rotations: what each stage of a root, environment-intermediate or
//! cluster-intermediate rotation puts in trust bundles and chains, and when a stage may be left.
//!
//! Protocol- and storage-free: ca-server feeds it what clusters reported and what its own
//! inventory shows; `ca-cli rotation simulate` plays the same bundles and chains per stage
//! offline, so the schedule it shows safe is the one the server hands out.
//!
//! A root rotation moves every bundle from {old} to {old, new} (*distribute*), every chain from
//! the old root to the new (*reissue*), waits until nothing live presents the old chain
//! (*drain*), then shrinks every bundle to {new} (*retire*). Each bundle change is a superset
//! or subset of the last, which is what istiod accepts under `ISTIO_MULTIROOT_MESH`. An
//! intermediate rotation keeps the root, so it has no distribute stage.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationKind {
    /// A new root for every environment that chains to the old one.
    Root,
    /// A new environment intermediate (new key) under the same root.
    Environment,
    /// A new cluster intermediate (new key) under the same environment.
    Cluster,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Registered and approved; nothing distributed yet.
    Prepared,
    /// Root rotation: bundles carry the old and the new root.
    Distribute,
    /// Chains move to the new issuer: clusters renew onto it.
    Reissue,
    /// Waiting until no live certificate presents the old chain.
    Drain,
    /// The old root leaves the bundles; old intermediates stop renewing (cluster: revoked).
    Retire,
    Done,
    Aborted,
}

const ROOT_STAGES: &[Stage] =
    &[Stage::Prepared, Stage::Distribute, Stage::Reissue, Stage::Drain, Stage::Retire, Stage::Done];
const INTERMEDIATE_STAGES: &[Stage] = &[Stage::Prepared, Stage::Reissue, Stage::Drain, Stage::Retire, Stage::Done];

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prepared => "prepared",
            Stage::Distribute => "distribute",
            Stage::Reissue => "reissue",
            Stage::Drain => "drain",
            Stage::Retire => "retire",
            Stage::Done => "done",
            Stage::Aborted => "aborted",
        }
    }

    pub fn is_active(self) -> bool {
        !matches!(self, Stage::Done | Stage::Aborted)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Stage::Prepared, Stage::Distribute, Stage::Reissue, Stage::Drain, Stage::Retire, Stage::Done, Stage::Aborted]
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown stage {s:?}"))
    }
}

impl RotationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationKind::Root => "root",
            RotationKind::Environment => "environment",
            RotationKind::Cluster => "cluster",
        }
    }

    pub fn stages(self) -> &'static [Stage] {
        match self {
            RotationKind::Root => ROOT_STAGES,
            RotationKind::Environment | RotationKind::Cluster => INTERMEDIATE_STAGES,
        }
    }

    /// The stage after `s`, if any.
    pub fn next(self, s: Stage) -> Option<Stage> {
        let st = self.stages();
        st.iter().position(|x| *x == s).and_then(|i| st.get(i + 1)).copied().filter(|_| s.is_active())
    }

    /// Where a rollback from `s` goes: the stage before it, or `Aborted` from the first stage.
    /// An environment rotation goes back through `Prepared`, where the old intermediate signs
    /// and the new one is still accepted, so that clusters that moved can renew back before
    /// the abort forgets the new one. A cluster rotation aborts from `Reissue` (its clusters
    /// stay under the same environment either way) and cannot leave `Retire` backwards: the
    /// old intermediates are revoked by then.
    pub fn rollback(self, s: Stage) -> Option<Stage> {
        match (self, s) {
            (_, Stage::Prepared) => Some(Stage::Aborted),
            (RotationKind::Root, Stage::Distribute) => Some(Stage::Aborted),
            (RotationKind::Root, Stage::Reissue) => Some(Stage::Distribute),
            (RotationKind::Environment, Stage::Reissue) => Some(Stage::Prepared),
            (RotationKind::Cluster, Stage::Reissue) => Some(Stage::Aborted),
            (_, Stage::Drain) => Some(Stage::Reissue),
            (RotationKind::Cluster, Stage::Retire) => None,
            (_, Stage::Retire) => Some(Stage::Drain),
            _ => None,
        }
    }
}

impl fmt::Display for RotationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RotationKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [RotationKind::Root, RotationKind::Environment, RotationKind::Cluster]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown rotation kind {s:?} (root, environment or cluster)"))
    }
}

/// Which roots a bundle carries. Outside a root rotation there is one root, the "old" one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    pub old: bool,
    pub new: bool,
}

pub fn trust(kind: RotationKind, stage: Stage) -> Trust {
    match (kind, stage) {
        (RotationKind::Root, Stage::Distribute | Stage::Reissue | Stage::Drain) => Trust { old: true, new: true },
        (RotationKind::Root, Stage::Retire | Stage::Done) => Trust { old: false, new: true },
        _ => Trust { old: true, new: false },
    }
}

/// Whether chains handed out at `stage` go through the new issuer.
pub fn new_chain(stage: Stage) -> bool {
    matches!(stage, Stage::Reissue | Stage::Drain | Stage::Retire | Stage::Done)
}

/// Whether moving from `from` to `to` drops a root from the bundles: the one change that can
/// break a handshake, so it waits for every cluster.
pub fn shrinks_bundle(kind: RotationKind, from: Stage, to: Stage) -> bool {
    let (a, b) = (trust(kind, from), trust(kind, to));
    (a.old && !b.old) || (a.new && !b.new)
}

/// Whether entering `stage` added a root to the bundles (only *distribute*): workloads that
/// got their bundle earlier lack it until they renew.
pub fn bundle_grew(kind: RotationKind, stage: Stage) -> bool {
    kind == RotationKind::Root && stage == Stage::Distribute
}

/// One cluster's position, from its own report (plug-in) or from the server's inventory
/// (external-CA, whose bundle and chain the server hands out itself).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterProgress {
    pub name: String,
    pub external_ca: bool,
    /// The installed trust bundle is the one the current stage hands out.
    pub bundle_ok: bool,
    /// The installed chain goes through the issuer the stage wants.
    pub chain_ok: bool,
    /// When the installed intermediate was issued.
    pub intermediate_issued_at: Option<i64>,
    /// When the cluster last reported (plug-in).
    pub reported_at: Option<i64>,
    /// External-CA: live workload certificates issued before the bundle last grew.
    pub stale_bundle_workloads: i64,
    /// External-CA: live workload certificates issued before the chain last changed.
    pub stale_chain_workloads: i64,
    /// External-CA with an agent: what its last namespace report showed (`None`: the cluster
    /// has no agent, and only workload certificates are judged).
    pub namespaces: Option<NamespaceBundles>,
}

/// What an external-CA cluster's agent last reported of its namespaces' `istio-ca-root-cert`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NamespaceBundles {
    /// When; `None` until the agent first reports.
    pub reported_at: Option<i64>,
    /// How many namespaces the report covered.
    pub reported: usize,
    /// Up to a few namespaces whose ConfigMap does not hold exactly the current bundle ...
    pub lagging: Vec<String>,
    /// ... and how many there are in all.
    pub lagging_total: usize,
}

impl NamespaceBundles {
    /// Why the cluster's namespaces do not all hold the current bundle, if they do not.
    pub fn blocker(&self) -> Option<String> {
        if self.reported_at.is_none() {
            return Some("no namespace report from the agent yet".into());
        }
        let more = self.lagging_total.saturating_sub(self.lagging.len());
        let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
        (self.lagging_total > 0).then(|| {
            let (n, of, named) = (self.lagging_total, self.reported, self.lagging.join(", "));
            format!("{n} of {of} namespaces do not hold the current trust bundle in istio-ca-root-cert: {named}{tail}")
        })
    }
}

/// Everything a stage gate looks at.
#[derive(Clone, Debug)]
pub struct GateInput<'a> {
    pub kind: RotationKind,
    pub from: Stage,
    pub to: Stage,
    pub bundle_changed_at: i64,
    pub chain_changed_at: i64,
    pub drain_until: Option<i64>,
    /// Rollbacks that drop a root or forget an intermediate: until when workload certificates
    /// issued on the chain being abandoned may still be live (none if chains never moved).
    pub settle_until: Option<i64>,
    pub now: i64,
    pub clusters: &'a [ClusterProgress],
    /// Preconditions not about clusters (e.g. an environment without its re-signed
    /// certificate), already phrased for the operator.
    pub missing: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocker {
    pub cluster: Option<String>,
    pub reason: String,
}

impl Blocker {
    fn cluster(name: &str, reason: String) -> Blocker {
        Blocker { cluster: Some(name.to_string()), reason }
    }
}

/// Whether the cluster's intermediate was issued on the chain the current stage hands out.
fn chain_blocker(g: &GateInput<'_>, c: &ClusterProgress) -> Option<Blocker> {
    let on_chain = c.chain_ok && c.intermediate_issued_at.is_some_and(|t| t >= g.chain_changed_at);
    let why = if c.external_ca {
        "the server has not issued its intermediate on the current chain yet"
    } else {
        "has not renewed onto the current chain"
    };
    (!on_chain).then(|| Blocker::cluster(&c.name, why.into()))
}

/// External-CA: live workload certificates from intermediates issued before the chain last
/// changed (`which` names that chain for the operator).
fn stale_chain_blocker(c: &ClusterProgress, which: &str) -> Option<Blocker> {
    (c.external_ca && c.stale_chain_workloads > 0).then(|| {
        Blocker::cluster(
            &c.name,
            format!("{} live workload certificates still present the {which} chain", c.stale_chain_workloads),
        )
    })
}

/// Whether a cluster holds what the current stage hands out.
pub fn cluster_blockers(g: &GateInput<'_>, c: &ClusterProgress) -> Vec<Blocker> {
    let mut out = Vec::new();
    if c.external_ca {
        // The agent's report says what each namespace's ConfigMap holds: a stage that would
        // leave one without the bundle it hands out now waits for it.
        if let Some(why) = c.namespaces.as_ref().and_then(NamespaceBundles::blocker) {
            out.push(Blocker::cluster(&c.name, why));
        }
        if bundle_grew(g.kind, g.from) && c.stale_bundle_workloads > 0 {
            out.push(Blocker::cluster(
                &c.name,
                format!(
                    "{} live workload certificates were issued before the bundle changed; they expire or renew within the workload TTL",
                    c.stale_bundle_workloads
                ),
            ));
        }
        out.extend(chain_blocker(g, c));
        return out;
    }
    let Some(reported) = c.reported_at else {
        out.push(Blocker::cluster(
            &c.name,
            "has never reported its installed bundle: run `ca-cli cluster renew` there (it reports on every run)"
                .into(),
        ));
        return out;
    };
    let since = g.bundle_changed_at.max(g.chain_changed_at);
    if reported < since {
        out.push(Blocker::cluster(
            &c.name,
            format!("has not reported since the stage changed (last report at {reported})"),
        ));
        return out;
    }
    if !c.bundle_ok {
        out.push(Blocker::cluster(&c.name, "its installed trust bundle is not the current one".into()));
    }
    out.extend(chain_blocker(g, c));
    out
}

/// Why the rotation may not move from `g.from` to `g.to` now; empty when it may.
///
/// Forward, every cluster must hold what the current stage hands out (leaving *prepared* needs
/// nothing from clusters: nothing has changed yet), and leaving *drain* also waits until the
/// longest-lived certificate on the old chain has expired. Backwards, only a move that drops a
/// root from the bundles waits for clusters; every other rollback widens trust and is safe.
pub fn blockers(g: &GateInput<'_>) -> Vec<Blocker> {
    let mut out: Vec<Blocker> = g.missing.iter().map(|m| Blocker { cluster: None, reason: m.clone() }).collect();
    let forward = g.kind.next(g.from) == Some(g.to);
    let backward = g.kind.rollback(g.from) == Some(g.to);
    if !forward && !backward {
        out.push(Blocker {
            cluster: None,
            reason: format!("a {} rotation cannot go from {} to {}", g.kind, g.from, g.to),
        });
        return out;
    }
    if forward && g.from != Stage::Prepared {
        for c in g.clusters {
            out.extend(cluster_blockers(g, c));
        }
    }
    // Going back is safe while trust only widens. Dropping a root, or aborting once chains
    // moved, waits until nothing live presents the chain being abandoned: every cluster back
    // on the current chain, and every workload certificate issued on the other one expired.
    let abandons_chain = g.to == Stage::Aborted && g.chain_changed_at > 0;
    if backward && (shrinks_bundle(g.kind, g.from, g.to) || abandons_chain) && g.chain_changed_at > 0 {
        for c in g.clusters {
            if !c.external_ca && c.reported_at.is_none_or(|r| r < g.chain_changed_at) {
                out.push(Blocker::cluster(&c.name, "has not reported since the chain changed".into()));
                continue;
            }
            out.extend(chain_blocker(g, c));
            out.extend(stale_chain_blocker(c, "other"));
        }
        if let Some(t) = g.settle_until.filter(|t| g.now < *t) {
            out.push(Blocker {
                cluster: None,
                reason: format!(
                    "workload certificates issued on the abandoned chain may be live until {t} ({}s left)",
                    t - g.now
                ),
            });
        }
    }
    if forward && g.from == Stage::Drain {
        match g.drain_until {
            Some(t) if g.now < t => out.push(Blocker {
                cluster: None,
                reason: format!("draining until {} ({}s left): the longest workload TTL plus margin", t, t - g.now),
            }),
            _ => {}
        }
        out.extend(g.clusters.iter().filter_map(|c| stale_chain_blocker(c, "old")));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn root_bundles_only_grow_then_shrink() {
        let k = RotationKind::Root;
        let seq: Vec<Trust> = k.stages().iter().map(|s| trust(k, *s)).collect();
        // {old} -> {old,new} -> ... -> {new}: each step a superset or subset of the previous.
        for w in seq.windows(2) {
            let (a, b) = (w[0], w[1]);
            let superset = (b.old || !a.old) && (b.new || !a.new);
            let subset = (a.old || !b.old) && (a.new || !b.new);
            assert!(superset || subset, "{a:?} -> {b:?}");
        }
        assert_eq!(trust(k, Stage::Prepared), Trust { old: true, new: false });
        assert_eq!(trust(k, Stage::Done), Trust { old: false, new: true });
        // Chains change only while both roots are trusted.
        assert!(!new_chain(Stage::Distribute) && new_chain(Stage::Reissue));
        assert_eq!(trust(k, Stage::Reissue), Trust { old: true, new: true });
        assert!(shrinks_bundle(k, Stage::Drain, Stage::Retire));
        assert!(!shrinks_bundle(k, Stage::Retire, Stage::Drain));
        assert!(shrinks_bundle(k, Stage::Distribute, Stage::Aborted));
    }

    #[test]
    fn transitions() {
        let k = RotationKind::Environment;
        assert_eq!(k.next(Stage::Prepared), Some(Stage::Reissue));
        assert_eq!(k.next(Stage::Done), None);
        assert_eq!(RotationKind::Root.next(Stage::Prepared), Some(Stage::Distribute));
        assert_eq!(RotationKind::Cluster.rollback(Stage::Retire), None);
        assert_eq!(RotationKind::Root.rollback(Stage::Reissue), Some(Stage::Distribute));
        assert_eq!(k.rollback(Stage::Done), None);
        assert_eq!("drain".parse::<Stage>().unwrap(), Stage::Drain);
        assert!("later".parse::<Stage>().is_err());
    }

    fn plugin(name: &str, bundle: &[&str], chain_ok: bool, issued: i64, reported: i64) -> ClusterProgress {
        ClusterProgress {
            name: name.into(),
            bundle_ok: set(bundle) == set(&["O", "N"]),
            chain_ok,
            intermediate_issued_at: Some(issued),
            reported_at: Some(reported),
            ..Default::default()
        }
    }

    fn gate(from: Stage, to: Stage, clusters: &[ClusterProgress]) -> GateInput<'_> {
        GateInput {
            kind: RotationKind::Root,
            from,
            to,
            bundle_changed_at: 100,
            chain_changed_at: 200,
            drain_until: Some(1000),
            settle_until: None,
            now: 500,
            clusters,
            missing: vec![],
        }
    }

    #[test]
    fn a_lagging_cluster_blocks_the_next_stage() {
        let ok = plugin("a", &["O", "N"], true, 250, 300);
        let old_bundle = plugin("b", &["O"], true, 250, 300);
        let silent = ClusterProgress { name: "c".into(), ..Default::default() };
        let stale_report = plugin("d", &["O", "N"], true, 250, 150);
        let old_chain = plugin("e", &["O", "N"], false, 250, 300);
        let clusters = [ok.clone(), old_bundle, silent, stale_report, old_chain];
        let b = blockers(&gate(Stage::Reissue, Stage::Drain, &clusters));
        let named: BTreeSet<_> = b.iter().filter_map(|b| b.cluster.clone()).collect();
        assert_eq!(named, set(&["b", "c", "d", "e"]), "{b:?}");
        assert!(blockers(&gate(Stage::Reissue, Stage::Drain, std::slice::from_ref(&ok))).is_empty());
        // Leaving prepared waits for nobody; a rollback that widens trust neither.
        assert!(blockers(&gate(Stage::Prepared, Stage::Distribute, &clusters)).is_empty());
        assert!(blockers(&gate(Stage::Retire, Stage::Drain, &clusters)).is_empty());
        // Aborting before any chain moved is always safe, whatever the clusters hold.
        let mut g = gate(Stage::Distribute, Stage::Aborted, &clusters);
        g.chain_changed_at = 0;
        assert!(blockers(&g).is_empty(), "{:?}", blockers(&g));
        // After chains moved and came back, it waits for every cluster to be back on the old
        // chain (bundles do not matter) and for certificates on the new one to expire.
        let back = plugin("a", &["O"], true, 250, 300);
        let g = GateInput {
            settle_until: Some(900),
            ..gate(Stage::Distribute, Stage::Aborted, std::slice::from_ref(&back))
        };
        let b = blockers(&g);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(b[0].reason.contains("abandoned chain"), "{b:?}");
        let g = GateInput { settle_until: Some(400), ..g };
        assert!(blockers(&g).is_empty());
        let still_new = plugin("a", &["O", "N"], false, 250, 300);
        let g = GateInput {
            settle_until: Some(400),
            ..gate(Stage::Distribute, Stage::Aborted, std::slice::from_ref(&still_new))
        };
        assert!(blockers(&g)[0].reason.contains("has not renewed onto the current chain"));
        let ext = ClusterProgress {
            name: "x".into(),
            external_ca: true,
            chain_ok: true,
            intermediate_issued_at: Some(250),
            stale_chain_workloads: 4,
            ..Default::default()
        };
        let g = GateInput {
            settle_until: Some(400),
            ..gate(Stage::Distribute, Stage::Aborted, std::slice::from_ref(&ext))
        };
        assert!(blockers(&g)[0].reason.contains("still present the other chain"), "{:?}", blockers(&g));
        // An environment rotation aborts only from prepared, after clusters renewed back.
        assert_eq!(RotationKind::Environment.rollback(Stage::Reissue), Some(Stage::Prepared));
        let env = GateInput {
            kind: RotationKind::Environment,
            ..gate(Stage::Prepared, Stage::Aborted, std::slice::from_ref(&still_new))
        };
        assert!(!blockers(&env).is_empty());
        // Skipping a stage is never allowed.
        let skip = blockers(&gate(Stage::Reissue, Stage::Retire, &[ok]));
        assert!(skip[0].reason.contains("cannot go from reissue to retire"), "{skip:?}");
    }

    #[test]
    fn drain_waits_for_time_and_for_live_old_certificates() {
        let ext = ClusterProgress {
            name: "x".into(),
            external_ca: true,
            chain_ok: true,
            intermediate_issued_at: Some(250),
            stale_chain_workloads: 3,
            ..Default::default()
        };
        let mut g = gate(Stage::Drain, Stage::Retire, std::slice::from_ref(&ext));
        let b = blockers(&g);
        assert_eq!(b.len(), 2, "{b:?}");
        g.now = 1000;
        assert_eq!(blockers(&g).len(), 1);
        let drained = ClusterProgress { stale_chain_workloads: 0, ..ext.clone() };
        g.clusters = std::slice::from_ref(&drained);
        assert!(blockers(&g).is_empty());
    }

    #[test]
    fn external_ca_distribute_waits_for_workloads_holding_the_old_bundle() {
        let ext = ClusterProgress {
            name: "x".into(),
            external_ca: true,
            chain_ok: true,
            intermediate_issued_at: Some(50),
            stale_bundle_workloads: 2,
            ..Default::default()
        };
        let mut g = gate(Stage::Distribute, Stage::Reissue, std::slice::from_ref(&ext));
        g.chain_changed_at = 0;
        assert_eq!(blockers(&g).len(), 1);
        let fresh = ClusterProgress { stale_bundle_workloads: 0, ..ext.clone() };
        g.clusters = std::slice::from_ref(&fresh);
        assert!(blockers(&g).is_empty());
    }

    /// An external-CA cluster with an agent is held back by its namespaces' ConfigMaps, named
    /// (a few of them) in the reason; one without an agent is judged as before.
    #[test]
    fn external_ca_with_an_agent_waits_for_every_namespace() {
        let ext = ClusterProgress {
            name: "x".into(),
            external_ca: true,
            chain_ok: true,
            intermediate_issued_at: Some(50),
            ..Default::default()
        };
        let mut g = gate(Stage::Distribute, Stage::Reissue, std::slice::from_ref(&ext));
        g.chain_changed_at = 0;
        assert!(blockers(&g).is_empty(), "no agent: judged from workload certificates only");
        let silent = ClusterProgress { namespaces: Some(NamespaceBundles::default()), ..ext.clone() };
        g.clusters = std::slice::from_ref(&silent);
        assert_eq!(blockers(&g)[0].reason, "no namespace report from the agent yet");
        let lagging = ClusterProgress {
            namespaces: Some(NamespaceBundles {
                reported_at: Some(100),
                reported: 40,
                lagging: vec!["a".into(), "b".into()],
                lagging_total: 7,
            }),
            ..ext.clone()
        };
        g.clusters = std::slice::from_ref(&lagging);
        let b = blockers(&g);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(
            b[0].reason,
            "7 of 40 namespaces do not hold the current trust bundle in istio-ca-root-cert: a, b and 5 more"
        );
        let current = ClusterProgress {
            namespaces: Some(NamespaceBundles { reported_at: Some(100), reported: 40, ..Default::default() }),
            ..ext.clone()
        };
        g.clusters = std::slice::from_ref(&current);
        assert!(blockers(&g).is_empty());
        // Leaving prepared needs nothing from clusters, report or not.
        let g = gate(Stage::Prepared, Stage::Distribute, std::slice::from_ref(&silent));
        assert!(blockers(&g).is_empty());
    }
}
