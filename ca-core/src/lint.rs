//! Lint before sign.
//!
//! A draft is encoded with a placeholder signature, parsed back and checked against the rules
//! below. Only a passing TBS becomes a [`LintedTbs`], and [`LintedTbs`] can be made nowhere
//! else: the real key signs those exact bytes and nothing else.

use std::collections::HashSet;
use std::fmt;

use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::cert::CertInfo;
use crate::profile::ProfileKind;

/// Every rule we lint certificates and CRLs against: (id, what it requires).
/// `docs/lints.md` lists the same table; a test keeps them in step.
pub const RULES: &[(&str, &str)] = &[
    ("x509.version", "certificates are X.509 v3 (RFC 5280 4.1.2.1)"),
    ("x509.serial", "serial is positive, non-zero and at most 20 octets (RFC 5280 4.1.2.2)"),
    ("policy.serial-entropy", "serial has at least 16 octets, i.e. 128 random bits or more"),
    ("x509.signature-alg-match", "TBS signature algorithm equals signatureAlgorithm (RFC 5280 4.1.1.2)"),
    ("x509.issuer-nonempty", "issuer name is non-empty (RFC 5280 4.1.2.4)"),
    ("x509.issuer-matches", "issuer name is byte-identical to the issuing certificate's subject (RFC 5280 6.1)"),
    ("x509.validity-order", "notBefore is before notAfter (RFC 5280 4.1.2.5)"),
    ("policy.within-issuer", "notAfter is not after the issuer's notAfter"),
    ("x509.unique-extensions", "no extension appears twice (RFC 5280 4.2)"),
    ("x509.no-unknown-critical", "no critical extension outside the set we understand (RFC 5280 4.2)"),
    ("x509.ca-subject", "CA certificates have a non-empty subject (RFC 5280 4.1.2.6)"),
    ("x509.san-critical", "a certificate with an empty subject has a critical subjectAltName (RFC 5280 4.2.1.6)"),
    ("x509.basic-constraints", "CA certificates carry critical basicConstraints with cA=true (RFC 5280 4.2.1.9)"),
    ("x509.key-usage-ca", "CA certificates carry critical keyUsage with keyCertSign (RFC 5280 4.2.1.3)"),
    ("x509.path-len", "pathLenConstraint only with cA=true and keyCertSign (RFC 5280 4.2.1.9)"),
    ("x509.ski", "CA certificates carry a non-critical subjectKeyIdentifier (RFC 5280 4.2.1.2)"),
    (
        "x509.aki",
        "non-self-signed certificates carry a non-critical authorityKeyIdentifier whose keyIdentifier equals the issuer's subjectKeyIdentifier (RFC 5280 4.2.1.1)",
    ),
    (
        "x509.name-constraints",
        "nameConstraints appear only in CA certificates, critical and non-empty (RFC 5280 4.2.1.10)",
    ),
    (
        "x509.end-entity",
        "end-entity certificates assert neither cA nor keyCertSign/cRLSign (RFC 5280 4.2.1.3, 4.2.1.9)",
    ),
    ("policy.ca-no-eku", "CA certificates carry no extendedKeyUsage"),
    ("policy.ca-key-usage", "CA keyUsage is exactly keyCertSign and cRLSign"),
    ("policy.path-len", "pathLenConstraint equals the profile's (root: as requested, environment: 1, cluster: 0)"),
    ("policy.cross-sign-subject", "a cross-certificate repeats the original subject byte for byte"),
    ("policy.key", "the subject key is ECDSA P-256/P-384 or RSA of at least 2048 bits"),
    (
        "policy.workload-usage",
        "workload certificates carry keyUsage digitalSignature+keyEncipherment and extendedKeyUsage serverAuth+clientAuth",
    ),
    (
        "policy.server-usage",
        "server certificates carry keyUsage digitalSignature+keyEncipherment, extendedKeyUsage serverAuth only, and only DNS or IP names",
    ),
    (
        "policy.agent-usage",
        "agent certificates carry keyUsage digitalSignature, extendedKeyUsage clientAuth only, a subject and no subjectAltName",
    ),
    (
        "policy.uri-sans",
        "URI SANs are SPIFFE IDs: spiffe://<trust-domain> on CAs, one workload ID on leaves; leaves carry no DNS, IP or email names",
    ),
    ("policy.urls", "CRL distribution point and caIssuers URLs are http:// or https://"),
    ("crl.version", "CRLs are v2 (RFC 5280 5.1.2.1)"),
    ("crl.issuer-matches", "CRL issuer is byte-identical to the issuing certificate's subject (RFC 5280 5.1.2.3)"),
    ("crl.signature-alg-match", "CRL TBS signature algorithm equals signatureAlgorithm (RFC 5280 5.1.1.2)"),
    ("crl.next-update", "nextUpdate is present and after thisUpdate (RFC 5280 5.1.2.5)"),
    ("crl.number", "cRLNumber is present and non-critical (RFC 5280 5.2.3)"),
    ("crl.aki", "authorityKeyIdentifier equals the issuer's subjectKeyIdentifier (RFC 5280 5.2.1)"),
    ("crl.issuer-crl-sign", "the issuer's keyUsage asserts cRLSign (RFC 5280 4.2.1.3)"),
    ("crl.unique-serials", "no serial is listed twice"),
];

