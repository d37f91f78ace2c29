//! `ca-cli quickstart`: a throwaway hierarchy (root, environment, cluster) and an istiod bundle.

use anyhow::Result;

use crate::cli::{Output, QuickstartArgs};
use crate::output::{self, emit};

pub fn run(a: QuickstartArgs, output: Output) -> Result<()> {
    let opts = ca_core::quickstart::Options {
        dir: a.dir,
        trust_domain: a.trust_domain,
        environment: a.environment,
        cluster: a.cluster,
        operator: ca_core::ceremony::default_operator(),
        file_keys: a.file_keys,
        with_cluster: true,
    };
    if opts.file_keys || hsm::softhsm::find_module().is_none() {
        eprintln!(
            "WARNING: SoftHSM2 is not in use: root and environment keys will be PLAIN FILES under {}.\n\
             WARNING: this is for trying things out only. Install SoftHSM2 (apt-get install softhsm2) to keep keys in a token.",
            opts.dir.display()
        );
    }
    let r = ca_core::quickstart::run(&opts)?;
    emit(output, &serde_json::to_value(&r)?, || output::quickstart_text(&r));
    Ok(())
}
