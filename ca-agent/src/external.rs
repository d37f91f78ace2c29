//! External-CA mode, except the root ConfigMaps (`roots`): the agent's own credential in
//! Secret `ca-agent-credential` (enrolled once with the one-time token, renewed over mTLS at
//! two thirds of its life), istiod's serving certificate in Secret `istiod-tls` (renewed at
//! half-life, or when its `ca.crt` no longer matches the bundle), and the cluster's
//! service-account issuer and keys, read from its own API server and pushed to ca-server on
//! change. Writes are conditional on the resourceVersion read; nothing here deletes.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ca_core::cert::CertInfo;
use ca_core::validity::{CLUSTER_RENEWAL, LifeFraction};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde_json::Value;
use sha2::Digest;
use time::OffsetDateTime;

use crate::certs::{check_issued, due, key_and_csr, pem_of, same_bundle};
use crate::k8s::{secret, secret_str, write_secret};
use crate::server::{Auth, CaServer, Identity, IssuedCert};
use crate::status::Status;

pub const CREDENTIAL: &str = "ca-agent-credential";
pub const ISTIOD_TLS: &str = "istiod-tls";

pub struct External {
    pub server: CaServer,
    pub status: Arc<Status>,
    pub client: Client,
    pub cluster: String,
    pub namespace: String,
    pub istio_namespace: String,
    pub enrolment_secret: String,
    pub dns_names: Vec<String>,
    /// Hash of the issuer and keys last accepted by ca-server.
    pushed_keys: Option<[u8; 32]>,
    /// Issued but not yet written (an API outage): written first on the next pass.
    pending_credential: Option<(IssuedCert, hsm::SecretKey)>,
    /// ca-server asked for a renewal of the agent certificate before its time.
    pub renew_asked: Option<String>,
}

