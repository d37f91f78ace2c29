//! `file:` keys: PKCS#8 PEM on disk, for development and for cluster keys that istiod must hold.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{KeyPair, PublicKeyData, RsaKeySize};

use crate::error::{HsmError, Result};
use crate::public::{KeyAlgorithm, PublicKey};

/// Generates a software key pair of the given algorithm.
pub(crate) fn generate_keypair(alg: KeyAlgorithm) -> Result<KeyPair> {
    let sig = alg.signature_algorithm();
    let kp = match alg {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => KeyPair::generate_for(sig),
        KeyAlgorithm::Rsa3072 => KeyPair::generate_rsa_for(sig, RsaKeySize::_3072),
        KeyAlgorithm::Rsa4096 => KeyPair::generate_rsa_for(sig, RsaKeySize::_4096),
    };
    kp.map_err(|e| HsmError::KeyFormat(format!("generating a {alg} key: {e}")))
}

/// Writes `contents` to a new file with mode 0600. Never replaces an existing file, so a key
/// can never be silently overwritten.
pub fn write_new_private(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| match e
        .kind()
    {
        std::io::ErrorKind::AlreadyExists => HsmError::FileExists { path: path.to_path_buf() },
        _ => HsmError::io(path, e),
    })?;
    let res = f.write_all(contents).and_then(|_| f.sync_all());
    if let Err(e) = res {
        // Leave nothing half-written behind.
        let _ = std::fs::remove_file(path);
        return Err(HsmError::io(path, e));
    }
    Ok(())
}

pub(crate) fn generate(path: &Path, alg: KeyAlgorithm) -> Result<PublicKey> {
    if path.exists() {
        return Err(HsmError::FileExists { path: path.to_path_buf() });
    }
    let kp = generate_keypair(alg)?;
    write_new_private(path, kp.serialize_pem().as_bytes())?;
    PublicKey::from_spki_der(&kp.subject_public_key_info())
}

pub(crate) fn load(path: &Path) -> Result<(KeyPair, PublicKey, KeyAlgorithm)> {
    let pem = std::fs::read_to_string(path).map_err(|e| HsmError::io(path, e))?;
    parse_pem(&pem, &path.display().to_string())
}

/// A PKCS#8 PEM private key; `what` names it in errors (never its contents).
pub(crate) fn parse_pem(pem: &str, what: &str) -> Result<(KeyPair, PublicKey, KeyAlgorithm)> {
    let parsed = pem::parse(pem).map_err(|_| HsmError::KeyFormat(format!("{what}: not a PEM file")))?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(HsmError::KeyFormat(format!(
            "{what}: expected a PKCS#8 \"PRIVATE KEY\", found {:?}",
            parsed.tag()
        )));
    }
    // The key type is only known once parsed; try each algorithm we support.
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384, KeyAlgorithm::Rsa3072] {
        if let Ok(kp) = KeyPair::from_pkcs8_der_and_sign_algo(&parsed.contents().into(), alg.signature_algorithm()) {
            let public = PublicKey::from_spki_der(&kp.subject_public_key_info())?;
            return Ok((kp, public.clone(), public.algorithm()));
        }
    }
    Err(HsmError::KeyFormat(format!("{what}: not an ECDSA P-256/P-384 or RSA PKCS#8 private key")))
}
