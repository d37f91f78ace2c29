//! The istiod `cacerts` bundle for plug-in CA mode.

use std::path::{Path, PathBuf};

use base64::Engine;
use time::OffsetDateTime;

use crate::cert::{CertInfo, load_cert, load_certs};
use crate::chain::verify_chain;
use crate::error::{CoreError, PolicyError, Result};
use crate::outputs::OutputSet;

pub const FILES: [&str; 5] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "cacerts.yaml"];

pub struct CacertsInput<'a> {
    pub cert: &'a Path,
    pub key: &'a hsm::KeyRef,
    pub chain: &'a [PathBuf],
    pub root: &'a Path,
    pub namespace: &'a str,
}

#[derive(Debug, serde::Serialize)]
pub struct CacertsReport {
    pub out_dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub signing_cert: String,
    pub signing_cert_not_after: String,
    pub chain: Vec<String>,
}

/// Runs the checks istiod runs on `cacerts` (all files present, key matches certificate, chain
/// verifies to the root, signing certificate is a CA), then writes the bundle into `out_dir`.
pub fn write_cacerts(input: &CacertsInput<'_>, out_dir: &Path) -> Result<CacertsReport> {
    let cert = load_cert(input.cert)?;
    let mut chain: Vec<CertInfo> = Vec::new();
    for p in input.chain {
        chain.extend(load_certs(p)?);
    }
    let roots = load_certs(input.root)?;
    // Plug-in mode hands istiod its own key (`ca-key.pem`): the one export by design.
    #[allow(clippy::disallowed_methods)]
    let key = hsm::export_file_key(input.key)?;
    check(&cert, &key, &roots)?;

    let path = verify_chain(&cert, &chain, &roots, OffsetDateTime::now_utc())?;
    let mut cert_chain = String::new();
    for c in &path {
        cert_chain.push_str(&c.pem());
    }
    let root_pem: String = roots.iter().map(CertInfo::pem).collect();
    let files: [(&str, String); 4] = [
        ("ca-cert.pem", cert.pem()),
        ("ca-key.pem", key.expose_pem().to_string()),
        ("cert-chain.pem", cert_chain),
        ("root-cert.pem", root_pem),
    ];
    let yaml = secret_yaml(input.namespace, &files);

    if !out_dir.exists() {
        std::fs::create_dir_all(out_dir).map_err(|e| CoreError::io(out_dir, e))?;
    }
    let mut out = OutputSet::new();
    for (name, contents) in &files {
        if *name == "ca-key.pem" {
            out.add_private(out_dir.join(name), contents.as_bytes());
        } else {
            out.add(out_dir.join(name), contents.as_bytes());
        }
    }
    // The manifest embeds the key.
    out.add_private(out_dir.join("cacerts.yaml"), yaml);
    let written = out.commit()?;
    Ok(CacertsReport {
        out_dir: out_dir.to_path_buf(),
        files: written,
        signing_cert: cert.subject.clone(),
        signing_cert_not_after: crate::error::fmt_time(cert.not_after),
        chain: path.iter().map(|c| c.subject.clone()).collect(),
    })
}

fn check(cert: &CertInfo, key: &hsm::ExportedKey, roots: &[CertInfo]) -> Result<()> {
    if roots.is_empty() {
        return Err(CoreError::Parse("root-cert.pem would be empty".into()));
    }
    if key.public_key().spki_der() != cert.spki_der {
        return Err(PolicyError::Invalid(
            "ca-key.pem does not match ca-cert.pem: the key is not the certificate's".into(),
        )
        .into());
    }
    if !cert.is_ca || !cert.key_cert_sign {
        return Err(PolicyError::Invalid(format!(
            "{}: istiod needs a CA certificate (cA=true, keyCertSign)",
            cert.subject
        ))
        .into());
    }
    Ok(())
}

fn secret_yaml(namespace: &str, files: &[(&str, String)]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut y = format!(
        "# istiod plug-in CA certificates. Apply with: kubectl apply -f cacerts.yaml\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: cacerts\n  namespace: {namespace}\ntype: Opaque\ndata:\n"
    );
    for (name, contents) in files {
        y.push_str(&format!("  {name}: {}\n", b64.encode(contents)));
    }
    y
}
