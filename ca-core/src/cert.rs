//! Certificates as we read them: PEM/DER loading and a parsed summary that owns its data.

use std::path::Path;

use sha2::Digest;
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{CoreError, Result};

/// Splits PEM text into the DER of each block with the wanted tag; raw DER passes through.
pub fn pem_blocks(data: &[u8], tag: &str, what: &str) -> Result<Vec<Vec<u8>>> {
    if data.first() == Some(&0x30) {
        return Ok(vec![data.to_vec()]);
    }
    let blocks = pem::parse_many(data).map_err(|e| CoreError::Parse(format!("{what}: not valid PEM: {e}")))?;
    let ders: Vec<Vec<u8>> = blocks.into_iter().filter(|b| b.tag() == tag).map(|b| b.into_contents()).collect();
    if ders.is_empty() {
        return Err(CoreError::Parse(format!("{what}: no {tag} block found")));
    }
    Ok(ders)
}

pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| CoreError::io(path, e))
}

/// Every certificate in PEM (or DER) data; `what` names the data in errors.
pub fn parse_certs(data: &[u8], what: &str) -> Result<Vec<CertInfo>> {
    pem_blocks(data, "CERTIFICATE", what)?
        .into_iter()
        .map(|der| CertInfo::from_der(der).map_err(|e| CoreError::Parse(format!("{what}: {e}"))))
        .collect()
}

/// Reads every certificate in a PEM (or DER) file.
pub fn load_certs(path: &Path) -> Result<Vec<CertInfo>> {
    parse_certs(&read_file(path)?, &path.display().to_string())
}

/// The SHA-256 fingerprints of `certs`, in order.
pub fn fingerprints(certs: &[CertInfo]) -> Vec<String> {
    certs.iter().map(CertInfo::fingerprint).collect()
}

/// Reads a file that must hold exactly one certificate.
pub fn load_cert(path: &Path) -> Result<CertInfo> {
    let mut certs = load_certs(path)?;
    if certs.len() != 1 {
        return Err(CoreError::Parse(format!("{}: expected one certificate, found {}", path.display(), certs.len())));
    }
    Ok(certs.remove(0))
}

pub fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(tag, der.to_vec()), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// What we need to know about a certificate, parsed once.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub subject: String,
    pub subject_raw: Vec<u8>,
    pub issuer: String,
    pub issuer_raw: Vec<u8>,
    /// Lowercase hex of the serial's content octets, without a leading zero pad.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    pub key_cert_sign: bool,
    pub crl_sign: bool,
    pub ski: Option<Vec<u8>>,
    pub aki: Option<Vec<u8>>,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    /// The name constraints a CA carries, if any.
    pub name_constraints: Option<NameConstraints>,
    pub spki_der: Vec<u8>,
    pub tbs: Vec<u8>,
    pub signature_oid: String,
    pub signature: Vec<u8>,
    /// OIDs of critical extensions we do not understand.
    pub unknown_critical: Vec<String>,
}

