//! External-CA mode: Istio's certificate gRPC API (`istio.v1.auth.IstioCertificateService`)
//! for istio-agent and ztunnel.
//!
//! A request is authenticated by the cluster's projected service-account token (validated
//! offline against that cluster's JWKS), signed by the cluster intermediate whose key this
//! server holds, and answered only once its record is durable. Records are written by one
//! recorder task in group commits: whatever requests are waiting when the previous commit
//! ends go into the next, with one audit record listing them all. So a restart storm costs a
//! few transactions per second, not one per workload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ca_core::cert::CertInfo;
use ca_core::csr::VerifiedCsr;
use ca_core::names::{SpiffeId, TrustDomain};
use ca_core::profile::{CertRequest, ProfileKind};
use ca_core::workload::{TtlPolicy, WorkloadDenial};
use ca_store::{AuditEvent, ClusterRecord, Store, WorkloadRecord, now_secs};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::config::{IstioClusterConfig, IstioConfig};
use crate::error::ApiError;
use crate::proto::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
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
    recorder: Recorder,
    /// Refusals of authenticated callers: their own queue and transactions, so that they never
    /// delay an issuance's commit (unauthenticated ones are only counted, see `edge`).
    denials: Recorder,
    /// Issuances running at once. Each is CPU work on a blocking thread; hundreds of them in a
    /// restart storm would crowd out the database writer and the network tasks (every request
    /// then waits on a starved commit), so they queue here instead.
    issuing: tokio::sync::Semaphore,
    pub serving: Arc<ServingCert>,
}

/// When a cluster's CA last failed to load, and the error (status, code, detail) to repeat.
type LoadFailure = (Instant, u16, &'static str, String);

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
    bundle_pem: String,
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

/// The cluster's CA, from the cache or loaded from storage (and its key opened).
/// How long a failed load is remembered.
const LOAD_RETRY: Duration = Duration::from_secs(2);

fn recent_failure(state: &AppState, name: &str) -> Option<ApiError> {
    let failed = state.istio.failed.lock().unwrap_or_else(|p| p.into_inner());
    let (at, status, code, detail) = failed.get(name)?;
    (at.elapsed() < LOAD_RETRY).then(|| {
        ApiError::new(
            axum::http::StatusCode::from_u16(*status).unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE),
            code,
            detail.clone(),
        )
    })
}

pub async fn cluster_ca(state: &AppState, name: &str) -> Result<Arc<ClusterCa>, ApiError> {
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
                .insert(name.to_string(), (Instant::now(), e.status.as_u16(), e.code, e.detail.clone()));
            Err(e)
        }
    }
}

async fn load_cluster(state: &AppState, name: &str) -> Result<Arc<ClusterCa>, ApiError> {
    let record =
        state.store.get_cluster(name).await?.filter(|c| c.is_external_ca() && c.status == "active").ok_or_else(
            || {
                ApiError::forbidden(
                    "cluster-not-served",
                    format!("cluster {name:?} is not an active external-CA cluster here"),
                )
            },
        )?;
    let ca = load_cluster_ca(state, &record).await?;
    state.istio.clusters.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), ca.clone());
    Ok(ca)
}

/// The block on the key of a cluster's intermediate, if its key was revoked for compromise.
pub async fn current_key_blocked(
    state: &AppState,
    cert: &ca_store::CertRecord,
) -> Result<Option<ca_store::BlockedKey>, ApiError> {
    let info = ca_core::cert::parse_certs(cert.pem.as_bytes(), "stored certificate")
        .map_err(ApiError::internal)?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal(format!("certificate {} has no PEM", cert.serial)))?;
    Ok(state.store.blocked_key(&ca_store::spki_sha256(&info.spki_der)).await?)
}

/// An external-CA cluster whose key was revoked for compromise: nothing is signed with it, and
/// nothing certifies it again; a cluster rotation to a new key is the way back.
fn key_compromised(name: &str, b: &ca_store::BlockedKey) -> ApiError {
    ApiError::unavailable(
        "key-compromised",
        format!(
            "cluster {name}'s key was revoked for {} (certificate {}): it issues nothing until a cluster rotation brings a new key",
            b.reason, b.source_serial
        ),
    )
}