/// TBS bytes that passed every lint. Only this module can make one.
#[derive(Clone, PartialEq, Eq)]
pub struct LintedTbs {
    tbs: Vec<u8>,
}

impl LintedTbs {
    pub fn bytes(&self) -> &[u8] {
        &self.tbs
    }
}

impl fmt::Debug for LintedTbs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LintedTbs({} bytes)", self.tbs.len())
    }
}

pub use crate::error::LintFailure;

/// What the certificate is meant to be.
pub struct LintContext<'a> {
    pub profile: ProfileKind,
    pub expected_path_len: Option<u32>,
    /// The issuing certificate; `None` for a self-signed root.
    pub issuer: Option<&'a CertInfo>,
    /// For cross-signs: the subject DER the certificate must carry exactly.
    pub expected_subject: Option<&'a [u8]>,
}

// keyUsage bits as x509-parser numbers them (RFC 5280 4.2.1.3 order, least significant first).
const KU_DIGITAL_SIGNATURE: u16 = 1 << 0;
const KU_KEY_ENCIPHERMENT: u16 = 1 << 2;
const KU_KEY_CERT_SIGN: u16 = 1 << 5;
const KU_CRL_SIGN: u16 = 1 << 6;

struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, id: &str, detail: impl FnOnce() -> String) {
        debug_assert!(RULES.iter().any(|(r, _)| *r == id), "unlisted rule {id}");
        if !ok {
            self.0.push(format!("{id}: {}", detail()));
        }
    }
}

