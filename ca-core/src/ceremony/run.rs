//! Checking a ceremony against its inputs and issuance policy, and running it with its
//! transcript.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::plan::{Plan, Step};
use super::report::{FileDigest, append_transcript};
use super::{Ceremony, CheckReport, RunReport, TRANSCRIPT_FILE, TranscriptEntry};
use crate::cert::{CertInfo, load_cert};
use crate::crl::{CrlRequest, Revocation};
use crate::csr::create_csr;
use crate::error::{CoreError, Result, fmt_time};
use crate::issue::{CaIssuer, check_issuer_policy, create_root, default_not_before, issue};
use crate::outputs::{OutputSet, preflight};
use crate::profile::{CertRequest, ProfileKind};

impl Ceremony {
    /// Everything that can be known without the HSM: fields, inputs (present and parseable,
    /// CSR signatures valid), outputs (absent, directories present) and issuance policy.
    pub fn check(&self) -> Result<CheckReport> {
        let plan = self.plan()?;
        preflight(plan.outputs.iter().map(PathBuf::as_path))?;
        for input in &plan.inputs {
            if !input.is_file() {
                return Err(CoreError::io(
                    input,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "input file not found"),
                ));
            }
        }
        if let Step::Sign { issuer_cert, source, req, .. } = &plan.step {
            let issuer = load_cert(issuer_cert)?;
            let request = self.request(req, self.load_source(source)?, &issuer)?;
            check_issuer_policy(&issuer, &request)?;
        }
        if let Step::Crl { issuer_cert, .. } = &plan.step {
            let issuer = load_cert(issuer_cert)?;
            if !issuer.is_ca || !issuer.crl_sign {
                return Err(self.field_err("issuer.certificate", "the issuer may not sign CRLs (no cRLSign)"));
            }
        }
        Ok(CheckReport {
            ceremony_type: self.kind,
            file: self.file.clone(),
            sha256: self.sha256.clone(),
            keys: plan.keys.iter().map(ToString::to_string).collect(),
            inputs: plan.inputs.clone(),
            outputs: plan.outputs.clone(),
        })
    }

    /// Checks, runs, writes the outputs and appends the transcript (on failure too).
    pub fn run(&self, operator: &str) -> Result<RunReport> {
        let plan = self.plan()?;
        let transcript = transcript_path(&plan, &self.file);
        let started = OffsetDateTime::now_utc();
        let result = self.check().and_then(|_| self.execute(&plan));
        let entry = TranscriptEntry {
            time: fmt_time(started),
            operator: operator.to_string(),
            ceremony_type: self.kind,
            ceremony_file: self.file.display().to_string(),
            ceremony_sha256: self.sha256.clone(),
            keys: plan.keys.iter().map(ToString::to_string).collect(),
            inputs: plan.inputs.iter().map(|p| FileDigest::of(p)).collect(),
            outputs: match &result {
                Ok(_) => plan.outputs.iter().map(|p| FileDigest::of(p)).collect(),
                Err(_) => vec![],
            },
            result: match &result {
                Ok(_) => "ok".into(),
                Err(e) => format!("error: {e}"),
            },
            details: result.as_ref().ok().cloned().unwrap_or_default(),
        };
        append_transcript(&transcript, &entry)?;
        let details = result?;
        Ok(RunReport { entry, transcript, details })
    }

    pub(super) fn execute(&self, plan: &Plan) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut details = serde_json::Map::new();
        let mut out = OutputSet::new();
        match &plan.step {
            Step::Key { key, alg, out: path } => {
                let public = hsm::generate_key(key, *alg)?;
                details.insert("algorithm".into(), alg.as_str().into());
                details.insert("public_key_sha256".into(), hex::encode(public.fingerprint()).into());
                out.add(path, public.to_pem());
            }
            Step::Root { key, subject, validity, path_len, out: path } => {
                let signer = hsm::open_signer(key)?;
                let not_before = default_not_before();
                let req = CertRequest {
                    path_len: Some(*path_len),
                    ..CertRequest::new(
                        ProfileKind::Root,
                        subject.clone(),
                        signer.public_key().clone(),
                        not_before,
                        not_before + validity.duration(),
                    )
                };
                let issued = create_root(&signer, &req)?;
                cert_details(&mut details, &issued.cert);
                out.add(path, issued.pem());
            }
            Step::Csr { key, subject, out: path } => {
                let signer = hsm::open_signer(key)?;
                let pem = create_csr(&signer, subject.clone())?;
                details.insert("public_key_sha256".into(), hex::encode(signer.public_key().fingerprint()).into());
                out.add(path, pem);
            }
            Step::Sign { issuer_cert, issuer_key, source, req, out: path } => {
                let issuer = CaIssuer::new(load_cert(issuer_cert)?, hsm::open_signer(issuer_key)?)?;
                let request = self.request(req, self.load_source(source)?, &issuer.cert)?;
                let issued = issue(&issuer, &request)?;
                cert_details(&mut details, &issued.cert);
                details.insert("profile".into(), req.profile.to_string().into());
                details.insert("name_constraints".into(), req.name_constraints.into());
                out.add(path, issued.pem());
            }
            Step::Crl { issuer_cert, issuer_key, number, next_update, revoked, out: path } => {
                let issuer = CaIssuer::new(load_cert(issuer_cert)?, hsm::open_signer(issuer_key)?)?;
                let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is valid");
                let req = CrlRequest {
                    number: *number,
                    this_update: now,
                    next_update: now + next_update.duration(),
                    revoked: revoked
                        .iter()
                        .map(|(serial, reason)| Revocation { serial: serial.clone(), reason: *reason, revoked_at: now })
                        .collect(),
                };
                let der = crate::crl::create_crl(&issuer, &req)?;
                details.insert("crl_number".into(), (*number).into());
                details.insert("revoked".into(), revoked.len().into());
                details.insert("next_update".into(), fmt_time(req.next_update).into());
                out.add(path, crate::cert::to_pem("X509 CRL", &der));
            }
        }
        out.commit()?;
        Ok(details)
    }
}

fn cert_details(d: &mut serde_json::Map<String, serde_json::Value>, c: &CertInfo) {
    d.insert("subject".into(), c.subject.clone().into());
    d.insert("issuer".into(), c.issuer.clone().into());
    d.insert("serial".into(), c.serial.clone().into());
    d.insert("not_before".into(), fmt_time(c.not_before).into());
    d.insert("not_after".into(), fmt_time(c.not_after).into());
    d.insert("sha256_fingerprint".into(), c.fingerprint().into());
    if !c.trust_domains().is_empty() {
        d.insert("trust_domains".into(), c.trust_domains().into());
    }
}

fn transcript_path(plan: &Plan, file: &Path) -> PathBuf {
    let dir = plan
        .outputs
        .first()
        .and_then(|p| p.parent())
        .filter(|d| !d.as_os_str().is_empty() && d.is_dir())
        .or_else(|| file.parent().filter(|d| !d.as_os_str().is_empty()))
        .unwrap_or(Path::new("."));
    dir.join(TRANSCRIPT_FILE)
}
