use std::path::PathBuf;

use time::OffsetDateTime;

/// Everything `ca-core` can refuse. Each variant's message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error(transparent)]
    Hsm(#[from] hsm::HsmError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("lint failed before signing: {0}")]
    Lint(LintFailure),
    #[error("{0}")]
    Parse(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: already exists; refusing to overwrite")]
    OutputExists(PathBuf),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("chain does not verify: {0}")]
    Chain(String),
    #[error(transparent)]
    Ceremony(#[from] CeremonyError),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("CSR is not valid PEM or DER: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify: the request was altered or not signed by its key")]
    BadSignature,
    #[error("CSR key rejected: {0}")]
    WeakKey(String),
    #[error("CSR subject: {0}")]
    Subject(String),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error(
        "requested notAfter {requested} is past the issuer's notAfter {issuer}: a certificate may not outlive its issuer"
    )]
    OutlivesIssuer { requested: String, issuer: String },
    #[error("issuer certificate is not a CA that may sign certificates: {0}")]
    IssuerNotCa(String),
    #[error("issuer path length constraint {issuer_path_len} does not allow a {profile} CA beneath it")]
    PathLen { profile: String, issuer_path_len: u32 },
    #[error("issuer key does not match the issuer certificate")]
    IssuerKeyMismatch,
    #[error("issuer certificate expired at {0}")]
    IssuerExpired(String),
    #[error("{0}")]
    Invalid(String),
}

/// A ceremony file that cannot be run as written. Lives here, beside `CoreError`, so that this
/// module depends on no other (re-exported as `ceremony::CeremonyError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CeremonyError {
    #[error("{file}: {msg}")]
    Syntax { file: PathBuf, msg: String },
    #[error("{file}: field `{field}`: {msg}")]
    Field { file: PathBuf, field: String, msg: String },
}

/// The rules that failed, each as `id: detail` (re-exported as `lint::LintFailure`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintFailure(pub Vec<String>);

impl std::fmt::Display for LintFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.into(), source }
    }
}

/// RFC 3339, to the second, as every message and output shows times.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