fn ts(t: x509_parser::time::ASN1Time) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Lints a draft certificate. `draft_tbs` is what the draft signer was actually handed; it
/// must be what the DER holds.
pub fn lint_certificate(der: &[u8], draft_tbs: &[u8], ctx: &LintContext<'_>) -> Result<LintedTbs, LintFailure> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| LintFailure(vec![format!("x509.version: draft does not parse: {e}")]))?;
    let tbs = &cert.tbs_certificate;
    if tbs.as_ref() != draft_tbs {
        return Err(LintFailure(vec!["x509.version: signed bytes differ from the encoded TBS".into()]));
    }
    let mut f = Findings(vec![]);

    f.check(tbs.version.0 == 2, "x509.version", || format!("version is v{}", tbs.version.0 + 1));
    let serial = tbs.raw_serial();
    let serial_content = match serial {
        [0, rest @ ..] => rest,
        s => s,
    };
    f.check(
        !serial.is_empty() && serial[0] & 0x80 == 0 && serial.iter().any(|b| *b != 0) && serial.len() <= 20,
        "x509.serial",
        || format!("serial {} is not a positive integer of at most 20 octets", hex::encode(serial)),
    );
    f.check(serial_content.len() >= 16, "policy.serial-entropy", || {
        format!("serial has only {} octets", serial_content.len())
    });
    f.check(tbs.signature == cert.signature_algorithm, "x509.signature-alg-match", || "algorithms differ".into());
    f.check(!tbs.issuer.as_raw().is_empty() && tbs.issuer.iter().next().is_some(), "x509.issuer-nonempty", || {
        "issuer is empty".into()
    });
    let expected_issuer = ctx.issuer.map(|i| i.subject_raw.as_slice()).unwrap_or(tbs.subject.as_raw());
    f.check(tbs.issuer.as_raw() == expected_issuer, "x509.issuer-matches", || {
        format!("issuer {} is not the issuing certificate's subject", tbs.issuer)
    });
    if let Some(expected) = ctx.expected_subject {
        f.check(tbs.subject.as_raw() == expected, "policy.cross-sign-subject", || {
            format!("subject {} differs from the original's encoding", tbs.subject)
        });
    }
    let (nb, na) = (ts(tbs.validity.not_before), ts(tbs.validity.not_after));
    f.check(nb < na, "x509.validity-order", || "notBefore is not before notAfter".into());
    if let Some(issuer) = ctx.issuer {
        f.check(na <= issuer.not_after, "policy.within-issuer", || {
            format!("notAfter {na} is past the issuer's {}", issuer.not_after)
        });
    }

    let mut seen = HashSet::new();
    let (mut bc, mut ku, mut eku, mut ski, mut aki, mut san, mut nc) = (None, None, None, None, None, None, None);
    let mut urls = Vec::new();
    for ext in tbs.extensions() {
        // Compared as encoded: the dotted form is only needed for the finding.
        f.check(seen.insert(ext.oid.as_bytes()), "x509.unique-extensions", || {
            format!("{} appears twice", ext.oid.to_id_string())
        });
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(b) => bc = Some((ext.critical, b.clone())),
            ParsedExtension::KeyUsage(k) => ku = Some((ext.critical, k.flags)),
            ParsedExtension::ExtendedKeyUsage(e) => {
                eku = Some((
                    e.server_auth,
                    e.client_auth,
                    e.any
                        || !e.other.is_empty()
                        || e.code_signing
                        || e.email_protection
                        || e.time_stamping
                        || e.ocsp_signing,
                ))
            }
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some((ext.critical, k.0.to_vec())),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = Some((ext.critical, a.key_identifier.as_ref().map(|k| k.0.to_vec())))
            }
            ParsedExtension::SubjectAlternativeName(s) => san = Some((ext.critical, s.general_names.clone())),
            ParsedExtension::NameConstraints(n) => {
                let count = n.permitted_subtrees.as_ref().map_or(0, Vec::len)
                    + n.excluded_subtrees.as_ref().map_or(0, Vec::len);
                nc = Some((ext.critical, count));
            }
            ParsedExtension::CRLDistributionPoints(dps) => {
                for dp in dps.iter() {
                    if let Some(x509_parser::extensions::DistributionPointName::FullName(names)) =
                        &dp.distribution_point
                    {
                        urls.extend(names.iter().map(|n| match n {
                            GeneralName::URI(u) => u.to_string(),
                            other => format!("{other:?}"),
                        }));
                    }
                }
            }
            ParsedExtension::AuthorityInfoAccess(aia) => {
                urls.extend(aia.accessdescs.iter().map(|d| match &d.access_location {
                    GeneralName::URI(u) => u.to_string(),
                    other => format!("{other:?}"),
                }));
            }
            _ => f.check(!ext.critical, "x509.no-unknown-critical", || {
                format!("critical extension {} is not understood", ext.oid.to_id_string())
            }),
        }
    }

    let is_ca = ctx.profile.is_ca();
    let subject_empty = tbs.subject.iter().next().is_none();
    if is_ca {
        f.check(!subject_empty, "x509.ca-subject", || "CA subject is empty".into());
        f.check(matches!(&bc, Some((true, b)) if b.ca), "x509.basic-constraints", || {
            "missing, non-critical or cA=false".into()
        });
        f.check(matches!(ku, Some((true, flags)) if flags & KU_KEY_CERT_SIGN != 0), "x509.key-usage-ca", || {
            "missing, non-critical or without keyCertSign".into()
        });
        f.check(ku.map(|(_, flags)| flags) == Some(KU_KEY_CERT_SIGN | KU_CRL_SIGN), "policy.ca-key-usage", || {
            format!("keyUsage flags are {:#x}", ku.map_or(0, |k| k.1))
        });
        f.check(eku.is_none(), "policy.ca-no-eku", || "CA carries extendedKeyUsage".into());
        f.check(matches!(&ski, Some((false, k)) if !k.is_empty()), "x509.ski", || "missing or critical".into());
        let got = bc.as_ref().and_then(|(_, b)| b.path_len_constraint);
        f.check(got == ctx.expected_path_len, "policy.path-len", || {
            format!("pathLen is {got:?}, profile wants {:?}", ctx.expected_path_len)
        });
    } else {
        f.check(!matches!(&bc, Some((_, b)) if b.ca), "x509.end-entity", || "end entity asserts cA".into());
        f.check(ku.is_none_or(|(_, flags)| flags & (KU_KEY_CERT_SIGN | KU_CRL_SIGN) == 0), "x509.end-entity", || {
            "end entity asserts keyCertSign or cRLSign".into()
        });
        if ctx.profile == ProfileKind::Server {
            f.check(
                ku.map(|(_, flags)| flags) == Some(KU_DIGITAL_SIGNATURE | KU_KEY_ENCIPHERMENT)
                    && matches!(eku, Some((true, false, false))),
                "policy.server-usage",
                || "keyUsage or extendedKeyUsage does not match the server profile".into(),
            );
        } else if ctx.profile == ProfileKind::Agent {
            f.check(
                ku.map(|(_, flags)| flags) == Some(KU_DIGITAL_SIGNATURE) && matches!(eku, Some((false, true, false))),
                "policy.agent-usage",
                || "keyUsage or extendedKeyUsage does not match the agent profile".into(),
            );
        } else {
            f.check(
                ku.map(|(_, flags)| flags) == Some(KU_DIGITAL_SIGNATURE | KU_KEY_ENCIPHERMENT)
                    && matches!(eku, Some((true, true, false))),
                "policy.workload-usage",
                || "keyUsage or extendedKeyUsage does not match the workload profile".into(),
            );
        }
    }
    f.check(
        bc.as_ref().is_none_or(|(_, b)| {
            b.path_len_constraint.is_none() || (b.ca && ku.is_some_and(|(_, fl)| fl & KU_KEY_CERT_SIGN != 0))
        }),
        "x509.path-len",
        || "pathLen without cA/keyCertSign".into(),
    );
    if subject_empty {
        f.check(matches!(san, Some((true, _))), "x509.san-critical", || "empty subject without a critical SAN".into());
    }
    if let Some(issuer) = ctx.issuer {
        f.check(matches!(&aki, Some((false, Some(k))) if Some(k) == issuer.ski.as_ref()), "x509.aki", || {
            "missing, critical, or not the issuer's subjectKeyIdentifier".into()
        });
    }
    if let Some((critical, count)) = nc {
        f.check(is_ca && critical && count > 0, "x509.name-constraints", || {
            "name constraints must be critical, non-empty and on a CA".into()
        });
    }
    let names = san.map(|(_, n)| n).unwrap_or_default();
    let uris: Vec<&str> =
        names.iter().filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None }).collect();
    if is_ca {
        f.check(
            uris.iter()
                .all(|u| u.strip_prefix("spiffe://").is_some_and(|td| td.parse::<crate::names::TrustDomain>().is_ok())),
            "policy.uri-sans",
            || format!("CA URI SANs must be spiffe://<trust-domain>: {uris:?}"),
        );
    } else if ctx.profile == ProfileKind::Agent {
        f.check(names.is_empty() && !subject_empty, "policy.agent-usage", || {
            format!("an agent certificate names its cluster in its subject and carries no other names: {names:?}")
        });
    } else if ctx.profile == ProfileKind::Server {
        f.check(
            !names.is_empty() && names.iter().all(|n| matches!(n, GeneralName::DNSName(_) | GeneralName::IPAddress(_))),
            "policy.server-usage",
            || format!("a server certificate carries only DNS names and IP addresses: {names:?}"),
        );
    } else {
        f.check(
            uris.len() == 1 && uris[0].parse::<crate::names::SpiffeId>().is_ok() && names.len() == 1,
            "policy.uri-sans",
            || format!("a workload certificate carries exactly one SPIFFE ID and no other names: {names:?}"),
        );
    }
    for url in &urls {
        f.check(url.starts_with("http://") || url.starts_with("https://"), "policy.urls", || {
            format!("{url} is not http(s)")
        });
    }
    f.check(hsm::PublicKey::from_spki_der(tbs.subject_pki.raw).is_ok(), "policy.key", || {
        "subject key is not allowed".into()
    });

    if f.0.is_empty() { Ok(LintedTbs { tbs: draft_tbs.to_vec() }) } else { Err(LintFailure(f.0)) }
}

