//! Issuance: policy checks, then lint before sign, then verify what the real key produced.

use std::cell::RefCell;
#[cfg(test)]
use std::sync::Mutex;

use rcgen::{PublicKeyData, SerialNumber, SigningKey};
use time::OffsetDateTime;

use crate::cert::CertInfo;
use crate::error::{CoreError, PolicyError, Result, fmt_time};
use crate::lint::{self, LintContext, LintedTbs};
use crate::profile::{CertRequest, ProfileKind};
use crate::validity::{Fit, fit_validity};

/// A CA certificate together with the key that signs for it.
pub struct CaIssuer {
    pub cert: CertInfo,
    pub signer: hsm::KeySigner,
    /// The certificate as rcgen's issuer, with the draft signer: parsed once here rather than
    /// at every issuance.
    pub(crate) draft: rcgen::Issuer<'static, Draft>,
}

impl std::fmt::Debug for CaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaIssuer").field("subject", &self.cert.subject).field("key", self.signer.key_ref()).finish()
    }
}

impl CaIssuer {
    /// Pairs a CA certificate with its key, refusing a key that is not the certificate's or a
    /// certificate that may not sign.
    pub fn new(cert: CertInfo, signer: hsm::KeySigner) -> Result<Self> {
        if cert.public_key()?.spki_der() != signer.public_key().spki_der() {
            return Err(PolicyError::IssuerKeyMismatch.into());
        }
        if !cert.is_ca || !cert.key_cert_sign {
            return Err(PolicyError::IssuerNotCa(format!("{} lacks cA=true or keyCertSign", cert.subject)).into());
        }
        let draft = rcgen::Issuer::from_ca_cert_der(
            &rustls_pki_types::CertificateDer::from(cert.der.as_slice()),
            Draft::of(signer.public_key()),
        )
        .map_err(|e| CoreError::Parse(format!("issuer certificate: {e}")))?;
        Ok(CaIssuer { cert, signer, draft })
    }

    pub fn public_key(&self) -> &hsm::PublicKey {
        self.signer.public_key()
    }
}

/// A certificate that was linted, signed and verified.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: CertInfo,
}

impl Issued {
    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// A fresh serial: 17 random octets (from the HSM when the issuer key is in one), high bit
/// cleared so it stays a positive 17-octet INTEGER: 135 random bits.
pub fn new_serial(signer: &hsm::KeySigner) -> Result<SerialNumber> {
    let mut bytes = signer.random(17)?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        // Keep the encoded length fixed so that serials never shrink below 128 bits.
        bytes[0] = 0x01;
    }
    Ok(SerialNumber::from(bytes))
}

