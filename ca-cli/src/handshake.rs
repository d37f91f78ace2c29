//! All-pairs mutual-TLS handshakes between workloads, as real TLS endpoints on loopback, with
//! two independent stacks: rustls (webpki) and the openssl CLI (`s_server`/`s_client`).
//!
//! Each workload presents its certificate chain and trusts only its own bundle, as an Envoy
//! sidecar does; peers are checked by chain, not by host name (workload certificates carry
//! only a SPIFFE ID). A pair succeeds only when *both* sides accepted the other: the client
//! waits for a reply the server sends after its own verification.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ca_core::cert::{CertInfo, load_certs};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;

/// One workload: the chain it presents (leaf first, nothing at or above a root), its key and
/// the roots it trusts.
#[derive(Clone)]
pub struct Workload {
    pub name: String,
    pub chain: Vec<CertInfo>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    pub bundle: Vec<CertInfo>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload").field("name", &self.name).field("key", &"...").finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    Rustls,
    Openssl,
    Both,
}

impl Stack {
    fn includes(self, s: Stack) -> bool {
        self == Stack::Both || self == s
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub stack: &'static str,
    pub client: String,
    pub server: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub handshakes: usize,
    pub failures: Vec<Failure>,
}

/// Reads workloads from `dir`: one subdirectory each, holding `cert-chain.pem` (leaf first),
/// `key.pem` (PKCS#8) and `root-cert.pem` (the bundle it trusts).
pub fn load_dir(dir: &Path) -> Result<Vec<Workload>> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let chain: Vec<CertInfo> =
            load_certs(&p.join("cert-chain.pem"))?.into_iter().filter(|c| !c.is_self_issued()).collect();
        let key_pem = std::fs::read_to_string(p.join("key.pem")).with_context(|| format!("{name}/key.pem"))?;
        let key = pem::parse(&key_pem).with_context(|| format!("{name}/key.pem"))?.into_contents();
        let bundle = load_certs(&p.join("root-cert.pem"))?;
        if chain.is_empty() {
            bail!("{name}/cert-chain.pem holds no certificate below a root");
        }
        out.push(Workload { name, chain, key, bundle });
    }
    if out.len() < 2 {
        bail!("{} holds {} workloads; all-pairs handshakes need at least two", dir.display(), out.len());
    }
    Ok(out)
}

/// Every ordered pair (client, server) of distinct workloads, on each requested stack.
pub fn all_pairs(ws: &[Workload], stack: Stack, scratch: &Path) -> Result<Outcome> {
    let mut out = Outcome::default();
    if stack.includes(Stack::Rustls) {
        rustls_pairs(ws, &mut out)?;
    }
    if stack.includes(Stack::Openssl) {
        openssl_pairs(ws, scratch, &mut out)?;
    }
    Ok(out)
}

// ---- rustls -------------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(bundle: &[CertInfo]) -> Result<Arc<rustls::RootCertStore>> {
    let mut r = rustls::RootCertStore::empty();
    for c in bundle {
        r.add(CertificateDer::from(c.der.clone())).context("bundle")?;
    }
    Ok(Arc::new(r))
}

fn certs(w: &Workload) -> Vec<CertificateDer<'static>> {
    w.chain.iter().map(|c| CertificateDer::from(c.der.clone())).collect()
}

/// Checks the chain against the bundle and accepts the missing host name: workload
/// certificates name a SPIFFE ID, which Istio matches separately.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn server_config(w: &Workload) -> Result<Arc<rustls::ServerConfig>> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&w.bundle)?, provider()).build()?;
    Ok(Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(w), PrivateKeyDer::Pkcs8(w.key.clone().into()))
            .with_context(|| format!("{}: certificate and key", w.name))?,
    ))
}

fn client_config(w: &Workload) -> Result<Arc<rustls::ClientConfig>> {
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&w.bundle)?, provider()).build()?;
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            .with_client_auth_cert(certs(w), PrivateKeyDer::Pkcs8(w.key.clone().into()))
            .with_context(|| format!("{}: certificate and key", w.name))?,
    ))
}

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection: handshake (verifying the client), then "ok".
fn serve_one(cfg: Arc<rustls::ServerConfig>, sock: TcpStream) -> Result<(), String> {
    sock.set_read_timeout(Some(IO_TIMEOUT)).ok();
    let conn = rustls::ServerConnection::new(cfg).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| e.to_string())?;
    }
    tls.write_all(b"ok").map_err(|e| e.to_string())?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn connect_one(cfg: Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> Result<(), String> {
    let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(IO_TIMEOUT)).ok();
    let name = ServerName::try_from("workload.invalid").expect("a valid name");
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut buf = [0u8; 2];
    tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
    if &buf != b"ok" {
        return Err("unexpected reply".into());
    }
    Ok(())
}

