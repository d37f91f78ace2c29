//! Parse, don't validate: SPIFFE trust domains and IDs.

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
}
