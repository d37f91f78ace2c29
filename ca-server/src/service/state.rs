//! Shared server state: configuration, storage, issuers (with their HSM health), operator
//! authentication and metrics.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ca_core::cert::CertInfo;
use ca_store::Store;

use crate::auth::Auth;
use crate::config::Config;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::service::issuer::{Issuer, Issuers};
use crate::service::istio::Istio;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Store,
    /// Environment intermediates by name. A rotation swaps an entry for one with another
    /// certificate, key or trust bundle (`rotation::refresh`); everything else reads.
    pub issuers: Issuers,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    /// Identifies this replica in leases.
    pub instance: String,
    pub audit_signer: Arc<RwLock<Option<Arc<hsm::KeySigner>>>>,
    /// `tls.client_ca`: roots that renewal client certificates chain to.
    pub client_roots: Vec<CertInfo>,
    /// Istio's certificate API: external-CA clusters, token validation, the batch recorder.
    pub istio: Istio,
    /// The anonymous rate limiter and the summary of anonymous refusals.
    pub edge: crate::edge::Edge,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }

    pub fn issuer(&self, name: &str) -> Result<Arc<Issuer>, ServiceError> {
        self.issuers.get(name).ok_or_else(|| ServiceError::not_found(format!("no issuer {name:?}")))
    }

    /// The audit actor for work this replica does on its own (CRLs, checkpoints).
    pub fn job_actor(&self) -> String {
        format!("replica:{}", &self.instance[..8])
    }

    /// Whether a client certificate chains to `tls.client_ca` through one of our issuers, as of
    /// its own notBefore (expiry is reported separately).
    ///
    /// During a rotation an environment has two certificates (the old one and its
    /// successor); intermediates under either may renew, so that clusters can move over.
    pub fn client_chain_ok(&self, der: &[u8]) -> bool {
        let Ok(leaf) = CertInfo::from_der(der.to_vec()) else { return false };
        self.issuers.all().iter().any(|issuer| {
            issuer.versions().any(|(cert, chain)| {
                if cert.subject_raw != leaf.issuer_raw {
                    return false;
                }
                let mut intermediates = vec![cert.clone()];
                intermediates.extend(chain.iter().filter(|c| !c.is_self_issued()).cloned());
                // tls.client_ca, plus the roots this environment's chains end in (a rotated
                // root is trusted here once an approved rotation installed it).
                let mut roots = self.client_roots.clone();
                roots.extend(chain.iter().filter(|c| c.is_self_issued()).cloned());
                ca_core::chain::verify_chain(&leaf, &intermediates, &roots, leaf.not_before)
                    .is_ok_and(|path| path.get(1).is_some_and(|p| p.der == cert.der))
            })
        })
    }

    pub fn hsm_timeout(&self) -> Duration {
        self.config.policy.hsm_timeout.duration().unsigned_abs()
    }
}
