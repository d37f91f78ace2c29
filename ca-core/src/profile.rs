//! Profiles: the only place that decides what goes into a certificate. A CSR contributes its
//! verified public key (and, for CAs, its subject); everything else comes from here.

use std::fmt;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use yasna::Tag;

use crate::error::PolicyError;
use crate::names::{SpiffeId, TrustDomain};

/// Which kind of certificate is being made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileKind {
    Root,
    Environment,
    Cluster,
    Workload,
    CrossSign,
    /// TLS server certificate for the CA's own endpoints.
    Server,
    /// TLS client certificate of a cluster's in-cluster agent (external-CA mode): issued
    /// online only, so no ceremony file or `ca-cli sign` can name it.
    #[serde(skip_deserializing)]
    Agent,
}

impl ProfileKind {
    pub fn is_ca(self) -> bool {
        !matches!(self, ProfileKind::Workload | ProfileKind::Server | ProfileKind::Agent)
    }

    /// The fixed pathLen of intermediate profiles (root and cross-sign take theirs from the request).
    pub fn fixed_path_len(self) -> Option<u32> {
        match self {
            ProfileKind::Environment => Some(1),
            ProfileKind::Cluster => Some(0),
            _ => None,
        }
    }
}

impl fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProfileKind::Root => "root",
            ProfileKind::Environment => "environment",
            ProfileKind::Cluster => "cluster",
            ProfileKind::Workload => "workload",
            ProfileKind::CrossSign => "cross-sign",
            ProfileKind::Server => "server",
            ProfileKind::Agent => "agent",
        })
    }
}

impl std::str::FromStr for ProfileKind {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "root" => Ok(Self::Root),
            "environment" => Ok(Self::Environment),
            "cluster" => Ok(Self::Cluster),
            "workload" => Ok(Self::Workload),
            "cross-sign" => Ok(Self::CrossSign),
            "server" => Ok(Self::Server),
            _ => Err(PolicyError::Invalid(format!(
                "unknown profile {s:?} (expected root, environment, cluster, workload, cross-sign or server)"
            ))),
        }
    }
}

/// What a certificate should say, before policy turns it into extensions.
#[derive(Clone, Debug)]
pub struct CertRequest {
    pub profile: ProfileKind,
    pub subject: DistinguishedName,
    pub subject_key: hsm::PublicKey,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Root and cross-sign only; intermediates have theirs fixed by the profile.
    pub path_len: Option<u32>,
    pub trust_domains: Vec<TrustDomain>,
    pub name_constraints: bool,
    pub crl_urls: Vec<String>,
    pub ca_issuer_urls: Vec<String>,
    /// Workload only.
    pub spiffe_id: Option<SpiffeId>,
    /// Server only: DNS names and IP addresses.
    pub server_names: Vec<String>,
    /// Cross-sign only: the original's subject key identifier, kept as is.
    pub subject_key_id: Option<Vec<u8>>,
    /// Cross-sign only: the original's subject DER, which the result must repeat exactly.
    pub exact_subject: Option<Vec<u8>>,
}

