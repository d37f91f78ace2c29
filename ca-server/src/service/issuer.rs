//! The issuers this server signs with: an environment intermediate or a server-held cluster
//! intermediate, its key opened on demand and its HSM health tracked, and the environments'
//! set that rotations swap entries of.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca_core::cert::{CertInfo, load_cert, load_certs};
use ca_core::issue::CaIssuer;
use time::OffsetDateTime;

use crate::config::IssuerConfig;
use crate::error::{ErrorCode, ServiceError};
use crate::service::hsm_call::{HsmFailure, run};

/// The environment intermediates, by name: the ones in use, and the ones the configuration
/// named at start (what rotations are applied to; the files are read once).
pub struct Issuers {
    current: RwLock<BTreeMap<String, Arc<Issuer>>>,
    configured: Vec<Arc<Issuer>>,
}

impl Issuers {
    pub fn new(map: BTreeMap<String, Arc<Issuer>>) -> Self {
        Issuers { configured: map.values().cloned().collect(), current: RwLock::new(map) }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Issuer>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).contains_key(name)
    }

    /// Every issuer, in name order.
    pub fn all(&self) -> Vec<Arc<Issuer>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The issuers as the configuration named them at start.
    pub fn configured(&self) -> &[Arc<Issuer>] {
        &self.configured
    }

    /// Puts `issuer` in place of the one with its name.
    pub fn replace(&self, issuer: Arc<Issuer>) {
        self.current.write().unwrap_or_else(|p| p.into_inner()).insert(issuer.name.clone(), issuer);
    }
}

/// An intermediate this server signs with: an environment's, or the server-held intermediate
/// of an external-CA cluster (`ClusterCa::issuer`).
pub struct Issuer {
    pub name: String,
    pub key_ref: hsm::KeyRef,
    pub cert: CertInfo,
    /// Parents of `cert`, up to and including the root.
    pub chain: Vec<CertInfo>,
    /// The trust bundle handed to clusters: the self-signed certificates of the chain, or
    /// during a root rotation whatever its stage puts in bundles.
    pub roots: Vec<CertInfo>,
    /// Other certificates of this environment (with their chains) whose cluster
    /// intermediates may still renew: the other side of a rotation in progress.
    pub accepted: Vec<(CertInfo, Vec<CertInfo>)>,
    signer: RwLock<Option<Arc<CaIssuer>>>,
    healthy: AtomicBool,
}

impl Issuer {
    /// Loads the certificate and chain and checks that they form a valid path now. The key is
    /// opened separately (`reconnect`), so that a server can start while its HSM is away.
    pub fn load(cfg: &IssuerConfig) -> Result<Issuer> {
        let cert = load_cert(&cfg.certificate).with_context(|| format!("issuer {}", cfg.name))?;
        let mut chain = Vec::new();
        for p in &cfg.chain {
            chain.extend(load_certs(p).with_context(|| format!("issuer {}", cfg.name))?);
        }
        Issuer::from_certs(&cfg.name, cfg.key.parse()?, cert, chain)
    }

    /// An issuer from its certificate and the chain above it (ending in a root), checked to
    /// form a valid path now.
    pub fn from_certs(name: &str, key_ref: hsm::KeyRef, cert: CertInfo, chain: Vec<CertInfo>) -> Result<Issuer> {
        let roots: Vec<CertInfo> = chain.iter().filter(|c| c.is_self_issued()).cloned().collect();
        if roots.is_empty() {
            bail!("issuer {name}: the chain must end in a self-signed root");
        }
        let intermediates: Vec<CertInfo> = chain.iter().filter(|c| !c.is_self_issued()).cloned().collect();
        ca_core::chain::verify_chain(&cert, &intermediates, &roots, OffsetDateTime::now_utc())
            .with_context(|| format!("issuer {name}: certificate does not chain to its root"))?;
        if !cert.is_ca || !cert.key_cert_sign {
            bail!("issuer {name}: {} is not a CA certificate", cert.subject);
        }
        Ok(Issuer {
            name: name.to_string(),
            key_ref,
            cert,
            chain,
            roots,
            accepted: Vec::new(),
            signer: RwLock::new(None),
            healthy: AtomicBool::new(false),
        })
    }

    /// This issuer as a rotation stage sets it up: `bundle` is handed to clusters instead of
    /// the chain's own roots, and intermediates under `accepted` may still renew.
    pub fn with_trust(mut self, bundle: Vec<CertInfo>, accepted: Vec<(CertInfo, Vec<CertInfo>)>) -> Self {
        self.roots = bundle;
        self.accepted = accepted;
        self
    }