fn rustls_pairs(ws: &[Workload], out: &mut Outcome) -> Result<()> {
    let mut servers = Vec::new();
    for w in ws {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let cfg = server_config(w)?;
        let expected = ws.len() - 1;
        let handle = std::thread::spawn(move || {
            let mut errors = Vec::new();
            for _ in 0..expected {
                match listener.accept() {
                    Ok((sock, _)) => errors.push(serve_one(cfg.clone(), sock).err()),
                    Err(e) => errors.push(Some(e.to_string())),
                }
            }
            errors
        });
        servers.push((addr, handle));
    }
    // Clients go one at a time, in the same order on every server, so that the server's
    // n-th accepted connection is the n-th client.
    let mut client_errors: Vec<Vec<(usize, Option<String>)>> = vec![Vec::new(); ws.len()];
    for (ci, c) in ws.iter().enumerate() {
        let cfg = client_config(c)?;
        for (si, (addr, _)) in servers.iter().enumerate() {
            if si != ci {
                client_errors[si].push((ci, connect_one(cfg.clone(), *addr).err()));
            }
        }
    }
    for (si, (_, handle)) in servers.into_iter().enumerate() {
        let server_errors = handle.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?;
        for ((ci, client_err), server_err) in client_errors[si].iter().zip(server_errors) {
            out.handshakes += 1;
            let error = match (client_err, server_err) {
                (None, None) => continue,
                (c, s) => {
                    let mut parts = Vec::new();
                    if let Some(s) = s {
                        parts.push(format!("server: {s}"));
                    }
                    if let Some(c) = c {
                        parts.push(format!("client: {c}"));
                    }
                    parts.join("; ")
                }
            };
            out.failures.push(Failure {
                stack: "rustls",
                client: ws[*ci].name.clone(),
                server: ws[si].name.clone(),
                error,
            });
        }
    }
    Ok(())
}

// ---- openssl ------------------------------------------------------------------------------

struct Files {
    leaf: PathBuf,
    chain: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Files {
    /// What the workload presents and trusts, as s_server and s_client both take it.
    fn identity(&self) -> Vec<std::ffi::OsString> {
        let mut a = Vec::new();
        for (flag, path) in
            [("-cert", &self.leaf), ("-cert_chain", &self.chain), ("-key", &self.key), ("-CAfile", &self.bundle)]
        {
            a.push(flag.into());
            a.push(path.as_os_str().to_owned());
        }
        a
    }
}

fn files(scratch: &Path, w: &Workload) -> Result<Files> {
    let d = scratch.join(&w.name);
    std::fs::create_dir_all(&d)?;
    let f = Files {
        leaf: d.join("leaf.pem"),
        chain: d.join("chain.pem"),
        key: d.join("key.pem"),
        bundle: d.join("bundle.pem"),
    };
    std::fs::write(&f.leaf, w.chain[0].pem())?;
    std::fs::write(&f.chain, w.chain[1..].iter().map(CertInfo::pem).collect::<String>())?;
    let _ = std::fs::remove_file(&f.key);
    hsm::write_new_private(&f.key, ca_core::cert::to_pem("PRIVATE KEY", &w.key).as_bytes())?;
    std::fs::write(&f.bundle, w.bundle.iter().map(CertInfo::pem).collect::<String>())?;
    Ok(f)
}

/// Kills the child when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn openssl_pairs(ws: &[Workload], scratch: &Path, out: &mut Outcome) -> Result<()> {
    let fs: Vec<Files> = ws.iter().map(|w| files(scratch, w)).collect::<Result<_>>()?;
    let mut servers = Vec::new();
    for f in &fs {
        let port = free_port()?;
        // -Verify: a client certificate is required and checked against the bundle; -www
        // answers a request only after the handshake (and that check) completed.
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(f.identity())
            .args(["-Verify", "4", "-verify_return_error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running openssl s_server (is the openssl CLI installed?)")?;
        servers.push((port, Child(child)));
    }
    for (port, _) in &servers {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", *port)).is_err() {
            if Instant::now() > deadline {
                bail!("openssl s_server did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (ci, c) in fs.iter().enumerate() {
        for (si, (port, _)) in servers.iter().enumerate() {
            if si == ci {
                continue;
            }
            out.handshakes += 1;
            if let Err(error) = s_client(c, *port) {
                out.failures.push(Failure {
                    stack: "openssl",
                    client: ws[ci].name.clone(),
                    server: ws[si].name.clone(),
                    error,
                });
            }
        }
    }
    Ok(())
}

fn s_client(f: &Files, port: u16) -> Result<(), String> {
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-verify_quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(f.identity())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running openssl s_client: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"GET / HTTP/1.0\r\n\r\n");
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("timed out".into());
            }
        }
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stdout.contains("HTTP/1.0 200 ok") {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .find(|l| l.contains("verify error") || l.contains("alert") || l.contains("error"))
        .unwrap_or("no response")
        .trim()
        .to_string();
    Err(reason)
}
