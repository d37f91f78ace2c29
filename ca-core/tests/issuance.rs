//! Issuance policy and lint rules, with file keys (no HSM needed for these rules).
#![allow(clippy::disallowed_methods)] // tests make throwaway keys for their certificates

use ca_core::cert::CertInfo;
use ca_core::issue::{CaIssuer, create_root, default_not_before, issue};
use ca_core::lint::{LintContext, RULES, lint_certificate};
use ca_core::names::TrustDomain;
use ca_core::profile::{CertRequest, ProfileKind};
use ca_core::{CoreError, PolicyError};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    root: CaIssuer,
    root_kp: KeyPair,
}

fn file_signer(dir: &std::path::Path, name: &str, alg: hsm::KeyAlgorithm) -> hsm::KeySigner {
    let r = hsm::KeyRef::file(dir.join(name));
    hsm::generate_key(&r, alg).unwrap();
    hsm::open_signer(&r).unwrap()
}

fn request(profile: ProfileKind, key: &hsm::PublicKey, validity: Duration) -> CertRequest {
    let nb = default_not_before();
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(DnType::CommonName, format!("test {profile}"));
    CertRequest {
        profile,
        subject,
        subject_key: key.clone(),
        not_before: nb,
        not_after: nb + validity,
        path_len: matches!(profile, ProfileKind::Root | ProfileKind::CrossSign).then_some(2),
        trust_domains: if profile.is_ca() && profile != ProfileKind::Root {
            vec!["prod.example.com".parse().unwrap()]
        } else {
            vec![]
        },
        name_constraints: false,
        crl_urls: vec![],
        ca_issuer_urls: vec![],
        spiffe_id: (profile == ProfileKind::Workload)
            .then(|| "spiffe://prod.example.com/ns/default/sa/web".parse().unwrap()),
        server_names: vec![],
        subject_key_id: None,
        exact_subject: None,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let signer = file_signer(dir.path(), "root.key", hsm::KeyAlgorithm::EcdsaP256);
    let req = request(ProfileKind::Root, signer.public_key(), Duration::days(3650));
    let root = create_root(&signer, &req).unwrap();
    // The same key as an rcgen KeyPair, to hand-craft drafts that break one rule each.
    let pem = std::fs::read_to_string(dir.path().join("root.key")).unwrap();
    let root_kp = KeyPair::from_pem(&pem).unwrap();
    Fixture { root: CaIssuer::new(root.cert, signer).unwrap(), root_kp, _dir: dir }
}

fn subject_key() -> (KeyPair, hsm::PublicKey) {
    let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pk = hsm::PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap();
    (kp, pk)
}

/// Signs `params` with the root's key via rcgen and lints the result as `profile`.
fn lint_params(f: &Fixture, params: &CertificateParams, profile: ProfileKind, path_len: Option<u32>) -> Vec<String> {
    let (kp, _) = subject_key();
    let issuer_der = rustls_pki_types::CertificateDer::from(f.root.cert.der.clone());
    let issuer = rcgen::Issuer::from_ca_cert_der(&issuer_der, &f.root_kp).unwrap();
    let cert = params.signed_by(&kp, &issuer).unwrap();
    let info = CertInfo::from_der(cert.der().to_vec()).unwrap();
    let ctx = LintContext { profile, expected_path_len: path_len, issuer: Some(&f.root.cert), expected_subject: None };
    match lint_certificate(cert.der(), &info.tbs, &ctx) {
        Ok(_) => vec![],
        Err(e) => e.0,
    }
}

fn good_env_params(f: &Fixture) -> CertificateParams {
    let (_, pk) = subject_key();
    let _ = f;
    request(ProfileKind::Environment, &pk, Duration::days(365)).to_params(SerialNumber::from(vec![0x42; 17])).unwrap()
}

fn assert_rule(failures: &[String], rule: &str) {
    assert!(RULES.iter().any(|(id, _)| *id == rule), "{rule} is a listed rule");
    assert!(failures.iter().any(|f| f.starts_with(&format!("{rule}:"))), "expected {rule} in {failures:?}");
}

#[test]
fn profile_built_certificates_pass_every_lint() {
    let f = fixture();
    assert_eq!(lint_params(&f, &good_env_params(&f), ProfileKind::Environment, Some(1)), Vec::<String>::new());
}

#[test]
fn each_broken_rule_is_caught() {
    let f = fixture();
    let ca = |f: &Fixture| good_env_params(f);
    let mut cases: Vec<(&str, CertificateParams, ProfileKind, Option<u32>)> = Vec::new();

    let mut p = ca(&f);
    p.not_after = p.not_before - Duration::days(1);
    cases.push(("x509.validity-order", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.serial_number = Some(SerialNumber::from(vec![0x01; 8]));
    cases.push(("policy.serial-entropy", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.serial_number = Some(SerialNumber::from(vec![0x01; 22]));
    cases.push(("x509.serial", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    cases.push(("policy.ca-no-eku", p, ProfileKind::Environment, Some(1)));

    let p = ca(&f);
    cases.push(("policy.path-len", p, ProfileKind::Cluster, Some(0)));

    let mut p = ca(&f);
    p.use_authority_key_identifier_extension = false;
    cases.push(("x509.aki", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    let mut nc = CustomExtension::from_oid_content(&[2, 5, 29, 30], vec![0x30, 0x00]);
    nc.set_criticality(false);
    p.custom_extensions.push(nc);
    cases.push(("x509.name-constraints", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    let mut unknown = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    unknown.set_criticality(true);
    p.custom_extensions.push(unknown);
    cases.push(("x509.no-unknown-critical", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.key_usages.push(KeyUsagePurpose::DigitalSignature);
    cases.push(("policy.ca-key-usage", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.key_usages = vec![KeyUsagePurpose::CrlSign];
    cases.push(("x509.key-usage-ca", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.is_ca = IsCa::ExplicitNoCa;
    cases.push(("x509.basic-constraints", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.distinguished_name = rcgen::DistinguishedName::new();
    cases.push(("x509.ca-subject", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.not_after = f.root.cert.not_after + Duration::days(1);
    cases.push(("policy.within-issuer", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.subject_alt_names.push(SanType::URI("https://example.com/x".try_into().unwrap()));
    cases.push(("policy.uri-sans", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.crl_distribution_points = vec![rcgen::CrlDistributionPoint { uris: vec!["ftp://example.com/x.crl".into()] }];
    cases.push(("policy.urls", p, ProfileKind::Environment, Some(1)));

    let mut p = ca(&f);
    p.custom_extensions.push(CustomExtension::from_oid_content(&[2, 5, 29, 17], vec![0x30, 0x00]));
    cases.push(("x509.unique-extensions", p, ProfileKind::Environment, Some(1)));

    // Workload leaves.
    let (_, pk) = subject_key();
    let leaf = |f: &Fixture| {
        let _ = f;
        request(ProfileKind::Workload, &pk, Duration::hours(24)).to_params(SerialNumber::from(vec![0x42; 17])).unwrap()
    };
    let mut p = leaf(&f);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    cases.push(("x509.end-entity", p, ProfileKind::Workload, None));

    let mut p = leaf(&f);
    p.subject_alt_names.push(SanType::DnsName("web.example.com".try_into().unwrap()));
    cases.push(("policy.uri-sans", p, ProfileKind::Workload, None));

    let mut p = leaf(&f);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    cases.push(("policy.workload-usage", p, ProfileKind::Workload, None));

    let mut p = leaf(&f);
    p.subject_alt_names.clear();
    cases.push(("x509.san-critical", p, ProfileKind::Workload, None));

    // Server certificates: serverAuth only, DNS or IP names only.
    let server = |f: &Fixture| {
        let _ = f;
        let mut r = request(ProfileKind::Server, &pk, Duration::days(30));
        r.server_names = vec!["localhost".into(), "127.0.0.1".into()];
        r.to_params(SerialNumber::from(vec![0x42; 17])).unwrap()
    };
    assert_eq!(lint_params(&f, &server(&f), ProfileKind::Server, None), Vec::<String>::new());
    let mut p = server(&f);
    p.subject_alt_names.push(SanType::URI("spiffe://prod.example.com/x".try_into().unwrap()));
    cases.push(("policy.server-usage", p, ProfileKind::Server, None));
    let mut p = server(&f);
    p.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
    cases.push(("policy.server-usage", p, ProfileKind::Server, None));

    // Agent client certificates: clientAuth only, a subject and no names.
    let agent = |f: &Fixture| {
        let _ = f;
        let now = time::OffsetDateTime::now_utc();
        CertRequest::agent_client("east", pk.clone(), now, now + Duration::days(7))
            .to_params(SerialNumber::from(vec![0x42; 17]))
            .unwrap()
    };
    assert_eq!(lint_params(&f, &agent(&f), ProfileKind::Agent, None), Vec::<String>::new());
    let mut p = agent(&f);
    p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    cases.push(("policy.agent-usage", p, ProfileKind::Agent, None));
    let mut p = agent(&f);
    p.subject_alt_names.push(SanType::URI("spiffe://prod.example.com/x".try_into().unwrap()));
    cases.push(("policy.agent-usage", p, ProfileKind::Agent, None));
    let mut p = agent(&f);
    p.key_usages.push(rcgen::KeyUsagePurpose::KeyEncipherment);
    cases.push(("policy.agent-usage", p, ProfileKind::Agent, None));

    for (rule, params, profile, path_len) in cases {
        let failures = lint_params(&f, &params, profile, path_len);
        assert_rule(&failures, rule);
    }
}

#[test]
fn issuer_name_mismatch_and_weak_subject_keys_are_caught() {
    let f = fixture();
    // An issuer whose name differs from the real issuing certificate.
    let mut fake = CertificateParams::default();
    fake.distinguished_name.push(DnType::CommonName, "Someone Else");
    fake.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(f.root.cert.ski.clone().unwrap());
    let issuer = rcgen::Issuer::new(fake, &f.root_kp);
    let (kp, _) = subject_key();
    let cert = good_env_params(&f).signed_by(&kp, &issuer).unwrap();
    let info = CertInfo::from_der(cert.der().to_vec()).unwrap();
    let ctx = LintContext {
        profile: ProfileKind::Environment,
        expected_path_len: Some(1),
        issuer: Some(&f.root.cert),
        expected_subject: None,
    };
    assert_rule(&lint_certificate(cert.der(), &info.tbs, &ctx).unwrap_err().0, "x509.issuer-matches");

    // An issuer with an empty name.
    let mut empty = CertificateParams::default();
    empty.distinguished_name = rcgen::DistinguishedName::new();
    empty.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(f.root.cert.ski.clone().unwrap());
    let issuer = rcgen::Issuer::new(empty, &f.root_kp);
    let cert = good_env_params(&f).signed_by(&kp, &issuer).unwrap();
    let info = CertInfo::from_der(cert.der().to_vec()).unwrap();
    assert_rule(&lint_certificate(cert.der(), &info.tbs, &ctx).unwrap_err().0, "x509.issuer-nonempty");

    // A P-521 subject key.
    let weak = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
    let issuer_der = rustls_pki_types::CertificateDer::from(f.root.cert.der.clone());
    let issuer = rcgen::Issuer::from_ca_cert_der(&issuer_der, &f.root_kp).unwrap();
    let cert = good_env_params(&f).signed_by(&weak, &issuer).unwrap();
    let info = CertInfo::from_der(cert.der().to_vec()).unwrap();
    assert_rule(&lint_certificate(cert.der(), &info.tbs, &ctx).unwrap_err().0, "policy.key");

    // The bytes handed to the signer must be the TBS that is encoded: take a certificate that
    // passes, and present different bytes as what was signed.
    let issuer = rcgen::Issuer::from_ca_cert_der(&issuer_der, &f.root_kp).unwrap();
    let cert = good_env_params(&f).signed_by(&kp, &issuer).unwrap();
    let good = CertInfo::from_der(cert.der().to_vec()).unwrap();
    lint_certificate(cert.der(), &good.tbs, &ctx).expect("a profile-built certificate passes");
    let mut other = good.tbs.clone();
    other[10] ^= 1;
    let err = lint_certificate(cert.der(), &other, &ctx).unwrap_err();
    assert!(err.0[0].contains("signed bytes differ"), "{err}");

    // A cross-certificate must repeat the original subject exactly.
    let ctx = LintContext { expected_subject: Some(b"\x30\x00"), ..ctx };
    assert_rule(&lint_certificate(cert.der(), &good.tbs, &ctx).unwrap_err().0, "policy.cross-sign-subject");
}

#[test]
fn crl_lints_catch_a_wrong_issuer() {
    let f = fixture();
    let issuer_der = rustls_pki_types::CertificateDer::from(f.root.cert.der.clone());
    let now = time::OffsetDateTime::now_utc();
    let crl_params = |kid: Vec<u8>| rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(1),
        crl_number: SerialNumber::from(vec![1]),
        issuing_distribution_point: None,
        revoked_certs: vec![],
        key_identifier_method: rcgen::KeyIdMethod::PreSpecified(kid),
    };
    let lint = |der: &[u8], issuer: &CertInfo| {
        let (_, crl) = x509_parser::parse_x509_crl(der).unwrap();
        ca_core::lint::lint_crl(der, crl.tbs_cert_list.as_ref(), issuer)
    };
    let iss = rcgen::Issuer::from_ca_cert_der(&issuer_der, &f.root_kp).unwrap();
    let good = crl_params(f.root.cert.ski.clone().unwrap()).signed_by(&iss).unwrap();
    lint(good.der(), &f.root.cert).expect("a proper CRL passes");

    let bad_aki = crl_params(vec![1, 2, 3]).signed_by(&iss).unwrap();
    assert_rule(&lint(bad_aki.der(), &f.root.cert).unwrap_err().0, "crl.aki");

    let mut other = CertificateParams::default();
    other.distinguished_name.push(DnType::CommonName, "Other CA");
    let other_iss = rcgen::Issuer::new(other, &f.root_kp);
    let bad_name = crl_params(f.root.cert.ski.clone().unwrap()).signed_by(&other_iss).unwrap();
    assert_rule(&lint(bad_name.der(), &f.root.cert).unwrap_err().0, "crl.issuer-matches");

    let mut no_crl_sign = f.root.cert.clone();
    no_crl_sign.crl_sign = false;
    assert_rule(&lint(good.der(), &no_crl_sign).unwrap_err().0, "crl.issuer-crl-sign");

    let dup = rcgen::CertificateRevocationListParams {
        revoked_certs: vec![
            rcgen::RevokedCertParams {
                serial_number: SerialNumber::from(vec![7]),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            },
            rcgen::RevokedCertParams {
                serial_number: SerialNumber::from(vec![7]),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            },
        ],
        ..crl_params(f.root.cert.ski.clone().unwrap())
    }
    .signed_by(&iss)
    .unwrap();
    assert_rule(&lint(dup.der(), &f.root.cert).unwrap_err().0, "crl.unique-serials");
}

#[test]
fn every_rule_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/lints.md")).unwrap();
    for (id, _) in RULES {
        assert!(doc.contains(&format!("`{id}`")), "docs/lints.md lacks {id}");
    }
}

#[test]
fn a_child_never_outlives_its_parent_and_the_error_names_both_dates() {
    let f = fixture();
    let (_, pk) = subject_key();
    let req = request(ProfileKind::Environment, &pk, Duration::days(3650 + 30));
    let err = issue(&f.root, &req).unwrap_err();
    let CoreError::Policy(PolicyError::OutlivesIssuer { requested, issuer }) = &err else { panic!("{err}") };
    let msg = err.to_string();
    assert!(msg.contains(requested.as_str()) && msg.contains(issuer.as_str()), "{msg}");
    assert_eq!(issuer, &ca_core::error::fmt_time(f.root.cert.not_after));
}

#[test]
fn path_length_and_key_pairing_are_enforced() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let env_signer = file_signer(dir.path(), "env.key", hsm::KeyAlgorithm::EcdsaP256);
    let env = issue(&f.root, &request(ProfileKind::Environment, env_signer.public_key(), Duration::days(365))).unwrap();
    assert_eq!(env.cert.path_len, Some(1));
    let env = CaIssuer::new(env.cert, env_signer).unwrap();
    // An environment beneath an environment would exceed pathLen 1.
    let (_, pk) = subject_key();
    let err = issue(&env, &request(ProfileKind::Environment, &pk, Duration::days(30))).unwrap_err();
    assert!(matches!(err, CoreError::Policy(PolicyError::PathLen { .. })), "{err}");
    // A cluster is fine; a CA beneath the cluster is not.
    let cl_signer = file_signer(dir.path(), "cl.key", hsm::KeyAlgorithm::EcdsaP256);
    let cl = issue(&env, &request(ProfileKind::Cluster, cl_signer.public_key(), Duration::days(30))).unwrap();
    let cl = CaIssuer::new(cl.cert, cl_signer).unwrap();
    let err = issue(&cl, &request(ProfileKind::Cluster, &pk, Duration::days(1))).unwrap_err();
    assert!(matches!(err, CoreError::Policy(PolicyError::PathLen { .. })), "{err}");
    let leaf = issue(&cl, &request(ProfileKind::Workload, &pk, Duration::hours(24))).unwrap();
    assert!(!leaf.cert.is_ca);
    // A key that is not the certificate's.
    let other = file_signer(dir.path(), "other.key", hsm::KeyAlgorithm::EcdsaP256);
    let err = CaIssuer::new(f.root.cert.clone(), other).unwrap_err();
    assert!(matches!(err, CoreError::Policy(PolicyError::IssuerKeyMismatch)), "{err}");
    // A workload certificate is not an issuer.
    let leaf_signer = file_signer(dir.path(), "leaf.key", hsm::KeyAlgorithm::EcdsaP256);
    let leaf = issue(&cl, &request(ProfileKind::Workload, leaf_signer.public_key(), Duration::hours(1))).unwrap();
    assert!(CaIssuer::new(leaf.cert, leaf_signer).is_err());
}

#[test]
fn serials_are_random_positive_and_at_least_128_bits() {
    let f = fixture();
    let (_, pk) = subject_key();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let c = issue(&f.root, &request(ProfileKind::Environment, &pk, Duration::days(30))).unwrap();
        assert_eq!(c.cert.serial.len(), 34, "17 octets: {}", c.cert.serial);
        assert!(seen.insert(c.cert.serial.clone()), "serials repeat");
    }
}

#[test]
fn trust_domains_are_recorded_and_validated() {
    let f = fixture();
    let (_, pk) = subject_key();
    let mut req = request(ProfileKind::Environment, &pk, Duration::days(30));
    req.trust_domains = vec!["prod.example.com".parse().unwrap(), "prod-eu.example.com".parse().unwrap()];
    let c = issue(&f.root, &req).unwrap();
    assert_eq!(c.cert.trust_domains(), vec!["prod.example.com", "prod-eu.example.com"]);
    req.trust_domains.clear();
    assert!(issue(&f.root, &req).is_err(), "an environment CA needs a trust domain");
    assert!("Prod.Example.com".parse::<TrustDomain>().is_err());
}
