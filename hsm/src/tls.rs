//! Keys for TLS endpoints, handed to rustls as signers so that the private key never leaves
//! this crate: the server's REST listener, the gRPC serving certificate, and a cluster's
//! client certificate for renewal. rustls signs handshakes in software, so these are `file:`
//! keys or keys generated in memory; a `pkcs11:` key is refused as it is for export.

use std::sync::Arc;

use rcgen::PublicKeyData;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey};

use crate::error::{HsmError, Result};
use crate::keyref::KeyRef;
use crate::public::{KeyAlgorithm, PublicKey};

pub(crate) fn signer_of(pkcs8: Vec<u8>, what: &str) -> Result<Arc<dyn SigningKey>> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| HsmError::KeyFormat(format!("{what}: not a key TLS can sign with: {e}")))
}

/// The key `key` names, as a TLS signer.
pub fn signing_key(key: &KeyRef) -> Result<Arc<dyn SigningKey>> {
    match key {
        KeyRef::Pkcs11(_) => Err(HsmError::KeyFormat(format!(
            "{key} is a PKCS#11 key; TLS endpoints sign in software and need a file: key"
        ))),
        KeyRef::File(path) => {
            let (kp, _, _) = crate::file::load(path)?;
            signer_of(kp.serialize_der(), &key.to_string())
        }
    }
}

/// The certificate chain with the key `key` names, checked to belong together.
pub fn certified_key(key: &KeyRef, chain: Vec<CertificateDer<'static>>) -> Result<Arc<CertifiedKey>> {
    let certified = CertifiedKey::new(chain, signing_key(key)?);
    certified.keys_match().map_err(|e| HsmError::KeyFormat(format!("{key} is not the key of its certificate: {e}")))?;
    Ok(Arc::new(certified))
}

/// A key generated in memory for a certificate that lives only as long as the process (the
/// gRPC serving certificate): it is never written anywhere, and only the public half and a
/// signer come out.
pub fn ephemeral_key(alg: KeyAlgorithm) -> Result<(PublicKey, Arc<dyn SigningKey>)> {
    let kp = crate::file::generate_keypair(alg)?;
    let public = PublicKey::from_spki_der(&kp.subject_public_key_info())?;
    Ok((public, signer_of(kp.serialize_der(), "a generated key")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_key_signs_for_its_certificate_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.key");
        let key = KeyRef::file(&path);
        crate::generate_key(&key, KeyAlgorithm::EcdsaP256).unwrap();
        let kp = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let own = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap().self_signed(&kp).unwrap();
        assert!(certified_key(&key, vec![own.der().clone()]).is_ok());

        let other = rcgen::KeyPair::generate().unwrap();
        let foreign = rcgen::CertificateParams::new(vec!["b.test".into()]).unwrap().self_signed(&other).unwrap();
        let err = certified_key(&key, vec![foreign.der().clone()]).err().unwrap().to_string();
        assert!(err.contains("is not the key of its certificate"), "{err}");
    }

    #[test]
    fn token_keys_are_refused_and_ephemeral_keys_sign() {
        let token: KeyRef = "pkcs11:token=t;object=o?pin-source=env:NO_SUCH_PIN".parse().unwrap();
        assert!(signing_key(&token).err().unwrap().to_string().contains("need a file: key"));
        let (public, signer) = ephemeral_key(KeyAlgorithm::EcdsaP256).unwrap();
        assert_eq!(public.algorithm(), KeyAlgorithm::EcdsaP256);
        assert!(signer.choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256]).is_some());
    }
}