thread_local! {
    /// The TBS a draft signer was last handed on this thread. rcgen signs on the thread that
    /// builds the certificate, so `sign_linted` finds here the bytes of the draft it just built.
    static DRAFT_TBS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Draft signer: presents the real issuer key and algorithm, so the TBS rcgen encodes is
/// byte-identical to the one the real key will sign, records it, and returns a placeholder
/// signature (lint never looks at the signature value, only at the TBS and the algorithms).
pub(crate) struct Draft {
    public: hsm::PublicKey,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl Draft {
    fn of(public: &hsm::PublicKey) -> Draft {
        Draft { public: public.clone(), alg: public.algorithm().signature_algorithm() }
    }
}

impl PublicKeyData for Draft {
    fn der_bytes(&self) -> &[u8] {
        self.public.raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl SigningKey for Draft {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        DRAFT_TBS.with_borrow_mut(|seen| {
            seen.clear();
            seen.extend_from_slice(msg);
        });
        Ok(vec![0; 8])
    }
}

/// Header and content lengths of the DER element at the start of `b`.
fn tlv(b: &[u8]) -> Option<(usize, usize)> {
    let first = *b.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, first as usize)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        (2 + n, b.get(2..2 + n)?.iter().fold(0usize, |acc, x| (acc << 8) | *x as usize))
    };
    (header.checked_add(len)? <= b.len()).then_some((header, len))
}

/// The draft's signatureAlgorithm: the element after the TBS inside the outer SEQUENCE.
fn signature_algorithm_der(draft: &[u8], tbs: &[u8]) -> Result<Vec<u8>> {
    let bad = || CoreError::Signing("the draft is not a SEQUENCE of TBS, algorithm and signature".into());
    let (header, _) = tlv(draft).ok_or_else(bad)?;
    let rest = draft.get(header..).ok_or_else(bad)?;
    if !rest.starts_with(tbs) {
        return Err(bad());
    }
    let rest = &rest[tbs.len()..];
    let (h, len) = tlv(rest).ok_or_else(bad)?;
    Ok(rest[..h + len].to_vec())
}

/// Runs `make` once with a draft signer to get the TBS, which `lint` must accept; then the real
/// key signs exactly the linted bytes, and the certificate (or CRL) is assembled from them, the
/// draft's signatureAlgorithm and the new signature. The signature is verified with
/// `issuer_public` before anything is returned.
pub(crate) fn sign_linted(
    key: &hsm::KeySigner,
    issuer_public: &hsm::PublicKey,
    make: impl Fn(&dyn SigningKey) -> std::result::Result<Vec<u8>, rcgen::Error>,
    lint: impl Fn(&[u8], &[u8]) -> std::result::Result<LintedTbs, lint::LintFailure>,
    split: impl Fn(&[u8]) -> Result<(Vec<u8>, String, Vec<u8>)>,
) -> Result<Vec<u8>> {
    sign_linted_as(
        key,
        issuer_public,
        make,
        lint,
        |der| split(&der).map(|parts| (der, parts)),
        |(_, (tbs, oid, sig))| (tbs.as_slice(), oid.as_str(), sig.as_slice()),
    )
    .map(|(der, _)| der)
}

/// `sign_linted`, returning the assembled DER as `parse` read it (so that a caller who needs
/// it parsed does not parse it twice); `parts` names its TBS, signature algorithm and signature.
pub(crate) fn sign_linted_as<T>(
    key: &hsm::KeySigner,
    issuer_public: &hsm::PublicKey,
    make: impl Fn(&dyn SigningKey) -> std::result::Result<Vec<u8>, rcgen::Error>,
    lint: impl Fn(&[u8], &[u8]) -> std::result::Result<LintedTbs, lint::LintFailure>,
    parse: impl Fn(Vec<u8>) -> Result<T>,
    parts: impl Fn(&T) -> (&[u8], &str, &[u8]),
) -> Result<T> {
    let (draft_der, seen) = build_draft(&Draft::of(issuer_public), make)?;
    let linted = lint_draft(lint, &draft_der, &seen)?;
    let alg = signature_algorithm_der(&draft_der, linted.bytes())?;
    // The only raw signature over certificate or CRL bytes: what lint accepted, nothing else.
    let sig = key.sign_bytes(linted.bytes()).map_err(CoreError::Hsm)?;
    let der = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(linted.bytes());
            w.next().write_der(&alg);
            w.next().write_bitvec_bytes(&sig, sig.len() * 8);
        })
    });
    self_verify(issuer_public, &linted, der, parse, parts)
}

// The stages below are functions of their own (never inlined) so that a profile names them:
// `istio_bench`'s callgrind table adds up their costs.

/// The draft's DER and the TBS the draft signer was handed.
#[inline(never)]
fn build_draft(
    draft: &Draft,
    make: impl Fn(&dyn SigningKey) -> std::result::Result<Vec<u8>, rcgen::Error>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    DRAFT_TBS.with_borrow_mut(Vec::clear);
    let der = make(draft).map_err(|e| CoreError::Signing(format!("building the draft: {e}")))?;
    Ok((der, DRAFT_TBS.with_borrow_mut(std::mem::take)))
}

#[inline(never)]
fn lint_draft(
    lint: impl Fn(&[u8], &[u8]) -> std::result::Result<LintedTbs, lint::LintFailure>,
    draft_der: &[u8],
    seen: &[u8],
) -> Result<LintedTbs> {
    lint(draft_der, seen).map_err(CoreError::Lint)
}

