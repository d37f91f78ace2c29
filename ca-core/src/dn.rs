//! Subjects as operators write them: `CN=Example Root CA,O=Example,C=DE`.

use rcgen::{DistinguishedName, DnType};

use crate::error::PolicyError;

/// Parses a comma-separated subject, most significant attribute last as in OpenSSL's
/// `-subj`-free one-line form; the order given is the order encoded. `\,` escapes a comma.
pub fn parse_subject(s: &str) -> Result<DistinguishedName, PolicyError> {
    let mut dn = DistinguishedName::new();
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => {
                    return Err(PolicyError::Invalid(format!("subject {s:?} ends with a lone backslash")));
                }
            },
            ',' => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    let mut has_cn = false;
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| PolicyError::Invalid(format!("subject attribute {:?} has no '='", part.trim())))?;
        let (k, v) = (k.trim(), v.trim());
        if v.is_empty() {
            return Err(PolicyError::Invalid(format!("subject attribute {k} is empty")));
        }
        let ty = match k.to_ascii_uppercase().as_str() {
            "CN" => {
                has_cn = true;
                DnType::CommonName
            }
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "C" => {
                if v.len() != 2 || !v.chars().all(|c| c.is_ascii_uppercase()) {
                    return Err(PolicyError::Invalid(format!("C={v}: country must be two capital letters")));
                }
                DnType::CountryName
            }
            "ST" => DnType::StateOrProvinceName,
            "L" => DnType::LocalityName,
            other => {
                return Err(PolicyError::Invalid(format!(
                    "subject attribute {other:?} is not supported (CN, O, OU, C, ST, L)"
                )));
            }
        };
        // rcgen keeps one value per attribute type: a repeated type would silently vanish.
        if dn.get(&ty).is_some() {
            return Err(PolicyError::Invalid(format!("subject attribute {k} appears twice")));
        }
        if v.chars().count() > 64 {
            return Err(PolicyError::Invalid(format!("subject attribute {k} is longer than 64 characters")));
        }
        dn.push(ty, v);
    }
    if !has_cn {
        return Err(PolicyError::Invalid(format!("subject {s:?} needs a CN")));
    }
    Ok(dn)
}

/// Converts a parsed name into rcgen's form, keeping each attribute's string type so that the
/// re-encoded name stays byte-identical (a cross-signed subject must match the original).
pub fn from_x509_name(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, PolicyError> {
    use rcgen::DnValue;
    use rcgen::string::{Ia5String, PrintableString};
    use x509_parser::der_parser::asn1_rs::Tag;

    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        if rdn.iter().count() != 1 {
            return Err(PolicyError::Invalid("multi-valued RDNs are not supported".into()));
        }
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let ty = match oid.as_str() {
                "2.5.4.3" => DnType::CommonName,
                "2.5.4.10" => DnType::OrganizationName,
                "2.5.4.11" => DnType::OrganizationalUnitName,
                "2.5.4.6" => DnType::CountryName,
                "2.5.4.8" => DnType::StateOrProvinceName,
                "2.5.4.7" => DnType::LocalityName,
                _ => DnType::CustomDnType(
                    attr.attr_type()
                        .iter()
                        .ok_or_else(|| PolicyError::Invalid(format!("name attribute {oid} is too large")))?
                        .collect(),
                ),
            };
            let any = attr.attr_value();
            let text = attr
                .as_str()
                .map_err(|_| PolicyError::Invalid(format!("name attribute {oid} is not a string")))?
                .to_string();
            let bad = |_| PolicyError::Invalid(format!("name attribute {oid} has invalid characters"));
            let value = match any.tag() {
                Tag::PrintableString => DnValue::PrintableString(PrintableString::try_from(text).map_err(bad)?),
                Tag::Ia5String => DnValue::Ia5String(Ia5String::try_from(text).map_err(bad)?),
                Tag::Utf8String => DnValue::Utf8String(text),
                _ => {
                    return Err(PolicyError::Invalid(format!("name attribute {oid} uses an unsupported string type")));
                }
            };
            // rcgen keeps one value per attribute type; dropping one would change the name.
            if dn.get(&ty).is_some() {
                return Err(PolicyError::Invalid(format!(
                    "name attribute {oid} appears more than once, which is not supported"
                )));
            }
            dn.push(ty, value);
        }
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_order_with_escapes() {
        let dn = parse_subject("CN=Example\\, Inc Root,O=Example,C=DE").unwrap();
        let items: Vec<_> = dn.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(items, vec![DnType::CommonName, DnType::OrganizationName, DnType::CountryName]);
        assert!(matches!(dn.get(&DnType::CommonName), Some(rcgen::DnValue::Utf8String(s)) if s == "Example, Inc Root"));
    }

    #[test]
    fn rejects_bad_subjects() {
        for bad in
            ["", "O=NoCommonName", "CN=", "CN=x,EMAIL=a@b", "CN=x,C=Germany", "CN=x,OU=a,OU=b", "CN=x\\", "garbage"]
        {
            assert!(parse_subject(bad).is_err(), "{bad:?}");
        }
    }
}