/// Lints a draft CRL made by `issuer`.
pub fn lint_crl(der: &[u8], draft_tbs: &[u8], issuer: &CertInfo) -> Result<LintedTbs, LintFailure> {
    let (_, crl) = CertificateRevocationList::from_der(der)
        .map_err(|e| LintFailure(vec![format!("crl.version: draft does not parse: {e}")]))?;
    let tbs = &crl.tbs_cert_list;
    if tbs.as_ref() != draft_tbs {
        return Err(LintFailure(vec!["crl.version: signed bytes differ from the encoded TBS".into()]));
    }
    let mut f = Findings(vec![]);
    f.check(tbs.version.map(|v| v.0) == Some(1), "crl.version", || "CRL is not v2".into());
    f.check(tbs.issuer.as_raw() == issuer.subject_raw.as_slice(), "crl.issuer-matches", || {
        format!("issuer {} is not the CA's subject", tbs.issuer)
    });
    f.check(tbs.signature == crl.signature_algorithm, "crl.signature-alg-match", || "algorithms differ".into());
    f.check(tbs.next_update.is_some_and(|n| ts(n) > ts(tbs.this_update)), "crl.next-update", || {
        "nextUpdate missing or not after thisUpdate".into()
    });
    let (mut number, mut aki) = (None, None);
    for ext in tbs.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::CRLNumber(_) => number = Some(ext.critical),
            ParsedExtension::AuthorityKeyIdentifier(a) => aki = a.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => {}
        }
    }
    f.check(number == Some(false), "crl.number", || "cRLNumber missing or critical".into());
    f.check(aki.is_some() && aki == issuer.ski, "crl.aki", || "authorityKeyIdentifier is not the issuer's SKI".into());
    f.check(issuer.crl_sign, "crl.issuer-crl-sign", || "issuer keyUsage lacks cRLSign".into());
    let mut serials = HashSet::new();
    for r in &tbs.revoked_certificates {
        f.check(serials.insert(r.raw_serial().to_vec()), "crl.unique-serials", || {
            format!("serial {} listed twice", r.raw_serial_as_string())
        });
    }
    if f.0.is_empty() { Ok(LintedTbs { tbs: draft_tbs.to_vec() }) } else { Err(LintFailure(f.0)) }
}

/// Lets unit tests elsewhere in the crate exercise the guard with an arbitrary TBS.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) fn accept(tbs: &[u8]) -> super::LintedTbs {
        super::LintedTbs { tbs: tbs.to_vec() }
    }
}