async fn load_cluster_ca(state: &AppState, record: &ClusterRecord) -> Result<Arc<ClusterCa>, ApiError> {
    let name = &record.name;
    let not_ready = || {
        ApiError::unavailable(
            "intermediate-not-ready",
            format!("cluster {name} has no intermediate yet; try again shortly"),
        )
    };
    let serial = record.current_serial.clone().ok_or_else(not_ready)?;
    let cert_rec = state.store.get_certificate(&serial).await?.ok_or_else(not_ready)?;
    if let Some(b) = current_key_blocked(state, &cert_rec).await? {
        return Err(key_compromised(name, &b));
    }
    if cert_rec.revoked_at.is_some() {
        return Err(ApiError::unavailable(
            "intermediate-revoked",
            format!("cluster {name}'s intermediate {serial} is revoked; a new one is being issued"),
        ));
    }
    let cert = pem::parse(cert_rec.pem.as_bytes())
        .map_err(ApiError::internal)
        .and_then(|p| CertInfo::from_der(p.into_contents()).map_err(ApiError::internal))?;
    let env = state.issuer(&record.environment)?.clone();
    let chain: Vec<CertInfo> = std::iter::once(env.cert.clone()).chain(env.chain.iter().cloned()).collect();
    let key_ref: hsm::KeyRef = record
        .key_ref
        .as_deref()
        .ok_or_else(|| ApiError::internal(format!("external-CA cluster {name} has no key reference")))?
        .parse()
        .map_err(ApiError::internal)?;
    // The cluster trusts what its environment hands out (both roots during a rotation), not
    // just the root its own chain ends in.
    let issuer = Arc::new(
        Issuer::from_certs(name, key_ref, cert.clone(), chain.clone())
            .map_err(ApiError::internal)?
            .with_trust(env.roots.clone(), vec![]),
    );
    let i = issuer.clone();
    match tokio::time::timeout(state.hsm_timeout(), tokio::task::spawn_blocking(move || i.reconnect())).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::error!(cluster = %name, error = %format!("{e:#}"), "cluster intermediate key unavailable");
            return Err(ApiError::unavailable("hsm-unavailable", format!("the key of cluster {name} is unavailable")));
        }
        _ => {
            return Err(ApiError::unavailable(
                "hsm-timeout",
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
        trust_domain: record.trust_domain.parse().map_err(ApiError::internal)?,
        serial,
        chain_pem,
        serving_chain,
        bundle_pem,
        issuer,
    }))
}

// ---- service-account tokens -----------------------------------------------------------------

/// Algorithms a Kubernetes API server signs service-account tokens with; never HMAC or none.
const TOKEN_ALGS: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384];

/// Validates one cluster's projected service-account tokens offline.
pub struct TokenValidator {
    cluster: String,
    cfg: IstioClusterConfig,
    keys: RwLock<Arc<HashMap<String, DecodingKey>>>,
    last_fetch: Mutex<Option<Instant>>,
    http: reqwest::Client,
    /// Tokens that verified, by SHA-256, with when to stop trusting the result: an agent sends
    /// the same token for every renewal until the kubelet rotates it, and its signature and
    /// claims cannot change. Cleared whenever the keys are re-read, so a key the cluster
    /// withdrew stops working at the next refresh.
    verified: Mutex<HashMap<[u8; 32], (Caller, i64)>>,
    /// Bumped at every key refresh: a verification that began under older keys is not cached.
    generation: std::sync::atomic::AtomicU64,
}

/// Most cached token results per cluster; past it, expired entries go, then all.
const TOKEN_CACHE_MAX: usize = 100_000;
/// A cached result is re-checked at least this often (seconds), whatever the token's expiry.
const TOKEN_CACHE_TTL: i64 = 300;

/// The workload a token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
}

