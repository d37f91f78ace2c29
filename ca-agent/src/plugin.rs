//! Plug-in mode: keeps Secret `cacerts` (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
//! `root-cert.pem`) current for istiod, by the rules `ca-cli cluster renew` follows: enrol
//! once with the one-time token, renew over mTLS with the current intermediate at two thirds
//! of its lifetime (with jitter) or when ca-server says a rotation moved the chain, a fresh key
//! every time, and a trust bundle that only ever grows or shrinks. The set it replaces is kept
//! in `cacerts-previous` for `ca-agent rollback`. Writes are conditional on the resourceVersion
//! read; nothing here ever deletes either Secret.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ca_core::cert::{CertInfo, fingerprints, parse_certs};
use ca_core::validity::CLUSTER_RENEWAL;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use time::OffsetDateTime;

use crate::certs::{bundle_change_allowed, cert_with_key, check_issued, due, key_and_csr, pem_of, same_bundle};
use crate::k8s::{secret, secret_map, secret_str, write_secret};
use crate::server::{Auth, CaServer, CallError, Identity};
use crate::status::Status;

pub const CACERTS: &str = "cacerts";
pub const PREVIOUS: &str = "cacerts-previous";
const FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];

/// The four files istiod reads, parsed and checked to belong together.
pub struct CaSet {
    pub cert: CertInfo,
    /// Shared with the [`Identity`] that presents the intermediate over mTLS.
    pub key: Arc<hsm::SecretKey>,
    /// `cert-chain.pem`: the intermediate, then each parent up to and including the root.
    pub chain: Vec<CertInfo>,
    pub roots: Vec<CertInfo>,
}

impl CaSet {
    pub fn from_secret(s: &Secret) -> Result<CaSet> {
        let get = |k: &str| secret_str(s, k).with_context(|| format!("{k} is missing"));
        let (cert, key) = cert_with_key(&get("ca-cert.pem")?, &get("ca-key.pem")?, "ca-cert.pem", "ca-key.pem")?;
        let key = Arc::new(key);
        let chain = parse_certs(get("cert-chain.pem")?.as_bytes(), "cert-chain.pem")?;
        let roots = parse_certs(get("root-cert.pem")?.as_bytes(), "root-cert.pem")?;
        Ok(CaSet { cert, key, chain, roots })
    }

    pub fn data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("ca-cert.pem".to_string(), self.cert.pem()),
            ("ca-key.pem".to_string(), self.key.expose_pem().to_string()),
            ("cert-chain.pem".to_string(), pem_of(&self.chain)),
            ("root-cert.pem".to_string(), pem_of(&self.roots)),
        ])
    }

    /// The intermediate as an mTLS credential: ca-server authenticates renewals and reports by it.
    fn identity(&self) -> Identity {
        Identity { chain: vec![self.cert.clone()], key: self.key.clone() }
    }
}

pub struct Plugin {
    pub server: CaServer,
    pub status: Arc<Status>,
    pub cluster: String,
    /// Secrets in istiod's namespace.
    pub istio: Api<Secret>,
    pub istio_namespace: String,
    /// Secrets in the agent's namespace (the enrolment token).
    pub own: Api<Secret>,
    pub enrolment_secret: String,
    /// A set ca-server issued that could not be written yet: written before anything else, so
    /// that an API outage never loses an intermediate the server already counts as current.
    pending: Option<CaSet>,
}

impl Plugin {
    pub fn new(
        server: CaServer,
        status: Arc<Status>,
        cluster: String,
        istio: Api<Secret>,
        istio_namespace: String,
        own: Api<Secret>,
        enrolment_secret: String,
    ) -> Plugin {
        Plugin { server, status, cluster, istio, istio_namespace, own, enrolment_secret, pending: None }
    }