/// Parses what was assembled and checks that it carries exactly the linted TBS, under a
/// signature the issuer's public key verifies.
#[inline(never)]
fn self_verify<T>(
    issuer_public: &hsm::PublicKey,
    linted: &LintedTbs,
    der: Vec<u8>,
    parse: impl Fn(Vec<u8>) -> Result<T>,
    parts: impl Fn(&T) -> (&[u8], &str, &[u8]),
) -> Result<T> {
    let parsed = parse(der)?;
    let (tbs, sig_oid, sig) = parts(&parsed);
    if tbs != linted.bytes() {
        return Err(CoreError::Signing("signed TBS differs from the linted TBS".into()));
    }
    issuer_public
        .verify(sig_oid, tbs, sig)
        .map_err(|e| CoreError::Signing(format!("the new signature does not verify with the issuer key: {e}")))?;
    Ok(parsed)
}

fn split_cert(der: &[u8]) -> Result<(Vec<u8>, String, Vec<u8>)> {
    let info = CertInfo::from_der(der.to_vec()).map_err(CoreError::Parse)?;
    Ok((info.tbs, info.signature_oid, info.signature))
}

/// The common notBefore: a minute in the past absorbs clock skew between machines.
pub fn default_not_before() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is valid");
    now - time::Duration::minutes(1)
}

/// Creates a self-signed root. The key signs once, over a TBS that passed lint.
pub fn create_root(key: &hsm::KeySigner, req: &CertRequest) -> Result<Issued> {
    if req.profile != ProfileKind::Root {
        return Err(PolicyError::Invalid(format!("create_root needs the root profile, not {}", req.profile)).into());
    }
    if req.subject_key.spki_der() != key.public_key().spki_der() {
        return Err(PolicyError::IssuerKeyMismatch.into());
    }
    let params = req.to_params(new_serial(key)?)?;
    let ctx = LintContext {
        profile: ProfileKind::Root,
        expected_path_len: req.path_len,
        issuer: None,
        expected_subject: None,
    };
    let der = sign_linted(
        key,
        key.public_key(),
        |k| params.self_signed(&k).map(|c| c.der().to_vec()),
        |der, tbs| lint::lint_certificate(der, tbs, &ctx),
        split_cert,
    )?;
    Ok(Issued { cert: CertInfo::from_der(der).map_err(CoreError::Parse)? })
}

/// Issues a certificate under `issuer` after the policy checks: the issuer may sign, is not
/// expired, its path length allows the child, and the child does not outlive it.
pub fn issue(issuer: &CaIssuer, req: &CertRequest) -> Result<Issued> {
    check_issuer_policy(&issuer.cert, req)?;
    let (params, subject_key) = draft_params(issuer, req)?;
    let ctx = LintContext {
        profile: req.profile,
        expected_path_len: if req.profile.is_ca() { req.effective_path_len() } else { None },
        issuer: Some(&issuer.cert),
        expected_subject: req.exact_subject.as_deref(),
    };
    // The cached issuer's draft signer records the TBS just as the one handed to `make` would.
    let cert = sign_linted_as(
        &issuer.signer,
        issuer.public_key(),
        |_| params.signed_by(&subject_key, &issuer.draft).map(|c| c.der().to_vec()),
        |der, tbs| lint::lint_certificate(der, tbs, &ctx),
        |der| CertInfo::from_der(der).map_err(CoreError::Parse),
        |c| (c.tbs.as_slice(), c.signature_oid.as_str(), c.signature.as_slice()),
    )?;
    Ok(Issued { cert })
}

/// The serial and the certificate parameters, and the subject key as rcgen takes it.
#[inline(never)]
fn draft_params(
    issuer: &CaIssuer,
    req: &CertRequest,
) -> Result<(rcgen::CertificateParams, rcgen::SubjectPublicKeyInfo)> {
    let params = req.to_params(new_serial(&issuer.signer)?)?;
    let subject_key = rcgen::SubjectPublicKeyInfo::from_der(req.subject_key.spki_der())
        .map_err(|e| CoreError::Parse(format!("subject key: {e}")))?;
    Ok((params, subject_key))
}

