//! One module per top-level subcommand, one function per subcommand: each takes its parsed
//! arguments, does the work and prints through `output`.

pub mod audit;
pub mod ceremony;
pub mod cluster;
pub mod crl;
pub mod csr;
pub mod database;
pub mod istio;
pub mod key;
pub mod quickstart;
pub mod request;
pub mod root;
pub mod rotation;
pub mod sign;
pub mod status;
pub mod verify;

use std::path::Path;

use anyhow::Result;
use ca_core::outputs::OutputSet;

/// Runs the async parts (REST calls, database reads) on a runtime of their own: the rest of
/// the CLI is synchronous.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

pub fn write_one(path: &Path, contents: impl Into<Vec<u8>>) -> Result<()> {
    let mut out = OutputSet::new();
    out.add(path, contents);
    out.commit()?;
    Ok(())
}

/// Refuses before any work (a key opened, a certificate signed) when an output cannot be
/// written.
pub fn preflight(paths: &[&Path]) -> Result<()> {
    ca_core::outputs::preflight(paths.iter().copied())?;
    Ok(())
}
