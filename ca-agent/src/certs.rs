//! Certificate sets as the agent keeps them in Secrets, and the rules every renewal follows:
//! when it is due (a fraction of the lifetime, with jitter that is stable per certificate so
//! that replicas and restarts agree), and which bundle changes istiod accepts.

use std::collections::BTreeSet;

use ca_core::cert::{CertInfo, fingerprints};
use ca_core::validity::LifeFraction;
use sha2::Digest;
use time::OffsetDateTime;

/// When to renew `cert`: after `fraction` of its lifetime, moved by up to ±5 % of the lifetime.
/// The jitter comes from the certificate's fingerprint, so clusters issued together spread
/// out, while every replica and every restart computes the same moment.
pub fn renew_at(cert: &CertInfo, fraction: LifeFraction) -> OffsetDateTime {
    let life = (cert.not_after - cert.not_before).as_seconds_f64();
    let h = sha2::Sha256::digest(&cert.der);
    let r = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let jitter = (f64::from(r) / f64::from(u32::MAX) - 0.5) * 0.1;
    cert.not_before + time::Duration::seconds_f64(life * (fraction.as_f64() + jitter).clamp(0.05, 0.95))
}

pub fn due(cert: &CertInfo, fraction: LifeFraction, now: OffsetDateTime) -> bool {
    now >= renew_at(cert, fraction)
}

/// istiod (with `ISTIO_MULTIROOT_MESH`) takes a changed `root-cert.pem` only when the new
/// bundle contains the old one or is contained in it.
pub fn bundle_change_allowed(installed: &[CertInfo], next: &[CertInfo]) -> bool {
    let have: BTreeSet<String> = fingerprints(installed).into_iter().collect();
    let get: BTreeSet<String> = fingerprints(next).into_iter().collect();
    have.is_subset(&get) || have.is_superset(&get)
}

pub fn same_bundle(a: &[CertInfo], b: &[CertInfo]) -> bool {
    let a: BTreeSet<String> = fingerprints(a).into_iter().collect();
    let b: BTreeSet<String> = fingerprints(b).into_iter().collect();
    a == b
}

pub fn pem_of(certs: &[CertInfo]) -> String {
    certs.iter().map(CertInfo::pem).collect()
}

/// A fresh P-256 key and a CSR for it with common name `cn`.
pub fn key_and_csr(cn: &str) -> anyhow::Result<(hsm::SecretKey, String)> {
    let key = hsm::SecretKey::generate(hsm::KeyAlgorithm::EcdsaP256)?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, cn);
    let csr = ca_core::csr::create_csr(key.signer(), subject)?;
    Ok((key, csr))
}

/// A certificate and its key as a Secret holds them (`cert_name`, `key_name` name them in
/// errors), checked to belong together.
pub fn cert_with_key(
    cert_pem: &str,
    key_pem: &str,
    cert_name: &str,
    key_name: &str,
) -> anyhow::Result<(CertInfo, hsm::SecretKey)> {
    let cert = crate::server::one_cert(cert_pem).map_err(|e| anyhow::anyhow!("{cert_name}: {e:#}"))?;
    let key = hsm::SecretKey::from_pem(key_pem, key_name)?;
    anyhow::ensure!(cert.spki_der == key.public_key().spki_der(), "{key_name} is not the key of {cert_name}");
    Ok((cert, key))
}

/// Checks an issued certificate before anything is written: it is for our key, and its chain
/// verifies to the roots that come with it.
pub fn check_issued(
    cert: &CertInfo,
    key: &hsm::SecretKey,
    chain: &[CertInfo],
    roots: &[CertInfo],
) -> anyhow::Result<()> {
    anyhow::ensure!(cert.spki_der == key.public_key().spki_der(), "ca-server returned a certificate for another key");
    anyhow::ensure!(!roots.is_empty(), "ca-server returned an empty trust bundle");
    let rest: Vec<CertInfo> = chain.iter().filter(|c| c.der != cert.der).cloned().collect();
    ca_core::chain::verify_chain(cert, &rest, roots, OffsetDateTime::now_utc())
        .map_err(|e| anyhow::anyhow!("the returned chain does not verify to the returned bundle: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(days: i64) -> CertInfo {
        let key = hsm::SecretKey::generate(hsm::KeyAlgorithm::EcdsaP256).unwrap();
        let kp = rcgen::KeyPair::from_pem(key.expose_pem()).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
        p.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = p.not_before + time::Duration::days(days);
        CertInfo::from_der(p.self_signed(&kp).unwrap().der().to_vec()).unwrap()
    }

    #[test]
    fn renewal_is_two_thirds_with_bounded_stable_jitter() {
        for i in 0..20i64 {
            let c = cert(90 + i);
            let at = renew_at(&c, LifeFraction::TWO_THIRDS);
            assert_eq!(at, renew_at(&c, LifeFraction::TWO_THIRDS), "the same moment every time");
            let frac = (at - c.not_before).as_seconds_f64() / (c.not_after - c.not_before).as_seconds_f64();
            assert!((0.6166..=0.7167).contains(&frac), "{frac}");
        }
    }

    #[test]
    fn bundles_change_only_as_superset_or_subset() {
        let (a, b, c) = (cert(10), cert(10), cert(10));
        assert!(bundle_change_allowed(std::slice::from_ref(&a), &[a.clone(), b.clone()]));
        assert!(bundle_change_allowed(&[a.clone(), b.clone()], std::slice::from_ref(&b)));
        assert!(!bundle_change_allowed(&[a.clone(), b.clone()], &[b, c.clone()]));
        assert!(!bundle_change_allowed(&[a], &[c]));
    }
}
