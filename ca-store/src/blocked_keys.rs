//! Keys revoked for key or CA compromise, by SPKI SHA-256: never certified again.

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, Tx};

/// A key that must never be certified again: revoked for key or CA compromise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct BlockedKey {
    /// SHA-256 (lowercase hex) of the SubjectPublicKeyInfo DER: [`spki_sha256`].
    pub spki_sha256: String,
    /// `key-compromise` or `ca-compromise`.
    pub reason: String,
    /// The certificate whose revocation blocked the key.
    pub source_serial: String,
    pub blocked_by: String,
    pub blocked_at: i64,
}

/// Revocation reasons that block the certificate's key for good.
pub const BLOCKING_REASONS: [&str; 2] = ["key-compromise", "ca-compromise"];

/// How `blocked_keys` names a key: SHA-256 of its SubjectPublicKeyInfo DER, lowercase hex.
pub fn spki_sha256(spki_der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(spki_der))
}

async fn blocked_key(c: Conn<'_>, spki_sha256: &str) -> sqlx::Result<Option<BlockedKey>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM blocked_keys WHERE spki_sha256 = $1").bind(spki_sha256).fetch_optional(c).await)
}

impl Store {
    pub async fn list_blocked_keys(&self) -> Result<Vec<BlockedKey>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM blocked_keys ORDER BY blocked_at, spki_sha256").fetch_all(p).await)?,
        )
    }

    /// The block on a key (by [`spki_sha256`]), if it is blocked.
    pub async fn blocked_key(&self, spki_sha256: &str) -> Result<Option<BlockedKey>> {
        Ok(blocked_key(self.reader().await?.conn(), spki_sha256).await?)
    }
}

impl Tx {
    /// Blocks a key. Returns false if it was already blocked (the first block is kept).
    pub async fn block_key(&mut self, k: &BlockedKey) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query(
            "INSERT INTO blocked_keys (spki_sha256, reason, source_serial, blocked_by, blocked_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (spki_sha256) DO NOTHING")
            .bind(&k.spki_sha256).bind(&k.reason).bind(&k.source_serial).bind(&k.blocked_by).bind(k.blocked_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// As [`Store::blocked_key`], under the write lock: a block that committed meanwhile is seen.
    pub async fn blocked_key(&mut self, spki_sha256: &str) -> Result<Option<BlockedKey>> {
        Ok(blocked_key(self.conn(), spki_sha256).await?)
    }
}
