//! Keys whose home is a Kubernetes Secret: istiod's `ca-key.pem` in plug-in mode, istiod's
//! `tls.key`, and ca-agent's own client key. The Secret is where they live, so exporting them
//! is the design; they are still made and parsed only here, and come out as a PEM string that
//! `Debug` never shows, a [`KeySigner`] for CSRs and a rustls signer for mTLS.

use std::fmt;
use std::sync::Arc;

use rcgen::PublicKeyData;

use crate::error::Result;
use crate::keyref::KeyRef;
use crate::public::{KeyAlgorithm, PublicKey};
use crate::{Backend, KeySigner};

/// A private key held in memory on its way to or from a Secret.
pub struct SecretKey {
    signer: KeySigner,
    pem: String,
    tls: Arc<dyn rustls::sign::SigningKey>,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?}, ...)", self.signer.public_key())
    }
}

impl SecretKey {
    /// A fresh key, never written anywhere by this crate.
    pub fn generate(alg: KeyAlgorithm) -> Result<SecretKey> {
        let kp = crate::file::generate_keypair(alg)?;
        let public = PublicKey::from_spki_der(&kp.subject_public_key_info())?;
        Self::from_keypair(kp, public, alg, "a generated key")
    }

    /// The key in a Secret's PKCS#8 PEM; `what` names the Secret and key in errors.
    pub fn from_pem(pem: &str, what: &str) -> Result<SecretKey> {
        let (kp, public, alg) = crate::file::parse_pem(pem, what)?;
        Self::from_keypair(kp, public, alg, what)
    }

    fn from_keypair(kp: rcgen::KeyPair, public: PublicKey, alg: KeyAlgorithm, what: &str) -> Result<SecretKey> {
        let pem = kp.serialize_pem();
        let tls = crate::tls::signer_of(kp.serialize_der(), what)?;
        // The reference only names the key in `Debug` and errors: there is no file behind it.
        let key = KeyRef::File(format!("(in memory: {what})").into());
        Ok(SecretKey { signer: KeySigner { key, backend: Backend::File { kp, public, alg } }, pem, tls })
    }

    pub fn public_key(&self) -> &PublicKey {
        self.signer.public_key()
    }

    /// Signs CSRs (`ca_core::csr::create_csr`).
    pub fn signer(&self) -> &KeySigner {
        &self.signer
    }

    /// The signer rustls needs to present a certificate for this key.
    pub fn tls_signer(&self) -> Arc<dyn rustls::sign::SigningKey> {
        self.tls.clone()
    }

    /// The PKCS#8 PEM, for the Secret that keeps it.
    pub fn expose_pem(&self) -> &str {
        &self.pem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_key_round_trips_and_hides_itself() {
        let k = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let again = SecretKey::from_pem(k.expose_pem(), "test").unwrap();
        assert_eq!(k.public_key().spki_der(), again.public_key().spki_der());
        assert!(!format!("{k:?}").contains("PRIVATE"));
        let err = SecretKey::from_pem("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n", "ns/x")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ns/x") && err.contains("PRIVATE KEY"), "{err}");
    }
}