impl CertRequest {
    /// A request with every optional part empty: set the fields the profile needs.
    pub fn new(
        profile: ProfileKind,
        subject: DistinguishedName,
        subject_key: hsm::PublicKey,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Self {
        CertRequest {
            profile,
            subject,
            subject_key,
            not_before,
            not_after,
            path_len: None,
            trust_domains: vec![],
            name_constraints: false,
            crl_urls: vec![],
            ca_issuer_urls: vec![],
            spiffe_id: None,
            server_names: vec![],
            subject_key_id: None,
            exact_subject: None,
        }
    }

    /// The pathLen this request's certificate will carry.
    pub fn effective_path_len(&self) -> Option<u32> {
        self.profile.fixed_path_len().or(self.path_len)
    }

    /// Checks what can be checked without an issuer.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.not_after <= self.not_before {
            return Err(PolicyError::Invalid("validity must be positive".into()));
        }
        match self.profile {
            ProfileKind::Root | ProfileKind::CrossSign if self.path_len.is_none() => {
                return Err(PolicyError::Invalid(format!("the {} profile needs a path length", self.profile)));
            }
            ProfileKind::Environment | ProfileKind::Cluster if self.trust_domains.is_empty() => {
                return Err(PolicyError::Invalid(format!(
                    "the {} profile needs at least one trust domain",
                    self.profile
                )));
            }
            ProfileKind::Workload if self.spiffe_id.is_none() => {
                return Err(PolicyError::Invalid("the workload profile needs a SPIFFE ID".into()));
            }
            _ => {}
        }
        if self.name_constraints && self.trust_domains.is_empty() {
            return Err(PolicyError::Invalid("name constraints need at least one trust domain".into()));
        }
        if self.name_constraints && !self.profile.is_ca() {
            return Err(PolicyError::Invalid("name constraints belong on CA certificates only".into()));
        }
        for url in self.crl_urls.iter().chain(&self.ca_issuer_urls) {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(char::is_whitespace) {
                return Err(PolicyError::Invalid(format!("{url:?} is not an http:// or https:// URL")));
            }
        }
        Ok(())
    }

    /// Builds the rcgen parameters. Every extension is decided here.
    pub fn to_params(&self, serial: SerialNumber) -> Result<CertificateParams, PolicyError> {
        self.validate()?;
        let mut p = CertificateParams::default();
        p.serial_number = Some(serial);
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        p.distinguished_name = self.subject.clone();
        p.use_authority_key_identifier_extension = self.profile != ProfileKind::Root;
        if let Some(ski) = &self.subject_key_id {
            p.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(ski.clone());
        }
        let uri = |s: String| {
            Ia5String::try_from(s.clone())
                .map(SanType::URI)
                .map_err(|_| PolicyError::Invalid(format!("{s:?} is not an IA5 string")))
        };
        if self.profile.is_ca() {
            let path_len = self.effective_path_len().expect("validated") as u8;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            // The trust domains a CA serves are recorded as SPIFFE IDs of the trust domain.
            p.subject_alt_names = self.trust_domains.iter().map(|td| uri(td.spiffe_uri())).collect::<Result<_, _>>()?;
            if self.name_constraints {
                p.custom_extensions.push(uri_name_constraints(&self.trust_domains));
            }
        } else if self.profile == ProfileKind::Server {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.subject_alt_names = self
                .server_names
                .iter()
                .map(|n| match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => Ok(SanType::IpAddress(ip)),
                    Err(_) => Ia5String::try_from(n.clone())
                        .map(SanType::DnsName)
                        .map_err(|_| PolicyError::Invalid(format!("{n:?} is not a DNS name"))),
                })
                .collect::<Result<_, _>>()?;
        } else if self.profile == ProfileKind::Agent {
            // A client credential and nothing else: it names the cluster in its subject only,
            // so that no SPIFFE-checking peer could take it for a workload.
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        } else {
            p.is_ca = IsCa::ExplicitNoCa;
            p.distinguished_name = DistinguishedName::new();
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let id = self.spiffe_id.as_ref().expect("validated");
            p.subject_alt_names = vec![uri(id.to_string())?];
        }
        if !self.crl_urls.is_empty() {
            p.crl_distribution_points = vec![CrlDistributionPoint { uris: self.crl_urls.clone() }];
        }
        if !self.ca_issuer_urls.is_empty() {
            p.custom_extensions.push(authority_info_access(&self.ca_issuer_urls));
        }
        Ok(p)
    }

    /// What every issuance path of the online server asks for, built in one place each: a
    /// cluster intermediate (`CN=<cluster> Cluster CA, OU=<environment>`, one trust domain).
    pub fn cluster_intermediate(
        cluster: &str,
        environment: &str,
        trust_domain: TrustDomain,
        subject_key: hsm::PublicKey,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Self {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, format!("{cluster} Cluster CA"));
        subject.push(DnType::OrganizationalUnitName, environment.to_string());
        CertRequest {
            trust_domains: vec![trust_domain],
            ..Self::new(ProfileKind::Cluster, subject, subject_key, not_before, not_after)
        }
    }

    /// A workload leaf naming exactly one SPIFFE ID, with an empty subject as Istio's own CA
    /// issues them.
    pub fn workload(
        spiffe_id: SpiffeId,
        subject_key: hsm::PublicKey,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Self {
        CertRequest {
            spiffe_id: Some(spiffe_id),
            ..Self::new(ProfileKind::Workload, DistinguishedName::new(), subject_key, not_before, not_after)
        }
    }

    /// A TLS server certificate: `CN=<common_name>` and the DNS names.
    pub fn server(
        common_name: &str,
        names: Vec<String>,
        subject_key: hsm::PublicKey,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Self {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, common_name.to_string());
        CertRequest {
            server_names: names,
            ..Self::new(ProfileKind::Server, subject, subject_key, not_before, not_after)
        }
    }

    /// The client certificate of a cluster's agent: `CN=ca-agent <cluster>`, clientAuth only,
    /// no names.
    pub fn agent_client(
        cluster: &str,
        subject_key: hsm::PublicKey,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Self {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, format!("ca-agent {cluster}"));
        Self::new(ProfileKind::Agent, subject, subject_key, not_before, not_after)
    }
}

