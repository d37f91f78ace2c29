//! TLS on the listening socket, with optional client certificates.
//!
//! Cluster intermediates are CA certificates, which webpki refuses as client certificates. The
//! TLS layer therefore checks only that the client holds the certificate's key (the handshake
//! signature). The renewal handler checks the rest: the certificate chains to `tls.client_ca`
//! through one of our issuers, the inventory knows it as this cluster's newest (or previous),
//! unexpired, unrevoked intermediate. A refusal there gets a problem document and an audit
//! record instead of a bare TLS alert.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::TlsConfig;

/// What the TLS layer learned about the connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// DER of the client certificate, when one was presented (and proved possession of).
    pub peer_cert: Option<Vec<u8>>,
}

#[derive(Debug)]
struct ProofOfPossession {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ProofOfPossession {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only well-formed; the handler checks the chain and the inventory, so that a refusal
        // is answered and audited rather than ending the handshake.
        x509_parser::parse_x509_certificate(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The roots in `tls.client_ca`.
pub fn client_roots(cfg: &TlsConfig) -> Result<Vec<ca_core::cert::CertInfo>> {
    let mut roots = Vec::new();
    for p in &cfg.client_ca {
        roots.extend(ca_core::cert::load_certs(p).with_context(|| format!("tls.client_ca {}", p.display()))?);
    }
    Ok(roots)
}

pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>> {
    let pem_text = std::fs::read(&cfg.cert).with_context(|| format!("tls.cert {}", cfg.cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(&pem_text)
        .with_context(|| format!("tls.cert {}: not PEM", cfg.cert.display()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if chain.is_empty() {
        bail!("tls.cert {}: no certificate", cfg.cert.display());
    }
    let key_ref: hsm::KeyRef = cfg.key.parse().context("tls.key")?;
    let certified =
        hsm::tls::certified_key(&key_ref, chain).context("tls.cert and tls.key do not form a usable pair")?;
    let provider = provider();
    let verifier = Arc::new(ProofOfPossession { algs: provider.signature_verification_algorithms });
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    Ok(Arc::new(config))
}

/// How long a connection may take before its first request, and stay without one.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// The TLS handshake, and then the first request (protocol detection, HTTP/1 headers,
    /// an HTTP/2 preface with nothing after it).
    pub handshake: Duration,
    /// No request in flight for this long: the connection is shut down gracefully.
    pub idle: Duration,
}

impl ConnLimits {
    pub fn from_config(cfg: &crate::config::LimitsConfig) -> Self {
        ConnLimits {
            handshake: cfg.handshake_timeout.duration().unsigned_abs(),
            idle: cfg.idle_timeout.duration().unsigned_abs(),
        }
    }
}

/// The next connection. A failed accept (out of file descriptors, say) is logged and retried
/// after a pause instead of ending the listener. Cancel-safe, as `TcpListener::accept` is.
pub async fn accept(listener: &TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts TLS connections and serves `app` on each, with [`ConnInfo`] in the request
/// extensions. Runs until the process ends.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: axum::Router,
    limits: ConnLimits,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, remote) = accept(&listener).await;
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake must not hold a task forever.
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
            let info = ConnInfo { remote, peer_cert };
            let svc = tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(info.clone());
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            serve_conn(TokioIo::new(tls), svc, limits, false, None, remote).await;
        });
    }
}

/// Plain HTTP, for the metrics listener (which carries no secrets and sits on loopback unless
/// asked otherwise). The same connection limits as the API.
pub async fn serve_plain(listener: TcpListener, app: axum::Router, limits: ConnLimits) -> Result<()> {
    loop {
        let (tcp, remote) = accept(&listener).await;
        let app = app.clone();
        tokio::spawn(async move {
            let svc = tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            serve_conn(TokioIo::new(tcp), svc, limits, false, None, remote).await;
        });
    }
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    state: std::sync::Mutex<(usize, tokio::time::Instant, bool)>,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        s.2 = true;
        InFlight(self.clone())
    }

    /// `(requests in flight, since when none, whether any request came)`.
    fn get(&self) -> (usize, tokio::time::Instant, bool) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Held until the response body is dropped (sent or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 -= 1;
        s.1 = tokio::time::Instant::now();
    }
}

/// Serves one connection (HTTP/1 or HTTP/2, or HTTP/2 only) until the client closes it, it
/// sends no request within `limits.handshake`, it has had no request in flight for
/// `limits.idle`, or `stop` fires; then shuts it down gracefully (HTTP/2: GOAWAY), and closes
/// it outright if the client does not let go. Only requests count as activity: HTTP/2 pings
/// or a trickle of bytes do not keep a connection open.
pub async fn serve_conn<I, S, B>(
    io: I,
    svc: S,
    limits: ConnLimits,
    http2_only: bool,
    mut stop: Option<tokio::sync::watch::Receiver<()>>,
    remote: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: tower::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body<Data = hyper::body::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let activity = Arc::new(Activity { state: std::sync::Mutex::new((0, tokio::time::Instant::now(), false)) });
    let a = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let guard = a.begin();
        let call = svc.clone().oneshot(req);
        async move {
            let resp = call.await?;
            Ok::<_, S::Error>(resp.map(move |body| {
                body.map_frame(move |f| {
                    let _held = &guard;
                    f
                })
            }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if http2_only {
        builder = builder.http2_only();
    }
    // Without a timer hyper cannot time out a client that never finishes its headers.
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.handshake);
    builder.http2().timer(hyper_util::rt::TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let stopped = async {
        match stop.as_mut() {
            Some(s) => {
                let _ = s.changed().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stopped);
    let mut grace = limits.handshake;
    loop {
        let (in_flight, since, any) = activity.get();
        let window = if any { limits.idle } else { limits.handshake };
        let now = tokio::time::Instant::now();
        if in_flight == 0 && now >= since + window {
            tracing::debug!(%remote, first_request = !any, "closing an idle connection");
            break;
        }
        let wake = if in_flight == 0 { since + window } else { now + window };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake) => {}
            _ = &mut stopped => {
                // Requests in flight get the time the server's shutdown allows them.
                grace = Duration::from_secs(30);
                break;
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(grace, conn).await {
        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "connection ended with an error"),
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(%remote, "connection did not close after a graceful shutdown; dropped"),
    }
}
