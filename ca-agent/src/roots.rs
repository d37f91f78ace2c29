//! External-CA mode: publishes ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in every
//! namespace but the excluded ones, as istiod does when it is the CA. Driven by watches, not
//! polling: a new namespace gets it when it appears, an edited or deleted copy is put back at
//! once, and a bundle change from ca-server is written everywhere. What each namespace holds is
//! kept for the namespace report that the rotation gates read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use ca_core::cert::parse_certs;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};

use crate::status::Status;

pub const NAME: &str = "istio-ca-root-cert";
pub const KEY: &str = "root-cert.pem";

/// What each namespace's ConfigMap holds: root fingerprints; empty when it is missing.
pub type Held = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

pub struct Roots {
    pub client: Client,
    pub status: Arc<Status>,
    pub exclude: Vec<String>,
    /// The bundle to publish (PEM), once ca-server has said.
    pub bundle: watch::Receiver<Option<String>>,
    pub held: Held,
    /// Woken when what the namespaces hold changed, so the report goes out promptly.
    pub changed: Arc<Notify>,
    pub resync: Duration,
}

fn fingerprints_of(pem: &str) -> Vec<String> {
    let mut fps: Vec<String> =
        parse_certs(pem.as_bytes(), "root-cert.pem").map(|c| ca_core::cert::fingerprints(&c)).unwrap_or_default();
    fps.sort();
    fps.dedup();
    fps
}

