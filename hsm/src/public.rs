//! Key algorithms, public keys and signature verification in software.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as ParsedKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::error::{HsmError, Result};

/// The key types we generate and sign with. Nothing weaker is ever produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Rsa3072,
    Rsa4096,
}

impl KeyAlgorithm {
    pub const ALL: [KeyAlgorithm; 4] = [Self::EcdsaP256, Self::EcdsaP384, Self::Rsa3072, Self::Rsa4096];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// The X.509 signature algorithm used when this key signs: the hash matches the curve for
    /// ECDSA; RSA uses SHA-256 with PKCS#1 v1.5.
    pub fn signature_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa3072 | Self::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = HsmError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| {
            HsmError::UnsupportedKey(format!(
                "unknown algorithm {s:?} (expected ecdsa-p256, ecdsa-p384, rsa-3072 or rsa-4096)"
            ))
        })
    }
}

/// What a public key is, as far as policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicKeyKind {
    EcP256,
    EcP384,
    Rsa { bits: usize },
}

impl fmt::Display for PublicKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyKind::EcP256 => f.write_str("ECDSA P-256"),
            PublicKeyKind::EcP384 => f.write_str("ECDSA P-384"),
            PublicKeyKind::Rsa { bits } => write!(f, "RSA-{bits}"),
        }
    }
}

pub(crate) const OID_EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
pub(crate) const OID_P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
pub(crate) const OID_P384: &[u64] = &[1, 3, 132, 0, 34];
const OID_RSA_ENCRYPTION: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];

/// A public key we accept: P-256, P-384 or RSA of at least 2048 bits.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    kind: PublicKeyKind,
    spki_der: Vec<u8>,
    /// The subjectPublicKey bits: the uncompressed point, or the PKCS#1 RSAPublicKey.
    raw: Vec<u8>,
    parsed: ParsedOnce,
}

/// The key as aws-lc holds it for its own signature algorithm, made on first use and shared
/// by clones: an issuer key verifies every certificate it signs, and decoding and checking the
/// point each time cost about a twentieth of a verification. Not part of the key's identity.
#[derive(Clone, Default)]
struct ParsedOnce(std::sync::Arc<std::sync::OnceLock<Option<signature::ParsedPublicKey>>>);

