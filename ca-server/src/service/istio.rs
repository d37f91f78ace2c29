//! What external-CA mode keeps in memory: token validators, the cache of loaded cluster CAs
//! (loaded by `cluster_ca`), the recorders and the gRPC serving certificate. Plain data and
//! its bookkeeping: nothing here reaches the store or the HSM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use ca_core::cert::CertInfo;
use ca_core::names::TrustDomain;
use ca_store::Store;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::auth::service_account::TokenValidator;
use crate::config::IstioConfig;
use crate::error::ServiceError;
use crate::service::issuer::Issuer;
use crate::service::recorder::Recorder;

/// Everything external-CA mode keeps in memory.
pub struct Istio {
    /// One validator per external-CA cluster with settings, built from the database by
    /// `cluster_settings::reload` and replaced whenever the stored settings change.
    tokens: RwLock<HashMap<String, Arc<TokenValidator>>>,
    clusters: RwLock<HashMap<String, Arc<ClusterCa>>>,
    /// Single-flight loading of a cluster's CA, so that a storm on a cold cache opens the key once.
    pub(super) loading: tokio::sync::Mutex<()>,
    /// Clusters whose CA failed to load, and when: requests fail fast for a moment instead of
    /// queueing one by one behind a key that does not answer.
    failed: Mutex<HashMap<String, LoadFailure>>,
    pub(super) recorder: Recorder,
    /// Refusals of authenticated callers: their own queue and transactions, so that they never
    /// delay an issuance's commit (unauthenticated ones are only counted, see `edge`).
    pub(super) denials: Recorder,
    /// Issuances running at once. Each is CPU work on a blocking thread; hundreds of them in a
    /// restart storm would crowd out the database writer and the network tasks (every request
    /// then waits on a starved commit), so they queue here instead.
    pub(super) issuing: tokio::sync::Semaphore,
    pub serving: Arc<ServingCert>,
}

/// When a cluster's CA last failed to load, and the error to repeat.
type LoadFailure = (Instant, ServiceError);

/// A cluster intermediate held by this server, ready to sign.
pub struct ClusterCa {
    pub issuer: Arc<Issuer>,
    pub trust_domain: TrustDomain,
    pub serial: String,
    /// The intermediate, then its parents below the root, PEM-encoded once for every response.
    pub chain_pem: Vec<String>,
    /// The chain the gRPC serving certificate presents: during a root rotation it goes to the
    /// bundle's first (oldest) root while that is trusted, through the environment's
    /// certificate under it (same subject and key), so that agents whose configured root is
    /// still the old one can reach the CA until the retire stage.
    pub serving_chain: Vec<CertInfo>,
    /// Every root the cluster trusts, concatenated (PEM): the response's last element.
    pub(super) bundle_pem: String,
}

impl Istio {
    pub fn new(
        config: Option<&IstioConfig>,
        store: Store,
        batch_metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Istio> {
        let batch_max = config.map_or(1, |c| c.batch_max);
        Ok(Istio {
            tokens: RwLock::new(HashMap::new()),
            clusters: RwLock::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
            failed: Mutex::new(HashMap::new()),
            recorder: Recorder::spawn(store.clone(), 65_536, batch_max, batch_metrics.clone()),
            denials: Recorder::spawn(store, 4096, batch_max, batch_metrics),
            issuing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get).max(2),
            ),
            serving: Arc::new(ServingCert::default()),
        })
    }

    /// Whether the cluster is served here: an active external-CA cluster with settings.
    pub fn serves(&self, name: &str) -> bool {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).contains_key(name)
    }

    /// The cluster's service-account token validator (with its settings), if it is served.
    pub fn validator(&self, name: &str) -> Option<Arc<TokenValidator>> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The clusters served here, by name.
    pub fn served(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tokens.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }

    /// Serves exactly `validators` from now on (a validator of the same version is kept, with
    /// its cache of verified tokens).
    pub(super) fn install_validators(&self, validators: HashMap<String, Arc<TokenValidator>>) {
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = validators;
    }

    pub(super) fn cached(&self, name: &str) -> Option<Arc<ClusterCa>> {
        self.clusters.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Caches a freshly loaded CA and forgets an earlier failure to load it.
    pub(super) fn loaded_now(&self, name: &str, ca: Arc<ClusterCa>) {
        self.clusters.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), ca);
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Remembers that loading the cluster's CA failed, for `recent_failure` to repeat.
    pub(super) fn failed_now(&self, name: &str, e: &ServiceError) {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), (Instant::now(), e.clone()));
    }

    /// The error of a load that failed a moment ago.
    pub(super) fn recent_failure(&self, name: &str) -> Option<ServiceError> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let (at, e) = failed.get(name)?;
        (at.elapsed() < LOAD_RETRY).then(|| e.clone())
    }

    /// Drops the cluster's CA (and any remembered load failure): the next request loads afresh.
    pub fn forget(&self, name: &str) {
        self.clusters.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Drops every cached cluster CA (an environment's chain or bundle changed).
    pub fn forget_all(&self) {
        self.clusters.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn loaded(&self) -> Vec<Arc<ClusterCa>> {
        self.clusters.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Re-reads every cluster's keys from OIDC discovery when their refresh period has passed.
    pub async fn refresh_keys(&self) {
        let validators: Vec<Arc<TokenValidator>> =
            self.tokens.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for v in validators {
            if v.due()
                && let Err(e) = v.refresh(true).await
            {
                tracing::warn!(cluster = %v.cluster, error = %format!("{e:#}"), "service-account key refresh failed; keeping the previous keys");
            }
        }
    }
}

/// How long a failed load is remembered.
const LOAD_RETRY: Duration = Duration::from_secs(2);

/// The gRPC serving certificate: issued by this server from the serving cluster's
/// intermediate (so agents verify it against the mesh root), with a key that never leaves
/// memory, renewed at half-life (`serving_cert`).
#[derive(Default)]
pub struct ServingCert {
    /// The key and chain, when it is due, and which chain it was issued under.
    current: RwLock<Option<(Arc<CertifiedKey>, i64, String)>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(k, _, _)| k.clone())
    }
}

impl ServingCert {
    /// Due at `renew_at`, or as soon as the chain above it changed (a rotation: agents may
    /// soon trust only the new root).
    pub(super) fn renew_due(&self, now: i64, chain: Option<&str>) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|(_, at, issued_under)| now >= *at || chain.is_some_and(|c| c != issued_under))
    }

    /// Serves `key` from now on, until `renew_at`; `chain` identifies the chain it carries.
    pub(super) fn install(&self, key: Arc<CertifiedKey>, renew_at: i64, chain: String) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some((key, renew_at, chain));
    }
}
