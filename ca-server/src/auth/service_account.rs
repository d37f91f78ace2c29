//! Kubernetes projected service-account tokens, validated offline against each cluster's keys
//! (its stored JWKS, the one it replaced during the grace, and keys from OIDC discovery): the
//! identity of a workload asking Istio's certificate API.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use ca_core::names::is_k8s_object_name;
use ca_store::now_secs;
use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use sha2::Digest;

use crate::config::IstioSettings;
use crate::error::{ErrorCode, ServiceError};
use crate::jwt::{Expect, KeySet, KeySource};

/// Validates one cluster's projected service-account tokens offline.
pub struct TokenValidator {
    pub(crate) cluster: String,
    cfg: IstioSettings,
    /// The stored settings' version these were built from.
    version: i64,
    keys: KeySet,
    /// Tokens that verified, by SHA-256, with when to stop trusting the result: an agent sends
    /// the same token for every renewal until the kubelet rotates it, and its signature and
    /// claims cannot change. Kept for one generation of the keys only, so a key the cluster
    /// withdrew stops working at the next refresh.
    verified: Mutex<Verified>,
}

#[derive(Default)]
struct Verified {
    /// The key set's generation these results were verified under.
    generation: u64,
    tokens: HashMap<[u8; 32], (Caller, i64)>,
}

impl Verified {
    /// The cache as of `generation`: emptied if the keys changed since.
    fn at(&mut self, generation: u64) -> &mut HashMap<[u8; 32], (Caller, i64)> {
        if self.generation != generation {
            self.tokens.clear();
            self.generation = generation;
        }
        &mut self.tokens
    }
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

/// How often keys from OIDC discovery are re-read (an unknown `kid` re-reads them sooner).
pub const DISCOVERY_REFRESH: Duration = Duration::from_secs(600);

/// A cluster's keys: its stored JWKS document, the one that one replaced with the Unix time
/// until which it is still accepted, and an OIDC discovery URL to fetch more from.
#[derive(Default)]
pub struct Keys {
    pub current: Option<JwkSet>,
    pub previous: Option<(JwkSet, i64)>,
    pub discovery: Option<String>,
}

impl TokenValidator {
    /// A validator for `cluster`'s `settings` (their `jwks` and `oidc_discovery_url` are not
    /// read here: `keys` says where the keys come from). Keys from discovery are read at the
    /// first [`TokenValidator::refresh`].
    pub(crate) fn new(cluster: &str, settings: IstioSettings, version: i64, keys: Keys) -> Result<Self> {
        let source = match &keys.discovery {
            Some(url) => KeySource::Discovery { url: url.clone(), issuer: settings.sa_issuer.clone() },
            None => KeySource::Fixed,
        };
        let owner = format!("cluster {cluster}'s service-account keys");
        let set = KeySet::unloaded(&owner, source, DISCOVERY_REFRESH)?;
        set.set_documents(keys.current.as_ref(), keys.previous.as_ref().map(|(j, until)| (j, *until)));
        Ok(TokenValidator {
            cluster: cluster.to_string(),
            cfg: settings,
            version,
            keys: set,
            verified: Mutex::new(Verified::default()),
        })
    }

    /// A validator with the keys its settings name (`jwks`, `oidc_discovery_url`) read now;
    /// for the fuzz target and tests, which have no database.
    pub async fn load(cluster: &str, settings: IstioSettings) -> Result<Self> {
        let current = settings.jwks.clone().map(serde_json::from_value).transpose()?;
        let keys = Keys { current, previous: None, discovery: settings.oidc_discovery_url.clone() };
        let v = Self::new(cluster, settings, 0, keys)?;
        v.refresh(true).await?;
        Ok(v)
    }

    /// The settings this validator (and the cluster's issuance policy) follows.
    pub fn settings(&self) -> &IstioSettings {
        &self.cfg
    }

    pub(crate) fn version(&self) -> i64 {
        self.version
    }

    pub(crate) fn discovery(&self) -> Option<&str> {
        match self.keys.source() {
            KeySource::Discovery { url, .. } => Some(url),
            _ => None,
        }
    }

    /// Takes over the keys `old` fetched from the same discovery URL.
    pub(crate) fn adopt_fetched(&self, old: &TokenValidator) {
        if self.discovery().is_some() && self.discovery() == old.discovery() {
            self.keys.adopt_fetched(&old.keys);
        }
    }

    pub(crate) fn due(&self) -> bool {
        self.keys.due()
    }

    /// Re-reads the keys; unless `force`, at most once per `jwt::UNKNOWN_KID_REFRESH`.
    pub(crate) async fn refresh(&self, force: bool) -> Result<bool> {
        self.keys.refresh(force).await
    }

    /// Verifies the token and names its service account. Errors say what was wrong, never
    /// echo the token.
    pub async fn verify(&self, token: &str) -> Result<Caller, ServiceError> {
        let (digest, now, generation) = match self.cached(token) {
            Ok(caller) => return Ok(caller),
            Err(miss) => miss,
        };
        let (caller, exp) = self.verify_uncached(token).await?;
        let leeway = self.cfg.leeway.duration().whole_seconds().max(0);
        let until = (exp + leeway).min(now + TOKEN_CACHE_TTL);
        // Verified under keys that were replaced meanwhile: answer, but do not remember it.
        if self.keys.generation() != generation {
            return Ok(caller);
        }
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let cache = verified.at(generation);
        if cache.len() >= TOKEN_CACHE_MAX {
            cache.retain(|_, (_, u)| *u > now);
            if cache.len() >= TOKEN_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, (caller.clone(), until));
        Ok(caller)
    }

    /// The caller a token already verified under the current keys proved, or else what the
    /// verification needs to remember it: (digest, now, key generation). Not inlined, so that
    /// a profile names the cached path.
    #[inline(never)]
    fn cached(&self, token: &str) -> Result<Caller, ([u8; 32], i64, u64)> {
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        let generation = self.keys.generation();
        if let Some((caller, until)) =
            self.verified.lock().unwrap_or_else(|p| p.into_inner()).at(generation).get(&digest)
            && now < *until
        {
            return Ok(caller.clone());
        }
        Err((digest, now, generation))
    }

    async fn verify_uncached(&self, token: &str) -> Result<(Caller, i64), ServiceError> {
        let invalid = |why: String| ServiceError::new(ErrorCode::InvalidToken, why);
        let expect = Expect {
            issuer: &self.cfg.sa_issuer,
            audiences: &self.cfg.audiences,
            leeway: self.cfg.leeway.duration().whole_seconds().max(0) as u64,
        };
        let claims: SaClaims = crate::jwt::decode(&self.keys, token, &expect).await.map_err(invalid)?;
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
        if !is_k8s_object_name(&namespace) || !is_k8s_object_name(&service_account) {
            return Err(invalid("token's namespace or service account is not a valid Kubernetes name".into()));
        }
        Ok((Caller { namespace, service_account }, claims.exp))
    }
}
