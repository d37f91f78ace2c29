//! Issuance: policy checks, then lint before sign, then verify what the real key produced.

use std::sync::Mutex;

use rcgen::{PublicKeyData, SerialNumber, SigningKey};
use time::OffsetDateTime;

use crate::cert::CertInfo;
use crate::error::{CoreError, PolicyError, Result, fmt_time};
use crate::lint::{self, LintContext, LintedTbs};
use crate::profile::{CertRequest, ProfileKind};

/// A CA certificate together with the key that signs for it.
pub struct CaIssuer {
    pub cert: CertInfo,
    pub signer: hsm::KeySigner,
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
        Ok(CaIssuer { cert, signer })
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

/// Draft signer: presents the real issuer key, signs with a throwaway, records what it signed.
struct Draft {
    inner: hsm::ThrowawaySigner,
    seen: Mutex<Vec<u8>>,
}

impl PublicKeyData for Draft {
    fn der_bytes(&self) -> &[u8] {
        self.inner.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.inner.algorithm()
    }
}

impl SigningKey for Draft {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = msg.to_vec();
        self.inner.sign(msg)
    }
}

/// The real key, reachable only through linted bytes: it refuses to sign anything else.
struct Guarded<'a> {
    key: &'a hsm::KeySigner,
    linted: &'a LintedTbs,
    refused: Mutex<bool>,
    /// rcgen only carries an opaque error; the HSM's real one is kept here.
    failed: Mutex<Option<hsm::HsmError>>,
}

impl PublicKeyData for Guarded<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key().raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key.rcgen_algorithm()
    }
}

impl SigningKey for Guarded<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        if msg != self.linted.bytes() {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = true;
            return Err(rcgen::Error::RemoteKeyError);
        }
        self.key.sign_bytes(msg).map_err(|e| {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Runs `make` twice: once with a throwaway key to produce a draft that `lint` must accept,
/// then with the real key, which signs only the linted bytes. The result's signature is
/// verified with `issuer_public` and its TBS compared with the linted one.
pub(crate) fn sign_linted(
    key: &hsm::KeySigner,
    issuer_public: &hsm::PublicKey,
    make: impl Fn(&dyn SigningKey) -> std::result::Result<Vec<u8>, rcgen::Error>,
    lint: impl Fn(&[u8], &[u8]) -> std::result::Result<LintedTbs, lint::LintFailure>,
    split: impl Fn(&[u8]) -> Result<(Vec<u8>, String, Vec<u8>)>,
) -> Result<Vec<u8>> {
    let draft = Draft { inner: hsm::ThrowawaySigner::new(issuer_public)?, seen: Mutex::new(Vec::new()) };
    let draft_der = make(&draft).map_err(|e| CoreError::Signing(format!("building the draft: {e}")))?;
    let seen = draft.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let linted = lint(&draft_der, &seen).map_err(CoreError::Lint)?;

    let guard = Guarded { key, linted: &linted, refused: Mutex::new(false), failed: Mutex::new(None) };
    let der = make(&guard).map_err(|e| {
        if *guard.refused.lock().unwrap_or_else(|p| p.into_inner()) {
            CoreError::Signing("the TBS changed between lint and signing; nothing was signed".into())
        } else if let Some(cause) = guard.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            CoreError::Hsm(cause)
        } else {
            CoreError::Signing(e.to_string())
        }
    })?;
    let (tbs, sig_oid, sig) = split(&der)?;
    if tbs != linted.bytes() {
        return Err(CoreError::Signing("signed TBS differs from the linted TBS".into()));
    }
    issuer_public
        .verify(&sig_oid, &tbs, &sig)
        .map_err(|e| CoreError::Signing(format!("the new signature does not verify with the issuer key: {e}")))?;
    Ok(der)
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
    let params = req.to_params(new_serial(&issuer.signer)?)?;
    let subject_key = rcgen::SubjectPublicKeyInfo::from_der(req.subject_key.spki_der())
        .map_err(|e| CoreError::Parse(format!("subject key: {e}")))?;
    let issuer_der = rustls_pki_der(&issuer.cert.der);
    let ctx = LintContext {
        profile: req.profile,
        expected_path_len: if req.profile.is_ca() { req.effective_path_len() } else { None },
        issuer: Some(&issuer.cert),
        expected_subject: req.exact_subject.as_deref(),
    };
    let der = sign_linted(
        &issuer.signer,
        issuer.public_key(),
        |k| {
            let iss = rcgen::Issuer::from_ca_cert_der(&issuer_der, k)?;
            params.signed_by(&subject_key, &iss).map(|c| c.der().to_vec())
        },
        |der, tbs| lint::lint_certificate(der, tbs, &ctx),
        split_cert,
    )?;
    Ok(Issued { cert: CertInfo::from_der(der).map_err(CoreError::Parse)? })
}

fn rustls_pki_der(der: &[u8]) -> rustls_pki_types::CertificateDer<'static> {
    rustls_pki_types::CertificateDer::from(der.to_vec())
}

pub fn check_issuer_policy(issuer: &CertInfo, req: &CertRequest) -> Result<()> {
    if !issuer.is_ca || !issuer.key_cert_sign {
        return Err(PolicyError::IssuerNotCa(format!("{} lacks cA=true or keyCertSign", issuer.subject)).into());
    }
    let now = OffsetDateTime::now_utc();
    if issuer.not_after <= now {
        return Err(PolicyError::IssuerExpired(fmt_time(issuer.not_after)).into());
    }
    if req.not_after > issuer.not_after {
        return Err(PolicyError::OutlivesIssuer {
            requested: fmt_time(req.not_after),
            issuer: fmt_time(issuer.not_after),
        }
        .into());
    }
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
        let calls = AtomicU8::new(0);
        // A builder that yields a different TBS on its second call, as a racy or buggy
        // caller might: the guard must refuse to sign it.
        let err = sign_linted(
            &key,
            key.public_key(),
            |k| {
                let mut p = params.clone();
                p.serial_number = Some(SerialNumber::from(vec![0x10 + calls.fetch_add(1, Ordering::SeqCst); 17]));
                p.self_signed(&k).map(|c| c.der().to_vec())
            },
            |_der, tbs| Ok(crate::lint::tests_support::accept(tbs)),
            split_cert,
        )
        .unwrap_err();
        assert!(err.to_string().contains("TBS changed between lint and signing"), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // And when lint refuses, the real key is never asked.
        let calls = AtomicU8::new(0);
        let err = sign_linted(
            &key,
            key.public_key(),
            |k| {
                calls.fetch_add(1, Ordering::SeqCst);
                params.self_signed(&k).map(|c| c.der().to_vec())
            },
            |_der, _tbs| Err(crate::lint::LintFailure(vec!["x509.version: forced".into()])),
            split_cert,
        )
        .unwrap_err();
        assert!(matches!(err, CoreError::Lint(_)), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "only the throwaway draft was built");
    }
}
