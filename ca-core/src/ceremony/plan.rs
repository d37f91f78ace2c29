//! From a parsed ceremony to a plan: every field parsed into its real type and every path
//! resolved, nothing touched.

use std::path::{Path, PathBuf};

use super::{Ceremony, CeremonyError, Spec};
use crate::cert::{CertInfo, load_cert, read_file};
use crate::crl::{Reason, parse_serial};
use crate::csr::VerifiedCsr;
use crate::dn::parse_subject;
use crate::duration::Validity;
use crate::error::{CoreError, Result};
use crate::issue::default_not_before;
use crate::names::TrustDomain;
use crate::profile::{CertRequest, ProfileKind};

/// A ceremony with every field parsed into its real type and every path resolved.
pub(super) struct Plan {
    pub(super) keys: Vec<hsm::KeyRef>,
    pub(super) inputs: Vec<PathBuf>,
    pub(super) outputs: Vec<PathBuf>,
    pub(super) step: Step,
}

pub(super) enum Step {
    Key {
        key: hsm::KeyRef,
        alg: hsm::KeyAlgorithm,
        out: PathBuf,
    },
    Root {
        key: hsm::KeyRef,
        subject: rcgen::DistinguishedName,
        validity: Validity,
        path_len: u32,
        out: PathBuf,
    },
    Csr {
        key: hsm::KeyRef,
        subject: rcgen::DistinguishedName,
        out: PathBuf,
    },
    Sign {
        issuer_cert: PathBuf,
        issuer_key: hsm::KeyRef,
        source: Source,
        req: RequestShape,
        out: PathBuf,
    },
    Crl {
        issuer_cert: PathBuf,
        issuer_key: hsm::KeyRef,
        number: u64,
        next_update: Validity,
        revoked: Vec<(Vec<u8>, Option<Reason>)>,
        out: PathBuf,
    },
}

pub(super) struct SourceInfo {
    pub(super) subject: rcgen::DistinguishedName,
    pub(super) key: hsm::PublicKey,
    /// The certificate being cross-signed, if this is a cross-sign.
    pub(super) original: Option<CertInfo>,
}

/// Where the subject and key of a signed certificate come from.
pub(super) enum Source {
    Csr(PathBuf),
    Certificate(PathBuf),
}

pub(super) struct RequestShape {
    pub(super) profile: ProfileKind,
    pub(super) validity: Validity,
    pub(super) path_len: Option<u32>,
    pub(super) trust_domains: Vec<TrustDomain>,
    pub(super) name_constraints: bool,
    pub(super) crl_urls: Vec<String>,
    pub(super) ca_issuer_urls: Vec<String>,
}

impl Ceremony {
    pub(super) fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    pub(super) fn field_err(&self, field: &str, msg: impl std::fmt::Display) -> CoreError {
        CeremonyError::Field { file: self.file.clone(), field: field.into(), msg: msg.to_string() }.into()
    }

    pub(super) fn key_ref(&self, field: &str, s: &str) -> Result<hsm::KeyRef> {
        match s.parse::<hsm::KeyRef>().map_err(|e| self.field_err(field, e))? {
            hsm::KeyRef::File(p) => Ok(hsm::KeyRef::File(self.path(&p))),
            other => Ok(other),
        }
    }

    pub(super) fn subject(&self, field: &str, s: &str) -> Result<rcgen::DistinguishedName> {
        parse_subject(s).map_err(|e| self.field_err(field, e))
    }

