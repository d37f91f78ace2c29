//! `ca-cli istio cacerts`: istiod's plug-in CA files and a `cacerts` Secret manifest.

use anyhow::Result;

use crate::cli::{IstioCmd, Output};
use crate::output::{self, emit};

pub fn run(cmd: IstioCmd, output: Output) -> Result<()> {
    let IstioCmd::Cacerts { cert, key, chain, root, out_dir, namespace } = cmd;
    let key = key.parse()?;
    let report = ca_core::cacerts::write_cacerts(
        &ca_core::cacerts::CacertsInput { cert: &cert, key: &key, chain: &chain, root: &root, namespace: &namespace },
        &out_dir,
    )?;
    emit(output, &serde_json::to_value(&report)?, || output::cacerts_text(&report));
    Ok(())
}