impl CertInfo {
    pub fn from_der(der: Vec<u8>) -> std::result::Result<Self, String> {
        let (rest, cert) =
            X509Certificate::from_der(&der).map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let tbs = &cert.tbs_certificate;
        let mut info = CertInfo {
            subject: tbs.subject.to_string(),
            subject_raw: tbs.subject.as_raw().to_vec(),
            issuer: tbs.issuer.to_string(),
            issuer_raw: tbs.issuer.as_raw().to_vec(),
            serial: serial_hex(tbs.raw_serial()),
            not_before: OffsetDateTime::from_unix_timestamp(tbs.validity.not_before.timestamp())
                .map_err(|e| e.to_string())?,
            not_after: OffsetDateTime::from_unix_timestamp(tbs.validity.not_after.timestamp())
                .map_err(|e| e.to_string())?,
            is_ca: false,
            path_len: None,
            key_cert_sign: false,
            crl_sign: false,
            ski: None,
            aki: None,
            uris: vec![],
            dns_names: vec![],
            name_constraints: None,
            spki_der: tbs.subject_pki.raw.to_vec(),
            tbs: tbs.as_ref().to_vec(),
            signature_oid: cert.signature_algorithm.algorithm.to_id_string(),
            signature: cert.signature_value.data.to_vec(),
            unknown_critical: vec![],
            der: Vec::new(),
        };
        for ext in tbs.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    info.is_ca = bc.ca;
                    info.path_len = bc.path_len_constraint;
                }
                ParsedExtension::KeyUsage(ku) => {
                    info.key_cert_sign = ku.key_cert_sign();
                    info.crl_sign = ku.crl_sign();
                }
                ParsedExtension::SubjectKeyIdentifier(k) => info.ski = Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    info.aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for n in &san.general_names {
                        match n {
                            GeneralName::URI(u) => info.uris.push(u.to_string()),
                            GeneralName::DNSName(d) => info.dns_names.push(d.to_string()),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::NameConstraints(nc) => {
                    let conv = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
                        subtrees.iter().flatten().map(|s| ConstraintName::from(&s.base)).collect()
                    };
                    info.name_constraints = Some(NameConstraints {
                        permitted: conv(&nc.permitted_subtrees),
                        excluded: conv(&nc.excluded_subtrees),
                    });
                }
                ParsedExtension::ExtendedKeyUsage(_)
                | ParsedExtension::CRLDistributionPoints(_)
                | ParsedExtension::AuthorityInfoAccess(_) => {}
                _ if ext.critical => info.unknown_critical.push(ext.oid.to_id_string()),
                _ => {}
            }
        }
        info.der = der;
        Ok(info)
    }

    pub fn public_key(&self) -> Result<hsm::PublicKey> {
        Ok(hsm::PublicKey::from_spki_der(&self.spki_der)?)
    }

    pub fn fingerprint(&self) -> String {
        hex::encode(sha2::Sha256::digest(&self.der))
    }

    pub fn pem(&self) -> String {
        to_pem("CERTIFICATE", &self.der)
    }

    pub fn is_self_issued(&self) -> bool {
        self.subject_raw == self.issuer_raw
    }

    /// Checks that `issuer`'s key signed this certificate.
    pub fn verify_signed_by(&self, issuer: &hsm::PublicKey) -> Result<()> {
        issuer
            .verify(&self.signature_oid, &self.tbs, &self.signature)
            .map_err(|e| CoreError::Chain(format!("{}: {e}", self.subject)))
    }

    /// Whether `issuer` issued this certificate: its subject is this one's issuer name, and its
    /// key made this one's signature.
    pub fn issued_by(&self, issuer: &CertInfo) -> bool {
        self.issuer_raw == issuer.subject_raw && issuer.public_key().is_ok_and(|k| self.verify_signed_by(&k).is_ok())
    }

    /// Trust domains this CA records as `spiffe://<td>` URI SANs.
    pub fn trust_domains(&self) -> Vec<String> {
        self.uris
            .iter()
            .filter_map(|u| u.strip_prefix("spiffe://"))
            .filter(|td| !td.contains('/'))
            .map(str::to_string)
            .collect()
    }
}

/// Name constraints as far as we enforce them. Name types we do not implement are kept as
/// `Unsupported`, so that path validation can refuse them instead of ignoring them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameConstraints {
    pub permitted: Vec<ConstraintName>,
    pub excluded: Vec<ConstraintName>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstraintName {
    /// A host (or `.domain`) constraining URI names.
    Uri(String),
    /// A DNS name constraint.
    Dns(String),
    /// Any other name type (email, IP, directory name, ...), by its name.
    Unsupported(&'static str),
}

impl From<&GeneralName<'_>> for ConstraintName {
    fn from(n: &GeneralName<'_>) -> Self {
        match n {
            GeneralName::URI(u) => ConstraintName::Uri(u.to_ascii_lowercase()),
            GeneralName::DNSName(d) => ConstraintName::Dns(d.to_ascii_lowercase()),
            GeneralName::RFC822Name(_) => ConstraintName::Unsupported("email"),
            GeneralName::IPAddress(_) => ConstraintName::Unsupported("IP address"),
            GeneralName::DirectoryName(_) => ConstraintName::Unsupported("directory name"),
            _ => ConstraintName::Unsupported("other name"),
        }
    }
}

/// Serial content octets as lowercase hex, without DER's sign pad.
pub fn serial_hex(raw: &[u8]) -> String {
    let trimmed = match raw {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => raw,
    };
    hex::encode(trimmed)
}
