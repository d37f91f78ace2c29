use std::path::PathBuf;

/// Everything that can go wrong in key custody.
///
/// Messages name the token, object or file involved so that an operator can act on them, and
/// never carry a PIN or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    #[error("invalid key reference: {0}")]
    InvalidKeyRef(String),
    #[error(
        "PKCS#11 module not found at {path} (install SoftHSM2 with `apt-get install softhsm2`, or set module-path / PKCS11_MODULE)"
    )]
    ModuleNotFound { path: PathBuf },
    #[error("no PKCS#11 module given: add module-path=<path> to the key reference or set PKCS11_MODULE")]
    ModuleNotConfigured,
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad { path: PathBuf, reason: String },
    #[error("no token labelled {label:?} in PKCS#11 module {module}")]
    TokenNotFound { label: String, module: PathBuf },
    #[error("wrong PIN for token {token:?}")]
    WrongPin { token: String },
    #[error("the user PIN of token {token:?} is locked; an officer must reset it")]
    PinLocked { token: String },
    #[error("cannot read the PIN: {0}")]
    PinSource(String),
    #[error("no private key labelled {object:?} in token {token:?}")]
    KeyNotFound { token: String, object: String },
    #[error("more than one private key labelled {object:?} in token {token:?}; labels must be unique")]
    AmbiguousKey { token: String, object: String },
    #[error("a key labelled {object:?} already exists in token {token:?}; refusing to create another")]
    LabelExists { token: String, object: String },
    #[error("token {token:?} does not support mechanism {mechanism}")]
    MechanismUnsupported { token: String, mechanism: String },
    #[error("{path}: already exists; refusing to overwrite")]
    FileExists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    KeyFormat(String),
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("signature verification failed: {0}")]
    BadSignature(String),
    #[error("self-test of new key {0} failed: the token's signature does not verify")]
    SelfTest(String),
    #[error("PKCS#11 {function} failed on token {token:?}: {rv}")]
    Device { token: String, function: String, rv: String },
    #[error("this operation needs a PKCS#11 key, but {0} is a file key")]
    NotPkcs11(String),
}

pub type Result<T, E = HsmError> = std::result::Result<T, E>;

impl HsmError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HsmError::Io { path: path.into(), source }
    }
}
