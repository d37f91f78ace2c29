//! Kubernetes projected service-account tokens, validated offline against each cluster's JWKS
//! (from a file or OIDC discovery): the identity of a workload asking Istio's certificate API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ca_store::now_secs;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::Digest;

use crate::config::IstioClusterConfig;
use crate::error::{ErrorCode, ServiceError};

/// Algorithms a Kubernetes API server signs service-account tokens with; never HMAC or none.
const TOKEN_ALGS: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384];

/// Validates one cluster's projected service-account tokens offline.
pub struct TokenValidator {
    pub(crate) cluster: String,
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
pub(crate) fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl TokenValidator {
    pub(crate) fn new(cluster: &str, cfg: IstioClusterConfig) -> Result<Self> {
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

    pub(crate) fn due(&self) -> bool {
        let last = *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|t| t.elapsed() >= self.cfg.jwks_refresh.duration().unsigned_abs())
    }

    /// Re-reads the keys. Unless `force`, at most once every 10 s: an unknown `kid` (a key
    /// rotation) triggers a refresh, and a flood of forged kids must not turn into a flood of
    /// fetches.
    pub(crate) async fn refresh(&self, force: bool) -> Result<bool> {
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
    pub async fn verify(&self, token: &str) -> Result<Caller, ServiceError> {
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

    async fn verify_uncached(&self, token: &str) -> Result<(Caller, i64), ServiceError> {
        let invalid = |why: String| ServiceError::new(ErrorCode::InvalidToken, why);
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
