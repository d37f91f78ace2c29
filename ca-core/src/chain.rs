//! Path validation for what we issue: signatures, validity, CA constraints, path lengths and
//! URI name constraints, from a leaf (or CA) up to a trusted root.

use time::OffsetDateTime;

use crate::cert::CertInfo;
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
        if let Some(root) = roots
            .iter()
            .find(|r| r.subject_raw == current.issuer_raw && signed_by(current, r))
        {
            if root.der != current.der {
                path.push(root.clone());
            }
            break;
        }
        if path.len() > MAX_DEPTH {
            return Err(CoreError::Chain(format!(
                "no path to a trusted root within {MAX_DEPTH} certificates"
            )));
        }
        let next = intermediates
            .iter()
            .find(|c| {
                c.subject_raw == current.issuer_raw
                    && !path.iter().any(|p| p.der == c.der)
                    && signed_by(current, c)
            })
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

fn signed_by(child: &CertInfo, issuer: &CertInfo) -> bool {
    issuer
        .public_key()
        .is_ok_and(|k| child.verify_signed_by(&k).is_ok())
}

fn describe(c: &CertInfo) -> String {
    if c.subject.is_empty() {
        c.uris
            .first()
            .cloned()
            .unwrap_or_else(|| format!("serial {}", c.serial))
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
            return Err(CoreError::Chain(format!(
                "{} has an unsupported critical extension {oid}",
                describe(c)
            )));
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
        let below = path[1..depth]
            .iter()
            .filter(|c| !c.is_self_issued())
            .count() as u32;
        if let Some(limit) = ca.path_len {
            if below > limit {
                return Err(CoreError::Chain(format!(
                    "{} allows {limit} CA(s) beneath it, but the chain has {below}",
                    describe(ca)
                )));
            }
        }
        if let Some(permitted) = &ca.permitted_uris {
            for sub in &path[..depth] {
                for uri in &sub.uris {
                    let host = uri_host(uri);
                    if !permitted.iter().any(|p| host_matches(&host, p)) {
                        return Err(CoreError::Chain(format!(
                            "{uri} in {} violates the name constraints of {} (permitted: {})",
                            describe(sub),
                            describe(ca),
                            permitted.join(", ")
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

fn uri_host(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    rest.split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
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
        assert_eq!(
            uri_host("spiffe://prod.example.com/ns/a/sa/b"),
            "prod.example.com"
        );
        assert!(host_matches("prod.example.com", "prod.example.com"));
        assert!(!host_matches("staging.example.com", "prod.example.com"));
        assert!(host_matches("a.example.com", ".example.com"));
        assert!(!host_matches("example.com", ".example.com"));
        assert!(!host_matches("evilprod.example.com", "prod.example.com"));
    }
}
