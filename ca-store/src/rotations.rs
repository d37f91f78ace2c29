//! Staged rotations of roots and intermediates.

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, Tx};

/// A staged rotation. `spec` is `ca_core::rotation`-shaped JSON owned by the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct RotationRecord {
    pub id: String,
    /// `root`, `environment` or `cluster`.
    pub kind: String,
    /// The old root's SHA-256, the environment or the cluster.
    pub target: String,
    pub stage: String,
    pub spec: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

async fn get_rotation(c: Conn<'_>, id: &str) -> sqlx::Result<Option<RotationRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM rotations WHERE id = $1").bind(id).fetch_optional(c).await)
}

impl Store {
    /// Rotations, newest first; only those not done or aborted when `active_only`.
    pub async fn list_rotations(&self, active_only: bool) -> Result<Vec<RotationRecord>> {
        Ok(on_pool!(self, c => sqlx::query_as(
            "SELECT * FROM rotations WHERE ($1 = 0 OR stage NOT IN ('done', 'aborted')) ORDER BY created_at DESC, id")
            .bind(i64::from(active_only)).fetch_all(c).await)?)
    }

    pub async fn get_rotation(&self, id: &str) -> Result<Option<RotationRecord>> {
        Ok(get_rotation(self.reader().await?.conn(), id).await?)
    }
}

impl Tx {
    pub async fn insert_rotation(&mut self, r: &RotationRecord) -> Result<()> {
        on_tx!(self, c => sqlx::query("INSERT INTO rotations (id, kind, target, stage, spec, created_by, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&r.id).bind(&r.kind).bind(&r.target).bind(&r.stage).bind(&r.spec).bind(&r.created_by)
            .bind(r.created_at).bind(r.updated_at).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn list_active_rotations(&mut self) -> Result<Vec<RotationRecord>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM rotations WHERE stage NOT IN ('done', 'aborted') ORDER BY created_at, id")
            .fetch_all(c).await)?,
        )
    }

    /// Moves a rotation from `from` to `stage` with its new spec. False when it is no longer at
    /// `from` (someone else moved it).
    pub async fn update_rotation(&mut self, id: &str, from: &str, stage: &str, spec: &str, now: i64) -> Result<bool> {
        let n = on_tx!(self, c => sqlx::query("UPDATE rotations SET stage = $1, spec = $2, updated_at = $3 WHERE id = $4 AND stage = $5")
            .bind(stage).bind(spec).bind(now).bind(id).bind(from).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    pub async fn get_rotation(&mut self, id: &str) -> Result<Option<RotationRecord>> {
        Ok(get_rotation(self.conn(), id).await?)
    }
}
