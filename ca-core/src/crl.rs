//! CRLs, linted before the CA key signs them.

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::error::{CoreError, PolicyError, Result};
use crate::issue::{CaIssuer, sign_linted};
use crate::lint;

/// One revoked certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Serial as hex (colons allowed on input, stripped here).
    pub serial: Vec<u8>,
    pub reason: Option<Reason>,
    pub revoked_at: OffsetDateTime,
}

/// RFC 5280 CRLReason names as operators write them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl Reason {
    pub const NAMES: &[(&str, Reason)] = &[
        ("unspecified", Reason::Unspecified),
        ("key-compromise", Reason::KeyCompromise),
        ("ca-compromise", Reason::CaCompromise),
        ("affiliation-changed", Reason::AffiliationChanged),
        ("superseded", Reason::Superseded),
        ("cessation-of-operation", Reason::CessationOfOperation),
        ("certificate-hold", Reason::CertificateHold),
        ("privilege-withdrawn", Reason::PrivilegeWithdrawn),
    ];

    /// RFC 5280 5.3.1: "unspecified" is expressed by leaving the reason code out.
    fn to_rcgen(self) -> Option<RevocationReason> {
        Some(match self {
            Reason::Unspecified => return None,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::CaCompromise => RevocationReason::CaCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
            Reason::CertificateHold => RevocationReason::CertificateHold,
            Reason::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
        })
    }
}

impl std::str::FromStr for Reason {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Reason::NAMES.iter().find(|(n, _)| *n == s).map(|(_, r)| *r).ok_or_else(|| {
            let names: Vec<_> = Reason::NAMES.iter().map(|(n, _)| *n).collect();
            PolicyError::Invalid(format!("unknown revocation reason {s:?} (one of {})", names.join(", ")))
        })
    }
}

/// Parses a serial written as hex, with or without colons.
pub fn parse_serial(s: &str) -> Result<Vec<u8>, PolicyError> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let clean = if clean.len() % 2 == 1 { format!("0{clean}") } else { clean };
    let bytes = hex::decode(&clean).map_err(|_| PolicyError::Invalid(format!("serial {s:?} is not hex")))?;
    // Strip leading zero octets: they are padding, not part of the number.
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let bytes = bytes[first..].to_vec();
    if bytes.is_empty() {
        return Err(PolicyError::Invalid(format!("serial {s:?} is zero")));
    }
    // RFC 5280 4.1.2.2: at most 20 octets as a positive DER INTEGER.
    let encoded_len = bytes.len() + usize::from(bytes[0] & 0x80 != 0);
    if encoded_len > 20 {
        return Err(PolicyError::Invalid(format!("serial {s:?} is longer than 20 octets")));
    }
    Ok(bytes)
}

/// `SERIAL[:reason]`, the CLI's form.
pub fn parse_revocation(s: &str, at: OffsetDateTime) -> Result<Revocation, PolicyError> {
    // Serials may contain colons themselves; the reason is the part after the last colon if it
    // is a reason name.
    let (serial, reason) = match s.rsplit_once(':') {
        Some((serial, reason)) if reason.parse::<Reason>().is_ok() => (serial, Some(reason.parse::<Reason>()?)),
        _ => (s, None),
    };
    Ok(Revocation { serial: parse_serial(serial)?, reason, revoked_at: at })
}

pub struct CrlRequest {
    pub number: u64,
    pub this_update: OffsetDateTime,
    pub next_update: OffsetDateTime,
    pub revoked: Vec<Revocation>,
}

/// Signs a CRL with the CA's key after linting it. Returns DER.
pub fn create_crl(issuer: &CaIssuer, req: &CrlRequest) -> Result<Vec<u8>> {
    if !issuer.cert.crl_sign {
        return Err(PolicyError::IssuerNotCa(format!("{} lacks cRLSign", issuer.cert.subject)).into());
    }
    if req.next_update <= req.this_update {
        return Err(PolicyError::Invalid("nextUpdate must be after thisUpdate".into()).into());
    }
    let key_id = issuer
        .cert
        .ski
        .clone()
        .ok_or_else(|| PolicyError::IssuerNotCa(format!("{} has no subjectKeyIdentifier", issuer.cert.subject)))?;
    let params = CertificateRevocationListParams {
        this_update: req.this_update,
        next_update: req.next_update,
        crl_number: SerialNumber::from(req.number.to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: req
            .revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: SerialNumber::from(r.serial.clone()),
                revocation_time: r.revoked_at,
                reason_code: r.reason.and_then(Reason::to_rcgen),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::PreSpecified(key_id),
    };
    sign_linted(
        &issuer.signer,
        issuer.public_key(),
        |_| params.signed_by(&issuer.draft).map(|c| c.der().to_vec()),
        |der, tbs| lint::lint_crl(der, tbs, &issuer.cert),
        |der| {
            let (_, crl) =
                CertificateRevocationList::from_der(der).map_err(|e| CoreError::Parse(format!("CRL: {e}")))?;
            Ok((
                crl.tbs_cert_list.as_ref().to_vec(),
                crl.signature_algorithm.algorithm.to_id_string(),
                crl.signature_value.data.to_vec(),
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_syntax() {
        let now = OffsetDateTime::now_utc();
        let r = parse_revocation("0a:1b:2c:key-compromise", now).unwrap();
        assert_eq!(r.serial, vec![0x0a, 0x1b, 0x2c]);
        assert_eq!(r.reason, Some(Reason::KeyCompromise));
        let r = parse_revocation("abc", now).unwrap();
        assert_eq!(r.serial, vec![0x0a, 0xbc]);
        assert_eq!(r.reason, None);
        assert!(parse_revocation("zz", now).is_err());
        assert!(parse_revocation("00", now).is_err(), "zero");
        assert!(parse_serial(&"7f".repeat(20)).is_ok());
        assert!(parse_serial(&"80".repeat(20)).is_err(), "21 octets once the sign pad is added");
        assert!(parse_serial(&"01".repeat(21)).is_err());
        assert_eq!(parse_serial("00:0a").unwrap(), vec![0x0a]);
        assert_eq!(Reason::Unspecified.to_rcgen(), None);
        assert!(parse_revocation("", now).is_err());
    }
}
