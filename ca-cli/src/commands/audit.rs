//! `ca-cli audit verify`: walks the whole audit trail in the database and names the first
//! altered, reordered or missing record; checks every signed checkpoint.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::block_on;
use crate::cli::{AuditCmd, Output};
use crate::database::open_existing;
use crate::output::{self, AuditReport, emit};

pub fn run(cmd: AuditCmd, output: Output) -> Result<()> {
    match cmd {
        AuditCmd::Verify { database, audit_key } => {
            let report = block_on(verify(&database, audit_key.as_deref()))?;
            emit(output, &serde_json::to_value(&report)?, || output::audit_text(&report));
        }
    }
    Ok(())
}

async fn verify(database: &str, audit_key: Option<&Path>) -> Result<AuditReport> {
    let store = open_existing(database).await?;
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_after(after, 5000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        records.extend(page);
    }
    let checkpoints = store.checkpoints().await?;
    let (key, key_source) = match audit_key {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("--audit-key {}", p.display()))?;
            let der =
                pem::parse(&text).with_context(|| format!("--audit-key {}: not PEM", p.display()))?.into_contents();
            (Some(hsm::PublicKey::from_spki_der(&der)?), "the trusted key given with --audit-key")
        }
        None => {
            let ids: std::collections::BTreeSet<&str> = checkpoints.iter().map(|c| c.key_id.as_str()).collect();
            match ids.len() {
                0 => (None, "no checkpoints yet"),
                1 => {
                    let id = ids.into_iter().next().expect("one");
                    let pem_text =
                        store.audit_key_pem(id).await?.context("checkpoint key missing from the database")?;
                    let der = pem::parse(pem_text)?.into_contents();
                    (
                        Some(hsm::PublicKey::from_spki_der(&der)?),
                        "the key stored in the database (pass --audit-key to check against a trusted copy)",
                    )
                }
                _ => bail!("checkpoints are signed by several keys; pass the audit public key with --audit-key"),
            }
        }
    };
    store.close().await;
    let count = records.len();
    let report = ca_core::audit::verify_chain(records, &checkpoints, key.as_ref())?;
    // With a trusted key, an unsigned chain proves nothing: whoever can write the database
    // could have rewritten it and dropped the checkpoints.
    if audit_key.is_some() && count > 0 && checkpoints.is_empty() {
        bail!("the audit trail has {count} records but no signed checkpoint; it cannot be authenticated");
    }
    let last_signed = checkpoints.last().map_or(0, |c| c.seq);
    Ok(AuditReport {
        ok: true,
        records: report.records,
        head_seq: report.head_seq,
        head_hash: report.head_hash,
        checkpoints: report.checkpoints,
        checkpoint_key: key_source,
        unsigned_tail: report.head_seq - last_signed,
    })
}
