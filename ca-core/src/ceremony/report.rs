//! What `check` and `run` report, and the transcript they append to.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::CeremonyType;
use crate::error::{CoreError, Result};

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub ceremony_type: CeremonyType,
    pub file: PathBuf,
    pub sha256: String,
    pub keys: Vec<String>,
    pub inputs: Vec<PathBuf>,
    pub outputs: Vec<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    #[serde(flatten)]
    pub entry: TranscriptEntry,
    pub transcript: PathBuf,
    #[serde(skip)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// One JSON line of a ceremony transcript.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TranscriptEntry {
    pub time: String,
    pub operator: String,
    pub ceremony_type: CeremonyType,
    pub ceremony_file: String,
    pub ceremony_sha256: String,
    /// Key references as written (they name a PIN source, never a PIN).
    pub keys: Vec<String>,
    pub inputs: Vec<FileDigest>,
    pub outputs: Vec<FileDigest>,
    pub result: String,
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub sha256: Option<String>,
}

impl FileDigest {
    pub(super) fn of(p: &Path) -> Self {
        FileDigest {
            path: p.display().to_string(),
            sha256: std::fs::read(p).ok().map(|b| hex::encode(sha2::Sha256::digest(b))),
        }
    }
}

pub(super) fn append_transcript(path: &Path, entry: &TranscriptEntry) -> Result<()> {
    let mut line = serde_json::to_string(entry).map_err(|e| CoreError::Parse(e.to_string()))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| CoreError::io(path, e))?;
    f.write_all(line.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| CoreError::io(path, e))
}

/// The operator recorded in transcripts: `CEREMONY_OPERATOR`, else the login name.
pub fn default_operator() -> String {
    std::env::var("CEREMONY_OPERATOR").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "unknown".into())
}
