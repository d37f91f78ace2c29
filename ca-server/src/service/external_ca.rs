//! External-CA mode: the cluster intermediates whose keys this server holds. `Istio` is what
//! the mode keeps in memory (token validators, the cache of loaded cluster CAs, the recorders,
//! the serving certificate); `ensure_intermediate` issues a cluster's intermediate when due and
//! `maintain` is the periodic upkeep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use ca_core::cert::CertInfo;
use ca_core::names::TrustDomain;
use ca_store::{AuditEvent, ClusterRecord, Store, now_secs};
use serde_json::json;

use crate::auth::service_account::TokenValidator;
use crate::config::IstioConfig;
use crate::error::{ErrorCode, ServiceError};
use crate::service::recorder::Recorder;
use crate::service::serving_cert::{ServingCert, ensure_serving_cert};
use crate::service::state::{AppState, Issuer};

/// Everything external-CA mode keeps in memory.
pub struct Istio {
    tokens: HashMap<String, Arc<TokenValidator>>,
    clusters: RwLock<HashMap<String, Arc<ClusterCa>>>,
    /// Single-flight loading of a cluster's CA, so that a storm on a cold cache opens the key once.
    loading: tokio::sync::Mutex<()>,
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
        let mut tokens = HashMap::new();
        if let Some(cfg) = config {
            for (name, c) in &cfg.clusters {
                tokens.insert(name.clone(), Arc::new(TokenValidator::new(name, c.clone())?));
            }
        }
        let batch_max = config.map_or(1, |c| c.batch_max);
        Ok(Istio {
            tokens,
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

    /// Whether the cluster is configured for external-CA mode here.
    pub fn serves(&self, name: &str) -> bool {
        self.tokens.contains_key(name)
    }

    /// The cluster's service-account token validator, if it is configured here.
    pub fn validator(&self, name: &str) -> Option<&Arc<TokenValidator>> {
        self.tokens.get(name)
    }

    fn cached(&self, name: &str) -> Option<Arc<ClusterCa>> {
        self.clusters.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
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

    /// Loads initial keys for every cluster (discovery URLs are fetched here).
    pub async fn load_keys(&self) {
        for v in self.tokens.values() {
            if let Err(e) = v.refresh(true).await {
                tracing::warn!(cluster = %v.cluster, error = %format!("{e:#}"), "service-account keys not loaded yet; will retry on first use");
            }
        }
    }

    /// Re-reads every cluster's keys when their refresh period has passed.
    pub async fn refresh_keys(&self) {
        for v in self.tokens.values() {
            if v.due() {
                if let Err(e) = v.refresh(true).await {
                    tracing::warn!(cluster = %v.cluster, error = %format!("{e:#}"), "service-account key refresh failed; keeping the previous keys");
                }
            }
        }
    }
}
/// How long a failed load is remembered.
const LOAD_RETRY: Duration = Duration::from_secs(2);

fn recent_failure(state: &AppState, name: &str) -> Option<ServiceError> {
    let failed = state.istio.failed.lock().unwrap_or_else(|p| p.into_inner());
    let (at, e) = failed.get(name)?;
    (at.elapsed() < LOAD_RETRY).then(|| e.clone())
}

/// The cluster's CA, from the cache or loaded from storage (and its key opened).
pub async fn cluster_ca(state: &AppState, name: &str) -> Result<Arc<ClusterCa>, ServiceError> {
    if let Some(c) = state.istio.cached(name) {
        return Ok(c);
    }
    if let Some(e) = recent_failure(state, name) {
        return Err(e);
    }
    let _guard = state.istio.loading.lock().await;
    if let Some(c) = state.istio.cached(name) {
        return Ok(c);
    }
    if let Some(e) = recent_failure(state, name) {
        return Err(e);
    }
    match load_cluster(state, name).await {
        Ok(ca) => {
            state.istio.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
            Ok(ca)
        }
        Err(e) => {
            state
                .istio
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string(), (Instant::now(), e.clone()));
            Err(e)
        }
    }
}

async fn load_cluster(state: &AppState, name: &str) -> Result<Arc<ClusterCa>, ServiceError> {
    let record =
        state.store.get_cluster(name).await?.filter(|c| c.is_external_ca() && c.is_active()).ok_or_else(|| {
            ServiceError::new(
                ErrorCode::ClusterNotServed,
                format!("cluster {name:?} is not an active external-CA cluster here"),
            )
        })?;
    let ca = load_cluster_ca(state, &record).await?;
    state.istio.clusters.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), ca.clone());
    Ok(ca)
}

