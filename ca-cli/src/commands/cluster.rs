//! `ca-cli cluster renew` and `ca-cli cluster rollback`, over the renewal client in
//! `renewal`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::block_on;
use crate::cli::{ClusterCmd, Output};
use crate::output::{self, emit};
use crate::renewal;

pub fn run(cmd: ClusterCmd, output: Output) -> Result<()> {
    match cmd {
        ClusterCmd::Renew { server, cluster, state_dir, ca_root, enrolment_token_file, force } => {
            renew(server, cluster, state_dir, ca_root, enrolment_token_file, force, output)
        }
        ClusterCmd::Rollback { state_dir } => rollback(state_dir, output),
    }
}

fn renew(
    server: String,
    cluster: String,
    state_dir: PathBuf,
    ca_root: PathBuf,
    enrolment_token_file: Option<PathBuf>,
    force: bool,
    output: Output,
) -> Result<()> {
    // The token never goes on a command line: it comes from a file or the environment.
    let enrolment_token = match enrolment_token_file {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("--enrolment-token-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("CA_ENROLMENT_TOKEN").ok().filter(|t| !t.trim().is_empty()),
    };
    let args = renewal::RenewArgs {
        server,
        cluster,
        state_dir,
        ca_root,
        force,
        enrolment_token,
        renew_after: ca_core::validity::CLUSTER_RENEWAL,
    };
    let r = block_on(renewal::renew(&args))?;
    emit(output, &serde_json::to_value(&r)?, || output::renewal_text(&args.cluster, &args.state_dir, &r));
    Ok(())
}

fn rollback(state_dir: PathBuf, output: Output) -> Result<()> {
    let r = renewal::rollback(&state_dir)?;
    emit(output, &serde_json::to_value(&r)?, || output::rolled_back_text(&r));
    Ok(())
}
