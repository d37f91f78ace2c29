//! JSON Web Tokens, for both kinds the server accepts: operators' tokens (`auth`) and
//! clusters' service-account tokens (`auth::service_account`). One algorithm policy, one
//! key set with one refresh rule, one way of saying why a token was refused.
//!
//! Refusals are plain sentences for the caller; they never echo the token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;

/// Asymmetric signatures only: an HMAC token would be forgeable by anyone holding the
/// verification key, and `none` by anyone at all. These are what Kubernetes API servers and
/// the usual identity providers sign with.
pub const ALGORITHMS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// A token naming a key we do not hold may mean the issuer rotated its keys, so it triggers a
/// re-read; at most this often, so that a flood of forged `kid`s is not a flood of fetches.
pub const UNKNOWN_KID_REFRESH: Duration = Duration::from_secs(10);

/// Where a key set comes from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// Given once (tests, fuzzing); never re-read.
    Fixed,
    /// A JWKS file (`kubectl get --raw /openid/v1/jwks`, an identity provider's export).
    File(PathBuf),
    /// A JWKS document at a URL.
    Url(String),
    /// An OIDC discovery document, whose `issuer` must be `issuer` and whose `jwks_uri` is
    /// fetched.
    Discovery { url: String, issuer: String },
}

/// The verification keys of one token issuer, by `kid`.
pub struct KeySet {
    /// Who the keys belong to, for logs and refusals ("cluster east's service-account keys").
    owner: String,
    source: KeySource,
    /// Re-read at least this often (by whoever calls [`KeySet::due`]).
    every: Duration,
    keys: RwLock<Arc<HashMap<String, DecodingKey>>>,
    /// Keys given as documents rather than read from `source` (a cluster's stored JWKS): the
    /// current set, and the one it replaced while that is still accepted.
    documents: RwLock<Documents>,
    last_fetch: Mutex<Option<Instant>>,
    /// Bumped at every re-read, so that callers caching verified tokens can drop them.
    generation: AtomicU64,
    http: reqwest::Client,
}

/// Keys given as JWKS documents: the current set, and the previous one until a Unix time.
#[derive(Default)]
struct Documents {
    current: HashMap<String, DecodingKey>,
    previous: HashMap<String, DecodingKey>,
    previous_until: i64,
}

