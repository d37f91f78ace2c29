//! Key custody. The only crate that touches private key material: everything else holds a
//! [`KeySigner`], which deliberately does not implement `rcgen::SigningKey`.
//!
//! Keys are named by [`KeyRef`]: `pkcs11:token=..;object=..?module-path=..&pin-source=env:VAR`
//! or `file:<path>`.

mod error;
mod file;
mod keyref;
mod pkcs11;
mod public;
mod secret;
pub mod softhsm;
pub mod tls;

use std::fmt;

pub use error::{HsmError, Result};
pub use file::write_new_private;
pub use keyref::{KeyRef, PinSource, Pkcs11Ref};
pub use pkcs11::{SessionStats, session_stats};
pub use public::{KeyAlgorithm, PublicKey, PublicKeyKind};
pub use secret::SecretKey;

use cryptoki::object::Attribute;
use rcgen::SigningKey;

/// Generates a key: inside the token for `pkcs11:` references (never extractable), or as a
/// new 0600 PKCS#8 file for `file:` references. Refuses to replace an existing key.
pub fn generate_key(key: &KeyRef, alg: KeyAlgorithm) -> Result<PublicKey> {
    match key {
        KeyRef::Pkcs11(r) => pkcs11::generate(r, alg),
        KeyRef::File(path) => file::generate(path, alg),
    }
}

/// Opens the key a reference names, ready to sign.
pub fn open_signer(key: &KeyRef) -> Result<KeySigner> {
    let backend = match key {
        KeyRef::Pkcs11(r) => Backend::Token(pkcs11::TokenKey::find(r)?),
        KeyRef::File(path) => {
            let (kp, public, alg) = file::load(path)?;
            Backend::File { kp, public, alg }
        }
    };
    Ok(KeySigner { key: key.clone(), backend })
}

/// Opens the key again from scratch: for a token, logs in anew instead of reusing sessions
/// that may have died with the device. Used to recover after an HSM outage.
pub fn reopen_signer(key: &KeyRef) -> Result<KeySigner> {
    if let KeyRef::Pkcs11(r) = key {
        pkcs11::Token::forget(r);
    }
    open_signer(key)
}

/// A `file:` key's PKCS#8 PEM, for handing a cluster key to istiod, which must hold it.
/// Token keys are never exported.
pub fn export_file_key(key: &KeyRef) -> Result<ExportedKey> {
    match key {
        KeyRef::Pkcs11(_) => {
            Err(HsmError::KeyFormat(format!("{key} is a PKCS#11 key and cannot be exported; istiod needs a file: key")))
        }
        KeyRef::File(path) => {
            let (kp, public, _) = file::load(path)?;
            Ok(ExportedKey { pem: kp.serialize_pem(), public })
        }
    }
}

/// Exported private key material. `Debug` never shows it.
pub struct ExportedKey {
    pem: String,
    public: PublicKey,
}

impl ExportedKey {
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn expose_pem(&self) -> &str {
        &self.pem
    }
}

impl fmt::Debug for ExportedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExportedKey({:?}, ...)", self.public)
    }
}

enum Backend {
    File { kp: rcgen::KeyPair, public: PublicKey, alg: KeyAlgorithm },
    Token(pkcs11::TokenKey),
}

/// A key that signs. For token keys, every signature is made inside the token.
///
/// It deliberately does not implement `rcgen::SigningKey`: certificates and CRLs are signed
/// only by `ca-core`'s lint-before-sign pipeline, which wraps this key in a guard. Raw
/// [`KeySigner::sign_bytes`] is for what is not a certificate: CSR self-signatures, audit
/// checkpoints, key self-tests.
pub struct KeySigner {
    key: KeyRef,
    backend: Backend,
}

impl fmt::Debug for KeySigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySigner").field("key", &self.key).field("public", self.public_key()).finish_non_exhaustive()
    }
}

impl KeySigner {
    pub fn key_ref(&self) -> &KeyRef {
        &self.key
    }

    pub fn public_key(&self) -> &PublicKey {
        match &self.backend {
            Backend::File { public, .. } => public,
            Backend::Token(k) => &k.public,
        }
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match &self.backend {
            Backend::File { alg, .. } => *alg,
            Backend::Token(k) => k.algorithm(),
        }
    }

    pub fn is_hardware(&self) -> bool {
        matches!(self.backend, Backend::Token(_))
    }

    /// The rcgen signature algorithm this key signs with.
    pub fn rcgen_algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm().signature_algorithm()
    }

    /// Signs `msg` and returns the signature as X.509 carries it.
    pub fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>> {
        match &self.backend {
            Backend::File { kp, .. } => {
                kp.sign(msg).map_err(|e| HsmError::KeyFormat(format!("signing with {}: {e}", self.key)))
            }
            Backend::Token(k) => k.sign(msg),
        }
    }

    /// Random bytes from the token's RNG for token keys, from the system RNG otherwise.
    pub fn random(&self, len: usize) -> Result<Vec<u8>> {
        match &self.backend {
            Backend::Token(k) => k.token.random(len),
            Backend::File { .. } => {
                let mut buf = vec![0u8; len];
                aws_lc_rs::rand::fill(&mut buf).map_err(|_| HsmError::KeyFormat("system RNG failed".into()))?;
                Ok(buf)
            }
        }
    }

    /// PKCS#11 attributes of a token key, for audits of key custody.
    pub fn token_attributes(&self) -> Result<TokenKeyInfo> {
        let Backend::Token(k) = &self.backend else {
            return Err(HsmError::NotPkcs11(self.key.to_string()));
        };
        let mut info =
            TokenKeyInfo { token: k.token.label().to_string(), object: k.object.clone(), ..Default::default() };
        for a in k.attributes()? {
            match a {
                Attribute::Token(v) => info.token_object = v,
                Attribute::Private(v) => info.private = v,
                Attribute::Sensitive(v) => info.sensitive = v,
                Attribute::Extractable(v) => info.extractable = v,
                Attribute::AlwaysSensitive(v) => info.always_sensitive = v,
                Attribute::NeverExtractable(v) => info.never_extractable = v,
                Attribute::Sign(v) => info.sign = v,
                Attribute::Id(v) => info.id = hex::encode(v),
                _ => {}
            }
        }
        Ok(info)
    }
}

/// Custody attributes of a private key in a token, as the token reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenKeyInfo {
    pub token: String,
    pub object: String,
    pub id: String,
    pub token_object: bool,
    pub private: bool,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    pub sign: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = KeyRef::file(&path);
        let public = generate_key(&key, KeyAlgorithm::EcdsaP256).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = std::fs::read(&path).unwrap();
        let err = generate_key(&key, KeyAlgorithm::EcdsaP256).unwrap_err();
        assert!(matches!(err, HsmError::FileExists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);

        let signer = open_signer(&key).unwrap();
        assert_eq!(signer.public_key(), &public);
        let sig = signer.sign_bytes(b"msg").unwrap();
        public.verify(public.signature_oid(), b"msg", &sig).unwrap();
        assert!(!format!("{signer:?}").contains("PRIVATE"));
    }
}
