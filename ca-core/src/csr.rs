//! CSRs: verify the self-signature, keep only the public key and subject.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::cert::pem_blocks;
use crate::error::CsrError;

/// A CSR whose self-signature verified and whose key passed the key policy. Everything else it
/// asked for (extensions, SANs, key usages) has been dropped: the profile decides those.
#[derive(Clone, Debug)]
pub struct VerifiedCsr {
    public_key: hsm::PublicKey,
    subject: rcgen::DistinguishedName,
    subject_text: String,
    requested_names: Vec<RequestedName>,
}

/// A subject alternative name the CSR asked for. Never copied into a certificate: policy
/// compares it with what the requester may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestedName {
    Uri(String),
    Dns(String),
    Ip(String),
    Email(String),
    /// Any other GeneralName form, described.
    Other(String),
}

fn requested_names(csr: &X509CertificationRequest<'_>) -> Result<Vec<RequestedName>, CsrError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let mut out = Vec::new();
    // x509-parser reads only the first extensionRequest; a second one could hide names.
    let requests = csr
        .certification_request_info
        .iter_attributes()
        .filter(|a| a.oid.to_id_string() == "1.2.840.113549.1.9.14")
        .count();
    if requests > 1 {
        return Err(CsrError::Malformed("more than one extensionRequest attribute".into()));
    }
    let Some(exts) = csr.requested_extensions() else { return Ok(out) };
    for ext in exts {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    out.push(match n {
                        GeneralName::URI(u) => RequestedName::Uri((*u).to_string()),
                        GeneralName::DNSName(d) => RequestedName::Dns((*d).to_string()),
                        GeneralName::RFC822Name(e) => RequestedName::Email((*e).to_string()),
                        GeneralName::IPAddress(b) => RequestedName::Ip(match b.len() {
                            4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("4")).to_string(),
                            16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).expect("16")).to_string(),
                            _ => hex::encode(b),
                        }),
                        other => RequestedName::Other(format!("{other:?}")),
                    });
                }
            }
            // Fail closed: a requested extension we cannot read might hide a name.
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Malformed(format!("unreadable requested extension: {error}")));
            }
            _ => {}
        }
    }
    Ok(out)
}

impl VerifiedCsr {
    /// Parses PEM (`CERTIFICATE REQUEST`) or DER.
    pub fn parse(data: &[u8]) -> Result<Self, CsrError> {
        let der = if data.first() == Some(&0x30) {
            data.to_vec()
        } else {
            let mut blocks = pem_blocks(data, "CERTIFICATE REQUEST", "CSR")
                .or_else(|_| pem_blocks(data, "NEW CERTIFICATE REQUEST", "CSR"))
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            if blocks.len() != 1 {
                return Err(CsrError::Malformed(format!("expected one CSR, found {}", blocks.len())));
            }
            blocks.remove(0)
        };
        Self::from_der(&der)
    }

    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
        }
        let info = &csr.certification_request_info;
        // Key policy first: a weak key gets the precise error, not a signature failure.
        let public_key =
            hsm::PublicKey::from_spki_der(info.subject_pki.raw).map_err(|e| CsrError::WeakKey(e.to_string()))?;
        public_key
            .verify(&csr.signature_algorithm.algorithm.to_id_string(), info.raw, &csr.signature_value.data)
            .map_err(|_| CsrError::BadSignature)?;
        let subject = crate::dn::from_x509_name(&info.subject).map_err(|e| CsrError::Subject(e.to_string()))?;
        let requested_names = requested_names(&csr)?;
        Ok(VerifiedCsr { public_key, subject, subject_text: info.subject.to_string(), requested_names })
    }

    pub fn public_key(&self) -> &hsm::PublicKey {
        &self.public_key
    }

    pub fn subject(&self) -> &rcgen::DistinguishedName {
        &self.subject
    }

    pub fn subject_text(&self) -> &str {
        &self.subject_text
    }

    /// The subject alternative names the CSR asked for (for policy checks only).
    pub fn requested_names(&self) -> &[RequestedName] {
        &self.requested_names
    }
}

/// Signs CSRs only: a CSR's self-signature proves possession and certifies nothing, so it is
/// the one structure the real key signs outside the lint-before-sign pipeline.
struct CsrSigner<'a> {
    key: &'a hsm::KeySigner,
    failed: std::sync::Mutex<Option<hsm::HsmError>>,
}

impl rcgen::PublicKeyData for CsrSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key().raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key.rcgen_algorithm()
    }
}

impl rcgen::SigningKey for CsrSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign_bytes(msg).map_err(|e| {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Creates a CSR signed by `signer` carrying only a subject: the issuing profile adds the rest.
pub fn create_csr(signer: &hsm::KeySigner, subject: rcgen::DistinguishedName) -> crate::Result<String> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = subject;
    let csr_signer = CsrSigner { key: signer, failed: std::sync::Mutex::new(None) };
    let csr = params.serialize_request(&csr_signer).map_err(|e| {
        match csr_signer.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(h) => crate::error::CoreError::Hsm(h),
            None => crate::error::CoreError::Signing(e.to_string()),
        }
    })?;
    let pem = csr.pem().map_err(|e| crate::error::CoreError::Signing(e.to_string()))?;
    // Prove the signature before anyone relies on it.
    VerifiedCsr::parse(pem.as_bytes())?;
    Ok(pem)
}
