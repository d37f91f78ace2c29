//! `ca-cli sign`: a CSR signed with a CA key under a profile.

use anyhow::{Context, Result, bail};
use ca_core::cert::{load_cert, read_file};
use ca_core::profile::{CertRequest, ProfileKind};

use super::{block_on, preflight, write_one};
use crate::cli::{Output, SignArgs};
use crate::database;
use crate::output::{self, emit};

pub fn run(a: SignArgs, output: Output) -> Result<()> {
    preflight(&[&a.out])?;
    if !matches!(a.profile, ProfileKind::Environment | ProfileKind::Cluster | ProfileKind::Workload) {
        bail!(
            "--profile must be environment, cluster or workload (use `root create` or a cross-sign ceremony for the others)"
        );
    }
    if a.profile == ProfileKind::Workload && !a.trust_domains.is_empty() {
        bail!("--trust-domain is for CA profiles; a workload certificate takes --spiffe-id");
    }
    if a.profile != ProfileKind::Workload && a.spiffe_id.is_some() {
        bail!("--spiffe-id is only for the workload profile");
    }
    let csr = ca_core::csr::VerifiedCsr::parse(&read_file(&a.csr)?).with_context(|| a.csr.display().to_string())?;
    if let Some(url) = &a.database {
        let hash = ca_store::spki_sha256(csr.public_key().spki_der());
        if let Some(b) = block_on(database::blocked_key(url, &hash))? {
            bail!(
                "key-blocked: the CSR's public key was revoked for {} (certificate {}) and is never certified again; make a new key",
                b.reason,
                b.source_serial
            );
        }
    }
    let issuer = ca_core::issue::CaIssuer::new(load_cert(&a.ca_cert)?, hsm::open_signer(&a.ca_key.parse()?)?)?;
    let not_before = ca_core::issue::default_not_before();
    let req = CertRequest {
        trust_domains: a.trust_domains,
        name_constraints: a.name_constraints,
        crl_urls: a.crl_urls,
        ca_issuer_urls: a.ca_issuer_urls,
        spiffe_id: a.spiffe_id,
        ..CertRequest::new(
            a.profile,
            csr.subject().clone(),
            csr.public_key().clone(),
            not_before,
            not_before + a.validity.duration(),
        )
    };
    let issued = ca_core::issue::issue(&issuer, &req)?;
    write_one(&a.out, issued.pem())?;
    emit(output, &output::cert_json(&issued.cert, &a.out), || output::cert_text(&issued.cert, &a.out));
    Ok(())
}
