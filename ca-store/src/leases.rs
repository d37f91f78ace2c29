//! Leases: which replica runs a periodic job.

use crate::{Result, Tx};

impl Tx {
    /// Takes or renews the lease `name` for `holder` until `until`. True when `holder` holds it.
    pub async fn try_lease(&mut self, name: &str, holder: &str, now: i64, until: i64) -> Result<bool> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4")
            .bind(name).bind(holder).bind(until).bind(now).execute(c).await.map(|r| r.rows_affected()))?;
        let row: Option<(String,)> = on_tx!(self, c => sqlx::query_as("SELECT holder FROM leases WHERE name = $1").bind(name).fetch_optional(c).await)?;
        Ok(row.is_some_and(|r| r.0 == holder))
    }
}
