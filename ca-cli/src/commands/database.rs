//! `ca-cli database migrate`: the schema owner's half of the PostgreSQL role split (README,
//! "Audit trail"): migrations run here, once per upgrade, and ca-server runs as a role that may
//! only append to the audit tables.

use anyhow::{Context, Result};

use super::block_on;
use crate::cli::{DatabaseCmd, Output};
use crate::output::emit;

pub fn run(cmd: DatabaseCmd, output: Output) -> Result<()> {
    match cmd {
        DatabaseCmd::Migrate { database } => {
            let shown = ca_store::redact_url(&database);
            block_on(async {
                let store =
                    ca_store::Store::connect(&database, true).await.with_context(|| format!("migrating {shown}"))?;
                store.close().await;
                Ok(())
            })?;
            emit(output, &serde_json::json!({ "database": shown, "migrated": true }), || {
                format!("{shown}: migrations applied")
            });
        }
    }
    Ok(())
}
