//! Talking to ca-server: TLS trust (and the cluster's client certificate for renewals) and the
//! operator's REST client.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca_core::cert::{load_cert, load_certs};
use serde_json::Value;

use crate::api::Problem;

pub fn tls_config(ca_root: &Path, client: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca_root).with_context(|| format!("--ca-root {}", ca_root.display()))? {
        roots.add(rustls::pki_types::CertificateDer::from(c.der)).context("--ca-root")?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = vec![rustls::pki_types::CertificateDer::from(load_cert(cert)?.der)];
            // The key stays in hsm: rustls gets a signer for it, never its bytes.
            let certified = hsm::tls::certified_key(&hsm::KeyRef::file(key), chain).map_err(|e| match e {
                e @ hsm::HsmError::Io { .. } => anyhow::Error::new(e),
                e => anyhow::Error::new(e).context("the current intermediate and its key do not match"),
            })?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
        }
    })
}

/// The bearer token from `CA_TOKEN`, trimmed; `whose` says which role's token is wanted.
pub fn token(whose: &str) -> Result<String> {
    std::env::var("CA_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .with_context(|| format!("set CA_TOKEN to {whose} token (it is never taken from the command line)"))
}

/// An operator's client of the REST API (rotations and two-person-rule requests).
pub struct Api {
    server: String,
    client: reqwest::Client,
    token: String,
}

impl Api {
    pub fn new(server: &str, ca_root: &Path) -> Result<Api> {
        let token = token("an operator")?;
        let tls = tls_config(ca_root, None)?;
        let client = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(60)).build()?;
        Ok(Api { server: server.trim_end_matches('/').to_string(), client, token })
    }

    /// The server's answer as it sent it: commands print it unchanged with `--output json`
    /// and read it through the types in `api` for text.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.server);
        let mut req = match method {
            "GET" => self.client.get(&url),
            _ => self.client.post(&url),
        }
        .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            match Problem::parse(&text) {
                Some((code, detail)) => bail!("{method} {path}: {status} ({code}): {detail}"),
                None => bail!("{method} {path}: {status}"),
            }
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}