/// The usable verification keys of a JWKS, by `kid`. Keys without a `kid`, or that
/// jsonwebtoken cannot use, are skipped (and logged).
fn usable_keys(owner: &str, jwks: &JwkSet) -> HashMap<String, DecodingKey> {
    let mut keys = HashMap::new();
    for jwk in &jwks.keys {
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        match DecodingKey::from_jwk(jwk) {
            Ok(k) => {
                keys.insert(kid, k);
            }
            Err(e) => tracing::warn!(%owner, %kid, error = %e, "skipping unusable JWKS key"),
        }
    }
    keys
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl KeySet {
    fn empty(owner: &str, source: KeySource, every: Duration) -> Result<Self> {
        Ok(KeySet {
            owner: owner.to_string(),
            source,
            every,
            keys: RwLock::new(Arc::new(HashMap::new())),
            documents: RwLock::new(Documents::default()),
            last_fetch: Mutex::new(None),
            generation: AtomicU64::new(0),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        })
    }

    /// Keys given once, never re-read.
    pub fn fixed(owner: &str, jwks: &JwkSet) -> Result<Self> {
        let set = Self::empty(owner, KeySource::Fixed, Duration::MAX)?;
        set.install(jwks)?;
        Ok(set)
    }

    /// Keys read now from `source`, and again whenever [`KeySet::refresh`] is asked to.
    pub async fn load(owner: &str, source: KeySource, every: Duration) -> Result<Self> {
        let set = Self::empty(owner, source, every)?;
        set.refresh(true).await?;
        Ok(set)
    }

    /// A set whose first read is left to the caller's first [`KeySet::refresh`] (a server
    /// that must start while a cluster's discovery endpoint is down).
    pub fn unloaded(owner: &str, source: KeySource, every: Duration) -> Result<Self> {
        Self::empty(owner, source, every)
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Installs keys given as documents, beside whatever `source` yields: `current`, and
    /// `previous` (the set it replaced) until the Unix time given with it. Either may be absent.
    pub fn set_documents(&self, current: Option<&JwkSet>, previous: Option<(&JwkSet, i64)>) {
        let docs = Documents {
            current: current.map(|j| usable_keys(&self.owner, j)).unwrap_or_default(),
            previous: previous.map(|(j, _)| usable_keys(&self.owner, j)).unwrap_or_default(),
            previous_until: previous.map_or(0, |(_, until)| until),
        };
        *self.documents.write().unwrap_or_else(|p| p.into_inner()) = docs;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes at every re-read of the keys, and when the previous document's grace ends (so
    /// that tokens verified with it are not remembered past it).
    pub fn generation(&self) -> u64 {
        let expired = {
            let docs = self.documents.read().unwrap_or_else(|p| p.into_inner());
            !docs.previous.is_empty() && unix_now() >= docs.previous_until
        };
        if expired {
            let mut docs = self.documents.write().unwrap_or_else(|p| p.into_inner());
            if !docs.previous.is_empty() && unix_now() >= docs.previous_until {
                docs.previous.clear();
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.generation.load(Ordering::SeqCst)
    }

    /// Takes over the keys `other` read from the same source, so that a rebuilt key set does
    /// not have to fetch them again at once.
    pub fn adopt_fetched(&self, other: &KeySet) {
        let keys = other.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner()) =
            *other.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
    }

    /// The periodic re-read is due.
    pub fn due(&self) -> bool {
        if matches!(self.source, KeySource::Fixed) {
            return false;
        }
        let last = *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|t| t.elapsed() >= self.every)
    }

    /// Re-reads the keys: always when `force`, otherwise at most once per
    /// [`UNKNOWN_KID_REFRESH`]. Returns whether it read them. A failed read keeps the keys held.
    pub async fn refresh(&self, force: bool) -> Result<bool> {
        if matches!(self.source, KeySource::Fixed) {
            return Ok(false);
        }
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFRESH) {
                return Ok(false);
            }
            *last = Some(Instant::now());
        }
        let jwks = self.fetch().await?;
        self.install(&jwks)?;
        Ok(true)
    }

    async fn fetch(&self) -> Result<JwkSet> {
        match &self.source {
            KeySource::Fixed => unreachable!("fixed key sets are never fetched"),
            KeySource::File(path) => {
                let text =
                    tokio::fs::read_to_string(path).await.with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{}: not a JWKS", path.display()))
            }
            KeySource::Url(url) => self.get_json(url, "a JWKS").await,
            KeySource::Discovery { url, issuer } => {
                let doc: serde_json::Value = self.get_json(url, "a discovery document").await?;
                if doc["issuer"].as_str() != Some(issuer.as_str()) {
                    bail!("{url}: issuer {} is not the configured issuer {issuer:?}", doc["issuer"]);
                }
                let jwks_uri = doc["jwks_uri"].as_str().ok_or_else(|| anyhow!("{url}: no jwks_uri"))?;
                self.get_json(jwks_uri, "a JWKS").await
            }
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, url: &str, what: &str) -> Result<T> {
        self.http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("fetching {url}"))?
            .json()
            .await
            .with_context(|| format!("{url}: not {what}"))
    }

    /// Keys without a `kid`, or that jsonwebtoken cannot use, are skipped (and logged); a set
    /// left with none is refused, keeping what was held.
    fn install(&self, jwks: &JwkSet) -> Result<()> {
        let keys = usable_keys(&self.owner, jwks);
        if keys.is_empty() {
            bail!("the JWKS of {} holds no usable key with a kid", self.owner);
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        if let Some(k) = self.keys.read().unwrap_or_else(|p| p.into_inner()).get(kid) {
            return Some(k.clone());
        }
        let docs = self.documents.read().unwrap_or_else(|p| p.into_inner());
        docs.current
            .get(kid)
            .or_else(|| (unix_now() < docs.previous_until).then(|| docs.previous.get(kid)).flatten())
            .cloned()
    }

    /// The key for `kid`; an unknown one triggers a (rate-limited) re-read first.
    async fn key_for(&self, kid: &str) -> Option<DecodingKey> {
        if let Some(k) = self.key(kid) {
            return Some(k);
        }
        if let Err(e) = self.refresh(false).await {
            tracing::warn!(owner = %self.owner, error = %format!("{e:#}"), "key refresh failed");
        }
        self.key(kid)
    }
}

/// What a token must say about itself.
pub struct Expect<'a> {
    pub issuer: &'a str,
    /// Any one of these.
    pub audiences: &'a [String],
    /// Allowed clock skew for `exp` and `nbf`, in seconds.
    pub leeway: u64,
}

/// Verifies `token`'s signature with a key of `keys` and its `iss`, `aud`, `exp` and `nbf`,
/// and returns its claims. The error says what was wrong, in words for the caller.
pub async fn decode<T: DeserializeOwned>(keys: &KeySet, token: &str, expect: &Expect<'_>) -> Result<T, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(format!("token algorithm {:?} is not accepted", header.alg));
    }
    let kid = header.kid.ok_or_else(|| "token has no key id (kid)".to_string())?;
    let key = keys.key_for(&kid).await.ok_or_else(|| format!("token key {kid:?} is not among {}", keys.owner))?;
    let mut v = Validation::new(header.alg);
    v.set_issuer(&[expect.issuer]);
    v.set_audience(expect.audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v.validate_nbf = true;
    v.leeway = expect.leeway;
    jsonwebtoken::decode::<T>(token, &key, &v).map(|d| d.claims).map_err(|e| describe(&e, expect))
}

/// Why a token was refused, in words for the caller; never the token itself.
fn describe(e: &jsonwebtoken::errors::Error, expect: &Expect<'_>) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "token has expired".into(),
        ErrorKind::InvalidAudience => match expect.audiences {
            [one] => format!("token audience is not {one:?}"),
            all => format!("token audience is not one of {all:?}"),
        },
        ErrorKind::InvalidIssuer => format!("token issuer is not {:?}", expect.issuer),
        ErrorKind::InvalidSignature => "token signature does not verify".into(),
        ErrorKind::ImmatureSignature => "token is not valid yet".into(),
        _ => format!("token rejected: {e}"),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // throwaway keys to sign test tokens with
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// A P-256 key pair as jsonwebtoken wants it: PKCS#8 PEM to sign, a JWK to verify.
    fn key_pair(kid: &str) -> (EncodingKey, serde_json::Value) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        // The uncompressed point 04 || x || y.
        let point = key.public_key_raw();
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                         "x": b64(&point[1..33]), "y": b64(&point[33..65])});
        (enc, jwk)
    }

    fn token(enc: &EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, enc).unwrap()
    }

    fn claims(aud: &str) -> serde_json::Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({"iss": "https://issuer.test", "aud": aud, "exp": now + 300, "sub": "alice"})
    }

    const AUD: &[&str] = &["ca-server"];

    fn expect(audiences: &[String]) -> Expect<'_> {
        Expect { issuer: "https://issuer.test", audiences, leeway: 0 }
    }

    #[tokio::test]
    async fn a_token_verifies_and_every_claim_is_checked() {
        let (enc, jwk) = key_pair("k1");
        let keys = KeySet::fixed("the test keys", &serde_json::from_value(json!({"keys": [jwk]})).unwrap()).unwrap();
        let auds: Vec<String> = AUD.iter().map(|s| s.to_string()).collect();
        let ok: serde_json::Value =
            decode(&keys, &token(&enc, "k1", claims("ca-server")), &expect(&auds)).await.unwrap();
        assert_eq!(ok["sub"], "alice");

        let wrong_aud = decode::<serde_json::Value>(&keys, &token(&enc, "k1", claims("other")), &expect(&auds)).await;
        assert_eq!(wrong_aud.unwrap_err(), "token audience is not \"ca-server\"");
        let unknown = decode::<serde_json::Value>(&keys, &token(&enc, "k9", claims("ca-server")), &expect(&auds)).await;
        assert_eq!(unknown.unwrap_err(), "token key \"k9\" is not among the test keys");
        let mut expired = claims("ca-server");
        expired["exp"] = json!(1);
        let old = decode::<serde_json::Value>(&keys, &token(&enc, "k1", expired), &expect(&auds)).await;
        assert_eq!(old.unwrap_err(), "token has expired");
        // Signed by another key under the same kid.
        let (other, _) = key_pair("k1");
        let forged =
            decode::<serde_json::Value>(&keys, &token(&other, "k1", claims("ca-server")), &expect(&auds)).await;
        assert_eq!(forged.unwrap_err(), "token signature does not verify");
    }

    #[tokio::test]
    async fn hmac_and_none_are_refused_before_any_key_is_looked_up() {
        let (_, jwk) = key_pair("k1");
        let keys = KeySet::fixed("the test keys", &serde_json::from_value(json!({"keys": [jwk]})).unwrap()).unwrap();
        let auds = vec!["ca-server".to_string()];
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let hs = jsonwebtoken::encode(&h, &claims("ca-server"), &EncodingKey::from_secret(b"public")).unwrap();
        assert_eq!(
            decode::<serde_json::Value>(&keys, &hs, &expect(&auds)).await.unwrap_err(),
            "token algorithm HS256 is not accepted"
        );
        let none = format!("{}.{}.", b64url(br#"{"alg":"none","kid":"k1"}"#), b64url(br#"{"sub":"x"}"#));
        assert!(
            decode::<serde_json::Value>(&keys, &none, &expect(&auds)).await.unwrap_err().starts_with("malformed token")
        );
    }

    fn b64url(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A key added to the file is found by the first token naming it, and a flood of unknown
    /// kids re-reads the file once per interval, not once per token.
    #[tokio::test]
    async fn an_unknown_kid_rereads_the_keys_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (enc1, jwk1) = key_pair("k1");
        let (enc2, jwk2) = key_pair("k2");
        std::fs::write(&path, json!({"keys": [jwk1.clone()]}).to_string()).unwrap();
        let keys =
            KeySet::load("the file's keys", KeySource::File(path.clone()), Duration::from_secs(3600)).await.unwrap();
        let auds = vec!["ca-server".to_string()];
        assert!(
            decode::<serde_json::Value>(&keys, &token(&enc1, "k1", claims("ca-server")), &expect(&auds)).await.is_ok()
        );
        let before = keys.generation();

        std::fs::write(&path, json!({"keys": [jwk1, jwk2]}).to_string()).unwrap();
        // The load just now counts as the last read: k2 stays unknown for the interval...
        let early = decode::<serde_json::Value>(&keys, &token(&enc2, "k2", claims("ca-server")), &expect(&auds)).await;
        assert!(early.is_err());
        assert_eq!(keys.generation(), before, "no re-read within the interval");
        // ... and is found by the first token after it.
        *keys.last_fetch.lock().unwrap() = Some(Instant::now() - UNKNOWN_KID_REFRESH);
        assert!(
            decode::<serde_json::Value>(&keys, &token(&enc2, "k2", claims("ca-server")), &expect(&auds)).await.is_ok()
        );
        assert_eq!(keys.generation(), before + 1);
        for kid in ["x1", "x2", "x3"] {
            let _ = decode::<serde_json::Value>(&keys, &token(&enc2, kid, claims("ca-server")), &expect(&auds)).await;
        }
        assert_eq!(keys.generation(), before + 1, "unknown kids within the interval read nothing");
    }

    /// A replaced document's keys verify until its grace ends; then they are gone, and the
    /// generation changes so that tokens verified with them are not remembered.
    #[tokio::test]
    async fn a_previous_document_verifies_until_its_grace_ends() {
        let (enc1, jwk1) = key_pair("k1");
        let (enc2, jwk2) = key_pair("k2");
        let set = |j: &serde_json::Value| serde_json::from_value::<JwkSet>(json!({"keys": [j]})).unwrap();
        let keys = KeySet::unloaded("the cluster's keys", KeySource::Fixed, Duration::MAX).unwrap();
        let auds = vec!["ca-server".to_string()];
        let verify = |enc: &EncodingKey, kid: &str| {
            let t = token(enc, kid, claims("ca-server"));
            let keys = &keys;
            let auds = &auds;
            async move { decode::<serde_json::Value>(keys, &t, &expect(auds)).await }
        };
        keys.set_documents(Some(&set(&jwk1)), None);
        assert!(verify(&enc1, "k1").await.is_ok());
        assert!(verify(&enc2, "k2").await.is_err(), "not published yet");
        keys.set_documents(Some(&set(&jwk2)), Some((&set(&jwk1), unix_now() + 2)));
        assert!(verify(&enc2, "k2").await.is_ok());
        assert!(verify(&enc1, "k1").await.is_ok(), "within the grace");
        let before = keys.generation();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(keys.generation(), before + 1, "the end of the grace is a new generation");
        assert_eq!(verify(&enc1, "k1").await.unwrap_err(), "token key \"k1\" is not among the cluster's keys");
        assert!(verify(&enc2, "k2").await.is_ok());
    }

    #[test]
    fn a_key_set_with_no_usable_key_is_refused() {
        let err = KeySet::fixed("nobody's keys", &serde_json::from_value(json!({"keys": []})).unwrap()).err().unwrap();
        assert_eq!(err.to_string(), "the JWKS of nobody's keys holds no usable key with a kid");
    }
}
