//! ca-server's REST API as the agent uses it: enrolment and renewal of its credential, the
//! cluster intermediate (plug-in mode), istiod's serving certificate, reports and the
//! service-account keys. Every call verifies ca-server against `--ca-root`; calls after
//! enrolment present the agent's credential over mTLS. No operator token is ever used.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ca_core::cert::{CertInfo, parse_certs};
use serde::Deserialize;
use serde_json::{Value, json};

/// Why a call failed: ca-server said no (with its problem code), or it could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("ca-server refused {what} ({status}{}): {detail}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Refused { what: &'static str, status: u16, code: Option<String>, detail: String },
    #[error("ca-server unreachable for {what}: {cause}")]
    Unreachable { what: &'static str, cause: String },
    #[error("ca-server's answer to {what} is unusable: {cause}")]
    BadAnswer { what: &'static str, cause: String },
}

impl CallError {
    /// The label used for the `ca_agent_errors_total{cause}` metric.
    pub fn cause(&self) -> &'static str {
        match self {
            CallError::Refused { .. } => "server-refused",
            CallError::Unreachable { .. } => "server-unreachable",
            CallError::BadAnswer { .. } => "server-bad-answer",
        }
    }

    /// The credential presented is useless for good (revoked, expired, superseded or not
    /// ours): only a new enrolment can help.
    pub fn needs_enrolment(&self) -> bool {
        matches!(self, CallError::Refused { code: Some(c), .. } if [
            "client-certificate-revoked",
            "client-certificate-expired",
            "client-certificate-superseded",
            "client-certificate-rejected",
        ].contains(&c.as_str()))
    }
}

/// A certificate ca-server issued, with what comes with it.
#[derive(Debug, Deserialize)]
pub struct IssuedCert {
    pub serial: String,
    pub certificate: String,
    #[serde(default)]
    pub chain: Vec<String>,
    #[serde(default)]
    pub trust_bundle: Vec<String>,
}

impl IssuedCert {
    pub fn cert(&self) -> anyhow::Result<CertInfo> {
        one_cert(&self.certificate)
    }

    pub fn roots(&self) -> anyhow::Result<Vec<CertInfo>> {
        parse_all(&self.trust_bundle)
    }
}

/// What ca-server says after a plug-in report.
#[derive(Debug, Deserialize)]
pub struct ReportAdvice {
    pub trust_bundle: Vec<String>,
    pub renew: bool,
    pub reason: Option<String>,
}

pub fn one_cert(pem: &str) -> anyhow::Result<CertInfo> {
    let mut certs = parse_certs(pem.as_bytes(), "certificate")?;
    anyhow::ensure!(certs.len() == 1, "expected one certificate, found {}", certs.len());
    Ok(certs.remove(0))
}

pub fn parse_all(pems: &[String]) -> anyhow::Result<Vec<CertInfo>> {
    let mut out = Vec::new();
    for p in pems {
        out.extend(parse_certs(p.as_bytes(), "certificate")?);
    }
    Ok(out)
}

/// The credential presented over mTLS: a certificate chain and its key.
pub struct Identity {
    pub chain: Vec<CertInfo>,
    pub key: Arc<hsm::SecretKey>,
}