/// The block on the key of a cluster's intermediate, if its key was revoked for compromise.
pub async fn current_key_blocked(
    state: &AppState,
    cert: &ca_store::CertRecord,
) -> Result<Option<ca_store::BlockedKey>, ServiceError> {
    let info = ca_core::cert::parse_certs(cert.pem.as_bytes(), "stored certificate")
        .map_err(ServiceError::internal)?
        .into_iter()
        .next()
        .ok_or_else(|| ServiceError::internal(format!("certificate {} has no PEM", cert.serial)))?;
    Ok(state.store.blocked_key(&ca_store::spki_sha256(&info.spki_der)).await?)
}

/// An external-CA cluster whose key was revoked for compromise: nothing is signed with it, and
/// nothing certifies it again; a cluster rotation to a new key is the way back.
fn key_compromised(name: &str, b: &ca_store::BlockedKey) -> ServiceError {
    ServiceError::new(
        ErrorCode::KeyCompromised,
        format!(
            "cluster {name}'s key was revoked for {} (certificate {}): it issues nothing until a cluster rotation brings a new key",
            b.reason, b.source_serial
        ),
    )
}

async fn load_cluster_ca(state: &AppState, record: &ClusterRecord) -> Result<Arc<ClusterCa>, ServiceError> {
    let name = &record.name;
    let not_ready = || {
        ServiceError::new(
            ErrorCode::IntermediateNotReady,
            format!("cluster {name} has no intermediate yet; try again shortly"),
        )
    };
    let serial = record.current_serial.clone().ok_or_else(not_ready)?;
    let cert_rec = state.store.get_certificate(&serial).await?.ok_or_else(not_ready)?;
    if let Some(b) = current_key_blocked(state, &cert_rec).await? {
        return Err(key_compromised(name, &b));
    }
    if cert_rec.revoked_at.is_some() {
        return Err(ServiceError::new(
            ErrorCode::IntermediateRevoked,
            format!("cluster {name}'s intermediate {serial} is revoked; a new one is being issued"),
        ));
    }
    let cert = pem::parse(cert_rec.pem.as_bytes())
        .map_err(ServiceError::internal)
        .and_then(|p| CertInfo::from_der(p.into_contents()).map_err(ServiceError::internal))?;
    let env = state.issuer(&record.environment)?.clone();
    let chain: Vec<CertInfo> = std::iter::once(env.cert.clone()).chain(env.chain.iter().cloned()).collect();
    let key_ref: hsm::KeyRef = record
        .key_ref
        .as_deref()
        .ok_or_else(|| ServiceError::internal(format!("external-CA cluster {name} has no key reference")))?
        .parse()
        .map_err(ServiceError::internal)?;
    // The cluster trusts what its environment hands out (both roots during a rotation), not
    // just the root its own chain ends in.
    let issuer = Arc::new(
        Issuer::from_certs(name, key_ref, cert.clone(), chain.clone())
            .map_err(ServiceError::internal)?
            .with_trust(env.roots.clone(), vec![]),
    );
    let i = issuer.clone();
    match tokio::time::timeout(state.hsm_timeout(), tokio::task::spawn_blocking(move || i.reconnect())).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::error!(cluster = %name, error = %format!("{e:#}"), "cluster intermediate key unavailable");
            return Err(ServiceError::new(
                ErrorCode::HsmUnavailable,
                format!("the key of cluster {name} is unavailable"),
            ));
        }
        _ => {
            return Err(ServiceError::new(
                ErrorCode::HsmTimeout,
                format!("the key of cluster {name} did not answer in time"),
            ));
        }
    }
    let below_root: Vec<CertInfo> =
        std::iter::once(cert).chain(chain.into_iter().filter(|c| !c.is_self_issued())).collect();
    let chain_pem: Vec<String> = below_root.iter().map(CertInfo::pem).collect();
    let oldest = env.roots.first().map(CertInfo::fingerprint);
    let ends_in_oldest =
        |chain: &[CertInfo]| chain.iter().any(|c| c.is_self_issued() && Some(c.fingerprint()) == oldest);
    let serving_chain =
        match env.accepted.iter().find(|(c, ch)| {
            c.subject_raw == env.cert.subject_raw && c.spki_der == env.cert.spki_der && ends_in_oldest(ch)
        }) {
            Some((c, ch)) if !ends_in_oldest(&env.chain) => std::iter::once(below_root[0].clone())
                .chain(std::iter::once(c.clone()))
                .chain(ch.iter().filter(|x| !x.is_self_issued()).cloned())
                .collect(),
            _ => below_root,
        };
    let bundle_pem: String = issuer.roots.iter().map(CertInfo::pem).collect();
    Ok(Arc::new(ClusterCa {
        trust_domain: record.trust_domain.parse().map_err(ServiceError::internal)?,
        serial,
        chain_pem,
        serving_chain,
        bundle_pem,
        issuer,
    }))
}

