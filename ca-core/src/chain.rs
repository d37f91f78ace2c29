//! Path validation for what we issue: signatures, validity, CA constraints, path lengths and
//! URI name constraints, from a leaf (or CA) up to a trusted root.

use time::OffsetDateTime;

use crate::cert::{CertInfo, ConstraintName, NameConstraints};
use crate::error::{CoreError, Result, fmt_time};

/// Longest chain we follow; our hierarchy has four tiers.
const MAX_DEPTH: usize = 8;

/// Finds and validates a path from `leaf` to one of `roots`, using `intermediates` as needed.
/// Returns the path, leaf first and root last.
pub fn verify_chain(
    leaf: &CertInfo,
    intermediates: &[CertInfo],
    roots: &[CertInfo],
    at: OffsetDateTime,
) -> Result<Vec<CertInfo>> {
    let mut path = vec![leaf.clone()];
    loop {
        let current = path.last().expect("non-empty");
        // A trusted root that is the certificate itself ends the path (verifying a root alone).
        if path.len() == 1 && roots.iter().any(|r| r.der == current.der) {
            break;
        }
        if let Some(root) = roots.iter().find(|r| current.issued_by(r)) {
            if root.der != current.der {
                path.push(root.clone());
            }
            break;
        }
        if path.len() > MAX_DEPTH {
            return Err(CoreError::Chain(format!("no path to a trusted root within {MAX_DEPTH} certificates")));
        }
        let next = intermediates
            .iter()
            .find(|c| !path.iter().any(|p| p.der == c.der) && current.issued_by(c))
            .ok_or_else(|| {
                CoreError::Chain(format!(
                    "no trusted issuer found for {} (issuer {})",
                    describe(current),
                    current.issuer
                ))
            })?;
        path.push(next.clone());
    }
    check_path(&path, at)?;
    Ok(path)
}

fn describe(c: &CertInfo) -> String {
    if c.subject.is_empty() {
        c.uris.first().cloned().unwrap_or_else(|| format!("serial {}", c.serial))
    } else {
        c.subject.clone()
    }
}

fn check_path(path: &[CertInfo], at: OffsetDateTime) -> Result<()> {
    for c in path {
        if at < c.not_before || at > c.not_after {
            return Err(CoreError::Chain(format!(
                "{} is not valid at {} (valid {} to {})",
                describe(c),
                fmt_time(at),
                fmt_time(c.not_before),
                fmt_time(c.not_after)
            )));
        }
        if let Some(oid) = c.unknown_critical.first() {
            return Err(CoreError::Chain(format!("{} has an unsupported critical extension {oid}", describe(c))));
        }
    }
    // Every certificate above the first signs: it must be a CA allowed to.
    for (depth, ca) in path.iter().enumerate().skip(1) {
        if !ca.is_ca || !ca.key_cert_sign {
            return Err(CoreError::Chain(format!(
                "{} signs certificates but is not a CA with keyCertSign",
                describe(ca)
            )));
        }
        // CAs strictly between this one and the leaf (self-issued ones do not count).
        let below = path[1..depth].iter().filter(|c| !c.is_self_issued()).count() as u32;
        if let Some(limit) = ca.path_len
            && below > limit
        {
            return Err(CoreError::Chain(format!(
                "{} allows {limit} CA(s) beneath it, but the chain has {below}",
                describe(ca)
            )));
        }
        if let Some(nc) = &ca.name_constraints {
            check_name_constraints(ca, nc, &path[..depth])?;
        }
    }
    Ok(())
}

/// RFC 5280 4.2.1.10 for the name types we implement (URI hosts and DNS names). A CA that
/// constrains any other name type makes the chain fail: ignoring a constraint would be worse
/// than refusing it.
fn check_name_constraints(ca: &CertInfo, nc: &NameConstraints, below: &[CertInfo]) -> Result<()> {
    if let Some(ConstraintName::Unsupported(kind)) =
        nc.permitted.iter().chain(&nc.excluded).find(|c| matches!(c, ConstraintName::Unsupported(_)))
    {
        return Err(CoreError::Chain(format!(
            "{} carries {kind} name constraints, which are not supported",
            describe(ca)
        )));
    }
    let uri_permitted: Vec<&str> = nc
        .permitted
        .iter()
        .filter_map(|c| if let ConstraintName::Uri(u) = c { Some(u.as_str()) } else { None })
        .collect();
    let uri_excluded: Vec<&str> = nc
        .excluded
        .iter()
        .filter_map(|c| if let ConstraintName::Uri(u) = c { Some(u.as_str()) } else { None })
        .collect();
    let dns_permitted: Vec<&str> = nc
        .permitted
        .iter()
        .filter_map(|c| if let ConstraintName::Dns(d) = c { Some(d.as_str()) } else { None })
        .collect();
    let dns_excluded: Vec<&str> = nc
        .excluded
        .iter()
        .filter_map(|c| if let ConstraintName::Dns(d) = c { Some(d.as_str()) } else { None })
        .collect();
    let violation = |name: &str, sub: &CertInfo, why: &str| {
        CoreError::Chain(format!(
            "{name} in {} violates the name constraints of {} ({why})",
            describe(sub),
            describe(ca)
        ))
    };
    for sub in below {
        for uri in &sub.uris {
            let host = uri_host(uri);
            if !uri_permitted.is_empty() && !uri_permitted.iter().any(|p| host_matches(&host, p)) {
                return Err(violation(uri, sub, &format!("permitted: {}", uri_permitted.join(", "))));
            }
            if let Some(x) = uri_excluded.iter().find(|x| host_matches(&host, x)) {
                return Err(violation(uri, sub, &format!("excluded: {x}")));
            }
        }
        for dns in &sub.dns_names {
            let dns = dns.to_ascii_lowercase();
            if !dns_permitted.is_empty() && !dns_permitted.iter().any(|p| dns_matches(&dns, p)) {
                return Err(violation(&dns, sub, &format!("permitted: {}", dns_permitted.join(", "))));
            }
            if let Some(x) = dns_excluded.iter().find(|x| dns_matches(&dns, x)) {
                return Err(violation(&dns, sub, &format!("excluded: {x}")));
            }
        }
    }
    Ok(())
}

/// RFC 5280 4.2.1.10: a DNS constraint matches the name itself and any name below it.
fn dns_matches(name: &str, constraint: &str) -> bool {
    let c = constraint.trim_start_matches('.');
    name == c || name.ends_with(&format!(".{c}"))
}

fn uri_host(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("").to_ascii_lowercase()
}

/// RFC 5280 4.2.1.10: a URI constraint names a host exactly, or with a leading '.' any host
/// beneath a domain.
pub(crate) fn host_matches(host: &str, constraint: &str) -> bool {
    let c = constraint.to_ascii_lowercase();
    match c.strip_prefix('.') {
        Some(domain) => host.ends_with(&format!(".{domain}")),
        None => host == c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_constraint_matching() {
        assert_eq!(uri_host("spiffe://prod.example.com/ns/a/sa/b"), "prod.example.com");
        assert!(host_matches("prod.example.com", "prod.example.com"));
        assert!(!host_matches("staging.example.com", "prod.example.com"));
        assert!(host_matches("a.example.com", ".example.com"));
        assert!(!host_matches("example.com", ".example.com"));
        assert!(!host_matches("evilprod.example.com", "prod.example.com"));
        assert!(dns_matches("a.example.com", "example.com"));
        assert!(dns_matches("example.com", "example.com"));
        assert!(!dns_matches("badexample.com", "example.com"));
    }
}