    /// One pass: install what is pending, enrol or renew when due, report, follow the bundle.
    pub async fn tick(&mut self) -> Result<()> {
        let current = crate::k8s::retrying(4, || self.istio.get_opt(CACERTS)).await.inspect_err(|e| {
            self.status.error(crate::k8s::cause(e));
        })?;
        self.status.api_ok();
        if let Some(set) = self.pending.take() {
            return self.install(set, current.as_ref()).await;
        }
        let Some(current) = current else {
            let set = self.enrol().await?;
            return self.install(set, None).await;
        };
        let installed = match CaSet::from_secret(&current) {
            Ok(s) => s,
            Err(e) => {
                // Someone else's Secret, or a broken one: istiod's problem to report, not ours
                // to overwrite.
                let why = format!("Secret {CACERTS} is not a usable set ({e:#}); leaving it as it is");
                self.status.blocked(Some(why.clone()));
                self.status.error("cacerts-unusable");
                bail!(why);
            }
        };
        self.status.blocked(None);
        self.status.expires(CACERTS, installed.cert.not_after.unix_timestamp());
        let id = installed.identity();
        let advice = match self
            .server
            .report(&id, fingerprints(&installed.roots), self.chain_fps(&installed), &installed.cert.serial)
            .await
        {
            Ok(a) => {
                self.status.server_ok();
                Some(a)
            }
            Err(e) => {
                self.status.server_failed(e.cause());
                tracing::warn!(error = %e, "report failed; renewing on the lifetime rule alone");
                None
            }
        };
        let now = OffsetDateTime::now_utc();
        let asked = advice.as_ref().and_then(|a| a.renew.then(|| a.reason.clone().unwrap_or_default()));
        if due(&installed.cert, CLUSTER_RENEWAL, now) || asked.is_some() {
            if let Some(why) = &asked {
                tracing::info!(reason = %why, "ca-server asks for a renewal");
            }
            let next = match self.renew(&installed, &id).await {
                Ok(next) => next,
                Err(e) if e.downcast_ref::<CallError>().is_some_and(CallError::needs_enrolment) => {
                    tracing::warn!(error = %format!("{e:#}"), "the installed intermediate can no longer renew; enrolling again");
                    self.enrol().await?
                }
                Err(e) => return Err(e),
            };
            return self.install(next, Some(&current)).await;
        }
        if let Some(a) = advice {
            let roots = crate::server::parse_all(&a.trust_bundle)?;
            if !roots.is_empty() && !same_bundle(&roots, &installed.roots) {
                let next = follow_bundle(installed, roots)?;
                tracing::info!("the trust bundle changed; installing it beside the current intermediate");
                return self.install(next, Some(&current)).await;
            }
            self.status.synced(CACERTS);
        }
        Ok(())
    }

    fn chain_fps(&self, s: &CaSet) -> Vec<String> {
        let mut chain = vec![s.cert.fingerprint()];
        chain.extend(fingerprints(&s.chain));
        chain
    }

