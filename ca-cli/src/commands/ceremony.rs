//! `ca-cli ceremony check` and `ca-cli ceremony run`.

use std::path::PathBuf;

use anyhow::Result;

use crate::cli::{CeremonyCmd, Output};
use crate::output::{self, emit};

pub fn run(cmd: CeremonyCmd, output: Output) -> Result<()> {
    match cmd {
        CeremonyCmd::Check { file } => check(file, output),
        CeremonyCmd::Run { file, operator } => run_file(file, operator, output),
    }
}

fn check(file: PathBuf, output: Output) -> Result<()> {
    let c = ca_core::ceremony::load(&file)?;
    let report = c.check()?;
    emit(output, &serde_json::to_value(&report)?, || output::ceremony_check_text(&file, &report));
    Ok(())
}

fn run_file(file: PathBuf, operator: Option<String>, output: Output) -> Result<()> {
    let c = ca_core::ceremony::load(&file)?;
    let operator = operator.unwrap_or_else(ca_core::ceremony::default_operator);
    let report = c.run(&operator)?;
    emit(output, &serde_json::to_value(&report)?, || output::ceremony_run_text(&file, &report));
    Ok(())
}