impl Caller {
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

#[derive(Deserialize)]
struct SaClaims {
    exp: i64,
    sub: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<K8sClaims>,
}

#[derive(Deserialize)]
struct K8sClaims {
    namespace: Option<String>,
    serviceaccount: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: Option<String>,
}

/// Kubernetes object names as they may appear in a SPIFFE path: DNS-1123 labels/subdomains.
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl TokenValidator {
    fn new(cluster: &str, cfg: IstioClusterConfig) -> Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(TokenValidator {
            cluster: cluster.to_string(),
            cfg,
            keys: RwLock::new(Arc::new(HashMap::new())),
            last_fetch: Mutex::new(None),
            http,
            verified: Mutex::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A validator with its keys read now from the configured source, as `Istio::load_keys`
    /// does at start; for the fuzz target and tests, which have no `Istio`.
    pub async fn load(cluster: &str, cfg: IstioClusterConfig) -> Result<Self> {
        let v = Self::new(cluster, cfg)?;
        v.refresh(true).await?;
        Ok(v)
    }

    fn due(&self) -> bool {
        let last = *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|t| t.elapsed() >= self.cfg.jwks_refresh.duration().unsigned_abs())
    }

    /// Re-reads the keys. Unless `force`, at most once every 10 s: an unknown `kid` (a key
    /// rotation) triggers a refresh, and a flood of forged kids must not turn into a flood of
    /// fetches.
    async fn refresh(&self, force: bool) -> Result<bool> {
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
                return Ok(false);
            }
            *last = Some(Instant::now());
        }
        let jwks: jsonwebtoken::jwk::JwkSet = if let Some(path) = &self.cfg.jwks_file {
            let text = tokio::fs::read_to_string(path).await.with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: not a JWKS", path.display()))?
        } else {
            let url = self.cfg.oidc_discovery_url.as_deref().expect("validated: file or discovery");
            let doc: serde_json::Value = self
                .http
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .with_context(|| format!("fetching {url}"))?
                .json()
                .await
                .with_context(|| format!("{url}: not a discovery document"))?;
            if doc["issuer"].as_str() != Some(self.cfg.sa_issuer.as_str()) {
                bail!("{url}: issuer {} is not the configured sa_issuer {:?}", doc["issuer"], self.cfg.sa_issuer);
            }
            let jwks_uri = doc["jwks_uri"].as_str().ok_or_else(|| anyhow!("{url}: no jwks_uri"))?;
            self.http
                .get(jwks_uri)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .with_context(|| format!("fetching {jwks_uri}"))?
                .json()
                .await
                .with_context(|| format!("{jwks_uri}: not a JWKS"))?
        };
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    keys.insert(kid, k);
                }
                Err(e) => tracing::warn!(cluster = %self.cluster, %kid, error = %e, "skipping unusable JWKS key"),
            }
        }
        if keys.is_empty() {
            bail!("the JWKS of cluster {} holds no usable key with a kid", self.cluster);
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cache.clear();
        Ok(true)
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).get(kid).cloned()
    }

    /// Verifies the token and names its service account. Errors say what was wrong, never
    /// echo the token.
    pub async fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        if let Some((caller, until)) = self.verified.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            if now < *until {
                return Ok(caller.clone());
            }
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let (caller, exp) = self.verify_uncached(token).await?;
        let leeway = self.cfg.leeway.duration().whole_seconds().max(0);
        let until = (exp + leeway).min(now + TOKEN_CACHE_TTL);
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
            return Ok(caller);
        }
        if cache.len() >= TOKEN_CACHE_MAX {
            cache.retain(|_, (_, u)| *u > now);
            if cache.len() >= TOKEN_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, (caller.clone(), until));
        Ok(caller)
    }

    async fn verify_uncached(&self, token: &str) -> Result<(Caller, i64), ApiError> {
        let invalid = |why: String| ApiError::unauthenticated("invalid-token", why);
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("malformed token: {e}")))?;
        if !TOKEN_ALGS.contains(&header.alg) {
            return Err(invalid(format!("token algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| invalid("token has no key id (kid)".into()))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            // Perhaps the cluster rotated its signing key: look again (rate-limited).
            None => {
                if let Err(e) = self.refresh(false).await {
                    tracing::warn!(cluster = %self.cluster, error = %format!("{e:#}"), "service-account key refresh failed");
                }
                self.key(&kid).ok_or_else(|| {
                    invalid(format!("token key {kid:?} is not among cluster {}'s service-account keys", self.cluster))
                })?
            }
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.cfg.sa_issuer]);
        v.set_audience(&self.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.cfg.leeway.duration().whole_seconds().max(0) as u64;
        let data = jsonwebtoken::decode::<SaClaims>(token, &key, &v).map_err(|e| {
            invalid(crate::auth::describe_jwt_error(
                &e,
                &self.cfg.sa_issuer,
                &format!("one of {:?}", self.cfg.audiences),
            ))
        })?;
        let claims = data.claims;
        let from_k8s = claims
            .kubernetes
            .as_ref()
            .and_then(|k| Some((k.namespace.clone()?, k.serviceaccount.as_ref()?.name.clone()?)));
        let from_sub = claims.sub.as_deref().and_then(|s| {
            let rest = s.strip_prefix("system:serviceaccount:")?;
            let (ns, sa) = rest.split_once(':')?;
            Some((ns.to_string(), sa.to_string()))
        });
        let (namespace, service_account) = match (from_k8s, from_sub) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid("token's kubernetes.io claims and sub name different service accounts".into()));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(invalid("token names no service account".into())),
        };
        if !valid_k8s_name(&namespace) || !valid_k8s_name(&service_account) {
            return Err(invalid("token's namespace or service account is not a valid Kubernetes name".into()));
        }
        Ok((Caller { namespace, service_account }, claims.exp))
    }
}

// ---- group commit ---------------------------------------------------------------------------

