//! Recorded ceremonies: one YAML file per ceremony, checked without touching the HSM, run with
//! a transcript appended next to the outputs.
//!
//! Relative paths in a ceremony file (inputs, outputs, `file:` keys) are relative to the
//! directory holding the ceremony file, so a ceremony directory can be moved as a whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use time::OffsetDateTime;

use crate::cert::{CertInfo, load_cert, read_file};
use crate::crl::{CrlRequest, Reason, Revocation, parse_serial};
use crate::csr::{VerifiedCsr, create_csr};
use crate::dn::parse_subject;
use crate::duration::Validity;
pub use crate::error::CeremonyError;
use crate::error::{CoreError, Result, fmt_time};
use crate::issue::{CaIssuer, check_issuer_policy, create_root, default_not_before, issue};
use crate::names::TrustDomain;
use crate::outputs::{OutputSet, preflight};
use crate::profile::{CertRequest, ProfileKind};

pub const TRANSCRIPT_FILE: &str = "ceremony-transcript.jsonl";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CeremonyType {
    Key,
    Root,
    Csr,
    Intermediate,
    CrossSign,
    Crl,
}

impl CeremonyType {
    const NAMES: [(&str, CeremonyType); 6] = [
        ("key", CeremonyType::Key),
        ("root", CeremonyType::Root),
        ("csr", CeremonyType::Csr),
        ("intermediate", CeremonyType::Intermediate),
        ("cross-sign", CeremonyType::CrossSign),
        ("crl", CeremonyType::Crl),
    ];
}