    /// The certificate and chain this issuer signs with, then the accepted ones.
    pub fn versions(&self) -> impl Iterator<Item = (&CertInfo, &[CertInfo])> {
        std::iter::once((&self.cert, self.chain.as_slice()))
            .chain(self.accepted.iter().map(|(c, ch)| (c, ch.as_slice())))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, v: bool) {
        self.healthy.store(v, Ordering::SeqCst);
    }

    /// Opens the key afresh (a new login for tokens) and pairs it with the certificate.
    pub fn reconnect(&self) -> Result<()> {
        let signer = hsm::reopen_signer(&self.key_ref)
            .with_context(|| format!("issuer {}: opening {}", self.name, self.key_ref))?;
        let ca = CaIssuer::new(self.cert.clone(), signer).with_context(|| format!("issuer {}", self.name))?;
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ca));
        self.set_healthy(true);
        Ok(())
    }

    /// `reconnect` on a blocking thread, waiting at most `timeout`.
    pub async fn reconnect_within(self: &Arc<Self>, timeout: Duration) -> Result<(), HsmFailure<anyhow::Error>> {
        let issuer = self.clone();
        run(timeout, move || issuer.reconnect()).await
    }

    pub fn signer(&self) -> Option<Arc<CaIssuer>> {
        self.signer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` with the signing key on a blocking thread, bounded by `timeout`: a request
    /// never hangs on a dead HSM. A timeout or device failure marks the issuer unhealthy until
    /// the probe sees it recover.
    pub async fn with_key<T: Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        f: impl FnOnce(&CaIssuer) -> ca_core::Result<T> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.with_key_on(timeout, false, f).await
    }

    /// `with_key` for short CPU-bound work on the request path (one workload certificate):
    /// with a key held in memory (a file key), which cannot hang, `f` runs in place, sparing
    /// two thread hand-offs per certificate; a device's key still goes to a blocking thread
    /// under `timeout`.
    pub async fn with_key_short<T: Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        f: impl FnOnce(&CaIssuer) -> ca_core::Result<T> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.with_key_on(timeout, true, f).await
    }

    async fn with_key_on<T: Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        in_place_if_software: bool,
        f: impl FnOnce(&CaIssuer) -> ca_core::Result<T> + Send + 'static,
    ) -> Result<T, ServiceError> {
        if !self.is_healthy() {
            return Err(ServiceError::new(
                ErrorCode::HsmUnavailable,
                format!("the key of issuer {} is unavailable; try again shortly", self.name),
            ));
        }
        let Some(signer) = self.signer() else {
            return Err(ServiceError::new(
                ErrorCode::HsmUnavailable,
                format!("the key of issuer {} is not loaded", self.name),
            ));
        };
        let result = if in_place_if_software && !signer.signer.is_hardware() {
            f(&signer).map_err(HsmFailure::Failed)
        } else {
            run(timeout, move || f(&signer)).await
        };
        match result {
            Err(HsmFailure::TimedOut) => {
                self.set_healthy(false);
                Err(ServiceError::new(
                    ErrorCode::HsmTimeout,
                    format!("the HSM of issuer {} did not answer in time", self.name),
                ))
            }
            Err(HsmFailure::Panicked(join)) => Err(ServiceError::internal(join)),
            Err(HsmFailure::Failed(ca_core::CoreError::Hsm(e))) => {
                self.set_healthy(false);
                tracing::error!(issuer = %self.name, error = %e, "HSM failure");
                Err(ServiceError::new(
                    ErrorCode::HsmUnavailable,
                    format!("the key of issuer {} failed; try again shortly", self.name),
                ))
            }
            Err(HsmFailure::Failed(e)) => Err(map_core(e)),
            Ok(r) => Ok(r),
        }
    }

    /// Trust domains this environment serves (recorded in its certificate).
    pub fn trust_domains(&self) -> Vec<String> {
        self.cert.trust_domains()
    }
}

/// Policy and input errors from ca-core are the client's; everything else is ours.
pub fn map_core(e: ca_core::CoreError) -> ServiceError {
    use ca_core::{CoreError, CsrError};
    match e {
        CoreError::Csr(CsrError::BadSignature) => ServiceError::new(ErrorCode::BadCsrSignature, e.to_string()),
        CoreError::Csr(CsrError::WeakKey(_)) => ServiceError::new(ErrorCode::WeakKey, e.to_string()),
        CoreError::Csr(_) => ServiceError::new(ErrorCode::MalformedCsr, e.to_string()),
        CoreError::Policy(_) => ServiceError::new(ErrorCode::Policy, e.to_string()),
        other => ServiceError::internal(other),
    }
}