/// Issues (or renews) the intermediate of an external-CA cluster for the key the server holds.
/// Due when the cluster has none, its newest is revoked, or two thirds of its life have passed.
pub async fn ensure_intermediate(state: &AppState, name: &str, actor: &str) -> Result<bool, ServiceError> {
    let Some(cluster) = state.store.get_cluster(name).await? else { return Ok(false) };
    if !cluster.is_external_ca() || !cluster.is_active() {
        return Ok(false);
    }
    let now = now_secs();
    // A rotation that moved the cluster's chain (or key) wants an intermediate issued since.
    let (_, reissue_after) = crate::service::rotation::changed_at(state, &cluster).await?;
    if let Some(serial) = &cluster.current_serial {
        if let Some(c) = state.store.get_certificate(serial).await? {
            let renew_at = c.not_before + (c.not_after - c.not_before) * 2 / 3;
            if c.revoked_at.is_none() && now < renew_at && c.issued_at >= reissue_after {
                return Ok(false);
            }
        }
    }
    let key_ref: hsm::KeyRef = cluster
        .key_ref
        .as_deref()
        .ok_or_else(|| ServiceError::internal(format!("cluster {name} has no key reference")))?
        .parse()
        .map_err(ServiceError::internal)?;
    let kr = key_ref.clone();
    let public = match tokio::time::timeout(
        state.hsm_timeout(),
        tokio::task::spawn_blocking(move || hsm::open_signer(&kr).map(|s| s.public_key().clone())),
    )
    .await
    {
        Ok(Ok(Ok(p))) => p,
        Ok(Ok(Err(e))) => {
            return Err(ServiceError::new(
                ErrorCode::HsmUnavailable,
                format!("opening the key of cluster {name}: {e}"),
            ));
        }
        _ => return Err(ServiceError::new(ErrorCode::HsmTimeout, format!("the key of cluster {name} did not answer"))),
    };
    // Not for a key revoked for compromise, whatever the revocation's own path did.
    let spki = public.spki_der().to_vec();
    if let Some(b) = state.store.blocked_key(&ca_store::spki_sha256(&spki)).await? {
        return Err(key_compromised(name, &b));
    }
    let issuer = state.issuer(&cluster.environment)?.clone();
    let request = crate::service::issuance::cluster_request(state, &issuer, &cluster, public)?;
    let issued = issuer.with_key(state.hsm_timeout(), move |ca| ca_core::issue::issue(ca, &request)).await?;
    let cert = issued.cert;
    let mut tx = state.store.write().await?;
    // Someone else (another replica, an approval) may have got there first.
    let current = tx.get_cluster(name).await?.ok_or_else(|| ServiceError::internal("cluster vanished"))?;
    if current.current_serial != cluster.current_serial || !current.is_active() {
        return Ok(false);
    }
    if let Some(b) = tx.blocked_key(&ca_store::spki_sha256(&spki)).await? {
        return Err(key_compromised(name, &b));
    }
    let record = crate::service::issuance::cert_record(
        &cert,
        ca_store::CertIssuer::Environment(issuer.name.clone()),
        Some(name),
        "cluster",
        actor,
    );
    crate::service::issuance::record_issued(
        &mut tx,
        &record,
        actor,
        json!({"issuer": issuer.name, "via": "external-ca", "renewed_from": cluster.current_serial,
               "key": key_ref.to_string()}),
    )
    .await?;
    tx.set_current(name, &cert.serial, cluster.current_serial.as_deref()).await?;
    tx.commit().await?;
    state.metrics.issued(&issuer.name, "cluster", "ok");
    state.istio.forget(name);
    tracing::info!(cluster = %name, serial = %cert.serial, "external-CA cluster intermediate issued");
    Ok(true)
}