pub(crate) const OID_NAME_CONSTRAINTS: &[u64] = &[2, 5, 29, 30];
pub(crate) const OID_AIA: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];
const OID_CA_ISSUERS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 2];

/// `permitted;URI:<td>` for each trust domain. rcgen has no URI subtree, so the extension is
/// encoded here: NameConstraints ::= SEQUENCE { permittedSubtrees [0] GeneralSubtrees }.
fn uri_name_constraints(tds: &[TrustDomain]) -> CustomExtension {
    let der = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_tagged_implicit(Tag::context(0), |w| {
                w.write_sequence(|w| {
                    for td in tds {
                        w.next().write_sequence(|w| {
                            w.next().write_tagged_implicit(Tag::context(6), |w| w.write_ia5_string(td.as_str()));
                        });
                    }
                });
            });
        })
    });
    let mut ext = CustomExtension::from_oid_content(OID_NAME_CONSTRAINTS, der);
    // RFC 5280 4.2.1.10: conforming CAs MUST mark this extension as critical.
    ext.set_criticality(true);
    ext
}

/// Authority Information Access with caIssuers URLs.
fn authority_info_access(urls: &[String]) -> CustomExtension {
    let der = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for url in urls {
                w.next().write_sequence(|w| {
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(OID_CA_ISSUERS));
                    w.next().write_tagged_implicit(Tag::context(6), |w| w.write_ia5_string(url));
                });
            }
        })
    });
    CustomExtension::from_oid_content(OID_AIA, der)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a throwaway public key for the requests
mod tests {
    use super::*;

    fn key() -> hsm::PublicKey {
        let kp = rcgen::KeyPair::generate().unwrap();
        hsm::PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap()
    }

    fn cn(req: &CertRequest) -> Vec<String> {
        req.subject
            .iter()
            .map(|(t, v)| match v {
                rcgen::DnValue::Utf8String(s) => format!("{t:?}={s}"),
                other => format!("{t:?}={other:?}"),
            })
            .collect()
    }

    /// The three online paths' requests carry exactly what each profile needs.
    #[test]
    fn each_issuance_path_builds_its_profile() {
        let (nb, na) = (OffsetDateTime::now_utc(), OffsetDateTime::now_utc() + time::Duration::days(1));
        let c = CertRequest::cluster_intermediate("east", "prod", "prod.example.com".parse().unwrap(), key(), nb, na);
        assert_eq!(c.profile, ProfileKind::Cluster);
        assert_eq!(cn(&c), ["CommonName=east Cluster CA", "OrganizationalUnitName=prod"]);
        assert_eq!(c.trust_domains.len(), 1);
        assert!(c.spiffe_id.is_none() && c.server_names.is_empty());

        let id: SpiffeId = "spiffe://prod.example.com/ns/default/sa/web".parse().unwrap();
        let w = CertRequest::workload(id.clone(), key(), nb, na);
        assert_eq!(w.profile, ProfileKind::Workload);
        assert!(cn(&w).is_empty(), "workload subjects are empty");
        assert_eq!(w.spiffe_id, Some(id));

        let s = CertRequest::server("ca-server", vec!["ca.example.com".into()], key(), nb, na);
        assert_eq!(s.profile, ProfileKind::Server);
        assert_eq!(cn(&s), ["CommonName=ca-server"]);
        assert_eq!(s.server_names, ["ca.example.com"]);
        assert!(s.trust_domains.is_empty() && s.spiffe_id.is_none());

        let a = CertRequest::agent_client("east", key(), nb, na);
        assert_eq!(a.profile, ProfileKind::Agent);
        assert_eq!(cn(&a), ["CommonName=ca-agent east"]);
        assert!(a.trust_domains.is_empty() && a.spiffe_id.is_none() && a.server_names.is_empty());
        let p = a.to_params(SerialNumber::from(vec![0x42; 17])).unwrap();
        assert_eq!(p.is_ca, IsCa::ExplicitNoCa);
        assert_eq!(p.key_usages, [KeyUsagePurpose::DigitalSignature]);
        assert_eq!(p.extended_key_usages, [ExtendedKeyUsagePurpose::ClientAuth]);
        assert!(p.subject_alt_names.is_empty(), "an agent certificate names no SPIFFE ID");
    }

    /// The agent profile is online only: a ceremony file cannot ask for it.
    #[test]
    fn agent_profile_is_not_read_from_files() {
        assert!(serde_json::from_str::<ProfileKind>("\"agent\"").is_err());
        assert!("agent".parse::<ProfileKind>().is_err());
        assert_eq!(ProfileKind::Agent.to_string(), "agent");
    }
}
