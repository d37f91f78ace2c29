//! Path validation against hand-built chains: name constraints of every kind we meet.
#![allow(clippy::disallowed_methods)] // tests make throwaway keys for their certificates

use ca_core::cert::CertInfo;
use ca_core::chain::verify_chain;
use rcgen::{BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use time::OffsetDateTime;
use yasna::Tag;

struct Ca {
    kp: KeyPair,
    cert: CertInfo,
}

fn root() -> Ca {
    let kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "root");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(2));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let c = p.self_signed(&kp).unwrap();
    Ca { cert: CertInfo::from_der(c.der().to_vec()).unwrap(), kp }
}

/// Encodes NameConstraints with URI (tag 6), DNS (tag 2) or email (tag 1) subtrees.
fn nc(permitted: &[(u64, &str)], excluded: &[(u64, &str)]) -> CustomExtension {
    let subtrees = |w: yasna::DERWriter, items: &[(u64, &str)]| {
        w.write_sequence(|w| {
            for (tag, v) in items {
                w.next()
                    .write_sequence(|w| w.next().write_tagged_implicit(Tag::context(*tag), |w| w.write_ia5_string(v)));
            }
        })
    };
    let der = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            if !permitted.is_empty() {
                w.next().write_tagged_implicit(Tag::context(0), |w| subtrees(w, permitted));
            }
            if !excluded.is_empty() {
                w.next().write_tagged_implicit(Tag::context(1), |w| subtrees(w, excluded));
            }
        })
    });
    let mut e = CustomExtension::from_oid_content(&[2, 5, 29, 30], der);
    e.set_criticality(true);
    e
}

fn sub_ca(parent: &Ca, ext: Option<CustomExtension>) -> Ca {
    let kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "constrained");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p.custom_extensions.extend(ext);
    let der = rustls_pki_types::CertificateDer::from(parent.cert.der.clone());
    let iss = rcgen::Issuer::from_ca_cert_der(&der, &parent.kp).unwrap();
    let c = p.signed_by(&kp, &iss).unwrap();
    Ca { cert: CertInfo::from_der(c.der().to_vec()).unwrap(), kp }
}

fn leaf(parent: &Ca, sans: Vec<SanType>) -> CertInfo {
    let kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = sans;
    p.use_authority_key_identifier_extension = true;
    let der = rustls_pki_types::CertificateDer::from(parent.cert.der.clone());
    let iss = rcgen::Issuer::from_ca_cert_der(&der, &parent.kp).unwrap();
    CertInfo::from_der(p.signed_by(&kp, &iss).unwrap().der().to_vec()).unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}
fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn check(ca: &Ca, r: &Ca, l: &CertInfo) -> Result<(), String> {
    verify_chain(l, std::slice::from_ref(&ca.cert), std::slice::from_ref(&r.cert), OffsetDateTime::now_utc())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn permitted_and_excluded_uri_constraints() {
    let r = root();
    let ca = sub_ca(&r, Some(nc(&[(6, ".example")], &[(6, "evil.example")])));
    check(&ca, &r, &leaf(&ca, vec![uri("spiffe://good.example/ns/a/sa/b")])).unwrap();
    let err = check(&ca, &r, &leaf(&ca, vec![uri("spiffe://evil.example/ns/a/sa/b")])).unwrap_err();
    assert!(err.contains("excluded: evil.example"), "{err}");
    let err = check(&ca, &r, &leaf(&ca, vec![uri("spiffe://other.test/ns/a/sa/b")])).unwrap_err();
    assert!(err.contains("permitted: .example"), "{err}");
}

#[test]
fn dns_constraints_apply_to_dns_names_and_leave_uris_alone() {
    let r = root();
    let ca = sub_ca(&r, Some(nc(&[(2, "good.example")], &[])));
    check(&ca, &r, &leaf(&ca, vec![dns("www.good.example")])).unwrap();
    let err = check(&ca, &r, &leaf(&ca, vec![dns("www.evil.example")])).unwrap_err();
    assert!(err.contains("www.evil.example"), "{err}");
    // No URI constraints: URI names are unconstrained (RFC 5280 4.2.1.10).
    check(&ca, &r, &leaf(&ca, vec![uri("spiffe://anything.test/x")])).unwrap();
}

#[test]
fn unsupported_constraint_types_fail_closed() {
    let r = root();
    let ca = sub_ca(&r, Some(nc(&[(1, "example.com")], &[])));
    let err = check(&ca, &r, &leaf(&ca, vec![uri("spiffe://a.example/x")])).unwrap_err();
    assert!(err.contains("email name constraints, which are not supported"), "{err}");
}

#[test]
fn validity_and_signatures_are_checked() {
    let r = root();
    let ca = sub_ca(&r, None);
    let l = leaf(&ca, vec![uri("spiffe://a.example/x")]);
    check(&ca, &r, &l).unwrap();
    let later = OffsetDateTime::now_utc() + time::Duration::days(365 * 5000);
    let err = verify_chain(&l, std::slice::from_ref(&ca.cert), std::slice::from_ref(&r.cert), later).unwrap_err();
    assert!(err.to_string().contains("is not valid at"), "{err}");
    // A different root with the same name does not verify the signature.
    let impostor = root();
    assert!(check(&ca, &impostor, &l).is_err());
}

#[test]
fn path_length_is_enforced() {
    let r = root();
    let ca = sub_ca(&r, None); // pathLen 0
    let kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "too deep");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.use_authority_key_identifier_extension = true;
    let der = rustls_pki_types::CertificateDer::from(ca.cert.der.clone());
    let deep = p.signed_by(&kp, &rcgen::Issuer::from_ca_cert_der(&der, &ca.kp).unwrap()).unwrap();
    let deep = Ca { cert: CertInfo::from_der(deep.der().to_vec()).unwrap(), kp };
    let l = leaf(&deep, vec![uri("spiffe://a.example/x")]);
    let err = verify_chain(
        &l,
        &[ca.cert.clone(), deep.cert.clone()],
        std::slice::from_ref(&r.cert),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("allows 0 CA(s) beneath it"), "{err}");
}