enum Entry {
    Issued { record: WorkloadRecord, sha256: String },
    Denied(serde_json::Value),
}

struct Pending {
    entry: Entry,
    done: oneshot::Sender<Result<(), ()>>,
}

/// Hands records to the writer task and waits until they are committed.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
}

impl Recorder {
    fn spawn(store: Store, queue: usize, batch_max: usize, metrics: Arc<crate::metrics::Metrics>) -> Recorder {
        // Bounded: under overload requests wait for room rather than growing memory.
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(record_loop(store, rx, batch_max, metrics));
        Recorder { tx }
    }

    async fn record(&self, entry: Entry) -> Result<(), ApiError> {
        let (done, wait) = oneshot::channel();
        let failed = || ApiError::unavailable("not-recorded", "the certificate could not be recorded; try again");
        self.tx.send(Pending { entry, done }).await.map_err(|_| failed())?;
        wait.await.map_err(|_| failed())?.map_err(|_| failed())
    }
}

async fn record_loop(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    batch_max: usize,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        let started = Instant::now();
        let result = write_batch(&store, &batch).await;
        let took = started.elapsed();
        metrics.workload_commit.observe(took.as_secs_f64());
        if took > Duration::from_millis(100) {
            // Every waiting request waits this long: worth a line when it happens.
            tracing::warn!(ms = took.as_millis() as u64, count = batch.len(), "slow workload commit");
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, count = batch.len(), "writing a batch of workload records failed; the requests fail");
        }
        metrics.workload_batch.observe(batch.len() as f64);
        for p in batch.drain(..) {
            let _ = p.done.send(result.as_ref().map(|_| ()).map_err(|_| ()));
        }
    }
}

async fn write_batch(store: &Store, batch: &[Pending]) -> Result<(), ca_store::StoreError> {
    let mut issued = Vec::new();
    let mut listed = Vec::new();
    let mut denied = Vec::new();
    for p in batch {
        match &p.entry {
            Entry::Issued { record, sha256 } => {
                listed.push(json!({"serial": record.serial, "cluster": record.cluster, "identity": record.identity,
                    "not_after": record.not_after, "sha256": sha256}));
                issued.push(record.clone());
            }
            Entry::Denied(v) => denied.push(v.clone()),
        }
    }
    let mut tx = store.write().await?;
    let action = if issued.is_empty() { "workload.denied" } else { "workload.issued" };
    let subject = format!("{} issued, {} denied", issued.len(), denied.len());
    let mut details = json!({"issued": listed});
    if !denied.is_empty() {
        details["denied"] = serde_json::Value::Array(denied);
    }
    let rec = tx.audit(AuditEvent::new("istio-api", action, subject, details)).await?;
    tx.insert_workload_certificates(&issued, rec.seq).await?;
    tx.commit().await
}

// ---- the gRPC service -----------------------------------------------------------------------

#[derive(Clone)]
pub struct IstioApi {
    state: AppState,
}

/// A refusal with what is known of who was refused.
struct Refusal {
    error: ApiError,
    actor: String,
    cluster: Option<String>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Refusal { error, actor: "anonymous".into(), cluster: None }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for IstioApi {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let remote = request.remote_addr().map(|a| a.ip());
        let credential = request.metadata().contains_key("authorization");
        // No credential: the address's quota is drawn on before any work.
        if !credential {
            if let Some(Err(wait)) = remote.map(|ip| self.state.edge.take(ip)) {
                return Err(self.rate_limited(remote, None, wait, started));
            }
        }
        let result = self.handle(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(r) if r.error.status.is_client_error() => "denied",
            Err(_) => "error",
        };
        self.state
            .metrics
            .workload_latency
            .get_or_create(&crate::metrics::OutcomeLabels { outcome: outcome.into() })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(chain) => Ok(Response::new(IstioCertificateResponse { cert_chain: chain })),
            Err(r) => {
                use crate::edge::{MAX_TEXT, cap};
                // The ClusterID header is the caller's say-so: only a configured name becomes a
                // metric label or goes into the audit trail as is.
                let claimed = r.cluster.clone().unwrap_or_default();
                let known = self.state.istio.tokens.contains_key(&claimed);
                let cluster = if known { claimed.clone() } else { "unknown".to_string() };
                self.state.metrics.issued(&cluster, "workload", outcome);
                if r.error.status.is_client_error() {
                    let shown = cap(&claimed, 64);
                    let detail = cap(&r.error.detail, MAX_TEXT);
                    if r.actor == "anonymous" {
                        // A credential that failed draws on the address's quota.
                        if credential {
                            if let Some(Err(wait)) = remote.map(|ip| self.state.edge.take(ip)) {
                                return Err(self.rate_limited(remote, Some(shown), wait, started));
                            }
                        }
                        tracing::debug!(%cluster, code = r.error.code, %detail, "unauthenticated workload request refused");
                        self.state.edge.denied("grpc", r.error.code, remote, || {
                            json!({"api": "grpc", "cluster": {"claimed": shown}, "code": r.error.code,
                                   "detail": detail, "remote": remote.map(|r| r.to_string())})
                        });
                    } else {
                        tracing::info!(actor = %r.actor, %cluster, code = r.error.code, %detail, "workload certificate refused");
                        let denial = json!({"actor": cap(&r.actor, MAX_TEXT),
                            "cluster": if known { json!(claimed) } else { json!({"claimed": shown}) },
                            "code": r.error.code, "detail": detail, "remote": remote.map(|r| r.to_string())});
                        if self.state.istio.denials.record(Entry::Denied(denial)).await.is_err() {
                            tracing::error!("a workload denial could not be audited");
                        }
                    }
                }
                Err(r.error.into())
            }
        }
    }
}