/// Every active external-CA cluster gets its intermediate when due; cached CAs whose cluster
/// moved on (a renewal by another replica, a deactivation) are dropped and reload on use.
pub async fn maintain(state: &AppState, leader: bool) -> Result<()> {
    if state.config.istio.is_none() {
        return Ok(());
    }
    let clusters = state.store.list_clusters().await?;
    if leader {
        for c in clusters.iter().filter(|c| c.is_external_ca() && c.is_active()) {
            if let Err(e) = ensure_intermediate(state, &c.name, &state.job_actor()).await {
                // Expected until a cluster rotation; said once at revocation, not every round.
                if e.code == ErrorCode::KeyCompromised {
                    tracing::debug!(cluster = %c.name, error = %e.detail, "external-CA cluster stopped");
                    continue;
                }
                tracing::warn!(cluster = %c.name, error = %e.detail, "external-CA intermediate not issued; will retry");
            }
        }
    }
    // A cluster that got a new intermediate above was already dropped from the cache by
    // `ensure_intermediate`; at worst this list is a round old and a fresh CA reloads once.
    for ca in state.istio.loaded() {
        let current = clusters.iter().any(|c| {
            c.name == ca.issuer.name && c.is_active() && c.current_serial.as_deref() == Some(ca.serial.as_str())
        });
        let revoked = state.store.get_certificate(&ca.serial).await?.is_none_or(|c| c.revoked_at.is_some());
        // An HSM failure or timeout marks the key unhealthy; dropping it makes the next request
        // open the key afresh (a new login) instead of refusing until the process restarts.
        if !current || revoked || !ca.issuer.is_healthy() {
            state.istio.forget(&ca.issuer.name);
        }
    }
    state.istio.refresh_keys().await;
    if leader {
        let retention = state.config.istio.as_ref().map_or(0, |c| c.retention.duration().whole_seconds());
        let before = now_secs() - retention;
        let mut tx = state.store.write().await?;
        let pruned = tx.prune_workload_certificates(before).await?;
        if pruned > 0 {
            tx.audit(AuditEvent::new(
                state.job_actor(),
                "workload.pruned",
                format!("{pruned} certificates"),
                json!({"count": pruned, "expired_before": before}),
            ))
            .await?;
        }
        tx.commit().await?;
    }
    if let Err(e) = ensure_serving_cert(state).await {
        tracing::warn!(error = %e.detail, "gRPC serving certificate not renewed; will retry");
    }
    Ok(())
}
