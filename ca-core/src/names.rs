//! Names: SPIFFE trust domains and IDs (parse, don't validate), and the checks for the plain
//! names the API takes (clusters, Kubernetes namespaces and service accounts, DNS names).

use std::fmt;
use std::str::FromStr;

use crate::error::PolicyError;

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-` and `_`, as the SPIFFE ID spec
/// allows, and usable as a URI name-constraint host.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`: the SPIFFE ID of the trust domain itself.
    pub fn spiffe_uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
            && !s.starts_with('.')
            && !s.ends_with('.')
            && !s.contains("..");
        if ok {
            Ok(TrustDomain(s.to_string()))
        } else {
            Err(PolicyError::Invalid(format!(
                "invalid trust domain {s:?}: use lowercase letters, digits, '.', '-' and '_' (e.g. prod.example.com)"
            )))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `spiffe://<trust-domain>/<path>` with a non-empty path, as workload identities carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Istio form `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn istio(td: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, PolicyError> {
        format!("spiffe://{td}/ns/{namespace}/sa/{service_account}").parse()
    }
}

impl FromStr for SpiffeId {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let bad = |why: &str| PolicyError::Invalid(format!("invalid SPIFFE ID {s:?}: {why}"));
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("needs a path after the trust domain"))?;
        let trust_domain = td.parse::<TrustDomain>().map_err(|_| bad("bad trust domain"))?;
        if path.is_empty() || path.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
            return Err(bad("path segments must be non-empty and not . or .."));
        }
        if !path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')) {
            return Err(bad("path may hold only letters, digits, '.', '-', '_' and '/'"));
        }
        Ok(SpiffeId { trust_domain, path: path.to_string() })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

/// A DNS-1123 label: 1 to 63 lowercase letters, digits and `-`, neither first nor last. What
/// Kubernetes allows for a namespace, and what a cluster name is here.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A cluster name: a DNS-1123 label, so that it can name Kubernetes objects and DNS labels.
pub fn is_cluster_name(s: &str) -> bool {
    is_dns1123_label(s)
}

/// A Kubernetes object name as it may appear in a SPIFFE path (namespace, service account):
/// up to 253 lowercase letters, digits, `-` and `.`, neither first nor last.
pub fn is_k8s_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// A lowercase DNS name without wildcards: at most 253 bytes of dot-separated labels, each 1
/// to 63 lowercase letters, digits and `-`.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains() {
        assert!("prod.example.com".parse::<TrustDomain>().is_ok());
        assert!("cluster.local".parse::<TrustDomain>().is_ok());
        for bad in ["", "Prod.example.com", "spiffe://x", "a..b", ".a", "a/b", "a b"] {
            assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spiffe_ids() {
        let id: SpiffeId = "spiffe://prod.example.com/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "prod.example.com");
        assert_eq!(id.to_string(), "spiffe://prod.example.com/ns/default/sa/web");
        for bad in
            ["spiffe://td", "spiffe://td/", "spiffe://td/a//b", "https://td/a", "spiffe://td/../x", "spiffe://td/a?b"]
        {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_names_and_namespaces_are_dns1123_labels() {
        for ok in ["a", "prod-eu-1", "0", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok) && is_cluster_name(ok), "{ok:?}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "a b", "é", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad) && !is_cluster_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn kubernetes_object_names() {
        for ok in ["default", "istio-system", "my.sa", "a", &"a".repeat(253)] {
            assert!(is_k8s_object_name(ok), "{ok:?}");
        }
        for bad in ["", "-a", "a-", ".a", "a.", "A", "a_b", "a/b", "a b", &"a".repeat(254)] {
            assert!(!is_k8s_object_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["istiod.istio-system.svc", "a", "ca-server.example.com", &"a".repeat(63)] {
            assert!(is_dns_name(ok), "{ok:?}");
        }
        for bad in ["", "*.example.com", "a..b", ".a", "a.", "A.example.com", "a_b.com", &"a".repeat(64)] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62)].join(".");
        assert_eq!(long.len(), 254);
        assert!(!is_dns_name(&long));
        assert!(is_dns_name(&long[1..]));
    }
}