impl IstioApi {
    /// `RESOURCE_EXHAUSTED` for an address whose unauthenticated quota is used up (counted, not
    /// written).
    fn rate_limited(
        &self,
        remote: Option<std::net::IpAddr>,
        claimed: Option<String>,
        wait: u64,
        started: Instant,
    ) -> Status {
        self.state
            .metrics
            .workload_latency
            .get_or_create(&crate::metrics::OutcomeLabels { outcome: "denied".into() })
            .observe(started.elapsed().as_secs_f64());
        let detail = format!("too many unauthenticated requests from this address; retry in {wait} s");
        self.state.edge.denied("grpc", "rate-limited", remote, || {
            json!({"api": "grpc", "cluster": {"claimed": claimed}, "code": "rate-limited", "detail": detail,
                   "remote": remote.map(|r| r.to_string())})
        });
        Status::resource_exhausted(format!("rate-limited: {detail}"))
    }
}

fn metadata_str<'a>(md: &'a tonic::metadata::MetadataMap, key: &str) -> Option<&'a str> {
    md.get(key).and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty())
}

impl IstioApi {
    async fn handle(&self, request: Request<IstioCertificateRequest>) -> Result<Vec<String>, Refusal> {
        let state = &self.state;
        let cfg =
            state.config.istio.as_ref().ok_or_else(|| ApiError::unavailable("disabled", "external-CA mode is off"))?;
        let md = request.metadata();
        let cluster = metadata_str(md, "clusterid")
            .ok_or_else(|| ApiError::unauthenticated("no-cluster-id", "send the ClusterID metadata header"))?
            .to_string();
        let claimed = |e: ApiError| Refusal { error: e, actor: "anonymous".into(), cluster: Some(cluster.clone()) };
        let (Some(validator), Some(ccfg)) = (state.istio.tokens.get(&cluster), cfg.clusters.get(&cluster)) else {
            return Err(claimed(ApiError::forbidden(
                "cluster-not-served",
                format!("cluster {cluster:?} is not served by this CA"),
            )));
        };
        let token = metadata_str(md, "authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                claimed(ApiError::unauthenticated(
                    "unauthenticated",
                    "send the workload's service-account token as authorization: Bearer <JWT>",
                ))
            })?;
        let caller = validator.verify(token).await.map_err(claimed)?;
        let actor = format!("serviceaccount:{cluster}/{}", caller.account());
        let refuse = |e: ApiError| Refusal { error: e, actor: actor.clone(), cluster: Some(cluster.clone()) };
        let ca = cluster_ca(state, &cluster).await.map_err(refuse)?;
        let mut identity = SpiffeId::istio(&ca.trust_domain, &caller.namespace, &caller.service_account)
            .map_err(|e| refuse(ApiError::unauthenticated("invalid-token", e.to_string())))?;
        let request = request.into_inner();
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .filter(|s| !s.is_empty());
        if let Some(imp) = impersonated {
            if !ccfg.trusted_node_accounts.contains(&caller.account()) {
                return Err(refuse(ApiError::forbidden(
                    "impersonation-denied",
                    format!("{} is not a trusted node account and may not act for {imp}", caller.account()),
                )));
            }
            let id: SpiffeId = imp.parse().map_err(|e: ca_core::PolicyError| {
                refuse(ApiError::bad_request("invalid-impersonated-identity", e.to_string()))
            })?;
            if id.trust_domain() != &ca.trust_domain {
                return Err(refuse(ApiError::forbidden(
                    "impersonation-denied",
                    format!("{imp} is outside the cluster's trust domain {}", ca.trust_domain),
                )));
            }
            // Only workload identities of the Istio form, and never a node account itself.
            let path = imp.split_once("://").and_then(|(_, r)| r.split_once('/')).map_or("", |(_, p)| p);
            let target = match path.split('/').collect::<Vec<_>>().as_slice() {
                ["ns", ns, "sa", sa] if valid_k8s_name(ns) && valid_k8s_name(sa) => format!("{ns}/{sa}"),
                _ => {
                    return Err(refuse(ApiError::forbidden(
                        "impersonation-denied",
                        format!("{imp} is not a workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)"),
                    )));
                }
            };
            if ccfg.trusted_node_accounts.contains(&target) {
                return Err(refuse(ApiError::forbidden(
                    "impersonation-denied",
                    format!("{imp} is a trusted node account and cannot be impersonated"),
                )));
            }
            identity = id;
        }
        let policy =
            TtlPolicy { default: ccfg.default_ttl.duration(), max: ccfg.max_ttl.duration(), over_max: ccfg.over_max };
        let to_refusal = |j: Judged| {
            refuse(match j {
                Judged::Csr(e) => crate::service::state::map_core(e),
                Judged::Denial(WorkloadDenial::Forbidden(m)) => ApiError::forbidden("identity-mismatch", m),
                Judged::Denial(WorkloadDenial::Invalid(m)) => ApiError::bad_request("invalid-request", m),
                Judged::Denial(WorkloadDenial::IssuerExpiring(m)) => ApiError::unavailable("issuer-expiring", m),
            })
        };
        let (csr, validity) = (request.csr, request.validity_duration);
        if !ca.issuer.is_healthy() {
            // The key is away: a bad request is still the caller's error, a good one waits.
            judge(&csr, &identity, validity, &policy, ca.issuer.cert.not_after).map_err(to_refusal)?;
        }
        // Judging and signing share one trip to a blocking thread: the CSR check is CPU work
        // of the same order as the signature.
        let id = identity.clone();
        let permit = state
            .istio
            .issuing
            .acquire()
            .await
            .map_err(|_| refuse(ApiError::unavailable("shutting-down", "the server is stopping")))?;
        let issued = ca
            .issuer
            .with_key(state.hsm_timeout(), move |ca| match judge(&csr, &id, validity, &policy, ca.cert.not_after) {
                Ok(req) => ca_core::issue::issue(ca, &req).map(Ok),
                Err(j) => Ok(Err(j)),
            })
            .await;
        // Held for the CPU work only, not while the record commits.
        drop(permit);
        let issued = issued.map_err(&refuse)?.map_err(to_refusal)?;
        let cert = issued.cert;
        let sha256 = hex::encode(sha2::Sha256::digest(&cert.der));
        let record = WorkloadRecord {
            serial: cert.serial.clone(),
            cluster: cluster.clone(),
            identity: identity.to_string(),
            issuer_serial: ca.serial.clone(),
            not_before: cert.not_before.unix_timestamp(),
            not_after: cert.not_after.unix_timestamp(),
            issued_at: now_secs(),
            audit_seq: 0,
            der: cert.der.clone(),
        };
        // Only a durable record is answered: a certificate nobody can find is never handed out.
        state.istio.recorder.record(Entry::Issued { record, sha256 }).await.map_err(&refuse)?;
        state.metrics.issued(&cluster, "workload", "ok");
        let mut chain = Vec::with_capacity(ca.chain_pem.len() + 2);
        chain.push(cert.pem());
        chain.extend(ca.chain_pem.iter().cloned());
        chain.push(ca.bundle_pem.clone());
        Ok(chain)
    }
}

