//! Recorded ceremonies: one YAML file per ceremony, checked without touching the HSM, run with
//! a transcript appended next to the outputs.
//!
//! Relative paths in a ceremony file (inputs, outputs, `file:` keys) are relative to the
//! directory holding the ceremony file, so a ceremony directory can be moved as a whole.

mod plan;
mod report;
mod run;
mod spec;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::cert::read_file;
pub use crate::error::CeremonyError;
use crate::error::{CoreError, Result};
pub use report::{CheckReport, FileDigest, RunReport, TranscriptEntry, default_operator};
pub use spec::{
    CertOutputs, CrlCeremony, CrlOutputs, CrossSignCeremony, CsrCeremony, CsrOutputs, IntermediateCeremony, IssuerSpec,
    KeyCeremony, KeyOutputs, RevokedEntry, RootCeremony, Spec,
};

pub const TRANSCRIPT_FILE: &str = "ceremony-transcript.jsonl";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CeremonyType {
    Key,
    Root,
    Csr,
    Intermediate,
    CrossSign,
    Crl,
}

impl CeremonyType {
    const NAMES: [(&str, CeremonyType); 6] = [
        ("key", CeremonyType::Key),
        ("root", CeremonyType::Root),
        ("csr", CeremonyType::Csr),
        ("intermediate", CeremonyType::Intermediate),
        ("cross-sign", CeremonyType::CrossSign),
        ("crl", CeremonyType::Crl),
    ];
}

/// A parsed ceremony file whose fields all passed their syntax checks.
#[derive(Debug)]
pub struct Ceremony {
    pub file: PathBuf,
    pub sha256: String,
    pub kind: CeremonyType,
    pub spec: Spec,
    base: PathBuf,
}

// ---- loading ------------------------------------------------------------------------------

pub fn load(file: &Path) -> Result<Ceremony> {
    let bytes = read_file(file)?;
    // Absolute, so that transcripts name files unambiguously.
    let file = file.canonicalize().map_err(|e| CoreError::io(file, e))?;
    parse(&file, &bytes)
}

pub fn parse(file: &Path, bytes: &[u8]) -> Result<Ceremony> {
    let syntax = |msg: String| CeremonyError::Syntax { file: file.to_path_buf(), msg };
    let mut value: serde_yaml_ng::Value =
        serde_yaml_ng::from_slice(bytes).map_err(|e| syntax(format!("not valid YAML: {e}")))?;
    let map = value.as_mapping_mut().ok_or_else(|| syntax("a ceremony file is a YAML mapping".into()))?;
    let ty = map.remove("ceremony-type").ok_or_else(|| {
        syntax("missing field `ceremony-type` (key, root, csr, intermediate, cross-sign or crl)".into())
    })?;
    let ty_name = ty.as_str().unwrap_or_default().to_string();
    let kind = CeremonyType::NAMES.iter().find(|(n, _)| *n == ty_name).map(|(_, k)| *k).ok_or_else(|| {
        CeremonyError::Field {
            file: file.to_path_buf(),
            field: "ceremony-type".into(),
            msg: format!("unknown ceremony type {ty_name:?} (key, root, csr, intermediate, cross-sign or crl)"),
        }
    })?;
    fn de<T: serde::de::DeserializeOwned>(file: &Path, v: serde_yaml_ng::Value) -> Result<T, CeremonyError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.inner().to_string();
            CeremonyError::Field {
                file: file.to_path_buf(),
                field: if path == "." { "(top level)".into() } else { path },
                msg,
            }
        })
    }
    let spec = match kind {
        CeremonyType::Key => Spec::Key(de(file, value)?),
        CeremonyType::Root => Spec::Root(de(file, value)?),
        CeremonyType::Csr => Spec::Csr(de(file, value)?),
        CeremonyType::Intermediate => Spec::Intermediate(de(file, value)?),
        CeremonyType::CrossSign => Spec::CrossSign(de(file, value)?),
        CeremonyType::Crl => Spec::Crl(de(file, value)?),
    };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let c = Ceremony { file: file.to_path_buf(), sha256: hex::encode(sha2::Sha256::digest(bytes)), kind, spec, base };
    c.validate_fields()?;
    Ok(c)
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// `validity: 9000y` passed parsing, and `check` (and `run`) then panicked adding it to
    /// today's date ("resulting value is out of range"). Seen while writing the `ceremony`
    /// fuzz target, which crashes on this input; its first 10-minute run did not reach it.
    #[test]
    fn a_validity_past_year_9999_is_a_field_error() {
        let yaml = b"ceremony-type: cross-sign\nissuer:\n  certificate: root-2031.pem\n  key: \"file:root.key\"\n\
                     certificate: env.pem\nvalidity: 9000y\noutputs:\n  certificate: out.pem\n";
        match parse(Path::new("/nonexistent/cross-sign.yaml"), yaml) {
            Err(CoreError::Ceremony(CeremonyError::Field { field, .. })) => assert_eq!(field, "validity"),
            other => panic!("expected a validity field error, got {other:?}"),
        }
    }
}
