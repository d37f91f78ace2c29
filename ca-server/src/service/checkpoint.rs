//! Signed audit checkpoints: the audit key signs "the chain up to record N ends in hash H".
//! With a trusted copy of the audit key, a verifier can tell a rewritten or truncated chain
//! from the real one, even if every hash in it was recomputed.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use ca_core::audit::{Checkpoint, checkpoint_message};
use ca_store::now_millis;

use crate::service::hsm_call::{HsmFailure, run};
use crate::service::state::AppState;

/// Signs a checkpoint over the current head when enough records or time have passed since
/// the last one (or when `force` is set and there is anything new). Returns the new
/// checkpoint's sequence number.
pub async fn maybe_checkpoint(state: &AppState, force: bool) -> Result<Option<i64>> {
    let Some(signer) = state.audit_signer.read().unwrap_or_else(|p| p.into_inner()).clone() else {
        return Ok(None);
    };
    // Decide and sign outside the write lock: a checkpoint for (seq, hash) stays true however
    // many records follow, so nothing needs to hold still while the audit key signs.
    let Some((head, hash)) = state.store.audit_head().await? else { return Ok(None) };
    let (last, last_time) = state.store.last_checkpoint().await?.unwrap_or((0, 0));
    if head <= last {
        return Ok(None);
    }
    let interval_ms = state.config.audit.checkpoint_interval.duration().whole_milliseconds() as i64;
    let due = force || head - last >= state.config.audit.checkpoint_every || now_millis() - last_time >= interval_ms;
    if !due {
        return Ok(None);
    }
    let msg = checkpoint_message(head, &hash);
    let key = signer.clone();
    let sig = match run(state.hsm_timeout(), move || key.sign_bytes(&msg)).await {
        Ok(sig) => sig,
        // As tokio's timeout error reads, so that the log line is what it was.
        Err(HsmFailure::TimedOut) => return Err(anyhow!("deadline has elapsed").context("audit key timed out")),
        Err(HsmFailure::Panicked(e)) => return Err(e.into()),
        Err(HsmFailure::Failed(e)) => return Err(anyhow::Error::new(e).context("signing an audit checkpoint")),
    };
    let public = signer.public_key();
    let cp = Checkpoint {
        seq: head,
        hash,
        time: now_millis(),
        key_id: hex::encode(public.fingerprint()),
        signature: hex::encode(sig),
        signature_algorithm: public.signature_oid().to_string(),
    };
    let mut tx = state.store.write().await?;
    // Another replica may have checkpointed this far meanwhile.
    if tx.last_checkpoint_seq().await? >= head {
        return Ok(None);
    }
    tx.insert_checkpoint(&cp, &public.to_pem()).await?;
    tx.commit().await?;
    Ok(Some(head))
}

pub fn open_audit_key(state_key: &str) -> Result<Arc<hsm::KeySigner>> {
    let r: hsm::KeyRef = state_key.parse().context("audit.key")?;
    Ok(Arc::new(hsm::open_signer(&r).with_context(|| format!("audit key {r}"))?))
}
