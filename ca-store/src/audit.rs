//! The audit trail: hash-chained records, signed checkpoints and the keys that signed them.

use ca_core::audit::{AuditRecord, Checkpoint, GENESIS, record_hash};

use crate::{Conn, Result, Store, StoreError, Tx, now_millis};

#[derive(sqlx::FromRow)]
struct AuditRow {
    seq: i64,
    time: i64,
    actor: String,
    action: String,
    subject: String,
    details: String,
    prev_hash: String,
    hash: String,
}

impl From<AuditRow> for AuditRecord {
    fn from(r: AuditRow) -> Self {
        AuditRecord {
            seq: r.seq,
            time: r.time,
            actor: r.actor,
            action: r.action,
            subject: r.subject,
            details: r.details,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    seq: i64,
    hash: String,
    time: i64,
    key_id: String,
    signature: String,
    signature_algorithm: String,
}

/// Something that happened, to be appended to the audit trail.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: serde_json::Value,
}

impl AuditEvent {
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        subject: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        AuditEvent { actor: actor.into(), action: action.into(), subject: subject.into(), details }
    }
}

async fn audit_head(c: Conn<'_>) -> sqlx::Result<Option<(i64, String)>> {
    on_conn!(c, c => sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetch_optional(c).await)
}

impl Store {
    /// Appends one audit record in its own transaction.
    pub async fn audit(&self, event: AuditEvent) -> Result<AuditRecord> {
        let mut tx = self.write().await?;
        let r = tx.audit(event).await?;
        tx.commit().await?;
        Ok(r)
    }

    /// Sequence number and time of the newest checkpoint.
    pub async fn last_checkpoint(&self) -> Result<Option<(i64, i64)>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT seq, time FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetch_optional(p).await)?,
        )
    }

    /// Audit records with `seq > after`, oldest first.
    pub async fn audit_after(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>> {
        let rows: Vec<AuditRow> = on_pool!(self, p => sqlx::query_as("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(after).bind(limit).fetch_all(p).await)?;
        Ok(rows.into_iter().map(AuditRecord::from).collect())
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let rows: Vec<CheckpointRow> =
            on_pool!(self, p => sqlx::query_as("SELECT * FROM audit_checkpoints ORDER BY seq").fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|r| Checkpoint {
                seq: r.seq,
                hash: r.hash,
                time: r.time,
                key_id: r.key_id,
                signature: r.signature,
                signature_algorithm: r.signature_algorithm,
            })
            .collect())
    }

    pub async fn audit_key_pem(&self, key_id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = on_pool!(self, p => sqlx::query_as("SELECT spki_pem FROM audit_keys WHERE key_id = $1").bind(key_id).fetch_optional(p).await)?;
        Ok(row.map(|r| r.0))
    }

    pub async fn audit_head(&self) -> Result<Option<(i64, String)>> {
        Ok(audit_head(self.reader().await?.conn()).await?)
    }
}

impl Tx {
    pub async fn last_checkpoint_seq(&mut self) -> Result<i64> {
        let r: Option<(i64,)> = on_tx!(self, c => sqlx::query_as("SELECT seq FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetch_optional(c).await)?;
        Ok(r.map_or(0, |r| r.0))
    }

    pub async fn insert_checkpoint(&mut self, cp: &Checkpoint, spki_pem: &str) -> Result<()> {
        on_tx!(self, c => sqlx::query("INSERT INTO audit_keys (key_id, spki_pem) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING")
            .bind(&cp.key_id).bind(spki_pem).execute(c).await.map(|r| r.rows_affected()))?;
        on_tx!(self, c => sqlx::query("INSERT INTO audit_checkpoints (seq, hash, time, key_id, signature, signature_algorithm) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(cp.seq).bind(&cp.hash).bind(cp.time).bind(&cp.key_id).bind(&cp.signature).bind(&cp.signature_algorithm)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Appends an audit record linked to the current head. Runs inside the serialised write
    /// transaction, so no other writer can fork the chain.
    pub async fn audit(&mut self, e: AuditEvent) -> Result<AuditRecord> {
        let head = audit_head(self.conn()).await?;
        let (seq, prev_hash) = match head {
            Some((s, h)) => (s + 1, h),
            None => (1, GENESIS.to_string()),
        };
        let time = now_millis();
        let details = serde_json::to_string(&e.details).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        let hash = record_hash(seq, time, &e.actor, &e.action, &e.subject, &details, &prev_hash);
        on_tx!(self, c => sqlx::query("INSERT INTO audit_log (seq, time, actor, action, subject, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(seq).bind(time).bind(&e.actor).bind(&e.action).bind(&e.subject).bind(&details).bind(&prev_hash).bind(&hash)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(AuditRecord { seq, time, actor: e.actor, action: e.action, subject: e.subject, details, prev_hash, hash })
    }
}