pub fn check_issuer_policy(issuer: &CertInfo, req: &CertRequest) -> Result<()> {
    if !issuer.is_ca || !issuer.key_cert_sign {
        return Err(PolicyError::IssuerNotCa(format!("{} lacks cA=true or keyCertSign", issuer.subject)).into());
    }
    let now = OffsetDateTime::now_utc();
    if issuer.not_after <= now {
        return Err(PolicyError::IssuerExpired(fmt_time(issuer.not_after)).into());
    }
    fit_validity(issuer.not_after, req.not_before, req.not_after - req.not_before, Fit::Refuse)?;
    // Trust domains narrow going down: a CA serves a subset of its issuer's, a workload
    // belongs to one its issuer serves. A root records none and so constrains nothing.
    let requested: Vec<String> = match &req.spiffe_id {
        Some(id) => vec![id.trust_domain().to_string()],
        None => req.trust_domains.iter().map(|t| t.to_string()).collect(),
    };
    let served = issuer.trust_domains();
    for td in &requested {
        if !served.is_empty() && !served.contains(td) {
            return Err(PolicyError::Invalid(format!(
                "trust domain {td} is not served by the issuer (it serves {})",
                served.join(", ")
            ))
            .into());
        }
        if let Some(nc) = &issuer.name_constraints {
            let permitted: Vec<&str> = nc
                .permitted
                .iter()
                .filter_map(|c| if let crate::cert::ConstraintName::Uri(u) = c { Some(u.as_str()) } else { None })
                .collect();
            let excluded = nc
                .excluded
                .iter()
                .any(|c| matches!(c, crate::cert::ConstraintName::Uri(u) if crate::chain::host_matches(td, u)));
            if excluded || (!permitted.is_empty() && !permitted.iter().any(|p| crate::chain::host_matches(td, p))) {
                return Err(PolicyError::Invalid(format!(
                    "trust domain {td} is outside the issuer's name constraints (permitted: {})",
                    permitted.join(", ")
                ))
                .into());
            }
        }
    }
    if let (Some(limit), true) = (issuer.path_len, req.profile.is_ca()) {
        let child = req.effective_path_len().unwrap_or(u32::MAX);
        if child >= limit {
            return Err(PolicyError::PathLen { profile: req.profile.to_string(), issuer_path_len: limit }.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    #[test]
    fn the_real_key_signs_only_the_linted_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let r = hsm::KeyRef::file(dir.path().join("k.pem"));
        hsm::generate_key(&r, hsm::KeyAlgorithm::EcdsaP256).unwrap();
        let key = hsm::open_signer(&r).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.serial_number = Some(SerialNumber::from(vec![0x10; 17]));
        let calls = AtomicU8::new(0);
        let linted = Mutex::new(Vec::new());
        let der = sign_linted(
            &key,
            key.public_key(),
            |k| {
                calls.fetch_add(1, Ordering::SeqCst);
                params.self_signed(&k).map(|c| c.der().to_vec())
            },
            |_der, tbs| {
                *linted.lock().unwrap() = tbs.to_vec();
                Ok(crate::lint::tests_support::accept(tbs))
            },
            split_cert,
        )
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one draft, no second encoding");
        let info = CertInfo::from_der(der).unwrap();
        assert_eq!(info.tbs, *linted.lock().unwrap(), "the certificate carries exactly the linted TBS");
        key.public_key().verify(&info.signature_oid, &info.tbs, &info.signature).unwrap();

        // When lint refuses, nothing is signed.
        let err = sign_linted(
            &key,
            key.public_key(),
            |k| params.self_signed(&k).map(|c| c.der().to_vec()),
            |_der, _tbs| Err(crate::lint::LintFailure(vec!["x509.version: forced".into()])),
            split_cert,
        )
        .unwrap_err();
        assert!(matches!(err, CoreError::Lint(_)), "{err}");
    }

    #[test]
    fn der_lengths() {
        assert_eq!(tlv(&[0x30, 0x03, 1, 2, 3]), Some((2, 3)));
        assert_eq!(tlv(&[0x30, 0x81, 0x01, 9]), Some((3, 1)));
        assert_eq!(tlv(&[0x30, 0x82, 0x01, 0x00]), None, "longer than the input");
        assert_eq!(tlv(&[0x30]), None);
    }
}
