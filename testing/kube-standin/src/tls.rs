//! HTTPS on 127.0.0.1:0 with a throwaway self-signed certificate, and the kubeconfig that trusts it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key for rustls. The key is
/// made here rather than by hsm: it is a test server's throwaway key that lives only in memory
/// (allowed in ca-core/tests/architecture.rs for that reason).
#[allow(clippy::disallowed_methods)]
fn self_signed() -> Result<(String, rustls::ServerConfig), Box<dyn std::error::Error + Send + Sync>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "kube-standin");
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((cert.pem(), config))
}

/// Binds, then accepts in a task until aborted. While `down` is true, connections are dropped.
pub async fn serve(
    app: axum::Router,
    down: watch::Sender<bool>,
) -> std::io::Result<(SocketAddr, String, tokio::task::JoinHandle<()>)> {
    let (pem, config) = self_signed().map_err(std::io::Error::other)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            if *down.borrow() {
                drop(tcp);
                continue;
            }
            let (acceptor, app, mut down) = (acceptor.clone(), app.clone(), down.subscribe());
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
                tokio::select! {
                    _ = conn => {}
                    _ = down.wait_for(|d| *d) => {}
                }
            });
            // Reap finished connections so the set does not grow without bound.
            while conns.try_join_next().is_some() {}
        }
    });
    Ok((addr, pem, task))
}

pub fn write_kubeconfig(path: &Path, url: &str, ca_pem: &str, token: &str) -> std::io::Result<()> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // JSON is YAML, so kube's kubeconfig loader reads this as it is.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {
            "server": url,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": "standin", "user": {"token": token}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": "default"}}],
        "current-context": "standin",
    });
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(serde_json::to_string_pretty(&config)?.as_bytes())?;
    f.sync_all()
}