impl Roots {
    /// Runs until cancelled (leadership lost).
    pub async fn run(mut self) -> Result<()> {
        // Nothing to publish before ca-server has given a bundle.
        let _ = self.bundle.wait_for(Option::is_some).await;
        let mut namespaces =
            watcher(Api::<Namespace>::all(self.client.clone()), watcher::Config::default()).default_backoff().boxed();
        let mut maps = watcher(
            Api::<ConfigMap>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={NAME}")),
        )
        .default_backoff()
        .boxed();
        let mut live: BTreeSet<String> = BTreeSet::new();
        let mut relisting: Option<BTreeSet<String>> = None;
        let mut tick = tokio::time::interval(self.resync);
        loop {
            tokio::select! {
                ev = namespaces.next() => match ev {
                    Some(Ok(watcher::Event::Init)) => relisting = Some(BTreeSet::new()),
                    Some(Ok(watcher::Event::InitApply(ns))) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        if active(&ns) {
                            relisting.get_or_insert_with(BTreeSet::new).insert(name);
                        }
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        live = relisting.take().unwrap_or_default();
                        self.track(&live);
                        self.status.api_ok();
                        self.publish_all(&live).await;
                    }
                    Some(Ok(watcher::Event::Apply(ns))) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        if active(&ns) {
                            if live.insert(name.clone()) {
                                tracing::info!(namespace = %name, "new namespace");
                                self.track(&live);
                            }
                            self.publish(&name).await;
                        } else {
                            live.remove(&name);
                        }
                    }
                    Some(Ok(watcher::Event::Delete(ns))) => {
                        let name = ns.metadata.name.unwrap_or_default();
                        live.remove(&name);
                        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                        self.changed.notify_one();
                    }
                    Some(Err(e)) => {
                        self.status.error("watch-namespaces");
                        tracing::warn!(error = %e, "watching namespaces failed; retrying with backoff");
                    }
                    None => anyhow::bail!("the namespace watch ended"),
                },
                ev = maps.next() => match ev {
                    Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                        let ns = cm.metadata.namespace.clone().unwrap_or_default();
                        let data = cm.data.as_ref().and_then(|d| d.get(KEY)).cloned().unwrap_or_default();
                        self.record(&ns, fingerprints_of(&data));
                        if live.contains(&ns) && !self.current(&data) {
                            tracing::info!(namespace = %ns, "istio-ca-root-cert was changed by someone else; putting it back");
                            self.publish(&ns).await;
                        }
                    }
                    Some(Ok(watcher::Event::Delete(cm))) => {
                        let ns = cm.metadata.namespace.clone().unwrap_or_default();
                        // Gone with its namespace: nothing to report for it.
                        if live.contains(&ns) {
                            self.record(&ns, Vec::new());
                            tracing::info!(namespace = %ns, "istio-ca-root-cert was deleted; putting it back");
                            self.publish(&ns).await;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        self.status.error("watch-configmaps");
                        tracing::warn!(error = %e, "watching ConfigMaps failed; retrying with backoff");
                    }
                    None => anyhow::bail!("the ConfigMap watch ended"),
                },
                r = self.bundle.changed() => {
                    if r.is_err() {
                        anyhow::bail!("the bundle source went away");
                    }
                    tracing::info!("the trust bundle changed; publishing it in every namespace");
                    self.publish_all(&live).await;
                }
                _ = tick.tick() => {
                    // A safety net for writes that failed: the watches drive everything else.
                    let stale: Vec<String> = {
                        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                        let want = self.want_fps();
                        live.iter().filter(|ns| held.get(*ns) != Some(&want)).cloned().collect()
                    };
                    for ns in stale {
                        self.publish(&ns).await;
                    }
                }
            }
        }
    }

    fn want(&self) -> String {
        self.bundle.borrow().clone().unwrap_or_default()
    }

    fn want_fps(&self) -> Vec<String> {
        fingerprints_of(&self.want())
    }

    fn current(&self, data: &str) -> bool {
        fingerprints_of(data) == self.want_fps()
    }

    /// The report covers exactly the live namespaces: one whose ConfigMap never got written is
    /// reported as holding nothing, so the gates see it.
    fn track(&self, live: &BTreeSet<String>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|k, _| live.contains(k));
        for ns in live {
            held.entry(ns.clone()).or_default();
        }
        self.changed.notify_one();
    }

    fn record(&self, ns: &str, fps: Vec<String>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(ns) != Some(&fps) {
            held.insert(ns.to_string(), fps);
            self.changed.notify_one();
        }
    }

    async fn publish_all(&self, live: &BTreeSet<String>) {
        for ns in live {
            self.publish(ns).await;
        }
    }

    /// Makes `ns`'s ConfigMap hold the bundle: created when missing, replaced (conditionally on
    /// the resourceVersion read) when different. Excluded namespaces are left alone.
    async fn publish(&self, ns: &str) {
        if self.exclude.iter().any(|e| e == ns) {
            return;
        }
        let want = self.want();
        if want.is_empty() {
            return;
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let pp = PostParams::default();
        for _ in 0..3 {
            let existing = match crate::k8s::retrying(4, || api.get_opt(NAME)).await {
                Ok(e) => e,
                Err(e) => {
                    self.status.error(crate::k8s::cause(&e));
                    tracing::warn!(namespace = %ns, error = %e, "reading istio-ca-root-cert failed");
                    return;
                }
            };
            let held =
                existing.as_ref().and_then(|c| c.data.as_ref()).and_then(|d| d.get(KEY)).cloned().unwrap_or_default();
            if existing.is_some() && self.current(&held) {
                self.record(ns, fingerprints_of(&held));
                self.status.synced(&format!("configmap/{ns}"));
                return;
            }
            let mut obj = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(NAME.into()),
                    namespace: Some(ns.into()),
                    labels: Some(BTreeMap::from([(crate::k8s::MANAGED_BY.0.into(), crate::k8s::MANAGED_BY.1.into())])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(KEY.to_string(), want.clone())])),
                ..Default::default()
            };
            let result = match existing {
                Some(cur) => {
                    // Keep what others put on it (labels, annotations), change only our key.
                    let mut next = cur.clone();
                    next.data.get_or_insert_with(BTreeMap::new).insert(KEY.to_string(), want.clone());
                    obj = next;
                    crate::k8s::retrying(4, || api.replace(NAME, &pp, &obj)).await
                }
                None => crate::k8s::retrying(4, || api.create(&pp, &obj)).await,
            };
            match result {
                Ok(_) => {
                    self.status.api_ok();
                    self.record(ns, fingerprints_of(&want));
                    self.status.synced(&format!("configmap/{ns}"));
                    return;
                }
                // Changed or created meanwhile: read again and decide afresh.
                Err(e) if crate::k8s::status(&e) == Some(409) => continue,
                // The namespace is going away.
                Err(e) if crate::k8s::status(&e) == Some(404) => return,
                Err(e) => {
                    self.status.error(crate::k8s::cause(&e));
                    tracing::warn!(namespace = %ns, error = %e, "writing istio-ca-root-cert failed");
                    return;
                }
            }
        }
    }
}

/// A namespace that is not being deleted.
fn active(ns: &Namespace) -> bool {
    ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
        && ns.metadata.deletion_timestamp.is_none()
}