/// How a call authenticates.
pub enum Auth<'a> {
    /// The one-time enrolment token.
    Token(&'a str),
    /// mTLS with the agent's credential (or, in plug-in mode, the cluster intermediate).
    Mtls(&'a Identity),
    None,
}

pub struct CaServer {
    base: String,
    cluster: String,
    roots: rustls::RootCertStore,
}

impl CaServer {
    pub fn new(base: &str, cluster: &str, ca_root_pem: &[u8]) -> anyhow::Result<CaServer> {
        let mut roots = rustls::RootCertStore::empty();
        for c in parse_certs(ca_root_pem, "--ca-root")? {
            roots.add(rustls::pki_types::CertificateDer::from(c.der))?;
        }
        Ok(CaServer { base: base.trim_end_matches('/').to_string(), cluster: cluster.to_string(), roots })
    }

    fn client(&self, identity: Option<&Identity>) -> Result<reqwest::Client, CallError> {
        let bad = |cause: String| CallError::BadAnswer { what: "TLS setup", cause };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(self.roots.clone());
        let tls = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => {
                let chain =
                    id.chain.iter().map(|c| rustls::pki_types::CertificateDer::from(c.der.clone())).collect::<Vec<_>>();
                let certified = rustls::sign::CertifiedKey::new(chain, id.key.tls_signer());
                certified.keys_match().map_err(|e| bad(format!("the credential and its key do not match: {e}")))?;
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
            }
        };
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| bad(e.to_string()))
    }

    async fn call(
        &self,
        what: &'static str,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> Result<reqwest::Response, CallError> {
        let identity = match &auth {
            Auth::Mtls(id) => Some(*id),
            _ => None,
        };
        let client = self.client(identity)?;
        let url = format!("{}/v1/clusters/{}{path}", self.base, self.cluster);
        let mut req = client.request(method, &url);
        if let Auth::Token(t) = auth {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        // reqwest's error names the URL, never the token or the body.
        let resp = req.send().await.map_err(|e| CallError::Unreachable { what, cause: error_chain(&e) })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let problem: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = problem.get("code").and_then(Value::as_str).map(str::to_string);
        let detail = problem.get("detail").and_then(Value::as_str).unwrap_or("no detail").chars().take(500).collect();
        // A 5xx is the server's trouble, not an answer about us: retried like an outage.
        if status.is_server_error() && code.is_none() {
            return Err(CallError::Unreachable { what, cause: format!("{status}") });
        }
        Err(CallError::Refused { what, status: status.as_u16(), code, detail })
    }

    async fn json<T: for<'de> Deserialize<'de>>(what: &'static str, resp: reqwest::Response) -> Result<T, CallError> {
        resp.json().await.map_err(|e| CallError::BadAnswer { what, cause: e.to_string() })
    }

    /// Plug-in mode: a new cluster intermediate for `csr`.
    pub async fn intermediate(&self, auth: Auth<'_>, csr: &str) -> Result<IssuedCert, CallError> {
        let what = "the cluster intermediate";
        let resp = self.call(what, reqwest::Method::POST, "/intermediate", auth, Some(json!({"csr": csr}))).await?;
        Self::json(what, resp).await
    }

    /// Plug-in mode: what `cacerts` holds, for the rotation gates.
    pub async fn report(
        &self,
        id: &Identity,
        bundle: Vec<String>,
        chain: Vec<String>,
        serial: &str,
    ) -> Result<ReportAdvice, CallError> {
        let what = "the installed report";
        let body = json!({"bundle": bundle, "chain": chain, "intermediate_serial": serial});
        let resp = self.call(what, reqwest::Method::POST, "/report", Auth::Mtls(id), Some(body)).await?;
        Self::json(what, resp).await
    }

    /// External-CA mode: the agent's own client certificate.
    pub async fn agent_certificate(&self, auth: Auth<'_>, csr: &str) -> Result<IssuedCert, CallError> {
        let what = "the agent certificate";
        let resp =
            self.call(what, reqwest::Method::POST, "/agent-certificate", auth, Some(json!({"csr": csr}))).await?;
        Self::json(what, resp).await
    }

    /// External-CA mode: istiod's serving certificate.
    pub async fn server_certificate(
        &self,
        id: &Identity,
        csr: &str,
        dns_names: &[String],
    ) -> Result<IssuedCert, CallError> {
        let what = "istiod's serving certificate";
        let body = json!({"csr": csr, "dns_names": dns_names});
        let resp = self.call(what, reqwest::Method::POST, "/server-certificates", Auth::Mtls(id), Some(body)).await?;
        Self::json(what, resp).await
    }

    /// External-CA mode: the cluster's service-account issuer and keys.
    pub async fn push_keys(&self, id: &Identity, issuer: &str, jwks: &Value) -> Result<bool, CallError> {
        let what = "the service-account keys";
        let body = json!({"issuer": issuer, "jwks": jwks});
        let resp = self.call(what, reqwest::Method::PUT, "/service-account-keys", Auth::Mtls(id), Some(body)).await?;
        let v: Value = Self::json(what, resp).await?;
        Ok(v.get("changed").and_then(Value::as_bool).unwrap_or(false))
    }

    /// External-CA mode: which roots each namespace's `istio-ca-root-cert` holds. Answers
    /// why the agent should renew its own certificate now (an environment rotation moved the
    /// environment to a new key), if it should.
    pub async fn namespace_report(
        &self,
        id: &Identity,
        namespaces: &BTreeMap<String, Vec<String>>,
    ) -> Result<Option<String>, CallError> {
        let what = "the namespace report";
        let body = json!({"namespaces": namespaces});
        let resp = self.call(what, reqwest::Method::POST, "/namespace-report", Auth::Mtls(id), Some(body)).await?;
        let v: Value = Self::json(what, resp).await?;
        let renew = v.get("renew").and_then(Value::as_bool).unwrap_or(false);
        Ok(renew.then(|| v.get("reason").and_then(Value::as_str).unwrap_or("ca-server asks for it").to_string()))
    }

    /// The cluster's trust bundle (public).
    pub async fn trust_bundle(&self) -> Result<String, CallError> {
        let what = "the trust bundle";
        let resp = self.call(what, reqwest::Method::GET, "/trust-bundle", Auth::None, None).await?;
        resp.text().await.map_err(|e| CallError::BadAnswer { what, cause: e.to_string() })
    }
}

/// The causes of a transport error, joined: reqwest's top line alone says little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