    pub(super) fn plan(&self) -> Result<Plan> {
        Ok(match &self.spec {
            Spec::Key(k) => {
                let key = self.key_ref("key", &k.key)?;
                let alg = k.algorithm.parse::<hsm::KeyAlgorithm>().map_err(|e| self.field_err("algorithm", e))?;
                let out = self.path(&k.outputs.public_key);
                Plan {
                    keys: vec![key.clone()],
                    inputs: vec![],
                    outputs: vec![out.clone()],
                    step: Step::Key { key, alg, out },
                }
            }
            Spec::Root(r) => {
                let key = self.key_ref("key", &r.key)?;
                let subject = self.subject("subject", &r.subject)?;
                if r.path_len > 8 {
                    return Err(self.field_err("path-len", "at most 8"));
                }
                let out = self.path(&r.outputs.certificate);
                Plan {
                    keys: vec![key.clone()],
                    inputs: vec![],
                    outputs: vec![out.clone()],
                    step: Step::Root { key, subject, validity: r.validity, path_len: r.path_len, out },
                }
            }
            Spec::Csr(c) => {
                let key = self.key_ref("key", &c.key)?;
                let subject = self.subject("subject", &c.subject)?;
                let out = self.path(&c.outputs.csr);
                Plan {
                    keys: vec![key.clone()],
                    inputs: vec![],
                    outputs: vec![out.clone()],
                    step: Step::Csr { key, subject, out },
                }
            }
            Spec::Intermediate(i) => {
                if !matches!(i.profile, ProfileKind::Environment | ProfileKind::Cluster) {
                    return Err(
                        self.field_err("profile", "an intermediate ceremony signs the environment or cluster profile")
                    );
                }
                if i.trust_domains.is_empty() {
                    return Err(self.field_err("trust-domains", "name at least one trust domain"));
                }
                let issuer_key = self.key_ref("issuer.key", &i.issuer.key)?;
                let issuer_cert = self.path(&i.issuer.certificate);
                let csr = self.path(&i.csr);
                let out = self.path(&i.outputs.certificate);
                let req = RequestShape {
                    profile: i.profile,
                    validity: i.validity,
                    path_len: None,
                    trust_domains: i.trust_domains.clone(),
                    name_constraints: i.name_constraints,
                    crl_urls: i.crl_distribution_points.clone(),
                    ca_issuer_urls: i.ca_issuers.clone(),
                };
                Plan {
                    keys: vec![issuer_key.clone()],
                    inputs: vec![issuer_cert.clone(), csr.clone()],
                    outputs: vec![out.clone()],
                    step: Step::Sign { issuer_cert, issuer_key, source: Source::Csr(csr), req, out },
                }
            }
            Spec::CrossSign(c) => {
                let issuer_key = self.key_ref("issuer.key", &c.issuer.key)?;
                let issuer_cert = self.path(&c.issuer.certificate);
                let source = self.path(&c.certificate);
                let out = self.path(&c.outputs.certificate);
                let req = RequestShape {
                    profile: ProfileKind::CrossSign,
                    validity: c.validity,
                    path_len: c.path_len,
                    trust_domains: vec![],
                    name_constraints: false,
                    crl_urls: vec![],
                    ca_issuer_urls: vec![],
                };
                Plan {
                    keys: vec![issuer_key.clone()],
                    inputs: vec![issuer_cert.clone(), source.clone()],
                    outputs: vec![out.clone()],
                    step: Step::Sign { issuer_cert, issuer_key, source: Source::Certificate(source), req, out },
                }
            }
            Spec::Crl(c) => {
                let issuer_key = self.key_ref("issuer.key", &c.issuer.key)?;
                let issuer_cert = self.path(&c.issuer.certificate);
                let mut revoked = Vec::new();
                for (i, r) in c.revoked.iter().enumerate() {
                    let serial =
                        parse_serial(&r.serial).map_err(|e| self.field_err(&format!("revoked[{i}].serial"), e))?;
                    revoked.push((serial, r.reason));
                }
                let out = self.path(&c.outputs.crl);
                Plan {
                    keys: vec![issuer_key.clone()],
                    inputs: vec![issuer_cert.clone()],
                    outputs: vec![out.clone()],
                    step: Step::Crl {
                        issuer_cert,
                        issuer_key,
                        number: c.crl_number,
                        next_update: c.next_update,
                        revoked,
                        out,
                    },
                }
            }
        })
    }

    pub(super) fn validate_fields(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    pub(super) fn load_source(&self, source: &Source) -> Result<SourceInfo> {
        match source {
            Source::Csr(p) => {
                let csr = VerifiedCsr::parse(&read_file(p)?)
                    .map_err(|e| CoreError::Parse(format!("{}: {e}", p.display())))?;
                Ok(SourceInfo { subject: csr.subject().clone(), key: csr.public_key().clone(), original: None })
            }
            Source::Certificate(p) => {
                let cert = load_cert(p)?;
                let (_, parsed) =
                    x509_parser::parse_x509_certificate(&cert.der).map_err(|e| CoreError::Parse(e.to_string()))?;
                let subject = crate::dn::from_x509_name(&parsed.tbs_certificate.subject)?;
                if !cert.is_ca {
                    return Err(self.field_err("certificate", "only CA certificates are cross-signed"));
                }
                Ok(SourceInfo { subject, key: cert.public_key()?, original: Some(cert) })
            }
        }
    }

    pub(super) fn request(&self, shape: &RequestShape, source: SourceInfo, issuer: &CertInfo) -> Result<CertRequest> {
        let not_before = default_not_before();
        let mut req = CertRequest {
            trust_domains: shape.trust_domains.clone(),
            name_constraints: shape.name_constraints,
            crl_urls: shape.crl_urls.clone(),
            ca_issuer_urls: shape.ca_issuer_urls.clone(),
            ..CertRequest::new(
                shape.profile,
                source.subject,
                source.key,
                not_before,
                not_before + shape.validity.duration(),
            )
        };
        if let Some(orig) = source.original {
            // A cross-certificate is the same CA under another issuer: same subject (byte for
            // byte), key, key identifier and trust domains; its pathLen must also fit beneath
            // the new issuer.
            let fits = issuer.path_len.map(|p| p.saturating_sub(1));
            req.path_len = Some(match (shape.path_len, orig.path_len, fits) {
                (Some(p), _, _) => p,
                (None, Some(o), Some(f)) => o.min(f),
                (None, Some(o), None) => o,
                (None, None, Some(f)) => f,
                (None, None, None) => 1,
            });
            req.trust_domains = orig.trust_domains().iter().filter_map(|t| t.parse().ok()).collect();
            req.subject_key_id = orig.ski.clone();
            req.exact_subject = Some(orig.subject_raw.clone());
            // Name constraints travel too: the profile can rebuild exactly "permitted URI for
            // each trust domain"; anything else cannot be reproduced, so it is refused rather
            // than silently dropped.
            if let Some(nc) = &orig.name_constraints {
                let mut permitted: Vec<String> = nc
                    .permitted
                    .iter()
                    .map(|c| match c {
                        crate::cert::ConstraintName::Uri(u) => u.clone(),
                        other => format!("{other:?}"),
                    })
                    .collect();
                let mut tds: Vec<String> = req.trust_domains.iter().map(|t| t.to_string()).collect();
                permitted.sort();
                tds.sort();
                if !nc.excluded.is_empty() || permitted != tds {
                    return Err(self.field_err(
                        "certificate",
                        "its name constraints are not the trust-domain constraints this tool builds; they cannot be carried over",
                    ));
                }
                req.name_constraints = true;
            }
        }
        Ok(req)
    }
}