/// Why a request was refused before signing.
pub enum Judged {
    Csr(ca_core::CoreError),
    Denial(WorkloadDenial),
}

/// The CSR's signature, key and names, and the lifetime: everything decided before signing.
/// Public for the fuzz target.
pub fn judge(
    csr: &str,
    identity: &SpiffeId,
    validity: i64,
    policy: &TtlPolicy,
    issuer_not_after: OffsetDateTime,
) -> Result<CertRequest, Judged> {
    let csr = VerifiedCsr::parse(csr.as_bytes()).map_err(|e| Judged::Csr(e.into()))?;
    ca_core::workload::check_requested_names(&csr, identity).map_err(Judged::Denial)?;
    let (not_before, not_after) =
        ca_core::workload::lifetime(validity, policy, issuer_not_after, OffsetDateTime::now_utc())
            .map_err(Judged::Denial)?;
    Ok(CertRequest {
        spiffe_id: Some(identity.clone()),
        ..CertRequest::new(
            ProfileKind::Workload,
            rcgen::DistinguishedName::new(),
            csr.public_key().clone(),
            not_before,
            not_after,
        )
    })
}

// ---- cluster intermediates held by the server -----------------------------------------------

/// Issues (or renews) the intermediate of an external-CA cluster for the key the server holds.
/// Due when the cluster has none, its newest is revoked, or two thirds of its life have passed.
pub async fn ensure_intermediate(state: &AppState, name: &str, actor: &str) -> Result<bool, ApiError> {
    let Some(cluster) = state.store.get_cluster(name).await? else { return Ok(false) };
    if !cluster.is_external_ca() || cluster.status != "active" {
        return Ok(false);
    }
    let now = now_secs();
    // A rotation that moved the cluster's chain (or key) wants an intermediate issued since.
    let (_, reissue_after) = crate::rotation::changed_at(state, &cluster).await?;
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
        .ok_or_else(|| ApiError::internal(format!("cluster {name} has no key reference")))?
        .parse()
        .map_err(ApiError::internal)?;
    let kr = key_ref.clone();
    let public = match tokio::time::timeout(
        state.hsm_timeout(),
        tokio::task::spawn_blocking(move || hsm::open_signer(&kr).map(|s| s.public_key().clone())),
    )
    .await
    {
        Ok(Ok(Ok(p))) => p,
        Ok(Ok(Err(e))) => {
            return Err(ApiError::unavailable("hsm-unavailable", format!("opening the key of cluster {name}: {e}")));
        }
        _ => return Err(ApiError::unavailable("hsm-timeout", format!("the key of cluster {name} did not answer"))),
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
    let current = tx.get_cluster(name).await?.ok_or_else(|| ApiError::internal("cluster vanished"))?;
    if current.current_serial != cluster.current_serial || current.status != "active" {
        return Ok(false);
    }
    if let Some(b) = tx.blocked_key(&ca_store::spki_sha256(&spki)).await? {
        return Err(key_compromised(name, &b));
    }
    let record = crate::service::issuance::cert_record(&cert, &issuer.name, Some(name), "cluster", actor);
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
        for c in clusters.iter().filter(|c| c.is_external_ca() && c.status == "active") {
            if let Err(e) = ensure_intermediate(state, &c.name, &state.job_actor()).await {
                // Expected until a cluster rotation; said once at revocation, not every round.
                if e.code == "key-compromised" {
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
            c.name == ca.issuer.name && c.status == "active" && c.current_serial.as_deref() == Some(ca.serial.as_str())
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

// ---- the gRPC listener and its certificate ---------------------------------------------------

/// The gRPC serving certificate: issued by this server from the serving cluster's
/// intermediate (so agents verify it against the mesh root), with a key that never leaves
/// memory, renewed at half-life.
#[derive(Default)]
pub struct ServingCert {
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
    /// Due at half-life, or as soon as the chain above it changed (a rotation: agents may
    /// soon trust only the new root).
    fn renew_due(&self, now: i64, chain: Option<&str>) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|(_, at, issued_under)| now >= *at || chain.is_some_and(|c| c != issued_under))
    }
}

/// Identifies the chain a certificate from `ca` carries.
fn chain_id(ca: &ClusterCa) -> String {
    ca.serving_chain.iter().map(CertInfo::fingerprint).collect::<Vec<_>>().join(",")
}

/// The configured serving cluster, or else the first configured cluster (by name) that is
/// active here: a configured but not yet approved cluster must not keep the listener dark.
async fn serving_ca(state: &AppState, cfg: &IstioConfig) -> Result<(String, Arc<ClusterCa>), ApiError> {
    if let Some(name) = &cfg.serving_cluster {
        return Ok((name.clone(), cluster_ca(state, name).await?));
    }
    let mut last = ApiError::unavailable("intermediate-not-ready", "no external-CA cluster is active yet");
    for name in cfg.clusters.keys() {
        match cluster_ca(state, name).await {
            Ok(ca) => return Ok((name.clone(), ca)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub async fn ensure_serving_cert(state: &AppState) -> Result<(), ApiError> {
    let Some(cfg) = &state.config.istio else { return Ok(()) };
    let now = now_secs();
    let (name, ca) = match serving_ca(state, cfg).await {
        Ok(found) => found,
        // Keep serving the current certificate while no CA is at hand.
        Err(_) if !state.istio.serving.renew_due(now, None) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !state.istio.serving.renew_due(now, Some(&chain_id(&ca))) {
        return Ok(());
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ApiError::internal)?;
    let public = hsm::PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&key))
        .map_err(ApiError::internal)?;
    let not_before = ca_core::issue::default_not_before();
    let not_after = (not_before + cfg.serving_cert_validity.duration()).min(ca.issuer.cert.not_after);
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, "ca-server");
    let request = CertRequest {
        server_names: cfg.server_names.clone(),
        ..CertRequest::new(ProfileKind::Server, subject, public, not_before, not_after)
    };
    let issued = ca.issuer.with_key(state.hsm_timeout(), move |c| ca_core::issue::issue(c, &request)).await?;
    let cert = issued.cert;
    let actor = state.job_actor();
    // Issued by a cluster intermediate, not an environment: no environment CRL covers it.
    let record =
        crate::service::issuance::cert_record(&cert, &format!("cluster:{name}"), Some(&name), "server", &actor);
    let mut tx = state.store.write().await?;
    crate::service::issuance::record_issued(
        &mut tx,
        &record,
        &actor,
        json!({"issuer": ca.serial, "via": "grpc-serving-certificate", "names": cfg.server_names}),
    )
    .await?;
    tx.commit().await?;
    let mut chain = vec![rustls_pki_types::CertificateDer::from(cert.der.clone())];
    chain.extend(ca.serving_chain.iter().map(|c| rustls_pki_types::CertificateDer::from(c.der.clone())));
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der).map_err(ApiError::internal)?;
    let renew_at = cert.not_before.unix_timestamp() + (cert.not_after - cert.not_before).whole_seconds() / 2;
    *state.istio.serving.current.write().unwrap_or_else(|p| p.into_inner()) =
        Some((Arc::new(CertifiedKey::new(chain, signing)), renew_at, chain_id(&ca)));
    tracing::info!(serial = %cert.serial, cluster = %name, "gRPC serving certificate issued");
    Ok(())
}

/// Serves Istio's certificate API over TLS until `shutdown` resolves, then lets the requests
/// in flight finish. Each request has `istio.request_timeout` (then `DEADLINE_EXCEEDED`);
/// over `istio.max_concurrent_requests` in all, or `max_concurrent_requests_per_connection`
/// on one connection, a request is refused with `RESOURCE_EXHAUSTED` at once rather than
/// queued (istio-agent and ztunnel retry with backoff). Connections follow `limits`.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    limits: crate::tls::ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let cfg = state.config.istio.clone().context("istio is not configured")?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(state.istio.serving.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let service =
        IstioCertificateServiceServer::new(IstioApi { state: state.clone() }).max_decoding_message_size(64 * 1024);
    let global = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_requests));
    let deadline = cfg.request_timeout.duration().unsigned_abs();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            c = crate::tls::accept(&listener) => c,
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let stop = stop_rx.clone();
        let svc = tower::ServiceBuilder::new()
            .map_result(grpc_refusal)
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(global.clone()))
            .concurrency_limit(cfg.max_concurrent_requests_per_connection)
            .timeout(deadline)
            // tonic's own server records the peer for `Request::remote_addr` (the anonymous
            // rate limit is keyed by it); this accept loop has to do the same.
            .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: Some(remote) });
                req
            })
            .map_response(tonic_body)
            // A panicking handler answers INTERNAL instead of resetting the stream.
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::edge::grpc_panic_response))
            .service(service.clone());
        // Handshakes run in their own tasks: one slow client must not hold up the rest.
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "gRPC TLS handshake failed"),
                Err(_) => return tracing::debug!(%remote, "gRPC TLS handshake timed out"),
            };
            crate::tls::serve_conn(hyper_util::rt::TokioIo::new(tls), svc, limits, true, Some(stop), remote).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

/// The catch-panic layer's body back into tonic's.
fn tonic_body(
    r: hyper::Response<tower_http::body::UnsyncBoxBody<hyper::body::Bytes, tower::BoxError>>,
) -> hyper::Response<tonic::body::Body> {
    r.map(tonic::body::Body::new)
}

/// The limits' refusals as gRPC statuses, never a failed connection (tonic's own server would answer a timeout with
/// `CANCELLED`; a deadline is what the caller ran into).
fn grpc_refusal(
    r: Result<hyper::Response<tonic::body::Body>, tower::BoxError>,
) -> Result<hyper::Response<tonic::body::Body>, tower::BoxError> {
    Ok(match r {
        Ok(resp) => resp,
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => {
            Status::deadline_exceeded("the request took longer than istio.request_timeout").into_http()
        }
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
            Status::resource_exhausted("too many requests in flight; retry with backoff").into_http()
        }
        Err(e) => {
            tracing::error!(error = %e, "gRPC request failed");
            Status::internal("internal error; see the server log").into_http()
        }
    })
}