// ---- file formats -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeyCeremony {
    pub key: String,
    pub algorithm: String,
    pub outputs: KeyOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeyOutputs {
    pub public_key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RootCeremony {
    pub key: String,
    pub subject: String,
    pub validity: Validity,
    #[serde(default = "default_root_path_len")]
    pub path_len: u32,
    pub outputs: CertOutputs,
}

fn default_root_path_len() -> u32 {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CertOutputs {
    pub certificate: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CsrCeremony {
    pub key: String,
    pub subject: String,
    pub outputs: CsrOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CsrOutputs {
    pub csr: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IssuerSpec {
    pub certificate: PathBuf,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IntermediateCeremony {
    pub profile: ProfileKind,
    pub issuer: IssuerSpec,
    pub csr: PathBuf,
    pub trust_domains: Vec<TrustDomain>,
    pub validity: Validity,
    #[serde(default)]
    pub name_constraints: bool,
    #[serde(default)]
    pub crl_distribution_points: Vec<String>,
    #[serde(default)]
    pub ca_issuers: Vec<String>,
    pub outputs: CertOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CrossSignCeremony {
    pub issuer: IssuerSpec,
    /// The CA certificate whose subject and key are certified again under `issuer`.
    pub certificate: PathBuf,
    pub validity: Validity,
    pub path_len: Option<u32>,
    pub outputs: CertOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CrlCeremony {
    pub issuer: IssuerSpec,
    pub crl_number: u64,
    pub next_update: Validity,
    #[serde(default)]
    pub revoked: Vec<RevokedEntry>,
    pub outputs: CrlOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RevokedEntry {
    pub serial: String,
    pub reason: Option<Reason>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CrlOutputs {
    pub crl: PathBuf,
}

#[derive(Debug)]
pub enum Spec {
    Key(KeyCeremony),
    Root(RootCeremony),
    Csr(CsrCeremony),
    Intermediate(IntermediateCeremony),
    CrossSign(CrossSignCeremony),
    Crl(CrlCeremony),
}

/// A parsed ceremony file whose fields all passed their syntax checks.
#[derive(Debug)]
pub struct Ceremony {
    pub file: PathBuf,
    pub sha256: String,
    pub kind: CeremonyType,
    pub spec: Spec,
    base: PathBuf,
}

// ---- loading ------------------------------------------------------------------------------

pub fn load(file: &Path) -> Result<Ceremony> {
    let bytes = read_file(file)?;
    // Absolute, so that transcripts name files unambiguously.
    let file = file.canonicalize().map_err(|e| CoreError::io(file, e))?;
    parse(&file, &bytes)
}

pub fn parse(file: &Path, bytes: &[u8]) -> Result<Ceremony> {
    let syntax = |msg: String| CeremonyError::Syntax { file: file.to_path_buf(), msg };
    let mut value: serde_yaml_ng::Value =
        serde_yaml_ng::from_slice(bytes).map_err(|e| syntax(format!("not valid YAML: {e}")))?;
    let map = value.as_mapping_mut().ok_or_else(|| syntax("a ceremony file is a YAML mapping".into()))?;
    let ty = map.remove("ceremony-type").ok_or_else(|| {
        syntax("missing field `ceremony-type` (key, root, csr, intermediate, cross-sign or crl)".into())
    })?;
    let ty_name = ty.as_str().unwrap_or_default().to_string();
    let kind = CeremonyType::NAMES.iter().find(|(n, _)| *n == ty_name).map(|(_, k)| *k).ok_or_else(|| {
        CeremonyError::Field {
            file: file.to_path_buf(),
            field: "ceremony-type".into(),
            msg: format!("unknown ceremony type {ty_name:?} (key, root, csr, intermediate, cross-sign or crl)"),
        }
    })?;
    fn de<T: serde::de::DeserializeOwned>(file: &Path, v: serde_yaml_ng::Value) -> Result<T, CeremonyError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.inner().to_string();
            CeremonyError::Field {
                file: file.to_path_buf(),
                field: if path == "." { "(top level)".into() } else { path },
                msg,
            }
        })
    }
    let spec = match kind {
        CeremonyType::Key => Spec::Key(de(file, value)?),
        CeremonyType::Root => Spec::Root(de(file, value)?),
        CeremonyType::Csr => Spec::Csr(de(file, value)?),
        CeremonyType::Intermediate => Spec::Intermediate(de(file, value)?),
        CeremonyType::CrossSign => Spec::CrossSign(de(file, value)?),
        CeremonyType::Crl => Spec::Crl(de(file, value)?),
    };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let c = Ceremony { file: file.to_path_buf(), sha256: hex::encode(sha2::Sha256::digest(bytes)), kind, spec, base };
    c.validate_fields()?;
    Ok(c)
}

// ---- plan: everything resolved, nothing touched -------------------------------------------

/// A ceremony with every field parsed into its real type and every path resolved.
struct Plan {
    keys: Vec<hsm::KeyRef>,
    inputs: Vec<PathBuf>,
    outputs: Vec<PathBuf>,
    step: Step,
}

enum Step {
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

struct SourceInfo {
    subject: rcgen::DistinguishedName,
    key: hsm::PublicKey,
    /// The certificate being cross-signed, if this is a cross-sign.
    original: Option<CertInfo>,
}

/// Where the subject and key of a signed certificate come from.
enum Source {
    Csr(PathBuf),
    Certificate(PathBuf),
}

struct RequestShape {
    profile: ProfileKind,
    validity: Validity,
    path_len: Option<u32>,
    trust_domains: Vec<TrustDomain>,
    name_constraints: bool,
    crl_urls: Vec<String>,
    ca_issuer_urls: Vec<String>,
}

impl Ceremony {
    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn field_err(&self, field: &str, msg: impl std::fmt::Display) -> CoreError {
        CeremonyError::Field { file: self.file.clone(), field: field.into(), msg: msg.to_string() }.into()
    }

    fn key_ref(&self, field: &str, s: &str) -> Result<hsm::KeyRef> {
        match s.parse::<hsm::KeyRef>().map_err(|e| self.field_err(field, e))? {
            hsm::KeyRef::File(p) => Ok(hsm::KeyRef::File(self.path(&p))),
            other => Ok(other),
        }
    }

    fn subject(&self, field: &str, s: &str) -> Result<rcgen::DistinguishedName> {
        parse_subject(s).map_err(|e| self.field_err(field, e))
    }

    fn plan(&self) -> Result<Plan> {
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

    fn validate_fields(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

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

    fn load_source(&self, source: &Source) -> Result<SourceInfo> {
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

    fn request(&self, shape: &RequestShape, source: SourceInfo, issuer: &CertInfo) -> Result<CertRequest> {
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

    fn execute(&self, plan: &Plan) -> Result<serde_json::Map<String, serde_json::Value>> {
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

// ---- reports and transcripts --------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub ceremony_type: CeremonyType,
    pub file: PathBuf,
    pub sha256: String,
    pub keys: Vec<String>,
    pub inputs: Vec<PathBuf>,
    pub outputs: Vec<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    #[serde(flatten)]
    pub entry: TranscriptEntry,
    pub transcript: PathBuf,
    #[serde(skip)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// One JSON line of a ceremony transcript.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TranscriptEntry {
    pub time: String,
    pub operator: String,
    pub ceremony_type: CeremonyType,
    pub ceremony_file: String,
    pub ceremony_sha256: String,
    /// Key references as written (they name a PIN source, never a PIN).
    pub keys: Vec<String>,
    pub inputs: Vec<FileDigest>,
    pub outputs: Vec<FileDigest>,
    pub result: String,
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub sha256: Option<String>,
}

impl FileDigest {
    fn of(p: &Path) -> Self {
        FileDigest {
            path: p.display().to_string(),
            sha256: std::fs::read(p).ok().map(|b| hex::encode(sha2::Sha256::digest(b))),
        }
    }
}

fn append_transcript(path: &Path, entry: &TranscriptEntry) -> Result<()> {
    let mut line = serde_json::to_string(entry).map_err(|e| CoreError::Parse(e.to_string()))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| CoreError::io(path, e))?;
    f.write_all(line.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| CoreError::io(path, e))
}

/// The operator recorded in transcripts: `CEREMONY_OPERATOR`, else the login name.
pub fn default_operator() -> String {
    std::env::var("CEREMONY_OPERATOR").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// `validity: 9000y` passed parsing, and `check` (and `run`) then panicked adding it to
    /// today's date ("resulting value is out of range"). Seen while writing the `ceremony`
    /// fuzz target, which crashes on this input; its first 10-minute run did not reach it.
    #[test]
    fn a_validity_past_year_9999_is_a_field_error() {
        let yaml = b"ceremony-type: cross-sign\nissuer:\n  certificate: root-2031.pem\n  key: \"file:root.key\"\n\
                     certificate: env.pem\nvalidity: 9000y\noutputs:\n  certificate: out.pem\n";
        match parse(Path::new("/nonexistent/cross-sign.yaml"), yaml) {
            Err(CoreError::Ceremony(CeremonyError::Field { field, .. })) => assert_eq!(field, "validity"),
            other => panic!("expected a validity field error, got {other:?}"),
        }
    }
}