impl External {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        server: CaServer,
        status: Arc<Status>,
        client: Client,
        cluster: String,
        namespace: String,
        istio_namespace: String,
        enrolment_secret: String,
        dns_names: Vec<String>,
    ) -> External {
        External {
            server,
            status,
            client,
            cluster,
            namespace,
            istio_namespace,
            enrolment_secret,
            dns_names,
            pushed_keys: None,
            pending_credential: None,
            renew_asked: None,
        }
    }

    fn own(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn istio(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.istio_namespace)
    }

    /// The agent's credential, enrolling or renewing it first when needed.
    pub async fn credential(&mut self) -> Result<Identity> {
        let own = self.own();
        let current = crate::k8s::retrying(4, || own.get_opt(CREDENTIAL)).await.inspect_err(|e| {
            self.status.error(crate::k8s::cause(e));
        })?;
        self.status.api_ok();
        if let Some((issued, key)) = self.pending_credential.take() {
            return self.store_credential(issued, key, current.as_ref()).await;
        }
        let id = match &current {
            None => None,
            Some(s) => match parse_credential(s) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "Secret {CREDENTIAL} is unusable; enrolling again");
                    None
                }
            },
        };
        let now = OffsetDateTime::now_utc();
        let asked = self.renew_asked.take();
        if let Some(why) = &asked {
            tracing::info!(reason = %why, "ca-server asks for a new agent certificate");
        }
        match id {
            Some(id) if asked.is_none() && !due(&id.chain[0], CLUSTER_RENEWAL, now) => {
                self.status.expires(CREDENTIAL, id.chain[0].not_after.unix_timestamp());
                self.status.synced(CREDENTIAL);
                Ok(id)
            }
            Some(id) if id.chain[0].not_after > now => {
                let (key, csr) = key_and_csr(&format!("ca-agent {}", self.cluster))?;
                match self.server.agent_certificate(Auth::Mtls(&id), &csr).await {
                    Ok(issued) => {
                        self.status.server_ok();
                        tracing::info!(serial = %issued.serial, "renewed the agent certificate");
                        self.store_credential(issued, key, current.as_ref()).await
                    }
                    Err(e) if e.needs_enrolment() => {
                        self.status.server_failed(e.cause());
                        tracing::warn!(error = %e, "the agent certificate can no longer renew; enrolling again");
                        self.enrol(current.as_ref()).await
                    }
                    Err(e) => {
                        self.status.server_failed(e.cause());
                        tracing::warn!(error = %e, "renewing the agent certificate failed; using the current one");
                        self.renew_asked = asked;
                        Ok(id)
                    }
                }
            }
            _ => self.enrol(current.as_ref()).await,
        }
    }

    async fn enrol(&mut self, current: Option<&Secret>) -> Result<Identity> {
        let token = self.enrolment_token().await?;
        let (key, csr) = key_and_csr(&format!("ca-agent {}", self.cluster))?;
        let issued = self.server.agent_certificate(Auth::Token(&token), &csr).await.inspect_err(|e| {
            self.status.server_failed(e.cause());
        })?;
        self.status.server_ok();
        tracing::info!(serial = %issued.serial, "enrolled: the agent certificate is issued");
        self.store_credential(issued, key, current).await
    }

    async fn enrolment_token(&self) -> Result<String> {
        let own = self.own();
        let token = crate::k8s::retrying(4, || own.get_opt(&self.enrolment_secret))
            .await?
            .and_then(|s| secret_str(&s, "token"))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        token.with_context(|| {
            self.status.error("no-enrolment-token");
            format!(
                "no usable agent credential (Secret {CREDENTIAL}) and no enrolment token (Secret {}, key token)",
                self.enrolment_secret
            )
        })
    }

    async fn store_credential(
        &mut self,
        issued: IssuedCert,
        key: hsm::SecretKey,
        current: Option<&Secret>,
    ) -> Result<Identity> {
        let cert = issued.cert()?;
        let chain = crate::server::parse_all(&issued.chain)?;
        check_issued(&cert, &key, &chain, &issued.roots()?)?;
        let data = BTreeMap::from([
            ("tls.crt".to_string(), cert.pem()),
            ("tls.key".to_string(), key.expose_pem().to_string()),
        ]);
        let rv = current.and_then(|c| c.metadata.resource_version.clone());
        if let Err(e) = write_secret(&self.own(), &secret(CREDENTIAL, &self.namespace, &data, rv)).await {
            self.status.error(crate::k8s::cause(&e));
            if crate::k8s::status(&e) != Some(409) {
                self.pending_credential = Some((issued, key));
            }
            return Err(e).context("writing Secret ca-agent-credential");
        }
        self.status.expires(CREDENTIAL, cert.not_after.unix_timestamp());
        self.status.synced(CREDENTIAL);
        Ok(Identity { chain: vec![cert], key: Arc::new(key) })
    }

    /// Keeps `istiod-tls` current: renewed at half-life, or when its bundle is not `roots`.
    pub async fn istiod_tls(&mut self, id: &Identity, roots: &[CertInfo]) -> Result<()> {
        let istio = self.istio();
        let current = crate::k8s::retrying(4, || istio.get_opt(ISTIOD_TLS)).await.inspect_err(|e| {
            self.status.error(crate::k8s::cause(e));
        })?;
        let now = OffsetDateTime::now_utc();
        if let Some(s) = &current {
            let leaf = secret_str(s, "tls.crt")
                .and_then(|p| crate::server::parse_all(&[p]).ok())
                .and_then(|c| c.into_iter().next());
            let bundle = secret_str(s, "ca.crt").and_then(|p| crate::server::parse_all(&[p]).ok()).unwrap_or_default();
            if let Some(leaf) = leaf
                && !due(&leaf, LifeFraction::HALF, now)
                && same_bundle(&bundle, roots)
            {
                self.status.expires(ISTIOD_TLS, leaf.not_after.unix_timestamp());
                self.status.synced(ISTIOD_TLS);
                return Ok(());
            }
        }
        let (key, csr) = key_and_csr(self.dns_names.first().map_or("istiod", String::as_str))?;
        let issued = self.server.server_certificate(id, &csr, &self.dns_names).await.inspect_err(|e| {
            self.status.server_failed(e.cause());
        })?;
        self.status.server_ok();
        let cert = issued.cert()?;
        let chain = crate::server::parse_all(&issued.chain)?;
        let bundle = issued.roots()?;
        check_issued(&cert, &key, &chain, &bundle)?;
        let mut tls_crt = cert.pem();
        tls_crt.push_str(&pem_of(&chain.into_iter().filter(|c| c.der != cert.der).collect::<Vec<_>>()));
        let data = BTreeMap::from([
            ("tls.crt".to_string(), tls_crt),
            ("tls.key".to_string(), key.expose_pem().to_string()),
            ("ca.crt".to_string(), pem_of(&bundle)),
        ]);
        let rv = current.and_then(|c| c.metadata.resource_version);
        let mut obj = secret(ISTIOD_TLS, &self.istio_namespace, &data, rv);
        obj.type_ = Some("kubernetes.io/tls".into());
        write_secret(&self.istio(), &obj).await.inspect_err(|e| self.status.error(crate::k8s::cause(e)))?;
        tracing::info!(serial = %issued.serial, "Secret istiod-tls updated");
        self.status.expires(ISTIOD_TLS, cert.not_after.unix_timestamp());
        self.status.synced(ISTIOD_TLS);
        Ok(())
    }

    /// Reads the cluster's issuer and keys from its own API server, and pushes them to
    /// ca-server when they differ from what it last accepted.
    pub async fn service_account_keys(&mut self, id: &Identity) -> Result<()> {
        let discovery = self.get_json("/.well-known/openid-configuration").await?;
        let issuer = discovery
            .get("issuer")
            .and_then(Value::as_str)
            .context("the API server's discovery document names no issuer")?
            .to_string();
        let jwks = self.get_json("/openid/v1/jwks").await?;
        if jwks.get("keys").and_then(Value::as_array).is_none_or(Vec::is_empty) {
            self.status.error("jwks-empty");
            bail!("the API server's /openid/v1/jwks holds no keys");
        }
        let digest: [u8; 32] = sha2::Sha256::digest(serde_json::to_vec(&(&issuer, &jwks))?).into();
        if self.pushed_keys == Some(digest) {
            self.status.synced("service-account-keys");
            return Ok(());
        }
        let changed = self.server.push_keys(id, &issuer, &jwks).await.inspect_err(|e| {
            self.status.server_failed(e.cause());
        })?;
        self.status.server_ok();
        if changed {
            tracing::info!(issuer = %issuer, "ca-server took the cluster's new service-account keys");
        }
        self.pushed_keys = Some(digest);
        self.status.synced("service-account-keys");
        Ok(())
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let text = crate::k8s::retrying(4, || {
            let client = self.client.clone();
            let req = axum::http::Request::get(path).body(Vec::new());
            async move {
                let req = req.map_err(|e| kube::Error::BuildRequest(kube::core::request::Error::BuildRequest(e)))?;
                client.request_text(req).await
            }
        })
        .await
        .inspect_err(|e| self.status.error(crate::k8s::cause(e)))?;
        self.status.api_ok();
        serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))
    }
}

fn parse_credential(s: &Secret) -> Result<Identity> {
    let get = |k: &str| secret_str(s, k).with_context(|| format!("{k} is missing"));
    let (cert, key) = crate::certs::cert_with_key(&get("tls.crt")?, &get("tls.key")?, "tls.crt", "tls.key")?;
    Ok(Identity { chain: vec![cert], key: Arc::new(key) })
}