impl PartialEq for ParsedOnce {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ParsedOnce {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, sha256:{})", self.kind, hex::encode(&self.fingerprint()[..8]))
    }
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo and applies the key policy: only P-256, P-384 and
    /// RSA >= 2048 pass.
    pub fn from_spki_der(der: &[u8]) -> Result<Self> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| HsmError::KeyFormat(format!("malformed SubjectPublicKeyInfo: {e}")))?;
        if !rest.is_empty() {
            return Err(HsmError::KeyFormat("trailing bytes after SubjectPublicKeyInfo".into()));
        }
        let alg = spki.algorithm.algorithm.to_string();
        let kind = match spki.parsed() {
            Ok(ParsedKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_string())
                    .unwrap_or_default();
                match curve.as_str() {
                    "1.2.840.10045.3.1.7" => PublicKeyKind::EcP256,
                    "1.3.132.0.34" => PublicKeyKind::EcP384,
                    other => {
                        return Err(HsmError::UnsupportedKey(format!(
                            "elliptic curve {other} is not allowed (only P-256 and P-384)"
                        )));
                    }
                }
            }
            Ok(ParsedKey::RSA(rsa)) => {
                let bits = rsa.key_size();
                if bits < 2048 {
                    return Err(HsmError::UnsupportedKey(format!("RSA-{bits} is too weak (at least 2048 bits)")));
                }
                PublicKeyKind::Rsa { bits }
            }
            _ => {
                return Err(HsmError::UnsupportedKey(format!(
                    "public key algorithm {alg} is not allowed (only ECDSA P-256/P-384 and RSA >= 2048)"
                )));
            }
        };
        Ok(PublicKey {
            kind,
            spki_der: der.to_vec(),
            raw: spki.subject_public_key.data.to_vec(),
            parsed: ParsedOnce::default(),
        })
    }

    pub(crate) fn from_ec_point(kind: PublicKeyKind, point: Vec<u8>) -> Result<Self> {
        let curve = match kind {
            PublicKeyKind::EcP256 => OID_P256,
            PublicKeyKind::EcP384 => OID_P384,
            PublicKeyKind::Rsa { .. } => unreachable!("RSA is not a curve"),
        };
        let der = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_sequence(|w| {
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(OID_EC_PUBLIC_KEY));
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(curve));
                });
                w.next().write_bitvec_bytes(&point, point.len() * 8);
            })
        });
        Self::from_spki_der(&der)
    }

    pub(crate) fn from_rsa_parts(modulus: &[u8], exponent: &[u8]) -> Result<Self> {
        let rsa_key = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_bigint_bytes(modulus, true);
                w.next().write_bigint_bytes(exponent, true);
            })
        });
        let der = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_sequence(|w| {
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(OID_RSA_ENCRYPTION));
                    w.next().write_null();
                });
                w.next().write_bitvec_bytes(&rsa_key, rsa_key.len() * 8);
            })
        });
        Self::from_spki_der(&der)
    }

    pub fn kind(&self) -> PublicKeyKind {
        self.kind
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The subjectPublicKey BIT STRING contents (what rcgen calls `der_bytes`).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// SHA-256 of the SubjectPublicKeyInfo.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(&self.spki_der).into()
    }

    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PUBLIC KEY", self.spki_der.clone()))
    }

    /// The algorithm we would generate for a key like this one (RSA sizes round to the
    /// nearest we support); its signature algorithm is the one this key signs with.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.kind {
            PublicKeyKind::EcP256 => KeyAlgorithm::EcdsaP256,
            PublicKeyKind::EcP384 => KeyAlgorithm::EcdsaP384,
            PublicKeyKind::Rsa { bits } if bits > 3072 => KeyAlgorithm::Rsa4096,
            PublicKeyKind::Rsa { .. } => KeyAlgorithm::Rsa3072,
        }
    }

    /// Verifies an X.509-style signature (DER ECDSA-Sig-Value or PKCS#1 v1.5) made with the
    /// algorithm named by `signature_oid`.
    pub fn verify(&self, signature_oid: &str, message: &[u8], sig: &[u8]) -> Result<()> {
        let alg: &'static dyn VerificationAlgorithm = match (self.kind, signature_oid) {
            (PublicKeyKind::EcP256, "1.2.840.10045.4.3.2") => &signature::ECDSA_P256_SHA256_ASN1,
            (PublicKeyKind::EcP256, "1.2.840.10045.4.3.3") => &signature::ECDSA_P256_SHA384_ASN1,
            (PublicKeyKind::EcP384, "1.2.840.10045.4.3.2") => &signature::ECDSA_P384_SHA256_ASN1,
            (PublicKeyKind::EcP384, "1.2.840.10045.4.3.3") => &signature::ECDSA_P384_SHA384_ASN1,
            (PublicKeyKind::Rsa { .. }, "1.2.840.113549.1.1.11") => &signature::RSA_PKCS1_2048_8192_SHA256,
            (PublicKeyKind::Rsa { .. }, "1.2.840.113549.1.1.12") => &signature::RSA_PKCS1_2048_8192_SHA384,
            (PublicKeyKind::Rsa { .. }, "1.2.840.113549.1.1.13") => &signature::RSA_PKCS1_2048_8192_SHA512,
            (kind, oid) => {
                return Err(HsmError::BadSignature(format!("signature algorithm {oid} does not fit a {kind} key")));
            }
        };
        let bad = || HsmError::BadSignature(format!("signature does not verify with the {} key", self.kind));
        if signature_oid == self.signature_oid() {
            let parsed = self.parsed.0.get_or_init(|| signature::ParsedPublicKey::new(alg, &self.raw).ok());
            if let Some(key) = parsed {
                return key.verify_sig(message, sig).map_err(|_| bad());
            }
        }
        UnparsedPublicKey::new(alg, &self.raw).verify(message, sig).map_err(|_| bad())
    }

    /// The OID of the signature algorithm this key's signer uses.
    pub fn signature_oid(&self) -> &'static str {
        match self.kind {
            PublicKeyKind::EcP256 => "1.2.840.10045.4.3.2",
            PublicKeyKind::EcP384 => "1.2.840.10045.4.3.3",
            PublicKeyKind::Rsa { .. } => "1.2.840.113549.1.1.11",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{KeyPair, PublicKeyData};

    #[test]
    fn spki_round_trip_and_verify() {
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384] {
            let kp = KeyPair::generate_for(alg.signature_algorithm()).unwrap();
            let pk = PublicKey::from_spki_der(&kp.subject_public_key_info()).unwrap();
            assert_eq!(pk.algorithm(), alg);
            assert_eq!(pk.raw(), kp.der_bytes());
            let sig = rcgen::SigningKey::sign(&kp, b"hello").unwrap();
            pk.verify(pk.signature_oid(), b"hello", &sig).unwrap();
            assert!(pk.verify(pk.signature_oid(), b"hellO", &sig).is_err());
            // Rebuilding the SPKI from the bare point gives the same bytes.
            let again = PublicKey::from_ec_point(pk.kind(), pk.raw().to_vec()).unwrap();
            assert_eq!(again.spki_der(), pk.spki_der());
        }
    }

    #[test]
    fn the_parsed_key_is_shared_by_clones_and_still_checks() {
        let (a, b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let pk = PublicKey::from_spki_der(&a.subject_public_key_info()).unwrap();
        let sig_a = rcgen::SigningKey::sign(&a, b"msg").unwrap();
        let sig_b = rcgen::SigningKey::sign(&b, b"msg").unwrap();
        pk.verify(pk.signature_oid(), b"msg", &sig_a).unwrap();
        let clone = pk.clone();
        assert!(clone.parsed.0.get().is_some_and(Option::is_some), "the clone shares the parsed key");
        clone.verify(clone.signature_oid(), b"msg", &sig_a).unwrap();
        assert!(clone.verify(clone.signature_oid(), b"msg", &sig_b).is_err(), "another key's signature");
        assert!(clone.verify(clone.signature_oid(), b"msg", b"\x30\x00").is_err(), "garbage");
        // Another algorithm than the key's own goes the unparsed way, and is checked too.
        assert!(clone.verify("1.2.840.10045.4.3.3", b"msg", &sig_a).is_err());
    }

    #[test]
    fn rejects_unknown_algorithm_names() {
        assert!("ecdsa-p521".parse::<KeyAlgorithm>().is_err());
        assert_eq!("rsa-4096".parse::<KeyAlgorithm>().unwrap(), KeyAlgorithm::Rsa4096);
    }
}