    async fn enrol(&mut self) -> Result<CaSet> {
        let token = crate::k8s::retrying(4, || self.own.get_opt(&self.enrolment_secret))
            .await?
            .and_then(|s| secret_str(&s, "token"))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            let why = format!(
                "Secret {CACERTS} does not exist and there is no enrolment token (Secret {}, key token)",
                self.enrolment_secret
            );
            self.status.blocked(Some(why.clone()));
            self.status.error("no-enrolment-token");
            bail!(why);
        };
        let (key, csr) = key_and_csr(&format!("{} Cluster CA", self.cluster))?;
        let issued = self.server.intermediate(Auth::Token(&token), &csr).await.inspect_err(|e| {
            self.status.server_failed(e.cause());
        })?;
        self.status.server_ok();
        tracing::info!(serial = %issued.serial, "enrolled: the first cluster intermediate is issued");
        self.checked_set(issued, key, None)
    }

    async fn renew(&mut self, installed: &CaSet, id: &Identity) -> Result<CaSet> {
        let (key, csr) = key_and_csr(&format!("{} Cluster CA", self.cluster))?;
        let issued = self.server.intermediate(Auth::Mtls(id), &csr).await.inspect_err(|e| {
            self.status.server_failed(e.cause());
        })?;
        self.status.server_ok();
        tracing::info!(serial = %issued.serial, previous = %installed.cert.serial, "renewed the cluster intermediate");
        self.checked_set(issued, key, Some(&installed.roots))
    }

    fn checked_set(
        &self,
        issued: crate::server::IssuedCert,
        key: hsm::SecretKey,
        installed_roots: Option<&[CertInfo]>,
    ) -> Result<CaSet> {
        let cert = issued.cert()?;
        let chain = crate::server::parse_all(&issued.chain)?;
        let roots = issued.roots()?;
        anyhow::ensure!(cert.is_ca, "ca-server returned a certificate that is not a CA");
        check_issued(&cert, &key, &chain, &roots)?;
        if let Some(have) = installed_roots
            && !bundle_change_allowed(have, &roots)
        {
            self.status.error("bundle-not-superset-or-subset");
            bail!(
                "the new trust bundle neither contains nor is contained in the installed one; istiod would refuse it"
            );
        }
        Ok(CaSet { cert, key: Arc::new(key), chain, roots })
    }

    /// Writes `next` as `cacerts`, first saving what it replaces as `cacerts-previous`.
    async fn install(&mut self, next: CaSet, current: Option<&Secret>) -> Result<()> {
        let ns = self.istio_namespace.clone();
        if let Some(cur) = current {
            let previous = crate::k8s::retrying(4, || self.istio.get_opt(PREVIOUS)).await;
            let rv = match previous {
                Ok(p) => p.and_then(|p| p.metadata.resource_version),
                Err(e) => {
                    self.status.error(crate::k8s::cause(&e));
                    self.pending = Some(next);
                    return Err(e).context("reading Secret cacerts-previous");
                }
            };
            if let Err(e) = write_secret(&self.istio, &secret(PREVIOUS, &ns, &secret_map(cur), rv)).await {
                self.status.error(crate::k8s::cause(&e));
                self.pending = Some(next);
                return Err(e).context("saving the current set as cacerts-previous");
            }
        }
        let rv = current.and_then(|c| c.metadata.resource_version.clone());
        match write_secret(&self.istio, &secret(CACERTS, &ns, &next.data(), rv)).await {
            Ok(_) => {
                self.status.synced(CACERTS);
                self.status.expires(CACERTS, next.cert.not_after.unix_timestamp());
                tracing::info!(serial = %next.cert.serial, "Secret cacerts updated");
                Ok(())
            }
            Err(e) if crate::k8s::status(&e) == Some(409) => {
                // Changed by someone else since it was read: the next pass reads it again and
                // decides afresh; the intermediate just issued is dropped, and the one it
                // renewed from still renews.
                self.status.error("api-conflict");
                Err(e).context("Secret cacerts changed while it was being renewed; will re-read")
            }
            Err(e) => {
                self.status.error(crate::k8s::cause(&e));
                self.pending = Some(next);
                Err(e).context("writing Secret cacerts; will retry with the same set")
            }
        }
    }
}

/// The installed intermediate, key and chain with a new bundle, if istiod would take it: a
/// superset or subset of the installed one, under which the chain still verifies.
fn follow_bundle(installed: CaSet, roots: Vec<CertInfo>) -> Result<CaSet> {
    if !bundle_change_allowed(&installed.roots, &roots) {
        bail!(
            "ca-server's trust bundle neither contains nor is contained in the installed one; istiod would refuse it"
        );
    }
    let rest: Vec<CertInfo> = installed.chain.iter().filter(|c| c.der != installed.cert.der).cloned().collect();
    if ca_core::chain::verify_chain(&installed.cert, &rest, &roots, OffsetDateTime::now_utc()).is_err() {
        bail!("the installed chain does not verify under ca-server's new trust bundle; waiting for a renewal");
    }
    Ok(CaSet { roots, ..installed })
}

/// `ca-agent rollback`: swaps `cacerts` and `cacerts-previous`, each write conditional on what
/// was read, so that a renewal landing meanwhile makes this fail rather than be lost.
pub async fn rollback(istio: &Api<Secret>, ns: &str) -> Result<String> {
    let cur = istio.get_opt(CACERTS).await?.context("there is no Secret cacerts")?;
    let prev = istio.get_opt(PREVIOUS).await?.context("there is no Secret cacerts-previous to roll back to")?;
    let back = CaSet::from_secret(&prev).context("cacerts-previous is not a usable set")?;
    let now_data = secret_map(&cur);
    for f in FILES {
        anyhow::ensure!(now_data.contains_key(f), "cacerts lacks {f}; refusing to swap it into cacerts-previous");
    }
    istio
        .replace(
            CACERTS,
            &Default::default(),
            &secret(CACERTS, ns, &secret_map(&prev), cur.metadata.resource_version.clone()),
        )
        .await
        .context("writing cacerts (changed since it was read? run again)")?;
    istio
        .replace(
            PREVIOUS,
            &Default::default(),
            &secret(PREVIOUS, ns, &now_data, prev.metadata.resource_version.clone()),
        )
        .await
        .context("writing cacerts-previous")?;
    Ok(back.cert.serial)
}
